use std::net::Ipv4Addr;

use roost_raft::state::AcmeChallenge;
use roost_raft::testkit::{apply, cluster, small, spec};
use roost_raft::workload::{Health, InstanceReport, InstanceState, Placement, TcpServiceSpec};
use roost_raft::Command;

use super::*;

/// App `shop` (groups web and worker; web serves HTTP, worker a TCP port)
/// with one passing instance of each, on n1 and n2.
fn shop() -> State {
    let mut state = cluster(2, |_| Vec::new());
    let mut spec = spec(&["web", "worker"], small(), true);
    if let Some(http) = spec.http.as_mut() {
        http.groups = vec!["web".into()];
        http.force_https = true;
    }
    if let Some(worker) = spec.groups.get_mut("worker") {
        worker.internal_port = None;
    }
    spec.services = vec![TcpServiceSpec { internal_port: 6379, ports: vec![16379], groups: vec!["worker".into()] }];
    apply(&mut state, Command::Deploy { app: "shop".into(), spec, description: "d".into() });
    let ids: Vec<String> = state.instances.keys().cloned().collect();
    let placements =
        ids.iter().enumerate().map(|(i, id)| Placement::Place { instance: id.clone(), node: i as u64 + 1 }).collect();
    apply(&mut state, Command::Place { placements });
    for (i, id) in ids.iter().enumerate() {
        let report = InstanceReport {
            id: id.clone(),
            state: InstanceState::Running,
            health: Health::Passing,
            address: None,
            ip: Some(Ipv4Addr::new(10, 210, i as u8, 2)),
            reason: None,
            restarts: 0,
            generation: None,
        };
        apply(&mut state, Command::ReportInstances { node: i as u64 + 1, reports: vec![report] });
    }
    // `plain` deployed without [http_service] (its instance not placed);
    // `fresh` created, never deployed.
    let mut plain = roost_raft::testkit::spec(&["job"], small(), false);
    plain.http = None;
    apply(&mut state, Command::Deploy { app: "plain".into(), spec: plain, description: "d".into() });
    apply(&mut state, Command::CreateApp { name: "fresh".into() });
    state
}

fn routes(state: &State) -> Routes {
    Routes::new(state, &Directory::from_state(state))
}

fn web_addr(state: &State) -> SocketAddr {
    let web = state.instances.values().find(|i| i.group == "web").expect("web");
    SocketAddr::new(IpAddr::V4(web.ip.expect("ip")), 8080)
}

#[test]
fn app_names_under_the_cluster_domain_lead_to_the_serving_instances() {
    let state = shop();
    let routes = routes(&state);
    let HostMatch::App(route) = routes.host("shop.localhost") else { panic!("shop is served") };
    assert!(route.force_https);
    let addrs: Vec<SocketAddr> = route.backends.iter().map(|b| b.addr).collect();
    assert_eq!(addrs, [web_addr(&state)], "only the group that serves HTTP, at its port");
    assert_eq!(route.probe_every, Duration::from_secs(1), "the app's check interval");
    assert_eq!(routes.host("plain.localhost"), HostMatch::NotHttp("plain"));
    for unknown in ["fresh.localhost", "nope.localhost", "shop.localhost.evil", "a.shop.localhost", "localhost", "shop"]
    {
        assert_eq!(routes.host(unknown), HostMatch::Unknown, "{unknown}");
    }
}

#[test]
fn a_node_that_has_not_caught_up_calls_hosts_it_does_not_know_starting_not_unknown() {
    let state = shop();
    let routes = routes(&state).catching_up();
    assert!(matches!(routes.host("shop.localhost"), HostMatch::App(_)), "what it knows it serves");
    assert_eq!(routes.host("nope.localhost"), HostMatch::Starting);
    assert_eq!(Routes::default().host("shop.localhost"), HostMatch::Starting, "before any state");
}

#[test]
fn backends_on_a_node_the_mesh_does_not_reach_yet_get_no_traffic() {
    let state = shop();
    let web = state.instances.values().find(|i| i.group == "web").and_then(|i| i.node).expect("web placed");
    let worker = state.instances.values().find(|i| i.group == "worker").and_then(|i| i.node).expect("worker placed");
    assert_ne!(web, worker);
    let http_backends = |routes: &Routes| match routes.host("shop.localhost") {
        HostMatch::App(route) => route.backends.len(),
        other => panic!("shop is served: {other:?}"),
    };
    let tcp_backends = |routes: &Routes| routes.tcp(16379).map(|r| r.backends.len());

    // On the worker's node, before its peer for the web instance's node is in place.
    let only_here = routes(&state).reachable(&Reach::Only([worker].into()));
    assert_eq!(http_backends(&only_here), 0, "the web instance's node is not reachable yet");
    assert_eq!(tcp_backends(&only_here), Some(1), "its own instance is");
    assert!(!only_here.probes().contains_key(&web_addr(&state)), "nor probed");

    let both = routes(&state).reachable(&Reach::Only([worker, web].into()));
    assert_eq!((http_backends(&both), tcp_backends(&both)), (1, Some(1)));
    let all = routes(&state).reachable(&Reach::All);
    assert_eq!((http_backends(&all), tcp_backends(&all)), (1, Some(1)), "without WireGuard nothing is held back");
}

#[test]
fn tcp_ports_lead_to_their_group_at_the_internal_port() {
    let state = shop();
    let routes = routes(&state);
    assert_eq!(routes.tcp_ports().collect::<Vec<_>>(), [16379]);
    let route = routes.tcp(16379).expect("a route");
    let worker = state.instances.values().find(|i| i.group == "worker").expect("worker");
    assert_eq!(route.backends.len(), 1);
    assert_eq!(route.backends[0].addr, SocketAddr::new(IpAddr::V4(worker.ip.expect("ip")), 6379));
    assert!(routes.probes().contains_key(&route.backends[0].addr));
    assert!(routes.probes().contains_key(&web_addr(&state)));
}

#[test]
fn custom_domains_and_challenges_follow_the_certificates() {
    let mut state = shop();
    apply(&mut state, Command::AddCertificate { domain: "shop.example.com".into(), app: "shop".into() });
    let challenge = AcmeChallenge { token: "tok".into(), key_authorization: "tok.thumb".into() };
    apply(&mut state, Command::SetAcmeChallenge { domain: "shop.example.com".into(), challenge: Some(challenge) });
    let routes = routes(&state);
    assert!(matches!(routes.host("shop.example.com"), HostMatch::App(route) if route.app == "shop"));
    assert_eq!(routes.challenge("tok"), Some("tok.thumb"));
    assert_eq!(routes.challenge("other"), None);
    assert_eq!(routes.cluster_app("shop.localhost"), Some("shop"));
    assert_eq!(routes.cluster_app("shop.example.com"), None);
}

#[test]
fn a_failing_instance_is_not_a_backend() {
    let mut state = shop();
    let web = state.instances.values().find(|i| i.group == "web").cloned().expect("web");
    let report = InstanceReport {
        id: web.id.clone(),
        state: InstanceState::Running,
        health: Health::Failing,
        address: None,
        ip: web.ip,
        reason: Some("GET / answered 500".into()),
        restarts: 0,
        generation: None,
    };
    apply(&mut state, Command::ReportInstances { node: web.node.expect("placed"), reports: vec![report] });
    let routes = routes(&state);
    let HostMatch::App(route) = routes.host("shop.localhost") else { panic!("still served") };
    assert!(route.backends.is_empty());
}
