//! Keep-alive connections from the edge to instances, over the mesh.
//!
//! The proxy checks a connection out per request and gives it back when the
//! response body has ended (only then can an HTTP/1.1 connection take the
//! next request); one that broke, or carried an upgrade, is dropped. The
//! proxy, not the pool, picks the instance, so that a failed connect can be
//! retried on another one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The body of a request the edge sends to an instance.
pub type UpstreamBody = BoxBody<Bytes, hyper::Error>;

/// How long a connection may sit idle before it is not reused (instances
/// commonly close theirs after a minute or more).
const IDLE_FOR: Duration = Duration::from_secs(30);
/// Idle connections kept per instance.
const IDLE_PER_BACKEND: usize = 128;
/// How long a connection given back may take to be ready again.
const READY_WITHIN: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    #[error("connection failed")]
    Io(#[source] std::io::Error),
    #[error("HTTP handshake failed")]
    Handshake(#[source] hyper::Error),
}

/// An idle connection, and since when.
type Idle = (SendRequest<UpstreamBody>, Instant);

#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
}

impl Pool {
    /// A ready connection to `addr`: an idle one, or a new one.
    pub async fn checkout(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<SendRequest<UpstreamBody>, ConnectError> {
        while let Some(mut sender) = self.take_idle(addr) {
            if sender.is_ready() {
                return Ok(sender);
            }
            // A connection given back as its response ended may need a
            // moment to take the next request; a closed one never will.
            if let Ok(Ok(())) = tokio::time::timeout(READY_WITHIN, sender.ready()).await {
                return Ok(sender);
            }
        }
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(ConnectError::Timeout(timeout)),
            Ok(Err(error)) => return Err(ConnectError::Io(error)),
            Ok(Ok(stream)) => stream,
        };
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, backend = %addr, "connection to an instance ended");
            }
        });
        Ok(sender)
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<SendRequest<UpstreamBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(&addr)?;
        while let Some((sender, since)) = list.pop() {
            if since.elapsed() < IDLE_FOR && !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// Gives a connection back once its response has ended.
    pub fn checkin(&self, addr: SocketAddr, sender: SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(addr).or_default();
        list.retain(|(s, since)| since.elapsed() < IDLE_FOR && !s.is_closed());
        if list.len() < IDLE_PER_BACKEND {
            list.push((sender, Instant::now()));
        }
    }

    /// Drops the connections of instances that are gone.
    pub fn retain(&self, live: &[SocketAddr]) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).retain(|addr, _| live.contains(addr));
    }
}
