//! Who holds the cluster's keys, and how a worker does without them.
//!
//! Nodes that may vote hold the secrets key (`secrets.key`); the replicated
//! state holds the CA key and the join secrets only sealed with it, and joins
//! are checked against digests. A worker, which replicates the state like any
//! member, therefore holds nothing that opens a secret, signs a certificate
//! or admits a node. What it needs it asks a voter for over mTLS (the `Keys`
//! service, [`KeysService`]): the opened secrets of an instance placed on it,
//! at the moment it starts it, and the certificates its edge serves.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use roost_deploy::agent::SecretOpener;
use roost_deploy::secrets::{SecretsError, SecretsKey};
use roost_network::pki::{self, constant_time_eq, secret_digest, ClusterCa};
use roost_network::token::{join_proof, JoinProof};
use roost_proto::cluster::keys_client::KeysClient;
use roost_proto::cluster::keys_server;
use roost_proto::cluster::{
    ApiCertificateRequest, ApiCertificateResponse, EdgeCertificate, EdgeCertificatesRequest, EdgeCertificatesResponse,
    InstanceSecretsRequest, InstanceSecretsResponse, RenewCertificateRequest, RenewCertificateResponse,
};
use roost_raft::consensus::now_millis;
use roost_raft::service::Caller;
use roost_raft::state::{ClusterInfo, JoinSecret, NodeRecord, NodeRole};
use roost_raft::workload::{Instance, SealedSecret};
use roost_raft::{Consensus, State};
use tokio::time::Instant;
use tonic::{Request, Status};

use super::api::{consensus_status, API_DEADLINE};
use super::channels::NodeChannels;
use super::edge::{issued_certificates, open_issued};
use super::limit::Buckets;

/// The "app" the cluster's own keys are sealed under; no app can be named so.
pub const CLUSTER_KEYS: &str = "roost:cluster";
const CA_KEY: &str = "ca-key";
/// APP.DOMAIN names a node may ask certificates for in one call.
pub const MAX_EDGE_NAMES: usize = 256;
/// What a node may ask of a voter's edge certificates ([`edge_limiter`]):
/// a call costs [`EDGE_CALL_COST`] units (it opens every ACME certificate's
/// key) and one more per certificate made; a node has a burst of
/// [`EDGE_BURST`] units, then one every [`EDGE_EVERY`]. A new worker in a
/// cluster of a thousand apps gets them within about two seconds; a node
/// that loops on the call gets about 6 calls, or 50 certificates, a second
/// from each voter (a refused call is tried at the next voter, which has
/// its own bucket).
pub const EDGE_BURST: u32 = 1024;
pub const EDGE_EVERY: Duration = Duration::from_millis(20);
pub const EDGE_CALL_COST: u32 = 8;

pub fn edge_limiter() -> Buckets<roost_raft::NodeId> {
    Buckets::new(EDGE_BURST, EDGE_EVERY)
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("this node is a worker and holds none of the cluster's keys; run it against a voter instead (--endpoint){voters}")]
    Worker { voters: String },
    #[error("the cluster's {what} cannot be opened with this node's secrets key")]
    Open {
        what: &'static str,
        #[source]
        source: SecretsError,
    },
    #[error("the cluster has no {what} (it was made before Roost had one)")]
    Missing { what: &'static str },
    #[error("the cluster CA is unusable")]
    Ca(#[source] pki::PkiError),
}

impl From<KeysError> for Status {
    fn from(error: KeysError) -> Status {
        match error {
            KeysError::Worker { .. } | KeysError::Missing { .. } => Status::failed_precondition(error.to_string()),
            KeysError::Open { .. } | KeysError::Ca(_) => Status::internal(super::identity::error_chain(&error)),
        }
    }
}

fn join_name(role: NodeRole) -> &'static str {
    match role {
        NodeRole::Voter => "join-voter",
        NodeRole::Worker => "join-worker",
    }
}

/// The CA key as the state keeps it.
pub fn seal_ca_key(key: &SecretsKey, ca: &ClusterCa) -> Result<SealedSecret, SecretsError> {
    key.seal(CLUSTER_KEYS, CA_KEY, ca.key_pem(), now_millis())
}

/// A join secret for `role` as the state keeps it.
pub fn seal_join_secret(key: &SecretsKey, role: NodeRole, secret: &str) -> Result<JoinSecret, SecretsError> {
    Ok(JoinSecret {
        sha256: secret_digest(secret),
        sealed: key.seal(CLUSTER_KEYS, join_name(role), secret, now_millis())?,
    })
}

/// The cluster CA, key included: only a node with the secrets key opens it.
pub fn open_ca(cluster: &ClusterInfo, key: &SecretsKey) -> Result<ClusterCa, KeysError> {
    let key_pem = match &cluster.ca_key {
        Some(sealed) => {
            key.open(CLUSTER_KEYS, CA_KEY, sealed).map_err(|source| KeysError::Open { what: "CA key", source })?
        }
        None if !cluster.ca_key_pem.is_empty() => cluster.ca_key_pem.clone(),
        None => return Err(KeysError::Missing { what: "CA key" }),
    };
    ClusterCa::load(&cluster.id, &cluster.ca_cert_pem, &key_pem).map_err(KeysError::Ca)
}

/// The CA a rotation under way moves to, key included; `None` without one.
pub fn open_rotation_ca(cluster: &ClusterInfo, key: &SecretsKey) -> Result<Option<ClusterCa>, KeysError> {
    let Some(rotation) = &cluster.ca_rotation else { return Ok(None) };
    let key_pem = key
        .open(CLUSTER_KEYS, CA_KEY, &rotation.ca_key)
        .map_err(|source| KeysError::Open { what: "new CA key", source })?;
    ClusterCa::load(&cluster.id, &rotation.ca_cert_pem, &key_pem).map(Some).map_err(KeysError::Ca)
}

/// The digest of a CA certificate (PEM): what tokens for it pin.
pub fn ca_digest(ca_cert_pem: &str) -> Result<pki::CaDigest, KeysError> {
    Ok(pki::CaDigest::of(&pki::cert_der_from_pem(ca_cert_pem).map_err(KeysError::Ca)?))
}

/// The join secret of `role`, as `roost node token` prints it.
pub fn open_join_secret(cluster: &ClusterInfo, role: NodeRole, key: &SecretsKey) -> Result<String, KeysError> {
    let (sealed, legacy) = match role {
        NodeRole::Voter => (&cluster.voter_join, &cluster.join_secret),
        NodeRole::Worker => (&cluster.worker_join, &cluster.worker_join_secret),
    };
    match sealed {
        // A rotation by an older entry leaves a plain secret beside a
        // sealed one; the plain one is the newer.
        _ if !legacy.is_empty() => Ok(legacy.clone()),
        Some(join) => key
            .open(CLUSTER_KEYS, join_name(role), &join.sealed)
            .map_err(|source| KeysError::Open { what: "join secret", source }),
        None => Err(KeysError::Missing {
            what: match role {
                NodeRole::Voter => "voter join token",
                NodeRole::Worker => "worker join token",
            },
        }),
    }
}

/// The role a join secret admits: [`NodeRole::Voter`] for the voter join
/// secret, [`NodeRole::Worker`] for the worker one; `None` for neither.
/// Checked against digests, so any member can check it.
pub fn join_role(state: &State, secret: &str) -> Option<NodeRole> {
    let digest = secret_digest(secret);
    role_whose_digest(state, |known| constant_time_eq(known.as_bytes(), digest.as_bytes()))
}

/// The role whose join secret a joining node proved with `digest_proof` on
/// the TLS session `session` ([`JoinProof::JoinerDigest`]): a pre-check any
/// member can make. Only [`open_join_by_proof`] admits a node.
pub fn join_role_by_digest_proof(state: &State, digest_proof: &[u8], session: &[u8]) -> Option<NodeRole> {
    role_whose_digest(state, |known| {
        constant_time_eq(&join_proof(known, session, JoinProof::JoinerDigest), digest_proof)
    })
}

/// The first role (voter, then worker) whose join secret's digest `matches`;
/// none while the join secrets are due to be replaced after a removal (the
/// removed node knows them).
fn role_whose_digest(state: &State, matches: impl Fn(&str) -> bool) -> Option<NodeRole> {
    let cluster = state.cluster.as_ref().filter(|c| !c.join_rotation_due)?;
    let digest_of = |sealed: &Option<JoinSecret>, legacy: &str| {
        if !legacy.is_empty() {
            Some(secret_digest(legacy))
        } else {
            sealed.as_ref().map(|join| join.sha256.clone())
        }
    };
    if digest_of(&cluster.voter_join, &cluster.join_secret).is_some_and(|d| matches(&d)) {
        Some(NodeRole::Voter)
    } else if digest_of(&cluster.worker_join, &cluster.worker_join_secret).is_some_and(|d| matches(&d)) {
        Some(NodeRole::Worker)
    } else {
        None
    }
}

/// The role and the join secret a joining node proved with `proof` on the
/// TLS session `session` ([`JoinProof::Joiner`]), opened with the secrets
/// key: what admits a node.
pub fn open_join_by_proof(
    cluster: &ClusterInfo,
    key: &SecretsKey,
    proof: &[u8],
    session: &[u8],
) -> Option<(NodeRole, String)> {
    if cluster.join_rotation_due {
        return None;
    }
    [NodeRole::Voter, NodeRole::Worker].into_iter().find_map(|role| {
        let secret = open_join_secret(cluster, role, key).ok()?;
        constant_time_eq(&join_proof(&secret, session, JoinProof::Joiner), proof).then_some((role, secret))
    })
}

/// The error a worker gives for what only a voter can do, naming the voters.
pub fn worker_refusal(state: &State) -> KeysError {
    KeysError::Worker { voters: voters_named(state) }
}

/// The nodes that may vote (every node not a worker), by id.
fn voters(state: &State) -> Vec<&NodeRecord> {
    state.nodes.values().filter(|n| !state.is_worker(n.id)).collect()
}

/// ": NAME (ADDRESS), ..." of the nodes that may vote; empty if none is known.
pub fn voters_named(state: &State) -> String {
    let voters: Vec<String> = voters(state).iter().map(|n| format!("{} ({})", n.name, n.address)).collect();
    if voters.is_empty() {
        String::new()
    } else {
        format!(": {}", voters.join(", "))
    }
}

/// The `Keys` service, as a voter serves it.
pub struct KeysService {
    pub consensus: Arc<Consensus>,
    /// `None` on a worker, which serves nothing here.
    pub key: Option<Arc<SecretsKey>>,
    /// Edge certificates each node may ask for ([`edge_limiter`]); API
    /// certificates count against the same budget.
    pub edge_limit: Buckets<roost_raft::NodeId>,
    /// How long the API certificates this voter signs live.
    pub api_cert_lifetime: std::time::Duration,
}

impl KeysService {
    fn key(&self) -> Result<&SecretsKey, Status> {
        super::auth::require_key(&self.key, self.consensus.state())
    }

    /// The calling node's record and the cluster, for a certificate of
    /// `what` kind for `public_key`: only the key the caller holds (the one
    /// its certificate on this connection, `presented`, certifies), and
    /// only while it is a member, after a read barrier (so a removal or a
    /// CA rotation the caller saw is known here too).
    async fn member_with_key(
        &self,
        caller: roost_raft::NodeId,
        presented: Option<Arc<[u8]>>,
        public_key: &[u8],
        what: &str,
    ) -> Result<(NodeRecord, ClusterInfo), Status> {
        if !presented.is_some_and(|cert| pki::certifies_key(&cert, public_key)) {
            return Err(Status::permission_denied(format!(
                "a node gets {what} only for the key of the certificate it calls with"
            )));
        }
        self.consensus.read_barrier(Instant::now() + API_DEADLINE).await.map_err(consensus_status)?;
        let (node, cluster) = self.consensus.state().read(|s| (s.nodes.get(&caller).cloned(), s.cluster.clone()));
        let node = node.ok_or_else(|| Status::permission_denied("the calling node is no longer a member"))?;
        let cluster = cluster.ok_or_else(|| Status::unavailable("this node does not know the cluster yet"))?;
        Ok((node, cluster))
    }

    /// The caller's node id, known once this node has caught up.
    fn caller<T>(request: &Request<T>) -> Result<roost_raft::NodeId, Status> {
        match request.extensions().get::<Caller>() {
            Some(Caller(Some(id))) => Ok(*id),
            _ => Err(Status::unavailable("this node has not caught up with the cluster yet; try another voter")),
        }
    }
}

#[tonic::async_trait]
impl keys_server::Keys for KeysService {
    async fn instance_secrets(
        &self,
        request: Request<InstanceSecretsRequest>,
    ) -> Result<tonic::Response<InstanceSecretsResponse>, Status> {
        let caller = Self::caller(&request)?;
        let key = self.key()?;
        let wanted = request.into_inner().instance;
        // The placement was committed before the caller saw it: after a
        // barrier this node sees it too.
        self.consensus.read_barrier(Instant::now() + API_DEADLINE).await.map_err(consensus_status)?;
        let sealed = self.consensus.state().read(|s| {
            // Checked again after the barrier: the caller may have been removed.
            if !s.nodes.contains_key(&caller) {
                return None;
            }
            let instance = s.instances.get(&wanted).filter(|i| i.node == Some(caller))?;
            Some((instance.app.clone(), s.apps.get(&instance.app)?.releases.get(&instance.release)?.secrets.clone()))
        });
        let Some((app, sealed)) = sealed else {
            return Err(Status::permission_denied(format!("instance {wanted} is not placed on the calling node")));
        };
        let mut secrets = HashMap::new();
        for (name, value) in &sealed {
            let opened = key.open(&app, name, value).map_err(|e| Status::internal(e.to_string()))?;
            secrets.insert(name.clone(), opened);
        }
        tracing::debug!(instance = %wanted, node = caller, "opened an instance's secrets for its node");
        Ok(tonic::Response::new(InstanceSecretsResponse { secrets }))
    }

    async fn edge_certificates(
        &self,
        request: Request<EdgeCertificatesRequest>,
    ) -> Result<tonic::Response<EdgeCertificatesResponse>, Status> {
        let caller = Self::caller(&request)?;
        let key = self.key()?;
        let names = request.into_inner().names;
        if names.len() > MAX_EDGE_NAMES {
            return Err(Status::invalid_argument(format!("at most {MAX_EDGE_NAMES} names per call")));
        }
        let cost = EDGE_CALL_COST + names.len() as u32;
        if let Err(wait) = self.edge_limit.take(caller, cost, std::time::Instant::now()) {
            tracing::debug!(node = caller, names = names.len(), "edge certificates refused: rate limit");
            return Err(Status::resource_exhausted(format!(
                "node {caller} asked for more edge certificates than a node needs; try again in {} ms",
                wait.as_millis().max(1)
            )));
        }
        // Apps and certificates the caller saw are known here after this.
        self.consensus.read_barrier(Instant::now() + API_DEADLINE).await.map_err(consensus_status)?;
        let (member, cluster, issued, names) = self.consensus.state().read(|s| {
            // Only APP.DOMAIN of an app that exists.
            let domain = s.cluster.as_ref().map(|c| format!(".{}", c.domain)).unwrap_or_default();
            let names: Vec<String> = names
                .into_iter()
                .filter(|name| name.strip_suffix(domain.as_str()).is_some_and(|app| s.apps.contains_key(app)))
                .collect();
            (s.nodes.contains_key(&caller), s.cluster.clone(), issued_certificates(s), names)
        });
        // Checked again after the barrier: the caller may have been removed.
        if !member {
            return Err(Status::permission_denied("the calling node is no longer a member"));
        }
        let cluster = cluster.ok_or_else(|| Status::unavailable("this node does not know the cluster yet"))?;
        let opened: Vec<EdgeCertificate> = open_issued(key, &issued)
            .into_iter()
            .map(|(domain, chain_pem, key_pem)| EdgeCertificate { domain, chain_pem, key_pem })
            .collect();
        let mut made = Vec::new();
        if !names.is_empty() {
            let ca = open_ca(&cluster, key)?;
            for name in names {
                let (chain_pem, key_pem) =
                    ca.issue_server(&name).map_err(|e| Status::internal(format!("could not issue {name}: {e}")))?;
                made.push(EdgeCertificate { domain: name, chain_pem, key_pem });
            }
        }
        tracing::debug!(node = caller, issued = opened.len(), made = made.len(), "handed a node its edge certificates");
        Ok(tonic::Response::new(EdgeCertificatesResponse { issued: opened, cluster: made }))
    }

    async fn renew_certificate(
        &self,
        request: Request<RenewCertificateRequest>,
    ) -> Result<tonic::Response<RenewCertificateResponse>, Status> {
        let caller = Self::caller(&request)?;
        let key = self.key()?;
        let presented = presented_certificate(&request);
        let public_key = request.into_inner().public_key;
        let (node, cluster) = self.member_with_key(caller, presented, &public_key, "a certificate").await?;
        let ca = open_rotation_ca(&cluster, key)?
            .ok_or_else(|| Status::failed_precondition("no rotation of the cluster CA is under way"))?;
        let (cert_pem, _serial, _fingerprint) =
            ca.issue_for_public_key(&node.name, &public_key).map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(node = caller, "issued a node its certificate from the new CA");
        Ok(tonic::Response::new(RenewCertificateResponse { cert_pem, ca_cert_pem: ca.cert_pem().to_owned() }))
    }

    async fn api_certificate(
        &self,
        request: Request<ApiCertificateRequest>,
    ) -> Result<tonic::Response<ApiCertificateResponse>, Status> {
        let caller = Self::caller(&request)?;
        let key = self.key()?;
        if let Err(wait) = self.edge_limit.take(caller, EDGE_CALL_COST, std::time::Instant::now()) {
            return Err(Status::resource_exhausted(format!(
                "node {caller} asked for more API certificates than a node needs; try again in {} ms",
                wait.as_millis().max(1)
            )));
        }
        let presented = presented_certificate(&request);
        let public_key = request.into_inner().public_key;
        let (node, cluster) = self.member_with_key(caller, presented, &public_key, "an API certificate").await?;
        // It names the certificate the state records for the caller: after a
        // CA rotation, its new one, which the caller may not present yet.
        let chain_pem = open_ca(&cluster, key)?
            .issue_api(&node.name, &public_key, &node.cert_fingerprint, self.api_cert_lifetime)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::debug!(node = caller, "issued a node its API certificate");
        Ok(tonic::Response::new(ApiCertificateResponse { chain_pem }))
    }
}

/// The node certificate the caller presented on this connection.
fn presented_certificate<T>(request: &Request<T>) -> Option<Arc<[u8]>> {
    request.extensions().get::<roost_network::tls::PeerIdentity>().and_then(|p| p.node_certificate.clone())
}

/// A worker's way to the keys: it asks the voters, the leader first.
pub struct VoterKeys {
    pub consensus: Arc<Consensus>,
    pub channels: Arc<NodeChannels>,
}

impl VoterKeys {
    /// The voters to ask, the leader first.
    fn voters(&self) -> Vec<(String, String)> {
        let leader = self.consensus.leader().map(|(id, _)| id);
        self.consensus.state().read(|s| {
            let mut voters = voters(s);
            voters.sort_by_key(|n| (Some(n.id) != leader, n.id));
            voters.into_iter().map(|n| (n.name.clone(), n.address.clone())).collect()
        })
    }

    /// Asks each voter in turn until one answers; the last refusal otherwise.
    async fn ask<T, F, Fut>(&self, what: &str, call: F) -> Result<T, String>
    where
        F: Fn(KeysClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut last = format!("no voter is known to ask for {what}");
        for (name, address) in self.voters() {
            let channel = match self.channels.get(&address) {
                Ok(channel) => channel,
                Err(error) => {
                    last = format!("cannot reach {name}: {error}");
                    continue;
                }
            };
            match call(KeysClient::new(channel)).await {
                Ok(reply) => return Ok(reply.into_inner()),
                // Another voter may know more (one that lags may not
                // know this node or its instance yet).
                Err(status) => last = format!("{name} did not give {what}: {}", status.message()),
            }
        }
        Err(last)
    }

    /// A certificate from the CA being rotated to for this node's key.
    pub async fn renew_certificate(&self, public_key: Vec<u8>) -> Result<RenewCertificateResponse, String> {
        self.ask("a certificate from the new CA", |mut client| {
            let public_key = public_key.clone();
            async move { client.renew_certificate(RenewCertificateRequest { public_key }).await }
        })
        .await
    }

    /// An API certificate from the cluster CA for this node's key.
    pub async fn api_certificate(&self, public_key: Vec<u8>) -> Result<ApiCertificateResponse, String> {
        self.ask("an API certificate", |mut client| {
            let public_key = public_key.clone();
            async move { client.api_certificate(ApiCertificateRequest { public_key }).await }
        })
        .await
    }

    /// The ACME certificates, and certificates for `names` (APP.DOMAIN).
    pub async fn edge_certificates(&self, names: Vec<String>) -> Result<EdgeCertificatesResponse, String> {
        self.ask("the edge's certificates", |mut client| {
            let names = names.clone();
            async move { client.edge_certificates(EdgeCertificatesRequest { names }).await }
        })
        .await
    }
}

impl SecretOpener for VoterKeys {
    fn open(
        self: Arc<Self>,
        instance: &Instance,
        sealed: &BTreeMap<String, SealedSecret>,
    ) -> BoxFuture<'static, Result<BTreeMap<String, String>, String>> {
        let id = instance.id.clone();
        let names: Vec<String> = sealed.keys().cloned().collect();
        Box::pin(async move {
            if names.is_empty() {
                return Ok(BTreeMap::new());
            }
            let reply = self
                .ask("the instance's secrets", |mut client| {
                    let instance = id.clone();
                    async move { client.instance_secrets(InstanceSecretsRequest { instance }).await }
                })
                .await?;
            let opened: BTreeMap<String, String> = reply.secrets.into_iter().collect();
            // Started without one of its secrets, an instance would fail
            // in ways nobody could trace here.
            if !opened.keys().eq(names.iter()) {
                return Err(format!("a voter opened other secrets than the instance's release holds ({names:?})"));
            }
            Ok(opened)
        })
    }
}

#[cfg(test)]
mod tests {
    use roost_raft::state::NodeRole::{Voter, Worker};
    use roost_raft::testkit::cluster;

    use super::*;

    fn key() -> SecretsKey {
        SecretsKey::from_hex(&SecretsKey::generate_hex().expect("random")).expect("key")
    }

    #[test]
    fn the_voter_secret_admits_voters_and_the_worker_secret_workers_by_digest() {
        let key = key();
        let mut state = cluster(1, |_| Vec::new());
        if let Some(c) = state.cluster.as_mut() {
            c.voter_join = Some(seal_join_secret(&key, Voter, "voter-secret").expect("seal"));
            c.worker_join = Some(seal_join_secret(&key, Worker, "worker-secret").expect("seal"));
        }
        assert_eq!(join_role(&state, "voter-secret"), Some(Voter));
        assert_eq!(join_role(&state, "worker-secret"), Some(Worker));
        assert_eq!(join_role(&state, "other"), None);
        assert_eq!(join_role(&state, ""), None);
        let cluster = state.cluster.clone().expect("bootstrapped");
        let json = serde_json::to_string(&cluster).expect("encodes");
        assert!(!json.contains("voter-secret") && !json.contains("worker-secret"), "the state holds no join secret");
        assert_eq!(open_join_secret(&cluster, Voter, &key).expect("opens"), "voter-secret");
        assert_eq!(open_join_secret(&cluster, Worker, &key).expect("opens"), "worker-secret");
        assert!(open_join_secret(&cluster, Voter, &self::key()).is_err(), "another key opens nothing");
    }

    #[test]
    fn plain_join_secrets_of_an_older_cluster_still_admit() {
        let mut state = cluster(1, |_| Vec::new());
        if let Some(c) = state.cluster.as_mut() {
            c.join_secret = "voter-secret".into();
        }
        assert_eq!(join_role(&state, "voter-secret"), Some(Voter));
        assert_eq!(join_role(&state, ""), None, "no worker secret: an empty one admits nothing");
        let cluster = state.cluster.clone().expect("bootstrapped");
        assert!(matches!(open_join_secret(&cluster, Worker, &key()), Err(KeysError::Missing { .. })));
    }

    #[test]
    fn the_ca_key_opens_only_with_the_secrets_key() {
        let key = key();
        let ca = ClusterCa::generate("c1").expect("ca");
        let mut state = cluster(1, |_| Vec::new());
        let cluster = state.cluster.as_mut().expect("bootstrapped");
        cluster.id = "c1".into();
        cluster.ca_cert_pem = ca.cert_pem().to_owned();
        cluster.ca_key = Some(seal_ca_key(&key, &ca).expect("seal"));
        let json = serde_json::to_string(&*cluster).expect("encodes");
        assert!(!json.contains("PRIVATE KEY"), "the state holds no CA key in plain text");
        let opened = open_ca(cluster, &key).expect("opens");
        assert_eq!(opened.digest(), ca.digest());
        assert!(matches!(open_ca(cluster, &self::key()), Err(KeysError::Open { .. })));
    }
}
