//! Security properties: mutual TLS refuses callers without a certificate from
//! the client CA (DESIGN.md: "handshake fails (no RPC)"), user ids are one
//! percent-encoded path segment that can never reach another Management API
//! endpoint, and reflection and health are served over the same mTLS port.

use std::time::{Duration, Instant};

use futures::StreamExt;
use tokenbroker::emulator::seed;
use tokenbroker::pki::{CertificateAuthority, IssuedCertificate, LeafSpec};
use tokenbroker::proto::{GetIdpTokenRequest, IdpToken};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::support::{TestBroker, RPC_BOUND};

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
    let connected = tokio::time::timeout(RPC_BOUND, broker.client_with(cert, &broker.ca.cert_pem))
        .await
        .expect("connect finished within the bound");
    // The TLS 1.3 client finishes its side of the handshake before the server
    // has checked its certificate, so connecting may succeed lazily and only
    // the first RPC sees the refusal.
    let mut client = match connected {
        Ok(client) => client,
        Err(error) => return Err(format!("connect failed: {error}")),
    };
    let request = GetIdpTokenRequest {
        user_id: seed::GITHUB_USER.to_owned(),
        provider: "github".to_owned(),
        ..Default::default()
    };
    match tokio::time::timeout(RPC_BOUND, client.get_idp_token(request))
        .await
        .expect("RPC finished within the bound")
    {
        Ok(response) => Ok(response.into_inner().token.unwrap_or_default()),
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

// ---------------------------------------------------------------------------------------------
// Handshake rows of the status table
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn caller_without_a_client_certificate_is_refused() {
    let broker = TestBroker::start().await;
    let outcome = attempt_with(&broker, None).await;
    assert!(
        outcome.is_err(),
        "a caller without a certificate got a token: {outcome:?}"
    );
    assert_eq!(broker.emulator.calls().users, 0);
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
        .issue(&LeafSpec::spiffe_client(
            "spiffe://test.example/ns/it/sa/client",
        ))
        .expect("client cert");
    let outcome = attempt_with(&broker, Some(&foreign)).await;
    assert!(
        outcome.is_err(),
        "a caller with a foreign certificate got a token: {outcome:?}"
    );
    assert_eq!(broker.emulator.calls().users, 0);
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
    let outcome = attempt_with(&broker, Some(&server_only)).await;
    assert!(
        outcome.is_err(),
        "a serverAuth-only certificate got a token: {outcome:?}"
    );
    assert_eq!(broker.emulator.calls().users, 0);
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
    let user_paths: Vec<String> = broker
        .emulator
        .seen_paths()
        .into_iter()
        .filter(|path| path.starts_with("/api/v2/users/"))
        .collect();
    assert_eq!(user_paths.len(), 1, "{user_paths:?}");
    let segment = &user_paths[0]["/api/v2/users/".len()..];
    assert!(!segment.contains('/'), "not one segment: {segment}");
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
    for path in broker.emulator.seen_paths() {
        if let Some(segment) = path.strip_prefix("/api/v2/users/") {
            assert!(!segment.contains('/'), "not one segment: {path}");
            assert!(segment.is_ascii(), "not percent-encoded: {path}");
        }
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
        let segment = path
            .strip_prefix("/api/v2/users/")
            .unwrap_or_else(|| panic!("request outside /api/v2/users/: {path}"));
        assert!(
            !segment.is_empty() && !segment.contains('/'),
            "not exactly one segment: {path}"
        );
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
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let broker = TestBroker::start().await;
    let channel = broker
        .channel_with(Some(&broker.client_cert), &broker.ca.cert_pem)
        .await
        .expect("channel");
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let names = tokio::time::timeout(RPC_BOUND, async {
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
    .expect("reflection answered within the bound");
    assert!(names.iter().any(|name| name == API_SERVICE), "{names:?}");
    assert!(names.iter().any(|name| name == HEALTH_SERVICE), "{names:?}");
    broker.stop().await;
}

#[tokio::test]
async fn server_reflection_v1alpha_lists_the_services_over_mtls() {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;

    let broker = TestBroker::start().await;
    let channel = broker
        .channel_with(Some(&broker.client_cert), &broker.ca.cert_pem)
        .await
        .expect("channel");
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let names = tokio::time::timeout(RPC_BOUND, async {
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
    .expect("reflection answered within the bound");
    assert!(names.iter().any(|name| name == API_SERVICE), "{names:?}");
    assert!(names.iter().any(|name| name == HEALTH_SERVICE), "{names:?}");
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
    let check = |service: &str| HealthCheckRequest {
        service: service.to_owned(),
    };
    let alive = tokio::time::timeout(RPC_BOUND, health.check(check("")))
        .await
        .expect("health answered within the bound")
        .expect("health check of \"\"")
        .into_inner();
    assert_eq!(alive.status, ServingStatus::Serving as i32);

    // Readiness flips once the first Management token has been obtained.
    let give_up = Instant::now() + Duration::from_secs(5);
    let ready = loop {
        let status = tokio::time::timeout(RPC_BOUND, health.check(check(API_SERVICE)))
            .await
            .expect("health answered within the bound")
            .expect("health check of the API service")
            .into_inner()
            .status;
        if status == ServingStatus::Serving as i32 || Instant::now() >= give_up {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ready, ServingStatus::Serving as i32);
    assert!(broker.emulator.calls().token >= 1);
    broker.stop().await;
}

#[tokio::test]
async fn health_is_refused_without_a_client_certificate_on_the_mtls_port() {
    let broker = TestBroker::start().await;
    let connected = tokio::time::timeout(RPC_BOUND, broker.channel_with(None, &broker.ca.cert_pem))
        .await
        .expect("connect finished within the bound");
    if let Ok(channel) = connected {
        let mut health = HealthClient::new(channel);
        let result = tokio::time::timeout(
            RPC_BOUND,
            health.check(HealthCheckRequest {
                service: String::new(),
            }),
        )
        .await
        .expect("health answered within the bound");
        assert!(
            result.is_err(),
            "health answered a caller without a certificate: {result:?}"
        );
    }
    broker.stop().await;
}
