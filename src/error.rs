//! The broker's one error type at the gRPC boundary, and the one place where
//! errors become `tonic::Status`. Messages say what happened and what to do;
//! none carries a token or secret.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth0::Auth0Error;
use crate::id_token::IdTokenError;
use crate::logsafe::capped;
use crate::user_id::InvalidUserId;

/// Why an RPC did not release a token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The `user_id` cannot name an Auth0 user (or Auth0 refused it as one).
    #[error("{0}")]
    InvalidUserId(String),
    /// The request is not a valid message of the API (truncated protobuf,
    /// invalid UTF-8 in a string field).
    #[error(
        "the request is not a valid tokenbroker.v1.{0} message; check the client's generated code"
    )]
    MalformedRequest(&'static str),
    /// The caller's certificate names nobody, or nobody the policy lists.
    #[error("{0}")]
    CallerUnknown(String),
    /// The caller is listed, but not for this RPC or option.
    #[error("{0}")]
    RpcNotAllowed(String),
    #[error("this caller may not receive {provider:?} tokens; ask the operator to extend the broker's policy")]
    ProviderDenied { provider: String },
    #[error("this caller must send the user's ID token (id_token): the policy says require_id_token = true")]
    IdTokenRequired,
    #[error("id_token refused: {0}")]
    IdTokenRefused(IdTokenError),
    #[error("user_id names another user than the id_token's subject; send one of them, or both for the same user")]
    IdTokenSubjectMismatch,
    #[error(
        "this broker does not verify ID tokens; an operator must set AUTH0_ID_TOKEN_AUDIENCES"
    )]
    IdTokensNotConfigured,
    #[error("Auth0 has no user with this user_id")]
    UserNotFound,
    #[error("the user has no identity for {wanted}")]
    NoIdentity { wanted: String },
    /// The identity carries no token on the profile. `token_vault_hint`
    /// names its connection when Token Vault may be why: the Management
    /// token may read IdP tokens, the connection is read from the profile
    /// and its provider is one that stores tokens.
    #[error("{}", no_token_message(wanted, *scope_missing, token_vault_hint.as_deref()))]
    NoToken {
        wanted: String,
        scope_missing: bool,
        token_vault_hint: Option<String>,
    },
    /// The token is known to expire within `min_valid_for` and the broker
    /// has no way to refresh it: the user must sign in again.
    #[error("the {provider:?} token of connection {connection:?} expires too soon (within min_valid_for) and the broker cannot refresh it; the user must sign in again through that connection")]
    TokenExpired {
        provider: String,
        connection: String,
    },
    /// The IdP refused the refresh (`invalid_grant`): only the user can mend it.
    #[error("the identity provider refused to refresh the {provider:?} token of connection {connection:?}; the user must connect that account again")]
    UserMustReconnect {
        provider: String,
        connection: String,
    },
    /// Token Vault holds no usable token for the identity: none was stored
    /// (the user never connected the account, or removed it), or Auth0
    /// could not refresh it at the IdP. Only the user can mend it.
    #[error("Auth0 Token Vault holds no usable {provider:?} token for connection {connection:?} ({code}); the user must connect that account again")]
    TokenVaultEmpty {
        provider: String,
        connection: String,
        code: String,
    },
    /// Auth0 refused the broker's own Token Vault exchange, or the broker
    /// has no key to sign it with: an operator must act.
    #[error("the broker cannot get tokens of connection {connection:?} from Auth0 Token Vault ({detail}); an operator must check the broker's Auth0 application (Token Vault grant, Privileged Worker key, IP allowlist, permissions) and its key settings")]
    TokenVaultMisconfigured {
        provider: String,
        connection: String,
        detail: String,
    },
    /// The IdP's token endpoint is unreachable, failing or rate-limiting.
    #[error(
        "the identity provider of connection {connection:?} is unavailable ({reason}); retry later"
    )]
    IdpUnavailable {
        provider: String,
        connection: String,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The connections file's settings for a connection are refused by its IdP.
    #[error("the identity provider refused the broker's client for connection {connection:?} ({detail}); an operator must fix the connections file")]
    ConnectionMisconfigured { connection: String, detail: String },
    #[error("the broker's Management API token lacks a scope ({0}); grant read:users and read:user_idp_tokens to the broker's Auth0 application")]
    ManagementScopeMissing(String),
    /// Auth0 is unreachable or failing; retrying later may succeed.
    #[error("{reason}; retry later")]
    Auth0Unavailable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Auth0 answered 429 past the retry budget, or the broker's own budget
    /// for Auth0 (or this caller's share of it) is spent.
    #[error("{reason}; retry later")]
    Auth0RateLimited {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The caller has spent its share of the Auth0 budget (`--auth0-caller-share`).
    #[error("this caller has spent its share of the broker's Auth0 budget; retry later")]
    CallerShareSpent { retry_after: Duration },
    #[error("Auth0 rejected the broker's own credentials ({0}); an operator must fix AUTH0_CLIENT_ID and its secret or assertion key, or the application's grants")]
    CredentialsRejected(String),
    #[error("the caller's deadline passed before Auth0 answered")]
    DeadlineExceeded,
    #[error("the broker is shutting down; retry on another replica")]
    ShuttingDown,
    /// The audit line of a release could not be written: no token leaves
    /// without its audit line.
    #[error("the broker could not write the audit line of this release, so it released nothing; retry later")]
    AuditUnavailable,
    #[error("{0}")]
    Internal(String),
}

/// `domain` of every `google.rpc.ErrorInfo` the broker sends.
pub const ERROR_DOMAIN: &str = "tokenbroker";

fn no_token_message(wanted: &str, scope_missing: bool, token_vault_hint: Option<&str>) -> String {
    if scope_missing {
        return format!(
            "Auth0 returned no token for {wanted} because the broker's Management API token lacks read:user_idp_tokens; an operator must grant that scope"
        );
    }
    match token_vault_hint {
        Some(connection) => format!(
            "Auth0 holds no access token for {wanted} on the user's profile; if Token Vault is on for connection {:?}, Auth0 keeps its tokens there instead: an operator must set source = \"token-vault\" for it in the connections file. Otherwise the user must sign in again through that connection",
            capped(connection)
        ),
        None => format!(
            "Auth0 holds no access token for {wanted}; the user must sign in again through that connection"
        ),
    }
}

impl From<InvalidUserId> for BrokerError {
    fn from(error: InvalidUserId) -> Self {
        Self::InvalidUserId(error.to_string())
    }
}

impl From<Auth0Error> for BrokerError {
    fn from(error: Auth0Error) -> Self {
        match error {
            Auth0Error::Unreachable(_) | Auth0Error::Timeout => Self::Auth0Unavailable {
                reason: error.to_string(),
                retry_after: None,
            },
            Auth0Error::ServerError { .. } | Auth0Error::BodyTooLarge { .. } => {
                Self::Auth0Unavailable {
                    retry_after: error.retry_after(),
                    reason: error.to_string(),
                }
            }
            Auth0Error::RateLimited { .. } | Auth0Error::Throttled { .. } => {
                Self::Auth0RateLimited {
                    retry_after: error.retry_after(),
                    reason: error.to_string(),
                }
            }
            Auth0Error::ManagementTokenRejected => Self::Auth0Unavailable {
                reason: "Auth0 rejected a freshly issued Management API token".to_owned(),
                retry_after: None,
            },
            Auth0Error::CredentialsRejected { .. } => Self::CredentialsRejected(error.to_string()),
            Auth0Error::InsufficientScope { message } => Self::ManagementScopeMissing(message),
            Auth0Error::UserNotFound => Self::UserNotFound,
            Auth0Error::Unexpected {
                status: 400,
                message,
                ..
            } => Self::InvalidUserId(format!("Auth0 refused the user_id: {message:?}")),
            Auth0Error::Unexpected { .. } | Auth0Error::InvalidBody(_) | Auth0Error::Signing(_) => {
                Self::Internal(error.to_string())
            }
            // The Token Vault path names provider and connection itself
            // (`vault`); these are what a refusal says without them.
            Auth0Error::NoTokenSet { code } => Self::TokenVaultEmpty {
                provider: String::new(),
                connection: String::new(),
                code,
            },
            Auth0Error::NoSubjectKey | Auth0Error::ExchangeRefused { .. } => {
                Self::TokenVaultMisconfigured {
                    provider: String::new(),
                    connection: String::new(),
                    detail: error.to_string(),
                }
            }
        }
    }
}

impl BrokerError {
    /// The gRPC code of the README's status table.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidUserId(_) | Self::MalformedRequest(_) | Self::IdTokenSubjectMismatch => {
                Code::InvalidArgument
            }
            Self::CallerUnknown(_)
            | Self::RpcNotAllowed(_)
            | Self::ProviderDenied { .. }
            | Self::IdTokenRequired => Code::PermissionDenied,
            Self::IdTokenRefused(error) if error.is_unavailable() => Code::Unavailable,
            Self::IdTokenRefused(_) => Code::Unauthenticated,
            Self::IdTokensNotConfigured => Code::FailedPrecondition,
            Self::UserNotFound | Self::NoIdentity { .. } => Code::NotFound,
            Self::NoToken { .. }
            | Self::ManagementScopeMissing(_)
            | Self::CredentialsRejected(_)
            | Self::TokenExpired { .. }
            | Self::UserMustReconnect { .. }
            | Self::TokenVaultEmpty { .. }
            | Self::TokenVaultMisconfigured { .. }
            | Self::ConnectionMisconfigured { .. } => Code::FailedPrecondition,
            Self::IdpUnavailable { .. } => Code::Unavailable,
            Self::Auth0Unavailable { .. }
            | Self::Auth0RateLimited { .. }
            | Self::CallerShareSpent { .. }
            | Self::ShuttingDown
            | Self::AuditUnavailable => Code::Unavailable,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// The `google.rpc.ErrorInfo` reason: what a program switches on, stable
    /// across releases (the README lists them).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidUserId(_) => "INVALID_USER_ID",
            Self::MalformedRequest(_) => "MALFORMED_REQUEST",
            Self::IdTokenSubjectMismatch => "ID_TOKEN_SUBJECT_MISMATCH",
            Self::CallerUnknown(_) => "CALLER_UNKNOWN",
            Self::RpcNotAllowed(_) => "RPC_NOT_ALLOWED",
            Self::ProviderDenied { .. } => "PROVIDER_NOT_ALLOWED",
            Self::IdTokenRequired => "ID_TOKEN_REQUIRED",
            Self::IdTokenRefused(error) if error.is_unavailable() => "AUTH0_UNAVAILABLE",
            Self::IdTokenRefused(_) => "ID_TOKEN_INVALID",
            Self::UserNotFound => "USER_NOT_FOUND",
            Self::NoIdentity { .. } => "IDENTITY_NOT_LINKED",
            Self::NoToken {
                scope_missing: false,
                ..
            } => "TOKEN_NOT_STORED",
            Self::NoToken { .. }
            | Self::IdTokensNotConfigured
            | Self::ManagementScopeMissing(_)
            | Self::CredentialsRejected(_)
            | Self::TokenVaultMisconfigured { .. }
            | Self::ConnectionMisconfigured { .. } => "BROKER_MISCONFIGURED",
            Self::TokenExpired { .. } => "TOKEN_EXPIRED",
            Self::UserMustReconnect { .. } | Self::TokenVaultEmpty { .. } => "USER_MUST_RECONNECT",
            Self::IdpUnavailable { .. } => "IDP_UNAVAILABLE",
            Self::Auth0Unavailable { .. } => "AUTH0_UNAVAILABLE",
            Self::Auth0RateLimited { .. } | Self::CallerShareSpent { .. } => "AUTH0_RATE_LIMITED",
            Self::ShuttingDown => "SHUTTING_DOWN",
            Self::AuditUnavailable => "AUDIT_UNAVAILABLE",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::Internal(_) => "INTERNAL",
        }
    }

    /// Whether Auth0 itself is failing (not the caller, not the broker's
    /// settings): only then may a stale cached copy be served.
    pub fn is_auth0_failing(&self) -> bool {
        matches!(
            self,
            Self::Auth0Unavailable { .. }
                | Self::Auth0RateLimited { .. }
                | Self::CallerShareSpent { .. }
        )
    }

    /// How long the caller should wait before retrying, when known.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Auth0Unavailable { retry_after, .. }
            | Self::Auth0RateLimited { retry_after, .. } => *retry_after,
            Self::CallerShareSpent { retry_after } => Some(*retry_after),
            Self::IdpUnavailable { retry_after, .. } => *retry_after,
            Self::IdTokenRefused(error) => error.retry_after(),
            _ => None,
        }
    }

    /// ErrorInfo metadata: the provider a refusal is about, never a token,
    /// secret or user id.
    fn metadata(&self) -> HashMap<String, String> {
        // Empty values are left out: a refusal made without the identity
        // at hand (see `From<Auth0Error>`) names neither.
        let pair = |provider: &str, connection: &str| -> HashMap<String, String> {
            [("provider", provider), ("connection", connection)]
                .into_iter()
                .filter(|(_, value)| !value.is_empty())
                .map(|(key, value)| (key.to_owned(), capped(value).into_owned()))
                .collect()
        };
        match self {
            Self::ProviderDenied { provider } => {
                HashMap::from([("provider".to_owned(), capped(provider).into_owned())])
            }
            Self::TokenExpired {
                provider,
                connection,
            }
            | Self::UserMustReconnect {
                provider,
                connection,
            }
            | Self::IdpUnavailable {
                provider,
                connection,
                ..
            }
            | Self::TokenVaultEmpty {
                provider,
                connection,
                ..
            }
            | Self::TokenVaultMisconfigured {
                provider,
                connection,
                ..
            } => pair(provider, connection),
            Self::ConnectionMisconfigured { connection, .. }
            | Self::NoToken {
                token_vault_hint: Some(connection),
                ..
            } => pair("", connection),
            _ => HashMap::new(),
        }
    }

    /// Whether an operator must act (logged as an error, not a warning).
    pub fn needs_operator(&self) -> bool {
        matches!(
            self,
            Self::CredentialsRejected(_)
                | Self::ManagementScopeMissing(_)
                | Self::IdTokensNotConfigured
                | Self::ConnectionMisconfigured { .. }
                | Self::TokenVaultMisconfigured { .. }
                | Self::Internal(_)
        ) || matches!(
            self,
            Self::NoToken {
                scope_missing: true,
                ..
            }
        )
    }

    /// The status sent to the caller: its code, a message for humans, a
    /// `google.rpc.ErrorInfo` (domain `tokenbroker`, [`Self::reason`]) for
    /// programs, and a `google.rpc.RetryInfo` when the wait is known.
    pub fn to_status(&self) -> Status {
        let mut details =
            ErrorDetails::with_error_info(self.reason(), ERROR_DOMAIN, self.metadata());
        if let Some(delay) = self.retry_after() {
            details.set_retry_info(Some(delay));
        }
        Status::with_error_details(self.code(), self.to_string(), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_with_a_known_delay_carries_retry_info() {
        let status = BrokerError::from(Auth0Error::RateLimited {
            retry_after: Some(Duration::from_secs(3)),
        })
        .to_status();
        assert_eq!(status.code(), Code::Unavailable);
        let retry = status.get_details_retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(3)));
    }

    #[test]
    fn an_oversized_auth0_body_is_auth0_unavailable() {
        let error = BrokerError::from(Auth0Error::BodyTooLarge {
            endpoint: "/api/v2/users",
            limit: 1024,
        });
        assert_eq!(error.code(), Code::Unavailable);
        assert_eq!(error.reason(), "AUTH0_UNAVAILABLE");
    }

    #[test]
    fn rejected_credentials_are_a_failed_precondition_not_unauthenticated() {
        let error = BrokerError::from(Auth0Error::CredentialsRejected {
            status: 401,
            code: "access_denied".into(),
            description: "Unauthorized".into(),
        });
        assert_eq!(error.code(), Code::FailedPrecondition);
        assert!(error.needs_operator());
    }

    #[test]
    fn id_token_refusals_are_unauthenticated_unless_the_jwks_is_out_of_reach() {
        let forged = BrokerError::IdTokenRefused(IdTokenError::Signature);
        assert_eq!(forged.code(), Code::Unauthenticated);
        let unreachable = BrokerError::IdTokenRefused(IdTokenError::JwksUnavailable {
            reason: "connection refused".into(),
            retry_after: None,
        });
        assert_eq!(unreachable.code(), Code::Unavailable);
        assert_eq!(BrokerError::IdTokenRequired.code(), Code::PermissionDenied);
        assert_eq!(
            BrokerError::IdTokenSubjectMismatch.code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn missing_token_says_whether_the_scope_is_to_blame() {
        let scope = BrokerError::NoToken {
            wanted: "provider github".into(),
            scope_missing: true,
            token_vault_hint: None,
        };
        assert!(scope.to_string().contains("read:user_idp_tokens"));
        let absent = BrokerError::NoToken {
            wanted: "provider github".into(),
            scope_missing: false,
            token_vault_hint: None,
        };
        assert!(absent.to_string().contains("sign in again"));
        assert!(!absent.to_string().contains("Token Vault"));
    }

    #[test]
    fn a_missing_token_hints_at_token_vault_with_the_connection() {
        let hinted = BrokerError::NoToken {
            wanted: "the github identity".into(),
            scope_missing: false,
            token_vault_hint: Some("github".into()),
        };
        assert_eq!(hinted.reason(), "TOKEN_NOT_STORED");
        let message = hinted.to_string();
        assert!(message.contains("Token Vault"), "{message}");
        assert!(message.contains("source = \"token-vault\""), "{message}");
        let info = hinted
            .to_status()
            .get_details_error_info()
            .expect("error info");
        assert_eq!(
            info.metadata.get("connection").map(String::as_str),
            Some("github")
        );
    }

    #[test]
    fn token_vault_refusals_say_who_must_act() {
        let empty = BrokerError::TokenVaultEmpty {
            provider: "google-oauth2".into(),
            connection: "google-vault".into(),
            code: "federated_connection_refresh_token_not_found".into(),
        };
        assert_eq!(empty.reason(), "USER_MUST_RECONNECT");
        assert!(!empty.needs_operator());
        let refused = BrokerError::from(Auth0Error::ExchangeRefused {
            status: 401,
            code: "invalid_client".into(),
            description: "Invalid client assertion".into(),
        });
        assert_eq!(refused.reason(), "BROKER_MISCONFIGURED");
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert!(refused.needs_operator());
        assert!(refused.to_string().contains("invalid_client"));
        let info = refused
            .to_status()
            .get_details_error_info()
            .expect("error info");
        assert!(info.metadata.is_empty(), "no empty provider or connection");
    }
}
