//! The real `tokenbroker` binary: start-up validation, what it logs, and
//! `tokenbroker dev`. Every child runs with a cleared environment (only
//! `PATH`), is killed if the test fails (`kill_on_drop`), and only ever
//! listens on or talks to 127.0.0.1.

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::Path;
use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use tokenbroker::emulator::{
    seed, Emulator, EmulatorConfig, Endpoint, Fault, IdTokenSpec, Signing,
};
use tokenbroker::pki::{write_file, CertificateAuthority, IssuedCertificate, LeafSpec};
use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::GetIdpTokenRequest;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::support::{bypass_request, get_on, get_request, invalidate_on, list_on, mtls_client};

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

/// Runs `command` to completion (bounded), capturing its output.
async fn run_to_exit(mut command: Command) -> Output {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = command.spawn().expect("spawn tokenbroker");
    tokio::time::timeout(PROCESS_BOUND, child.wait_with_output())
        .await
        .expect("tokenbroker exits on its own with a bad config")
        .expect("wait for tokenbroker")
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

// ---------------------------------------------------------------------------------------------
// Start-up validation
// ---------------------------------------------------------------------------------------------

/// `serve` env that passes validation; each case overrides one thing.
fn valid_serve_env(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("AUTH0_DOMAIN", "tenant.example.com".to_owned()),
        ("AUTH0_CLIENT_ID", "client-id".to_owned()),
        ("AUTH0_CLIENT_SECRET", "dummy-inline-secret-7c41".to_owned()),
        ("TOKENBROKER_LISTEN", format!("127.0.0.1:{port}")),
        ("TOKENBROKER_TLS_CERT", "/nonexistent/server.pem".to_owned()),
        ("TOKENBROKER_TLS_KEY", "/nonexistent/server.key".to_owned()),
        ("TOKENBROKER_CLIENT_CA", "/nonexistent/ca.pem".to_owned()),
        ("TOKENBROKER_ALLOW_ANY_CALLER", "true".to_owned()),
    ]
}

/// Runs `serve` with [`valid_serve_env`] changed by `overrides` and `removals`.
async fn serve_with(overrides: Vec<(&'static str, String)>, removals: &[&str]) -> Output {
    let mut env = valid_serve_env(free_port());
    env.retain(|(key, _)| !removals.contains(key));
    for (key, value) in overrides {
        env.retain(|(existing, _)| *existing != key);
        env.push((key, value));
    }
    let mut command = tokenbroker(&["serve"]);
    command.envs(env);
    run_to_exit(command).await
}

/// Checks that stderr is exactly one `tokenbroker: error:` line and returns it.
fn one_error_line<'a>(what: &str, stderr: &'a str) -> &'a str {
    let line = stderr.trim_end();
    assert!(
        !line.is_empty() && !line.contains('\n'),
        "{what}: stderr is exactly one line, got: {stderr:?}"
    );
    assert!(line.starts_with("tokenbroker: error:"), "{what}: {line}");
    line
}

/// One broken start-up configuration.
struct BadStart {
    what: &'static str,
    /// Variables set (or replaced) on top of [`valid_serve_env`].
    set: Vec<(&'static str, String)>,
    /// Variables removed from it.
    unset: Vec<&'static str>,
    /// What the error line must mention.
    names: Vec<String>,
}

impl BadStart {
    fn new(
        what: &'static str,
        set: Vec<(&'static str, String)>,
        unset: Vec<&'static str>,
        names: &[&str],
    ) -> Self {
        Self {
            what,
            set,
            unset,
            names: names.iter().map(|name| (*name).to_owned()).collect(),
        }
    }

    /// Checks that `stderr` is one `tokenbroker: error:` line naming all of
    /// [`Self::names`], and returns it.
    fn error_line<'a>(&self, stderr: &'a str) -> &'a str {
        let line = one_error_line(self.what, stderr);
        for name in &self.names {
            assert!(
                line.contains(name.as_str()),
                "{}: the line names {name:?}: {line}",
                self.what
            );
        }
        line
    }
}

#[tokio::test]
async fn bad_config_fails_at_start_with_one_line_naming_the_setting() {
    let dir = tempfile::tempdir().expect("temp dir");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "file-secret-value-3e9a\n").expect("write secret");
    let secret_file = secret_file.display().to_string();
    let missing_file = dir.path().join("no-such-secret").display().to_string();

    let cases = vec![
        BadStart::new(
            "domain with a path",
            vec![("AUTH0_DOMAIN", "https://x/api".to_owned())],
            vec![],
            &["AUTH0_DOMAIN"],
        ),
        BadStart::new(
            "both secret sources",
            vec![("AUTH0_CLIENT_SECRET_FILE", secret_file.clone())],
            vec![],
            &["AUTH0_CLIENT_SECRET ", "AUTH0_CLIENT_SECRET_FILE"],
        ),
        BadStart::new(
            "neither secret source",
            vec![],
            vec!["AUTH0_CLIENT_SECRET"],
            &["AUTH0_CLIENT_SECRET ", "AUTH0_CLIENT_SECRET_FILE"],
        ),
        BadStart::new(
            "unreadable secret file",
            vec![("AUTH0_CLIENT_SECRET_FILE", missing_file)],
            vec!["AUTH0_CLIENT_SECRET"],
            &["AUTH0_CLIENT_SECRET_FILE"],
        ),
        BadStart::new(
            "neither a policy nor --allow-any-caller",
            vec![],
            vec!["TOKENBROKER_ALLOW_ANY_CALLER"],
            &["TOKENBROKER_POLICY", "--allow-any-caller"],
        ),
        BadStart::new(
            "both a policy and --allow-any-caller",
            vec![("TOKENBROKER_POLICY", secret_file.clone())],
            vec![],
            &["TOKENBROKER_POLICY", "--allow-any-caller"],
        ),
        BadStart::new(
            "zero cache capacity",
            vec![("TOKENBROKER_USER_CACHE_CAPACITY", "0".to_owned())],
            vec![],
            &["TOKENBROKER_USER_CACHE_CAPACITY"],
        ),
        BadStart::new(
            "zero cache byte budget",
            vec![("TOKENBROKER_USER_CACHE_MAX_BYTES", "0".to_owned())],
            vec![],
            &["TOKENBROKER_USER_CACHE_MAX_BYTES"],
        ),
    ];

    for case in cases {
        let what = case.what;
        let output = serve_with(case.set.clone(), &case.unset).await;
        let stderr = String::from_utf8_lossy(&output.stderr);

        assert_eq!(
            output.status.code(),
            Some(2),
            "{what}: exit code 2 for a bad config; stderr: {stderr}"
        );
        let line = case.error_line(&stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        for secret in ["dummy-inline-secret-7c41", "file-secret-value-3e9a"] {
            assert!(
                !line.contains(secret) && !stdout.contains(secret),
                "{what}: the client secret leaked into the output"
            );
        }
    }
}

#[tokio::test]
async fn unusable_tls_or_policy_file_fails_at_start_with_one_line_naming_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = |name: &str| dir.path().join(name).display().to_string();
    let ca = CertificateAuthority::generate("start-up test CA").expect("CA");
    let server = ca.issue(&LeafSpec::loopback_server()).expect("server cert");
    write_file(
        dir.path().join("server.pem").as_path(),
        &server.cert_pem,
        false,
    )
    .expect("write");
    write_file(
        dir.path().join("server.key").as_path(),
        &server.key_pem,
        true,
    )
    .expect("write");
    write_file(dir.path().join("ca.pem").as_path(), &ca.cert_pem, false).expect("write");
    let good_tls = [
        ("TOKENBROKER_TLS_CERT", path("server.pem")),
        ("TOKENBROKER_TLS_KEY", path("server.key")),
        ("TOKENBROKER_CLIENT_CA", path("ca.pem")),
    ];
    let missing_cert = path("missing-server.pem");
    let policy = path("policy.toml");
    std::fs::write(
        &policy,
        "[[caller]]\nid = \"spiffe://example.org/a\"\nproviders = [\"github\"]\ninvalidat = true\n",
    )
    .expect("write policy");

    let cases = vec![
        BadStart::new(
            "missing TLS certificate",
            vec![("TOKENBROKER_TLS_CERT", missing_cert.clone())],
            vec![],
            &[&missing_cert],
        ),
        BadStart::new(
            "policy file with an unknown key",
            vec![("TOKENBROKER_POLICY", policy.clone())],
            vec!["TOKENBROKER_ALLOW_ANY_CALLER"],
            &[&format!("{policy}:")],
        ),
    ];
    for case in cases {
        // Good TLS files unless the case replaces one.
        let mut overrides: Vec<(&str, String)> = good_tls
            .iter()
            .filter(|(key, _)| case.set.iter().all(|(k, _)| k != key))
            .cloned()
            .collect();
        overrides.extend(case.set.iter().cloned());
        let output = serve_with(overrides, &case.unset).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && output.status.code().is_some(),
            "{}: the broker refuses to start; status {}",
            case.what,
            output.status
        );
        case.error_line(&stderr);
    }
}

#[tokio::test]
async fn missing_required_setting_is_a_usage_error_with_exit_code_2() {
    let output = serve_with(vec![], &["AUTH0_CLIENT_ID"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("--auth0-client-id"),
        "clap names the missing setting: {stderr}"
    );
    assert!(
        output.stdout.is_empty(),
        "nothing on stdout for a usage error"
    );
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

/// Every seeded user with each provider it has an identity for (or no token).
fn seeded_requests() -> Vec<(&'static str, &'static str)> {
    vec![
        (seed::GITHUB_USER, "github"),
        (seed::GOOGLE_USER, "google-oauth2"),
        (seed::TWITTER_USER, "twitter"),
        (seed::DATABASE_USER, "auth0"),
        (seed::LINKED_USER, "github"),
        (seed::LINKED_USER, "google-oauth2"),
        (seed::LINKED_USER, "oauth2"),
        (seed::ODD_ID_USER, "oauth2"),
    ]
}

/// Runs every RPC on every seeded user, plus the error paths that log the
/// most (401 retry, missing scope, Auth0 faults, rejected credentials).
/// Outcomes other than the first GitHub release and the last Twitter one are
/// not asserted: only the logs they produce matter here. Returns how many
/// `GetIdpToken` RPCs released a token.
async fn exercise_everything(
    client: &mut TokenBrokerClient<Channel>,
    emulator: &Emulator,
) -> usize {
    let token = get_on(client, get_request(seed::GITHUB_USER, "github"))
        .await
        .expect("the broker serves the seeded GitHub token");
    assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
    let bound = get_on(
        client,
        GetIdpTokenRequest {
            id_token: emulator.issue_id_token(seed::GOOGLE_USER),
            ..get_request("", "google-oauth2")
        },
    )
    .await
    .expect("the broker serves the token of the ID token's subject");
    assert_eq!(bound.access_token, seed::GOOGLE_ACCESS_TOKEN);
    let forged = emulator.issue_id_token_with(IdTokenSpec {
        signing: Signing::UnpublishedKey,
        ..IdTokenSpec::for_user(seed::GOOGLE_USER)
    });
    let _ = get_on(
        client,
        GetIdpTokenRequest {
            id_token: forged,
            ..get_request("", "google-oauth2")
        },
    )
    .await
    .expect_err("a forged ID token is refused");
    let mut released = 2;

    for (user, provider) in seeded_requests() {
        for request in [
            get_request(user, provider),
            get_request(user, ""),
            bypass_request(user, provider),
        ] {
            released += usize::from(get_on(client, request).await.is_ok());
        }
        let _ = list_on(client, user).await;
        let _ = invalidate_on(client, user).await;
    }
    let _ = get_on(client, get_request("auth0|no-such-user-0001", "github")).await;
    let _ = get_on(client, get_request(seed::GITHUB_USER, "twitter")).await;
    let _ = get_on(client, get_request("bad\u{7}id", "")).await;
    let _ = get_on(
        client,
        GetIdpTokenRequest {
            connection: seed::CORP_SSO_CONNECTION.to_owned(),
            ..bypass_request(seed::LINKED_USER, "")
        },
    )
    .await;

    // A revoked Management token: 401, new token, retry.
    emulator.revoke_management_tokens();
    let _ = get_on(client, bypass_request(seed::GOOGLE_USER, "google-oauth2")).await;
    // Auth0 failing: 500 and 429 on the users endpoint.
    emulator.inject_faults(
        Endpoint::Users,
        vec![
            Fault::Status(500),
            Fault::RateLimited {
                retry_after: Some(1),
                reset_in_secs: 1,
            },
        ],
    );
    let _ = get_on(client, bypass_request(seed::TWITTER_USER, "twitter")).await;
    let _ = get_on(client, bypass_request(seed::TWITTER_USER, "twitter")).await;
    // A Management token without read:user_idp_tokens (error log with the scope).
    emulator.set_scope("read:users");
    emulator.revoke_management_tokens();
    let _ = get_on(client, bypass_request(seed::LINKED_USER, "github")).await;
    // The broker's own credentials rejected on /oauth/token.
    emulator.set_scope("read:users read:user_idp_tokens");
    emulator.revoke_management_tokens();
    emulator.inject_faults(Endpoint::Token, vec![Fault::Status(401)]);
    let _ = get_on(client, bypass_request(seed::ODD_ID_USER, "oauth2")).await;
    // And back to normal.
    let token = get_on(client, bypass_request(seed::TWITTER_USER, "twitter"))
        .await
        .expect("the broker recovers");
    assert_eq!(token.access_token_secret, seed::TWITTER_ACCESS_TOKEN_SECRET);
    released + 1
}

#[tokio::test]
async fn logs_and_metrics_never_contain_a_token_or_the_client_secret() {
    const CLIENT_ID: &str = "tokenbroker-binary-test";
    const CLIENT_SECRET: &str = "binary-test-client-secret-b71e0d";
    const CALLER_ID: &str = "spiffe://test.example/ns/it/sa/binary";
    const STRANGER_ID: &str = "spiffe://test.example/ns/it/sa/stranger";
    let emulator = Emulator::start(EmulatorConfig::new(CLIENT_ID, CLIENT_SECRET))
        .await
        .expect("emulator starts");

    let served = ServedBinary::start(
        &emulator,
        (CLIENT_ID, CLIENT_SECRET),
        &[CALLER_ID, STRANGER_ID],
        // Every provider but "auth0", so denials are logged too.
        &format!(
            "[[caller]]\nid = \"{CALLER_ID}\"\nproviders = [\"github\", \"google-oauth2\", \"twitter\", \"oauth2\"]\ninvalidate = true\nbypass_cache = true\n"
        ),
        "trace,h2=info,hyper=info,tower=info,rustls=info",
    );
    let ServedBinary {
        mut child,
        addr,
        metrics_addr,
        ca,
        mut client_certs,
        server_key_pem,
        stdout_path,
        stderr_path,
        _dir,
    } = served;
    let stranger_cert = client_certs.pop().expect("stranger cert");
    let client_cert = client_certs.pop().expect("client cert");
    let mut client = connect_when_listening(&mut child, addr, &ca.cert_pem, &client_cert).await;
    let released = exercise_everything(&mut client, &emulator).await;
    drop(client);
    // A caller the policy does not list is refused, and that is logged too.
    let mut stranger = mtls_client(addr, &ca.cert_pem, Some(&stranger_cert))
        .await
        .expect("a certificate from the client CA passes the handshake");
    let refused = get_on(&mut stranger, get_request(seed::GITHUB_USER, "github"))
        .await
        .expect_err("an unlisted caller gets no token");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    drop(stranger);
    let metrics = scrape_metrics(metrics_addr).await;
    assert_metrics_moved(&metrics);
    let status = terminate(&mut child).await;
    assert!(status.success(), "serve exits cleanly on SIGTERM: {status}");
    // Every ID token the emulator signed starts with this header.
    let id_token = emulator.issue_id_token(seed::GOOGLE_USER);
    let id_token_header = id_token.split('.').next().unwrap_or(&id_token).to_owned();
    emulator.shutdown().await;

    let stdout = std::fs::read_to_string(&stdout_path).expect("read stdout");
    let stderr = std::fs::read_to_string(&stderr_path).expect("read stderr");
    // The metrics output is held to the same rule as the logs.
    let all = format!("{stdout}\n{stderr}\n{metrics}");
    for secret in seed::planted_secrets() {
        assert!(
            !all.contains(secret),
            "an IdP token or secret leaked into the logs: {secret}"
        );
    }
    // ID tokens are credentials too: no part of one may appear.
    assert!(
        !all.contains(&id_token_header),
        "an ID token leaked into the logs"
    );
    assert!(
        !all.contains(CLIENT_SECRET),
        "the client secret leaked into the logs"
    );
    assert!(
        !all.contains("emu_mgmt_"),
        "a Management API token leaked into the logs"
    );
    for (name, pem) in [
        ("server", &server_key_pem),
        ("client", &client_cert.key_pem),
    ] {
        let body = pem.lines().nth(1).expect("a PEM key has a body");
        assert!(
            !all.contains(body),
            "the {name} private key leaked into the logs"
        );
    }

    assert!(!stdout.trim().is_empty(), "the broker logged something");
    let mut audit_releases = Vec::new();
    for line in stdout.lines().filter(|line| !line.trim().is_empty()) {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("stdout line is not JSON ({error}): {line}"));
        if event["type"] == "tokenbroker.audit.v1" && event["outcome"] == "released" {
            audit_releases.push(event);
        }
    }
    assert!(
        stdout.contains(r#""type":"tokenbroker.audit.v1""#),
        "token releases are audit lines (on stdout, the default audit sink)"
    );
    assert!(
        audit_releases.len() >= released,
        "{released} GetIdpToken RPCs released a token but only {} audit events record a release",
        audit_releases.len()
    );
    // An audit event names the caller, the user, the provider and the outcome.
    let github_release = audit_releases
        .iter()
        .find(|event| event["user_id"] == seed::GITHUB_USER)
        .expect("an audit event records the GitHub release");
    assert_eq!(github_release["caller"], CALLER_ID, "{github_release}");
    assert_eq!(
        github_release["bound_to_id_token"], false,
        "a release by user_id is recorded as not bound: {github_release}"
    );
    let bound_release = audit_releases
        .iter()
        .find(|event| event["bound_to_id_token"] == true)
        .expect("an audit event records the release bound to an ID token");
    assert_eq!(
        bound_release["user_id"],
        seed::GOOGLE_USER,
        "the bound release names the ID token's subject: {bound_release}"
    );
    assert!(
        stdout
            .lines()
            .any(|line| line.contains(r#""outcome":"refused""#) && line.contains("signature")),
        "the forged ID token's refusal is audited with its reason"
    );
    let fields = github_release.as_object().expect("event is an object");
    assert!(
        fields.values().any(|value| value == "github"),
        "the audit event names the provider: {github_release}"
    );
}

// ---------------------------------------------------------------------------------------------
// tokenbroker dev
// ---------------------------------------------------------------------------------------------

/// Runs `tokenbroker dev` in `dir`, checks its banner, fetches the seeded
/// GitHub token with the PKI it wrote, stops it with SIGTERM and returns the
/// CA certificate it used.
async fn run_dev_once(dir: &Path) -> String {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let dir_arg = dir.display().to_string();
    let listen_arg = addr.to_string();
    let mut command = tokenbroker(&["dev", "--listen", &listen_arg, "--dir", &dir_arg]);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn tokenbroker dev");

    // Drain stderr in the background so the child can never block on it.
    let mut stderr = child.stderr.take().expect("piped stderr");
    let stderr_task = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });

    // Read stdout (bounded) until the banner's last line.
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut banner = String::new();
    let read_banner = async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            banner.push_str(&line);
            banner.push('\n');
            if line.contains("Ctrl-C stops it.") {
                return true;
            }
        }
        false
    };
    let complete = tokio::time::timeout(PROCESS_BOUND, read_banner)
        .await
        .expect("tokenbroker dev prints its banner in time");
    assert!(complete, "stdout closed before the banner ended:\n{banner}");
    // Keep draining stdout so logging never blocks the child.
    let stdout_task = tokio::spawn(async move {
        let mut rest = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    });

    let ca_path = dir.join("ca.pem");
    let cert_path = dir.join("client.pem");
    let key_path = dir.join("client.key");
    let grpcurl_lines: Vec<&str> = banner
        .lines()
        .filter(|line| line.trim_start().starts_with("grpcurl "))
        .collect();
    assert!(
        !grpcurl_lines.is_empty(),
        "the banner shows grpcurl commands:\n{banner}"
    );
    for line in &grpcurl_lines {
        assert!(
            line.contains(&format!("-cacert {}", ca_path.display()))
                && line.contains(&format!("-cert {}", cert_path.display()))
                && line.contains(&format!("-key {}", key_path.display())),
            "each grpcurl line carries the dev PKI files: {line}"
        );
        assert!(
            line.contains(&listen_arg),
            "each grpcurl line targets {listen_arg}: {line}"
        );
    }
    assert!(
        grpcurl_lines
            .iter()
            .any(|line| line.contains("GetIdpToken") && line.contains(seed::GITHUB_USER)),
        "the banner shows a GetIdpToken example for the seeded GitHub user:\n{banner}"
    );

    let ca_pem = std::fs::read_to_string(&ca_path).expect("dev wrote ca.pem");
    let cert = IssuedCertificate {
        cert_pem: std::fs::read_to_string(&cert_path).expect("dev wrote client.pem"),
        key_pem: std::fs::read_to_string(&key_path).expect("dev wrote client.key"),
    };
    let mut client = connect_when_listening(&mut child, addr, &ca_pem, &cert).await;
    let token = get_on(&mut client, get_request(seed::GITHUB_USER, "github"))
        .await
        .expect("the dev broker serves the seeded GitHub token");
    assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
    assert_eq!(token.idp_user_id, seed::GITHUB_IDP_USER_ID.to_string());
    let id_token =
        id_token_in(&grpcurl_lines).expect("the banner shows a grpcurl line with an ID token");
    let bound = get_on(
        &mut client,
        GetIdpTokenRequest {
            id_token,
            ..get_request("", "github")
        },
    )
    .await
    .expect("the banner's ID token is accepted by the dev broker");
    assert_eq!(bound.access_token, seed::GITHUB_ACCESS_TOKEN);
    drop(client);

    let status = terminate(&mut child).await;
    let stdout_rest = tokio::time::timeout(SIGTERM_BOUND, stdout_task)
        .await
        .map(|joined| joined.unwrap_or_default())
        .unwrap_or_default();
    let stderr_text = tokio::time::timeout(SIGTERM_BOUND, stderr_task)
        .await
        .map(|joined| joined.unwrap_or_default())
        .unwrap_or_default();
    assert!(
        status.success(),
        "tokenbroker dev exits 0 on SIGTERM, got {status}\nstdout:\n{stdout_rest}\nstderr:\n{stderr_text}"
    );
    ca_pem
}

/// The `id_token` value of the first grpcurl line that sends one.
fn id_token_in(grpcurl_lines: &[&str]) -> Option<String> {
    const FIELD: &str = "\"id_token\": \"";
    let line = grpcurl_lines.iter().find(|line| line.contains(FIELD))?;
    let start = line.find(FIELD)? + FIELD.len();
    let rest = &line[start..];
    Some(rest[..rest.find('"')?].to_owned())
}

#[tokio::test]
async fn dev_command_serves_the_seeded_github_token() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("dev-pki");

    let first_ca = run_dev_once(&dir).await;
    let second_ca = run_dev_once(&dir).await;

    assert_eq!(
        first_ca, second_ca,
        "the second run reuses the dev PKI instead of generating a new CA"
    );
}

/// The Prometheus text of the broker's metrics endpoint.
async fn scrape_metrics(addr: SocketAddr) -> String {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    let response = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("metrics endpoint answers");
    assert!(response.status().is_success(), "{}", response.status());
    response.text().await.expect("metrics body")
}

/// Counters moved for the RPCs and Auth0 calls the test made, and no label
/// carries a user id.
fn assert_metrics_moved(metrics: &str) {
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|line| line.starts_with(prefix))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        value("tokenbroker_rpc_total{method=\"GetIdpToken\",code=\"OK\"}") >= 1.0,
        "{metrics}"
    );
    assert!(
        value("tokenbroker_rpc_total{method=\"GetIdpToken\",code=\"PERMISSION_DENIED\"}") >= 1.0,
        "{metrics}"
    );
    assert!(
        value("tokenbroker_auth0_requests_total{endpoint=\"/api/v2/users\",status=\"200\"}") >= 1.0,
        "{metrics}"
    );
    assert!(
        value("tokenbroker_cache_lookups_total{outcome=\"hit\"}") >= 1.0,
        "{metrics}"
    );
    assert!(
        value("tokenbroker_management_token_refreshes_total") >= 1.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("tokenbroker_rpc_duration_seconds_bucket"),
        "latency histograms"
    );
    for user in seed::user_ids() {
        assert!(!metrics.contains(user), "a user id became a label: {user}");
    }
}

/// `tokenbroker serve` as a child process against `emulator`, with a fresh
/// PKI, a policy, JSON logs to files and a metrics port.
struct ServedBinary {
    child: tokio::process::Child,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    ca: CertificateAuthority,
    /// One client certificate per requested caller id, in order.
    client_certs: Vec<IssuedCertificate>,
    /// To check the key never reaches a log.
    server_key_pem: String,
    stdout_path: std::path::PathBuf,
    stderr_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl ServedBinary {
    fn start(
        emulator: &Emulator,
        credentials: (&str, &str),
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
        (client_id, client_secret): (&str, &str),
        caller_ids: &[&str],
        policy: &str,
        (rust_log, log_format): (&str, &str),
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = CertificateAuthority::generate("binary test CA").expect("CA");
        let server = ca.issue(&LeafSpec::loopback_server()).expect("server cert");
        let client_certs = caller_ids
            .iter()
            .map(|id| ca.issue(&LeafSpec::spiffe_client(id)).expect("client cert"))
            .collect();
        let path = |name: &str| dir.path().join(name);
        write_file(&path("server.pem"), &server.cert_pem, false).expect("write");
        write_file(&path("server.key"), &server.key_pem, true).expect("write");
        write_file(&path("ca.pem"), &ca.cert_pem, false).expect("write");
        write_file(&path("secret"), &format!("{client_secret}\n"), true).expect("write");
        write_file(&path("policy.toml"), policy, false).expect("write");
        let stdout_path = path("stdout.log");
        let stderr_path = path("stderr.log");
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let metrics_addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut command = tokenbroker(&["serve"]);
        command
            .env("TOKENBROKER_METRICS_LISTEN", metrics_addr.to_string())
            .env("AUTH0_DOMAIN", emulator.base_url())
            .env("AUTH0_CLIENT_ID", client_id)
            .env("AUTH0_CLIENT_SECRET_FILE", path("secret"))
            .env("AUTH0_ID_TOKEN_AUDIENCES", emulator.id_token_audience())
            .env("TOKENBROKER_LISTEN", addr.to_string())
            .env("TOKENBROKER_TLS_CERT", path("server.pem"))
            .env("TOKENBROKER_TLS_KEY", path("server.key"))
            .env("TOKENBROKER_CLIENT_CA", path("ca.pem"))
            .env("TOKENBROKER_POLICY", path("policy.toml"))
            .env("TOKENBROKER_LOG_FORMAT", log_format)
            .env("RUST_LOG", rust_log)
            .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
        let child = command.spawn().expect("spawn tokenbroker serve");
        Self {
            child,
            addr,
            metrics_addr,
            ca,
            client_certs,
            server_key_pem: server.key_pem,
            stdout_path,
            stderr_path,
            _dir: dir,
        }
    }
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_rpc_finish_and_exits_0() {
    const CALLER_ID: &str = "spiffe://test.example/ns/it/sa/drain";
    let emulator = Emulator::start(EmulatorConfig::new("drain-test", "drain-test-secret"))
        .await
        .expect("emulator starts");
    let mut served = ServedBinary::start(
        &emulator,
        ("drain-test", "drain-test-secret"),
        &[CALLER_ID],
        &format!("[[caller]]\nid = \"{CALLER_ID}\"\nproviders = [\"*\"]\n"),
        "info",
    );
    let cert = served.client_certs.pop().expect("cert");
    let mut client =
        connect_when_listening(&mut served.child, served.addr, &served.ca.cert_pem, &cert).await;
    emulator.set_latency(Duration::from_millis(1500));
    let in_flight =
        tokio::spawn(
            async move { get_on(&mut client, get_request(seed::GITHUB_USER, "github")).await },
        );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = terminate(&mut served.child).await;
    let token = in_flight
        .await
        .expect("task")
        .expect("the RPC in flight at SIGTERM completes");
    assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
    assert!(status.success(), "exit 0 after draining: {status}");
    emulator.shutdown().await;
}

/// What an unlisted caller sends to forge an audit line: a newline, then a
/// line that looks like a release.
const FORGED_LINE: &str =
    "FORGED-LINE audit: caller=\"spiffe://test.example/ns/it/sa/victim\" outcome=\"released\"";

#[tokio::test]
async fn callers_cannot_forge_or_inflate_log_lines_in_either_format() {
    const CALLER_ID: &str = "spiffe://test.example/ns/it/sa/logs";
    const STRANGER_ID: &str = "spiffe://test.example/ns/it/sa/stranger";
    for format in ["text", "json"] {
        let emulator = Emulator::start(EmulatorConfig::new("logs-test", "logs-test-secret"))
            .await
            .expect("emulator starts");
        let mut served = ServedBinary::start_logging(
            &emulator,
            ("logs-test", "logs-test-secret"),
            &[CALLER_ID, STRANGER_ID],
            &format!("[[caller]]\nid = \"{CALLER_ID}\"\nproviders = [\"github\"]\n"),
            ("info", format),
        );
        let stranger_cert = served.client_certs.pop().expect("stranger cert");
        let caller_cert = served.client_certs.pop().expect("caller cert");
        let mut caller = connect_when_listening(
            &mut served.child,
            served.addr,
            &served.ca.cert_pem,
            &caller_cert,
        )
        .await;
        let mut stranger = mtls_client(served.addr, &served.ca.cert_pem, Some(&stranger_cert))
            .await
            .expect("connects");
        let forged = format!("x\n{FORGED_LINE}");
        let refused = invalidate_on(&mut stranger, &forged)
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        let _ = get_on(&mut caller, get_request(&forged, &forged)).await;
        // 50 calls with two 30 000-byte fields (the request cap is 64 KiB).
        let giant = "g".repeat(30_000);
        for _ in 0..25 {
            let _ = get_on(&mut stranger, get_request(&giant, &giant)).await;
            let _ = get_on(&mut caller, get_request(&giant, &giant)).await;
        }
        // A message that does not decode, from a listed caller.
        let channel =
            crate::support::mtls_channel(served.addr, &served.ca.cert_pem, Some(&caller_cert))
                .await
                .expect("connects");
        let status =
            crate::support::send_raw(channel, "GetIdpToken", b"\x0a\x03\xff\xfe\xfd".to_vec())
                .await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        let metrics = scrape_metrics(served.metrics_addr).await;
        drop((caller, stranger));
        let status = terminate(&mut served.child).await;
        assert!(status.success(), "{format}: exit 0 on SIGTERM: {status}");
        emulator.shutdown().await;

        let stdout = std::fs::read_to_string(&served.stdout_path).expect("read stdout");
        assert!(
            stdout.lines().all(|line| !line.starts_with("FORGED-LINE")),
            "{format}: a caller's newline started a log line of its own:\n{stdout}"
        );
        assert!(
            stdout.len() < 200_000,
            "{format}: 50 giant requests wrote {} bytes of log",
            stdout.len()
        );
        let longest = stdout.lines().map(str::len).max().unwrap_or(0);
        assert!(longest < 4_000, "{format}: a log line of {longest} bytes");
        let malformed_audited = stdout.lines().any(|line| {
            line.contains("audit") && line.contains("MALFORMED_REQUEST") && line.contains(CALLER_ID)
        });
        assert!(
            malformed_audited,
            "{format}: the malformed request has an audit line:\n{stdout}"
        );
        assert!(
            metrics.contains(r#"tokenbroker_rpc_refusals_total{method="GetIdpToken",reason="MALFORMED_REQUEST"} 1"#),
            "the malformed request is counted:\n{metrics}"
        );
        if format == "json" {
            for line in stdout.lines().filter(|line| !line.trim().is_empty()) {
                let event: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
                if let Some(user_id) = event["user_id"].as_str() {
                    assert!(user_id.len() <= 600, "a user_id of {} bytes", user_id.len());
                }
            }
        }
    }
}
