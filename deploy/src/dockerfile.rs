//! The images a Dockerfile reads besides its build context: those its
//! stages start `FROM`, and those `COPY --from` or `ADD --from` copy files
//! out of.
//!
//! A node builds with its own engine, where every app's images live side by
//! side, so a build could start from another app's image and so read its
//! files. A caller whose token is confined to one app may not; the node
//! checks what [`images_read`] returns before it builds. The reading follows
//! Docker's parser for what matters here: a leading byte-order mark is
//! dropped; the `escape` and `syntax` directives come first, and anything
//! else ends them; instructions are case-insensitive; the escape character
//! before spaces and tabs at a line's end continues it, the parts joined
//! with nothing between, and comment lines and empty lines within are
//! dropped; `ARG`s declared before the first `FROM` (with the build's
//! arguments over their defaults) are substituted as `$NAME`, `${NAME}` and
//! `${NAME:-default}`; a stage is named once it has ended, and a reference
//! to an earlier one (by its `AS` name or index), or to `scratch`, reads no
//! image. What this reading cannot be sure of is returned as written, for
//! the caller to refuse (it accepts only plain references): a reference
//! that still holds a `$`, or quotes or escapes that Docker would resolve.

use std::collections::{HashMap, HashSet};
use std::io::Read;

/// The most of a Dockerfile read from a build context (Docker itself reads
/// far less in practice; a longer one is refused, not truncated).
pub const MAX_DOCKERFILE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DockerfileError {
    #[error("the build context has no {0}")]
    Missing(String),
    #[error("{0} in the build context is not a regular file")]
    NotAFile(String),
    #[error("{path} is larger than {} KiB", MAX_DOCKERFILE_BYTES / 1024)]
    TooLarge { path: String },
    #[error("a token confined to one app may not send {0}")]
    Unusual(String),
    #[error("could not read the build context")]
    Read(#[from] std::io::Error),
}

/// The Dockerfile at `path` in a build context tar, read as Docker will:
/// the last entry of that path wins. A context that Docker would read
/// differently from this (compressed, with `..` in a path, or with a link
/// at or above the Dockerfile) is refused.
pub fn from_context(context: impl Read, path: &str) -> Result<String, DockerfileError> {
    let wanted = normalize(path);
    let mut context = std::io::BufReader::new(context);
    let head = std::io::BufRead::fill_buf(&mut context)?;
    let compressed = [&[0x1f, 0x8b][..], b"BZh", &[0xfd, b'7', b'z', b'X', b'Z', 0x00], &[0x28, 0xb5, 0x2f, 0xfd]];
    if compressed.iter().any(|magic| head.starts_with(magic)) {
        return Err(DockerfileError::Unusual("a compressed build context".into()));
    }
    let mut archive = tar::Archive::new(context);
    let mut found = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        if name.split('/').any(|part| part == "..") {
            return Err(DockerfileError::Unusual(format!("`..` in the path {name}")));
        }
        let name = normalize(&name);
        let kind = entry.header().entry_type();
        let on_the_way = name == wanted || wanted.starts_with(&format!("{name}/"));
        if on_the_way && (kind.is_symlink() || kind.is_hard_link()) {
            return Err(DockerfileError::Unusual(format!("a link at {name}, on the Dockerfile's path")));
        }
        if name != wanted {
            continue;
        }
        if !kind.is_file() {
            return Err(DockerfileError::NotAFile(path.to_owned()));
        }
        let mut text = String::new();
        (&mut entry).take(MAX_DOCKERFILE_BYTES + 1).read_to_string(&mut text)?;
        if text.len() as u64 > MAX_DOCKERFILE_BYTES {
            return Err(DockerfileError::TooLarge { path: path.to_owned() });
        }
        found = Some(text);
    }
    found.ok_or_else(|| DockerfileError::Missing(path.to_owned()))
}

fn normalize(path: &str) -> String {
    path.split('/').filter(|part| !part.is_empty() && *part != ".").collect::<Vec<_>>().join("/")
}

/// The image references `dockerfile` reads, in order, each once. An
/// `ONBUILD` trigger it declares counts too: it runs in a later build that
/// starts from this one's image.
pub fn images_read(dockerfile: &str, build_args: &HashMap<String, String>) -> Vec<String> {
    let mut global_args: HashMap<String, String> = HashMap::new();
    // Docker names a stage once it has ended: a stage cannot read itself.
    let mut stages: HashSet<String> = HashSet::new();
    let mut current_stage: Option<String> = None;
    let mut stage_count = 0usize;
    let mut images: Vec<String> = Vec::new();
    let push = |image: String, images: &mut Vec<String>| {
        if !image.eq_ignore_ascii_case("scratch") && !images.contains(&image) {
            images.push(image);
        }
    };
    for line in instructions(dockerfile) {
        let mut words = line.split_whitespace();
        let Some(mut keyword) = words.next() else { continue };
        let trigger = keyword.eq_ignore_ascii_case("onbuild");
        if trigger {
            let Some(inner) = words.next() else { continue };
            keyword = inner;
        }
        let words: Vec<&str> = words.collect();
        let keyword = keyword.to_ascii_lowercase();
        if matches!(keyword.as_str(), "from" | "copy" | "add") {
            // A flag Docker would unquote or unescape is returned as it is:
            // not a plain reference, so the caller refuses it.
            for word in words.iter().filter(|w| w.starts_with('-') && w.contains(['"', '\'', '\\', '`'])) {
                push((*word).to_owned(), &mut images);
            }
        }
        match keyword.as_str() {
            "arg" if stage_count == 0 && !trigger => {
                for word in &words {
                    let (name, default) = word.split_once('=').unwrap_or((word, ""));
                    let value = build_args.get(name).cloned().unwrap_or_else(|| unquote(default).to_owned());
                    global_args.insert(name.to_owned(), value);
                }
            }
            "from" if !trigger => {
                stages.extend(current_stage.take());
                let mut rest = words.iter().filter(|w| !w.starts_with("--"));
                if let Some(image) = rest.next() {
                    let image = substitute(image, &global_args);
                    if !stages.contains(&image.to_ascii_lowercase()) {
                        push(image, &mut images);
                    }
                }
                if let (Some(as_word), Some(name)) = (rest.next(), rest.next()) {
                    if as_word.eq_ignore_ascii_case("as") {
                        current_stage = Some(name.to_ascii_lowercase());
                    }
                }
                stage_count += 1;
            }
            "copy" | "add" => {
                for word in &words {
                    let Some(source) = word.strip_prefix("--from=") else { continue };
                    let source = unquote(source);
                    // A trigger runs in another build, whose stages are unknown here.
                    let is_stage = !trigger
                        && (stages.contains(&source.to_ascii_lowercase())
                            || source.parse::<usize>().is_ok_and(|index| index + 1 < stage_count));
                    if !is_stage {
                        push(source.to_owned(), &mut images);
                    }
                }
            }
            _ => {}
        }
    }
    images
}

/// The Dockerfile's instructions: comment lines dropped, continued lines
/// joined (with `\`, or the character an `# escape=` directive names).
fn instructions(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut continued = false;
    let mut escape = '\\';
    let mut directives = true;
    let mut seen_directives: HashSet<String> = HashSet::new();
    for line in dockerfile.trim_start_matches('\u{feff}').lines() {
        let trimmed = line.trim_start();
        // Directives come first, each known one once; anything else
        // (an unknown one included) ends them, as in Docker.
        if directives {
            let directive = trimmed.strip_prefix('#').and_then(|d| d.split_once('='));
            let key = directive.map(|(key, _)| key.trim().to_ascii_lowercase()).unwrap_or_default();
            match directive {
                Some((_, value)) if (key == "escape" || key == "syntax") && seen_directives.insert(key.clone()) => {
                    if key == "escape" {
                        escape = match value.trim() {
                            "`" => '`',
                            _ => '\\',
                        };
                    }
                    continue;
                }
                _ => directives = false,
            }
        }
        // Comment lines, and empty lines within a continued instruction,
        // are dropped.
        if trimmed.starts_with('#') || (continued && trimmed.trim().is_empty()) {
            continue;
        }
        // A line continues when the escape character ends it, before
        // spaces and tabs only; the parts join with nothing between them.
        match trimmed.trim_end_matches([' ', '\t']).strip_suffix(escape) {
            Some(part) => {
                current.push_str(part);
                continued = true;
            }
            None => {
                current.push_str(trimmed);
                out.push(std::mem::take(&mut current));
                continued = false;
            }
        }
    }
    if !current.trim().is_empty() {
        out.push(current);
    }
    out
}

fn unquote(text: &str) -> &str {
    let quoted = |q: char| text.len() >= 2 && text.starts_with(q) && text.ends_with(q);
    if quoted('"') || quoted('\'') {
        &text[1..text.len() - 1]
    } else {
        text
    }
}

/// `$NAME`, `${NAME}` and `${NAME:-default}` replaced from `args`; anything
/// else (an unknown form, an unclosed brace) is left as written.
fn substitute(text: &str, args: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
        if let Some(braced) = after.strip_prefix('{') {
            let Some(end) = braced.find('}') else {
                out.push_str(&rest[at..]);
                return out;
            };
            let inner = &braced[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            match (args.get(name).filter(|v| !v.is_empty()), default) {
                (Some(value), _) if name.chars().all(is_name) => out.push_str(value),
                (None, Some(default)) if name.chars().all(is_name) => out.push_str(default),
                _ => out.push_str(&rest[at..at + 2 + end + 1]),
            }
            rest = &braced[end + 1..];
        } else {
            let end = after.find(|c: char| !is_name(c)).unwrap_or(after.len());
            match args.get(&after[..end]).filter(|v| !v.is_empty()) {
                Some(value) if end > 0 => out.push_str(value),
                _ => out.push_str(&rest[at..at + 1 + end]),
            }
            rest = &after[end..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dockerfile: &str) -> Vec<String> {
        images_read(dockerfile, &HashMap::new())
    }

    #[test]
    fn from_and_copy_from_name_the_images_read_and_stages_are_not_images() {
        let dockerfile = "\
# syntax comment
from --platform=linux/amd64 golang:1.22 AS Build
RUN go build
FROM build AS again
COPY --from=build /out /out
COPY --from=0 /x /x
copy --from=roost-db:17 /data /data
ADD --chown=1:1 --from=\"other:1\" /a /a
FROM scratch
COPY --from=1 /out /out
";
        // A quoted flag is returned as written too, for the caller to refuse.
        assert_eq!(read(dockerfile), ["golang:1.22", "roost-db:17", "--from=\"other:1\"", "other:1"]);
    }

    #[test]
    fn continued_lines_are_joined_and_comments_skipped() {
        assert_eq!(read("FROM \\\n  roost-db:1 \\\n  AS base\n# FROM hidden:1\nFROM base\n"), ["roost-db:1"]);
    }

    #[test]
    fn onbuild_triggers_and_the_escape_directive_are_read() {
        assert_eq!(read("FROM a:1\nONBUILD COPY --from=roost-db:1 / /stolen\n"), ["a:1", "roost-db:1"]);
        // With ` as the escape character, a trailing \ continues nothing.
        let dockerfile = "# escape=`\nFROM scratch `\n  AS base\nFROM roost-db:1 \\\nFROM base\n";
        assert_eq!(read(dockerfile), ["roost-db:1"]);
        // A directive after the first comment is only a comment.
        assert_eq!(read("# hello\n# escape=`\nFROM a:1 \\\n AS b\nFROM b\n"), ["a:1"]);
    }

    #[test]
    fn corners_of_dockerfile_syntax_are_read_as_docker_reads_them() {
        // The parts of a continued line join with nothing between them.
        assert_eq!(read("FROM roost-b\\\n:1\n"), ["roost-b:1"]);
        assert_eq!(read("FROM a:1\nCOPY --fr\\\nom=roost-b:1 / /\n"), ["a:1", "roost-b:1"]);
        // Empty lines and comments within a continuation are dropped; what
        // follows still belongs to the continued instruction.
        assert_eq!(read("FROM a:1\nRUN true \\\n\n# note\nCOPY --from=roost-b:1 / /\n"), ["a:1"]);
        // Only spaces and tabs may follow the escape character.
        assert_eq!(read("FROM a:1\nRUN true \\\u{a0}\nCOPY --from=roost-b:1 / /\n"), ["a:1", "roost-b:1"]);
        assert_eq!(read("FROM a:1\nRUN true \\ \t\nCOPY --from=roost-b:1 / /\n"), ["a:1"]);
        // A byte-order mark is dropped.
        assert_eq!(read("\u{feff}FROM roost-b:1\n"), ["roost-b:1"]);
        // An unknown directive ends the directives: an escape line after it
        // is a comment.
        assert_eq!(read("# x=1\n# escape=`\nFROM a:1\nRUN true `\nCOPY --from=roost-b:1 / /\n"), ["a:1", "roost-b:1"]);
        // A stage is named once it ends: until then its name is an image.
        let dockerfile = "FROM a:1 AS c0ffee\nCOPY --from=c0ffee / /\nFROM c0ffee\nCOPY --from=1 / /\n";
        assert_eq!(read(dockerfile), ["a:1", "c0ffee", "1"]);
        // Flags Docker would unquote are returned as written.
        assert_eq!(read("FROM a:1\nCOPY --\"from\"=roost-b:1 / /\n"), ["a:1", "--\"from\"=roost-b:1"]);
    }

    #[test]
    fn global_args_are_substituted_with_build_args_over_defaults() {
        let dockerfile = "ARG BASE=roost-db:1\nARG TAG\nFROM $BASE\nFROM app:${TAG}\nFROM x:${MISSING:-dflt}\n";
        // TAG is declared without a default and not given: unresolved.
        assert_eq!(read(dockerfile), ["roost-db:1", "app:${TAG}", "x:dflt"]);
        let args = HashMap::from([("BASE".to_owned(), "mine:2".to_owned()), ("TAG".to_owned(), "3".to_owned())]);
        assert_eq!(images_read(dockerfile, &args), ["mine:2", "app:3", "x:dflt"]);
    }

    #[test]
    fn a_variable_that_cannot_be_resolved_is_returned_as_written() {
        assert_eq!(read("FROM $UNDECLARED\nFROM ${BROKEN\nFROM ${A:+x}\n"), ["$UNDECLARED", "${BROKEN", "${A:+x}"]);
        // An ARG declared inside a stage does not reach a later FROM.
        assert_eq!(read("FROM a:1\nARG B=roost-db:1\nFROM $B\n"), ["a:1", "$B"]);
    }

    #[test]
    fn the_dockerfile_is_found_in_a_context_tar_by_its_normalized_path() -> Result<(), DockerfileError> {
        let context = context_of(&[
            ("./app/main.rs", tar::EntryType::Regular, "fn main() {}"),
            ("./sub/Dockerfile.web", tar::EntryType::Regular, "FROM roost-db:1\n"),
        ])?;
        assert_eq!(from_context(&context[..], "sub/Dockerfile.web")?, "FROM roost-db:1\n");
        assert_eq!(from_context(&context[..], "./sub//Dockerfile.web")?, "FROM roost-db:1\n");
        assert!(matches!(from_context(&context[..], "Dockerfile"), Err(DockerfileError::Missing(_))));
        Ok(())
    }

    fn context_of(entries: &[(&str, tar::EntryType, &str)]) -> std::io::Result<Vec<u8>> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, kind, body) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(0o644);
            // Written raw: the tar crate's own setter refuses `..`.
            let raw = &mut header.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            if kind.is_symlink() {
                header.set_size(0);
                header.set_link_name(body)?;
                header.set_cksum();
                builder.append(&header, std::io::empty())?;
            } else {
                header.set_size(body.len() as u64);
                header.set_cksum();
                builder.append(&header, body.as_bytes())?;
            }
        }
        builder.into_inner()
    }

    #[test]
    fn a_context_is_read_as_docker_reads_it_or_refused() -> Result<(), DockerfileError> {
        use tar::EntryType::{Regular, Symlink};
        // The last entry of a path is the one Docker keeps.
        let twice =
            context_of(&[("Dockerfile", Regular, "FROM a:1\n"), ("./Dockerfile", Regular, "FROM roost-b:1\n")])?;
        assert_eq!(from_context(&twice[..], "Dockerfile")?, "FROM roost-b:1\n");
        let up = context_of(&[("x/../Dockerfile", Regular, "FROM roost-b:1\n")])?;
        assert!(matches!(from_context(&up[..], "Dockerfile"), Err(DockerfileError::Unusual(_))));
        let linked = context_of(&[("sub", Symlink, "elsewhere"), ("sub/Dockerfile", Regular, "FROM a:1\n")])?;
        assert!(matches!(from_context(&linked[..], "sub/Dockerfile"), Err(DockerfileError::Unusual(_))));
        let gzip = [0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0];
        assert!(matches!(from_context(&gzip[..], "Dockerfile"), Err(DockerfileError::Unusual(_))));
        Ok(())
    }
}
