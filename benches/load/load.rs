//! The closed-loop load: C tasks, each sending its next request as soon as
//! the last one is answered, over M shared channels.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::GetIdpTokenRequest;
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::args::Args;
use crate::stats::Latencies;

/// What one round against one server measured.
#[derive(Debug, Clone, Default)]
pub struct RoundResult {
    /// Answers in the measured window per second.
    pub requests_per_second: f64,
    /// Latencies of those answers.
    pub latencies: Latencies,
    /// Answers by gRPC code (OK included).
    codes: BTreeMap<String, u64>,
}

impl RoundResult {
    /// The answers other than OK, as `Code:count` words; `none` if there were none.
    pub fn errors(&self) -> String {
        let errors: Vec<String> = self
            .codes
            .iter()
            .filter(|(code, _)| code.as_str() != "Ok")
            .map(|(code, count)| format!("{code}:{count}"))
            .collect();
        if errors.is_empty() {
            "none".to_owned()
        } else {
            errors.join(" ")
        }
    }
}

/// C tasks, each a closed loop on channel `i % M`, for `warmup + seconds`;
/// only answers that arrive in the measured window count.
pub async fn drive(
    channels: &[Channel],
    requests: Arc<Vec<GetIdpTokenRequest>>,
    args: &Args,
) -> RoundResult {
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup);
    let measure_until = measure_from + Duration::from_secs(args.seconds);
    let deadline = (args.deadline_ms > 0).then(|| Duration::from_millis(args.deadline_ms));
    let concurrency = args.concurrency;
    let mut tasks = Vec::with_capacity(concurrency);
    for task_index in 0..concurrency {
        let mut client = TokenBrokerClient::new(channels[task_index % channels.len()].clone());
        let requests = requests.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 16);
            // Indexed by the gRPC code's number (0 = OK ... 16).
            let mut codes = [0u64; 17];
            let mut next = task_index;
            loop {
                let mut request = Request::new(requests[next % requests.len()].clone());
                next += concurrency;
                if let Some(deadline) = deadline {
                    request.set_timeout(deadline);
                }
                let sent = Instant::now();
                let code = match client.get_idp_token(request).await {
                    Ok(response) if response.get_ref().token.is_some() => Code::Ok,
                    Ok(_) => Code::Internal,
                    Err(status) => status.code(),
                };
                let done = Instant::now();
                if done >= measure_until {
                    break;
                }
                if done >= measure_from {
                    latencies.push(done.duration_since(sent).as_nanos() as u64);
                    codes[(code as usize).min(16)] += 1;
                }
            }
            (latencies, codes)
        }));
    }
    let mut all = Vec::new();
    let mut codes = BTreeMap::new();
    for task in tasks {
        let (latencies, task_codes) = task.await.expect("load task");
        all.extend(latencies);
        for (number, count) in task_codes.into_iter().enumerate() {
            if count > 0 {
                let code = Code::from_i32(number as i32);
                *codes.entry(format!("{code:?}")).or_default() += count;
            }
        }
    }
    let answered: u64 = codes.values().sum();
    RoundResult {
        requests_per_second: answered as f64 / args.seconds as f64,
        latencies: Latencies::new(all),
        codes,
    }
}

/// The round with the most requests/s.
pub fn best(rounds: &[RoundResult]) -> RoundResult {
    rounds
        .iter()
        .max_by(|a, b| a.requests_per_second.total_cmp(&b.requests_per_second))
        .cloned()
        .unwrap_or_default()
}
