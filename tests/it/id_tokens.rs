//! Binding a release to the user's own Auth0 ID token, over real mTLS against
//! the emulator's JWKS: the token's `sub` picks the user, every check that
//! fails is UNAUTHENTICATED naming the check, and a caller whose policy
//! requires an ID token gets nothing without one. Keys the broker cannot have
//! yet (a failing JWKS, a refresh held back) are UNAVAILABLE with RetryInfo.

use std::time::Duration;

use futures::future::join_all;
use tokenbroker::emulator::{seed, Audience, Endpoint, Fault, IdTokenSpec, KidHeader, Signing};
use tokenbroker::proto::{GetIdpTokenRequest, IdpToken, ListIdpTokensRequest};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::support::{bounded, get_request, Options, TestBroker, CLIENT_SPIFFE_ID};

/// A GetIdpToken request naming the user only through `id_token`.
fn bound_request(id_token: String, provider: &str) -> GetIdpTokenRequest {
    GetIdpTokenRequest {
        id_token,
        ..get_request("", provider)
    }
}

/// Expects UNAUTHENTICATED whose message names `check`, and no trace of the
/// token in it.
fn assert_refused(result: Result<impl std::fmt::Debug, Status>, token: &str, check: &str) {
    let status = result.expect_err("the ID token is refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains(check),
        "the message names the failed check ({check}): {}",
        status.message()
    );
    let signature = token.rsplit('.').next().unwrap_or_default();
    for part in token.split('.').filter(|part| part.len() > 8) {
        assert!(
            !status.message().contains(part),
            "the message echoes part of the token: {}",
            status.message()
        );
    }
    assert!(signature.is_empty() || !status.message().contains(signature));
}

/// The broker's answer to a GitHub request bound to the token `spec` describes.
async fn get_bound(broker: &TestBroker, spec: IdTokenSpec) -> (String, Result<String, Status>) {
    let token = broker.emulator.issue_id_token_with(spec);
    let result = broker
        .get_with(bound_request(token.clone(), "github"))
        .await
        .map(|released| released.access_token);
    (token, result)
}

/// GetIdpToken for the GitHub token of `user`, with a genuine ID token of theirs.
async fn get_signed_in(broker: &TestBroker, user: &str) -> Result<IdpToken, Status> {
    broker
        .get_with(bound_request(
            broker.emulator.issue_id_token(user),
            "github",
        ))
        .await
}

fn spec() -> IdTokenSpec {
    IdTokenSpec::for_user(seed::GITHUB_USER)
}

#[tokio::test]
async fn a_valid_id_token_releases_the_token_of_its_subject() {
    let broker = TestBroker::start().await;
    let token = broker.emulator.issue_id_token(seed::GITHUB_USER);
    let released = broker
        .get_with(bound_request(token.clone(), "github"))
        .await
        .expect("a genuine ID token is accepted");
    assert_eq!(released.access_token, seed::GITHUB_ACCESS_TOKEN);

    // With user_id too, naming the same user.
    let both = broker
        .get_with(GetIdpTokenRequest {
            id_token: token,
            ..get_request(seed::GITHUB_USER, "github")
        })
        .await
        .expect("user_id equal to sub is accepted");
    assert_eq!(both.access_token, seed::GITHUB_ACCESS_TOKEN);
    broker.stop().await;
}

#[tokio::test]
async fn list_with_an_id_token_lists_the_subjects_tokens() {
    let broker = TestBroker::start().await;
    let mut client = broker.client().await;
    let request = ListIdpTokensRequest {
        id_token: broker.emulator.issue_id_token(seed::LINKED_USER),
        ..Default::default()
    };
    let tokens = bounded("ListIdpTokens", client.list_idp_tokens(request))
        .await
        .expect("a genuine ID token is accepted")
        .into_inner()
        .tokens;
    let access: Vec<&str> = tokens.iter().map(|t| t.access_token.as_str()).collect();
    assert!(
        access.contains(&seed::LINKED_GITHUB_ACCESS_TOKEN),
        "{access:?}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_user_id_naming_someone_else_than_the_subject_is_invalid_argument() {
    let broker = TestBroker::start().await;
    let token = broker.emulator.issue_id_token(seed::GOOGLE_USER);
    let status = broker
        .get_with(GetIdpTokenRequest {
            id_token: token,
            ..get_request(seed::GITHUB_USER, "github")
        })
        .await
        .expect_err("a token for one user cannot unlock another");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        broker.emulator.user_calls_for(seed::GITHUB_USER),
        0,
        "nobody's profile is read"
    );
    broker.stop().await;
}

#[tokio::test]
async fn expired_wrong_audience_wrong_issuer_and_future_tokens_are_unauthenticated() {
    let broker = TestBroker::start().await;
    let cases = [
        (
            IdTokenSpec {
                issued_at: -7200,
                expires_in: Some(-3600),
                ..spec()
            },
            "expired",
        ),
        (
            IdTokenSpec {
                audience: Some(Audience::One("some-other-app".to_owned())),
                ..spec()
            },
            "audience",
        ),
        (
            IdTokenSpec {
                issuer: Some(broker.emulator.base_url()),
                ..spec()
            },
            "issuer",
        ),
        (
            IdTokenSpec {
                issuer: Some("https://evil.example.com/".to_owned()),
                ..spec()
            },
            "issuer",
        ),
        (
            IdTokenSpec {
                not_before: Some(3600),
                ..spec()
            },
            "not valid yet",
        ),
        (
            IdTokenSpec {
                issued_at: 3600,
                expires_in: Some(7200),
                ..spec()
            },
            "issued in the future",
        ),
    ];
    for (spec, check) in cases {
        let (token, result) = get_bound(&broker, spec).await;
        assert_refused(result, &token, check);
    }
    assert_eq!(
        broker.emulator.calls().users,
        0,
        "no refused token reads Auth0"
    );
    broker.stop().await;
}

#[tokio::test]
async fn forged_tokens_are_unauthenticated() {
    let broker = TestBroker::start().await;
    for (signing, check) in [
        (Signing::UnpublishedKey, "signature"),
        (Signing::AlgNone, "none"),
        (Signing::Hs256WithPublicKey, "HS256"),
    ] {
        let (token, result) = get_bound(&broker, IdTokenSpec { signing, ..spec() }).await;
        assert_refused(result, &token, check);
    }
    let status = broker
        .get_with(bound_request("not.a-jwt".to_owned(), "github"))
        .await
        .expect_err("garbage is refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(broker.emulator.calls().users, 0);
    broker.stop().await;
}

/// A broker that has verified one genuine token, so the JWKS is cached.
async fn broker_with_cached_jwks() -> TestBroker {
    let broker = TestBroker::start().await;
    get_signed_in(&broker, seed::GITHUB_USER)
        .await
        .expect("a genuine token is accepted");
    assert_eq!(broker.emulator.calls().jwks, 1, "the JWKS is fetched once");
    broker
}

#[tokio::test]
async fn an_unknown_kid_is_refused_after_one_jwks_refresh() {
    let broker = broker_with_cached_jwks().await;
    let (token, result) = get_bound(
        &broker,
        IdTokenSpec {
            kid: KidHeader::Custom("no-such-key".to_owned()),
            ..spec()
        },
    )
    .await;
    assert_refused(result, &token, "no-such-key");
    assert_eq!(
        broker.emulator.calls().jwks,
        2,
        "an unknown kid triggers one refresh"
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_rotated_signing_key_is_accepted_after_one_jwks_refresh() {
    let broker = broker_with_cached_jwks().await;
    broker.emulator.rotate_signing_key();
    let rotated = get_signed_in(&broker, seed::GITHUB_USER)
        .await
        .expect("a token signed with the rotated key is accepted after a refresh");
    assert_eq!(rotated.access_token, seed::GITHUB_ACCESS_TOKEN);
    assert_eq!(broker.emulator.calls().jwks, 2, "one fetch, one refresh");
    broker.stop().await;
}

#[tokio::test]
async fn a_flood_of_unknown_kids_refreshes_the_jwks_at_most_once() {
    let broker = TestBroker::start().await;
    let mut client = broker.client().await;
    let mut held_back = 0;
    for attempt in 0..30 {
        let token = broker.emulator.issue_id_token_with(IdTokenSpec {
            kid: KidHeader::Custom(format!("made-up-{attempt}")),
            ..spec()
        });
        let status = crate::support::get_on(&mut client, bound_request(token, "github"))
            .await
            .expect_err("unknown kid");
        // Refused once a JWKS fetched after the token lacks the kid; while the
        // refresh limit holds the next refresh back, "retry later".
        match status.code() {
            Code::Unauthenticated => {}
            Code::Unavailable => {
                held_back += 1;
                let retry = status.get_details_retry_info().expect("RetryInfo");
                assert!(retry
                    .retry_delay
                    .is_some_and(|delay| delay <= Duration::from_secs(30)));
            }
            other => panic!("attempt {attempt}: {other:?} {status:?}"),
        }
    }
    assert!(held_back >= 28, "{held_back} of 30 held back");
    assert_eq!(broker.emulator.calls().users, 0);
    assert!(
        broker.emulator.calls().jwks <= 2,
        "30 made-up kids made {} JWKS fetches: the first fetch and at most one refresh",
        broker.emulator.calls().jwks
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_key_rotated_right_after_a_refresh_is_unavailable_then_accepted_after_the_delay() {
    let broker = TestBroker::start_with(Options {
        id_token_min_refresh_interval: Some(Duration::from_secs(1)),
        ..Options::default()
    })
    .await;
    get_signed_in(&broker, seed::GITHUB_USER)
        .await
        .expect("a genuine token is accepted");
    let (token, result) = get_bound(
        &broker,
        IdTokenSpec {
            kid: KidHeader::Custom("no-such-key".to_owned()),
            ..spec()
        },
    )
    .await;
    assert_refused(result, &token, "no-such-key");
    assert_eq!(broker.emulator.calls().jwks, 2, "the unknown kid refreshed");

    broker.emulator.rotate_signing_key();
    let rotated = broker.emulator.issue_id_token(seed::GITHUB_USER);
    let status = broker
        .get_with(bound_request(rotated.clone(), "github"))
        .await
        .expect_err("the refresh that would find the new key is held back");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let delay = status
        .get_details_retry_info()
        .and_then(|retry| retry.retry_delay)
        .expect("RetryInfo with a delay");
    assert!(delay <= Duration::from_secs(1), "{delay:?}");

    tokio::time::sleep(delay + Duration::from_millis(50)).await;
    let released = broker
        .get_with(bound_request(rotated, "github"))
        .await
        .expect("accepted after the delay");
    assert_eq!(released.access_token, seed::GITHUB_ACCESS_TOKEN);
    assert_eq!(broker.emulator.calls().jwks, 3);
    broker.stop().await;
}

#[tokio::test]
async fn a_failing_jwks_is_fetched_a_handful_of_times_for_a_burst_of_requests() {
    let broker = TestBroker::start().await;
    broker
        .emulator
        .inject_faults(Endpoint::Jwks, vec![Fault::Status(404); 200]);
    let client = broker.client().await;
    let token = broker.emulator.issue_id_token(seed::GITHUB_USER);
    // Ten waves of twenty concurrent requests: concurrent misses always shared
    // one fetch, but each wave after a failure used to fetch again.
    for _wave in 0..10 {
        let requests = (0..20).map(|_| {
            let mut client = client.clone();
            let request = bound_request(token.clone(), "github");
            tokio::spawn(async move { crate::support::get_on(&mut client, request).await })
        });
        for result in join_all(requests).await {
            let status = result.expect("task").expect_err("no keys");
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            let retry = status.get_details_retry_info().expect("RetryInfo");
            assert!(
                retry
                    .retry_delay
                    .is_some_and(|delay| delay <= Duration::from_secs(5)),
                "{retry:?}"
            );
        }
    }
    assert!(
        broker.emulator.calls().jwks <= 3,
        "200 requests made {} JWKS fetches",
        broker.emulator.calls().jwks
    );
    assert_eq!(broker.emulator.calls().users, 0);
    broker.stop().await;
}

#[tokio::test]
async fn a_caller_that_must_send_an_id_token_is_denied_without_one() {
    let broker = TestBroker::start_with(Options {
        policy_toml: Some(format!(
            "[[caller]]\nid = \"{CLIENT_SPIFFE_ID}\"\nproviders = [\"*\"]\nrequire_id_token = true\n"
        )),
        ..Options::default()
    })
    .await;
    let status = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect_err("a user id alone is not enough for this caller");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("id_token"),
        "{}",
        status.message()
    );
    let status = broker
        .list(seed::LINKED_USER)
        .await
        .expect_err("nor for ListIdpTokens");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(broker.emulator.calls().users, 0);

    let released = get_signed_in(&broker, seed::GITHUB_USER)
        .await
        .expect("with the user's ID token it is released");
    assert_eq!(released.access_token, seed::GITHUB_ACCESS_TOKEN);
    broker.stop().await;
}

#[tokio::test]
async fn a_broker_without_id_token_audiences_refuses_id_tokens_as_a_failed_precondition() {
    let broker = TestBroker::start_with(Options {
        id_token_audiences: Vec::new(),
        ..Options::default()
    })
    .await;
    let status = get_signed_in(&broker, seed::GITHUB_USER)
        .await
        .expect_err("nothing to verify it against");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("AUTH0_ID_TOKEN_AUDIENCES"),
        "{}",
        status.message()
    );
    broker.stop().await;
}

#[tokio::test]
async fn an_unreachable_jwks_is_unavailable_not_the_callers_fault() {
    let broker = TestBroker::start().await;
    broker
        .emulator
        .inject_faults(Endpoint::Jwks, vec![Fault::Status(503); 3]);
    let status = get_signed_in(&broker, seed::GITHUB_USER)
        .await
        .expect_err("no keys to check against");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    broker.stop().await;
}
