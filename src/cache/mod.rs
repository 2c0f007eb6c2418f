//! The moka cache of users in front of Auth0 and the reads that fill it.
//!
//! * Users: all identities of a user, keyed by user id, bounded by a user
//!   count and by an estimate of the bytes they hold (`weigh.rs`). An entry
//!   answers lookups for the configured TTL (never past a known token
//!   expiry), then stays on for the stale-if-error window as the copy to
//!   serve if Auth0 fails; one entry per user serves both. A 404 is
//!   remembered briefly. Concurrent reads of one user share one
//!   `/api/v2/users` call.
//!
//! A cache hit costs one moka `get` and one atomic load: the per-user
//! invalidation stamps are only consulted when some invalidation happened
//! after the entry was read.
//!
//! In a fleet (`--redis-url`) a miss asks the shared tier before Auth0,
//! and invalidations go to every replica (`shared.rs`, over `fleet`); a hit
//! is the same as alone.
//!
//! Here: the store and its reads; `expiry.rs` holds an entry's lifetime
//! rules, `weigh.rs` its weight, `shared.rs` the fleet's part of a miss.
//! Auth0 (`auth0::Auth0Client::read_user`) is asked for a user and keeps its
//! own Management token.

mod expiry;
mod shared;
#[cfg(test)]
mod tests;
mod weigh;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::sync::Cache as SyncCache;
use tokio::time::Instant as Deadline;

use crate::auth0::{Auth0Client, Auth0Error, UserIdentities};
use crate::budget::CallerShare;
use crate::error::BrokerError;
use crate::fleet::Fleet;
use crate::stats::{self, CacheOutcome};
use crate::user_id::UserId;
use expiry::{CachedUser, UserExpiry, UserState};
use weigh::UserBudget;

/// Cache sizing and lifetimes.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    /// How long a read answers lookups: longer saves Auth0 calls, shorter
    /// brings a user's new tokens sooner.
    pub user_ttl: Duration,
    /// Users held at most.
    pub user_capacity: u64,
    /// Estimated bytes the users held may take at most: the bound that holds when profiles
    /// are large, beside `user_capacity` (see `cache::IdentityStore`).
    pub user_max_bytes: u64,
    /// How long "no such user" is remembered, so asking again and again for
    /// a missing user does not spend the Auth0 budget.
    pub negative_ttl: Duration,
}

/// Why a shared read gave no user.
enum SharedReadError {
    /// The read failed (Auth0, or this caller's own share).
    Failed(BrokerError),
    /// Another caller ran the read and its share was spent: nothing about
    /// this caller, which may try on its own share.
    OthersShareSpent,
}

impl SharedReadError {
    fn into_broker_error(self) -> BrokerError {
        match self {
            Self::Failed(error) => error,
            Self::OthersShareSpent => BrokerError::Auth0RateLimited {
                reason: "another caller's share of the Auth0 budget is spent".to_owned(),
                retry_after: None,
            },
        }
    }
}

/// What a lookup returns: the user and whether this RPC was served from cache.
pub struct Lookup {
    /// The identities, shared with the cache entry rather than copied.
    pub user: Arc<UserIdentities>,
    /// True when the identities were read from Auth0 before this lookup began.
    pub from_cache: bool,
}

/// Caches users' identities in front of one Auth0 tenant.
pub struct IdentityStore {
    /// Reads users (its Management token is its own business).
    auth0: Auth0Client,
    /// Fresh entries, and expired ones kept for stale-if-error. moka's
    /// sync cache: a lookup's future then holds no moka future (700 bytes),
    /// which keeps every RPC's boxed future small (see `cached_or_read`).
    /// Its calls never wait on IO; housekeeping on reads only runs when its
    /// lock is free.
    users: SyncCache<UserId, CachedUser>,
    /// Holds nothing for longer than a read: its `try_get_with` is how
    /// concurrent reads of one user share one Auth0 call, whether the user is
    /// absent from `users` or only held there stale.
    reads: Cache<UserId, CachedUser>,
    /// Logical clock for reads and invalidations.
    clock: AtomicU64,
    /// Clock value of the latest invalidation of any user: entries read after
    /// it need no look at `invalidated_at`.
    last_invalidation: AtomicU64,
    /// When each user was last invalidated or refreshed; entries read before
    /// that are superseded. Lives as long as a user entry can.
    invalidated_at: SyncCache<UserId, u64>,
    /// How often a stale entry was served because Auth0 failed.
    stale_serves: AtomicU64,
    /// Clock value of the latest time everything was dropped (the fleet's
    /// channel came back after an outage): entries read before it are
    /// superseded, like those of an invalidated user.
    forgot_all_at: AtomicU64,
    /// The shared tier under moka, when the broker runs in a fleet.
    fleet: Option<Arc<Fleet>>,
    settings: CacheSettings,
}

/// Default stale-if-error window: how long past its TTL a user may still be
/// served when Auth0 is failing.
pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(600);
/// Default time a user's identities answer lookups: short enough that a
/// re-linked account shows within minutes, long enough to spare the quota.
pub const DEFAULT_USER_TTL: Duration = Duration::from_secs(300);
/// Default number of users held.
pub const DEFAULT_USER_CAPACITY: u64 = 100_000;
/// Default time "no such user" is remembered, so a caller in a retry loop
/// cannot burn the quota.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(30);

/// Default byte budget of the user cache (`--user-cache-max-bytes`): 256 MiB,
/// half the Deployment's memory limit. The default 100 000 users of about
/// 850 bytes each take a third of it; the budget only binds when profiles are
/// large (many identities, long tokens).
pub const DEFAULT_USER_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// The `reads` cache only coalesces reads: each is removed when it completes.
/// This TTL only bounds one left behind by a lookup cancelled at that moment.
const READ_COALESCING_TTL: Duration = Duration::from_secs(1);

impl IdentityStore {
    /// Builds empty caches sized by `settings`, with the default
    /// stale-if-error window.
    pub fn new(auth0: Auth0Client, settings: CacheSettings) -> Self {
        let reads = Cache::builder()
            .max_capacity(settings.user_capacity)
            .time_to_live(READ_COALESCING_TTL)
            .build();
        Self {
            auth0,
            users: users_cache(&settings, DEFAULT_STALE_IF_ERROR),
            reads,
            clock: AtomicU64::new(1),
            last_invalidation: AtomicU64::new(0),
            invalidated_at: stamps_cache(&settings, DEFAULT_STALE_IF_ERROR),
            stale_serves: AtomicU64::new(0),
            forgot_all_at: AtomicU64::new(0),
            fleet: None,
            settings,
        }
    }

    /// Serve a user up to `window` past its TTL when Auth0 fails (never a
    /// token past its known expiry); zero turns stale-if-error off. Call it
    /// before the first lookup: it starts with an empty user cache.
    pub fn with_stale_if_error(mut self, window: Duration) -> Self {
        self.users = users_cache(&self.settings, window);
        self.invalidated_at = stamps_cache(&self.settings, window);
        self
    }

    /// Users held now, stale-if-error copies included (moka's count, settled first).
    pub async fn cached_users(&self) -> u64 {
        self.users.run_pending_tasks();
        self.users.entry_count()
    }

    /// Stale entries served since start.
    pub fn stale_serves(&self) -> u64 {
        self.stale_serves.load(Ordering::Relaxed)
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// The user's identities, from cache when fresh, else read from Auth0
    /// at the cost of one request of `share`. Calls to Auth0 made for this
    /// lookup stop retrying before `deadline`. When Auth0 fails, a recently
    /// expired entry may be served (stale-if-error).
    pub async fn lookup(
        &self,
        user_id: &UserId,
        share: CallerShare<'_>,
        deadline: Option<Deadline>,
    ) -> Result<Lookup, BrokerError> {
        let started = Instant::now();
        let cached = self.cached_or_read(user_id, share, deadline).await?;
        Self::answer(cached, started)
    }

    /// The user's identities read from Auth0 now (`bypass_cache`), at the
    /// cost of one request of `share`; whatever was cached is superseded.
    /// Never answered stale: the caller asked for a fresh read.
    pub async fn reread(
        &self,
        user_id: &UserId,
        share: CallerShare<'_>,
        deadline: Option<Deadline>,
    ) -> Result<Lookup, BrokerError> {
        let started = Instant::now();
        self.mark_invalidated(user_id);
        // Boxed like the read in `cached_or_read`: see there.
        let cached = Box::pin(self.fresh_read(user_id, share, deadline)).await?;
        Self::answer(cached, started)
    }

    /// The read of `reread`: alone, this caller's share then Auth0; in a
    /// fleet, the user is first forgotten fleet-wide and its lock taken, so
    /// others wait for this read and get its result.
    async fn fresh_read(
        &self,
        user_id: &UserId,
        share: CallerShare<'_>,
        deadline: Option<Deadline>,
    ) -> Result<CachedUser, BrokerError> {
        let Some(fleet) = &self.fleet else {
            share.spend(deadline).await?;
            return Ok(self.read_and_keep(user_id, deadline).await?);
        };
        let guard = fleet.take_over(user_id).await;
        self.read_as_holder(user_id, guard, share, deadline).await
    }

    fn answer(cached: CachedUser, started: Instant) -> Result<Lookup, BrokerError> {
        match cached.state {
            UserState::Found(user) => {
                let from_cache = user.fetched_instant < started;
                stats::cache_lookup(if from_cache {
                    CacheOutcome::Hit
                } else {
                    CacheOutcome::Miss
                });
                Ok(Lookup { from_cache, user })
            }
            UserState::NotFound => Err(BrokerError::UserNotFound),
        }
    }

    /// A fresh cached entry, else one shared read of Auth0; if that read
    /// fails because Auth0 is failing, the expired entry (stale-if-error).
    /// An entry read before an invalidation of its user is never served.
    async fn cached_or_read(
        &self,
        user_id: &UserId,
        share: CallerShare<'_>,
        deadline: Option<Deadline>,
    ) -> Result<CachedUser, BrokerError> {
        let held = match self.users.get(user_id) {
            Some(entry) if self.superseded(user_id, &entry, u64::MAX) => {
                self.users.invalidate(user_id);
                None
            }
            Some(entry) if entry.is_fresh() => return Ok(entry),
            held => held,
        };
        // Boxed so that only a miss pays for the read's future (about 10 KiB:
        // moka's read coalescing and the Auth0 calls). Inline, every lookup's
        // future, and so every RPC's, would be that large: allocated and
        // copied per request even when the answer is a cache hit.
        Box::pin(self.read_or_stale(user_id, held, share, deadline)).await
    }

    /// One shared read of Auth0 for a user not freshly cached; `held` is the
    /// expired copy, if any, served when Auth0 is failing (stale-if-error)
    /// or when the caller's share of the Auth0 budget is spent.
    async fn read_or_stale(
        &self,
        user_id: &UserId,
        held: Option<CachedUser>,
        share: CallerShare<'_>,
        deadline: Option<Deadline>,
    ) -> Result<CachedUser, BrokerError> {
        let lookup_started = self.tick();
        match self.shared_read(user_id, share, deadline).await {
            Ok(read) if self.superseded(user_id, &read, lookup_started) => {
                self.shared_read(user_id, share, deadline).await
            }
            Ok(read) => Ok(read),
            Err(error) => self.stale_or(user_id, held, error),
        }
    }

    /// Whether the user was invalidated after `entry`'s read started and
    /// before logical time `before`: a lookup that began before an
    /// invalidation may still be answered with what was read before it.
    fn superseded(&self, user_id: &UserId, entry: &CachedUser, before: u64) -> bool {
        if entry.read_started > self.last_invalidation.load(Ordering::SeqCst) {
            return false;
        }
        let forgot_all = self.forgot_all_at.load(Ordering::SeqCst);
        if entry.read_started < forgot_all && forgot_all < before {
            return true;
        }
        self.invalidated_at
            .get(user_id)
            .is_some_and(|invalidated| entry.read_started < invalidated && invalidated < before)
    }

    /// The expired copy `held` when `error` says Auth0 is failing and the
    /// copy holds no token known to have expired; else `error`.
    fn stale_or(
        &self,
        user_id: &UserId,
        held: Option<CachedUser>,
        error: BrokerError,
    ) -> Result<CachedUser, BrokerError> {
        let auth0_failing = error.is_auth0_failing();
        let servable = held.filter(|_| auth0_failing);
        let Some((age, stale)) = servable.and_then(|entry| Some((entry.stale_age()?, entry)))
        else {
            return Err(error);
        };
        self.stale_serves.fetch_add(1, Ordering::Relaxed);
        stats::cache_lookup(CacheOutcome::Stale);
        tracing::warn!(
            user_id = user_id.as_str(),
            age_secs = age.as_secs(),
            %error,
            "Auth0 failing: serving a stale cached user"
        );
        Ok(stale)
    }

    /// Concurrent reads share one, paid for from the share of the caller
    /// whose future runs it; callers that join it pay nothing. If that
    /// caller's share is spent, the joiners are not refused for it: each
    /// tries once more on its own share. If the caller whose future runs the
    /// read goes away, moka hands the read to a caller still waiting; when
    /// none is left, nothing keeps running.
    async fn shared_read(
        &self,
        user_id: &UserId,
        share: CallerShare<'_>,
        deadline: Option<Deadline>,
    ) -> Result<CachedUser, BrokerError> {
        match self.shared_read_once(user_id, share, deadline).await {
            Err(SharedReadError::OthersShareSpent) => {
                match self.shared_read_once(user_id, share, deadline).await {
                    Err(SharedReadError::OthersShareSpent) => Err(BrokerError::Auth0RateLimited {
                        reason: "Auth0 reads for this user are refused: the callers asking have spent their share of the Auth0 budget".to_owned(),
                        retry_after: None,
                    }),
                    other => other.map_err(SharedReadError::into_broker_error),
                }
            }
            other => other.map_err(SharedReadError::into_broker_error),
        }
    }

    async fn shared_read_once(
        &self,
        user_id: &UserId,
        share: CallerShare<'_>,
        deadline: Option<Deadline>,
    ) -> Result<CachedUser, SharedReadError> {
        let ran_here = std::sync::atomic::AtomicBool::new(false);
        let read = self
            .reads
            .try_get_with_by_ref(user_id, async {
                ran_here.store(true, Ordering::Relaxed);
                self.read_missing(user_id, share, deadline).await
            })
            .await;
        // The read is over and its waiters have their answer: the next miss
        // must read Auth0 again, not reuse this one.
        self.reads.invalidate(user_id).await;
        read.map_err(|shared| match &*shared {
            BrokerError::CallerShareSpent { .. } if !ran_here.load(Ordering::Relaxed) => {
                SharedReadError::OthersShareSpent
            }
            error => SharedReadError::Failed(error.clone()),
        })
    }

    /// The read of a user missing from `users` (or held only stale): alone,
    /// this caller's share then Auth0; in a fleet, the shared tier first.
    async fn read_missing(
        &self,
        user_id: &UserId,
        share: CallerShare<'_>,
        deadline: Option<Deadline>,
    ) -> Result<CachedUser, BrokerError> {
        if let Some(fleet) = &self.fleet {
            return self.read_through(fleet, user_id, share, deadline).await;
        }
        share.spend(deadline).await?;
        Ok(self.read_and_keep(user_id, deadline).await?)
    }

    /// Reads the user from Auth0 and caches the answer, unless an
    /// invalidation came while the read was under way.
    async fn read_and_keep(
        &self,
        user_id: &UserId,
        deadline: Option<Deadline>,
    ) -> Result<CachedUser, Auth0Error> {
        let read = self.read_user(user_id, deadline).await?;
        self.keep(user_id, &read);
        Ok(read)
    }

    /// Caches `read`, unless an invalidation came after it started.
    fn keep(&self, user_id: &UserId, read: &CachedUser) {
        if !self.superseded(user_id, read, u64::MAX) {
            self.users.insert(user_id.clone(), read.clone());
        }
    }

    /// Drops the cached user, so the next lookup reads Auth0 (and no stale
    /// copy of it is ever served); in a fleet, on every replica.
    pub async fn invalidate(&self, user_id: &UserId) {
        self.forget_user(user_id);
        if let Some(fleet) = &self.fleet {
            fleet.invalidate(user_id).await;
        }
    }

    /// Drops the cached user here only.
    fn forget_user(&self, user_id: &UserId) {
        self.mark_invalidated(user_id);
        self.users.invalidate(user_id);
    }

    fn mark_invalidated(&self, user_id: &UserId) {
        let now = self.tick();
        self.invalidated_at.insert(user_id.clone(), now);
        self.last_invalidation.fetch_max(now, Ordering::SeqCst);
    }

    /// Has Auth0 obtain its Management token now ([`Auth0Client::warm_up`]);
    /// used to tell readiness and to fail fast on bad credentials.
    pub async fn warm_up(&self) -> Result<(), BrokerError> {
        self.auth0.warm_up(None).await.map_err(BrokerError::from)
    }

    /// Reads the user from Auth0 as a cache entry: found, or known not to exist.
    async fn read_user(
        &self,
        user_id: &UserId,
        deadline: Option<Deadline>,
    ) -> Result<CachedUser, Auth0Error> {
        let read_started = self.tick();
        let state = match self.auth0.read_user(user_id, deadline).await {
            Ok(user) => UserState::Found(Arc::new(user)),
            Err(Auth0Error::UserNotFound) => UserState::NotFound,
            Err(error) => return Err(error),
        };
        Ok(CachedUser::new(state, read_started, &self.settings))
    }
}

/// The user cache, keeping entries `stale_if_error` past their freshness,
/// bounded in users and bytes ([`UserBudget`]).
fn users_cache(
    settings: &CacheSettings,
    stale_if_error: Duration,
) -> SyncCache<UserId, CachedUser> {
    let budget = UserBudget::new(settings);
    SyncCache::builder()
        .max_capacity(budget.max_weight)
        .weigher(move |user_id: &UserId, entry: &CachedUser| budget.weight(user_id, entry))
        .expire_after(UserExpiry { stale_if_error })
        .build()
}

/// Invalidation stamps, kept as long as the entry they may supersede.
fn stamps_cache(settings: &CacheSettings, stale_if_error: Duration) -> SyncCache<UserId, u64> {
    SyncCache::builder()
        .max_capacity(settings.user_capacity)
        .time_to_live(
            settings
                .user_ttl
                .saturating_add(stale_if_error)
                .max(settings.negative_ttl),
        )
        .build()
}
