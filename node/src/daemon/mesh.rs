//! The node's part in the private mesh.
//!
//! [`run`] keeps this node's side of the mesh in step with the replicated
//! state, on every change and every [`RECHECK_EVERY`]:
//! - it tells the cluster where the node is (`Command::UpdateNode`) when the
//!   state's record differs: after a move to a new address, a new
//!   `--wg-port`, or WireGuard turned on or off;
//! - it makes the node's instance network (a Docker bridge on its /24, see
//!   `Engine::ensure_network`) and its data plane (`roost_network::mesh`:
//!   filter rules, WireGuard peers and routes);
//! - it serves `.internal` DNS at the node's mesh address, from a
//!   [`Directory`] rebuilt whenever the state changes;
//! - it hands the instance network to the agent, which starts no container
//!   before it exists.
//!
//! The work itself lives in `roost_network` (interfaces, routes, filters,
//! DNS) and `roost_deploy` (the Docker network); this loop only decides when.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use roost_deploy::agent::{InstanceNetwork, NetworkStatus};
use roost_deploy::engine::{BridgeNetwork, Engine, EngineError, LABEL_CLUSTER, LABEL_NODE};
use roost_network::directory::Directory;
use roost_network::dns::{DnsError, DnsServer, Handler};
use roost_network::mesh::{self, DataPlane, Key, MeshError, MeshPlan, Reach, WireguardConfig, MESH_MTU};
use roost_proto::cluster::{MeshStatusResponse, WireguardPeerStatus};
use roost_raft::state::WireguardPeer;
use roost_raft::{Command, Consensus, Response};
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the whole mesh is re-asserted even without a state change
/// (rules someone flushed, a network someone removed).
const RECHECK_EVERY: Duration = Duration::from_secs(30);
/// The shortest time between two attempts to tell the cluster where we are.
const DESCRIBE_EVERY: Duration = Duration::from_secs(2);

/// How this node takes part in the mesh.
#[derive(Clone, Debug)]
pub struct MeshSettings {
    /// The UDP port WireGuard listens on; `None` runs without WireGuard
    /// (for nodes that share one machine and one Docker engine).
    pub wireguard_port: Option<u16>,
    /// Where DNS answers on the node's mesh address (53 for instances).
    pub dns_port: u16,
    /// Where names outside `.internal` are forwarded.
    pub upstream_dns: Vec<SocketAddr>,
}

/// The data plane, shared with whoever reports on it (`Peer.MeshStatus`).
pub type SharedPlane = Arc<Mutex<Option<DataPlane>>>;

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("could not make the instance network")]
    Network(#[source] EngineError),
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error(transparent)]
    Dns(#[from] DnsError),
}

/// What the mesh loop needs.
pub struct MeshContext {
    pub consensus: Arc<Consensus>,
    pub engine: Engine,
    pub settings: MeshSettings,
    /// This node's advertised address.
    pub address: String,
    pub wireguard_key: Key,
    pub network: watch::Sender<NetworkStatus>,
    pub directory: watch::Sender<Arc<Directory>>,
    /// Which nodes' instances this node reaches: every node's without
    /// WireGuard, else those whose peers the last applied plan has.
    pub reach: watch::Sender<Reach>,
    pub plane: SharedPlane,
}

pub async fn run(context: MeshContext, stop: CancellationToken) {
    let me = context.consensus.id();
    let wanted = context
        .settings
        .wireguard_port
        .map(|port| super::wireguard_peer(&context.wireguard_key, &context.address, port));
    let mut changes = context.consensus.state().workload_changes();
    let mut applied: Option<MeshPlan> = None;
    let mut dns: Option<DnsServer> = None;
    let mut next_check = Instant::now();
    let mut last_described: Option<Instant> = None;
    let mut failures = 0u32;
    let mut device_ended: Option<watch::Receiver<bool>> = None;
    let mut pace = roost_raft::store::Pace::default();
    // The plan and cluster as of the workload revision last read: entries
    // that do not move it (tokens, an app without a release) change
    // neither, nor the directory, and cost no pass.
    let mut read_at: Option<u64> = None;
    let (mut plan, mut cluster): (Option<MeshPlan>, Option<String>) = (None, None);
    loop {
        let started = std::time::Instant::now();
        let read = context.consensus.state().read_if_moved(&mut read_at, |state| {
            let cluster = state.cluster.as_ref().map(|c| c.id.clone());
            (Directory::from_state(state), mesh::plan(state, me), cluster)
        });
        if let Some((directory, new_plan, new_cluster)) = read {
            pace.passed(started);
            context.directory.send_if_modified(|current| {
                let changed = **current != directory;
                if changed {
                    *current = Arc::new(directory);
                }
                changed
            });
            (plan, cluster) = (new_plan, new_cluster);
        }
        if last_described.is_none_or(|at| at.elapsed() >= DESCRIBE_EVERY)
            && describe(&context.consensus, &context.address, wanted.as_ref()).await
        {
            last_described = Some(Instant::now());
        }
        if let (Some(plan), Some(cluster)) = (&plan, &cluster) {
            if applied.as_ref() != Some(plan) || Instant::now() >= next_check {
                match converge(&context, cluster, plan, &mut dns).await {
                    Ok(()) => {
                        if device_ended.is_none() {
                            device_ended = context.plane.lock().await.as_ref().and_then(DataPlane::wireguard_ended);
                        }
                        if wanted.is_some() {
                            context.reach.send_if_modified(|reach| {
                                let now = Reach::of_plan(plan, me);
                                let changed = *reach != now;
                                *reach = now;
                                changed
                            });
                        }
                        if applied.as_ref() != Some(plan) {
                            tracing::info!(subnet = %plan.subnet, address = %plan.address(), peers = plan.peers.len(), "mesh is up");
                            applied = Some(plan.clone());
                        }
                        failures = 0;
                        next_check = Instant::now() + RECHECK_EVERY;
                    }
                    Err(error) => {
                        failures += 1;
                        let retry = Duration::from_millis(500 * (1 << failures.min(6)));
                        let error = format!("{:#}", anyhow::Error::new(error));
                        // Instances waiting for the network say why it is not there;
                        // one that is up stays up through a later step's failure.
                        context.network.send_if_modified(|current| match current {
                            NetworkStatus::Up(_) => false,
                            NetworkStatus::Failing(why) if *why == error => false,
                            _ => {
                                *current = NetworkStatus::Failing(error.clone());
                                true
                            }
                        });
                        tracing::warn!(%error, ?retry, "the mesh is not ready; retrying");
                        applied = None;
                        next_check = Instant::now() + retry;
                    }
                }
            }
        }
        let ended = async {
            match device_ended.as_mut() {
                Some(ended) => {
                    let _ = ended.wait_for(|ended| *ended).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => break,
            changed = pace.settled(&mut changes) => if changed.is_err() { break },
            () = tokio::time::sleep_until(next_check) => {}
            () = ended => {
                // boringtun stops its device on SIGINT or SIGTERM, which it
                // may take before the process's own handler sees them.
                tracing::warn!("the WireGuard device stopped (it takes SIGINT and SIGTERM sent to the node); stopping the node");
                stop.cancel();
                break;
            }
        }
    }
    if let Some(dns) = dns {
        dns.stop().await;
    }
    if let Some(plane) = context.plane.lock().await.take() {
        plane.stop().await;
    }
}

/// Proposes `UpdateNode` when the state's record of this node differs from
/// what it is; returns whether it proposed.
async fn describe(consensus: &Consensus, address: &str, wireguard: Option<&WireguardPeer>) -> bool {
    let id = consensus.id();
    let differs = consensus.state().read(|state| {
        state.nodes.get(&id).is_some_and(|node| node.address != address || node.wireguard.as_ref() != wireguard)
    });
    if !differs {
        return false;
    }
    let command = Command::UpdateNode { id, address: address.to_owned(), wireguard: wireguard.cloned() };
    match consensus.propose(command, Instant::now() + Duration::from_secs(5)).await {
        Ok(Response::Rejected(rejection)) => tracing::warn!(%rejection, "the cluster refused this node's new address"),
        Ok(_) => tracing::info!(%address, wireguard = wireguard.is_some(), "told the cluster where this node is"),
        Err(error) => tracing::debug!(%error, "could not tell the cluster where this node is yet; retrying"),
    }
    true
}

/// One pass: the Docker network, the data plane, DNS, then the agent.
async fn converge(
    context: &MeshContext,
    cluster: &str,
    plan: &MeshPlan,
    dns: &mut Option<DnsServer>,
) -> Result<(), StepError> {
    let me = context.consensus.id();
    let names = mesh::names(cluster, me);
    let bridge = BridgeNetwork {
        name: names.network.clone(),
        bridge: names.bridge.clone(),
        subnet: plan.subnet.to_string(),
        gateway: plan.address().to_string(),
        mtu: MESH_MTU,
        labels: HashMap::from([
            (LABEL_CLUSTER.to_owned(), cluster.to_owned()),
            (LABEL_NODE.to_owned(), me.to_string()),
        ]),
    };
    context.engine.ensure_network(&bridge).await.map_err(StepError::Network)?;

    let mut plane = context.plane.lock().await;
    if plane.is_none() {
        let wireguard = context
            .settings
            .wireguard_port
            .map(|port| WireguardConfig { private_key: context.wireguard_key.clone(), port });
        *plane = Some(DataPlane::start(names.clone(), wireguard.as_ref()).await?);
    }
    if let Some(plane) = plane.as_mut() {
        plane.apply(plan).await?;
    }
    drop(plane);

    let address = SocketAddr::from((plan.address(), context.settings.dns_port));
    if dns.as_ref().is_some_and(|server| server.address() != address) {
        if let Some(old) = dns.take() {
            old.stop().await;
        }
    }
    if dns.is_none() {
        let handler = Handler::new(context.directory.subscribe(), &context.settings.upstream_dns);
        let server = DnsServer::serve(address, handler).await?;
        tracing::info!(%address, "serving .internal DNS");
        *dns = Some(server);
    }

    let network = InstanceNetwork { network: names.network, subnet: plan.subnet, dns: plan.address() };
    context.network.send_if_modified(|current| {
        let changed = current.up() != Some(&network);
        if changed {
            *current = NetworkStatus::Up(network);
        }
        changed
    });
    Ok(())
}

/// This node's side of the mesh, for `Peer.MeshStatus` and `roost node show`.
pub async fn status(plane: &SharedPlane) -> Result<MeshStatusResponse, tonic::Status> {
    let plane = plane.lock().await;
    let Some(plane) = plane.as_ref() else {
        return Err(tonic::Status::unavailable("this node's mesh is not up yet"));
    };
    let peers =
        plane.peers().await.map_err(|error| tonic::Status::internal(format!("{:#}", anyhow::Error::new(error))))?;
    Ok(MeshStatusResponse {
        wireguard: plane.has_wireguard(),
        interface: if plane.has_wireguard() { plane.names().wireguard.clone() } else { String::new() },
        peers: peers
            .into_iter()
            .map(|peer| WireguardPeerStatus {
                public_key: peer.public_key,
                endpoint: peer.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                allowed_ips: peer.allowed_ips,
                handshake_ms_ago: peer.handshake_ago.map(|ago| ago.as_millis().min(u64::MAX as u128) as u64),
                rx_bytes: peer.rx_bytes,
                tx_bytes: peer.tx_bytes,
            })
            .collect(),
    })
}
