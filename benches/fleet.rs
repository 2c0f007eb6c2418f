//! Fleet benchmark: what the shared tier (Redis) costs and saves.
//!
//! * Hits: closed-loop GetIdpToken cache hits on a broker alone and on a
//!   broker with Redis configured (a moka hit must never touch Redis, so the
//!   two should match), beside the bare tonic stack: gRPC Health/Check over
//!   the same broker's mTLS listener.
//! * Cold: 3 brokers on one Auth0 emulator, every user asked once on each
//!   broker: Auth0 reads with and without the shared tier, and the latency
//!   of reads that miss the replica's moka: the first (Auth0) and the others
//!   (Redis in a fleet, Auth0 alone).
//! * Stale: 3 brokers on one emulator that refresh `google-oauth2` at its
//!   IdP, users whose Google token is dead, each user's token asked on the
//!   three brokers at once: IdP refreshes with and without the shared tier
//!   (one per user in a fleet, up to one per user and broker alone), and the
//!   latency of those requests. The IdP's rate limit makes this phase slow
//!   for many users: see [`Args::stale_users`].
//!
//! `cargo bench --bench fleet -- [--seconds 5] [--concurrency 64]
//! [--users 1000] [--auth0-latency-ms 0] [--stale-users 100]`. Everything
//! runs in this process (brokers, emulator, load) except `redis-server`,
//! started on a free loopback port for each fleet and killed at its end:
//! absolute numbers depend on the machine, the comparisons less so. The
//! brokers are the test kit's (`tokenbroker::testkit`): its PKI, its broker
//! runner and its mTLS client. Audit is off in every run.

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{join_all, BoxFuture};
use futures::{stream, StreamExt};
use tokenbroker::audit::AuditSettings;
use tokenbroker::auth0::OutboundLimits;
use tokenbroker::cache::{CacheSettings, DEFAULT_USER_MAX_BYTES};
use tokenbroker::emulator::Emulator;
use tokenbroker::fleet::{FleetSettings, DEFAULT_LOCK_TTL};
use tokenbroker::pki::{write_file, IssuedCertificate};
use tokenbroker::policy::{Policy, PolicyStore};
use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::GetIdpTokenRequest;
use tokenbroker::server::{BrokerSettings, ResilienceSettings};
use tokenbroker::service::fresh::FreshnessSettings;
use tokenbroker::testkit::{mtls_channel, Credentials, StartedBroker, TestPki};
use tonic::transport::Channel;

use crate::common::baseline::Baseline;
use crate::common::{idp_connections, seed_stale_users, start_warm, stop_broker, STALE_CONNECTION};

/// What the brokers present to the emulator, and the emulator accepts.
const CREDENTIALS: Credentials<'static> = Credentials {
    client_id: "tokenbroker-fleet-bench",
    client_secret: "fleet-bench-secret",
};
/// The caller id of the load's client certificate.
const CALLER: &str = "spiffe://bench.example/ns/fleet/sa/client";
/// HTTP/2 connections the hit load is spread over.
const CHANNELS: usize = 4;
/// Brokers in the fleet of the cold and stale phases.
const FLEET_SIZE: usize = 3;
/// Users in flight at once in the cold and stale phases.
const USERS_AT_ONCE: usize = 16;
/// Bound on every Redis call: generous, so a loaded machine does not look
/// like a Redis outage.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on one RPC of the load: one past it counts as an error.
const RPC_BOUND: Duration = Duration::from_secs(30);
/// How long a broker with Redis may take to reach shared mode.
const SHARED_BOUND: Duration = Duration::from_secs(10);

/// The command line.
struct Args {
    seconds: u64,
    concurrency: usize,
    users: usize,
    auth0_latency: Duration,
    /// Users with a dead Google token in the stale phase. The IdP side is
    /// rate limited: each broker allows itself 10 refreshes a second (burst
    /// 20) at one IdP (`IdpSettings`' default, Auth0's shape), so the run of
    /// brokers alone, where each refreshes every user, takes about
    /// (U - 20) / 10 s, and the fleet's about a third of that. The default of
    /// 100 keeps the whole phase under ~30 s (about 8 s + 3 s), and a
    /// refresh's wait for a slot well inside its 10 s budget.
    stale_users: usize,
}

impl Args {
    /// Flags as given, unknown ones (cargo's `--bench`) ignored.
    fn parse() -> Self {
        let mut args = Self {
            seconds: 5,
            concurrency: 64,
            users: 1000,
            auth0_latency: Duration::ZERO,
            stale_users: 100,
        };
        let raw: Vec<String> = std::env::args().skip(1).collect();
        for pair in raw.windows(2) {
            let value = pair[1].parse::<u64>().ok();
            match (pair[0].as_str(), value) {
                ("--seconds", Some(value)) => args.seconds = value.max(1),
                ("--concurrency", Some(value)) => args.concurrency = value.max(1) as usize,
                ("--users", Some(value)) => args.users = value.max(1) as usize,
                ("--auth0-latency-ms", Some(value)) => {
                    args.auth0_latency = Duration::from_millis(value)
                }
                ("--stale-users", Some(value)) => args.stale_users = value.max(1) as usize,
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
        let redis = Self {
            url: format!("redis://127.0.0.1:{port}"),
            child,
        };
        let listens = (0..100).any(|_| {
            let open = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if !open {
                std::thread::sleep(Duration::from_millis(50));
            }
            open
        });
        assert!(listens, "redis-server did not listen on port {port} in 5 s");
        redis
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test kit's PKI, the client certificate every channel presents, and
/// the fleet's cache key file beside the PKI's files.
struct Pki {
    kit: TestPki,
    client: IssuedCertificate,
    cache_key: PathBuf,
}

fn pki() -> Pki {
    use base64::Engine;
    let kit = TestPki::generate("fleet bench CA").expect("bench PKI");
    let client = kit.issue_client(CALLER).expect("client certificate");
    let cache_key = kit.path("cache.key");
    let key = base64::engine::general_purpose::STANDARD.encode([0x5a; 32]);
    write_file(&cache_key, &format!("{key}\n"), true).expect("cache key file");
    Pki {
        kit,
        client,
        cache_key,
    }
}

/// Where a broker finds Auth0, Redis and its connections file.
#[derive(Clone, Copy)]
struct Upstream<'a> {
    /// Every broker of a fleet reads this one emulator (Auth0 and its IdP).
    emulator: &'a Emulator,
    /// `None`: a broker alone.
    redis: Option<&'a Redis>,
    /// `None`: every connection reads the profile, no refresh.
    connections: Option<&'a Path>,
}

/// A production broker (service, health, reflection) started by the test
/// kit, with Auth0 limits raised so the client-side limiter never shapes the
/// figures, a Management token in hand and, with Redis, in shared mode.
async fn start_broker(pki: &Pki, upstream: Upstream<'_>) -> StartedBroker {
    let open = OutboundLimits {
        rate_per_second: NonZeroU32::new(1_000_000).unwrap_or(NonZeroU32::MAX),
        burst: NonZeroU32::new(1_000_000).unwrap_or(NonZeroU32::MAX),
        max_in_flight: 256,
        ..OutboundLimits::default()
    };
    let emulator = upstream.emulator;
    let settings = BrokerSettings {
        auth0: CREDENTIALS.auth0_settings(emulator.base_url(), emulator.audience()),
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
        freshness: FreshnessSettings {
            connections: upstream.connections.map(Path::to_path_buf),
            ..FreshnessSettings::default()
        },
        fleet: upstream.redis.map(|redis| FleetSettings {
            url: redis.url.clone().into(),
            ca_file: None,
            key_file: pki.cache_key.clone(),
            timeout: REDIS_TIMEOUT,
            lock_ttl: DEFAULT_LOCK_TTL,
        }),
    };
    let policy = PolicyStore::fixed(Policy::allow_any());
    let started = start_warm(&pki.kit, settings, policy).await;
    if upstream.redis.is_some() {
        let shared_by = Instant::now() + SHARED_BOUND;
        while !started.store.is_shared() && Instant::now() < shared_by {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            started.store.is_shared(),
            "broker not in shared mode after {SHARED_BOUND:?}"
        );
    }
    started
}

/// An mTLS channel to `addr` presenting the load's certificate.
async fn connect(addr: SocketAddr, pki: &Pki) -> Channel {
    mtls_channel(addr, &pki.kit.ca.cert_pem, Some(&pki.client))
        .await
        .expect("mTLS connection")
}

/// [`FLEET_SIZE`] brokers on one upstream, and a client of each.
struct Fleet {
    brokers: Vec<StartedBroker>,
    clients: Vec<TokenBrokerClient<Channel>>,
}

impl Fleet {
    async fn start(pki: &Pki, upstream: Upstream<'_>) -> Self {
        let (mut brokers, mut clients) = (Vec::new(), Vec::new());
        for _ in 0..FLEET_SIZE {
            let broker = start_broker(pki, upstream).await;
            clients.push(TokenBrokerClient::new(connect(broker.addr, pki).await));
            brokers.push(broker);
        }
        Self { brokers, clients }
    }

    async fn stop(self) {
        drop(self.clients);
        for broker in self.brokers {
            stop_broker(broker).await;
        }
    }
}

/// A `GetIdpToken` request for `user_id`'s `provider` token.
fn request(user_id: String, provider: &str) -> GetIdpTokenRequest {
    GetIdpTokenRequest {
        user_id,
        provider: provider.to_owned(),
        ..Default::default()
    }
}

/// The GitHub user `github|{user}`'s request.
fn github_request(user: usize) -> GetIdpTokenRequest {
    request(format!("github|{user}"), "github")
}

/// `request` on `client`: its latency if answered OK within [`RPC_BOUND`].
async fn timed_get(
    mut client: TokenBrokerClient<Channel>,
    request: GetIdpTokenRequest,
) -> Option<Duration> {
    let sent = Instant::now();
    let answer = tokio::time::timeout(RPC_BOUND, client.get_idp_token(request)).await;
    matches!(answer, Ok(Ok(_))).then(|| sent.elapsed())
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

/// One request on a channel: `true` when answered OK within [`RPC_BOUND`].
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
        let client = TokenBrokerClient::new(channel);
        Box::pin(async move { timed_get(client, github_request(user)).await.is_some() })
    })
}

/// An emulator holding `users` GitHub users (`github|0` ...).
async fn emulator(users: usize, latency: Duration) -> Emulator {
    let emulator = CREDENTIALS.start_emulator().await.expect("emulator starts");
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
    baseline_hits(pki, &emulator, args).await;
    let rows: [(&str, Option<&Redis>, Call); 2] = [
        ("GetIdpToken hit, broker alone", None, get_token()),
        (
            "GetIdpToken hit, broker with Redis configured",
            Some(redis),
            get_token(),
        ),
    ];
    for (name, redis, call) in rows {
        let upstream = Upstream {
            emulator: &emulator,
            redis,
            connections: None,
        };
        let broker = start_broker(pki, upstream).await;
        let mut channels = Vec::new();
        for _ in 0..CHANNELS {
            channels.push(connect(broker.addr, pki).await);
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
        drop(channels);
        stop_broker(broker).await;
    }
}

/// The bare tonic baseline of the load bench (`common::baseline`): the
/// generated service answering, with the broker's certificates, a clone of
/// what the broker answers for user 0, loaded like the broker.
async fn baseline_hits(pki: &Pki, emulator: &Emulator, args: &Args) {
    let upstream = Upstream {
        emulator,
        redis: None,
        connections: None,
    };
    let broker = start_broker(pki, upstream).await;
    let mut client = TokenBrokerClient::new(connect(broker.addr, pki).await);
    let answer = client
        .get_idp_token(github_request(0))
        .await
        .expect("the broker answers")
        .into_inner();
    let baseline = Baseline::start(broker.tls.clone(), answer).await;
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        channels.push(connect(baseline.addr, pki).await);
    }
    let (rate, latencies, errors) = drive(&channels, get_token(), args).await;
    println!(
        "{:<52} {rate:>9.0} RPC/s  {}  errors {errors}",
        "tonic baseline: GetIdpToken, fixed answer, same mTLS",
        latencies.summary()
    );
    drop(channels);
    baseline.stop().await;
    stop_broker(broker).await;
}

/// How a fleet phase names its run.
fn mode(redis: Option<&Redis>) -> &'static str {
    if redis.is_some() {
        "with the shared tier"
    } else {
        "alone (no Redis)"
    }
}

/// Cold: 3 brokers, each user asked on all three in turn.
async fn cold(pki: &Pki, redis: Option<&Redis>, args: &Args) {
    let emulator = emulator(args.users, args.auth0_latency).await;
    let upstream = Upstream {
        emulator: &emulator,
        redis,
        connections: None,
    };
    let fleet = Fleet::start(pki, upstream).await;
    emulator.reset_counters();
    let workers = USERS_AT_ONCE.min(args.users);
    let tasks: Vec<_> = (0..workers)
        .map(|worker| {
            let clients = fleet.clients.clone();
            let (users, stride) = (args.users, workers);
            tokio::spawn(async move {
                let (mut first, mut others, mut errors) = (Vec::new(), Vec::new(), 0u64);
                for user in (worker..users).step_by(stride) {
                    for turn in 0..FLEET_SIZE {
                        let client = clients[(user + turn) % FLEET_SIZE].clone();
                        match (timed_get(client, github_request(user)).await, turn) {
                            (Some(latency), 0) => first.push(latency),
                            (Some(latency), _) => others.push(latency),
                            (None, _) => errors += 1,
                        }
                    }
                }
                (first, others, errors)
            })
        })
        .collect();
    let (mut first, mut others, mut errors) = (Vec::new(), Vec::new(), 0);
    for task in tasks {
        let (task_first, task_others, task_errors) = task.await.expect("cold task");
        first.extend(task_first);
        others.extend(task_others);
        errors += task_errors;
    }
    println!(
        "-- 3 brokers {}: {} Auth0 users reads for {} users, errors {errors}",
        mode(redis),
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
    fleet.stop().await;
}

/// Stale: 3 brokers refreshing Google at one emulator's IdP; each stale
/// user's token asked on the three at once, [`USERS_AT_ONCE`] users at a time.
async fn stale(pki: &Pki, redis: Option<&Redis>, args: &Args) {
    let emulator = CREDENTIALS.start_emulator().await.expect("emulator starts");
    let ids = seed_stale_users(&emulator, args.stale_users);
    let connections = idp_connections(&pki.kit, &emulator);
    let upstream = Upstream {
        emulator: &emulator,
        redis,
        connections: Some(&connections),
    };
    let fleet = Fleet::start(pki, upstream).await;
    emulator.reset_counters();
    let began = Instant::now();
    let answers: Vec<Vec<Option<Duration>>> = stream::iter(ids)
        .map(|user_id| {
            let on_each = fleet.clients.iter().map(|client| {
                timed_get(client.clone(), request(user_id.clone(), STALE_CONNECTION))
            });
            join_all(on_each)
        })
        .buffer_unordered(USERS_AT_ONCE)
        .collect()
        .await;
    let took = began.elapsed();
    let answers = answers.into_iter().flatten();
    let (answered, failed): (Vec<_>, Vec<_>) = answers.partition(Option::is_some);
    let latencies = Latencies::new(answered.into_iter().flatten().collect());
    println!(
        "-- 3 brokers {}: {} IdP refreshes for {} users in {took:.1?}, errors {}",
        mode(redis),
        emulator.calls().idp_token,
        args.stale_users,
        failed.len()
    );
    println!(
        "   a user's token on all 3 brokers at once {}",
        latencies.summary()
    );
    fleet.stop().await;
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let pki = pki();
    let redis = Redis::start();
    hits(&pki, &redis, &args).await;
    drop(redis);
    println!(
        "== cold path: 3 brokers x {} users, Auth0 latency {:?}, {USERS_AT_ONCE} users at a time",
        args.users, args.auth0_latency
    );
    cold(&pki, None, &args).await;
    cold(&pki, Some(&Redis::start()), &args).await;
    println!(
        "== stale tokens in a fleet: 3 brokers x {} Google users refreshed at the IdP, \
         {USERS_AT_ONCE} users ({} RPCs) at a time",
        args.stale_users,
        USERS_AT_ONCE * FLEET_SIZE
    );
    stale(&pki, None, &args).await;
    stale(&pki, Some(&Redis::start()), &args).await;
}
