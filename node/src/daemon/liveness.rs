//! Failure detection: every node reports to the leader, the leader remembers
//! when it last heard from each, in memory only.
//!
//! Heartbeats never touch the Raft log: a beat is an RPC and a map update. A
//! node is `down` once the leader has not heard from it for `down_after`.
//! A new leader has heard from nobody yet, so it counts from the moment it
//! took over (its first look in its term, whichever task looks first)
//! rather than declaring everyone down at once; a node that joined
//! after that is not up until it has been heard (its first heartbeat comes
//! once it has caught up with the cluster and can serve).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_network::tls::PeerIdentity;
use roost_proto::cluster::peer_client::PeerClient;
use roost_proto::cluster::peer_server;
use roost_proto::cluster::{
    HeartbeatRequest, HeartbeatResponse, LivenessRequest, LivenessResponse, MeshStatusRequest, MeshStatusResponse,
    NodeLiveness,
};
use roost_raft::consensus::now_millis;
use roost_raft::service::not_leader;
use roost_raft::state::{NodeRecord, UnixMillis};
use roost_raft::{Consensus, NodeId, State};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::channels::NodeChannels;
use super::clock::ClusterClock;

#[derive(Clone, Debug)]
pub struct LivenessConfig {
    /// How often each node reports to the leader.
    pub heartbeat_every: Duration,
    /// Silence after which the leader considers a node down.
    pub down_after: Duration,
    /// How long a voter may stay down before a healthy learner replaces it.
    pub promote_after: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        Self {
            heartbeat_every: Duration::from_millis(500),
            down_after: Duration::from_secs(3),
            promote_after: Duration::from_secs(30),
        }
    }
}

/// What the leader knows of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub up: bool,
    /// Since the leader last heard from it (or took over, or first saw it);
    /// `Duration::MAX` when none of those is known (only ever in an answer
    /// from a leader of an older version).
    pub ago: Duration,
    /// It joined after this leader took over (for no longer than
    /// [`STARTING_AT_MOST`]), or less than that before (for no longer than
    /// the grace, `down_after`), and has not reported to this leader yet (a
    /// node reports once it has caught up with the cluster). Not up.
    pub starting: bool,
}

/// How long a node that joined and has never reported is `starting`
/// before it is `down`.
pub const STARTING_AT_MOST: Duration = Duration::from_secs(60);

/// A node as a look sees it: its id, and when it joined the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: NodeId,
    /// The state's `joined_at`: the wall clock of the node that took the
    /// join, when it proposed it.
    pub joined_at: UnixMillis,
}

impl From<&NodeRecord> for Member {
    fn from(node: &NodeRecord) -> Member {
        Member { id: node.id, joined_at: node.joined_at }
    }
}

/// The state's nodes, as a look takes them.
pub fn members(state: &State) -> Vec<Member> {
    state.nodes.values().map(Member::from).collect()
}

#[derive(Debug)]
pub struct Liveness {
    config: LivenessConfig,
    self_id: NodeId,
    inner: Mutex<Heard>,
}

#[derive(Debug, Default)]
struct Heard {
    last: HashMap<NodeId, Instant>,
    /// The term this node last led in, and since when by its own clock.
    leading: Option<(u64, Instant)>,
    /// The nodes this leader has seen in its state, and since when; whether
    /// each was there when it took over (those of its first look are) or
    /// joined since. This leader's own monotonic clock, but for whether a
    /// node of its first look joined recently, which compares the state's
    /// wall-clock `joined_at` with its own wall clock.
    appeared: HashMap<NodeId, (Instant, Arrival)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arrival {
    /// There when this node took over, and joined the cluster long ago.
    AtTakeover,
    /// There when this node took over, but joined the cluster less than
    /// [`STARTING_AT_MOST`] ago: the leader before may never have heard
    /// from it either.
    RecentAtTakeover,
    /// Joined since this node took over.
    Since,
}

impl Arrival {
    /// How long a node that arrived so is `starting` until it is heard
    /// (then `down`): not at all for one covered by the grace.
    fn starting_for(self, down_after: Duration) -> Duration {
        match self {
            Arrival::AtTakeover => Duration::ZERO,
            Arrival::RecentAtTakeover => down_after,
            Arrival::Since => STARTING_AT_MOST,
        }
    }
}

impl Liveness {
    pub fn new(config: LivenessConfig, self_id: NodeId) -> Self {
        Self { config, self_id, inner: Mutex::new(Heard::default()) }
    }

    pub fn config(&self) -> &LivenessConfig {
        &self.config
    }

    fn heard(&self) -> std::sync::MutexGuard<'_, Heard> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record(&self, id: NodeId, now: Instant) {
        self.heard().last.insert(id, now);
    }

    /// The view of `nodes` (the state's, [`members`]) at `now` of this
    /// node, which leads in `term` ([`Consensus::leading_term`]). A new term
    /// is a new leadership, whichever look sees it first: silence counts
    /// from when it took over, for the nodes that were there then (a new
    /// leader has heard from nobody yet), and a node that joined since is
    /// `starting` until it is first heard. A node of the first look that
    /// joined the cluster less than [`STARTING_AT_MOST`] ago is `starting`,
    /// not covered by the grace, for the grace (`down_after`) and then
    /// `down` until it is heard: the leader before may never have heard
    /// from it either, and a dead one is shown down as soon as any other.
    pub fn view(
        &self,
        term: u64,
        nodes: impl IntoIterator<Item = impl Into<Member>>,
        now: Instant,
    ) -> BTreeMap<NodeId, Seen> {
        let mut heard = self.heard();
        let heard = &mut *heard;
        let since = match heard.leading {
            // A look with an older term (its caller read it just before
            // this node led again) changes nothing.
            Some((led, since)) if led >= term => since,
            _ => {
                heard.leading = Some((term, now));
                heard.appeared.clear();
                now
            }
        };
        let first_look = heard.appeared.is_empty();
        let wall_now = now_millis();
        nodes
            .into_iter()
            .map(|member| {
                let Member { id, joined_at } = member.into();
                // Every node is recorded, this one too, so that a look with
                // this node alone is the first look.
                let appeared = *heard.appeared.entry(id).or_insert_with(|| {
                    // A join stamped ahead of this clock is taken as just made.
                    let joined_ago =
                        Duration::from_millis(u64::try_from(wall_now.saturating_sub(joined_at)).unwrap_or(0));
                    match first_look {
                        true if joined_ago < STARTING_AT_MOST => (since, Arrival::RecentAtTakeover),
                        true => (since, Arrival::AtTakeover),
                        false => (now, Arrival::Since),
                    }
                });
                if id == self.self_id {
                    return (id, Seen { up: true, ago: Duration::ZERO, starting: false });
                }
                let last = heard.last.get(&id).copied();
                let since_appeared = |at: Instant| now.saturating_duration_since(at);
                let seen = match (last, appeared) {
                    (None, (at, arrival)) if since_appeared(at) < arrival.starting_for(self.config.down_after) => {
                        Seen { up: false, ago: since_appeared(at), starting: true }
                    }
                    (last, (at, _)) => {
                        let ago = since_appeared(last.map_or(at, |t| t.max(at)));
                        Seen { up: ago < self.config.down_after, ago, starting: false }
                    }
                };
                (id, seen)
            })
            .collect()
    }
}

/// The Peer service: heartbeats in, liveness out. Leader only.
pub struct PeerService {
    pub consensus: Arc<Consensus>,
    pub liveness: Arc<Liveness>,
    pub plane: super::mesh::SharedPlane,
}

#[tonic::async_trait]
impl peer_server::Peer for PeerService {
    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        if !self.consensus.is_leader() {
            return Err(not_leader());
        }
        // The certificate says who is beating, not the request's claim.
        let fingerprint = request.extensions().get::<PeerIdentity>().and_then(|p| p.node_fingerprint.clone());
        let id = fingerprint.and_then(|fp| self.consensus.state().read(|s| s.node_by_fingerprint(&fp).map(|n| n.id)));
        let Some(id) = id else {
            return Err(Status::permission_denied(super::auth::REVOKED));
        };
        self.liveness.record(id, Instant::now());
        Ok(Response::new(HeartbeatResponse { leader_time_ms: now_millis() }))
    }

    async fn liveness(&self, _request: Request<LivenessRequest>) -> Result<Response<LivenessResponse>, Status> {
        let Some(term) = self.consensus.leading_term() else {
            return Err(not_leader());
        };
        let nodes = self
            .liveness
            .view(term, self.consensus.state().read(members), Instant::now())
            .into_iter()
            .map(|(node_id, seen)| NodeLiveness {
                node_id,
                up: seen.up,
                last_seen_ms_ago: seen.ago.as_millis().min(u64::MAX as u128) as u64,
                starting: seen.starting,
            })
            .collect();
        Ok(Response::new(LivenessResponse { nodes, leader_id: self.consensus.id() }))
    }

    async fn mesh_status(&self, _request: Request<MeshStatusRequest>) -> Result<Response<MeshStatusResponse>, Status> {
        super::mesh::status(&self.plane).await.map(Response::new)
    }
}

/// Why the heartbeat loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeartbeatEnd {
    Shutdown,
    /// The leader refused our certificate: we were removed.
    Revoked,
}

/// Reports to the leader every `heartbeat_every` until shutdown, keeps
/// `clock` told the leader's time, and logs what a person
/// running the cluster wants to know: who leads, and (on the leader) which
/// nodes went down or came back.
pub async fn send_heartbeats(
    consensus: Arc<Consensus>,
    liveness: Arc<Liveness>,
    channels: Arc<NodeChannels>,
    clock: Arc<ClusterClock>,
    shutdown: CancellationToken,
) -> HeartbeatEnd {
    let every = liveness.config().heartbeat_every;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = ClusterEvents::default();
    let mut refusals = Refusals::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return HeartbeatEnd::Shutdown,
            _ = ticker.tick() => {}
        }
        let leader = consensus.leader();
        let leading_term = consensus.leading_term().filter(|_| matches!(leader, Some((id, _)) if id == consensus.id()));
        events.observe(
            &consensus,
            &liveness,
            leader.as_ref().map(|(id, node)| (*id, node.name.as_str())),
            leading_term,
        );
        let Some((leader_id, leader)) = leader else { continue };
        // A node is shown up only once it can serve: it must know the
        // cluster (to check tokens) and itself.
        if leader_id == consensus.id() {
            clock.leading();
            continue;
        }
        if !super::caught_up(&consensus) {
            continue;
        }
        let Ok(channel) = channels.get(&leader.address) else { continue };
        let mut request = Request::new(HeartbeatRequest { node_id: consensus.id() });
        request.set_timeout(every.max(Duration::from_millis(500)));
        let sent = now_millis();
        match PeerClient::new(channel).heartbeat(request).await {
            Ok(answer) => {
                refusals.accepted();
                clock.observe(sent, now_millis(), answer.into_inner().leader_time_ms);
            }
            Err(status) if status.code() == tonic::Code::PermissionDenied => {
                if refusals.refused(Instant::now()) {
                    return HeartbeatEnd::Revoked;
                }
                tracing::debug!(leader = %leader, status = %status.message(), "heartbeat refused");
            }
            Err(status) => tracing::debug!(leader = %leader, status = %status.message(), "heartbeat not delivered"),
        }
    }
}

/// How long the leader must refuse this node's certificate, with no
/// heartbeat taken in between, before the node takes it as its removal. A
/// leader just elected may not have applied yet the entry that added this
/// node or its new certificate (it applies the previous term's entries once
/// an entry of its own commits); a removed node's certificates are refused
/// for good.
pub const REFUSED_FOR_REMOVAL: Duration = Duration::from_secs(5);

/// Since when the leader has refused this node's heartbeats.
#[derive(Debug, Default)]
struct Refusals {
    since: Option<Instant>,
}

impl Refusals {
    /// Notes a refusal; whether the refusals have lasted
    /// [`REFUSED_FOR_REMOVAL`].
    fn refused(&mut self, now: Instant) -> bool {
        let since = *self.since.get_or_insert(now);
        now.saturating_duration_since(since) >= REFUSED_FOR_REMOVAL
    }

    fn accepted(&mut self) {
        self.since = None;
    }
}

/// Remembers what was last logged, so each change is logged once.
#[derive(Default)]
struct ClusterEvents {
    leader: Option<NodeId>,
    down: BTreeMap<NodeId, String>,
}

impl ClusterEvents {
    fn observe(
        &mut self,
        consensus: &Consensus,
        liveness: &Liveness,
        leader: Option<(NodeId, &str)>,
        leading_term: Option<u64>,
    ) {
        let leader_id = leader.map(|(id, _)| id);
        if leader_id != self.leader {
            match leader {
                Some(_) if leading_term.is_some() => tracing::info!("this node is now the leader"),
                Some((_, name)) => tracing::info!(leader = %name, "following a new leader"),
                None => tracing::warn!("no leader: waiting for an election"),
            }
            self.leader = leader_id;
            self.down.clear();
        }
        let Some(term) = leading_term else {
            return;
        };
        let (names, nodes): (BTreeMap<NodeId, String>, Vec<Member>) =
            consensus.state().read(|s| (s.nodes.values().map(|n| (n.id, n.name.clone())).collect(), members(s)));
        let seen = liveness.view(term, nodes, Instant::now());
        for (id, name) in names {
            // A node that joined and has not reported yet is starting, not down.
            let up = seen.get(&id).is_some_and(|s| s.up || s.starting);
            match (up, self.down.contains_key(&id)) {
                (false, false) => {
                    tracing::warn!(node = %name, "node is down: no heartbeat for {:?}", liveness.config().down_after);
                    self.down.insert(id, name);
                }
                (true, true) => {
                    tracing::info!(node = %name, "node is up again");
                    self.down.remove(&id);
                }
                _ => {}
            }
        }
    }
}

/// Asks the leader who is up. `None` when no leader answers.
pub async fn cluster_liveness(
    consensus: &Consensus,
    liveness: &Liveness,
    channels: &NodeChannels,
) -> Option<BTreeMap<NodeId, Seen>> {
    let (leader_id, leader) = consensus.leader()?;
    if let Some(term) = consensus.leading_term().filter(|_| leader_id == consensus.id()) {
        return Some(liveness.view(term, consensus.state().read(members), Instant::now()));
    }
    let channel = channels.get(&leader.address).ok()?;
    let mut request = Request::new(LivenessRequest {});
    request.set_timeout(Duration::from_secs(2));
    let reply = PeerClient::new(channel).liveness(request).await.ok()?.into_inner();
    Some(
        reply
            .nodes
            .into_iter()
            .map(|n| {
                let ago = match n.last_seen_ms_ago {
                    u64::MAX => Duration::MAX,
                    ms => Duration::from_millis(ms),
                };
                (n.node_id, Seen { up: n.up, ago, starting: n.starting })
            })
            .collect(),
    )
}

#[cfg(test)]
impl From<NodeId> for Member {
    /// A node that joined long ago.
    fn from(id: NodeId) -> Member {
        Member { id, joined_at: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LivenessConfig {
        LivenessConfig { down_after: Duration::from_secs(3), ..Default::default() }
    }

    #[test]
    fn a_node_is_down_after_silence_and_up_when_heard() {
        let t0 = Instant::now();
        let liveness = Liveness::new(config(), 1);
        liveness.record(2, t0);
        assert!(liveness.view(1, [2], t0)[&2].up);
        let later = t0 + Duration::from_secs(4);
        assert!(!liveness.view(1, [2], later)[&2].up);
        liveness.record(2, later);
        assert!(liveness.view(1, [2], later)[&2].up);
    }

    #[test]
    fn a_new_leader_counts_silence_from_its_first_look_in_its_term() {
        let t0 = Instant::now();
        let liveness = Liveness::new(config(), 1);
        // Nothing told the tracker that this node leads before it looked:
        // the look itself starts the term's grace.
        let took_over = t0 + Duration::from_secs(10);
        let seen = liveness.view(2, [3], took_over)[&3];
        assert_eq!(
            seen,
            Seen { up: true, ago: Duration::ZERO, starting: false },
            "nobody is down the moment a leader takes over"
        );
        assert!(!liveness.view(2, [3], took_over + Duration::from_secs(4))[&3].up);
        // Heard in term 2, then silent; this node leads again in term 5: a
        // fresh grace, not the old silence.
        liveness.record(3, took_over + Duration::from_secs(5));
        let again = took_over + Duration::from_secs(60);
        assert!(liveness.view(5, [3], again)[&3].up, "a new term's leader has heard from nobody yet");
        assert!(!liveness.view(5, [3], again + Duration::from_secs(4))[&3].up);
    }

    #[test]
    fn a_node_that_joined_under_this_leader_is_starting_until_it_is_heard() {
        let t0 = Instant::now();
        let liveness = Liveness::new(config(), 1);
        // The first look, with this node alone (a cluster just made);
        // then node 2 was there when this node took over.
        assert!(liveness.view(1, [1], t0)[&1].up);
        liveness.record(2, t0);
        assert!(liveness.view(1, [1, 2], t0)[&2].up);
        // Node 4 joins later: starting, not up, and not down either.
        let later = t0 + Duration::from_secs(1);
        let seen = liveness.view(1, [1, 2, 4], later)[&4];
        assert_eq!(seen, Seen { up: false, ago: Duration::ZERO, starting: true }, "no grace: it has never reported");
        liveness.record(4, later + Duration::from_secs(2));
        let seen = liveness.view(1, [1, 2, 4], later + Duration::from_secs(2))[&4];
        assert!(seen.up && !seen.starting, "{seen:?}");
        // One that never reports is down once it has been starting too long.
        let silent = liveness.view(1, [1, 2, 4, 5], later)[&5];
        assert!(silent.starting);
        let seen = liveness.view(1, [5], later + STARTING_AT_MOST)[&5];
        assert_eq!(seen, Seen { up: false, ago: STARTING_AT_MOST, starting: false });
        // A new term: the nodes of its first look are there at takeover.
        let again = later + Duration::from_secs(100);
        assert!(
            liveness.view(3, [1, 2, 4, 5], again)[&5].up,
            "a new leader's grace covers every node it finds that joined long ago"
        );
    }

    #[test]
    fn a_node_that_joined_under_the_leader_before_is_starting_not_up_until_a_new_leader_hears_it() {
        let t0 = Instant::now();
        let liveness = Liveness::new(config(), 1);
        let minute = i64::try_from(STARTING_AT_MOST.as_millis()).unwrap_or(i64::MAX);
        // Node 2 joined long ago, node 3 ten seconds ago, node 4 just
        // over a minute ago: a new leader's first look.
        let recent = Member { id: 3, joined_at: now_millis() - 10_000 };
        let older = Member { id: 4, joined_at: now_millis() - minute - 5_000 };
        let seen = liveness.view(7, [Member::from(1), Member::from(2), recent, older], t0);
        assert!(seen[&2].up, "{:?}", seen[&2]);
        assert!(seen[&4].up, "past the minute a join is no longer news: {:?}", seen[&4]);
        assert_eq!(
            seen[&3],
            Seen { up: false, ago: Duration::ZERO, starting: true },
            "the leader before may never have heard from it; its silence so far is no downtime"
        );
        // Heard: up. Never heard (dead, say, as a killed leader is): down
        // once the grace is out, as any node of the first look would be.
        liveness.record(3, t0 + Duration::from_secs(1));
        assert!(liveness.view(7, [recent], t0 + Duration::from_secs(1))[&3].up);
        let silent = Member { id: 5, joined_at: now_millis() - 10_000 };
        let liveness = Liveness::new(config(), 1);
        assert!(liveness.view(8, [silent], t0)[&5].starting);
        assert!(liveness.view(8, [silent], t0 + Duration::from_secs(2))[&5].starting);
        let seen = liveness.view(8, [silent], t0 + Duration::from_secs(3))[&5];
        assert_eq!(seen, Seen { up: false, ago: Duration::from_secs(3), starting: false });
    }

    #[test]
    fn a_look_with_an_older_term_leaves_the_current_terms_grace_alone() {
        let t0 = Instant::now();
        let liveness = Liveness::new(config(), 1);
        assert!(liveness.view(4, [3], t0)[&3].up);
        let later = t0 + Duration::from_secs(4);
        assert!(!liveness.view(3, [3], later)[&3].up, "a stale term's look is no new leadership");
        assert!(!liveness.view(4, [3], later)[&3].up, "and term 4's grace still ends when it ended");
    }

    #[test]
    fn a_refused_heartbeat_means_removal_only_once_refusals_last_five_seconds() {
        let t0 = Instant::now();
        let mut refusals = Refusals::default();
        assert!(!refusals.refused(t0), "one refusal may be a new leader that has not applied the join yet");
        assert!(!refusals.refused(t0 + Duration::from_secs(4)));
        refusals.accepted();
        assert!(!refusals.refused(t0 + Duration::from_secs(6)), "an accepted beat starts the count again");
        assert!(!refusals.refused(t0 + Duration::from_secs(10)));
        assert!(refusals.refused(t0 + Duration::from_secs(6) + REFUSED_FOR_REMOVAL));
    }

    #[test]
    fn the_node_itself_is_always_up() {
        let liveness = Liveness::new(config(), 1);
        assert_eq!(liveness.view(1, [1], Instant::now())[&1], Seen { up: true, ago: Duration::ZERO, starting: false });
    }
}
