//! What the benchmark prints: the run's settings first, a line per round
//! while it runs, then one table per phase. BENCHMARKS.md quotes this format.

use tokenbroker::emulator::CallCounts;

use crate::args::Args;
use crate::cold::ColdPath;
use crate::load::RoundResult;
use crate::memory::Memory;

const KIB: f64 = 1024.0;

/// The cache-hit load's figures, for [`cache_hits`].
pub struct CacheHits {
    /// Encoded size of the answer both servers send.
    pub answer_size: usize,
    /// Rounds per server.
    pub rounds: usize,
    /// The broker's best round.
    pub broker: RoundResult,
    /// The baseline's best round.
    pub baseline: RoundResult,
    /// Auth0 calls the broker made during the load (none: all hits).
    pub auth0_calls: CallCounts,
}

/// The two lines that say what this run does.
pub fn header(args: &Args, cores: usize) {
    println!(
        "tokenbroker load benchmark: {cores} cores, concurrency {} over {} connections, \
         {} s measured (+{} s warm-up) x {} rounds each, {} users{}{}",
        args.concurrency,
        args.connections,
        args.seconds,
        args.warmup,
        args.rounds,
        args.users,
        if args.deadline_ms > 0 {
            format!(", grpc-timeout {} ms", args.deadline_ms)
        } else {
            String::new()
        },
        if args.bare {
            ", bare configuration"
        } else {
            ", production configuration"
        },
    );
    if args.bare {
        println!(
            "broker: policy allow-any, no audit trail, no metrics recorder, user TTL 1 h, \
             stale-if-error {} s, Auth0 limits raised (100000/s, 64 in flight)",
            args.stale_if_error.as_secs()
        );
    } else {
        println!(
            "broker: policy listing the load's caller, audit trail to a file with token_hmac \
             (HMAC key), Prometheus metrics recorder, JSON diagnostics at info, user TTL 1 h, \
             stale-if-error {} s, Auth0 limits raised (100000/s, 64 in flight)",
            args.stale_if_error.as_secs()
        );
    }
}

/// One round's line, as it ends; `server` is `broker:` or `baseline:`.
pub fn round(round: usize, server: &str, result: &RoundResult) {
    println!(
        "  round {round} {server:<9} {:>9.0} req/s  p99 {:>8.1} µs",
        result.requests_per_second,
        result.latencies.percentile_us(0.99)
    );
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "MISS"
    }
}

fn row(name: &str, result: &RoundResult) {
    println!(
        "{name:<22} {:>11.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1}  {}",
        result.requests_per_second,
        result.latencies.percentile_us(0.50),
        result.latencies.percentile_us(0.99),
        result.latencies.percentile_us(0.999),
        result.latencies.mean_us(),
        result.errors()
    );
}

/// The cache-hit table: both servers, their ratios and the targets.
pub fn cache_hits(figures: &CacheHits) {
    let CacheHits {
        answer_size,
        rounds,
        broker,
        baseline,
        auth0_calls,
    } = figures;
    println!();
    println!("== cache-hit load: GetIdpToken, {answer_size}-byte answer, best of {rounds} rounds");
    println!(
        "{:<22} {:>11} {:>9} {:>9} {:>9} {:>9}  errors by code",
        "", "requests/s", "p50 µs", "p99 µs", "p99.9 µs", "mean µs"
    );
    row("broker (cache hit)", broker);
    row("baseline (fixed)", baseline);
    let rps_ratio = broker.requests_per_second / baseline.requests_per_second;
    let ratio = |q: f64| broker.latencies.percentile_us(q) / baseline.latencies.percentile_us(q);
    let p99_ratio = ratio(0.99);
    println!(
        "{:<22} {:>11.3} {:>9.3} {:>9.3} {:>9.3}",
        "broker / baseline",
        rps_ratio,
        ratio(0.50),
        p99_ratio,
        ratio(0.999)
    );
    println!(
        "target requests/s >= 0.95x baseline: {:.3}x {}",
        rps_ratio,
        verdict(rps_ratio >= 0.95)
    );
    println!(
        "target p99 <= 1.2x baseline:         {:.3}x {}",
        p99_ratio,
        verdict(p99_ratio <= 1.2)
    );
    println!(
        "Auth0 calls during the load: {} token, {} users (cache hits only: both should be 0)",
        auth0_calls.token, auth0_calls.users
    );
}

/// The cold-path table: the broker's misses against the emulator's own time.
pub fn cold_path(cold: &ColdPath) {
    println!();
    println!(
        "== cold path: {} distinct uncached users, one at a time ({:.2} s, {} errors)",
        cold.users, cold.seconds, cold.errors
    );
    println!(
        "Auth0 calls made: {} /api/v2/users (expected {}), {} /oauth/token (expected 0: token cached)",
        cold.user_calls, cold.users, cold.token_calls
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9}",
        "", "p50 µs", "p99 µs", "p99.9 µs", "mean µs"
    );
    let cold_rows = [
        ("broker, cold (RPC + Auth0 read)", &cold.broker),
        ("emulator direct (reqwest)", &cold.direct),
        ("broker, same users now cached", &cold.hit),
    ];
    for (name, latencies) in cold_rows {
        println!(
            "{name:<34} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            latencies.percentile_us(0.50),
            latencies.percentile_us(0.99),
            latencies.percentile_us(0.999),
            latencies.mean_us()
        );
    }
    let minus = |q: f64| cold.broker.percentile_us(q) - cold.direct.percentile_us(q);
    println!(
        "{:<34} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
        "broker cold minus emulator",
        minus(0.50),
        minus(0.99),
        minus(0.999),
        cold.broker.mean_us() - cold.direct.mean_us()
    );
    let overhead = |q: f64| minus(q) - cold.hit.percentile_us(q);
    println!(
        "{:<34} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
        "  ... and minus the cached RPC",
        overhead(0.50),
        overhead(0.99),
        overhead(0.999),
        cold.broker.mean_us() - cold.direct.mean_us() - cold.hit.mean_us()
    );
}

/// The memory figures: VmRSS growth per cached user against the target.
pub fn memory(memory: &Memory) {
    println!();
    println!(
        "== memory: {} users cached through GetIdpToken in {:.1} s ({} errors, {} Auth0 user reads, {} cached after)",
        memory.users,
        memory.seconds,
        memory.errors,
        memory.user_calls,
        memory.cached_after
    );
    println!(
        "VmRSS {:.1} MiB -> {:.1} MiB: +{:.1} MiB, {:.0} bytes per user; \
         payload (user id, token, provider, connection, idp user id) {} bytes",
        memory.rss_before as f64 / KIB / KIB,
        memory.rss_after as f64 / KIB / KIB,
        (memory.rss_after.saturating_sub(memory.rss_before)) as f64 / KIB / KIB,
        memory.growth_per_user(),
        memory.payload_per_user
    );
    println!(
        "target <= 1 KiB per cached user beyond the token bytes: {:.0} bytes {}",
        memory.net_per_user(),
        verdict(memory.net_per_user() <= KIB)
    );
}

/// The stale-token phase.
pub fn stale(stale: &crate::stale::Stale) {
    println!();
    println!(
        "== stale tokens: {} requests at once over {} users whose profile token is dead ({} errors)",
        stale.requests, stale.users, stale.errors
    );
    println!(
        "IdP refreshes {} (one per user), Auth0 user reads {}",
        stale.idp_calls, stale.auth0_user_reads
    );
    println!("| | p50 µs | p99 µs | mean µs |");
    println!("|---|---:|---:|---:|");
    for (name, latencies) in [
        ("refresh path (first wave)", &stale.refresh),
        ("cache hit of the refreshed token", &stale.hit),
    ] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            latencies.percentile_us(0.50),
            latencies.percentile_us(0.99),
            latencies.mean_us()
        );
    }
}
