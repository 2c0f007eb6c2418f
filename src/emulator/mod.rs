//! An in-process Auth0 tenant emulator.
//!
//! `tokenbroker dev` and the integration tests need an Auth0 tenant without an Auth0 account.
//! This module serves the part of Auth0 the broker uses, over plain HTTP/1.1 on loopback:
//!
//! * `POST /oauth/token` — the client-credentials grant and the Token Vault exchange
//!   (Privileged Worker: a subject JWT the client signs), form or JSON body, the client
//!   authenticated by its secret or, once keys are registered
//!   ([`Emulator::set_client_assertion_keys`]), by a `private_key_jwt` client assertion
//!   (signature, `iss`/`sub`/`aud`/`exp`, `jti` replay refused);
//! * `GET /api/v2/users/{id}` — one user profile, with Auth0's scope rules (IdP tokens are
//!   silently omitted without `read:user_idp_tokens`) and `fields`/`include_fields`;
//! * `GET /.well-known/jwks.json` — the public keys that verify the ID tokens it issues;
//! * `POST /idp/google/token` — not Auth0 but a Google-like IdP token endpoint
//!   ([`Emulator::idp_token_url`]): the refresh-token grant for the OAuth client
//!   [`Emulator::idp_client_id`], honouring the seeded users' refresh tokens, with knobs to
//!   revoke them, rotate them and set the lifetime of the tokens it issues;
//! * anything else — a counted 404, so tests can prove a user id such as `../clients` never
//!   reaches another endpoint.
//!
//! Token Vault: one token set per user and connection (seeded for [`seed::VAULT_USER`]),
//! expiring and refreshed on exchange, with knobs for "no token set" and "refresh failed".
//!
//! It starts with the users of [`seed`]. Tests steer it through [`Emulator`]: expire or revoke
//! Management tokens, change scope, add latency, queue [`Fault`]s, and read call counters and
//! the raw paths it saw. Each emulator owns its state, so many can run in one process.
//!
//! ID tokens: [`Emulator::issue_id_token`] signs an Auth0-shaped RS256 ID token (a user's
//! login, which the broker can demand before releasing that user's IdP token), and
//! [`Emulator::issue_id_token_with`] builds variations and forgeries from an [`IdTokenSpec`].
//! The signing keys are three public test fixtures (`keys/`). The tenant starts signing with
//! the first and publishing only it; [`Emulator::rotate_signing_key`] and
//! [`Emulator::revoke_previous_signing_key`] walk through an Auth0 key rotation.

mod assertions;
mod handlers;
mod id_tokens;
mod idp;
pub mod keys;
pub mod seed;
mod signing;
mod state;
mod vault;

#[cfg(test)]
mod tests;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use state::Shared;

pub use id_tokens::{Audience, IdTokenSpec, KidHeader, Signing, DEFAULT_ID_TOKEN_LIFETIME_SECS};

/// Lifetime of issued Management tokens unless configured otherwise (Auth0's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(86_400);
/// Scope of issued Management tokens unless configured otherwise: all the broker needs.
const DEFAULT_SCOPE: &str = "read:users read:user_idp_tokens";
/// How long [`Emulator::shutdown`] waits for open connections before abandoning them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How the emulated tenant is set up: which client may get Management tokens, and what
/// those tokens look like.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// Client id the client-credentials grant accepts.
    pub client_id: String,
    /// Client secret the client-credentials grant accepts.
    pub client_secret: SecretString,
    /// Audience the grant accepts; `None` means `{base_url}/api/v2/`, like a real tenant.
    /// Set it to emulate a custom domain, where the audience differs from the domain.
    pub audience: Option<String>,
    /// Lifetime (`expires_in`) of issued Management tokens.
    pub token_lifetime: Duration,
    /// Space-separated scope of issued Management tokens.
    pub scope: String,
    /// `aud` of issued ID tokens: the client id of the app users log in to, which the broker
    /// must be configured to accept.
    pub id_token_audience: String,
    /// Client id the emulated IdP's token endpoint accepts: the OAuth app the broker
    /// refreshes as.
    pub idp_client_id: String,
    /// Client secret the emulated IdP's token endpoint accepts.
    pub idp_client_secret: SecretString,
}

impl EmulatorConfig {
    /// A tenant accepting these client credentials, with default audience, a 24 h token
    /// lifetime, the scope `read:users read:user_idp_tokens`, ID tokens for
    /// [`seed::DEFAULT_ID_TOKEN_AUDIENCE`], and an IdP accepting [`seed::IDP_CLIENT_ID`]
    /// with [`seed::IDP_CLIENT_SECRET`].
    pub fn new(client_id: impl Into<String>, client_secret: impl Into<String>) -> Self {
        EmulatorConfig {
            client_id: client_id.into(),
            client_secret: SecretString::from(client_secret.into()),
            audience: None,
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            scope: DEFAULT_SCOPE.to_owned(),
            id_token_audience: seed::DEFAULT_ID_TOKEN_AUDIENCE.to_owned(),
            idp_client_id: seed::IDP_CLIENT_ID.to_owned(),
            idp_client_secret: SecretString::from(seed::IDP_CLIENT_SECRET),
        }
    }
}

/// An emulated endpoint, to aim [`Fault`]s at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /oauth/token`.
    Token,
    /// `GET /api/v2/users/{id}`.
    Users,
    /// `GET /.well-known/jwks.json`.
    Jwks,
    /// `POST /idp/google/token`, the emulated IdP's token endpoint.
    IdpToken,
    /// `POST /oauth/token` with the Token Vault grant: faults aimed here hit only
    /// exchanges (after the [`Endpoint::Token`] queue), not the Management token grant.
    TokenExchange,
}

/// A misbehaviour to inject, so tests can exercise the broker's error handling.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status and an Auth0-style error body (OAuth style
    /// `{error, error_description}` on `/oauth/token` and the IdP's token endpoint, Management style
    /// `{statusCode, error, message}` on `/api/v2/users`). An invalid code gives 500.
    Status(u16),
    /// Answer 429 with `x-ratelimit-limit`, `x-ratelimit-remaining: 0`, `x-ratelimit-reset`
    /// (epoch seconds, now + `reset_in_secs`) and, when set, `Retry-After`.
    RateLimited {
        /// Value of the `Retry-After` header, in seconds; `None` omits the header.
        retry_after: Option<u64>,
        /// Seconds from now until the rate-limit window resets.
        reset_in_secs: u64,
    },
    /// Slow this one call down by the duration, then answer it normally.
    Delay(Duration),
    /// Answer 200 with a body of `bytes` bytes (JSON whitespace), streamed in chunks as the
    /// connection takes them, so the emulator never holds it: a hostile or broken tenant.
    /// `announced` sends a matching `Content-Length`; without it the length is unknown to
    /// the client until the end. [`Emulator::huge_body_bytes_sent`] tells how much of it the
    /// client let through.
    HugeBody {
        /// Length of the body.
        bytes: u64,
        /// Whether a `Content-Length` header announces it.
        announced: bool,
    },
}

/// How many requests reached each handler since start (or the last reset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallCounts {
    /// Calls to `/oauth/token`, failed and faulted ones included.
    pub token: u64,
    /// Calls to `/api/v2/users/{id}`, whatever their answer.
    pub users: u64,
    /// Calls to `/.well-known/jwks.json`, faulted ones included: proves JWKS caching.
    pub jwks: u64,
    /// Calls to the IdP's token endpoint, whatever their answer: proves refreshes are shared
    /// and remembered.
    pub idp_token: u64,
    /// Token Vault exchanges (`/oauth/token` with the Token Vault grant, also counted in
    /// `token`), whatever their answer: proves exchanges are shared and kept.
    pub token_exchange: u64,
    /// Calls to any other path or method (all answered 404).
    pub other: u64,
}

/// A running emulator. Dropping it, or calling [`Emulator::shutdown`], stops the server.
pub struct Emulator {
    state: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Emulator {
    /// Starts an emulator on an ephemeral loopback port (`127.0.0.1:0`).
    pub async fn start(config: EmulatorConfig) -> std::io::Result<Emulator> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        Self::start_on(listener, config).await
    }

    /// Starts an emulator on an already bound listener (e.g. a fixed port for `tokenbroker dev`).
    pub async fn start_on(
        listener: TcpListener,
        config: EmulatorConfig,
    ) -> std::io::Result<Emulator> {
        let addr = connectable(listener.local_addr()?);
        let base_url = format!("http://{addr}");
        let audience = config
            .audience
            .clone()
            .unwrap_or_else(|| format!("{base_url}/api/v2/"));
        let state = Arc::new(Shared::new(config, &base_url, audience, seed::users()));
        let (stop, stopped) = oneshot::channel::<()>();
        let app = handlers::router(state.clone());
        let task = tokio::spawn(async move {
            let shutdown = async move {
                // An error means the handle was dropped: stop as well.
                let _ = stopped.await;
            };
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::warn!(%error, "auth0 emulator stopped with an error");
            }
        });
        tracing::debug!(%base_url, "auth0 emulator listening");
        Ok(Emulator {
            state,
            addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Where to reach the emulator, e.g. `http://127.0.0.1:40123` (no trailing slash); use it
    /// as the broker's Auth0 domain.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The audience `/oauth/token` accepts.
    pub fn audience(&self) -> String {
        self.state.audience().to_owned()
    }

    /// The emulated IdP's token endpoint, e.g. `http://127.0.0.1:40123/idp/google/token`:
    /// the `token_url` of a `refresh = "idp"` connection.
    pub fn idp_token_url(&self) -> String {
        format!("{}/idp/google/token", self.base_url())
    }

    /// The client id the IdP's token endpoint accepts.
    pub fn idp_client_id(&self) -> String {
        self.state.idp_client_id().to_owned()
    }

    /// The client secret the IdP's token endpoint accepts.
    pub fn idp_client_secret(&self) -> SecretString {
        self.state.idp_client_secret().clone()
    }

    /// Makes the IdP honour `refresh_token` (besides the seeded ones), so tests can give
    /// users refresh tokens of their own.
    pub fn add_idp_refresh_token(&self, refresh_token: &str) {
        self.state.honour_idp_refresh_token(refresh_token);
    }

    /// Revokes `refresh_token` at the IdP: refreshing with it answers `invalid_grant`, as
    /// when the user removes the app's access.
    pub fn revoke_idp_refresh_token(&self, refresh_token: &str) {
        self.state.revoke_idp_refresh_token(refresh_token);
    }

    /// Turns refresh-token rotation on or off (off at start): while on, every refresh
    /// answers a new `refresh_token` and the one presented answers `invalid_grant` from
    /// then on, as a rotating IdP does.
    pub fn set_idp_rotation(&self, on: bool) {
        self.state.set_idp_rotation(on);
    }

    /// Sets `expires_in` (seconds) of the access tokens the IdP issues from now on
    /// ([`seed::GOOGLE_EXPIRES_IN`] at start).
    pub fn set_idp_expires_in(&self, seconds: u64) {
        self.state.set_idp_expires_in(seconds);
    }

    /// Registers these public keys (`BEGIN PUBLIC KEY` PEMs) as the client's
    /// `private_key_jwt` credentials, replacing any before: from now on the client must
    /// authenticate with a client assertion one of them verifies, and its secret is
    /// refused. None: back to the client secret.
    pub fn set_client_assertion_keys(&self, public_keys: &[&str]) -> Result<(), String> {
        self.state.set_assertion_keys(parse_keys(public_keys)?);
        Ok(())
    }

    /// Registers these public keys as the client's Token Vault Privileged Worker
    /// credentials (what verifies its subject tokens), replacing any before.
    pub fn set_token_vault_subject_keys(&self, public_keys: &[&str]) -> Result<(), String> {
        self.state.set_subject_keys(parse_keys(public_keys)?);
        Ok(())
    }

    /// Stores a new Token Vault token set for `user_id` and `connection` whose access token
    /// lives `expires_in` seconds from now; returns that token.
    pub fn put_token_vault_set(&self, user_id: &str, connection: &str, expires_in: u64) -> String {
        self.state.put_token_set(user_id, connection, expires_in)
    }

    /// Deletes the token set: exchanges answer `federated_connection_refresh_token_not_found`.
    pub fn remove_token_vault_set(&self, user_id: &str, connection: &str) {
        self.state.remove_token_set(user_id, connection);
    }

    /// Makes the set's access token expired: the next exchange refreshes it.
    pub fn expire_token_vault_set(&self, user_id: &str, connection: &str) {
        self.state.expire_token_set(user_id, connection);
    }

    /// Makes refreshes of the set at the IdP fail (or work again): an exchange of an
    /// expired token answers `federated_connection_refresh_token_flow_failed`.
    pub fn fail_token_vault_refresh(&self, user_id: &str, connection: &str, fails: bool) {
        self.state
            .set_token_set_refresh_fails(user_id, connection, fails);
    }

    /// Sets the lifetime of the tokens Token Vault refreshes from now on
    /// ([`seed::GOOGLE_EXPIRES_IN`] at start).
    pub fn set_token_vault_expires_in(&self, seconds: u64) {
        self.state.set_vault_expires_in(seconds);
    }

    /// The `aud` of the ID tokens it issues.
    pub fn id_token_audience(&self) -> String {
        self.state.id_token_audience().to_owned()
    }

    /// A genuine ID token for `sub`, as Auth0 issues at login: RS256 with the current signing
    /// key, `iss` = `{base_url}/`, `aud` = the configured ID-token audience, valid for 1 h.
    pub fn issue_id_token(&self, sub: &str) -> String {
        self.issue_id_token_with(IdTokenSpec::for_user(sub))
    }

    /// The ID token `spec` describes: a variation or forgery for verifier tests.
    pub fn issue_id_token_with(&self, spec: IdTokenSpec) -> String {
        let (current_key, unpublished_key) = self.state.signing_keys();
        let tenant = id_tokens::Tenant {
            issuer: format!("{}/", self.base_url()),
            audience: self.state.id_token_audience(),
            current_key,
            unpublished_key,
        };
        id_tokens::issue(&spec, &tenant)
    }

    /// The `kid` of the key that signs ID tokens now.
    pub fn signing_key_id(&self) -> String {
        self.state.key_ids().0
    }

    /// The `kid`s the JWKS publishes now, oldest first.
    pub fn published_key_ids(&self) -> Vec<String> {
        self.state.key_ids().1
    }

    /// Rotates like Auth0: the next fixture key signs from now on, and the JWKS publishes the
    /// previous and the new key (the previous one until
    /// [`revoke_previous_signing_key`](Self::revoke_previous_signing_key)). After the third
    /// key it wraps to the first. Returns the new signing key's `kid`.
    pub fn rotate_signing_key(&self) -> String {
        self.state.rotate_signing_key()
    }

    /// Stops publishing every key but the current signing key, like revoking Auth0's previous
    /// key: tokens it signed no longer verify.
    pub fn revoke_previous_signing_key(&self) {
        self.state.revoke_previous_signing_key();
    }

    /// A snapshot of the call counters, to assert how often the broker called Auth0.
    pub fn calls(&self) -> CallCounts {
        self.state.calls()
    }

    /// How many bytes of [`Fault::HugeBody`] bodies were handed to connections since start
    /// (or the last reset): what a client read, plus what socket buffers took. A client that
    /// stops reading early keeps this far below the body's length.
    pub fn huge_body_bytes_sent(&self) -> u64 {
        self.state.huge_body_bytes_sent()
    }

    /// How many `/api/v2/users/{id}` calls named this (decoded) user id, to check caching.
    pub fn user_calls_for(&self, user_id: &str) -> u64 {
        self.state.user_calls_for(user_id)
    }

    /// Every request path received, raw (still percent-encoded), in arrival order.
    pub fn seen_paths(&self) -> Vec<String> {
        self.state.seen_paths()
    }

    /// Zeroes the counters and forgets the seen paths; tokens, users and faults are kept.
    pub fn reset_counters(&self) {
        self.state.reset_counters();
    }

    /// Sets the lifetime of Management tokens issued from now on.
    pub fn set_token_lifetime(&self, d: Duration) {
        self.state.set_token_lifetime(d);
    }

    /// Sets the scope of Management tokens issued from now on (space-separated).
    pub fn set_scope(&self, scope: &str) {
        self.state.set_scope(scope);
    }

    /// Makes every Management token issued so far expired (`401 Expired token`).
    pub fn expire_management_tokens(&self) {
        self.state.expire_tokens();
    }

    /// Makes every Management token issued so far invalid (`401 Invalid token`).
    pub fn revoke_management_tokens(&self) {
        self.state.revoke_tokens();
    }

    /// Adds this latency to every response, to test timeouts and deadlines.
    pub fn set_latency(&self, d: Duration) {
        self.state.set_latency(d);
    }

    /// Queues faults for `endpoint`: its next calls get them in order, then behave normally.
    /// Calls appending to a non-empty queue add behind the faults already queued.
    pub fn inject_faults(&self, endpoint: Endpoint, faults: Vec<Fault>) {
        self.state.push_faults(endpoint, faults);
    }

    /// Adds or replaces a user, keyed by its string `"user_id"`. A value without one is
    /// ignored (and logged), since Auth0 has no such user.
    pub fn upsert_user(&self, user: serde_json::Value) {
        if !self.state.upsert_user(user) {
            tracing::warn!("auth0 emulator: ignoring a user without a string \"user_id\"");
        }
    }

    /// Deletes a user, so the next fetch answers 404.
    pub fn remove_user(&self, user_id: &str) {
        self.state.remove_user(user_id);
    }

    /// Stops the server gracefully: no new connections once it returns. Open connections get
    /// a few seconds to finish before they are abandoned.
    pub async fn shutdown(mut self) {
        self.signal_stop();
        let Some(task) = self.task.take() else {
            return;
        };
        let abort = task.abort_handle();
        if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
            abort.abort();
        }
    }

    fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The server may already be gone; nothing to stop then.
            let _ = stop.send(());
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Public key PEMs as the tenant registers them.
fn parse_keys(public_keys: &[&str]) -> Result<Vec<assertions::RegisteredKey>, String> {
    public_keys
        .iter()
        .map(|pem| assertions::RegisteredKey::from_pem(pem))
        .collect()
}

/// The address clients should dial: a wildcard bind is reached over loopback.
fn connectable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr {
        SocketAddr::V4(v4) if v4.ip().is_unspecified() => Ipv4Addr::LOCALHOST.into(),
        SocketAddr::V6(v6) if v6.ip().is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        other => other.ip(),
    };
    SocketAddr::new(ip, addr.port())
}
