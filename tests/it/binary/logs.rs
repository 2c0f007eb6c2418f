//! What the binary writes: no token, ID token, key or client secret ever
//! reaches a log line or a metric, every release is an audit event, and a
//! caller can neither forge a log line nor inflate one, in either format.

use std::net::SocketAddr;
use std::time::Duration;

use tokenbroker::emulator::keys::CLIENT_ASSERTION_KEY_1;
use tokenbroker::emulator::{seed, Emulator, Endpoint, Fault, IdTokenSpec, Signing};
use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::GetIdpTokenRequest;
use tokenbroker::testkit::Credentials;
use tonic::transport::Channel;

use super::{terminate, ClientAuth, ServedBinary};
use crate::support::{
    bypass_request, get_on, get_request, invalidate_on, list_on, mtls_channel, mtls_client,
    public_key_pem, register_assertion_key, send_raw, write_connections, RedisServer,
    TestConnections,
};

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
    // A refresh at the IdP, and a refresh the IdP refuses.
    let refreshed = get_on(
        client,
        get_request(seed::STALE_GOOGLE_USER, "google-oauth2"),
    )
    .await
    .expect("a stale Google token is refreshed at the IdP");
    assert_ne!(refreshed.access_token, seed::STALE_GOOGLE_ACCESS_TOKEN);
    released += 1;
    let _ = get_on(
        client,
        get_request(seed::REVOKED_GOOGLE_USER, "google-oauth2"),
    )
    .await
    .expect_err("a revoked refresh token means the user must reconnect");
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
    const CLIENT_SECRET: &str = "binary-test-client-secret-b71e0d";
    const CALLER_ID: &str = "spiffe://test.example/ns/it/sa/binary";
    const STRANGER_ID: &str = "spiffe://test.example/ns/it/sa/stranger";
    let credentials = Credentials {
        client_id: "tokenbroker-binary-test",
        client_secret: CLIENT_SECRET,
    };
    let emulator = credentials.start_emulator().await.expect("emulator starts");

    let mut served = ServedBinary::start(
        &emulator,
        credentials,
        &[CALLER_ID, STRANGER_ID],
        // Every provider but "auth0", so denials are logged too.
        &format!(
            "[[caller]]\nid = \"{CALLER_ID}\"\nproviders = [\"github\", \"google-oauth2\", \"twitter\", \"oauth2\"]\ninvalidate = true\nbypass_cache = true\n"
        ),
        "trace,h2=info,hyper=info,tower=info,rustls=info",
    );
    let stranger_cert = served.client_certs.pop().expect("stranger cert");
    let client_cert = served.client_certs.pop().expect("client cert");
    let mut client = served.connect_when_listening(&client_cert).await;
    let ServedBinary {
        mut child,
        addr,
        metrics_addr,
        pki,
        stdout_path,
        stderr_path,
        ..
    } = served;
    let released = exercise_everything(&mut client, &emulator).await;
    drop(client);
    // A caller the policy does not list is refused, and that is logged too.
    let mut stranger = mtls_client(addr, &pki.ca.cert_pem, Some(&stranger_cert))
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
        !all.contains(super::AUDIT_KEY_BASE64),
        "the audit key leaked into the logs"
    );
    assert!(
        !all.contains("emu_mgmt_"),
        "a Management API token leaked into the logs"
    );
    for (name, pem) in [
        ("server", &pki.server.key_pem),
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

/// The base64url of `{"alg":"RS256"` that starts every JWT the broker signs
/// (client assertions and Token Vault subject tokens alike).
const SIGNED_JWT_PREFIX: &str = "eyJhbGciOiJSUzI1NiI";

/// Runs the Token Vault and `private_key_jwt` paths of a served binary:
/// releases (a planted token, a refreshed one), refusals (no token set,
/// refused client, Auth0 failing), invalidation and the silent-switch hint.
/// Returns the tokens released that no seed plants.
async fn exercise_token_vault(
    client: &mut TokenBrokerClient<Channel>,
    emulator: &Emulator,
) -> Vec<String> {
    let vault = || get_request(seed::VAULT_USER, "google-oauth2");
    let token = get_on(client, vault())
        .await
        .expect("a Token Vault release");
    assert_eq!(token.access_token, seed::VAULT_ACCESS_TOKEN);
    let _ = get_on(client, bypass_request(seed::VAULT_USER, "")).await;
    let _ = list_on(client, seed::VAULT_USER).await;
    emulator.expire_token_vault_set(seed::VAULT_USER, seed::TOKEN_VAULT_CONNECTION);
    let _ = invalidate_on(client, seed::VAULT_USER).await;
    let refreshed = get_on(client, vault())
        .await
        .expect("refreshed in the vault");
    emulator.remove_token_vault_set(seed::VAULT_USER, seed::TOKEN_VAULT_CONNECTION);
    let _ = invalidate_on(client, seed::VAULT_USER).await;
    let _ = get_on(client, vault()).await.expect_err("no token set");
    let put = emulator.put_token_vault_set(seed::VAULT_USER, seed::TOKEN_VAULT_CONNECTION, 600);
    emulator.inject_faults(
        Endpoint::TokenExchange,
        vec![
            Fault::Status(401),
            Fault::Status(503),
            Fault::Status(503),
            Fault::Status(503),
        ],
    );
    let _ = get_on(client, vault()).await.expect_err("client refused");
    let _ = get_on(client, vault()).await.expect_err("Auth0 failing");
    let released = get_on(client, vault()).await.expect("back to normal");
    assert_eq!(released.access_token, put);
    let _ = get_on(client, get_request(seed::SWITCHED_USER, "github"))
        .await
        .expect_err("the silent switch");
    // A Management token got by a new client assertion.
    emulator.revoke_management_tokens();
    let _ = get_on(client, bypass_request(seed::GITHUB_USER, "github"))
        .await
        .expect("served");
    vec![refreshed.access_token, put]
}

#[tokio::test]
async fn token_vault_logs_never_contain_an_assertion_a_subject_token_the_key_or_a_token() {
    const CALLER_ID: &str = "spiffe://test.example/ns/it/sa/vault-logs";
    const CLIENT_ID: &str = "tokenbroker-vault-logs";
    let credentials = Credentials {
        client_id: CLIENT_ID,
        client_secret: "vault-logs-secret-never-used",
    };
    let emulator = credentials.start_emulator().await.expect("emulator starts");
    register_assertion_key(&emulator, &public_key_pem(CLIENT_ASSERTION_KEY_1));
    let dir = tempfile::tempdir().expect("temp dir");
    let connections = dir.path().join("connections.toml");
    let vault = TestConnections {
        token_vault: vec![seed::TOKEN_VAULT_CONNECTION],
        ..TestConnections::default()
    };
    write_connections(&connections, &vault, &emulator);
    let connections = connections.display().to_string();
    let mut served = ServedBinary::start_as(
        &emulator,
        ClientAuth::AssertionKey {
            client_id: CLIENT_ID,
            key_pem: CLIENT_ASSERTION_KEY_1,
        },
        &[CALLER_ID],
        &format!(
            "[[caller]]\nid = \"{CALLER_ID}\"\nproviders = [\"*\"]\ninvalidate = true\nbypass_cache = true\n"
        ),
        ("trace,h2=info,hyper=info,tower=info,rustls=info", "json"),
        &[("TOKENBROKER_CONNECTIONS", &connections)],
    );
    let client_cert = served.client_certs.pop().expect("client cert");
    let mut client = served.connect_when_listening(&client_cert).await;
    let released = exercise_token_vault(&mut client, &emulator).await;
    drop(client);
    let metrics = scrape_metrics(served.metrics_addr).await;
    let status = terminate(&mut served.child).await;
    assert!(status.success(), "serve exits cleanly on SIGTERM: {status}");
    emulator.shutdown().await;

    let also = [SIGNED_JWT_PREFIX, "emu_mgmt_", "ya29.emu_vault_"];
    let stdout = assert_no_secret_in_output(&served, &metrics, &released, &also);
    assert!(
        stdout.contains("refused the broker's Token Vault exchange"),
        "the refused client is logged as an error"
    );
    assert!(
        metrics.contains(r#"tokenbroker_token_not_stored_total{connection="github"} 1"#),
        "the silent switch is counted per connection:\n{metrics}"
    );
    assert!(
        metrics.contains("tokenbroker_token_vault_exchanges_total"),
        "exchanges are counted:\n{metrics}"
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
    for counter in [
        r#"tokenbroker_rpc_total{method="GetIdpToken",code="OK"}"#,
        r#"tokenbroker_rpc_total{method="GetIdpToken",code="PERMISSION_DENIED"}"#,
        r#"tokenbroker_auth0_requests_total{endpoint="/api/v2/users",status="200"}"#,
        r#"tokenbroker_cache_lookups_total{outcome="hit"}"#,
        "tokenbroker_management_token_refreshes_total",
    ] {
        assert!(value(counter) >= 1.0, "{counter} moved:\n{metrics}");
    }
    assert!(
        metrics.contains("tokenbroker_rpc_duration_seconds_bucket"),
        "latency histograms"
    );
    for user in seed::user_ids() {
        assert!(!metrics.contains(user), "a user id became a label: {user}");
    }
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
        let credentials = Credentials {
            client_id: "logs-test",
            client_secret: "logs-test-secret",
        };
        let emulator = credentials.start_emulator().await.expect("emulator starts");
        let mut served = ServedBinary::start_logging(
            &emulator,
            credentials,
            &[CALLER_ID, STRANGER_ID],
            &format!("[[caller]]\nid = \"{CALLER_ID}\"\nproviders = [\"github\"]\n"),
            ("info", format),
        );
        let stranger_cert = served.client_certs.pop().expect("stranger cert");
        let caller_cert = served.client_certs.pop().expect("caller cert");
        let mut caller = served.connect_when_listening(&caller_cert).await;
        let mut stranger = mtls_client(served.addr, &served.pki.ca.cert_pem, Some(&stranger_cert))
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
        let channel = mtls_channel(served.addr, &served.pki.ca.cert_pem, Some(&caller_cert))
            .await
            .expect("connects");
        let status = send_raw(channel, "GetIdpToken", b"\x0a\x03\xff\xfe\xfd".to_vec()).await;
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

#[tokio::test]
async fn fleet_logs_never_contain_a_token_a_refresh_token_or_the_redis_password() {
    use base64::Engine;
    const CALLER_ID: &str = "spiffe://test.example/ns/it/sa/fleet-logs";
    const REDIS_PASSWORD: &str = "fleet-logs-redis-password-5c1a";
    let credentials = Credentials {
        client_id: "tokenbroker-fleet-logs",
        client_secret: "fleet-logs-client-secret-93d2",
    };
    let emulator = credentials.start_emulator().await.expect("emulator starts");
    emulator.set_idp_rotation(true);
    let redis = RedisServer::start_with_password(REDIS_PASSWORD).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let connections = dir.path().join("connections.toml");
    let refreshed = TestConnections {
        refreshed_at_idp: vec!["google-oauth2"],
        ..TestConnections::default()
    };
    write_connections(&connections, &refreshed, &emulator);
    let cache_key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let cache_key_file = dir.path().join("cache.key");
    std::fs::write(&cache_key_file, format!("{cache_key}\n")).expect("write cache key");
    let (connections, cache_key_file) = (
        connections.display().to_string(),
        cache_key_file.display().to_string(),
    );
    let mut served = ServedBinary::start_as(
        &emulator,
        ClientAuth::Secret(credentials),
        &[CALLER_ID],
        &format!(
            "[[caller]]\nid = \"{CALLER_ID}\"\nproviders = [\"*\"]\ninvalidate = true\nbypass_cache = true\n"
        ),
        ("trace,h2=info,hyper=info,tower=info,rustls=info", "json"),
        &[
            ("TOKENBROKER_CONNECTIONS", &connections),
            ("TOKENBROKER_REDIS_URL", &redis.url()),
            ("TOKENBROKER_CACHE_KEY_FILE", &cache_key_file),
        ],
    );
    let client_cert = served.client_certs.pop().expect("client cert");
    let mut client = served.connect_when_listening(&client_cert).await;
    // Profiles through Redis, a refresh with rotation (the rotated refresh
    // token goes to Redis), invalidation and bypass_cache published.
    let mut released = Vec::new();
    for (user, provider) in [
        (seed::GITHUB_USER, "github"),
        (seed::STALE_GOOGLE_USER, "google-oauth2"),
    ] {
        let token = get_on(&mut client, get_request(user, provider))
            .await
            .expect("released");
        released.push(token.access_token);
    }
    let _ = invalidate_on(&mut client, seed::STALE_GOOGLE_USER).await;
    let _ = get_on(&mut client, bypass_request(seed::GITHUB_USER, "github")).await;
    let _ = list_on(&mut client, seed::LINKED_USER).await;
    drop(client);
    let metrics = scrape_metrics(served.metrics_addr).await;
    let status = terminate(&mut served.child).await;
    assert!(status.success(), "serve exits cleanly on SIGTERM: {status}");
    emulator.shutdown().await;

    assert!(
        metrics.contains("tokenbroker_fleet_shared 1"),
        "the broker ran in shared mode:\n{metrics}"
    );
    assert!(
        metrics.contains("tokenbroker_fleet_invalidations_total"),
        "invalidations went through Redis:\n{metrics}"
    );
    let also = [REDIS_PASSWORD, cache_key.as_str(), "emu_mgmt_"];
    assert_no_secret_in_output(&served, &metrics, &released, &also);
}

/// Asserts that no planted secret, no token in `released` and nothing in
/// `also` is in the binary's stdout, stderr or `metrics`; the stdout.
fn assert_no_secret_in_output(
    served: &ServedBinary,
    metrics: &str,
    released: &[String],
    also: &[&str],
) -> String {
    let stdout = std::fs::read_to_string(&served.stdout_path).expect("read stdout");
    let stderr = std::fs::read_to_string(&served.stderr_path).expect("read stderr");
    let all = format!("{stdout}\n{stderr}\n{metrics}");
    let leaked = seed::planted_secrets()
        .into_iter()
        .chain(released.iter().map(String::as_str))
        .chain(also.iter().copied());
    for secret in leaked {
        assert!(!all.contains(secret), "leaked into the logs: {secret}");
    }
    stdout
}
