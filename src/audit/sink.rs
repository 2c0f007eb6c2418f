//! Where audit lines go: stdout, a file, or nowhere, written by one thread of
//! its own so no RPC waits on disk I/O, and never lossy.
//!
//! An RPC appends its line to the waiting batch (a shared buffer, bounded in
//! bytes) and waits (asynchronously) until the writer says the batch is
//! written; the writer takes the whole batch, writes it with one system
//! call, and answers every line of it at once. A release whose line cannot
//! be written is refused (AUDIT_UNAVAILABLE) and its token is not returned:
//! the audit never silently loses a release. A file sink is reopened at the
//! writer's next batch after SIGHUP (logrotate's `create` mode: rename,
//! then SIGHUP), and synced to disk on shutdown.
//!
//! Why batches and not a queue of lines: under load the cost of an audit
//! line is not formatting it (half a microsecond) but handing it to another
//! thread and back. Here a line costs an append under a short lock; the
//! writer is woken only when it sleeps, and answers a batch with one wake
//! per waiting RPC or connection and no allocation per line.
//!
//! While writes succeed, a release served over a connection with a
//! [`ReleaseGate`] does not wait at all: its connection's bytes wait for the
//! batch instead (see [`super::gate`]). The sink starts in the waiting mode
//! and returns to it after any failed write, until a write succeeds, so a
//! sink that cannot write (a full disk, `/dev/full`) refuses releases with
//! AUDIT_UNAVAILABLE. A watchdog fails a batch whose write hangs past
//! [`WRITE_TIMEOUT`], so a hung disk closes the connections it holds.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use super::gate::ReleaseGate;
use crate::stats;

/// Bytes of lines waiting for the writer at most (some ten thousand lines);
/// beyond it RPCs wait for room.
const MAX_WAITING_BYTES: usize = 4 * 1024 * 1024;
/// How long the writer gathers lines after a write before it takes the
/// next batch. Waking a sleeping thread costs a cross-CPU interrupt (some
/// microseconds on a VM); without this pause each line of a busy broker
/// would wake the writer, and the releases would pay for it. A release waits
/// at most this much longer; an idle broker's first line wakes the writer
/// at once.
const GATHER: Duration = Duration::from_micros(200);
/// Longest an RPC waits for its line to be written before it gives up,
/// and longest a write may hang before the watchdog fails its batch (a disk
/// that hangs must not hang every release with it).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the watchdog looks at the write under way.
const WATCHDOG_PERIOD: Duration = Duration::from_secs(1);

/// Where `--audit-log` sends the lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkTarget {
    Off,
    Stdout,
    File(PathBuf),
}

impl FromStr for SinkTarget {
    type Err = std::convert::Infallible;

    /// `off`, `stdout`, or any other text as a file path.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "off" => Self::Off,
            "stdout" | "-" => Self::Stdout,
            path => Self::File(PathBuf::from(path)),
        })
    }
}

/// Why the audit cannot take a line.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("the audit line could not be written")]
    WriteFailed,
    #[error("the audit writer did not confirm the line in time")]
    TimedOut,
    #[error("the audit writer has stopped")]
    Stopped,
}

/// A batch's outcome, as [`Batch::outcome`] holds it.
const PENDING: u8 = 0;
const WRITTEN: u8 = 1;
const FAILED: u8 = 2;

/// One write of the writer: the lines appended since the previous one.
/// Their RPCs, or their connections' gates, wait on it.
pub(super) struct Batch {
    /// Batches are numbered from 1 in the order they are written.
    pub(super) seq: u64,
    /// The sequence number of the sink's latest failed batch (0: none),
    /// shared by all its batches: a gate holding several batches learns
    /// that one of them failed even if a later one did not.
    pub(super) last_failed: Arc<AtomicU64>,
    outcome: AtomicU8,
    /// Releases waiting for their own line.
    done: Notify,
    /// Connections whose bytes wait for the batch.
    gates: Mutex<Vec<Waker>>,
}

impl Batch {
    pub(super) fn new(seq: u64, last_failed: Arc<AtomicU64>) -> Arc<Self> {
        Arc::new(Self {
            seq,
            last_failed,
            outcome: AtomicU8::new(PENDING),
            done: Notify::new(),
            gates: Mutex::new(Vec::new()),
        })
    }

    /// Answers every line of the batch, once: the watchdog may have failed
    /// it before the writer came back.
    pub(super) fn finish(&self, written: bool) {
        if !written {
            self.last_failed.fetch_max(self.seq, Ordering::AcqRel);
        }
        let outcome = if written { WRITTEN } else { FAILED };
        if self
            .outcome
            .compare_exchange(PENDING, outcome, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        self.done.notify_waiters();
        let gates = std::mem::take(&mut *self.gates.lock().unwrap_or_else(PoisonError::into_inner));
        for gate in gates {
            gate.wake();
        }
    }

    /// Whether the batch was written, once it is over; until then `None`,
    /// and `waker` is woken when it is.
    pub(super) fn outcome_or_wake(&self, waker: &Waker) -> Option<bool> {
        if let Some(written) = self.outcome() {
            return Some(written);
        }
        let mut gates = self.gates.lock().unwrap_or_else(PoisonError::into_inner);
        // Looked at again under the lock `finish` takes to wake: a finish in
        // between is not missed.
        if let Some(written) = self.outcome() {
            return Some(written);
        }
        if !gates.iter().any(|gate| gate.will_wake(waker)) {
            gates.push(waker.clone());
        }
        None
    }

    fn outcome(&self) -> Option<bool> {
        match self.outcome.load(Ordering::Acquire) {
            PENDING => None,
            outcome => Some(outcome == WRITTEN),
        }
    }

    /// Whether the batch was written, once it is over.
    async fn written(&self) -> bool {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            // Registered before looking, so a finish in between is not missed.
            notified.as_mut().enable();
            match self.outcome() {
                None => notified.await,
                Some(written) => return written,
            }
        }
    }
}

/// What waits for the writer.
struct Waiting {
    /// The lines of `batch`, one after the other.
    bytes: Vec<u8>,
    lines: u64,
    batch: Arc<Batch>,
    /// The last write succeeded: releases may leave the waiting to their
    /// connection's gate. False at start and after a failed write.
    writing_well: bool,
    /// Sync requests: answered once everything before them is on disk.
    syncs: Vec<oneshot::Sender<bool>>,
    /// The writer sleeps on the condition variable: the next append wakes it.
    writer_asleep: bool,
    /// Every sink handle is gone: write what is left, sync, stop.
    closed: bool,
}

/// What the sink handles and the writer share.
struct Shared {
    waiting: Mutex<Waiting>,
    wake_writer: Condvar,
    reopen: AtomicBool,
    /// The batch being written and since when, for the watchdog.
    writing: Mutex<Option<(Instant, Arc<Batch>)>>,
}

/// A line in the waiting batch.
struct Appended {
    batch: Arc<Batch>,
    /// The sink writes well: the release may leave the wait to its gate.
    may_gate: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `line` to the waiting batch if there is room; `Err` with the
    /// batch to wait for when there is none.
    fn try_append(&self, line: &[u8]) -> Result<Appended, Arc<Batch>> {
        let mut waiting = self.lock();
        if waiting.bytes.len() >= MAX_WAITING_BYTES {
            return Err(waiting.batch.clone());
        }
        waiting.bytes.extend_from_slice(line);
        waiting.lines += 1;
        let appended = Appended {
            batch: waiting.batch.clone(),
            may_gate: waiting.writing_well,
        };
        let wake = std::mem::take(&mut waiting.writer_asleep);
        drop(waiting);
        if wake {
            self.wake_writer.notify_one();
        }
        Ok(appended)
    }

    /// Appends `line`, waiting (asynchronously) for room: a flood slows its
    /// senders instead of growing memory.
    async fn append(&self, line: &[u8]) -> Appended {
        loop {
            match self.try_append(line) {
                Ok(appended) => return appended,
                // Room comes when the full batch is written.
                Err(full) => {
                    full.written().await;
                }
            }
        }
    }
}

/// Marks the sink closed when the last handle goes, so the writer finishes.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake_writer.notify_one();
    }
}

/// The audit sink; cheap to clone (clones share the writer).
#[derive(Clone)]
pub struct AuditSink {
    /// `None` when the audit is off.
    handle: Option<Arc<Handle>>,
}

impl AuditSink {
    /// Opens the sink (a file is opened now, so a bad path fails at start)
    /// and starts its writer thread.
    pub fn open(target: &SinkTarget) -> Result<Self, AuditError> {
        let output = match target {
            SinkTarget::Off => return Ok(Self::off()),
            SinkTarget::Stdout => Output::Stdout,
            SinkTarget::File(path) => Output::File {
                file: open_append(path)?,
                path: path.clone(),
            },
        };
        let last_failed = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(Shared {
            waiting: Mutex::new(Waiting {
                bytes: Vec::with_capacity(64 * 1024),
                lines: 0,
                batch: Batch::new(1, last_failed),
                writing_well: false,
                syncs: Vec::new(),
                writer_asleep: false,
                closed: false,
            }),
            wake_writer: Condvar::new(),
            reopen: AtomicBool::new(false),
            writing: Mutex::new(None),
        });
        let writer = Writer {
            shared: shared.clone(),
            output,
        };
        let watched = Arc::downgrade(&shared);
        spawn_thread("audit-writer", move || writer.run())?;
        spawn_thread("audit-watchdog", move || watch(&watched))?;
        Ok(Self {
            handle: Some(Arc::new(Handle { shared })),
        })
    }

    /// No audit lines at all (`--audit-log off`).
    pub fn off() -> Self {
        Self { handle: None }
    }

    /// Whether lines are written at all; when not, none need be made.
    pub fn is_on(&self) -> bool {
        self.handle.is_some()
    }

    fn shared(&self) -> Option<&Shared> {
        self.handle.as_deref().map(|handle| &*handle.shared)
    }

    /// Writes the line of a release (one JSON object and a newline). `Ok`
    /// means the line is written, or, while the sink writes well, that
    /// `gate` holds the release's connection until it is: either way the
    /// token may be handed to the connection. Without a gate the release
    /// waits for its line.
    pub async fn write(&self, line: &[u8], gate: Option<&ReleaseGate>) -> Result<(), AuditError> {
        let Some(shared) = self.shared() else {
            return Ok(());
        };
        let appended = shared.append(line).await;
        if let (true, Some(gate)) = (appended.may_gate, gate) {
            gate.hold(appended.batch);
            return Ok(());
        }
        let written = async {
            if appended.batch.written().await {
                Ok(())
            } else {
                Err(AuditError::WriteFailed)
            }
        };
        tokio::time::timeout(WRITE_TIMEOUT, written)
            .await
            .unwrap_or(Err(AuditError::TimedOut))
    }

    /// Hands `line` to the writer without waiting for it to be written: for
    /// refusals, which release nothing. Waits (asynchronously) for room, so
    /// a flood of refusals slows its senders instead of growing memory. A
    /// line the writer then fails to write is counted and logged by the
    /// writer.
    pub async fn write_detached(&self, line: Vec<u8>) {
        if let Some(shared) = self.shared() {
            shared.append(&line).await;
        }
    }

    /// Like [`Self::write_detached`] where nothing can wait: with no room
    /// the line is dropped, counted and logged, never silently.
    pub fn try_write_detached(&self, line: Vec<u8>) {
        let Some(shared) = self.shared() else { return };
        if shared.try_append(&line).is_err() {
            stats::audit_lines(1, false);
            tracing::warn!("audit queue full: the line of a refused request was dropped");
        }
    }

    /// Asks a file sink to reopen its path before its next write (SIGHUP
    /// after logrotate moved the file away).
    pub fn reopen(&self) {
        if let Some(shared) = self.shared() {
            shared.reopen.store(true, Ordering::Relaxed);
        }
    }

    /// Flushes and fsyncs every line written so far (at shutdown).
    pub async fn sync(&self) -> Result<(), AuditError> {
        let Some(shared) = self.shared() else {
            return Ok(());
        };
        let (done, synced) = oneshot::channel();
        {
            let mut waiting = shared.lock();
            waiting.syncs.push(done);
            waiting.writer_asleep = false;
        }
        shared.wake_writer.notify_one();
        match synced.await {
            Ok(true) => Ok(()),
            Ok(false) => Err(AuditError::WriteFailed),
            Err(_) => Err(AuditError::Stopped),
        }
    }
}

fn spawn_thread(name: &str, run: impl FnOnce() + Send + 'static) -> Result<(), AuditError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(run)
        .map(drop)
        .map_err(|error| AuditError::Open {
            path: PathBuf::from(format!("({name} thread)")),
            reason: error.to_string(),
        })
}

fn open_append(path: &Path) -> Result<File, AuditError> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path).map_err(|error| AuditError::Open {
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

enum Output {
    Stdout,
    File { file: File, path: PathBuf },
}

impl Output {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            // The process-wide stdout lock: diagnostics written to stdout at
            // the same time never land inside an audit line.
            Self::Stdout => {
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(bytes)?;
                stdout.flush()
            }
            Self::File { file, .. } => file.write_all(bytes),
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        match self {
            Self::Stdout => std::io::stdout().lock().flush(),
            Self::File { file, .. } => file.sync_all(),
        }
    }

    /// Opens the path anew (logrotate moved the old file); keeps the old
    /// file when the new one cannot be opened.
    fn reopen(&mut self) {
        let Self::File { file, path } = self else {
            return;
        };
        match open_append(path) {
            Ok(reopened) => {
                let _ = file.sync_all();
                *file = reopened;
                tracing::info!(path = %path.display(), "audit log reopened");
            }
            Err(error) => {
                tracing::error!(%error, "audit log not reopened: still writing to the old file")
            }
        }
    }
}

struct Writer {
    shared: Arc<Shared>,
    output: Output,
}

/// What the writer takes from [`Waiting`] for one write.
struct Taken {
    lines: u64,
    batch: Arc<Batch>,
    syncs: Vec<oneshot::Sender<bool>>,
}

impl Writer {
    /// Until every handle is gone and everything is written: take the
    /// waiting batch, write it, answer it.
    fn run(mut self) {
        let mut bytes = Vec::with_capacity(64 * 1024);
        while let Some(taken) = self.take(&mut bytes) {
            if self.shared.reopen.swap(false, Ordering::Relaxed) {
                self.output.reopen();
            }
            let lines = taken.lines;
            self.write(&bytes, taken);
            bytes.clear();
            if lines > 0 {
                // Under load, gather the next batch for a moment instead of
                // having the next RPC wake this thread: see [`GATHER`].
                std::thread::sleep(GATHER);
            }
        }
        let _ = self.output.sync();
    }

    /// Sleeps until something waits, then swaps the waiting lines into
    /// `bytes` (handing back its emptied buffer, so neither side
    /// allocates). `None` once closed and drained.
    fn take(&self, bytes: &mut Vec<u8>) -> Option<Taken> {
        let mut waiting = self.shared.lock();
        loop {
            if !waiting.bytes.is_empty() || !waiting.syncs.is_empty() {
                break;
            }
            if waiting.closed {
                return None;
            }
            waiting.writer_asleep = true;
            waiting = self
                .shared
                .wake_writer
                .wait(waiting)
                .unwrap_or_else(PoisonError::into_inner);
        }
        waiting.writer_asleep = false;
        let fresh = Batch::new(waiting.batch.seq + 1, waiting.batch.last_failed.clone());
        std::mem::swap(bytes, &mut waiting.bytes);
        Some(Taken {
            lines: std::mem::take(&mut waiting.lines),
            batch: std::mem::replace(&mut waiting.batch, fresh),
            syncs: std::mem::take(&mut waiting.syncs),
        })
    }

    /// Tells the watchdog which batch is being written, from now.
    fn watch_write(&self, batch: Option<&Arc<Batch>>) {
        *self
            .shared
            .writing
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            batch.map(|batch| (Instant::now(), batch.clone()));
    }

    /// Writes one batch with one call, answers its lines, then its syncs.
    fn write(&mut self, bytes: &[u8], taken: Taken) {
        self.watch_write(Some(&taken.batch));
        let written = bytes.is_empty() || self.output.write_all(bytes).is_ok();
        self.watch_write(None);
        if taken.lines > 0 {
            self.shared.lock().writing_well = written;
            stats::audit_lines(taken.lines, written);
            if !written {
                tracing::error!(
                    lines = taken.lines,
                    "audit lines could not be written: their releases were refused (AUDIT_UNAVAILABLE) or their connections closed with the answers unsent"
                );
            }
        }
        taken.batch.finish(written);
        if !taken.syncs.is_empty() {
            let synced = written && self.output.sync().is_ok();
            for sync in taken.syncs {
                let _ = sync.send(synced);
            }
        }
    }
}

/// The watchdog: fails a batch whose write has hung for [`WRITE_TIMEOUT`],
/// so the connections it holds are closed (their tokens unsent) and new
/// releases wait for their own line (and time out) until a write succeeds.
/// Ends with the sink.
fn watch(shared: &Weak<Shared>) {
    loop {
        std::thread::sleep(WATCHDOG_PERIOD);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let hung = shared
            .writing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .filter(|(since, _)| since.elapsed() >= WRITE_TIMEOUT)
            .map(|(_, batch)| batch.clone());
        if let Some(batch) = hung {
            shared.lock().writing_well = false;
            if batch.outcome().is_none() {
                tracing::error!(
                    "an audit write has hung for {WRITE_TIMEOUT:?}: its releases are refused and their connections closed"
                );
            }
            batch.finish(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_reach_the_file_and_survive_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let sink = AuditSink::open(&SinkTarget::File(path.clone())).unwrap();
        sink.write(b"{\"n\":1}\n", None).await.unwrap();
        std::fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
        sink.write(b"{\"n\":2}\n", None).await.unwrap();
        sink.reopen();
        sink.write(b"{\"n\":3}\n", None).await.unwrap();
        sink.sync().await.unwrap();
        let old = std::fs::read_to_string(dir.path().join("audit.log.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!(old, "{\"n\":1}\n{\"n\":2}\n");
        assert_eq!(new, "{\"n\":3}\n");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_sink_that_cannot_write_says_so_for_every_line() {
        let sink = AuditSink::open(&SinkTarget::File(PathBuf::from("/dev/full"))).unwrap();
        assert!(matches!(
            sink.write(b"{}\n", None).await,
            Err(AuditError::WriteFailed)
        ));
    }

    #[tokio::test]
    async fn releases_wait_for_their_line_until_a_write_succeeds_then_their_gate_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let sink = AuditSink::open(&SinkTarget::File(path.clone())).unwrap();
        let gate = ReleaseGate::default();
        let noop = &mut std::task::Context::from_waker(std::task::Waker::noop());

        sink.write(b"{\"n\":1}\n", Some(&gate)).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"n\":1}\n");
        assert!(
            gate.poll_open(noop).is_ready(),
            "the first line is waited for: the sink has not written yet"
        );

        sink.write(b"{\"n\":2}\n", Some(&gate)).await.unwrap();
        let opened = std::future::poll_fn(|cx| gate.poll_open(cx)).await;
        assert!(opened.is_ok());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"n\":1}\n{\"n\":2}\n",
            "the gate opens only once the line is written"
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_sink_that_cannot_write_never_leaves_a_release_to_its_gate() {
        let sink = AuditSink::open(&SinkTarget::File(PathBuf::from("/dev/full"))).unwrap();
        let gate = ReleaseGate::default();
        for _ in 0..3 {
            assert!(matches!(
                sink.write(b"{}\n", Some(&gate)).await,
                Err(AuditError::WriteFailed)
            ));
        }
    }

    #[test]
    fn targets_parse() {
        assert_eq!("off".parse::<SinkTarget>().unwrap(), SinkTarget::Off);
        assert_eq!("stdout".parse::<SinkTarget>().unwrap(), SinkTarget::Stdout);
        assert_eq!(
            "/var/log/a".parse::<SinkTarget>().unwrap(),
            SinkTarget::File(PathBuf::from("/var/log/a"))
        );
    }
}
