//! Users the emulator starts with, and the fixed IdP tokens planted on them.
//!
//! The tokens are constants so that tests can assert on them and `tokenbroker dev` can show
//! them; [`planted_secrets`] lists every one of them so tests can prove no log line leaks any.
//! The users cover the shapes the broker must handle: a numeric GitHub `user_id`, a Google
//! identity with `expires_in` and `refresh_token`, an OAuth1 Twitter identity with a token
//! secret, a database user without any IdP token, a user with several linked identities, and a
//! user id that needs percent-encoding (`/`, space, `@`).

use serde_json::{json, Value};

/// Default `aud` of the ID tokens the emulator issues. It stands for the client id of the
/// single-page app users log in to; a broker that binds releases to ID tokens must accept it.
pub const DEFAULT_ID_TOKEN_AUDIENCE: &str = "tokenbroker-dev-spa";

/// A GitHub user; its identity carries a JSON *number* as `user_id`, like the real API.
pub const GITHUB_USER: &str = "github|1234567";
/// Numeric GitHub id of [`GITHUB_USER`] as Auth0 stores it in `identities[].user_id`.
pub const GITHUB_IDP_USER_ID: u64 = 1_234_567;
/// GitHub access token planted on [`GITHUB_USER`].
pub const GITHUB_ACCESS_TOKEN: &str = "gho_emulated_github_token_1234567";

/// A Google user whose identity has an expiry and a refresh token.
pub const GOOGLE_USER: &str = "google-oauth2|108000000000000000001";
/// Google access token planted on [`GOOGLE_USER`].
pub const GOOGLE_ACCESS_TOKEN: &str = "ya29.emulated_google_access_token_0001";
/// Google refresh token planted on [`GOOGLE_USER`]; the broker must never return it.
pub const GOOGLE_REFRESH_TOKEN: &str = "1//emulated_google_refresh_token_0001";
/// `expires_in` (seconds) of the Google identities.
pub const GOOGLE_EXPIRES_IN: u64 = 3599;

/// A Twitter (OAuth1) user: its identity has both a token and a token secret.
pub const TWITTER_USER: &str = "twitter|778899";
/// Twitter access token planted on [`TWITTER_USER`].
pub const TWITTER_ACCESS_TOKEN: &str = "778899-emulatedTwitterAccessToken";
/// Twitter access token secret planted on [`TWITTER_USER`].
pub const TWITTER_ACCESS_TOKEN_SECRET: &str = "emulatedTwitterAccessTokenSecret778899";

/// A database (username/password) user: it has no IdP token at all.
pub const DATABASE_USER: &str = "auth0|5f7c8ec7c33c6c004bbafe82";

/// A user with linked accounts: auth0 primary, GitHub, Google and a custom OAuth2 connection.
pub const LINKED_USER: &str = "auth0|linked0001";
/// Numeric GitHub id of the GitHub identity linked to [`LINKED_USER`].
pub const LINKED_GITHUB_IDP_USER_ID: u64 = 7_654_321;
/// GitHub access token of [`LINKED_USER`].
pub const LINKED_GITHUB_ACCESS_TOKEN: &str = "gho_emulated_linked_github_token_7654321";
/// Google access token of [`LINKED_USER`].
pub const LINKED_GOOGLE_ACCESS_TOKEN: &str = "ya29.emulated_linked_google_access_token";
/// Google refresh token of [`LINKED_USER`]; the broker must never return it.
pub const LINKED_GOOGLE_REFRESH_TOKEN: &str = "1//emulated_linked_google_refresh_token";
/// Name of the custom OAuth2 connection used by [`LINKED_USER`] and [`ODD_ID_USER`].
pub const CORP_SSO_CONNECTION: &str = "corp-sso";
/// Access token of the `corp-sso` identity of [`LINKED_USER`].
pub const LINKED_CORP_ACCESS_TOKEN: &str = "corp_emulated_linked_access_token_0001";

/// A user id containing `/`, a space and `@`: it only works when percent-encoded as one segment.
pub const ODD_ID_USER: &str = "oauth2|corp-sso|team/ops lead@example.com";
/// Access token of the `corp-sso` identity of [`ODD_ID_USER`].
pub const ODD_ID_ACCESS_TOKEN: &str = "corp_emulated_odd_id_access_token_0002";

/// Every access token, access token secret and refresh token planted on the seeded users.
///
/// Tests search logs and error messages for these strings to prove nothing leaks.
pub fn planted_secrets() -> Vec<&'static str> {
    vec![
        GITHUB_ACCESS_TOKEN,
        GOOGLE_ACCESS_TOKEN,
        GOOGLE_REFRESH_TOKEN,
        TWITTER_ACCESS_TOKEN,
        TWITTER_ACCESS_TOKEN_SECRET,
        LINKED_GITHUB_ACCESS_TOKEN,
        LINKED_GOOGLE_ACCESS_TOKEN,
        LINKED_GOOGLE_REFRESH_TOKEN,
        LINKED_CORP_ACCESS_TOKEN,
        ODD_ID_ACCESS_TOKEN,
    ]
}

/// The ids of all seeded users, in the order [`users`] returns them.
pub fn user_ids() -> Vec<&'static str> {
    vec![
        GITHUB_USER,
        GOOGLE_USER,
        TWITTER_USER,
        DATABASE_USER,
        LINKED_USER,
        ODD_ID_USER,
    ]
}

/// The seeded user profiles, shaped like Auth0's `GET /api/v2/users/{id}` answer.
pub fn users() -> Vec<Value> {
    vec![
        github_user(),
        google_user(),
        twitter_user(),
        database_user(),
        linked_user(),
        odd_id_user(),
    ]
}

/// Fields every seeded profile shares, so they look like real Auth0 profiles.
fn profile(user_id: &str, email: &str, name: &str, identities: Vec<Value>) -> Value {
    json!({
        "user_id": user_id,
        "email": email,
        "email_verified": true,
        "name": name,
        "nickname": name.split_whitespace().next().unwrap_or(name),
        "picture": "https://s.gravatar.com/avatar/emulated.png",
        "created_at": "2024-01-15T10:00:00.000Z",
        "updated_at": "2025-06-01T08:30:00.000Z",
        "last_login": "2025-06-01T08:30:00.000Z",
        "logins_count": 42,
        "identities": identities,
        "app_metadata": {},
        "user_metadata": {},
    })
}

fn github_identity(id: u64, token: &str) -> Value {
    json!({
        "provider": "github",
        "connection": "github",
        "user_id": id,
        "isSocial": true,
        "access_token": token,
    })
}

fn google_identity(id: &str, token: &str, refresh_token: &str) -> Value {
    json!({
        "provider": "google-oauth2",
        "connection": "google-oauth2",
        "user_id": id,
        "isSocial": true,
        "access_token": token,
        "expires_in": GOOGLE_EXPIRES_IN,
        "refresh_token": refresh_token,
    })
}

fn corp_identity(id: &str, token: &str) -> Value {
    json!({
        "provider": "oauth2",
        "connection": CORP_SSO_CONNECTION,
        "user_id": id,
        "isSocial": true,
        "access_token": token,
    })
}

fn database_identity(id: &str) -> Value {
    json!({
        "provider": "auth0",
        "connection": "Username-Password-Authentication",
        "user_id": id,
        "isSocial": false,
    })
}

fn github_user() -> Value {
    let identity = github_identity(GITHUB_IDP_USER_ID, GITHUB_ACCESS_TOKEN);
    profile(GITHUB_USER, "octo@example.com", "Octo Cat", vec![identity])
}

fn google_user() -> Value {
    let identity = google_identity(
        "108000000000000000001",
        GOOGLE_ACCESS_TOKEN,
        GOOGLE_REFRESH_TOKEN,
    );
    profile(
        GOOGLE_USER,
        "gina@example.com",
        "Gina Google",
        vec![identity],
    )
}

fn twitter_user() -> Value {
    let identity = json!({
        "provider": "twitter",
        "connection": "twitter",
        "user_id": "778899",
        "isSocial": true,
        "access_token": TWITTER_ACCESS_TOKEN,
        "access_token_secret": TWITTER_ACCESS_TOKEN_SECRET,
    });
    profile(
        TWITTER_USER,
        "tweety@example.com",
        "Tweety Bird",
        vec![identity],
    )
}

fn database_user() -> Value {
    let identity = database_identity("5f7c8ec7c33c6c004bbafe82");
    profile(
        DATABASE_USER,
        "dana@example.com",
        "Dana Base",
        vec![identity],
    )
}

fn linked_user() -> Value {
    let identities = vec![
        database_identity("linked0001"),
        github_identity(LINKED_GITHUB_IDP_USER_ID, LINKED_GITHUB_ACCESS_TOKEN),
        google_identity(
            "108000000000000000002",
            LINKED_GOOGLE_ACCESS_TOKEN,
            LINKED_GOOGLE_REFRESH_TOKEN,
        ),
        corp_identity("corp-sso|linked.user", LINKED_CORP_ACCESS_TOKEN),
    ];
    profile(LINKED_USER, "lin@example.com", "Lin Ked", identities)
}

fn odd_id_user() -> Value {
    let identity = corp_identity("corp-sso|team/ops lead@example.com", ODD_ID_ACCESS_TOKEN);
    profile(
        ODD_ID_USER,
        "ops-lead@example.com",
        "Ops Lead",
        vec![identity],
    )
}
