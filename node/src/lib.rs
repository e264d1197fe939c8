//! The `roost` binary's library: the node daemon and the CLI.
//!
//! Layout:
//! - [`daemon`]: a running node. [`daemon::Node::start`] binds the node's one
//!   port, resolves its identity from the data directory (creating a cluster
//!   or joining one the first time), starts Raft and serves the cluster and
//!   public gRPC services until its shutdown token fires. Nothing here reads
//!   the environment or installs signal handlers, so tests run many nodes in
//!   one process on port 0.
//! - [`cli`]: the client commands (`roost node list`, `roost apps create`, …)
//!   that talk to any node over the public API.
//!
//! `main.rs` only parses arguments, sets up tracing and the runtime, and
//! calls into these.

#![forbid(unsafe_code)]

pub mod cli;
pub mod daemon;

/// The version every node and the CLI report.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
