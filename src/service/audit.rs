//! The audit line of every RPC (see [`crate::audit`]), the metrics that count
//! it, and the diagnostics an operator needs about it.
//!
//! No token leaves before its line is written: [`released`] returns once
//! the line is written, or once the connection's [`ReleaseGate`] holds the
//! answer until it is; it fails with AUDIT_UNAVAILABLE when the line cannot
//! be written, and the handler returns that instead of the token. Refusals
//! release nothing, so their lines are handed over without waiting.
//!
//! Every caller-supplied value (user id, provider, connection, the caller id
//! itself) is capped at 512 bytes and escaped: in the audit line by JSON, in
//! diagnostics by being a string field (never `%` Display).

use std::borrow::Cow;
use std::time::Duration;

use crate::audit::{AuditTrail, Record, ReleaseGate, Released};
use crate::error::BrokerError;
use crate::logsafe::capped;
use crate::proto::{IdpToken, TokenSource};
use crate::stats;

/// Who asked what, as every audit line of an RPC names it.
pub struct Subject<'a> {
    pub caller: &'a str,
    pub method: &'static str,
    /// The user the tokens were for: the verified ID token's subject when
    /// there was one, else the `user_id` the caller sent.
    pub user_id: &'a str,
    pub bound_to_id_token: bool,
    pub requested: Wanted<'a>,
}

/// What an RPC asked for.
#[derive(Clone, Copy)]
pub enum Wanted<'a> {
    /// GetIdpToken's choice of identity; both empty means the first with a token.
    One {
        provider: &'a str,
        connection: &'a str,
    },
    /// ListIdpTokens: every identity with a token.
    All,
    /// InvalidateUser: nothing is released.
    Nothing,
}

impl<'a> Wanted<'a> {
    /// The request's choice in a few words, for diagnostics; caller-supplied
    /// names capped.
    pub fn describe(self) -> Cow<'static, str> {
        match self {
            Self::One {
                provider,
                connection,
            } => match (provider.is_empty(), connection.is_empty()) {
                (true, true) => Cow::Borrowed("first"),
                (false, true) => Cow::Owned(capped(provider).into_owned()),
                (true, false) => Cow::Owned(format!("connection:{}", capped(connection))),
                (false, false) => {
                    Cow::Owned(format!("{}/{}", capped(provider), capped(connection)))
                }
            },
            Self::All => Cow::Borrowed("all"),
            Self::Nothing => Cow::Borrowed("-"),
        }
    }

    /// The provider and connection asked for; empty when any.
    fn provider_and_connection(self) -> (&'a str, &'a str) {
        match self {
            Self::One {
                provider,
                connection,
            } => (provider, connection),
            Self::All | Self::Nothing => ("", ""),
        }
    }
}

impl Subject<'_> {
    fn record<'a>(
        &'a self,
        outcome: &'static str,
        code: tonic::Code,
        refusal: Option<(&'static str, &'a str)>,
        latency: Duration,
    ) -> Record<'a> {
        let (provider, connection) = self.requested.provider_and_connection();
        Record {
            caller: self.caller,
            method: self.method,
            user_id: self.user_id,
            bound_to_id_token: self.bound_to_id_token,
            provider,
            connection,
            outcome,
            code: stats::code_name(code),
            reason: refusal.map(|(reason, _)| reason),
            detail: refusal.map(|(_, detail)| detail),
            latency,
        }
    }
}

/// Tokens are about to be released: writes the line, and returns once it
/// is written or `gate` holds the connection until it is.
/// `Err(AuditUnavailable)` means the tokens must not be returned.
pub async fn released(
    trail: &AuditTrail,
    subject: &Subject<'_>,
    tokens: &[IdpToken],
    latency: Duration,
    gate: Option<&ReleaseGate>,
) -> Result<(), BrokerError> {
    if trail.sink.is_on() {
        let released: Vec<Released<'_>> = tokens.iter().map(released_token).collect();
        let record = subject.record("released", tonic::Code::Ok, None, latency);
        if let Err(error) = trail.write(&record, &released, gate).await {
            tracing::error!(%error, method = subject.method, "audit line not written: the release is refused");
            return Err(BrokerError::AuditUnavailable);
        }
    }
    stats::rpc_finished(subject.method, tonic::Code::Ok, latency);
    tracing::debug!(
        target: "rpc",
        caller = &*capped(subject.caller),
        method = subject.method,
        user_id = &*capped(subject.user_id),
        requested = &*subject.requested.describe(),
        tokens = tokens.len(),
        from_cache = tokens.first().is_some_and(|token| token.from_cache),
        latency_ms = millis(latency),
        "released",
    );
    Ok(())
}

/// Where a released token comes from, as the audit line says it: the
/// `TokenSource` name without its prefix.
fn source_label(source: TokenSource) -> &'static str {
    match source {
        TokenSource::Auth0Profile => "AUTH0_PROFILE",
        TokenSource::IdpRefresh => "IDP_REFRESH",
        TokenSource::TokenVault => "TOKEN_VAULT",
        TokenSource::Unspecified => "UNSPECIFIED",
    }
}

fn released_token(token: &IdpToken) -> Released<'_> {
    Released {
        provider: &token.provider,
        connection: &token.connection,
        source: source_label(token.source()),
        from_cache: token.from_cache,
        access_token: &token.access_token,
    }
}

/// A user's cached tokens were dropped on request.
pub async fn invalidated(trail: &AuditTrail, subject: &Subject<'_>, latency: Duration) {
    stats::rpc_finished(subject.method, tonic::Code::Ok, latency);
    if trail.sink.is_on() {
        let record = subject.record("invalidated", tonic::Code::Ok, None, latency);
        trail.sink.write_detached(record.to_line(&[], None)).await;
    }
}

/// The RPC was refused. Counted, its line handed to the audit, and logged
/// as an error when an operator must act.
pub async fn refused(
    trail: &AuditTrail,
    subject: &Subject<'_>,
    error: &BrokerError,
    latency: Duration,
) {
    count_and_log_refusal(subject, error, latency);
    if trail.sink.is_on() {
        let line = refusal_line(subject, error, latency);
        trail.sink.write_detached(line).await;
    }
}

/// [`refused`] where nothing can wait (a poll function): a full audit queue
/// drops the line, counted and logged.
pub fn refused_now(
    trail: &AuditTrail,
    subject: &Subject<'_>,
    error: &BrokerError,
    latency: Duration,
) {
    count_and_log_refusal(subject, error, latency);
    if trail.sink.is_on() {
        trail
            .sink
            .try_write_detached(refusal_line(subject, error, latency));
    }
}

fn refusal_line(subject: &Subject<'_>, error: &BrokerError, latency: Duration) -> Vec<u8> {
    let detail = error.to_string();
    subject
        .record(
            "refused",
            error.code(),
            Some((error.reason(), &detail)),
            latency,
        )
        .to_line(&[], None)
}

fn count_and_log_refusal(subject: &Subject<'_>, error: &BrokerError, latency: Duration) {
    stats::rpc_finished(subject.method, error.code(), latency);
    stats::rpc_refused(subject.method, error.reason());
    if error.needs_operator() {
        let detail = error.to_string();
        tracing::error!(
            method = subject.method,
            caller = &*capped(subject.caller),
            reason = error.reason(),
            detail = &*capped(&detail),
            "refused: an operator must act"
        );
    } else {
        tracing::debug!(
            target: "rpc",
            caller = &*capped(subject.caller),
            method = subject.method,
            user_id = &*capped(subject.user_id),
            requested = &*subject.requested.describe(),
            reason = error.reason(),
            latency_ms = millis(latency),
            "refused",
        );
    }
}

fn millis(latency: Duration) -> u64 {
    u64::try_from(latency.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_names_what_was_asked_for() {
        let one = |provider, connection| Wanted::One {
            provider,
            connection,
        };
        assert_eq!(one("", "").describe(), "first");
        assert_eq!(one("github", "").describe(), "github");
        assert_eq!(one("", "corp").describe(), "connection:corp");
        assert_eq!(one("github", "corp").describe(), "github/corp");
        assert_eq!(Wanted::All.describe(), "all");
    }

    #[test]
    fn a_huge_provider_is_cut_in_the_diagnostics() {
        let provider = "p".repeat(1_000_000);
        let described = Wanted::One {
            provider: &provider,
            connection: "",
        }
        .describe();
        assert!(described.len() < 600, "{}", described.len());
    }
}
