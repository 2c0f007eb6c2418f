//! tokenbroker: hands internal callers a user's identity-provider token from
//! Auth0, over mutual TLS, so that no browser, app or other service ever needs
//! the Management API secret.
//!
//! Codemap:
//! * [`config`] — flags and environment, validated once at start.
//! * [`auth0`] — everything about the tenant: the Management-token session,
//!   `/api/v2/users/{id}`, the `/oauth/token` grants and the JWKS, on one send path.
//! * [`id_token`] — verifies users' Auth0 ID tokens (RS256, the tenant's JWKS, cached) to
//!   bind a release to the user's own login.
//! * [`cache`] — the moka cache of users' identities in front of [`auth0`].
//! * [`connections`] — per Auth0 connection: where its tokens come from, whether the broker
//!   refreshes them at the IdP (the connections file, reloadable).
//! * [`idp`] — refreshes IdP tokens at the IdP with the identity's refresh token: one call per
//!   user and connection at a time, rotation, its own rate limit and retries.
//! * [`kept`] — tokens kept per user and connection until they expire, and forgetting a
//!   user (shared by [`idp`] and [`vault`]).
//! * [`vault`] — Auth0 Token Vault tokens (`source = "token-vault"`): one exchange per user
//!   and connection at a time, kept while usable.
//! * [`fleet`] — with `--redis-url`: the shared tier under moka, the fleet-wide single
//!   flight, one Auth0 budget and invalidation across replicas (Redis or Valkey).
//! * [`selection`] — which identity a request means (pure).
//! * [`service`] — the gRPC service: proto types, deadlines, audit events.
//! * [`error`] — the broker's error enum and its mapping to gRPC status.
//! * [`tls`] — the mTLS listener (rustls) and the caller's identity, read once per connection.
//! * [`listener`] — connection limits: slots per listener, the preface deadline, accept backoff.
//! * [`open_files`] — raises the open-file limit at start.
//! * [`server`] — wires services, reflection and health onto a bound listener.
//! * [`emulator`] — an in-process Auth0 tenant for `tokenbroker dev` and tests.
//! * [`pki`] — dev and test certificates (rcgen).
//! * [`dev`] — `tokenbroker dev`: emulator, PKI and broker in one command.
//! * [`telemetry`] — tracing subscriber setup.
//! * `testkit` (feature `testkit`, on for tests and benches) — PKI, emulator
//!   credentials, a started broker and mTLS clients for tests and the benchmark.
//!
//! Invariants: only `auth0` does outbound HTTP to the one configured tenant
//! over one client and one send path, and only `idp` to the IdP token
//! endpoints of the connections file; only `service` and `error`
//! touch proto types and `tonic::Status`; tokens and the client secret are
//! `secrecy` types and never enter a log line or span field.

/// mimalloc instead of the system allocator, for every binary built on this
/// crate (the broker, its tests and its benchmarks alike). A tokio server
/// frees on one worker what another allocated; glibc's malloc then takes the
/// other thread's arena lock, and on the cache-hit path those lock waits and
/// wake-ups were among the largest costs a profile showed (BENCHMARKS.md).
/// mimalloc frees across threads without a lock.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod audit;
pub mod auth0;
pub mod budget;
pub mod cache;
pub mod caller;
pub mod config;
pub mod connections;
pub mod dev;
pub mod emulator;
pub mod error;
pub mod fleet;
pub mod id_token;
pub mod idp;
pub mod kept;
pub mod keyfile;
pub mod listener;
pub mod logsafe;
pub mod open_files;
pub mod pki;
pub mod policy;
pub mod reload;
pub mod selection;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod stats;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod tls;
pub mod user_id;
pub mod vault;

/// Generated gRPC code and the descriptor set that reflection serves.
pub mod proto {
    tonic::include_proto!("tokenbroker.v1");

    /// Encoded `FileDescriptorSet` of the API, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tokenbroker_descriptor");
}
