//! The moka cache of users in front of Auth0 and the reads that fill it.
//!
//! * Users: all identities of a user, keyed by user id, bounded by a user
//!   count and by an estimate of the bytes they hold (see [`UserBudget`]). An entry
//!   answers lookups for the configured TTL (never past a known token
//!   expiry), then stays on for the stale-if-error window as the copy to
//!   serve if Auth0 fails; one entry per user serves both. A 404 is
//!   remembered briefly. Concurrent reads of one user share one
//!   `/api/v2/users` call.
//!
//! A cache hit costs one moka `get` and one atomic load: the per-user
//! invalidation stamps are only consulted when some invalidation happened
//! after the entry was read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::future::Cache;
use moka::sync::Cache as SyncCache;
use moka::Expiry;
use tokio::time::Instant as Deadline;

use secrecy::{ExposeSecret, SecretString};

use crate::auth0::{Auth0Client, Auth0Error, Identity, UserIdentities};
use crate::budget::CallerShare;
use crate::error::BrokerError;
use crate::stats::{self, CacheOutcome};
use crate::user_id::UserId;

/// Cache sizing and lifetimes.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    pub user_ttl: Duration,
    /// Users held at most.
    pub user_capacity: u64,
    /// Estimated bytes the users held may take at most: the bound that holds when profiles
    /// are large, beside `user_capacity` (see `cache::IdentityStore`).
    pub user_max_bytes: u64,
    pub negative_ttl: Duration,
}

/// A user as the cache holds it: found, or known not to exist.
#[derive(Clone)]
enum UserState {
    Found(Arc<UserIdentities>),
    NotFound,
}

/// A cache entry, the logical time its Auth0 read started (so a read that
/// began before an `InvalidateUser` or `bypass_cache` cannot bring the old
/// profile back when it lands late), and until when it answers lookups.
#[derive(Clone)]
struct CachedUser {
    state: UserState,
    read_started: u64,
    /// After this the entry is only a stale-if-error fallback.
    fresh_until: Instant,
}

impl CachedUser {
    fn is_fresh(&self) -> bool {
        Instant::now() < self.fresh_until
    }

    /// How old the entry is, if it may be served stale: a found user none
    /// of whose tokens is known to have expired.
    fn stale_age(&self) -> Option<Duration> {
        match &self.state {
            UserState::Found(user) => user
                .earliest_token_expiry()
                .is_none_or(|expiry| expiry > SystemTime::now())
                .then(|| user.fetched_instant.elapsed()),
            UserState::NotFound => None,
        }
    }
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
    settings: CacheSettings,
}

/// Default stale-if-error window: how long past its TTL a user may still be
/// served when Auth0 is failing.
pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(600);

/// Default byte budget of the user cache (`--user-cache-max-bytes`): 256 MiB,
/// half the Deployment's memory limit. The default 100 000 users of about
/// 850 bytes each take a third of it; the budget only binds when profiles are
/// large (many identities, long tokens).
pub const DEFAULT_USER_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// Bytes a cached user costs besides its strings and identities: moka's
/// entry, key and `CachedUser`, the `Arc` and `UserIdentities` (BENCHMARKS.md
/// measured about 790 bytes per one-identity user beyond the payload).
const ENTRY_OVERHEAD: u64 = 640;
/// Bytes an identity costs besides its strings.
const IDENTITY_OVERHEAD: u64 = std::mem::size_of::<Identity>() as u64;

/// How the user cache keeps both bounds with moka's one weighted capacity:
/// each user weighs its estimated bytes ([`estimated_bytes`]) but at least
/// `floor` = `user_max_bytes / user_capacity` (rounded up), and the cache holds
/// `floor × user_capacity` of weight. So it never holds more than
/// `user_capacity` users, nor more than `user_max_bytes` (rounded up to a
/// multiple of the capacity) of estimated bytes, whichever binds first.
#[derive(Clone, Copy, Debug)]
struct UserBudget {
    floor: u32,
    max_weight: u64,
}

impl UserBudget {
    fn new(settings: &CacheSettings) -> Self {
        let capacity = settings.user_capacity.max(1);
        let floor = settings
            .user_max_bytes
            .div_ceil(capacity)
            .clamp(1, u64::from(u32::MAX));
        Self {
            floor: u32::try_from(floor).unwrap_or(u32::MAX),
            max_weight: floor.saturating_mul(capacity),
        }
    }

    /// moka's weight of one entry.
    fn weight(&self, user_id: &UserId, entry: &CachedUser) -> u32 {
        let bytes = u32::try_from(estimated_bytes(user_id, entry)).unwrap_or(u32::MAX);
        bytes.max(self.floor)
    }
}

/// What a cached user costs in memory, roughly: the key, the strings and
/// tokens of every identity, and fixed overheads.
fn estimated_bytes(user_id: &UserId, entry: &CachedUser) -> u64 {
    let identities = match &entry.state {
        UserState::Found(user) => identities_bytes(user),
        UserState::NotFound => 0,
    };
    ENTRY_OVERHEAD + user_id.as_str().len() as u64 + identities
}

fn identities_bytes(user: &UserIdentities) -> u64 {
    let strings: usize = user
        .identities
        .iter()
        .map(|identity| {
            identity.provider.len()
                + identity.connection.len()
                + identity.idp_user_id.len()
                + secret_len(identity.access_token.as_ref())
                + secret_len(identity.access_token_secret.as_ref())
        })
        .sum();
    let overhead = IDENTITY_OVERHEAD.saturating_mul(user.identities.len() as u64);
    (user.user_id.len() + strings) as u64 + overhead
}

/// A token's length, for the weight; the token itself goes nowhere.
fn secret_len(secret: Option<&SecretString>) -> usize {
    secret.map_or(0, |secret| secret.expose_secret().len())
}

/// Keeps a found user until its freshness ends plus the stale-if-error
/// window, but never past a known token expiry; a miss only while fresh.
struct UserExpiry {
    stale_if_error: Duration,
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
        share.spend(deadline).await?;
        // Boxed like the read in `cached_or_read`: see there.
        let cached = Box::pin(self.read_and_keep(user_id, deadline)).await?;
        Self::answer(cached, started)
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
                share.spend(deadline).await?;
                self.read_and_keep(user_id, deadline)
                    .await
                    .map_err(BrokerError::from)
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

    /// Reads the user from Auth0 and caches the answer, unless an
    /// invalidation came while the read was under way.
    async fn read_and_keep(
        &self,
        user_id: &UserId,
        deadline: Option<Deadline>,
    ) -> Result<CachedUser, Auth0Error> {
        let read = self.read_user(user_id, deadline).await?;
        if !self.superseded(user_id, &read, u64::MAX) {
            self.users.insert(user_id.clone(), read.clone());
        }
        Ok(read)
    }

    /// Drops the cached user, so the next lookup reads Auth0 (and no stale
    /// copy of it is ever served).
    pub async fn invalidate(&self, user_id: &UserId) {
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
        Ok(CachedUser {
            fresh_until: Instant::now() + self.fresh_lifetime(&state),
            state,
            read_started,
        })
    }

    /// How long a read answers lookups: the TTL, never past a known token
    /// expiry; a miss for the negative TTL.
    fn fresh_lifetime(&self, state: &UserState) -> Duration {
        match state {
            UserState::NotFound => self.settings.negative_ttl,
            UserState::Found(user) => match user.earliest_token_expiry() {
                Some(expiry) => self.settings.user_ttl.min(time_until(expiry)),
                None => self.settings.user_ttl,
            },
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(user_capacity: u64, user_max_bytes: u64) -> CacheSettings {
        CacheSettings {
            user_ttl: Duration::from_secs(300),
            user_capacity,
            user_max_bytes,
            negative_ttl: Duration::from_secs(30),
        }
    }

    /// A found user with one GitHub identity holding a token of `token_len` bytes.
    fn user(user_id: &str, token_len: usize) -> CachedUser {
        let identity = Identity {
            provider: "github".to_owned(),
            connection: "github".to_owned(),
            idp_user_id: "1234567".to_owned(),
            access_token: Some(SecretString::from("t".repeat(token_len))),
            access_token_secret: None,
            expires_at: None,
        };
        let user = UserIdentities {
            user_id: user_id.to_owned(),
            identities: vec![identity],
            fetched_at: SystemTime::now(),
            fetched_instant: Instant::now(),
            idp_tokens_readable: true,
        };
        CachedUser {
            state: UserState::Found(Arc::new(user)),
            read_started: 1,
            fresh_until: Instant::now() + Duration::from_secs(300),
        }
    }

    fn fill(cache: &SyncCache<UserId, CachedUser>, users: usize, token_len: usize) {
        for index in 0..users {
            let id = format!("github|{index}");
            let key = UserId::parse(&id).expect("user id");
            cache.insert(key, user(&id, token_len));
        }
        cache.run_pending_tasks();
    }

    #[test]
    fn the_byte_budget_evicts_users_beyond_it() {
        let budget = 64 * 1024;
        let cache = users_cache(&settings(1000, budget), DEFAULT_STALE_IF_ERROR);
        fill(&cache, 100, 10_000);
        assert!(
            cache.weighted_size() <= budget,
            "{} bytes held",
            cache.weighted_size()
        );
        assert!(
            (1..=6).contains(&cache.entry_count()),
            "{} users of ~11 KB in 64 KiB",
            cache.entry_count()
        );
    }

    #[test]
    fn the_user_count_still_bounds_small_users() {
        let cache = users_cache(
            &settings(10, DEFAULT_USER_MAX_BYTES),
            DEFAULT_STALE_IF_ERROR,
        );
        fill(&cache, 100, 40);
        assert!(cache.entry_count() <= 10, "{}", cache.entry_count());
    }

    #[test]
    fn the_estimate_counts_ids_strings_tokens_and_overheads() {
        let id = UserId::parse("github|1").expect("user id");
        let small = estimated_bytes(&id, &user("github|1", 40));
        let large = estimated_bytes(&id, &user("github|1", 10_040));
        assert_eq!(large - small, 10_000);
        let strings = (2 * "github|1".len() + "github".len() * 2 + "1234567".len() + 40) as u64;
        assert_eq!(small, ENTRY_OVERHEAD + IDENTITY_OVERHEAD + strings);
        let missing = CachedUser {
            state: UserState::NotFound,
            read_started: 1,
            fresh_until: Instant::now(),
        };
        assert_eq!(estimated_bytes(&id, &missing), ENTRY_OVERHEAD + 8);
    }

    #[test]
    fn every_user_weighs_at_least_its_share_of_the_budget() {
        let budget = UserBudget::new(&settings(100_000, DEFAULT_USER_MAX_BYTES));
        assert_eq!(budget.floor, 2685);
        assert_eq!(budget.max_weight, 268_500_000);
        let id = UserId::parse("github|1").expect("user id");
        assert_eq!(budget.weight(&id, &user("github|1", 40)), 2685);
        assert_eq!(budget.weight(&id, &user("github|1", 10_000)), {
            let bytes = estimated_bytes(&id, &user("github|1", 10_000));
            u32::try_from(bytes).expect("fits")
        });
        let huge = UserBudget::new(&settings(1, u64::MAX));
        assert_eq!(huge.floor, u32::MAX);
        assert_eq!(huge.max_weight, u64::from(u32::MAX));
    }
}
