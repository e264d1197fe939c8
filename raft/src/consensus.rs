//! [`Consensus`]: the node's handle on Raft.
//!
//! Callers never need to know who leads. [`Consensus::propose`] writes
//! locally on the leader and forwards to it from anywhere else;
//! [`Consensus::read_barrier`] makes the local state at least as new as the
//! leader's committed state at the time of the call (the read-index method),
//! so reads after it are linearizable and still served locally.
//!
//! Elections: openraft 0.9 draws a node's election timeout once, when the
//! node starts, so two survivors with close timeouts can split their votes
//! round after round. We switch openraft's own election timer off and run
//! [`drive_elections`], which applies openraft's rule (a follower campaigns
//! once the leader lease and an election timeout have passed since it last
//! heard from a leader) with a *fresh* random timeout for every campaign.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{Config, ServerState, SnapshotPolicy};
use rand::Rng;
use roost_proto::cluster::raft_client::RaftClient;
use roost_proto::cluster::{RaftPayload, ReadIndexRequest};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::command::{Command, Forward, Grant, Proposal, Response};
use crate::network::{Channels, ElectionHints, Network};
use crate::service::is_not_leader;
use crate::state::UnixMillis;
use crate::store::{self, StateReader};
use crate::{NodeId, Raft, RaftNode};

/// Raft's timing and log-compaction settings.
#[derive(Clone, Debug)]
pub struct Timings {
    /// How often the leader sends heartbeats (and replicates).
    pub heartbeat: Duration,
    /// A campaign starts a random time in `election_min..election_max` after
    /// the leader lease (`election_max`) has passed without word from a leader.
    pub election_min: Duration,
    pub election_max: Duration,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, for slow followers.
    pub keep_after_snapshot: u64,
    /// Purge the log in batches of at least this many entries.
    pub purge_batch: u64,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            // A follower campaigns after 650–900 ms without a word from the
            // leader (`failover-bench` counts campaigns on an idle cluster),
            // and a dead leader is replaced in under a second at the median.
            // The heartbeat stays at 100 ms: openraft 0.9 also uses it as the
            // timeout of every AppendEntries, and at 50 ms large entries
            // time out and replication stalls into elections (the test
            // `oversized_and_concurrent_large_writes_...` caught it).
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(200),
            election_max: Duration::from_millis(450),
            snapshot_every: 10_000,
            keep_after_snapshot: 1_000,
            purge_batch: 256,
        }
    }
}

impl Timings {
    fn raft_config(&self) -> Config {
        Config {
            cluster_name: "roost".into(),
            heartbeat_interval: self.heartbeat.as_millis() as u64,
            election_timeout_min: self.election_min.as_millis() as u64,
            election_timeout_max: self.election_max.as_millis() as u64,
            // drive_elections() campaigns instead; see the module doc.
            enable_elect: false,
            install_snapshot_timeout: 10_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_after_snapshot,
            purge_batch_size: self.purge_batch,
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not open the Raft store")]
    Store(#[source] store::OpenError),
    #[error("invalid Raft configuration")]
    Config(#[source] openraft::ConfigError),
    #[error("could not start Raft")]
    Raft(#[source] openraft::error::Fatal<NodeId>),
    #[error("could not initialize the cluster's membership")]
    Initialize(#[source] Box<RaftError<NodeId, openraft::error::InitializeError<NodeId, RaftNode>>>),
}

#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    #[error("no leader could be reached within {}s: a majority of voters may be down (see `roost node list --stale`)", .waited.as_secs())]
    NoLeader { waited: Duration },
    #[error("the change was not confirmed within {}s and may still be applied if the cluster recovers: a majority of voters may be down", .waited.as_secs())]
    Unconfirmed { waited: Duration },
    #[error("Raft has stopped on this node")]
    Stopped,
    #[error("the leader answered something this node cannot read: {0}")]
    Protocol(String),
    #[error("the leader refused the change: {0}")]
    Refused(String),
    #[error("the change is {bytes} bytes encoded; one change may be at most {max} bytes", max = MAX_COMMAND_BYTES)]
    TooLarge { bytes: usize },
    #[error("this node does not lead, and only the leader makes this decision")]
    NotLeader,
}

/// `command` as a proposal made now, and its encoded size, unless it is
/// over [`MAX_COMMAND_BYTES`].
fn sized(command: Command) -> Result<(Proposal, usize), ConsensusError> {
    let proposal = Proposal::new(command, now_millis());
    let bytes = encoded_len(&proposal);
    if bytes > MAX_COMMAND_BYTES {
        return Err(ConsensusError::TooLarge { bytes });
    }
    Ok((proposal, bytes))
}

/// The largest one proposal may be, encoded. Checked before it is proposed
/// (and again on the leader, for forwarded ones), so an oversized change is
/// refused with a clear error rather than clogging the log.
pub const MAX_COMMAND_BYTES: usize = 1 << 20;
/// The most bytes of proposals the batcher merges into one entry: one
/// command of the largest size, or several smaller ones.
pub const MAX_BATCH_BYTES: usize = MAX_COMMAND_BYTES;
/// The most entries one AppendEntries carries.
const MAX_PAYLOAD_ENTRIES: u64 = 16;
/// The most bytes of entries one AppendEntries carries, unless a single
/// entry (at most [`MAX_BATCH_BYTES`] and some framing) is larger alone.
///
/// openraft 0.9 gives every AppendEntries the heartbeat interval (100 ms) to
/// be sent, written and fsynced by the follower; it counts a slower one as
/// failed and sends nothing else to that follower meanwhile, heartbeats
/// included. Sixteen 2 MiB batches in one 32 MiB message missed that bound
/// on a slow machine again and again, until the followers campaigned; on
/// one core of this machine even 2-entry messages of 3.6 MB sometimes did.
/// So the transport refuses a larger message before sending it and tells
/// openraft how many entries fit ([`crate::network`]), and a message stays
/// near 1 MiB.
pub const MAX_APPEND_BYTES: usize = MAX_BATCH_BYTES;
/// The Raft service's message limit, both ways.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The encoded size of `value`, without keeping the encoding.
pub(crate) fn encoded_len(value: &impl serde::Serialize) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Encoding to a counter fails only where encoding to the log would.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// How long to wait between attempts to find or reach a leader.
const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_millis(500);

pub struct Consensus {
    id: NodeId,
    raft: Raft,
    state: StateReader,
    channels: Arc<dyn Channels>,
    batcher: mpsc::UnboundedSender<Pending>,
    /// Proposals sent to the batcher that it has not taken yet.
    queued: Arc<AtomicUsize>,
    /// The store, held so that shutdown closes it once every other holder
    /// is gone, and returns only when it is closed.
    db: std::sync::Mutex<Option<Arc<rocksdb::DB>>>,
    /// The election driver and the batcher, which shutdown waits for.
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    #[cfg(feature = "testkit")]
    sync_hold: store::SyncHold,
}

/// A proposal waiting for the batcher, its encoded size and its caller.
type Pending = (Proposal, usize, oneshot::Sender<LocalWrite>);

impl std::fmt::Debug for Consensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consensus").field("id", &self.id).finish_non_exhaustive()
    }
}

pub fn now_millis() -> UnixMillis {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    now.as_millis() as UnixMillis
}

impl Consensus {
    /// Opens the store under `dir`, starts Raft and its election driver. The
    /// driver stops when `shutdown` fires.
    pub async fn start(
        id: NodeId,
        dir: &Path,
        timings: &Timings,
        channels: Arc<dyn Channels>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StartError> {
        let config = Arc::new(timings.raft_config().validate().map_err(StartError::Config)?);
        // Opening RocksDB is blocking I/O (and may wait for a lock).
        let path = dir.to_owned();
        let (log, sm) = tokio::task::spawn_blocking(move || store::open(&path, id))
            .await
            .map_err(|e| StartError::Store(store::OpenError::Task(std::io::Error::other(e))))?
            .map_err(StartError::Store)?;
        let state = sm.reader();
        let db = std::sync::Mutex::new(Some(log.database()));
        #[cfg(feature = "testkit")]
        let sync_hold = log.sync_hold();
        let hints = Arc::new(ElectionHints::default());
        let network = Network::new(channels.clone(), hints.clone(), state.clone());
        let raft = Raft::new(id, config, network, log, sm).await.map_err(StartError::Raft)?;
        let elections = tokio::spawn(drive_elections(raft.clone(), timings.clone(), hints, shutdown.clone()));
        let (batcher, pending) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let batching = tokio::spawn(run_batcher(raft.clone(), pending, queued.clone(), shutdown));
        let tasks = std::sync::Mutex::new(vec![elections, batching]);
        Ok(Arc::new(Self {
            id,
            raft,
            state,
            channels,
            batcher,
            queued,
            db,
            tasks,
            #[cfg(feature = "testkit")]
            sync_hold,
        }))
    }

    /// Makes this node the sole voter of a new cluster. Does nothing when the
    /// log already holds a membership (a restart of the first node).
    pub async fn initialize(&self, node: RaftNode) -> Result<(), StartError> {
        let initialized = self.raft.is_initialized().await.map_err(StartError::Raft)?;
        if initialized {
            return Ok(());
        }
        let members = std::collections::BTreeMap::from([(self.id, node)]);
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(StartError::Initialize(Box::new(e))),
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Holds (and releases) the background syncs of the entries this node
    /// appends as leader (`store::SyncHold`).
    #[cfg(feature = "testkit")]
    pub fn log_sync_hold(&self) -> store::SyncHold {
        self.sync_hold.clone()
    }

    /// How many proposals wait for the batcher, behind the write in flight.
    pub fn queued_writes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    pub fn state(&self) -> &StateReader {
        &self.state
    }

    /// The leader this node currently believes in, with its address.
    pub fn leader(&self) -> Option<(NodeId, RaftNode)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let id = metrics.current_leader?;
        let mut node = metrics.membership_config.membership().get_node(&id)?.clone();
        node.address = crate::network::current_address(&self.state, id, &node);
        Some((id, node))
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// The term this node leads in, if it leads.
    pub fn leading_term(&self) -> Option<u64> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        (metrics.state == ServerState::Leader).then_some(metrics.current_term)
    }

    /// Commits `command` through the leader, wherever it is, and returns what
    /// the state machine answered. Waits for a leader until `deadline`.
    pub async fn propose(&self, command: Command, deadline: Instant) -> Result<Response, ConsensusError> {
        self.propose_granted(command, None, deadline).await
    }

    /// Writes one of the leader's own decisions
    /// ([`Command::is_leader_decision`]) through this node's Raft, which
    /// must lead: it is never forwarded, and another leader decides again.
    pub async fn propose_as_leader(&self, command: Command, deadline: Instant) -> Result<Response, ConsensusError> {
        let started = Instant::now();
        let (proposal, bytes) = sized(command)?;
        if !self.is_leader() {
            return Err(ConsensusError::NotLeader);
        }
        self.write_leading(proposal, bytes, deadline, started).await
    }

    /// [`Consensus::propose`] on someone's behalf: `grant` goes with the
    /// proposal if it must be forwarded, so the leader can check it.
    pub async fn propose_granted(
        &self,
        command: Command,
        grant: Option<Grant>,
        deadline: Instant,
    ) -> Result<Response, ConsensusError> {
        let started = Instant::now();
        let (proposal, bytes) = sized(command)?;
        let mut retry = RETRY_MIN;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ConsensusError::NoLeader { waited: started.elapsed() });
            }
            match self.leader() {
                Some((id, _)) if id == self.id => {
                    match self.write_leading(proposal.clone(), bytes, deadline, started).await {
                        // It lost the lead meanwhile: find the new leader.
                        Err(ConsensusError::NotLeader) => {}
                        done => return done,
                    }
                }
                Some((_, leader)) => match self.forward_proposal(&leader.address, &proposal, &grant, remaining).await {
                    Forwarded::Done(response) => return Ok(response),
                    Forwarded::Retry => {}
                    Forwarded::Unconfirmed => return Err(ConsensusError::Unconfirmed { waited: started.elapsed() }),
                    Forwarded::Protocol(e) => return Err(ConsensusError::Protocol(e)),
                    Forwarded::Refused(e) => return Err(ConsensusError::Refused(e)),
                },
                None => {}
            }
            retry = self.pause(retry, deadline).await;
        }
    }

    /// [`Consensus::write_sized`] until `deadline`, its outcome as the
    /// proposer sees it (`started`: when the proposal was made).
    async fn write_leading(
        &self,
        proposal: Proposal,
        bytes: usize,
        deadline: Instant,
        started: Instant,
    ) -> Result<Response, ConsensusError> {
        match tokio::time::timeout_at(deadline, self.write_sized(proposal, bytes)).await {
            Err(_) => Err(ConsensusError::Unconfirmed { waited: started.elapsed() }),
            Ok(LocalWrite::Done(response)) => Ok(response),
            Ok(LocalWrite::NotLeader) => Err(ConsensusError::NotLeader),
            Ok(LocalWrite::Failed(e)) => Err(ConsensusError::Protocol(e)),
            Ok(LocalWrite::TooLarge { bytes }) => Err(ConsensusError::TooLarge { bytes }),
            Ok(LocalWrite::Stopped) => Err(ConsensusError::Stopped),
        }
    }

    /// Writes through this node's Raft, which must lead; concurrent writes
    /// share one entry (see [`run_batcher`]).
    pub async fn write_local(&self, proposal: Proposal) -> LocalWrite {
        let bytes = encoded_len(&proposal);
        if bytes > MAX_COMMAND_BYTES {
            return LocalWrite::TooLarge { bytes };
        }
        self.write_sized(proposal, bytes).await
    }

    /// [`Consensus::write_local`] of a proposal already measured.
    async fn write_sized(&self, proposal: Proposal, bytes: usize) -> LocalWrite {
        let (tx, rx) = oneshot::channel();
        // Counted before it is sent, so the batcher never takes one uncounted.
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.batcher.send((proposal, bytes, tx)).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return LocalWrite::Stopped;
        }
        rx.await.unwrap_or(LocalWrite::Stopped)
    }

    /// Returns once the local state includes every write committed before the
    /// call, so reads after it are linearizable.
    pub async fn read_barrier(&self, deadline: Instant) -> Result<(), ConsensusError> {
        let started = Instant::now();
        let mut retry = RETRY_MIN;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ConsensusError::NoLeader { waited: started.elapsed() });
            }
            let index = match self.leader() {
                Some((id, _)) if id == self.id => {
                    match tokio::time::timeout(remaining, self.raft.ensure_linearizable()).await {
                        Err(_) => return Err(ConsensusError::NoLeader { waited: started.elapsed() }),
                        Ok(Ok(log_id)) => Some(log_id.map(|id| id.index)),
                        Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => None,
                        Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => None,
                        Ok(Err(RaftError::Fatal(_))) => return Err(ConsensusError::Stopped),
                    }
                }
                Some((_, leader)) => self.forward_read_index(&leader.address, remaining).await,
                None => None,
            };
            if let Some(index) = index {
                let remaining = deadline.saturating_duration_since(Instant::now());
                return match self.raft.wait(Some(remaining)).applied_index_at_least(index, "read barrier").await {
                    Ok(_) => Ok(()),
                    Err(openraft::metrics::WaitError::Timeout(..)) => {
                        Err(ConsensusError::NoLeader { waited: started.elapsed() })
                    }
                    Err(openraft::metrics::WaitError::ShuttingDown) => Err(ConsensusError::Stopped),
                };
            }
            retry = self.pause(retry, deadline).await;
        }
    }

    /// Waits for the leader view to change or for `retry` to pass, whichever
    /// is first, and returns the next, longer, retry interval.
    async fn pause(&self, retry: Duration, deadline: Instant) -> Duration {
        let mut metrics = self.raft.metrics();
        let jittered = retry.mul_f64(rand::thread_rng().gen_range(0.5..1.5));
        let until = (Instant::now() + jittered).min(deadline);
        let _ = tokio::time::timeout_at(until, metrics.changed()).await;
        (retry * 2).min(RETRY_MAX)
    }

    /// A client of the leader's Raft service; channels are cached by the
    /// node's `Channels`, so this is cheap.
    fn leader_client(&self, address: &str) -> Option<RaftClient<Channel>> {
        let channel = self.channels.channel(address).ok()?;
        Some(RaftClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES))
    }

    async fn forward_proposal(
        &self,
        address: &str,
        proposal: &Proposal,
        grant: &Option<Grant>,
        remaining: Duration,
    ) -> Forwarded {
        let Some(mut client) = self.leader_client(address) else {
            return Forwarded::Retry;
        };
        let forward = Forward { proposal: proposal.clone(), grant: grant.clone() };
        let json = match serde_json::to_vec(&forward) {
            Ok(json) => json,
            Err(e) => return Forwarded::Protocol(e.to_string()),
        };
        let mut request = tonic::Request::new(RaftPayload { json });
        request.set_timeout(remaining);
        match client.propose(request).await {
            Ok(reply) => match serde_json::from_slice(&reply.into_inner().json) {
                Ok(response) => Forwarded::Done(response),
                Err(e) => Forwarded::Protocol(e.to_string()),
            },
            Err(status) if is_retryable(&status) => {
                tracing::debug!(%address, status = %status.message(), "forwarding a write failed; retrying");
                Forwarded::Retry
            }
            // Checked before anything was written.
            Err(status) if matches!(status.code(), tonic::Code::PermissionDenied | tonic::Code::InvalidArgument) => {
                Forwarded::Refused(status.message().to_owned())
            }
            Err(status) => {
                tracing::warn!(%address, status = %status.message(), "forwarded write unconfirmed");
                Forwarded::Unconfirmed
            }
        }
    }

    async fn forward_read_index(&self, address: &str, remaining: Duration) -> Option<Option<u64>> {
        let mut client = self.leader_client(address)?;
        let mut request = tonic::Request::new(ReadIndexRequest {});
        request.set_timeout(remaining);
        match client.read_index(request).await {
            Ok(reply) => Some(reply.into_inner().index),
            Err(status) => {
                tracing::debug!(%address, status = %status.message(), "read index from leader failed; retrying");
                None
            }
        }
    }

    /// Stops Raft, waits for the election driver and the batcher (which end
    /// with the shutdown token `start` took, and with Raft), and waits (up to
    /// 10 s) until RocksDB is closed: openraft's state-machine and
    /// replication tasks hold the store a little past the core, and a node
    /// restarted in the same process must find it unlocked.
    pub async fn shutdown(&self) {
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "raft did not shut down cleanly");
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        for task in tasks {
            if tokio::time::timeout(Duration::from_secs(5), task).await.is_err() {
                tracing::warn!("a Raft task did not stop within 5 s of shutdown");
            }
        }
        let Some(db) = self.db.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take() else { return };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&db) > 1 {
            if Instant::now() >= deadline {
                tracing::warn!("the Raft store is still in use 10 s after shutdown");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The last holder: closing flushes and writes RocksDB's own log.
        let _ = tokio::task::spawn_blocking(move || drop(db)).await;
    }
}

/// What became of a write submitted on this node.
#[derive(Clone, Debug)]
pub enum LocalWrite {
    Done(Response),
    /// This node does not lead (any more); nothing was written.
    NotLeader,
    /// The proposal is larger than a command may be; nothing was written.
    TooLarge {
        bytes: usize,
    },
    /// Raft failed the write; it may or may not be in the log.
    Failed(String),
    Stopped,
}

/// Most proposals one entry carries.
const MAX_BATCH: usize = 512;

/// Commits proposals, batching those that arrive while a write is in
/// flight into one entry.
///
/// openraft 0.9's core waits for each append to be synced before it takes
/// the next message, so one client write per entry means one fsync per
/// write. Writing whatever has queued up as one `Command::Batch` turns that
/// into one fsync (and one replication round) per batch; a lone write still
/// goes out alone, so latency at low load is unchanged. One batch is written
/// at a time: two in flight (the leader's fsync of one overlapping the
/// followers' work on the other) measured no faster with `raft-bench` (64
/// clients, 3 nodes: 1,897 and 1,953 writes/s with two, 2,028 with one).
///
/// A batch holds at most [`MAX_BATCH`] proposals and [`MAX_BATCH_BYTES`]
/// bytes; a proposal that would overflow it opens the next one.
async fn run_batcher(
    raft: Raft,
    mut pending: mpsc::UnboundedReceiver<Pending>,
    queued: Arc<AtomicUsize>,
    shutdown: CancellationToken,
) {
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => tokio::select! {
                () = shutdown.cancelled() => return,
                first = pending.recv() => match first {
                    Some(first) => {
                        queued.fetch_sub(1, Ordering::Relaxed);
                        first
                    }
                    None => return,
                },
            },
        };
        let mut bytes = first.1;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            let Ok(next) = pending.try_recv() else { break };
            queued.fetch_sub(1, Ordering::Relaxed);
            if bytes + next.1 > MAX_BATCH_BYTES {
                carried = Some(next);
                break;
            }
            bytes += next.1;
            batch.push(next);
        }
        // Callers that gave up (timed out) are not written for.
        batch.retain(|(_, _, waiter)| !waiter.is_closed());
        if batch.is_empty() {
            continue;
        }
        let (mut proposals, waiters): (Vec<Proposal>, Vec<oneshot::Sender<LocalWrite>>) =
            batch.into_iter().map(|(proposal, _, waiter)| (proposal, waiter)).unzip();
        let entry = match proposals.len() {
            1 => proposals.remove(0),
            _ => Proposal::new(Command::Batch { proposals }, now_millis()),
        };
        write_batch(&raft, entry, waiters).await;
    }
}

/// Writes one batch's entry and answers each of its waiters.
///
/// openraft 0.9 may never answer a write: one in flight when this node lost
/// leadership and then installed a snapshot that reaches past it. So once
/// every waiter has given up (their calls timed out: `Unconfirmed`), the
/// write is no longer waited for, and the batches behind it go on. The entry
/// stays in the log and may still commit, so after such a timeout two
/// writes can be in flight for a while.
async fn write_batch(raft: &Raft, entry: Proposal, mut waiters: Vec<oneshot::Sender<LocalWrite>>) {
    let outcome = {
        let all_gave_up = async {
            for waiter in &mut waiters {
                waiter.closed().await;
            }
        };
        tokio::select! {
            () = all_gave_up => return,
            written = raft.client_write(entry) => written,
        }
    };
    let outcome = match outcome {
        Ok(written) => Ok(written.data),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(LocalWrite::NotLeader),
        Err(RaftError::APIError(e)) => Err(LocalWrite::Failed(e.to_string())),
        Err(RaftError::Fatal(_)) => Err(LocalWrite::Stopped),
    };
    match outcome {
        Ok(Response::Batch { responses }) if waiters.len() > 1 && responses.len() == waiters.len() => {
            for (waiter, response) in waiters.into_iter().zip(responses) {
                let _ = waiter.send(LocalWrite::Done(response));
            }
        }
        outcome => {
            let answer = match outcome {
                Ok(response) if waiters.len() == 1 => LocalWrite::Done(response),
                Ok(response) => LocalWrite::Failed(format!("unexpected answer to a batch: {response:?}")),
                Err(failure) => failure,
            };
            for waiter in waiters {
                let _ = waiter.send(answer.clone());
            }
        }
    }
}

enum Forwarded {
    Done(Response),
    /// The write certainly did not happen; try again.
    Retry,
    /// The write may or may not have happened.
    Unconfirmed,
    Protocol(String),
    /// The leader refused it before writing it.
    Refused(String),
}

/// A write may be retried only when it certainly was not applied: the node
/// said it does not lead, or no connection to it could be made at all. A
/// call that failed after it was sent (a dropped connection, a timeout) may
/// have been applied, so it is reported as unconfirmed instead.
fn is_retryable(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::FailedPrecondition => is_not_leader(status),
        tonic::Code::Unavailable => never_connected(status),
        _ => false,
    }
}

fn never_connected(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotConnected) {
                return true;
            }
        }
        source = error.source();
    }
    false
}

/// Campaigns for leadership when a voter has not heard from a leader for the
/// leader lease plus a random election timeout, drawn afresh each campaign.
/// A node that a voter with a longer log refused waits longer, as openraft's
/// own timer does, so the better candidate goes first. A node just started
/// waits the lease too before its first campaign: a leader that restarts
/// reads its own vote back uncommitted (`store::LogStore::read_vote`), and
/// campaigning early it could depose, for nothing, the leader that replaced
/// it before that leader's heartbeats reach it. The sole voter of a cluster
/// campaigns at once: there is no one to depose or wait for. See the module
/// documentation for why openraft's own timer is off.
pub async fn drive_elections(raft: Raft, timings: Timings, hints: Arc<ElectionHints>, shutdown: CancellationToken) {
    let draw = || rand::thread_rng().gen_range(timings.election_min..timings.election_max);
    let lease = timings.election_max;
    let smaller_log_delay = timings.election_max * 2;
    let mut yield_to_longer_log = false;
    let mut campaigned = false;
    let started = Instant::now();
    let mut timeout = draw();
    let tick = timings.heartbeat.min(timings.election_min / 4);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let (is_leader, is_voter, sole_voter) = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            if metrics.running_state.is_err() {
                return;
            }
            let membership = metrics.membership_config.membership();
            let voter = membership.voter_ids().any(|id| id == metrics.id);
            (metrics.state == ServerState::Leader, voter, voter && membership.voter_ids().count() == 1)
        };
        if is_leader || !is_voter {
            timeout = draw();
            yield_to_longer_log = false;
            continue;
        }
        yield_to_longer_log |= hints.take_greater_log_seen();
        let Ok((committed, last_heard)) =
            raft.with_raft_state(|st| (st.vote_ref().is_committed(), st.vote_last_modified())).await
        else {
            return;
        };
        let mut wait = if committed || !campaigned { lease + timeout } else { timeout };
        if yield_to_longer_log {
            wait += smaller_log_delay;
        }
        if sole_voter {
            wait = Duration::ZERO;
        }
        let last_heard = last_heard.unwrap_or(started);
        if Instant::now().saturating_duration_since(last_heard) >= wait {
            tracing::info!(waited_ms = wait.as_millis() as u64, "no word from a leader; campaigning");
            if raft.trigger().elect().await.is_err() {
                return;
            }
            campaigned = true;
            timeout = draw();
            yield_to_longer_log = false;
        }
    }
}
