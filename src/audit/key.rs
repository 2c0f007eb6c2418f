//! Token fingerprints for the audit trail: HMAC-SHA256 under a key only the
//! broker (and the investigator) holds, so the audit file can say which
//! token a release handed out without holding anything that works as one,
//! and a known leaked token can be looked up (`tokenbroker audit-hash`).

use std::path::Path;

use secrecy::ExposeSecret;

use crate::keyfile::{read_key_file, KeyFileError};

/// Prefix of every fingerprint, naming the algorithm.
pub const FINGERPRINT_PREFIX: &str = "hmac-sha256:";

/// Length of a fingerprint: the prefix and 64 hex digits.
const FINGERPRINT_BYTES: usize = FINGERPRINT_PREFIX.len() + 64;

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
        let mut text = Vec::with_capacity(FINGERPRINT_BYTES);
        self.append_fingerprint(&mut text, token);
        // Only the ASCII prefix and hex digits were written.
        String::from_utf8(text).unwrap_or_default()
    }

    /// Appends [`Self::fingerprint`] of `token` to `out`, with no allocation
    /// on the way (an audit line is built for every release).
    pub fn append_fingerprint(&self, out: &mut Vec<u8>, token: &str) {
        let tag = ring::hmac::sign(&self.key, token.as_bytes());
        let mut hex = [0u8; 64];
        // The buffer is exactly twice the tag's 32 bytes: this cannot fail.
        if hex::encode_to_slice(tag.as_ref(), &mut hex).is_ok() {
            out.extend_from_slice(FINGERPRINT_PREFIX.as_bytes());
            out.extend_from_slice(&hex);
        }
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
