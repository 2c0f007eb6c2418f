//! Requests that do not decode, refused like every other refusal.
//!
//! tonic decodes a request before any handler runs, so a request that is not
//! a valid message never reaches the service: [`super::codec`] marks its
//! status, and this wrapper around the generated server turns the marked
//! answer into the broker's own refusal. The policy still comes first: a
//! caller the policy does not list gets PERMISSION_DENIED (CALLER_UNKNOWN),
//! not a hint about its message. Either way the refusal is audited and
//! counted, with the broker's ErrorInfo.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;

use super::audit::{self, Subject, Wanted};
use super::codec::MALFORMED_MARKER;
use super::UNREADABLE_CALLER;
use crate::audit::AuditTrail;
use crate::error::BrokerError;
use crate::policy::PolicyStore;
use crate::tls;

/// The generated server `S`, with marked answers (see the module docs)
/// replaced by the broker's refusal.
#[derive(Clone)]
pub struct AuditMalformed<S> {
    inner: S,
    policy: Arc<PolicyStore>,
    audit: AuditTrail,
}

impl<S> AuditMalformed<S> {
    /// Wraps `inner`; `policy` decides whether a caller may hear "malformed".
    pub fn new(inner: S, policy: Arc<PolicyStore>, audit: AuditTrail) -> Self {
        Self {
            inner,
            policy,
            audit,
        }
    }
}

impl<S: NamedService> NamedService for AuditMalformed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for AuditMalformed<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Answer<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let asked = Asked {
            method: method_of(request.uri().path()),
            peer: request.extensions().get::<tls::Peer>().cloned(),
            policy: self.policy.clone(),
            audit: self.audit.clone(),
            started: Instant::now(),
        };
        Answer {
            inner: self.inner.call(request),
            asked: Some(asked),
        }
    }
}

/// What the refusal needs to know of the request, kept until the answer.
struct Asked {
    method: &'static str,
    peer: Option<tls::Peer>,
    policy: Arc<PolicyStore>,
    audit: AuditTrail,
    started: Instant,
}

pin_project_lite::pin_project! {
    /// The generated server's answer, checked for the marker when it is ready.
    pub struct Answer<F> {
        #[pin]
        inner: F,
        asked: Option<Asked>,
    }
}

impl<F> Future for Answer<F>
where
    F: Future<Output = Result<http::Response<Body>, Infallible>>,
{
    type Output = Result<http::Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = std::task::ready!(this.inner.poll(cx));
        if !response.headers().contains_key(MALFORMED_MARKER) {
            return Poll::Ready(Ok(response));
        }
        let Some(asked) = this.asked.take() else {
            return Poll::Ready(Ok(response));
        };
        Poll::Ready(Ok(refuse(asked)))
    }
}

/// The broker's refusal of a request that did not decode: CALLER_UNKNOWN
/// for a caller the policy does not know, else MALFORMED_REQUEST; audited.
fn refuse(asked: Asked) -> http::Response<Body> {
    let caller = asked.peer.map_or(
        Err(crate::caller::UnreadableCaller::NoCertificate),
        |peer| peer.caller,
    );
    let error = match &caller {
        Ok(id) => match asked.policy.current().rule_for(id) {
            Ok(_) => BrokerError::MalformedRequest(message_of(asked.method)),
            Err(unknown) => unknown,
        },
        Err(unreadable) => {
            BrokerError::CallerUnknown(format!("{unreadable}, so the connection has no caller id"))
        }
    };
    let subject = Subject {
        caller: caller.as_deref().unwrap_or(UNREADABLE_CALLER),
        method: asked.method,
        user_id: "",
        bound_to_id_token: false,
        requested: Wanted::Nothing,
    };
    audit::refused_now(&asked.audit, &subject, &error, asked.started.elapsed());
    error.to_status().into_http()
}

/// The RPC's name from the request path, from a fixed list (it becomes a
/// metric label, so a caller must not be able to make up new ones).
fn method_of(path: &str) -> &'static str {
    match path.rsplit('/').next() {
        Some("GetIdpToken") => "GetIdpToken",
        Some("ListIdpTokens") => "ListIdpTokens",
        Some("InvalidateUser") => "InvalidateUser",
        _ => "unknown",
    }
}

/// The request message of an RPC, for the refusal's message.
fn message_of(method: &'static str) -> &'static str {
    match method {
        "GetIdpToken" => "GetIdpTokenRequest",
        "ListIdpTokens" => "ListIdpTokensRequest",
        "InvalidateUser" => "InvalidateUserRequest",
        _ => "request",
    }
}
