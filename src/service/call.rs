//! What every RPC knows about itself: who called (from the connection's
//! certificate), the caller's deadline and when the RPC started; and the
//! arithmetic that makes the broker give up just before the caller does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Request;

use super::audit::{Subject, Wanted};
use super::{IdTokenBinding, UNREADABLE_CALLER};
use crate::audit::ReleaseGate;
use crate::caller::UnreadableCaller;
use crate::error::BrokerError;
use crate::policy::{CallerRule, PolicyStore};
use crate::shutdown::Drain;
use crate::tls;

/// How much earlier than the caller's deadline the broker gives up, so the
/// caller gets DEADLINE_EXCEEDED from us rather than its own transport's
/// CANCELLED: a tenth of the deadline, between 5 and 100 ms, at most half.
/// The caller's clock started before the request was sent, ours after it
/// arrived, and the answer still has to travel back.
fn deadline_headroom(deadline: Duration) -> Duration {
    (deadline / 10)
        .clamp(Duration::from_millis(5), Duration::from_millis(100))
        .min(deadline / 2)
}

/// What every RPC knows about itself, for deadlines and log lines.
pub(super) struct CallContext {
    pub(super) method: &'static str,
    /// The caller id the listener read from the verified certificate when
    /// the connection was made, or why there is none.
    caller: Result<Arc<str>, UnreadableCaller>,
    /// Holds the connection's bytes until the audit lines of its releases
    /// are written; `None` for a request that came some other way, whose
    /// release then waits for its line.
    release_gate: Option<Arc<ReleaseGate>>,
    deadline: Option<Duration>,
    pub(super) started: Instant,
}

impl CallContext {
    /// Takes the connection's [`tls::Peer`] out of the request: taken, not
    /// cloned, since nothing else reads it and each clone of the id is an
    /// atomic increment on a count all of the connection's requests share.
    pub(super) fn of<T>(method: &'static str, request: &mut Request<T>) -> Self {
        let (caller, release_gate) = match request.extensions_mut().remove::<tls::Peer>() {
            Some(peer) => (peer.caller, Some(peer.release_gate)),
            None => (Err(UnreadableCaller::NoCertificate), None),
        };
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout);
        Self {
            method,
            caller,
            release_gate,
            deadline,
            started: Instant::now(),
        }
    }

    /// When calls to Auth0 made for this RPC must have given up.
    pub(super) fn auth0_deadline(&self) -> Option<tokio::time::Instant> {
        self.deadline.map(|deadline| {
            tokio::time::Instant::from_std(self.started)
                + deadline.saturating_sub(deadline_headroom(deadline))
        })
    }

    /// Runs `work`, giving up with DEADLINE_EXCEEDED just before the caller
    /// would, or with UNAVAILABLE when the shutdown grace period ends. Work
    /// that is ready at once (a cache hit) returns before any timer is armed.
    /// `work` is pinned by the caller: taken by value, the RPC's future would
    /// hold it twice (the argument and its pinned copy).
    pub(super) async fn bounded<T>(
        &self,
        drain: &Drain,
        mut work: Pin<&mut impl Future<Output = Result<T, BrokerError>>>,
    ) -> Result<T, BrokerError> {
        if let std::task::Poll::Ready(result) = futures::poll!(work.as_mut()) {
            return result;
        }
        // Boxed: only work that waits (a cache miss) needs the timers, and
        // inline they would push every RPC's boxed future past 1 KiB, where
        // glibc's malloc leaves its per-thread cache and consolidates.
        Box::pin(self.race(drain, work)).await
    }

    /// `work` against the caller's deadline and the end of the grace period.
    async fn race<T>(
        &self,
        drain: &Drain,
        work: Pin<&mut impl Future<Output = Result<T, BrokerError>>>,
    ) -> Result<T, BrokerError> {
        let deadline = async {
            match self.deadline {
                Some(deadline) => {
                    tokio::time::sleep(deadline.saturating_sub(deadline_headroom(deadline))).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = work => result,
            () = deadline => Err(BrokerError::DeadlineExceeded),
            () = drain.grace_over() => Err(BrokerError::ShuttingDown),
        }
    }

    /// What a release of this RPC needs of a token: to live `min_valid_for`,
    /// with IdP and Auth0 calls given up before the caller's deadline, and
    /// paid from `share`.
    pub(super) fn need<'a>(
        &self,
        min_valid_for: Duration,
        share: crate::budget::CallerShare<'a>,
    ) -> super::fresh::Need<'a> {
        super::fresh::Need {
            min_valid_for,
            deadline: self.auth0_deadline(),
            started: std::time::SystemTime::now() - self.started.elapsed(),
            share,
        }
    }

    /// The caller's rule: CALLER_UNKNOWN when the certificate names nobody
    /// (never a fallback name) or the policy does not list it.
    pub(super) fn rule(&self, policy: &PolicyStore) -> Result<CallerRule, BrokerError> {
        match &self.caller {
            Ok(caller) => policy.current().rule_for(caller),
            Err(unreadable) => Err(BrokerError::CallerUnknown(format!(
                "{unreadable}, so the connection has no caller id; ask the operator of the client CA for a certificate with one valid URI SAN, DNS SAN or CN"
            ))),
        }
    }

    /// The gate of the connection the request came on, if any.
    pub(super) fn release_gate(&self) -> Option<&ReleaseGate> {
        self.release_gate.as_deref()
    }

    /// The caller as the audit names it.
    pub(super) fn caller_name(&self) -> &str {
        self.caller.as_deref().unwrap_or(UNREADABLE_CALLER)
    }

    /// The audit's subject for `user_id`, `binding` and `requested`.
    pub(super) fn subject<'a>(
        &'a self,
        claimed_user_id: &'a str,
        binding: &'a IdTokenBinding,
        requested: Wanted<'a>,
    ) -> Subject<'a> {
        Subject {
            caller: self.caller_name(),
            method: self.method,
            user_id: binding.sub.as_deref().unwrap_or(claimed_user_id),
            bound_to_id_token: binding.sub.is_some(),
            requested,
        }
    }
}

/// Parses gRPC's `grpc-timeout` header: up to 8 digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    match unit {
        "H" => Some(Duration::from_secs(amount * 3600)),
        "M" => Some(Duration::from_secs(amount * 60)),
        "S" => Some(Duration::from_secs(amount)),
        "m" => Some(Duration::from_millis(amount)),
        "u" => Some(Duration::from_micros(amount)),
        "n" => Some(Duration::from_nanos(amount)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headroom_is_a_tenth_of_the_deadline_within_bounds() {
        assert_eq!(
            deadline_headroom(Duration::from_millis(300)),
            Duration::from_millis(30)
        );
        assert_eq!(
            deadline_headroom(Duration::from_secs(20)),
            Duration::from_millis(100)
        );
        assert_eq!(
            deadline_headroom(Duration::from_millis(20)),
            Duration::from_millis(5)
        );
        assert_eq!(
            deadline_headroom(Duration::from_millis(4)),
            Duration::from_millis(2)
        );
    }

    #[test]
    fn grpc_timeout_units_are_parsed() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("100u"), Some(Duration::from_micros(100)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }
}
