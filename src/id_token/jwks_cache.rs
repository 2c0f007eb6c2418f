//! The tenant's JWKS as the verifier holds it: a one-entry moka cache of the keys, or of
//! why they could not be had and until when; the refresh on an unknown `kid`, one at a time
//! and at most one per interval; and the one limit every fetch passes. The fetch itself is
//! the auth0 module's ([`JwksSource`]).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use moka::future::Cache;
use moka::Expiry;
use tokio::sync::Mutex;

use super::error::echo;
use super::{IdTokenError, IdTokenSettings, JWKS_FETCH_BURST, JWKS_FETCH_PERIOD};
use crate::auth0::{Auth0Error, JwksSource};

/// A fetched JWKS and when its request started, to tell whether it is newer than a token.
pub(super) struct Keys {
    set: JwkSet,
    pub(super) fetched_at: Instant,
}

impl Keys {
    pub(super) fn find(&self, kid: &str) -> Option<&Jwk> {
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

/// The tenant's JWKS, fetched on a miss and refreshed on an unknown `kid`, every fetch
/// under one limit.
pub(super) struct JwksCache {
    /// The tenant's JWKS endpoint, on the auth0 module's send path.
    source: JwksSource,
    /// One entry (key `()`): the tenant's JWKS, or why it could not be had and until when.
    jwks: Cache<(), JwksEntry>,
    /// Taken by the one unknown-`kid` refresh under way; holds when the next may start.
    next_refresh: Mutex<Option<Instant>>,
    /// Every JWKS fetch takes a slot: cold, after the TTL, or a refresh.
    fetches: DefaultDirectRateLimiter,
    /// Least time between two refreshes caused by unknown `kid`s.
    min_refresh_interval: Duration,
    /// How long a failed fetch is remembered.
    failure_ttl: Duration,
}

impl JwksCache {
    /// An empty cache for `settings`' timings, fetching from `source`.
    pub(super) fn new(settings: &IdTokenSettings, source: JwksSource) -> Self {
        let jwks = Cache::builder()
            .max_capacity(1)
            .expire_after(JwksExpiry {
                jwks_ttl: settings.jwks_ttl,
            })
            .build();
        Self {
            source,
            jwks,
            next_refresh: Mutex::new(None),
            fetches: fetch_limiter(),
            min_refresh_interval: settings.min_refresh_interval,
            failure_ttl: settings.failure_ttl,
        }
    }

    /// The cached JWKS, fetched on a miss; concurrent misses share one fetch, and a failed
    /// fetch is answered from the cache until its retry time.
    pub(super) async fn cached(&self) -> Result<Arc<Keys>, IdTokenError> {
        match self.jwks.get_with((), self.fetch_entry()).await {
            JwksEntry::Keys(keys) => Ok(keys),
            JwksEntry::Failed(failure) => Err(failure.error()),
        }
    }

    /// A JWKS fetched after `seen`: one another request brought while this one waited its
    /// turn, else a refresh now, unless the refresh limit holds it back (then
    /// [`IdTokenError::KeyNotYetKnown`] with the time until it allows one). Refreshes run one
    /// at a time; a failed one keeps the cached keys.
    pub(super) async fn newer_than(
        &self,
        seen: &Keys,
        kid: &str,
    ) -> Result<Arc<Keys>, IdTokenError> {
        let mut next_refresh = self.next_refresh.lock().await;
        let cached = self.cached().await?;
        if cached.fetched_at > seen.fetched_at {
            return Ok(cached);
        }
        let now = Instant::now();
        let held_back = next_refresh
            .and_then(|at| at.checked_duration_since(now))
            .filter(|wait| !wait.is_zero());
        if let Some(wait) = held_back.or_else(|| self.fetch_wait()) {
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
        match self.fetch().await {
            Ok(keys) => {
                *next_refresh = Some(now + self.min_refresh_interval);
                self.jwks.insert((), JwksEntry::Keys(keys.clone())).await;
                Ok(keys)
            }
            Err(reason) => {
                let retry_after = self.failure_ttl;
                *next_refresh = Some(now + retry_after);
                Err(IdTokenError::JwksUnavailable {
                    reason,
                    retry_after: Some(retry_after),
                })
            }
        }
    }

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
        match self.fetch().await {
            Ok(keys) => JwksEntry::Keys(keys),
            Err(reason) => {
                let failure = FetchFailure::new(reason, self.failure_ttl);
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
    async fn fetch(&self) -> Result<Arc<Keys>, String> {
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

/// [`JWKS_FETCH_BURST`] fetches at once, then one per [`JWKS_FETCH_PERIOD`].
fn fetch_limiter() -> DefaultDirectRateLimiter {
    let quota = Quota::with_period(JWKS_FETCH_PERIOD)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(JWKS_FETCH_BURST);
    RateLimiter::direct(quota)
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
