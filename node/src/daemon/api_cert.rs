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
    #[error("the API certificate a voter gave is not for this node's key")]
    Foreign,
    #[error("the cluster's CA or this node's certificate changed meanwhile")]
    Moved,
}

pub async fn run(context: ApiCertContext, stop: CancellationToken) {
    super::follow::follow_state(
        &context.consensus,
        stop,
        "could not renew this node's API certificate",
        RETRY,
        || read_view(&context),
        || async { step(&context).await.map_err(|error| error_chain(&error)) },
    )
    .await;
}

/// What the state says that a step depends on (`None`: this node is not a
/// member): the cluster's CA, and this node's name and certificate, which
/// its API certificate names. All three change when a CA rotation ends.
#[derive(PartialEq)]
struct View {
    ca_pem: String,
    name: String,
    cert_fingerprint: String,
}

fn read_view(context: &ApiCertContext) -> Option<View> {
    let me = context.consensus.id();
    context.consensus.state().read(|s| {
        let node = s.nodes.get(&me)?;
        Some(View {
            ca_pem: s.cluster.as_ref()?.ca_cert_pem.clone(),
            name: node.name.clone(),
            cert_fingerprint: node.cert_fingerprint.clone(),
        })
    })
}

/// Renews the certificate if it is due, presents it, and says when it is
/// due next (`None`: when the state changes).
async fn step(context: &ApiCertContext) -> Result<Option<Instant>, ApiCertError> {
    let Some(view) = read_view(context) else {
        // Not a member (yet, or any more): nothing to renew.
        return Ok(None);
    };
    let now_ms = roost_raft::consensus::now_millis();
    let held = std::fs::read_to_string(context.dir.api_cert()).ok();
    let chain = match held.as_deref().and_then(|chain| Some((chain, renew_at(&view, chain)?))) {
        Some((chain, at)) if at > now_ms => chain.to_owned(),
        _ => {
            let chain = issue(context, &view).await?;
            write_private(&context.dir.api_cert(), &chain).map_err(ApiCertError::Write)?;
            tracing::debug!("renewed this node's API certificate");
            chain
        }
    };
    let fingerprint = pki::fingerprint(&pki::cert_der_from_pem(&chain)?);
    let presented = |tls: &NodeTls| tls.current().api_fingerprint.as_deref() == Some(fingerprint.as_str());
    if !presented(&context.tls) {
        context.tls.set_api(chain.clone())?;
    }
    if !presented(&context.tls) {
        // It names the certificate the state records for this node, which
        // the node presents once its CA loop has moved to it (right after a
        // CA rotation): look again shortly.
        return Ok(Some(Instant::now() + RETRY));
    }
    let at = renew_at(&view, &chain).unwrap_or(now_ms);
    let wait = Duration::from_millis(u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0));
    Ok(Some(Instant::now() + wait))
}

/// A new API certificate for this node's key, from the cluster's CA,
/// naming the node certificate the state records.
async fn issue(context: &ApiCertContext, view: &View) -> Result<String, ApiCertError> {
    let public_key = NodeKey::from_pem(&context.key_pem)?.public_key();
    match &context.secrets_key {
        Some(key) => {
            let cluster = context.consensus.state().read(|s| s.cluster.clone());
            let ca = cluster.as_ref().map(|cluster| open_ca(cluster, key)).transpose()?;
            let ca = ca.filter(|ca| ca.cert_pem() == view.ca_pem).ok_or(ApiCertError::Moved)?;
            Ok(ca.issue_api(&view.name, &public_key, &view.cert_fingerprint, context.lifetime)?)
        }
        None => {
            let answer = context.voter_keys.api_certificate(public_key.clone()).await.map_err(ApiCertError::Voter)?;
            let leaf = pki::cert_der_from_pem(&answer.chain_pem)?;
            if !pki::certifies_key(&leaf, &public_key) {
                return Err(ApiCertError::Foreign);
            }
            // The voter may know more of the cluster than this node yet.
            if renew_at(view, &answer.chain_pem).is_none() {
                return Err(ApiCertError::Moved);
            }
            Ok(answer.chain_pem)
        }
    }
}

/// When the API certificate `chain_pem` is due for renewal (Unix ms): once
/// a third of its life has passed; `None` (now) if it is not valid now, not
/// from the cluster's CA, or names another certificate than the one the
/// state records for this node.
fn renew_at(view: &View, chain_pem: &str) -> Option<i64> {
    if !tls::api_certificate_valid(&view.ca_pem, chain_pem) {
        return None;
    }
    let leaf = pki::cert_der_from_pem(chain_pem).ok()?;
    if pki::api_node_fingerprint(&leaf)? != view.cert_fingerprint {
        return None;
    }
    let (not_before, not_after) = pki::validity(chain_pem).ok()?;
    let issued = not_before.saturating_add(i64::try_from(pki::API_CERT_BACKDATE.as_millis()).unwrap_or(0));
    Some(issued.saturating_add(not_after.saturating_sub(issued) / 3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_certificate_is_due_a_third_into_its_life_or_at_once_after_a_ca_rotation() {
        let ca = pki::ClusterCa::generate("c1").expect("a CA");
        let key = NodeKey::generate().expect("a key").public_key();
        let lifetime = Duration::from_secs(6 * 3600);
        let view = View { ca_pem: ca.cert_pem().to_owned(), name: "n1".into(), cert_fingerprint: "a".repeat(64) };
        let chain = ca.issue_api("n1", &key, &view.cert_fingerprint, lifetime).expect("an API certificate");
        let now = roost_raft::consensus::now_millis();
        let due = renew_at(&view, &chain).expect("due later");
        let third = i64::try_from(lifetime.as_millis() / 3).expect("fits");
        assert!((due - (now + third)).abs() < 5_000, "due {} ms from now, not a third of 6 h", due - now);
        // A rotation gives the cluster a new CA and the node a new
        // certificate: one that is not from the cluster's CA, or that names
        // the node's former certificate, is due at once.
        let other = pki::ClusterCa::generate("c1").expect("another CA");
        let rotated = View { ca_pem: other.cert_pem().to_owned(), ..view };
        assert_eq!(renew_at(&rotated, &chain), None, "signed by a CA that is not the cluster's");
        let stale = other.issue_api("n1", &key, &"a".repeat(64), lifetime).expect("naming the former certificate");
        let renamed = View { cert_fingerprint: "b".repeat(64), ..rotated };
        assert_eq!(renew_at(&renamed, &stale), None, "names a certificate the node no longer has");
        let fresh = other.issue_api("n1", &key, &"b".repeat(64), lifetime).expect("naming the new one");
        assert!(renew_at(&renamed, &fresh).is_some(), "a fresh one from the new CA naming the new certificate");
    }
}
