//! The cluster's time, as far as what expires by time is concerned.
//!
//! Each node's own clock may be wrong. An API token that expired by the
//! leader's clock must be refused by every node at once, so a node judges
//! expiry by the later of its own clock and its estimate of the leader's,
//! which every heartbeat's answer refreshes (`HeartbeatResponse.leader_time_ms`,
//! taken as of the middle of the round trip). A node whose clock is behind
//! therefore refuses what the leader would; one whose clock is ahead refuses
//! early, never late. The leader uses its own clock (a node forgets its
//! estimate when it leads). A token's expiry is set by the leader's clock as
//! estimated ([`ClusterClock::leader_now`]), so a token made through a node
//! whose clock is off lives as long as it was asked to.

use std::sync::atomic::{AtomicI64, Ordering};

use roost_raft::consensus::now_millis;
use roost_raft::state::UnixMillis;

/// A difference between this node's clock and the leader's that is logged.
const SKEW_WORTH_A_WARNING_MS: i64 = 2_000;

#[derive(Debug, Default)]
pub struct ClusterClock {
    /// The leader's clock minus this node's, in milliseconds.
    offset_ms: AtomicI64,
}

impl ClusterClock {
    /// The later of this node's clock and the leader's, now.
    pub fn now(&self) -> UnixMillis {
        later(now_millis(), self.offset_ms.load(Ordering::Relaxed))
    }

    /// The leader's clock as this node estimates it, now (this node's own
    /// when it leads).
    pub fn leader_now(&self) -> UnixMillis {
        now_millis().saturating_add(self.offset_ms.load(Ordering::Relaxed))
    }

    /// This node leads: its own clock is the leader's.
    pub fn leading(&self) {
        self.offset_ms.store(0, Ordering::Relaxed);
    }

    /// Records a heartbeat sent at `sent` and answered at `received` (both
    /// by this node's clock) with the leader's clock `leader`; an answer
    /// without a clock (a leader of an older version) changes nothing.
    pub fn observe(&self, sent: UnixMillis, received: UnixMillis, leader: UnixMillis) {
        if leader > 0 {
            self.set(offset(sent, received, leader));
        }
    }

    fn set(&self, offset: i64) {
        let before = self.offset_ms.swap(offset, Ordering::Relaxed);
        let skewed = |o: i64| o.unsigned_abs() >= SKEW_WORTH_A_WARNING_MS.unsigned_abs();
        if skewed(offset) && !skewed(before) {
            let (how_far, direction) =
                (offset.unsigned_abs() as f64 / 1000.0, if offset > 0 { "behind" } else { "ahead of" });
            tracing::warn!(
                "this node's clock is {how_far:.1}s {direction} the leader's; token expiry follows the later of the two, \
                 but keep clocks in sync (NTP)"
            );
        } else if skewed(before) && !skewed(offset) {
            tracing::info!("this node's clock agrees with the leader's again");
        }
    }
}

/// The leader's clock minus ours, with the leader's reading taken as of the
/// middle of the round trip.
fn offset(sent: UnixMillis, received: UnixMillis, leader: UnixMillis) -> i64 {
    let middle = sent.saturating_add(received.saturating_sub(sent).max(0) / 2);
    leader.saturating_sub(middle)
}

fn later(local: UnixMillis, offset: i64) -> UnixMillis {
    local.saturating_add(offset.max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_behind_the_leader_judges_by_the_leaders_clock_and_one_ahead_by_its_own() {
        // Sent at 1000, answered at 1010 by our clock; the leader read 3_601_005
        // halfway: we are an hour behind.
        let behind = offset(1_000, 1_010, 3_601_005);
        assert_eq!(behind, 3_600_000);
        assert_eq!(later(5_000, behind), 3_605_000);
        // The leader is an hour behind us: our own clock stands.
        let ahead = offset(3_601_000, 3_601_010, 1_005);
        assert_eq!(ahead, -3_600_000);
        assert_eq!(later(3_700_000, ahead), 3_700_000);
        // An answer "before" it was sent (our clock stepped back) is not a
        // negative round trip.
        assert_eq!(offset(2_000, 1_000, 2_000), 0);
    }

    #[test]
    fn a_node_forgets_the_leaders_clock_when_it_leads_and_ignores_an_answer_without_one() {
        const HOUR: i64 = 3_600_000;
        let clock = ClusterClock::default();
        let local = now_millis();
        clock.observe(local, local, local + HOUR);
        assert!(clock.now() >= local + HOUR && clock.leader_now() >= local + HOUR);
        clock.observe(local, local, 0);
        assert!(clock.now() >= local + HOUR, "an answer without a clock changes nothing");
        clock.leading();
        assert!(clock.now() < local + HOUR && clock.leader_now() < local + HOUR, "a leader uses its own clock");
        // A leader an hour behind: expiry still follows this node's clock,
        // and tokens made here get their expiry by the leader's.
        let local = now_millis();
        clock.observe(local, local, local - HOUR);
        assert!(clock.now() >= local && clock.leader_now() < local - HOUR / 2);
    }
}
