//! Refreshing users' IdP tokens at the IdP itself (issue "Fresh tokens").
//!
//! Auth0 keeps the token an IdP gave at sign-in on the user's profile and never
//! refreshes it: `identities[].expires_in` is the lifetime it had then, so the
//! profile's token can be long dead. For connections the operator marks
//! `refresh = "idp"` (see the `connections` module) the broker posts the
//! identity's `refresh_token` to the IdP's token endpoint and hands out the
//! fresh token, or says clearly that the user must reconnect
//! ([`IdpError::InvalidGrant`]).
//!
//! * `request` — one refresh-token request and how its answer is read (bodies
//!   capped at 1 MiB with `auth0::body::read_capped`).
//! * `gate` — the broker's own limits towards one IdP: rate, in flight,
//!   retries within the caller's deadline and a whole-call budget.
//! * `refresher` — [`IdpRefresher`]: kept tokens, one refresh per user and
//!   connection at a time, rotation, remembered `invalid_grant`, `forget_user`.
//!
//! Invariant: refresh tokens, access tokens and client secrets are `secrecy`
//! types from parse to send; no error message or log line holds one, nor any
//! text the IdP wrote.

mod error;
mod gate;
mod refresher;
mod request;

#[cfg(test)]
mod tests;

pub use crate::kept::TokenKey;
pub use error::{IdpError, IdpSetupError};
pub use refresher::{IdpRefresher, IdpSettings, Refreshed};
pub use request::RefreshedToken;

use secrecy::SecretString;

/// The OAuth client the broker refreshes as at one IdP: the app the Auth0
/// connection uses, since refresh tokens are bound to the client they were
/// issued to.
#[derive(Debug, Clone)]
pub struct IdpClient {
    /// The IdP's token endpoint (absolute http(s) URL, checked when the
    /// connections file is read).
    pub token_url: String,
    /// The OAuth app's client id.
    pub client_id: String,
    /// The OAuth app's client secret; `Debug` prints `[REDACTED]`.
    pub client_secret: SecretString,
}
