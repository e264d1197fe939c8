//! Bad input gets a clear refusal and changes nothing.

use std::time::Duration;

use anyhow::Result;
use roost_network::tls::ClientTls;
use roost_network::{Token, TokenKind};
use roost_node::cli::BearerToken;
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
async fn api_calls_need_this_clusters_admin_token() -> Result<()> {
    let cluster = Cluster::start(1).await?;
    let address = cluster.node(0)?.address.clone();
    let admin = cluster.tokens.admin.clone();
    let tls = ClientTls::anonymous(admin.ca_digest)?;
    let cases = [
        (
            Some(Token { secret: "f".repeat(32), ..admin.clone() }.to_string()),
            tonic::Code::Unauthenticated,
            "wrong admin token",
        ),
        (Some(cluster.tokens.join.to_string()), tonic::Code::Unauthenticated, "join token"),
        (None, tonic::Code::Unauthenticated, "no admin token"),
    ];
    for (token, code, expected) in cases {
        let channel = tls.connect(&address).await?;
        let result = match &token {
            Some(token) => {
                let mut client =
                    ControlClient::with_interceptor(channel, BearerToken(format!("Bearer {token}").parse()?));
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
        let status = client.create_app(CreateAppRequest { name: bad.into() }).await.expect_err(bad);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad:?}: {status:?}");
        assert!(status.message().contains("lowercase letters"), "{}", status.message());
    }
    client.create_app(CreateAppRequest { name: "web".into() }).await?;
    let status = client.create_app(CreateAppRequest { name: "web".into() }).await.expect_err("duplicate");
    assert_eq!(status.code(), tonic::Code::AlreadyExists);
    assert!(status.message().contains("already exists"));
    let status = client.destroy_app(DestroyAppRequest { name: "nope".into() }).await.expect_err("missing");
    assert_eq!(status.code(), tonic::Code::NotFound);
    let status = client.remove_node(RemoveNodeRequest { node: "n9".into() }).await.expect_err("missing node");
    assert_eq!(status.code(), tonic::Code::NotFound);
    let status = client.remove_node(RemoveNodeRequest { node: "n1".into() }).await.expect_err("last node");
    assert!(status.message().contains("only node"), "{}", status.message());
    let apps = client.list_apps(ListAppsRequest::default()).await?.into_inner().apps;
    assert_eq!(apps.len(), 1);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_of_removed_or_unknown_nodes_are_refused() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let victim = (0..3).find(|i| *i != leader).expect("a follower");
    let victim_name = cluster.slots[victim].name.clone();
    // Keep the victim's own view of the cluster: its client identity.
    let victim_dir = cluster.slots[victim].dir.path().to_owned();
    let token_before = cluster.client(leader).await?.get_join_token(GetJoinTokenRequest {}).await?.into_inner().token;
    cluster.client(leader).await?.remove_node(RemoveNodeRequest { node: victim_name }).await?;
    let token_after = cluster.client(leader).await?.get_join_token(GetJoinTokenRequest {}).await?.into_inner().token;
    assert_ne!(token_before, token_after, "removing a node rotates the join token");
    roost_tests::wait_until("the removed node to stop", Duration::from_secs(15), || async {
        Ok(cluster.slots[victim].running.as_ref().is_some_and(|n| n.is_stopping()))
    })
    .await?;
    // Its certificate no longer opens the node services.
    let read = |f: &str| std::fs::read_to_string(victim_dir.join("tls").join(f));
    let tls = ClientTls::node(&read("ca.pem")?, &read("node.pem")?, &read("node.key")?)?;
    let channel = tls.connect(&cluster.node(leader)?.address).await?;
    let status = roost_proto::cluster::peer_client::PeerClient::new(channel)
        .heartbeat(roost_proto::cluster::HeartbeatRequest { node_id: 0 })
        .await
        .expect_err("revoked");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // A certificate signed with the cluster CA's key but never issued
    // through a join opens nothing either.
    let info = cluster.node(leader)?.consensus.state().read(|s| s.cluster.clone()).expect("bootstrapped");
    let ca = roost_network::ClusterCa::load(&info.id, &info.ca_cert_pem, &info.ca_key_pem)?;
    let rogue = ca.issue_node("rogue")?;
    let tls = ClientTls::node(ca.cert_pem(), &rogue.cert_pem, &rogue.key_pem)?;
    let channel = tls.connect(&cluster.node(leader)?.address).await?;
    let status = roost_proto::cluster::raft_client::RaftClient::new(channel)
        .read_index(roost_proto::cluster::ReadIndexRequest {})
        .await
        .expect_err("not a member");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
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
