//! `roost cluster rotate-ca` on real `roost` processes: two voters and a
//! worker get certificates from a new CA while an app keeps answering, the
//! new CA becomes the cluster's, tokens and files pin it, a token that pins
//! the old one is refused, and nodes restart and join on the new one.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use roost_network::pki::{self, CaDigest};
use roost_network::Token;
use roost_tests::apps::{hello_app, hello_toml, http_get_host};
use roost_tests::process::{roost, wait_for_nodes, NodeProcess};
use serde_json::Value;

fn up(nodes: &[Value]) -> usize {
    nodes.iter().filter(|n| n["state"] == "up").count()
}

fn digest_of(pem: &str) -> Result<CaDigest> {
    Ok(CaDigest::of(&pki::cert_der_from_pem(pem)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_gives_every_node_a_certificate_from_the_new_ca_without_downtime() -> Result<()> {
    roost_tests::apps::require_docker()?;
    let root = tempfile::Builder::new().prefix("roost-ca-").tempdir()?;
    let n1 = NodeProcess::init(root.path(), "n1")?;
    let admin = n1.read_token_when_ready("admin.token").await?;
    let join = n1.read_token_when_ready("join.token").await?;
    let _cleanup = n1.docker_cleanup().await?;
    let out = roost(&["node", "token", "--role", "worker"], Some(&n1.address), Some(&admin)).await?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let worker_token = out.stdout.trim().to_owned();
    let mut n2 = NodeProcess::join(root.path(), "n2", &n1.address, &join)?;
    let w1 = NodeProcess::join(root.path(), "w1", &n1.address, &worker_token)?;
    wait_for_nodes(&n1.address, &admin, Duration::from_secs(60), "three nodes up", |n| n.len() == 3 && up(n) == 3)
        .await?;
    let old_ca = std::fs::read_to_string(n1.data_dir.join("tls/ca.pem"))?;
    let old_digest = digest_of(&old_ca)?;
    // What a voter removed before the rotation would keep: its key and
    // certificate from the old CA (and the old CA's key, sealed).
    let n2_old: Vec<String> = ["node.pem", "node.key"]
        .iter()
        .map(|f| std::fs::read_to_string(n2.data_dir.join("tls").join(f)))
        .collect::<std::io::Result<_>>()?;

    let app = hello_app(&hello_toml("steady", "[deploy]\ninitial_count = 2\n"))?;
    let out = roost(&["deploy", &app.path().to_string_lossy()], Some(&n1.address), Some(&admin)).await?;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);

    // The app answers through every node's edge all through the rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let edges: Vec<String> = [&n1, &n2, &w1].iter().map(|n| n.http.to_string()).collect();
    let poller = {
        let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
        tokio::spawn(async move {
            let mut last_failure = String::new();
            while !stop.load(Ordering::SeqCst) {
                for edge in &edges {
                    match http_get_host(edge, "steady.localhost", "/").await {
                        Ok((200, _)) => served.fetch_add(1, Ordering::SeqCst),
                        other => {
                            last_failure = format!("{edge}: {other:?}");
                            failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            last_failure
        })
    };

    // Asked of a voter that did not create the cluster.
    let out = roost(&["cluster", "rotate-ca"], Some(&n2.address), Some(&admin)).await?;
    stop.store(true, Ordering::SeqCst);
    let last_failure = poller.await?;
    assert_eq!(out.code, 0, "rotate-ca: {}{}", out.stdout, out.stderr);
    let (served, failed) = (served.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    assert!(
        served > 0 && failed == 0,
        "during the rotation {served} requests answered, {failed} failed: {last_failure}"
    );

    // Every node holds the new CA and a certificate from it, and nothing else.
    let new_ca = std::fs::read_to_string(n1.data_dir.join("tls/ca.pem"))?;
    let new_digest = digest_of(&new_ca)?;
    assert_ne!(new_digest, old_digest, "the CA changed");
    assert!(out.stdout.contains(&format!("The cluster's CA is now {}", new_digest.to_hex())), "{}", out.stdout);
    for node in [&n1, &n2, &w1] {
        let tls = node.data_dir.join("tls");
        assert_eq!(std::fs::read_to_string(tls.join("ca.pem"))?, new_ca, "{}'s CA", node.name);
        let cert = std::fs::read_to_string(tls.join("node.pem"))?;
        assert!(roost_network::tls::signed_by(&new_ca, &cert), "{}'s certificate is from the new CA", node.name);
        assert!(
            !tls.join("next.pem").exists() && !tls.join("next-ca.pem").exists(),
            "{} kept no next files",
            node.name
        );
    }

    // Tokens keep their secret and pin the new CA: the admin token file,
    // the join token file, and what the command printed.
    let old_admin = Token::parse(&admin)?;
    let admin_now = Token::parse(&n1.read_token("admin.token")?)?;
    assert_eq!((admin_now.ca_digest, &admin_now.secret), (new_digest, &old_admin.secret));
    assert_eq!(Token::parse(&n1.read_token("join.token")?)?.ca_digest, new_digest);
    let repinned = admin_now.to_string();
    assert!(out.stdout.contains(&repinned), "the re-pinned token is printed: {}", out.stdout);

    // The old pin is refused by the CLI, saying why; the new one works
    // everywhere.
    let out = roost(&["apps", "list"], Some(&n1.address), Some(&admin)).await?;
    assert_ne!(out.code, 0, "a token pinning the old CA was served: {}", out.stdout);
    assert!(out.stderr.contains("rotated"), "{}", out.stderr);
    for node in [&n1, &n2, &w1] {
        wait_for_nodes(&node.address, &repinned, Duration::from_secs(30), "three nodes up on the new CA", |n| {
            up(n) == 3
        })
        .await?;
    }
    // A server presenting a certificate from the old CA (a removed voter's
    // data directory, or one it minted) is refused by the re-pinned CLI.
    let config = roost_network::tls::server_config(&old_ca, &n2_old[0], &n2_old[1])?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let impostor = listener.local_addr()?.to_string();
    let stop_impostor = tokio_util::sync::CancellationToken::new();
    let _incoming = roost_network::tls::incoming(listener, config, Default::default(), stop_impostor.clone());
    let out = roost(&["apps", "list"], Some(&impostor), Some(&repinned)).await?;
    assert_ne!(out.code, 0, "the CLI trusted a certificate from the old CA: {}", out.stdout);
    assert!(out.stderr.contains("pins"), "{}", out.stderr);
    stop_impostor.cancel();

    let out = roost(&["apps", "create", "after-rotation"], Some(&n2.address), Some(&repinned)).await?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = roost(&["apps", "list"], Some(&w1.address), Some(&repinned)).await?;
    assert!(out.code == 0 && out.stdout.contains("after-rotation"), "{}{}", out.stdout, out.stderr);

    // APP.DOMAIN is served with a certificate from the new CA, by a voter
    // and by the worker.
    let ca_file = n1.data_dir.join("tls/ca.pem").display().to_string();
    for node in [&n1, &w1] {
        let port = node.https.port();
        let resolve = format!("steady.localhost:{port}:127.0.0.1");
        let url = format!("https://steady.localhost:{port}/");
        roost_tests::wait_until(
            &format!("{}'s edge to serve a certificate from the new CA", node.name),
            Duration::from_secs(30),
            || async {
                let out = std::process::Command::new("curl")
                    .args(["-sS", "--max-time", "5", "--cacert", &ca_file, "--resolve", &resolve, &url])
                    .output()?;
                Ok(out.status.success())
            },
        )
        .await?;
    }

    // A node restarts on its new files; a new node joins with the new token.
    n2.kill()?;
    n2.start()?;
    wait_for_nodes(&n1.address, &repinned, Duration::from_secs(60), "n2 up again", |n| up(n) == 3).await?;
    let join_now = n1.read_token("join.token")?;
    let _n3 = NodeProcess::join(root.path(), "n3", &n2.address, &join_now)?;
    wait_for_nodes(&n1.address, &repinned, Duration::from_secs(60), "n3 joined", |n| n.len() == 4 && up(n) == 4)
        .await?;
    drop(w1);
    Ok(())
}

/// A node removed while a rotation waits for it cancels the rotation: it
/// may hold the new CA's key (a voter opens it) or a certificate from it.
/// The certificates from that CA are dropped, and a new rotation finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_node_during_a_ca_rotation_cancels_it_and_a_new_one_finishes() -> Result<()> {
    let root = tempfile::Builder::new().prefix("roost-ca-cancel-").tempdir()?;
    let n1 = NodeProcess::init(root.path(), "n1")?;
    let admin = n1.read_token_when_ready("admin.token").await?;
    let join = n1.read_token_when_ready("join.token").await?;
    let n2 = NodeProcess::join(root.path(), "n2", &n1.address, &join)?;
    let mut n3 = NodeProcess::join(root.path(), "n3", &n1.address, &join)?;
    wait_for_nodes(&n1.address, &admin, Duration::from_secs(60), "three nodes up", |n| n.len() == 3 && up(n) == 3)
        .await?;
    let old_digest = digest_of(&std::fs::read_to_string(n1.data_dir.join("tls/ca.pem"))?)?.to_hex();

    // n3 is down: the rotation waits for it.
    n3.kill()?;
    let out = roost(&["cluster", "rotate-ca", "--detach"], Some(&n1.address), Some(&admin)).await?;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let status = |endpoint: String, token: String| async move {
        let out = roost(&["cluster", "ca", "--json"], Some(&endpoint), Some(&token)).await?;
        anyhow::ensure!(out.code == 0, "cluster ca: {}", out.stderr);
        Ok::<Value, anyhow::Error>(serde_json::from_str(&out.stdout)?)
    };
    roost_tests::wait_until("n1 and n2 renewed, n3 pending", Duration::from_secs(30), || async {
        let s = status(n1.address.clone(), admin.clone()).await?;
        Ok(s["pending"] == serde_json::json!(["n3"]) && s["renewed"].as_array().is_some_and(|r| r.len() == 2))
    })
    .await?;
    assert!(n2.data_dir.join("tls/next.pem").exists(), "n2 holds its certificate from the new CA");

    let out = roost(&["node", "remove", "n3"], Some(&n1.address), Some(&admin)).await?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("rotate-ca"), "removal says to rotate the CA: {}", out.stdout);
    let s = status(n1.address.clone(), admin.clone()).await?;
    assert_eq!(s["rotating_to"], Value::Null, "the rotation is cancelled: {s}");
    assert_eq!(s["ca_digest"], old_digest.as_str(), "and the CA unchanged");
    for node in [&n1, &n2] {
        let next = node.data_dir.join("tls/next.pem");
        roost_tests::wait_until(
            &format!("{} to drop its certificate from the cancelled CA", node.name),
            Duration::from_secs(30),
            || async { Ok(!next.exists()) },
        )
        .await?;
    }

    // A new rotation finishes with the nodes that are left.
    let out = roost(&["cluster", "rotate-ca"], Some(&n2.address), Some(&admin)).await?;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let new_digest = digest_of(&std::fs::read_to_string(n2.data_dir.join("tls/ca.pem"))?)?.to_hex();
    assert_ne!(new_digest, old_digest);
    assert!(out.stdout.contains(&format!("The cluster's CA is now {new_digest}")), "{}", out.stdout);
    Ok(())
}
