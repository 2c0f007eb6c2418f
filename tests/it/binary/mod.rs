//! The real `tokenbroker` binary, as a child process: start-up validation
//! (`startup`), what it logs and counts (`logs`), SIGTERM (`signals`) and
//! `tokenbroker dev` (`dev`). Every child runs with a cleared environment
//! (only `PATH`), is killed if the test fails (`kill_on_drop`), and only ever
//! listens on or talks to 127.0.0.1. This file has what they share: spawning
//! the binary, stopping it, and `serve` with a fresh PKI ([`ServedBinary`]).

mod audit;
mod dev;
mod logs;
mod signals;
mod startup;

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokenbroker::emulator::Emulator;
use tokenbroker::pki::{write_file, IssuedCertificate};
use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tokenbroker::testkit::{Credentials, TestPki};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::support::mtls_client;

const BIN: &str = env!("CARGO_BIN_EXE_tokenbroker");

/// How long a child gets to start listening, or to exit on its own.
const PROCESS_BOUND: Duration = Duration::from_secs(60);

/// How long a child may take to exit after SIGTERM.
const SIGTERM_BOUND: Duration = Duration::from_secs(10);

/// The binary with a cleared environment (only `PATH`), no stdin, killed on drop.
fn tokenbroker(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// A loopback address whose port was free a moment ago.
fn free_loopback_addr() -> SocketAddr {
    ([127, 0, 0, 1], free_port()).into()
}

/// Sends SIGTERM and waits (bounded) for the child to exit.
async fn terminate(child: &mut Child) -> ExitStatus {
    let pid = child.id().expect("child is still running");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid} failed");
    tokio::time::timeout(SIGTERM_BOUND, child.wait())
        .await
        .expect("tokenbroker exits within 10 s of SIGTERM")
        .expect("wait for tokenbroker")
}

/// Connects once the child listens; fails fast if it exits first. Bounded.
async fn connect_when_listening(
    child: &mut Child,
    addr: SocketAddr,
    ca_pem: &str,
    cert: &IssuedCertificate,
) -> TokenBrokerClient<Channel> {
    let deadline = tokio::time::Instant::now() + PROCESS_BOUND;
    loop {
        if let Some(status) = child.try_wait().expect("poll child") {
            panic!("tokenbroker exited before it listened: {status}");
        }
        match mtls_client(addr, ca_pem, Some(cert)).await {
            Ok(client) => return client,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("tokenbroker did not listen on {addr} in time: {error:?}"),
        }
    }
}

/// How a served binary authenticates to its emulator.
enum ClientAuth<'a> {
    /// A client secret file (`AUTH0_CLIENT_SECRET_FILE`).
    Secret(Credentials<'a>),
    /// `private_key_jwt` with this key (`AUTH0_CLIENT_ASSERTION_KEY_FILE`).
    AssertionKey {
        client_id: &'a str,
        key_pem: &'a str,
    },
}

/// `tokenbroker serve` as a child process against `emulator`, with a fresh
/// PKI, a policy, JSON logs to files and a metrics port.
struct ServedBinary {
    child: Child,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    /// The CA of both sides, and the server's key (to check it never
    /// reaches a log); its directory holds every file below.
    pki: TestPki,
    /// One client certificate per requested caller id, in order.
    client_certs: Vec<IssuedCertificate>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

/// The audit key every served binary runs with (base64 of 32 bytes).
pub const AUDIT_KEY_BASE64: &str = "Wk0c8vQ9j8yq3n2f4t6u8w0y2a4c6e8g0i2k4m6o8q0=";

impl ServedBinary {
    fn start(
        emulator: &Emulator,
        credentials: Credentials<'_>,
        caller_ids: &[&str],
        policy: &str,
        rust_log: &str,
    ) -> Self {
        Self::start_logging(
            emulator,
            credentials,
            caller_ids,
            policy,
            (rust_log, "json"),
        )
    }

    /// [`ServedBinary::start`] with `(RUST_LOG, TOKENBROKER_LOG_FORMAT)`.
    fn start_logging(
        emulator: &Emulator,
        credentials: Credentials<'_>,
        caller_ids: &[&str],
        policy: &str,
        logging: (&str, &str),
    ) -> Self {
        Self::start_as(
            emulator,
            ClientAuth::Secret(credentials),
            caller_ids,
            policy,
            logging,
            &[],
        )
    }

    /// [`ServedBinary::start_logging`] authenticating with `auth`, with
    /// `extra` settings in its environment.
    fn start_as(
        emulator: &Emulator,
        auth: ClientAuth<'_>,
        caller_ids: &[&str],
        policy: &str,
        (rust_log, log_format): (&str, &str),
        extra: &[(&str, &str)],
    ) -> Self {
        let pki = TestPki::generate("binary test CA").expect("test PKI");
        let client_certs = caller_ids
            .iter()
            .map(|id| pki.issue_client(id).expect("client cert"))
            .collect();
        let (client_id, credential) = match auth {
            ClientAuth::Secret(credentials) => {
                let secret = pki.path("secret");
                let text = format!("{}\n", credentials.client_secret);
                write_file(&secret, &text, true).expect("write");
                (credentials.client_id, ("AUTH0_CLIENT_SECRET_FILE", secret))
            }
            ClientAuth::AssertionKey { client_id, key_pem } => {
                let key = pki.path("client-assertion.pem");
                write_file(&key, key_pem, true).expect("write");
                (client_id, ("AUTH0_CLIENT_ASSERTION_KEY_FILE", key))
            }
        };
        let policy_path = pki.path("policy.toml");
        write_file(&policy_path, policy, false).expect("write");
        // Google refreshed at the emulator's IdP, so refresh tokens and the
        // IdP client secret pass through the broker in every binary test.
        let connections_path = pki.path("connections.toml");
        crate::support::write_connections(
            &connections_path,
            &crate::support::TestConnections {
                refreshed_at_idp: vec!["google-oauth2"],
                not_refreshed: Vec::new(),
                token_vault: Vec::new(),
            },
            emulator,
        );
        let audit_key = pki.path("audit.key");
        write_file(&audit_key, AUDIT_KEY_BASE64, true).expect("write");
        let stdout_path = pki.path("stdout.log");
        let stderr_path = pki.path("stderr.log");
        let addr = free_loopback_addr();
        let metrics_addr = free_loopback_addr();
        let mut command = tokenbroker(&["serve"]);
        command
            .env("TOKENBROKER_METRICS_LISTEN", metrics_addr.to_string())
            .env("AUTH0_DOMAIN", emulator.base_url())
            .env("AUTH0_CLIENT_ID", client_id)
            .env(credential.0, credential.1)
            .env("AUTH0_ID_TOKEN_AUDIENCES", emulator.id_token_audience())
            .env("TOKENBROKER_LISTEN", addr.to_string())
            .env("TOKENBROKER_TLS_CERT", &pki.files.cert)
            .env("TOKENBROKER_TLS_KEY", &pki.files.key)
            .env("TOKENBROKER_CLIENT_CA", &pki.files.client_ca)
            .env("TOKENBROKER_POLICY", policy_path)
            .env("TOKENBROKER_CONNECTIONS", connections_path)
            .env("TOKENBROKER_AUDIT_KEY_FILE", audit_key)
            .env("TOKENBROKER_LOG_FORMAT", log_format)
            .env("RUST_LOG", rust_log)
            .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
        command.envs(extra.iter().copied());
        let child = command.spawn().expect("spawn tokenbroker serve");
        Self {
            child,
            addr,
            metrics_addr,
            pki,
            client_certs,
            stdout_path,
            stderr_path,
        }
    }

    /// A client presenting `cert`, once the child listens.
    async fn connect_when_listening(
        &mut self,
        cert: &IssuedCertificate,
    ) -> TokenBrokerClient<Channel> {
        connect_when_listening(&mut self.child, self.addr, &self.pki.ca.cert_pem, cert).await
    }
}
