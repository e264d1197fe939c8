//! The private mesh: every instance gets an address of the cluster's mesh
//! range and reaches every other, on any node, without translation.
//!
//! Each node holds a /24 of the range (recorded in the replicated state). Its
//! instances sit on a Docker bridge network of that /24 whose gateway, the
//! first address, is the node's own mesh address (where its DNS answers).
//! Between nodes, a WireGuard interface (boringtun, in this process) carries
//! each peer's /24; routes send the peers' /24s into it. Nodes that share one
//! machine and one Docker engine can skip WireGuard: their bridges are then
//! routed to each other by the machine itself, and everything else is the
//! same.
//!
//! Layout:
//! - [`plan`]: the pure part: what this node's mesh should be, from the state.
//! - [`wireguard`]: the boringtun device and its peers.
//! - [`routes`]: links and routes, over netlink.
//! - [`filter`]: the packet filter rules (iptables).
//! - [`DataPlane`]: the three together, reconciled towards a [`MeshPlan`].

pub mod filter;
pub mod routes;
pub mod wireguard;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ipnet::Ipv4Net;
use roost_raft::state::WireguardPeer;
use roost_raft::{NodeId, State};

pub use wireguard::{PeerStatus, Tunnel};
pub use wireguard_control::Key;

/// The MTU inside the mesh: 1500 less WireGuard's overhead over IPv6 (80).
pub const MESH_MTU: u32 = 1420;
/// The UDP port WireGuard listens on unless `--wg-port` says otherwise.
pub const DEFAULT_WG_PORT: u16 = 51820;

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("'{name}' is not a valid interface name")]
    InterfaceName { name: String },
    #[error("network interface {name} already exists: another process on this machine (another Roost node?) owns it")]
    InterfaceTaken { name: String },
    #[error("UDP port {port} is in use: give each node on one machine its own --wg-port, or run nodes that share a machine with --no-wireguard")]
    PortTaken { port: u16 },
    #[error(
        "could not create WireGuard interface {name}: {message} (it needs root or CAP_NET_ADMIN, and /dev/net/tun)"
    )]
    Device { name: String, message: String },
    #[error("WireGuard: could not {action}")]
    Wireguard {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the WireGuard device did not answer within {waited:?} when asked to {action}")]
    Wedged { action: &'static str, waited: Duration },
    #[error("'{key}' is not a WireGuard public key")]
    Key { key: String },
    #[error("could not {action}")]
    Io {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("could not {action}")]
    Netlink {
        action: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("there is no network interface {name}")]
    NoLink { name: String },
    #[error("`iptables {args}` failed: {stderr}")]
    Iptables { args: String, stderr: String },
}

/// What this node's mesh should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshPlan {
    pub range: Ipv4Net,
    /// This node's /24.
    pub subnet: Ipv4Net,
    /// Every other node that has a /24 and a WireGuard endpoint.
    pub peers: Vec<PlannedPeer>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedPeer {
    pub node: NodeId,
    pub name: String,
    pub subnet: Ipv4Net,
    pub wireguard: WireguardPeer,
}

impl MeshPlan {
    /// The node's own mesh address: the first of its /24, its bridge's gateway.
    pub fn address(&self) -> Ipv4Addr {
        gateway(self.subnet)
    }
}

/// Which nodes' instances this node can reach now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Every node's: this node runs without WireGuard, and shares a machine
    /// (and its routes) with the others.
    All,
    /// Only these nodes': this one and the peers whose WireGuard peer and
    /// route the data plane has in place ([`Reach::of_plan`]). A node that
    /// has just joined is reachable only once this node has set it up.
    Only(BTreeSet<NodeId>),
}

impl Reach {
    /// What a data plane that applied `plan` reaches.
    pub fn of_plan(plan: &MeshPlan, me: NodeId) -> Reach {
        Reach::Only(plan.peers.iter().map(|peer| peer.node).chain([me]).collect())
    }

    pub fn allows(&self, node: NodeId) -> bool {
        match self {
            Reach::All => true,
            Reach::Only(nodes) => nodes.contains(&node),
        }
    }
}

/// The first usable address of a /24.
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// This node's mesh, from the state; `None` until the state gives it a /24.
pub fn plan(state: &State, me: NodeId) -> Option<MeshPlan> {
    let range = state.cluster.as_ref()?.mesh_range;
    let subnet = state.nodes.get(&me)?.subnet?;
    let peers = state
        .nodes
        .values()
        .filter(|node| node.id != me)
        .filter_map(|node| {
            Some(PlannedPeer {
                node: node.id,
                name: node.name.clone(),
                subnet: node.subnet?,
                wireguard: node.wireguard.clone()?,
            })
        })
        .collect();
    Some(MeshPlan { range, subnet, peers })
}

/// The names a node's mesh uses on its machine. Unique per cluster and node,
/// so several nodes (or test clusters) can share one machine and engine;
/// interface names stay within Linux's 15 characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshNames {
    /// The Docker network its instances join.
    pub network: String,
    /// The bridge interface of that network.
    pub bridge: String,
    /// The WireGuard interface.
    pub wireguard: String,
    /// The comment its packet filter rules carry (before their digest).
    pub tag: String,
}

/// The first six alphanumerics of a cluster id.
fn short(cluster: &str) -> String {
    cluster.chars().filter(char::is_ascii_alphanumeric).take(6).collect()
}

pub fn names(cluster: &str, node: NodeId) -> MeshNames {
    let short = short(cluster);
    MeshNames {
        network: format!("roost-{short}-n{node}"),
        bridge: format!("rb-{short}-{node}"),
        wireguard: format!("rw-{short}-{node}"),
        tag: format!("roost:{short}:{node}"),
    }
}

/// The tag prefix of every filter rule of a cluster's nodes.
pub fn cluster_tag(cluster: &str) -> String {
    format!("roost:{}", short(cluster))
}

/// What WireGuard needs of this node.
#[derive(Clone)]
pub struct WireguardConfig {
    pub private_key: Key,
    pub port: u16,
}

impl std::fmt::Debug for WireguardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireguardConfig").field("port", &self.port).finish_non_exhaustive()
    }
}

/// The node's side of the mesh on this machine: filter rules, and (unless
/// it runs without) its WireGuard interface, peers and routes.
#[derive(Debug)]
pub struct DataPlane {
    names: MeshNames,
    tunnel: Option<Tunnel>,
    routes: Option<routes::Routes>,
}

impl DataPlane {
    /// Creates the WireGuard interface when `wireguard` is given.
    pub async fn start(names: MeshNames, wireguard: Option<&WireguardConfig>) -> Result<DataPlane, MeshError> {
        let (tunnel, routes) = match wireguard {
            Some(config) => {
                // boringtun binds with SO_REUSEADDR and would share a port
                // silently; a plain bind finds a clash first.
                match std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], config.port))) {
                    Ok(probe) => drop(probe),
                    Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
                        return Err(MeshError::PortTaken { port: config.port });
                    }
                    Err(source) => return Err(MeshError::Io { action: "bind the WireGuard port", source }),
                }
                let tunnel = Tunnel::start(&names.wireguard, &config.private_key, config.port).await?;
                (Some(tunnel), Some(routes::Routes::connect()?))
            }
            None => (None, None),
        };
        Ok(DataPlane { names, tunnel, routes })
    }

    pub fn names(&self) -> &MeshNames {
        &self.names
    }

    pub fn has_wireguard(&self) -> bool {
        self.tunnel.is_some()
    }

    /// Turns true if the WireGuard device stops; `None` without WireGuard.
    pub fn wireguard_ended(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.tunnel.as_ref().map(Tunnel::ended)
    }

    /// Brings filter rules, peers and routes to what `plan` says.
    pub async fn apply(&mut self, plan: &MeshPlan) -> Result<(), MeshError> {
        let rules = filter::rules(&self.names.tag, &self.names.bridge, plan.subnet, plan.range);
        filter::sync(&self.names.tag, &rules).await?;
        let (Some(tunnel), Some(routes)) = (self.tunnel.as_mut(), self.routes.as_ref()) else {
            return Ok(());
        };
        let index = routes.link_index(tunnel.name()).await?;
        routes.set_up(index, MESH_MTU).await?;
        let mut desired = Vec::new();
        for peer in &plan.peers {
            match resolve(&peer.wireguard.endpoint).await {
                Some(endpoint) => desired.push(wireguard::DesiredPeer {
                    public_key: peer.wireguard.public_key.clone(),
                    endpoint,
                    allowed: peer.subnet,
                }),
                None => {
                    tracing::warn!(peer = %peer.name, endpoint = %peer.wireguard.endpoint, "cannot resolve a peer's WireGuard endpoint; retrying");
                }
            }
        }
        tunnel.sync_peers(&desired).await?;
        let subnets: Vec<Ipv4Net> = desired.iter().map(|p| p.allowed).collect();
        routes.sync(index, plan.address(), &subnets).await
    }

    /// The WireGuard peers and their sessions; empty without WireGuard.
    pub async fn peers(&self) -> Result<Vec<PeerStatus>, MeshError> {
        match &self.tunnel {
            Some(tunnel) => tunnel.status().await,
            None => Ok(Vec::new()),
        }
    }

    /// Stops WireGuard. Filter rules stay: instances keep running while a
    /// node restarts, and keep reaching the world.
    pub async fn stop(self) {
        if let Some(tunnel) = self.tunnel {
            tunnel.stop().await;
        }
    }
}

/// HOST:PORT to a socket address, preferring IPv4.
async fn resolve(endpoint: &str) -> Option<SocketAddr> {
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host(endpoint).await.ok()?.collect();
    addresses.iter().find(|a| a.is_ipv4()).or(addresses.first()).copied()
}

/// The WireGuard endpoint of a node advertised at `address` (HOST:PORT).
pub fn endpoint_for(address: &str, port: u16) -> String {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    format!("{host}:{port}")
}

#[cfg(test)]
mod tests;
