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
use roost_raft::StateReader;
use tonic::{Request, Status};

pub const REVOKED: &str = "this node's certificate has been revoked: the node was removed from the cluster";

/// Requires a node certificate that has not been revoked.
pub fn require_node(state: StateReader) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let fingerprint = request.extensions().get::<PeerIdentity>().and_then(|p| p.node_fingerprint.clone());
        match fingerprint {
            None => Err(Status::unauthenticated("this service is for cluster nodes only: present a node certificate")),
            Some(fp) if state.read(|s| s.is_revoked(&fp)) => Err(Status::permission_denied(REVOKED)),
            Some(_) => Ok(request),
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
