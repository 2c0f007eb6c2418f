//! The test kit: what the integration tests (`tests/it/`) and the load
//! benchmark (`benches/load/`) need around a broker, written once. A test PKI
//! (CA, loopback server certificate, client certificates, the files the broker
//! reads), the client credentials a broker and its Auth0 emulator share, a
//! broker started on loopback port 0 (built with [`Broker::new`], like every
//! broker) and mTLS clients presenting a chosen certificate.
//!
//! It sits behind the `testkit` cargo feature, so the production binary
//! carries none of it. `Cargo.toml` lists the crate as its own dev-dependency
//! with that feature on, which cargo unifies into every test and bench build:
//! plain `cargo test`, `cargo clippy --all-targets` and `cargo bench` compile
//! it with no extra flag, while `cargo build` leaves it out. (`required-features`
//! would instead skip the tests on a plain `cargo test`.)
//!
//! It is test support: functions a test calls in one line return errors where
//! a test could want to look at them, and `expect` only what cannot fail.
//!
//! [`Broker::new`]: crate::server::Broker::new

mod broker;
mod client;
mod pki;

pub use broker::{Credentials, HealthListener, StartedBroker};
pub use client::{mtls_channel, mtls_client};
pub use pki::TestPki;
