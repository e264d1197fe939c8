//! Apps on the real Docker engine: deploy, spread, heal, roll back, scale,
//! secrets, suspend/resume/destroy, and a dead node's instances replaced.
//!
//! Every node of a test cluster uses this machine's one engine; labels keep
//! each node's containers apart. The app is `examples/hello`, compiled by the
//! test into a static binary in a `FROM scratch` image, and driven through
//! the same CLI code a user runs.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use roost_tests::apps::{hello_app, hello_toml, http_get, kill_containers, require_docker};
use roost_tests::{wait_until, Cluster};
use serde_json::Value;

async fn status(cluster: &Cluster, node: usize, app: &str) -> Result<Value> {
    let text = cluster.cli(node, &["status", "-a", app, "--json"]).await?;
    serde_json::from_str(&text).with_context(|| format!("status --json printed {text}"))
}

fn instances(status: &Value) -> Vec<Value> {
    status["instances"].as_array().cloned().unwrap_or_default()
}

/// Waits until the app's current release is `release` and runs `count`
/// instances, all on it, running and passing their checks.
async fn wait_serving(cluster: &Cluster, app: &str, release: u64, count: usize, within: Duration) -> Result<Value> {
    let last = std::sync::Mutex::new(Value::Null);
    let result = wait_until(&format!("{app} v{release} serving on {count} instances"), within, || {
        let last = &last;
        async move {
            let node = cluster.slots.iter().position(|s| s.running.is_some()).context("no node runs")?;
            let s = status(cluster, node, app).await?;
            let list = instances(&s);
            let ok = s["release"] == release
                && list.len() == count
                && list.iter().all(|i| i["release"] == release && i["state"] == "running" && i["health"] == "passing");
            *last.lock().unwrap_or_else(|p| p.into_inner()) = s;
            Ok(ok)
        }
    })
    .await;
    let last = last.into_inner().unwrap_or_else(|p| p.into_inner());
    result.with_context(|| format!("last status: {last:#}"))?;
    Ok(last)
}

fn field(instance: &Value, key: &str) -> String {
    instance[key].as_str().unwrap_or_default().to_owned()
}

/// Makes `victim` (an instance of `app`) exit through its `/crash`, and
/// waits until it runs again, restarted and passing its checks.
async fn crash_and_wait_restarted(cluster: &Cluster, app: &str, victim: &Value) -> Result<()> {
    let _ = http_get(&field(victim, "address"), "/crash").await;
    wait_until(&format!("{app}'s crashed instance restarted and passing"), Duration::from_secs(30), || async {
        let s = status(cluster, 0, app).await?;
        Ok(instances(&s).iter().any(|i| {
            i["id"] == victim["id"]
                && i["restarts"].as_u64() >= Some(1)
                && i["state"] == "running"
                && i["health"] == "passing"
        }))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_deploys_spreads_heals_scales_and_rolls_back() -> Result<()> {
    require_docker()?;
    let cluster = Cluster::start(3).await?;
    let dir = hello_app(&hello_toml("hello", "[env]\nGREETING = \"one\"\n"))?;
    let path = dir.path().to_string_lossy().into_owned();

    // A first deploy from a Dockerfile: built on the node, one instance.
    let printed = cluster.cli(1, &["deploy", &path]).await?;
    assert!(printed.contains("Successfully built") || printed.contains("built roost-hello"), "{printed}");
    assert!(printed.contains("v1 is live"), "{printed}");
    wait_serving(&cluster, "hello", 1, 1, Duration::from_secs(30)).await?;

    // Three instances, one per node, each answering at its address.
    let printed = cluster.cli(2, &["scale", "count", "3", "-a", "hello"]).await?;
    assert!(printed.contains("runs 3 instance(s)"), "{printed}");
    let s = wait_serving(&cluster, "hello", 1, 3, Duration::from_secs(30)).await?;
    let mut nodes: Vec<String> = instances(&s).iter().map(|i| field(i, "node")).collect();
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2", "n3"]);
    for instance in instances(&s) {
        let (code, body) = http_get(&field(&instance, "address"), "/").await?;
        assert_eq!(code, 200);
        assert!(body.contains(&field(&instance, "id")), "{body}");
        assert_eq!(http_get(&field(&instance, "address"), "/env/GREETING").await?.1, "one");
    }

    // Logs of all instances, from one node, tagged with instance and node.
    let logs = cluster.cli(0, &["logs", "-a", "hello"]).await?;
    for instance in instances(&s) {
        assert!(
            logs.contains(&format!("[{} {}] hello: listening", field(&instance, "id"), field(&instance, "node"))),
            "{logs}"
        );
    }

    // A crashed container is restarted.
    crash_and_wait_restarted(&cluster, "hello", &instances(&s)[0]).await?;

    // `roost restart` gives every instance a new container, a wave at a
    // time: with max_unavailable's default (a third), one of the three is
    // out of service at any moment, never more.
    let before: std::collections::BTreeSet<String> = cluster.docker.containers(None).into_iter().collect();
    assert_eq!(before.len(), 3, "{before:?}");
    let printed = cluster.cli(0, &["restart", "-a", "hello"]).await?;
    assert!(printed.contains("a wave at a time"), "{printed}");
    let most_out = std::sync::atomic::AtomicUsize::new(0);
    wait_until("every instance restarted into a new container and passing", Duration::from_secs(60), || async {
        let s = status(&cluster, 0, "hello").await?;
        let list = instances(&s);
        let out = list.iter().filter(|i| !(i["state"] == "running" && i["health"] == "passing")).count();
        most_out.fetch_max(out, std::sync::atomic::Ordering::SeqCst);
        let now: std::collections::BTreeSet<String> = cluster.docker.containers(None).into_iter().collect();
        Ok(out == 0 && list.len() == 3 && now.len() == 3 && now.is_disjoint(&before))
    })
    .await?;
    let most_out = most_out.into_inner();
    assert!(most_out <= 1, "{most_out} instances were out of service at once during the restart");

    // A second release with other settings, then the rollback command.
    std::fs::write(dir.path().join("roost.toml"), hello_toml("hello", "[env]\nGREETING = \"two\"\n"))?;
    let printed = cluster.cli(0, &["deploy", &path]).await?;
    assert!(printed.contains("v2 is live"), "{printed}");
    let s = wait_serving(&cluster, "hello", 2, 3, Duration::from_secs(30)).await?;
    assert_eq!(http_get(&field(&instances(&s)[0], "address"), "/env/GREETING").await?.1, "two");
    let printed = cluster.cli(0, &["rollback", "-a", "hello"]).await?;
    assert!(printed.contains("v3 is live"), "{printed}");
    let s = wait_serving(&cluster, "hello", 3, 3, Duration::from_secs(30)).await?;
    assert_eq!(http_get(&field(&instances(&s)[0], "address"), "/env/GREETING").await?.1, "one");
    let releases = cluster.cli(0, &["releases", "-a", "hello"]).await?;
    assert!(releases.contains("rollback to v1"), "{releases}");

    // Scale down.
    cluster.cli(0, &["scale", "count", "1", "-a", "hello"]).await?;
    wait_serving(&cluster, "hello", 3, 1, Duration::from_secs(30)).await?;
    wait_until("surplus containers removed", Duration::from_secs(20), || async {
        Ok(cluster.docker.containers(None).len() == 1)
    })
    .await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_release_rolls_back_and_bad_requests_change_nothing() -> Result<()> {
    require_docker()?;
    let cluster = Cluster::start(2).await?;
    let dir = hello_app(&hello_toml("web", ""))?;
    let path = dir.path().to_string_lossy().into_owned();
    cluster.cli(0, &["deploy", &path]).await?;
    let s = wait_serving(&cluster, "web", 1, 1, Duration::from_secs(30)).await?;
    let serving = field(&instances(&s)[0], "address");

    // The new release fails its check: the deploy fails with the check's
    // output and v1 keeps serving, untouched.
    std::fs::write(dir.path().join("roost.toml"), hello_toml("web", "[env]\nFAIL_HEALTH = \"1\"\n"))?;
    let error = cluster.cli(0, &["deploy", &path]).await.expect_err("a failing check fails the deploy");
    let message = error.to_string();
    assert!(message.contains("v2 failed and was rolled back"), "{message}");
    assert!(message.contains("answered 500"), "{message}");
    assert!(message.contains("v1 keeps serving"), "{message}");
    let s = wait_serving(&cluster, "web", 1, 1, Duration::from_secs(20)).await?;
    assert_eq!(field(&instances(&s)[0], "address"), serving);
    assert_eq!(http_get(&serving, "/health").await?.0, 200);

    // An instance too big for any node: explained, nothing changes.
    let error =
        cluster.cli(0, &["scale", "vm", "--cpus", "1", "--memory", "64gb", "-a", "web"]).await.expect_err("too big");
    assert!(error.to_string().contains("needs 64 GiB of memory; most free is"), "{error}");
    wait_serving(&cluster, "web", 1, 1, Duration::from_secs(20)).await?;

    // An invalid roost.toml is refused before anything is built.
    std::fs::write(dir.path().join("roost.toml"), "app = \"web\"\n[http_service]\ninternal_prot = 8080\n")?;
    let error = cluster.cli(0, &["deploy", &path]).await.expect_err("invalid toml");
    assert!(error.to_string().contains("internal_prot"), "{error}");
    // A release command that fails stops the deploy before any release.
    std::fs::write(
        dir.path().join("roost.toml"),
        hello_toml("web", "[deploy]\nrelease_command = \"/no-such-binary migrate\"\n"),
    )?;
    let error = cluster.cli(0, &["deploy", &path]).await.expect_err("failing release command");
    assert!(error.to_string().contains("no-such-binary"), "{error}");
    // A build that fails.
    std::fs::write(dir.path().join("roost.toml"), hello_toml("web", ""))?;
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\nCOPY missing-file /x\n")?;
    let error = cluster.cli(0, &["deploy", &path]).await.expect_err("failing build");
    assert!(error.to_string().contains("missing-file"), "{error}");
    let releases = cluster.cli(0, &["releases", "-a", "web", "--json"]).await?;
    let releases: Value = serde_json::from_str(&releases)?;
    assert_eq!(releases.as_array().map(Vec::len), Some(3), "v1, failed v2, the too-big v3: {releases:#}");
    wait_serving(&cluster, "web", 1, 1, Duration::from_secs(20)).await?;
    cluster.shutdown().await;
    Ok(())
}

/// A release command's output reaches the user bounded: its last 1000
/// lines, each cut to 4 KiB, after a line that says how many came before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_commands_output_is_cut_to_its_last_thousand_lines_of_at_most_4_kib() -> Result<()> {
    require_docker()?;
    let cluster = Cluster::start(1).await?;
    // 2,999 numbered lines and one of 10,000 bytes: 3,000 in all.
    let toml = hello_toml("chatty", "[deploy]\nrelease_command = \"/hello lines 2999\"\n");
    let dir = hello_app(&toml)?;
    let printed = cluster.cli(0, &["deploy", &dir.path().to_string_lossy()]).await?;
    assert!(printed.contains("(2000 earlier lines not shown)"), "{printed}");
    assert!(printed.contains("    line 2001\n") && printed.contains("    line 2999\n"), "{printed}");
    assert!(!printed.contains("    line 2000\n"), "an earlier line was shown");
    let cap = roost_deploy::engine::MAX_OUTPUT_LINE_BYTES;
    let long = printed.lines().find(|l| l.trim_start().starts_with("xxx")).context("the long line is shown")?;
    assert_eq!(long.trim_start().len(), cap, "cut to {cap} bytes: {}", long.len());
    assert!(long.ends_with("..."), "and says it was cut");
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_reach_the_app_only_and_suspend_resume_destroy_clean_up() -> Result<()> {
    require_docker()?;
    let cluster = Cluster::start(1).await?;
    let dir = hello_app(&hello_toml("vault", ""))?;
    let path = dir.path().to_string_lossy().into_owned();
    let value = "s3cr3t-value-7f1d2c";
    cluster
        .cli(0, &["secrets", "set", &format!("API_KEY={value}"), "-a", "vault", "--stage"])
        .await
        .expect_err("no app yet");
    cluster.cli(0, &["deploy", &path]).await?;
    wait_serving(&cluster, "vault", 1, 1, Duration::from_secs(30)).await?;

    let printed = cluster.cli(0, &["secrets", "set", &format!("API_KEY={value}"), "-a", "vault"]).await?;
    assert!(printed.contains("v2 is live"), "{printed}");
    assert!(!printed.contains(value), "{printed}");
    let s = wait_serving(&cluster, "vault", 2, 1, Duration::from_secs(30)).await?;
    let address = field(&instances(&s)[0], "address");
    assert_eq!(http_get(&address, "/env/API_KEY").await?.1, value);
    let list = cluster.cli(0, &["secrets", "list", "-a", "vault"]).await?;
    assert!(list.contains("API_KEY") && !list.contains(value), "{list}");
    let logs = cluster.cli(0, &["logs", "-a", "vault"]).await?;
    assert!(!logs.contains(value), "{logs}");
    // Nothing the node wrote holds the value in plain text.
    for slot in &cluster.slots {
        for entry in roost_tests::files_under(slot.dir.path())? {
            let bytes = std::fs::read(&entry).unwrap_or_default();
            if bytes.windows(value.len()).any(|w| w == value.as_bytes()) {
                bail!("{} holds the secret in plain text", entry.display());
            }
        }
    }

    cluster.cli(0, &["apps", "suspend", "vault"]).await?;
    wait_until("the suspended app's instance stopped", Duration::from_secs(20), || async {
        let s = status(&cluster, 0, "vault").await?;
        Ok(instances(&s).iter().all(|i| i["state"] == "stopped"))
    })
    .await?;
    let running = std::process::Command::new("docker")
        .args(["ps", "-q", "--filter", &format!("label=roost.cluster={}", cluster.docker.cluster)])
        .output()?;
    assert!(running.stdout.is_empty(), "a container still runs");
    cluster.cli(0, &["apps", "resume", "vault"]).await?;
    wait_serving(&cluster, "vault", 2, 1, Duration::from_secs(30)).await?;

    cluster.cli(0, &["apps", "destroy", "vault", "--yes"]).await?;
    wait_until("no container or image left", Duration::from_secs(30), || async {
        Ok(cluster.docker.containers(None).is_empty() && cluster.docker.images().is_empty())
    })
    .await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_nodes_instances_are_replaced_within_the_grace_period() -> Result<()> {
    require_docker()?;
    let mut cluster = Cluster::start(3).await?;
    // The first deploy starts both instances (`initial_count`), one per node.
    let dir = hello_app(&hello_toml("ha", "[placement]\nmax_per_node = 1\n\n[deploy]\ninitial_count = 2\n"))?;
    let path = dir.path().to_string_lossy().into_owned();
    cluster.cli(0, &["deploy", &path]).await?;
    let s = wait_serving(&cluster, "ha", 1, 2, Duration::from_secs(30)).await?;

    // Kill a node that is not the leader and runs an instance, with its containers.
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let (index, name) = cluster
        .slots
        .iter()
        .enumerate()
        .find(|(i, slot)| *i != leader && instances(&s).iter().any(|inst| field(inst, "node") == slot.name))
        .map(|(i, slot)| (i, slot.name.clone()))
        .context("no follower runs an instance")?;
    let node_id = cluster.node(index)?.id;
    cluster.stop(index).await?;
    let killed = kill_containers(&cluster.docker, node_id)?;
    assert_eq!(killed, 1);
    let started = std::time::Instant::now();

    // Default grace period 10 s, plus a few seconds to start and check.
    let survivor = if leader == index { 0 } else { leader };
    wait_until(&format!("both instances off {name}, running and passing"), Duration::from_secs(25), || async {
        let s = status(&cluster, survivor, "ha").await?;
        let list = instances(&s);
        Ok(list.len() == 2
            && list.iter().all(|i| field(i, "node") != name && i["state"] == "running" && i["health"] == "passing"))
    })
    .await?;
    println!("instances of a dead node passing checks elsewhere after {:.1}s", started.elapsed().as_secs_f64());

    // Back, the node removes the container whose instance moved away.
    cluster.restart(index).await?;
    wait_until(&format!("{name} removed its replaced container"), Duration::from_secs(20), || async {
        Ok(cluster.docker.containers(Some(node_id)).is_empty())
    })
    .await?;
    let s = status(&cluster, survivor, "ha").await?;
    assert!(instances(&s).iter().all(|i| field(i, "node") != name), "{s:#}");
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_run_least_privileged_and_only_the_clusters_images_run_or_leave_a_node() -> Result<()> {
    require_docker()?;
    let cluster = Cluster::start(1).await?;
    let dir = hello_app(&hello_toml("locked", ""))?;
    // The image names a non-root user: the instance runs as it.
    let dockerfile = std::fs::read_to_string(dir.path().join("Dockerfile"))?;
    std::fs::write(dir.path().join("Dockerfile"), format!("{dockerfile}USER 65534:65534\n"))?;
    let path = dir.path().to_string_lossy().into_owned();
    cluster.cli(0, &["deploy", &path]).await?;
    wait_serving(&cluster, "locked", 1, 1, Duration::from_secs(30)).await?;
    let containers = cluster.docker.containers(None);
    let [container] = containers.as_slice() else { bail!("one container expected, found {containers:?}") };
    let out = std::process::Command::new("docker").args(["inspect", container]).output()?;
    let inspected: Value = serde_json::from_slice(&out.stdout).context("docker inspect")?;
    let host = &inspected[0]["HostConfig"];
    assert_eq!(host["PidsLimit"], 4096, "{host}");
    assert_eq!(host["SecurityOpt"], serde_json::json!(["no-new-privileges:true"]), "{host}");
    assert_eq!(host["CapDrop"], serde_json::json!(["NET_RAW"]), "{host}");
    assert_eq!(inspected[0]["Config"]["User"], "65534:65534");

    // An image the engine has but that is not this cluster's is not handed
    // to a peer, even one with a member's certificate.
    let image = inspected[0]["Image"].as_str().context("no image")?.to_owned();
    let foreign = format!("roost-test-foreign-{}", cluster.docker.cluster);
    let mut build = std::process::Command::new("docker")
        .args(["build", "-q", "-t", &foreign, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    std::io::Write::write_all(
        build.stdin.as_mut().context("stdin")?,
        format!("FROM {image}\nLABEL roost.cluster=elsewhere\n").as_bytes(),
    )?;
    drop(build.stdin.take());
    assert!(build.wait()?.success(), "docker build of the foreign image");
    let tls = roost_tests::node_tls(cluster.slots[0].dir.path())?;
    let channel = tls.connect(&cluster.node(0)?.address).await?;
    let mut agent = roost_proto::cluster::agent_client::AgentClient::new(channel);
    let status = agent
        .pull_image(roost_proto::cluster::PullImageRequest { image: foreign.clone() })
        .await
        .expect_err("a foreign image must not leave the node");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // The cluster's own image does.
    let mut stream = agent.pull_image(roost_proto::cluster::PullImageRequest { image }).await?.into_inner();
    assert!(stream.message().await?.is_some(), "the cluster's image is exported");
    drop(stream);

    // Nor is it run, even when a release names it (as a forged deploy
    // would): the agent refuses it, and the deploy fails saying why.
    let out = std::process::Command::new("docker").args(["inspect", "--format", "{{.Id}}", &foreign]).output()?;
    let foreign_id = String::from_utf8(out.stdout)?.trim().to_owned();
    let node = cluster.node(0)?;
    let mut spec = node
        .consensus
        .state()
        .read(|s| s.apps.get("locked").and_then(|a| a.releases.values().last()).map(|r| r.spec.clone()))
        .context("the app's release")?;
    spec.image = foreign_id.clone();
    spec.image_ref = foreign.clone();
    let deploy = roost_raft::Command::Deploy { app: "locked".into(), spec, description: "deploy".into() };
    node.consensus.propose(deploy, tokio::time::Instant::now() + Duration::from_secs(10)).await?;
    roost_tests::wait_until("the foreign release to fail", Duration::from_secs(60), || async {
        let reason = node.consensus.state().read(|s| {
            s.apps.get("locked").and_then(|a| a.releases.values().find(|r| r.spec.image == foreign_id)?.reason.clone())
        });
        Ok(reason.is_some_and(|r| r.contains("was not built or uploaded through this cluster")))
    })
    .await?;
    let running = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("ancestor={foreign}")])
        .output()?;
    assert!(String::from_utf8(running.stdout)?.trim().is_empty(), "a container of the foreign image exists");
    let _ = std::process::Command::new("docker").args(["rmi", "-f", &foreign]).output();
    cluster.shutdown().await;
    Ok(())
}

/// The agent works on instances side by side: an instance that takes its
/// whole `kill_timeout` to stop (it ignores SIGTERM) holds back no restart
/// of another instance on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_slow_to_stop_holds_back_no_restart_of_another() -> Result<()> {
    require_docker()?;
    let cluster = Cluster::start(1).await?;
    let slow_toml = format!("kill_timeout = \"120s\"\n{}", hello_toml("slow", "[env]\nIGNORE_SIGTERM = \"1\"\n"));
    let slow = hello_app(&slow_toml)?;
    let fast = hello_app(&hello_toml("fast", ""))?;
    for dir in [&slow, &fast] {
        cluster.cli(0, &["deploy", &dir.path().to_string_lossy()]).await?;
    }
    wait_serving(&cluster, "slow", 1, 1, Duration::from_secs(30)).await?;
    let s = wait_serving(&cluster, "fast", 1, 1, Duration::from_secs(30)).await?;
    let slow_container = || {
        let out = std::process::Command::new("docker")
            .args(["ps", "-q", "--filter", &format!("label=roost.cluster={}", cluster.docker.cluster)])
            .args(["--filter", "label=roost.app=slow"])
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default()
    };
    assert!(!slow_container().is_empty(), "slow's container runs");

    // Destroying slow sends its container SIGTERM, which it ignores: the
    // stop takes 120 s. Meanwhile fast's instance crashes.
    cluster.cli(0, &["apps", "destroy", "slow", "--yes"]).await?;
    crash_and_wait_restarted(&cluster, "fast", &instances(&s)[0]).await?;
    // The restart did not wait for the stop: slow's container is still in
    // its kill timeout.
    assert!(!slow_container().is_empty(), "slow's container was gone before fast restarted: the stop held it back");
    cluster.shutdown().await;
    Ok(())
}

/// A token confined to one app may not read another app's files through
/// the node's engine: not by deploying its image, nor by a build that
/// starts `FROM` it, copies out of it, names it through an ARG, names an
/// unlabelled image by its ID, or runs an `ONBUILD` trigger that does. The admin token may; the confined token
/// still builds its own app.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deploy_token_may_not_build_from_copy_out_of_or_deploy_another_apps_image() -> Result<()> {
    require_docker()?;
    let cluster = Cluster::start(1).await?;
    let image_of = |app: &'static str| {
        let cluster = &cluster;
        async move {
            let releases: Value = serde_json::from_str(&cluster.cli(0, &["releases", "-a", app, "--json"]).await?)?;
            let image = releases[0]["image"].as_str().map(str::to_owned);
            image.with_context(|| format!("no image in {app}'s releases: {releases:#}"))
        }
    };
    let db = hello_app(&hello_toml("db", ""))?;
    cluster.cli(0, &["deploy", &db.path().to_string_lossy()]).await?;
    let db_image = image_of("db").await?;
    cluster.cli(0, &["apps", "create", "web"]).await?;
    let printed = cluster.cli(0, &["tokens", "create", "--json", "--scope", "deploy:web", "--name", "ci"]).await?;
    let printed: Value = serde_json::from_str(&printed)?;
    let token = printed["token"].as_str().context("tokens create --json prints a token")?.to_owned();
    let address = cluster.node(0)?.address.clone();
    let web = hello_app(&hello_toml("web", ""))?;
    let web_path = web.path().to_string_lossy().into_owned();
    let dockerfile = |text: String| std::fs::write(web.path().join("Dockerfile"), text);
    let confined = |args: Vec<String>| {
        let (address, token) = (address.clone(), token.clone());
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            roost_tests::apps::cli(&address, &token, &args).await
        }
    };
    let deploy_web = || vec!["deploy".to_owned(), web_path.clone()];

    let onbuild =
        format!("FROM scratch\nCOPY hello /hello\nONBUILD COPY --from={db_image} /hello /stolen\nCMD [\"/hello\"]\n");
    let refused = [
        ("FROM", format!("FROM {db_image}\n"), "belongs to another app"),
        ("COPY --from", format!("FROM scratch\nCOPY --from={db_image} /hello /hello\n"), "belongs to another app"),
        ("an ARG", format!("ARG BASE={db_image}\nFROM $BASE\n"), "belongs to another app"),
        ("a variable without a value", "ARG BASE\nFROM $BASE\n".to_owned(), "cannot resolve"),
        ("an ONBUILD trigger", onbuild.clone(), "belongs to another app"),
    ];
    for (case, text, why) in refused {
        dockerfile(text)?;
        let error = confined(deploy_web()).await.expect_err(case);
        assert!(error.to_string().contains(why), "{case}: {error}");
    }
    // An image without labels, such as an intermediate one of another
    // app's build, named by its ID.
    let unlabelled = roost_tests::topology::docker(&["build", "-q", &db.path().to_string_lossy()])?;
    let short = unlabelled.trim_start_matches("sha256:")[..12].to_owned();
    dockerfile(format!("FROM {short}\n"))?;
    let error = confined(deploy_web()).await.expect_err("FROM an unlabelled image by its ID");
    assert!(error.to_string().contains("named by its ID"), "{error}");
    let _ = roost_tests::topology::docker(&["rmi", &unlabelled]);
    let mut args = deploy_web();
    args.extend(["--image".to_owned(), db_image.clone()]);
    let error = confined(args).await.expect_err("--image of db's image");
    assert!(error.to_string().contains("belongs to another app"), "{error}");

    // An image of web's own that the admin built with a trigger that reads
    // db's image: a confined build FROM it would run the trigger.
    dockerfile(onbuild)?;
    cluster.cli(0, &["deploy", &web_path]).await?;
    let trapped = image_of("web").await?;
    dockerfile(format!("FROM {trapped}\n"))?;
    let error = confined(deploy_web()).await.expect_err("a build FROM an image whose trigger reads db's");
    assert!(error.to_string().contains(&format!("the image {db_image} belongs to another app")), "{error}");

    // What the token may do, and what the admin may.
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello/Dockerfile"),
        web.path().join("Dockerfile"),
    )?;
    confined(deploy_web()).await?;
    dockerfile(format!("FROM {db_image}\n"))?;
    cluster.cli(0, &["deploy", &web_path]).await?;
    let releases: Value = serde_json::from_str(&cluster.cli(0, &["releases", "-a", "web", "--json"]).await?)?;
    assert_eq!(releases.as_array().map(Vec::len), Some(3), "only the allowed deploys made releases: {releases:#}");
    cluster.shutdown().await;
    Ok(())
}

/// A node builds one image at a time: a deploy that arrives while another
/// one builds waits, says so, and then goes through, as does the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_build_on_a_node_waits_for_the_first_and_says_so() -> Result<()> {
    require_docker()?;
    let cluster = Cluster::start(1).await?;
    let slow = hello_app(&hello_toml("slow", ""))?;
    // The first build has a step that lasts 20 s.
    let dockerfile =
        "FROM scratch\nCOPY hello /hello\nRUN [\"/hello\", \"sleep\", \"20\"]\nEXPOSE 8080\nCMD [\"/hello\"]\n";
    std::fs::write(slow.path().join("Dockerfile"), dockerfile)?;
    let fast = hello_app(&hello_toml("fast", ""))?;
    let slow_dir = slow.path().display().to_string();
    let fast_dir = fast.path().display().to_string();
    // Both in this task: the CLI's future stays on one thread.
    let first_args = ["deploy", slow_dir.as_str()];
    let first = cluster.cli(0, &first_args);
    let second = async {
        wait_until("the first build to run its slow step", Duration::from_secs(60), || async {
            let running = roost_tests::topology::docker(&["ps", "--no-trunc", "--format", "{{.Command}}"])?;
            Ok(running.contains("/hello sleep 20"))
        })
        .await?;
        cluster.cli(0, &["deploy", &fast_dir]).await.map_err(|e| anyhow::anyhow!("the second deploy: {e}"))
    };
    let (first, second) = tokio::join!(first, second);
    let printed = second?;
    assert!(printed.contains("waiting for another build on n1 to finish"), "{printed}");
    let first = first.map_err(|e| anyhow::anyhow!("the first deploy: {e}"))?;
    assert!(first.contains("Release v1 of slow created"), "{first}");
    cluster.shutdown().await;
    Ok(())
}
