//! `edge-bench`: Roost's edge against nginx, and what a dead node costs.
//!
//! 1. **proxy**: one Roost node on this machine runs the example app (one
//!    instance; it keeps connections alive). `wrk` (2 threads, 32
//!    connections, `--seconds` each) measures, one after the other: the
//!    instance directly (its mesh address); through Roost's edge; and
//!    through nginx configured as an equivalent reverse proxy (an upstream
//!    with keep-alive connections, HTTP/1.1 to the instance, `Host` and
//!    `X-Forwarded-For` set, an access log line per request, as Roost
//!    writes). Over HTTP, and over HTTPS (TLS 1.3, the same kind of P-256
//!    certificate on both, HTTP/1.1 from wrk). Printed: requests/s and p50
//!    latency of each, the added p50 over direct, and the ratios
//!    roost/nginx (goal: requests/s at least nginx's, added p50 at most
//!    nginx's). wrk resolves `hello.localhost` through a private
//!    `/etc/hosts` (a mount namespace of its own), so TLS carries SNI.
//! 2. **failover**: four nodes, each in its own container (the test
//!    topology); n1 takes the traffic, the app runs on n2, n3 and n4. A
//!    client sends a request every 20 ms through n1's edge (a new
//!    connection each, 5 s timeout) while n3 is killed (SIGKILL of its node
//!    process, `docker kill` of its containers). Printed: requests, failed
//!    requests, the time from the first failure to the last (goal: under
//!    1 s of failures), and the slowest request after the kill.
//!
//! Needs wrk, nginx (`apt-get install wrk nginx-light`) and Docker. Run with
//! `cargo run --release -p roost-tests --bin edge-bench [-- --runs N --seconds S --only proxy|failover]`.

use std::io::{Read, Write};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rcgen::{CertificateParams, KeyPair};
use roost_tests::apps::{cli, hello_app, hello_toml};
use roost_tests::process::{free_port, NodeProcess};
use roost_tests::topology::Topology;
use roost_tests::wait_until;
use serde_json::Value;

const USAGE: roost_tests::bench::Usage = roost_tests::bench::Usage {
    name: "edge-bench",
    values: &[("--runs", "N"), ("--seconds", "S")],
    switches: &[],
    parts: &["proxy", "failover"],
};

#[tokio::main]
async fn main() -> Result<()> {
    let flags = roost_tests::bench::Flags::from_command_line(&USAGE)?;
    let runs = flags.number("--runs", 3)?;
    let seconds = flags.number("--seconds", 10)?;
    let want = |name: &str| flags.wants(name);
    if want("proxy") {
        for tool in ["wrk", "nginx", "unshare"] {
            if !found(tool) {
                bail!("edge-bench needs {tool}: apt-get install wrk nginx-light");
            }
        }
        proxy(runs, seconds).await?;
    }
    if want("failover") {
        failover(runs).await?;
    }
    Ok(())
}

fn found(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// One wrk measurement: requests/s and p50 latency (ms).
#[derive(Clone, Copy, Debug)]
struct Load {
    rps: f64,
    p50_ms: f64,
}

fn wrk(url: &str, host: Option<&str>, hosts: &std::path::Path, seconds: u64) -> Result<Load> {
    let header = host.map(|h| format!("-H 'Host: {h}'")).unwrap_or_default();
    let script = format!(
        "mount --bind {} /etc/hosts && exec wrk -t2 -c32 -d{seconds}s --latency {header} {url}",
        hosts.display()
    );
    let out = Command::new("unshare").args(["-m", "sh", "-c", &script]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk {url}: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no Requests/sec")?;
    let p50 = text.lines().find_map(|l| l.trim().strip_prefix("50%")).context("no p50")?.trim().to_owned();
    Ok(Load { rps, p50_ms: millis(&p50)? })
}

fn millis(text: &str) -> Result<f64> {
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic()).context("no unit")?);
    let number: f64 = number.parse()?;
    Ok(match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        other => bail!("unknown unit {other}"),
    })
}

async fn proxy(runs: u64, seconds: u64) -> Result<()> {
    let root = tempfile::Builder::new().prefix("roost-edge-bench-").tempdir()?;
    let node = NodeProcess::init(root.path(), "n1")?;
    let token = node.read_token_when_ready("admin.token").await?;
    let endpoint = node.address.clone();
    let run = |args: Vec<String>| {
        let (endpoint, token) = (endpoint.clone(), token.clone());
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cli(&endpoint, &token, &args).await.map_err(|e| anyhow::anyhow!("roost {args:?}: {e}"))
        }
    };
    let app = hello_app(&hello_toml("hello", ""))?;
    run(vec!["deploy".into(), app.path().to_string_lossy().into_owned()]).await?;
    let backend = Mutex::new(String::new());
    wait_until("the instance passing", Duration::from_secs(60), || async {
        let status: Value =
            serde_json::from_str(&run(vec!["status".into(), "-a".into(), "hello".into(), "--json".into()]).await?)?;
        let instance = &status["instances"][0];
        if instance["health"] == "passing" {
            *backend.lock().unwrap_or_else(|p| p.into_inner()) =
                instance["address"].as_str().unwrap_or_default().to_owned();
            return Ok(true);
        }
        Ok(false)
    })
    .await?;
    let backend = backend.into_inner().unwrap_or_else(|p| p.into_inner());
    let (edge_http, edge_https) = (node.http, node.https);

    // nginx: the same backend, the same kind of certificate, an access log.
    let dir = root.path().join("nginx");
    std::fs::create_dir_all(&dir)?;
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["hello.localhost".to_owned()])?.self_signed(&key)?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    let (nginx_http, nginx_https) = (free_port()?, free_port()?);
    let config = format!(
        r#"worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log {dir}/access.log;
  upstream hello {{ server {backend}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{nginx_http};
    listen 127.0.0.1:{nginx_https} ssl;
    server_name hello.localhost;
    ssl_certificate {dir}/cert.pem;
    ssl_certificate_key {dir}/key.pem;
    ssl_protocols TLSv1.3;
    location / {{
      proxy_pass http://hello;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
  }}
}}
"#,
        dir = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), config)?;
    let started = Command::new("nginx").arg("-c").arg(dir.join("nginx.conf")).output()?;
    if !started.status.success() {
        bail!("nginx did not start: {}", String::from_utf8_lossy(&started.stderr));
    }
    let hosts = root.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost hello.localhost\n")?;
    let result = async {
        println!(
            "# edge-bench proxy: wrk -t2 -c32 -d{seconds}s, one instance of hello, one 2-core machine, {runs} runs"
        );
        for run in 1..=runs {
            let direct = wrk(&format!("http://{backend}/"), None, &hosts, seconds)?;
            let cases = [
                (
                    "http",
                    format!("http://hello.localhost:{}/", edge_http.port()),
                    format!("http://hello.localhost:{nginx_http}/"),
                ),
                (
                    "https",
                    format!("https://hello.localhost:{}/", edge_https.port()),
                    format!("https://hello.localhost:{nginx_https}/"),
                ),
            ];
            for (scheme, roost_url, nginx_url) in cases {
                let roost = wrk(&roost_url, None, &hosts, seconds)?;
                let nginx = wrk(&nginx_url, None, &hosts, seconds)?;
                let (roost_added, nginx_added) = (roost.p50_ms - direct.p50_ms, nginx.p50_ms - direct.p50_ms);
                println!(
                    "run={run} scheme={scheme} direct_rps={:.0} roost_rps={:.0} nginx_rps={:.0} rps_ratio={:.2} \
                     direct_p50_ms={:.3} roost_p50_ms={:.3} nginx_p50_ms={:.3} roost_added_p50_ms={roost_added:.3} \
                     nginx_added_p50_ms={nginx_added:.3}",
                    direct.rps,
                    roost.rps,
                    nginx.rps,
                    roost.rps / nginx.rps,
                    direct.p50_ms,
                    roost.p50_ms,
                    nginx.p50_ms
                );
            }
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let _ = Command::new("nginx").arg("-c").arg(dir.join("nginx.conf")).args(["-s", "stop"]).output();
    drop(node);
    result
}

/// One `GET /` on a fresh connection through `ip`'s edge.
fn get(ip: &str) -> Result<()> {
    let address = std::net::SocketAddr::new(ip.parse()?, 80);
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: steady.localhost\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    if !answer.starts_with("HTTP/1.1 200") {
        bail!("answered {}", answer.lines().next().unwrap_or_default());
    }
    Ok(())
}

async fn failover(runs: u64) -> Result<()> {
    println!("# edge-bench failover: 4 nodes in containers; n1 takes a request every 20 ms; the app runs on n2-n4; n3 is killed");
    for run in 1..=runs {
        let topology = Topology::start(&format!("roost-bench-{}-fail{run}", std::process::id()), 4).await?;
        let result = failover_once(&topology, run).await;
        if let Err(error) = &result {
            eprintln!("{error:#}\n{}", topology.logs());
        }
        result?;
    }
    Ok(())
}

async fn failover_once(topology: &Topology, run: u64) -> Result<()> {
    let edge = |i: usize| {
        let ip = &topology.machine(i).ip;
        let zone = if i == 0 { "front" } else { "back" };
        format!("--http-listen {ip}:80 --https-listen {ip}:443 --label zone={zone}")
    };
    topology.init(0, &edge(0))?;
    let token = topology.file(0, "/data/node/admin.token").await?;
    let join = topology.file(0, "/data/node/join.token").await?;
    for i in 1..4 {
        topology.join(i, &join, &edge(i))?;
    }
    let endpoint = topology.endpoint(0);
    let run_cli = |args: Vec<String>| {
        let (endpoint, token) = (endpoint.clone(), token.clone());
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cli(&endpoint, &token, &args).await.map_err(|e| anyhow::anyhow!("roost {args:?}: {e}"))
        }
    };
    wait_until("4 nodes up", Duration::from_secs(90), || async {
        let nodes: Value = serde_json::from_str(&run_cli(vec!["node".into(), "list".into(), "--json".into()]).await?)?;
        Ok(nodes.as_array().is_some_and(|l| l.len() == 4 && l.iter().all(|n| n["state"] == "up")))
    })
    .await?;
    let app = hello_app(&hello_toml("steady", "[placement]\nmax_per_node = 1\nconstraints = [\"zone == back\"]\n"))?;
    run_cli(vec!["deploy".into(), app.path().to_string_lossy().into_owned()]).await?;
    run_cli(vec!["scale".into(), "count".into(), "3".into(), "-a".into(), "steady".into()]).await?;
    wait_until("3 instances passing", Duration::from_secs(90), || async {
        let status: Value = serde_json::from_str(
            &run_cli(vec!["status".into(), "-a".into(), "steady".into(), "--json".into()]).await?,
        )?;
        Ok(status["instances"].as_array().is_some_and(|l| l.iter().filter(|i| i["health"] == "passing").count() == 3))
    })
    .await?;
    let ip = topology.machine(0).ip.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let record: Arc<Mutex<Vec<(Instant, bool, Duration)>>> = Arc::default();
    let client = {
        let (stop, record) = (stop.clone(), record.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let ok = get(&ip).is_ok();
                record.lock().unwrap_or_else(|p| p.into_inner()).push((Instant::now(), ok, started.elapsed()));
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed = Instant::now();
    topology.kill_machine(2)?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::SeqCst);
    let _ = client.join();
    let record = record.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let failures: Vec<Instant> = record.iter().filter(|(_, ok, _)| !ok).map(|(at, _, _)| *at).collect();
    let span = match (failures.first(), failures.last()) {
        (Some(first), Some(last)) => last.duration_since(*first).as_secs_f64() * 1000.0,
        _ => 0.0,
    };
    let after: Vec<Duration> = record.iter().filter(|(at, _, _)| *at >= killed).map(|(_, _, took)| *took).collect();
    let slowest = after.iter().max().copied().unwrap_or_default();
    let slow = after.iter().filter(|took| **took > Duration::from_millis(100)).count();
    println!(
        "run={run} requests={} after_kill={} failed={} failure_span_ms={span:.0} slowest_after_kill_ms={} over_100ms={slow}",
        record.len(),
        after.len(),
        failures.len(),
        slowest.as_millis()
    );
    Ok(())
}
