//! `/oauth/token`: the grants the broker makes. Every grant posts its own form
//! through [`Auth0Client::token_grant`], which owns the endpoint's send path,
//! error mapping and answer; a new grant (token exchange, a client assertion)
//! is a form struct and a function beside [`Auth0Client::client_credentials`].

use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::time::Instant as Deadline;

use super::send::common_error;
use super::{Auth0Client, Auth0Error, ErrorBody};

/// Endpoint name for errors and metric labels.
pub(super) const TOKEN_ENDPOINT: &str = "/oauth/token";

/// The client-credentials grant: the broker's own Machine-to-Machine credentials
/// for a token of `audience` (the Management API).
#[derive(Serialize)]
struct ClientCredentialsForm<'a> {
    grant_type: &'static str,
    client_id: &'a str,
    client_secret: &'a str,
    audience: &'a str,
}

/// A successful `/oauth/token` answer, as Auth0 sends it for every grant.
#[derive(Deserialize)]
struct TokenBody {
    access_token: SecretString,
    expires_in: u64,
    #[serde(default)]
    scope: String,
}

/// An access token Auth0 issued, with what the broker needs to reuse it safely.
pub(super) struct IssuedToken {
    /// The bearer value; secret from the moment it is parsed.
    pub(super) secret: SecretString,
    /// `expires_in` as Auth0 gave it.
    pub(super) lifetime: Duration,
    /// Granted scopes, space-separated.
    pub(super) scope: String,
    /// When the successful attempt started: the lifetime counts from no later than this.
    pub(super) obtained_at: Instant,
}

impl Auth0Client {
    /// Client-credentials grant for a Management API token; retried within `deadline`.
    pub(super) async fn client_credentials(
        &self,
        deadline: Option<Deadline>,
    ) -> Result<IssuedToken, Auth0Error> {
        let form = ClientCredentialsForm {
            grant_type: "client_credentials",
            client_id: &self.settings.client_id,
            client_secret: self.settings.client_secret.expose_secret(),
            audience: &self.settings.audience,
        };
        self.token_grant(&form, deadline).await
    }

    /// Posts one grant's `form` to `/oauth/token` within the outbound limits,
    /// retried within `deadline`.
    async fn token_grant(
        &self,
        form: &impl Serialize,
        deadline: Option<Deadline>,
    ) -> Result<IssuedToken, Auth0Error> {
        let body = serde_urlencoded::to_string(form).map_err(|e| {
            Auth0Error::InvalidBody(format!("cannot encode the token request: {e}"))
        })?;
        let url = format!("{}{TOKEN_ENDPOINT}", self.settings.base_url);
        let mut started = Instant::now();
        let token: TokenBody = self
            .call_json(
                TOKEN_ENDPOINT,
                deadline,
                || {
                    started = Instant::now();
                    self.http
                        .post(&url)
                        .header(
                            CONTENT_TYPE,
                            HeaderValue::from_static("application/x-www-form-urlencoded"),
                        )
                        .body(body.clone())
                },
                token_endpoint_error,
            )
            .await?;
        Ok(IssuedToken {
            secret: token.access_token,
            lifetime: Duration::from_secs(token.expires_in),
            scope: token.scope,
            obtained_at: started,
        })
    }
}

/// 401 and 403 from `/oauth/token` mean the broker's credentials (or its
/// application's grants) are wrong: an operator's problem, not a transient one.
pub(super) fn token_endpoint_error(
    status: StatusCode,
    headers: &HeaderMap,
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
