//! What a cached user weighs: an estimate of the bytes it holds, so the user
//! cache is bounded in memory as well as in users.

use secrecy::{ExposeSecret, SecretString};

use super::expiry::{CachedUser, UserState};
use super::CacheSettings;
use crate::auth0::{Identity, UserIdentities};
use crate::user_id::UserId;

/// Bytes a cached user costs besides its strings and identities: moka's
/// entry, key and `CachedUser`, the `Arc` and `UserIdentities` (BENCHMARKS.md
/// measured about 790 bytes per one-identity user beyond the payload).
pub(super) const ENTRY_OVERHEAD: u64 = 640;
/// Bytes an identity costs besides its strings.
pub(super) const IDENTITY_OVERHEAD: u64 = std::mem::size_of::<Identity>() as u64;

/// How the user cache keeps both bounds with moka's one weighted capacity:
/// each user weighs its estimated bytes ([`estimated_bytes`]) but at least
/// `floor` = `user_max_bytes / user_capacity` (rounded up), and the cache holds
/// `floor × user_capacity` of weight. So it never holds more than
/// `user_capacity` users, nor more than `user_max_bytes` (rounded up to a
/// multiple of the capacity) of estimated bytes, whichever binds first.
#[derive(Clone, Copy, Debug)]
pub(super) struct UserBudget {
    /// The least weight of any entry: its share of the byte budget.
    pub(super) floor: u32,
    /// The cache's weighted capacity.
    pub(super) max_weight: u64,
}

impl UserBudget {
    /// The budget of a cache sized by `settings`.
    pub(super) fn new(settings: &CacheSettings) -> Self {
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
    pub(super) fn weight(&self, user_id: &UserId, entry: &CachedUser) -> u32 {
        let bytes = u32::try_from(estimated_bytes(user_id, entry)).unwrap_or(u32::MAX);
        bytes.max(self.floor)
    }
}

/// What a cached user costs in memory, roughly: the key, the strings and
/// tokens of every identity, and fixed overheads.
pub(super) fn estimated_bytes(user_id: &UserId, entry: &CachedUser) -> u64 {
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
