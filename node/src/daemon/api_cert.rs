//! The node's API certificate: what it presents to the CLI, which asks for
//! [`pki::API_SERVER_NAME`] and accepts nothing else
//! (`tls::ClientTls::api`).
//!
//! Node certificates live for years, and a removed node's data directory
//! keeps one that the CA signed. API certificates live for hours
//! (`--api-cert-lifetime`, 6 h by default) and only a current member gets a
//! new one, so such a directory stops passing for a node with the CLI once
//! its last API certificate expires; `roost cluster rotate-ca` cuts it off
//! at once.
//!
//! [`run`] keeps `tls/api.pem` current: a node renews its certificate once
//! a third of its life has passed, and at once when the cluster's CA is not
//! the one that signed it (after a CA rotation). A voter signs its own; a
//! worker asks a voter (`Keys.ApiCertificate`), which signs only for the key
//! of the caller's node certificate, and only while the caller is a member.

use std::sync::Arc;
use std::time::Duration;

use roost_deploy::secrets::SecretsKey;
use roost_network::pki::{self, NodeKey};
use roost_network::tls::{self, NodeTls};
use roost_raft::Consensus;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::identity::{error_chain, write_private, DataDir};
use super::keys::{open_ca, VoterKeys};

/// How long after a failed renewal the loop tries again.
const RETRY: Duration = Duration::from_secs(2);

/// What the loop needs.
pub struct ApiCertContext {
    pub consensus: Arc<Consensus>,
    pub dir: DataDir,
    pub tls: Arc<NodeTls>,
    /// The node's private key (PEM), which its API certificate is for.
    pub key_pem: String,
    /// `Some` on a node that may vote: it signs its own.
    pub secrets_key: Option<Arc<SecretsKey>>,
    /// How a worker asks a voter for one.
    pub voter_keys: Arc<VoterKeys>,
    /// How long the certificates this node signs live.
    pub lifetime: Duration,
}

#[derive(Debug, thiserror::Error)]
enum ApiCertError {
    #[error("could not write tls/api.pem")]
    Write(#[source] super::identity::IdentityError),
    #[error(transparent)]
    Keys(#[from] super::keys::KeysError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("no voter gave this node an API certificate: {0}")]
    Voter(String),
    #[error("the API certificate a voter gave is not from the cluster's CA for this node's key")]
    Foreign,
}

pub async fn run(context: ApiCertContext, stop: CancellationToken) {
    let mut changes = context.consensus.state().changes();
    let mut pace = roost_raft::store::Pace::default();
    // Said once per distinct failure.
    let mut failing: Option<String> = None;
    // What the last step that succeeded saw, and when it is due again: a
    // change of anything else in the state (nearly every entry) needs none.
    let mut done: Option<(Option<View>, Option<Instant>)> = None;
    loop {
        let view = read_view(&context);
        let next = match &done {
            Some((seen, next)) if *seen == view && next.is_none_or(|at| Instant::now() < at) => *next,
            _ => {
                let started = std::time::Instant::now();
                let result = step(&context).await;
                pace.passed(started);
                match result {
                    Ok(next) => {
                        failing = None;
                        done = Some((view, next));
                        next
                    }
                    Err(error) => {
                        let error = error_chain(&error);
                        if failing.as_ref() != Some(&error) {
                            tracing::warn!(%error, "could not renew this node's API certificate; retrying");
                            failing = Some(error);
                        }
                        done = None;
                        Some(Instant::now() + RETRY)
                    }
                }
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            // The CA, or this node's membership, may have changed.
            changed = pace.settled(&mut changes) => if changed.is_err() { return },
            () = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// What the state says that a step depends on: the cluster's CA, and this
/// node's name (`None`: it is not a member).
#[derive(PartialEq)]
struct View {
    ca_pem: String,
    name: String,
}

fn read_view(context: &ApiCertContext) -> Option<View> {
    let me = context.consensus.id();
    context
        .consensus
        .state()
        .read(|s| Some(View { ca_pem: s.cluster.as_ref()?.ca_cert_pem.clone(), name: s.nodes.get(&me)?.name.clone() }))
}

/// Renews the certificate if it is due, presents it, and says when it is
/// due next (`None`: when the state changes).
async fn step(context: &ApiCertContext) -> Result<Option<Instant>, ApiCertError> {
    let me = context.consensus.id();
    let Some((ca_pem, name, cluster)) = context.consensus.state().read(|s| {
        let cluster = s.cluster.as_ref()?;
        let node = s.nodes.get(&me)?;
        Some((cluster.ca_cert_pem.clone(), node.name.clone(), cluster.clone()))
    }) else {
        // Not a member (yet, or any more): nothing to renew.
        return Ok(None);
    };
    let now_ms = roost_raft::consensus::now_millis();
    let held = std::fs::read_to_string(context.dir.api_cert()).ok();
    let chain = match held.as_deref().and_then(|chain| Some((chain, renew_at(&ca_pem, chain)?))) {
        Some((chain, at)) if at > now_ms => chain.to_owned(),
        _ => {
            let public_key = NodeKey::from_pem(&context.key_pem)?.public_key();
            let chain = match &context.secrets_key {
                Some(key) => {
                    let node_fingerprint = context.tls.current().fingerprint.clone();
                    open_ca(&cluster, key)?.issue_api(&name, &public_key, &node_fingerprint, context.lifetime)?
                }
                None => {
                    let answer =
                        context.voter_keys.api_certificate(public_key.clone()).await.map_err(ApiCertError::Voter)?;
                    let leaf = pki::cert_der_from_pem(&answer.chain_pem)?;
                    if !tls::api_certificate_valid(&ca_pem, &answer.chain_pem)
                        || !pki::certifies_key(&leaf, &public_key)
                    {
                        return Err(ApiCertError::Foreign);
                    }
                    answer.chain_pem
                }
            };
            write_private(&context.dir.api_cert(), &chain).map_err(ApiCertError::Write)?;
            tracing::debug!("renewed this node's API certificate");
            chain
        }
    };
    let presented = context.tls.current().api.as_ref().map(|api| api.fingerprint.clone());
    let fingerprint = pki::fingerprint(&pki::cert_der_from_pem(&chain)?);
    if presented.as_deref() != Some(fingerprint.as_str()) {
        // Presented once the node's own CA is the one that signed it: right
        // after a CA rotation, when the CA loop has moved to it.
        context.tls.set_api(chain.clone())?;
    }
    let at = renew_at(&ca_pem, &chain).unwrap_or(now_ms);
    let wait = Duration::from_millis(u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0));
    Ok(Some(Instant::now() + wait))
}

/// When the API certificate `chain_pem` is due for renewal (Unix ms): once
/// a third of its life has passed; `None` (now) if `ca_pem` did not sign it
/// or it is not valid now.
fn renew_at(ca_pem: &str, chain_pem: &str) -> Option<i64> {
    if !tls::api_certificate_valid(ca_pem, chain_pem) {
        return None;
    }
    let (not_before, not_after) = pki::validity(chain_pem)?;
    let issued = not_before.saturating_add(i64::try_from(pki::API_CERT_BACKDATE.as_millis()).unwrap_or(0));
    Some(issued.saturating_add(not_after.saturating_sub(issued) / 3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_certificate_is_due_a_third_into_its_life_or_at_once_from_another_ca() {
        let ca = pki::ClusterCa::generate("c1").expect("a CA");
        let key = NodeKey::generate().expect("a key").public_key();
        let lifetime = Duration::from_secs(6 * 3600);
        let chain = ca.issue_api("n1", &key, &"0".repeat(64), lifetime).expect("an API certificate");
        let now = roost_raft::consensus::now_millis();
        let due = renew_at(ca.cert_pem(), &chain).expect("due later");
        let third = i64::try_from(lifetime.as_millis() / 3).expect("fits");
        assert!((due - (now + third)).abs() < 5_000, "due {} ms from now, not a third of 6 h", due - now);
        let other = pki::ClusterCa::generate("c1").expect("another CA");
        assert_eq!(renew_at(other.cert_pem(), &chain), None, "signed by a CA that is not the cluster's");
    }
}
