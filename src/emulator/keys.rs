//! RSA keys for the broker's own JWTs in `tokenbroker dev` and the tests: the
//! client assertion (`private_key_jwt`) and the Token Vault subject token.
//!
//! They are **public test fixtures** (see `keys/README.md`), checked in like
//! the ID-token signing keys because ring cannot generate RSA keys: anyone
//! who reads this repository can sign with them, so nothing but the emulator
//! may ever trust them. The first is PKCS#8 (`BEGIN PRIVATE KEY`), the second
//! PKCS#1 (`BEGIN RSA PRIVATE KEY`), so both formats the broker reads are
//! exercised; the third is never registered anywhere, a key an attacker holds.

/// The dev broker's client assertion key (PKCS#8).
pub const CLIENT_ASSERTION_KEY_1: &str = include_str!("keys/client-assertion-1.pem");
/// A second key (PKCS#1): what a rotation moves to.
pub const CLIENT_ASSERTION_KEY_2: &str = include_str!("keys/client-assertion-2.pem");
/// A key no tenant knows (PKCS#8).
pub const CLIENT_ASSERTION_KEY_3: &str = include_str!("keys/client-assertion-3.pem");
