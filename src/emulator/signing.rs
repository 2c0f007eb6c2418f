//! The emulator's RSA signing keys and the JWKS entries it publishes for them.
//!
//! The three keys under `keys/` are **public test fixtures** (see `keys/README.md`): checked
//! in so that every emulator signs alike and no test has to generate RSA keys. Nothing outside
//! the emulator and the tests may trust them. Each key's JWK (`n`, `e`) is derived from the
//! private key when it is first used, so the published half can never drift from the signer.

use std::sync::LazyLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::EncodingKey;
use ring::rsa::PublicKeyComponents;
use ring::signature::RsaKeyPair;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;
use serde_json::{json, Value};

/// How many fixture keys there are; rotation wraps around after the last one.
pub(crate) const KEY_COUNT: usize = 3;

/// Key id and PKCS#8 PEM of each fixture key, in rotation order.
const FIXTURES: [(&str, &str); KEY_COUNT] = [
    ("dev-signing-1", include_str!("keys/dev-signing-1.pem")),
    ("dev-signing-2", include_str!("keys/dev-signing-2.pem")),
    ("dev-signing-3", include_str!("keys/dev-signing-3.pem")),
];

/// Parsed once per process: RSA key parsing is slow and the fixtures never change.
static KEYS: LazyLock<Vec<FixtureKey>> = LazyLock::new(|| {
    FIXTURES
        .iter()
        .map(|(kid, pem)| FixtureKey::load(kid, pem))
        .collect()
});

/// One fixture key, ready to sign with and to publish.
pub(crate) struct FixtureKey {
    /// The `kid` the key is published under and that tokens it signs carry.
    pub(crate) kid: &'static str,
    /// Signing half, for `jsonwebtoken::encode`.
    pub(crate) encoding: EncodingKey,
    /// PKCS#1 DER of the public key: what an alg-confusion attacker uses as HMAC secret.
    pub(crate) public_der: Vec<u8>,
    /// Base64url (no padding) modulus, for the JWK.
    n: String,
    /// Base64url (no padding) public exponent, for the JWK.
    e: String,
}

impl FixtureKey {
    /// Parses a fixture; they are compiled in, so a bad one is a build mistake worth a panic.
    fn load(kid: &'static str, pem: &str) -> FixtureKey {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .unwrap_or_else(|e| panic!("fixture key {kid} is not a PKCS#8 PEM: {e}"));
        let pair = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .unwrap_or_else(|e| panic!("fixture key {kid} is not an RSA key: {e}"));
        let encoding = EncodingKey::from_rsa_pem(pem.as_bytes())
            .unwrap_or_else(|e| panic!("fixture key {kid} is unusable for RS256: {e}"));
        let components = PublicKeyComponents::<Vec<u8>>::from(pair.public());
        FixtureKey {
            kid,
            encoding,
            public_der: pair.public().as_ref().to_vec(),
            n: base64url_uint(&components.n),
            e: base64url_uint(&components.e),
        }
    }

    /// The key's JWKS entry, shaped like Auth0's (`kty`, `use`, `alg`, `kid`, `n`, `e`).
    pub(crate) fn jwk(&self) -> Value {
        json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": self.n,
            "e": self.e,
        })
    }
}

/// The fixture key at `index` (taken modulo [`KEY_COUNT`]).
pub(crate) fn key(index: usize) -> &'static FixtureKey {
    &KEYS[index % KEY_COUNT]
}

/// JWK encoding of an unsigned big-endian integer: base64url of its bytes without leading zeros.
fn base64url_uint(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    URL_SAFE_NO_PAD.encode(&bytes[start..])
}
