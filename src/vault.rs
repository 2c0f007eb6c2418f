//! [`TokenVault`]: users' IdP tokens from Auth0 Token Vault, for the
//! connections the connections file marks `source = "token-vault"`.
//!
//! Once Token Vault is on for a connection, Auth0 keeps its tokens there and
//! no longer on the profile. The broker still reads the profile (which
//! identities a user has), then exchanges a subject token it signs for the
//! identity's IdP token (`auth0::Auth0Client::token_vault_exchange`, the
//! Privileged Worker exchange). Here:
//!
//! * an exchanged token is kept per user and connection while it lives, and
//!   served while it lives longer than the caller needs (`min_valid_for`);
//! * concurrent needs of one user and connection share one exchange (moka's
//!   single flight, as `idp::IdpRefresher` shares refreshes), paid from the
//!   share of the Auth0 budget of the caller whose request runs it;
//! * `forget_user` (InvalidateUser, `bypass_cache`) drops all of a user's
//!   tokens, and an exchange landing after it keeps nothing;
//! * in a fleet (`--redis-url`) exchanged tokens are shared and one replica
//!   exchanges for all (`fleet::tokens`); an invalidation on any replica
//!   drops them here.
//!
//! Auth0 hands out the token it holds while it is valid and refreshes it at
//! the IdP only once it has expired, so an exchange cannot buy a longer-lived
//! token: when the one Auth0 holds lives shorter than `min_valid_for`, the
//! answer of one exchange is released all the same (the best there is).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::auth0::{Auth0Client, Auth0Error, ExchangedToken, VaultRequest};
use crate::budget::CallerShare;
use crate::error::BrokerError;
use crate::fleet::{Fleet, LocalTier, TokenClaim, TokenKind, TokenNeed};
use crate::kept::{KeptToken, KeptTokens, TokenKey};
use crate::logsafe::capped;
use crate::stats;
use crate::user_id::UserId;

/// How much longer than the longest exchange a fleet-wide exchange lock lives.
const LOCK_MARGIN: Duration = Duration::from_secs(1);

/// How many exchanged tokens are kept, and how long a `forget_user` is
/// remembered.
#[derive(Debug, Clone, Copy)]
pub struct VaultSettings {
    /// Users × connections whose tokens are kept at most.
    pub capacity: u64,
    /// Longer than any exchange may take (`--auth0-timeout`, twice, and a
    /// margin): every exchange begun before a `forget_user` has landed by then.
    pub forget_memory: Duration,
    /// The longest one exchange may take (`--auth0-timeout`): the life of
    /// its fleet-wide lock, plus a margin.
    pub exchange_timeout: Duration,
}

/// A token Token Vault handed out, as the vault keeps and serves it; it
/// expires at the exchange's issue time plus Auth0's `expires_in`.
pub type VaultToken = KeptToken;

impl From<ExchangedToken> for KeptToken {
    fn from(token: ExchangedToken) -> Self {
        Self {
            expires_at: token.issued_at + token.lifetime,
            access_token: token.access_token,
            issued_at: token.issued_at,
            scopes: token.scopes,
        }
    }
}

/// What one release needs of the vault.
pub struct VaultNeed<'a> {
    /// The user and the token-vault connection.
    pub key: &'a TokenKey,
    /// The identity's provider, for refusals.
    pub provider: &'a str,
    /// The identity's user id at the IdP: the exchange's `login_hint`.
    pub idp_user_id: &'a str,
    /// How long the token must still live.
    pub min_valid_for: Duration,
    /// When Auth0 calls made for this need must have given up.
    pub deadline: Option<Instant>,
    /// The caller's share of the Auth0 budget, spent if this need runs the exchange.
    pub share: CallerShare<'a>,
}

/// The outcome of one exchange, shared by everyone who waited for it.
type Outcome = Arc<Result<Arc<VaultToken>, BrokerError>>;

/// Exchanges for Token Vault tokens and keeps them. Share it behind an
/// `Arc`; every method takes `&self`.
pub struct TokenVault {
    /// Makes the exchanges (on the same outbound limits as every Auth0 call).
    auth0: Auth0Client,
    /// Exchanged tokens, kept until they expire, and the memory of
    /// `forget_user` calls, so an exchange landing after one keeps nothing.
    kept: KeptTokens,
    /// Exchanges under way, only while they are: single flight, not a cache.
    flights: moka::future::Cache<TokenKey, Outcome>,
    /// The fleet sharing exchanged tokens (`None`: alone).
    fleet: Option<Arc<Fleet>>,
    /// Life of an exchange's fleet-wide lock.
    lock_life: Duration,
}

impl TokenVault {
    /// An empty vault exchanging through `auth0`.
    pub fn new(auth0: Auth0Client, settings: VaultSettings) -> Self {
        Self {
            auth0,
            kept: KeptTokens::new(settings.capacity, settings.forget_memory),
            flights: moka::future::Cache::new(settings.capacity),
            fleet: None,
            lock_life: settings.exchange_timeout + LOCK_MARGIN,
        }
    }

    /// The same vault sharing its tokens with a fleet (`None`: alone).
    pub fn with_fleet(mut self, fleet: Option<Arc<Fleet>>) -> Self {
        self.fleet = fleet;
        self
    }

    /// A token of `need.key` that lives longer than `need.min_valid_for`:
    /// the one kept from an earlier exchange, else a new exchange's (even
    /// when it lives shorter: Auth0 holds no better one). Concurrent needs
    /// share one exchange.
    pub async fn token(&self, need: &VaultNeed<'_>) -> Result<Arc<VaultToken>, BrokerError> {
        if let Some(token) = self.usable(need.key, need.min_valid_for) {
            return Ok(token);
        }
        match self.shared_exchange(need).await {
            // Another caller's share ran out, not this one's: this caller
            // tries once on its own, as cache reads do.
            (Err(BrokerError::CallerShareSpent { .. }), false) => {
                self.shared_exchange(need).await.0
            }
            (outcome, _) => outcome,
        }
    }

    /// Drops every token kept for `user_id` (InvalidateUser, `bypass_cache`).
    /// An exchange under way for the user keeps nothing when it lands.
    pub fn forget_user(&self, user_id: &str) {
        self.kept.forget_user(user_id);
    }

    /// The kept token of `key` if it lives longer than `min_valid_for`.
    fn usable(&self, key: &TokenKey, min_valid_for: Duration) -> Option<Arc<VaultToken>> {
        self.kept.usable(key, min_valid_for)
    }

    /// One exchange for all who need `need.key` now, and whether this
    /// caller's future ran it. If the future running it is dropped (its
    /// caller's deadline), moka hands the exchange to a caller still waiting.
    async fn shared_exchange(
        &self,
        need: &VaultNeed<'_>,
    ) -> (Result<Arc<VaultToken>, BrokerError>, bool) {
        let ran_here = AtomicBool::new(false);
        let outcome = self
            .flights
            .get_with_by_ref(need.key, async {
                ran_here.store(true, Ordering::Relaxed);
                Arc::new(self.exchange_unless_done(need).await)
            })
            .await;
        // Over, and its waiters have their answer: the next need looks at
        // the kept token, not at this flight.
        self.flights.invalidate(need.key).await;
        (outcome.as_ref().clone(), ran_here.load(Ordering::Relaxed))
    }

    /// An exchange that ended just before this one started may have done its
    /// work: a caller that missed the kept token joins no flight and would
    /// otherwise exchange again.
    async fn exchange_unless_done(
        &self,
        need: &VaultNeed<'_>,
    ) -> Result<Arc<VaultToken>, BrokerError> {
        if let Some(token) = self.usable(need.key, need.min_valid_for) {
            return Ok(token);
        }
        match &self.fleet {
            Some(fleet) => self.exchange_in_fleet(fleet, need).await,
            None => self.spend_and_exchange(need).await,
        }
    }

    /// The fleet's token if it serves, else this replica's exchange under
    /// the token's fleet-wide lock, shared when done; else (Redis failing)
    /// an exchange of its own.
    async fn exchange_in_fleet(
        &self,
        fleet: &Fleet,
        need: &VaultNeed<'_>,
    ) -> Result<Arc<VaultToken>, BrokerError> {
        let started = self.kept.tick();
        let claim = fleet
            .claim_token(&TokenNeed {
                kind: TokenKind::TokenVault,
                user_id: &need.key.user_id,
                connection: &need.key.connection,
                min_valid_for: need.min_valid_for,
                lock_life: self.lock_life,
                deadline: need.deadline,
            })
            .await;
        match claim {
            TokenClaim::Found(shared) => Ok(self.keep_shared(need, shared, started)),
            TokenClaim::Holder(fill) => {
                let result = self.spend_and_exchange(need).await;
                match &result {
                    Ok(token) => fill.fill(token, None).await,
                    Err(_) => fill.release().await,
                }
                result
            }
            TokenClaim::Unshared => self.spend_and_exchange(need).await,
            TokenClaim::Busy => Err(BrokerError::DeadlineExceeded),
        }
    }

    /// One exchange, paid from the caller's share of the Auth0 budget.
    async fn spend_and_exchange(
        &self,
        need: &VaultNeed<'_>,
    ) -> Result<Arc<VaultToken>, BrokerError> {
        need.share.spend(need.deadline).await?;
        self.exchange(need).await
    }

    /// Keeps a token another replica exchanged, as if exchanged here.
    fn keep_shared(
        &self,
        need: &VaultNeed<'_>,
        shared: KeptToken,
        started: u64,
    ) -> Arc<VaultToken> {
        self.kept
            .keep(need.key, shared, started, "shared by the fleet")
    }

    /// Asks Auth0, counts and logs the answer, and keeps a token.
    async fn exchange(&self, need: &VaultNeed<'_>) -> Result<Arc<VaultToken>, BrokerError> {
        let started = self.kept.tick();
        let request = VaultRequest {
            user_id: &need.key.user_id,
            connection: &need.key.connection,
            login_hint: need.idp_user_id,
        };
        let asked = Instant::now();
        let result = self
            .auth0
            .token_vault_exchange(request, need.deadline)
            .await;
        let elapsed = asked.elapsed();
        match result {
            Ok(exchanged) => Ok(self.keep(need, exchanged, started, elapsed)),
            Err(error) => Err(refusal(error, need, elapsed)),
        }
    }

    /// Keeps a new token, unless the user was forgotten since `started`.
    fn keep(
        &self,
        need: &VaultNeed<'_>,
        exchanged: ExchangedToken,
        started: u64,
        elapsed: Duration,
    ) -> Arc<VaultToken> {
        stats::token_vault_exchange(&need.key.connection, "ok", elapsed);
        self.kept.keep(
            need.key,
            VaultToken::from(exchanged),
            started,
            "Token Vault exchange",
        )
    }
}

/// What another replica's invalidation makes this one drop.
impl LocalTier for TokenVault {
    fn forget(&self, user_id: &UserId) {
        self.forget_user(user_id.as_str());
    }

    fn forget_all(&self) {
        self.kept.forget_all();
    }
}

impl std::fmt::Debug for TokenVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVault")
            .field("tokens", &self.kept.count())
            .finish_non_exhaustive()
    }
}

/// What a failed exchange tells the caller, counted and logged: a missing
/// token set is the user's to mend (USER_MUST_RECONNECT), a refused client
/// the operator's (BROKER_MISCONFIGURED, logged as an error with Auth0's
/// code), the rest as for any Auth0 call.
fn refusal(error: Auth0Error, need: &VaultNeed<'_>, elapsed: Duration) -> BrokerError {
    let provider = need.provider.to_owned();
    let connection = need.key.connection.clone();
    let user_id = &*capped(&need.key.user_id);
    let outcome = match &error {
        Auth0Error::NoTokenSet { .. } => "no_token_set",
        Auth0Error::ExchangeRefused { .. } | Auth0Error::NoSubjectKey => "refused",
        error if error.is_transient() || matches!(error, Auth0Error::Throttled { .. }) => {
            "unavailable"
        }
        _ => "error",
    };
    stats::token_vault_exchange(&connection, outcome, elapsed);
    match error {
        Auth0Error::NoTokenSet { code } => {
            tracing::info!(
                user_id,
                connection,
                code,
                "Token Vault has no usable token: the user must connect the account again"
            );
            BrokerError::TokenVaultEmpty {
                provider,
                connection,
                code,
            }
        }
        Auth0Error::ExchangeRefused { .. } | Auth0Error::NoSubjectKey => {
            tracing::error!(%error, connection, "Auth0 refused the broker's Token Vault exchange: fix the broker's Auth0 application or key settings");
            BrokerError::TokenVaultMisconfigured {
                provider,
                connection,
                detail: error.to_string(),
            }
        }
        other => {
            tracing::warn!(error = %other, user_id, connection, "Token Vault exchange failed");
            BrokerError::from(other)
        }
    }
}
