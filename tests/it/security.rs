//! Security properties: mutual TLS refuses callers without a certificate from
//! the client CA (README: "TLS handshake fails (no RPC)"), user ids are one
//! percent-encoded path segment that can never reach another Management API
//! endpoint, and reflection and health are served over the same mTLS port.

use std::time::Duration;

use futures::StreamExt;
use tokenbroker::emulator::seed;
use tokenbroker::pki::{CertificateAuthority, IssuedCertificate, LeafSpec};
use tokenbroker::proto::IdpToken;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{
    bounded, eventually, get_on, get_request, health_status, TestBroker, CLIENT_SPIFFE_ID,
};

/// The API service, as reflection and readiness name it.
const API_SERVICE: &str = "tokenbroker.v1.TokenBroker";
/// The gRPC health service.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Asks for GITHUB_USER's token presenting `cert` (or none). Returns what the
/// caller got: a token, or a description of how the connection or RPC failed.
async fn attempt_with(
    broker: &TestBroker,
    cert: Option<&IssuedCertificate>,
) -> Result<IdpToken, String> {
    let connected = bounded("connect", broker.client_with(cert, &broker.ca.cert_pem)).await;
    // The TLS 1.3 client finishes its side of the handshake before the server
    // has checked its certificate, so connecting may succeed lazily and only
    // the first RPC sees the refusal.
    let mut client = match connected {
        Ok(client) => client,
        Err(error) => return Err(format!("connect failed: {error}")),
    };
    match get_on(&mut client, get_request(seed::GITHUB_USER, "github")).await {
        Ok(token) => Ok(token),
        Err(status) => {
            // The refusal is the handshake's, never an RPC the broker answered
            // (not even the interceptor's PERMISSION_DENIED).
            assert!(
                !matches!(
                    status.code(),
                    Code::NotFound
                        | Code::FailedPrecondition
                        | Code::InvalidArgument
                        | Code::PermissionDenied
                ),
                "the broker handled the RPC: {status:?}"
            );
            Err(format!("RPC failed: {status:?}"))
        }
    }
}

/// Asserts that a caller presenting `cert` (or none) gets no token and that
/// nothing reached Auth0.
async fn assert_refused(broker: &TestBroker, cert: Option<&IssuedCertificate>, what: &str) {
    let outcome = attempt_with(broker, cert).await;
    assert!(outcome.is_err(), "{what} got a token: {outcome:?}");
    assert_eq!(broker.emulator.calls().users, 0);
}

/// The raw paths of the requests that reached the emulator's users endpoint.
fn user_paths(broker: &TestBroker) -> Vec<String> {
    broker
        .emulator
        .seen_paths()
        .into_iter()
        .filter(|path| path.starts_with("/api/v2/users/"))
        .collect()
}

/// Asserts that `path` below `/api/v2/users/` is exactly one non-empty segment.
fn assert_one_segment(path: &str) -> &str {
    let segment = path
        .strip_prefix("/api/v2/users/")
        .unwrap_or_else(|| panic!("request outside /api/v2/users/: {path}"));
    assert!(
        !segment.is_empty() && !segment.contains('/'),
        "not exactly one segment: {path}"
    );
    segment
}

/// Asserts that reflection's service list holds the API and health services.
fn assert_lists_both_services(names: &[String]) {
    for service in [API_SERVICE, HEALTH_SERVICE] {
        assert!(names.iter().any(|name| name == service), "{names:?}");
    }
}

/// The service names server reflection `$version` (`v1` or `v1alpha`) lists,
/// bounded by [`RPC_BOUND`](crate::support::RPC_BOUND). The two versions are
/// distinct generated types of the same shape, hence a macro.
macro_rules! reflected_services {
    ($broker:expr, $version:ident) => {{
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::$version::ServerReflectionRequest;

        let broker: &TestBroker = $broker;
        let channel = broker
            .channel_with(Some(&broker.client_cert), &broker.ca.cert_pem)
            .await
            .expect("channel");
        let mut client = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        bounded("server reflection", async {
            let mut responses = client
                .server_reflection_info(tokio_stream::iter(vec![request]))
                .await
                .expect("reflection stream opens")
                .into_inner();
            let response = responses
                .next()
                .await
                .expect("one response")
                .expect("response is not an error");
            match response.message_response {
                Some(MessageResponse::ListServicesResponse(list)) => list
                    .service
                    .into_iter()
                    .map(|service| service.name)
                    .collect::<Vec<_>>(),
                other => panic!("not a service list: {other:?}"),
            }
        })
        .await
    }};
}

// ---------------------------------------------------------------------------------------------
// Handshake rows of the status table
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn caller_without_a_client_certificate_is_refused() {
    let broker = TestBroker::start().await;
    assert_refused(&broker, None, "a caller without a certificate").await;
    // The same broker still serves a caller with a good certificate.
    let token = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("token");
    assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
    broker.stop().await;
}

#[tokio::test]
async fn caller_with_a_certificate_from_another_ca_is_refused() {
    let broker = TestBroker::start().await;
    let other_ca = CertificateAuthority::generate("other CA").expect("CA");
    // Same SPIFFE id as the harness's good client: only the issuer differs.
    let foreign = other_ca
        .issue(&LeafSpec::spiffe_client(CLIENT_SPIFFE_ID))
        .expect("client cert");
    assert_refused(
        &broker,
        Some(&foreign),
        "a caller with a foreign certificate",
    )
    .await;
    broker.stop().await;
}

#[tokio::test]
async fn certificate_for_server_use_only_is_refused_as_a_client_certificate() {
    let broker = TestBroker::start().await;
    // Chains to the client CA, but its extended key usage is serverAuth only.
    let server_only = broker
        .ca
        .issue(&LeafSpec::loopback_server())
        .expect("server cert");
    assert_refused(&broker, Some(&server_only), "a serverAuth-only certificate").await;
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// User ids in the Management API path
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn odd_user_id_is_one_encoded_path_segment() {
    let broker = TestBroker::start().await;
    let token = broker.get(seed::ODD_ID_USER, "").await.expect("token");
    assert_eq!(token.access_token, seed::ODD_ID_ACCESS_TOKEN);
    assert_eq!(token.connection, seed::CORP_SSO_CONNECTION);
    assert_eq!(broker.emulator.user_calls_for(seed::ODD_ID_USER), 1);
    let user_paths = user_paths(&broker);
    assert_eq!(user_paths.len(), 1, "{user_paths:?}");
    let segment = assert_one_segment(&user_paths[0]);
    assert!(segment.contains("%2F"), "slash not encoded: {segment}");
    assert!(!segment.contains(' '), "space not encoded: {segment}");
    assert_eq!(broker.emulator.calls().other, 0);
    broker.stop().await;
}

#[tokio::test]
async fn non_ascii_user_id_is_one_encoded_path_segment() {
    const USER: &str = "oauth2|corp-sso|jörg/ops+ünïcode 東京";
    const TOKEN: &str = "corp_emulated_unicode_access_token_0003";
    let broker = TestBroker::start().await;
    broker.emulator.upsert_user(serde_json::json!({
        "user_id": USER,
        "identities": [{
            "provider": "oauth2",
            "connection": seed::CORP_SSO_CONNECTION,
            "user_id": "corp-sso|jörg",
            "isSocial": true,
            "access_token": TOKEN,
        }],
    }));
    let token = broker.get(USER, "oauth2").await.expect("token");
    assert_eq!(token.access_token, TOKEN);
    assert_eq!(token.idp_user_id, "corp-sso|jörg");
    assert_eq!(broker.emulator.user_calls_for(USER), 1);
    for path in user_paths(&broker) {
        let segment = assert_one_segment(&path);
        assert!(segment.is_ascii(), "not percent-encoded: {path}");
    }
    broker.stop().await;
}

#[tokio::test]
async fn path_traversal_user_ids_never_reach_another_endpoint() {
    let broker = TestBroker::start().await;
    let hostile = [
        "../clients",
        "../../oauth/token",
        "a/../../clients",
        "%2e%2e/clients",
        "%2e%2e",
        ".%2e",
        "..%2Fclients",
        "..\\clients",
        "clients?x=1",
        "x#frag",
        "/api/v2/clients",
        "./",
        "../",
    ];
    for user_id in hostile {
        let status = match broker.get(user_id, "").await {
            Ok(token) => panic!("{user_id:?} released a token: {token:?}"),
            Err(status) => status,
        };
        assert!(
            matches!(status.code(), Code::NotFound | Code::InvalidArgument),
            "{user_id:?}: {status:?}"
        );
    }
    let calls = broker.emulator.calls();
    assert_eq!(calls.other, 0, "some id reached another endpoint");
    assert!(
        calls.token <= 1,
        "only the broker's own Management token: {calls:?}"
    );
    let paths = broker.emulator.seen_paths();
    assert!(!paths.is_empty());
    for path in &paths {
        if path == "/oauth/token" {
            continue;
        }
        let segment = assert_one_segment(path);
        assert!(
            segment != "." && segment != ".." && !segment.eq_ignore_ascii_case("%2e%2e"),
            "dot segment reached Auth0: {path}"
        );
    }
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Reflection and health over mTLS
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn server_reflection_v1_lists_the_services_over_mtls() {
    let broker = TestBroker::start().await;
    let names = reflected_services!(&broker, v1);
    assert_lists_both_services(&names);
    broker.stop().await;
}

#[tokio::test]
async fn server_reflection_v1alpha_lists_the_services_over_mtls() {
    let broker = TestBroker::start().await;
    let names = reflected_services!(&broker, v1alpha);
    assert_lists_both_services(&names);
    broker.stop().await;
}

#[tokio::test]
async fn health_reports_alive_and_ready_over_mtls() {
    let broker = TestBroker::start().await;
    let channel = broker
        .channel_with(Some(&broker.client_cert), &broker.ca.cert_pem)
        .await
        .expect("channel");
    let mut health = HealthClient::new(channel);
    let alive = health_status(&mut health, "")
        .await
        .expect("health check of \"\"");
    assert_eq!(alive, ServingStatus::Serving as i32);

    // Readiness flips once the first Management token has been obtained.
    let mut ready = None;
    eventually(Duration::from_secs(5), async || {
        let status = health_status(&mut health, API_SERVICE)
            .await
            .expect("health check of the API service");
        ready = Some(status);
        status == ServingStatus::Serving as i32
    })
    .await;
    assert_eq!(ready, Some(ServingStatus::Serving as i32));
    assert!(broker.emulator.calls().token >= 1);
    broker.stop().await;
}

#[tokio::test]
async fn health_is_refused_without_a_client_certificate_on_the_mtls_port() {
    let broker = TestBroker::start().await;
    let connected = bounded("connect", broker.channel_with(None, &broker.ca.cert_pem)).await;
    if let Ok(channel) = connected {
        let mut health = HealthClient::new(channel);
        let result = health_status(&mut health, "").await;
        assert!(
            result.is_err(),
            "health answered a caller without a certificate: {result:?}"
        );
    }
    broker.stop().await;
}
