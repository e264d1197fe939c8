//! Join and API tokens.
//!
//! A token is `ROOST-1-<ca digest>-<secret>` (join),
//! `ROOST-ADMIN-1-<ca digest>-<secret>` (the initial admin token `node init`
//! writes) or `ROOST-TOKEN-1-<ca digest>-<secret>` (a token `roost tokens
//! create` made, whatever its scope), in the spirit of Docker
//! Swarm's `SWMTKN-1-…`: the digest (SHA-256 of the cluster CA certificate,
//! hex) lets the holder trust the cluster before it has anything else, and the
//! secret proves the holder may join or administer it. Both parts are
//! lowercase hex, so a token survives copy and paste and shell quoting.
//!
//! An API token never travels to a node. The CLI derives an Ed25519 key pair
//! from its secret ([`Token::key`]) and signs the TLS session it talks over
//! ([`TokenKey::sign`]: the session's exporter value, the server's
//! certificate, the method called and the time); the state records only the
//! public key. A server that is not what it claims
//! (a removed node's data directory, say) sees a signature that is good for
//! its own session alone, and nothing it could present elsewhere.

use std::fmt;

use ring::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::pki::{hex, unhex, CaDigest};

const JOIN_PREFIX: &str = "ROOST-1-";
const ADMIN_PREFIX: &str = "ROOST-ADMIN-1-";
const API_PREFIX: &str = "ROOST-TOKEN-1-";
/// 16 random bytes, hex.
const SECRET_LEN: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    Join,
    /// The initial admin token.
    Admin,
    /// A token made by `roost tokens create`; its scope is in the state.
    Api,
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenKind::Join => "join token",
            TokenKind::Admin => "admin token",
            TokenKind::Api => "API token",
        })
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub kind: TokenKind,
    pub ca_digest: CaDigest,
    pub secret: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret is a credential: never print it through Debug.
        f.debug_struct("Token").field("kind", &self.kind).field("ca_digest", &self.ca_digest).finish_non_exhaustive()
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("a token starts with ROOST-1- (join), ROOST-ADMIN-1- or ROOST-TOKEN-1- (API); this one does not")]
    Prefix,
    #[error("the token's CA digest must be 64 lowercase hex characters")]
    Digest,
    #[error("the token's secret must be {SECRET_LEN} lowercase hex characters")]
    Secret,
}

impl Token {
    /// Makes a token with a fresh random secret.
    pub fn generate(kind: TokenKind, ca_digest: CaDigest) -> Self {
        Self { kind, ca_digest, secret: random_secret() }
    }

    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        let (kind, rest) = if let Some(rest) = text.strip_prefix(ADMIN_PREFIX) {
            (TokenKind::Admin, rest)
        } else if let Some(rest) = text.strip_prefix(API_PREFIX) {
            (TokenKind::Api, rest)
        } else if let Some(rest) = text.strip_prefix(JOIN_PREFIX) {
            (TokenKind::Join, rest)
        } else {
            return Err(TokenError::Prefix);
        };
        let (digest, secret) = rest.split_once('-').ok_or(TokenError::Digest)?;
        let ca_digest = CaDigest::from_hex(digest).ok_or(TokenError::Digest)?;
        if secret.len() != SECRET_LEN || !secret.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(TokenError::Secret);
        }
        Ok(Self { kind, ca_digest, secret: secret.to_owned() })
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self.kind {
            TokenKind::Join => JOIN_PREFIX,
            TokenKind::Admin => ADMIN_PREFIX,
            TokenKind::Api => API_PREFIX,
        };
        write!(f, "{prefix}{}-{}", self.ca_digest.to_hex(), self.secret)
    }
}

/// A fresh random secret, as a token carries it.
pub fn random_secret() -> String {
    let secret: [u8; SECRET_LEN / 2] = rand::random();
    hex(&secret)
}

/// The `authorization` scheme of a signed API call:
/// `Signed PUBLIC_KEY.TIMESTAMP_MS.SIGNATURE` (key and signature in hex).
pub const SIGNED_SCHEME: &str = "Signed ";
/// What the seed of a token's key pair is drawn with (HMAC-SHA256 keyed by
/// this label over the secret), so the key says nothing of the secret's
/// SHA-256 digest, which older states recorded.
const KEY_LABEL: &[u8] = b"roost api token key v1";
/// What a signature covers besides the session and the time, so it is
/// never good for any other purpose.
const SIGNED_LABEL: &[u8] = b"roost api call v1\0";

impl Token {
    /// The key pair this token's secret stands for: the public half is what
    /// the state records, the private half signs calls.
    pub fn key(&self) -> TokenKey {
        let seed = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, KEY_LABEL), self.secret.as_bytes());
        // Every 32-byte seed is a valid Ed25519 private key.
        let pair = Ed25519KeyPair::from_seed_unchecked(seed.as_ref()).expect("a 32-byte Ed25519 seed");
        TokenKey(pair)
    }
}

/// An API token's key pair ([`Token::key`]).
pub struct TokenKey(Ed25519KeyPair);

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TokenKey").field(&self.public_key()).finish()
    }
}

impl TokenKey {
    /// The public key, hex.
    pub fn public_key(&self) -> String {
        hex(self.0.public_key().as_ref())
    }

    /// Signs a call of the gRPC method `method` (its name, `CreateApp`) on
    /// the TLS session whose exporter value is `session`, with the server
    /// that presented the certificate whose fingerprint is `server`, at
    /// `timestamp_ms` (milliseconds since the Unix epoch, the signer's clock).
    pub fn sign(&self, call: &SignedCall<'_>, timestamp_ms: i64) -> TokenSignature {
        let signature = self.0.sign(&signed_message(call, timestamp_ms));
        TokenSignature { public_key: self.public_key(), timestamp_ms, signature: hex(signature.as_ref()) }
    }
}

/// What a signature covers besides the time.
#[derive(Clone, Copy, Debug)]
pub struct SignedCall<'a> {
    /// The TLS session's exporter value.
    pub session: &'a [u8],
    /// The fingerprint of the server's certificate.
    pub server: &'a str,
    /// The gRPC method's name.
    pub method: &'a str,
    /// What the call changes (the `roost-target` metadata, `KIND:NAME`),
    /// or empty: a grant for one app cannot be used to change another.
    pub target: &'a str,
}

fn signed_message(call: &SignedCall<'_>, timestamp_ms: i64) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNED_LABEL.len() + 64 + call.server.len() + call.method.len() + 16);
    message.extend_from_slice(SIGNED_LABEL);
    for part in [call.session, call.server.as_bytes(), call.method.as_bytes(), call.target.as_bytes()] {
        message.extend_from_slice(&(part.len() as u64).to_be_bytes());
        message.extend_from_slice(part);
    }
    message.extend_from_slice(&timestamp_ms.to_be_bytes());
    message
}

/// A signed API call's credentials, as the `authorization` header carries
/// them ([`SIGNED_SCHEME`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSignature {
    /// The token's public key, hex: which token signed.
    pub public_key: String,
    pub timestamp_ms: i64,
    /// The Ed25519 signature, hex.
    pub signature: String,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("a signed authorization is `Signed PUBLIC_KEY.TIMESTAMP_MS.SIGNATURE`, with the key and signature in hex")]
    Malformed,
    #[error("the token's signature does not match this TLS session (a signature is good for the session it was made on only; if the connection to the node was just reopened, run the command again)")]
    Mismatch,
}

impl TokenSignature {
    /// The `authorization` header's value.
    pub fn header(&self) -> String {
        format!("{SIGNED_SCHEME}{}.{}.{}", self.public_key, self.timestamp_ms, self.signature)
    }

    /// Parses what follows [`SIGNED_SCHEME`] in a header.
    pub fn parse(text: &str) -> Result<Self, SignatureError> {
        let mut parts = text.trim().split('.');
        let (Some(public_key), Some(timestamp), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SignatureError::Malformed);
        };
        let hex_of =
            |text: &str, bytes: usize| (text.len() == bytes * 2 && unhex(text).is_some()).then(|| text.to_owned());
        Ok(Self {
            public_key: hex_of(public_key, 32).ok_or(SignatureError::Malformed)?,
            timestamp_ms: timestamp.parse().map_err(|_| SignatureError::Malformed)?,
            signature: hex_of(signature, 64).ok_or(SignatureError::Malformed)?,
        })
    }

    /// Checks the signature over `call` (the receiving side's own view of
    /// the session, its own certificate, the method called) and the
    /// timestamp. Which token the key is, and whether the time is recent, is
    /// the caller's to check.
    pub fn verify(&self, call: &SignedCall<'_>) -> Result<(), SignatureError> {
        let (Some(key), Some(signature)) = (unhex(&self.public_key), unhex(&self.signature)) else {
            return Err(SignatureError::Malformed);
        };
        UnparsedPublicKey::new(&signature::ED25519, key)
            .verify(&signed_message(call, self.timestamp_ms), &signature)
            .map_err(|_| SignatureError::Mismatch)
    }
}

/// Who makes a join proof, and with what key ([`join_proof`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinProof {
    /// The joining node, keyed by the join secret.
    Joiner,
    /// The joining node, keyed by the secret's SHA-256 (hex), which every
    /// member's state holds: enough to pre-check a join anywhere, never to
    /// admit one.
    JoinerDigest,
    /// The seed, keyed by the join secret: only a node that knows the
    /// current secret can make it.
    Seed,
}

/// HMAC-SHA256 keyed by `key` (the join secret, or its digest for
/// [`JoinProof::JoinerDigest`]) over the TLS session's exporter value: it
/// proves knowledge of the key on that session alone, and reveals nothing
/// that would let the other end join (or pose as the cluster) elsewhere.
pub fn join_proof(key: &str, session: &[u8], who: JoinProof) -> Vec<u8> {
    let label: &[u8] = match who {
        JoinProof::Joiner => b"roost join v1 joiner\0",
        JoinProof::JoinerDigest => b"roost join v1 joiner digest\0",
        JoinProof::Seed => b"roost join v1 seed\0",
    };
    let mut context = ring::hmac::Context::with_key(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes()));
    context.update(label);
    context.update(session);
    context.sign().as_ref().to_vec()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn digest() -> CaDigest {
        CaDigest::of(b"a certificate")
    }

    #[test]
    fn round_trips_every_kind() {
        for kind in [TokenKind::Join, TokenKind::Admin, TokenKind::Api] {
            let token = Token::generate(kind, digest());
            assert_eq!(Token::parse(&token.to_string()), Ok(token));
        }
    }

    #[test]
    fn tolerates_surrounding_whitespace_from_a_file() {
        let token = Token::generate(TokenKind::Join, digest());
        assert_eq!(Token::parse(&format!("{token}\n")), Ok(token));
    }

    #[test]
    fn says_what_is_wrong() {
        let good = Token::generate(TokenKind::Join, digest()).to_string();
        assert_eq!(Token::parse("SWMTKN-1-abc-def"), Err(TokenError::Prefix));
        assert_eq!(Token::parse("ROOST-1-abc-0123"), Err(TokenError::Digest));
        assert_eq!(Token::parse(&good[..good.len() - 1]), Err(TokenError::Secret));
        // Uppercase hex is not what we print, so it is refused rather than guessed at.
        assert_eq!(Token::parse(&good.to_uppercase()), Err(TokenError::Digest));
    }

    #[test]
    fn a_signature_is_good_for_its_session_and_time_only() {
        let token = Token::generate(TokenKind::Api, digest());
        let key = token.key();
        assert_eq!(key.public_key(), token.key().public_key(), "the key follows from the secret alone");
        assert_ne!(key.public_key(), Token::generate(TokenKind::Api, digest()).key().public_key());
        let session = [7u8; 32];
        let call = SignedCall { session: &session, server: "server-a", method: "CreateApp", target: "app:web" };
        let signed = key.sign(&call, 1_000);
        let parsed = TokenSignature::parse(signed.header().strip_prefix(SIGNED_SCHEME).unwrap_or_default());
        assert_eq!(parsed.as_ref(), Ok(&signed));
        assert_eq!(signed.verify(&call), Ok(()));
        // Another session, server, method, target, time or key: refused.
        for other in [
            SignedCall { session: &[8u8; 32], ..call },
            SignedCall { server: "server-b", ..call },
            SignedCall { method: "DestroyApp", ..call },
            SignedCall { target: "app:db", ..call },
            SignedCall { target: "", ..call },
        ] {
            assert_eq!(signed.verify(&other), Err(SignatureError::Mismatch), "{other:?}");
        }
        let moved = TokenSignature { timestamp_ms: 1_001, ..signed.clone() };
        assert_eq!(moved.verify(&call), Err(SignatureError::Mismatch));
        let other = Token::generate(TokenKind::Api, digest()).key();
        let swapped = TokenSignature { public_key: other.public_key(), ..signed.clone() };
        assert_eq!(swapped.verify(&call), Err(SignatureError::Mismatch));
        // Nothing of the secret is in what travels.
        assert!(!signed.header().contains(&token.secret));
    }

    #[test]
    fn join_proofs_differ_by_key_session_and_side() {
        let session = [1u8; 32];
        let joiner = join_proof("s1", &session, JoinProof::Joiner);
        assert_eq!(joiner, join_proof("s1", &session, JoinProof::Joiner));
        assert_ne!(joiner, join_proof("s2", &session, JoinProof::Joiner));
        assert_ne!(joiner, join_proof("s1", &[2u8; 32], JoinProof::Joiner));
        // The seed cannot echo the joiner's proof back as its own.
        assert_ne!(joiner, join_proof("s1", &session, JoinProof::Seed));
        assert_ne!(joiner, join_proof("s1", &session, JoinProof::JoinerDigest));
    }

    #[test]
    fn a_malformed_signature_says_what_a_good_one_looks_like() {
        for bad in ["", "abc", "00.1.00", &format!("{}.x.{}", "0".repeat(64), "0".repeat(128))] {
            assert_eq!(TokenSignature::parse(bad), Err(SignatureError::Malformed), "{bad}");
        }
        let good = format!("{}.5.{}", "a".repeat(64), "b".repeat(128));
        assert!(TokenSignature::parse(&good).is_ok());
        assert_eq!(TokenSignature::parse(&format!("{good}.extra")), Err(SignatureError::Malformed));
    }

    #[test]
    fn debug_hides_the_secret() {
        let token = Token::generate(TokenKind::Admin, digest());
        assert!(!format!("{token:?}").contains(&token.secret));
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_input(s in ".{0,200}") {
            let _ = Token::parse(&s);
        }

        #[test]
        fn accepts_only_what_it_prints(s in "ROOST-(ADMIN-|TOKEN-)?1-[0-9a-f]{60,68}-[0-9a-f]{28,36}") {
            if let Ok(token) = Token::parse(&s) {
                prop_assert_eq!(token.to_string(), s);
            }
        }
    }
}
