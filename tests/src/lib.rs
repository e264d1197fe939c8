//! Fixtures for Roost's multi-node tests and benchmarks.
//!
//! - [`Cluster`]: nodes in this process, each on `127.0.0.1:0` with its own
//!   temporary data directory, real RocksDB, real TLS and gRPC over sockets.
//!   Nodes can be stopped and restarted from their directories.
//! - [`process`]: the built `roost` binary run as a user would, for tests
//!   that kill processes with SIGKILL and read what the CLI prints.
//! - [`pebble`]: a real ACME server (Debian's pebble) for TLS tests.
//! - [`topology`]: machines on this machine: each node in a container with
//!   its own Docker engine and address, for what crosses a real network
//!   (image transfers, the WireGuard mesh).
//! - [`netns`]: nodes in network namespaces of their own, for partitions
//!   made of dropped packets; [`linearizable`]: the checker the fault test
//!   proves its histories with.
//! - [`wait_until`]: polls a condition until a deadline; tests never sleep
//!   for a fixed time to paper over a race.
//!
//! Data directories of a failed test are kept (their paths are printed) so
//! the RocksDB state can be inspected.

pub mod apps;
pub mod bench;
pub mod linearizable;
pub mod netns;
pub mod pebble;
pub mod process;
pub mod topology;

use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;
use roost_node::daemon::{
    ClusterSettings, EdgeListen, InitTokens, LivenessConfig, MeshSettings, Node, NodeConfig, RunningNode, Start,
};
use roost_raft::Timings;
use tempfile::TempDir;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use roost_node::cli::Control;

/// Polls `condition` every 50 ms until it returns `Ok(true)` or `timeout`
/// passes; the error names `what` and the last error seen.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match condition().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            match last_error {
                Some(e) => bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Installs a tracing subscriber once, honouring `ROOST_LOG`.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ROOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// One node slot of an in-process cluster.
pub struct Slot {
    pub name: String,
    pub dir: TempDir,
    /// The address the node bound the first time; restarts reuse it.
    pub address: Option<String>,
    pub running: Option<RunningNode>,
}

/// Nodes in this process, on loopback, each with its own data directory.
pub struct Cluster {
    pub slots: Vec<Slot>,
    pub tokens: InitTokens,
    pub timings: Timings,
    pub liveness: LivenessConfig,
    /// Removes the cluster's containers and images when the test ends.
    pub docker: apps::DockerCleanup,
}

impl Cluster {
    /// Starts `n` nodes: the first creates the cluster, the rest join it, and
    /// returns once every node is a member of Raft's membership.
    pub async fn start(n: usize) -> Result<Self> {
        Self::start_with(n, Timings::default(), LivenessConfig::default()).await
    }

    pub async fn start_with(n: usize, timings: Timings, liveness: LivenessConfig) -> Result<Self> {
        init_logs();
        let dir = tempfile::Builder::new().prefix("roost-n1-").tempdir()?;
        let config = node_config("n1", dir.path(), None, Start::Init, &timings, &liveness);
        let first = Node::start(config, CancellationToken::new()).await.context("starting n1")?;
        let tokens = first.init_tokens.clone().context("the first node returned no tokens")?;
        let address = first.address.clone();
        let cluster_id =
            first.consensus.state().read(|s| s.cluster.as_ref().map(|c| c.id.clone())).context("no cluster id")?;
        let mut cluster = Self {
            slots: vec![Slot { name: "n1".into(), dir, address: Some(address), running: Some(first) }],
            tokens,
            timings,
            liveness,
            docker: apps::DockerCleanup { cluster: cluster_id },
        };
        for _ in 1..n {
            cluster.add_node().await?;
        }
        cluster.wait_for_members(n).await?;
        Ok(cluster)
    }

    /// Starts a new node that joins through the first running node.
    pub async fn add_node(&mut self) -> Result<usize> {
        let token = self.tokens.join.to_string();
        self.add_node_with_token(&token).await
    }

    /// [`Cluster::add_node`] with the join token given (a worker token, say).
    pub async fn add_node_with_token(&mut self, token: &str) -> Result<usize> {
        let index = self.slots.len();
        let name = format!("n{}", index + 1);
        let seed = self.any_running()?.address.clone();
        let dir = tempfile::Builder::new().prefix(&format!("roost-{name}-")).tempdir()?;
        let start = Start::Join { seed, token: token.to_owned() };
        let config = node_config(&name, dir.path(), None, start, &self.timings, &self.liveness);
        let node = Node::start(config, CancellationToken::new()).await.with_context(|| format!("starting {name}"))?;
        self.slots.push(Slot { name, dir, address: Some(node.address.clone()), running: Some(node) });
        Ok(index)
    }

    pub fn node(&self, index: usize) -> Result<&RunningNode> {
        self.slots.get(index).and_then(|s| s.running.as_ref()).with_context(|| format!("node {index} is not running"))
    }

    pub fn any_running(&self) -> Result<&RunningNode> {
        self.slots.iter().find_map(|s| s.running.as_ref()).context("no node is running")
    }

    /// Index of the node that currently leads, as the running nodes agree.
    pub fn leader(&self) -> Option<usize> {
        self.slots.iter().position(|s| s.running.as_ref().is_some_and(|n| n.consensus.is_leader()))
    }

    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<usize> {
        wait_until("a leader", timeout, || async { Ok(self.leader().is_some()) }).await?;
        self.leader().context("leader vanished")
    }

    /// Waits until Raft's membership has `n` members and 1, 3 or 5 voters,
    /// in a committed, non-joint configuration that every running node has.
    /// Only then can any one voter fail without stalling the cluster.
    pub async fn wait_for_members(&self, n: usize) -> Result<()> {
        let voters = roost_node::daemon::membership::voter_target(n);
        wait_until(&format!("{n} members with {voters} voters, settled"), Duration::from_secs(30), || async {
            let Some(leader) = self.leader() else { return Ok(false) };
            let metrics = self.node(leader)?.consensus.raft().metrics().borrow().clone();
            let config = metrics.membership_config.clone();
            let membership = config.membership();
            let settled = membership.get_joint_config().len() == 1
                && config.log_id().is_some_and(|id| metrics.last_applied.is_some_and(|a| a >= id));
            let everywhere = self
                .slots
                .iter()
                .filter_map(|s| s.running.as_ref())
                .all(|node| node.consensus.raft().metrics().borrow().membership_config.log_id() == config.log_id());
            Ok(settled && everywhere && membership.nodes().count() == n && membership.voter_ids().count() == voters)
        })
        .await
    }

    /// Stops node `index` (gracefully: in-process nodes cannot be SIGKILLed;
    /// the process tests do that).
    pub async fn stop(&mut self, index: usize) -> Result<()> {
        let node = self.slots[index].running.take().with_context(|| format!("node {index} is not running"))?;
        node.stop().await;
        Ok(())
    }

    /// Restarts node `index` from its data directory on its old address.
    pub async fn restart(&mut self, index: usize) -> Result<()> {
        let slot = &self.slots[index];
        let address = slot.address.clone().context("node never started")?;
        let start = match index {
            0 => Start::Init,
            _ => Start::Join { seed: String::new(), token: self.tokens.join.to_string() },
        };
        let config = node_config(&slot.name, slot.dir.path(), Some(address), start, &self.timings, &self.liveness);
        let node =
            Node::start(config, CancellationToken::new()).await.with_context(|| format!("restarting {}", slot.name))?;
        self.slots[index].running = Some(node);
        Ok(())
    }

    /// Runs a `roost` CLI command against node `index`.
    pub async fn cli(&self, index: usize, args: &[&str]) -> std::result::Result<String, roost_node::cli::CliError> {
        let address = match self.node(index) {
            Ok(node) => node.address.clone(),
            Err(e) => return Err(roost_node::cli::CliError::Other(e.to_string())),
        };
        apps::cli(&address, &self.tokens.admin.to_string(), args).await
    }

    /// An admin client of node `index`.
    pub async fn client(&self, index: usize) -> Result<Control> {
        admin_client(&self.node(index)?.address, &self.tokens).await
    }

    /// `roost node remove NAME` through the node in slot `via`, as the CLI
    /// signs it.
    pub async fn remove_node(&self, via: usize, name: &str) -> Result<()> {
        let request = roost_proto::api::RemoveNodeRequest { node: name.to_owned() };
        self.client(via).await?.remove_node(roost_node::cli::about(&format!("node:{name}"), request)).await?;
        Ok(())
    }

    pub async fn shutdown(mut self) {
        for slot in &mut self.slots {
            if let Some(node) = slot.running.take() {
                node.stop().await;
            }
        }
    }
}

/// Every file under `dir`, in subdirectories too.
pub fn files_under(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(files_under(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

/// A client that presents the node certificate stored in a data directory:
/// what anyone holding that directory can do.
pub fn node_tls(data_dir: &std::path::Path) -> Result<roost_network::tls::ClientTls> {
    let read = |f: &str| std::fs::read_to_string(data_dir.join("tls").join(f));
    Ok(roost_network::tls::ClientTls::node(&read("ca.pem")?, &read("node.pem")?, &read("node.key")?)?)
}

/// An admin client for the node at `address`, signing its calls as the CLI
/// does.
pub async fn admin_client(address: &str, tokens: &InitTokens) -> Result<Control> {
    Ok(roost_node::cli::connect_api(address, &tokens.admin).await?)
}

/// A test node's configuration: its own data directory, port 0 (or the
/// address it had), no WireGuard (the nodes share this machine), and the
/// test cluster's own mesh range.
pub fn node_config(
    name: &str,
    dir: &std::path::Path,
    address: Option<String>,
    start: Start,
    timings: &Timings,
    liveness: &LivenessConfig,
) -> NodeConfig {
    NodeConfig {
        data_dir: dir.to_owned(),
        listen: address.unwrap_or_else(|| "127.0.0.1:0".into()),
        advertise: None,
        name: Some(name.into()),
        default_name: name.into(),
        labels: Default::default(),
        start,
        timings: timings.clone(),
        liveness: liveness.clone(),
        join_wait: std::time::Duration::from_secs(30),
        resources: node_resources(),
        docker_host: None,
        controller: Default::default(),
        mesh: MeshSettings { wireguard_port: None, dns_port: 53, upstream_dns: Vec::new() },
        cluster: ClusterSettings { mesh_range: mesh_range(), ..Default::default() },
        edge: EdgeListen { http: "127.0.0.1:0".into(), https: "127.0.0.1:0".into(), workers: 1 },
        connection_limits: Default::default(),
        max_upload: roost_node::daemon::DEFAULT_MAX_UPLOAD,
        api_cert_lifetime: roost_node::daemon::DEFAULT_API_CERT_LIFETIME,
    }
}

/// A mesh range of its own for each test cluster: a /20 (16 nodes) of
/// 10.128.0.0/9 that no Docker network on this machine overlaps and that
/// this process has not handed out, so test clusters can run side by side
/// on one engine.
pub fn mesh_range() -> Ipv4Net {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const SLOTS: u32 = 2048;
    let taken = docker_subnets();
    let start = std::process::id().wrapping_mul(7919);
    loop {
        let slot = (start.wrapping_add(NEXT.fetch_add(1, Ordering::SeqCst))) % SLOTS;
        let base = u32::from(Ipv4Addr::new(10, 128, 0, 0)) + slot * 4096;
        let range = Ipv4Net::new(Ipv4Addr::from(base), 20).unwrap_or_default();
        if !taken.iter().any(|net| net.contains(&range.network()) || range.contains(&net.network())) {
            return range;
        }
    }
}

/// The IPv4 subnets of the engine's networks.
pub(crate) fn docker_subnets() -> Vec<Ipv4Net> {
    let ids = std::process::Command::new("docker").args(["network", "ls", "-q"]).output();
    let ids: Vec<String> =
        ids.map(|out| String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()).unwrap_or_default();
    if ids.is_empty() {
        return Vec::new();
    }
    let format = "{{range .IPAM.Config}}{{.Subnet}} {{end}}";
    let inspected = std::process::Command::new("docker").args(["network", "inspect", "-f", format]).args(&ids).output();
    inspected
        .map(|out| String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_default()
}

/// What each test node offers to instances: 2 CPUs and 2 GiB, whatever the
/// machine has, so placements in tests do not depend on the machine.
pub fn node_resources() -> roost_raft::workload::Resources {
    roost_raft::workload::Resources { cpu_millis: 2000, memory_bytes: 2 << 30 }
}
