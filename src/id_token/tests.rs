//! The verifier against the emulator's tenant: each check refuses the token it names,
//! genuine tokens pass, and no error repeats the token. The JWKS handling is in `jwks.rs`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrecy::SecretString;

use super::{IdTokenError, IdTokenSettings, IdTokenVerifier};
use crate::auth0::{Auth0Client, Auth0Settings, ClientCredential};
use crate::emulator::{
    seed, Audience, Emulator, EmulatorConfig, Endpoint, Fault, IdTokenSpec, KidHeader, Signing,
};

mod jwks;

const USER: &str = seed::GITHUB_USER;

async fn emulator() -> Emulator {
    Emulator::start(EmulatorConfig::new("test-client", "test-secret"))
        .await
        .expect("emulator starts")
}

fn settings(emu: &Emulator) -> IdTokenSettings {
    IdTokenSettings::new(emu.base_url(), vec![emu.id_token_audience()])
}

fn verifier_with(settings: IdTokenSettings) -> IdTokenVerifier {
    let auth0 = Auth0Client::new(Auth0Settings {
        base_url: settings.issuer_base_url.clone(),
        audience: format!("{}/api/v2/", settings.issuer_base_url),
        client_id: "test-client".to_owned(),
        credential: ClientCredential::Secret(SecretString::from("test-secret")),
        token_vault_subject_key: None,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
    })
    .expect("auth0 client");
    IdTokenVerifier::new(settings, &auth0)
}

fn verifier(emu: &Emulator) -> IdTokenVerifier {
    verifier_with(settings(emu))
}

fn spec() -> IdTokenSpec {
    IdTokenSpec::for_user(USER)
}

/// Verifies the token `spec` describes with a fresh verifier; returns only the error.
async fn refusal(emu: &Emulator, spec: IdTokenSpec) -> IdTokenError {
    let token = emu.issue_id_token_with(spec);
    verifier(emu)
        .verify(&token)
        .await
        .expect_err("the token is refused")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

#[tokio::test]
async fn genuine_token_yields_its_subject_and_expiry() {
    let emu = emulator().await;
    let verified = verifier(&emu)
        .verify(&emu.issue_id_token(USER))
        .await
        .expect("genuine token");
    assert_eq!(verified.sub, USER);
    assert!(verified.exp.abs_diff(now() + 3600) <= 5, "{}", verified.exp);
}

#[tokio::test]
async fn expired_token_is_refused() {
    let emu = emulator().await;
    let spec = IdTokenSpec {
        issued_at: -7200,
        expires_in: Some(-120),
        ..spec()
    };
    assert_eq!(refusal(&emu, spec).await, IdTokenError::Expired);
}

#[tokio::test]
async fn token_expired_within_the_leeway_is_accepted() {
    let emu = emulator().await;
    let token = emu.issue_id_token_with(IdTokenSpec {
        expires_in: Some(-20),
        ..spec()
    });
    verifier(&emu).verify(&token).await.expect("within leeway");
}

#[tokio::test]
async fn token_not_valid_before_a_future_time_is_refused() {
    let emu = emulator().await;
    let spec = IdTokenSpec {
        not_before: Some(600),
        ..spec()
    };
    assert_eq!(refusal(&emu, spec).await, IdTokenError::NotYetValid);
}

#[tokio::test]
async fn token_issued_in_the_future_is_refused() {
    let emu = emulator().await;
    let spec = IdTokenSpec {
        issued_at: 600,
        ..spec()
    };
    assert_eq!(refusal(&emu, spec).await, IdTokenError::IssuedInFuture);
}

#[tokio::test]
async fn token_for_another_audience_is_refused() {
    let emu = emulator().await;
    let spec = IdTokenSpec {
        audience: Some(Audience::One("some-other-app".into())),
        ..spec()
    };
    assert_eq!(refusal(&emu, spec).await, IdTokenError::Audience);
}

#[tokio::test]
async fn audience_array_containing_a_configured_audience_is_accepted() {
    let emu = emulator().await;
    let audiences = vec!["https://api.example.com/".into(), emu.id_token_audience()];
    let token = emu.issue_id_token_with(IdTokenSpec {
        audience: Some(Audience::Many(audiences)),
        ..spec()
    });
    let verified = verifier(&emu).verify(&token).await.expect("accepted");
    assert_eq!(verified.sub, USER);
}

#[tokio::test]
async fn issuer_without_the_trailing_slash_is_refused() {
    let emu = emulator().await;
    let spec = IdTokenSpec {
        issuer: Some(emu.base_url()),
        ..spec()
    };
    assert_eq!(refusal(&emu, spec).await, IdTokenError::Issuer);
}

#[tokio::test]
async fn token_without_subject_is_refused() {
    let emu = emulator().await;
    let spec = IdTokenSpec {
        sub: None,
        ..spec()
    };
    assert_eq!(refusal(&emu, spec).await, IdTokenError::MissingSubject);
    let empty = IdTokenSpec::for_user("");
    assert_eq!(refusal(&emu, empty).await, IdTokenError::MissingSubject);
}

#[tokio::test]
async fn token_without_expiry_is_refused() {
    let emu = emulator().await;
    let spec = IdTokenSpec {
        expires_in: None,
        ..spec()
    };
    assert_eq!(refusal(&emu, spec).await, IdTokenError::MissingClaim("exp"));
}

#[tokio::test]
async fn token_signed_by_an_unpublished_key_fails_the_signature_check() {
    let emu = emulator().await;
    let spec = IdTokenSpec {
        signing: Signing::UnpublishedKey,
        ..spec()
    };
    assert_eq!(refusal(&emu, spec).await, IdTokenError::Signature);
}

#[tokio::test]
async fn unsigned_alg_none_token_is_refused_as_an_algorithm_error() {
    let emu = emulator().await;
    let spec = IdTokenSpec {
        signing: Signing::AlgNone,
        ..spec()
    };
    let error = refusal(&emu, spec).await;
    assert_eq!(error, IdTokenError::Algorithm("none".into()));
    assert!(error.to_string().contains("\"none\""), "{error}");
    assert_eq!(emu.calls().jwks, 0, "refused before any key is looked up");
}

#[tokio::test]
async fn hs256_keyed_with_the_public_key_is_refused_as_an_algorithm_error() {
    let emu = emulator().await;
    let spec = IdTokenSpec {
        signing: Signing::Hs256WithPublicKey,
        ..spec()
    };
    let error = refusal(&emu, spec).await;
    assert_eq!(error, IdTokenError::Algorithm("HS256".into()));
    assert_eq!(error.check(), "algorithm");
    assert_eq!(emu.calls().jwks, 0, "refused before any key is looked up");
}

#[tokio::test]
async fn token_without_kid_is_refused() {
    let emu = emulator().await;
    let spec = IdTokenSpec {
        kid: KidHeader::Omitted,
        ..spec()
    };
    assert_eq!(refusal(&emu, spec).await, IdTokenError::MissingKeyId);
}

#[tokio::test]
async fn garbage_is_malformed() {
    let emu = emulator().await;
    let verifier = verifier(&emu);
    for garbage in ["", "abc", "a.b.c", "a.b", "....", "eyJhbGciOiJSUzI1NiJ9"] {
        let error = verifier.verify(garbage).await.expect_err("garbage");
        assert_eq!(error.check(), "malformed", "{garbage:?}: {error}");
    }
}

#[tokio::test]
async fn error_messages_never_contain_the_token_or_its_parts() {
    let emu = emulator().await;
    emu.inject_faults(Endpoint::Jwks, vec![Fault::Status(500)]);
    let verifier = verifier(&emu);
    let specs = [
        spec(),
        IdTokenSpec {
            expires_in: Some(-600),
            ..spec()
        },
        IdTokenSpec {
            signing: Signing::UnpublishedKey,
            ..spec()
        },
        IdTokenSpec {
            signing: Signing::AlgNone,
            ..spec()
        },
        IdTokenSpec {
            audience: Some(Audience::One("x".into())),
            ..spec()
        },
    ];
    let mut refused = 0;
    for spec in specs {
        let token = emu.issue_id_token_with(spec);
        let Err(error) = verifier.verify(&token).await else {
            continue;
        };
        refused += 1;
        let texts = [error.to_string(), format!("{error:?}")];
        for part in token.split('.').filter(|part| part.len() > 8) {
            for text in &texts {
                assert!(!text.contains(part), "{text} leaks a token part");
            }
        }
    }
    assert_eq!(
        refused, 5,
        "the genuine one meets the JWKS fault, the others are forged"
    );
}

#[test]
fn debug_of_the_verifier_shows_settings_only() {
    let verifier = verifier_with(IdTokenSettings::new(
        "https://tenant.example",
        vec!["spa".into()],
    ));
    let debug = format!("{verifier:?}");
    assert!(debug.contains("https://tenant.example"), "{debug}");
}

#[test]
fn only_unavailable_keys_are_the_brokers_fault() {
    let errors = [
        IdTokenError::Malformed("x"),
        IdTokenError::Algorithm("none".into()),
        IdTokenError::MissingKeyId,
        IdTokenError::UnknownKey("k".into()),
        IdTokenError::Signature,
        IdTokenError::Expired,
        IdTokenError::NotYetValid,
        IdTokenError::IssuedInFuture,
        IdTokenError::Issuer,
        IdTokenError::Audience,
        IdTokenError::MissingSubject,
        IdTokenError::MissingClaim("exp"),
    ];
    assert!(errors.iter().all(|error| !error.is_unavailable()));
    let mut checks: Vec<&str> = errors.iter().map(IdTokenError::check).collect();
    checks.sort_unstable();
    checks.dedup();
    assert_eq!(checks.len(), errors.len(), "check names are distinct");
    let unavailable = IdTokenError::JwksUnavailable {
        reason: "down".into(),
        retry_after: None,
    };
    assert!(unavailable.is_unavailable());
    let not_yet = IdTokenError::KeyNotYetKnown {
        kid: "k".into(),
        retry_after: Duration::from_secs(3),
    };
    assert!(not_yet.is_unavailable());
    assert_eq!(not_yet.retry_after(), Some(Duration::from_secs(3)));
    assert!(errors.iter().all(|error| error.retry_after().is_none()));
}
