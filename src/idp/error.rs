//! How refreshing at an IdP can fail, typed by what should happen next: the user
//! reconnects, the operator fixes the connection's settings, or someone tries
//! again later. No message holds a token, a refresh token, the client secret or
//! text the IdP chose, so each can go to a log line or a caller as it is.

use std::time::Duration;

/// A refresh that gave no token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdpError {
    /// The IdP refused the refresh token (`invalid_grant`): expired, revoked or
    /// rotated away. Only the user can mend it, by connecting the account again.
    #[error("the IdP refused the user's refresh token (invalid_grant): the user must connect the account again")]
    InvalidGrant,
    /// The IdP refused the broker's OAuth client (401, `invalid_client`,
    /// `unauthorized_client`) or the request itself (another 4xx, a redirect):
    /// the connection's settings are wrong, for every user alike.
    #[error("the IdP refused the broker's client (HTTP {status} {code}): check the connection's token_url, client_id and client_secret_file")]
    ClientRejected {
        /// The HTTP status the IdP answered.
        status: u16,
        /// The IdP's `error` code, reduced to letters, digits and `_-.`.
        code: String,
    },
    /// No answer worth having: 5xx, 429, unreachable, too slow, a body over
    /// the cap, an unreadable token response, or the broker's own limit.
    /// Trying later may work.
    #[error("the IdP is unavailable: {reason}")]
    Unavailable {
        /// What went wrong, in the broker's words.
        reason: String,
        /// How long the IdP (or the broker's own limit) asked to wait.
        retry_after: Option<Duration>,
    },
}

impl IdpError {
    /// How long to wait before trying again, when the IdP or the limit said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after, .. } => *retry_after,
            Self::InvalidGrant | Self::ClientRejected { .. } => None,
        }
    }

    /// An [`IdpError::Unavailable`] with no wait to suggest.
    pub(crate) fn unavailable(reason: impl Into<String>) -> Self {
        Self::Unavailable {
            reason: reason.into(),
            retry_after: None,
        }
    }

    /// The outcome label of `tokenbroker_idp_refreshes_total`.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Self::InvalidGrant => "invalid_grant",
            Self::ClientRejected { .. } => "client_rejected",
            Self::Unavailable { .. } => "unavailable",
        }
    }
}

/// The refresher could not be built (its HTTP client).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client for IdP refreshes: {0}")]
pub struct IdpSetupError(pub(crate) String);
