//! Placing instances on nodes: a pure function of the replicated state.
//!
//! [`schedule`] looks at the instances waiting for a node and returns
//! [`Placement`]s, which the leader proposes as one `Command::Place`. Apply
//! re-checks nothing but existence, so the function must only emit decisions
//! that fit: a node that is up, whose labels meet the release's constraints,
//! that runs fewer than `max_per_node` of the app's instances, and whose free
//! CPU and memory (what it offers minus what placed instances reserve) hold
//! the instance. Among those it spreads: fewest instances of the same app
//! first, then most free memory. An instance that fits nowhere gets a reason
//! that says what would let it ("needs 512 MiB; most free is 256 MiB on n2").

use std::collections::{BTreeMap, BTreeSet, HashMap};

use roost_raft::state::{NodeRecord, State};
use roost_raft::workload::{format_bytes, format_cpus, Instance, Placement, Resources};
use roost_raft::NodeId;

use crate::config::Constraint;

/// Decides a node for every instance without one. `unavailable` nodes (down,
/// or not yet heard from) get nothing.
pub fn schedule(state: &State, unavailable: &BTreeSet<NodeId>) -> Vec<Placement> {
    let mut pending: Vec<&Instance> = state
        .instances
        .values()
        .filter(|i| i.node.is_none())
        .filter(|i| state.apps.get(&i.app).is_some_and(|app| !app.suspended))
        .collect();
    if pending.is_empty() {
        return Vec::new();
    }
    pending.sort_by(|a, b| (&a.app, a.release, &a.group, &a.id).cmp(&(&b.app, b.release, &b.group, &b.id)));

    let nodes: Vec<&NodeRecord> = state.nodes.values().filter(|n| !unavailable.contains(&n.id)).collect();
    let reserved = state.reserved();
    let mut free: BTreeMap<NodeId, Resources> = nodes
        .iter()
        .map(|n| (n.id, n.resources.saturating_sub(reserved.get(&n.id).copied().unwrap_or_default())))
        .collect();
    let mut per_app: HashMap<(&str, NodeId), u32> = HashMap::new();
    for instance in state.instances.values() {
        if let Some(node) = instance.node {
            *per_app.entry((instance.app.as_str(), node)).or_default() += 1;
        }
    }

    let mut placements = Vec::with_capacity(pending.len());
    for instance in pending {
        let Some(need) = state.instance_resources(instance) else { continue };
        let Some(release) = state.apps.get(&instance.app).and_then(|a| a.releases.get(&instance.release)) else {
            continue;
        };
        let placement = &release.spec.placement;
        let constraints: Result<Vec<Constraint>, String> =
            placement.constraints.iter().map(|c| Constraint::parse(c)).collect();
        let decision = match constraints {
            Err(reason) => Err(format!("its placement constraint is invalid: {reason}")),
            Ok(constraints) => {
                let matching: Vec<&&NodeRecord> =
                    nodes.iter().filter(|n| constraints.iter().all(|c| c.holds(&n.labels))).collect();
                let under_max: Vec<&&NodeRecord> = matching
                    .iter()
                    .copied()
                    .filter(|n| {
                        placement
                            .max_per_node
                            .is_none_or(|max| per_app.get(&(instance.app.as_str(), n.id)).copied().unwrap_or(0) < max)
                    })
                    .collect();
                let best = under_max
                    .iter()
                    .filter(|n| need.fits_in(free[&n.id]))
                    .min_by_key(|n| {
                        let count = per_app.get(&(instance.app.as_str(), n.id)).copied().unwrap_or(0);
                        (count, std::cmp::Reverse(free[&n.id].memory_bytes), n.id)
                    })
                    .map(|n| n.id);
                match best {
                    Some(node) => Ok(node),
                    None => Err(unplaceable_reason(
                        state,
                        nodes.len(),
                        &placement.constraints,
                        matching.len(),
                        &under_max,
                        placement.max_per_node,
                        need,
                        &free,
                    )),
                }
            }
        };
        match decision {
            Ok(node) => {
                if let Some(f) = free.get_mut(&node) {
                    *f = f.saturating_sub(need);
                }
                *per_app.entry((instance.app.as_str(), node)).or_default() += 1;
                placements.push(Placement::Place { instance: instance.id.clone(), node });
            }
            // Proposing the same reason again would only grow the log.
            Err(reason) if instance.reason.as_deref() != Some(reason.as_str()) => {
                placements.push(Placement::Unplaceable { instance: instance.id.clone(), reason });
            }
            Err(_) => {}
        }
    }
    placements
}

#[allow(clippy::too_many_arguments)]
fn unplaceable_reason(
    state: &State,
    up: usize,
    constraints: &[String],
    matching: usize,
    under_max: &[&&NodeRecord],
    max_per_node: Option<u32>,
    need: Resources,
    free: &BTreeMap<NodeId, Resources>,
) -> String {
    if up == 0 {
        return "no node is up".into();
    }
    if matching == 0 {
        return format!(
            "no node that is up matches the constraints [{}] (see the labels in `roost node list`)",
            constraints.join(", ")
        );
    }
    if under_max.is_empty() {
        return format!(
            "every matching node already runs max_per_node = {} of its instances; add nodes or raise placement.max_per_node",
            max_per_node.unwrap_or(0)
        );
    }
    let name = |id: NodeId| state.nodes.get(&id).map_or_else(|| id.to_string(), |n| n.name.clone());
    let most_memory = under_max.iter().max_by_key(|n| (free[&n.id].memory_bytes, std::cmp::Reverse(n.id)));
    let most_cpu = under_max.iter().max_by_key(|n| (free[&n.id].cpu_millis, std::cmp::Reverse(n.id)));
    match (most_memory, most_cpu) {
        (Some(m), _) if need.memory_bytes > free[&m.id].memory_bytes => format!(
            "needs {} of memory; most free is {} on {}",
            format_bytes(need.memory_bytes),
            format_bytes(free[&m.id].memory_bytes),
            name(m.id)
        ),
        (_, Some(c)) if need.cpu_millis > free[&c.id].cpu_millis => format!(
            "needs {} CPU; most free is {} on {}",
            format_cpus(need.cpu_millis),
            format_cpus(free[&c.id].cpu_millis),
            name(c.id)
        ),
        _ => format!("needs {need}; no single node has both free"),
    }
}

#[cfg(test)]
mod tests;
