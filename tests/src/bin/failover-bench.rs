//! `failover-bench`: how long a 3-node cluster of real `roost` processes is
//! without a leader when the leader's process is SIGKILLed, and whether an
//! idle cluster ever holds an election it did not need.
//!
//! 1. **kills**: three `roost node` processes on this machine (started as
//!    the README says: `node init`, then `node join` twice). `--kills N`
//!    times (20): find the leader, SIGKILL its process, and from that moment
//!    write through a survivor (`roost apps create`, the CLI's code in this
//!    process, retried every 10 ms while it fails) until a write is
//!    acknowledged; meanwhile poll each survivor's own view (`roost node
//!    list --stale`, every 10 ms) for a new leader. Prints, per kill and as
//!    medians and maxima over all kills, `failover_ms` (kill to the first
//!    acknowledged write) and `new_leader_ms` (kill to a survivor naming
//!    the new leader). The killed node is then started again with its
//!    original command line, and the next kill waits until all three are up.
//! 2. **idle**: the cluster left alone for `--idle-seconds S` (600); prints
//!    how many campaigns the nodes logged ("campaigning") in that time and
//!    whether the leader changed. Any campaign on an idle cluster is a
//!    spurious election.
//!
//! Run with `cargo run --release -p roost-tests --bin failover-bench [-- --kills N --idle-seconds S --only kills|idle --keep]`
//! (`--keep` keeps the nodes' logs).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use roost_tests::apps::cli;
use roost_tests::process::{wait_for_nodes, NodeProcess};
use roost_tests::wait_until;
use serde_json::Value;
use tokio::time::Instant;

const POLL: Duration = Duration::from_millis(10);

const USAGE: roost_tests::bench::Usage = roost_tests::bench::Usage {
    name: "failover-bench",
    values: &[("--kills", "N"), ("--idle-seconds", "S")],
    switches: &["--keep"],
    parts: &["kills", "idle"],
};

#[tokio::main]
async fn main() -> Result<()> {
    let flags = roost_tests::bench::Flags::from_command_line(&USAGE)?;
    let kills = flags.number("--kills", 20)?;
    let idle = flags.number("--idle-seconds", 600)?;
    let root = tempfile::Builder::new().prefix("roost-failover-bench-").tempdir()?;
    let result = run(root.path(), &flags, kills, idle).await;
    if result.is_err() || flags.has("--keep") {
        eprintln!("logs and data kept in {}", root.keep().display());
    }
    result
}

struct Nodes {
    procs: Vec<NodeProcess>,
    admin: String,
}

impl Nodes {
    /// The leader node `i` names in its own view (`node list --stale`).
    async fn seen_by(&self, i: usize) -> Result<Option<usize>> {
        let printed = cli(&self.procs[i].address, &self.admin, &["node", "list", "--json", "--stale"]).await?;
        let list: Vec<Value> = serde_json::from_str(&printed)?;
        let name = list.iter().find(|n| n["role"] == "leader").and_then(|n| n["name"].as_str());
        Ok(name.and_then(|name| self.procs.iter().position(|p| p.name == name)))
    }

    /// A leader other than `killed`, as a survivor that answers sees it.
    async fn new_leader(&self, killed: usize) -> Option<usize> {
        for i in (0..self.procs.len()).filter(|i| *i != killed) {
            if let Ok(Some(leader)) = self.seen_by(i).await {
                if leader != killed {
                    return Some(leader);
                }
            }
        }
        None
    }

    /// Waits until every node's own view names the same leader.
    async fn agree(&self) -> Result<usize> {
        let found = std::sync::Mutex::new(None);
        wait_until("all three nodes to name the same leader", Duration::from_secs(60), || async {
            let mut leaders = Vec::new();
            for i in 0..self.procs.len() {
                leaders.push(self.seen_by(i).await?);
            }
            let agreed = leaders[0].is_some() && leaders.iter().all(|l| *l == leaders[0]);
            *found.lock().unwrap_or_else(|p| p.into_inner()) = leaders[0];
            Ok(agreed)
        })
        .await?;
        found.into_inner().unwrap_or_else(|p| p.into_inner()).context("no leader")
    }

    async fn all_up(&self) -> Result<()> {
        let address = self.procs[0].address.clone();
        wait_for_nodes(&address, &self.admin, Duration::from_secs(60), "three voters up, one the leader", |n| {
            n.len() == 3
                && n.iter().all(|n| n["state"] == "up")
                && n.iter().filter(|n| n["role"] == "leader").count() == 1
                && n.iter().filter(|n| n["role"] == "voter").count() == 2
        })
        .await
    }

    /// Campaigns logged by every start of every node so far.
    fn campaigns(&self) -> usize {
        let mut count = 0;
        for entry in std::fs::read_dir(self.procs[0].data_dir.parent().unwrap_or(std::path::Path::new(".")))
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "stderr") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                count += text.matches("campaigning").count();
            }
        }
        count
    }
}

async fn run(root: &std::path::Path, flags: &roost_tests::bench::Flags, kills: u64, idle: u64) -> Result<()> {
    let n1 = NodeProcess::init(root, "n1")?;
    let admin = n1.read_token_when_ready("admin.token").await?;
    let join = n1.read_token_when_ready("join.token").await?;
    wait_for_nodes(&n1.address, &admin, Duration::from_secs(30), "n1 to serve", |n| n.len() == 1).await?;
    let n2 = NodeProcess::join(root, "n2", &n1.address, &join)?;
    let n3 = NodeProcess::join(root, "n3", &n1.address, &join)?;
    let mut nodes = Nodes { procs: vec![n1, n2, n3], admin };
    nodes.all_up().await?;
    println!("# failover-bench: 3 roost processes on this machine (Raft timings: the binary's defaults)");

    if flags.wants("kills") {
        let mut failovers = Vec::new();
        let mut elections = Vec::new();
        let campaigns_before = nodes.campaigns();
        for kill in 0..kills {
            nodes.all_up().await?;
            let leader = nodes.agree().await?;
            let campaigns = nodes.campaigns();
            nodes.procs[leader].kill()?;
            let killed_at = Instant::now();
            let survivors: Vec<String> =
                (0..3).filter(|i| *i != leader).map(|i| nodes.procs[i].address.clone()).collect();
            let app = format!("failover-{kill}");
            let write = async {
                let mut turn = 0;
                loop {
                    let address = &survivors[turn % survivors.len()];
                    turn += 1;
                    match cli(address, &nodes.admin, &["apps", "create", &app]).await {
                        Ok(_) => return Ok(killed_at.elapsed()),
                        Err(roost_node::cli::CliError::Exists(_)) => return Ok(killed_at.elapsed()),
                        Err(_) if killed_at.elapsed() < Duration::from_secs(30) => tokio::time::sleep(POLL).await,
                        Err(error) => bail!("no write was acknowledged within 30s of the kill: {error}"),
                    }
                }
            };
            let elected = async {
                loop {
                    if nodes.new_leader(leader).await.is_some() {
                        return Ok::<_, anyhow::Error>(killed_at.elapsed());
                    }
                    if killed_at.elapsed() > Duration::from_secs(30) {
                        bail!("no new leader within 30s of the kill");
                    }
                    tokio::time::sleep(POLL).await;
                }
            };
            let (written, elected) = tokio::try_join!(write, elected)?;
            // Campaigns logged since just before the kill (one is ideal;
            // more mean split votes or a campaign that lost).
            let campaigns = nodes.campaigns() - campaigns;
            println!(
                "kill={kill} killed={} failover_ms={} new_leader_ms={} campaigns={campaigns}",
                nodes.procs[leader].name,
                written.as_millis(),
                elected.as_millis()
            );
            failovers.push(written);
            elections.push(elected);
            // The restarted node counts as rejoined once its own state holds
            // the write made while it was down.
            nodes.procs[leader].start()?;
            let restarted = nodes.procs[leader].address.clone();
            wait_until("the restarted node to catch up", Duration::from_secs(60), || async {
                let Ok(printed) = cli(&restarted, &nodes.admin, &["apps", "list", "--json", "--stale"]).await else {
                    return Ok(false);
                };
                Ok(printed.contains(&format!("\"{app}\"")))
            })
            .await?;
        }
        let summary = |times: &mut Vec<Duration>| {
            times.sort();
            let p50 = times.get(times.len() / 2).copied().unwrap_or_default();
            let max = times.last().copied().unwrap_or_default();
            (p50.as_millis(), max.as_millis())
        };
        // Restarted nodes rejoin between kills; a campaign they start (a
        // disruption) shows here as more campaigns than kills.
        nodes.all_up().await?;
        nodes.agree().await?;
        println!("campaigns_during_kills={} kills={kills}", nodes.campaigns() - campaigns_before);
        let (p50, max) = summary(&mut failovers);
        let (leader_p50, leader_max) = summary(&mut elections);
        println!(
            "failover_ms_p50={p50} p_max={max} new_leader_ms_p50={leader_p50} new_leader_ms_max={leader_max} kills={kills} (goal: p50 < 1000, max < 2000)"
        );
    }

    if flags.wants("idle") && idle > 0 {
        nodes.all_up().await?;
        let leader = nodes.agree().await?;
        let before = nodes.campaigns();
        let deadline = Duration::from_secs(idle);
        // Nothing is asked of the cluster meanwhile: waiting is the experiment.
        tokio::time::sleep(deadline).await;
        let spurious = nodes.campaigns() - before;
        let after = nodes.agree().await?;
        println!(
            "idle_seconds={idle} spurious_elections={spurious} leader_changed={} (goal: 0, false)",
            leader != after
        );
    }
    Ok(())
}
