//! How a node's loops follow the replicated state.

use std::time::Duration;

use roost_raft::Consensus;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Runs `step` whenever what it depends on (`view`, read from the state)
/// differs from what the last step that succeeded saw, or when the time
/// that step asked to run again at has come (`Ok(Some(at))`), paced to its
/// own cost (`store::Pace`), until `stop`. A step that fails runs again
/// after `retry`; each distinct failure is logged once, after `what`.
pub async fn follow_state<V: PartialEq, Step: std::future::Future<Output = Result<Option<Instant>, String>>>(
    consensus: &Consensus,
    stop: CancellationToken,
    what: &str,
    retry: Duration,
    mut view: impl FnMut() -> V,
    mut step: impl FnMut() -> Step,
) {
    let mut changes = consensus.state().changes();
    let mut pace = roost_raft::store::Pace::default();
    let mut failing: Option<String> = None;
    // What the last step that succeeded saw, and when it asked to run again:
    // a change of anything else in the state (nearly every entry) needs none.
    let mut done: Option<(V, Option<Instant>)> = None;
    loop {
        let seen = view();
        let next = match &done {
            Some((last, next)) if *last == seen && next.is_none_or(|at| Instant::now() < at) => *next,
            _ => {
                let started = std::time::Instant::now();
                let result = step().await;
                pace.passed(started);
                match result {
                    Ok(next) => {
                        failing = None;
                        done = Some((seen, next));
                        next
                    }
                    Err(error) => {
                        if failing.as_ref() != Some(&error) {
                            tracing::warn!(%error, "{what}; retrying");
                            failing = Some(error);
                        }
                        done = None;
                        Some(Instant::now() + retry)
                    }
                }
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            changed = pace.settled(&mut changes) => if changed.is_err() { return },
            () = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}
