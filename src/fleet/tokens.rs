//! Kept tokens in the shared tier: tokens refreshed at an IdP and tokens
//! exchanged at Token Vault, one fetch per user and connection for the whole
//! fleet, and the refresh tokens IdPs rotate.
//!
//! * A replica that needs a token it does not hold (or holds too short)
//!   claims it ([`Fleet::claim_token`]): the shared token if it lives long
//!   enough, else the token's lock (`SET NX PX`), else it waits for the
//!   holder's token (polling, within its deadline and the lock's life).
//! * The holder fetches and fills ([`TokenFill::fill`]): the token is stored
//!   only while the lock is still its own and no invalidation of the user
//!   came since the claim (the user's invalidation count, which
//!   InvalidateUser and `bypass_cache` raise), and lives in Redis until it
//!   expires, not longer.
//! * Rotated refresh tokens: an IdP that rotates retires the refresh token
//!   it was sent. The holder gets the fleet's rotation with its claim, so it
//!   refreshes with the newest one, and its fill stores the new one whatever
//!   else happened (it is then the only one that works). InvalidateUser and
//!   `bypass_cache` delete them with everything else held for the user (the
//!   next refresh starts again from Auth0's refresh token); otherwise they
//!   live [`ROTATION_LIFE`] after the last refresh. Each is bound to the
//!   refresh token it replaced (its `origin`): a user who reconnected has a
//!   new one, and the rotation is then ignored.
//! * A token's lock lives as long as its fetch may take
//!   ([`TokenNeed::lock_life`]), so no second replica refreshes with a
//!   refresh token the first one's refresh is retiring.
//!
//! As everywhere in the fleet, a Redis failure means "fetch it yourself".

use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::flight::{lock_token, millis, HeldLock, Patience};
use super::keys::TokenSlot;
use super::scripts::{CLAIM_TOKEN, FILL_TOKEN};
use super::wire::{from_unix_ns, unix_ns};
use super::{metrics, Core, Fleet};
use crate::kept::{self, KeptToken};

/// How long a rotated refresh token stays in Redis after the refresh that
/// got it: past this, replicas refresh with the one Auth0's profile holds.
/// Long, as a user may go weeks between two refreshes; bounded, so the
/// refresh tokens of users long gone do not stay in Redis for ever.
pub const ROTATION_LIFE: Duration = Duration::from_secs(90 * 24 * 60 * 60);

/// CLAIM_TOKEN's answer, as Redis sends it.
const CLAIM_VALUE: i64 = 1;
const CLAIM_LOCKED: i64 = 2;

/// Which kind of kept token: each kind has its own field and lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Refreshed at the connection's IdP (`refresh = "idp"`).
    IdpRefresh,
    /// Exchanged at Auth0 Token Vault (`source = "token-vault"`).
    TokenVault,
}

impl TokenKind {
    fn label(self) -> &'static str {
        match self {
            Self::IdpRefresh => "idp",
            Self::TokenVault => "vault",
        }
    }
}

/// What a replica needs of the fleet for one kept token.
pub struct TokenNeed<'a> {
    pub kind: TokenKind,
    /// The Auth0 user id.
    pub user_id: &'a str,
    /// The connection: a name from the connections file.
    pub connection: &'a str,
    /// How long a shared token must still live to be taken.
    pub min_valid_for: Duration,
    /// Life of the lock: at least as long as the fetch may take.
    pub lock_life: Duration,
    /// When the caller stops waiting.
    pub deadline: Option<Instant>,
}

/// A refresh token an IdP rotated: what the refresher keeps in memory and
/// the fleet shares (one type, as for [`KeptToken`]).
#[derive(Debug, Clone)]
pub struct SharedRotation {
    /// SHA-256 of the refresh token Auth0's profile holds that this chain
    /// started from: a rotation is used only by callers passing that one.
    pub origin: [u8; 32],
    /// The refresh token to send next; `Debug` prints `[REDACTED]`.
    pub current: SecretString,
    /// When the refresh that got it was sent: the newest rotation wins.
    pub rotated_at: SystemTime,
}

/// What a claim gives the replica that needs a token.
pub enum TokenClaim {
    /// A shared token that serves the need: no fetch.
    Found(KeptToken),
    /// This replica holds the token's lock: fetch, then fill. (Boxed: it
    /// carries the slot's key names.)
    Holder(Box<TokenFill>),
    /// Fetch without the fleet (Redis failed, or the holder's lock outlived
    /// its life).
    Unshared,
    /// Another replica is fetching and this caller's deadline came first.
    /// Do not fetch: a second refresh racing the holder's could send a
    /// refresh token the holder's refresh is retiring.
    Busy,
}

/// The lock of one kept token while this replica fetches it; filled or
/// released explicitly, else freed by a task when dropped (a cancelled fetch).
pub struct TokenFill {
    lock: HeldLock,
    slot: TokenSlot,
    kind: TokenKind,
    user_id: String,
    connection: String,
    /// The user's invalidation count at the claim.
    generation: String,
    rotation: Option<SharedRotation>,
}

impl Fleet {
    /// The shared token of `need`, or its lock, waiting for another
    /// replica's fetch while it runs (never past the deadline or the lock's
    /// life). A shared token living shorter than `need.min_valid_for` is
    /// taken only if it came from a fetch this replica waited for (the best
    /// there is); otherwise this replica fetches a new one.
    pub async fn claim_token(&self, need: &TokenNeed<'_>) -> TokenClaim {
        let core = &self.core;
        let kind = need.kind.label();
        let slot = core.keys.token_slot(need.user_id, kind, need.connection);
        let token = lock_token();
        let mut patience = Patience::new(need.lock_life, need.deadline);
        let mut skip_value = false;
        // Issue time of a shared token too short for this need.
        let mut short: Option<SystemTime> = None;
        loop {
            let mut script = CLAIM_TOKEN.key(&slot.user.kept);
            script
                .key(&slot.lock)
                .key(&slot.user.generation)
                .key(&slot.user.rotations)
                .arg(&slot.field)
                .arg(&slot.rotation_field)
                .arg(&token)
                .arg(millis(need.lock_life))
                .arg(if skip_value { "1" } else { "0" });
            type Answer = (i64, Option<Vec<u8>>, String, Option<Vec<u8>>);
            let Some((answer, value, generation, rotation)) =
                core.link.run::<Answer>("claim_token", &script).await
            else {
                return TokenClaim::Unshared;
            };
            skip_value = false;
            match answer {
                CLAIM_VALUE => {
                    match value.and_then(|sealed| core.open_token(need, &slot, &sealed)) {
                        Some(shared) if serves(&shared, need, patience.waited(), short) => {
                            metrics::token_lookup(kind, "hit");
                            return TokenClaim::Found(shared);
                        }
                        Some(shared) => short = Some(shared.issued_at),
                        None => metrics::token_lookup(kind, "undecryptable"),
                    }
                    // Not usable: take the lock (or wait for its holder).
                    skip_value = true;
                    continue;
                }
                CLAIM_LOCKED => {
                    metrics::token_lookup(kind, "miss");
                    let rotation =
                        rotation.and_then(|sealed| core.open_rotation(need, &slot, &sealed));
                    return TokenClaim::Holder(Box::new(TokenFill {
                        lock: HeldLock::new(core.clone(), slot.lock.clone(), token),
                        slot,
                        kind: need.kind,
                        user_id: need.user_id.to_owned(),
                        connection: need.connection.to_owned(),
                        generation,
                        rotation,
                    }));
                }
                _ => {}
            }
            if !patience.wait_a_poll().await {
                return if patience.ran_out_by_deadline() {
                    TokenClaim::Busy
                } else {
                    TokenClaim::Unshared
                };
            }
        }
    }
}

/// Whether `shared` serves `need`: it lives `min_valid_for`, or it is alive
/// and new since this replica began waiting (a fetch it waited for).
fn serves(
    shared: &KeptToken,
    need: &TokenNeed<'_>,
    waited: bool,
    short: Option<SystemTime>,
) -> bool {
    if kept::lives_for(shared.expires_at, need.min_valid_for) {
        return true;
    }
    let alive = kept::time_left(shared.expires_at) > Duration::ZERO;
    alive && waited && short != Some(shared.issued_at)
}

impl TokenFill {
    /// The fleet's newest rotation of this connection's refresh token, if
    /// any (the caller checks its origin and compares it with its own).
    pub fn rotation(&self) -> Option<&SharedRotation> {
        self.rotation.as_ref()
    }

    /// Shares `token` and frees the lock; stores `rotated` (the refresh
    /// token the IdP rotated into) whatever else happened. The token is not
    /// stored if the lock is no longer ours or the user was invalidated
    /// since the claim.
    pub async fn fill(mut self, token: &KeptToken, rotated: Option<&SharedRotation>) {
        self.lock.filling();
        let life = u64::try_from(kept::time_left(token.expires_at).as_millis()).unwrap_or(u64::MAX);
        let sealed_token = (life > 0)
            .then(|| self.seal_token(token))
            .flatten()
            .unwrap_or_default();
        let sealed_rotation = rotated
            .and_then(|rotation| self.seal_rotation(rotation))
            .unwrap_or_default();
        let slot = &self.slot;
        let mut script = FILL_TOKEN.key(&slot.user.kept);
        script
            .key(&slot.lock)
            .key(&slot.user.generation)
            .key(&slot.user.rotations)
            .arg(&slot.field)
            .arg(&slot.rotation_field)
            .arg(&self.lock.token)
            .arg(&self.generation)
            .arg(sealed_token)
            .arg(life)
            .arg(sealed_rotation)
            .arg(millis(ROTATION_LIFE));
        let stored: Option<i64> = self.lock.core.link.run("fill_token", &script).await;
        if stored.is_none() && rotated.is_some() {
            tracing::warn!(
                connection = self.connection.as_str(),
                "the rotated refresh token could not be shared (Redis failing): other replicas refresh with an older one until this replica refreshes again"
            );
        }
    }

    /// Frees the lock without a token (the fetch failed), so that waiting
    /// replicas fetch themselves at once.
    pub async fn release(self) {
        self.lock.release().await;
    }

    fn seal_token(&self, token: &KeptToken) -> Option<Vec<u8>> {
        let out = TokenOut {
            user_id: &self.user_id,
            connection: &self.connection,
            kind: self.kind.label(),
            access_token: token.access_token.expose_secret(),
            issued_at_ns: unix_ns(token.issued_at),
            expires_at_ns: unix_ns(token.expires_at),
            scopes: &token.scopes,
        };
        let context = token_context(&self.slot);
        self.lock.core.keys.seal_json(context.as_bytes(), &out)
    }

    fn seal_rotation(&self, rotation: &SharedRotation) -> Option<Vec<u8>> {
        let out = RotationOut {
            user_id: &self.user_id,
            connection: &self.connection,
            origin: hex::encode(rotation.origin),
            refresh_token: rotation.current.expose_secret(),
            rotated_at_ns: unix_ns(rotation.rotated_at),
        };
        let context = rotation_context(&self.slot);
        self.lock.core.keys.seal_json(context.as_bytes(), &out)
    }
}

impl Core {
    /// The token sealed in `sealed` if it opens for `need`'s slot and names
    /// `need`'s user, connection and kind.
    fn open_token(
        &self,
        need: &TokenNeed<'_>,
        slot: &TokenSlot,
        sealed: &[u8],
    ) -> Option<KeptToken> {
        let read: TokenIn = self
            .keys
            .open_json(token_context(slot).as_bytes(), sealed)?;
        let names_need = read.user_id == need.user_id
            && read.connection == need.connection
            && read.kind == need.kind.label();
        names_need.then(|| KeptToken {
            access_token: read.access_token,
            issued_at: from_unix_ns(read.issued_at_ns),
            expires_at: from_unix_ns(read.expires_at_ns),
            scopes: read.scopes,
        })
    }

    /// The rotation sealed in `sealed` if it opens for `need`'s slot and
    /// names `need`'s user and connection.
    fn open_rotation(
        &self,
        need: &TokenNeed<'_>,
        slot: &TokenSlot,
        sealed: &[u8],
    ) -> Option<SharedRotation> {
        let read: RotationIn = self
            .keys
            .open_json(rotation_context(slot).as_bytes(), sealed)?;
        if read.user_id != need.user_id || read.connection != need.connection {
            return None;
        }
        let mut origin = [0u8; 32];
        hex::decode_to_slice(&read.origin, &mut origin).ok()?;
        Some(SharedRotation {
            origin,
            current: read.refresh_token,
            rotated_at: from_unix_ns(read.rotated_at_ns),
        })
    }
}

/// What a sealed token is bound to: its hash and field.
fn token_context(slot: &TokenSlot) -> String {
    format!("{}\n{}", slot.user.kept, slot.field)
}

/// What a sealed rotation is bound to: its hash and field.
fn rotation_context(slot: &TokenSlot) -> String {
    format!("{}\n{}", slot.user.rotations, slot.rotation_field)
}

#[derive(Serialize)]
struct TokenOut<'a> {
    user_id: &'a str,
    connection: &'a str,
    kind: &'static str,
    access_token: &'a str,
    issued_at_ns: u64,
    expires_at_ns: u64,
    scopes: &'a [String],
}

#[derive(Deserialize)]
struct TokenIn {
    user_id: String,
    connection: String,
    kind: String,
    access_token: SecretString,
    issued_at_ns: u64,
    expires_at_ns: u64,
    scopes: Vec<String>,
}

#[derive(Serialize)]
struct RotationOut<'a> {
    user_id: &'a str,
    connection: &'a str,
    /// Hex of the SHA-256 of the profile's refresh token the chain began with.
    origin: String,
    refresh_token: &'a str,
    rotated_at_ns: u64,
}

#[derive(Deserialize)]
struct RotationIn {
    user_id: String,
    connection: String,
    origin: String,
    refresh_token: SecretString,
    rotated_at_ns: u64,
}
