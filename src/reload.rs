//! Hot reload of files that Kubernetes replaces under a running pod (secret
//! and ConfigMap updates, cert-manager renewals, all done by symlink swaps).
//!
//! We poll file contents rather than use inotify: symlink swaps of mounted
//! volumes are easy to miss with filesystem events, and comparing a few small
//! files every few seconds costs nothing. SIGHUP forces a reload at once.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

/// A file the operator edits while the broker runs (the policy, the
/// connections file): how to read it, what stands in for it when none is
/// given, and what to say when it is reloaded.
pub trait ReloadableFile: Send + Sync + 'static {
    /// Why the file was refused (names the file and line).
    type Error: std::fmt::Display;
    /// Reads and checks the file.
    fn load(path: &Path) -> Result<Self, Self::Error>
    where
        Self: Sized;
    /// What is in force without a file.
    fn without_file() -> Self
    where
        Self: Sized;
    /// Logs and counts a successful reload of `self` from `path`.
    fn reloaded(&self, path: &Path);
    /// Logs and counts a refused reload (the previous contents stay).
    fn not_reloaded(error: &Self::Error);
}

/// A [`ReloadableFile`] in force, swapped atomically on reload so an RPC
/// always sees one whole file; a bad new file keeps the old contents.
pub struct FileStore<T> {
    current: arc_swap::ArcSwap<T>,
    /// `None` when no file was given: nothing to reload.
    path: Option<PathBuf>,
}

impl<T: ReloadableFile> FileStore<T> {
    /// Loads the file, or [`ReloadableFile::without_file`] when `path` is `None`.
    pub fn open(path: Option<&Path>) -> Result<Self, T::Error> {
        let contents = match path {
            Some(path) => T::load(path)?,
            None => T::without_file(),
        };
        Ok(Self {
            current: arc_swap::ArcSwap::from_pointee(contents),
            path: path.map(Path::to_owned),
        })
    }

    /// A store holding `contents`, for tests and `dev`.
    pub fn fixed(contents: T) -> Self {
        Self {
            current: arc_swap::ArcSwap::from_pointee(contents),
            path: None,
        }
    }

    /// The contents in force now, for the length of a statement. A guard,
    /// not an `Arc` clone: `load_full` would bump one reference count that
    /// every RPC on every core shares.
    pub fn current(&self) -> arc_swap::Guard<Arc<T>> {
        self.current.load()
    }

    /// The file the contents come from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Re-reads the file; a bad new file keeps the old contents.
    pub fn reload(&self) {
        let Some(path) = &self.path else { return };
        match T::load(path) {
            Ok(contents) => {
                contents.reloaded(path);
                self.current.store(Arc::new(contents));
            }
            Err(error) => T::not_reloaded(&error),
        }
    }

    /// Reloads `store` when its file changes (or on SIGHUP); does nothing
    /// without a file.
    pub fn watch(store: &Arc<Self>, interval: Duration) -> JoinHandle<()> {
        let Some(path) = store.path() else {
            return tokio::spawn(async {});
        };
        let store = store.clone();
        watch_files(vec![path.to_owned()], interval, move || store.reload())
    }
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
