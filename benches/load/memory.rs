//! The memory phase: VmRSS growth while N more users are cached through
//! `GetIdpToken`. Its emulator runs in a child process (this binary with
//! `--emulator-child N`): the emulator records every request path and a
//! per-user call counter, which in process would be charged to the broker.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tonic::transport::Channel;

use crate::args::Args;
use crate::broker::{connect_many, start_broker, Pki, Upstream, CREDENTIALS};
use crate::common::stop_broker;
use crate::users::{get_request, github_user, payload_bytes, user_ids, MEMORY_USER_BASE};

/// The flag that makes this binary the memory phase's emulator.
pub const EMULATOR_CHILD_FLAG: &str = "--emulator-child";

/// Users cached in the memory phase before the "before" reading, so
/// connection buffers and pools already exist.
const MEMORY_WARM_USERS: usize = 1_000;

/// `--emulator-child N`: an emulator holding N synthetic users in its own
/// process. Prints `READY base_url audience`, then answers `calls` on stdin
/// with `token users`, and exits at EOF.
pub fn emulator_child(count: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let emulator = CREDENTIALS.start_emulator().await.expect("emulator starts");
        for index in 0..count {
            emulator.upsert_user(github_user(MEMORY_USER_BASE + index as u64));
        }
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(
            stdout,
            "READY {} {}",
            emulator.base_url(),
            emulator.audience()
        );
        let _ = stdout.flush();
        drop(stdout);
        // Serve until the parent writes a line (or goes away).
        let _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await;
        let calls = emulator.calls();
        println!("{} {}", calls.token, calls.users);
    });
}

/// The memory phase's emulator, in its child process.
struct ChildEmulator {
    child: Child,
    /// Closing it (or writing a line) ends the child.
    stdin: Option<ChildStdin>,
    /// Where the child says READY and its call counts.
    stdout: BufReader<ChildStdout>,
    /// The child emulator's URL.
    base_url: String,
    /// The Management API audience it accepts.
    audience: String,
}

impl ChildEmulator {
    /// Starts the child with `users` synthetic users and waits for READY.
    fn spawn(users: usize) -> Self {
        let exe = std::env::current_exe().expect("own executable");
        let mut child = Command::new(exe)
            .arg(EMULATOR_CHILD_FLAG)
            .arg(users.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn emulator child");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("child stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("child says READY");
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("READY"), "emulator child: {line:?}");
        let base_url = words.next().expect("base url").to_owned();
        let audience = words.next().expect("audience").to_owned();
        Self {
            child,
            stdin,
            stdout,
            base_url,
            audience,
        }
    }

    /// Stops the child; returns its `(token, users)` call counts.
    fn finish(mut self) -> (u64, u64) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "calls");
        }
        let mut line = String::new();
        let _ = self.stdout.read_line(&mut line);
        let _ = self.child.wait();
        let mut numbers = line.split_whitespace().map(|n| n.parse().unwrap_or(0));
        (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
    }
}

/// This process's resident memory, in bytes (0 where `/proc` cannot tell).
fn vm_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// What the memory phase measured.
pub struct Memory {
    /// Users cached between the two readings.
    pub users: usize,
    /// Users in the cache after the phase.
    pub cached_after: u64,
    /// VmRSS before, in bytes.
    pub rss_before: u64,
    /// VmRSS after, in bytes.
    pub rss_after: u64,
    /// Bytes of one user's strings, which any cache must hold.
    pub payload_per_user: usize,
    /// Requests that failed.
    pub errors: u64,
    /// `/api/v2/users` calls the child emulator answered.
    pub user_calls: u64,
    /// How long caching the measured users took.
    pub seconds: f64,
}

impl Memory {
    /// VmRSS growth per cached user, in bytes.
    pub fn growth_per_user(&self) -> f64 {
        self.rss_after.saturating_sub(self.rss_before) as f64 / self.users as f64
    }

    /// [`Self::growth_per_user`] beyond the payload.
    pub fn net_per_user(&self) -> f64 {
        self.growth_per_user() - self.payload_per_user as f64
    }
}

/// Caches `ids` through GetIdpToken with `concurrency` tasks over `channels`.
async fn cache_all(channels: &[Channel], ids: Arc<Vec<String>>, concurrency: usize) -> u64 {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(concurrency);
    for task_index in 0..concurrency {
        let mut client = TokenBrokerClient::new(channels[task_index % channels.len()].clone());
        let ids = ids.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut errors = 0u64;
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(index) else {
                    return errors;
                };
                if client.get_idp_token(get_request(id.clone())).await.is_err() {
                    errors += 1;
                }
            }
        }));
    }
    let mut errors = 0;
    for task in tasks {
        errors += task.await.expect("cache task");
    }
    errors
}

/// A broker of its own in front of the child emulator; VmRSS read around
/// caching `--memory-users` users.
pub async fn memory(pki: &Pki, args: &Args) -> Memory {
    let total = MEMORY_WARM_USERS + args.memory_users;
    let child = ChildEmulator::spawn(total);
    let broker = start_broker(
        pki,
        Upstream {
            base_url: child.base_url.clone(),
            audience: child.audience.clone(),
            capacity: total as u64 + 1_000,
            stale_if_error: args.stale_if_error,
        },
        &crate::broker::Production::bare(),
    )
    .await;
    let channels = connect_many(broker.addr, pki, args.connections).await;
    let ids = user_ids(MEMORY_USER_BASE, total);
    let (warm, measured) = ids.split_at(MEMORY_WARM_USERS);
    // Concurrency toward Auth0 is bounded by max_in_flight (64) anyway.
    let concurrency = args.concurrency.max(64);
    cache_all(&channels, Arc::new(warm.to_vec()), concurrency).await;
    broker.store.cached_users().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = vm_rss_bytes();
    let started = Instant::now();
    let errors = cache_all(&channels, Arc::new(measured.to_vec()), concurrency).await;
    let seconds = started.elapsed().as_secs_f64();
    let cached_after = broker.store.cached_users().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_after = vm_rss_bytes();
    drop(channels);
    stop_broker(broker).await;
    let (_, user_calls) = child.finish();
    Memory {
        users: measured.len(),
        cached_after,
        rss_before,
        rss_after,
        payload_per_user: payload_bytes(MEMORY_USER_BASE),
        errors,
        user_calls,
        seconds,
    }
}
