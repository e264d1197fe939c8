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

use std::fmt;

use crate::pki::{hex, CaDigest};

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
        let secret: [u8; SECRET_LEN / 2] = rand::random();
        Self { kind, ca_digest, secret: hex(&secret) }
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
