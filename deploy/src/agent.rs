//! The node agent: makes this node's Docker engine run what the state says.
//!
//! Every pass (on each state change, and at least every second) compares the
//! instances the state places on this node with the containers the engine
//! has, and acts on the difference: it removes containers whose instance is
//! gone, moved, of another release or of an older generation; fetches the
//! image from a peer when the engine lacks it; creates and starts missing
//! containers with the group's limits, on the node's instance network (the
//! mesh's bridge on the node's /24, with the node's DNS; none is started
//! before the mesh has made it, and a container off it is replaced); stops
//! the containers of suspended apps; restarts exited ones per the restart
//! policy, with backoff; and runs the health checks. Then it reports to the leader what differs from what the
//! state already says, so steady instances cost no log entries. A crash at
//! any point leaves containers and state that the next pass repairs.
//!
//! The slow parts (fetching an image, creating and starting a container,
//! stopping one within its kill timeout) run as jobs beside the pass, one
//! per container ([`Jobs`]): a large image or an instance that takes its
//! time to stop holds back no restart, health report or removal of
//! another. A job's end wakes the agent for another pass.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::FutureExt;
use ipnet::Ipv4Net;
use roost_raft::consensus::now_millis;
use roost_raft::workload::{
    truncated, GroupSpec, Health, Instance, InstanceReport, InstanceState, ReleaseStatus, RestartPolicy, SealedSecret,
    MAX_REASON_BYTES,
};
use roost_raft::{Command, Consensus, NodeId};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::checks::Checker;
use crate::engine::{
    AttachTo, Container, ContainerSpec, Engine, LABEL_APP, LABEL_CLUSTER, LABEL_GENERATION, LABEL_GROUP,
    LABEL_INSTANCE, LABEL_NODE, LABEL_RELEASE,
};
use crate::secrets::{SecretsError, SecretsKey};

/// A `docker save` stream of an image, fetched from another node.
pub type ImageStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// Fetches images from other nodes; the node binary implements it over the
/// cluster's TLS transport.
pub trait ImageFetcher: Send + Sync {
    fn fetch(&self, image: String, from: NodeId) -> BoxFuture<'static, Result<ImageStream, String>>;
}

/// Opens the secrets of an instance the agent is about to start: with the
/// secrets key where the node holds it, else by asking a node that does.
pub trait SecretOpener: Send + Sync {
    /// The values of `sealed` (the secrets of `instance`'s release).
    fn open(
        self: Arc<Self>,
        instance: &Instance,
        sealed: &BTreeMap<String, SealedSecret>,
    ) -> BoxFuture<'static, Result<BTreeMap<String, String>, String>>;
}

impl SecretOpener for SecretsKey {
    fn open(
        self: Arc<Self>,
        instance: &Instance,
        sealed: &BTreeMap<String, SealedSecret>,
    ) -> BoxFuture<'static, Result<BTreeMap<String, String>, String>> {
        let opened = sealed
            .iter()
            .map(|(name, value)| Ok((name.clone(), SecretsKey::open(&self, &instance.app, name, value)?)))
            .collect::<Result<BTreeMap<_, _>, SecretsError>>()
            .map_err(|e| e.to_string());
        Box::pin(std::future::ready(opened))
    }
}

/// The network this node's instances join: a bridge on the node's /24 of
/// the mesh, with the node's DNS server at its gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceNetwork {
    /// The Docker network's name.
    pub network: String,
    pub subnet: Ipv4Net,
    /// The node's own address on it, where `.internal` names resolve.
    pub dns: Ipv4Addr,
}

impl InstanceNetwork {
    /// How a container joins it.
    pub fn attach(&self) -> AttachTo {
        AttachTo { network: self.network.clone(), dns: self.dns.to_string() }
    }

    /// Whether a container with address `ip` sits on this network.
    fn holds(&self, ip: Option<&str>) -> bool {
        ip.and_then(|ip| ip.parse::<Ipv4Addr>().ok()).is_some_and(|ip| self.subnet.contains(&ip))
    }
}

/// The node's instance network as the mesh last left it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NetworkStatus {
    /// Not made yet.
    #[default]
    Pending,
    Up(InstanceNetwork),
    /// Making it failed, and why (what an instance waiting for it reports).
    Failing(String),
}

impl NetworkStatus {
    pub fn up(&self) -> Option<&InstanceNetwork> {
        match self {
            NetworkStatus::Up(network) => Some(network),
            _ => None,
        }
    }
}

const PASS_EVERY: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Images of this many newest superseded releases per app stay, for rollbacks.
const KEEP_RELEASE_IMAGES: usize = 5;
const COLLECT_IMAGES_EVERY: Duration = Duration::from_secs(60);
/// An image no release uses is kept this long, in case a deploy is about to.
const UNUSED_IMAGE_AGE: Duration = Duration::from_secs(600);

pub struct Agent {
    worker: Worker,
    jobs: Jobs,
    tracked: HashMap<String, Tracked>,
    last_collect: Option<Instant>,
    /// Instances whose container could not be created: when to try again,
    /// and how many tries failed.
    create_retry: HashMap<String, (Instant, u32)>,
    /// What the last image collection saw: images in use, destroyed apps.
    collected_for: Option<(HashSet<String>, usize)>,
    /// The node's instance network, once the mesh has made it.
    network: watch::Receiver<NetworkStatus>,
    /// When each instance's reason alone was last reported.
    reason_reported: ReasonLimiter,
}

/// A change of an instance's reason alone (a check's output, which app code
/// writes) is reported at most this often, so an app cannot flood the Raft
/// log; a change of state or health is reported at once.
const REASON_REPORT_EVERY: Duration = Duration::from_secs(30);

/// When each instance's reason alone was last reported: a new one goes out
/// at most every [`REASON_REPORT_EVERY`] per instance.
#[derive(Debug, Default)]
struct ReasonLimiter {
    reported: HashMap<String, Instant>,
}

impl ReasonLimiter {
    /// Whether a change of `instance`'s reason alone may be reported `now`
    /// (and, if so, notes that it was).
    fn admit(&mut self, instance: &str, now: Instant) -> bool {
        let due =
            self.reported.get(instance).is_none_or(|at| now.saturating_duration_since(*at) >= REASON_REPORT_EVERY);
        if due {
            self.reported.insert(instance.to_owned(), now);
        }
        due
    }

    /// Forgets instances that are no longer wanted here.
    fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.reported.retain(|id, _| keep(id));
    }
}

/// What the agent remembers of one instance's container between passes.
struct Tracked {
    container: String,
    started: Instant,
    checker: Option<Checker>,
    restarts: u32,
    /// When the exited container may be started again.
    restart_at: Option<Instant>,
    /// The last exit, once seen: the reason shown to users.
    exit: Option<String>,
    gave_up: bool,
}

impl Tracked {
    /// A container seen running (or just started) now.
    fn new(container: String, restarts: u32) -> Self {
        Self {
            container,
            started: Instant::now(),
            checker: None,
            restarts,
            restart_at: None,
            exit: None,
            gave_up: false,
        }
    }
}

/// What does the slow work on containers: cheap to clone into a job.
#[derive(Clone)]
struct Worker {
    engine: Engine,
    consensus: Arc<Consensus>,
    secrets: Arc<dyn SecretOpener>,
    fetcher: Arc<dyn ImageFetcher>,
    node: NodeId,
    /// Rung when a health check's result changes or a job ends: time for
    /// another pass.
    wake: Arc<Notify>,
}

/// Jobs in flight. An instance has at most one create; a container at most
/// one removal; an instance's new container is not created while one of
/// its old ones is still stopping (they share a name).
#[derive(Default)]
struct Jobs {
    /// By instance: the generation being created, and the new container's
    /// id or why it could not start.
    creating: HashMap<String, (u32, Job<Result<String, String>>)>,
    /// By container id: its instance, and how the stop and removal went.
    removing: HashMap<String, (String, Job<Result<(), String>>)>,
    /// By container id: a removal that failed, when to try again, how many
    /// tries failed, and the last error (shown as the instance's reason).
    remove_retry: HashMap<String, (Instant, u32, String)>,
}

impl Jobs {
    fn stopping(&self, instance: &str) -> bool {
        self.removing.values().any(|(of, _)| of == instance)
    }

    /// Forgets removals that ended; a failed one is tried again (with
    /// backoff), for its container is still there to be found.
    fn reap_removals(&mut self) {
        let mut failed = Vec::new();
        self.removing.retain(|container, (instance, job)| {
            let error = match job.try_take() {
                None => return true,
                Some(Ok(Ok(()))) => return false,
                Some(Ok(Err(error))) => error,
                Some(Err(ended)) => format!("removing the container failed: {ended}"),
            };
            tracing::warn!(%error, %instance, %container, "could not remove a container; retrying");
            failed.push((container.clone(), error));
            false
        });
        for (container, error) in failed {
            let attempts = self.remove_retry.get(&container).map_or(0, |(_, n, _)| *n);
            self.remove_retry.insert(container, (Instant::now() + backoff(attempts), attempts + 1, error));
        }
    }

    /// Why removing `container` failed last, if it did.
    fn removal_error(&self, container: &str) -> Option<String> {
        self.remove_retry.get(container).map(|(_, _, error)| error.clone())
    }

    /// Calls off every job (the engine finishes a stop it was asked for)
    /// and waits until none runs.
    async fn abort_all(&mut self) {
        let mut ended = Vec::new();
        for (_, (_, job)) in self.creating.drain() {
            job.abort();
            ended.push(job.ended().boxed());
        }
        for (_, (_, job)) in self.removing.drain() {
            job.abort();
            ended.push(job.ended().boxed());
        }
        futures::future::join_all(ended).await;
    }
}

/// Slow work (a create, a removal) in a task of its own, whose end wakes the
/// agent. The result is handed over before the wake, so the pass that the
/// wake starts finds it (a task's own handle reports it finished only after
/// its last line, so a wake from inside it could come too early and the
/// result wait for the next periodic pass).
struct Job<T> {
    handle: JoinHandle<()>,
    result: tokio::sync::oneshot::Receiver<T>,
}

impl<T: Send + 'static> Job<T> {
    fn spawn(wake: Arc<Notify>, work: impl Future<Output = T> + Send + 'static) -> Self {
        let (done, result) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(async move {
            let _ = done.send(work.await);
            wake.notify_one();
        });
        Job { handle, result }
    }

    /// The result, once the work has ended; why there is none if the task
    /// ended without one (it panicked, or was called off).
    fn try_take(&mut self) -> Option<Result<T, String>> {
        match self.result.try_recv() {
            Ok(value) => Some(Ok(value)),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => None,
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                Some(Err("the job ended without a result".into()))
            }
        }
    }

    fn abort(&self) {
        self.handle.abort();
    }

    /// Waits until the task has ended (called off or not).
    async fn ended(self) {
        let _ = self.handle.await;
    }
}

/// An instance this node should run, with what it needs from the state.
#[derive(Clone)]
struct Desired {
    instance: Instance,
    group: GroupSpec,
    image: String,
    image_source: NodeId,
    env: BTreeMap<String, String>,
    secrets: BTreeMap<String, SealedSecret>,
    suspended: bool,
    deploying: bool,
}

impl Agent {
    pub fn new(
        engine: Engine,
        consensus: Arc<Consensus>,
        secrets: Arc<dyn SecretOpener>,
        fetcher: Arc<dyn ImageFetcher>,
        network: watch::Receiver<NetworkStatus>,
    ) -> Self {
        let node = consensus.id();
        let wake = Arc::new(Notify::new());
        Self {
            worker: Worker { engine, consensus, secrets, fetcher, node, wake },
            jobs: Jobs::default(),
            tracked: HashMap::new(),
            last_collect: None,
            create_retry: HashMap::new(),
            collected_for: None,
            network,
            reason_reported: ReasonLimiter::default(),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut changes = self.worker.consensus.state().workload_changes();
        let mut network = self.network.clone();
        let wake = self.worker.wake.clone();
        // Not paced by its passes, which mostly wait on the engine: a
        // deploy waits on the agent's reaction.
        let pace = roost_raft::store::Pace::default();
        // A pass runs every PASS_EVERY whatever the state does (restarts,
        // health), and on what wakes it; one the state alone wakes is
        // skipped while the workload revision is the one last passed on
        // (tokens, an app created without a release).
        let mut tick = tokio::time::Instant::now() + PASS_EVERY;
        let mut passed_at: Option<u64> = None;
        let mut state_only = false;
        loop {
            let revision = self.worker.consensus.state().workload_revision();
            if !(state_only && passed_at == Some(revision)) {
                if let Err(error) = self.pass().await {
                    tracing::warn!(error = %error.chain(), "reconciling containers failed; retrying");
                }
                // Read before the pass: a change during it runs another.
                passed_at = Some(revision);
            }
            state_only = false;
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = pace.settled(&mut changes) => state_only = true,
                _ = network.changed() => {}
                () = wake.notified() => {}
                () = tokio::time::sleep_until(tick) => tick = tokio::time::Instant::now() + PASS_EVERY,
            }
        }
        self.jobs.abort_all().await;
    }

    async fn pass(&mut self) -> Result<(), crate::engine::EngineError> {
        let node = self.worker.node;
        let (cluster, desired) = self.worker.consensus.state().read(|state| {
            let cluster = state.cluster.as_ref().map(|c| c.id.clone());
            let desired: Vec<Desired> = state
                .instances
                .values()
                .filter(|i| i.node == Some(node))
                .filter_map(|i| {
                    let app = state.apps.get(&i.app)?;
                    let release = app.releases.get(&i.release)?;
                    Some(Desired {
                        instance: i.clone(),
                        group: release.spec.groups.get(&i.group)?.clone(),
                        image: release.spec.image.clone(),
                        image_source: release.spec.image_source,
                        env: release.spec.env.clone(),
                        secrets: release.secrets.clone(),
                        suspended: app.suspended,
                        deploying: release.status == ReleaseStatus::Deploying,
                    })
                })
                .collect();
            (cluster, desired)
        });
        let Some(cluster) = cluster else { return Ok(()) };
        self.jobs.reap_removals();
        let containers = self.worker.engine.containers(&cluster, Some(node)).await?;
        let network = self.network.borrow().clone();

        let wanted: HashMap<&str, &Desired> = desired.iter().map(|d| (d.instance.id.as_str(), d)).collect();
        let mut current: HashMap<String, Container> = HashMap::new();
        let listed: HashSet<String> = containers.iter().map(|c| c.id.clone()).collect();
        self.jobs.remove_retry.retain(|id, _| listed.contains(id));
        for container in containers {
            // A container a job is making or removing is the job's.
            if self.jobs.removing.contains_key(&container.id) || self.jobs.creating.contains_key(&container.instance) {
                continue;
            }
            // A running container off the node's instance network (made
            // before the mesh, or before the node's /24 changed) is replaced.
            let on_network = !container.running || network.up().is_none_or(|n| n.holds(container.ip.as_deref()));
            // The app must match too: labels of a container an app started
            // itself (a release command's) could name another app's instance.
            let keep = wanted.get(container.instance.as_str()).is_some_and(|d| {
                d.instance.app == container.app
                    && d.instance.release == container.release
                    && d.instance.generation == container.generation
            }) && on_network
                && !current.contains_key(&container.instance);
            if keep {
                current.insert(container.instance.clone(), container);
            } else {
                if self.tracked.get(&container.instance).is_some_and(|t| t.container == container.id) {
                    self.tracked.remove(&container.instance);
                }
                self.remove(container);
            }
        }
        // Instances no longer wanted, or wanted in another generation: their
        // creates are called off (a container one left behind is removed by
        // the next pass).
        self.jobs.creating.retain(|id, (generation, job)| {
            let current = wanted.get(id.as_str()).is_some_and(|d| d.instance.generation == *generation);
            if !current {
                job.abort();
            }
            current
        });
        self.tracked.retain(|id, _| wanted.contains_key(id.as_str()));
        self.create_retry.retain(|id, _| wanted.contains_key(id.as_str()));

        self.reason_reported.retain(|id| wanted.contains_key(id));
        let mut reports = Vec::new();
        for desired in &desired {
            let span = tracing::info_span!("instance", app = %desired.instance.app, instance = %desired.instance.id);
            let container = current.get(&desired.instance.id);
            let mut report = self.reconcile(&cluster, desired, container, &network).instrument(span).await;
            // The state keeps a bounded reason; compare like with like.
            report.reason = report.reason.map(|reason| truncated(&reason, MAX_REASON_BYTES));
            // A change of state or health goes out at once; of the reason
            // alone, at most every REASON_REPORT_EVERY.
            let reason_changed = desired.instance.reason != report.reason;
            if differs(&desired.instance, &report)
                || (reason_changed && self.reason_reported.admit(&desired.instance.id, Instant::now()))
            {
                reports.push(report);
            }
        }
        if !reports.is_empty() {
            let deadline = Instant::now() + Duration::from_secs(5);
            let command = Command::ReportInstances { node, reports };
            if let Err(error) = self.worker.consensus.propose(command, deadline).await {
                tracing::debug!(%error, "reporting instance states failed; the next pass retries");
            }
        }
        self.collect_images(&cluster).await;
        Ok(())
    }

    /// Starts stopping and removing `container`, unless that is under way
    /// or waiting to be tried again.
    fn remove(&mut self, container: Container) {
        let retry_later = self.jobs.remove_retry.get(&container.id).is_some_and(|(at, _, _)| *at > Instant::now());
        if self.jobs.removing.contains_key(&container.id) || retry_later {
            return;
        }
        let worker = self.worker.clone();
        let (id, instance) = (container.id.clone(), container.instance.clone());
        let span = tracing::info_span!("instance", app = %container.app, instance = %container.instance);
        let job = async move {
            tracing::info!(release = container.release, "removing container");
            let removed = match worker.engine.stop(&container.id).await {
                Ok(()) => worker.engine.remove(&container.id).await,
                Err(error) => Err(error),
            };
            removed.map_err(|e| e.chain())
        };
        let job = Job::spawn(self.worker.wake.clone(), job.instrument(span));
        self.jobs.removing.insert(id, (instance, job));
    }

    /// Brings one instance's container to what `desired` asks; returns what
    /// the node now observes of it.
    async fn reconcile(
        &mut self,
        cluster: &str,
        desired: &Desired,
        container: Option<&Container>,
        network: &NetworkStatus,
    ) -> InstanceReport {
        let id = desired.instance.id.clone();
        let mut report = InstanceReport {
            id: id.clone(),
            state: InstanceState::Starting,
            health: Health::Unknown,
            address: None,
            ip: None,
            reason: None,
            restarts: self.tracked.get(&id).map_or(desired.instance.restarts, |t| t.restarts),
            generation: Some(desired.instance.generation),
        };
        if desired.suspended {
            // Removed rather than stopped, so that resume starts a fresh
            // container instead of mistaking the stop for a crash.
            // A create called off may have made its container already: the
            // next pass, which lists it, removes it.
            if let Some((_, create)) = self.jobs.creating.remove(&id) {
                create.abort();
                return unchanged(&desired.instance);
            }
            if let Some(container) = container {
                tracing::info!("removing the container: the app is suspended");
                self.remove(container.clone());
            }
            // Stopped once the container is gone; until then it is what it
            // was (with the error, should removing it fail).
            if container.is_some() || self.jobs.stopping(&id) {
                let mut report = unchanged(&desired.instance);
                report.reason = container.and_then(|c| self.jobs.removal_error(&c.id)).or(report.reason);
                return report;
            }
            self.tracked.remove(&id);
            report.state = InstanceState::Stopped;
            report.reason = Some("the app is suspended".into());
            return report;
        }
        // A create under way: what the state says stands until it ends
        // (its image fetch reports its own progress).
        let created = match self.jobs.creating.get_mut(&id).map(|(_, job)| job.try_take()) {
            Some(None) => return unchanged(&desired.instance),
            Some(Some(created)) => {
                self.jobs.creating.remove(&id);
                Some(created)
            }
            None => None,
        };
        if let Some(created) = created {
            let created = created.unwrap_or_else(|ended| Err(format!("starting the container failed: {ended}")));
            match created {
                Ok(container) => {
                    self.create_retry.remove(&id);
                    let restarts = self.tracked.get(&id).map_or(0, |t| t.restarts);
                    self.tracked.insert(id, Tracked::new(container, restarts));
                    // The container is listed, probed and reported from the
                    // next pass: have it now, not at the periodic one.
                    self.worker.wake.notify_one();
                }
                Err(reason) => {
                    tracing::warn!(%reason, "could not start the instance");
                    let attempts = self.create_retry.get(&id).map_or(0, |(_, n)| *n);
                    self.create_retry.insert(id.clone(), (Instant::now() + backoff(attempts), attempts + 1));
                    report.reason = Some(reason);
                    // Failing to start a new release's instance fails its deploy.
                    if desired.deploying {
                        report.state = InstanceState::Failed;
                    }
                }
            }
            return report;
        }
        let Some(container) = container else {
            let network = match network {
                NetworkStatus::Up(network) => network,
                NetworkStatus::Pending => {
                    report.reason = Some("waiting for this node's instance network".into());
                    return report;
                }
                NetworkStatus::Failing(why) => {
                    report.reason = Some(format!("waiting for this node's instance network: {why}"));
                    return report;
                }
            };
            if self.jobs.stopping(&id) {
                report.reason = Some("waiting for the old container to stop".into());
                return report;
            }
            // After a failed create, wait (with backoff) before the next try,
            // and keep reporting the failure meanwhile.
            if let Some((at, _)) = self.create_retry.get(&id) {
                if *at > Instant::now() {
                    report.reason = desired.instance.reason.clone();
                    report.state = desired.instance.state;
                    return report;
                }
            }
            let worker = self.worker.clone();
            let (cluster, wanted, network) = (cluster.to_owned(), desired.clone(), network.clone());
            let job = async move { worker.create(&cluster, &wanted, &network).await };
            let generation = desired.instance.generation;
            let job = Job::spawn(self.worker.wake.clone(), job.in_current_span());
            self.jobs.creating.insert(id, (generation, job));
            // No container runs it now, whatever the state said.
            return report;
        };
        let tracked = self
            .tracked
            .entry(id.clone())
            .or_insert_with(|| Tracked::new(container.id.clone(), desired.instance.restarts));
        if tracked.container != container.id {
            tracked.container = container.id.clone();
            tracked.checker = None;
        }
        if container.running {
            if tracked.exit.take().is_some() {
                tracked.started = Instant::now();
            }
            let Some(ip) = container.ip.clone() else {
                report.reason = Some("the container has no IP address yet".into());
                return report;
            };
            let changed = self.worker.wake.clone();
            let checker = tracked
                .checker
                .get_or_insert_with(|| Checker::start(&ip, &desired.group.checks, tracked.started, changed));
            let (health, output) = checker.health();
            report.state = InstanceState::Running;
            report.health = health;
            report.reason = output;
            report.address = desired.group.internal_port.map(|port| format!("{ip}:{port}"));
            report.ip = ip.parse().ok();
            return report;
        }
        // The container exists but does not run: it exited (or never started).
        tracked.checker = None;
        if tracked.exit.is_none() {
            let exit = self.worker.engine.exit_info(&container.id).await.unwrap_or_default();
            let clean = exit.exit_code == 0 && !exit.oom_killed && exit.error.is_none();
            let text = if exit.oom_killed {
                format!("exited with code {} after running out of memory", exit.exit_code)
            } else if let Some(error) = exit.error {
                format!("could not run: {error}")
            } else {
                format!("exited with code {}", exit.exit_code)
            };
            let policy = desired.group.restart;
            let retries_left = policy.max_retries.is_none_or(|max| tracked.restarts < max);
            let restart = match policy.policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !clean && retries_left,
                RestartPolicy::Never => false,
            };
            tracing::info!(reason = %text, restart, "instance exited");
            tracked.exit = Some(text);
            tracked.gave_up = !restart;
            tracked.restart_at = restart.then(|| Instant::now() + backoff(tracked.restarts));
            // An instance of a release still deploying that exits fails the
            // deploy now rather than at its timeout.
            if desired.deploying && !clean {
                tracked.gave_up = true;
                tracked.restart_at = None;
            }
            if clean && !restart {
                report.state = InstanceState::Stopped;
                report.reason = tracked.exit.clone();
                return report;
            }
        }
        let reason = tracked.exit.clone().unwrap_or_default();
        if tracked.gave_up {
            report.state = if reason == "exited with code 0" { InstanceState::Stopped } else { InstanceState::Failed };
            report.reason = Some(reason);
            return report;
        }
        if tracked.restart_at.is_some_and(|at| at <= Instant::now()) {
            tracked.restarts += 1;
            report.restarts = tracked.restarts;
            tracing::info!(restarts = tracked.restarts, "restarting the instance");
            match self.worker.engine.start(&container.id).await {
                Ok(()) => {
                    // The next exit, however soon, is a new one to handle.
                    tracked.exit = None;
                    tracked.restart_at = None;
                    tracked.started = Instant::now();
                }
                Err(error) => {
                    tracing::warn!(error = %error.chain(), "restart failed");
                    tracked.restart_at = Some(Instant::now() + backoff(tracked.restarts));
                }
            }
        }
        report.state = InstanceState::Starting;
        report.reason = Some(format!("{reason}; restarting (restart {})", tracked.restarts + 1));
        report
    }
}

impl Worker {
    /// Creates and starts the instance's container; the error is the reason
    /// users see.
    async fn create(&self, cluster: &str, desired: &Desired, network: &InstanceNetwork) -> Result<String, String> {
        let instance = &desired.instance;
        self.ensure_image(&desired.image, desired.image_source, instance).await?;
        // Only what was built or uploaded through this cluster runs.
        let labels = self.engine.image_labels(&desired.image).await.map_err(|e| e.chain())?.unwrap_or_default();
        if labels.get(LABEL_CLUSTER).map(String::as_str) != Some(cluster) {
            return Err(format!(
                "image {} was not built or uploaded through this cluster; deploy it with `roost deploy`",
                desired.image
            ));
        }
        let mut env: BTreeMap<String, String> = desired.env.clone();
        env.extend(self.secrets.clone().open(instance, &desired.secrets).await?);
        env.insert("ROOST_APP_NAME".into(), instance.app.clone());
        env.insert("ROOST_INSTANCE_ID".into(), instance.id.clone());
        env.insert("ROOST_PROCESS_GROUP".into(), instance.group.clone());
        env.insert("ROOST_RELEASE".into(), instance.release.to_string());
        if let Some(port) = desired.group.internal_port {
            env.entry("PORT".into()).or_insert_with(|| port.to_string());
        }
        let labels = HashMap::from([
            (LABEL_CLUSTER.to_owned(), cluster.to_owned()),
            (LABEL_NODE.to_owned(), self.node.to_string()),
            (LABEL_APP.to_owned(), instance.app.clone()),
            (LABEL_RELEASE.to_owned(), instance.release.to_string()),
            (LABEL_INSTANCE.to_owned(), instance.id.clone()),
            (LABEL_GROUP.to_owned(), instance.group.clone()),
            (LABEL_GENERATION.to_owned(), instance.generation.to_string()),
        ]);
        let spec = ContainerSpec {
            name: container_name(cluster, &instance.app, &instance.id),
            image: desired.image.clone(),
            command: desired.group.command.clone(),
            env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
            labels,
            cpu_millis: desired.group.resources.cpu_millis,
            memory_bytes: desired.group.resources.memory_bytes,
            network: Some(network.attach()),
            stop_timeout_seconds: desired.group.kill_timeout_seconds,
        };
        tracing::info!(release = instance.release, image = %desired.image, "starting container");
        // A container left by a crash between create and the state update
        // carries the same name; clear it first.
        let _ = self.engine.remove(&spec.name).await;
        self.engine.run(&spec).await.map_err(|e| e.chain())
    }

    async fn ensure_image(&self, image: &str, source: NodeId, instance: &Instance) -> Result<(), String> {
        match self.engine.image_id(image).await {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => {}
            Err(error) => return Err(error.chain()),
        }
        // The node that built the image first, then any node that runs an
        // instance of the same release (and so has it too).
        let (mut peers, names): (Vec<NodeId>, BTreeMap<NodeId, String>) = self.consensus.state().read(|s| {
            let peers = s
                .instances
                .values()
                .filter(|i| i.app == instance.app && i.release == instance.release && i.state == InstanceState::Running)
                .filter_map(|i| i.node)
                .collect();
            (peers, s.nodes.values().map(|n| (n.id, n.name.clone())).collect())
        });
        peers.insert(0, source);
        peers.retain(|n| *n != self.node);
        peers.dedup();
        if peers.is_empty() {
            return Err(format!("image {image} is on no node any more; deploy again"));
        }
        let name = |id: NodeId| names.get(&id).cloned().unwrap_or_else(|| id.to_string());
        // Say so now: a large image takes a while, and `roost deploy` shows it.
        let fetching = format!("fetching the image from {}", name(peers[0]));
        if instance.reason.as_deref() != Some(fetching.as_str()) {
            let report = InstanceReport {
                id: instance.id.clone(),
                state: InstanceState::Starting,
                health: Health::Unknown,
                address: None,
                ip: None,
                reason: Some(fetching),
                restarts: instance.restarts,
                generation: Some(instance.generation),
            };
            let deadline = Instant::now() + Duration::from_secs(2);
            let command = Command::ReportInstances { node: self.node, reports: vec![report] };
            let _ = self.consensus.propose(command, deadline).await;
        }
        let mut failures = Vec::new();
        for peer in peers {
            tracing::info!(%image, from = %name(peer), "fetching the image from a peer");
            let started = Instant::now();
            let fetched = async {
                let stream = self.fetcher.fetch(image.to_owned(), peer).await?;
                self.engine.import_image(stream).await.map_err(|e| e.chain())?;
                match self.engine.image_id(image).await {
                    Ok(Some(_)) => Ok(()),
                    _ => Err(format!("{} sent an image, but not {image}", name(peer))),
                }
            }
            .await;
            match fetched {
                Ok(()) => {
                    tracing::info!(%image, elapsed = ?started.elapsed(), "image fetched");
                    return Ok(());
                }
                Err(error) => failures.push(error),
            }
        }
        Err(format!("could not fetch image {image}: {}", failures.join("; ")))
    }
}

impl Agent {
    /// Removes this cluster's images that no recent release uses: at once
    /// when their app was destroyed after they were made, otherwise once
    /// they are older than [`UNUSED_IMAGE_AGE`] (a new build is not yet in
    /// any release until its deploy is proposed). Runs when the set of images
    /// in use changes, and every [`COLLECT_IMAGES_EVERY`].
    async fn collect_images(&mut self, cluster: &str) {
        // A container still being removed holds its image: collect once the
        // removals have ended (each one's end wakes the agent for a pass).
        if !self.jobs.removing.is_empty() {
            return;
        }
        let (keep, destroyed): (HashSet<String>, BTreeMap<String, i64>) = self.worker.consensus.state().read(|state| {
            let keep = state
                .apps
                .values()
                .flat_map(|app| {
                    // What serves or deploys, and the newest releases a
                    // rollback may pick (failed ones are never picked).
                    let rollback_targets = app
                        .releases
                        .values()
                        .rev()
                        .filter(|r| r.status == ReleaseStatus::Superseded)
                        .take(KEEP_RELEASE_IMAGES);
                    app.releases
                        .values()
                        .filter(|r| matches!(r.status, ReleaseStatus::Active | ReleaseStatus::Deploying))
                        .chain(rollback_targets)
                        .map(|r| r.spec.image.clone())
                })
                .collect();
            (keep, state.destroyed_apps.clone())
        });
        let due = self.last_collect.is_none_or(|at| at.elapsed() >= COLLECT_IMAGES_EVERY);
        if !due && self.collected_for.as_ref() == Some(&(keep.clone(), destroyed.len())) {
            return;
        }
        self.last_collect = Some(Instant::now());
        self.collected_for = Some((keep.clone(), destroyed.len()));
        let now = now_millis();
        match self.worker.engine.cluster_images(cluster).await {
            Ok(images) => {
                for image in images.into_iter().filter(|i| !keep.contains(&i.id)) {
                    let app_gone = destroyed.get(&image.app).is_some_and(|at| image.created_ms <= *at);
                    let old = now - image.created_ms > UNUSED_IMAGE_AGE.as_millis() as i64;
                    if !(app_gone || old) {
                        continue;
                    }
                    tracing::info!(image = %image.id, app = %image.app, "removing an image no release uses");
                    if let Err(error) = self.worker.engine.remove_image(&image.id).await {
                        tracing::debug!(error = %error.chain(), "image not removed");
                    }
                }
            }
            Err(error) => tracing::debug!(error = %error.chain(), "listing images failed"),
        }
    }
}

/// A report that says what the state already says: nothing to send.
fn unchanged(instance: &Instance) -> InstanceReport {
    InstanceReport {
        id: instance.id.clone(),
        state: instance.state,
        health: instance.health,
        address: instance.address.clone(),
        ip: instance.ip,
        reason: instance.reason.clone(),
        restarts: instance.restarts,
        generation: Some(instance.generation),
    }
}

/// Whether the state's record of an instance is out of date in substance
/// (anything but the text of its reason).
fn differs(instance: &Instance, report: &InstanceReport) -> bool {
    instance.state != report.state
        || instance.health != report.health
        || instance.address != report.address
        || instance.ip != report.ip
        || instance.restarts != report.restarts
        // A running instance's reason is its check's output, which changes as
        // the app likes: the caller rate-limits that.
        || (instance.reason.is_none() != report.reason.is_none())
        || (instance.reason != report.reason && report.state != InstanceState::Running)
}

fn backoff(restarts: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << restarts.min(10))).min(BACKOFF_MAX)
}

/// Unique per engine: the cluster id keeps test clusters on one engine apart.
pub fn container_name(cluster: &str, app: &str, instance: &str) -> String {
    let short: String = cluster.chars().filter(char::is_ascii_alphanumeric).take(8).collect();
    format!("roost-{short}-{app}-{instance}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_alone_is_reported_at_most_every_30_s_per_instance() {
        let mut limiter = ReasonLimiter::default();
        let start = Instant::now();
        assert!(limiter.admit("a", start), "the first change goes out");
        assert!(!limiter.admit("a", start + Duration::from_secs(29)), "not again within 30 s");
        assert!(limiter.admit("b", start + Duration::from_secs(1)), "another instance has its own limit");
        assert!(limiter.admit("a", start + REASON_REPORT_EVERY), "again after 30 s");
        assert!(!limiter.admit("a", start + Duration::from_secs(45)));
        limiter.retain(|id| id != "a");
        assert!(limiter.admit("a", start + Duration::from_secs(46)), "a forgotten instance starts afresh");
    }
}
