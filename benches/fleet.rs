//! Fleet benchmark (`--redis-url`): what the shared tier costs and saves.
//!
//! * Hits: closed-loop GetIdpToken cache hits on a broker alone and on a
//!   broker with Redis configured (a moka hit must never touch Redis, so the
//!   two should match), beside the bare tonic stack: gRPC Health/Check over
//!   the same broker's mTLS listener.
//! * Cold: 3 brokers on one Auth0 emulator, every user asked once on each
//!   broker: Auth0 reads with and without the shared tier, and the latency
//!   of reads that miss the replica's moka: the first (Auth0) and the others
//!   (Redis in a fleet, Auth0 alone).
//!
//! `cargo bench --bench fleet -- [--seconds 5] [--concurrency 64]
//! [--users 1000] [--auth0-latency-ms 0]`. Everything runs in this process
//! (brokers, emulator, load) except `redis-server`, started on a free
//! loopback port and killed at the end: absolute numbers depend on the
//! machine, the comparisons less so. Audit is off in every run.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokenbroker::audit::AuditSettings;
use tokenbroker::auth0::{Auth0Settings, ClientCredential, OutboundLimits};
use tokenbroker::cache::{CacheSettings, IdentityStore, DEFAULT_USER_MAX_BYTES};
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokenbroker::fleet::{FleetSettings, DEFAULT_LOCK_TTL};
use tokenbroker::listener::ConnectionLimits;
use tokenbroker::pki::{write_file, CertificateAuthority, IssuedCertificate, LeafSpec};
use tokenbroker::policy::{Policy, PolicyStore};
use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::GetIdpTokenRequest;
use tokenbroker::server::{self, Broker, BrokerSettings, Listeners, ResilienceSettings};
use tokenbroker::server::{RunSettings, READINESS_SERVICE};
use tokenbroker::tls::{TlsFiles, TlsStore};
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const CLIENT_ID: &str = "tokenbroker-fleet-bench";
const CLIENT_SECRET: &str = "fleet-bench-secret";
/// HTTP/2 connections the load is spread over.
const CHANNELS: usize = 4;

/// The command line.
struct Args {
    seconds: u64,
    concurrency: usize,
    users: usize,
    auth0_latency: Duration,
}

impl Args {
    /// Flags as given, unknown ones (cargo's `--bench`) ignored.
    fn parse() -> Self {
        let mut args = Self {
            seconds: 5,
            concurrency: 64,
            users: 1000,
            auth0_latency: Duration::ZERO,
        };
        let raw: Vec<String> = std::env::args().skip(1).collect();
        for pair in raw.windows(2) {
            let value = pair[1].parse::<u64>().ok();
            match (pair[0].as_str(), value) {
                ("--seconds", Some(value)) => args.seconds = value,
                ("--concurrency", Some(value)) => args.concurrency = value as usize,
                ("--users", Some(value)) => args.users = value as usize,
                ("--auth0-latency-ms", Some(value)) => {
                    args.auth0_latency = Duration::from_millis(value)
                }
                _ => {}
            }
        }
        args
    }
}

/// A `redis-server` on a free loopback port, killed on drop.
struct Redis {
    url: String,
    child: Child,
}

impl Redis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|probe| probe.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            url: format!("redis://127.0.0.1:{port}"),
            child,
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Server and client certificates, and the files the brokers read.
struct Pki {
    ca: CertificateAuthority,
    client: IssuedCertificate,
    files: TlsFiles,
    cache_key: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = CertificateAuthority::generate("fleet bench CA").expect("CA");
    let server = ca.issue(&LeafSpec::loopback_server()).expect("server");
    let client = ca
        .issue(&LeafSpec::spiffe_client("spiffe://bench/client"))
        .expect("client");
    let files = TlsFiles {
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server.key"),
        client_ca: dir.path().join("ca.pem"),
    };
    write_file(&files.cert, &server.cert_pem, false).expect("write");
    write_file(&files.key, &server.key_pem, true).expect("write");
    write_file(&files.client_ca, &ca.cert_pem, false).expect("write");
    let cache_key = dir.path().join("cache.key");
    write_file(
        &cache_key,
        "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=\n",
        true,
    )
    .expect("key");
    Pki {
        ca,
        client,
        files,
        cache_key,
        _dir: dir,
    }
}

/// A production broker (service, health, reflection) on a loopback port,
/// in a fleet when `redis` is given; its store, to wait for shared mode.
async fn start_broker(
    pki: &Pki,
    emulator: &Emulator,
    redis: Option<&Redis>,
) -> (SocketAddr, Arc<IdentityStore>) {
    let open = OutboundLimits {
        rate_per_second: NonZeroU32::new(1_000_000).expect("rate"),
        burst: NonZeroU32::new(1_000_000).expect("burst"),
        max_in_flight: 256,
        ..OutboundLimits::default()
    };
    let settings = BrokerSettings {
        auth0: Auth0Settings {
            base_url: emulator.base_url(),
            audience: emulator.audience(),
            client_id: CLIENT_ID.to_owned(),
            credential: ClientCredential::Secret(CLIENT_SECRET.to_owned().into()),
            token_vault_subject_key: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
        },
        resilience: ResilienceSettings {
            outbound: open,
            stale_if_error: Duration::ZERO,
            caller_share: 1.0,
        },
        cache: CacheSettings {
            user_ttl: Duration::from_secs(3600),
            user_capacity: 1_000_000,
            user_max_bytes: DEFAULT_USER_MAX_BYTES,
            negative_ttl: Duration::from_secs(30),
        },
        id_token: None,
        audit: AuditSettings::off(),
        freshness: tokenbroker::service::fresh::FreshnessSettings::default(),
        fleet: redis.map(|redis| FleetSettings {
            url: redis.url.clone().into(),
            ca_file: None,
            key_file: pki.cache_key.clone(),
            timeout: Duration::from_millis(100),
            lock_ttl: DEFAULT_LOCK_TTL,
        }),
    };
    let tls = TlsStore::open(pki.files.clone()).expect("tls");
    let broker =
        Broker::new(settings, PolicyStore::fixed(Policy::allow_any()), tls).expect("broker builds");
    let store = broker.store().clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let run = RunSettings {
        shutdown_grace: Duration::from_secs(1),
        reload_interval: Duration::from_secs(5),
        connections: ConnectionLimits::default(),
    };
    let listeners = Listeners {
        mtls: listener,
        health: None,
    };
    tokio::spawn(server::run(listeners, broker, run, std::future::pending()));
    store.warm_up().await.expect("Management token");
    let shared_by = Instant::now() + Duration::from_secs(10);
    while redis.is_some() && !store.is_shared() && Instant::now() < shared_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (addr, store)
}

async fn connect(addr: SocketAddr, pki: &Pki) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca.cert_pem))
        .identity(Identity::from_pem(
            &pki.client.cert_pem,
            &pki.client.key_pem,
        ))
        .domain_name("localhost");
    Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connects")
}

fn request(user: usize) -> GetIdpTokenRequest {
    GetIdpTokenRequest {
        user_id: format!("github|{user}"),
        provider: "github".to_owned(),
        ..Default::default()
    }
}

/// Latencies of answered requests, sorted.
struct Latencies(Vec<Duration>);

impl Latencies {
    fn new(mut all: Vec<Duration>) -> Self {
        all.sort_unstable();
        Self(all)
    }

    fn percentile(&self, q: f64) -> Duration {
        let last = self.0.len().saturating_sub(1);
        self.0
            .get(((last as f64) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    }

    fn summary(&self) -> String {
        format!(
            "p50 {:>8.1?}  p99 {:>8.1?}  (n = {})",
            self.percentile(0.5),
            self.percentile(0.99),
            self.0.len()
        )
    }
}

/// One request on a channel: `true` when answered OK.
type Call = Arc<dyn Fn(Channel, usize) -> BoxFuture<'static, bool> + Send + Sync>;

/// `concurrency` closed loops over the channels for `seconds`: requests per
/// second and the latencies of the OK answers (errors are counted).
async fn drive(channels: &[Channel], call: Call, args: &Args) -> (f64, Latencies, u64) {
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|task| {
            let channel = channels[task % channels.len()].clone();
            let call = call.clone();
            let (stride, users) = (args.concurrency, args.users);
            tokio::spawn(async move {
                let (mut latencies, mut errors, mut next) = (Vec::new(), 0u64, task);
                while Instant::now() < until {
                    let sent = Instant::now();
                    if call(channel.clone(), next % users).await {
                        latencies.push(sent.elapsed());
                    } else {
                        errors += 1;
                    }
                    next += stride;
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (latencies, task_errors) = task.await.expect("load task");
        all.extend(latencies);
        errors += task_errors;
    }
    let rate = all.len() as f64 / args.seconds as f64;
    (rate, Latencies::new(all), errors)
}

fn get_token() -> Call {
    Arc::new(|channel, user| {
        Box::pin(async move {
            let mut client = TokenBrokerClient::new(channel);
            client.get_idp_token(request(user)).await.is_ok()
        })
    })
}

fn health_check() -> Call {
    Arc::new(|channel, _user| {
        Box::pin(async move {
            let mut client = HealthClient::new(channel);
            let service = READINESS_SERVICE.to_owned();
            client.check(HealthCheckRequest { service }).await.is_ok()
        })
    })
}

/// An emulator holding `users` GitHub users (`github|0` ...).
async fn emulator(users: usize, latency: Duration) -> Emulator {
    let emulator = Emulator::start(EmulatorConfig::new(CLIENT_ID, CLIENT_SECRET))
        .await
        .expect("emulator");
    for user in 0..users {
        emulator.upsert_user(serde_json::json!({
            "user_id": format!("github|{user}"),
            "identities": [{"provider": "github", "connection": "github", "user_id": user,
                            "isSocial": true, "access_token": format!("gho_bench_{user:06}")}]
        }));
    }
    emulator.set_latency(latency);
    emulator
}

/// Hits: every user cached first, then the closed loop.
async fn hits(pki: &Pki, redis: &Redis, args: &Args) {
    println!(
        "== cache hits: {} users cached, {} concurrent RPCs over {CHANNELS} connections, {} s each",
        args.users, args.concurrency, args.seconds
    );
    let emulator = emulator(args.users, Duration::ZERO).await;
    let rows: [(&str, Option<&Redis>, Call); 3] = [
        (
            "tonic baseline: Health/Check over the broker's mTLS",
            None,
            health_check(),
        ),
        ("GetIdpToken hit, broker alone", None, get_token()),
        (
            "GetIdpToken hit, broker with Redis configured",
            Some(redis),
            get_token(),
        ),
    ];
    for (name, redis, call) in rows {
        let (addr, _store) = start_broker(pki, &emulator, redis).await;
        let mut channels = Vec::new();
        for _ in 0..CHANNELS {
            channels.push(connect(addr, pki).await);
        }
        let warm = Args {
            seconds: 1,
            ..*args
        };
        drive(&channels, get_token(), &warm).await;
        let (rate, latencies, errors) = drive(&channels, call, args).await;
        println!(
            "{name:<52} {rate:>9.0} RPC/s  {}  errors {errors}",
            latencies.summary()
        );
    }
}

/// Cold: 3 brokers, each user asked on all three in turn.
async fn cold(pki: &Pki, redis: Option<&Redis>, args: &Args) {
    let emulator = emulator(args.users, args.auth0_latency).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (addr, _store) = start_broker(pki, &emulator, redis).await;
        clients.push(TokenBrokerClient::new(connect(addr, pki).await));
    }
    emulator.reset_counters();
    let workers = 16.min(args.users.max(1));
    let tasks: Vec<_> = (0..workers)
        .map(|worker| {
            let clients = clients.clone();
            let (users, stride) = (args.users, workers);
            tokio::spawn(async move {
                let (mut first, mut others) = (Vec::new(), Vec::new());
                for user in (worker..users).step_by(stride) {
                    for turn in 0..3 {
                        let mut client = clients[(user + turn) % 3].clone();
                        let sent = Instant::now();
                        client.get_idp_token(request(user)).await.expect("answered");
                        if turn == 0 {
                            first.push(sent.elapsed())
                        } else {
                            others.push(sent.elapsed())
                        }
                    }
                }
                (first, others)
            })
        })
        .collect();
    let (mut first, mut others) = (Vec::new(), Vec::new());
    for task in tasks {
        let (task_first, task_others) = task.await.expect("cold task");
        first.extend(task_first);
        others.extend(task_others);
    }
    let mode = if redis.is_some() {
        "with the shared tier"
    } else {
        "alone (no Redis)"
    };
    println!(
        "-- 3 brokers {mode}: {} Auth0 users reads for {} users",
        emulator.calls().users,
        args.users
    );
    println!(
        "   first read of a user (Auth0)           {}",
        Latencies::new(first).summary()
    );
    println!(
        "   same user on the other two brokers     {}",
        Latencies::new(others).summary()
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let pki = pki();
    let redis = Redis::start();
    hits(&pki, &redis, &args).await;
    println!(
        "== cold path: 3 brokers x {} users, Auth0 latency {:?}, 16 users at a time",
        args.users, args.auth0_latency
    );
    cold(&pki, None, &args).await;
    let fresh = Redis::start();
    cold(&pki, Some(&fresh), &args).await;
}
