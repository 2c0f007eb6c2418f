//! Start-up validation: a bad configuration or an unusable file stops the
//! binary at once, with one `tokenbroker: error:` line (or clap's usage
//! error) naming what is wrong, and never the secret.

use std::process::{Output, Stdio};

use tokenbroker::testkit::TestPki;
use tokio::process::Command;

use super::{free_port, tokenbroker, PROCESS_BOUND};

/// Runs `command` to completion (bounded), capturing its output.
async fn run_to_exit(mut command: Command) -> Output {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = command.spawn().expect("spawn tokenbroker");
    tokio::time::timeout(PROCESS_BOUND, child.wait_with_output())
        .await
        .expect("tokenbroker exits on its own with a bad config")
        .expect("wait for tokenbroker")
}

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
    let not_a_key = secret_file.clone();

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
            &[
                "AUTH0_CLIENT_SECRET ",
                "AUTH0_CLIENT_SECRET_FILE",
                "AUTH0_CLIENT_ASSERTION_KEY_FILE",
            ],
        ),
        BadStart::new(
            "a secret and a client assertion key",
            vec![("AUTH0_CLIENT_ASSERTION_KEY_FILE", not_a_key.clone())],
            vec![],
            &["AUTH0_CLIENT_SECRET", "AUTH0_CLIENT_ASSERTION_KEY_FILE"],
        ),
        BadStart::new(
            "a client assertion key file that holds no key",
            vec![("AUTH0_CLIENT_ASSERTION_KEY_FILE", not_a_key.clone())],
            vec!["AUTH0_CLIENT_SECRET"],
            &["AUTH0_CLIENT_ASSERTION_KEY_FILE", "no PEM private key"],
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
    let pki = TestPki::generate("start-up test CA").expect("test PKI");
    let path = |name: &str| pki.path(name).display().to_string();
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
