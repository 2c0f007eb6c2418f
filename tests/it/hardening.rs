//! What an attacker with a certificate from the client CA tried, and what the
//! broker now does about it: certificates whose SAN cannot be read are no
//! caller (never a fallback to the CN), names of one kind cannot pass for
//! another, malformed requests are refused like any other refusal, the
//! policy comes before the request's fields, `bypass_cache` is a privilege,
//! and one caller cannot spend the whole Auth0 budget.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use futures::future::join_all;
use prost::Message;
use tokenbroker::auth0::OutboundLimits;
use tokenbroker::emulator::seed;
use tokenbroker::pki::{IssuedCertificate, LeafSpec, RawExtension};
use tokenbroker::proto::ListIdpTokensRequest;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::support::{
    bounded, bypass_request, get_on, get_request, invalidate_on, list_on, mtls_channel, send_raw,
    Options, TestBroker,
};

/// The workload an attacker wants to pass for.
const REPORTS: &str = "spiffe://test.example/ns/prod/sa/reports";
/// A workload the policy lists with a narrow rule.
const GREEDY: &str = "spiffe://test.example/ns/prod/sa/greedy";
const POLITE: &str = "spiffe://test.example/ns/prod/sa/polite";

/// OID of the subjectAltName extension.
const SAN_OID: [u64; 4] = [2, 5, 29, 17];

fn policy_listing_reports() -> String {
    format!(
        "[[caller]]\nid = \"{REPORTS}\"\nproviders = [\"*\"]\ninvalidate = true\n\n\
         [[caller]]\nid = \"cn:legacy-reports\"\nproviders = [\"github\"]\n"
    )
}

async fn broker_listing_reports() -> TestBroker {
    TestBroker::start_with(Options {
        policy_toml: Some(policy_listing_reports()),
        ..Options::default()
    })
    .await
}

/// DER of a SAN extension holding one URI SAN with these raw bytes.
fn san_with_uri_bytes(uri: &[u8]) -> Vec<u8> {
    let mut general_name = vec![0x86, u8::try_from(uri.len()).expect("short")];
    general_name.extend_from_slice(uri);
    let mut san = vec![0x30, u8::try_from(general_name.len()).expect("short")];
    san.extend(general_name);
    san
}

/// A client certificate whose CN is the victim's SPIFFE id and whose only SAN
/// extensions are `extensions`, written verbatim.
fn impostor(broker: &TestBroker, extensions: Vec<Vec<u8>>) -> IssuedCertificate {
    broker
        .ca
        .issue(&LeafSpec {
            common_name: REPORTS.to_owned(),
            raw_extensions: extensions
                .into_iter()
                .map(|content| RawExtension {
                    oid: SAN_OID.to_vec(),
                    content,
                })
                .collect(),
            ..LeafSpec::default()
        })
        .expect("certificate")
}

/// Asserts a PERMISSION_DENIED whose ErrorInfo says `reason`.
fn assert_refused(result: Result<impl std::fmt::Debug, Status>, reason: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_reason(&status, reason);
}

fn assert_reason(status: &Status, reason: &str) {
    let info = status.get_details_error_info().expect("ErrorInfo attached");
    assert_eq!(info.domain, "tokenbroker");
    assert_eq!(info.reason, reason, "{status:?}");
}

#[tokio::test]
async fn a_certificate_whose_uri_san_cannot_be_read_is_no_caller_even_with_a_listed_cn() {
    let broker = broker_listing_reports().await;
    // rustls's own checks refuse some of these at the handshake; the broker
    // must refuse the rest. Never may one of them act as REPORTS.
    let cases = [
        (
            "URI SAN with bytes that are not IA5 text (the reported attack)",
            vec![san_with_uri_bytes(b"spiffe://test.example/\xff\xfe")],
        ),
        (
            "URI SAN that is not a URI",
            vec![san_with_uri_bytes(b"not a uri")],
        ),
        (
            "SAN extension that is not DER",
            vec![vec![0x30, 0x03, 0xff, 0xff, 0xff]],
        ),
        (
            "two SAN extensions",
            vec![
                san_with_uri_bytes(REPORTS.as_bytes()),
                san_with_uri_bytes(b"spiffe://test.example/ns/prod/sa/other"),
            ],
        ),
    ];
    let mut refused_by_the_broker = Vec::new();
    for (what, extensions) in cases {
        let cert = impostor(&broker, extensions);
        let Ok(mut client) = broker.client_with(Some(&cert), &broker.ca.cert_pem).await else {
            continue; // refused at the handshake
        };
        let status = get_on(&mut client, get_request(seed::GOOGLE_USER, "google-oauth2"))
            .await
            .expect_err(what);
        if status.code() == Code::Unavailable || status.code() == Code::Unknown {
            continue; // the handshake failed lazily, on the first RPC
        }
        assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
        assert_reason(&status, "CALLER_UNKNOWN");
        assert!(
            status.message().contains("no caller id"),
            "{what}: {}",
            status.message()
        );
        refused_by_the_broker.push(what);
    }
    assert!(
        refused_by_the_broker.iter().any(|what| what.contains("reported attack")),
        "the reported certificate reached the broker and was refused there: {refused_by_the_broker:?}"
    );
    assert_eq!(broker.emulator.calls().users, 0, "nothing reached Auth0");
    broker.stop().await;
}

#[tokio::test]
async fn a_dns_san_that_is_not_a_dns_name_is_no_caller() {
    let broker = broker_listing_reports().await;
    let cert = broker
        .ca
        .issue(&LeafSpec::dns_client(REPORTS))
        .expect("certificate");
    assert_refused(
        broker.get_as(&cert, seed::GITHUB_USER, "github").await,
        "CALLER_UNKNOWN",
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_cn_spelled_like_a_spiffe_id_does_not_pass_for_that_workload() {
    let broker = broker_listing_reports().await;
    let cert = impostor(&broker, Vec::new());
    assert_refused(
        broker.get_as(&cert, seed::GITHUB_USER, "github").await,
        "CALLER_UNKNOWN",
    );
    // A CN is still a caller when the policy names it as one.
    let legacy = broker
        .ca
        .issue(&LeafSpec::cn_client("legacy-reports"))
        .expect("certificate");
    broker
        .get_as(&legacy, seed::GITHUB_USER, "github")
        .await
        .expect("cn:legacy-reports is listed");
    broker.stop().await;
}

#[tokio::test]
async fn an_unlisted_caller_is_refused_before_its_user_id_is_looked_at() {
    let broker = broker_listing_reports().await;
    let stranger = broker
        .ca
        .issue(&LeafSpec::spiffe_client(
            "spiffe://test.example/ns/x/sa/stranger",
        ))
        .expect("certificate");
    let mut client = broker
        .client_with(Some(&stranger), &broker.ca.cert_pem)
        .await
        .expect("connects");
    let bad_user_id = "x\n2026-01-01T00:00:00Z  INFO audit: outcome=\"released\"";
    assert_refused(
        get_on(&mut client, get_request(bad_user_id, "github")).await,
        "CALLER_UNKNOWN",
    );
    assert_refused(list_on(&mut client, "").await, "CALLER_UNKNOWN");
    assert_refused(invalidate_on(&mut client, "").await, "CALLER_UNKNOWN");
    assert_refused(
        invalidate_on(&mut client, bad_user_id).await,
        "CALLER_UNKNOWN",
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_malformed_request_is_invalid_argument_for_a_listed_caller_and_unknown_for_others() {
    let broker = broker_listing_reports().await;
    let reports = broker
        .ca
        .issue(&LeafSpec::spiffe_client(REPORTS))
        .expect("certificate");
    let stranger = broker
        .ca
        .issue(&LeafSpec::spiffe_client(
            "spiffe://test.example/ns/x/sa/stranger",
        ))
        .expect("certificate");
    // Field 1 (user_id) holding bytes that are not UTF-8.
    let invalid_utf8 = b"\x0a\x09github|\xff\xfe".to_vec();
    // A whole message cut short: field 1 claims more bytes than follow.
    let whole = ListIdpTokensRequest {
        user_id: seed::GITHUB_USER.to_owned(),
        ..Default::default()
    }
    .encode_to_vec();
    let truncated = whole[..whole.len() - 3].to_vec();
    for (what, body) in [("invalid UTF-8", invalid_utf8), ("truncated", truncated)] {
        for method in ["GetIdpToken", "ListIdpTokens", "InvalidateUser"] {
            let channel = mtls_channel(broker.addr, &broker.ca.cert_pem, Some(&reports))
                .await
                .expect("connects");
            let status = send_raw(channel, method, body.clone()).await;
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{what} {method}: {status:?}"
            );
            assert_reason(&status, "MALFORMED_REQUEST");
            assert!(
                status.metadata().get("x-tokenbroker-malformed").is_none(),
                "the internal marker never leaves the broker"
            );
            let channel = mtls_channel(broker.addr, &broker.ca.cert_pem, Some(&stranger))
                .await
                .expect("connects");
            let status = send_raw(channel, method, body.clone()).await;
            assert_eq!(
                status.code(),
                Code::PermissionDenied,
                "{what} {method}: {status:?}"
            );
            assert_reason(&status, "CALLER_UNKNOWN");
        }
    }
    assert_eq!(broker.emulator.calls().users, 0, "nothing reached Auth0");
    broker.stop().await;
}

#[tokio::test]
async fn bypass_cache_is_refused_to_a_caller_without_the_privilege() {
    let policy = format!(
        "[[caller]]\nid = \"{GREEDY}\"\nproviders = [\"github\"]\n\n\
         [[caller]]\nid = \"{POLITE}\"\nproviders = [\"github\"]\nbypass_cache = true\n"
    );
    let broker = TestBroker::start_with(Options {
        policy_toml: Some(policy),
        ..Options::default()
    })
    .await;
    let greedy = broker
        .ca
        .issue(&LeafSpec::spiffe_client(GREEDY))
        .expect("certificate");
    let polite = broker
        .ca
        .issue(&LeafSpec::spiffe_client(POLITE))
        .expect("certificate");
    let mut greedy = broker
        .client_with(Some(&greedy), &broker.ca.cert_pem)
        .await
        .expect("connects");
    let mut polite = broker
        .client_with(Some(&polite), &broker.ca.cert_pem)
        .await
        .expect("connects");
    assert_refused(
        get_on(&mut greedy, bypass_request(seed::GITHUB_USER, "github")).await,
        "RPC_NOT_ALLOWED",
    );
    assert_eq!(broker.emulator.calls().users, 0, "refused before Auth0");
    get_on(&mut polite, bypass_request(seed::GITHUB_USER, "github"))
        .await
        .expect("granted bypass_cache");
    broker.stop().await;
}

#[tokio::test]
async fn one_caller_hammering_bypass_cache_cannot_starve_another_callers_misses() {
    const RATE: u32 = 10;
    const BURST: u32 = 10;
    let policy = format!(
        "[[caller]]\nid = \"{GREEDY}\"\nproviders = [\"github\"]\nbypass_cache = true\n\n\
         [[caller]]\nid = \"{POLITE}\"\nproviders = [\"*\"]\n"
    );
    let broker = TestBroker::start_with(Options {
        policy_toml: Some(policy),
        outbound: OutboundLimits {
            rate_per_second: NonZeroU32::new(RATE).expect("non-zero"),
            burst: NonZeroU32::new(BURST).expect("non-zero"),
            ..OutboundLimits::default()
        },
        caller_share: 0.5,
        ..Options::default()
    })
    .await;
    let greedy_cert = broker
        .ca
        .issue(&LeafSpec::spiffe_client(GREEDY))
        .expect("certificate");
    let polite_cert = broker
        .ca
        .issue(&LeafSpec::spiffe_client(POLITE))
        .expect("certificate");
    let greedy = broker
        .client_with(Some(&greedy_cert), &broker.ca.cert_pem)
        .await
        .expect("connects");
    let polite = broker
        .client_with(Some(&polite_cert), &broker.ca.cert_pem)
        .await
        .expect("connects");
    let hammer_for = Duration::from_secs(3);
    let started = Instant::now();
    let hammering = (0..8).map(|_| {
        let mut greedy = greedy.clone();
        tokio::spawn(async move {
            let mut sent = 0u32;
            while started.elapsed() < hammer_for && sent < 1_000 {
                sent += 1;
                let _ = get_on(&mut greedy, bypass_request(seed::GITHUB_USER, "github")).await;
            }
        })
    });
    let hammering: Vec<_> = hammering.collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Ten different users, each a cache miss, each with a 2.5 s deadline.
    let misses = (0..10).map(|i| {
        let mut polite = polite.clone();
        let user_id = format!("auth0|polite{i}");
        broker.emulator.upsert_user(serde_json::json!({
            "user_id": user_id,
            "identities": [{"provider": "github", "connection": "github", "user_id": i,
                            "access_token": format!("gho_polite_{i}")}],
        }));
        async move {
            let mut request = tonic::Request::new(get_request(&user_id, "github"));
            request.set_timeout(Duration::from_millis(2_500));
            get_on(&mut polite, request).await
        }
    });
    let results = join_all(misses).await;
    for handle in hammering {
        bounded("hammering ends", handle).await.expect("task");
    }
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "the polite caller's misses failed: {failed:?}"
    );
    // The greedy caller never had more than its share: half the burst and rate.
    let greedy_reads = broker.emulator.user_calls_for(seed::GITHUB_USER);
    let share_bound =
        f64::from(BURST / 2) + f64::from(RATE / 2) * started.elapsed().as_secs_f64() + 1.0;
    assert!(
        greedy_reads as f64 <= share_bound,
        "{greedy_reads} reads for the greedy caller, share allows {share_bound}"
    );
    broker.stop().await;
}
