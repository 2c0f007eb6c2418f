//! The fleet's part of a miss (`--redis-url`): the shared tier before Auth0,
//! the fleet-wide single flight around the Auth0 read, and what the
//! invalidation channel makes this replica forget. A hit never comes here.

use std::sync::Arc;

use tokio::time::Instant as Deadline;

use super::expiry::{CachedUser, UserState};
use super::IdentityStore;
use crate::budget::CallerShare;
use crate::error::BrokerError;
use crate::fleet::{Claim, FillGuard, Fleet, LocalTier, SharedEntry};
use crate::user_id::UserId;

impl IdentityStore {
    /// The same store over a fleet's shared tier (`None`: alone). The
    /// fleet's invalidations reach it once it is watched
    /// (`fleet::Fleet::watch`, by `server::Broker::new`).
    pub fn with_fleet(mut self, fleet: Option<Arc<Fleet>>) -> Self {
        self.fleet = fleet;
        self
    }

    /// Whether the store reads through a fleet in shared mode now.
    pub fn is_shared(&self) -> bool {
        self.fleet.as_ref().is_some_and(|fleet| fleet.is_shared())
    }

    /// A miss in a fleet: the shared value, else this replica's Auth0 read
    /// under the user's fleet-wide lock (others wait for it), else (Redis
    /// failing) a read of its own.
    pub(super) async fn read_through(
        &self,
        fleet: &Fleet,
        user_id: &UserId,
        share: CallerShare<'_>,
        deadline: Option<Deadline>,
    ) -> Result<CachedUser, BrokerError> {
        let read_started = self.tick();
        match fleet.claim(user_id, deadline).await {
            Claim::Found(entry) => {
                let cached = self.entry_of_shared(entry, read_started);
                self.keep(user_id, &cached);
                Ok(cached)
            }
            Claim::Holder(guard) => {
                self.read_as_holder(user_id, Some(guard), share, deadline)
                    .await
            }
            Claim::Unshared => self.read_as_holder(user_id, None, share, deadline).await,
        }
    }

    /// Reads Auth0 on `share`, caches the answer, and shares it through
    /// `guard` (the user's lock, when held); a failed read frees the lock at
    /// once so that waiting replicas try themselves.
    pub(super) async fn read_as_holder(
        &self,
        user_id: &UserId,
        guard: Option<FillGuard>,
        share: CallerShare<'_>,
        deadline: Option<Deadline>,
    ) -> Result<CachedUser, BrokerError> {
        let read = match share.spend(deadline).await {
            Ok(()) => self
                .read_and_keep(user_id, deadline)
                .await
                .map_err(BrokerError::from),
            Err(refused) => Err(refused),
        };
        match (read, guard) {
            (Ok(read), Some(guard)) => {
                guard.fill(user_id, read.found(), read.fresh_left()).await;
                Ok(read)
            }
            (Err(error), Some(guard)) => {
                guard.release().await;
                Err(error)
            }
            (read, None) => read,
        }
    }

    /// The cache entry of a shared value, never fresh for longer than this
    /// replica's own settings would keep it.
    fn entry_of_shared(&self, entry: SharedEntry, read_started: u64) -> CachedUser {
        let state = match entry.user {
            Some(user) => UserState::Found(Arc::new(user)),
            None => UserState::NotFound,
        };
        CachedUser::new(state, read_started, &self.settings).fresh_for_at_most(entry.fresh_for)
    }
}

impl LocalTier for IdentityStore {
    fn forget(&self, user_id: &UserId) {
        self.forget_user(user_id);
    }

    fn forget_all(&self) {
        let now = self.tick();
        self.forgot_all_at
            .fetch_max(now, std::sync::atomic::Ordering::SeqCst);
        self.last_invalidation
            .fetch_max(now, std::sync::atomic::Ordering::SeqCst);
        self.users.invalidate_all();
    }
}
