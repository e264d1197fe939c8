//! The ACME driver: on the leader, orders the certificates the state says
//! are due, one at a time, and records what happened.
//!
//! Due ([`due`], pure): a `pending` certificate, a `failed` one whose retry
//! time has come (backoff doubles from 30 s to an hour), and an issued one
//! within [`RENEW_BEFORE`] of its expiry. An order publishes its HTTP-01
//! challenge through the state, so every node's edge answers it; the
//! issued chain and its key (sealed) go through the state too, and every
//! node serves them on the next change, without a restart. The account's
//! credentials are kept in the state, sealed, so a new leader goes on with
//! the same account.

use std::sync::Arc;
use std::time::Duration;

use roost_deploy::secrets::SecretsKey;
use roost_network::acme::{AcmeClient, Challenge};
use roost_proto::api::{
    AddCertificateRequest, Certificate as WireCertificate, GetCertificateRequest, ListCertificatesRequest,
    ListCertificatesResponse, RemoveCertificateRequest,
};
use roost_raft::consensus::now_millis;
use roost_raft::state::{
    validate_domain, AcmeChallenge, AcmeSettings, Certificate, CertificateStatus, IssuedCertificate, UnixMillis,
};
use roost_raft::{Command, Consensus, Rejection, Response, State};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::api::{rejection_status, ControlService};
use super::edge::CERTIFICATE_KEYS;

/// Certificates are renewed this long before they expire.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
const ACCOUNT: (&str, &str) = ("roost:acme", "account");
const CHECK_EVERY: Duration = Duration::from_secs(5);
const FIRST_RETRY: Duration = Duration::from_secs(30);
const LAST_RETRY: Duration = Duration::from_secs(3600);

/// The domains whose certificate should be ordered at `now`.
pub fn due(state: &State, now: UnixMillis) -> Vec<String> {
    state
        .certificates
        .values()
        .filter(|c| c.retry_at.is_none_or(|at| now >= at))
        .filter(|c| match c.status {
            CertificateStatus::Pending | CertificateStatus::Failed => true,
            CertificateStatus::Issued => {
                c.issued.as_ref().is_none_or(|i| now >= i.not_after - RENEW_BEFORE.as_millis() as i64)
            }
        })
        .map(|c| c.domain.clone())
        .collect()
}

/// When to try again after `failures` failed orders in a row.
fn retry_after(failures: u32) -> Duration {
    FIRST_RETRY.saturating_mul(1 << failures.min(7)).min(LAST_RETRY)
}

pub async fn run(consensus: Arc<Consensus>, key: Arc<SecretsKey>, stop: CancellationToken) {
    let mut changes = consensus.state().workload_changes();
    let mut client: Option<(AcmeSettings, AcmeClient)> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
        if !consensus.is_leader() {
            client = None;
            continue;
        }
        let (settings, account, due) = consensus.state().read(|state| {
            let settings = state.cluster.as_ref().and_then(|c| c.acme.clone());
            (settings, state.acme_account.clone(), due(state, now_millis()))
        });
        let Some(settings) = settings else { continue };
        for domain in due {
            if stop.is_cancelled() || !consensus.is_leader() {
                break;
            }
            if client.as_ref().is_none_or(|(current, _)| *current != settings) {
                let credentials = account.as_ref().and_then(|sealed| key.open(ACCOUNT.0, ACCOUNT.1, sealed).ok());
                match connect(&consensus, &key, &settings, credentials.as_deref()).await {
                    Ok(connected) => client = Some((settings.clone(), connected)),
                    Err(error) => {
                        failed(&consensus, &domain, &error).await;
                        continue;
                    }
                }
            }
            let Some((_, acme)) = client.as_ref() else { continue };
            order(&consensus, &key, acme, &domain).await;
        }
    }
}

/// Opens the saved account, or creates one and saves it.
async fn connect(
    consensus: &Consensus,
    key: &SecretsKey,
    settings: &AcmeSettings,
    credentials: Option<&str>,
) -> Result<AcmeClient, String> {
    let (client, created) =
        AcmeClient::connect(&settings.directory, settings.email.as_deref(), settings.ca_pem.as_deref(), credentials)
            .await
            .map_err(|e| e.to_string())?;
    if let Some(created) = created {
        let sealed = key.seal(ACCOUNT.0, ACCOUNT.1, &created, now_millis()).map_err(|e| e.to_string())?;
        propose(consensus, Command::SetAcmeAccount { credentials: sealed }).await?;
        tracing::info!(directory = %settings.directory, "created the cluster's ACME account");
    }
    Ok(client)
}

async fn order(consensus: &Consensus, key: &SecretsKey, acme: &AcmeClient, domain: &str) {
    tracing::info!(%domain, "ordering a certificate");
    let publish = |challenge: Challenge| async move {
        let challenge = AcmeChallenge { token: challenge.token, key_authorization: challenge.key_authorization };
        propose(consensus, Command::SetAcmeChallenge { domain: domain.to_owned(), challenge: Some(challenge) }).await
    };
    let issued = match acme.issue(domain, publish).await {
        Ok(issued) => issued,
        Err(error) => {
            failed(consensus, domain, &error.to_string()).await;
            return;
        }
    };
    let sealed = match key.seal(CERTIFICATE_KEYS, domain, &issued.key_pem, now_millis()) {
        Ok(sealed) => sealed,
        Err(error) => {
            failed(consensus, domain, &error.to_string()).await;
            return;
        }
    };
    let issued = IssuedCertificate {
        chain_pem: issued.chain_pem,
        key: sealed,
        not_after: issued.not_after,
        issued_at: now_millis(),
    };
    let expires = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_millis(issued.not_after.max(0) as u64),
    );
    match propose(consensus, Command::CertificateIssued { domain: domain.to_owned(), issued }).await {
        Ok(()) => tracing::info!(%domain, %expires, "certificate issued"),
        Err(error) => {
            tracing::warn!(%domain, %error, "an issued certificate could not be recorded; ordering again later")
        }
    }
}

async fn failed(consensus: &Consensus, domain: &str, error: &str) {
    tracing::warn!(%domain, %error, "ordering a certificate failed");
    let failures = consensus.state().read(|s| s.certificates.get(domain).map_or(0, |c| c.failures));
    let retry_at = now_millis() + retry_after(failures).as_millis() as i64;
    let command = Command::CertificateFailed { domain: domain.to_owned(), error: error.to_owned(), retry_at };
    if let Err(error) = propose(consensus, command).await {
        tracing::debug!(%domain, %error, "could not record a failed order");
    }
}

fn certificate_to_wire(certificate: &Certificate) -> WireCertificate {
    let issued = certificate.issued.as_ref();
    WireCertificate {
        domain: certificate.domain.clone(),
        app: certificate.app.clone(),
        status: certificate.status.to_string(),
        error: certificate.error.clone().unwrap_or_default(),
        not_after_ms: issued.map(|i| i.not_after),
        issued_at_ms: issued.map(|i| i.issued_at),
        created_at_ms: certificate.created_at,
        issuer: issued.and_then(|i| roost_network::acme::issuer(&i.chain_pem)).unwrap_or_default(),
        validating: certificate.challenge.is_some(),
        retry_at_ms: certificate.retry_at,
    }
}

impl ControlService {
    pub(super) async fn add_certificate(&self, request: AddCertificateRequest) -> Result<WireCertificate, Status> {
        let domain = request.domain.trim_end_matches('.').to_ascii_lowercase();
        if let Err(reason) = validate_domain(&domain) {
            return Err(rejection_status(Rejection::InvalidDomain { domain, reason }));
        }
        self.propose(Command::AddCertificate { domain: domain.clone(), app: request.app.clone() }).await?;
        tracing::info!(%domain, app = %request.app, "certificate added; the leader orders it");
        self.consensus
            .state()
            .read(|s| s.certificates.get(&domain).map(certificate_to_wire))
            .ok_or_else(|| rejection_status(Rejection::CertificateNotFound { domain }))
    }

    pub(super) async fn list_certificates(
        &self,
        request: ListCertificatesRequest,
    ) -> Result<ListCertificatesResponse, Status> {
        self.barrier(request.read).await?;
        let (known, certificates) = self.consensus.state().read(|s| {
            let known = request.app.is_empty() || s.apps.contains_key(&request.app);
            let list = s
                .certificates
                .values()
                .filter(|c| request.app.is_empty() || c.app == request.app)
                .map(certificate_to_wire)
                .collect();
            (known, list)
        });
        if !known {
            return Err(rejection_status(Rejection::AppNotFound { name: request.app }));
        }
        Ok(ListCertificatesResponse { certificates })
    }

    pub(super) async fn get_certificate(&self, request: GetCertificateRequest) -> Result<WireCertificate, Status> {
        self.barrier(request.read).await?;
        let domain = request.domain.trim_end_matches('.').to_ascii_lowercase();
        self.consensus
            .state()
            .read(|s| s.certificates.get(&domain).map(certificate_to_wire))
            .ok_or_else(|| rejection_status(Rejection::CertificateNotFound { domain }))
    }

    pub(super) async fn remove_certificate(&self, request: RemoveCertificateRequest) -> Result<(), Status> {
        let domain = request.domain.trim_end_matches('.').to_ascii_lowercase();
        self.propose(Command::RemoveCertificate { domain: domain.clone() }).await?;
        tracing::info!(%domain, "certificate removed");
        Ok(())
    }
}

async fn propose(consensus: &Consensus, command: Command) -> Result<(), String> {
    match consensus.propose_as_leader(command, Instant::now() + Duration::from_secs(10)).await {
        Ok(Response::Rejected(rejection)) => Err(rejection.to_string()),
        Ok(_) => Ok(()),
        Err(error) => Err(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use roost_raft::testkit::{apply, cluster};
    use roost_raft::workload::SealedSecret;

    use super::*;

    const DAY: i64 = 24 * 3600 * 1000;

    fn issued(not_after: i64) -> IssuedCertificate {
        let key = SealedSecret { sealed: String::new(), digest: String::new(), updated_at: 0 };
        IssuedCertificate { chain_pem: String::new(), key, not_after, issued_at: 0 }
    }

    #[test]
    fn pending_failed_and_expiring_certificates_are_due_and_backoff_is_honoured() {
        let mut state = cluster(1, |_| Vec::new());
        apply(&mut state, Command::CreateApp { name: "shop".into() });
        for domain in ["new.example.com", "fresh.example.com", "old.example.com", "bad.example.com"] {
            apply(&mut state, Command::AddCertificate { domain: domain.into(), app: "shop".into() });
        }
        let now = 100 * DAY;
        apply(
            &mut state,
            Command::CertificateIssued { domain: "fresh.example.com".into(), issued: issued(now + 60 * DAY) },
        );
        apply(
            &mut state,
            Command::CertificateIssued { domain: "old.example.com".into(), issued: issued(now + 29 * DAY) },
        );
        let retry_at = now + 1000;
        apply(&mut state, Command::CertificateFailed { domain: "bad.example.com".into(), error: "e".into(), retry_at });
        let mut found = due(&state, now);
        found.sort();
        assert_eq!(found, ["new.example.com", "old.example.com"]);
        assert!(due(&state, retry_at).contains(&"bad.example.com".to_owned()));
    }

    #[test]
    fn retries_back_off_from_half_a_minute_to_an_hour() {
        assert_eq!(retry_after(0), Duration::from_secs(30));
        assert_eq!(retry_after(1), Duration::from_secs(60));
        assert_eq!(retry_after(20), Duration::from_secs(3600));
    }
}
