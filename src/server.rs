//! Puts the pieces together on an already-bound listener: the TokenBroker
//! service, server reflection (v1 and v1alpha, for grpcurl) and gRPC health,
//! all behind the mTLS acceptor. Taking a bound listener lets tests and
//! `tokenbroker dev` run it on port 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;

use crate::auth0::{Auth0Client, Auth0Error};
use crate::cache::IdentityStore;
use crate::config::ServeConfig;
use crate::proto;
use crate::proto::token_broker_server::TokenBrokerServer;
use crate::service::TokenBrokerService;
use crate::tls::{self, TlsError};

/// Service name whose health status means "ready to hand out tokens".
pub const READINESS_SERVICE: &str = "tokenbroker.v1.TokenBroker";

/// Why the broker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the Auth0 client: {0}")]
    Auth0Client(#[from] Auth0Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Builds the Auth0 client and caches, binds `config.listen` and serves until `shutdown`.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let tls = tls::load_server_config(&config.tls)?;
    let store = Arc::new(IdentityStore::new(Auth0Client::new(config.auth0)?, config.cache));
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    tracing::info!(listen = %config.listen, "tokenbroker serving gRPC over mTLS");
    run(listener, tls, store, shutdown).await
}

/// Serves the broker on `listener` until `shutdown` completes, then lets
/// in-flight RPCs finish.
pub async fn run(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    store: Arc<IdentityStore>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    tracing::warn!(
        "no caller policy yet: every caller with a certificate from the client CA may call every RPC"
    );
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    health_reporter
        .set_not_serving::<TokenBrokerServer<TokenBrokerService>>()
        .await;
    let readiness = tokio::spawn(become_ready(store.clone(), health_reporter.clone()));

    let reflection_v1 = reflection_builder().build_v1()?;
    let reflection_v1alpha = reflection_builder().build_v1alpha()?;
    let result = Server::builder()
        .add_service(TokenBrokerService::server(store))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(tls::incoming(listener, tls), shutdown)
        .await;
    readiness.abort();
    result.map_err(ServerError::from)
}

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Marks the TokenBroker service SERVING once a Management token has been
/// obtained, retrying with capped exponential backoff.
async fn become_ready(store: Arc<IdentityStore>, reporter: HealthReporter) {
    let mut delay = Duration::from_millis(250);
    loop {
        match store.warm_up().await {
            Ok(()) => {
                reporter
                    .set_serving::<TokenBrokerServer<TokenBrokerService>>()
                    .await;
                tracing::info!("ready: obtained the first Management API token");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "not ready yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}
