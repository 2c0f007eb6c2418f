//! The benchmark's flags: `cargo bench --bench load -- --help`. Hand-parsed,
//! so the bench needs no argument-parsing dependency and ignores the flags
//! cargo adds (`--bench`).

use std::time::Duration;

use tokenbroker::cache::DEFAULT_STALE_IF_ERROR;

/// What `--help` prints.
pub const HELP: &str = "\
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
  --bare-config            the broker without audit trail, metrics and policy
                           (the default is the production configuration:
                           audit to a file with a key, metrics, a policy)
  --stale-users U          stale users refreshed at the (emulated) IdP      [100]
  --stale-requests Q       concurrent requests over the stale users         [1000]
  --skip-stale             skip the stale-token phase
  --only broker|baseline   load only one server (for profiling)
  --help                   this text

Unknown arguments (cargo's --bench) are ignored.
";

/// One run's settings, as the flags give them.
#[derive(Debug, Clone)]
pub struct Args {
    /// Requests in flight during the load, one closed-loop task each.
    pub concurrency: usize,
    /// mTLS connections the tasks share, round-robin.
    pub connections: usize,
    /// Measured seconds per round.
    pub seconds: u64,
    /// Unmeasured seconds before each round.
    pub warmup: u64,
    /// Rounds per server; the best is reported.
    pub rounds: usize,
    /// Distinct users of the cold path and the load.
    pub users: usize,
    /// Users cached for the memory figure.
    pub memory_users: usize,
    /// Leave the memory phase out.
    pub skip_memory: bool,
    /// `grpc-timeout` of every load request in ms; 0: none.
    pub deadline_ms: u64,
    /// Load only `broker` or only `baseline`.
    pub only: Option<String>,
    /// The broker's stale-if-error window.
    pub stale_if_error: Duration,
    /// `--bare-config`: no audit trail, no metrics recorder, allow-any policy.
    pub bare: bool,
    /// `--stale-users`: users whose token must be refreshed at the IdP.
    pub stale_users: usize,
    /// `--stale-requests`: requests sent at once over those users.
    pub stale_requests: usize,
    /// `--skip-stale`: no stale-token phase.
    pub skip_stale: bool,
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
            bare: false,
            stale_users: 100,
            stale_requests: 1000,
            skip_stale: false,
            only: None,
            stale_if_error: DEFAULT_STALE_IF_ERROR,
        }
    }
}

impl Args {
    /// Whether the broker is loaded (not `--only baseline`).
    pub fn loads_broker(&self) -> bool {
        self.only.as_deref() != Some("baseline")
    }

    /// Whether the baseline is loaded (not `--only broker`).
    pub fn loads_baseline(&self) -> bool {
        self.only.as_deref() != Some("broker")
    }
}

/// The flags in `raw`; `Ok(None)` for `--help`.
pub fn parse_args(raw: &[String]) -> Result<Option<Args>, String> {
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
            "--bare-config" => args.bare = true,
            "--stale-users" => args.stale_users = number(flag)?.max(1) as usize,
            "--stale-requests" => args.stale_requests = number(flag)?.max(1) as usize,
            "--skip-stale" => args.skip_stale = true,
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
