//! How a call to Auth0 can fail, typed so the broker can decide what the
//! caller should do (retry, fix config, give up) without parsing strings.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::HeaderMap;
use serde::Deserialize;

use super::body::BodyError;
use super::keys::SignError;

/// A failed call to Auth0. Messages never contain a token or the client secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Auth0Error {
    #[error("Auth0 is unreachable: {0}")]
    Unreachable(String),
    #[error("Auth0 did not answer in time")]
    Timeout,
    #[error("Auth0 rate limit reached (HTTP 429)")]
    RateLimited { retry_after: Option<Duration> },
    #[error("Auth0 failed (HTTP {status})")]
    ServerError {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error(
        "Auth0 rejected the broker's client credentials (HTTP {status} {code}: {description})"
    )]
    CredentialsRejected {
        status: u16,
        code: String,
        description: String,
    },
    #[error("Auth0 rejected the Management API token (HTTP 401)")]
    ManagementTokenRejected,
    #[error("the Management API token lacks a scope: {message}")]
    InsufficientScope { message: String },
    #[error("Auth0 has no such user")]
    UserNotFound,
    #[error("Auth0 answered HTTP {status} ({code}): {message}")]
    Unexpected {
        status: u16,
        code: String,
        message: String,
    },
    #[error("Auth0 sent a body the broker cannot read: {0}")]
    InvalidBody(String),
    /// A body over the cap: a broken or hostile answer, never buffered whole.
    /// Not retried (another answer would likely be as large); the caller may
    /// retry later.
    #[error("Auth0 answered {endpoint} with a body larger than {limit} bytes; not read")]
    BodyTooLarge {
        endpoint: &'static str,
        limit: usize,
    },
    #[error("the broker's own Auth0 rate limit is exhausted")]
    Throttled { retry_after: Duration },
    /// The broker could not sign a client assertion or subject token.
    #[error(transparent)]
    Signing(#[from] SignError),
    /// A Token Vault exchange needs a key to sign its subject token, and
    /// none is configured.
    #[error("no key signs Token Vault subject tokens: set AUTH0_CLIENT_ASSERTION_KEY_FILE or AUTH0_TOKEN_VAULT_SUBJECT_KEY_FILE")]
    NoSubjectKey,
    /// Token Vault holds no usable token set for the user and connection:
    /// none was stored, or Auth0 could not refresh it at the IdP.
    #[error("Token Vault has no usable token for this user and connection ({code})")]
    NoTokenSet { code: String },
    /// Auth0 refused the broker's Token Vault exchange itself (client
    /// authentication, grant, Privileged Worker settings): an operator's problem.
    #[error(
        "Auth0 refused the broker's Token Vault exchange (HTTP {status} {code}: {description})"
    )]
    ExchangeRefused {
        status: u16,
        code: String,
        description: String,
    },
}

impl Auth0Error {
    /// Whether trying again later may succeed (429, 5xx, network, timeout).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. }
                | Self::ServerError { .. }
                | Self::Unreachable(_)
                | Self::Timeout
        )
    }

    /// How long Auth0 (or the broker's own limiter) asked us to wait.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } | Self::ServerError { retry_after, .. } => {
                *retry_after
            }
            Self::Throttled { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// Maps a transport failure, naming its causes (reqwest's own text says
    /// little) but not the request URL, which could hold a user id.
    pub fn from_transport(error: reqwest::Error) -> Self {
        if error.is_timeout() {
            return Self::Timeout;
        }
        Self::Unreachable(error_chain(&error.without_url()))
    }
}

/// The error and its causes, `: `-joined, as reqwest's top-level text says little.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    for _ in 0..8 {
        let Some(cause) = source else { break };
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl From<BodyError> for Auth0Error {
    fn from(error: BodyError) -> Self {
        match error {
            BodyError::TooLarge { endpoint, limit } => Self::BodyTooLarge { endpoint, limit },
            BodyError::Transport { source, .. } => Self::from_transport(source),
        }
    }
}

/// Auth0's error body. The Management API uses `statusCode/error/message/errorCode`;
/// `/oauth/token` uses `error/error_description`.
#[derive(Debug, Default, Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub error_description: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default, rename = "errorCode")]
    pub error_code: Option<String>,
}

impl ErrorBody {
    /// Parses leniently: a proxy's HTML error page must not hide the status.
    pub fn parse(bytes: &[u8]) -> Self {
        serde_json::from_slice(bytes).unwrap_or_default()
    }

    /// The most specific code Auth0 gave.
    pub fn code(&self) -> String {
        self.error_code
            .clone()
            .or_else(|| self.error.clone())
            .unwrap_or_else(|| "unknown".to_owned())
    }

    /// The human explanation Auth0 gave, bounded so a huge body cannot flood a log line.
    pub fn description(&self) -> String {
        let text = self
            .message
            .clone()
            .or_else(|| self.error_description.clone())
            .unwrap_or_default();
        // Control characters become spaces: this text reaches log lines.
        text.chars()
            .take(200)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    }
}

/// How long Auth0 asked us to wait: `Retry-After` (seconds) if present, else
/// until `x-ratelimit-reset` (epoch seconds).
pub fn retry_delay(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .and_then(|text| text.trim().parse::<u64>().ok())
    };
    if let Some(seconds) = header("retry-after") {
        return Some(Duration::from_secs(seconds));
    }
    let reset = header("x-ratelimit-reset")?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(reset.saturating_sub(now)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn an_oversized_body_is_not_retried() {
        let error = Auth0Error::BodyTooLarge {
            endpoint: "/api/v2/users",
            limit: 1024,
        };
        assert!(!error.is_transient());
    }

    #[test]
    fn retry_after_wins_over_ratelimit_reset() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("7"));
        headers.insert("x-ratelimit-reset", HeaderValue::from_static("1"));
        assert_eq!(retry_delay(&headers), Some(Duration::from_secs(7)));
    }

    #[test]
    fn ratelimit_reset_is_epoch_seconds() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-ratelimit-reset",
            HeaderValue::from_str(&(now + 30).to_string()).unwrap(),
        );
        let delay = retry_delay(&headers).unwrap();
        assert!(delay <= Duration::from_secs(30) && delay >= Duration::from_secs(28));
    }

    #[test]
    fn error_body_of_either_endpoint_yields_code_and_message() {
        let management = ErrorBody::parse(
            br#"{"statusCode":404,"error":"Not Found","message":"The user does not exist.","errorCode":"inexistent_user"}"#,
        );
        assert_eq!(management.code(), "inexistent_user");
        assert_eq!(management.description(), "The user does not exist.");
        let token =
            ErrorBody::parse(br#"{"error":"access_denied","error_description":"Unauthorized"}"#);
        assert_eq!(token.code(), "access_denied");
        assert_eq!(token.description(), "Unauthorized");
        assert_eq!(ErrorBody::parse(b"<html>").code(), "unknown");
    }
}
