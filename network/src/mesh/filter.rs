//! Packet filter rules for the mesh, through `iptables` (the flavour the
//! Docker engine uses, so the rules sit in the same tables as its own).
//!
//! Docker drops forwarded traffic by default and isolates its bridges from
//! each other. A node lets mesh traffic through with rules in `DOCKER-USER`,
//! the chain the engine reserves for its users and evaluates first:
//! - into the mesh from its instances' bridge (to WireGuard, or to another
//!   node's bridge on the same machine);
//! - out of the mesh onto its bridge (from WireGuard or another bridge).
//!
//! The bridge is created without Docker's masquerading, so nothing inside the
//! mesh is translated (a receiver sees the sender's mesh address); one `nat`
//! rule masquerades what leaves the mesh range, so instances still reach the
//! world.
//!
//! Every rule carries the comment `roost:<cluster>:<node>:<digest>`, the
//! digest naming the rule set: a node finds its own rules, and drops those of
//! an older set (another bridge or subnet), without touching anyone else's.

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};
use tokio::process::Command;

use super::MeshError;

/// One rule: its table, its chain, and its match and target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub table: &'static str,
    pub chain: &'static str,
    pub spec: Vec<String>,
}

/// The rules a node needs for its bridge and /24, tagged for `node`.
pub fn rules(tag_prefix: &str, bridge: &str, subnet: Ipv4Net, range: Ipv4Net) -> Vec<Rule> {
    let (subnet, range) = (subnet.to_string(), range.to_string());
    let specs: [(&'static str, &'static str, Vec<&str>); 3] = [
        ("filter", "DOCKER-USER", vec!["-i", bridge, "-d", &range, "-j", "ACCEPT"]),
        ("filter", "DOCKER-USER", vec!["-o", bridge, "-s", &range, "-j", "ACCEPT"]),
        ("nat", "POSTROUTING", vec!["-s", &subnet, "!", "-d", &range, "-j", "MASQUERADE"]),
    ];
    let digest = {
        let mut hash = Sha256::new();
        for (table, chain, spec) in &specs {
            hash.update(format!("{table} {chain} {}\n", spec.join(" ")));
        }
        hash.finalize().iter().take(4).map(|b| format!("{b:02x}")).collect::<String>()
    };
    let tag = format!("{tag_prefix}:{digest}");
    specs
        .into_iter()
        .map(|(table, chain, spec)| {
            let mut spec: Vec<String> = spec.into_iter().map(str::to_owned).collect();
            spec.extend(["-m".into(), "comment".into(), "--comment".into(), tag.clone()]);
            Rule { table, chain, spec }
        })
        .collect()
}

async fn iptables(args: &[String]) -> Result<std::process::Output, MeshError> {
    Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .await
        .map_err(|source| MeshError::Io { action: "run iptables (is it installed?)", source })
}

async fn run(args: Vec<String>) -> Result<(), MeshError> {
    let output = iptables(&args).await?;
    if output.status.success() {
        Ok(())
    } else {
        Err(MeshError::Iptables {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Makes the rules tagged `tag_prefix` exactly `wanted`: adds what is
/// missing (accepts first in their chain) and deletes tagged rules of any
/// other set.
pub async fn sync(tag_prefix: &str, wanted: &[Rule]) -> Result<(), MeshError> {
    for rule in wanted {
        let mut check = vec!["-t".to_owned(), rule.table.into(), "-C".into(), rule.chain.into()];
        check.extend(rule.spec.iter().cloned());
        if iptables(&check).await?.status.success() {
            continue;
        }
        let insert = if rule.table == "filter" { "-I" } else { "-A" };
        let mut add = vec!["-t".to_owned(), rule.table.into(), insert.into(), rule.chain.into()];
        add.extend(rule.spec.iter().cloned());
        tracing::debug!(rule = %add.join(" "), "adding a mesh filter rule");
        run(add).await?;
    }
    let current_tags: Vec<&String> = wanted.iter().filter_map(|r| r.spec.last()).collect();
    let mine = format!("{tag_prefix}:");
    remove_matching(|comment| comment.starts_with(&mine) && !current_tags.iter().any(|t| *t == comment)).await
}

/// Deletes every rule tagged under `prefix` (a node's, `roost:<cluster>:<node>`,
/// or a whole cluster's, `roost:<cluster>`).
pub async fn remove_tagged(prefix: &str) -> Result<(), MeshError> {
    let prefix = format!("{prefix}:");
    remove_matching(|comment| comment.starts_with(&prefix)).await
}

async fn remove_matching(matches: impl Fn(&str) -> bool) -> Result<(), MeshError> {
    for (table, chain) in [("filter", "DOCKER-USER"), ("nat", "POSTROUTING")] {
        let listed = iptables(&["-t".into(), table.into(), "-S".into(), chain.into()]).await?;
        if !listed.status.success() {
            // No DOCKER-USER chain: the engine has not started yet, nothing of ours is there.
            continue;
        }
        for line in String::from_utf8_lossy(&listed.stdout).lines() {
            let words: Vec<String> = line.split_whitespace().map(|w| w.trim_matches('"').to_owned()).collect();
            let comment = words.iter().position(|w| w == "--comment").and_then(|i| words.get(i + 1));
            if !comment.is_some_and(|c| matches(c)) || words.first().map(String::as_str) != Some("-A") {
                continue;
            }
            let mut delete = vec!["-t".to_owned(), table.into(), "-D".into()];
            delete.extend(words.into_iter().skip(1));
            run(delete).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_tagged_with_a_digest_of_the_set() {
        let range: Ipv4Net = "10.210.0.0/16".parse().expect("range");
        let a = rules("roost:c1:1", "rb-c1-1", "10.210.0.0/24".parse().expect("net"), range);
        let b = rules("roost:c1:1", "rb-c1-1", "10.210.1.0/24".parse().expect("net"), range);
        assert_eq!(a.len(), 3);
        let tag = |rules: &[Rule]| rules[0].spec.last().cloned().expect("tag");
        assert!(tag(&a).starts_with("roost:c1:1:"));
        assert!(a.iter().all(|r| r.spec.last() == Some(&tag(&a))));
        assert_ne!(tag(&a), tag(&b), "another subnet is another set");
        assert!(a[2].spec.join(" ").starts_with("-s 10.210.0.0/24 ! -d 10.210.0.0/16 -j MASQUERADE"));
    }
}
