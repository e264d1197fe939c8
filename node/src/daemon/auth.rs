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
use roost_raft::{NodeId, StateReader};
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
        let allowed = state.read(|s| {
            if s.is_revoked(&fp) {
                false
            } else if s.nodes.contains_key(&self_id) {
                s.node_by_fingerprint(&fp).is_some()
            } else {
                true
            }
        });
        if allowed {
            Ok(request)
        } else {
            Err(Status::permission_denied(REVOKED))
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
