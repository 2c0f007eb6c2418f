//! The audit trail: one JSON line per RPC on its own sink, a fingerprint of
//! every released token that an investigator can recompute, nothing secret
//! in it, and no release without its line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokenbroker::audit::{AuditSettings, SinkTarget};
use tokenbroker::emulator::seed;
use tokio::io::AsyncWriteExt;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{bounded, BackgroundReleases, Options, TestBroker};

/// base64 of 32 bytes: the key format `openssl rand -base64 32` writes.
const AUDIT_KEY_BASE64: &str = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";

/// A broker writing its audit to `dir/audit.log` under the test key.
async fn audited_broker(dir: &Path) -> (TestBroker, PathBuf) {
    audited_broker_with(dir, Options::default()).await
}

/// [`audited_broker`] with `options` otherwise.
async fn audited_broker_with(dir: &Path, options: Options) -> (TestBroker, PathBuf) {
    let log = dir.join("audit.log");
    (broker_auditing_to(dir, &log, options).await, log)
}

/// A broker writing its audit to `log` under the test key (in `dir`).
async fn broker_auditing_to(dir: &Path, log: &Path, options: Options) -> TestBroker {
    let key_file = dir.join("audit.key");
    std::fs::write(&key_file, format!("{AUDIT_KEY_BASE64}\n")).expect("write key");
    TestBroker::start_with(Options {
        audit: AuditSettings {
            target: SinkTarget::File(log.to_owned()),
            key_file: Some(key_file),
        },
        ..options
    })
    .await
}

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// HMAC-SHA256 with the `hmac` crate (not the broker's ring), hex.
fn independent_fingerprint(token: &str) -> String {
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD
        .decode(AUDIT_KEY_BASE64)
        .expect("key");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(token.as_bytes());
    format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
}

/// What `tokenbroker audit-hash --key-file` prints for `token`.
async fn audit_hash_command(key_file: &Path, token: &str) -> String {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenbroker"))
        .args(["audit-hash", "--key-file"])
        .arg(key_file)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn audit-hash");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{token}\n").as_bytes())
        .await
        .expect("write token");
    drop(stdin);
    let output = bounded("audit-hash", child.wait_with_output())
        .await
        .expect("audit-hash runs");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn every_rpc_writes_one_audit_line_with_its_fields() {
    let dir = tempfile::tempdir().expect("dir");
    let (broker, log) = audited_broker(dir.path()).await;
    broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("released");
    broker.list(seed::LINKED_USER).await.expect("listed");
    broker
        .invalidate(seed::GITHUB_USER)
        .await
        .expect("invalidated");
    let refused = broker.get(seed::GITHUB_USER, "twitter").await;
    assert_eq!(refused.expect_err("no twitter").code(), Code::NotFound);
    broker.stop().await;

    let lines = audit_lines(&log);
    assert_eq!(lines.len(), 4, "one line per RPC: {lines:#?}");
    for line in &lines {
        assert_eq!(line["type"], "tokenbroker.audit.v1");
        assert_eq!(line["caller"], crate::support::CLIENT_SPIFFE_ID);
        assert!(
            line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
        assert!(line["latency_ms"].is_u64(), "{line}");
    }
    let get = &lines[0];
    assert_eq!(get["method"], "GetIdpToken");
    assert_eq!(get["user_id"], seed::GITHUB_USER);
    assert_eq!(get["provider"], "github");
    assert_eq!(get["outcome"], "released");
    assert_eq!(get["code"], "OK");
    assert_eq!(get["released"][0]["provider"], "github");
    assert_eq!(get["released"][0]["source"], "AUTH0_PROFILE");
    assert_eq!(get["released"][0]["from_cache"], false);
    assert_eq!(
        get["released"][0]["token_hmac"],
        independent_fingerprint(seed::GITHUB_ACCESS_TOKEN)
    );
    let list = &lines[1];
    assert_eq!(list["method"], "ListIdpTokens");
    let released = list["released"].as_array().expect("released tokens");
    assert!(released.len() >= 2, "{list}");
    assert!(
        released.iter().all(|token| token["token_hmac"]
            .as_str()
            .is_some_and(|hmac| hmac.starts_with("hmac-sha256:"))),
        "every token of a ListIdpTokens has its fingerprint: {list}"
    );
    assert_eq!(lines[2]["method"], "InvalidateUser");
    assert_eq!(lines[2]["outcome"], "invalidated");
    let refusal = &lines[3];
    assert_eq!(refusal["outcome"], "refused");
    assert_eq!(refusal["code"], "NOT_FOUND");
    assert_eq!(refusal["reason"], "IDENTITY_NOT_LINKED");
    assert!(refusal.get("released").is_none());
}

#[tokio::test]
async fn a_refreshed_token_is_audited_with_its_source_and_fingerprint() {
    let dir = tempfile::tempdir().expect("dir");
    let options = Options {
        connections: Some(crate::support::TestConnections {
            refreshed_at_idp: vec!["google-oauth2"],
            ..Default::default()
        }),
        ..Options::default()
    };
    let (broker, log) = audited_broker_with(dir.path(), options).await;
    let refreshed = broker
        .get(seed::STALE_GOOGLE_USER, "google-oauth2")
        .await
        .expect("refreshed");
    assert_ne!(refreshed.access_token, seed::STALE_GOOGLE_ACCESS_TOKEN);
    broker.stop().await;

    let lines = audit_lines(&log);
    let released = &lines.last().expect("a line")["released"][0];
    assert_eq!(released["source"], "IDP_REFRESH", "{released}");
    assert_eq!(
        released["token_hmac"],
        independent_fingerprint(&refreshed.access_token),
        "the fingerprint of the token the caller got, not of the dead one"
    );
}

#[tokio::test]
async fn token_hmac_is_what_audit_hash_prints_and_nothing_secret_is_in_the_file() {
    let dir = tempfile::tempdir().expect("dir");
    let (broker, log) = audited_broker(dir.path()).await;
    for (user, provider) in [
        (seed::GITHUB_USER, "github"),
        (seed::GOOGLE_USER, "google-oauth2"),
        (seed::TWITTER_USER, "twitter"),
    ] {
        broker.get(user, provider).await.expect("released");
    }
    broker.list(seed::LINKED_USER).await.expect("listed");
    broker.stop().await;

    let text = std::fs::read_to_string(&log).expect("audit file");
    for secret in seed::planted_secrets() {
        assert!(
            !text.contains(secret),
            "a token or secret in the audit: {secret}"
        );
    }
    assert!(
        !text.contains(AUDIT_KEY_BASE64),
        "the audit key in the audit"
    );
    let from_command =
        audit_hash_command(&dir.path().join("audit.key"), seed::GOOGLE_ACCESS_TOKEN).await;
    assert_eq!(
        from_command,
        independent_fingerprint(seed::GOOGLE_ACCESS_TOKEN)
    );
    assert!(
        text.contains(&from_command),
        "an investigator finds the release of a leaked token by its fingerprint"
    );
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_sink_that_cannot_write_refuses_releases_and_no_token_leaves() {
    let broker = TestBroker::start_with(Options {
        audit: AuditSettings {
            target: SinkTarget::File(PathBuf::from("/dev/full")),
            key_file: None,
        },
        ..Options::default()
    })
    .await;
    let status = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect_err("no token without its audit line");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "AUDIT_UNAVAILABLE");
    assert!(!status.message().contains(seed::GITHUB_ACCESS_TOKEN));
    let listed = broker.list(seed::LINKED_USER).await;
    assert_eq!(listed.expect_err("refused").code(), Code::Unavailable);
    broker.stop().await;
}

/// A broker auditing to a named pipe, and the pipe's reading end.
#[cfg(target_os = "linux")]
struct AuditPipe {
    _dir: tempfile::TempDir,
    path: PathBuf,
    reader: tokio::net::unix::pipe::Receiver,
}

/// A broker auditing to a named pipe (its reading end opened first, so the
/// broker's writer can open the other), after one release whose line the
/// pipe took: its sink writes well.
#[cfg(target_os = "linux")]
async fn broker_writing_well_to_a_pipe() -> (TestBroker, AuditPipe) {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("audit.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .expect("mkfifo runs");
    assert!(made.success(), "mkfifo {}", path.display());
    let reader = tokio::net::unix::pipe::OpenOptions::new()
        .open_receiver(&path)
        .expect("reading end");
    let broker = broker_auditing_to(dir.path(), &path, Options::default()).await;
    broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("a first release while the pipe has room");
    let pipe = AuditPipe {
        _dir: dir,
        path,
        reader,
    };
    (broker, pipe)
}

/// Fills the named pipe `fifo` (through a writing end of the test's own),
/// so the broker's next audit write blocks until the test reads.
#[cfg(target_os = "linux")]
async fn fill(fifo: &Path) {
    let filler = tokio::net::unix::pipe::OpenOptions::new()
        .open_sender(fifo)
        .expect("second writing end");
    bounded("the pipe is writable", filler.writable())
        .await
        .expect("writable");
    let junk = [b'#'; 4096];
    let mut filled = 0;
    for _ in 0..1024 {
        match filler.try_write(&junk) {
            Ok(written) => filled += written,
            Err(_) => break,
        }
    }
    assert!(filled >= 4096, "the pipe took {filled} bytes");
}

/// Reads what the pipe holds now (bounded).
#[cfg(target_os = "linux")]
fn drain(reader: &tokio::net::unix::pipe::Receiver, into: &mut Vec<u8>) {
    let mut buffer = vec![0u8; 64 * 1024];
    for _ in 0..64 {
        match reader.try_read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(read) => into.extend_from_slice(&buffer[..read]),
        }
    }
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_token_leaves_the_broker_only_after_its_audit_line_is_written() {
    let (broker, pipe) = broker_writing_well_to_a_pipe().await;
    let mut read = Vec::new();

    // Fill the pipe: the writer's next write blocks until the test reads.
    fill(&pipe.path).await;
    let release = tokio::spawn({
        let mut client = broker.client().await;
        async move {
            let request = crate::support::get_request(seed::LINKED_USER, "github");
            client.get_idp_token(request).await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !release.is_finished(),
        "the token was answered while its audit line could not be written"
    );

    let answered = bounded("the held release", async {
        for _ in 0..1000 {
            drain(&pipe.reader, &mut read);
            if release.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        release.await.expect("task")
    })
    .await;
    drain(&pipe.reader, &mut read);
    let token = answered
        .expect("released")
        .into_inner()
        .token
        .expect("token");
    let text = String::from_utf8_lossy(&read);
    let line = text
        .lines()
        .map(|line| line.trim_start_matches('#'))
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["user_id"] == seed::LINKED_USER)
        .expect("the release's line was written");
    assert_eq!(
        line["released"][0]["token_hmac"],
        independent_fingerprint(&token.access_token)
    );
    broker.stop().await;
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_hung_audit_write_closes_the_held_connection_then_releases_are_refused() {
    let (broker, pipe) = broker_writing_well_to_a_pipe().await;
    fill(&pipe.path).await;
    // The write of this release's line hangs: after 5 s the watchdog fails
    // it and the connection holding the answer is closed, token unsent.
    let held = broker
        .get(seed::LINKED_USER, "github")
        .await
        .expect_err("no token while its line hangs");
    assert!(
        matches!(held.code(), Code::Unavailable | Code::Unknown),
        "{held:?}"
    );
    assert!(!format!("{held:?}").contains("gho_"));
    // The sink no longer writes well: the next release waits for its own
    // line, gives up after 5 s and says why.
    let refused = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect_err("still hung");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let info = refused.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "AUDIT_UNAVAILABLE");
    drop(pipe.reader);
    broker.stop().await;
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_sink_that_breaks_under_a_working_broker_lets_no_token_out() {
    let (broker, pipe) = broker_writing_well_to_a_pipe().await;
    for _ in 0..2 {
        broker
            .get(seed::GITHUB_USER, "github")
            .await
            .expect("released while the pipe is read");
    }
    // No reader any more: every write fails (EPIPE).
    drop(pipe.reader);
    // The first release after the break may already have been handed to its
    // connection: the connection is closed instead, and a tonic client
    // reports its transport error as UNKNOWN (gRPC's C and Go clients say
    // UNAVAILABLE). No answer carries the token.
    for attempt in 0..3 {
        let status = broker
            .get(seed::GITHUB_USER, "github")
            .await
            .expect_err("no token without its audit line");
        assert!(
            matches!(status.code(), Code::Unavailable | Code::Unknown),
            "attempt {attempt}: {status:?}"
        );
        assert!(!format!("{status:?}").contains(seed::GITHUB_ACCESS_TOKEN));
    }
    // Once the broker knows, it says why.
    let status = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect_err("still no sink");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "AUDIT_UNAVAILABLE");
    broker.stop().await;
}

#[tokio::test]
async fn a_rotated_file_is_reopened_and_no_line_is_lost_under_load() {
    let dir = tempfile::tempdir().expect("dir");
    let (broker, log) = audited_broker(dir.path()).await;
    let client = broker.client().await;
    let load = BackgroundReleases::start(&client, 4, 100);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // logrotate's `create` mode: move the file, then tell the broker.
    let rotated = dir.path().join("audit.log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    broker.audit.sink.reopen();
    let released = load.released().await;
    broker.stop().await;
    let before = audit_lines(&rotated);
    let after = audit_lines(&log);
    assert!(
        !after.is_empty(),
        "lines after the rotation go to the new file"
    );
    let released_lines = before
        .iter()
        .chain(&after)
        .filter(|line| line["outcome"] == "released")
        .count();
    assert_eq!(released_lines, released, "every release has its line");
    assert_eq!(released, 400);
}
