//! The audit trail: one JSON line per RPC on a sink of its own
//! (`--audit-log`), apart from the diagnostics, with an HMAC fingerprint of
//! every released token (`TOKENBROKER_AUDIT_KEY_FILE`) so a leaked token can
//! be tied to the release that handed it out (`tokenbroker audit-hash`).
//!
//! The audit is data the broker must not lose: a release whose line cannot be
//! written is refused (AUDIT_UNAVAILABLE) and its token is not returned.

mod key;
mod record;
mod sink;

pub use key::{AuditKey, FINGERPRINT_PREFIX};
pub use record::{Record, Released, RECORD_TYPE};
pub use sink::{AuditError, AuditSink, SinkTarget};

/// The audit trail in force: where lines go and the key of fingerprints.
#[derive(Clone)]
pub struct AuditTrail {
    pub sink: AuditSink,
    /// `None`: lines carry no `token_hmac` (warned about at start).
    pub key: Option<std::sync::Arc<AuditKey>>,
}

impl AuditTrail {
    /// No audit lines (`--audit-log off`), for tests and benchmarks that
    /// measure without it.
    pub fn off() -> Self {
        Self {
            sink: AuditSink::off(),
            key: None,
        }
    }

    /// Writes `record` with its released tokens; `Ok` once it is in the sink.
    pub async fn write(
        &self,
        record: &Record<'_>,
        released: &[Released<'_>],
    ) -> Result<(), AuditError> {
        if !self.sink.is_on() {
            return Ok(());
        }
        let line = record.to_line(released, self.key.as_deref());
        self.sink.write(line).await
    }
}
