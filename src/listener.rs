//! What one connection may cost, and the accept side that enforces it on
//! both listeners (mTLS and plaintext health).
//!
//! Without these bounds a single client could exhaust the process: streams
//! opened and never finished grew memory without limit, silent connections
//! held descriptors until the process hit "Too many open files", and a
//! connection that never spoke HTTP/2 stayed open indefinitely. So every
//! listener hands out a bounded number of connection slots (accepting waits
//! for a free one, leaving newcomers in the kernel's backlog instead of in our
//! descriptor table), a connection must send its HTTP/2 preface soon after it
//! is accepted (after the handshake, on mTLS), and accept errors back off
//! instead of spinning. The HTTP/2 limits themselves (streams, keepalive,
//! request timeout) are applied by `server` from the same [`ConnectionLimits`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

/// Length of the HTTP/2 client connection preface
/// (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`), which every gRPC client sends first.
pub const HTTP2_PREFACE_LEN: usize = 24;

/// Default for [`ConnectionLimits::max_concurrent_streams`].
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Default for [`ConnectionLimits::health_max_concurrent_streams`].
pub const DEFAULT_HEALTH_MAX_CONCURRENT_STREAMS: u32 = 16;
/// Default for [`ConnectionLimits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default for [`ConnectionLimits::max_pending_handshakes`].
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 256;

/// How much one client may hold of the broker: streams per connection,
/// connections per listener, handshakes in progress, and how long a
/// connection may stay silent at each stage. Both listeners run on one copy;
/// the health port only uses its own, lower, stream limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// HTTP/2 streams one mTLS connection may have open at once
    /// (SETTINGS_MAX_CONCURRENT_STREAMS); more are refused with REFUSED_STREAM.
    pub max_concurrent_streams: u32,
    /// The same on the plaintext health port, which needs no certificate and
    /// serves only probes, so it gets far fewer.
    pub health_max_concurrent_streams: u32,
    /// Connections open at once on each listener, handshakes included. At the
    /// cap the broker stops accepting until one closes.
    pub max_connections: usize,
    /// TLS handshakes in progress at once; beyond it new connections wait in
    /// the backlog while established ones keep working.
    pub max_pending_handshakes: usize,
    /// How long a TLS handshake may take before the connection is dropped.
    pub handshake_timeout: Duration,
    /// How long an accepted connection (after its handshake, on mTLS) may take
    /// to send the HTTP/2 preface; a silent one is closed.
    pub first_request_timeout: Duration,
    /// Idle time after which the server pings the client (HTTP/2 PING), so
    /// live but idle channels stay open and dead peers are noticed.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Upper bound on one request, from its headers to the response headers
    /// (the request body included); a request that never finishes is ended
    /// with CANCELLED. A shorter `grpc-timeout` from the client still wins.
    pub request_timeout: Duration,
}

/// Default longest TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a connection may stay silent before its HTTP/2 preface.
pub const DEFAULT_FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default interval of HTTP/2 keepalive pings.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// Default time a keepalive ping may go unanswered.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Default longest request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            health_max_concurrent_streams: DEFAULT_HEALTH_MAX_CONCURRENT_STREAMS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            first_request_timeout: DEFAULT_FIRST_REQUEST_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// A semaphore of `permits`, kept within what tokio accepts so no setting
/// can make it panic (zero would stop the listener for good, so it means one).
pub fn bounded_semaphore(permits: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(permits.clamp(1, Semaphore::MAX_PERMITS)))
}

/// Delays between failed accepts: doubling from [`AcceptBackoff::INITIAL`] to
/// [`AcceptBackoff::MAX`], reset by a successful accept. Accept fails mostly
/// when the process is out of descriptors; retrying at once would spin a core
/// and log thousands of lines while nothing can improve.
#[derive(Debug, Clone)]
pub struct AcceptBackoff {
    next_delay: Duration,
    failures: u32,
}

impl AcceptBackoff {
    /// The wait after the first failure of a burst.
    pub const INITIAL: Duration = Duration::from_millis(5);
    /// The longest wait, so accepting resumes within a second of descriptors
    /// becoming free.
    pub const MAX: Duration = Duration::from_secs(1);

    /// No failures yet.
    pub fn new() -> Self {
        Self {
            next_delay: Self::INITIAL,
            failures: 0,
        }
    }

    /// Records a failed accept; returns how long to wait before the next.
    pub fn failed(&mut self) -> Duration {
        let delay = self.next_delay;
        self.next_delay = (delay * 2).min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Records a successful accept; returns how many accepts had failed in a
    /// row before it, so the end of a burst can be logged once.
    pub fn succeeded(&mut self) -> u32 {
        let failures = self.failures;
        *self = Self::new();
        failures
    }

    /// Whether the last accept failed: only the first failure of a burst is logged.
    pub fn in_burst(&self) -> bool {
        self.failures > 0
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self::new()
    }
}

/// A TCP connection that holds one of its listener's connection slots.
pub struct Admitted {
    /// The accepted socket, not yet handshaken or served.
    pub stream: TcpStream,
    /// The client's address, for log lines about this connection.
    pub peer: SocketAddr,
    /// Frees the slot when the connection, or whatever wraps it, is dropped.
    pub slot: OwnedSemaphorePermit,
}

/// Accepts connections on one listener, at most `max_connections` open at
/// once, backing off on errors.
pub struct Acceptor {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    backoff: AcceptBackoff,
    /// Which listener, for log lines.
    name: &'static str,
}

impl Acceptor {
    /// Takes ownership of `listener`: dropping the acceptor closes the port.
    pub fn new(listener: TcpListener, max_connections: usize, name: &'static str) -> Self {
        Self {
            listener,
            slots: bounded_semaphore(max_connections),
            backoff: AcceptBackoff::new(),
            name,
        }
    }

    /// Waits for a free slot, then for a connection. While all slots are taken
    /// nothing is accepted, so the newcomer waits in the kernel's backlog and
    /// costs no descriptor. `None` only if the slots were closed, which never
    /// happens while the acceptor lives.
    pub async fn accept(&mut self) -> Option<Admitted> {
        let slot = self.slots.clone().acquire_owned().await.ok()?;
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let failed = self.backoff.succeeded();
                    if failed > 0 {
                        tracing::info!(listener = self.name, failed, "accepting connections again");
                    }
                    return Some(Admitted { stream, peer, slot });
                }
                Err(error) => self.back_off(&error).await,
            }
        }
    }

    async fn back_off(&mut self, error: &io::Error) {
        if !self.backoff.in_burst() {
            tracing::warn!(
                listener = self.name,
                %error,
                "accepting a connection failed; backing off (logged once until an accept succeeds)"
            );
        }
        tokio::time::sleep(self.backoff.failed()).await;
    }
}

/// The plaintext health listener's connections, each holding a slot and
/// closed unless it sends its HTTP/2 preface within `first_request_timeout`.
/// Dropping the stream closes the port.
pub fn plaintext_incoming(
    listener: TcpListener,
    limits: &ConnectionLimits,
) -> impl futures::Stream<Item = io::Result<LimitedStream<TcpStream>>> {
    let acceptor = Acceptor::new(listener, limits.max_connections, "health");
    let first_request_timeout = limits.first_request_timeout;
    futures::stream::unfold(acceptor, move |mut acceptor| async move {
        let admitted = acceptor.accept().await?;
        let _ = admitted.stream.set_nodelay(true);
        let stream = LimitedStream::new(admitted.stream, admitted.slot, first_request_timeout);
        Some((Ok(stream), acceptor))
    })
}

/// A connection that holds its listener slot for as long as it lives, and
/// fails its reads if the client has not sent the HTTP/2 preface in time.
///
/// The deadline is on the preface rather than the first RPC: gRPC clients
/// connect eagerly and may stay idle before their first call, and from the
/// preface on hyper's keepalive pings tell a live idle client from a dead one.
pub struct LimitedStream<S> {
    inner: S,
    preface: PrefaceDeadline,
    _slot: OwnedSemaphorePermit,
}

impl<S> LimitedStream<S> {
    /// Wraps `inner`; the preface clock starts now.
    pub fn new(inner: S, slot: OwnedSemaphorePermit, first_request_timeout: Duration) -> Self {
        Self {
            inner,
            preface: PrefaceDeadline::new(first_request_timeout),
            _slot: slot,
        }
    }
}

/// Counts down the preface bytes still expected before the timer fires.
struct PrefaceDeadline {
    missing: usize,
    /// `None` once the preface has arrived: from then on no deadline applies.
    timer: Option<Pin<Box<Sleep>>>,
}

impl PrefaceDeadline {
    fn new(timeout: Duration) -> Self {
        Self {
            missing: HTTP2_PREFACE_LEN,
            timer: Some(Box::pin(tokio::time::sleep(timeout))),
        }
    }

    /// Notes `read` more bytes; an error if the preface is still incomplete
    /// and the deadline has passed while the read waits.
    fn check(&mut self, read: usize, waiting: bool, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(timer) = self.timer.as_mut() else {
            return Ok(());
        };
        self.missing = self.missing.saturating_sub(read);
        if self.missing == 0 {
            self.timer = None;
            return Ok(());
        }
        if waiting && timer.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface within the first-request timeout",
            ));
        }
        Ok(())
    }
}

impl<S: Connected> Connected for LimitedStream<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> S::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LimitedStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if let Err(error) = this.preface.check(read, polled.is_pending(), cx) {
            tracing::debug!(%error, "closing a connection that sent no HTTP/2 preface");
            return Poll::Ready(Err(error));
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LimitedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn accept_backoff_doubles_from_a_few_milliseconds_up_to_a_second() {
        let mut backoff = AcceptBackoff::new();
        let delays: Vec<Duration> = (0..10).map(|_| backoff.failed()).collect();
        assert_eq!(delays[0], Duration::from_millis(5));
        assert_eq!(delays[1], Duration::from_millis(10));
        assert_eq!(delays[2], Duration::from_millis(20));
        for pair in delays.windows(2) {
            assert!(pair[1] == pair[0] * 2 || pair[1] == AcceptBackoff::MAX);
        }
        assert_eq!(delays[9], AcceptBackoff::MAX, "capped at one second");
        assert_eq!(backoff.failed(), AcceptBackoff::MAX, "and stays there");
    }

    #[test]
    fn accept_backoff_reports_the_burst_once_and_starts_over() {
        let mut backoff = AcceptBackoff::new();
        assert!(!backoff.in_burst());
        backoff.failed();
        backoff.failed();
        assert!(backoff.in_burst());
        assert_eq!(backoff.succeeded(), 2);
        assert!(!backoff.in_burst());
        assert_eq!(backoff.succeeded(), 0);
        assert_eq!(backoff.failed(), AcceptBackoff::INITIAL);
    }

    #[test]
    fn no_setting_makes_the_semaphore_panic_or_stall() {
        assert_eq!(bounded_semaphore(0).available_permits(), 1);
        assert_eq!(
            bounded_semaphore(usize::MAX).available_permits(),
            Semaphore::MAX_PERMITS
        );
    }

    fn slot() -> OwnedSemaphorePermit {
        bounded_semaphore(1)
            .try_acquire_owned()
            .expect("a free slot")
    }

    #[tokio::test(start_paused = true)]
    async fn silent_connection_fails_its_read_at_the_first_request_timeout() {
        let (_client, server) = tokio::io::duplex(64);
        let mut stream = LimitedStream::new(server, slot(), Duration::from_millis(300));
        let mut buf = [0u8; 8];
        let error = stream.read(&mut buf).await.expect_err("timed out");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn connection_that_sent_its_preface_may_then_stay_idle() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut stream = LimitedStream::new(server, slot(), Duration::from_millis(300));
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("write");
        let mut preface = [0u8; HTTP2_PREFACE_LEN];
        stream.read_exact(&mut preface).await.expect("preface");
        let mut buf = [0u8; 8];
        let idle = tokio::time::timeout(Duration::from_secs(3600), stream.read(&mut buf)).await;
        assert!(idle.is_err(), "still waiting for data an hour later");
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_preface_does_not_stop_the_clock() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut stream = LimitedStream::new(server, slot(), Duration::from_millis(300));
        client.write_all(b"PRI * ").await.expect("write");
        let mut buf = [0u8; 64];
        assert_eq!(stream.read(&mut buf).await.expect("first bytes"), 6);
        let error = stream.read(&mut buf).await.expect_err("timed out");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn the_slot_is_freed_when_the_connection_is_dropped() {
        let slots = bounded_semaphore(1);
        let (_client, server) = tokio::io::duplex(64);
        let permit = slots.clone().try_acquire_owned().expect("free");
        let stream = LimitedStream::new(server, permit, Duration::from_secs(5));
        assert_eq!(slots.available_permits(), 0);
        drop(stream);
        assert_eq!(slots.available_permits(), 1);
    }
}
