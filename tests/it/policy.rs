//! Caller policy over real mTLS: who may have which provider's tokens, how
//! callers are identified, and live reloads of the policy file.

use std::time::Duration;

use tokenbroker::emulator::seed;
use tokenbroker::pki::{write_file, LeafSpec};
use tokenbroker::proto::{InvalidateUserRequest, ListIdpTokensRequest};
use tonic::Code;

use crate::support::{Options, TestBroker, RPC_BOUND};

/// The identity of the harness's default client certificate.
const DEFAULT_CLIENT: &str = "spiffe://test.example/ns/it/sa/client";

fn policy(entries: &[(&str, &str, bool)]) -> String {
    entries
        .iter()
        .map(|(id, providers, invalidate)| {
            format!("[[caller]]\nid = \"{id}\"\nproviders = [{providers}]\ninvalidate = {invalidate}\n\n")
        })
        .collect()
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
    let get = broker.get(seed::GITHUB_USER, "github").await.unwrap_err();
    assert_eq!(get.code(), Code::PermissionDenied);
    assert!(get.message().contains(DEFAULT_CLIENT), "{}", get.message());
    let mut client = broker.client().await;
    let list = tokio::time::timeout(
        RPC_BOUND,
        client.list_idp_tokens(ListIdpTokensRequest {
            user_id: seed::LINKED_USER.into(),
        }),
    )
    .await
    .expect("bounded")
    .unwrap_err();
    assert_eq!(list.code(), Code::PermissionDenied);
    let invalidate = tokio::time::timeout(
        RPC_BOUND,
        client.invalidate_user(InvalidateUserRequest {
            user_id: seed::GITHUB_USER.into(),
        }),
    )
    .await
    .expect("bounded")
    .unwrap_err();
    assert_eq!(invalidate.code(), Code::PermissionDenied);
    assert_eq!(broker.emulator.calls().users, 0);
    broker.stop().await;
}

#[tokio::test]
async fn provider_outside_the_callers_list_is_denied_by_name() {
    let broker = broker_with_policy(policy(&[(DEFAULT_CLIENT, "\"github\"", false)])).await;
    let status = broker
        .get(seed::GOOGLE_USER, "google-oauth2")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
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
    let status = broker
        .get_with(tokenbroker::proto::GetIdpTokenRequest {
            user_id: seed::LINKED_USER.into(),
            connection: seed::CORP_SSO_CONNECTION.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("oauth2"), "{}", status.message());
    broker.stop().await;
}

#[tokio::test]
async fn list_returns_only_the_providers_the_caller_may_have() {
    let broker =
        broker_with_policy(policy(&[(DEFAULT_CLIENT, "\"github\", \"oauth2\"", false)])).await;
    let mut client = broker.client().await;
    let tokens = tokio::time::timeout(
        RPC_BOUND,
        client.list_idp_tokens(ListIdpTokensRequest {
            user_id: seed::LINKED_USER.into(),
        }),
    )
    .await
    .expect("bounded")
    .expect("allowed")
    .into_inner()
    .tokens;
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
    let denied = broker_with_policy(policy(&[(DEFAULT_CLIENT, "\"*\"", false)])).await;
    let mut client = denied.client().await;
    let status = tokio::time::timeout(
        RPC_BOUND,
        client.invalidate_user(InvalidateUserRequest {
            user_id: seed::GITHUB_USER.into(),
        }),
    )
    .await
    .expect("bounded")
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("invalidate"),
        "{}",
        status.message()
    );
    denied.stop().await;

    let allowed = broker_with_policy(policy(&[(DEFAULT_CLIENT, "\"*\"", true)])).await;
    let mut client = allowed.client().await;
    tokio::time::timeout(
        RPC_BOUND,
        client.invalidate_user(InvalidateUserRequest {
            user_id: seed::GITHUB_USER.into(),
        }),
    )
    .await
    .expect("bounded")
    .expect("invalidate allowed");
    allowed.stop().await;
}

#[tokio::test]
async fn callers_are_identified_by_spiffe_id_then_dns_name_then_common_name() {
    let broker = broker_with_policy(policy(&[
        ("billing.prod.svc.cluster.local", "\"github\"", false),
        ("legacy-billing", "\"github\"", false),
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
        let mut client = broker
            .client_with(Some(cert), &broker.ca.cert_pem)
            .await
            .expect("connects");
        let result = tokio::time::timeout(
            RPC_BOUND,
            client.get_idp_token(tokenbroker::proto::GetIdpTokenRequest {
                user_id: seed::GITHUB_USER.into(),
                provider: "github".into(),
                ..Default::default()
            }),
        )
        .await
        .expect("bounded");
        match (allowed, result) {
            (true, Ok(_)) => {}
            (false, Err(status)) => assert_eq!(status.code(), Code::PermissionDenied),
            (allowed, other) => panic!("allowed={allowed} but got {other:?}"),
        }
    }
    broker.stop().await;
}

/// Polls `check` every 50 ms for up to 10 s.
async fn eventually(mut check: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..200 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn edited_policy_takes_effect_and_a_broken_one_is_ignored() {
    let broker = broker_with_policy(policy(&[(DEFAULT_CLIENT, "\"github\"", false)])).await;
    assert_eq!(
        broker
            .get(seed::GOOGLE_USER, "google-oauth2")
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    write_file(
        &broker.policy_path,
        &policy(&[(DEFAULT_CLIENT, "\"github\", \"google-oauth2\"", false)]),
        false,
    )
    .expect("write");
    assert!(
        eventually(async || broker.get(seed::GOOGLE_USER, "google-oauth2").await.is_ok()).await,
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
