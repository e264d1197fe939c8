//! Unit tests of the pure state machine: values in, values out.

use super::*;
use crate::command::{Command, NewNode, Proposal, Rejection, Response};

fn cluster() -> ClusterInfo {
    ClusterInfo {
        id: "c1".into(),
        created_at: 1,
        ca_cert_pem: "cert".into(),
        ca_key_pem: "key".into(),
        join_secret: "s".into(),
        admin_secret_sha256: "h".into(),
    }
}

fn node(name: &str, fingerprint: &str) -> NewNode {
    NewNode {
        name: name.into(),
        address: format!("{name}:7000"),
        labels: Default::default(),
        cert_serial: format!("serial-{fingerprint}"),
        cert_fingerprint: fingerprint.into(),
    }
}

fn apply(state: &mut State, command: Command) -> Response {
    state.apply(&Proposal::new(command, 1000))
}

fn bootstrapped() -> State {
    let mut state = State::default();
    let r = apply(&mut state, Command::Bootstrap { cluster: cluster(), node: node("n1", "f1") });
    assert_eq!(r, Response::NodeAdded { id: FIRST_NODE_ID });
    state
}

#[test]
fn bootstrap_is_idempotent_for_the_same_cluster_only() {
    let mut state = bootstrapped();
    let again = apply(&mut state, Command::Bootstrap { cluster: cluster(), node: node("n1", "f1") });
    assert_eq!(again, Response::NodeAdded { id: FIRST_NODE_ID });
    let mut other = cluster();
    other.id = "c2".into();
    let r = apply(&mut state, Command::Bootstrap { cluster: other, node: node("n1", "f1") });
    assert_eq!(r, Response::Rejected(Rejection::AlreadyBootstrapped));
    assert_eq!(state.nodes.len(), 1);
}

#[test]
fn nodes_get_increasing_ids_and_unique_names() {
    let mut state = bootstrapped();
    assert_eq!(apply(&mut state, Command::AddNode { node: node("n2", "f2") }), Response::NodeAdded { id: 2 });
    assert_eq!(apply(&mut state, Command::AddNode { node: node("n3", "f3") }), Response::NodeAdded { id: 3 });
    assert_eq!(
        apply(&mut state, Command::AddNode { node: node("n2", "other") }),
        Response::Rejected(Rejection::NodeNameTaken { name: "n2".into() })
    );
    // The same node retrying its join gets its id back instead of an error.
    assert_eq!(apply(&mut state, Command::AddNode { node: node("n2", "f2") }), Response::NodeAdded { id: 2 });
    assert_eq!(state.nodes.len(), 3);
}

#[test]
fn add_node_before_bootstrap_is_refused() {
    let mut state = State::default();
    assert_eq!(
        apply(&mut state, Command::AddNode { node: node("n2", "f2") }),
        Response::Rejected(Rejection::NotBootstrapped)
    );
}

#[test]
fn removed_nodes_are_revoked_and_their_ids_never_reused() {
    let mut state = bootstrapped();
    apply(&mut state, Command::AddNode { node: node("n2", "f2") });
    assert_eq!(apply(&mut state, Command::RemoveNode { id: 2, new_join_secret: None }), Response::Done);
    assert!(state.is_revoked("f2"));
    assert!(state.removed_nodes.contains_key(&2));
    assert_eq!(
        apply(&mut state, Command::AddNode { node: node("n2", "f2") }),
        Response::Rejected(Rejection::RevokedCertificate)
    );
    // The name is free again for a new certificate, under a new id.
    assert_eq!(apply(&mut state, Command::AddNode { node: node("n2", "f2b") }), Response::NodeAdded { id: 3 });
}

#[test]
fn the_last_node_cannot_be_removed() {
    let mut state = bootstrapped();
    assert_eq!(
        apply(&mut state, Command::RemoveNode { id: FIRST_NODE_ID, new_join_secret: None }),
        Response::Rejected(Rejection::LastNode { name: "n1".into() })
    );
    assert_eq!(
        apply(&mut state, Command::RemoveNode { id: 9, new_join_secret: None }),
        Response::Rejected(Rejection::NodeNotFound { node: "9".into() })
    );
}

#[test]
fn apps_are_created_once_and_destroyed_once() {
    let mut state = bootstrapped();
    let created = apply(&mut state, Command::CreateApp { name: "web".into() });
    assert_eq!(created, Response::AppCreated { app: App { name: "web".into(), created_at: 1000 } });
    assert_eq!(state.apps["web"].created_at, 1000);
    assert_eq!(
        apply(&mut state, Command::CreateApp { name: "web".into() }),
        Response::Rejected(Rejection::AppExists { name: "web".into() })
    );
    assert_eq!(apply(&mut state, Command::DestroyApp { name: "web".into() }), Response::Done);
    assert_eq!(
        apply(&mut state, Command::DestroyApp { name: "web".into() }),
        Response::Rejected(Rejection::AppNotFound { name: "web".into() })
    );
}

#[test]
fn invalid_names_change_nothing() {
    let mut state = bootstrapped();
    let before = state.clone();
    for bad in ["", "Web", "1web", "web-", "we_b", "web.app", &"a".repeat(64)] {
        let r = apply(&mut state, Command::CreateApp { name: bad.into() });
        assert!(matches!(r, Response::Rejected(Rejection::InvalidAppName { .. })), "{bad:?} gave {r:?}");
    }
    assert_eq!(state, before);
}

#[test]
fn name_validation_explains_the_rule() {
    assert!(validate_name("a").is_ok());
    assert!(validate_name("my-app-2").is_ok());
    assert!(validate_name(&"a".repeat(63)).is_ok());
    let err = validate_name("My_App").expect_err("uppercase");
    assert!(err.contains("lowercase"), "{err}");
    assert!(err.contains(NAME_RULE), "{err}");
}

#[test]
fn a_newer_format_is_refused_not_misread() {
    let mut state = bootstrapped();
    let mut p = Proposal::new(Command::CreateApp { name: "web".into() }, 5);
    p.version = 99;
    assert_eq!(state.apply(&p), Response::Rejected(Rejection::UnsupportedVersion { version: 99 }));
    assert!(state.apps.is_empty());
}

/// Pins the version-1 encoding: if this fails, a new binary could no longer
/// read logs written by an old one. Add a new variant or bump the version
/// instead of changing what an existing one means.
#[test]
fn version_1_encoding_is_stable() {
    let json = r#"{"version":1,"proposed_at":42,"command":{"type":"create_app","name":"web"}}"#;
    let p: Proposal = serde_json::from_str(json).expect("decodes");
    assert_eq!(p, Proposal { version: 1, proposed_at: 42, command: Command::CreateApp { name: "web".into() } });
    assert_eq!(serde_json::to_string(&p).expect("encodes"), json);
}

#[test]
fn apply_is_deterministic() {
    let commands = [
        Command::AddNode { node: node("n2", "f2") },
        Command::CreateApp { name: "a".into() },
        Command::RemoveNode { id: 2, new_join_secret: None },
        Command::CreateApp { name: "b".into() },
    ];
    let run = || {
        let mut s = bootstrapped();
        let responses: Vec<_> = commands.iter().map(|c| apply(&mut s, c.clone())).collect();
        (s, responses)
    };
    assert_eq!(run(), run());
}

#[test]
fn a_batch_applies_each_proposal_in_order_and_answers_each() {
    let mut state = bootstrapped();
    let batch = Command::Batch {
        proposals: vec![
            Proposal::new(Command::CreateApp { name: "a".into() }, 7),
            Proposal::new(Command::CreateApp { name: "a".into() }, 8),
            Proposal::new(Command::DestroyApp { name: "a".into() }, 9),
        ],
    };
    let Response::Batch { responses } = apply(&mut state, batch) else { panic!("a batch answers a batch") };
    assert_eq!(
        responses,
        [
            Response::AppCreated { app: App { name: "a".into(), created_at: 7 } },
            Response::Rejected(Rejection::AppExists { name: "a".into() }),
            Response::Done,
        ]
    );
    assert!(state.apps.is_empty());
}

#[test]
fn removing_a_node_can_rotate_the_join_secret() {
    let mut state = bootstrapped();
    apply(&mut state, Command::AddNode { node: node("n2", "f2") });
    let secret = crate::command::Secret("new".into());
    assert_eq!(apply(&mut state, Command::RemoveNode { id: 2, new_join_secret: Some(secret) }), Response::Done);
    assert_eq!(state.cluster.as_ref().map(|c| c.join_secret.as_str()), Some("new"));
    // A refused removal changes nothing, the secret included.
    let again = Command::RemoveNode { id: 2, new_join_secret: Some(crate::command::Secret("newer".into())) };
    assert!(matches!(apply(&mut state, again), Response::Rejected(_)));
    assert_eq!(state.cluster.as_ref().map(|c| c.join_secret.as_str()), Some("new"));
}
