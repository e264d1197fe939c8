//! API tokens and what each may do, as replicated data.
//!
//! The cluster's first token (the admin token `node init` writes to
//! `admin.token`) is recorded in [`ClusterInfo`](super::ClusterInfo) and is
//! listed here as the token named [`INITIAL_ADMIN`]; it can be rotated, never
//! revoked, so a cluster always has an admin. Every other token is an
//! [`ApiToken`] created by `roost tokens create` with a [`Scope`]. Only
//! SHA-256 digests of the secrets are kept: the node that creates a token
//! draws the secret, records its digest through the log, and prints the
//! secret once.
//!
//! Whether a token has expired is decided where it is checked (against that
//! node's clock), not here: apply reads no clock.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{validate_name, State, UnixMillis};
use crate::command::{Rejection, Response};

/// The id and name under which the initial admin token is listed.
pub const INITIAL_ADMIN: &str = "admin";

/// Tokens a cluster may hold besides the initial admin token.
pub const MAX_TOKENS: usize = 256;

/// What a token may do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Scope {
    /// Everything.
    Admin,
    /// Deploy, scale, restart, suspend, roll back, set secrets of one app,
    /// and read its status, releases, secrets' names and logs.
    Deploy { app: String },
    /// Read anything the API shows; change nothing.
    Read,
}

/// What an API call or a proposed command needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access<'a> {
    /// Reading cluster-wide facts: nodes, every app, every certificate.
    ReadCluster,
    /// Reading one app: its status, releases, secrets' names, logs.
    ReadApp(&'a str),
    /// Changing one app: deploys, scale, restarts, secrets.
    WriteApp(&'a str),
    /// Everything else: apps coming and going, nodes, domains, tokens.
    Admin,
}

impl fmt::Display for Access<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Access::ReadCluster => f.write_str("reading the cluster"),
            Access::ReadApp(app) => write!(f, "reading app '{app}'"),
            Access::WriteApp(app) => write!(f, "changing app '{app}'"),
            Access::Admin => f.write_str("an admin token"),
        }
    }
}

impl Scope {
    /// Parses `admin`, `read` or `deploy:APP`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "admin" => Ok(Scope::Admin),
            "read" => Ok(Scope::Read),
            _ => match text.strip_prefix("deploy:") {
                Some(app) => {
                    validate_name(app).map_err(|reason| format!("invalid app name '{app}' in the scope: {reason}"))?;
                    Ok(Scope::Deploy { app: app.to_owned() })
                }
                None => Err(format!("unknown scope '{text}': a scope is admin, read or deploy:APP")),
            },
        }
    }

    pub fn allows(&self, access: Access<'_>) -> bool {
        match (self, access) {
            (Scope::Admin, _) => true,
            (Scope::Read, Access::ReadCluster | Access::ReadApp(_)) => true,
            (Scope::Deploy { app }, Access::ReadApp(wanted) | Access::WriteApp(wanted)) => app == wanted,
            _ => false,
        }
    }

    /// The one app this scope is confined to, if any.
    pub fn app(&self) -> Option<&str> {
        match self {
            Scope::Deploy { app } => Some(app),
            Scope::Admin | Scope::Read => None,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Admin => f.write_str("admin"),
            Scope::Read => f.write_str("read"),
            Scope::Deploy { app } => write!(f, "deploy:{app}"),
        }
    }
}

/// A token made by `roost tokens create`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    /// SHA-256 (hex) of the token's secret.
    pub secret_sha256: String,
    /// The public key (hex) of the secret's key pair, which signed calls are
    /// checked against; empty for a token made before calls were signed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub public_key: String,
    pub created_at: UnixMillis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<UnixMillis>,
    /// When a node last accepted it, to the minute or so (see
    /// `Command::TokensUsed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<UnixMillis>,
}

/// A token as `roost tokens list` shows it, the initial admin included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub created_at: UnixMillis,
    pub expires_at: Option<UnixMillis>,
    pub last_used: Option<UnixMillis>,
}

/// The token a secret digest belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenMatch {
    pub id: String,
    pub scope: Scope,
    pub expires_at: Option<UnixMillis>,
    pub last_used: Option<UnixMillis>,
}

impl From<&ApiToken> for TokenMatch {
    fn from(token: &ApiToken) -> Self {
        TokenMatch {
            id: token.id.clone(),
            scope: token.scope.clone(),
            expires_at: token.expires_at,
            last_used: token.last_used,
        }
    }
}

impl State {
    /// Every token, the initial admin first, then by name.
    pub fn tokens(&self) -> Vec<TokenView> {
        let mut views = Vec::with_capacity(self.api_tokens.len() + 1);
        if let Some(cluster) = &self.cluster {
            views.push(TokenView {
                id: INITIAL_ADMIN.into(),
                name: INITIAL_ADMIN.into(),
                scope: Scope::Admin,
                created_at: cluster.created_at,
                expires_at: None,
                last_used: self.admin_last_used,
            });
        }
        let mut rest: Vec<&ApiToken> = self.api_tokens.values().collect();
        rest.sort_by(|a, b| a.name.cmp(&b.name));
        views.extend(rest.into_iter().map(|t| TokenView {
            id: t.id.clone(),
            name: t.name.clone(),
            scope: t.scope.clone(),
            created_at: t.created_at,
            expires_at: t.expires_at,
            last_used: t.last_used,
        }));
        views
    }

    /// The token whose secret has this digest. Every recorded digest is
    /// compared in full (`eq` should be constant-time), so the answer's
    /// timing says nothing about how close a guess came.
    pub fn token_by_digest(&self, digest: &str, eq: impl Fn(&[u8], &[u8]) -> bool) -> Option<TokenMatch> {
        let mut found = None;
        if let Some(cluster) = &self.cluster {
            if eq(cluster.admin_secret_sha256.as_bytes(), digest.as_bytes()) {
                found = Some(self.initial_admin());
            }
        }
        for token in self.api_tokens.values() {
            if eq(token.secret_sha256.as_bytes(), digest.as_bytes()) {
                found = Some(TokenMatch::from(token));
            }
        }
        found
    }

    /// The token whose key pair has this public key (hex). Public keys are
    /// not secret, so no constant-time comparison is needed.
    pub fn token_by_key(&self, public_key: &str) -> Option<TokenMatch> {
        if public_key.is_empty() {
            return None;
        }
        if self.cluster.as_ref().is_some_and(|c| c.admin_public_key == public_key) {
            return Some(self.initial_admin());
        }
        self.api_tokens.values().find(|t| t.public_key == public_key).map(TokenMatch::from)
    }

    fn initial_admin(&self) -> TokenMatch {
        TokenMatch { id: INITIAL_ADMIN.into(), scope: Scope::Admin, expires_at: None, last_used: self.admin_last_used }
    }

    /// The token with this id or name.
    pub fn find_token(&self, id_or_name: &str) -> Option<TokenView> {
        let id = self.token_id(id_or_name)?;
        self.tokens().into_iter().find(|t| t.id == id)
    }

    /// The id of the token with this id or name.
    fn token_id(&self, id_or_name: &str) -> Option<String> {
        if id_or_name == INITIAL_ADMIN {
            return Some(INITIAL_ADMIN.into());
        }
        if self.api_tokens.contains_key(id_or_name) {
            return Some(id_or_name.to_owned());
        }
        self.api_tokens.values().find(|t| t.name == id_or_name).map(|t| t.id.clone())
    }

    pub(super) fn create_token(&mut self, token: &ApiToken) -> Response {
        if self.cluster.is_none() {
            return Response::Rejected(Rejection::NotBootstrapped);
        }
        if let Err(reason) = validate_name(&token.name) {
            return Response::Rejected(Rejection::InvalidTokenName { name: token.name.clone(), reason });
        }
        if token.name == INITIAL_ADMIN || self.token_id(&token.name).is_some() || self.token_id(&token.id).is_some() {
            return Response::Rejected(Rejection::TokenExists { name: token.name.clone() });
        }
        if self.api_tokens.len() >= MAX_TOKENS {
            return Response::Rejected(Rejection::TooManyTokens { max: MAX_TOKENS });
        }
        if self.secret_taken(&token.secret_sha256, &token.public_key, None) {
            return Response::Rejected(Rejection::TokenSecretTaken);
        }
        self.api_tokens.insert(token.id.clone(), ApiToken { last_used: None, ..token.clone() });
        Response::Done
    }

    pub(super) fn revoke_token(&mut self, id_or_name: &str) -> Response {
        match self.token_id(id_or_name) {
            Some(id) if id == INITIAL_ADMIN => Response::Rejected(Rejection::InitialAdminToken),
            Some(id) => {
                self.api_tokens.remove(&id);
                Response::Done
            }
            None => Response::Rejected(Rejection::TokenNotFound { token: id_or_name.to_owned() }),
        }
    }

    pub(super) fn rotate_token(&mut self, id_or_name: &str, secret_sha256: &str, public_key: &str) -> Response {
        let id = self.token_id(id_or_name);
        if self.secret_taken(secret_sha256, public_key, id.as_deref()) {
            return Response::Rejected(Rejection::TokenSecretTaken);
        }
        match id {
            Some(id) if id == INITIAL_ADMIN => match self.cluster.as_mut() {
                Some(cluster) => {
                    cluster.admin_secret_sha256 = secret_sha256.to_owned();
                    cluster.admin_public_key = public_key.to_owned();
                    Response::Done
                }
                None => Response::Rejected(Rejection::NotBootstrapped),
            },
            Some(id) => match self.api_tokens.get_mut(&id) {
                Some(token) => {
                    token.secret_sha256 = secret_sha256.to_owned();
                    token.public_key = public_key.to_owned();
                    Response::Done
                }
                None => Response::Rejected(Rejection::TokenNotFound { token: id_or_name.to_owned() }),
            },
            None => Response::Rejected(Rejection::TokenNotFound { token: id_or_name.to_owned() }),
        }
    }

    /// Whether a token other than `except` (by id) has this digest or public
    /// key: each token's must be its own, or one token's signatures would
    /// resolve to another's scope. Empty keys (tokens of older clusters)
    /// collide with nothing.
    fn secret_taken(&self, secret_sha256: &str, public_key: &str, except: Option<&str>) -> bool {
        let same = |digest: &str, key: &str| digest == secret_sha256 || (!public_key.is_empty() && key == public_key);
        let admin = except != Some(INITIAL_ADMIN)
            && self.cluster.as_ref().is_some_and(|c| same(&c.admin_secret_sha256, &c.admin_public_key));
        admin
            || self.api_tokens.values().any(|t| Some(t.id.as_str()) != except && same(&t.secret_sha256, &t.public_key))
    }

    /// Gives the initial admin token its public key, only if it still has
    /// this digest and no key: a rotation applied first wins.
    pub(super) fn key_admin_token(&mut self, secret_sha256: &str, public_key: &str) -> Response {
        match self.cluster.as_mut() {
            Some(cluster) if cluster.admin_secret_sha256 == secret_sha256 && cluster.admin_public_key.is_empty() => {
                cluster.admin_public_key = public_key.to_owned();
                Response::Done
            }
            Some(_) => Response::Rejected(Rejection::TokenNotFound { token: INITIAL_ADMIN.to_owned() }),
            None => Response::Rejected(Rejection::NotBootstrapped),
        }
    }

    /// Records uses; a time never goes back, none is later than the proposal
    /// (give or take a minute of clock skew), and unknown ids (revoked since)
    /// are ignored.
    pub(super) fn tokens_used(&mut self, used: &BTreeMap<String, UnixMillis>, proposed_at: UnixMillis) -> Response {
        for (id, &at) in used {
            let at = at.clamp(0, proposed_at.saturating_add(60_000));
            let last = if id == INITIAL_ADMIN {
                &mut self.admin_last_used
            } else {
                match self.api_tokens.get_mut(id) {
                    Some(token) => &mut token.last_used,
                    None => continue,
                }
            };
            *last = Some(last.map_or(at, |last| last.max(at)));
        }
        Response::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_what_they_print_and_say_what_is_wrong() {
        for text in ["admin", "read", "deploy:web"] {
            assert_eq!(Scope::parse(text).map(|s| s.to_string()).as_deref(), Ok(text));
        }
        assert!(Scope::parse("write").is_err_and(|e| e.contains("admin, read or deploy:APP")));
        assert!(Scope::parse("deploy:").is_err_and(|e| e.contains("invalid app name")));
        assert!(Scope::parse("deploy:Web").is_err_and(|e| e.contains("invalid app name")));
    }

    #[test]
    fn each_scope_allows_exactly_its_boundary() {
        let web = Scope::Deploy { app: "web".into() };
        let all = [
            Access::ReadCluster,
            Access::ReadApp("web"),
            Access::WriteApp("web"),
            Access::ReadApp("db"),
            Access::WriteApp("db"),
            Access::Admin,
        ];
        let allowed = |scope: &Scope| all.iter().map(|a| scope.allows(*a)).collect::<Vec<_>>();
        assert_eq!(allowed(&Scope::Admin), [true; 6]);
        assert_eq!(allowed(&Scope::Read), [true, true, false, true, false, false]);
        assert_eq!(allowed(&web), [false, true, true, false, false, false]);
    }
}
