//! What both benchmarks (`load` and `fleet`) set up alike around the test
//! kit, written once: a broker run on loopback with its Management token in
//! hand, and stopped; the stale-token users, with the connections file that
//! has the broker refresh them at the emulator's IdP; and the bare tonic
//! baseline both compare the broker with (`baseline.rs`).
//!
//! Each bench includes this file as its `common` module (`#[path]`; a folder
//! without `main.rs` is no bench target of its own), so every item here must
//! be used by both.

pub mod baseline;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokenbroker::emulator::Emulator;
use tokenbroker::listener::ConnectionLimits;
use tokenbroker::pki::write_file;
use tokenbroker::policy::PolicyStore;
use tokenbroker::server::{Broker, BrokerSettings, RunSettings};
use tokenbroker::testkit::{HealthListener, StartedBroker, TestPki};

/// How long a stopping broker or baseline gets before it is aborted.
pub const STOP_BOUND: Duration = Duration::from_secs(5);

/// The connection the stale users sign in with, refreshed at the IdP.
pub const STALE_CONNECTION: &str = "google-oauth2";

/// A broker built with `settings` and `policy` on `pki`'s TLS material, run
/// by the test kit on loopback port 0 (mTLS only), with a Management token
/// already obtained so no measured request pays for it.
pub async fn start_warm(
    pki: &TestPki,
    settings: BrokerSettings,
    policy: PolicyStore,
) -> StartedBroker {
    let tls = pki.tls_store().expect("tls config");
    let broker = Broker::new(settings, policy, tls).expect("broker builds");
    let run = RunSettings {
        shutdown_grace: Duration::from_secs(1),
        reload_interval: Duration::from_secs(5),
        connections: ConnectionLimits::default(),
    };
    let started = StartedBroker::start(broker, run, HealthListener::Off)
        .await
        .expect("broker starts on loopback");
    started
        .store
        .warm_up()
        .await
        .expect("broker obtains a Management token");
    started
}

/// Stops `broker`, saying so if it had failed.
pub async fn stop_broker(broker: StartedBroker) {
    if let Some(Err(error)) = broker.stop(STOP_BOUND).await {
        eprintln!("broker stopped with an error: {error}");
    }
}

/// Writes, in `pki`'s directory, a connections file that refreshes
/// [`STALE_CONNECTION`] at `emulator`'s IdP (its token URL, client id and
/// secret, the secret in a file beside it); returns its path.
pub fn idp_connections(pki: &TestPki, emulator: &Emulator) -> PathBuf {
    use secrecy::ExposeSecret;
    let secret = pki.path("idp-client-secret");
    write_file(&secret, emulator.idp_client_secret().expose_secret(), true)
        .expect("IdP client secret");
    let connections = pki.path("connections.toml");
    let text = format!(
        "[[connection]]\nname = \"{STALE_CONNECTION}\"\nrefresh = \"idp\"\ntoken_url = \"{}\"\nclient_id = \"{}\"\nclient_secret_file = \"{}\"\n",
        emulator.idp_token_url(),
        emulator.idp_client_id(),
        secret.display()
    );
    write_file(&connections, &text, false).expect("connections file");
    connections
}

/// Puts `count` stale Google users in the emulator and returns their ids:
/// they signed in 3 hours ago, so the token on their profile (`expires_in`
/// 3599, as Google issues them) is dead, and their refresh token is one the
/// emulator's IdP honours.
pub fn seed_stale_users(emulator: &Emulator, count: usize) -> Vec<String> {
    let signed_in = SystemTime::now() - Duration::from_secs(3 * 3600);
    let last_login = humantime::format_rfc3339_millis(signed_in).to_string();
    (0..count)
        .map(|index| {
            let user_id = format!("{STALE_CONNECTION}|stale{index:08}");
            let refresh_token = format!("1//bench_stale_refresh_{index:08}");
            emulator.add_idp_refresh_token(&refresh_token);
            emulator.upsert_user(serde_json::json!({
                "user_id": user_id,
                "last_login": last_login,
                "identities": [{
                    "provider": STALE_CONNECTION, "connection": STALE_CONNECTION,
                    "user_id": format!("{index}"), "isSocial": true,
                    "access_token": format!("ya29.bench_dead_{index:08}"),
                    "expires_in": 3599, "refresh_token": refresh_token,
                }],
            }));
            user_id
        })
        .collect()
}
