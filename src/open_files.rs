//! The process's open-file limit. Containers commonly start with a soft
//! `RLIMIT_NOFILE` of 1024 while the hard limit is far higher; at 1024 a
//! thousand silent connections were enough to make `accept` fail with "Too
//! many open files" for legitimate callers. Any process may raise its soft
//! limit up to the hard one, so the broker does at start.

use std::io;

use crate::listener::ConnectionLimits;

/// Descriptors the broker needs besides its listeners' connections: the
/// listeners themselves, Auth0 and JWKS connections, files being reloaded,
/// the metrics endpoint, stdio.
const RESERVED_DESCRIPTORS: u64 = 128;

/// The open-file limit before and after [`raise_to_hard_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFilesLimit {
    /// The soft limit the process started with.
    pub before: u64,
    /// The soft limit now in force.
    pub soft: u64,
    /// The hard limit: the most an unprivileged process may raise to.
    pub hard: u64,
}

/// Raises the soft open-file limit to the hard limit (no change when they are
/// already equal).
pub fn raise_to_hard_limit() -> io::Result<OpenFilesLimit> {
    let (before, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let soft = rlimit::increase_nofile_limit(hard)?;
    Ok(OpenFilesLimit { before, soft, hard })
}

/// Descriptors the connection caps of `listeners` listeners can use at once.
pub fn descriptors_needed(limits: &ConnectionLimits, listeners: usize) -> u64 {
    let per_listener = u64::try_from(limits.max_connections).unwrap_or(u64::MAX);
    let listeners = u64::try_from(listeners).unwrap_or(u64::MAX);
    per_listener
        .saturating_mul(listeners)
        .saturating_add(RESERVED_DESCRIPTORS)
}

/// Raises the limit and logs the outcome, warning when the connection caps of
/// `listeners` listeners could still run the process out of descriptors. A
/// failure is logged, not fatal: the broker still works, only with less room.
pub fn raise_and_report(limits: &ConnectionLimits, listeners: usize) {
    let needed = descriptors_needed(limits, listeners);
    match raise_to_hard_limit() {
        Ok(limit) => {
            tracing::info!(
                before = limit.before,
                soft = limit.soft,
                hard = limit.hard,
                "open-file limit"
            );
            if limit.soft < needed {
                tracing::warn!(
                    limit = limit.soft,
                    needed,
                    "the open-file limit is below what --max-connections allows on every listener: \
                     lower TOKENBROKER_MAX_CONNECTIONS or raise the hard limit (ulimit -Hn)"
                );
            }
        }
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn soft_limit_is_raised_to_the_hard_limit() {
        let limit = raise_to_hard_limit().expect("getrlimit/setrlimit");
        assert_eq!(limit.soft, limit.hard);
        assert!(limit.soft >= limit.before);
        let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit");
        assert_eq!(
            (soft, hard),
            (limit.hard, limit.hard),
            "in force, not just reported"
        );
        let again = raise_to_hard_limit().expect("second call");
        assert_eq!(again.before, again.soft, "unchanged when already equal");
    }

    #[test]
    fn descriptors_needed_counts_every_listener_and_a_reserve() {
        let limits = ConnectionLimits {
            max_connections: 1000,
            ..ConnectionLimits::default()
        };
        assert_eq!(descriptors_needed(&limits, 2), 2000 + RESERVED_DESCRIPTORS);
        let huge = ConnectionLimits {
            max_connections: usize::MAX,
            ..ConnectionLimits::default()
        };
        assert_eq!(descriptors_needed(&huge, 2), u64::MAX);
    }
}
