//! Integration tests: the real server over real mTLS against the in-process
//! Auth0 emulator on loopback. One test binary keeps link time down.

mod audit;
mod binary;
mod caching;
mod fleet;
mod floods;
mod fresh_tokens;
mod hardening;
mod hostile_auth0;
mod id_tokens;
mod lifecycle;
mod policy;
mod rate;
mod resilience;
mod security;
mod status_codes;
mod support;
mod token_vault;
