//! The two moka caches in front of Auth0 and the reads that fill them.
//!
//! * Management token: one entry, kept for its lifetime minus a margin;
//!   concurrent misses share one `/oauth/token` call; a 401 from the users
//!   endpoint drops exactly the rejected token and the read is retried once.
//! * Users: all identities of a user, keyed by user id, bounded, kept for the
//!   configured TTL but never past a known token expiry; concurrent misses for
//!   one user share one `/api/v2/users` call; a 404 is remembered briefly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::future::Cache;
use moka::ops::compute::Op;
use moka::Expiry;
use tokio::time::Instant as Deadline;

use crate::auth0::{Auth0Client, Auth0Error, ManagementToken, UserIdentities};
use crate::config::CacheSettings;
use crate::error::BrokerError;
use crate::stats;
use crate::user_id::UserId;

/// A user as the cache holds it: found, or known not to exist.
#[derive(Clone)]
enum UserState {
    Found(Arc<UserIdentities>),
    NotFound,
}

/// A cache entry and the logical time its Auth0 read started, so a read that
/// began before an `InvalidateUser` or `bypass_cache` cannot bring the old
/// profile back when it lands late.
#[derive(Clone)]
struct CachedUser {
    state: UserState,
    read_started: u64,
}

/// What a lookup returns: the user and whether this RPC was served from cache.
pub struct Lookup {
    pub user: Arc<UserIdentities>,
    /// True when the identities were read from Auth0 before this lookup began.
    pub from_cache: bool,
}

/// Caches Management tokens and users' identities in front of one Auth0 tenant.
pub struct IdentityStore {
    auth0: Auth0Client,
    management: Cache<(), Arc<ManagementToken>>,
    users: Cache<UserId, CachedUser>,
    /// Logical clock for reads, lookups and invalidations.
    clock: AtomicU64,
    /// When each user was last invalidated or refreshed; entries read before
    /// that are superseded. Lives as long as a user entry can.
    invalidated_at: Cache<UserId, u64>,
    /// Users kept past their TTL for stale-if-error; `None` when disabled.
    stale: Option<Cache<UserId, Arc<UserIdentities>>>,
    /// How often a stale entry was served because Auth0 failed.
    stale_serves: AtomicU64,
    settings: CacheSettings,
}

/// Default stale-if-error window: how long past its TTL a user may still be
/// served when Auth0 is failing.
pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(600);

/// Keeps a Management token for its reuse window.
struct ManagementTokenExpiry;

impl Expiry<(), Arc<ManagementToken>> for ManagementTokenExpiry {
    fn expire_after_create(
        &self,
        _key: &(),
        token: &Arc<ManagementToken>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(
            token
                .reuse_window()
                .saturating_sub(token.obtained_at.elapsed()),
        )
    }
}

/// Keeps users for the TTL, never past a known token expiry, and misses briefly.
struct UserExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl UserExpiry {
    fn lifetime(&self, user: &CachedUser) -> Duration {
        match &user.state {
            UserState::NotFound => self.negative_ttl,
            UserState::Found(found) => match found.earliest_token_expiry() {
                Some(expiry) => {
                    let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
                    self.ttl.min(left)
                }
                None => self.ttl,
            },
        }
    }
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

impl IdentityStore {
    /// Builds empty caches sized by `settings`.
    pub fn new(auth0: Auth0Client, settings: CacheSettings) -> Self {
        let management = Cache::builder()
            .max_capacity(1)
            .expire_after(ManagementTokenExpiry)
            .build();
        let users = Cache::builder()
            .max_capacity(settings.user_capacity)
            .expire_after(UserExpiry {
                ttl: settings.user_ttl,
                negative_ttl: settings.negative_ttl,
            })
            .build();
        let invalidated_at = Cache::builder()
            .max_capacity(settings.user_capacity)
            .time_to_live(settings.user_ttl.max(settings.negative_ttl))
            .build();
        let mut store = Self {
            auth0,
            management,
            users,
            clock: AtomicU64::new(1),
            invalidated_at,
            stale: None,
            stale_serves: AtomicU64::new(0),
            settings,
        };
        store.set_stale_if_error(DEFAULT_STALE_IF_ERROR);
        store
    }

    /// Serve a user up to `window` past its TTL when Auth0 fails (never a
    /// token past its known expiry); zero turns stale-if-error off.
    pub fn with_stale_if_error(mut self, window: Duration) -> Self {
        self.set_stale_if_error(window);
        self
    }

    fn set_stale_if_error(&mut self, window: Duration) {
        self.stale = (!window.is_zero()).then(|| {
            Cache::builder()
                .max_capacity(self.settings.user_capacity)
                .time_to_live(self.settings.user_ttl + window)
                .build()
        });
    }

    /// Users held now (moka's count, settled first).
    pub async fn cached_users(&self) -> u64 {
        self.users.run_pending_tasks().await;
        self.users.entry_count()
    }

    /// Stale entries served since start.
    pub fn stale_serves(&self) -> u64 {
        self.stale_serves.load(Ordering::Relaxed)
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// The user's identities, from cache unless `bypass_cache`. Calls to
    /// Auth0 made for this lookup stop retrying before `deadline`. When Auth0
    /// fails, a recently expired entry may be served (stale-if-error), but
    /// never to a `bypass_cache` request, which asked for a fresh read.
    pub async fn lookup(
        &self,
        user_id: &UserId,
        bypass_cache: bool,
        deadline: Option<Deadline>,
    ) -> Result<Lookup, BrokerError> {
        let started = Instant::now();
        let cached = if bypass_cache {
            self.mark_invalidated(user_id).await;
            let fresh = self.read_user(user_id, deadline).await?;
            self.users.insert(user_id.clone(), fresh.clone()).await;
            fresh
        } else {
            match self.cached_or_read(user_id, deadline).await {
                Ok(cached) => cached,
                Err(error) => return self.stale_or(user_id, error).await,
            }
        };
        match cached.state {
            UserState::Found(user) => {
                let from_cache = user.fetched_instant < started;
                stats::cache_lookup(if from_cache { "hit" } else { "miss" });
                Ok(Lookup { from_cache, user })
            }
            UserState::NotFound => Err(BrokerError::UserNotFound),
        }
    }

    /// A stale copy of the user when `error` says Auth0 is failing and the
    /// copy holds no token known to have expired; else `error`.
    async fn stale_or(&self, user_id: &UserId, error: BrokerError) -> Result<Lookup, BrokerError> {
        if !matches!(error, BrokerError::Unavailable { .. }) {
            return Err(error);
        }
        let Some(stale) = &self.stale else {
            return Err(error);
        };
        let Some(user) = stale.get(user_id).await else {
            return Err(error);
        };
        if user
            .earliest_token_expiry()
            .is_some_and(|expiry| expiry <= SystemTime::now())
        {
            return Err(error);
        }
        self.stale_serves.fetch_add(1, Ordering::Relaxed);
        stats::cache_lookup("stale");
        tracing::warn!(
            user_id = %user_id,
            age_secs = user.fetched_instant.elapsed().as_secs(),
            %error,
            "Auth0 failing: serving a stale cached user"
        );
        Ok(Lookup {
            user,
            from_cache: true,
        })
    }

    /// The cached entry, or one shared read of Auth0. An entry whose read
    /// started before an invalidation that this lookup comes after is dropped
    /// and read again (once).
    async fn cached_or_read(
        &self,
        user_id: &UserId,
        deadline: Option<Deadline>,
    ) -> Result<CachedUser, BrokerError> {
        let lookup_started = self.tick();
        let mut cached = self.shared_read(user_id, deadline).await?;
        if let Some(invalidated) = self.invalidated_at.get(user_id).await {
            if cached.read_started < invalidated && invalidated < lookup_started {
                self.users.invalidate(user_id).await;
                cached = self.shared_read(user_id, deadline).await?;
            }
        }
        Ok(cached)
    }

    /// Concurrent misses share one read. If the caller whose future runs the
    /// read goes away, moka hands the read to a caller still waiting; when
    /// none is left, nothing keeps running.
    async fn shared_read(
        &self,
        user_id: &UserId,
        deadline: Option<Deadline>,
    ) -> Result<CachedUser, BrokerError> {
        self.users
            .try_get_with_by_ref(user_id, self.read_user(user_id, deadline))
            .await
            .map_err(|shared| BrokerError::from((*shared).clone()))
    }

    /// Drops the cached user, so the next lookup reads Auth0.
    pub async fn invalidate(&self, user_id: &UserId) {
        self.mark_invalidated(user_id).await;
        self.users.invalidate(user_id).await;
    }

    async fn mark_invalidated(&self, user_id: &UserId) {
        let now = self.tick();
        self.invalidated_at.insert(user_id.clone(), now).await;
    }

    /// Obtains a Management token now; used to tell readiness and to fail
    /// fast on bad credentials.
    pub async fn warm_up(&self) -> Result<(), BrokerError> {
        self.management_token(None)
            .await
            .map(|_| ())
            .map_err(BrokerError::from)
    }

    /// Reads the user with a shared Management token; one retry with a new
    /// token when Auth0 rejects the cached one.
    async fn read_user(
        &self,
        user_id: &UserId,
        deadline: Option<Deadline>,
    ) -> Result<CachedUser, Auth0Error> {
        let read_started = self.tick();
        let token = self.management_token(deadline).await?;
        let result = match self.auth0.fetch_user(&token, user_id, deadline).await {
            Err(Auth0Error::ManagementTokenRejected) => {
                tracing::warn!("Auth0 rejected the cached Management token; fetching a new one");
                self.drop_management_token(token.generation).await;
                let fresh = self.management_token(deadline).await?;
                self.auth0.fetch_user(&fresh, user_id, deadline).await
            }
            other => other,
        };
        let state = match result {
            Ok(user) => {
                let user = Arc::new(user);
                if let Some(stale) = &self.stale {
                    stale.insert(user_id.clone(), user.clone()).await;
                }
                UserState::Found(user)
            }
            Err(Auth0Error::UserNotFound) => UserState::NotFound,
            Err(error) => return Err(error),
        };
        Ok(CachedUser {
            state,
            read_started,
        })
    }

    async fn management_token(
        &self,
        deadline: Option<Deadline>,
    ) -> Result<Arc<ManagementToken>, Auth0Error> {
        self.management
            .try_get_with((), self.fetch_management_token(deadline))
            .await
            .map_err(|shared| (*shared).clone())
    }

    async fn fetch_management_token(
        &self,
        deadline: Option<Deadline>,
    ) -> Result<Arc<ManagementToken>, Auth0Error> {
        match self.auth0.fetch_management_token(deadline).await {
            Ok(token) => {
                stats::management_token_refreshed(token.lifetime);
                tracing::info!(
                    expires_in_secs = token.lifetime.as_secs(),
                    reuse_secs = token.reuse_window().as_secs(),
                    can_read_idp_tokens = token.can_read_idp_tokens(),
                    "obtained a Management API token"
                );
                if !token.can_read_idp_tokens() {
                    tracing::error!(
                        scope = %token.scope,
                        "the Management API token lacks read:user_idp_tokens: Auth0 will omit every IdP token; grant the scope to the broker's application"
                    );
                }
                Ok(Arc::new(token))
            }
            Err(error) => {
                if matches!(error, Auth0Error::CredentialsRejected { .. }) {
                    tracing::error!(tenant = self.auth0.base_url(), %error, "cannot obtain a Management API token");
                } else {
                    tracing::warn!(tenant = self.auth0.base_url(), %error, "cannot obtain a Management API token");
                }
                Err(error)
            }
        }
    }

    /// Removes the token only if it is still the one that was rejected, so
    /// concurrent 401s do not throw away a token another request just fetched.
    async fn drop_management_token(&self, rejected_generation: u64) {
        self.management
            .entry(())
            .and_compute_with(|current| {
                let op = match current {
                    Some(entry) if entry.value().generation == rejected_generation => Op::Remove,
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
    }
}
