//! The HTTP side of the edge: one request in, one instance's answer out.
//!
//! For each request: the host name picks the app ([`Routes::host`]); plain
//! HTTP answers ACME challenges and, for `force_https` apps, redirects; the
//! balancer picks an instance ([`Balancer::acquire`]); the request goes to
//! it over the mesh on a keep-alive connection ([`Pool`]), its body
//! streamed as it arrives, with `X-Forwarded-For`/`-Proto`/`-Host` and a
//! `Roost-Request-Id`. A connection that fails is retried on another
//! instance (the body has not been sent yet); a request without a body is
//! also retried when its instance goes away before answering. The answer's
//! body streams back; when it ends the connection returns to the pool, the
//! instance's slot is freed, and one access-log line is written. WebSocket
//! (and other) upgrades become a byte tunnel between client and instance.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::balance::{Balancer, Lease, Unavailable, SECOND_ROUND_PAUSE};
use super::pool::{Pool, UpstreamBody};
use super::routes::{AppRoute, HostMatch, Routes};

pub type BoxError = Box<dyn StdError + Send + Sync>;
/// The body of an answer the edge sends to a client.
pub type EdgeBody = BoxBody<Bytes, BoxError>;

/// The request id header the edge adds to every request and answer.
pub const REQUEST_ID: &str = "roost-request-id";
const ACME_CHALLENGE: &str = "/.well-known/acme-challenge/";

/// What the node gives the edge beyond the routes.
pub trait Hooks: Send + Sync {
    /// Catches this node's state up with the leader's (a linearizable read),
    /// for an ACME challenge that arrived before its token did.
    fn catch_up(&self) -> futures::future::BoxFuture<'static, ()>;
}

/// What every request handler shares.
pub struct Shared {
    pub routes: watch::Receiver<Arc<Routes>>,
    pub balancer: Arc<Balancer>,
    pub pool: Arc<Pool>,
    pub hooks: Arc<dyn Hooks>,
    /// Where this node serves HTTPS, for `force_https` redirects.
    pub https_port: Option<u16>,
    /// How long a request waits for a slot when every instance is at its
    /// hard limit.
    pub queue: Duration,
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// The client side of one connection.
#[derive(Clone, Copy, Debug)]
pub struct Client {
    pub addr: SocketAddr,
    pub tls: bool,
}

impl Client {
    fn proto(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

/// Serves one request; never fails (errors are answers).
pub async fn handle(
    shared: Arc<Shared>,
    client: Client,
    request: Request<Incoming>,
) -> Result<Response<EdgeBody>, Infallible> {
    let log = AccessLog::new(client, &request);
    Ok(route(&shared, client, request, log).await)
}

async fn route(shared: &Arc<Shared>, client: Client, request: Request<Incoming>, log: AccessLog) -> Response<EdgeBody> {
    let path = request.uri().path();
    if !client.tls && path.starts_with(ACME_CHALLENGE) {
        let token = path[ACME_CHALLENGE.len()..].to_owned();
        return log.local(challenge(shared, &token).await);
    }
    let routes = shared.routes.borrow().clone();
    let route = match routes.host(&log.host) {
        HostMatch::App(route) => route,
        HostMatch::NotHttp(app) => {
            let message = format!("app {app} has no [http_service]; add one to its roost.toml\n");
            return log.local(text(StatusCode::NOT_FOUND, message));
        }
        HostMatch::Unknown => {
            let message = format!("no app is served at {}\n", log.host);
            return log.local(text(StatusCode::NOT_FOUND, message));
        }
        HostMatch::Starting => {
            let message = "this node is still catching up with the cluster; try again shortly\n";
            let mut response = text(StatusCode::SERVICE_UNAVAILABLE, message.to_owned());
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return log.local(response);
        }
    };
    let log = log.app(&route.app);
    if !client.tls && route.force_https {
        let response = redirect(&request, &log.host, shared.https_port);
        return log.local(response);
    }
    if route.backends.is_empty() {
        let mut response = text(StatusCode::SERVICE_UNAVAILABLE, format!("no healthy instance of {}\n", route.app));
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return log.local(response);
    }
    proxy(shared, client, request, route, log).await
}

async fn challenge(shared: &Shared, token: &str) -> Response<EdgeBody> {
    let known = |shared: &Shared| shared.routes.borrow().challenge(token).map(str::to_owned);
    let answer = match known(shared) {
        Some(answer) => Some(answer),
        None => {
            shared.hooks.catch_up().await;
            known(shared)
        }
    };
    match answer {
        Some(answer) => text(StatusCode::OK, answer),
        None => text(StatusCode::NOT_FOUND, "no such challenge\n".into()),
    }
}

fn redirect(request: &Request<Incoming>, host: &str, https_port: Option<u16>) -> Response<EdgeBody> {
    let port = match https_port {
        Some(443) | None => String::new(),
        Some(port) => format!(":{port}"),
    };
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{path}");
    let mut response = text(StatusCode::PERMANENT_REDIRECT, format!("{location}\n"));
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Why an attempt on one instance did not give an answer.
enum Attempt {
    /// The request's body went with it: no retry is possible.
    Failed(String),
    /// Nothing of the request reached the instance, or it has no body.
    Retry(String),
}

async fn proxy(
    shared: &Arc<Shared>,
    client: Client,
    mut request: Request<Incoming>,
    route: &AppRoute,
    log: AccessLog,
) -> Response<EdgeBody> {
    let client_upgrade = is_upgrade(request.headers()).then(|| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    let headers = upstream_headers(&parts.headers, client, &log, client_upgrade.is_some());
    let target: Uri = parts.uri.path_and_query().map_or("/", |p| p.as_str()).parse().unwrap_or_default();
    // A request without a body can be sent again; one with a body only
    // until its body has started to go.
    let replayable = body.is_end_stream() && matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    let mut body = Some(body.boxed());
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last_error = String::new();
    let mut second_round = false;
    // Whether an attempt sent the request (which the instance may have
    // taken): then a second round would send it to each instance again.
    let mut reached = false;
    loop {
        let lease = match shared.balancer.acquire(&route.backends, &route.concurrency, &tried, shared.queue).await {
            Ok(lease) => lease,
            Err(Unavailable::Saturated) => {
                let message = format!("{} is at its concurrency limit; try again\n", route.app);
                let mut response = text(StatusCode::SERVICE_UNAVAILABLE, message);
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return log.local(response);
            }
            // No instance could be connected to: a request that can be
            // sent again gets one more round (see `SECOND_ROUND_PAUSE`).
            Err(Unavailable::NoInstance) if replayable && !second_round && !reached && !tried.is_empty() => {
                second_round = true;
                tried.clear();
                tokio::time::sleep(SECOND_ROUND_PAUSE).await;
                continue;
            }
            Err(Unavailable::NoInstance) => {
                let message = format!("no instance of {} could be reached: {last_error}\n", route.app);
                return log.local(text(StatusCode::BAD_GATEWAY, message));
            }
        };
        let addr = lease.backend.addr;
        tried.push(addr);
        let mut sender = match shared.pool.checkout(addr, shared.connect_timeout).await {
            Ok(sender) => sender,
            Err(error) => {
                shared.balancer.mark_down(addr);
                last_error = format!("{addr}: {}", chain(&error));
                continue;
            }
        };
        let upstream_body = match body.take() {
            Some(body) => body,
            None if replayable => empty(),
            None => {
                let message = format!("the instance failed while taking the request: {last_error}\n");
                return log.local(text(StatusCode::BAD_GATEWAY, message));
            }
        };
        let mut upstream = Request::new(upstream_body);
        *upstream.method_mut() = parts.method.clone();
        *upstream.uri_mut() = target.clone();
        *upstream.version_mut() = Version::HTTP_11;
        *upstream.headers_mut() = headers.clone();
        let gone = lease.gone();
        let sent = tokio::select! {
            sent = sender.send_request(upstream) => sent.map_err(|e| {
                let text = format!("{addr}: {}", chain(&e));
                if replayable { Attempt::Retry(text) } else { Attempt::Failed(text) }
            }),
            () = gone.cancelled() => {
                let text = format!("{addr} became unreachable");
                Err(if replayable { Attempt::Retry(text) } else { Attempt::Failed(text) })
            }
        };
        match sent {
            Ok(response) => return answer(shared, response, sender, lease, client_upgrade, log),
            Err(Attempt::Retry(error)) => {
                reached = true;
                last_error = error;
            }
            Err(Attempt::Failed(error)) => {
                return log.local(text(StatusCode::BAD_GATEWAY, format!("the instance failed: {error}\n")));
            }
        }
    }
}

/// Turns the instance's answer into the client's.
fn answer(
    shared: &Arc<Shared>,
    mut response: Response<Incoming>,
    sender: SendRequest<UpstreamBody>,
    lease: Lease,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    log: AccessLog,
) -> Response<EdgeBody> {
    let log = log.instance(&lease.backend.instance, response.status());
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return log.local(text(StatusCode::BAD_GATEWAY, "the instance switched protocols unasked\n".into()));
        };
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let (parts, _) = response.into_parts();
        tokio::spawn(async move {
            // The slot stays taken for as long as the tunnel is open.
            let _lease = lease;
            let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok(both) => both,
                Err(error) => {
                    tracing::debug!(%error, "an upgrade did not complete");
                    return;
                }
            };
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
        let mut answer = Response::from_parts(parts, empty_edge());
        answer.headers_mut().insert(REQUEST_ID, log.id_header());
        return log.local(answer);
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    parts.headers.insert(REQUEST_ID, log.id_header());
    let addr = lease.backend.addr;
    let body = Tracked {
        gone: Box::pin(lease.gone().cancelled_owned()),
        inner: body,
        finish: Some(Finish { shared: shared.clone(), addr, sender, _lease: lease, log, bytes: 0 }),
    };
    Response::from_parts(parts, BoxBody::new(body))
}

/// The instance's answer body, streamed to the client; when it ends, the
/// connection goes back to the pool and the request is logged.
struct Tracked {
    inner: Incoming,
    gone: Pin<Box<WaitForCancellationFutureOwned>>,
    finish: Option<Finish>,
}

struct Finish {
    shared: Arc<Shared>,
    addr: SocketAddr,
    sender: SendRequest<UpstreamBody>,
    _lease: Lease,
    log: AccessLog,
    bytes: u64,
}

impl Tracked {
    /// The answer ended: the connection can take another request.
    fn complete(&mut self) {
        if let Some(finish) = self.finish.take() {
            finish.shared.pool.checkin(finish.addr, finish.sender);
            finish.log.end(finish.bytes, None);
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(finish), Some(data)) = (this.finish.as_mut(), frame.data_ref()) {
                    finish.bytes += data.len() as u64;
                }
                // With a known length the server may not ask again once it
                // has it all: finish now.
                if this.inner.is_end_stream() {
                    this.complete();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                if let Some(finish) = this.finish.take() {
                    finish.log.end(finish.bytes, Some(&error.to_string()));
                }
                Poll::Ready(Some(Err(Box::new(error))))
            }
            Poll::Ready(None) => {
                this.complete();
                Poll::Ready(None)
            }
            Poll::Pending => {
                // The instance went away mid-answer: end it rather than hang.
                if this.finish.is_some() && this.gone.as_mut().poll(cx).is_ready() {
                    if let Some(finish) = this.finish.take() {
                        finish.log.end(finish.bytes, Some("the instance became unreachable"));
                    }
                    return Poll::Ready(Some(Err("the instance became unreachable".into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // The client went away before the end: the connection is not reused.
        if let Some(finish) = self.finish.take() {
            finish.log.end(finish.bytes, Some("the client went away"));
        }
    }
}

/// A request's id: 16 hex digits.
#[derive(Clone, Copy, Debug)]
struct RequestId(u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The access log line of one request, filled in as it goes.
struct AccessLog {
    started: Instant,
    id: RequestId,
    client: SocketAddr,
    proto: &'static str,
    version: Version,
    method: Method,
    host: String,
    path: String,
    app: String,
    instance: String,
    status: u16,
}

impl AccessLog {
    fn new(client: Client, request: &Request<Incoming>) -> AccessLog {
        AccessLog {
            started: Instant::now(),
            id: RequestId(rand::random()),
            client: client.addr,
            proto: client.proto(),
            version: request.version(),
            method: request.method().clone(),
            host: host_of(request),
            path: request.uri().path().to_owned(),
            app: String::new(),
            instance: String::new(),
            status: 0,
        }
    }

    fn app(mut self, app: &str) -> AccessLog {
        self.app = app.to_owned();
        self
    }

    fn instance(mut self, instance: &str, status: StatusCode) -> AccessLog {
        self.instance = instance.to_owned();
        self.status = status.as_u16();
        self
    }

    fn id_header(&self) -> HeaderValue {
        HeaderValue::from_str(&self.id.to_string()).unwrap_or_else(|_| HeaderValue::from_static("-"))
    }

    /// An answer the edge made itself: logged now.
    fn local(mut self, mut response: Response<EdgeBody>) -> Response<EdgeBody> {
        response.headers_mut().insert(REQUEST_ID, self.id_header());
        self.status = response.status().as_u16();
        let bytes = response.body().size_hint().exact().unwrap_or(0);
        self.end(bytes, None);
        response
    }

    /// Writes the line: `key=value` pairs, formatted here in one buffer
    /// rather than field by field by the subscriber (a proxy logs every
    /// request, and per-field formatting was a fifth of its CPU).
    fn end(&self, bytes: u64, error: Option<&str>) {
        use std::fmt::Write as _;
        let mut line = String::with_capacity(256);
        let micros = self.started.elapsed().as_micros();
        let _ = write!(
            line,
            "request_id={} client={} proto={} version={:?} method={} host={} path={} app={} instance={} status={} bytes={bytes} duration_ms={}.{:03}",
            self.id,
            self.client.ip(),
            self.proto,
            self.version,
            self.method,
            self.host,
            self.path,
            self.app,
            self.instance,
            self.status,
            micros / 1000,
            micros % 1000,
        );
        if let Some(error) = error {
            let _ = write!(line, " error={error:?}");
        }
        tracing::info!(target: "roost::access", "{line}");
    }
}

/// The request's host, lowercase, without a port.
fn host_of(request: &Request<Incoming>) -> String {
    let raw = request
        .uri()
        .host()
        .map(str::to_owned)
        .or_else(|| request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))
        .unwrap_or_default();
    strip_port(&raw).to_ascii_lowercase()
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// Removes hop-by-hop headers (and those `Connection` names); an upgrade
/// keeps `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|name| !(upgrade && *name == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [header::TE, header::TRAILER, header::TRANSFER_ENCODING, header::PROXY_AUTHORIZATION] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// The headers the instance gets: the client's, less hop-by-hop ones, with
/// `Host`, `X-Forwarded-*` and the request id.
fn upstream_headers(incoming: &HeaderMap, client: Client, log: &AccessLog, upgrade: bool) -> HeaderMap {
    let mut headers = incoming.clone();
    strip_hop_by_hop(&mut headers, upgrade);
    let original_host = incoming
        .get(header::HOST)
        .cloned()
        .or_else(|| HeaderValue::from_str(&log.host).ok())
        .unwrap_or_else(|| HeaderValue::from_static(""));
    headers.insert(header::HOST, original_host.clone());
    let ip = client.addr.ip().to_string();
    let forwarded_for = match incoming.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {ip}"),
        None => ip,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(client.proto()));
    headers.insert("x-forwarded-host", original_host);
    headers.insert(REQUEST_ID, log.id_header());
    headers
}

fn text(status: StatusCode, body: String) -> Response<EdgeBody> {
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

fn empty() -> UpstreamBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn empty_edge() -> EdgeBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// An error and its sources, on one line.
fn chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(next) = source {
        text.push_str(": ");
        text.push_str(&next.to_string());
        source = next.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("hello.localhost:8080"), "hello.localhost");
        assert_eq!(strip_port("hello.localhost"), "hello.localhost");
        assert_eq!(strip_port("[::1]:443"), "::1");
        assert_eq!(strip_port("10.0.0.1"), "10.0.0.1");
    }

    #[test]
    fn hop_by_hop_headers_do_not_cross_and_upgrades_keep_theirs() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert("x-app", HeaderValue::from_static("kept"));
        let mut plain = headers.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-app"]);

        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&headers));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers.get(header::UPGRADE), Some(&HeaderValue::from_static("websocket")));
        assert_eq!(headers.get(header::CONNECTION), Some(&HeaderValue::from_static("upgrade")));
    }
}
