//! The `tokenbroker.v1.TokenBroker` gRPC service: identifies the caller,
//! checks the policy, validates requests, applies the caller's deadline,
//! turns cached identities into proto messages and records every release or
//! refusal as an audit event (see [`audit`]).
//!
//! Order of checks in every RPC: the caller's identity and policy first (an
//! unlisted caller learns nothing else and costs nothing), then the request's
//! fields, then Auth0.

pub mod audit;
mod call;
pub mod codec;
pub mod fresh;
pub mod malformed;

use std::pin::pin;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::audit::AuditTrail;
use crate::budget::{CallerBudgets, CallerShare};
use crate::cache::{IdentityStore, Lookup};
use crate::error::BrokerError;
use crate::id_token::IdTokenVerifier;
use crate::logsafe::capped;
use crate::policy::{CallerRule, PolicyStore};
use crate::proto::token_broker_server::{TokenBroker, TokenBrokerServer};
use crate::proto::{
    GetIdpTokenRequest, GetIdpTokenResponse, IdpToken, InvalidateUserRequest,
    InvalidateUserResponse, ListIdpTokensRequest, ListIdpTokensResponse,
};
use crate::selection::{self, Selector};
use crate::shutdown::Drain;
use crate::stats;
use crate::user_id::UserId;
use audit::{Subject, Wanted};
use call::CallContext;
use fresh::Freshness;

/// How the audit names a caller whose certificate yields no caller id.
pub const UNREADABLE_CALLER: &str = "-";

/// Largest request message the broker decodes. Its messages hold a user id
/// (at most 512 bytes), names and an ID token: 64 KiB is ample, and a caller
/// cannot make the broker buffer megabytes per stream.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Serves tokens from the [`IdentityStore`] to the callers the policy allows.
pub struct TokenBrokerService {
    store: Arc<IdentityStore>,
    policy: Arc<PolicyStore>,
    /// Each caller's share of the Auth0 budget, spent on cache misses.
    budgets: Arc<CallerBudgets>,
    /// Every RPC's audit line; no token leaves before its line is written.
    audit: AuditTrail,
    /// Makes tokens usable for `min_valid_for`: refreshes at the IdP.
    fresh: Freshness,
    /// `None` when the operator configured no ID-token audience.
    id_tokens: Option<IdTokenVerifier>,
    /// Ends in-flight RPCs with UNAVAILABLE when the shutdown grace period is over.
    drain: Drain,
}

/// The tonic server type: the generated server, with requests that do not
/// decode refused, audited and counted like every other refusal.
pub type TokenBrokerGrpc = malformed::AuditMalformed<TokenBrokerServer<TokenBrokerService>>;

/// What the service is built from.
pub struct ServiceParts {
    pub store: Arc<IdentityStore>,
    pub policy: Arc<PolicyStore>,
    pub budgets: Arc<CallerBudgets>,
    pub audit: AuditTrail,
    pub fresh: Freshness,
    /// `None` when the operator configured no ID-token audience.
    pub id_tokens: Option<IdTokenVerifier>,
    pub drain: Drain,
}

impl TokenBrokerService {
    /// Wraps the service in the generated tonic server, with the request
    /// size cap and the audit of requests that do not decode.
    pub fn server(parts: ServiceParts) -> TokenBrokerGrpc {
        let policy = parts.policy.clone();
        let audit = parts.audit.clone();
        let server = TokenBrokerServer::new(Self {
            store: parts.store,
            policy: parts.policy,
            budgets: parts.budgets,
            audit: parts.audit,
            fresh: parts.fresh,
            id_tokens: parts.id_tokens,
            drain: parts.drain,
        })
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        malformed::AuditMalformed::new(server, policy, audit)
    }
}

/// The user a verified ID token named, once it is verified; stays empty
/// when the request sent none or it was refused.
#[derive(Default)]
pub(crate) struct IdTokenBinding {
    sub: Option<String>,
}

#[tonic::async_trait]
impl TokenBroker for TokenBrokerService {
    async fn get_idp_token(
        &self,
        mut request: Request<GetIdpTokenRequest>,
    ) -> Result<Response<GetIdpTokenResponse>, Status> {
        let call = CallContext::of("GetIdpToken", &mut request);
        let request = request.into_inner();
        let selector = Selector::from_request(&request.provider, &request.connection);
        let mut binding = IdTokenBinding::default();
        let result = {
            let work = pin!(self.get_token(&call, &request, &selector, &mut binding));
            call.bounded(&self.drain, work).await
        };
        let wanted = Wanted::One {
            provider: &request.provider,
            connection: &request.connection,
        };
        let subject = call.subject(&request.user_id, &binding, wanted);
        let result = self
            .finish(&call, &subject, result, std::slice::from_ref)
            .await;
        result.map(|token| Response::new(GetIdpTokenResponse { token: Some(token) }))
    }

    async fn list_idp_tokens(
        &self,
        mut request: Request<ListIdpTokensRequest>,
    ) -> Result<Response<ListIdpTokensResponse>, Status> {
        let call = CallContext::of("ListIdpTokens", &mut request);
        let request = request.into_inner();
        let mut binding = IdTokenBinding::default();
        let result = {
            let work = pin!(self.list_tokens(&call, &request, &mut binding));
            call.bounded(&self.drain, work).await
        };
        let subject = call.subject(&request.user_id, &binding, Wanted::All);
        let result = self
            .finish(&call, &subject, result, |response| {
                response.tokens.as_slice()
            })
            .await;
        result.map(Response::new)
    }

    async fn invalidate_user(
        &self,
        mut request: Request<InvalidateUserRequest>,
    ) -> Result<Response<InvalidateUserResponse>, Status> {
        let call = CallContext::of("InvalidateUser", &mut request);
        let request = request.into_inner();
        let result = self.invalidate(&call, &request).await;
        let binding = IdTokenBinding::default();
        let subject = call.subject(&request.user_id, &binding, Wanted::Nothing);
        match &result {
            Ok(()) => audit::invalidated(&self.audit, &subject, call.started.elapsed()).await,
            Err(error) => {
                audit::refused(&self.audit, &subject, error, call.started.elapsed()).await
            }
        }
        result
            .map(|()| Response::new(InvalidateUserResponse {}))
            .map_err(|error| error.to_status())
    }
}

impl TokenBrokerService {
    /// Audits the outcome and makes it the answer. A release leaves only
    /// once its audit line is written (its connection holds it until then,
    /// see [`crate::audit::ReleaseGate`]); when the line cannot be, the
    /// tokens are dropped and the caller gets AUDIT_UNAVAILABLE.
    async fn finish<T>(
        &self,
        call: &CallContext,
        subject: &Subject<'_>,
        result: Result<T, BrokerError>,
        tokens_of: impl Fn(&T) -> &[IdpToken],
    ) -> Result<T, Status> {
        let result = match result {
            Ok(value) => {
                let latency = call.started.elapsed();
                let gate = call.release_gate();
                audit::released(&self.audit, subject, tokens_of(&value), latency, gate)
                    .await
                    .map(|()| value)
            }
            Err(error) => Err(error),
        };
        if let Err(error) = &result {
            audit::refused(&self.audit, subject, error, call.started.elapsed()).await;
        }
        result.map_err(|error| error.to_status())
    }

    /// Policy first (no Auth0 call for a caller that may not have the token),
    /// then the user, then the identity.
    async fn get_token(
        &self,
        call: &CallContext,
        request: &GetIdpTokenRequest,
        selector: &Selector<'_>,
        binding: &mut IdTokenBinding,
    ) -> Result<IdpToken, BrokerError> {
        let rule = call.rule(&self.policy)?;
        if !request.provider.is_empty() && !rule.allows_provider(&request.provider) {
            return Err(BrokerError::ProviderDenied {
                provider: capped(&request.provider).into_owned(),
            });
        }
        if request.bypass_cache && !rule.bypass_cache {
            return Err(BrokerError::RpcNotAllowed(
                "this caller may not send bypass_cache (each one is an Auth0 read); the policy must say bypass_cache = true".to_owned(),
            ));
        }
        let user_id = self
            .user_for(&rule, &request.user_id, &request.id_token, binding)
            .await?;
        let share = self.share_of(call);
        let Lookup { user, from_cache } = if request.bypass_cache {
            self.store
                .reread(&user_id, share, call.auth0_deadline())
                .await?
        } else {
            self.store
                .lookup(&user_id, share, call.auth0_deadline())
                .await?
        };
        if request.bypass_cache {
            self.fresh.forget_user(user_id.as_str());
        }
        let allowed = |provider: &str| rule.allows_provider(provider);
        let from_token_vault = |connection: &str| self.fresh.from_token_vault(connection);
        let rules = selection::Rules {
            allowed: &allowed,
            from_token_vault: &from_token_vault,
        };
        let identity =
            selection::select(&user, selector, &rules).inspect_err(count_silent_switch)?;
        let need = call.need(
            self.fresh.min_valid_for(request.min_valid_for.as_ref()),
            share,
        );
        self.fresh
            .usable_token(identity, &user, from_cache, &need)
            .await
            .inspect_err(count_silent_switch)
    }

    async fn list_tokens(
        &self,
        call: &CallContext,
        request: &ListIdpTokensRequest,
        binding: &mut IdTokenBinding,
    ) -> Result<ListIdpTokensResponse, BrokerError> {
        let rule = call.rule(&self.policy)?;
        let user_id = self
            .user_for(&rule, &request.user_id, &request.id_token, binding)
            .await?;
        let share = self.share_of(call);
        let Lookup { user, from_cache } = self
            .store
            .lookup(&user_id, share, call.auth0_deadline())
            .await?;
        let allowed = |provider: &str| rule.allows_provider(provider);
        let from_token_vault = |connection: &str| self.fresh.from_token_vault(connection);
        let rules = selection::Rules {
            allowed: &allowed,
            from_token_vault: &from_token_vault,
        };
        if !user.idp_tokens_readable && user.identities.iter().all(|i| !rules.has_token(i)) {
            return Err(BrokerError::NoToken {
                wanted: "any of the user's identities".to_owned(),
                scope_missing: true,
                token_vault_hint: None,
            });
        }
        let need = call.need(
            self.fresh.min_valid_for(request.min_valid_for.as_ref()),
            share,
        );
        let allowed = selection::with_tokens(&user, &rules)
            .filter(|identity| rule.allows_provider(&identity.provider));
        let (tokens, unavailable) = self
            .fresh
            .usable_tokens(allowed, &user, from_cache, &need)
            .await;
        Ok(ListIdpTokensResponse {
            tokens,
            unavailable,
        })
    }

    /// The user a token request is for. With an `id_token`: its verified
    /// `sub` (a `user_id` sent along must name the same user). Without one:
    /// `user_id`, unless the caller's rule requires an ID token.
    async fn user_for(
        &self,
        rule: &CallerRule,
        user_id: &str,
        id_token: &str,
        binding: &mut IdTokenBinding,
    ) -> Result<UserId, BrokerError> {
        if id_token.is_empty() {
            if rule.require_id_token {
                return Err(BrokerError::IdTokenRequired);
            }
            return Ok(UserId::parse(user_id)?);
        }
        let verifier = self
            .id_tokens
            .as_ref()
            .ok_or(BrokerError::IdTokensNotConfigured)?;
        // Boxed: the JWKS fetch it may make would otherwise sit inline in
        // every request's future, ID token or not (see `cache::lookup`).
        let verified = Box::pin(verifier.verify(id_token)).await.map_err(|error| {
            stats::id_token_verified(error.check());
            BrokerError::IdTokenRefused(error)
        })?;
        stats::id_token_verified("ok");
        if !user_id.is_empty() && user_id != verified.sub {
            return Err(BrokerError::IdTokenSubjectMismatch);
        }
        let subject = UserId::parse(&verified.sub)?;
        binding.sub = Some(verified.sub);
        Ok(subject)
    }

    /// The policy before the user id: an unlisted caller learns nothing
    /// about what it sent.
    async fn invalidate(
        &self,
        call: &CallContext,
        request: &InvalidateUserRequest,
    ) -> Result<(), BrokerError> {
        let rule = call.rule(&self.policy)?;
        if !rule.invalidate {
            return Err(BrokerError::RpcNotAllowed(
                "this caller may not call InvalidateUser; the policy must say invalidate = true"
                    .to_owned(),
            ));
        }
        let user_id = UserId::parse(&request.user_id)?;
        self.store.invalidate(&user_id).await;
        self.fresh.forget_user(user_id.as_str());
        Ok(())
    }

    /// The caller's share of the Auth0 budget, spent only if the lookup (or a
    /// Token Vault exchange) has to call Auth0. A caller without an id never
    /// gets this far.
    fn share_of<'a>(&'a self, call: &'a CallContext) -> CallerShare<'a> {
        CallerShare::of(&self.budgets, call.caller_name())
    }
}

/// Counts a TOKEN_NOT_STORED whose connection Token Vault may have taken
/// over, so an operator sees the silent switch per connection.
fn count_silent_switch(error: &BrokerError) {
    if let BrokerError::NoToken {
        token_vault_hint: Some(connection),
        ..
    } = error
    {
        stats::token_not_stored(connection);
    }
}
