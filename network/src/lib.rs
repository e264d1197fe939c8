//! Roost's network layer: everything that touches sockets and interfaces for
//! node-to-node traffic and, later, the data plane (mesh, DNS, proxy).
//!
//! Layout:
//! - [`pki`]: the cluster certificate authority and the certificates it issues
//!   to nodes. Pure functions over keys and certificates; no files, no sockets.
//! - [`token`]: the join and admin tokens (`ROOST-1-…`, `ROOST-ADMIN-1-…`) that
//!   pin the cluster CA by digest and carry a secret.
//! - [`tls`]: the TLS plumbing of the one port every node serves: an acceptor
//!   that turns TCP connections into mutually authenticated TLS streams for
//!   tonic, and a connector that dials peers while pinning the cluster CA.
//!
//! Only this crate decides how bytes are secured on the wire; callers hand it
//! certificates and receive tonic channels and incoming streams.

#![forbid(unsafe_code)]

pub mod pki;
pub mod tls;
pub mod token;

pub use pki::{CaDigest, ClusterCa, NodeCredentials};
pub use token::{Token, TokenKind};
