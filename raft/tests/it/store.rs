//! openraft's storage test suite, run on our RocksDB store.

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{AnyError, StorageError, StorageIOError};
use roost_raft::store::{self, LogStore, StateMachine};
use roost_raft::{NodeId, TypeConfig};
use tempfile::TempDir;

/// Opens stores for a node `own`: the suite's entries name node 0 as their
/// leader, so with `own` 0 they are this node's own entries, synced in the
/// background, and with any other id a follower's, synced as written.
struct RocksStoreBuilder {
    own: NodeId,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RocksStoreBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::from(StorageIOError::write(AnyError::new(&e))))?;
        let (log, sm) = store::open(dir.path(), self.own)
            .map_err(|e| StorageError::from(StorageIOError::write(AnyError::new(&e))))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn rocksdb_store_passes_openraft_storage_suite_for_a_followers_entries() {
    if let Err(error) = Suite::test_all(RocksStoreBuilder { own: 7 }) {
        panic!("storage suite failed: {error}");
    }
}

#[test]
fn rocksdb_store_passes_openraft_storage_suite_for_its_own_entries_synced_in_the_background() {
    if let Err(error) = Suite::test_all(RocksStoreBuilder { own: 0 }) {
        panic!("storage suite failed: {error}");
    }
}

/// A vote written before a restart is read back after it: the store is
/// durable, not a cache.
#[tokio::test]
async fn vote_and_log_survive_reopening() -> anyhow::Result<()> {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader, Vote};

    let dir = tempfile::tempdir()?;
    let vote = Vote::new(3, 7);
    {
        let (mut log, _sm) = store::open(dir.path(), 7)?;
        log.save_vote(&vote).await?;
        let entry =
            Entry::<TypeConfig> { log_id: LogId::new(CommittedLeaderId::new(3, 7), 1), payload: EntryPayload::Blank };
        openraft::storage::RaftLogStorageExt::blocking_append(&mut log, [entry]).await?;
    }
    let (mut log, mut sm) = store::open(dir.path(), 7)?;
    assert_eq!(log.read_vote().await?, Some(vote));
    assert_eq!(log.try_get_log_entries(0..10).await?.len(), 1);
    assert_eq!(sm.applied_state().await?.0, None);
    Ok(())
}

/// A node's own committed vote (it led) reads back uncommitted, so that after
/// a restart it campaigns in a new term instead of leading again under the
/// old vote: its entries as leader are synced after they are sent, and a
/// power cut can lose some its followers committed, whose log ids it must not
/// give to new entries. Another node's committed vote reads back as written.
#[tokio::test]
async fn a_nodes_own_committed_vote_reads_back_uncommitted_so_it_campaigns_again() -> anyhow::Result<()> {
    use openraft::Vote;

    let dir = tempfile::tempdir()?;
    let own = Vote::new_committed(3, 7);
    {
        let (mut log, _sm) = store::open(dir.path(), 7)?;
        log.save_vote(&own).await?;
    }
    let (mut log, sm) = store::open(dir.path(), 7)?;
    let read = log.read_vote().await?.ok_or_else(|| anyhow::anyhow!("no vote read back"))?;
    assert_eq!(read, Vote::new(3, 7), "read back {read}");
    assert!(!read.is_committed());
    drop((log, sm));

    let (mut follower, _sm) = store::open(dir.path(), 8)?;
    assert_eq!(follower.read_vote().await?, Some(own), "another node's committed vote reads back as written");
    Ok(())
}

/// Reads answer with exactly the entries of the range asked for, whether
/// they come from the newest entries kept in memory or from RocksDB (after
/// reopening, the memory holds none): every bound kind, ranges inside the
/// log, past its end and empty ones.
#[tokio::test]
async fn log_reads_give_the_range_asked_for_from_memory_and_from_disk_alike() -> anyhow::Result<()> {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader};
    use std::ops::Bound::{self, Excluded, Included, Unbounded};
    use std::ops::RangeBounds;

    let dir = tempfile::tempdir()?;
    let ranges: [(Bound<u64>, Bound<u64>); 8] = [
        (Included(1), Excluded(11)),
        (Included(3), Excluded(7)),
        (Included(3), Included(7)),
        (Excluded(3), Unbounded),
        (Included(10), Unbounded),
        (Included(11), Unbounded),
        (Unbounded, Included(4)),
        (Included(5), Excluded(5)),
    ];
    let indexes = |entries: Vec<Entry<TypeConfig>>| entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
    let want = |range: &(Bound<u64>, Bound<u64>)| (1..=10).filter(|i| range.contains(i)).collect::<Vec<u64>>();
    {
        let (mut log, _sm) = store::open(dir.path(), 7)?;
        let entries = (1..=10).map(|index| Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(3, 7), index),
            payload: EntryPayload::Blank,
        });
        openraft::storage::RaftLogStorageExt::blocking_append(&mut log, entries).await?;
        for range in &ranges {
            assert_eq!(indexes(log.try_get_log_entries(*range).await?), want(range), "from memory: {range:?}");
        }
    }
    let (mut log, _sm) = store::open(dir.path(), 7)?;
    for range in &ranges {
        assert_eq!(indexes(log.try_get_log_entries(*range).await?), want(range), "from disk: {range:?}");
    }
    Ok(())
}

/// Reconcilers wait on `workload_changes`, which moves only with the
/// workload revision: an entry that creates an app (most of a write storm)
/// wakes those that wait on every change and not them; one that destroys an
/// app wakes both.
#[tokio::test]
async fn an_entry_that_leaves_the_workload_revision_wakes_no_reconciler() -> anyhow::Result<()> {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    use roost_raft::{Command, Proposal};

    let dir = tempfile::tempdir()?;
    let (_log, mut sm) = store::open(dir.path(), 7)?;
    let reader = sm.reader();
    let (mut every, mut workloads) = (reader.changes(), reader.workload_changes());
    let entry = |index, command| Entry::<TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(1, 7), index),
        payload: EntryPayload::Normal(Proposal::new(command, 0)),
    };

    sm.apply([entry(1, Command::CreateApp { name: "web".into() })]).await?;
    assert!(every.has_changed()?, "every change is announced");
    assert!(!workloads.has_changed()?, "creating an app moved the workload revision");
    every.mark_unchanged();

    let before = reader.workload_revision();
    sm.apply([entry(2, Command::DestroyApp { name: "web".into() })]).await?;
    assert!(every.has_changed()?);
    assert!(workloads.has_changed()?, "destroying an app did not wake reconcilers");
    assert_eq!(*workloads.borrow_and_update(), reader.workload_revision());
    assert!(reader.workload_revision() > before);
    Ok(())
}
