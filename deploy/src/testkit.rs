//! Building replicated states for the pure tests of the scheduler and the
//! controller, through `State::apply` as the cluster would.

use std::collections::BTreeMap;

use roost_raft::command::NewNode;
use roost_raft::state::{ClusterInfo, State};
use roost_raft::workload::{GroupSpec, PlacementSpec, ReleaseSpec, Resources, RestartSpec, Strategy};
use roost_raft::{Command, Proposal, Response};

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
        ca_key_pem: String::new(),
        join_secret: String::new(),
        admin_secret_sha256: String::new(),
    };
    apply(&mut state, Command::Bootstrap { cluster, node: node("n1", &labels(1), size) });
    for i in 2..=count {
        apply(&mut state, Command::AddNode { node: node(&format!("n{i}"), &labels(i), size) });
    }
    state
}

pub fn spec(groups: &[&str], resources: Resources, checks: bool) -> ReleaseSpec {
    let check = roost_raft::workload::CheckSpec {
        name: "http".into(),
        kind: roost_raft::workload::CheckKind::Http,
        port: 8080,
        path: Some("/".into()),
        method: None,
        interval_ms: 1000,
        timeout_ms: 500,
        grace_period_ms: 1000,
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
                };
                (g.to_string(), spec)
            })
            .collect(),
        strategy: Strategy::Rolling,
        max_unavailable: None,
        placement: PlacementSpec::default(),
    }
}

pub fn small() -> Resources {
    Resources { cpu_millis: 250, memory_bytes: 128 * MIB }
}
