//! Roost's consensus layer: openraft on RocksDB, and the replicated state.
//!
//! Layout:
//! - [`state`] and [`command`]: the replicated state and the commands that
//!   change it. Pure: `State::apply` does no I/O and reads no clock.
//! - [`workload`]: releases, instances and secrets as data (the deploy crate
//!   decides them; this crate records them).
//! - [`store`]: openraft's log and state-machine storage on RocksDB.
//! - [`network`]: openraft's outgoing RPCs, over tonic channels that the
//!   caller supplies (this crate does not know how they are secured).
//! - [`service`]: the incoming side of those RPCs, plus `Propose` and
//!   `ReadIndex`, which let any node serve writes and linearizable reads.
//! - [`consensus`]: [`Consensus`], the handle the rest of the node uses:
//!   start Raft, propose (forwarding to the leader), read linearizably, and
//!   the election driver that gives every campaign a fresh random timeout.
//!
//! This crate knows nothing about Docker, certificates or the CLI.

#![forbid(unsafe_code)]

pub mod command;
pub mod consensus;
pub mod network;
pub mod service;
pub mod state;
pub mod store;
pub mod stream;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod workload;

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use command::{Command, Grant, NewNode, Proposal, Rejection, Response};
pub use consensus::{Consensus, ConsensusError, Timings};
pub use state::State;
pub use store::StateReader;

pub type NodeId = u64;

/// What openraft's membership records about each node: enough to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftNode {
    pub name: String,
    /// HOST:PORT serving Raft and the API.
    pub address: String,
}

impl fmt::Display for RaftNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.address)
    }
}

openraft::declare_raft_types!(
    /// Roost's openraft type configuration.
    pub TypeConfig:
        D = Proposal,
        R = Response,
        NodeId = NodeId,
        Node = RaftNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
