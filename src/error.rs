//! The broker's one error type at the gRPC boundary, and the one place where
//! errors become `tonic::Status`. Messages say what happened and what to do;
//! none carries a token or secret.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth0::Auth0Error;
use crate::id_token::IdTokenError;
use crate::user_id::InvalidUserId;

/// Why an RPC did not release a token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    PermissionDenied(String),
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
    #[error("{}", no_token_message(wanted, *scope_missing))]
    NoToken { wanted: String, scope_missing: bool },
    #[error("the broker's Management API token lacks a scope ({0}); grant read:users and read:user_idp_tokens to the broker's Auth0 application")]
    ManagementScopeMissing(String),
    #[error("{reason}; retry later")]
    Unavailable {
        reason: String,
        retry_after: Option<Duration>,
    },
    #[error("Auth0 rejected the broker's own credentials ({0}); an operator must fix AUTH0_CLIENT_ID/SECRET or the application's grants")]
    CredentialsRejected(String),
    #[error("the caller's deadline passed before Auth0 answered")]
    DeadlineExceeded,
    #[error("the broker is shutting down; retry on another replica")]
    ShuttingDown,
    #[error("{0}")]
    Internal(String),
}

fn no_token_message(wanted: &str, scope_missing: bool) -> String {
    if scope_missing {
        format!(
            "Auth0 returned no token for {wanted} because the broker's Management API token lacks read:user_idp_tokens; an operator must grant that scope"
        )
    } else {
        format!(
            "Auth0 holds no access token for {wanted}; the user must sign in again through that connection"
        )
    }
}

impl From<InvalidUserId> for BrokerError {
    fn from(error: InvalidUserId) -> Self {
        Self::InvalidArgument(error.to_string())
    }
}

impl From<Auth0Error> for BrokerError {
    fn from(error: Auth0Error) -> Self {
        match error {
            Auth0Error::Unreachable(_) | Auth0Error::Timeout => Self::Unavailable {
                reason: error.to_string(),
                retry_after: None,
            },
            Auth0Error::RateLimited { .. }
            | Auth0Error::ServerError { .. }
            | Auth0Error::Throttled { .. }
            | Auth0Error::BodyTooLarge { .. } => Self::Unavailable {
                retry_after: error.retry_after(),
                reason: error.to_string(),
            },
            Auth0Error::ManagementTokenRejected => Self::Unavailable {
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
            } => Self::InvalidArgument(format!("Auth0 refused the user_id: {message}")),
            Auth0Error::Unexpected { .. } | Auth0Error::InvalidBody(_) => {
                Self::Internal(error.to_string())
            }
        }
    }
}

impl BrokerError {
    /// The gRPC code of DESIGN.md's status table.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) | Self::IdTokenSubjectMismatch => Code::InvalidArgument,
            Self::PermissionDenied(_) | Self::ProviderDenied { .. } | Self::IdTokenRequired => {
                Code::PermissionDenied
            }
            Self::IdTokenRefused(error) if error.is_unavailable() => Code::Unavailable,
            Self::IdTokenRefused(_) => Code::Unauthenticated,
            Self::IdTokensNotConfigured => Code::FailedPrecondition,
            Self::UserNotFound | Self::NoIdentity { .. } => Code::NotFound,
            Self::NoToken { .. }
            | Self::ManagementScopeMissing(_)
            | Self::CredentialsRejected(_) => Code::FailedPrecondition,
            Self::Unavailable { .. } | Self::ShuttingDown => Code::Unavailable,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// Whether an operator must act (logged as an error, not a warning).
    pub fn needs_operator(&self) -> bool {
        matches!(
            self,
            Self::CredentialsRejected(_)
                | Self::ManagementScopeMissing(_)
                | Self::IdTokensNotConfigured
                | Self::Internal(_)
        ) || matches!(
            self,
            Self::NoToken {
                scope_missing: true,
                ..
            }
        )
    }

    /// The status sent to the caller; UNAVAILABLE carries a `google.rpc.RetryInfo`
    /// when Auth0 said how long to wait, or the ID-token verifier knows when to retry.
    pub fn to_status(&self) -> Status {
        let message = self.to_string();
        match self {
            Self::Unavailable {
                retry_after: Some(delay),
                ..
            } => Status::with_error_details(
                Code::Unavailable,
                message,
                ErrorDetails::with_retry_info(Some(*delay)),
            ),
            Self::IdTokenRefused(error) => match error.retry_after() {
                Some(delay) => Status::with_error_details(
                    self.code(),
                    message,
                    ErrorDetails::with_retry_info(Some(delay)),
                ),
                None => Status::new(self.code(), message),
            },
            _ => Status::new(self.code(), message),
        }
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
        };
        assert!(scope.to_string().contains("read:user_idp_tokens"));
        let absent = BrokerError::NoToken {
            wanted: "provider github".into(),
            scope_missing: false,
        };
        assert!(absent.to_string().contains("sign in again"));
    }
}
