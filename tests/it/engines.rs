//! Two nodes, each in its own container with its own Docker engine: the image
//! built on one node reaches the other only through Roost's node-to-node
//! transfer (`Agent.PullImage`: docker save, streamed over mutual TLS, docker
//! load). This is the case a real cluster has on every deploy, which the
//! single-engine tests cannot show.

use std::time::Duration;

use anyhow::{bail, Result};
use roost_tests::apps::{cli, hello_app, hello_toml};
use roost_tests::topology::{docker, Topology};
use roost_tests::wait_until;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_built_on_one_engine_runs_on_another() -> Result<()> {
    let topology = Topology::start(&format!("roost-it-{}-img", std::process::id()), 2).await?;
    topology.init(0, "")?;
    let admin = topology.file(0, "/data/node/admin.token").await?;
    let join = topology.file(0, "/data/node/join.token").await?;
    topology.join(1, &join, "")?;
    let seed = topology.endpoint(0);
    wait_until("two nodes up", Duration::from_secs(60), || async {
        let list = cli(&seed, &admin, &["node", "list", "--json"]).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let nodes: Value = serde_json::from_str(&list)?;
        Ok(nodes.as_array().is_some_and(|l| l.len() == 2 && l.iter().all(|n| n["state"] == "up")))
    })
    .await?;

    // Built on n1 (the node the CLI talks to); n2 must fetch it from n1.
    let app = hello_app(&hello_toml("far", "[placement]\nmax_per_node = 1\n"))?;
    let path = app.path().to_string_lossy().into_owned();
    let result = async {
        cli(&seed, &admin, &["deploy", &path]).await?;
        cli(&seed, &admin, &["scale", "count", "2", "-a", "far"]).await
    }
    .await;
    if let Err(error) = result {
        bail!("{error}\n{}", topology.logs());
    }
    // `scale` returns once both run; the checks follow.
    wait_until("the instance on n2 running and passing", Duration::from_secs(30), || async {
        let status: Value = serde_json::from_str(&cli(&seed, &admin, &["status", "-a", "far", "--json"]).await?)?;
        Ok(status["instances"].as_array().is_some_and(|l| {
            l.iter().any(|i| i["node"] == "n2" && i["state"] == "running" && i["health"] == "passing")
        }))
    })
    .await?;
    assert!(topology.log(1).contains("image fetched"), "{}", topology.log(1));

    // An image only this machine's engine has: the CLI uploads it to n1.
    let image = format!("roost-it-upload:{}", std::process::id());
    docker(&["build", "-q", "-t", &image, &path])?;
    let uploaded = async {
        let printed = cli(&seed, &admin, &["deploy", &path, "-a", "up", "--image", &image]).await;
        let _ = docker(&["rmi", "-f", &image]);
        printed
    }
    .await;
    let printed = match uploaded {
        Ok(printed) => printed,
        Err(error) => bail!("{error}\n{}", topology.logs()),
    };
    assert!(printed.contains("Uploading image") && printed.contains("v1 is live"), "{printed}");
    Ok(())
}
