//! SIGTERM: in-flight RPCs finish and the binary exits 0.

use std::time::Duration;

use tokenbroker::emulator::seed;
use tokenbroker::testkit::Credentials;

use super::{terminate, ServedBinary};
use crate::support::{get_on, get_request};

/// What the drained broker and its emulator agree on.
const CREDENTIALS: Credentials<'static> = Credentials {
    client_id: "drain-test",
    client_secret: "drain-test-secret",
};

#[tokio::test]
async fn sigterm_lets_an_in_flight_rpc_finish_and_exits_0() {
    const CALLER_ID: &str = "spiffe://test.example/ns/it/sa/drain";
    let emulator = CREDENTIALS.start_emulator().await.expect("emulator starts");
    let mut served = ServedBinary::start(
        &emulator,
        CREDENTIALS,
        &[CALLER_ID],
        &format!("[[caller]]\nid = \"{CALLER_ID}\"\nproviders = [\"*\"]\n"),
        "info",
    );
    let cert = served.client_certs.pop().expect("cert");
    let mut client = served.connect_when_listening(&cert).await;
    emulator.set_latency(Duration::from_millis(1500));
    let in_flight =
        tokio::spawn(
            async move { get_on(&mut client, get_request(seed::GITHUB_USER, "github")).await },
        );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = terminate(&mut served.child).await;
    let token = in_flight
        .await
        .expect("task")
        .expect("the RPC in flight at SIGTERM completes");
    assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
    assert!(status.success(), "exit 0 after draining: {status}");
    emulator.shutdown().await;
}
