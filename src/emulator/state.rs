//! Shared, mutable state of one emulator: issued Management tokens, users, queued faults,
//! call counters, which ID-token signing keys are current and published, and the emulated
//! IdP's refresh tokens. Everything sits
//! behind one `std::sync::Mutex` that is never held across an `.await`, and nothing is
//! global, so many emulators can run in one process.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::distr::Alphanumeric;
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::assertions::{ClientJwts, Expected, RegisteredKey};
use super::handlers::epoch_secs;
use super::idp::{IdpGrant, IdpState};
use super::signing::{self, KEY_COUNT};
use super::vault::{VaultGrant, VaultRefusal, VaultState};
use super::{CallCounts, EmulatorConfig, Endpoint, Fault};

/// Length of the random part of an issued token.
const TOKEN_RANDOM_LEN: usize = 48;

/// What the emulator remembers about one Management token it issued.
struct IssuedToken {
    /// `None` means the lifetime was too large to represent: the token never expires.
    expires_at: Option<Instant>,
    scope: String,
    revoked: bool,
}

/// Result of checking a bearer token presented to the Management API.
pub(crate) enum TokenCheck {
    /// Issued, unexpired and not revoked; carries the token's scope.
    Valid { scope: String },
    /// Issued but past its expiry.
    Expired,
    /// Never issued, or revoked.
    Invalid,
}

/// A freshly issued Management token, as `/oauth/token` reports it.
pub(crate) struct Grant {
    pub access_token: String,
    pub expires_in: u64,
    pub scope: String,
}

/// Everything that changes while the emulator runs.
struct Inner {
    token_lifetime: Duration,
    scope: String,
    latency: Duration,
    tokens: HashMap<String, IssuedToken>,
    users: HashMap<String, Value>,
    faults: HashMap<Endpoint, VecDeque<Fault>>,
    counts: CallCounts,
    user_counts: HashMap<String, u64>,
    seen_paths: Vec<String>,
    /// Index of the fixture key that signs ID tokens.
    signing_key: usize,
    /// Indices of the fixture keys the JWKS publishes, oldest first.
    published_keys: Vec<usize>,
    /// The emulated IdP's refresh tokens and knobs.
    idp: IdpState,
    /// The client's registered public keys and the `jti`s it used.
    jwts: ClientJwts,
    /// The emulated Token Vault's token sets.
    vault: VaultState,
}

/// State shared by the HTTP handlers and the [`super::Emulator`] handle.
pub(crate) struct Shared {
    client_id: String,
    client_secret: SecretString,
    audience: String,
    /// `aud` of client assertions and subject tokens: `{base_url}/`.
    jwt_audience: String,
    id_token_audience: String,
    /// The OAuth client the emulated IdP's token endpoint accepts.
    idp_client_id: String,
    idp_client_secret: SecretString,
    inner: Mutex<Inner>,
    /// Bytes of huge fault bodies handed to connections; outside the mutex, as the body
    /// streams add to it chunk by chunk.
    huge_body_sent: AtomicU64,
}

impl Shared {
    /// Builds the state for the tenant `config` describes, with the Management API
    /// `audience` and these users. It signs ID tokens with the first fixture key and
    /// publishes only that one; its IdP honours the seeded refresh tokens.
    pub(crate) fn new(
        config: EmulatorConfig,
        base_url: &str,
        audience: String,
        users: Vec<Value>,
    ) -> Self {
        let inner = Inner {
            token_lifetime: config.token_lifetime,
            scope: config.scope,
            latency: Duration::ZERO,
            tokens: HashMap::new(),
            users: HashMap::new(),
            faults: HashMap::new(),
            counts: CallCounts::default(),
            user_counts: HashMap::new(),
            seen_paths: Vec::new(),
            signing_key: 0,
            published_keys: vec![0],
            idp: IdpState::seeded(),
            jwts: ClientJwts::default(),
            vault: VaultState::seeded(),
        };
        let shared = Shared {
            client_id: config.client_id,
            client_secret: config.client_secret,
            audience,
            jwt_audience: format!("{base_url}/"),
            id_token_audience: config.id_token_audience,
            idp_client_id: config.idp_client_id,
            idp_client_secret: config.idp_client_secret,
            inner: Mutex::new(inner),
            huge_body_sent: AtomicU64::new(0),
        };
        for user in users {
            shared.upsert_user(user);
        }
        shared
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The audience `/oauth/token` accepts.
    pub(crate) fn audience(&self) -> &str {
        &self.audience
    }

    /// The `aud` of issued ID tokens.
    pub(crate) fn id_token_audience(&self) -> &str {
        &self.id_token_audience
    }

    /// True when both the client id and the secret match the configured ones.
    pub(crate) fn client_matches(&self, client_id: &str, client_secret: &str) -> bool {
        credentials_match(
            (client_id, client_secret),
            (&self.client_id, &self.client_secret),
        )
    }

    /// True when both match the OAuth client the emulated IdP accepts.
    pub(crate) fn idp_client_matches(&self, client_id: &str, client_secret: &str) -> bool {
        credentials_match(
            (client_id, client_secret),
            (&self.idp_client_id, &self.idp_client_secret),
        )
    }

    /// The IdP's client id.
    pub(crate) fn idp_client_id(&self) -> &str {
        &self.idp_client_id
    }

    /// The IdP's client secret.
    pub(crate) fn idp_client_secret(&self) -> &SecretString {
        &self.idp_client_secret
    }

    /// A refresh grant for `refresh_token`, or `None` (`invalid_grant`).
    pub(crate) fn refresh_idp_token(&self, refresh_token: &str) -> Option<IdpGrant> {
        self.lock().idp.refresh(refresh_token)
    }

    /// Makes the IdP honour `refresh_token`.
    pub(crate) fn honour_idp_refresh_token(&self, refresh_token: &str) {
        self.lock().idp.honour(refresh_token);
    }

    /// Makes the IdP refuse `refresh_token` from now on.
    pub(crate) fn revoke_idp_refresh_token(&self, refresh_token: &str) {
        self.lock().idp.revoke(refresh_token);
    }

    pub(crate) fn set_idp_rotation(&self, on: bool) {
        self.lock().idp.set_rotation(on);
    }

    pub(crate) fn set_idp_expires_in(&self, seconds: u64) {
        self.lock().idp.set_expires_in(seconds);
    }

    /// Whether the client authenticates with `private_key_jwt` (keys registered) rather
    /// than its secret, as an Auth0 application does once its credentials are keys.
    pub(crate) fn uses_private_key_jwt(&self) -> bool {
        !self.lock().jwts.assertion_keys.is_empty()
    }

    /// Replaces the keys that verify client assertions; none: back to the secret.
    pub(crate) fn set_assertion_keys(&self, keys: Vec<RegisteredKey>) {
        self.lock().jwts.assertion_keys = keys;
    }

    /// Replaces the keys that verify Privileged Worker subject tokens.
    pub(crate) fn set_subject_keys(&self, keys: Vec<RegisteredKey>) {
        self.lock().jwts.subject_keys = keys;
    }

    /// Accepts `assertion` as `client_id`'s authentication, or says why not.
    pub(crate) fn accept_client_assertion(
        &self,
        client_id: Option<&str>,
        assertion: &str,
    ) -> Result<(), &'static str> {
        if client_id.is_some_and(|given| given != self.client_id) {
            return Err("client_id does not match the assertion");
        }
        let expected = self.expected();
        self.lock().jwts.accept_assertion(assertion, &expected)
    }

    /// The user a Privileged Worker subject token names, or why it is refused.
    pub(crate) fn accept_subject_token(&self, subject_token: &str) -> Result<String, &'static str> {
        let expected = self.expected();
        self.lock().jwts.accept_subject(subject_token, &expected)
    }

    fn expected(&self) -> Expected<'_> {
        Expected {
            client_id: &self.client_id,
            audience: &self.jwt_audience,
            now: epoch_secs(),
        }
    }

    /// Whether `user_id` has an identity of `connection` (whose IdP user id is
    /// `login_hint`, when one is given).
    pub(crate) fn has_identity(
        &self,
        user_id: &str,
        connection: &str,
        login_hint: Option<&str>,
    ) -> bool {
        let Some(user) = self.user(user_id) else {
            return false;
        };
        let identities = user["identities"].as_array().cloned().unwrap_or_default();
        identities.iter().any(|identity| {
            let idp_user_id = match &identity["user_id"] {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            identity["connection"] == connection
                && login_hint.is_none_or(|hint| hint == idp_user_id)
        })
    }

    /// The Token Vault exchange of the user's token set for `connection`.
    pub(crate) fn exchange_token_set(
        &self,
        user_id: &str,
        connection: &str,
    ) -> Result<VaultGrant, VaultRefusal> {
        self.lock().vault.exchange(user_id, connection)
    }

    /// Stores a new token set; returns its access token.
    pub(crate) fn put_token_set(&self, user_id: &str, connection: &str, expires_in: u64) -> String {
        self.lock().vault.put(user_id, connection, expires_in)
    }

    pub(crate) fn remove_token_set(&self, user_id: &str, connection: &str) {
        self.lock().vault.remove(user_id, connection);
    }

    pub(crate) fn expire_token_set(&self, user_id: &str, connection: &str) {
        self.lock().vault.expire(user_id, connection);
    }

    pub(crate) fn set_token_set_refresh_fails(&self, user_id: &str, connection: &str, fails: bool) {
        self.lock()
            .vault
            .set_refresh_fails(user_id, connection, fails);
    }

    pub(crate) fn set_vault_expires_in(&self, seconds: u64) {
        self.lock().vault.set_expires_in(seconds);
    }

    /// Issues and remembers a new Management token with the current lifetime and scope.
    pub(crate) fn issue_token(&self) -> Grant {
        let access_token = random_token("emu_mgmt_");
        let mut inner = self.lock();
        let lifetime = inner.token_lifetime;
        let scope = inner.scope.clone();
        let issued = IssuedToken {
            expires_at: Instant::now().checked_add(lifetime),
            scope: scope.clone(),
            revoked: false,
        };
        inner.tokens.insert(access_token.clone(), issued);
        Grant {
            access_token,
            expires_in: lifetime.as_secs(),
            scope,
        }
    }

    /// Says whether `token` may be used against the Management API right now.
    pub(crate) fn check_token(&self, token: &str) -> TokenCheck {
        let inner = self.lock();
        let Some(issued) = inner.tokens.get(token) else {
            return TokenCheck::Invalid;
        };
        if issued.revoked {
            return TokenCheck::Invalid;
        }
        match issued.expires_at {
            Some(at) if Instant::now() >= at => TokenCheck::Expired,
            _ => TokenCheck::Valid {
                scope: issued.scope.clone(),
            },
        }
    }

    /// Marks every issued token as expired.
    pub(crate) fn expire_tokens(&self) {
        let now = Instant::now();
        for token in self.lock().tokens.values_mut() {
            token.expires_at = Some(now);
        }
    }

    /// Marks every issued token as revoked.
    pub(crate) fn revoke_tokens(&self) {
        for token in self.lock().tokens.values_mut() {
            token.revoked = true;
        }
    }

    pub(crate) fn set_token_lifetime(&self, lifetime: Duration) {
        self.lock().token_lifetime = lifetime;
    }

    pub(crate) fn set_scope(&self, scope: &str) {
        self.lock().scope = scope.to_owned();
    }

    pub(crate) fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    pub(crate) fn latency(&self) -> Duration {
        self.lock().latency
    }

    /// Appends faults to the queue of `endpoint`.
    pub(crate) fn push_faults(&self, endpoint: Endpoint, faults: Vec<Fault>) {
        self.lock()
            .faults
            .entry(endpoint)
            .or_default()
            .extend(faults);
    }

    /// Takes the next queued fault for `endpoint`, if any.
    pub(crate) fn next_fault(&self, endpoint: Endpoint) -> Option<Fault> {
        self.lock().faults.get_mut(&endpoint)?.pop_front()
    }

    /// Adds or replaces a user keyed by its `user_id`; returns false when it has none.
    pub(crate) fn upsert_user(&self, user: Value) -> bool {
        let Some(id) = user.get("user_id").and_then(Value::as_str) else {
            return false;
        };
        let id = id.to_owned();
        self.lock().users.insert(id, user);
        true
    }

    pub(crate) fn remove_user(&self, user_id: &str) {
        self.lock().users.remove(user_id);
    }

    pub(crate) fn user(&self, user_id: &str) -> Option<Value> {
        self.lock().users.get(user_id).cloned()
    }

    /// Counts one call that reached the handler of `endpoint` (`None` = any other route).
    pub(crate) fn count(&self, endpoint: Option<Endpoint>) {
        let mut inner = self.lock();
        let counter = match endpoint {
            Some(Endpoint::Token) => &mut inner.counts.token,
            Some(Endpoint::Users) => &mut inner.counts.users,
            Some(Endpoint::Jwks) => &mut inner.counts.jwks,
            Some(Endpoint::IdpToken) => &mut inner.counts.idp_token,
            Some(Endpoint::TokenExchange) => &mut inner.counts.token_exchange,
            None => &mut inner.counts.other,
        };
        *counter += 1;
    }

    /// Counts one `/api/v2/users/{id}` call for the decoded `user_id`.
    pub(crate) fn count_user(&self, user_id: &str) {
        *self
            .lock()
            .user_counts
            .entry(user_id.to_owned())
            .or_default() += 1;
    }

    pub(crate) fn record_path(&self, path: &str) {
        self.lock().seen_paths.push(path.to_owned());
    }

    /// Counts `bytes` more of a huge fault body handed to a connection.
    pub(crate) fn count_huge_body_bytes(&self, bytes: u64) {
        self.huge_body_sent.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn huge_body_bytes_sent(&self) -> u64 {
        self.huge_body_sent.load(Ordering::Relaxed)
    }

    pub(crate) fn calls(&self) -> CallCounts {
        self.lock().counts
    }

    pub(crate) fn user_calls_for(&self, user_id: &str) -> u64 {
        self.lock().user_counts.get(user_id).copied().unwrap_or(0)
    }

    pub(crate) fn seen_paths(&self) -> Vec<String> {
        self.lock().seen_paths.clone()
    }

    /// Zeroes the call counters and forgets the seen paths (tokens, users and faults stay).
    pub(crate) fn reset_counters(&self) {
        let mut inner = self.lock();
        inner.counts = CallCounts::default();
        inner.user_counts.clear();
        inner.seen_paths.clear();
        self.huge_body_sent.store(0, Ordering::Relaxed);
    }

    /// The JWKS document: `{"keys": [...]}` with every published key, oldest first.
    pub(crate) fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .lock()
            .published_keys
            .iter()
            .map(|index| signing::key(*index).jwk())
            .collect();
        serde_json::json!({ "keys": keys })
    }

    /// Index of the current signing key and of a fixture key that is not published.
    pub(crate) fn signing_keys(&self) -> (usize, usize) {
        let inner = self.lock();
        let current = inner.signing_key;
        let unpublished = (1..KEY_COUNT)
            .map(|step| (current + step) % KEY_COUNT)
            .find(|index| !inner.published_keys.contains(index))
            .unwrap_or((current + 1) % KEY_COUNT);
        (current, unpublished)
    }

    /// Key ids of the current signing key and of every published key.
    pub(crate) fn key_ids(&self) -> (String, Vec<String>) {
        let inner = self.lock();
        let kid = |index: &usize| signing::key(*index).kid.to_owned();
        let published = inner.published_keys.iter().map(kid).collect();
        (kid(&inner.signing_key), published)
    }

    /// Signs with the next fixture key (wrapping after the last) and publishes the previous
    /// and the new one; returns the new key id.
    pub(crate) fn rotate_signing_key(&self) -> String {
        let mut inner = self.lock();
        let previous = inner.signing_key;
        let next = (previous + 1) % KEY_COUNT;
        inner.signing_key = next;
        inner.published_keys = vec![previous, next];
        signing::key(next).kid.to_owned()
    }

    /// Publishes only the current signing key.
    pub(crate) fn revoke_previous_signing_key(&self) {
        let mut inner = self.lock();
        inner.published_keys = vec![inner.signing_key];
    }
}

/// A fresh opaque token: `prefix` and random letters and digits.
pub(crate) fn random_token(prefix: &str) -> String {
    let random: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(TOKEN_RANDOM_LEN)
        .map(char::from)
        .collect();
    format!("{prefix}{random}")
}

/// Whether `given` (id, secret) matches `expected`, comparing both in full whatever
/// differs first.
fn credentials_match(given: (&str, &str), expected: (&str, &SecretString)) -> bool {
    let id_ok = constant_time_eq(given.0.as_bytes(), expected.0.as_bytes());
    let secret = expected.1.expose_secret().as_bytes();
    let secret_ok = constant_time_eq(given.1.as_bytes(), secret);
    id_ok & secret_ok
}

/// Compares two byte strings without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
