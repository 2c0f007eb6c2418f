//! The emulated Token Vault: one token set per user and connection, as Auth0 keeps it
//! once Token Vault is on for a connection. An exchange hands out the set's access token
//! while it lives (with the seconds it has left), refreshes it at the "IdP" once it has
//! expired, and refuses as Auth0 does when there is no set
//! (`federated_connection_refresh_token_not_found`) or its refresh fails
//! (`federated_connection_refresh_token_flow_failed`). Held in the emulator's one state
//! mutex (see `state`), never across an `.await`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::seed;
use super::state::random_token;

/// Whose token set: (user id, connection).
type SetKey = (String, String);

/// One stored token set.
struct TokenSet {
    access_token: String,
    expires_at: Instant,
    scope: &'static str,
}

/// What an exchange hands out.
pub(crate) struct VaultGrant {
    pub access_token: String,
    /// Seconds the token has left, as Auth0 reports it.
    pub expires_in: u64,
    pub scope: &'static str,
}

/// Why an exchange found no usable token: the `error` code Auth0 answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VaultRefusal {
    /// No token set for the user and connection.
    NotFound,
    /// The set's token expired and its refresh at the IdP failed.
    RefreshFailed,
}

impl VaultRefusal {
    pub(crate) fn code(self) -> &'static str {
        match self {
            Self::NotFound => "federated_connection_refresh_token_not_found",
            Self::RefreshFailed => "federated_connection_refresh_token_flow_failed",
        }
    }
}

/// The vault's state.
pub(crate) struct VaultState {
    sets: HashMap<SetKey, TokenSet>,
    /// Sets whose refresh at the IdP fails.
    refresh_fails: HashSet<SetKey>,
    /// Lifetime of the tokens a refresh (or [`VaultState::put`]) issues.
    expires_in: u64,
}

impl VaultState {
    /// The seeded set of [`seed::VAULT_USER`], its planted token fresh for
    /// [`seed::GOOGLE_EXPIRES_IN`] seconds.
    pub(crate) fn seeded() -> Self {
        let mut state = Self {
            sets: HashMap::new(),
            refresh_fails: HashSet::new(),
            expires_in: seed::GOOGLE_EXPIRES_IN,
        };
        state.store(
            seed::VAULT_USER,
            seed::TOKEN_VAULT_CONNECTION,
            seed::VAULT_ACCESS_TOKEN.to_owned(),
            Duration::from_secs(seed::GOOGLE_EXPIRES_IN),
        );
        state
    }

    /// The set's token, refreshed first when it has expired.
    pub(crate) fn exchange(
        &mut self,
        user_id: &str,
        connection: &str,
    ) -> Result<VaultGrant, VaultRefusal> {
        let key = (user_id.to_owned(), connection.to_owned());
        let now = Instant::now();
        let expired = match self.sets.get(&key) {
            None => return Err(VaultRefusal::NotFound),
            Some(set) => set.expires_at <= now,
        };
        if expired {
            if self.refresh_fails.contains(&key) {
                return Err(VaultRefusal::RefreshFailed);
            }
            let lifetime = Duration::from_secs(self.expires_in);
            self.store(
                user_id,
                connection,
                random_token("ya29.emu_vault_"),
                lifetime,
            );
        }
        let set = self.sets.get(&key).ok_or(VaultRefusal::NotFound)?;
        Ok(VaultGrant {
            access_token: set.access_token.clone(),
            expires_in: set.expires_at.saturating_duration_since(now).as_secs(),
            scope: set.scope,
        })
    }

    /// Stores a new token set for the user and connection, with a new access token that
    /// lives `expires_in` seconds; returns the token.
    pub(crate) fn put(&mut self, user_id: &str, connection: &str, expires_in: u64) -> String {
        let token = random_token("ya29.emu_vault_");
        let lifetime = Duration::from_secs(expires_in);
        self.store(user_id, connection, token.clone(), lifetime);
        token
    }

    /// Deletes the set: the user never connected the account, or removed it.
    pub(crate) fn remove(&mut self, user_id: &str, connection: &str) {
        self.sets
            .remove(&(user_id.to_owned(), connection.to_owned()));
    }

    /// Makes the set's token expired, so the next exchange refreshes it.
    pub(crate) fn expire(&mut self, user_id: &str, connection: &str) {
        if let Some(set) = self
            .sets
            .get_mut(&(user_id.to_owned(), connection.to_owned()))
        {
            set.expires_at = Instant::now();
        }
    }

    /// Makes refreshes of the set fail (or work again).
    pub(crate) fn set_refresh_fails(&mut self, user_id: &str, connection: &str, fails: bool) {
        let key = (user_id.to_owned(), connection.to_owned());
        if fails {
            self.refresh_fails.insert(key);
        } else {
            self.refresh_fails.remove(&key);
        }
    }

    pub(crate) fn set_expires_in(&mut self, seconds: u64) {
        self.expires_in = seconds;
    }

    fn store(&mut self, user_id: &str, connection: &str, token: String, lifetime: Duration) {
        let set = TokenSet {
            access_token: token,
            expires_at: Instant::now() + lifetime,
            scope: seed::IDP_SCOPE,
        };
        self.sets
            .insert((user_id.to_owned(), connection.to_owned()), set);
    }
}
