//! Durable storage for openraft on RocksDB: the log, the vote, and the state
//! machine's snapshots.
//!
//! One RocksDB database per node with two column families: `logs` (entries by
//! big-endian index, so iteration is in log order) and `meta` (vote, committed
//! id, last purged id, current snapshot).
//!
//! Durability: an entry or vote is reported durable only once RocksDB's
//! write-ahead log holding it is synced, so what is reported survives a power
//! cut. A follower's entries and every vote, truncation and purge are written
//! with `sync = true` before the call returns: openraft waits for them before
//! it answers the leader. The leader's own entries are written at once but
//! synced on a thread of its own (`WalSyncer`), which reports them flushed in
//! order: our patch of openraft (`vendor/openraft`, see ARCHITECTURE.md,
//! Write path) replicates them meanwhile and counts the leader toward a
//! quorum only once that report comes. The write itself is never deferred,
//! only its sync, so the WAL keeps the order of every write: a committed id or
//! truncation written later can never survive a crash that loses the entries
//! before it. Batching happens above, in `consensus::run_batcher`.
//!
//! The state machine ([`StateMachine`]) lives in memory; its durable form is
//! the latest snapshot plus the log after it. On start the snapshot is loaded
//! and openraft re-applies the committed entries after it (we persist the
//! committed id for that). Snapshots are built from a clone of the state, so
//! building one never blocks apply for long.

// openraft's traits fix the error type (`StorageError`, about 200 bytes);
// our helpers return what the traits return.
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::command::{Proposal, Response};
use crate::state::State;
use crate::{NodeId, RaftNode, TypeConfig};

const CF_LOGS: &str = "logs";
const CF_META: &str = "meta";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_SNAPSHOT: &[u8] = b"snapshot";

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// Opens (or creates) a node's RocksDB under `dir` and returns its log store
/// and state machine, the state machine restored from the last snapshot.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("could not open RocksDB")]
    Rocks(#[from] rocksdb::Error),
    #[error("the task opening RocksDB failed")]
    Task(#[source] std::io::Error),
    #[error("could not start the thread that syncs the Raft log")]
    SyncThread(#[source] std::io::Error),
    #[error("the stored snapshot is unreadable and the log before it was purged: restore this node's data directory from a backup, or remove the node and join a fresh one")]
    Snapshot(#[source] serde_json::Error),
}

/// `own` is this node's id: entries it appended as leader are synced in the
/// background (see the module's documentation).
pub fn open(dir: &Path, own: NodeId) -> Result<(LogStore, StateMachine), OpenError> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    // A control plane's log is small; keep RocksDB's memory modest.
    options.set_write_buffer_size(8 << 20);
    options.set_max_write_buffer_number(2);
    options.set_max_background_jobs(2);
    let db = Arc::new(open_db(&options, dir)?);
    let syncer = Arc::new(WalSyncer::start(db.clone()).map_err(OpenError::SyncThread)?);
    let log = LogStore { db: db.clone(), recent: Arc::default(), own, syncer };
    let sm = StateMachine::restore(db)?;
    Ok((log, sm))
}

/// Opens the database, waiting up to five seconds for this same process to
/// let go of it: a node restarted in-process (as tests do) can come back
/// while the previous instance's last handle is still being dropped.
fn open_db(options: &Options, dir: &Path) -> Result<DB, rocksdb::Error> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let cfs = [CF_LOGS, CF_META].map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        match DB::open_cf_descriptors(options, dir, cfs) {
            // rocksdb's error says only `IOError` for a held lock; its text
            // is the one way to tell it from a real I/O failure, which must
            // not be retried.
            Err(e)
                if e.to_string().contains("lock hold by current process") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

fn synced() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.set_sync(true);
    options
}

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    /// The newest entries, contiguous up to the last one, so that replication
    /// (which re-reads what was just appended) does not go back to RocksDB
    /// and JSON for them.
    recent: Arc<Mutex<VecDeque<Entry<TypeConfig>>>>,
    /// This node: entries whose leader it is are synced by `syncer`.
    own: NodeId,
    syncer: Arc<WalSyncer>,
}

/// Syncs RocksDB's write-ahead log on a thread of its own for the leader's
/// appends, which were written (not synced) before they were queued here,
/// and reports each flushed, in the order queued. One sync serves every
/// append queued by the time it starts. Dropping it (with the last
/// [`LogStore`]) ends the thread and waits for it, so the database is closed
/// when the store is.
struct WalSyncer {
    /// `None` only while dropping: closing it ends the thread.
    queue: Option<mpsc::Sender<LogFlushed<TypeConfig>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    #[cfg(feature = "testkit")]
    hold: SyncHold,
}

impl WalSyncer {
    fn start(db: Arc<DB>) -> std::io::Result<Self> {
        let (queue, due) = mpsc::channel::<LogFlushed<TypeConfig>>();
        #[cfg(feature = "testkit")]
        let hold = SyncHold::default();
        #[cfg(feature = "testkit")]
        let held = hold.clone();
        let thread = std::thread::Builder::new().name("roost-log-sync".into()).spawn(move || {
            while let Ok(first) = due.recv() {
                #[cfg(feature = "testkit")]
                held.wait_released();
                let batch: Vec<_> = std::iter::once(first).chain(due.try_iter()).collect();
                let result = db.flush_wal(true).map_err(|e| e.to_string());
                for callback in batch {
                    callback.log_io_completed(result.clone().map_err(std::io::Error::other));
                }
            }
        })?;
        Ok(Self {
            queue: Some(queue),
            thread: Some(thread),
            #[cfg(feature = "testkit")]
            hold,
        })
    }

    /// Queues a sync for entries already written; the callback hears of it.
    fn sync(&self, callback: LogFlushed<TypeConfig>) -> Result<(), std::io::Error> {
        match self.queue.as_ref().map(|queue| queue.send(callback)) {
            Some(Ok(())) => Ok(()),
            Some(Err(mpsc::SendError(callback))) => {
                let error = || std::io::Error::other("the Raft log's sync thread has stopped");
                callback.log_io_completed(Err(error()));
                Err(error())
            }
            None => Err(std::io::Error::other("the Raft log is closed")),
        }
    }
}

impl Drop for WalSyncer {
    fn drop(&mut self) {
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            // It ends once it has reported what was queued.
            let _ = thread.join();
        }
    }
}

/// Test control: while held, the background syncs of a leader's own entries
/// wait, so a test can see what commits without the leader's copy.
#[cfg(feature = "testkit")]
#[derive(Clone, Default)]
pub struct SyncHold(Arc<(Mutex<bool>, std::sync::Condvar)>);

#[cfg(feature = "testkit")]
impl SyncHold {
    /// Holds the syncs until the guard is dropped (a failing test's too).
    pub fn hold(&self) -> HeldSyncs {
        *self.0 .0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        HeldSyncs(self.clone())
    }

    fn release(&self) {
        *self.0 .0.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.0 .1.notify_all();
    }

    fn wait_released(&self) {
        let mut held = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        while *held {
            held = self.0 .1.wait(held).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Syncs held by [`SyncHold::hold`]; dropping it lets them go.
#[cfg(feature = "testkit")]
pub struct HeldSyncs(SyncHold);

#[cfg(feature = "testkit")]
impl Drop for HeldSyncs {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// How many of the newest entries [`LogStore`] keeps in memory.
const RECENT_ENTRIES: usize = 4096;

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl LogStore {
    /// The database itself, so that shutdown can be the one to close it.
    pub(crate) fn database(&self) -> Arc<DB> {
        self.db.clone()
    }

    /// Holds and releases the background syncs of this node's own entries.
    #[cfg(feature = "testkit")]
    pub fn sync_hold(&self) -> SyncHold {
        self.syncer.hold.clone()
    }
}

impl LogStore {
    fn recent(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry<TypeConfig>>> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cf(&self, name: &str) -> StorageResult<&rocksdb::ColumnFamily> {
        self.db.cf_handle(name).ok_or_else(|| write_err(std::io::Error::other(format!("column family {name} missing"))))
    }

    fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &[u8]) -> StorageResult<Option<T>> {
        let bytes = self.db.get_cf(self.cf(CF_META)?, key).map_err(read_err)?;
        bytes.map(|b| serde_json::from_slice(&b).map_err(read_err)).transpose()
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> StorageResult<()> {
        let bytes = serde_json::to_vec(value).map_err(write_err)?;
        self.db.put_cf_opt(self.cf(CF_META)?, key, bytes, &synced()).map_err(write_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => *i + 1,
            Bound::Unbounded => 0,
        };
        {
            // The cache is one contiguous run, so `start` is found by its
            // offset, not by a scan of up to RECENT_ENTRIES entries (every
            // apply and every AppendEntries reads the log).
            let recent = self.recent();
            let offset = recent.front().and_then(|first| start.checked_sub(first.log_id.index));
            if let Some(offset) = offset.and_then(|o| usize::try_from(o).ok()).filter(|o| *o < recent.len()) {
                return Ok(recent.range(offset..).take_while(|e| range.contains(&e.log_id.index)).cloned().collect());
            }
        }
        let cf = self.cf(CF_LOGS)?;
        let mut entries = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::From(&index_key(start), Direction::Forward)) {
            let (key, value) = item.map_err(read_err)?;
            let index = u64::from_be_bytes(key.as_ref().try_into().map_err(|_| read_err(bad_key()))?);
            if !range.contains(&index) {
                break;
            }
            entries.push(serde_json::from_slice(&value).map_err(read_err)?);
        }
        Ok(entries)
    }
}

fn bad_key() -> std::io::Error {
    std::io::Error::other("log key is not 8 bytes")
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last = self.db.iterator_cf(self.cf(CF_LOGS)?, IteratorMode::End).next();
        let last_log_id = match last {
            Some(item) => {
                let (_, value) = item.map_err(read_err)?;
                let entry: Entry<TypeConfig> = serde_json::from_slice(&value).map_err(read_err)?;
                Some(entry.log_id)
            }
            None => None,
        };
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(KEY_LAST_PURGED)?;
        Ok(LogState { last_purged_log_id, last_log_id: last_log_id.or(last_purged_log_id) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.put_meta(KEY_VOTE, vote)
    }

    /// This node's own committed vote (it led) reads back uncommitted. Its
    /// entries as leader were synced only after they were sent (see the
    /// module's documentation), so a power cut can take from it entries its
    /// followers hold and may have committed. Leading again under the same
    /// vote, it would give those entries' log ids to new ones, and the logs
    /// would diverge for good. So it must win an election in a new term
    /// first, which it cannot without the committed entries.
    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        let vote: Option<Vote<NodeId>> = self.get_meta(KEY_VOTE)?;
        Ok(vote.map(|mut vote| {
            if vote.leader_id.node_id == self.own {
                vote.committed = false;
            }
            vote
        }))
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Not synced: losing it only means re-learning it from the leader.
        let bytes = serde_json::to_vec(&committed).map_err(write_err)?;
        self.db.put_cf(self.cf(CF_META)?, KEY_COMMITTED, bytes).map_err(write_err)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.cf(CF_LOGS)?;
        let mut batch = WriteBatch::default();
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        for entry in &entries {
            let bytes = serde_json::to_vec(entry).map_err(write_err)?;
            batch.put_cf(cf, index_key(entry.log_id.index), bytes);
        }
        // Our own entries as leader: write now, sync in the background.
        let ours = entries.last().is_some_and(|e| e.log_id.leader_id.node_id == self.own);
        let options = if ours { WriteOptions::default() } else { synced() };
        if let Err(error) = self.db.write_opt(batch, &options) {
            callback.log_io_completed(Err(std::io::Error::other(error.to_string())));
            return Err(write_err(error));
        }
        {
            let mut recent = self.recent();
            for entry in entries {
                // The cache holds one contiguous run ending at the last entry.
                if recent.back().is_some_and(|last| last.log_id.index + 1 != entry.log_id.index) {
                    recent.clear();
                }
                recent.push_back(entry);
            }
            while recent.len() > RECENT_ENTRIES {
                recent.pop_front();
            }
        }
        if ours {
            return self.syncer.sync(callback).map_err(write_err);
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.recent().retain(|e| e.log_id.index < log_id.index);
        let cf = self.cf(CF_LOGS)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, index_key(log_id.index), index_key(u64::MAX));
        // delete_range's end is exclusive; remove the last possible key too.
        batch.delete_cf(cf, index_key(u64::MAX));
        self.db.write_opt(batch, &synced()).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Record the purge point first: a crash between the two writes leaves
        // extra entries, which is harmless, never a gap openraft cannot explain.
        self.put_meta(KEY_LAST_PURGED, &log_id)?;
        self.recent().retain(|e| e.log_id.index > log_id.index);
        let cf = self.cf(CF_LOGS)?;
        self.db.delete_range_cf(cf, index_key(0), index_key(log_id.index + 1)).map_err(write_err)
    }
}

/// What a snapshot holds, serialized as JSON.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    meta: SnapshotMeta<NodeId, RaftNode>,
    state: State,
}

/// The in-memory state machine and where its snapshots go.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<DB>,
    inner: Arc<RwLock<Applied>>,
    /// Bumped after every apply, so tasks can wait for the state to change.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// The workload revision, sent whenever it moves.
    workload_changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// See [`StateReader::synced`].
    synced: Arc<AtomicBool>,
}

impl Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine").finish_non_exhaustive()
    }
}

/// The state plus what openraft needs to know about how far it got.
#[derive(Default)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, RaftNode>,
    state: State,
    snapshot_index: u64,
    /// Bumped by every apply that may change what reconcilers build
    /// ([`crate::Command::touches_workloads`], membership, snapshots).
    workload_revision: u64,
}

/// How long a reconciler lets changes settle once one arrives, at least.
/// Under load the state changes hundreds of times a second, and every pass
/// of a reconciler (the edge's routes, the mesh, the agent, the controller)
/// reads the whole state under the lock that applying an entry needs: one
/// pass per burst instead of one per entry keeps writes fast.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(25);
/// How many times as long as its last pass a reconciler waits after a
/// change: its passes then take at most a tenth of a core.
pub const PACE_FACTOR: u32 = 9;
/// The longest a reconciler waits after a change, however slow its passes.
pub const MAX_SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Paces a reconciler's passes to what they cost. A pass reads the whole
/// state, so it grows with the state (tens of thousands of apps); after a
/// change a reconciler waits [`SETTLE`], or [`PACE_FACTOR`] times as long as
/// its last pass took if that is longer (at most [`MAX_SETTLE`]), so under a
/// stream of writes it never takes the CPU that applying them needs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pace {
    last_pass: std::time::Duration,
}

impl Pace {
    /// Records a pass that began at `started`.
    pub fn passed(&mut self, started: std::time::Instant) {
        self.last_pass = started.elapsed();
    }

    /// How long to let changes settle before the next pass.
    pub fn settle(&self) -> std::time::Duration {
        (self.last_pass * PACE_FACTOR).clamp(SETTLE, MAX_SETTLE)
    }

    /// Waits for the next change to the state, then for [`Pace::settle`].
    pub async fn settled(
        &self,
        changes: &mut tokio::sync::watch::Receiver<u64>,
    ) -> Result<(), tokio::sync::watch::error::RecvError> {
        changes.changed().await?;
        tokio::time::sleep(self.settle()).await;
        Ok(())
    }
}

/// A read-only view of the replicated state, shared with the rest of the node.
#[derive(Clone)]
pub struct StateReader {
    inner: Arc<RwLock<Applied>>,
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    workload_changes: Arc<tokio::sync::watch::Sender<u64>>,
    synced: Arc<AtomicBool>,
}

impl Debug for StateReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateReader").finish_non_exhaustive()
    }
}

impl StateReader {
    /// Runs `f` on the current state. Keep `f` short: apply waits for it.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        let guard = self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&guard.state)
    }

    /// Runs `f` on the current state unless its workload revision is still
    /// `*seen` (what the caller last built from), and records the revision
    /// `f` saw; one lock for both. `None`: nothing a reconciler builds can
    /// have changed since.
    pub fn read_if_moved<T>(&self, seen: &mut Option<u64>, f: impl FnOnce(&State) -> T) -> Option<T> {
        let guard = self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        if *seen == Some(guard.workload_revision) {
            return None;
        }
        *seen = Some(guard.workload_revision);
        Some(f(&guard.state))
    }

    /// A number that changes whenever an applied entry may have changed what
    /// the node's reconcilers build from the state; entries that only
    /// record tokens or an app without a release leave it
    /// ([`crate::Command::touches_workloads`]).
    pub fn workload_revision(&self) -> u64 {
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner()).workload_revision
    }

    /// A receiver that sees a new value after every change to the state.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// A receiver of the workload revision ([`StateReader::workload_revision`]),
    /// which sees a new value only when it moves: what reconcilers wait on,
    /// so that the entries that cannot concern them (tokens, an app created
    /// without a release: most of a write storm) do not wake them at all.
    pub fn workload_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.workload_changes.subscribe()
    }

    /// Whether, since this process started, the state has once included
    /// every entry the cluster had committed when this node asked (a read
    /// barrier passed: [`StateReader::mark_synced`]). Until then a node that
    /// restarted holds only what it had, and an app made while it was down
    /// is not in it yet.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    /// Records that a read barrier passed ([`StateReader::synced`]). It moves
    /// the workload revision, so a reconciler that built from the state
    /// while it was not synced builds again; the flag is set first, so a
    /// pass that read it unset always sees the revision move after it.
    pub fn mark_synced(&self) {
        if self.synced.swap(true, Ordering::SeqCst) {
            return;
        }
        let revision = {
            let mut applied = self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner());
            applied.workload_revision += 1;
            applied.workload_revision
        };
        self.changes.send_modify(|n| *n += 1);
        raise(&self.workload_changes, revision);
    }
}

/// Sends `revision` unless the watch holds a later one already: apply and
/// [`StateReader::mark_synced`] send after releasing the state's lock, so
/// their sends can come in the other order, and the watch must not go back.
fn raise(watch: &tokio::sync::watch::Sender<u64>, revision: u64) {
    watch.send_if_modified(|current| {
        let later = revision > *current;
        if later {
            *current = revision;
        }
        later
    });
}

impl StateMachine {
    fn restore(db: Arc<DB>) -> Result<Self, OpenError> {
        let mut applied = Applied::default();
        if let Some(cf) = db.cf_handle(CF_META) {
            if let Some(bytes) = db.get_cf(cf, KEY_SNAPSHOT)? {
                match serde_json::from_slice::<SnapshotData>(&bytes) {
                    Ok(snapshot) => {
                        applied.last_applied = snapshot.meta.last_log_id;
                        applied.last_membership = snapshot.meta.last_membership;
                        applied.state = snapshot.state;
                    }
                    // With the whole log still here, openraft re-applies it;
                    // once it has been purged the snapshot was the only copy.
                    Err(error) if db.get_cf(cf, KEY_LAST_PURGED)?.is_some() => {
                        return Err(OpenError::Snapshot(error));
                    }
                    Err(error) => tracing::warn!(%error, "stored snapshot unreadable; rebuilding from the log"),
                }
            }
        }
        let (changes, _) = tokio::sync::watch::channel(0);
        let (workload_changes, _) = tokio::sync::watch::channel(applied.workload_revision);
        Ok(Self {
            db,
            inner: Arc::new(RwLock::new(applied)),
            changes: Arc::new(changes),
            workload_changes: Arc::new(workload_changes),
            synced: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn reader(&self) -> StateReader {
        StateReader {
            inner: self.inner.clone(),
            changes: self.changes.clone(),
            workload_changes: self.workload_changes.clone(),
            synced: self.synced.clone(),
        }
    }

    /// Tells waiters that the state changed, and the workload revision too
    /// if it moved ([`raise`] sends only a later one).
    fn announce(&self, revision: u64) {
        self.changes.send_modify(|n| *n += 1);
        raise(&self.workload_changes, revision);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Applied> {
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn save_snapshot(&self, bytes: &[u8]) -> StorageResult<()> {
        let cf =
            self.db.cf_handle(CF_META).ok_or_else(|| write_err(std::io::Error::other("column family meta missing")))?;
        self.db
            .put_cf_opt(cf, KEY_SNAPSHOT, bytes, &synced())
            .map_err(|e| StorageIOError::write_snapshot(None, AnyError::new(&e)).into())
    }

    fn load_snapshot(&self) -> StorageResult<Option<Vec<u8>>> {
        let cf =
            self.db.cf_handle(CF_META).ok_or_else(|| read_err(std::io::Error::other("column family meta missing")))?;
        self.db.get_cf(cf, KEY_SNAPSHOT).map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&e)).into())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (meta, state) = {
            let mut applied = self.write();
            applied.snapshot_index += 1;
            let snapshot_id = match applied.last_applied {
                Some(id) => format!("{}-{}-{}", id.leader_id, id.index, applied.snapshot_index),
                None => format!("--{}", applied.snapshot_index),
            };
            let meta = SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.last_membership.clone(),
                snapshot_id,
            };
            (meta, applied.state.clone())
        };
        let data = SnapshotData { meta: meta.clone(), state };
        let bytes = serde_json::to_vec(&data).map_err(|e| {
            StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)))
        })?;
        self.save_snapshot(&bytes)?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, RaftNode>)> {
        let applied = self.read();
        Ok((applied.last_applied, applied.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applied = self.write();
        let mut responses = Vec::new();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            // openraft needs exactly one response per entry, whatever its kind.
            let response = match entry.payload {
                EntryPayload::Blank => Response::Done,
                EntryPayload::Normal(ref proposal) => {
                    if proposal.command.touches_workloads() {
                        applied.workload_revision += 1;
                    }
                    apply_proposal(&mut applied.state, proposal)
                }
                EntryPayload::Membership(membership) => {
                    applied.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                    applied.workload_revision += 1;
                    Response::Done
                }
            };
            responses.push(response);
        }
        let revision = applied.workload_revision;
        drop(applied);
        self.announce(revision);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, RaftNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let bytes = snapshot.into_inner();
        let data: SnapshotData = serde_json::from_slice(&bytes).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e)))
        })?;
        self.save_snapshot(&bytes)?;
        let mut applied = self.write();
        applied.last_applied = meta.last_log_id;
        applied.last_membership = meta.last_membership.clone();
        applied.state = data.state;
        applied.workload_revision += 1;
        let revision = applied.workload_revision;
        drop(applied);
        self.announce(revision);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let Some(bytes) = self.load_snapshot()? else {
            return Ok(None);
        };
        let data: SnapshotData = serde_json::from_slice(&bytes)
            .map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, AnyError::new(&e))))?;
        Ok(Some(Snapshot { meta: data.meta, snapshot: Box::new(Cursor::new(bytes)) }))
    }
}

fn apply_proposal(state: &mut State, proposal: &Proposal) -> Response {
    let response = state.apply(proposal);
    tracing::debug!(command = %proposal.command, ?response, "applied");
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconciler_waits_longer_the_longer_its_passes_take_within_bounds() {
        let pace = |ms: u64| Pace { last_pass: std::time::Duration::from_millis(ms) }.settle();
        assert_eq!(pace(0), SETTLE, "a quick pass waits the least");
        assert_eq!(pace(2), SETTLE, "nine times a pass of 2 ms is still less");
        assert_eq!(pace(10), std::time::Duration::from_millis(90), "nine times a slow pass");
        assert_eq!(pace(2_000), MAX_SETTLE, "never more than the most");
        let mut measured = Pace::default();
        measured.passed(std::time::Instant::now() - std::time::Duration::from_millis(50));
        assert!(measured.settle() >= std::time::Duration::from_millis(450));
    }

    #[test]
    fn the_workload_watch_never_goes_back_when_two_sends_come_out_of_order() {
        let (watch, mut seen) = tokio::sync::watch::channel(0);
        raise(&watch, 2);
        assert_eq!(*seen.borrow_and_update(), 2);
        raise(&watch, 1);
        assert!(!seen.has_changed().unwrap_or(true), "an older revision woke waiters");
        assert_eq!(*seen.borrow(), 2);
        raise(&watch, 3);
        assert_eq!(*seen.borrow_and_update(), 3);
    }
}
