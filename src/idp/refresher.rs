//! [`IdpRefresher`]: the state of IdP refreshes, shared by every RPC.
//!
//! * Refreshed tokens are kept per user and connection until they expire, and
//!   served while they live longer than the caller needs.
//! * Concurrent needs of one user and connection share one refresh (moka
//!   `get_with`, as `cache` shares Auth0 reads).
//! * A refresh token the IdP rotates is replaced, in memory, for the refresh
//!   token Auth0's profile holds: the next refresh sends the rotated one.
//! * `invalid_grant` is remembered for a while, so a burst of requests for a
//!   user who must reconnect asks the IdP once.
//!
//! * In a fleet (`--redis-url`) refreshed tokens and rotated refresh tokens
//!   are shared, and one replica refreshes a user's token for all
//!   (`fleet::tokens`); InvalidateUser from any replica drops them here,
//!   rotations included (the contract: an invalidation forgets everything
//!   held for the user).
//!
//! What the broker knows of a caller's refresh token is its SHA-256: enough to
//! tell whether a rotation or a refusal is about the token Auth0 holds now (a
//! user who reconnected has a new one), without keeping the token.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use moka::sync::Cache;
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use super::gate::Gate;
use super::request::{self, RefreshedToken};
use super::{IdpClient, IdpError, IdpSetupError};
use crate::auth0::OutboundLimits;
use crate::fleet::{Fleet, LocalTier, SharedRotation, TokenClaim, TokenKind, TokenNeed};
use crate::kept::{KeptToken, KeptTokens, TokenKey};
use crate::logsafe::capped;
use crate::stats;
use crate::user_id::UserId;

/// Outcome label of a refusal repeated from memory, without asking the IdP.
const REMEMBERED_REFUSAL: &str = "invalid_grant_remembered";
/// How long past the longest refresh a `forget_user` is remembered: long
/// enough for every refresh that began before it to have landed.
const FORGET_MARGIN: Duration = Duration::from_secs(60);
/// How much longer than the longest refresh a fleet-wide refresh lock lives.
const LOCK_MARGIN: Duration = Duration::from_secs(1);

/// Limits and sizes of the refresher.
#[derive(Debug, Clone, Copy)]
pub struct IdpSettings {
    /// Rate limit, in-flight bound, attempts and longest wait towards each
    /// connection's IdP; Auth0's shape and defaults (10/s, burst 20), but a
    /// budget of its own per connection, so one IdP's trouble spends nothing
    /// of Auth0's or another IdP's.
    pub limits: OutboundLimits,
    /// Longest wait for a TCP/TLS connection to the IdP.
    pub connect_timeout: Duration,
    /// Longest one refresh may take, attempts and waits included, whatever
    /// the caller's deadline: a hanging IdP holds no caller longer.
    pub call_timeout: Duration,
    /// Users × connections whose tokens, rotations and refusals are kept at most.
    pub capacity: u64,
    /// How long an `invalid_grant` is repeated without asking the IdP again.
    pub invalid_grant_memory: Duration,
}

impl Default for IdpSettings {
    fn default() -> Self {
        Self {
            limits: OutboundLimits::default(),
            connect_timeout: Duration::from_secs(3),
            call_timeout: Duration::from_secs(10),
            capacity: 100_000,
            invalid_grant_memory: Duration::from_secs(30),
        }
    }
}

/// A token the IdP issued on refresh, as the refresher hands it out.
pub type Refreshed = KeptToken;

/// SHA-256 of a refresh token: recognises the token a caller passes without
/// keeping it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Fingerprint([u8; 32]);

impl Fingerprint {
    fn of(token: &SecretString) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.expose_secret().as_bytes());
        let mut bytes = [0u8; 32];
        // SHA-256 digests are 32 bytes by definition.
        bytes.copy_from_slice(digest.as_ref());
        Self(bytes)
    }
}

/// The refresh token in use for a key since the IdP rotated the one Auth0
/// holds. Its `origin` is the [`Fingerprint`] of the caller's (Auth0's)
/// refresh token it replaces: a caller passing another one has a new grant,
/// which the rotation is not about. Of two, the newer is in use.
type Rotation = SharedRotation;

/// A refresh under way; callers passing different refresh tokens for one key
/// do not share one, as their answers may differ.
#[derive(Clone, PartialEq, Eq, Hash)]
struct FlightKey {
    key: TokenKey,
    origin: Fingerprint,
}

/// What a caller needs, carried through one refresh.
struct Need<'a> {
    key: &'a TokenKey,
    origin: Fingerprint,
    refresh_token: &'a SecretString,
    client: &'a IdpClient,
    min_valid_for: Duration,
    deadline: Option<Instant>,
}

/// Refreshes users' IdP tokens and keeps what it learns. Share it behind an
/// `Arc`; every method takes `&self`.
pub struct IdpRefresher {
    http: reqwest::Client,
    settings: IdpSettings,
    /// One gate per connection, made on first use. Its keys are every
    /// connection anything was kept for, which `forget_user` walks.
    gates: RwLock<HashMap<String, Arc<Gate>>>,
    /// Refreshed tokens, and the memory of `forget_user` calls, so a
    /// refresh landing after one keeps nothing.
    kept: KeptTokens,
    rotations: Cache<TokenKey, Arc<Rotation>>,
    /// `invalid_grant` answers, for the caller's refresh token they were about.
    refused: Cache<TokenKey, Fingerprint>,
    /// Refreshes under way, only while they are: single flight, not a cache.
    flights: moka::future::Cache<FlightKey, Arc<Result<Arc<Refreshed>, IdpError>>>,
    /// The fleet sharing refreshed tokens and rotations (`None`: alone).
    fleet: Option<Arc<Fleet>>,
}

impl IdpRefresher {
    /// A refresher with its own HTTP client (rustls, no redirects: a token
    /// endpoint that redirects is misconfigured, and following a 307 would
    /// post the client secret elsewhere).
    pub fn new(settings: IdpSettings) -> Result<Self, IdpSetupError> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.call_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tokenbroker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| IdpSetupError(error.without_url().to_string()))?;
        let capacity = settings.capacity;
        Ok(Self {
            http,
            gates: RwLock::default(),
            kept: KeptTokens::new(
                capacity,
                settings.call_timeout.saturating_mul(2) + FORGET_MARGIN,
            ),
            rotations: Cache::new(capacity),
            refused: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(settings.invalid_grant_memory)
                .build(),
            flights: moka::future::Cache::new(capacity),
            settings,
            fleet: None,
        })
    }

    /// The same refresher sharing its tokens and rotations with a fleet
    /// (`None`: alone).
    pub fn with_fleet(mut self, fleet: Option<Arc<Fleet>>) -> Self {
        self.fleet = fleet;
        self
    }

    /// A token of `key` that lives longer than `min_valid_for`: the one kept
    /// from an earlier refresh, else a new one from the IdP, refreshed with
    /// `refresh_token` (what Auth0's profile holds) or with the token the IdP
    /// rotated it into. When the IdP issues tokens shorter than
    /// `min_valid_for`, the new token is returned all the same after one
    /// refresh: the best there is. Concurrent needs of a key share one
    /// refresh; an `invalid_grant` is repeated without asking for
    /// [`IdpSettings::invalid_grant_memory`].
    pub async fn token(
        &self,
        key: &TokenKey,
        refresh_token: &SecretString,
        client: &IdpClient,
        min_valid_for: Duration,
        deadline: Option<Instant>,
    ) -> Result<Arc<Refreshed>, IdpError> {
        if let Some(token) = self.usable(key, min_valid_for) {
            return Ok(token);
        }
        let need = Need {
            key,
            origin: Fingerprint::of(refresh_token),
            refresh_token,
            client,
            min_valid_for,
            deadline,
        };
        if self.remembers_refusal(&need) {
            return Err(IdpError::InvalidGrant);
        }
        self.shared_refresh(&need).await
    }

    /// Drops everything held for `user_id` (`InvalidateUser`,
    /// `bypass_cache`): kept tokens, remembered refusals and rotated refresh
    /// tokens, so the next refresh starts again from Auth0's refresh token.
    /// An operator invalidates to stop what the broker holds; with an IdP
    /// that retires rotated tokens the user then reconnects, which is the
    /// honest outcome of forgetting the chain. A refresh under way for the
    /// user keeps no token when it lands.
    pub fn forget_user(&self, user_id: &str) {
        self.kept.forget_user(user_id);
        for connection in self.connections() {
            let key = TokenKey {
                user_id: user_id.to_owned(),
                connection,
            };
            self.refused.invalidate(&key);
            self.rotations.invalidate(&key);
        }
    }

    /// The kept token of `key` if it lives longer than `min_valid_for`.
    fn usable(&self, key: &TokenKey, min_valid_for: Duration) -> Option<Arc<Refreshed>> {
        self.kept.usable(key, min_valid_for)
    }

    /// Whether the IdP refused this very refresh token lately; counted when so.
    fn remembers_refusal(&self, need: &Need<'_>) -> bool {
        let remembered = self.refused.get(need.key) == Some(need.origin);
        if remembered {
            stats::idp_refresh(&need.key.connection, REMEMBERED_REFUSAL, None);
        }
        remembered
    }

    /// One refresh for all who need `need.key` with the same refresh token
    /// now. If the future running it is dropped, moka hands the refresh to a
    /// caller still waiting.
    async fn shared_refresh(&self, need: &Need<'_>) -> Result<Arc<Refreshed>, IdpError> {
        let flight = FlightKey {
            key: need.key.clone(),
            origin: need.origin,
        };
        let outcome = self
            .flights
            .get_with_by_ref(&flight, async {
                Arc::new(self.refresh_unless_done(need).await)
            })
            .await;
        // The refresh is over and its waiters have their answer: the next
        // need looks at the kept token, not at this flight.
        self.flights.invalidate(&flight).await;
        outcome.as_ref().clone()
    }

    /// A refresh that ended just before this one started may have done its
    /// work: a caller that missed the kept token joins no flight and would
    /// otherwise ask the IdP again.
    async fn refresh_unless_done(&self, need: &Need<'_>) -> Result<Arc<Refreshed>, IdpError> {
        if let Some(token) = self.usable(need.key, need.min_valid_for) {
            return Ok(token);
        }
        if self.remembers_refusal(need) {
            return Err(IdpError::InvalidGrant);
        }
        match &self.fleet {
            Some(fleet) => self.refresh_in_fleet(fleet, need).await,
            None => Ok(self.refresh(need, None).await?.0),
        }
    }

    /// The fleet's token if it serves, else this replica's refresh under
    /// the token's fleet-wide lock with the fleet's newest rotation, shared
    /// when done; else (Redis failing) a refresh of its own.
    async fn refresh_in_fleet(
        &self,
        fleet: &Fleet,
        need: &Need<'_>,
    ) -> Result<Arc<Refreshed>, IdpError> {
        let started = self.kept.tick();
        let claim = fleet
            .claim_token(&TokenNeed {
                kind: TokenKind::IdpRefresh,
                user_id: &need.key.user_id,
                connection: &need.key.connection,
                min_valid_for: need.min_valid_for,
                lock_life: self.settings.call_timeout + LOCK_MARGIN,
                deadline: need.deadline,
            })
            .await;
        match claim {
            TokenClaim::Found(shared) => Ok(self.keep_shared(need, shared, started)),
            TokenClaim::Holder(fill) => {
                let fleet_rotation = fill.rotation().cloned();
                match self.refresh(need, fleet_rotation).await {
                    Ok((token, rotated)) => {
                        fill.fill(&token, rotated.as_deref()).await;
                        Ok(token)
                    }
                    Err(error) => {
                        fill.release().await;
                        Err(error)
                    }
                }
            }
            TokenClaim::Unshared => Ok(self.refresh(need, None).await?.0),
            TokenClaim::Busy => Err(IdpError::unavailable(
                "another replica's refresh of this token was still running at the caller's deadline",
            )),
        }
    }

    /// Keeps a token another replica refreshed, as if refreshed here.
    fn keep_shared(&self, need: &Need<'_>, shared: KeptToken, started: u64) -> Arc<Refreshed> {
        self.kept
            .keep(need.key, shared, started, "shared by the fleet")
    }

    /// The rotation to refresh with: the newer of this replica's and the
    /// fleet's, of the chain the caller's refresh token began.
    fn rotation_in_use(&self, need: &Need<'_>, fleet: Option<Rotation>) -> Option<Arc<Rotation>> {
        let local = self
            .rotations
            .get(need.key)
            .filter(|rotation| rotation.origin == need.origin.0);
        let fleet = fleet.filter(|rotation| rotation.origin == need.origin.0);
        match (local, fleet) {
            (Some(local), Some(fleet)) if fleet.rotated_at <= local.rotated_at => Some(local),
            (local, None) => local,
            (_, Some(fleet)) => {
                let fleet = Arc::new(fleet);
                self.rotations.insert(need.key.clone(), fleet.clone());
                Some(fleet)
            }
        }
    }

    /// Asks the IdP, within the connection's gate, and keeps what it says:
    /// the token, and the rotation when the IdP rotated the refresh token.
    async fn refresh(
        &self,
        need: &Need<'_>,
        fleet_rotation: Option<Rotation>,
    ) -> Result<(Arc<Refreshed>, Option<Arc<Rotation>>), IdpError> {
        let started = self.kept.tick();
        let rotation = self.rotation_in_use(need, fleet_rotation);
        let in_use = rotation.as_ref().map_or(need.refresh_token, |r| &r.current);
        let form = request::form_body(need.client, in_use)?;
        let gate = self.gate_for(&need.key.connection);
        let asked = Instant::now();
        let result = gate
            .call(&need.key.connection, need.deadline, || {
                request::send(&self.http, need.client, &form)
            })
            .await;
        let elapsed = asked.elapsed();
        match result {
            Ok(fresh) => Ok(self.keep_token(need, fresh, started, elapsed)),
            Err(error) => Err(self.note_failure(need, error, started, elapsed)),
        }
    }

    /// Keeps a new token, and the refresh token it was rotated into (kept
    /// whatever happened meanwhile: the one before it is retired).
    fn keep_token(
        &self,
        need: &Need<'_>,
        fresh: RefreshedToken,
        started: u64,
        elapsed: Duration,
    ) -> (Arc<Refreshed>, Option<Arc<Rotation>>) {
        stats::idp_refresh(&need.key.connection, "ok", Some(elapsed));
        let rotation = fresh.rotated_refresh_token.map(|current| {
            let rotation = Arc::new(Rotation {
                origin: need.origin.0,
                current,
                rotated_at: fresh.token.issued_at,
            });
            self.rotations.insert(need.key.clone(), rotation.clone());
            rotation
        });
        let token = self
            .kept
            .keep(need.key, fresh.token, started, "IdP refresh");
        (token, rotation)
    }

    /// Counts and logs a failed refresh, and remembers an `invalid_grant`.
    fn note_failure(
        &self,
        need: &Need<'_>,
        error: IdpError,
        started: u64,
        elapsed: Duration,
    ) -> IdpError {
        stats::idp_refresh(&need.key.connection, error.outcome(), Some(elapsed));
        let user_id = &*capped(&need.key.user_id);
        let connection = need.key.connection.as_str();
        if error == IdpError::InvalidGrant {
            // A refused rotated token ends its chain: next time, Auth0's.
            self.rotations.invalidate(need.key);
            self.kept
                .forgetting()
                .keep(&self.refused, need.key, need.origin, started);
            tracing::info!(
                user_id,
                connection,
                "the IdP refused the refresh token: the user must reconnect"
            );
        } else {
            tracing::warn!(%error, user_id, connection, "IdP refresh failed");
        }
        error
    }

    /// The gate of `connection`, made on first use.
    fn gate_for(&self, connection: &str) -> Arc<Gate> {
        let gates = self.gates.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(gate) = gates.get(connection) {
            return gate.clone();
        }
        drop(gates);
        let mut gates = self.gates.write().unwrap_or_else(PoisonError::into_inner);
        let settings = &self.settings;
        let gate = gates
            .entry(connection.to_owned())
            .or_insert_with(|| Arc::new(Gate::new(settings.limits, settings.call_timeout)));
        gate.clone()
    }

    /// Every connection anything was ever kept for.
    fn connections(&self) -> Vec<String> {
        let gates = self.gates.read().unwrap_or_else(PoisonError::into_inner);
        gates.keys().cloned().collect()
    }
}

/// What another replica's invalidation makes this one drop.
impl LocalTier for IdpRefresher {
    fn forget(&self, user_id: &UserId) {
        self.forget_user(user_id.as_str());
    }

    fn forget_all(&self) {
        self.kept.forget_all();
    }
}

impl std::fmt::Debug for IdpRefresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdpRefresher")
            .field("settings", &self.settings)
            .field("tokens", &self.kept.count())
            .finish_non_exhaustive()
    }
}
