//! Calls tokenbroker's `GetIdpToken` over mutual TLS and handles each status
//! code the way the broker's contract says:
//!
//! - OK: prints the provider and a fingerprint of the token, never the token.
//! - UNAVAILABLE: retried, waiting the `google.rpc.RetryInfo` delay when the
//!   broker sent one (Auth0 said how long), else an exponential backoff with
//!   jitter; at most `--attempts` attempts.
//! - Everything else is not retried: INVALID_ARGUMENT, PERMISSION_DENIED,
//!   NOT_FOUND, FAILED_PRECONDITION (the user must sign in again, or an
//!   operator must fix the broker: retrying cannot help), DEADLINE_EXCEEDED.
//!
//! Programs switch on the `google.rpc.ErrorInfo` reason every error carries
//! (domain `tokenbroker`), not on the message: `USER_MUST_RECONNECT` and
//! `TOKEN_EXPIRED` mean "send the user through the connection's login again"
//! and are never retried; `BROKER_MISCONFIGURED` pages the broker's operator.
//!
//! ```sh
//! cargo run --manifest-path examples/rust-client/Cargo.toml -- \
//!   --target 127.0.0.1:50051 --ca .tokenbroker-dev/ca.pem \
//!   --cert .tokenbroker-dev/client.pem --key .tokenbroker-dev/client.key \
//!   --user-id 'github|1234567' --provider github   # or --id-token "$ID_TOKEN"
//! ```
//!
//! Exit codes: 0 token received, 1 the broker refused or failed, 2 bad usage
//! or unreadable files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use rand::Rng;
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

pub mod pb {
    tonic::include_proto!("tokenbroker.v1");
}

use pb::token_broker_client::TokenBrokerClient;
use pb::{GetIdpTokenRequest, IdpToken};

/// Longest RetryInfo delay this client sits out; a longer one is reported instead.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Ask tokenbroker for a user's IdP token.
#[derive(Parser)]
struct Args {
    /// host:port of the broker's mTLS listener
    #[arg(long)]
    target: String,
    /// PEM CA that signed the broker's certificate
    #[arg(long)]
    ca: PathBuf,
    /// PEM client certificate
    #[arg(long)]
    cert: PathBuf,
    /// PEM key of the client certificate
    #[arg(long)]
    key: PathBuf,
    /// Auth0 user id, e.g. 'github|1234567' (may be left out when --id-token names the user)
    #[arg(long, default_value = "")]
    user_id: String,
    /// The signed-in user's Auth0 ID token: the broker releases only that user's tokens
    /// (required for callers whose policy says require_id_token = true)
    #[arg(long, default_value = "")]
    id_token: String,
    /// Identity provider, e.g. github
    #[arg(long, default_value = "")]
    provider: String,
    /// Auth0 connection, when --provider is not given
    #[arg(long, default_value = "")]
    connection: String,
    /// Name to verify the broker's certificate against, if not the target host
    #[arg(long)]
    server_name: Option<String>,
    /// Deadline of each attempt, in seconds
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
    /// Attempts when UNAVAILABLE
    #[arg(long, default_value_t = 4)]
    attempts: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let channel = match channel(&args) {
        Ok(channel) => channel,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let mut client = TokenBrokerClient::new(channel);
    let request = GetIdpTokenRequest {
        user_id: args.user_id.clone(),
        provider: args.provider.clone(),
        connection: args.connection.clone(),
        bypass_cache: false,
        id_token: args.id_token.clone(),
        // Unset: the broker's --min-token-validity decides how long the
        // token must still live.
        min_valid_for: None,
    };
    let timeout = Duration::from_secs_f64(args.timeout.max(0.001));
    let mut attempt = 0;
    let token = loop {
        attempt += 1;
        let mut call = Request::new(request.clone());
        call.set_timeout(timeout);
        let status = match client.get_idp_token(call).await {
            Ok(response) => match response.into_inner().token {
                Some(token) => break token,
                None => {
                    eprintln!("error: the broker answered OK without a token");
                    return ExitCode::from(1);
                }
            },
            Err(status) => status,
        };
        if status.code() != Code::Unavailable || attempt >= args.attempts {
            return report(&status, attempt);
        }
        let (delay, why) = match retry_delay(&status) {
            Some(delay) if delay > MAX_RETRY_DELAY => return report(&status, attempt),
            Some(delay) => (delay, "RetryInfo"),
            None => (backoff(attempt), "backoff"),
        };
        eprintln!(
            "UNAVAILABLE ({}); retrying in {:.2}s ({why}), attempt {}/{}",
            status.message(),
            delay.as_secs_f64(),
            attempt + 1,
            args.attempts
        );
        tokio::time::sleep(delay).await;
    };
    print_token(&token);
    ExitCode::SUCCESS
}

/// A lazily connected channel: connection and handshake failures then show up
/// as UNAVAILABLE on the RPC, like any other transient failure.
fn channel(args: &Args) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&args.ca)?))
        .identity(Identity::from_pem(read(&args.cert)?, read(&args.key)?));
    if let Some(name) = &args.server_name {
        tls = tls.domain_name(name.clone());
    }
    let endpoint = Endpoint::from_shared(format!("https://{}", args.target))
        .map_err(|e| format!("--target {}: {e}", args.target))?
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)
        .map_err(|e| format!("TLS settings: {e}"))?;
    Ok(endpoint.connect_lazy())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The `google.rpc.RetryInfo` delay, when the broker sent one.
fn retry_delay(status: &Status) -> Option<Duration> {
    status.get_details_retry_info()?.retry_delay
}

/// 250 ms, 500 ms, 1 s, ... with 50-100 % jitter, capped at 5 s.
fn backoff(attempt: u32) -> Duration {
    let step = Duration::from_millis(250)
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
        .min(Duration::from_secs(5));
    step.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// The `google.rpc.ErrorInfo` reason of a tokenbroker error, if any.
fn reason(status: &Status) -> Option<String> {
    status
        .get_details_error_info()
        .filter(|info| info.domain == "tokenbroker")
        .map(|info| info.reason)
}

/// What to do for the reasons a program acts on; the rest fall back to the code.
fn reason_advice(reason: &str) -> Option<&'static str> {
    Some(match reason {
        "USER_MUST_RECONNECT" => "the user must connect that account again (sign in through the connection); never retried",
        "TOKEN_EXPIRED" => "the stored token has expired and the broker cannot refresh it: the user must sign in again; never retried",
        "TOKEN_NOT_STORED" => "Auth0 holds no token for that identity: the user must sign in through it (or the connection keeps tokens in Token Vault)",
        "BROKER_MISCONFIGURED" => "the broker's operator must fix its Auth0 or connection settings; retrying cannot help",
        "CALLER_UNKNOWN" => "this client's certificate is not in the broker's policy; ask its operator to add the caller id",
        "PROVIDER_NOT_ALLOWED" => "this client may not have that provider's tokens; ask the broker's operator to extend the policy",
        _ => return None,
    })
}

/// What to tell the user for a code that is not retried (or no longer).
fn advice(code: Code) -> Option<&'static str> {
    Some(match code {
        Code::InvalidArgument => "the request is malformed (check --user-id); do not retry it unchanged",
        Code::PermissionDenied => "this client's certificate identity may not have that; ask the broker's operator to extend the policy",
        Code::NotFound => "no such user, or the user has no identity with that provider/connection",
        Code::FailedPrecondition => "retrying will not help: the user must sign in again, or the broker's operator must fix its Auth0 application",
        Code::DeadlineExceeded => "the broker did not answer within --timeout; try again later or with a longer timeout",
        Code::Unavailable => "the broker or Auth0 stayed unavailable; if this happens at once on every attempt, check --target, the CA and the client certificate (a rejected certificate fails the TLS handshake, reported as UNAVAILABLE)",
        _ => return None,
    })
}

fn report(status: &Status, attempts: u32) -> ExitCode {
    let reason = reason(status);
    let shown = match &reason {
        Some(reason) => format!("{:?} ({reason})", status.code()),
        None => format!("{:?}", status.code()),
    };
    eprintln!(
        "error: {shown} after {attempts} attempt(s): {}",
        status.message()
    );
    let advice = reason
        .as_deref()
        .and_then(reason_advice)
        .or_else(|| advice(status.code()));
    if let Some(advice) = advice {
        eprintln!("  {advice}");
    }
    ExitCode::from(1)
}

/// Enough to recognise a token in a log, not enough to use it.
fn fingerprint(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    let head: String = token.chars().take(4).collect();
    format!("{head}… ({} chars, sha256 {hex})", token.chars().count())
}

fn print_token(token: &IdpToken) {
    println!("provider:    {}", token.provider);
    println!("connection:  {}", token.connection);
    println!("idp_user_id: {}", token.idp_user_id);
    println!("token:       {}", fingerprint(&token.access_token));
    if !token.access_token_secret.is_empty() {
        println!("secret:      {}", fingerprint(&token.access_token_secret));
    }
    if let Some(expires_at) = &token.expires_at {
        println!("expires_at:  {expires_at}");
    }
    if let Some(fetched_at) = &token.fetched_at {
        println!("fetched_at:  {fetched_at}");
    }
    println!("from_cache:  {}", token.from_cache);
}
