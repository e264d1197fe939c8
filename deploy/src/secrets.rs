//! Sealing app secrets so the replicated state holds only ciphertext.
//!
//! The key is the cluster's secrets key: 32 random bytes made at `roost node
//! init`, kept in each node's data directory (mode 0600) and handed to a
//! joining node inside its (TLS) join answer. It is never in the Raft log or
//! snapshots, so those, and backups of them, do not reveal secrets. Values are
//! sealed with ChaCha20-Poly1305 under a random nonce; the app name and secret
//! name are the associated data, so a sealed value cannot be moved to another
//! secret.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use roost_raft::state::UnixMillis;
use roost_raft::workload::SealedSecret;

pub const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("the secrets key must be {KEY_LEN} bytes, hex-encoded")]
    BadKey,
    #[error("secret '{name}' could not be opened: it was sealed with another key, or changed")]
    Open { name: String },
    #[error("the system random source failed")]
    Random,
}

/// The cluster's secrets key.
pub struct SecretsKey {
    key: LessSafeKey,
    digest_key: hmac::Key,
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretsKey(..)")
    }
}

impl SecretsKey {
    /// A new random key, hex-encoded, for `roost node init`.
    pub fn generate_hex() -> Result<String, SecretsError> {
        let mut bytes = [0u8; KEY_LEN];
        SystemRandom::new().fill(&mut bytes).map_err(|_| SecretsError::Random)?;
        Ok(hex(&bytes))
    }

    pub fn from_hex(text: &str) -> Result<Self, SecretsError> {
        let bytes = unhex(text.trim()).filter(|b| b.len() == KEY_LEN).ok_or(SecretsError::BadKey)?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| SecretsError::BadKey)?;
        let derived = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &bytes), b"roost secret digests");
        Ok(Self { key: LessSafeKey::new(key), digest_key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()) })
    }

    pub fn seal(&self, app: &str, name: &str, value: &str, at: UnixMillis) -> Result<SealedSecret, SecretsError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| SecretsError::Random)?;
        let mut data = value.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), aad(app, name), &mut data)
            .map_err(|_| SecretsError::Random)?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&data);
        Ok(SealedSecret { sealed: hex(&sealed), digest: self.digest(app, name, value), updated_at: at })
    }

    /// A short digest of a value that tells a user it changed. Keyed (HMAC
    /// with a key derived from the secrets key), so a digest in the state or
    /// in `roost secrets list` cannot be checked against guessed values.
    fn digest(&self, app: &str, name: &str, value: &str) -> String {
        let tag = hmac::sign(&self.digest_key, format!("{app}\0{name}\0{value}").as_bytes());
        hex(&tag.as_ref()[..8])
    }

    pub fn open(&self, app: &str, name: &str, secret: &SealedSecret) -> Result<String, SecretsError> {
        let failed = || SecretsError::Open { name: name.to_owned() };
        let mut bytes = unhex(&secret.sealed).filter(|b| b.len() >= NONCE_LEN).ok_or_else(failed)?;
        let mut data = bytes.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&bytes).map_err(|_| failed())?;
        let plain = self.key.open_in_place(nonce, aad(app, name), &mut data).map_err(|_| failed())?;
        String::from_utf8(plain.to_vec()).map_err(|_| failed())
    }
}

fn aad(app: &str, name: &str) -> Aad<Vec<u8>> {
    Aad::from(format!("roost-secret\0{app}\0{name}").into_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_for_the_same_key_and_name() {
        let key = SecretsKey::from_hex(&SecretsKey::generate_hex().expect("random")).expect("key");
        let sealed = key.seal("hello", "DATABASE_URL", "postgres://secret", 1).expect("seal");
        assert!(!sealed.sealed.contains("secret"));
        assert_eq!(key.open("hello", "DATABASE_URL", &sealed).expect("open"), "postgres://secret");
        assert!(key.open("hello", "OTHER", &sealed).is_err(), "moved to another name");
        let other = SecretsKey::from_hex(&SecretsKey::generate_hex().expect("random")).expect("key");
        assert!(other.open("hello", "DATABASE_URL", &sealed).is_err(), "another key");
        assert_eq!(sealed.digest.len(), 16);
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(SecretsKey::from_hex("abc").is_err());
        assert!(SecretsKey::from_hex(&"00".repeat(16)).is_err());
        assert!(SecretsKey::from_hex(&"zz".repeat(32)).is_err());
    }
}
