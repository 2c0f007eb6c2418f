//! A token that works for as long as the caller needs, or the reason there is
//! none. For connections the connections file marks `source = "token-vault"`:
//! the token Auth0 Token Vault holds (`vault`). For the others: the profile's
//! token when it is known to live past `min_valid_for` (or its expiry is
//! unknown), else a token refreshed at the IdP for connections marked
//! `refresh = "idp"`, else TOKEN_EXPIRED. A token known to expire sooner is
//! never released as if it were fine.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use secrecy::ExposeSecret;
use tokio::time::Instant as Deadline;

use crate::auth0::{Auth0Client, Identity, UserIdentities};
use crate::budget::CallerShare;
use crate::connections::{ConnectionSource, ConnectionsStore, RefreshRule};
use crate::error::BrokerError;
use crate::fleet::Fleet;
use crate::idp::{IdpError, IdpRefresher, TokenKey};
use crate::proto::{IdpToken, TokenSource, UnavailableToken};
use crate::selection;
use crate::stats;
use crate::vault::{TokenVault, VaultNeed, VaultSettings};

/// The longest `min_valid_for` honoured. A caller asking for more gets this:
/// IdPs issue tokens of about an hour, and asking past their lifetime would
/// refresh on every request.
pub const MAX_MIN_VALID_FOR: Duration = Duration::from_secs(30 * 60);

/// Default `min_valid_for` (`--min-token-validity`).
pub const DEFAULT_MIN_TOKEN_VALIDITY: Duration = Duration::from_secs(60);

/// What the operator chose about fresh tokens: the connections file, the
/// default `min_valid_for`, and the IdP client's limits.
#[derive(Debug, Clone)]
pub struct FreshnessSettings {
    /// `--connections`; `None`: every connection reads the profile, no refresh.
    pub connections: Option<std::path::PathBuf>,
    /// `--min-token-validity`.
    pub default_min_validity: Duration,
    pub idp: crate::idp::IdpSettings,
}

impl Default for FreshnessSettings {
    fn default() -> Self {
        Self {
            connections: None,
            default_min_validity: DEFAULT_MIN_TOKEN_VALIDITY,
            idp: crate::idp::IdpSettings::default(),
        }
    }
}

/// Why fresh tokens cannot be set up; names the file.
#[derive(Debug, thiserror::Error)]
pub enum FreshnessError {
    #[error("TOKENBROKER_CONNECTIONS {0}")]
    Connections(#[from] crate::connections::ConnectionsError),
    #[error(transparent)]
    Idp(#[from] crate::idp::IdpSetupError),
}

impl FreshnessSettings {
    /// Reads the connections file: a bad one fails at start, with its line.
    /// Read before the rest, as the Auth0 client keeps refresh tokens by it
    /// ([`refresh_token_filter`]).
    pub fn open_connections(&self) -> Result<Arc<ConnectionsStore>, FreshnessError> {
        Ok(Arc::new(ConnectionsStore::open(
            self.connections.as_deref(),
        )?))
    }

    /// Builds the refresher, and the Token Vault on `auth0` (whose calls
    /// give up after `auth0_timeout`), both sharing their tokens with
    /// `fleet` when there is one.
    pub fn open(
        &self,
        connections: Arc<ConnectionsStore>,
        auth0: Auth0Client,
        auth0_timeout: Duration,
        fleet: Option<Arc<Fleet>>,
    ) -> Result<Freshness, FreshnessError> {
        let vault = VaultSettings {
            capacity: self.idp.capacity,
            forget_memory: auth0_timeout.saturating_mul(2) + Duration::from_secs(60),
            exchange_timeout: auth0_timeout,
        };
        Ok(Freshness {
            connections,
            refresher: Arc::new(IdpRefresher::new(self.idp)?.with_fleet(fleet.clone())),
            vault: Arc::new(TokenVault::new(auth0, vault).with_fleet(fleet)),
            default_min_validity: self.default_min_validity,
        })
    }
}

/// What makes tokens usable: the connections' sources and refresh rules,
/// the IdP refresher and the Token Vault.
#[derive(Clone)]
pub struct Freshness {
    pub connections: Arc<ConnectionsStore>,
    pub refresher: Arc<IdpRefresher>,
    /// Tokens of `source = "token-vault"` connections.
    pub vault: Arc<TokenVault>,
    /// `min_valid_for` of requests that set none.
    pub default_min_validity: Duration,
}

/// One release's view of time and budget: how long tokens must live, until
/// when IdP and Auth0 calls may run, when the RPC began (to tell kept
/// tokens) and the caller's share of the Auth0 budget (a Token Vault
/// exchange is an Auth0 call).
pub(super) struct Need<'a> {
    pub(super) min_valid_for: Duration,
    pub(super) deadline: Option<Deadline>,
    pub(super) started: SystemTime,
    pub(super) share: CallerShare<'a>,
}

impl Freshness {
    /// The request's `min_valid_for`, else the default, at most
    /// [`MAX_MIN_VALID_FOR`]; a negative one counts as zero.
    pub(super) fn min_valid_for(&self, requested: Option<&prost_types::Duration>) -> Duration {
        let asked = requested.map_or(self.default_min_validity, |duration| {
            Duration::try_from(*duration).unwrap_or_default()
        });
        asked.min(MAX_MIN_VALID_FOR)
    }

    /// `identity`'s token, usable for `need.min_valid_for`, or why not.
    pub(super) async fn usable_token(
        &self,
        identity: &Identity,
        user: &UserIdentities,
        from_cache: bool,
        need: &Need<'_>,
    ) -> Result<IdpToken, BrokerError> {
        if self.from_token_vault(&identity.connection) {
            // Boxed, as below: only Token Vault connections wait for it.
            return Box::pin(self.exchanged(identity, user, need)).await;
        }
        if let Some(token) = usable_profile_token(identity, user, from_cache, need) {
            return Ok(token);
        }
        // Boxed: only a token that must be refreshed needs the refresher's
        // future; inline it would sit in every RPC's future, cache hits too.
        Box::pin(self.refreshed_or_refused(identity, user, need)).await
    }

    /// Whether the connections file (as it is now) says `connection`'s tokens
    /// come from Token Vault.
    pub fn from_token_vault(&self, connection: &str) -> bool {
        self.connections.current().rule_for(connection).source == ConnectionSource::TokenVault
    }

    /// The token Token Vault holds for `identity`, kept or exchanged now.
    async fn exchanged(
        &self,
        identity: &Identity,
        user: &UserIdentities,
        need: &Need<'_>,
    ) -> Result<IdpToken, BrokerError> {
        let key = TokenKey {
            user_id: user.user_id.clone(),
            connection: identity.connection.clone(),
        };
        let vault_need = VaultNeed {
            key: &key,
            provider: &identity.provider,
            idp_user_id: &identity.idp_user_id,
            min_valid_for: need.min_valid_for,
            deadline: need.deadline,
            share: need.share,
        };
        let token = self.vault.token(&vault_need).await?;
        Ok(exact_token(
            identity,
            ExactToken {
                access_token: &token.access_token,
                issued_at: token.issued_at,
                expires_at: token.expires_at,
                scopes: &token.scopes,
                source: TokenSource::TokenVault,
            },
            need,
        ))
    }

    /// A token refreshed at the IdP when the connection allows it, else the
    /// reason there is none.
    async fn refreshed_or_refused(
        &self,
        identity: &Identity,
        user: &UserIdentities,
        need: &Need<'_>,
    ) -> Result<IdpToken, BrokerError> {
        let rule = self
            .connections
            .current()
            .rule_for(&identity.connection)
            .clone();
        match (&rule.refresh, &identity.refresh_token) {
            (RefreshRule::Idp(client), Some(refresh_token)) => {
                let key = TokenKey {
                    user_id: user.user_id.clone(),
                    connection: identity.connection.clone(),
                };
                let refreshed = self
                    .refresher
                    .token(
                        &key,
                        refresh_token,
                        client,
                        need.min_valid_for,
                        need.deadline,
                    )
                    .await
                    .map_err(|error| refresh_error(error, identity))?;
                Ok(exact_token(
                    identity,
                    ExactToken {
                        access_token: &refreshed.access_token,
                        issued_at: refreshed.issued_at,
                        expires_at: refreshed.expires_at,
                        scopes: &refreshed.scopes,
                        source: TokenSource::IdpRefresh,
                    },
                    need,
                ))
            }
            _ if identity.access_token.is_none() => Err(selection::missing_token(identity, user)),
            _ => {
                stats::token_refused_as_expired();
                Err(BrokerError::TokenExpired {
                    provider: identity.provider.clone(),
                    connection: identity.connection.clone(),
                })
            }
        }
    }

    /// Every identity's usable token, and for the others why not (ListIdpTokens).
    pub(super) async fn usable_tokens<'a>(
        &self,
        identities: impl Iterator<Item = &'a Identity>,
        user: &UserIdentities,
        from_cache: bool,
        need: &Need<'_>,
    ) -> (Vec<IdpToken>, Vec<UnavailableToken>) {
        let mut tokens = Vec::new();
        let mut unavailable = Vec::new();
        for identity in identities {
            match self.usable_token(identity, user, from_cache, need).await {
                Ok(token) => tokens.push(token),
                Err(error) => unavailable.push(UnavailableToken {
                    provider: identity.provider.clone(),
                    connection: identity.connection.clone(),
                    reason: error.reason().to_owned(),
                }),
            }
        }
        (tokens, unavailable)
    }

    /// Drops what the refresher and the Token Vault hold for the user
    /// (InvalidateUser, `bypass_cache`).
    pub(super) fn forget_user(&self, user_id: &str) {
        self.refresher.forget_user(user_id);
        self.vault.forget_user(user_id);
    }
}

/// Which connections' refresh tokens the profile read must keep: those
/// `connections` (as it is when the profile is read) refreshes at the IdP.
pub fn refresh_token_filter(
    connections: &Arc<ConnectionsStore>,
) -> crate::auth0::RefreshTokenFilter {
    let connections = connections.clone();
    Arc::new(move |connection: &str| {
        matches!(
            connections.current().rule_for(connection).refresh,
            RefreshRule::Idp(_)
        )
    })
}

/// The profile's token when it lives long enough: the path of most releases,
/// with nothing to wait for.
pub(super) fn usable_profile_token(
    identity: &Identity,
    user: &UserIdentities,
    from_cache: bool,
    need: &Need<'_>,
) -> Option<IdpToken> {
    (identity.access_token.is_some() && lives_long_enough(identity.expires_at, need))
        .then(|| profile_token(identity, user, from_cache))
}

/// Whether a token expiring at `expires_at` still lives `min_valid_for`; an
/// unknown expiry counts as long enough (nothing says otherwise).
fn lives_long_enough(expires_at: Option<SystemTime>, need: &Need<'_>) -> bool {
    expires_at.is_none_or(|at| crate::kept::lives_for(at, need.min_valid_for))
}

fn refresh_error(error: IdpError, identity: &Identity) -> BrokerError {
    let provider = identity.provider.clone();
    let connection = identity.connection.clone();
    match error {
        IdpError::InvalidGrant => BrokerError::UserMustReconnect {
            provider,
            connection,
        },
        IdpError::ClientRejected { status, code } => BrokerError::ConnectionMisconfigured {
            connection,
            detail: format!("HTTP {status} {code}"),
        },
        IdpError::Unavailable {
            reason,
            retry_after,
        } => BrokerError::IdpUnavailable {
            provider,
            connection,
            reason,
            retry_after,
        },
    }
}

fn expose(secret: &Option<secrecy::SecretString>) -> String {
    secret
        .as_ref()
        .map(|value| value.expose_secret().to_owned())
        .unwrap_or_default()
}

/// The token Auth0 keeps on the profile; its expiry is an upper bound.
fn profile_token(identity: &Identity, user: &UserIdentities, from_cache: bool) -> IdpToken {
    IdpToken {
        provider: identity.provider.clone(),
        connection: identity.connection.clone(),
        idp_user_id: identity.idp_user_id.clone(),
        access_token: expose(&identity.access_token),
        access_token_secret: expose(&identity.access_token_secret),
        expires_at: identity.expires_at.map(prost_types::Timestamp::from),
        fetched_at: Some(prost_types::Timestamp::from(user.fetched_at)),
        from_cache,
        source: TokenSource::Auth0Profile.into(),
        scopes: Vec::new(),
    }
}

/// A token with an exact expiry: refreshed at the IdP, or from Token Vault.
struct ExactToken<'a> {
    access_token: &'a secrecy::SecretString,
    /// When the request that got it was sent: its issue time at the latest.
    issued_at: SystemTime,
    expires_at: SystemTime,
    scopes: &'a [String],
    source: TokenSource,
}

/// The proto token of `identity` for an exactly expiring `token`; from
/// cache when it was got before this RPC began.
fn exact_token(identity: &Identity, token: ExactToken<'_>, need: &Need<'_>) -> IdpToken {
    IdpToken {
        provider: identity.provider.clone(),
        connection: identity.connection.clone(),
        idp_user_id: identity.idp_user_id.clone(),
        access_token: token.access_token.expose_secret().to_owned(),
        access_token_secret: String::new(),
        expires_at: Some(prost_types::Timestamp::from(token.expires_at)),
        fetched_at: Some(prost_types::Timestamp::from(token.issued_at)),
        from_cache: token.issued_at < need.started,
        source: token.source.into(),
        scopes: token.scopes.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_must_outlive_min_valid_for_and_an_unknown_expiry_passes() {
        let budgets = crate::budget::CallerBudgets::new(crate::budget::ShareSettings {
            rate_per_second: std::num::NonZeroU32::MIN,
            burst: std::num::NonZeroU32::MIN,
            share: 1.0,
            max_wait: Duration::ZERO,
        });
        let need = |min: u64| Need {
            min_valid_for: Duration::from_secs(min),
            deadline: None,
            started: SystemTime::now(),
            share: CallerShare::of(&budgets, "test"),
        };
        let in_ten_minutes = SystemTime::now() + Duration::from_secs(600);
        assert!(lives_long_enough(Some(in_ten_minutes), &need(60)));
        assert!(!lives_long_enough(Some(in_ten_minutes), &need(900)));
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        assert!(!lives_long_enough(Some(an_hour_ago), &need(0)));
        assert!(lives_long_enough(None, &need(3600)));
    }

    #[test]
    fn refusals_of_the_idp_say_what_to_do() {
        let identity = Identity {
            provider: "google-oauth2".into(),
            connection: "google-oauth2".into(),
            idp_user_id: "1".into(),
            access_token: None,
            access_token_secret: None,
            expires_at: None,
            refresh_token: None,
        };
        assert_eq!(
            refresh_error(IdpError::InvalidGrant, &identity).reason(),
            "USER_MUST_RECONNECT"
        );
        let unavailable = refresh_error(IdpError::unavailable("HTTP 503"), &identity);
        assert_eq!(unavailable.reason(), "IDP_UNAVAILABLE");
        assert_eq!(unavailable.code(), tonic::Code::Unavailable);
        let client = IdpError::ClientRejected {
            status: 401,
            code: "invalid_client".into(),
        };
        assert_eq!(
            refresh_error(client, &identity).reason(),
            "BROKER_MISCONFIGURED"
        );
    }
}
