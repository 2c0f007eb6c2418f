//! Caching behaviour seen from outside: how many calls reach the Auth0
//! emulator for a given sequence of RPCs, and what `from_cache` and
//! `fetched_at` tell the caller.
//!
//! Counting assertions always start from a known state: a warm-up RPC (which
//! also makes sure the background readiness fetch of the Management token is
//! done), then `reset_counters()`, then the behaviour under test.

use std::time::{Duration, SystemTime};

use futures::future::join_all;
use serde_json::{json, Value};
use tokenbroker::cache::CacheSettings;
use tokenbroker::cache::DEFAULT_USER_MAX_BYTES;
use tokenbroker::emulator::{seed, CallCounts, EmulatorConfig};
use tokenbroker::proto::IdpToken;
use tokenbroker::service::fresh::FreshnessSettings;
use tokio::task::JoinHandle;
use tonic::{Code, Status};

use crate::support::{
    bounded, bypass_request, eventually, get_on, get_request as request, invalidate_on, Options,
    TestBroker, CLIENT_ID, CLIENT_SECRET,
};

/// Options with the given cache settings and a default emulator.
fn with_cache(user_ttl: Duration, user_capacity: u64, negative_ttl: Duration) -> Options {
    Options {
        cache: CacheSettings {
            user_ttl,
            user_capacity,
            user_max_bytes: DEFAULT_USER_MAX_BYTES,
            negative_ttl,
        },
        ..Options::default()
    }
}

/// Makes one successful RPC (which also waits out the background Management
/// token fetch) and zeroes the emulator's counters.
async fn warm_up_and_reset(broker: &TestBroker) {
    let token = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("warm-up RPC succeeds");
    assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
    broker.emulator.reset_counters();
}

fn fetched_at(token: &IdpToken) -> SystemTime {
    let stamp = token.fetched_at.expect("fetched_at is set");
    SystemTime::try_from(stamp).expect("fetched_at is a valid time")
}

/// An Auth0 profile with one GitHub identity.
fn github_profile(user_id: &str, idp_user_id: u64, access_token: &str) -> Value {
    json!({
        "user_id": user_id,
        "identities": [{
            "provider": "github",
            "connection": "github",
            "user_id": idp_user_id,
            "isSocial": true,
            "access_token": access_token,
        }],
    })
}

/// The raw path the broker requests for a user id of letters, digits and `|`.
fn users_path(user_id: &str) -> String {
    format!("/api/v2/users/{}", user_id.replace('|', "%7C"))
}

/// Creates `user` (GitHub id `idp_user_id`) with `old_token`, warms up, and
/// starts a cold read of it that the emulator holds back for 1 s (it computes
/// its answer at once, so the read carries the profile as it was). Once that
/// read has reached Auth0, changes the user's token to `new_token` and removes
/// the latency. Returns the read still in flight.
async fn read_in_flight_then_change(
    broker: &TestBroker,
    user: &'static str,
    idp_user_id: u64,
    old_token: &str,
    new_token: &str,
) -> JoinHandle<Result<IdpToken, Status>> {
    broker
        .emulator
        .upsert_user(github_profile(user, idp_user_id, old_token));
    warm_up_and_reset(broker).await;
    broker.emulator.set_latency(Duration::from_secs(1));
    let mut reader = broker.client().await;
    let in_flight = tokio::spawn(async move { get_on(&mut reader, request(user, "github")).await });
    eventually(Duration::from_secs(2), async || {
        broker.emulator.user_calls_for(user) != 0
    })
    .await;
    assert_eq!(
        broker.emulator.user_calls_for(user),
        1,
        "the cold read reached Auth0"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;

    broker
        .emulator
        .upsert_user(github_profile(user, idp_user_id, new_token));
    broker.emulator.set_latency(Duration::ZERO);
    in_flight
}

/// Waits (bounded) for a read started by [`read_in_flight_then_change`].
async fn finish(in_flight: JoinHandle<Result<IdpToken, Status>>) -> IdpToken {
    bounded("the in-flight read", in_flight)
        .await
        .expect("task completes")
        .expect("in-flight read succeeds")
}

#[tokio::test]
async fn cold_misses_for_one_user_share_one_auth0_call() {
    let broker = TestBroker::start().await;
    // Each Auth0 answer takes 200 ms, so the 50 RPCs overlap the one read.
    broker.emulator.set_latency(Duration::from_millis(200));
    let client = broker.client().await;

    let calls = (0..50).map(|_| {
        let mut client = client.clone();
        async move { get_on(&mut client, request(seed::GITHUB_USER, "github")).await }
    });
    let results = join_all(calls).await;

    let mut served_by_the_shared_read = 0;
    for result in results {
        let token = result.expect("every concurrent RPC succeeds");
        assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
        assert_eq!(token.idp_user_id, seed::GITHUB_IDP_USER_ID.to_string());
        if !token.from_cache {
            served_by_the_shared_read += 1;
        }
    }
    // Counted from start: the background readiness fetch and the RPCs' misses
    // must have shared one Management token too.
    let calls = broker.emulator.calls();
    assert_eq!(
        calls,
        CallCounts {
            token: 1,
            users: 1,
            other: 0,
            jwks: 0,
            idp_token: 0,
            token_exchange: 0,
        },
        "50 concurrent cold RPCs for one user made one /oauth/token and one /api/v2/users call"
    );
    assert_eq!(broker.emulator.user_calls_for(seed::GITHUB_USER), 1);
    // Proves the RPCs really overlapped: more than one waited on the read
    // (an RPC that arrived after it would report from_cache = true).
    assert!(
        served_by_the_shared_read > 1,
        "only {served_by_the_shared_read} RPC(s) overlapped the Auth0 read; the test did not exercise coalescing"
    );
    broker.stop().await;
}

#[tokio::test]
async fn second_call_is_served_from_cache_without_calling_auth0() {
    let broker = TestBroker::start().await;
    let mut client = broker.client().await;
    // Let the background Management token fetch finish so it is not counted.
    let first = get_on(&mut client, request(seed::GOOGLE_USER, "google-oauth2"))
        .await
        .expect("first call succeeds");
    assert!(
        !first.from_cache,
        "a cold read must not claim to come from cache"
    );
    broker.emulator.reset_counters();

    let second = get_on(&mut client, request(seed::GOOGLE_USER, "google-oauth2"))
        .await
        .expect("second call succeeds");

    assert_eq!(
        broker.emulator.calls(),
        CallCounts::default(),
        "no Auth0 call at all"
    );
    assert!(second.from_cache);
    assert_eq!(second.access_token, seed::GOOGLE_ACCESS_TOKEN);
    assert_eq!(
        second.fetched_at, first.fetched_at,
        "same read, same fetched_at"
    );
    broker.stop().await;
}

#[tokio::test]
async fn bypass_cache_reads_auth0_again_and_refreshes_the_cache() {
    let broker = TestBroker::start().await;
    let mut client = broker.client().await;
    let first = get_on(&mut client, request(seed::GITHUB_USER, "github"))
        .await
        .expect("first call succeeds");
    broker.emulator.reset_counters();
    // fetched_at has sub-microsecond resolution; make "newer" unambiguous.
    tokio::time::sleep(Duration::from_millis(20)).await;

    let bypassed = get_on(&mut client, bypass_request(seed::GITHUB_USER, "github"))
        .await
        .expect("bypass call succeeds");

    assert_eq!(broker.emulator.calls().users, 1, "bypass_cache reads Auth0");
    assert_eq!(
        broker.emulator.calls().token,
        0,
        "the Management token is still cached"
    );
    assert!(!bypassed.from_cache);
    assert!(
        fetched_at(&bypassed) > fetched_at(&first),
        "bypass_cache reports the new read's time"
    );
    assert_eq!(bypassed.access_token, seed::GITHUB_ACCESS_TOKEN);

    // The fresh read replaced the cached entry.
    let after = get_on(&mut client, request(seed::GITHUB_USER, "github"))
        .await
        .expect("call after bypass succeeds");
    assert_eq!(
        broker.emulator.calls().users,
        1,
        "served from the refreshed cache"
    );
    assert!(after.from_cache);
    assert_eq!(after.fetched_at, bypassed.fetched_at);
    broker.stop().await;
}

#[tokio::test]
async fn invalidate_user_makes_the_next_call_read_auth0() {
    let broker = TestBroker::start().await;
    let mut client = broker.client().await;
    let first = get_on(&mut client, request(seed::TWITTER_USER, "twitter"))
        .await
        .expect("first call succeeds");
    broker.emulator.reset_counters();

    invalidate_on(&mut client, seed::TWITTER_USER)
        .await
        .expect("InvalidateUser succeeds");
    assert_eq!(
        broker.emulator.calls().users,
        0,
        "invalidating does not call Auth0"
    );

    let next = get_on(&mut client, request(seed::TWITTER_USER, "twitter"))
        .await
        .expect("call after invalidation succeeds");
    assert_eq!(broker.emulator.calls().users, 1);
    assert_eq!(broker.emulator.user_calls_for(seed::TWITTER_USER), 1);
    assert!(!next.from_cache);
    assert!(fetched_at(&next) >= fetched_at(&first));
    assert_eq!(next.access_token, seed::TWITTER_ACCESS_TOKEN);
    assert_eq!(next.access_token_secret, seed::TWITTER_ACCESS_TOKEN_SECRET);
    broker.stop().await;
}

#[tokio::test]
async fn expired_management_token_is_refetched_once_and_the_rpc_succeeds() {
    let broker = TestBroker::start().await;
    warm_up_and_reset(&broker).await;
    broker.emulator.expire_management_tokens();

    let token = broker
        .get(seed::GOOGLE_USER, "google-oauth2")
        .await
        .expect("the RPC survives an expired Management token");
    assert_eq!(token.access_token, seed::GOOGLE_ACCESS_TOKEN);
    assert_eq!(
        broker.emulator.calls(),
        CallCounts {
            token: 1,
            users: 2,
            other: 0,
            jwks: 0,
            idp_token: 0,
            token_exchange: 0,
        },
        "one rejected read, one new token, one retried read"
    );
    assert_eq!(broker.emulator.user_calls_for(seed::GOOGLE_USER), 2);
    let users = users_path(seed::GOOGLE_USER);
    assert_eq!(
        broker.emulator.seen_paths(),
        vec![users.clone(), "/oauth/token".to_owned(), users]
    );

    // The new token is cached and reused.
    broker
        .get(seed::TWITTER_USER, "twitter")
        .await
        .expect("next cold call succeeds");
    assert_eq!(
        broker.emulator.calls().token,
        1,
        "the refetched token is reused"
    );
    assert_eq!(broker.emulator.calls().users, 3);
    broker.stop().await;
}

#[tokio::test]
async fn management_token_is_replaced_after_its_reuse_window_without_a_401() {
    let broker = TestBroker::start_with(Options {
        emulator: EmulatorConfig {
            token_lifetime: Duration::from_secs(2),
            ..EmulatorConfig::new(CLIENT_ID, CLIENT_SECRET)
        },
        ..Options::default()
    })
    .await;
    warm_up_and_reset(&broker).await;
    // A 2 s token is reused for half its lifetime (1 s); the emulator would
    // still accept it for another second, but the broker must not use it.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let token = broker
        .get(seed::GOOGLE_USER, "google-oauth2")
        .await
        .expect("cold call succeeds");
    assert_eq!(token.access_token, seed::GOOGLE_ACCESS_TOKEN);
    assert_eq!(
        broker.emulator.seen_paths(),
        vec!["/oauth/token".to_owned(), users_path(seed::GOOGLE_USER)],
        "a new Management token is fetched before the users read, so no 401 is needed"
    );
    assert_eq!(
        broker.emulator.calls(),
        CallCounts {
            token: 1,
            users: 1,
            other: 0,
            jwks: 0,
            idp_token: 0,
            token_exchange: 0,
        }
    );
    broker.stop().await;
}

#[tokio::test]
async fn revoked_management_token_is_replaced_and_the_read_retried_once() {
    let broker = TestBroker::start().await;
    warm_up_and_reset(&broker).await;
    broker.emulator.revoke_management_tokens();

    let token = broker
        .get(seed::LINKED_USER, "github")
        .await
        .expect("the RPC survives a revoked Management token");
    assert_eq!(token.access_token, seed::LINKED_GITHUB_ACCESS_TOKEN);
    assert_eq!(
        broker.emulator.calls().token,
        1,
        "exactly one new Management token"
    );
    assert_eq!(
        broker.emulator.user_calls_for(seed::LINKED_USER),
        2,
        "the rejected read and its one retry"
    );
    assert_eq!(broker.emulator.calls().users, 2);
    broker.stop().await;
}

#[tokio::test]
async fn concurrent_rejections_of_one_management_token_fetch_one_new_token() {
    let broker = TestBroker::start().await;
    let users: Vec<String> = (0..8).map(|i| format!("github|90{i}")).collect();
    for (i, user) in users.iter().enumerate() {
        let idp_id = 900 + i as u64;
        broker
            .emulator
            .upsert_user(github_profile(user, idp_id, &format!("gho_concurrent_{i}")));
    }
    warm_up_and_reset(&broker).await;
    broker.emulator.revoke_management_tokens();
    broker.emulator.set_latency(Duration::from_millis(100));
    let client = broker.client().await;

    let calls = users.iter().map(|user| {
        let mut client = client.clone();
        async move { get_on(&mut client, request(user, "github")).await }
    });
    let results = join_all(calls).await;

    for (i, result) in results.into_iter().enumerate() {
        let token = result.expect("every RPC survives the revoked token");
        assert_eq!(token.access_token, format!("gho_concurrent_{i}"));
    }
    // Each 401 drops only the token it was rejected with, so the token one
    // request just fetched is not thrown away by another's late 401.
    assert_eq!(
        broker.emulator.calls().token,
        1,
        "concurrent 401s for one revoked token lead to one /oauth/token call"
    );
    for user in &users {
        let reads = broker.emulator.user_calls_for(user);
        assert!(
            (1..=2).contains(&reads),
            "{user}: {reads} reads; at most one retry per miss"
        );
    }
    broker.stop().await;
}

#[tokio::test]
async fn not_found_is_remembered_for_the_negative_ttl() {
    let broker = TestBroker::start().await;
    warm_up_and_reset(&broker).await;
    let unknown = "auth0|does-not-exist-0001";

    for attempt in 1..=2 {
        let status = broker
            .get(unknown, "")
            .await
            .expect_err("an unknown user is not found");
        assert_eq!(
            status.code(),
            Code::NotFound,
            "attempt {attempt}: {status:?}"
        );
    }
    assert_eq!(
        broker.emulator.user_calls_for(unknown),
        1,
        "the second NOT_FOUND came from the negative cache"
    );
    assert_eq!(broker.emulator.calls().users, 1);
    broker.stop().await;
}

#[tokio::test]
async fn not_found_is_forgotten_after_the_negative_ttl() {
    let broker = TestBroker::start_with(with_cache(
        Duration::from_secs(300),
        1000,
        Duration::from_secs(1),
    ))
    .await;
    warm_up_and_reset(&broker).await;
    let unknown = "auth0|does-not-exist-0002";

    let status = broker.get(unknown, "").await.expect_err("unknown user");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(broker.emulator.user_calls_for(unknown), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let status = broker.get(unknown, "").await.expect_err("still unknown");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        broker.emulator.user_calls_for(unknown),
        2,
        "after the negative TTL the broker asks Auth0 again"
    );
    broker.stop().await;
}

#[tokio::test]
async fn user_is_read_again_after_the_user_ttl() {
    let broker = TestBroker::start_with(with_cache(
        Duration::from_secs(1),
        1000,
        Duration::from_secs(30),
    ))
    .await;
    warm_up_and_reset(&broker).await;

    let first = broker
        .get(seed::TWITTER_USER, "twitter")
        .await
        .expect("first call succeeds");
    assert_eq!(broker.emulator.user_calls_for(seed::TWITTER_USER), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let second = broker
        .get(seed::TWITTER_USER, "twitter")
        .await
        .expect("second call succeeds");
    assert_eq!(
        broker.emulator.user_calls_for(seed::TWITTER_USER),
        2,
        "the entry expired after the 1 s TTL"
    );
    assert!(!second.from_cache);
    assert!(fetched_at(&second) > fetched_at(&first));
    broker.stop().await;
}

#[tokio::test]
async fn user_is_never_cached_past_a_known_token_expiry() {
    // User TTL 300 s; tokens need to live no time at all for this test.
    let broker = TestBroker::start_with(Options {
        freshness: FreshnessSettings {
            default_min_validity: Duration::ZERO,
            ..FreshnessSettings::default()
        },
        ..Options::default()
    })
    .await;
    let user = "google-oauth2|shortlived0001";
    let signed_in = |token: &str| {
        json!({
            "user_id": user,
            "last_login": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "identities": [{
                "provider": "google-oauth2",
                "connection": "google-oauth2",
                "user_id": "shortlived0001",
                "isSocial": true,
                "access_token": token,
                "expires_in": 1,
            }],
        })
    };
    broker
        .emulator
        .upsert_user(signed_in("ya29.short_lived_token"));
    warm_up_and_reset(&broker).await;

    let first = broker
        .get(user, "google-oauth2")
        .await
        .expect("first call succeeds");
    assert_eq!(first.access_token, "ya29.short_lived_token");
    assert!(
        first.expires_at.is_some(),
        "expires_at is reported when known"
    );
    assert_eq!(broker.emulator.user_calls_for(user), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The user signed in again meanwhile: Auth0 holds a new token.
    broker.emulator.upsert_user(signed_in("ya29.after_sign_in"));

    let second = broker
        .get(user, "google-oauth2")
        .await
        .expect("second call succeeds");
    assert_eq!(
        broker.emulator.user_calls_for(user),
        2,
        "an entry whose token expired is not served from cache"
    );
    assert_eq!(second.access_token, "ya29.after_sign_in");
    assert!(!second.from_cache);
    broker.stop().await;
}

#[tokio::test]
async fn user_cache_holds_no_more_than_its_capacity() {
    let broker = TestBroker::start_with(with_cache(
        Duration::from_secs(300),
        2,
        Duration::from_secs(30),
    ))
    .await;
    let users: Vec<String> = (0..5).map(|i| format!("github|80{i}")).collect();
    for (i, user) in users.iter().enumerate() {
        let idp_id = 800 + i as u64;
        broker
            .emulator
            .upsert_user(github_profile(user, idp_id, &format!("gho_capacity_{i}")));
    }
    let mut client = broker.client().await;
    // Warm-up on a user outside the set, then count from zero.
    warm_up_and_reset(&broker).await;

    for user in &users {
        get_on(&mut client, request(user, "github"))
            .await
            .expect("first fetch succeeds");
    }
    assert_eq!(broker.emulator.calls().users, 5, "each user read once");

    // moka evicts during its housekeeping, which runs on later cache
    // operations once its interval has passed; keep re-fetching all five
    // (bounded) until some had to be read again.
    let mut rounds = 0;
    eventually(Duration::from_secs(8), async || {
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(400)).await;
        for (i, user) in users.iter().enumerate() {
            let token = get_on(&mut client, request(user, "github"))
                .await
                .expect("re-fetch succeeds");
            assert_eq!(token.access_token, format!("gho_capacity_{i}"));
        }
        broker.emulator.calls().users > 5
    })
    .await;
    assert!(
        broker.emulator.calls().users > 5,
        "after {rounds} rounds of re-fetching five users, a cache of capacity 2 still held all of them"
    );
    broker.stop().await;
}

#[tokio::test]
async fn bypass_cache_and_invalidate_also_clear_a_remembered_not_found() {
    let broker = TestBroker::start().await; // negative TTL 30 s
    warm_up_and_reset(&broker).await;
    let late = "github|700001";
    let late_too = "github|700002";
    for user in [late, late_too] {
        let status = broker
            .get(user, "github")
            .await
            .expect_err("not yet created");
        assert_eq!(status.code(), Code::NotFound);
    }
    broker
        .emulator
        .upsert_user(github_profile(late, 700_001, "gho_late_1"));
    broker
        .emulator
        .upsert_user(github_profile(late_too, 700_002, "gho_late_2"));

    let status = broker
        .get(late, "github")
        .await
        .expect_err("still remembered");
    assert_eq!(status.code(), Code::NotFound, "the 404 is remembered");

    let found = broker
        .get_with(bypass_request(late, "github"))
        .await
        .expect("bypass_cache reads Auth0 past a remembered 404");
    assert_eq!(found.access_token, "gho_late_1");

    broker
        .invalidate(late_too)
        .await
        .expect("InvalidateUser succeeds");
    let found = broker
        .get(late_too, "github")
        .await
        .expect("InvalidateUser drops a remembered 404");
    assert_eq!(found.access_token, "gho_late_2");
    broker.stop().await;
}

#[tokio::test]
async fn invalidate_user_is_not_undone_by_a_read_that_was_already_in_flight() {
    let broker = TestBroker::start().await;
    let user = "github|600001";
    // The user's token changes in Auth0 while a read is in flight, then a
    // caller invalidates the user.
    let in_flight = read_in_flight_then_change(
        &broker,
        user,
        600_001,
        "gho_before_relink",
        "gho_after_relink",
    )
    .await;
    let mut client = broker.client().await;
    invalidate_on(&mut client, user)
        .await
        .expect("InvalidateUser succeeds");

    // The read that started before the invalidation may return the old token...
    let old = finish(in_flight).await;
    assert_eq!(old.access_token, "gho_before_relink");

    // ...but a call made after InvalidateUser returned must not be served the
    // profile read before it.
    let next = get_on(&mut client, request(user, "github"))
        .await
        .expect("call after invalidation succeeds");
    assert_eq!(
        next.access_token, "gho_after_relink",
        "InvalidateUser was undone: the read in flight during it re-filled the cache with the old profile \
         (from_cache = {})",
        next.from_cache
    );
    broker.stop().await;
}

#[tokio::test]
async fn bypass_cache_refresh_is_not_overwritten_by_an_older_read_in_flight() {
    let broker = TestBroker::start().await;
    let user = "github|600002";
    let in_flight =
        read_in_flight_then_change(&broker, user, 600_002, "gho_old_profile", "gho_new_profile")
            .await;
    let mut client = broker.client().await;
    let refreshed = get_on(&mut client, bypass_request(user, "github"))
        .await
        .expect("bypass call succeeds");
    assert_eq!(refreshed.access_token, "gho_new_profile");

    let old = finish(in_flight).await;
    assert_eq!(old.access_token, "gho_old_profile");

    let next = get_on(&mut client, request(user, "github"))
        .await
        .expect("call after the refresh succeeds");
    assert_eq!(
        next.access_token, "gho_new_profile",
        "the older in-flight read replaced the bypass_cache refresh in the cache (from_cache = {})",
        next.from_cache
    );
    broker.stop().await;
}
