//! Scoped API tokens, driven through the CLI against a 3-node cluster: each
//! scope allows exactly its boundary on every node, the leader checks the
//! scope of a forwarded change again, and a revoked, rotated or expired
//! token is refused by every node.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use roost_node::cli::CliError;
use roost_raft::command::Forward;
use roost_raft::{Command, Grant, Proposal};
use roost_tests::apps::cli;
use roost_tests::{wait_until, Cluster};

/// `tokens create ... --json`, returning the printed token.
async fn create(cluster: &Cluster, args: &[&str]) -> Result<String> {
    let mut argv = vec!["tokens", "create", "--json"];
    argv.extend_from_slice(args);
    let printed = cluster.cli(0, &argv).await.map_err(|e| anyhow!("tokens create {args:?}: {e}"))?;
    let object: serde_json::Value = serde_json::from_str(&printed).context("tokens create --json prints JSON")?;
    object["token"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no `token` key in {printed}"))
}

/// Whether a CLI call was refused for its token (exit code 4), as opposed
/// to allowed (and perhaps refused for another reason).
fn refused_for_token(result: &std::result::Result<String, CliError>) -> bool {
    matches!(result, Err(CliError::Auth(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scoped_tokens_allow_exactly_their_scope_on_every_node_and_revocation_is_immediate() -> Result<()> {
    roost_tests::init_logs();
    let cluster = Cluster::start(3).await?;
    cluster.wait_for_members(3).await?;
    for app in ["web", "db"] {
        cluster.cli(0, &["apps", "create", app]).await?;
    }
    let deploy = create(&cluster, &["--scope", "deploy:web", "--name", "ci"]).await?;
    let read = create(&cluster, &["--scope", "read", "--name", "ro", "--expires", "30d"]).await?;
    assert!(deploy.starts_with("ROOST-TOKEN-1-"), "{deploy}");

    // Each case: the token, the command, whether the token allows it. An
    // allowed command may still fail for another reason (web has no release
    // to scale), but never for its token.
    let cases: &[(&str, &str, &[&str], bool)] = &[
        ("deploy", &deploy, &["secrets", "set", "A=1", "--stage", "-a", "web"], true),
        ("deploy", &deploy, &["secrets", "list", "-a", "web"], true),
        ("deploy", &deploy, &["status", "-a", "web"], true),
        ("deploy", &deploy, &["releases", "-a", "web"], true),
        ("deploy", &deploy, &["scale", "count", "2", "-a", "web"], true),
        ("deploy", &deploy, &["restart", "-a", "web"], true),
        ("deploy", &deploy, &["apps", "show", "web"], true),
        ("deploy", &deploy, &["secrets", "set", "A=1", "--stage", "-a", "db"], false),
        ("deploy", &deploy, &["status", "-a", "db"], false),
        ("deploy", &deploy, &["logs", "-a", "db"], false),
        ("deploy", &deploy, &["apps", "create", "other"], false),
        ("deploy", &deploy, &["apps", "destroy", "web", "--yes"], false),
        ("deploy", &deploy, &["node", "list"], false),
        ("deploy", &deploy, &["node", "token"], false),
        ("deploy", &deploy, &["certs", "list"], false),
        ("deploy", &deploy, &["tokens", "list"], false),
        ("read", &read, &["apps", "list"], true),
        ("read", &read, &["node", "list"], true),
        ("read", &read, &["status", "-a", "db"], true),
        ("read", &read, &["secrets", "list", "-a", "web"], true),
        ("read", &read, &["certs", "list"], true),
        ("read", &read, &["secrets", "set", "A=1", "--stage", "-a", "web"], false),
        ("read", &read, &["scale", "count", "1", "-a", "web"], false),
        ("read", &read, &["apps", "suspend", "web"], false),
        ("read", &read, &["apps", "create", "other"], false),
        ("read", &read, &["node", "token"], false),
        ("read", &read, &["tokens", "create", "--scope", "admin"], false),
    ];
    for node in 0..3 {
        let address = cluster.node(node)?.address.clone();
        for (who, token, args, allowed) in cases {
            let result = cli(&address, token, args).await;
            assert_eq!(
                !refused_for_token(&result),
                *allowed,
                "node {node}: the {who} token running {args:?} gave {result:?}"
            );
            if let Err(CliError::Auth(message)) = &result {
                assert!(message.contains("scope"), "the refusal names the scope: {message}");
            }
        }
    }
    // A token for one app lists that app alone.
    let listed = cli(&cluster.node(1)?.address, &deploy, &["apps", "list", "--json"]).await?;
    let names: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&listed)?
        .iter()
        .filter_map(|a| a["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(names, ["web"]);

    // The leader checks the scope of a forwarded change itself: a node (or
    // anyone holding a node's certificate) cannot stretch a deploy token to
    // another app.
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let member = (leader + 1) % 3;
    let tls = roost_tests::node_tls(cluster.slots[member].dir.path())?;
    let mut raft =
        roost_proto::cluster::raft_client::RaftClient::new(tls.connect(&cluster.node(leader)?.address).await?);
    let forward = |app: &str| {
        let command =
            Command::SetSecrets { app: app.into(), set: Default::default(), unset: vec!["A".into()], stage: true };
        let forward =
            Forward { proposal: Proposal::new(command, 1), grant: Some(Grant::Token { token: deploy.clone() }) };
        roost_proto::cluster::RaftPayload { json: serde_json::to_vec(&forward).expect("encodes") }
    };
    let status = raft.propose(forward("db")).await.expect_err("db is out of the deploy token's scope");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("deploy:web"), "{}", status.message());
    raft.propose(forward("web")).await.context("web is in scope")?;

    // `tokens list` shows every token, never a secret, and when each was
    // last used (nodes report uses every few seconds).
    let listed = cluster.cli(2, &["tokens", "list", "--json"]).await?;
    assert!(!listed.contains(&deploy[deploy.len() - 32..]), "no secret in the list");
    let tokens: Vec<serde_json::Value> = serde_json::from_str(&listed)?;
    let scopes: Vec<(&str, &str)> =
        tokens.iter().filter_map(|t| Some((t["name"].as_str()?, t["scope"].as_str()?))).collect();
    assert_eq!(scopes, [("admin", "admin"), ("ci", "deploy:web"), ("ro", "read")]);
    assert!(tokens[2]["expires_at"].is_string() && tokens[1]["expires_at"].is_null());
    wait_until("the deploy token's last use to be recorded", Duration::from_secs(40), || async {
        let listed = cluster.cli(1, &["tokens", "list", "--json"]).await.map_err(|e| anyhow!("{e}"))?;
        let tokens: Vec<serde_json::Value> = serde_json::from_str(&listed)?;
        Ok(tokens.iter().any(|t| t["name"] == "ci" && t["last_used_at"].is_string()))
    })
    .await?;

    // Revoked: refused by every node at once, for reads (each node checks
    // the token again once its state has caught up) and for writes (the
    // leader checks it).
    let printed = cluster.cli(0, &["tokens", "revoke", "ci"]).await?;
    assert!(printed.contains("Revoked token ci"), "{printed}");
    for node in 0..3 {
        let address = cluster.node(node)?.address.clone();
        for args in [&["status", "-a", "web"][..], &["secrets", "set", "B=2", "--stage", "-a", "web"][..]] {
            let result = cli(&address, &deploy, args).await;
            assert!(refused_for_token(&result), "node {node}, {args:?} with a revoked token: {result:?}");
        }
    }

    // Rotated: the new secret works, the old one is refused.
    let rotated = {
        let printed = cluster.cli(0, &["tokens", "rotate", "ro", "--json"]).await?;
        let object: serde_json::Value = serde_json::from_str(&printed)?;
        object["token"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no token in {printed}"))?
    };
    for node in 0..3 {
        let address = cluster.node(node)?.address.clone();
        assert!(refused_for_token(&cli(&address, &read, &["apps", "list"]).await), "node {node}: old secret");
        cli(&address, &rotated, &["apps", "list"]).await.map_err(|e| anyhow!("node {node}: new secret: {e}"))?;
    }

    // Expired: refused once its time has passed, and the refusal says so.
    let brief = create(&cluster, &["--scope", "read", "--name", "brief", "--expires", "1s"]).await?;
    let address = cluster.node(1)?.address.clone();
    wait_until("the 1s token to expire", Duration::from_secs(10), || async {
        Ok(matches!(cli(&address, &brief, &["apps", "list"]).await, Err(CliError::Auth(m)) if m.contains("expired")))
    })
    .await?;

    // Mistakes get clear errors and change nothing.
    let wrong: &[(&[&str], &str)] = &[
        (&["tokens", "create", "--scope", "write"], "admin, read or deploy:APP"),
        (&["tokens", "create", "--scope", "deploy:Web"], "invalid app name"),
        (&["tokens", "create", "--scope", "read", "--expires", "soon"], "not a duration"),
        (&["tokens", "create", "--scope", "read", "--expires", "20y"], "at most 10 years"),
        (&["tokens", "create", "--scope", "read", "--name", "ro"], "already exists"),
        (&["tokens", "revoke", "nobody"], "no token 'nobody'"),
        (&["tokens", "revoke", "admin"], "rotate it"),
    ];
    for (args, expected) in wrong {
        let error = cluster.cli(0, args).await.expect_err("a mistake is refused");
        assert!(error.to_string().contains(expected), "{args:?}: {error}");
    }
    let count = |listed: &str| serde_json::from_str::<Vec<serde_json::Value>>(listed).map(|l| l.len());
    assert_eq!(count(&cluster.cli(0, &["tokens", "list", "--json"]).await?)?, 3, "admin, ro, brief and no more");

    // The initial admin token can be rotated: the old one is refused at once.
    let new_admin = {
        let printed = cluster.cli(0, &["tokens", "rotate", "admin", "--json"]).await?;
        let object: serde_json::Value = serde_json::from_str(&printed)?;
        object["token"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no token in {printed}"))?
    };
    assert!(new_admin.starts_with("ROOST-ADMIN-1-"), "{new_admin}");
    for node in 0..3 {
        assert!(refused_for_token(&cluster.cli(node, &["node", "list"]).await), "node {node}: old admin token");
        let address = cluster.node(node)?.address.clone();
        cli(&address, &new_admin, &["tokens", "list"]).await.map_err(|e| anyhow!("node {node}: new admin: {e}"))?;
    }
    cluster.shutdown().await;
    Ok(())
}

/// A cluster made before calls were signed recorded only its admin token's
/// digest: the CLI's signed calls find no such key until the node holding
/// `admin.token` records it, which it does on its own, and then they work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admin_token_from_before_signed_calls_gets_its_key_from_the_node_holding_it() -> Result<()> {
    let cluster = Cluster::start(1).await?;
    let admin = cluster.tokens.admin.clone();
    let keyed = |state: &roost_raft::State| state.cluster.as_ref().map(|c| c.admin_public_key.clone());
    assert_eq!(cluster.node(0)?.consensus.state().read(keyed), Some(admin.key().public_key()));

    // The state as an older version left it: the digest alone.
    let legacy = Command::RotateToken {
        token: "admin".into(),
        secret_sha256: roost_network::pki::secret_digest(&admin.secret),
        public_key: String::new(),
    };
    let tls = roost_tests::node_tls(cluster.slots[0].dir.path())?;
    let mut raft = roost_proto::cluster::raft_client::RaftClient::new(tls.connect(&cluster.node(0)?.address).await?);
    let forward =
        Forward { proposal: Proposal::new(legacy, 1), grant: Some(Grant::Token { token: admin.to_string() }) };
    raft.propose(roost_proto::cluster::RaftPayload { json: serde_json::to_vec(&forward)? }).await?;

    wait_until("the node holding admin.token to record its key", Duration::from_secs(10), || async {
        Ok(cluster.node(0)?.consensus.state().read(keyed) == Some(admin.key().public_key()))
    })
    .await?;
    cluster.cli(0, &["apps", "list"]).await.map_err(|e| anyhow!("a signed call after the key was recorded: {e}"))?;
    cluster.shutdown().await;
    Ok(())
}

/// A new or rotated token is drawn by the client: the node is sent its
/// digest and public key, answers no secret, and refuses to draw one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_never_sees_a_token_it_makes_or_rotates() -> Result<()> {
    use roost_proto::api::{CreateTokenRequest, RotateTokenRequest};
    let cluster = Cluster::start(1).await?;
    let mut client = cluster.client(0).await?;
    let drawn = roost_network::Token::generate(roost_network::TokenKind::Api, cluster.tokens.admin.ca_digest);
    let request = CreateTokenRequest {
        name: "drawn".into(),
        scope: "read".into(),
        expires_in_ms: None,
        secret_sha256: roost_network::pki::secret_digest(&drawn.secret),
        public_key: drawn.key().public_key(),
    };
    let target = format!("key:{}.{}", request.public_key, request.secret_sha256);
    let created = client.create_token(roost_node::cli::about(&target, request.clone())).await?.into_inner();
    assert!(created.secret.is_empty(), "the node answered a secret");
    // The client's own token works at once, signed.
    let mut own = roost_node::cli::connect_api(&cluster.node(0)?.address, &drawn).await?;
    own.list_apps(roost_proto::api::ListAppsRequest::default()).await?;

    let refused = client
        .create_token(CreateTokenRequest {
            name: "undrawn".into(),
            secret_sha256: String::new(),
            public_key: String::new(),
            ..request
        })
        .await
        .expect_err("a node asked to draw a token");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("update the roost CLI"), "{}", refused.message());
    let refused = client
        .rotate_token(RotateTokenRequest {
            token: "drawn".into(),
            secret_sha256: "xyz".into(),
            public_key: String::new(),
        })
        .await
        .expect_err("a malformed digest");
    assert!(refused.message().contains("64 lowercase hex"), "{}", refused.message());
    cluster.shutdown().await;
    Ok(())
}
