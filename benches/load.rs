//! Load benchmark (issue 7): the broker's cache-hit path against a bare tonic
//! server over the same mTLS acceptor, the cold path against the Auth0
//! emulator, and resident memory per cached user.
//!
//! `cargo bench --bench load -- --help` lists the flags. Everything runs in
//! this process on one multi-thread tokio runtime (server, emulator and load
//! generator share the machine's cores), except the memory phase's emulator,
//! which runs in a child process (this binary with `--emulator-child`): the
//! emulator records every request path and a per-user call counter, which
//! would otherwise be charged to the broker's cache.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenbroker::auth0::Auth0Settings;
use tokenbroker::auth0::{Auth0Client, OutboundLimits};
use tokenbroker::budget::{CallerBudgets, ShareSettings};
use tokenbroker::cache::CacheSettings;
use tokenbroker::cache::{IdentityStore, DEFAULT_STALE_IF_ERROR, DEFAULT_USER_MAX_BYTES};
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokenbroker::listener::ConnectionLimits;
use tokenbroker::pki::{write_file, CertificateAuthority, IssuedCertificate, LeafSpec};
use tokenbroker::policy::{Policy, PolicyStore};
use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::token_broker_server::{TokenBroker, TokenBrokerServer};
use tokenbroker::proto::{
    GetIdpTokenRequest, GetIdpTokenResponse, InvalidateUserRequest, InvalidateUserResponse,
    ListIdpTokensRequest, ListIdpTokensResponse,
};
use tokenbroker::server::RunSettings;
use tokenbroker::server::{self, Broker, Listeners};
use tokenbroker::tls::TlsFiles;
use tokenbroker::tls::{self, TlsStore};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Server};
use tonic::{Code, Request, Response, Status};

const CLIENT_ID: &str = "tokenbroker-bench";
const CLIENT_SECRET: &str = "bench-client-secret-0c9a7e";
const CALLER: &str = "spiffe://bench.example/ns/load/sa/client";
/// Synthetic GitHub ids: fixed width, so every answer has the same size.
const LOAD_USER_BASE: u64 = 10_000_000;
const MEMORY_USER_BASE: u64 = 20_000_000;
/// Users cached in the memory phase before the "before" reading, so
/// connection buffers and pools already exist.
const MEMORY_WARM_USERS: usize = 1_000;
const KIB: f64 = 1024.0;

// ---------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------

const HELP: &str = "\
tokenbroker load benchmark (issue 7)

USAGE: cargo bench --bench load -- [FLAGS]

  --concurrency C          requests in flight, one closed-loop task each     [32]
  --connections M          HTTP/2 mTLS connections, tasks spread round-robin [4]
  --seconds T              measured seconds per round                        [10]
  --warmup S               unmeasured seconds before each round              [1]
  --rounds R               rounds per server, alternating broker, baseline;
                           the round with the most requests/s is reported    [2]
  --users K                distinct users: cold path, then cached for the load [1000]
  --memory-users N         users cached for the RSS-per-user figure          [100000]
  --skip-memory            skip the memory phase
  --deadline-ms D          send grpc-timeout D ms with every load request (0: none) [0]
  --stale-if-error-secs S  the broker's stale-if-error window (0: off)       [600]
  --audit-log              format audit events as production does (JSON
                           tracing subscriber writing to a sink)
  --only broker|baseline   load only one server (for profiling)
  --help                   this text

Unknown arguments (cargo's --bench) are ignored.
";

#[derive(Debug, Clone)]
struct Args {
    concurrency: usize,
    connections: usize,
    seconds: u64,
    warmup: u64,
    rounds: usize,
    users: usize,
    memory_users: usize,
    skip_memory: bool,
    deadline_ms: u64,
    audit_log: bool,
    only: Option<String>,
    stale_if_error: Duration,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            concurrency: 32,
            connections: 4,
            seconds: 10,
            warmup: 1,
            rounds: 2,
            users: 1000,
            memory_users: 100_000,
            skip_memory: false,
            deadline_ms: 0,
            audit_log: false,
            only: None,
            stale_if_error: DEFAULT_STALE_IF_ERROR,
        }
    }
}

fn parse_args(raw: &[String]) -> Result<Option<Args>, String> {
    let mut args = Args::default();
    let mut iter = raw.iter();
    while let Some(flag) = iter.next() {
        let mut number = |name: &str| -> Result<u64, String> {
            let value = iter.next().ok_or_else(|| format!("{name} needs a value"))?;
            value
                .parse::<u64>()
                .map_err(|_| format!("{name}: not a number: {value:?}"))
        };
        match flag.as_str() {
            "--help" | "-h" => return Ok(None),
            "--concurrency" => args.concurrency = number(flag)?.max(1) as usize,
            "--connections" => args.connections = number(flag)?.max(1) as usize,
            "--seconds" => args.seconds = number(flag)?.max(1),
            "--warmup" => args.warmup = number(flag)?,
            "--rounds" => args.rounds = number(flag)?.max(1) as usize,
            "--users" => args.users = number(flag)?.max(1) as usize,
            "--memory-users" => args.memory_users = number(flag)?.max(1) as usize,
            "--skip-memory" => args.skip_memory = true,
            "--deadline-ms" => args.deadline_ms = number(flag)?,
            "--audit-log" => args.audit_log = true,
            "--stale-if-error-secs" => {
                args.stale_if_error = Duration::from_secs(number(flag)?);
            }
            "--only" => match iter.next().map(String::as_str) {
                Some(which @ ("broker" | "baseline")) => args.only = Some(which.to_owned()),
                other => return Err(format!("--only: broker or baseline, not {other:?}")),
            },
            _ => {} // cargo passes --bench; ignore what is not ours
        }
    }
    Ok(Some(args))
}

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if let Some(position) = raw.iter().position(|a| a == "--emulator-child") {
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
    if args.audit_log {
        tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::sink)
            .with_env_filter("info")
            .init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(args));
}

// ---------------------------------------------------------------------------
// Fixtures: PKI, emulator users, servers
// ---------------------------------------------------------------------------

fn github_user(id: u64) -> serde_json::Value {
    serde_json::json!({
        "user_id": format!("github|{id}"),
        "email": format!("user{id}@bench.example"),
        "identities": [{
            "provider": "github",
            "connection": "github",
            "user_id": id,
            "isSocial": true,
            // Real GitHub OAuth tokens: "gho_" and 36 characters.
            "access_token": format!("gho_{id:0>36}"),
        }],
    })
}

fn user_id(base: u64, index: usize) -> String {
    format!("github|{}", base + index as u64)
}

/// Bytes of the cached profile's strings: what any cache must hold.
fn payload_bytes(id: u64) -> usize {
    let user_id = format!("github|{id}").len();
    let access_token = 4 + 36;
    let provider = "github".len();
    let connection = "github".len();
    let idp_user_id = id.to_string().len();
    user_id + access_token + provider + connection + idp_user_id
}

struct Pki {
    ca: CertificateAuthority,
    client: IssuedCertificate,
    tls: Arc<TlsStore>,
    _dir: tempfile::TempDir,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = CertificateAuthority::generate("bench CA").expect("CA");
    let server_cert = ca.issue(&LeafSpec::loopback_server()).expect("server cert");
    let client = ca
        .issue(&LeafSpec::spiffe_client(CALLER))
        .expect("client cert");
    let files = TlsFiles {
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server.key"),
        client_ca: dir.path().join("ca.pem"),
    };
    write_file(&files.cert, &server_cert.cert_pem, false).expect("write");
    write_file(&files.key, &server_cert.key_pem, true).expect("write");
    write_file(&files.client_ca, &ca.cert_pem, false).expect("write");
    let tls = Arc::new(TlsStore::open(files).expect("tls config"));
    Pki {
        ca,
        client,
        tls,
        _dir: dir,
    }
}

/// Limits raised so the client-side limiter never shapes the figures.
fn open_limits() -> OutboundLimits {
    OutboundLimits {
        rate_per_second: NonZeroU32::new(100_000).unwrap_or(NonZeroU32::MIN),
        burst: NonZeroU32::new(100_000).unwrap_or(NonZeroU32::MIN),
        max_in_flight: 64,
        ..OutboundLimits::default()
    }
}

struct RunningServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RunningServer {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        self.task.abort();
    }
}

/// The broker as production runs it (service, health, reflection, policy,
/// audit), in process on port 0.
async fn start_broker(
    pki: &Pki,
    base_url: String,
    audience: String,
    capacity: u64,
    stale_if_error: Duration,
) -> (RunningServer, Arc<IdentityStore>) {
    let auth0 = Auth0Settings {
        base_url,
        audience,
        client_id: CLIENT_ID.to_owned(),
        client_secret: CLIENT_SECRET.to_owned().into(),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(10),
    };
    let cache = CacheSettings {
        // Longer than any run, so no entry expires under load.
        user_ttl: Duration::from_secs(3600),
        user_capacity: capacity,
        user_max_bytes: DEFAULT_USER_MAX_BYTES,
        negative_ttl: Duration::from_secs(30),
    };
    let store = Arc::new(
        IdentityStore::new(
            Auth0Client::with_limits(auth0, open_limits()).expect("auth0 client"),
            cache,
        )
        .with_stale_if_error(stale_if_error),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let broker = Broker {
        store: store.clone(),
        policy: Arc::new(PolicyStore::fixed(Policy::allow_any())),
        budgets: Arc::new(CallerBudgets::new(ShareSettings {
            rate_per_second: open_limits().rate_per_second,
            burst: open_limits().burst,
            share: 1.0,
            max_wait: open_limits().max_wait,
        })),
        tls: pki.tls.clone(),
        audit: tokenbroker::audit::AuditTrail::off(),
        fresh: tokenbroker::service::fresh::FreshnessSettings::default()
            .open()
            .expect("freshness"),
        id_tokens: None,
    };
    let settings = RunSettings {
        shutdown_grace: Duration::from_secs(1),
        reload_interval: Duration::from_secs(5),
        connections: ConnectionLimits::default(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let listeners = Listeners {
            mtls: listener,
            health: None,
        };
        if let Err(error) = server::run(listeners, broker, settings, async {
            let _ = stopped.await;
        })
        .await
        {
            eprintln!("broker stopped with an error: {error}");
        }
    });
    // Management token first, so no measured request pays for it.
    store
        .warm_up()
        .await
        .expect("broker obtains a Management token");
    (
        RunningServer {
            addr,
            stop: Some(stop),
            task,
        },
        store,
    )
}

/// The baseline: the generated service answering a fixed response, cloned
/// per request, behind the same mTLS acceptor and nothing else.
struct FixedAnswer(GetIdpTokenResponse);

#[tonic::async_trait]
impl TokenBroker for FixedAnswer {
    async fn get_idp_token(
        &self,
        _request: Request<GetIdpTokenRequest>,
    ) -> Result<Response<GetIdpTokenResponse>, Status> {
        Ok(Response::new(self.0.clone()))
    }

    async fn list_idp_tokens(
        &self,
        _request: Request<ListIdpTokensRequest>,
    ) -> Result<Response<ListIdpTokensResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn invalidate_user(
        &self,
        _request: Request<InvalidateUserRequest>,
    ) -> Result<Response<InvalidateUserResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }
}

async fn start_baseline(pki: &Pki, answer: GetIdpTokenResponse) -> RunningServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let incoming = tls::incoming(listener, pki.tls.clone(), ConnectionLimits::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = Server::builder()
            .add_service(TokenBrokerServer::new(FixedAnswer(answer)))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
        if let Err(error) = served {
            eprintln!("baseline stopped with an error: {error}");
        }
    });
    RunningServer {
        addr,
        stop: Some(stop),
        task,
    }
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
        .expect("client tls")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("mTLS connection")
}

async fn connect_many(addr: SocketAddr, pki: &Pki, count: usize) -> Vec<Channel> {
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        channels.push(connect(addr, pki).await);
    }
    channels
}

fn get_request(user_id: String) -> GetIdpTokenRequest {
    GetIdpTokenRequest {
        user_id,
        provider: "github".to_owned(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------
// Latency statistics
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct Latencies {
    /// Nanoseconds, sorted.
    sorted: Vec<u64>,
}

impl Latencies {
    fn new(mut nanos: Vec<u64>) -> Self {
        nanos.sort_unstable();
        Self { sorted: nanos }
    }

    /// Nearest-rank percentile, in microseconds.
    fn percentile_us(&self, q: f64) -> f64 {
        if self.sorted.is_empty() {
            return f64::NAN;
        }
        let rank = (q * self.sorted.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.sorted.len()) - 1;
        self.sorted[index] as f64 / 1e3
    }

    fn mean_us(&self) -> f64 {
        if self.sorted.is_empty() {
            return f64::NAN;
        }
        self.sorted.iter().sum::<u64>() as f64 / self.sorted.len() as f64 / 1e3
    }
}

// ---------------------------------------------------------------------------
// Closed-loop load
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct RoundResult {
    requests_per_second: f64,
    latencies: Latencies,
    /// Answers by gRPC code (OK included).
    codes: BTreeMap<String, u64>,
}

impl RoundResult {
    fn errors(&self) -> String {
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
async fn drive(
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

fn best(rounds: &[RoundResult]) -> RoundResult {
    rounds
        .iter()
        .max_by(|a, b| a.requests_per_second.total_cmp(&b.requests_per_second))
        .cloned()
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Cold path
// ---------------------------------------------------------------------------

struct ColdPath {
    users: usize,
    broker: Latencies,
    direct: Latencies,
    hit: Latencies,
    user_calls: u64,
    token_calls: u64,
    errors: u64,
    seconds: f64,
}

/// What the broker asks Auth0 for one user, done directly with reqwest
/// (HTTP/1.1 keep-alive, like the broker's client), one at a time.
async fn emulator_direct(emulator: &Emulator, ids: &[String]) -> Latencies {
    let http = reqwest::Client::new();
    let form = serde_urlencoded::to_string([
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("audience", emulator.audience().as_str()),
    ])
    .expect("form");
    let grant = http
        .post(format!("{}/oauth/token", emulator.base_url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .expect("token request")
        .bytes()
        .await
        .expect("token body");
    let grant: serde_json::Value = serde_json::from_slice(&grant).expect("token json");
    let bearer = format!("Bearer {}", grant["access_token"].as_str().expect("token"));
    let mut nanos = Vec::with_capacity(ids.len());
    for id in ids {
        let url = format!(
            "{}/api/v2/users/{}?fields=user_id%2Cidentities&include_fields=true",
            emulator.base_url(),
            percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC)
        );
        let sent = Instant::now();
        let body = http
            .get(url)
            .header("authorization", &bearer)
            .send()
            .await
            .expect("user request")
            .bytes()
            .await
            .expect("user body");
        let _: serde_json::Value = serde_json::from_slice(&body).expect("user json");
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

async fn cold_path(emulator: &Emulator, channel: &Channel, ids: &[String]) -> ColdPath {
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

// ---------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------

/// `--emulator-child N`: an emulator holding N synthetic users in its own
/// process. Prints `READY base_url audience`, then answers `calls` on stdin
/// with `token users`, and exits at EOF.
fn emulator_child(count: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let emulator = Emulator::start(EmulatorConfig::new(CLIENT_ID, CLIENT_SECRET))
            .await
            .expect("emulator starts");
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

struct ChildEmulator {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    base_url: String,
    audience: String,
}

impl ChildEmulator {
    fn spawn(users: usize) -> Self {
        let exe = std::env::current_exe().expect("own executable");
        let mut child = Command::new(exe)
            .arg("--emulator-child")
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

fn vm_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

struct Memory {
    users: usize,
    cached_after: u64,
    rss_before: u64,
    rss_after: u64,
    payload_per_user: usize,
    errors: u64,
    user_calls: u64,
    seconds: f64,
}

impl Memory {
    fn growth_per_user(&self) -> f64 {
        self.rss_after.saturating_sub(self.rss_before) as f64 / self.users as f64
    }

    fn net_per_user(&self) -> f64 {
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

async fn memory(pki: &Pki, args: &Args) -> Memory {
    let total = MEMORY_WARM_USERS + args.memory_users;
    let child = ChildEmulator::spawn(total);
    let (broker, store) = start_broker(
        pki,
        child.base_url.clone(),
        child.audience.clone(),
        total as u64 + 1_000,
        args.stale_if_error,
    )
    .await;
    let channels = connect_many(broker.addr, pki, args.connections).await;
    let ids: Vec<String> = (0..total).map(|i| user_id(MEMORY_USER_BASE, i)).collect();
    let (warm, measured) = ids.split_at(MEMORY_WARM_USERS);
    // Concurrency toward Auth0 is bounded by max_in_flight (64) anyway.
    let concurrency = args.concurrency.max(64);
    cache_all(&channels, Arc::new(warm.to_vec()), concurrency).await;
    store.cached_users().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = vm_rss_bytes();
    let started = Instant::now();
    let errors = cache_all(&channels, Arc::new(measured.to_vec()), concurrency).await;
    let seconds = started.elapsed().as_secs_f64();
    let cached_after = store.cached_users().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_after = vm_rss_bytes();
    drop(channels);
    broker.stop().await;
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

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

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

async fn run(args: Args) {
    let begun = Instant::now();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
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
        if args.audit_log {
            ", audit log formatted"
        } else {
            ""
        },
    );
    println!(
        "broker: policy allow-any, user TTL 1 h, stale-if-error {} s, Auth0 limits raised \
         (100000/s, 64 in flight)",
        args.stale_if_error.as_secs()
    );
    let pki = pki();

    // Emulator with K synthetic users, broker in front of it.
    let emulator = Emulator::start(EmulatorConfig::new(CLIENT_ID, CLIENT_SECRET))
        .await
        .expect("emulator starts");
    for index in 0..args.users {
        emulator.upsert_user(github_user(LOAD_USER_BASE + index as u64));
    }
    let (broker, _store) = start_broker(
        &pki,
        emulator.base_url(),
        emulator.audience(),
        (args.users as u64).max(100_000),
        args.stale_if_error,
    )
    .await;
    let broker_channels = connect_many(broker.addr, &pki, args.connections).await;

    // Cold path: this also warms the cache for the K users.
    let ids: Vec<String> = (0..args.users)
        .map(|i| user_id(LOAD_USER_BASE, i))
        .collect();
    let cold = cold_path(&emulator, &broker_channels[0], &ids).await;

    // Baseline answers exactly what the broker answers for the first user.
    let answer = TokenBrokerClient::new(broker_channels[0].clone())
        .get_idp_token(get_request(ids[0].clone()))
        .await
        .expect("broker answers")
        .into_inner();
    let answer_size = prost::Message::encoded_len(&answer);
    let baseline = start_baseline(&pki, answer).await;
    let baseline_channels = connect_many(baseline.addr, &pki, args.connections).await;

    let requests: Arc<Vec<GetIdpTokenRequest>> =
        Arc::new(ids.iter().cloned().map(get_request).collect());
    emulator.reset_counters();
    let mut broker_rounds = Vec::new();
    let mut baseline_rounds = Vec::new();
    for round in 1..=args.rounds {
        if args.only.as_deref() != Some("baseline") {
            let result = drive(&broker_channels, requests.clone(), &args).await;
            println!(
                "  round {round} broker:   {:>9.0} req/s  p99 {:>8.1} µs",
                result.requests_per_second,
                result.latencies.percentile_us(0.99)
            );
            broker_rounds.push(result);
        }
        if args.only.as_deref() != Some("broker") {
            let result = drive(&baseline_channels, requests.clone(), &args).await;
            println!(
                "  round {round} baseline: {:>9.0} req/s  p99 {:>8.1} µs",
                result.requests_per_second,
                result.latencies.percentile_us(0.99)
            );
            baseline_rounds.push(result);
        }
    }
    let auth0_calls_under_load = emulator.calls();
    drop(broker_channels);
    drop(baseline_channels);
    broker.stop().await;
    baseline.stop().await;
    emulator.shutdown().await;

    let memory = if args.skip_memory {
        None
    } else {
        Some(memory(&pki, &args).await)
    };

    // Report.
    let broker_best = best(&broker_rounds);
    let baseline_best = best(&baseline_rounds);
    println!();
    println!(
        "== cache-hit load: GetIdpToken, {answer_size}-byte answer, best of {} rounds",
        args.rounds
    );
    println!(
        "{:<22} {:>11} {:>9} {:>9} {:>9} {:>9}  errors by code",
        "", "requests/s", "p50 µs", "p99 µs", "p99.9 µs", "mean µs"
    );
    row("broker (cache hit)", &broker_best);
    row("baseline (fixed)", &baseline_best);
    let rps_ratio = broker_best.requests_per_second / baseline_best.requests_per_second;
    let p50_ratio =
        broker_best.latencies.percentile_us(0.50) / baseline_best.latencies.percentile_us(0.50);
    let p99_ratio =
        broker_best.latencies.percentile_us(0.99) / baseline_best.latencies.percentile_us(0.99);
    let p999_ratio =
        broker_best.latencies.percentile_us(0.999) / baseline_best.latencies.percentile_us(0.999);
    println!(
        "{:<22} {:>11.3} {:>9.3} {:>9.3} {:>9.3}",
        "broker / baseline", rps_ratio, p50_ratio, p99_ratio, p999_ratio
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
        auth0_calls_under_load.token, auth0_calls_under_load.users
    );

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

    if let Some(memory) = memory {
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
    println!();
    println!("total time {:.1} s", begun.elapsed().as_secs_f64());
}
