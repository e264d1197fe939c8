//! The leader's decisions about workloads: a pure function of state and time.
//!
//! [`decide`] returns the commands that move the cluster toward what its
//! state asks for: take instances off nodes that have been down past the
//! grace period, were removed, or lost a label their constraints ask for, place waiting instances (through [`crate::scheduler`]), and
//! end deploys, as a success once every new instance runs and passes its
//! checks, or as a failure (rolled back: the previous release keeps serving)
//! as soon as one cannot be placed, fails, fails a check, or the deploy
//! outlasts its timeout; and move `roost restart` on by its next wave
//! (`State::restart_wave`). The node driver proposes what it returns and calls
//! it again; every decision is re-checked by apply, so a repeated or late one
//! is harmless.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use roost_raft::state::{State, UnixMillis};
use roost_raft::workload::{Constraint, Health, Instance, InstanceState, Outcome, ReleaseStatus, Strategy};
use roost_raft::{Command, NodeId};

use crate::scheduler;

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// How long a node may be down before its instances move elsewhere.
    pub reschedule_after: Duration,
    /// How long a deploy may take before it is rolled back.
    pub deploy_timeout: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self { reschedule_after: Duration::from_secs(10), deploy_timeout: Duration::from_secs(300) }
    }
}

/// What the leader knows about nodes beyond the state.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    /// Nodes not heard from recently, with how long they have been silent.
    pub down: BTreeMap<NodeId, Duration>,
}

/// Why an instance leaves its node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Why {
    Removed,
    Down,
    Labels,
}

/// Whether `labels` meet every placement constraint of `instance`'s
/// release (constraints that do not parse were refused at deploy, and are
/// taken as met here).
fn meets_constraints(state: &State, instance: &Instance, labels: &BTreeMap<String, String>) -> bool {
    let Some(release) = state.apps.get(&instance.app).and_then(|app| app.releases.get(&instance.release)) else {
        return true;
    };
    release
        .spec
        .placement
        .constraints
        .iter()
        .filter_map(|text| Constraint::parse(text).ok())
        .all(|constraint| constraint.holds(labels))
}

pub fn decide(state: &State, view: &NodeView, config: &ControllerConfig, now: UnixMillis) -> Vec<Command> {
    let mut commands = Vec::new();

    // Instances move off a node that is gone, down too long, or whose
    // labels no longer meet their release's constraints (an admin took a
    // label away: what a constraint kept off a node must leave it).
    let mut moved: BTreeMap<(NodeId, Why), Vec<String>> = BTreeMap::new();
    for instance in state.instances.values() {
        let Some(node) = instance.node else { continue };
        let why = match state.nodes.get(&node) {
            None => Why::Removed,
            Some(_) if view.down.get(&node).is_some_and(|d| *d >= config.reschedule_after) => Why::Down,
            Some(record) if !meets_constraints(state, instance, &record.labels) => Why::Labels,
            Some(_) => continue,
        };
        moved.entry((node, why)).or_default().push(instance.id.clone());
    }
    for ((node, why), instances) in moved {
        let name = state.nodes.get(&node).map_or_else(|| format!("node {node}"), |n| n.name.clone());
        let reason = match why {
            Why::Down => format!("{name} was down for more than {}s", config.reschedule_after.as_secs()),
            Why::Removed => format!("{name} was removed"),
            Why::Labels => format!("{name} no longer has the labels the app's placement constraints ask for"),
        };
        commands.push(Command::Reschedule { instances, reason });
    }

    let unavailable: BTreeSet<NodeId> = view.down.keys().copied().collect();
    let placements = scheduler::schedule(state, &unavailable);
    if !placements.is_empty() {
        commands.push(Command::Place { placements });
    }

    for app in state.apps.values().filter(|a| a.restart.is_some()) {
        if let Some((generation, instances)) = state.restart_wave(&app.name) {
            commands.push(Command::RestartInstances { app: app.name.clone(), generation, instances });
        }
    }

    for app in state.apps.values() {
        let Some(release) = app.releases.values().rev().find(|r| r.status == ReleaseStatus::Deploying) else {
            continue;
        };
        let instances: Vec<_> =
            state.instances.values().filter(|i| i.app == app.name && i.release == release.version).collect();
        let node_name = |id: Option<NodeId>| {
            id.and_then(|id| state.nodes.get(&id)).map_or_else(|| "no node".to_owned(), |n| n.name.clone())
        };
        let mut failure = None;
        for instance in &instances {
            let detail = instance.reason.clone().unwrap_or_default();
            if instance.node.is_none() && instance.reason.is_some() && !instance.displaced {
                failure = Some(format!("instance {} ({}) cannot be placed: {detail}", instance.id, instance.group));
            } else if instance.state == InstanceState::Stopped {
                failure = Some(format!("instance {} on {} stopped: {detail}", instance.id, node_name(instance.node)));
            } else if instance.state == InstanceState::Failed {
                failure = Some(format!("instance {} on {} failed: {detail}", instance.id, node_name(instance.node)));
            } else if instance.health == Health::Failing {
                failure = Some(format!(
                    "instance {} on {} failed its checks: {detail}",
                    instance.id,
                    node_name(instance.node)
                ));
            }
            if failure.is_some() {
                break;
            }
        }
        let timed_out = now.saturating_sub(release.created_at) > config.deploy_timeout.as_millis() as i64;
        // `immediate` switches once the new instances have a place; the
        // others once every new instance runs and passes its checks.
        let ready = |i: &&Instance| match release.spec.strategy {
            Strategy::Immediate => i.node.is_some(),
            _ => i.ready(release.spec.groups.get(&i.group)),
        };
        if failure.is_none() && release.spec.strategy == Strategy::Rolling {
            let retire = replaced_old_instances(state, &app.name, release.version, &instances);
            if !retire.is_empty() {
                commands.push(Command::RetireInstances { app: app.name.clone(), instances: retire });
            }
        }
        let outcome = if let Some(reason) = failure {
            Some(Outcome::Failed { reason })
        } else if instances.iter().all(ready) {
            Some(Outcome::Active)
        } else if timed_out {
            Some(Outcome::Failed {
                reason: format!(
                    "its instances did not all run and pass their checks within {}s",
                    config.deploy_timeout.as_secs()
                ),
            })
        } else {
            None
        };
        if let Some(outcome) = outcome {
            commands.push(Command::FinishRelease { app: app.name.clone(), version: release.version, outcome });
        }
    }
    commands
}

/// In a rolling deploy, the old instances that ready new ones now replace:
/// per group, at most as many old instances stay as new ones are not ready.
/// Old instances that are not ready themselves go first.
fn replaced_old_instances(state: &State, app: &str, version: u64, new: &[&Instance]) -> Vec<String> {
    let mut retire = Vec::new();
    let mut groups: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let release = state.apps.get(app).and_then(|a| a.releases.get(&version));
    for instance in new {
        let entry = groups.entry(instance.group.as_str()).or_default();
        entry.0 += 1;
        if instance.ready(release.and_then(|r| r.spec.groups.get(&instance.group))) {
            entry.1 += 1;
        }
    }
    for (group, (count, ready)) in groups {
        let mut old: Vec<&Instance> =
            state.instances.values().filter(|i| i.app == app && i.release != version && i.group == group).collect();
        let keep = count - ready;
        if old.len() <= keep {
            continue;
        }
        let ready_of = |i: &Instance| {
            let spec =
                state.apps.get(app).and_then(|a| a.releases.get(&i.release)).and_then(|r| r.spec.groups.get(&i.group));
            i.ready(spec)
        };
        old.sort_by_key(|i| (ready_of(i), i.id.clone()));
        retire.extend(old.iter().take(old.len() - keep).map(|i| i.id.clone()));
    }
    retire
}

#[cfg(test)]
mod tests;
