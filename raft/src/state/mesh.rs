//! The mesh's share of the state: which /24 of the cluster's private range
//! each node holds, and how its peers reach it over WireGuard.
//!
//! A node gets the lowest /24 that no current node holds when it is added,
//! so two nodes never share one; a removed node's /24 becomes free again.
//! Only a node's public WireGuard key is ever recorded: its private key stays
//! in its data directory.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::State;
use crate::command::{Rejection, Response};
use crate::NodeId;

/// Every node's share of the mesh range: 253 instance addresses and its own.
pub const NODE_SUBNET_PREFIX: u8 = 24;

/// How peers reach a node over WireGuard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireguardPeer {
    /// The node's public key, base64 as `wg` prints it.
    pub public_key: String,
    /// HOST:PORT of its WireGuard socket: the advertised host, `--wg-port`.
    pub endpoint: String,
}

/// `10.210.0.0/16`: room for 256 nodes, and rarely used by anything else.
pub fn default_mesh_range() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 210, 0, 0), 16).unwrap_or_default()
}

/// Checks a mesh range: private, aligned, and at least one /24.
pub fn validate_mesh_range(range: Ipv4Net) -> Result<(), String> {
    let shared = Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10).unwrap_or_default();
    if range.network() != range.addr() {
        return Err(format!("it is not aligned to its prefix; did you mean {}?", range.trunc()));
    }
    if range.prefix_len() > NODE_SUBNET_PREFIX || range.prefix_len() < 8 {
        return Err(format!("its prefix must be from /8 to /{NODE_SUBNET_PREFIX} (each node takes a /24)"));
    }
    if !(range.addr().is_private() || shared.contains(&range)) {
        return Err("it must be a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 or 100.64.0.0/10)".into());
    }
    Ok(())
}

impl State {
    /// The lowest /24 of the mesh range that no current node holds.
    pub(super) fn free_subnet(&self) -> Option<Ipv4Net> {
        let range = self.cluster.as_ref()?.mesh_range;
        let held: BTreeSet<Ipv4Net> = self.nodes.values().filter_map(|n| n.subnet).collect();
        range.subnets(NODE_SUBNET_PREFIX).ok()?.find(|subnet| !held.contains(subnet))
    }

    /// A node describes itself after a start: where it now listens, and its
    /// WireGuard endpoint. A node of a cluster made before the mesh gets its
    /// /24 here.
    pub(super) fn update_node(&mut self, id: NodeId, address: &str, wireguard: Option<&WireguardPeer>) -> Response {
        if address.is_empty() {
            return Response::Rejected(Rejection::InvalidAddress { address: address.to_owned() });
        }
        if !self.nodes.contains_key(&id) {
            return Response::Rejected(Rejection::NodeNotFound { node: id.to_string() });
        }
        let needs_subnet = self.nodes.get(&id).is_some_and(|n| n.subnet.is_none());
        let subnet = if needs_subnet {
            match self.free_subnet() {
                Some(subnet) => Some(subnet),
                None => {
                    let range = self.cluster.as_ref().map(|c| c.mesh_range.to_string()).unwrap_or_default();
                    return Response::Rejected(Rejection::MeshFull { range });
                }
            }
        } else {
            None
        };
        if let Some(node) = self.nodes.get_mut(&id) {
            node.address = address.to_owned();
            node.wireguard = wireguard.cloned();
            if subnet.is_some() {
                node.subnet = subnet;
            }
        }
        Response::Done
    }
}
