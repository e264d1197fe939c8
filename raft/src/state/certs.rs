//! TLS certificates of custom domains, as replicated data.
//!
//! `roost certs add DOMAIN -a APP` records a certificate `pending`; the
//! leader's ACME driver orders it, records the HTTP-01 challenge here (so
//! whichever node the ACME server reaches can answer it), and records the
//! issued chain and its key (sealed with the cluster's secrets key, never in
//! plain text), or the ACME error. Every node serves what is recorded.

use serde::{Deserialize, Serialize};

use super::{State, UnixMillis};
use crate::command::{Rejection, Response};
use crate::workload::SealedSecret;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificateStatus {
    /// Not issued yet: ordering, or waiting to.
    Pending,
    Issued,
    /// The latest order failed; `error` says why. An earlier certificate,
    /// if any, keeps being served until it expires.
    Failed,
}

impl std::fmt::Display for CertificateStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CertificateStatus::Pending => "pending",
            CertificateStatus::Issued => "issued",
            CertificateStatus::Failed => "failed",
        })
    }
}

/// An HTTP-01 challenge in progress: `GET /.well-known/acme-challenge/TOKEN`
/// must answer `key_authorization` on every node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeChallenge {
    pub token: String,
    pub key_authorization: String,
}

/// What a certificate's key and chain are, once issued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    /// The leaf first, then the intermediates (PEM).
    pub chain_pem: String,
    /// The private key (PEM), sealed with the cluster's secrets key.
    pub key: SealedSecret,
    pub not_after: UnixMillis,
    pub issued_at: UnixMillis,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub domain: String,
    pub app: String,
    pub status: CertificateStatus,
    /// The ACME error of the latest failed order.
    pub error: Option<String>,
    /// The certificate served now, if any.
    pub issued: Option<IssuedCertificate>,
    pub challenge: Option<AcmeChallenge>,
    /// Orders that failed in a row, for backoff.
    pub failures: u32,
    /// When the driver may order again after a failure.
    pub retry_at: Option<UnixMillis>,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
}

/// Checks a domain a user attaches: lowercase DNS labels, at least two.
pub fn validate_domain(domain: &str) -> Result<(), String> {
    if domain.len() > 253 {
        return Err("it is longer than 253 characters".into());
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 {
        return Err("it needs at least two labels, like app.example.com".into());
    }
    for label in labels {
        let valid = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid {
            return Err(format!(
                "'{label}' is not a valid label: lowercase letters, digits and '-', not at either end, at most 63"
            ));
        }
    }
    Ok(())
}

impl State {
    /// The cluster domain apps are served under (`APP.DOMAIN`).
    pub fn cluster_domain(&self) -> &str {
        self.cluster.as_ref().map_or(super::DEFAULT_DOMAIN, |c| c.domain.as_str())
    }

    pub(super) fn add_certificate(&mut self, domain: &str, app: &str, at: UnixMillis) -> Response {
        if let Err(reason) = validate_domain(domain) {
            return Response::Rejected(Rejection::InvalidDomain { domain: domain.to_owned(), reason });
        }
        // Under the cluster domain, a name is an app's own (APP.DOMAIN): it
        // may get an ACME certificate in place of the cluster CA's, for that
        // app only.
        let cluster_domain = self.cluster_domain().to_owned();
        let under = domain.strip_suffix(cluster_domain.as_str()).and_then(|rest| rest.strip_suffix('.'));
        if domain == cluster_domain || under.is_some_and(|name| name != app) {
            return Response::Rejected(Rejection::InvalidDomain {
                domain: domain.to_owned(),
                reason: format!("names under the cluster domain {cluster_domain} belong to the app they name (APP.{cluster_domain})"),
            });
        }
        if !self.apps.contains_key(app) {
            return Response::Rejected(Rejection::AppNotFound { name: app.to_owned() });
        }
        if let Some(existing) = self.certificates.get(domain) {
            return Response::Rejected(Rejection::CertificateExists {
                domain: domain.to_owned(),
                app: existing.app.clone(),
            });
        }
        self.certificates.insert(
            domain.to_owned(),
            Certificate {
                domain: domain.to_owned(),
                app: app.to_owned(),
                status: CertificateStatus::Pending,
                error: None,
                issued: None,
                challenge: None,
                failures: 0,
                retry_at: None,
                created_at: at,
                updated_at: at,
            },
        );
        Response::Done
    }

    pub(super) fn remove_certificate(&mut self, domain: &str) -> Response {
        match self.certificates.remove(domain) {
            Some(_) => Response::Done,
            None => Response::Rejected(Rejection::CertificateNotFound { domain: domain.to_owned() }),
        }
    }

    fn certificate_mut(&mut self, domain: &str) -> Result<&mut Certificate, Rejection> {
        self.certificates.get_mut(domain).ok_or_else(|| Rejection::CertificateNotFound { domain: domain.to_owned() })
    }

    pub(super) fn set_challenge(
        &mut self,
        domain: &str,
        challenge: Option<&AcmeChallenge>,
        at: UnixMillis,
    ) -> Response {
        match self.certificate_mut(domain) {
            Ok(certificate) => {
                certificate.challenge = challenge.cloned();
                certificate.updated_at = at;
                Response::Done
            }
            Err(rejection) => Response::Rejected(rejection),
        }
    }

    pub(super) fn certificate_issued(&mut self, domain: &str, issued: &IssuedCertificate, at: UnixMillis) -> Response {
        match self.certificate_mut(domain) {
            Ok(certificate) => {
                certificate.status = CertificateStatus::Issued;
                certificate.issued = Some(issued.clone());
                certificate.error = None;
                certificate.challenge = None;
                certificate.failures = 0;
                certificate.retry_at = None;
                certificate.updated_at = at;
                Response::Done
            }
            Err(rejection) => Response::Rejected(rejection),
        }
    }

    pub(super) fn certificate_failed(
        &mut self,
        domain: &str,
        error: &str,
        retry_at: UnixMillis,
        at: UnixMillis,
    ) -> Response {
        match self.certificate_mut(domain) {
            Ok(certificate) => {
                certificate.status = CertificateStatus::Failed;
                certificate.error = Some(error.to_owned());
                certificate.challenge = None;
                certificate.failures = certificate.failures.saturating_add(1);
                certificate.retry_at = Some(retry_at);
                certificate.updated_at = at;
                Response::Done
            }
            Err(rejection) => Response::Rejected(rejection),
        }
    }
}
