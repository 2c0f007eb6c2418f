//! Tokens that still work: honest expiry from `last_login`, `min_valid_for`,
//! refresh at the IdP for `refresh = "idp"` connections, and the reasons a
//! program switches on when there is no working token.

use std::time::{Duration, SystemTime};

use futures::future::join_all;
use serde_json::json;
use tokenbroker::emulator::{seed, Endpoint, Fault};
use tokenbroker::proto::{GetIdpTokenRequest, IdpToken, ListIdpTokensRequest, TokenSource};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::support::{
    bounded, eventually, get_on, get_request, write_connections, Options, TestBroker,
    TestConnections,
};

const GOOGLE: &str = "google-oauth2";

/// A broker whose connections file refreshes `google-oauth2` at the emulator's IdP.
async fn refreshing_broker() -> TestBroker {
    TestBroker::start_with(Options {
        connections: Some(TestConnections {
            refreshed_at_idp: vec![GOOGLE],
            not_refreshed: Vec::new(),
            token_vault: Vec::new(),
        }),
        ..Options::default()
    })
    .await
}

/// `GetIdpToken` for `user`'s Google token, needing it valid `min_valid_for`.
fn google_request(user: &str, min_valid_for: Option<Duration>) -> GetIdpTokenRequest {
    GetIdpTokenRequest {
        min_valid_for: min_valid_for.and_then(|d| prost_types::Duration::try_from(d).ok()),
        ..get_request(user, GOOGLE)
    }
}

fn seconds(timestamp: &Option<prost_types::Timestamp>) -> i64 {
    timestamp.as_ref().expect("timestamp set").seconds
}

fn now_seconds() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

/// Asserts `status` carries ErrorInfo `reason` about the Google connection.
fn assert_reason(status: &Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.domain, "tokenbroker");
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(
        info.metadata.get("provider").map(String::as_str),
        Some(GOOGLE)
    );
    assert_eq!(
        info.metadata.get("connection").map(String::as_str),
        Some(GOOGLE)
    );
}

fn assert_refreshed(token: &IdpToken, before: i64) {
    assert_eq!(token.source(), TokenSource::IdpRefresh, "{token:?}");
    assert!(token.access_token.starts_with("ya29."), "an IdP token");
    let lifetime = seconds(&token.expires_at) - seconds(&token.fetched_at);
    assert_eq!(
        lifetime, 3599,
        "exact expiry: issue time + the IdP's expires_in"
    );
    assert!(seconds(&token.fetched_at) >= before - 1);
    assert_eq!(
        token.scopes.join(" "),
        seed::IDP_SCOPE,
        "scopes as the IdP granted them"
    );
}

#[tokio::test]
async fn a_fresh_profile_token_is_released_with_an_upper_bound_expiry() {
    let broker = refreshing_broker().await;
    let token = broker
        .get_with(google_request(seed::FRESH_GOOGLE_USER, None))
        .await
        .expect("fresh token");
    assert_eq!(token.access_token, seed::FRESH_GOOGLE_ACCESS_TOKEN);
    assert_eq!(token.source(), TokenSource::Auth0Profile);
    let expected = now_seconds() - seed::FRESH_LOGIN_AGO.as_secs() as i64 + 3599;
    let expires = seconds(&token.expires_at);
    assert!(
        (expected - 30..=expected + 1).contains(&expires),
        "last_login + expires_in: {expires} vs {expected}"
    );
    assert_eq!(broker.emulator.calls().idp_token, 0, "no refresh needed");
    broker.stop().await;
}

#[tokio::test]
async fn a_stale_token_is_refreshed_at_the_idp_once_for_fifty_concurrent_needs() {
    let broker = refreshing_broker().await;
    let before = now_seconds();
    let client = broker.client().await;
    let needs = (0..50).map(|_| {
        let mut client = client.clone();
        async move { get_on(&mut client, google_request(seed::STALE_GOOGLE_USER, None)).await }
    });
    let tokens: Vec<IdpToken> = join_all(needs)
        .await
        .into_iter()
        .map(|result| result.expect("refreshed"))
        .collect();
    for token in &tokens {
        assert_ne!(
            token.access_token,
            seed::STALE_GOOGLE_ACCESS_TOKEN,
            "never the dead token"
        );
        assert_refreshed(token, before);
        assert_eq!(
            token.access_token, tokens[0].access_token,
            "one refresh shared"
        );
    }
    assert_eq!(broker.emulator.calls().idp_token, 1);
    let again = broker
        .get_with(google_request(seed::STALE_GOOGLE_USER, None))
        .await
        .expect("cached refresh");
    assert!(again.from_cache);
    assert_eq!(broker.emulator.calls().idp_token, 1, "kept while usable");
    broker.stop().await;
}

#[tokio::test]
async fn min_valid_for_longer_than_the_token_has_left_forces_a_refresh() {
    let broker = refreshing_broker().await;
    // Signed in 50 minutes ago: the profile token has about 10 minutes left.
    let login = SystemTime::now() - Duration::from_secs(50 * 60);
    broker.emulator.upsert_user(json!({
        "user_id": "google-oauth2|tenminutes",
        "last_login": humantime::format_rfc3339_millis(login).to_string(),
        "identities": [{"provider": GOOGLE, "connection": GOOGLE, "user_id": "tenminutes",
                        "access_token": "ya29.ten_minutes_left", "expires_in": 3600,
                        "refresh_token": "1//ten_minutes_refresh"}],
    }));
    broker
        .emulator
        .add_idp_refresh_token("1//ten_minutes_refresh");
    let five = broker
        .get_with(google_request(
            "google-oauth2|tenminutes",
            Some(Duration::from_secs(300)),
        ))
        .await
        .expect("usable for 5 minutes");
    assert_eq!(five.access_token, "ya29.ten_minutes_left");
    let fifteen = broker
        .get_with(google_request(
            "google-oauth2|tenminutes",
            Some(Duration::from_secs(900)),
        ))
        .await
        .expect("refreshed for 15 minutes");
    assert_eq!(fifteen.source(), TokenSource::IdpRefresh);
    assert_eq!(broker.emulator.calls().idp_token, 1);
    broker.stop().await;
}

#[tokio::test]
async fn a_rotated_refresh_token_is_the_one_used_next() {
    let broker = refreshing_broker().await;
    broker.emulator.set_idp_rotation(true);
    // Tokens shorter than the caller needs: every request refreshes once.
    broker.emulator.set_idp_expires_in(60);
    let need = Some(Duration::from_secs(120));
    let first = broker
        .get_with(google_request(seed::STALE_GOOGLE_USER, need))
        .await
        .expect("first refresh");
    let second = broker
        .get_with(google_request(seed::STALE_GOOGLE_USER, need))
        .await
        .expect("the second refresh sends the rotated token (the first one is retired)");
    assert_ne!(first.access_token, second.access_token);
    assert_eq!(broker.emulator.calls().idp_token, 2);
    broker.stop().await;
}

#[tokio::test]
async fn a_revoked_refresh_token_means_reconnect_remembered_until_invalidated() {
    let broker = refreshing_broker().await;
    let status = broker
        .get_with(google_request(seed::REVOKED_GOOGLE_USER, None))
        .await
        .expect_err("no working token");
    assert_reason(&status, Code::FailedPrecondition, "USER_MUST_RECONNECT");
    assert!(!status.message().contains(seed::REVOKED_GOOGLE_ACCESS_TOKEN));
    let again = broker
        .get_with(google_request(seed::REVOKED_GOOGLE_USER, None))
        .await
        .expect_err("still none");
    assert_reason(&again, Code::FailedPrecondition, "USER_MUST_RECONNECT");
    assert_eq!(
        broker.emulator.calls().idp_token,
        1,
        "invalid_grant remembered"
    );
    broker
        .invalidate(seed::REVOKED_GOOGLE_USER)
        .await
        .expect("invalidated");
    let _ = broker
        .get_with(google_request(seed::REVOKED_GOOGLE_USER, None))
        .await;
    assert_eq!(
        broker.emulator.calls().idp_token,
        2,
        "InvalidateUser forgot it"
    );
    broker.stop().await;
}

#[tokio::test]
async fn an_idp_failure_is_idp_unavailable_and_releases_nothing() {
    let broker = refreshing_broker().await;
    broker
        .emulator
        .inject_faults(Endpoint::IdpToken, vec![Fault::Status(503); 3]);
    let status = broker
        .get_with(google_request(seed::STALE_GOOGLE_USER, None))
        .await
        .expect_err("no token");
    assert_reason(&status, Code::Unavailable, "IDP_UNAVAILABLE");
    assert!(!status.message().contains(seed::STALE_GOOGLE_ACCESS_TOKEN));
    broker.stop().await;
}

#[tokio::test]
async fn without_a_refresh_path_a_dead_token_is_token_expired() {
    let broker = TestBroker::start().await; // no connections file: nothing is refreshed
    let status = broker
        .get_with(google_request(seed::STALE_GOOGLE_USER, None))
        .await
        .expect_err("a dead token is never released as fine");
    assert_reason(&status, Code::FailedPrecondition, "TOKEN_EXPIRED");
    // Without expires_in the age is unknown: released, with no expiry claimed.
    let unknown = broker
        .get_with(google_request(seed::NO_EXPIRY_GOOGLE_USER, None))
        .await
        .expect("unknown expiry");
    assert_eq!(unknown.access_token, seed::NO_EXPIRY_GOOGLE_ACCESS_TOKEN);
    assert!(unknown.expires_at.is_none());
    broker.stop().await;
}

#[tokio::test]
async fn list_returns_the_usable_tokens_and_names_the_others() {
    let broker = refreshing_broker().await;
    broker.emulator.upsert_user(json!({
        "user_id": "auth0|mixed",
        "last_login": humantime::format_rfc3339_millis(
            SystemTime::now() - Duration::from_secs(3 * 3600)).to_string(),
        "identities": [
            {"provider": "github", "connection": "github", "user_id": 42, "access_token": "gho_mixed"},
            {"provider": GOOGLE, "connection": GOOGLE, "user_id": "mixed", "access_token": "ya29.dead",
             "expires_in": 3599, "refresh_token": seed::REVOKED_GOOGLE_REFRESH_TOKEN},
        ],
    }));
    let mut client = broker.client().await;
    let request = ListIdpTokensRequest {
        user_id: "auth0|mixed".to_owned(),
        ..Default::default()
    };
    let response = bounded("ListIdpTokens", client.list_idp_tokens(request))
        .await
        .expect("listed")
        .into_inner();
    assert_eq!(response.tokens.len(), 1);
    assert_eq!(response.tokens[0].access_token, "gho_mixed");
    assert_eq!(response.unavailable.len(), 1);
    assert_eq!(response.unavailable[0].provider, GOOGLE);
    assert_eq!(response.unavailable[0].reason, "USER_MUST_RECONNECT");
    broker.stop().await;
}

#[tokio::test]
async fn a_reloaded_connections_file_turns_refreshes_on_and_a_broken_one_is_ignored() {
    let broker = TestBroker::start_with(Options {
        connections: Some(TestConnections {
            refreshed_at_idp: Vec::new(),
            not_refreshed: vec![GOOGLE],
            token_vault: Vec::new(),
        }),
        ..Options::default()
    })
    .await;
    let status = broker
        .get_with(google_request(seed::STALE_GOOGLE_USER, None))
        .await
        .expect_err("not refreshed yet");
    assert_reason(&status, Code::FailedPrecondition, "TOKEN_EXPIRED");
    write_connections(
        &broker.connections_path,
        &TestConnections {
            refreshed_at_idp: vec![GOOGLE],
            not_refreshed: Vec::new(),
            token_vault: Vec::new(),
        },
        &broker.emulator,
    );
    // The refresh token is only kept from profiles read after the reload.
    let refreshed = eventually(Duration::from_secs(10), async || {
        let _ = broker.invalidate(seed::STALE_GOOGLE_USER).await;
        broker
            .get_with(google_request(seed::STALE_GOOGLE_USER, None))
            .await
            .is_ok()
    })
    .await;
    assert!(refreshed, "the new connections file was never applied");
    tokenbroker::pki::write_file(
        &broker.connections_path,
        "[[connection]]\nbogus = 1\n",
        false,
    )
    .expect("write");
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker
        .invalidate(seed::STALE_GOOGLE_USER)
        .await
        .expect("invalidated");
    broker
        .get_with(google_request(seed::STALE_GOOGLE_USER, None))
        .await
        .expect("a broken connections file keeps the previous one");
    broker.stop().await;
}
