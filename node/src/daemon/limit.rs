//! Token buckets per caller, for calls that cost a node real work: a burst,
//! then a steady rate, and a caller that asks for more waits.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A bucket of `burst` units per key, refilled by one unit every `every`.
/// A call takes as many units as it costs; one that costs more than the
/// burst is taken once the bucket is full, leaving it in debt, so a large
/// call is slowed, never refused for good.
pub struct Buckets<K> {
    burst: f64,
    every: Duration,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

/// Keys remembered at once; past it, full buckets are forgotten.
const REMEMBERED: usize = 4096;

impl<K: Eq + Hash> Buckets<K> {
    pub fn new(burst: u32, every: Duration) -> Self {
        Self { burst: f64::from(burst), every, buckets: Mutex::default() }
    }

    /// Takes `cost` units from `key`'s bucket at `now`, or says how long to
    /// wait before the call would be taken.
    pub fn take(&self, key: K, cost: u32, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let refill = |(units, at): (f64, Instant)| {
            self.burst.min(units + now.saturating_duration_since(at).as_secs_f64() / self.every.as_secs_f64())
        };
        if buckets.len() >= REMEMBERED {
            buckets.retain(|_, bucket| refill(*bucket) < self.burst);
        }
        let bucket = buckets.entry(key).or_insert((self.burst, now));
        let units = refill(*bucket);
        let needed = f64::from(cost).min(self.burst);
        if units >= needed {
            *bucket = (units - f64::from(cost), now);
            Ok(())
        } else {
            Err(self.every.mul_f64(needed - units))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_a_burst_then_one_unit_per_interval_per_key() {
        let every = Duration::from_secs(2);
        let buckets = Buckets::new(10, every);
        let start = Instant::now();
        for _ in 0..10 {
            assert!(buckets.take("a", 1, start).is_ok());
        }
        let wait = buckets.take("a", 1, start).expect_err("the burst is spent");
        assert!(wait > Duration::ZERO && wait <= every, "{wait:?}");
        assert!(buckets.take("b", 1, start).is_ok(), "another key has its own bucket");
        assert!(buckets.take("a", 1, start + every).is_ok(), "one more after the interval");
        assert!(buckets.take("a", 1, start + every).is_err());
    }

    #[test]
    fn a_call_larger_than_the_burst_waits_for_a_full_bucket_and_leaves_a_debt() {
        let every = Duration::from_secs(1);
        let buckets = Buckets::new(10, every);
        let start = Instant::now();
        assert!(buckets.take("a", 3, start).is_ok());
        let wait = buckets.take("a", 50, start).expect_err("the bucket is not full");
        assert_eq!(wait, every * 3, "until the bucket is full again");
        assert!(buckets.take("a", 50, start + every * 3).is_ok(), "a full bucket takes any call");
        // 40 units in debt: the next unit comes after 41 intervals.
        let wait = buckets.take("a", 1, start + every * 3).expect_err("in debt");
        assert_eq!(wait, every * 41);
    }
}
