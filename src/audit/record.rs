//! One audit line: a JSON object on one line, made with as little work as
//! the hot path allows. Keys and fixed values are written as static bytes;
//! only values are escaped (by serde_json, so every caller-supplied string is
//! a valid, closed JSON string). Caller-supplied values are capped at 512
//! bytes like in the diagnostics.

use std::io::Write;
use std::time::{Duration, SystemTime};

use super::key::AuditKey;
use crate::logsafe::capped;

/// `type` of every audit line, so a reader can tell them from diagnostics
/// when both go to stdout.
pub const RECORD_TYPE: &str = "tokenbroker.audit.v1";

/// Who asked for what, and how it ended.
pub struct Record<'a> {
    pub caller: &'a str,
    pub method: &'static str,
    /// The user the tokens were for: the verified ID token's subject when
    /// there was one, else the `user_id` the caller sent.
    pub user_id: &'a str,
    pub bound_to_id_token: bool,
    /// The provider and connection the caller asked for (empty: any).
    pub provider: &'a str,
    pub connection: &'a str,
    /// `released`, `refused` or `invalidated`.
    pub outcome: &'static str,
    /// The gRPC code's name (`OK`, `PERMISSION_DENIED`, ...).
    pub code: &'static str,
    /// The ErrorInfo reason of a refusal.
    pub reason: Option<&'static str>,
    /// The refusal's message for humans (it may quote what the caller sent).
    pub detail: Option<&'a str>,
    pub latency: Duration,
}

/// A released token as the audit line names it: never the token itself,
/// only its fingerprint under the audit key.
pub struct Released<'a> {
    pub provider: &'a str,
    pub connection: &'a str,
    pub source: &'static str,
    pub from_cache: bool,
    /// The token, to fingerprint; it is not written.
    pub access_token: &'a str,
}

impl Record<'_> {
    /// The line, newline included; `token_hmac` for each released token
    /// when there is a key.
    pub fn to_line(&self, released: &[Released<'_>], key: Option<&AuditKey>) -> Vec<u8> {
        let mut line = Vec::with_capacity(320 + released.len() * 160);
        line.extend_from_slice(b"{\"type\":\"");
        line.extend_from_slice(RECORD_TYPE.as_bytes());
        line.extend_from_slice(b"\",\"time\":\"");
        // Writing into a Vec cannot fail; formatted in place, no String.
        let _ = write!(
            line,
            "{}",
            humantime::format_rfc3339_micros(SystemTime::now())
        );
        line.push(b'"');
        string_field(&mut line, "caller", &capped(self.caller));
        string_field(&mut line, "method", self.method);
        string_field(&mut line, "user_id", &capped(self.user_id));
        bool_field(&mut line, "bound_to_id_token", self.bound_to_id_token);
        string_field(&mut line, "provider", &capped(self.provider));
        string_field(&mut line, "connection", &capped(self.connection));
        string_field(&mut line, "outcome", self.outcome);
        string_field(&mut line, "code", self.code);
        if let Some(reason) = self.reason {
            string_field(&mut line, "reason", reason);
        }
        if let Some(detail) = self.detail {
            string_field(&mut line, "detail", &capped(detail));
        }
        line.extend_from_slice(b",\"latency_ms\":");
        let _ = write!(
            line,
            "{}",
            u64::try_from(self.latency.as_millis()).unwrap_or(u64::MAX)
        );
        if !released.is_empty() {
            line.extend_from_slice(b",\"released\":[");
            for (i, token) in released.iter().enumerate() {
                if i > 0 {
                    line.push(b',');
                }
                released_object(&mut line, token, key);
            }
            line.push(b']');
        }
        line.extend_from_slice(b"}\n");
        line
    }
}

fn released_object(line: &mut Vec<u8>, token: &Released<'_>, key: Option<&AuditKey>) {
    line.extend_from_slice(b"{\"provider\":");
    json_string(line, token.provider);
    string_field(line, "connection", token.connection);
    string_field(line, "source", token.source);
    bool_field(line, "from_cache", token.from_cache);
    if let Some(key) = key {
        // The fingerprint is ASCII (a prefix and hex): nothing to escape.
        line.extend_from_slice(b",\"token_hmac\":\"");
        key.append_fingerprint(line, token.access_token);
        line.push(b'"');
    }
    line.push(b'}');
}

/// `,"key":"value"` with the value escaped.
fn string_field(line: &mut Vec<u8>, key: &str, value: &str) {
    line.extend_from_slice(b",\"");
    line.extend_from_slice(key.as_bytes());
    line.extend_from_slice(b"\":");
    json_string(line, value);
}

fn bool_field(line: &mut Vec<u8>, key: &str, value: bool) {
    line.extend_from_slice(b",\"");
    line.extend_from_slice(key.as_bytes());
    line.extend_from_slice(if value { b"\":true" } else { b"\":false" });
}

fn json_string(line: &mut Vec<u8>, value: &str) {
    // Writing a &str into a Vec cannot fail; an error would leave `null`.
    if serde_json::to_writer(&mut *line, value).is_err() {
        line.extend_from_slice(b"null");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(user_id: &'a str) -> Record<'a> {
        Record {
            caller: "spiffe://x/sa/a",
            method: "GetIdpToken",
            user_id,
            bound_to_id_token: false,
            provider: "github",
            connection: "",
            outcome: "released",
            code: "OK",
            reason: None,
            detail: None,
            latency: Duration::from_millis(3),
        }
    }

    #[test]
    fn a_line_is_one_json_object_with_every_field() {
        let released = [Released {
            provider: "github",
            connection: "github",
            source: "AUTH0_PROFILE",
            from_cache: true,
            access_token: "gho_secret",
        }];
        let line = record("github|1\n\"forged\"").to_line(&released, None);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["type"], RECORD_TYPE);
        assert_eq!(value["user_id"], "github|1\n\"forged\"");
        assert_eq!(value["latency_ms"], 3);
        assert_eq!(value["released"][0]["provider"], "github");
        assert_eq!(value["released"][0]["from_cache"], true);
        assert!(value["released"][0].get("token_hmac").is_none());
        assert!(!String::from_utf8_lossy(&line).contains("gho_secret"));
    }
}
