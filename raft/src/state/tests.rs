//! Unit tests of the pure state machine: values in, values out.

use super::*;
use crate::command::{Command, NewNode, Proposal, Rejection, Response};

fn cluster() -> ClusterInfo {
    ClusterInfo {
        id: "c1".into(),
        created_at: 1,
        ca_cert_pem: "cert".into(),
        ca_key: None,
        voter_join: None,
        worker_join: None,
        ca_key_pem: "key".into(),
        join_secret: "s".into(),
        worker_join_secret: "w".into(),
        admin_secret_sha256: "h".into(),
        admin_public_key: String::new(),
        join_rotation_due: false,
        mesh_range: default_mesh_range(),
        domain: "localhost".into(),
        acme: None,
        ca_rotation: None,
        previous_ca_cert_pem: None,
    }
}

fn node(name: &str, fingerprint: &str) -> NewNode {
    NewNode {
        name: name.into(),
        address: format!("{name}:7000"),
        labels: Default::default(),
        cert_serial: format!("serial-{fingerprint}"),
        cert_fingerprint: fingerprint.into(),
        resources: crate::workload::Resources { cpu_millis: 8000, memory_bytes: 16 << 30 },
        wireguard: None,
        role: Default::default(),
    }
}

fn apply(state: &mut State, command: Command) -> Response {
    state.apply(&Proposal::new(command, 1000))
}

fn bootstrapped() -> State {
    let mut state = State::default();
    let r = apply(&mut state, Command::Bootstrap { cluster: Box::new(cluster()), node: node("n1", "f1") });
    assert_eq!(r, Response::NodeAdded { id: FIRST_NODE_ID });
    state
}

#[test]
fn bootstrap_is_idempotent_for_the_same_cluster_only() {
    let mut state = bootstrapped();
    let again = apply(&mut state, Command::Bootstrap { cluster: Box::new(cluster()), node: node("n1", "f1") });
    assert_eq!(again, Response::NodeAdded { id: FIRST_NODE_ID });
    let mut other = cluster();
    other.id = "c2".into();
    let r = apply(&mut state, Command::Bootstrap { cluster: Box::new(other), node: node("n1", "f1") });
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
    assert_eq!(
        apply(&mut state, Command::RemoveNode { id: 2, new_join_secret: None, new_worker_secret: None, rotate: None }),
        Response::Done
    );
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
fn a_ca_rotation_finishes_once_every_node_has_a_certificate_from_the_new_ca() {
    let mut state = bootstrapped();
    apply(&mut state, Command::AddNode { node: node("n2", "f2") });
    apply(&mut state, Command::AddNode { node: node("n3", "f3") });
    let sealed = crate::workload::SealedSecret { sealed: "k".into(), digest: "d".into(), updated_at: 0 };
    let start = |pem: &str| Command::StartCaRotation { ca_cert_pem: pem.into(), ca_key: sealed.clone() };
    let renew = |node: NodeId, fp: &str| Command::RenewNodeCertificate {
        node,
        fingerprint: fp.into(),
        cert_pem: String::new(),
    };
    let finish = |pem: &str| Command::FinishCaRotation { ca_cert_pem: pem.into() };

    assert_eq!(apply(&mut state, renew(2, "g2")), Response::Rejected(Rejection::NoCaRotation));
    assert_eq!(apply(&mut state, start("cert")), Response::Rejected(Rejection::CaNotNew));
    assert_eq!(apply(&mut state, start("cert2")), Response::Done);
    assert_eq!(apply(&mut state, start("cert3")), Response::Rejected(Rejection::CaRotationInProgress));
    assert_eq!(state.trusted_cas(), ["cert", "cert2"]);
    assert_eq!(
        apply(&mut state, Command::AddNode { node: node("n4", "f4") }),
        Response::Rejected(Rejection::CaRotationInProgress),
        "no join during a rotation"
    );

    assert_eq!(apply(&mut state, renew(2, "g2")), Response::Done);
    assert_eq!(state.node_by_fingerprint("g2").map(|n| n.id), Some(2), "known by its new certificate");
    assert_eq!(state.node_by_fingerprint("f2").map(|n| n.id), Some(2), "and its old one");
    assert_eq!(apply(&mut state, renew(3, "g2")), Response::Rejected(Rejection::CertificateTaken));
    assert_eq!(apply(&mut state, renew(3, "f2")), Response::Rejected(Rejection::CertificateTaken));
    assert_eq!(apply(&mut state, renew(3, "g3")), Response::Done);
    assert_eq!(state.ca_rotation_pending(), ["n1"]);
    assert_eq!(
        apply(&mut state, finish("cert2")),
        Response::Rejected(Rejection::CaRotationIncomplete { pending: "n1".into() })
    );
    assert_eq!(apply(&mut state, renew(1, "g1")), Response::Done);
    assert_eq!(apply(&mut state, finish("cert3")), Response::Rejected(Rejection::NoCaRotation), "another CA");
    assert_eq!(apply(&mut state, finish("cert2")), Response::Done);

    let cluster = state.cluster.as_ref().expect("cluster");
    assert_eq!(cluster.ca_cert_pem, "cert2");
    assert_eq!(cluster.ca_key.as_ref(), Some(&sealed));
    assert!(cluster.ca_key_pem.is_empty(), "the old plain key is gone");
    assert!(cluster.ca_rotation.is_none());
    assert_eq!(state.trusted_cas(), ["cert2", "cert"]);
    let n2 = &state.nodes[&2];
    assert_eq!((n2.cert_fingerprint.as_str(), n2.former_cert_fingerprint.as_deref()), ("g2", Some("f2")));
    assert_eq!(state.node_by_fingerprint("f2").map(|n| n.id), Some(2), "open connections keep working");

    // A removed node's every certificate is revoked.
    apply(&mut state, Command::RemoveNode { id: 2, new_join_secret: None, new_worker_secret: None, rotate: None });
    assert!(state.is_revoked("g2") && state.is_revoked("f2"));
    assert_eq!(state.node_by_fingerprint("f2"), None);

    // A removal cancels a rotation under way: the removed node may hold the
    // new CA's key or a certificate from it.
    assert_eq!(apply(&mut state, start("cert4")), Response::Done);
    assert_eq!(apply(&mut state, renew(3, "h3")), Response::Done);
    apply(&mut state, Command::RemoveNode { id: 1, new_join_secret: None, new_worker_secret: None, rotate: None });
    assert!(state.cluster.as_ref().is_some_and(|c| c.ca_rotation.is_none()), "the rotation is cancelled");
    assert!(state.is_revoked("h3"), "and certificates from its CA revoked");
    assert_eq!(state.nodes[&3].next_cert_fingerprint, None);
    assert_eq!(state.trusted_cas(), ["cert2", "cert"]);
    assert_eq!(apply(&mut state, finish("cert4")), Response::Rejected(Rejection::NoCaRotation));
}

#[test]
fn an_admin_sets_and_removes_labels_and_a_bad_label_changes_nothing() {
    let mut state = bootstrapped();
    let label = |set: &[(&str, &str)], remove: &[&str]| Command::LabelNode {
        id: FIRST_NODE_ID,
        set: set.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        remove: remove.iter().map(|k| k.to_string()).collect(),
    };
    assert_eq!(apply(&mut state, label(&[("region", "eu"), ("disk", "ssd")], &[])), Response::Done);
    assert_eq!(apply(&mut state, label(&[("region", "us")], &["disk", "absent"])), Response::Done);
    let labels = |state: &State| state.nodes[&FIRST_NODE_ID].labels.clone();
    assert_eq!(labels(&state), BTreeMap::from([("region".to_owned(), "us".to_owned())]));

    // Each bad label is refused, and the others in the same command are not applied.
    for (key, value) in [("", "x"), ("has space", "x"), ("ok", "line\nbreak")] {
        let r = apply(&mut state, label(&[("fine", "yes"), (key, value)], &["region"]));
        assert!(matches!(r, Response::Rejected(Rejection::InvalidLabel { .. })), "{key:?}={value:?}: {r:?}");
        assert_eq!(labels(&state), BTreeMap::from([("region".to_owned(), "us".to_owned())]));
    }
    let r = apply(&mut state, label(&[("ok", &"v".repeat(256))], &[]));
    assert!(matches!(r, Response::Rejected(Rejection::InvalidLabel { .. })), "{r:?}");
    let many: Vec<(String, String)> = (0..MAX_LABELS).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        apply(&mut state, label(&many, &[])),
        Response::Rejected(Rejection::TooManyLabels { max: MAX_LABELS }),
        "64 more beside region"
    );
    assert_eq!(apply(&mut state, label(&many, &["region"])), Response::Done, "64 once region is removed");
    let r = apply(&mut state, Command::LabelNode { id: 9, set: BTreeMap::new(), remove: Vec::new() });
    assert_eq!(r, Response::Rejected(Rejection::NodeNotFound { node: "9".into() }));
}

#[test]
fn the_last_node_cannot_be_removed() {
    let mut state = bootstrapped();
    assert_eq!(
        apply(
            &mut state,
            Command::RemoveNode { id: FIRST_NODE_ID, new_join_secret: None, new_worker_secret: None, rotate: None }
        ),
        Response::Rejected(Rejection::LastNode { name: "n1".into() })
    );
    assert_eq!(
        apply(&mut state, Command::RemoveNode { id: 9, new_join_secret: None, new_worker_secret: None, rotate: None }),
        Response::Rejected(Rejection::NodeNotFound { node: "9".into() })
    );
}

#[test]
fn apps_are_created_once_and_destroyed_once() {
    let mut state = bootstrapped();
    let created = apply(&mut state, Command::CreateApp { name: "web".into() });
    assert_eq!(created, Response::AppCreated { app: App::new("web", 1000) });
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
        Command::RemoveNode { id: 2, new_join_secret: None, new_worker_secret: None, rotate: None },
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
            Response::AppCreated { app: App::new("a", 7) },
            Response::Rejected(Rejection::AppExists { name: "a".into() }),
            Response::Done,
        ]
    );
    assert!(state.apps.is_empty());
}

#[test]
fn removing_a_node_can_rotate_both_join_secrets() {
    let mut state = bootstrapped();
    let worker = NewNode { role: NodeRole::Worker, ..node("n2", "f2") };
    apply(&mut state, Command::AddNode { node: worker });
    assert_eq!(state.nodes[&2].role, NodeRole::Worker, "the role is recorded");
    let join = |digest: &str| JoinSecret {
        sha256: digest.into(),
        sealed: SealedSecret { sealed: format!("sealed-{digest}"), digest: String::new(), updated_at: 1 },
    };
    let rotate = |v: &str, w: &str| Some(RotatedJoinSecrets { voter: join(v), worker: join(w) });
    let remove =
        Command::RemoveNode { id: 2, new_join_secret: None, new_worker_secret: None, rotate: rotate("new", "new-w") };
    assert_eq!(apply(&mut state, remove), Response::Done);
    let secrets = |state: &State| {
        let c = state.cluster.as_ref().expect("bootstrapped");
        (c.voter_join.clone(), c.worker_join.clone(), c.join_secret.clone(), c.worker_join_secret.clone())
    };
    let rotated = (Some(join("new")), Some(join("new-w")), String::new(), String::new());
    assert_eq!(secrets(&state), rotated, "the plain secrets of an older cluster admit no one after a rotation");
    // A refused removal changes nothing, the secrets included.
    let again = Command::RemoveNode {
        id: 2,
        new_join_secret: None,
        new_worker_secret: None,
        rotate: rotate("newer", "newer-w"),
    };
    assert!(matches!(apply(&mut state, again), Response::Rejected(_)));
    assert_eq!(secrets(&state), rotated);
}

#[test]
fn a_removal_leaves_the_join_secrets_due_for_a_rotation_that_comes_in_its_own_entry() {
    let mut state = bootstrapped();
    apply(&mut state, Command::AddNode { node: node("n2", "f2") });
    let before = state.cluster.as_ref().map(|c| c.voter_join.clone());
    let remove = Command::RemoveNode { id: 2, new_join_secret: None, new_worker_secret: None, rotate: None };
    assert_eq!(apply(&mut state, remove), Response::Done);
    let cluster = state.cluster.as_ref().expect("bootstrapped");
    assert!(cluster.join_rotation_due, "the removed node still knows the join secrets");
    assert_eq!(Some(cluster.voter_join.clone()), before, "the removal itself carries no new secret");

    let join = |digest: &str| JoinSecret {
        sha256: digest.into(),
        sealed: SealedSecret { sealed: format!("sealed-{digest}"), digest: String::new(), updated_at: 1 },
    };
    let rotate = Command::RotateJoinSecrets { rotate: RotatedJoinSecrets { voter: join("v2"), worker: join("w2") } };
    assert!(rotate.is_leader_decision(), "only the leader writes it, once the node is out of Raft");
    assert_eq!(apply(&mut state, rotate), Response::Done);
    let cluster = state.cluster.as_ref().expect("bootstrapped");
    assert!(!cluster.join_rotation_due);
    assert_eq!((cluster.voter_join.clone(), cluster.worker_join.clone()), (Some(join("v2")), Some(join("w2"))));
}

#[test]
fn the_admin_token_is_keyed_only_while_it_has_that_digest_and_no_key() {
    let mut state = bootstrapped();
    let digest = state.cluster.as_ref().map(|c| c.admin_secret_sha256.clone()).unwrap_or_default();
    let key = |secret_sha256: &str, public_key: &str| Command::KeyAdminToken {
        secret_sha256: secret_sha256.into(),
        public_key: public_key.into(),
    };
    assert!(matches!(apply(&mut state, key("other", "k1")), Response::Rejected(_)), "another digest");
    assert_eq!(apply(&mut state, key(&digest, "k1")), Response::Done);
    assert_eq!(state.token_by_key("k1").map(|m| m.id), Some(INITIAL_ADMIN.to_owned()));
    assert!(matches!(apply(&mut state, key(&digest, "k2")), Response::Rejected(_)), "keyed already");
    // A rotation applied before a keying proposed earlier wins.
    let rotate =
        Command::RotateToken { token: INITIAL_ADMIN.into(), secret_sha256: "new".into(), public_key: "k3".into() };
    apply(&mut state, rotate);
    assert!(matches!(apply(&mut state, key(&digest, "k1")), Response::Rejected(_)));
    assert_eq!(state.token_by_key("k3").map(|m| m.id), Some(INITIAL_ADMIN.to_owned()));
}

#[test]
fn a_removal_logged_before_join_secrets_were_sealed_still_rotates_them() {
    let mut state = bootstrapped();
    apply(&mut state, Command::AddNode { node: node("n2", "f2") });
    let json = r#"{"type":"remove_node","id":2,"new_join_secret":"new","new_worker_secret":"new-w"}"#;
    let remove: Command = serde_json::from_str(json).expect("an older entry decodes");
    assert_eq!(apply(&mut state, remove), Response::Done);
    let cluster = state.cluster.as_ref().expect("bootstrapped");
    assert_eq!((cluster.join_secret.as_str(), cluster.worker_join_secret.as_str()), ("new", "new-w"));
}

mod workloads {
    use std::collections::BTreeMap;

    use super::*;
    use crate::workload::*;

    fn spec(groups: &[&str], image: &str) -> ReleaseSpec {
        let group = GroupSpec {
            command: Vec::new(),
            resources: Resources { cpu_millis: 100, memory_bytes: 1 << 20 },
            restart: RestartSpec::default(),
            internal_port: Some(8080),
            checks: Vec::new(),
            kill_timeout_seconds: crate::workload::DEFAULT_KILL_TIMEOUT_SECONDS,
        };
        ReleaseSpec {
            image: image.into(),
            image_ref: image.into(),
            image_source: FIRST_NODE_ID,
            env: BTreeMap::new(),
            groups: groups.iter().map(|g| (g.to_string(), group.clone())).collect(),
            strategy: Strategy::Rolling,
            max_unavailable: None,
            initial_count: None,
            release_history: None,
            placement: PlacementSpec::default(),
            http: None,
            services: Vec::new(),
        }
    }

    fn deploy(state: &mut State, image: &str) -> Response {
        apply(
            state,
            Command::Deploy { app: "web".into(), spec: spec(&["app", "worker"], image), description: "deploy".into() },
        )
    }

    fn finish(state: &mut State, version: u64) {
        let outcome = Outcome::Active;
        assert_eq!(apply(state, Command::FinishRelease { app: "web".into(), version, outcome }), Response::Done);
    }

    #[test]
    fn a_deploy_creates_the_app_a_release_and_one_instance_per_group() {
        let mut state = bootstrapped();
        assert_eq!(deploy(&mut state, "sha256:1"), Response::ReleaseCreated { version: 1 });
        let app = &state.apps["web"];
        assert_eq!(app.deploying().map(|r| r.version), Some(1));
        assert!(app.current().is_none());
        let groups: Vec<&str> = state.instances.values().map(|i| i.group.as_str()).collect();
        assert_eq!(groups.len(), 2);
        assert!(groups.contains(&"app") && groups.contains(&"worker"));
        assert!(state.instances.values().all(|i| i.node.is_none() && i.state == InstanceState::Pending));
    }

    #[test]
    fn a_second_deploy_while_one_runs_is_refused_and_changes_nothing() {
        let mut state = bootstrapped();
        deploy(&mut state, "sha256:1");
        let before = state.clone();
        assert_eq!(
            deploy(&mut state, "sha256:2"),
            Response::Rejected(Rejection::DeployInProgress { app: "web".into(), version: 1 })
        );
        assert_eq!(state, before);
    }

    #[test]
    fn rollback_makes_a_new_release_from_the_previous_one() {
        let mut state = bootstrapped();
        deploy(&mut state, "sha256:1");
        finish(&mut state, 1);
        deploy(&mut state, "sha256:2");
        finish(&mut state, 2);
        assert_eq!(
            apply(&mut state, Command::Rollback { app: "web".into(), version: None }),
            Response::ReleaseCreated { version: 3 }
        );
        let release = &state.apps["web"].releases[&3];
        assert_eq!(release.spec.image, "sha256:1");
        assert_eq!(release.description, "rollback to v1");
        let missing = apply(&mut state, Command::Rollback { app: "web".into(), version: Some(9) });
        assert!(matches!(missing, Response::Rejected(Rejection::DeployInProgress { .. })), "{missing:?}");
    }

    #[test]
    fn scale_adds_and_removes_instances_of_one_group() {
        let mut state = bootstrapped();
        deploy(&mut state, "sha256:1");
        finish(&mut state, 1);
        apply(&mut state, Command::Scale { app: "web".into(), group: "app".into(), count: 3 });
        assert_eq!(state.instances.values().filter(|i| i.group == "app").count(), 3);
        apply(&mut state, Command::Scale { app: "web".into(), group: "app".into(), count: 0 });
        assert_eq!(state.instances.values().filter(|i| i.group == "app").count(), 0);
        assert_eq!(state.instances.values().filter(|i| i.group == "worker").count(), 1);
        let unknown = apply(&mut state, Command::Scale { app: "web".into(), group: "db".into(), count: 1 });
        assert!(matches!(unknown, Response::Rejected(Rejection::UnknownGroup { .. })), "{unknown:?}");
        let before = state.clone();
        let huge = apply(&mut state, Command::Scale { app: "web".into(), group: "app".into(), count: 4_000_000_000 });
        assert!(matches!(huge, Response::Rejected(Rejection::TooManyInstances { .. })), "{huge:?}");
        assert_eq!(state, before);
    }

    #[test]
    fn initial_count_sizes_only_groups_new_to_the_app() {
        let mut state = bootstrapped();
        let with_count = |image: &str, groups: &[&str], count: u32| Command::Deploy {
            app: "web".into(),
            spec: ReleaseSpec { initial_count: Some(count), ..spec(groups, image) },
            description: "deploy".into(),
        };
        let count = |state: &State, group: &str| state.instances.values().filter(|i| i.group == group).count();
        let before = state.clone();
        let refused = apply(&mut state, with_count("sha256:1", &["app"], 0));
        assert!(matches!(refused, Response::Rejected(Rejection::InvalidRelease { .. })), "{refused:?}");
        assert_eq!(state, before, "a refused first deploy creates no app");
        assert_eq!(apply(&mut state, with_count("sha256:1", &["app"], 3)), Response::ReleaseCreated { version: 1 });
        assert_eq!(count(&state, "app"), 3, "a first deploy starts initial_count instances at once");
        finish(&mut state, 1);
        apply(&mut state, Command::Scale { app: "web".into(), group: "app".into(), count: 2 });
        // A later deploy keeps the scaled count; a group new to the app starts at initial_count.
        assert_eq!(
            apply(&mut state, with_count("sha256:2", &["app", "worker"], 5)),
            Response::ReleaseCreated { version: 2 }
        );
        let release_2 = |group: &str| state.instances.values().filter(|i| i.group == group && i.release == 2).count();
        assert_eq!((release_2("app"), release_2("worker")), (2, 5));
        finish(&mut state, 2);

        for bad in [0, MAX_INSTANCES_PER_GROUP + 1] {
            let before = state.clone();
            let refused = apply(&mut state, with_count("sha256:3", &["app", "db"], bad));
            assert!(
                matches!(
                    refused,
                    Response::Rejected(Rejection::InvalidRelease { .. } | Rejection::TooManyInstances { .. })
                ),
                "initial_count {bad}: {refused:?}"
            );
            assert_eq!(state, before, "a refused deploy changes nothing");
        }
    }

    #[test]
    fn reports_from_a_node_the_instance_is_not_on_are_ignored() {
        let mut state = bootstrapped();
        apply(&mut state, Command::AddNode { node: node("n2", "f2") });
        deploy(&mut state, "sha256:1");
        let id = state.instances.keys().next().cloned().expect("instance");
        apply(&mut state, Command::Place { placements: vec![Placement::Place { instance: id.clone(), node: 1 }] });
        let report = InstanceReport {
            id: id.clone(),
            state: InstanceState::Running,
            health: Health::Passing,
            address: Some("10.0.0.1:8080".into()),
            ip: None,
            reason: None,
            restarts: 0,
            generation: None,
        };
        apply(&mut state, Command::ReportInstances { node: 2, reports: vec![report.clone()] });
        assert_eq!(state.instances[&id].state, InstanceState::Pending);
        apply(&mut state, Command::ReportInstances { node: 1, reports: vec![report] });
        assert_eq!(state.instances[&id].state, InstanceState::Running);
    }

    /// Scales `app` to `count`, places every instance on node 1 and reports
    /// them running, as of `generation`.
    fn running(state: &mut State, count: u32) -> Vec<String> {
        apply(state, Command::Scale { app: "web".into(), group: "app".into(), count });
        apply(state, Command::Scale { app: "web".into(), group: "worker".into(), count: 0 });
        let ids: Vec<String> = state.instances.keys().cloned().collect();
        let placements = ids.iter().map(|id| Placement::Place { instance: id.clone(), node: 1 }).collect();
        apply(state, Command::Place { placements });
        for id in &ids {
            report(state, id, InstanceState::Running, None);
        }
        ids
    }

    fn report(state: &mut State, id: &str, run: InstanceState, generation: Option<u32>) {
        let report = InstanceReport {
            id: id.into(),
            state: run,
            health: Health::Unknown,
            address: None,
            ip: None,
            reason: None,
            restarts: 0,
            generation,
        };
        apply(state, Command::ReportInstances { node: 1, reports: vec![report] });
    }

    #[test]
    fn restart_moves_instances_to_a_new_generation_a_wave_at_a_time() {
        let mut state = bootstrapped();
        deploy(&mut state, "sha256:1");
        finish(&mut state, 1);
        let ids = running(&mut state, 6);
        assert_eq!(apply(&mut state, Command::Restart { app: "web".into() }), Response::Done);
        assert!(state.instances.values().all(|i| i.generation == 0), "restart itself recreates nothing");

        // The default max_unavailable is a third: two of six at a time.
        let (generation, wave) = state.restart_wave("web").expect("a first wave");
        assert_eq!((generation, wave.len()), (1, 2));
        // A stale or greedy decision is cut to what the wave allows.
        let command = Command::RestartInstances { app: "web".into(), generation, instances: ids.clone() };
        apply(&mut state, command);
        let moved: Vec<&String> = ids.iter().filter(|id| state.instances[*id].generation == 1).collect();
        assert_eq!(moved, wave.iter().collect::<Vec<_>>());
        assert!(moved.iter().all(|id| state.instances[*id].state == InstanceState::Starting));
        assert_eq!(state.restart_wave("web"), None, "the next wave waits until this one is ready");

        // A report about the old container does not make the new one ready.
        report(&mut state, &wave[0], InstanceState::Running, Some(0));
        assert_eq!(state.instances[&wave[0]].state, InstanceState::Starting, "a stale report is ignored");
        for id in &wave {
            report(&mut state, id, InstanceState::Running, Some(1));
        }
        let (_, second) = state.restart_wave("web").expect("the second wave");
        assert_eq!(second.len(), 2);
        assert!(second.iter().all(|id| !wave.contains(id)));

        // Waves until every instance is on generation 1; then it is over.
        let mut waves = 1;
        while let Some((generation, wave)) = state.restart_wave("web") {
            waves += 1;
            apply(&mut state, Command::RestartInstances { app: "web".into(), generation, instances: wave.clone() });
            for id in &wave {
                report(&mut state, id, InstanceState::Running, Some(1));
            }
        }
        assert_eq!(waves, 3);
        assert!(state.instances.values().all(|i| i.generation == 1));
        assert_eq!(state.apps["web"].restart, None);
    }

    #[test]
    fn a_restart_of_an_app_with_nothing_placed_does_nothing_and_a_deploy_ends_one() {
        let mut state = bootstrapped();
        deploy(&mut state, "sha256:1");
        finish(&mut state, 1);
        apply(&mut state, Command::Restart { app: "web".into() });
        assert_eq!(state.apps["web"].restart, None, "no instance was placed");
        running(&mut state, 3);
        apply(&mut state, Command::Restart { app: "web".into() });
        assert!(state.apps["web"].restart.is_some());
        deploy(&mut state, "sha256:2");
        assert_eq!(state.apps["web"].restart, None);
    }

    #[test]
    fn destroy_removes_the_apps_instances_and_secrets() {
        let mut state = bootstrapped();
        deploy(&mut state, "sha256:1");
        apply(&mut state, Command::DestroyApp { name: "web".into() });
        assert!(state.instances.is_empty());
        assert!(!state.apps.contains_key("web"));
    }

    #[test]
    fn secrets_make_a_release_unless_staged_and_unset_checks_names() {
        let mut state = bootstrapped();
        deploy(&mut state, "sha256:1");
        finish(&mut state, 1);
        let sealed = SealedSecret { sealed: "00".into(), digest: "d".into(), updated_at: 1 };
        let set = BTreeMap::from([("KEY".to_owned(), sealed)]);
        let staged = Command::SetSecrets { app: "web".into(), set: set.clone(), unset: vec![], stage: true };
        assert_eq!(apply(&mut state, staged), Response::Done);
        assert_eq!(state.apps["web"].secrets_version, 1);
        let unknown =
            Command::SetSecrets { app: "web".into(), set: BTreeMap::new(), unset: vec!["NOPE".into()], stage: false };
        let before = state.clone();
        assert!(matches!(apply(&mut state, unknown), Response::Rejected(Rejection::SecretNotFound { .. })));
        assert_eq!(state, before);
        let released = Command::SetSecrets { app: "web".into(), set, unset: vec![], stage: false };
        assert!(state.apps["web"].releases[&1].secrets.is_empty(), "staged values do not reach v1");
        assert_eq!(apply(&mut state, released), Response::ReleaseCreated { version: 2 });
        assert_eq!(state.apps["web"].releases[&2].secrets_version, 2);
        assert!(state.apps["web"].releases[&2].secrets.contains_key("KEY"));
    }

    #[test]
    fn secrets_have_caps_on_size_and_count_and_a_refusal_changes_nothing() {
        let mut state = bootstrapped();
        deploy(&mut state, "sha256:1");
        finish(&mut state, 1);
        let sealed =
            |bytes: usize| SealedSecret { sealed: "0".repeat(2 * (bytes + 28)), digest: "d".into(), updated_at: 1 };
        let set = |secrets: Vec<(String, SealedSecret)>| Command::SetSecrets {
            app: "web".into(),
            set: secrets.into_iter().collect(),
            unset: vec![],
            stage: true,
        };
        let before = state.clone();
        let huge = apply(&mut state, set(vec![("BIG".into(), sealed(MAX_SECRET_BYTES + 1))]));
        assert!(matches!(huge, Response::Rejected(Rejection::SecretTooLarge { .. })), "{huge:?}");
        let many = (0..=MAX_SECRETS_PER_APP).map(|i| (format!("K{i}"), sealed(1))).collect();
        let many = apply(&mut state, set(many));
        assert!(matches!(many, Response::Rejected(Rejection::TooManySecrets { .. })), "{many:?}");
        let heavy = (0..9).map(|i| (format!("K{i}"), sealed(MAX_SECRET_BYTES))).collect();
        let heavy = apply(&mut state, set(heavy));
        assert!(matches!(heavy, Response::Rejected(Rejection::AppSecretsTooLarge { .. })), "{heavy:?}");
        assert_eq!(state, before);
        let most = (0..MAX_SECRETS_PER_APP).map(|i| (format!("K{i}"), sealed(16))).collect();
        assert_eq!(apply(&mut state, set(most)), Response::Done, "the cap itself is allowed");
    }

    #[test]
    fn releases_beyond_the_history_are_pruned_but_never_the_serving_or_rollback_one() {
        let mut state = bootstrapped();
        deploy(&mut state, "sha256:1");
        finish(&mut state, 1);
        for version in 2..=25u64 {
            assert_eq!(deploy(&mut state, &format!("sha256:{version}")), Response::ReleaseCreated { version });
            // v5 fails: the serving release stays v4 while later ones come.
            if version != 5 {
                finish(&mut state, version);
            } else {
                let outcome = Outcome::Failed { reason: "bad".into() };
                apply(&mut state, Command::FinishRelease { app: "web".into(), version, outcome });
            }
        }
        let app = &state.apps["web"];
        let kept: Vec<u64> = app.releases.keys().copied().collect();
        assert_eq!(kept, (16..=25).collect::<Vec<_>>(), "the newest {RELEASE_HISTORY}");
        // A release that is not the newest but serves, and the one before it,
        // survive pruning.
        let mut state = bootstrapped();
        deploy(&mut state, "sha256:1");
        finish(&mut state, 1);
        deploy(&mut state, "sha256:2");
        finish(&mut state, 2);
        for version in 3..=20u64 {
            deploy(&mut state, &format!("sha256:{version}"));
            let outcome = Outcome::Failed { reason: "bad".into() };
            apply(&mut state, Command::FinishRelease { app: "web".into(), version, outcome });
        }
        let app = &state.apps["web"];
        assert_eq!(app.current().map(|r| r.version), Some(2));
        assert!(app.releases.contains_key(&1), "the rollback target is kept");
        assert_eq!(app.releases.len(), RELEASE_HISTORY + 2);
        assert_eq!(
            apply(&mut state, Command::Rollback { app: "web".into(), version: None }),
            Response::ReleaseCreated { version: 21 }
        );
    }

    #[test]
    fn an_app_keeps_as_many_releases_as_its_newest_release_asks() {
        let mut state = bootstrapped();
        let deploy_keeping = |state: &mut State, version: u64, history: Option<u32>| {
            let spec = ReleaseSpec { release_history: history, ..spec(&["app"], &format!("sha256:{version}")) };
            let deployed = apply(state, Command::Deploy { app: "web".into(), spec, description: "deploy".into() });
            assert_eq!(deployed, Response::ReleaseCreated { version });
            finish(state, version);
        };
        for version in 1..=12 {
            deploy_keeping(&mut state, version, Some(3));
        }
        let kept: Vec<u64> = state.apps["web"].releases.keys().copied().collect();
        assert_eq!(kept, [10, 11, 12], "release_history = 3");
        // More history from now on: nothing pruned comes back, newer stays.
        for version in 13..=20 {
            deploy_keeping(&mut state, version, Some(50));
        }
        assert_eq!(state.apps["web"].releases.len(), 11, "v10 to v20");
        // A rollback to a release that kept 3 keeps today's history.
        let back = apply(&mut state, Command::Rollback { app: "web".into(), version: Some(12) });
        assert_eq!(back, Response::ReleaseCreated { version: 21 });
        assert_eq!(state.apps["web"].releases.len(), 12, "v10 to v21: nothing pruned by the rollback");
        finish(&mut state, 21);
        // Out of bounds in a request that skipped the CLI's check: clamped.
        deploy_keeping(&mut state, 22, Some(0));
        let kept: Vec<u64> = state.apps["web"].releases.keys().copied().collect();
        assert_eq!(kept, [20, 21, 22], "the deploying release, the serving one and its rollback target");
    }

    #[test]
    fn an_instance_reason_is_kept_to_a_bounded_length() {
        let mut state = bootstrapped();
        deploy(&mut state, "sha256:1");
        let id = state.instances.keys().next().cloned().expect("instance");
        apply(&mut state, Command::Place { placements: vec![Placement::Place { instance: id.clone(), node: 1 }] });
        let report = InstanceReport {
            id: id.clone(),
            state: InstanceState::Running,
            health: Health::Failing,
            address: None,
            ip: None,
            reason: Some("é".repeat(10_000)),
            restarts: 0,
            generation: None,
        };
        apply(&mut state, Command::ReportInstances { node: 1, reports: vec![report] });
        let reason = state.instances[&id].reason.clone().expect("a reason");
        assert!(reason.len() <= MAX_REASON_BYTES && reason.ends_with("..."), "{}", reason.len());
    }
}

#[test]
fn every_node_holds_its_own_subnet_and_a_freed_one_is_reused() {
    let mut state = bootstrapped();
    for (name, fp) in [("n2", "f2"), ("n3", "f3")] {
        assert!(matches!(apply(&mut state, Command::AddNode { node: node(name, fp) }), Response::NodeAdded { .. }));
    }
    let subnet = |s: &State, id: NodeId| s.nodes[&id].subnet.map(|n| n.to_string());
    assert_eq!(subnet(&state, 1).as_deref(), Some("10.210.0.0/24"));
    assert_eq!(subnet(&state, 2).as_deref(), Some("10.210.1.0/24"));
    assert_eq!(subnet(&state, 3).as_deref(), Some("10.210.2.0/24"));
    apply(&mut state, Command::RemoveNode { id: 2, new_join_secret: None, new_worker_secret: None, rotate: None });
    apply(&mut state, Command::AddNode { node: node("n4", "f4") });
    assert_eq!(subnet(&state, 4).as_deref(), Some("10.210.1.0/24"), "n2's subnet is free once n2 is gone");
    let held: Vec<_> = state.nodes.values().filter_map(|n| n.subnet).collect();
    let mut unique = held.clone();
    unique.dedup();
    assert_eq!(held.len(), unique.len(), "no two nodes share a subnet");
}

#[test]
fn a_full_mesh_range_refuses_another_node_and_changes_nothing() {
    let mut state = State::default();
    let mut small = cluster();
    small.mesh_range = "10.9.8.0/24".parse().expect("range");
    apply(&mut state, Command::Bootstrap { cluster: Box::new(small), node: node("n1", "f1") });
    let before = state.clone();
    let refused = apply(&mut state, Command::AddNode { node: node("n2", "f2") });
    assert_eq!(refused, Response::Rejected(Rejection::MeshFull { range: "10.9.8.0/24".into() }));
    assert_eq!(state, before);
}

#[test]
fn a_public_or_misaligned_mesh_range_is_refused() {
    assert!(validate_mesh_range("10.210.0.0/16".parse().expect("net")).is_ok());
    assert!(validate_mesh_range("100.64.0.0/16".parse().expect("net")).is_ok());
    for bad in ["8.8.0.0/16", "10.210.0.0/25", "10.210.1.0/16", "10.0.0.0/7"] {
        assert!(validate_mesh_range(bad.parse().expect("net")).is_err(), "{bad}");
    }
    let mut state = State::default();
    let mut public = cluster();
    public.mesh_range = "8.8.0.0/16".parse().expect("net");
    let refused = apply(&mut state, Command::Bootstrap { cluster: Box::new(public), node: node("n1", "f1") });
    assert!(matches!(refused, Response::Rejected(Rejection::InvalidMeshRange { .. })), "{refused:?}");
    assert_eq!(state, State::default());
}

#[test]
fn a_node_that_moves_updates_its_address_and_wireguard_endpoint() {
    let mut state = bootstrapped();
    apply(&mut state, Command::AddNode { node: node("n2", "f2") });
    let wireguard = WireguardPeer { public_key: "k2".into(), endpoint: "10.0.0.9:51820".into() };
    let update = Command::UpdateNode { id: 2, address: "10.0.0.9:7000".into(), wireguard: Some(wireguard.clone()) };
    assert_eq!(apply(&mut state, update), Response::Done);
    assert_eq!(state.nodes[&2].address, "10.0.0.9:7000");
    assert_eq!(state.nodes[&2].wireguard, Some(wireguard));
    assert_eq!(state.nodes[&2].subnet.map(|n| n.to_string()).as_deref(), Some("10.210.1.0/24"), "kept");
    let unknown = Command::UpdateNode { id: 9, address: "x:1".into(), wireguard: None };
    assert!(matches!(apply(&mut state, unknown), Response::Rejected(Rejection::NodeNotFound { .. })));
}

#[test]
fn a_node_of_a_cluster_made_before_the_mesh_gets_a_subnet_when_it_describes_itself() {
    let mut state = bootstrapped();
    if let Some(n1) = state.nodes.get_mut(&1) {
        n1.subnet = None;
    }
    apply(&mut state, Command::UpdateNode { id: 1, address: "n1:7000".into(), wireguard: None });
    assert_eq!(state.nodes[&1].subnet.map(|n| n.to_string()).as_deref(), Some("10.210.0.0/24"));
}

#[test]
fn a_log_written_before_the_mesh_still_reads() {
    let json = r#"{"version":1,"proposed_at":5,"command":{"type":"bootstrap","cluster":{"id":"c","created_at":1,"ca_cert_pem":"","ca_key_pem":"","join_secret":"","admin_secret_sha256":""},"node":{"name":"n1","address":"a:1","labels":{},"cert_serial":"s","cert_fingerprint":"f"}}}"#;
    let proposal: Proposal = serde_json::from_str(json).expect("decodes");
    let mut state = State::default();
    state.apply(&proposal);
    let cluster = state.cluster.as_ref().expect("bootstrapped");
    assert_eq!(cluster.mesh_range, default_mesh_range());
    assert_eq!(state.nodes[&1].wireguard, None);
    assert!(state.nodes[&1].subnet.is_some());
}

#[test]
fn a_public_tcp_port_belongs_to_one_app_and_a_refused_deploy_creates_nothing() {
    use crate::workload::TcpServiceSpec;
    let mut state = bootstrapped();
    let mut spec = crate::testkit::spec(&["db"], crate::testkit::small(), false);
    spec.services = vec![TcpServiceSpec { internal_port: 5432, ports: vec![15432], groups: vec!["db".into()] }];
    let first = Command::Deploy { app: "pg".into(), spec: spec.clone(), description: "d".into() };
    assert!(matches!(apply(&mut state, first), Response::ReleaseCreated { .. }));
    let before = state.clone();
    let second = Command::Deploy { app: "other".into(), spec: spec.clone(), description: "d".into() };
    assert_eq!(apply(&mut state, second), Response::Rejected(Rejection::PortTaken { port: 15432, app: "pg".into() }));
    assert_eq!(state, before, "the refused deploy created no app");
    let again = Command::Deploy { app: "pg".into(), spec, description: "d".into() };
    assert!(
        matches!(apply(&mut state, again), Response::Rejected(Rejection::DeployInProgress { .. })),
        "its own port is not taken"
    );
}

mod placement {
    use crate::command::{Command, Response};
    use crate::testkit::{apply, cluster, spec};
    use crate::workload::{Placement, PlacementSpec, Resources};

    const GIB: u64 = 1 << 30;

    /// A cluster of two nodes (2 CPUs and 1 GiB each; n2 labelled
    /// `zone=b`) and an app `web` with `count` pending instances of `need`.
    fn pending(count: u32, need: Resources, placement: PlacementSpec) -> (crate::State, Vec<String>) {
        let mut state = cluster(2, |i| if i == 2 { vec![("zone", "b")] } else { vec![] });
        let spec = crate::workload::ReleaseSpec { placement, ..spec(&["app"], need, false) };
        apply(&mut state, Command::Deploy { app: "web".into(), spec, description: "deploy".into() });
        let outcome = crate::workload::Outcome::Active;
        apply(&mut state, Command::FinishRelease { app: "web".into(), version: 1, outcome });
        if count != 1 {
            apply(&mut state, Command::Scale { app: "web".into(), group: "app".into(), count });
        }
        let ids = state.instances.keys().cloned().collect();
        (state, ids)
    }

    fn place(state: &mut crate::State, ids: &[String], node: u64) {
        let placements = ids.iter().map(|id| Placement::Place { instance: id.clone(), node }).collect();
        assert_eq!(apply(state, Command::Place { placements }), Response::Done);
    }

    fn placed_on(state: &crate::State, node: u64) -> usize {
        state.instances.values().filter(|i| i.node == Some(node)).count()
    }

    #[test]
    fn a_stale_placement_that_overcommits_a_node_is_refused_at_apply() {
        // Three instances of 1 CPU each decided onto n1, which has 2.
        let (mut state, ids) = pending(3, Resources { cpu_millis: 1000, memory_bytes: GIB / 8 }, Default::default());
        assert_eq!(ids.len(), 3);
        place(&mut state, &ids, 1);
        assert_eq!(placed_on(&state, 1), 2, "only what fits is placed");
        let refused = state.instances.values().find(|i| i.node.is_none()).expect("one waits");
        assert!(refused.reason.as_deref().is_some_and(|r| r.contains("no longer has room")), "{refused:?}");
        // The next decision places it elsewhere.
        let refused = refused.id.clone();
        place(&mut state, &[refused], 2);
        assert_eq!(placed_on(&state, 2), 1);
    }

    #[test]
    fn placements_that_break_constraints_or_max_per_node_are_refused_at_apply() {
        let small = Resources { cpu_millis: 100, memory_bytes: GIB / 16 };
        let zoned = PlacementSpec { constraints: vec!["zone == b".into()], max_per_node: None };
        let (mut state, ids) = pending(1, small, zoned);
        place(&mut state, &ids, 1);
        assert_eq!(placed_on(&state, 1), 0);
        assert!(state.instances[&ids[0]].reason.as_deref().is_some_and(|r| r.contains("constraint zone == b")));
        place(&mut state, &ids, 2);
        assert_eq!(placed_on(&state, 2), 1);

        let spread = PlacementSpec { constraints: vec![], max_per_node: Some(1) };
        let (mut state, ids) = pending(2, small, spread);
        place(&mut state, &ids, 1);
        assert_eq!(placed_on(&state, 1), 1, "max_per_node = 1");
        let waiting = state.instances.values().find(|i| i.node.is_none()).expect("one waits");
        assert!(waiting.reason.as_deref().is_some_and(|r| r.contains("max_per_node = 1")), "{waiting:?}");
        // A later command counts what earlier ones placed.
        let waiting = waiting.id.clone();
        place(&mut state, std::slice::from_ref(&waiting), 1);
        assert_eq!(placed_on(&state, 1), 1, "max_per_node = 1 across commands");
        place(&mut state, &[waiting], 2);
        assert_eq!(placed_on(&state, 2), 1);
    }
}

mod tokens {
    use super::*;

    fn token(id: &str, name: &str, scope: Scope, digest: &str) -> ApiToken {
        ApiToken {
            id: id.into(),
            name: name.into(),
            scope,
            secret_sha256: digest.into(),
            public_key: format!("key-{digest}"),
            created_at: 5,
            expires_at: None,
            last_used: Some(99),
        }
    }

    fn find(state: &State, digest: &str) -> Option<TokenMatch> {
        state.token_by_digest(digest, |a, b| a == b)
    }

    #[test]
    fn tokens_are_found_by_digest_and_names_and_ids_are_unique() {
        let mut state = bootstrapped();
        let ci = token("0a0b0c0d", "ci", Scope::Deploy { app: "web".into() }, "d1");
        assert_eq!(apply(&mut state, Command::CreateToken { token: ci.clone() }), Response::Done);
        let found = find(&state, "d1").expect("by digest");
        assert_eq!((found.id.as_str(), found.scope), ("0a0b0c0d", Scope::Deploy { app: "web".into() }));
        assert_eq!(found.last_used, None, "a new token has not been used, whatever the proposer said");
        assert_eq!(find(&state, "h").map(|m| m.id), Some(INITIAL_ADMIN.to_owned()));
        assert_eq!(find(&state, "nope"), None);

        for clash in [
            token("1", "ci", Scope::Read, "d2"),
            token("0a0b0c0d", "other", Scope::Read, "d2"),
            token("2", INITIAL_ADMIN, Scope::Read, "d2"),
        ] {
            let name = clash.name.clone();
            assert_eq!(
                apply(&mut state, Command::CreateToken { token: clash }),
                Response::Rejected(Rejection::TokenExists { name })
            );
        }
        // Another token's secret or key: refused, whatever the name.
        let mut twin = token("4", "twin", Scope::Admin, "d1");
        assert_eq!(
            apply(&mut state, Command::CreateToken { token: twin.clone() }),
            Response::Rejected(Rejection::TokenSecretTaken)
        );
        twin.secret_sha256 = "d4".into();
        twin.public_key = "key-d1".into();
        assert_eq!(
            apply(&mut state, Command::CreateToken { token: twin }),
            Response::Rejected(Rejection::TokenSecretTaken)
        );
        let rotate_onto = Command::RotateToken {
            token: INITIAL_ADMIN.into(),
            secret_sha256: "d5".into(),
            public_key: "key-d1".into(),
        };
        assert_eq!(apply(&mut state, rotate_onto), Response::Rejected(Rejection::TokenSecretTaken));
        let bad = token("3", "Bad Name", Scope::Read, "d3");
        assert!(matches!(
            apply(&mut state, Command::CreateToken { token: bad }),
            Response::Rejected(Rejection::InvalidTokenName { .. })
        ));
        let names: Vec<String> = state.tokens().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["admin", "ci"]);
    }

    #[test]
    fn revoke_and_rotate_by_name_or_id_and_the_initial_admin_is_never_revoked() {
        let mut state = bootstrapped();
        apply(&mut state, Command::CreateToken { token: token("aa", "ci", Scope::Read, "d1") });
        apply(&mut state, Command::CreateToken { token: token("bb", "ro", Scope::Read, "d2") });

        let by_key = |state: &State, key: &str| state.token_by_key(key).map(|m| m.id);
        assert_eq!(by_key(&state, "key-d1"), Some("aa".to_owned()));
        let rotate = |token: &str, digest: &str| Command::RotateToken {
            token: token.into(),
            secret_sha256: digest.into(),
            public_key: format!("key-{digest}"),
        };
        assert_eq!(apply(&mut state, rotate("ci", "d9")), Response::Done);
        assert_eq!(find(&state, "d1"), None, "the old secret is refused");
        assert_eq!(by_key(&state, "key-d1"), None, "and so is its key");
        assert_eq!(find(&state, "d9").map(|m| m.id), Some("aa".to_owned()));
        assert_eq!(by_key(&state, "key-d9"), Some("aa".to_owned()));
        assert_eq!(by_key(&state, ""), None, "no token of an older cluster is found by its missing key");
        apply(&mut state, rotate(INITIAL_ADMIN, "h2"));
        assert_eq!(find(&state, "h"), None);
        assert_eq!(find(&state, "h2").map(|m| m.scope), Some(Scope::Admin));
        assert_eq!(by_key(&state, "key-h2"), Some(INITIAL_ADMIN.to_owned()));

        assert_eq!(apply(&mut state, Command::RevokeToken { token: "bb".into() }), Response::Done);
        assert_eq!(apply(&mut state, Command::RevokeToken { token: "ci".into() }), Response::Done);
        assert_eq!((find(&state, "d2"), find(&state, "d9")), (None, None));
        assert_eq!(
            apply(&mut state, Command::RevokeToken { token: "ci".into() }),
            Response::Rejected(Rejection::TokenNotFound { token: "ci".into() })
        );
        assert_eq!(
            apply(&mut state, Command::RevokeToken { token: INITIAL_ADMIN.into() }),
            Response::Rejected(Rejection::InitialAdminToken)
        );
        assert!(find(&state, "h2").is_some());
    }

    #[test]
    fn last_used_only_moves_forward_and_ignores_revoked_tokens() {
        let mut state = bootstrapped();
        apply(&mut state, Command::CreateToken { token: token("aa", "ci", Scope::Read, "d1") });
        let used = |pairs: &[(&str, UnixMillis)]| Command::TokensUsed {
            used: pairs.iter().map(|(id, at)| (id.to_string(), *at)).collect(),
        };
        apply(&mut state, used(&[("aa", 500), (INITIAL_ADMIN, 700), ("gone", 1)]));
        apply(&mut state, used(&[("aa", 300)]));
        assert_eq!(find(&state, "d1").and_then(|m| m.last_used), Some(500));
        assert_eq!(state.admin_last_used, Some(700));
        assert!(!state.api_tokens.contains_key("gone"));
        // A time beyond the proposal's clock (give or take a minute) is
        // clamped, so a forged one cannot hide later uses.
        apply(&mut state, used(&[("aa", i64::MAX)]));
        assert_eq!(find(&state, "d1").and_then(|m| m.last_used), Some(1000 + 60_000));
    }

    #[test]
    fn destroying_an_app_revokes_the_tokens_confined_to_it() {
        let mut state = bootstrapped();
        apply(&mut state, Command::CreateApp { name: "web".into() });
        apply(&mut state, Command::CreateToken { token: token("aa", "ci", Scope::Deploy { app: "web".into() }, "d1") });
        apply(&mut state, Command::CreateToken { token: token("bb", "ro", Scope::Read, "d2") });
        apply(&mut state, Command::DestroyApp { name: "web".into() });
        assert_eq!(find(&state, "d1"), None, "a new app named web must not inherit the token");
        assert!(find(&state, "d2").is_some());
    }

    #[test]
    fn too_many_tokens_are_refused() {
        let mut state = bootstrapped();
        for i in 0..MAX_TOKENS {
            let t = token(&format!("id{i}"), &format!("t{i}"), Scope::Read, &format!("d{i}"));
            assert_eq!(apply(&mut state, Command::CreateToken { token: t }), Response::Done);
        }
        let one_more = token("x", "x", Scope::Read, "dx");
        assert_eq!(
            apply(&mut state, Command::CreateToken { token: one_more }),
            Response::Rejected(Rejection::TooManyTokens { max: MAX_TOKENS })
        );
    }

    #[test]
    fn a_command_needs_the_access_of_what_it_changes() {
        let web = || "web".to_owned();
        assert_eq!(Command::Restart { app: web() }.access(), Access::WriteApp("web"));
        assert_eq!(Command::SuspendApp { name: web() }.access(), Access::WriteApp("web"));
        assert_eq!(Command::CreateApp { name: web() }.access(), Access::Admin);
        assert_eq!(Command::DestroyApp { name: web() }.access(), Access::Admin);
        assert_eq!(Command::RevokeToken { token: "x".into() }.access(), Access::Admin);
    }
}
