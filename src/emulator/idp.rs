//! The emulated Google token endpoint's memory: which refresh tokens it honours, whether it
//! rotates them, and how long the access tokens it issues live. Held in the emulator's one
//! state mutex (see `state`), never across an `.await`.

use std::collections::HashMap;

use super::seed;
use super::state::random_token;

/// What the IdP knows of one refresh token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RefreshToken {
    /// Refreshes.
    Active,
    /// Revoked by the user or the IdP: `invalid_grant`.
    Revoked,
    /// Replaced by a rotated one: `invalid_grant`, as a rotating IdP answers an old token.
    RotatedAway,
}

/// A refresh grant the IdP made, as its token endpoint reports it.
pub(crate) struct IdpGrant {
    pub access_token: String,
    pub expires_in: u64,
    pub scope: &'static str,
    /// The refresh token that replaces the one presented, when rotation is on.
    pub refresh_token: Option<String>,
}

/// The token endpoint's state.
pub(crate) struct IdpState {
    refresh_tokens: HashMap<String, RefreshToken>,
    rotation: bool,
    expires_in: u64,
}

impl IdpState {
    /// Honours the seeded users' refresh tokens, except the revoked one; no rotation;
    /// Google's lifetime of 3599 s.
    pub(crate) fn seeded() -> Self {
        let mut refresh_tokens: HashMap<String, RefreshToken> = seed::idp_refresh_tokens()
            .into_iter()
            .map(|token| (token.to_owned(), RefreshToken::Active))
            .collect();
        for token in seed::revoked_idp_refresh_tokens() {
            refresh_tokens.insert(token.to_owned(), RefreshToken::Revoked);
        }
        Self {
            refresh_tokens,
            rotation: false,
            expires_in: seed::GOOGLE_EXPIRES_IN,
        }
    }

    /// A new access token for an active `refresh_token` (and its successor when rotating),
    /// or `None`: the IdP answers `invalid_grant`.
    pub(crate) fn refresh(&mut self, refresh_token: &str) -> Option<IdpGrant> {
        if self.refresh_tokens.get(refresh_token) != Some(&RefreshToken::Active) {
            return None;
        }
        let rotated = self.rotation.then(|| self.rotate(refresh_token));
        Some(IdpGrant {
            access_token: random_token("ya29.emu_"),
            expires_in: self.expires_in,
            scope: seed::IDP_SCOPE,
            refresh_token: rotated,
        })
    }

    /// Retires `refresh_token` and returns the active one that replaces it.
    fn rotate(&mut self, refresh_token: &str) -> String {
        let successor = random_token("1//emu_rotated_");
        self.refresh_tokens
            .insert(refresh_token.to_owned(), RefreshToken::RotatedAway);
        self.refresh_tokens
            .insert(successor.clone(), RefreshToken::Active);
        successor
    }

    pub(crate) fn honour(&mut self, refresh_token: &str) {
        self.refresh_tokens
            .insert(refresh_token.to_owned(), RefreshToken::Active);
    }

    pub(crate) fn revoke(&mut self, refresh_token: &str) {
        self.refresh_tokens
            .insert(refresh_token.to_owned(), RefreshToken::Revoked);
    }

    pub(crate) fn set_rotation(&mut self, on: bool) {
        self.rotation = on;
    }

    pub(crate) fn set_expires_in(&mut self, seconds: u64) {
        self.expires_in = seconds;
    }
}
