//! Placing instances on nodes: a pure function of the replicated state.
//!
//! [`schedule`] looks at the instances waiting for a node and returns
//! [`Placement`]s, which the leader proposes as one `Command::Place`. It
//! emits only decisions that fit: a node that is up, whose labels meet the
//! release's constraints, that runs fewer than `max_per_node` of the
//! release's instances, and whose free CPU and memory (what it offers minus
//! what placed instances reserve) hold the instance. (Apply checks the
//! room, the constraints and `max_per_node` again, against the state it
//! applies to, and refuses a placement that no longer holds them.) Among
//! those it spreads: fewest instances of the same release first, then the
//! smallest share of memory already reserved, then most free memory. The
//! share is of what a node declares, but of at most twice the median voter's
//! memory ([`MEMORY_SHARE_CAP`]): nodes declare their own resources at join,
//! and one that overstated them would otherwise win every tie, and with it
//! the first instance (and its secrets) of every app without a constraint.
//! So honest nodes of different sizes fill in proportion to their memory,
//! and a node that claims more than twice the median fills as if it had
//! twice the median: at most about twice an average node's share of such
//! instances, however much it claims (and, while it is emptier than the
//! rest, until it catches up). An instance that fits nowhere gets a reason
//! that says what would let it ("needs 512 MiB; most free is 256 MiB on n2").

use std::collections::{BTreeSet, HashMap};

use roost_raft::state::{NodeRecord, NodeRole, State};
use roost_raft::workload::{format_bytes, format_cpus, Instance, MaxUnavailable, Placement, Resources, Strategy};
use roost_raft::NodeId;

use crate::config::Constraint;

/// Decides a node for every instance without one. `unavailable` nodes (down,
/// or not yet heard from) get nothing.
///
/// Instances are taken in runs of the same app, release and group, which
/// share their size and constraints: the nodes that meet the constraints are
/// found once per run, and each instance then scans only those, over dense
/// arrays of free resources and per-app counts.
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
    let slot: HashMap<NodeId, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
    let reserved = state.reserved();
    let mut free: Vec<Resources> =
        nodes.iter().map(|n| n.resources.saturating_sub(reserved.get(&n.id).copied().unwrap_or_default())).collect();
    // Instances of each release per node slot, counted only for releases
    // with pending instances. Per release, not per app: during a deploy the
    // old release's instances are on their way out, and counting them would
    // make `max_per_node = 1` with one instance per node undeployable.
    let mut per_release: HashMap<(&str, u64), Vec<u32>> = HashMap::new();
    for instance in pending.iter() {
        per_release.entry((instance.app.as_str(), instance.release)).or_insert_with(|| vec![0; nodes.len()]);
    }
    for instance in state.instances.values() {
        let key = (instance.app.as_str(), instance.release);
        if let (Some(node), Some(counts)) = (instance.node, per_release.get_mut(&key)) {
            if let Some(&i) = slot.get(&node) {
                counts[i] += 1;
            }
        }
    }

    let share_of = memory_share_bases(&nodes);
    // The share of each node's memory reserved, in millionths of its base.
    let share = |i: usize, free: &[Resources]| -> u64 {
        let reserved = nodes[i].resources.memory_bytes.saturating_sub(free[i].memory_bytes);
        match share_of[i] {
            0 => u64::MAX,
            base => (u128::from(reserved) * 1_000_000 / u128::from(base)).min(u128::from(u64::MAX)) as u64,
        }
    };

    let mut budget = rollout_budgets(state);
    let mut placements = Vec::with_capacity(pending.len());
    for run in pending.chunk_by(|a, b| (&a.app, a.release, &a.group) == (&b.app, b.release, &b.group)) {
        let first = run[0];
        let (Some(need), Some(release)) =
            (state.instance_resources(first), state.apps.get(&first.app).and_then(|a| a.releases.get(&first.release)))
        else {
            continue;
        };
        let placement = &release.spec.placement;
        let constraints: Result<Vec<Constraint>, String> =
            placement.constraints.iter().map(|c| Constraint::parse(c)).collect();
        let candidates: Result<Vec<usize>, String> = constraints
            .map(|constraints| {
                (0..nodes.len()).filter(|&i| constraints.iter().all(|c| c.holds(&nodes[i].labels))).collect()
            })
            .map_err(|reason| format!("its placement constraint is invalid: {reason}"));
        let Some(counts) = per_release.get_mut(&(first.app.as_str(), first.release)) else { continue };
        let mut budget = budget.get_mut(&(first.app.as_str(), first.release));
        for instance in run {
            // A rolling deploy starts only so many new instances at a time;
            // the rest wait, without a reason, for their turn.
            if budget.as_deref() == Some(&0) {
                continue;
            }
            let decision = match &candidates {
                Err(reason) => Err(reason.clone()),
                Ok(candidates) => {
                    let under_max = |i: &usize| placement.max_per_node.is_none_or(|max| counts[*i] < max);
                    let best =
                        candidates.iter().filter(|i| under_max(i) && need.fits_in(free[**i])).min_by_key(|&&i| {
                            (counts[i], share(i, &free), std::cmp::Reverse(free[i].memory_bytes), nodes[i].id)
                        });
                    match best {
                        Some(&i) => Ok(i),
                        None => {
                            let open: Vec<&NodeRecord> =
                                candidates.iter().filter(|i| under_max(i)).map(|&i| nodes[i]).collect();
                            let free_of = |id: NodeId| slot.get(&id).map_or_else(Resources::default, |&i| free[i]);
                            Err(unplaceable_reason(
                                state,
                                nodes.len(),
                                &placement.constraints,
                                candidates.len(),
                                &open,
                                placement.max_per_node,
                                need,
                                free_of,
                            ))
                        }
                    }
                }
            };
            match decision {
                Ok(i) => {
                    free[i] = free[i].saturating_sub(need);
                    counts[i] += 1;
                    if let Some(left) = budget.as_deref_mut() {
                        *left -= 1;
                    }
                    placements.push(Placement::Place { instance: instance.id.clone(), node: nodes[i].id });
                }
                // Proposing the same reason again would only grow the log.
                Err(reason) if instance.reason.as_deref() != Some(reason.as_str()) => {
                    placements.push(Placement::Unplaceable { instance: instance.id.clone(), reason });
                }
                Err(_) => {}
            }
        }
    }
    placements
}

/// For each release being deployed a few instances at a time over one that
/// serves (`rolling`, and `canary` until its first instance is ready), how
/// many more of its instances may be placed now.
fn rollout_budgets(state: &State) -> HashMap<(&str, u64), usize> {
    let mut budgets = HashMap::new();
    for app in state.apps.values() {
        // A first release has nothing serving to keep: all of it starts.
        let (Some(release), Some(_)) = (app.deploying(), app.current()) else { continue };
        let new: Vec<&Instance> =
            state.instances.values().filter(|i| i.app == app.name && i.release == release.version).collect();
        let ready = new.iter().filter(|i| i.ready(release.spec.groups.get(&i.group))).count();
        let in_flight = new.iter().filter(|i| i.node.is_some() && !i.ready(release.spec.groups.get(&i.group))).count();
        let limit = match release.spec.strategy {
            Strategy::Rolling => Some(release.spec.max_unavailable.unwrap_or(MaxUnavailable::DEFAULT).wave(new.len())),
            Strategy::Canary if ready == 0 => Some(1),
            _ => None,
        };
        if let Some(limit) = limit {
            budgets.insert((app.name.as_str(), release.version), limit.saturating_sub(in_flight));
        }
    }
    budgets
}

/// The most memory a node counts as when the scheduler compares how full
/// nodes are, as a multiple of the median node's.
pub const MEMORY_SHARE_CAP: u64 = 2;

/// What each node's reserved memory is a share of: what it declares, but at
/// most [`MEMORY_SHARE_CAP`] times the median of what the voters declare
/// (of every node's, if none of these is a voter): anyone with the worker
/// token can join workers, so workers do not get to move the median.
fn memory_share_bases(nodes: &[&NodeRecord]) -> Vec<u64> {
    let voters: Vec<&&NodeRecord> = nodes.iter().filter(|n| n.role != NodeRole::Worker).collect();
    let reference: Vec<&&NodeRecord> = if voters.is_empty() { nodes.iter().collect() } else { voters };
    let mut declared: Vec<u64> = reference.iter().map(|n| n.resources.memory_bytes).collect();
    declared.sort_unstable();
    let median = declared.get(declared.len().saturating_sub(1) / 2).copied().unwrap_or(0);
    nodes.iter().map(|n| n.resources.memory_bytes.min(median.saturating_mul(MEMORY_SHARE_CAP))).collect()
}

#[allow(clippy::too_many_arguments)]
fn unplaceable_reason(
    state: &State,
    up: usize,
    constraints: &[String],
    matching: usize,
    open: &[&NodeRecord],
    max_per_node: Option<u32>,
    need: Resources,
    free: impl Fn(NodeId) -> Resources,
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
    if open.is_empty() {
        return format!(
            "every matching node already runs max_per_node = {} of its instances; add nodes or raise placement.max_per_node",
            max_per_node.unwrap_or(0)
        );
    }
    let name = |id: NodeId| state.nodes.get(&id).map_or_else(|| id.to_string(), |n| n.name.clone());
    let most_memory = open.iter().max_by_key(|n| (free(n.id).memory_bytes, std::cmp::Reverse(n.id)));
    let most_cpu = open.iter().max_by_key(|n| (free(n.id).cpu_millis, std::cmp::Reverse(n.id)));
    match (most_memory, most_cpu) {
        (Some(m), _) if need.memory_bytes > free(m.id).memory_bytes => format!(
            "needs {} of memory; most free is {} on {}",
            format_bytes(need.memory_bytes),
            format_bytes(free(m.id).memory_bytes),
            name(m.id)
        ),
        (_, Some(c)) if need.cpu_millis > free(c.id).cpu_millis => format!(
            "needs {} CPU; most free is {} on {}",
            format_cpus(need.cpu_millis),
            format_cpus(free(c.id).cpu_millis),
            name(c.id)
        ),
        _ => format!("needs {need}; no single node has both free"),
    }
}

#[cfg(test)]
mod tests;
