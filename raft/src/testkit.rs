//! Building replicated states for pure tests (the scheduler, the
//! controller, the mesh plan, the directory), through `State::apply` as the
//! cluster would. Compiled for this crate's tests and, through the `testkit`
//! feature, for the tests of the crates that read the state.

use std::collections::BTreeMap;

use crate::command::NewNode;
use crate::state::{default_mesh_range, ClusterInfo, State};
use crate::workload::{GroupSpec, PlacementSpec, ReleaseSpec, Resources, RestartSpec, Strategy};
use crate::{Command, Proposal, Response};

pub const GIB: u64 = 1 << 30;
pub const MIB: u64 = 1 << 20;

pub fn apply(state: &mut State, command: Command) -> Response {
    let response = state.apply(&Proposal::new(command, 1_000));
    assert!(!matches!(response, Response::Rejected(_)), "{response:?}");
    response
}

fn node(name: &str, labels: &[(&str, &str)], resources: Resources) -> NewNode {
    NewNode {
        name: name.to_owned(),
        address: format!("{name}:7000"),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        cert_serial: name.to_owned(),
        cert_fingerprint: name.to_owned(),
        resources,
        wireguard: None,
        role: Default::default(),
    }
}

/// A cluster of nodes `n1`…, each with 2 CPUs and 1 GiB unless `sizes` says.
pub fn cluster(count: usize, labels: impl Fn(usize) -> Vec<(&'static str, &'static str)>) -> State {
    let mut state = State::default();
    let size = Resources { cpu_millis: 2000, memory_bytes: GIB };
    let cluster = ClusterInfo {
        id: "test".into(),
        created_at: 0,
        ca_cert_pem: String::new(),
        ca_key: None,
        voter_join: None,
        worker_join: None,
        ca_key_pem: String::new(),
        join_secret: String::new(),
        worker_join_secret: String::new(),
        admin_secret_sha256: String::new(),
        admin_public_key: String::new(),
        join_rotation_due: false,
        mesh_range: default_mesh_range(),
        domain: "localhost".into(),
        acme: None,
        ca_rotation: None,
        previous_ca_cert_pem: None,
    };
    apply(&mut state, Command::Bootstrap { cluster: Box::new(cluster), node: node("n1", &labels(1), size) });
    for i in 2..=count {
        apply(&mut state, Command::AddNode { node: node(&format!("n{i}"), &labels(i), size) });
    }
    state
}

pub fn spec(groups: &[&str], resources: Resources, checks: bool) -> ReleaseSpec {
    let check = crate::workload::CheckSpec {
        name: "http".into(),
        kind: crate::workload::CheckKind::Http,
        port: 8080,
        path: Some("/".into()),
        method: None,
        interval_ms: 1000,
        timeout_ms: 500,
        grace_period_ms: 1000,
        failure_threshold: crate::workload::DEFAULT_FAILURE_THRESHOLD,
    };
    ReleaseSpec {
        image: "sha256:1".into(),
        image_ref: "hello".into(),
        image_source: 1,
        env: BTreeMap::new(),
        groups: groups
            .iter()
            .map(|g| {
                let spec = GroupSpec {
                    command: Vec::new(),
                    resources,
                    restart: RestartSpec::default(),
                    internal_port: Some(8080),
                    checks: if checks { vec![check.clone()] } else { Vec::new() },
                    kill_timeout_seconds: crate::workload::DEFAULT_KILL_TIMEOUT_SECONDS,
                };
                (g.to_string(), spec)
            })
            .collect(),
        strategy: Strategy::Rolling,
        max_unavailable: None,
        initial_count: None,
        release_history: None,
        placement: PlacementSpec::default(),
        http: Some(crate::workload::HttpServiceSpec {
            internal_port: 8080,
            force_https: false,
            concurrency: Default::default(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }),
        services: Vec::new(),
    }
}

pub fn small() -> Resources {
    Resources { cpu_millis: 250, memory_bytes: 128 * MIB }
}
