//! Ordering certificates over ACME (instant-acme), with the HTTP-01
//! challenge.
//!
//! The node's driver decides when (only the leader orders) and records
//! results in the state; this module speaks the protocol. The challenge's
//! token and key authorization are handed to a `publish` callback, which
//! must not return before every node can answer them: whichever node the
//! ACME server reaches answers `/.well-known/acme-challenge/TOKEN`.
//!
//! The directory is trusted through the usual web roots plus, when given,
//! one extra root (a private ACME server such as pebble).

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, ChallengeType, Identifier, NewAccount, NewOrder,
    OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

/// A challenge every node must answer while an order is validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub token: String,
    pub key_authorization: String,
}

/// An issued certificate.
#[derive(Clone)]
pub struct Issued {
    /// Leaf first, then intermediates.
    pub chain_pem: String,
    pub key_pem: String,
    /// Unix milliseconds.
    pub not_after: i64,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

/// Why an order failed; the text is what `roost certs list` shows.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("the extra ACME root certificate is unusable: {0}")]
    Root(String),
    #[error("cannot reach the ACME directory {directory}: {message}")]
    Directory { directory: String, message: String },
    #[error("the saved ACME account is unreadable: {0}")]
    Credentials(String),
    #[error("the ACME server refused: {0}")]
    Refused(String),
    #[error("{domain}: {message}")]
    Validation { domain: String, message: String },
    #[error("could not make the certificate's key or request: {0}")]
    Key(String),
    #[error("the issued certificate is unreadable: {0}")]
    Certificate(String),
    #[error("the challenge could not be published to every node: {0}")]
    Publish(String),
}

/// An ACME account, ready to order.
pub struct AcmeClient {
    account: Account,
}

impl std::fmt::Debug for AcmeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeClient").field("account", &self.account.id()).finish()
    }
}

/// A description of an instant-acme error: an ACME problem's detail, or the
/// innermost cause of a transport error.
fn describe(error: &instant_acme::Error) -> String {
    match error {
        instant_acme::Error::Api(problem) => {
            let detail = problem.detail.clone().unwrap_or_default();
            match &problem.r#type {
                Some(kind) => format!("{detail} ({kind})"),
                None => detail,
            }
        }
        other => crate::tls::innermost(other),
    }
}

fn http_client(extra_root: Option<&str>) -> Result<Box<dyn instant_acme::HttpClient>, AcmeError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_root {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| AcmeError::Root(e.to_string()))?;
            roots.add(cert).map_err(|e| AcmeError::Root(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(AcmeError::Root("it holds no PEM certificate".into()));
        }
    }
    let tls =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| AcmeError::Root(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client: Client<_, BodyWrapper<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    Ok(Box::new(client))
}

impl AcmeClient {
    /// Opens the account saved as `credentials` (JSON), or creates one; a
    /// new account's credentials are returned, to be saved.
    pub async fn connect(
        directory: &str,
        email: Option<&str>,
        extra_root: Option<&str>,
        credentials: Option<&str>,
    ) -> Result<(AcmeClient, Option<String>), AcmeError> {
        let unreachable = |error: instant_acme::Error| AcmeError::Directory {
            directory: directory.to_owned(),
            message: describe(&error),
        };
        let builder = Account::builder_with_http(http_client(extra_root)?);
        if let Some(credentials) = credentials {
            let credentials: AccountCredentials =
                serde_json::from_str(credentials).map_err(|e| AcmeError::Credentials(e.to_string()))?;
            let account = builder.from_credentials(credentials).await.map_err(unreachable)?;
            return Ok((AcmeClient { account }, None));
        }
        let contact = email.map(|email| format!("mailto:{email}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let new = NewAccount { contact: &contacts, terms_of_service_agreed: true, only_return_existing: false };
        let (account, credentials) = builder.create(&new, directory.to_owned(), None).await.map_err(unreachable)?;
        let saved = serde_json::to_string(&credentials).map_err(|e| AcmeError::Credentials(e.to_string()))?;
        Ok((AcmeClient { account }, Some(saved)))
    }

    /// Orders a certificate for `domain`. `publish` is given the HTTP-01
    /// challenge and must return only once every node answers it.
    pub async fn issue<F, Fut>(&self, domain: &str, mut publish: F) -> Result<Issued, AcmeError>
    where
        F: FnMut(Challenge) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let refused = |error: instant_acme::Error| AcmeError::Refused(describe(&error));
        let identifiers = [Identifier::Dns(domain.to_owned())];
        let mut order = self.account.new_order(&NewOrder::new(&identifiers)).await.map_err(refused)?;
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.map_err(refused)?;
            match authorization.status {
                AuthorizationStatus::Pending => {}
                // An authorization the server still holds as valid.
                AuthorizationStatus::Valid => continue,
                status => {
                    return Err(AcmeError::Validation {
                        domain: domain.to_owned(),
                        message: format!("the authorization is {status:?}"),
                    })
                }
            }
            let mut challenge =
                authorization.challenge(ChallengeType::Http01).ok_or_else(|| AcmeError::Validation {
                    domain: domain.to_owned(),
                    message: "the ACME server offers no HTTP-01 challenge".into(),
                })?;
            let key_authorization = challenge.key_authorization().as_str().to_owned();
            publish(Challenge { token: challenge.token.clone(), key_authorization })
                .await
                .map_err(AcmeError::Publish)?;
            challenge.set_ready().await.map_err(refused)?;
        }
        let retry =
            RetryPolicy::new().initial_delay(Duration::from_millis(250)).backoff(1.5).timeout(Duration::from_secs(90));
        let status = match order.poll_ready(&retry).await {
            Ok(status) => status,
            Err(error) => {
                let detail = challenge_errors(&mut order).await;
                let message = if detail.is_empty() { describe(&error) } else { detail };
                return Err(AcmeError::Validation { domain: domain.to_owned(), message });
            }
        };
        if status != OrderStatus::Ready {
            let detail = challenge_errors(&mut order).await;
            return Err(AcmeError::Validation {
                domain: domain.to_owned(),
                message: format!("the order is {status:?}: {detail}"),
            });
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| AcmeError::Key(e.to_string()))?;
        let mut params = CertificateParams::new(vec![domain.to_owned()]).map_err(|e| AcmeError::Key(e.to_string()))?;
        params.distinguished_name = DistinguishedName::new();
        let request = params.serialize_request(&key).map_err(|e| AcmeError::Key(e.to_string()))?;
        order.finalize_csr(request.der()).await.map_err(refused)?;
        let chain_pem = order.poll_certificate(&retry).await.map_err(refused)?;
        let not_after = not_after(&chain_pem)?;
        Ok(Issued { chain_pem, key_pem: key.serialize_pem(), not_after })
    }
}

/// The errors of the order's challenges, as the ACME server reports them.
async fn challenge_errors(order: &mut instant_acme::Order) -> String {
    let mut errors = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        if authorization.refresh().await.is_err() {
            continue;
        }
        for challenge in &authorization.challenges {
            if let Some(problem) = &challenge.error {
                errors.push(problem.detail.clone().unwrap_or_else(|| format!("{problem:?}")));
            }
        }
    }
    errors.join("; ")
}

/// The leaf's notAfter, in Unix milliseconds.
pub fn not_after(chain_pem: &str) -> Result<i64, AcmeError> {
    crate::pki::validity(chain_pem).map(|(_, not_after)| not_after).map_err(|e| AcmeError::Certificate(e.to_string()))
}

/// The leaf's issuer, as its common name (or the whole name when it has none).
pub fn issuer(chain_pem: &str) -> Option<String> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes()).next()?.ok()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let name = parsed.issuer();
    let common = name.iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned);
    Some(common.unwrap_or_else(|| name.to_string()))
}
