//! The edge's own look at each backend: a TCP connect at the app's check
//! interval, from this node. The state says which instances pass their
//! checks as their own node sees them; this says whether this node can
//! reach them now, so a dead node's instances stop getting traffic within
//! one interval, long before the cluster reschedules them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::balance::Balancer;

/// One probe task per backend address.
#[derive(Debug, Default)]
pub struct Prober {
    tasks: HashMap<SocketAddr, (Duration, JoinHandle<()>)>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        for (_, task) in self.tasks.values() {
            task.abort();
        }
    }
}

impl Prober {
    /// Probes exactly `wanted`, each at its interval.
    pub fn sync(&mut self, wanted: &HashMap<SocketAddr, Duration>, balancer: &Arc<Balancer>) {
        self.tasks.retain(|addr, (every, task)| {
            let keep = wanted.get(addr) == Some(every);
            if !keep {
                task.abort();
            }
            keep
        });
        for (addr, every) in wanted {
            if self.tasks.contains_key(addr) {
                continue;
            }
            let (addr, every, balancer) = (*addr, *every, balancer.clone());
            let task = tokio::spawn(async move {
                let timeout = every.min(Duration::from_secs(1));
                let mut ticks = tokio::time::interval(every);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                        Ok(Ok(_)) => balancer.mark_up(addr),
                        Ok(Err(_)) | Err(_) => balancer.mark_down(addr),
                    }
                }
            });
            self.tasks.insert(addr, (every, task));
        }
    }
}
