//! The built `roost` binary, driven the way the README tells a user to:
//! init, join two more, use the CLI against different nodes, SIGKILL the
//! leader, keep writing, restart the killed node with its original command.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use roost_tests::apps::{hello_app, hello_toml};
use roost_tests::process::{roost, wait_for_nodes, NodeProcess};
use roost_tests::wait_until;
use serde_json::Value;

fn names(nodes: &[Value], key: &str, value: &str) -> Vec<String> {
    nodes.iter().filter(|n| n[key] == value).filter_map(|n| n["name"].as_str().map(str::to_owned)).collect()
}

async fn app_list(endpoint: &str, token: &str, stale: bool) -> Result<Vec<String>> {
    let mut args = vec!["apps", "list", "--json"];
    if stale {
        args.push("--stale");
    }
    let out = roost(&args, Some(endpoint), Some(token)).await?;
    if out.code != 0 {
        bail!("apps list exited {}: {}", out.code, out.stderr.trim());
    }
    let apps: Vec<Value> = serde_json::from_str(&out.stdout)?;
    Ok(apps.iter().filter_map(|a| a["name"].as_str().map(str::to_owned)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_runs_a_three_node_cluster_and_survives_a_killed_leader() -> Result<()> {
    let root = tempfile::Builder::new().prefix("roost-binary-").tempdir()?;
    let result = scenario(root.path()).await;
    if result.is_err() {
        // Keep the logs and data of a failed run for inspection.
        eprintln!("logs and data kept in {}", root.keep().display());
    }
    result
}

async fn scenario(root: &std::path::Path) -> Result<()> {
    let n1 = NodeProcess::init(root, "n1")?;
    wait_until("n1 to write its admin token", Duration::from_secs(30), || async {
        Ok(n1.data_dir.join("admin.token").exists() && n1.data_dir.join("join.token").exists())
    })
    .await?;
    let admin = n1.read_token("admin.token")?;
    let join = n1.read_token("join.token")?;
    wait_for_nodes(&n1.address, &admin, Duration::from_secs(30), "n1 to serve", |n| n.len() == 1).await?;
    let banner = n1.stdout();
    assert!(banner.contains(&format!("roost node join {}", n1.address)), "{banner}");
    assert!(banner.contains(&join) && banner.contains(&admin), "the tokens are printed once: {banner}");

    let n2 = NodeProcess::join(root, "n2", &n1.address, &join)?;
    let n3 = NodeProcess::join(root, "n3", &n2.address, &join)?;
    let mut nodes = [n1, n2, n3];
    wait_for_nodes(&nodes[2].address, &admin, Duration::from_secs(30), "three voters, all up", |n| {
        n.len() == 3
            && names(n, "state", "up").len() == 3
            && names(n, "role", "leader").len() == 1
            && names(n, "role", "voter").len() == 2
    })
    .await?;

    // Apps created through each node are visible through every other.
    for (i, node) in nodes.iter().enumerate() {
        let out = roost(&["apps", "create", &format!("app{}", i + 1)], Some(&node.address), Some(&admin)).await?;
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(out.stdout.contains("Created app"), "{}", out.stdout);
    }
    assert_eq!(app_list(&nodes[0].address, &admin, false).await?, ["app1", "app2", "app3"]);

    // Errors a user may hit, each with its exit code and a useful line.
    let out = roost(&["apps", "create", "Bad_Name"], Some(&nodes[1].address), Some(&admin)).await?;
    assert_eq!(out.code, 7, "{}", out.stderr);
    assert!(out.stderr.contains("lowercase letters"), "{}", out.stderr);
    let out = roost(&["apps", "create", "app1"], Some(&nodes[1].address), Some(&admin)).await?;
    assert_eq!(out.code, 6, "{}", out.stderr);
    let out = roost(&["apps", "show", "nope"], Some(&nodes[1].address), Some(&admin)).await?;
    assert_eq!(out.code, 5, "{}", out.stderr);
    let out = roost(&["apps", "list"], Some(&nodes[1].address), Some(&join)).await?;
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(out.stderr.contains("join token"), "{}", out.stderr);
    let dead = format!("127.0.0.1:{}", roost_tests::process::free_port()?);
    let out = roost(&["apps", "list"], Some(&dead), Some(&admin)).await?;
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(out.stderr.contains("cannot reach"), "{}", out.stderr);
    let out = roost(&["apps", "destroy", "app3"], Some(&nodes[1].address), Some(&admin)).await?;
    assert_eq!(out.code, 2, "destroy without --yes off a terminal must refuse: {}", out.stderr);
    let out = roost(&["node", "token"], Some(&nodes[2].address), Some(&admin)).await?;
    assert_eq!(out.stdout.trim(), join);

    // Joining again under a taken name is refused; the cluster is unchanged.
    let dup_root = root.join("dup");
    std::fs::create_dir_all(&dup_root)?;
    let mut dup = NodeProcess::join(&dup_root, "n1", &nodes[0].address, &join).context("dup")?;
    assert_ne!(dup.wait_for_exit(Duration::from_secs(30)).await?, Some(0));
    assert!(dup.stderr().contains("already in the cluster"), "{}", dup.stderr());

    // SIGKILL the leader.
    let out = roost(&["node", "list", "--json"], Some(&nodes[0].address), Some(&admin)).await?;
    let listed: Vec<Value> = serde_json::from_str(&out.stdout)?;
    let leader_name = names(&listed, "role", "leader").pop().context("a leader")?;
    let killed = nodes.iter().position(|n| n.name == leader_name).context("leader process")?;
    nodes[killed].kill()?;
    let survivor = nodes.iter().position(|n| n.name != leader_name).context("survivor")?;
    let survivor_address = nodes[survivor].address.clone();

    // The new leader has heard from nobody yet, which is no silence: in
    // each of its answers, until it shows the killed node down, neither
    // survivor is shown down, whichever of its tasks looked first.
    let survivors: Vec<String> = nodes.iter().filter(|n| n.name != leader_name).map(|n| n.name.clone()).collect();
    let shown_down = std::sync::Mutex::new(Vec::new());
    wait_for_nodes(&survivor_address, &admin, Duration::from_secs(15), "the killed node shown down", |n| {
        let down = names(n, "state", "down");
        if names(n, "role", "leader").iter().any(|l| *l != leader_name) && survivors.iter().any(|s| down.contains(s)) {
            shown_down.lock().unwrap_or_else(|p| p.into_inner()).push(n.to_vec());
        }
        down == [leader_name.clone()]
    })
    .await?;
    let shown_down = shown_down.into_inner().unwrap_or_else(|p| p.into_inner());
    assert!(shown_down.is_empty(), "a survivor shown down by the new leader: {shown_down:?}");

    // Writes keep working through a survivor; the CLI rides out the election.
    let out = roost(&["apps", "create", "after-kill"], Some(&survivor_address), Some(&admin)).await?;
    assert_eq!(out.code, 0, "{}", out.stderr);

    // The killed node restarts with its original command line and catches up.
    nodes[killed].start()?;
    let restarted = nodes[killed].address.clone();
    wait_until("the restarted node to have every app", Duration::from_secs(30), || async {
        Ok(app_list(&restarted, &admin, true).await? == ["after-kill", "app1", "app2", "app3"])
    })
    .await?;
    wait_for_nodes(&restarted, &admin, Duration::from_secs(15), "all three up again", |n| {
        names(n, "state", "up").len() == 3
    })
    .await?;

    // Without a majority, writes fail with a hint instead of hanging.
    let others: Vec<usize> = (0..3).filter(|i| *i != survivor).collect();
    for i in others {
        nodes[i].kill()?;
    }
    let out = roost(&["apps", "create", "no-quorum"], Some(&survivor_address), Some(&admin)).await?;
    assert_eq!(out.code, 8, "{}", out.stderr);
    assert!(out.stderr.contains("majority of voters"), "{}", out.stderr);

    // SIGTERM stops a node cleanly.
    let code = nodes[survivor].terminate(Duration::from_secs(15)).await?;
    assert_eq!(code, Some(0), "{}", nodes[survivor].stderr());
    Ok(())
}

/// A node whose wall clock is an hour behind (libfaketime) refuses a token
/// that has expired by the leader's clock, as every other node does: expiry
/// is judged by the later of the node's clock and the leader's, which each
/// heartbeat's answer carries. The node also says its clock is off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_an_hour_behind_refuses_a_token_expired_by_the_leaders_clock() -> Result<()> {
    let root = tempfile::Builder::new().prefix("roost-clock-").tempdir()?;
    let n1 = NodeProcess::init(root.path(), "n1")?;
    let admin = n1.read_token_when_ready("admin.token").await?;
    let join = n1.read_token_when_ready("join.token").await?;
    let n2 = NodeProcess::join(root.path(), "n2", &n1.address, &join)?;
    let n3 = NodeProcess::join_with_clock_behind(root.path(), "n3", &n1.address, &join, 3600)?;
    wait_for_nodes(&n1.address, &admin, Duration::from_secs(60), "three nodes up, n1 leading", |n| {
        names(n, "state", "up").len() == 3 && names(n, "role", "leader") == ["n1"]
    })
    .await?;
    wait_until("n3 to say its clock is behind the leader's", Duration::from_secs(30), || async {
        // 3600.0s, or a little less when a loaded machine delays the answer.
        Ok(n3.stderr().contains("clock is 3") && n3.stderr().contains("s behind the leader's"))
    })
    .await
    .with_context(|| n3.stderr())?;

    let out =
        roost(&["tokens", "create", "--scope", "read", "--expires", "5s", "--json"], Some(&n1.address), Some(&admin))
            .await?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let printed: Value = serde_json::from_str(&out.stdout)?;
    let token = printed["token"].as_str().context("tokens create --json prints a token")?.to_owned();
    let list = |node: &NodeProcess| {
        let (address, token) = (node.address.clone(), token.clone());
        async move { roost(&["apps", "list"], Some(&address), Some(&token)).await }
    };
    let used = list(&n3).await?;
    assert_eq!(used.code, 0, "the token works on n3 before it expires: {}", used.stderr);

    wait_until("n1 to refuse the expired token", Duration::from_secs(30), || async {
        let out = list(&n1).await?;
        Ok(out.code == 4 && out.stderr.contains("expired"))
    })
    .await?;
    for node in [&n2, &n3] {
        let out = list(node).await?;
        assert_eq!(out.code, 4, "{} accepted an expired token: {}{}", node.name, out.stdout, out.stderr);
        assert!(out.stderr.contains("expired"), "{}: {}", node.name, out.stderr);
    }
    let led = roost(&["node", "list", "--json"], Some(&n1.address), Some(&admin)).await?;
    let nodes: Vec<Value> = serde_json::from_str(&led.stdout)?;
    assert_eq!(names(&nodes, "role", "leader"), ["n1"], "the leader's clock stayed the reference");
    Ok(())
}

/// A CLI that talks to a node the moment it can connect (`node init` has
/// just written `admin.token`; `node join` has just started serving) is
/// served once the node knows the cluster, not refused because it does not
/// yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_call_to_a_node_still_starting_is_held_until_the_node_knows_the_cluster() -> Result<()> {
    let root = tempfile::Builder::new().prefix("roost-starting-").tempdir()?;
    let n1 = NodeProcess::init(root.path(), "n1")?;
    first_contact(&n1, || n1.read_token("admin.token").is_ok_and(|t| !t.is_empty())).await?;
    let admin = n1.read_token("admin.token")?;
    let listed = roost(&["apps", "list", "--json"], Some(&n1.address), Some(&admin)).await?;
    assert_eq!(listed.code, 0, "n1 refused a call made as soon as it wrote admin.token: {}", listed.stderr);

    let created = roost(&["apps", "create", "early"], Some(&n1.address), Some(&admin)).await?;
    assert_eq!(created.code, 0, "{}", created.stderr);
    let join = n1.read_token("join.token")?;
    let n2 = NodeProcess::join(root.path(), "n2", &n1.address, &join)?;
    first_contact(&n2, || true).await?;
    let apps = app_list(&n2.address, &admin, false).await.context("the first call to n2 as it joins")?;
    assert_eq!(apps, ["early"], "n2 answered before it knew the cluster's apps");
    Ok(())
}

/// Polls (every 2 ms, no CLI in between) until `ready` holds and the node's
/// port accepts a connection.
async fn first_contact(node: &NodeProcess, ready: impl Fn() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if ready() && tokio::net::TcpStream::connect(&node.address).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{} did not accept connections within 30s: {}", node.name, node.stderr());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A node started with `--max-upload 1mb` refuses a deploy whose build
/// context is larger, says why and what to do, and creates nothing; a
/// limit below 1mb is refused before the node starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_context_over_the_nodes_max_upload_is_refused_and_creates_nothing() -> Result<()> {
    let root = tempfile::Builder::new().prefix("roost-upload-").tempdir()?;
    let tiny = root.path().join("tiny");
    let dir = tiny.display().to_string();
    let out =
        roost(&["node", "init", "--data-dir", &dir, "--listen", "127.0.0.1:0", "--max-upload", "10kb"], None, None)
            .await?;
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(out.stderr.contains("--max-upload must be at least 1mb, got 10kb"), "{}", out.stderr);
    assert!(!tiny.exists(), "a refused init leaves no data directory");

    let n1 = NodeProcess::init_with(root.path(), "n1", &["--max-upload", "1mb"])?;
    let admin = n1.read_token_when_ready("admin.token").await?;
    let app = hello_app(&hello_toml("big", ""))?;
    // 3 MiB that no compression shrinks.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..3 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(app.path().join("noise.bin"), noise)?;
    let out = roost(&["deploy", &app.path().to_string_lossy()], Some(&n1.address), Some(&admin)).await?;
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(
        out.stderr.contains("over this node's limit of 1 MiB") && out.stderr.contains("--max-upload"),
        "{}",
        out.stderr
    );
    assert!(app_list(&n1.address, &admin, false).await?.is_empty(), "the refused deploy created no app");
    Ok(())
}

/// `roost node token --role worker` prints a token for nodes that never
/// vote: with two workers and three nodes that may vote, the cluster's three
/// voters are the latter, `node list` shows the workers as `worker`, and
/// removing a node rotates both tokens; the removed node exits and takes its
/// instance network off the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_joined_with_the_worker_token_never_vote() -> Result<()> {
    let root = tempfile::Builder::new().prefix("roost-workers-").tempdir()?;
    let n1 = NodeProcess::init(root.path(), "n1")?;
    let admin = n1.read_token_when_ready("admin.token").await?;
    let voter_token = n1.read_token_when_ready("join.token").await?;
    let token = |role: &'static str| {
        let (address, admin) = (n1.address.clone(), admin.clone());
        async move {
            let out = roost(&["node", "token", "--role", role], Some(&address), Some(&admin)).await?;
            anyhow::ensure!(out.code == 0, "node token --role {role}: {}", out.stderr);
            Ok(out.stdout.trim().to_owned())
        }
    };
    let worker_token = token("worker").await?;
    assert_ne!(worker_token, voter_token);
    assert_eq!(token("voter").await?, voter_token);
    let out = roost(&["node", "token", "--role", "boss"], Some(&n1.address), Some(&admin)).await?;
    assert_eq!(out.code, 2, "{}", out.stderr);

    // The workers join first: the controller would have made them voters.
    let w1 = NodeProcess::join(root.path(), "w1", &n1.address, &worker_token)?;
    let mut w2 = NodeProcess::join(root.path(), "w2", &n1.address, &worker_token)?;
    wait_for_nodes(&n1.address, &admin, Duration::from_secs(60), "two workers up", |n| {
        names(n, "role", "worker").len() == 2 && names(n, "state", "up").len() == 3
    })
    .await?;
    let n2 = NodeProcess::join(root.path(), "n2", &n1.address, &voter_token)?;
    let n3 = NodeProcess::join(root.path(), "n3", &n1.address, &voter_token)?;
    wait_for_nodes(&w1.address, &admin, Duration::from_secs(60), "three voters: n1, n2, n3", |n| {
        let mut voting = [names(n, "role", "leader"), names(n, "role", "voter")].concat();
        voting.sort();
        voting == ["n1", "n2", "n3"] && names(n, "state", "up").len() == 5
    })
    .await?;
    let out = roost(&["node", "list", "--json"], Some(&n2.address), Some(&admin)).await?;
    let listed: Vec<Value> = serde_json::from_str(&out.stdout)?;
    assert!(w1.stdout().contains("(id ") && w1.stdout().contains("as a worker"), "{}", w1.stdout());
    let mut workers = names(&listed, "role", "worker");
    workers.sort();
    assert_eq!(workers, ["w1", "w2"], "{listed:?}");
    // A worker serves the CLI's reads and changes to apps; creating an app
    // is an admin's change, which it leaves to the voters, naming them.
    let out = roost(&["apps", "create", "via-worker"], Some(&w2.address), Some(&admin)).await?;
    assert_ne!(out.code, 0, "an app created through a worker: {}", out.stdout);
    assert!(out.stderr.contains("this node is a worker"), "{}", out.stderr);
    let out = roost(&["apps", "create", "via-worker"], Some(&n1.address), Some(&admin)).await?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = roost(&["apps", "list"], Some(&w2.address), Some(&admin)).await?;
    assert!(out.code == 0 && out.stdout.contains("via-worker"), "{}{}", out.stdout, out.stderr);

    let w2_id = listed.iter().find(|n| n["name"] == "w2").and_then(|n| n["id"].as_u64()).context("w2's id")?;
    let identity: Value = serde_json::from_str(&std::fs::read_to_string(n1.data_dir.join("node.json"))?)?;
    let cluster = identity["cluster_id"].as_str().context("cluster id")?.to_owned();
    let w2_network = || {
        roost_tests::topology::docker(&[
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("label=roost.cluster={cluster}"),
            "--filter",
            &format!("label=roost.node={w2_id}"),
        ])
    };
    wait_until("w2's instance network", Duration::from_secs(30), || async { Ok(!w2_network()?.is_empty()) }).await?;

    let out = roost(&["node", "remove", "w2"], Some(&n3.address), Some(&admin)).await?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    // Rotated once w2 is out of Raft's membership, so it never sees the new ones.
    wait_until("both join tokens to rotate", Duration::from_secs(30), || async {
        Ok(token("worker").await? != worker_token && token("voter").await? != voter_token)
    })
    .await?;
    let code = w2.wait_for_exit(Duration::from_secs(60)).await?;
    assert_eq!(code, Some(10), "exit code 10: removed; {}", w2.stderr());
    assert_eq!(w2_network()?, "", "the removed node's instance network is gone");
    Ok(())
}

/// A worker holds none of the cluster's keys: its data directory has no
/// secrets key, and no file of it holds a private key but its own or a join
/// secret. It still runs an instance with its secrets (opened by a voter for
/// that instance only) and serves APP.DOMAIN over TLS with a certificate a
/// voter made for it; what needs the keys (setting secrets, printing a join
/// token, admitting a node) it refuses, naming the voters to use instead;
/// and a voter answers its requests for edge certificates at a bounded rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_holds_no_cluster_keys_yet_runs_secrets_and_serves_tls() -> Result<()> {
    use roost_proto::cluster::keys_client::KeysClient;
    use roost_proto::cluster::{EdgeCertificatesRequest, InstanceSecretsRequest};

    let root = tempfile::Builder::new().prefix("roost-keys-").tempdir()?;
    let n1 = NodeProcess::init(root.path(), "n1")?;
    let admin = n1.read_token_when_ready("admin.token").await?;
    let voter_token = n1.read_token_when_ready("join.token").await?;
    let out = roost(&["node", "token", "--role", "worker"], Some(&n1.address), Some(&admin)).await?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let worker_token = out.stdout.trim().to_owned();
    let w1 = NodeProcess::join(root.path(), "w1", &n1.address, &worker_token)?;
    wait_for_nodes(&n1.address, &admin, Duration::from_secs(60), "the worker up", |n| {
        names(n, "role", "worker") == ["w1"] && names(n, "state", "up").len() == 2
    })
    .await?;
    let _cleanup = n1.docker_cleanup().await?;

    // Nothing on the worker's disk opens anything. Raft's write-ahead log
    // holds every entry uncompressed, the bootstrap entry included.
    assert!(!w1.data_dir.join("secrets.key").exists(), "a worker has no secrets key");
    let secrets_key = std::fs::read_to_string(n1.data_dir.join("secrets.key"))?.trim().to_owned();
    let join_secrets = [&voter_token, &worker_token].map(|t| roost_network::Token::parse(t).map(|t| t.secret));
    let mut forbidden = vec![secrets_key];
    for secret in join_secrets {
        forbidden.push(secret?);
    }
    let own_key = w1.data_dir.join("tls/node.key");
    let mut checked = 0;
    for file in roost_tests::files_under(&w1.data_dir)? {
        let bytes = std::fs::read(&file)?;
        let text = String::from_utf8_lossy(&bytes);
        for needle in &forbidden {
            assert!(!text.contains(needle.as_str()), "{} holds a cluster secret", file.display());
        }
        if file != own_key {
            assert!(!text.contains("PRIVATE KEY"), "{} holds a private key", file.display());
        }
        checked += 1;
    }
    assert!(checked > 5, "the walk found the worker's files ({checked})");

    // What needs the keys, the worker refuses, naming the voter.
    for args in [&["secrets", "set", "GREETING=hi", "-a", "keys"][..], &["node", "token"]] {
        let out = roost(args, Some(&w1.address), Some(&admin)).await?;
        assert_ne!(out.code, 0, "{args:?} through a worker: {}", out.stdout);
        assert!(
            out.stderr.contains("worker") && out.stderr.contains(&format!("n1 ({})", n1.address)),
            "{args:?}: {}",
            out.stderr
        );
    }
    let dir = root.path().join("x").display().to_string();
    let local = "127.0.0.1:0";
    let join = ["node", "join", &w1.address, "--token", &voter_token, "--data-dir", &dir, "--name", "x"];
    let flags = ["--listen", local, "--http-listen", local, "--https-listen", local, "--no-wireguard"];
    let out = roost(&[&join[..], &flags[..]].concat(), None, None).await?;
    assert_ne!(out.code, 0, "a join through a worker: {}", out.stdout);
    assert!(
        out.stderr.contains("cannot join through a worker") && out.stderr.contains(&format!("n1 ({})", n1.address)),
        "{}",
        out.stderr
    );

    // A worker declares no labels, which would attract instances and their
    // secrets; an admin sets them.
    let join = ["node", "join", &n1.address, "--token", &worker_token, "--data-dir", &dir, "--name", "x"];
    let out = roost(&[&join[..], &flags[..], &["--label", "region=eu"]].concat(), None, None).await?;
    assert_ne!(out.code, 0, "a worker declaring labels: {}", out.stdout);
    assert!(out.stderr.contains("worker declares no labels"), "{}", out.stderr);
    let out = roost(&["node", "label", "w1", "region=eu", "tier=web"], Some(&n1.address), Some(&admin)).await?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("region=eu,tier=web"), "{}", out.stdout);
    // A worker takes changes to apps only: what it could otherwise do with
    // an admin's grant (label itself, create or remove things) it refuses,
    // naming the voters, and the leader refuses from it.
    for args in [&["node", "label", "w1", "--remove", "tier"][..], &["apps", "create", "through-a-worker"]] {
        let out = roost(args, Some(&w1.address), Some(&admin)).await?;
        assert_ne!(out.code, 0, "{args:?} through the worker: {}", out.stdout);
        assert!(
            out.stderr.contains("this node is a worker") && out.stderr.contains(&format!("n1 ({})", n1.address)),
            "{args:?}: {}",
            out.stderr
        );
    }
    let out = roost(&["node", "label", "w1", "--remove", "tier"], Some(&n1.address), Some(&admin)).await?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let listed = roost(&["node", "list", "--json"], Some(&n1.address), Some(&admin)).await?;
    let listed: Value = serde_json::from_str(&listed.stdout)?;
    let w1_labels =
        listed.as_array().and_then(|nodes| nodes.iter().find(|n| n["name"] == "w1")).map(|n| n["labels"].clone());
    assert_eq!(w1_labels, Some(serde_json::json!({"region": "eu"})), "{listed}");
    let out = roost(&["node", "label", "w1", "bad key=1"], Some(&n1.address), Some(&admin)).await?;
    assert_eq!(out.code, 2, "a bad label is a usage error: {}", out.stderr);

    // An instance on the worker gets its secret, from a voter.
    for args in [&["apps", "create", "keys"][..], &["secrets", "set", "GREETING=opened-by-a-voter", "-a", "keys"]] {
        let out = roost(args, Some(&n1.address), Some(&admin)).await?;
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
    }
    let app = hello_app(&hello_toml("keys", "[placement]\nmax_per_node = 1\n\n[deploy]\ninitial_count = 2\n"))?;
    let out = roost(&["deploy", &app.path().to_string_lossy()], Some(&n1.address), Some(&admin)).await?;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let instance_on = |node: &str| -> Result<String> {
        let id = roost_tests::topology::docker(&[
            "ps",
            "--filter",
            &format!("label=roost.cluster={}", _cleanup.cluster),
            "--filter",
            &format!("label=roost.node={node}"),
            "--format",
            "{{.Label \"roost.instance\"}}",
        ])?;
        Ok(id.trim().to_owned())
    };
    let (on_n1, on_w1) = (instance_on("1")?, instance_on("2")?);
    assert!(!on_n1.is_empty() && !on_w1.is_empty(), "one instance on each node: {on_n1:?} {on_w1:?}");

    // The worker's edge serves keys.localhost with a certificate from the
    // cluster CA, and the instance answers with the opened secret.
    let ca = n1.data_dir.join("tls/ca.pem").display().to_string();
    let port = w1.https.port();
    let resolve = format!("keys.localhost:{port}:127.0.0.1");
    let url = format!("https://keys.localhost:{port}/env/GREETING");
    let last = std::sync::Mutex::new(String::new());
    let served = wait_until("the worker's edge to serve the secret over TLS", Duration::from_secs(30), || async {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert", &ca, "--resolve", &resolve, &url])
            .output()?;
        let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        *last.lock().unwrap_or_else(|p| p.into_inner()) = format!("{body} {}", String::from_utf8_lossy(&out.stderr));
        Ok(out.status.success() && body == "opened-by-a-voter")
    })
    .await;
    served.with_context(|| format!("curl: {}", last.lock().unwrap_or_else(|p| p.into_inner())))?;

    // A voter opens an instance's secrets only for the node it runs on.
    let tls = roost_tests::node_tls(&w1.data_dir)?;
    let ask = |instance: String| {
        let (tls, address) = (&tls, n1.address.clone());
        async move {
            let channel = tls.connect(&address).await?;
            Ok::<_, anyhow::Error>(KeysClient::new(channel).instance_secrets(InstanceSecretsRequest { instance }).await)
        }
    };
    let own = ask(on_w1).await?.map_err(|s| anyhow::anyhow!("its own instance: {s:?}"))?.into_inner();
    assert_eq!(own.secrets.get("GREETING").map(String::as_str), Some("opened-by-a-voter"));
    let status = ask(on_n1).await?.expect_err("another node's instance");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // A node that asks for edge certificates in a loop is slowed down: a
    // burst of EDGE_BURST units, each call of 256 names costing 264.
    let channel = tls.connect(&n1.address).await?;
    let mut keys = KeysClient::new(channel);
    let names: Vec<String> = (0..256).map(|i| format!("no-such-app-{i}.localhost")).collect();
    let mut answered = 0;
    let refused = loop {
        match keys.edge_certificates(EdgeCertificatesRequest { names: names.clone() }).await {
            Ok(_) => answered += 1,
            Err(status) => break status,
        }
        assert!(answered <= 4, "a burst of 1024 units allows at most 4 calls of 264");
    };
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("try again in"), "{}", refused.message());

    // A change to an app is the worker's to take (and forward with the
    // caller's signed grant): a restart through it goes through.
    let out = roost(&["restart", "-a", "keys"], Some(&w1.address), Some(&admin)).await?;
    assert_eq!(out.code, 0, "a restart through the worker: {}{}", out.stdout, out.stderr);
    // The nodes stop before their containers are cleaned up.
    drop((w1, n1));
    Ok(())
}

/// A node that restarts holds only what it had: until it has caught up with
/// the cluster (a read barrier), its edge must call an app made while it was
/// down "starting" (503, try again), never "no such app" (404); and it
/// reports itself up only then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_answers_503_not_404_for_an_app_made_while_it_was_down() -> Result<()> {
    roost_tests::apps::require_docker()?;
    let root = tempfile::Builder::new().prefix("roost-restart-edge-").tempdir()?;
    let n1 = NodeProcess::init(root.path(), "n1")?;
    let admin = n1.read_token_when_ready("admin.token").await?;
    let join = n1.read_token_when_ready("join.token").await?;
    let _cleanup = n1.docker_cleanup().await?;
    let n2 = NodeProcess::join(root.path(), "n2", &n1.address, &join)?;
    let mut n3 = NodeProcess::join(root.path(), "n3", &n1.address, &join)?;
    wait_for_nodes(&n1.address, &admin, Duration::from_secs(60), "three nodes up", |n| {
        names(n, "state", "up").len() == 3
    })
    .await?;

    n3.kill()?;
    wait_for_nodes(&n1.address, &admin, Duration::from_secs(30), "n3 shown down", |n| {
        names(n, "state", "down") == ["n3"]
    })
    .await?;
    let app = hello_app(&hello_toml("late", ""))?;
    let out = roost(&["deploy", &app.path().to_string_lossy()], Some(&n2.address), Some(&admin)).await?;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);

    // From the moment n3 starts again, ask its edge for the new app as fast
    // as it answers, until the app answers.
    n3.start()?;
    let edge = n3.http.to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut answers = std::collections::BTreeMap::<u16, usize>::new();
    loop {
        assert!(tokio::time::Instant::now() < deadline, "n3's edge never served late.localhost: {answers:?}");
        let Ok((status, body)) = roost_tests::apps::http_get_host(&edge, "late.localhost", "/").await else {
            // Not listening yet.
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        *answers.entry(status).or_default() += 1;
        assert_ne!(status, 404, "n3 called an app made while it was down unknown: {body} (answers so far {answers:?})");
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{body}");
    }
    eprintln!("n3's edge answered {answers:?} until the app answered");
    wait_for_nodes(&n1.address, &admin, Duration::from_secs(30), "n3 up again", |n| names(n, "state", "up").len() == 3)
        .await?;
    drop(n2);
    Ok(())
}
