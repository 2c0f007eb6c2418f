//! The process's stop signal: SIGTERM (Kubernetes) or SIGINT (Ctrl-C).

/// Completes when the first SIGTERM or SIGINT arrives.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut terminate) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received: shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Exits the process at once when a second SIGTERM/SIGINT arrives during the
/// drain: an operator who presses Ctrl-C twice means it.
pub fn exit_on_second_signal() {
    tokio::spawn(async {
        signal().await;
        tracing::warn!("second signal: exiting without waiting for in-flight RPCs");
        std::process::exit(130);
    });
}

/// Tells in-flight RPCs that the grace period is over, so they answer
/// UNAVAILABLE instead of having their connection dropped.
#[derive(Clone)]
pub struct Drain {
    over: tokio::sync::watch::Receiver<bool>,
}

/// The sending half of [`Drain`], held by the server.
pub struct DrainControl {
    over: tokio::sync::watch::Sender<bool>,
}

impl Drain {
    /// A connected control and drain signal.
    pub fn new() -> (DrainControl, Drain) {
        let (sender, receiver) = tokio::sync::watch::channel(false);
        (DrainControl { over: sender }, Drain { over: receiver })
    }

    /// Completes when the grace period is over (never, if the control is dropped without ending it).
    pub async fn grace_over(&self) {
        let mut over = self.over.clone();
        if over.wait_for(|over| *over).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl DrainControl {
    /// Ends the grace period for every in-flight RPC.
    pub fn end_grace(&self) {
        let _ = self.over.send(true);
    }
}
