//! The audit file of the real binary: logrotate's `create` mode (move the
//! file, then SIGHUP) loses no line under load, and SIGTERM leaves every
//! line on disk.

use std::time::Duration;

use tokenbroker::testkit::Credentials;

use super::{terminate, ClientAuth, ServedBinary};
use crate::support::BackgroundReleases;

/// What the audited broker and its emulator agree on.
const CREDENTIALS: Credentials<'static> = Credentials {
    client_id: "audit-test",
    client_secret: "audit-test-secret",
};

/// Released lines in the audit file at `path` (none if it does not exist).
fn released_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(r#""outcome":"released""#))
        .count()
}

#[tokio::test]
async fn sighup_after_a_rotation_reopens_the_audit_file_and_no_line_is_lost() {
    const CALLER_ID: &str = "spiffe://test.example/ns/it/sa/audit";
    let emulator = CREDENTIALS.start_emulator().await.expect("emulator starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("audit.log");
    let rotated = dir.path().join("audit.log.1");
    let mut served = ServedBinary::start_as(
        &emulator,
        ClientAuth::Secret(CREDENTIALS),
        &[CALLER_ID],
        &format!("[[caller]]\nid = \"{CALLER_ID}\"\nproviders = [\"*\"]\n"),
        ("warn", "json"),
        &[("TOKENBROKER_AUDIT_LOG", log.to_str().expect("utf-8 path"))],
    );
    let cert = served.client_certs.pop().expect("cert");
    let client = served.connect_when_listening(&cert).await;
    let load = BackgroundReleases::start(&client, 4, 150);
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::rename(&log, &rotated).expect("rotate the audit file");
    let pid = served.child.id().expect("running");
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(hup.success());
    let released = load.released().await;
    drop(client);
    let status = terminate(&mut served.child).await;
    assert!(
        status.success(),
        "SIGHUP did not stop it, SIGTERM did: {status}"
    );
    emulator.shutdown().await;
    let before = released_lines(&rotated);
    let after = released_lines(&log);
    assert!(
        before > 0,
        "lines before the rotation stay in the moved file"
    );
    assert!(
        after > 0,
        "SIGHUP reopened the path: lines after it are in the new file"
    );
    assert_eq!(
        before + after,
        released,
        "every release has its line on disk"
    );
    assert_eq!(released, 600);
}
