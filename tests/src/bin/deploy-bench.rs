//! `deploy-bench`: how fast Roost runs and heals apps, against Docker Swarm.
//!
//! In one run on this machine it measures, and prints as `key=value` lines:
//!
//! 1. **deploy**: a 3-node Roost cluster (in this process, all nodes on this
//!    machine's Docker engine) with the app `hello` scaled to 3; the time from
//!    `roost deploy --image` of a prebuilt image (the CLI code path) to all 3
//!    new instances running and passing their checks, with all three started
//!    at once (`--strategy bluegreen`, as Swarm starts replicas), and with the
//!    default rolling strategy (one at a time) for reference. Side by side:
//!    Docker Swarm mode on the same engine, `docker service create
//!    --replicas 3` of the same image until `docker service ls` shows 3/3.
//!    The ratio is roost/swarm (goal: at most 1.0).
//! 2. **failover**: a node with an instance stopped and its containers
//!    killed; the time until its instances pass their checks elsewhere, with
//!    the default 10 s grace period (goal: under 15 s).
//! 3. **scheduler**: 10,000 instances over 1,000 simulated nodes, placed by
//!    `roost_deploy::scheduler::schedule` and committed through a real Raft
//!    node on RocksDB, in commands of at most `--batch` placements; prints
//!    placements per second (goal: at least 10,000/s; Nomad's published
//!    record is about 3,750/s).
//!
//! Run with `cargo run --release -p roost-tests --bin deploy-bench [-- --runs N]`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command as Process;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use roost_deploy::scheduler::schedule;
use roost_raft::command::NewNode;
use roost_raft::consensus::now_millis;
use roost_raft::state::ClusterInfo;
use roost_raft::workload::{
    GroupSpec, Outcome, Placement, PlacementSpec, ReleaseSpec, Resources, RestartSpec, Strategy,
};
use roost_raft::{Command, Consensus, RaftNode, Response, Timings};
use roost_tests::apps::{hello_app, hello_toml, kill_containers, require_docker};
use roost_tests::{wait_until, Cluster};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<()> {
    // Nodes stopped on purpose make openraft log errors; they are expected here.
    let filter = tracing_subscriber::EnvFilter::try_from_env("ROOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,openraft=off"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    let flags = roost_tests::bench::Flags::from_command_line();
    let runs = flags.number("--runs", 3)? as usize;
    let batch = flags.number("--batch", 1000)? as usize;
    let want = |name: &str| flags.wants(name);

    if want("scheduler") {
        scheduler_bench(batch).await?;
    }
    if want("deploy") || want("failover") {
        require_docker()?;
        let image = build_image().await?;
        if want("deploy") {
            deploy_bench(&image, runs).await?;
        }
        if want("failover") {
            failover_bench(runs).await?;
        }
        let _ = Process::new("docker").args(["rmi", "-f", &image]).output();
    }
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The hello app as a local image, built with plain `docker build`.
async fn build_image() -> Result<String> {
    let dir = hello_app(&hello_toml("bench", ""))?;
    let tag = format!("roost-bench-hello:{}", std::process::id());
    let out = Process::new("docker").args(["build", "-q", "-t", &tag]).arg(dir.path()).output()?;
    if !out.status.success() {
        bail!("docker build failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(tag)
}

async fn status(cluster: &Cluster, app: &str) -> Result<Value> {
    let text = cluster.cli(0, &["status", "-a", app, "--json"]).await?;
    Ok(serde_json::from_str(&text)?)
}

async fn wait_passing(cluster: &Cluster, app: &str, release: u64, count: usize) -> Result<()> {
    wait_until("instances passing", Duration::from_secs(120), || async {
        let s = status(cluster, app).await?;
        let list = s["instances"].as_array().cloned().unwrap_or_default();
        Ok(s["release"] == release
            && list.len() == count
            && list.iter().all(|i| i["state"] == "running" && i["health"] == "passing"))
    })
    .await
}

async fn deploy_bench(image: &str, runs: usize) -> Result<()> {
    let mut roost = Vec::new();
    let mut rolling = Vec::new();
    let mut swarm = Vec::new();
    for run in 0..runs {
        let cluster = Cluster::start(3).await?;
        let dir = hello_app(&hello_toml("hello", ""))?;
        let path = dir.path().to_string_lossy().into_owned();
        cluster.cli(0, &["deploy", &path, "--image", image]).await?;
        cluster.cli(0, &["scale", "count", "3", "-a", "hello"]).await?;
        wait_passing(&cluster, "hello", 1, 3).await?;

        // All three new instances at once, as `docker service create` starts them.
        let started = Instant::now();
        cluster.cli(0, &["deploy", &path, "--image", image, "--detach", "--strategy", "bluegreen"]).await?;
        wait_passing(&cluster, "hello", 2, 3).await?;
        let took = started.elapsed().as_secs_f64();
        println!("roost deploy strategy=bluegreen run={run} seconds_to_3_passing={took:.2}");
        roost.push(took);
        // The default: one instance at a time, each checked before the next.
        let started = Instant::now();
        cluster.cli(0, &["deploy", &path, "--image", image, "--detach"]).await?;
        wait_passing(&cluster, "hello", 3, 3).await?;
        let took = started.elapsed().as_secs_f64();
        println!("roost deploy strategy=rolling run={run} seconds_to_3_passing={took:.2}");
        rolling.push(took);
        cluster.shutdown().await;

        swarm.push(swarm_run(image, run)?);
    }
    let (r, s) = (median(roost), median(swarm));
    println!("roost deploy_3_instances_rolling_median_s={:.2}", median(rolling));
    println!("roost deploy_3_instances_bluegreen_median_s={r:.2}");
    println!("swarm service_create_3_replicas_median_s={s:.2}");
    println!("ratio deploy roost/swarm={:.2} (goal <= 1.0)", r / s);
    Ok(())
}

/// One `docker service create --replicas 3` in a single-node swarm.
fn swarm_run(image: &str, run: usize) -> Result<f64> {
    let docker = |args: &[&str]| Process::new("docker").args(args).output();
    let swarm = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"])?;
    let joined = String::from_utf8_lossy(&swarm.stdout).trim() == "active";
    if !joined {
        let out = docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"])?;
        if !out.status.success() {
            bail!("docker swarm init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let name = format!("roost-bench-{}-{run}", std::process::id());
    let started = Instant::now();
    let out =
        docker(&["service", "create", "--detach", "--name", &name, "--replicas", "3", "--no-resolve-image", image])?;
    if !out.status.success() {
        bail!("docker service create failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let took = loop {
        let ls = docker(&["service", "ls", "--filter", &format!("name={name}"), "--format", "{{.Replicas}}"])?;
        if String::from_utf8_lossy(&ls.stdout).trim().starts_with("3/3") {
            break started.elapsed().as_secs_f64();
        }
        if Instant::now() > deadline {
            bail!("swarm did not run 3/3 within 120s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!("swarm service_create run={run} seconds_to_3_of_3={took:.2}");
    let _ = docker(&["service", "rm", &name]);
    if !joined {
        let _ = docker(&["swarm", "leave", "--force"]);
    }
    Ok(took)
}

async fn failover_bench(runs: usize) -> Result<()> {
    let mut times = Vec::new();
    for run in 0..runs {
        let mut cluster = Cluster::start(3).await?;
        let dir = hello_app(&hello_toml("ha", "[placement]\nmax_per_node = 1\n"))?;
        let path = dir.path().to_string_lossy().into_owned();
        cluster.cli(0, &["deploy", &path]).await?;
        cluster.cli(0, &["scale", "count", "2", "-a", "ha"]).await?;
        wait_passing(&cluster, "ha", 1, 2).await?;
        let s = status(&cluster, "ha").await?;
        let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
        let victim = (1..3)
            .find(|i| {
                *i != leader
                    && s["instances"].as_array().is_some_and(|l| l.iter().any(|x| x["node"] == cluster.slots[*i].name))
            })
            .context("no follower other than n1 runs an instance")?;
        let (name, id) = (cluster.slots[victim].name.clone(), cluster.node(victim)?.id);
        let started = Instant::now();
        cluster.stop(victim).await?;
        kill_containers(&cluster.docker, id)?;
        wait_until("instances passing elsewhere", Duration::from_secs(60), || async {
            let s = status(&cluster, "ha").await?;
            let list = s["instances"].as_array().cloned().unwrap_or_default();
            Ok(list.len() == 2
                && list
                    .iter()
                    .all(|i| i["node"] != name.as_str() && i["state"] == "running" && i["health"] == "passing"))
        })
        .await?;
        let took = started.elapsed().as_secs_f64();
        println!("roost failover run={run} seconds_to_passing_elsewhere={took:.2}");
        times.push(took);
        cluster.shutdown().await;
    }
    println!("roost failover_median_s={:.2} (goal < 15 with the default 10 s grace period)", median(times));
    Ok(())
}

struct NoPeers;

impl roost_raft::network::Channels for NoPeers {
    fn channel(&self, address: &str) -> Result<tonic::transport::Channel, String> {
        Err(format!("a single-node benchmark has no peer at {address}"))
    }
}

async fn scheduler_bench(batch: usize) -> Result<()> {
    const NODES: usize = 1_000;
    const INSTANCES: u32 = 10_000;
    let dir = tempfile::tempdir()?;
    let stop = CancellationToken::new();
    let consensus = Consensus::start(1, dir.path(), &Timings::default(), Arc::new(NoPeers), stop.clone()).await?;
    consensus.initialize(RaftNode { name: "n1".into(), address: "127.0.0.1:1".into() }).await?;
    let deadline = || tokio::time::Instant::now() + Duration::from_secs(30);
    let propose = |command: Command| {
        let consensus = consensus.clone();
        async move {
            match consensus.propose(command, deadline()).await? {
                Response::Rejected(rejection) => bail!("rejected: {rejection}"),
                response => Ok(response),
            }
        }
    };
    let node = |i: usize| NewNode {
        name: format!("sim{i}"),
        address: format!("10.0.{}.{}:7000", i / 250, i % 250),
        labels: BTreeMap::from([("rack".to_owned(), format!("r{}", i % 20))]),
        cert_serial: format!("s{i}"),
        cert_fingerprint: format!("f{i}"),
        resources: Resources { cpu_millis: 16_000, memory_bytes: 64 << 30 },
        wireguard: None,
    };
    let cluster = ClusterInfo {
        id: "bench".into(),
        created_at: now_millis(),
        ca_cert_pem: String::new(),
        ca_key_pem: String::new(),
        join_secret: String::new(),
        admin_secret_sha256: String::new(),
        // Room for a /24 per simulated node.
        mesh_range: "10.0.0.0/8".parse()?,
        domain: "localhost".into(),
        acme: None,
    };
    propose(Command::Bootstrap { cluster, node: node(0) }).await?;
    for i in 1..NODES {
        propose(Command::AddNode { node: node(i) }).await?;
    }
    let group = GroupSpec {
        command: Vec::new(),
        resources: Resources { cpu_millis: 100, memory_bytes: 128 << 20 },
        restart: RestartSpec::default(),
        internal_port: Some(8080),
        checks: Vec::new(),
    };
    let spec = ReleaseSpec {
        image: "sha256:bench".into(),
        image_ref: "bench".into(),
        image_source: 1,
        env: BTreeMap::new(),
        groups: BTreeMap::from([("app".to_owned(), group)]),
        strategy: Strategy::Immediate,
        max_unavailable: None,
        placement: PlacementSpec { constraints: vec!["rack != r0".into()], max_per_node: Some(20) },
        http: None,
        services: Vec::new(),
    };
    propose(Command::Deploy { app: "bench".into(), spec, description: "deploy".into() }).await?;
    let first = consensus.state().read(|s| schedule(s, &BTreeSet::new()));
    propose(Command::Place { placements: first }).await?;
    propose(Command::FinishRelease { app: "bench".into(), version: 1, outcome: Outcome::Active }).await?;
    propose(Command::Scale { app: "bench".into(), group: "app".into(), count: INSTANCES }).await?;

    let started = Instant::now();
    let mut placed = 0usize;
    let mut scheduling = Duration::ZERO;
    loop {
        let t = Instant::now();
        let placements = consensus.state().read(|s| schedule(s, &BTreeSet::new()));
        scheduling += t.elapsed();
        let places: Vec<Placement> = placements.into_iter().filter(|p| matches!(p, Placement::Place { .. })).collect();
        if places.is_empty() {
            break;
        }
        for chunk in places.chunks(batch.max(1)) {
            propose(Command::Place { placements: chunk.to_vec() }).await?;
            placed += chunk.len();
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let unplaced = consensus.state().read(|s| s.instances.values().filter(|i| i.node.is_none()).count());
    if unplaced > 0 {
        bail!("{unplaced} instances were left unplaced");
    }
    println!(
        "roost scheduler nodes={NODES} instances={placed} batch={batch} seconds={elapsed:.3} scheduling_s={:.3} placements_per_s={:.0}",
        scheduling.as_secs_f64(),
        placed as f64 / elapsed
    );
    println!(
        "ratio scheduler roost/nomad_record={:.2} (Nomad's published record: about 3,750/s)",
        placed as f64 / elapsed / 3750.0
    );
    stop.cancel();
    consensus.shutdown().await;
    Ok(())
}
