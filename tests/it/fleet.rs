//! A fleet of brokers over a real Redis (`redis-server`, started here on a
//! free loopback port and killed on drop): 2–3 brokers sharing one Auth0
//! emulator. Counting assertions start from a fleet already in shared mode
//! (see [`Fleet::until_shared`]) and reset counters.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokenbroker::emulator::keys::CLIENT_ASSERTION_KEY_1;
use tokenbroker::emulator::{seed, EmulatorConfig};
use tokenbroker::fleet::{FleetSettings, DEFAULT_LOCK_TTL};
use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::{GetIdpTokenRequest, IdpToken, TokenSource};
use tokenbroker::server::READINESS_SERVICE;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::ServingStatus;
use tonic_types::StatusExt;

use crate::rate::{assert_within_limit, rate_limited, sample_while};
use crate::support::{
    bounded, bypass_request, eventually, get_on, get_request, health_status, Options, RedisServer,
    TestBroker, TestConnections, TestIdp, CLIENT_ID, CLIENT_SECRET,
};

/// Bound on one Redis call in these brokers: generous, so a loaded CI
/// machine does not look like a Redis outage.
const TEST_REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// A cache key file (base64 of 32 bytes of `byte`) in `dir`.
fn cache_key_file(dir: &Path, byte: u8) -> std::path::PathBuf {
    use base64::Engine;
    let path = dir.join(format!("cache-{byte}.key"));
    let key = base64::engine::general_purpose::STANDARD.encode([byte; 32]);
    std::fs::write(&path, format!("{key}\n")).expect("write key");
    path
}

/// Brokers sharing one Redis and the first broker's emulator.
struct Fleet {
    redis: RedisServer,
    brokers: Vec<TestBroker>,
    dir: tempfile::TempDir,
}

impl Fleet {
    /// `size` brokers with `options()` (fleet settings and the shared
    /// emulator filled in), in shared mode.
    async fn start(size: usize, options: impl Fn() -> Options) -> Self {
        let redis = RedisServer::start().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let mut fleet = Self {
            redis,
            brokers: Vec::new(),
            dir,
        };
        for _ in 0..size {
            fleet.add(1, &options).await;
        }
        assert!(fleet.until_shared().await, "the fleet shares its cache");
        fleet.emulator().reset_counters();
        fleet
    }

    /// Adds a broker whose cache key is `key_byte` repeated.
    async fn add(&mut self, key_byte: u8, options: &impl Fn() -> Options) {
        let settings = FleetSettings {
            url: self.redis.url().into(),
            ca_file: None,
            key_file: cache_key_file(self.dir.path(), key_byte),
            timeout: TEST_REDIS_TIMEOUT,
            lock_ttl: DEFAULT_LOCK_TTL,
        };
        let mut options = Options {
            fleet: Some(settings),
            ..options()
        };
        if let Some(first) = self.brokers.first() {
            options.auth0_base_url = Some(first.emulator.base_url());
            options.idp = Some(TestIdp::of(&first.emulator));
            options.emulator = EmulatorConfig {
                audience: Some(first.emulator.audience()),
                ..EmulatorConfig::new(CLIENT_ID, CLIENT_SECRET)
            };
        }
        self.brokers.push(TestBroker::start_with(options).await);
    }

    /// Creates GitHub user `index` with token `old`, has every broker hold
    /// it, then changes the token in Auth0 to `new`. Returns the user id.
    async fn held_then_changed(&self, index: usize, old: &str, new: &str) -> String {
        let (user_id, user) = github_user(index, old);
        self.emulator().upsert_user(user);
        for broker in &self.brokers {
            let held = broker.get(&user_id, "github").await.expect("read");
            assert_eq!(held.access_token, old);
        }
        self.emulator().upsert_user(github_user(index, new).1);
        user_id
    }

    /// A client of each broker, in order.
    async fn clients(&self) -> Vec<TokenBrokerClient<Channel>> {
        let mut clients = Vec::new();
        for broker in &self.brokers {
            clients.push(broker.client().await);
        }
        clients
    }

    /// The Auth0 tenant every broker reads.
    fn emulator(&self) -> &tokenbroker::emulator::Emulator {
        &self.brokers[0].emulator
    }

    /// Whether (within 15 s) a user read through the first broker is then
    /// served by every other without another Auth0 read: each probe is a new
    /// user, so no moka entry can answer for Redis.
    async fn until_shared(&self) -> bool {
        let mut probe = 0;
        eventually(Duration::from_secs(15), async || {
            probe += 1;
            let (user_id, user) = synthetic_user(800_000 + probe);
            self.emulator().upsert_user(user);
            if self.brokers[0].get(&user_id, "github").await.is_err() {
                return false;
            }
            for broker in &self.brokers[1..] {
                if broker.get(&user_id, "github").await.is_err() {
                    return false;
                }
            }
            self.emulator().user_calls_for(&user_id) == 1
        })
        .await
    }
}

/// A `GetIdpToken` for `user_id`'s GitHub token on `client`, as a task.
fn read_on(
    client: &TokenBrokerClient<Channel>,
    user_id: &str,
) -> tokio::task::JoinHandle<Result<IdpToken, tonic::Status>> {
    let mut client = client.clone();
    let request = get_request(user_id, "github");
    tokio::spawn(async move { get_on(&mut client, request).await })
}

fn synthetic_user(index: usize) -> (String, Value) {
    github_user(index, &format!("gho_fleet_{index}"))
}

fn github_user(index: usize, token: &str) -> (String, Value) {
    let user_id = format!("github|{index}");
    let user = json!({
        "user_id": user_id,
        "identities": [{
            "provider": "github", "connection": "github", "user_id": index,
            "isSocial": true, "access_token": token
        }]
    });
    (user_id, user)
}

#[tokio::test]
async fn a_read_through_one_broker_is_served_by_another_without_auth0() {
    let fleet = Fleet::start(2, Options::default).await;
    let [a, b] = &fleet.brokers[..] else {
        unreachable!()
    };
    let first = a.get(seed::GITHUB_USER, "github").await.expect("A reads");
    assert!(!first.from_cache);
    assert_eq!(fleet.emulator().calls().users, 1);
    let second = b.get(seed::GITHUB_USER, "github").await.expect("B serves");
    assert_eq!(second.access_token, seed::GITHUB_ACCESS_TOKEN);
    assert!(second.from_cache, "B answered from the shared tier");
    assert_eq!(second.fetched_at, first.fetched_at, "fetched_at is kept");
    assert_eq!(fleet.emulator().calls().users, 1, "no Auth0 read for B");
}

#[tokio::test]
async fn a_missing_user_is_remembered_for_the_fleet() {
    let fleet = Fleet::start(2, Options::default).await;
    let missing = "github|404404404";
    for broker in &fleet.brokers {
        let status = broker.get(missing, "github").await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    assert_eq!(fleet.emulator().user_calls_for(missing), 1);
}

#[tokio::test]
async fn concurrent_cold_reads_of_one_user_on_three_brokers_make_one_auth0_read() {
    let fleet = Fleet::start(3, Options::default).await;
    let (user_id, user) = synthetic_user(1);
    fleet.emulator().upsert_user(user);
    fleet.emulator().set_latency(Duration::from_millis(300));
    let clients = fleet.clients().await;
    let reads = (0..30).map(|index| read_on(&clients[index % clients.len()], &user_id));
    for read in futures::future::join_all(reads).await {
        let token = read.expect("task").expect("answered");
        assert_eq!(token.access_token, "gho_fleet_1");
    }
    assert_eq!(
        fleet.emulator().user_calls_for(&user_id),
        1,
        "one Auth0 read for the fleet"
    );
}

#[tokio::test]
async fn the_fleet_together_never_exceeds_the_auth0_rate_limit() {
    const USERS: usize = 60;
    const RATE: u32 = 10;
    const BURST: u32 = 10;
    let fleet = Fleet::start(3, || rate_limited(RATE, BURST)).await;
    let users: Vec<String> = (0..USERS)
        .map(|index| {
            let (user_id, user) = synthetic_user(10_000 + index);
            fleet.emulator().upsert_user(user);
            user_id
        })
        .collect();
    // The start used budget: let the fleet's bucket refill before measuring.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let clients = fleet.clients().await;
    let reads = users
        .iter()
        .enumerate()
        .map(|(index, user_id)| read_on(&clients[index % clients.len()], user_id));
    let (results, samples) = sample_while(
        || fleet.emulator().calls().users,
        futures::future::join_all(reads),
    )
    .await;
    for result in results {
        result.expect("task").expect("every read is answered");
    }
    assert_eq!(fleet.emulator().calls().users, USERS as u64);
    assert_within_limit(&samples, RATE, BURST);
}

#[tokio::test]
async fn invalidate_user_on_one_broker_stops_another_serving_the_old_token_within_a_second() {
    const ROUNDS: usize = 20;
    let fleet = Fleet::start(2, Options::default).await;
    let [a, b] = &fleet.brokers[..] else {
        unreachable!()
    };
    let user_id = fleet
        .held_then_changed(2, "gho_round_0", "gho_round_1")
        .await;
    let mut client = b.client().await;
    let mut slowest = Duration::ZERO;
    // Every round, not only the median, within the second: the worst of 20 bounds the p95.
    for round in 1..=ROUNDS {
        let token = format!("gho_round_{round}");
        fleet.emulator().upsert_user(github_user(2, &token).1);
        a.invalidate(&user_id).await.expect("InvalidateUser on A");
        let invalidated = Instant::now();
        let mut seen = String::new();
        let updated = eventually(Duration::from_secs(1), async || {
            seen = get_on(&mut client, get_request(&user_id, "github"))
                .await
                .expect("B answers")
                .access_token;
            seen == token
        })
        .await;
        assert!(
            updated,
            "round {round}: B still served {seen} {:?} after the invalidation",
            invalidated.elapsed()
        );
        slowest = slowest.max(invalidated.elapsed());
    }
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
}

#[tokio::test]
async fn bypass_cache_on_one_broker_brings_the_new_token_to_the_others() {
    let fleet = Fleet::start(2, Options::default).await;
    let [a, b] = &fleet.brokers[..] else {
        unreachable!()
    };
    let user_id = fleet
        .held_then_changed(3, "gho_before_bypass", "gho_after_bypass")
        .await;
    fleet.emulator().reset_counters();

    let fresh = a
        .get_with(bypass_request(&user_id, "github"))
        .await
        .expect("bypass");
    assert_eq!(fresh.access_token, "gho_after_bypass");
    let mut client = b.client().await;
    let updated = eventually(Duration::from_secs(1), async || {
        get_on(&mut client, get_request(&user_id, "github"))
            .await
            .is_ok_and(|token| token.access_token == "gho_after_bypass")
    })
    .await;
    assert!(updated, "B serves the bypass read's token");
    assert_eq!(
        fleet.emulator().user_calls_for(&user_id),
        1,
        "B got it from the shared tier"
    );
}

#[tokio::test]
async fn nothing_in_redis_holds_a_user_id_or_a_token_in_clear() {
    let fleet = Fleet::start(2, refreshing_at_the_idp).await;
    fleet.emulator().set_idp_rotation(true);
    let [a, b] = &fleet.brokers[..] else {
        unreachable!()
    };
    let published = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let client = redis::Client::open(fleet.redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.psubscribe("*").await.expect("psubscribe");
    let collector = {
        let published = published.clone();
        tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                if let Ok(mut published) = published.lock() {
                    published.push(message.get_payload_bytes().to_vec());
                }
            }
        })
    };

    for user_id in seed::user_ids() {
        let _ = a.list(user_id).await;
        let _ = b.list(user_id).await;
    }
    let _ = a
        .get_with(bypass_request(seed::TWITTER_USER, "twitter"))
        .await;
    b.invalidate(seed::LINKED_USER).await.expect("invalidate");
    b.invalidate(seed::ODD_ID_USER).await.expect("invalidate");
    let _ = a.get("github|no-such-user", "github").await;
    let refreshed = a
        .get_with(google_request(seed::STALE_GOOGLE_USER, None))
        .await
        .expect("refreshed at the IdP");
    let keys = fleet.redis.keys().await;
    assert!(
        keys.iter().any(|key| key.starts_with("tokenbroker:k:")),
        "the refreshed token was shared: {keys:?}"
    );
    assert!(
        keys.iter().any(|key| key.starts_with("tokenbroker:r:")),
        "the rotated refresh token was shared: {keys:?}"
    );
    assert!(
        fleet.redis.user_keys().await.len() >= 4,
        "the users were shared: {keys:?}"
    );
    let on_channel = eventually(Duration::from_secs(2), async || {
        published.lock().map(|p| p.len() >= 3).unwrap_or(false)
    })
    .await;
    assert!(on_channel, "the invalidations were published");
    collector.abort();

    let mut forbidden: Vec<&str> = seed::planted_secrets();
    forbidden.extend(seed::user_ids());
    forbidden.extend([
        "github|no-such-user",
        "gho_",
        "twitter|",
        "auth0|",
        "google",
    ]);
    forbidden.extend(["ya29.", "1//", refreshed.access_token.as_str()]);
    let mut stored = Vec::new();
    for key in &keys {
        stored.push((key.clone(), key.as_bytes().to_vec()));
        for value in fleet.redis.stored_bytes(key).await {
            stored.push((key.clone(), value));
        }
    }
    if let Ok(published) = published.lock() {
        for message in published.iter() {
            stored.push(("(published)".to_owned(), message.clone()));
        }
    }
    for (key, bytes) in &stored {
        for needle in &forbidden {
            assert!(
                !bytes
                    .windows(needle.len())
                    .any(|window| window == needle.as_bytes()),
                "{needle:?} readable in Redis under {key}"
            );
        }
    }
}

#[tokio::test]
async fn with_redis_down_every_rpc_is_answered_and_the_fleet_shares_again_once_it_is_back() {
    let mut fleet = Fleet::start(2, Options::default).await;
    fleet.brokers[0]
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("A reads");
    fleet.redis.kill().await;

    for index in 0..6 {
        let (user_id, user) = synthetic_user(20_000 + index);
        fleet.emulator().upsert_user(user);
        for broker in &fleet.brokers {
            let started = Instant::now();
            broker
                .get(&user_id, "github")
                .await
                .expect("answered without Redis");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{:?}",
                started.elapsed()
            );
        }
    }
    for broker in &fleet.brokers {
        let token = broker
            .get(seed::GITHUB_USER, "github")
            .await
            .expect("answered from moka or Auth0");
        assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
        let channel = broker
            .channel_with(Some(&broker.client_cert), &broker.ca.cert_pem)
            .await
            .expect("channel");
        let status = health_status(&mut HealthClient::new(channel), READINESS_SERVICE)
            .await
            .expect("health");
        assert_eq!(status, ServingStatus::Serving as i32, "still SERVING");
    }

    fleet.redis = RedisServer::start_on(fleet.redis.port).await;
    assert!(
        fleet.until_shared().await,
        "back to shared mode: a read through A is served by B"
    );
}

#[tokio::test]
async fn readers_wait_for_a_dead_holders_lock_then_one_reads_auth0() {
    let fleet = Fleet::start(3, Options::default).await;
    let (user_id, user) = synthetic_user(4);
    fleet.emulator().upsert_user(user);
    let before = fleet.redis.user_keys().await;
    fleet.brokers[0]
        .get(&user_id, "github")
        .await
        .expect("A reads");
    let value_key = new_key(&before, fleet.redis.user_keys().await);
    // A replica took the user's lock and died: its lock lives on until it expires.
    fleet.redis.del(&value_key).await;
    let lock_key = value_key.replacen("tokenbroker:u:", "tokenbroker:l:", 1);
    let lock_life = Duration::from_millis(1500);
    fleet
        .redis
        .set(&lock_key, b"a-dead-replicas-token", Some(lock_life))
        .await;
    fleet.emulator().reset_counters();

    let started = Instant::now();
    let clients = fleet.clients().await;
    let reads: Vec<_> = clients[1..]
        .iter()
        .map(|client| read_on(client, &user_id))
        .collect();
    for read in reads {
        let token = bounded("a read behind the lock", read)
            .await
            .expect("task")
            .expect("answered once the lock expired");
        assert_eq!(token.access_token, "gho_fleet_4");
    }
    assert!(
        started.elapsed() >= lock_life - Duration::from_millis(200),
        "they waited for the lock: {:?}",
        started.elapsed()
    );
    assert_eq!(
        fleet.emulator().user_calls_for(&user_id),
        1,
        "then one of them read Auth0"
    );
}

#[tokio::test]
async fn a_value_that_does_not_open_is_a_miss_answered_from_auth0() {
    let mut fleet = Fleet::start(2, Options::default).await;
    fleet.add(2, &Options::default).await;
    let [a, b, other_key] = &fleet.brokers[..] else {
        unreachable!()
    };
    let (user_id, user) = synthetic_user(5);
    fleet.emulator().upsert_user(user);
    let (neighbour_id, neighbour) = synthetic_user(6);
    fleet.emulator().upsert_user(neighbour);

    let before = fleet.redis.user_keys().await;
    a.get(&user_id, "github").await.expect("A reads");
    let slot = new_key(&before, fleet.redis.user_keys().await);
    let before = fleet.redis.user_keys().await;
    other_key
        .get(&user_id, "github")
        .await
        .expect("a broker with another key reads");
    let foreign_slot = new_key(&before, fleet.redis.user_keys().await);
    let before = fleet.redis.user_keys().await;
    a.get(&neighbour_id, "github").await.expect("A reads");
    let neighbour_slot = new_key(&before, fleet.redis.user_keys().await);

    let sealed_under_another_key = fleet.redis.get(&foreign_slot).await.expect("value");
    fleet
        .redis
        .set(
            &slot,
            &sealed_under_another_key,
            Some(Duration::from_secs(60)),
        )
        .await;
    fleet.emulator().reset_counters();
    let token = b.get(&user_id, "github").await.expect("B answers");
    assert_eq!(token.access_token, "gho_fleet_5");
    assert!(!token.from_cache, "read from Auth0");
    assert_eq!(fleet.emulator().user_calls_for(&user_id), 1);

    // A value moved to another user's key is bound to its own key: no use either.
    let neighbours_value = fleet.redis.get(&neighbour_slot).await.expect("value");
    b.invalidate(&user_id).await.expect("invalidate");
    fleet
        .redis
        .set(&slot, &neighbours_value, Some(Duration::from_secs(60)))
        .await;
    fleet.emulator().reset_counters();
    let token = b.get(&user_id, "github").await.expect("B answers");
    assert_eq!(token.access_token, "gho_fleet_5", "never the neighbour's");
    assert_eq!(fleet.emulator().user_calls_for(&user_id), 1);
}

/// The one key in `after` that is not in `before`.
fn new_key(before: &[String], after: Vec<String>) -> String {
    let mut new: Vec<String> = after
        .into_iter()
        .filter(|key| !before.contains(key))
        .collect();
    assert_eq!(new.len(), 1, "one new user key: {new:?}");
    new.remove(0)
}

#[tokio::test]
async fn a_budget_key_written_by_something_else_cannot_stop_auth0_reads() {
    let fleet = Fleet::start(2, Options::default).await;
    let an_hour_ahead_us = (std::time::SystemTime::now() + Duration::from_secs(3600))
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_micros();
    fleet
        .redis
        .set(
            "tokenbroker:auth0-budget",
            an_hour_ahead_us.to_string().as_bytes(),
            None,
        )
        .await;
    let (user_id, user) = synthetic_user(7);
    fleet.emulator().upsert_user(user);
    let started = Instant::now();
    let token = fleet.brokers[1]
        .get(&user_id, "github")
        .await
        .expect("read with the broker's own limiter");
    assert_eq!(token.access_token, "gho_fleet_7");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

const GOOGLE: &str = "google-oauth2";

/// Brokers whose connections file refreshes Google tokens at the (first
/// broker's) emulated IdP.
fn refreshing_at_the_idp() -> Options {
    Options {
        connections: Some(TestConnections {
            refreshed_at_idp: vec![GOOGLE],
            ..TestConnections::default()
        }),
        ..Options::default()
    }
}

/// `GetIdpToken` for `user`'s Google token, needing it valid `min_valid_for`.
fn google_request(user: &str, min_valid_for: Option<Duration>) -> GetIdpTokenRequest {
    GetIdpTokenRequest {
        min_valid_for: min_valid_for.and_then(|d| prost_types::Duration::try_from(d).ok()),
        ..get_request(user, GOOGLE)
    }
}

/// Runs `request` `count` times at once, spread over the fleet's brokers,
/// and asserts every answer is the same token, from `source`.
async fn one_token_for_all(
    fleet: &Fleet,
    count: usize,
    request: GetIdpTokenRequest,
    source: TokenSource,
) -> IdpToken {
    let answers = at_once_over(fleet, count, request).await;
    let tokens: Vec<IdpToken> = answers
        .into_iter()
        .map(|answer| answer.expect("a token"))
        .collect();
    for token in &tokens {
        assert_eq!(token.source(), source, "{token:?}");
        assert_eq!(
            token.access_token, tokens[0].access_token,
            "one fetch shared"
        );
    }
    tokens.into_iter().next().expect("at least one answer")
}

/// Runs `request` `count` times at once, spread over the fleet's brokers.
async fn at_once_over(
    fleet: &Fleet,
    count: usize,
    request: GetIdpTokenRequest,
) -> Vec<Result<IdpToken, tonic::Status>> {
    let clients = fleet.clients().await;
    let tasks = (0..count).map(|index| {
        let mut client = clients[index % clients.len()].clone();
        let request = request.clone();
        tokio::spawn(async move { get_on(&mut client, request).await })
    });
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|joined| joined.expect("task"))
        .collect()
}

#[tokio::test]
async fn a_stale_token_needed_on_three_brokers_at_once_is_refreshed_once_for_the_fleet() {
    let fleet = Fleet::start(3, refreshing_at_the_idp).await;
    fleet.emulator().set_latency(Duration::from_millis(200));
    let request = google_request(seed::STALE_GOOGLE_USER, None);
    let token = one_token_for_all(&fleet, 30, request, TokenSource::IdpRefresh).await;
    assert_ne!(token.access_token, seed::STALE_GOOGLE_ACCESS_TOKEN);
    assert_eq!(
        fleet.emulator().calls().idp_token,
        1,
        "one IdP refresh for the fleet"
    );
    assert_eq!(fleet.emulator().user_calls_for(seed::STALE_GOOGLE_USER), 1);
}

#[tokio::test]
async fn a_refresh_token_rotated_on_one_broker_is_the_one_the_next_broker_sends_until_invalidated()
{
    let fleet = Fleet::start(2, refreshing_at_the_idp).await;
    let [a, b] = &fleet.brokers[..] else {
        unreachable!()
    };
    fleet.emulator().set_idp_rotation(true);
    // Tokens shorter than the callers need: every request refreshes once.
    fleet.emulator().set_idp_expires_in(60);
    let need = || google_request(seed::STALE_GOOGLE_USER, Some(Duration::from_secs(120)));
    let first = a.get_with(need()).await.expect("A refreshes");
    let second = b
        .get_with(need())
        .await
        .expect("B refreshes with the token A's refresh rotated into: Auth0's is retired");
    let third = a
        .get_with(need())
        .await
        .expect("A refreshes with the token B's refresh rotated into, not its own older one");
    assert_ne!(first.access_token, second.access_token);
    assert_ne!(second.access_token, third.access_token);
    assert_eq!(fleet.emulator().calls().idp_token, 3);

    // InvalidateUser forgets the chain fleet-wide: the next refresh sends
    // Auth0's refresh token, which the IdP retired at the first rotation.
    b.invalidate(seed::STALE_GOOGLE_USER)
        .await
        .expect("invalidate");
    let keys = fleet.redis.keys().await;
    assert!(
        !keys.iter().any(|key| key.starts_with("tokenbroker:r:")),
        "a rotation outlived the invalidation: {keys:?}"
    );
    let after = a
        .get_with(need())
        .await
        .expect_err("the chain is forgotten");
    assert_eq!(after.code(), Code::FailedPrecondition, "{after:?}");
    let info = after.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "USER_MUST_RECONNECT");
}

#[tokio::test]
async fn invalidate_user_on_one_broker_stops_another_serving_its_refreshed_token() {
    let fleet = Fleet::start(2, refreshing_at_the_idp).await;
    let [a, b] = &fleet.brokers[..] else {
        unreachable!()
    };
    let need = || google_request(seed::STALE_GOOGLE_USER, None);
    let refreshed = a.get_with(need()).await.expect("A refreshes");
    let held = b.get_with(need()).await.expect("B serves A's refresh");
    assert_eq!(held.access_token, refreshed.access_token);
    assert_eq!(fleet.emulator().calls().idp_token, 1, "B did not refresh");

    a.invalidate(seed::STALE_GOOGLE_USER)
        .await
        .expect("invalidate");
    let invalidated_at = Instant::now();
    let replaced = eventually(Duration::from_secs(1), async || {
        b.get_with(need())
            .await
            .is_ok_and(|token| token.access_token != refreshed.access_token)
    })
    .await;
    assert!(
        replaced,
        "B still served the invalidated token {:?} after the invalidation",
        invalidated_at.elapsed()
    );
}

#[tokio::test]
async fn a_token_vault_exchange_on_one_broker_serves_the_fleet() {
    let fleet = Fleet::start(3, || Options {
        assertion_key: Some(CLIENT_ASSERTION_KEY_1),
        connections: Some(TestConnections {
            token_vault: vec![seed::TOKEN_VAULT_CONNECTION],
            ..TestConnections::default()
        }),
        ..Options::default()
    })
    .await;
    fleet.emulator().set_latency(Duration::from_millis(200));
    let request = get_request(seed::VAULT_USER, "google-oauth2");
    one_token_for_all(&fleet, 30, request, TokenSource::TokenVault).await;
    assert_eq!(
        fleet.emulator().calls().token_exchange,
        1,
        "one Token Vault exchange for the fleet"
    );
}
