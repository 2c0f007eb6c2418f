//! Token fingerprints for the audit trail: HMAC-SHA256 under a key only the
//! broker (and the investigator) holds, so the audit file can say which
//! token a release handed out without holding anything that works as one,
//! and a known leaked token can be looked up (`tokenbroker audit-hash`).

use std::path::Path;

use secrecy::ExposeSecret;

use crate::keyfile::{read_key_file, KeyFileError};

/// Prefix of every fingerprint, naming the algorithm.
pub const FINGERPRINT_PREFIX: &str = "hmac-sha256:";

/// The audit HMAC key (`TOKENBROKER_AUDIT_KEY_FILE`).
pub struct AuditKey {
    key: ring::hmac::Key,
}

impl AuditKey {
    /// Reads the key file (base64 of 32 bytes, see [`crate::keyfile`]).
    pub fn from_file(path: &Path) -> Result<Self, KeyFileError> {
        let bytes = read_key_file(path)?;
        Ok(Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bytes.expose_secret()),
        })
    }

    /// `hmac-sha256:` + lowercase hex of HMAC-SHA256(key, token).
    pub fn fingerprint(&self, token: &str) -> String {
        let tag = ring::hmac::sign(&self.key, token.as_bytes());
        let mut text = String::with_capacity(FINGERPRINT_PREFIX.len() + 64);
        text.push_str(FINGERPRINT_PREFIX);
        text.push_str(&hex::encode(tag.as_ref()));
        text
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_hmac_sha256_of_the_token_in_hex() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=\n").unwrap();
        let key = AuditKey::from_file(&path).unwrap();
        let fingerprint = key.fingerprint("gho_token");
        assert!(fingerprint.starts_with(FINGERPRINT_PREFIX));
        let tag = hex::decode(&fingerprint[FINGERPRINT_PREFIX.len()..]).unwrap();
        assert!(ring::hmac::verify(&key.key, b"gho_token", &tag).is_ok());
        assert_ne!(fingerprint, key.fingerprint("gho_token2"));
        assert_eq!(format!("{key:?}"), "AuditKey([REDACTED])");
    }
}
