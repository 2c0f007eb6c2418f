//! [`IdpRefresher`] against the emulated IdP over loopback: what it returns,
//! how often it asks the IdP, and what it never shows.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use super::*;
use crate::emulator::{seed, Emulator, EmulatorConfig, Endpoint, Fault};

/// The OAuth client to refresh as at the emulated IdP.
fn idp_client(emulator: &Emulator) -> IdpClient {
    IdpClient {
        token_url: emulator.idp_token_url(),
        client_id: emulator.idp_client_id(),
        client_secret: emulator.idp_client_secret(),
    }
}

const CONNECTION: &str = "google-oauth2";
/// What most tests ask for: a token good for another minute.
const A_MINUTE: Duration = Duration::from_secs(60);

async fn emulator() -> Emulator {
    Emulator::start(EmulatorConfig::new("auth0-client", "auth0-secret"))
        .await
        .expect("emulator starts")
}

fn refresher_with(settings: IdpSettings) -> IdpRefresher {
    IdpRefresher::new(settings).expect("refresher builds")
}

fn refresher() -> IdpRefresher {
    refresher_with(IdpSettings::default())
}

fn key(user_id: &str) -> TokenKey {
    TokenKey {
        user_id: user_id.to_owned(),
        connection: CONNECTION.to_owned(),
    }
}

fn secret(text: &str) -> SecretString {
    SecretString::from(text.to_owned())
}

/// A token for `user_id` refreshed with `refresh_token`, good for `min_valid_for`.
async fn token_for(
    refresher: &IdpRefresher,
    emu: &Emulator,
    user_id: &str,
    refresh_token: &str,
    min_valid_for: Duration,
) -> Result<Arc<Refreshed>, IdpError> {
    let client = idp_client(emu);
    let refresh_token = secret(refresh_token);
    refresher
        .token(&key(user_id), &refresh_token, &client, min_valid_for, None)
        .await
}

/// A token for the stale user, whose refresh token the IdP honours.
async fn stale_user_token(
    refresher: &IdpRefresher,
    emu: &Emulator,
    min_valid_for: Duration,
) -> Result<Arc<Refreshed>, IdpError> {
    let user = seed::STALE_GOOGLE_USER;
    token_for(
        refresher,
        emu,
        user,
        seed::STALE_GOOGLE_REFRESH_TOKEN,
        min_valid_for,
    )
    .await
}

async fn revoked_user_token(
    refresher: &IdpRefresher,
    emu: &Emulator,
) -> Result<Arc<Refreshed>, IdpError> {
    let user = seed::REVOKED_GOOGLE_USER;
    token_for(
        refresher,
        emu,
        user,
        seed::REVOKED_GOOGLE_REFRESH_TOKEN,
        A_MINUTE,
    )
    .await
}

fn idp_calls(emu: &Emulator) -> u64 {
    emu.calls().idp_token
}

/// Asserts `text` shows none of the planted secrets nor `extra` ones.
fn assert_no_secret(text: &str, extra: &[&str]) {
    for secret in seed::planted_secrets().iter().chain(extra) {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
}

#[tokio::test]
async fn a_refresh_gives_the_idps_token_with_its_exact_expiry_and_scopes() {
    let emu = emulator().await;
    let refresher = refresher();
    let before = SystemTime::now();
    let token = stale_user_token(&refresher, &emu, A_MINUTE)
        .await
        .expect("refreshed");
    let after = SystemTime::now();

    assert!(token.issued_at >= before && token.issued_at <= after);
    assert_eq!(
        token.expires_at,
        token.issued_at + Duration::from_secs(seed::GOOGLE_EXPIRES_IN),
        "issue time plus expires_in, not rounded"
    );
    let expected: Vec<&str> = seed::IDP_SCOPE.split(' ').collect();
    assert_eq!(token.scopes, expected);
    let access_token = token.access_token.expose_secret();
    assert!(
        access_token.starts_with("ya29.emu_"),
        "the IdP's, not Auth0's"
    );
    assert_ne!(access_token, seed::STALE_GOOGLE_ACCESS_TOKEN);

    let again = stale_user_token(&refresher, &emu, A_MINUTE)
        .await
        .expect("kept");
    assert_eq!(again.access_token.expose_secret(), access_token);
    assert_eq!(
        idp_calls(&emu),
        1,
        "the kept token is served without asking"
    );
}

#[tokio::test]
async fn fifty_concurrent_needs_make_one_idp_call() {
    let emu = emulator().await;
    // Slow enough that every need arrives while the first refresh is under way.
    emu.inject_faults(
        Endpoint::IdpToken,
        vec![Fault::Delay(Duration::from_millis(300))],
    );
    let refresher = refresher();
    let needs = (0..50).map(|_| stale_user_token(&refresher, &emu, A_MINUTE));
    let tokens = futures::future::join_all(needs).await;

    let first = tokens[0]
        .as_ref()
        .expect("refreshed")
        .access_token
        .expose_secret()
        .to_owned();
    for token in &tokens {
        let token = token.as_ref().expect("every need is served");
        assert_eq!(token.access_token.expose_secret(), first);
    }
    assert_eq!(idp_calls(&emu), 1);
}

#[tokio::test]
async fn the_next_refresh_sends_the_rotated_refresh_token() {
    let emu = emulator().await;
    emu.set_idp_rotation(true);
    // Tokens shorter than asked for: every need refreshes.
    emu.set_idp_expires_in(30);
    let refresher = refresher();
    let first = stale_user_token(&refresher, &emu, A_MINUTE)
        .await
        .expect("first refresh");
    // The caller passes Auth0's refresh token again, which the IdP now refuses
    // (rotated away): only the rotated one can succeed.
    let second = stale_user_token(&refresher, &emu, A_MINUTE)
        .await
        .expect("second refresh");
    assert_ne!(
        first.access_token.expose_secret(),
        second.access_token.expose_secret()
    );
    assert_eq!(idp_calls(&emu), 2);

    let forgetful = refresher_with(IdpSettings::default());
    let refused = stale_user_token(&forgetful, &emu, A_MINUTE).await;
    assert_eq!(
        refused.unwrap_err(),
        IdpError::InvalidGrant,
        "the IdP refuses the original token, so the refresher did not send it"
    );
}

#[tokio::test]
async fn invalid_grant_is_remembered_until_the_user_is_forgotten() {
    let emu = emulator().await;
    let refresher = refresher();
    assert_eq!(
        revoked_user_token(&refresher, &emu).await.unwrap_err(),
        IdpError::InvalidGrant
    );
    assert_eq!(
        revoked_user_token(&refresher, &emu).await.unwrap_err(),
        IdpError::InvalidGrant
    );
    assert_eq!(idp_calls(&emu), 1, "the second refusal came from memory");

    refresher.forget_user(seed::REVOKED_GOOGLE_USER);
    assert_eq!(
        revoked_user_token(&refresher, &emu).await.unwrap_err(),
        IdpError::InvalidGrant
    );
    assert_eq!(idp_calls(&emu), 2, "forgotten: the IdP is asked again");
}

#[tokio::test]
async fn a_remembered_refusal_is_not_about_a_new_refresh_token() {
    let emu = emulator().await;
    let refresher = refresher();
    assert!(revoked_user_token(&refresher, &emu).await.is_err());
    // The user reconnected: Auth0's profile holds a new refresh token.
    emu.add_idp_refresh_token("1//reconnected");
    let user = seed::REVOKED_GOOGLE_USER;
    let token = token_for(&refresher, &emu, user, "1//reconnected", A_MINUTE).await;
    assert!(token.is_ok(), "{token:?}");
    assert_eq!(idp_calls(&emu), 2);
}

#[tokio::test]
async fn a_refusal_is_remembered_only_for_its_while() {
    let emu = emulator().await;
    let refresher = refresher_with(IdpSettings {
        invalid_grant_memory: Duration::from_millis(200),
        ..IdpSettings::default()
    });
    assert!(revoked_user_token(&refresher, &emu).await.is_err());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(revoked_user_token(&refresher, &emu).await.is_err());
    assert_eq!(idp_calls(&emu), 2);
}

#[tokio::test]
async fn forget_user_drops_kept_tokens_and_rotation_of_that_user_only() {
    let emu = emulator().await;
    emu.set_idp_rotation(true);
    let refresher = refresher();
    stale_user_token(&refresher, &emu, A_MINUTE)
        .await
        .expect("stale user");
    let fresh_user = seed::FRESH_GOOGLE_USER;
    let fresh_token = seed::FRESH_GOOGLE_REFRESH_TOKEN;
    token_for(&refresher, &emu, fresh_user, fresh_token, A_MINUTE)
        .await
        .expect("fresh user");
    assert_eq!(idp_calls(&emu), 2);

    refresher.forget_user(seed::STALE_GOOGLE_USER);
    let other = token_for(&refresher, &emu, fresh_user, fresh_token, A_MINUTE).await;
    assert!(other.is_ok());
    assert_eq!(idp_calls(&emu), 2, "the other user's token is still kept");
    // Its token and its rotation are gone: the refresher asks again with
    // Auth0's refresh token, which the IdP retired when it rotated it.
    let after = stale_user_token(&refresher, &emu, A_MINUTE).await;
    assert_eq!(after.unwrap_err(), IdpError::InvalidGrant);
    assert_eq!(idp_calls(&emu), 3);
}

#[tokio::test]
async fn idp_failures_are_unavailable_and_hold_no_token() {
    let emu = emulator().await;
    let refresher = refresher();
    let limited = Fault::RateLimited {
        retry_after: Some(0),
        reset_in_secs: 0,
    };
    emu.inject_faults(
        Endpoint::IdpToken,
        vec![limited, Fault::Status(503), Fault::Status(502)],
    );
    let error = stale_user_token(&refresher, &emu, A_MINUTE)
        .await
        .unwrap_err();
    assert!(matches!(error, IdpError::Unavailable { .. }), "{error}");
    assert_no_secret(&format!("{error} {error:?}"), &[]);
    assert_eq!(
        idp_calls(&emu),
        3,
        "429 and 5xx are retried, three attempts"
    );

    let token = stale_user_token(&refresher, &emu, A_MINUTE).await;
    assert!(token.is_ok(), "a failure is not remembered: {token:?}");
}

#[tokio::test]
async fn a_wrong_client_is_client_rejected_and_not_retried() {
    let emu = emulator().await;
    let refresher = refresher();
    let client = IdpClient {
        client_secret: secret("not-the-secret"),
        ..idp_client(&emu)
    };
    let refresh_token = secret(seed::STALE_GOOGLE_REFRESH_TOKEN);
    let key = key(seed::STALE_GOOGLE_USER);
    let error = refresher
        .token(&key, &refresh_token, &client, A_MINUTE, None)
        .await
        .unwrap_err();
    let expected = IdpError::ClientRejected {
        status: 401,
        code: "invalid_client".to_owned(),
    };
    assert_eq!(error, expected);
    assert_eq!(idp_calls(&emu), 1);
    assert_no_secret(&error.to_string(), &["not-the-secret"]);
}

#[tokio::test]
async fn an_oversized_body_is_unavailable_and_not_read_whole() {
    let emu = emulator().await;
    let refresher = refresher();
    // Large beside what socket buffers take, so a body read whole shows.
    let bytes = 64 * 1024 * 1024;
    let huge = Fault::HugeBody {
        bytes,
        announced: false,
    };
    emu.inject_faults(Endpoint::IdpToken, vec![huge]);
    let error = stale_user_token(&refresher, &emu, A_MINUTE)
        .await
        .unwrap_err();
    assert!(matches!(error, IdpError::Unavailable { .. }), "{error}");
    assert_eq!(idp_calls(&emu), 1, "not retried");
    let sent = emu.huge_body_bytes_sent();
    assert!(
        sent < 16 * 1024 * 1024,
        "{sent} bytes of {bytes} went through"
    );
}

#[tokio::test]
async fn no_wait_or_attempt_starts_past_the_deadline() {
    let emu = emulator().await;
    let refresher = refresher();
    let client = idp_client(&emu);
    let refresh_token = secret(seed::STALE_GOOGLE_REFRESH_TOKEN);
    let key = key(seed::STALE_GOOGLE_USER);

    let passed = Some(Instant::now());
    let error = refresher
        .token(&key, &refresh_token, &client, A_MINUTE, passed)
        .await
        .unwrap_err();
    assert!(matches!(error, IdpError::Unavailable { .. }), "{error}");
    assert_eq!(idp_calls(&emu), 0, "no attempt past the deadline");

    let limited = Fault::RateLimited {
        retry_after: Some(5),
        reset_in_secs: 5,
    };
    emu.inject_faults(Endpoint::IdpToken, vec![limited]);
    let started = Instant::now();
    let deadline = Some(started + Duration::from_secs(1));
    let error = refresher
        .token(&key, &refresh_token, &client, A_MINUTE, deadline)
        .await
        .unwrap_err();
    assert_eq!(error.retry_after(), Some(Duration::from_secs(5)));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no wait past the deadline"
    );
    assert_eq!(idp_calls(&emu), 1);
}

#[tokio::test]
async fn a_hanging_idp_is_given_up_on_at_the_call_timeout() {
    let emu = emulator().await;
    let refresher = refresher_with(IdpSettings {
        call_timeout: Duration::from_millis(300),
        ..IdpSettings::default()
    });
    emu.inject_faults(
        Endpoint::IdpToken,
        vec![Fault::Delay(Duration::from_secs(3))],
    );
    let started = Instant::now();
    let error = stale_user_token(&refresher, &emu, A_MINUTE)
        .await
        .unwrap_err();
    assert!(matches!(error, IdpError::Unavailable { .. }), "{error}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert_eq!(idp_calls(&emu), 1);
}

#[tokio::test]
async fn a_need_longer_than_any_token_refreshes_once_and_takes_what_comes() {
    let emu = emulator().await;
    let refresher = refresher();
    let two_hours = Duration::from_secs(2 * 60 * 60);
    let token = stale_user_token(&refresher, &emu, two_hours)
        .await
        .expect("a token");
    assert!(
        token.expires_at < SystemTime::now() + two_hours,
        "shorter than asked"
    );
    assert_eq!(idp_calls(&emu), 1, "one refresh, no loop");
}

#[tokio::test]
async fn no_public_type_or_error_shows_a_secret() {
    let emu = emulator().await;
    emu.set_idp_rotation(true);
    let refresher = refresher();
    let token = stale_user_token(&refresher, &emu, A_MINUTE)
        .await
        .expect("refreshed");
    let issued = token.access_token.expose_secret().to_owned();
    let revoked = revoked_user_token(&refresher, &emu).await.unwrap_err();
    let shown = [
        format!("{token:?}"),
        format!("{:?}", idp_client(&emu)),
        format!("{:?}", key(seed::STALE_GOOGLE_USER)),
        format!("{refresher:?}"),
        format!("{revoked} {revoked:?}"),
        format!("{:?}", IdpSettings::default()),
    ];
    for text in shown {
        assert_no_secret(&text, &[&issued]);
    }
}

#[tokio::test]
async fn a_refresh_under_way_when_the_user_is_forgotten_keeps_nothing() {
    let emu = emulator().await;
    emu.inject_faults(
        Endpoint::IdpToken,
        vec![Fault::Delay(Duration::from_millis(300))],
    );
    let refresher = refresher();
    let under_way = stale_user_token(&refresher, &emu, A_MINUTE);
    let forget = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        refresher.forget_user(seed::STALE_GOOGLE_USER);
    };
    let (token, ()) = tokio::join!(under_way, forget);
    assert!(token.is_ok(), "its caller still gets the token: {token:?}");
    assert_eq!(idp_calls(&emu), 1);

    stale_user_token(&refresher, &emu, A_MINUTE)
        .await
        .expect("refreshed again");
    assert_eq!(
        idp_calls(&emu),
        2,
        "the token that landed after forget_user was not kept"
    );
}
