//! Rotating the cluster CA (`roost cluster rotate-ca`), as `docker swarm ca
//! --rotate` does, without downtime:
//!
//! 1. [`Command::StartCaRotation`] records the new CA (its key sealed with
//!    the secrets key, as the current one is). From then on every node trusts
//!    both CAs.
//! 2. Each node gets a certificate from the new CA for its own key and
//!    records its fingerprint ([`Command::RenewNodeCertificate`]); the node
//!    is then known by either certificate.
//! 3. Once every current node has one, the leader makes the new CA the
//!    cluster's ([`Command::FinishCaRotation`]): each node's new certificate
//!    becomes its certificate, and the old one stays known as its former
//!    certificate (connections opened with it keep working) until the next
//!    rotation. Nodes then present the new certificate, and tokens pin the
//!    new CA's digest.
//!
//! A removed voter holds the old CA's key; after a rotation nothing a client
//! or a joining node trusts is signed with it.

use serde::{Deserialize, Serialize};

use super::State;
use crate::command::{Rejection, Response};
use crate::workload::SealedSecret;
use crate::NodeId;

/// A CA rotation under way.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRotation {
    /// The new CA's certificate (PEM).
    pub ca_cert_pem: String,
    /// Its key (PEM), sealed with the secrets key.
    pub ca_key: SealedSecret,
    pub started_at: crate::state::UnixMillis,
}

impl std::fmt::Debug for CaRotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaRotation").field("started_at", &self.started_at).finish_non_exhaustive()
    }
}

impl State {
    pub(super) fn start_ca_rotation(
        &mut self,
        ca_cert_pem: &str,
        ca_key: &SealedSecret,
        at: crate::state::UnixMillis,
    ) -> Response {
        let Some(cluster) = self.cluster.as_mut() else {
            return Response::Rejected(Rejection::NotBootstrapped);
        };
        if cluster.ca_rotation.is_some() {
            return Response::Rejected(Rejection::CaRotationInProgress);
        }
        if ca_cert_pem == cluster.ca_cert_pem || cluster.previous_ca_cert_pem.as_deref() == Some(ca_cert_pem) {
            return Response::Rejected(Rejection::CaNotNew);
        }
        cluster.ca_rotation =
            Some(CaRotation { ca_cert_pem: ca_cert_pem.to_owned(), ca_key: ca_key.clone(), started_at: at });
        for node in self.nodes.values_mut() {
            node.next_cert_fingerprint = None;
        }
        Response::Done
    }

    pub(super) fn renew_node_certificate(&mut self, id: NodeId, fingerprint: &str) -> Response {
        if self.cluster.as_ref().and_then(|c| c.ca_rotation.as_ref()).is_none() {
            return Response::Rejected(Rejection::NoCaRotation);
        }
        if self.revoked_certs.contains(fingerprint) {
            return Response::Rejected(Rejection::RevokedCertificate);
        }
        if self.nodes.values().any(|n| n.id != id && n.has_certificate(fingerprint)) {
            return Response::Rejected(Rejection::CertificateTaken);
        }
        let Some(node) = self.nodes.get_mut(&id) else {
            return Response::Rejected(Rejection::NodeNotFound { node: id.to_string() });
        };
        if node.cert_fingerprint == fingerprint || node.former_cert_fingerprint.as_deref() == Some(fingerprint) {
            return Response::Rejected(Rejection::CertificateTaken);
        }
        node.next_cert_fingerprint = Some(fingerprint.to_owned());
        Response::Done
    }

    pub(super) fn finish_ca_rotation(&mut self, ca_cert_pem: &str) -> Response {
        let pending = self.ca_rotation_pending();
        let Some(cluster) = self.cluster.as_mut() else {
            return Response::Rejected(Rejection::NotBootstrapped);
        };
        let Some(rotation) = cluster.ca_rotation.take_if(|r| r.ca_cert_pem == ca_cert_pem) else {
            return Response::Rejected(Rejection::NoCaRotation);
        };
        if !pending.is_empty() {
            cluster.ca_rotation = Some(rotation);
            return Response::Rejected(Rejection::CaRotationIncomplete { pending: pending.join(", ") });
        }
        cluster.previous_ca_cert_pem = Some(std::mem::replace(&mut cluster.ca_cert_pem, rotation.ca_cert_pem));
        cluster.ca_key = Some(rotation.ca_key);
        // A cluster made before the CA key was sealed kept it in plain text.
        cluster.ca_key_pem.clear();
        for node in self.nodes.values_mut() {
            if let Some(next) = node.next_cert_fingerprint.take() {
                node.former_cert_fingerprint = Some(std::mem::replace(&mut node.cert_fingerprint, next));
            }
        }
        Response::Done
    }

    /// Drops a rotation under way, as a removal does: the removed node may
    /// hold the new CA's key (a voter opens it) or a certificate from it, so
    /// that CA must never become the cluster's. Certificates from it are
    /// revoked; `roost cluster rotate-ca` starts afresh.
    pub(super) fn cancel_ca_rotation(&mut self) {
        let Some(cluster) = self.cluster.as_mut() else { return };
        if cluster.ca_rotation.take().is_none() {
            return;
        }
        for node in self.nodes.values_mut() {
            self.revoked_certs.extend(node.next_cert_fingerprint.take());
        }
    }

    /// The names of the current nodes that have no certificate from the CA
    /// being rotated to yet; empty when no rotation is under way.
    pub fn ca_rotation_pending(&self) -> Vec<String> {
        if self.cluster.as_ref().and_then(|c| c.ca_rotation.as_ref()).is_none() {
            return Vec::new();
        }
        self.nodes.values().filter(|n| n.next_cert_fingerprint.is_none()).map(|n| n.name.clone()).collect()
    }

    /// Every CA certificate (PEM) a node trusts now: the cluster's, the one
    /// being rotated to, and the one before (which signed the certificates
    /// that connections opened before the last rotation still use). Nodes
    /// are told apart by fingerprint on top of this, so the old CA's key,
    /// which a removed voter holds, makes no member.
    pub fn trusted_cas(&self) -> Vec<&str> {
        let Some(cluster) = &self.cluster else { return Vec::new() };
        let mut cas = vec![cluster.ca_cert_pem.as_str()];
        cas.extend(cluster.ca_rotation.as_ref().map(|r| r.ca_cert_pem.as_str()));
        cas.extend(cluster.previous_ca_cert_pem.as_deref());
        cas
    }
}
