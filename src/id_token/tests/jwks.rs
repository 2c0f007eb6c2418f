//! How the verifier holds the tenant's JWKS: fetched once and shared, refreshed on a
//! rotated key within its limits, failures remembered, and every way a fetch can fail
//! UNAVAILABLE.

use std::time::Duration;

use futures::future::join_all;

use super::{emulator, settings, spec, verifier, verifier_with, USER};
use crate::emulator::{Endpoint, Fault, IdTokenSpec, KidHeader};
use crate::id_token::{
    IdTokenError, IdTokenSettings, DEFAULT_FAILURE_TTL, JWKS_FETCH_BURST, JWKS_FETCH_PERIOD,
};

#[tokio::test]
async fn jwks_is_fetched_once_and_then_served_from_cache() {
    let emu = emulator().await;
    let verifier = verifier(&emu);
    for _ in 0..3 {
        verifier
            .verify(&emu.issue_id_token(USER))
            .await
            .expect("genuine token");
    }
    assert_eq!(emu.calls().jwks, 1);
}

#[tokio::test]
async fn concurrent_cold_verifications_share_one_jwks_fetch() {
    let emu = emulator().await;
    let verifier = verifier(&emu);
    let token = emu.issue_id_token(USER);
    let results = join_all((0..20).map(|_| verifier.verify(&token))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(emu.calls().jwks, 1);
}

#[tokio::test]
async fn rotated_key_is_accepted_after_exactly_one_jwks_refresh() {
    let emu = emulator().await;
    let verifier = verifier(&emu);
    let old = emu.issue_id_token(USER);
    verifier.verify(&old).await.expect("first key");
    assert_eq!(emu.calls().jwks, 1);

    emu.rotate_signing_key();
    let new = emu.issue_id_token(USER);
    verifier
        .verify(&new)
        .await
        .expect("rotated key after refresh");
    verifier.verify(&new).await.expect("rotated key from cache");
    verifier
        .verify(&old)
        .await
        .expect("previous key still published");
    assert_eq!(emu.calls().jwks, 2, "exactly one refresh");
}

#[tokio::test]
async fn flood_of_unknown_kids_refreshes_the_jwks_at_most_once_per_interval() {
    let emu = emulator().await;
    let verifier = verifier(&emu);
    verifier
        .verify(&emu.issue_id_token(USER))
        .await
        .expect("warm");
    emu.reset_counters();

    let tokens: Vec<String> = (0..50)
        .map(|i| {
            emu.issue_id_token_with(IdTokenSpec {
                kid: KidHeader::Custom(format!("made-up-{i}")),
                ..spec()
            })
        })
        .collect();
    let results = join_all(tokens.iter().map(|token| verifier.verify(token))).await;
    for result in &results {
        let error = result.as_ref().expect_err("unknown kid");
        assert_eq!(error.check(), "unknown_kid", "{error}");
    }
    assert_eq!(emu.calls().jwks, 1, "one refresh for 50 unknown kids");
}

#[tokio::test]
async fn refresh_budget_returns_after_the_interval() {
    let emu = emulator().await;
    let verifier = verifier_with(IdTokenSettings {
        min_refresh_interval: Duration::from_millis(300),
        ..settings(&emu)
    });
    let unknown = emu.issue_id_token_with(IdTokenSpec {
        kid: KidHeader::Custom("made-up".into()),
        ..spec()
    });
    let _ = verifier.verify(&unknown).await;
    let _ = verifier.verify(&unknown).await;
    assert_eq!(emu.calls().jwks, 2, "initial fetch and one refresh");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let _ = verifier.verify(&unknown).await;
    assert_eq!(emu.calls().jwks, 3, "one more refresh after the interval");
}

#[tokio::test]
async fn revoked_key_is_refused_once_the_cached_jwks_expires() {
    let emu = emulator().await;
    let verifier = verifier_with(IdTokenSettings {
        jwks_ttl: Duration::from_millis(200),
        ..settings(&emu)
    });
    let old = emu.issue_id_token(USER);
    verifier.verify(&old).await.expect("first key");
    emu.rotate_signing_key();
    emu.revoke_previous_signing_key();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let error = verifier.verify(&old).await.expect_err("revoked");
    assert_eq!(error, IdTokenError::UnknownKey("dev-signing-1".into()));
}

/// The reason and retry time of a [`IdTokenError::JwksUnavailable`]; panics on another error.
fn unavailable(error: &IdTokenError) -> (&str, Option<Duration>) {
    match error {
        IdTokenError::JwksUnavailable {
            reason,
            retry_after,
        } => (reason, *retry_after),
        other => panic!("expected JwksUnavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn jwks_failure_is_remembered_with_the_time_left_then_fetched_again() {
    let emu = emulator().await;
    emu.inject_faults(Endpoint::Jwks, vec![Fault::Status(500)]);
    let verifier = verifier_with(IdTokenSettings {
        failure_ttl: Duration::from_millis(400),
        ..settings(&emu)
    });
    let token = emu.issue_id_token(USER);
    let error = verifier.verify(&token).await.expect_err("JWKS fails");
    assert!(error.is_unavailable());
    let (reason, retry_after) = unavailable(&error);
    assert!(reason.contains("500"), "{reason}");
    let first = retry_after.expect("retry time");
    assert!(first <= Duration::from_millis(400), "{first:?}");

    let again = verifier.verify(&token).await.expect_err("remembered");
    let (_, retry_after) = unavailable(&again);
    assert!(retry_after.expect("time left") <= first);
    assert_eq!(
        emu.calls().jwks,
        1,
        "the failure is answered from the cache"
    );

    tokio::time::sleep(Duration::from_millis(450)).await;
    verifier
        .verify(&token)
        .await
        .expect("fetched again after the failure TTL");
    assert_eq!(emu.calls().jwks, 2);
}

#[tokio::test]
async fn concurrent_verifications_against_a_failing_jwks_share_one_fetch() {
    let emu = emulator().await;
    emu.inject_faults(Endpoint::Jwks, vec![Fault::Status(404); 50]);
    let verifier = verifier(&emu);
    let token = emu.issue_id_token(USER);
    for _ in 0..3 {
        let results = join_all((0..50).map(|_| verifier.verify(&token))).await;
        for result in results {
            let error = result.expect_err("no keys");
            assert!(unavailable(&error).1.is_some(), "{error:?}");
        }
    }
    assert_eq!(emu.calls().jwks, 1, "150 verifications, one fetch");
}

#[tokio::test]
async fn jwks_fetches_are_limited_even_when_failures_are_forgotten_at_once() {
    let emu = emulator().await;
    emu.inject_faults(Endpoint::Jwks, vec![Fault::Status(503); 50]);
    let verifier = verifier_with(IdTokenSettings {
        failure_ttl: Duration::from_millis(1),
        ..settings(&emu)
    });
    let token = emu.issue_id_token(USER);
    let started = std::time::Instant::now();
    let mut limited = 0;
    for _ in 0..20 {
        let error = verifier.verify(&token).await.expect_err("no keys");
        let (reason, retry_after) = unavailable(&error);
        if reason.contains("rate-limited") {
            limited += 1;
            assert!(retry_after.expect("next slot") <= JWKS_FETCH_PERIOD);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let allowed = JWKS_FETCH_BURST.get() as u64 + started.elapsed().as_secs() + 1;
    assert!(
        emu.calls().jwks <= allowed,
        "{} fetches, at most {allowed} allowed",
        emu.calls().jwks
    );
    assert!(limited > 0, "some fetches were held back");
}

#[tokio::test]
async fn a_kid_missing_from_a_jwks_fetched_for_this_token_is_refused_without_a_refresh() {
    let emu = emulator().await;
    let unknown = emu.issue_id_token_with(IdTokenSpec {
        kid: KidHeader::Custom("made-up".into()),
        ..spec()
    });
    let error = verifier(&emu).verify(&unknown).await.expect_err("unknown");
    assert_eq!(error, IdTokenError::UnknownKey("made-up".into()));
    assert_eq!(emu.calls().jwks, 1, "the cold fetch came after the token");
}

#[tokio::test]
async fn a_rotated_kid_held_back_by_the_refresh_limit_is_not_yet_known_then_accepted() {
    let emu = emulator().await;
    let verifier = verifier_with(IdTokenSettings {
        min_refresh_interval: Duration::from_millis(500),
        ..settings(&emu)
    });
    verifier
        .verify(&emu.issue_id_token(USER))
        .await
        .expect("warm");
    let made_up = emu.issue_id_token_with(IdTokenSpec {
        kid: KidHeader::Custom("made-up".into()),
        ..spec()
    });
    let refused = verifier.verify(&made_up).await.expect_err("unknown kid");
    assert_eq!(
        refused.check(),
        "unknown_kid",
        "a refresh happened: {refused}"
    );

    let kid = emu.rotate_signing_key();
    let rotated = emu.issue_id_token(USER);
    let error = verifier.verify(&rotated).await.expect_err("held back");
    let IdTokenError::KeyNotYetKnown {
        kid: named,
        retry_after,
    } = &error
    else {
        panic!("expected KeyNotYetKnown, got {error:?}");
    };
    assert_eq!(*named, kid);
    assert!(error.is_unavailable());
    assert_eq!(error.retry_after(), Some(*retry_after));
    assert!(
        *retry_after <= Duration::from_millis(500),
        "{retry_after:?}"
    );
    assert_eq!(emu.calls().jwks, 2, "no fetch while held back");

    tokio::time::sleep(*retry_after + Duration::from_millis(20)).await;
    let verified = verifier.verify(&rotated).await.expect("after the delay");
    assert_eq!(verified.sub, USER);
    assert_eq!(emu.calls().jwks, 3);
}

#[tokio::test]
async fn concurrent_tokens_with_a_rotated_kid_share_one_refresh_and_are_accepted() {
    let emu = emulator().await;
    let verifier = verifier(&emu);
    verifier
        .verify(&emu.issue_id_token(USER))
        .await
        .expect("warm");
    emu.rotate_signing_key();
    let rotated = emu.issue_id_token(USER);
    let results = join_all((0..20).map(|_| verifier.verify(&rotated))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(emu.calls().jwks, 2, "one fetch, one refresh");
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_cached_keys() {
    let emu = emulator().await;
    let verifier = verifier(&emu);
    let genuine = emu.issue_id_token(USER);
    verifier.verify(&genuine).await.expect("warm");
    emu.inject_faults(Endpoint::Jwks, vec![Fault::Status(503)]);
    let made_up = emu.issue_id_token_with(IdTokenSpec {
        kid: KidHeader::Custom("made-up".into()),
        ..spec()
    });
    let error = verifier.verify(&made_up).await.expect_err("refresh fails");
    assert_eq!(unavailable(&error).1, Some(DEFAULT_FAILURE_TTL));
    verifier
        .verify(&genuine)
        .await
        .expect("the cached keys still verify");
    assert_eq!(emu.calls().jwks, 2);
}

#[tokio::test]
async fn slow_jwks_times_out_as_unavailable() {
    let emu = emulator().await;
    emu.inject_faults(Endpoint::Jwks, vec![Fault::Delay(Duration::from_secs(2))]);
    let verifier = verifier_with(IdTokenSettings {
        request_timeout: Duration::from_millis(200),
        ..settings(&emu)
    });
    let error = verifier
        .verify(&emu.issue_id_token(USER))
        .await
        .expect_err("times out");
    assert_eq!(unavailable(&error).0, "JWKS request timed out");
}

#[tokio::test]
async fn unreachable_tenant_is_unavailable() {
    let emu = emulator().await;
    let token = emu.issue_id_token(USER);
    let verifier = verifier(&emu);
    emu.shutdown().await;
    let error = verifier.verify(&token).await.expect_err("no tenant");
    assert!(error.is_unavailable(), "{error}");
}
