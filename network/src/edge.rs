//! The edge: every node takes external HTTP, HTTPS and TCP traffic for any
//! app and hands it to a healthy instance anywhere in the cluster, over the
//! mesh.
//!
//! Layout:
//! - [`routes`]: the routing table, a pure function of the state.
//! - [`balance`]: which instance takes a request (local first, least
//!   loaded, soft and hard limits, this edge's own view of who is reachable).
//! - [`probe`]: that view, from a connect to each instance per check interval.
//! - [`pool`]: keep-alive connections to instances.
//! - [`http`]: the proxy itself (hyper), for HTTP/1.1 and HTTP/2 clients.
//! - [`tls`]: certificates by SNI (ACME, or the cluster CA for APP.DOMAIN).
//! - [`tcp`]: raw TCP services.
//!
//! [`Edge`] binds the listeners and keeps everything in step with the
//! routes the node gives it ([`Edge::update`]).

pub mod balance;
pub mod http;
pub mod pool;
pub mod probe;
pub mod routes;
pub mod tcp;
pub mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use roost_raft::NodeId;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use self::balance::Balancer;
use self::http::{Client, Hooks, Shared};
use self::pool::Pool;
use self::probe::Prober;
use self::routes::Routes;
use self::tcp::TcpServices;
use self::tls::Certificates;

/// How long a connection to an instance may take: instances are on the
/// mesh, a LAN or better, so a slow connect means a dead one.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a request waits when every instance is at its hard limit.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for a client's TLS handshake, and for a request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("could not listen for {what} on {address}")]
    Bind {
        what: &'static str,
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not make the edge's TLS configuration")]
    Tls(#[source] rustls::Error),
}

/// Where the edge listens.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// HOST:PORT for plain HTTP (`--http-listen`).
    pub http: String,
    /// HOST:PORT for HTTPS (`--https-listen`).
    pub https: String,
}

pub struct Edge {
    shared: Arc<Shared>,
    certificates: Arc<Certificates>,
    routes: watch::Sender<Arc<Routes>>,
    prober: Mutex<Prober>,
    tcp: tokio::sync::Mutex<TcpServices>,
    http_addr: SocketAddr,
    https_addr: SocketAddr,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge").field("http", &self.http_addr).field("https", &self.https_addr).finish_non_exhaustive()
    }
}

/// The edge's two listeners, bound before anything else starts so that a
/// taken port stops the node at once.
#[derive(Debug)]
pub struct Listeners {
    http: TcpListener,
    https: TcpListener,
    http_addr: SocketAddr,
    https_addr: SocketAddr,
}

impl Listeners {
    pub async fn bind(config: &EdgeConfig) -> Result<Listeners, EdgeError> {
        let bind = |what: &'static str, address: String| async move {
            let error = |source| EdgeError::Bind { what, address: address.clone(), source };
            let listener = TcpListener::bind(&address).await.map_err(error)?;
            let bound = listener.local_addr().map_err(error)?;
            Ok::<_, EdgeError>((listener, bound))
        };
        let (http, http_addr) = bind("HTTP (--http-listen)", config.http.clone()).await?;
        let (https, https_addr) = bind("HTTPS (--https-listen)", config.https.clone()).await?;
        Ok(Listeners { http, https, http_addr, https_addr })
    }
}

impl Edge {
    /// Serves the listeners until `stop`; `node` is this node's id.
    pub fn start(
        listeners: Listeners,
        node: NodeId,
        hooks: Arc<dyn Hooks>,
        stop: CancellationToken,
    ) -> Result<Arc<Edge>, EdgeError> {
        let Listeners { http: http_listener, https: https_listener, http_addr, https_addr } = listeners;
        let (routes_tx, routes) = watch::channel(Arc::new(Routes::default()));
        let certificates = Arc::new(Certificates::new(routes.clone()));
        let tls = TlsAcceptor::from(tls::server_config(certificates.clone()).map_err(EdgeError::Tls)?);
        let shared = Arc::new(Shared {
            routes,
            balancer: Arc::new(Balancer::new(node)),
            pool: Pool::default(),
            hooks,
            https_port: Some(https_addr.port()),
            queue: QUEUE_TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
        });
        tokio::spawn(accept(http_listener, shared.clone(), None, stop.clone()));
        tokio::spawn(accept(https_listener, shared.clone(), Some(tls), stop));
        tracing::info!(http = %http_addr, https = %https_addr, "edge listening");
        Ok(Arc::new(Edge {
            shared,
            certificates,
            routes: routes_tx,
            prober: Mutex::new(Prober::default()),
            tcp: tokio::sync::Mutex::new(TcpServices::new(http_addr.ip())),
            http_addr,
            https_addr,
        }))
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr
    }

    pub fn certificates(&self) -> &Arc<Certificates> {
        &self.certificates
    }

    /// Takes new routes: probes, TCP listeners and remembered instances
    /// follow them.
    pub async fn update(&self, routes: Routes) {
        let probes = routes.probes();
        let live: Vec<SocketAddr> = probes.keys().copied().collect();
        self.routes.send_if_modified(|current| {
            let changed = **current != routes;
            if changed {
                *current = Arc::new(routes);
            }
            changed
        });
        self.prober.lock().unwrap_or_else(|p| p.into_inner()).sync(&probes, &self.shared.balancer);
        self.shared.balancer.retain(&live);
        self.shared.pool.retain(&live);
        let mut tcp = self.tcp.lock().await;
        tcp.sync(&self.shared.routes, &self.shared.balancer, CONNECT_TIMEOUT).await;
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, tls: Option<TlsAcceptor>, stop: CancellationToken) {
    loop {
        let (stream, addr) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(%error, "accept failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (shared, tls, stop) = (shared.clone(), tls.clone(), stop.clone());
        tokio::spawn(async move {
            let client = Client { addr, tls: tls.is_some() };
            match tls {
                None => serve(stream, client, shared, stop).await,
                Some(tls) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                    Ok(Ok(stream)) => serve(stream, client, shared, stop).await,
                    Ok(Err(error)) => tracing::debug!(%error, client = %addr, "TLS handshake failed"),
                    Err(_) => tracing::debug!(client = %addr, "TLS handshake timed out"),
                },
            }
        });
    }
}

/// Serves one client connection, HTTP/1.1 or HTTP/2, until it closes or
/// the node stops.
async fn serve<S>(stream: S, client: Client, shared: Arc<Shared>, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    let service = hyper::service::service_fn(move |request| http::handle(shared.clone(), client, request));
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::select! {
        served = connection => {
            if let Err(error) = served {
                tracing::debug!(%error, client = %client.addr, "client connection ended");
            }
        }
        () = stop.cancelled() => {}
    }
}
