//! The emulated tenant's checks of the JWTs a client signs, as Auth0 documents them:
//!
//! * a `private_key_jwt` client assertion ("Authenticate with Private Key JWT"):
//!   RS256, a signature by a registered public key, `iss` = `sub` = the client id,
//!   `aud` = the tenant URL with its trailing slash, `exp` in the future and at most
//!   5 minutes after `iat`, a `jti` never seen before;
//! * a Token Vault Privileged Worker subject token ("Privileged Worker Token Exchange
//!   with Token Vault"): header `typ` = `token-vault-req+jwt`, a signature by a
//!   registered Privileged Worker key, `iss` = the client id, `aud` = the tenant,
//!   `sub`, `iat` at most 60 s old, `jti` never seen before, `audit_context` of 1 to 256
//!   characters.
//!
//! Every refusal is a short reason for the emulator's `error_description`; none repeats
//! the token.

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::SubjectPublicKeyInfoDer;
use serde_json::Value;
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

/// Longest client assertion lifetime Auth0 supports.
const MAX_ASSERTION_LIFETIME_SECS: u64 = 300;
/// Age past which Auth0 rejects a subject token, whatever its `exp`.
const MAX_SUBJECT_AGE_SECS: u64 = 60;
/// Clock skew Auth0 tolerates on `iat` and `nbf`.
const SKEW_SECS: u64 = 10;
/// The `typ` header of a Privileged Worker subject token.
const SUBJECT_TYP: &str = "token-vault-req+jwt";

/// A public key registered with the tenant: the RSA key of a `PUBLIC KEY` PEM.
#[derive(Clone)]
pub(crate) struct RegisteredKey {
    /// PKCS#1 `RSAPublicKey` DER, what ring verifies with.
    rsa_public_key: Vec<u8>,
}

impl RegisteredKey {
    /// Reads a SubjectPublicKeyInfo PEM (`BEGIN PUBLIC KEY`), what Auth0 takes when a
    /// credential is registered.
    pub(crate) fn from_pem(pem: &str) -> Result<Self, String> {
        let spki = SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
            .map_err(|error| format!("not a PUBLIC KEY PEM: {error}"))?;
        let (_, parsed) = SubjectPublicKeyInfo::from_der(spki.as_ref())
            .map_err(|error| format!("not a SubjectPublicKeyInfo: {error}"))?;
        Ok(Self {
            rsa_public_key: parsed.subject_public_key.as_ref().to_vec(),
        })
    }

    fn verifies(&self, signed: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &self.rsa_public_key)
            .verify(signed, signature)
            .is_ok()
    }
}

/// The tenant's view of one client's JWTs: who it is, what `aud` it must name, the keys
/// it registered, and the `jti`s already used (until they expire).
#[derive(Default)]
pub(crate) struct ClientJwts {
    /// Keys that verify client assertions; empty: the client authenticates with its
    /// secret.
    pub(crate) assertion_keys: Vec<RegisteredKey>,
    /// Keys that verify Privileged Worker subject tokens.
    pub(crate) subject_keys: Vec<RegisteredKey>,
    /// `jti` → `exp` of every JWT accepted, so a replay is refused.
    used: HashMap<String, u64>,
}

/// What a JWT must say to be accepted from `client_id` by the tenant at `audience`.
pub(crate) struct Expected<'a> {
    pub(crate) client_id: &'a str,
    /// `{base_url}/`.
    pub(crate) audience: &'a str,
    /// Now, in Unix seconds.
    pub(crate) now: u64,
}

impl ClientJwts {
    /// Accepts `assertion` as the client's authentication, or says why not.
    pub(crate) fn accept_assertion(
        &mut self,
        assertion: &str,
        expected: &Expected<'_>,
    ) -> Result<(), &'static str> {
        let (_, claims) = verified(assertion, &self.assertion_keys)?;
        if text(&claims, "iss") != Some(expected.client_id)
            || text(&claims, "sub") != Some(expected.client_id)
        {
            return Err("iss and sub must be the client id");
        }
        if !names_audience(&claims, expected.audience) {
            return Err("aud must be the tenant URL with a trailing slash");
        }
        let exp = number(&claims, "exp").ok_or("exp is required")?;
        if exp <= expected.now {
            return Err("the client assertion has expired");
        }
        let issued = number(&claims, "iat").unwrap_or(expected.now);
        if exp.saturating_sub(issued) > MAX_ASSERTION_LIFETIME_SECS {
            return Err("the client assertion lives longer than 5 minutes");
        }
        self.use_jti(&claims, exp, expected.now)
    }

    /// Accepts `subject_token` from the client and returns the user it names (`sub`),
    /// or says why not.
    pub(crate) fn accept_subject(
        &mut self,
        subject_token: &str,
        expected: &Expected<'_>,
    ) -> Result<String, &'static str> {
        let (header, claims) = verified(subject_token, &self.subject_keys)?;
        if text(&header, "typ") != Some(SUBJECT_TYP) {
            return Err("typ must be token-vault-req+jwt");
        }
        if text(&claims, "iss") != Some(expected.client_id) {
            return Err("iss must be the client id");
        }
        if !names_audience(&claims, expected.audience) {
            return Err("aud must be the tenant");
        }
        let issued = number(&claims, "iat").ok_or("iat is required")?;
        if issued > expected.now + SKEW_SECS {
            return Err("iat is in the future");
        }
        if expected.now.saturating_sub(issued) > MAX_SUBJECT_AGE_SECS {
            return Err("the subject token is older than 60 seconds");
        }
        if number(&claims, "exp").is_some_and(|exp| exp <= expected.now) {
            return Err("the subject token has expired");
        }
        let context_chars = text(&claims, "audit_context").map_or(0, |c| c.chars().count());
        if !(1..=256).contains(&context_chars) {
            return Err("audit_context of 1 to 256 characters is required");
        }
        let user_id = text(&claims, "sub").ok_or("sub is required")?.to_owned();
        self.use_jti(&claims, issued + MAX_SUBJECT_AGE_SECS, expected.now)?;
        Ok(user_id)
    }

    /// Refuses a `jti` already used; remembers this one until `until`.
    fn use_jti(&mut self, claims: &Value, until: u64, now: u64) -> Result<(), &'static str> {
        let jti = text(claims, "jti").filter(|jti| !jti.is_empty() && jti.len() <= 64);
        let jti = jti.ok_or("jti of at most 64 characters is required")?;
        self.used.retain(|_, expiry| *expiry > now);
        if self.used.insert(jti.to_owned(), until).is_some() {
            return Err("jti has already been used");
        }
        Ok(())
    }
}

/// Header and claims of `jwt` once its RS256 signature verifies with one of `keys`.
fn verified(jwt: &str, keys: &[RegisteredKey]) -> Result<(Value, Value), &'static str> {
    let mut parts = jwt.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a compact JWT");
    };
    let header: Value = decode(header)?;
    if text(&header, "alg") != Some("RS256") {
        return Err("alg must be RS256");
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| "signature is not base64url")?;
    let signed = &jwt[..header_and_claims_len(jwt)];
    if !keys
        .iter()
        .any(|key| key.verifies(signed.as_bytes(), &signature))
    {
        return Err("no registered key verifies the signature");
    }
    Ok((header, decode(claims)?))
}

/// Length of `header.claims`, the signed part of a JWT.
fn header_and_claims_len(jwt: &str) -> usize {
    jwt.rfind('.').unwrap_or(jwt.len())
}

fn decode(part: &str) -> Result<Value, &'static str> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| "a JWT part is not base64url")?;
    serde_json::from_slice(&bytes).map_err(|_| "a JWT part is not JSON")
}

fn text<'a>(value: &'a Value, name: &str) -> Option<&'a str> {
    value.get(name).and_then(Value::as_str)
}

fn number(value: &Value, name: &str) -> Option<u64> {
    value.get(name).and_then(Value::as_u64)
}

/// Whether `aud` is `audience`, or an array holding it.
fn names_audience(claims: &Value, audience: &str) -> bool {
    match claims.get("aud") {
        Some(Value::String(aud)) => aud == audience,
        Some(Value::Array(auds)) => auds.iter().any(|aud| aud.as_str() == Some(audience)),
        _ => false,
    }
}
