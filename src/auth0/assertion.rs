//! The JWTs the broker signs for Auth0, built fresh for every request:
//!
//! * the client assertion of `private_key_jwt` (Auth0, "Authenticate with
//!   Private Key JWT"): `iss` = `sub` = the client id, `aud` = the tenant URL
//!   with its trailing slash, `iat`, `exp` (Auth0 allows 5 minutes and
//!   recommends at most 1; the broker uses 60 s) and a unique `jti` (UUID
//!   form, as Auth0 recommends). A single-use token: every attempt, retries
//!   included, gets its own.
//! * the Token Vault subject token (Auth0, "Privileged Worker Token Exchange
//!   with Token Vault"): header `typ` = `token-vault-req+jwt`; `sub` = the
//!   user, `aud` = the tenant, `iss` = the client id, `iat`, `exp` (Auth0
//!   rejects one older than 60 s regardless), a unique `jti` against replay,
//!   and `audit_context`, the reason Auth0 records in the tenant logs.

use std::time::{SystemTime, UNIX_EPOCH};

use secrecy::SecretString;
use serde::Serialize;

use super::keys::{SignError, SigningKeyFile};

/// Lifetime of every JWT the broker signs: Auth0's recommended maximum for a
/// client assertion, and the age past which it rejects a subject token.
const JWT_LIFETIME_SECS: u64 = 60;

/// `client_assertion_type` of `private_key_jwt` (RFC 7523).
pub(super) const CLIENT_ASSERTION_TYPE: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// `typ` header Auth0 requires of a Privileged Worker subject token.
pub const SUBJECT_TOKEN_TYP: &str = "token-vault-req+jwt";

/// `audit_context` of every subject token: why the broker reads a user's
/// token, recorded in Auth0's tenant logs. Fixed text: no user data (Auth0
/// asks for no PII there), at most 256 characters.
pub const SUBJECT_AUDIT_CONTEXT: &str =
    "tokenbroker: an internal service allowed by the broker's policy asked for the user's token of this connection";

/// The claims every JWT the broker signs has: the client assertion's whole.
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    jti: String,
}

impl<'a> Claims<'a> {
    /// Claims issued now, living [`JWT_LIFETIME_SECS`], with a new `jti`.
    fn now(iss: &'a str, sub: &'a str, aud: &'a str) -> Self {
        let iat = now_secs();
        Self {
            iss,
            sub,
            aud,
            iat,
            exp: iat + JWT_LIFETIME_SECS,
            jti: unique_id(),
        }
    }
}

/// Claims of a Privileged Worker subject token: the common ones, and why.
#[derive(Serialize)]
struct SubjectClaims<'a> {
    #[serde(flatten)]
    claims: Claims<'a>,
    audit_context: &'static str,
}

/// Who signs, for whom: the broker's client id and the tenant's audience
/// (`{base_url}/`).
pub(super) struct Issuer<'a> {
    pub(super) client_id: &'a str,
    pub(super) audience: &'a str,
}

impl Issuer<'_> {
    /// A new client assertion signed with `key`.
    pub(super) fn client_assertion(&self, key: &SigningKeyFile) -> Result<SecretString, SignError> {
        let claims = Claims::now(self.client_id, self.client_id, self.audience);
        key.sign("client assertion", None, &claims)
    }

    /// A new subject token for `user_id`, signed with `key`.
    pub(super) fn subject_token(
        &self,
        key: &SigningKeyFile,
        user_id: &str,
    ) -> Result<SecretString, SignError> {
        let claims = SubjectClaims {
            claims: Claims::now(self.client_id, user_id, self.audience),
            audit_context: SUBJECT_AUDIT_CONTEXT,
        };
        key.sign(
            "Token Vault subject token",
            Some(SUBJECT_TOKEN_TYP),
            &claims,
        )
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// A random UUID (version 4), the `jti` form Auth0 recommends: 122 random
/// bits, so no two JWTs of the broker share one.
fn unique_id() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::keys::CLIENT_ASSERTION_KEY_1;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use secrecy::ExposeSecret;

    fn decode(jwt: &SecretString, part: usize) -> serde_json::Value {
        let text = jwt.expose_secret().split('.').nth(part).unwrap().to_owned();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(text).unwrap()).unwrap()
    }

    fn key() -> (tempfile::TempDir, SigningKeyFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, CLIENT_ASSERTION_KEY_1).unwrap();
        let key = SigningKeyFile::open("K", &path, None).unwrap();
        (dir, key)
    }

    const ISSUER: Issuer<'static> = Issuer {
        client_id: "client-1",
        audience: "https://tenant.example/",
    };

    #[test]
    fn a_client_assertion_names_the_client_twice_and_lives_a_minute() {
        let (_dir, key) = key();
        let jwt = ISSUER.client_assertion(&key).unwrap();
        let claims = decode(&jwt, 1);
        assert_eq!(claims["iss"], "client-1");
        assert_eq!(claims["sub"], "client-1");
        assert_eq!(claims["aud"], "https://tenant.example/");
        let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
        assert_eq!(lifetime, 60);
        assert_eq!(decode(&jwt, 0), serde_json::json!({"alg": "RS256"}));
        let again = ISSUER.client_assertion(&key).unwrap();
        assert_ne!(decode(&again, 1)["jti"], claims["jti"], "jti is unique");
    }

    #[test]
    fn a_subject_token_is_typed_for_token_vault_and_names_the_user() {
        let (_dir, key) = key();
        let jwt = ISSUER.subject_token(&key, "auth0|u1").unwrap();
        assert_eq!(decode(&jwt, 0)["typ"], "token-vault-req+jwt");
        let claims = decode(&jwt, 1);
        assert_eq!(claims["sub"], "auth0|u1");
        assert_eq!(claims["iss"], "client-1");
        assert_eq!(claims["aud"], "https://tenant.example/");
        assert_eq!(claims["audit_context"], SUBJECT_AUDIT_CONTEXT);
        assert!(SUBJECT_AUDIT_CONTEXT.len() <= 256);
    }

    #[test]
    fn jti_is_a_version_4_uuid() {
        let id = unique_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
    }
}
