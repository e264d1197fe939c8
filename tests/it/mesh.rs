//! The private mesh on a real multi-node topology: each node in its own
//! container with its own Docker engine and network namespace, joined over a
//! Docker network, running the built `roost` binary with WireGuard
//! (boringtun, in the node process).
//!
//! Instances are driven through the example app: `/call/IP:PORT/PATH` makes
//! an instance itself send a request, `/peer` shows where a request came
//! from, `/fail` and `/recover` flip its health check. Names are resolved
//! with `dig` inside an instance's network namespace, against the resolver
//! the instance itself uses.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use roost_tests::apps::{cli, hello_app, hello_toml};
use roost_tests::topology::Topology;
use roost_tests::wait_until;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A node's view of the cluster through the CLI.
struct Admin {
    endpoint: String,
    token: String,
}

impl Admin {
    async fn json(&self, args: &[&str]) -> Result<Value> {
        let mut args = args.to_vec();
        args.push("--json");
        let printed = cli(&self.endpoint, &self.token, &args).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        serde_json::from_str(&printed).with_context(|| format!("not JSON: {printed}"))
    }

    async fn run(&self, args: &[&str]) -> Result<String> {
        cli(&self.endpoint, &self.token, args).await.map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// An instance: its id, its node's index and its mesh address.
#[derive(Clone, Debug)]
struct Running {
    id: String,
    machine: usize,
    ip: String,
}

/// Waits until `app` has `count` instances running and passing, one per node.
async fn running(admin: &Admin, app: &str, count: usize) -> Result<Vec<Running>> {
    let found = std::sync::Mutex::new(Vec::new());
    wait_until(&format!("{count} instances of {app} running and passing"), Duration::from_secs(90), || async {
        let status = admin.json(&["status", "-a", app]).await?;
        let list: Vec<Running> = status["instances"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter(|i| i["state"] == "running" && i["health"] == "passing" && i["ip"] != "")
                    .filter_map(|i| {
                        let node = i["node"].as_str()?;
                        Some(Running {
                            id: i["id"].as_str()?.to_owned(),
                            machine: node.strip_prefix('n')?.parse::<usize>().ok()? - 1,
                            ip: i["ip"].as_str()?.to_owned(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let ok = list.len() == count;
        *found.lock().unwrap_or_else(|p| p.into_inner()) = list;
        Ok(ok)
    })
    .await?;
    let mut list = found.into_inner().unwrap_or_else(|p| p.into_inner());
    list.sort_by_key(|r| r.machine);
    Ok(list)
}

/// `GET http://IP:8080/PATH` from the instance's own node.
fn get(topology: &Topology, to: &Running, path: &str) -> Result<String> {
    topology.exec(to.machine, &format!("curl -sS --max-time 10 http://{}:8080/{path}", to.ip))
}

/// Makes instance `from` itself call `target` (IP:PORT/PATH).
fn call(topology: &Topology, from: &Running, target: &str) -> Result<String> {
    get(topology, from, &format!("call/{target}"))
}

/// `dig +short NAME TYPE` with the resolver of instance `from`.
fn dig(topology: &Topology, from: &Running, name: &str, kind: &str) -> Result<Vec<String>> {
    let resolver = topology.in_instance(from.machine, &from.id, "cat /etc/resolv.conf").unwrap_or_default();
    let out = topology.in_instance(from.machine, &from.id, &format!("dig +short +time=2 +tries=2 {name} {kind}"))?;
    if out.contains("connection timed out") {
        bail!("no answer for {name}; the instance's resolv.conf: {resolver}");
    }
    let mut lines: Vec<String> = out.lines().map(|l| l.trim().trim_matches('"').to_owned()).collect();
    lines.sort();
    Ok(lines)
}

async fn start_cluster(topology: &Topology, count: usize) -> Result<Admin> {
    topology.init(0, "")?;
    let token = topology.file(0, "/data/node/admin.token").await?;
    let join = topology.file(0, "/data/node/join.token").await?;
    for index in 1..count {
        topology.join(index, &join, "")?;
    }
    let admin = Admin { endpoint: topology.endpoint(0), token };
    wait_until(&format!("{count} nodes up"), Duration::from_secs(90), || async {
        let nodes = admin.json(&["node", "list"]).await?;
        Ok(nodes.as_array().is_some_and(|l| {
            l.len() == count && l.iter().all(|n| n["state"] == "up" && n["subnet"] != "" && n["wireguard"].is_object())
        }))
    })
    .await
    .with_context(|| topology.logs())?;
    for index in 0..count {
        let name = roost_tests::topology::node_name(index);
        wait_until(&format!("{name}'s mesh up with every peer"), Duration::from_secs(60), || async {
            let shown = admin.json(&["node", "show", &name]).await?;
            Ok(shown["peers_error"].is_null() && shown["peers"].as_array().is_some_and(|p| p.len() == count - 1))
        })
        .await
        .with_context(|| topology.logs())?;
    }
    Ok(admin)
}

/// The handshake age (ms) `node`'s WireGuard reports for each peer node.
async fn handshakes(admin: &Admin, node: &str) -> Result<Vec<(String, Option<u64>)>> {
    let shown = admin.json(&["node", "show", node]).await?;
    if let Some(error) = shown["peers_error"].as_str() {
        bail!("{node}: {error}");
    }
    Ok(shown["peers"]
        .as_array()
        .map(|l| {
            l.iter().map(|p| (p["node"].as_str().unwrap_or("").to_owned(), p["handshake_ms_ago"].as_u64())).collect()
        })
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_on_different_nodes_reach_each_other_by_mesh_address_and_name() -> Result<()> {
    let mut topology = Topology::start(&format!("roost-it-{}-mesh", std::process::id()), 3).await?;
    let admin = start_cluster(&topology, 3).await?;
    let result = scenario(&mut topology, &admin).await;
    if let Err(error) = result {
        bail!("{error:#}\n{}", topology.logs());
    }
    Ok(())
}

async fn scenario(topology: &mut Topology, admin: &Admin) -> Result<()> {
    let nodes = admin.json(&["node", "list"]).await?;
    let mut subnets: Vec<&str> =
        nodes.as_array().context("a list")?.iter().filter_map(|n| n["subnet"].as_str()).collect();
    subnets.sort();
    subnets.dedup();
    assert_eq!(subnets.len(), 3, "each node holds its own /24: {nodes}");

    let app = hello_app(&hello_toml("mesh", "[placement]\nmax_per_node = 1\n"))?;
    admin.run(&["deploy", &app.path().to_string_lossy()]).await?;
    admin.run(&["scale", "count", "3", "-a", "mesh"]).await?;
    let instances = running(admin, "mesh", 3).await?;
    let (a, b, c) = (&instances[0], &instances[1], &instances[2]);
    assert_eq!((a.machine, b.machine, c.machine), (0, 1, 2), "one instance per node: {instances:?}");

    // By mesh address, across nodes, over WireGuard; the receiver sees the
    // sender's own mesh address.
    for (from, to) in [(a, b), (a, c), (b, a), (c, b)] {
        let answer = call(topology, from, &format!("{}:8080/peer", to.ip))?;
        assert!(answer.starts_with("HTTP/1.1 200"), "{from:?} -> {to:?}: {answer}");
        assert_eq!(answer.lines().nth(1), Some(from.ip.as_str()), "{to:?} saw {answer} for {from:?}");
    }
    wait_until("n1 to have a handshake with both peers", Duration::from_secs(30), || async {
        let seen = handshakes(admin, "n1").await?;
        Ok(seen.len() == 2 && seen.iter().all(|(node, ago)| !node.is_empty() && ago.is_some()))
    })
    .await?;

    // By name, through the resolver the instance uses.
    let all = {
        let mut ips: Vec<String> = instances.iter().map(|i| i.ip.clone()).collect();
        ips.sort();
        ips
    };
    assert_eq!(dig(topology, a, "mesh.internal", "A")?, all);
    assert_eq!(dig(topology, a, "app.mesh.internal", "A")?, all, "the process group");
    assert_eq!(dig(topology, a, &format!("{}.vm.mesh.internal", b.id), "A")?, std::slice::from_ref(&b.ip));
    assert_eq!(dig(topology, c, "_apps.internal", "TXT")?, ["mesh"]);
    assert_eq!(dig(topology, a, "nothing.internal", "A")?, Vec::<String>::new());

    // A failing check takes the instance out of every answer; recovering
    // brings it back.
    get(topology, b, "fail")?;
    let without_b: Vec<String> = all.iter().filter(|ip| **ip != b.ip).cloned().collect();
    wait_until("mesh.internal without the failing instance", Duration::from_secs(20), || async {
        Ok(dig(topology, a, "mesh.internal", "A")? == without_b)
    })
    .await?;
    assert_eq!(dig(topology, a, &format!("{}.vm.mesh.internal", b.id), "A")?, Vec::<String>::new());
    get(topology, b, "recover")?;
    wait_until("mesh.internal with the recovered instance", Duration::from_secs(20), || async {
        Ok(dig(topology, a, "mesh.internal", "A")? == all)
    })
    .await?;

    // The world outside the mesh: a server on this machine's side of the
    // topology's network.
    let outside = tokio::net::TcpListener::bind((topology.gateway.as_str(), 0)).await?;
    let port = outside.local_addr()?.port();
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = outside.accept().await {
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            let _ =
                stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\noutside\n").await;
            let _ = stream.shutdown().await;
        }
    });
    let answer = call(topology, a, &format!("{}:{port}/", topology.gateway));
    server.abort();
    let answer = answer?;
    assert!(answer.contains("outside"), "{answer}");

    // A restarted node brings its side of the mesh back.
    topology.stop_roost(1).await?;
    let join = topology.file(0, "/data/node/join.token").await?;
    topology.join(1, &join, "")?;
    wait_until("a restarted node's instances reachable again", Duration::from_secs(60), || async {
        Ok(call(topology, a, &format!("{}:8080/peer", b.ip)).is_ok_and(|answer| answer.contains(&a.ip))
            && call(topology, b, &format!("{}:8080/peer", a.ip)).is_ok_and(|answer| answer.contains(&b.ip)))
    })
    .await?;

    // A node that moves to a new address: peers follow it.
    topology.stop_roost(2).await?;
    let moved = topology.move_machine(2)?;
    topology.join(2, &join, "")?;
    wait_until("the moved node up at its new address", Duration::from_secs(60), || async {
        let nodes = admin.json(&["node", "list"]).await?;
        Ok(nodes.as_array().is_some_and(|l| {
            l.iter()
                .any(|n| n["name"] == "n3" && n["state"] == "up" && n["address"] == format!("{moved}:7000").as_str())
        }))
    })
    .await?;
    wait_until("the moved node's instance reachable", Duration::from_secs(60), || async {
        Ok(call(topology, a, &format!("{}:8080/peer", c.ip)).is_ok_and(|answer| answer.contains(&a.ip))
            && call(topology, c, &format!("{}:8080/peer", b.ip)).is_ok_and(|answer| answer.contains(&c.ip)))
    })
    .await?;
    let shown = admin.json(&["node", "show", "n1"]).await?;
    let endpoint = shown["peers"]
        .as_array()
        .and_then(|l| l.iter().find(|p| p["node"] == "n3"))
        .and_then(|p| p["endpoint"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(endpoint.starts_with(&format!("{moved}:")), "n1 reaches n3 at {endpoint}, not {moved}");
    Ok(())
}

/// `wg show IFACE latest-handshakes` in machine `index`: the Unix time of
/// the latest handshake with each peer (0: none).
fn wg_handshake(topology: &Topology, index: usize, interface: &str) -> Result<u64> {
    let out = topology.exec(index, &format!("wg show {interface} latest-handshakes"))?;
    Ok(out.split_whitespace().nth(1).and_then(|t| t.parse().ok()).unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wireguard_go_completes_a_handshake_and_a_removed_node_is_dropped_everywhere() -> Result<()> {
    let topology = Topology::start(&format!("roost-it-{}-wg", std::process::id()), 2).await?;
    let admin = start_cluster(&topology, 2).await?;
    let result = async {
        let nodes = admin.json(&["node", "list"]).await?;
        let node = |name: &str| nodes.as_array().and_then(|l| l.iter().find(|n| n["name"] == name)).cloned();
        let (n1, n2) = (node("n1").context("n1")?, node("n2").context("n2")?);
        let n1_key = n1["wireguard"]["public_key"].as_str().context("n1's key")?.to_owned();
        let n1_subnet = n1["subnet"].as_str().context("n1's subnet")?.to_owned();
        let n2_subnet: ipnet::Ipv4Net = n2["subnet"].as_str().context("n2's subnet")?.parse()?;
        let n1_address = roost_network::mesh::gateway(n1_subnet.parse()?);
        let n2_address = roost_network::mesh::gateway(n2_subnet);

        // n2's roost stops; wireguard-go takes its place with its key, port
        // and routes. n1's boringtun must complete a handshake with it.
        topology.stop_roost(1).await?;
        let wg = "wgo0";
        let n1_endpoint = format!("{}:51820", topology.machine(0).ip);
        topology.exec(
            1,
            &format!(
                "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go {wg} && wg set {wg} private-key /data/node/wireguard.key listen-port 51820 \
                 peer {n1_key} endpoint {n1_endpoint} allowed-ips {n1_subnet} persistent-keepalive 1 && \
                 ip link set {wg} mtu 1420 up && ip route replace {n1_subnet} dev {wg} src {n2_address}"
            ),
        )?;
        wait_until("a handshake between wireguard-go and boringtun", Duration::from_secs(30), || async {
            // Traffic into the tunnel: n1's DNS, at n1's mesh address.
            let _ = topology.exec(1, &format!("dig +short +time=1 +tries=1 @{n1_address} _apps.internal TXT"));
            Ok(wg_handshake(&topology, 1, wg)? > 0)
        })
        .await?;
        let answer = topology.exec(1, &format!("dig +short +time=2 @{n1_address} n1-check.internal A; echo done"))?;
        assert!(answer.contains("done"), "{answer}");
        wait_until("n1 to report the handshake", Duration::from_secs(10), || async {
            Ok(handshakes(&admin, "n1").await?.iter().any(|(node, ago)| node == "n2" && ago.is_some()))
        })
        .await?;

        // n2 is removed: n1 drops its peer at once, and its key no longer
        // completes a handshake.
        admin.run(&["node", "remove", "n2"]).await?;
        wait_until("n2's peer gone from n1", Duration::from_secs(10), || async { Ok(handshakes(&admin, "n1").await?.is_empty()) })
            .await?;
        topology.exec(
            1,
            &format!("wg set {wg} peer {n1_key} remove && wg set {wg} peer {n1_key} endpoint {n1_endpoint} allowed-ips {n1_subnet} persistent-keepalive 1"),
        )?;
        assert_eq!(wg_handshake(&topology, 1, wg)?, 0, "a fresh peer entry has no session");
        for _ in 0..3 {
            let _ = topology.exec(1, &format!("dig +short +time=2 +tries=1 @{n1_address} _apps.internal TXT"));
        }
        assert_eq!(wg_handshake(&topology, 1, wg)?, 0, "the removed node's key completed a handshake");
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if let Err(error) = result {
        bail!("{error:#}\n{}", topology.logs());
    }
    Ok(())
}

/// A Docker network left on the machine (by an earlier cluster, say) on the
/// mesh range keeps the node from making its instance network. The user
/// reads why, and how to fix it, in the instance's status, not only in the
/// node's log; once the network is removed, the instance starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_network_that_overlaps_another_is_named_in_status_until_it_is_removed() -> Result<()> {
    let topology = Topology::start(&format!("roost-it-{}-overlap", std::process::id()), 1).await?;
    // The default mesh range is 10.210.0.0/16: the node's /24 is in it.
    topology.exec(0, "docker network create --subnet 10.210.0.0/16 leftover")?;
    let result = async {
        topology.init(0, "")?;
        let token = topology.file(0, "/data/node/admin.token").await?;
        let admin = Admin { endpoint: topology.endpoint(0), token };
        let app = hello_app(&hello_toml("blocked", ""))?;
        admin.run(&["deploy", "--detach", &app.path().to_string_lossy()]).await?;
        let reason = std::sync::Mutex::new(String::new());
        wait_until("the instance's reason to name the overlapping network", Duration::from_secs(60), || async {
            let status = admin.json(&["status", "-a", "blocked"]).await?;
            let said = status["instances"][0]["reason"].as_str().unwrap_or_default().to_owned();
            let named = said.contains("overlaps Docker's network leftover (10.210.0.0/16)")
                && said.contains("docker network rm leftover");
            *reason.lock().unwrap_or_else(|p| p.into_inner()) = said;
            Ok(named)
        })
        .await
        .with_context(|| format!("the reason was: {}", reason.lock().unwrap_or_else(|p| p.into_inner())))?;

        topology.exec(0, "docker network rm leftover")?;
        running(&admin, "blocked", 1).await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(error) = result {
        bail!("{error:#}\n{}", topology.logs());
    }
    Ok(())
}
