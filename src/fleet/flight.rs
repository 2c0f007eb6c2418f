//! Fleet-wide single flight: one Auth0 read per user across all replicas.
//!
//! A replica whose moka cache misses (its own moka single flight already
//! makes that one claim per replica per user) runs [`CLAIM`]: the shared
//! value if there is one, else the user's lock (`SET NX PX`, a random
//! token). The lock holder reads Auth0 and stores the value while the lock
//! is still its own ([`FILL`]); the others poll for the value every
//! [`POLL_INTERVAL`], and take the lock themselves if it frees without a
//! value (the holder failed, or died and the lock expired). Nobody waits past
//! its deadline or the lock's life: then it reads Auth0 itself. Any Redis
//! failure also means "read Auth0 yourself": no request fails for Redis.

use std::time::Duration;

use rand::RngCore;
use tokio::time::Instant;

use super::scripts::{CLAIM, FILL, RELEASE, TAKE_OVER};
use super::{metrics, wire, Core, Fleet, SharedEntry, UserSlot};
use crate::auth0::UserIdentities;
use crate::user_id::UserId;

/// How often a waiting replica looks for the holder's value.
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// What a claim gives the replica that missed.
pub enum Claim {
    /// The shared value: no Auth0 read needed.
    Found(SharedEntry),
    /// This replica holds the user's lock: read Auth0, then fill.
    Holder(FillGuard),
    /// Read Auth0 without the fleet (Redis failed, or the wait was too long).
    Unshared,
}

/// CLAIM's answer, as Redis sends it.
const CLAIM_VALUE: i64 = 1;
const CLAIM_LOCKED: i64 = 2;

/// The user's lock while this replica reads Auth0. Filled or released
/// explicitly; if dropped otherwise (the read was cancelled), a task frees
/// the lock so the replica's next reader does not wait for it to expire.
pub struct FillGuard {
    slot: UserSlot,
    lock: HeldLock,
}

/// A fleet-wide lock this replica holds (a user's read, or one kept
/// token's fetch). Freed by compare-and-delete when released; if dropped
/// unreleased (its read was cancelled), a task frees it, so the replica's
/// next reader does not wait for it to expire.
pub(super) struct HeldLock {
    pub(super) core: std::sync::Arc<Core>,
    /// The lock's key.
    pub(super) key: String,
    /// Proves the lock is ours.
    pub(super) token: String,
    done: bool,
}

impl HeldLock {
    pub(super) fn new(core: std::sync::Arc<Core>, key: String, token: String) -> Self {
        Self {
            core,
            key,
            token,
            done: false,
        }
    }

    /// The lock is being filled (a script frees it): nothing to do on drop.
    pub(super) fn filling(&mut self) {
        self.done = true;
    }

    /// Frees the lock now (compare and delete).
    pub(super) async fn release(mut self) {
        self.done = true;
        let mut script = RELEASE.key(&self.key);
        script.arg(&self.token);
        let _: Option<i64> = self.core.link.run("release", &script).await;
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let unreleased = Self {
            core: self.core.clone(),
            key: std::mem::take(&mut self.key),
            token: std::mem::take(&mut self.token),
            done: false,
        };
        self.done = true;
        runtime.spawn(unreleased.release());
    }
}

impl Fleet {
    /// The shared value of `user_id`, or its lock, waiting for another
    /// replica's read while it runs (never past `deadline`).
    pub async fn claim(&self, user_id: &UserId, deadline: Option<Instant>) -> Claim {
        let core = &self.core;
        let slot = core.slot(user_id);
        let token = lock_token();
        let mut patience = Patience::new(core.lock_ttl, deadline);
        let mut skip_value = false;
        loop {
            let mut script = CLAIM.key(&slot.value);
            script
                .key(&slot.lock)
                .arg(&token)
                .arg(millis(core.lock_ttl))
                .arg(if skip_value { "1" } else { "0" });
            let Some((answer, value)) = core
                .link
                .run::<(i64, Option<Vec<u8>>)>("claim", &script)
                .await
            else {
                return Claim::Unshared;
            };
            skip_value = false;
            match (answer, value) {
                (CLAIM_VALUE, Some(sealed)) => match core.open_entry(user_id, &slot, &sealed) {
                    Some(entry) => {
                        metrics::shared_lookup("hit");
                        return Claim::Found(entry);
                    }
                    None => {
                        metrics::shared_lookup("undecryptable");
                        skip_value = true;
                        continue;
                    }
                },
                (CLAIM_LOCKED, _) => {
                    metrics::shared_lookup("miss");
                    return Claim::Holder(FillGuard::new(core.clone(), slot, token));
                }
                _ => {}
            }
            if !patience.wait_a_poll().await {
                return Claim::Unshared;
            }
        }
    }

    /// For `bypass_cache`: forgets the user fleet-wide and takes its lock
    /// for this replica's fresh read, whoever held it. `None` when Redis
    /// fails (the invalidation is then kept for later).
    pub async fn take_over(&self, user_id: &UserId) -> Option<FillGuard> {
        let core = &self.core;
        let slot = core.slot(user_id);
        let token = lock_token();
        let message = core.invalidation(user_id)?;
        let mut script = TAKE_OVER.key(&slot.value);
        script
            .key(&slot.lock)
            .key(&slot.kept)
            .key(&slot.generation)
            .key(&slot.rotations)
            .arg(&core.channel)
            .arg(message)
            .arg(millis(super::GENERATION_LIFE))
            .arg(&token)
            .arg(millis(core.lock_ttl));
        if core.link.run::<i64>("take_over", &script).await.is_none() {
            core.keep_for_later(user_id);
            return None;
        }
        metrics::invalidation_sent();
        Some(FillGuard::new(core.clone(), slot, token))
    }
}

impl Core {
    /// The entry sealed in `sealed`, if it opens under this fleet's key for
    /// this user's slot and is still fresh.
    fn open_entry(&self, user_id: &UserId, slot: &UserSlot, sealed: &[u8]) -> Option<SharedEntry> {
        let plaintext = self.keys.open(slot.value.as_bytes(), sealed)?;
        wire::decode(&plaintext, user_id)
    }
}

impl FillGuard {
    fn new(core: std::sync::Arc<Core>, slot: UserSlot, token: String) -> Self {
        let lock = HeldLock::new(core, slot.lock.clone(), token);
        Self { slot, lock }
    }

    /// Shares what this replica read (`None`: no such user), fresh for
    /// `fresh_for`, and frees the lock; stores nothing if the lock is no
    /// longer ours (an invalidation came, or it expired and another replica
    /// took it).
    pub async fn fill(
        mut self,
        user_id: &UserId,
        user: Option<&UserIdentities>,
        fresh_for: Duration,
    ) {
        self.lock.filling();
        let core = &self.lock.core;
        let ttl = u64::try_from(fresh_for.as_millis()).unwrap_or(u64::MAX);
        let sealed = (ttl > 0)
            .then(|| wire::encode(user_id, user, fresh_for))
            .flatten()
            .and_then(|plaintext| core.keys.seal(self.slot.value.as_bytes(), &plaintext));
        // Nothing to share (no freshness left): only free the lock.
        let (sealed, ttl) = sealed.map_or((Vec::new(), 0), |sealed| (sealed, ttl));
        let mut script = FILL.key(&self.slot.value);
        script
            .key(&self.slot.lock)
            .arg(&self.lock.token)
            .arg(sealed)
            .arg(ttl);
        let _: Option<i64> = core.link.run("fill", &script).await;
    }

    /// Frees the lock without a value (the read failed), so that waiting
    /// replicas read Auth0 themselves at once.
    pub async fn release(self) {
        self.lock.release().await;
    }
}

/// How long a replica waits for another's lock: until its deadline, and
/// never longer than a lock lives (by then a dead holder's lock has expired
/// and been taken). Counts the wait once, and its end if it gives up.
pub(super) struct Patience {
    give_up_at: Instant,
    ran_out_by_deadline: bool,
    waited: bool,
}

impl Patience {
    pub(super) fn new(lock_life: Duration, deadline: Option<Instant>) -> Self {
        let by_lock = Instant::now() + lock_life + POLL_INTERVAL * 2;
        let give_up_at = deadline.map_or(by_lock, |deadline| deadline.min(by_lock));
        Self {
            give_up_at,
            ran_out_by_deadline: deadline.is_some_and(|deadline| deadline <= by_lock),
            waited: false,
        }
    }

    /// Whether this replica has waited for another's lock yet.
    pub(super) fn waited(&self) -> bool {
        self.waited
    }

    /// Whether giving up was the caller's deadline, not the lock's life.
    pub(super) fn ran_out_by_deadline(&self) -> bool {
        self.ran_out_by_deadline
    }

    /// Sleeps one poll interval; `false` instead when the wait is over.
    pub(super) async fn wait_a_poll(&mut self) -> bool {
        if !self.waited {
            self.waited = true;
            metrics::lock_wait();
        }
        if Instant::now() + POLL_INTERVAL >= self.give_up_at {
            metrics::lock_wait_gave_up();
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
        true
    }
}

/// A random lock token: proves the lock is this read's when freeing it.
pub(super) fn lock_token() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Whole milliseconds, at least 1 (Redis refuses `PX 0`).
pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}
