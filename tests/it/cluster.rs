//! In-process clusters: real RocksDB, TLS and gRPC over loopback sockets.

use std::time::Duration;

use anyhow::Result;
use roost_node::daemon::LivenessConfig;
use roost_proto::api::{CreateAppRequest, GetAppRequest, ListAppsRequest, ListNodesRequest, ReadOptions};
use roost_raft::Timings;
use roost_tests::{wait_until, Cluster};

async fn create_app(cluster: &Cluster, via: usize, name: &str) -> Result<()> {
    cluster
        .client(via)
        .await?
        .create_app(roost_node::cli::about_app(name, CreateAppRequest { name: name.into() }))
        .await?;
    Ok(())
}

async fn app_names(cluster: &Cluster, via: usize, stale: bool) -> Result<Vec<String>> {
    let request = ListAppsRequest { read: Some(ReadOptions { stale }) };
    let apps = cluster.client(via).await?.list_apps(request).await?.into_inner().apps;
    Ok(apps.into_iter().map(|a| a.name).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_form_a_cluster_with_three_voters() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let nodes = cluster.client(1).await?.list_nodes(ListNodesRequest::default()).await?.into_inner().nodes;
    assert_eq!(nodes.len(), 3);
    let roles: Vec<&str> = nodes.iter().map(|n| n.role.as_str()).collect();
    assert_eq!(roles.iter().filter(|r| **r == "leader").count(), 1, "{roles:?}");
    assert_eq!(roles.iter().filter(|r| **r == "voter").count(), 2, "{roles:?}");
    assert!(nodes.iter().all(|n| n.state == "up"), "{nodes:?}");
    assert_eq!(nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["n1", "n2", "n3"]);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_through_followers_are_forwarded_and_reads_are_linearizable() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    // Write through one follower, read at once through the other: a
    // linearizable read must see the write without any waiting.
    for i in 0..10 {
        let name = format!("app-{i}");
        create_app(&cluster, followers[0], &name).await?;
        let seen = app_names(&cluster, followers[1], false).await?;
        assert!(seen.contains(&name), "read after write missed {name}: {seen:?}");
        let app = cluster.client(followers[1]).await?.get_app(GetAppRequest { name: name.clone(), read: None }).await?;
        assert_eq!(app.into_inner().name, name);
    }
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_the_leader_elects_another_and_writes_continue() -> Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    create_app(&cluster, leader, "before").await?;
    cluster.stop(leader).await?;
    let survivor = (0..3).find(|i| *i != leader).expect("a survivor");
    let new_leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    assert_ne!(new_leader, leader);
    create_app(&cluster, survivor, "after").await?;
    let names = app_names(&cluster, survivor, false).await?;
    assert_eq!(names, ["after", "before"]);

    // The stopped node comes back from its data directory and catches up.
    cluster.restart(leader).await?;
    wait_until("the restarted node to catch up", Duration::from_secs(15), || async {
        Ok(app_names(&cluster, leader, true).await? == ["after", "before"])
    })
    .await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_fell_behind_the_log_gets_a_snapshot() -> Result<()> {
    let timings = Timings { snapshot_every: 20, keep_after_snapshot: 5, purge_batch: 1, ..Default::default() };
    let mut cluster = Cluster::start_with(3, timings, LivenessConfig::default()).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let behind = (0..3).find(|i| *i != leader).expect("a follower");
    cluster.stop(behind).await?;
    for i in 0..100 {
        create_app(&cluster, leader, &format!("a{i}")).await?;
    }
    // The leader compacts its log past what the stopped node has.
    wait_until("the leader to snapshot and purge its log", Duration::from_secs(10), || async {
        let purged = cluster.node(leader)?.consensus.raft().metrics().borrow().purged;
        Ok(purged.is_some_and(|p| p.index > 20))
    })
    .await?;

    cluster.restart(behind).await?;
    wait_until("the lagging node to install a snapshot and catch up", Duration::from_secs(20), || async {
        Ok(app_names(&cluster, behind, true).await?.len() == 100)
    })
    .await?;
    let snapshot = cluster.node(behind)?.consensus.raft().metrics().borrow().snapshot;
    assert!(snapshot.is_some(), "the lagging node should hold a snapshot");
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fourth_node_learns_and_is_promoted_when_a_voter_is_removed() -> Result<()> {
    let cluster = Cluster::start(4).await?;
    let nodes = cluster.client(0).await?.list_nodes(ListNodesRequest::default()).await?.into_inner().nodes;
    let learners: Vec<_> = nodes.iter().filter(|n| n.role == "learner").map(|n| n.name.clone()).collect();
    assert_eq!(learners, ["n4"], "{nodes:?}");

    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let voter = (0..3).find(|i| *i != leader).expect("a non-leader voter");
    let voter_name = cluster.slots[voter].name.clone();
    cluster.remove_node(leader, &voter_name).await?;

    wait_until("n4 to be promoted in place of the removed voter", Duration::from_secs(20), || async {
        let nodes = cluster.client(leader).await?.list_nodes(ListNodesRequest::default()).await?.into_inner().nodes;
        let n4 = nodes.iter().find(|n| n.name == "n4");
        Ok(nodes.len() == 3 && n4.is_some_and(|n| n.role == "voter" || n.role == "leader"))
    })
    .await?;
    // The removed node learns it was removed and stops on its own.
    wait_until("the removed node to stop", Duration::from_secs(15), || async {
        Ok(cluster.slots[voter].running.as_ref().is_some_and(|n| n.is_stopping()))
    })
    .await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_voter_down_too_long_is_replaced_by_a_learner() -> Result<()> {
    let liveness = LivenessConfig {
        heartbeat_every: Duration::from_millis(200),
        down_after: Duration::from_secs(1),
        promote_after: Duration::from_secs(2),
    };
    let mut cluster = Cluster::start_with(4, Timings::default(), liveness).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let voter = (0..3).find(|i| *i != leader).expect("a non-leader voter");
    cluster.stop(voter).await?;
    let down_name = cluster.slots[voter].name.clone();
    wait_until("the down voter to be shown down and replaced", Duration::from_secs(20), || async {
        let nodes = cluster.client(leader).await?.list_nodes(ListNodesRequest::default()).await?.into_inner().nodes;
        let down = nodes.iter().find(|n| n.name == down_name);
        let n4 = nodes.iter().find(|n| n.name == "n4");
        Ok(down.is_some_and(|n| n.state == "down" && n.role == "learner") && n4.is_some_and(|n| n.role == "voter"))
    })
    .await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_nodes_make_five_voters_and_a_second_node_waits_as_a_learner() -> Result<()> {
    // Two nodes: the second stays a learner (two voters would stall if either failed).
    let mut cluster = Cluster::start(2).await?;
    let nodes = cluster.client(1).await?.list_nodes(ListNodesRequest::default()).await?.into_inner().nodes;
    let roles: Vec<&str> = nodes.iter().map(|n| n.role.as_str()).collect();
    assert_eq!(roles, ["leader", "learner"]);
    for _ in 2..5 {
        cluster.add_node().await?;
    }
    cluster.wait_for_members(5).await?;
    let nodes = cluster.client(4).await?.list_nodes(ListNodesRequest::default()).await?.into_inner().nodes;
    assert!(nodes.iter().all(|n| n.role == "leader" || n.role == "voter"), "{nodes:?}");
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_serves_the_cli_as_soon_as_its_join_returns() -> Result<()> {
    use roost_node::daemon::{Node, Start};
    let cluster = Cluster::start(1).await?;
    let seed = cluster.node(0)?.address.clone();
    let mut joined = Vec::new();
    for name in ["n2", "n3"] {
        let dir = tempfile::tempdir()?;
        let start = Start::Join { seed: seed.clone(), token: cluster.tokens.join.to_string() };
        let config = roost_tests::node_config(name, dir.path(), None, start, &Default::default(), &Default::default());
        let node = Node::start(config, tokio_util::sync::CancellationToken::new()).await?;
        // No waiting: the first call after the join returns is served.
        let mut client = roost_tests::admin_client(&node.address, &cluster.tokens).await?;
        let app = format!("via-{name}");
        client.create_app(roost_node::cli::about_app(&app, CreateAppRequest { name: app.clone() })).await?;
        let nodes = client.list_nodes(ListNodesRequest::default()).await?.into_inner().nodes;
        assert!(nodes.iter().any(|n| n.name == name), "{nodes:?}");
        joined.push((dir, node));
    }
    for (_dir, node) in joined {
        node.stop().await;
    }
    cluster.shutdown().await;
    Ok(())
}

/// A node's tasks (heartbeats, membership, controllers, elections, the
/// batcher, the edge, the server) all end with it: none keeps running, or
/// keeps its RocksDB open, after `stop` has returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_task_of_a_stopped_cluster_keeps_running() -> Result<()> {
    let tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let before = tasks();
    let cluster = Cluster::start(3).await?;
    create_app(&cluster, 1, "busy").await?;
    let running = tasks();
    assert!(running > before + 10, "a running cluster has tasks: {running}");
    cluster.shutdown().await;
    // Connection tasks of the test's own clients end as their sockets close.
    wait_until("every task of the stopped nodes to end", Duration::from_secs(5), || async { Ok(tasks() <= before) })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}: {} tasks left, {before} before the cluster started", tasks()))?;
    Ok(())
}

/// A lone write goes out as an entry of its own; writes that arrive while it
/// is in flight wait and go next as one batch entry; and a caller that gives
/// up on its write in flight (its call timed out) strands none of the writes
/// waiting behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_behind_one_in_flight_go_as_one_batch_even_when_its_caller_gives_up() -> Result<()> {
    use roost_raft::{Command, Response};
    let cluster = Cluster::start(1).await?;
    cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let consensus = cluster.node(0)?.consensus.clone();
    let last_index = || consensus.raft().metrics().borrow().last_log_index.unwrap_or(0);
    let propose = |name: &str| {
        let consensus = consensus.clone();
        let command = Command::CreateApp { name: name.into() };
        tokio::spawn(
            async move { consensus.propose(command, tokio::time::Instant::now() + Duration::from_secs(30)).await },
        )
    };
    let before = last_index();

    // A lone node commits nothing while its own syncs are held.
    let held = consensus.log_sync_hold().hold();
    let first = propose("first");
    wait_until("the first write in the log", Duration::from_secs(10), || async { Ok(last_index() == before + 1) })
        .await?;
    let behind = [propose("second"), propose("third")];
    wait_until("two writes waiting behind the first", Duration::from_secs(10), || async {
        Ok(consensus.queued_writes() == 2)
    })
    .await?;
    assert_eq!(last_index(), before + 1, "a write went out while another was in flight");

    // The first write's caller gives up; those behind it go on, as one
    // entry, before the first is through.
    first.abort();
    assert!(first.await.is_err_and(|e| e.is_cancelled()), "the first write finished while its sync was held");
    wait_until("the two writes behind the first in the log", Duration::from_secs(10), || async {
        Ok(last_index() == before + 2)
    })
    .await?;
    drop(held);
    for write in behind {
        let response = tokio::time::timeout(Duration::from_secs(10), write)
            .await
            .map_err(|_| anyhow::anyhow!("a write behind one whose caller gave up was never written"))???;
        assert!(matches!(response, Response::AppCreated { .. }), "{response:?}");
    }
    assert_eq!(last_index(), before + 2, "the two writes behind the first did not go as one entry");
    let names = app_names(&cluster, 0, false).await?;
    assert_eq!(names, ["first", "second", "third"], "the given-up write is in the log all the same");

    // And a lone write after them goes at once, alone.
    let response = tokio::time::timeout(Duration::from_secs(10), propose("fourth")).await???;
    assert!(matches!(response, Response::AppCreated { .. }), "{response:?}");
    assert_eq!(last_index(), before + 3);
    cluster.shutdown().await;
    Ok(())
}

/// The leader's own log sync overlaps replication (our openraft patch, see
/// ARCHITECTURE.md, Write path), and the leader's copy counts toward a quorum
/// only once it is synced. With the leader's sync held, a write commits on
/// the two followers' synced copies; with one follower stopped and the sync
/// held again, a write the remaining follower has synced stays uncommitted
/// until the leader's sync is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_commits_on_followers_copies_while_the_leaders_sync_is_held_and_never_counts_its_unsynced_copy(
) -> Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let leader_id = cluster.node(leader)?.id;
    let hold = cluster.node(leader)?.consensus.log_sync_hold();
    let metrics = |cluster: &Cluster| -> Result<openraft::RaftMetrics<u64, roost_raft::RaftNode>> {
        Ok(cluster.node(leader)?.consensus.raft().metrics().borrow().clone())
    };
    let matching = |metrics: &openraft::RaftMetrics<u64, roost_raft::RaftNode>, node: u64| -> Option<u64> {
        metrics.replication.as_ref().and_then(|r| r.get(&node).cloned().flatten()).map(|id| id.index)
    };

    let held = hold.hold();
    tokio::time::timeout(Duration::from_secs(10), create_app(&cluster, leader, "synced-by-followers"))
        .await
        .map_err(|_| anyhow::anyhow!("no commit while the leader's own sync was held: replication waits for it"))??;
    // openraft publishes its metrics after it answers the client.
    let written = metrics(&cluster)?.last_log_index;
    wait_until("the write applied in the leader's metrics", Duration::from_secs(10), || async {
        Ok(metrics(&cluster)?.last_applied.map(|id| id.index) >= written)
    })
    .await?;
    let now = metrics(&cluster)?;
    let applied = now.last_applied.map(|id| id.index);
    assert!(
        matching(&now, leader_id) < applied,
        "the write was applied ({applied:?}) before the leader's own copy was synced ({:?})",
        matching(&now, leader_id)
    );
    drop(held);
    wait_until("the leader's own copy synced", Duration::from_secs(10), || async {
        let now = metrics(&cluster)?;
        Ok(matching(&now, leader_id) >= now.last_applied.map(|id| id.index))
    })
    .await?;

    let stopped = (0..3).find(|i| *i != leader).ok_or_else(|| anyhow::anyhow!("a follower"))?;
    let follower = (0..3).find(|i| *i != leader && *i != stopped).ok_or_else(|| anyhow::anyhow!("a follower"))?;
    let follower_id = cluster.node(follower)?.id;
    cluster.stop(stopped).await?;
    let held = hold.hold();
    let client = cluster.client(leader).await?;
    let write = tokio::spawn(async move {
        let mut client = client;
        let name = "needs-the-leaders-copy";
        client.create_app(roost_node::cli::about_app(name, CreateAppRequest { name: name.into() })).await
    });
    // An entry the follower has synced, the leader has not, and the leader
    // knows it: the follower's copy and the leader's unsynced one would make
    // a majority if the leader counted itself early.
    let pending = std::cell::Cell::new(0);
    wait_until("an entry on the follower only", Duration::from_secs(10), || async {
        let now = metrics(&cluster)?;
        let last = now.last_log_index;
        pending.set(last.unwrap_or(0));
        Ok(matching(&now, follower_id) >= last && matching(&now, leader_id) < last)
    })
    .await?;
    let pending = pending.get();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let applied = metrics(&cluster)?.last_applied.map(|id| id.index).unwrap_or(0);
        assert!(applied < pending, "entry {pending} was applied before any two synced copies existed");
        assert!(!write.is_finished(), "a write was acknowledged before any two synced copies existed");
    }
    drop(held);
    tokio::time::timeout(Duration::from_secs(10), write).await???;
    cluster.shutdown().await;
    Ok(())
}
