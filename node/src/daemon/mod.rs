//! A running Roost node.
//!
//! [`Node::start`] does, in order: bind the one port; resolve the identity
//! (resume what the data directory holds, or create a cluster, or join one);
//! start Raft; serve the Raft, Peer, Join and Control services over TLS;
//! finish the cluster's bootstrap if this is its first node; then start the
//! background loops (heartbeats, membership, removal watch). Every task
//! listens to one cancellation token; [`RunningNode::wait`] returns when it
//! fires or when the node learns it was removed, after draining.

pub mod api;
pub mod api_cert;
pub mod auth;
pub mod ca;
pub mod certs;
pub mod channels;
pub mod clock;
pub mod deploys;
pub mod edge;
pub mod follow;
pub mod identity;
pub mod join;
pub mod keys;
pub mod limit;
pub mod liveness;
pub mod membership;
pub mod mesh;
pub mod tokens;
pub mod workloads;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use roost_deploy::agent::{Agent, NetworkStatus, SecretOpener};
use roost_deploy::controller::ControllerConfig;
use roost_deploy::engine::Engine;
use roost_deploy::secrets::SecretsKey;
use roost_network::pki::{self, secret_digest, ClusterCa};
use roost_network::tls::{self, ClientTls};
use roost_network::{Token, TokenKind};
use roost_proto::api::control_server::ControlServer;
use roost_proto::cluster::agent_server::AgentServer;
use roost_proto::cluster::join_server::JoinServer;
use roost_proto::cluster::keys_server::KeysServer;
use roost_proto::cluster::peer_server::PeerServer;
use roost_raft::consensus::now_millis;
use roost_raft::service::RaftService;
use roost_raft::state::{
    default_mesh_range, validate_name, AcmeSettings, ClusterInfo, NodeRole, WireguardPeer, FIRST_NODE_ID,
};
use roost_raft::workload::Resources;
use roost_raft::{Command, Consensus, NewNode, RaftNode, Response, Timings};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tracing::Instrument;

use self::channels::NodeChannels;
pub use self::deploys::DEFAULT_MAX_UPLOAD;
use self::identity::{check_resume, DataDir, Identity, IdentityError, StoredIdentity};
pub use self::liveness::LivenessConfig;
use self::liveness::{HeartbeatEnd, Liveness};
pub use self::mesh::MeshSettings;
use self::mesh::{MeshContext, SharedPlane};

/// How a node comes to exist the first time it starts.
#[derive(Clone, Debug)]
pub enum Start {
    /// Create a new cluster with this node as its first member.
    Init,
    /// Join the cluster that `seed` belongs to.
    Join { seed: String, token: String },
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// HOST:PORT to bind; port 0 picks a free one.
    pub listen: String,
    /// HOST:PORT others use to reach this node; defaults to the bound address.
    pub advertise: Option<String>,
    /// The name given on the command line, if any.
    pub name: Option<String>,
    /// The name a new node takes when none is given (the caller's hostname).
    pub default_name: String,
    pub labels: BTreeMap<String, String>,
    pub start: Start,
    pub timings: Timings,
    pub liveness: LivenessConfig,
    /// How long `join` keeps trying a seed that is not up yet.
    pub join_wait: Duration,
    /// What this node offers to instances (detected, or --cpus/--memory).
    pub resources: Resources,
    /// The Docker engine to use; None: the local socket.
    pub docker_host: Option<String>,
    pub controller: ControllerConfig,
    pub mesh: MeshSettings,
    /// What a new cluster is made with (`node init`); ignored on restart and join.
    pub cluster: ClusterSettings,
    /// Where this node's edge listens.
    pub edge: EdgeListen,
    /// Caps and timeouts on the node port's connections.
    pub connection_limits: tls::ConnectionLimits,
    /// The largest build context or image a deploy may upload to this node.
    pub max_upload: u64,
    /// How long the API certificates this node signs live (a voter's
    /// setting: `--api-cert-lifetime`).
    pub api_cert_lifetime: Duration,
}

/// How long a node's API certificate lives by default: a node renews its
/// own once a third of it has passed, and a removed node's data directory
/// passes for a node with the CLI until its last one expires.
pub const DEFAULT_API_CERT_LIFETIME: Duration = Duration::from_secs(6 * 3600);

/// The cluster-wide settings `node init` fixes.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// The private range of the mesh (`--mesh-range`).
    pub mesh_range: Ipv4Net,
    /// Apps are served as APP.DOMAIN (`--domain`).
    pub domain: String,
    /// Where certificates of custom domains come from (`--acme-*`).
    pub acme: AcmeSettings,
}

/// Let's Encrypt's production directory, where certificates come from
/// unless `--acme-directory` says otherwise.
pub const DEFAULT_ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            mesh_range: default_mesh_range(),
            domain: roost_raft::state::DEFAULT_DOMAIN.to_owned(),
            acme: AcmeSettings { directory: DEFAULT_ACME_DIRECTORY.to_owned(), email: None, ca_pem: None },
        }
    }
}

/// Where the edge proxy listens (`--http-listen`, `--https-listen`), and
/// with how many worker threads.
#[derive(Clone, Debug)]
pub struct EdgeListen {
    pub http: String,
    pub https: String,
    pub workers: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not listen on {listen}")]
    Listen {
        listen: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--listen {listen} binds every interface; pass --advertise HOST:PORT with an address other nodes can reach"
    )]
    NeedAdvertise { listen: String },
    #[error("invalid --advertise: {0}")]
    Advertise(String),
    #[error("invalid --mesh-range {range}: {reason}")]
    MeshRange { range: String, reason: String },
    #[error("invalid --domain '{domain}': {reason}")]
    Domain { domain: String, reason: String },
    #[error(transparent)]
    Edge(#[from] roost_network::edge::EdgeError),
    #[error("invalid node name '{name}': {reason}; pass --name")]
    Name { name: String, reason: String },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Join(#[from] join::JoinError),
    #[error("invalid join token")]
    Token(#[from] roost_network::token::TokenError),
    #[error("the certificates in the data directory are unusable")]
    Tls(#[from] tls::TlsError),
    #[error("could not create the cluster's certificates")]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Raft(Box<roost_raft::consensus::StartError>),
    #[error("could not create the cluster: {0}")]
    Bootstrap(String),
    #[error("Roost runs apps with Docker")]
    Docker(#[from] roost_deploy::engine::EngineError),
    #[error("the secrets key in the data directory is unusable")]
    SecretsKey(#[from] roost_deploy::secrets::SecretsError),
}

impl From<roost_raft::consensus::StartError> for StartError {
    fn from(error: roost_raft::consensus::StartError) -> Self {
        // Boxed: openraft's errors are large and this one is rare.
        StartError::Raft(Box::new(error))
    }
}

/// Why a node stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    Shutdown,
    /// The cluster removed this node; its certificate is revoked.
    Removed,
}

/// The two tokens a new cluster is born with; shown to the user once.
#[derive(Clone, Debug)]
pub struct InitTokens {
    pub join: Token,
    pub admin: Token,
}

pub struct Node;

pub struct RunningNode {
    pub id: u64,
    pub name: String,
    /// The address other nodes and clients use.
    pub address: String,
    pub data_dir: DataDir,
    /// Set only when this start created the cluster.
    pub init_tokens: Option<InitTokens>,
    pub consensus: Arc<Consensus>,
    stop: CancellationToken,
    removed: Arc<AtomicBool>,
    server: JoinHandle<()>,
    /// The agent, which may be creating a container when the node stops:
    /// draining waits for it, so nothing is started after a node is down.
    agent: JoinHandle<()>,
    /// The mesh loop, which stops WireGuard and DNS when it ends.
    mesh: JoinHandle<()>,
    /// Every task the node started (the three above included).
    tasks: TaskTracker,
    /// Where this node's edge takes HTTP and HTTPS.
    pub http_address: SocketAddr,
    pub https_address: SocketAddr,
    /// The engine and the cluster, for what a removed node clears away.
    engine: Engine,
    cluster_id: String,
}

impl std::fmt::Debug for RunningNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningNode").field("id", &self.id).field("name", &self.name).finish_non_exhaustive()
    }
}

/// How peers reach this node over WireGuard: the public half of its key, and
/// its advertised host with the WireGuard port.
pub fn wireguard_peer(private_key: &roost_network::mesh::Key, address: &str, port: u16) -> WireguardPeer {
    WireguardPeer {
        public_key: private_key.get_public().to_base64(),
        endpoint: roost_network::mesh::endpoint_for(address, port),
    }
}

/// Checks a cluster domain: one or more lowercase DNS labels (`localhost`
/// is one).
pub fn validate_cluster_domain(domain: &str) -> Result<(), String> {
    if domain.contains('.') {
        return roost_raft::state::validate_domain(domain);
    }
    roost_raft::state::validate_domain(&format!("{domain}.check")).map_err(|_| {
        "it must be lowercase letters, digits and '-' (not at either end), in dot-separated labels".to_owned()
    })
}

/// Checks that `address` is HOST:PORT that others can dial.
pub fn check_address(address: &str) -> Result<(), String> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("'{address}' is not HOST:PORT"));
    };
    if host.is_empty() {
        return Err(format!("'{address}' has no host"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err(format!("'{address}' needs a port from 1 to 65535")),
        Ok(_) => {}
    }
    if let Ok(addr) = address.parse::<SocketAddr>() {
        if addr.ip().is_unspecified() {
            return Err(format!("'{address}' is a wildcard address, which other nodes cannot dial"));
        }
    }
    Ok(())
}

impl Node {
    pub async fn start(config: NodeConfig, shutdown: CancellationToken) -> Result<RunningNode, StartError> {
        let dir = DataDir::new(&config.data_dir);
        let listener = TcpListener::bind(&config.listen)
            .await
            .map_err(|source| StartError::Listen { listen: config.listen.clone(), source })?;
        let bound =
            listener.local_addr().map_err(|source| StartError::Listen { listen: config.listen.clone(), source })?;
        let address = match &config.advertise {
            Some(advertise) => {
                check_address(advertise).map_err(StartError::Advertise)?;
                advertise.clone()
            }
            None if bound.ip().is_unspecified() => {
                return Err(StartError::NeedAdvertise { listen: config.listen.clone() })
            }
            None => bound.to_string(),
        };

        let edge_listeners = roost_network::edge::Listeners::bind(&roost_network::edge::EdgeConfig {
            http: config.edge.http.clone(),
            https: config.edge.https.clone(),
            workers: config.edge.workers,
        })
        .await?;
        let engine = Engine::connect(config.docker_host.as_deref()).await?;
        let (identity, init_tokens) = resolve_identity(&dir, &config, &address).await?;
        // Only a node that may vote holds the secrets key.
        let secrets_key = identity.secrets_key.as_deref().map(SecretsKey::from_hex).transpose()?.map(Arc::new);
        let stored = identity.stored.clone();
        let span = tracing::info_span!("node", node = %stored.name, id = stored.node_id);
        async move {
            let stop = shutdown.child_token();
            // The state the peer check reads exists once Raft has started.
            let known = Arc::new(std::sync::OnceLock::new());
            let node_tls = start_tls(&dir, &identity, auth::accept_server(known.clone(), stored.node_id))?;
            let channels = Arc::new(NodeChannels::new(ClientTls::of_node(node_tls.clone())));
            let consensus =
                Consensus::start(stored.node_id, &dir.raft(), &config.timings, channels.clone(), stop.clone()).await?;
            let _ = known.set(consensus.state().clone());
            let liveness = Arc::new(Liveness::new(config.liveness.clone(), stored.node_id));
            let plane: SharedPlane = Arc::default();
            let (network_tx, network_rx) = tokio::sync::watch::channel(NetworkStatus::Pending);

            let state = consensus.state().clone();
            let token_uses = Arc::new(auth::TokenUses::default());
            let proofs = Arc::new(auth::SessionProofs::default());
            let clock = Arc::new(clock::ClusterClock::default());
            let raft_service = RaftService::new(
                consensus.clone(),
                auth::authorize(state.clone(), node_tls.clone(), token_uses.clone(), clock.clone()),
            );
            let router = tonic::transport::Server::builder()
                // Pings keep every served connection's bytes flowing, so the
                // idle timeout (`ConnectionLimits`) closes only dead ones,
                // and a client that stopped answering is dropped.
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                // hyper's default, which tonic lifts: no connection opens
                // more calls than this at once.
                .max_concurrent_streams(Some(200))
                .add_service(InterceptedService::new(
                    raft_service.clone().into_server(),
                    auth::require_node(state.clone(), stored.node_id),
                ))
                .add_service(InterceptedService::new(
                    PeerServer::new(liveness::PeerService {
                        consensus: consensus.clone(),
                        liveness: liveness.clone(),
                        plane: plane.clone(),
                    }),
                    auth::require_node(state.clone(), stored.node_id),
                ))
                .add_service(InterceptedService::new(
                    AgentServer::new(workloads::AgentService { engine: engine.clone(), consensus: consensus.clone() }),
                    auth::require_node(state.clone(), stored.node_id),
                ))
                .add_service(InterceptedService::new(
                    KeysServer::new(keys::KeysService {
                        consensus: consensus.clone(),
                        key: secrets_key.clone(),
                        edge_limit: keys::edge_limiter(),
                        api_cert_lifetime: config.api_cert_lifetime,
                    }),
                    auth::require_node(state.clone(), stored.node_id),
                ))
                .add_service(JoinServer::new(join::JoinService {
                    consensus: consensus.clone(),
                    secrets_key: secrets_key.clone().zip(identity.secrets_key.clone()),
                    limiter: join::join_limiter(),
                    api_cert_lifetime: config.api_cert_lifetime,
                }))
                .add_service(auth::WithGrant::new(
                    InterceptedService::new(
                        ControlServer::new(api::ControlService {
                            consensus: consensus.clone(),
                            liveness: liveness.clone(),
                            channels: channels.clone(),
                            tls: node_tls.clone(),
                            clock: clock.clone(),
                            proofs: proofs.clone(),
                            node_name: stored.name.clone(),
                            engine: engine.clone(),
                            secrets_key: secrets_key.clone(),
                            plane: plane.clone(),
                            network: network_rx.clone(),
                            builds: Arc::new(tokio::sync::Semaphore::new(1)),
                            max_upload: config.max_upload,
                        }),
                        auth::authenticate(state.clone(), node_tls.clone(), token_uses.clone(), clock.clone(), proofs),
                    ),
                    state.clone(),
                    stored.node_id,
                    node_tls.clone(),
                ));
            // Every task the node starts from here on is tracked, and
            // `drain` waits for all of them.
            let tasks = TaskTracker::new();
            let incoming = tls::incoming(listener, node_tls.clone(), config.connection_limits.clone(), stop.clone());
            let incoming = divert_raft_streams(incoming, raft_service, state, stored.node_id, &tasks, &stop);
            let server_stop = stop.clone();
            let server = tasks.spawn(
                async move {
                    if let Err(error) = router.serve_with_incoming_shutdown(incoming, server_stop.cancelled()).await {
                        tracing::error!(%error, "the gRPC server failed");
                    }
                }
                .in_current_span(),
            );
            tracing::info!(address = %stored.address, listen = %bound, "serving");

            // From here on a failure must not leave Raft and the server running.
            let (built, built_rx) = tokio::sync::watch::channel(0);
            let started = async {
                if let Some(bootstrap) = dir.load_bootstrap()? {
                    bootstrap_cluster(&consensus, &stored, bootstrap).await?;
                    dir.clear_bootstrap()?;
                }
                let hooks = Arc::new(edge::NodeHooks { consensus: consensus.clone(), built: built_rx });
                Ok::<_, StartError>(roost_network::edge::Edge::start(
                    edge_listeners,
                    stored.node_id,
                    hooks,
                    stop.clone(),
                )?)
            }
            .await;
            let proxy = match started {
                Ok(proxy) => proxy,
                Err(error) => {
                    stop.cancel();
                    consensus.shutdown().await;
                    // The server, and any Raft streams it handed over.
                    tasks.close();
                    tasks.wait().await;
                    return Err(error);
                }
            };

            // A node answers the CLI only once it knows the cluster and
            // itself: `node join` returns only then. It reports itself up
            // (heartbeats) once it has caught up: a read barrier passed.
            tasks.spawn(sync_with_cluster(consensus.clone(), stop.clone()).in_current_span());
            wait_knows_cluster(&consensus, Instant::now() + CATCH_UP_WAIT).await;
            let removed = Arc::new(AtomicBool::new(false));
            spawn_background(&consensus, &liveness, &channels, &clock, &stop, &removed, &tasks);
            tasks.spawn(
                membership::run_controller(
                    consensus.clone(),
                    liveness.clone(),
                    Duration::from_millis(500),
                    secrets_key.clone(),
                    stop.clone(),
                )
                .in_current_span(),
            );
            let (directory, directory_rx) = tokio::sync::watch::channel(Arc::default());
            // With WireGuard, another node's instances are reachable once
            // the mesh has set up its peer; without, through this machine.
            let (reach, reach_rx) = tokio::sync::watch::channel(match config.mesh.wireguard_port {
                Some(_) => roost_network::mesh::Reach::Only([stored.node_id].into()),
                None => roost_network::mesh::Reach::All,
            });
            let mesh = tasks.spawn(
                mesh::run(
                    MeshContext {
                        consensus: consensus.clone(),
                        engine: engine.clone(),
                        settings: config.mesh.clone(),
                        address: stored.address.clone(),
                        wireguard_key: identity.wireguard_key.clone(),
                        network: network_tx,
                        directory,
                        reach,
                        plane,
                    },
                    stop.clone(),
                )
                .in_current_span(),
            );
            let edge_addresses = (proxy.http_addr(), proxy.https_addr());
            let voter_keys = Arc::new(keys::VoterKeys { consensus: consensus.clone(), channels: channels.clone() });
            if secrets_key.is_none() {
                let certificates =
                    edge::worker_certificates(consensus.clone(), proxy.clone(), voter_keys.clone(), stop.clone());
                tasks.spawn(certificates.in_current_span());
            }
            tasks.spawn(
                edge::run(
                    edge::EdgeContext {
                        consensus: consensus.clone(),
                        edge: proxy,
                        directory: directory_rx,
                        reach: reach_rx,
                        keys: match &secrets_key {
                            Some(key) => edge::EdgeKeys::Voter(key.clone()),
                            None => edge::EdgeKeys::Worker,
                        },
                        built,
                    },
                    stop.clone(),
                )
                .in_current_span(),
            );
            // Workers never lead, so never order certificates.
            if let Some(key) = &secrets_key {
                tasks.spawn(certs::run(consensus.clone(), key.clone(), stop.clone()).in_current_span());
            }
            tasks.spawn(
                auth::report_token_uses(consensus.clone(), token_uses, TOKEN_USES_EVERY, stop.clone())
                    .in_current_span(),
            );
            tasks.spawn(
                tokens::key_legacy_admin_token(consensus.clone(), dir.admin_token(), stop.clone()).in_current_span(),
            );
            if let Some(key) = &secrets_key {
                let keep = identity::keep_join_token(dir.clone(), consensus.state().clone(), key.clone(), stop.clone());
                tasks.spawn(keep.in_current_span());
            }
            tasks.spawn(
                ca::run(
                    ca::CaContext {
                        consensus: consensus.clone(),
                        dir: dir.clone(),
                        tls: node_tls.clone(),
                        channels: channels.clone(),
                        key_pem: identity.key_pem.clone(),
                        secrets_key: secrets_key.clone(),
                        voter_keys: voter_keys.clone(),
                    },
                    stop.clone(),
                )
                .in_current_span(),
            );
            tasks.spawn(
                api_cert::run(
                    api_cert::ApiCertContext {
                        consensus: consensus.clone(),
                        dir: dir.clone(),
                        tls: node_tls.clone(),
                        key_pem: identity.key_pem.clone(),
                        secrets_key: secrets_key.clone(),
                        voter_keys: voter_keys.clone(),
                        lifetime: config.api_cert_lifetime,
                    },
                    stop.clone(),
                )
                .in_current_span(),
            );
            let fetcher = Arc::new(workloads::PeerImages { consensus: consensus.clone(), channels: channels.clone() });
            let secrets: Arc<dyn SecretOpener> = match secrets_key {
                Some(key) => key,
                None => voter_keys.clone(),
            };
            let agent = Agent::new(engine.clone(), consensus.clone(), secrets, fetcher, network_rx);
            let agent = tasks.spawn(agent.run(stop.clone()).in_current_span());
            tasks.spawn(
                workloads::run_controller(consensus.clone(), liveness.clone(), config.controller.clone(), stop.clone())
                    .in_current_span(),
            );
            Ok(RunningNode {
                id: stored.node_id,
                name: stored.name.clone(),
                address: stored.address.clone(),
                data_dir: dir,
                init_tokens,
                consensus,
                stop,
                removed,
                server,
                agent,
                mesh,
                tasks,
                http_address: edge_addresses.0,
                https_address: edge_addresses.1,
                engine,
                cluster_id: stored.cluster_id.clone(),
            })
        }
        .instrument(span)
        .await
    }
}

/// How often a node tells the state which tokens it accepted.
const TOKEN_USES_EVERY: Duration = Duration::from_secs(15);

/// How long a starting node waits to learn the cluster before it serves anyway.
const CATCH_UP_WAIT: Duration = Duration::from_secs(60);

/// Takes the connections that ask for a Raft stream
/// ([`roost_raft::stream`]) out of `incoming` and serves each from a member
/// on a task of its own until it closes or the node stops (others are
/// closed at once); the rest go on to the gRPC server.
fn divert_raft_streams(
    incoming: impl tokio_stream::Stream<Item = std::io::Result<tls::TlsConnection>>,
    service: RaftService,
    state: roost_raft::store::StateReader,
    self_id: roost_raft::NodeId,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> impl tokio_stream::Stream<Item = std::io::Result<tls::TlsConnection>> {
    use tonic::transport::server::Connected as _;
    let (tasks, stop) = (tasks.clone(), stop.clone());
    tokio_stream::StreamExt::filter_map(incoming, move |connection| match connection {
        Ok(connection) if connection.is_raft_stream() => {
            let identity = connection.connect_info();
            let state = state.clone();
            let caller = move || auth::node_caller(&state, self_id, identity.node_fingerprint.as_deref());
            // Only a member is read at all; it is checked again at each
            // request, for it may be removed meanwhile.
            if let Err(status) = caller() {
                tracing::debug!(remote = ?identity.remote_addr, reason = status.message(), "a Raft stream refused");
                return None;
            }
            let served = service.clone().serve_stream(connection, caller, stop.clone());
            tasks.spawn(
                async move {
                    if let Err(error) = served.await {
                        tracing::debug!(%error, "a Raft stream ended");
                    }
                }
                .in_current_span(),
            );
            None
        }
        other => Some(other),
    })
}

/// The node's TLS as its data directory holds it: it trusts its CA and,
/// part way through a CA rotation, the new one (`tls/next-ca.pem`), and
/// presents its certificate with whichever of them signed it, and to the
/// CLI its API certificate (`tls/api.pem`) if that CA signed it. The CA
/// loop (`ca::run`) and the API certificate loop (`api_cert::run`) follow
/// the state from there.
fn start_tls(dir: &DataDir, identity: &Identity, accept: tls::AcceptServer) -> Result<Arc<tls::NodeTls>, StartError> {
    let next_ca = std::fs::read_to_string(dir.next_ca_cert()).ok();
    let mut trusted = vec![identity.ca_cert_pem.as_str()];
    trusted.extend(next_ca.as_deref());
    let ca_pem =
        trusted.iter().copied().find(|ca| tls::signed_by(ca, &identity.cert_pem)).unwrap_or(&identity.ca_cert_pem);
    let certs = tls::NodeCerts { trusted: &trusted, ca_pem, cert_pem: &identity.cert_pem, key_pem: &identity.key_pem };
    let api_chain = std::fs::read_to_string(dir.api_cert()).ok();
    Ok(tls::NodeTls::new(&certs, api_chain, Some(accept))?)
}

/// Whether this node has caught up with the cluster ([`auth::caught_up`]).
pub fn caught_up(consensus: &Consensus) -> bool {
    auth::caught_up(consensus.state(), consensus.id())
}

/// Waits until this node knows the cluster and itself
/// ([`auth::knows_cluster`]) or `deadline`.
async fn wait_knows_cluster(consensus: &Consensus, deadline: Instant) {
    if !auth::wait_knows_cluster(consensus.state(), consensus.id(), deadline).await && Instant::now() >= deadline {
        tracing::warn!("this node has not caught up with the cluster after {CATCH_UP_WAIT:?}; serving anyway");
    }
}

/// How long one read barrier of [`sync_with_cluster`] may take before it
/// asks again.
const SYNC_ATTEMPT: Duration = Duration::from_secs(5);

/// Passes one read barrier and marks the state synced
/// ([`roost_raft::store::StateReader::synced`]): a node that joined then
/// holds its own record, and one that restarted what it missed while down.
/// Retried until a leader answers; without one the node stays not synced,
/// which is the truth.
async fn sync_with_cluster(consensus: Arc<Consensus>, stop: CancellationToken) {
    let started = Instant::now();
    loop {
        let barrier = tokio::select! {
            () = stop.cancelled() => return,
            barrier = consensus.read_barrier(Instant::now() + SYNC_ATTEMPT) => barrier,
        };
        match barrier {
            Ok(()) => {
                consensus.state().mark_synced();
                tracing::debug!(after = ?started.elapsed(), "caught up with the cluster");
                return;
            }
            Err(roost_raft::consensus::ConsensusError::Stopped) => return,
            Err(error) => tracing::debug!(%error, "not caught up with the cluster yet"),
        }
    }
}

/// Resumes the node in `dir`, or creates its identity the first time.
async fn resolve_identity(
    dir: &DataDir,
    config: &NodeConfig,
    address: &str,
) -> Result<(Identity, Option<InitTokens>), StartError> {
    if let Some(mut identity) = dir.load()? {
        let moved = check_resume(dir, &identity.stored, config.name.as_deref(), address, &config.labels)?;
        if let Start::Join { token, .. } = &config.start {
            let token = Token::parse(token)?;
            let digest = identity.ca_digest()?;
            let former = identity.stored.former_ca_digests.contains(&token.ca_digest.to_hex());
            if token.ca_digest != digest && !former {
                return Err(IdentityError::OtherCluster {
                    dir: dir.root().to_owned(),
                    stored: identity.stored.cluster_id.clone(),
                    given: token.ca_digest.to_hex()[..12].to_owned(),
                }
                .into());
            }
        }
        if let Some(address) = moved {
            // The cluster learns the new address from this node once it runs
            // (`Command::UpdateNode`); peers follow it from the state.
            tracing::warn!(from = %identity.stored.address, to = %address, "this node has moved; it will tell the cluster its new address");
            identity.stored.address = address;
            dir.save_stored(&identity.stored)?;
        }
        tracing::info!(node = %identity.stored.name, id = identity.stored.node_id, "resuming node from {}", dir.root().display());
        return Ok((identity, None));
    }
    dir.check_fresh()?;
    let name = config.name.clone().unwrap_or_else(|| config.default_name.clone());
    validate_name(&name).map_err(|reason| StartError::Name { name: name.clone(), reason })?;
    match &config.start {
        Start::Init => {
            let settings = &config.cluster;
            roost_raft::state::validate_mesh_range(settings.mesh_range)
                .map_err(|reason| StartError::MeshRange { range: settings.mesh_range.to_string(), reason })?;
            validate_cluster_domain(&settings.domain)
                .map_err(|reason| StartError::Domain { domain: settings.domain.clone(), reason })?;
            dir.create()?;
            let new = NewCluster {
                name: &name,
                address,
                labels: &config.labels,
                resources: config.resources,
                settings: settings.clone(),
            };
            let (identity, tokens) = create_cluster(dir, new, config.mesh.wireguard_port, config.api_cert_lifetime)?;
            Ok((identity, Some(tokens)))
        }
        Start::Join { seed, token } => {
            let params = join::JoinParams {
                seed,
                token,
                name: &name,
                address,
                labels: &config.labels,
                wait: config.join_wait,
                resources: config.resources,
                wireguard_port: config.mesh.wireguard_port,
            };
            let identity = join::join_cluster(dir, params).await?;
            tracing::info!(node = %name, id = identity.stored.node_id, %seed, "joined the cluster");
            Ok((identity, None))
        }
    }
}

/// What `node init` makes a cluster of.
struct NewCluster<'a> {
    name: &'a str,
    address: &'a str,
    labels: &'a BTreeMap<String, String>,
    resources: Resources,
    settings: ClusterSettings,
}

/// Creates the CA, the first node's certificate and the tokens, and records
/// the bootstrap command to be committed once Raft runs.
fn create_cluster(
    dir: &DataDir,
    new: NewCluster<'_>,
    wireguard_port: Option<u16>,
    api_cert_lifetime: Duration,
) -> Result<(Identity, InitTokens), StartError> {
    let NewCluster { name, address, labels, resources, settings } = new;
    let cluster_id = pki::hex(&rand::random::<[u8; 8]>());
    let ca = ClusterCa::generate(&cluster_id)?;
    let node = ca.issue_node(name)?;
    let public_key = pki::NodeKey::from_pem(&node.key_pem)?.public_key();
    let api_chain = ca.issue_api(name, &public_key, &node.fingerprint, api_cert_lifetime)?;
    let tokens = InitTokens {
        join: Token::generate(TokenKind::Join, ca.digest()),
        admin: Token::generate(TokenKind::Admin, ca.digest()),
    };
    let secrets_key_hex = SecretsKey::generate_hex()?;
    let secrets_key = SecretsKey::from_hex(&secrets_key_hex)?;
    let worker_secret = Token::generate(TokenKind::Join, ca.digest()).secret;
    let cluster = ClusterInfo {
        id: cluster_id.clone(),
        created_at: now_millis(),
        ca_cert_pem: ca.cert_pem().to_owned(),
        ca_key: Some(keys::seal_ca_key(&secrets_key, &ca)?),
        voter_join: Some(keys::seal_join_secret(&secrets_key, NodeRole::Voter, &tokens.join.secret)?),
        worker_join: Some(keys::seal_join_secret(&secrets_key, NodeRole::Worker, &worker_secret)?),
        ca_key_pem: String::new(),
        join_secret: String::new(),
        worker_join_secret: String::new(),
        admin_secret_sha256: secret_digest(&tokens.admin.secret),
        admin_public_key: tokens.admin.key().public_key(),
        join_rotation_due: false,
        mesh_range: settings.mesh_range,
        domain: settings.domain,
        acme: Some(settings.acme),
        ca_rotation: None,
        previous_ca_cert_pem: None,
    };
    let wireguard_key = identity::generate_wireguard_key();
    let first = NewNode {
        name: name.to_owned(),
        address: address.to_owned(),
        labels: labels.clone(),
        cert_serial: node.serial.clone(),
        cert_fingerprint: node.fingerprint.clone(),
        resources,
        wireguard: wireguard_port.map(|port| wireguard_peer(&wireguard_key, address, port)),
        role: Default::default(),
    };
    dir.save_bootstrap(&Command::Bootstrap { cluster: Box::new(cluster), node: first })?;
    identity::write_private(&dir.join_token(), &format!("{}\n", tokens.join))?;
    identity::write_private(&dir.admin_token(), &format!("{}\n", tokens.admin))?;
    let identity = Identity {
        stored: StoredIdentity {
            cluster_id,
            node_id: FIRST_NODE_ID,
            name: name.to_owned(),
            address: address.to_owned(),
            labels: labels.clone(),
            worker: false,
            former_ca_digests: Vec::new(),
        },
        ca_cert_pem: ca.cert_pem().to_owned(),
        cert_pem: node.cert_pem,
        key_pem: node.key_pem,
        secrets_key: Some(secrets_key_hex),
        wireguard_key,
    };
    dir.save(&identity)?;
    // Without it the node makes another once it runs (`api_cert::run`).
    if let Err(error) = identity::write_private(&dir.api_cert(), &api_chain) {
        tracing::warn!(error = %identity::error_chain(&error), "could not write the node's API certificate");
    }
    tracing::info!(cluster = %identity.stored.cluster_id, "created a new cluster");
    Ok((identity, tokens))
}

/// Makes this node the cluster's sole voter and commits the bootstrap entry.
async fn bootstrap_cluster(
    consensus: &Consensus,
    stored: &StoredIdentity,
    bootstrap: Command,
) -> Result<(), StartError> {
    consensus.initialize(RaftNode { name: stored.name.clone(), address: stored.address.clone() }).await?;
    let response = consensus
        .propose(bootstrap, Instant::now() + Duration::from_secs(30))
        .await
        .map_err(|e| StartError::Bootstrap(e.to_string()))?;
    match response {
        Response::NodeAdded { .. } => Ok(()),
        other => Err(StartError::Bootstrap(format!("{other:?}"))),
    }
}

fn spawn_background(
    consensus: &Arc<Consensus>,
    liveness: &Arc<Liveness>,
    channels: &Arc<NodeChannels>,
    clock: &Arc<clock::ClusterClock>,
    stop: &CancellationToken,
    removed: &Arc<AtomicBool>,
    tasks: &TaskTracker,
) {
    let mark_removed = {
        let stop = stop.clone();
        let removed = removed.clone();
        move || {
            if !removed.swap(true, Ordering::SeqCst) {
                tracing::error!("this node was removed from the cluster; stopping");
            }
            stop.cancel();
        }
    };

    let heartbeats =
        liveness::send_heartbeats(consensus.clone(), liveness.clone(), channels.clone(), clock.clone(), stop.clone());
    let on_revoked = mark_removed.clone();
    tasks.spawn(
        async move {
            if heartbeats.await == HeartbeatEnd::Revoked {
                on_revoked();
            }
        }
        .in_current_span(),
    );

    // The state says so as soon as the removal is applied here.
    let consensus = consensus.clone();
    let stop = stop.clone();
    tasks.spawn(
        async move {
            let mut metrics = consensus.raft().metrics();
            loop {
                let id = consensus.id();
                if consensus.state().read(|s| s.removed_nodes.contains_key(&id)) {
                    mark_removed();
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = metrics.changed() => if changed.is_err() { return },
                }
            }
        }
        .in_current_span(),
    );
}

/// Removes what a removed node left on its engine: its containers and its
/// instance network (not other nodes' on a shared engine). Returns how many
/// containers went.
async fn leave(engine: &Engine, cluster: &str, node: u64) -> Result<usize, roost_deploy::engine::EngineError> {
    let containers = engine.containers(cluster, Some(node)).await?;
    for container in &containers {
        engine.remove(&container.id).await?;
    }
    engine.remove_networks(cluster, Some(node)).await?;
    Ok(containers.len())
}

impl RunningNode {
    /// Waits until the node is asked to stop or learns it was removed, then
    /// drains: stops serving, shuts Raft down, and waits for the server.
    pub async fn wait(self) -> ExitReason {
        self.stop.cancelled().await;
        self.drain().await
    }

    /// Whether the node has been told to stop, or stopped itself on removal.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Stops the node now.
    pub async fn stop(self) -> ExitReason {
        self.stop.cancel();
        self.drain().await
    }

    async fn drain(self) -> ExitReason {
        let mut agent = self.agent;
        if tokio::time::timeout(Duration::from_secs(15), &mut agent).await.is_err() {
            tracing::warn!("the agent did not stop within 15s; stopping it");
            agent.abort();
        }
        if tokio::time::timeout(Duration::from_secs(10), self.mesh).await.is_err() {
            tracing::warn!("the mesh did not stop within 10s");
        }
        self.consensus.shutdown().await;
        if tokio::time::timeout(Duration::from_secs(5), self.server).await.is_err() {
            tracing::warn!("the gRPC server did not stop within 5s");
        }
        // The rest (heartbeats, membership, the controllers, the edge, ACME)
        // end with the stop token; none may outlive the node.
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tasks.wait()).await.is_err() {
            tracing::warn!(left = self.tasks.len(), "some of the node's tasks did not stop within 10s");
        }
        if self.removed.load(Ordering::SeqCst) {
            // Out for good: its instances run elsewhere now, so nothing of
            // the cluster is left on this machine's engine.
            match tokio::time::timeout(Duration::from_secs(60), leave(&self.engine, &self.cluster_id, self.id)).await {
                Ok(Ok(removed)) => {
                    tracing::info!(containers = removed, "removed this node's containers and instance network");
                }
                Ok(Err(error)) => tracing::warn!(error = %error.chain(), "could not clear this node's containers away"),
                Err(_) => tracing::warn!("clearing this node's containers away took over 60s; left the rest"),
            }
            ExitReason::Removed
        } else {
            ExitReason::Shutdown
        }
    }
}
