//! The broker under test, built as every broker is (`Broker::new`, run by the
//! test kit's `StartedBroker`), with the settings BENCHMARKS.md states: policy
//! allow-any, user TTL 1 h, Auth0 limits raised so the client-side limiter
//! never shapes the figures, no audit and no ID tokens.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use tokenbroker::audit::{AuditSettings, SinkTarget};
use tokenbroker::auth0::OutboundLimits;
use tokenbroker::cache::{CacheSettings, DEFAULT_USER_MAX_BYTES};
use tokenbroker::pki::write_file;
use tokenbroker::pki::IssuedCertificate;
use tokenbroker::policy::{Policy, PolicyStore};
use tokenbroker::server::{BrokerSettings, ResilienceSettings};
use tokenbroker::testkit::{mtls_channel, Credentials, StartedBroker, TestPki};
use tonic::transport::Channel;

use crate::common::{idp_connections, start_warm};

/// What the broker presents to the emulator, and the emulator accepts.
pub const CREDENTIALS: Credentials<'static> = Credentials {
    client_id: "tokenbroker-bench",
    client_secret: "bench-client-secret-0c9a7e",
};

/// The caller id of the load's client certificate.
const CALLER: &str = "spiffe://bench.example/ns/load/sa/client";

/// The test kit's PKI and the one client certificate every channel presents.
pub struct Pki {
    /// CA, server certificate and the files the broker reads.
    pub kit: TestPki,
    /// The load generator's certificate.
    pub client: IssuedCertificate,
}

/// A fresh bench PKI.
pub fn pki() -> Pki {
    let kit = TestPki::generate("bench CA").expect("bench PKI");
    let client = kit.issue_client(CALLER).expect("client cert");
    Pki { kit, client }
}

/// Limits raised so the client-side limiter never shapes the figures.
fn open_limits() -> OutboundLimits {
    OutboundLimits {
        rate_per_second: NonZeroU32::new(100_000).unwrap_or(NonZeroU32::MIN),
        burst: NonZeroU32::new(100_000).unwrap_or(NonZeroU32::MIN),
        max_in_flight: 64,
        ..OutboundLimits::default()
    }
}

/// Where the broker finds Auth0 and how much it may cache.
pub struct Upstream {
    /// The emulator's URL.
    pub base_url: String,
    /// The Management API audience the emulator accepts.
    pub audience: String,
    /// Users the cache may hold.
    pub capacity: u64,
    /// The stale-if-error window (`--stale-if-error-secs`).
    pub stale_if_error: Duration,
}

/// The broker as production runs it (service, health, reflection, policy,
/// audit), in process on port 0, with a Management token already obtained so
/// no measured request pays for it.
/// The configuration production runs beside the settings above: the audit
/// trail to a file with its HMAC key, a policy listing the load's caller, and
/// the connections file that refreshes Google at the emulator's IdP (the
/// stale-token phase). `--bare-config` leaves out the audit and the policy.
pub struct Production {
    pub audit: AuditSettings,
    pub policy: PolicyStore,
    pub connections: Option<std::path::PathBuf>,
}

impl Production {
    /// Writes the files under the bench PKI's directory.
    pub fn for_run(pki: &Pki, emulator: &tokenbroker::emulator::Emulator, bare: bool) -> Self {
        let connections = idp_connections(&pki.kit, emulator);
        if bare {
            return Self {
                connections: Some(connections),
                ..Self::bare()
            };
        }
        let key = pki.kit.path("audit.key");
        write_file(&key, AUDIT_KEY_BASE64, true).expect("audit key");
        let policy = Policy::parse(
            &format!("[[caller]]\nid = \"{CALLER}\"\nproviders = [\"*\"]\n"),
            std::path::Path::new("bench-policy.toml"),
        )
        .expect("bench policy");
        Self {
            audit: AuditSettings {
                target: SinkTarget::File(pki.kit.path("audit.log")),
                key_file: Some(key),
            },
            policy: PolicyStore::fixed(policy),
            connections: Some(connections),
        }
    }

    /// No audit, allow-any, no connections file: the memory phase, whose
    /// emulator runs in a child process (audit and policy add no memory per
    /// cached user).
    pub fn bare() -> Self {
        Self {
            audit: AuditSettings::off(),
            policy: PolicyStore::fixed(Policy::allow_any()),
            connections: None,
        }
    }
}

/// The bench's audit key (base64 of 32 bytes).
const AUDIT_KEY_BASE64: &str = "YmVuY2gtYXVkaXQta2V5LTAwMDAwMDAwMDAwMDAwMDA=";

pub async fn start_broker(pki: &Pki, upstream: Upstream, production: &Production) -> StartedBroker {
    let settings = BrokerSettings {
        auth0: CREDENTIALS.auth0_settings(upstream.base_url, upstream.audience),
        resilience: ResilienceSettings {
            outbound: open_limits(),
            stale_if_error: upstream.stale_if_error,
            caller_share: 1.0,
        },
        cache: CacheSettings {
            // Longer than any run, so no entry expires under load.
            user_ttl: Duration::from_secs(3600),
            user_capacity: upstream.capacity,
            user_max_bytes: DEFAULT_USER_MAX_BYTES,
            negative_ttl: Duration::from_secs(30),
        },
        id_token: None,
        audit: production.audit.clone(),
        freshness: tokenbroker::service::fresh::FreshnessSettings {
            connections: production.connections.clone(),
            ..Default::default()
        },
        fleet: None,
    };
    let policy = PolicyStore::fixed(production.policy.current().as_ref().clone());
    start_warm(&pki.kit, settings, policy).await
}

/// `count` mTLS channels to `addr`, each presenting the load's certificate.
pub async fn connect_many(addr: SocketAddr, pki: &Pki, count: usize) -> Vec<Channel> {
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        let channel = mtls_channel(addr, &pki.kit.ca.cert_pem, Some(&pki.client))
            .await
            .expect("mTLS connection");
        channels.push(channel);
    }
    channels
}
