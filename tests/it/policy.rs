//! Caller policy over real mTLS: who may have which provider's tokens, how
//! callers are identified, and live reloads of the policy file.

use std::time::Duration;

use tokenbroker::emulator::seed;
use tokenbroker::pki::{write_file, LeafSpec};
use tokenbroker::proto::GetIdpTokenRequest;
use tonic::{Code, Status};

use crate::support::{
    eventually, get_request, Options, TestBroker, CLIENT_SPIFFE_ID as DEFAULT_CLIENT,
};

fn policy(entries: &[(&str, &str, bool)]) -> String {
    entries
        .iter()
        .map(|(id, providers, invalidate)| {
            format!("[[caller]]\nid = \"{id}\"\nproviders = [{providers}]\ninvalidate = {invalidate}\n\n")
        })
        .collect()
}

/// Expects PERMISSION_DENIED; returns the status for further checks.
fn denied<T: std::fmt::Debug>(result: Result<T, Status>) -> Status {
    let status = result.expect_err("the policy denies this");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    status
}

async fn broker_with_policy(text: String) -> TestBroker {
    TestBroker::start_with(Options {
        policy_toml: Some(text),
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn listed_caller_gets_its_provider() {
    let broker = broker_with_policy(policy(&[(DEFAULT_CLIENT, "\"github\"", false)])).await;
    let token = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("allowed");
    assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
    broker.stop().await;
}

#[tokio::test]
async fn unlisted_caller_is_denied_every_rpc_without_reaching_auth0() {
    let broker =
        broker_with_policy(policy(&[("spiffe://test.example/other", "\"*\"", true)])).await;
    let get = denied(broker.get(seed::GITHUB_USER, "github").await);
    assert!(get.message().contains(DEFAULT_CLIENT), "{}", get.message());
    denied(broker.list(seed::LINKED_USER).await);
    denied(broker.invalidate(seed::GITHUB_USER).await);
    assert_eq!(broker.emulator.calls().users, 0);
    broker.stop().await;
}

#[tokio::test]
async fn provider_outside_the_callers_list_is_denied_by_name() {
    let broker = broker_with_policy(policy(&[(DEFAULT_CLIENT, "\"github\"", false)])).await;
    let status = denied(broker.get(seed::GOOGLE_USER, "google-oauth2").await);
    assert!(
        status.message().contains("google-oauth2"),
        "{}",
        status.message()
    );
    assert!(!status.message().contains(seed::GOOGLE_ACCESS_TOKEN));
    assert_eq!(
        broker.emulator.calls().users,
        0,
        "denied before asking Auth0"
    );
    broker.stop().await;
}

#[tokio::test]
async fn connection_of_a_denied_provider_is_denied() {
    let broker = broker_with_policy(policy(&[(DEFAULT_CLIENT, "\"github\"", false)])).await;
    let request = GetIdpTokenRequest {
        connection: seed::CORP_SSO_CONNECTION.into(),
        ..get_request(seed::LINKED_USER, "")
    };
    let status = denied(broker.get_with(request).await);
    assert!(status.message().contains("oauth2"), "{}", status.message());
    broker.stop().await;
}

#[tokio::test]
async fn list_returns_only_the_providers_the_caller_may_have() {
    let broker =
        broker_with_policy(policy(&[(DEFAULT_CLIENT, "\"github\", \"oauth2\"", false)])).await;
    let tokens = broker.list(seed::LINKED_USER).await.expect("allowed");
    let mut providers: Vec<_> = tokens.iter().map(|t| t.provider.as_str()).collect();
    providers.sort_unstable();
    assert_eq!(providers, ["github", "oauth2"]);
    assert!(tokens
        .iter()
        .all(|t| t.access_token != seed::LINKED_GOOGLE_ACCESS_TOKEN));
    broker.stop().await;
}

#[tokio::test]
async fn first_identity_skips_providers_the_caller_may_not_have() {
    let broker = broker_with_policy(policy(&[(DEFAULT_CLIENT, "\"oauth2\"", false)])).await;
    let token = broker
        .get(seed::LINKED_USER, "")
        .await
        .expect("allowed identity");
    assert_eq!(token.provider, "oauth2");
    assert_eq!(token.access_token, seed::LINKED_CORP_ACCESS_TOKEN);
    broker.stop().await;
}

#[tokio::test]
async fn invalidate_needs_the_invalidate_permission() {
    let denying = broker_with_policy(policy(&[(DEFAULT_CLIENT, "\"*\"", false)])).await;
    let status = denied(denying.invalidate(seed::GITHUB_USER).await);
    assert!(
        status.message().contains("invalidate"),
        "{}",
        status.message()
    );
    denying.stop().await;

    let allowed = broker_with_policy(policy(&[(DEFAULT_CLIENT, "\"*\"", true)])).await;
    allowed
        .invalidate(seed::GITHUB_USER)
        .await
        .expect("invalidate allowed");
    allowed.stop().await;
}

#[tokio::test]
async fn callers_are_identified_by_spiffe_id_then_dns_name_then_common_name() {
    let broker = broker_with_policy(policy(&[
        ("billing.prod.svc.cluster.local", "\"github\"", false),
        ("cn:legacy-billing", "\"github\"", false),
    ]))
    .await;
    let dns = broker
        .ca
        .issue(&LeafSpec::dns_client("billing.prod.svc.cluster.local"))
        .expect("cert");
    let cn = broker
        .ca
        .issue(&LeafSpec::cn_client("legacy-billing"))
        .expect("cert");
    // A SPIFFE id wins over a DNS name and CN that are listed.
    let spiffe = broker
        .ca
        .issue(&LeafSpec {
            common_name: "legacy-billing".into(),
            dns_names: vec!["billing.prod.svc.cluster.local".into()],
            uris: vec!["spiffe://test.example/ns/prod/sa/unlisted".into()],
            ..LeafSpec::default()
        })
        .expect("cert");
    for (cert, allowed) in [(&dns, true), (&cn, true), (&spiffe, false)] {
        let result = broker.get_as(cert, seed::GITHUB_USER, "github").await;
        if allowed {
            result.expect("allowed");
        } else {
            denied(result);
        }
    }
    broker.stop().await;
}

#[tokio::test]
async fn edited_policy_takes_effect_and_a_broken_one_is_ignored() {
    let broker = broker_with_policy(policy(&[(DEFAULT_CLIENT, "\"github\"", false)])).await;
    denied(broker.get(seed::GOOGLE_USER, "google-oauth2").await);
    write_file(
        &broker.policy_path,
        &policy(&[(DEFAULT_CLIENT, "\"github\", \"google-oauth2\"", false)]),
        false,
    )
    .expect("write");
    assert!(
        eventually(Duration::from_secs(10), async || broker
            .get(seed::GOOGLE_USER, "google-oauth2")
            .await
            .is_ok())
        .await,
        "the new policy was never applied"
    );
    write_file(
        &broker.policy_path,
        "[[caller]]\nid = \"x\"\nbogus = 1\n",
        false,
    )
    .expect("write");
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker
        .get(seed::GOOGLE_USER, "google-oauth2")
        .await
        .expect("a broken policy file keeps the previous policy");
    broker.stop().await;
}
