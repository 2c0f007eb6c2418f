//! What the broker allows itself towards one IdP: a rate limit (governor), a
//! bound on refreshes in flight, and retries of transient failures that honour
//! `Retry-After`, all within the caller's deadline and a budget for the whole
//! call. The loop is `auth0::outbound`'s [`Upstream`], run over the IdP's own
//! errors, log lines and instances: an IdP outage must neither look like an
//! Auth0 one nor spend Auth0's quota.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::request::Failure;
use super::IdpError;
use crate::auth0::outbound::{OwnLimit, SlotWait, Upstream, UpstreamError};
use crate::auth0::OutboundLimits;

/// The gate every refresh at one IdP passes: its own limiter and in-flight
/// bound, never shared with Auth0 nor with another connection.
pub(crate) struct Gate(Upstream<Failure>);

impl Gate {
    /// A gate with these limits, where one call gives up after `call_timeout`
    /// whatever the caller's deadline.
    pub(crate) fn new(limits: OutboundLimits, call_timeout: Duration) -> Self {
        Self(Upstream::new(limits, call_timeout))
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
        attempt: F,
    ) -> Result<T, IdpError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        self.0
            .call(connection, deadline, attempt)
            .await
            .map_err(|failure| failure.error)
    }
}

/// The IdP's side of the shared loop: a failure says itself whether it is
/// worth retrying, and the broker's own limits answer UNAVAILABLE with the
/// time they ask to wait.
impl UpstreamError for Failure {
    type Label<'a> = &'a str;

    /// A refresh waits at most `max_wait` for its slot, and none starts once
    /// the caller's deadline has passed.
    const SLOT_WAIT: SlotWait = SlotWait::AtMostMaxWait;

    fn is_transient(&self) -> bool {
        self.retryable
    }

    fn retry_after(&self) -> Option<Duration> {
        self.error.retry_after()
    }

    fn timed_out() -> Self {
        Failure::timed_out()
    }

    fn deadline_passed() -> Option<Self> {
        Some(settled(IdpError::unavailable(
            "the caller's deadline passed before the IdP could be asked",
        )))
    }

    /// The broker's own limit on calls to this IdP is reached, whichever.
    fn refused(_limit: OwnLimit, retry_after: Duration) -> Self {
        tracing::warn!(
            wait_ms = retry_after.as_millis() as u64,
            "IdP refresh refused: the broker's own limit for this IdP"
        );
        settled(IdpError::Unavailable {
            reason: "the broker's own limit on calls to this IdP is reached".to_owned(),
            retry_after: Some(retry_after),
        })
    }

    fn retrying(&self, connection: &str, attempt: u32, wait: Duration) {
        tracing::warn!(error = %self.error, connection, attempt, retry_in_ms = wait.as_millis() as u64, "retrying the IdP");
    }
}

/// A failure no retry mends: the gate's own refusals end the call at once.
fn settled(error: IdpError) -> Failure {
    Failure {
        error,
        retryable: false,
    }
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
}
