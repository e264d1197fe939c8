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
use tokio::net::{TcpListener, TcpSocket};
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
    /// Worker threads, each with its own listeners (SO_REUSEPORT) and
    /// runtime: a connection, its requests and their connections to
    /// instances stay on one thread, as in nginx's workers. One per core.
    pub workers: usize,
}

pub struct Edge {
    balancer: Arc<Balancer>,
    /// Each worker's connections to instances.
    pools: Vec<Arc<Pool>>,
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

/// The edge's listeners, bound before anything else starts so that a taken
/// port stops the node at once: an HTTP and an HTTPS listener per worker,
/// all on the same two addresses (SO_REUSEPORT; the kernel spreads
/// connections among them).
#[derive(Debug)]
pub struct Listeners {
    workers: Vec<(std::net::TcpListener, std::net::TcpListener)>,
    http_addr: SocketAddr,
    https_addr: SocketAddr,
}

fn reuseport(what: &'static str, address: &str, at: SocketAddr) -> Result<std::net::TcpListener, EdgeError> {
    let error = |source| EdgeError::Bind { what, address: address.to_owned(), source };
    let socket = if at.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(error)?;
    socket.set_reuseaddr(true).map_err(error)?;
    socket.set_reuseport(true).map_err(error)?;
    socket.bind(at).map_err(error)?;
    socket.listen(1024).map_err(error)?.into_std().map_err(error)
}

impl Listeners {
    pub async fn bind(config: &EdgeConfig) -> Result<Listeners, EdgeError> {
        let resolve = |what: &'static str, address: &str| {
            let error = |source| EdgeError::Bind { what, address: address.to_owned(), source };
            std::net::ToSocketAddrs::to_socket_addrs(address).map_err(error)?.next().ok_or_else(|| {
                error(std::io::Error::new(std::io::ErrorKind::InvalidInput, "the address resolves to nothing"))
            })
        };
        let (http_what, https_what) = ("HTTP (--http-listen)", "HTTPS (--https-listen)");
        let mut http_addr = resolve(http_what, &config.http)?;
        let mut https_addr = resolve(https_what, &config.https)?;
        let mut workers = Vec::new();
        for _ in 0..config.workers.max(1) {
            let http = reuseport(http_what, &config.http, http_addr)?;
            let https = reuseport(https_what, &config.https, https_addr)?;
            // Port 0: the first listener's port is everyone's.
            let error = |what, address: &str| {
                let address = address.to_owned();
                move |source| EdgeError::Bind { what, address, source }
            };
            http_addr = http.local_addr().map_err(error(http_what, &config.http))?;
            https_addr = https.local_addr().map_err(error(https_what, &config.https))?;
            workers.push((http, https));
        }
        Ok(Listeners { workers, http_addr, https_addr })
    }
}

impl Edge {
    /// Serves the listeners, each worker on a thread and runtime of its
    /// own, until `stop`; `node` is this node's id.
    pub fn start(
        listeners: Listeners,
        node: NodeId,
        hooks: Arc<dyn Hooks>,
        stop: CancellationToken,
    ) -> Result<Arc<Edge>, EdgeError> {
        let Listeners { workers, http_addr, https_addr } = listeners;
        let (routes_tx, routes) = watch::channel(Arc::new(Routes::default()));
        let certificates = Arc::new(Certificates::new(routes.clone()));
        let tls = TlsAcceptor::from(tls::server_config(certificates.clone()).map_err(EdgeError::Tls)?);
        let balancer = Arc::new(Balancer::new(node));
        let mut pools = Vec::new();
        for (index, (http, https)) in workers.into_iter().enumerate() {
            let pool = Arc::new(Pool::default());
            pools.push(pool.clone());
            let shared = Arc::new(Shared {
                routes: routes.clone(),
                balancer: balancer.clone(),
                pool,
                hooks: hooks.clone(),
                https_port: Some(https_addr.port()),
                queue: QUEUE_TIMEOUT,
                connect_timeout: CONNECT_TIMEOUT,
            });
            let (tls, stop) = (tls.clone(), stop.clone());
            let span = tracing::Span::current();
            std::thread::Builder::new()
                .name(format!("edge-{index}"))
                .spawn(move || {
                    let _entered = span.enter();
                    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime,
                        Err(error) => {
                            tracing::error!(%error, "an edge worker could not start its runtime");
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let (http, https) = match (TcpListener::from_std(http), TcpListener::from_std(https)) {
                            (Ok(http), Ok(https)) => (http, https),
                            (Err(error), _) | (_, Err(error)) => {
                                tracing::error!(%error, "an edge worker could not take its listeners");
                                return;
                            }
                        };
                        tokio::spawn(accept(http, shared.clone(), None, stop.clone()));
                        accept(https, shared, Some(tls), stop).await;
                    });
                })
                .map_err(|source| EdgeError::Bind { what: "an edge worker", address: http_addr.to_string(), source })?;
        }
        tracing::info!(http = %http_addr, https = %https_addr, workers = pools.len(), "edge listening");
        Ok(Arc::new(Edge {
            balancer,
            pools,
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
        self.prober.lock().unwrap_or_else(|p| p.into_inner()).sync(&probes, &self.balancer);
        self.balancer.retain(&live);
        for pool in &self.pools {
            pool.retain(&live);
        }
        let mut tcp = self.tcp.lock().await;
        tcp.sync(&self.routes.subscribe(), &self.balancer, CONNECT_TIMEOUT).await;
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
