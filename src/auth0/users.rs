//! `GET /api/v2/users/{id}`: one user's identities, read with a Management
//! token. The wire types here are the only place Auth0's user JSON is parsed;
//! `refresh_token` is deliberately absent from them.

use std::time::{Duration, Instant, SystemTime};

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::time::Instant as Deadline;

use super::send::common_error;
use super::{Auth0Client, Auth0Error, ErrorBody, Identity, ManagementToken, UserIdentities};
use crate::user_id::UserId;

/// Endpoint name for errors and metric labels.
const USERS_ENDPOINT: &str = "/api/v2/users";

/// Everything but RFC 3986 unreserved characters is encoded, so a user id is
/// always exactly one path segment (`/` becomes `%2F`, `|` becomes `%7C`).
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Only the fields the broker needs; Auth0 returns less data and less PII.
const USER_FIELDS_QUERY: &str = "fields=user_id%2Cidentities&include_fields=true";

#[derive(Deserialize)]
pub(super) struct UserBody {
    #[serde(default)]
    identities: Vec<IdentityBody>,
}

/// An identity as Auth0 sends it. `refresh_token` is deliberately absent.
#[derive(Deserialize)]
struct IdentityBody {
    provider: String,
    #[serde(default)]
    connection: String,
    user_id: IdpUserIdBody,
    #[serde(default)]
    access_token: Option<SecretString>,
    #[serde(default)]
    access_token_secret: Option<SecretString>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// `identities[].user_id` is a string for most providers and a number for GitHub.
#[derive(Deserialize)]
#[serde(untagged)]
enum IdpUserIdBody {
    Text(String),
    Number(serde_json::Number),
}

impl IdpUserIdBody {
    fn into_text(self) -> String {
        match self {
            Self::Text(text) => text,
            Self::Number(number) => number.to_string(),
        }
    }
}

impl Auth0Client {
    /// `GET /api/v2/users/{id}` with `token` and the id encoded as one path
    /// segment; retried within `deadline`.
    pub(super) async fn fetch_user(
        &self,
        token: &ManagementToken,
        user_id: &UserId,
        deadline: Option<Deadline>,
    ) -> Result<UserIdentities, Auth0Error> {
        let url = self.user_url(user_id);
        let user: UserBody = self
            .call_json(
                USERS_ENDPOINT,
                deadline,
                || {
                    self.http
                        .get(&url)
                        .bearer_auth(token.secret.expose_secret())
                },
                users_endpoint_error,
            )
            .await?;
        Ok(into_user_identities(
            user_id,
            user,
            token.can_read_idp_tokens(),
        ))
    }

    pub(super) fn user_url(&self, user_id: &UserId) -> String {
        let segment = utf8_percent_encode(user_id.as_str(), PATH_SEGMENT);
        format!(
            "{}{USERS_ENDPOINT}/{segment}?{USER_FIELDS_QUERY}",
            self.settings.base_url
        )
    }
}

pub(super) fn into_user_identities(
    user_id: &UserId,
    user: UserBody,
    readable: bool,
) -> UserIdentities {
    let fetched_at = SystemTime::now();
    let identities = user
        .identities
        .into_iter()
        .map(|identity| Identity {
            provider: identity.provider,
            connection: identity.connection,
            idp_user_id: identity.user_id.into_text(),
            expires_at: identity
                .expires_in
                .map(|seconds| fetched_at + Duration::from_secs(seconds)),
            access_token: identity.access_token,
            access_token_secret: identity.access_token_secret,
        })
        .collect();
    let mut identities: Vec<Identity> = identities;
    // serde's growth leaves spare capacity; the entry lives for minutes in a cache of 100 000.
    identities.shrink_to_fit();
    UserIdentities {
        user_id: user_id.as_str().to_owned(),
        identities,
        fetched_at,
        fetched_instant: Instant::now(),
        idp_tokens_readable: readable,
    }
}

/// 401 is the token's fault (the session drops it and reads again), 403 a
/// missing scope, 404 no such user; the rest as on any endpoint.
pub(super) fn users_endpoint_error(
    status: StatusCode,
    headers: &HeaderMap,
    bytes: &[u8],
) -> Auth0Error {
    let body = ErrorBody::parse(bytes);
    match status.as_u16() {
        401 => Auth0Error::ManagementTokenRejected,
        403 => Auth0Error::InsufficientScope {
            message: body.description(),
        },
        404 => Auth0Error::UserNotFound,
        _ => common_error(status, headers, body),
    }
}
