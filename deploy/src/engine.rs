//! The Docker engine, as Roost uses it: a thin layer over bollard.
//!
//! Everything Roost creates carries labels (`roost.cluster`, `roost.node`,
//! `roost.app`, `roost.release`, `roost.instance`, …) and every listing
//! filters on them, so several nodes, or several test clusters, can share one
//! engine without touching each other's containers. This module is the only
//! place that speaks bollard; the agent and the API see [`Engine`] and plain
//! values.

use std::collections::HashMap;

use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, HostConfig, Ipam, IpamConfig, NetworkCreateRequest,
};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptionsBuilder, ImportImageOptionsBuilder, ListContainersOptionsBuilder,
    ListImagesOptionsBuilder, ListNetworksOptions, ListNetworksOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
};
use bollard::{body_try_stream, Docker};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};

pub const LABEL_CLUSTER: &str = "roost.cluster";
pub const LABEL_NODE: &str = "roost.node";
pub const LABEL_APP: &str = "roost.app";
pub const LABEL_RELEASE: &str = "roost.release";
pub const LABEL_INSTANCE: &str = "roost.instance";
pub const LABEL_GROUP: &str = "roost.group";
pub const LABEL_GENERATION: &str = "roost.generation";

/// The most output lines of a release command that are kept (the last ones),
/// and the longest line.
pub const MAX_OUTPUT_LINES: usize = 1000;
pub const MAX_OUTPUT_LINE_BYTES: usize = 4096;

/// The most processes (and threads) one instance may have.
pub const PIDS_LIMIT: i64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot reach the Docker engine at {host}; is it running, and may this user use it?")]
    Unreachable {
        host: String,
        #[source]
        source: DockerError,
    },
    #[error("Docker could not {action}")]
    Docker {
        action: String,
        #[source]
        source: DockerError,
    },
    #[error("the image build failed: {message}")]
    Build { message: String },
    #[error("the build finished without naming the image it made")]
    NoImageId,
    #[error(
        "this node's instance network {subnet} overlaps Docker's network {other} ({other_subnet}) on this machine: \
         remove that network if it is left over (`docker network rm {other}`), or start the cluster with a \
         --mesh-range that avoids it"
    )]
    SubnetTaken { subnet: String, other: String, other_subnet: String },
}

impl EngineError {
    fn docker(action: impl Into<String>) -> impl FnOnce(DockerError) -> EngineError {
        let action = action.into();
        move |source| EngineError::Docker { action, source }
    }

    /// The error and its sources, as one line: what users read.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(error) = source {
            let next = error.to_string();
            // bollard repeats the engine's message in nested errors.
            if !text.ends_with(&next) {
                text.push_str(": ");
                text.push_str(next.trim());
            }
            source = error.source();
        }
        text
    }

    /// Whether Docker answered "no such …".
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            EngineError::Docker { source: DockerError::DockerResponseServerError { status_code: 404, .. }, .. }
        )
    }
}

/// A connection to one Docker engine.
#[derive(Clone, Debug)]
pub struct Engine {
    docker: Docker,
}

/// One line of a build's output, or its result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildEvent {
    Output(String),
    Built { image_id: String },
}

/// A tar archive of regular files.
fn tar_of(files: &[(&str, &[u8])]) -> std::io::Result<Vec<u8>> {
    let mut archive = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        archive.append_data(&mut header, name, *data)?;
    }
    archive.into_inner()
}

/// What a build that starts from an image takes from it besides files.
#[derive(Clone, Debug, Default)]
pub struct ImageFacts {
    pub labels: HashMap<String, String>,
    /// Instructions that run in any build `FROM` the image.
    pub onbuild: Vec<String>,
}

/// An image built for the cluster.
#[derive(Clone, Debug)]
pub struct ClusterImage {
    pub id: String,
    pub app: String,
    /// When it was made, in Unix milliseconds.
    pub created_ms: i64,
}

/// A container Roost made, as the engine lists it.
#[derive(Clone, Debug)]
pub struct Container {
    pub id: String,
    pub app: String,
    pub instance: String,
    pub release: u64,
    pub generation: u32,
    pub running: bool,
    /// Created or exited: it exists but does not run.
    pub stopped: bool,
    pub ip: Option<String>,
}

/// What a new container runs.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub labels: HashMap<String, String>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// The network to attach it to (and its resolver); `None`: Docker's default bridge.
    pub network: Option<AttachTo>,
    /// Seconds between SIGTERM and SIGKILL when it is stopped; the
    /// container keeps it, so a stop needs no spec.
    pub stop_timeout_seconds: u32,
}

/// A network a container joins, and the DNS server its resolver forwards to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachTo {
    pub network: String,
    pub dns: String,
}

/// A bridge network for one node's instances: a subnet Roost chose, a
/// gateway that is the node's own address on it, and no masquerading
/// (the mesh decides what is translated on the way out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeNetwork {
    pub name: String,
    /// The host interface Docker creates for it.
    pub bridge: String,
    pub subnet: String,
    pub gateway: String,
    pub mtu: u32,
    pub labels: HashMap<String, String>,
}

/// How a stopped container ended.
#[derive(Clone, Debug, Default)]
pub struct ExitInfo {
    pub exit_code: i64,
    pub oom_killed: bool,
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl Engine {
    /// Connects to `host` (a `unix://` path or `tcp://` address), or to the
    /// local engine's socket, and agrees on an API version with it.
    pub async fn connect(host: Option<&str>) -> Result<Engine, EngineError> {
        let shown = host.unwrap_or("unix:///var/run/docker.sock").to_owned();
        let unreachable = |source| EngineError::Unreachable { host: shown.clone(), source };
        let docker = match host {
            Some(host) => Docker::connect_with_host(host),
            None => Docker::connect_with_unix(&shown, 600, bollard::API_DEFAULT_VERSION),
        }
        .map_err(unreachable)?
        // Builds, image loads and release commands can take minutes before
        // the engine answers.
        .with_timeout(std::time::Duration::from_secs(600));
        let docker = docker.negotiate_version().await.map_err(unreachable)?;
        docker.ping().await.map_err(unreachable)?;
        Ok(Engine { docker })
    }

    /// Builds an image from a tar of the build context, streaming its output.
    pub fn build(
        &self,
        context: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
        dockerfile: &str,
        tag: &str,
        labels: &HashMap<String, String>,
        args: &HashMap<String, String>,
    ) -> impl Stream<Item = Result<BuildEvent, EngineError>> + '_ {
        let options = BuildImageOptionsBuilder::default()
            .dockerfile(dockerfile)
            .t(tag)
            .rm(true)
            .forcerm(true)
            .labels(labels)
            .buildargs(args)
            .build();
        let mut built = false;
        self.docker
            .build_image(options, None, Some(body_try_stream(context)))
            .map_err(|source| EngineError::Docker { action: "build the image".into(), source })
            .and_then(move |info| {
                let event = if let Some(detail) = info.error_detail {
                    Err(EngineError::Build { message: detail.message.unwrap_or_default().trim().to_owned() })
                } else if let Some(id) = info.aux.and_then(|aux| aux.id).filter(|_| !built) {
                    built = true;
                    Ok(BuildEvent::Built { image_id: id })
                } else {
                    Ok(BuildEvent::Output(info.stream.or(info.status).unwrap_or_default()))
                };
                futures::future::ready(event)
            })
    }

    /// The image's id when the engine has it.
    pub async fn image_id(&self, name: &str) -> Result<Option<String>, EngineError> {
        match self.docker.inspect_image(name).await {
            Ok(image) => Ok(image.id),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(source) => Err(EngineError::Docker { action: format!("inspect image {name}"), source }),
        }
    }

    /// The image's labels, when the engine has it.
    pub async fn image_labels(&self, name: &str) -> Result<Option<HashMap<String, String>>, EngineError> {
        Ok(self.image_facts(name).await?.map(|facts| facts.labels))
    }

    /// The image's labels and the `ONBUILD` triggers a build that starts
    /// from it runs, when the engine has it.
    pub async fn image_facts(&self, name: &str) -> Result<Option<ImageFacts>, EngineError> {
        match self.docker.inspect_image(name).await {
            Ok(image) => {
                let config = image.config.unwrap_or_default();
                Ok(Some(ImageFacts {
                    labels: config.labels.unwrap_or_default(),
                    onbuild: config.on_build.unwrap_or_default(),
                }))
            }
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(source) => Err(EngineError::Docker { action: format!("inspect image {name}"), source }),
        }
    }

    /// An image with `id`'s content that carries `labels`: `id` itself when
    /// it carries them already, else a new one with the same layers. So every
    /// image Roost runs or sends to a peer is marked as the cluster's,
    /// however it arrived.
    ///
    /// The new image is loaded as a `docker save` archive that holds only
    /// its manifest and config: an engine loads no layer it already has, so
    /// this takes tens of milliseconds. Where an engine will not (one that
    /// keeps images in containerd's store may want every layer), a build
    /// `FROM` the image with the labels makes it instead, in about two
    /// seconds (each of the classic builder's steps commits a container).
    pub async fn adopt(&self, id: &str, tag: &str, labels: &HashMap<String, String>) -> Result<String, EngineError> {
        let image = self.docker.inspect_image(id).await.map_err(EngineError::docker("inspect the image"))?;
        let current = image.config.as_ref().and_then(|c| c.labels.clone()).unwrap_or_default();
        if labels.iter().all(|(k, v)| current.get(k) == Some(v)) {
            return Ok(id.to_owned());
        }
        match self.relabel(&image, tag, labels).await {
            Ok(new) => return Ok(new),
            Err(error) => tracing::debug!(error = %error.chain(), "relabelling by load failed; building instead"),
        }
        let dockerfile = format!("FROM {id}\n");
        let context = tar_of(&[("Dockerfile", dockerfile.as_bytes())])
            .map_err(|e| EngineError::Build { message: format!("could not pack the labelling build: {e}") })?;
        let context = futures::stream::once(futures::future::ready(Ok(Bytes::from(context))));
        let mut events = Box::pin(self.build(context, "Dockerfile", tag, labels, &HashMap::new()));
        let mut built = None;
        while let Some(event) = events.next().await {
            if let BuildEvent::Built { image_id } = event? {
                built = Some(image_id);
            }
        }
        match built {
            Some(id) => Ok(id),
            None => self.image_id(tag).await?.ok_or(EngineError::NoImageId),
        }
    }

    /// Loads an image of `image`'s layers whose config adds `labels`, from
    /// an archive without layers, and checks that the engine made it.
    async fn relabel(
        &self,
        image: &bollard::models::ImageInspect,
        tag: &str,
        labels: &HashMap<String, String>,
    ) -> Result<String, EngineError> {
        let mut config = image.config.clone().unwrap_or_default();
        config.labels.get_or_insert_with(HashMap::new).extend(labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        let diff_ids = image.root_fs.as_ref().and_then(|r| r.layers.clone()).unwrap_or_default();
        let mut document = serde_json::json!({
            "architecture": image.architecture,
            "os": image.os,
            "created": image.created,
            "config": config,
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        if let Some(variant) = &image.variant {
            document["variant"] = serde_json::Value::from(variant.clone());
        }
        let config = serde_json::to_vec(&document).map_err(|e| EngineError::Build { message: e.to_string() })?;
        let digest: String =
            ring::digest::digest(&ring::digest::SHA256, &config).as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let layers: Vec<String> =
            diff_ids.iter().map(|d| format!("{}/layer.tar", d.trim_start_matches("sha256:"))).collect();
        let manifest = serde_json::json!([{ "Config": format!("{digest}.json"), "RepoTags": [tag], "Layers": layers }]);
        let manifest = serde_json::to_vec(&manifest).map_err(|e| EngineError::Build { message: e.to_string() })?;
        let archive = tar_of(&[("manifest.json", &manifest), (&format!("{digest}.json"), &config)])
            .map_err(|e| EngineError::Build { message: format!("could not pack the image's config: {e}") })?;
        self.import_image(futures::stream::once(futures::future::ready(Ok::<_, std::io::Error>(Bytes::from(archive)))))
            .await?;
        let expected = format!("sha256:{digest}");
        match self.image_id(tag).await? {
            Some(id) if id == expected => Ok(id),
            other => Err(EngineError::Build { message: format!("the engine loaded {other:?}, not {expected}") }),
        }
    }

    /// The image as a `docker save` tar stream.
    pub fn export_image(&self, id: &str) -> impl Stream<Item = Result<Bytes, EngineError>> {
        let action = format!("export image {id}");
        self.docker.export_image(id).map_err(move |source| EngineError::Docker { action: action.clone(), source })
    }

    /// Loads a `docker save` tar stream into the engine.
    pub async fn import_image<S, E>(&self, tar: S) -> Result<(), EngineError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        let options = ImportImageOptionsBuilder::default().quiet(true).build();
        let mut results = self.docker.import_image_stream(options, tar, None);
        while let Some(result) = results.next().await {
            let info = result.map_err(EngineError::docker("load the image"))?;
            if let Some(detail) = info.error_detail {
                return Err(EngineError::Build { message: detail.message.unwrap_or_default() });
            }
        }
        Ok(())
    }

    /// The images built for `cluster`.
    pub async fn cluster_images(&self, cluster: &str) -> Result<Vec<ClusterImage>, EngineError> {
        let filters = HashMap::from([("label", vec![format!("{LABEL_CLUSTER}={cluster}")])]);
        let options = ListImagesOptionsBuilder::default().filters(&filters).build();
        let images = self.docker.list_images(Some(options)).await.map_err(EngineError::docker("list images"))?;
        Ok(images
            .into_iter()
            .map(|image| ClusterImage {
                app: image.labels.get(LABEL_APP).cloned().unwrap_or_default(),
                created_ms: image.created.saturating_mul(1000),
                id: image.id,
            })
            .collect())
    }

    /// Removes an image unless a container still uses it.
    pub async fn remove_image(&self, id: &str) -> Result<(), EngineError> {
        let options = RemoveImageOptionsBuilder::default().force(false).build();
        match self.docker.remove_image(id, Some(options), None).await {
            Ok(_) | Err(DockerError::DockerResponseServerError { status_code: 404 | 409, .. }) => Ok(()),
            Err(source) => Err(EngineError::Docker { action: format!("remove image {id}"), source }),
        }
    }

    /// The containers of `cluster` that `node` owns, running or not.
    pub async fn containers(&self, cluster: &str, node: Option<u64>) -> Result<Vec<Container>, EngineError> {
        let mut labels = vec![format!("{LABEL_CLUSTER}={cluster}")];
        if let Some(node) = node {
            labels.push(format!("{LABEL_NODE}={node}"));
        }
        let filters = HashMap::from([("label", labels)]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        let summaries =
            self.docker.list_containers(Some(options)).await.map_err(EngineError::docker("list containers"))?;
        Ok(summaries
            .into_iter()
            .filter_map(|summary| {
                let labels = summary.labels.unwrap_or_default();
                let label = |key: &str| labels.get(key).cloned().unwrap_or_default();
                let state = summary.state.unwrap_or(ContainerSummaryStateEnum::EMPTY);
                let ip = summary
                    .network_settings
                    .and_then(|settings| settings.networks)
                    .and_then(|networks| networks.into_values().find_map(|n| n.ip_address))
                    .filter(|ip| !ip.is_empty());
                Some(Container {
                    id: summary.id?,
                    app: label(LABEL_APP),
                    instance: label(LABEL_INSTANCE),
                    release: label(LABEL_RELEASE).parse().unwrap_or(0),
                    generation: label(LABEL_GENERATION).parse().unwrap_or(0),
                    running: matches!(
                        state,
                        ContainerSummaryStateEnum::RUNNING | ContainerSummaryStateEnum::RESTARTING
                    ),
                    stopped: matches!(
                        state,
                        ContainerSummaryStateEnum::CREATED
                            | ContainerSummaryStateEnum::EXITED
                            | ContainerSummaryStateEnum::DEAD
                    ),
                    ip,
                })
            })
            .collect())
    }

    /// Creates `network` unless a network of that name with the same
    /// subnet exists. One with another subnet (the node's /24 changed) is
    /// removed first, which fails while containers still use it: the agent
    /// removes those, and the next call succeeds.
    pub async fn ensure_network(&self, network: &BridgeNetwork) -> Result<(), EngineError> {
        match self.docker.inspect_network(&network.name, None).await {
            Ok(existing) => {
                let subnets: Vec<String> = existing
                    .ipam
                    .and_then(|ipam| ipam.config)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|c| c.subnet)
                    .collect();
                if subnets == [network.subnet.clone()] {
                    return Ok(());
                }
                self.docker
                    .remove_network(&network.name)
                    .await
                    .map_err(EngineError::docker(format!("remove network {} to change its subnet", network.name)))?;
            }
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => {}
            Err(source) => {
                return Err(EngineError::Docker { action: format!("inspect network {}", network.name), source })
            }
        }
        let options = HashMap::from([
            ("com.docker.network.bridge.name".to_owned(), network.bridge.clone()),
            ("com.docker.network.bridge.enable_ip_masquerade".to_owned(), "false".to_owned()),
            ("com.docker.network.driver.mtu".to_owned(), network.mtu.to_string()),
        ]);
        let request = NetworkCreateRequest {
            name: network.name.clone(),
            driver: Some("bridge".into()),
            ipam: Some(Ipam {
                driver: Some("default".into()),
                config: Some(vec![IpamConfig {
                    subnet: Some(network.subnet.clone()),
                    gateway: Some(network.gateway.clone()),
                    ..Default::default()
                }]),
                options: None,
            }),
            options: Some(options),
            labels: Some(network.labels.clone()),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => Ok(()),
            // A network that overlaps is the usual cause, and one Docker
            // names only as "Pool overlaps": name it.
            Err(source) => Err(self.overlapping(&network.subnet).await.unwrap_or(EngineError::Docker {
                action: format!("create network {} ({})", network.name, network.subnet),
                source,
            })),
        }
    }

    /// The error naming a network of this engine whose subnet overlaps
    /// `subnet`, if there is one: Docker's own says only "Pool overlaps".
    async fn overlapping(&self, subnet: &str) -> Option<EngineError> {
        let wanted: ipnet::IpNet = subnet.parse().ok()?;
        let networks = self.docker.list_networks(None::<ListNetworksOptions>).await.ok()?;
        networks.into_iter().find_map(|other| {
            let name = other.name?;
            let taken = other.ipam?.config?.into_iter().filter_map(|c| c.subnet).find(|s| {
                s.parse::<ipnet::IpNet>()
                    .is_ok_and(|net| net.contains(&wanted.network()) || wanted.contains(&net.network()))
            })?;
            Some(EngineError::SubnetTaken { subnet: subnet.to_owned(), other: name, other_subnet: taken })
        })
    }

    /// Removes the networks labelled with `cluster` (and only those), and
    /// with `node` if given.
    pub async fn remove_networks(&self, cluster: &str, node: Option<u64>) -> Result<(), EngineError> {
        let mut labels = vec![format!("{LABEL_CLUSTER}={cluster}")];
        if let Some(node) = node {
            labels.push(format!("{LABEL_NODE}={node}"));
        }
        let filters = HashMap::from([("label", labels)]);
        let options = ListNetworksOptionsBuilder::default().filters(&filters).build();
        let networks = self.docker.list_networks(Some(options)).await.map_err(EngineError::docker("list networks"))?;
        for network in networks.into_iter().filter_map(|n| n.name) {
            match self.docker.remove_network(&network).await {
                Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => {}
                Err(source) => return Err(EngineError::Docker { action: format!("remove network {network}"), source }),
            }
        }
        Ok(())
    }

    /// Creates and starts a container; returns its id.
    pub async fn run(&self, spec: &ContainerSpec) -> Result<String, EngineError> {
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.clone()),
            stop_timeout: Some(i64::from(spec.stop_timeout_seconds)),
            host_config: Some(HostConfig {
                // PID 1 of a FROM scratch image ignores SIGTERM; docker-init forwards it.
                init: Some(true),
                memory: Some(spec.memory_bytes as i64),
                nano_cpus: Some(spec.cpu_millis as i64 * 1_000_000),
                // On a user-defined network the container's resolver is the
                // engine's, which forwards what it does not know here.
                network_mode: spec.network.as_ref().map(|n| n.network.clone()),
                dns: spec.network.as_ref().map(|n| vec![n.dns.clone()]),
                // Least privilege: no privilege gained through setuid
                // binaries, no raw sockets (spoofing on the mesh), a bound on
                // processes (a fork bomb stays in its instance). The user is
                // the image's own (`USER`), as Docker does by default.
                security_opt: Some(vec!["no-new-privileges:true".to_owned()]),
                cap_drop: Some(vec!["NET_RAW".to_owned()]),
                pids_limit: Some(PIDS_LIMIT),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(&spec.name).build();
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(EngineError::docker(format!("create container {}", spec.name)))?;
        self.start(&created.id).await?;
        Ok(created.id)
    }

    /// Runs a container to completion (a release command); returns its exit
    /// code and output lines, and removes it.
    pub async fn run_to_completion(&self, spec: &ContainerSpec) -> Result<(i64, Vec<String>), EngineError> {
        let id = match self.run(spec).await {
            Ok(id) => id,
            Err(error) => {
                // Created but not started: do not leave it behind.
                let _ = self.remove(&spec.name).await;
                return Err(error);
            }
        };
        let mut waits = self.docker.wait_container(&id, None::<bollard::query_parameters::WaitContainerOptions>);
        let code = match waits.next().await {
            Some(Ok(response)) => response.status_code,
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => code,
            Some(Err(source)) => {
                let _ = self.remove(&id).await;
                return Err(EngineError::Docker { action: format!("wait for container {}", spec.name), source });
            }
            // The engine ended the wait without a status: nothing says it succeeded.
            None => {
                let _ = self.remove(&id).await;
                return Err(EngineError::Build {
                    message: format!("the engine did not report how container {} exited", spec.name),
                });
            }
        };
        // The last lines only, each bounded: output is the app's to make.
        let mut lines = std::collections::VecDeque::new();
        let mut dropped = 0usize;
        let mut logs = Box::pin(self.logs(&id, false, None, None));
        while let Some(Ok((_, bytes))) = logs.next().await {
            for line in String::from_utf8_lossy(&bytes).lines() {
                if lines.len() == MAX_OUTPUT_LINES {
                    lines.pop_front();
                    dropped += 1;
                }
                lines.push_back(roost_raft::workload::truncated(line, MAX_OUTPUT_LINE_BYTES));
            }
        }
        self.remove(&id).await?;
        let mut lines: Vec<String> = lines.into();
        if dropped > 0 {
            lines.insert(0, format!("({dropped} earlier lines not shown)"));
        }
        Ok((code, lines))
    }

    pub async fn start(&self, id: &str) -> Result<(), EngineError> {
        self.docker.start_container(id, None).await.map_err(EngineError::docker(format!("start container {id}")))
    }

    /// Stops a container, giving it the time it was created with
    /// ([`ContainerSpec::stop_timeout_seconds`]) between SIGTERM and SIGKILL.
    pub async fn stop(&self, id: &str) -> Result<(), EngineError> {
        match self.docker.stop_container(id, None).await {
            // 304: already stopped.
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 304 | 404, .. }) => Ok(()),
            Err(source) => Err(EngineError::Docker { action: format!("stop container {id}"), source }),
        }
    }

    /// Removes a container, killing it if it still runs.
    pub async fn remove(&self, id: &str) -> Result<(), EngineError> {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(source) => Err(EngineError::Docker { action: format!("remove container {id}"), source }),
        }
    }

    pub async fn exit_info(&self, id: &str) -> Result<ExitInfo, EngineError> {
        let inspected = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(EngineError::docker(format!("inspect container {id}")))?;
        let state = inspected.state.unwrap_or_default();
        Ok(ExitInfo {
            exit_code: state.exit_code.unwrap_or(0),
            oom_killed: state.oom_killed.unwrap_or(false),
            error: state.error.filter(|e| !e.is_empty()),
        })
    }

    /// A container's output; `since` is a Unix time in seconds.
    pub fn logs(
        &self,
        id: &str,
        follow: bool,
        tail: Option<u32>,
        since: Option<i64>,
    ) -> impl Stream<Item = Result<(LogStream, Bytes), EngineError>> {
        let tail = tail.map_or_else(|| "all".to_owned(), |n| n.to_string());
        let mut options = LogsOptionsBuilder::default().follow(follow).stdout(true).stderr(true).tail(&tail);
        if let Some(since) = since {
            options = options.since(since.clamp(0, i32::MAX as i64) as i32);
        }
        let action = format!("read the logs of container {id}");
        self.docker.logs(id, Some(options.build())).filter_map(move |item| {
            let out = match item {
                Ok(bollard::container::LogOutput::StdErr { message }) => Some(Ok((LogStream::Stderr, message))),
                Ok(bollard::container::LogOutput::StdOut { message })
                | Ok(bollard::container::LogOutput::Console { message }) => Some(Ok((LogStream::Stdout, message))),
                Ok(bollard::container::LogOutput::StdIn { .. }) => None,
                Err(source) => Some(Err(EngineError::Docker { action: action.clone(), source })),
            };
            futures::future::ready(out)
        })
    }
}
