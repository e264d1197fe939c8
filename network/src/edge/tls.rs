//! The edge's certificates, chosen by SNI.
//!
//! A custom domain (or an app name) with an ACME certificate gets that one;
//! an app under the cluster domain without one gets a certificate from the
//! cluster CA, made on first use and kept (renewed well before it expires).
//! A node without the CA key (a worker) serves those a voter made for it
//! ([`Certificates::insert_made`]). Any other name has no certificate, and
//! its handshake fails. The node
//! hands over ACME certificates with their keys opened ([`Certificates::set_issued`]);
//! they stay in memory only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio::time::Instant;

use super::routes::Routes;
use crate::pki::{self, ClusterCa};

/// A cluster CA certificate is made again after this long.
const REMAKE_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("the certificate chain of {domain} is unreadable")]
    Chain {
        domain: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the key of {domain} is unreadable")]
    Key { domain: String, source: pki::PkiError },
    #[error("the key of {domain} is not one rustls can sign with")]
    Unsupported {
        domain: String,
        #[source]
        source: rustls::Error,
    },
}

/// A certificate and its key, ready to serve.
pub fn certified_key(domain: &str, chain_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, CertificateError> {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|source| CertificateError::Chain { domain: domain.to_owned(), source })?;
    let key =
        pki::key_der_from_pem(key_pem).map_err(|source| CertificateError::Key { domain: domain.to_owned(), source })?;
    let signer = any_supported_type(&key)
        .map_err(|source| CertificateError::Unsupported { domain: domain.to_owned(), source })?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

pub struct Certificates {
    routes: watch::Receiver<Arc<Routes>>,
    ca: RwLock<Option<Arc<ClusterCa>>>,
    issued: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    made: Mutex<HashMap<String, (Arc<CertifiedKey>, Instant)>>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates").finish_non_exhaustive()
    }
}

impl Certificates {
    pub fn new(routes: watch::Receiver<Arc<Routes>>) -> Certificates {
        Certificates {
            routes,
            ca: RwLock::new(None),
            issued: RwLock::new(HashMap::new()),
            made: Mutex::new(HashMap::new()),
        }
    }

    /// The CA that signs certificates of apps under the cluster domain. A
    /// new one (after a CA rotation) replaces the certificates made so far.
    pub fn set_ca(&self, ca: Arc<ClusterCa>) {
        let mut current = self.ca.write().unwrap_or_else(|p| p.into_inner());
        let replaced = current.as_ref().is_some_and(|old| old.digest() != ca.digest());
        *current = Some(ca);
        if replaced {
            self.made.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// A certificate for an app under the cluster domain that another node
    /// made, for a node without the CA (a worker holds no CA key); served
    /// as one made here would be.
    pub fn insert_made(&self, name: &str, certificate: Arc<CertifiedKey>) {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        made.insert(name.to_ascii_lowercase(), (certificate, Instant::now()));
    }

    /// The ACME certificates to serve, by domain (replacing the previous set).
    pub fn set_issued(&self, issued: HashMap<String, Arc<CertifiedKey>>) {
        *self.issued.write().unwrap_or_else(|p| p.into_inner()) = issued;
    }

    /// The certificate for `name`, if the edge serves it.
    pub fn for_name(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.to_ascii_lowercase();
        if let Some(key) = self.issued.read().unwrap_or_else(|p| p.into_inner()).get(&name) {
            return Some(key.clone());
        }
        self.routes.borrow().cluster_app(&name)?;
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((key, at)) = made.get(&name) {
            if at.elapsed() < REMAKE_AFTER {
                return Some(key.clone());
            }
        }
        let ca = self.ca.read().unwrap_or_else(|p| p.into_inner()).clone()?;
        let made_now = ca
            .issue_server(&name)
            .map_err(|e| e.to_string())
            .and_then(|(cert, key)| certified_key(&name, &cert, &key).map_err(|e| e.to_string()));
        match made_now {
            Ok(key) => {
                made.insert(name, (key.clone(), Instant::now()));
                Some(key)
            }
            Err(error) => {
                tracing::warn!(%name, %error, "could not make a certificate");
                None
            }
        }
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.for_name(hello.server_name()?)
    }
}

/// The edge's TLS server configuration: certificates by SNI, HTTP/2 and
/// HTTP/1.1 by ALPN, TLS 1.2 and 1.3 (public clients vary; the node port
/// itself is TLS 1.3 only).
pub fn server_config(certificates: Arc<Certificates>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certificates);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
