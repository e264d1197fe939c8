//! The DNS server over real UDP sockets on loopback: answers from a
//! directory, and forwarding to an upstream (another of these servers,
//! serving another zone).

use std::net::Ipv4Addr;

use roost_raft::testkit::{apply, cluster, small, spec};
use roost_raft::workload::{Health, InstanceReport, InstanceState, Placement};
use roost_raft::{Command, State};

use super::*;

/// App `shop` with one instance on n1, reported running with `health`.
fn state(health: Health) -> State {
    let mut state = cluster(1, |_| Vec::new());
    apply(
        &mut state,
        Command::Deploy { app: "shop".into(), spec: spec(&["web"], small(), true), description: "d".into() },
    );
    let id = state.instances.keys().next().cloned().expect("an instance");
    apply(&mut state, Command::Place { placements: vec![Placement::Place { instance: id.clone(), node: 1 }] });
    let report = InstanceReport {
        id,
        state: InstanceState::Running,
        health,
        address: None,
        ip: Some(Ipv4Addr::new(10, 210, 0, 7)),
        reason: None,
        restarts: 0,
        generation: None,
    };
    apply(&mut state, Command::ReportInstances { node: 1, reports: vec![report] });
    state
}

async fn server(zone: &str, state: &State, upstreams: &[SocketAddr]) -> (DnsServer, watch::Sender<Arc<Directory>>) {
    let (tx, rx) = watch::channel(Arc::new(Directory::from_state(state)));
    let handler = Handler::for_zone(zone, rx, upstreams);
    let server = DnsServer::serve("127.0.0.1:0".parse().expect("addr"), handler).await.expect("serve");
    (server, tx)
}

#[tokio::test]
async fn internal_names_answer_from_the_directory_and_follow_it() {
    let (dns, directory) = server("internal", &state(Health::Passing), &[]).await;
    let at = dns.address();
    let ask = |name: &'static str, kind| async move { query(at, name, kind).await.expect("an answer") };

    assert_eq!(ask("shop.internal.", RecordType::A).await, (ResponseCode::NoError, vec!["10.210.0.7".into()]));
    assert_eq!(ask("WEB.Shop.Internal.", RecordType::A).await, (ResponseCode::NoError, vec!["10.210.0.7".into()]));
    assert_eq!(ask("shop.internal.", RecordType::AAAA).await, (ResponseCode::NoError, vec![]));
    assert_eq!(ask("_apps.internal.", RecordType::TXT).await, (ResponseCode::NoError, vec!["shop".into()]));
    assert_eq!(ask("nope.internal.", RecordType::A).await, (ResponseCode::NXDomain, vec![]));

    // The instance fails its check: the next answer leaves it out.
    directory.send_replace(Arc::new(Directory::from_state(&state(Health::Failing))));
    assert_eq!(ask("shop.internal.", RecordType::A).await, (ResponseCode::NoError, vec![]));
    assert_eq!(ask("_apps.internal.", RecordType::TXT).await, (ResponseCode::NoError, vec![]));
    dns.stop().await;
}

#[tokio::test]
async fn other_names_are_forwarded_and_the_upstream_answer_relayed() {
    let (upstream, _keep) = server("example", &state(Health::Passing), &[]).await;
    let (dns, _directory) = server("internal", &state(Health::Passing), &[upstream.address()]).await;
    let at = dns.address();
    assert_eq!(
        query(at, "shop.example.", RecordType::A).await.expect("relayed"),
        (ResponseCode::NoError, vec!["10.210.0.7".into()])
    );
    assert_eq!(query(at, "gone.example.", RecordType::A).await.expect("relayed"), (ResponseCode::NXDomain, vec![]));

    // Without a reachable upstream the answer is SERVFAIL, not a hang.
    let (lonely, _directory) = server("internal", &state(Health::Passing), &[]).await;
    assert_eq!(
        query(lonely.address(), "shop.example.", RecordType::A).await.expect("an answer"),
        (ResponseCode::ServFail, vec![])
    );
    dns.stop().await;
    upstream.stop().await;
    lonely.stop().await;
}

#[test]
fn resolv_conf_nameservers_are_read_and_others_skipped() {
    let text = "# comment\nsearch example\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver 2001:db8::53\noptions ndots:1\n";
    let found: Vec<String> = parse_resolv_conf(text).iter().map(ToString::to_string).collect();
    assert_eq!(found, ["192.0.2.53:53", "[2001:db8::53]:53"]);
}

#[test]
fn app_lists_fit_in_txt_strings() {
    let apps: Vec<String> = (0..100).map(|i| format!("app-number-{i:03}")).collect();
    let strings = txt_strings(&apps);
    assert!(strings.len() > 1 && strings.iter().all(|s| s.len() <= 255));
    assert_eq!(strings.join(","), apps.join(","));
}
