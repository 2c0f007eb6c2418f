//! Which of a user's identities a request means. Pure functions: no IO, no
//! policy, so the rules are easy to test and to read.

use crate::auth0::{Identity, UserIdentities};
use crate::error::BrokerError;
use crate::logsafe::capped;

/// What the caller asked for, from `provider` and `connection` of the request.
/// It borrows them from the request: choosing copies no strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector<'a> {
    /// An identity of this provider (and connection, when given).
    Provider {
        provider: &'a str,
        connection: Option<&'a str>,
    },
    /// An identity of this connection, any provider.
    Connection(&'a str),
    /// The first identity that has a token.
    FirstWithToken,
}

impl<'a> Selector<'a> {
    /// Provider wins over connection; both empty means "the first with a token".
    pub fn from_request(provider: &'a str, connection: &'a str) -> Self {
        let connection = (!connection.is_empty()).then_some(connection);
        match (provider.is_empty(), connection) {
            (false, connection) => Self::Provider {
                provider,
                connection,
            },
            (true, Some(connection)) => Self::Connection(connection),
            (true, None) => Self::FirstWithToken,
        }
    }

    fn matches(&self, identity: &Identity) -> bool {
        match self {
            Self::Provider {
                provider,
                connection,
            } => {
                identity.provider == *provider
                    && connection.is_none_or(|c| identity.connection == c)
            }
            Self::Connection(connection) => identity.connection == *connection,
            Self::FirstWithToken => true,
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Provider {
                provider,
                connection: None,
            } => format!("provider {:?}", capped(provider)),
            Self::Provider {
                provider,
                connection: Some(connection),
            } => format!(
                "provider {:?} and connection {:?}",
                capped(provider),
                capped(connection)
            ),
            Self::Connection(connection) => format!("connection {:?}", capped(connection)),
            Self::FirstWithToken => "any of the user's identities".to_owned(),
        }
    }
}

/// What selection needs beyond the profile: which providers the caller may
/// have, and which connections Token Vault serves.
#[derive(Clone, Copy)]
pub struct Rules<'a> {
    /// Whether the caller may receive tokens of this provider.
    pub allowed: &'a (dyn Fn(&str) -> bool + Sync),
    /// Whether this connection's tokens come from Token Vault: Auth0 puts
    /// none on the profile, yet the broker can get one.
    pub from_token_vault: &'a (dyn Fn(&str) -> bool + Sync),
}

impl Rules<'_> {
    /// Whether the broker can hand out a token for `identity`: one on the
    /// profile, a refresh token to get one, or Token Vault.
    pub fn has_token(&self, identity: &Identity) -> bool {
        identity.has_token() || (self.from_token_vault)(&identity.connection)
    }
}

/// Providers whose identities never carry an IdP token (database,
/// passwordless, SAML): a missing token there says nothing of Token Vault.
const TOKENLESS_PROVIDERS: [&str; 4] = ["auth0", "email", "sms", "samlp"];

/// TOKEN_NOT_STORED (or BROKER_MISCONFIGURED when the Management token
/// cannot read IdP tokens) for `identity`, which has no token. When the
/// token could have been read and the provider stores tokens, the refusal
/// names the connection as one Token Vault may have taken over: Auth0 then
/// stops putting its tokens on the profile, without telling anyone.
pub fn missing_token(identity: &Identity, user: &UserIdentities) -> BrokerError {
    let hint =
        user.idp_tokens_readable && !TOKENLESS_PROVIDERS.contains(&identity.provider.as_str());
    BrokerError::NoToken {
        wanted: format!("the {} identity", capped(&identity.provider)),
        scope_missing: !user.idp_tokens_readable,
        token_vault_hint: hint.then(|| identity.connection.clone()),
    }
}

/// The identity the selector means, preferring one that has a token.
/// `rules.allowed` says which providers the caller may receive: "the first
/// with a token" skips the others, an explicit choice of one is
/// PERMISSION_DENIED.
pub fn select<'a>(
    user: &'a UserIdentities,
    selector: &Selector<'_>,
    rules: &Rules<'_>,
) -> Result<&'a Identity, BrokerError> {
    // Iterators, not collected Vecs: this runs on every GetIdpToken, and
    // users have a handful of identities, so walking them twice is cheaper
    // than allocating.
    let candidates = || user.identities.iter().filter(|i| selector.matches(i));
    let with_token = || candidates().filter(|i| rules.has_token(i));
    let Some(first) = candidates().next() else {
        return Err(BrokerError::NoIdentity {
            wanted: selector.describe(),
        });
    };
    if *selector == Selector::FirstWithToken {
        if let Some(identity) = with_token().find(|i| (rules.allowed)(&i.provider)) {
            return Ok(identity);
        }
        return match with_token().next() {
            Some(denied) => Err(BrokerError::ProviderDenied {
                provider: denied.provider.clone(),
            }),
            None => Err(BrokerError::NoToken {
                wanted: selector.describe(),
                scope_missing: !user.idp_tokens_readable,
                token_vault_hint: None,
            }),
        };
    }
    let chosen = with_token().next().unwrap_or(first);
    if !(rules.allowed)(&chosen.provider) {
        return Err(BrokerError::ProviderDenied {
            provider: chosen.provider.clone(),
        });
    }
    if !rules.has_token(chosen) {
        return Err(missing_token(chosen, user));
    }
    Ok(chosen)
}

/// Every identity that has a token (or a refresh token to get one, or Token
/// Vault), in Auth0's order.
pub fn with_tokens<'a>(
    user: &'a UserIdentities,
    rules: &'a Rules<'a>,
) -> impl Iterator<Item = &'a Identity> + 'a {
    user.identities
        .iter()
        .filter(move |identity| rules.has_token(identity))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;
    use std::time::{Instant, SystemTime};

    fn identity(provider: &str, connection: &str, token: bool) -> Identity {
        Identity {
            provider: provider.into(),
            connection: connection.into(),
            idp_user_id: "1".into(),
            access_token: token.then(|| SecretString::from("t")),
            access_token_secret: None,
            expires_at: None,
            refresh_token: None,
        }
    }

    fn user(identities: Vec<Identity>) -> UserIdentities {
        UserIdentities {
            user_id: "u".into(),
            identities,
            fetched_at: SystemTime::now(),
            fetched_instant: Instant::now(),
            idp_tokens_readable: true,
        }
    }

    fn select_any<'a>(
        user: &'a UserIdentities,
        selector: &Selector<'_>,
    ) -> Result<&'a Identity, BrokerError> {
        select(user, selector, &rules(&|_| true))
    }

    fn rules<'a>(allowed: &'a (dyn Fn(&str) -> bool + Sync)) -> Rules<'a> {
        Rules {
            allowed,
            from_token_vault: &|_| false,
        }
    }

    #[test]
    fn first_with_token_skips_providers_the_caller_may_not_have() {
        let u = linked();
        let chosen = select(&u, &Selector::FirstWithToken, &rules(&|p| p == "oauth2")).unwrap();
        assert_eq!(chosen.provider, "oauth2");
        assert!(matches!(
            select(&u, &Selector::FirstWithToken, &rules(&|_| false)),
            Err(BrokerError::ProviderDenied { .. })
        ));
    }

    #[test]
    fn connection_of_a_denied_provider_is_permission_denied() {
        let u = linked();
        assert!(matches!(
            select(
                &u,
                &Selector::from_request("", "corp-sso"),
                &rules(&|p| p == "github")
            ),
            Err(BrokerError::ProviderDenied { provider }) if provider == "oauth2"
        ));
    }

    fn linked() -> UserIdentities {
        user(vec![
            identity("auth0", "Username-Password-Authentication", false),
            identity("github", "github", true),
            identity("oauth2", "corp-sso", true),
        ])
    }

    #[test]
    fn provider_picks_its_identity() {
        let u = linked();
        let chosen = select_any(&u, &Selector::from_request("oauth2", "")).unwrap();
        assert_eq!(chosen.connection, "corp-sso");
    }

    #[test]
    fn connection_is_used_when_provider_is_empty() {
        let u = linked();
        let chosen = select_any(&u, &Selector::from_request("", "github")).unwrap();
        assert_eq!(chosen.provider, "github");
    }

    #[test]
    fn neither_means_the_first_identity_with_a_token() {
        let u = linked();
        let chosen = select_any(&u, &Selector::from_request("", "")).unwrap();
        assert_eq!(chosen.provider, "github");
    }

    #[test]
    fn unknown_provider_is_no_identity_and_tokenless_identity_is_no_token() {
        let u = linked();
        assert!(matches!(
            select_any(&u, &Selector::from_request("twitter", "")),
            Err(BrokerError::NoIdentity { .. })
        ));
        assert!(matches!(
            select_any(&u, &Selector::from_request("auth0", "")),
            Err(BrokerError::NoToken {
                scope_missing: false,
                ..
            })
        ));
    }

    #[test]
    fn provider_and_connection_must_both_match() {
        let u = linked();
        assert!(matches!(
            select_any(&u, &Selector::from_request("github", "corp-sso")),
            Err(BrokerError::NoIdentity { .. })
        ));
    }

    #[test]
    fn a_token_vault_identity_counts_as_having_a_token() {
        let u = user(vec![
            identity("auth0", "Username-Password-Authentication", false),
            identity("google-oauth2", "google-vault", false),
        ]);
        let vault = Rules {
            allowed: &|_| true,
            from_token_vault: &|connection| connection == "google-vault",
        };
        let chosen = select(&u, &Selector::FirstWithToken, &vault).unwrap();
        assert_eq!(chosen.connection, "google-vault");
        assert_eq!(with_tokens(&u, &vault).count(), 1);
        assert!(matches!(
            select_any(&u, &Selector::FirstWithToken),
            Err(BrokerError::NoToken { .. })
        ));
    }

    #[test]
    fn a_missing_token_hints_at_token_vault_only_where_it_may_be_why() {
        let u = user(vec![
            identity("auth0", "Username-Password-Authentication", false),
            identity("github", "github", false),
        ]);
        let hint = |provider: &str| match select_any(&u, &Selector::from_request(provider, "")) {
            Err(BrokerError::NoToken {
                token_vault_hint, ..
            }) => token_vault_hint,
            other => panic!("{other:?}"),
        };
        assert_eq!(hint("github").as_deref(), Some("github"));
        assert_eq!(
            hint("auth0"),
            None,
            "database identities never carry tokens"
        );
        let unreadable = UserIdentities {
            idp_tokens_readable: false,
            ..user(vec![identity("github", "github", false)])
        };
        assert!(matches!(
            select_any(&unreadable, &Selector::from_request("github", "")),
            Err(BrokerError::NoToken {
                scope_missing: true,
                token_vault_hint: None,
                ..
            })
        ));
    }
}
