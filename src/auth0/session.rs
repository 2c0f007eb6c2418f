//! The broker's Management API session: one Management token, obtained with
//! the client-credentials grant and reused for its reuse window (its lifetime
//! minus a margin); concurrent misses share one `/oauth/token` call. When the
//! users endpoint rejects the token (401), exactly that token is dropped, a
//! new one obtained and the read retried once. Callers ask for a user
//! ([`Auth0Client::read_user`]) and never hold a Management token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::ops::compute::Op;
use moka::Expiry;
use tokio::time::Instant as Deadline;

use super::token::IssuedToken;
use super::{Auth0Client, Auth0Error, ManagementToken, UserIdentities};
use crate::stats;
use crate::user_id::UserId;

/// The Management token the broker holds, if any, and how the next one is numbered.
pub(super) struct ManagementSession {
    /// One entry (key `()`), kept for the token's reuse window.
    token: Cache<(), Arc<ManagementToken>>,
    /// Numbers each Management token, so a 401 drops only the rejected one.
    next_generation: AtomicU64,
}

impl ManagementSession {
    /// A session without a token: the first read or [`Auth0Client::warm_up`] obtains one.
    pub(super) fn new() -> Self {
        Self {
            token: Cache::builder()
                .max_capacity(1)
                .expire_after(ManagementTokenExpiry)
                .build(),
            next_generation: AtomicU64::new(1),
        }
    }

    /// Numbers a newly issued token as the session's next one.
    fn number(&self, issued: IssuedToken) -> ManagementToken {
        ManagementToken {
            secret: issued.secret,
            lifetime: issued.lifetime,
            scope: issued.scope,
            obtained_at: issued.obtained_at,
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
        }
    }
}

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

impl Auth0Client {
    /// The user's identities (404: [`Auth0Error::UserNotFound`]), read with the
    /// session's Management token; one retry with a new token when Auth0
    /// rejects the held one. Calls stop retrying before `deadline`.
    pub async fn read_user(
        &self,
        user_id: &UserId,
        deadline: Option<Deadline>,
    ) -> Result<UserIdentities, Auth0Error> {
        let token = self.management_token(deadline).await?;
        match self.fetch_user(&token, user_id, deadline).await {
            Err(Auth0Error::ManagementTokenRejected) => {
                tracing::warn!("Auth0 rejected the cached Management token; fetching a new one");
                self.drop_management_token(token.generation).await;
                let fresh = self.management_token(deadline).await?;
                self.fetch_user(&fresh, user_id, deadline).await
            }
            other => other,
        }
    }

    /// Obtains a Management token now, unless one is held; tells readiness,
    /// and fails fast on bad credentials.
    pub async fn warm_up(&self, deadline: Option<Deadline>) -> Result<(), Auth0Error> {
        self.management_token(deadline).await.map(|_| ())
    }

    /// The held token, else a new one; concurrent callers share one grant.
    async fn management_token(
        &self,
        deadline: Option<Deadline>,
    ) -> Result<Arc<ManagementToken>, Auth0Error> {
        self.session
            .token
            .try_get_with((), self.fetch_management_token(deadline))
            .await
            .map_err(|shared| (*shared).clone())
    }

    /// One client-credentials grant, counted and logged: a token without
    /// `read:user_idp_tokens` is an error in the log, as every IdP token
    /// will then be missing.
    async fn fetch_management_token(
        &self,
        deadline: Option<Deadline>,
    ) -> Result<Arc<ManagementToken>, Auth0Error> {
        match self.client_credentials(deadline).await {
            Ok(issued) => {
                let token = self.session.number(issued);
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
                let tenant = self.settings.base_url.as_str();
                if matches!(error, Auth0Error::CredentialsRejected { .. }) {
                    tracing::error!(tenant, %error, "cannot obtain a Management API token");
                } else {
                    tracing::warn!(tenant, %error, "cannot obtain a Management API token");
                }
                Err(error)
            }
        }
    }

    /// Removes the token only if it is still the one that was rejected, so
    /// concurrent 401s do not throw away a token another request just fetched.
    async fn drop_management_token(&self, rejected_generation: u64) {
        self.session
            .token
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
