//! One refresh-token request (RFC 6749 §6) to an IdP's token endpoint, and how
//! its answer is read: the body through `auth0::body::read_capped`, errors from
//! `{error, error_description}` (the description is never kept: it is the
//! IdP's text), the status deciding when the body cannot.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{IdpClient, IdpError, Refreshed};
use crate::auth0::body::{self, BodyError};
use crate::auth0::{retry_delay, ErrorBody};

/// Names the request in the body reader's log line.
const ENDPOINT: &str = "IdP token endpoint";
/// Longest `error` code kept from an IdP's answer.
const MAX_CODE_CHARS: usize = 64;

/// What the IdP gave for a refresh token.
#[derive(Debug)]
pub struct RefreshedToken {
    /// The new access token, its times and scopes.
    pub token: Refreshed,
    /// The refresh token to use from now on, when the IdP rotates them.
    pub rotated_refresh_token: Option<SecretString>,
}

/// How one attempt failed, and whether another attempt may go better.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) error: IdpError,
    pub(crate) retryable: bool,
}

impl Failure {
    fn transient(error: IdpError) -> Self {
        Self {
            error,
            retryable: true,
        }
    }

    fn settled(error: IdpError) -> Self {
        Self {
            error,
            retryable: false,
        }
    }

    /// The whole-call budget ran out while the IdP was being asked.
    pub(crate) fn timed_out() -> Self {
        Self::settled(IdpError::unavailable("the IdP did not answer in time"))
    }

    /// The request could not be sent or answered. reqwest's message loses the
    /// URL, which holds nothing secret anyway: the secrets travel in the body.
    fn transport(error: reqwest::Error) -> Self {
        let reason = if error.is_timeout() {
            "the IdP did not answer in time".to_owned()
        } else {
            format!("the IdP is unreachable: {}", error.without_url())
        };
        Self::transient(IdpError::unavailable(reason))
    }

    /// A 200 body that could not be read: a cut connection may go better next
    /// time, a body over the cap likely not.
    fn body(error: BodyError) -> Self {
        match error {
            BodyError::TooLarge { .. } => Self::settled(IdpError::unavailable(error.to_string())),
            BodyError::Transport { source, .. } => Self::transport(source),
        }
    }
}

#[derive(Serialize)]
struct RefreshForm<'a> {
    grant_type: &'static str,
    refresh_token: &'a str,
    client_id: &'a str,
    client_secret: &'a str,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: SecretString,
    expires_in: Seconds,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    refresh_token: Option<SecretString>,
}

/// `expires_in` as a number, or as the numeric string some IdPs send.
#[derive(Deserialize)]
#[serde(untagged)]
enum Seconds {
    Number(u64),
    Text(String),
}

/// The form body of a refresh: the one place the refresh token and the client
/// secret are exposed, to be sent and dropped.
pub(crate) fn form_body(
    client: &IdpClient,
    refresh_token: &SecretString,
) -> Result<String, IdpError> {
    let form = RefreshForm {
        grant_type: "refresh_token",
        refresh_token: refresh_token.expose_secret(),
        client_id: &client.client_id,
        client_secret: client.client_secret.expose_secret(),
    };
    serde_urlencoded::to_string(&form)
        .map_err(|_| IdpError::unavailable("cannot encode the refresh request"))
}

/// One attempt: posts `form` to the client's token endpoint and reads the answer.
pub(crate) async fn send(
    http: &reqwest::Client,
    client: &IdpClient,
    form: &str,
) -> Result<RefreshedToken, Failure> {
    let sent_at = SystemTime::now();
    let response = http
        .post(&client.token_url)
        .header(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        )
        .header(ACCEPT, HeaderValue::from_static("application/json"))
        .body(form.to_owned())
        .send()
        .await
        .map_err(Failure::transport)?;
    let status = response.status();
    if !status.is_success() {
        let headers = response.headers().clone();
        // The status decides; the body only names the error, so an oversized
        // or cut one must not hide a 503 or a 401.
        let bytes = body::read_capped(response, ENDPOINT, body::MAX_BODY_BYTES)
            .await
            .unwrap_or_default();
        return Err(refusal(status, &headers, &bytes));
    }
    let bytes = body::read_capped(response, ENDPOINT, body::MAX_BODY_BYTES)
        .await
        .map_err(Failure::body)?;
    token_from(&bytes, sent_at).map_err(Failure::settled)
}

/// The error an answer other than 2xx means.
fn refusal(status: StatusCode, headers: &HeaderMap, bytes: &[u8]) -> Failure {
    let code = clean_code(&ErrorBody::parse(bytes).code());
    let status_code = status.as_u16();
    if status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
    {
        return Failure::transient(IdpError::Unavailable {
            reason: format!("the IdP answered HTTP {status_code}"),
            retry_after: retry_delay(headers),
        });
    }
    if status == StatusCode::BAD_REQUEST && code == "invalid_grant" {
        return Failure::settled(IdpError::InvalidGrant);
    }
    // 401, invalid_client, unauthorized_client, a wrong URL (404, a redirect):
    // nothing a later attempt or another user changes.
    Failure::settled(IdpError::ClientRejected {
        status: status_code,
        code,
    })
}

/// The IdP's `error` code as a label: letters, digits and `_-.`, bounded, so
/// it can reach a log line and an error message.
fn clean_code(code: &str) -> String {
    let allowed = |c: &char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    code.chars().filter(allowed).take(MAX_CODE_CHARS).collect()
}

/// Reads a 200 token response sent at `sent_at`. serde's own message is not
/// kept: it can quote a value, which could be the token.
fn token_from(bytes: &[u8], sent_at: SystemTime) -> Result<RefreshedToken, IdpError> {
    let answer: TokenAnswer = serde_json::from_slice(bytes).map_err(|error| {
        IdpError::unavailable(format!(
            "the IdP's answer is not a token response ({:?} error at line {} column {})",
            error.classify(),
            error.line(),
            error.column()
        ))
    })?;
    if answer.access_token.expose_secret().is_empty() {
        return Err(IdpError::unavailable(
            "the IdP answered an empty access_token",
        ));
    }
    let lifetime = seconds(&answer.expires_in)
        .ok_or_else(|| IdpError::unavailable("the IdP's expires_in is not a number of seconds"))?;
    let expires_at = sent_at
        .checked_add(lifetime)
        .ok_or_else(|| IdpError::unavailable("the IdP's expires_in is out of range"))?;
    let scopes = answer
        .scope
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let rotated_refresh_token = answer
        .refresh_token
        .filter(|token| !token.expose_secret().is_empty());
    let token = Refreshed {
        access_token: answer.access_token,
        issued_at: sent_at,
        expires_at,
        scopes,
    };
    Ok(RefreshedToken {
        token,
        rotated_refresh_token,
    })
}

fn seconds(value: &Seconds) -> Option<Duration> {
    let seconds = match value {
        Seconds::Number(number) => *number,
        Seconds::Text(text) => text.trim().parse().ok()?,
    };
    Some(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(status: u16, body: &str) -> Failure {
        let status = StatusCode::from_u16(status).unwrap();
        refusal(status, &HeaderMap::new(), body.as_bytes())
    }

    #[test]
    fn a_token_response_gives_expiry_from_the_send_time_and_split_scopes() {
        let sent_at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        let body = br#"{"access_token":"ya29.new","expires_in":3599,"scope":"openid  email","token_type":"Bearer","refresh_token":"1//next"}"#;
        let refreshed = token_from(body, sent_at).unwrap();
        let token = &refreshed.token;
        assert_eq!(token.access_token.expose_secret(), "ya29.new");
        assert_eq!(token.issued_at, sent_at);
        assert_eq!(token.expires_at, sent_at + Duration::from_secs(3599));
        assert_eq!(token.scopes, ["openid", "email"]);
        let rotated = refreshed.rotated_refresh_token.unwrap();
        assert_eq!(rotated.expose_secret(), "1//next");
    }

    #[test]
    fn expires_in_may_be_a_string_and_scope_and_refresh_token_may_be_absent() {
        let sent_at = SystemTime::UNIX_EPOCH;
        let body = br#"{"access_token":"t","expires_in":"60","refresh_token":""}"#;
        let refreshed = token_from(body, sent_at).unwrap();
        assert_eq!(
            refreshed.token.expires_at,
            sent_at + Duration::from_secs(60)
        );
        assert!(refreshed.token.scopes.is_empty());
        assert!(refreshed.rotated_refresh_token.is_none());
    }

    #[test]
    fn an_unreadable_token_response_is_unavailable_and_quotes_nothing() {
        let bodies: [&[u8]; 5] = [
            b"<html>",
            br#"{"expires_in":3599}"#,
            br#"{"access_token":"","expires_in":3599}"#,
            br#"{"access_token":"ya29.secret","expires_in":"soon"}"#,
            br#"{"access_token":12345678987654321,"expires_in":1}"#,
        ];
        for body in bodies {
            let error = token_from(body, SystemTime::UNIX_EPOCH).unwrap_err();
            assert!(matches!(error, IdpError::Unavailable { .. }), "{error}");
            let text = error.to_string();
            assert!(
                !text.contains("ya29.secret") && !text.contains("12345678987654321"),
                "{text}"
            );
        }
    }

    #[test]
    fn statuses_map_to_what_should_happen_next() {
        let grant = refused(
            400,
            r#"{"error":"invalid_grant","error_description":"Token has been expired or revoked."}"#,
        );
        assert!(matches!(grant.error, IdpError::InvalidGrant));
        assert!(!grant.retryable);
        for (status, body, code) in [
            (401, r#"{"error":"invalid_client"}"#, "invalid_client"),
            (
                400,
                r#"{"error":"unauthorized_client"}"#,
                "unauthorized_client",
            ),
            (400, r#"{"error":"invalid_client"}"#, "invalid_client"),
            (404, "<html>not found</html>", "unknown"),
            (302, "", "unknown"),
        ] {
            let failure = refused(status, body);
            assert_eq!(
                failure.error,
                IdpError::ClientRejected {
                    status,
                    code: code.to_owned()
                }
            );
            assert!(!failure.retryable, "{status}");
        }
        for status in [429, 500, 502, 503, 408] {
            let failure = refused(status, "");
            assert!(
                matches!(failure.error, IdpError::Unavailable { .. }),
                "{status}"
            );
            assert!(failure.retryable, "{status}");
        }
    }

    #[test]
    fn retry_after_of_a_429_or_5xx_is_kept() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("7"));
        let failure = refusal(StatusCode::SERVICE_UNAVAILABLE, &headers, b"");
        assert_eq!(failure.error.retry_after(), Some(Duration::from_secs(7)));
    }

    #[test]
    fn an_idps_error_code_is_reduced_to_a_label() {
        let failure = refused(
            401,
            "{\"error\":\"invalid_client\\n<script>ya29 \\u001b[31m\"}",
        );
        let IdpError::ClientRejected { code, .. } = failure.error else {
            panic!("{:?}", failure.error)
        };
        assert_eq!(code, "invalid_clientscriptya2931m");
    }

    #[test]
    fn the_form_holds_the_grant_and_both_credentials() {
        let client = IdpClient {
            token_url: "https://idp.example/token".to_owned(),
            client_id: "app id".to_owned(),
            client_secret: SecretString::from("s&cret"),
        };
        let form = form_body(&client, &SecretString::from("1//r+t")).unwrap();
        assert_eq!(
            form,
            "grant_type=refresh_token&refresh_token=1%2F%2Fr%2Bt&client_id=app+id&client_secret=s%26cret"
        );
    }
}
