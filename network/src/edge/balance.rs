//! Choosing an instance for a request or a connection.
//!
//! The rule: a healthy instance below the app's soft limit on this node
//! first, then the least loaded anywhere; never one at its hard limit. Load
//! is what this node's edge has in flight to each instance (each edge
//! counts its own; limits are per edge node). Ties rotate, so equal
//! instances share the traffic.
//!
//! "Healthy" is the state's view (the route lists only instances that pass
//! their checks) corrected by this edge's own: an instance is marked down
//! at once when a connection to it fails, and by the prober
//! ([`super::probe`]) within one check interval when it stops answering,
//! and marked up again when it answers. Marking an instance down also
//! cancels what is in flight to it ([`Lease::gone`]), so requests stuck on
//! a dead node fail over instead of hanging.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_raft::workload::Concurrency;
use roost_raft::NodeId;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a connection or a request that could reach none of its
/// instances waits before it tries them all once more. A healthy instance
/// can be out of reach for a moment: this node has just joined and its mesh
/// is still being set up, or a first WireGuard handshake is under way.
pub const SECOND_ROUND_PAUSE: Duration = Duration::from_millis(250);

use super::routes::Backend;

/// What the edge knows of one instance.
#[derive(Debug)]
struct Health {
    inflight: AtomicU32,
    down: AtomicBool,
    /// Cancelled (and replaced) when the instance is marked down.
    gone: Mutex<CancellationToken>,
}

impl Default for Health {
    fn default() -> Self {
        Health { inflight: AtomicU32::new(0), down: AtomicBool::new(false), gone: Mutex::new(CancellationToken::new()) }
    }
}

#[derive(Debug)]
pub struct Balancer {
    local: NodeId,
    health: Mutex<HashMap<SocketAddr, Arc<Health>>>,
    rotor: AtomicUsize,
    /// Rung whenever a lease ends: a waiter at the hard limit tries again.
    released: Arc<Notify>,
}

/// A slot on an instance, held for as long as the request (or connection)
/// is in flight.
#[derive(Debug)]
pub struct Lease {
    pub backend: Backend,
    health: Arc<Health>,
    released: Arc<Notify>,
    gone: CancellationToken,
}

impl Lease {
    /// Fires if the instance is marked down while the lease is held.
    pub fn gone(&self) -> CancellationToken {
        self.gone.clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.health.inflight.fetch_sub(1, Ordering::SeqCst);
        self.released.notify_waiters();
    }
}

/// Why no instance could be had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// No healthy instance (that was not tried already).
    NoInstance,
    /// Every instance stayed at its hard limit for the whole wait.
    Saturated,
}

impl Balancer {
    pub fn new(local: NodeId) -> Balancer {
        Balancer {
            local,
            health: Mutex::new(HashMap::new()),
            rotor: AtomicUsize::new(0),
            released: Arc::new(Notify::new()),
        }
    }

    fn health(&self, addr: SocketAddr) -> Arc<Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).entry(addr).or_default().clone()
    }

    /// Forgets instances that are no longer anyone's backend.
    pub fn retain(&self, live: &[SocketAddr]) {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).retain(|addr, _| live.contains(addr));
    }

    pub fn mark_down(&self, addr: SocketAddr) {
        let health = self.health(addr);
        if !health.down.swap(true, Ordering::SeqCst) {
            tracing::info!(backend = %addr, "instance unreachable from this edge; sending its traffic elsewhere");
            let mut gone = health.gone.lock().unwrap_or_else(|p| p.into_inner());
            gone.cancel();
            *gone = CancellationToken::new();
        }
    }

    pub fn mark_up(&self, addr: SocketAddr) {
        if self.health(addr).down.swap(false, Ordering::SeqCst) {
            tracing::info!(backend = %addr, "instance reachable again from this edge");
        }
    }

    pub fn is_down(&self, addr: SocketAddr) -> bool {
        self.health(addr).down.load(Ordering::SeqCst)
    }

    /// Takes a slot on the best instance of `backends` not in `tried`,
    /// waiting up to `queue` while every one is at its hard limit.
    pub async fn acquire(
        &self,
        backends: &[Backend],
        limits: &Concurrency,
        tried: &[SocketAddr],
        queue: Duration,
    ) -> Result<Lease, Unavailable> {
        let deadline = Instant::now() + queue;
        loop {
            // Registered before trying, so a release in between is not missed.
            let released = self.released.notified();
            match self.try_acquire(backends, limits, tried) {
                Err(Unavailable::Saturated) if Instant::now() < deadline => {
                    if tokio::time::timeout_at(deadline, released).await.is_err() {
                        return Err(Unavailable::Saturated);
                    }
                }
                other => return other,
            }
        }
    }

    fn try_acquire(
        &self,
        backends: &[Backend],
        limits: &Concurrency,
        tried: &[SocketAddr],
    ) -> Result<Lease, Unavailable> {
        let candidates: Vec<(&Backend, Arc<Health>)> =
            backends.iter().filter(|b| !tried.contains(&b.addr)).map(|b| (b, self.health(b.addr))).collect();
        if candidates.is_empty() {
            return Err(Unavailable::NoInstance);
        }
        // Instances this edge cannot reach are skipped, unless it can reach
        // none: then its own view may be what is wrong.
        let up: Vec<&(&Backend, Arc<Health>)> =
            candidates.iter().filter(|(_, h)| !h.down.load(Ordering::SeqCst)).collect();
        let pool: Vec<&(&Backend, Arc<Health>)> = if up.is_empty() { candidates.iter().collect() } else { up };
        let start = self.rotor.fetch_add(1, Ordering::Relaxed);
        let count = pool.len();
        let mut best: Option<(usize, (bool, bool, u32))> = None;
        let mut saturated = false;
        for offset in 0..count {
            let index = (start + offset) % count;
            let (backend, health) = pool[index];
            let load = health.inflight.load(Ordering::SeqCst);
            if limits.hard_limit.is_some_and(|hard| load >= hard) {
                saturated = true;
                continue;
            }
            let over_soft = limits.soft_limit.is_some_and(|soft| load >= soft);
            let remote = backend.node != self.local;
            let score = (over_soft, remote, load);
            if best.as_ref().is_none_or(|(_, b)| score < *b) {
                best = Some((index, score));
            }
        }
        let Some((index, _)) = best else {
            return Err(if saturated { Unavailable::Saturated } else { Unavailable::NoInstance });
        };
        let (backend, health) = pool[index];
        health.inflight.fetch_add(1, Ordering::SeqCst);
        let gone = health.gone.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(Lease { backend: (*backend).clone(), health: health.clone(), released: self.released.clone(), gone })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(port: u16, node: NodeId) -> Backend {
        Backend { instance: format!("i{port}"), node, addr: SocketAddr::from(([10, 210, 0, 2], port)) }
    }

    fn limits(soft: Option<u32>, hard: Option<u32>) -> Concurrency {
        Concurrency { connections: false, soft_limit: soft, hard_limit: hard }
    }

    #[tokio::test]
    async fn the_local_instance_is_preferred_until_its_soft_limit() {
        let balancer = Balancer::new(1);
        let backends = [backend(1, 2), backend(2, 1), backend(3, 3)];
        let limits = limits(Some(2), None);
        let wait = Duration::ZERO;
        let a = balancer.acquire(&backends, &limits, &[], wait).await.expect("a");
        let b = balancer.acquire(&backends, &limits, &[], wait).await.expect("b");
        assert_eq!((a.backend.node, b.backend.node), (1, 1), "local first");
        let c = balancer.acquire(&backends, &limits, &[], wait).await.expect("c");
        let d = balancer.acquire(&backends, &limits, &[], wait).await.expect("d");
        let mut remote = [c.backend.node, d.backend.node];
        remote.sort();
        assert_eq!(remote, [2, 3], "past the soft limit, the least loaded elsewhere");
    }

    #[tokio::test]
    async fn equal_instances_take_turns_and_the_tried_are_skipped() {
        let balancer = Balancer::new(9);
        let backends = [backend(1, 1), backend(2, 2), backend(3, 3)];
        let limits = limits(None, None);
        let mut seen = Vec::new();
        for _ in 0..3 {
            let lease = balancer.acquire(&backends, &limits, &[], Duration::ZERO).await.expect("lease");
            seen.push(lease.backend.addr.port());
        }
        seen.sort();
        assert_eq!(seen, [1, 2, 3]);
        let tried = [backends[0].addr, backends[1].addr];
        let lease = balancer.acquire(&backends, &limits, &tried, Duration::ZERO).await.expect("lease");
        assert_eq!(lease.backend.addr.port(), 3);
        let all: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
        assert_eq!(
            balancer.acquire(&backends, &limits, &all, Duration::ZERO).await.err(),
            Some(Unavailable::NoInstance)
        );
    }

    #[tokio::test]
    async fn over_the_hard_limit_a_request_waits_for_a_slot_then_gives_up() {
        let balancer = Arc::new(Balancer::new(1));
        let backends = [backend(1, 1)];
        let limits = limits(None, Some(1));
        let held = balancer.acquire(&backends, &limits, &[], Duration::ZERO).await.expect("the one slot");
        let saturated = balancer.acquire(&backends, &limits, &[], Duration::from_millis(50)).await;
        assert_eq!(saturated.err(), Some(Unavailable::Saturated));
        let waiter = {
            let balancer = balancer.clone();
            tokio::spawn(async move {
                balancer.acquire(&[backend(1, 1)], &limits, &[], Duration::from_secs(5)).await.is_ok()
            })
        };
        tokio::task::yield_now().await;
        drop(held);
        assert!(waiter.await.expect("joined"), "the queued request got the freed slot");
    }

    #[tokio::test]
    async fn a_down_instance_is_skipped_and_its_leases_are_told() {
        let balancer = Balancer::new(1);
        let backends = [backend(1, 1), backend(2, 2)];
        let limits = limits(None, None);
        let lease = balancer.acquire(&backends, &limits, &[], Duration::ZERO).await.expect("lease");
        assert_eq!(lease.backend.addr.port(), 1);
        let gone = lease.gone();
        balancer.mark_down(backends[0].addr);
        assert!(gone.is_cancelled());
        for _ in 0..3 {
            let next = balancer.acquire(&backends, &limits, &[], Duration::ZERO).await.expect("lease");
            assert_eq!(next.backend.addr.port(), 2);
        }
        balancer.mark_up(backends[0].addr);
        let back = balancer.acquire(&backends, &limits, &[], Duration::ZERO).await.expect("lease");
        assert_eq!(back.backend.addr.port(), 1, "local again once reachable");
        assert!(!back.gone().is_cancelled());
    }
}
