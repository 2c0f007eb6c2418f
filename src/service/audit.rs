//! The audit events (target `audit`): one per RPC, release or refusal, with
//! the metrics that count them.
//!
//! Every caller-supplied value (user id, provider, connection, the caller id
//! itself) is recorded as a string field, capped by [`capped`]: the text
//! format writes it Debug-quoted and the JSON format as a JSON string, so no
//! value can end the line or pose as another field, and none is longer than
//! 512 bytes. Reasons are recorded the same way.

use std::borrow::Cow;
use std::time::Duration;

use crate::error::BrokerError;
use crate::logsafe::capped;
use crate::proto::IdpToken;
use crate::stats;

/// Who asked what, as every audit event of an RPC names it.
pub struct Subject<'a> {
    pub caller: &'a str,
    pub method: &'static str,
    /// The user the tokens were for: the verified ID token's subject when
    /// there was one, else the `user_id` the caller sent.
    pub user_id: &'a str,
    pub bound_to_id_token: bool,
    pub requested: Wanted<'a>,
}

/// What an RPC asked for, as its audit event names it.
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

impl Wanted<'_> {
    /// The request's choice in a few words; caller-supplied names capped.
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
}

/// The providers of released tokens, comma-separated (providers only,
/// never tokens). Written straight into the event.
struct Providers<'a>(&'a [IdpToken]);

impl std::fmt::Display for Providers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, token) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(&token.provider)?;
        }
        Ok(())
    }
}

/// Tokens were released. The text of the fields is only made when the
/// event is recorded: without a subscriber a release allocates nothing here.
pub fn released(subject: &Subject<'_>, tokens: &[IdpToken], latency: Duration) {
    stats::rpc_finished(subject.method, tonic::Code::Ok, latency);
    tracing::info!(
        target: "audit",
        caller = &*capped(subject.caller),
        method = subject.method,
        user_id = &*capped(subject.user_id),
        bound_to_id_token = subject.bound_to_id_token,
        requested = &*subject.requested.describe(),
        released = %Providers(tokens),
        from_cache = tokens.first().is_some_and(|token| token.from_cache),
        outcome = "released",
        code = "OK",
        latency_ms = millis(latency),
    );
}

/// A user's cached tokens were dropped on request.
pub fn invalidated(subject: &Subject<'_>, latency: Duration) {
    stats::rpc_finished(subject.method, tonic::Code::Ok, latency);
    tracing::info!(
        target: "audit",
        caller = &*capped(subject.caller),
        method = subject.method,
        user_id = &*capped(subject.user_id),
        outcome = "invalidated",
        code = "OK",
        latency_ms = millis(latency),
    );
}

/// The RPC was refused; an error an operator must act on is logged as an error.
pub fn refused(subject: &Subject<'_>, error: &BrokerError, latency: Duration) {
    stats::rpc_finished(subject.method, error.code(), latency);
    stats::rpc_refused(subject.method, error.reason());
    let code = stats::code_name(error.code());
    let message = error.to_string();
    let caller = capped(subject.caller);
    let user_id = capped(subject.user_id);
    let requested = subject.requested.describe();
    let message = capped(&message);
    if error.needs_operator() {
        tracing::error!(target: "audit", caller = &*caller, method = subject.method, user_id = &*user_id, bound_to_id_token = subject.bound_to_id_token, requested = &*requested, outcome = "refused", code, reason = error.reason(), detail = &*message, latency_ms = millis(latency));
    } else {
        tracing::info!(target: "audit", caller = &*caller, method = subject.method, user_id = &*user_id, bound_to_id_token = subject.bound_to_id_token, requested = &*requested, outcome = "refused", code, reason = error.reason(), detail = &*message, latency_ms = millis(latency));
    }
}

fn millis(latency: Duration) -> u64 {
    u64::try_from(latency.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_names_what_was_asked_for_and_released() {
        let one = |provider, connection| Wanted::One {
            provider,
            connection,
        };
        assert_eq!(one("", "").describe(), "first");
        assert_eq!(one("github", "").describe(), "github");
        assert_eq!(one("", "corp").describe(), "connection:corp");
        assert_eq!(one("github", "corp").describe(), "github/corp");
        assert_eq!(Wanted::All.describe(), "all");
        let token = |provider: &str| IdpToken {
            provider: provider.to_owned(),
            ..Default::default()
        };
        assert_eq!(Providers(&[]).to_string(), "");
        assert_eq!(
            Providers(&[token("github"), token("google-oauth2")]).to_string(),
            "github,google-oauth2"
        );
    }

    #[test]
    fn a_huge_provider_is_cut_in_the_audit() {
        let provider = "p".repeat(1_000_000);
        let described = Wanted::One {
            provider: &provider,
            connection: "",
        }
        .describe();
        assert!(described.len() < 600, "{}", described.len());
    }
}
