//! Auth0 slow, rate-limited or down: retries, the client-side rate limit,
//! deadlines and stale-if-error, against the emulator's fault knobs.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use serde_json::json;
use tokenbroker::auth0::OutboundLimits;
use tokenbroker::cache::CacheSettings;
use tokenbroker::cache::DEFAULT_USER_MAX_BYTES;
use tokenbroker::emulator::{seed, Endpoint, Fault};
use tonic::Code;
use tonic_types::StatusExt;

use crate::rate::{assert_within_limit, rate_limited, sample_while};
use crate::support::{get_on, get_request, Options, TestBroker};

fn limits(rate: u32, burst: u32, max_wait: Duration) -> OutboundLimits {
    OutboundLimits {
        rate_per_second: NonZeroU32::new(rate).expect("rate"),
        burst: NonZeroU32::new(burst).expect("burst"),
        max_wait,
        ..OutboundLimits::default()
    }
}

fn short_ttl(user_ttl: Duration, stale_if_error: Duration) -> Options {
    Options {
        cache: CacheSettings {
            user_ttl,
            user_capacity: 1000,
            user_max_bytes: DEFAULT_USER_MAX_BYTES,
            negative_ttl: Duration::from_secs(30),
        },
        stale_if_error,
        ..Options::default()
    }
}

#[tokio::test]
async fn server_errors_are_retried_until_auth0_answers() {
    let broker = TestBroker::start_warm(Options::default()).await;
    broker.emulator.inject_faults(
        Endpoint::Users,
        vec![Fault::Status(503), Fault::Status(502)],
    );
    let token = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("third attempt succeeds");
    assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
    assert_eq!(broker.emulator.user_calls_for(seed::GITHUB_USER), 3);
    broker.stop().await;
}

/// One 429 on the users endpoint, then success: the broker must sit out the
/// delay the 429 asked for (at least ~1 s here) and retry exactly once.
async fn assert_rate_limit_waited_out(fault: Fault) {
    let broker = TestBroker::start_warm(Options::default()).await;
    broker.emulator.inject_faults(Endpoint::Users, vec![fault]);
    let started = Instant::now();
    broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("retry succeeds");
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(broker.emulator.user_calls_for(seed::GITHUB_USER), 2);
    broker.stop().await;
}

#[tokio::test]
async fn retry_after_is_waited_out_before_the_retry() {
    assert_rate_limit_waited_out(Fault::RateLimited {
        retry_after: Some(1),
        reset_in_secs: 30,
    })
    .await;
}

#[tokio::test]
async fn ratelimit_reset_is_waited_out_when_there_is_no_retry_after() {
    assert_rate_limit_waited_out(Fault::RateLimited {
        retry_after: None,
        reset_in_secs: 2,
    })
    .await;
}

#[tokio::test]
async fn exhausted_retries_are_unavailable_with_the_delay_auth0_asked_for() {
    let broker = TestBroker::start_warm(Options::default()).await;
    let rate_limited = Fault::RateLimited {
        retry_after: Some(1),
        reset_in_secs: 1,
    };
    broker
        .emulator
        .inject_faults(Endpoint::Users, vec![rate_limited; 3]);
    let status = broker.get(seed::GITHUB_USER, "github").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let retry = status.get_details_retry_info().expect("RetryInfo detail");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)));
    assert_eq!(
        broker.emulator.user_calls_for(seed::GITHUB_USER),
        3,
        "three attempts"
    );
    broker.stop().await;
}

#[tokio::test]
async fn no_retry_is_started_that_would_outlive_the_callers_deadline() {
    let broker = TestBroker::start_warm(Options::default()).await;
    broker.emulator.inject_faults(
        Endpoint::Users,
        vec![Fault::RateLimited {
            retry_after: Some(5),
            reset_in_secs: 5,
        }],
    );
    let mut client = broker.client().await;
    let mut request = tonic::Request::new(get_request(seed::GITHUB_USER, "github"));
    request.set_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let status = get_on(&mut client, request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "gave up at once, not at the deadline"
    );
    let retry = status.get_details_retry_info().expect("RetryInfo detail");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(5)));
    assert_eq!(broker.emulator.user_calls_for(seed::GITHUB_USER), 1);
    broker.stop().await;
}

fn synthetic_user(index: usize) -> (String, serde_json::Value) {
    let user_id = format!("github|{}", 900_000 + index);
    let user = json!({
        "user_id": user_id,
        "identities": [{
            "provider": "github", "connection": "github", "user_id": 900_000 + index,
            "isSocial": true, "access_token": format!("gho_synthetic_{index}")
        }]
    });
    (user_id, user)
}

#[tokio::test]
async fn a_burst_of_cold_users_never_exceeds_the_rate_limit() {
    const USERS: usize = 100;
    const RATE: u32 = 10;
    const BURST: u32 = 10;
    let broker = TestBroker::start_warm(rate_limited(RATE, BURST)).await;
    let users: Vec<String> = (0..USERS)
        .map(|index| {
            let (user_id, user) = synthetic_user(index);
            broker.emulator.upsert_user(user);
            user_id
        })
        .collect();
    // The warm-up used limiter cells; let the bucket refill before measuring.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let client = broker.client().await;
    let requests = users.iter().chain(users.iter()).map(|user_id| {
        let mut client = client.clone();
        let user_id = user_id.clone();
        tokio::spawn(async move { get_on(&mut client, get_request(&user_id, "github")).await })
    });
    let (results, samples) = sample_while(
        || broker.emulator.calls().users,
        futures::future::join_all(requests),
    )
    .await;
    for result in results {
        result
            .expect("task")
            .expect("every request is answered with a token");
    }
    assert_eq!(
        broker.emulator.calls().users,
        USERS as u64,
        "one read per user"
    );
    assert_within_limit(&samples, RATE, BURST);
    broker.stop().await;
}

#[tokio::test]
async fn cache_hits_do_not_wait_behind_a_saturated_rate_limit() {
    let broker = TestBroker::start_warm(Options {
        outbound: limits(1, 1, Duration::from_secs(10)),
        ..Options::default()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("cached now");
    let cold: Vec<_> = (0..4)
        .map(|index| {
            let (user_id, user) = synthetic_user(index);
            broker.emulator.upsert_user(user);
            user_id
        })
        .collect();
    let client = broker.client().await;
    let queued: Vec<_> = cold
        .into_iter()
        .map(|user_id| {
            let mut client = client.clone();
            tokio::spawn(async move { get_on(&mut client, get_request(&user_id, "github")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let hit = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("cache hit");
    assert!(hit.from_cache);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "a hit waited {:?} behind cold reads queued for seconds",
        started.elapsed()
    );
    for task in queued {
        let _ = task.await;
    }
    broker.stop().await;
}

#[tokio::test]
async fn cached_users_are_served_while_auth0_is_down() {
    let mut broker = TestBroker::start().await;
    broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("cached");
    broker.stop_auth0().await;
    let token = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("served from cache");
    assert!(token.from_cache);
    assert_unavailable(
        &broker,
        seed::GOOGLE_USER,
        "google-oauth2",
        "a cold user cannot be served",
    )
    .await;
    broker.stop().await;
}

#[tokio::test]
async fn expired_entries_are_served_stale_within_the_window_and_refused_after() {
    let mut broker =
        TestBroker::start_with(short_ttl(Duration::from_secs(1), Duration::from_secs(2))).await;
    let fresh = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("fresh");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    broker.stop_auth0().await;
    let stale = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("stale-if-error");
    assert!(stale.from_cache);
    assert_eq!(
        stale.fetched_at, fresh.fetched_at,
        "the old read, marked as cached"
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_unavailable(&broker, seed::GITHUB_USER, "github", "past the window").await;
    broker.stop().await;
}

#[tokio::test]
async fn stale_if_error_never_serves_a_token_past_its_known_expiry() {
    let broker = TestBroker::start_with(Options {
        freshness: tokenbroker::service::fresh::FreshnessSettings {
            default_min_validity: Duration::ZERO,
            ..Default::default()
        },
        ..short_ttl(Duration::from_secs(60), Duration::from_secs(600))
    })
    .await;
    let user_id = "google-oauth2|short-lived";
    broker.emulator.upsert_user(json!({
        "user_id": user_id,
        "last_login": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "identities": [{
            "provider": "google-oauth2", "connection": "google-oauth2", "user_id": "short-lived",
            "isSocial": true, "access_token": "ya29.short_lived", "expires_in": 1
        }]
    }));
    broker.get(user_id, "google-oauth2").await.expect("fresh");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    broker
        .emulator
        .inject_faults(Endpoint::Users, vec![Fault::Status(503); 3]);
    assert_unavailable(
        &broker,
        user_id,
        "google-oauth2",
        "an expired token is not served stale",
    )
    .await;
    broker.stop().await;
}

#[tokio::test]
async fn stale_if_error_zero_turns_it_off() {
    let broker = TestBroker::start_with(short_ttl(Duration::from_secs(1), Duration::ZERO)).await;
    broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("fresh");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    broker
        .emulator
        .inject_faults(Endpoint::Users, vec![Fault::Status(503); 3]);
    assert_unavailable(&broker, seed::GITHUB_USER, "github", "Auth0 is failing").await;
    broker.stop().await;
}

#[tokio::test]
async fn an_invalidated_user_is_never_served_stale() {
    let broker =
        TestBroker::start_with(short_ttl(Duration::from_secs(60), Duration::from_secs(600))).await;
    broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("fresh");
    broker
        .invalidate(seed::GITHUB_USER)
        .await
        .expect("InvalidateUser succeeds");
    broker
        .emulator
        .inject_faults(Endpoint::Users, vec![Fault::Status(503); 3]);
    assert_unavailable(
        &broker,
        seed::GITHUB_USER,
        "github",
        "the operator dropped this user: its old token must not come back as a stale copy",
    )
    .await;
    broker.stop().await;
}

/// Expects UNAVAILABLE for `user`'s `provider` token; `why` explains a failure.
async fn assert_unavailable(broker: &TestBroker, user: &str, provider: &str, why: &str) {
    let status = broker
        .get(user, provider)
        .await
        .expect_err("no token while Auth0 fails");
    assert_eq!(status.code(), Code::Unavailable, "{why}: {status:?}");
}
