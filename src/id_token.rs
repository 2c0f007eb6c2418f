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

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use moka::future::Cache;
use moka::Expiry;
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::auth0::{Auth0Client, Auth0Error, JwksSource};

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

/// Longest header value (`alg`, `kid`) repeated in an error message.
const MAX_ECHOED_LEN: usize = 64;

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

/// Why a token was refused, named after the failed check. Messages never contain the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdTokenError {
    /// Not a JWT: wrong number of segments, bad base64url, or header/claims not JSON of the
    /// expected shape. The reason is fixed text, never a piece of the token.
    #[error("ID token is malformed: {0}")]
    Malformed(&'static str),
    /// `alg` is not RS256 (e.g. `none`, or HS256 keyed with the public key).
    #[error("ID token uses alg {0:?}; only RS256 is accepted")]
    Algorithm(String),
    /// The header has no `kid`, so no published key can be chosen.
    #[error("ID token header has no kid")]
    MissingKeyId,
    /// No published key has this `kid` in a JWKS fetched after the token arrived.
    #[error("ID token is signed by key {0:?}, which the tenant does not publish")]
    UnknownKey(String),
    /// No key the broker holds has this `kid`, and the refresh limit holds back the JWKS
    /// refresh that could find it (one happened moments ago): likely a key Auth0 just rotated
    /// to. The broker's delay, not the caller's fault: retry after `retry_after`.
    #[error("ID token is signed by key {kid:?}, which the broker cannot look up for another {} ms; retry then", retry_after.as_millis())]
    KeyNotYetKnown { kid: String, retry_after: Duration },
    /// The signature does not verify with the published key.
    #[error("ID token signature is invalid")]
    Signature,
    /// `exp` has passed (beyond the leeway).
    #[error("ID token has expired")]
    Expired,
    /// `nbf` is still in the future (beyond the leeway).
    #[error("ID token is not valid yet (nbf)")]
    NotYetValid,
    /// `iat` is in the future (beyond the leeway): a clock or a forger is wrong.
    #[error("ID token was issued in the future (iat)")]
    IssuedInFuture,
    /// `iss` is missing or is not the configured tenant.
    #[error("ID token issuer (iss) is not the configured Auth0 tenant")]
    Issuer,
    /// `aud` is missing or names none of the configured audiences.
    #[error("ID token audience (aud) is none of the accepted client ids")]
    Audience,
    /// `sub` is missing or empty.
    #[error("ID token has no subject (sub)")]
    MissingSubject,
    /// Another required claim (`exp`) is missing.
    #[error("ID token lacks the required claim {0}")]
    MissingClaim(&'static str),
    /// The tenant's JWKS could not be fetched or parsed (or publishes an unusable key): the
    /// broker's problem, not the caller's; retrying later may succeed, after `retry_after`
    /// when known (a failed fetch is not repeated before then).
    #[error("Auth0 signing keys are unavailable: {reason}")]
    JwksUnavailable {
        reason: String,
        retry_after: Option<Duration>,
    },
}

impl IdTokenError {
    /// A short, stable name of the failed check, for audit events and metric labels.
    pub fn check(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Algorithm(_) => "algorithm",
            Self::MissingKeyId => "missing_kid",
            Self::UnknownKey(_) => "unknown_kid",
            Self::KeyNotYetKnown { .. } => "kid_not_yet_known",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::IssuedInFuture => "issued_in_future",
            Self::Issuer => "issuer",
            Self::Audience => "audience",
            Self::MissingSubject => "subject",
            Self::MissingClaim(_) => "missing_claim",
            Self::JwksUnavailable { .. } => "jwks_unavailable",
        }
    }

    /// True when the broker, not the caller, is at fault ([`Self::JwksUnavailable`],
    /// [`Self::KeyNotYetKnown`]): map it to UNAVAILABLE and let the caller retry; everything
    /// else is UNAUTHENTICATED.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::JwksUnavailable { .. } | Self::KeyNotYetKnown { .. }
        )
    }

    /// When retrying may succeed, if the broker knows: sent as the status's RetryInfo.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::KeyNotYetKnown { retry_after, .. } => Some(*retry_after),
            Self::JwksUnavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Unavailable keys without a known retry time: a reason fit for a log line.
    fn jwks_unavailable(reason: impl Into<String>) -> Self {
        Self::JwksUnavailable {
            reason: reason.into(),
            retry_after: None,
        }
    }
}

/// The claims the broker reads; the rest are checked by jsonwebtoken. Options, because
/// missing claims must surface as the named check, not as a parse error.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    iat: Option<i64>,
}

/// Verifies Auth0 ID tokens against one tenant. Cheap to clone: clones share the JWKS cache
/// and the refresh budget.
#[derive(Clone)]
pub struct IdTokenVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    settings: IdTokenSettings,
    /// The tenant's JWKS endpoint, on the auth0 module's send path.
    source: JwksSource,
    validation: Validation,
    /// One entry (key `()`): the tenant's JWKS, or why it could not be had and until when.
    jwks: Cache<(), JwksEntry>,
    /// Taken by the one unknown-`kid` refresh under way; holds when the next may start.
    next_refresh: Mutex<Option<Instant>>,
    /// Every JWKS fetch takes a slot: cold, after the TTL, or a refresh.
    fetches: DefaultDirectRateLimiter,
}

/// A fetched JWKS and when its request started, to tell whether it is newer than a token.
struct Keys {
    set: JwkSet,
    fetched_at: Instant,
}

impl Keys {
    fn find(&self, kid: &str) -> Option<&Jwk> {
        self.set.find(kid)
    }
}

/// Why the JWKS could not be had, and until when the broker will not try again.
struct FetchFailure {
    reason: String,
    until: Instant,
}

impl FetchFailure {
    fn new(reason: String, retry_after: Duration) -> Self {
        FetchFailure {
            reason,
            until: Instant::now() + retry_after,
        }
    }

    /// The error every request gets while the failure is remembered, with the time left.
    fn error(&self) -> IdTokenError {
        IdTokenError::JwksUnavailable {
            reason: self.reason.clone(),
            retry_after: Some(self.until.saturating_duration_since(Instant::now())),
        }
    }
}

/// The JWKS cache's one entry.
#[derive(Clone)]
enum JwksEntry {
    Keys(Arc<Keys>),
    Failed(Arc<FetchFailure>),
}

/// Keeps keys for the JWKS TTL and a failure until its retry time.
struct JwksExpiry {
    jwks_ttl: Duration,
}

impl JwksExpiry {
    fn lifetime(&self, entry: &JwksEntry) -> Duration {
        match entry {
            JwksEntry::Keys(_) => self.jwks_ttl,
            JwksEntry::Failed(failure) => failure.until.saturating_duration_since(Instant::now()),
        }
    }
}

impl Expiry<(), JwksEntry> for JwksExpiry {
    fn expire_after_create(&self, _key: &(), entry: &JwksEntry, _at: Instant) -> Option<Duration> {
        Some(self.lifetime(entry))
    }

    fn expire_after_update(
        &self,
        _key: &(),
        entry: &JwksEntry,
        _at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.lifetime(entry))
    }
}

impl IdTokenVerifier {
    /// A verifier for `settings`, fetching the JWKS through `auth0` (its connections, size
    /// cap and metrics). Nothing is fetched until the first token arrives.
    pub fn new(settings: IdTokenSettings, auth0: &Auth0Client) -> Self {
        let jwks = Cache::builder()
            .max_capacity(1)
            .expire_after(JwksExpiry {
                jwks_ttl: settings.jwks_ttl,
            })
            .build();
        let inner = Inner {
            source: auth0.jwks_source(&settings.issuer_base_url, settings.request_timeout),
            validation: validation(&settings),
            next_refresh: Mutex::new(None),
            fetches: fetch_limiter(),
            settings,
            jwks,
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
        let jwks = self.cached_jwks().await?;
        if let Some(jwk) = jwks.find(kid) {
            return decoding_key(jwk, kid);
        }
        let jwks = if jwks.fetched_at >= arrived {
            jwks
        } else {
            self.jwks_newer_than(&jwks, kid).await?
        };
        match jwks.find(kid) {
            Some(jwk) => decoding_key(jwk, kid),
            None => Err(IdTokenError::UnknownKey(echo(kid))),
        }
    }

    /// The cached JWKS, fetched on a miss; concurrent misses share one fetch, and a failed
    /// fetch is answered from the cache until its retry time.
    async fn cached_jwks(&self) -> Result<Arc<Keys>, IdTokenError> {
        let inner = self.inner.clone();
        let entry = self
            .inner
            .jwks
            .get_with((), async move { inner.fetch_entry().await })
            .await;
        match entry {
            JwksEntry::Keys(keys) => Ok(keys),
            JwksEntry::Failed(failure) => Err(failure.error()),
        }
    }

    /// A JWKS fetched after `seen`: one another request brought while this one waited its
    /// turn, else a refresh now, unless the refresh limit holds it back (then
    /// [`IdTokenError::KeyNotYetKnown`] with the time until it allows one). Refreshes run one
    /// at a time; a failed one keeps the cached keys.
    async fn jwks_newer_than(&self, seen: &Keys, kid: &str) -> Result<Arc<Keys>, IdTokenError> {
        let mut next_refresh = self.inner.next_refresh.lock().await;
        let cached = self.cached_jwks().await?;
        if cached.fetched_at > seen.fetched_at {
            return Ok(cached);
        }
        let now = Instant::now();
        let held_back = next_refresh
            .and_then(|at| at.checked_duration_since(now))
            .filter(|wait| !wait.is_zero());
        if let Some(wait) = held_back.or_else(|| self.inner.fetch_wait()) {
            tracing::debug!(
                wait_ms = wait.as_millis() as u64,
                "unknown ID token kid; JWKS refresh held back"
            );
            return Err(IdTokenError::KeyNotYetKnown {
                kid: echo(kid),
                retry_after: wait,
            });
        }
        tracing::debug!("unknown ID token kid; refreshing the JWKS");
        match self.inner.fetch_jwks().await {
            Ok(keys) => {
                *next_refresh = Some(now + self.inner.settings.min_refresh_interval);
                self.inner
                    .jwks
                    .insert((), JwksEntry::Keys(keys.clone()))
                    .await;
                Ok(keys)
            }
            Err(reason) => {
                let retry_after = self.inner.settings.failure_ttl;
                *next_refresh = Some(now + retry_after);
                Err(IdTokenError::JwksUnavailable {
                    reason,
                    retry_after: Some(retry_after),
                })
            }
        }
    }
}

impl Inner {
    /// The cache entry for a miss: the keys, or why not and until when not to try again
    /// (the fetch limit's next slot, or the failure TTL after a failed fetch).
    async fn fetch_entry(&self) -> JwksEntry {
        if let Some(wait) = self.fetch_wait() {
            let reason = "JWKS fetches are rate-limited".to_owned();
            tracing::warn!(
                wait_ms = wait.as_millis() as u64,
                "cannot fetch Auth0 signing keys: {reason}"
            );
            return JwksEntry::Failed(Arc::new(FetchFailure::new(reason, wait)));
        }
        match self.fetch_jwks().await {
            Ok(keys) => JwksEntry::Keys(keys),
            Err(reason) => {
                let failure = FetchFailure::new(reason, self.settings.failure_ttl);
                JwksEntry::Failed(Arc::new(failure))
            }
        }
    }

    /// Takes a slot of the fetch limit; `None` when one was free, else how long until one is.
    fn fetch_wait(&self) -> Option<Duration> {
        let not_until = self.fetches.check().err()?;
        Some(not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// One JWKS request; the error is a reason fit for a log line (no secrets exist here).
    async fn fetch_jwks(&self) -> Result<Arc<Keys>, String> {
        let started = Instant::now();
        let set = self.source.fetch().await.map_err(|error| {
            let reason = jwks_reason(&error);
            tracing::warn!(%reason, %error, "cannot fetch Auth0 signing keys");
            reason
        })?;
        Ok(Arc::new(Keys {
            set,
            fetched_at: started,
        }))
    }
}

impl std::fmt::Debug for IdTokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdTokenVerifier")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

/// RS256 only; `iss`, `aud`, `exp`, `nbf` checked; `exp`, `iss`, `aud`, `sub` required.
fn validation(settings: &IdTokenSettings) -> Validation {
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_issuer(&[settings.issuer()]);
    validation.set_audience(&settings.audiences);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.leeway = settings.leeway.as_secs();
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation
}

/// [`JWKS_FETCH_BURST`] fetches at once, then one per [`JWKS_FETCH_PERIOD`].
fn fetch_limiter() -> DefaultDirectRateLimiter {
    let quota = Quota::with_period(JWKS_FETCH_PERIOD)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(JWKS_FETCH_BURST);
    RateLimiter::direct(quota)
}

/// The `kid` of an RS256 token; refuses every other algorithm before any key is looked up.
fn key_id(token: &str) -> Result<String, IdTokenError> {
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
fn decoding_key(jwk: &Jwk, kid: &str) -> Result<DecodingKey, IdTokenError> {
    DecodingKey::from_jwk(jwk).map_err(|_| {
        let kid = echo(kid);
        IdTokenError::jwks_unavailable(format!("published key {kid:?} is not a usable key"))
    })
}

/// Names the failed check for a jsonwebtoken error; its own messages are not reused, as
/// serde's can quote claim values.
fn map_jwt_error(kind: &ErrorKind) -> IdTokenError {
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

/// A header value fit for an error message: printable ASCII only, and short.
fn echo(value: &str) -> String {
    value
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_ECHOED_LEN)
        .collect()
}

/// Why the JWKS could not be had, as the reason callers and log lines get.
fn jwks_reason(error: &Auth0Error) -> String {
    match error {
        Auth0Error::Timeout => "JWKS request timed out".to_owned(),
        Auth0Error::Unreachable(cause) => format!("JWKS request failed: {cause}"),
        Auth0Error::RateLimited { .. } => "JWKS request answered HTTP 429".to_owned(),
        Auth0Error::ServerError { status, .. } | Auth0Error::Unexpected { status, .. } => {
            format!("JWKS request answered HTTP {status}")
        }
        Auth0Error::BodyTooLarge { limit, .. } => format!("JWKS body is larger than {limit} bytes"),
        Auth0Error::InvalidBody(_) => "JWKS body is not a JWK set".to_owned(),
        other => format!("JWKS request failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use futures::future::join_all;
    use secrecy::SecretString;

    use super::{IdTokenError, IdTokenSettings, IdTokenVerifier};
    use crate::auth0::{Auth0Client, Auth0Settings};
    use crate::emulator::{
        seed, Audience, Emulator, EmulatorConfig, Endpoint, Fault, IdTokenSpec, KidHeader, Signing,
    };

    const USER: &str = seed::GITHUB_USER;

    async fn emulator() -> Emulator {
        Emulator::start(EmulatorConfig::new("test-client", "test-secret"))
            .await
            .expect("emulator starts")
    }

    fn settings(emu: &Emulator) -> IdTokenSettings {
        IdTokenSettings::new(emu.base_url(), vec![emu.id_token_audience()])
    }

    fn verifier_with(settings: IdTokenSettings) -> IdTokenVerifier {
        let auth0 = Auth0Client::new(Auth0Settings {
            base_url: settings.issuer_base_url.clone(),
            audience: format!("{}/api/v2/", settings.issuer_base_url),
            client_id: "test-client".to_owned(),
            client_secret: SecretString::from("test-secret"),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
        })
        .expect("auth0 client");
        IdTokenVerifier::new(settings, &auth0)
    }

    fn verifier(emu: &Emulator) -> IdTokenVerifier {
        verifier_with(settings(emu))
    }

    fn spec() -> IdTokenSpec {
        IdTokenSpec::for_user(USER)
    }

    /// Verifies the token `spec` describes with a fresh verifier; returns only the error.
    async fn refusal(emu: &Emulator, spec: IdTokenSpec) -> IdTokenError {
        let token = emu.issue_id_token_with(spec);
        verifier(emu)
            .verify(&token)
            .await
            .expect_err("the token is refused")
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs()
    }

    #[tokio::test]
    async fn genuine_token_yields_its_subject_and_expiry() {
        let emu = emulator().await;
        let verified = verifier(&emu)
            .verify(&emu.issue_id_token(USER))
            .await
            .expect("genuine token");
        assert_eq!(verified.sub, USER);
        assert!(verified.exp.abs_diff(now() + 3600) <= 5, "{}", verified.exp);
    }

    #[tokio::test]
    async fn jwks_is_fetched_once_and_then_served_from_cache() {
        let emu = emulator().await;
        let verifier = verifier(&emu);
        for _ in 0..3 {
            verifier
                .verify(&emu.issue_id_token(USER))
                .await
                .expect("genuine token");
        }
        assert_eq!(emu.calls().jwks, 1);
    }

    #[tokio::test]
    async fn concurrent_cold_verifications_share_one_jwks_fetch() {
        let emu = emulator().await;
        let verifier = verifier(&emu);
        let token = emu.issue_id_token(USER);
        let results = join_all((0..20).map(|_| verifier.verify(&token))).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(emu.calls().jwks, 1);
    }

    #[tokio::test]
    async fn expired_token_is_refused() {
        let emu = emulator().await;
        let spec = IdTokenSpec {
            issued_at: -7200,
            expires_in: Some(-120),
            ..spec()
        };
        assert_eq!(refusal(&emu, spec).await, IdTokenError::Expired);
    }

    #[tokio::test]
    async fn token_expired_within_the_leeway_is_accepted() {
        let emu = emulator().await;
        let token = emu.issue_id_token_with(IdTokenSpec {
            expires_in: Some(-20),
            ..spec()
        });
        verifier(&emu).verify(&token).await.expect("within leeway");
    }

    #[tokio::test]
    async fn token_not_valid_before_a_future_time_is_refused() {
        let emu = emulator().await;
        let spec = IdTokenSpec {
            not_before: Some(600),
            ..spec()
        };
        assert_eq!(refusal(&emu, spec).await, IdTokenError::NotYetValid);
    }

    #[tokio::test]
    async fn token_issued_in_the_future_is_refused() {
        let emu = emulator().await;
        let spec = IdTokenSpec {
            issued_at: 600,
            ..spec()
        };
        assert_eq!(refusal(&emu, spec).await, IdTokenError::IssuedInFuture);
    }

    #[tokio::test]
    async fn token_for_another_audience_is_refused() {
        let emu = emulator().await;
        let spec = IdTokenSpec {
            audience: Some(Audience::One("some-other-app".into())),
            ..spec()
        };
        assert_eq!(refusal(&emu, spec).await, IdTokenError::Audience);
    }

    #[tokio::test]
    async fn audience_array_containing_a_configured_audience_is_accepted() {
        let emu = emulator().await;
        let audiences = vec!["https://api.example.com/".into(), emu.id_token_audience()];
        let token = emu.issue_id_token_with(IdTokenSpec {
            audience: Some(Audience::Many(audiences)),
            ..spec()
        });
        let verified = verifier(&emu).verify(&token).await.expect("accepted");
        assert_eq!(verified.sub, USER);
    }

    #[tokio::test]
    async fn issuer_without_the_trailing_slash_is_refused() {
        let emu = emulator().await;
        let spec = IdTokenSpec {
            issuer: Some(emu.base_url()),
            ..spec()
        };
        assert_eq!(refusal(&emu, spec).await, IdTokenError::Issuer);
    }

    #[tokio::test]
    async fn token_without_subject_is_refused() {
        let emu = emulator().await;
        let spec = IdTokenSpec {
            sub: None,
            ..spec()
        };
        assert_eq!(refusal(&emu, spec).await, IdTokenError::MissingSubject);
        let empty = IdTokenSpec::for_user("");
        assert_eq!(refusal(&emu, empty).await, IdTokenError::MissingSubject);
    }

    #[tokio::test]
    async fn token_without_expiry_is_refused() {
        let emu = emulator().await;
        let spec = IdTokenSpec {
            expires_in: None,
            ..spec()
        };
        assert_eq!(refusal(&emu, spec).await, IdTokenError::MissingClaim("exp"));
    }

    #[tokio::test]
    async fn token_signed_by_an_unpublished_key_fails_the_signature_check() {
        let emu = emulator().await;
        let spec = IdTokenSpec {
            signing: Signing::UnpublishedKey,
            ..spec()
        };
        assert_eq!(refusal(&emu, spec).await, IdTokenError::Signature);
    }

    #[tokio::test]
    async fn unsigned_alg_none_token_is_refused_as_an_algorithm_error() {
        let emu = emulator().await;
        let spec = IdTokenSpec {
            signing: Signing::AlgNone,
            ..spec()
        };
        let error = refusal(&emu, spec).await;
        assert_eq!(error, IdTokenError::Algorithm("none".into()));
        assert!(error.to_string().contains("\"none\""), "{error}");
        assert_eq!(emu.calls().jwks, 0, "refused before any key is looked up");
    }

    #[tokio::test]
    async fn hs256_keyed_with_the_public_key_is_refused_as_an_algorithm_error() {
        let emu = emulator().await;
        let spec = IdTokenSpec {
            signing: Signing::Hs256WithPublicKey,
            ..spec()
        };
        let error = refusal(&emu, spec).await;
        assert_eq!(error, IdTokenError::Algorithm("HS256".into()));
        assert_eq!(error.check(), "algorithm");
        assert_eq!(emu.calls().jwks, 0, "refused before any key is looked up");
    }

    #[tokio::test]
    async fn token_without_kid_is_refused() {
        let emu = emulator().await;
        let spec = IdTokenSpec {
            kid: KidHeader::Omitted,
            ..spec()
        };
        assert_eq!(refusal(&emu, spec).await, IdTokenError::MissingKeyId);
    }

    #[tokio::test]
    async fn garbage_is_malformed() {
        let emu = emulator().await;
        let verifier = verifier(&emu);
        for garbage in ["", "abc", "a.b.c", "a.b", "....", "eyJhbGciOiJSUzI1NiJ9"] {
            let error = verifier.verify(garbage).await.expect_err("garbage");
            assert_eq!(error.check(), "malformed", "{garbage:?}: {error}");
        }
    }

    #[tokio::test]
    async fn rotated_key_is_accepted_after_exactly_one_jwks_refresh() {
        let emu = emulator().await;
        let verifier = verifier(&emu);
        let old = emu.issue_id_token(USER);
        verifier.verify(&old).await.expect("first key");
        assert_eq!(emu.calls().jwks, 1);

        emu.rotate_signing_key();
        let new = emu.issue_id_token(USER);
        verifier
            .verify(&new)
            .await
            .expect("rotated key after refresh");
        verifier.verify(&new).await.expect("rotated key from cache");
        verifier
            .verify(&old)
            .await
            .expect("previous key still published");
        assert_eq!(emu.calls().jwks, 2, "exactly one refresh");
    }

    #[tokio::test]
    async fn flood_of_unknown_kids_refreshes_the_jwks_at_most_once_per_interval() {
        let emu = emulator().await;
        let verifier = verifier(&emu);
        verifier
            .verify(&emu.issue_id_token(USER))
            .await
            .expect("warm");
        emu.reset_counters();

        let tokens: Vec<String> = (0..50)
            .map(|i| {
                emu.issue_id_token_with(IdTokenSpec {
                    kid: KidHeader::Custom(format!("made-up-{i}")),
                    ..spec()
                })
            })
            .collect();
        let results = join_all(tokens.iter().map(|token| verifier.verify(token))).await;
        for result in &results {
            let error = result.as_ref().expect_err("unknown kid");
            assert_eq!(error.check(), "unknown_kid", "{error}");
        }
        assert_eq!(emu.calls().jwks, 1, "one refresh for 50 unknown kids");
    }

    #[tokio::test]
    async fn refresh_budget_returns_after_the_interval() {
        let emu = emulator().await;
        let verifier = verifier_with(IdTokenSettings {
            min_refresh_interval: Duration::from_millis(300),
            ..settings(&emu)
        });
        let unknown = emu.issue_id_token_with(IdTokenSpec {
            kid: KidHeader::Custom("made-up".into()),
            ..spec()
        });
        let _ = verifier.verify(&unknown).await;
        let _ = verifier.verify(&unknown).await;
        assert_eq!(emu.calls().jwks, 2, "initial fetch and one refresh");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let _ = verifier.verify(&unknown).await;
        assert_eq!(emu.calls().jwks, 3, "one more refresh after the interval");
    }

    #[tokio::test]
    async fn revoked_key_is_refused_once_the_cached_jwks_expires() {
        let emu = emulator().await;
        let verifier = verifier_with(IdTokenSettings {
            jwks_ttl: Duration::from_millis(200),
            ..settings(&emu)
        });
        let old = emu.issue_id_token(USER);
        verifier.verify(&old).await.expect("first key");
        emu.rotate_signing_key();
        emu.revoke_previous_signing_key();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let error = verifier.verify(&old).await.expect_err("revoked");
        assert_eq!(error, IdTokenError::UnknownKey("dev-signing-1".into()));
    }

    /// The reason and retry time of a [`IdTokenError::JwksUnavailable`]; panics on another error.
    fn unavailable(error: &IdTokenError) -> (&str, Option<Duration>) {
        match error {
            IdTokenError::JwksUnavailable {
                reason,
                retry_after,
            } => (reason, *retry_after),
            other => panic!("expected JwksUnavailable, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn jwks_failure_is_remembered_with_the_time_left_then_fetched_again() {
        let emu = emulator().await;
        emu.inject_faults(Endpoint::Jwks, vec![Fault::Status(500)]);
        let verifier = verifier_with(IdTokenSettings {
            failure_ttl: Duration::from_millis(400),
            ..settings(&emu)
        });
        let token = emu.issue_id_token(USER);
        let error = verifier.verify(&token).await.expect_err("JWKS fails");
        assert!(error.is_unavailable());
        let (reason, retry_after) = unavailable(&error);
        assert!(reason.contains("500"), "{reason}");
        let first = retry_after.expect("retry time");
        assert!(first <= Duration::from_millis(400), "{first:?}");

        let again = verifier.verify(&token).await.expect_err("remembered");
        let (_, retry_after) = unavailable(&again);
        assert!(retry_after.expect("time left") <= first);
        assert_eq!(
            emu.calls().jwks,
            1,
            "the failure is answered from the cache"
        );

        tokio::time::sleep(Duration::from_millis(450)).await;
        verifier
            .verify(&token)
            .await
            .expect("fetched again after the failure TTL");
        assert_eq!(emu.calls().jwks, 2);
    }

    #[tokio::test]
    async fn concurrent_verifications_against_a_failing_jwks_share_one_fetch() {
        let emu = emulator().await;
        emu.inject_faults(Endpoint::Jwks, vec![Fault::Status(404); 50]);
        let verifier = verifier(&emu);
        let token = emu.issue_id_token(USER);
        for _ in 0..3 {
            let results = join_all((0..50).map(|_| verifier.verify(&token))).await;
            for result in results {
                let error = result.expect_err("no keys");
                assert!(unavailable(&error).1.is_some(), "{error:?}");
            }
        }
        assert_eq!(emu.calls().jwks, 1, "150 verifications, one fetch");
    }

    #[tokio::test]
    async fn jwks_fetches_are_limited_even_when_failures_are_forgotten_at_once() {
        let emu = emulator().await;
        emu.inject_faults(Endpoint::Jwks, vec![Fault::Status(503); 50]);
        let verifier = verifier_with(IdTokenSettings {
            failure_ttl: Duration::from_millis(1),
            ..settings(&emu)
        });
        let token = emu.issue_id_token(USER);
        let started = std::time::Instant::now();
        let mut limited = 0;
        for _ in 0..20 {
            let error = verifier.verify(&token).await.expect_err("no keys");
            let (reason, retry_after) = unavailable(&error);
            if reason.contains("rate-limited") {
                limited += 1;
                assert!(retry_after.expect("next slot") <= super::JWKS_FETCH_PERIOD);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let allowed = super::JWKS_FETCH_BURST.get() as u64 + started.elapsed().as_secs() + 1;
        assert!(
            emu.calls().jwks <= allowed,
            "{} fetches, at most {allowed} allowed",
            emu.calls().jwks
        );
        assert!(limited > 0, "some fetches were held back");
    }

    #[tokio::test]
    async fn a_kid_missing_from_a_jwks_fetched_for_this_token_is_refused_without_a_refresh() {
        let emu = emulator().await;
        let unknown = emu.issue_id_token_with(IdTokenSpec {
            kid: KidHeader::Custom("made-up".into()),
            ..spec()
        });
        let error = verifier(&emu).verify(&unknown).await.expect_err("unknown");
        assert_eq!(error, IdTokenError::UnknownKey("made-up".into()));
        assert_eq!(emu.calls().jwks, 1, "the cold fetch came after the token");
    }

    #[tokio::test]
    async fn a_rotated_kid_held_back_by_the_refresh_limit_is_not_yet_known_then_accepted() {
        let emu = emulator().await;
        let verifier = verifier_with(IdTokenSettings {
            min_refresh_interval: Duration::from_millis(500),
            ..settings(&emu)
        });
        verifier
            .verify(&emu.issue_id_token(USER))
            .await
            .expect("warm");
        let made_up = emu.issue_id_token_with(IdTokenSpec {
            kid: KidHeader::Custom("made-up".into()),
            ..spec()
        });
        let refused = verifier.verify(&made_up).await.expect_err("unknown kid");
        assert_eq!(
            refused.check(),
            "unknown_kid",
            "a refresh happened: {refused}"
        );

        let kid = emu.rotate_signing_key();
        let rotated = emu.issue_id_token(USER);
        let error = verifier.verify(&rotated).await.expect_err("held back");
        let IdTokenError::KeyNotYetKnown {
            kid: named,
            retry_after,
        } = &error
        else {
            panic!("expected KeyNotYetKnown, got {error:?}");
        };
        assert_eq!(*named, kid);
        assert!(error.is_unavailable());
        assert_eq!(error.retry_after(), Some(*retry_after));
        assert!(
            *retry_after <= Duration::from_millis(500),
            "{retry_after:?}"
        );
        assert_eq!(emu.calls().jwks, 2, "no fetch while held back");

        tokio::time::sleep(*retry_after + Duration::from_millis(20)).await;
        let verified = verifier.verify(&rotated).await.expect("after the delay");
        assert_eq!(verified.sub, USER);
        assert_eq!(emu.calls().jwks, 3);
    }

    #[tokio::test]
    async fn concurrent_tokens_with_a_rotated_kid_share_one_refresh_and_are_accepted() {
        let emu = emulator().await;
        let verifier = verifier(&emu);
        verifier
            .verify(&emu.issue_id_token(USER))
            .await
            .expect("warm");
        emu.rotate_signing_key();
        let rotated = emu.issue_id_token(USER);
        let results = join_all((0..20).map(|_| verifier.verify(&rotated))).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(emu.calls().jwks, 2, "one fetch, one refresh");
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_cached_keys() {
        let emu = emulator().await;
        let verifier = verifier(&emu);
        let genuine = emu.issue_id_token(USER);
        verifier.verify(&genuine).await.expect("warm");
        emu.inject_faults(Endpoint::Jwks, vec![Fault::Status(503)]);
        let made_up = emu.issue_id_token_with(IdTokenSpec {
            kid: KidHeader::Custom("made-up".into()),
            ..spec()
        });
        let error = verifier.verify(&made_up).await.expect_err("refresh fails");
        assert_eq!(unavailable(&error).1, Some(super::DEFAULT_FAILURE_TTL));
        verifier
            .verify(&genuine)
            .await
            .expect("the cached keys still verify");
        assert_eq!(emu.calls().jwks, 2);
    }

    #[tokio::test]
    async fn slow_jwks_times_out_as_unavailable() {
        let emu = emulator().await;
        emu.inject_faults(Endpoint::Jwks, vec![Fault::Delay(Duration::from_secs(2))]);
        let verifier = verifier_with(IdTokenSettings {
            request_timeout: Duration::from_millis(200),
            ..settings(&emu)
        });
        let error = verifier
            .verify(&emu.issue_id_token(USER))
            .await
            .expect_err("times out");
        assert_eq!(unavailable(&error).0, "JWKS request timed out");
    }

    #[tokio::test]
    async fn unreachable_tenant_is_unavailable() {
        let emu = emulator().await;
        let token = emu.issue_id_token(USER);
        let verifier = verifier(&emu);
        emu.shutdown().await;
        let error = verifier.verify(&token).await.expect_err("no tenant");
        assert!(error.is_unavailable(), "{error}");
    }

    #[tokio::test]
    async fn error_messages_never_contain_the_token_or_its_parts() {
        let emu = emulator().await;
        emu.inject_faults(Endpoint::Jwks, vec![Fault::Status(500)]);
        let verifier = verifier(&emu);
        let specs = [
            spec(),
            IdTokenSpec {
                expires_in: Some(-600),
                ..spec()
            },
            IdTokenSpec {
                signing: Signing::UnpublishedKey,
                ..spec()
            },
            IdTokenSpec {
                signing: Signing::AlgNone,
                ..spec()
            },
            IdTokenSpec {
                audience: Some(Audience::One("x".into())),
                ..spec()
            },
        ];
        let mut refused = 0;
        for spec in specs {
            let token = emu.issue_id_token_with(spec);
            let Err(error) = verifier.verify(&token).await else {
                continue;
            };
            refused += 1;
            let texts = [error.to_string(), format!("{error:?}")];
            for part in token.split('.').filter(|part| part.len() > 8) {
                for text in &texts {
                    assert!(!text.contains(part), "{text} leaks a token part");
                }
            }
        }
        assert_eq!(
            refused, 5,
            "the genuine one meets the JWKS fault, the others are forged"
        );
    }

    #[test]
    fn debug_of_the_verifier_shows_settings_only() {
        let verifier = verifier_with(IdTokenSettings::new(
            "https://tenant.example",
            vec!["spa".into()],
        ));
        let debug = format!("{verifier:?}");
        assert!(debug.contains("https://tenant.example"), "{debug}");
    }

    #[test]
    fn only_unavailable_keys_are_the_brokers_fault() {
        let errors = [
            IdTokenError::Malformed("x"),
            IdTokenError::Algorithm("none".into()),
            IdTokenError::MissingKeyId,
            IdTokenError::UnknownKey("k".into()),
            IdTokenError::Signature,
            IdTokenError::Expired,
            IdTokenError::NotYetValid,
            IdTokenError::IssuedInFuture,
            IdTokenError::Issuer,
            IdTokenError::Audience,
            IdTokenError::MissingSubject,
            IdTokenError::MissingClaim("exp"),
        ];
        assert!(errors.iter().all(|error| !error.is_unavailable()));
        let mut checks: Vec<&str> = errors.iter().map(IdTokenError::check).collect();
        checks.sort_unstable();
        checks.dedup();
        assert_eq!(checks.len(), errors.len(), "check names are distinct");
        let unavailable = IdTokenError::JwksUnavailable {
            reason: "down".into(),
            retry_after: None,
        };
        assert!(unavailable.is_unavailable());
        let not_yet = IdTokenError::KeyNotYetKnown {
            kid: "k".into(),
            retry_after: Duration::from_secs(3),
        };
        assert!(not_yet.is_unavailable());
        assert_eq!(not_yet.retry_after(), Some(Duration::from_secs(3)));
        assert!(errors.iter().all(|error| error.retry_after().is_none()));
    }
}
