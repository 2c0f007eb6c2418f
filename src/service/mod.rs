//! The `tokenbroker.v1.TokenBroker` gRPC service: identifies the caller,
//! checks the policy, validates requests, applies the caller's deadline,
//! turns cached identities into proto messages and records every release or
//! refusal as an audit event (see [`audit`]).
//!
//! Order of checks in every RPC: the caller's identity and policy first (an
//! unlisted caller learns nothing else and costs nothing), then the request's
//! fields, then Auth0.

pub mod audit;
pub mod codec;
pub mod malformed;

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use secrecy::ExposeSecret;
use tonic::{Request, Response, Status};

use crate::auth0::{Identity, UserIdentities};
use crate::budget::{CallerBudgets, CallerShare};
use crate::cache::{IdentityStore, Lookup};
use crate::caller::UnreadableCaller;
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
use crate::tls;
use crate::user_id::UserId;
use audit::{Subject, Wanted};

/// How the audit names a caller whose certificate yields no caller id.
pub const UNREADABLE_CALLER: &str = "-";

/// Largest request message the broker decodes. Its messages hold a user id
/// (at most 512 bytes), names and an ID token: 64 KiB is ample, and a caller
/// cannot make the broker buffer megabytes per stream.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How much earlier than the caller's deadline the broker gives up, so the
/// caller gets DEADLINE_EXCEEDED from us rather than its own transport's
/// CANCELLED: a tenth of the deadline, between 5 and 100 ms, at most half.
/// The caller's clock started before the request was sent, ours after it
/// arrived, and the answer still has to travel back.
fn deadline_headroom(deadline: Duration) -> Duration {
    (deadline / 10)
        .clamp(Duration::from_millis(5), Duration::from_millis(100))
        .min(deadline / 2)
}

/// Serves tokens from the [`IdentityStore`] to the callers the policy allows.
pub struct TokenBrokerService {
    store: Arc<IdentityStore>,
    policy: Arc<PolicyStore>,
    /// Each caller's share of the Auth0 budget, spent on cache misses.
    budgets: Arc<CallerBudgets>,
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
    /// `None` when the operator configured no ID-token audience.
    pub id_tokens: Option<IdTokenVerifier>,
    pub drain: Drain,
}

impl TokenBrokerService {
    /// Wraps the service in the generated tonic server, with the request
    /// size cap and the audit of requests that do not decode.
    pub fn server(parts: ServiceParts) -> TokenBrokerGrpc {
        let policy = parts.policy.clone();
        let server = TokenBrokerServer::new(Self {
            store: parts.store,
            policy: parts.policy,
            budgets: parts.budgets,
            id_tokens: parts.id_tokens,
            drain: parts.drain,
        })
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        malformed::AuditMalformed::new(server, policy)
    }
}

/// What every RPC knows about itself, for deadlines and log lines.
struct CallContext {
    method: &'static str,
    /// The caller id the listener read from the verified certificate when
    /// the connection was made, or why there is none.
    caller: Result<Arc<str>, UnreadableCaller>,
    deadline: Option<Duration>,
    started: Instant,
}

impl CallContext {
    /// Takes the connection's [`tls::Peer`] out of the request: taken, not
    /// cloned, since nothing else reads it and each clone of the id is an
    /// atomic increment on a count all of the connection's requests share.
    fn of<T>(method: &'static str, request: &mut Request<T>) -> Self {
        let caller = request
            .extensions_mut()
            .remove::<tls::Peer>()
            .map_or(Err(UnreadableCaller::NoCertificate), |peer| peer.caller);
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout);
        Self {
            method,
            caller,
            deadline,
            started: Instant::now(),
        }
    }

    /// When calls to Auth0 made for this RPC must have given up.
    fn auth0_deadline(&self) -> Option<tokio::time::Instant> {
        self.deadline.map(|deadline| {
            tokio::time::Instant::from_std(self.started)
                + deadline.saturating_sub(deadline_headroom(deadline))
        })
    }

    /// Runs `work`, giving up with DEADLINE_EXCEEDED just before the caller
    /// would, or with UNAVAILABLE when the shutdown grace period ends. Work
    /// that is ready at once (a cache hit) returns before any timer is armed.
    /// `work` is pinned by the caller: taken by value, the RPC's future would
    /// hold it twice (the argument and its pinned copy).
    async fn bounded<T>(
        &self,
        drain: &Drain,
        mut work: Pin<&mut impl Future<Output = Result<T, BrokerError>>>,
    ) -> Result<T, BrokerError> {
        if let std::task::Poll::Ready(result) = futures::poll!(work.as_mut()) {
            return result;
        }
        // Boxed: only work that waits (a cache miss) needs the timers, and
        // inline they would push every RPC's boxed future past 1 KiB, where
        // glibc's malloc leaves its per-thread cache and consolidates.
        Box::pin(self.race(drain, work)).await
    }

    /// `work` against the caller's deadline and the end of the grace period.
    async fn race<T>(
        &self,
        drain: &Drain,
        work: Pin<&mut impl Future<Output = Result<T, BrokerError>>>,
    ) -> Result<T, BrokerError> {
        let deadline = async {
            match self.deadline {
                Some(deadline) => {
                    tokio::time::sleep(deadline.saturating_sub(deadline_headroom(deadline))).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = work => result,
            () = deadline => Err(BrokerError::DeadlineExceeded),
            () = drain.grace_over() => Err(BrokerError::ShuttingDown),
        }
    }

    /// The caller's rule: CALLER_UNKNOWN when the certificate names nobody
    /// (never a fallback name) or the policy does not list it.
    fn rule(&self, policy: &PolicyStore) -> Result<CallerRule, BrokerError> {
        match &self.caller {
            Ok(caller) => policy.current().rule_for(caller),
            Err(unreadable) => Err(BrokerError::CallerUnknown(format!(
                "{unreadable}, so the connection has no caller id; ask the operator of the client CA for a certificate with one valid URI SAN, DNS SAN or CN"
            ))),
        }
    }

    /// The caller as the audit names it.
    fn caller_name(&self) -> &str {
        self.caller.as_deref().unwrap_or(UNREADABLE_CALLER)
    }

    /// The audit's subject for `user_id`, `binding` and `requested`.
    fn subject<'a>(
        &'a self,
        claimed_user_id: &'a str,
        binding: &'a IdTokenBinding,
        requested: Wanted<'a>,
    ) -> Subject<'a> {
        Subject {
            caller: self.caller_name(),
            method: self.method,
            user_id: binding.sub.as_deref().unwrap_or(claimed_user_id),
            bound_to_id_token: binding.sub.is_some(),
            requested,
        }
    }

    /// One audit event per decision to release or refuse tokens.
    fn audit(&self, subject: &Subject<'_>, outcome: Result<&[IdpToken], &BrokerError>) {
        let latency = self.started.elapsed();
        match outcome {
            Ok(tokens) => audit::released(subject, tokens, latency),
            Err(error) => audit::refused(subject, error, latency),
        }
    }
}

/// The user a verified ID token named, once it is verified; stays empty
/// when the request sent none or it was refused.
#[derive(Default)]
struct IdTokenBinding {
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
        call.audit(
            &call.subject(&request.user_id, &binding, wanted),
            result.as_ref().map(std::slice::from_ref),
        );
        result
            .map(|token| Response::new(GetIdpTokenResponse { token: Some(token) }))
            .map_err(|error| error.to_status())
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
        call.audit(
            &call.subject(&request.user_id, &binding, Wanted::All),
            result.as_deref(),
        );
        result
            .map(|tokens| Response::new(ListIdpTokensResponse { tokens }))
            .map_err(|error| error.to_status())
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
            Ok(()) => audit::invalidated(&subject, call.started.elapsed()),
            Err(error) => audit::refused(&subject, error, call.started.elapsed()),
        }
        result
            .map(|()| Response::new(InvalidateUserResponse {}))
            .map_err(|error| error.to_status())
    }
}

impl TokenBrokerService {
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
        let identity =
            selection::select(&user, selector, &|provider| rule.allows_provider(provider))?;
        Ok(to_proto(identity, &user, from_cache))
    }

    async fn list_tokens(
        &self,
        call: &CallContext,
        request: &ListIdpTokensRequest,
        binding: &mut IdTokenBinding,
    ) -> Result<Vec<IdpToken>, BrokerError> {
        let rule = call.rule(&self.policy)?;
        let user_id = self
            .user_for(&rule, &request.user_id, &request.id_token, binding)
            .await?;
        let Lookup { user, from_cache } = self
            .store
            .lookup(&user_id, self.share_of(call), call.auth0_deadline())
            .await?;
        if !user.idp_tokens_readable && user.identities.iter().all(|i| i.access_token.is_none()) {
            return Err(BrokerError::NoToken {
                wanted: "any of the user's identities".to_owned(),
                scope_missing: true,
            });
        }
        Ok(selection::with_tokens(&user)
            .filter(|identity| rule.allows_provider(&identity.provider))
            .map(|identity| to_proto(identity, &user, from_cache))
            .collect())
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
        Ok(())
    }

    /// The caller's share of the Auth0 budget, spent only if the lookup has
    /// to read Auth0. A caller without an id never gets this far.
    fn share_of<'a>(&'a self, call: &'a CallContext) -> CallerShare<'a> {
        CallerShare::of(&self.budgets, call.caller_name())
    }
}

fn to_proto(identity: &Identity, user: &UserIdentities, from_cache: bool) -> IdpToken {
    let expose = |secret: &Option<secrecy::SecretString>| {
        secret
            .as_ref()
            .map(|value| value.expose_secret().to_owned())
            .unwrap_or_default()
    };
    IdpToken {
        provider: identity.provider.clone(),
        connection: identity.connection.clone(),
        idp_user_id: identity.idp_user_id.clone(),
        access_token: expose(&identity.access_token),
        access_token_secret: expose(&identity.access_token_secret),
        expires_at: identity.expires_at.map(timestamp),
        fetched_at: Some(timestamp(user.fetched_at)),
        from_cache,
    }
}

fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

/// Parses gRPC's `grpc-timeout` header: up to 8 digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    match unit {
        "H" => Some(Duration::from_secs(amount * 3600)),
        "M" => Some(Duration::from_secs(amount * 60)),
        "S" => Some(Duration::from_secs(amount)),
        "m" => Some(Duration::from_millis(amount)),
        "u" => Some(Duration::from_micros(amount)),
        "n" => Some(Duration::from_nanos(amount)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headroom_is_a_tenth_of_the_deadline_within_bounds() {
        assert_eq!(
            deadline_headroom(Duration::from_millis(300)),
            Duration::from_millis(30)
        );
        assert_eq!(
            deadline_headroom(Duration::from_secs(20)),
            Duration::from_millis(100)
        );
        assert_eq!(
            deadline_headroom(Duration::from_millis(20)),
            Duration::from_millis(5)
        );
        assert_eq!(
            deadline_headroom(Duration::from_millis(4)),
            Duration::from_millis(2)
        );
    }

    #[test]
    fn grpc_timeout_units_are_parsed() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("100u"), Some(Duration::from_micros(100)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }
}
