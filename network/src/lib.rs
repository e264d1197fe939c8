//! Roost's network layer: everything that touches sockets and interfaces for
//! node-to-node traffic and the data plane (mesh, DNS, the edge proxy).
//!
//! Layout:
//! - [`pki`]: the cluster certificate authority and the certificates it issues
//!   to nodes. Pure functions over keys and certificates; no files, no sockets.
//! - [`token`]: the join and admin tokens (`ROOST-1-…`, `ROOST-ADMIN-1-…`) that
//!   pin the cluster CA by digest and carry a secret.
//! - [`tls`]: the TLS plumbing of the one port every node serves: an acceptor
//!   that turns TCP connections into mutually authenticated TLS streams for
//!   tonic, and a connector that dials peers while pinning the cluster CA.
//! - [`mesh`]: the private mesh: the node's WireGuard interface (boringtun),
//!   its routes and its packet filter rules, reconciled towards a plan
//!   derived from the replicated state.
//! - [`directory`]: which healthy instances answer for which app, derived
//!   from the state; [`dns`] serves it as `.internal` names.
//! - [`acme`]: ordering certificates for custom domains (HTTP-01).
//! - [`edge`]: the proxy on every node: HTTP, HTTPS (certificates by SNI)
//!   and TCP from outside to a healthy instance anywhere.
//!
//! Only this crate decides how bytes are secured on the wire and touches
//! interfaces, routes and packet filters; callers hand it certificates and
//! plans and receive channels, streams and servers.

#![forbid(unsafe_code)]

pub mod acme;
pub mod directory;
pub mod dns;
pub mod edge;
pub mod mesh;
pub mod pki;
pub mod tls;
pub mod token;

pub use pki::{CaDigest, ClusterCa, NodeCredentials};
pub use token::{Token, TokenKind};
