//! Who may call what.
//!
//! Node services (Raft, Peer) require a client certificate from the cluster
//! CA whose fingerprint the replicated state has not revoked; the check runs
//! on every call, so a removed node is refused even on a connection it opened
//! before its removal. The public API requires the admin token, compared by
//! digest with the one the state records. The join service checks its secret
//! itself.

use roost_network::pki::{constant_time_eq, secret_digest, CaDigest};
use roost_network::tls::PeerIdentity;
use roost_network::{Token, TokenKind};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use roost_raft::service::{Authorize, Caller};
use roost_raft::{Command, Grant, NodeId, StateReader};
use tonic::{Request, Status};

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
        let fingerprint = request.extensions().get::<PeerIdentity>().and_then(|p| p.node_fingerprint.clone());
        let Some(fp) = fingerprint else {
            return Err(Status::unauthenticated("this service is for cluster nodes only: present a node certificate"));
        };
        // Some(caller): allowed; the caller is a node the state names, or
        // unknown while this node catches up.
        let caller = state.read(|s| {
            if s.is_revoked(&fp) {
                None
            } else if s.nodes.contains_key(&self_id) {
                s.node_by_fingerprint(&fp).map(|node| Caller(Some(node.id)))
            } else {
                Some(Caller(None))
            }
        });
        match caller {
            Some(caller) => {
                let mut request = request;
                request.extensions_mut().insert(caller);
                Ok(request)
            }
            None => Err(Status::permission_denied(REVOKED)),
        }
    }
}

/// Requires `authorization: Bearer <admin token>` of this cluster.
pub fn require_admin(
    state: StateReader,
    ca_digest: CaDigest,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let header = request
            .metadata()
            .get(roost_proto::AUTHORIZATION)
            .ok_or_else(|| Status::unauthenticated("no admin token: pass --token or set ROOST_TOKEN"))?;
        let text = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("the authorization header must be `Bearer <admin token>`"))?;
        let token = Token::parse(text).map_err(|e| Status::unauthenticated(format!("malformed admin token: {e}")))?;
        check_admin(&state, &ca_digest, &token)?;
        Ok(request)
    }
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

/// Serves the public API with each call's bearer token as its [`Grant`].
/// The token is checked by [`require_admin`] inside; the grant only travels.
#[derive(Clone)]
pub struct WithGrant<S>(pub S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for WithGrant<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for WithGrant<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let grant = request
            .headers()
            .get(roost_proto::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(|token| Grant::Admin { token: token.to_owned() });
        Box::pin(with_grant(grant, self.0.call(request)))
    }
}

/// What the leader accepts as a grant for a forwarded proposal that a node
/// may not make on its own: the admin token for a user's change, the join
/// secret for a new node.
pub fn authorize(state: StateReader, ca_digest: CaDigest) -> Authorize {
    std::sync::Arc::new(move |command: &Command, grant: Option<&Grant>| match (command, grant) {
        (Command::AddNode { .. }, Some(Grant::Join { secret })) => {
            let current = state.read(|s| s.cluster.as_ref().map(|c| c.join_secret.clone())).unwrap_or_default();
            if !current.is_empty() && constant_time_eq(secret.as_bytes(), current.as_bytes()) {
                Ok(())
            } else {
                Err("the join secret is not the cluster's".into())
            }
        }
        (Command::Bootstrap { .. } | Command::Batch { .. }, _) => Err("it is never forwarded".into()),
        (_, Some(Grant::Admin { token })) => {
            let token = Token::parse(token).map_err(|e| format!("malformed admin token: {e}"))?;
            check_admin(&state, &ca_digest, &token).map_err(|status| status.message().to_owned())
        }
        (_, _) => Err("it needs the admin token of the user who asked for it".into()),
    })
}

fn check_admin(state: &StateReader, ca_digest: &CaDigest, token: &Token) -> Result<(), Status> {
    if token.kind != TokenKind::Admin {
        return Err(Status::unauthenticated(
            "that is a join token; the CLI needs the admin token (admin.token in the first node's data directory)",
        ));
    }
    if token.ca_digest != *ca_digest {
        return Err(Status::unauthenticated("the admin token belongs to another cluster"));
    }
    let expected = state.read(|s| s.cluster.as_ref().map(|c| c.admin_secret_sha256.clone()));
    let Some(expected) = expected else {
        return Err(Status::unavailable("this node has not caught up with the cluster yet; try again shortly"));
    };
    if !constant_time_eq(secret_digest(&token.secret).as_bytes(), expected.as_bytes()) {
        return Err(Status::unauthenticated("wrong admin token for this cluster"));
    }
    Ok(())
}
