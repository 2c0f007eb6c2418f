//! What the token itself says: its header (RS256 and a `kid`, read before any key is
//! looked up), the claims the broker reads, and jsonwebtoken's checks and errors named
//! after the failed check.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::error::echo;
use super::{IdTokenError, IdTokenSettings};

/// The claims the broker reads; the rest are checked by jsonwebtoken. Options, because
/// missing claims must surface as the named check, not as a parse error.
#[derive(Deserialize)]
pub(super) struct Claims {
    pub(super) sub: Option<String>,
    pub(super) exp: Option<u64>,
    pub(super) iat: Option<i64>,
}

/// RS256 only; `iss`, `aud`, `exp`, `nbf` checked; `exp`, `iss`, `aud`, `sub` required.
pub(super) fn validation(settings: &IdTokenSettings) -> Validation {
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_issuer(&[settings.issuer()]);
    validation.set_audience(&settings.audiences);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.leeway = settings.leeway.as_secs();
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation
}

/// The `kid` of an RS256 token; refuses every other algorithm before any key is looked up.
pub(super) fn key_id(token: &str) -> Result<String, IdTokenError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| header_error(token))?;
    if header.alg != Algorithm::RS256 {
        return Err(IdTokenError::Algorithm(format!("{:?}", header.alg)));
    }
    header
        .kid
        .filter(|kid| !kid.is_empty())
        .ok_or(IdTokenError::MissingKeyId)
}

/// Why jsonwebtoken could not read the header: an algorithm it does not even know (`none`)
/// is an algorithm error naming it; anything else is a malformed token.
fn header_error(token: &str) -> IdTokenError {
    match peek_alg(token) {
        Some(alg) if alg.parse::<Algorithm>().is_err() => IdTokenError::Algorithm(echo(&alg)),
        _ => IdTokenError::Malformed("header is not a JWT header"),
    }
}

/// The header's `alg` string, read without jsonwebtoken (which rejects unknown ones).
fn peek_alg(token: &str) -> Option<String> {
    let (header, _) = token.split_once('.')?;
    let bytes = URL_SAFE_NO_PAD.decode(header).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(header.get("alg")?.as_str()?.to_owned())
}

/// A published JWK as a verification key. A key Auth0 publishes but we cannot use is the
/// tenant's problem, not the caller's.
pub(super) fn decoding_key(jwk: &Jwk, kid: &str) -> Result<DecodingKey, IdTokenError> {
    DecodingKey::from_jwk(jwk).map_err(|_| {
        let kid = echo(kid);
        IdTokenError::jwks_unavailable(format!("published key {kid:?} is not a usable key"))
    })
}

/// Names the failed check for a jsonwebtoken error; its own messages are not reused, as
/// serde's can quote claim values.
pub(super) fn map_jwt_error(kind: &ErrorKind) -> IdTokenError {
    match kind {
        ErrorKind::InvalidSignature | ErrorKind::Crypto(_) => IdTokenError::Signature,
        ErrorKind::ExpiredSignature => IdTokenError::Expired,
        ErrorKind::ImmatureSignature => IdTokenError::NotYetValid,
        ErrorKind::InvalidIssuer => IdTokenError::Issuer,
        ErrorKind::InvalidAudience => IdTokenError::Audience,
        ErrorKind::InvalidSubject => IdTokenError::MissingSubject,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            IdTokenError::Algorithm("RS256 with a non-RSA key".to_owned())
        }
        ErrorKind::MissingRequiredClaim(claim) => missing_claim(claim),
        ErrorKind::Base64(_) => IdTokenError::Malformed("not base64url"),
        ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
            IdTokenError::Malformed("claims are not JSON of the expected shape")
        }
        _ => IdTokenError::Malformed("not a JWT"),
    }
}

fn missing_claim(claim: &str) -> IdTokenError {
    match claim {
        "iss" => IdTokenError::Issuer,
        "aud" => IdTokenError::Audience,
        "sub" => IdTokenError::MissingSubject,
        _ => IdTokenError::MissingClaim("exp"),
    }
}
