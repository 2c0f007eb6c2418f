//! A cached user and how long it lives: it answers lookups for the TTL (never
//! past a known token expiry; a miss for the negative TTL), then stays on for
//! the stale-if-error window as the copy to serve when Auth0 fails.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::Expiry;

use super::CacheSettings;
use crate::auth0::UserIdentities;
use crate::user_id::UserId;

/// A user as the cache holds it: found, or known not to exist.
#[derive(Clone)]
pub(super) enum UserState {
    Found(Arc<UserIdentities>),
    NotFound,
}

/// A cache entry, the logical time its Auth0 read started (so a read that
/// began before an `InvalidateUser` or `bypass_cache` cannot bring the old
/// profile back when it lands late), and until when it answers lookups.
#[derive(Clone)]
pub(super) struct CachedUser {
    pub(super) state: UserState,
    pub(super) read_started: u64,
    /// After this the entry is only a stale-if-error fallback.
    pub(super) fresh_until: Instant,
}

impl CachedUser {
    /// The entry for what a read that started at logical time `read_started`
    /// found, fresh from now for as long as `settings` allow.
    pub(super) fn new(state: UserState, read_started: u64, settings: &CacheSettings) -> Self {
        Self {
            fresh_until: Instant::now() + fresh_lifetime(&state, settings),
            state,
            read_started,
        }
    }

    /// Whether the entry still answers lookups without a read of Auth0.
    pub(super) fn is_fresh(&self) -> bool {
        Instant::now() < self.fresh_until
    }

    /// The same entry, fresh for at most `limit` from now (a shared value
    /// is fresh no longer than where it was read from).
    pub(super) fn fresh_for_at_most(mut self, limit: Duration) -> Self {
        self.fresh_until = self.fresh_until.min(Instant::now() + limit);
        self
    }

    /// How long the entry stays fresh from now (what the fleet's copy may live).
    pub(super) fn fresh_left(&self) -> Duration {
        self.fresh_until.saturating_duration_since(Instant::now())
    }

    /// The user found, or `None` when Auth0 has no such user.
    pub(super) fn found(&self) -> Option<&UserIdentities> {
        match &self.state {
            UserState::Found(user) => Some(user),
            UserState::NotFound => None,
        }
    }

    /// How old the entry is, if it may be served stale: a found user none
    /// of whose tokens is known to have expired (while Auth0 fails, an
    /// expired token is UNAVAILABLE, not a reason to send the user back).
    pub(super) fn stale_age(&self) -> Option<Duration> {
        match &self.state {
            UserState::Found(user) => {
                (!user.has_expired_token()).then(|| user.fetched_instant.elapsed())
            }
            UserState::NotFound => None,
        }
    }
}

/// How long a read answers lookups: the TTL, never past a known token
/// expiry; a miss for the negative TTL.
fn fresh_lifetime(state: &UserState, settings: &CacheSettings) -> Duration {
    match state {
        UserState::NotFound => settings.negative_ttl,
        UserState::Found(user) => match user.earliest_token_expiry() {
            Some(expiry) => settings.user_ttl.min(time_until(expiry)),
            None => settings.user_ttl,
        },
    }
}

/// Keeps a found user until its freshness ends plus the stale-if-error
/// window, but never past a known token expiry; a miss only while fresh.
pub(super) struct UserExpiry {
    pub(super) stale_if_error: Duration,
}

impl UserExpiry {
    fn lifetime(&self, user: &CachedUser) -> Duration {
        let fresh = user.fresh_until.saturating_duration_since(Instant::now());
        match &user.state {
            UserState::NotFound => fresh,
            UserState::Found(found) => {
                let kept = fresh.saturating_add(self.stale_if_error);
                match found.earliest_token_expiry() {
                    Some(expiry) => kept.min(time_until(expiry)),
                    None => kept,
                }
            }
        }
    }
}

fn time_until(at: SystemTime) -> Duration {
    at.duration_since(SystemTime::now()).unwrap_or_default()
}

impl Expiry<UserId, CachedUser> for UserExpiry {
    fn expire_after_create(
        &self,
        _key: &UserId,
        user: &CachedUser,
        _at: Instant,
    ) -> Option<Duration> {
        Some(self.lifetime(user))
    }

    fn expire_after_update(
        &self,
        _key: &UserId,
        user: &CachedUser,
        _at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.lifetime(user))
    }
}
