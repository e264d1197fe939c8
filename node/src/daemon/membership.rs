//! Automatic Raft membership: which nodes vote.
//!
//! Every node runs the same binary, so nobody chooses voters by hand. The
//! rule: the first three nodes vote (five once the cluster has five or more
//! nodes that may vote); the rest are learners. Workers (nodes that joined
//! with the worker token) are never promoted and do not count. The voter count stays odd: a second node
//! waits as a learner until a third arrives and both are promoted together,
//! because two voters tolerate no failure and stall if *either* fails. A voter that is removed, or has been down
//! longer than `promote_after`, is replaced by a healthy, caught-up learner
//! when there is one; without a replacement a down voter keeps its seat,
//! because shrinking the voter set would not make the cluster safer.
//!
//! [`plan`] is a pure function from a [`MembershipView`] to at most one
//! [`MembershipAction`]; [`run_controller`] carries actions out on the leader,
//! one at a time, again and again, so a crash mid-change is simply repaired by
//! the next pass.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::ChangeMembers;
use roost_deploy::secrets::SecretsKey;
use roost_raft::state::{NodeRole, RotatedJoinSecrets};
use roost_raft::{Command, Consensus, NodeId, RaftNode};
use tokio_util::sync::CancellationToken;

use super::liveness::{Liveness, Seen};

/// How many membership changes the controller makes in a row, each as soon
/// as the one before completes, before it waits for its tick again.
const MAX_IN_A_ROW: u32 = 4;

/// A learner this far behind the leader's log is not promoted yet.
const MAX_PROMOTION_LAG: u64 = 100;

#[derive(Clone, Debug, Default)]
pub struct MembershipView {
    pub leader: NodeId,
    /// Nodes the replicated state says belong to the cluster.
    pub wanted: BTreeMap<NodeId, RaftNode>,
    /// Raft's membership: every member, and which of them vote.
    pub members: BTreeMap<NodeId, RaftNode>,
    pub voters: BTreeSet<NodeId>,
    pub seen: BTreeMap<NodeId, Seen>,
    /// Members whose log is close to the leader's.
    pub caught_up: BTreeSet<NodeId>,
    /// Wanted nodes that joined as workers: never voters.
    pub workers: BTreeSet<NodeId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipAction {
    AddLearner(NodeId, RaftNode),
    SetVoters(BTreeSet<NodeId>),
    RemoveMembers(BTreeSet<NodeId>),
}

/// How many voters a cluster of `n` nodes should have: 1, 3 or 5.
pub fn voter_target(n: usize) -> usize {
    match n {
        0..=2 => 1,
        3 | 4 => 3,
        _ => 5,
    }
}

pub fn plan(view: &MembershipView, promote_after: Duration) -> Option<MembershipAction> {
    if let Some((id, node)) = view.wanted.iter().find(|(id, _)| !view.members.contains_key(id)) {
        return Some(MembershipAction::AddLearner(*id, node.clone()));
    }

    let up = |id: &NodeId| view.seen.get(id).is_some_and(|s| s.up) || *id == view.leader;
    let long_down =
        |id: &NodeId| *id != view.leader && view.seen.get(id).is_some_and(|s| !s.up && s.ago >= promote_after);
    let eligible = view.wanted.keys().filter(|id| !view.workers.contains(id));
    let target = voter_target(eligible.clone().count());

    let staying: Vec<NodeId> =
        view.voters.iter().copied().filter(|id| view.wanted.contains_key(id) && !view.workers.contains(id)).collect();
    let mut voters: BTreeSet<NodeId> = staying.iter().copied().filter(|id| !long_down(id)).collect();
    let candidates = eligible.filter(|id| !view.voters.contains(id) && up(id) && view.caught_up.contains(id));
    for id in candidates {
        if voters.len() >= target {
            break;
        }
        voters.insert(*id);
    }
    // Keep down voters rather than shrink below the target.
    for id in staying.iter().filter(|id| long_down(id)) {
        if voters.len() >= target {
            break;
        }
        voters.insert(*id);
    }
    // An even count tolerates no more failures than the odd count below it,
    // and two voters stall if either fails: hold back the newest candidate.
    if voters.len().is_multiple_of(2) {
        let newest = voters.iter().rev().copied().find(|id| !view.voters.contains(id));
        if let Some(id) = newest {
            voters.remove(&id);
        }
    }
    // Too many voters (nodes were removed): drop down ones first, then the
    // newest, never the leader.
    while voters.len() > target {
        let drop = voters.iter().copied().filter(|id| *id != view.leader).max_by_key(|id| (!up(id), *id));
        match drop {
            Some(id) => voters.remove(&id),
            None => break,
        };
    }
    if !voters.is_empty() && voters != view.voters {
        return Some(MembershipAction::SetVoters(voters));
    }

    let gone: BTreeSet<NodeId> =
        view.members.keys().copied().filter(|id| !view.wanted.contains_key(id) && !view.voters.contains(id)).collect();
    if !gone.is_empty() {
        return Some(MembershipAction::RemoveMembers(gone));
    }
    None
}

/// On the leader, compares Raft's membership with the state every `every`
/// and carries out what [`plan`] says.
/// `key` (the secrets key, which a voter holds) seals the new join secrets
/// after a removal.
pub async fn run_controller(
    consensus: Arc<Consensus>,
    liveness: Arc<Liveness>,
    every: Duration,
    key: Option<Arc<SecretsKey>>,
    shutdown: CancellationToken,
) {
    let promote_after = liveness.config().promote_after;
    // State changes are followed as the other reconcilers follow them: a
    // pass per burst (`Pace`), and the node set read only when an entry
    // that may change it was applied (`read_if_moved`).
    let mut changes = consensus.state().workload_changes();
    let pace = roost_raft::store::Pace::default();
    let mut revision = None;
    let node_ids = |s: &roost_raft::State| s.nodes.keys().copied().collect::<Vec<NodeId>>();
    let mut known = consensus.state().read_if_moved(&mut revision, node_ids).unwrap_or_default();
    // Changes made in a row without waiting for the tick: a node that joins
    // becomes a learner at once, and so does the next one.
    let mut in_a_row = 0;
    let mut again = false;
    loop {
        if std::mem::take(&mut again) && in_a_row < MAX_IN_A_ROW {
            in_a_row += 1;
        } else {
            in_a_row = 0;
            let tick = tokio::time::sleep(every);
            tokio::pin!(tick);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = &mut tick => break,
                    changed = pace.settled(&mut changes) => {
                        if changed.is_err() {
                            return;
                        }
                        // A node joined or left: look now.
                        match consensus.state().read_if_moved(&mut revision, node_ids) {
                            Some(now) if now != known => {
                                known = now;
                                break;
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        let Some(view) = observe(&consensus, &liveness) else { continue };
        // Whatever else membership is doing: until the rotation, no join
        // token admits anyone.
        if let Some(key) = &key {
            let due = consensus.state().read(super::join::rotation_due);
            if due && no_removed_member(&view) {
                rotate_join_secrets(&consensus, key).await;
            }
        }
        let Some(action) = plan(&view, promote_after) else { continue };
        tracing::info!(?action, "changing Raft membership");
        let raft = consensus.raft();
        let result = match action.clone() {
            MembershipAction::AddLearner(id, node) => raft.add_learner(id, node, false).await.map(|_| ()),
            MembershipAction::SetVoters(voters) => {
                raft.change_membership(ChangeMembers::ReplaceAllVoters(voters), true).await.map(|_| ())
            }
            MembershipAction::RemoveMembers(ids) => {
                raft.change_membership(ChangeMembers::RemoveNodes(ids), false).await.map(|_| ())
            }
        };
        match result {
            Ok(()) => again = true,
            Err(error) => tracing::warn!(?action, %error, "membership change did not complete; will retry"),
        }
    }
}

/// Replaces both join secrets after a removal (`ClusterInfo::join_rotation_due`)
/// once Raft's membership holds no node the state does not: a removed node
/// then receives no entry, so never the new secrets, though it may hold the
/// secrets key that seals them. Until then no join token admits anyone
/// (`join::rotation_due`); the wait is a membership change or two, seconds.
async fn rotate_join_secrets(consensus: &Consensus, key: &SecretsKey) {
    let seal = |role| {
        let secret = roost_network::token::random_secret();
        super::keys::seal_join_secret(key, role, &secret)
    };
    let rotate = match (seal(NodeRole::Voter), seal(NodeRole::Worker)) {
        (Ok(voter), Ok(worker)) => RotatedJoinSecrets { voter, worker },
        (Err(error), _) | (_, Err(error)) => {
            tracing::error!(%error, "cannot seal new join secrets");
            return;
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    match consensus.propose_as_leader(Command::RotateJoinSecrets { rotate }, deadline).await {
        Ok(_) => tracing::info!("join secrets rotated: the removed node's tokens admit no one"),
        Err(error) => tracing::warn!(%error, "could not rotate the join secrets; will retry"),
    }
}

/// Whether Raft's membership (voters and learners) holds only nodes the
/// state still has: then no removed node receives another entry.
fn no_removed_member(view: &MembershipView) -> bool {
    view.members.keys().all(|id| view.wanted.contains_key(id))
}

fn observe(consensus: &Consensus, liveness: &Liveness) -> Option<MembershipView> {
    let metrics = consensus.raft().metrics().borrow().clone();
    if metrics.state != openraft::ServerState::Leader {
        return None;
    }
    let membership = metrics.membership_config.membership();
    // A joint configuration is still settling; look again next pass.
    if membership.get_joint_config().len() > 1 {
        return None;
    }
    let last = metrics.last_log_index.unwrap_or(0);
    let caught_up = metrics
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .filter(|(_, matched)| matched.is_some_and(|m| m.index + MAX_PROMOTION_LAG >= last))
                .map(|(id, _)| *id)
                .collect()
        })
        .unwrap_or_default();
    let (wanted, workers, nodes) = consensus.state().read(|s| {
        let wanted: BTreeMap<NodeId, RaftNode> =
            s.nodes.values().map(|n| (n.id, RaftNode { name: n.name.clone(), address: n.address.clone() })).collect();
        (wanted, s.workers(), super::liveness::members(s))
    });
    let seen = liveness.view(metrics.current_term, nodes, tokio::time::Instant::now());
    Some(MembershipView {
        leader: metrics.id,
        members: membership.nodes().map(|(id, n)| (*id, n.clone())).collect(),
        voters: membership.voter_ids().collect(),
        wanted,
        seen,
        caught_up,
        workers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(30);

    fn node(id: NodeId) -> RaftNode {
        RaftNode { name: format!("n{id}"), address: format!("n{id}:1") }
    }

    fn up() -> Seen {
        Seen { up: true, ago: Duration::ZERO, starting: false }
    }

    fn down_for(secs: u64) -> Seen {
        Seen { up: false, ago: Duration::from_secs(secs), starting: false }
    }

    /// A view where nodes `wanted` are all members, `voters` vote, all are up
    /// and caught up.
    fn view(wanted: &[NodeId], voters: &[NodeId]) -> MembershipView {
        MembershipView {
            leader: 1,
            wanted: wanted.iter().map(|id| (*id, node(*id))).collect(),
            members: wanted.iter().map(|id| (*id, node(*id))).collect(),
            voters: voters.iter().copied().collect(),
            seen: wanted.iter().map(|id| (*id, up())).collect(),
            caught_up: wanted.iter().copied().collect(),
            workers: BTreeSet::new(),
        }
    }

    #[test]
    fn workers_are_never_promoted_and_do_not_count_towards_the_target() {
        // Nodes 2 and 3 are workers: two nodes may vote, so one voter.
        let mut v = view(&[1, 2, 3, 4], &[1]);
        v.workers = set(&[2, 3]);
        assert_eq!(plan(&v, AFTER), None);
        // A fifth node that may vote: three may, so three voters, never 2 or 3.
        v = view(&[1, 2, 3, 4, 5], &[1]);
        v.workers = set(&[2, 3]);
        assert_eq!(plan(&v, AFTER), Some(MembershipAction::SetVoters(set(&[1, 4, 5]))));
        // A worker found voting (it should never be) is replaced.
        v = view(&[1, 2, 3, 4, 5], &[1, 2, 4]);
        v.workers = set(&[2, 3]);
        assert_eq!(plan(&v, AFTER), Some(MembershipAction::SetVoters(set(&[1, 4, 5]))));
    }

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn targets_three_voters_then_five() {
        assert_eq!((1..=8).map(voter_target).collect::<Vec<_>>(), [1, 1, 3, 3, 5, 5, 5, 5]);
    }

    #[test]
    fn a_new_node_first_becomes_a_learner() {
        let mut v = view(&[1, 2], &[1]);
        v.members.remove(&2);
        assert_eq!(plan(&v, AFTER), Some(MembershipAction::AddLearner(2, node(2))));
    }

    #[test]
    fn the_first_three_nodes_vote_and_the_second_waits_for_the_third() {
        assert_eq!(plan(&view(&[1, 2], &[1]), AFTER), None);
        assert_eq!(plan(&view(&[1, 2, 3], &[1]), AFTER), Some(MembershipAction::SetVoters(set(&[1, 2, 3]))));
        assert_eq!(plan(&view(&[1, 2, 3, 4], &[1, 2, 3]), AFTER), None);
    }

    #[test]
    fn five_nodes_make_five_voters() {
        assert_eq!(
            plan(&view(&[1, 2, 3, 4, 5], &[1, 2, 3]), AFTER),
            Some(MembershipAction::SetVoters(set(&[1, 2, 3, 4, 5])))
        );
    }

    #[test]
    fn a_lagging_learner_waits() {
        let mut v = view(&[1, 2, 3], &[1, 2]);
        v.caught_up.remove(&3);
        assert_eq!(plan(&v, AFTER), None);
    }

    #[test]
    fn voters_are_never_promoted_to_an_even_count() {
        // Three nodes, one lagging: promoting only n2 would make two voters.
        let mut v = view(&[1, 2, 3], &[1]);
        v.caught_up.remove(&3);
        assert_eq!(plan(&v, AFTER), None);
        // Five wanted, four eligible: stay at three.
        let mut v = view(&[1, 2, 3, 4, 5], &[1, 2, 3]);
        v.seen.insert(5, down_for(1));
        assert_eq!(plan(&v, AFTER), None);
    }

    #[test]
    fn a_long_down_voter_is_replaced_by_a_healthy_learner() {
        let mut v = view(&[1, 2, 3, 4], &[1, 2, 3]);
        v.seen.insert(3, down_for(31));
        assert_eq!(plan(&v, AFTER), Some(MembershipAction::SetVoters(set(&[1, 2, 4]))));
    }

    #[test]
    fn a_briefly_down_voter_keeps_its_seat() {
        let mut v = view(&[1, 2, 3, 4], &[1, 2, 3]);
        v.seen.insert(3, down_for(5));
        assert_eq!(plan(&v, AFTER), None);
    }

    #[test]
    fn without_a_replacement_a_down_voter_stays() {
        let mut v = view(&[1, 2, 3], &[1, 2, 3]);
        v.seen.insert(3, down_for(300));
        assert_eq!(plan(&v, AFTER), None);
    }

    #[test]
    fn a_removed_voter_is_replaced_then_dropped() {
        let mut v = view(&[1, 2, 3, 4], &[1, 2, 3]);
        v.wanted.remove(&2);
        assert_eq!(plan(&v, AFTER), Some(MembershipAction::SetVoters(set(&[1, 3, 4]))));
        v.voters = set(&[1, 3, 4]);
        assert_eq!(plan(&v, AFTER), Some(MembershipAction::RemoveMembers(set(&[2]))));
    }

    #[test]
    fn join_secrets_rotate_only_once_no_removed_node_is_a_voter_or_learner() {
        // n3 removed from the state, still a voter, then a learner, then gone.
        let mut v = view(&[1, 2, 4], &[1, 2, 3]);
        v.members = [1, 2, 3, 4].into_iter().map(|id| (id, node(id))).collect();
        assert!(!no_removed_member(&v), "a removed voter still receives entries");
        v.voters = set(&[1, 2, 4]);
        assert!(!no_removed_member(&v), "a removed learner still receives entries");
        v.members.remove(&3);
        assert!(no_removed_member(&v));
    }

    #[test]
    fn shrinking_drops_down_voters_before_healthy_ones_and_never_the_leader() {
        // Five voters, one node removed: four nodes want three voters.
        let mut v = view(&[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5]);
        v.wanted.remove(&5);
        v.seen.insert(2, down_for(1));
        assert_eq!(plan(&v, AFTER), Some(MembershipAction::SetVoters(set(&[1, 3, 4]))));
        v.seen.insert(1, down_for(100));
        v.seen.insert(2, up());
        assert_eq!(plan(&v, AFTER), Some(MembershipAction::SetVoters(set(&[1, 2, 3]))));
    }
}
