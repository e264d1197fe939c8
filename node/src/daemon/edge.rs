//! The node's edge: keeps the proxy (`roost_network::edge`) in step with
//! the replicated state.
//!
//! On every change of the state (or of the directory the mesh derives from
//! it) [`run`] rebuilds the routing table, hands the proxy the cluster CA
//! (for APP.DOMAIN certificates) and the issued ACME certificates with their
//! keys opened, and publishes how far it got, so that a challenge request
//! that beat its token here can wait for it ([`NodeHooks`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use roost_deploy::secrets::SecretsKey;
use roost_network::directory::Directory;
use roost_network::edge::http::Hooks;
use roost_network::edge::routes::Routes;
use roost_network::edge::tls::certified_key;
use roost_network::edge::Edge;
use roost_network::mesh::Reach;
use roost_raft::state::IssuedCertificate;
use roost_raft::Consensus;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::keys::{VoterKeys, MAX_EDGE_NAMES};

/// What sealed certificate keys are sealed under (with the domain as name).
pub const CERTIFICATE_KEYS: &str = "roost:certificates";

/// What the edge loop needs.
pub struct EdgeContext {
    pub consensus: Arc<Consensus>,
    pub edge: Arc<Edge>,
    pub directory: watch::Receiver<Arc<Directory>>,
    /// Which nodes' instances the mesh reaches now (`mesh::run`).
    pub reach: watch::Receiver<Reach>,
    pub keys: EdgeKeys,
    /// The workload revision the routes were last built from
    /// ([`roost_raft::StateReader::workload_changes`]).
    pub built: watch::Sender<u64>,
}

/// Where the edge's certificate keys come from.
pub enum EdgeKeys {
    /// A node that may vote opens them itself, and makes APP.DOMAIN
    /// certificates with the CA.
    Voter(Arc<SecretsKey>),
    /// A worker's come from a voter ([`worker_certificates`]).
    Worker,
}

/// A worker fetches its edge's certificates again this often: well within
/// the 90 days a certificate from the cluster CA for an app lives, and the
/// 30 days after which the edge stops serving one it got.
const WORKER_REFRESH: Duration = Duration::from_secs(7 * 24 * 3600);

pub async fn run(context: EdgeContext, stop: CancellationToken) {
    let mut changes = context.consensus.state().workload_changes();
    let mut directory = context.directory.clone();
    let mut reach = context.reach.clone();
    let mut served: HashMap<String, i64> = HashMap::new();
    // The CA certificate the edge makes APP.DOMAIN certificates with.
    let mut has_ca: Option<String> = None;
    let mut pace = roost_raft::store::Pace::default();
    // The workload revision the routes were built at, and whether the
    // directory or the mesh's reach changed since: entries that change
    // neither (tokens, an app without a release) cost no pass.
    let mut built_at: Option<u64> = None;
    let mut directory_changed = true;
    loop {
        let version = *changes.borrow_and_update();
        if std::mem::take(&mut directory_changed) {
            built_at = None;
        }
        build(&context, &mut directory, &mut reach, &mut built_at, &mut served, &mut has_ca, &mut pace).await;
        context.built.send_replace(version);
        tokio::select! {
            () = stop.cancelled() => return,
            changed = pace.settled(&mut changes) => if changed.is_err() { return },
            changed = directory.changed() => {
                if changed.is_err() { return }
                directory_changed = true;
            }
            changed = reach.changed() => {
                if changed.is_err() { return }
                directory_changed = true;
            }
        }
    }
}

/// One pass of [`run`], unless the workload revision is still `built_at`:
/// routes from the state and the directory, and on a voter the CA and the
/// ACME certificates.
async fn build(
    context: &EdgeContext,
    directory: &mut watch::Receiver<Arc<Directory>>,
    reach: &mut watch::Receiver<Reach>,
    built_at: &mut Option<u64>,
    served: &mut HashMap<String, i64>,
    has_ca: &mut Option<String>,
    pace: &mut roost_raft::store::Pace,
) {
    let started = std::time::Instant::now();
    let reader = context.consensus.state();
    let read = reader.read_if_moved(built_at, |state| {
        let routes = Routes::new(state, &directory.borrow_and_update()).reachable(&reach.borrow_and_update());
        // A node that has just joined or restarted answers 503 (try again),
        // not 404, for an app it has not heard of yet. `synced` moves the
        // revision once it is set, so these routes are built again then.
        let caught_up = reader.synced() && super::auth::knows_cluster_in(state, context.consensus.id());
        let routes = if caught_up { routes } else { routes.catching_up() };
        (routes, issued_certificates(state), state.cluster.clone())
    });
    let Some((routes, issued, cluster)) = read else { return };
    pace.passed(started);
    context.edge.update(routes).await;
    if let EdgeKeys::Voter(key) = &context.keys {
        // Again after a CA rotation.
        if let Some(cluster) = cluster.filter(|c| has_ca.as_ref() != Some(&c.ca_cert_pem)) {
            match super::keys::open_ca(&cluster, key) {
                Ok(ca) => {
                    context.edge.certificates().set_ca(Arc::new(ca));
                    *has_ca = Some(cluster.ca_cert_pem.clone());
                }
                Err(error) => tracing::error!(
                    error = %super::identity::error_chain(&error),
                    "the cluster CA is unusable; APP.DOMAIN has no certificate"
                ),
            }
        }
        let now: HashMap<String, i64> = issued.iter().map(|(d, i)| (d.clone(), i.issued_at)).collect();
        if now != *served {
            context.edge.certificates().set_issued(open_certificates(key, &issued));
            *served = now;
        }
    }
}

/// The ACME certificates the state holds, by domain.
pub(super) fn issued_certificates(state: &roost_raft::State) -> Vec<(String, IssuedCertificate)> {
    state.certificates.values().filter_map(|c| Some((c.domain.clone(), c.issued.clone()?))).collect()
}

/// A worker's edge certificates, from a voter: at start, whenever an ACME
/// certificate is issued or renewed or an app is first deployed, and all again
/// every [`WORKER_REFRESH`]; retried until a voter answers.
pub async fn worker_certificates(
    consensus: Arc<Consensus>,
    edge: Arc<Edge>,
    keys: Arc<VoterKeys>,
    stop: CancellationToken,
) {
    let mut changes = consensus.state().workload_changes();
    // The ACME certificates served, the names a certificate is held for,
    // and when all were last fetched.
    let mut served: Option<HashMap<String, i64>> = None;
    let mut held: BTreeSet<String> = BTreeSet::new();
    let mut refreshed: Option<Instant> = None;
    let mut retry = Duration::from_secs(1);
    let mut next_try = Instant::now();
    let mut pace = roost_raft::store::Pace::default();
    // What the state asks for, read again only when the workload revision
    // moved (apps without a release get no certificate before their first
    // deploy, which moves it).
    let mut read_at: Option<u64> = None;
    let (mut issued, mut names): (HashMap<String, i64>, BTreeSet<String>) = Default::default();
    let mut ca: Option<String> = None;
    loop {
        changes.borrow_and_update();
        let started = std::time::Instant::now();
        let read = consensus.state().read_if_moved(&mut read_at, |s| {
            let issued: HashMap<String, i64> =
                issued_certificates(s).into_iter().map(|(d, i)| (d, i.issued_at)).collect();
            let domain = s.cluster.as_ref().map(|c| c.domain.clone());
            let names: BTreeSet<String> = domain
                .map(|d| {
                    s.apps.iter().filter(|(_, app)| app.has_release()).map(|(app, _)| format!("{app}.{d}")).collect()
                })
                .unwrap_or_default();
            (issued, names, s.cluster.as_ref().map(|c| c.ca_cert_pem.clone()))
        });
        if let Some((new_issued, new_names, new_ca)) = read {
            pace.passed(started);
            (issued, names) = (new_issued, new_names);
            // After a CA rotation every name is asked for again.
            if new_ca != ca {
                held.clear();
                ca = new_ca;
            }
        }
        if refreshed.is_none_or(|at| at.elapsed() >= WORKER_REFRESH) {
            // Every name is asked for again (what the edge holds is served
            // until it is replaced), in as many tries as the voters allow.
            held.clear();
            refreshed = Some(Instant::now());
        }
        let missing: Vec<String> = names.iter().filter(|n| !held.contains(*n)).cloned().collect();
        let mut wait = WORKER_REFRESH;
        if served.as_ref() != Some(&issued) || !missing.is_empty() {
            let now = Instant::now();
            if now < next_try {
                wait = next_try - now;
            } else {
                let (made, fetched) = fetch_certificates(&keys, &edge, &missing).await;
                // A name the voter did not know yet is asked again; what
                // came back before a failure (a voter's rate limit, say) is
                // kept, so the next try asks only for the rest.
                let progressed = !made.is_empty();
                held.extend(made);
                if progressed {
                    // Slowed, not failing: come back soon for the rest.
                    retry = Duration::from_secs(1);
                }
                match fetched {
                    Ok(()) => {
                        served = Some(issued.clone());
                        retry = Duration::from_secs(1);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "could not get the edge's certificates from a voter; retrying in {retry:?}");
                        next_try = Instant::now() + retry;
                        wait = retry;
                        retry = (retry * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            changed = pace.settled(&mut changes) => if changed.is_err() { return },
        }
    }
}

/// Fetches the ACME certificates and certificates for `names`, a call per
/// [`MAX_EDGE_NAMES`], and hands them to the edge.
/// Returns the names a certificate came back for, and whether every call
/// succeeded.
async fn fetch_certificates(keys: &VoterKeys, edge: &Edge, names: &[String]) -> (Vec<String>, Result<(), String>) {
    let mut batches: Vec<Vec<String>> = names.chunks(MAX_EDGE_NAMES).map(<[String]>::to_vec).collect();
    if batches.is_empty() {
        batches.push(Vec::new());
    }
    let mut made_for = Vec::new();
    for batch in batches {
        let reply = match keys.edge_certificates(batch).await {
            Ok(reply) => reply,
            Err(error) => return (made_for, Err(error)),
        };
        let mut issued = HashMap::new();
        for certificate in reply.issued {
            match certified_key(&certificate.domain, &certificate.chain_pem, &certificate.key_pem) {
                Ok(key) => {
                    issued.insert(certificate.domain, key);
                }
                Err(error) => {
                    tracing::error!(domain = %certificate.domain, %error, "cannot serve an issued certificate")
                }
            }
        }
        edge.certificates().set_issued(issued);
        for made in reply.cluster {
            match certified_key(&made.domain, &made.chain_pem, &made.key_pem) {
                Ok(key) => {
                    edge.certificates().insert_made(&made.domain, key);
                    made_for.push(made.domain);
                }
                Err(error) => tracing::error!(name = %made.domain, %error, "cannot serve a certificate a voter made"),
            }
        }
    }
    (made_for, Ok(()))
}

/// The issued certificates, keys opened, ready to serve.
fn open_certificates(
    key: &SecretsKey,
    issued: &[(String, IssuedCertificate)],
) -> HashMap<String, Arc<rustls::sign::CertifiedKey>> {
    let mut ready = HashMap::new();
    for (domain, chain_pem, key_pem) in open_issued(key, issued) {
        match certified_key(&domain, &chain_pem, &key_pem) {
            Ok(certified) => {
                ready.insert(domain, certified);
            }
            Err(error) => tracing::error!(%domain, %error, "cannot serve an issued certificate"),
        }
    }
    ready
}

/// The issued certificates as (domain, chain PEM, key PEM), keys opened;
/// one that does not open is left out, and logged.
pub(super) fn open_issued(key: &SecretsKey, issued: &[(String, IssuedCertificate)]) -> Vec<(String, String, String)> {
    let mut opened = Vec::new();
    for (domain, certificate) in issued {
        match key.open(CERTIFICATE_KEYS, domain, &certificate.key) {
            Ok(key_pem) => opened.push((domain.clone(), certificate.chain_pem.clone(), key_pem)),
            Err(error) => tracing::error!(%domain, %error, "cannot open an issued certificate's key"),
        }
    }
    opened
}

/// How the edge catches up with the leader for an ACME challenge.
pub struct NodeHooks {
    pub consensus: Arc<Consensus>,
    pub built: watch::Receiver<u64>,
}

impl Hooks for NodeHooks {
    fn catch_up(&self) -> BoxFuture<'static, ()> {
        let (consensus, mut built) = (self.consensus.clone(), self.built.clone());
        Box::pin(async move {
            let deadline = Instant::now() + Duration::from_secs(3);
            if consensus.read_barrier(deadline).await.is_err() {
                return;
            }
            let target = *consensus.state().workload_changes().borrow();
            let _ = tokio::time::timeout_at(deadline, built.wait_for(|version| *version >= target)).await;
        })
    }
}
