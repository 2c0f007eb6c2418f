//! Puts the pieces together on already-bound listeners: the TokenBroker
//! service, server reflection (v1 and v1alpha, for grpcurl) and gRPC health
//! behind the mTLS acceptor, plus health alone on an optional plaintext
//! listener for kubelet probes. Owns the shutdown sequence. Taking bound
//! listeners lets tests and `tokenbroker dev` run it on port 0. Both
//! listeners run under the same [`ConnectionLimits`] (the health port with
//! its own, lower, stream limit).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::audit::{AuditSettings, AuditSetupError, AuditTrail};
use crate::auth0::{Auth0Client, Auth0Error, Auth0Settings, OutboundLimits, SigningKeyFile};
use crate::budget::{CallerBudgets, ShareSettings};
use crate::cache::{CacheSettings, IdentityStore};
use crate::connections::ConnectionsStore;
use crate::fleet::{Fleet, FleetError, FleetSettings, LocalTier};
use crate::id_token::{IdTokenSettings, IdTokenVerifier};
use crate::listener::{self, ConnectionLimits};
use crate::policy::{PolicyError, PolicyStore};
use crate::proto;
use crate::reload;
use crate::service::fresh::{Freshness, FreshnessError, FreshnessSettings};
use crate::service::{ServiceParts, TokenBrokerService};
use crate::shutdown::{Drain, DrainControl};
use crate::tls::{self, TlsError, TlsFiles, TlsStore};

/// How the broker treats Auth0 beyond timeouts: rate, concurrency, retries, stale-if-error.
#[derive(Debug, Clone, Copy)]
pub struct ResilienceSettings {
    pub outbound: OutboundLimits,
    pub stale_if_error: Duration,
    /// The fraction of the Auth0 budget one caller may spend, in (0, 1].
    pub caller_share: f64,
}

/// How the server behaves around shutdown and reloads, and what one client
/// may hold of it.
#[derive(Debug, Clone, Copy)]
pub struct RunSettings {
    /// How long in-flight RPCs may take after SIGTERM before they get UNAVAILABLE.
    pub shutdown_grace: Duration,
    /// How often the policy and TLS files are checked for changes.
    pub reload_interval: Duration,
    /// Streams, connections, handshakes and timeouts, applied to both listeners.
    pub connections: ConnectionLimits,
}

/// Validated settings of a production broker.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub health_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    /// `None` means `--allow-any-caller`.
    pub policy: Option<PathBuf>,
    pub run: RunSettings,
    pub tls: TlsFiles,
    pub broker: BrokerSettings,
}

/// What a [`Broker`] is built from, whoever builds it (`serve`, `dev`, tests,
/// the benchmark): one struct, so they all build the same broker.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub auth0: Auth0Settings,
    pub resilience: ResilienceSettings,
    pub cache: CacheSettings,
    /// `None` when no audience is configured: ID tokens are not verified.
    pub id_token: Option<IdTokenSettings>,
    pub audit: AuditSettings,
    /// The connections file, `min_valid_for` default, IdP refreshes.
    pub freshness: FreshnessSettings,
    /// `None` unless `--redis-url` is set: a broker alone, with no Redis
    /// code on any path.
    pub fleet: Option<FleetSettings>,
}

/// Service name whose health status means "ready to hand out tokens".
pub const READINESS_SERVICE: &str = "tokenbroker.v1.TokenBroker";

/// Default time in-flight RPCs get after SIGTERM: below Kubernetes' default
/// 30 s termination grace, with room for the UNAVAILABLE answers.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// Default interval of the policy and TLS file checks.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// After the grace period, how long in-flight RPCs get to send their
/// UNAVAILABLE answers before the connections are closed.
const FLUSH_AFTER_GRACE: Duration = Duration::from_secs(2);

/// Largest header block a client may send (SETTINGS_MAX_HEADER_LIST_SIZE).
/// gRPC metadata here is a few hundred bytes; set explicitly so a change of
/// library default cannot make each stream's headers cost megabytes.
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// Why the broker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the Auth0 client: {0}")]
    Auth0Client(#[from] Auth0Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Metrics(#[from] crate::stats::MetricsError),
    #[error(transparent)]
    Audit(#[from] AuditSetupError),
    #[error(transparent)]
    Freshness(#[from] FreshnessError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error("gRPC server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl ServerError {
    /// Whether an operator-supplied file or setting is at fault (exit code 2),
    /// rather than the runtime.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Self::Tls(_)
                | Self::Policy(_)
                | Self::Bind { .. }
                | Self::Metrics(_)
                | Self::Audit(_)
                | Self::Freshness(_)
                | Self::Fleet(_)
        )
    }
}

/// The long-lived state the listeners serve. Its fields are private so that
/// [`Broker::new`] is the only way to make one: `serve`, `dev`, the tests and
/// the benchmark all get the same broker from the same [`BrokerSettings`].
pub struct Broker {
    /// Users' identities, cached in front of Auth0.
    store: Arc<IdentityStore>,
    /// Who may call what; reloaded from its file.
    policy: Arc<PolicyStore>,
    /// Each caller's share of the Auth0 budget.
    budgets: Arc<CallerBudgets>,
    /// Where every RPC's audit line goes.
    audit: AuditTrail,
    /// The connections file and the IdP refresher.
    fresh: Freshness,
    /// Server certificate, key and client CA; reloaded from their files.
    tls: Arc<TlsStore>,
    /// `None` when no ID-token audience is configured. Cheap to clone: clones
    /// share the JWKS cache.
    id_tokens: Option<IdTokenVerifier>,
    /// The client assertion and Token Vault subject keys, reloaded from their files.
    key_files: Vec<Arc<SigningKeyFile>>,
}

impl Broker {
    /// The broker's state from validated settings; `serve`, `dev`, the tests
    /// and the benchmark all call it, so all build exactly the same broker.
    pub fn new(
        settings: BrokerSettings,
        policy: PolicyStore,
        tls: TlsStore,
    ) -> Result<Self, ServerError> {
        let BrokerSettings {
            auth0,
            resilience,
            cache,
            id_token,
            audit,
            freshness,
            fleet,
        } = settings;
        let audit = audit.open()?;
        let connections = freshness.open_connections()?;
        let key_files = auth0.key_files();
        let auth0_timeout = auth0.request_timeout;
        let budgets = CallerBudgets::new(ShareSettings {
            rate_per_second: resilience.outbound.rate_per_second,
            burst: resilience.outbound.burst,
            share: resilience.caller_share,
            max_wait: resilience.outbound.max_wait,
        });
        let fleet = fleet.as_ref().map(Fleet::open).transpose()?.map(Arc::new);
        let mut auth0 = Auth0Client::with_limits(auth0, resilience.outbound)?
            .keeping_refresh_tokens(crate::service::fresh::refresh_token_filter(&connections));
        if let Some(fleet) = &fleet {
            let limits = resilience.outbound;
            auth0 = auth0.with_shared_budget(fleet.budget(limits.rate_per_second, limits.burst));
        }
        // One client for the store and the Token Vault: one gate, one budget.
        let fresh = freshness.open(connections, auth0.clone(), auth0_timeout, fleet.clone())?;
        let id_tokens = id_token.map(|settings| IdTokenVerifier::new(settings, &auth0));
        let store = Arc::new(
            IdentityStore::new(auth0, cache)
                .with_stale_if_error(resilience.stale_if_error)
                .with_fleet(fleet.clone()),
        );
        if let Some(fleet) = &fleet {
            fleet.watch(vec![
                Arc::downgrade(&store) as Weak<dyn LocalTier>,
                Arc::downgrade(&fresh.refresher) as Weak<dyn LocalTier>,
                Arc::downgrade(&fresh.vault) as Weak<dyn LocalTier>,
            ]);
        }
        Ok(Self {
            store,
            policy: Arc::new(policy),
            budgets: Arc::new(budgets),
            tls: Arc::new(tls),
            id_tokens,
            audit,
            fresh,
            key_files,
        })
    }

    /// The identity store, shared with the running server: tests and the
    /// benchmark warm it up and count its users.
    pub fn store(&self) -> &Arc<IdentityStore> {
        &self.store
    }

    /// The live TLS material, shared with the running server: tests read its
    /// reload counters, the benchmark serves its baseline with it.
    pub fn tls(&self) -> &Arc<TlsStore> {
        &self.tls
    }

    /// The audit trail, shared with the running server: tests reopen its
    /// file as SIGHUP would.
    pub fn audit(&self) -> &AuditTrail {
        &self.audit
    }
}

/// The bound sockets.
pub struct Listeners {
    /// mTLS: TokenBroker, reflection, health.
    pub mtls: TcpListener,
    /// Plaintext: health only, for kubelet's `grpc:` probes, which speak no mTLS.
    pub health: Option<TcpListener>,
}

/// Serves Prometheus metrics on `addr`, every metric described, the fleet's
/// too (wired here so `stats` needs nothing of the modules that count).
pub fn install_metrics(addr: SocketAddr) -> Result<(), ServerError> {
    crate::stats::install_exporter(addr)?;
    crate::fleet::describe_metrics();
    Ok(())
}

/// Opens policy, TLS and Auth0 client from `config`, binds the listeners and
/// serves until `shutdown`.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    if let Some(addr) = config.metrics_listen {
        install_metrics(addr)?;
    }
    let broker = Broker::new(
        config.broker,
        PolicyStore::open(config.policy.as_deref())?,
        TlsStore::open(config.tls)?,
    )?;
    let listeners = Listeners::bind(config.listen, config.health_listen).await?;
    crate::open_files::raise_and_report(&config.run.connections, listeners.count());
    run(listeners, broker, config.run, shutdown).await
}

impl Listeners {
    /// Binds the mTLS listener on `mtls` and, if asked, the plaintext health
    /// listener on `health`; `serve`, `dev` and the test kit bind the same way.
    pub async fn bind(mtls: SocketAddr, health: Option<SocketAddr>) -> Result<Self, ServerError> {
        Ok(Self {
            mtls: bind(mtls).await?,
            health: match health {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            },
        })
    }

    /// How many sockets accept connections, each with its own connection cap.
    pub fn count(&self) -> usize {
        1 + usize::from(self.health.is_some())
    }
}

/// Binds `addr`, naming it on failure.
async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// Serves until `shutdown` completes. Then: both health services report
/// NOT_SERVING, the listeners stop accepting, in-flight RPCs get
/// `shutdown_grace` to finish, and those still running get UNAVAILABLE.
pub async fn run(
    listeners: Listeners,
    broker: Broker,
    settings: RunSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    announce(&listeners, &broker);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    health_reporter
        .set_service_status(READINESS_SERVICE, ServingStatus::NotServing)
        .await;
    let background = vec![
        tokio::spawn(become_ready(broker.store.clone(), health_reporter.clone())),
        PolicyStore::watch(&broker.policy, settings.reload_interval),
        ConnectionsStore::watch(&broker.fresh.connections, settings.reload_interval),
        watch_tls(&broker.tls, settings.reload_interval),
        watch_keys(&broker.key_files, settings.reload_interval),
        tokio::spawn(report_cache_size(broker.store.clone())),
        reopen_audit_on_hangup(&broker.audit),
    ];
    let (drain_control, drain) = Drain::new();
    let (stop_accepting, accepting) = tokio::sync::watch::channel(false);
    let until_stopped = move || {
        let mut accepting = accepting.clone();
        async move {
            let _ = accepting.wait_for(|stopped| *stopped).await;
        }
    };
    let limits = settings.connections;
    let mut mtls = tokio::spawn(
        http2_server(&limits, limits.max_concurrent_streams)
            .add_service(TokenBrokerService::server(ServiceParts {
                store: broker.store.clone(),
                policy: broker.policy.clone(),
                budgets: broker.budgets.clone(),
                audit: broker.audit.clone(),
                fresh: broker.fresh.clone(),
                id_tokens: broker.id_tokens.clone(),
                drain,
            }))
            .add_service(health_service.clone())
            .add_service(reflection_builder().build_v1()?)
            .add_service(reflection_builder().build_v1alpha()?)
            .serve_with_incoming_shutdown(
                tls::incoming(listeners.mtls, broker.tls.clone(), limits),
                until_stopped(),
            ),
    );
    let plaintext_health = listeners.health.map(|listener| {
        tokio::spawn(
            http2_server(&limits, limits.health_max_concurrent_streams)
                .add_service(health_service)
                .serve_with_incoming_shutdown(
                    listener::plaintext_incoming(listener, &limits),
                    until_stopped(),
                ),
        )
    });

    let early_exit = tokio::select! {
        () = shutdown => None,
        result = &mut mtls => Some(result),
    };
    for task in &background {
        task.abort();
    }
    if let Some(result) = early_exit {
        return flatten(result);
    }
    health_reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health_reporter
        .set_service_status(READINESS_SERVICE, ServingStatus::NotServing)
        .await;
    let _ = stop_accepting.send(true);
    tracing::info!(
        grace_secs = settings.shutdown_grace.as_secs_f64(),
        "draining in-flight RPCs"
    );
    let result = drain_in_flight(&mut mtls, settings.shutdown_grace, &drain_control).await;
    if let Some(health) = plaintext_health {
        health.abort();
    }
    if let Err(error) = broker.audit.sink.sync().await {
        tracing::error!(%error, "the audit log could not be synced to disk at shutdown");
    }
    tracing::info!("stopped");
    result
}

/// Waits for in-flight RPCs; at the end of the grace period tells them to
/// answer UNAVAILABLE, gives them a moment to send it, then closes.
async fn drain_in_flight(
    server: &mut JoinHandle<Result<(), tonic::transport::Error>>,
    grace: Duration,
    control: &DrainControl,
) -> Result<(), ServerError> {
    if let Ok(result) = tokio::time::timeout(grace, &mut *server).await {
        return flatten(result);
    }
    tracing::warn!("grace period over: answering UNAVAILABLE to RPCs still in flight");
    control.end_grace();
    match tokio::time::timeout(FLUSH_AFTER_GRACE, &mut *server).await {
        Ok(result) => flatten(result),
        Err(_) => {
            server.abort();
            Ok(())
        }
    }
}

/// A tonic server that bounds what one connection may hold: `max_streams`
/// streams at once, one request at most `request_timeout` (so a stream whose
/// body never ends is freed), and keepalive pings so idle clients stay
/// connected and dead ones are dropped.
fn http2_server(limits: &ConnectionLimits, max_streams: u32) -> Server {
    Server::builder()
        .max_concurrent_streams(max_streams)
        .timeout(limits.request_timeout)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
}

fn flatten(
    result: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), ServerError> {
    Ok(result??)
}

fn announce(listeners: &Listeners, broker: &Broker) {
    if let Ok(addr) = listeners.mtls.local_addr() {
        tracing::info!(listen = %addr, "serving TokenBroker, reflection and health over mTLS");
    }
    if let Some(Ok(addr)) = listeners.health.as_ref().map(TcpListener::local_addr) {
        tracing::info!(listen = %addr, "serving plaintext gRPC health for probes");
    }
    match broker.policy.current().listed_callers() {
        None => tracing::warn!(
            "--allow-any-caller: every caller with a certificate from the client CA may call every RPC"
        ),
        Some(callers) => tracing::info!(callers, "caller policy loaded"),
    }
}

fn reopen_audit_on_hangup(audit: &AuditTrail) -> JoinHandle<()> {
    let sink = audit.sink.clone();
    reload::on_hangup(move || sink.reopen())
}

/// Reloads the client assertion and subject keys when their files change
/// (or on SIGHUP), so a rotated key is used without a restart.
fn watch_keys(keys: &[Arc<SigningKeyFile>], interval: Duration) -> JoinHandle<()> {
    if keys.is_empty() {
        return tokio::spawn(async {});
    }
    let keys = keys.to_vec();
    let paths = keys.iter().map(|key| key.path().to_owned()).collect();
    reload::watch_files(paths, interval, move || {
        for key in &keys {
            key.reload();
        }
    })
}

fn watch_tls(tls: &Arc<TlsStore>, interval: Duration) -> JoinHandle<()> {
    let tls_for_reload = tls.clone();
    reload::watch_files(tls.paths(), interval, move || tls_for_reload.reload())
}

/// Keeps the cached-users gauge current.
async fn report_cache_size(store: Arc<IdentityStore>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    loop {
        ticker.tick().await;
        crate::stats::cache_users(store.cached_users().await);
    }
}

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Marks the TokenBroker service SERVING once a Management token has been
/// obtained, retrying with capped exponential backoff.
async fn become_ready(store: Arc<IdentityStore>, reporter: HealthReporter) {
    let mut delay = Duration::from_millis(250);
    loop {
        match store.warm_up().await {
            Ok(()) => {
                reporter
                    .set_service_status(READINESS_SERVICE, ServingStatus::Serving)
                    .await;
                tracing::info!("ready: obtained the first Management API token");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "not ready yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}
