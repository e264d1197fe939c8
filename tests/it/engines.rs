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
    // The upload's own name, on an image without the cluster's labels, is gone.
    assert!(topology.exec(0, &format!("docker image inspect {image}")).is_err(), "{image} still on n1");
    Ok(())
}

/// `Engine::adopt` marks an image made outside the cluster as the
/// cluster's: a new image with the same layers and configuration plus the
/// labels, which runs; an image that carries the labels already is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_adopted_image_keeps_its_layers_and_config_gains_the_labels_and_runs() -> Result<()> {
    use roost_deploy::engine::{Engine, LABEL_APP, LABEL_CLUSTER};
    roost_tests::apps::require_docker()?;
    let app = hello_app(&hello_toml("adopt", ""))?;
    let image = format!("roost-it-adopt:{}", std::process::id());
    let tag = format!("{image}-adopted");
    docker(&["build", "-q", "--label", "mine=kept", "-t", &image, &app.path().to_string_lossy()])?;
    let engine = Engine::connect(None).await?;
    let labels = std::collections::HashMap::from([
        (LABEL_CLUSTER.to_owned(), "c1".to_owned()),
        (LABEL_APP.to_owned(), "adopt".to_owned()),
    ]);
    let mut container = None;
    let result = async {
        let id = engine.adopt(&image, &tag, &labels).await?;
        let inspect = |reference: &str, format: &str| docker(&["image", "inspect", "-f", format, reference]);
        assert_ne!(id, inspect(&image, "{{.Id}}")?, "a new image");
        assert_eq!(inspect(&tag, "{{.Id}}")?, id, "tagged as asked");
        let kept = [
            "{{json .RootFS.Layers}}",
            "{{json .Config.Cmd}}",
            "{{json .Config.ExposedPorts}}",
            "{{json .Config.Env}}",
        ];
        for format in kept.into_iter().chain(["{{.Os}}/{{.Architecture}}"]) {
            assert_eq!(inspect(&id, format)?, inspect(&image, format)?, "{format}");
        }
        let got: std::collections::HashMap<String, String> =
            serde_json::from_str(&inspect(&id, "{{json .Config.Labels}}")?)?;
        assert_eq!(got.get("mine").map(String::as_str), Some("kept"), "{got:?}");
        assert!(labels.iter().all(|(k, v)| got.get(k) == Some(v)), "{got:?}");
        assert_eq!(engine.adopt(&id, "roost-it-adopt-unused:1", &labels).await?, id, "already the cluster's");

        let started = docker(&["run", "-d", "--init", &id])?;
        container = Some(started.clone());
        wait_until("the adopted image's server to answer", Duration::from_secs(20), || async {
            Ok(docker(&["exec", &started, "/hello", "check"]).is_ok())
        })
        .await
    }
    .await;
    if let Some(container) = container {
        let _ = docker(&["rm", "-f", &container]);
    }
    let _ = docker(&["rmi", "-f", &tag, &image]);
    result
}
