//! The incoming side of node-to-node Raft traffic.
//!
//! Besides openraft's three RPCs, two calls let a follower serve clients
//! without knowing who leads: `Propose` (a write forwarded to the leader) and
//! `ReadIndex` (the leader confirms it still leads and names the index a
//! linearizable read must wait for). Authentication is the caller's concern:
//! the node wraps this service in an interceptor that requires a valid node
//! certificate.

use std::sync::Arc;

use openraft::error::{CheckIsLeaderError, RaftError};
use roost_proto::cluster::raft_server;
use roost_proto::cluster::{RaftPayload, ReadIndexRequest, ReadIndexResponse};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Status};

use crate::command::Proposal;
use crate::consensus::{Consensus, LocalWrite};
use crate::{NodeId, Raft};

/// Status message of a forwarded call that reached a node that no longer leads.
pub const NOT_LEADER: &str = "not the leader";

#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
    consensus: Arc<Consensus>,
}

impl RaftService {
    pub fn new(consensus: Arc<Consensus>) -> Self {
        Self { raft: consensus.raft().clone(), consensus }
    }

    pub fn into_server(self) -> raft_server::RaftServer<Self> {
        raft_server::RaftServer::new(self).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
    }
}

fn decode<T: DeserializeOwned>(request: Request<RaftPayload>) -> Result<T, Status> {
    serde_json::from_slice(&request.into_inner().json)
        .map_err(|e| Status::invalid_argument(format!("malformed Raft payload: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<tonic::Response<RaftPayload>, Status> {
    let json = serde_json::to_vec(value).map_err(|e| Status::internal(format!("could not encode reply: {e}")))?;
    Ok(tonic::Response::new(RaftPayload { json }))
}

fn not_leader() -> Status {
    Status::failed_precondition(NOT_LEADER)
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(&self, request: Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, Status> {
        let result = self.raft.append_entries(decode(request)?).await;
        encode(&result)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, Status> {
        let result = self.raft.vote(decode(request)?).await;
        encode(&result)
    }

    async fn install_snapshot(&self, request: Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, Status> {
        let result = self.raft.install_snapshot(decode(request)?).await;
        encode(&result)
    }

    async fn propose(&self, request: Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, Status> {
        let proposal: Proposal = decode(request)?;
        match self.consensus.write_local(proposal).await {
            LocalWrite::Done(response) => encode(&response),
            LocalWrite::NotLeader => Err(not_leader()),
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
