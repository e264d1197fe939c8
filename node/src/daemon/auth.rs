//! Who may call what.
//!
//! Node services (Raft, Peer) require a client certificate from the cluster
//! CA whose fingerprint the replicated state has not revoked; the check runs
//! on every call, so a removed node is refused even on a connection it opened
//! before its removal. The public API requires an API token: the CLI signs
//! the TLS session with the token's key pair (`Signed`, found by its public
//! key), other clients may send the token itself (`Bearer`, found by the
//! digest of its secret); either way it must be current and not expired.
//! Each handler then checks the token's [`Scope`] against what the call
//! needs ([`Principal::allow`]), and the leader checks it again against
//! every command proposed on the caller's behalf ([`authorize`]). The join
//! service checks its secret itself.

use roost_network::pki::{constant_time_eq, hex, secret_digest, unhex, CaDigest};
use roost_network::tls::{NodeTls, PeerIdentity};
use roost_network::token::{SignedCall, TokenSignature, SIGNED_SCHEME};
use roost_network::{Token, TokenKind};
use sha2::Digest;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use roost_deploy::secrets::SecretsKey;
use roost_raft::service::{Authorize, Caller};
use roost_raft::state::{Access, NodeRole, Scope, TokenMatch, UnixMillis};
use roost_raft::{Command, Consensus, Grant, NodeId, State, StateReader};
use tonic::{Request, Status};

use super::clock::ClusterClock;

pub const REVOKED: &str =
    "this certificate is not a current member's: the node was removed from the cluster (or never joined it)";

/// Requires the certificate of a current member.
///
/// Once this node's own record is in its state, only certificates the state
/// records for a current node are accepted: a certificate signed with the
/// CA key but never issued through a join is refused. Before that (a node
/// that has just joined and is still receiving the log) it accepts any
/// certificate of the cluster CA that is not revoked, since it cannot know
/// the members yet.
pub fn require_node(
    state: StateReader,
    self_id: NodeId,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let identity = request.extensions().get::<PeerIdentity>();
        let caller = node_caller(&state, self_id, identity.and_then(|p| p.node_fingerprint.as_deref()))?;
        let mut request = request;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The node whose certificate (its `fingerprint`) a call came with, as
/// [`require_node`] finds it.
pub fn node_caller(state: &StateReader, self_id: NodeId, fingerprint: Option<&str>) -> Result<Caller, Status> {
    let Some(fp) = fingerprint else {
        return Err(Status::unauthenticated("this service is for cluster nodes only: present a node certificate"));
    };
    state.read(|s| member(s, self_id, fp)).ok_or_else(|| Status::permission_denied(REVOKED))
}

/// Which servers this node's own calls accept ([`ClientTls::node_accepting`]):
/// a current member's certificate, never a removed node's; while this node
/// does not know the cluster yet (`state` unset, or its own record not in
/// it), any certificate from the CA that is not revoked, as
/// [`require_node`] accepts callers.
///
/// [`ClientTls::node_accepting`]: roost_network::tls::ClientTls::node_accepting
pub fn accept_server(
    state: Arc<std::sync::OnceLock<StateReader>>,
    self_id: NodeId,
) -> roost_network::tls::AcceptServer {
    Arc::new(move |fingerprint: &str| {
        state.get().is_none_or(|state| state.read(|s| member(s, self_id, fingerprint).is_some()))
    })
}

/// The node a certificate belongs to, as node `self_id` sees the cluster:
/// `Some(caller)` for a node the state names, or (while `self_id` is not in
/// its own state yet) an unknown one that is not revoked; `None` otherwise.
fn member(s: &State, self_id: NodeId, fingerprint: &str) -> Option<Caller> {
    if s.is_revoked(fingerprint) {
        None
    } else if s.nodes.contains_key(&self_id) {
        s.node_by_fingerprint(fingerprint).map(|node| Caller(Some(node.id)))
    } else {
        Some(Caller(None))
    }
}

/// The secrets key, which only a node that may vote holds: a worker
/// refuses, naming the voters to ask instead (as a Swarm worker does).
pub fn require_key<'a>(key: &'a Option<Arc<SecretsKey>>, state: &StateReader) -> Result<&'a SecretsKey, Status> {
    match key {
        Some(key) => Ok(key),
        None => Err(state.read(super::keys::worker_refusal).into()),
    }
}

/// The token an API call was made with, as the state resolved it.
#[derive(Clone, Debug)]
pub struct Principal {
    /// The token's id (`admin` for the initial admin token).
    pub token: String,
    pub scope: Scope,
}

impl Principal {
    /// Refuses unless this caller's scope allows `access`.
    pub fn allow(&self, access: Access<'_>) -> Result<(), Status> {
        if self.scope.allows(access) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "this token's scope is {}, which does not allow {access}; ask an admin for a token that does (`roost tokens create --scope ...`)",
                self.scope
            )))
        }
    }
}

/// The caller of an API request; [`authenticate`] put it there.
pub fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no API token: pass --token or set ROOST_TOKEN"))
}

/// Requires an API token of this cluster in `authorization` (signed, or
/// the bearer token itself: [`grant_of`]), and puts the caller's
/// [`Principal`] into the request for the handler to check against what the
/// call needs. The header was read once, by [`WithGrant`] ([`CallGrant`]).
pub fn authenticate(
    state: StateReader,
    tls: Arc<NodeTls>,
    uses: Arc<TokenUses>,
    clock: Arc<ClusterClock>,
    proofs: Arc<SessionProofs>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let grant = match request.extensions().get::<CallGrant>() {
            Some(CallGrant(Ok(grant))) => grant.clone(),
            Some(CallGrant(Err(message))) => return Err(Status::unauthenticated(message.clone())),
            None => return Err(Status::unauthenticated("no API token: pass --token or set ROOST_TOKEN")),
        };
        let pins = &tls.current().trusted;
        let proofs = Proofs::Taking(&proofs);
        let principal = resolve_grant(&state, pins, &grant, Some(&uses), &clock, SIGNED_CALL_SKEW_MS, proofs)?;
        let mut request = request;
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

/// How far a signed call's time may be from the clock of the node that
/// takes it, either way (as AWS's signed requests allow): a machine whose
/// clock is off by more is told so.
pub const SIGNED_CALL_SKEW_MS: UnixMillis = 15 * 60_000;
/// How old a signed call's time may be when it is checked again later in
/// the call (after a long build) or by the leader for a proposal forwarded
/// on its behalf: a grant a node kept cannot be used for longer.
pub const SIGNED_GRANT_AGE_MS: UnixMillis = 2 * 3_600_000;

/// The grant [`WithGrant`] read off an API call's `authorization` header
/// ([`grant_of`]), or why there is none, for [`authenticate`].
#[derive(Clone, Debug)]
pub struct CallGrant(pub Result<Grant, String>);

/// The grant an API call's `authorization` header carries:
/// `Signed PUBLIC_KEY.TIME.SIGNATURE` over the TLS session `peer` is on,
/// this node's certificate (fingerprint `server`), the `method` called and
/// the `target` the call names (`roost-target`, or empty), or `Bearer TOKEN`.
/// Only the form is checked here.
pub fn grant_of(
    header: Option<&str>,
    peer: Option<&PeerIdentity>,
    server: &str,
    method: &str,
    target: &str,
) -> Result<Grant, Status> {
    let header = header.ok_or_else(|| Status::unauthenticated("no API token: pass --token or set ROOST_TOKEN"))?;
    if let Some(token) = header.strip_prefix("Bearer ") {
        return Ok(Grant::Token { token: token.to_owned() });
    }
    let Some(signed) = header.strip_prefix(SIGNED_SCHEME) else {
        return Err(Status::unauthenticated(
            "the authorization header must be `Signed KEY.TIME.SIGNATURE` (as the roost CLI sends) or `Bearer <API token>`",
        ));
    };
    let signed = TokenSignature::parse(signed).map_err(|e| Status::unauthenticated(e.to_string()))?;
    let session = peer
        .and_then(|p| p.session)
        .ok_or_else(|| Status::unauthenticated("a signed call needs a TLS 1.3 session to sign"))?;
    Ok(Grant::Signed {
        public_key: signed.public_key,
        timestamp_ms: signed.timestamp_ms,
        session: hex(&session),
        server: server.to_owned(),
        method: method.to_owned(),
        target: target.to_owned(),
        signature: signed.signature,
    })
}

/// Whether `grant` may be used for `command` as far as its target goes: a
/// signed call changes what it was signed for (the CLI names it on every
/// call that changes something, `roost-target`: `app:web`, `node:n2`,
/// `domain:shop.example.com`, `token:ci`) and nothing else, and a call
/// signed for nothing changes nothing that has a name, so a node that took
/// it cannot turn it on another app, node, domain or token. Names are
/// resolved in `state` (a node or a token by name or id). A token
/// (`Bearer`) is not bound.
pub fn bound_target_allows(grant: Option<&Grant>, command: &Command, state: &State) -> Result<(), String> {
    let Some(Grant::Signed { target, method, .. }) = grant else { return Ok(()) };
    let changes = command_target(command).map(|changes| canonical_target(&changes, state));
    let signed = (!target.is_empty()).then(|| canonical_target(target, state));
    match (changes, signed) {
        (None, None) => Ok(()),
        (Some(changes), Some(signed)) if changes == signed => Ok(()),
        (Some(changes), None) => Err(format!(
            "the call ({method}) was signed for nothing in particular, so it cannot change {changes}: name it in the `{}` metadata, as the roost CLI does",
            roost_proto::TARGET
        )),
        (Some(changes), Some(_)) => {
            Err(format!("the call ({method}) was signed for {target}; it cannot change {changes}"))
        }
        (None, Some(_)) => Err(format!("the call ({method}) was signed for {target}; it cannot make this change")),
    }
}

/// What `command` changes, as `KIND:NAME` parts joined by `,`; a token's
/// new key pair is `key:PUBLIC_KEY.SECRET_SHA256`, so a node that took the
/// call cannot put in a key of its own.
fn command_target(command: &Command) -> Option<String> {
    let key = |public_key: &str, secret_sha256: &str| format!("key:{public_key}.{secret_sha256}");
    Some(match command {
        Command::AddCertificate { domain, app } => format!("app:{app},domain:{domain}"),
        Command::RemoveCertificate { domain } => format!("domain:{domain}"),
        Command::RemoveNode { id, .. } | Command::LabelNode { id, .. } => format!("node:{id}"),
        Command::RevokeToken { token } => format!("token:{token}"),
        Command::RotateToken { token, secret_sha256, public_key } => {
            format!("token:{token},{}", key(public_key, secret_sha256))
        }
        Command::CreateToken { token } => key(&token.public_key, &token.secret_sha256),
        command => format!("app:{}", command.app()?),
    })
}

fn normal_domain(domain: &str) -> String {
    domain.trim_end_matches('.').to_ascii_lowercase()
}

/// A target as [`bound_target_allows`] compares it, whether the client
/// signed it or [`command_target`] read it off a command: nodes and tokens
/// by id (either may be named by name or id), domains in lower case without
/// a final dot.
fn canonical_target(target: &str, state: &State) -> String {
    let part = |part: &str| match part.split_once(':') {
        Some(("node", node)) => state.find_node(node).map_or_else(|| part.to_owned(), |n| format!("node:{}", n.id)),
        Some(("token", token)) => {
            state.find_token(token).map_or_else(|| part.to_owned(), |t| format!("token:{}", t.id))
        }
        Some(("domain", domain)) => format!("domain:{}", normal_domain(domain)),
        _ => part.to_owned(),
    };
    target.split(',').map(part).collect::<Vec<_>>().join(",")
}

/// The caller a grant stands for, by the state and clock as they are now:
/// the token must be current and not expired; a signed one must be made at
/// a time no more than `max_age_ms` old and not ahead of the cluster's clock
/// by more than [`SIGNED_CALL_SKEW_MS`], and verify over its session unless
/// `proofs` lets this node's proof of that session vouch for it.
pub fn resolve_grant(
    state: &StateReader,
    pins: &[CaDigest],
    grant: &Grant,
    uses: Option<&TokenUses>,
    clock: &ClusterClock,
    max_age_ms: UnixMillis,
    proofs: Proofs<'_>,
) -> Result<Principal, Status> {
    match grant {
        Grant::Token { token } => resolve(state, pins, token, uses, clock),
        Grant::Signed { public_key, timestamp_ms, .. } => {
            // The cheap checks first: the time, then the key.
            check_signed_time(*timestamp_ms, clock.now(), max_age_ms)?;
            let (bootstrapped, found) = state.read(|s| (s.cluster.is_some(), s.token_by_key(public_key)));
            if found.is_some() {
                verify_signed(grant, proofs)?;
            }
            current(bootstrapped, found, uses, clock, "signed with a token that is not one of the cluster's current tokens: it was revoked or rotated, is mistyped, or was made before calls were signed (then rotate it: `roost tokens rotate NAME`)")
        }
        Grant::Join { .. } => Err(Status::unauthenticated("a join secret is no API token")),
    }
}

/// Checks a signed grant's signature over its session, server, method and time.
/// Whether a signature verifies depends on nothing else, so signatures
/// that did are remembered ([`VERIFIED`]): a client sends one signature
/// with every call of a session, and it costs one Ed25519 check.
///
/// On a session of this node's own ([`Proofs`]), a session whose client
/// has proven the grant's key within [`SESSION_PROOF_TTL`] needs no check
/// at all; and a signature that verifies on a call being taken proves it.
fn verify_signed(grant: &Grant, proofs: Proofs<'_>) -> Result<(), Status> {
    let Grant::Signed { public_key, timestamp_ms, session, server, method, target, signature } = grant else {
        return Err(Status::unauthenticated("not a signed call"));
    };
    let now = std::time::Instant::now();
    let proof = match proofs {
        Proofs::Forwarded => None,
        Proofs::Taking(proofs) | Proofs::Serving(proofs) => {
            Some((proofs, SessionProofs::key(public_key, session, server)))
        }
    };
    if proof.as_ref().is_some_and(|(proofs, key)| proofs.holds(key, now)) {
        return Ok(());
    }
    let seen = framed_digest([
        public_key.as_bytes(),
        &timestamp_ms.to_be_bytes(),
        session.as_bytes(),
        server.as_bytes(),
        method.as_bytes(),
        target.as_bytes(),
        signature.as_bytes(),
    ]);
    if !VERIFIED.lock().is_ok_and(|verified| verified.contains(&seen)) {
        let session = unhex(session)
            .filter(|s| s.len() == 32)
            .ok_or_else(|| Status::unauthenticated("the signed session must be 32 bytes in hex"))?;
        let signed = TokenSignature {
            public_key: public_key.clone(),
            timestamp_ms: *timestamp_ms,
            signature: signature.clone(),
        };
        signed
            .verify(&SignedCall { session: &session, server, method, target })
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        if let Ok(mut verified) = VERIFIED.lock() {
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
            verified.insert(seen);
        }
    }
    if let (Proofs::Taking(_), Some((proofs, key))) = (proofs, proof) {
        proofs.note(key, now);
    }
    Ok(())
}

/// Digests of signed grants that verified (see [`verify_signed`]); cleared
/// whole when it holds [`MAX_VERIFIED`], which costs each live session one
/// more check.
static VERIFIED: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<[u8; 32]>>> =
    std::sync::LazyLock::new(Default::default);
const MAX_VERIFIED: usize = 16_384;

/// How long a signature that verified on one of this node's TLS sessions
/// vouches for that session's further calls signed with the same key.
pub const SESSION_PROOF_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// The most sessions remembered at once: when the set is full, proofs
/// that no longer hold are dropped, and if none are, the set is cleared
/// whole, which costs each live session one more check.
const MAX_SESSION_PROOFS: usize = 16_384;

/// Which of this node's [`SessionProofs`] a signed grant may lean on.
#[derive(Clone, Copy, Debug)]
pub enum Proofs<'a> {
    /// A grant another node forwarded to this one (the leader): its
    /// signature is checked in full, whatever this node has seen.
    Forwarded,
    /// The grant of a call this node is taking now, on its own TLS session
    /// ([`authenticate`]): a proof of the session vouches for it, and a
    /// signature that verifies proves the session.
    Taking(&'a SessionProofs),
    /// The grant of a call this node took a while ago, checked again
    /// (after a long build): a proof vouches for it, but it proves nothing
    /// anew, so a proof lasts [`SESSION_PROOF_TTL`] from the last signature
    /// checked on a call being taken.
    Serving(&'a SessionProofs),
}

/// The TLS sessions of this node's own API connections whose client has
/// proven, by a signature that verified, that it holds a token's key pair.
///
/// Only the client and this node hold the session's keys, so a further
/// call on that session signed with the same key comes from the same
/// client: it is served without checking its signature again, which spares
/// the node an Ed25519 check on each call of a client that names something
/// new with every call (each `apps create` does). So on this node a
/// signature binds a session to a key, and what a call may do is the
/// token's scope; its method and target bind only the grant the call
/// hands on. That grant carries the signature, and a leader that receives
/// it from another node checks it in full ([`authorize`]:
/// [`Proofs::Forwarded`]): a session proven to one node proves nothing to
/// another, and a call on a proven session whose signature is not its own
/// is served by its node and refused by the leader. The token is still
/// looked up on every call, so a revoked, rotated or expired one is
/// refused at once.
#[derive(Debug, Default)]
pub struct SessionProofs {
    proven: std::sync::Mutex<std::collections::HashMap<[u8; 32], std::time::Instant>>,
}

impl SessionProofs {
    /// What a proof is remembered by: the key, the session (its exporter
    /// value, hex) and the certificate this node presented on it.
    fn key(public_key: &str, session: &str, server: &str) -> [u8; 32] {
        framed_digest([public_key.as_bytes(), session.as_bytes(), server.as_bytes()])
    }

    /// Whether `key` was proven less than [`SESSION_PROOF_TTL`] before `now`.
    fn holds(&self, key: &[u8; 32], now: std::time::Instant) -> bool {
        self.proven.lock().is_ok_and(|proven| proven.get(key).is_some_and(|&at| fresh(at, now)))
    }

    fn note(&self, key: [u8; 32], now: std::time::Instant) {
        if let Ok(mut proven) = self.proven.lock() {
            if proven.len() >= MAX_SESSION_PROOFS {
                proven.retain(|_, &mut at| fresh(at, now));
            }
            if proven.len() >= MAX_SESSION_PROOFS {
                proven.clear();
            }
            proven.insert(key, now);
        }
    }
}

/// SHA-256 of `parts`, each after its length, so no two lists of parts
/// share a digest by moving bytes from one part to the next.
fn framed_digest<const N: usize>(parts: [&[u8]; N]) -> [u8; 32] {
    let mut digest = sha2::Sha256::new();
    for part in parts {
        digest.update((part.len() as u64).to_be_bytes());
        digest.update(part);
    }
    digest.finalize().into()
}

/// Whether a proof made `at` still holds `now`.
fn fresh(at: std::time::Instant, now: std::time::Instant) -> bool {
    now.saturating_duration_since(at) < SESSION_PROOF_TTL
}

/// Refuses a signed call's time more than [`SIGNED_CALL_SKEW_MS`] ahead of
/// `now` or more than `max_age_ms` behind it.
fn check_signed_time(at: UnixMillis, now: UnixMillis, max_age_ms: UnixMillis) -> Result<(), Status> {
    if at > now.saturating_add(SIGNED_CALL_SKEW_MS) || at < now.saturating_sub(max_age_ms) {
        return Err(Status::unauthenticated(signed_time_refusal(at, now, max_age_ms)));
    }
    Ok(())
}

fn signed_time_refusal(at: UnixMillis, now: UnixMillis, max_age_ms: UnixMillis) -> String {
    let off = humantime::format_duration(std::time::Duration::from_secs(at.abs_diff(now) / 1000));
    if at > now {
        format!(
            "the call was signed {off} ahead of the cluster's clock, more than the {} allowed: set this machine's clock right (NTP)",
            humantime::format_duration(std::time::Duration::from_millis(SIGNED_CALL_SKEW_MS as u64))
        )
    } else {
        format!(
            "the call was signed {off} before the cluster's clock, more than the {} allowed: set this machine's clock right (NTP), or make the call again",
            humantime::format_duration(std::time::Duration::from_millis(max_age_ms.max(0) as u64))
        )
    }
}

/// When this node last accepted each token, until the next
/// `Command::TokensUsed` takes them to the state. A token is noted only when
/// the state's record of it is a minute old or more, so tokens in steady use
/// cost the log one small entry a minute each, not one per call.
#[derive(Debug, Default)]
pub struct TokenUses {
    pending: std::sync::Mutex<BTreeMap<String, UnixMillis>>,
}

/// How stale a token's `last used` may get before a node reports it.
pub const LAST_USED_RESOLUTION_MS: UnixMillis = 60_000;

impl TokenUses {
    fn note(&self, id: &str, recorded: Option<UnixMillis>, now: UnixMillis) {
        if recorded.is_some_and(|at| now.saturating_sub(at) < LAST_USED_RESOLUTION_MS) {
            return;
        }
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(id.to_owned(), now);
        }
    }

    pub fn take(&self) -> BTreeMap<String, UnixMillis> {
        self.pending.lock().map(|mut pending| std::mem::take(&mut *pending)).unwrap_or_default()
    }
}

/// Reports token uses to the state every `every`, until `stop`.
pub async fn report_token_uses(
    consensus: Arc<Consensus>,
    uses: Arc<TokenUses>,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let used = uses.take();
        if used.is_empty() {
            continue;
        }
        let deadline = tokio::time::Instant::now() + every;
        if let Err(error) = consensus.propose(Command::TokensUsed { used }, deadline).await {
            // Only `last used` is late; the next report carries newer uses.
            tracing::debug!(error = %error, "could not record token uses");
        }
    }
}

/// `text` as an API token of this cluster (pinning one of the CAs this node
/// trusts, `pins`), by its form alone: not yet looked up in the state.
fn api_token(text: &str, pins: &[CaDigest]) -> Result<Token, Status> {
    let token = Token::parse(text).map_err(|e| Status::unauthenticated(format!("malformed API token: {e}")))?;
    if token.kind == TokenKind::Join {
        return Err(Status::unauthenticated(
            "that is a join token; the CLI needs an API token (admin.token in the first node's data directory, or one `roost tokens create` made)",
        ));
    }
    if !pins.contains(&token.ca_digest) {
        return Err(Status::unauthenticated("the API token belongs to another cluster"));
    }
    Ok(token)
}

/// Finds the token `text` is in the state: it must be this cluster's, not
/// revoked, rotated or expired (by the later of this node's clock and the
/// leader's: [`ClusterClock`]).
pub fn resolve(
    state: &StateReader,
    pins: &[CaDigest],
    text: &str,
    uses: Option<&TokenUses>,
    clock: &ClusterClock,
) -> Result<Principal, Status> {
    let token = api_token(text, pins)?;
    let digest = secret_digest(&token.secret);
    let (bootstrapped, found) = state.read(|s| (s.cluster.is_some(), s.token_by_digest(&digest, constant_time_eq)));
    current(bootstrapped, found, uses, clock, "this token is not one of the cluster's current tokens: it was revoked or rotated, or is mistyped (`roost tokens list` shows the tokens)")
}

/// The caller of a token found (or not) in the state, if it has not expired.
fn current(
    bootstrapped: bool,
    found: Option<TokenMatch>,
    uses: Option<&TokenUses>,
    clock: &ClusterClock,
    unknown: &str,
) -> Result<Principal, Status> {
    if !bootstrapped {
        return Err(Status::unavailable("this node has not caught up with the cluster yet; try again shortly"));
    }
    let Some(found) = found else {
        return Err(Status::unauthenticated(unknown));
    };
    let now = clock.now();
    if let Some(expires_at) = found.expires_at.filter(|&at| at <= now) {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(expires_at.max(0) as u64);
        return Err(Status::unauthenticated(format!(
            "this token expired at {}; ask an admin for a new one (`roost tokens create`)",
            humantime::format_rfc3339_seconds(at)
        )));
    }
    if let Some(uses) = uses {
        uses.note(&found.id, found.last_used, now);
    }
    Ok(Principal { token: found.id, scope: found.scope })
}

tokio::task_local! {
    /// The grant of the API call being served: what the leader must see to
    /// write a user's change proposed through another node.
    static GRANT: Grant;
}

/// The grant of the API call this task serves, if any.
pub fn current_grant() -> Option<Grant> {
    GRANT.try_with(Grant::clone).ok()
}

/// Runs `future` with `grant` as the current grant (a task spawned to serve
/// a call takes its caller's grant along).
pub async fn with_grant<F: Future>(grant: Option<Grant>, future: F) -> F::Output {
    match grant {
        Some(grant) => GRANT.scope(grant, future).await,
        None => future.await,
    }
}

/// Whether this node's state holds the cluster and its own record: enough to
/// check an API token and to answer reads after a read barrier. A node that
/// restarted knows the cluster at once, from its own copy.
pub fn knows_cluster(state: &StateReader, me: NodeId) -> bool {
    state.read(|s| knows_cluster_in(s, me))
}

/// [`knows_cluster`], given the state.
pub fn knows_cluster_in(state: &roost_raft::State, me: NodeId) -> bool {
    state.cluster.is_some() && state.nodes.contains_key(&me)
}

/// Whether this node has caught up with the cluster: it [`knows_cluster`]
/// and, since it started, a read barrier has passed
/// ([`StateReader::synced`]), so its state holds every entry committed
/// before then, an app created while it was down included. Only then does
/// it report itself up (heartbeats), and its edge call a host it does not
/// know unknown (404) rather than starting (503).
pub fn caught_up(state: &StateReader, me: NodeId) -> bool {
    state.synced() && knows_cluster(state, me)
}

/// Waits until [`knows_cluster`] or `deadline`; whether it does.
pub async fn wait_knows_cluster(state: &StateReader, me: NodeId, deadline: tokio::time::Instant) -> bool {
    let mut changes = state.changes();
    while !knows_cluster(state, me) {
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            // Raft stopped, or the deadline passed.
            Ok(Err(_)) | Err(_) => return knows_cluster(state, me),
        }
    }
    true
}

/// How long an API call to a node that has not caught up with the cluster
/// yet (just initialised or joined, or restarted and replaying) is held
/// before it is refused as unavailable.
pub const HOLD_UNTIL_CAUGHT_UP: std::time::Duration = std::time::Duration::from_secs(10);
/// The most calls held at once; more are answered at once.
pub const MAX_HELD: usize = 256;

/// Serves the public API with each call's token or signature as its
/// [`Grant`]. It is checked by [`authenticate`] inside; the grant only
/// travels.
/// A call that reaches a node that does not know the cluster yet is held
/// until it does (up to [`HOLD_UNTIL_CAUGHT_UP`]), so a CLI that read
/// `admin.token` the moment `node init` wrote it is served, not refused.
/// Only a call with a well-formed API token of this cluster is held, and at
/// most [`MAX_HELD`] at once; others go straight on to be refused.
#[derive(Clone)]
pub struct WithGrant<S> {
    pub inner: S,
    pub state: StateReader,
    pub me: NodeId,
    /// What the node presents and trusts: the CAs a token may pin, and the
    /// certificate a signed call names (when the connection does not say).
    pub tls: Arc<NodeTls>,
    pub held: Arc<tokio::sync::Semaphore>,
}

impl<S> WithGrant<S> {
    pub fn new(inner: S, state: StateReader, me: NodeId, tls: Arc<NodeTls>) -> Self {
        Self { inner, state, me, tls, held: Arc::new(tokio::sync::Semaphore::new(MAX_HELD)) }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for WithGrant<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for WithGrant<S>
where
    S: tower::Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // `/roost.api.v1.Control/CreateApp` is a call of `CreateApp`.
        let method = request.uri().path().rsplit('/').next().unwrap_or_default().to_owned();
        let header = request.headers().get(roost_proto::AUTHORIZATION).map(|h| h.to_str().unwrap_or_default());
        let target = request.headers().get(roost_proto::TARGET).map_or("", |h| h.to_str().unwrap_or_default());
        let peer = request.extensions().get::<PeerIdentity>();
        // The certificate this node presented on the call's connection:
        // what the client saw, and signed.
        let server =
            peer.and_then(|p| p.server_fingerprint.clone()).unwrap_or_else(|| self.tls.current().fingerprint.clone());
        let parsed = grant_of(header, peer, &server, &method, target).map_err(|status| status.message().to_owned());
        let grant = parsed.clone().ok();
        let mut request = request;
        request.extensions_mut().insert(CallGrant(parsed));
        // Held only while this node does not know the cluster, and only a
        // call whose credentials look like this cluster's, up to MAX_HELD.
        let hold = if knows_cluster(&self.state, self.me) {
            None
        } else {
            match &grant {
                Some(Grant::Token { token }) if api_token(token, &self.tls.current().trusted).is_err() => None,
                Some(Grant::Token { .. } | Grant::Signed { .. }) => self.held.clone().try_acquire_owned().ok(),
                _ => None,
            }
        };
        let Some(permit) = hold else {
            return Box::pin(with_grant(grant, self.inner.call(request)));
        };
        // The service that was made ready serves this call later; the
        // clone takes its place for the next one (tower's usual swap).
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        let me = self.me;
        Box::pin(async move {
            // Not caught up by the deadline: the call goes on, and is
            // refused or answered with what this node knows.
            wait_knows_cluster(&state, me, tokio::time::Instant::now() + HOLD_UNTIL_CAUGHT_UP).await;
            drop(permit);
            with_grant(grant, ready.call(request)).await
        })
    }
}

/// Whether a node of `role` may join with the join `secret`: the voter
/// secret admits any node, the worker secret only workers.
pub fn admit(state: &State, secret: &str, role: NodeRole) -> Result<(), String> {
    match super::keys::join_role(state, secret) {
        Some(NodeRole::Voter) => Ok(()),
        Some(NodeRole::Worker) if role == NodeRole::Worker => Ok(()),
        Some(NodeRole::Worker) => Err("the worker token joins only workers".into()),
        None => Err("the join secret is not the cluster's".into()),
    }
}

/// Whether a joining node of `role` may declare `labels`: a voter may
/// (within [`roost_raft::state::validate_labels`]), a worker may not, since
/// labels attract instances, and with them their secrets; an admin sets a
/// worker's (`roost node label`).
pub fn join_labels(role: NodeRole, labels: &BTreeMap<String, String>) -> Result<(), String> {
    if role == NodeRole::Worker && !labels.is_empty() {
        return Err("a worker declares no labels at its join (they would attract instances and their secrets); join without --label, then have an admin set them with `roost node label NODE KEY=VALUE`".into());
    }
    roost_raft::state::validate_labels(labels).map_err(|rejection| rejection.to_string())
}

/// What the leader accepts as a grant for a forwarded proposal that a node
/// may not make on its own: an API token, or a call signed with one to the
/// forwarding node (no older than [`SIGNED_GRANT_AGE_MS`]), whose scope
/// allows the command (`Command::access`); or the join secret for a new
/// node.
pub fn authorize(state: StateReader, tls: Arc<NodeTls>, uses: Arc<TokenUses>, clock: Arc<ClusterClock>) -> Authorize {
    Arc::new(move |command: &Command, grant: Option<&Grant>, caller: Option<NodeId>| match (command, grant) {
        // A node's report about itself.
        (command, None) if caller.is_some_and(|id| command.is_node_command(id)) => {
            state.read(|s| genuine_report(command, s))
        }
        (Command::AddNode { node }, Some(Grant::Join { secret })) => {
            state.read(|s| admit(s, secret, node.role))?;
            join_labels(node.role, &node.labels)
        }
        (Command::Bootstrap { .. } | Command::Batch { .. }, _) => Err("it is never forwarded".into()),
        // Only entries of older clusters carry join secrets in plain text.
        (Command::RemoveNode { new_join_secret, new_worker_secret, .. }, _)
            if new_join_secret.is_some() || new_worker_secret.is_some() =>
        {
            Err("join secrets are written only sealed, never in plain text".into())
        }
        // A worker takes changes to one app only: a user's grant it holds
        // (a signed call's, for up to `SIGNED_GRANT_AGE_MS`) must not let it
        // mint a token, label itself or remove a node.
        (_, Some(Grant::Token { .. } | Grant::Signed { .. }))
            if !worker_may_propose(command) && caller.is_some_and(|id| state.read(|s| s.is_worker(id))) =>
        {
            Err(format!("a worker forwards changes to one app only; this needs {}", command.access()))
        }
        // A signed call is the forwarder's own: its signature names the
        // server it was made to, which must be the node forwarding it.
        (_, Some(Grant::Signed { server, .. }))
            if !caller
                .is_some_and(|id| state.read(|s| s.nodes.get(&id).is_some_and(|n| n.has_certificate(server)))) =>
        {
            Err("the call was signed for another node than the one forwarding it".into())
        }
        // And the method called, which must be one that proposes this.
        (_, Some(Grant::Signed { method, .. })) if !proposed_by(method, command) => {
            Err(format!("the call was signed for {method}, which does not make this change"))
        }
        (_, Some(grant @ (Grant::Token { .. } | Grant::Signed { .. }))) => {
            // And what it names, and nothing else.
            state.read(|s| bound_target_allows(Some(grant), command, s))?;
            // A grant forwarded by another node is checked in full: no
            // session of this node's own vouches for it.
            let (pins, forwarded) = (&tls.current().trusted, Proofs::Forwarded);
            let principal = resolve_grant(&state, pins, grant, Some(&uses), &clock, SIGNED_GRANT_AGE_MS, forwarded)
                .map_err(|status| status.message().to_owned())?;
            principal.allow(command.access()).map_err(|status| status.message().to_owned())
        }
        (_, _) => Err("it needs the API token of the user who asked for it".into()),
    })
}

/// Checks a node's report about itself where the state cannot: a
/// certificate it records from the CA being rotated to must be one that
/// CA signed, with the fingerprint the report names, so a member cannot
/// record a made-up fingerprint and keep its old certificate in use.
fn genuine_report(command: &Command, state: &State) -> Result<(), String> {
    let Command::RenewNodeCertificate { fingerprint, cert_pem, .. } = command else { return Ok(()) };
    let Some(new_ca) = state.cluster.as_ref().and_then(|c| c.ca_rotation.as_ref()).map(|r| r.ca_cert_pem.as_str())
    else {
        return Err("no rotation of the cluster CA is under way".into());
    };
    let der =
        roost_network::pki::cert_der_from_pem(cert_pem).map_err(|e| format!("the certificate is unreadable: {e}"))?;
    if roost_network::pki::fingerprint(&der) != *fingerprint {
        return Err("the certificate does not have the fingerprint the report names".into());
    }
    if !roost_network::tls::signed_by(new_ca, cert_pem) {
        return Err("the certificate is not from the CA being rotated to".into());
    }
    Ok(())
}

/// Whether a worker may make `command` on a user's behalf: a change to one
/// app (what it builds, deploys, scales, restarts), never tokens, nodes,
/// apps coming and going or domains, which a worker refuses and the leader
/// refuses from it (see [`authorize`]), as a Swarm worker takes no
/// management command.
pub fn worker_may_propose(command: &Command) -> bool {
    matches!(command.access(), Access::WriteApp(_))
}

/// Whether a call of the API `method` proposes `command` (on the node
/// that took it, which may forward it): what a signed call's grant may be
/// used for. Calls that only read propose nothing.
pub fn proposed_by(method: &str, command: &Command) -> bool {
    matches!(
        (method, command),
        ("RemoveNode", Command::RemoveNode { .. })
            | ("LabelNode", Command::LabelNode { .. })
            | ("CreateApp", Command::CreateApp { .. })
            | ("DestroyApp", Command::DestroyApp { .. })
            | ("SuspendApp", Command::SuspendApp { .. })
            | ("ResumeApp", Command::ResumeApp { .. })
            | ("RestartApp", Command::Restart { .. })
            | ("Deploy", Command::Deploy { .. })
            | ("Rollback", Command::Rollback { .. })
            | ("Scale", Command::Scale { .. })
            | ("ScaleVm", Command::ScaleVm { .. })
            | ("SetSecrets" | "UnsetSecrets", Command::SetSecrets { .. })
            | ("AddCertificate", Command::AddCertificate { .. })
            | ("RemoveCertificate", Command::RemoveCertificate { .. })
            | ("CreateToken", Command::CreateToken { .. })
            | ("RevokeToken", Command::RevokeToken { .. })
            | ("RotateToken", Command::RotateToken { .. })
            | ("RotateCa", Command::StartCaRotation { .. })
    )
}

#[cfg(test)]
mod tests {
    use roost_raft::state::NodeRole::{Voter, Worker};
    use roost_raft::testkit::cluster;

    use super::*;

    /// The grant of a `CreateApp` call naming `target` on `session` with
    /// the server `server`, whose signature `token` made for `signed_for`.
    fn create_grant(token: &Token, session: [u8; 32], server: &str, signed_for: &str, target: &str) -> Grant {
        let call = SignedCall { session: &session, server, method: "CreateApp", target: signed_for };
        let signed = token.key().sign(&call, 1_000);
        Grant::Signed {
            public_key: signed.public_key,
            timestamp_ms: signed.timestamp_ms,
            session: hex(&session),
            server: server.to_owned(),
            method: "CreateApp".to_owned(),
            target: target.to_owned(),
            signature: signed.signature,
        }
    }

    #[test]
    fn a_session_proof_vouches_for_its_session_and_key_for_a_minute_and_never_for_a_forwarded_grant() {
        let token = Token::generate(TokenKind::Api, CaDigest([1; 32]));
        let other = Token::generate(TokenKind::Api, CaDigest([1; 32]));
        let (proofs, session) = (SessionProofs::default(), [9u8; 32]);
        let genuine = create_grant(&token, session, "s1", "app:a", "app:a");
        // Signed for app:a, naming app:b: only a proof of the session vouches for it.
        let forged = create_grant(&token, session, "s1", "app:a", "app:b");
        assert!(verify_signed(&forged, Proofs::Taking(&proofs)).is_err(), "nothing is proven yet");

        // A grant checked again while serving a call proves nothing anew.
        assert!(verify_signed(&genuine, Proofs::Serving(&proofs)).is_ok());
        assert!(verify_signed(&forged, Proofs::Taking(&proofs)).is_err(), "a grant checked while serving proved");

        // A call taken with a signature that verifies proves its session.
        assert!(verify_signed(&genuine, Proofs::Taking(&proofs)).is_ok());
        assert!(verify_signed(&forged, Proofs::Taking(&proofs)).is_ok(), "the proven session vouches");
        assert!(verify_signed(&forged, Proofs::Serving(&proofs)).is_ok(), "the proven session vouches later too");
        assert!(verify_signed(&forged, Proofs::Forwarded).is_err(), "a forwarded grant is checked in full");
        // Another session, server or key: not proven.
        for (token, session, server) in [(&token, [10u8; 32], "s1"), (&token, session, "s2"), (&other, session, "s1")] {
            let forged = create_grant(token, session, server, "app:a", "app:b");
            assert!(verify_signed(&forged, Proofs::Taking(&proofs)).is_err(), "{server} {session:?}");
        }

        // A proof lasts SESSION_PROOF_TTL.
        let key = SessionProofs::key(&token.key().public_key(), &hex(&session), "s1");
        let at = std::time::Instant::now();
        proofs.note(key, at);
        assert!(proofs.holds(&key, at + SESSION_PROOF_TTL - std::time::Duration::from_secs(1)));
        assert!(!proofs.holds(&key, at + SESSION_PROOF_TTL), "a proof outlived its minute");
    }

    #[test]
    fn a_node_records_only_a_certificate_the_new_ca_signed_with_its_own_fingerprint() {
        let mut state = cluster(2, |_| Vec::new());
        let new_ca = roost_network::pki::ClusterCa::generate("c").expect("a CA");
        let other_ca = roost_network::pki::ClusterCa::generate("c").expect("another CA");
        let renew = |ca: &roost_network::pki::ClusterCa, fingerprint: Option<&str>| {
            let key = roost_network::pki::NodeKey::generate().expect("a key");
            let (cert_pem, _, real) = ca.issue_for_public_key("n2", &key.public_key()).expect("a certificate");
            Command::RenewNodeCertificate { node: 2, fingerprint: fingerprint.unwrap_or(&real).to_owned(), cert_pem }
        };
        assert!(genuine_report(&renew(&new_ca, None), &state).is_err(), "no rotation under way");
        if let Some(cluster) = state.cluster.as_mut() {
            let sealed = roost_raft::workload::SealedSecret { sealed: "k".into(), digest: "d".into(), updated_at: 0 };
            cluster.ca_rotation = Some(roost_raft::state::CaRotation {
                ca_cert_pem: new_ca.cert_pem().to_owned(),
                ca_key: sealed,
                started_at: 0,
            });
        }
        assert_eq!(genuine_report(&renew(&new_ca, None), &state), Ok(()));
        let made_up = genuine_report(&renew(&new_ca, Some("00")), &state).expect_err("a made-up fingerprint");
        assert!(made_up.contains("fingerprint"), "{made_up}");
        let foreign = genuine_report(&renew(&other_ca, None), &state).expect_err("another CA");
        assert!(foreign.contains("not from the CA"), "{foreign}");
        let report = Command::ReportInstances { node: 2, reports: Vec::new() };
        assert_eq!(genuine_report(&report, &state), Ok(()), "other reports pass");
    }

    #[test]
    fn a_signed_grant_changes_what_it_was_signed_for_alone() {
        let signed = |target: &str| Grant::Signed {
            public_key: String::new(),
            timestamp_ms: 0,
            session: String::new(),
            server: String::new(),
            method: "Scale".into(),
            target: target.into(),
            signature: String::new(),
        };
        let state = cluster(2, |_| Vec::new());
        let allows = |target: &str, command: &Command| bound_target_allows(Some(&signed(target)), command, &state);
        let scale = |app: &str| Command::Scale { app: app.into(), group: "app".into(), count: 1 };
        assert_eq!(allows("app:web", &scale("web")), Ok(()));
        let refused = allows("app:web", &scale("db")).expect_err("another app");
        assert_eq!(refused, "the call (Scale) was signed for app:web; it cannot change app:db");
        assert!(allows("app:web", &Command::CreateApp { name: "db".into() }).is_err(), "creating another app");
        // Nodes by name or id.
        let removal = |id| Command::RemoveNode { id, new_join_secret: None, new_worker_secret: None, rotate: None };
        let (n1, n2) = (state.node_by_name("n1").map(|n| n.id), state.node_by_name("n2").map(|n| n.id));
        let (Some(n1), Some(n2)) = (n1, n2) else { panic!("the test cluster has n1 and n2") };
        assert_eq!(allows("node:n2", &removal(n2)), Ok(()));
        assert_eq!(allows(&format!("node:{n2}"), &removal(n2)), Ok(()));
        assert!(allows("node:n2", &removal(n1)).is_err(), "another node");
        assert!(allows("app:web", &removal(n2)).is_err(), "an app's grant on a node");
        let domain = |d: &str| Command::RemoveCertificate { domain: d.into() };
        assert_eq!(allows("domain:Shop.example.com", &domain("shop.example.com")), Ok(()));
        assert!(allows("domain:shop.example.com", &domain("bank.example.com")).is_err());
        assert_eq!(allows("domain:shop.example.com.", &domain("shop.example.com")), Ok(()));
        let add = |d: &str, app: &str| Command::AddCertificate { domain: d.into(), app: app.into() };
        assert_eq!(allows("app:web,domain:shop.example.com", &add("shop.example.com", "web")), Ok(()));
        assert!(allows("app:web,domain:shop.example.com", &add("other.example.com", "web")).is_err());
        // A token's new key pair is the one the client drew.
        let rotate = |public_key: &str| Command::RotateToken {
            token: "admin".into(),
            secret_sha256: "d1".into(),
            public_key: public_key.into(),
        };
        let admin_id = state.find_token("admin").map(|t| t.id).unwrap_or_else(|| "admin".into());
        assert_eq!(allows(&format!("token:{admin_id},key:k1.d1"), &rotate("k1")), Ok(()));
        assert_eq!(allows("token:admin,key:k1.d1", &rotate("k1")), Ok(()));
        assert!(allows("token:admin,key:k1.d1", &rotate("theirs")).is_err(), "a key of the node's own");
        // Signed for nothing: changes nothing with a name; a token is not bound.
        assert!(allows("", &scale("db")).is_err(), "signed for nothing");
        assert!(allows("", &removal(n2)).is_err(), "signed for nothing");
        let unnamed = Command::UpdateNode { id: n1, address: "127.0.0.1:1".into(), wireguard: None };
        assert_eq!(allows("", &unnamed), Ok(()));
        let token = Grant::Token { token: "t".into() };
        assert_eq!(bound_target_allows(Some(&token), &scale("db"), &state), Ok(()));
        assert_eq!(bound_target_allows(None, &scale("db"), &state), Ok(()));
    }

    #[test]
    fn a_worker_joins_without_labels_and_a_voter_within_the_label_rules() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert!(join_labels(Worker, &labels(&[])).is_ok());
        let refused = join_labels(Worker, &labels(&[("trusted", "yes")])).expect_err("a worker with a label");
        assert!(refused.contains("roost node label"), "{refused}");
        assert!(join_labels(Voter, &labels(&[("region", "eu")])).is_ok());
        assert!(join_labels(Voter, &labels(&[("region", &"x".repeat(300))])).is_err(), "a value too long");
    }

    #[test]
    fn a_worker_may_propose_changes_to_one_app_and_nothing_else() {
        let app = || "web".to_owned();
        assert!(worker_may_propose(&Command::Restart { app: app() }));
        assert!(worker_may_propose(&Command::SuspendApp { name: app() }));
        for command in [
            Command::CreateApp { name: app() },
            Command::DestroyApp { name: app() },
            Command::LabelNode { id: 2, set: BTreeMap::new(), remove: vec!["trusted".into()] },
            Command::RevokeToken { token: "t".into() },
        ] {
            assert!(!worker_may_propose(&command), "{command:?}");
        }
    }

    #[test]
    fn the_voter_secret_admits_any_node_and_the_worker_secret_only_workers() {
        let mut state = cluster(1, |_| Vec::new());
        if let Some(c) = state.cluster.as_mut() {
            c.join_secret = "voter-secret".into();
            c.worker_join_secret = "worker-secret".into();
        }
        assert!(admit(&state, "voter-secret", Voter).is_ok());
        assert!(admit(&state, "voter-secret", Worker).is_ok());
        assert!(admit(&state, "worker-secret", Worker).is_ok());
        let refused = admit(&state, "worker-secret", Voter).expect_err("a worker token adding a voter");
        assert!(refused.contains("joins only workers"), "{refused}");
        assert!(admit(&state, "other", Worker).is_err());
        // A cluster without a worker secret (made before workers) admits
        // nothing with an empty one.
        if let Some(c) = state.cluster.as_mut() {
            c.worker_join_secret = String::new();
        }
        assert!(admit(&state, "", Worker).is_err());
    }
}
