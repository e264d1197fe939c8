use std::collections::BTreeSet;

use roost_raft::workload::{Placement, Resources};
use roost_raft::Command;

use super::schedule;
use roost_raft::testkit::{apply, cluster, small, spec, GIB, MIB};

fn placed(placements: &[Placement]) -> Vec<u64> {
    placements
        .iter()
        .filter_map(|p| match p {
            Placement::Place { node, .. } => Some(*node),
            Placement::Unplaceable { .. } => None,
        })
        .collect()
}

#[test]
fn instances_spread_one_per_node() {
    let mut state = cluster(3, |_| vec![]);
    state.apps.insert("hello".into(), roost_raft::state::App::new("hello", 0));
    state.apps.get_mut("hello").expect("app").scale.insert("app".into(), 3);
    apply(
        &mut state,
        Command::Deploy { app: "hello".into(), spec: spec(&["app"], small(), false), description: "deploy".into() },
    );
    let mut nodes = placed(&schedule(&state, &BTreeSet::new()));
    nodes.sort();
    assert_eq!(nodes, [1, 2, 3]);
}

/// Deploys `apps` single-instance apps, one after the other, and counts
/// the instances each of the state's nodes received.
fn place_one_instance_apps(state: &mut roost_raft::State, apps: usize) -> Vec<usize> {
    for n in 0..apps {
        let app = format!("app{n}");
        apply(
            state,
            Command::Deploy { app: app.clone(), spec: spec(&["app"], small(), false), description: "deploy".into() },
        );
        let placements = schedule(state, &BTreeSet::new());
        assert_eq!(placed(&placements).len(), 1, "{app}: {placements:?}");
        apply(state, Command::Place { placements });
    }
    let ids: Vec<u64> = state.nodes.keys().copied().collect();
    ids.iter().map(|id| state.instances.values().filter(|i| i.node == Some(*id)).count()).collect()
}

#[test]
fn a_node_that_overstates_its_memory_gets_at_most_about_twice_a_nodes_share_not_every_app() {
    // Node 3 claims a hundred times what the others offer.
    let mut state = cluster(3, |_| vec![]);
    if let Some(node) = state.nodes.get_mut(&3) {
        node.resources = Resources { cpu_millis: 400_000, memory_bytes: 100 * GIB };
    }
    let on = place_one_instance_apps(&mut state, 12);
    assert_eq!(on, [3, 3, 6], "as if it had twice the median's memory");
}

#[test]
fn workers_that_overstate_their_memory_together_do_not_move_the_median() {
    // Two voters of 1 GiB, and three workers that each claim 100 GiB: the
    // median is the voters', so each worker counts as 2 GiB.
    let mut state = cluster(5, |_| vec![]);
    for id in 3..=5 {
        if let Some(node) = state.nodes.get_mut(&id) {
            node.role = roost_raft::state::NodeRole::Worker;
            node.resources = Resources { cpu_millis: 400_000, memory_bytes: 100 * GIB };
        }
    }
    let on = place_one_instance_apps(&mut state, 16);
    assert_eq!(on, [2, 2, 4, 4, 4], "a worker gets twice a voter's share, not everything");
}

#[test]
fn honest_nodes_of_different_sizes_fill_in_proportion_to_their_memory() {
    let mut state = cluster(2, |_| vec![]);
    if let Some(node) = state.nodes.get_mut(&2) {
        node.resources = Resources { cpu_millis: 2000, memory_bytes: 2 * GIB };
    }
    // Twelve 128 MiB instances: a third on the 1 GiB node, two thirds on
    // the 2 GiB one (by count of instances alone it would be six each).
    let on = place_one_instance_apps(&mut state, 12);
    assert_eq!(on, [4, 8]);
}

#[test]
fn down_nodes_constraints_and_max_per_node_are_respected() {
    let mut state = cluster(3, |i| if i == 3 { vec![("region", "us")] } else { vec![("region", "eu")] });
    let mut s = spec(&["app"], small(), false);
    s.placement.constraints = vec!["region == eu".into()];
    s.placement.max_per_node = Some(1);
    state.apps.insert("hello".into(), roost_raft::state::App::new("hello", 0));
    state.apps.get_mut("hello").expect("app").scale.insert("app".into(), 3);
    apply(&mut state, Command::Deploy { app: "hello".into(), spec: s, description: "deploy".into() });
    let placements = schedule(&state, &BTreeSet::from([2]));
    assert_eq!(placed(&placements), [1]);
    let reasons: Vec<&str> = placements
        .iter()
        .filter_map(|p| match p {
            Placement::Unplaceable { reason, .. } => Some(reason.as_str()),
            Placement::Place { .. } => None,
        })
        .collect();
    assert_eq!(reasons.len(), 2);
    assert!(reasons[0].contains("max_per_node = 1"), "{}", reasons[0]);
}

#[test]
fn an_instance_too_big_for_any_node_says_what_it_needs() {
    let mut state = cluster(2, |_| vec![]);
    let big = Resources { cpu_millis: 500, memory_bytes: 2 * GIB };
    apply(
        &mut state,
        Command::Deploy { app: "big".into(), spec: spec(&["app"], big, false), description: "deploy".into() },
    );
    let placements = schedule(&state, &BTreeSet::new());
    let Some(Placement::Unplaceable { reason, .. }) = placements.first() else { panic!("{placements:?}") };
    assert_eq!(reason, "needs 2 GiB of memory; most free is 1 GiB on n1");
    // The same reason is not proposed twice.
    apply(&mut state, Command::Place { placements });
    assert!(schedule(&state, &BTreeSet::new()).is_empty());
}

#[test]
fn free_memory_accounts_for_placed_instances() {
    let mut state = cluster(1, |_| vec![]);
    let size = Resources { cpu_millis: 100, memory_bytes: 400 * MIB };
    state.apps.insert("a".into(), roost_raft::state::App::new("a", 0));
    state.apps.get_mut("a").expect("app").scale.insert("app".into(), 3);
    apply(
        &mut state,
        Command::Deploy { app: "a".into(), spec: spec(&["app"], size, false), description: "deploy".into() },
    );
    let placements = schedule(&state, &BTreeSet::new());
    assert_eq!(placed(&placements), [1, 1], "two fit in 1 GiB, the third does not");
    apply(&mut state, Command::Place { placements });
    let again = schedule(&state, &BTreeSet::new());
    assert!(again.is_empty(), "{again:?}");
    let pending = state.instances.values().find(|i| i.node.is_none()).expect("one pending");
    assert_eq!(pending.reason.as_deref(), Some("needs 400 MiB of memory; most free is 224 MiB on n1"));
}

#[test]
fn suspended_apps_reserve_nothing_and_are_not_placed() {
    let mut state = cluster(1, |_| vec![]);
    apply(
        &mut state,
        Command::Deploy { app: "a".into(), spec: spec(&["app"], small(), false), description: "deploy".into() },
    );
    state.apps.get_mut("a").expect("app").suspended = true;
    assert!(schedule(&state, &BTreeSet::new()).is_empty());
    assert!(state.reserved().is_empty());
}
