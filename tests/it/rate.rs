//! Checking a client-side Auth0 rate limit from outside: sample the
//! emulator's request counter while the requests run, then hold every
//! sample to `burst + rate × elapsed + 1` (the one in flight at the sample).

use std::future::Future;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use tokenbroker::auth0::OutboundLimits;

use crate::support::Options;

/// How many requests Auth0 had seen how long after the start.
pub type Samples = Vec<(Duration, u64)>;

/// Runs `work` to its end (failing past 60 s), sampling `count()` every
/// 100 ms and once at the end.
pub async fn sample_while<T>(
    count: impl Fn() -> u64,
    work: impl Future<Output = T>,
) -> (T, Samples) {
    let started = Instant::now();
    tokio::pin!(work);
    let mut samples = Vec::new();
    let output = loop {
        tokio::select! {
            output = &mut work => break output,
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                samples.push((started.elapsed(), count()));
            }
        }
        assert!(started.elapsed() < Duration::from_secs(60), "bounded");
    };
    samples.push((started.elapsed(), count()));
    (output, samples)
}

/// Fails naming the first sample above what `rate` per second with `burst`
/// allows.
pub fn assert_within_limit(samples: &Samples, rate: u32, burst: u32) {
    for (elapsed, calls) in samples {
        let allowed = f64::from(burst) + f64::from(rate) * elapsed.as_secs_f64() + 1.0;
        assert!(
            (*calls as f64) <= allowed,
            "{calls} Auth0 reads after {elapsed:?}; the limit allows {allowed}"
        );
    }
}

/// A broker limited to `rate` Auth0 requests per second with `burst`, whose
/// reads may wait up to 30 s for a slot (the last of a cold burst do; in
/// production the wait and the call budget are the one --auth0-timeout).
pub fn rate_limited(rate: u32, burst: u32) -> Options {
    Options {
        outbound: OutboundLimits {
            rate_per_second: NonZeroU32::new(rate).expect("rate"),
            burst: NonZeroU32::new(burst).expect("burst"),
            max_wait: Duration::from_secs(30),
            ..OutboundLimits::default()
        },
        auth0_request_timeout: Some(Duration::from_secs(30)),
        ..Options::default()
    }
}
