//! What the broker keeps from Auth0's answers: a Management token and a user's
//! identities. Tokens are `secrecy` types so `Debug` and logs show `[REDACTED]`.
//! A refresh token is kept only for connections refreshed at the IdP.

use std::time::{Duration, Instant, SystemTime};

use secrecy::SecretString;

/// The scope without which Auth0 silently omits `identities[].access_token`.
pub const IDP_TOKENS_SCOPE: &str = "read:user_idp_tokens";

/// A Management API access token (client-credentials grant).
#[derive(Debug)]
pub struct ManagementToken {
    /// Bearer value for `/api/v2`.
    pub secret: SecretString,
    /// `expires_in` as Auth0 gave it; the cache keeps the token for less.
    pub lifetime: Duration,
    /// Granted scopes; tells a missing `read:user_idp_tokens` apart from a user without a token.
    pub scope: String,
    /// When the token was obtained, to tell how long it has left.
    pub obtained_at: Instant,
    /// Distinguishes tokens, so a 401 drops only the token that was rejected.
    pub generation: u64,
}

impl ManagementToken {
    /// Whether Auth0 will include IdP tokens in user profiles read with this token.
    pub fn can_read_idp_tokens(&self) -> bool {
        self.scope.split_whitespace().any(|s| s == IDP_TOKENS_SCOPE)
    }

    /// How long the token may be reused: its lifetime minus a safety margin of
    /// at least 60 s or 10 %, so no request leaves with a token about to expire.
    /// Very short lifetimes keep half of what they have.
    pub fn reuse_window(&self) -> Duration {
        let margin = Duration::from_secs(60).max(self.lifetime / 10);
        match self.lifetime.checked_sub(margin) {
            Some(window) if window >= self.lifetime / 2 => window,
            _ => self.lifetime / 2,
        }
    }
}

/// One linked account of a user: what the caller gets back (minus the secrets
/// it may not have).
#[derive(Debug)]
pub struct Identity {
    pub provider: String,
    pub connection: String,
    /// Always text, even when Auth0 sent a JSON number (GitHub).
    pub idp_user_id: String,
    pub access_token: Option<SecretString>,
    /// OAuth1 providers (Twitter) need it beside the token.
    pub access_token_secret: Option<SecretString>,
    /// No later than this: the user's `last_login` plus the identity's
    /// `expires_in` (an upper bound; Auth0 does not say when the IdP issued
    /// the token). `None` when either is missing.
    pub expires_at: Option<SystemTime>,
    /// Only for connections the broker refreshes at the IdP (`refresh = "idp"`).
    pub refresh_token: Option<SecretString>,
}

impl Identity {
    /// Whether the broker can hand out a token for this identity: one Auth0
    /// stored, or a refresh token to get one.
    pub fn has_token(&self) -> bool {
        self.access_token.is_some() || self.refresh_token.is_some()
    }
}

/// All identities of one user, as read from Auth0 at `fetched_at`.
#[derive(Debug)]
pub struct UserIdentities {
    pub user_id: String,
    pub identities: Vec<Identity>,
    /// Wall-clock time of the read, reported to callers as `fetched_at`.
    pub fetched_at: SystemTime,
    /// Monotonic time of the read, to tell whether an RPC got a cached copy.
    pub fetched_instant: Instant,
    /// False when the Management token lacked `read:user_idp_tokens`, so a
    /// missing token means misconfiguration rather than "no token".
    pub idp_tokens_readable: bool,
}

impl UserIdentities {
    /// The earliest token expiry still ahead, which bounds how long the entry
    /// may be cached (when it passes, the user may have signed in again and
    /// Auth0 hold a new token). Expiries already past are ignored: reading
    /// the profile again will not revive such a token, and the service
    /// refreshes or refuses it on every release ([`Identity::expires_at`]).
    /// Whether a token of the user is known to have expired already: such a
    /// profile is not served as a stale-if-error copy (Auth0 may hold a
    /// newer token the broker cannot read now).
    pub fn has_expired_token(&self) -> bool {
        let now = SystemTime::now();
        self.identities
            .iter()
            .filter(|identity| identity.access_token.is_some())
            .filter_map(|identity| identity.expires_at)
            .any(|expiry| expiry <= now)
    }

    pub fn earliest_token_expiry(&self) -> Option<SystemTime> {
        let now = SystemTime::now();
        self.identities
            .iter()
            .filter(|identity| identity.access_token.is_some())
            .filter_map(|identity| identity.expires_at)
            .filter(|expiry| *expiry > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(lifetime_secs: u64, scope: &str) -> ManagementToken {
        ManagementToken {
            secret: SecretString::from("t"),
            lifetime: Duration::from_secs(lifetime_secs),
            scope: scope.to_owned(),
            obtained_at: Instant::now(),
            generation: 1,
        }
    }

    #[test]
    fn reuse_window_keeps_a_margin_of_sixty_seconds_or_ten_percent() {
        assert_eq!(
            token(86_400, "").reuse_window(),
            Duration::from_secs(77_760)
        );
        assert_eq!(token(300, "").reuse_window(), Duration::from_secs(240));
        assert_eq!(token(60, "").reuse_window(), Duration::from_secs(30));
    }

    #[test]
    fn idp_scope_is_detected_among_others() {
        assert!(token(1, "read:users read:user_idp_tokens").can_read_idp_tokens());
        assert!(!token(1, "read:users").can_read_idp_tokens());
    }

    #[test]
    fn debug_of_a_token_redacts_the_secret() {
        let shown = format!("{:?}", token(1, "read:users"));
        assert!(!shown.contains("\"t\""), "{shown}");
        assert!(shown.contains("REDACTED"), "{shown}");
    }
}
