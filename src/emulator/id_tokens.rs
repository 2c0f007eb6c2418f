//! ID tokens the emulator issues, good ones and the classic forgeries, so the broker's
//! verifier can be tested against a tenant instead of against hand-made strings.
//!
//! A good token looks like Auth0's: RS256, `kid` of the current signing key, `iss` =
//! `{base_url}/` (with the trailing slash), `aud`, `sub`, `iat`, `exp`. [`IdTokenSpec`]
//! changes any of that to build the tokens a verifier must refuse.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::handlers::epoch_secs;
use super::signing::{self, FixtureKey};

/// Lifetime of an ID token unless the spec says otherwise (Auth0's default is 10 h; 1 h is
/// enough for tests and keeps expiry cases obvious).
pub const DEFAULT_ID_TOKEN_LIFETIME_SECS: i64 = 3600;

/// The `aud` claim: Auth0 sends a string, or an array when a token has several audiences.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Audience {
    /// `"aud": "x"`.
    One(String),
    /// `"aud": ["x", "y"]`.
    Many(Vec<String>),
}

/// How the token is signed: honestly, or in one of the ways an attacker would try.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Signing {
    /// RS256 with the current signing key: a genuine token.
    #[default]
    CurrentKey,
    /// RS256 with a fixture key the JWKS does not publish right now (the next one in rotation
    /// order that is unpublished; at most two of the three are ever published, so one
    /// exists). The header still names the current key unless [`IdTokenSpec::kid`] says
    /// otherwise, so a verifier finds a published key and must fail on the signature.
    UnpublishedKey,
    /// HS256 keyed with the current key's public half (PKCS#1 DER): the alg-confusion attack
    /// on verifiers that let the token pick the algorithm.
    Hs256WithPublicKey,
    /// `{"alg":"none"}` and an empty signature: the unsigned-token attack.
    AlgNone,
}

/// What goes into the `kid` header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KidHeader {
    /// The current signing key's id, like a genuine token.
    #[default]
    CurrentKey,
    /// This id, e.g. one the JWKS does not know.
    Custom(String),
    /// No `kid` at all.
    Omitted,
}

/// A recipe for an ID token. Start from [`IdTokenSpec::for_user`] (a genuine token) and
/// change only what the test is about. Times are seconds relative to now (negative = past).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdTokenSpec {
    /// `sub`; `None` leaves the claim out.
    pub sub: Option<String>,
    /// `iss`; `None` means the emulator's own, `{base_url}/`.
    pub issuer: Option<String>,
    /// `aud`; `None` means the configured `id_token_audience`, as a single string.
    pub audience: Option<Audience>,
    /// `iat`, relative to now.
    pub issued_at: i64,
    /// `exp`, relative to now; `None` leaves the claim out.
    pub expires_in: Option<i64>,
    /// `nbf`, relative to now; `None` (the default, like Auth0) leaves the claim out.
    pub not_before: Option<i64>,
    /// The `kid` header.
    pub kid: KidHeader,
    /// Algorithm and key.
    pub signing: Signing,
}

impl IdTokenSpec {
    /// A genuine token for `sub`: issued now, valid for an hour, signed with the current key.
    pub fn for_user(sub: impl Into<String>) -> Self {
        IdTokenSpec {
            sub: Some(sub.into()),
            issuer: None,
            audience: None,
            issued_at: 0,
            expires_in: Some(DEFAULT_ID_TOKEN_LIFETIME_SECS),
            not_before: None,
            kid: KidHeader::CurrentKey,
            signing: Signing::CurrentKey,
        }
    }
}

/// What the tenant contributes to a token: its defaults and its keys right now.
pub(crate) struct Tenant<'a> {
    /// Default `iss`, `{base_url}/`.
    pub(crate) issuer: String,
    /// Default `aud`.
    pub(crate) audience: &'a str,
    /// Index of the current signing key.
    pub(crate) current_key: usize,
    /// Index of a fixture key that is not published.
    pub(crate) unpublished_key: usize,
}

/// Builds the token `spec` describes.
pub(crate) fn issue(spec: &IdTokenSpec, tenant: &Tenant<'_>) -> String {
    let now = i64::try_from(epoch_secs()).unwrap_or(i64::MAX);
    let claims = claims(spec, tenant, now);
    let current = signing::key(tenant.current_key);
    let kid = match &spec.kid {
        KidHeader::CurrentKey => Some(current.kid.to_owned()),
        KidHeader::Custom(kid) => Some(kid.clone()),
        KidHeader::Omitted => None,
    };
    match spec.signing {
        Signing::CurrentKey => sign_rs256(kid, &claims, current),
        Signing::UnpublishedKey => sign_rs256(kid, &claims, signing::key(tenant.unpublished_key)),
        Signing::Hs256WithPublicKey => {
            let secret = EncodingKey::from_secret(&current.public_der);
            sign(Algorithm::HS256, kid, &claims, &secret)
        }
        Signing::AlgNone => unsigned(&claims),
    }
}

/// The claims object; absent options are left out rather than sent as `null`.
fn claims(spec: &IdTokenSpec, tenant: &Tenant<'_>, now: i64) -> Value {
    let issuer = spec.issuer.clone().unwrap_or_else(|| tenant.issuer.clone());
    let audience = spec
        .audience
        .clone()
        .unwrap_or_else(|| Audience::One(tenant.audience.to_owned()));
    let mut claims = Map::new();
    claims.insert("iss".into(), Value::from(issuer));
    claims.insert("aud".into(), json!(audience));
    claims.insert(
        "iat".into(),
        Value::from(now.saturating_add(spec.issued_at)),
    );
    if let Some(sub) = &spec.sub {
        claims.insert("sub".into(), Value::from(sub.as_str()));
    }
    if let Some(offset) = spec.expires_in {
        claims.insert("exp".into(), Value::from(now.saturating_add(offset)));
    }
    if let Some(offset) = spec.not_before {
        claims.insert("nbf".into(), Value::from(now.saturating_add(offset)));
    }
    Value::Object(claims)
}

fn sign_rs256(kid: Option<String>, claims: &Value, key: &FixtureKey) -> String {
    sign(Algorithm::RS256, kid, claims, &key.encoding)
}

/// Signs with jsonwebtoken; the keys are compiled-in fixtures, so failure is a build mistake.
fn sign(alg: Algorithm, kid: Option<String>, claims: &Value, key: &EncodingKey) -> String {
    let header = Header {
        kid,
        ..Header::new(alg)
    };
    jsonwebtoken::encode(&header, claims, key)
        .unwrap_or_else(|e| panic!("emulator fixture key cannot sign {alg:?}: {e}"))
}

/// An `alg: none` token, built by hand because jsonwebtoken refuses to make one.
fn unsigned(claims: &Value) -> String {
    let header = json!({ "alg": "none", "typ": "JWT" });
    let header = URL_SAFE_NO_PAD.encode(header.to_string());
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}
