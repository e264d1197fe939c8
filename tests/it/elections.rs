//! Elections must be robust: openraft 0.9 draws each node's election timeout
//! once, so two survivors with close timeouts could split votes forever.
//! Roost's election driver draws a fresh timeout per campaign; this test kills
//! the leader twenty times in a row and needs a new, writable leader each time.

use std::time::Duration;

use anyhow::{Context, Result};
use roost_proto::api::CreateAppRequest;
use roost_tests::{wait_until, Cluster};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_killed_twenty_times_is_replaced_every_time() -> Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let mut failovers = Vec::new();
    for round in 0..20 {
        let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
        cluster.stop(leader).await?;
        let stopped_at = Instant::now();
        let survivor = (0..3).find(|i| *i != leader).context("a survivor")?;
        // A new leader must be elected among the two survivors and accept a
        // write through either of them.
        let name = format!("round-{round}");
        wait_until(&format!("a write after leader loss in round {round}"), Duration::from_secs(10), || {
            let name = name.clone();
            let cluster = &cluster;
            async move {
                let mut client = cluster.client(survivor).await?;
                match client.create_app(roost_node::cli::about_app(&name.clone(), CreateAppRequest { name })).await {
                    Ok(_) => Ok(true),
                    Err(status) if status.code() == tonic::Code::AlreadyExists => Ok(true),
                    Err(status) => Err(status.into()),
                }
            }
        })
        .await?;
        failovers.push(stopped_at.elapsed());
        cluster.restart(leader).await?;
        cluster.wait_for_members(3).await?;
        // The restarted node must catch up before the next round, or the
        // next kill could leave no majority with the latest log.
        let expected = round + 1;
        wait_until("the restarted node to catch up", Duration::from_secs(10), || async {
            let applied = cluster.node(leader)?.consensus.state().read(|s| s.apps.len());
            Ok(applied == expected)
        })
        .await?;
    }
    failovers.sort();
    eprintln!(
        "failover (leader stopped -> write committed): min {:?}, median {:?}, max {:?}",
        failovers[0],
        failovers[failovers.len() / 2],
        failovers[failovers.len() - 1]
    );
    cluster.shutdown().await;
    Ok(())
}
