//! The public API (`roost.api.v1.Control`), served by every node.
//!
//! Each handler turns a request into a proposal or a read of the replicated
//! state. Writes go through [`Consensus::propose`], which forwards to the
//! leader; reads first pass [`Consensus::read_barrier`] unless the caller
//! asked for `stale`. Conversions between wire and domain types live here.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use roost_deploy::engine::Engine;
use roost_deploy::secrets::SecretsKey;
use roost_network::{Token, TokenKind};
use roost_proto::api::control_server::Control;
use roost_proto::api::{
    AddCertificateRequest, App as WireApp, AppRequest, AppStatus, CaRotationStatus, Certificate as WireCertificate,
    ChangeResponse, CreateAppRequest, CreateTokenRequest, CreatedToken, DeployRequest, DestroyAppRequest,
    DestroyAppResponse, GetAppRequest, GetCaRotationRequest, GetCertificateRequest, GetJoinTokenRequest,
    GetJoinTokenResponse, GetNodeRequest, GetStatusRequest, LabelNodeRequest, ListAppsRequest, ListAppsResponse,
    ListCertificatesRequest, ListCertificatesResponse, ListNodesRequest, ListNodesResponse, ListReleasesRequest,
    ListReleasesResponse, ListSecretsResponse, ListTokensRequest, ListTokensResponse, LogsRequest, MeshPeer,
    Node as WireNode, NodeDetails, ReadOptions, RemoveCertificateRequest, RemoveCertificateResponse, RemoveNodeRequest,
    RemoveNodeResponse, RevokeTokenRequest, RevokeTokenResponse, RollbackRequest, RotateCaRequest, RotateTokenRequest,
    ScaleRequest, ScaleVmRequest, SetSecretsRequest, UnsetSecretsRequest, VersionRequest, VersionResponse,
};
use roost_proto::cluster::peer_client::PeerClient;
use roost_proto::cluster::{MeshStatusRequest, MeshStatusResponse};
use roost_raft::state::{validate_name, Access, App, NodeRecord, NodeRole};
use roost_raft::{Command, Consensus, ConsensusError, Grant, NodeId, Rejection, Response};
use tokio::time::Instant;
use tonic::{Request, Status, Streaming};

use super::deploys::{DeployStream, LogLineStream};

use super::auth::principal;
use super::channels::NodeChannels;
use super::keys::{self, KeysError};
use super::liveness::{cluster_liveness, Liveness, Seen};

/// How long an API call waits for a leader before it reports the cluster
/// unavailable. Long enough to ride out an election.
pub const API_DEADLINE: Duration = Duration::from_secs(8);

#[derive(Clone)]
pub struct ControlService {
    pub consensus: Arc<Consensus>,
    pub liveness: Arc<Liveness>,
    pub channels: Arc<NodeChannels>,
    /// What the node presents and trusts (the CAs an API token may pin).
    pub tls: Arc<roost_network::tls::NodeTls>,
    /// What token expiry is judged by.
    pub clock: Arc<super::clock::ClusterClock>,
    /// The sessions of this node's API connections whose client proved its
    /// token's key (`auth::authenticate` notes them).
    pub proofs: Arc<super::auth::SessionProofs>,
    pub node_name: String,
    pub engine: Engine,
    /// `None` on a worker.
    pub secrets_key: Option<Arc<SecretsKey>>,
    pub plane: super::mesh::SharedPlane,
    /// The node's instance network, once the mesh has made it.
    pub network: tokio::sync::watch::Receiver<roost_deploy::agent::NetworkStatus>,
    /// One image build at a time on this node.
    pub builds: Arc<tokio::sync::Semaphore>,
    /// The largest build context or image a deploy may upload (`--max-upload`).
    pub max_upload: u64,
}

pub fn consensus_status(error: ConsensusError) -> Status {
    match error {
        ConsensusError::Protocol(_) => Status::internal(error.to_string()),
        // Not Unavailable: the change may yet be applied, so retrying it
        // blindly could apply it twice.
        ConsensusError::Unconfirmed { .. } => Status::deadline_exceeded(error.to_string()),
        ConsensusError::NoLeader { .. } | ConsensusError::Stopped | ConsensusError::NotLeader => {
            Status::unavailable(error.to_string())
        }
        ConsensusError::TooLarge { .. } => Status::invalid_argument(error.to_string()),
        ConsensusError::Refused(_) => Status::permission_denied(error.to_string()),
    }
}

pub fn rejection_status(rejection: Rejection) -> Status {
    let message = rejection.to_string();
    match rejection {
        Rejection::AppExists { .. } | Rejection::NodeNameTaken { .. } | Rejection::TokenExists { .. } => {
            Status::already_exists(message)
        }
        Rejection::TokenNotFound { .. } => Status::not_found(message),
        Rejection::InvalidTokenName { .. } | Rejection::TokenSecretTaken => Status::invalid_argument(message),
        Rejection::TooManyTokens { .. } | Rejection::InitialAdminToken => Status::failed_precondition(message),
        Rejection::AppNotFound { .. } | Rejection::NodeNotFound { .. } | Rejection::CertificateNotFound { .. } => {
            Status::not_found(message)
        }
        Rejection::CertificateExists { .. } => Status::already_exists(message),
        Rejection::InvalidDomain { .. } => Status::invalid_argument(message),
        Rejection::InvalidAppName { .. } | Rejection::InvalidNodeName { .. } => Status::invalid_argument(message),
        Rejection::InvalidLabel { .. } | Rejection::TooManyLabels { .. } => Status::invalid_argument(message),
        Rejection::RevokedCertificate => Status::permission_denied(message),
        Rejection::NotBootstrapped => Status::unavailable(message),
        Rejection::ReleaseNotFound { .. } | Rejection::SecretNotFound { .. } | Rejection::UnknownGroup { .. } => {
            Status::not_found(message)
        }
        Rejection::InvalidRelease { .. }
        | Rejection::TooManyInstances { .. }
        | Rejection::SecretTooLarge { .. }
        | Rejection::TooManySecrets { .. }
        | Rejection::AppSecretsTooLarge { .. }
        | Rejection::InvalidMeshRange { .. }
        | Rejection::InvalidAddress { .. } => Status::invalid_argument(message),
        Rejection::AlreadyBootstrapped
        | Rejection::LastNode { .. }
        | Rejection::UnsupportedVersion { .. }
        | Rejection::DeployInProgress { .. }
        | Rejection::NoRelease { .. }
        | Rejection::NothingToRollBackTo { .. }
        | Rejection::AppSuspended { .. }
        | Rejection::AlreadyInState { .. }
        | Rejection::MeshFull { .. }
        | Rejection::PortTaken { .. }
        | Rejection::CaRotationInProgress
        | Rejection::NoCaRotation
        | Rejection::CaNotNew
        | Rejection::CaRotationIncomplete { .. }
        | Rejection::CertificateTaken => Status::failed_precondition(message),
    }
}

fn app_to_wire(app: &App) -> WireApp {
    WireApp { name: app.name.clone(), created_at_ms: app.created_at }
}

impl ControlService {
    /// The secrets key, which only a node that may vote holds: a worker
    /// refuses, naming the voters to ask instead (as a Swarm worker does).
    pub(super) fn secrets_key(&self) -> Result<&SecretsKey, Status> {
        super::auth::require_key(&self.secrets_key, self.consensus.state())
    }

    /// Asks the node at `address` for its side of the mesh.
    async fn remote_mesh_status(&self, address: &str) -> Result<MeshStatusResponse, Status> {
        let channel = self.channels.get(address).map_err(|e| Status::unavailable(e.to_string()))?;
        let mut request = Request::new(MeshStatusRequest {});
        request.set_timeout(Duration::from_secs(3));
        let reply = PeerClient::new(channel).mesh_status(request).await;
        reply
            .map(tonic::Response::into_inner)
            .map_err(|status| Status::unavailable(format!("the node did not answer: {}", status.message())))
    }

    pub(super) async fn propose(&self, command: Command) -> Result<Response, Status> {
        // The caller's grant goes along, should the leader be another node
        // (which checks it again). It is checked here too, now, for this
        // node may be the leader, and the token may have been revoked or
        // have expired since the call began (a long build).
        if let Some(caller) = self.caller_now()? {
            caller.allow(command.access())?;
        }
        let grant = super::auth::current_grant();
        self.consensus
            .state()
            .read(|s| super::auth::bound_target_allows(grant.as_ref(), &command, s))
            .map_err(Status::permission_denied)?;
        // A worker takes changes to one app only (the leader would refuse
        // the rest from it anyway): say so, and name the voters.
        if !super::auth::worker_may_propose(&command) {
            let state = self.consensus.state();
            if state.read(|s| s.is_worker(self.consensus.id())) {
                return Err(Status::failed_precondition(format!(
                    "this node is a worker: it takes reads and changes to apps (deploy, scale, restart, rollback); this needs {}, so run it against a voter instead (--endpoint){}",
                    command.access(),
                    state.read(super::keys::voters_named)
                )));
            }
        }
        let response = self
            .consensus
            .propose_granted(command, grant, Instant::now() + API_DEADLINE)
            .await
            .map_err(consensus_status)?;
        match response {
            Response::Rejected(rejection) => Err(rejection_status(rejection)),
            other => Ok(other),
        }
    }

    /// Waits until this node's state holds every write committed before the
    /// call (unless the caller asked for a `stale` read), then checks the
    /// caller's token again against that state: a token revoked, rotated or
    /// expired a moment ago is refused by every node, not only by those
    /// that had applied the revocation when the call arrived.
    pub(super) async fn barrier(&self, read: Option<ReadOptions>) -> Result<(), Status> {
        if read.is_some_and(|r| r.stale) {
            return Ok(());
        }
        self.consensus.read_barrier(Instant::now() + API_DEADLINE).await.map_err(consensus_status)?;
        self.caller_now()?;
        Ok(())
    }

    /// The caller's token resolved against this node's state as it is now
    /// (it may have been revoked, rotated or have expired since the call
    /// began); `None` for work no user's token asked for.
    fn caller_now(&self) -> Result<Option<super::auth::Principal>, Status> {
        match super::auth::current_grant() {
            Some(grant @ (Grant::Token { .. } | Grant::Signed { .. })) => super::auth::resolve_grant(
                self.consensus.state(),
                &self.tls.current().trusted,
                &grant,
                None,
                &self.clock,
                super::auth::SIGNED_GRANT_AGE_MS,
                super::auth::Proofs::Serving(&self.proofs),
            )
            .map(Some),
            _ => Ok(None),
        }
    }

    /// Each node's role, from Raft's membership as this node knows it.
    fn roles(&self) -> impl Fn(NodeId) -> &'static str {
        let metrics = self.consensus.raft().metrics().borrow().clone();
        let workers = self.consensus.state().read(|s| s.workers());
        move |id| {
            let membership = metrics.membership_config.membership();
            if metrics.current_leader == Some(id) {
                "leader"
            } else if membership.voter_ids().any(|v| v == id) {
                "voter"
            } else if workers.contains(&id) {
                "worker"
            } else if membership.get_node(&id).is_some() {
                "learner"
            } else {
                "joining"
            }
        }
    }
}

fn node_to_wire(node: &NodeRecord, role: &str, seen: Option<&Seen>) -> WireNode {
    let state = match seen {
        Some(seen) if seen.up => "up",
        // Joined recently and never reported to this leader: it reports once it
        // has caught up with the cluster and can serve.
        Some(seen) if seen.starting => "starting",
        Some(_) => "down",
        None => "unknown",
    };
    WireNode {
        id: node.id,
        name: node.name.clone(),
        address: node.address.clone(),
        role: role.into(),
        state: state.into(),
        labels: node.labels.clone().into_iter().collect(),
        cert_serial: node.cert_serial.clone(),
        joined_at_ms: node.joined_at,
        last_seen_ms_ago: seen.filter(|s| s.ago != Duration::MAX).map(|s| s.ago.as_millis() as u64),
        subnet: node.subnet.map(|s| s.to_string()).unwrap_or_default(),
        wireguard_public_key: node.wireguard.as_ref().map(|w| w.public_key.clone()).unwrap_or_default(),
        wireguard_endpoint: node.wireguard.as_ref().map(|w| w.endpoint.clone()).unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn version(&self, _request: Request<VersionRequest>) -> Result<tonic::Response<VersionResponse>, Status> {
        let cluster_id = self.consensus.state().read(|s| s.cluster.as_ref().map(|c| c.id.clone())).unwrap_or_default();
        Ok(tonic::Response::new(VersionResponse {
            version: crate::VERSION.into(),
            node_name: self.node_name.clone(),
            node_id: self.consensus.id(),
            cluster_id,
        }))
    }

    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<tonic::Response<ListNodesResponse>, Status> {
        principal(&request)?.allow(Access::ReadCluster)?;
        self.barrier(request.into_inner().read).await?;
        let nodes: Vec<NodeRecord> = self.consensus.state().read(|s| s.nodes.values().cloned().collect());
        let seen = cluster_liveness(&self.consensus, &self.liveness, &self.channels).await.unwrap_or_default();
        let role = self.roles();
        let nodes = nodes.iter().map(|n| node_to_wire(n, role(n.id), seen.get(&n.id))).collect();
        Ok(tonic::Response::new(ListNodesResponse { nodes }))
    }

    async fn get_node(&self, request: Request<GetNodeRequest>) -> Result<tonic::Response<NodeDetails>, Status> {
        principal(&request)?.allow(Access::ReadCluster)?;
        let wanted = request.into_inner().node;
        self.barrier(None).await?;
        let (node, names) = self.consensus.state().read(|s| {
            let names: HashMap<String, String> = s
                .nodes
                .values()
                .filter_map(|n| Some((n.wireguard.as_ref()?.public_key.clone(), n.name.clone())))
                .collect();
            (s.find_node(&wanted).cloned(), names)
        });
        let node = node.ok_or_else(|| rejection_status(Rejection::NodeNotFound { node: wanted.clone() }))?;
        let seen = cluster_liveness(&self.consensus, &self.liveness, &self.channels).await.unwrap_or_default();
        let status = if node.id == self.consensus.id() {
            super::mesh::status(&self.plane).await
        } else {
            self.remote_mesh_status(&node.address).await
        };
        let mut details = NodeDetails {
            node: Some(node_to_wire(&node, self.roles()(node.id), seen.get(&node.id))),
            mesh_address: node.subnet.map(|s| roost_network::mesh::gateway(s).to_string()).unwrap_or_default(),
            ..Default::default()
        };
        match status {
            Ok(status) => {
                details.wireguard = status.wireguard;
                details.interface = status.interface;
                details.peers = status
                    .peers
                    .into_iter()
                    .map(|peer| MeshPeer {
                        node: names.get(&peer.public_key).cloned().unwrap_or_default(),
                        public_key: peer.public_key,
                        endpoint: peer.endpoint,
                        allowed_ips: peer.allowed_ips,
                        handshake_ms_ago: peer.handshake_ms_ago,
                        rx_bytes: peer.rx_bytes,
                        tx_bytes: peer.tx_bytes,
                    })
                    .collect();
            }
            Err(status) => details.peers_error = status.message().to_owned(),
        }
        Ok(tonic::Response::new(details))
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<tonic::Response<RemoveNodeResponse>, Status> {
        principal(&request)?.allow(Access::Admin)?;
        let wanted = request.into_inner().node;
        self.barrier(None).await?;
        let node = self
            .consensus
            .state()
            .read(|s| s.find_node(&wanted).cloned())
            .ok_or_else(|| rejection_status(Rejection::NodeNotFound { node: wanted.clone() }))?;
        // Only a node holding the keys removes one: the leader then rotates
        // the join secrets (`membership::rotate_join_secrets`) once the node
        // is out of Raft's membership, so it never receives the new ones.
        self.secrets_key()?;
        // What it was: once it is out, it is none.
        let role = self.roles()(node.id);
        let remove = Command::RemoveNode { id: node.id, new_join_secret: None, new_worker_secret: None, rotate: None };
        self.propose(remove).await?;
        tracing::info!(node = %node.name, id = node.id, "node removed from the cluster");
        Ok(tonic::Response::new(RemoveNodeResponse { removed: Some(node_to_wire(&node, role, None)) }))
    }

    async fn label_node(&self, request: Request<LabelNodeRequest>) -> Result<tonic::Response<WireNode>, Status> {
        principal(&request)?.allow(Access::Admin)?;
        let LabelNodeRequest { node: wanted, set, remove } = request.into_inner();
        let set: BTreeMap<String, String> = set.into_iter().collect();
        roost_raft::state::validate_label_change(&set, &remove).map_err(Status::invalid_argument)?;
        self.barrier(None).await?;
        let id = self
            .consensus
            .state()
            .read(|s| s.find_node(&wanted).map(|n| n.id))
            .ok_or_else(|| rejection_status(Rejection::NodeNotFound { node: wanted.clone() }))?;
        self.propose(Command::LabelNode { id, set, remove }).await?;
        // The leader applied it; this node may not have yet.
        self.barrier(None).await?;
        let node = self
            .consensus
            .state()
            .read(|s| s.nodes.get(&id).cloned())
            .ok_or_else(|| rejection_status(Rejection::NodeNotFound { node: wanted }))?;
        tracing::info!(node = %node.name, id, labels = ?node.labels, "node labels changed");
        let seen = cluster_liveness(&self.consensus, &self.liveness, &self.channels).await.unwrap_or_default();
        Ok(tonic::Response::new(node_to_wire(&node, self.roles()(id), seen.get(&id))))
    }

    async fn get_join_token(
        &self,
        request: Request<GetJoinTokenRequest>,
    ) -> Result<tonic::Response<GetJoinTokenResponse>, Status> {
        principal(&request)?.allow(Access::Admin)?;
        let role = match request.get_ref().role.as_str() {
            "" | "voter" => NodeRole::Voter,
            "worker" => NodeRole::Worker,
            other => {
                return Err(Status::invalid_argument(format!("unknown role '{other}': use voter or worker")));
            }
        };
        self.barrier(None).await?;
        // Never the secrets a node just removed knows.
        if self.consensus.state().read(super::join::rotation_due) {
            return Err(super::join::rotation_pending());
        }
        let cluster = self
            .consensus
            .state()
            .read(|s| s.cluster.clone())
            .ok_or_else(|| rejection_status(Rejection::NotBootstrapped))?;
        let secret = match keys::open_join_secret(&cluster, role, self.secrets_key()?) {
            Err(KeysError::Missing { .. }) => {
                return Err(Status::failed_precondition(
                    "this cluster was made before Roost had workers and has no worker token until a node is removed (a node joined with the voter token may vote)",
                ))
            }
            other => other?,
        };
        // The CA the cluster has now, which a joining node pins.
        let ca_digest = keys::ca_digest(&cluster.ca_cert_pem)?;
        let token = Token { kind: TokenKind::Join, ca_digest, secret };
        Ok(tonic::Response::new(GetJoinTokenResponse { token: token.to_string() }))
    }

    async fn create_app(&self, request: Request<CreateAppRequest>) -> Result<tonic::Response<WireApp>, Status> {
        principal(&request)?.allow(Access::Admin)?;
        let name = request.into_inner().name;
        if let Err(reason) = validate_name(&name) {
            return Err(rejection_status(Rejection::InvalidAppName { name, reason }));
        }
        match self.propose(Command::CreateApp { name: name.clone() }).await? {
            Response::AppCreated { app } => {
                tracing::info!(app = %app.name, "app created");
                Ok(tonic::Response::new(app_to_wire(&app)))
            }
            other => Err(Status::internal(format!("unexpected answer to create app: {other:?}"))),
        }
    }

    async fn list_apps(&self, request: Request<ListAppsRequest>) -> Result<tonic::Response<ListAppsResponse>, Status> {
        // A token confined to one app sees that app alone.
        let scope = principal(&request)?.scope;
        self.barrier(request.into_inner().read).await?;
        let apps = self
            .consensus
            .state()
            .read(|s| s.apps.values().filter(|a| scope.allows(Access::ReadApp(&a.name))).map(app_to_wire).collect());
        Ok(tonic::Response::new(ListAppsResponse { apps }))
    }

    async fn get_app(&self, request: Request<GetAppRequest>) -> Result<tonic::Response<WireApp>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        caller.allow(Access::ReadApp(&request.name))?;
        self.barrier(request.read).await?;
        self.consensus
            .state()
            .read(|s| s.apps.get(&request.name).map(app_to_wire))
            .map(tonic::Response::new)
            .ok_or_else(|| rejection_status(Rejection::AppNotFound { name: request.name }))
    }

    async fn destroy_app(
        &self,
        request: Request<DestroyAppRequest>,
    ) -> Result<tonic::Response<DestroyAppResponse>, Status> {
        principal(&request)?.allow(Access::Admin)?;
        let name = request.into_inner().name;
        self.propose(Command::DestroyApp { name: name.clone() }).await?;
        tracing::info!(app = %name, "app destroyed");
        Ok(tonic::Response::new(DestroyAppResponse {}))
    }

    async fn suspend_app(&self, request: Request<AppRequest>) -> Result<tonic::Response<ChangeResponse>, Status> {
        let caller = principal(&request)?;
        let app = request.into_inner().app;
        caller.allow(Access::WriteApp(&app))?;
        let response = self.change_app(Command::SuspendApp { name: app.clone() }).await?;
        tracing::info!(%app, "app suspended");
        Ok(tonic::Response::new(response))
    }

    async fn resume_app(&self, request: Request<AppRequest>) -> Result<tonic::Response<ChangeResponse>, Status> {
        let caller = principal(&request)?;
        let app = request.into_inner().app;
        caller.allow(Access::WriteApp(&app))?;
        let response = self.change_app(Command::ResumeApp { name: app.clone() }).await?;
        tracing::info!(%app, "app resumed");
        Ok(tonic::Response::new(response))
    }

    async fn restart_app(&self, request: Request<AppRequest>) -> Result<tonic::Response<ChangeResponse>, Status> {
        let caller = principal(&request)?;
        let app = request.into_inner().app;
        caller.allow(Access::WriteApp(&app))?;
        let response = self.change_app(Command::Restart { app: app.clone() }).await?;
        tracing::info!(%app, "app restarting");
        Ok(tonic::Response::new(response))
    }

    type DeployStream = DeployStream;

    async fn deploy(
        &self,
        request: Request<Streaming<DeployRequest>>,
    ) -> Result<tonic::Response<Self::DeployStream>, Status> {
        let caller = principal(&request)?;
        self.deploy_stream(caller, request.into_inner()).await.map(tonic::Response::new)
    }

    async fn get_status(&self, request: Request<GetStatusRequest>) -> Result<tonic::Response<AppStatus>, Status> {
        let caller = principal(&request)?;
        let r = request.into_inner();
        caller.allow(Access::ReadApp(&r.app))?;
        ControlService::get_status(self, r).await.map(tonic::Response::new)
    }

    async fn list_releases(
        &self,
        request: Request<ListReleasesRequest>,
    ) -> Result<tonic::Response<ListReleasesResponse>, Status> {
        let caller = principal(&request)?;
        let r = request.into_inner();
        caller.allow(Access::ReadApp(&r.app))?;
        ControlService::list_releases(self, r).await.map(tonic::Response::new)
    }

    async fn rollback(&self, request: Request<RollbackRequest>) -> Result<tonic::Response<ChangeResponse>, Status> {
        let caller = principal(&request)?;
        let r = request.into_inner();
        caller.allow(Access::WriteApp(&r.app))?;
        ControlService::rollback(self, r).await.map(tonic::Response::new)
    }

    async fn scale(&self, request: Request<ScaleRequest>) -> Result<tonic::Response<ChangeResponse>, Status> {
        let caller = principal(&request)?;
        let r = request.into_inner();
        caller.allow(Access::WriteApp(&r.app))?;
        ControlService::scale(self, r).await.map(tonic::Response::new)
    }

    async fn scale_vm(&self, request: Request<ScaleVmRequest>) -> Result<tonic::Response<ChangeResponse>, Status> {
        let caller = principal(&request)?;
        let r = request.into_inner();
        caller.allow(Access::WriteApp(&r.app))?;
        ControlService::scale_vm(self, r).await.map(tonic::Response::new)
    }

    async fn set_secrets(
        &self,
        request: Request<SetSecretsRequest>,
    ) -> Result<tonic::Response<ChangeResponse>, Status> {
        let caller = principal(&request)?;
        let r = request.into_inner();
        caller.allow(Access::WriteApp(&r.app))?;
        ControlService::set_secrets(self, r).await.map(tonic::Response::new)
    }

    async fn unset_secrets(
        &self,
        request: Request<UnsetSecretsRequest>,
    ) -> Result<tonic::Response<ChangeResponse>, Status> {
        let caller = principal(&request)?;
        let r = request.into_inner();
        caller.allow(Access::WriteApp(&r.app))?;
        ControlService::unset_secrets(self, r).await.map(tonic::Response::new)
    }

    async fn list_secrets(&self, request: Request<AppRequest>) -> Result<tonic::Response<ListSecretsResponse>, Status> {
        let caller = principal(&request)?;
        let r = request.into_inner();
        caller.allow(Access::ReadApp(&r.app))?;
        ControlService::list_secrets(self, r).await.map(tonic::Response::new)
    }

    async fn add_certificate(
        &self,
        request: Request<AddCertificateRequest>,
    ) -> Result<tonic::Response<WireCertificate>, Status> {
        principal(&request)?.allow(Access::Admin)?;
        ControlService::add_certificate(self, request.into_inner()).await.map(tonic::Response::new)
    }

    async fn list_certificates(
        &self,
        request: Request<ListCertificatesRequest>,
    ) -> Result<tonic::Response<ListCertificatesResponse>, Status> {
        let caller = principal(&request)?;
        let r = request.into_inner();
        caller.allow(if r.app.is_empty() { Access::ReadCluster } else { Access::ReadApp(&r.app) })?;
        ControlService::list_certificates(self, r).await.map(tonic::Response::new)
    }

    async fn get_certificate(
        &self,
        request: Request<GetCertificateRequest>,
    ) -> Result<tonic::Response<WireCertificate>, Status> {
        principal(&request)?.allow(Access::ReadCluster)?;
        ControlService::get_certificate(self, request.into_inner()).await.map(tonic::Response::new)
    }

    async fn remove_certificate(
        &self,
        request: Request<RemoveCertificateRequest>,
    ) -> Result<tonic::Response<RemoveCertificateResponse>, Status> {
        principal(&request)?.allow(Access::Admin)?;
        ControlService::remove_certificate(self, request.into_inner()).await?;
        Ok(tonic::Response::new(RemoveCertificateResponse {}))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<tonic::Response<CreatedToken>, Status> {
        principal(&request)?.allow(Access::Admin)?;
        ControlService::create_token(self, request.into_inner()).await.map(tonic::Response::new)
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<tonic::Response<ListTokensResponse>, Status> {
        principal(&request)?.allow(Access::Admin)?;
        ControlService::list_tokens(self, request.into_inner()).await.map(tonic::Response::new)
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<tonic::Response<RevokeTokenResponse>, Status> {
        principal(&request)?.allow(Access::Admin)?;
        ControlService::revoke_token(self, request.into_inner()).await?;
        Ok(tonic::Response::new(RevokeTokenResponse {}))
    }

    async fn rotate_token(
        &self,
        request: Request<RotateTokenRequest>,
    ) -> Result<tonic::Response<CreatedToken>, Status> {
        principal(&request)?.allow(Access::Admin)?;
        ControlService::rotate_token(self, request.into_inner()).await.map(tonic::Response::new)
    }

    async fn rotate_ca(&self, request: Request<RotateCaRequest>) -> Result<tonic::Response<CaRotationStatus>, Status> {
        principal(&request)?.allow(Access::Admin)?;
        ControlService::rotate_ca(self).await.map(tonic::Response::new)
    }

    async fn get_ca_rotation(
        &self,
        request: Request<GetCaRotationRequest>,
    ) -> Result<tonic::Response<CaRotationStatus>, Status> {
        principal(&request)?.allow(Access::Admin)?;
        ControlService::ca_rotation_status(self, true).await.map(tonic::Response::new)
    }

    type LogsStream = LogLineStream;

    async fn logs(&self, request: Request<LogsRequest>) -> Result<tonic::Response<Self::LogsStream>, Status> {
        let caller = principal(&request)?;
        let r = request.into_inner();
        caller.allow(Access::ReadApp(&r.app))?;
        ControlService::logs(self, r).await.map(tonic::Response::new)
    }
}
