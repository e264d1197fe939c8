//! Health checks of one running instance: http and tcp probes on a timer.
//!
//! A [`Checker`] is a task per container that probes each of its group's
//! checks at the check's interval and keeps the latest result of each. The
//! agent reads the summary ([`Checker::health`]) on every pass and reports it
//! only when it changes. Failures inside a check's grace period (counted from
//! the container's start) leave the health `unknown` rather than `failing`, so
//! a slow start is not a failed deploy.

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

/// The probes of one container; dropping it stops them.
#[derive(Debug)]
pub struct Checker {
    results: Arc<Mutex<BTreeMap<String, Result<(), String>>>>,
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
                    let mut passed_once = false;
                    loop {
                        let result = probe(&ip, &check).await;
                        passed_once |= result.is_ok();
                        let previous = results
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(check.name.clone(), result.clone());
                        if previous.as_ref() != Some(&result) {
                            changed.notify_one();
                        }
                        let wait = if passed_once { interval } else { interval.min(STARTUP_PROBE) };
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
            match results.get(&check.name) {
                Some(Ok(())) => {}
                Some(Err(output)) => {
                    let in_grace = self.started.elapsed() < Duration::from_millis(check.grace_period_ms);
                    if !in_grace {
                        return (Health::Failing, Some(format!("check '{}': {output}", check.name)));
                    }
                    passing = false;
                }
                None => passing = false,
            }
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
}
