//! The connection to Redis, and whether the fleet is in shared mode.
//!
//! Every call is bounded by the Redis timeout (`--redis-timeout`), so a slow
//! Redis costs a request at most that. The first call that fails or times out
//! starts an outage: one warning, one count, and from then on no call goes to
//! Redis at all (requests are served from moka and Auth0 with this replica's
//! own budget) until the watcher (`watch.rs`) finds Redis answering again and
//! calls [`Link::recovered`]. So an outage costs one timeout, not one per
//! request, and its log is one line, not one per call.

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::{Client, FromRedisValue, ScriptInvocation};

use super::metrics;

/// Not yet connected since start: a failure now is the first outage.
const CONNECTING: u8 = 0;
/// Shared mode: calls go to Redis.
const UP: u8 = 1;
/// An outage: no call goes to Redis until the watcher sees it answer.
const DOWN: u8 = 2;

/// How long one attempt to open a connection may take. Connections are
/// opened off the request path (by the connection manager or the watcher),
/// so this may be longer than the per-call timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The data connection, its health and how to open a subscription.
pub(super) struct Link {
    /// For the subscription's own connection.
    client: Client,
    /// One multiplexed connection for every call, reconnected by itself
    /// after a failure.
    manager: ConnectionManager,
    /// Bound on every call.
    timeout: Duration,
    /// `CONNECTING`, `UP` or `DOWN`.
    state: AtomicU8,
    /// When the current outage started, for the log line that ends it.
    outage_since: Mutex<Option<Instant>>,
    /// Outages since start (each warned once).
    outages: AtomicU64,
}

impl Link {
    /// A link to the server `client` names; connects lazily, so a broker
    /// starts (and serves) while Redis is still down. Needs a tokio runtime.
    pub(super) fn open(client: Client, timeout: Duration) -> redis::RedisResult<Self> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let manager = client.get_connection_manager_lazy(config)?;
        metrics::shared_mode(false);
        Ok(Self {
            client,
            manager,
            timeout,
            state: AtomicU8::new(CONNECTING),
            outage_since: Mutex::new(None),
            outages: AtomicU64::new(0),
        })
    }

    /// Whether calls go to Redis now (shared mode).
    pub(super) fn is_up(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UP
    }

    /// Runs `script` in shared mode, bounded by the timeout. `None` when not
    /// in shared mode, or when the call fails (which starts an outage).
    pub(super) async fn run<T: FromRedisValue>(
        &self,
        op: &'static str,
        script: &ScriptInvocation<'_>,
    ) -> Option<T> {
        if !self.is_up() {
            return None;
        }
        let mut connection = self.manager.clone();
        match tokio::time::timeout(self.timeout, script.invoke_async(&mut connection)).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(error)) => {
                self.failed(op, &error);
                None
            }
            Err(_) => {
                self.failed(op, &"no answer within the Redis timeout");
                None
            }
        }
    }

    /// Whether Redis answers a PING on the data connection within the
    /// timeout, whatever the mode; a failed PING has the connection manager
    /// reconnect for the next one.
    pub(super) async fn probe(&self) -> bool {
        let mut connection = self.manager.clone();
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut connection);
        matches!(tokio::time::timeout(self.timeout, ping).await, Ok(Ok(_)))
    }

    /// A new connection for the invalidation channel.
    pub(super) async fn pubsub(&self) -> Result<PubSub, String> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.client.get_async_pubsub()).await {
            Ok(Ok(pubsub)) => Ok(pubsub),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("no connection within 2 s".to_owned()),
        }
    }

    /// The call `op` failed: counted; the first failure of an outage also
    /// leaves shared mode, is counted as an outage and logged, once.
    pub(super) fn failed(&self, op: &'static str, error: &dyn Display) {
        metrics::error(op);
        let before = self.state.swap(DOWN, Ordering::SeqCst);
        if before == DOWN {
            return;
        }
        self.outages.fetch_add(1, Ordering::Relaxed);
        metrics::outage();
        metrics::shared_mode(false);
        if let Ok(mut since) = self.outage_since.lock() {
            *since = Some(Instant::now());
        }
        tracing::warn!(
            op,
            %error,
            "Redis failed or is slow: serving from this replica's cache and Auth0, with its own Auth0 budget, until Redis answers again"
        );
    }

    /// Redis answers again (or for the first time): back to shared mode.
    pub(super) fn recovered(&self) {
        let before = self.state.swap(UP, Ordering::SeqCst);
        if before == UP {
            return;
        }
        metrics::shared_mode(true);
        let lasted = self
            .outage_since
            .lock()
            .ok()
            .and_then(|mut since| since.take())
            .map(|since| since.elapsed());
        match lasted {
            Some(lasted) => tracing::info!(
                outage_secs = lasted.as_secs_f64(),
                "Redis answers again: back to shared mode"
            ),
            None => tracing::info!("connected to Redis: shared mode"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link to a port nothing listens on (never connected here).
    fn link() -> Link {
        let client = Client::open("redis://127.0.0.1:9/").unwrap();
        Link::open(client, Duration::from_millis(100)).unwrap()
    }

    #[tokio::test]
    async fn an_outage_is_one_outage_however_many_calls_fail() {
        let link = link();
        assert!(!link.is_up(), "not shared before the watcher connects");
        link.failed("claim", &"refused");
        link.failed("claim", &"refused");
        link.failed("budget", &"refused");
        assert_eq!(link.outages.load(Ordering::Relaxed), 1);
        link.recovered();
        assert!(link.is_up());
        link.failed("claim", &"timed out");
        assert!(!link.is_up());
        assert_eq!(link.outages.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn no_call_goes_to_redis_outside_shared_mode() {
        let link = link();
        let script = redis::Script::new("return 1");
        let started = Instant::now();
        let answer: Option<i64> = link.run("test", &script.prepare_invoke()).await;
        assert!(answer.is_none());
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "not even a timeout"
        );
        assert!(!link.probe().await, "nothing listens there");
    }
}
