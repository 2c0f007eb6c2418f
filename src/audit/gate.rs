//! Holds a connection's outgoing bytes until the audit lines of the tokens
//! in them are written, so a release need not wait on its own.
//!
//! Waiting in each release (suspend the RPC, wake it from the writer thread)
//! costs every release a second scheduling and breaks up the HTTP/2
//! connection's batching of responses; measured, that cost more than the
//! audit line itself. So while the sink writes without error a release only
//! appends its line and marks its connection: the response is built and
//! queued at once, but [`ReleaseGate::poll_open`] (called by the
//! connection's `poll_write`, below HTTP/2 and above TLS) holds every byte of
//! the connection until the newest batch holding one of its lines is
//! written. A token is never encrypted, let alone sent, before its line is
//! in the sink.
//!
//! New releases on a held connection join its hold, so a busy connection
//! waits for its newest batch, not the one it first waited for. That wait is
//! bounded: while its bytes are held the client receives nothing, so no
//! stream of its completes and it can have at most its stream limit (256
//! on the main listener) in flight; once they are all in, the newest batch
//! is written within a batch cycle. (Making releases on a held connection
//! wait for their own line instead was measured: 0.66–0.68× of the bare
//! server against 0.71–0.73×, and a worse p99.)
//!
//! If a batch fails, every connection with a line in it (or in any batch
//! since its oldest held line) is closed with an error: its responses, the
//! token among them, never leave the process, and the caller sees
//! UNAVAILABLE. The sink then stops gating ([`super::AuditSink`] makes
//! releases wait for their own line again, refused with AUDIT_UNAVAILABLE
//! when it is not written) until a write succeeds.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use super::sink::Batch;

/// One connection's held lines: see the module docs.
#[derive(Default)]
pub struct ReleaseGate {
    held: Mutex<Option<Held>>,
}

/// The batches a connection waits for: all from `oldest` to `newest`'s.
struct Held {
    /// Sequence number of the batch of the oldest line not yet confirmed.
    oldest: u64,
    /// The newest batch with a line of this connection. Batches are written
    /// in order, so once it is over, so are all before it.
    newest: Arc<Batch>,
}

impl ReleaseGate {
    /// A new connection's gate: nothing held.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The connection's next bytes wait for `batch` (and every batch
    /// before it still being written).
    pub(super) fn hold(&self, batch: Arc<Batch>) {
        let mut held = self.lock();
        match held.as_mut() {
            Some(held) => held.newest = batch,
            None => {
                *held = Some(Held {
                    oldest: batch.seq,
                    newest: batch,
                })
            }
        }
    }

    /// Ready once every held line is written; an error (the connection is
    /// to be closed, its responses unsent) when one could not be.
    pub fn poll_open(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut held = self.lock();
        let Some(waiting) = held.as_ref() else {
            return Poll::Ready(Ok(()));
        };
        let Some(written) = waiting.newest.outcome_or_wake(cx.waker()) else {
            return Poll::Pending;
        };
        let oldest = waiting.oldest;
        let failed_since = waiting.newest.last_failed.load(Ordering::Acquire) >= oldest;
        *held = None;
        if written && !failed_since {
            Poll::Ready(Ok(()))
        } else {
            Poll::Ready(Err(io::Error::other(
                "the audit lines of this connection's releases could not be written",
            )))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for ReleaseGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseGate")
            .field("holding", &self.lock().is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::task::Waker;

    use super::*;

    fn batches(count: u64) -> Vec<Arc<Batch>> {
        let last_failed = Arc::new(AtomicU64::new(0));
        (1..=count)
            .map(|seq| Batch::new(seq, last_failed.clone()))
            .collect()
    }

    fn poll(gate: &ReleaseGate) -> Poll<io::Result<()>> {
        gate.poll_open(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn a_connection_with_nothing_held_writes_at_once() {
        assert!(matches!(poll(&ReleaseGate::default()), Poll::Ready(Ok(()))));
    }

    #[test]
    fn a_held_connection_writes_once_its_newest_batch_is_written() {
        let [first, second] = <[_; 2]>::try_from(batches(2)).ok().unwrap();
        let gate = ReleaseGate::default();
        gate.hold(first.clone());
        gate.hold(second.clone());
        assert!(poll(&gate).is_pending());
        first.finish(true);
        assert!(
            poll(&gate).is_pending(),
            "the newer line is not written yet"
        );
        second.finish(true);
        assert!(matches!(poll(&gate), Poll::Ready(Ok(()))));
        assert!(matches!(poll(&gate), Poll::Ready(Ok(()))), "released");
    }

    #[test]
    fn a_failed_batch_closes_the_connection_even_when_a_later_one_was_written() {
        let [first, second, third] = <[_; 3]>::try_from(batches(3)).ok().unwrap();
        let gate = ReleaseGate::default();
        gate.hold(first.clone());
        gate.hold(third.clone());
        first.finish(true);
        second.finish(false);
        third.finish(true);
        assert!(
            matches!(poll(&gate), Poll::Ready(Err(_))),
            "a line between the oldest and the newest held may be the failed one"
        );
    }

    #[test]
    fn a_failure_before_the_oldest_held_line_does_not_close_the_connection() {
        let [first, second] = <[_; 2]>::try_from(batches(2)).ok().unwrap();
        first.finish(false);
        let gate = ReleaseGate::default();
        gate.hold(second.clone());
        second.finish(true);
        assert!(matches!(poll(&gate), Poll::Ready(Ok(()))));
    }
}
