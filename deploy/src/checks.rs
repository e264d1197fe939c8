//! Health checks of one running instance: http and tcp probes on a timer.
//!
//! A [`Checker`] is a task per container that probes each of its group's
//! checks at the check's interval and keeps the latest result of each. The
//! agent reads the summary ([`Checker::health`]) on every pass and reports it
//! only when it changes. Failures inside a check's grace period (counted from
//! the container's start) leave the health `unknown` rather than `failing`, so
//! a slow start is not a failed deploy. After it, a check fails only when its
//! last `failure_threshold` probes all failed (3 unless roost.toml says
//! otherwise): one lost probe neither fails a deploy nor takes a passing
//! instance out of the edge's rotation, as Kubernetes' `failureThreshold`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_raft::workload::{CheckKind, CheckSpec, Health};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

/// How often a check that has not passed yet is probed.
pub const STARTUP_PROBE: Duration = Duration::from_millis(200);

/// What a check's probes have found so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct CheckState {
    /// Some probe has passed since the container started.
    passed_once: bool,
    /// Probes failed in a row since the last that passed.
    failures: u32,
    /// The output of the latest failed probe.
    output: Option<String>,
}

impl CheckState {
    fn record(&mut self, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.passed_once = true;
                self.failures = 0;
                self.output = None;
            }
            Err(output) => {
                self.failures = self.failures.saturating_add(1);
                self.output = Some(output);
            }
        }
    }

    /// What the health summary reads: whether it changed is what the
    /// agent must hear about.
    fn verdict(&self, threshold: u32) -> (bool, bool, Option<&str>) {
        let failed = self.failures >= threshold.max(1);
        // Below the threshold, a check that has passed still passes.
        let passing = self.passed_once && !failed;
        (passing, failed, self.output.as_deref().filter(|_| failed))
    }
}

/// The probes of one container; dropping it stops them.
#[derive(Debug)]
pub struct Checker {
    results: Arc<Mutex<BTreeMap<String, CheckState>>>,
    checks: Vec<CheckSpec>,
    started: Instant,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Checker {
    /// Starts probing `ip`; `started` is when the container started.
    /// `changed` is notified whenever a check's result changes.
    ///
    /// Until a check first passes it is probed every [`STARTUP_PROBE`] (or
    /// its interval, if shorter), so a new instance is seen healthy soon
    /// after it is; from then on, at its interval.
    pub fn start(ip: &str, checks: &[CheckSpec], started: Instant, changed: Arc<Notify>) -> Self {
        let results = Arc::new(Mutex::new(BTreeMap::new()));
        let tasks = checks
            .iter()
            .map(|check| {
                let (check, ip, results, changed) = (check.clone(), ip.to_owned(), results.clone(), changed.clone());
                tokio::spawn(async move {
                    let interval = Duration::from_millis(check.interval_ms.max(100));
                    loop {
                        let result = probe(&ip, &check).await;
                        let (was, now) = {
                            let mut results = results.lock().unwrap_or_else(|p| p.into_inner());
                            let state: &mut CheckState = results.entry(check.name.clone()).or_default();
                            let was = state.clone();
                            state.record(result);
                            (was, state.clone())
                        };
                        let first = was == CheckState::default();
                        if first || was.verdict(check.failure_threshold) != now.verdict(check.failure_threshold) {
                            changed.notify_one();
                        }
                        let wait = if now.passed_once { interval } else { interval.min(STARTUP_PROBE) };
                        tokio::time::sleep(wait).await;
                    }
                })
            })
            .collect();
        Self { results, checks: checks.to_vec(), started, tasks }
    }

    /// The instance's health, and the output of a failing check.
    pub fn health(&self) -> (Health, Option<String>) {
        if self.checks.is_empty() {
            return (Health::Unknown, None);
        }
        let results = self.results.lock().unwrap_or_else(|p| p.into_inner());
        let mut passing = true;
        for check in &self.checks {
            let Some(state) = results.get(&check.name) else {
                passing = false;
                continue;
            };
            let (check_passing, failed, output) = state.verdict(check.failure_threshold);
            let in_grace = self.started.elapsed() < Duration::from_millis(check.grace_period_ms);
            if failed && !in_grace {
                let output = output.unwrap_or_default();
                return (
                    Health::Failing,
                    Some(format!(
                        "check '{}' failed {} times in a row: {output}",
                        check.name,
                        check.failure_threshold.max(1)
                    )),
                );
            }
            passing &= check_passing;
        }
        (if passing { Health::Passing } else { Health::Unknown }, None)
    }
}

/// Runs one probe; the error is what a user reads as the check's output.
pub async fn probe(ip: &str, check: &CheckSpec) -> Result<(), String> {
    let address = format!("{ip}:{}", check.port);
    let limit = Duration::from_millis(check.timeout_ms.max(1));
    let attempt = async {
        let mut stream = TcpStream::connect(&address).await.map_err(|e| format!("cannot connect to {address}: {e}"))?;
        if check.kind == CheckKind::Tcp {
            return Ok(());
        }
        let method = check.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
        let path = check.path.as_deref().unwrap_or("/");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: roost-check\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.map_err(|e| format!("{method} {path}: {e}"))?;
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 256];
        while !head.contains(&b'\n') && head.len() < 4096 {
            let n = stream.read(&mut buf).await.map_err(|e| format!("{method} {path}: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        let line = line.lines().next().unwrap_or_default();
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("{method} {path}: not an HTTP answer: {line:?}"))?;
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(format!("{method} {path} answered {status}"))
        }
    };
    match timeout(limit, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer from {address} within {}ms", check.timeout_ms)),
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    fn check(kind: CheckKind, port: u16) -> CheckSpec {
        CheckSpec {
            name: "c".into(),
            kind,
            port,
            path: Some("/health".into()),
            method: None,
            interval_ms: 100,
            timeout_ms: 500,
            grace_period_ms: 0,
            failure_threshold: 3,
        }
    }

    async fn serve(status: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes()).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn http_checks_pass_on_2xx_and_fail_with_the_status() {
        let ok = serve("200 OK").await;
        assert_eq!(probe("127.0.0.1", &check(CheckKind::Http, ok)).await, Ok(()));
        let bad = serve("503 Service Unavailable").await;
        assert_eq!(probe("127.0.0.1", &check(CheckKind::Http, bad)).await, Err("GET /health answered 503".into()));
        assert!(probe("127.0.0.1", &check(CheckKind::Tcp, ok)).await.is_ok());
    }

    #[tokio::test]
    async fn a_closed_port_fails_with_the_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let error = probe("127.0.0.1", &check(CheckKind::Tcp, port)).await.expect_err("closed");
        assert!(error.starts_with(&format!("cannot connect to 127.0.0.1:{port}")), "{error}");
    }

    #[test]
    fn a_check_fails_only_after_threshold_failures_in_a_row() {
        let mut state = CheckState::default();
        assert_eq!(state.verdict(3), (false, false, None), "nothing probed yet");
        state.record(Ok(()));
        for n in 1..3 {
            state.record(Err(format!("miss {n}")));
            assert_eq!(state.verdict(3), (true, false, None), "{n} failures keep a passing check passing");
        }
        state.record(Ok(()));
        state.record(Err("miss".into()));
        state.record(Err("miss".into()));
        assert_eq!(state.verdict(3), (true, false, None), "a pass in between starts the count again");
        state.record(Err("miss 3".into()));
        assert_eq!(state.verdict(3), (false, true, Some("miss 3")));
        let mut never = CheckState::default();
        never.record(Err("refused".into()));
        assert_eq!(never.verdict(1), (false, true, Some("refused")), "a threshold of 1 fails at once");
    }

    #[tokio::test]
    async fn one_failed_probe_leaves_a_passing_instance_passing_and_three_fail_it() {
        use std::sync::atomic::{AtomicBool, Ordering};
        // A server whose answer the test flips.
        let healthy = Arc::new(AtomicBool::new(true));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let answer = healthy.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let status = if answer.load(Ordering::SeqCst) { "200 OK" } else { "503 Service Unavailable" };
                let _ = stream.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes()).await;
            }
        });
        let mut spec = check(CheckKind::Http, port);
        spec.interval_ms = 100;
        let changed = Arc::new(Notify::new());
        let checker = Checker::start("127.0.0.1", &[spec], Instant::now(), changed.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        let wait_for = |want: Health| {
            let checker = &checker;
            async move {
                while checker.health().0 != want {
                    assert!(Instant::now() < deadline, "health never became {want:?}: {:?}", checker.health());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        wait_for(Health::Passing).await;
        // Fail exactly one probe: wait until a failure is recorded, then heal.
        healthy.store(false, Ordering::SeqCst);
        let failures = |c: &Checker| c.results.lock().map(|r| r.values().map(|s| s.failures).max()).ok().flatten();
        while failures(&checker) != Some(1) {
            assert!(Instant::now() < deadline, "no failed probe recorded");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(checker.health().0, Health::Passing, "one failed probe changes nothing");
        healthy.store(true, Ordering::SeqCst);
        while failures(&checker) != Some(0) {
            assert!(Instant::now() < deadline, "the pass after the failure was not recorded");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Now fail for good: the third failure in a row fails the instance.
        healthy.store(false, Ordering::SeqCst);
        wait_for(Health::Failing).await;
        assert!(failures(&checker).is_some_and(|n| n >= 3));
        let (_, output) = checker.health();
        assert!(output.as_deref().is_some_and(|o| o.contains("times in a row") && o.contains("503")), "{output:?}");
    }
}
