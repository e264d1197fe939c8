//! `mesh-bench`: Roost's WireGuard mesh against wireguard-go, side by side.
//!
//! Two machines of the test topology (each node in its own container, its own
//! network namespace and Docker engine, joined by a Docker network) run a
//! Roost cluster with WireGuard on (boringtun, in the node process), and the
//! example app on one instance per node. In the same two network namespaces,
//! Debian's `wireguard-go` runs a second tunnel (its own keys, addresses and
//! port) for comparison. Then, in each run:
//!
//! - **throughput**: `iperf3`, one TCP stream for `--seconds`, from node A's
//!   namespace to node B's, over Roost's mesh (to B's mesh address) and over
//!   wireguard-go; the ratio is roost/wireguard-go (goal: at least 1.0).
//!   Also instance to instance over the mesh (iperf3 inside the two
//!   instances' own network namespaces), for what an app sees.
//! - **latency**: `ping` (200 echoes, 10 ms apart) between the same two
//!   namespaces: with no tunnel (their Docker network), over Roost's mesh,
//!   and over wireguard-go; the added round trip is each tunnel's average
//!   less the bare one.
//!
//! It needs `iperf3`, `iputils-ping`, `wireguard-go` and `wireguard-tools`
//! (`apt-get install iperf3 iputils-ping wireguard-go wireguard-tools`) and
//! Docker. Run with `cargo run --release -p roost-tests --bin mesh-bench
//! [-- --runs N --seconds S]`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use roost_tests::apps::{cli, hello_app, hello_toml};
use roost_tests::topology::Topology;
use roost_tests::wait_until;
use serde_json::Value;

const WG_GO: &str = "wgbench0";
const WG_GO_PORT: u16 = 51900;

const USAGE: roost_tests::bench::Usage = roost_tests::bench::Usage {
    name: "mesh-bench",
    values: &[("--runs", "N"), ("--seconds", "S")],
    switches: &[],
    parts: &[],
};

#[tokio::main]
async fn main() -> Result<()> {
    let flags = roost_tests::bench::Flags::from_command_line(&USAGE)?;
    let runs = flags.number("--runs", 3)?;
    let seconds = flags.number("--seconds", 10)?;
    for tool in ["iperf3", "ping", "wireguard-go", "wg"] {
        if which(tool).is_none() {
            bail!("mesh-bench needs {tool}: apt-get install iperf3 iputils-ping wireguard-go wireguard-tools");
        }
    }
    let topology = Topology::start(&format!("roost-bench-{}-mesh", std::process::id()), 2).await?;
    let result = bench(&topology, runs, seconds).await;
    if let Err(error) = &result {
        eprintln!("{error:#}\n{}", topology.logs());
    }
    result
}

fn which(tool: &str) -> Option<String> {
    let out = std::process::Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

struct Setup {
    /// Node B's mesh address, and A's.
    mesh_b: String,
    /// The two instances: (machine, id, mesh address).
    instances: Vec<(usize, String, String)>,
}

async fn bench(topology: &Topology, runs: u64, seconds: u64) -> Result<()> {
    let setup = roost_cluster(topology).await?;
    wireguard_go(topology)?;
    println!("# mesh-bench: 2 nodes, each in its own container and network namespace, on one 2-core machine");
    println!("# iperf3: 1 TCP stream, {seconds} s; ping: 200 echoes, 10 ms apart; {runs} runs");
    let mut ratios = Vec::new();
    for run in 1..=runs {
        let roost = iperf(topology, None, &setup.mesh_b, seconds)?;
        let wg = iperf(topology, None, "10.99.0.2", seconds)?;
        let (a, b) = (&setup.instances[0], &setup.instances[1]);
        let instances = iperf(topology, Some((&a.1, &b.1)), &b.2, seconds)?;
        let bare_rtt = ping(topology, &topology.machine(1).ip)?;
        let roost_rtt = ping(topology, &setup.mesh_b)?;
        let wg_rtt = ping(topology, "10.99.0.2")?;
        let ratio = roost / wg;
        ratios.push(ratio);
        println!(
            "run={run} roost_mbit_s={roost:.0} wireguard_go_mbit_s={wg:.0} ratio={ratio:.2} instance_to_instance_mbit_s={instances:.0} \
             rtt_bare_ms={bare_rtt:.3} rtt_roost_ms={roost_rtt:.3} rtt_wireguard_go_ms={wg_rtt:.3} \
             added_rtt_roost_ms={:.3} added_rtt_wireguard_go_ms={:.3}",
            roost_rtt - bare_rtt,
            wg_rtt - bare_rtt
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "throughput ratio roost/wireguard-go: median {:.2}, min {:.2}, max {:.2} (goal: at least 1.0)",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    );
    Ok(())
}

async fn roost_cluster(topology: &Topology) -> Result<Setup> {
    topology.init(0, "")?;
    let token = topology.file(0, "/data/node/admin.token").await?;
    let join = topology.file(0, "/data/node/join.token").await?;
    topology.join(1, &join, "")?;
    let endpoint = topology.endpoint(0);
    let json = |args: Vec<&'static str>| {
        let (endpoint, token) = (endpoint.clone(), token.clone());
        async move {
            let mut args = args;
            args.push("--json");
            let printed = cli(&endpoint, &token, &args).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok::<Value, anyhow::Error>(serde_json::from_str(&printed)?)
        }
    };
    wait_until("both nodes' mesh up", Duration::from_secs(90), || async {
        let a = json(vec!["node", "show", "n1"]).await?;
        let b = json(vec!["node", "show", "n2"]).await?;
        Ok(a["peers"].as_array().is_some_and(|p| p.len() == 1) && b["peers"].as_array().is_some_and(|p| p.len() == 1))
    })
    .await?;
    let app = hello_app(&hello_toml("bench", "[placement]\nmax_per_node = 1\n"))?;
    let path = app.path().to_string_lossy().into_owned();
    cli(&endpoint, &token, &["deploy", &path]).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    cli(&endpoint, &token, &["scale", "count", "2", "-a", "bench"]).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let instances = std::sync::Mutex::new(Vec::new());
    wait_until("two instances passing", Duration::from_secs(60), || async {
        let status = json(vec!["status", "-a", "bench"]).await?;
        let mut list: Vec<(usize, String, String)> = status["instances"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter(|i| i["health"] == "passing")
                    .filter_map(|i| {
                        let machine = i["node"].as_str()?.strip_prefix('n')?.parse::<usize>().ok()? - 1;
                        Some((machine, i["id"].as_str()?.to_owned(), i["ip"].as_str()?.to_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        list.sort();
        let done = list.len() == 2 && list[0].0 == 0 && list[1].0 == 1;
        *instances.lock().unwrap_or_else(|p| p.into_inner()) = list;
        Ok(done)
    })
    .await?;
    let nodes = json(vec!["node", "list"]).await?;
    let subnet = nodes
        .as_array()
        .and_then(|l| l.iter().find(|n| n["name"] == "n2"))
        .and_then(|n| n["subnet"].as_str())
        .context("n2's subnet")?;
    let mesh_b = roost_network::mesh::gateway(subnet.parse()?).to_string();
    Ok(Setup { mesh_b, instances: instances.into_inner().unwrap_or_else(|p| p.into_inner()) })
}

/// wireguard-go between the same two namespaces: 10.99.0.1 and 10.99.0.2.
fn wireguard_go(topology: &Topology) -> Result<()> {
    let keys: Vec<(String, String)> = (0..2)
        .map(|i| {
            let private = topology.exec(i, "wg genkey")?;
            let public = topology.exec(i, &format!("echo {private} | wg pubkey"))?;
            Ok((private, public))
        })
        .collect::<Result<_>>()?;
    for i in 0..2 {
        let other = 1 - i;
        topology.exec(
            i,
            &format!(
                "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go {WG_GO} >/dev/null 2>&1 && \
                 echo {key} > /tmp/wg.key && wg set {WG_GO} private-key /tmp/wg.key listen-port {WG_GO_PORT} \
                 peer {peer} endpoint {endpoint}:{WG_GO_PORT} allowed-ips 10.99.0.{other_host}/32 && \
                 ip address add 10.99.0.{host}/24 dev {WG_GO} && ip link set {WG_GO} mtu 1420 up",
                key = keys[i].0,
                peer = keys[other].1,
                endpoint = topology.machine(other).ip,
                host = i + 1,
                other_host = other + 1,
            ),
        )?;
    }
    Ok(())
}

/// iperf3 from machine 0 to `target` on machine 1, in the machines' own
/// namespaces or, with `instances`, in the two instances'; Mbit/s received.
fn iperf(topology: &Topology, instances: Option<(&str, &str)>, target: &str, seconds: u64) -> Result<f64> {
    let (client_ns, server_ns) = match instances {
        Some((a, b)) => (
            format!("nsenter -t {} -n ", topology.instance_pid(0, a)?),
            format!("nsenter -t {} -n ", topology.instance_pid(1, b)?),
        ),
        None => (String::new(), String::new()),
    };
    topology.exec(1, &format!("{server_ns}iperf3 -s -1 -D -p 5299 --logfile /tmp/iperf-server.log"))?;
    let mut out = String::new();
    for _ in 0..20 {
        match topology.exec(0, &format!("{client_ns}iperf3 -c {target} -p 5299 -t {seconds} -J")) {
            Ok(text) => {
                out = text;
                break;
            }
            // The server daemonizes; give it a moment to listen.
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let report: Value = serde_json::from_str(&out).with_context(|| format!("iperf3 printed: {out}"))?;
    let bits = report["end"]["sum_received"]["bits_per_second"].as_f64().context("no iperf3 result")?;
    Ok(bits / 1e6)
}

/// The average round trip (ms) of 200 pings from machine 0 to `target`.
fn ping(topology: &Topology, target: &str) -> Result<f64> {
    let out = topology.exec(0, &format!("ping -q -c 200 -i 0.01 {target}"))?;
    // rtt min/avg/max/mdev = 0.041/0.060/0.181/0.013 ms
    let line = out.lines().find(|l| l.contains("min/avg/max")).context("no ping summary")?;
    let numbers = line.split('=').nth(1).context("no ping numbers")?;
    numbers.trim().split('/').nth(1).context("no average")?.parse().context("not a number")
}
