use roost_raft::state::{default_mesh_range, ClusterInfo};
use roost_raft::{Command, NewNode, Proposal};

use super::*;

fn new_node(name: &str, wireguard: bool) -> NewNode {
    NewNode {
        name: name.into(),
        address: format!("{name}.example:7000"),
        labels: Default::default(),
        cert_serial: format!("serial-{name}"),
        cert_fingerprint: format!("fp-{name}"),
        resources: Default::default(),
        wireguard: wireguard
            .then(|| WireguardPeer { public_key: format!("key-{name}"), endpoint: format!("{name}.example:51820") }),
        role: Default::default(),
    }
}

fn state_with(nodes: &[(&str, bool)]) -> State {
    let mut state = State::default();
    let cluster = ClusterInfo {
        id: "c0ffee0123456789".into(),
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
    let (first, rest) = nodes.split_first().expect("a node");
    state.apply(&Proposal::new(Command::Bootstrap { cluster: Box::new(cluster), node: new_node(first.0, first.1) }, 1));
    for (name, wireguard) in rest {
        state.apply(&Proposal::new(Command::AddNode { node: new_node(name, *wireguard) }, 1));
    }
    state
}

#[test]
fn each_node_plans_its_own_subnet_and_every_peer_that_has_wireguard() {
    let state = state_with(&[("n1", true), ("n2", true), ("n3", false)]);
    let n1 = plan(&state, 1).expect("n1 has a subnet");
    assert_eq!(n1.subnet.to_string(), "10.210.0.0/24");
    assert_eq!(n1.address(), Ipv4Addr::new(10, 210, 0, 1));
    assert_eq!(n1.range, default_mesh_range());
    // n3 runs without WireGuard, so n1 has no tunnel to it.
    let peers: Vec<(&str, String)> = n1.peers.iter().map(|p| (p.name.as_str(), p.subnet.to_string())).collect();
    assert_eq!(peers, [("n2", "10.210.1.0/24".to_owned())]);
    assert_eq!(n1.peers[0].wireguard.endpoint, "n2.example:51820");
    assert_eq!(plan(&state, 3).expect("n3").subnet.to_string(), "10.210.2.0/24");
    assert_eq!(plan(&state, 9), None, "an unknown node has no plan");
}

#[test]
fn a_removed_node_leaves_every_plan() {
    let mut state = state_with(&[("n1", true), ("n2", true), ("n3", true)]);
    state.apply(&Proposal::new(
        Command::RemoveNode { id: 2, new_join_secret: None, new_worker_secret: None, rotate: None },
        2,
    ));
    let peers: Vec<NodeId> = plan(&state, 1).expect("plan").peers.iter().map(|p| p.node).collect();
    assert_eq!(peers, [3]);
}

#[test]
fn names_fit_in_an_interface_name_and_differ_per_cluster_and_node() {
    let a = names("c0ffee0123456789", 99_999);
    assert!(a.bridge.len() <= 15 && a.wireguard.len() <= 15, "{a:?}");
    assert_ne!(names("c0ffee", 1), names("c0ffee", 2));
    assert_ne!(names("c0ffee", 1), names("beef00", 1));
    assert!(names("c0ffee0123", 1).tag.starts_with(&cluster_tag("c0ffee0123")));
}

#[test]
fn endpoints_use_the_advertised_host_and_the_wireguard_port() {
    assert_eq!(endpoint_for("10.0.0.5:7000", 51820), "10.0.0.5:51820");
    assert_eq!(endpoint_for("[fd00::5]:7000", 51999), "[fd00::5]:51999");
    assert_eq!(endpoint_for("node1.example.com:7000", 51820), "node1.example.com:51820");
}
