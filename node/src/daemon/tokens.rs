//! `roost tokens`: API tokens with scopes, made, listed, revoked and
//! rotated through the log.
//!
//! The CLI draws a new token's secret and sends only its digest and the
//! public key of its key pair (which signed calls are checked against): no
//! node ever sees a token. Every
//! call here needs an admin token.

use roost_network::pki::secret_digest;
use roost_network::Token;
use roost_proto::api::{
    ApiToken as WireToken, CreateTokenRequest, CreatedToken, ListTokensRequest, ListTokensResponse, RevokeTokenRequest,
    RotateTokenRequest,
};
use roost_raft::state::{validate_name, ApiToken, Scope, TokenView};
use roost_raft::{Command, Rejection};
use tonic::Status;

use super::api::{rejection_status, ControlService};

/// The longest a token may be made to last: beyond this, make it never expire.
pub const MAX_EXPIRY_MS: i64 = 10 * 366 * 24 * 3600 * 1000;

fn token_to_wire(token: &TokenView) -> WireToken {
    WireToken {
        id: token.id.clone(),
        name: token.name.clone(),
        scope: token.scope.to_string(),
        created_at_ms: token.created_at,
        expires_at_ms: token.expires_at,
        last_used_at_ms: token.last_used,
    }
}

impl ControlService {
    pub(super) async fn create_token(&self, request: CreateTokenRequest) -> Result<CreatedToken, Status> {
        let scope = Scope::parse(&request.scope).map_err(|e| Status::invalid_argument(format!("--scope: {e}")))?;
        // The leader's clock, which expiry is judged by, so a token made
        // through a node whose clock is off lives as long as it was asked to.
        let now = self.clock.leader_now();
        let expires_at =
            match request.expires_in_ms {
                None => None,
                Some(ms) if ms > 0 && ms <= MAX_EXPIRY_MS => Some(now.saturating_add(ms)),
                Some(_) => return Err(Status::invalid_argument(
                    "--expires must be above zero and at most 10 years; leave it out for a token that never expires",
                )),
            };
        let id = roost_network::pki::hex(&rand::random::<[u8; 4]>());
        let name = if request.name.is_empty() { format!("token-{id}") } else { request.name };
        if let Err(reason) = validate_name(&name) {
            return Err(rejection_status(Rejection::InvalidTokenName { name, reason }));
        }
        let (secret_sha256, public_key) = drawn_by_client(&request.secret_sha256, &request.public_key)?;
        let token = ApiToken {
            id: id.clone(),
            name: name.clone(),
            scope: scope.clone(),
            secret_sha256,
            public_key,
            created_at: now,
            expires_at,
            last_used: None,
        };
        self.propose(Command::CreateToken { token }).await?;
        tracing::info!(token = %name, %id, %scope, "API token created");
        let view = TokenView { id, name, scope, created_at: now, expires_at, last_used: None };
        Ok(CreatedToken { token: Some(token_to_wire(&view)), secret: String::new() })
    }

    pub(super) async fn list_tokens(&self, request: ListTokensRequest) -> Result<ListTokensResponse, Status> {
        self.barrier(request.read).await?;
        let tokens = self.consensus.state().read(|s| s.tokens());
        Ok(ListTokensResponse { tokens: tokens.iter().map(token_to_wire).collect() })
    }

    pub(super) async fn revoke_token(&self, request: RevokeTokenRequest) -> Result<(), Status> {
        self.propose(Command::RevokeToken { token: request.token.clone() }).await?;
        tracing::info!(token = %request.token, "API token revoked");
        Ok(())
    }

    pub(super) async fn rotate_token(&self, request: RotateTokenRequest) -> Result<CreatedToken, Status> {
        self.barrier(None).await?;
        let found = self.consensus.state().read(|s| s.find_token(&request.token));
        let Some(view) = found else {
            return Err(rejection_status(Rejection::TokenNotFound { token: request.token }));
        };
        let (secret_sha256, public_key) = drawn_by_client(&request.secret_sha256, &request.public_key)?;
        self.propose(Command::RotateToken { token: view.id.clone(), secret_sha256, public_key }).await?;
        tracing::info!(token = %view.name, id = %view.id, "API token rotated");
        Ok(CreatedToken { token: Some(token_to_wire(&view)), secret: String::new() })
    }
}

/// The digest and public key of a token the client drew, checked for form:
/// 32 bytes each, hex.
fn drawn_by_client(secret_sha256: &str, public_key: &str) -> Result<(String, String), Status> {
    let is_hex_32 = |text: &str| text.len() == 64 && roost_network::pki::unhex(text).is_some();
    if secret_sha256.is_empty() && public_key.is_empty() {
        return Err(Status::invalid_argument(
            "this CLI asked the node to draw the token; a node never sees a token now: update the roost CLI to this cluster's version",
        ));
    }
    if !is_hex_32(secret_sha256) || !is_hex_32(public_key) {
        return Err(Status::invalid_argument(
            "a new token's digest and public key must be 64 lowercase hex characters each",
        ));
    }
    Ok((secret_sha256.to_owned(), public_key.to_owned()))
}

/// Gives the initial admin token of a cluster made before calls were signed
/// its public key: the node that holds `admin.token` proposes it with
/// the token itself as the grant ([`Command::KeyAdminToken`], applied only
/// while the token is still that one and has no key). Until then the CLI's
/// signed calls with that token are refused as unknown; calls that send the
/// token itself still work.
pub async fn key_legacy_admin_token(
    consensus: std::sync::Arc<roost_raft::Consensus>,
    path: std::path::PathBuf,
    stop: tokio_util::sync::CancellationToken,
) {
    let Ok(text) = std::fs::read_to_string(&path) else { return };
    let Ok(token) = Token::parse(&text) else { return };
    let digest = secret_digest(&token.secret);
    let public_key = token.key().public_key();
    let mut changes = consensus.state().changes();
    let mut retry = std::time::Duration::from_secs(1);
    loop {
        // Rotated since, or keyed already: nothing to do unless that changes.
        let needed = consensus.state().read(|s| {
            s.cluster.as_ref().is_some_and(|c| c.admin_secret_sha256 == digest && c.admin_public_key.is_empty())
        });
        if needed {
            let command = Command::KeyAdminToken { secret_sha256: digest.clone(), public_key: public_key.clone() };
            let grant = roost_raft::Grant::Token { token: token.to_string() };
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            match consensus.propose_granted(command, Some(grant), deadline).await {
                Ok(roost_raft::Response::Done) => {
                    tracing::info!("the admin token has its public key now: the CLI signs its calls with it")
                }
                // Rotated meanwhile: the new secret came with its key.
                Ok(other) => tracing::debug!(?other, "the admin token was not keyed"),
                Err(error) => {
                    tracing::debug!(%error, "could not record the admin token's public key yet");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(std::time::Duration::from_secs(60));
                    continue;
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}
