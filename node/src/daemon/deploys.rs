//! The public API's workload calls: deploy, status, releases, rollback,
//! scale, secrets, suspend/resume/restart and logs.
//!
//! A deploy checks everything it can before it touches the cluster (the
//! roost.toml, the app's state, the image) and proposes one `Command::Deploy`
//! at the end, so a bad file, a failed build or a missing image leaves the
//! running release untouched. What follows (placing, starting, checking,
//! switching or rolling back) is the controller's and the agents' work; the
//! CLI follows it through `GetStatus`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use roost_deploy::agent::InstanceNetwork;
use roost_deploy::config::{is_env_name, AppConfig, Memory};
use roost_deploy::engine::{BuildEvent, ContainerSpec, ImageFacts, LABEL_APP, LABEL_CLUSTER};
use roost_deploy::spec::{release_spec, ImageChoice};
use roost_proto::api::{
    deploy_event, deploy_request, AppRequest, AppStatus, ChangeResponse, DeployEvent, DeployRequest, DeployStart,
    GetStatusRequest, Instance as WireInstance, ListReleasesRequest, ListReleasesResponse, ListSecretsResponse,
    LogLine, LogsRequest, Release as WireRelease, RollbackRequest, ScaleRequest, ScaleVmRequest, Secret as WireSecret,
    SetSecretsRequest, UnsetSecretsRequest,
};
use roost_proto::cluster::agent_client::AgentClient;
use roost_proto::cluster::InstanceLogsRequest;
use roost_raft::consensus::now_millis;
use roost_raft::state::State;
use roost_raft::workload::{Instance, Release, ReleaseSpec, Resources, Strategy};
use roost_raft::{Command, Rejection, Response};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::api::{rejection_status, ControlService};
use super::workloads::local_logs;

pub type DeployStream = Pin<Box<dyn Stream<Item = Result<DeployEvent, Status>> + Send>>;
pub type LogLineStream = Pin<Box<dyn Stream<Item = Result<LogLine, Status>> + Send>>;

/// The largest build context or uploaded image a deploy accepts unless the
/// node's `--max-upload` says otherwise.
pub const DEFAULT_MAX_UPLOAD: u64 = 2 << 30;
/// How long an upload may send nothing before the deploy gives up on it.
const UPLOAD_STALL: std::time::Duration = std::time::Duration::from_secs(60);
/// How long a build may print nothing before it is taken as stuck.
const BUILD_STALL: std::time::Duration = std::time::Duration::from_secs(20 * 60);

/// The next chunk of an upload: `None` at its end; an error when the client
/// sends nothing for [`UPLOAD_STALL`] or the upload passes `limit` bytes.
async fn next_chunk(
    inbound: &mut Streaming<DeployRequest>,
    received: &mut u64,
    limit: u64,
) -> Result<Option<Vec<u8>>, Status> {
    loop {
        let message = tokio::time::timeout(UPLOAD_STALL, inbound.message()).await.map_err(|_| {
            Status::deadline_exceeded(format!(
                "the upload stalled: nothing arrived for {} s after {} KiB",
                UPLOAD_STALL.as_secs(),
                *received / 1024
            ))
        })??;
        match message {
            None => return Ok(None),
            Some(DeployRequest { part: Some(deploy_request::Part::Chunk(data)) }) => {
                *received += data.len() as u64;
                if *received > limit {
                    return Err(Status::resource_exhausted(format!(
                        "the upload is over this node's limit of {}: add a .dockerignore to the build context, or slim the image (the limit is the node's --max-upload)",
                        roost_raft::workload::format_bytes(limit)
                    )));
                }
                return Ok(Some(data));
            }
            Some(_) => continue,
        }
    }
}

fn progress(text: impl Into<String>) -> Result<DeployEvent, Status> {
    Ok(DeployEvent { event: Some(deploy_event::Event::Progress(text.into())) })
}

fn parse_strategy(text: &str) -> Result<Option<Strategy>, Status> {
    Ok(Some(match text {
        "" => return Ok(None),
        "rolling" => Strategy::Rolling,
        "immediate" => Strategy::Immediate,
        "bluegreen" => Strategy::Bluegreen,
        "canary" => Strategy::Canary,
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown strategy '{other}': use rolling, immediate, bluegreen or canary"
            )))
        }
    }))
}

pub fn release_to_wire(release: &Release) -> WireRelease {
    WireRelease {
        version: release.version,
        status: release.status.to_string(),
        description: release.description.clone(),
        reason: release.reason.clone().unwrap_or_default(),
        image: release.spec.image_ref.clone(),
        strategy: release.spec.strategy.to_string(),
        created_at_ms: release.created_at,
    }
}

fn instance_to_wire(state: &State, instance: &Instance) -> WireInstance {
    WireInstance {
        id: instance.id.clone(),
        node: instance.node.and_then(|id| state.nodes.get(&id)).map(|n| n.name.clone()).unwrap_or_default(),
        process_group: instance.group.clone(),
        release: instance.release,
        state: instance.state.to_string(),
        health: instance.health.to_string(),
        address: instance.address.clone().unwrap_or_default(),
        reason: instance.reason.clone().unwrap_or_default(),
        restarts: instance.restarts,
        updated_at_ms: instance.updated_at,
        ip: instance.ip.map(|ip| ip.to_string()).unwrap_or_default(),
        displaced: instance.displaced,
    }
}

fn released(response: Response) -> ChangeResponse {
    match response {
        Response::ReleaseCreated { version } => ChangeResponse { release: Some(version) },
        _ => ChangeResponse { release: None },
    }
}

/// A deploy as checked before its body arrives.
struct DeployPlan {
    start: DeployStart,
    config: AppConfig,
    app: String,
    strategy: Option<Strategy>,
    /// The caller's token is confined to this app.
    confined: bool,
}

fn app_not_found(app: &str) -> Status {
    rejection_status(Rejection::AppNotFound { name: app.to_owned() })
}

impl ControlService {
    pub(super) async fn deploy_stream(
        &self,
        caller: super::auth::Principal,
        mut inbound: Streaming<DeployRequest>,
    ) -> Result<DeployStream, Status> {
        let start = match inbound.message().await? {
            Some(DeployRequest { part: Some(deploy_request::Part::Start(start)) }) => start,
            _ => return Err(Status::invalid_argument("a deploy must begin with its DeployStart message")),
        };
        let config = AppConfig::parse(&start.config)
            .map_err(|message| Status::invalid_argument(format!("roost.toml is not valid: {message}")))?;
        let problems = config.validate();
        if !problems.is_empty() {
            let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
            return Err(Status::invalid_argument(format!("roost.toml has problems:\n{}", list.join("\n"))));
        }
        let app = if start.app.is_empty() { config.app.clone() } else { start.app.clone() };
        if let Err(reason) = roost_raft::state::validate_name(&app) {
            return Err(rejection_status(Rejection::InvalidAppName { name: app, reason }));
        }
        caller.allow(roost_raft::state::Access::WriteApp(&app))?;
        // A token for one app may not take another app's image by name.
        let confined = caller.scope.app().is_some();
        let strategy = parse_strategy(&start.strategy)?;
        self.barrier(None).await?;
        let blocked = self.consensus.state().read(|s| {
            let a = s.apps.get(&app)?;
            if a.suspended {
                return Some(Rejection::AppSuspended { name: app.clone() });
            }
            a.deploying().map(|d| Rejection::DeployInProgress { app: app.clone(), version: d.version })
        });
        if let Some(rejection) = blocked {
            return Err(rejection_status(rejection));
        }

        let (events, receiver) = mpsc::channel(64);
        let this = self.clone();
        let span = tracing::info_span!("deploy", %app);
        let grant = super::auth::current_grant();
        tokio::spawn(
            async move {
                let request = DeployPlan { start, config, app, strategy, confined };
                let deploy = this.run_deploy(request, inbound, &events);
                let result = super::auth::with_grant(grant, deploy).await;
                if let Err(status) = &result {
                    tracing::warn!(error = %status.message(), "deploy refused");
                }
                let last = result.map(|version| DeployEvent { event: Some(deploy_event::Event::Release(version)) });
                let _ = events.send(last).await;
            }
            .instrument(span),
        );
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }

    /// Refuses, for a caller confined to `app`, an image that Roost made for
    /// another app, or one whose `ONBUILD` triggers read such an image
    /// (they run in the labelling build or in a build `FROM` it): a deploy
    /// token must not read another app's files.
    async fn own_image(&self, reference: &str, app: &str, confined: bool) -> Result<(), Status> {
        if !confined {
            return Ok(());
        }
        let Some(facts) = self.owned_by(reference, app).await? else { return Ok(()) };
        for trigger in &facts.onbuild {
            for read in roost_deploy::dockerfile::images_read(trigger, &HashMap::new()) {
                // Triggers of the images a trigger reads do not run.
                self.owned_by(&read, app).await?;
            }
        }
        Ok(())
    }

    /// The image's facts, once it is known not to be another app's. A
    /// reference must be plain (no variable, quote or escape this node would
    /// have to guess at), and one that names an image by its ID must name
    /// `app`'s own: intermediate images of another app's builds carry no
    /// label, and only an ID reaches them.
    async fn owned_by(&self, reference: &str, app: &str) -> Result<Option<ImageFacts>, Status> {
        let plain = |c: char| c.is_ascii_alphanumeric() || "._-:/@".contains(c);
        if reference.is_empty() || !reference.chars().all(plain) {
            return Err(Status::invalid_argument(format!(
                "the Dockerfile reads the image `{reference}`, which this node cannot resolve for certain (a variable, quotes or escapes); a token confined to {app} may build only from images named outright (or by ARGs with defaults or build args)"
            )));
        }
        let facts = self.engine.image_facts(reference).await.map_err(|e| Status::unavailable(e.chain()))?;
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        let by_id = hex.chars().all(|c| c.is_ascii_hexdigit());
        match facts.as_ref().map(|f| f.labels.get(LABEL_APP)) {
            Some(Some(owner)) if owner != app => Err(Status::permission_denied(format!(
                "the image {reference} belongs to another app; this token may deploy only {app}'s images or new ones"
            ))),
            Some(None) if by_id => Err(Status::permission_denied(format!(
                "the image {reference} is named by its ID and is not {app}'s; name a base image by its tag"
            ))),
            _ => Ok(facts),
        }
    }

    /// For a caller confined to `app`: refuses a build whose Dockerfile
    /// starts from or copies out of another app's image. `context` is the
    /// stored build context, read from its start; the caller rewinds it
    /// again for the build.
    async fn check_build_reads(
        &self,
        context: &mut tokio::fs::File,
        dockerfile: &str,
        args: &HashMap<String, String>,
        app: &str,
    ) -> Result<(), Status> {
        let unreadable = |e: std::io::Error| Status::internal(format!("could not read back the build context: {e}"));
        context.seek(std::io::SeekFrom::Start(0)).await.map_err(unreadable)?;
        let reader = context.try_clone().await.map_err(unreadable)?.into_std().await;
        let path = dockerfile.to_owned();
        let text = tokio::task::spawn_blocking(move || {
            roost_deploy::dockerfile::from_context(std::io::BufReader::new(reader), &path)
        })
        .await
        .map_err(|e| Status::internal(format!("reading the Dockerfile failed: {e}")))?
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        for reference in roost_deploy::dockerfile::images_read(&text, args) {
            self.own_image(&reference, app, true).await?;
        }
        Ok(())
    }

    async fn run_deploy(
        &self,
        plan: DeployPlan,
        mut inbound: Streaming<DeployRequest>,
        events: &mpsc::Sender<Result<DeployEvent, Status>>,
    ) -> Result<u64, Status> {
        let DeployPlan { start, config, app, strategy, confined } = plan;
        // A release command sees the app's secrets, which a worker cannot
        // open: say so before anything is uploaded or built.
        if config.deploy.release_command.is_some()
            && self.consensus.state().read(|s| s.apps.get(&app).is_some_and(|a| !a.secrets.is_empty()))
        {
            self.secrets_key()?;
        }
        let me = self.consensus.id();
        let cluster = self.consensus.state().read(|s| s.cluster.as_ref().map(|c| c.id.clone())).unwrap_or_default();
        let started = std::time::Instant::now();
        let labels = HashMap::from([(LABEL_CLUSTER.to_owned(), cluster.clone()), (LABEL_APP.to_owned(), app.clone())]);
        let (image_id, reference) = if start.image_upload {
            let _ = events.send(progress(format!("loading image {} into {}", start.image, self.node_name))).await;
            // Chunks go to the engine as they come, bounded and stall-timed.
            let limit = self.max_upload;
            let chunks = futures::stream::unfold((Some(inbound), 0u64), move |(inbound, mut received)| async move {
                let mut inbound = inbound?;
                match next_chunk(&mut inbound, &mut received, limit).await {
                    Ok(Some(data)) => Some((Ok(bytes::Bytes::from(data)), (Some(inbound), received))),
                    Ok(None) => None,
                    // The error ends the stream: the engine abandons the load.
                    Err(status) => Some((Err(std::io::Error::other(status.message().to_owned())), (None, received))),
                }
            });
            self.engine.import_image(chunks).await.map_err(|e| Status::internal(e.chain()))?;
            let id = self.engine.image_id(&start.image).await.map_err(|e| Status::internal(e.chain()))?;
            let id = id.ok_or_else(|| {
                Status::invalid_argument(format!("the uploaded image does not contain {}", start.image))
            })?;
            self.own_image(&start.image, &app, confined).await?;
            let tag = format!("roost-{app}:{}", now_millis());
            let adopted = self.engine.adopt(&id, &tag, &labels).await.map_err(|e| Status::internal(e.chain()))?;
            // The upload's own name, on an image without the cluster's
            // labels, would be another way in to this app's files.
            if adopted != id {
                if let Err(error) = self.engine.remove_image(&start.image).await {
                    tracing::debug!(error = %error.chain(), "the uploaded image's name was not removed");
                }
            }
            (adopted, start.image.clone())
        } else if !start.image.is_empty() {
            let id = self.engine.image_id(&start.image).await.map_err(|e| Status::unavailable(e.chain()))?;
            let id = id.ok_or_else(|| {
                let mut status = Status::not_found(format!(
                    "image {} is not in the Docker engine of {}; build it there, or let the CLI upload it from its own engine",
                    start.image, self.node_name
                ));
                status.metadata_mut().insert(roost_proto::IMAGE_MISSING, tonic::metadata::MetadataValue::from_static("1"));
                status
            })?;
            self.own_image(&start.image, &app, confined).await?;
            let tag = format!("roost-{app}:{}", now_millis());
            (self.engine.adopt(&id, &tag, &labels).await.map_err(|e| Status::internal(e.chain()))?, start.image.clone())
        } else {
            // The context goes to disk as it arrives (an anonymous temporary
            // file, gone when closed), not into memory.
            let mut file = tokio::fs::File::from_std(
                tempfile::tempfile().map_err(|e| Status::internal(format!("no room for the build context: {e}")))?,
            );
            let mut received = 0u64;
            while let Some(data) = next_chunk(&mut inbound, &mut received, self.max_upload).await? {
                file.write_all(&data)
                    .await
                    .map_err(|e| Status::internal(format!("could not store the build context: {e}")))?;
            }
            file.flush().await.map_err(|e| Status::internal(format!("could not store the build context: {e}")))?;
            let args: HashMap<String, String> = config.build.args.clone().into_iter().collect();
            let dockerfile = if start.dockerfile.is_empty() {
                config.build.dockerfile.clone().unwrap_or_else(|| "Dockerfile".into())
            } else {
                start.dockerfile.clone()
            };
            if confined {
                self.check_build_reads(&mut file, &dockerfile, &args, &app).await?;
            }
            file.seek(std::io::SeekFrom::Start(0))
                .await
                .map_err(|e| Status::internal(format!("could not read back the build context: {e}")))?;
            // One build at a time on a node: builds take all its CPU.
            let permit = match self.builds.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    let _ = events
                        .send(progress(format!("waiting for another build on {} to finish", self.node_name)))
                        .await;
                    self.builds
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| Status::unavailable("the node is stopping"))?
                }
            };
            let _ = events
                .send(progress(format!("building on {} ({} KiB of context)", self.node_name, received / 1024)))
                .await;
            let context = tokio_util::io::ReaderStream::new(file);
            let tag = format!("roost-{app}:{}", now_millis());
            let mut build = Box::pin(self.engine.build(context, &dockerfile, &tag, &labels, &args));
            let mut built = None;
            loop {
                let event = match tokio::time::timeout(BUILD_STALL, build.next()).await {
                    Ok(Some(event)) => event,
                    Ok(None) => break,
                    Err(_) => {
                        return Err(Status::deadline_exceeded(format!(
                            "the build printed nothing for {} minutes and was given up",
                            BUILD_STALL.as_secs() / 60
                        )))
                    }
                };
                match event {
                    Ok(BuildEvent::Output(line)) => {
                        let line = line.trim_end().to_owned();
                        if !line.is_empty() {
                            let _ = events
                                .send(Ok(DeployEvent { event: Some(deploy_event::Event::BuildOutput(line)) }))
                                .await;
                        }
                    }
                    Ok(BuildEvent::Built { image_id }) => built = Some(image_id),
                    Err(error) => return Err(Status::failed_precondition(error.chain())),
                }
            }
            let id = match built {
                Some(id) => id,
                None => self
                    .engine
                    .image_id(&tag)
                    .await
                    .map_err(|e| Status::internal(e.chain()))?
                    .ok_or_else(|| Status::internal("the build made no image"))?,
            };
            drop(permit);
            let _ = events.send(progress(format!("built {tag} in {:.1}s", started.elapsed().as_secs_f64()))).await;
            (id, tag)
        };
        // A CLI that went away (Ctrl-C) cancels the deploy before it changes anything.
        if events.is_closed() {
            return Err(Status::cancelled("the client went away; no release was made"));
        }
        let spec = release_spec(&config, ImageChoice { id: image_id, reference, source: me }, strategy);
        if let Some(command) = &config.deploy.release_command {
            self.release_command(&app, &cluster, &spec, command, &config, events).await?;
        }
        if events.is_closed() {
            return Err(Status::cancelled("the client went away; no release was made"));
        }
        let response = self.propose(Command::Deploy { app: app.clone(), spec, description: "deploy".into() }).await?;
        match response {
            Response::ReleaseCreated { version } => {
                tracing::info!(%app, release = version, "release created");
                Ok(version)
            }
            other => Err(Status::internal(format!("unexpected answer to a deploy: {other:?}"))),
        }
    }

    /// Runs `[deploy] release_command` once in the new image, with the app's
    /// environment and secrets, before the release is made; a failure stops
    /// the deploy with nothing changed.
    async fn release_command(
        &self,
        app: &str,
        cluster: &str,
        release: &ReleaseSpec,
        command: &str,
        config: &AppConfig,
        events: &mpsc::Sender<Result<DeployEvent, Status>>,
    ) -> Result<(), Status> {
        let _ = events.send(progress(format!("running the release command: {command}"))).await;
        let secrets = self.consensus.state().read(|s| s.apps.get(app).map(|a| a.secrets.clone())).unwrap_or_default();
        let mut env: BTreeMap<String, String> = config.env.clone();
        for (name, sealed) in &secrets {
            let value = self.secrets_key()?.open(app, name, sealed).map_err(|e| Status::internal(e.to_string()))?;
            env.insert(name.clone(), value);
        }
        env.insert("ROOST_APP_NAME".into(), app.to_owned());
        env.insert("ROOST_RELEASE_COMMAND".into(), "1".into());
        // The size and kill timeout of the release's first process group.
        let first = release.groups.values().next();
        let resources = first.map_or(roost_deploy::spec::DEFAULT_RESOURCES, |g| g.resources);
        let spec = ContainerSpec {
            name: format!("roost-release-{app}-{}", now_millis()),
            image: release.image.clone(),
            command: roost_deploy::config::split_command(command),
            env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
            labels: HashMap::from([
                (LABEL_CLUSTER.to_owned(), cluster.to_owned()),
                (LABEL_APP.to_owned(), app.to_owned()),
            ]),
            cpu_millis: resources.cpu_millis,
            memory_bytes: resources.memory_bytes,
            // On the mesh, like the app's instances, so it reaches `.internal` names.
            network: self.network.borrow().up().map(InstanceNetwork::attach),
            stop_timeout_seconds: first
                .map_or(roost_raft::workload::DEFAULT_KILL_TIMEOUT_SECONDS, |g| g.kill_timeout_seconds),
        };
        let (code, lines) =
            self.engine.run_to_completion(&spec).await.map_err(|e| Status::failed_precondition(e.chain()))?;
        for line in lines {
            let _ = events.send(Ok(DeployEvent { event: Some(deploy_event::Event::BuildOutput(line)) })).await;
        }
        if code != 0 {
            return Err(Status::failed_precondition(format!(
                "the release command `{command}` exited with code {code}; no release was made"
            )));
        }
        Ok(())
    }

    pub(super) async fn get_status(&self, request: GetStatusRequest) -> Result<AppStatus, Status> {
        self.barrier(request.read).await?;
        self.consensus.state().read(|s| {
            let app = s.apps.get(&request.app).ok_or_else(|| app_not_found(&request.app))?;
            let mut instances: Vec<&Instance> = s.instances.values().filter(|i| i.app == app.name).collect();
            instances.sort_by(|a, b| (&a.group, a.release, &a.id).cmp(&(&b.group, b.release, &b.id)));
            Ok(AppStatus {
                app: app.name.clone(),
                suspended: app.suspended,
                release: app.current().map(release_to_wire),
                deploying: app.deploying().map(release_to_wire),
                instances: instances.into_iter().map(|i| instance_to_wire(s, i)).collect(),
                scale: app.scale.clone().into_iter().collect(),
            })
        })
    }

    pub(super) async fn list_releases(&self, request: ListReleasesRequest) -> Result<ListReleasesResponse, Status> {
        self.barrier(request.read).await?;
        self.consensus.state().read(|s| {
            let app = s.apps.get(&request.app).ok_or_else(|| app_not_found(&request.app))?;
            Ok(ListReleasesResponse { releases: app.releases.values().rev().map(release_to_wire).collect() })
        })
    }

    pub(super) async fn rollback(&self, request: RollbackRequest) -> Result<ChangeResponse, Status> {
        let response = self.propose(Command::Rollback { app: request.app, version: request.version }).await?;
        Ok(released(response))
    }

    pub(super) async fn scale(&self, request: ScaleRequest) -> Result<ChangeResponse, Status> {
        let group = if request.process_group.is_empty() { "app".to_owned() } else { request.process_group };
        let response = self.propose(Command::Scale { app: request.app, group, count: request.count }).await?;
        Ok(released(response))
    }

    pub(super) async fn scale_vm(&self, request: ScaleVmRequest) -> Result<ChangeResponse, Status> {
        if !(request.cpus > 0.0 && request.cpus <= 256.0) {
            return Err(Status::invalid_argument(format!(
                "--cpus must be above 0 and at most 256, got {}",
                request.cpus
            )));
        }
        let memory = Memory::Text(request.memory.clone()).bytes().map_err(Status::invalid_argument)?;
        if memory < 16 << 20 {
            return Err(Status::invalid_argument("--memory must be at least 16mb"));
        }
        let resources = Resources { cpu_millis: (request.cpus * 1000.0).round() as u64, memory_bytes: memory };
        let group = (!request.process_group.is_empty()).then_some(request.process_group);
        let response = self.propose(Command::ScaleVm { app: request.app, group, resources }).await?;
        Ok(released(response))
    }

    pub(super) async fn set_secrets(&self, request: SetSecretsRequest) -> Result<ChangeResponse, Status> {
        if request.secrets.is_empty() {
            return Err(Status::invalid_argument("give at least one NAME=VALUE"));
        }
        let at = now_millis();
        let mut set = BTreeMap::new();
        for (name, value) in &request.secrets {
            if !is_env_name(name) {
                return Err(Status::invalid_argument(format!(
                    "'{name}' is not a valid secret name: use letters, digits and '_', not starting with a digit"
                )));
            }
            if value.len() > roost_raft::workload::MAX_SECRET_BYTES {
                return Err(Status::invalid_argument(format!(
                    "secret {name} is {} bytes; a secret value may be at most {} bytes (keep large files out of secrets)",
                    value.len(),
                    roost_raft::workload::MAX_SECRET_BYTES
                )));
            }
            let sealed =
                self.secrets_key()?.seal(&request.app, name, value, at).map_err(|e| Status::internal(e.to_string()))?;
            set.insert(name.clone(), sealed);
        }
        let names: Vec<&String> = request.secrets.keys().collect();
        let response = self
            .propose(Command::SetSecrets { app: request.app.clone(), set, unset: Vec::new(), stage: request.stage })
            .await?;
        tracing::info!(app = %request.app, ?names, "secrets set");
        Ok(released(response))
    }

    pub(super) async fn unset_secrets(&self, request: UnsetSecretsRequest) -> Result<ChangeResponse, Status> {
        if request.names.is_empty() {
            return Err(Status::invalid_argument("give at least one secret name"));
        }
        let response = self
            .propose(Command::SetSecrets {
                app: request.app.clone(),
                set: BTreeMap::new(),
                unset: request.names.clone(),
                stage: request.stage,
            })
            .await?;
        tracing::info!(app = %request.app, names = ?request.names, "secrets unset");
        Ok(released(response))
    }

    pub(super) async fn list_secrets(&self, request: AppRequest) -> Result<ListSecretsResponse, Status> {
        self.barrier(None).await?;
        self.consensus.state().read(|s| {
            let app = s.apps.get(&request.app).ok_or_else(|| app_not_found(&request.app))?;
            let secrets = app
                .secrets
                .iter()
                .map(|(name, sealed)| WireSecret {
                    name: name.clone(),
                    digest: sealed.digest.clone(),
                    updated_at_ms: sealed.updated_at,
                })
                .collect();
            Ok(ListSecretsResponse { secrets })
        })
    }

    pub(super) async fn change_app(&self, command: Command) -> Result<ChangeResponse, Status> {
        Ok(released(self.propose(command).await?))
    }

    /// Merges the logs of the app's instances on every node. With `follow`,
    /// instances that start later join the stream.
    pub(super) async fn logs(&self, request: LogsRequest) -> Result<LogLineStream, Status> {
        self.barrier(None).await?;
        let exists = self.consensus.state().read(|s| {
            let app = s.apps.contains_key(&request.app);
            let instance =
                request.instance.is_empty() || s.instances.get(&request.instance).is_some_and(|i| i.app == request.app);
            (app, instance)
        });
        match exists {
            (false, _) => return Err(app_not_found(&request.app)),
            (true, false) => {
                return Err(Status::not_found(format!(
                    "app '{}' has no instance '{}' (see `roost status -a {}`)",
                    request.app, request.instance, request.app
                )))
            }
            _ => {}
        }
        let (lines, receiver) = mpsc::channel(256);
        let this = self.clone();
        tokio::spawn(async move {
            let mut streaming: HashSet<String> = HashSet::new();
            let mut tasks = Vec::new();
            loop {
                let instances: Vec<(String, u64, String, String)> = this.consensus.state().read(|s| {
                    s.instances
                        .values()
                        .filter(|i| i.app == request.app && (request.instance.is_empty() || i.id == request.instance))
                        .filter_map(|i| {
                            let node = s.nodes.get(&i.node?)?;
                            Some((i.id.clone(), node.id, node.name.clone(), node.address.clone()))
                        })
                        .collect()
                });
                for (instance, node_id, node_name, address) in instances {
                    if !streaming.insert(format!("{instance}@{node_id}")) {
                        continue;
                    }
                    let request = InstanceLogsRequest {
                        app: request.app.clone(),
                        instance,
                        follow: request.follow,
                        lines: request.lines,
                        since: request.since,
                    };
                    let (this, lines) = (this.clone(), lines.clone());
                    tasks.push(tokio::spawn(async move {
                        let stream = if node_id == this.consensus.id() {
                            local_logs(&this.engine, &this.consensus, &request).await
                        } else {
                            match this.channels.get(&address) {
                                Ok(channel) => AgentClient::new(channel)
                                    .instance_logs(request)
                                    .await
                                    .map(|r| Box::pin(r.into_inner()) as super::workloads::LineStream),
                                Err(e) => Err(Status::unavailable(format!("cannot reach {node_name}: {e}"))),
                            }
                        };
                        let mut stream = match stream {
                            Ok(stream) => stream,
                            Err(status) => {
                                let _ = lines
                                    .send(Ok(LogLine {
                                        instance: String::new(),
                                        node: node_name.clone(),
                                        stream: "roost".into(),
                                        text: format!("logs of {node_name} unavailable: {}", status.message()),
                                    }))
                                    .await;
                                return;
                            }
                        };
                        while let Some(item) = stream.next().await {
                            let Ok(line) = item else { break };
                            let line = LogLine {
                                instance: line.instance,
                                node: node_name.clone(),
                                stream: line.stream,
                                text: line.text,
                            };
                            if lines.send(Ok(line)).await.is_err() {
                                return;
                            }
                        }
                    }));
                }
                if !request.follow {
                    for task in tasks.drain(..) {
                        let _ = task.await;
                    }
                    return;
                }
                tokio::select! {
                    () = lines.closed() => {
                        // The client went away: stop following every instance.
                        for task in &tasks {
                            task.abort();
                        }
                        return;
                    }
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }
}
