//! Joining a cluster, from both ends.
//!
//! The joining node ([`join_cluster`]) parses the join token, dials the seed
//! trusting only the CA whose digest the token pins, and sends a proof of the
//! secret bound to that TLS session (never the secret), its name, address,
//! labels and *public* key. The seed ([`JoinService`]) checks the proof
//! against the secrets it opens, signs a certificate for that key with the
//! cluster CA, commits the node through Raft, which gives it its id, and
//! answers with its own proof of the secret. The joining node takes the
//! answer only with that proof: a removed node, whose secrets were rotated
//! away, can neither learn the token from a join nor pass for the cluster.
//! Nothing is written on the joining side until the seed has answered, and
//! nothing changes in the cluster unless the proof and the name are good.
//!
//! The seed answers a join before the caller has proved anything, so it
//! rate-limits joins per client address ([`JoinLimiter`]) and logs only the
//! caller's address, never what it sent, until the secret checks out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use roost_deploy::secrets::SecretsKey;
use roost_network::mesh::Key;
use roost_network::pki::constant_time_eq;
use roost_network::pki::{self, CaDigest, NodeKey};
use roost_network::tls::{ClientTls, PeerIdentity, TlsError};
use roost_network::token::{join_proof, JoinProof};
use roost_network::{Token, TokenKind};
use roost_proto::cluster::join_client::JoinClient;
use roost_proto::cluster::join_server;
use roost_proto::cluster::{JoinRequest, JoinResponse};
use roost_raft::state::{validate_name, NodeRole, WireguardPeer};
use roost_raft::workload::Resources;
use roost_raft::{Command, Consensus, NewNode, Rejection, Response};
use tokio::time::Instant;
use tonic::{Request, Status};

use super::api::{consensus_status, rejection_status, API_DEADLINE};
use super::identity::{DataDir, Identity, IdentityError, StoredIdentity};
use super::keys::{join_role_by_digest_proof, open_ca, open_join_by_proof};
use super::limit::Buckets;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("invalid join token")]
    Token(#[source] roost_network::token::TokenError),
    #[error("that is an admin token; `roost node join` needs the join token (print it with `roost node token`)")]
    AdminToken,
    #[error("invalid node name '{name}': {reason}; pass --name")]
    Name { name: String, reason: String },
    #[error(transparent)]
    Connect(roost_network::tls::TlsError),
    #[error("{seed} refused the join: {message}")]
    Refused { seed: String, code: tonic::Code, message: String },
    #[error("{seed} answered with a CA that does not match the token")]
    CaMismatch { seed: String },
    #[error("{seed} did not prove that it knows the cluster's current join token: it is not a current member (a removed node?), or the token is old (print the current one with `roost node token` on a member)")]
    SeedUnproven { seed: String },
    #[error("could not generate this node's key")]
    Key(#[source] pki::PkiError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// What a new node needs to join.
#[derive(Debug)]
pub struct JoinParams<'a> {
    pub seed: &'a str,
    pub token: &'a str,
    pub name: &'a str,
    pub address: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    /// How long to keep trying a seed that is not up yet.
    pub wait: Duration,
    pub resources: Resources,
    /// The WireGuard port, when the node runs WireGuard.
    pub wireguard_port: Option<u16>,
}

/// Joins through `seed` and stores the resulting identity in `dir`.
pub async fn join_cluster(dir: &DataDir, params: JoinParams<'_>) -> Result<Identity, JoinError> {
    let token = Token::parse(params.token).map_err(JoinError::Token)?;
    if token.kind != TokenKind::Join {
        return Err(JoinError::AdminToken);
    }
    validate_name(params.name).map_err(|reason| JoinError::Name { name: params.name.to_owned(), reason })?;
    let key = NodeKey::generate().map_err(JoinError::Key)?;
    // Made here, kept here: only the public half goes to the cluster.
    let wireguard_key = super::identity::generate_wireguard_key();
    let wireguard = params.wireguard_port.map(|port| super::wireguard_peer(&wireguard_key, params.address, port));
    let tls = ClientTls::anonymous(token.ca_digest).map_err(JoinError::Connect)?;
    let request = JoinRequest {
        secret: String::new(),
        name: params.name.to_owned(),
        address: params.address.to_owned(),
        labels: params.labels.clone().into_iter().collect(),
        public_key: key.public_key(),
        cpu_millis: params.resources.cpu_millis,
        memory_bytes: params.resources.memory_bytes,
        wireguard_public_key: wireguard.as_ref().map(|w| w.public_key.clone()).unwrap_or_default(),
        wireguard_endpoint: wireguard.map(|w| w.endpoint).unwrap_or_default(),
        proof: Vec::new(),
        digest_proof: Vec::new(),
    };
    // Nodes of a new cluster are often started together: wait for a seed
    // that is not up yet, or has no leader yet, rather than fail at once.
    let deadline = Instant::now() + params.wait;
    let mut delay = Duration::from_millis(200);
    let reply = loop {
        let error = match try_join(&tls, params.seed, request.clone(), &token.secret).await {
            Ok(reply) => break reply,
            Err(error) => error,
        };
        let transient = match &error {
            JoinError::Connect(TlsError::Connect { transient, .. }) => *transient,
            JoinError::Refused { code, .. } => *code == tonic::Code::Unavailable,
            _ => false,
        };
        if !transient || Instant::now() + delay >= deadline {
            return Err(error);
        }
        tracing::warn!(seed = %params.seed, "{error}; retrying in {delay:?}");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    };
    let ca_der = pki::cert_der_from_pem(&reply.ca_cert_pem)
        .map_err(|_| JoinError::CaMismatch { seed: params.seed.to_owned() })?;
    if CaDigest::of(&ca_der) != token.ca_digest {
        return Err(JoinError::CaMismatch { seed: params.seed.to_owned() });
    }
    let identity = Identity {
        stored: StoredIdentity {
            cluster_id: reply.cluster_id,
            node_id: reply.node_id,
            name: params.name.to_owned(),
            address: params.address.to_owned(),
            labels: params.labels.clone(),
            worker: reply.worker,
            former_ca_digests: Vec::new(),
        },
        ca_cert_pem: reply.ca_cert_pem,
        cert_pem: reply.node_cert_pem,
        key_pem: key.key_pem(),
        secrets_key: (!reply.worker).then_some(reply.secrets_key),
        wireguard_key,
    };
    dir.save(&identity)?;
    // Kept if the cluster's CA signed it (an older seed sends none);
    // otherwise, or if it cannot be written, the node asks for one once it
    // runs (`api_cert::run`), and serves the CLI from then on.
    let api_chain = &reply.api_cert_pem;
    if !api_chain.is_empty() && roost_network::tls::api_certificate_valid(&identity.ca_cert_pem, api_chain) {
        if let Err(error) = super::identity::write_private(&dir.api_cert(), api_chain) {
            tracing::warn!(error = %super::identity::error_chain(&error), "could not keep the API certificate the seed gave");
        }
    }
    Ok(identity)
}

/// One join through `seed`: proves `secret` on the TLS session it opens, and
/// takes the answer only if the seed proves it too on the same session.
async fn try_join(
    tls: &ClientTls,
    seed: &str,
    mut request: JoinRequest,
    secret: &str,
) -> Result<JoinResponse, JoinError> {
    let (channel, session) = tls.connect_bound(seed).await.map_err(JoinError::Connect)?;
    let refused = |status: Status| JoinError::Refused {
        seed: seed.to_owned(),
        code: status.code(),
        message: status.message().to_owned(),
    };
    let session =
        session.get().map(|s| s.exporter).ok_or_else(|| refused(Status::unavailable("the TLS session closed")))?;
    request.proof = join_proof(secret, &session, JoinProof::Joiner);
    request.digest_proof = join_proof(&pki::secret_digest(secret), &session, JoinProof::JoinerDigest);
    let reply = JoinClient::new(channel).join(request).await.map_err(refused)?.into_inner();
    if !constant_time_eq(&reply.seed_proof, &join_proof(secret, &session, JoinProof::Seed)) {
        return Err(JoinError::SeedUnproven { seed: seed.to_owned() });
    }
    Ok(reply)
}

/// Whether the join secrets are due to be replaced after a removal: until
/// they are, no join token admits anyone, nor is one printed.
pub fn rotation_due(state: &roost_raft::State) -> bool {
    state.cluster.as_ref().is_some_and(|c| c.join_rotation_due)
}

pub fn rotation_pending() -> Status {
    Status::unavailable(
        "a node was just removed and the join tokens are being replaced, which takes a few seconds; then print the new token with `roost node token`",
    )
}

fn wrong_secret() -> Status {
    Status::unauthenticated("wrong join token for this cluster: print the current one with `roost node token`")
}

/// The seed's side of a join.
pub struct JoinService {
    pub consensus: Arc<Consensus>,
    /// Opens the CA key, and is handed (as hex) to a node that may vote;
    /// `None` on a worker, which admits no one.
    pub secrets_key: Option<(Arc<SecretsKey>, String)>,
    pub limiter: JoinLimiter,
    /// How long the API certificate a new node gets lives.
    pub api_cert_lifetime: Duration,
}

/// A token bucket per client address: a burst of [`JOIN_BURST`] joins, then
/// one every [`JOIN_EVERY`]. A join signs a certificate and writes to Raft;
/// nobody needs more, and a guesser gets no further.
pub type JoinLimiter = Buckets<std::net::IpAddr>;
pub const JOIN_BURST: u32 = 10;
pub const JOIN_EVERY: Duration = Duration::from_secs(2);

pub fn join_limiter() -> JoinLimiter {
    Buckets::new(JOIN_BURST, JOIN_EVERY)
}

#[tonic::async_trait]
impl join_server::Join for JoinService {
    async fn join(&self, request: Request<JoinRequest>) -> Result<tonic::Response<JoinResponse>, Status> {
        let client = request.extensions().get::<PeerIdentity>().and_then(|p| p.remote_addr);
        if let Some(client) = client {
            if let Err(wait) = self.limiter.take(client.ip(), 1, std::time::Instant::now()) {
                tracing::debug!(%client, "join refused: rate limit");
                return Err(Status::resource_exhausted(format!(
                    "too many join attempts from {}; try again in {} s",
                    client.ip(),
                    wait.as_secs().max(1)
                )));
            }
        }
        let client = client.map_or_else(|| "unknown".to_owned(), |c| c.to_string());
        let session = request.extensions().get::<PeerIdentity>().and_then(|p| p.session);
        let request = request.into_inner();
        if !request.secret.is_empty() {
            return Err(Status::failed_precondition(
                "the joining node sent its join token itself, as roost versions before this one did: run this cluster's roost version on the new node",
            ));
        }
        let Some(session) = session else {
            return Err(Status::unauthenticated("a join needs a TLS 1.3 session to prove the token on"));
        };
        if self.consensus.state().read(rotation_due) {
            return Err(rotation_pending());
        }
        // A wrong secret is refused from local state, before it costs the
        // leader a round trip; names are checked against the latest state.
        let local = self
            .consensus
            .state()
            .read(|s| s.cluster.is_some().then(|| join_role_by_digest_proof(s, &request.digest_proof, &session)));
        if local == Some(None) {
            tracing::warn!(%client, "join refused: wrong secret");
            return Err(wrong_secret());
        }
        // As in Swarm, a node joins through a node that holds the keys; the
        // voters are named only to a caller with a good secret.
        let Some((secrets_key, secrets_key_hex)) = &self.secrets_key else {
            let voters = self.consensus.state().read(super::keys::voters_named);
            return Err(Status::failed_precondition(format!(
                "cannot join through a worker, which holds none of the cluster's keys; give a voter as the seed{voters}"
            )));
        };
        self.consensus.read_barrier(Instant::now() + API_DEADLINE).await.map_err(consensus_status)?;
        let cluster = self
            .consensus
            .state()
            .read(|s| s.cluster.clone())
            .ok_or_else(|| rejection_status(Rejection::NotBootstrapped))?;
        if cluster.join_rotation_due {
            return Err(rotation_pending());
        }
        // The token decides the role: a worker token makes a worker.
        let Some((role, secret)) = open_join_by_proof(&cluster, secrets_key, &request.proof, &session) else {
            tracing::warn!(%client, "join refused: wrong secret");
            return Err(wrong_secret());
        };
        if let Err(reason) = validate_name(&request.name) {
            return Err(rejection_status(Rejection::InvalidNodeName { name: request.name, reason }));
        }
        let labels: BTreeMap<String, String> = request.labels.clone().into_iter().collect();
        super::auth::join_labels(role, &labels).map_err(Status::invalid_argument)?;
        if let Err(message) = super::check_address(&request.address) {
            return Err(Status::invalid_argument(message));
        }
        let wireguard = match (request.wireguard_public_key.is_empty(), request.wireguard_endpoint.is_empty()) {
            (true, true) => None,
            (false, false) if Key::from_base64(&request.wireguard_public_key).is_ok() => {
                if let Err(message) = super::check_address(&request.wireguard_endpoint) {
                    return Err(Status::invalid_argument(format!("invalid WireGuard endpoint: {message}")));
                }
                Some(WireguardPeer {
                    public_key: request.wireguard_public_key.clone(),
                    endpoint: request.wireguard_endpoint.clone(),
                })
            }
            _ => {
                return Err(Status::invalid_argument(
                    "a WireGuard public key and endpoint must be given together, the key in base64",
                ))
            }
        };
        if self.consensus.state().read(|s| s.node_by_name(&request.name).is_some()) {
            return Err(rejection_status(Rejection::NodeNameTaken { name: request.name }));
        }
        let ca = open_ca(&cluster, secrets_key)?;
        let (cert_pem, serial, fingerprint) = ca
            .issue_for_public_key(&request.name, &request.public_key)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let api_cert_pem = ca
            .issue_api(&request.name, &request.public_key, &fingerprint, self.api_cert_lifetime)
            .map_err(|e| Status::internal(format!("could not issue the node's API certificate: {e}")))?;
        let node = NewNode {
            name: request.name.clone(),
            address: request.address.clone(),
            labels,
            cert_serial: serial.clone(),
            cert_fingerprint: fingerprint,
            resources: Resources { cpu_millis: request.cpu_millis, memory_bytes: request.memory_bytes },
            wireguard,
            role,
        };
        // Between voters, which both hold the secrets key: the leader checks
        // the secret again against its own state.
        let grant = roost_raft::Grant::Join { secret: secret.clone() };
        let response = self
            .consensus
            .propose_granted(Command::AddNode { node }, Some(grant), Instant::now() + API_DEADLINE)
            .await
            .map_err(consensus_status)?;
        let node_id = match response {
            Response::NodeAdded { id } => id,
            Response::Rejected(rejection) => return Err(rejection_status(rejection)),
            other => return Err(Status::internal(format!("unexpected answer to a join: {other:?}"))),
        };
        tracing::info!(node = %request.name, id = node_id, address = %request.address, ?role, "node joined");
        Ok(tonic::Response::new(JoinResponse {
            node_id,
            cluster_id: cluster.id,
            ca_cert_pem: cluster.ca_cert_pem,
            node_cert_pem: cert_pem,
            cert_serial: serial,
            // Only a node that may vote holds the keys.
            secrets_key: if role == NodeRole::Voter { secrets_key_hex.clone() } else { String::new() },
            worker: role == NodeRole::Worker,
            seed_proof: join_proof(&secret, &session, JoinProof::Seed),
            api_cert_pem,
        }))
    }
}
