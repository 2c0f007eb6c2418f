//! Why an ID token was refused, named after the failed check, and whose fault it is.

use std::time::Duration;

/// Longest header value (`alg`, `kid`) repeated in an error message.
const MAX_ECHOED_LEN: usize = 64;

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
    pub(super) fn jwks_unavailable(reason: impl Into<String>) -> Self {
        Self::JwksUnavailable {
            reason: reason.into(),
            retry_after: None,
        }
    }
}

/// A header value fit for an error message: printable ASCII only, and short.
pub(super) fn echo(value: &str) -> String {
    value
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_ECHOED_LEN)
        .collect()
}
