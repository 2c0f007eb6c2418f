//! The settings `serve` and `dev` share (caches, Auth0 limits, listeners,
//! audit, timeouts), and the validated settings types built from them.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::ConfigError;
use crate::audit::{AuditSettings, SinkTarget};
use crate::auth0::OutboundLimits;
use crate::cache::CacheSettings;
use crate::fleet::FleetSettings;
use crate::id_token::IdTokenSettings;
use crate::listener::{
    ConnectionLimits, DEFAULT_HEALTH_MAX_CONCURRENT_STREAMS, DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PENDING_HANDSHAKES,
};
use crate::server::{ResilienceSettings, RunSettings};
use crate::service::fresh::FreshnessSettings;
use crate::telemetry::LogFormat;

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
    #[arg(long, env = "TOKENBROKER_USER_CACHE_TTL", default_value_t = crate::cache::DEFAULT_USER_TTL.into())]
    pub user_cache_ttl: humantime::Duration,

    /// How many users the identity cache holds at most.
    #[arg(
        long,
        env = "TOKENBROKER_USER_CACHE_CAPACITY",
        default_value_t = crate::cache::DEFAULT_USER_CAPACITY
    )]
    pub user_cache_capacity: u64,

    /// Estimated bytes the identity cache holds at most (ids, identities, tokens, overhead), so a few huge profiles cannot take the memory the capacity was sized for.
    #[arg(long, env = "TOKENBROKER_USER_CACHE_MAX_BYTES", default_value_t = crate::cache::DEFAULT_USER_MAX_BYTES)]
    pub user_cache_max_bytes: u64,

    /// How long "Auth0 has no such user" is remembered, so a caller in a retry loop cannot burn the quota.
    #[arg(long, env = "TOKENBROKER_NEGATIVE_CACHE_TTL", default_value_t = crate::cache::DEFAULT_NEGATIVE_TTL.into())]
    pub negative_cache_ttl: humantime::Duration,

    /// Timeout for opening a connection to Auth0.
    #[arg(long, env = "TOKENBROKER_AUTH0_CONNECT_TIMEOUT", default_value_t = crate::auth0::DEFAULT_CONNECT_TIMEOUT.into())]
    pub auth0_connect_timeout: humantime::Duration,

    /// Bounds one whole call to Auth0, retries and their waits included (and each request).
    #[arg(long, env = "TOKENBROKER_AUTH0_TIMEOUT", default_value_t = crate::auth0::DEFAULT_REQUEST_TIMEOUT.into())]
    pub auth0_timeout: humantime::Duration,

    /// Sustained requests per second the broker sends to Auth0 (the tenant's quota is shared).
    #[arg(long, env = "TOKENBROKER_AUTH0_RATE_LIMIT", default_value_t = crate::auth0::DEFAULT_RATE_PER_SECOND)]
    pub auth0_rate_limit: NonZeroU32,

    /// Requests to Auth0 allowed at once above the sustained rate.
    #[arg(long, env = "TOKENBROKER_AUTH0_BURST", default_value_t = crate::auth0::DEFAULT_BURST)]
    pub auth0_burst: NonZeroU32,

    /// Requests to Auth0 in flight at once.
    #[arg(long, env = "TOKENBROKER_AUTH0_MAX_IN_FLIGHT", default_value_t = crate::auth0::DEFAULT_MAX_IN_FLIGHT)]
    pub auth0_max_in_flight: usize,

    /// Attempts per Auth0 call on 429, 5xx and network errors (the first included).
    #[arg(long, env = "TOKENBROKER_AUTH0_MAX_ATTEMPTS", default_value_t = crate::auth0::DEFAULT_MAX_ATTEMPTS)]
    pub auth0_max_attempts: u32,

    /// The fraction (0 to 1) of the Auth0 rate and burst one caller may spend, so no caller can starve the others.
    #[arg(long, env = "TOKENBROKER_AUTH0_CALLER_SHARE", default_value_t = crate::budget::DEFAULT_CALLER_SHARE)]
    pub auth0_caller_share: f64,

    /// How long past its TTL a cached user may be served while Auth0 fails (0 turns it off).
    #[arg(long, env = "TOKENBROKER_STALE_IF_ERROR", default_value_t = crate::cache::DEFAULT_STALE_IF_ERROR.into())]
    pub stale_if_error: humantime::Duration,

    /// Connections file (TOML): per Auth0 connection, where its tokens come from and whether the broker refreshes them at the IdP.
    #[arg(long, env = "TOKENBROKER_CONNECTIONS")]
    pub connections: Option<PathBuf>,

    /// How long a released token must stay valid when the request sets no min_valid_for.
    #[arg(long, env = "TOKENBROKER_MIN_TOKEN_VALIDITY", default_value_t = crate::service::fresh::DEFAULT_MIN_TOKEN_VALIDITY.into())]
    pub min_token_validity: humantime::Duration,

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
    #[arg(long, env = "TOKENBROKER_SHUTDOWN_GRACE", default_value_t = crate::server::DEFAULT_SHUTDOWN_GRACE.into())]
    pub shutdown_grace: humantime::Duration,

    /// How often the policy and TLS files are checked for changes (SIGHUP checks at once).
    #[arg(long, env = "TOKENBROKER_RELOAD_INTERVAL", default_value_t = crate::server::DEFAULT_RELOAD_INTERVAL.into())]
    pub reload_interval: humantime::Duration,

    /// Clock skew tolerated on an ID token's exp, nbf and iat.
    #[arg(long, env = "TOKENBROKER_ID_TOKEN_LEEWAY", default_value_t = crate::id_token::DEFAULT_LEEWAY.into())]
    pub id_token_leeway: humantime::Duration,

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
    #[arg(long, env = "TOKENBROKER_HANDSHAKE_TIMEOUT", default_value_t = crate::listener::DEFAULT_HANDSHAKE_TIMEOUT.into())]
    pub handshake_timeout: humantime::Duration,

    /// How long a new connection may stay silent before sending the HTTP/2 preface.
    #[arg(long, env = "TOKENBROKER_FIRST_REQUEST_TIMEOUT", default_value_t = crate::listener::DEFAULT_FIRST_REQUEST_TIMEOUT.into())]
    pub first_request_timeout: humantime::Duration,

    /// Idle time after which the broker pings a client (HTTP/2 PING) to keep the connection and check it.
    #[arg(long, env = "TOKENBROKER_KEEPALIVE_INTERVAL", default_value_t = crate::listener::DEFAULT_KEEPALIVE_INTERVAL.into())]
    pub keepalive_interval: humantime::Duration,

    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "TOKENBROKER_KEEPALIVE_TIMEOUT", default_value_t = crate::listener::DEFAULT_KEEPALIVE_TIMEOUT.into())]
    pub keepalive_timeout: humantime::Duration,

    /// Longest one request may take, body included, before it is ended with CANCELLED.
    #[arg(long, env = "TOKENBROKER_REQUEST_TIMEOUT", default_value_t = crate::listener::DEFAULT_REQUEST_TIMEOUT.into())]
    pub request_timeout: humantime::Duration,

    /// Redis or Valkey the replicas share (`redis://`, `rediss://` for TLS): one cache tier, one Auth0 read per user and one Auth0 budget for the fleet, InvalidateUser on every replica. Unset: this replica alone.
    #[arg(long, env = "TOKENBROKER_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// PEM CA bundle trusted for `rediss://` instead of the system roots.
    #[arg(long, env = "TOKENBROKER_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Base64 of 32 random bytes (`openssl rand -base64 32`), the same on every replica: seals what the fleet keeps in Redis and names its keys. Required with --redis-url.
    #[arg(long, env = "TOKENBROKER_CACHE_KEY_FILE")]
    pub cache_key_file: Option<PathBuf>,

    /// Bound on each Redis call; past it the replica serves alone (moka, Auth0, its own budget) until Redis answers again.
    #[arg(long, env = "TOKENBROKER_REDIS_TIMEOUT", default_value_t = crate::fleet::DEFAULT_REDIS_TIMEOUT.into())]
    pub redis_timeout: humantime::Duration,

    /// Life of a replica's fleet-wide lock on a user's Auth0 read: how long the others wait for a replica that died mid-read.
    #[arg(long, env = "TOKENBROKER_REDIS_LOCK_TTL", default_value_t = crate::fleet::DEFAULT_LOCK_TTL.into())]
    pub redis_lock_ttl: humantime::Duration,
}

impl CommonArgs {
    /// The connections file, the default `min_valid_for` and the IdP client.
    pub fn freshness_settings(&self) -> FreshnessSettings {
        FreshnessSettings {
            connections: self.connections.clone(),
            default_min_validity: *self.min_token_validity,
            ..FreshnessSettings::default()
        }
    }

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
                max_wait: *self.auth0_timeout,
            },
            stale_if_error: *self.stale_if_error,
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
            leeway: *self.id_token_leeway,
            ..IdTokenSettings::new(base_url, audiences)
        })
    }

    /// Validated shutdown, reload and connection settings.
    pub fn run_settings(&self) -> Result<RunSettings, ConfigError> {
        require_positive("TOKENBROKER_RELOAD_INTERVAL", *self.reload_interval)?;
        Ok(RunSettings {
            shutdown_grace: *self.shutdown_grace,
            reload_interval: *self.reload_interval,
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
        require_positive("TOKENBROKER_HANDSHAKE_TIMEOUT", *self.handshake_timeout)?;
        require_positive(
            "TOKENBROKER_FIRST_REQUEST_TIMEOUT",
            *self.first_request_timeout,
        )?;
        require_positive("TOKENBROKER_KEEPALIVE_INTERVAL", *self.keepalive_interval)?;
        require_positive("TOKENBROKER_KEEPALIVE_TIMEOUT", *self.keepalive_timeout)?;
        require_positive("TOKENBROKER_REQUEST_TIMEOUT", *self.request_timeout)?;
        Ok(ConnectionLimits {
            max_concurrent_streams: self.max_concurrent_streams,
            health_max_concurrent_streams: self.health_max_concurrent_streams,
            max_connections: self.max_connections,
            max_pending_handshakes: self.max_pending_handshakes,
            handshake_timeout: *self.handshake_timeout,
            first_request_timeout: *self.first_request_timeout,
            keepalive_interval: *self.keepalive_interval,
            keepalive_timeout: *self.keepalive_timeout,
            request_timeout: *self.request_timeout,
        })
    }

    /// Validated cache settings.
    pub fn cache_settings(&self) -> Result<CacheSettings, ConfigError> {
        if self.user_cache_capacity == 0 {
            return Err(ConfigError::ZeroCapacity);
        }
        require_positive("TOKENBROKER_USER_CACHE_TTL", *self.user_cache_ttl)?;
        require_positive(
            "TOKENBROKER_AUTH0_CONNECT_TIMEOUT",
            *self.auth0_connect_timeout,
        )?;
        require_positive("TOKENBROKER_AUTH0_TIMEOUT", *self.auth0_timeout)?;
        if self.user_cache_max_bytes == 0 {
            return Err(ConfigError::Zero {
                name: "TOKENBROKER_USER_CACHE_MAX_BYTES",
            });
        }
        Ok(CacheSettings {
            user_ttl: *self.user_cache_ttl,
            user_capacity: self.user_cache_capacity,
            user_max_bytes: self.user_cache_max_bytes,
            negative_ttl: *self.negative_cache_ttl,
        })
    }
}

impl CommonArgs {
    /// Validated fleet settings: `None` without a Redis URL (and then no
    /// other fleet setting may be given, as it would do nothing).
    pub fn fleet_settings(&self) -> Result<Option<FleetSettings>, ConfigError> {
        let url = self.redis_url.as_deref().map(str::trim).unwrap_or_default();
        if url.is_empty() {
            return match (&self.cache_key_file, &self.redis_ca_file) {
                (Some(_), _) => Err(ConfigError::WithoutRedis {
                    name: "TOKENBROKER_CACHE_KEY_FILE",
                }),
                (None, Some(_)) => Err(ConfigError::WithoutRedis {
                    name: "TOKENBROKER_REDIS_CA_FILE",
                }),
                (None, None) => Ok(None),
            };
        }
        let key_file = self
            .cache_key_file
            .clone()
            .ok_or(ConfigError::CacheKeyMissing)?;
        require_positive("TOKENBROKER_REDIS_TIMEOUT", *self.redis_timeout)?;
        require_positive("TOKENBROKER_REDIS_LOCK_TTL", *self.redis_lock_ttl)?;
        Ok(Some(FleetSettings {
            url: url.to_owned().into(),
            ca_file: self.redis_ca_file.clone(),
            key_file,
            timeout: *self.redis_timeout,
            lock_ttl: *self.redis_lock_ttl,
        }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

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
    fn flag_defaults_are_the_modules_defaults() {
        let args = common_args(&[]);
        let resilience = args.resilience_settings().expect("valid");
        let limits = OutboundLimits::default();
        assert_eq!(resilience.outbound.rate_per_second, limits.rate_per_second);
        assert_eq!(resilience.outbound.burst, limits.burst);
        assert_eq!(resilience.outbound.max_in_flight, limits.max_in_flight);
        assert_eq!(resilience.outbound.max_attempts, limits.max_attempts);
        assert_eq!(resilience.outbound.max_wait, limits.max_wait);
        assert_eq!(
            resilience.stale_if_error,
            crate::cache::DEFAULT_STALE_IF_ERROR
        );
        let cache = args.cache_settings().expect("valid");
        assert_eq!(cache.user_ttl, crate::cache::DEFAULT_USER_TTL);
        assert_eq!(cache.user_capacity, crate::cache::DEFAULT_USER_CAPACITY);
        assert_eq!(cache.negative_ttl, crate::cache::DEFAULT_NEGATIVE_TTL);
        let run = args.run_settings().expect("valid");
        assert_eq!(run.shutdown_grace, crate::server::DEFAULT_SHUTDOWN_GRACE);
        assert_eq!(run.reload_interval, crate::server::DEFAULT_RELOAD_INTERVAL);
    }

    #[test]
    fn without_a_redis_url_there_is_no_fleet_and_fleet_flags_are_refused() {
        assert!(common_args(&[]).fleet_settings().expect("valid").is_none());
        let stray = common_args(&["--cache-key-file=/k"]).fleet_settings();
        assert!(matches!(
            stray,
            Err(ConfigError::WithoutRedis {
                name: "TOKENBROKER_CACHE_KEY_FILE"
            })
        ));
    }

    #[test]
    fn a_redis_url_needs_the_cache_key_and_takes_the_fleet_defaults() {
        let missing = common_args(&["--redis-url=redis://127.0.0.1:6379"]).fleet_settings();
        assert!(matches!(missing, Err(ConfigError::CacheKeyMissing)));
        let fleet = common_args(&["--redis-url=redis://127.0.0.1:6379", "--cache-key-file=/k"])
            .fleet_settings()
            .expect("valid")
            .expect("a fleet");
        assert_eq!(fleet.timeout, crate::fleet::DEFAULT_REDIS_TIMEOUT);
        assert_eq!(fleet.lock_ttl, crate::fleet::DEFAULT_LOCK_TTL);
        assert_eq!(fleet.key_file, PathBuf::from("/k"));
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
}
