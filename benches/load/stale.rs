//! The stale-token phase (issue "fresh tokens"): users who signed in hours
//! ago, whose profile token is dead and whose refresh token works. Q requests
//! at once over U such users: how many IdP refreshes that makes (one per
//! user, however many requests need it) and what the refresh path costs
//! against a cache hit of the refreshed token.

use std::time::Instant;

use futures::future::join_all;
use tokenbroker::emulator::Emulator;
use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::GetIdpTokenRequest;
use tonic::transport::Channel;

use crate::common::STALE_CONNECTION;
use crate::stats::Latencies;

/// What the phase measured.
pub struct Stale {
    pub users: usize,
    pub requests: usize,
    /// The first wave: every request needs a refresh (shared per user).
    pub refresh: Latencies,
    /// The second wave: the refreshed tokens are cached.
    pub hit: Latencies,
    pub idp_calls: u64,
    pub auth0_user_reads: u64,
    pub errors: u64,
}

/// `requests` requests at once, spread over `ids` and `channels`; latencies
/// and errors.
async fn wave(channels: &[Channel], ids: &[String], requests: usize) -> (Latencies, u64) {
    let calls = (0..requests).map(|index| {
        let mut client = TokenBrokerClient::new(channels[index % channels.len()].clone());
        let request = GetIdpTokenRequest {
            user_id: ids[index % ids.len()].clone(),
            provider: STALE_CONNECTION.to_owned(),
            ..Default::default()
        };
        async move {
            let sent = Instant::now();
            let ok = client.get_idp_token(request).await.is_ok();
            (sent.elapsed().as_nanos() as u64, ok)
        }
    });
    let results = join_all(calls).await;
    let errors = results.iter().filter(|(_, ok)| !ok).count() as u64;
    (
        Latencies::new(results.into_iter().map(|(nanos, _)| nanos).collect()),
        errors,
    )
}

/// The two waves over the stale users.
pub async fn stale_phase(
    emulator: &Emulator,
    channels: &[Channel],
    ids: &[String],
    requests: usize,
) -> Stale {
    emulator.reset_counters();
    let (refresh, refresh_errors) = wave(channels, ids, requests).await;
    let calls = emulator.calls();
    let (hit, hit_errors) = wave(channels, ids, requests).await;
    Stale {
        users: ids.len(),
        requests,
        refresh,
        hit,
        idp_calls: calls.idp_token,
        auth0_user_reads: calls.users,
        errors: refresh_errors + hit_errors,
    }
}
