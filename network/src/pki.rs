//! The cluster certificate authority and node certificates.
//!
//! A cluster has one CA, created by `roost node init`. Its certificate and key
//! live in the replicated state so that whichever node answers a join can sign
//! the newcomer's certificate. Node keys never leave their node: a joining node
//! sends only its public key, and receives a certificate for it.
//!
//! Every node certificate names the same DNS identity, [`NODE_SERVER_NAME`]:
//! nodes are told apart by the certificate's fingerprint, which the replicated
//! state records, not by host names that may change or be shared on one host.

use std::fmt;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SerialNumber, SignatureAlgorithm, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// The server name every node certificate carries and every client checks.
pub const NODE_SERVER_NAME: &str = "node.roost.internal";

/// The server name of a node's API certificate: the CLI asks for it and
/// accepts no other. Unlike node certificates, API certificates are
/// short-lived and only a current member gets a new one
/// ([`ClusterCa::issue_api`]), so a removed node's data directory stops
/// passing for a node with the CLI once its last one expires.
pub const API_SERVER_NAME: &str = "api.node.roost.internal";

/// How far before its issue an API certificate is valid from, for a CLI
/// whose clock lags the cluster's.
pub const API_CERT_BACKDATE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Node certificates are long-lived; rotation is a later feature and revocation
/// (by fingerprint, through the replicated state) is what removal relies on.
const NODE_CERT_DAYS: i64 = 3650;
/// Edge certificates for APP.DOMAIN are made on demand and kept in memory;
/// a node restart makes new ones, well before these expire.
const EDGE_CERT_DAYS: i64 = 90;
const CA_CERT_DAYS: i64 = 3650 * 2;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("could not generate a key")]
    KeyGeneration(#[source] rcgen::Error),
    #[error("could not sign a certificate")]
    Signing(#[source] rcgen::Error),
    #[error("the {what} is not valid PEM")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the {what} is not a usable key")]
    Key {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("the public key has {len} bytes; an uncompressed P-256 point has 65")]
    PublicKeyLength { len: usize },
    #[error("{name} is the name every node (or node API) certificate carries; no other certificate may")]
    ReservedName { name: String },
    #[error("an API certificate must live between 1 second and 1 year, not {seconds} s")]
    ApiLifetime { seconds: u64 },
    #[error("the certificate cannot be read: {reason}")]
    Unreadable { reason: String },
}

/// SHA-256 of a certificate's DER bytes: how tokens pin the CA and how the
/// state names (and revokes) node certificates.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CaDigest(pub [u8; 32]);

impl CaDigest {
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = unhex(s)?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Display for CaDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for CaDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaDigest({})", self.to_hex())
    }
}

/// Hex of the SHA-256 of a certificate's DER bytes.
pub fn fingerprint(der: &[u8]) -> String {
    CaDigest::of(der).to_hex()
}

/// A certificate and its private key, both PEM: a node's identity on the wire.
#[derive(Clone)]
pub struct NodeCredentials {
    pub cert_pem: String,
    pub key_pem: String,
    /// Random, hex; recorded in the state beside the fingerprint.
    pub serial: String,
    pub fingerprint: String,
}

impl fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCredentials")
            .field("serial", &self.serial)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// A node's freshly generated key pair, before the CA has certified it.
pub struct NodeKey {
    key: KeyPair,
}

impl NodeKey {
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::KeyGeneration)?;
        Ok(Self { key })
    }

    /// The raw public key (an uncompressed P-256 point), as sent in a join.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key_raw().to_vec()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A node's key as its data directory holds it.
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(pem).map_err(|source| PkiError::Key { what: "node key", source })?;
        Ok(Self { key })
    }
}

/// A public key received from a joining node.
struct RawP256PublicKey(Vec<u8>);

impl PublicKeyData for RawP256PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// The cluster CA, able to sign node certificates.
pub struct ClusterCa {
    cert_pem: String,
    cert_der: Vec<u8>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa").field("digest", &self.digest()).finish_non_exhaustive()
    }
}

/// The CA's parameters are a function of the cluster id alone, so that the
/// issuer can be rebuilt from the stored key without parsing the certificate.
fn ca_params(cluster_id: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Roost");
    dn.push(DnType::CommonName, format!("Roost cluster CA {cluster_id}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

impl ClusterCa {
    /// Creates a new CA for a new cluster.
    pub fn generate(cluster_id: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::KeyGeneration)?;
        let mut params = ca_params(cluster_id);
        let now = time_now();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(CA_CERT_DAYS);
        params.serial_number = Some(random_serial().0);
        let cert = params.self_signed(&key).map_err(PkiError::Signing)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem,
            issuer: Issuer::new(ca_params(cluster_id), key),
        })
    }

    /// Rebuilds the CA from what the replicated state stores.
    pub fn load(cluster_id: &str, cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|source| PkiError::Pem { what: "CA certificate", source })?;
        let key = KeyPair::from_pem(key_pem).map_err(|source| PkiError::Key { what: "CA key", source })?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            cert_der: cert_der.to_vec(),
            key_pem: key_pem.to_owned(),
            issuer: Issuer::new(ca_params(cluster_id), key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    pub fn digest(&self) -> CaDigest {
        CaDigest::of(&self.cert_der)
    }

    /// Issues a node certificate for a public key generated on that node.
    pub fn issue_for_public_key(
        &self,
        node_name: &str,
        public_key: &[u8],
    ) -> Result<(String, String, String), PkiError> {
        if public_key.len() != 65 {
            return Err(PkiError::PublicKeyLength { len: public_key.len() });
        }
        let (serial, serial_hex) = random_serial();
        let mut params = CertificateParams::new(vec![NODE_SERVER_NAME.to_owned()]).map_err(PkiError::Signing)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Roost");
        dn.push(DnType::CommonName, node_name);
        params.distinguished_name = dn;
        params.serial_number = Some(serial);
        let now = time_now();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(NODE_CERT_DAYS);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&RawP256PublicKey(public_key.to_vec()), &self.issuer).map_err(PkiError::Signing)?;
        Ok((cert.pem(), serial_hex, fingerprint(cert.der())))
    }

    /// Generates a key and issues a TLS server certificate for `name` (an
    /// app under the cluster domain, served by the edge until an ACME
    /// certificate replaces it). Returns the certificate and key, PEM.
    pub fn issue_server(&self, name: &str) -> Result<(String, String), PkiError> {
        // Those names are how clients know a node: no app may have them.
        if name.eq_ignore_ascii_case(NODE_SERVER_NAME) || name.eq_ignore_ascii_case(API_SERVER_NAME) {
            return Err(PkiError::ReservedName { name: name.to_owned() });
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::KeyGeneration)?;
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(PkiError::Signing)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Roost");
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.serial_number = Some(random_serial().0);
        let now = time_now();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(EDGE_CERT_DAYS);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).map_err(PkiError::Signing)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues the API certificate of the node `node_name` for its key
    /// (`public_key`), valid from [`API_CERT_BACKDATE`] ago until
    /// `lifetime` from now: what the node presents to the CLI (which asks
    /// for [`API_SERVER_NAME`]). It names the fingerprint of the node's
    /// certificate for that key (`node_fingerprint`), which a signed call
    /// names as its server ([`api_node_fingerprint`]). Returns the
    /// certificate followed by this CA's, PEM.
    pub fn issue_api(
        &self,
        node_name: &str,
        public_key: &[u8],
        node_fingerprint: &str,
        lifetime: std::time::Duration,
    ) -> Result<String, PkiError> {
        if public_key.len() != 65 {
            return Err(PkiError::PublicKeyLength { len: public_key.len() });
        }
        if lifetime < std::time::Duration::from_secs(1) || lifetime > std::time::Duration::from_secs(365 * 86_400) {
            return Err(PkiError::ApiLifetime { seconds: lifetime.as_secs() });
        }
        let mut params = CertificateParams::new(vec![API_SERVER_NAME.to_owned()]).map_err(PkiError::Signing)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Roost");
        dn.push(DnType::OrganizationalUnitName, node_fingerprint);
        dn.push(DnType::CommonName, node_name);
        params.distinguished_name = dn;
        params.serial_number = Some(random_serial().0);
        let now = time_now();
        params.not_before = now - API_CERT_BACKDATE;
        params.not_after = now + lifetime;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&RawP256PublicKey(public_key.to_vec()), &self.issuer).map_err(PkiError::Signing)?;
        Ok(format!("{}{}", cert.pem(), self.cert_pem))
    }

    /// Generates a key and issues a certificate for it, for the node that
    /// creates the cluster (it has the CA at hand, so nothing travels).
    pub fn issue_node(&self, node_name: &str) -> Result<NodeCredentials, PkiError> {
        let key = NodeKey::generate()?;
        let (cert_pem, serial, fingerprint) = self.issue_for_public_key(node_name, &key.public_key())?;
        Ok(NodeCredentials { cert_pem, key_pem: key.key_pem(), serial, fingerprint })
    }
}

/// Whether the certificate `cert_der` certifies the P-256 key `public_key`
/// (an uncompressed point): its SubjectPublicKeyInfo, a DER element of its
/// own, is that key's. Certificates here come from the cluster CA, which
/// writes no other copy of a key into one.
pub fn certifies_key(cert_der: &[u8], public_key: &[u8]) -> bool {
    if public_key.len() != 65 {
        return false;
    }
    let spki = RawP256PublicKey(public_key.to_vec()).subject_public_key_info();
    cert_der.windows(spki.len()).any(|window| window == spki.as_slice())
}

/// The fingerprint of the node certificate that an API certificate (DER)
/// names ([`ClusterCa::issue_api`]).
pub fn api_node_fingerprint(der: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(der).ok()?;
    let unit = parsed.subject().iter_organizational_unit().next()?.as_str().ok()?.to_owned();
    Some(unit)
}

/// When the first certificate of `pem` (a chain's leaf) becomes and stops
/// being valid, in Unix milliseconds.
pub fn validity(pem: &str) -> Result<(i64, i64), PkiError> {
    let leaf = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| PkiError::Unreadable { reason: "no certificate in the chain".into() })?
        .map_err(|e| PkiError::Unreadable { reason: e.to_string() })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| PkiError::Unreadable { reason: e.to_string() })?;
    let validity = parsed.validity();
    Ok((validity.not_before.timestamp().saturating_mul(1000), validity.not_after.timestamp().saturating_mul(1000)))
}

/// Parses the first certificate of a PEM text into DER.
pub fn cert_der_from_pem(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|source| PkiError::Pem { what: "certificate", source })
}

pub fn key_der_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| PkiError::Pem { what: "private key", source })
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn random_serial() -> (SerialNumber, String) {
    let mut bytes: [u8; 16] = rand::random();
    // A positive INTEGER: clear the top bit so DER needs no padding byte.
    bytes[0] &= 0x7f;
    (SerialNumber::from_slice(&bytes), hex(&bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    s.as_bytes().chunks(2).map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?)).collect()
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// SHA-256 of a secret, hex: what the state keeps of the admin secret.
pub fn secret_digest(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_server_certificate_is_issued_for_the_node_name() {
        let ca = ClusterCa::generate("c1").expect("ca");
        assert!(matches!(ca.issue_server(NODE_SERVER_NAME), Err(PkiError::ReservedName { .. })));
        assert!(matches!(ca.issue_server("NODE.roost.internal"), Err(PkiError::ReservedName { .. })));
        assert!(matches!(ca.issue_server(API_SERVER_NAME), Err(PkiError::ReservedName { .. })));
        assert!(ca.issue_server("web.roost.internal").is_ok());
    }

    #[test]
    fn issued_certificates_carry_distinct_serials_and_fingerprints() {
        let ca = ClusterCa::generate("c1").expect("ca");
        let a = ca.issue_node("a").expect("a");
        let b = ca.issue_node("b").expect("b");
        assert_ne!(a.serial, b.serial);
        assert_ne!(a.fingerprint, b.fingerprint);
        assert_eq!(a.fingerprint, fingerprint(&cert_der_from_pem(&a.cert_pem).expect("pem")));
    }

    #[test]
    fn a_reloaded_ca_signs_certificates_that_chain_to_it() {
        let ca = ClusterCa::generate("c1").expect("ca");
        let again = ClusterCa::load("c1", ca.cert_pem(), ca.key_pem()).expect("load");
        assert_eq!(ca.digest(), again.digest());
        let node = again.issue_node("n").expect("issue");
        let der = cert_der_from_pem(&node.cert_pem).expect("der");
        let key = NodeKey::from_pem(&node.key_pem).expect("key");
        assert!(certifies_key(&der, &key.public_key()), "a node's certificate certifies its key");
        assert!(!certifies_key(&der, &NodeKey::generate().expect("key").public_key()), "and no other");
        crate::tls::verify_chain(
            &ca.digest(),
            &cert_der_from_pem(ca.cert_pem()).expect("ca der"),
            &cert_der_from_pem(&node.cert_pem).expect("der"),
        )
        .expect("chains to the CA");
    }

    #[test]
    fn rejects_a_public_key_of_the_wrong_size() {
        let ca = ClusterCa::generate("c1").expect("ca");
        assert!(matches!(ca.issue_for_public_key("n", &[4; 10]), Err(PkiError::PublicKeyLength { len: 10 })));
    }

    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&bytes)).as_deref(), Some(&bytes[..]));
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
    }
}
