//! The node's part in a rotation of the cluster CA (`roost cluster
//! rotate-ca`; the steps are in roost-raft's `state::ca`).
//!
//! [`run`] follows the state:
//! - it trusts the CAs the state names ([`roost_raft::State::trusted_cas`]);
//! - during a rotation it gets a certificate from the new CA for its own key
//!   (a voter signs it itself, a worker asks a voter), keeps it as
//!   `tls/next.pem` beside `tls/next-ca.pem`, and records its fingerprint
//!   (`Command::RenewNodeCertificate`);
//! - on the leader, once every node has one, it finishes the rotation
//!   (`Command::FinishCaRotation`);
//! - once the rotation has finished, the new files replace `ca.pem` and
//!   `node.pem`, and the node presents its new certificate from its next
//!   handshake on (connections open already keep theirs).
//!
//! Until the rotation finishes, nodes present their old certificates, so a
//! CLI whose token pins the old CA works throughout.

use std::sync::Arc;
use std::time::Duration;

use roost_deploy::secrets::SecretsKey;
use roost_network::pki::{self, NodeKey};
use roost_network::tls::{self, NodeCerts, NodeTls};
use roost_proto::api::CaRotationStatus;
use roost_raft::{Command, Consensus, Response};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::channels::NodeChannels;
use super::identity::{error_chain, read, write_private, DataDir};
use super::keys::{open_rotation_ca, VoterKeys};

/// How long after a failed step the loop tries again.
const RETRY: Duration = Duration::from_secs(2);

/// What the CA loop needs.
pub struct CaContext {
    pub consensus: Arc<Consensus>,
    pub dir: DataDir,
    pub tls: Arc<NodeTls>,
    pub channels: Arc<NodeChannels>,
    /// The node's private key (PEM), which its new certificate is for.
    pub key_pem: String,
    /// `Some` on a node that may vote: it signs its own new certificate.
    pub secrets_key: Option<Arc<SecretsKey>>,
    /// How a worker asks a voter for one.
    pub voter_keys: Arc<VoterKeys>,
}

#[derive(Debug, thiserror::Error)]
enum CaError {
    #[error("could not read or write {what}")]
    Files {
        what: &'static str,
        #[source]
        source: super::identity::IdentityError,
    },
    #[error(transparent)]
    Keys(#[from] super::keys::KeysError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("no voter gave this node a certificate from the new CA: {0}")]
    Voter(String),
    #[error("the certificate a voter gave is not from the new CA")]
    WrongCa,
    #[error("could not record this node's new certificate: {0}")]
    Propose(String),
}

pub async fn run(context: CaContext, stop: CancellationToken) {
    // What the node presents and trusts, as the last step set it.
    let applied: tokio::sync::Mutex<Option<(Vec<String>, String)>> = tokio::sync::Mutex::default();
    super::follow::follow_state(
        &context.consensus,
        stop,
        "CA rotation: this node's step failed",
        RETRY,
        || read_view(&context),
        || async {
            let mut applied = applied.lock().await;
            step(&context, &mut applied).await.map(|()| None).map_err(|error| error_chain(&error))
        },
    )
    .await;
}

/// What the state says of the CAs and of this node.
#[derive(PartialEq)]
struct View {
    cluster_id: String,
    name: String,
    ca_cert_pem: String,
    /// This node's certificate as the state records it.
    cert_fingerprint: String,
    trusted: Vec<String>,
    /// The new CA, during a rotation.
    rotating_to: Option<String>,
    /// This node's recorded certificate from it.
    next_fingerprint: Option<String>,
    /// Nobody is left without a certificate from the new CA.
    complete: bool,
    leading: bool,
}

fn read_view(context: &CaContext) -> Option<View> {
    let me = context.consensus.id();
    let leading = context.consensus.is_leader();
    context.consensus.state().read(|s| {
        let cluster = s.cluster.as_ref()?;
        let node = s.nodes.get(&me)?;
        Some(View {
            cluster_id: cluster.id.clone(),
            name: node.name.clone(),
            ca_cert_pem: cluster.ca_cert_pem.clone(),
            cert_fingerprint: node.cert_fingerprint.clone(),
            trusted: s.trusted_cas().into_iter().map(str::to_owned).collect(),
            rotating_to: cluster.ca_rotation.as_ref().map(|r| r.ca_cert_pem.clone()),
            next_fingerprint: node.next_cert_fingerprint.clone(),
            complete: s.ca_rotation_pending().is_empty(),
            leading,
        })
    })
}

async fn step(context: &CaContext, applied: &mut Option<(Vec<String>, String)>) -> Result<(), CaError> {
    // A node that restarted may hold a state from before the rotation
    // finished (or was cancelled): renew nothing on its word alone.
    if read_view(context).is_some_and(|v| v.rotating_to.is_some()) {
        context
            .consensus
            .read_barrier(Instant::now() + Duration::from_secs(5))
            .await
            .map_err(|e| CaError::Propose(e.to_string()))?;
    }
    let Some(view) = read_view(context) else { return Ok(()) };
    let dir = &context.dir;
    let files = |what| move |source| CaError::Files { what, source };
    let next_ca = read_optional(&dir.next_ca_cert()).map_err(files("tls/next-ca.pem"))?;
    let next_cert = read_optional(&dir.next_node_cert()).map_err(files("tls/next.pem"))?;

    if let (Some(ca), Some(cert)) = (&next_ca, &next_cert) {
        let recorded = pki::cert_der_from_pem(cert).is_ok_and(|der| pki::fingerprint(&der) == view.cert_fingerprint);
        if *ca == view.ca_cert_pem && recorded {
            // The rotation finished: the new files become the node's. The
            // join token the node was started with pins the old CA.
            let old_ca = read(&dir.ca_cert()).map_err(files("tls/ca.pem"))?;
            if old_ca != *ca {
                dir.add_former_ca(&super::keys::ca_digest(&old_ca)?).map_err(files("node.json"))?;
            }
            // The certificate first: a node that stops between the two
            // writes finds each certificate's CA by its signature.
            write_private(&dir.node_cert(), cert).map_err(files("tls/node.pem"))?;
            write_private(&dir.ca_cert(), ca).map_err(files("tls/ca.pem"))?;
            remove(&dir.next_node_cert()).map_err(files("tls/next.pem"))?;
            remove(&dir.next_ca_cert()).map_err(files("tls/next-ca.pem"))?;
            tracing::info!(cluster = %view.cluster_id, "the CA rotation finished; this node presents its certificate from the new CA");
        } else if view.rotating_to.as_ref() != Some(ca) {
            // From a rotation that was cancelled (a node was removed during
            // it), or a certificate the cluster never recorded.
            remove(&dir.next_node_cert()).map_err(files("tls/next.pem"))?;
            remove(&dir.next_ca_cert()).map_err(files("tls/next-ca.pem"))?;
            tracing::info!(cluster = %view.cluster_id, "dropped a certificate from a CA that is not the cluster's");
        }
    }
    // Also after a crash between the moves above and this.
    let ca_file = read(&dir.ca_cert()).map_err(files("tls/ca.pem"))?;
    if ca_file == view.ca_cert_pem {
        repin_admin_token(dir, &ca_file)?;
    }

    // What the node presents and trusts, as its files and the state say:
    // before renewing, so a node trusts the new CA however that goes.
    let cert_pem = read(&dir.node_cert()).map_err(files("tls/node.pem"))?;
    let wanted = (view.trusted.clone(), cert_pem.clone());
    if applied.as_ref() != Some(&wanted) {
        let trusted: Vec<&str> = view.trusted.iter().map(String::as_str).collect();
        let certs = NodeCerts { trusted: &trusted, ca_pem: &ca_file, cert_pem: &cert_pem, key_pem: &context.key_pem };
        let presented_before = context.tls.current().fingerprint.clone();
        context.tls.update(&certs)?;
        if context.tls.current().fingerprint != presented_before {
            // New connections present the new certificate.
            context.channels.reset();
        }
        *applied = Some(wanted);
    }

    if let Some(new_ca) = &view.rotating_to {
        let next_ca = read_optional(&dir.next_ca_cert()).map_err(files("tls/next-ca.pem"))?;
        let next_cert = read_optional(&dir.next_node_cert()).map_err(files("tls/next.pem"))?;
        renew(context, &view, new_ca, next_ca.as_deref(), next_cert.as_deref()).await?;
        if view.complete && view.leading {
            let command = Command::FinishCaRotation { ca_cert_pem: new_ca.clone() };
            match context.consensus.propose_as_leader(command, Instant::now() + Duration::from_secs(10)).await {
                Ok(Response::Done) => {
                    tracing::info!("every node has a certificate from the new CA: it is the cluster's CA now")
                }
                Ok(other) => tracing::debug!(?other, "the CA rotation was not finished"),
                Err(error) => return Err(CaError::Propose(error.to_string())),
            }
        }
    }
    Ok(())
}

/// Gets this node a certificate from `new_ca` and records it, unless done.
async fn renew(
    context: &CaContext,
    view: &View,
    new_ca: &str,
    next_ca: Option<&str>,
    next_cert: Option<&str>,
) -> Result<(), CaError> {
    let dir = &context.dir;
    let files = |what| move |source| CaError::Files { what, source };
    let cert = match (next_ca, next_cert) {
        (Some(ca), Some(cert)) if ca == new_ca && tls::signed_by(new_ca, cert) => cert.to_owned(),
        _ => {
            let public_key = NodeKey::from_pem(&context.key_pem)?.public_key();
            let cert = match &context.secrets_key {
                Some(key) => {
                    let cluster = context.consensus.state().read(|s| s.cluster.clone());
                    let ca = cluster
                        .as_ref()
                        .map(|cluster| open_rotation_ca(cluster, key))
                        .transpose()?
                        .flatten()
                        .filter(|ca| ca.cert_pem() == new_ca)
                        .ok_or(CaError::WrongCa)?;
                    ca.issue_for_public_key(&view.name, &public_key)?.0
                }
                None => {
                    let answer = context.voter_keys.renew_certificate(public_key).await.map_err(CaError::Voter)?;
                    if answer.ca_cert_pem != new_ca || !tls::signed_by(new_ca, &answer.cert_pem) {
                        return Err(CaError::WrongCa);
                    }
                    answer.cert_pem
                }
            };
            // The CA first: a certificate is kept only beside its CA.
            write_private(&dir.next_ca_cert(), new_ca).map_err(files("tls/next-ca.pem"))?;
            write_private(&dir.next_node_cert(), &cert).map_err(files("tls/next.pem"))?;
            cert
        }
    };
    let fingerprint = pki::fingerprint(&pki::cert_der_from_pem(&cert)?);
    if view.next_fingerprint.as_deref() == Some(fingerprint.as_str()) {
        return Ok(());
    }
    let command = Command::RenewNodeCertificate { node: context.consensus.id(), fingerprint, cert_pem: cert };
    match context.consensus.propose(command, Instant::now() + Duration::from_secs(10)).await {
        Ok(Response::Done) => {
            tracing::info!(cluster = %view.cluster_id, "this node has its certificate from the new CA");
            Ok(())
        }
        Ok(Response::Rejected(rejection)) => Err(CaError::Propose(rejection.to_string())),
        Ok(other) => Err(CaError::Propose(format!("unexpected answer {other:?}"))),
        Err(error) => Err(CaError::Propose(error.to_string())),
    }
}

/// Rewrites `admin.token`, where this node holds it, to pin the CA
/// `ca_pem`: its secret stays.
fn repin_admin_token(dir: &DataDir, ca_pem: &str) -> Result<(), CaError> {
    let path = dir.admin_token();
    let Some(text) = read_optional(&path).map_err(|source| CaError::Files { what: "admin.token", source })? else {
        return Ok(());
    };
    let Ok(mut token) = roost_network::Token::parse(&text) else { return Ok(()) };
    let digest = super::keys::ca_digest(ca_pem)?;
    if token.ca_digest != digest {
        token.ca_digest = digest;
        write_private(&path, &format!("{token}\n")).map_err(|source| CaError::Files { what: "admin.token", source })?;
        tracing::info!("{} pins the new CA now", path.display());
    }
    Ok(())
}

fn read_optional(path: &std::path::Path) -> Result<Option<String>, super::identity::IdentityError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(super::identity::io_error("read", path, source)),
    }
}

fn remove(path: &std::path::Path) -> Result<(), super::identity::IdentityError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(super::identity::io_error("remove", path, source)),
    }
}

impl super::api::ControlService {
    /// `roost cluster rotate-ca`: starts a rotation unless one is under way,
    /// and reports it.
    pub(super) async fn rotate_ca(&self) -> Result<CaRotationStatus, tonic::Status> {
        self.barrier(None).await?;
        let cluster = self
            .consensus
            .state()
            .read(|s| s.cluster.clone())
            .ok_or_else(|| tonic::Status::unavailable("this node does not know the cluster yet"))?;
        let mut started = None;
        if cluster.ca_rotation.is_none() {
            let key = super::auth::require_key(&self.secrets_key, self.consensus.state())?;
            let ca = pki::ClusterCa::generate(&cluster.id).map_err(|e| tonic::Status::internal(e.to_string()))?;
            let ca_key = super::keys::seal_ca_key(key, &ca).map_err(|e| tonic::Status::internal(e.to_string()))?;
            let command = Command::StartCaRotation { ca_cert_pem: ca.cert_pem().to_owned(), ca_key };
            match self.propose(command).await? {
                Response::Done => {
                    tracing::info!(ca = %ca.digest(), "CA rotation started");
                    started = Some(ca.cert_pem().to_owned());
                }
                // Another rotation began meanwhile: report that one.
                Response::Rejected(roost_raft::Rejection::CaRotationInProgress) => {}
                Response::Rejected(rejection) => return Err(super::api::rejection_status(rejection)),
                other => return Err(tonic::Status::internal(format!("unexpected answer {other:?}"))),
            }
        }
        // What was just committed may not be applied here yet.
        let mut status = self.ca_rotation_status(true).await?;
        // On a small cluster the rotation may be over already: the answer
        // names the CA this call started all the same.
        if let Some(pem) = started {
            status.next_ca_digest = super::keys::ca_digest(&pem)?.to_hex();
            status.next_ca_cert_pem = pem;
        }
        Ok(status)
    }

    /// Where the CA rotation stands (or the cluster's CA, with none under way).
    pub(super) async fn ca_rotation_status(&self, barrier: bool) -> Result<CaRotationStatus, tonic::Status> {
        if barrier {
            self.barrier(None).await?;
        }
        let (cluster, renewed, pending) = self.consensus.state().read(|s| {
            let renewed: Vec<String> =
                s.nodes.values().filter(|n| n.next_cert_fingerprint.is_some()).map(|n| n.name.clone()).collect();
            (s.cluster.clone(), renewed, s.ca_rotation_pending())
        });
        let cluster = cluster.ok_or_else(|| tonic::Status::unavailable("this node does not know the cluster yet"))?;
        let digest = |pem: &str| super::keys::ca_digest(pem).map(|d| d.to_hex());
        let next = cluster.ca_rotation.as_ref().map(|r| r.ca_cert_pem.clone()).unwrap_or_default();
        Ok(CaRotationStatus {
            ca_digest: digest(&cluster.ca_cert_pem)?,
            ca_cert_pem: cluster.ca_cert_pem.clone(),
            next_ca_digest: if next.is_empty() { String::new() } else { digest(&next)? },
            next_ca_cert_pem: next,
            renewed: if cluster.ca_rotation.is_some() { renewed } else { Vec::new() },
            pending,
        })
    }
}
