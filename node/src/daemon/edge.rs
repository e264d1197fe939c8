//! The node's edge: keeps the proxy (`roost_network::edge`) in step with
//! the replicated state.
//!
//! On every change of the state (or of the directory the mesh derives from
//! it) [`run`] rebuilds the routing table, hands the proxy the cluster CA
//! (for APP.DOMAIN certificates) and the issued ACME certificates with their
//! keys opened, and publishes how far it got, so that a challenge request
//! that beat its token here can wait for it ([`NodeHooks`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use roost_deploy::secrets::SecretsKey;
use roost_network::directory::Directory;
use roost_network::edge::http::Hooks;
use roost_network::edge::routes::Routes;
use roost_network::edge::tls::certified_key;
use roost_network::edge::Edge;
use roost_network::ClusterCa;
use roost_raft::state::IssuedCertificate;
use roost_raft::Consensus;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What sealed certificate keys are sealed under (with the domain as name).
pub const CERTIFICATE_KEYS: &str = "roost:certificates";

/// What the edge loop needs.
pub struct EdgeContext {
    pub consensus: Arc<Consensus>,
    pub edge: Arc<Edge>,
    pub directory: watch::Receiver<Arc<Directory>>,
    pub secrets_key: Arc<SecretsKey>,
    /// The state version the routes were last built from.
    pub built: watch::Sender<u64>,
}

pub async fn run(context: EdgeContext, stop: CancellationToken) {
    let mut changes = context.consensus.state().changes();
    let mut directory = context.directory.clone();
    let mut served: HashMap<String, i64> = HashMap::new();
    let mut has_ca = false;
    loop {
        let version = *changes.borrow_and_update();
        let (routes, issued, ca) = context.consensus.state().read(|state| {
            let routes = Routes::new(state, &directory.borrow_and_update());
            let issued: Vec<(String, IssuedCertificate)> =
                state.certificates.values().filter_map(|c| Some((c.domain.clone(), c.issued.clone()?))).collect();
            let ca = state.cluster.as_ref().map(|c| (c.id.clone(), c.ca_cert_pem.clone(), c.ca_key_pem.clone()));
            (routes, issued, ca)
        });
        context.edge.update(routes).await;
        if !has_ca {
            if let Some((id, cert, key)) = ca {
                match ClusterCa::load(&id, &cert, &key) {
                    Ok(ca) => {
                        context.edge.certificates().set_ca(Arc::new(ca));
                        has_ca = true;
                    }
                    Err(error) => tracing::error!(%error, "the cluster CA is unusable; APP.DOMAIN has no certificate"),
                }
            }
        }
        let now: HashMap<String, i64> = issued.iter().map(|(d, i)| (d.clone(), i.issued_at)).collect();
        if now != served {
            context.edge.certificates().set_issued(open_certificates(&context.secrets_key, &issued));
            served = now;
        }
        context.built.send_replace(version);
        tokio::select! {
            () = stop.cancelled() => return,
            changed = roost_raft::store::settled(&mut changes) => if changed.is_err() { return },
            changed = directory.changed() => if changed.is_err() { return },
        }
    }
}

/// The issued certificates, keys opened, ready to serve.
fn open_certificates(
    key: &SecretsKey,
    issued: &[(String, IssuedCertificate)],
) -> HashMap<String, Arc<rustls::sign::CertifiedKey>> {
    let mut ready = HashMap::new();
    for (domain, certificate) in issued {
        let opened = key
            .open(CERTIFICATE_KEYS, domain, &certificate.key)
            .map_err(|e| e.to_string())
            .and_then(|key_pem| certified_key(domain, &certificate.chain_pem, &key_pem).map_err(|e| e.to_string()));
        match opened {
            Ok(certified) => {
                ready.insert(domain.clone(), certified);
            }
            Err(error) => tracing::error!(%domain, %error, "cannot serve an issued certificate"),
        }
    }
    ready
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
            let target = *consensus.state().changes().borrow();
            let _ = tokio::time::timeout_at(deadline, built.wait_for(|version| *version >= target)).await;
        })
    }
}
