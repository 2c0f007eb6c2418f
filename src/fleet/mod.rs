//! A fleet of brokers sharing one Redis (or Valkey), so that N replicas
//! behave towards Auth0 like one: a shared cache tier under each replica's
//! moka cache, one Auth0 read per user across the fleet, one Auth0 budget
//! for all, and invalidation that reaches every replica.
//!
//! * Shared tier: a moka miss asks Redis before Auth0 (a moka hit never
//!   touches Redis). Values are sealed with AES-256-GCM and keys are an
//!   HMAC of the user id, both under subkeys of the cache key file
//!   (`keys.rs`): Redis never holds a token or a user id in clear.
//! * Single flight (`flight.rs`): the replica that misses takes the user's
//!   lock in Redis and reads Auth0; the others wait for its value.
//! * Budget (`budget.rs`): `--auth0-rate-limit`/`--auth0-burst` for the
//!   whole fleet, a GCRA in one Redis key, asked by `auth0::outbound`.
//! * Invalidation (`watch.rs`): InvalidateUser and `bypass_cache` delete the
//!   shared entry and publish the (sealed) user id; every replica drops it.
//! * Outages (`link.rs`): every call is bounded by a short timeout; while
//!   Redis is down or slow the replica serves from moka and Auth0 with its
//!   own budget, stays SERVING, and comes back to shared mode by itself,
//!   dropping the users it may have missed invalidations for.
//!
//! Here: the settings, the [`Fleet`] the cache asks, and the invalidation
//! messages. `wire.rs` is the value format, `scripts.rs` the Lua scripts,
//! `metrics.rs` the counters.

mod budget;
mod flight;
mod keys;
mod link;
mod metrics;
mod scripts;
mod tokens;
mod watch;
mod wire;

pub use flight::{Claim, FillGuard};
pub use metrics::describe as describe_metrics;
pub use tokens::{SharedRotation, TokenClaim, TokenFill, TokenKind, TokenNeed};

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rand::RngCore;
use redis::{Client, IntoConnectionInfo, TlsCertificates};
use secrecy::{ExposeSecret, SecretString};
use tokio::task::JoinHandle;

use crate::auth0::{SharedBudget, UserIdentities};
use crate::keyfile::{read_key_file, KeyFileError};
use crate::user_id::UserId;
use flight::millis;
use keys::{FleetKeys, UserSlot, KEY_PREFIX};
use link::Link;

/// Default bound on one Redis call: Redis answers in well under a
/// millisecond, so a call this slow means Redis is in trouble, and a miss
/// should go to Auth0 rather than wait.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(100);
/// Default life of a single-flight lock: how long others wait for a replica
/// that died mid-read before one of them reads Auth0 itself.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(5);

/// How long a user's invalidation count lives after its last invalidation:
/// far longer than any fetch it must stop from storing (a lock's life).
const GENERATION_LIFE: Duration = Duration::from_secs(24 * 60 * 60);

/// Invalidations kept for replay while Redis is unreachable; beyond it they
/// are dropped (counted and logged), and only the TTL bounds the old entries.
const MAX_PENDING_INVALIDATIONS: usize = 10_000;

/// How to reach the fleet's Redis and seal what goes there.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// `redis://`, `rediss://` (TLS), `valkey://` or `valkeys://`; secret,
    /// as it may carry a password.
    pub url: SecretString,
    /// PEM roots for `rediss://` instead of the system's (a private CA).
    pub ca_file: Option<PathBuf>,
    /// The cache key (base64 of 32 bytes, as `keyfile` reads it).
    pub key_file: PathBuf,
    /// Bound on every Redis call.
    pub timeout: Duration,
    /// Life of a single-flight lock.
    pub lock_ttl: Duration,
}

/// Why the fleet could not be set up; names settings, never their secret values.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("TOKENBROKER_CACHE_KEY_FILE {0}")]
    Key(#[from] KeyFileError),
    #[error("TOKENBROKER_REDIS_CA_FILE {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TOKENBROKER_REDIS_URL: {0}")]
    Url(String),
    #[error("the Redis client could not be set up: {0}")]
    Client(String),
    #[error("the shared tier must be set up inside the tokio runtime")]
    NoRuntime,
}

/// What a shared value gives a replica: the user (`None`: Auth0 has no such
/// user), fresh for `fresh_for` from now.
pub struct SharedEntry {
    /// The identities as the replica that read Auth0 got them.
    pub user: Option<UserIdentities>,
    /// What is left of the entry's freshness, so no replica serves it
    /// longer than the one that read it would.
    pub fresh_for: Duration,
}

/// What a replica keeps, as the invalidation channel sees it: the fleet
/// tells it what to forget. (The cache, the IdP refresher and the Token
/// Vault implement it; the fleet imports none of them.)
pub trait LocalTier: Send + Sync {
    /// Another replica invalidated the user: stop serving what is held.
    fn forget(&self, user_id: &UserId);
    /// Invalidations may have been missed: stop serving anything held.
    fn forget_all(&self);
}

/// What the fleet's parts share.
struct Core {
    link: Link,
    keys: FleetKeys,
    /// The invalidation channel.
    channel: String,
    /// This replica's random id, so it skips its own invalidations.
    replica: [u8; REPLICA_ID_BYTES],
    lock_ttl: Duration,
    /// Invalidations that could not be sent, replayed when Redis is back.
    pending: Mutex<Vec<UserId>>,
}

const REPLICA_ID_BYTES: usize = 16;

/// This replica's handle on the fleet: the shared tier, the single flight,
/// the budget and the invalidation channel.
pub struct Fleet {
    core: Arc<Core>,
    /// The channel's watcher, stopped with the fleet.
    watcher: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Ok(mut watcher) = self.watcher.lock() {
            if let Some(task) = watcher.take() {
                task.abort();
            }
        }
    }
}

impl Fleet {
    /// Reads the key (and CA) files and sets up a lazy connection: the
    /// broker starts, and serves, whether or not Redis is up yet.
    pub fn open(settings: &FleetSettings) -> Result<Self, FleetError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(FleetError::NoRuntime);
        }
        let keys = FleetKeys::derive(&read_key_file(&settings.key_file)?);
        let link = Link::open(client(settings)?, settings.timeout)
            .map_err(|error| FleetError::Client(error.to_string()))?;
        let mut replica = [0u8; REPLICA_ID_BYTES];
        rand::rng().fill_bytes(&mut replica);
        Ok(Self {
            core: Arc::new(Core {
                link,
                keys,
                channel: format!("{KEY_PREFIX}invalidate"),
                replica,
                lock_ttl: settings.lock_ttl,
                pending: Mutex::new(Vec::new()),
            }),
            watcher: Mutex::new(None),
        })
    }

    /// The fleet's Auth0 budget of `rate` per second and `burst`, for
    /// `auth0::Auth0Client::with_shared_budget`.
    pub fn budget(&self, rate: NonZeroU32, burst: NonZeroU32) -> Arc<dyn SharedBudget> {
        Arc::new(budget::FleetBudget::new(self.core.clone(), rate, burst))
    }

    /// Starts following the invalidation channel for `tiers` (the identity
    /// cache, the IdP refresher, the Token Vault: everything that keeps what
    /// an invalidation must drop), until the fleet is dropped or no tier is
    /// left. Shared mode begins once subscribed.
    pub fn watch(&self, tiers: Vec<Weak<dyn LocalTier>>) {
        let task = tokio::spawn(watch::follow_channel(self.core.clone(), tiers));
        if let Ok(mut watcher) = self.watcher.lock() {
            if let Some(previous) = watcher.replace(task) {
                previous.abort();
            }
        }
    }

    /// Forgets the user fleet-wide: deletes the shared entry (and any read's
    /// lock) and tells every replica. If Redis cannot be reached the
    /// invalidation is kept and sent when it is back.
    pub async fn invalidate(&self, user_id: &UserId) {
        self.core.deliver_invalidation(user_id).await;
    }

    /// Whether the fleet is in shared mode now (Redis answering and the
    /// channel followed).
    pub fn is_shared(&self) -> bool {
        self.core.link.is_up()
    }
}

impl Core {
    /// The sealed message that tells other replicas to forget `user_id`.
    fn invalidation(&self, user_id: &UserId) -> Option<Vec<u8>> {
        let mut plaintext = zeroize::Zeroizing::new(Vec::with_capacity(
            REPLICA_ID_BYTES + user_id.as_str().len(),
        ));
        plaintext.extend_from_slice(&self.replica);
        plaintext.extend_from_slice(user_id.as_str().as_bytes());
        self.keys.seal(self.channel.as_bytes(), &plaintext)
    }

    /// Keeps an invalidation Redis did not take, to send when it is back.
    fn keep_for_later(&self, user_id: &UserId) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        if pending.len() >= MAX_PENDING_INVALIDATIONS {
            metrics::invalidation_dropped();
            tracing::error!(
                kept = pending.len(),
                "Redis unreachable and too many invalidations waiting: this one reaches the other replicas only through their TTL"
            );
            return;
        }
        pending.push(user_id.clone());
    }

    /// Sends the invalidations kept while Redis was unreachable; those that
    /// fail again are kept again.
    async fn replay_pending(&self) {
        let waiting = match self.pending.lock() {
            Ok(mut pending) => std::mem::take(&mut *pending),
            Err(_) => return,
        };
        if waiting.is_empty() {
            return;
        }
        tracing::info!(
            count = waiting.len(),
            "sending the invalidations kept during the Redis outage"
        );
        for user_id in waiting {
            self.deliver_invalidation(&user_id).await;
        }
    }

    /// Runs [`scripts::INVALIDATE`] for `user_id`: counted when Redis took
    /// it, kept for later when it did not.
    async fn deliver_invalidation(&self, user_id: &UserId) {
        let Some(message) = self.invalidation(user_id) else {
            return;
        };
        let slot = self.keys.slot(user_id);
        let mut script = scripts::INVALIDATE.key(&slot.value);
        script
            .key(&slot.lock)
            .key(&slot.kept)
            .key(&slot.generation)
            .key(&slot.rotations)
            .arg(&self.channel)
            .arg(message)
            .arg(millis(GENERATION_LIFE));
        if self.link.run::<i64>("invalidate", &script).await.is_some() {
            metrics::invalidation_sent();
        } else {
            self.keep_for_later(user_id);
        }
    }

    /// The user's slot (value and lock keys).
    fn slot(&self, user_id: &UserId) -> UserSlot {
        self.keys.slot(user_id)
    }
}

/// A Redis client for `settings.url`, with `settings.ca_file` as the only
/// trusted roots when given (else the system's). The URL is checked here
/// and never repeated in an error: it may hold a password.
fn client(settings: &FleetSettings) -> Result<Client, FleetError> {
    let url = check_url(settings.url.expose_secret())?;
    let tls = url.scheme().ends_with('s');
    let info = url
        .as_str()
        .into_connection_info()
        .map_err(|error| FleetError::Url(error.to_string()))?;
    let Some(ca_file) = &settings.ca_file else {
        return Client::open(info).map_err(|error| FleetError::Client(error.to_string()));
    };
    if !tls {
        return Err(FleetError::Url(
            "TOKENBROKER_REDIS_CA_FILE is for rediss:// (TLS) URLs".to_owned(),
        ));
    }
    let root_cert = std::fs::read(ca_file).map_err(|source| FleetError::CaFile {
        path: ca_file.clone(),
        source,
    })?;
    let certificates = TlsCertificates {
        client_tls: None,
        root_cert: Some(root_cert),
    };
    Client::build_with_tls(info, certificates).map_err(|error| FleetError::CaFile {
        path: ca_file.clone(),
        source: std::io::Error::other(error.to_string()),
    })
}

/// The URL if the broker can use it: a Redis or Valkey scheme, a host, and
/// certificate checks left on.
fn check_url(text: &str) -> Result<url::Url, FleetError> {
    let url = url::Url::parse(text.trim())
        .map_err(|_| FleetError::Url("not a URL (redis://host:6379 or rediss://...)".to_owned()))?;
    if !matches!(url.scheme(), "redis" | "rediss" | "valkey" | "valkeys") {
        return Err(FleetError::Url(
            "the scheme must be redis://, rediss://, valkey:// or valkeys://".to_owned(),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(FleetError::Url("has no host".to_owned()));
    }
    if url.fragment().is_some() {
        return Err(FleetError::Url(
            "no #fragment: certificate checks cannot be turned off (#insecure)".to_owned(),
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_without_repeating_them() {
        assert!(check_url("redis://127.0.0.1:6379").is_ok());
        assert!(check_url("rediss://:hunter2@redis.example:6380/0").is_ok());
        assert!(check_url("valkey://valkey:6379").is_ok());
        for bad in [
            "http://redis:6379",
            "redis-server:6379",
            "rediss://redis.example#insecure",
            "redis://",
        ] {
            let error = check_url(bad).unwrap_err().to_string();
            assert!(error.starts_with("TOKENBROKER_REDIS_URL: "), "{error}");
        }
        let error = check_url("ftp://:hunter2@h").unwrap_err().to_string();
        assert!(!error.contains("hunter2"), "{error}");
    }
}
