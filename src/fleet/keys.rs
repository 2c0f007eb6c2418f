//! The cache key file's two uses, each under its own subkey so that neither
//! can stand in for the other: key names (HMAC-SHA256 of the user id, so a
//! user id never appears in Redis) and sealing (AES-256-GCM with a random
//! 96-bit nonce per value, so no token does).
//!
//! A sealed value is bound to the Redis key it is stored under (that key is
//! its associated data): a value copied to another user's key, or sealed
//! under another cache key, does not open, and a value that does not open is
//! a miss.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::Aes256Gcm;
use rand::RngCore;
use ring::hmac;
use secrecy::{ExposeSecret, SecretBox};
use zeroize::Zeroizing;

use crate::keyfile::KEY_BYTES;
use crate::user_id::UserId;

/// First byte of every sealed value: the format, so a later one can be told apart.
const SEAL_VERSION: u8 = 1;
/// AES-GCM nonce length: 96 bits, random per value.
const NONCE_BYTES: usize = 12;
/// What the subkeys are derived for (HMAC-SHA256 of the file's key over
/// these labels): changing a label orphans every entry.
const SEALING_LABEL: &[u8] = b"tokenbroker fleet v1: sealing";
const NAMING_LABEL: &[u8] = b"tokenbroker fleet v1: key names";

/// Prefix of every Redis key the broker writes, so an operator can tell them apart.
pub(super) const KEY_PREFIX: &str = "tokenbroker:";

/// Where one user's shared state lives in Redis. Every name carries the
/// same hash tag, so they hash to one slot (scripts touch several).
#[derive(Debug, Clone)]
pub(super) struct UserSlot {
    /// The sealed identities.
    pub(super) value: String,
    /// The fleet-wide single-flight lock of the user's Auth0 read.
    pub(super) lock: String,
    /// A hash of the user's kept tokens (refreshed at the IdP, exchanged at
    /// Token Vault), one field per kind and connection.
    pub(super) kept: String,
    /// Counts the user's invalidations: a kept token is stored only if none
    /// came since its fetch began.
    pub(super) generation: String,
    /// A hash of the user's rotated refresh tokens, one field per
    /// connection; dropped by invalidations like the tokens (see `tokens.rs`).
    pub(super) rotations: String,
}

/// Where one kept token of a user (one kind, one connection) lives: the
/// user's hashes and a lock of its own.
#[derive(Debug, Clone)]
pub(super) struct TokenSlot {
    /// The user's slot (its `kept` hash, `generation` and `rotations`).
    pub(super) user: UserSlot,
    /// This token's field in `user.kept`: kind and connection hash.
    pub(super) field: String,
    /// The fleet-wide single-flight lock of this token's fetch.
    pub(super) lock: String,
    /// This connection's field in `user.rotations`.
    pub(super) rotation_field: String,
}

/// The subkeys derived from the cache key file.
pub(super) struct FleetKeys {
    /// Seals values and invalidation messages.
    sealing: Aes256Gcm,
    /// Names users' keys.
    naming: hmac::Key,
}

impl FleetKeys {
    /// The subkeys of the file's key.
    pub(super) fn derive(file_key: &SecretBox<[u8; KEY_BYTES]>) -> Self {
        let master = hmac::Key::new(hmac::HMAC_SHA256, file_key.expose_secret());
        // An HMAC-SHA256 tag is 32 bytes: exactly an AES-256 key.
        let mut sealing_key = Zeroizing::new([0u8; KEY_BYTES]);
        sealing_key.copy_from_slice(hmac::sign(&master, SEALING_LABEL).as_ref());
        let naming_key = hmac::sign(&master, NAMING_LABEL);
        Self {
            sealing: Aes256Gcm::new(&(*sealing_key).into()),
            naming: hmac::Key::new(hmac::HMAC_SHA256, naming_key.as_ref()),
        }
    }

    /// The user's keys: a hash of the user id, never the id.
    pub(super) fn slot(&self, user_id: &UserId) -> UserSlot {
        self.slot_named(&self.name(user_id.as_str().as_bytes()))
    }

    /// Where the token of `kind` (`idp`, `vault`) from `connection` is kept
    /// for `user_id`; the connection is hashed too, so key names say nothing
    /// of who uses what.
    pub(super) fn token_slot(&self, user_id: &str, kind: &str, connection: &str) -> TokenSlot {
        let name = self.name(user_id.as_bytes());
        let mut labelled = b"connection:".to_vec();
        labelled.extend_from_slice(connection.as_bytes());
        let connection = &self.name(&labelled)[..32];
        TokenSlot {
            user: self.slot_named(&name),
            field: format!("{kind}:{connection}"),
            lock: format!("{KEY_PREFIX}kl:{{{name}}}:{kind}:{connection}"),
            rotation_field: connection.to_owned(),
        }
    }

    /// Hex of the naming HMAC of `bytes`.
    fn name(&self, bytes: &[u8]) -> String {
        hex::encode(hmac::sign(&self.naming, bytes).as_ref())
    }

    fn slot_named(&self, name: &str) -> UserSlot {
        UserSlot {
            value: format!("{KEY_PREFIX}u:{{{name}}}"),
            lock: format!("{KEY_PREFIX}l:{{{name}}}"),
            kept: format!("{KEY_PREFIX}k:{{{name}}}"),
            generation: format!("{KEY_PREFIX}g:{{{name}}}"),
            rotations: format!("{KEY_PREFIX}r:{{{name}}}"),
        }
    }

    /// `plaintext` sealed and bound to `context` (the Redis key or channel
    /// it goes to): version, nonce, ciphertext with its tag. `None` only past
    /// AES-GCM's length limit (64 GiB), which nothing here comes near.
    pub(super) fn seal(&self, context: &[u8], plaintext: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rng().fill_bytes(&mut nonce);
        let payload = Payload {
            msg: plaintext,
            aad: context,
        };
        let ciphertext = self.sealing.encrypt(&nonce.into(), payload).ok()?;
        let mut sealed = Vec::with_capacity(1 + NONCE_BYTES + ciphertext.len());
        sealed.push(SEAL_VERSION);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        Some(sealed)
    }

    /// The plaintext of `sealed` if it was sealed under these keys for
    /// `context`; `None` for anything else (another key, another context,
    /// tampered or truncated bytes). Zeroed when dropped.
    pub(super) fn open(&self, context: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let (&version, rest) = sealed.split_first()?;
        if version != SEAL_VERSION || rest.len() < NONCE_BYTES {
            return None;
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_BYTES);
        let nonce: [u8; NONCE_BYTES] = nonce.try_into().ok()?;
        let payload = Payload {
            msg: ciphertext,
            aad: context,
        };
        self.sealing
            .decrypt(&nonce.into(), payload)
            .ok()
            .map(Zeroizing::new)
    }
}

impl FleetKeys {
    /// `value` as JSON, sealed for `context`; the plaintext is zeroed.
    pub(super) fn seal_json<T: serde::Serialize>(
        &self,
        context: &[u8],
        value: &T,
    ) -> Option<Vec<u8>> {
        let plaintext = Zeroizing::new(serde_json::to_vec(value).ok()?);
        self.seal(context, &plaintext)
    }

    /// The JSON value sealed in `sealed` for `context`, if it opens and
    /// parses; the plaintext is zeroed.
    pub(super) fn open_json<T: serde::de::DeserializeOwned>(
        &self,
        context: &[u8],
        sealed: &[u8],
    ) -> Option<T> {
        let plaintext = self.open(context, sealed)?;
        serde_json::from_slice(&plaintext).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(byte: u8) -> FleetKeys {
        FleetKeys::derive(&SecretBox::new(Box::new([byte; KEY_BYTES])))
    }

    #[test]
    fn sealed_values_open_only_under_the_same_key_and_context() {
        let sealed = keys(1).seal(b"slot-a", b"gho_secret").unwrap();
        assert_eq!(
            keys(1).open(b"slot-a", &sealed).unwrap().as_slice(),
            b"gho_secret"
        );
        assert!(keys(2).open(b"slot-a", &sealed).is_none(), "another key");
        assert!(keys(1).open(b"slot-b", &sealed).is_none(), "another slot");
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(keys(1).open(b"slot-a", &tampered).is_none(), "tampered");
        assert!(
            keys(1).open(b"slot-a", &sealed[..10]).is_none(),
            "truncated"
        );
        assert!(keys(1).open(b"slot-a", &[]).is_none(), "empty");
    }

    #[test]
    fn every_seal_has_its_own_nonce_and_hides_the_plaintext() {
        let keys = keys(1);
        let first = keys.seal(b"k", b"gho_secret").unwrap();
        let second = keys.seal(b"k", b"gho_secret").unwrap();
        assert_ne!(first, second);
        assert!(!first.windows(10).any(|window| window == b"gho_secret"));
    }

    #[test]
    fn key_names_hide_the_user_id_and_differ_by_key() {
        let user = UserId::parse("github|1234567").unwrap();
        let slot = keys(1).slot(&user);
        assert!(!slot.value.contains("1234567"), "{}", slot.value);
        assert!(slot.value.starts_with("tokenbroker:u:{"));
        assert_eq!(slot.value.len(), "tokenbroker:u:{}".len() + 64);
        assert_eq!(slot.value.replace(":u:", ":l:"), slot.lock);
        assert_ne!(keys(2).slot(&user).value, slot.value);
        assert_eq!(keys(1).slot(&user).value, slot.value, "stable");
        let token = keys(1).token_slot(user.as_str(), "idp", "google-oauth2");
        for name in [&token.lock, &token.user.rotations, &token.user.kept] {
            assert!(
                name.contains(&slot.value["tokenbroker:u:".len()..]),
                "one hash slot: {name}"
            );
            assert!(!name.contains("google"), "{name}");
        }
        assert!(!token.field.contains("google"), "{}", token.field);
        let other = keys(1).token_slot(user.as_str(), "idp", "github");
        assert_ne!(token.field, other.field);
        assert_ne!(token.lock, other.lock);
    }
}
