//! `private_key_jwt` and Auth0 Token Vault, over real mTLS against the
//! emulator: the broker authenticates with a client assertion and no secret
//! (and the emulated tenant holds assertions to Auth0's rules), a rotated
//! key is used without a restart, and a `source = "token-vault"` connection
//! releases the token Token Vault holds, kept and shared, with every refusal
//! a program can act on.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokenbroker::emulator::keys::{
    CLIENT_ASSERTION_KEY_1, CLIENT_ASSERTION_KEY_2, CLIENT_ASSERTION_KEY_3,
};
use tokenbroker::emulator::{seed, Emulator, Endpoint, Fault};
use tokenbroker::proto::{GetIdpTokenRequest, IdpToken, TokenSource};
use tokenbroker::testkit::Credentials;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::support::{
    bounded, eventually, get_on, get_request, public_key_pem, Options, TestBroker, TestConnections,
    CLIENT_ID, CLIENT_SECRET,
};

const CREDENTIALS: Credentials<'static> = Credentials {
    client_id: CLIENT_ID,
    client_secret: CLIENT_SECRET,
};

/// The connections file of the Token Vault tests: the seeded vault
/// connection's tokens come from Token Vault.
fn vault_connections() -> TestConnections {
    TestConnections {
        token_vault: vec![seed::TOKEN_VAULT_CONNECTION],
        ..TestConnections::default()
    }
}

/// A broker authenticating with `private_key_jwt` (key 1) whose vault
/// connection is `source = "token-vault"`.
async fn vault_broker() -> TestBroker {
    TestBroker::start_with(Options {
        assertion_key: Some(CLIENT_ASSERTION_KEY_1),
        connections: Some(vault_connections()),
        ..Default::default()
    })
    .await
}

/// `GetIdpToken` for the seeded vault user.
fn vault_request() -> GetIdpTokenRequest {
    get_request(seed::VAULT_USER, "google-oauth2")
}

/// [`vault_request`] asking for a token that lives `min_valid_for`.
fn vault_request_for(min_valid_for: Duration) -> GetIdpTokenRequest {
    GetIdpTokenRequest {
        min_valid_for: Some(prost_types::Duration::try_from(min_valid_for).expect("duration")),
        ..vault_request()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// How far `at` is from `expected`, in seconds.
fn seconds_off(at: &prost_types::Timestamp, expected: SystemTime) -> i64 {
    let expected = prost_types::Timestamp::from(expected);
    (at.seconds - expected.seconds).abs()
}

/// The reason and metadata of the `google.rpc.ErrorInfo` of `status`.
fn error_info(status: &Status) -> (String, Option<String>, Option<String>) {
    let info = status.get_details_error_info().expect("ErrorInfo attached");
    assert_eq!(info.domain, "tokenbroker");
    let meta = |key: &str| info.metadata.get(key).cloned();
    (info.reason.clone(), meta("provider"), meta("connection"))
}

/// Expects `result` to be refused with `code` and `reason`; returns the status.
fn refused(result: Result<IdpToken, Status>, code: Code, reason: &str) -> Status {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(error_info(&status).0, reason, "{status:?}");
    for secret in seed::planted_secrets() {
        assert!(!status.message().contains(secret), "{status:?}");
    }
    status
}

/// Expects USER_MUST_RECONNECT naming the vault identity's provider and connection.
fn must_reconnect(result: Result<IdpToken, Status>) {
    let status = refused(result, Code::FailedPrecondition, "USER_MUST_RECONNECT");
    let (_, provider, connection) = error_info(&status);
    assert_eq!(provider.as_deref(), Some("google-oauth2"));
    assert_eq!(connection.as_deref(), Some(seed::TOKEN_VAULT_CONNECTION));
}

// ---- private_key_jwt --------------------------------------------------------------------------

/// A client assertion of the test client for the emulator at `base_url`,
/// signed with `pem`, with `change` applied to its claims.
fn assertion(pem: &str, base_url: &str, change: impl FnOnce(&mut serde_json::Value)) -> String {
    let now = now_secs();
    let mut claims = serde_json::json!({
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "aud": format!("{base_url}/"),
        "iat": now,
        "exp": now + 60,
        "jti": format!("test-jti-{}", rand_suffix()),
    });
    change(&mut claims);
    let key = EncodingKey::from_rsa_pem(pem.as_bytes()).expect("fixture key");
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key).expect("signs")
}

/// A change to an assertion's claims, to build one the tenant must refuse.
type ClaimsChange<'a> = Box<dyn FnOnce(&mut serde_json::Value) + 'a>;

fn rand_suffix() -> u64 {
    rand::random()
}

/// Posts a client-credentials grant authenticated by `assertion`; returns the status.
async fn grant_with(emulator: &Emulator, assertion: &str) -> u16 {
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT_ID),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion),
        ("audience", &emulator.audience()),
    ];
    let response = bounded(
        "token grant",
        reqwest::Client::new()
            .post(format!("{}/oauth/token", emulator.base_url()))
            .form(&form)
            .send(),
    )
    .await
    .expect("emulator answers");
    response.status().as_u16()
}

#[tokio::test]
async fn the_broker_authenticates_with_a_client_assertion_and_no_secret() {
    let broker = TestBroker::start_with(Options {
        assertion_key: Some(CLIENT_ASSERTION_KEY_1),
        ..Default::default()
    })
    .await;
    let token = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("a token, with the Management token got by assertion");
    assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
    // The tenant takes no secret from this client any more: the broker sent none.
    let with_secret = bounded(
        "secret grant",
        reqwest::Client::new()
            .post(format!("{}/oauth/token", broker.emulator.base_url()))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
                ("audience", &broker.emulator.audience()),
            ])
            .send(),
    )
    .await
    .expect("emulator answers");
    assert_eq!(with_secret.status().as_u16(), 401);
}

#[tokio::test]
async fn the_tenant_refuses_a_replayed_a_misaddressed_an_expired_or_a_foreign_assertion() {
    let emulator = CREDENTIALS.start_emulator().await.expect("emulator");
    emulator
        .set_client_assertion_keys(&[&public_key_pem(CLIENT_ASSERTION_KEY_1)])
        .expect("key registers");
    let base = emulator.base_url();
    let good = assertion(CLIENT_ASSERTION_KEY_1, &base, |_| {});
    assert_eq!(grant_with(&emulator, &good).await, 200);
    assert_eq!(grant_with(&emulator, &good).await, 401, "a replayed jti");
    let cases: [(&str, ClaimsChange<'_>); 4] = [
        (
            "aud without the trailing slash",
            Box::new(|claims| claims["aud"] = base.clone().into()),
        ),
        (
            "aud of the token endpoint",
            Box::new(|claims| claims["aud"] = format!("{base}/oauth/token").into()),
        ),
        (
            "expired",
            Box::new(|claims| {
                claims["iat"] = (now_secs() - 120).into();
                claims["exp"] = (now_secs() - 60).into();
            }),
        ),
        (
            "iss of another client",
            Box::new(|claims| claims["iss"] = "another-client".into()),
        ),
    ];
    for (what, change) in cases {
        let refused = assertion(CLIENT_ASSERTION_KEY_1, &base, change);
        assert_eq!(grant_with(&emulator, &refused).await, 401, "{what}");
    }
    let foreign = assertion(CLIENT_ASSERTION_KEY_3, &base, |_| {});
    assert_eq!(
        grant_with(&emulator, &foreign).await,
        401,
        "an unregistered key"
    );
}

#[tokio::test]
async fn a_rotated_assertion_key_is_used_without_restart() {
    let broker = TestBroker::start_with(Options {
        assertion_key: Some(CLIENT_ASSERTION_KEY_1),
        ..Default::default()
    })
    .await;
    broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("served with key 1");
    // The tenant now knows only key 2, and the broker's file holds it.
    broker
        .emulator
        .set_client_assertion_keys(&[&public_key_pem(CLIENT_ASSERTION_KEY_2)])
        .expect("key registers");
    let key_path = broker.assertion_key_path.clone().expect("a key file");
    std::fs::write(&key_path, CLIENT_ASSERTION_KEY_2).expect("rotate the key file");
    // Each try needs a new Management token, so a new client assertion.
    let served = eventually(Duration::from_secs(10), async || {
        broker.emulator.revoke_management_tokens();
        broker.get(seed::GOOGLE_USER, "google-oauth2").await.is_ok()
    })
    .await;
    assert!(served, "the rotated key signs the broker's assertions");
    // A bad new file keeps the key in force.
    std::fs::write(&key_path, "not a key").expect("break the key file");
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.emulator.revoke_management_tokens();
    broker
        .get(seed::TWITTER_USER, "twitter")
        .await
        .expect("key 2 still signs");
}

// ---- Token Vault ------------------------------------------------------------------------------

#[tokio::test]
async fn a_token_vault_connection_releases_the_exchanged_token_with_its_exact_expiry() {
    let broker = vault_broker().await;
    let planted =
        broker
            .emulator
            .put_token_vault_set(seed::VAULT_USER, seed::TOKEN_VAULT_CONNECTION, 1800);
    let before = SystemTime::now();
    let token = broker.get_with(vault_request()).await.expect("released");
    assert_eq!(token.access_token, planted);
    assert_eq!(token.source, TokenSource::TokenVault as i32);
    assert_eq!(token.connection, seed::TOKEN_VAULT_CONNECTION);
    assert_eq!(token.idp_user_id, seed::VAULT_IDP_USER_ID);
    let scopes: Vec<&str> = seed::IDP_SCOPE.split_whitespace().collect();
    assert_eq!(token.scopes, scopes);
    let expires_at = token.expires_at.expect("an exact expiry");
    assert!(
        seconds_off(&expires_at, before + Duration::from_secs(1800)) <= 2,
        "expires_at is the exchange time plus Auth0's expires_in: {expires_at:?}"
    );
    assert!(!token.from_cache);
    assert_eq!(broker.emulator.calls().token_exchange, 1);
    let again = broker.get_with(vault_request()).await.expect("released");
    assert_eq!(again.access_token, planted);
    assert!(again.from_cache, "kept from the first exchange");
    assert_eq!(again.expires_at, token.expires_at);
    assert_eq!(broker.emulator.calls().token_exchange, 1);
}

#[tokio::test]
async fn twenty_concurrent_needs_share_one_exchange() {
    let broker = vault_broker().await;
    let channel = broker
        .channel_with(Some(&broker.client_cert), &broker.ca.cert_pem)
        .await
        .expect("channel");
    broker.emulator.set_latency(Duration::from_millis(200));
    let needs = (0..20).map(|_| {
        let mut client =
            tokenbroker::proto::token_broker_client::TokenBrokerClient::new(channel.clone());
        async move { get_on(&mut client, vault_request()).await }
    });
    let tokens = futures::future::join_all(needs).await;
    for token in tokens {
        assert_eq!(
            token.expect("released").access_token,
            seed::VAULT_ACCESS_TOKEN
        );
    }
    assert_eq!(broker.emulator.calls().token_exchange, 1);
}

#[tokio::test]
async fn a_kept_token_serves_while_usable_and_a_longer_need_exchanges_again() {
    let broker = vault_broker().await;
    let planted =
        broker
            .emulator
            .put_token_vault_set(seed::VAULT_USER, seed::TOKEN_VAULT_CONNECTION, 600);
    let first = broker
        .get_with(vault_request_for(Duration::from_secs(60)))
        .await
        .expect("released");
    let kept = broker
        .get_with(vault_request_for(Duration::from_secs(300)))
        .await
        .expect("released");
    assert!(kept.from_cache);
    assert_eq!(broker.emulator.calls().token_exchange, 1);
    // Past the kept token's expiry: exchanged again. Auth0 holds no
    // longer-lived token, so the broker releases the one it holds.
    let longer = broker
        .get_with(vault_request_for(Duration::from_secs(20 * 60)))
        .await
        .expect("released");
    assert_eq!(broker.emulator.calls().token_exchange, 2);
    assert!(!longer.from_cache);
    assert_eq!(longer.access_token, planted);
    assert_eq!(first.access_token, planted);
}

#[tokio::test]
async fn an_expired_token_set_is_refreshed_by_token_vault() {
    let broker = vault_broker().await;
    broker
        .emulator
        .expire_token_vault_set(seed::VAULT_USER, seed::TOKEN_VAULT_CONNECTION);
    let token = broker.get_with(vault_request()).await.expect("released");
    assert_ne!(token.access_token, seed::VAULT_ACCESS_TOKEN);
    assert!(token.access_token.starts_with("ya29.emu_vault_"));
}

#[tokio::test]
async fn no_token_set_means_the_user_must_reconnect() {
    let broker = vault_broker().await;
    broker
        .emulator
        .remove_token_vault_set(seed::VAULT_USER, seed::TOKEN_VAULT_CONNECTION);
    must_reconnect(broker.get_with(vault_request()).await);
}

#[tokio::test]
async fn a_failed_refresh_in_token_vault_means_the_user_must_reconnect() {
    let broker = vault_broker().await;
    let emulator = &broker.emulator;
    emulator.expire_token_vault_set(seed::VAULT_USER, seed::TOKEN_VAULT_CONNECTION);
    emulator.fail_token_vault_refresh(seed::VAULT_USER, seed::TOKEN_VAULT_CONNECTION, true);
    must_reconnect(broker.get_with(vault_request()).await);
}

#[tokio::test]
async fn a_refused_client_is_broker_misconfigured() {
    let broker = vault_broker().await;
    // The tenant no longer knows the Privileged Worker key: Auth0 refuses
    // the broker's subject token, not anything of the user.
    broker
        .emulator
        .set_token_vault_subject_keys(&[])
        .expect("keys cleared");
    let status = refused(
        broker.get_with(vault_request()).await,
        Code::FailedPrecondition,
        "BROKER_MISCONFIGURED",
    );
    assert!(status.message().contains("invalid_grant"), "{status:?}");
    let (_, provider, connection) = error_info(&status);
    assert_eq!(provider.as_deref(), Some("google-oauth2"));
    assert_eq!(connection.as_deref(), Some(seed::TOKEN_VAULT_CONNECTION));
    // An Auth0 401 about the client itself, told apart by its code.
    broker
        .emulator
        .inject_faults(Endpoint::TokenExchange, vec![Fault::Status(401)]);
    let status = refused(
        broker.get_with(vault_request()).await,
        Code::FailedPrecondition,
        "BROKER_MISCONFIGURED",
    );
    assert!(status.message().contains("access_denied"), "{status:?}");
}

#[tokio::test]
async fn auth0_throttling_or_failing_is_auth0_rate_limited_or_unavailable() {
    let broker = vault_broker().await;
    broker.emulator.inject_faults(
        Endpoint::TokenExchange,
        vec![Fault::RateLimited {
            retry_after: Some(30),
            reset_in_secs: 30,
        }],
    );
    let status = refused(
        broker.get_with(vault_request()).await,
        Code::Unavailable,
        "AUTH0_RATE_LIMITED",
    );
    let retry = status.get_details_retry_info().expect("RetryInfo");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(30)));
    broker
        .emulator
        .inject_faults(Endpoint::TokenExchange, vec![Fault::Status(503); 3]);
    refused(
        broker.get_with(vault_request()).await,
        Code::Unavailable,
        "AUTH0_UNAVAILABLE",
    );
    assert_eq!(broker.emulator.calls().token_exchange, 4, "503s retried");
    broker
        .get_with(vault_request())
        .await
        .expect("served once Auth0 is back");
}

#[tokio::test]
async fn invalidate_user_and_bypass_cache_drop_the_kept_exchange() {
    let broker = vault_broker().await;
    broker.get_with(vault_request()).await.expect("released");
    broker
        .invalidate(seed::VAULT_USER)
        .await
        .expect("invalidated");
    let after = broker.get_with(vault_request()).await.expect("released");
    assert!(!after.from_cache);
    assert_eq!(broker.emulator.calls().token_exchange, 2);
    let bypass = GetIdpTokenRequest {
        bypass_cache: true,
        ..vault_request()
    };
    broker.get_with(bypass).await.expect("released");
    assert_eq!(broker.emulator.calls().token_exchange, 3);
}

#[tokio::test]
async fn a_management_api_connection_without_a_token_hints_at_token_vault() {
    let broker = TestBroker::start().await;
    let status = refused(
        broker.get(seed::SWITCHED_USER, "github").await,
        Code::FailedPrecondition,
        "TOKEN_NOT_STORED",
    );
    assert!(status.message().contains("Token Vault"), "{status:?}");
    assert!(
        status.message().contains(r#"source = "token-vault""#),
        "{status:?}"
    );
    assert_eq!(error_info(&status).2.as_deref(), Some("github"));
    // A database identity never carries a token: no hint there.
    let status = refused(
        broker.get(seed::DATABASE_USER, "auth0").await,
        Code::FailedPrecondition,
        "TOKEN_NOT_STORED",
    );
    assert!(!status.message().contains("Token Vault"), "{status:?}");
    // Without a connections file the vault user's connection reads the
    // profile like any other: the same hint.
    let status = refused(
        broker.get_with(vault_request()).await,
        Code::FailedPrecondition,
        "TOKEN_NOT_STORED",
    );
    assert!(status.message().contains("google-vault"), "{status:?}");
}

#[tokio::test]
async fn list_idp_tokens_releases_token_vault_tokens_and_lists_those_it_cannot_get() {
    let broker = vault_broker().await;
    let tokens = broker.list(seed::VAULT_USER).await.expect("listed");
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].access_token, seed::VAULT_ACCESS_TOKEN);
    assert_eq!(tokens[0].source, TokenSource::TokenVault as i32);
    broker
        .invalidate(seed::VAULT_USER)
        .await
        .expect("invalidated");
    broker
        .emulator
        .remove_token_vault_set(seed::VAULT_USER, seed::TOKEN_VAULT_CONNECTION);
    let request = tokenbroker::proto::ListIdpTokensRequest {
        user_id: seed::VAULT_USER.to_owned(),
        ..Default::default()
    };
    let listed = bounded(
        "ListIdpTokens",
        broker.client().await.list_idp_tokens(request),
    )
    .await
    .expect("listed")
    .into_inner();
    assert!(listed.tokens.is_empty());
    assert_eq!(listed.unavailable.len(), 1);
    assert_eq!(
        listed.unavailable[0].connection,
        seed::TOKEN_VAULT_CONNECTION
    );
    assert_eq!(listed.unavailable[0].reason, "USER_MUST_RECONNECT");
}
