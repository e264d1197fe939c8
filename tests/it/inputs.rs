//! Bad input gets a clear refusal and changes nothing.

use std::time::Duration;

use anyhow::Result;
use roost_network::tls::ClientTls;
use roost_network::{Token, TokenKind};
use roost_node::cli::ApiAuth;
use roost_node::daemon::{Node, NodeConfig, Start};
use roost_proto::api::control_client::ControlClient;
use roost_proto::api::{
    CreateAppRequest, DestroyAppRequest, GetJoinTokenRequest, ListAppsRequest, ListNodesRequest, RemoveNodeRequest,
};
use roost_tests::Cluster;
use tokio_util::sync::CancellationToken;

fn join_config(dir: &std::path::Path, name: &str, seed: &str, token: &str) -> NodeConfig {
    let start = Start::Join { seed: seed.into(), token: token.into() };
    let config = roost_tests::node_config(name, dir, None, start, &Default::default(), &Default::default());
    NodeConfig { join_wait: std::time::Duration::from_secs(1), ..config }
}

/// Sends an AppendEntries (`json`) on a Raft stream opened with `tls`, as a
/// leader's replication does, and returns what came of it.
async fn on_a_raft_stream(
    tls: &ClientTls,
    address: &str,
    json: &[u8],
) -> Result<Result<Vec<u8>, roost_raft::stream::StreamError>> {
    use anyhow::Context as _;
    let mut stream = tls.connect_raft_stream(address).await?.context("the node took no Raft stream")?;
    Ok(roost_raft::stream::call(&mut stream, json).await)
}

/// [`on_a_raft_stream`], which must meet a refusal: the caller is a member.
async fn refused_on_a_raft_stream(tls: &ClientTls, address: &str, json: &[u8]) -> Result<tonic::Status> {
    match on_a_raft_stream(tls, address, json).await? {
        Err(roost_raft::stream::StreamError::Refused(status)) => Ok(status),
        other => anyhow::bail!("expected a refusal on the Raft stream, got {other:?}"),
    }
}

/// [`on_a_raft_stream`], which must be closed unanswered: the caller is no
/// member, and nothing it sends is read.
async fn closed_on_a_raft_stream(tls: &ClientTls, address: &str, json: &[u8]) -> Result<()> {
    match on_a_raft_stream(tls, address, json).await? {
        Err(roost_raft::stream::StreamError::Io(_) | roost_raft::stream::StreamError::Malformed(_)) => Ok(()),
        other => anyhow::bail!("expected the Raft stream closed unanswered, got {other:?}"),
    }
}

/// The join token once it differs from `before`: a removal rotates it when
/// the removed node is out of Raft's membership.
async fn rotated_join_token(cluster: &Cluster, node: usize, before: &str) -> Result<String> {
    let current = || async {
        let mut client = cluster.client(node).await?;
        anyhow::Ok(client.get_join_token(GetJoinTokenRequest::default()).await?.into_inner().token)
    };
    roost_tests::wait_until("the join token to rotate", Duration::from_secs(15), || async {
        Ok(current().await? != before)
    })
    .await?;
    current().await
}

/// Removes a follower of a 3-node cluster and waits for it to stop:
/// (the leader, the removed node), by slot.
async fn remove_a_follower(cluster: &Cluster) -> Result<(usize, usize)> {
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let victim = (leader + 1) % 3;
    let victim_name = cluster.slots[victim].name.clone();
    cluster.remove_node(leader, &victim_name).await?;
    roost_tests::wait_until("the removed node to stop", Duration::from_secs(15), || async {
        Ok(cluster.slots[victim].running.as_ref().is_some_and(|n| n.is_stopping()))
    })
    .await?;
    Ok((leader, victim))
}

async fn node_count(cluster: &Cluster) -> Result<usize> {
    Ok(cluster.client(0).await?.list_nodes(ListNodesRequest::default()).await?.into_inner().nodes.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joins_with_bad_tokens_or_names_are_refused_and_change_nothing() -> Result<()> {
    let cluster = Cluster::start(1).await?;
    let seed = cluster.node(0)?.address.clone();
    let good = cluster.tokens.join.clone();
    let cases: Vec<(&str, String, &str)> = vec![
        ("wrong secret", Token { secret: "0".repeat(32), ..good.clone() }.to_string(), "wrong join token"),
        (
            "another cluster",
            Token::generate(TokenKind::Join, roost_network::CaDigest::of(b"other")).to_string(),
            "another cluster",
        ),
        ("malformed", "ROOST-1-nope".into(), "invalid join token"),
        ("admin token", cluster.tokens.admin.to_string(), "admin token"),
    ];
    for (case, token, expected) in cases {
        let dir = tempfile::tempdir()?;
        let error = Node::start(join_config(dir.path(), "nx", &seed, &token), CancellationToken::new())
            .await
            .err()
            .unwrap_or_else(|| panic!("{case}: join should fail"));
        let message = format!("{:#}", anyhow::Error::new(error));
        assert!(message.contains(expected), "{case}: {message}");
        let parts: Vec<&str> = message.split(": ").collect();
        assert!(parts.windows(2).all(|w| w[0] != w[1]), "{case}: a reason said twice: {message}");
        assert!(!dir.path().join("node.json").exists(), "{case}: a refused join must not leave an identity");
    }
    // A taken name, and a name that is not a DNS label.
    for (name, expected) in [("n1", "already in the cluster"), ("Bad_Name", "invalid node name")] {
        let dir = tempfile::tempdir()?;
        let error = Node::start(join_config(dir.path(), name, &seed, &good.to_string()), CancellationToken::new())
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}: join should fail"));
        let message = format!("{:#}", anyhow::Error::new(error));
        assert!(message.contains(expected), "{name}: {message}");
    }
    // Nothing reached an unreachable seed, and the cluster is unchanged.
    let dir = tempfile::tempdir()?;
    let port = roost_tests::process::free_port()?;
    let error = Node::start(
        join_config(dir.path(), "nx", &format!("127.0.0.1:{port}"), &good.to_string()),
        CancellationToken::new(),
    )
    .await
    .expect_err("join through a dead seed fails");
    assert!(format!("{:#}", anyhow::Error::new(error)).contains("cannot reach"));
    assert_eq!(node_count(&cluster).await?, 1);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_calls_need_one_of_this_clusters_api_tokens() -> Result<()> {
    let cluster = Cluster::start(1).await?;
    let address = cluster.node(0)?.address.clone();
    let admin = cluster.tokens.admin.clone();
    let tls = ClientTls::anonymous(admin.ca_digest)?;
    let cases = [
        (
            Some(Token { secret: "f".repeat(32), ..admin.clone() }.to_string()),
            tonic::Code::Unauthenticated,
            "not one of the cluster's current tokens",
        ),
        (Some(cluster.tokens.join.to_string()), tonic::Code::Unauthenticated, "join token"),
        (None, tonic::Code::Unauthenticated, "no API token"),
    ];
    for (token, code, expected) in cases {
        let channel = tls.connect(&address).await?;
        let result = match &token {
            Some(token) => {
                let mut client =
                    ControlClient::with_interceptor(channel, ApiAuth::Header(format!("Bearer {token}").parse()?));
                client.list_apps(ListAppsRequest::default()).await
            }
            None => ControlClient::new(channel).list_apps(ListAppsRequest::default()).await,
        };
        let status = result.expect_err("must be refused");
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(expected), "{}", status.message());
    }
    // A client pinned to another cluster's CA refuses this node at the handshake.
    let other = ClientTls::anonymous(roost_network::CaDigest::of(b"other"))?;
    let error = other.connect(&address).await.expect_err("pin mismatch");
    assert!(error.to_string().contains("another cluster"), "{error}");
    // Unreachable endpoint.
    let port = roost_tests::process::free_port()?;
    let error = tls.connect(&format!("127.0.0.1:{port}")).await.expect_err("nothing listens");
    assert!(error.to_string().contains("refused"), "{error}");
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn app_names_and_duplicates_are_checked() -> Result<()> {
    let cluster = Cluster::start(1).await?;
    let mut client = cluster.client(0).await?;
    for bad in ["", "Web", "9lives", "web_app", "web-", &"a".repeat(64)] {
        let status = client
            .create_app(roost_node::cli::about_app(bad, CreateAppRequest { name: bad.into() }))
            .await
            .expect_err(bad);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad:?}: {status:?}");
        assert!(status.message().contains("lowercase letters"), "{}", status.message());
    }
    client.create_app(roost_node::cli::about_app("web", CreateAppRequest { name: "web".into() })).await?;
    let status = client
        .create_app(roost_node::cli::about_app("web", CreateAppRequest { name: "web".into() }))
        .await
        .expect_err("duplicate");
    assert_eq!(status.code(), tonic::Code::AlreadyExists);
    assert!(status.message().contains("already exists"));
    let status = client
        .destroy_app(roost_node::cli::about_app("nope", DestroyAppRequest { name: "nope".into() }))
        .await
        .expect_err("missing");
    assert_eq!(status.code(), tonic::Code::NotFound);
    let status = client
        .remove_node(roost_node::cli::about("node:n9", RemoveNodeRequest { node: "n9".into() }))
        .await
        .expect_err("missing node");
    assert_eq!(status.code(), tonic::Code::NotFound);
    let status = client
        .remove_node(roost_node::cli::about("node:n1", RemoveNodeRequest { node: "n1".into() }))
        .await
        .expect_err("last node");
    assert!(status.message().contains("only node"), "{}", status.message());
    let apps = client.list_apps(ListAppsRequest::default()).await?.into_inner().apps;
    assert_eq!(apps.len(), 1);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_of_removed_or_unknown_nodes_and_members_posing_as_others_are_refused() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let victim = (0..3).find(|i| *i != leader).expect("a follower");
    let victim_name = cluster.slots[victim].name.clone();
    // Keep the victim's own view of the cluster: its client identity.
    let victim_dir = cluster.slots[victim].dir.path().to_owned();
    let token_before =
        cluster.client(leader).await?.get_join_token(GetJoinTokenRequest::default()).await?.into_inner().token;
    cluster.remove_node(leader, &victim_name).await?;
    let token_after = rotated_join_token(&cluster, leader, &token_before).await?;
    // The first node's join.token file follows the rotation.
    let token_file = cluster.slots[0].dir.path().join("join.token");
    roost_tests::wait_until("join.token to hold the rotated token", Duration::from_secs(15), || async {
        Ok(std::fs::read_to_string(&token_file)?.trim() == token_after)
    })
    .await?;
    roost_tests::wait_until("the removed node to stop", Duration::from_secs(15), || async {
        Ok(cluster.slots[victim].running.as_ref().is_some_and(|n| n.is_stopping()))
    })
    .await?;
    // Its certificate no longer opens the node services.
    let tls = roost_tests::node_tls(&victim_dir)?;
    let heartbeat: openraft::raft::AppendEntriesRequest<roost_raft::TypeConfig> =
        openraft::raft::AppendEntriesRequest {
            vote: openraft::Vote::new_committed(1, cluster.node(leader)?.id),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        };
    closed_on_a_raft_stream(&tls, &cluster.node(leader)?.address, &serde_json::to_vec(&heartbeat)?).await?;
    let channel = tls.connect(&cluster.node(leader)?.address).await?;
    let status = roost_proto::cluster::peer_client::PeerClient::new(channel)
        .heartbeat(roost_proto::cluster::HeartbeatRequest { node_id: 0 })
        .await
        .expect_err("revoked");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // A certificate signed with the cluster CA's key but never issued
    // through a join opens nothing either.
    let info = cluster.node(leader)?.consensus.state().read(|s| s.cluster.clone()).expect("bootstrapped");
    let key = std::fs::read_to_string(cluster.slots[leader].dir.path().join("secrets.key"))?;
    let ca = roost_node::daemon::keys::open_ca(&info, &roost_deploy::secrets::SecretsKey::from_hex(&key)?)?;
    let rogue = ca.issue_node("rogue")?;
    let tls = ClientTls::node(ca.cert_pem(), &rogue.cert_pem, &rogue.key_pem)?;
    closed_on_a_raft_stream(&tls, &cluster.node(leader)?.address, &serde_json::to_vec(&heartbeat)?).await?;
    let channel = tls.connect(&cluster.node(leader)?.address).await?;
    let status = roost_proto::cluster::raft_client::RaftClient::new(channel)
        .read_index(roost_proto::cluster::ReadIndexRequest {})
        .await
        .expect_err("not a member");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // A member may not speak for another: an AppendEntries sent with a
    // current member's certificate in the leader's name is refused.
    let member = (0..cluster.slots.len()).find(|&i| i != victim && i != leader).expect("a third node");
    let tls = roost_tests::node_tls(cluster.slots[member].dir.path())?;
    let leader_id = cluster.node(leader)?.id;
    let forged: openraft::raft::AppendEntriesRequest<roost_raft::TypeConfig> = openraft::raft::AppendEntriesRequest {
        vote: openraft::Vote::new_committed(u64::MAX / 2, leader_id),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    let channel = tls.connect(&cluster.node(leader)?.address).await?;
    let status = roost_proto::cluster::raft_client::RaftClient::new(channel)
        .append_entries(roost_proto::cluster::RaftPayload { json: serde_json::to_vec(&forged)? })
        .await
        .expect_err("posing as the leader");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(&format!("in the name of node {leader_id}")), "{status:?}");
    // And the same on a Raft stream, where replication sends it.
    let status = refused_on_a_raft_stream(&tls, &cluster.node(leader)?.address, &serde_json::to_vec(&forged)?).await?;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(&format!("in the name of node {leader_id}")), "{status:?}");
    cluster.shutdown().await;
    Ok(())
}

/// A node takes Raft streams; a node that offers only `h2` (one from before
/// them) is found out in the handshake, and its peers use gRPC with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_raft_stream_opens_to_a_node_and_a_node_that_speaks_only_grpc_is_told_apart() -> Result<()> {
    let cluster = Cluster::start(1).await?;
    cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let dir = cluster.slots[0].dir.path();
    let tls = roost_tests::node_tls(dir)?;
    assert!(tls.connect_raft_stream(&cluster.node(0)?.address).await?.is_some(), "a node takes Raft streams");

    let read = |file: &str| std::fs::read_to_string(dir.join("tls").join(file));
    let mut older =
        (*roost_network::tls::server_config(&read("ca.pem")?, &read("node.pem")?, &read("node.key")?)?).clone();
    older.alpn_protocols = vec![b"h2".to_vec()];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(older));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let stream = acceptor.accept(tcp).await?;
        anyhow::Ok(stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
    });
    assert!(tls.connect_raft_stream(&address).await?.is_none(), "an h2-only node is told apart");
    assert_eq!(server.await??, Some(b"h2".to_vec()), "the handshake settled on h2");
    cluster.shutdown().await;
    Ok(())
}

/// A removed node is out for good with its peers too: its certificate,
/// though the cluster CA signed it, presented at a member's address (the
/// member down, the removed node's data directory in other hands), opens no
/// connection from the leader, which keeps trying to replicate there; so
/// the impostor receives no log entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_nodes_certificate_at_a_members_address_is_refused_by_the_leader() -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let mut followers = (0..3).filter(|i| *i != leader);
    let (victim, member) = (followers.next().expect("a follower"), followers.next().expect("another"));
    let victim_name = cluster.slots[victim].name.clone();
    cluster.remove_node(leader, &victim_name).await?;
    roost_tests::wait_until("the removed node to stop", Duration::from_secs(15), || async {
        Ok(cluster.slots[victim].running.as_ref().is_some_and(|n| n.is_stopping()))
    })
    .await?;
    let address = cluster.slots[member].address.clone().expect("the member has an address");
    cluster.stop(member).await?;

    let read = |file: &str| std::fs::read_to_string(cluster.slots[victim].dir.path().join("tls").join(file));
    let config = roost_network::tls::server_config(&read("ca.pem")?, &read("node.pem")?, &read("node.key")?)?;
    let listener = tokio::net::TcpListener::bind(&address).await?;
    let (refused, accepted) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let impostor = {
        let (refused, accepted) = (refused.clone(), accepted.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let counter = match acceptor.accept(tcp).await {
                    Ok(_) => &accepted,
                    Err(_) => &refused,
                };
                counter.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    roost_tests::wait_until("the leader to dial the member's address", Duration::from_secs(20), || async {
        Ok(refused.load(Ordering::SeqCst) + accepted.load(Ordering::SeqCst) >= 3)
    })
    .await?;
    impostor.abort();
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "a handshake with the removed node's certificate completed");
    cluster.shutdown().await;
    Ok(())
}

/// A server that is not a current member (here, a removed node's data
/// directory) is refused by the CLI when it presents its node certificate,
/// which the CA signed, for want of an API certificate; with the API
/// certificate it still holds (until that expires: `api_cert.rs`), it
/// learns nothing from a CLI call that would let it act as the admin
/// elsewhere: the CLI sends a signature of its own TLS session, never the
/// token, and that signature replayed to a member on another session is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cli_call_to_a_removed_node_gives_it_nothing_a_member_accepts() -> Result<()> {
    use std::sync::{Arc, Mutex};

    let cluster = Cluster::start(3).await?;
    let (leader, victim) = remove_a_follower(&cluster).await?;

    // The removed node's directory, serving gRPC over HTTP/2 with its
    // certificate, answering every call "unimplemented" and keeping the
    // authorization header of each.
    let read = |file: &str| std::fs::read_to_string(cluster.slots[victim].dir.path().join("tls").join(file));
    let admin = cluster.tokens.admin.clone();
    let (ca, cert, key) = (read("ca.pem")?, read("node.pem")?, read("node.key")?);

    // Its node certificate alone: the CLI refuses it, and says why.
    let node_only = roost_network::tls::server_config(&ca, &cert, &key)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let node_only_address = listener.local_addr()?.to_string();
    let stop_node_only = tokio_util::sync::CancellationToken::new();
    let _incoming = roost_network::tls::incoming(listener, node_only, Default::default(), stop_node_only.clone());
    let Err(refused) = roost_node::cli::connect_api(&node_only_address, &admin).await else {
        anyhow::bail!("the CLI took a node certificate for an API certificate");
    };
    assert_eq!(refused.exit_code(), 4, "{refused}");
    assert!(refused.to_string().contains("presents no API certificate"), "{refused}");
    stop_node_only.cancel();

    // Its API certificate, as the node itself presents it.
    let certs = roost_network::tls::NodeCerts { trusted: &[ca.as_str()], ca_pem: &ca, cert_pem: &cert, key_pem: &key };
    let config = roost_network::tls::NodeTls::new(&certs, Some(read("api.pem")?), None)?.current().server.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let impostor_address = listener.local_addr()?.to_string();
    let captured = Arc::new(Mutex::new(Vec::<String>::new()));
    let impostor = {
        let captured = captured.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(stream) = acceptor.accept(tcp).await else { continue };
                let captured = captured.clone();
                let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let header = request.headers().get("authorization").and_then(|h| h.to_str().ok());
                    if let Ok(mut captured) = captured.lock() {
                        captured.push(header.unwrap_or_default().to_owned());
                    }
                    let response = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "12")
                        .body(http_body_util::Empty::<bytes::Bytes>::new());
                    async move { response }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        })
    };

    // The CLI's own client, as `roost apps list --endpoint IMPOSTOR` makes it.
    let mut cli = roost_node::cli::connect_api(&impostor_address, &admin).await?;
    let status = cli.list_apps(ListAppsRequest::default()).await.expect_err("the impostor serves nothing");
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    let headers = captured.lock().map(|c| c.clone()).unwrap_or_default();
    impostor.abort();
    let [header] = headers.as_slice() else { anyhow::bail!("expected one call at the impostor, got {headers:?}") };
    assert!(header.starts_with("Signed "), "the CLI signs: {header}");
    assert!(!header.contains(&admin.secret), "the token itself reached the impostor");

    // Replayed at a member, on a session of the replayer's own: refused.
    let member = cluster.node(leader)?.address.clone();
    let channel = ClientTls::anonymous(admin.ca_digest)?.connect(&member).await?;
    let mut replay = ControlClient::with_interceptor(channel, ApiAuth::Header(header.parse()?));
    let status = replay.list_apps(ListAppsRequest::default()).await.expect_err("a replayed signature");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("does not match this TLS session"), "{}", status.message());
    // The same CLI call to a member goes through.
    roost_node::cli::connect_api(&member, &admin).await?.list_apps(ListAppsRequest::default()).await?;
    // A token the cluster does not have, signing properly: refused.
    let stranger = Token::generate(TokenKind::Api, admin.ca_digest);
    let status = roost_node::cli::connect_api(&member, &stranger)
        .await?
        .list_apps(ListAppsRequest::default())
        .await
        .expect_err("an unknown token's signature");
    assert!(status.message().contains("not one of the cluster's current tokens"), "{}", status.message());
    // A good signature of this very session, at a time too far from the
    // cluster's clock either way, is refused and says why.
    for (offset_ms, expected) in
        [(3_600_000, "ahead of the cluster's clock"), (-1_200_000, "before the cluster's clock")]
    {
        let (channel, session) = ClientTls::anonymous(admin.ca_digest)?.connect_bound(&member).await?;
        let session = session.get().ok_or_else(|| anyhow::anyhow!("no session"))?;
        let at = roost_raft::consensus::now_millis() + offset_ms;
        let call = roost_network::token::SignedCall {
            session: &session.exporter,
            server: &session.server,
            method: "ListApps",
            target: "",
        };
        let signed = admin.key().sign(&call, at);
        let mut skewed = ControlClient::with_interceptor(channel, ApiAuth::Header(signed.header().parse()?));
        let status = skewed.list_apps(ListAppsRequest::default()).await.expect_err("a skewed signature");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains(expected), "{}", status.message());
    }
    cluster.shutdown().await;
    Ok(())
}

/// The `authorization` header of a call of `method` that changes `target`
/// (`roost-target`), signed with `token`'s key on `session`.
fn signed_header(
    token: &Token,
    session: &roost_network::tls::Session,
    method: &str,
    target: &str,
) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
    let call = roost_network::token::SignedCall { session: &session.exporter, server: &session.server, method, target };
    Ok(token.key().sign(&call, roost_raft::consensus::now_millis()).header().parse()?)
}

/// `CreateApp` of `app` on `channel`'s session, sending `header` as it is.
async fn create_with(
    channel: &tonic::transport::Channel,
    header: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    app: &str,
) -> std::result::Result<(), tonic::Status> {
    let mut client = ControlClient::with_interceptor(channel.clone(), ApiAuth::Header(header.clone()));
    let request = roost_node::cli::about_app(app, CreateAppRequest { name: app.into() });
    client.create_app(request).await.map(drop)
}

/// A signature that verified on a TLS session vouches, to the node serving
/// that session, for the session's further calls signed with the same key
/// (`auth::SessionProofs`), so that node checks one signature per client
/// and minute, not one per call. It vouches for nothing else: not on
/// another session, not for another key, not for a token revoked since,
/// and not to the leader, which checks in full each signature another node
/// forwards it as a grant. Here the further calls carry a signature made
/// for another app, which only the session can vouch for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_proven_by_one_signature_vouches_to_its_own_node_alone() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    cluster.wait_for_members(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let follower = (0..3).find(|i| *i != leader).expect("a follower");
    let admin = cluster.tokens.admin.clone();
    let printed = cluster
        .cli(leader, &["tokens", "create", "--json", "--name", "second", "--scope", "admin"])
        .await
        .map_err(|e| anyhow::anyhow!("tokens create: {e}"))?;
    let second: serde_json::Value = serde_json::from_str(&printed)?;
    let second = Token::parse(second["token"].as_str().unwrap_or_default())?;
    let exists = |app: &'static str| {
        let cluster = &cluster;
        async move {
            let listed = cluster.client(leader).await?.list_apps(ListAppsRequest::default()).await?.into_inner();
            anyhow::Ok(listed.apps.iter().any(|a| a.name == app))
        }
    };
    let open = |index: usize| {
        let address = cluster.node(index).map(|n| n.address.clone());
        async move {
            let (channel, session) = ClientTls::anonymous(admin.ca_digest)?.connect_bound(&address?).await?;
            let session = session.get().ok_or_else(|| anyhow::anyhow!("no TLS session"))?;
            anyhow::Ok((channel, session))
        }
    };

    // The leader: one signature proves the session; a further call on it
    // with the admin's key is served, whatever its signature.
    let (channel, session) = open(leader).await?;
    let proving = signed_header(&admin, &session, "CreateApp", "app:proven-on-leader")?;
    create_with(&channel, &proving, "proven-on-leader").await?;
    create_with(&channel, &proving, "vouched-on-leader").await?;
    assert!(exists("vouched-on-leader").await?, "the leader's own session vouched for nothing");

    // Another session of the same client: the signature proves nothing there.
    let (other_channel, _) = open(leader).await?;
    let status = create_with(&other_channel, &proving, "replayed-on-leader").await.expect_err("a replay");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("does not match this TLS session"), "{}", status.message());

    // Another key on the proven session: its own signature is checked.
    let posing = signed_header(&admin, &session, "CreateApp", "app:posing")?;
    let posing = posing.to_str()?.replacen(&admin.key().public_key(), &second.key().public_key(), 1).parse()?;
    let status = create_with(&channel, &posing, "posing").await.expect_err("another key's forged signature");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("does not match this TLS session"), "{}", status.message());

    // A token revoked since its session was proven: refused at once.
    let revoked = signed_header(&second, &session, "CreateApp", "app:before-revoking")?;
    create_with(&channel, &revoked, "before-revoking").await?;
    cluster.cli(leader, &["tokens", "revoke", "second"]).await.map_err(|e| anyhow::anyhow!("tokens revoke: {e}"))?;
    let status = create_with(&channel, &revoked, "after-revoking").await.expect_err("a revoked token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("not one of the cluster's current tokens"), "{}", status.message());

    // A follower: its session is proven to it, but the grant it forwards
    // to the leader carries a signature made for another app, which the
    // leader checks, and refuses.
    let (channel, session) = open(follower).await?;
    let proving = signed_header(&admin, &session, "CreateApp", "app:proven-on-follower")?;
    create_with(&channel, &proving, "proven-on-follower").await?;
    let status = create_with(&channel, &proving, "forwarded").await.expect_err("a grant the leader must refuse");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("does not match this TLS session"), "{}", status.message());
    assert!(!exists("forwarded").await?, "the leader took a grant whose signature it did not check");
    assert!(!exists("replayed-on-leader").await? && !exists("posing").await? && !exists("after-revoking").await?);
    cluster.shutdown().await;
    Ok(())
}

/// What an impostor seed (a removed node's directory) keeps of each join
/// and answers: the cluster's own CA, so only the missing proof of the
/// current join secret gives it away.
struct ImpostorSeed {
    ca_cert_pem: String,
    captured: std::sync::Arc<std::sync::Mutex<Vec<roost_proto::cluster::JoinRequest>>>,
}

#[tonic::async_trait]
impl roost_proto::cluster::join_server::Join for ImpostorSeed {
    async fn join(
        &self,
        request: tonic::Request<roost_proto::cluster::JoinRequest>,
    ) -> Result<tonic::Response<roost_proto::cluster::JoinResponse>, tonic::Status> {
        if let Ok(mut captured) = self.captured.lock() {
            captured.push(request.into_inner());
        }
        Ok(tonic::Response::new(roost_proto::cluster::JoinResponse {
            node_id: 99,
            cluster_id: "impostor".into(),
            ca_cert_pem: self.ca_cert_pem.clone(),
            seed_proof: vec![0; 32],
            ..Default::default()
        }))
    }
}

/// A joining node given a removed node as its seed sends it nothing it could
/// join with (a proof bound to that TLS session, never the token), refuses
/// its answer for want of the seed's proof of the current token, and writes
/// nothing; the proof it sent, replayed to a voter, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_through_a_removed_node_is_refused_by_the_joiner_and_leaks_no_token() -> Result<()> {
    use std::sync::{Arc, Mutex};

    let cluster = Cluster::start(3).await?;
    let (leader, victim) = remove_a_follower(&cluster).await?;
    // The token a user prints now: rotated after the removal, in an entry
    // the removed node never received, though it holds the secrets key
    // that seals it: its directory holds the old sealed secret, not the new.
    let token = rotated_join_token(&cluster, leader, &cluster.tokens.join.to_string()).await?;
    let sealed_voter_join = |i: usize| {
        cluster.node(i).map(|n| {
            n.consensus
                .state()
                .read(|s| s.cluster.as_ref().and_then(|c| c.voter_join.as_ref()).map(|j| j.sealed.sealed.clone()))
        })
    };
    let new_sealed = sealed_voter_join(leader)?.ok_or_else(|| anyhow::anyhow!("no sealed voter join secret"))?;
    let victim_state = cluster.slots[victim].running.as_ref().map(|n| {
        n.consensus
            .state()
            .read(|s| s.cluster.as_ref().and_then(|c| c.voter_join.as_ref()).map(|j| j.sealed.sealed.clone()))
    });
    let old_sealed =
        victim_state.flatten().ok_or_else(|| anyhow::anyhow!("the removed node's state has no join secret"))?;
    assert_ne!(old_sealed, new_sealed, "the removed node applied the rotation");
    let mut found = (false, false);
    for file in roost_tests::files_under(cluster.slots[victim].dir.path())? {
        let bytes = std::fs::read(&file)?;
        let has = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
        found = (found.0 || has(&old_sealed), found.1 || has(&new_sealed));
    }
    assert!(
        found.0,
        "the removed node's log holds the old sealed secret in plain bytes (else this check proves nothing)"
    );
    assert!(!found.1, "the removed node's directory holds the new sealed join secret");

    let read = |file: &str| std::fs::read_to_string(cluster.slots[victim].dir.path().join("tls").join(file));
    let config = roost_network::tls::server_config(&read("ca.pem")?, &read("node.pem")?, &read("node.key")?)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let impostor_address = listener.local_addr()?.to_string();
    let stop = CancellationToken::new();
    let incoming = roost_network::tls::incoming(listener, config, Default::default(), stop.clone());
    let captured = Arc::new(Mutex::new(Vec::new()));
    let seed = ImpostorSeed { ca_cert_pem: read("ca.pem")?, captured: captured.clone() };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(roost_proto::cluster::join_server::JoinServer::new(seed))
            .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()),
    );

    let dir = tempfile::tempdir()?;
    let node =
        Node::start(join_config(dir.path(), "newcomer", &impostor_address, &token), CancellationToken::new()).await;
    let error = node.err().ok_or_else(|| anyhow::anyhow!("a join through a removed node succeeded"))?;
    let message = format!("{:#}", anyhow::Error::new(error));
    assert!(message.contains("did not prove that it knows the cluster's current join token"), "{message}");
    assert!(!dir.path().join("node.json").exists(), "a refused join must not leave an identity");
    stop.cancel();
    let _ = server.await;

    let requests = captured.lock().map(|c| c.clone()).unwrap_or_default();
    let [request] = requests.as_slice() else {
        anyhow::bail!("expected one join at the impostor, got {}", requests.len())
    };
    let secret = Token::parse(&token)?.secret;
    assert!(request.secret.is_empty(), "the token itself reached the impostor");
    let sent = format!("{request:?}");
    assert!(!sent.contains(&secret), "the secret reached the impostor in some field");
    assert!(!sent.contains(&roost_network::pki::secret_digest(&secret)), "its digest reached the impostor");

    // The proofs it captured, replayed to a voter on a session of its own.
    let voter = cluster.node(leader)?.address.clone();
    let channel = ClientTls::anonymous(cluster.tokens.admin.ca_digest)?.connect(&voter).await?;
    let replay = roost_proto::cluster::JoinRequest { name: "replayed".into(), ..request.clone() };
    let status = roost_proto::cluster::join_client::JoinClient::new(channel)
        .join(replay)
        .await
        .expect_err("a replayed join proof");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("wrong join token"), "{}", status.message());
    assert_eq!(node_count(&cluster).await?, 2, "nobody joined");
    cluster.shutdown().await;
    Ok(())
}

/// Joins are limited per client address: a burst of `JOIN_BURST`
/// attempts, then one per `JOIN_EVERY`; past that a join is refused with
/// `ResourceExhausted` before anything else is looked at, until the bucket
/// refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_attempts_past_the_burst_from_one_address_are_refused_until_the_bucket_refills() -> Result<()> {
    use roost_node::daemon::join::{JOIN_BURST, JOIN_EVERY};
    let cluster = Cluster::start(1).await?;
    let address = cluster.node(0)?.address.clone();
    let channel = ClientTls::anonymous(cluster.tokens.admin.ca_digest)?.connect(&address).await?;
    let mut join = roost_proto::cluster::join_client::JoinClient::new(channel);
    let attempt = || roost_proto::cluster::JoinRequest { name: "guess".into(), ..Default::default() };
    for i in 0..JOIN_BURST {
        let status = join.join(attempt()).await.expect_err("a join without a proof");
        assert_ne!(status.code(), tonic::Code::ResourceExhausted, "attempt {i} within the burst: {status:?}");
    }
    let status = join.join(attempt()).await.expect_err("a join past the burst");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("too many join attempts"), "{}", status.message());
    // One more is allowed once the bucket has refilled by one.
    roost_tests::wait_until("the join bucket to refill", JOIN_EVERY * 5, || async {
        let status = join.clone().join(attempt()).await.expect_err("a join without a proof");
        Ok(status.code() != tonic::Code::ResourceExhausted)
    })
    .await?;
    cluster.shutdown().await;
    Ok(())
}

/// A worker (a node that joined with the worker token) may neither campaign
/// nor pose as a leader: its Vote and its AppendEntries, sent with its own
/// certificate in its own name and a log as long as the leader's, are
/// refused before Raft sees them, so the leader's term does not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_may_not_campaign_or_pose_as_a_leader() -> Result<()> {
    let mut cluster = Cluster::start(1).await?;
    let request = GetJoinTokenRequest { role: "worker".into() };
    let token = cluster.client(0).await?.get_join_token(request).await?.into_inner().token;
    let worker = cluster.add_node_with_token(&token).await?;
    cluster.wait_for_members(2).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    assert_eq!(leader, 0);
    let worker_id = cluster.node(worker)?.id;
    let metrics = || cluster.node(leader).map(|n| n.consensus.raft().metrics().borrow().clone());
    let before = metrics()?;
    let last = before.last_applied;
    let tls = roost_tests::node_tls(cluster.slots[worker].dir.path())?;
    let mut raft =
        roost_proto::cluster::raft_client::RaftClient::new(tls.connect(&cluster.node(leader)?.address).await?);

    let campaign: openraft::raft::VoteRequest<roost_raft::NodeId> = openraft::raft::VoteRequest {
        vote: openraft::Vote::new(before.current_term + 100, worker_id),
        last_log_id: last,
    };
    let status = raft
        .vote(roost_proto::cluster::RaftPayload { json: serde_json::to_vec(&campaign)? })
        .await
        .expect_err("a worker campaigning");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("is a worker"), "{status:?}");

    let posing: openraft::raft::AppendEntriesRequest<roost_raft::TypeConfig> = openraft::raft::AppendEntriesRequest {
        vote: openraft::Vote::new_committed(before.current_term + 1, worker_id),
        prev_log_id: last,
        entries: Vec::new(),
        leader_commit: last,
    };
    let status = raft
        .append_entries(roost_proto::cluster::RaftPayload { json: serde_json::to_vec(&posing)? })
        .await
        .expect_err("a worker posing as the leader");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    let after = metrics()?;
    assert_eq!(after.current_term, before.current_term, "the leader's term did not move");
    assert_eq!(after.current_leader, before.current_leader, "nor did its leadership");
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_with_flags_that_contradict_the_data_dir_is_refused() -> Result<()> {
    let mut cluster = Cluster::start(1).await?;
    let address = cluster.node(0)?.address.clone();
    cluster.stop(0).await?;
    let dir = cluster.slots[0].dir.path().to_owned();
    let restart =
        |name: &str, start: Start| NodeConfig { listen: address.clone(), start, ..join_config(&dir, name, "", "") };

    let error = Node::start(restart("other", Start::Init), CancellationToken::new()).await.expect_err("name conflict");
    let message = format!("{:#}", anyhow::Error::new(error));
    assert!(message.contains("holds node 'n1'") && message.contains("--name"), "{message}");

    let foreign = Token::generate(TokenKind::Join, roost_network::CaDigest::of(b"elsewhere")).to_string();
    let join_elsewhere = Start::Join { seed: address.clone(), token: foreign };
    let error = Node::start(restart("n1", join_elsewhere), CancellationToken::new()).await.expect_err("other cluster");
    let message = format!("{:#}", anyhow::Error::new(error));
    assert!(message.contains("another cluster"), "{message}");

    // The same command line as before resumes the node, data intact.
    cluster.restart(0).await?;
    assert_eq!(node_count(&cluster).await?, 1);
    cluster.shutdown().await;
    Ok(())
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &std::path::Path) -> Result<std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>> {
    let mut files = std::collections::BTreeMap::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path)?);
            }
        }
    }
    Ok(files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn init_or_join_on_a_directory_with_keys_but_no_node_json_is_refused_and_changes_no_byte() -> Result<()> {
    let mut cluster = Cluster::start(1).await?;
    let address = cluster.node(0)?.address.clone();
    let join_token = cluster.tokens.join.to_string();
    cluster.stop(0).await?;
    let dir = cluster.slots[0].dir.path().to_owned();
    std::fs::remove_file(dir.join("node.json"))?;
    let before = snapshot(&dir)?;
    assert!(before.keys().any(|p| p.ends_with("secrets.key")), "the first node holds the secrets key");
    let config = |start: Start| NodeConfig { listen: address.clone(), start, ..join_config(&dir, "n1", "", "") };
    for (what, start) in
        [("init", Start::Init), ("join", Start::Join { seed: "127.0.0.1:9".into(), token: join_token.clone() })]
    {
        let error = Node::start(config(start), CancellationToken::new())
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: must be refused"));
        let message = format!("{:#}", anyhow::Error::new(error));
        assert!(
            message.contains("holds no node.json") && message.contains("secrets.key") && message.contains("raft/"),
            "{what}: {message}"
        );
        let after = snapshot(&dir)?;
        let changed: Vec<_> = before
            .keys()
            .chain(after.keys())
            .filter(|p| before.get(*p) != after.get(*p))
            .map(|p| p.display().to_string())
            .collect();
        assert!(
            changed.is_empty(),
            "{what}: a refused start must leave every file byte for byte; changed: {changed:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_node_port_refuses_tls_before_1_3() -> Result<()> {
    let cluster = Cluster::start(1).await?;
    let address = cluster.node(0)?.address.clone();
    let attempt = |max: &'static str| {
        let address = address.clone();
        async move {
            let out = tokio::process::Command::new("curl")
                .args(["-sk", "-o", "/dev/null", "--max-time", "5", "--http2", "--tls-max", max])
                .args(["-w", "%{http_version}", &format!("https://{address}/")])
                .output()
                .await?;
            Ok::<_, anyhow::Error>((out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned()))
        }
    };
    // curl exits 35 when the TLS handshake fails.
    let (code, _) = attempt("1.2").await?;
    assert_eq!(code, Some(35), "a TLS 1.2 client must be refused at the handshake");
    let (code, version) = attempt("1.3").await?;
    assert_eq!((code, version.as_str()), (Some(0), "2"), "a TLS 1.3 client gets through the handshake");
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_300_idle_connections_is_capped_and_the_cli_and_raft_keep_working() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let target: std::net::SocketAddr = cluster.node(0)?.address.parse()?;
    let limits = roost_network::tls::ConnectionLimits::default();
    let per_client = limits.per_client;
    // The flood comes from another address than the CLI's (both loopback).
    let mut flood = Vec::new();
    for _ in 0..300 {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.2:0".parse()?)?;
        flood.push(socket.connect(target).await?);
    }
    let closed = |flood: &[tokio::net::TcpStream]| {
        let mut buf = [0u8; 16];
        flood
            .iter()
            .filter(|s| !matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock))
            .count()
    };
    roost_tests::wait_until("the connections over the per-client cap to be closed", Duration::from_secs(10), || {
        let closed = closed(&flood);
        async move { Ok(closed >= 300 - per_client) }
    })
    .await?;
    // The rest stay open until the handshake timeout: meanwhile the CLI and
    // Raft work as before.
    let listed = cluster.cli(0, &["node", "list"]).await?;
    assert!(listed.contains("n1") && listed.contains("n3"), "{listed}");
    cluster
        .client(0)
        .await?
        .create_app(roost_node::cli::about_app("flooded", CreateAppRequest { name: "flooded".into() }))
        .await?;
    let apps = cluster.client(2).await?.list_apps(ListAppsRequest::default()).await?.into_inner().apps;
    assert!(apps.iter().any(|a| a.name == "flooded"), "{apps:?}");
    // Connections that never handshake are closed after the timeout.
    roost_tests::wait_until("every silent connection to be closed", limits.handshake_timeout * 3, || {
        let closed = closed(&flood);
        async move { Ok(closed == 300) }
    })
    .await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_and_concurrent_large_writes_are_refused_or_committed_without_a_leader_change() -> Result<()> {
    use roost_proto::api::SetSecretsRequest;
    let cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let term = |i: usize| -> Result<u64> { Ok(cluster.node(i)?.consensus.raft().metrics().borrow().current_term) };
    let term_before = term(leader)?;
    let apps: Vec<String> = (0..25).map(|i| format!("big{i}")).collect();
    for app in &apps {
        cluster
            .client(0)
            .await?
            .create_app(roost_node::cli::about_app(app, CreateAppRequest { name: app.clone() }))
            .await?;
    }

    // 25 concurrent 1.5 MB values, through every node: each refused, clearly.
    let huge = "x".repeat(1_500_000);
    let mut calls = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        let mut client = cluster.client(i % 3).await?;
        let request =
            SetSecretsRequest { app: app.clone(), secrets: [("BLOB".to_owned(), huge.clone())].into(), stage: false };
        let request = roost_node::cli::about_app(app, request);
        calls.push(tokio::spawn(async move { client.set_secrets(request).await }));
    }
    for call in calls {
        let status = call.await?.expect_err("a 1.5 MB secret must be refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("at most 65536 bytes"), "{}", status.message());
    }

    // 25 concurrent writes of ~900 KB each (7 values of 64 KiB, sealed):
    // allowed, so each is committed, in entries the followers accept.
    let value = "y".repeat(64 * 1024);
    let mut calls = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        let mut client = cluster.client(i % 3).await?;
        let secrets = (0..7).map(|k| (format!("PART{k}"), value.clone())).collect();
        let request = roost_node::cli::about_app(app, SetSecretsRequest { app: app.clone(), secrets, stage: false });
        calls.push(tokio::spawn(async move { client.set_secrets(request).await }));
    }
    for call in calls {
        call.await?.map_err(|status| anyhow::anyhow!("a large allowed write failed: {status:?}"))?;
    }
    // Every node has every write.
    roost_tests::wait_until("every node to apply the large writes", Duration::from_secs(30), || async {
        Ok((0..3).all(|i| {
            cluster.node(i).is_ok_and(|n| {
                n.consensus.state().read(|s| apps.iter().all(|a| s.apps.get(a).is_some_and(|a| a.secrets.len() == 7)))
            })
        }))
    })
    .await?;

    // A proposal over the cap is refused before it is proposed.
    let sealed = roost_raft::workload::SealedSecret { sealed: "0".repeat(3 << 20), digest: "d".into(), updated_at: 1 };
    let command = roost_raft::Command::SetSecrets {
        app: "big0".into(),
        set: [("HUGE".to_owned(), sealed)].into(),
        unset: Vec::new(),
        stage: true,
    };
    let error = cluster.node(1)?.consensus.propose(command, tokio::time::Instant::now() + Duration::from_secs(5)).await;
    assert!(matches!(error, Err(roost_raft::ConsensusError::TooLarge { .. })), "{error:?}");

    assert_eq!(cluster.leader(), Some(leader), "the leader must not change");
    assert_eq!(term(leader)?, term_before, "no election may happen");
    cluster
        .client(2)
        .await?
        .create_app(roost_node::cli::about_app("after", CreateAppRequest { name: "after".into() }))
        .await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_certificate_may_propose_only_what_a_node_needs() -> Result<()> {
    use roost_raft::command::Forward;
    use roost_raft::{Command, Grant, Proposal};
    let cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    cluster
        .client(0)
        .await?
        .create_app(roost_node::cli::about_app("target", CreateAppRequest { name: "target".into() }))
        .await?;
    cluster
        .client(0)
        .await?
        .create_app(roost_node::cli::about_app("bystander", CreateAppRequest { name: "bystander".into() }))
        .await?;
    let member = (leader + 1) % 3;
    let member_id = cluster.node(member)?.id;
    let tls = roost_tests::node_tls(cluster.slots[member].dir.path())?;
    let mut raft =
        roost_proto::cluster::raft_client::RaftClient::new(tls.connect(&cluster.node(leader)?.address).await?);
    let propose = |command: Command, grant: Option<Grant>| {
        let forward = Forward { proposal: Proposal::new(command, 1), grant };
        roost_proto::cluster::RaftPayload { json: serde_json::to_vec(&forward).expect("encodes") }
    };
    let sealed = roost_raft::workload::SealedSecret { sealed: "00".into(), digest: "d".into(), updated_at: 1 };
    let set_secrets_of = |app: &str| Command::SetSecrets {
        app: app.into(),
        set: [("K".to_owned(), sealed.clone())].into(),
        unset: Vec::new(),
        stage: true,
    };
    let set_secrets = || set_secrets_of("target");
    let forged = Token { secret: "0".repeat(32), ..cluster.tokens.admin.clone() }.to_string();
    let other = cluster.node(leader)?.id;
    let here = roost_raft::workload::Placement::Place { instance: "target-app-0".into(), node: member_id };
    let issued = roost_raft::state::IssuedCertificate {
        chain_pem: String::new(),
        key: sealed.clone(),
        not_after: i64::MAX,
        issued_at: 1,
    };
    let admin_grant = Grant::Token { token: cluster.tokens.admin.to_string() };
    // A signed call's grant: good when fresh and made to the node that
    // forwards it; refused once older than the leader allows (a node cannot
    // keep a user's signature to use later), when made to another node, and
    // for a change to another app than the one the call was signed for.
    let fingerprint_of = |i: usize| {
        let id = cluster.node(i).map(|n| n.id).unwrap_or_default();
        cluster.node(leader).map(|n| n.consensus.state().read(|s| s.nodes[&id].cert_fingerprint.clone()))
    };
    let (member_fp, leader_fp) = (fingerprint_of(member)?, fingerprint_of(leader)?);
    let signed_for = |token: &Token, server: &str, method: &str, target: &str, age_ms: i64| {
        let session = [9u8; 32];
        let now = roost_raft::consensus::now_millis();
        let call = roost_network::token::SignedCall { session: &session, server, method, target };
        let signature = token.key().sign(&call, now - age_ms);
        Grant::Signed {
            public_key: signature.public_key,
            timestamp_ms: signature.timestamp_ms,
            session: roost_network::pki::hex(&session),
            server: server.to_owned(),
            method: method.to_owned(),
            target: target.to_owned(),
            signature: signature.signature,
        }
    };
    let signed_by = |token: &Token, server: &str, method: &str, age_ms: i64| {
        signed_for(token, server, method, "app:target", age_ms)
    };
    let signed = |age_ms: i64| signed_by(&cluster.tokens.admin, &member_fp, "SetSecrets", age_ms);
    let stale = signed(roost_node::daemon::auth::SIGNED_GRANT_AGE_MS + 60_000);
    let to_another_node = signed_by(&cluster.tokens.admin, &leader_fp, "SetSecrets", 0);
    let for_another_method = signed_by(&cluster.tokens.admin, &member_fp, "ListApps", 0);
    let stranger = Token::generate(TokenKind::Api, cluster.tokens.admin.ca_digest);
    let unknown_key = signed_by(&stranger, &member_fp, "SetSecrets", 0);
    let forged_signature = match signed(0) {
        Grant::Signed { public_key, timestamp_ms, session, server, method, target, .. } => {
            Grant::Signed { public_key, timestamp_ms, session, server, method, target, signature: "00".repeat(64) }
        }
        other => other,
    };
    let plain = || Some(roost_raft::command::Secret("known-to-the-proposer".into()));
    let plain_rotation =
        Command::RemoveNode { id: other, new_join_secret: plain(), new_worker_secret: plain(), rotate: None };
    let refused = [
        ("join secrets in plain text, even with the admin token", propose(plain_rotation, Some(admin_grant.clone()))),
        ("a placement on itself", propose(Command::Place { placements: vec![here.clone()] }, None)),
        (
            "a placement even with the admin token",
            propose(Command::Place { placements: vec![here] }, Some(admin_grant)),
        ),
        (
            "a certificate for any domain",
            propose(Command::CertificateIssued { domain: "bank.example.com".into(), issued }, None),
        ),
        ("secrets without a grant", propose(set_secrets(), None)),
        ("secrets with a wrong admin token", propose(set_secrets(), Some(Grant::Token { token: forged }))),
        ("secrets with a signature older than allowed", propose(set_secrets(), Some(stale))),
        ("secrets with a signature of an unknown token", propose(set_secrets(), Some(unknown_key))),
        ("secrets with a signature that does not verify", propose(set_secrets(), Some(forged_signature))),
        ("secrets with a signature made to another node", propose(set_secrets(), Some(to_another_node))),
        ("secrets with a signature of a call that changes nothing", propose(set_secrets(), Some(for_another_method))),
        ("another app's secrets with a signature for target", propose(set_secrets_of("bystander"), Some(signed(0)))),
        (
            "a node removal with a signature of a removal signed for app target",
            propose(
                Command::RemoveNode { id: other, new_join_secret: None, new_worker_secret: None, rotate: None },
                Some(signed_by(&cluster.tokens.admin, &member_fp, "RemoveNode", 0)),
            ),
        ),
        ("a destroy", propose(Command::DestroyApp { name: "target".into() }, None)),
        ("a rollback (a release)", propose(Command::Rollback { app: "target".into(), version: None }, None)),
        ("a scale", propose(Command::Scale { app: "target".into(), group: "app".into(), count: 9 }, None)),
        (
            "a node removal",
            propose(
                roost_raft::Command::RemoveNode {
                    id: other,
                    new_join_secret: None,
                    new_worker_secret: None,
                    rotate: None,
                },
                None,
            ),
        ),
        (
            "another node's address",
            propose(Command::UpdateNode { id: other, address: "127.0.0.1:1".into(), wireguard: None }, None),
        ),
    ];
    for (case, payload) in refused {
        let status = raft.propose(payload).await.expect_err(case);
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{case}: {status:?}");
    }
    let state = |f: fn(&roost_raft::State) -> bool| cluster.node(leader).map(|n| n.consensus.state().read(f));
    assert!(state(|s| s.apps.get("target").is_some_and(|a| a.secrets.is_empty()))?, "nothing was written");
    assert!(state(|s| s.apps.get("bystander").is_some_and(|a| a.secrets.is_empty()))?);
    assert!(state(|s| s.nodes.values().all(|n| n.address != "127.0.0.1:1"))?);
    assert!(state(|s| s.nodes.len() == 3 && s.cluster.as_ref().is_some_and(|c| c.join_secret.is_empty()))?);

    // With the user's admin token, the same proposal is written: this is how
    // a node forwards a user's change.
    let admin = Grant::Token { token: cluster.tokens.admin.to_string() };
    raft.propose(propose(set_secrets(), Some(admin))).await?;
    assert!(state(|s| s.apps.get("target").is_some_and(|a| a.secrets.contains_key("K")))?);
    // And so is it with a fresh signed call's grant, as the CLI makes them.
    let unset =
        Command::SetSecrets { app: "target".into(), set: Default::default(), unset: vec!["K".into()], stage: true };
    raft.propose(propose(unset, Some(signed(0)))).await?;
    assert!(state(|s| s.apps.get("target").is_some_and(|a| a.secrets.is_empty()))?);
    // And a node reports about itself on its own authority.
    let me = cluster.node(member)?.address.clone();
    raft.propose(propose(Command::UpdateNode { id: member_id, address: me, wireguard: None }, None)).await?;
    cluster.shutdown().await;
    Ok(())
}

/// A worker's certificate forwards a user's grant only for a change to one
/// app: with the admin's grant (a token, or a signed call made to the worker,
/// as it would hold one for 2 h after serving it) it can neither label
/// itself nor create a token, while a change to an app goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_forwarding_an_admins_grant_may_change_an_app_but_not_label_itself() -> Result<()> {
    use roost_raft::command::Forward;
    use roost_raft::{Command, Grant, Proposal};
    let mut cluster = Cluster::start(1).await?;
    let mut admin = cluster.client(0).await?;
    admin.create_app(roost_node::cli::about_app("target", CreateAppRequest { name: "target".into() })).await?;
    let worker_token =
        admin.get_join_token(roost_proto::api::GetJoinTokenRequest { role: "worker".into() }).await?.into_inner().token;
    let worker = cluster.add_node_with_token(&worker_token).await?;
    cluster.wait_for_members(2).await?;
    let worker_id = cluster.node(worker)?.id;
    let leader = cluster.node(0)?;
    let worker_fp = leader.consensus.state().read(|s| s.nodes.get(&worker_id).map(|n| n.cert_fingerprint.clone()));
    let worker_fp = worker_fp.ok_or_else(|| anyhow::anyhow!("the worker is in the leader's state"))?;
    let tls = roost_tests::node_tls(cluster.slots[worker].dir.path())?;
    let mut raft = roost_proto::cluster::raft_client::RaftClient::new(tls.connect(&leader.address).await?);
    let propose = |command: Command, grant: Grant| {
        let forward = Forward { proposal: Proposal::new(command, 1), grant: Some(grant) };
        roost_proto::cluster::RaftPayload { json: serde_json::to_vec(&forward).expect("encodes") }
    };
    let signed = |method: &str, target: &str| {
        let session = [7u8; 32];
        let call = roost_network::token::SignedCall { session: &session, server: &worker_fp, method, target };
        let signature = cluster.tokens.admin.key().sign(&call, roost_raft::consensus::now_millis());
        Grant::Signed {
            public_key: signature.public_key,
            timestamp_ms: signature.timestamp_ms,
            session: roost_network::pki::hex(&session),
            server: worker_fp.clone(),
            method: method.to_owned(),
            target: target.to_owned(),
            signature: signature.signature,
        }
    };
    let label_itself = || Command::LabelNode {
        id: worker_id,
        set: [("trusted".to_owned(), "yes".to_owned())].into(),
        remove: Vec::new(),
    };
    let token = Grant::Token { token: cluster.tokens.admin.to_string() };
    for (case, payload) in [
        (
            "a label, with a signed call's grant",
            propose(label_itself(), signed("LabelNode", &format!("node:{worker_id}"))),
        ),
        ("a label, with the admin token", propose(label_itself(), token.clone())),
        (
            "an app created, with a signed call's grant",
            propose(Command::CreateApp { name: "x".into() }, signed("CreateApp", "app:x")),
        ),
    ] {
        let status = raft.propose(payload).await.expect_err(case);
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{case}: {status:?}");
        assert!(status.message().contains("a worker forwards changes to one app only"), "{case}: {}", status.message());
    }
    let unchanged = leader
        .consensus
        .state()
        .read(|s| s.nodes.get(&worker_id).is_some_and(|n| n.labels.is_empty()) && !s.apps.contains_key("x"));
    assert!(unchanged, "nothing was written");
    // A change to one app, with the same kind of grant, is the worker's to
    // forward (a deploy built on it, say).
    raft.propose(propose(Command::SuspendApp { name: "target".into() }, signed("SuspendApp", "app:target"))).await?;
    assert!(leader.consensus.state().read(|s| s.apps.get("target").is_some_and(|a| a.suspended)));
    cluster.shutdown().await;
    Ok(())
}

/// A deploy whose upload stops sending (the client neither sends nor ends
/// the stream) is given up after 60 s with a message that says so, not
/// before, and creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_that_sends_nothing_for_60_s_is_given_up_and_creates_nothing() -> Result<()> {
    use roost_proto::api::{deploy_request, DeployRequest, DeployStart};

    let cluster = Cluster::start(1).await?;
    let mut client = cluster.client(0).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let start =
        DeployStart { app: "stall".into(), config: roost_tests::apps::hello_toml("stall", ""), ..Default::default() };
    tx.send(DeployRequest { part: Some(deploy_request::Part::Start(start)) }).await?;
    tx.send(DeployRequest { part: Some(deploy_request::Part::Chunk(vec![0; 2048])) }).await?;
    let requests = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let started = tokio::time::Instant::now();
    let mut events = client.deploy(roost_node::cli::about_app("stall", requests)).await?.into_inner();
    // `tx` stays open: the upload neither goes on nor ends.
    let given_up = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match events.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => anyhow::bail!("the deploy ended without an error"),
                Err(status) => return Ok(status),
            }
        }
    });
    let status = given_up.await.map_err(|_| anyhow::anyhow!("the stalled upload was not given up in 120 s"))??;
    assert!(
        status.message().contains("the upload stalled: nothing arrived for 60 s after 2 KiB"),
        "{}",
        status.message()
    );
    assert!(started.elapsed() >= Duration::from_secs(60), "given up after {:?}", started.elapsed());
    let apps = client.list_apps(ListAppsRequest::default()).await?.into_inner().apps;
    assert!(apps.is_empty(), "the stalled deploy created {apps:?}");
    drop(tx);
    cluster.shutdown().await;
    Ok(())
}
