//! `tokenbroker dev`: the whole product on one machine with no Auth0 account.
//! Starts the Auth0 emulator on loopback, makes (or reuses) a dev PKI, runs
//! the broker with mTLS and prints grpcurl commands to try it.
//!
//! The dev broker authenticates with `private_key_jwt`, as a broker using
//! Token Vault must: its key is the fixture `emulator::keys::CLIENT_ASSERTION_KEY_1`
//! (ring cannot generate RSA keys, and a dev key is public anyway), written to
//! the dev directory and registered with the emulator for client assertions
//! and Token Vault subject tokens alike.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use crate::auth0::{Auth0Settings, ClientCredential, KeyFileError, SigningKeyFile};
use crate::config::{ConfigError, DevArgs};
use crate::emulator::{keys, seed, Emulator, EmulatorConfig, IdTokenSpec};
use crate::pki::{write_file, DevPki, PkiError, DEV_CLIENT_ID};
use crate::policy::PolicyStore;
use crate::server::{self, Broker, BrokerSettings, Listeners, ServerError};
use crate::service::fresh::FreshnessSettings;
use crate::tls::TlsFiles;
use crate::tls::TlsStore;
use secrecy::ExposeSecret;

/// Lifetime of the ID token the banner prints: a working day, so the pasted
/// command keeps working while the developer experiments.
const DEV_ID_TOKEN_LIFETIME_SECS: i64 = 12 * 3600;

/// Client id the dev broker uses against the emulator.
const DEV_CLIENT_ID_AUTH0: &str = "tokenbroker-dev";

/// Why `tokenbroker dev` could not run.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot start the Auth0 emulator: {0}")]
    Emulator(std::io::Error),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error("the Auth0 emulator refused the dev key: {0}")]
    EmulatorKey(String),
}

/// Runs emulator and broker until `shutdown`, then stops both.
pub async fn run(args: DevArgs, shutdown: impl Future<Output = ()> + Send) -> Result<(), DevError> {
    let cache = args.common.cache_settings()?;
    let run_settings = args.common.run_settings()?;
    let resilience = args.common.resilience_settings()?;
    if let Some(addr) = args.common.metrics_listen {
        server::install_metrics(addr)?;
    }
    let pki = DevPki::load_or_create(&args.dir)?;
    // The emulator's client also has a secret, but refuses it once the key is
    // registered: the dev broker holds none.
    let emulator = Emulator::start(EmulatorConfig::new(DEV_CLIENT_ID_AUTH0, random_secret()))
        .await
        .map_err(DevError::Emulator)?;
    let assertion_key = register_dev_key(&pki.dir, &emulator)?;
    let auth0 = Auth0Settings {
        base_url: emulator.base_url(),
        audience: emulator.audience(),
        client_id: DEV_CLIENT_ID_AUTH0.to_owned(),
        credential: ClientCredential::AssertionKey(assertion_key),
        token_vault_subject_key: None,
        connect_timeout: *args.common.auth0_connect_timeout,
        request_timeout: *args.common.auth0_timeout,
    };
    let tls = TlsStore::open(TlsFiles {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: pki.ca_cert.clone(),
    })
    .map_err(ServerError::from)?;
    let policy_path = write_dev_policy(&pki.dir)?;
    let listeners = Listeners::bind(args.listen, args.common.health_listen).await?;
    crate::open_files::raise_and_report(&run_settings.connections, listeners.count());
    let id_token = args
        .common
        .id_token_settings(&auth0.base_url, &[emulator.id_token_audience()]);
    let connections_path = write_dev_connections(&pki.dir, &emulator)?;
    let settings = BrokerSettings {
        auth0,
        resilience,
        cache,
        id_token,
        audit: args.common.audit_settings(),
        freshness: FreshnessSettings {
            connections: Some(connections_path),
            ..args.common.freshness_settings()
        },
        fleet: args.common.fleet_settings()?,
    };
    let broker = Broker::new(
        settings,
        PolicyStore::open(Some(&policy_path)).map_err(ServerError::from)?,
        tls,
    )?;
    println!("{}", banner(&pki, &policy_path, args.listen, &emulator));
    let result = server::run(listeners, broker, run_settings, shutdown).await;
    emulator.shutdown().await;
    result.map_err(DevError::from)
}

/// Writes the dev policy (the dev client may have everything) unless the
/// developer already has one there, which is kept so they can experiment.
fn write_dev_policy(dir: &Path) -> Result<PathBuf, DevError> {
    let path = dir.join("policy.toml");
    if !path.is_file() {
        let policy = format!(
            "# Written by `tokenbroker dev`; edit it while the broker runs: it is reloaded.\n\
             [[caller]]\nid = \"{DEV_CLIENT_ID}\"\nproviders = [\"*\"]\ninvalidate = true\n"
        );
        write_file(&path, &policy, false)?;
    }
    Ok(path)
}

/// Writes the dev client assertion key to `dir` (rewritten on every start:
/// the emulator knows only this one) and registers its public half with the
/// emulator for client assertions and Token Vault subject tokens.
fn register_dev_key(dir: &Path, emulator: &Emulator) -> Result<Arc<SigningKeyFile>, DevError> {
    let path = dir.join("client-assertion.pem");
    write_file(&path, keys::CLIENT_ASSERTION_KEY_1, true)?;
    let key = SigningKeyFile::open("dev client assertion key", &path, None)?;
    let public = key.public_key_pem();
    emulator
        .set_client_assertion_keys(&[&public])
        .and_then(|()| emulator.set_token_vault_subject_keys(&[&public]))
        .map_err(DevError::EmulatorKey)?;
    Ok(Arc::new(key))
}

/// Writes the connections file that sends `google-oauth2` refreshes to the
/// emulator's IdP and takes the tokens of `google-vault` from Token Vault.
/// Rewritten on every start: the emulator's port changes.
fn write_dev_connections(dir: &Path, emulator: &Emulator) -> Result<PathBuf, DevError> {
    let secret_path = dir.join("idp-client-secret");
    write_file(
        &secret_path,
        emulator.idp_client_secret().expose_secret(),
        true,
    )?;
    let path = dir.join("connections.toml");
    let connections = format!(
        "# Written by `tokenbroker dev` on every start (the emulator's port changes).\n\
         [[connection]]\nname = \"google-oauth2\"\nrefresh = \"idp\"\n\
         token_url = \"{}\"\nclient_id = \"{}\"\nclient_secret_file = \"{}\"\n\n\
         [[connection]]\nname = \"{}\"\nsource = \"token-vault\"\n",
        emulator.idp_token_url(),
        emulator.idp_client_id(),
        absolute(&secret_path),
        seed::TOKEN_VAULT_CONNECTION
    );
    write_file(&path, &connections, false)?;
    Ok(path)
}

fn random_secret() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}

fn absolute(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_owned())
        .display()
        .to_string()
}

/// What a newcomer needs to try the broker: where things are, and commands to paste.
fn banner(pki: &DevPki, policy: &Path, listen: SocketAddr, emulator: &Emulator) -> String {
    let target = if listen.ip().is_unspecified() {
        format!("127.0.0.1:{}", listen.port())
    } else {
        listen.to_string()
    };
    let tls_flags = format!(
        "-cacert {} -cert {} -key {}",
        absolute(&pki.ca_cert),
        absolute(&pki.client_cert),
        absolute(&pki.client_key)
    );
    let github = format!(
        "grpcurl {tls_flags} -d '{{\"user_id\": \"{}\", \"provider\": \"github\"}}' {target} tokenbroker.v1.TokenBroker/GetIdpToken",
        seed::GITHUB_USER
    );
    let linked = format!(
        "grpcurl {tls_flags} -d '{{\"user_id\": \"{}\"}}' {target} tokenbroker.v1.TokenBroker/ListIdpTokens",
        seed::LINKED_USER
    );
    let id_token = emulator.issue_id_token_with(IdTokenSpec {
        expires_in: Some(DEV_ID_TOKEN_LIFETIME_SECS),
        ..IdTokenSpec::for_user(seed::GITHUB_USER)
    });
    let bound = format!(
        "grpcurl {tls_flags} -d '{{\"id_token\": \"{id_token}\", \"provider\": \"github\"}}' {target} tokenbroker.v1.TokenBroker/GetIdpToken"
    );
    let refreshed = format!(
        "grpcurl {tls_flags} -d '{{\"user_id\": \"{}\", \"provider\": \"google-oauth2\"}}' {target} tokenbroker.v1.TokenBroker/GetIdpToken",
        seed::STALE_GOOGLE_USER
    );
    let vaulted = format!(
        "grpcurl {tls_flags} -d '{{\"user_id\": \"{}\", \"connection\": \"{}\"}}' {target} tokenbroker.v1.TokenBroker/GetIdpToken",
        seed::VAULT_USER,
        seed::TOKEN_VAULT_CONNECTION
    );
    let health = format!(
        "grpcurl {tls_flags} -d '{{\"service\": \"tokenbroker.v1.TokenBroker\"}}' {target} grpc.health.v1.Health/Check"
    );
    [
        String::new(),
        "tokenbroker dev is up.".to_owned(),
        format!("  broker (gRPC over mTLS): {target}"),
        format!("  Auth0 emulator:          {}", emulator.base_url()),
        format!("  dev PKI (reused):        {}", absolute(&pki.dir)),
        format!("  client identity:         {DEV_CLIENT_ID}"),
        format!("  caller policy (reloaded): {}", absolute(policy)),
        format!("  seeded users:            {}", seed::user_ids().join(", ")),
        String::new(),
        "Try it (grpcurl uses server reflection; no proto files needed):".to_owned(),
        String::new(),
        format!("  grpcurl {tls_flags} {target} list"),
        String::new(),
        format!("  {github}"),
        String::new(),
        format!("  {linked}"),
        String::new(),
        format!(
            "With the ID token of {} (valid 12 h; its sub picks the user, aud {:?}):",
            seed::GITHUB_USER,
            emulator.id_token_audience()
        ),
        String::new(),
        format!("  {bound}"),
        String::new(),
        format!(
            "{} signed in hours ago: its profile token is dead, so the broker refreshes it at the (emulated) IdP (source TOKEN_SOURCE_IDP_REFRESH, exact expiresAt):",
            seed::STALE_GOOGLE_USER
        ),
        String::new(),
        format!("  {refreshed}"),
        String::new(),
        format!(
            "{}'s connection {} keeps its tokens in (emulated) Auth0 Token Vault: the broker signs a subject token and exchanges it (source TOKEN_SOURCE_TOKEN_VAULT, exact expiresAt):",
            seed::VAULT_USER,
            seed::TOKEN_VAULT_CONNECTION
        ),
        String::new(),
        format!("  {vaulted}"),
        String::new(),
        format!("  {health}"),
        String::new(),
        "Ctrl-C stops it.".to_owned(),
    ]
    .join("\n")
}
