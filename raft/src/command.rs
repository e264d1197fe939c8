//! What the log carries: [`Proposal`]s in, [`Response`]s out.
//!
//! Every entry is a `Proposal` with a `version`, so that a later binary can
//! still read an older log: new commands are new variants, and a change of
//! meaning bumps [`PROPOSAL_VERSION`] and keeps the old reading. The golden
//! test in `state/tests.rs` pins the version-1 encoding.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::state::{App, ClusterInfo, UnixMillis};
use crate::NodeId;

pub const PROPOSAL_VERSION: u16 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub version: u16,
    /// The proposer's clock, so that apply never reads one.
    pub proposed_at: UnixMillis,
    pub command: Command,
}

impl Proposal {
    pub fn new(command: Command, proposed_at: UnixMillis) -> Self {
        Self { version: PROPOSAL_VERSION, proposed_at, command }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Creates the cluster and its first node.
    Bootstrap {
        cluster: ClusterInfo,
        node: NewNode,
    },
    /// Admits a node that presented the join secret.
    AddNode {
        node: NewNode,
    },
    /// Removes a node and, when given, replaces the join secret, so the
    /// removed node (which holds the old one) cannot simply join again.
    RemoveNode {
        id: NodeId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        new_join_secret: Option<Secret>,
    },
    CreateApp {
        name: String,
    },
    DestroyApp {
        name: String,
    },
    /// Proposals that arrived together, committed as one entry and applied
    /// in order. The leader batches concurrent writes this way because
    /// openraft 0.9 syncs each entry before it takes the next (see
    /// `consensus::run_batcher`).
    Batch {
        proposals: Vec<Proposal>,
    },
}

/// A credential carried by a command: serialized as a plain string, never
/// shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A node as it asks to join, before the state gives it an id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewNode {
    pub name: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub cert_serial: String,
    pub cert_fingerprint: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Blank and membership entries, and commands with nothing to report.
    #[default]
    Done,
    NodeAdded {
        id: NodeId,
    },
    AppCreated {
        app: App,
    },
    /// One response per proposal of a `Command::Batch`, in order.
    Batch {
        responses: Vec<Response>,
    },
    Rejected(Rejection),
}

/// Why the state machine refused a command. The text is what a user reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rejection {
    #[error("the cluster has not been initialized")]
    NotBootstrapped,
    #[error("the cluster has already been initialized")]
    AlreadyBootstrapped,
    #[error("a node named '{name}' is already in the cluster: pick another --name, or remove the old one with `roost node remove {name}`")]
    NodeNameTaken { name: String },
    #[error("invalid node name '{name}': {reason}")]
    InvalidNodeName { name: String, reason: String },
    #[error("node '{node}' not found (see `roost node list`)")]
    NodeNotFound { node: String },
    #[error("'{name}' is the cluster's only node and cannot be removed")]
    LastNode { name: String },
    #[error("this node's certificate was revoked when it was removed; wipe its data directory and join again")]
    RevokedCertificate,
    #[error("app '{name}' already exists")]
    AppExists { name: String },
    #[error("app '{name}' not found (see `roost apps list`)")]
    AppNotFound { name: String },
    #[error("invalid app name '{name}': {reason}")]
    InvalidAppName { name: String, reason: String },
    #[error("this log entry has format version {version}, newer than this binary understands; upgrade roost")]
    UnsupportedVersion { version: u16 },
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Bootstrap { cluster, .. } => write!(f, "bootstrap cluster {}", cluster.id),
            Command::AddNode { node } => write!(f, "add node {}", node.name),
            Command::RemoveNode { id, .. } => write!(f, "remove node {id}"),
            Command::CreateApp { name } => write!(f, "create app {name}"),
            Command::DestroyApp { name } => write!(f, "destroy app {name}"),
            Command::Batch { proposals } => write!(f, "batch of {}", proposals.len()),
        }
    }
}
