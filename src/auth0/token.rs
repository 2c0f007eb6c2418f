//! `/oauth/token`: the grants the broker makes. Every grant is a form struct
//! and a function over one [`Auth0Client::token_grant`], which owns the
//! endpoint's send path, the client authentication and the answer:
//!
//! * [`Auth0Client::client_credentials`]: the Management API token.
//! * [`Auth0Client::token_vault_exchange`]: a user's IdP token from Auth0
//!   Token Vault (Auth0, "Privileged Worker Token Exchange with Token Vault"
//!   and "Token Vault token exchange: Get Token").
//!
//! Each attempt, retries included, builds its body anew: a client assertion
//! and a subject token are single-use JWTs (unique `jti`), so a retry that
//! sent the first attempt's again would be refused as a replay.

use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::time::Instant as Deadline;

use super::assertion::{Issuer, CLIENT_ASSERTION_TYPE};
use super::send::{common_error, ErrorMapping};
use super::{Auth0Client, Auth0Error, ClientCredential, ErrorBody};

/// Endpoint name for errors and metric labels.
pub(super) const TOKEN_ENDPOINT: &str = "/oauth/token";

/// The Token Vault grant (RFC 8693 token exchange, Auth0's own grant type).
const TOKEN_VAULT_GRANT: &str =
    "urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token";
/// `subject_token_type` of a Privileged Worker exchange: a JWT the client signed.
const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// `requested_token_type` Auth0's Privileged Worker page names for an access
/// token ("should always be" this value there; the refresh-token and
/// access-token exchanges use `…/federated-connection-access-token`).
const TOKEN_VAULT_ACCESS_TOKEN: &str = "http://auth0.com/oauth/token-type/token-vault-access-token";

/// Prefix of the `error` codes Auth0 answers when the user's token set for
/// the connection is missing or its refresh at the IdP failed
/// (`federated_connection_refresh_token_not_found`,
/// `…_flow_failed`): only the user can mend it, by connecting again.
const USER_TOKEN_SET_CODE_PREFIX: &str = "federated_connection_refresh_token_";
/// The code Auth0 gives underneath when no token set exists.
const TOKEN_SET_NOT_FOUND: &str = "tokenset_not_found";

/// The client-credentials grant: a token of `audience` (the Management API).
#[derive(Serialize)]
struct ClientCredentialsForm<'a> {
    grant_type: &'static str,
    audience: &'a str,
}

/// The Privileged Worker token exchange: `subject_token` names the user,
/// `connection` and `login_hint` (the identity's IdP user id, for users with
/// several accounts of one connection) the token set.
#[derive(Serialize)]
struct TokenVaultForm<'a> {
    grant_type: &'static str,
    subject_token: &'a str,
    subject_token_type: &'static str,
    requested_token_type: &'static str,
    connection: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    login_hint: &'a str,
}

/// How the broker authenticates on `/oauth/token`: the client secret, or a
/// client assertion in its place. Deliberately not `Debug`.
#[derive(Serialize)]
struct ClientAuthForm<'a> {
    client_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_secret: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_assertion_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_assertion: Option<&'a str>,
}

/// A successful `/oauth/token` answer, as Auth0 sends it for every grant
/// (`issued_token_type` and `token_type` of the exchange are not needed).
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
    /// The same moment on the wall clock, for expiries told to callers.
    pub(super) issued_at: SystemTime,
}

/// Whose token a Token Vault exchange asks for.
#[derive(Debug, Clone, Copy)]
pub struct VaultRequest<'a> {
    /// The Auth0 user id: the subject token's `sub`.
    pub user_id: &'a str,
    /// The Auth0 connection whose token set is wanted.
    pub connection: &'a str,
    /// The identity's user id at the IdP, sent as `login_hint` so a user with
    /// several accounts of the connection gets the one the profile names.
    pub login_hint: &'a str,
}

/// The IdP access token Token Vault handed out.
pub struct ExchangedToken {
    /// The IdP's access token; `Debug` is not derived, nothing prints it.
    pub access_token: SecretString,
    /// When the request that got it was sent: its lifetime counts from no
    /// later than this.
    pub issued_at: SystemTime,
    /// `expires_in` as Auth0 gave it.
    pub lifetime: Duration,
    /// The scopes Auth0 says the token carries.
    pub scopes: Vec<String>,
}

impl Auth0Client {
    /// Client-credentials grant for a Management API token; retried within `deadline`.
    pub(super) async fn client_credentials(
        &self,
        deadline: Option<Deadline>,
    ) -> Result<IssuedToken, Auth0Error> {
        let form = encode(&ClientCredentialsForm {
            grant_type: "client_credentials",
            audience: &self.settings.audience,
        })?;
        self.token_grant(|| Ok(form.clone()), token_endpoint_error, deadline)
            .await
    }

    /// The IdP access token Token Vault holds for `request`'s user and
    /// connection, for a subject token the broker signs (Privileged Worker
    /// exchange); retried within `deadline` like every Auth0 call. Without a
    /// key to sign the subject token: [`Auth0Error::NoSubjectKey`].
    pub async fn token_vault_exchange(
        &self,
        request: VaultRequest<'_>,
        deadline: Option<Deadline>,
    ) -> Result<ExchangedToken, Auth0Error> {
        let key = self
            .settings
            .subject_key()
            .ok_or(Auth0Error::NoSubjectKey)?
            .clone();
        let audience = self.jwt_audience();
        let grant = || {
            let issuer = Issuer {
                client_id: &self.settings.client_id,
                audience: &audience,
            };
            let subject_token = issuer.subject_token(&key, request.user_id)?;
            encode(&TokenVaultForm {
                grant_type: TOKEN_VAULT_GRANT,
                subject_token: subject_token.expose_secret(),
                subject_token_type: JWT_TOKEN_TYPE,
                requested_token_type: TOKEN_VAULT_ACCESS_TOKEN,
                connection: request.connection,
                login_hint: request.login_hint,
            })
        };
        let issued = self.token_grant(grant, exchange_error, deadline).await?;
        Ok(ExchangedToken {
            access_token: issued.secret,
            issued_at: issued.issued_at,
            lifetime: issued.lifetime,
            scopes: issued.scope.split_whitespace().map(str::to_owned).collect(),
        })
    }

    /// Posts a grant to `/oauth/token` within the outbound limits, retried
    /// within `deadline`. Every attempt calls `grant` for its form and adds
    /// the client authentication anew, so single-use JWTs are never resent.
    async fn token_grant(
        &self,
        grant: impl Fn() -> Result<SecretString, Auth0Error>,
        map_error: ErrorMapping,
        deadline: Option<Deadline>,
    ) -> Result<IssuedToken, Auth0Error> {
        let url = format!("{}{TOKEN_ENDPOINT}", self.settings.base_url);
        let mut started = (Instant::now(), SystemTime::now());
        let token: TokenBody = self
            .try_call_json(
                TOKEN_ENDPOINT,
                deadline,
                || {
                    started = (Instant::now(), SystemTime::now());
                    let body = format!(
                        "{}&{}",
                        grant()?.expose_secret(),
                        self.client_authentication()?.expose_secret()
                    );
                    Ok(self
                        .http
                        .post(&url)
                        .header(
                            CONTENT_TYPE,
                            HeaderValue::from_static("application/x-www-form-urlencoded"),
                        )
                        .body(body))
                },
                map_error,
            )
            .await?;
        Ok(IssuedToken {
            secret: token.access_token,
            lifetime: Duration::from_secs(token.expires_in),
            scope: token.scope,
            obtained_at: started.0,
            issued_at: started.1,
        })
    }

    /// The client authentication fields of one request: the secret, or a
    /// new client assertion (`private_key_jwt`).
    fn client_authentication(&self) -> Result<SecretString, Auth0Error> {
        let client_id = self.settings.client_id.as_str();
        match &self.settings.credential {
            ClientCredential::Secret(secret) => encode(&ClientAuthForm {
                client_id,
                client_secret: Some(secret.expose_secret()),
                client_assertion_type: None,
                client_assertion: None,
            }),
            ClientCredential::AssertionKey(key) => {
                let audience = self.jwt_audience();
                let issuer = Issuer {
                    client_id,
                    audience: &audience,
                };
                let assertion = issuer.client_assertion(key)?;
                encode(&ClientAuthForm {
                    client_id,
                    client_secret: None,
                    client_assertion_type: Some(CLIENT_ASSERTION_TYPE),
                    client_assertion: Some(assertion.expose_secret()),
                })
            }
        }
    }

    /// `aud` of the JWTs the broker signs: the tenant's URL with the trailing
    /// slash (Auth0: "Include the trailing slash"), the configured domain,
    /// custom or not.
    fn jwt_audience(&self) -> String {
        format!("{}/", self.settings.base_url)
    }
}

/// `form` URL-encoded; secret, as forms carry credentials and tokens.
fn encode(form: &impl Serialize) -> Result<SecretString, Auth0Error> {
    serde_urlencoded::to_string(form)
        .map(SecretString::from)
        .map_err(|e| Auth0Error::InvalidBody(format!("cannot encode the token request: {e}")))
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

/// A refused exchange is told apart by Auth0's `error` code, not the status:
/// Auth0 answers 401 both when the user has no token set for the connection
/// and when it refuses the broker's client. A missing token set, or one Auth0
/// could not refresh at the IdP, is the user's to mend
/// ([`Auth0Error::NoTokenSet`]); any other refusal (`access_denied`,
/// `invalid_client`, `unauthorized_client`, `invalid_grant` for the broker's
/// own subject token, `invalid_request`, …) is the operator's
/// ([`Auth0Error::ExchangeRefused`]). 429 and 5xx as on any endpoint.
pub(super) fn exchange_error(status: StatusCode, headers: &HeaderMap, bytes: &[u8]) -> Auth0Error {
    let body = ErrorBody::parse(bytes);
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        return common_error(status, headers, body);
    }
    let code = body.code();
    if code.starts_with(USER_TOKEN_SET_CODE_PREFIX) || code == TOKEN_SET_NOT_FOUND {
        return Auth0Error::NoTokenSet { code };
    }
    Auth0Error::ExchangeRefused {
        status: status.as_u16(),
        code,
        description: body.description(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(status: u16, body: &str) -> Auth0Error {
        let status = StatusCode::from_u16(status).unwrap();
        exchange_error(status, &HeaderMap::new(), body.as_bytes())
    }

    #[test]
    fn an_exchange_refusal_is_told_apart_by_its_code_not_its_status() {
        for code in [
            "federated_connection_refresh_token_not_found",
            "federated_connection_refresh_token_flow_failed",
            "tokenset_not_found",
        ] {
            let body = format!(r#"{{"error":"{code}","error_description":"x"}}"#);
            assert!(
                matches!(refusal(401, &body), Auth0Error::NoTokenSet { code: c } if c == code),
                "{code}"
            );
        }
        for code in [
            "access_denied",
            "invalid_client",
            "unauthorized_client",
            "invalid_grant",
        ] {
            let body = format!(r#"{{"error":"{code}","error_description":"x"}}"#);
            assert!(
                matches!(refusal(401, &body), Auth0Error::ExchangeRefused { status: 401, code: c, .. } if c == code),
                "{code}"
            );
        }
        assert!(matches!(
            refusal(403, "<html>"),
            Auth0Error::ExchangeRefused { code, .. } if code == "unknown"
        ));
    }

    #[test]
    fn an_exchange_under_load_or_failing_is_transient() {
        assert!(refusal(429, "{}").is_transient());
        assert!(refusal(503, "{}").is_transient());
    }

    #[test]
    fn the_exchange_form_carries_the_privileged_worker_values() {
        let form = encode(&TokenVaultForm {
            grant_type: TOKEN_VAULT_GRANT,
            subject_token: "jwt",
            subject_token_type: JWT_TOKEN_TYPE,
            requested_token_type: TOKEN_VAULT_ACCESS_TOKEN,
            connection: "google-oauth2",
            login_hint: "1080",
        })
        .unwrap();
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(form.expose_secret()).unwrap();
        let value = |name: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
        };
        assert_eq!(
            value("grant_type").as_deref(),
            Some("urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token")
        );
        assert_eq!(
            value("subject_token_type").as_deref(),
            Some("urn:ietf:params:oauth:token-type:jwt")
        );
        assert_eq!(
            value("requested_token_type").as_deref(),
            Some("http://auth0.com/oauth/token-type/token-vault-access-token")
        );
        assert_eq!(value("login_hint").as_deref(), Some("1080"));
    }
}
