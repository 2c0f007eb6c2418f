//! What the IdP refresher and the Token Vault keep per user and connection:
//! tokens until they expire, and the memory of `forget_user` calls that makes
//! a token landing after one keep nothing.
//!
//! Both fetch tokens on a caller's behalf and keep them for the next caller
//! (`idp::IdpRefresher`, `vault::TokenVault`); both must drop everything of a
//! user on InvalidateUser or `bypass_cache`, including what a fetch begun
//! before it brings back afterwards. One implementation, so the two cannot
//! drift apart.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use moka::sync::Cache;
use moka::Expiry;
use secrecy::SecretString;

/// Whose token, from which connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    /// The Auth0 user id.
    pub user_id: String,
    /// The Auth0 connection: a name from the connections file, never caller
    /// input, since it labels metrics and names a rate limit of its own.
    pub connection: String,
}

/// A token fetched on a caller's behalf and kept for the next: refreshed at
/// an IdP, exchanged at Token Vault, or shared by another replica of the
/// fleet (which stores and hands back exactly this). One type, so no copy
/// between them can drift.
#[derive(Debug, Clone)]
pub struct KeptToken {
    /// The access token; `Debug` prints `[REDACTED]`.
    pub access_token: SecretString,
    /// When the request that got it was sent: its issue time at the latest.
    pub issued_at: SystemTime,
    /// When it stops working.
    pub expires_at: SystemTime,
    /// The scopes it carries, as the IdP or Auth0 listed them.
    pub scopes: Vec<String>,
}

/// The tokens one fetcher keeps per user and connection until they expire,
/// with the memory of `forget_user` calls and the connections to walk when
/// forgetting a user.
pub struct KeptTokens {
    tokens: Cache<TokenKey, Arc<KeptToken>>,
    forgetting: Forgetting,
    /// Every connection a token was ever kept for: names from the
    /// connections file, so few.
    connections: RwLock<HashSet<String>>,
}

impl KeptTokens {
    /// Up to `capacity` tokens; a `forget_user` is remembered for
    /// `forget_memory`, longer than any fetch may take.
    pub fn new(capacity: u64, forget_memory: Duration) -> Self {
        Self {
            tokens: Cache::builder()
                .max_capacity(capacity)
                .expire_after(UntilExpiry)
                .build(),
            forgetting: Forgetting::new(capacity, forget_memory),
            connections: RwLock::default(),
        }
    }

    /// The logical time a fetch starts at (see [`KeptTokens::keep`]).
    pub fn tick(&self) -> u64 {
        self.forgetting.tick()
    }

    /// The kept token of `key` if it lives longer than `min_valid_for`.
    pub fn usable(&self, key: &TokenKey, min_valid_for: Duration) -> Option<Arc<KeptToken>> {
        let token = self.tokens.get(key)?;
        lives_for(token.expires_at, min_valid_for).then_some(token)
    }

    /// Keeps what a fetch begun at `started` got (`what`: how), unless its
    /// user was forgotten since; logged at debug, never the token. The
    /// token, shared, for the caller.
    pub fn keep(
        &self,
        key: &TokenKey,
        token: KeptToken,
        started: u64,
        what: &'static str,
    ) -> Arc<KeptToken> {
        self.note_connection(&key.connection);
        self.forgetting
            .keep_token(&self.tokens, key, token, started, what)
    }

    /// Drops every token of `user_id`; a fetch under way for the user keeps
    /// nothing when it lands.
    pub fn forget_user(&self, user_id: &str) {
        // Marked before dropping: a fetch landing meanwhile either sees the
        // mark or put its entry in before the drops below.
        self.forgetting.forget(user_id);
        for connection in self.connections() {
            self.tokens.invalidate(&TokenKey {
                user_id: user_id.to_owned(),
                connection,
            });
        }
    }

    /// Drops every token (a fleet replica that may have missed invalidations).
    pub fn forget_all(&self) {
        self.forgetting.forget_all();
        self.tokens.invalidate_all();
    }

    /// The memory of forgetting, for what else a fetcher keeps per user.
    pub fn forgetting(&self) -> &Forgetting {
        &self.forgetting
    }

    /// How many tokens are kept.
    pub fn count(&self) -> u64 {
        self.tokens.entry_count()
    }

    fn connections(&self) -> Vec<String> {
        let connections = self
            .connections
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        connections.iter().cloned().collect()
    }

    fn note_connection(&self, connection: &str) {
        let known = self
            .connections
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(connection);
        if !known {
            self.connections
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(connection.to_owned());
        }
    }
}

/// A kept token is dropped when it expires, not after a fixed TTL.
struct UntilExpiry;

impl Expiry<TokenKey, Arc<KeptToken>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &TokenKey,
        token: &Arc<KeptToken>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(time_left(token.expires_at))
    }

    fn expire_after_update(
        &self,
        _key: &TokenKey,
        token: &Arc<KeptToken>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(time_left(token.expires_at))
    }
}

/// How long until `expires_at`; zero once it has passed.
pub fn time_left(expires_at: SystemTime) -> Duration {
    expires_at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

/// Whether a token expiring at `expires_at` still lives `min_valid_for`.
pub fn lives_for(expires_at: SystemTime, min_valid_for: Duration) -> bool {
    SystemTime::now()
        .checked_add(min_valid_for)
        .is_some_and(|needed_until| expires_at > needed_until)
}

/// A logical clock ordering fetches and `forget_user` calls, and each user's
/// latest `forget_user` for as long as a fetch begun before it may land.
pub struct Forgetting {
    /// Logical clock ordering fetches and `forget_user` calls.
    ticks: AtomicU64,
    /// Tick of the latest `forget_user`: fetches that began after it skip
    /// the lookup in `forgotten`.
    last_forget: AtomicU64,
    /// Tick of each user's latest `forget_user`.
    forgotten: Cache<String, u64>,
    /// Tick of the latest [`Forgetting::forget_all`].
    forgot_all: AtomicU64,
}

impl Forgetting {
    /// Remembers up to `capacity` users' `forget_user` for `memory`: longer
    /// than any fetch may take, so every fetch begun before one has landed.
    pub fn new(capacity: u64, memory: Duration) -> Self {
        Self {
            ticks: AtomicU64::new(1),
            last_forget: AtomicU64::new(0),
            forgotten: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(memory)
                .build(),
            forgot_all: AtomicU64::new(0),
        }
    }

    /// The next logical time: take one when a fetch starts.
    pub fn tick(&self) -> u64 {
        self.ticks.fetch_add(1, Ordering::SeqCst)
    }

    /// Marks `user_id` forgotten now. Call it before dropping the user's
    /// entries: a fetch landing meanwhile either sees the mark or put its
    /// entry in before the drops (see [`Self::keep`]).
    pub fn forget(&self, user_id: &str) {
        let at = self.tick();
        self.forgotten.insert(user_id.to_owned(), at);
        self.last_forget.fetch_max(at, Ordering::SeqCst);
    }

    /// Marks every user forgotten now (a fleet replica that may have missed
    /// invalidations); call it before dropping every entry.
    pub fn forget_all(&self) {
        let at = self.tick();
        self.forgot_all.fetch_max(at, Ordering::SeqCst);
        self.last_forget.fetch_max(at, Ordering::SeqCst);
    }

    /// Puts what a fetch begun at `started` learnt into `cache`, unless the
    /// user was forgotten since. Inserted first and checked after: a
    /// `forget` racing it either drops the entry or is seen here.
    pub fn keep<V>(&self, cache: &Cache<TokenKey, V>, key: &TokenKey, value: V, started: u64)
    where
        V: Clone + Send + Sync + 'static,
    {
        cache.insert(key.clone(), value);
        if self.forgotten_since(&key.user_id, started) {
            cache.invalidate(key);
        }
    }

    /// [`Self::keep`] for a token, logged at debug as kept (`what`: how it
    /// was got), never the token itself. The token, shared, for the caller.
    fn keep_token(
        &self,
        cache: &Cache<TokenKey, Arc<KeptToken>>,
        key: &TokenKey,
        token: KeptToken,
        started: u64,
        what: &'static str,
    ) -> Arc<KeptToken> {
        let expires_in_secs = time_left(token.expires_at).as_secs();
        let token = Arc::new(token);
        self.keep(cache, key, token.clone(), started);
        tracing::debug!(
            user_id = &*crate::logsafe::capped(&key.user_id),
            connection = key.connection.as_str(),
            expires_in_secs,
            what,
            "token kept"
        );
        token
    }

    /// Whether `forget(user_id)` was called after logical time `started`.
    fn forgotten_since(&self, user_id: &str, started: u64) -> bool {
        if self.last_forget.load(Ordering::SeqCst) < started {
            return false;
        }
        if self.forgot_all.load(Ordering::SeqCst) > started {
            return true;
        }
        self.forgotten.get(user_id).is_some_and(|at| at > started)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        TokenKey {
            user_id: "u".into(),
            connection: "c".into(),
        }
    }

    #[test]
    fn a_fetch_begun_before_a_forget_keeps_nothing_and_one_after_keeps() {
        let forgetting = Forgetting::new(10, Duration::from_secs(60));
        let cache: Cache<TokenKey, u8> = Cache::new(10);
        let before = forgetting.tick();
        forgetting.forget("u");
        forgetting.keep(&cache, &key(), 1, before);
        assert_eq!(cache.get(&key()), None);
        let after = forgetting.tick();
        forgetting.keep(&cache, &key(), 2, after);
        assert_eq!(cache.get(&key()), Some(2));
    }

    #[test]
    fn a_fetch_begun_before_forget_all_keeps_nothing() {
        let forgetting = Forgetting::new(10, Duration::from_secs(60));
        let cache: Cache<TokenKey, u8> = Cache::new(10);
        let before = forgetting.tick();
        forgetting.forget_all();
        forgetting.keep(&cache, &key(), 1, before);
        assert_eq!(cache.get(&key()), None);
        let after = forgetting.tick();
        forgetting.keep(&cache, &key(), 2, after);
        assert_eq!(cache.get(&key()), Some(2));
    }

    #[test]
    fn a_token_must_outlive_what_is_asked() {
        let in_ten_minutes = SystemTime::now() + Duration::from_secs(600);
        assert!(lives_for(in_ten_minutes, Duration::from_secs(60)));
        assert!(!lives_for(in_ten_minutes, Duration::from_secs(900)));
        assert_eq!(
            time_left(SystemTime::now() - Duration::from_secs(1)),
            Duration::ZERO
        );
    }
}
