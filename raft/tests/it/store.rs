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
