//! The replicated state and the pure function that applies commands to it.
//!
//! [`State::apply`] is the state machine: it depends only on the state and the
//! proposal (timestamps come from the proposer, inside the [`Proposal`]), does
//! no I/O and reads no clock, so every node that applies the same log reaches
//! the same state, and tests need nothing but values.
//!
//! The state is shaped by entity (`nodes`, `apps`, …) in ordered maps, so that
//! releases, instances, secrets and certificates become new maps and new
//! commands beside these, not a rewrite.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::command::{Command, NewNode, Proposal, Rejection, Response, Secret, PROPOSAL_VERSION};
use crate::workload::{Instance, Release, ReleaseStatus, Resources, SealedSecret};
use crate::NodeId;

mod apps;
mod ca;
mod certs;
mod mesh;
mod tokens;

pub use apps::{MAX_INSTANCES_PER_GROUP, MAX_RELEASE_HISTORY, RELEASE_HISTORY};
pub use ca::CaRotation;
pub use certs::{validate_domain, AcmeChallenge, Certificate, CertificateStatus, IssuedCertificate};
pub use mesh::{default_mesh_range, validate_mesh_range, WireguardPeer, NODE_SUBNET_PREFIX};
pub use tokens::{Access, ApiToken, Scope, TokenMatch, TokenView, INITIAL_ADMIN, MAX_TOKENS};

/// Milliseconds since the Unix epoch, as stamped by the proposer.
pub type UnixMillis = i64;

/// The node that creates a cluster always has this id.
pub const FIRST_NODE_ID: NodeId = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub cluster: Option<ClusterInfo>,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Removed nodes are kept so their ids are never reused and their
    /// certificates stay refused.
    pub removed_nodes: BTreeMap<NodeId, RemovedNode>,
    /// Fingerprints of node certificates that must be refused (removed nodes).
    pub revoked_certs: BTreeSet<String>,
    pub apps: BTreeMap<String, App>,
    pub next_node_id: NodeId,
    /// Every instance of every app, by id.
    #[serde(default)]
    pub instances: BTreeMap<String, Instance>,
    /// Feeds instance ids; never reused.
    #[serde(default)]
    pub next_instance: u64,
    /// When each destroyed app was destroyed: its images made before then
    /// can go at once.
    #[serde(default)]
    pub destroyed_apps: BTreeMap<String, UnixMillis>,
    /// Custom domains' certificates, by domain.
    #[serde(default)]
    pub certificates: BTreeMap<String, Certificate>,
    /// The cluster's ACME account (its credentials, sealed).
    #[serde(default)]
    pub acme_account: Option<SealedSecret>,
    /// Tokens made by `roost tokens create`, by id.
    #[serde(default)]
    pub api_tokens: BTreeMap<String, ApiToken>,
    /// When the initial admin token was last accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_last_used: Option<UnixMillis>,
}

/// The cluster domain of a cluster made without `--domain`: `hello.localhost`
/// resolves to this machine with no DNS set-up.
pub const DEFAULT_DOMAIN: &str = "localhost";

fn default_domain() -> String {
    DEFAULT_DOMAIN.to_owned()
}

/// Where the cluster gets certificates for custom domains.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeSettings {
    /// The ACME directory URL.
    pub directory: String,
    /// The account's contact address.
    pub email: Option<String>,
    /// A root certificate (PEM) to trust for the directory besides the
    /// usual ones: a private ACME server's.
    pub ca_pem: Option<String>,
}

/// Cluster-wide facts and credentials, set once by `roost node init`.
///
/// Every member replicates this, workers included, so nothing here opens
/// anything by itself: the CA key and the join secrets are sealed with the
/// secrets key, which only nodes that may vote hold, and joins are checked
/// against digests.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub id: String,
    pub created_at: UnixMillis,
    pub ca_cert_pem: String,
    /// The CA key (PEM), sealed with the secrets key: a voter opens it to
    /// sign a joining node's certificate or an edge certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_key: Option<SealedSecret>,
    /// The voter join token's secret, which `roost node token` prints: a
    /// node that joins with it may be made a voter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voter_join: Option<JoinSecret>,
    /// The worker join token's secret (`roost node token --role worker`):
    /// a node that joins with it runs instances and never votes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_join: Option<JoinSecret>,
    /// Clusters made before the CA key was sealed kept it here in plain
    /// text (and the join secrets below); read, never written now.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca_key_pem: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub join_secret: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub worker_join_secret: String,
    /// SHA-256 (hex) of the admin token's secret; the secret itself is only
    /// in the init node's `admin.token`.
    pub admin_secret_sha256: String,
    /// The public key (hex) of the admin token's key pair, which signed
    /// calls are checked against; empty for a cluster made before calls
    /// were signed, until its admin token is rotated.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub admin_public_key: String,
    /// A node was removed and the join secrets are still the ones it knew:
    /// the leader replaces them ([`Command::RotateJoinSecrets`]) once no
    /// removed node is in Raft's membership.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join_rotation_due: bool,
    /// The private range the mesh gives out, a /24 per node
    /// (`node init --mesh-range`).
    #[serde(default = "default_mesh_range")]
    pub mesh_range: Ipv4Net,
    /// Apps are served as `APP.DOMAIN` by every node's edge (`--domain`).
    #[serde(default = "default_domain")]
    pub domain: String,
    /// ACME for custom domains (`--acme-directory`, `--acme-email`,
    /// `--acme-ca`); `None`: custom domains cannot get certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeSettings>,
    /// A rotation of the CA under way (`roost cluster rotate-ca`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_rotation: Option<CaRotation>,
    /// The CA before the last rotation: it signed the certificates that
    /// connections opened before then may still use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_ca_cert_pem: Option<String>,
}

impl ClusterInfo {
    fn rotate_join_secrets(&mut self, rotate: &RotatedJoinSecrets) {
        self.voter_join = Some(rotate.voter.clone());
        self.worker_join = Some(rotate.worker.clone());
        // A digest now decides: the old plain secrets admit no one.
        self.join_secret.clear();
        self.worker_join_secret.clear();
        self.join_rotation_due = false;
    }
}

impl std::fmt::Debug for ClusterInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterInfo")
            .field("id", &self.id)
            .field("created_at", &self.created_at)
            .field("mesh_range", &self.mesh_range)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// A join secret as the state keeps it: a digest any node checks a join
/// against, and the secret sealed for the voters that print tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinSecret {
    /// SHA-256 of the secret, hex.
    pub sha256: String,
    pub sealed: SealedSecret,
}

/// New join secrets for both roles, as `roost node remove` makes them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotatedJoinSecrets {
    pub voter: JoinSecret,
    pub worker: JoinSecret,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    /// HOST:PORT that serves Raft and the API.
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub cert_serial: String,
    pub cert_fingerprint: String,
    pub joined_at: UnixMillis,
    /// What the node offers to instances.
    #[serde(default)]
    pub resources: Resources,
    /// The node's /24 of the mesh range: its own address on the instance
    /// network is the first, its instances get the rest. Held until the
    /// node is removed; no two current nodes share one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<Ipv4Net>,
    /// How peers reach the node over WireGuard; `None` for a node that runs
    /// without it (nodes sharing one host and one Docker engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<WireguardPeer>,
    /// Whether it may vote: set by the join token it came with.
    #[serde(default)]
    pub role: NodeRole,
    /// During a CA rotation, the fingerprint of the node's certificate from
    /// the new CA ([`Command::RenewNodeCertificate`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cert_fingerprint: Option<String>,
    /// The certificate the node had before the last CA rotation: still the
    /// node's, for connections opened before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub former_cert_fingerprint: Option<String>,
}

impl NodeRecord {
    /// Whether the certificate with this fingerprint is this node's: its
    /// current one, the one from a CA being rotated to, or its former one.
    pub fn has_certificate(&self, fingerprint: &str) -> bool {
        self.cert_fingerprint == fingerprint
            || self.next_cert_fingerprint.as_deref() == Some(fingerprint)
            || self.former_cert_fingerprint.as_deref() == Some(fingerprint)
    }
}

/// What a node may be in Raft, fixed by the join token it joined with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    /// Joined with the voter token: made a voter when the cluster needs one.
    #[default]
    Voter,
    /// Joined with the worker token: runs instances and serves the edge, but
    /// stays a learner for good: it never counts towards a quorum, and its
    /// Raft messages are refused, so it cannot campaign or lead.
    Worker,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedNode {
    pub name: String,
    pub removed_at: UnixMillis,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    pub name: String,
    pub created_at: UnixMillis,
    /// Suspended apps keep their releases and instances, stopped.
    #[serde(default)]
    pub suspended: bool,
    #[serde(default)]
    pub releases: BTreeMap<u64, Release>,
    /// Instances wanted per process group.
    #[serde(default)]
    pub scale: BTreeMap<String, u32>,
    #[serde(default)]
    pub secrets: BTreeMap<String, SealedSecret>,
    /// Bumped by every change to `secrets`.
    #[serde(default)]
    pub secrets_version: u64,
    /// A `roost restart` under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartProgress>,
}

/// A restart in waves: instances placed before `requested_at` move to
/// `generation` (a new container) a wave at a time, the release's
/// `max_unavailable`, the next wave once the last is ready again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartProgress {
    pub generation: u32,
    pub requested_at: UnixMillis,
}

impl App {
    pub fn new(name: &str, created_at: UnixMillis) -> Self {
        Self {
            name: name.to_owned(),
            created_at,
            suspended: false,
            releases: BTreeMap::new(),
            scale: BTreeMap::new(),
            secrets: BTreeMap::new(),
            secrets_version: 0,
            restart: None,
        }
    }

    /// The release that serves.
    pub fn current(&self) -> Option<&Release> {
        self.releases.values().rev().find(|r| r.status == ReleaseStatus::Active)
    }

    /// Whether the app was ever deployed: until then no reconciler (routes,
    /// `.internal` names, certificates) knows it, so creating it costs them
    /// no pass ([`Command::touches_workloads`]).
    pub fn has_release(&self) -> bool {
        !self.releases.is_empty()
    }

    /// The release being deployed, if a deploy is under way.
    pub fn deploying(&self) -> Option<&Release> {
        self.releases.values().rev().find(|r| r.status == ReleaseStatus::Deploying)
    }
}

impl State {
    pub fn apply(&mut self, proposal: &Proposal) -> Response {
        if proposal.version > PROPOSAL_VERSION {
            return Response::Rejected(Rejection::UnsupportedVersion { version: proposal.version });
        }
        let at = proposal.proposed_at;
        match &proposal.command {
            Command::Bootstrap { cluster, node } => self.bootstrap(cluster, node, at),
            Command::AddNode { node } => self.add_node(node, at),
            Command::RemoveNode { id, new_join_secret, new_worker_secret, rotate } => {
                self.remove_node(*id, (new_join_secret.as_ref(), new_worker_secret.as_ref()), rotate.as_ref(), at)
            }
            Command::LabelNode { id, set, remove } => self.label_node(*id, set, remove),
            Command::UpdateNode { id, address, wireguard } => self.update_node(*id, address, wireguard.as_ref()),
            Command::AddCertificate { domain, app } => self.add_certificate(domain, app, at),
            Command::RemoveCertificate { domain } => self.remove_certificate(domain),
            Command::SetAcmeChallenge { domain, challenge } => self.set_challenge(domain, challenge.as_ref(), at),
            Command::CertificateIssued { domain, issued } => self.certificate_issued(domain, issued, at),
            Command::CertificateFailed { domain, error, retry_at } => {
                self.certificate_failed(domain, error, *retry_at, at)
            }
            Command::SetAcmeAccount { credentials } => {
                self.acme_account = Some(credentials.clone());
                Response::Done
            }
            Command::CreateApp { name } => self.create_app(name, at),
            Command::DestroyApp { name } => self.destroy_app(name, at),
            Command::Deploy { app, spec, description } => self.deploy(app, spec, description, at),
            Command::FinishRelease { app, version, outcome } => self.finish_release(app, *version, outcome, at),
            Command::Place { placements } => self.place(placements),
            Command::RetireInstances { app, instances } => self.retire(app, instances),
            Command::Reschedule { instances, reason } => self.reschedule(instances, reason),
            Command::ReportInstances { node, reports } => self.report_instances(*node, reports, at),
            Command::Scale { app, group, count } => self.scale(app, group, *count, at),
            Command::ScaleVm { app, group, resources } => self.scale_vm(app, group.as_deref(), *resources, at),
            Command::Rollback { app, version } => self.rollback(app, *version, at),
            Command::SetSecrets { app, set, unset, stage } => self.set_secrets(app, set, unset, *stage, at),
            Command::Restart { app } => self.restart(app, at),
            Command::RestartInstances { app, generation, instances } => {
                self.restart_instances(app, *generation, instances)
            }
            Command::SuspendApp { name } => self.set_suspended(name, true),
            Command::ResumeApp { name } => self.set_suspended(name, false),
            Command::CreateToken { token } => self.create_token(token),
            Command::RevokeToken { token } => self.revoke_token(token),
            Command::RotateToken { token, secret_sha256, public_key } => {
                self.rotate_token(token, secret_sha256, public_key)
            }
            Command::KeyAdminToken { secret_sha256, public_key } => self.key_admin_token(secret_sha256, public_key),
            Command::RotateJoinSecrets { rotate } => match self.cluster.as_mut() {
                Some(cluster) => {
                    cluster.rotate_join_secrets(rotate);
                    Response::Done
                }
                None => Response::Rejected(Rejection::NotBootstrapped),
            },
            Command::TokensUsed { used } => self.tokens_used(used, at),
            Command::StartCaRotation { ca_cert_pem, ca_key } => self.start_ca_rotation(ca_cert_pem, ca_key, at),
            Command::RenewNodeCertificate { node, fingerprint, .. } => self.renew_node_certificate(*node, fingerprint),
            Command::FinishCaRotation { ca_cert_pem } => self.finish_ca_rotation(ca_cert_pem),
            Command::Batch { proposals } => {
                Response::Batch { responses: proposals.iter().map(|p| self.apply(p)).collect() }
            }
        }
    }

    fn bootstrap(&mut self, cluster: &ClusterInfo, node: &NewNode, at: UnixMillis) -> Response {
        if let Some(existing) = &self.cluster {
            // Re-proposing the same bootstrap (after a crash) is harmless.
            return if existing.id == cluster.id {
                Response::NodeAdded { id: FIRST_NODE_ID }
            } else {
                Response::Rejected(Rejection::AlreadyBootstrapped)
            };
        }
        if let Err(reason) = validate_mesh_range(cluster.mesh_range) {
            return Response::Rejected(Rejection::InvalidMeshRange { range: cluster.mesh_range.to_string(), reason });
        }
        self.cluster = Some(cluster.clone());
        let subnet = self.free_subnet();
        self.nodes.insert(FIRST_NODE_ID, node.record(FIRST_NODE_ID, at, subnet));
        self.next_node_id = FIRST_NODE_ID + 1;
        Response::NodeAdded { id: FIRST_NODE_ID }
    }

    fn add_node(&mut self, node: &NewNode, at: UnixMillis) -> Response {
        let Some(cluster) = &self.cluster else {
            return Response::Rejected(Rejection::NotBootstrapped);
        };
        if let Err(reason) = validate_name(&node.name) {
            return Response::Rejected(Rejection::InvalidNodeName { name: node.name.clone(), reason });
        }
        if self.revoked_certs.contains(&node.cert_fingerprint) {
            return Response::Rejected(Rejection::RevokedCertificate);
        }
        if let Some(existing) = self.node_by_name(&node.name) {
            // A retried join of the same node (same certificate) gets its id back.
            return if existing.cert_fingerprint == node.cert_fingerprint {
                Response::NodeAdded { id: existing.id }
            } else {
                Response::Rejected(Rejection::NodeNameTaken { name: node.name.clone() })
            };
        }
        // A new node's certificate would be from the CA being replaced: it would need one
        // from the new CA too, and the rotation would wait for it.
        if cluster.ca_rotation.is_some() {
            return Response::Rejected(Rejection::CaRotationInProgress);
        }
        let Some(subnet) = self.free_subnet() else {
            return Response::Rejected(Rejection::MeshFull { range: cluster.mesh_range.to_string() });
        };
        let id = self.next_node_id;
        self.next_node_id += 1;
        self.nodes.insert(id, node.record(id, at, Some(subnet)));
        Response::NodeAdded { id }
    }

    fn label_node(&mut self, id: NodeId, set: &BTreeMap<String, String>, remove: &[String]) -> Response {
        if let Err(rejection) = validate_labels(set) {
            return Response::Rejected(rejection);
        }
        let Some(node) = self.nodes.get_mut(&id) else {
            return Response::Rejected(Rejection::NodeNotFound { node: id.to_string() });
        };
        let mut labels = node.labels.clone();
        for key in remove {
            labels.remove(key);
        }
        labels.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
        if labels.len() > MAX_LABELS {
            return Response::Rejected(Rejection::TooManyLabels { max: MAX_LABELS });
        }
        node.labels = labels;
        Response::Done
    }

    fn remove_node(
        &mut self,
        id: NodeId,
        legacy: (Option<&Secret>, Option<&Secret>),
        rotate: Option<&RotatedJoinSecrets>,
        at: UnixMillis,
    ) -> Response {
        let Some(node) = self.nodes.get(&id) else {
            return Response::Rejected(Rejection::NodeNotFound { node: id.to_string() });
        };
        if self.nodes.len() == 1 {
            return Response::Rejected(Rejection::LastNode { name: node.name.clone() });
        }
        let Some(node) = self.nodes.remove(&id) else {
            return Response::Rejected(Rejection::NodeNotFound { node: id.to_string() });
        };
        self.revoked_certs.insert(node.cert_fingerprint);
        self.revoked_certs.extend(node.next_cert_fingerprint);
        self.revoked_certs.extend(node.former_cert_fingerprint);
        self.removed_nodes.insert(id, RemovedNode { name: node.name, removed_at: at });
        self.cancel_ca_rotation();
        if let Some(cluster) = self.cluster.as_mut() {
            match rotate {
                Some(rotate) => cluster.rotate_join_secrets(rotate),
                None => cluster.join_rotation_due = true,
            }
            // Entries written before join secrets were sealed.
            if let Some(secret) = legacy.0 {
                cluster.join_secret = secret.0.clone();
            }
            if let Some(secret) = legacy.1 {
                cluster.worker_join_secret = secret.0.clone();
            }
        }
        Response::Done
    }

    fn create_app(&mut self, name: &str, at: UnixMillis) -> Response {
        if let Err(reason) = validate_name(name) {
            return Response::Rejected(Rejection::InvalidAppName { name: name.to_owned(), reason });
        }
        if self.apps.contains_key(name) {
            return Response::Rejected(Rejection::AppExists { name: name.to_owned() });
        }
        let app = App::new(name, at);
        self.apps.insert(name.to_owned(), app.clone());
        Response::AppCreated { app }
    }

    fn destroy_app(&mut self, name: &str, at: UnixMillis) -> Response {
        match self.apps.remove(name) {
            Some(_) => {
                self.instances.retain(|_, instance| instance.app != name);
                self.certificates.retain(|_, certificate| certificate.app != name);
                self.destroyed_apps.insert(name.to_owned(), at);
                // A token for this app must not carry over to a new app of
                // the same name.
                self.api_tokens.retain(|_, token| token.scope.app() != Some(name));
                Response::Done
            }
            None => Response::Rejected(Rejection::AppNotFound { name: name.to_owned() }),
        }
    }

    pub fn node_by_name(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.values().find(|n| n.name == name)
    }

    /// Whether `id` is a current node that joined as a worker.
    pub fn is_worker(&self, id: NodeId) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.role == NodeRole::Worker)
    }

    /// The current nodes that joined as workers.
    pub fn workers(&self) -> BTreeSet<NodeId> {
        self.nodes.values().filter(|n| n.role == NodeRole::Worker).map(|n| n.id).collect()
    }

    /// The current node whose certificate has this fingerprint
    /// ([`NodeRecord::has_certificate`]).
    pub fn node_by_fingerprint(&self, fingerprint: &str) -> Option<&NodeRecord> {
        self.nodes.values().find(|n| n.has_certificate(fingerprint))
    }

    /// Finds a node by name, or by id when the text is a number.
    pub fn find_node(&self, name_or_id: &str) -> Option<&NodeRecord> {
        self.node_by_name(name_or_id).or_else(|| name_or_id.parse().ok().and_then(|id: NodeId| self.nodes.get(&id)))
    }

    pub fn is_revoked(&self, fingerprint: &str) -> bool {
        self.revoked_certs.contains(fingerprint)
    }
}

impl NewNode {
    fn record(&self, id: NodeId, at: UnixMillis, subnet: Option<Ipv4Net>) -> NodeRecord {
        NodeRecord {
            id,
            name: self.name.clone(),
            address: self.address.clone(),
            labels: self.labels.clone(),
            cert_serial: self.cert_serial.clone(),
            cert_fingerprint: self.cert_fingerprint.clone(),
            joined_at: at,
            resources: self.resources,
            subnet,
            wireguard: self.wireguard.clone(),
            role: self.role,
            next_cert_fingerprint: None,
            former_cert_fingerprint: None,
        }
    }
}

/// How many labels a node may carry.
pub const MAX_LABELS: usize = 64;

/// The rule node labels follow.
pub const LABEL_RULE: &str = "a label's key is 1 to 63 ASCII letters, digits, '-', '_', '.' or '/', and its value at most 255 bytes of UTF-8 without control characters";

/// Checks a node label against [`LABEL_RULE`].
pub fn validate_label(key: &str, value: &str) -> Result<(), String> {
    let key_ok =
        !key.is_empty() && key.len() <= 63 && key.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    let value_ok = value.len() <= 255 && !value.chars().any(char::is_control);
    match (key_ok, value_ok) {
        (true, true) => Ok(()),
        (false, _) => Err(format!("its key is not allowed; {LABEL_RULE}")),
        (true, false) => Err(format!("its value is not allowed; {LABEL_RULE}")),
    }
}

/// Checks labels a node declares or an admin sets: each by [`validate_label`],
/// at most [`MAX_LABELS`].
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), Rejection> {
    for (key, value) in labels {
        validate_label(key, value)
            .map_err(|reason| Rejection::InvalidLabel { label: key.chars().take(80).collect(), reason })?;
    }
    if labels.len() > MAX_LABELS {
        return Err(Rejection::TooManyLabels { max: MAX_LABELS });
    }
    Ok(())
}

/// Checks a change of a node's labels (`roost node label`): it changes
/// something, sets labels by [`validate_labels`], removes keys that follow
/// the key rule, and sets no key it removes.
pub fn validate_label_change(set: &BTreeMap<String, String>, remove: &[String]) -> Result<(), String> {
    if set.is_empty() && remove.is_empty() {
        return Err("nothing to change: give labels to set (KEY=VALUE) and/or keys to remove (--remove KEY)".into());
    }
    if let Some(key) = remove.iter().find(|key| set.contains_key(*key)) {
        return Err(format!("label {key} is both set and removed; pick one"));
    }
    if remove.len() > MAX_LABELS {
        return Err(format!("at most {MAX_LABELS} labels can be removed at once (a node has no more)"));
    }
    if let Some(key) = remove.iter().find(|key| validate_label(key, "").is_err()) {
        let key: String = key.chars().take(80).collect();
        return Err(format!("cannot remove label '{key}': {LABEL_RULE}"));
    }
    validate_labels(set).map_err(|rejection| rejection.to_string())
}

/// The rule app and node names follow, since both become DNS labels.
pub const NAME_RULE: &str =
    "names use lowercase letters, digits and '-', start with a letter, do not end with '-', and have at most 63 characters";

/// Checks a name against [`NAME_RULE`]; the error says which part failed.
pub fn validate_name(name: &str) -> Result<(), String> {
    let problem = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 63 {
        Some("it is longer than 63 characters")
    } else if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        Some("it does not start with a lowercase letter")
    } else if name.ends_with('-') {
        Some("it ends with '-'")
    } else if !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
        Some("it has a character other than a-z, 0-9 and '-'")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(format!("{problem}; {NAME_RULE}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
