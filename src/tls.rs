//! The mTLS listener: rustls with a client-certificate verifier, handshakes
//! run concurrently off the accept loop, and the caller's identity read from
//! the verified certificate.
//!
//! We serve with our own acceptor over `serve_with_incoming` rather than
//! tonic's built-in TLS so that a slow or hostile handshake never blocks
//! other connections, and so the caller id is read from the certificate once
//! per connection (in [`Peer`]) rather than parsed again on every request.
//! The accept loop enforces the listener's [`ConnectionLimits`]: connection
//! slots, a bound on handshakes in progress and the handshake timeout.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::audit::ReleaseGate;
use crate::caller::{self, UnreadableCaller};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::listener::{self, Acceptor, Admitted, ConnectionLimits, LimitedStream};

/// Files the mTLS listener is built from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// Why the TLS material could not be loaded; names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("{setting} {source}")]
    Setting {
        setting: &'static str,
        source: Box<TlsError>,
    },
}

impl TlsError {
    fn of_setting(self, setting: &'static str) -> Self {
        Self::Setting {
            setting,
            source: Box::new(self),
        }
    }
}

fn file_error(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certificates.is_empty() {
        return Err(file_error(path, "holds no PEM certificate"));
    }
    Ok(certificates)
}

fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

fn load_client_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in load_certificates(path)? {
        roots.add(certificate).map_err(|e| file_error(path, e))?;
    }
    Ok(roots)
}

/// Builds the server's rustls configuration: our certificate, and only
/// clients whose certificate chains to the client CA (no anonymous clients).
pub fn load_server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots =
        load_client_roots(&files.client_ca).map_err(|e| e.of_setting("TOKENBROKER_CLIENT_CA"))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| file_error(&files.client_ca, e))?;
    let certificates =
        load_certificates(&files.cert).map_err(|e| e.of_setting("TOKENBROKER_TLS_CERT"))?;
    let key = load_private_key(&files.key).map_err(|e| e.of_setting("TOKENBROKER_TLS_KEY"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates, key)
        .map_err(|e| {
            file_error(&files.key, format!("does not match the certificate: {e}"))
                .of_setting("TOKENBROKER_TLS_KEY")
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS material in force. New handshakes use the newest good material;
/// open connections keep what they negotiated. A bad new file set (unreadable,
/// key not matching the certificate) keeps the old one and is counted.
pub struct TlsStore {
    files: TlsFiles,
    current: arc_swap::ArcSwap<ServerConfig>,
    reloads: AtomicU64,
    failed_reloads: AtomicU64,
}

impl TlsStore {
    /// Loads the certificate, key and client CA; fails at start if any is bad.
    pub fn open(files: TlsFiles) -> Result<Self, TlsError> {
        let config = load_server_config(&files)?;
        Ok(Self {
            files,
            current: arc_swap::ArcSwap::new(config),
            reloads: AtomicU64::new(0),
            failed_reloads: AtomicU64::new(0),
        })
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// The files to watch.
    pub fn paths(&self) -> Vec<PathBuf> {
        vec![
            self.files.cert.clone(),
            self.files.key.clone(),
            self.files.client_ca.clone(),
        ]
    }

    /// Re-reads the files; keeps the old material if the new is bad.
    pub fn reload(&self) {
        match load_server_config(&self.files) {
            Ok(config) => {
                self.current.store(config);
                self.reloads.fetch_add(1, Ordering::Relaxed);
                crate::stats::tls_reload(true);
                tracing::info!("TLS certificate, key and client CA reloaded");
            }
            Err(error) => {
                self.failed_reloads.fetch_add(1, Ordering::Relaxed);
                crate::stats::tls_reload(false);
                tracing::error!(%error, "TLS material not reloaded: keeping the previous certificate and client CA");
            }
        }
    }

    /// Successful reloads since start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Refused reloads since start.
    pub fn failed_reloads(&self) -> u64 {
        self.failed_reloads.load(Ordering::Relaxed)
    }
}

/// Who is on the other end of a connection, worked out once after the
/// handshake. tonic puts it in every request's extensions (it is the
/// connection's `ConnectInfo`), so per-request code reads a ready `Arc<str>`.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The caller id of the verified client certificate (see [`caller`]),
    /// or why the certificate names nobody: such a connection is refused
    /// every RPC, never given a weaker name instead.
    pub caller: Result<Arc<str>, UnreadableCaller>,
    /// Holds the connection's outgoing bytes until the audit lines of the
    /// tokens in them are written (see [`crate::audit::ReleaseGate`]).
    pub release_gate: Arc<ReleaseGate>,
}

/// An mTLS connection that passed the handshake, with its [`Peer`].
pub struct AuthenticatedStream {
    inner: TlsStream<TcpStream>,
    peer: Peer,
}

impl AuthenticatedStream {
    fn new(inner: TlsStream<TcpStream>) -> Self {
        let (_, session) = inner.get_ref();
        let peer = Peer {
            caller: session
                .peer_certificates()
                .and_then(|certs| certs.first())
                .ok_or(UnreadableCaller::NoCertificate)
                .and_then(|leaf| caller::identify(leaf.as_ref())),
            release_gate: ReleaseGate::new(),
        };
        Self { inner, peer }
    }
}

impl tonic::transport::server::Connected for AuthenticatedStream {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for AuthenticatedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AuthenticatedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.peer.release_gate.poll_open(cx))?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.peer.release_gate.poll_open(cx))?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One accepted connection, or an accept error for the server to log. The
/// connection holds its listener slot and must send the HTTP/2 preface within
/// the first-request timeout.
type Accepted = Result<LimitedStream<AuthenticatedStream>, io::Error>;

/// A stream of connections that completed the mTLS handshake. Dropping it
/// stops accepting.
pub struct TlsIncoming {
    connections: mpsc::Receiver<Accepted>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl futures::Stream for TlsIncoming {
    type Item = Accepted;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.connections.poll_recv(cx)
    }
}

/// Accepts TCP connections within `limits` and runs each handshake on its own
/// task; only connections that pass the handshake come out of the stream.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<TlsStore>,
    limits: ConnectionLimits,
) -> TlsIncoming {
    let (sender, connections) = mpsc::channel(64);
    let acceptor = Acceptor::new(listener, limits.max_connections, "mTLS");
    let accept_task = tokio::spawn(accept_loop(acceptor, tls, limits, sender));
    TlsIncoming {
        connections,
        accept_task,
    }
}

/// Takes a handshake slot before accepting, so that once
/// `max_pending_handshakes` clients are mid-handshake (silent ones included)
/// newcomers wait in the kernel's backlog instead of holding descriptors,
/// while established connections are untouched.
async fn accept_loop(
    mut acceptor: Acceptor,
    tls: Arc<TlsStore>,
    limits: ConnectionLimits,
    sender: mpsc::Sender<Accepted>,
) {
    let handshakes = listener::bounded_semaphore(limits.max_pending_handshakes);
    loop {
        let Ok(handshake_slot) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let Some(admitted) = acceptor.accept().await else {
            return;
        };
        if sender.is_closed() {
            return;
        }
        let tls_acceptor = TlsAcceptor::from(tls.current());
        tokio::spawn(handshake(
            admitted,
            tls_acceptor,
            limits,
            handshake_slot,
            sender.clone(),
        ));
    }
}

/// Runs one handshake within the handshake timeout and hands the connection
/// to the server, freeing the handshake slot as soon as it is done.
async fn handshake(
    admitted: Admitted,
    acceptor: TlsAcceptor,
    limits: ConnectionLimits,
    handshake_slot: OwnedSemaphorePermit,
    sender: mpsc::Sender<Accepted>,
) {
    let Admitted { stream, peer, slot } = admitted;
    let _ = stream.set_nodelay(true);
    let outcome = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await;
    drop(handshake_slot);
    match outcome {
        Ok(Ok(tls)) => {
            let stream = LimitedStream::new(
                AuthenticatedStream::new(tls),
                slot,
                limits.first_request_timeout,
            );
            let _ = sender.send(Ok(stream)).await;
        }
        Ok(Err(error)) => tracing::info!(%peer, %error, "TLS handshake refused"),
        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
    }
}
