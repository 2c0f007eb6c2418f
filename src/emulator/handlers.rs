//! HTTP side of the emulator: the axum router, its handlers (`/oauth/token`,
//! `/api/v2/users/{id}`, `/.well-known/jwks.json`, the IdP's `/idp/google/token`,
//! everything else) and the Auth0- and Google-shaped responses they send.
//!
//! Nothing here logs a token, a client secret or an `Authorization` header: the request log
//! line carries only the method, the raw path and the status.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::idp::IdpGrant;
use super::state::{Grant, Shared, TokenCheck};
use super::vault::{VaultGrant, VaultRefusal};
use super::{Endpoint, Fault};

/// Scope that lets a Management token read user profiles.
const SCOPE_READ_USERS: &str = "read:users";
/// Scope that additionally reveals the IdP tokens stored on identities.
const SCOPE_READ_IDP_TOKENS: &str = "read:user_idp_tokens";
/// Identity fields Auth0 hides from tokens without [`SCOPE_READ_IDP_TOKENS`].
const IDP_SECRET_FIELDS: [&str; 3] = ["access_token", "access_token_secret", "refresh_token"];
/// The Token Vault grant type.
const TOKEN_VAULT_GRANT: &str =
    "urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token";
/// `subject_token_type` of a Privileged Worker exchange.
const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// `requested_token_type` of a Privileged Worker exchange for an access token.
const TOKEN_VAULT_ACCESS_TOKEN: &str = "http://auth0.com/oauth/token-type/token-vault-access-token";
/// `client_assertion_type` of `private_key_jwt`.
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Value of `x-ratelimit-limit` on emulated 429 answers.
const RATE_LIMIT: u64 = 50;

type AppState = State<Arc<Shared>>;

/// Builds the emulator's router around `state`.
pub(crate) fn router(state: Arc<Shared>) -> Router {
    Router::new()
        .route("/oauth/token", post(token).fallback(other))
        .route("/api/v2/users/{id}", get(user).fallback(other))
        .route("/.well-known/jwks.json", get(jwks).fallback(other))
        .route("/idp/google/token", post(idp_token).fallback(other))
        .fallback(other)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Records the raw path, adds the configured latency and logs method, path and status.
async fn observe(State(state): AppState, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    state.record_path(&path);
    let response = next.run(request).await;
    let latency = state.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let status = response.status().as_u16();
    tracing::debug!(%method, %path, status, "auth0 emulator request");
    response
}

/// Any route or method Auth0 would not serve here.
async fn other(State(state): AppState) -> Response {
    state.count(None);
    management_error(StatusCode::NOT_FOUND, "Not Found", None).into_response()
}

// ---------------------------------------------------------------------------------------------
// POST /oauth/token
// ---------------------------------------------------------------------------------------------

/// Body of a `/oauth/token` request, any grant; deliberately not `Debug` (it holds the
/// secret, the client assertion and the subject token).
#[derive(Deserialize, Default)]
struct TokenRequest {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_assertion_type: Option<String>,
    client_assertion: Option<String>,
    audience: Option<String>,
    subject_token: Option<String>,
    subject_token_type: Option<String>,
    requested_token_type: Option<String>,
    connection: Option<String>,
    login_hint: Option<String>,
}

/// `/oauth/token`: the client-credentials grant and the Token Vault exchange.
async fn token(State(state): AppState, headers: HeaderMap, body: Bytes) -> Response {
    state.count(Some(Endpoint::Token));
    if let Some(response) = take_fault(&state, Endpoint::Token).await {
        return response;
    }
    let request: TokenRequest = match parse_token_request(&headers, &body) {
        Ok(request) => request,
        Err(reject) => return reject.into_response(),
    };
    if request.grant_type.as_deref() == Some(TOKEN_VAULT_GRANT) {
        state.count(Some(Endpoint::TokenExchange));
        if let Some(response) = take_fault(&state, Endpoint::TokenExchange).await {
            return response;
        }
    }
    grant(&state, &request).unwrap_or_else(IntoResponse::into_response)
}

/// Checks grant type, client authentication, then what the grant asks, in Auth0's order.
fn grant(state: &Shared, request: &TokenRequest) -> Result<Response, Reject> {
    match request.grant_type.as_deref().unwrap_or_default() {
        "client_credentials" => {
            authenticate_client(state, request)?;
            check_audience(state, request.audience.as_deref())?;
            Ok(grant_response(state.issue_token()))
        }
        TOKEN_VAULT_GRANT => {
            authenticate_client(state, request)?;
            token_vault_grant(state, request).map(vault_response)
        }
        grant_type => {
            let message = format!("Unsupported grant type: {grant_type}");
            Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                &message,
            ))
        }
    }
}

/// The client's secret, or once keys are registered its client assertion (and then
/// only that, as Auth0 once an application's credentials are keys).
fn authenticate_client(state: &Shared, request: &TokenRequest) -> Result<(), Reject> {
    let client_id = request.client_id.as_deref();
    if !state.uses_private_key_jwt() {
        let secret = request.client_secret.as_deref().unwrap_or_default();
        if request.client_assertion.is_some()
            || !state.client_matches(client_id.unwrap_or_default(), secret)
        {
            return Err(oauth_error(
                StatusCode::UNAUTHORIZED,
                "access_denied",
                "Unauthorized",
            ));
        }
        return Ok(());
    }
    let Some(assertion) = request.client_assertion.as_deref() else {
        let message =
            "This client authenticates with private_key_jwt: a client_assertion is required";
        return Err(oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            message,
        ));
    };
    if request.client_assertion_type.as_deref() != Some(JWT_BEARER) {
        let message = format!("client_assertion_type must be {JWT_BEARER}");
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &message,
        ));
    }
    state
        .accept_client_assertion(client_id, assertion)
        .map_err(|why| oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", why))
}

/// The Privileged Worker exchange: the subject token, the parameters, then the user's
/// identity and token set.
fn token_vault_grant(state: &Shared, request: &TokenRequest) -> Result<VaultGrant, Reject> {
    let invalid = |message: &str| oauth_error(StatusCode::BAD_REQUEST, "invalid_request", message);
    if request.subject_token_type.as_deref() != Some(JWT_TOKEN_TYPE) {
        return Err(invalid(
            "subject_token_type must be urn:ietf:params:oauth:token-type:jwt",
        ));
    }
    if request.requested_token_type.as_deref() != Some(TOKEN_VAULT_ACCESS_TOKEN) {
        return Err(invalid(
            "requested_token_type must be http://auth0.com/oauth/token-type/token-vault-access-token",
        ));
    }
    let Some(connection) = request.connection.as_deref() else {
        return Err(invalid("Missing required parameter: connection"));
    };
    let subject_token = request.subject_token.as_deref().unwrap_or_default();
    let user_id = state
        .accept_subject_token(subject_token)
        .map_err(|why| oauth_error(StatusCode::UNAUTHORIZED, "invalid_grant", why))?;
    let no_identity = VaultRefusal::NotFound;
    if !state.has_identity(&user_id, connection, request.login_hint.as_deref()) {
        return Err(vault_refusal(no_identity));
    }
    state
        .exchange_token_set(&user_id, connection)
        .map_err(vault_refusal)
}

fn vault_refusal(refusal: VaultRefusal) -> Reject {
    let message = match refusal {
        VaultRefusal::NotFound => "No token set was found for the user and connection",
        VaultRefusal::RefreshFailed => "The refresh of the federated connection's token failed",
    };
    oauth_error(StatusCode::UNAUTHORIZED, refusal.code(), message)
}

fn vault_response(grant: VaultGrant) -> Response {
    let mut body = token_body(&grant.access_token, grant.expires_in, grant.scope);
    body["issued_token_type"] =
        Value::from("http://auth0.com/oauth/token-type/federated-connection-access-token");
    (StatusCode::OK, Json(body)).into_response()
}

/// The fields every successful token answer has, Auth0's and the IdP's alike.
fn token_body(access_token: &str, expires_in: u64, scope: &str) -> Value {
    json!({
        "access_token": access_token,
        "expires_in": expires_in,
        "scope": scope,
        "token_type": "Bearer",
    })
}

/// Reads a form or JSON body, as Auth0 accepts both.
fn parse_token_request<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, Reject> {
    let parsed = match media_type(headers).as_deref() {
        Some("application/json") => serde_json::from_slice(body).ok(),
        Some("application/x-www-form-urlencoded") => serde_urlencoded::from_bytes(body).ok(),
        _ => {
            let message =
                "Content-Type must be application/json or application/x-www-form-urlencoded";
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                message,
            ));
        }
    };
    parsed.ok_or_else(|| {
        oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Malformed request body",
        )
    })
}

/// The media type of the request, lower-cased and without parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let media = value.split(';').next()?.trim();
    Some(media.to_ascii_lowercase())
}

fn check_audience(state: &Shared, audience: Option<&str>) -> Result<(), Reject> {
    let message = match audience {
        Some(audience) if audience == state.audience() => return Ok(()),
        Some(audience) => format!("Service not enabled within domain: {audience}"),
        None => "No audience parameter was provided, and no default audience has been configured"
            .to_owned(),
    };
    Err(oauth_error(
        StatusCode::FORBIDDEN,
        "access_denied",
        &message,
    ))
}

fn grant_response(grant: Grant) -> Response {
    let body = token_body(&grant.access_token, grant.expires_in, &grant.scope);
    (StatusCode::OK, Json(body)).into_response()
}

// ---------------------------------------------------------------------------------------------
// GET /api/v2/users/{id}
// ---------------------------------------------------------------------------------------------

/// Which top-level user fields to return (`fields` / `include_fields`).
struct Projection {
    fields: Vec<String>,
    include: bool,
}

/// Returns one user profile, like the Management API.
async fn user(
    State(state): AppState,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    state.count(Some(Endpoint::Users));
    let Ok(Path(user_id)) = id else {
        return management_error(
            StatusCode::BAD_REQUEST,
            "Invalid user id",
            Some("invalid_uri"),
        )
        .into_response();
    };
    state.count_user(&user_id);
    if let Some(response) = take_fault(&state, Endpoint::Users).await {
        return response;
    }
    match user_response(&state, &user_id, query.as_deref(), &headers) {
        Ok(user) => (StatusCode::OK, Json(user)).into_response(),
        Err(reject) => reject.into_response(),
    }
}

/// Authorises the caller, then looks the user up and shapes the answer.
fn user_response(
    state: &Shared,
    user_id: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Value, Reject> {
    let scope = authorize(state, headers)?;
    let projection = parse_projection(query)?;
    let mut user = state.user(user_id).ok_or_else(|| {
        let message = "The user does not exist.";
        management_error(StatusCode::NOT_FOUND, message, Some("inexistent_user"))
    })?;
    if !has_scope(&scope, SCOPE_READ_IDP_TOKENS) {
        strip_idp_tokens(&mut user);
    }
    Ok(match projection {
        Some(projection) => project(user, &projection),
        None => user,
    })
}

/// Checks the bearer token and its scope; returns the scope on success.
fn authorize(state: &Shared, headers: &HeaderMap) -> Result<String, Reject> {
    let check = bearer(headers).map_or(TokenCheck::Invalid, |token| state.check_token(token));
    let scope = match check {
        TokenCheck::Valid { scope } => scope,
        TokenCheck::Expired => return Err(unauthorized("Expired token")),
        TokenCheck::Invalid => return Err(unauthorized("Invalid token")),
    };
    // Auth0 accepts either scope for this endpoint ("expected any of").
    if has_scope(&scope, SCOPE_READ_USERS) || has_scope(&scope, SCOPE_READ_IDP_TOKENS) {
        return Ok(scope);
    }
    let message = "Insufficient scope, expected any of: read:users,read:user_idp_tokens";
    Err(management_error(
        StatusCode::FORBIDDEN,
        message,
        Some("insufficient_scope"),
    ))
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn has_scope(scope: &str, wanted: &str) -> bool {
    scope.split_whitespace().any(|s| s == wanted)
}

fn unauthorized(message: &str) -> Reject {
    management_error(StatusCode::UNAUTHORIZED, message, Some("invalid_token"))
}

/// Parses `fields` and `include_fields`; `None` means "return every field".
fn parse_projection(query: Option<&str>) -> Result<Option<Projection>, Reject> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or_default())
        .map_err(|_| bad_query("Query validation error: malformed query string"))?;
    let mut fields = String::new();
    let mut include = true;
    for (key, value) in pairs {
        match key.as_str() {
            "fields" => fields = value,
            "include_fields" => include = parse_bool(&value)?,
            _ => {}
        }
    }
    let fields: Vec<String> = fields
        .split(',')
        .map(str::trim)
        .filter(|field| !field.is_empty())
        .map(str::to_owned)
        .collect();
    Ok((!fields.is_empty()).then_some(Projection { fields, include }))
}

fn parse_bool(value: &str) -> Result<bool, Reject> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(bad_query(
            "Query validation error: 'Expected type boolean but found type string' on property include_fields",
        )),
    }
}

fn bad_query(message: &str) -> Reject {
    management_error(
        StatusCode::BAD_REQUEST,
        message,
        Some("invalid_query_string"),
    )
}

/// Keeps (or drops, when `include` is false) the listed top-level fields.
fn project(user: Value, projection: &Projection) -> Value {
    let Value::Object(map) = user else {
        return user;
    };
    let listed = |key: &str| projection.fields.iter().any(|field| field == key);
    let kept = map
        .into_iter()
        .filter(|(key, _)| listed(key) == projection.include)
        .collect();
    Value::Object(kept)
}

/// Removes IdP tokens from every identity, as Auth0 does without `read:user_idp_tokens`.
fn strip_idp_tokens(user: &mut Value) {
    let Some(identities) = user.get_mut("identities").and_then(Value::as_array_mut) else {
        return;
    };
    for identity in identities.iter_mut().filter_map(Value::as_object_mut) {
        for field in IDP_SECRET_FIELDS {
            identity.remove(field);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GET /.well-known/jwks.json
// ---------------------------------------------------------------------------------------------

/// The tenant's published ID-token signing keys.
async fn jwks(State(state): AppState) -> Response {
    state.count(Some(Endpoint::Jwks));
    if let Some(response) = take_fault(&state, Endpoint::Jwks).await {
        return response;
    }
    (StatusCode::OK, Json(state.jwks())).into_response()
}

// ---------------------------------------------------------------------------------------------
// POST /idp/google/token (the emulated IdP, not Auth0)
// ---------------------------------------------------------------------------------------------

/// Body of a refresh-token request; deliberately not `Debug` (it holds two secrets).
#[derive(Deserialize, Default)]
struct RefreshRequest {
    grant_type: Option<String>,
    refresh_token: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

/// The refresh-token grant, answered the way Google's token endpoint does.
async fn idp_token(State(state): AppState, headers: HeaderMap, body: Bytes) -> Response {
    state.count(Some(Endpoint::IdpToken));
    if let Some(response) = take_fault(&state, Endpoint::IdpToken).await {
        return response;
    }
    let grant = parse_token_request(&headers, &body)
        .and_then(|request: RefreshRequest| refresh_grant(&state, &request));
    match grant {
        Ok(grant) => refresh_response(grant),
        Err(reject) => reject.into_response(),
    }
}

/// Checks the client, then the grant type, then the refresh token, in Google's order.
fn refresh_grant(state: &Shared, request: &RefreshRequest) -> Result<IdpGrant, Reject> {
    let client_id = request.client_id.as_deref().unwrap_or_default();
    let client_secret = request.client_secret.as_deref().unwrap_or_default();
    if !state.idp_client_matches(client_id, client_secret) {
        return Err(oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Unauthorized",
        ));
    }
    let grant_type = request.grant_type.as_deref().unwrap_or_default();
    if grant_type != "refresh_token" {
        let message = format!("Invalid grant_type: {grant_type}");
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            &message,
        ));
    }
    let Some(refresh_token) = request.refresh_token.as_deref() else {
        let message = "Missing required parameter: refresh_token";
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            message,
        ));
    };
    state.refresh_idp_token(refresh_token).ok_or_else(|| {
        let message = "Token has been expired or revoked.";
        oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", message)
    })
}

fn refresh_response(grant: IdpGrant) -> Response {
    let mut body = token_body(&grant.access_token, grant.expires_in, grant.scope);
    if let Some(refresh_token) = grant.refresh_token {
        body["refresh_token"] = Value::from(refresh_token);
    }
    (StatusCode::OK, Json(body)).into_response()
}

// ---------------------------------------------------------------------------------------------
// Faults and error bodies
// ---------------------------------------------------------------------------------------------

/// Applies the next queued fault of `endpoint`: an answer to send, or a delay then `None`.
async fn take_fault(state: &Arc<Shared>, endpoint: Endpoint) -> Option<Response> {
    match state.next_fault(endpoint)? {
        Fault::Status(code) => Some(status_fault(endpoint, code)),
        Fault::RateLimited {
            retry_after,
            reset_in_secs,
        } => Some(rate_limited(retry_after, reset_in_secs)),
        Fault::Delay(delay) => {
            tokio::time::sleep(delay).await;
            None
        }
        Fault::HugeBody { bytes, announced } => Some(huge_body(state.clone(), bytes, announced)),
    }
}

/// One chunk of a huge fault body: JSON whitespace, shared, never copied.
static PADDING: [u8; 64 * 1024] = [b' '; 64 * 1024];

/// A 200 whose body of `bytes` bytes is produced chunk by chunk as hyper asks for it (so
/// only as fast as the client reads), counting each chunk handed over.
fn huge_body(state: Arc<Shared>, bytes: u64, announced: bool) -> Response {
    let chunks = futures::stream::unfold(bytes, move |left| {
        let state = state.clone();
        async move {
            if left == 0 {
                return None;
            }
            let size = left.min(PADDING.len() as u64);
            state.count_huge_body_bytes(size);
            let chunk = Bytes::from_static(&PADDING).slice(..size as usize);
            Some((Ok::<_, std::convert::Infallible>(chunk), left - size))
        }
    });
    let mut response = (StatusCode::OK, Body::from_stream(chunks)).into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if announced {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(bytes));
    }
    response
}

/// An error answer with the given status, in the body style of `endpoint`.
fn status_fault(endpoint: Endpoint, code: u16) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let reason = reason(status);
    match endpoint {
        Endpoint::Token | Endpoint::TokenExchange | Endpoint::IdpToken => {
            oauth_error(status, oauth_error_code(status), reason).into_response()
        }
        Endpoint::Users | Endpoint::Jwks => management_error(status, reason, None).into_response(),
    }
}

fn oauth_error_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request",
        401 | 403 => "access_denied",
        429 => "too_many_requests",
        _ => "server_error",
    }
}

/// Auth0's 429 answer with its rate-limit headers.
fn rate_limited(retry_after: Option<u64>, reset_in_secs: u64) -> Response {
    let body = json!({
        "statusCode": 429,
        "error": "Too Many Requests",
        "message": "Global limit has been reached",
        "errorCode": "too_many_requests",
    });
    let mut response = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
    let headers = response.headers_mut();
    let reset = epoch_secs().saturating_add(reset_in_secs);
    headers.insert("x-ratelimit-limit", HeaderValue::from(RATE_LIMIT));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(0u64));
    headers.insert("x-ratelimit-reset", HeaderValue::from(reset));
    if let Some(seconds) = retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// Now, in Unix seconds: rate-limit resets and ID-token times.
pub(super) fn epoch_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

fn reason(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("Error")
}

/// An error answer in one of Auth0's two body styles, turned into a response at the edge.
enum Reject {
    /// Authentication API style: `{error, error_description}`.
    OAuth {
        status: StatusCode,
        error: String,
        description: String,
    },
    /// Management API style: `{statusCode, error, message, errorCode?}`.
    Management {
        status: StatusCode,
        message: String,
        error_code: Option<String>,
    },
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        match self {
            Reject::OAuth {
                status,
                error,
                description,
            } => {
                let body = json!({ "error": error, "error_description": description });
                (status, Json(body)).into_response()
            }
            Reject::Management {
                status,
                message,
                error_code,
            } => management_body(status, &message, error_code.as_deref()),
        }
    }
}

/// Error of the authentication API (`/oauth/token`).
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Reject {
    Reject::OAuth {
        status,
        error: error.to_owned(),
        description: description.to_owned(),
    }
}

/// Error of the Management API.
fn management_error(status: StatusCode, message: &str, error_code: Option<&str>) -> Reject {
    Reject::Management {
        status,
        message: message.to_owned(),
        error_code: error_code.map(str::to_owned),
    }
}

/// Body of a Management API error: `{statusCode, error, message, errorCode?}`.
fn management_body(status: StatusCode, message: &str, error_code: Option<&str>) -> Response {
    let mut body = json!({
        "statusCode": status.as_u16(),
        "error": reason(status),
        "message": message,
    });
    if let Some(code) = error_code {
        body["errorCode"] = Value::from(code);
    }
    (status, Json(body)).into_response()
}
