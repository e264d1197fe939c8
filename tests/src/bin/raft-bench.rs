//! `raft-bench`: Roost's replicated write path against etcd's, side by side.
//!
//! In one run on this machine it starts a 3-node Roost cluster (the real
//! `roost` binary, one process per node, on loopback) and a 3-member etcd
//! cluster (Debian's `etcd-server`), drives each with 1 and 64 concurrent
//! clients for a fixed time, each write committing one Raft entry, and prints:
//!
//! ```text
//! roost clients=N writes_per_s=… p50_ms=… p99_ms=… acknowledged=… present=…
//! etcd-tls clients=N writes_per_s=… p50_ms=… p99_ms=… acknowledged=… present=…
//! etcd clients=N writes_per_s=… p50_ms=… p99_ms=… acknowledged=… present=…
//! ratio clients=N of=roost vs=etcd-tls throughput=<roost/etcd> p50=<roost/etcd>
//! roost idle_rss_mib node=… rss=…
//! ```
//!
//! Roost's write is `CreateApp` (a few hundred bytes of JSON); etcd's is a
//! put of a 128-byte value. Both are sent to the leader, each client over
//! its own connection. Under load neither system gives each write an entry
//! of its own: Roost's leader batches the writes that queue up while one is
//! being synced into one entry (`consensus::run_batcher`), and etcd's raft
//! proposes what has queued up together, so "writes" counts acknowledged
//! client writes, not log entries. After each phase the bench reads back
//! every key it wrote and fails unless each acknowledged write is there.
//!
//! Roost encrypts every hop (TLS 1.3). etcd runs twice: with TLS on every
//! hop (`--peer-auto-tls` between members; on the client port a P-256
//! certificate this bench makes, which its clients verify), which the
//! headline ratio uses, and entirely plain. etcd runs with as many members as
//! Roost has nodes (`--nodes`, 3 by default).
//! With `--bearer`, Roost's clients send the admin token itself
//! (`Bearer`, as tools that cannot sign do) instead of signing each call
//! with its key (what the CLI does), and its rows read `roost-bearer`: the
//! difference is what the CLI's per-call Ed25519 signature costs (etcd here
//! runs without authentication).
//! Run with `cargo run --release -p roost-tests --bin raft-bench [-- --seconds S --nodes N --bearer]`.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use roost_node::daemon::InitTokens;
use roost_proto::api::CreateAppRequest;
use roost_tests::process::{free_port, roost_bin, wait_for_nodes, NodeProcess};
use roost_tests::{admin_client, wait_until};
use tokio::time::Instant;

const CLIENT_COUNTS: [usize; 2] = [1, 64];

#[derive(Clone, Copy, Debug)]
struct Figures {
    writes_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    acknowledged: usize,
}

fn figures(mut latencies: Vec<Duration>, elapsed: Duration) -> Figures {
    latencies.sort();
    let pick = |q: f64| {
        let i = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    Figures {
        writes_per_s: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        acknowledged: latencies.len(),
    }
}

/// Runs `clients` loops of `write` for `duration` and measures every call.
async fn drive<F, Fut>(clients: usize, duration: Duration, write: F) -> Result<Figures>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let write = Arc::new(write);
    let started = Instant::now();
    let stop = started + duration;
    let mut tasks = Vec::new();
    for client in 0..clients {
        let write = write.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut seq = 0u64;
            while Instant::now() < stop {
                let t = Instant::now();
                write(client, seq).await?;
                latencies.push(t.elapsed());
                seq += 1;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(figures(all, started.elapsed()))
}

/// Prints a phase's figures; fails unless every acknowledged write was
/// found afterwards (`present`).
fn print(system: &str, clients: usize, f: &Figures, present: usize) -> Result<()> {
    println!(
        "{system} clients={clients} writes_per_s={:.0} p50_ms={:.2} p99_ms={:.2} acknowledged={} present={present}",
        f.writes_per_s, f.p50_ms, f.p99_ms, f.acknowledged
    );
    if present < f.acknowledged {
        bail!("{system}: {} writes were acknowledged but only {present} are there", f.acknowledged);
    }
    Ok(())
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kb / 1024.0)
}

struct RoostCluster {
    nodes: Vec<NodeProcess>,
    tokens: InitTokens,
    leader: String,
}

async fn start_roost(root: &std::path::Path, size: usize) -> Result<RoostCluster> {
    let n1 = NodeProcess::init(root, "n1")?;
    wait_until("n1's tokens", Duration::from_secs(30), || async { Ok(n1.data_dir.join("admin.token").exists()) })
        .await?;
    let admin = n1.read_token("admin.token")?;
    let join = n1.read_token("join.token")?;
    wait_for_nodes(&n1.address, &admin, Duration::from_secs(30), "n1", |n| n.len() == 1).await?;
    let mut nodes = vec![n1];
    for i in 2..=size {
        nodes.push(NodeProcess::join(root, &format!("n{i}"), &nodes[0].address, &join)?);
    }
    let first = nodes[0].address.clone();
    let mut leader = String::new();
    wait_for_nodes(&first, &admin, Duration::from_secs(30), "all voters up", |n| {
        let voters = n.iter().filter(|x| x["role"] == "voter" || x["role"] == "leader").count();
        let up = n.iter().filter(|x| x["state"] == "up").count();
        let wanted = roost_node::daemon::membership::voter_target(size);
        voters == wanted && up == size
    })
    .await?;
    let out = roost_tests::process::roost(&["node", "list", "--json"], Some(&first), Some(&admin)).await?;
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out.stdout)?;
    for node in &listed {
        if node["role"] == "leader" {
            leader = node["address"].as_str().unwrap_or_default().to_owned();
        }
    }
    if leader.is_empty() {
        bail!("no leader in {listed:?}");
    }
    let tokens = InitTokens { join: roost_network::Token::parse(&join)?, admin: roost_network::Token::parse(&admin)? };
    Ok(RoostCluster { nodes, tokens, leader })
}

/// A client of the node at `address` that sends the admin token as
/// `Bearer` on every call, over the same TLS as the CLI's.
async fn bearer_client(address: &str, tokens: &InitTokens) -> Result<roost_node::cli::Control> {
    let tls = roost_network::tls::ClientTls::api(tokens.admin.ca_digest)?;
    let (channel, _session) = tls.connect_bound(address).await?;
    let header = format!("Bearer {}", tokens.admin).parse()?;
    Ok(roost_proto::api::control_client::ControlClient::with_interceptor(
        channel,
        roost_node::cli::ApiAuth::Header(header),
    ))
}

struct Etcd {
    children: Vec<Child>,
    client_urls: Vec<String>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A CA and a certificate for `127.0.0.1` it signed, for etcd's client port
/// (`--auto-tls` would make an ECDSA P-521 one, which rustls with ring
/// cannot check): the CA's PEM, the certificate's and its key's.
fn client_port_certificate() -> Result<(String, String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&key, &issuer)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}

/// A connection to etcd at `url`, verifying its certificate when it has TLS.
async fn etcd_connect(url: &str, ca_pem: Option<&str>) -> Result<etcd_client::Client> {
    let options = ca_pem.map(|pem| {
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(pem))
            .domain_name("127.0.0.1");
        etcd_client::ConnectOptions::new().with_tls(tls)
    });
    Ok(etcd_client::Client::connect([url.to_owned()], options).await?)
}

fn start_etcd(root: &std::path::Path, size: usize, tls: Option<&(String, String, String)>) -> Result<Etcd> {
    let ports: Vec<(u16, u16)> = (0..size).map(|_| Ok((free_port()?, free_port()?))).collect::<Result<_>>()?;
    let peer_tls = tls.is_some();
    let scheme = if peer_tls { "https" } else { "http" };
    let initial: Vec<String> =
        ports.iter().enumerate().map(|(i, (_, peer))| format!("e{i}={scheme}://127.0.0.1:{peer}")).collect();
    let mut etcd = Etcd { children: Vec::new(), client_urls: Vec::new() };
    let tag = if peer_tls { "tls" } else { "plain" };
    let (cert_file, key_file) = (root.join("etcd-client.crt"), root.join("etcd-client.key"));
    if let Some((_, cert, key)) = tls {
        std::fs::write(&cert_file, cert)?;
        std::fs::write(&key_file, key)?;
    }
    for (i, (client, peer)) in ports.iter().enumerate() {
        let dir = root.join(format!("etcd-{tag}{i}"));
        let log = std::fs::File::create(root.join(format!("etcd-{tag}{i}.log")))?;
        let mut command = Command::new("etcd");
        if peer_tls {
            command.arg("--peer-auto-tls");
            command.arg("--cert-file").arg(&cert_file);
            command.arg("--key-file").arg(&key_file);
        }
        let child = command
            .args([
                "--name",
                &format!("e{i}"),
                "--data-dir",
                &dir.display().to_string(),
                "--listen-client-urls",
                &format!("{scheme}://127.0.0.1:{client}"),
                "--advertise-client-urls",
                &format!("{scheme}://127.0.0.1:{client}"),
                "--listen-peer-urls",
                &format!("{scheme}://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("{scheme}://127.0.0.1:{peer}"),
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "roost-bench",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd (apt-get install etcd-server)")?;
        etcd.children.push(child);
        etcd.client_urls.push(format!("{scheme}://127.0.0.1:{client}"));
    }
    Ok(etcd)
}

async fn etcd_leader(etcd: &Etcd, ca_pem: Option<&str>) -> Result<String> {
    let found = std::sync::Mutex::new(None);
    wait_until("an etcd leader", Duration::from_secs(30), || async {
        for url in &etcd.client_urls {
            let mut one = etcd_connect(url, ca_pem).await?;
            let status = one.status().await?;
            if status.leader() != 0 && status.header().is_some_and(|h| h.member_id() == status.leader()) {
                one.put("warmup", "x", None).await?;
                *found.lock().unwrap_or_else(|p| p.into_inner()) = Some(url.clone());
                return Ok(true);
            }
        }
        Ok(false)
    })
    .await?;
    let leader = found.lock().unwrap_or_else(|p| p.into_inner()).clone();
    leader.context("no etcd leader")
}

const USAGE: roost_tests::bench::Usage = roost_tests::bench::Usage {
    name: "raft-bench",
    values: &[("--seconds", "S"), ("--nodes", "N")],
    switches: &["--bearer"],
    parts: &[],
};

#[tokio::main]
async fn main() -> Result<()> {
    let flags = roost_tests::bench::Flags::from_command_line(&USAGE)?;
    let duration = Duration::from_secs(flags.number("--seconds", 10)?);
    // `--nodes 1` measures a single node, which shows what replication costs.
    let size = usize::try_from(flags.number("--nodes", 3)?)?;
    let bearer = flags.has("--bearer");
    let roost_label = if bearer { "roost-bearer" } else { "roost" };

    // Make sure the node binary matches this source tree (unless one is
    // named). `cargo run` gives
    // this process the bench's own package variables (`CARGO_MANIFEST_DIR`,
    // `CARGO_PKG_*`), and build scripts that watch them (ring's) would see
    // them change between this build and the next `cargo run`, and rebuild
    // ring and all that uses it every time: the inner build goes without them.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--release", "-p", "roost-node", "--bin", "roost"]);
    for (name, _) in std::env::vars_os() {
        let package_variable = name.to_str().is_some_and(|name| {
            name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_MANIFEST_")
                || ["CARGO_CRATE_NAME", "CARGO_BIN_NAME", "CARGO_PRIMARY_PACKAGE"].contains(&name)
        });
        if package_variable {
            build.env_remove(name);
        }
    }
    // A binary named by `ROOST_BIN` is taken as it is (to compare builds).
    if std::env::var_os("ROOST_BIN").is_none() && !build.status()?.success() {
        bail!("building the roost binary failed");
    }
    eprintln!("using {}", roost_bin()?.display());

    let root = tempfile::Builder::new().prefix("raft-bench-").tempdir()?;
    let roost = start_roost(root.path(), size).await?;
    // Idle footprint first, before any load.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for node in &roost.nodes {
        if let Some(pid) = node.pid() {
            println!("roost idle_rss_mib node={} rss={:.1}", node.name, rss_mib(pid)?);
        }
    }

    let mut results = Vec::new();
    for clients in CLIENT_COUNTS {
        let mut connections = Vec::new();
        for _ in 0..clients {
            connections.push(if bearer {
                bearer_client(&roost.leader, &roost.tokens).await?
            } else {
                admin_client(&roost.leader, &roost.tokens).await?
            });
        }
        let connections = Arc::new(connections);
        let figures = drive(clients, duration, move |client, seq| {
            let mut connection = connections[client].clone();
            async move {
                let name = format!("b{clients}-{client}-{seq}");
                connection.create_app(roost_node::cli::about_app(&name.clone(), CreateAppRequest { name })).await?;
                Ok(())
            }
        })
        .await?;
        // Every acknowledged write must be in the state, read back through the leader.
        let prefix = format!("b{clients}-");
        let mut reader = admin_client(&roost.leader, &roost.tokens).await?.max_decoding_message_size(256 << 20);
        let apps = reader.list_apps(roost_proto::api::ListAppsRequest::default()).await?.into_inner().apps;
        let present = apps.iter().filter(|a| a.name.starts_with(&prefix)).count();
        print(roost_label, clients, &figures, present)?;
        results.push(figures);
    }
    drop(roost);

    let certificate = client_port_certificate()?;
    for tls in [Some(&certificate), None] {
        let system = if tls.is_some() { "etcd-tls" } else { "etcd" };
        let ca_pem = tls.map(|(ca, _, _)| ca.as_str());
        let etcd = start_etcd(root.path(), size, tls)?;
        let leader = etcd_leader(&etcd, ca_pem).await?;
        let value = "v".repeat(128);
        for (i, clients) in CLIENT_COUNTS.into_iter().enumerate() {
            let mut connections = Vec::new();
            for _ in 0..clients {
                connections.push(etcd_connect(&leader, ca_pem).await?.kv_client());
            }
            let connections = Arc::new(connections);
            let value = value.clone();
            let figures = drive(clients, duration, move |client, seq| {
                let mut connection = connections[client].clone();
                let value = value.clone();
                async move {
                    connection.put(format!("b{clients}-{client}-{seq}"), value, None).await?;
                    Ok(())
                }
            })
            .await?;
            let mut reader = etcd_connect(&leader, ca_pem).await?;
            let options = etcd_client::GetOptions::new().with_prefix().with_count_only();
            let present = reader.get(format!("b{clients}-"), Some(options)).await?.count();
            print(system, clients, &figures, usize::try_from(present).unwrap_or(0))?;
            let ours = results[i];
            println!(
                "ratio clients={clients} of={roost_label} vs={system} throughput={:.2} p50={:.2}",
                ours.writes_per_s / figures.writes_per_s,
                ours.p50_ms / figures.p50_ms
            );
        }
        drop(etcd);
    }
    Ok(())
}
