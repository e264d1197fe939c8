//! openraft's outgoing RPCs over gRPC.
//!
//! Payloads are openraft's own serde types as JSON inside a
//! `RaftPayload`. The server answers `Result<Resp, RaftError>` as JSON, so a
//! remote Raft error reaches openraft as a `RemoteError`, while a transport
//! failure becomes `Unreachable` (openraft backs off) or `Network`.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use roost_proto::cluster::raft_client::RaftClient;
use roost_proto::cluster::RaftPayload;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use crate::consensus::{encoded_len, MAX_APPEND_BYTES};
use crate::store::StateReader;
use crate::{NodeId, RaftNode, TypeConfig};

/// Opens channels to peers; the node supplies one that speaks mutual TLS.
pub trait Channels: Send + Sync + 'static {
    fn channel(&self, address: &str) -> Result<Channel, String>;
}

#[derive(Clone)]
pub struct Network {
    channels: Arc<dyn Channels>,
    hints: Arc<ElectionHints>,
    state: StateReader,
}

impl Network {
    pub fn new(channels: Arc<dyn Channels>, hints: Arc<ElectionHints>, state: StateReader) -> Self {
        Self { channels, hints, state }
    }
}

/// Where node `id` serves Raft now: the address the replicated state records
/// (a node that moved says so with `Command::UpdateNode`), else the one
/// Raft's membership was given when the node joined.
pub fn current_address(state: &StateReader, id: NodeId, node: &RaftNode) -> String {
    state.read(|s| s.nodes.get(&id).map(|n| n.address.clone())).unwrap_or_else(|| node.address.clone())
}

/// What the election driver learns from vote replies.
///
/// openraft delays a node's next campaign when a voter refused it for having
/// a shorter log, so that the node with the longer log campaigns first. With
/// openraft's timer off, the driver needs the same signal; this is where it
/// comes from.
#[derive(Debug, Default)]
pub struct ElectionHints {
    greater_log_seen: AtomicBool,
}

impl ElectionHints {
    /// Whether a voter with a longer log refused us since the last call.
    pub fn take_greater_log_seen(&self) -> bool {
        self.greater_log_seen.swap(false, Ordering::SeqCst)
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &RaftNode) -> PeerConnection {
        PeerConnection {
            target,
            node: node.clone(),
            channels: self.channels.clone(),
            state: self.state.clone(),
            hints: self.hints.clone(),
        }
    }
}

/// openraft keeps one of these per peer for as long as it replicates to it,
/// so the peer's address is looked up on every call (channels are cached
/// per address): a peer that moves is followed at once.
pub struct PeerConnection {
    target: NodeId,
    node: RaftNode,
    channels: Arc<dyn Channels>,
    state: StateReader,
    hints: Arc<ElectionHints>,
}

#[derive(Debug)]
struct TransportError(String);

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TransportError {}

type RpcResult<T, E> = Result<T, RPCError<NodeId, RaftNode, E>>;

impl PeerConnection {
    async fn call<Req, Resp, E>(
        &mut self,
        kind: RpcKind,
        request: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, RaftError<NodeId, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let json = encode(request).map_err(RPCError::Network)?;
        self.send(kind, json, option).await
    }

    async fn send<Resp, E>(
        &mut self,
        kind: RpcKind,
        json: Vec<u8>,
        option: &RPCOption,
    ) -> RpcResult<Resp, RaftError<NodeId, E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let address = current_address(&self.state, self.target, &self.node);
        let mut client = match self.channels.channel(&address) {
            Ok(channel) => RaftClient::new(channel),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&TransportError(e)))),
        };
        let mut req = tonic::Request::new(RaftPayload { json });
        req.set_timeout(option.hard_ttl());
        let reply = match kind {
            RpcKind::AppendEntries => client.append_entries(req).await,
            RpcKind::Vote => client.vote(req).await,
            RpcKind::InstallSnapshot => client.install_snapshot(req).await,
        };
        let reply = reply.map_err(|status| {
            let error = TransportError(format!("{} ({}): {}", self.node, kind.name(), status.message()));
            match status.code() {
                tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&error)),
                _ => RPCError::Network(NetworkError::new(&error)),
            }
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&reply.into_inner().json).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e)))
    }
}

fn encode<T: Serialize>(request: &T) -> Result<Vec<u8>, NetworkError> {
    serde_json::to_vec(request).map_err(|e| NetworkError::new(&e))
}

/// How many entries, from the first, fit in [`MAX_APPEND_BYTES`] beside
/// `envelope` bytes of the rest of the message, given each entry's encoded
/// size and one byte for the comma after it: at least one, since a single
/// entry must be sent whatever its size, and fewer than all (the caller
/// found all too large), so that every retry sends fewer entries until one
/// is sent.
fn entries_that_fit(sizes: &[usize], envelope: usize) -> u64 {
    let mut bytes = envelope;
    let fit = sizes.iter().take_while(|size| {
        bytes += *size + 1;
        bytes <= MAX_APPEND_BYTES
    });
    fit.count().min(sizes.len().saturating_sub(1)).max(1) as u64
}

#[derive(Clone, Copy)]
enum RpcKind {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl RpcKind {
    fn name(self) -> &'static str {
        match self {
            RpcKind::AppendEntries => "append entries",
            RpcKind::Vote => "vote",
            RpcKind::InstallSnapshot => "install snapshot",
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        let json = encode(&rpc).map_err(RPCError::Network)?;
        if json.len() > MAX_APPEND_BYTES && rpc.entries.len() > 1 {
            // openraft sends the first `fit` entries at once and keeps the
            // hint for its next few messages.
            let sizes: Vec<usize> = rpc.entries.iter().map(encoded_len).collect();
            let envelope = json.len().saturating_sub(sizes.iter().map(|size| size + 1).sum());
            let fit = entries_that_fit(&sizes, envelope);
            tracing::debug!(
                target = self.target,
                bytes = json.len(),
                entries = rpc.entries.len(),
                fit,
                "splitting append entries"
            );
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fit)));
        }
        self.send(RpcKind::AppendEntries, json, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        self.call(RpcKind::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, RaftError<NodeId>> {
        let response: VoteResponse<NodeId> = self.call(RpcKind::Vote, &rpc, &option).await?;
        if !response.vote_granted && response.last_log_id > rpc.last_log_id {
            self.hints.greater_log_seen.store(true, Ordering::SeqCst);
        }
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_that_fit_stop_at_the_byte_budget_but_always_include_one() {
        let fit = |entries: &[String], envelope| {
            let sizes: Vec<usize> = entries.iter().map(encoded_len).collect();
            entries_that_fit(&sizes, envelope)
        };
        let third = "x".repeat(MAX_APPEND_BYTES / 3);
        // Three thirds encode to a little more than the budget (quotes).
        assert_eq!(fit(&[third.clone(), third.clone(), third.clone()], 0), 2);
        // The rest of the message counts too.
        assert_eq!(fit(&[third.clone(), third.clone(), third.clone()], MAX_APPEND_BYTES / 3), 1);
        let huge = "x".repeat(MAX_APPEND_BYTES * 2);
        assert_eq!(fit(&[huge.clone(), third.clone()], 0), 1);
        assert_eq!(fit(&[huge], 0), 1);
        // Called only when all were too large: never all, so each retry
        // sends fewer, down to one.
        let just_under = "x".repeat(MAX_APPEND_BYTES / 2 - 8);
        assert_eq!(fit(&[just_under.clone(), just_under], 0), 1);
        assert_eq!(fit(&vec!["small".to_owned(); 16], 0), 15);
    }
}
