//! The incoming side of node-to-node Raft traffic.
//!
//! Besides openraft's three RPCs, two calls let a follower serve clients
//! without knowing who leads: `Propose` (a write forwarded to the leader) and
//! `ReadIndex` (the leader confirms it still leads and names the index a
//! linearizable read must wait for). Authentication is the caller's concern:
//! the node wraps this service in an interceptor that requires a valid node
//! certificate and puts the node it belongs to in the request as [`Caller`].
//! This service then checks that a node speaks only for itself: an
//! AppendEntries, InstallSnapshot or Vote whose vote names another node than
//! the caller is refused, so one member's certificate cannot pose as the
//! leader or campaign in another's name; and none of the three is taken
//! from a worker (a node that joined with the worker token), so a worker
//! can neither campaign nor pose as a leader with a higher term. A member
//! that may vote is trusted with both: it could be elected anyway.
//!
//! A forwarded proposal (`Propose`) is written only if the caller may make
//! it: a node on its own authority only reports about itself
//! ([`Command::is_node_command`]); the leader's decisions are never
//! forwarded ([`Command::is_leader_decision`]); anything a user asked for
//! must carry their grant, which the node's [`Authorize`] checks.
//!
//! A snapshot arrives in chunks at offsets the sender chooses; a chunk must
//! start within what has been received of that snapshot (a resend) or right
//! after it, and the whole stays under [`MAX_SNAPSHOT_BYTES`], so no caller
//! makes this node allocate for bytes it never sent.

use std::sync::Arc;

use openraft::error::{CheckIsLeaderError, RaftError};
use roost_proto::cluster::raft_server;
use roost_proto::cluster::{RaftPayload, ReadIndexRequest, ReadIndexResponse};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Status};

use crate::command::{Command, Forward, Grant};
use crate::consensus::{Consensus, LocalWrite, MAX_MESSAGE_BYTES};
use crate::{NodeId, Raft};

/// Status message of a forwarded call that reached a node that no longer leads.
pub const NOT_LEADER: &str = "not the leader";

/// The metadata key that marks a refusal from a node that does not lead
/// ([`not_leader`]): nothing was done, so the caller may try the leader.
/// Callers test for it ([`is_not_leader`]), never for the message's text.
pub const NOT_LEADER_KEY: &str = "roost-not-leader";

/// The refusal of a call that only the leader serves, made by a node that
/// does not lead.
pub fn not_leader() -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(NOT_LEADER_KEY, tonic::metadata::MetadataValue::from_static("1"));
    Status::with_metadata(tonic::Code::FailedPrecondition, NOT_LEADER, metadata)
}

/// Whether a call was refused by [`not_leader`].
pub fn is_not_leader(status: &Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition && status.metadata().contains_key(NOT_LEADER_KEY)
}

/// The largest snapshot a node accepts (the state of a cluster is a few MiB).
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;

/// The node a call comes from, as its certificate says. `None`: the
/// certificate is the cluster's, but this node's state does not name its
/// owner yet (this node has just joined and is catching up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller(pub Option<NodeId>);

/// Checks a forwarded proposal, given the node that forwards it (`None`:
/// one the state does not name yet): the grant of one that a node may not
/// make on its own authority (see [`Command::is_node_command`]), and a
/// node's own report (with no grant) for what the state cannot check, such
/// as a certificate. The node supplies it, since what makes a token or a
/// certificate good is the node's business.
pub type Authorize = Arc<dyn Fn(&Command, Option<&Grant>, Option<NodeId>) -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
    consensus: Arc<Consensus>,
    authorize: Authorize,
    /// The snapshot being received: its id and how many bytes have come.
    receiving: Arc<std::sync::Mutex<Option<(String, u64)>>>,
}

impl RaftService {
    pub fn new(consensus: Arc<Consensus>, authorize: Authorize) -> Self {
        Self { raft: consensus.raft().clone(), consensus, authorize, receiving: Arc::default() }
    }

    /// Refuses a campaign or a leader's message from a worker
    /// ([`crate::state::NodeRole::Worker`]): a worker never votes or leads. The role is
    /// fixed at join, so, unlike Raft's membership, this node's view of it
    /// is never behind the caller's.
    fn refuse_worker<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(Caller(Some(caller))) = request.extensions().get::<Caller>() else {
            return Ok(());
        };
        if self.consensus.state().read(|s| s.is_worker(*caller)) {
            return Err(Status::permission_denied(format!(
                "node {caller} is a worker: workers never campaign or lead"
            )));
        }
        Ok(())
    }

    /// Serves AppendEntries on a Raft stream ([`crate::stream`]) until it
    /// closes or `stop` fires, each request checked as the gRPC call is, for
    /// the node `caller` names at that moment (a certificate revoked
    /// meanwhile is refused from then on).
    pub async fn serve_stream(
        self,
        io: impl crate::stream::RaftIo,
        caller: impl Fn() -> Result<Caller, Status>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<(), crate::stream::StreamError> {
        use raft_server::Raft as _;
        let serve = crate::stream::serve(io, |payload| {
            let caller = caller();
            let service = &self;
            async move {
                let mut request = Request::new(payload);
                request.extensions_mut().insert(caller?);
                service.append_entries(request).await.map(tonic::Response::into_inner)
            }
        });
        tokio::select! {
            () = stop.cancelled() => Ok(()),
            served = serve => served,
        }
    }

    pub fn into_server(self) -> raft_server::RaftServer<Self> {
        raft_server::RaftServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

fn decode<T: DeserializeOwned>(request: &Request<RaftPayload>) -> Result<T, Status> {
    serde_json::from_slice(&request.get_ref().json)
        .map_err(|e| Status::invalid_argument(format!("malformed Raft payload: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<tonic::Response<RaftPayload>, Status> {
    let json = serde_json::to_vec(value).map_err(|e| Status::internal(format!("could not encode reply: {e}")))?;
    Ok(tonic::Response::new(RaftPayload { json }))
}

/// Refuses a call in which the caller speaks for another node.
fn check_caller<T>(request: &Request<T>, claimed: Option<NodeId>) -> Result<(), Status> {
    match request.extensions().get::<Caller>() {
        Some(Caller(None)) => Ok(()),
        Some(Caller(Some(caller))) if claimed == Some(*caller) => Ok(()),
        Some(Caller(Some(caller))) => Err(Status::permission_denied(format!(
            "node {caller} sent a Raft message in the name of node {}",
            claimed.map_or_else(|| "none".to_owned(), |id| id.to_string())
        ))),
        None => Err(Status::unauthenticated("Raft calls need a member's certificate")),
    }
}

/// Checks a snapshot chunk against what has arrived of its snapshot, and
/// records it. Pure, so the bounds are unit-tested.
fn accept_chunk(receiving: &mut Option<(String, u64)>, snapshot_id: &str, offset: u64, len: u64) -> Result<(), String> {
    let received = match receiving {
        Some((id, received)) if id == snapshot_id => *received,
        _ => 0,
    };
    if offset > received {
        return Err(format!("snapshot chunk at offset {offset}, but only {received} bytes of it have arrived"));
    }
    let end = offset.saturating_add(len);
    if end > MAX_SNAPSHOT_BYTES {
        return Err(format!("snapshot larger than {MAX_SNAPSHOT_BYTES} bytes"));
    }
    *receiving = Some((snapshot_id.to_owned(), received.max(end)));
    Ok(())
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(&self, request: Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, Status> {
        let claimed: openraft::raft::AppendEntriesRequest<crate::TypeConfig> = decode(&request)?;
        check_caller(&request, claimed.vote.leader_id().voted_for())?;
        self.refuse_worker(&request)?;
        let result = self.raft.append_entries(claimed).await;
        encode(&result)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, Status> {
        let vote: openraft::raft::VoteRequest<NodeId> = decode(&request)?;
        check_caller(&request, vote.vote.leader_id().voted_for())?;
        self.refuse_worker(&request)?;
        let result = self.raft.vote(vote).await;
        encode(&result)
    }

    async fn install_snapshot(&self, request: Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, Status> {
        let chunk: openraft::raft::InstallSnapshotRequest<crate::TypeConfig> = decode(&request)?;
        check_caller(&request, chunk.vote.leader_id().voted_for())?;
        self.refuse_worker(&request)?;
        {
            let mut receiving = self.receiving.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            accept_chunk(&mut receiving, &chunk.meta.snapshot_id, chunk.offset, chunk.data.len() as u64)
                .map_err(Status::invalid_argument)?;
        }
        let result = self.raft.install_snapshot(chunk).await;
        encode(&result)
    }

    async fn propose(&self, request: Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, Status> {
        let forward: Forward = decode(&request)?;
        let caller = request.extensions().get::<Caller>().and_then(|c| c.0);
        let command = &forward.proposal.command;
        if command.is_leader_decision() {
            return Err(Status::permission_denied(format!(
                "{command} is the leader's own decision; no node may forward it"
            )));
        }
        // A node's own report needs no grant, but is checked too.
        let own = caller.is_some_and(|caller| command.is_node_command(caller));
        let grant = if own { None } else { forward.grant.as_ref() };
        {
            (self.authorize)(&forward.proposal.command, grant, caller).map_err(|reason| {
                Status::permission_denied(format!(
                    "node {} may not propose {} on its own authority: {reason}",
                    caller.map_or_else(|| "?".to_owned(), |id| id.to_string()),
                    forward.proposal.command
                ))
            })?;
        }
        match self.consensus.write_local(forward.proposal).await {
            LocalWrite::Done(response) => encode(&response),
            LocalWrite::NotLeader => Err(not_leader()),
            // Refused before writing: the forwarder says so, not "unconfirmed".
            LocalWrite::TooLarge { bytes } => {
                Err(Status::invalid_argument(crate::consensus::ConsensusError::TooLarge { bytes }.to_string()))
            }
            LocalWrite::Failed(e) => Err(Status::failed_precondition(e)),
            // Not Unavailable: the entry may already be in the log, so the
            // forwarder must not retry it elsewhere.
            LocalWrite::Stopped => Err(Status::aborted("raft stopped on this node")),
        }
    }

    async fn read_index(
        &self,
        _request: Request<ReadIndexRequest>,
    ) -> Result<tonic::Response<ReadIndexResponse>, Status> {
        match self.raft.ensure_linearizable().await {
            Ok(log_id) => Ok(tonic::Response::new(ReadIndexResponse {
                index: log_id.map(|id| id.index),
                term: log_id.map(|id| id.leader_id.term),
                leader_id: self.raft.metrics().borrow().id as NodeId,
            })),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => Err(not_leader()),
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                Err(Status::unavailable(format!("leader lost its quorum: {e}")))
            }
            Err(RaftError::Fatal(e)) => Err(Status::unavailable(format!("raft stopped on this node: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_not_leader_refusal_is_told_by_its_marker_on_the_wire_not_by_its_text() {
        // As the caller receives it: the status travels as HTTP headers.
        let received = |status: Status| {
            let response = status.into_http::<()>();
            Status::from_header_map(response.headers()).expect("a status in the headers")
        };
        assert!(is_not_leader(&received(not_leader())));
        // The same words without the marker are some other refusal.
        assert!(!is_not_leader(&received(Status::failed_precondition(NOT_LEADER))));
        let mut marked = tonic::metadata::MetadataMap::new();
        marked.insert(NOT_LEADER_KEY, tonic::metadata::MetadataValue::from_static("1"));
        assert!(!is_not_leader(&received(Status::with_metadata(tonic::Code::Internal, "boom", marked))));
    }

    #[test]
    fn a_snapshot_chunk_may_not_start_past_what_has_arrived() {
        let mut receiving = None;
        assert!(accept_chunk(&mut receiving, "s1", 0, 100).is_ok());
        assert!(accept_chunk(&mut receiving, "s1", 100, 100).is_ok(), "the next chunk");
        assert!(accept_chunk(&mut receiving, "s1", 50, 100).is_ok(), "a resend");
        let error = accept_chunk(&mut receiving, "s1", 1 << 29, 1).expect_err("a gap");
        assert!(error.contains("only 200 bytes"), "{error}");
        assert!(accept_chunk(&mut receiving, "s2", 10, 1).is_err(), "a new snapshot starts at 0");
        assert!(accept_chunk(&mut receiving, "s2", 0, MAX_SNAPSHOT_BYTES + 1).is_err(), "too large");
    }

    #[test]
    fn a_node_may_speak_only_for_itself() {
        let request = |caller: Option<Caller>| {
            let mut request = Request::new(());
            if let Some(caller) = caller {
                request.extensions_mut().insert(caller);
            }
            request
        };
        assert!(check_caller(&request(Some(Caller(Some(2)))), Some(2)).is_ok());
        let refused = check_caller(&request(Some(Caller(Some(2)))), Some(1)).expect_err("posing as node 1");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(check_caller(&request(Some(Caller(None))), Some(1)).is_ok(), "a node still catching up");
        assert!(check_caller(&request(None), Some(1)).is_err(), "no certificate checked");
    }
}
