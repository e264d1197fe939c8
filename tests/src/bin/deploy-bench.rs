//! `deploy-bench`: how fast Roost runs and heals apps, against Docker Swarm.
//!
//! In one run on this machine it measures, and prints as `key=value` lines:
//!
//! 1. **deploy**: Roost and Docker Swarm mode side by side, each one node
//!    on this machine's engine, the same image and the same health check
//!    (the hello binary's `check` mode inside the container for Swarm),
//!    readiness judged the same way (every replica healthy; after an
//!    update, no old one left) and polled every 50 ms: a fresh app with 3
//!    replicas (`roost deploy --image --detach` with `initial_count = 3`,
//!    against `docker service create --detach --replicas 3`), and an update started beside
//!    the old replicas (`roost deploy --image` with `max_unavailable = 3`,
//!    against `docker service update --image ... --update-parallelism 3
//!    --update-order start-first`, until 3 containers of the new image run
//!    healthy and no old one does). Ratios are roost/swarm (goal: at most 1.0).
//! 2. **node-death**: Roost and Docker Swarm mode side by side, each on
//!    three machines (containers with an engine each: `Topology`), three
//!    voters against three managers, 3 replicas of the same image with the
//!    same check, one per machine; a follower's machine, then the leader's,
//!    killed whole (`docker kill`: node process, engine and containers at
//!    once); the time until 3 replicas pass on the two survivors, each side
//!    with its default for noticing a dead node (goal: at most Swarm's).
//! 3. **scheduler**: 10,000 instances over 1,000 simulated nodes, placed by
//!    `roost_deploy::scheduler::schedule` and committed through three Raft
//!    voters on RocksDB (gRPC on loopback, in this process), in entries of at
//!    most `--batch` placements; prints
//!    placements per second (goal: at least 10,000/s; Nomad's published
//!    record is about 3,750/s).
//!
//! Run with `cargo run --release -p roost-tests --bin deploy-bench [-- --runs N --only deploy|node-death|scheduler]`.

use std::collections::{BTreeMap, BTreeSet};
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
use roost_tests::apps::{cli, hello_app, hello_toml, require_docker};
use roost_tests::topology::{docker, node_name, Topology};
use roost_tests::{wait_until, Cluster};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const USAGE: roost_tests::bench::Usage = roost_tests::bench::Usage {
    name: "deploy-bench",
    values: &[("--runs", "N"), ("--batch", "N")],
    switches: &[],
    parts: &["deploy", "node-death", "scheduler"],
};

#[tokio::main]
async fn main() -> Result<()> {
    // Nodes stopped on purpose make openraft log errors; they are expected here.
    let filter = tracing_subscriber::EnvFilter::try_from_env("ROOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,openraft=off"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    let flags = roost_tests::bench::Flags::from_command_line(&USAGE)?;
    let runs = flags.number("--runs", 3)? as usize;
    let batch = flags.number("--batch", 1000)? as usize;
    let want = |name: &str| flags.wants(name);

    if want("scheduler") {
        scheduler_bench(batch).await?;
    }
    if want("deploy") || want("node-death") {
        require_docker()?;
        let image = build_image().await?;
        if want("deploy") {
            deploy_bench(&image, runs).await?;
        }
        if want("node-death") {
            node_death_bench(&image, runs).await?;
        }
        let _ = docker(&["rmi", "-f", &image]);
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
    docker(&["build", "-q", "-t", &tag, &dir.path().to_string_lossy()])?;
    Ok(tag)
}

async fn status(cluster: &Cluster, app: &str) -> Result<Value> {
    let text = cluster.cli(0, &["status", "-a", app, "--json"]).await?;
    Ok(serde_json::from_str(&text)?)
}

/// The health check both sides run, as roost.toml and as Swarm flags: the
/// same path, interval, timeout, retries and grace. Swarm runs it inside the
/// container (`hello check`); Roost's agent probes from outside.
const CHECK_TOML: &str = r#"[[http_service.checks]]
path = "/health"
interval = "500ms"
timeout = "400ms"
grace_period = "2s"
failure_threshold = 3
"#;
/// Swarm's side of the same check, in exec form (the image has no shell,
/// and `--health-cmd` always runs one): an image made `FROM` the bench's
/// with this line added, and nothing else.
const SWARM_HEALTHCHECK: &str =
    "HEALTHCHECK --interval=500ms --timeout=400ms --start-period=2s --retries=3 CMD [\"/hello\", \"check\"]";

/// The bench image with Swarm's side of the check added, as
/// `IMAGE-checked`; its name.
fn swarm_image(image: &str) -> Result<String> {
    let checked = format!("{image}-checked");
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("Dockerfile"), format!("FROM {image}\n{SWARM_HEALTHCHECK}\n"))?;
    docker(&["build", "-q", "-t", &checked, &dir.path().to_string_lossy()])?;
    Ok(checked)
}

fn bench_toml() -> String {
    format!(
        "app = \"hello\"\n\n[deploy]\nmax_unavailable = 3\ninitial_count = 3\n\n[[vm]]\ncpus = 0.25\nmemory = \"64mb\"\n\n[http_service]\ninternal_port = 8080\n\n{CHECK_TOML}"
    )
}

/// Waits until `done` holds ([`wait_until`] polls every 50 ms, for both
/// sides); returns the seconds since `started`.
async fn poll_until<F, Fut>(what: &str, started: Instant, done: F) -> Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    wait_until(what, Duration::from_secs(120), done).await?;
    Ok(started.elapsed().as_secs_f64())
}

async fn passing(cluster: &Cluster, app: &str, release: u64, count: usize) -> Result<bool> {
    let s = status(cluster, app).await?;
    let list = s["instances"].as_array().cloned().unwrap_or_default();
    Ok(s["release"] == release
        && list.len() == count
        && list.iter().all(|i| i["release"] == release && i["state"] == "running" && i["health"] == "passing"))
}

/// Like for like, each side one node on this machine's one engine, the
/// same image, the same health check, readiness judged the same way
/// (every replica healthy; after an update, no old one left), both polled
/// every 50 ms:
/// - fresh: a new app with 3 replicas, one command each side. Roost: `roost
///   deploy --image --detach` with `initial_count = 3`; Swarm: `docker
///   service create --detach --replicas 3` with the check.
/// - update: a new release of the running app, three new replicas started
///   beside the old before any old one stops. Roost: `roost deploy --image`
///   with `max_unavailable = 3` (rolling); Swarm: `docker service update
///   --image ... --update-parallelism 3 --update-order start-first`.
async fn deploy_bench(image: &str, runs: usize) -> Result<()> {
    let (mut roost_fresh, mut roost_update, mut swarm_fresh, mut swarm_update) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let swarm = Swarm::join()?;
    for run in 0..runs {
        let cluster = Cluster::start(1).await?;
        let dir = hello_app(&bench_toml())?;
        let path = dir.path().to_string_lossy().into_owned();
        let started = Instant::now();
        cluster.cli(0, &["deploy", &path, "--image", image, "--detach"]).await?;
        let fresh = poll_until("roost: 3 instances passing", started, || passing(&cluster, "hello", 1, 3)).await?;
        let started = Instant::now();
        cluster.cli(0, &["deploy", &path, "--image", image, "--detach"]).await?;
        let update = poll_until("roost: the update passing", started, || passing(&cluster, "hello", 2, 3)).await?;
        println!("roost run={run} fresh_3_healthy_s={fresh:.2} update_3_healthy_s={update:.2}");
        roost_fresh.push(fresh);
        roost_update.push(update);
        cluster.shutdown().await;

        let (fresh, update) = swarm.run(image, run).await?;
        println!("swarm run={run} fresh_3_healthy_s={fresh:.2} update_3_healthy_s={update:.2}");
        swarm_fresh.push(fresh);
        swarm_update.push(update);
    }
    drop(swarm);
    for (what, roost, swarm) in [("fresh", &roost_fresh, &swarm_fresh), ("update", &roost_update, &swarm_update)] {
        let (r, s) = (median(roost.clone()), median(swarm.clone()));
        println!(
            "{what}: roost median_s={r:.2} range_s={} swarm median_s={s:.2} range_s={} ratio roost/swarm={:.2} (goal <= 1.0)",
            spread(roost),
            spread(swarm),
            r / s
        );
    }
    Ok(())
}

/// Swarm mode on this machine's engine: joined for the benchmark (and left
/// again after, unless it was on before).
struct Swarm {
    was_on: bool,
}

impl Swarm {
    fn join() -> Result<Swarm> {
        let was_on = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"])? == "active";
        if !was_on {
            docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"])?;
        }
        Ok(Swarm { was_on })
    }

    /// One fresh service and one update; seconds to each being healthy.
    async fn run(&self, image: &str, run: usize) -> Result<(f64, f64)> {
        let name = format!("roost-bench-{}-{run}", std::process::id());
        let checked = swarm_image(image)?;
        let image = checked.as_str();
        let updated = format!("{image}-update");
        docker(&["tag", image, &updated])?;
        let result = async {
            let started = Instant::now();
            // --init: Roost runs every container under docker-init (PID 1 of
            // a FROM scratch image ignores SIGTERM); so does Swarm, here.
            docker(&[
                "service",
                "create",
                "--detach",
                "--init",
                "--name",
                &name,
                "--replicas",
                "3",
                "--no-resolve-image",
                image,
            ])?;
            let fresh = poll_until("swarm: 3 healthy", started, || ready(&name, image)).await?;
            let started = Instant::now();
            docker(&[
                "service",
                "update",
                "--detach",
                "--image",
                &updated,
                "--update-parallelism",
                "3",
                "--update-order",
                "start-first",
                "--no-resolve-image",
                &name,
            ])?;
            // Not the service's UpdateStatus "completed", which comes only
            // after its 5 s --update-monitor window: the same condition as
            // Roost's.
            let update = poll_until("swarm: the update healthy", started, || ready(&name, &updated)).await?;
            Ok((fresh, update))
        }
        .await;
        let _ = docker(&["service", "rm", &name]);
        // The service's containers go asynchronously; wait so runs do not overlap.
        let _ = poll_until("swarm: the service's containers gone", Instant::now(), || async {
            Ok(docker(&["ps", "-aq", "--filter", &format!("label=com.docker.swarm.service.name={name}")])?.is_empty())
        })
        .await;
        let _ = docker(&["rmi", &updated, image]);
        result
    }
}

/// Whether exactly 3 containers of the service run, all of `image` and
/// healthy (no old one left): what Roost's side waits for.
async fn ready(service: &str, image: &str) -> Result<bool> {
    let filter = format!("label=com.docker.swarm.service.name={service}");
    let listed = docker(&["ps", "--filter", &filter, "--format", "{{.Image}}|{{.Status}}"])?;
    let lines: Vec<&str> = listed.lines().collect();
    Ok(lines.len() == 3
        && lines.iter().all(|l| l.split_once('|').is_some_and(|(i, s)| i == image && s.contains("(healthy)"))))
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if !self.was_on {
            let _ = docker(&["swarm", "leave", "--force"]);
        }
    }
}

/// Which node a node-death run kills.
#[derive(Clone, Copy, Debug)]
enum Victim {
    /// A node that does not lead the control plane.
    Follower,
    /// The node the control plane's leader runs on.
    Leader,
}

impl Victim {
    fn name(self) -> &'static str {
        match self {
            Victim::Follower => "follower",
            Victim::Leader => "leader",
        }
    }
}

/// Node death, like for like: three machines, each a container with its own
/// Docker engine (`Topology`); Roost with three voters, Swarm with three
/// managers; 3 replicas of the same image with the same check, one on each
/// machine. The machine of a follower (or of the leader) is killed at once
/// (`docker kill` of the machine: the node process, its engine and every
/// container in it die together), and the time is taken until 3 replicas
/// pass their check on the two survivors, both sides polled the same way.
/// Each side keeps its defaults for noticing a dead node.
async fn node_death_bench(image: &str, runs: usize) -> Result<()> {
    let mut results: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    for run in 0..runs {
        for victim in [Victim::Follower, Victim::Leader] {
            let took = roost_node_death(run, victim).await?;
            println!("roost node_death victim={} run={run} seconds_to_3_passing={took:.2}", victim.name());
            results.entry(("roost", victim.name())).or_default().push(took);
            let took = swarm_node_death(image, run, victim).await?;
            println!("swarm node_death victim={} run={run} seconds_to_3_healthy={took:.2}", victim.name());
            results.entry(("swarm", victim.name())).or_default().push(took);
        }
    }
    for victim in [Victim::Follower, Victim::Leader] {
        let of = |side: &str| results.get(&(side, victim.name())).cloned().unwrap_or_default();
        let (roost, swarm) = (of("roost"), of("swarm"));
        let (r, s) = (median(roost.clone()), median(swarm.clone()));
        println!(
            "node_death victim={}: roost median_s={r:.2} range_s={} swarm median_s={s:.2} range_s={} ratio roost/swarm={:.2} (goal <= 1.0)",
            victim.name(),
            spread(&roost),
            spread(&swarm),
            r / s
        );
    }
    Ok(())
}

fn spread(values: &[f64]) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    format!("{min:.2}-{max:.2}")
}

/// Roost's side of one node-death run; seconds from the kill to 3 replicas
/// passing on the survivors.
async fn roost_node_death(run: usize, victim: Victim) -> Result<f64> {
    let topology =
        Topology::start(&format!("roost-bench-{}-death{run}{}", std::process::id(), victim.name()), 3).await?;
    let result = roost_node_death_on(&topology, victim).await;
    if result.is_err() {
        eprintln!("{}", topology.logs());
    }
    result
}

async fn roost_node_death_on(topology: &Topology, victim: Victim) -> Result<f64> {
    topology.init(0, "")?;
    let token = topology.file(0, "/data/node/admin.token").await?;
    let join = topology.file(0, "/data/node/join.token").await?;
    for i in 1..3 {
        topology.join(i, &join, "")?;
    }
    let run_cli = |endpoint: String, args: Vec<&'static str>| {
        let token = token.clone();
        async move { cli(&endpoint, &token, &args).await.map_err(|e| anyhow::anyhow!("roost {args:?}: {e}")) }
    };
    let first = topology.endpoint(0);
    wait_until("3 nodes up", Duration::from_secs(90), || async {
        let nodes: Value = serde_json::from_str(&run_cli(first.clone(), vec!["node", "list", "--json"]).await?)?;
        Ok(nodes.as_array().is_some_and(|l| l.len() == 3 && l.iter().all(|n| n["state"] == "up")))
    })
    .await?;
    let app = hello_app(&hello_toml("ha", "failure_threshold = 3\n"))?;
    let path = app.path().to_string_lossy().into_owned();
    cli(&first, &token, &["deploy", &path]).await.map_err(|e| anyhow::anyhow!("roost deploy: {e}"))?;
    run_cli(first.clone(), vec!["scale", "count", "3", "-a", "ha"]).await?;
    let placed = |endpoint: String| {
        let run_cli = &run_cli;
        async move {
            let status: Value = serde_json::from_str(&run_cli(endpoint, vec!["status", "-a", "ha", "--json"]).await?)?;
            let list = status["instances"].as_array().cloned().unwrap_or_default();
            let passing: Vec<String> = list
                .iter()
                .filter(|i| i["state"] == "running" && i["health"] == "passing")
                .filter_map(|i| i["node"].as_str().map(str::to_owned))
                .collect();
            anyhow::Ok((list.len(), passing))
        }
    };
    wait_until("3 instances passing, one on each node", Duration::from_secs(120), || async {
        let (count, passing) = placed(first.clone()).await?;
        let nodes: BTreeSet<&String> = passing.iter().collect();
        Ok(count == 3 && passing.len() == 3 && nodes.len() == 3)
    })
    .await?;
    let nodes: Value = serde_json::from_str(&run_cli(first.clone(), vec!["node", "list", "--json"]).await?)?;
    let leader = nodes
        .as_array()
        .and_then(|l| l.iter().find(|n| n["role"] == "leader"))
        .and_then(|n| n["name"].as_str())
        .context("no leader in `roost node list`")?
        .to_owned();
    let index = (0..3)
        .find(|i| match victim {
            Victim::Leader => node_name(*i) == leader,
            Victim::Follower => node_name(*i) != leader,
        })
        .context("no machine to kill")?;
    let dead = node_name(index);
    let survivor = topology.endpoint((index + 1) % 3);
    let started = Instant::now();
    topology.crash_machine(index)?;
    poll_until("roost: 3 instances passing on the survivors", started, || async {
        // A survivor may be electing a leader: an error is a "not yet".
        let Ok((count, passing)) = placed(survivor.clone()).await else { return Ok(false) };
        Ok(count == 3 && passing.len() == 3 && passing.iter().all(|n| *n != dead))
    })
    .await
}

/// Swarm's side of one node-death run: three managers, each in a machine
/// of its own with the bench image loaded; seconds from the kill to 3
/// healthy containers of the service on the survivors.
async fn swarm_node_death(image: &str, run: usize, victim: Victim) -> Result<f64> {
    let topology =
        Topology::start(&format!("swarm-bench-{}-death{run}{}", std::process::id(), victim.name()), 3).await?;
    let checked = swarm_image(image)?;
    let result = swarm_node_death_on(&topology, &checked, victim).await;
    let _ = docker(&["rmi", &checked]);
    result
}

async fn swarm_node_death_on(topology: &Topology, image: &str, victim: Victim) -> Result<f64> {
    let tar = tempfile::NamedTempFile::new()?;
    docker(&["save", "-o", &tar.path().to_string_lossy(), image])?;
    for i in 0..3 {
        topology.load_image(i, tar.path())?;
    }
    let ip = |i: usize| topology.machine(i).ip.clone();
    topology.exec(0, &format!("docker swarm init --advertise-addr {}", ip(0)))?;
    let token = topology.exec(0, "docker swarm join-token -q manager")?;
    for i in 1..3 {
        topology.exec(
            i,
            &format!("docker swarm join --token {} --advertise-addr {} {}:2377", token.trim(), ip(i), ip(0)),
        )?;
    }
    wait_until("swarm: 3 managers ready", Duration::from_secs(60), || async {
        let ready = topology.exec(0, "docker node ls --format '{{.Status}}'")?;
        Ok(ready.lines().filter(|l| *l == "Ready").count() == 3)
    })
    .await?;
    topology.exec(
        0,
        &format!("docker service create --detach --init --name ha --replicas 3 --no-resolve-image {image} >/dev/null"),
    )?;
    let healthy = |i: usize| -> Result<usize> {
        let listed =
            topology.exec(i, "docker ps -q --filter label=com.docker.swarm.service.name=ha --filter health=healthy")?;
        Ok(listed.lines().filter(|l| !l.trim().is_empty()).count())
    };
    wait_until("swarm: 3 healthy, one on each machine", Duration::from_secs(120), || async {
        Ok((0..3).map(healthy).collect::<Result<Vec<_>>>()? == [1, 1, 1])
    })
    .await?;
    let leads = |i: usize| -> Result<bool> {
        Ok(topology.exec(i, "docker node inspect self --format '{{.ManagerStatus.Leader}}'")?.trim() == "true")
    };
    let mut index = None;
    for i in 0..3 {
        let leader = leads(i)?;
        if matches!((victim, leader), (Victim::Leader, true) | (Victim::Follower, false)) {
            index = Some(i);
            break;
        }
    }
    let index = index.context("swarm: no machine to kill")?;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != index).collect();
    let started = Instant::now();
    topology.crash_machine(index)?;
    poll_until("swarm: 3 healthy on the survivors", started, || async {
        let mut total = 0;
        for i in &survivors {
            total += healthy(*i)?;
        }
        Ok(total == 3)
    })
    .await
}

/// Raft over plain gRPC on loopback, for the scheduler bench's voters (the
/// nodes' own transport adds mutual TLS).
struct Loopback;

impl roost_raft::network::Channels for Loopback {
    fn channel(&self, address: &str) -> Result<tonic::transport::Channel, String> {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{address}")).map_err(|e| e.to_string())?;
        Ok(endpoint.connect_lazy())
    }
}

/// Three voters of Raft alone (RocksDB, gRPC on loopback), each in this
/// process; the first leads. No node daemon: its membership controller
/// would make learners of the bench's simulated nodes.
async fn three_voters(dir: &std::path::Path, stop: &CancellationToken) -> Result<Vec<(Arc<Consensus>, RaftNode)>> {
    let mut voters = Vec::new();
    for id in 1..=3u64 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let consensus =
            Consensus::start(id, &dir.join(format!("n{id}")), &Timings::default(), Arc::new(Loopback), stop.clone())
                .await?;
        let authorize: roost_raft::service::Authorize = Arc::new(|_, _, _| Ok(()));
        let service = roost_raft::service::RaftService::new(consensus.clone(), authorize).into_server();
        // The nodes learn a caller from its certificate; here every caller is a voter.
        let caller = tonic::service::InterceptorLayer::new(|mut request: tonic::Request<()>| {
            request.extensions_mut().insert(roost_raft::service::Caller(None));
            Ok(request)
        });
        // As the nodes' own transport does: no Nagle delay on small replies.
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let server = tonic::transport::Server::builder().layer(caller).add_service(service);
        let stopped = stop.clone();
        tokio::spawn(async move { server.serve_with_incoming_shutdown(incoming, stopped.cancelled()).await });
        voters.push((consensus, RaftNode { name: format!("n{id}"), address }));
    }
    let leader = voters[0].0.clone();
    leader.initialize(voters[0].1.clone()).await?;
    wait_until("n1 to lead", Duration::from_secs(10), || async { Ok(leader.is_leader()) }).await?;
    for (consensus, node) in &voters[1..] {
        leader.raft().add_learner(consensus.id(), node.clone(), true).await?;
    }
    let ids: BTreeSet<u64> = voters.iter().map(|(c, _)| c.id()).collect();
    leader.raft().change_membership(ids, false).await?;
    Ok(voters)
}

/// Placements committed through three voters: the scheduler's decisions for
/// 10,000 instances over 1,000 simulated nodes, proposed `batch` placements
/// to an entry, each entry synced by a majority before the next is made.
async fn scheduler_bench(batch: usize) -> Result<()> {
    const NODES: usize = 1_000;
    const INSTANCES: u32 = 10_000;
    let dir = tempfile::tempdir()?;
    let stop = CancellationToken::new();
    let voters = three_voters(dir.path(), &stop).await?;
    let consensus = voters[0].0.clone();
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
        // Nodes 1-3 are the voters: Raft reaches a node at the address the state records.
        address: voters.get(i).map_or_else(|| format!("10.0.{}.{}:7000", i / 250, i % 250), |(_, v)| v.address.clone()),
        labels: BTreeMap::from([("rack".to_owned(), format!("r{}", i % 20))]),
        cert_serial: format!("s{i}"),
        cert_fingerprint: format!("f{i}"),
        resources: Resources { cpu_millis: 16_000, memory_bytes: 64 << 30 },
        wireguard: None,
        role: Default::default(),
    };
    let cluster = ClusterInfo {
        id: "bench".into(),
        created_at: now_millis(),
        ca_cert_pem: String::new(),
        ca_key: None,
        voter_join: None,
        worker_join: None,
        ca_key_pem: String::new(),
        join_secret: String::new(),
        worker_join_secret: String::new(),
        admin_secret_sha256: String::new(),
        admin_public_key: String::new(),
        join_rotation_due: false,
        // Room for a /24 per simulated node.
        mesh_range: "10.0.0.0/8".parse()?,
        domain: "localhost".into(),
        acme: None,
        ca_rotation: None,
        previous_ca_cert_pem: None,
    };
    propose(Command::Bootstrap { cluster: Box::new(cluster), node: node(0) }).await?;
    for i in 1..NODES {
        propose(Command::AddNode { node: node(i) }).await?;
    }
    let group = GroupSpec {
        command: Vec::new(),
        resources: Resources { cpu_millis: 100, memory_bytes: 128 << 20 },
        restart: RestartSpec::default(),
        internal_port: Some(8080),
        checks: Vec::new(),
        kill_timeout_seconds: roost_raft::workload::DEFAULT_KILL_TIMEOUT_SECONDS,
    };
    let spec = ReleaseSpec {
        image: "sha256:bench".into(),
        image_ref: "bench".into(),
        image_source: 1,
        env: BTreeMap::new(),
        groups: BTreeMap::from([("app".to_owned(), group)]),
        strategy: Strategy::Immediate,
        max_unavailable: None,
        initial_count: None,
        release_history: None,
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
        "roost scheduler voters=3 nodes={NODES} instances={placed} placements_per_entry={batch} seconds={elapsed:.3} scheduling_s={:.3} placements_per_s={:.0}",
        scheduling.as_secs_f64(),
        placed as f64 / elapsed
    );
    println!(
        "ratio scheduler roost/nomad_record={:.2} (Nomad's published record: about 3,750/s)",
        placed as f64 / elapsed / 3750.0
    );
    stop.cancel();
    for (voter, _) in voters {
        voter.shutdown().await;
    }
    Ok(())
}
