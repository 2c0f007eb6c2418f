//! Shared test harness: a broker on port 0 with a fresh PKI and its own
//! emulator, and mTLS clients with any certificate.

use std::future::Future;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokenbroker::audit::{AuditSettings, AuditTrail};
use tokenbroker::auth0::{Auth0Settings, ClientCredential, OutboundLimits, SigningKeyFile};
use tokenbroker::cache::CacheSettings;
use tokenbroker::cache::{DEFAULT_STALE_IF_ERROR, DEFAULT_USER_MAX_BYTES};
use tokenbroker::emulator::{seed, Emulator, EmulatorConfig, Endpoint, Fault};
use tokenbroker::id_token::IdTokenSettings;
use tokenbroker::listener::ConnectionLimits;
use tokenbroker::pki::{write_file, CertificateAuthority, IssuedCertificate};
use tokenbroker::policy::{Policy, PolicyStore};
use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::{
    GetIdpTokenRequest, GetIdpTokenResponse, IdpToken, InvalidateUserRequest, ListIdpTokensRequest,
};
use tokenbroker::server::{self, Broker};
use tokenbroker::server::{BrokerSettings, ResilienceSettings, RunSettings};
use tokenbroker::service::fresh::FreshnessSettings;
pub use tokenbroker::testkit::{mtls_channel, mtls_client};
use tokenbroker::testkit::{Credentials, HealthListener, StartedBroker, TestPki};
use tokenbroker::tls::TlsFiles;
use tokenbroker::tls::TlsStore;
use tokio::process::{Child, Command};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::Status;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Client id and secret the test broker uses against its emulator.
pub const CLIENT_ID: &str = "tokenbroker-test";
pub const CLIENT_SECRET: &str = "test-client-secret-5d1f0c";

/// [`CLIENT_ID`] and [`CLIENT_SECRET`], as the test kit takes them.
const CREDENTIALS: Credentials<'static> = Credentials {
    client_id: CLIENT_ID,
    client_secret: CLIENT_SECRET,
};

/// The SPIFFE id of the harness's default client certificate.
pub const CLIENT_SPIFFE_ID: &str = "spiffe://test.example/ns/it/sa/client";

/// Upper bound for any single RPC in a test, so nothing can hang.
pub const RPC_BOUND: Duration = Duration::from_secs(20);

/// Awaits `future`, bounded by [`RPC_BOUND`]; panics naming `what` if it takes longer.
pub async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(RPC_BOUND, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {RPC_BOUND:?}"))
}

/// Polls `check` until it returns `true` or `timeout` has passed (a bounded
/// number of times, as long as each check is bounded). Returns the last answer.
pub async fn eventually(timeout: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let interval = (timeout / 200).clamp(Duration::from_millis(10), Duration::from_millis(100));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(interval).await;
    }
}

/// A `GetIdpToken` request for `user_id`'s token from `provider` (`""`: any).
pub fn get_request(user_id: &str, provider: &str) -> GetIdpTokenRequest {
    GetIdpTokenRequest {
        user_id: user_id.to_owned(),
        provider: provider.to_owned(),
        ..Default::default()
    }
}

/// [`get_request`] with `bypass_cache` set.
pub fn bypass_request(user_id: &str, provider: &str) -> GetIdpTokenRequest {
    GetIdpTokenRequest {
        bypass_cache: true,
        ..get_request(user_id, provider)
    }
}

/// `GetIdpToken` on an existing client, bounded by [`RPC_BOUND`].
/// Releases of the seeded GitHub user's token running in the background:
/// `tasks` tasks asking `rounds` times each, one after the other, on
/// `client`, started at once (to rotate or reopen something under load).
pub struct BackgroundReleases(Vec<tokio::task::JoinHandle<usize>>);

impl BackgroundReleases {
    pub fn start(client: &TokenBrokerClient<Channel>, tasks: usize, rounds: usize) -> Self {
        let tasks = (0..tasks).map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut released = 0;
                for _ in 0..rounds {
                    let request = get_request(seed::GITHUB_USER, "github");
                    if get_on(&mut client, request).await.is_ok() {
                        released += 1;
                    }
                }
                released
            })
        });
        Self(tasks.collect())
    }

    /// How many releases succeeded, once every task is done.
    pub async fn released(self) -> usize {
        let mut released = 0;
        for task in self.0 {
            released += bounded("releases", task).await.expect("task");
        }
        released
    }
}

pub async fn get_on(
    client: &mut TokenBrokerClient<Channel>,
    request: impl tonic::IntoRequest<GetIdpTokenRequest>,
) -> Result<IdpToken, Status> {
    let response = bounded("GetIdpToken", client.get_idp_token(request)).await?;
    Ok(response
        .into_inner()
        .token
        .expect("response carries a token"))
}

/// `ListIdpTokens` for `user_id` on an existing client, bounded by [`RPC_BOUND`].
pub async fn list_on(
    client: &mut TokenBrokerClient<Channel>,
    user_id: &str,
) -> Result<Vec<IdpToken>, Status> {
    let request = ListIdpTokensRequest {
        user_id: user_id.to_owned(),
        ..Default::default()
    };
    let response = bounded("ListIdpTokens", client.list_idp_tokens(request)).await?;
    Ok(response.into_inner().tokens)
}

/// `InvalidateUser` for `user_id` on an existing client, bounded by [`RPC_BOUND`].
pub async fn invalidate_on(
    client: &mut TokenBrokerClient<Channel>,
    user_id: &str,
) -> Result<(), Status> {
    let request = InvalidateUserRequest {
        user_id: user_id.to_owned(),
    };
    bounded("InvalidateUser", client.invalidate_user(request))
        .await
        .map(|_| ())
}

/// The serving status `client` reports for `service` (`""`: the server as a
/// whole), bounded by [`RPC_BOUND`].
pub async fn health_status(
    client: &mut HealthClient<Channel>,
    service: &str,
) -> Result<i32, Status> {
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    let response = bounded("Health/Check", client.check(request)).await?;
    Ok(response.into_inner().status)
}

/// A codec that sends request bytes as given, as a client with a broken
/// encoder would, and decodes answers with prost.
#[derive(Default)]
pub struct RawRequestCodec;

pub struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Codec for RawRequestCodec {
    type Encode = Vec<u8>;
    type Decode = GetIdpTokenResponse;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<GetIdpTokenResponse>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// Sends `body` as the request message of `method`; the broker must refuse it.
pub async fn send_raw(channel: Channel, method: &str, body: Vec<u8>) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    bounded("raw call", grpc.ready()).await.expect("ready");
    let path =
        PathAndQuery::try_from(format!("/tokenbroker.v1.TokenBroker/{method}")).expect("path");
    bounded(
        "raw call",
        grpc.unary(tonic::Request::new(body), path, RawRequestCodec),
    )
    .await
    .expect_err("a malformed request is refused")
}

/// A connections file for a test: these connections refreshed at the
/// emulator's IdP, these listed with `refresh = "none"`, and these served
/// by Token Vault (`source = "token-vault"`).
#[derive(Clone, Default)]
pub struct TestConnections {
    pub refreshed_at_idp: Vec<&'static str>,
    pub not_refreshed: Vec<&'static str>,
    pub token_vault: Vec<&'static str>,
}

/// The IdP a connections file refreshes at: an emulator's.
#[derive(Clone)]
pub struct TestIdp {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: secrecy::SecretString,
}

impl TestIdp {
    pub fn of(emulator: &Emulator) -> Self {
        Self {
            token_url: emulator.idp_token_url(),
            client_id: emulator.idp_client_id(),
            client_secret: emulator.idp_client_secret(),
        }
    }
}

/// Writes `connections` as TOML at `path`, the IdP client secret beside it.
pub fn write_connections(
    path: &std::path::Path,
    connections: &TestConnections,
    emulator: &Emulator,
) {
    write_connections_for(path, connections, &TestIdp::of(emulator));
}

/// [`write_connections`] refreshing at `idp`.
pub fn write_connections_for(path: &std::path::Path, connections: &TestConnections, idp: &TestIdp) {
    use secrecy::ExposeSecret;
    let secret_path = path.with_file_name("idp-client-secret");
    write_file(&secret_path, idp.client_secret.expose_secret(), true)
        .expect("write the IdP client secret");
    let mut text = String::new();
    for name in &connections.refreshed_at_idp {
        text.push_str(&format!(
            "[[connection]]\nname = \"{name}\"\nrefresh = \"idp\"\ntoken_url = \"{}\"\nclient_id = \"{}\"\nclient_secret_file = \"{}\"\n\n",
            idp.token_url,
            idp.client_id,
            secret_path.display()
        ));
    }
    for name in &connections.not_refreshed {
        text.push_str(&format!(
            "[[connection]]\nname = \"{name}\"\nrefresh = \"none\"\n\n"
        ));
    }
    for name in &connections.token_vault {
        text.push_str(&format!(
            "[[connection]]\nname = \"{name}\"\nsource = \"token-vault\"\n\n"
        ));
    }
    write_file(path, &text, false).expect("write the connections file");
}

/// How a test wants its broker.
pub struct Options {
    pub cache: CacheSettings,
    /// Secret the broker presents (the emulator always expects [`CLIENT_SECRET`]).
    pub broker_secret: String,
    pub emulator: EmulatorConfig,
    /// Caller policy as TOML; `None` allows any caller.
    pub policy_toml: Option<String>,
    /// Point the broker at this Auth0 URL instead of its emulator (e.g. a dead port).
    pub auth0_base_url: Option<String>,
    /// Faults the emulator's `/oauth/token` answers with before the broker starts.
    pub token_faults: Vec<Fault>,
    /// Also serve plaintext health on a second port.
    pub health_listener: bool,
    /// Shutdown, reload and connection limits (streams, connections, timeouts).
    pub run: RunSettings,
    /// Rate limit, in-flight bound and retries towards Auth0.
    pub outbound: OutboundLimits,
    /// How long past its TTL a user may be served while Auth0 fails.
    pub stale_if_error: Duration,
    /// The `aud` values ID tokens may carry; empty turns ID-token verification off.
    pub id_token_audiences: Vec<String>,
    /// The fraction of the Auth0 budget one caller may spend.
    pub caller_share: f64,
    /// Where audit lines go; off unless a test reads them.
    pub audit: AuditSettings,
    /// The connections file and `min_valid_for` default.
    pub freshness: FreshnessSettings,
    /// Writes a connections file before the broker starts (the emulator's
    /// IdP address is only known then); see [`TestConnections`].
    pub connections: Option<TestConnections>,
    /// `--auth0-timeout`: how long one whole call to Auth0 may take; `None`: 10 s.
    pub auth0_request_timeout: Option<Duration>,
    /// Least time between two unknown-`kid` JWKS refreshes; `None`: the default (30 s).
    pub id_token_min_refresh_interval: Option<Duration>,
    /// Redis and the cache key of a fleet (`tests/it/fleet.rs`); `None`: a broker alone.
    pub fleet: Option<tokenbroker::fleet::FleetSettings>,
    /// The IdP [`Options::connections`] refreshes at; `None`: this broker's emulator's.
    pub idp: Option<TestIdp>,
    /// A client assertion key (PEM): the broker authenticates with
    /// `private_key_jwt` and no secret, and the emulator registers the key's
    /// public half for client assertions and Token Vault subject tokens.
    pub assertion_key: Option<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            cache: CacheSettings {
                user_ttl: Duration::from_secs(300),
                user_capacity: 1000,
                user_max_bytes: DEFAULT_USER_MAX_BYTES,
                negative_ttl: Duration::from_secs(30),
            },
            broker_secret: CLIENT_SECRET.to_owned(),
            emulator: CREDENTIALS.emulator_config(),
            policy_toml: None,
            auth0_base_url: None,
            token_faults: Vec::new(),
            health_listener: false,
            outbound: OutboundLimits::default(),
            stale_if_error: DEFAULT_STALE_IF_ERROR,
            id_token_audiences: vec![seed::DEFAULT_ID_TOKEN_AUDIENCE.to_owned()],
            caller_share: 1.0,
            audit: AuditSettings::off(),
            freshness: FreshnessSettings::default(),
            connections: None,
            auth0_request_timeout: None,
            id_token_min_refresh_interval: None,
            fleet: None,
            idp: None,
            assertion_key: None,
            run: RunSettings {
                shutdown_grace: Duration::from_secs(20),
                reload_interval: Duration::from_millis(100),
                connections: ConnectionLimits::default(),
            },
        }
    }
}

/// Writes `pem` as the broker's client assertion key in the PKI's directory
/// and registers its public half with `emulator`, for client assertions and
/// Token Vault subject tokens.
fn assertion_key(
    pki: &TestPki,
    emulator: &Emulator,
    pem: &str,
) -> (std::path::PathBuf, Arc<SigningKeyFile>) {
    let path = pki.path("client-assertion.pem");
    write_file(&path, pem, true).expect("write assertion key");
    let key = SigningKeyFile::open("AUTH0_CLIENT_ASSERTION_KEY_FILE", &path, None)
        .expect("assertion key reads");
    register_assertion_key(emulator, &key.public_key_pem());
    (path, Arc::new(key))
}

/// Registers `public_pem` with `emulator` as the client's `private_key_jwt`
/// credential and as its Token Vault Privileged Worker key.
pub fn register_assertion_key(emulator: &Emulator, public_pem: &str) {
    emulator
        .set_client_assertion_keys(&[public_pem])
        .expect("emulator takes the key");
    emulator
        .set_token_vault_subject_keys(&[public_pem])
        .expect("emulator takes the key");
}

/// The public half of `private_pem`, as a tenant registers it.
pub fn public_key_pem(private_pem: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("key.pem");
    std::fs::write(&path, private_pem).expect("write key");
    SigningKeyFile::open("TEST_KEY", &path, None)
        .expect("a fixture key")
        .public_key_pem()
}

/// A running broker, its emulator and the PKI around them.
pub struct TestBroker {
    /// The server task; first, so it is aborted before the rest is dropped.
    server: StartedBroker,
    pub emulator: Emulator,
    pub addr: SocketAddr,
    /// The plaintext health port, when asked for.
    pub health_addr: Option<SocketAddr>,
    pub ca: CertificateAuthority,
    /// Where the server's certificate, key, client CA and policy files live.
    pub files: TlsFiles,
    pub policy_path: std::path::PathBuf,
    /// Where [`Options::connections`] is written (to rewrite it in a test).
    pub connections_path: std::path::PathBuf,
    /// The live TLS material, to check reload counters.
    pub tls: Arc<TlsStore>,
    /// The broker's audit trail, to reopen its file as SIGHUP would.
    pub audit: AuditTrail,
    pub client_cert: IssuedCertificate,
    /// The client assertion key file, when the broker uses one.
    pub assertion_key_path: Option<std::path::PathBuf>,
    _dir: tempfile::TempDir,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        let emulator = Emulator::start(options.emulator)
            .await
            .expect("emulator starts");
        if !options.token_faults.is_empty() {
            emulator.inject_faults(Endpoint::Token, options.token_faults);
        }
        let pki = TestPki::generate("test client and server CA").expect("test PKI");
        let client_cert = pki.issue_client(CLIENT_SPIFFE_ID).expect("client cert");
        let policy_path = pki.path("policy.toml");
        let policy = match &options.policy_toml {
            Some(toml) => {
                write_file(&policy_path, toml, false).expect("write policy");
                PolicyStore::open(Some(&policy_path)).expect("policy parses")
            }
            None => PolicyStore::fixed(Policy::allow_any()),
        };
        let credentials = Credentials {
            client_secret: &options.broker_secret,
            ..CREDENTIALS
        };
        let base_url = options
            .auth0_base_url
            .clone()
            .unwrap_or_else(|| emulator.base_url());
        let defaults = credentials.auth0_settings(base_url, emulator.audience());
        let assertion_key = options
            .assertion_key
            .map(|pem| assertion_key(&pki, &emulator, pem));
        let credential = match &assertion_key {
            Some((_, key)) => ClientCredential::AssertionKey(key.clone()),
            None => defaults.credential.clone(),
        };
        let auth0 = Auth0Settings {
            request_timeout: options
                .auth0_request_timeout
                .unwrap_or(defaults.request_timeout),
            credential,
            ..defaults
        };
        let id_token = (!options.id_token_audiences.is_empty()).then(|| {
            let defaults =
                IdTokenSettings::new(auth0.base_url.clone(), options.id_token_audiences.clone());
            IdTokenSettings {
                min_refresh_interval: options
                    .id_token_min_refresh_interval
                    .unwrap_or(defaults.min_refresh_interval),
                ..defaults
            }
        });
        let resilience = ResilienceSettings {
            outbound: options.outbound,
            stale_if_error: options.stale_if_error,
            caller_share: options.caller_share,
        };
        let connections_path = pki.path("connections.toml");
        let freshness = match &options.connections {
            Some(connections) => {
                let idp = options
                    .idp
                    .clone()
                    .unwrap_or_else(|| TestIdp::of(&emulator));
                write_connections_for(&connections_path, connections, &idp);
                FreshnessSettings {
                    connections: Some(connections_path.clone()),
                    ..options.freshness.clone()
                }
            }
            None => options.freshness.clone(),
        };
        let settings = BrokerSettings {
            auth0,
            resilience,
            cache: options.cache,
            id_token,
            audit: options.audit.clone(),
            freshness,
            fleet: options.fleet.clone(),
        };
        let tls = pki.tls_store().expect("tls config");
        let broker = Broker::new(settings, policy, tls).expect("broker builds");
        let health = if options.health_listener {
            HealthListener::Loopback
        } else {
            HealthListener::Off
        };
        let server = StartedBroker::start(broker, options.run, health)
            .await
            .expect("broker starts on loopback");
        let TestPki { ca, files, dir, .. } = pki;
        Self {
            addr: server.addr,
            health_addr: server.health_addr,
            tls: server.tls.clone(),
            audit: server.audit.clone(),
            server,
            emulator,
            ca,
            files,
            policy_path,
            connections_path,
            client_cert,
            assertion_key_path: assertion_key.map(|(path, _)| path),
            _dir: dir,
        }
    }

    /// [`TestBroker::start_with`], then one RPC (so the Management token is
    /// in hand) and the emulator's counters reset: a test counts only its own calls.
    pub async fn start_warm(options: Options) -> Self {
        let broker = Self::start_with(options).await;
        broker
            .get(seed::TWITTER_USER, "twitter")
            .await
            .expect("warm-up");
        broker.emulator.reset_counters();
        broker
    }

    /// A client with the default certificate from the broker's client CA.
    pub async fn client(&self) -> TokenBrokerClient<Channel> {
        self.client_with(Some(&self.client_cert), &self.ca.cert_pem)
            .await
            .expect("client connects")
    }

    /// A client presenting `cert` (or none), trusting `server_ca_pem`.
    pub async fn client_with(
        &self,
        cert: Option<&IssuedCertificate>,
        server_ca_pem: &str,
    ) -> Result<TokenBrokerClient<Channel>, tonic::transport::Error> {
        mtls_client(self.addr, server_ca_pem, cert).await
    }

    /// A raw channel, for health and reflection clients.
    pub async fn channel_with(
        &self,
        cert: Option<&IssuedCertificate>,
        server_ca_pem: &str,
    ) -> Result<Channel, tonic::transport::Error> {
        mtls_channel(self.addr, server_ca_pem, cert).await
    }

    /// `GetIdpToken` for `user_id`/`provider` with the default client, bounded by [`RPC_BOUND`].
    pub async fn get(&self, user_id: &str, provider: &str) -> Result<IdpToken, Status> {
        self.get_with(get_request(user_id, provider)).await
    }

    /// `GetIdpToken` for `user_id`/`provider` presenting `cert` (which must pass
    /// the handshake), bounded by [`RPC_BOUND`].
    pub async fn get_as(
        &self,
        cert: &IssuedCertificate,
        user_id: &str,
        provider: &str,
    ) -> Result<IdpToken, Status> {
        let mut client = self
            .client_with(Some(cert), &self.ca.cert_pem)
            .await
            .expect("client with the given certificate connects");
        get_on(&mut client, get_request(user_id, provider)).await
    }

    /// `GetIdpToken` with the default client, bounded by [`RPC_BOUND`].
    pub async fn get_with(&self, request: GetIdpTokenRequest) -> Result<IdpToken, Status> {
        get_on(&mut self.client().await, request).await
    }

    /// `ListIdpTokens` with the default client, bounded by [`RPC_BOUND`].
    pub async fn list(&self, user_id: &str) -> Result<Vec<IdpToken>, Status> {
        list_on(&mut self.client().await, user_id).await
    }

    /// `InvalidateUser` with the default client, bounded by [`RPC_BOUND`].
    pub async fn invalidate(&self, user_id: &str) -> Result<(), Status> {
        invalidate_on(&mut self.client().await, user_id).await
    }

    /// Takes Auth0 down: the broker's emulator stops, so its port refuses
    /// connections (a fresh emulator on another port takes its place in the
    /// struct, unused by the broker).
    pub async fn stop_auth0(&mut self) {
        let spare = CREDENTIALS.start_emulator().await.expect("spare emulator");
        std::mem::replace(&mut self.emulator, spare)
            .shutdown()
            .await;
    }

    /// Asks the broker to shut down (like SIGTERM) without waiting.
    pub fn begin_shutdown(&mut self) {
        self.server.begin_shutdown();
    }

    /// Waits for the server task to end, bounded by [`RPC_BOUND`]; `None` if it did not.
    pub async fn wait_stopped(&mut self) -> Option<Result<(), server::ServerError>> {
        self.server.wait_stopped(RPC_BOUND).await
    }

    /// Stops the broker and waits for it to exit.
    pub async fn stop(self) {
        let _ = self.server.stop(RPC_BOUND).await;
    }
}

/// A `redis-server` of its own: no persistence, loopback only.
pub struct RedisServer {
    pub port: u16,
    /// `requirepass`, when the server was started with one.
    password: Option<String>,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> Self {
        Self::launch(free_port(), None).await
    }

    /// A server that requires `password` (in the URL as `redis://:password@`).
    pub async fn start_with_password(password: &str) -> Self {
        Self::launch(free_port(), Some(password.to_owned())).await
    }

    /// Starts `redis-server` on `port` and waits (bounded) until it answers.
    pub async fn start_on(port: u16) -> Self {
        Self::launch(port, None).await
    }

    async fn launch(port: u16, password: Option<String>) -> Self {
        let mut command = Command::new("redis-server");
        command
            .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .args(["--port", &port.to_string()]);
        if let Some(password) = &password {
            command.args(["--requirepass", password]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server runs (apt-get install redis-server)");
        let server = Self {
            port,
            password,
            child: Some(child),
        };
        let answers = eventually(Duration::from_secs(10), async || {
            server.try_connection().await.is_some()
        })
        .await;
        assert!(answers, "redis-server on port {port} did not answer");
        server
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    pub async fn try_connection(&self) -> Option<MultiplexedConnection> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut connection = tokio::time::timeout(
            Duration::from_secs(1),
            client.get_multiplexed_async_connection(),
        )
        .await
        .ok()?
        .ok()?;
        let pong: String = redis::cmd("PING").query_async(&mut connection).await.ok()?;
        (pong == "PONG").then_some(connection)
    }

    pub async fn connection(&self) -> MultiplexedConnection {
        self.try_connection().await.expect("Redis answers")
    }

    /// Stops the server (as a crash would) and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Every key in Redis.
    pub async fn keys(&self) -> Vec<String> {
        let mut connection = self.connection().await;
        redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut connection)
            .await
            .expect("KEYS")
    }

    /// The users' value keys in Redis now.
    pub async fn user_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .keys()
            .await
            .into_iter()
            .filter(|key| key.starts_with("tokenbroker:u:"))
            .collect();
        keys.sort();
        keys
    }

    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut connection = self.connection().await;
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("GET")
    }

    /// Every byte string stored under `key`: a string's value, or a hash's
    /// fields and values.
    pub async fn stored_bytes(&self, key: &str) -> Vec<Vec<u8>> {
        let mut connection = self.connection().await;
        let kind: String = redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("TYPE");
        match kind.as_str() {
            "string" => self.get(key).await.into_iter().collect(),
            "hash" => redis::cmd("HGETALL")
                .arg(key)
                .query_async(&mut connection)
                .await
                .expect("HGETALL"),
            "none" => Vec::new(),
            other => panic!("the broker stores no {other} ({key})"),
        }
    }

    pub async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) {
        let mut connection = self.connection().await;
        let mut command = redis::cmd("SET");
        command.arg(key).arg(value);
        if let Some(ttl) = ttl {
            command.arg("PX").arg(ttl.as_millis() as u64);
        }
        let _: () = command.query_async(&mut connection).await.expect("SET");
    }

    pub async fn del(&self, key: &str) {
        let mut connection = self.connection().await;
        let _: i64 = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("DEL");
    }
}

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    probe.local_addr().expect("addr").port()
}
