//! A broken or hostile Auth0: oversized bodies, a JWKS that keeps failing, a
//! tenant that never answers. The broker must stay bounded in memory, in
//! calls to Auth0 and in time, and tell callers to retry (UNAVAILABLE).

use std::time::{Duration, Instant};

use tokenbroker::auth0::OutboundLimits;
use tokenbroker::emulator::{seed, Endpoint, Fault};
use tokenbroker::proto::GetIdpTokenRequest;
use tonic::{Code, Status};

use crate::support::{get_request, Options, TestBroker};

/// A body far beyond the broker's 1 MiB cap.
const HUGE: u64 = 50 * 1024 * 1024;

/// Most of a huge body the emulator may have handed over when the broker
/// stopped reading at 1 MiB: the cap, one chunk and loopback socket buffers
/// (a few MiB), far below the body's 50 MiB.
const SENT_BOUND: u64 = 16 * 1024 * 1024;

/// How long refusing a huge body may take; reading 50 MiB and parsing it is
/// not what is measured (the bytes sent are), this only catches a hang.
const QUICK: Duration = Duration::from_secs(5);

/// A GitHub token request naming its user only through a genuine ID token.
fn signed_in_request(broker: &TestBroker) -> GetIdpTokenRequest {
    GetIdpTokenRequest {
        id_token: broker.emulator.issue_id_token(seed::GITHUB_USER),
        ..get_request("", "github")
    }
}

/// Expects UNAVAILABLE (Auth0 failing, retry later), not INTERNAL.
fn assert_unavailable<T: std::fmt::Debug>(result: Result<T, Status>, why: &str) -> Status {
    let status = result.expect_err(why);
    assert_eq!(status.code(), Code::Unavailable, "{why}: {status:?}");
    status
}

/// Expects the emulator to have handed over only a small part of the huge body.
fn assert_not_buffered(broker: &TestBroker) {
    let sent = broker.emulator.huge_body_bytes_sent();
    assert!(sent > 0, "the huge body was served");
    assert!(
        sent < SENT_BOUND,
        "the broker let {sent} bytes of a {HUGE}-byte body through"
    );
}

#[tokio::test]
async fn oversized_users_body_is_unavailable_and_not_buffered() {
    let broker = TestBroker::start_warm(Options::default()).await;
    broker.emulator.inject_faults(
        Endpoint::Users,
        vec![Fault::HugeBody {
            bytes: HUGE,
            announced: false,
        }],
    );
    let started = Instant::now();
    let result = broker.get(seed::GITHUB_USER, "github").await;
    assert_unavailable(result, "a 50 MiB users body");
    assert!(started.elapsed() < QUICK, "took {:?}", started.elapsed());
    assert_not_buffered(&broker);
    assert_eq!(
        broker.emulator.user_calls_for(seed::GITHUB_USER),
        1,
        "an oversized body is not retried"
    );
    broker.stop().await;
}

#[tokio::test]
async fn oversized_users_body_announced_by_content_length_is_refused_before_reading() {
    let broker = TestBroker::start_warm(Options::default()).await;
    broker.emulator.inject_faults(
        Endpoint::Users,
        vec![Fault::HugeBody {
            bytes: HUGE,
            announced: true,
        }],
    );
    let result = broker.get(seed::GITHUB_USER, "github").await;
    assert_unavailable(result, "a users body announced as 50 MiB");
    assert_not_buffered(&broker);
    broker.stop().await;
}

#[tokio::test]
async fn oversized_management_token_body_is_unavailable_and_not_buffered() {
    let broker = TestBroker::start_warm(Options::default()).await;
    // The cached Management token is refused, so the broker must fetch a new one.
    broker.emulator.expire_management_tokens();
    broker.emulator.inject_faults(
        Endpoint::Token,
        vec![Fault::HugeBody {
            bytes: HUGE,
            announced: false,
        }],
    );
    let started = Instant::now();
    let result = broker.get(seed::GITHUB_USER, "github").await;
    assert_unavailable(result, "a 50 MiB /oauth/token body");
    assert!(started.elapsed() < QUICK, "took {:?}", started.elapsed());
    assert_not_buffered(&broker);
    assert_eq!(broker.emulator.calls().token, 1, "not retried");
    broker.stop().await;
}

#[tokio::test]
async fn oversized_jwks_body_is_unavailable_and_not_buffered() {
    let broker = TestBroker::start().await;
    broker.emulator.inject_faults(
        Endpoint::Jwks,
        vec![Fault::HugeBody {
            bytes: HUGE,
            announced: false,
        }],
    );
    let started = Instant::now();
    let result = broker.get_with(signed_in_request(&broker)).await;
    assert_unavailable(result, "a 50 MiB JWKS");
    assert!(started.elapsed() < QUICK, "took {:?}", started.elapsed());
    assert_not_buffered(&broker);
    assert_eq!(broker.emulator.calls().users, 0, "no key, no user read");
    broker.stop().await;
}

#[tokio::test]
async fn a_hanging_auth0_is_given_up_on_after_the_auth0_timeout_retries_included() {
    let broker = TestBroker::start_warm(Options {
        auth0_request_timeout: Some(Duration::from_secs(1)),
        outbound: OutboundLimits {
            max_attempts: 3,
            ..OutboundLimits::default()
        },
        ..Options::default()
    })
    .await;
    broker.emulator.set_latency(Duration::from_secs(10));
    let started = Instant::now();
    // No grpc-timeout: only --auth0-timeout bounds the call.
    let result = broker.get(seed::GITHUB_USER, "github").await;
    let elapsed = started.elapsed();
    assert_unavailable(result, "Auth0 never answers");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_millis(1800),
        "answered after {elapsed:?}: the 1 s budget covers all three attempts"
    );
    assert_eq!(
        broker.emulator.user_calls_for(seed::GITHUB_USER),
        1,
        "no attempt started past the budget"
    );
    broker.stop().await;
}
