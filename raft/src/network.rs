//! openraft's outgoing RPCs over gRPC.
//!
//! Payloads are openraft's own serde types as JSON inside a
//! `RaftPayload`. The server answers `Result<Resp, RaftError>` as JSON, so a
//! remote Raft error reaches openraft as a `RemoteError`, while a transport
//! failure becomes `Unreachable` (openraft backs off) or `Network`.
//! AppendEntries goes on a Raft stream ([`crate::stream`]) where the
//! channels open them and the peer takes them, and on gRPC otherwise.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
use crate::stream::{RaftIo, StreamError};
use crate::{NodeId, RaftNode, TypeConfig};

/// A Raft stream being opened ([`Channels::connect_stream`]).
pub type StreamConnect = Pin<Box<dyn Future<Output = Result<Option<Box<dyn RaftIo>>, String>> + Send>>;

/// Opens channels to peers; the node supplies one that speaks mutual TLS.
pub trait Channels: Send + Sync + 'static {
    fn channel(&self, address: &str) -> Result<Channel, String>;

    /// Opens a Raft stream ([`crate::stream`]) to `address`, which answers
    /// `Ok(None)` if the peer takes gRPC only; `None`: these channels open
    /// no streams, so AppendEntries goes on gRPC.
    fn connect_stream(&self, _address: &str) -> Option<StreamConnect> {
        None
    }

    /// Moves on whenever connections opened before must not be used for new
    /// calls (this node presents a new certificate): open streams are
    /// dropped for new ones, as channels are.
    fn generation(&self) -> u64 {
        0
    }
}

/// How long a peer that took gRPC only gets it before a stream is tried
/// again (it may have been upgraded).
const GRPC_ONLY_FOR: Duration = Duration::from_secs(60);

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
            stream: None,
            connecting: None,
            grpc_until: None,
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
    /// The Raft stream AppendEntries goes on, once open.
    stream: Option<OpenStream>,
    /// The Raft stream being opened, past the deadline of the call that
    /// started it, as a gRPC channel goes on connecting: a handshake slower
    /// than one call's deadline is not started over at each call.
    connecting: Option<Connecting>,
    /// Until when AppendEntries goes on gRPC: the peer took no stream.
    grpc_until: Option<Instant>,
}

struct OpenStream {
    address: String,
    generation: u64,
    io: Box<dyn RaftIo>,
}

struct Connecting {
    address: String,
    generation: u64,
    task: tokio::task::JoinHandle<Result<Option<Box<dyn RaftIo>>, String>>,
}

impl Drop for Connecting {
    fn drop(&mut self) {
        self.task.abort();
    }
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
        let reply = reply.map_err(|status| self.refused(kind, &status))?;
        self.answer(&reply.into_inner().json)
    }

    /// A call's refusal, or a transport failure tonic reported as a status.
    fn refused<E: std::error::Error>(&self, kind: RpcKind, status: &tonic::Status) -> RPCError<NodeId, RaftNode, E> {
        let error = TransportError(format!("{} ({}): {}", self.node, kind.name(), status.message()));
        match status.code() {
            tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&error)),
            _ => RPCError::Network(NetworkError::new(&error)),
        }
    }

    /// What the peer's Raft answered.
    // The error is openraft's, returned as the `RaftNetwork` calls return it.
    #[allow(clippy::result_large_err)]
    fn answer<Resp, E>(&self, json: &[u8]) -> RpcResult<Resp, RaftError<NodeId, E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(json).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e)))
    }

    /// Sends an AppendEntries on the peer's Raft stream, opening it first if
    /// need be; `None` if it must go on gRPC instead. A stream that failed
    /// or timed out is dropped (an answer may still be on its way), and the
    /// next call opens another.
    async fn stream_call(
        &mut self,
        json: &[u8],
        option: &RPCOption,
    ) -> Option<RpcResult<AppendEntriesResponse<NodeId>, RaftError<NodeId>>> {
        if self.grpc_until.is_some_and(|until| Instant::now() < until) {
            return None;
        }
        let deadline = tokio::time::Instant::now() + option.hard_ttl();
        let address = current_address(&self.state, self.target, &self.node);
        let generation = self.channels.generation();
        let mut open = match self.stream.take() {
            Some(open) if open.address == address && open.generation == generation => open,
            _ => {
                // One still being opened to the same place is waited for
                // again; one to another place (or certificate) is dropped.
                let mut connecting = match self.connecting.take() {
                    Some(connecting) if connecting.address == address && connecting.generation == generation => {
                        connecting
                    }
                    _ => {
                        let task = tokio::spawn(self.channels.connect_stream(&address)?);
                        Connecting { address: address.clone(), generation, task }
                    }
                };
                match tokio::time::timeout_at(deadline, &mut connecting.task).await {
                    Err(_) => {
                        self.connecting = Some(connecting);
                        return Some(Err(self.stream_failed("still connecting", true)));
                    }
                    Ok(Err(failed)) => return Some(Err(self.stream_failed(failed, true))),
                    Ok(Ok(Err(reason))) => return Some(Err(self.stream_failed(reason, true))),
                    Ok(Ok(Ok(None))) => {
                        tracing::debug!(target = self.target, %address, "the peer takes no Raft stream; using gRPC");
                        self.grpc_until = Some(Instant::now() + GRPC_ONLY_FOR);
                        return None;
                    }
                    Ok(Ok(Ok(Some(io)))) => OpenStream { address, generation, io },
                }
            }
        };
        let reply = match tokio::time::timeout_at(deadline, crate::stream::call(&mut open.io, json)).await {
            Ok(Ok(reply)) => reply,
            // Refused after it was read in full: the stream is still good.
            Ok(Err(StreamError::Refused(status))) => {
                self.stream = Some(open);
                return Some(Err(self.refused(RpcKind::AppendEntries, &status)));
            }
            // A broken connection, as gRPC reports one (`Unavailable`).
            Ok(Err(error @ StreamError::Io(_))) => return Some(Err(self.stream_failed(error, true))),
            Ok(Err(error)) => return Some(Err(self.stream_failed(error, false))),
            Err(_) => return Some(Err(self.stream_failed("timed out", false))),
        };
        self.stream = Some(open);
        Some(self.answer(&reply))
    }

    /// A Raft stream that could not be opened or used: `Unreachable` (openraft
    /// backs off) when the peer cannot be reached, else `Network`.
    fn stream_failed<E: std::error::Error>(
        &self,
        reason: impl fmt::Display,
        unreachable: bool,
    ) -> RPCError<NodeId, RaftNode, E> {
        let error = TransportError(format!("{} (append entries stream): {reason}", self.node));
        if unreachable {
            RPCError::Unreachable(Unreachable::new(&error))
        } else {
            RPCError::Network(NetworkError::new(&error))
        }
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
        if let Some(result) = self.stream_call(&json, &option).await {
            return result;
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
