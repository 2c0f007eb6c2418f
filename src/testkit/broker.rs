//! A broker running on loopback port 0 for as long as a test or the
//! benchmark needs it, and the Auth0 credentials it shares with its emulator.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::audit::AuditTrail;
use crate::auth0::{Auth0Settings, ClientCredential};
use crate::cache::IdentityStore;
use crate::emulator::{Emulator, EmulatorConfig};
use crate::server::{self, Broker, Listeners, RunSettings, ServerError};
use crate::tls::TlsStore;

/// How long a test broker waits to connect to Auth0: short, because the
/// emulator is on loopback and a test of a dead Auth0 should fail fast.
const AUTH0_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one whole call to Auth0 may take unless a test says otherwise
/// (the production default of `--auth0-timeout`).
const AUTH0_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The client credentials a broker presents and its emulator accepts, so the
/// two are always made from the same pair.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// The Auth0 application's client id.
    pub client_id: &'a str,
    /// Its client secret.
    pub client_secret: &'a str,
}

impl Credentials<'_> {
    /// An emulator configuration that accepts these credentials and nothing else.
    pub fn emulator_config(&self) -> EmulatorConfig {
        EmulatorConfig::new(self.client_id, self.client_secret)
    }

    /// Starts an emulator on loopback that accepts these credentials.
    pub async fn start_emulator(&self) -> std::io::Result<Emulator> {
        Emulator::start(self.emulator_config()).await
    }

    /// How a broker reaches the tenant at `base_url` (`audience` for its
    /// Management API) with these credentials: 2 s to connect, 10 s a call.
    pub fn auth0_settings(&self, base_url: String, audience: String) -> Auth0Settings {
        Auth0Settings {
            base_url,
            audience,
            client_id: self.client_id.to_owned(),
            credential: ClientCredential::Secret(self.client_secret.to_owned().into()),
            token_vault_subject_key: None,
            connect_timeout: AUTH0_CONNECT_TIMEOUT,
            request_timeout: AUTH0_REQUEST_TIMEOUT,
        }
    }
}

/// Whether a started broker also serves plaintext health on a second port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthListener {
    /// Only the mTLS port.
    Off,
    /// The mTLS port and a plaintext health port, both on loopback.
    Loopback,
}

/// A broker serving on loopback (port 0) on a task of its own, as `serve`
/// runs it: [`server::run`] on bound [`Listeners`], stopped like SIGTERM.
/// Dropping it aborts the server task.
pub struct StartedBroker {
    /// Where the mTLS listener accepts.
    pub addr: SocketAddr,
    /// The plaintext health port, when asked for.
    pub health_addr: Option<SocketAddr>,
    /// The running broker's identity store: to warm it up or count its users.
    pub store: Arc<IdentityStore>,
    /// The running broker's TLS material: to read its reload counters, or to
    /// serve something else with the same certificates.
    pub tls: Arc<TlsStore>,
    /// The running broker's audit trail: to reopen its file as SIGHUP would.
    pub audit: AuditTrail,
    /// Ends the serve loop the way SIGTERM does; taken when sent.
    shutdown: Option<oneshot::Sender<()>>,
    /// The server task; taken once it has been waited for.
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl StartedBroker {
    /// Binds loopback port 0 (and a health port if asked), then runs `broker`
    /// with `run` settings until [`Self::begin_shutdown`] or [`Self::stop`].
    pub async fn start(
        broker: Broker,
        run: RunSettings,
        health: HealthListener,
    ) -> Result<Self, ServerError> {
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let listeners = Listeners::bind(
            loopback,
            (health == HealthListener::Loopback).then_some(loopback),
        )
        .await?;
        let local_addr = |listener: &tokio::net::TcpListener| {
            listener.local_addr().map_err(|source| ServerError::Bind {
                addr: loopback,
                source,
            })
        };
        let addr = local_addr(&listeners.mtls)?;
        let health_addr = listeners.health.as_ref().map(local_addr).transpose()?;
        let store = broker.store().clone();
        let tls = broker.tls().clone();
        let audit = broker.audit().clone();
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listeners, broker, run, async {
            let _ = stop.await;
        }));
        Ok(Self {
            addr,
            health_addr,
            store,
            tls,
            audit,
            shutdown: Some(shutdown),
            task: Some(task),
        })
    }

    /// Asks the broker to shut down (like SIGTERM) without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Waits up to `bound` for the server task to end and returns how it
    /// ended; `None` if it did not end in time (it is aborted then), panicked,
    /// or was already waited for.
    pub async fn wait_stopped(&mut self, bound: Duration) -> Option<Result<(), ServerError>> {
        let mut task = self.task.take()?;
        match tokio::time::timeout(bound, &mut task).await {
            Ok(joined) => joined.ok(),
            Err(_) => {
                task.abort();
                None
            }
        }
    }

    /// Shuts the broker down and waits up to `bound` for it to stop; returns
    /// how it ended, as [`Self::wait_stopped`] does.
    pub async fn stop(mut self, bound: Duration) -> Option<Result<(), ServerError>> {
        self.begin_shutdown();
        self.wait_stopped(bound).await
    }
}

impl Drop for StartedBroker {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
