//! One test (at least) per row of the README's status table, plus the facts of
//! the real Auth0 API the broker must handle. The handshake rows live in
//! `security.rs`; the caller policy in depth lives in `policy.rs`, here is
//! only its row of the table.

use std::time::{Duration, Instant, SystemTime};

use tokenbroker::auth0::OutboundLimits;
use tokenbroker::emulator::{seed, EmulatorConfig, Endpoint, Fault};
use tokenbroker::proto::{GetIdpTokenRequest, IdpToken, ListIdpTokensRequest};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::support::{
    bounded, get_on, get_request, Options, TestBroker, CLIENT_ID, CLIENT_SECRET, CLIENT_SPIFFE_ID,
};

// ---------------------------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------------------------

/// Fails when `status` carries a planted token or either client secret.
fn assert_leaks_nothing(status: &Status) {
    let shown = format!("{status:?}");
    for secret in seed::planted_secrets().into_iter().chain([CLIENT_SECRET]) {
        assert!(
            !shown.contains(secret),
            "status leaks a secret ({secret}): {shown}"
        );
    }
}

/// Expects an error of `code`; returns it for further checks.
fn expect_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, what: &str) -> Status {
    let status = match result {
        Ok(value) => panic!("{what}: expected {code:?}, got Ok({value:?})"),
        Err(status) => status,
    };
    assert_eq!(status.code(), code, "{what}: {status:?}");
    assert!(
        !status.message().is_empty(),
        "{what}: the message says what happened"
    );
    assert_leaks_nothing(&status);
    status
}

/// [`expect_code`], and the message must mention `needle`.
fn expect_code_naming<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    what: &str,
    needle: &str,
) -> Status {
    let status = expect_code(result, code, what);
    assert!(
        status.message().contains(needle),
        "{what}: the message mentions {needle:?}: {status:?}"
    );
    status
}

/// The delay of the `google.rpc.RetryInfo` an UNAVAILABLE after a 429 carries.
fn retry_delay(status: &Status) -> Duration {
    status
        .get_details_retry_info()
        .expect("UNAVAILABLE after a 429 carries google.rpc.RetryInfo")
        .retry_delay
        .expect("RetryInfo has a delay")
}

/// A broker whose emulator grants Management tokens with only `scope`.
async fn broker_with_scope(scope: &str) -> TestBroker {
    TestBroker::start_with(Options {
        emulator: EmulatorConfig {
            scope: scope.into(),
            ..EmulatorConfig::new(CLIENT_ID, CLIENT_SECRET)
        },
        ..Default::default()
    })
    .await
}

/// A broker whose next five answers from `endpoint` are `fault`, and the
/// UNAVAILABLE of the `GetIdpToken` that runs into them. For the token
/// endpoint, a first call has cached the Management token and revoking it
/// forces a new grant.
async fn unavailable_after(endpoint: Endpoint, fault: Fault, what: &str) -> (TestBroker, Status) {
    // One attempt: this is about the status mapping; retries are tested in `resilience`.
    let broker = TestBroker::start_with(Options {
        outbound: OutboundLimits {
            max_attempts: 1,
            ..OutboundLimits::default()
        },
        ..Options::default()
    })
    .await;
    let (user, provider) = match endpoint {
        Endpoint::Token => {
            broker
                .get(seed::GITHUB_USER, "github")
                .await
                .expect("token");
            (seed::GOOGLE_USER, "google-oauth2")
        }
        _ => (seed::GITHUB_USER, "github"),
    };
    broker.emulator.inject_faults(endpoint, vec![fault; 5]);
    if endpoint == Endpoint::Token {
        broker.emulator.revoke_management_tokens();
    }
    let status = expect_code(broker.get(user, provider).await, Code::Unavailable, what);
    (broker, status)
}

/// Seconds from `earlier` to `later`, with nanosecond precision.
fn seconds_between(earlier: &prost_types::Timestamp, later: &prost_types::Timestamp) -> f64 {
    (later.seconds - earlier.seconds) as f64 + f64::from(later.nanos - earlier.nanos) / 1e9
}

/// Asserts `fetched_at` is set and close to now.
fn assert_fetched_recently(token: &IdpToken) {
    let fetched = token.fetched_at.as_ref().expect("fetched_at is set");
    let now = prost_types::Timestamp::from(SystemTime::now());
    let age = seconds_between(fetched, &now);
    assert!(
        (-5.0..300.0).contains(&age),
        "fetched_at is {age} s before now"
    );
}

/// An Auth0 URL where nothing listens: port 1 on loopback is privileged and
/// unused, so every connection is refused at once.
const DEAD_AUTH0: &str = "http://127.0.0.1:1";

// ---------------------------------------------------------------------------------------------
// OK (kept from the harness commit)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn github_token_is_released_with_a_numeric_id_as_text() {
    let broker = TestBroker::start().await;
    let token = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("token");
    assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
    assert_eq!(token.idp_user_id, "1234567");
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// INVALID_ARGUMENT: empty, over 512 bytes, or control characters in user_id
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn empty_user_id_is_invalid_argument() {
    let broker = TestBroker::start().await;
    expect_code_naming(
        broker.get("", "github").await,
        Code::InvalidArgument,
        "empty user_id",
        "user_id",
    );
    assert_eq!(broker.emulator.calls().users, 0);
    broker.stop().await;
}

#[tokio::test]
async fn user_id_over_512_bytes_is_invalid_argument() {
    let broker = TestBroker::start().await;
    let long = format!("auth0|{}", "a".repeat(513 - "auth0|".len()));
    assert_eq!(long.len(), 513);
    expect_code_naming(
        broker.get(&long, "").await,
        Code::InvalidArgument,
        "513-byte user_id",
        "512",
    );
    // Bytes, not characters: 257 two-byte characters are 514 bytes.
    let wide = "é".repeat(257);
    assert_eq!(wide.chars().count(), 257);
    expect_code(
        broker.get(&wide, "").await,
        Code::InvalidArgument,
        "514-byte user_id of 257 characters",
    );
    assert_eq!(broker.emulator.calls().users, 0);
    broker.stop().await;
}

#[tokio::test]
async fn user_id_of_exactly_512_bytes_is_looked_up_and_not_found() {
    let broker = TestBroker::start().await;
    let longest = format!("auth0|{}", "b".repeat(512 - "auth0|".len()));
    assert_eq!(longest.len(), 512);
    expect_code(
        broker.get(&longest, "").await,
        Code::NotFound,
        "512-byte user_id",
    );
    assert_eq!(broker.emulator.user_calls_for(&longest), 1);
    broker.stop().await;
}

#[tokio::test]
async fn user_id_with_a_control_character_is_invalid_argument() {
    let broker = TestBroker::start().await;
    for user_id in [
        "auth0|a\nb",
        "auth0|a\u{7f}b",
        "auth0|a\rb",
        "auth0|a\0b",
        "\tgithub|1234567",
    ] {
        expect_code(
            broker.get(user_id, "").await,
            Code::InvalidArgument,
            &format!("user_id {user_id:?}"),
        );
    }
    assert_eq!(broker.emulator.calls().users, 0);
    broker.stop().await;
}

#[tokio::test]
async fn dot_segment_user_ids_are_invalid_argument() {
    let broker = TestBroker::start().await;
    for user_id in [".", ".."] {
        expect_code(
            broker.get(user_id, "").await,
            Code::InvalidArgument,
            &format!("user_id {user_id:?}"),
        );
        expect_code(
            broker.list(user_id).await,
            Code::InvalidArgument,
            &format!("ListIdpTokens {user_id:?}"),
        );
    }
    assert_eq!(broker.emulator.calls().users, 0);
    assert_eq!(broker.emulator.calls().other, 0);
    broker.stop().await;
}

#[tokio::test]
async fn list_with_an_invalid_user_id_is_invalid_argument() {
    let broker = TestBroker::start().await;
    for (user_id, what) in [
        (String::new(), "empty user_id"),
        ("x".repeat(513), "513-byte user_id"),
        ("auth0|a\nb".to_owned(), "a newline"),
    ] {
        expect_code(
            broker.list(&user_id).await,
            Code::InvalidArgument,
            &format!("ListIdpTokens with {what}"),
        );
    }
    assert_eq!(broker.emulator.calls().users, 0);
    broker.stop().await;
}

#[tokio::test]
async fn invalidate_with_an_invalid_user_id_is_invalid_argument() {
    let broker = TestBroker::start().await;
    for (user_id, what) in [
        (String::new(), "empty user_id"),
        ("x".repeat(513), "513-byte user_id"),
        ("..".to_owned(), ".."),
    ] {
        expect_code(
            broker.invalidate(&user_id).await,
            Code::InvalidArgument,
            &format!("InvalidateUser with {what}"),
        );
    }
    // A valid id is accepted, whether or not it is cached.
    broker
        .invalidate(seed::GITHUB_USER)
        .await
        .expect("InvalidateUser with a valid id");
    assert_eq!(broker.emulator.calls().users, 0);
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// PERMISSION_DENIED: caller not allowed this provider/RPC by the policy
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unlisted_caller_is_permission_denied() {
    let broker = TestBroker::start_with(Options {
        policy_toml: Some(
            "[[caller]]\nid = \"spiffe://test.example/ns/it/sa/someone-else\"\nproviders = [\"*\"]\ninvalidate = true\n"
                .to_owned(),
        ),
        ..Default::default()
    })
    .await;
    expect_code(
        broker.get(seed::GITHUB_USER, "github").await,
        Code::PermissionDenied,
        "unlisted caller, GetIdpToken",
    );
    expect_code(
        broker.list(seed::LINKED_USER).await,
        Code::PermissionDenied,
        "unlisted caller, ListIdpTokens",
    );
    expect_code(
        broker.invalidate(seed::GITHUB_USER).await,
        Code::PermissionDenied,
        "unlisted caller, InvalidateUser",
    );
    assert_eq!(
        broker.emulator.calls().users,
        0,
        "denied before asking Auth0"
    );
    broker.stop().await;
}

#[tokio::test]
async fn provider_outside_the_callers_policy_is_permission_denied() {
    let broker = TestBroker::start_with(Options {
        policy_toml: Some(format!(
            "[[caller]]\nid = \"{CLIENT_SPIFFE_ID}\"\nproviders = [\"google-oauth2\"]\ninvalidate = false\n"
        )),
        ..Default::default()
    })
    .await;
    expect_code_naming(
        broker.get(seed::GITHUB_USER, "github").await,
        Code::PermissionDenied,
        "github asked by a google-only caller",
        "github",
    );
    assert_eq!(
        broker.emulator.calls().users,
        0,
        "denied before asking Auth0"
    );
    expect_code(
        broker.invalidate(seed::GITHUB_USER).await,
        Code::PermissionDenied,
        "InvalidateUser without invalidate = true",
    );
    // What the policy allows is still released.
    let token = broker
        .get(seed::GOOGLE_USER, "google-oauth2")
        .await
        .expect("allowed provider");
    assert_eq!(token.access_token, seed::GOOGLE_ACCESS_TOKEN);
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// NOT_FOUND: no such user; no identity for that provider/connection
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_user_is_not_found() {
    let broker = TestBroker::start().await;
    expect_code(
        broker.get("auth0|nobody-by-this-id", "").await,
        Code::NotFound,
        "unknown user, GetIdpToken",
    );
    expect_code(
        broker.list("github|99999999").await,
        Code::NotFound,
        "unknown user, ListIdpTokens",
    );
    assert_eq!(broker.emulator.calls().users, 2);
    broker.stop().await;
}

#[tokio::test]
async fn provider_the_user_has_no_identity_for_is_not_found() {
    let broker = TestBroker::start().await;
    expect_code_naming(
        broker.get(seed::DATABASE_USER, "github").await,
        Code::NotFound,
        "database user asked for github",
        "github",
    );
    broker.stop().await;
}

#[tokio::test]
async fn connection_the_user_has_no_identity_for_is_not_found() {
    let broker = TestBroker::start().await;
    // The second row: provider and connection must both match.
    for (user_id, provider, what) in [
        (seed::GITHUB_USER, "", "github user asked for corp-sso"),
        (
            seed::LINKED_USER,
            "github",
            "linked user asked for github on corp-sso",
        ),
    ] {
        let request = GetIdpTokenRequest {
            connection: seed::CORP_SSO_CONNECTION.to_owned(),
            ..get_request(user_id, provider)
        };
        expect_code(broker.get_with(request).await, Code::NotFound, what);
    }
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// FAILED_PRECONDITION: identity without token; Management token lacks read:user_idp_tokens;
// the broker's own credentials rejected
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn identity_without_a_token_is_failed_precondition() {
    let broker = TestBroker::start().await;
    let status = expect_code(
        broker.get(seed::DATABASE_USER, "").await,
        Code::FailedPrecondition,
        "database user, no selector",
    );
    // Not blamed on the scope: the broker's token has it.
    assert!(
        !status.message().contains("read:user_idp_tokens"),
        "{status:?}"
    );
    expect_code(
        broker.get(seed::DATABASE_USER, "auth0").await,
        Code::FailedPrecondition,
        "database user, provider auth0",
    );
    broker.stop().await;
}

#[tokio::test]
async fn management_token_without_idp_token_scope_is_failed_precondition() {
    let broker = broker_with_scope("read:users").await;
    expect_code_naming(
        broker.get(seed::GITHUB_USER, "github").await,
        Code::FailedPrecondition,
        "GetIdpToken without read:user_idp_tokens",
        "read:user_idp_tokens",
    );
    expect_code_naming(
        broker.list(seed::LINKED_USER).await,
        Code::FailedPrecondition,
        "ListIdpTokens without read:user_idp_tokens",
        "read:user_idp_tokens",
    );
    broker.stop().await;
}

#[tokio::test]
async fn management_token_without_any_users_scope_is_failed_precondition() {
    let broker = broker_with_scope("read:clients").await;
    expect_code_naming(
        broker.get(seed::GITHUB_USER, "github").await,
        Code::FailedPrecondition,
        "GetIdpToken with a token that may not read users",
        "read:user_idp_tokens",
    );
    assert!(broker.emulator.calls().users >= 1);
    broker.stop().await;
}

#[tokio::test]
async fn rejected_broker_credentials_are_failed_precondition_not_unauthenticated() {
    const WRONG_SECRET: &str = "wrong-secret-3a9f7c21";
    let broker = TestBroker::start_with(Options {
        broker_secret: WRONG_SECRET.into(),
        ..Default::default()
    })
    .await;
    let status = expect_code(
        broker.get(seed::GITHUB_USER, "github").await,
        Code::FailedPrecondition,
        "wrong client secret",
    );
    assert!(
        !status.message().contains(WRONG_SECRET),
        "message leaks the secret: {status:?}"
    );
    assert!(
        !format!("{status:?}").contains(WRONG_SECRET),
        "status leaks the secret: {status:?}"
    );
    assert!(broker.emulator.calls().token >= 1);
    assert_eq!(broker.emulator.calls().users, 0);
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// UNAVAILABLE: Auth0 unreachable, 5xx, 429 (+ retry delay when known)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn auth0_server_error_is_unavailable() {
    let (broker, _) =
        unavailable_after(Endpoint::Users, Fault::Status(503), "Auth0 answers 503").await;
    assert!(broker.emulator.calls().users >= 1);
    broker.stop().await;
}

#[tokio::test]
async fn auth0_rate_limit_is_unavailable_with_retry_info() {
    let limited = Fault::RateLimited {
        retry_after: Some(7),
        reset_in_secs: 7,
    };
    let (broker, status) = unavailable_after(Endpoint::Users, limited, "Auth0 answers 429").await;
    assert_eq!(retry_delay(&status), Duration::from_secs(7));
    broker.stop().await;
}

#[tokio::test]
async fn auth0_rate_limit_without_retry_after_waits_until_the_reset() {
    let limited = Fault::RateLimited {
        retry_after: None,
        reset_in_secs: 30,
    };
    let (broker, status) = unavailable_after(
        Endpoint::Users,
        limited,
        "Auth0 answers 429 with x-ratelimit-reset only",
    )
    .await;
    let delay = retry_delay(&status);
    // Epoch seconds on both sides, plus a slow machine: a few seconds of slack.
    assert!(
        (Duration::from_secs(25)..=Duration::from_secs(31)).contains(&delay),
        "retry delay {delay:?}, expected about 30 s"
    );
    broker.stop().await;
}

#[tokio::test]
async fn auth0_token_endpoint_failures_are_unavailable() {
    let (broker, _) = unavailable_after(
        Endpoint::Token,
        Fault::Status(503),
        "/oauth/token answers 503",
    )
    .await;
    broker.stop().await;
}

#[tokio::test]
async fn auth0_token_endpoint_rate_limit_is_unavailable_with_retry_info() {
    let limited = Fault::RateLimited {
        retry_after: Some(11),
        reset_in_secs: 11,
    };
    let (broker, status) =
        unavailable_after(Endpoint::Token, limited, "/oauth/token answers 429").await;
    assert_eq!(retry_delay(&status), Duration::from_secs(11));
    broker.stop().await;
}

#[tokio::test]
async fn unreachable_auth0_is_unavailable() {
    let broker = TestBroker::start_with(Options {
        auth0_base_url: Some(DEAD_AUTH0.to_owned()),
        ..Default::default()
    })
    .await;
    let status = expect_code(
        broker.get(seed::GITHUB_USER, "github").await,
        Code::Unavailable,
        "Auth0 unreachable",
    );
    assert!(!status.message().contains(CLIENT_SECRET), "{status:?}");
    expect_code(
        broker.list(seed::LINKED_USER).await,
        Code::Unavailable,
        "Auth0 unreachable, ListIdpTokens",
    );
    // Nothing reached the emulator the broker was not pointed at.
    assert_eq!(broker.emulator.calls(), Default::default());
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// DEADLINE_EXCEEDED: the caller's deadline passed
// ---------------------------------------------------------------------------------------------

/// KNOWN FAILURE at the time of writing (see the report): the broker gives up
/// only `min(5 ms, deadline / 10)` before the caller's deadline, counted from
/// when its handler starts, so a tonic caller's own timer (started before the
/// request was sent) often fires first and the caller sees CANCELLED "Timeout
/// expired" instead of DEADLINE_EXCEEDED. One attempt fails 5-30 % of the
/// time, so the test makes twenty on one connection: with a headroom of a
/// few tens of milliseconds all twenty pass even on a loaded machine.
#[tokio::test]
async fn caller_deadline_passing_is_deadline_exceeded_not_cancelled() {
    fn with_deadline<T>(message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(Duration::from_millis(300));
        request
    }

    const ATTEMPTS: usize = 20;
    let broker = TestBroker::start().await;
    broker.emulator.set_latency(Duration::from_secs(3));
    let mut client = broker.client().await;
    let mut outcomes = Vec::new();
    for attempt in 0..ATTEMPTS {
        let started = Instant::now();
        let result = if attempt % 2 == 0 {
            let request = with_deadline(get_request(seed::GITHUB_USER, "github"));
            get_on(&mut client, request).await.map(|_| ())
        } else {
            let request = with_deadline(ListIdpTokensRequest {
                user_id: seed::LINKED_USER.to_owned(),
                ..Default::default()
            });
            bounded("ListIdpTokens", client.list_idp_tokens(request))
                .await
                .map(|_| ())
        };
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_millis(2500),
            "attempt {attempt} answered after {elapsed:?}, not at the deadline"
        );
        let status = result.expect_err("no token can arrive before a 3 s slow Auth0");
        assert_leaks_nothing(&status);
        outcomes.push((status.code(), status.message().to_owned()));
    }
    let wrong: Vec<_> = outcomes
        .iter()
        .filter(|(code, _)| *code != Code::DeadlineExceeded)
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {ATTEMPTS} calls past a 300 ms deadline were not DEADLINE_EXCEEDED: {wrong:?}",
        wrong.len()
    );
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// API facts
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn twitter_token_comes_with_its_token_secret() {
    let broker = TestBroker::start().await;
    let token = broker
        .get(seed::TWITTER_USER, "twitter")
        .await
        .expect("token");
    assert_eq!(token.provider, "twitter");
    assert_eq!(token.access_token, seed::TWITTER_ACCESS_TOKEN);
    assert_eq!(token.access_token_secret, seed::TWITTER_ACCESS_TOKEN_SECRET);
    assert_eq!(token.idp_user_id, "778899");
    assert!(token.expires_at.is_none(), "Twitter tokens have no expiry");
    broker.stop().await;
}

#[tokio::test]
async fn google_token_has_an_expiry_and_never_its_refresh_token() {
    let broker = TestBroker::start().await;
    let token = broker
        .get(seed::GOOGLE_USER, "google-oauth2")
        .await
        .expect("token");
    assert_eq!(token.access_token, seed::GOOGLE_ACCESS_TOKEN);
    assert_eq!(token.idp_user_id, "108000000000000000001");
    assert!(token.access_token_secret.is_empty());
    let fetched = token.fetched_at.as_ref().expect("fetched_at is set");
    let expires = token.expires_at.as_ref().expect("expires_at is set");
    let lifetime = seconds_between(fetched, expires);
    // Honest expiry: the user's last_login (FRESH_LOGIN_AGO before seeding)
    // plus the IdP's expires_in, never the read time plus expires_in.
    let expected = (seed::GOOGLE_EXPIRES_IN - seed::FRESH_LOGIN_AGO.as_secs()) as f64;
    assert!(
        (expected - 30.0..=expected + 1.0).contains(&lifetime),
        "expires_at is {lifetime} s after fetched_at, expected about {expected}"
    );
    let shown = format!("{token:?}");
    assert!(
        !shown.contains(seed::GOOGLE_REFRESH_TOKEN),
        "refresh token returned: {shown}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn linked_user_token_is_selected_by_provider() {
    let broker = TestBroker::start().await;
    for (provider, connection, access_token) in [
        ("github", "github", seed::LINKED_GITHUB_ACCESS_TOKEN),
        (
            "google-oauth2",
            "google-oauth2",
            seed::LINKED_GOOGLE_ACCESS_TOKEN,
        ),
        (
            "oauth2",
            seed::CORP_SSO_CONNECTION,
            seed::LINKED_CORP_ACCESS_TOKEN,
        ),
    ] {
        let token = broker
            .get(seed::LINKED_USER, provider)
            .await
            .unwrap_or_else(|status| panic!("{provider}: {status:?}"));
        assert_eq!(token.provider, provider);
        assert_eq!(token.connection, connection);
        assert_eq!(token.access_token, access_token, "{provider}");
    }
    let github = broker
        .get(seed::LINKED_USER, "github")
        .await
        .expect("token");
    assert_eq!(
        github.idp_user_id,
        seed::LINKED_GITHUB_IDP_USER_ID.to_string()
    );
    broker.stop().await;
}

#[tokio::test]
async fn linked_user_token_is_selected_by_connection() {
    let broker = TestBroker::start().await;
    let token = broker
        .get_with(GetIdpTokenRequest {
            connection: seed::CORP_SSO_CONNECTION.to_owned(),
            ..get_request(seed::LINKED_USER, "")
        })
        .await
        .expect("token");
    assert_eq!(token.provider, "oauth2");
    assert_eq!(token.connection, seed::CORP_SSO_CONNECTION);
    assert_eq!(token.access_token, seed::LINKED_CORP_ACCESS_TOKEN);
    assert_eq!(token.idp_user_id, "corp-sso|linked.user");
    broker.stop().await;
}

#[tokio::test]
async fn no_selector_means_the_first_identity_with_a_token() {
    let broker = TestBroker::start().await;
    // The auth0 primary identity comes first but has no token; GitHub is next.
    let token = broker.get(seed::LINKED_USER, "").await.expect("token");
    assert_eq!(token.provider, "github");
    assert_eq!(token.access_token, seed::LINKED_GITHUB_ACCESS_TOKEN);
    broker.stop().await;
}

#[tokio::test]
async fn list_returns_exactly_the_token_bearing_identities_without_refresh_tokens() {
    let broker = TestBroker::start().await;
    let tokens = broker.list(seed::LINKED_USER).await.expect("tokens");
    let mut found: Vec<(&str, &str)> = tokens
        .iter()
        .map(|token| (token.provider.as_str(), token.access_token.as_str()))
        .collect();
    found.sort_unstable();
    assert_eq!(
        found,
        vec![
            ("github", seed::LINKED_GITHUB_ACCESS_TOKEN),
            ("google-oauth2", seed::LINKED_GOOGLE_ACCESS_TOKEN),
            ("oauth2", seed::LINKED_CORP_ACCESS_TOKEN),
        ]
    );
    for token in &tokens {
        assert_fetched_recently(token);
    }
    let google = tokens
        .iter()
        .find(|token| token.provider == "google-oauth2")
        .expect("google token");
    assert!(google.expires_at.is_some(), "Google's expiry is kept");
    let shown = format!("{tokens:?}");
    assert!(
        !shown.contains(seed::LINKED_GOOGLE_REFRESH_TOKEN),
        "refresh token returned: {shown}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn list_for_a_user_without_tokens_is_failed_precondition_or_empty() {
    let broker = TestBroker::start().await;
    // README: ListIdpTokens returns the tokens the caller may have; a user
    // with none has nothing to return, and the broker must not invent one.
    match broker.list(seed::DATABASE_USER).await {
        Ok(tokens) => assert!(tokens.is_empty(), "{tokens:?}"),
        Err(status) => {
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            assert_leaks_nothing(&status);
        }
    }
    broker.stop().await;
}

#[tokio::test]
async fn fetched_at_is_set_and_from_cache_flips_on_the_second_call() {
    let broker = TestBroker::start().await;
    let first = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("first");
    assert!(!first.from_cache, "first call reads Auth0");
    assert_fetched_recently(&first);
    let second = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("second");
    assert!(second.from_cache, "second call is served from the cache");
    assert_eq!(
        second.fetched_at, first.fetched_at,
        "a cached token reports when it was read from Auth0"
    );
    assert_eq!(second.access_token, seed::GITHUB_ACCESS_TOKEN);
    assert_eq!(broker.emulator.user_calls_for(seed::GITHUB_USER), 1);
    broker.stop().await;
}
