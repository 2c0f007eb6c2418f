//! Hot reload of files that Kubernetes replaces under a running pod (secret
//! and ConfigMap updates, cert-manager renewals, all done by symlink swaps).
//!
//! We poll file contents rather than use inotify: symlink swaps of mounted
//! volumes are easy to miss with filesystem events, and comparing a few small
//! files every few seconds costs nothing. SIGHUP forces a reload at once.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::Duration;

use tokio::task::JoinHandle;

/// Hash of each file's contents (`None` when unreadable), to notice changes.
fn fingerprint(paths: &[PathBuf]) -> Vec<Option<u64>> {
    paths
        .iter()
        .map(|path| {
            std::fs::read(path).ok().map(|bytes| {
                let mut hasher = DefaultHasher::new();
                bytes.hash(&mut hasher);
                hasher.finish()
            })
        })
        .collect()
}

/// Calls `reload` whenever the contents of `paths` change (checked every
/// `interval`) or the process gets SIGHUP. `reload` does its own validation
/// and logging; a failed reload is retried on the next change.
pub fn watch_files(
    paths: Vec<PathBuf>,
    interval: Duration,
    mut reload: impl FnMut() + Send + 'static,
) -> JoinHandle<()> {
    // Taken now, not in the task: a change made right after this call must count.
    let mut last = fingerprint(&paths);
    tokio::spawn(async move {
        let mut hangup = hangup_signal();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = ticker.tick() => false,
                _ = next_hangup(&mut hangup) => true,
            };
            let current = fingerprint(&paths);
            if forced || current != last {
                last = current;
                reload();
            }
        }
    })
}

/// Calls `action` on every SIGHUP: what logrotate sends after moving a file
/// the broker writes (the audit log), so the broker opens the path anew.
pub fn on_hangup(mut action: impl FnMut() + Send + 'static) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut hangup = hangup_signal();
        loop {
            next_hangup(&mut hangup).await;
            action();
        }
    })
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
fn hangup_signal() -> Hangup {}

#[cfg(unix)]
async fn next_hangup(hangup: &mut Hangup) {
    match hangup {
        Some(signal) => {
            if signal.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(not(unix))]
async fn next_hangup(_hangup: &mut Hangup) {
    std::future::pending::<()>().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_changed_file_triggers_one_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, "a").unwrap();
        let reloads = Arc::new(AtomicUsize::new(0));
        let counter = reloads.clone();
        let task = watch_files(vec![path.clone()], Duration::from_millis(20), move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            reloads.load(Ordering::SeqCst),
            0,
            "unchanged file must not reload"
        );
        std::fs::write(&path, "b").unwrap();
        for _ in 0..100 {
            if reloads.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(reloads.load(Ordering::SeqCst), 1);
        task.abort();
    }
}
