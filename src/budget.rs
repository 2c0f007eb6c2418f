//! Each caller's share of the Auth0 budget.
//!
//! The broker's Auth0 rate limit (`--auth0-rate-limit`, `--auth0-burst`) is
//! one budget for every caller. Without shares, one caller hammering cache
//! misses (or `bypass_cache`) spends all of it and every other caller's
//! misses fail. With shares, a caller may spend at most `--auth0-caller-share`
//! of the rate and of the burst; the rest stays for the others. A caller is
//! charged when its request has to read Auth0 (a cache miss, `bypass_cache`),
//! never for a cache hit.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use moka::sync::Cache;
use tokio::time::Instant;

use crate::error::BrokerError;
use crate::stats;

/// Default share of the Auth0 budget one caller may spend.
pub const DEFAULT_CALLER_SHARE: f64 = 0.5;

/// Callers whose bucket is kept; the least recently used go first (an
/// evicted caller starts again with a full bucket, which only a caller that
/// has been quiet for long can gain from).
const MAX_TRACKED_CALLERS: u64 = 10_000;
/// A bucket unused this long is dropped (it would be full again anyway).
const IDLE_BUCKET_TTL: Duration = Duration::from_secs(600);

/// How the Auth0 budget is shared out.
#[derive(Debug, Clone, Copy)]
pub struct ShareSettings {
    /// The whole budget's sustained rate (per second).
    pub rate_per_second: NonZeroU32,
    /// The whole budget's burst.
    pub burst: NonZeroU32,
    /// The fraction of rate and burst one caller may use, in (0, 1].
    pub share: f64,
    /// Longest wait for the caller's bucket when the caller set no deadline.
    pub max_wait: Duration,
}

/// One token bucket per caller, each a share of the Auth0 budget.
pub struct CallerBudgets {
    quota: Quota,
    buckets: Cache<Arc<str>, Arc<DefaultDirectRateLimiter>>,
    max_wait: Duration,
}

impl CallerBudgets {
    /// Buckets of `share × rate` per second and `share × burst`, at least 1 each.
    pub fn new(settings: ShareSettings) -> Self {
        let rate = share_of(settings.rate_per_second, settings.share);
        let burst = share_of(settings.burst, settings.share);
        Self {
            quota: Quota::per_second(rate).allow_burst(burst),
            buckets: Cache::builder()
                .max_capacity(MAX_TRACKED_CALLERS)
                .time_to_idle(IDLE_BUCKET_TTL)
                .build(),
            max_wait: settings.max_wait,
        }
    }

    /// One Auth0 request's worth of `caller`'s share: waits for it while the
    /// wait ends before `deadline` (or the longest wait), else refuses with
    /// AUTH0_RATE_LIMITED and how long to wait.
    pub async fn admit(&self, caller: &str, deadline: Option<Instant>) -> Result<(), BrokerError> {
        let bucket = self.bucket(caller);
        let give_up_at = deadline.unwrap_or_else(|| Instant::now() + self.max_wait);
        while let Err(not_until) = bucket.check() {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            if Instant::now() + wait >= give_up_at {
                stats::caller_share_rejection();
                return Err(BrokerError::CallerShareSpent { retry_after: wait });
            }
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }

    fn bucket(&self, caller: &str) -> Arc<DefaultDirectRateLimiter> {
        if let Some(bucket) = self.buckets.get(caller) {
            return bucket;
        }
        self.buckets.get_with(Arc::from(caller), || {
            Arc::new(RateLimiter::direct(self.quota))
        })
    }
}

/// `share` of `whole`, rounded up, never below 1.
fn share_of(whole: NonZeroU32, share: f64) -> NonZeroU32 {
    let part = (f64::from(whole.get()) * share.clamp(0.0, 1.0)).ceil();
    // In range: at most `whole`, a u32.
    NonZeroU32::new(part as u32).unwrap_or(NonZeroU32::MIN)
}

/// A caller's claim on its share, handed to the cache, which spends it only
/// when it has to read Auth0.
#[derive(Clone, Copy)]
pub struct CallerShare<'a> {
    budgets: &'a CallerBudgets,
    caller: &'a str,
}

impl<'a> CallerShare<'a> {
    /// `caller`'s share of `budgets`.
    pub fn of(budgets: &'a CallerBudgets, caller: &'a str) -> Self {
        Self { budgets, caller }
    }

    /// Takes one Auth0 request from the share (see [`CallerBudgets::admit`]).
    pub async fn spend(self, deadline: Option<Instant>) -> Result<(), BrokerError> {
        self.budgets.admit(self.caller, deadline).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(rate: u32, burst: u32, share: f64) -> CallerBudgets {
        CallerBudgets::new(ShareSettings {
            rate_per_second: NonZeroU32::new(rate).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
            share,
            max_wait: Duration::from_millis(10),
        })
    }

    #[test]
    fn a_share_is_rounded_up_and_never_zero() {
        assert_eq!(share_of(NonZeroU32::new(20).unwrap(), 0.5).get(), 10);
        assert_eq!(share_of(NonZeroU32::new(3).unwrap(), 0.5).get(), 2);
        assert_eq!(share_of(NonZeroU32::new(1).unwrap(), 0.01).get(), 1);
        assert_eq!(share_of(NonZeroU32::new(7).unwrap(), 1.0).get(), 7);
    }

    #[tokio::test]
    async fn one_caller_spending_its_share_leaves_the_rest_to_others() {
        let budgets = budgets(1, 4, 0.5);
        for _ in 0..2 {
            budgets.admit("greedy", None).await.unwrap();
        }
        let refused = budgets.admit("greedy", None).await.unwrap_err();
        assert_eq!(refused.reason(), "AUTH0_RATE_LIMITED");
        for _ in 0..2 {
            budgets.admit("polite", None).await.unwrap();
        }
    }
}
