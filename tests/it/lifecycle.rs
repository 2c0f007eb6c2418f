//! Running on Kubernetes: readiness and liveness over gRPC health (mTLS and
//! plaintext), graceful shutdown, and certificate rotation without restart.

use std::time::{Duration, Instant};

use tokenbroker::emulator::{seed, Fault};
use tokenbroker::pki::{write_file, CertificateAuthority, LeafSpec};
use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::IdpToken;
use tokenbroker::server::RunSettings;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::support::{
    bounded, eventually, get_on, get_request, health_status as status_of, Options, TestBroker,
    CLIENT_SPIFFE_ID,
};

const READINESS: &str = "tokenbroker.v1.TokenBroker";

/// A plaintext channel to the broker's health port.
async fn plaintext_channel(broker: &TestBroker) -> Channel {
    let addr = broker.health_addr.expect("health listener requested");
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("plaintext health connects")
}

async fn plaintext_health(broker: &TestBroker) -> HealthClient<Channel> {
    HealthClient::new(plaintext_channel(broker).await)
}

/// Polls the plaintext health port until `service` reports `wanted`, for up to 15 s.
async fn wait_for_status(
    client: &mut HealthClient<Channel>,
    service: &str,
    wanted: ServingStatus,
) -> bool {
    eventually(Duration::from_secs(15), async || {
        status_of(client, service).await.ok() == Some(wanted as i32)
    })
    .await
}

/// The status in the next message of a health watch, bounded.
async fn next_status(stream: &mut Streaming<HealthCheckResponse>) -> i32 {
    bounded("the next watch message", stream.message())
        .await
        .expect("ok")
        .expect("message")
        .status
}

/// Asks for the seeded GitHub user's GitHub token on `client` in the
/// background (bounded), so the RPC can be in flight when shutdown begins.
fn get_in_background(
    mut client: TokenBrokerClient<Channel>,
) -> JoinHandle<Result<IdpToken, Status>> {
    tokio::spawn(async move { get_on(&mut client, get_request(seed::GITHUB_USER, "github")).await })
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
    let mut api = TokenBrokerClient::new(plaintext_channel(&broker).await);
    let status = get_on(&mut api, get_request(seed::GITHUB_USER, "github"))
        .await
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
    let mut streams = Vec::new();
    for service in ["", READINESS] {
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        let stream = bounded("Health/Watch", health.watch(request))
            .await
            .expect("watch")
            .into_inner();
        streams.push(stream);
    }
    for stream in &mut streams {
        assert_eq!(next_status(stream).await, ServingStatus::Serving as i32);
    }

    broker.begin_shutdown();
    for stream in &mut streams {
        assert_eq!(next_status(stream).await, ServingStatus::NotServing as i32);
    }
    drop(streams);
    assert!(broker.wait_stopped().await.is_some(), "server stopped");
}

#[tokio::test]
async fn in_flight_rpc_completes_during_shutdown_and_new_connections_are_refused() {
    let mut broker = TestBroker::start().await;
    broker.emulator.set_latency(Duration::from_millis(1500));
    let in_flight = get_in_background(broker.client().await);
    tokio::time::sleep(Duration::from_millis(400)).await;
    broker.begin_shutdown();
    let answer = in_flight
        .await
        .expect("task")
        .expect("RPC completed during drain");
    assert_eq!(answer.access_token, seed::GITHUB_ACCESS_TOKEN);
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
            ..Options::default().run
        },
        ..Options::default()
    })
    .await;
    broker.emulator.set_latency(Duration::from_secs(8));
    let client = broker.client().await;
    let started = Instant::now();
    let in_flight = get_in_background(client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.begin_shutdown();
    let status = in_flight.await.expect("task").unwrap_err();
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
        .issue(&LeafSpec::spiffe_client(CLIENT_SPIFFE_ID))
        .expect("client cert");
    replace_file(&broker.files.client_ca, &new_ca.cert_pem, false);
    replace_file(&broker.files.key, &server.key_pem, true);
    replace_file(&broker.files.cert, &server.cert_pem, false);

    let mut connected = None;
    eventually(Duration::from_secs(10), async || {
        if let Ok(mut fresh) = broker.client_with(Some(&client), &new_ca.cert_pem).await {
            connected = get_on(&mut fresh, get_request(seed::GITHUB_USER, "github"))
                .await
                .ok();
        }
        connected.is_some()
    })
    .await;
    let token = connected.expect("a client trusting only the new CA connects after the swap");
    assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
    assert!(broker.tls.reloads() >= 1);

    let still_open = get_on(&mut old_client, get_request(seed::GITHUB_USER, "github")).await;
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
    eventually(Duration::from_secs(5), async || {
        broker.tls.failed_reloads() > 0
    })
    .await;
    assert!(broker.tls.failed_reloads() > 0, "the bad key was noticed");
    broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("new handshakes still use the old material");
    broker.stop().await;
}
