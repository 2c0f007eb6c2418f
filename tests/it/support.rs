//! Shared test harness: a broker on port 0 with a fresh PKI and its own
//! emulator, and mTLS clients with any certificate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokenbroker::auth0::Auth0Client;
use tokenbroker::cache::IdentityStore;
use tokenbroker::config::{Auth0Settings, CacheSettings, TlsFiles};
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokenbroker::pki::{write_file, CertificateAuthority, IssuedCertificate, LeafSpec};
use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::{GetIdpTokenRequest, IdpToken};
use tokenbroker::{server, tls};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Client id and secret the test broker uses against its emulator.
pub const CLIENT_ID: &str = "tokenbroker-test";
pub const CLIENT_SECRET: &str = "test-client-secret-5d1f0c";

/// Upper bound for any single RPC in a test, so nothing can hang.
pub const RPC_BOUND: Duration = Duration::from_secs(20);

/// How a test wants its broker.
pub struct Options {
    pub cache: CacheSettings,
    /// Secret the broker presents (the emulator always expects [`CLIENT_SECRET`]).
    pub broker_secret: String,
    pub emulator: EmulatorConfig,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            cache: CacheSettings {
                user_ttl: Duration::from_secs(300),
                user_capacity: 1000,
                negative_ttl: Duration::from_secs(30),
            },
            broker_secret: CLIENT_SECRET.to_owned(),
            emulator: EmulatorConfig::new(CLIENT_ID, CLIENT_SECRET),
        }
    }
}

/// A running broker, its emulator and the PKI around them.
pub struct TestBroker {
    pub emulator: Emulator,
    pub addr: SocketAddr,
    pub ca: CertificateAuthority,
    pub client_cert: IssuedCertificate,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), server::ServerError>>>,
    _dir: tempfile::TempDir,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        let emulator = Emulator::start(options.emulator).await.expect("emulator starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = CertificateAuthority::generate("test client and server CA").expect("CA");
        let server_cert = ca.issue(&LeafSpec::loopback_server()).expect("server cert");
        let client_cert = ca
            .issue(&LeafSpec::spiffe_client("spiffe://test.example/ns/it/sa/client"))
            .expect("client cert");
        let files = TlsFiles {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            client_ca: dir.path().join("ca.pem"),
        };
        write_file(&files.cert, &server_cert.cert_pem, false).expect("write");
        write_file(&files.key, &server_cert.key_pem, true).expect("write");
        write_file(&files.client_ca, &ca.cert_pem, false).expect("write");
        let tls_config = tls::load_server_config(&files).expect("tls config");
        let auth0 = Auth0Settings {
            base_url: emulator.base_url(),
            audience: emulator.audience(),
            client_id: CLIENT_ID.to_owned(),
            client_secret: options.broker_secret.into(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
        };
        let store = Arc::new(IdentityStore::new(
            Auth0Client::new(auth0).expect("client"),
            options.cache,
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, tls_config, store, async {
            let _ = stop.await;
        }));
        Self {
            emulator,
            addr,
            ca,
            client_cert,
            shutdown: Some(shutdown),
            task: Some(task),
            _dir: dir,
        }
    }

    /// A client with the default certificate from the broker's client CA.
    pub async fn client(&self) -> TokenBrokerClient<Channel> {
        self.client_with(Some(&self.client_cert), &self.ca.cert_pem)
            .await
            .expect("client connects")
    }

    /// A client presenting `cert` (or none), trusting `server_ca_pem`.
    pub async fn client_with(
        &self,
        cert: Option<&IssuedCertificate>,
        server_ca_pem: &str,
    ) -> Result<TokenBrokerClient<Channel>, tonic::transport::Error> {
        Ok(TokenBrokerClient::new(self.channel_with(cert, server_ca_pem).await?))
    }

    /// A raw channel, for health and reflection clients.
    pub async fn channel_with(
        &self,
        cert: Option<&IssuedCertificate>,
        server_ca_pem: &str,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(server_ca_pem))
            .domain_name("localhost");
        if let Some(cert) = cert {
            tls = tls.identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem));
        }
        Channel::from_shared(format!("https://{}", self.addr))
            .expect("uri")
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
    }

    /// `GetIdpToken` for `user_id`/`provider` with the default client, bounded by [`RPC_BOUND`].
    pub async fn get(&self, user_id: &str, provider: &str) -> Result<IdpToken, tonic::Status> {
        let request = GetIdpTokenRequest {
            user_id: user_id.to_owned(),
            provider: provider.to_owned(),
            ..Default::default()
        };
        self.get_with(request).await
    }

    pub async fn get_with(&self, request: GetIdpTokenRequest) -> Result<IdpToken, tonic::Status> {
        let mut client = self.client().await;
        let response = tokio::time::timeout(RPC_BOUND, client.get_idp_token(request))
            .await
            .expect("RPC answered within the bound")?;
        Ok(response.into_inner().token.expect("response carries a token"))
    }

    /// Stops the broker and waits for it to exit.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(RPC_BOUND, task).await;
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
