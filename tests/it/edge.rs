//! The edge on a real multi-node topology (each node in its own container
//! with its own Docker engine, joined by WireGuard): any node's HTTP, HTTPS
//! and TCP ports reach a healthy instance of the right app, wherever it
//! runs. Requests are made from this machine with curl (HTTP/1.1, HTTP/2,
//! TLS) and raw sockets (WebSocket, TCP services, a steady stream), the
//! way an outside client would.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use roost_tests::apps::{cli, hello_app, hello_toml};
use roost_tests::pebble::Pebble;
use roost_tests::topology::Topology;
use roost_tests::wait_until;
use serde_json::Value;

struct Admin {
    endpoint: String,
    token: String,
}

impl Admin {
    async fn run(&self, args: &[&str]) -> Result<String> {
        cli(&self.endpoint, &self.token, args).await.map_err(|e| anyhow::anyhow!("roost {args:?}: {e}"))
    }

    async fn json(&self, args: &[&str]) -> Result<Value> {
        let mut args = args.to_vec();
        args.push("--json");
        Ok(serde_json::from_str(&self.run(&args).await?)?)
    }

    /// Deploys the hello app as `app` with `extra` roost.toml lines, scaled
    /// to `count`, and waits until that many instances pass.
    async fn deploy(&self, app: &str, extra: &str, count: usize) -> Result<()> {
        self.deploy_toml(app, &hello_toml(app, extra), count).await
    }

    async fn deploy_toml(&self, app: &str, toml: &str, count: usize) -> Result<()> {
        let dir = hello_app(toml)?;
        self.run(&["deploy", &dir.path().to_string_lossy()]).await?;
        self.run(&["scale", "count", &count.to_string(), "-a", app]).await?;
        wait_until(&format!("{count} instances of {app} passing"), Duration::from_secs(90), || async {
            let status = self.json(&["status", "-a", app]).await?;
            let passing =
                status["instances"].as_array().map_or(0, |l| l.iter().filter(|i| i["health"] == "passing").count());
            Ok(passing == count)
        })
        .await
    }
}

/// `curl ARGS`: (status, body, stderr).
fn curl(args: &[&str]) -> Result<(u16, String, String)> {
    let out = Command::new("curl").args(["-s", "--max-time", "30", "-w", "\n%{http_code}"]).args(args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    Ok((code.trim().parse().unwrap_or(0), body.to_owned(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// `GET http://HOST/PATH` through the edge at `ip` (port 80).
fn get(ip: &str, host: &str, path: &str) -> Result<(u16, String)> {
    let (code, body, _) = curl(&["-H", &format!("Host: {host}"), &format!("http://{ip}/{path}")])?;
    Ok((code, body))
}

fn instance_of(body: &str) -> Option<String> {
    body.split("instance ").nth(1)?.split(',').next().map(str::to_owned)
}

async fn start(topology: &Topology, count: usize, extra_init: &str, labels: &[&str]) -> Result<Admin> {
    let edge = |i: usize| {
        let ip = &topology.machine(i).ip;
        let label = labels.get(i).map(|l| format!("--label {l}")).unwrap_or_default();
        format!("--http-listen {ip}:80 --https-listen {ip}:443 {label}")
    };
    topology.init(0, &format!("{} {extra_init}", edge(0)))?;
    let token = topology.file(0, "/data/node/admin.token").await?;
    let join = topology.file(0, "/data/node/join.token").await?;
    for i in 1..count {
        topology.join(i, &join, &edge(i))?;
    }
    let admin = Admin { endpoint: topology.endpoint(0), token };
    wait_until(&format!("{count} nodes up"), Duration::from_secs(90), || async {
        let nodes = admin.json(&["node", "list"]).await?;
        Ok(nodes.as_array().is_some_and(|l| l.len() == count && l.iter().all(|n| n["state"] == "up")))
    })
    .await?;
    Ok(admin)
}

/// A WebSocket round trip over a raw connection: handshake, one masked
/// text frame, its echo.
fn websocket_echo(ip: &str, host: &str, message: &str) -> Result<String> {
    let mut stream = std::net::TcpStream::connect((ip, 80))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte)?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    if !head.starts_with("HTTP/1.1 101") || !head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") {
        bail!("no WebSocket handshake: {head}");
    }
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | message.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(message.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    stream.write_all(&frame)?;
    let mut header = [0u8; 2];
    stream.read_exact(&mut header)?;
    let mut payload = vec![0u8; usize::from(header[1] & 0x7f)];
    stream.read_exact(&mut payload)?;
    Ok(String::from_utf8_lossy(&payload).into_owned())
}

/// An HTTP request over a raw TCP connection (a TCP service forwards bytes).
fn raw_http(ip: &str, port: u16, path: &str) -> Result<String> {
    let mut stream = std::net::TcpStream::connect((ip, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: raw\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_routes_http_https_websockets_and_tcp_to_healthy_instances_anywhere() -> Result<()> {
    let topology = Topology::start(&format!("roost-it-{}-edge", std::process::id()), 3).await?;
    let admin = start(&topology, 3, "", &[]).await?;
    // A failed assertion prints the nodes' logs too.
    let result = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(routing(&topology, &admin))).await;
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => bail!("{error:#}\n{}", topology.logs()),
        Err(panic) => {
            eprintln!("{}", topology.logs());
            std::panic::resume_unwind(panic)
        }
    }
}

async fn routing(topology: &Topology, admin: &Admin) -> Result<()> {
    let ips: Vec<String> = topology.machines.iter().map(|m| m.ip.clone()).collect();

    // One instance, on some node: every node's edge reaches it.
    admin.deploy("web", "[placement]\nmax_per_node = 1\n", 1).await?;
    let mut seen = BTreeSet::new();
    for ip in &ips {
        let (code, body) = get(ip, "web.localhost", "")?;
        // An error, not a panic, so that the nodes' logs are printed.
        if code != 200 {
            bail!("through {ip}: {code} {body}");
        }
        seen.extend(instance_of(&body));
    }
    assert_eq!(seen.len(), 1, "one instance answers through every node: {seen:?}");
    // Three, one per node: through the three edges, all three answer.
    admin.run(&["scale", "count", "3", "-a", "web"]).await?;
    wait_until("three instances of web answering through the edges", Duration::from_secs(60), || async {
        let mut seen = BTreeSet::new();
        for ip in &ips {
            for _ in 0..3 {
                seen.extend(get(ip, "web.localhost", "").ok().and_then(|(_, body)| instance_of(&body)));
            }
        }
        Ok(seen.len() == 3)
    })
    .await?;

    // Unknown host; an app with no instance; the client's address.
    let (code, body) = get(&ips[1], "nope.localhost", "")?;
    assert_eq!((code, body.trim()), (404, "no app is served at nope.localhost"));
    admin.deploy("idle", "", 1).await?;
    admin.run(&["scale", "count", "0", "-a", "idle"]).await?;
    wait_until("idle to have no instance", Duration::from_secs(30), || async {
        Ok(get(&ips[0], "idle.localhost", "")?.0 == 503)
    })
    .await?;
    let (_, _, verbose) = curl(&["-v", "-H", "Host: idle.localhost", &format!("http://{}/", ips[2])])?;
    assert!(verbose.to_ascii_lowercase().contains("retry-after:"), "{verbose}");
    let (code, headers) = get(&ips[2], "web.localhost", "headers")?;
    assert_eq!(code, 200);
    assert!(headers.contains(&format!("x-forwarded-for: {}", topology.gateway)), "{headers}");
    assert!(
        headers.contains("x-forwarded-proto: http\n") && headers.contains("x-forwarded-host: web.localhost"),
        "{headers}"
    );
    assert!(headers.contains("roost-request-id: "), "{headers}");

    // HTTPS with the cluster CA's certificate for web.localhost, over HTTP/2.
    let ca = topology.exec(0, "cat /data/node/tls/ca.pem")?;
    let ca_file = tempfile::NamedTempFile::new()?;
    std::fs::write(ca_file.path(), ca)?;
    let ca_path = ca_file.path().to_string_lossy().into_owned();
    for ip in &ips {
        let resolve = format!("web.localhost:443:{ip}");
        let out = Command::new("curl")
            .args(["-s", "--http2", "--cacert", &ca_path, "--resolve", &resolve, "-o", "/dev/null"])
            .args(["-w", "%{http_code} %{http_version}", "https://web.localhost/"])
            .output()?;
        let answer = String::from_utf8_lossy(&out.stdout);
        assert_eq!(answer, "200 2", "HTTPS through {ip}: {}", String::from_utf8_lossy(&out.stderr));
    }

    // WebSocket through the proxy.
    assert_eq!(websocket_echo(&ips[1], "web.localhost", "ping through the edge")?, "ping through the edge");

    // 100 MiB each way, streamed: the proxy's memory stays bounded.
    let blob = tempfile::NamedTempFile::new()?;
    {
        let mut file = std::fs::File::create(blob.path())?;
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..100 {
            file.write_all(&chunk)?;
        }
    }
    let (before, _) = topology.roost_memory(1)?;
    let upload = format!("@{}", blob.path().display());
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "curl -s --max-time 120 -H 'Host: web.localhost' --data-binary '{upload}' http://{}/echo | cmp - {}",
            ips[1],
            blob.path().display()
        ))
        .output()?;
    assert!(out.status.success(), "the echoed body differs: {}", String::from_utf8_lossy(&out.stdout));
    let out = Command::new("curl")
        .args(["-s", "--max-time", "120", "-H", "Host: web.localhost", "-o", "/dev/null"])
        .args(["-w", "%{http_code} %{size_download}", &format!("http://{}/bytes/104857600", ips[1])])
        .output()?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 104857600");
    let (after, _) = topology.roost_memory(1)?;
    println!("edge peak memory: {} MiB before, {} MiB after 2 x 100 MiB", before / 1024, after / 1024);
    assert!(after < before + 64 * 1024, "the edge's peak memory grew from {before} KiB to {after} KiB");

    // force_https.
    let secure = hello_toml("secure", "").replace("internal_port = 8080", "internal_port = 8080\nforce_https = true");
    admin.deploy_toml("secure", &secure, 1).await?;
    let (_, _, verbose) = curl(&["-v", "-H", "Host: secure.localhost", &format!("http://{}/a?b=c", ips[0])])?;
    let lower = verbose.to_ascii_lowercase();
    assert!(
        lower.contains("< http/1.1 308") && lower.contains("location: https://secure.localhost/a?b=c"),
        "{verbose}"
    );

    // A TCP service on every node.
    admin
        .deploy("raw", "[[services]]\nprotocol = \"tcp\"\ninternal_port = 8080\n[[services.ports]]\nport = 9000\n", 1)
        .await?;
    for ip in &ips {
        let answer = wait_for_tcp(ip, 9000).await?;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("Hello from raw"), "{answer}");
    }

    // The hard limit: one request at a time; the next waits, then 503.
    let limit = "[http_service.concurrency]\nsoft_limit = 1\nhard_limit = 1\n";
    admin.deploy("narrow", limit, 1).await?;
    let slow_ip = ips[0].clone();
    let slow = std::thread::spawn(move || get(&slow_ip, "narrow.localhost", "sleep/5000"));
    wait_until("the slow request to reach the instance", Duration::from_secs(10), || async {
        Ok(admin.run(&["logs", "-a", "narrow", "-n", "50"]).await?.contains("/sleep/5000"))
    })
    .await?;
    let (code, _, verbose) = curl(&["-v", "-H", "Host: narrow.localhost", &format!("http://{}/health", ips[0])])?;
    assert_eq!(code, 503, "over the hard limit after the queue: {verbose}");
    assert!(verbose.to_ascii_lowercase().contains("retry-after:"));
    let (code, body) = slow.join().map_err(|_| anyhow::anyhow!("the slow request panicked"))??;
    assert_eq!((code, body.trim()), (200, "slept 5000 ms"));
    Ok(())
}

async fn wait_for_tcp(ip: &str, port: u16) -> Result<String> {
    let answer = std::sync::Mutex::new(String::new());
    wait_until(&format!("TCP service on {ip}:{port}"), Duration::from_secs(30), || async {
        match raw_http(ip, port, "/") {
            Ok(text) if text.starts_with("HTTP/1.1 200") => {
                *answer.lock().unwrap_or_else(|p| p.into_inner()) = text;
                Ok(true)
            }
            _ => Ok(false),
        }
    })
    .await?;
    Ok(answer.into_inner().unwrap_or_else(|p| p.into_inner()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_costs_a_steady_stream_few_failed_requests() -> Result<()> {
    let topology = Topology::start(&format!("roost-it-{}-kill", std::process::id()), 3).await?;
    // n1 takes the traffic; the app runs on n2 and n3 only.
    let admin = start(&topology, 3, "", &["zone=front", "zone=back", "zone=back"]).await?;
    let result = async {
        admin.deploy("steady", "[placement]\nmax_per_node = 1\nconstraints = [\"zone == back\"]\n", 2).await?;
        let ip = topology.machine(0).ip.clone();
        let (stop, ok, failed) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stream = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match raw_get(&ip, "steady.localhost", "/") {
                        Ok(answer) if answer.starts_with("HTTP/1.1 200") => ok.fetch_add(1, Ordering::SeqCst),
                        _ => failed.fetch_add(1, Ordering::SeqCst),
                    };
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        wait_until("a steady stream", Duration::from_secs(10), || async { Ok(ok.load(Ordering::SeqCst) > 50) }).await?;
        topology.kill_machine(2)?;
        let killed_at = ok.load(Ordering::SeqCst) + failed.load(Ordering::SeqCst);
        // The stream goes on: the next hundred requests after the kill all
        // answer, through the surviving instance.
        wait_until("100 requests after the kill", Duration::from_secs(60), || async {
            Ok(ok.load(Ordering::SeqCst) + failed.load(Ordering::SeqCst) > killed_at + 100)
        })
        .await?;
        let failed_by_then = failed.load(Ordering::SeqCst);
        let settled = ok.load(Ordering::SeqCst) + failed_by_then;
        wait_until("100 more", Duration::from_secs(60), || async {
            Ok(ok.load(Ordering::SeqCst) + failed.load(Ordering::SeqCst) > settled + 100)
        })
        .await?;
        stop.store(true, Ordering::SeqCst);
        let _ = stream.join();
        let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
        println!("steady stream through n1 while n3 was killed: {ok} answered, {failed} failed");
        assert_eq!(failed, failed_by_then, "requests kept failing long after the kill");
        assert!(failed <= 5, "{failed} requests failed");
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if let Err(error) = result {
        bail!("{error:#}\n{}", topology.logs());
    }
    Ok(())
}

/// One `GET` on a fresh connection, with a short timeout.
fn raw_get(ip: &str, host: &str, path: &str) -> Result<String> {
    let address = std::net::SocketAddr::new(ip.parse()?, 80);
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_from_pebble_is_served_by_every_node_and_renewed() -> Result<()> {
    let topology = Topology::start(&format!("roost-it-{}-acme", std::process::id()), 2).await?;
    // Valid 30 days and 30 seconds: due for renewal half a minute after issue.
    let pebble = Pebble::start(&topology.gateway, 80, Duration::from_secs(30 * 24 * 3600 + 30)).await?;
    let ca = std::fs::read_to_string(pebble.ca_path())?;
    for i in 0..2 {
        topology.write_file(i, "/data/pebble-ca.pem", &ca)?;
    }
    let extra =
        format!("--acme-directory {} --acme-ca /data/pebble-ca.pem --acme-email ops@example.com", pebble.directory);
    let admin = start(&topology, 2, &extra, &[]).await?;
    let result = async {
        admin.deploy("shop", "", 1).await?;
        // The ACME server reaches n2, not the leader that ordered.
        pebble.add_a("shop.example.com", &[&topology.machine(1).ip])?;
        let added = admin.run(&["certs", "add", "shop.example.com", "-a", "shop"]).await?;
        assert!(added.contains("shop.example.com"), "{added}");
        let issued_at = std::sync::Mutex::new(0i64);
        wait_until("the certificate issued", Duration::from_secs(60), || async {
            let shown = admin.json(&["certs", "show", "shop.example.com"]).await?;
            if shown["status"] == "failed" {
                bail!("the order failed: {}", shown["error"]);
            }
            Ok(shown["status"] == "issued")
        })
        .await?;
        let list = admin.json(&["certs", "list", "-a", "shop"]).await?;
        assert_eq!(list[0]["status"], "issued", "{list}");
        assert!(list[0]["expires"].is_string(), "{list}");
        *issued_at.lock().unwrap_or_else(|p| p.into_inner()) = issued_ms(&admin).await?;

        let root = tempfile::NamedTempFile::new()?;
        std::fs::write(root.path(), pebble.issuing_root()?)?;
        let root_path = root.path().to_string_lossy().into_owned();
        let served = |ip: &str| -> Result<String> {
            let resolve = format!("shop.example.com:443:{ip}");
            let (code, body, verbose) =
                curl(&["-v", "--cacert", &root_path, "--resolve", &resolve, "https://shop.example.com/"])?;
            if code != 200 {
                bail!("through {ip}: {code} {body} {verbose}");
            }
            Ok(verbose.lines().find(|l| l.contains("expire date:")).unwrap_or_default().to_owned())
        };
        // The state says issued; each edge loads it on its next (paced) pass.
        let first = std::sync::Mutex::new(Vec::<String>::new());
        wait_until("every node serving the issued certificate", Duration::from_secs(10), || async {
            let now: Vec<String> = topology.machines.iter().map(|m| served(&m.ip)).collect::<Result<_>>()?;
            let all = now.iter().all(|e| !e.is_empty());
            *first.lock().unwrap_or_else(|p| p.into_inner()) = now;
            Ok(all)
        })
        .await?;
        let first = first.into_inner().unwrap_or_else(|p| p.into_inner());
        // The certificate's key is sealed wherever it is kept, and so is the
        // cluster CA's: no private key is in plain text in the Raft log.
        for i in 0..2 {
            let found = topology
                .exec(i, "grep -rhoa 'BEGIN PRIVATE KEY-----[^-]*-----END' /data/node/raft | sort -u | wc -l")?;
            assert_eq!(found.trim(), "0", "distinct private keys in plain text in the Raft log of machine {i}");
        }

        // Renewal: a new certificate, served by every node without a restart.
        wait_until("the certificate renewed", Duration::from_secs(120), || async {
            let before = *issued_at.lock().unwrap_or_else(|p| p.into_inner());
            Ok(issued_ms(&admin).await? > before)
        })
        .await?;
        wait_until("every node serving the renewed certificate", Duration::from_secs(30), || async {
            let now: Vec<String> = topology.machines.iter().map(|m| served(&m.ip)).collect::<Result<_>>()?;
            Ok(now.iter().zip(&first).all(|(now, before)| now != before))
        })
        .await?;

        // A domain the ACME server cannot validate: failed, with its error.
        admin.run(&["certs", "add", "nowhere.example.com", "-a", "shop"]).await?;
        wait_until("the failed order", Duration::from_secs(60), || async {
            let shown = admin.json(&["certs", "show", "nowhere.example.com"]).await?;
            Ok(shown["status"] == "failed" && shown["error"].as_str().is_some_and(|e| !e.is_empty()))
        })
        .await?;
        admin.run(&["certs", "remove", "nowhere.example.com"]).await?;
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if let Err(error) = result {
        bail!("{error:#}\n{}\n--- pebble ---\n{}", topology.logs(), pebble.logs());
    }
    Ok(())
}

async fn issued_ms(admin: &Admin) -> Result<i64> {
    let shown = admin.json(&["certs", "show", "shop.example.com"]).await?;
    let text = shown["issued_at"].as_str().context("issued_at")?;
    let at = humantime::parse_rfc3339(text)?;
    Ok(at.duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64)
}
