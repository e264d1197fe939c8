use std::time::Duration;

use roost_raft::workload::{Health, InstanceReport, InstanceState, Outcome, ReleaseStatus};
use roost_raft::{Command, Response};

use super::{decide, ControllerConfig, NodeView};
use crate::testkit::{apply, cluster, small, spec};

fn run(state: &mut roost_raft::State, view: &NodeView, now: i64) -> Vec<Command> {
    let commands = decide(state, view, &ControllerConfig::default(), now);
    for command in commands.clone() {
        apply(state, command);
    }
    commands
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
                reason: (health == Health::Failing).then(|| "GET / answered 500".into()),
                restarts: 0,
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
    apply(
        &mut state,
        Command::Deploy { app: "a".into(), spec: spec(&["app"], small(), true), description: "deploy".into() },
    );
    run(&mut state, &NodeView::default(), 1_000);
    report(&mut state, true, Health::Unknown);
    assert!(run(&mut state, &NodeView::default(), 1_000).is_empty(), "not before the checks pass");
    report(&mut state, true, Health::Passing);
    run(&mut state, &NodeView::default(), 1_000);
    assert_eq!(state.apps["a"].current().map(|r| r.version), Some(1));

    apply(
        &mut state,
        Command::Deploy { app: "a".into(), spec: spec(&["app"], small(), true), description: "deploy".into() },
    );
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
    apply(
        &mut state,
        Command::Deploy { app: "a".into(), spec: spec(&["app"], small(), true), description: "deploy".into() },
    );
    run(&mut state, &NodeView::default(), 1_000);
    report(&mut state, true, Health::Passing);
    run(&mut state, &NodeView::default(), 1_000);

    apply(
        &mut state,
        Command::Deploy { app: "a".into(), spec: spec(&["app"], small(), true), description: "deploy".into() },
    );
    run(&mut state, &NodeView::default(), 1_000);
    let new: Vec<String> = state.instances.values().filter(|i| i.release == 2).map(|i| i.id.clone()).collect();
    let node = state.instances[&new[0]].node.expect("placed");
    let failing = InstanceReport {
        id: new[0].clone(),
        state: InstanceState::Running,
        health: Health::Failing,
        address: None,
        reason: Some("GET / answered 500".into()),
        restarts: 0,
    };
    apply(&mut state, Command::ReportInstances { node, reports: vec![failing] });
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
    apply(
        &mut state,
        Command::Deploy { app: "a".into(), spec: spec(&["app"], small(), false), description: "deploy".into() },
    );
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
