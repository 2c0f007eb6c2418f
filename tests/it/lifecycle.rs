//! Running on Kubernetes: readiness and liveness over gRPC health (mTLS and
//! plaintext), graceful shutdown, and certificate rotation without restart.

use std::time::{Duration, Instant};

use tokenbroker::config::RunSettings;
use tokenbroker::emulator::{seed, Fault};
use tokenbroker::pki::{write_file, CertificateAuthority, LeafSpec};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::support::{Options, TestBroker, RPC_BOUND};

const READINESS: &str = "tokenbroker.v1.TokenBroker";

async fn plaintext_health(broker: &TestBroker) -> HealthClient<tonic::transport::Channel> {
    let addr = broker.health_addr.expect("health listener requested");
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("plaintext health connects");
    HealthClient::new(channel)
}

async fn status_of(
    client: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
) -> Result<i32, tonic::Status> {
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    let response = tokio::time::timeout(RPC_BOUND, client.check(request))
        .await
        .expect("bounded")?;
    Ok(response.into_inner().status)
}

/// Polls the plaintext health port until `service` reports `wanted`, for up to 15 s.
async fn wait_for_status(
    client: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
    wanted: ServingStatus,
) -> bool {
    for _ in 0..150 {
        if status_of(client, service).await.ok() == Some(wanted as i32) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn with_health() -> Options {
    Options {
        health_listener: true,
        ..Options::default()
    }
}

#[tokio::test]
async fn readiness_turns_serving_only_after_the_first_management_token() {
    let broker = TestBroker::start_with(Options {
        token_faults: vec![Fault::Status(503); 4],
        ..with_health()
    })
    .await;
    let mut health = plaintext_health(&broker).await;
    assert_eq!(
        status_of(&mut health, "").await.expect("liveness"),
        ServingStatus::Serving as i32
    );
    assert_eq!(
        status_of(&mut health, READINESS).await.expect("readiness"),
        ServingStatus::NotServing as i32,
        "not ready while Auth0 refuses tokens"
    );
    assert!(wait_for_status(&mut health, READINESS, ServingStatus::Serving).await);
    assert!(
        broker.emulator.calls().token >= 5,
        "retried until a token came"
    );
    broker.stop().await;
}

#[tokio::test]
async fn plaintext_port_serves_health_only() {
    let broker = TestBroker::start_with(with_health()).await;
    let addr = broker.health_addr.expect("health listener");
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    let mut api = tokenbroker::proto::token_broker_client::TokenBrokerClient::new(channel);
    let status = tokio::time::timeout(
        RPC_BOUND,
        api.get_idp_token(tokenbroker::proto::GetIdpTokenRequest {
            user_id: seed::GITHUB_USER.into(),
            provider: "github".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("bounded")
    .unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unimplemented,
        "no TokenBroker in plaintext"
    );
    broker.stop().await;
}

#[tokio::test]
async fn health_watch_reports_not_serving_as_soon_as_shutdown_begins() {
    let mut broker = TestBroker::start_with(with_health()).await;
    let mut health = plaintext_health(&broker).await;
    assert!(wait_for_status(&mut health, READINESS, ServingStatus::Serving).await);
    let mut liveness = tokio::time::timeout(
        RPC_BOUND,
        health.watch(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .expect("bounded")
    .expect("watch")
    .into_inner();
    let mut readiness = tokio::time::timeout(
        RPC_BOUND,
        health.watch(HealthCheckRequest {
            service: READINESS.into(),
        }),
    )
    .await
    .expect("bounded")
    .expect("watch")
    .into_inner();
    let first = tokio::time::timeout(RPC_BOUND, liveness.message())
        .await
        .expect("bounded");
    assert_eq!(
        first.expect("ok").expect("message").status,
        ServingStatus::Serving as i32
    );
    let first = tokio::time::timeout(RPC_BOUND, readiness.message())
        .await
        .expect("bounded");
    assert_eq!(
        first.expect("ok").expect("message").status,
        ServingStatus::Serving as i32
    );

    broker.begin_shutdown();
    for stream in [&mut liveness, &mut readiness] {
        let next = tokio::time::timeout(RPC_BOUND, stream.message())
            .await
            .expect("bounded");
        assert_eq!(
            next.expect("ok").expect("message").status,
            ServingStatus::NotServing as i32
        );
    }
    drop(liveness);
    drop(readiness);
    assert!(broker.wait_stopped().await.is_some(), "server stopped");
}

#[tokio::test]
async fn in_flight_rpc_completes_during_shutdown_and_new_connections_are_refused() {
    let mut broker = TestBroker::start().await;
    broker.emulator.set_latency(Duration::from_millis(1500));
    let mut client = broker.client().await;
    let in_flight = tokio::spawn(async move {
        tokio::time::timeout(
            RPC_BOUND,
            client.get_idp_token(tokenbroker::proto::GetIdpTokenRequest {
                user_id: seed::GITHUB_USER.into(),
                provider: "github".into(),
                ..Default::default()
            }),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    broker.begin_shutdown();
    let answer = in_flight
        .await
        .expect("task")
        .expect("bounded")
        .expect("RPC completed during drain");
    assert_eq!(
        answer.into_inner().token.expect("token").access_token,
        seed::GITHUB_ACCESS_TOKEN
    );
    let stopped = broker.wait_stopped().await.expect("server stopped");
    assert!(stopped.is_ok(), "clean exit: {stopped:?}");
    assert!(
        broker
            .client_with(Some(&broker.client_cert), &broker.ca.cert_pem)
            .await
            .is_err(),
        "no new connections after shutdown"
    );
}

#[tokio::test]
async fn rpc_still_running_after_the_grace_period_gets_unavailable() {
    let mut broker = TestBroker::start_with(Options {
        run: RunSettings {
            shutdown_grace: Duration::from_millis(300),
            reload_interval: Duration::from_millis(100),
        },
        ..Options::default()
    })
    .await;
    broker.emulator.set_latency(Duration::from_secs(8));
    let mut client = broker.client().await;
    let started = Instant::now();
    let in_flight = tokio::spawn(async move {
        tokio::time::timeout(
            RPC_BOUND,
            client.get_idp_token(tokenbroker::proto::GetIdpTokenRequest {
                user_id: seed::GITHUB_USER.into(),
                provider: "github".into(),
                ..Default::default()
            }),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.begin_shutdown();
    let status = in_flight
        .await
        .expect("task")
        .expect("bounded")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("shutting down"),
        "{}",
        status.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "answered at the end of the grace period, not after Auth0"
    );
    assert!(broker.wait_stopped().await.is_some());
}

/// Replaces `path` atomically, as a Kubernetes secret update does.
fn replace_file(path: &std::path::Path, contents: &str, private: bool) {
    let staging = path.with_extension("staging");
    write_file(&staging, contents, private).expect("write");
    std::fs::rename(&staging, path).expect("rename");
}

#[tokio::test]
async fn rotated_certificates_are_used_without_restart_and_open_connections_survive() {
    let broker = TestBroker::start().await;
    let mut old_client = broker.client().await;
    broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("before rotation");

    let new_ca = CertificateAuthority::generate("rotated CA").expect("CA");
    let server = new_ca
        .issue(&LeafSpec::loopback_server())
        .expect("server cert");
    let client = new_ca
        .issue(&LeafSpec::spiffe_client(
            "spiffe://test.example/ns/it/sa/client",
        ))
        .expect("client cert");
    replace_file(&broker.files.client_ca, &new_ca.cert_pem, false);
    replace_file(&broker.files.key, &server.key_pem, true);
    replace_file(&broker.files.cert, &server.cert_pem, false);

    let mut connected = None;
    for _ in 0..100 {
        if let Ok(mut fresh) = broker.client_with(Some(&client), &new_ca.cert_pem).await {
            let call = fresh.get_idp_token(tokenbroker::proto::GetIdpTokenRequest {
                user_id: seed::GITHUB_USER.into(),
                provider: "github".into(),
                ..Default::default()
            });
            if let Ok(Ok(response)) = tokio::time::timeout(RPC_BOUND, call).await {
                connected = Some(response.into_inner());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let response = connected.expect("a client trusting only the new CA connects after the swap");
    assert_eq!(
        response.token.expect("token").access_token,
        seed::GITHUB_ACCESS_TOKEN
    );
    assert!(broker.tls.reloads() >= 1);

    let still_open = tokio::time::timeout(
        RPC_BOUND,
        old_client.get_idp_token(tokenbroker::proto::GetIdpTokenRequest {
            user_id: seed::GITHUB_USER.into(),
            provider: "github".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("bounded");
    assert!(
        still_open.is_ok(),
        "the connection opened before rotation keeps working"
    );
    broker.stop().await;
}

#[tokio::test]
async fn unreadable_new_key_keeps_the_old_certificate() {
    let broker = TestBroker::start().await;
    // The broker is serving (and watching its files) once it has answered.
    broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("before the bad key");
    replace_file(&broker.files.key, "not a key", true);
    for _ in 0..100 {
        if broker.tls.failed_reloads() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(broker.tls.failed_reloads() > 0, "the bad key was noticed");
    broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("new handshakes still use the old material");
    broker.stop().await;
}
