//! What the broker allows itself towards one IdP: a rate limit (governor), a
//! bound on refreshes in flight, and retries of transient failures that honour
//! `Retry-After`, all within the caller's deadline and a budget for the whole
//! call. The shape of `auth0::outbound`, with the IdP's own errors, log lines
//! and budget: an IdP outage must neither look like an Auth0 one nor spend
//! Auth0's quota.

use std::future::Future;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use super::request::Failure;
use super::IdpError;
use crate::auth0::OutboundLimits;

/// First backoff step when the IdP did not say how long to wait.
const BACKOFF_BASE: Duration = Duration::from_millis(250);

/// The gate every refresh at one IdP passes.
pub(crate) struct Gate {
    limiter: DefaultDirectRateLimiter,
    in_flight: Semaphore,
    limits: OutboundLimits,
    /// How long one call may take, attempts and waits included.
    call_timeout: Duration,
}

impl Gate {
    pub(crate) fn new(limits: OutboundLimits, call_timeout: Duration) -> Self {
        let quota = Quota::per_second(limits.rate_per_second).allow_burst(limits.burst);
        Self {
            limiter: RateLimiter::direct(quota),
            in_flight: Semaphore::new(limits.max_in_flight.max(1)),
            limits,
            call_timeout,
        }
    }

    /// Runs `attempt` within the limits and retries it while it fails
    /// transiently. No wait and no attempt starts past `deadline` or the end
    /// of the call's budget; an attempt still running at the end of the budget
    /// is dropped. As in `auth0::outbound`, an attempt is not cut at the
    /// caller's deadline: the caller's own timeout answers then.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        connection: &str,
        deadline: Option<Instant>,
        mut attempt: F,
    ) -> Result<T, IdpError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let budget_end = Instant::now() + self.call_timeout;
        let give_up_at = deadline.map_or(budget_end, |deadline| deadline.min(budget_end));
        let mut attempts = 0;
        loop {
            attempts += 1;
            let permit = self.admit(give_up_at).await?;
            let failure = match tokio::time::timeout_at(budget_end, attempt()).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(failure)) => failure,
                Err(_) => Failure::timed_out(),
            };
            drop(permit);
            let Some(wait) = self.retry_wait(&failure, attempts, give_up_at) else {
                return Err(failure.error);
            };
            tracing::warn!(error = %failure.error, connection, attempt = attempts, retry_in_ms = wait.as_millis() as u64, "retrying the IdP");
            tokio::time::sleep(wait).await;
        }
    }

    /// How long to wait before the next attempt, or `None` to give up: the
    /// failure is not transient, the attempts are spent, or the wait is longer
    /// than the broker sits out or would end past `give_up_at`.
    fn retry_wait(
        &self,
        failure: &Failure,
        attempts: u32,
        give_up_at: Instant,
    ) -> Option<Duration> {
        if !failure.retryable || attempts >= self.limits.max_attempts {
            return None;
        }
        let wait = failure
            .error
            .retry_after()
            .unwrap_or_else(|| backoff(attempts));
        let in_time = Instant::now() + wait < give_up_at;
        (wait <= self.limits.max_wait && in_time).then_some(wait)
    }

    /// A rate-limit slot and an in-flight permit, or UNAVAILABLE when they do
    /// not come before `give_up_at` (nor within `max_wait`): the broker's own
    /// limit, said with the time it asks to wait.
    async fn admit(&self, give_up_at: Instant) -> Result<SemaphorePermit<'_>, IdpError> {
        let give_up_at = give_up_at.min(Instant::now() + self.limits.max_wait);
        if Instant::now() >= give_up_at {
            return Err(IdpError::unavailable(
                "the caller's deadline passed before the IdP could be asked",
            ));
        }
        while let Err(not_until) = self.limiter.check() {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            if Instant::now() + wait >= give_up_at {
                return Err(own_limit(wait));
            }
            tokio::time::sleep(wait).await;
        }
        match tokio::time::timeout_at(give_up_at, self.in_flight.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(own_limit(Duration::from_millis(100))),
        }
    }
}

/// The broker's own limit on calls to this IdP is reached.
fn own_limit(retry_after: Duration) -> IdpError {
    tracing::warn!(
        wait_ms = retry_after.as_millis() as u64,
        "IdP refresh refused: the broker's own limit for this IdP"
    );
    IdpError::Unavailable {
        reason: "the broker's own limit on calls to this IdP is reached".to_owned(),
        retry_after: Some(retry_after),
    }
}

/// Exponential backoff from 250 ms, jittered to 50–100 % of the step so
/// replicas do not retry in lockstep.
fn backoff(attempt: u32) -> Duration {
    let step = BACKOFF_BASE * 2u32.saturating_pow(attempt.saturating_sub(1));
    step.mul_f64(rand::rng().random_range(0.5..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn gate(max_attempts: u32, call_timeout: Duration) -> Gate {
        let limits = OutboundLimits {
            max_attempts,
            ..OutboundLimits::default()
        };
        Gate::new(limits, call_timeout)
    }

    fn unavailable(retry_after: Option<Duration>) -> Failure {
        Failure {
            error: IdpError::Unavailable {
                reason: "HTTP 503".to_owned(),
                retry_after,
            },
            retryable: true,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_after_the_wait_the_idp_asked() {
        let gate = gate(3, Duration::from_secs(60));
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let result = gate
            .call("c", None, || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 => Err(unavailable(Some(Duration::from_secs(2)))),
                    _ => Ok("token"),
                }
            })
            .await;
        assert_eq!(result, Ok("token"));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(started.elapsed() >= Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn settled_failures_are_not_retried_and_attempts_are_bounded() {
        let gate = gate(3, Duration::from_secs(60));
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = gate
            .call("c", None, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Failure {
                    error: IdpError::InvalidGrant,
                    retryable: false,
                })
            })
            .await;
        assert_eq!(result, Err(IdpError::InvalidGrant));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let calls = AtomicU32::new(0);
        let result: Result<(), _> = gate
            .call("c", None, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(unavailable(None))
            })
            .await;
        assert!(matches!(result, Err(IdpError::Unavailable { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn no_wait_starts_that_would_pass_the_deadline() {
        let gate = gate(3, Duration::from_secs(60));
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let deadline = started + Duration::from_secs(1);
        let result: Result<(), _> = gate
            .call("c", Some(deadline), || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(unavailable(Some(Duration::from_secs(5))))
            })
            .await;
        assert_eq!(
            result.unwrap_err().retry_after(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(started.elapsed(), Duration::ZERO, "gave up at once");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn no_attempt_starts_past_the_deadline() {
        let gate = gate(3, Duration::from_secs(60));
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = gate
            .call("c", Some(Instant::now()), || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .await;
        assert!(matches!(result, Err(IdpError::Unavailable { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_idp_is_given_up_on_at_the_end_of_the_budget() {
        let gate = gate(3, Duration::from_secs(1));
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let result: Result<(), _> = gate
            .call("c", None, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                std::future::pending().await
            })
            .await;
        assert!(matches!(result, Err(IdpError::Unavailable { .. })));
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no attempt past the budget"
        );
    }

    /// Real time: governor keeps its own clock, which paused tokio time does not move.
    #[tokio::test]
    async fn the_rate_limit_refuses_what_cannot_wait_and_says_how_long() {
        let one = NonZeroU32::MIN;
        let limits = OutboundLimits {
            rate_per_second: one,
            burst: one,
            ..OutboundLimits::default()
        };
        let gate = Gate::new(limits, Duration::from_secs(60));
        let calls = AtomicU32::new(0);
        let call = |deadline| {
            gate.call("c", Some(deadline), || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        };
        assert_eq!(call(Instant::now() + Duration::from_secs(5)).await, Ok(()));
        let refused = call(Instant::now() + Duration::from_millis(100)).await;
        let wait = refused.unwrap_err().retry_after().unwrap();
        assert!(
            wait > Duration::from_millis(100) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            call(Instant::now() + Duration::from_secs(5)).await,
            Ok(()),
            "waits for its slot"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn backoff_doubles_from_250ms_with_jitter() {
        for attempt in 1..=3 {
            let step = BACKOFF_BASE * 2u32.pow(attempt - 1);
            let wait = backoff(attempt);
            assert!(
                wait >= step / 2 && wait <= step,
                "{wait:?} for attempt {attempt}"
            );
        }
    }
}
