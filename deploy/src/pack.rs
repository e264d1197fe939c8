//! Packing a build context: the app's directory as a tar, minus what
//! `.dockerignore` excludes.
//!
//! The CLI packs, the node that receives the tar builds it with Docker. The
//! patterns are read with gitignore rules (the `ignore` crate), which agree
//! with Docker's for the usual `target/`, `*.log`, `!keep.log` lines; one
//! difference is that a pattern without a slash matches at any depth here,
//! where Docker anchors it at the root. The Dockerfile and `.dockerignore`
//! themselves are always sent, as Docker does.

use std::path::{Path, PathBuf};

use ignore::WalkBuilder;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("could not read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not walk {}", .path.display())]
    Walk {
        path: PathBuf,
        #[source]
        source: ignore::Error,
    },
}

/// The tar of `dir`, and how many files went in.
pub fn pack(dir: &Path, dockerfile: &str) -> Result<(Vec<u8>, usize), PackError> {
    if !dir.is_dir() {
        return Err(PackError::NotADirectory(dir.to_owned()));
    }
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    let mut files = 0;
    let walk = WalkBuilder::new(dir)
        .standard_filters(false)
        .hidden(false)
        .add_custom_ignore_filename(".dockerignore")
        .sort_by_file_name(|a, b| a.cmp(b))
        .build();
    let always = [Path::new(dockerfile), Path::new(".dockerignore")];
    let mut sent_always = [false, false];
    for entry in walk {
        let entry = entry.map_err(|source| PackError::Walk { path: dir.to_owned(), source })?;
        let Ok(relative) = entry.path().strip_prefix(dir) else { continue };
        if relative.as_os_str().is_empty() || entry.file_type().is_some_and(|t| t.is_dir()) {
            continue;
        }
        for (i, path) in always.iter().enumerate() {
            sent_always[i] |= relative == *path;
        }
        append(&mut builder, entry.path(), relative)?;
        files += 1;
    }
    for (i, path) in always.iter().enumerate() {
        let full = dir.join(path);
        if !sent_always[i] && full.is_file() {
            append(&mut builder, &full, path)?;
            files += 1;
        }
    }
    let tar = builder.into_inner().map_err(|source| PackError::Read { path: dir.to_owned(), source })?;
    Ok((tar, files))
}

fn append(builder: &mut tar::Builder<Vec<u8>>, path: &Path, name: &Path) -> Result<(), PackError> {
    builder.append_path_with_name(path, name).map_err(|source| PackError::Read { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore_excludes_and_reincludes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("target/debug")).expect("mkdir");
        std::fs::write(root.join("target/debug/big"), "x").expect("write");
        std::fs::write(root.join("Dockerfile"), "FROM scratch").expect("write");
        std::fs::write(root.join("app.log"), "x").expect("write");
        std::fs::write(root.join("keep.log"), "x").expect("write");
        std::fs::write(root.join("main.rs"), "fn main() {}").expect("write");
        std::fs::write(root.join(".dockerignore"), "target/\n*.log\n!keep.log\nDockerfile\n").expect("write");
        let (tar, files) = pack(root, "Dockerfile").expect("pack");
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut names: Vec<String> = archive
            .entries()
            .expect("entries")
            .map(|e| e.expect("entry").path().expect("path").display().to_string())
            .collect();
        names.sort();
        assert_eq!(names, [".dockerignore", "Dockerfile", "keep.log", "main.rs"]);
        assert_eq!(files, 4);
    }

    #[test]
    fn a_missing_directory_is_named() {
        let error = pack(Path::new("/nonexistent/app"), "Dockerfile").expect_err("missing");
        assert_eq!(error.to_string(), "/nonexistent/app is not a directory");
    }
}
