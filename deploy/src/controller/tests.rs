use std::time::Duration;

use roost_raft::workload::{Health, InstanceReport, InstanceState, Outcome, ReleaseStatus};
use roost_raft::{Command, Response};

use super::{decide, ControllerConfig, NodeView};
use roost_raft::testkit::{apply, cluster, small, spec};

fn run(state: &mut roost_raft::State, view: &NodeView, now: i64) -> Vec<Command> {
    let commands = decide(state, view, &ControllerConfig::default(), now);
    for command in commands.clone() {
        apply(state, command);
    }
    commands
}

fn deploy(state: &mut roost_raft::State, checks: bool) -> Response {
    apply(
        state,
        Command::Deploy { app: "a".into(), spec: spec(&["app"], small(), checks), description: "deploy".into() },
    )
}

/// Three nodes and app `a` serving v1 on `count` checked instances.
fn serving(count: u32) -> roost_raft::State {
    let mut state = cluster(3, |_| vec![]);
    state.apps.insert("a".into(), roost_raft::state::App::new("a", 0));
    state.apps.get_mut("a").expect("app").scale.insert("app".into(), count);
    deploy(&mut state, true);
    for _ in 0..5 {
        run(&mut state, &NodeView::default(), 1_000);
        ready(&mut state, 1);
    }
    run(&mut state, &NodeView::default(), 1_000);
    assert_eq!(state.apps["a"].current().map(|r| r.version), Some(1));
    state
}

fn failing(id: &str) -> InstanceReport {
    InstanceReport {
        id: id.to_owned(),
        state: InstanceState::Running,
        health: Health::Failing,
        address: None,
        ip: None,
        reason: Some("GET / answered 500".into()),
        restarts: 0,
        generation: None,
    }
}

fn report(state: &mut roost_raft::State, running: bool, health: Health) {
    let reports: Vec<(u64, InstanceReport)> = state
        .instances
        .values()
        .filter_map(|i| {
            let report = InstanceReport {
                id: i.id.clone(),
                state: if running { InstanceState::Running } else { InstanceState::Failed },
                health,
                address: Some("172.17.0.2:8080".into()),
                ip: None,
                reason: (health == Health::Failing).then(|| "GET / answered 500".into()),
                restarts: 0,
                generation: None,
            };
            Some((i.node?, report))
        })
        .collect();
    for (node, report) in reports {
        apply(state, Command::ReportInstances { node, reports: vec![report] });
    }
}

#[test]
fn a_deploy_becomes_active_once_its_checks_pass_and_replaces_the_old_release() {
    let mut state = cluster(2, |_| vec![]);
    deploy(&mut state, true);
    run(&mut state, &NodeView::default(), 1_000);
    report(&mut state, true, Health::Unknown);
    assert!(run(&mut state, &NodeView::default(), 1_000).is_empty(), "not before the checks pass");
    report(&mut state, true, Health::Passing);
    run(&mut state, &NodeView::default(), 1_000);
    assert_eq!(state.apps["a"].current().map(|r| r.version), Some(1));

    deploy(&mut state, true);
    assert_eq!(state.instances.len(), 2, "old and new side by side");
    run(&mut state, &NodeView::default(), 1_000);
    report(&mut state, true, Health::Passing);
    run(&mut state, &NodeView::default(), 1_000);
    assert_eq!(state.apps["a"].current().map(|r| r.version), Some(2));
    assert_eq!(state.apps["a"].releases[&1].status, ReleaseStatus::Superseded);
    assert!(state.instances.values().all(|i| i.release == 2));
}

#[test]
fn a_failing_check_rolls_the_deploy_back_and_keeps_the_old_instances() {
    let mut state = cluster(2, |_| vec![]);
    deploy(&mut state, true);
    run(&mut state, &NodeView::default(), 1_000);
    report(&mut state, true, Health::Passing);
    run(&mut state, &NodeView::default(), 1_000);

    deploy(&mut state, true);
    run(&mut state, &NodeView::default(), 1_000);
    let new: Vec<String> = state.instances.values().filter(|i| i.release == 2).map(|i| i.id.clone()).collect();
    let node = state.instances[&new[0]].node.expect("placed");
    apply(&mut state, Command::ReportInstances { node, reports: vec![failing(&new[0])] });
    let commands = run(&mut state, &NodeView::default(), 1_000);
    let Some(Command::FinishRelease { outcome: Outcome::Failed { reason }, .. }) = commands.last() else {
        panic!("{commands:?}")
    };
    assert!(reason.contains("failed its checks: GET / answered 500"), "{reason}");
    assert_eq!(state.apps["a"].current().map(|r| r.version), Some(1));
    assert_eq!(state.apps["a"].releases[&2].status, ReleaseStatus::Failed);
    assert!(state.instances.values().all(|i| i.release == 1));
}

#[test]
fn instances_of_a_node_down_past_the_grace_period_move() {
    let mut state = cluster(2, |_| vec![]);
    deploy(&mut state, false);
    run(&mut state, &NodeView::default(), 1_000);
    let node = state.instances.values().next().and_then(|i| i.node).expect("placed");
    let briefly = NodeView { down: [(node, Duration::from_secs(3))].into() };
    let commands = run(&mut state, &briefly, 1_000);
    assert!(!commands.iter().any(|c| matches!(c, Command::Reschedule { .. })), "{commands:?}");
    let long = NodeView { down: [(node, Duration::from_secs(11))].into() };
    run(&mut state, &long, 1_000);
    assert_eq!(state.instances.values().next().and_then(|i| i.node), None, "taken off first");
    run(&mut state, &long, 1_000);
    let instance = state.instances.values().next().expect("instance");
    assert_eq!(instance.node, Some(if node == 1 { 2 } else { 1 }));
}

#[test]
fn an_unplaceable_deploy_fails_with_the_reason() {
    let mut state = cluster(1, |_| vec![]);
    let big = roost_raft::workload::Resources { cpu_millis: 8000, memory_bytes: 1 << 20 };
    let response = apply(
        &mut state,
        Command::Deploy { app: "a".into(), spec: spec(&["app"], big, false), description: "deploy".into() },
    );
    assert_eq!(response, Response::ReleaseCreated { version: 1 });
    run(&mut state, &NodeView::default(), 1_000);
    run(&mut state, &NodeView::default(), 1_000);
    let release = &state.apps["a"].releases[&1];
    assert_eq!(release.status, ReleaseStatus::Failed);
    assert!(release.reason.as_deref().is_some_and(|r| r.contains("needs 8 CPU; most free is 2 on n1")), "{release:?}");
    assert!(state.instances.is_empty());
}

/// Marks every placed instance of `release` running and passing.
fn ready(state: &mut roost_raft::State, release: u64) {
    let placed: Vec<(u64, String)> = state
        .instances
        .values()
        .filter(|i| i.release == release && i.state != InstanceState::Running)
        .filter_map(|i| Some((i.node?, i.id.clone())))
        .collect();
    for (node, id) in placed {
        let report = InstanceReport {
            id,
            state: InstanceState::Running,
            health: Health::Passing,
            address: None,
            ip: None,
            reason: None,
            restarts: 0,
            generation: None,
        };
        apply(state, Command::ReportInstances { node, reports: vec![report] });
    }
}

#[test]
fn a_rolling_deploy_replaces_one_instance_at_a_time() {
    let mut state = serving(3);

    let mut v2 = spec(&["app"], small(), true);
    v2.max_unavailable = Some(roost_raft::workload::MaxUnavailable::Count(1));
    apply(&mut state, Command::Deploy { app: "a".into(), spec: v2, description: "deploy".into() });
    let mut waves = Vec::new();
    for _ in 0..10 {
        run(&mut state, &NodeView::default(), 1_000);
        let placed_new = state.instances.values().filter(|i| i.release == 2 && i.node.is_some()).count();
        let old = state.instances.values().filter(|i| i.release == 1).count();
        let placed = state.instances.values().filter(|i| i.node.is_some()).count();
        assert!(placed <= 4, "never more than one extra instance placed: {:?}", state.instances);
        waves.push((placed_new, old));
        ready(&mut state, 2);
        if state.apps["a"].current().map(|r| r.version) == Some(2) {
            break;
        }
    }
    assert_eq!(state.apps["a"].current().map(|r| r.version), Some(2), "{waves:?}");
    assert_eq!(waves[0], (1, 3), "one new instance first, beside all three old: {waves:?}");
    assert!(state.instances.values().all(|i| i.release == 2) && state.instances.len() == 3);
}

#[test]
fn a_failed_rolling_deploy_restores_the_old_release_to_full_strength() {
    let mut state = serving(3);
    let mut v2 = spec(&["app"], small(), true);
    v2.max_unavailable = Some(roost_raft::workload::MaxUnavailable::Count(1));
    apply(&mut state, Command::Deploy { app: "a".into(), spec: v2, description: "deploy".into() });
    run(&mut state, &NodeView::default(), 1_000);
    ready(&mut state, 2);
    run(&mut state, &NodeView::default(), 1_000);
    assert_eq!(state.instances.values().filter(|i| i.release == 1).count(), 2, "one old instance retired");
    // The second new instance fails its check.
    let (node, id) = state
        .instances
        .values()
        .find(|i| i.release == 2 && i.state != InstanceState::Running)
        .and_then(|i| Some((i.node?, i.id.clone())))
        .expect("a second new instance placed");
    apply(&mut state, Command::ReportInstances { node, reports: vec![failing(&id)] });
    run(&mut state, &NodeView::default(), 1_000);
    assert_eq!(state.apps["a"].releases[&2].status, ReleaseStatus::Failed);
    assert_eq!(state.instances.values().filter(|i| i.release == 1).count(), 3, "back to three");
    assert!(state.instances.values().all(|i| i.release == 1));
}

#[test]
fn instances_leave_a_node_that_loses_a_label_their_constraints_ask_for() {
    let mut state = cluster(2, |i| if i == 1 { vec![("trusted", "yes")] } else { vec![] });
    let mut spec = spec(&["app"], small(), false);
    spec.placement.constraints = vec!["trusted == yes".into()];
    apply(&mut state, Command::Deploy { app: "a".into(), spec, description: "deploy".into() });
    run(&mut state, &NodeView::default(), 1_000);
    assert!(state.instances.values().all(|i| i.node == Some(1)), "placed on the trusted node only");
    let commands = run(&mut state, &NodeView::default(), 1_000);
    assert!(!commands.iter().any(|c| matches!(c, Command::Reschedule { .. })), "{commands:?}");

    apply(&mut state, Command::LabelNode { id: 1, set: Default::default(), remove: vec!["trusted".into()] });
    let commands = run(&mut state, &NodeView::default(), 1_000);
    let Some(Command::Reschedule { reason, .. }) = commands.first() else { panic!("{commands:?}") };
    assert!(reason.contains("no longer has the labels"), "{reason}");
    assert!(state.instances.values().all(|i| i.node.is_none()), "no node meets the constraint now");
}
