//! The cold path: K uncached users one request at a time, the Auth0 calls
//! that made, and the same Auth0 reads made straight to the emulator.

use std::time::Instant;

use tokenbroker::emulator::Emulator;
use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tonic::transport::Channel;

use crate::broker::CREDENTIALS;
use crate::stats::Latencies;
use crate::users::get_request;

/// What the cold path measured.
pub struct ColdPath {
    /// Distinct users asked for.
    pub users: usize,
    /// The broker's latency on a miss (RPC and Auth0 read).
    pub broker: Latencies,
    /// The emulator's latency for the same reads, without the broker.
    pub direct: Latencies,
    /// The broker's latency for the same users once cached.
    pub hit: Latencies,
    /// `/api/v2/users` calls the misses made.
    pub user_calls: u64,
    /// `/oauth/token` calls the misses made.
    pub token_calls: u64,
    /// Misses that failed.
    pub errors: u64,
    /// How long the misses took, one after the other.
    pub seconds: f64,
}

/// Sends `request` and parses its answer as JSON, as the broker does.
async fn json_answer(request: reqwest::RequestBuilder) -> serde_json::Value {
    let body = request
        .send()
        .await
        .expect("emulator answers")
        .bytes()
        .await
        .expect("emulator's body");
    serde_json::from_slice(&body).expect("emulator's JSON")
}

/// What the broker asks Auth0 for one user, done directly with reqwest
/// (HTTP/1.1 keep-alive, like the broker's client), one at a time.
async fn emulator_direct(emulator: &Emulator, ids: &[String]) -> Latencies {
    let http = reqwest::Client::new();
    let form = serde_urlencoded::to_string([
        ("grant_type", "client_credentials"),
        ("client_id", CREDENTIALS.client_id),
        ("client_secret", CREDENTIALS.client_secret),
        ("audience", emulator.audience().as_str()),
    ])
    .expect("form");
    let grant = json_answer(
        http.post(format!("{}/oauth/token", emulator.base_url()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form),
    )
    .await;
    let bearer = format!("Bearer {}", grant["access_token"].as_str().expect("token"));
    let mut nanos = Vec::with_capacity(ids.len());
    for id in ids {
        let url = format!(
            "{}/api/v2/users/{}?fields=user_id%2Cidentities&include_fields=true",
            emulator.base_url(),
            percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC)
        );
        let sent = Instant::now();
        json_answer(http.get(url).header("authorization", &bearer)).await;
        nanos.push(sent.elapsed().as_nanos() as u64);
    }
    Latencies::new(nanos)
}

/// One RPC at a time for each id; returns latencies and the number of errors.
async fn sequential_rpcs(channel: &Channel, ids: &[String]) -> (Latencies, u64) {
    let mut client = TokenBrokerClient::new(channel.clone());
    let mut nanos = Vec::with_capacity(ids.len());
    let mut errors = 0;
    for id in ids {
        let sent = Instant::now();
        let result = client.get_idp_token(get_request(id.clone())).await;
        nanos.push(sent.elapsed().as_nanos() as u64);
        if result.is_err() {
            errors += 1;
        }
    }
    (Latencies::new(nanos), errors)
}

/// Asks for each of `ids` (uncached) over `channel`, then again (cached);
/// this also warms the cache for the load.
pub async fn cold_path(emulator: &Emulator, channel: &Channel, ids: &[String]) -> ColdPath {
    let direct = emulator_direct(emulator, ids).await;
    emulator.reset_counters();
    let started = Instant::now();
    let (broker, errors) = sequential_rpcs(channel, ids).await;
    let seconds = started.elapsed().as_secs_f64();
    let calls = emulator.calls();
    let (hit, _) = sequential_rpcs(channel, ids).await;
    ColdPath {
        users: ids.len(),
        broker,
        direct,
        hit,
        user_calls: calls.users,
        token_calls: calls.token,
        errors,
        seconds,
    }
}
