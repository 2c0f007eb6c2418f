//! Where audit lines go: stdout, a file, or nowhere, written by one thread of
//! its own so no RPC waits on disk I/O, and never lossy.
//!
//! An RPC hands its line over a bounded queue and waits (asynchronously)
//! for the writer to say it is written; the writer takes every line that is
//! waiting, writes them in one go, and answers each. A release whose line
//! cannot be written is refused (AUDIT_UNAVAILABLE) and its token is not
//! returned: the audit never silently loses a release. A file sink is
//! reopened at the writer's next batch after SIGHUP (logrotate's `create`
//! mode: rename, then SIGHUP), and synced to disk on shutdown.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::stats;

/// Lines waiting for the writer at most; beyond it RPCs wait for room.
const QUEUE_LINES: usize = 8192;
/// Lines the writer takes for one write.
const MAX_BATCH: usize = 1024;
/// Longest an RPC waits for its line to be written before it gives up
/// (a disk that hangs must not hang every release with it).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

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

enum Message {
    Line {
        bytes: Vec<u8>,
        written: oneshot::Sender<bool>,
    },
    /// Flush and fsync everything before it; answered when done.
    Sync { done: oneshot::Sender<bool> },
}

/// The audit sink; cheap to clone (clones share the writer).
#[derive(Clone)]
pub struct AuditSink {
    /// `None` when the audit is off.
    queue: Option<mpsc::Sender<Message>>,
    reopen: Arc<AtomicBool>,
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
        let (queue, receiver) = mpsc::channel(QUEUE_LINES);
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            receiver,
            output,
            reopen: reopen.clone(),
        };
        std::thread::Builder::new()
            .name("audit-writer".to_owned())
            .spawn(move || writer.run())
            .map_err(|error| AuditError::Open {
                path: PathBuf::from("(writer thread)"),
                reason: error.to_string(),
            })?;
        Ok(Self {
            queue: Some(queue),
            reopen,
        })
    }

    /// No audit lines at all (`--audit-log off`).
    pub fn off() -> Self {
        Self {
            queue: None,
            reopen: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether lines are written at all; when not, none need be made.
    pub fn is_on(&self) -> bool {
        self.queue.is_some()
    }

    /// Writes `line` (one JSON object and a newline) and waits until the
    /// writer has written it: an `Ok` means the line is in the sink.
    pub async fn write(&self, line: Vec<u8>) -> Result<(), AuditError> {
        let Some(queue) = &self.queue else {
            return Ok(());
        };
        let (written, confirmed) = oneshot::channel();
        let handed_over = async {
            queue
                .send(Message::Line {
                    bytes: line,
                    written,
                })
                .await
                .map_err(|_| AuditError::Stopped)?;
            match confirmed.await {
                Ok(true) => Ok(()),
                Ok(false) => Err(AuditError::WriteFailed),
                Err(_) => Err(AuditError::Stopped),
            }
        };
        tokio::time::timeout(WRITE_TIMEOUT, handed_over)
            .await
            .unwrap_or(Err(AuditError::TimedOut))
    }

    /// Hands `line` to the writer without waiting for it to be written: for
    /// refusals, which release nothing. Waits (asynchronously) for room in
    /// the queue, so a flood of refusals slows its senders instead of
    /// growing memory. A line the writer then fails to write is counted and
    /// logged by the writer.
    pub async fn write_detached(&self, line: Vec<u8>) {
        let Some(queue) = &self.queue else { return };
        let (written, _unread) = oneshot::channel();
        let message = Message::Line {
            bytes: line,
            written,
        };
        if queue.send(message).await.is_err() {
            stats::audit_lines(1, false);
        }
    }

    /// Like [`Self::write_detached`] where nothing can wait: a full queue
    /// drops the line, counted and logged, never silently.
    pub fn try_write_detached(&self, line: Vec<u8>) {
        let Some(queue) = &self.queue else { return };
        let (written, _unread) = oneshot::channel();
        let message = Message::Line {
            bytes: line,
            written,
        };
        if queue.try_send(message).is_err() {
            stats::audit_lines(1, false);
            tracing::warn!("audit queue full: the line of a refused request was dropped");
        }
    }

    /// Asks a file sink to reopen its path before its next write (SIGHUP
    /// after logrotate moved the file away).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    /// Flushes and fsyncs every line written so far (at shutdown).
    pub async fn sync(&self) -> Result<(), AuditError> {
        let Some(queue) = &self.queue else {
            return Ok(());
        };
        let (done, synced) = oneshot::channel();
        queue
            .send(Message::Sync { done })
            .await
            .map_err(|_| AuditError::Stopped)?;
        match synced.await {
            Ok(true) => Ok(()),
            Ok(false) => Err(AuditError::WriteFailed),
            Err(_) => Err(AuditError::Stopped),
        }
    }
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
    receiver: mpsc::Receiver<Message>,
    output: Output,
    reopen: Arc<AtomicBool>,
}

impl Writer {
    /// Until every sender is gone: take what is waiting, write it, answer.
    fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut bytes = Vec::with_capacity(64 * 1024);
        while let Some(first) = self.receiver.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match self.receiver.try_recv() {
                    Ok(message) => batch.push(message),
                    Err(_) => break,
                }
            }
            if self.reopen.swap(false, Ordering::Relaxed) {
                self.output.reopen();
            }
            self.write_batch(&mut batch, &mut bytes);
        }
        let _ = self.output.sync();
    }

    fn write_batch(&mut self, batch: &mut Vec<Message>, bytes: &mut Vec<u8>) {
        bytes.clear();
        let mut wants_sync = false;
        for message in batch.iter_mut() {
            match message {
                Message::Line { bytes: line, .. } => bytes.extend_from_slice(line),
                Message::Sync { .. } => wants_sync = true,
            }
        }
        let mut ok = self.output.write_all(bytes).is_ok();
        if ok && wants_sync {
            ok = self.output.sync().is_ok();
        }
        let lines = batch
            .iter()
            .filter(|m| matches!(m, Message::Line { .. }))
            .count();
        if ok {
            stats::audit_lines(lines as u64, true);
        } else {
            stats::audit_lines(lines as u64, false);
            tracing::error!(
                lines,
                "audit lines could not be written: their releases were refused (AUDIT_UNAVAILABLE)"
            );
        }
        for message in batch.drain(..) {
            let answer = match message {
                Message::Line { written, .. } => written,
                Message::Sync { done } => done,
            };
            let _ = answer.send(ok);
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
        sink.write(b"{\"n\":1}\n".to_vec()).await.unwrap();
        std::fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
        sink.write(b"{\"n\":2}\n".to_vec()).await.unwrap();
        sink.reopen();
        sink.write(b"{\"n\":3}\n".to_vec()).await.unwrap();
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
            sink.write(b"{}\n".to_vec()).await,
            Err(AuditError::WriteFailed)
        ));
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
