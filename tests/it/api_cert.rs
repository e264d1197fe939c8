//! API certificates on real `roost` processes: every node renews its own
//! (a voter signs its own, a worker gets one from a voter) and presents the
//! new one to the CLI; a removed worker gets no new one, and the CLI
//! refuses its data directory once its last one has expired.

use std::time::Duration;

use anyhow::{Context, Result};
use roost_network::pki;
use roost_network::tls::{ClientTls, NoApiCertificate, TlsError};
use roost_network::Token;
use roost_proto::cluster::keys_client::KeysClient;
use roost_proto::cluster::ApiCertificateRequest;
use roost_tests::process::{roost, wait_for_nodes, NodeProcess};
use serde_json::Value;

fn up(nodes: &[Value]) -> usize {
    nodes.iter().filter(|n| n["state"] == "up").count()
}

/// The fingerprint of the API certificate in a node's data directory.
fn api_fingerprint(node: &NodeProcess) -> Result<String> {
    let chain = std::fs::read_to_string(node.data_dir.join("tls/api.pem"))?;
    Ok(pki::fingerprint(&pki::cert_der_from_pem(&chain)?))
}

/// The fingerprint of the certificate a node presents to the CLI now.
async fn presented_to_cli(address: &str, admin: &Token) -> Result<String> {
    let (_channel, session) = ClientTls::api(admin.ca_digest)?.connect_bound(address).await?;
    Ok(session.get().context("no TLS session")?.presented)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_certificates_are_renewed_and_a_removed_workers_last_one_expires() -> Result<()> {
    let root = tempfile::Builder::new().prefix("roost-api-cert-").tempdir()?;
    // The shortest lifetime the CLI takes: renewed every 20 s.
    let lifetime = ["--api-cert-lifetime", "1m"];
    let n1 = NodeProcess::init_with(root.path(), "n1", &lifetime)?;
    let admin_text = n1.read_token_when_ready("admin.token").await?;
    let admin = Token::parse(&admin_text)?;
    let out = roost(&["node", "token", "--role", "worker"], Some(&n1.address), Some(&admin_text)).await?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let w1 = NodeProcess::join_with(root.path(), "w1", &n1.address, out.stdout.trim(), &lifetime)?;
    wait_for_nodes(&n1.address, &admin_text, Duration::from_secs(60), "two nodes up", |n| n.len() == 2 && up(n) == 2)
        .await?;

    // Each node renews the API certificate it was made with (n1 at init,
    // w1 from its seed at join), and presents the new one.
    for node in [&n1, &w1] {
        let first = api_fingerprint(node)?;
        roost_tests::wait_until(
            &format!("{} to renew its API certificate", node.name),
            Duration::from_secs(60),
            || async {
                let now = api_fingerprint(node)?;
                Ok(now != first && presented_to_cli(&node.address, &admin).await? == now)
            },
        )
        .await?;
        let out = roost(&["node", "list"], Some(&node.address), Some(&admin_text)).await?;
        assert_eq!(out.code, 0, "the CLI through {} after a renewal: {}", node.name, out.stderr);
    }

    // A member gets one only for the key of the certificate it calls with.
    let read_n1 = |file: &str| std::fs::read_to_string(n1.data_dir.join("tls").join(file));
    let n1_key = pki::NodeKey::from_pem(&read_n1("node.key")?)?.public_key();
    let w1_tls = |file: &str| std::fs::read_to_string(w1.data_dir.join("tls").join(file));
    let channel =
        ClientTls::node(&w1_tls("ca.pem")?, &w1_tls("node.pem")?, &w1_tls("node.key")?)?.connect(&n1.address).await?;
    let status = KeysClient::new(channel)
        .api_certificate(ApiCertificateRequest { public_key: n1_key })
        .await
        .expect_err("a worker got an API certificate for a voter's key");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // What the worker's data directory holds when it is removed.
    let read = |file: &str| std::fs::read_to_string(w1.data_dir.join("tls").join(file));
    let (ca, cert, key) = (read("ca.pem")?, read("node.pem")?, read("node.key")?);
    let out = roost(&["node", "remove", "w1"], Some(&n1.address), Some(&admin_text)).await?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("API certificate, which a CLI trusts until it expires"), "{}", out.stdout);
    // Read after the removal: the newest it may have got.
    let api_chain = read("api.pem")?;

    // A voter gives it no new one.
    let channel = ClientTls::node(&ca, &cert, &key)?.connect(&n1.address).await?;
    let public_key = pki::NodeKey::from_pem(&key)?.public_key();
    let status = KeysClient::new(channel)
        .api_certificate(ApiCertificateRequest { public_key })
        .await
        .expect_err("a removed node got an API certificate");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // Its node certificate does not pass for an API certificate.
    let serve = |api: Option<String>| -> Result<(String, tokio_util::sync::CancellationToken)> {
        let certs =
            roost_network::tls::NodeCerts { trusted: &[ca.as_str()], ca_pem: &ca, cert_pem: &cert, key_pem: &key };
        let tls = roost_network::tls::NodeTls::new(&certs, api, None)?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?.to_string();
        let stop = tokio_util::sync::CancellationToken::new();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let mut connections = roost_network::tls::incoming(listener, tls, Default::default(), stop.clone());
        tokio::spawn(async move { while futures::StreamExt::next(&mut connections).await.is_some() {} });
        Ok((address, stop))
    };
    let (impostor, stop) = serve(None)?;
    let out = roost(&["apps", "list"], Some(&impostor), Some(&admin_text)).await?;
    assert_eq!(out.code, 4, "the CLI trusted a removed node's node certificate: {}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("presents no API certificate"), "{}", out.stderr);
    stop.cancel();

    // Its last API certificate passes until it expires, within the lifetime.
    let (impostor, stop) = serve(Some(api_chain))?;
    roost_tests::wait_until("the removed worker's last API certificate to expire", Duration::from_secs(90), || async {
        match ClientTls::api(admin.ca_digest)?.connect(&impostor).await {
            Ok(_) => Ok(false),
            Err(TlsError::NoApiCertificate { refusal: NoApiCertificate::Expired, .. }) => Ok(true),
            Err(other) => Err(other.into()),
        }
    })
    .await?;
    let out = roost(&["apps", "list"], Some(&impostor), Some(&admin_text)).await?;
    assert_eq!(out.code, 4, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("API certificate expired"), "{}", out.stderr);
    stop.cancel();
    Ok(())
}
