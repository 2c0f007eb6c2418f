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

/// The identity the selector means, preferring one that has a token.
/// `allowed` says which providers the caller may receive: "the first with a
/// token" skips the others, an explicit choice of one is PERMISSION_DENIED.
pub fn select<'a>(
    user: &'a UserIdentities,
    selector: &Selector<'_>,
    allowed: &dyn Fn(&str) -> bool,
) -> Result<&'a Identity, BrokerError> {
    // Iterators, not collected Vecs: this runs on every GetIdpToken, and
    // users have a handful of identities, so walking them twice is cheaper
    // than allocating.
    let candidates = || user.identities.iter().filter(|i| selector.matches(i));
    let with_token = || candidates().filter(|i| i.has_token());
    let Some(first) = candidates().next() else {
        return Err(BrokerError::NoIdentity {
            wanted: selector.describe(),
        });
    };
    let no_token = |wanted: String| BrokerError::NoToken {
        wanted,
        scope_missing: !user.idp_tokens_readable,
    };
    if *selector == Selector::FirstWithToken {
        if let Some(identity) = with_token().find(|i| allowed(&i.provider)) {
            return Ok(identity);
        }
        return match with_token().next() {
            Some(denied) => Err(BrokerError::ProviderDenied {
                provider: denied.provider.clone(),
            }),
            None => Err(no_token(selector.describe())),
        };
    }
    let chosen = with_token().next().unwrap_or(first);
    if !allowed(&chosen.provider) {
        return Err(BrokerError::ProviderDenied {
            provider: chosen.provider.clone(),
        });
    }
    if !chosen.has_token() {
        return Err(no_token(format!("the {} identity", chosen.provider)));
    }
    Ok(chosen)
}

/// Every identity that has a token (or a refresh token to get one), in Auth0's order.
pub fn with_tokens(user: &UserIdentities) -> impl Iterator<Item = &Identity> {
    user.identities
        .iter()
        .filter(|identity| identity.has_token())
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
        select(user, selector, &|_| true)
    }

    #[test]
    fn first_with_token_skips_providers_the_caller_may_not_have() {
        let u = linked();
        let chosen = select(&u, &Selector::FirstWithToken, &|p| p == "oauth2").unwrap();
        assert_eq!(chosen.provider, "oauth2");
        assert!(matches!(
            select(&u, &Selector::FirstWithToken, &|_| false),
            Err(BrokerError::ProviderDenied { .. })
        ));
    }

    #[test]
    fn connection_of_a_denied_provider_is_permission_denied() {
        let u = linked();
        assert!(matches!(
            select(&u, &Selector::from_request("", "corp-sso"), &|p| p == "github"),
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
}
