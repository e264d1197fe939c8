//! What the log carries: [`Proposal`]s in, [`Response`]s out.
//!
//! Every entry is a `Proposal` with a `version`, so that a later binary can
//! still read an older log: new commands are new variants, and a change of
//! meaning bumps [`PROPOSAL_VERSION`] and keeps the old reading. The golden
//! test in `state/tests.rs` pins the version-1 encoding.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::state::{
    Access, AcmeChallenge, ApiToken, App, ClusterInfo, IssuedCertificate, NodeRole, RotatedJoinSecrets, UnixMillis,
    WireguardPeer,
};
use crate::workload::{InstanceReport, Outcome, Placement, ReleaseSpec, Resources, SealedSecret};
use crate::NodeId;

pub const PROPOSAL_VERSION: u16 = 1;

/// What lets a node propose a command on someone's behalf. It travels with a
/// forwarded proposal (`Raft.Propose`), never into the log: the leader
/// checks it, then writes the proposal alone.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Grant {
    /// The API token a caller presented (checked by the node that took the
    /// call, and again by the leader against the command's [`Access`]).
    #[serde(alias = "admin")]
    Token { token: String },
    /// A signed API call: the token's public key, the caller's timestamp
    /// and its signature over them, the TLS session it was made on
    /// (`session`, the exporter value the node that took the call saw), that
    /// node's certificate (`server`, its fingerprint), the gRPC method
    /// called (`method`) and what it changes (`target`, `KIND:NAME`, empty
    /// when the client named nothing), all hex but the time, method and
    /// target. The leader checks the signature, that `server` is the node
    /// that forwards the grant, that the method proposes this command, that
    /// the command changes `target` and nothing else, that the key is a
    /// current token's, and that the time is recent.
    Signed {
        public_key: String,
        timestamp_ms: i64,
        session: String,
        server: String,
        method: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        target: String,
        signature: String,
    },
    /// The join secret a joining node presented to its seed.
    Join { secret: String },
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Credentials stay out of logs.
        f.write_str(match self {
            Grant::Token { .. } => "Grant::Token",
            Grant::Signed { .. } => "Grant::Signed",
            Grant::Join { .. } => "Grant::Join",
        })
    }
}

/// A proposal as one node forwards it to the leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Forward {
    pub proposal: Proposal,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<Grant>,
}

impl Command {
    /// Whether a node may propose this on its own authority (`caller` is the
    /// node its certificate names): reports about itself and its instances,
    /// and which tokens it accepted. Anything a user asks for needs their
    /// grant; a new node needs the join secret. The leader's own decisions
    /// ([`Command::is_leader_decision`]) are never forwarded: the leader
    /// writes them itself ([`crate::Consensus::propose_as_leader`]), so a
    /// member cannot place instances on itself or install a certificate.
    pub fn is_node_command(&self, caller: NodeId) -> bool {
        match self {
            Command::UpdateNode { id, .. } => *id == caller,
            Command::ReportInstances { node, .. } => *node == caller,
            Command::RenewNodeCertificate { node, .. } => *node == caller,
            Command::TokensUsed { .. } => true,
            _ => false,
        }
    }

    /// Whether applying this may change what the node's reconcilers build
    /// from the state (routes, `.internal` names, the mesh, containers, the
    /// controller's decisions). What only records an app with no release
    /// yet, or tokens, does not: the reconcilers see nothing of either, so
    /// they skip a pass that such entries alone wake
    /// ([`crate::store::StateReader::workload_revision`]). Anything else
    /// does, including commands added later unless listed here.
    pub fn touches_workloads(&self) -> bool {
        match self {
            Command::CreateApp { .. }
            | Command::TokensUsed { .. }
            | Command::CreateToken { .. }
            | Command::RevokeToken { .. }
            | Command::RotateToken { .. }
            | Command::KeyAdminToken { .. }
            | Command::StartCaRotation { .. }
            | Command::RenewNodeCertificate { .. } => false,
            Command::Batch { proposals } => proposals.iter().any(|p| p.command.touches_workloads()),
            _ => true,
        }
    }

    /// Whether this is a decision of the leader's own loops (controller,
    /// ACME), which only the leader proposes, and only while it leads.
    pub fn is_leader_decision(&self) -> bool {
        match self {
            Command::Place { .. }
            | Command::Reschedule { .. }
            | Command::FinishRelease { .. }
            | Command::RetireInstances { .. }
            | Command::RestartInstances { .. }
            | Command::SetAcmeChallenge { .. }
            | Command::CertificateIssued { .. }
            | Command::CertificateFailed { .. }
            | Command::SetAcmeAccount { .. }
            | Command::RotateJoinSecrets { .. }
            | Command::FinishCaRotation { .. } => true,
            Command::Bootstrap { .. }
            | Command::StartCaRotation { .. }
            | Command::RenewNodeCertificate { .. }
            | Command::KeyAdminToken { .. }
            | Command::AddNode { .. }
            | Command::RemoveNode { .. }
            | Command::LabelNode { .. }
            | Command::UpdateNode { .. }
            | Command::ReportInstances { .. }
            | Command::TokensUsed { .. }
            | Command::CreateApp { .. }
            | Command::AddCertificate { .. }
            | Command::RemoveCertificate { .. }
            | Command::DestroyApp { .. }
            | Command::Deploy { .. }
            | Command::Scale { .. }
            | Command::ScaleVm { .. }
            | Command::Rollback { .. }
            | Command::SetSecrets { .. }
            | Command::Restart { .. }
            | Command::SuspendApp { .. }
            | Command::ResumeApp { .. }
            | Command::CreateToken { .. }
            | Command::RevokeToken { .. }
            | Command::RotateToken { .. }
            | Command::Batch { .. } => false,
        }
    }

    /// What a user's token must allow for this command to be proposed on
    /// their behalf. Node commands ([`Command::is_node_command`]) need an
    /// admin, should one ever ask; the leader's decisions and the bootstrap
    /// are refused whatever the grant.
    /// The app this command creates, changes or removes, if it is about one.
    pub fn app(&self) -> Option<&str> {
        match (self, self.access()) {
            (_, Access::WriteApp(app)) => Some(app),
            (Command::CreateApp { name } | Command::DestroyApp { name }, _) => Some(name),
            (Command::AddCertificate { app, .. }, _) => Some(app),
            _ => None,
        }
    }

    pub fn access(&self) -> Access<'_> {
        match self {
            Command::Deploy { app, .. }
            | Command::Scale { app, .. }
            | Command::ScaleVm { app, .. }
            | Command::Rollback { app, .. }
            | Command::SetSecrets { app, .. }
            | Command::Restart { app } => Access::WriteApp(app),
            Command::SuspendApp { name } | Command::ResumeApp { name } => Access::WriteApp(name),
            Command::Bootstrap { .. }
            | Command::AddNode { .. }
            | Command::RemoveNode { .. }
            | Command::LabelNode { .. }
            | Command::UpdateNode { .. }
            | Command::CreateApp { .. }
            | Command::DestroyApp { .. }
            | Command::AddCertificate { .. }
            | Command::RemoveCertificate { .. }
            | Command::SetAcmeChallenge { .. }
            | Command::CertificateIssued { .. }
            | Command::CertificateFailed { .. }
            | Command::SetAcmeAccount { .. }
            | Command::FinishRelease { .. }
            | Command::RetireInstances { .. }
            | Command::RestartInstances { .. }
            | Command::Place { .. }
            | Command::Reschedule { .. }
            | Command::ReportInstances { .. }
            | Command::CreateToken { .. }
            | Command::RevokeToken { .. }
            | Command::RotateToken { .. }
            | Command::TokensUsed { .. }
            | Command::RotateJoinSecrets { .. }
            | Command::KeyAdminToken { .. }
            | Command::StartCaRotation { .. }
            | Command::RenewNodeCertificate { .. }
            | Command::FinishCaRotation { .. }
            | Command::Batch { .. } => Access::Admin,
        }
    }
}

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
        cluster: Box<ClusterInfo>,
        node: NewNode,
    },
    /// Admits a node that presented the join secret.
    AddNode {
        node: NewNode,
    },
    /// Removes a node. Its join secrets are replaced by a later
    /// [`Command::RotateJoinSecrets`], once the node is out of Raft's
    /// membership and so never receives the new ones; entries of older
    /// versions carry the new secrets here (`rotate`), and are still applied.
    RemoveNode {
        id: NodeId,
        /// Plain new secrets, as entries made before join secrets were
        /// sealed carry them; never written now.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        new_join_secret: Option<Secret>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        new_worker_secret: Option<Secret>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rotate: Option<RotatedJoinSecrets>,
    },
    /// New join secrets for both roles, sealed, once every removed node is
    /// out of Raft's membership (`ClusterInfo::join_rotation_due`): the
    /// leader's decision, so a removed voter, which holds the secrets key,
    /// never receives them.
    RotateJoinSecrets {
        rotate: RotatedJoinSecrets,
    },
    /// Sets labels of a node (added, or replacing a value) and removes
    /// others: an admin's change (`roost node label`), the only way a
    /// worker's labels are set.
    LabelNode {
        id: NodeId,
        #[serde(default)]
        set: BTreeMap<String, String>,
        #[serde(default)]
        remove: Vec<String>,
    },
    /// Records the public key of the initial admin token of a cluster made
    /// before calls were signed, if the token is still the one whose digest
    /// is given and has no key yet; a rotation since wins.
    KeyAdminToken {
        secret_sha256: String,
        public_key: String,
    },
    /// A node describes itself after it starts: its address (which changes
    /// when its machine moves) and its WireGuard endpoint.
    UpdateNode {
        id: NodeId,
        address: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wireguard: Option<WireguardPeer>,
    },
    CreateApp {
        name: String,
    },
    /// Attaches a custom domain to an app; its certificate is ordered.
    AddCertificate {
        domain: String,
        app: String,
    },
    RemoveCertificate {
        domain: String,
    },
    /// The HTTP-01 challenge of an order in progress, for every node to
    /// answer; `None` clears it.
    SetAcmeChallenge {
        domain: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        challenge: Option<AcmeChallenge>,
    },
    CertificateIssued {
        domain: String,
        issued: IssuedCertificate,
    },
    CertificateFailed {
        domain: String,
        error: String,
        /// When to order again.
        retry_at: UnixMillis,
    },
    /// The cluster's ACME account credentials, sealed.
    SetAcmeAccount {
        credentials: SealedSecret,
    },
    DestroyApp {
        name: String,
    },
    /// Makes a new release (creating the app if needed) and its instances.
    Deploy {
        app: String,
        spec: ReleaseSpec,
        description: String,
    },
    /// Ends a deploy: the leader's controller decided it succeeded or failed.
    FinishRelease {
        app: String,
        version: u64,
        outcome: Outcome,
    },
    /// Removes old instances that new ones of a rolling deploy replaced.
    RetireInstances {
        app: String,
        instances: Vec<String>,
    },
    /// The scheduler's decisions.
    Place {
        placements: Vec<Placement>,
    },
    /// Takes instances off their node (which is down) to be placed again.
    Reschedule {
        instances: Vec<String>,
        reason: String,
    },
    /// A node's observations of its instances; only changes are sent.
    ReportInstances {
        node: NodeId,
        reports: Vec<InstanceReport>,
    },
    Scale {
        app: String,
        group: String,
        count: u32,
    },
    /// A new release with other resources for one group, or all.
    ScaleVm {
        app: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        resources: Resources,
    },
    /// A new release from an older one (by default the one before the current).
    Rollback {
        app: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
    },
    SetSecrets {
        app: String,
        set: BTreeMap<String, SealedSecret>,
        unset: Vec<String>,
        /// Stage only: no new release.
        stage: bool,
    },
    /// Recreates every instance of the app in place, in waves of the
    /// release's `max_unavailable` (see `RestartInstances`).
    Restart {
        app: String,
    },
    /// The leader's controller moves the next wave of a restart to a new
    /// container (apply takes only what `State::restart_wave` allows).
    RestartInstances {
        app: String,
        generation: u32,
        instances: Vec<String>,
    },
    SuspendApp {
        name: String,
    },
    ResumeApp {
        name: String,
    },
    /// A token made by `roost tokens create` (its secret's digest only).
    CreateToken {
        token: ApiToken,
    },
    /// Revokes a token by id or name; the initial admin token cannot be.
    RevokeToken {
        token: String,
    },
    /// Gives a token (by id or name, the initial admin's included) a new
    /// secret; the old one is refused from then on.
    RotateToken {
        token: String,
        secret_sha256: String,
        /// The public key of the new secret's key pair (hex); empty in
        /// entries written before calls were signed.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        public_key: String,
    },
    /// When nodes last accepted tokens, by token id. Each node reports a
    /// token at most once a minute (see `auth::TokenUses` in roost-node).
    TokensUsed {
        used: BTreeMap<String, UnixMillis>,
    },
    /// Starts a rotation of the cluster CA (`roost cluster rotate-ca`; see
    /// `state::ca`): the new CA's certificate and its key, sealed.
    StartCaRotation {
        ca_cert_pem: String,
        ca_key: SealedSecret,
    },
    /// A node's certificate from the CA being rotated to, by fingerprint:
    /// the node's own report.
    RenewNodeCertificate {
        node: NodeId,
        fingerprint: String,
        /// The certificate itself (PEM), which the leader checks: the new
        /// CA signed it and it has that fingerprint. Not kept in the state.
        #[serde(default)]
        cert_pem: String,
    },
    /// Every current node has a certificate from the new CA: it becomes the
    /// cluster's CA. The leader's decision.
    FinishCaRotation {
        ca_cert_pem: String,
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
    #[serde(default)]
    pub resources: Resources,
    /// Its WireGuard key and endpoint; `None` when it runs without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<WireguardPeer>,
    /// Which join token it came with.
    #[serde(default)]
    pub role: NodeRole,
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
    ReleaseCreated {
        version: u64,
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
    #[error("invalid label '{label}': {reason}")]
    InvalidLabel { label: String, reason: String },
    #[error("a node may carry at most {max} labels; remove some first (`roost node label NODE --remove KEY`)")]
    TooManyLabels { max: usize },
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
    #[error("app '{app}' is already deploying v{version}; wait for it to finish (see `roost status -a {app}`)")]
    DeployInProgress { app: String, version: u64 },
    #[error("app '{app}' has no release yet; run `roost deploy` first")]
    NoRelease { app: String },
    #[error("app '{app}' has no release v{version} (see `roost releases -a {app}`)")]
    ReleaseNotFound { app: String, version: u64 },
    #[error("app '{app}' has no earlier release that served to roll back to (see `roost releases -a {app}`)")]
    NothingToRollBackTo { app: String },
    #[error("app '{app}' has no process group '{group}'; its groups are: {groups}")]
    UnknownGroup { app: String, group: String, groups: String },
    #[error("app '{name}' is suspended; run `roost apps resume {name}` first")]
    AppSuspended { name: String },
    #[error("app '{name}' is already {state}")]
    AlreadyInState { name: String, state: String },
    #[error("app '{app}' has no secret named {names}")]
    SecretNotFound { app: String, names: String },
    #[error("{count} instances is more than the {max} a process group may have")]
    TooManyInstances { count: u32, max: u32 },
    #[error("secret {name} of {app} is {bytes} bytes; a secret value may be at most {max_value} bytes (keep large files out of secrets: mount them, or fetch them at start)", max_value = crate::workload::MAX_SECRET_BYTES)]
    SecretTooLarge { app: String, name: String, bytes: usize },
    #[error("{app} would have {count} secrets; an app may have at most {max}. Unset some with `roost secrets unset`")]
    TooManySecrets { app: String, count: usize, max: usize },
    #[error("{app}'s secrets would hold {bytes} bytes together; an app's secrets may hold at most {max_total} bytes. Unset some with `roost secrets unset`", max_total = crate::workload::MAX_APP_SECRETS_BYTES)]
    AppSecretsTooLarge { app: String, bytes: usize },
    #[error("invalid release: {reason}")]
    InvalidRelease { reason: String },
    #[error("the mesh range {range} has no free /24 left for another node; a cluster made with a larger --mesh-range has room")]
    MeshFull { range: String },
    #[error("invalid domain '{domain}': {reason}")]
    InvalidDomain { domain: String, reason: String },
    #[error("domain '{domain}' already has a certificate, for app '{app}' (see `roost certs list -a {app}`)")]
    CertificateExists { domain: String, app: String },
    #[error("no certificate for '{domain}' (see `roost certs list`)")]
    CertificateNotFound { domain: String },
    #[error("TCP port {port} is already a public port of app '{app}'; pick another [[services.ports]] port")]
    PortTaken { port: u16, app: String },
    #[error("invalid mesh range {range}: {reason}")]
    InvalidMeshRange { range: String, reason: String },
    #[error("invalid node address '{address}'")]
    InvalidAddress { address: String },
    #[error("invalid token name '{name}': {reason}")]
    InvalidTokenName { name: String, reason: String },
    #[error("a token named '{name}' already exists (see `roost tokens list`); pick another --name")]
    TokenExists { name: String },
    #[error("the cluster has {max} tokens, the most it may have; revoke some with `roost tokens revoke`")]
    TooManyTokens { max: usize },
    #[error("no token '{token}' (see `roost tokens list`)")]
    TokenNotFound { token: String },
    #[error("another token has this secret or key; draw a new token and try again")]
    TokenSecretTaken,
    #[error("a rotation of the cluster CA is under way; wait for it to finish (`roost cluster rotate-ca` shows it) and try again")]
    CaRotationInProgress,
    #[error("no rotation of the cluster CA is under way")]
    NoCaRotation,
    #[error("the CA is the cluster's current or previous one; a rotation needs a new CA")]
    CaNotNew,
    #[error("nodes {pending} have no certificate from the new CA yet")]
    CaRotationIncomplete { pending: String },
    #[error("another node has this certificate")]
    CertificateTaken,
    #[error("the initial admin token cannot be revoked, so that the cluster always has an admin; rotate it with `roost tokens rotate admin`")]
    InitialAdminToken,
    #[error("this log entry has format version {version}, newer than this binary understands; upgrade roost")]
    UnsupportedVersion { version: u16 },
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Bootstrap { cluster, .. } => write!(f, "bootstrap cluster {}", cluster.id),
            Command::AddNode { node } => write!(f, "add node {}", node.name),
            Command::RemoveNode { id, .. } => write!(f, "remove node {id}"),
            Command::LabelNode { id, .. } => write!(f, "label node {id}"),
            Command::RotateJoinSecrets { .. } => f.write_str("rotate the join secrets"),
            Command::KeyAdminToken { .. } => f.write_str("record the admin token's public key"),
            Command::UpdateNode { id, address, .. } => write!(f, "node {id} is at {address}"),
            Command::CreateApp { name } => write!(f, "create app {name}"),
            Command::AddCertificate { domain, app } => write!(f, "add certificate {domain} to {app}"),
            Command::RemoveCertificate { domain } => write!(f, "remove certificate {domain}"),
            Command::SetAcmeChallenge { domain, .. } => write!(f, "ACME challenge for {domain}"),
            Command::CertificateIssued { domain, .. } => write!(f, "certificate issued for {domain}"),
            Command::CertificateFailed { domain, .. } => write!(f, "certificate failed for {domain}"),
            Command::SetAcmeAccount { .. } => write!(f, "set the ACME account"),
            Command::DestroyApp { name } => write!(f, "destroy app {name}"),
            Command::Deploy { app, description, .. } => write!(f, "{description} of {app}"),
            Command::FinishRelease { app, version, outcome } => write!(f, "finish {app} v{version}: {outcome:?}"),
            Command::Place { placements } => write!(f, "{} placements", placements.len()),
            Command::RetireInstances { app, instances } => write!(f, "retire {} instances of {app}", instances.len()),
            Command::Reschedule { instances, .. } => write!(f, "reschedule {} instances", instances.len()),
            Command::ReportInstances { node, reports } => write!(f, "{} reports from node {node}", reports.len()),
            Command::Scale { app, group, count } => write!(f, "scale {app} {group} to {count}"),
            Command::ScaleVm { app, resources, .. } => write!(f, "scale {app} to {resources}"),
            Command::Rollback { app, .. } => write!(f, "roll back {app}"),
            Command::SetSecrets { app, .. } => write!(f, "set secrets of {app}"),
            Command::Restart { app } => write!(f, "restart {app}"),
            Command::RestartInstances { app, instances, generation } => {
                write!(f, "restart {} instances of {app} (generation {generation})", instances.len())
            }
            Command::SuspendApp { name } => write!(f, "suspend {name}"),
            Command::ResumeApp { name } => write!(f, "resume {name}"),
            Command::CreateToken { token } => write!(f, "create token {} ({})", token.name, token.scope),
            Command::RevokeToken { token } => write!(f, "revoke token {token}"),
            Command::RotateToken { token, .. } => write!(f, "rotate token {token}"),
            Command::TokensUsed { used } => write!(f, "{} tokens used", used.len()),
            Command::StartCaRotation { .. } => f.write_str("start a CA rotation"),
            Command::RenewNodeCertificate { node, .. } => write!(f, "node {node} has a certificate from the new CA"),
            Command::FinishCaRotation { .. } => f.write_str("finish the CA rotation"),
            Command::Batch { proposals } => write!(f, "batch of {}", proposals.len()),
        }
    }
}
