//! Prometheus metrics (`metrics` facade, `metrics-exporter-prometheus`).
//! Label values are fixed vocabularies (method, code, endpoint, outcome):
//! never a user id, caller id or token, so cardinality stays bounded and
//! nothing secret reaches a scrape. Without an exporter the calls are no-ops.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::PrometheusBuilder;

/// Histogram buckets (seconds): sub-millisecond cache hits up to slow Auth0 calls.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("TOKENBROKER_METRICS_LISTEN {addr}: {reason}")]
pub struct MetricsError {
    addr: SocketAddr,
    reason: String,
}

/// Serves `/metrics` in Prometheus text format on `addr` (plaintext: bind it
/// to a pod-internal address) and describes every metric.
pub fn install_exporter(addr: SocketAddr) -> Result<(), MetricsError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(LATENCY_BUCKETS)
        .and_then(|builder| builder.install())
        .map_err(|error| MetricsError {
            addr,
            reason: error.to_string(),
        })?;
    describe();
    Ok(())
}

fn describe() {
    describe_counter!(
        "tokenbroker_rpc_total",
        "RPCs answered, by method and gRPC code"
    );
    describe_histogram!(
        "tokenbroker_rpc_duration_seconds",
        Unit::Seconds,
        "RPC latency by method"
    );
    describe_counter!(
        "tokenbroker_cache_lookups_total",
        "User lookups by outcome: hit, miss, stale"
    );
    describe_counter!(
        "tokenbroker_id_token_verifications_total",
        "ID tokens checked, by outcome: ok or the check that failed"
    );
    describe_gauge!(
        "tokenbroker_cache_users",
        "Users held in the identity cache"
    );
    describe_counter!(
        "tokenbroker_auth0_requests_total",
        "Requests to Auth0 by endpoint and HTTP status (0 = no answer)"
    );
    describe_histogram!(
        "tokenbroker_auth0_request_duration_seconds",
        Unit::Seconds,
        "Auth0 latency by endpoint"
    );
    describe_counter!(
        "tokenbroker_auth0_retries_total",
        "Retries of Auth0 requests by endpoint"
    );
    describe_counter!(
        "tokenbroker_ratelimit_waits_total",
        "Auth0 requests that waited for the client-side rate limit"
    );
    describe_counter!(
        "tokenbroker_ratelimit_rejections_total",
        "Auth0 requests refused by the client-side rate limit"
    );
    describe_counter!(
        "tokenbroker_management_token_refreshes_total",
        "Management API tokens obtained"
    );
    describe_gauge!(
        "tokenbroker_management_token_expiry_timestamp_seconds",
        Unit::Seconds,
        "When the current Management token expires (Unix time); alert on it minus time()"
    );
    describe_counter!(
        "tokenbroker_tls_reloads_total",
        "TLS material reloads by outcome: success, failure"
    );
    describe_counter!(
        "tokenbroker_policy_reloads_total",
        "Policy reloads by outcome: success, failure"
    );
    describe_counter!(
        "tokenbroker_rpc_refusals_total",
        "RPCs refused, by method and ErrorInfo reason (CALLER_UNKNOWN, MALFORMED_REQUEST, ...)"
    );
    describe_counter!(
        "tokenbroker_audit_lines_total",
        "Audit lines by outcome: written, failed (their releases were refused)"
    );
    describe_counter!(
        "tokenbroker_caller_share_rejections_total",
        "Auth0 reads refused because the caller had spent its share of the Auth0 budget"
    );
    describe_counter!(
        "tokenbroker_signing_key_reloads_total",
        "Reloads of the client assertion and Token Vault subject keys, by setting and outcome"
    );
    describe_counter!(
        "tokenbroker_token_vault_exchanges_total",
        "Token Vault exchanges by connection and outcome: ok, no_token_set, refused, unavailable, error"
    );
    describe_histogram!(
        "tokenbroker_token_vault_exchange_duration_seconds",
        Unit::Seconds,
        "Token Vault exchange latency by connection"
    );
    describe_counter!(
        "tokenbroker_token_not_stored_total",
        "TOKEN_NOT_STORED refusals of identities whose connection Token Vault may have taken over, by connection (other: a name too long or odd to be a label)"
    );
}

/// One refused RPC, by its ErrorInfo reason (a fixed vocabulary).
pub fn rpc_refused(method: &'static str, reason: &'static str) {
    counter!("tokenbroker_rpc_refusals_total", "method" => method, "reason" => reason).increment(1);
}

/// Audit lines written (or not) by the audit writer.
pub fn audit_lines(lines: u64, written: bool) {
    if written {
        counter!("tokenbroker_audit_lines_total", "outcome" => "written").increment(lines);
    } else {
        counter!("tokenbroker_audit_lines_total", "outcome" => "failed").increment(lines);
    }
}

/// A caller's Auth0 read refused: its share of the budget was spent.
pub fn caller_share_rejection() {
    counter!("tokenbroker_caller_share_rejections_total").increment(1);
}

/// One answered RPC. The OK answers of the three RPCs (nearly every RPC)
/// go through handles registered once: the recorder's registry is not
/// searched per request. Anything else takes the general path.
pub fn rpc_finished(method: &'static str, code: tonic::Code, elapsed: Duration) {
    if code == tonic::Code::Ok {
        if let Some(handles) = ok_handles(method) {
            handles.total.increment(1);
            handles.duration.record(elapsed.as_secs_f64());
            return;
        }
    }
    counter!("tokenbroker_rpc_total", "method" => method, "code" => code_name(code)).increment(1);
    histogram!("tokenbroker_rpc_duration_seconds", "method" => method)
        .record(elapsed.as_secs_f64());
}

/// The counter and histogram of one RPC's OK answers.
struct OkHandles {
    total: metrics::Counter,
    duration: metrics::Histogram,
}

/// Registered on first use, which comes after the recorder is installed
/// (`serve` and `dev` install it before they listen).
fn ok_handles(method: &'static str) -> Option<&'static OkHandles> {
    static GET: std::sync::OnceLock<OkHandles> = std::sync::OnceLock::new();
    static LIST: std::sync::OnceLock<OkHandles> = std::sync::OnceLock::new();
    static INVALIDATE: std::sync::OnceLock<OkHandles> = std::sync::OnceLock::new();
    let cell = match method {
        "GetIdpToken" => &GET,
        "ListIdpTokens" => &LIST,
        "InvalidateUser" => &INVALIDATE,
        _ => return None,
    };
    Some(cell.get_or_init(|| OkHandles {
        total: counter!("tokenbroker_rpc_total", "method" => method, "code" => "OK"),
        duration: histogram!("tokenbroker_rpc_duration_seconds", "method" => method),
    }))
}

/// How a user lookup was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Miss,
    Stale,
}

/// A user lookup: `hit`, `miss` or `stale`. One macro call per outcome, with
/// literal labels: the key is then a static, where a label passed as a
/// variable costs an allocation and a hash on every lookup.
pub fn cache_lookup(outcome: CacheOutcome) {
    // A hit is nearly every lookup: its handle is registered once.
    static HIT: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    match outcome {
        CacheOutcome::Hit => HIT
            .get_or_init(|| counter!("tokenbroker_cache_lookups_total", "outcome" => "hit"))
            .increment(1),
        CacheOutcome::Miss => {
            counter!("tokenbroker_cache_lookups_total", "outcome" => "miss").increment(1)
        }
        CacheOutcome::Stale => {
            counter!("tokenbroker_cache_lookups_total", "outcome" => "stale").increment(1)
        }
    }
}

/// One ID token checked: `ok`, or the name of the check that failed
/// (`IdTokenError::check`), never anything from the token itself.
pub fn id_token_verified(outcome: &'static str) {
    counter!("tokenbroker_id_token_verifications_total", "outcome" => outcome).increment(1);
}

/// Current number of cached users.
pub fn cache_users(count: u64) {
    gauge!("tokenbroker_cache_users").set(count as f64);
}

/// One request to Auth0; `status` 0 when no HTTP answer came.
pub fn auth0_request(endpoint: &'static str, status: u16, elapsed: Duration) {
    counter!("tokenbroker_auth0_requests_total", "endpoint" => endpoint, "status" => status.to_string()).increment(1);
    histogram!("tokenbroker_auth0_request_duration_seconds", "endpoint" => endpoint)
        .record(elapsed.as_secs_f64());
}

pub fn auth0_retry(endpoint: &'static str) {
    counter!("tokenbroker_auth0_retries_total", "endpoint" => endpoint).increment(1);
}

pub fn ratelimit_wait() {
    counter!("tokenbroker_ratelimit_waits_total").increment(1);
}

pub fn ratelimit_rejection() {
    counter!("tokenbroker_ratelimit_rejections_total").increment(1);
}

/// A new Management token valid for `lifetime` from now.
pub fn management_token_refreshed(lifetime: Duration) {
    counter!("tokenbroker_management_token_refreshes_total").increment(1);
    let expiry = SystemTime::now() + lifetime;
    if let Ok(since_epoch) = expiry.duration_since(UNIX_EPOCH) {
        gauge!("tokenbroker_management_token_expiry_timestamp_seconds")
            .set(since_epoch.as_secs_f64());
    }
}

pub fn tls_reload(success: bool) {
    counter!("tokenbroker_tls_reloads_total", "outcome" => outcome(success)).increment(1);
}

pub fn policy_reload(success: bool) {
    counter!("tokenbroker_policy_reloads_total", "outcome" => outcome(success)).increment(1);
}

fn outcome(success: bool) -> &'static str {
    if success {
        "success"
    } else {
        "failure"
    }
}

/// gRPC code names as in the spec (`NOT_FOUND`), for stable label values.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// One reload of the connections file (`--connections`): `success` or `failure`.
pub fn connections_reload(success: bool) {
    counter!("tokenbroker_connections_reloads_total", "outcome" => outcome(success)).increment(1);
}

/// One token asked of the IdP refresher, by connection and outcome (a fixed
/// vocabulary: `ok`, `invalid_grant`, `invalid_grant_remembered`,
/// `client_rejected`, `unavailable`), with the time the IdP took when it was
/// asked. `connection` is a name from the operator's connections file, never
/// caller input: only connections listed there with `refresh = "idp"` are
/// refreshed, so the label's values stay few.
pub fn idp_refresh(connection: &str, outcome: &'static str, elapsed: Option<Duration>) {
    counter!("tokenbroker_idp_refreshes_total", "connection" => connection.to_owned(), "outcome" => outcome).increment(1);
    if let Some(elapsed) = elapsed {
        histogram!("tokenbroker_idp_refresh_duration_seconds", "connection" => connection.to_owned())
            .record(elapsed.as_secs_f64());
    }
}

/// A token known to expire within the caller's `min_valid_for`, with no way
/// to refresh it, refused (TOKEN_EXPIRED).
pub fn token_refused_as_expired() {
    counter!("tokenbroker_tokens_refused_expired_total").increment(1);
}

/// One reload of a signing key file (`AUTH0_CLIENT_ASSERTION_KEY_FILE`,
/// `AUTH0_TOKEN_VAULT_SUBJECT_KEY_FILE`): `success` or `failure`.
pub fn signing_key_reload(setting: &'static str, success: bool) {
    counter!("tokenbroker_signing_key_reloads_total", "setting" => setting, "outcome" => outcome(success)).increment(1);
}

/// One Token Vault exchange, by connection and outcome (a fixed vocabulary:
/// `ok`, `no_token_set`, `refused`, `unavailable`, `error`), with the time
/// Auth0 took. `connection` is a name the connections file lists as
/// `source = "token-vault"`, never caller input: the label's values stay few.
pub fn token_vault_exchange(connection: &str, outcome: &'static str, elapsed: Duration) {
    counter!("tokenbroker_token_vault_exchanges_total", "connection" => connection.to_owned(), "outcome" => outcome).increment(1);
    histogram!("tokenbroker_token_vault_exchange_duration_seconds", "connection" => connection.to_owned())
        .record(elapsed.as_secs_f64());
}

/// A TOKEN_NOT_STORED whose connection Token Vault may have taken over (the
/// silent switch). The connection comes from an Auth0 profile, not from the
/// operator, so the label is capped: only names a connection can have
/// (at most 64 characters of `[A-Za-z0-9_.-]`) are kept, any other is `other`.
pub fn token_not_stored(connection: &str) {
    counter!("tokenbroker_token_not_stored_total", "connection" => connection_label(connection))
        .increment(1);
}

/// `connection` when it is a plausible connection name, else `other`.
fn connection_label(connection: &str) -> String {
    let plausible = !connection.is_empty()
        && connection.len() <= 64
        && connection
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-'));
    if plausible {
        connection.to_owned()
    } else {
        "other".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_labels_are_capped_to_plausible_names() {
        assert_eq!(connection_label("google-oauth2"), "google-oauth2");
        assert_eq!(connection_label("Corp_SSO.v2"), "Corp_SSO.v2");
        assert_eq!(connection_label(&"a".repeat(64)), "a".repeat(64));
        assert_eq!(connection_label(&"a".repeat(65)), "other");
        assert_eq!(connection_label("evil\nlabel"), "other");
        assert_eq!(connection_label("spaced name"), "other");
        assert_eq!(connection_label(""), "other");
    }
}
