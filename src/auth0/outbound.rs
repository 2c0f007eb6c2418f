//! Protects the tenant's Management API quota, which every other app of the
//! tenant shares: a client-side rate limit (governor), a bound on requests in
//! flight, and retries of transient failures that honour what Auth0 asks
//! (`Retry-After`, `x-ratelimit-reset`) and never outlive the caller.
//!
//! One call, attempts and waits included, also never outlives its time budget
//! (`--auth0-timeout`): without it a hanging Auth0 held a caller without a
//! deadline for attempts × timeout (30 s with the defaults).
//!
//! In a fleet the rate limit is one budget for every replica: a
//! [`SharedBudget`] (the fleet's, in Redis) is asked first, and the local
//! governor limiter only when the shared budget cannot answer.
//!
//! The admission and retry loop itself ([`Upstream`]) is written once for
//! any upstream: what differs between Auth0 and an IdP (their errors, log
//! lines and metrics, how long a call waits for a slot) is said by the
//! upstream's error type through [`UpstreamError`]. `idp::gate` runs its own
//! `Upstream` instances over it, so an IdP outage neither looks like an Auth0
//! one nor spends Auth0's quota: only the code is shared, never a limiter.

use std::future::Future;
use std::marker::PhantomData;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use super::Auth0Error;
use crate::stats;

/// First backoff step when the upstream did not say how long to wait.
pub(crate) const BACKOFF_BASE: Duration = Duration::from_millis(250);

/// How long a refused slot asks the caller to wait when the in-flight bound,
/// not the rate, refused it (the semaphore gives no better guess).
const IN_FLIGHT_RETRY_AFTER: Duration = Duration::from_millis(100);

/// Limits on calls to Auth0.
#[derive(Debug, Clone, Copy)]
pub struct OutboundLimits {
    /// Sustained requests per second to Auth0 (both endpoints).
    pub rate_per_second: NonZeroU32,
    /// Requests allowed at once above the sustained rate.
    pub burst: NonZeroU32,
    /// Requests to Auth0 in flight at once.
    pub max_in_flight: usize,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Longest wait for a slot, or before a retry, when the caller set no
    /// deadline; also the longest `Retry-After` the broker will sit out.
    pub max_wait: Duration,
}

/// Default sustained requests per second to Auth0 (a fraction of an
/// enterprise tenant's 16/s, which every app of the tenant shares).
pub const DEFAULT_RATE_PER_SECOND: NonZeroU32 = NonZeroU32::new(10).unwrap();
/// Default requests allowed at once above the sustained rate.
pub const DEFAULT_BURST: NonZeroU32 = NonZeroU32::new(20).unwrap();
/// Default requests to Auth0 in flight at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 32;
/// Default attempts per call, the first included.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

impl Default for OutboundLimits {
    fn default() -> Self {
        Self {
            rate_per_second: DEFAULT_RATE_PER_SECOND,
            burst: DEFAULT_BURST,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            max_wait: super::DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// What a [`SharedBudget`] says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedAdmission {
    /// The request has its slot: send it.
    Go,
    /// No slot before this much time has passed; ask again then.
    Wait(Duration),
    /// The shared budget could not be asked (its store is down or slow):
    /// this broker falls back to its own limiter.
    Unavailable,
}

/// A rate limit several brokers share, so that together they keep the
/// configured Auth0 rate and burst (the tenant's quota is tenant-wide). The
/// fleet implements it over Redis; a broker alone has none.
pub trait SharedBudget: Send + Sync {
    /// Takes one request's slot if there is one now. Boxed: only requests
    /// to Auth0 pay for it, never a cache hit.
    fn admit(&self) -> BoxFuture<'_, SharedAdmission>;
}

/// Which of the broker's own limits refused a call, so that an upstream can
/// tell them apart in its log lines and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OwnLimit {
    /// The rate limit (the shared budget or the local limiter): no slot
    /// would come in time.
    Rate,
    /// The bound on calls in flight: no permit came in time.
    InFlight,
}

/// How long a call may wait to be admitted (a rate-limit slot and an
/// in-flight permit). Auth0 and the IdPs have always differed here, and the
/// shared loop keeps both behaviours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotWait {
    /// Until the caller's deadline, or `max_wait` from now when it set none,
    /// and never past the call's budget.
    UntilDeadline,
    /// At most `max_wait`, and never past the caller's deadline nor the
    /// call's budget.
    AtMostMaxWait,
}

/// What the shared admission and retry loop ([`Upstream`]) needs to know of
/// one upstream's failures, and how that upstream tells of its own: the loop
/// is the same for Auth0 and the IdPs, their errors, log lines and metrics
/// are not.
pub(crate) trait UpstreamError: Sized {
    /// What names a call in log lines and metrics (Auth0's endpoint, the
    /// IdP's connection).
    type Label<'a>: Copy;

    /// How long a call may wait to be admitted.
    const SLOT_WAIT: SlotWait;

    /// Whether another attempt may go better.
    fn is_transient(&self) -> bool;

    /// How long the upstream (or the broker's own limit) asked to wait.
    fn retry_after(&self) -> Option<Duration>;

    /// The error of an attempt cut at the end of the call's budget.
    fn timed_out() -> Self;

    /// The error of a call whose time is up before it is admitted, or `None`
    /// to admit it all the same (a slot that is free at once still lets the
    /// attempt start).
    fn deadline_passed() -> Option<Self>;

    /// The error of a call the broker's own `limit` refused, asking to wait
    /// `retry_after`; says so in the upstream's own log line and metric.
    fn refused(limit: OwnLimit, retry_after: Duration) -> Self;

    /// Told before a call sleeps `wait` for a rate-limit slot (a metric).
    fn waiting_for_slot(_wait: Duration) {}

    /// Told before the call `label` sleeps `wait` to retry after this
    /// failure of attempt `attempt` (a log line, a metric).
    fn retrying(&self, label: Self::Label<'_>, attempt: u32, wait: Duration);
}

/// The broker's limits towards one upstream: a rate limit (governor, and a
/// shared budget first where there is one), a bound on calls in flight, and
/// retries of transient failures within the caller's deadline and a budget
/// for the whole call. Written once for Auth0 ([`Outbound`]) and the IdPs
/// (`idp::gate`); each upstream has its own instances.
pub(crate) struct Upstream<E> {
    /// This broker's own limit: the only one alone, the fallback in a fleet.
    limiter: DefaultDirectRateLimiter,
    /// The fleet's budget, asked before `limiter` when set.
    shared: Option<Arc<dyn SharedBudget>>,
    in_flight: Semaphore,
    limits: OutboundLimits,
    /// How long one call may take, attempts and waits included.
    call_timeout: Duration,
    /// Whose errors the calls give (`fn() -> E`: the gate holds no `E`, so
    /// it is `Send` and `Sync` whatever `E` is).
    errors: PhantomData<fn() -> E>,
}

/// The gate every Auth0 request passes.
pub(crate) type Outbound = Upstream<Auth0Error>;

impl<E: UpstreamError> Upstream<E> {
    /// A gate with these limits, where one call gives up after `call_timeout`
    /// (`--auth0-timeout` for Auth0) whatever the caller's deadline.
    pub(crate) fn new(limits: OutboundLimits, call_timeout: Duration) -> Self {
        let quota = Quota::per_second(limits.rate_per_second).allow_burst(limits.burst);
        Self {
            limiter: RateLimiter::direct(quota),
            shared: None,
            in_flight: Semaphore::new(limits.max_in_flight.max(1)),
            limits,
            call_timeout,
            errors: PhantomData,
        }
    }

    /// A new gate with the same limits, call timeout and shared budget (its
    /// own limiter and in-flight bound start afresh).
    pub(crate) fn same_limits(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            ..Self::new(self.limits, self.call_timeout)
        }
    }

    /// The same gate, asking `shared` for each request's slot first (the
    /// fleet's one budget), and its own limiter only when `shared` is
    /// unavailable.
    pub(crate) fn with_shared_budget(mut self, shared: Arc<dyn SharedBudget>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Runs `attempt` within the limits, retrying transient failures, for at
    /// most the call timeout in all. Gives up at once when the next wait would
    /// pass `deadline` or the end of that budget; an attempt still running at
    /// the end of the budget is dropped and the call fails with
    /// [`UpstreamError::timed_out`].
    ///
    /// An attempt is not cut at the caller's `deadline`: the service answers
    /// DEADLINE_EXCEEDED then and drops this future, and cutting it here at
    /// the same instant would race that answer with an UNAVAILABLE.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        label: E::Label<'_>,
        deadline: Option<Instant>,
        mut attempt: F,
    ) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let budget_end = Instant::now() + self.call_timeout;
        let give_up_at = deadline.map_or(budget_end, |deadline| deadline.min(budget_end));
        let mut attempts = 0;
        loop {
            attempts += 1;
            let permit = self.admit(deadline, budget_end).await?;
            let error = match tokio::time::timeout_at(budget_end, attempt()).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(error)) => error,
                Err(_) => E::timed_out(),
            };
            drop(permit);
            let Some(wait) = self.retry_wait(&error, attempts, give_up_at) else {
                return Err(error);
            };
            error.retrying(label, attempts, wait);
            tokio::time::sleep(wait).await;
        }
    }

    /// How long to wait before the next attempt, or `None` to give up: the
    /// failure is not transient, the attempts are spent, or the wait is longer
    /// than the broker sits out or would end at or past `give_up_at`.
    fn retry_wait(&self, error: &E, attempts: u32, give_up_at: Instant) -> Option<Duration> {
        if !error.is_transient() || attempts >= self.limits.max_attempts {
            return None;
        }
        let wait = error.retry_after().unwrap_or_else(|| backoff(attempts));
        let in_time = Instant::now() + wait < give_up_at;
        (wait <= self.limits.max_wait && in_time).then_some(wait)
    }

    /// A rate-limit slot and an in-flight permit, or the upstream's "own
    /// limit" error when neither comes in the time [`UpstreamError::SLOT_WAIT`]
    /// allows.
    async fn admit(
        &self,
        deadline: Option<Instant>,
        budget_end: Instant,
    ) -> Result<SemaphorePermit<'_>, E> {
        let give_up_at = match E::SLOT_WAIT {
            SlotWait::UntilDeadline => deadline
                .unwrap_or_else(|| Instant::now() + self.limits.max_wait)
                .min(budget_end),
            SlotWait::AtMostMaxWait => deadline
                .map_or(budget_end, |deadline| deadline.min(budget_end))
                .min(Instant::now() + self.limits.max_wait),
        };
        if Instant::now() >= give_up_at {
            if let Some(error) = E::deadline_passed() {
                return Err(error);
            }
        }
        let shared_said = match &self.shared {
            Some(shared) => Self::admit_shared(shared.as_ref(), give_up_at).await?,
            None => SharedAdmission::Unavailable,
        };
        if shared_said == SharedAdmission::Unavailable {
            self.admit_local(give_up_at).await?;
        }
        match tokio::time::timeout_at(give_up_at, self.in_flight.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(E::refused(OwnLimit::InFlight, IN_FLIGHT_RETRY_AFTER)),
        }
    }

    /// A slot of the fleet's budget, waiting for it while the wait ends
    /// before `give_up_at`; [`SharedAdmission::Unavailable`] when the budget
    /// cannot be asked (the local limiter then decides).
    async fn admit_shared(
        shared: &dyn SharedBudget,
        give_up_at: Instant,
    ) -> Result<SharedAdmission, E> {
        loop {
            match shared.admit().await {
                SharedAdmission::Wait(wait) => Self::wait_or_refuse(wait, give_up_at).await?,
                decided => return Ok(decided),
            }
        }
    }

    /// A slot of this broker's own limiter, waiting for it while the wait
    /// ends before `give_up_at`.
    async fn admit_local(&self, give_up_at: Instant) -> Result<(), E> {
        while let Err(not_until) = self.limiter.check() {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Self::wait_or_refuse(wait, give_up_at).await?;
        }
        Ok(())
    }

    /// Sleeps `wait`, or refuses at once when the wait would end at or after
    /// `give_up_at`.
    async fn wait_or_refuse(wait: Duration, give_up_at: Instant) -> Result<(), E> {
        if Instant::now() + wait >= give_up_at {
            return Err(E::refused(OwnLimit::Rate, wait));
        }
        E::waiting_for_slot(wait);
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

/// Auth0's side of the shared loop: its errors, its metrics and log lines.
impl UpstreamError for Auth0Error {
    type Label<'a> = &'static str;

    /// A caller with a later deadline may wait for Auth0's quota past
    /// `max_wait`, and a call already past its deadline still takes a free
    /// slot (the service's DEADLINE_EXCEEDED answers the caller).
    const SLOT_WAIT: SlotWait = SlotWait::UntilDeadline;

    fn is_transient(&self) -> bool {
        Auth0Error::is_transient(self)
    }

    fn retry_after(&self) -> Option<Duration> {
        Auth0Error::retry_after(self)
    }

    fn timed_out() -> Self {
        Auth0Error::Timeout
    }

    fn deadline_passed() -> Option<Self> {
        None
    }

    /// THROTTLED; a refusal by the rate limit is counted and logged, one by
    /// the in-flight bound is not.
    fn refused(limit: OwnLimit, retry_after: Duration) -> Self {
        if limit == OwnLimit::Rate {
            stats::ratelimit_rejection();
            tracing::warn!(
                wait_ms = retry_after.as_millis() as u64,
                "Auth0 request refused: client-side rate limit"
            );
        }
        Auth0Error::Throttled { retry_after }
    }

    fn waiting_for_slot(_wait: Duration) {
        stats::ratelimit_wait();
    }

    fn retrying(&self, endpoint: &'static str, attempt: u32, wait: Duration) {
        stats::auth0_retry(endpoint);
        tracing::warn!(error = %self, endpoint, attempt, retry_in_ms = wait.as_millis() as u64, "retrying Auth0");
    }
}

/// Exponential backoff from 250 ms with jitter (50–100 % of the step), so
/// many replicas do not retry in lockstep.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let step = BACKOFF_BASE * 2u32.saturating_pow(attempt.saturating_sub(1));
    step.mul_f64(rand::rng().random_range(0.5..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn limits(max_attempts: u32) -> OutboundLimits {
        OutboundLimits {
            max_attempts,
            ..OutboundLimits::default()
        }
    }

    /// A gate with `max_attempts` and a call timeout longer than any test here.
    fn outbound(max_attempts: u32) -> Outbound {
        Outbound::new(limits(max_attempts), Duration::from_secs(60))
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_with_the_delay_auth0_asked_for() {
        let outbound = outbound(3);
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let result = outbound
            .call("test", None, || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 => Err(Auth0Error::RateLimited {
                        retry_after: Some(Duration::from_secs(2)),
                    }),
                    _ => Ok("ok"),
                }
            })
            .await;
        assert_eq!(result.unwrap(), "ok");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(started.elapsed() >= Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_attempts_then_the_last_error() {
        let outbound = outbound(3);
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = outbound
            .call("test", None, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Auth0Error::ServerError {
                    status: 503,
                    retry_after: None,
                })
            })
            .await;
        assert!(matches!(
            result,
            Err(Auth0Error::ServerError { status: 503, .. })
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_when_the_wait_would_pass_the_deadline() {
        let outbound = outbound(3);
        let calls = AtomicU32::new(0);
        let deadline = Instant::now() + Duration::from_secs(1);
        let result: Result<(), _> = outbound
            .call("test", Some(deadline), || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Auth0Error::RateLimited {
                    retry_after: Some(Duration::from_secs(5)),
                })
            })
            .await;
        assert!(matches!(result, Err(Auth0Error::RateLimited { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn client_errors_are_not_retried() {
        let outbound = outbound(3);
        let calls = AtomicU32::new(0);
        let _ = outbound
            .call("test", None, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Auth0Error::UserNotFound)
            })
            .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_auth0_is_given_up_on_after_the_call_timeout_without_a_deadline() {
        let outbound = Outbound::new(limits(3), Duration::from_secs(1));
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let result: Result<(), _> = outbound
            .call("test", None, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                std::future::pending().await
            })
            .await;
        assert!(matches!(result, Err(Auth0Error::Timeout)), "{result:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no attempt past the budget"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_and_backoff_together_stay_within_the_call_timeout() {
        let outbound = Outbound::new(limits(5), Duration::from_secs(1));
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let result: Result<(), _> = outbound
            .call("test", None, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(400)).await;
                Err(Auth0Error::ServerError {
                    status: 503,
                    retry_after: None,
                })
            })
            .await;
        assert!(result.is_err());
        assert!(
            started.elapsed() <= Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(calls.load(Ordering::SeqCst) <= 2, "{calls:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn no_wait_is_started_that_would_pass_the_call_timeout() {
        let outbound = Outbound::new(limits(3), Duration::from_secs(3));
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let result: Result<(), _> = outbound
            .call("test", None, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Auth0Error::RateLimited {
                    retry_after: Some(Duration::from_secs(5)),
                })
            })
            .await;
        assert!(matches!(result, Err(Auth0Error::RateLimited { .. })));
        assert_eq!(started.elapsed(), Duration::ZERO, "gave up at once");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// A shared budget that answers from a script, then "go".
    struct ScriptedBudget {
        answers: std::sync::Mutex<Vec<SharedAdmission>>,
        asked: AtomicU32,
    }

    impl SharedBudget for ScriptedBudget {
        fn admit(&self) -> BoxFuture<'_, SharedAdmission> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            let next = self.answers.lock().unwrap().pop();
            Box::pin(async move { next.unwrap_or(SharedAdmission::Go) })
        }
    }

    fn scripted(mut answers: Vec<SharedAdmission>) -> Arc<ScriptedBudget> {
        answers.reverse();
        Arc::new(ScriptedBudget {
            answers: std::sync::Mutex::new(answers),
            asked: AtomicU32::new(0),
        })
    }

    fn tight_limits() -> OutboundLimits {
        OutboundLimits {
            rate_per_second: NonZeroU32::new(1).unwrap(),
            burst: NonZeroU32::new(1).unwrap(),
            ..limits(1)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_budget_decides_instead_of_the_local_limiter() {
        let budget = scripted(vec![SharedAdmission::Wait(Duration::from_millis(300))]);
        let outbound = Outbound::new(tight_limits(), Duration::from_secs(60))
            .with_shared_budget(budget.clone());
        let started = Instant::now();
        for _ in 0..3 {
            outbound
                .call("test", None, || async { Ok::<_, Auth0Error>(()) })
                .await
                .unwrap();
        }
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(300),
            "one shared wait, no local one"
        );
        assert_eq!(budget.asked.load(Ordering::SeqCst), 4);
    }

    /// Real time: governor's clock is not tokio's paused one.
    #[tokio::test]
    async fn an_unavailable_shared_budget_falls_back_to_the_local_limiter() {
        let budget = scripted(vec![SharedAdmission::Unavailable; 2]);
        let limits = OutboundLimits {
            rate_per_second: NonZeroU32::new(10).unwrap(),
            ..tight_limits()
        };
        let outbound = Outbound::new(limits, Duration::from_secs(60)).with_shared_budget(budget);
        let started = Instant::now();
        for _ in 0..2 {
            outbound
                .call("test", None, || async { Ok::<_, Auth0Error>(()) })
                .await
                .unwrap();
        }
        assert!(
            started.elapsed() >= Duration::from_millis(90),
            "the local limit of 10/s, burst 1, held: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_wait_past_the_deadline_is_refused_at_once() {
        let budget = scripted(vec![SharedAdmission::Wait(Duration::from_secs(5))]);
        let outbound =
            Outbound::new(tight_limits(), Duration::from_secs(60)).with_shared_budget(budget);
        let deadline = Instant::now() + Duration::from_secs(1);
        let result = outbound
            .call("test", Some(deadline), || async { Ok::<_, Auth0Error>(()) })
            .await;
        assert!(
            matches!(result, Err(Auth0Error::Throttled { .. })),
            "{result:?}"
        );
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
