//! The `roost` command line: argument definitions and the client commands.
//!
//! Client commands talk to any node over the public API with the admin token
//! (`--token` / `ROOST_TOKEN`), which also pins the cluster CA, so no other
//! file is needed. Errors are one line on stderr and a distinct exit code
//! (see [`CliError::exit_code`]).

mod apps;
mod cluster;
mod output;

pub use apps::{AppArg, DeployArgs, LogsArgs, ScaleCommand, SecretsCommand};

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use roost_network::tls::{ClientTls, Session, SessionSlot};
use roost_network::token::{SignedCall, TokenKey};
use roost_network::{Token, TokenKind};
use roost_proto::api::control_client::ControlClient;
use roost_proto::api::{
    AddCertificateRequest, CreateAppRequest, CreateTokenRequest, CreatedToken, DestroyAppRequest, GetAppRequest,
    GetCertificateRequest, GetJoinTokenRequest, GetNodeRequest, LabelNodeRequest, ListAppsRequest,
    ListCertificatesRequest, ListNodesRequest, ListTokensRequest, ReadOptions, RemoveCertificateRequest,
    RemoveNodeRequest, RevokeTokenRequest, RotateTokenRequest, VersionRequest,
};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use roost_deploy::config::Memory;
use roost_deploy::controller::ControllerConfig;
use roost_raft::workload::Resources;

use crate::daemon::{ClusterSettings, EdgeListen, LivenessConfig, MeshSettings, NodeConfig, Start};
use roost_raft::state::{AcmeSettings, INITIAL_ADMIN};

#[derive(Debug, Parser)]
#[command(name = "roost", version = crate::VERSION, about = "Run apps on machines you own, the fly.io way.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node, or manage the cluster's nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Create, list, inspect and destroy apps.
    #[command(subcommand)]
    Apps(AppsCommand),
    /// Build and deploy the app in DIR (or an image) as a new release.
    Deploy(DeployArgs),
    /// Show an app's release and instances.
    Status {
        #[command(flatten)]
        app: AppArg,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List an app's releases, newest first.
    Releases {
        #[command(flatten)]
        app: AppArg,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make a new release from an earlier one [default: the one before the current].
    Rollback {
        #[command(flatten)]
        app: AppArg,
        #[arg(long)]
        version: Option<u64>,
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Change how many instances run, or their size.
    #[command(subcommand)]
    Scale(ScaleCommand),
    /// Recreate every instance of an app.
    Restart {
        #[command(flatten)]
        app: AppArg,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the output of an app's instances, from every node.
    Logs(LogsArgs),
    /// Manage an app's secrets (environment variables kept encrypted).
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Custom domains and their TLS certificates (ordered over ACME, served by every node).
    #[command(subcommand)]
    Certs(CertsCommand),
    /// API tokens with a scope: admin, read, or deploy:APP (one app only).
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// The cluster's CA: show it, rotate it.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Print the CLI's version, and the node's when an endpoint is set.
    Version(MaybeClient),
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Create a new cluster with this machine as its first node, and run it.
    Init {
        #[command(flatten)]
        node: Box<NodeArgs>,
        #[command(flatten)]
        cluster: Box<ClusterArgs>,
    },
    /// Join an existing cluster through any of its nodes, and run this node.
    Join {
        /// HOST:PORT of any node of the cluster.
        seed: String,
        /// The cluster's join token (`roost node token` prints it).
        #[arg(long, env = "ROOST_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        #[command(flatten)]
        node: Box<NodeArgs>,
    },
    /// Show one node: its place in the mesh and its WireGuard peers with their last handshake.
    Show {
        /// The node's name or id.
        node: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the cluster's nodes, their roles, whether they are up, and their mesh subnets.
    List {
        #[arg(long)]
        json: bool,
        /// Answer from this node's own view without asking the leader.
        #[arg(long)]
        stale: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the join token other nodes need: `voter` for a node that may vote (the default),
    /// `worker` for one that runs apps but never votes and holds none of the cluster's keys.
    Token {
        #[arg(long, value_enum, default_value_t = JoinRole::Voter)]
        role: JoinRole,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Set or remove a node's labels, which `[placement] constraints` match.
    /// The only way to label a worker: labels attract instances, and a worker
    /// declares none at its join.
    Label {
        /// The node's name or id.
        node: String,
        /// Labels to set, KEY=VALUE (a key already set takes the new value).
        #[arg(value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// A label to remove (repeatable).
        #[arg(long, value_name = "KEY")]
        remove: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Take a node out of the cluster; its certificate is refused from then on.
    Remove {
        /// The node's name or id.
        node: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// What `node init` fixes for the whole cluster (ignored when the data
/// directory already holds a node).
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// The private range instances get addresses from; each node takes a /24 of it.
    #[arg(long, value_name = "CIDR", default_value = "10.210.0.0/16")]
    pub mesh_range: ipnet::Ipv4Net,
    /// Apps are served by every node's edge as APP.DOMAIN (`localhost` works with no DNS set-up).
    #[arg(long, default_value = roost_raft::state::DEFAULT_DOMAIN)]
    pub domain: String,
    /// The ACME directory certificates of custom domains come from.
    #[arg(long, value_name = "URL", default_value = crate::daemon::DEFAULT_ACME_DIRECTORY)]
    pub acme_directory: String,
    /// The contact address of the cluster's ACME account.
    #[arg(long, value_name = "EMAIL")]
    pub acme_email: Option<String>,
    /// A PEM file with a root certificate to trust for the ACME directory (a private ACME server's).
    #[arg(long, value_name = "PEM_FILE")]
    pub acme_ca: Option<PathBuf>,
}

impl ClusterArgs {
    /// The settings, with `--acme-ca` read; errors name the flag.
    pub fn settings(&self) -> Result<ClusterSettings, CliError> {
        let ca_pem = match &self.acme_ca {
            Some(path) => {
                let pem = std::fs::read_to_string(path)
                    .map_err(|e| CliError::Usage(format!("cannot read --acme-ca {}: {e}", path.display())))?;
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(CliError::Usage(format!("--acme-ca {} holds no PEM certificate", path.display())));
                }
                Some(pem)
            }
            None => None,
        };
        if !(self.acme_directory.starts_with("https://") || self.acme_directory.starts_with("http://")) {
            return Err(CliError::Usage(format!("--acme-directory '{}' is not a URL", self.acme_directory)));
        }
        if let Some(email) = &self.acme_email {
            if !email.contains('@') || email.contains(char::is_whitespace) {
                return Err(CliError::Usage(format!("--acme-email '{email}' is not an e-mail address")));
            }
        }
        Ok(ClusterSettings {
            mesh_range: self.mesh_range,
            domain: self.domain.trim_end_matches('.').to_ascii_lowercase(),
            acme: AcmeSettings { directory: self.acme_directory.clone(), email: self.acme_email.clone(), ca_pem },
        })
    }
}

/// What a node that joins with a token may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum JoinRole {
    /// May be made a voter when the cluster needs one.
    Voter,
    /// Runs apps and serves the edge; never votes.
    Worker,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Where the node keeps its state; re-running with the same directory resumes the node.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// HOST:PORT to serve Raft and the API on.
    #[arg(long)]
    pub listen: String,
    /// HOST:PORT other nodes and clients use to reach this node [default: the --listen address].
    #[arg(long)]
    pub advertise: Option<String>,
    /// The node's name [default: the host name].
    #[arg(long)]
    pub name: Option<String>,
    /// A KEY=VALUE label for placement; repeat for more.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// How long a node may be silent before it is shown `down`.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub down_after: Duration,
    /// How long a voter may be down before a healthy learner replaces it.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub promote_after: Duration,
    /// How long `join` keeps trying a seed that is not up yet.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub join_timeout: Duration,
    /// How long the API certificates this node signs (as a voter) live.
    /// Each node renews its own once a third of it has passed; a removed
    /// node passes for a node with the CLI until its last one expires
    /// (`roost cluster rotate-ca` cuts it off at once).
    #[arg(long, default_value = "6h", value_parser = humantime::parse_duration)]
    pub api_cert_lifetime: Duration,
    /// CPUs this node offers to instances [default: all of the machine's].
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory this node offers to instances, e.g. 4gb [default: the machine's, less 256mb].
    #[arg(long)]
    pub memory: Option<String>,
    /// How long a node may be down before its instances move to other nodes.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub reschedule_after: Duration,
    /// The Docker engine to run instances on [default: the local socket].
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// The UDP port of this node's WireGuard interface.
    #[arg(long, default_value_t = roost_network::mesh::DEFAULT_WG_PORT)]
    pub wg_port: u16,
    /// Run without WireGuard: only for nodes that share one machine and one Docker engine,
    /// whose instance networks that machine routes directly.
    #[arg(long)]
    pub no_wireguard: bool,
    /// HOST:PORT where this node's edge takes HTTP for every app.
    #[arg(long, default_value = "0.0.0.0:80")]
    pub http_listen: String,
    /// HOST:PORT where this node's edge takes HTTPS for every app.
    #[arg(long, default_value = "0.0.0.0:443")]
    pub https_listen: String,
    /// The largest build context or image a deploy may upload to this node, e.g. 500mb [default: 2gb].
    #[arg(long)]
    pub max_upload: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Attach DOMAIN to an app and order its certificate.
    Add {
        domain: String,
        #[command(flatten)]
        app: AppArg,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List certificates: state (pending, issued, failed) and expiry.
    List {
        /// Only this app's [default: every app's].
        #[arg(short = 'a', long = "app")]
        app: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one certificate, with the ACME error if its order failed.
    Show {
        domain: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Detach DOMAIN; its certificate is no longer served.
    Remove {
        domain: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum AppsCommand {
    /// Create an app.
    Create {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List apps.
    List {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        stale: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one app.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        stale: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop every instance of an app, keeping its releases.
    Suspend {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Start a suspended app's instances again.
    Resume {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Destroy an app and everything in it.
    Destroy {
        name: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Make a token; it is printed once, and only its digest is kept.
    Create {
        /// What it may do: admin, read (change nothing), or deploy:APP (deploy, scale, restart, secrets, status and logs of APP).
        #[arg(long)]
        scope: String,
        /// A name to list and revoke it by [default: token-ID].
        #[arg(long)]
        name: Option<String>,
        /// How long it lasts, like 30d, 12h or 90m [default: it never expires].
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
        /// Print an object with the key `token`.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the cluster's tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke a token: every node refuses it from then on.
    Revoke {
        /// The token's name or id.
        #[arg(value_name = "NAME|ID")]
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Give a token a new secret (`admin` is the initial admin token); the old one is refused from then on.
    Rotate {
        /// The token's name or id (`admin`: the initial admin token).
        #[arg(value_name = "NAME|ID")]
        name: String,
        /// Print an object with the key `token`.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Parses `--expires`: a duration such as `30d`, `12h` or `1h 30m`.
pub fn parse_expiry(text: &str) -> Result<Duration, CliError> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| CliError::Usage(format!("--expires '{text}' is not a duration like 30d, 12h or 90m: {e}")))?;
    let max = Duration::from_millis(crate::daemon::tokens::MAX_EXPIRY_MS as u64);
    if duration.is_zero() || duration > max {
        return Err(CliError::Usage(format!(
            "--expires must be above zero and at most 10 years, got {text}; leave it out for a token that never expires"
        )));
    }
    Ok(duration)
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// HOST:PORT of any node of the cluster.
    #[arg(long, env = "ROOST_ENDPOINT")]
    pub endpoint: Option<String>,
    /// An API token: the admin token (admin.token in the first node's data directory) or one `roost tokens create` made.
    #[arg(long, env = "ROOST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Args)]
pub struct MaybeClient {
    #[command(flatten)]
    pub client: ClientArgs,
}

/// A CLI failure: what to print, and how to exit.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

impl CliError {
    /// Exit codes: 2 usage, 3 endpoint unreachable, 4 authentication,
    /// 5 not found, 6 already exists, 7 invalid request, 8 cluster unavailable
    /// (no quorum), 1 anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Unreachable(_) => 3,
            CliError::Auth(_) => 4,
            CliError::NotFound(_) => 5,
            CliError::Exists(_) => 6,
            CliError::Invalid(_) => 7,
            CliError::Unavailable(_) => 8,
            CliError::Other(_) => 1,
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => CliError::Auth(message),
            tonic::Code::NotFound => CliError::NotFound(message),
            tonic::Code::AlreadyExists => CliError::Exists(message),
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => CliError::Invalid(message),
            tonic::Code::Unavailable if is_transport(&status) => CliError::Unreachable(message),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => CliError::Unavailable(message),
            _ => CliError::Other(message),
        }
    }
}

/// Whether the status is the client's own (the connection failed) rather
/// than a node's answer: tonic keeps the transport error as its source,
/// while a status that came over the wire has none.
fn is_transport(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
}

pub type Control = ControlClient<InterceptedService<Channel, ApiAuth>>;

/// How a client proves its API token to a node on each call.
#[derive(Clone)]
pub enum ApiAuth {
    /// Signs the TLS session the call goes over, and the time, with the
    /// token's key pair: the token itself never leaves this machine, and a
    /// signature is good on that session alone. What the CLI does.
    Signed {
        key: Arc<TokenKey>,
        session: SessionSlot,
        /// The signature in use for each method and target.
        signed: Arc<std::sync::Mutex<std::collections::HashMap<(String, String), SignedSession>>>,
    },
    /// Sends this `authorization` value as it is: `Bearer TOKEN`, the token
    /// itself, as tools that cannot sign do.
    Header(MetadataValue<tonic::metadata::Ascii>),
}

/// The signature a client sends on every call of one method on one TLS
/// session, until it is [`RESIGN_AFTER_MS`] old: a signature is good on its
/// session alone, so such calls may share it, and a node that has checked
/// it once need not check it again (`auth::verify_signed` remembers).
#[derive(Clone, Debug)]
pub struct SignedSession {
    session: Session,
    at: i64,
    header: MetadataValue<tonic::metadata::Ascii>,
}

/// How long a client uses one signature on a session before it signs
/// afresh, well inside the time a node allows a signed call
/// (`auth::SIGNED_CALL_SKEW_MS`, and `SIGNED_GRANT_AGE_MS` for grants).
const RESIGN_AFTER_MS: i64 = 60_000;
/// The most signatures a client keeps for reuse; it forgets them all when
/// full, and signs afresh what it calls next.
const MAX_SIGNED: usize = 1_024;

impl tonic::service::Interceptor for ApiAuth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let value = match self {
            ApiAuth::Header(value) => value.clone(),
            ApiAuth::Signed { key, session, signed } => {
                let session = session
                    .get()
                    .ok_or_else(|| tonic::Status::unavailable("no TLS session with the node is open to sign"))?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                let method = request
                    .extensions()
                    .get::<tonic::GrpcMethod<'static>>()
                    .map(|m| m.method().to_owned())
                    .ok_or_else(|| tonic::Status::internal("a call without its method name cannot be signed"))?;
                let target =
                    request.metadata().get(roost_proto::TARGET).and_then(|v| v.to_str().ok()).unwrap_or_default();
                let mut signed = signed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let slot = (method, target.to_owned());
                let reusable = signed
                    .get(&slot)
                    .filter(|last| last.session == session && now.saturating_sub(last.at) < RESIGN_AFTER_MS);
                match reusable {
                    Some(last) => last.header.clone(),
                    None => {
                        let call =
                            SignedCall { session: &session.exporter, server: &session.server, method: &slot.0, target };
                        let header = MetadataValue::try_from(key.sign(&call, now).header())
                            .map_err(|_| tonic::Status::internal("a signature that a header cannot carry"))?;
                        // A client that names something new on every call
                        // (a script creating apps) would otherwise keep a
                        // signature for each for as long as it runs.
                        if signed.len() >= MAX_SIGNED {
                            signed.clear();
                        }
                        signed.insert(slot, SignedSession { session, at: now, header: header.clone() });
                        header
                    }
                }
            }
        };
        request.metadata_mut().insert(roost_proto::AUTHORIZATION, value);
        Ok(request)
    }
}

/// A request that changes `target` (`KIND:NAME`): the `roost-target`
/// metadata names it, and a signed call signs it ([`ApiAuth::Signed`]), so
/// the grant the node receives is good for that alone.
pub fn about<T>(target: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    // Names are ASCII; one that is not is refused by the node anyway.
    if let Ok(value) = MetadataValue::try_from(target) {
        request.metadata_mut().insert(roost_proto::TARGET, value);
    }
    request
}

/// [`about`] the app `app`.
pub fn about_app<T>(app: &str, message: T) -> tonic::Request<T> {
    about(&format!("app:{app}"), message)
}

/// Connects to the node at `endpoint`, trusting only the CA `token` pins,
/// with calls signed by the token ([`ApiAuth::Signed`]).
pub async fn connect_api(endpoint: &str, token: &Token) -> Result<Control, CliError> {
    use roost_network::tls::{NoApiCertificate, TlsError};
    let tls = ClientTls::api(token.ca_digest).map_err(|e| CliError::Other(e.to_string()))?;
    // A node that has just started after a long stop (its API certificate
    // expired), or whose CA was just rotated, gets a new one within moments.
    let deadline = tokio::time::Instant::now() + API_CERTIFICATE_WAIT;
    let connected = loop {
        match tls.connect_bound(endpoint).await {
            Err(TlsError::NoApiCertificate {
                refusal: NoApiCertificate::Missing | NoApiCertificate::Expired, ..
            }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => break other,
        }
    };
    let (channel, session) = connected.map_err(|e| match e {
        TlsError::Address { .. } => CliError::Usage(format!("invalid --endpoint: {e}")),
        // A node answered, with another CA than the token pins, or without
        // a current API certificate from it.
        TlsError::WrongCa { .. } | TlsError::NoApiCertificate { .. } => CliError::Auth(e.to_string()),
        _ => CliError::Unreachable(format!("{e} (is a roost node running there? check --endpoint / ROOST_ENDPOINT)")),
    })?;
    let auth = ApiAuth::Signed { key: Arc::new(token.key()), session, signed: Arc::default() };
    Ok(ControlClient::with_interceptor(channel, auth))
}

/// How long the CLI waits for a node that presents no API certificate.
const API_CERTIFICATE_WAIT: Duration = Duration::from_secs(5);

impl ClientArgs {
    fn parts(&self) -> Result<(String, Token), CliError> {
        let endpoint = self.endpoint.clone().ok_or_else(|| {
            CliError::Usage("no endpoint: pass --endpoint HOST:PORT of any node, or set ROOST_ENDPOINT".into())
        })?;
        let text = self.token.as_deref().ok_or_else(|| {
            CliError::Auth(
                "no API token: pass --token or set ROOST_TOKEN (the first node wrote the admin token to DATA_DIR/admin.token)"
                    .into(),
            )
        })?;
        let token = Token::parse(text).map_err(|e| CliError::Auth(format!("invalid API token: {e}")))?;
        if token.kind == TokenKind::Join {
            return Err(CliError::Auth(
                "that is a join token; the CLI needs an API token (DATA_DIR/admin.token on the first node, or one `roost tokens create` made)".into(),
            ));
        }
        Ok((endpoint, token))
    }

    /// Connects to the endpoint, trusting only the CA the token pins; calls
    /// are signed with the token, which never leaves this machine.
    pub async fn connect(&self) -> Result<Control, CliError> {
        let (endpoint, token) = self.parts()?;
        connect_api(&endpoint, &token).await
    }
}

/// Parses repeated `--label KEY=VALUE` flags.
pub fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>, CliError> {
    parse_labels_named(labels, "--label")
}

/// [`parse_labels`], naming the argument `what` in its errors.
fn parse_labels_named(labels: &[String], what: &str) -> Result<BTreeMap<String, String>, CliError> {
    let mut parsed = BTreeMap::new();
    for label in labels {
        let (key, value) =
            label.split_once('=').ok_or_else(|| CliError::Usage(format!("{what} expects KEY=VALUE, got '{label}'")))?;
        if let Err(reason) = roost_raft::state::validate_label(key, value) {
            return Err(CliError::Usage(format!("{what} '{key}': {reason}")));
        }
        if parsed.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(CliError::Usage(format!("{what} {key} is given twice")));
        }
    }
    if parsed.len() > roost_raft::state::MAX_LABELS {
        return Err(CliError::Usage(format!("at most {} labels", roost_raft::state::MAX_LABELS)));
    }
    Ok(parsed)
}

/// The machine-specific inputs a node's configuration needs besides its
/// flags; `main` reads them.
#[derive(Clone, Debug, Default)]
pub struct Host {
    /// The name a node takes without --name.
    pub name: String,
    /// The resolvers of /etc/resolv.conf, for names outside `.internal`.
    pub upstream_dns: Vec<std::net::SocketAddr>,
}

/// Builds a node's configuration from `node init` / `node join` flags.
pub fn node_config(
    args: &NodeArgs,
    start: Start,
    cluster: ClusterSettings,
    host: Host,
) -> Result<NodeConfig, CliError> {
    if args.wg_port == 0 {
        return Err(CliError::Usage("--wg-port must be from 1 to 65535".into()));
    }
    Ok(NodeConfig {
        data_dir: args.data_dir.clone(),
        listen: args.listen.clone(),
        advertise: args.advertise.clone(),
        name: args.name.clone(),
        default_name: host.name,
        labels: parse_labels(&args.labels)?,
        start,
        timings: Default::default(),
        liveness: LivenessConfig {
            down_after: args.down_after,
            promote_after: args.promote_after,
            ..Default::default()
        },
        join_wait: args.join_timeout,
        resources: node_resources(args.cpus, args.memory.as_deref())?,
        docker_host: args.docker_host.clone(),
        controller: ControllerConfig { reschedule_after: args.reschedule_after, ..Default::default() },
        mesh: MeshSettings {
            wireguard_port: (!args.no_wireguard).then_some(args.wg_port),
            dns_port: 53,
            upstream_dns: host.upstream_dns,
        },
        cluster,
        edge: EdgeListen {
            http: args.http_listen.clone(),
            https: args.https_listen.clone(),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        },
        connection_limits: Default::default(),
        max_upload: max_upload(args.max_upload.as_deref())?,
        api_cert_lifetime: api_cert_lifetime(args.api_cert_lifetime)?,
    })
}

/// `--api-cert-lifetime`: between a minute and a year.
fn api_cert_lifetime(lifetime: Duration) -> Result<Duration, CliError> {
    if lifetime < Duration::from_secs(60) || lifetime > Duration::from_secs(365 * 86_400) {
        return Err(CliError::Usage(format!(
            "invalid --api-cert-lifetime {}: give a duration between 1m and 365d, such as 6h",
            humantime::format_duration(lifetime)
        )));
    }
    Ok(lifetime)
}

/// `--max-upload`: a size of at least 1mb, or the default 2 GiB.
pub fn max_upload(text: Option<&str>) -> Result<u64, CliError> {
    let Some(text) = text else {
        return Ok(crate::daemon::DEFAULT_MAX_UPLOAD);
    };
    let bytes = Memory::Text(text.to_owned())
        .bytes()
        .map_err(|reason| CliError::Usage(format!("invalid --max-upload: {reason}")))?;
    if bytes < 1 << 20 {
        return Err(CliError::Usage(format!("--max-upload must be at least 1mb, got {text}")));
    }
    Ok(bytes)
}

/// What the node offers: the machine's CPUs and memory (less a little for
/// the node itself), unless --cpus / --memory say otherwise.
pub fn node_resources(cpus: Option<f64>, memory: Option<&str>) -> Result<Resources, CliError> {
    let cpu_millis = match cpus {
        Some(cpus) if cpus > 0.0 && cpus <= 1024.0 => (cpus * 1000.0).round() as u64,
        Some(cpus) => return Err(CliError::Usage(format!("--cpus must be above 0 and at most 1024, got {cpus}"))),
        None => std::thread::available_parallelism().map_or(1, |n| n.get()) as u64 * 1000,
    };
    let memory_bytes = match memory {
        Some(text) => Memory::Text(text.to_owned())
            .bytes()
            .map_err(|reason| CliError::Usage(format!("invalid --memory: {reason}")))?,
        None => machine_memory().saturating_sub(256 << 20),
    };
    Ok(Resources { cpu_millis, memory_bytes })
}

/// MemTotal from /proc/meminfo, or 1 GiB when it cannot be read.
fn machine_memory() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(1 << 30, |kib| kib * 1024)
}

/// Runs a client command and prints its result to `out`.
pub async fn run_client(command: Command, out: &mut dyn Write) -> Result<(), CliError> {
    let io = |e: std::io::Error| CliError::Other(format!("could not write output: {e}"));
    match command {
        Command::Node(NodeCommand::Init { .. }) | Command::Node(NodeCommand::Join { .. }) => {
            Err(CliError::Other("node init and join run the daemon; call them through main".into()))
        }
        Command::Version(MaybeClient { client }) => {
            writeln!(out, "roost {}", crate::VERSION).map_err(io)?;
            if client.endpoint.is_some() {
                let reply = client.connect().await?.version(VersionRequest {}).await?.into_inner();
                writeln!(
                    out,
                    "node {} (id {}) of cluster {} runs roost {}",
                    reply.node_name, reply.node_id, reply.cluster_id, reply.version
                )
                .map_err(io)?;
            }
            Ok(())
        }
        Command::Node(NodeCommand::List { json, stale, client }) => {
            let request = ListNodesRequest { read: Some(ReadOptions { stale }) };
            let nodes = client.connect().await?.list_nodes(request).await?.into_inner().nodes;
            output::nodes(out, &nodes, json).map_err(io)
        }
        Command::Node(NodeCommand::Show { node, json, client }) => {
            let details = client.connect().await?.get_node(GetNodeRequest { node }).await?.into_inner();
            output::node_details(out, &details, json).map_err(io)
        }
        Command::Node(NodeCommand::Token { role, client }) => {
            let role = match role {
                JoinRole::Voter => "voter",
                JoinRole::Worker => "worker",
            };
            let request = GetJoinTokenRequest { role: role.into() };
            let reply = client.connect().await?.get_join_token(request).await?.into_inner();
            writeln!(out, "{}", reply.token).map_err(io)
        }
        Command::Node(NodeCommand::Label { node, set, remove, client }) => {
            let set = parse_labels_named(&set, "a label")?;
            roost_raft::state::validate_label_change(&set, &remove).map_err(CliError::Usage)?;
            let request =
                about(&format!("node:{node}"), LabelNodeRequest { node, set: set.into_iter().collect(), remove });
            let node = client.connect().await?.label_node(request).await?.into_inner();
            let labels = output::node_labels(&node);
            let labels = if labels.is_empty() { "none".to_owned() } else { labels };
            writeln!(out, "Node {} now has labels: {labels}", node.name).map_err(io)
        }
        Command::Node(NodeCommand::Remove { node, client }) => {
            let request = about(&format!("node:{node}"), RemoveNodeRequest { node });
            let reply = client.connect().await?.remove_node(request).await?.into_inner();
            let worker = reply.removed.as_ref().is_some_and(|n| n.role == "worker");
            let name = reply.removed.map(|n| format!("{} (id {})", n.name, n.id)).unwrap_or_default();
            writeln!(out, "Removed node {name}; its certificate is now refused by the cluster.").map_err(io)?;
            writeln!(out, "The join tokens are replaced in a few seconds, once it is out of Raft: `roost node token [--role worker]` then prints the new ones.")
                .map_err(io)?;
            if worker {
                writeln!(out, "Its data directory still holds an API certificate, which a CLI trusts until it expires (at most --api-cert-lifetime, 6h by default, from its last renewal): run `roost cluster rotate-ca` to cut it off at once.")
                    .map_err(io)
            } else {
                writeln!(out, "Its data directory still holds the cluster CA's key, with which it could pass for a node with a CLI: run `roost cluster rotate-ca` to take that away.")
                    .map_err(io)
            }
        }
        Command::Apps(AppsCommand::Create { name, client }) => {
            let request = about_app(&name, CreateAppRequest { name: name.clone() });
            let app = client.connect().await?.create_app(request).await?.into_inner();
            writeln!(out, "Created app {}", app.name).map_err(io)
        }
        Command::Apps(AppsCommand::List { json, stale, client }) => {
            let request = ListAppsRequest { read: Some(ReadOptions { stale }) };
            let apps = client.connect().await?.list_apps(request).await?.into_inner().apps;
            output::apps(out, &apps, json).map_err(io)
        }
        Command::Apps(AppsCommand::Show { name, json, stale, client }) => {
            let request = GetAppRequest { name, read: Some(ReadOptions { stale }) };
            let app = client.connect().await?.get_app(request).await?.into_inner();
            output::app(out, &app, json).map_err(io)
        }
        Command::Apps(AppsCommand::Suspend { name, client }) => apps::set_suspended(name, true, &client, out).await,
        Command::Apps(AppsCommand::Resume { name, client }) => apps::set_suspended(name, false, &client, out).await,
        Command::Deploy(args) => apps::deploy(args, out).await,
        Command::Status { app, json, client } => apps::status(&app, json, &client, out).await,
        Command::Releases { app, json, client } => apps::releases(&app, json, &client, out).await,
        Command::Rollback { app, version, detach, client } => apps::rollback(&app, version, detach, &client, out).await,
        Command::Scale(command) => apps::scale(command, out).await,
        Command::Restart { app, client } => apps::restart(&app, &client, out).await,
        Command::Logs(args) => apps::logs(args, out).await,
        Command::Secrets(command) => apps::secrets(command, out).await,
        Command::Certs(command) => certs(command, out).await,
        Command::Tokens(command) => tokens(command, out).await,
        Command::Cluster(command) => cluster::run(command, out).await,
        Command::Apps(AppsCommand::Destroy { name, yes, client }) => {
            if !yes {
                confirm_destroy(&name)?;
            }
            client.connect().await?.destroy_app(about_app(&name, DestroyAppRequest { name: name.clone() })).await?;
            writeln!(out, "Destroyed app {name}").map_err(io)
        }
    }
}

async fn certs(command: CertsCommand, out: &mut dyn Write) -> Result<(), CliError> {
    let io = |e: std::io::Error| CliError::Other(format!("could not write output: {e}"));
    match command {
        CertsCommand::Add { domain, app, client } => {
            let app = app.resolve()?;
            let request =
                about(&format!("app:{app},domain:{domain}"), AddCertificateRequest { domain, app: app.clone() });
            let certificate = client.connect().await?.add_certificate(request).await?.into_inner();
            writeln!(out, "Added {} to app {}; its certificate is being ordered.", certificate.domain, certificate.app)
                .map_err(io)?;
            writeln!(
                out,
                "Point {} at your nodes (an A or CNAME record): the ACME server checks it over HTTP on port 80 of any node.",
                certificate.domain
            )
            .map_err(io)?;
            writeln!(out, "Follow it with: roost certs show {}", certificate.domain).map_err(io)
        }
        CertsCommand::List { app, json, client } => {
            let request = ListCertificatesRequest { app: app.unwrap_or_default(), read: None };
            let list = client.connect().await?.list_certificates(request).await?.into_inner().certificates;
            output::certificates(out, &list, json).map_err(io)
        }
        CertsCommand::Show { domain, json, client } => {
            let request = GetCertificateRequest { domain, read: None };
            let certificate = client.connect().await?.get_certificate(request).await?.into_inner();
            output::certificate(out, &certificate, json).map_err(io)
        }
        CertsCommand::Remove { domain, client } => {
            let request = about(&format!("domain:{domain}"), RemoveCertificateRequest { domain: domain.clone() });
            client.connect().await?.remove_certificate(request).await?;
            writeln!(out, "Removed {domain}; no node serves it from now on.").map_err(io)
        }
    }
}

async fn tokens(command: TokensCommand, out: &mut dyn Write) -> Result<(), CliError> {
    let io = |e: std::io::Error| CliError::Other(format!("could not write output: {e}"));
    match command {
        TokensCommand::Create { scope, name, expires, json, client } => {
            let expires_in_ms = expires.as_deref().map(parse_expiry).transpose()?.map(|d| d.as_millis() as i64);
            let (token, secret_sha256, public_key) = draw_token(&client, TokenKind::Api)?;
            // The key pair drawn here is what the call may create.
            let target = format!("key:{public_key}.{secret_sha256}");
            let request = about(
                &target,
                CreateTokenRequest { name: name.unwrap_or_default(), scope, expires_in_ms, secret_sha256, public_key },
            );
            let created = client.connect().await?.create_token(request).await?.into_inner();
            output::created_token(out, &CreatedToken { secret: token.to_string(), ..created }, json).map_err(io)
        }
        TokensCommand::List { json, client } => {
            let request = ListTokensRequest { read: None };
            let tokens = client.connect().await?.list_tokens(request).await?.into_inner().tokens;
            output::tokens(out, &tokens, json).map_err(io)
        }
        TokensCommand::Revoke { name, client } => {
            let request = about(&format!("token:{name}"), RevokeTokenRequest { token: name.clone() });
            client.connect().await?.revoke_token(request).await?;
            writeln!(out, "Revoked token {name}; every node refuses it from now on.").map_err(io)
        }
        TokensCommand::Rotate { name, json, client } => {
            // The initial admin token keeps its kind, so it still reads as one.
            let kind = if name == INITIAL_ADMIN { TokenKind::Admin } else { TokenKind::Api };
            let (token, secret_sha256, public_key) = draw_token(&client, kind)?;
            let target = format!("token:{name},key:{public_key}.{secret_sha256}");
            let request = about(&target, RotateTokenRequest { token: name, secret_sha256, public_key });
            let rotated = client.connect().await?.rotate_token(request).await?.into_inner();
            output::created_token(out, &CreatedToken { secret: token.to_string(), ..rotated }, json).map_err(io)
        }
    }
}

/// A new token of this cluster, drawn here: the node is sent only its
/// digest and public key (the second and third values).
fn draw_token(client: &ClientArgs, kind: TokenKind) -> Result<(Token, String, String), CliError> {
    let (_, caller) = client.parts()?;
    let token = Token::generate(kind, caller.ca_digest);
    let (digest, public_key) = (roost_network::pki::secret_digest(&token.secret), token.key().public_key());
    Ok((token, digest, public_key))
}

/// Asks the person at the terminal to type the app's name.
fn confirm_destroy(name: &str) -> Result<(), CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(format!(
            "destroying app '{name}' needs confirmation: pass --yes (stdin is not a terminal)"
        )));
    }
    eprint!("Destroy app '{name}' and everything in it? Type its name to confirm: ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).map_err(|e| CliError::Other(e.to_string()))?;
    if answer.trim() == name {
        Ok(())
    } else {
        Err(CliError::Usage("not confirmed; nothing was destroyed".into()))
    }
}

/// What a node prints once when it creates a cluster.
pub fn init_banner(
    tokens: &crate::daemon::InitTokens,
    address: &str,
    data_dir: &std::path::Path,
    name: &str,
) -> String {
    format!(
        "Created a new Roost cluster; this node ({name}) is its first member.\n\
         \n\
         Join more nodes with:\n  roost node join {address} --token {join} --data-dir DIR --listen HOST:PORT\n\
         (that token may make a node a voter; `roost node token --role worker` prints one for nodes that never vote)\n\
         \n\
         Drive the cluster from any machine with:\n  export ROOST_ENDPOINT={address}\n  export ROOST_TOKEN={admin}\n\
         \n\
         Both tokens are saved in {dir}/join.token and {dir}/admin.token (mode 0600); they are not printed again.\n",
        join = tokens.join,
        admin = tokens.admin,
        dir = data_dir.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_explain_mistakes() {
        let ok = parse_labels(&["region=eu".into(), "disk=ssd".into()]).expect("valid");
        assert_eq!(ok["region"], "eu");
        assert!(matches!(parse_labels(&["region".into()]), Err(CliError::Usage(m)) if m.contains("KEY=VALUE")));
        assert!(matches!(parse_labels(&["=eu".into()]), Err(CliError::Usage(_))));
        assert!(matches!(parse_labels(&["a=1".into(), "a=2".into()]), Err(CliError::Usage(m)) if m.contains("twice")));
    }

    #[test]
    fn client_args_explain_what_is_missing() {
        let none = ClientArgs { endpoint: None, token: None };
        assert!(matches!(none.parts(), Err(CliError::Usage(m)) if m.contains("ROOST_ENDPOINT")));
        let no_token = ClientArgs { endpoint: Some("127.0.0.1:1".into()), token: None };
        assert!(matches!(no_token.parts(), Err(CliError::Auth(m)) if m.contains("ROOST_TOKEN")));
        let join = Token::generate(TokenKind::Join, roost_network::CaDigest::of(b"x"));
        let wrong_kind = ClientArgs { endpoint: Some("127.0.0.1:1".into()), token: Some(join.to_string()) };
        assert!(matches!(wrong_kind.parts(), Err(CliError::Auth(m)) if m.contains("join token")));
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
