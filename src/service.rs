//! The `tokenbroker.v1.TokenBroker` gRPC service: validates requests, applies
//! the caller's deadline, turns cached identities into proto messages and
//! records every release or refusal as an audit event (target `audit`).

use std::borrow::Cow;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use secrecy::ExposeSecret;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::auth0::{Identity, UserIdentities};
use crate::cache::{IdentityStore, Lookup};
use crate::error::BrokerError;
use crate::id_token::IdTokenVerifier;
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

/// Name used when a request carries no caller id (only possible without the interceptor).
const UNKNOWN_CALLER: &str = "unknown";

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
    /// `None` when the operator configured no ID-token audience.
    id_tokens: Option<IdTokenVerifier>,
    /// Ends in-flight RPCs with UNAVAILABLE when the shutdown grace period is over.
    drain: Drain,
}

/// The tonic server type, with the interceptor that identifies callers.
pub type TokenBrokerGrpc = InterceptedService<
    TokenBrokerServer<TokenBrokerService>,
    fn(Request<()>) -> Result<Request<()>, Status>,
>;

impl TokenBrokerService {
    /// Wraps the service in the generated tonic server behind the caller-id interceptor.
    pub fn server(
        store: Arc<IdentityStore>,
        policy: Arc<PolicyStore>,
        id_tokens: Option<IdTokenVerifier>,
        drain: Drain,
    ) -> TokenBrokerGrpc {
        TokenBrokerServer::with_interceptor(
            Self {
                store,
                policy,
                id_tokens,
                drain,
            },
            attach_caller_id,
        )
    }
}

/// The caller's identity from its verified client certificate, put in the
/// request extensions once so every handler and log line uses the same value.
/// An `Arc<str>` shared with the connection: no copy per request.
#[derive(Debug, Clone)]
pub struct CallerId(pub Arc<str>);

/// Takes the caller id the listener read from the verified certificate when
/// the connection was made ([`tls::Peer`]). A request without one (a
/// certificate naming nobody, or a server not behind the mTLS listener) is
/// refused. The request's copy of the peer is taken, not cloned: nothing
/// else reads it, and each clone of the id is an atomic increment on a count
/// that all of the connection's requests share, across cores.
fn attach_caller_id(mut request: Request<()>) -> Result<Request<()>, Status> {
    let caller = request
        .extensions_mut()
        .remove::<tls::Peer>()
        .and_then(|peer| peer.caller)
        .ok_or_else(|| {
            Status::permission_denied("no verified client certificate identifies the caller")
        })?;
    request.extensions_mut().insert(CallerId(caller));
    Ok(request)
}

/// What every RPC knows about itself, for deadlines and log lines.
struct CallContext {
    method: &'static str,
    caller: Arc<str>,
    deadline: Option<Duration>,
    started: Instant,
}

impl CallContext {
    /// Takes the [`CallerId`] out of the request (no clone: see
    /// [`attach_caller_id`]); handlers read it from here.
    fn of<T>(method: &'static str, request: &mut Request<T>) -> Self {
        let caller = request
            .extensions_mut()
            .remove::<CallerId>()
            .map_or_else(|| Arc::from(UNKNOWN_CALLER), |caller| caller.0);
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

    fn latency_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// One audit event per decision to release or refuse tokens; it names the
    /// user the tokens were for and whether a verified ID token proved it.
    /// The text of `wanted` and of the released providers is only made when
    /// the event is recorded (field values of a disabled event are never
    /// evaluated): without a subscriber a release allocates nothing for its audit.
    fn audit(
        &self,
        claimed_user_id: &str,
        binding: &IdTokenBinding,
        wanted: Wanted<'_>,
        outcome: Result<&[IdpToken], &BrokerError>,
    ) {
        let user_id = binding.sub.as_deref().unwrap_or(claimed_user_id);
        let bound_to_id_token = binding.sub.is_some();
        let code = outcome.map_or_else(|error| error.code(), |_| tonic::Code::Ok);
        stats::rpc_finished(self.method, code, self.started.elapsed());
        match outcome {
            Ok(tokens) => tracing::info!(
                target: "audit",
                caller = %self.caller,
                method = self.method,
                user_id,
                bound_to_id_token,
                requested = &*wanted.describe(),
                released = %Providers(tokens),
                from_cache = tokens.first().is_some_and(|token| token.from_cache),
                outcome = "released",
                code = "OK",
                latency_ms = self.latency_ms(),
            ),
            Err(error) => {
                let code = stats::code_name(error.code());
                if error.needs_operator() {
                    tracing::error!(target: "audit", caller = %self.caller, method = self.method, user_id, bound_to_id_token, requested = &*wanted.describe(), outcome = "refused", code, reason = %error, latency_ms = self.latency_ms());
                } else {
                    tracing::info!(target: "audit", caller = %self.caller, method = self.method, user_id, bound_to_id_token, requested = &*wanted.describe(), outcome = "refused", code, reason = %error, latency_ms = self.latency_ms());
                }
            }
        }
    }
}

/// The user a verified ID token named, once it is verified; stays empty
/// when the request sent none or it was refused.
#[derive(Default)]
struct IdTokenBinding {
    sub: Option<String>,
}

/// What an RPC asked for, as its audit event names it.
#[derive(Clone, Copy)]
enum Wanted<'a> {
    /// GetIdpToken's choice of identity; both empty means the first with a token.
    One {
        provider: &'a str,
        connection: &'a str,
    },
    /// ListIdpTokens: every identity with a token.
    All,
}

impl Wanted<'_> {
    fn describe(self) -> Cow<'static, str> {
        match self {
            Self::One {
                provider,
                connection,
            } => match (provider.is_empty(), connection.is_empty()) {
                (true, true) => Cow::Borrowed("first"),
                (false, true) => Cow::Owned(provider.to_owned()),
                (true, false) => Cow::Owned(format!("connection:{connection}")),
                (false, false) => Cow::Owned(format!("{provider}/{connection}")),
            },
            Self::All => Cow::Borrowed("all"),
        }
    }
}

/// The providers of released tokens, comma-separated, for the audit event
/// (providers only, never tokens). Written straight into the event.
struct Providers<'a>(&'a [IdpToken]);

impl std::fmt::Display for Providers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, token) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(&token.provider)?;
        }
        Ok(())
    }
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
            &request.user_id,
            &binding,
            wanted,
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
        call.audit(&request.user_id, &binding, Wanted::All, result.as_deref());
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
        let result = self.invalidate(&call.caller, &request).await;
        let code = result
            .as_ref()
            .map_or_else(BrokerError::code, |()| tonic::Code::Ok);
        stats::rpc_finished(call.method, code, call.started.elapsed());
        tracing::info!(
            target: "audit",
            caller = %call.caller,
            method = call.method,
            user_id = %request.user_id,
            outcome = if result.is_ok() { "invalidated" } else { "refused" },
            reason = result.as_ref().err().map(ToString::to_string),
            latency_ms = call.latency_ms(),
        );
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
        let rule = self.policy.current().rule_for(&call.caller)?;
        if !request.provider.is_empty() && !rule.allows_provider(&request.provider) {
            return Err(BrokerError::ProviderDenied {
                provider: request.provider.clone(),
            });
        }
        let user_id = self
            .user_for(&rule, &request.user_id, &request.id_token, binding)
            .await?;
        let Lookup { user, from_cache } = self
            .store
            .lookup(&user_id, request.bypass_cache, call.auth0_deadline())
            .await?;
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
        let rule = self.policy.current().rule_for(&call.caller)?;
        let user_id = self
            .user_for(&rule, &request.user_id, &request.id_token, binding)
            .await?;
        let Lookup { user, from_cache } = self
            .store
            .lookup(&user_id, false, call.auth0_deadline())
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

    async fn invalidate(
        &self,
        caller: &str,
        request: &InvalidateUserRequest,
    ) -> Result<(), BrokerError> {
        let user_id = UserId::parse(&request.user_id)?;
        let rule = self.policy.current().rule_for(caller)?;
        if !rule.invalidate {
            return Err(BrokerError::PermissionDenied(format!(
                "caller {caller:?} may not call InvalidateUser; the policy must say invalidate = true"
            )));
        }
        self.store.invalidate(&user_id).await;
        Ok(())
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
    fn audit_names_what_was_asked_for_and_released() {
        let one = |provider, connection| Wanted::One {
            provider,
            connection,
        };
        assert_eq!(one("", "").describe(), "first");
        assert_eq!(one("github", "").describe(), "github");
        assert_eq!(one("", "corp").describe(), "connection:corp");
        assert_eq!(one("github", "corp").describe(), "github/corp");
        assert_eq!(Wanted::All.describe(), "all");
        let token = |provider: &str| IdpToken {
            provider: provider.to_owned(),
            ..Default::default()
        };
        assert_eq!(Providers(&[]).to_string(), "");
        assert_eq!(
            Providers(&[token("github"), token("google-oauth2")]).to_string(),
            "github,google-oauth2"
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
