//! The audit trail: one JSON line per RPC on a sink of its own
//! (`--audit-log`), apart from the diagnostics, with an HMAC fingerprint of
//! every released token (`TOKENBROKER_AUDIT_KEY_FILE`) so a leaked token can
//! be tied to the release that handed it out (`tokenbroker audit-hash`).
//!
//! The audit is data the broker must not lose: no token leaves before its
//! line is written, and a release whose line cannot be written is refused
//! (AUDIT_UNAVAILABLE), or its connection closed unsent (see [`ReleaseGate`]).

mod gate;
mod key;
mod record;
mod sink;

pub use gate::ReleaseGate;
pub use key::{AuditKey, FINGERPRINT_PREFIX};
pub use record::{Record, Released, RECORD_TYPE};
pub use sink::{AuditError, AuditSink, SinkTarget};

/// Longest token `audit-hash` reads from stdin.
const MAX_HASHED_TOKEN_BYTES: u64 = 64 * 1024;

/// `tokenbroker audit-hash`: the fingerprint of the token on `input` (one
/// trailing newline or surrounding whitespace ignored), as audit lines write
/// it in `token_hmac`.
pub fn fingerprint_of_input(
    key_file: &std::path::Path,
    input: impl std::io::Read,
) -> Result<String, AuditSetupError> {
    use std::io::Read;
    let key = AuditKey::from_file(key_file)?;
    let mut token = String::new();
    input
        .take(MAX_HASHED_TOKEN_BYTES)
        .read_to_string(&mut token)
        .map_err(|error| AuditSetupError::Input(error.to_string()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(AuditSetupError::Input(
            "no token on standard input".to_owned(),
        ));
    }
    Ok(key.fingerprint(token))
}

/// What the operator chose: `--audit-log` and `TOKENBROKER_AUDIT_KEY_FILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    pub target: SinkTarget,
    /// `None`: lines carry no `token_hmac`.
    pub key_file: Option<std::path::PathBuf>,
}

impl AuditSettings {
    /// No audit at all, for tests and benchmarks that do not look at it.
    pub fn off() -> Self {
        Self {
            target: SinkTarget::Off,
            key_file: None,
        }
    }

    /// Opens the sink and reads the key; a bad path or key fails at start.
    /// An audit without a key is allowed, with one warning.
    pub fn open(&self) -> Result<AuditTrail, AuditSetupError> {
        let key = match &self.key_file {
            Some(path) => Some(std::sync::Arc::new(AuditKey::from_file(path)?)),
            None => None,
        };
        let sink = AuditSink::open(&self.target)?;
        if sink.is_on() && key.is_none() {
            tracing::warn!(
                "audit lines will carry no token_hmac: set TOKENBROKER_AUDIT_KEY_FILE to tie leaked tokens to their release"
            );
        }
        Ok(AuditTrail { sink, key })
    }
}

/// Why the audit trail cannot start; names the file.
#[derive(Debug, thiserror::Error)]
pub enum AuditSetupError {
    #[error("TOKENBROKER_AUDIT_KEY_FILE {0}")]
    Key(#[from] crate::keyfile::KeyFileError),
    #[error("TOKENBROKER_AUDIT_LOG {0}")]
    Sink(#[from] AuditError),
    #[error("cannot read the token: {0}")]
    Input(String),
}

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

    /// Writes `record` with its released tokens; `Ok` once it is in the
    /// sink, or once `gate` holds the release's connection until it is (see
    /// [`AuditSink::write`]).
    pub async fn write(
        &self,
        record: &Record<'_>,
        released: &[Released<'_>],
        gate: Option<&ReleaseGate>,
    ) -> Result<(), AuditError> {
        if !self.sink.is_on() {
            return Ok(());
        }
        let line = record.to_line(released, self.key.as_deref());
        self.sink.write(&line, gate).await
    }
}
