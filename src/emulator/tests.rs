//! Unit tests of the emulator, driven over real HTTP with reqwest.

use std::time::Duration;

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use reqwest::header::CONTENT_TYPE;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

use super::seed;
use super::{CallCounts, Emulator, EmulatorConfig, Endpoint, Fault};

const CLIENT_ID: &str = "test-client";
const CLIENT_SECRET: &str = "test-secret";

fn client() -> Client {
    Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client")
}

async fn emulator() -> Emulator {
    Emulator::start(EmulatorConfig::new(CLIENT_ID, CLIENT_SECRET))
        .await
        .expect("emulator starts")
}

fn form(emu: &Emulator, secret: &str) -> String {
    serde_urlencoded::to_string([
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT_ID),
        ("client_secret", secret),
        ("audience", emu.audience().as_str()),
    ])
    .expect("form encodes")
}

async fn post_form(emu: &Emulator, body: String) -> reqwest::Response {
    client()
        .post(format!("{}/oauth/token", emu.base_url()))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("token request")
}

async fn management_token(emu: &Emulator) -> String {
    let response = post_form(emu, form(emu, CLIENT_SECRET)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    body["access_token"].as_str().expect("token").to_owned()
}

async fn get_user(emu: &Emulator, token: &str, user_id: &str, query: &str) -> reqwest::Response {
    let encoded = utf8_percent_encode(user_id, NON_ALPHANUMERIC);
    client()
        .get(format!("{}/api/v2/users/{encoded}{query}", emu.base_url()))
        .bearer_auth(token)
        .send()
        .await
        .expect("user request")
}

#[tokio::test]
async fn issues_token_for_form_body() {
    let emu = emulator().await;
    let response = post_form(&emu, form(&emu, CLIENT_SECRET)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 86_400);
    assert_eq!(body["scope"], "read:users read:user_idp_tokens");
    assert!(body["access_token"].as_str().is_some_and(|t| t.len() > 20));
    assert_eq!(emu.audience(), format!("{}/api/v2/", emu.base_url()));
}

#[tokio::test]
async fn issues_token_for_json_body() {
    let emu = emulator().await;
    emu.set_token_lifetime(Duration::from_secs(120));
    let body = json!({
        "grant_type": "client_credentials",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "audience": emu.audience(),
    });
    let response = client()
        .post(format!("{}/oauth/token", emu.base_url()))
        .json(&body)
        .send()
        .await
        .expect("token request");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["expires_in"], 120);
}

#[tokio::test]
async fn rejects_wrong_secret_grant_and_audience() {
    let emu = emulator().await;
    let response = post_form(&emu, form(&emu, "wrong")).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        body,
        json!({"error": "access_denied", "error_description": "Unauthorized"})
    );

    let bad_grant = form(&emu, CLIENT_SECRET).replace("client_credentials", "password");
    assert_eq!(
        post_form(&emu, bad_grant).await.status(),
        StatusCode::BAD_REQUEST
    );

    let bad_audience = serde_urlencoded::to_string([
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("audience", "https://login.example.com/api/v2/"),
    ])
    .expect("form encodes");
    let response = post_form(&emu, bad_audience).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        body["error_description"],
        "Service not enabled within domain: https://login.example.com/api/v2/"
    );
    assert_eq!(emu.calls().token, 3);
}

#[tokio::test]
async fn fetches_user_with_encoded_odd_id() {
    let emu = emulator().await;
    let token = management_token(&emu).await;
    let response = get_user(&emu, &token, seed::ODD_ID_USER, "").await;
    assert_eq!(response.status(), StatusCode::OK);
    let user: Value = response.json().await.expect("json");
    assert_eq!(user["user_id"], seed::ODD_ID_USER);
    assert_eq!(
        user["identities"][0]["access_token"],
        seed::ODD_ID_ACCESS_TOKEN
    );
    assert_eq!(emu.user_calls_for(seed::ODD_ID_USER), 1);
    assert!(emu.seen_paths().iter().any(|p| p.contains("%2F")));
}

#[tokio::test]
async fn keeps_numeric_github_id_and_applies_fields() {
    let emu = emulator().await;
    let token = management_token(&emu).await;
    let query = "?fields=user_id,identities&include_fields=true";
    let user: Value = get_user(&emu, &token, seed::GITHUB_USER, query)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        user["identities"][0]["user_id"],
        json!(seed::GITHUB_IDP_USER_ID)
    );
    assert!(user["identities"][0]["user_id"].is_u64());
    let keys: Vec<&String> = user.as_object().expect("object").keys().collect();
    assert_eq!(keys.len(), 2);

    let query = "?fields=identities&include_fields=false";
    let user: Value = get_user(&emu, &token, seed::GITHUB_USER, query)
        .await
        .json()
        .await
        .expect("json");
    assert!(user.get("identities").is_none());
    assert_eq!(user["email"], "octo@example.com");
}

#[tokio::test]
async fn strips_idp_tokens_without_scope() {
    let emu = emulator().await;
    emu.set_scope("read:users");
    let token = management_token(&emu).await;
    let response = get_user(&emu, &token, seed::LINKED_USER, "").await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.expect("body");
    for secret in seed::planted_secrets() {
        assert!(!text.contains(secret), "{secret} leaked");
    }
    let user: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(user["identities"].as_array().map(Vec::len), Some(4));

    emu.set_scope("read:clients");
    let token = management_token(&emu).await;
    let response = get_user(&emu, &token, seed::LINKED_USER, "").await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn rejects_bad_expired_and_revoked_tokens() {
    let emu = emulator().await;
    let response = get_user(&emu, "nope", seed::GITHUB_USER, "").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let token = management_token(&emu).await;
    emu.expire_management_tokens();
    let body: Value = get_user(&emu, &token, seed::GITHUB_USER, "")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["message"], "Expired token");
    let token = management_token(&emu).await;
    emu.revoke_management_tokens();
    let body: Value = get_user(&emu, &token, seed::GITHUB_USER, "")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["message"], "Invalid token");
    assert_eq!(body["errorCode"], "invalid_token");
}

#[tokio::test]
async fn unknown_user_is_404_and_path_tricks_hit_fallback() {
    let emu = emulator().await;
    let token = management_token(&emu).await;
    let response = get_user(&emu, &token, "../clients", "").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["errorCode"], "inexistent_user");

    for path in ["/api/v2/clients", "/api/v2/users/a/b", "/api/v2/users/"] {
        let response = client()
            .get(format!("{}{path}", emu.base_url()))
            .bearer_auth(&token)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
    let response = client()
        .get(format!("{}/oauth/token", emu.base_url()))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        emu.calls(),
        CallCounts {
            token: 1,
            users: 1,
            jwks: 0,
            other: 4,
            idp_token: 0,
            token_exchange: 0,
        }
    );
    assert_eq!(emu.seen_paths().len(), 6);
}

#[tokio::test]
async fn faults_are_served_in_order_then_normal() {
    let emu = emulator().await;
    emu.inject_faults(
        Endpoint::Token,
        vec![
            Fault::RateLimited {
                retry_after: Some(2),
                reset_in_secs: 5,
            },
            Fault::Status(503),
            Fault::Delay(Duration::from_millis(10)),
        ],
    );
    let response = post_form(&emu, form(&emu, CLIENT_SECRET)).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "2");
    assert_eq!(response.headers()["x-ratelimit-remaining"], "0");
    assert!(response.headers().contains_key("x-ratelimit-reset"));
    let response = post_form(&emu, form(&emu, CLIENT_SECRET)).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    management_token(&emu).await;
    management_token(&emu).await;
    assert_eq!(emu.calls().token, 4);
}

#[tokio::test]
async fn upsert_remove_and_shutdown() {
    let emu = emulator().await;
    let token = management_token(&emu).await;
    emu.upsert_user(json!({"user_id": "auth0|new", "identities": []}));
    assert_eq!(
        get_user(&emu, &token, "auth0|new", "").await.status(),
        StatusCode::OK
    );
    emu.remove_user("auth0|new");
    assert_eq!(
        get_user(&emu, &token, "auth0|new", "").await.status(),
        StatusCode::NOT_FOUND
    );

    let base_url = emu.base_url();
    emu.shutdown().await;
    let result = client().get(format!("{base_url}/oauth/token")).send().await;
    assert!(result.is_err(), "connection refused after shutdown");
}

#[tokio::test]
async fn raw_dot_dot_path_reaches_only_the_fallback() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emu = emulator().await;
    let addr = emu.base_url().trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let request = format!(
        "GET /api/v2/users/../clients HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert_eq!(
        emu.calls(),
        CallCounts {
            token: 0,
            users: 0,
            jwks: 0,
            other: 1,
            idp_token: 0,
            token_exchange: 0,
        }
    );
    assert_eq!(
        emu.seen_paths(),
        vec!["/api/v2/users/../clients".to_owned()]
    );
}

#[tokio::test]
async fn latency_slows_answers_and_drop_stops_the_server() {
    let emu = emulator().await;
    emu.set_latency(Duration::from_millis(200));
    let started = std::time::Instant::now();
    management_token(&emu).await;
    assert!(started.elapsed() >= Duration::from_millis(200));

    let base_url = emu.base_url();
    drop(emu);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let result = client().get(format!("{base_url}/")).send().await;
    assert!(result.is_err(), "connection refused after drop");
}

// ---------------------------------------------------------------------------------------------
// JWKS, key rotation and ID tokens
// ---------------------------------------------------------------------------------------------

async fn get_jwks(emu: &Emulator) -> reqwest::Response {
    client()
        .get(format!("{}/.well-known/jwks.json", emu.base_url()))
        .send()
        .await
        .expect("jwks request")
}

async fn jwks(emu: &Emulator) -> jsonwebtoken::jwk::JwkSet {
    let response = get_jwks(emu).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("a JWK set")
}

fn kids(jwks: &jsonwebtoken::jwk::JwkSet) -> Vec<String> {
    let kid = |jwk: &jsonwebtoken::jwk::Jwk| jwk.common.key_id.clone().expect("kid");
    jwks.keys.iter().map(kid).collect()
}

/// Decodes a token's segment without verifying anything.
fn segment(token: &str, index: usize) -> Value {
    use base64::Engine;
    let part = token.split('.').nth(index).expect("segment");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("json")
}

/// Verifies `token` with the published JWK of its `kid`, with jsonwebtoken alone.
fn verify_with_published_key(
    emu: &Emulator,
    jwks: &jsonwebtoken::jwk::JwkSet,
    token: &str,
) -> Result<Value, jsonwebtoken::errors::Error> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let kid = segment(token, 0)["kid"].as_str().expect("kid").to_owned();
    let jwk = jwks.find(&kid).expect("the token's key is published");
    let key = DecodingKey::from_jwk(jwk).expect("usable JWK");
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[emu.id_token_audience()]);
    validation.set_issuer(&[format!("{}/", emu.base_url())]);
    jsonwebtoken::decode::<Value>(token, &key, &validation).map(|data| data.claims)
}

#[tokio::test]
async fn jwks_publishes_only_the_first_key_at_start_and_is_counted() {
    let emu = emulator().await;
    let response = get_jwks(&emu).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    let keys = body["keys"].as_array().expect("keys array");
    assert_eq!(keys.len(), 1);
    let key = &keys[0];
    assert_eq!(key["kid"], "dev-signing-1");
    assert_eq!(key["kty"], "RSA");
    assert_eq!(key["use"], "sig");
    assert_eq!(key["alg"], "RS256");
    assert_eq!(key["e"], "AQAB", "65537, without leading zeros");
    assert!(
        key["n"].as_str().is_some_and(|n| n.len() > 300),
        "2048-bit n"
    );
    assert_eq!(emu.calls().jwks, 1);
    assert_eq!(emu.signing_key_id(), "dev-signing-1");
}

#[tokio::test]
async fn each_published_jwk_verifies_tokens_signed_by_its_key() {
    let emu = emulator().await;
    for round in 0..3 {
        let token = emu.issue_id_token(seed::GITHUB_USER);
        let claims = verify_with_published_key(&emu, &jwks(&emu).await, &token)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(claims["sub"], seed::GITHUB_USER);
        emu.rotate_signing_key();
        emu.revoke_previous_signing_key();
    }
}

#[tokio::test]
async fn issued_id_token_looks_like_auth0s() {
    let emu = emulator().await;
    let token = emu.issue_id_token(seed::GOOGLE_USER);
    let header = segment(&token, 0);
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["kid"], "dev-signing-1");
    let claims = segment(&token, 1);
    assert_eq!(claims["iss"], format!("{}/", emu.base_url()));
    assert_eq!(claims["aud"], seed::DEFAULT_ID_TOKEN_AUDIENCE);
    assert_eq!(claims["sub"], seed::GOOGLE_USER);
    let iat = claims["iat"].as_i64().expect("iat");
    assert_eq!(claims["exp"].as_i64(), Some(iat + 3600));
    assert!(claims.get("nbf").is_none());
}

#[tokio::test]
async fn rotation_publishes_previous_and_new_key_and_wraps_after_the_third() {
    let emu = emulator().await;
    assert_eq!(emu.rotate_signing_key(), "dev-signing-2");
    assert_eq!(kids(&jwks(&emu).await), ["dev-signing-1", "dev-signing-2"]);
    let token = emu.issue_id_token(seed::GITHUB_USER);
    assert_eq!(segment(&token, 0)["kid"], "dev-signing-2");

    emu.revoke_previous_signing_key();
    assert_eq!(emu.published_key_ids(), ["dev-signing-2"]);
    assert_eq!(kids(&jwks(&emu).await), ["dev-signing-2"]);

    assert_eq!(emu.rotate_signing_key(), "dev-signing-3");
    assert_eq!(emu.rotate_signing_key(), "dev-signing-1", "wraps");
    assert_eq!(emu.published_key_ids(), ["dev-signing-3", "dev-signing-1"]);
}

#[tokio::test]
async fn forged_id_tokens_have_the_promised_shape() {
    use super::{IdTokenSpec, Signing};
    let emu = emulator().await;
    let published = jwks(&emu).await;
    let forge = |signing| {
        emu.issue_id_token_with(IdTokenSpec {
            signing,
            ..IdTokenSpec::for_user(seed::GITHUB_USER)
        })
    };

    let unpublished = forge(Signing::UnpublishedKey);
    assert_eq!(segment(&unpublished, 0)["kid"], "dev-signing-1");
    let error = verify_with_published_key(&emu, &published, &unpublished).expect_err("forged");
    assert_eq!(
        *error.kind(),
        jsonwebtoken::errors::ErrorKind::InvalidSignature
    );

    let hs256 = forge(Signing::Hs256WithPublicKey);
    assert_eq!(segment(&hs256, 0)["alg"], "HS256");

    let none = forge(Signing::AlgNone);
    assert_eq!(segment(&none, 0), json!({ "alg": "none", "typ": "JWT" }));
    assert!(none.ends_with('.'), "empty signature");
    assert_eq!(segment(&none, 1)["sub"], seed::GITHUB_USER);
}

#[tokio::test]
async fn jwks_faults_are_served_then_the_keys_again() {
    let emu = emulator().await;
    emu.inject_faults(Endpoint::Jwks, vec![Fault::Status(503)]);
    let response = get_jwks(&emu).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(kids(&jwks(&emu).await), ["dev-signing-1"]);
    assert_eq!(emu.calls().jwks, 2);
}

#[tokio::test]
async fn huge_body_fault_streams_its_length_with_or_without_content_length() {
    let emu = emulator().await;
    let bytes = 200_000;
    for announced in [true, false] {
        emu.inject_faults(Endpoint::Jwks, vec![Fault::HugeBody { bytes, announced }]);
        let response = get_jwks(&emu).await;
        assert_eq!(response.status(), StatusCode::OK);
        let length = response.content_length();
        assert_eq!(length.is_some(), announced, "{length:?}");
        let body = response.bytes().await.expect("body");
        assert_eq!(body.len() as u64, bytes);
        assert!(body.iter().all(u8::is_ascii_whitespace));
    }
    assert_eq!(emu.huge_body_bytes_sent(), 2 * bytes);
    emu.reset_counters();
    assert_eq!(emu.huge_body_bytes_sent(), 0);
}

// ---------------------------------------------------------------------------------------------
// The emulated IdP's token endpoint and the users seeded for refreshes
// ---------------------------------------------------------------------------------------------

/// A refresh-token request as the broker's OAuth client.
async fn refresh(emu: &Emulator, refresh_token: &str) -> reqwest::Response {
    refresh_as(
        emu,
        seed::IDP_CLIENT_ID,
        seed::IDP_CLIENT_SECRET,
        refresh_token,
    )
    .await
}

async fn refresh_as(
    emu: &Emulator,
    client_id: &str,
    client_secret: &str,
    refresh_token: &str,
) -> reqwest::Response {
    let body = serde_urlencoded::to_string([
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
        ("client_id", client_id),
        ("client_secret", client_secret),
    ])
    .expect("form encodes");
    post_idp(emu, body).await
}

async fn post_idp(emu: &Emulator, body: String) -> reqwest::Response {
    client()
        .post(emu.idp_token_url())
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("refresh request")
}

/// Status and JSON body of a refresh.
async fn refresh_answer(emu: &Emulator, refresh_token: &str) -> (StatusCode, Value) {
    let response = refresh(emu, refresh_token).await;
    let status = response.status();
    (status, response.json().await.expect("json"))
}

fn invalid_grant() -> Value {
    json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."})
}

#[tokio::test]
async fn idp_refresh_issues_a_new_google_token_on_every_call() {
    let emu = emulator().await;
    assert_eq!(
        emu.idp_token_url(),
        format!("{}/idp/google/token", emu.base_url())
    );
    let (status, first) = refresh_answer(&emu, seed::STALE_GOOGLE_REFRESH_TOKEN).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["expires_in"], 3599);
    assert_eq!(first["scope"], seed::IDP_SCOPE);
    assert_eq!(first["token_type"], "Bearer");
    assert!(first.get("refresh_token").is_none(), "no rotation at start");
    let (_, second) = refresh_answer(&emu, seed::STALE_GOOGLE_REFRESH_TOKEN).await;
    assert!(second["access_token"]
        .as_str()
        .is_some_and(|token| token.starts_with("ya29.") && token.len() > 20));
    assert_ne!(first["access_token"], second["access_token"]);

    emu.set_idp_expires_in(60);
    let (_, third) = refresh_answer(&emu, seed::GOOGLE_REFRESH_TOKEN).await;
    assert_eq!(third["expires_in"], 60);
    assert_eq!(
        emu.calls(),
        CallCounts {
            idp_token: 3,
            token_exchange: 0,
            ..CallCounts::default()
        }
    );
}

#[tokio::test]
async fn idp_rotation_answers_a_successor_and_retires_the_token_presented() {
    let emu = emulator().await;
    emu.set_idp_rotation(true);
    let (status, first) = refresh_answer(&emu, seed::STALE_GOOGLE_REFRESH_TOKEN).await;
    assert_eq!(status, StatusCode::OK);
    let successor = first["refresh_token"].as_str().expect("rotated").to_owned();
    assert_ne!(successor, seed::STALE_GOOGLE_REFRESH_TOKEN);

    let (status, body) = refresh_answer(&emu, seed::STALE_GOOGLE_REFRESH_TOKEN).await;
    assert_eq!(
        (status, body),
        (StatusCode::BAD_REQUEST, invalid_grant()),
        "the rotated-away token"
    );
    let (status, second) = refresh_answer(&emu, &successor).await;
    assert_eq!(status, StatusCode::OK);
    let last = second["refresh_token"].as_str().expect("rotated again");

    emu.set_idp_rotation(false);
    let (status, third) = refresh_answer(&emu, last).await;
    assert_eq!(status, StatusCode::OK);
    assert!(third.get("refresh_token").is_none());
}

#[tokio::test]
async fn idp_refuses_revoked_and_unknown_refresh_tokens_with_invalid_grant() {
    let emu = emulator().await;
    for token in [seed::REVOKED_GOOGLE_REFRESH_TOKEN, "1//never-issued"] {
        let answer = refresh_answer(&emu, token).await;
        assert_eq!(
            answer,
            (StatusCode::BAD_REQUEST, invalid_grant()),
            "{token}"
        );
    }
    emu.revoke_idp_refresh_token(seed::FRESH_GOOGLE_REFRESH_TOKEN);
    let answer = refresh_answer(&emu, seed::FRESH_GOOGLE_REFRESH_TOKEN).await;
    assert_eq!(answer, (StatusCode::BAD_REQUEST, invalid_grant()));
    emu.add_idp_refresh_token("1//added-by-a-test");
    let (status, _) = refresh_answer(&emu, "1//added-by-a-test").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn idp_refuses_another_client_a_grant_type_and_a_missing_token() {
    let emu = emulator().await;
    let token = seed::STALE_GOOGLE_REFRESH_TOKEN;
    for (id, secret) in [
        (seed::IDP_CLIENT_ID, "wrong"),
        ("other.apps.googleusercontent.com", seed::IDP_CLIENT_SECRET),
    ] {
        let response = refresh_as(&emu, id, secret, token).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"], "invalid_client");
    }
    let secret = seed::IDP_CLIENT_SECRET;
    let password = serde_urlencoded::to_string([
        ("grant_type", "password"),
        ("client_id", seed::IDP_CLIENT_ID),
        ("client_secret", secret),
    ])
    .expect("form encodes");
    let missing = password.replace("password", "refresh_token");
    for (body, error) in [
        (password, "unsupported_grant_type"),
        (missing, "invalid_request"),
    ] {
        let response = post_idp(&emu, body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"], error);
    }
    assert_eq!(emu.idp_client_id(), seed::IDP_CLIENT_ID);
    assert_eq!(
        emu.calls(),
        CallCounts {
            idp_token: 4,
            token_exchange: 0,
            ..CallCounts::default()
        }
    );
}

#[tokio::test]
async fn idp_faults_are_served_in_order_then_normal() {
    let emu = emulator().await;
    emu.inject_faults(
        Endpoint::IdpToken,
        vec![
            Fault::Status(503),
            Fault::RateLimited {
                retry_after: Some(3),
                reset_in_secs: 3,
            },
            Fault::HugeBody {
                bytes: 200_000,
                announced: false,
            },
            Fault::Delay(Duration::from_millis(200)),
        ],
    );
    let token = seed::STALE_GOOGLE_REFRESH_TOKEN;
    let response = refresh(&emu, token).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "server_error", "OAuth-style error body");
    let response = refresh(&emu, token).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "3");
    let response = refresh(&emu, token).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.expect("body").len(), 200_000);
    let started = std::time::Instant::now();
    let (status, body) = refresh_answer(&emu, token).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["scope"], seed::IDP_SCOPE);
    assert_eq!(emu.calls().idp_token, 4);
    assert_eq!(emu.calls().token, 0, "IdP calls are not Auth0 calls");
}

#[test]
fn seeded_logins_are_minutes_or_hours_before_seeding() {
    let now = std::time::UNIX_EPOCH + Duration::from_millis(1_796_119_200_123);
    let users = seed::users_at(now);
    let last_login = |id: &str| {
        let user = users.iter().find(|user| user["user_id"] == id).expect(id);
        let text = user["last_login"].as_str().expect("last_login");
        humantime::parse_rfc3339(text).expect("RFC 3339")
    };
    let fresh = now - seed::FRESH_LOGIN_AGO;
    let stale = now - seed::STALE_LOGIN_AGO;
    for id in [
        seed::GITHUB_USER,
        seed::GOOGLE_USER,
        seed::LINKED_USER,
        seed::FRESH_GOOGLE_USER,
    ] {
        assert_eq!(last_login(id), fresh, "{id}");
    }
    for id in [
        seed::STALE_GOOGLE_USER,
        seed::REVOKED_GOOGLE_USER,
        seed::NO_EXPIRY_GOOGLE_USER,
    ] {
        assert_eq!(last_login(id), stale, "{id}");
    }
    let fresh_user = users
        .iter()
        .find(|u| u["user_id"] == seed::FRESH_GOOGLE_USER);
    let text = fresh_user.expect("seeded")["last_login"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(text, "2026-12-01T09:55:00.123Z", "Auth0's format");
    let no_expiry = users
        .iter()
        .find(|u| u["user_id"] == seed::NO_EXPIRY_GOOGLE_USER);
    let identity = &no_expiry.expect("seeded")["identities"][0];
    assert!(identity.get("expires_in").is_none());
    assert_eq!(
        identity["refresh_token"],
        seed::NO_EXPIRY_GOOGLE_REFRESH_TOKEN
    );
    let ids: Vec<&str> = users.iter().filter_map(|u| u["user_id"].as_str()).collect();
    assert_eq!(ids, seed::user_ids());
}

#[test]
fn every_seeded_refresh_token_and_the_idp_secret_are_planted_secrets() {
    let planted = seed::planted_secrets();
    let seeded = seed::idp_refresh_tokens()
        .into_iter()
        .chain(seed::revoked_idp_refresh_tokens())
        .chain([seed::IDP_CLIENT_SECRET]);
    for secret in seeded {
        assert!(planted.contains(&secret), "{secret}");
    }
}

// ---- Token Vault (Privileged Worker) ----------------------------------------------------------

/// A subject token for `user_id` signed with the first fixture client key, with `header`
/// and `change` applied.
fn subject_token(
    emu: &Emulator,
    user_id: &str,
    header: jsonwebtoken::Header,
    change: impl FnOnce(&mut Value),
) -> String {
    let now = super::handlers::epoch_secs();
    let mut claims = json!({
        "iss": CLIENT_ID,
        "sub": user_id,
        "aud": format!("{}/", emu.base_url()),
        "iat": now,
        "exp": now + 60,
        "jti": format!("jti-{}", rand::random::<u64>()),
        "audit_context": "emulator test",
    });
    change(&mut claims);
    let key =
        jsonwebtoken::EncodingKey::from_rsa_pem(super::keys::CLIENT_ASSERTION_KEY_1.as_bytes())
            .expect("fixture key");
    jsonwebtoken::encode(&header, &claims, &key).expect("signs")
}

fn vault_header() -> jsonwebtoken::Header {
    jsonwebtoken::Header {
        typ: Some("token-vault-req+jwt".to_owned()),
        ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256)
    }
}

/// An emulator whose client's Privileged Worker key is the first fixture key (its
/// client still authenticates with the secret).
async fn vault_emulator() -> Emulator {
    let emu = emulator().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("key.pem");
    std::fs::write(&path, super::keys::CLIENT_ASSERTION_KEY_1).expect("write key");
    let public = crate::auth0::SigningKeyFile::open("K", &path, None)
        .expect("fixture key")
        .public_key_pem();
    emu.set_token_vault_subject_keys(&[&public])
        .expect("key registers");
    emu
}

/// Posts a Token Vault exchange of `subject_token` for the vault connection; returns the
/// status and body.
async fn exchange(emu: &Emulator, subject_token: &str, login_hint: &str) -> (StatusCode, Value) {
    let body = serde_urlencoded::to_string([
        (
            "grant_type",
            "urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token",
        ),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("subject_token", subject_token),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        (
            "requested_token_type",
            "http://auth0.com/oauth/token-type/token-vault-access-token",
        ),
        ("connection", seed::TOKEN_VAULT_CONNECTION),
        ("login_hint", login_hint),
    ])
    .expect("form encodes");
    let response = post_form(emu, body).await;
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_privileged_worker_exchange_hands_out_the_token_set() {
    let emu = vault_emulator().await;
    let token = subject_token(&emu, seed::VAULT_USER, vault_header(), |_| {});
    let (status, body) = exchange(&emu, &token, seed::VAULT_IDP_USER_ID).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["access_token"], seed::VAULT_ACCESS_TOKEN);
    assert_eq!(body["scope"], seed::IDP_SCOPE);
    assert!(body["expires_in"]
        .as_u64()
        .is_some_and(|secs| secs <= seed::GOOGLE_EXPIRES_IN));
    assert_eq!(
        body["issued_token_type"],
        "http://auth0.com/oauth/token-type/federated-connection-access-token"
    );
    assert_eq!(emu.calls().token_exchange, 1);
    let (status, body) = exchange(&emu, &token, seed::VAULT_IDP_USER_ID).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a replayed jti: {body}");
    assert_eq!(body["error"], "invalid_grant");
}

#[tokio::test]
async fn subject_tokens_outside_auth0s_rules_are_refused() {
    let emu = vault_emulator().await;
    let untyped = subject_token(
        &emu,
        seed::VAULT_USER,
        jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        |_| {},
    );
    let old = subject_token(&emu, seed::VAULT_USER, vault_header(), |claims| {
        claims["iat"] = (super::handlers::epoch_secs() - 61).into();
    });
    let no_context = subject_token(&emu, seed::VAULT_USER, vault_header(), |claims| {
        claims
            .as_object_mut()
            .expect("object")
            .remove("audit_context");
    });
    let wrong_aud = subject_token(&emu, seed::VAULT_USER, vault_header(), |claims| {
        claims["aud"] = emu.base_url().into();
    });
    for (what, token) in [
        ("typ not token-vault-req+jwt", untyped),
        ("older than 60 s", old),
        ("no audit_context", no_context),
        ("aud without the slash", wrong_aud),
    ] {
        let (status, body) = exchange(&emu, &token, seed::VAULT_IDP_USER_ID).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(body["error"], "invalid_grant", "{what}");
    }
}

#[tokio::test]
async fn token_sets_that_are_missing_or_fail_to_refresh_are_refused_with_auth0s_codes() {
    let emu = vault_emulator().await;
    let fresh = |emu: &Emulator| subject_token(emu, seed::VAULT_USER, vault_header(), |_| {});
    let (status, body) = exchange(&emu, &fresh(&emu), "another-google-account").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        body["error"],
        "federated_connection_refresh_token_not_found"
    );
    emu.expire_token_vault_set(seed::VAULT_USER, seed::TOKEN_VAULT_CONNECTION);
    emu.fail_token_vault_refresh(seed::VAULT_USER, seed::TOKEN_VAULT_CONNECTION, true);
    let (_, body) = exchange(&emu, &fresh(&emu), seed::VAULT_IDP_USER_ID).await;
    assert_eq!(
        body["error"],
        "federated_connection_refresh_token_flow_failed"
    );
    emu.fail_token_vault_refresh(seed::VAULT_USER, seed::TOKEN_VAULT_CONNECTION, false);
    emu.set_token_vault_expires_in(120);
    let (status, body) = exchange(&emu, &fresh(&emu), seed::VAULT_IDP_USER_ID).await;
    assert_eq!(status, StatusCode::OK, "refreshed: {body}");
    assert_ne!(body["access_token"], seed::VAULT_ACCESS_TOKEN);
    assert!(body["expires_in"]
        .as_u64()
        .is_some_and(|secs| (118..=120).contains(&secs)));
    emu.remove_token_vault_set(seed::VAULT_USER, seed::TOKEN_VAULT_CONNECTION);
    let (_, body) = exchange(&emu, &fresh(&emu), seed::VAULT_IDP_USER_ID).await;
    assert_eq!(
        body["error"],
        "federated_connection_refresh_token_not_found"
    );
}
