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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use ipnet::Ipv4Net;
use roost_raft::consensus::now_millis;
use roost_raft::workload::{
    truncated, GroupSpec, Health, Instance, InstanceReport, InstanceState, ReleaseStatus, RestartPolicy, SealedSecret,
    MAX_REASON_BYTES,
};
use roost_raft::{Command, Consensus, NodeId};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::checks::Checker;
use crate::engine::{
    AttachTo, Container, ContainerSpec, Engine, LABEL_APP, LABEL_CLUSTER, LABEL_GENERATION, LABEL_GROUP,
    LABEL_INSTANCE, LABEL_NODE, LABEL_RELEASE,
};
use crate::secrets::SecretsKey;

/// A `docker save` stream of an image, fetched from another node.
pub type ImageStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// Fetches images from other nodes; the node binary implements it over the
/// cluster's TLS transport.
pub trait ImageFetcher: Send + Sync {
    fn fetch(&self, image: String, from: NodeId) -> BoxFuture<'static, Result<ImageStream, String>>;
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

/// Seconds a container gets between SIGTERM and SIGKILL.
const STOP_GRACE_SECONDS: i32 = 5;
const PASS_EVERY: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Images of this many newest superseded releases per app stay, for rollbacks.
const KEEP_RELEASE_IMAGES: usize = 5;
const COLLECT_IMAGES_EVERY: Duration = Duration::from_secs(60);
/// An image no release uses is kept this long, in case a deploy is about to.
const UNUSED_IMAGE_AGE: Duration = Duration::from_secs(600);

pub struct Agent {
    engine: Engine,
    consensus: Arc<Consensus>,
    key: Arc<SecretsKey>,
    fetcher: Arc<dyn ImageFetcher>,
    node: NodeId,
    tracked: HashMap<String, Tracked>,
    last_collect: Option<Instant>,
    /// Instances whose container could not be created: when to try again,
    /// and how many tries failed.
    create_retry: HashMap<String, (Instant, u32)>,
    /// What the last image collection saw: images in use, destroyed apps.
    collected_for: Option<(HashSet<String>, usize)>,
    /// Health checkers ring this when a result changes.
    health_changed: Arc<Notify>,
    /// The node's instance network, once the mesh has made it.
    network: watch::Receiver<Option<InstanceNetwork>>,
    /// When each instance's reason alone was last reported (see
    /// [`REASON_REPORT_EVERY`]).
    reason_reported: HashMap<String, Instant>,
}

/// A change of an instance's reason alone (a check's output, which app code
/// writes) is reported at most this often, so an app cannot flood the Raft
/// log; a change of state or health is reported at once.
const REASON_REPORT_EVERY: Duration = Duration::from_secs(30);

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

/// An instance this node should run, with what it needs from the state.
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
        key: Arc<SecretsKey>,
        fetcher: Arc<dyn ImageFetcher>,
        network: watch::Receiver<Option<InstanceNetwork>>,
    ) -> Self {
        let node = consensus.id();
        Self {
            engine,
            consensus,
            key,
            fetcher,
            node,
            tracked: HashMap::new(),
            last_collect: None,
            create_retry: HashMap::new(),
            collected_for: None,
            health_changed: Arc::new(Notify::new()),
            network,
            reason_reported: HashMap::new(),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut changes = self.consensus.state().changes();
        let mut network = self.network.clone();
        loop {
            if let Err(error) = self.pass().await {
                tracing::warn!(error = %error.chain(), "reconciling containers failed; retrying");
            }
            let health_changed = self.health_changed.clone();
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = roost_raft::store::settled(&mut changes) => {}
                _ = network.changed() => {}
                () = health_changed.notified() => {}
                () = tokio::time::sleep(PASS_EVERY) => {}
            }
        }
    }

    async fn pass(&mut self) -> Result<(), crate::engine::EngineError> {
        let node = self.node;
        let (cluster, desired) = self.consensus.state().read(|state| {
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
        let containers = self.engine.containers(&cluster, Some(node)).await?;
        let network = self.network.borrow().clone();

        let wanted: HashMap<&str, &Desired> = desired.iter().map(|d| (d.instance.id.as_str(), d)).collect();
        let mut current: HashMap<String, Container> = HashMap::new();
        for container in containers {
            // A running container off the node's instance network (made
            // before the mesh, or before the node's /24 changed) is replaced.
            let on_network = !container.running || network.as_ref().is_none_or(|n| n.holds(container.ip.as_deref()));
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
                let span = tracing::info_span!("instance", app = %container.app, instance = %container.instance);
                let removed = async {
                    tracing::info!(release = container.release, "removing container");
                    self.engine.stop(&container.id, STOP_GRACE_SECONDS).await?;
                    self.engine.remove(&container.id).await
                }
                .instrument(span)
                .await;
                // One stuck container must not stop the node reconciling the rest.
                if let Err(error) = removed {
                    tracing::warn!(error = %error.chain(), instance = %container.instance, "could not remove a container; retrying");
                    continue;
                }
                if self.tracked.get(&container.instance).is_some_and(|t| t.container == container.id) {
                    self.tracked.remove(&container.instance);
                }
            }
        }
        self.tracked.retain(|id, _| wanted.contains_key(id.as_str()));
        self.create_retry.retain(|id, _| wanted.contains_key(id.as_str()));

        self.reason_reported.retain(|id, _| wanted.contains_key(id.as_str()));
        let mut reports = Vec::new();
        for desired in &desired {
            let span = tracing::info_span!("instance", app = %desired.instance.app, instance = %desired.instance.id);
            let container = current.get(&desired.instance.id);
            let mut report = self.reconcile(&cluster, desired, container, network.as_ref()).instrument(span).await;
            // The state keeps a bounded reason; compare like with like.
            report.reason = report.reason.map(|reason| truncated(&reason, MAX_REASON_BYTES));
            if differs(&desired.instance, &report) {
                reports.push(report);
            } else if desired.instance.reason != report.reason {
                let id = &desired.instance.id;
                if self.reason_reported.get(id).is_none_or(|at| at.elapsed() >= REASON_REPORT_EVERY) {
                    self.reason_reported.insert(id.clone(), Instant::now());
                    reports.push(report);
                }
            }
        }
        if !reports.is_empty() {
            let deadline = Instant::now() + Duration::from_secs(5);
            if let Err(error) = self.consensus.propose(Command::ReportInstances { node, reports }, deadline).await {
                tracing::debug!(%error, "reporting instance states failed; the next pass retries");
            }
        }
        self.collect_images(&cluster).await;
        Ok(())
    }

    /// Brings one instance's container to what `desired` asks; returns what
    /// the node now observes of it.
    async fn reconcile(
        &mut self,
        cluster: &str,
        desired: &Desired,
        container: Option<&Container>,
        network: Option<&InstanceNetwork>,
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
            if let Some(container) = container {
                tracing::info!("removing the container: the app is suspended");
                let removed = match self.engine.stop(&container.id, STOP_GRACE_SECONDS).await {
                    Ok(()) => self.engine.remove(&container.id).await,
                    Err(error) => Err(error),
                };
                if let Err(error) = removed {
                    report.reason = Some(error.chain());
                    return report;
                }
            }
            self.tracked.remove(&id);
            report.state = InstanceState::Stopped;
            report.reason = Some("the app is suspended".into());
            return report;
        }
        let Some(container) = container else {
            let Some(network) = network else {
                report.reason = Some("waiting for this node's instance network".into());
                return report;
            };
            // After a failed create, wait (with backoff) before the next try,
            // and keep reporting the failure meanwhile.
            if let Some((at, _)) = self.create_retry.get(&id) {
                if *at > Instant::now() {
                    report.reason = desired.instance.reason.clone();
                    report.state = desired.instance.state;
                    return report;
                }
            }
            match self.create(cluster, desired, network).await {
                Ok(container) => {
                    self.create_retry.remove(&id);
                    let restarts = self.tracked.get(&id).map_or(0, |t| t.restarts);
                    self.tracked.insert(id, Tracked::new(container, restarts));
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
            let changed = self.health_changed.clone();
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
            let exit = self.engine.exit_info(&container.id).await.unwrap_or_default();
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
            match self.engine.start(&container.id).await {
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
        for (name, sealed) in &desired.secrets {
            let value = self.key.open(&instance.app, name, sealed).map_err(|e| e.to_string())?;
            env.insert(name.clone(), value);
        }
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

    /// Removes this cluster's images that no recent release uses: at once
    /// when their app was destroyed after they were made, otherwise once
    /// they are older than [`UNUSED_IMAGE_AGE`] (a new build is not yet in
    /// any release until its deploy is proposed). Runs when the set of images
    /// in use changes, and every [`COLLECT_IMAGES_EVERY`].
    async fn collect_images(&mut self, cluster: &str) {
        let (keep, destroyed): (HashSet<String>, BTreeMap<String, i64>) = self.consensus.state().read(|state| {
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
        match self.engine.cluster_images(cluster).await {
            Ok(images) => {
                for image in images.into_iter().filter(|i| !keep.contains(&i.id)) {
                    let app_gone = destroyed.get(&image.app).is_some_and(|at| image.created_ms <= *at);
                    let old = now - image.created_ms > UNUSED_IMAGE_AGE.as_millis() as i64;
                    if !(app_gone || old) {
                        continue;
                    }
                    tracing::info!(image = %image.id, app = %image.app, "removing an image no release uses");
                    if let Err(error) = self.engine.remove_image(&image.id).await {
                        tracing::debug!(error = %error.chain(), "image not removed");
                    }
                }
            }
            Err(error) => tracing::debug!(error = %error.chain(), "listing images failed"),
        }
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
