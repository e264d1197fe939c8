//! TLS for the one port every node serves.
//!
//! Server side, [`incoming`] accepts TCP connections, completes the TLS
//! handshake off the accept loop, and yields [`TlsConnection`]s that tonic
//! serves. A client certificate is optional at the handshake (the CLI and
//! joining nodes have none), but when one is presented it must chain to the
//! cluster CA, and its fingerprint travels with every request as
//! [`PeerIdentity`]; services decide per call whether a node identity is
//! required and whether it has been revoked.
//!
//! Client side, [`ClientTls`] dials a node and trusts it only if it presents a
//! certificate chaining to the cluster CA *pinned by digest*. The digest is
//! all a token holder has, so every client (nodes, the CLI, a joining node)
//! verifies the same way.
//!
//! A node presents one of two certificates, by the server name the client
//! asks for: its node certificate ([`NODE_SERVER_NAME`]: nodes and joining
//! nodes ask for it), or its short-lived API certificate
//! ([`API_SERVER_NAME`]: the CLI asks for it, [`ClientTls::api`], and
//! accepts nothing else).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pki::{self, fingerprint, CaDigest, PkiError, API_SERVER_NAME, NODE_SERVER_NAME};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What the node port lets one client, and all clients together, hold.
///
/// Connections are counted from accept, before the handshake, so a client
/// that opens connections and sends nothing is bounded as much as one that
/// completes them. Nodes, the CLI and joining nodes need a handful each; the
/// caps only bite on a client that hoards. A refused connection is closed at
/// once, and the others (Raft, the CLI) are served as before.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Connections open at once, from all clients (each costs a file
    /// descriptor: keep it well below `ulimit -n`).
    pub max_connections: usize,
    /// Connections open at once from one IP address.
    pub per_client: usize,
    /// How long a client may take to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// How long a connection may pass no byte either way. Served HTTP/2
    /// connections exchange pings more often than this (see the node's
    /// server settings), so only a connection that has stopped speaking
    /// is closed.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            per_client: 128,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// Counts open connections, overall and per client address.
struct Admission {
    limits: ConnectionLimits,
    open: std::sync::Mutex<AdmissionCounts>,
}

#[derive(Default)]
struct AdmissionCounts {
    total: usize,
    per_client: std::collections::HashMap<IpAddr, usize>,
    last_warned: Option<std::time::Instant>,
}

/// One admitted connection; it gives its place back when dropped.
struct Admitted {
    admission: Arc<Admission>,
    client: IpAddr,
}

impl Admission {
    fn admit(self: &Arc<Self>, client: IpAddr) -> Option<Admitted> {
        let mut open = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mine = open.per_client.get(&client).copied().unwrap_or(0);
        if open.total >= self.limits.max_connections || mine >= self.limits.per_client {
            // One line a minute at most: the refused are many by definition.
            let now = std::time::Instant::now();
            if open.last_warned.is_none_or(|at| now.duration_since(at) > Duration::from_secs(60)) {
                open.last_warned = Some(now);
                tracing::warn!(
                    %client,
                    client_connections = mine,
                    total = open.total,
                    "refusing connections on the node port: a connection cap is reached (per client {}, overall {})",
                    self.limits.per_client,
                    self.limits.max_connections
                );
            }
            return None;
        }
        open.total += 1;
        *open.per_client.entry(client).or_default() += 1;
        Some(Admitted { admission: self.clone(), client })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.admission.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        open.total = open.total.saturating_sub(1);
        if let std::collections::hash_map::Entry::Occupied(mut entry) = open.per_client.entry(self.client) {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("could not build the TLS configuration")]
    Config(#[source] rustls::Error),
    #[error("could not build the client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("`{addr}` is not a HOST:PORT address")]
    Address { addr: String },
    #[error("{addr}: {wrong}")]
    WrongCa { addr: String, wrong: WrongCa },
    #[error("{addr}: {refusal}")]
    NoApiCertificate { addr: String, refusal: NoApiCertificate },
    #[error("cannot reach a roost node at {addr}: {reason}")]
    Connect {
        addr: String,
        reason: String,
        /// The node may simply not be up yet (refused, reset, timed out), as
        /// opposed to a node that answered and failed verification.
        transient: bool,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The ALPN protocol of a Raft stream (`roost_raft::stream`), which a node
/// port prefers to `h2` when a client offers both: only nodes do.
pub const RAFT_STREAM_ALPN: &[u8] = b"roost-raft/1";

/// The node port speaks TLS 1.3 only: every client is Roost's own.
const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// What a node presents and trusts when it serves.
pub fn server_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = NodeCerts { trusted: &[ca_pem], ca_pem, cert_pem, key_pem };
    Ok(NodeTlsConfig::build(&certs, None, None)?.server)
}

/// A node's certificate material, PEM: the CAs it trusts, its certificate
/// and the CA that signed it, and its key.
#[derive(Clone, Copy)]
pub struct NodeCerts<'a> {
    /// Every CA whose certificates the node accepts from peers: the
    /// cluster's, and during and after a CA rotation the other one too.
    pub trusted: &'a [&'a str],
    pub ca_pem: &'a str,
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
}

/// What a node presents and trusts, swapped whole at a CA rotation
/// ([`NodeTls::update`]) or when its API certificate is renewed
/// ([`NodeTls::set_api`]): each connection it serves or opens takes the one
/// current at its handshake; connections already open keep theirs.
pub struct NodeTls {
    current: std::sync::RwLock<Arc<NodeTlsConfig>>,
    accept: Option<AcceptServer>,
    /// What `current` was built from.
    inputs: std::sync::Mutex<NodeTlsInputs>,
}

/// A [`NodeTls`]'s certificates, kept to rebuild it when one changes.
#[derive(Clone)]
struct NodeTlsInputs {
    trusted: Vec<String>,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    /// The API certificate and its CA's, PEM.
    api_chain_pem: Option<String>,
}

impl NodeTlsInputs {
    fn of(certs: &NodeCerts<'_>, api_chain_pem: Option<String>) -> Self {
        NodeTlsInputs {
            trusted: certs.trusted.iter().map(|pem| (*pem).to_owned()).collect(),
            ca_pem: certs.ca_pem.to_owned(),
            cert_pem: certs.cert_pem.to_owned(),
            key_pem: certs.key_pem.to_owned(),
            api_chain_pem,
        }
    }

    fn build(&self, accept: Option<AcceptServer>) -> Result<NodeTlsConfig, TlsError> {
        let trusted: Vec<&str> = self.trusted.iter().map(String::as_str).collect();
        let certs =
            NodeCerts { trusted: &trusted, ca_pem: &self.ca_pem, cert_pem: &self.cert_pem, key_pem: &self.key_pem };
        NodeTlsConfig::build(&certs, self.api_chain_pem.as_deref(), accept)
    }
}

/// Presents the API certificate to a client that asks for
/// [`API_SERVER_NAME`] (the CLI), and the node certificate to any other.
#[derive(Debug)]
struct NodeCertResolver {
    node: Arc<rustls::sign::CertifiedKey>,
    api: Option<Arc<rustls::sign::CertifiedKey>>,
}

impl rustls::server::ResolvesServerCert for NodeCertResolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        match (&self.api, hello.server_name()) {
            (Some(api), Some(name)) if name.eq_ignore_ascii_case(API_SERVER_NAME) => Some(api.clone()),
            _ => Some(self.node.clone()),
        }
    }
}

/// One state of a [`NodeTls`].
pub struct NodeTlsConfig {
    pub server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    /// The fingerprint of the certificate the node presents.
    pub fingerprint: Arc<str>,
    /// The digest of the CA that signed it: what a client that reaches the
    /// node pins, and so what an API token for it names.
    pub ca_digest: CaDigest,
    /// The digests of every CA the node trusts.
    pub trusted: Vec<CaDigest>,
    /// The fingerprint of the API certificate it presents to the CLI:
    /// `None` until it has one from its CA. That certificate names the node
    /// certificate ([`pki::api_node_fingerprint`]), so a signed call names
    /// `fingerprint` as its server whichever of the two the client saw.
    pub api_fingerprint: Option<Arc<str>>,
}

impl NodeTlsConfig {
    /// `api_chain_pem` is left out unless the node's CA signed it for the
    /// node's key: after a CA rotation the node presents none until it has
    /// one from the new CA, which a CLI re-pinned to it would accept.
    fn build(
        certs: &NodeCerts<'_>,
        api_chain_pem: Option<&str>,
        accept: Option<AcceptServer>,
    ) -> Result<NodeTlsConfig, TlsError> {
        let ca = pki::cert_der_from_pem(certs.ca_pem)?;
        let cert = pki::cert_der_from_pem(certs.cert_pem)?;
        let key: PrivateKeyDer<'static> = pki::key_der_from_pem(certs.key_pem)?;
        let signing_key = provider().key_provider.load_private_key(key.clone_key()).map_err(TlsError::Config)?;
        let api = match api_chain_pem {
            Some(chain) if api_certificate_of(certs.ca_pem, certs.cert_pem, chain) => {
                Some(pki::cert_der_from_pem(chain)?)
            }
            _ => None,
        };
        let mut roots = RootCertStore::empty();
        let mut digests = Vec::new();
        for pem in certs.trusted.iter().copied().chain([certs.ca_pem]) {
            let der = pki::cert_der_from_pem(pem)?;
            digests.push(CaDigest::of(&der));
            roots.add(der).map_err(TlsError::Config)?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(TlsError::Verifier)?;
        let resolver = NodeCertResolver {
            node: Arc::new(rustls::sign::CertifiedKey::new(vec![cert.clone(), ca.clone()], signing_key.clone())),
            api: api
                .as_ref()
                .map(|leaf| Arc::new(rustls::sign::CertifiedKey::new(vec![leaf.clone(), ca.clone()], signing_key))),
        };
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(resolver));
        server.alpn_protocols = vec![RAFT_STREAM_ALPN.to_vec(), b"h2".to_vec()];
        let verifier = PinnedCaVerifier { digests: digests.clone(), provider: provider(), accept };
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(vec![cert.clone(), ca.clone()], key)
            .map_err(TlsError::Config)?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(NodeTlsConfig {
            server: Arc::new(server),
            client: Arc::new(client),
            fingerprint: fingerprint(&cert).into(),
            ca_digest: CaDigest::of(&ca),
            trusted: digests,
            api_fingerprint: api.map(|leaf| fingerprint(&leaf).into()),
        })
    }
}

/// Whether `chain_pem` is an API certificate (and its CA's) that the CA
/// `ca_pem` signed for the key that `cert_pem` (the node's certificate)
/// certifies, naming that certificate. Its validity is not checked: an
/// expired one is presented, so that the CLI says it expired.
fn api_certificate_of(ca_pem: &str, cert_pem: &str, chain_pem: &str) -> bool {
    let (Ok(ca), Ok(cert), Ok(leaf)) =
        (pki::cert_der_from_pem(ca_pem), pki::cert_der_from_pem(cert_pem), pki::cert_der_from_pem(chain_pem))
    else {
        return false;
    };
    let same_key = match (
        x509_parser::parse_x509_certificate(cert.as_ref()),
        x509_parser::parse_x509_certificate(leaf.as_ref()),
    ) {
        (Ok((_, cert)), Ok((_, leaf))) => cert.public_key().raw == leaf.public_key().raw,
        _ => false,
    };
    let names_cert = pki::api_node_fingerprint(&leaf).is_some_and(|named| named == fingerprint(&cert));
    // Checked at a time it was valid, since expiry does not matter here.
    let Ok((not_before, _)) = pki::validity(chain_pem) else { return false };
    let at = UnixTime::since_unix_epoch(Duration::from_millis(u64::try_from(not_before).unwrap_or(0) + 1_000));
    same_key && names_cert && verify_chain_for(&CaDigest::of(&ca), &ca, &leaf, API_SERVER_NAME, at).is_ok()
}

impl NodeTls {
    /// A node's TLS; its own calls accept a server only if `accept` (given
    /// the server certificate's fingerprint) does: a node checks a peer
    /// against the current members, so a removed node's certificate, though
    /// a trusted CA signed it, opens no connection from the cluster.
    pub fn new(
        certs: &NodeCerts<'_>,
        api_chain_pem: Option<String>,
        accept: Option<AcceptServer>,
    ) -> Result<Arc<NodeTls>, TlsError> {
        let inputs = NodeTlsInputs::of(certs, api_chain_pem);
        let current = inputs.build(accept.clone())?;
        Ok(Arc::new(NodeTls {
            current: std::sync::RwLock::new(Arc::new(current)),
            accept,
            inputs: std::sync::Mutex::new(inputs),
        }))
    }

    /// Presents and trusts `certs` from the next handshake on, and the API
    /// certificate it has if their CA signed it.
    pub fn update(&self, certs: &NodeCerts<'_>) -> Result<(), TlsError> {
        let mut inputs = self.inputs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let next = NodeTlsInputs::of(certs, inputs.api_chain_pem.clone());
        self.install(&mut inputs, next)
    }

    /// Presents `chain_pem` (an API certificate and its CA's) to the CLI
    /// from the next handshake on, if the node's CA signed it for its key.
    /// Whether it does: [`NodeTlsConfig::api`].
    pub fn set_api(&self, chain_pem: String) -> Result<(), TlsError> {
        let mut inputs = self.inputs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let next = NodeTlsInputs { api_chain_pem: Some(chain_pem), ..inputs.clone() };
        self.install(&mut inputs, next)
    }

    fn install(&self, inputs: &mut NodeTlsInputs, next: NodeTlsInputs) -> Result<(), TlsError> {
        let built = Arc::new(next.build(self.accept.clone())?);
        *inputs = next;
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = built;
        Ok(())
    }

    pub fn current(&self) -> Arc<NodeTlsConfig> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

/// Where [`incoming`] takes each handshake's configuration from.
#[derive(Clone)]
pub enum ServerTls {
    Fixed(Arc<rustls::ServerConfig>),
    /// A node's, as it is at the handshake.
    Node(Arc<NodeTls>),
}

impl From<Arc<rustls::ServerConfig>> for ServerTls {
    fn from(config: Arc<rustls::ServerConfig>) -> Self {
        ServerTls::Fixed(config)
    }
}

impl From<Arc<NodeTls>> for ServerTls {
    fn from(tls: Arc<NodeTls>) -> Self {
        ServerTls::Node(tls)
    }
}

impl ServerTls {
    /// The configuration for a handshake now, and the fingerprint of the
    /// node certificate it presents, or that the API certificate it
    /// presents names (for a node's).
    fn now(&self) -> (Arc<rustls::ServerConfig>, Option<Arc<str>>) {
        match self {
            ServerTls::Fixed(config) => (config.clone(), None),
            ServerTls::Node(tls) => {
                let current = tls.current();
                (current.server.clone(), Some(current.fingerprint.clone()))
            }
        }
    }
}

/// Who is on the other end of a connection, as far as TLS could tell.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    pub remote_addr: Option<SocketAddr>,
    /// Fingerprint of the client certificate, present when the peer is a node.
    pub node_fingerprint: Option<String>,
    /// The TLS session's exporter value ([`session_binding`]): what a signed
    /// API call signs, so its signature is good on this connection alone.
    pub session: Option<[u8; 32]>,
    /// The client's certificate (DER), present when the peer is a node.
    pub node_certificate: Option<Arc<[u8]>>,
    /// The fingerprint of the node certificate this node presented on the
    /// connection, or that the API certificate it presented names: what a
    /// signed call names (the node's own may have changed since, at a CA
    /// rotation).
    pub server_fingerprint: Option<Arc<str>>,
}

/// The label of the exporter value both ends of a TLS session derive
/// (RFC 8446 §7.5): equal on both ends of one session, unrelated on any
/// other, and unknown to anyone but the two ends.
const SESSION_EXPORTER_LABEL: &[u8] = b"EXPORTER-roost-session-binding";

/// The exporter value of a TLS 1.3 session that has completed its handshake.
pub fn session_binding<D>(connection: &rustls::ConnectionCommon<D>) -> Option<[u8; 32]> {
    connection.export_keying_material([0u8; 32], SESSION_EXPORTER_LABEL, None).ok()
}

/// A server-side TLS connection, with the identity tonic hands to services.
/// It holds its place under the connection caps, and fails with `TimedOut`
/// once no byte has passed either way for the idle timeout.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    identity: PeerIdentity,
    _admitted: Admitted,
    idle_timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
}

impl TlsConnection {
    fn active(&mut self) {
        self.idle.as_mut().reset(tokio::time::Instant::now() + self.idle_timeout);
    }

    /// Whether the client asked for a Raft stream rather than gRPC.
    pub fn is_raft_stream(&self) -> bool {
        self.stream.get_ref().1.alpn_protocol() == Some(RAFT_STREAM_ALPN)
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> PeerIdentity {
        self.identity.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.active();
                }
                Poll::Ready(result)
            }
            // The server always has a read pending, so this is where a
            // connection that has gone quiet is noticed.
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle connection closed"))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts connections on `listener` until `shutdown` fires, handshaking each
/// on its own task so that a slow or hostile peer cannot stall the others.
pub fn incoming(
    listener: TcpListener,
    tls: impl Into<ServerTls>,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<TlsConnection>> {
    let (tx, rx) = mpsc::channel(64);
    let tls: ServerTls = tls.into();
    let admission = Arc::new(Admission { limits, open: Default::default() });
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Running out of file descriptors is the usual cause; back off briefly.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Dropping the socket closes it: the client learns at once.
            let Some(admitted) = admission.admit(remote.ip()) else { continue };
            let _ = tcp.set_nodelay(true);
            let (config, server_fingerprint) = tls.now();
            let acceptor = TlsAcceptor::from(config);
            let tx = tx.clone();
            let limits = admission.limits.clone();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(%remote, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let node_certificate = stream.get_ref().1.peer_certificates().and_then(|certs| certs.first());
                let node_fingerprint = node_certificate.map(|cert| fingerprint(cert));
                let node_certificate = node_certificate.map(|cert| Arc::from(cert.as_ref()));
                let session = session_binding(stream.get_ref().1);
                let identity = PeerIdentity {
                    remote_addr: Some(remote),
                    node_fingerprint,
                    node_certificate,
                    session,
                    server_fingerprint,
                };
                let idle = Box::pin(tokio::time::sleep(limits.idle_timeout));
                let connection =
                    TlsConnection { stream, identity, _admitted: admitted, idle_timeout: limits.idle_timeout, idle };
                let _ = tx.send(Ok(connection)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// How a client reaches nodes: the CA it pins and, for nodes, its own identity.
#[derive(Clone)]
pub struct ClientTls {
    source: ClientSource,
    /// The name it asks the server for: [`NODE_SERVER_NAME`], or
    /// [`API_SERVER_NAME`] for the CLI.
    server_name: &'static str,
}

/// Where a client's configuration comes from at each connection it opens.
#[derive(Clone)]
enum ClientSource {
    Fixed(Arc<rustls::ClientConfig>),
    /// A node's, which a CA rotation changes.
    Node(Arc<NodeTls>),
}

impl ClientSource {
    fn config(&self) -> Arc<rustls::ClientConfig> {
        match self {
            ClientSource::Fixed(config) => config.clone(),
            ClientSource::Node(tls) => tls.current().client.clone(),
        }
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl ClientTls {
    /// A client that trusts the node API certificates ([`API_SERVER_NAME`])
    /// of the cluster whose CA has this digest, while they are valid, and
    /// presents no certificate: the CLI. A node certificate does not pass
    /// for one, so a removed node's data directory serves a CLI only until
    /// its last API certificate expires.
    pub fn api(ca_digest: CaDigest) -> Result<Self, TlsError> {
        Ok(Self { server_name: API_SERVER_NAME, ..Self::anonymous(ca_digest)? })
    }

    /// A client that trusts the node certificates of the cluster whose CA
    /// has this digest, and presents no certificate: a node that has not
    /// joined yet (the seed also proves it knows the join secret).
    pub fn anonymous(ca_digest: CaDigest) -> Result<Self, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier::new(ca_digest)));
        let mut config = builder.with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { source: ClientSource::Fixed(Arc::new(config)), server_name: NODE_SERVER_NAME })
    }

    /// A client that presents a node certificate.
    pub fn node(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let certs = NodeCerts { trusted: &[ca_pem], ca_pem, cert_pem, key_pem };
        Ok(Self {
            source: ClientSource::Fixed(NodeTlsConfig::build(&certs, None, None)?.client),
            server_name: NODE_SERVER_NAME,
        })
    }

    /// A node's client: it presents what `tls` holds at each connection it
    /// opens, and trusts what `tls` trusts then.
    pub fn of_node(tls: Arc<NodeTls>) -> Self {
        Self { source: ClientSource::Node(tls), server_name: NODE_SERVER_NAME }
    }

    /// Connects to `addr` now, so that an unreachable node or a node of
    /// another cluster is reported as such rather than on first use.
    pub async fn connect(&self, addr: &str) -> Result<Channel, TlsError> {
        self.connect_with(addr, self.connector()).await
    }

    /// [`ClientTls::connect`], also giving the exporter value of the TLS
    /// session the channel opened (and of the one it reopens after a
    /// failure): what a signed API call signs.
    pub async fn connect_bound(&self, addr: &str) -> Result<(Channel, SessionSlot), TlsError> {
        let slot = SessionSlot::default();
        let connector = TlsConnectorService { session: Some(slot.clone()), ..self.connector() };
        Ok((self.connect_with(addr, connector).await?, slot))
    }

    async fn connect_with(&self, addr: &str, connector: TlsConnectorService) -> Result<Channel, TlsError> {
        let endpoint = self.endpoint(addr)?;
        endpoint.connect_with_connector(connector).await.map_err(|e| connect_error(addr, &e))
    }

    fn endpoint(&self, addr: &str) -> Result<Endpoint, TlsError> {
        Ok(Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|_| TlsError::Address { addr: addr.to_owned() })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5)))
    }

    fn connector(&self) -> TlsConnectorService {
        TlsConnectorService { source: self.source.clone(), server_name: self.server_name, session: None }
    }

    /// Opens a Raft stream to `addr`: TCP, then TLS offering
    /// [`RAFT_STREAM_ALPN`] before `h2`. `Ok(None)`: the node chose `h2`, as
    /// one from before Raft streams does.
    pub async fn connect_raft_stream(
        &self,
        addr: &str,
    ) -> Result<Option<tokio_rustls::client::TlsStream<TcpStream>>, TlsError> {
        let mut config = (*self.source.config()).clone();
        config.alpn_protocols = vec![RAFT_STREAM_ALPN.to_vec(), b"h2".to_vec()];
        let connect = tls_connect(Arc::new(config), self.server_name, addr);
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(connect_error(addr, &e)),
            Err(_) => {
                return Err(TlsError::Connect { addr: addr.to_owned(), reason: "timed out".into(), transient: true })
            }
        };
        Ok((stream.get_ref().1.alpn_protocol() == Some(RAFT_STREAM_ALPN)).then_some(stream))
    }

    /// A channel to `addr` (HOST:PORT) that connects on first use and
    /// reconnects after failures, as tonic channels do.
    pub fn channel(&self, addr: &str) -> Result<Channel, TlsError> {
        Ok(self.endpoint(addr)?.connect_with_connector_lazy(self.connector()))
    }
}

/// A client's view of a TLS session: its exporter value
/// ([`session_binding`]), the server a signed call names, and the
/// certificate the server presented.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub exporter: [u8; 32],
    /// The fingerprint of the server's node certificate: the one it
    /// presented, or the one its API certificate names.
    pub server: String,
    /// The fingerprint of the certificate it presented.
    pub presented: String,
}

/// The [`Session`] a channel has open, set by the connector on every
/// connection it opens.
#[derive(Clone, Debug, Default)]
pub struct SessionSlot(Arc<std::sync::Mutex<Option<Session>>>);

impl SessionSlot {
    pub fn get(&self) -> Option<Session> {
        self.0.lock().ok().and_then(|session| session.clone())
    }

    fn set(&self, session: Option<Session>) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = session;
        }
    }
}

/// The tower service tonic calls to open a connection: TCP, then TLS.
#[derive(Clone)]
struct TlsConnectorService {
    source: ClientSource,
    server_name: &'static str,
    /// Where to put each new session's exporter value, when asked.
    session: Option<SessionSlot>,
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>> + Send>>;

impl tower::Service<Uri> for TlsConnectorService {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.source.config();
        let slot = self.session.clone();
        let server_name = self.server_name;
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "address has no host:port"))?
                .as_str()
                .to_owned();
            let stream = tls_connect(config, server_name, &authority).await?;
            if let Some(slot) = slot {
                let connection = stream.get_ref().1;
                let leaf = connection.peer_certificates().and_then(|certs| certs.first());
                let exporter = session_binding(connection);
                let session = leaf.zip(exporter).and_then(|(leaf, exporter)| {
                    let server = match server_name {
                        API_SERVER_NAME => pki::api_node_fingerprint(leaf)?,
                        _ => fingerprint(leaf),
                    };
                    Some(Session { exporter, server, presented: fingerprint(leaf) })
                });
                slot.set(session);
            }
            Ok(TokioIo::new(stream))
        })
    }
}

/// TCP to `addr` (no delay), then TLS with `config`, asking for `server_name`.
async fn tls_connect(
    config: Arc<rustls::ClientConfig>,
    server_name: &'static str,
    addr: &str,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(server_name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    TlsConnector::from(config).connect(name, tcp).await
}

/// What a failed connection to `addr` was: a server this client refused
/// (another cluster's CA, no API certificate), or one it could not reach.
fn connect_error(addr: &str, e: &(dyn std::error::Error + 'static)) -> TlsError {
    if let Some(wrong) = refusal::<WrongCa>(e) {
        TlsError::WrongCa { addr: addr.to_owned(), wrong }
    } else if let Some(refusal) = refusal::<NoApiCertificate>(e) {
        TlsError::NoApiCertificate { addr: addr.to_owned(), refusal }
    } else {
        TlsError::Connect { addr: addr.to_owned(), reason: innermost(e), transient: is_transient(e) }
    }
}

/// Whether a node accepts a server certificate, by its fingerprint
/// ([`pki::fingerprint`]).
pub type AcceptServer = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// A server refused for the CA it presented: not one the client pins.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the node presented CA {presented}, not the cluster CA this token pins ({pinned}): it belongs to another cluster, or the cluster's CA was rotated (`roost cluster rotate-ca`; the token then keeps its secret, and an admin can give it to you with the new CA's digest)")]
pub struct WrongCa {
    /// Short digests.
    pub presented: String,
    pub pinned: String,
}

/// A server refused by a client that asked for its API certificate
/// ([`ClientTls::api`]): it presented none, or one that is not valid now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoApiCertificate {
    #[error("the node presents no API certificate: it is not a current member of the cluster (it was removed?), or it has just started or joined and is getting one (try again in a few seconds), or it is an older roost")]
    Missing,
    #[error("the node's API certificate expired: it was removed from the cluster, or it has been cut off from the cluster's voters for longer than an API certificate lives (or this machine's clock is wrong)")]
    Expired,
    #[error("the node's API certificate is not valid yet: this machine's clock is behind the cluster's")]
    NotYetValid,
}

/// The typed refusal `T` in an error chain, if the handshake failed for it.
fn refusal<T: std::error::Error + Clone + 'static>(error: &(dyn std::error::Error + 'static)) -> Option<T> {
    let mut current = Some(error);
    while let Some(e) = current {
        let io_inner = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref());
        for candidate in [Some(e), io_inner.map(|i| i as &(dyn std::error::Error + 'static))].into_iter().flatten() {
            if let Some(rustls::Error::Other(other)) = candidate.downcast_ref::<rustls::Error>() {
                if let Some(wrong) = other.0.downcast_ref::<T>() {
                    return Some(wrong.clone());
                }
            }
        }
        current = e.source();
    }
    None
}

/// Trusts a server whose chain includes a CA with a pinned digest and
/// whose certificate that CA signed (and, when set, that `accept` accepts).
struct PinnedCaVerifier {
    digests: Vec<CaDigest>,
    provider: Arc<CryptoProvider>,
    accept: Option<AcceptServer>,
}

impl std::fmt::Debug for PinnedCaVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digests: Vec<String> = self.digests.iter().map(short).collect();
        f.debug_struct("PinnedCaVerifier").field("digests", &digests).finish_non_exhaustive()
    }
}

impl PinnedCaVerifier {
    fn new(digest: CaDigest) -> Self {
        Self { digests: vec![digest], provider: provider(), accept: None }
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates.iter().find(|c| self.digests.contains(&CaDigest::of(c))).ok_or_else(|| {
            let presented = intermediates.first().map_or_else(|| "none".to_owned(), |c| short(&CaDigest::of(c)));
            let pinned = self.digests.iter().map(short).collect::<Vec<_>>().join(" or ");
            rustls::Error::Other(rustls::OtherError(Arc::new(WrongCa { presented, pinned })))
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let api = matches!(server_name, ServerName::DnsName(name) if name.as_ref() == API_SERVER_NAME);
        let verified =
            verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now).map_err(|error| {
                use rustls::CertificateError::*;
                let refusal = match &error {
                    rustls::Error::InvalidCertificate(NotValidForName | NotValidForNameContext { .. }) => {
                        NoApiCertificate::Missing
                    }
                    rustls::Error::InvalidCertificate(Expired | ExpiredContext { .. }) => NoApiCertificate::Expired,
                    rustls::Error::InvalidCertificate(NotValidYet | NotValidYetContext { .. }) => {
                        NoApiCertificate::NotYetValid
                    }
                    _ => return error,
                };
                if api {
                    rustls::Error::Other(rustls::OtherError(Arc::new(refusal)))
                } else {
                    error
                }
            })?;
        if let Some(accept) = &self.accept {
            if !accept(&pki::fingerprint(end_entity)) {
                return Err(rustls::Error::General(
                    "the server presents the certificate of a node that is not a member of the cluster (removed?)"
                        .to_owned(),
                ));
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The most specific message in an error's chain: "connection refused"
/// says more than "transport error".
pub fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    if timed_out(error) {
        return "timed out connecting".to_owned();
    }
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// Whether the chain holds a timeout: tokio's `Elapsed`, or an I/O error of
/// kind `TimedOut` (what the connect timeout of tonic's endpoint becomes).
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.downcast_ref::<tokio::time::error::Elapsed>().is_some()
            || e.downcast_ref::<io::Error>().is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
        {
            return true;
        }
        current = e.source();
    }
    false
}

/// Whether a connection failure looks like "not up yet" rather than "wrong
/// peer": the error chain holds a refused, reset or timed-out socket.
fn is_transient(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            use io::ErrorKind::*;
            if matches!(io.kind(), ConnectionRefused | ConnectionReset | ConnectionAborted | TimedOut | NotConnected) {
                return true;
            }
        }
        current = e.source();
    }
    timed_out(error)
}

fn short(digest: &CaDigest) -> String {
    digest.to_hex()[..12].to_owned()
}

/// Whether the CA `ca_pem` signed the node certificate `cert_pem`.
pub fn signed_by(ca_pem: &str, cert_pem: &str) -> bool {
    let (Ok(ca), Ok(cert)) = (pki::cert_der_from_pem(ca_pem), pki::cert_der_from_pem(cert_pem)) else {
        return false;
    };
    verify_chain(&CaDigest::of(&ca), &ca, &cert).is_ok()
}

/// Checks that `leaf` chains to the CA `ca` and that `ca` has the digest
/// `pin`: the same test a client applies during the handshake.
pub fn verify_chain(pin: &CaDigest, ca: &CertificateDer<'_>, leaf: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    verify_chain_for(pin, ca, leaf, NODE_SERVER_NAME, UnixTime::now())
}

/// [`verify_chain`] for the server name `name`, at `now`.
fn verify_chain_for(
    pin: &CaDigest,
    ca: &CertificateDer<'_>,
    leaf: &CertificateDer<'_>,
    name: &str,
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let name = ServerName::try_from(name).map_err(|e| rustls::Error::General(e.to_string()))?;
    PinnedCaVerifier::new(*pin).verify_server_cert(leaf, std::slice::from_ref(ca), &name, &[], now).map(|_| ())
}

/// Whether `chain_pem` is an API certificate that the CA `ca_pem` signed
/// and that is valid now: what a CLI that pins that CA accepts.
pub fn api_certificate_valid(ca_pem: &str, chain_pem: &str) -> bool {
    let (Ok(ca), Ok(leaf)) = (pki::cert_der_from_pem(ca_pem), pki::cert_der_from_pem(chain_pem)) else {
        return false;
    };
    verify_chain_for(&CaDigest::of(&ca), &ca, &leaf, API_SERVER_NAME, UnixTime::now()).is_ok()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    use super::*;

    /// A node port on loopback with `limits`, whose server reads every
    /// connection until it ends (as hyper does) and echoes nothing; and a
    /// client config that trusts it.
    async fn node_port(limits: ConnectionLimits) -> (SocketAddr, Arc<rustls::ClientConfig>, CancellationToken) {
        let ca = pki::ClusterCa::generate("test").expect("a CA");
        let node = ca.issue_node("n1").expect("a node certificate");
        let config = server_config(ca.cert_pem(), &node.cert_pem, &node.key_pem).expect("a server config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let address = listener.local_addr().expect("an address");
        let stop = CancellationToken::new();
        let mut connections = incoming(listener, config, limits, stop.clone());
        tokio::spawn(async move {
            while let Some(Ok(mut connection)) = connections.next().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while matches!(connection.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        let client = ClientTls::anonymous(ca.digest()).expect("a client");
        (address, client.source.config(), stop)
    }

    async fn connect(
        address: SocketAddr,
        config: &Arc<rustls::ClientConfig>,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(address).await?;
        let name =
            ServerName::try_from(NODE_SERVER_NAME).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut stream = TlsConnector::from(config.clone()).connect(name, tcp).await?;
        // TLS 1.3 servers send their session tickets after the handshake;
        // a refused connection shows here at the latest.
        stream.write_all(b"x").await?;
        stream.flush().await?;
        Ok(stream)
    }

    /// Whether the server closes `stream` within `within`.
    async fn closed_within(stream: &mut tokio_rustls::client::TlsStream<TcpStream>, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// A node's port presenting `api` (if any) to the CLI, on loopback.
    async fn api_port(ca: &pki::ClusterCa, node: &pki::NodeCredentials, api: Option<String>) -> (String, Arc<NodeTls>) {
        let certs = NodeCerts {
            trusted: &[ca.cert_pem()],
            ca_pem: ca.cert_pem(),
            cert_pem: &node.cert_pem,
            key_pem: &node.key_pem,
        };
        let tls = NodeTls::new(&certs, api, None).expect("a node's TLS");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let address = listener.local_addr().expect("an address").to_string();
        let mut connections = incoming(listener, tls.clone(), ConnectionLimits::default(), CancellationToken::new());
        tokio::spawn(async move { while connections.next().await.is_some() {} });
        (address, tls)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cli_takes_a_current_api_certificate_and_no_node_certificate_nor_an_expired_one() {
        let ca = pki::ClusterCa::generate("test").expect("a CA");
        let node = ca.issue_node("n1").expect("a node certificate");
        let key = pki::NodeKey::from_pem(&node.key_pem).expect("its key").public_key();
        let api = ca.issue_api("n1", &key, &node.fingerprint, Duration::from_secs(3600)).expect("an API certificate");
        let api_fingerprint = fingerprint(&pki::cert_der_from_pem(&api).expect("pem"));

        // With one: the CLI gets it, and a node its node certificate.
        let (address, tls) = api_port(&ca, &node, Some(api.clone())).await;
        assert_eq!(tls.current().api_fingerprint.as_deref(), Some(api_fingerprint.as_str()));
        let (_channel, session) =
            ClientTls::api(ca.digest()).expect("a CLI client").connect_bound(&address).await.expect("the CLI connects");
        let session = session.get().expect("a session");
        assert_eq!(session.presented, api_fingerprint, "the CLI saw the API certificate");
        assert_eq!(session.server, node.fingerprint, "which names the node certificate, as a signed call does");
        let (_channel, session) = ClientTls::anonymous(ca.digest())
            .expect("a client")
            .connect_bound(&address)
            .await
            .expect("a node connects");
        let session = session.get().expect("a session");
        assert_eq!((session.presented, session.server), (node.fingerprint.clone(), node.fingerprint.clone()));

        // Without one (a removed node's node certificate): refused.
        let (address, _) = api_port(&ca, &node, None).await;
        let refused = ClientTls::api(ca.digest()).expect("a CLI client").connect(&address).await;
        assert!(
            matches!(refused, Err(TlsError::NoApiCertificate { refusal: NoApiCertificate::Missing, .. })),
            "{refused:?}"
        );

        // One for another node's key, or naming another certificate, is not
        // presented.
        let other = pki::NodeKey::generate().expect("a key").public_key();
        let foreign = ca.issue_api("n2", &other, &node.fingerprint, Duration::from_secs(3600)).expect("another's");
        let (_, tls) = api_port(&ca, &node, Some(foreign)).await;
        assert!(tls.current().api_fingerprint.is_none(), "an API certificate for another key was taken");
        let misnamed = ca.issue_api("n1", &key, &"0".repeat(64), Duration::from_secs(3600)).expect("misnamed");
        let (_, tls) = api_port(&ca, &node, Some(misnamed)).await;
        assert!(tls.current().api_fingerprint.is_none(), "an API certificate naming another certificate was taken");

        // Past its end, or before its start: refused, and says which.
        let ca_der = pki::cert_der_from_pem(ca.cert_pem()).expect("der");
        let leaf = pki::cert_der_from_pem(&api).expect("der");
        let (not_before, not_after) = pki::validity(&api).expect("a validity");
        for (at_ms, expected) in
            [(not_after + 1_000, NoApiCertificate::Expired), (not_before - 1_000, NoApiCertificate::NotYetValid)]
        {
            let at = UnixTime::since_unix_epoch(Duration::from_millis(u64::try_from(at_ms).expect("after 1970")));
            let error = verify_chain_for(&ca.digest(), &ca_der, &leaf, API_SERVER_NAME, at).expect_err("refused");
            assert_eq!(refusal::<NoApiCertificate>(&error), Some(expected), "{error}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_that_passes_no_byte_for_the_idle_timeout_is_closed_and_an_active_one_is_not() {
        let limits = ConnectionLimits { idle_timeout: Duration::from_millis(600), ..ConnectionLimits::default() };
        let (address, client, stop) = node_port(limits).await;
        let mut quiet = connect(address, &client).await.expect("a connection");
        let mut busy = connect(address, &client).await.expect("another");
        // The busy one sends a byte every 100 ms for 1.8 s, three idle
        // timeouts, and is still open; the quiet one is closed meanwhile.
        for _ in 0..18 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            busy.write_all(b"x").await.expect("the busy connection is open");
            busy.flush().await.expect("flushed");
        }
        assert!(closed_within(&mut quiet, Duration::from_secs(10)).await, "the quiet connection was closed");
        assert!(!closed_within(&mut busy, Duration::from_millis(100)).await, "the busy connection is open");
        assert!(closed_within(&mut busy, Duration::from_secs(10)).await, "and closed once it is quiet too");
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_past_the_total_cap_are_refused_until_one_closes() {
        let limits = ConnectionLimits { max_connections: 2, per_client: 2, ..ConnectionLimits::default() };
        let (address, client, stop) = node_port(limits).await;
        let first = connect(address, &client).await.expect("a first connection");
        let _second = connect(address, &client).await.expect("a second connection");
        let refused = connect(address, &client).await;
        assert!(refused.is_err(), "a third connection over a cap of 2 was served");
        drop(first);
        // The server lets the slot go once it sees the first one end.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match connect(address, &client).await {
                Ok(_) => break,
                Err(error) => {
                    assert!(tokio::time::Instant::now() < deadline, "no connection after one closed: {error}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        stop.cancel();
    }
}
