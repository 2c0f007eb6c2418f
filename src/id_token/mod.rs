//! Verifies a user's Auth0 ID token, so the broker can release a user's IdP token only to a
//! caller that shows that user's fresh login, not merely the user's id.
//!
//! The checks, in order: the header parses; `alg` is RS256 (so `none` and the HS256
//! alg-confusion forgery fail before any key is touched); a `kid` is present and names a key
//! in the tenant's JWKS; the RS256 signature holds; `exp`, `nbf` (with leeway), `iss` (exactly
//! `{issuer_base_url}/`, as Auth0 writes it), `aud` (a string, or an array containing one of
//! ours) and `sub` hold; `iat` is not in the future beyond the leeway.
//!
//! The JWKS (`{issuer_base_url}/.well-known/jwks.json`) is cached in a one-entry moka cache
//! for [`IdTokenSettings::jwks_ttl`]; concurrent misses share one fetch. A failed fetch is
//! cached too, for [`IdTokenSettings::failure_ttl`], and repeated as UNAVAILABLE with the
//! time left, so a failing JWKS is not fetched once per request. Every fetch also takes a
//! slot of one limit ([`JWKS_FETCH_PERIOD`], [`JWKS_FETCH_BURST`]).
//!
//! An unknown `kid` (Auth0 rotated its key) refreshes the JWKS at once, one refresh at a
//! time and at most one per [`IdTokenSettings::min_refresh_interval`] across all requests,
//! so a flood of tokens with made-up `kid`s cannot turn the broker into a JWKS fetch
//! amplifier. A `kid` is refused ([`IdTokenError::UnknownKey`]) only when a JWKS fetched
//! after the token arrived lacks it; while the limit holds the refresh back it is
//! [`IdTokenError::KeyNotYetKnown`], UNAVAILABLE with the time until the next refresh, so a
//! genuine token signed with a key Auth0 just rotated to is retried, not refused.
//!
//! Whose fault: [`IdTokenError::JwksUnavailable`] and [`IdTokenError::KeyNotYetKnown`] are
//! the broker's (the caller should retry, the service maps them to UNAVAILABLE). Every other
//! error is the caller's (UNAUTHENTICATED). No error message, log line or `Debug` output
//! ever holds the token.
//!
//! Here: the settings and the verifier's order of checks. `claims.rs` reads the token
//! (header, claims, jsonwebtoken's errors), `jwks_cache.rs` holds the keys (cache, refresh,
//! fetch limit) and `error.rs` names each refusal. The JWKS request itself is the auth0
//! module's ([`crate::auth0::JwksSource`]): this module does no HTTP.

mod claims;
mod error;
mod jwks_cache;
#[cfg(test)]
mod tests;

pub use error::IdTokenError;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::{DecodingKey, Validation};

use crate::auth0::Auth0Client;
use claims::{decoding_key, key_id, map_jwt_error, validation, Claims};
use error::echo;
use jwks_cache::JwksCache;

/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);
/// How long a fetched JWKS is trusted before it is fetched again.
pub const DEFAULT_JWKS_TTL: Duration = Duration::from_secs(600);
/// Least time between two JWKS refreshes caused by unknown `kid`s.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Timeout of one JWKS request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed JWKS fetch is remembered before the JWKS is fetched again.
pub const DEFAULT_FAILURE_TTL: Duration = Duration::from_secs(5);
/// All JWKS fetches together (cold, after the TTL, refreshes) get one slot per this period,
/// so no mix of failures, expiries and unknown `kid`s makes the broker hammer the JWKS.
pub const JWKS_FETCH_PERIOD: Duration = Duration::from_secs(1);
/// Slots available at once: a burst of requests makes a handful of fetches at most.
pub const JWKS_FETCH_BURST: NonZeroU32 = match NonZeroU32::new(3) {
    Some(burst) => burst,
    None => NonZeroU32::MIN,
};

/// What the verifier accepts and how it treats the JWKS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdTokenSettings {
    /// The tenant, e.g. `https://example.eu.auth0.com`, no trailing slash (one is ignored).
    /// `iss` must equal this plus `/`; the JWKS is fetched below it.
    pub issuer_base_url: String,
    /// Accepted `aud` values: the client ids of the apps users log in to. Empty accepts none.
    pub audiences: Vec<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// How long a fetched JWKS is used before it is fetched again.
    pub jwks_ttl: Duration,
    /// Least time between two refreshes caused by unknown `kid`s; zero disables the limit.
    pub min_refresh_interval: Duration,
    /// Timeout of one JWKS request.
    pub request_timeout: Duration,
    /// How long a failed fetch is remembered (answered UNAVAILABLE with the time left) before
    /// the JWKS is fetched again, so a failing JWKS costs one fetch per period, not one per
    /// request.
    pub failure_ttl: Duration,
}

impl IdTokenSettings {
    /// Settings for this tenant and these audiences, with the `DEFAULT_*` timings.
    pub fn new(issuer_base_url: impl Into<String>, audiences: Vec<String>) -> Self {
        IdTokenSettings {
            issuer_base_url: issuer_base_url.into(),
            audiences,
            leeway: DEFAULT_LEEWAY,
            jwks_ttl: DEFAULT_JWKS_TTL,
            min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            failure_ttl: DEFAULT_FAILURE_TTL,
        }
    }

    /// The exact `iss` Auth0 writes: the base URL with one trailing slash.
    fn issuer(&self) -> String {
        format!("{}/", self.issuer_base_url.trim_end_matches('/'))
    }
}

/// What a verified token proves: who logged in, and until when that proof holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedIdToken {
    /// The Auth0 user id (`sub`), e.g. `github|1234567`.
    pub sub: String,
    /// `exp`, Unix seconds: a release bound to this token should not outlive it.
    pub exp: u64,
}

/// Verifies Auth0 ID tokens against one tenant. Cheap to clone: clones share the JWKS cache
/// and the refresh budget.
#[derive(Clone)]
pub struct IdTokenVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    settings: IdTokenSettings,
    validation: Validation,
    /// The tenant's keys, fetched through the auth0 module.
    keys: JwksCache,
}

impl IdTokenVerifier {
    /// A verifier for `settings`, fetching the JWKS through `auth0` (its connections, size
    /// cap and metrics). Nothing is fetched until the first token arrives.
    pub fn new(settings: IdTokenSettings, auth0: &Auth0Client) -> Self {
        let source = auth0.jwks_source(&settings.issuer_base_url, settings.request_timeout);
        let inner = Inner {
            keys: JwksCache::new(&settings, source),
            validation: validation(&settings),
            settings,
        };
        IdTokenVerifier {
            inner: Arc::new(inner),
        }
    }

    /// Checks `token` completely (see the module docs) and returns who it proves.
    pub async fn verify(&self, token: &str) -> Result<VerifiedIdToken, IdTokenError> {
        let kid = key_id(token)?;
        let key = self.decoding_key(&kid).await?;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.inner.validation)
            .map_err(|error| map_jwt_error(error.kind()))?;
        self.accept(data.claims)
    }

    /// The checks jsonwebtoken leaves to us: `iat` not in the future, `sub` not empty.
    fn accept(&self, claims: Claims) -> Result<VerifiedIdToken, IdTokenError> {
        // jsonwebtoken's clock, the one it checks `exp` and `nbf` against.
        let latest_iat = jsonwebtoken::get_current_timestamp()
            .saturating_add(self.inner.settings.leeway.as_secs());
        if claims
            .iat
            .is_some_and(|iat| u64::try_from(iat).is_ok_and(|iat| iat > latest_iat))
        {
            return Err(IdTokenError::IssuedInFuture);
        }
        let sub = claims.sub.filter(|sub| !sub.is_empty());
        let sub = sub.ok_or(IdTokenError::MissingSubject)?;
        let exp = claims.exp.ok_or(IdTokenError::MissingClaim("exp"))?;
        Ok(VerifiedIdToken { sub, exp })
    }

    /// The published key named `kid`: from the cached JWKS, else from a newer one (another
    /// request's refresh, or one made now). A JWKS whose fetch began after the token arrived
    /// is new enough by itself.
    async fn decoding_key(&self, kid: &str) -> Result<DecodingKey, IdTokenError> {
        let arrived = Instant::now();
        let keys = &self.inner.keys;
        let jwks = keys.cached().await?;
        if let Some(jwk) = jwks.find(kid) {
            return decoding_key(jwk, kid);
        }
        let jwks = if jwks.fetched_at >= arrived {
            jwks
        } else {
            keys.newer_than(&jwks, kid).await?
        };
        match jwks.find(kid) {
            Some(jwk) => decoding_key(jwk, kid),
            None => Err(IdTokenError::UnknownKey(echo(kid))),
        }
    }
}

impl std::fmt::Debug for IdTokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdTokenVerifier")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}
