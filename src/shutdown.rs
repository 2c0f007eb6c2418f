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
