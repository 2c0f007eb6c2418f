//! Everything about the Auth0 tenant, and the only module that speaks HTTP:
//! the Management API session (`session.rs`: the client-credentials grant's
//! token, reused and renewed), users' identities (`users.rs`), the tenant's
//! signing keys (`jwks.rs`) and the `/oauth/token` grants (`token.rs`: client
//! credentials and the Token Vault exchange), authenticated with the client
//! secret or a `private_key_jwt` client assertion (`assertion.rs`, signed
//! with the keys of `keys.rs`). Every
//! request takes the one send path of `send.rs` (size cap, metrics, error
//! mapping into [`Auth0Error`]); Management API requests also pass the
//! outbound limits and retries of `outbound.rs`.

mod assertion;
pub(crate) mod body;
mod error;
mod jwks;
mod keys;
mod model;
pub(crate) mod outbound;
mod send;
mod session;
mod token;
mod users;

pub use error::{retry_delay, Auth0Error, ErrorBody};
pub use outbound::{
    DEFAULT_BURST, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_IN_FLIGHT, DEFAULT_RATE_PER_SECOND,
};

/// Default timeout for opening a connection to Auth0.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Default bound on one whole call to Auth0, retries included.
pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
pub use assertion::{SUBJECT_AUDIT_CONTEXT, SUBJECT_TOKEN_TYP};
pub use jwks::JwksSource;
pub use keys::{KeyFileError, SignError, SigningKeyFile};
pub use model::{Identity, UserIdentities, IDP_TOKENS_SCOPE};
pub use outbound::{OutboundLimits, SharedAdmission, SharedBudget};
pub use token::{ExchangedToken, VaultRequest};

use model::ManagementToken;
use outbound::Outbound;
use session::ManagementSession;

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

/// How the broker proves to Auth0 that it is its application, on every
/// `/oauth/token` call.
#[derive(Debug, Clone)]
pub enum ClientCredential {
    /// `client_secret_post`: the application's shared secret (`Debug`
    /// prints `[REDACTED]`).
    Secret(SecretString),
    /// `private_key_jwt`: a new RS256 client assertion for every request,
    /// signed with this key, so the broker holds no secret Auth0 also knows.
    AssertionKey(Arc<SigningKeyFile>),
}

/// Where and how the broker reaches Auth0.
#[derive(Debug, Clone)]
pub struct Auth0Settings {
    /// Scheme, host and port of the tenant, no trailing slash: endpoints are built from it.
    pub base_url: String,
    /// Audience of the Management API token; differs from `base_url` with custom domains.
    pub audience: String,
    /// The broker's Machine-to-Machine application, for the client-credentials grant.
    pub client_id: String,
    /// The client secret or the client assertion key.
    pub credential: ClientCredential,
    /// Signs Token Vault subject tokens (`AUTH0_TOKEN_VAULT_SUBJECT_KEY_FILE`);
    /// `None`: the client assertion key signs them, if there is one.
    pub token_vault_subject_key: Option<Arc<SigningKeyFile>>,
    /// Bounds opening a connection, so an unreachable tenant fails fast.
    pub connect_timeout: Duration,
    /// Bounds one whole call to an Auth0 endpoint, retries included, so a hanging tenant
    /// cannot hold a caller without a deadline for attempts × timeout.
    pub request_timeout: Duration,
}

impl Auth0Settings {
    /// The key files to watch for rotation: each one once.
    pub fn key_files(&self) -> Vec<Arc<SigningKeyFile>> {
        let assertion = match &self.credential {
            ClientCredential::AssertionKey(key) => Some(key.clone()),
            ClientCredential::Secret(_) => None,
        };
        assertion
            .into_iter()
            .chain(self.token_vault_subject_key.clone())
            .collect()
    }

    /// The key that signs Token Vault subject tokens: the dedicated one,
    /// else the client assertion key.
    fn subject_key(&self) -> Option<&Arc<SigningKeyFile>> {
        self.token_vault_subject_key
            .as_ref()
            .or(match &self.credential {
                ClientCredential::AssertionKey(key) => Some(key),
                ClientCredential::Secret(_) => None,
            })
    }
}

/// Talks to one Auth0 tenant with the broker's Machine-to-Machine credentials.
/// Clones share everything (connection pool, outbound limits, Management
/// session): the identity store and the Token Vault use one client.
#[derive(Clone)]
pub struct Auth0Client {
    /// One connection pool (rustls) for every endpoint, the JWKS included.
    http: reqwest::Client,
    /// The tenant's URLs and the broker's credentials.
    settings: Auth0Settings,
    /// Rate limit, in-flight bound and retries for every Management API request.
    outbound: Arc<Outbound>,
    /// The Management token the users endpoint is read with.
    session: Arc<ManagementSession>,
    /// Which connections' refresh tokens are kept from the profile.
    keeps_refresh_token: RefreshTokenFilter,
}

/// Says whether an identity of this connection keeps its refresh token (the
/// connections the broker refreshes at the IdP); a function so `auth0`
/// needs nothing of the connections file.
pub type RefreshTokenFilter = std::sync::Arc<dyn Fn(&str) -> bool + Send + Sync>;

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
            outbound: Arc::new(Outbound::new(limits, settings.request_timeout)),
            settings,
            session: Arc::new(ManagementSession::new()),
            keeps_refresh_token: std::sync::Arc::new(|_: &str| false),
        })
    }

    /// Keeps identities' refresh tokens for the connections `filter` names
    /// (by default none is kept).
    pub fn keeping_refresh_tokens(mut self, filter: RefreshTokenFilter) -> Self {
        self.keeps_refresh_token = filter;
        self
    }

    /// The same client, with every Management API request also taking a
    /// slot of `budget` (a fleet's one Auth0 budget); its own rate limit
    /// then only decides while `budget` is unavailable. Call it before the
    /// client is cloned: clones share the gate, and one already shared is
    /// replaced by a new gate of the same limits for this client only.
    pub fn with_shared_budget(self, budget: std::sync::Arc<dyn SharedBudget>) -> Self {
        let outbound = Arc::try_unwrap(self.outbound).unwrap_or_else(|shared| shared.same_limits());
        Self {
            outbound: Arc::new(outbound.with_shared_budget(budget)),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::token::token_endpoint_error;
    use super::users::{into_user_identities, users_endpoint_error, UserBody};
    use super::*;
    use crate::user_id::UserId;
    use reqwest::StatusCode;

    fn client() -> Auth0Client {
        Auth0Client::new(Auth0Settings {
            base_url: "http://127.0.0.1:9".to_owned(),
            audience: "http://127.0.0.1:9/api/v2/".to_owned(),
            client_id: "id".to_owned(),
            credential: ClientCredential::Secret(SecretString::from("secret")),
            token_vault_subject_key: None,
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
            "http://127.0.0.1:9/api/v2/users/oauth2%7Ccorp%2F..%2F..%2Fclients%20x%40y?fields=user_id%2Cidentities%2Clast_login&include_fields=true"
        );
    }

    #[test]
    fn numeric_and_text_idp_user_ids_become_text() {
        let body: UserBody = serde_json::from_str(
            r#"{"identities":[{"provider":"github","connection":"github","user_id":1234567,"access_token":"a","refresh_token":"r"},
                              {"provider":"google-oauth2","connection":"google-oauth2","user_id":"1080","expires_in":3599}]}"#,
        )
        .unwrap();
        let user = into_user_identities(&UserId::parse("u").unwrap(), body, true, &|_| false);
        assert_eq!(user.identities[0].idp_user_id, "1234567");
        assert_eq!(user.identities[1].idp_user_id, "1080");
        assert!(
            user.identities[1].expires_at.is_none(),
            "no last_login: the expiry is unknown, never counted from the read"
        );
        assert!(user.identities[1].access_token.is_none());
        assert!(
            user.identities[0].refresh_token.is_none(),
            "refresh tokens are dropped for connections not refreshed at the IdP"
        );
    }

    #[test]
    fn a_profile_token_expires_at_last_login_plus_expires_in() {
        let body: UserBody = serde_json::from_str(
            r#"{"last_login":"2026-12-01T10:00:00.000Z","identities":[
                 {"provider":"google-oauth2","connection":"google-oauth2","user_id":"1","access_token":"a","expires_in":3599,"refresh_token":"r"},
                 {"provider":"github","connection":"github","user_id":2,"access_token":"b","refresh_token":"s"}]}"#,
        )
        .unwrap();
        let user = into_user_identities(&UserId::parse("u").unwrap(), body, true, &|connection| {
            connection == "google-oauth2"
        });
        let login = humantime::parse_rfc3339("2026-12-01T10:00:00Z").unwrap();
        assert_eq!(
            user.identities[0].expires_at,
            Some(login + Duration::from_secs(3599))
        );
        assert!(
            user.identities[0].refresh_token.is_some(),
            "kept for an idp-refreshed connection"
        );
        assert!(user.identities[1].refresh_token.is_none());
        assert!(user.identities[1].expires_at.is_none(), "no expires_in");
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
