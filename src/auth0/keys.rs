//! The RSA private keys the broker signs its own JWTs with: the client
//! assertion of `private_key_jwt` (every `/oauth/token` call) and the Token
//! Vault subject token. Each is read from a PEM file, PKCS#8
//! (`BEGIN PRIVATE KEY`, what `openssl genpkey` writes) or PKCS#1
//! (`BEGIN RSA PRIVATE KEY`), checked by ring when read (a bad key fails at
//! start, never at the first signature), and swapped whole when the file
//! changes, as the TLS files are: a rotated key takes effect without a
//! restart, a bad new file keeps the old key.
//!
//! The key never leaves ring's key pair: the PEM bytes are zeroed once
//! parsed, and `Debug` shows the file, not the key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use secrecy::zeroize::Zeroize;
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use serde::Serialize;

/// Why a key file cannot be used; names the setting and the file, never
/// anything of its content.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{setting} {path}: {source}")]
    Read {
        setting: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{setting} {path}: {reason}")]
    Invalid {
        setting: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// Why a JWT could not be signed (ring failed to sign or to draw random
/// bytes): nothing an operator or a caller did.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the broker could not sign its {what}: {reason}")]
pub struct SignError {
    what: &'static str,
    reason: String,
}

/// One RSA key the broker signs with, read from a PEM file and reloaded from
/// it. Share it behind an `Arc`: the reload watcher and the signers hold the
/// same one.
pub struct SigningKeyFile {
    /// The setting that names the file, for errors and log lines.
    setting: &'static str,
    path: PathBuf,
    /// `kid` of every JWT signed with it: the id Auth0 gave the registered
    /// public key, needed when several are registered.
    key_id: Option<String>,
    /// The key in force: swapped whole on a good reload.
    current: arc_swap::ArcSwap<RsaKeyPair>,
}

impl SigningKeyFile {
    /// Reads and checks the key in `path`, named by `setting` in errors,
    /// signing with `key_id` as `kid` when one is given.
    pub fn open(
        setting: &'static str,
        path: &Path,
        key_id: Option<String>,
    ) -> Result<Self, KeyFileError> {
        let pair = read_key(setting, path)?;
        Ok(Self {
            setting,
            path: path.to_owned(),
            key_id: key_id.filter(|id| !id.trim().is_empty()),
            current: arc_swap::ArcSwap::from_pointee(pair),
        })
    }

    /// The file to watch for a rotated key.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `kid` sent with every JWT it signs, if any.
    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }

    /// Reads the file again: a good key replaces the one in force (the next
    /// JWT is signed with it), a bad one is logged and the old key kept.
    pub fn reload(&self) {
        match read_key(self.setting, &self.path) {
            Ok(pair) => {
                self.current.store(Arc::new(pair));
                crate::stats::signing_key_reload(self.setting, true);
                tracing::info!(setting = self.setting, path = %self.path.display(), "signing key reloaded");
            }
            Err(error) => {
                crate::stats::signing_key_reload(self.setting, false);
                tracing::error!(%error, "signing key not reloaded: keeping the previous key");
            }
        }
    }

    /// The public half of the key in force, as a PEM `PUBLIC KEY`
    /// (SubjectPublicKeyInfo): what Auth0 takes when the key is registered.
    pub fn public_key_pem(&self) -> String {
        public_key_pem(&self.current.load())
    }

    /// A compact RS256 JWT of `claims`, with `typ` in its header when given
    /// and the key id as `kid`. Secret from the moment it exists: it
    /// authenticates the broker until it expires.
    pub(crate) fn sign(
        &self,
        what: &'static str,
        typ: Option<&'static str>,
        claims: &impl Serialize,
    ) -> Result<SecretString, SignError> {
        let header = Header {
            alg: "RS256",
            typ,
            kid: self.key_id.as_deref(),
        };
        sign_jwt(&self.current.load(), &header, claims).map_err(|reason| SignError { what, reason })
    }
}

impl std::fmt::Debug for SigningKeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeyFile")
            .field("setting", &self.setting)
            .field("path", &self.path)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// The JOSE header of every JWT the broker signs.
#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    typ: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kid: Option<&'a str>,
}

/// The RSA key pair in `path`; the file's bytes are zeroed once parsed.
fn read_key(setting: &'static str, path: &Path) -> Result<RsaKeyPair, KeyFileError> {
    let bytes = std::fs::read(path).map_err(|source| KeyFileError::Read {
        setting,
        path: path.to_owned(),
        source,
    })?;
    let pem = SecretSlice::from(bytes);
    parse_key(pem.expose_secret()).map_err(|reason| KeyFileError::Invalid {
        setting,
        path: path.to_owned(),
        reason,
    })
}

/// An RSA key pair from PEM text: PKCS#8 or PKCS#1, at least 2048 bits
/// (ring's floor, and Auth0's).
fn parse_key(pem: &[u8]) -> Result<RsaKeyPair, String> {
    let mut der = PrivateKeyDer::from_pem_slice(pem).map_err(|_| {
        "holds no PEM private key (BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY)".to_owned()
    })?;
    let pair = match &der {
        PrivateKeyDer::Pkcs8(key) => RsaKeyPair::from_pkcs8(key.secret_pkcs8_der()),
        PrivateKeyDer::Pkcs1(key) => RsaKeyPair::from_der(key.secret_pkcs1_der()),
        _ => {
            der.zeroize();
            return Err(
                "holds an EC key; the broker signs with RS256 and needs an RSA key".to_owned(),
            );
        }
    };
    der.zeroize();
    pair.map_err(|rejected| format!("is not a usable RSA private key ({rejected})"))
}

/// `header.claims.signature`, each part base64url without padding.
fn sign_jwt(
    pair: &RsaKeyPair,
    header: &Header<'_>,
    claims: &impl Serialize,
) -> Result<SecretString, String> {
    let header = serde_json::to_vec(header).map_err(|error| error.to_string())?;
    let claims = serde_json::to_vec(claims).map_err(|error| error.to_string())?;
    let mut jwt = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let mut signature = vec![0u8; pair.public().modulus_len()];
    pair.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        jwt.as_bytes(),
        &mut signature,
    )
    .map_err(|_| "RSA signing failed".to_owned())?;
    jwt.push('.');
    jwt.push_str(&URL_SAFE_NO_PAD.encode(signature));
    Ok(SecretString::from(jwt))
}

/// The public key of `pair` as SubjectPublicKeyInfo PEM: ring gives the
/// PKCS#1 `RSAPublicKey`; rcgen wraps it with the rsaEncryption identifier.
fn public_key_pem(pair: &RsaKeyPair) -> String {
    struct RsaPublic<'a>(&'a [u8]);
    impl rcgen::PublicKeyData for RsaPublic<'_> {
        fn der_bytes(&self) -> &[u8] {
            self.0
        }
        fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
            &rcgen::PKCS_RSA_SHA256
        }
    }
    let spki = rcgen::PublicKeyData::subject_public_key_info(&RsaPublic(pair.public().as_ref()));
    let body = STANDARD.encode(spki);
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::keys::{CLIENT_ASSERTION_KEY_1, CLIENT_ASSERTION_KEY_2};
    use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};

    fn key_file(pem: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, pem).unwrap();
        (dir, path)
    }

    fn parts(jwt: &str) -> Vec<Vec<u8>> {
        jwt.split('.')
            .map(|part| URL_SAFE_NO_PAD.decode(part).unwrap())
            .collect()
    }

    /// Whether `jwt`'s signature verifies with the public key of `pem`.
    fn verifies(jwt: &str, pem: &str) -> bool {
        let pair = parse_key(pem.as_bytes()).unwrap();
        let (input, signature) = jwt.rsplit_once('.').unwrap();
        let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, pair.public().as_ref())
            .verify(input.as_bytes(), &signature)
            .is_ok()
    }

    #[test]
    fn pkcs8_and_pkcs1_keys_sign_verifiable_rs256_jwts() {
        for pem in [CLIENT_ASSERTION_KEY_1, CLIENT_ASSERTION_KEY_2] {
            let (_dir, path) = key_file(pem);
            let key = SigningKeyFile::open("TEST_KEY", &path, Some("kid-1".into())).unwrap();
            let jwt = key
                .sign(
                    "test",
                    Some("token-vault-req+jwt"),
                    &serde_json::json!({"sub": "u"}),
                )
                .unwrap();
            let jwt = jwt.expose_secret();
            let parts = parts(jwt.rsplit_once('.').unwrap().0);
            let header: serde_json::Value = serde_json::from_slice(&parts[0]).unwrap();
            assert_eq!(
                header,
                serde_json::json!({"alg": "RS256", "typ": "token-vault-req+jwt", "kid": "kid-1"})
            );
            assert!(verifies(jwt, pem));
        }
    }

    #[test]
    fn a_rotated_file_is_used_after_reload_and_a_bad_one_keeps_the_old_key() {
        let (_dir, path) = key_file(CLIENT_ASSERTION_KEY_1);
        let key = SigningKeyFile::open("TEST_KEY", &path, None).unwrap();
        std::fs::write(&path, CLIENT_ASSERTION_KEY_2).unwrap();
        key.reload();
        let jwt = key.sign("test", None, &serde_json::json!({})).unwrap();
        assert!(verifies(jwt.expose_secret(), CLIENT_ASSERTION_KEY_2));
        std::fs::write(&path, "not a key").unwrap();
        key.reload();
        let jwt = key.sign("test", None, &serde_json::json!({})).unwrap();
        assert!(verifies(jwt.expose_secret(), CLIENT_ASSERTION_KEY_2));
    }

    #[test]
    fn bad_files_are_refused_naming_setting_and_file_only() {
        let (_dir, path) =
            key_file("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        let error = SigningKeyFile::open("AUTH0_CLIENT_ASSERTION_KEY_FILE", &path, None)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("AUTH0_CLIENT_ASSERTION_KEY_FILE "),
            "{error}"
        );
        assert!(error.contains("no PEM private key"), "{error}");
        let missing = SigningKeyFile::open("X", Path::new("/nonexistent/key.pem"), None);
        assert!(matches!(missing, Err(KeyFileError::Read { .. })));
    }

    #[test]
    fn the_public_key_is_spki_pem_and_debug_shows_no_key() {
        let (_dir, path) = key_file(CLIENT_ASSERTION_KEY_1);
        let key = SigningKeyFile::open("TEST_KEY", &path, None).unwrap();
        let pem = key.public_key_pem();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
        let spki = rustls::pki_types::SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes());
        assert!(spki.is_ok());
        let shown = format!("{key:?}");
        assert!(!shown.contains("PRIVATE"), "{shown}");
    }
}
