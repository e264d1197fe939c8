//! Raw TCP services: every node listens on each public port an app's
//! `[[services]]` names, and forwards each connection, bytes as they are,
//! to a healthy instance's internal port over the mesh. A connection that
//! cannot be made is tried on another instance; the slot on the instance is
//! held for as long as the connection lasts.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use roost_raft::workload::Concurrency;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::balance::{Balancer, SECOND_ROUND_PAUSE};
use super::routes::Routes;

/// The listeners of the public TCP ports, following the routes.
#[derive(Debug)]
pub struct TcpServices {
    host: IpAddr,
    listeners: BTreeMap<u16, JoinHandle<()>>,
}

impl Drop for TcpServices {
    fn drop(&mut self) {
        for task in self.listeners.values() {
            task.abort();
        }
    }
}

impl TcpServices {
    /// Listeners will bind `host` (the address the node's HTTP edge binds).
    pub fn new(host: IpAddr) -> TcpServices {
        TcpServices { host, listeners: BTreeMap::new() }
    }

    /// Listens on exactly the routes' TCP ports.
    pub async fn sync(
        &mut self,
        routes: &watch::Receiver<Arc<Routes>>,
        balancer: &Arc<Balancer>,
        connect_timeout: Duration,
    ) {
        let wanted: Vec<u16> = routes.borrow().tcp_ports().collect();
        self.listeners.retain(|port, task| {
            let keep = wanted.contains(port) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for port in wanted {
            if self.listeners.contains_key(&port) {
                continue;
            }
            let address = SocketAddr::new(self.host, port);
            let listener = match TcpListener::bind(address).await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::error!(%address, %error, "cannot listen for a TCP service; is the port taken on this machine?");
                    continue;
                }
            };
            tracing::info!(%address, "forwarding a TCP service");
            let (routes, balancer) = (routes.clone(), balancer.clone());
            let task = tokio::spawn(async move {
                loop {
                    let Ok((stream, client)) = listener.accept().await else { continue };
                    let (routes, balancer) = (routes.clone(), balancer.clone());
                    tokio::spawn(forward(stream, client, port, routes, balancer, connect_timeout));
                }
            });
            self.listeners.insert(port, task);
        }
    }
}

async fn forward(
    mut client: TcpStream,
    from: SocketAddr,
    port: u16,
    routes: watch::Receiver<Arc<Routes>>,
    balancer: Arc<Balancer>,
    connect_timeout: Duration,
) {
    let Some(mut route) = routes.borrow().tcp(port).cloned() else { return };
    let unlimited = Concurrency::default();
    let mut tried = Vec::new();
    let mut second_round = false;
    loop {
        let Ok(lease) = balancer.acquire(&route.backends, &unlimited, &tried, Duration::ZERO).await else {
            // Nothing of the client's has gone anywhere yet: one more round
            // (see `SECOND_ROUND_PAUSE`).
            if !second_round && !tried.is_empty() {
                second_round = true;
                tried.clear();
                tokio::time::sleep(SECOND_ROUND_PAUSE).await;
                let Some(now) = routes.borrow().tcp(port).cloned() else { return };
                route = now;
                continue;
            }
            tracing::warn!(app = %route.app, port, client = %from, "no instance could take a TCP connection");
            return;
        };
        let addr = lease.backend.addr;
        tried.push(addr);
        let mut upstream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            _ => {
                balancer.mark_down(addr);
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let started = tokio::time::Instant::now();
        let gone = lease.gone();
        let copied = tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => copied.ok(),
            () = gone.cancelled() => None,
        };
        let (up, down) = copied.unwrap_or_default();
        tracing::info!(
            target: "roost::access",
            client = %from.ip(), app = %route.app, instance = %lease.backend.instance, port,
            bytes_in = up, bytes_out = down, duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            "tcp"
        );
        return;
    }
}
