//! `tokenbroker dev`: its banner, the PKI it writes (and reuses), and the
//! seeded tokens it serves with them (a profile token, and one from the
//! emulated Token Vault, exchanged with the dev client assertion key).

use std::path::Path;
use std::process::Stdio;

use tokenbroker::emulator::seed;
use tokenbroker::pki::IssuedCertificate;
use tokenbroker::proto::{GetIdpTokenRequest, TokenSource};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::{
    connect_when_listening, free_loopback_addr, terminate, tokenbroker, PROCESS_BOUND,
    SIGTERM_BOUND,
};
use crate::support::{get_on, get_request};

/// Runs `tokenbroker dev` in `dir`, checks its banner, fetches the seeded
/// GitHub token with the PKI it wrote, stops it with SIGTERM and returns the
/// CA certificate it used.
async fn run_dev_once(dir: &Path) -> String {
    let addr = free_loopback_addr();
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
    assert!(
        grpcurl_lines
            .iter()
            .any(|line| line.contains(seed::VAULT_USER)
                && line.contains(seed::TOKEN_VAULT_CONNECTION)),
        "the banner shows a Token Vault release:\n{banner}"
    );
    let vaulted = get_on(
        &mut client,
        GetIdpTokenRequest {
            connection: seed::TOKEN_VAULT_CONNECTION.to_owned(),
            ..get_request(seed::VAULT_USER, "")
        },
    )
    .await
    .expect("the dev broker exchanges at the emulated Token Vault, authenticated by its key");
    assert_eq!(vaulted.access_token, seed::VAULT_ACCESS_TOKEN);
    assert_eq!(vaulted.source, TokenSource::TokenVault as i32);
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
