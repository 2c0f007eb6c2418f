//! The only module that speaks HTTP: Auth0's client-credentials grant and the
//! Management API's user endpoint.

pub(crate) mod body;
mod error;
mod model;
mod outbound;

pub use error::{retry_delay, Auth0Error, ErrorBody};
pub use model::{Identity, ManagementToken, UserIdentities, IDP_TOKENS_SCOPE};
pub use outbound::OutboundLimits;

use outbound::Outbound;
use tokio::time::Instant as Deadline;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::stats;
use crate::user_id::UserId;

/// Where and how the broker reaches Auth0.
#[derive(Debug, Clone)]
pub struct Auth0Settings {
    /// Scheme, host and port of the tenant, no trailing slash: endpoints are built from it.
    pub base_url: String,
    /// Audience of the Management API token; differs from `base_url` with custom domains.
    pub audience: String,
    pub client_id: String,
    /// Kept secret in memory: `Debug` prints `[REDACTED]`.
    pub client_secret: SecretString,
    pub connect_timeout: Duration,
    /// Bounds one whole call to an Auth0 endpoint, retries included, so a hanging tenant
    /// cannot hold a caller without a deadline for attempts × timeout.
    pub request_timeout: Duration,
}

/// Everything but RFC 3986 unreserved characters is encoded, so a user id is
/// always exactly one path segment (`/` becomes `%2F`, `|` becomes `%7C`).
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Endpoint names for errors and metric labels.
const TOKEN_ENDPOINT: &str = "/oauth/token";
const USERS_ENDPOINT: &str = "/api/v2/users";

/// Only the fields the broker needs; Auth0 returns less data and less PII.
const USER_FIELDS_QUERY: &str = "fields=user_id%2Cidentities&include_fields=true";

/// Talks to one Auth0 tenant with the broker's Machine-to-Machine credentials.
pub struct Auth0Client {
    http: reqwest::Client,
    settings: Auth0Settings,
    /// Numbers each Management token, so a 401 drops only the rejected one.
    next_generation: AtomicU64,
    /// Rate limit, in-flight bound and retries for every request.
    outbound: Outbound,
}

#[derive(Serialize)]
struct ClientCredentialsForm<'a> {
    grant_type: &'static str,
    client_id: &'a str,
    client_secret: &'a str,
    audience: &'a str,
}

#[derive(Deserialize)]
struct TokenBody {
    access_token: SecretString,
    expires_in: u64,
    #[serde(default)]
    scope: String,
}

#[derive(Deserialize)]
struct UserBody {
    #[serde(default)]
    identities: Vec<IdentityBody>,
}

/// An identity as Auth0 sends it. `refresh_token` is deliberately absent.
#[derive(Deserialize)]
struct IdentityBody {
    provider: String,
    #[serde(default)]
    connection: String,
    user_id: IdpUserIdBody,
    #[serde(default)]
    access_token: Option<SecretString>,
    #[serde(default)]
    access_token_secret: Option<SecretString>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// `identities[].user_id` is a string for most providers and a number for GitHub.
#[derive(Deserialize)]
#[serde(untagged)]
enum IdpUserIdBody {
    Text(String),
    Number(serde_json::Number),
}

impl IdpUserIdBody {
    fn into_text(self) -> String {
        match self {
            Self::Text(text) => text,
            Self::Number(number) => number.to_string(),
        }
    }
}

impl Auth0Client {
    /// Builds the HTTP client with the configured timeouts (rustls, no OpenSSL)
    /// and the default [`OutboundLimits`].
    pub fn new(settings: Auth0Settings) -> Result<Self, Auth0Error> {
        Self::with_limits(settings, OutboundLimits::default())
    }

    /// Like [`Auth0Client::new`] with explicit limits on calls to Auth0.
    pub fn with_limits(
        settings: Auth0Settings,
        limits: OutboundLimits,
    ) -> Result<Self, Auth0Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .user_agent(concat!("tokenbroker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(Auth0Error::from_transport)?;
        Ok(Self {
            http,
            outbound: Outbound::new(limits, settings.request_timeout),
            settings,
            next_generation: AtomicU64::new(1),
        })
    }

    /// The HTTP client (its pool and timeouts), so the tenant's JWKS is read
    /// over the same connections as the Management API.
    pub fn http_client(&self) -> reqwest::Client {
        self.http.clone()
    }

    /// The tenant's base URL, for log lines.
    pub fn base_url(&self) -> &str {
        &self.settings.base_url
    }

    /// Client-credentials grant for a Management API token; retried within `deadline`.
    pub async fn fetch_management_token(
        &self,
        deadline: Option<Deadline>,
    ) -> Result<ManagementToken, Auth0Error> {
        let form = ClientCredentialsForm {
            grant_type: "client_credentials",
            client_id: &self.settings.client_id,
            client_secret: self.settings.client_secret.expose_secret(),
            audience: &self.settings.audience,
        };
        let body = serde_urlencoded::to_string(&form).map_err(|e| {
            Auth0Error::InvalidBody(format!("cannot encode the token request: {e}"))
        })?;
        let url = format!("{}/oauth/token", self.settings.base_url);
        let mut started = Instant::now();
        let token: TokenBody = self
            .outbound
            .call(TOKEN_ENDPOINT, deadline, || {
                started = Instant::now();
                let request = self
                    .http
                    .post(&url)
                    .header(
                        CONTENT_TYPE,
                        HeaderValue::from_static("application/x-www-form-urlencoded"),
                    )
                    .body(body.clone());
                send_json(request, TOKEN_ENDPOINT, token_endpoint_error)
            })
            .await?;
        Ok(ManagementToken {
            secret: token.access_token,
            lifetime: Duration::from_secs(token.expires_in),
            scope: token.scope,
            obtained_at: started,
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// `GET /api/v2/users/{id}` with the id encoded as one path segment;
    /// retried within `deadline`.
    pub async fn fetch_user(
        &self,
        token: &ManagementToken,
        user_id: &UserId,
        deadline: Option<Deadline>,
    ) -> Result<UserIdentities, Auth0Error> {
        let url = self.user_url(user_id);
        let user: UserBody = self
            .outbound
            .call(USERS_ENDPOINT, deadline, || {
                let request = self
                    .http
                    .get(&url)
                    .bearer_auth(token.secret.expose_secret());
                send_json(request, USERS_ENDPOINT, users_endpoint_error)
            })
            .await?;
        Ok(into_user_identities(
            user_id,
            user,
            token.can_read_idp_tokens(),
        ))
    }

    fn user_url(&self, user_id: &UserId) -> String {
        let segment = utf8_percent_encode(user_id.as_str(), PATH_SEGMENT);
        format!(
            "{}/api/v2/users/{segment}?{USER_FIELDS_QUERY}",
            self.settings.base_url
        )
    }
}

/// Sends `request` and parses a 2xx JSON body; other statuses go through the
/// endpoint's own error mapping. Every body, error bodies included, is read
/// with the [`body::MAX_BODY_BYTES`] cap: a larger one is
/// [`Auth0Error::BodyTooLarge`] whatever the status.
async fn send_json<T: serde::de::DeserializeOwned>(
    request: reqwest::RequestBuilder,
    endpoint: &'static str,
    map_error: fn(StatusCode, &reqwest::header::HeaderMap, &[u8]) -> Auth0Error,
) -> Result<T, Auth0Error> {
    let started = Instant::now();
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => {
            stats::auth0_request(endpoint, 0, started.elapsed());
            return Err(Auth0Error::from_transport(error));
        }
    };
    let status = response.status();
    stats::auth0_request(endpoint, status.as_u16(), started.elapsed());
    let headers = response.headers().clone();
    if !status.is_success() {
        // The status decides an error; its body only adds Auth0's words, so
        // an oversized one is dropped rather than hiding a 429 or 503.
        let bytes = body::read_capped(response, endpoint, body::MAX_BODY_BYTES)
            .await
            .unwrap_or_default();
        return Err(map_error(status, &headers, &bytes));
    }
    let bytes = body::read_capped(response, endpoint, body::MAX_BODY_BYTES).await?;
    serde_json::from_slice(&bytes).map_err(|e| Auth0Error::InvalidBody(format!("{endpoint}: {e}")))
}

fn into_user_identities(user_id: &UserId, user: UserBody, readable: bool) -> UserIdentities {
    let fetched_at = SystemTime::now();
    let identities = user
        .identities
        .into_iter()
        .map(|identity| Identity {
            provider: identity.provider,
            connection: identity.connection,
            idp_user_id: identity.user_id.into_text(),
            expires_at: identity
                .expires_in
                .map(|seconds| fetched_at + Duration::from_secs(seconds)),
            access_token: identity.access_token,
            access_token_secret: identity.access_token_secret,
        })
        .collect();
    let mut identities: Vec<Identity> = identities;
    // serde's growth leaves spare capacity; the entry lives for minutes in a cache of 100 000.
    identities.shrink_to_fit();
    UserIdentities {
        user_id: user_id.as_str().to_owned(),
        identities,
        fetched_at,
        fetched_instant: Instant::now(),
        idp_tokens_readable: readable,
    }
}

fn token_endpoint_error(
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
    bytes: &[u8],
) -> Auth0Error {
    let body = ErrorBody::parse(bytes);
    match status.as_u16() {
        401 | 403 => Auth0Error::CredentialsRejected {
            status: status.as_u16(),
            code: body.code(),
            description: body.description(),
        },
        _ => common_error(status, headers, body),
    }
}

fn users_endpoint_error(
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
    bytes: &[u8],
) -> Auth0Error {
    let body = ErrorBody::parse(bytes);
    match status.as_u16() {
        401 => Auth0Error::ManagementTokenRejected,
        403 => Auth0Error::InsufficientScope {
            message: body.description(),
        },
        404 => Auth0Error::UserNotFound,
        _ => common_error(status, headers, body),
    }
}

fn common_error(
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: ErrorBody,
) -> Auth0Error {
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Auth0Error::RateLimited {
            retry_after: retry_delay(headers),
        };
    }
    if status.is_server_error() {
        return Auth0Error::ServerError {
            status: status.as_u16(),
            retry_after: retry_delay(headers),
        };
    }
    Auth0Error::Unexpected {
        status: status.as_u16(),
        code: body.code(),
        message: body.description(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Auth0Client {
        Auth0Client::new(Auth0Settings {
            base_url: "http://127.0.0.1:9".to_owned(),
            audience: "http://127.0.0.1:9/api/v2/".to_owned(),
            client_id: "id".to_owned(),
            client_secret: SecretString::from("secret"),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        })
        .unwrap()
    }

    #[test]
    fn user_id_is_one_encoded_path_segment() {
        let id = UserId::parse("oauth2|corp/../../clients x@y").unwrap();
        assert_eq!(
            client().user_url(&id),
            "http://127.0.0.1:9/api/v2/users/oauth2%7Ccorp%2F..%2F..%2Fclients%20x%40y?fields=user_id%2Cidentities&include_fields=true"
        );
    }

    #[test]
    fn numeric_and_text_idp_user_ids_become_text() {
        let body: UserBody = serde_json::from_str(
            r#"{"identities":[{"provider":"github","connection":"github","user_id":1234567,"access_token":"a","refresh_token":"r"},
                              {"provider":"google-oauth2","connection":"google-oauth2","user_id":"1080","expires_in":3599}]}"#,
        )
        .unwrap();
        let user = into_user_identities(&UserId::parse("u").unwrap(), body, true);
        assert_eq!(user.identities[0].idp_user_id, "1234567");
        assert_eq!(user.identities[1].idp_user_id, "1080");
        assert!(user.identities[1].expires_at.is_some());
        assert!(user.identities[1].access_token.is_none());
    }

    #[test]
    fn users_endpoint_statuses_map_to_typed_errors() {
        let headers = reqwest::header::HeaderMap::new();
        assert!(matches!(
            users_endpoint_error(StatusCode::UNAUTHORIZED, &headers, b""),
            Auth0Error::ManagementTokenRejected
        ));
        assert!(matches!(
            users_endpoint_error(StatusCode::NOT_FOUND, &headers, b""),
            Auth0Error::UserNotFound
        ));
        assert!(matches!(
            users_endpoint_error(StatusCode::TOO_MANY_REQUESTS, &headers, b""),
            Auth0Error::RateLimited { .. }
        ));
        assert!(matches!(
            users_endpoint_error(StatusCode::BAD_GATEWAY, &headers, b""),
            Auth0Error::ServerError { status: 502, .. }
        ));
        assert!(matches!(
            token_endpoint_error(
                StatusCode::UNAUTHORIZED,
                &headers,
                br#"{"error":"access_denied"}"#
            ),
            Auth0Error::CredentialsRejected { status: 401, .. }
        ));
    }
}
