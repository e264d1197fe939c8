//! The node's side of running apps: the leader's controller loop, the
//! node-to-node Agent service (images and logs), and the fetcher the agent
//! uses to pull images from peers.
//!
//! The decisions themselves are `roost_deploy::controller::decide`, a pure
//! function; this module feeds it the state and the leader's liveness view,
//! and proposes what it returns.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt, TryStreamExt};
use roost_deploy::agent::{ImageFetcher, ImageStream};
use roost_deploy::controller::{decide, ControllerConfig, NodeView};
use roost_deploy::engine::{Engine, LogStream, LABEL_CLUSTER};
use roost_proto::cluster::agent_client::AgentClient;
use roost_proto::cluster::agent_server::Agent;
use roost_proto::cluster::{ImageChunk, InstanceLogLine, InstanceLogsRequest, PullImageRequest};
use roost_raft::consensus::now_millis;
use roost_raft::workload::Outcome;
use roost_raft::{Command, Consensus, NodeId, Response};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use roost_raft::store::Pace;

use super::channels::NodeChannels;
use super::liveness::Liveness;

const CONTROL_EVERY: Duration = Duration::from_millis(500);

/// On the leader, proposes what the workload controller decides; elsewhere,
/// waits.
pub async fn run_controller(
    consensus: Arc<Consensus>,
    liveness: Arc<Liveness>,
    config: ControllerConfig,
    shutdown: CancellationToken,
) {
    let mut changes = consensus.state().workload_changes();
    let mut pace = Pace::default();
    // Decisions also follow time (nodes going down, backoffs), so a pass
    // runs every CONTROL_EVERY whatever the state does; one a change wakes
    // is skipped while the workload revision is the one last decided on.
    let mut tick = Instant::now() + CONTROL_EVERY;
    let mut decided_at: Option<u64> = None;
    loop {
        let changed = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = pace.settled(&mut changes) => true,
            () = tokio::time::sleep_until(tick) => false,
        };
        if !changed {
            tick = Instant::now() + CONTROL_EVERY;
            decided_at = None;
        }
        let Some(term) = consensus.leading_term() else {
            decided_at = None;
            continue;
        };
        let now = Instant::now();
        let started = std::time::Instant::now();
        let decided = consensus.state().read_if_moved(&mut decided_at, |state| {
            let seen = liveness.view(term, super::liveness::members(state), now);
            let view = NodeView { down: seen.into_iter().filter(|(_, s)| !s.up).map(|(id, s)| (id, s.ago)).collect() };
            decide(state, &view, &config, now_millis())
        });
        let Some(commands) = decided else { continue };
        pace.passed(started);
        for command in commands {
            log_decision(&command);
            let deadline = Instant::now() + Duration::from_secs(5);
            match consensus.propose_as_leader(command, deadline).await {
                Ok(Response::Rejected(rejection)) => tracing::debug!(%rejection, "a decision no longer applied"),
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(%error, "proposing a decision failed; deciding again");
                    break;
                }
            }
        }
    }
}

fn log_decision(command: &Command) {
    match command {
        Command::FinishRelease { app, version, outcome: Outcome::Active } => {
            tracing::info!(%app, release = version, "release is live");
        }
        Command::FinishRelease { app, version, outcome: Outcome::Failed { reason } } => {
            tracing::warn!(%app, release = version, %reason, "deploy failed; rolled back");
        }
        Command::Reschedule { instances, reason } => {
            tracing::warn!(count = instances.len(), %reason, "moving instances to other nodes");
        }
        Command::Place { placements } => {
            tracing::debug!(count = placements.len(), "placing instances");
        }
        _ => {}
    }
}

/// The Agent service: what other nodes ask of this node's engine.
pub struct AgentService {
    pub engine: Engine,
    pub consensus: Arc<Consensus>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<ImageChunk, Status>> + Send>>;
pub type LineStream = Pin<Box<dyn Stream<Item = Result<InstanceLogLine, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    type PullImageStream = ChunkStream;
    type InstanceLogsStream = LineStream;

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<tonic::Response<Self::PullImageStream>, Status> {
        let image = request.into_inner().image;
        let cluster = self.consensus.state().read(|s| s.cluster.as_ref().map(|c| c.id.clone())).unwrap_or_default();
        match self.engine.image_labels(&image).await {
            Ok(Some(labels)) if labels.get(LABEL_CLUSTER) == Some(&cluster) => {}
            // Only images of this cluster leave the node.
            Ok(Some(_)) => return Err(Status::permission_denied(format!("image {image} is not this cluster's"))),
            Ok(None) => return Err(Status::not_found(format!("this node's engine has no image {image}"))),
            Err(error) => return Err(Status::unavailable(error.chain())),
        }
        tracing::info!(%image, "sending an image to a peer");
        let stream = self
            .engine
            .export_image(&image)
            .map_ok(|data| ImageChunk { data: data.to_vec() })
            .map_err(|error| Status::internal(error.chain()));
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn instance_logs(
        &self,
        request: Request<InstanceLogsRequest>,
    ) -> Result<tonic::Response<Self::InstanceLogsStream>, Status> {
        let request = request.into_inner();
        let stream = local_logs(&self.engine, &self.consensus, &request).await?;
        Ok(tonic::Response::new(stream))
    }
}

/// The output of the app's containers on this node (one instance when the
/// request names it), as lines.
pub async fn local_logs(
    engine: &Engine,
    consensus: &Consensus,
    request: &InstanceLogsRequest,
) -> Result<LineStream, Status> {
    let cluster = consensus.state().read(|s| s.cluster.as_ref().map(|c| c.id.clone())).unwrap_or_default();
    let containers =
        engine.containers(&cluster, Some(consensus.id())).await.map_err(|error| Status::unavailable(error.chain()))?;
    let streams: Vec<LineStream> = containers
        .into_iter()
        .filter(|c| c.app == request.app && (request.instance.is_empty() || c.instance == request.instance))
        .map(|c| {
            let instance = c.instance.clone();
            let lines = (request.lines > 0).then_some(request.lines);
            let since = (request.since > 0).then_some(request.since);
            let stream = engine.logs(&c.id, request.follow, lines, since).flat_map(move |item| {
                let lines: Vec<Result<InstanceLogLine, Status>> = match item {
                    Ok((kind, bytes)) => String::from_utf8_lossy(&bytes)
                        .lines()
                        .map(|text| {
                            Ok(InstanceLogLine {
                                instance: instance.clone(),
                                stream: match kind {
                                    LogStream::Stdout => "stdout".into(),
                                    LogStream::Stderr => "stderr".into(),
                                },
                                text: text.to_owned(),
                            })
                        })
                        .collect(),
                    Err(error) => vec![Err(Status::unavailable(error.chain()))],
                };
                futures::stream::iter(lines)
            });
            Box::pin(stream) as LineStream
        })
        .collect();
    Ok(Box::pin(futures::stream::select_all(streams)))
}

/// Fetches images from peers over the cluster's mutual-TLS channels.
pub struct PeerImages {
    pub consensus: Arc<Consensus>,
    pub channels: Arc<NodeChannels>,
}

impl ImageFetcher for PeerImages {
    fn fetch(&self, image: String, from: NodeId) -> futures::future::BoxFuture<'static, Result<ImageStream, String>> {
        let address = self.consensus.state().read(|s| s.nodes.get(&from).map(|n| (n.name.clone(), n.address.clone())));
        let channels = self.channels.clone();
        Box::pin(async move {
            let (name, address) = address.ok_or_else(|| format!("node {from}, which has the image, is gone"))?;
            let channel = channels.get(&address).map_err(|e| format!("cannot reach {name}: {e}"))?;
            let reply = AgentClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .pull_image(PullImageRequest { image })
                .await
                .map_err(|status| format!("{name} could not send the image: {}", status.message()))?;
            let stream: BoxStream<'static, Result<bytes::Bytes, std::io::Error>> = reply
                .into_inner()
                .map_ok(|chunk| bytes::Bytes::from(chunk.data))
                .map_err(|status| std::io::Error::other(status.message().to_owned()))
                .boxed();
            Ok(stream)
        })
    }
}
