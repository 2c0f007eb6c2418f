//! Load benchmark (issue 7): the broker's cache-hit path against a bare tonic
//! server over the same mTLS acceptor, the cold path against the Auth0
//! emulator, and resident memory per cached user.
//!
//! `cargo bench --bench load -- --help` lists the flags. Everything runs in
//! this process on one multi-thread tokio runtime (server, emulator and load
//! generator share the machine's cores), except the memory phase's emulator,
//! which runs in a child process (this binary with `--emulator-child`).
//!
//! Layout, by phase: [`args`] (flags), [`users`] (the synthetic users and
//! their requests), [`broker`] (the broker under test, through the test kit),
//! [`common::baseline`] (the bare server), [`load`] and [`stats`] (the closed-loop
//! load and its percentiles), [`cold`] (the cold path), [`stale`] (the
//! stale-token phase), [`memory`] (the memory phase and its child emulator),
//! [`report`] (what is printed), and [`common`] (`benches/common/`, shared
//! with the fleet bench: starting and stopping a broker, the stale users and
//! the connections file that refreshes them).

mod args;
mod broker;
mod cold;
#[path = "../common/mod.rs"]
mod common;
mod load;
mod memory;
mod report;
mod stale;
mod stats;
mod users;

use std::sync::Arc;
use std::time::Instant;

use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::GetIdpTokenRequest;
use tonic::transport::Channel;

use crate::args::{parse_args, Args, HELP};
use crate::broker::{connect_many, start_broker, Upstream, CREDENTIALS};
use crate::common::baseline::Baseline;
use crate::common::{seed_stale_users, stop_broker};
use crate::load::{best, drive, RoundResult};
use crate::memory::{emulator_child, EMULATOR_CHILD_FLAG};
use crate::users::{get_request, github_user, user_ids, LOAD_USER_BASE};

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if let Some(position) = raw.iter().position(|a| a == EMULATOR_CHILD_FLAG) {
        let count = raw
            .get(position + 1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        emulator_child(count);
        return;
    }
    let args = match parse_args(&raw) {
        Ok(Some(args)) => args,
        Ok(None) => {
            print!("{HELP}");
            return;
        }
        Err(error) => {
            eprintln!("{error}\n\n{HELP}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if !args.bare {
        // Production: JSON diagnostics at info (what `serve` installs; the
        // per-RPC lines are at debug) and the Prometheus recorder.
        tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::sink)
            .with_env_filter("info")
            .init();
        runtime.block_on(async {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
            tokenbroker::stats::install_exporter(addr).expect("metrics recorder");
        });
    }
    runtime.block_on(run(args));
}

/// One round of the load on `channels`, printed as it ends.
async fn measure_round(
    round: usize,
    server: &str,
    channels: &[Channel],
    requests: &Arc<Vec<GetIdpTokenRequest>>,
    args: &Args,
) -> RoundResult {
    let result = drive(channels, requests.clone(), args).await;
    report::round(round, server, &result);
    result
}

async fn run(args: Args) {
    let begun = Instant::now();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    report::header(&args, cores);
    let pki = broker::pki();

    // Emulator with K synthetic users, broker in front of it.
    let emulator = CREDENTIALS.start_emulator().await.expect("emulator starts");
    for index in 0..args.users {
        emulator.upsert_user(github_user(LOAD_USER_BASE + index as u64));
    }
    let stale_ids = seed_stale_users(&emulator, args.stale_users);
    let broker = start_broker(
        &pki,
        Upstream {
            base_url: emulator.base_url(),
            audience: emulator.audience(),
            capacity: (args.users as u64).max(100_000),
            stale_if_error: args.stale_if_error,
        },
        &broker::Production::for_run(&pki, &emulator, args.bare),
    )
    .await;
    let broker_channels = connect_many(broker.addr, &pki, args.connections).await;

    // Cold path: this also warms the cache for the K users.
    let ids = user_ids(LOAD_USER_BASE, args.users);
    let cold = cold::cold_path(&emulator, &broker_channels[0], &ids).await;

    // Baseline answers exactly what the broker answers for the first user,
    // with the broker's own TLS material.
    let answer = TokenBrokerClient::new(broker_channels[0].clone())
        .get_idp_token(get_request(ids[0].clone()))
        .await
        .expect("broker answers")
        .into_inner();
    let answer_size = prost::Message::encoded_len(&answer);
    let baseline = Baseline::start(broker.tls.clone(), answer).await;
    let baseline_channels = connect_many(baseline.addr, &pki, args.connections).await;

    let requests: Arc<Vec<GetIdpTokenRequest>> =
        Arc::new(ids.iter().cloned().map(get_request).collect());
    emulator.reset_counters();
    let mut broker_rounds = Vec::new();
    let mut baseline_rounds = Vec::new();
    for round in 1..=args.rounds {
        if args.loads_broker() {
            let result = measure_round(round, "broker:", &broker_channels, &requests, &args);
            broker_rounds.push(result.await);
        }
        if args.loads_baseline() {
            let result = measure_round(round, "baseline:", &baseline_channels, &requests, &args);
            baseline_rounds.push(result.await);
        }
    }
    let auth0_calls = emulator.calls();
    let stale = if args.skip_stale {
        None
    } else {
        Some(stale::stale_phase(&emulator, &broker_channels, &stale_ids, args.stale_requests).await)
    };
    drop(broker_channels);
    drop(baseline_channels);
    stop_broker(broker).await;
    baseline.stop().await;
    emulator.shutdown().await;

    let memory = if args.skip_memory {
        None
    } else {
        Some(memory::memory(&pki, &args).await)
    };

    report::cache_hits(&report::CacheHits {
        answer_size,
        rounds: args.rounds,
        broker: best(&broker_rounds),
        baseline: best(&baseline_rounds),
        auth0_calls,
    });
    report::cold_path(&cold);
    if let Some(stale) = stale {
        report::stale(&stale);
    }
    if let Some(memory) = memory {
        report::memory(&memory);
    }
    println!();
    println!("total time {:.1} s", begun.elapsed().as_secs_f64());
}
