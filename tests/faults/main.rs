//! Faults, checked as Jepsen checks them. (A test binary of its own, so
//! that its load runs beside no other test.)
//!
//! A cluster of real `roost` processes (3 nodes, then 5), each in a
//! network namespace of its own ([`roost_tests::netns`]): partitions are
//! packets dropped by a filter in the receiving node's namespace, so they
//! cut Raft, forwarding and everything else exactly as a switch failure
//! would, and nothing in Roost knows it is being tested. (A fault layer in
//! the transport would have been quicker to flip, but it would test the
//! layer rather than the network, and it would need a hook in production
//! code.)
//!
//! Clients, two per node, each bound to its node, create apps with names no
//! one else uses and list all apps (a linearizable read), recording when
//! each call began and ended and what it returned: ok, failed (only errors
//! the node gives before proposing anything count as failed), or unknown
//! (a timeout or a lost connection: it may or may not take effect).
//! Meanwhile a nemesis works through the faults, twice each: SIGKILL of a
//! random node and of the leader (restarted with the same command line),
//! SIGSTOP of the leader (a paused, not dead, leader) then SIGCONT, the
//! leader cut off alone, a random minority cut off, and a bridge (two
//! sides that cannot see each other, and one node that sees both).
//!
//! Then the network heals, every node is back, and a final read goes
//! through every node. The history is a grow-only set, and
//! [`roost_tests::linearizable::check`] must find an order for it. The test
//! prints the operation counts, the faults and `lost=0 phantom=0
//! stale_reads=0`, and fails otherwise.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use roost_node::cli::ClientArgs;
use roost_proto::api::{CreateAppRequest, ListAppsRequest, ListNodesRequest, ReadOptions};
use roost_tests::linearizable::{self, Bits, GrowSet, Operation, SetInput, SetOutput};
use roost_tests::netns::Network;
use roost_tests::process::{wait_for_nodes, Host, NodeProcess};
use roost_tests::Control;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a client waits for an answer before calling it unknown.
const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long each fault lasts, and the quiet between two.
const HOLD: Duration = Duration::from_secs(3);
const QUIET: Duration = Duration::from_secs(2);
/// How many times the nemesis goes through the list of faults.
const ROUNDS: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_under_kills_pauses_and_partitions_lose_no_write_and_stay_linearizable() -> Result<()> {
    faults(3).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_nodes_under_kills_pauses_and_partitions_lose_no_write_and_stay_linearizable() -> Result<()> {
    faults(5).await
}

async fn faults(size: usize) -> Result<()> {
    let root = tempfile::Builder::new().prefix(&format!("roost-faults-{size}-")).tempdir()?;
    let result = scenario(root.path(), size).await;
    if result.is_err() {
        eprintln!("logs and data kept in {}", root.keep().display());
    }
    result
}

/// The kinds of fault, in the order the nemesis injects them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    KillLeader,
    PauseLeader,
    IsolateLeader,
    Minority,
    Bridge,
}

const FAULTS: [Fault; 6] =
    [Fault::Kill, Fault::KillLeader, Fault::PauseLeader, Fault::IsolateLeader, Fault::Minority, Fault::Bridge];

struct Cluster {
    network: Network,
    nodes: Vec<NodeProcess>,
    admin: String,
}

async fn scenario(root: &std::path::Path, size: usize) -> Result<()> {
    let network = Network::create(size)?;
    let host = |i: usize| Host::Namespace { namespace: network.namespace(i), ip: network.ip(i) };
    let first = NodeProcess::init_at(root, "n1", &host(0))?;
    let admin = first.read_token_when_ready("admin.token").await?;
    let join = first.read_token_when_ready("join.token").await?;
    wait_for_nodes(&first.address, &admin, Duration::from_secs(30), "n1 to serve", |n| n.len() == 1).await?;
    let mut nodes = vec![first];
    for i in 1..size {
        nodes.push(NodeProcess::join_at(root, &format!("n{}", i + 1), &nodes[0].address, &join, &host(i))?);
    }
    let mut cluster = Cluster { network, nodes, admin };
    cluster.all_up().await?;

    let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    let seed = (clock ^ u64::from(std::process::id())) | 1;
    eprintln!("faults: {size} nodes, seed {seed}");
    let recorder = Arc::new(Recorder::new());
    let stop = CancellationToken::new();
    let mut clients = Vec::new();
    for c in 0..size * 2 {
        let endpoint = cluster.nodes[c % size].address.clone();
        let (recorder, stop, admin) = (recorder.clone(), stop.clone(), cluster.admin.clone());
        clients.push(tokio::spawn(client(c, endpoint, admin, recorder, stop, seed.wrapping_add(c as u64))));
    }

    let mut rng = Rng(seed);
    let mut injected = Vec::new();
    let nemesis = async {
        for _ in 0..ROUNDS {
            for fault in FAULTS {
                tokio::time::sleep(QUIET).await;
                let what = cluster.inject(fault, &mut rng).await?;
                eprintln!("fault {fault:?}: {what}");
                injected.push(fault);
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    let nemesis_result = nemesis.await;
    // Whatever happened, put everything back before judging. A node that
    // exited on its own crashed: that fails the test.
    cluster.network.heal()?;
    for node in &mut cluster.nodes {
        if node.pid().is_none() {
            node.start()?;
        } else if let Some(code) = node.exited()? {
            bail!("{} exited by itself (code {code:?}); its log:\n{}", node.name, node.stderr());
        } else {
            node.resume()?;
        }
    }
    nemesis_result?;
    cluster.all_up().await?;
    // A little traffic on the healed cluster, then the clients stop.
    tokio::time::sleep(QUIET).await;
    stop.cancel();
    for handle in clients {
        handle.await??;
    }
    // The final reads, one through every node.
    for node in &cluster.nodes {
        final_read(&node.address, &cluster.admin, &recorder).await?;
    }

    let elements = recorder.next.load(Ordering::SeqCst);
    let history = recorder.history();
    let count = |pick: &dyn Fn(&Operation<SetInput, SetOutput>) -> bool| history.iter().filter(|o| pick(o)).count();
    let adds_ok = count(&|o| matches!(o.output, Some(SetOutput::Added)));
    let adds_unknown = count(&|o| matches!(o.input, SetInput::Add(_)) && o.output.is_none());
    let reads = count(&|o| matches!(o.output, Some(SetOutput::Read(_))));
    let failed = recorder.failed.load(Ordering::SeqCst);
    let reads_failed = recorder.reads_failed.load(Ordering::SeqCst);
    let duplicates = recorder.duplicates.load(Ordering::SeqCst);
    let kinds = FAULTS.map(|f| format!("{f:?}={}", injected.iter().filter(|i| **i == f).count())).join(" ");
    println!("faults ({size} nodes): {kinds}");
    println!(
        "ops: adds ok={adds_ok} unknown={adds_unknown} failed={failed} answered_already_exists={duplicates}; reads ok={reads} failed_or_timed_out={reads_failed}"
    );
    let found = linearizable::anomalies(&history, elements);
    let verdict = linearizable::check(&GrowSet, &linearizable::drop_unobserved(history), 50_000_000);
    let checked = match &verdict {
        Ok(steps) => format!("true (search: {steps} steps)"),
        Err(failure) => format!("false ({failure:?})"),
    };
    println!("lost={} phantom={} stale_reads={} linearizable={checked}", found.lost, found.phantom, found.stale_reads);
    // Failures are errors, not panics, so that the logs are kept.
    if (found.lost, found.phantom, found.stale_reads) != (0, 0, 0) {
        bail!("the history has anomalies: {found:?}");
    }
    if let Err(failure) = verdict {
        bail!("the history is not linearizable: {failure:?}");
    }
    if duplicates > 0 {
        bail!("{duplicates} creates were answered \"already exists\" though no one else made that app");
    }
    // The run must have exercised something: writes and reads went through.
    if adds_ok < 50 || reads < 50 {
        bail!("too few operations completed to judge: {adds_ok} adds, {reads} reads");
    }
    Ok(())
}

impl Cluster {
    async fn all_up(&self) -> Result<()> {
        let size = self.nodes.len();
        wait_for_nodes(&self.nodes[0].address, &self.admin, Duration::from_secs(90), "every node up, one leader", |n| {
            n.len() == size
                && n.iter().all(|n| n["state"] == "up")
                && n.iter().filter(|n| n["role"] == "leader").count() == 1
        })
        .await
    }

    /// The leader a node names in its own view, if it answers.
    async fn seen_by(&self, node: usize) -> Option<usize> {
        let asked = async {
            let mut client = connect(&self.nodes[node].address, &self.admin).await?;
            let request = ListNodesRequest { read: Some(ReadOptions { stale: true }) };
            anyhow::Ok(client.list_nodes(request).await?.into_inner().nodes)
        };
        let listed = tokio::time::timeout(Duration::from_secs(1), asked).await.ok()?.ok()?;
        let leader = listed.iter().find(|n| n.role == "leader")?;
        self.nodes.iter().position(|n| n.name == leader.name)
    }

    /// The leader: a node that a node names, and that names itself (a view
    /// may be out of date; a node's view of itself as leader is its own).
    /// Waits (up to 20 s) while there is none.
    async fn leader(&self) -> Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for node in (0..self.nodes.len()).filter(|i| self.nodes[*i].pid().is_some()) {
                if let Some(named) = self.seen_by(node).await {
                    if self.seen_by(named).await == Some(named) {
                        return Ok(named);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("no node named a leader within 20s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Injects `fault`, holds it, and undoes it; says what it did.
    async fn inject(&mut self, fault: Fault, rng: &mut Rng) -> Result<String> {
        let size = self.nodes.len();
        let name = |i: usize| format!("n{}", i + 1);
        let what = match fault {
            Fault::Kill | Fault::KillLeader => {
                let victim = if fault == Fault::Kill { rng.below(size) } else { self.leader().await? };
                self.nodes[victim].kill()?;
                tokio::time::sleep(HOLD).await;
                self.nodes[victim].start()?;
                format!("SIGKILL {} for {HOLD:?}, then started again", name(victim))
            }
            Fault::PauseLeader => {
                let victim = self.leader().await?;
                self.nodes[victim].pause()?;
                tokio::time::sleep(HOLD).await;
                self.nodes[victim].resume()?;
                format!("SIGSTOP {} (the leader) for {HOLD:?}, then SIGCONT", name(victim))
            }
            Fault::IsolateLeader | Fault::Minority => {
                let mut order: Vec<usize> = (0..size).collect();
                rng.shuffle(&mut order);
                if fault == Fault::IsolateLeader {
                    let leader = self.leader().await?;
                    order.retain(|i| *i != leader);
                    order.insert(0, leader);
                }
                let cut_off = if fault == Fault::IsolateLeader { 1 } else { (size - 1) / 2 };
                let (minority, majority) = order.split_at(cut_off);
                self.network.partition(&[minority.to_vec(), majority.to_vec()])?;
                tokio::time::sleep(HOLD).await;
                self.network.heal()?;
                let names = |side: &[usize]| side.iter().map(|i| name(*i)).collect::<Vec<_>>().join(",");
                format!("{} cut off from {} for {HOLD:?}", names(minority), names(majority))
            }
            Fault::Bridge => {
                // Two sides that cannot see each other, and one node (the
                // bridge) that sees both.
                let mut order: Vec<usize> = (0..size).collect();
                rng.shuffle(&mut order);
                let bridge = order[0];
                let (left, right) = order[1..].split_at((size - 1) / 2);
                let pairs: Vec<(usize, usize)> = left.iter().flat_map(|a| right.iter().map(|b| (*a, *b))).collect();
                self.network.cut(&pairs)?;
                tokio::time::sleep(HOLD).await;
                self.network.heal()?;
                let names = |side: &[usize]| side.iter().map(|i| name(*i)).collect::<Vec<_>>().join(",");
                format!(
                    "{} bridges {} and {}, cut off from each other, for {HOLD:?}",
                    name(bridge),
                    names(left),
                    names(right)
                )
            }
        };
        Ok(what)
    }
}

async fn connect(endpoint: &str, admin: &str) -> Result<Control> {
    let args = ClientArgs { endpoint: Some(endpoint.to_owned()), token: Some(admin.to_owned()) };
    Ok(args.connect().await?)
}

/// Every operation the clients made, with times from one clock.
struct Recorder {
    start: Instant,
    ops: Mutex<Vec<Operation<SetInput, SetOutput>>>,
    /// The next element; element 0 stands for any name no client made.
    next: AtomicUsize,
    failed: AtomicUsize,
    reads_failed: AtomicUsize,
    duplicates: AtomicUsize,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
            next: AtomicUsize::new(1),
            failed: AtomicUsize::new(0),
            reads_failed: AtomicUsize::new(0),
            duplicates: AtomicUsize::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn record(&self, op: Operation<SetInput, SetOutput>) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }

    fn history(&self) -> Vec<Operation<SetInput, SetOutput>> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The element an app name stands for: `f<n>` is element n; anything
/// else was made by no client, and is element 0, which nobody adds.
fn element(name: &str) -> usize {
    name.strip_prefix('f').and_then(|n| n.parse().ok()).filter(|n| *n > 0).unwrap_or(0)
}

/// The elements a listing of apps shows.
fn read_set(apps: &[roost_proto::api::App]) -> Bits {
    let mut seen = Bits::default();
    for app in apps {
        seen.set(element(&app.name), true);
    }
    seen
}

/// Whether a node's answer says the operation did not take effect: only
/// refusals given before anything is proposed.
fn definitely_failed(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::InvalidArgument | tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
}

async fn client(
    id: usize,
    endpoint: String,
    admin: String,
    recorder: Arc<Recorder>,
    stop: CancellationToken,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng(seed | 1);
    let mut connection: Option<Control> = None;
    while !stop.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(rng.below(40) as u64)).await;
        let mut client = match connection.take() {
            Some(client) => client,
            // Nothing was sent yet: no operation to record.
            None => match tokio::time::timeout(OP_TIMEOUT, connect(&endpoint, &admin)).await {
                Ok(Ok(client)) => client,
                _ => continue,
            },
        };
        if rng.below(2) == 0 {
            let element = recorder.next.fetch_add(1, Ordering::SeqCst);
            let name = format!("f{element}");
            let request = roost_node::cli::about_app(&name, CreateAppRequest { name: name.clone() });
            let call = recorder.now();
            let answer = tokio::time::timeout(OP_TIMEOUT, client.create_app(request)).await;
            let ret = recorder.now();
            let (output, ret) = match answer {
                Ok(Ok(_)) => (Some(SetOutput::Added), Some(ret)),
                // Names are unique: "already exists" means the node applied
                // this one create twice (a retry after it had taken effect),
                // which a user would see as an error for their own write.
                Ok(Err(status)) if status.code() == tonic::Code::AlreadyExists => {
                    recorder.duplicates.fetch_add(1, Ordering::SeqCst);
                    (Some(SetOutput::Added), Some(ret))
                }
                Ok(Err(status)) if definitely_failed(&status) => {
                    recorder.failed.fetch_add(1, Ordering::SeqCst);
                    connection = Some(client);
                    continue;
                }
                // A timeout or any other error: it may or may not happen.
                _ => (None, None),
            };
            if output.is_some() {
                connection = Some(client);
            }
            recorder.record(Operation { client: id, input: SetInput::Add(element), output, call, ret });
        } else {
            let call = recorder.now();
            let answer = tokio::time::timeout(OP_TIMEOUT, client.list_apps(ListAppsRequest { read: None })).await;
            let ret = recorder.now();
            match answer {
                Ok(Ok(listed)) => {
                    let output = Some(SetOutput::Read(read_set(&listed.into_inner().apps)));
                    recorder.record(Operation { client: id, input: SetInput::Read, output, call, ret: Some(ret) });
                    connection = Some(client);
                }
                // A read that fails or times out tells nothing.
                _ => {
                    recorder.reads_failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
    Ok(())
}

/// A linearizable read through `endpoint`, retried until one succeeds.
async fn final_read(endpoint: &str, admin: &str, recorder: &Recorder) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let call = recorder.now();
        let attempt = async {
            let mut client = connect(endpoint, admin).await?;
            anyhow::Ok(client.list_apps(ListAppsRequest { read: None }).await?.into_inner().apps)
        };
        if let Ok(Ok(apps)) = tokio::time::timeout(OP_TIMEOUT, attempt).await {
            let seen = read_set(&apps);
            let ret = Some(recorder.now());
            recorder.record(Operation {
                client: usize::MAX,
                input: SetInput::Read,
                output: Some(SetOutput::Read(seen)),
                call,
                ret,
            });
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no read through {endpoint} succeeded within 60s after the faults");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// xorshift64*: enough randomness for choosing victims, from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}
