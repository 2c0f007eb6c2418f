//! Command line and environment: what the operator can set, and the validated
//! settings the rest of the broker runs on.
//!
//! Every flag has an environment fallback so a Kubernetes pod spec can set it
//! with `env:`. Validation happens once, at start: a bad setting stops the
//! process with one line that names the setting, instead of surfacing as a
//! confusing RPC error later.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;
use url::Url;

use crate::audit::{AuditSettings, SinkTarget};
use crate::auth0::{Auth0Settings, OutboundLimits};
use crate::cache::CacheSettings;
use crate::id_token::IdTokenSettings;
use crate::listener::{
    ConnectionLimits, DEFAULT_HEALTH_MAX_CONCURRENT_STREAMS, DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PENDING_HANDSHAKES,
};
use crate::server::{BrokerSettings, ResilienceSettings, RunSettings, ServeConfig};
use crate::telemetry::LogFormat;
use crate::tls::TlsFiles;

/// The `tokenbroker` command line.
#[derive(Debug, Parser)]
#[command(name = "tokenbroker", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The two ways to run the broker.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run in production against a real Auth0 tenant.
    Serve(Box<ServeArgs>),
    /// Run with an embedded Auth0 emulator, a generated dev PKI and no account.
    Dev(Box<DevArgs>),
    /// Print the audit fingerprint (`token_hmac`) of a token read from stdin, to find
    /// where a leaked token was released.
    AuditHash(AuditHashArgs),
}

/// `tokenbroker audit-hash`: the investigator's side of `token_hmac`.
#[derive(Debug, Args)]
pub struct AuditHashArgs {
    /// The audit key file the broker runs with (TOKENBROKER_AUDIT_KEY_FILE).
    #[arg(long, env = "TOKENBROKER_AUDIT_KEY_FILE")]
    pub key_file: PathBuf,
}

/// Settings shared by `serve` and `dev`.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Log format.
    #[arg(
        long,
        env = "TOKENBROKER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// How long a user's identities stay cached (never past a known token expiry).
    #[arg(long, env = "TOKENBROKER_USER_CACHE_TTL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub user_cache_ttl: Duration,

    /// How many users the identity cache holds at most.
    #[arg(
        long,
        env = "TOKENBROKER_USER_CACHE_CAPACITY",
        default_value_t = 100_000
    )]
    pub user_cache_capacity: u64,

    /// Estimated bytes the identity cache holds at most (ids, identities, tokens, overhead), so a few huge profiles cannot take the memory the capacity was sized for.
    #[arg(long, env = "TOKENBROKER_USER_CACHE_MAX_BYTES", default_value_t = crate::cache::DEFAULT_USER_MAX_BYTES)]
    pub user_cache_max_bytes: u64,

    /// How long "Auth0 has no such user" is remembered, so a caller in a retry loop cannot burn the quota.
    #[arg(long, env = "TOKENBROKER_NEGATIVE_CACHE_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub negative_cache_ttl: Duration,

    /// Timeout for opening a connection to Auth0.
    #[arg(long, env = "TOKENBROKER_AUTH0_CONNECT_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub auth0_connect_timeout: Duration,

    /// Bounds one whole call to Auth0, retries and their waits included (and each request).
    #[arg(long, env = "TOKENBROKER_AUTH0_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub auth0_timeout: Duration,

    /// Sustained requests per second the broker sends to Auth0 (the tenant's quota is shared).
    #[arg(long, env = "TOKENBROKER_AUTH0_RATE_LIMIT", default_value_t = NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN))]
    pub auth0_rate_limit: NonZeroU32,

    /// Requests to Auth0 allowed at once above the sustained rate.
    #[arg(long, env = "TOKENBROKER_AUTH0_BURST", default_value_t = NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN))]
    pub auth0_burst: NonZeroU32,

    /// Requests to Auth0 in flight at once.
    #[arg(long, env = "TOKENBROKER_AUTH0_MAX_IN_FLIGHT", default_value_t = 32)]
    pub auth0_max_in_flight: usize,

    /// Attempts per Auth0 call on 429, 5xx and network errors (the first included).
    #[arg(long, env = "TOKENBROKER_AUTH0_MAX_ATTEMPTS", default_value_t = 3)]
    pub auth0_max_attempts: u32,

    /// The fraction (0 to 1) of the Auth0 rate and burst one caller may spend, so no caller can starve the others.
    #[arg(long, env = "TOKENBROKER_AUTH0_CALLER_SHARE", default_value_t = crate::budget::DEFAULT_CALLER_SHARE)]
    pub auth0_caller_share: f64,

    /// How long past its TTL a cached user may be served while Auth0 fails (0 turns it off).
    #[arg(long, env = "TOKENBROKER_STALE_IF_ERROR", default_value = "10m", value_parser = humantime::parse_duration)]
    pub stale_if_error: Duration,

    /// Where the audit trail goes: `stdout`, a file path (reopened on SIGHUP), or `off`.
    #[arg(long, env = "TOKENBROKER_AUDIT_LOG", default_value = "stdout")]
    pub audit_log: SinkTarget,

    /// Base64 of 32 random bytes (`openssl rand -base64 32`): audit lines carry an HMAC of each released token under it.
    #[arg(long, env = "TOKENBROKER_AUDIT_KEY_FILE")]
    pub audit_key_file: Option<PathBuf>,

    /// Plaintext HTTP listener for Prometheus metrics (`/metrics`); off when unset.
    #[arg(long, env = "TOKENBROKER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Plaintext listener serving only gRPC health, for kubelet `grpc:` probes (which speak no mTLS).
    #[arg(long, env = "TOKENBROKER_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// After SIGTERM, how long in-flight RPCs may run before they are answered UNAVAILABLE.
    #[arg(long, env = "TOKENBROKER_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// How often the policy and TLS files are checked for changes (SIGHUP checks at once).
    #[arg(long, env = "TOKENBROKER_RELOAD_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub reload_interval: Duration,

    /// Clock skew tolerated on an ID token's exp, nbf and iat.
    #[arg(long, env = "TOKENBROKER_ID_TOKEN_LEEWAY", default_value = "60s", value_parser = humantime::parse_duration)]
    pub id_token_leeway: Duration,

    /// HTTP/2 streams one mTLS connection may have open at once; more are refused (REFUSED_STREAM).
    #[arg(long, env = "TOKENBROKER_MAX_CONCURRENT_STREAMS", default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: u32,

    /// HTTP/2 streams one connection to the plaintext health port may have open at once.
    #[arg(long, env = "TOKENBROKER_HEALTH_MAX_CONCURRENT_STREAMS", default_value_t = DEFAULT_HEALTH_MAX_CONCURRENT_STREAMS)]
    pub health_max_concurrent_streams: u32,

    /// Connections open at once on each listener (handshakes included); at the cap new ones wait.
    #[arg(long, env = "TOKENBROKER_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// TLS handshakes in progress at once; beyond it new connections wait, open ones keep working.
    #[arg(long, env = "TOKENBROKER_MAX_PENDING_HANDSHAKES", default_value_t = DEFAULT_MAX_PENDING_HANDSHAKES)]
    pub max_pending_handshakes: usize,

    /// How long a TLS handshake may take.
    #[arg(long, env = "TOKENBROKER_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// How long a new connection may stay silent before sending the HTTP/2 preface.
    #[arg(long, env = "TOKENBROKER_FIRST_REQUEST_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub first_request_timeout: Duration,

    /// Idle time after which the broker pings a client (HTTP/2 PING) to keep the connection and check it.
    #[arg(long, env = "TOKENBROKER_KEEPALIVE_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "TOKENBROKER_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// Longest one request may take, body included, before it is ended with CANCELLED.
    #[arg(long, env = "TOKENBROKER_REQUEST_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
}

/// `tokenbroker serve`: every setting of a production broker.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Auth0 tenant: a bare host (`tenant.eu.auth0.com`, https) or a full `http(s)://host:port` URL.
    #[arg(long, env = "AUTH0_DOMAIN")]
    pub auth0_domain: String,

    /// Client id of the Machine-to-Machine application that may call the Management API.
    #[arg(long, env = "AUTH0_CLIENT_ID")]
    pub auth0_client_id: String,

    /// Client secret of that application (prefer --auth0-client-secret-file).
    #[arg(long, env = "AUTH0_CLIENT_SECRET", hide_env_values = true)]
    pub auth0_client_secret: Option<String>,

    /// File holding the client secret (a Kubernetes secret mount); surrounding whitespace is ignored.
    #[arg(long, env = "AUTH0_CLIENT_SECRET_FILE")]
    pub auth0_client_secret_file: Option<PathBuf>,

    /// Management API audience; default `{base}/api/v2/`. Set it when AUTH0_DOMAIN is a custom domain.
    #[arg(long, env = "AUTH0_AUDIENCE")]
    pub auth0_audience: Option<String>,

    /// Address of the mTLS listener (TokenBroker API, reflection, health).
    #[arg(long, env = "TOKENBROKER_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// PEM certificate chain the broker presents.
    #[arg(long, env = "TOKENBROKER_TLS_CERT")]
    pub tls_cert: PathBuf,

    /// PEM private key of that certificate.
    #[arg(long, env = "TOKENBROKER_TLS_KEY")]
    pub tls_key: PathBuf,

    /// PEM bundle of the CA(s) that issue caller certificates; no other client gets past the handshake.
    #[arg(long, env = "TOKENBROKER_CLIENT_CA")]
    pub client_ca: PathBuf,

    /// Caller policy (TOML): which caller ids may have which providers' tokens.
    #[arg(long, env = "TOKENBROKER_POLICY")]
    pub policy: Option<PathBuf>,

    /// Run without a policy: every caller with a certificate from the client CA may call every RPC.
    #[arg(long, env = "TOKENBROKER_ALLOW_ANY_CALLER", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_any_caller: bool,

    /// Client ids of the apps users sign in to, comma-separated: an `id_token` must carry one
    /// as `aud`. Unset: requests with an `id_token` get FAILED_PRECONDITION.
    #[arg(long, env = "AUTH0_ID_TOKEN_AUDIENCES", value_delimiter = ',')]
    pub auth0_id_token_audiences: Vec<String>,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// `tokenbroker dev`: a self-contained broker for trying it out.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Address of the broker's mTLS listener.
    #[arg(long, env = "TOKENBROKER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Directory for the generated dev CA, certificates and keys (reused on the next run).
    #[arg(long, env = "TOKENBROKER_DEV_DIR", default_value = ".tokenbroker-dev")]
    pub dir: PathBuf,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// A setting that cannot work; the message names it and says why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("AUTH0_DOMAIN {value:?}: {reason}")]
    Domain { value: String, reason: String },
    #[error("AUTH0_AUDIENCE {value:?}: not an absolute URL")]
    Audience { value: String },
    #[error("AUTH0_CLIENT_ID is empty")]
    EmptyClientId,
    #[error("give exactly one of AUTH0_CLIENT_SECRET and AUTH0_CLIENT_SECRET_FILE (got {given})")]
    SecretSource { given: &'static str },
    #[error("AUTH0_CLIENT_SECRET_FILE {path}: {source}")]
    SecretFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the Auth0 client secret is empty")]
    EmptySecret,
    #[error("TOKENBROKER_USER_CACHE_CAPACITY must be at least 1")]
    ZeroCapacity,
    #[error("{name} must be more than zero")]
    ZeroDuration { name: &'static str },
    #[error("{name} must be at least 1")]
    Zero { name: &'static str },
    #[error("TOKENBROKER_AUTH0_CALLER_SHARE {0}: must be more than 0 and at most 1")]
    CallerShare(f64),
    #[error("no caller policy: give TOKENBROKER_POLICY (a policy file) or, to let every caller with a client-CA certificate call every RPC, --allow-any-caller")]
    NoPolicy,
    #[error("give either TOKENBROKER_POLICY or --allow-any-caller, not both")]
    PolicyAndAllowAny,
}

impl ServeArgs {
    /// Checks every setting and reads the secret file, so bad config fails at start.
    pub fn validate(&self) -> Result<ServeConfig, ConfigError> {
        let base_url = parse_auth0_base_url(&self.auth0_domain)?;
        let audience = match &self.auth0_audience {
            Some(value) => validate_audience(value)?,
            None => format!("{base_url}/api/v2/"),
        };
        if self.auth0_client_id.trim().is_empty() {
            return Err(ConfigError::EmptyClientId);
        }
        let client_secret = read_client_secret(
            self.auth0_client_secret.as_deref(),
            self.auth0_client_secret_file.as_deref(),
        )?;
        let id_token = self
            .common
            .id_token_settings(&base_url, &self.auth0_id_token_audiences);
        let auth0 = Auth0Settings {
            base_url,
            audience,
            client_id: self.auth0_client_id.trim().to_owned(),
            client_secret,
            connect_timeout: self.common.auth0_connect_timeout,
            request_timeout: self.common.auth0_timeout,
        };
        let policy = match (&self.policy, self.allow_any_caller) {
            (Some(path), false) => Some(path.clone()),
            (None, true) => None,
            (None, false) => return Err(ConfigError::NoPolicy),
            (Some(_), true) => return Err(ConfigError::PolicyAndAllowAny),
        };
        Ok(ServeConfig {
            listen: self.listen,
            health_listen: self.common.health_listen,
            metrics_listen: self.common.metrics_listen,
            policy,
            run: self.common.run_settings()?,
            tls: TlsFiles {
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
                client_ca: self.client_ca.clone(),
            },
            broker: BrokerSettings {
                resilience: self.common.resilience_settings()?,
                auth0,
                cache: self.common.cache_settings()?,
                id_token,
                audit: self.common.audit_settings(),
            },
        })
    }
}

impl CommonArgs {
    /// Where audit lines go and the key of their token fingerprints.
    pub fn audit_settings(&self) -> AuditSettings {
        AuditSettings {
            target: self.audit_log.clone(),
            key_file: self.audit_key_file.clone(),
        }
    }

    /// Validated limits on calls to Auth0.
    pub fn resilience_settings(&self) -> Result<ResilienceSettings, ConfigError> {
        if self.auth0_max_in_flight == 0 {
            return Err(ConfigError::Zero {
                name: "TOKENBROKER_AUTH0_MAX_IN_FLIGHT",
            });
        }
        if self.auth0_max_attempts == 0 {
            return Err(ConfigError::Zero {
                name: "TOKENBROKER_AUTH0_MAX_ATTEMPTS",
            });
        }
        if !(self.auth0_caller_share > 0.0 && self.auth0_caller_share <= 1.0) {
            return Err(ConfigError::CallerShare(self.auth0_caller_share));
        }
        Ok(ResilienceSettings {
            outbound: OutboundLimits {
                rate_per_second: self.auth0_rate_limit,
                burst: self.auth0_burst,
                max_in_flight: self.auth0_max_in_flight,
                max_attempts: self.auth0_max_attempts,
                max_wait: self.auth0_timeout,
            },
            stale_if_error: self.stale_if_error,
            caller_share: self.auth0_caller_share,
        })
    }

    /// ID-token verification against the tenant at `base_url` for these
    /// audiences (blank entries ignored); `None` when none is left.
    pub fn id_token_settings(
        &self,
        base_url: &str,
        audiences: &[String],
    ) -> Option<IdTokenSettings> {
        let audiences: Vec<String> = audiences
            .iter()
            .map(|audience| audience.trim())
            .filter(|audience| !audience.is_empty())
            .map(str::to_owned)
            .collect();
        (!audiences.is_empty()).then(|| IdTokenSettings {
            leeway: self.id_token_leeway,
            ..IdTokenSettings::new(base_url, audiences)
        })
    }

    /// Validated shutdown, reload and connection settings.
    pub fn run_settings(&self) -> Result<RunSettings, ConfigError> {
        require_positive("TOKENBROKER_RELOAD_INTERVAL", self.reload_interval)?;
        Ok(RunSettings {
            shutdown_grace: self.shutdown_grace,
            reload_interval: self.reload_interval,
            connections: self.connection_limits()?,
        })
    }

    /// Validated connection limits: no count may be zero (it would refuse
    /// everything) and no timeout zero (it would close every connection).
    pub fn connection_limits(&self) -> Result<ConnectionLimits, ConfigError> {
        require_at_least_one(
            "TOKENBROKER_MAX_CONCURRENT_STREAMS",
            self.max_concurrent_streams,
        )?;
        require_at_least_one(
            "TOKENBROKER_HEALTH_MAX_CONCURRENT_STREAMS",
            self.health_max_concurrent_streams,
        )?;
        require_at_least_one("TOKENBROKER_MAX_CONNECTIONS", self.max_connections)?;
        require_at_least_one(
            "TOKENBROKER_MAX_PENDING_HANDSHAKES",
            self.max_pending_handshakes,
        )?;
        require_positive("TOKENBROKER_HANDSHAKE_TIMEOUT", self.handshake_timeout)?;
        require_positive(
            "TOKENBROKER_FIRST_REQUEST_TIMEOUT",
            self.first_request_timeout,
        )?;
        require_positive("TOKENBROKER_KEEPALIVE_INTERVAL", self.keepalive_interval)?;
        require_positive("TOKENBROKER_KEEPALIVE_TIMEOUT", self.keepalive_timeout)?;
        require_positive("TOKENBROKER_REQUEST_TIMEOUT", self.request_timeout)?;
        Ok(ConnectionLimits {
            max_concurrent_streams: self.max_concurrent_streams,
            health_max_concurrent_streams: self.health_max_concurrent_streams,
            max_connections: self.max_connections,
            max_pending_handshakes: self.max_pending_handshakes,
            handshake_timeout: self.handshake_timeout,
            first_request_timeout: self.first_request_timeout,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            request_timeout: self.request_timeout,
        })
    }

    /// Validated cache settings.
    pub fn cache_settings(&self) -> Result<CacheSettings, ConfigError> {
        if self.user_cache_capacity == 0 {
            return Err(ConfigError::ZeroCapacity);
        }
        require_positive("TOKENBROKER_USER_CACHE_TTL", self.user_cache_ttl)?;
        require_positive(
            "TOKENBROKER_AUTH0_CONNECT_TIMEOUT",
            self.auth0_connect_timeout,
        )?;
        require_positive("TOKENBROKER_AUTH0_TIMEOUT", self.auth0_timeout)?;
        if self.user_cache_max_bytes == 0 {
            return Err(ConfigError::Zero {
                name: "TOKENBROKER_USER_CACHE_MAX_BYTES",
            });
        }
        Ok(CacheSettings {
            user_ttl: self.user_cache_ttl,
            user_capacity: self.user_cache_capacity,
            user_max_bytes: self.user_cache_max_bytes,
            negative_ttl: self.negative_cache_ttl,
        })
    }
}

fn require_at_least_one<T: Default + PartialEq>(
    name: &'static str,
    value: T,
) -> Result<(), ConfigError> {
    if value == T::default() {
        return Err(ConfigError::Zero { name });
    }
    Ok(())
}

fn require_positive(name: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::ZeroDuration { name });
    }
    Ok(())
}

/// Accepts `tenant.auth0.com` (https implied) or `http(s)://host[:port]` and
/// returns `scheme://host[:port]` with no trailing slash.
pub fn parse_auth0_base_url(value: &str) -> Result<String, ConfigError> {
    let fail = |reason: &str| ConfigError::Domain {
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(fail("is empty"));
    }
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("https://{trimmed}")
    };
    let url =
        Url::parse(&with_scheme).map_err(|e| fail(&format!("not a host name or URL ({e})")))?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err(fail("scheme must be https (or http for a local emulator)"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(fail("has no host"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(fail(
            "must be a bare host or scheme://host[:port], without a path",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(fail("must not carry credentials"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

fn validate_audience(value: &str) -> Result<String, ConfigError> {
    match Url::parse(value.trim()) {
        Ok(_) => Ok(value.trim().to_owned()),
        Err(_) => Err(ConfigError::Audience {
            value: value.to_owned(),
        }),
    }
}

fn read_client_secret(
    inline: Option<&str>,
    file: Option<&Path>,
) -> Result<SecretString, ConfigError> {
    let secret = match (inline, file) {
        (Some(value), None) => value.trim().to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|source| ConfigError::SecretFile {
                path: path.to_owned(),
                source,
            })?
            .trim()
            .to_owned(),
        (Some(_), Some(_)) => return Err(ConfigError::SecretSource { given: "both" }),
        (None, None) => return Err(ConfigError::SecretSource { given: "neither" }),
    };
    if secret.is_empty() {
        return Err(ConfigError::EmptySecret);
    }
    Ok(SecretString::from(secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn bare_domain_means_https() {
        assert_eq!(
            parse_auth0_base_url("tenant.eu.auth0.com").unwrap(),
            "https://tenant.eu.auth0.com"
        );
    }

    #[test]
    fn full_url_with_port_is_kept_for_emulators() {
        assert_eq!(
            parse_auth0_base_url("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
    }

    #[test]
    fn domain_with_path_or_odd_scheme_is_refused() {
        assert!(parse_auth0_base_url("https://tenant.auth0.com/api").is_err());
        assert!(parse_auth0_base_url("ftp://tenant.auth0.com").is_err());
        assert!(parse_auth0_base_url("").is_err());
    }

    #[test]
    fn secret_file_is_trimmed_and_both_sources_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cret\n").unwrap();
        let secret = read_client_secret(None, Some(&path)).unwrap();
        assert_eq!(secret.expose_secret(), "s3cret");
        assert!(matches!(
            read_client_secret(Some("x"), Some(&path)),
            Err(ConfigError::SecretSource { given: "both" })
        ));
        assert!(matches!(
            read_client_secret(None, None),
            Err(ConfigError::SecretSource { given: "neither" })
        ));
    }

    /// `CommonArgs` as parsed from `args` (and the environment).
    fn common_args(args: &[&str]) -> CommonArgs {
        #[derive(Parser)]
        struct Common {
            #[command(flatten)]
            common: CommonArgs,
        }
        let argv = std::iter::once("tokenbroker").chain(args.iter().copied());
        Common::try_parse_from(argv).expect("parses").common
    }

    #[test]
    fn connection_flag_defaults_are_the_listener_defaults() {
        let limits = common_args(&[]).connection_limits().expect("valid");
        assert_eq!(limits, ConnectionLimits::default());
    }

    #[test]
    fn connection_flags_reach_the_limits_and_zero_is_refused() {
        let limits = common_args(&[
            "--max-concurrent-streams=8",
            "--max-connections=4",
            "--first-request-timeout=300ms",
        ])
        .connection_limits()
        .expect("valid");
        assert_eq!(limits.max_concurrent_streams, 8);
        assert_eq!(limits.max_connections, 4);
        assert_eq!(limits.first_request_timeout, Duration::from_millis(300));
        let zero = common_args(&["--max-connections=0"]).connection_limits();
        assert!(matches!(
            zero,
            Err(ConfigError::Zero {
                name: "TOKENBROKER_MAX_CONNECTIONS"
            })
        ));
        let instant = common_args(&["--handshake-timeout=0s"]).connection_limits();
        assert!(matches!(
            instant,
            Err(ConfigError::ZeroDuration {
                name: "TOKENBROKER_HANDSHAKE_TIMEOUT"
            })
        ));
    }

    #[test]
    fn missing_secret_file_names_the_setting() {
        let err = read_client_secret(None, Some(Path::new("/nonexistent/secret"))).unwrap_err();
        assert!(err.to_string().starts_with("AUTH0_CLIENT_SECRET_FILE"));
    }
}
