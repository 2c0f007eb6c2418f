//! Users the emulator starts with, and the fixed IdP tokens planted on them.
//!
//! The tokens are constants so that tests can assert on them and `tokenbroker dev` can show
//! them; [`planted_secrets`] lists every one of them so tests can prove no log line leaks any.
//! The users cover the shapes the broker must handle: a numeric GitHub `user_id`, a Google
//! identity with `expires_in` and `refresh_token`, an OAuth1 Twitter identity with a token
//! secret, a database user without any IdP token, a user with several linked identities, and a
//! user id that needs percent-encoding (`/`, space, `@`).
//!
//! For IdP refreshes (issue "Fresh tokens"), each profile has a `last_login` relative to the
//! moment it is seeded, so the age of a planted token is known: the users above logged in
//! [`FRESH_LOGIN_AGO`]; four more Google users cover the refresh cases: a fresh token, a stale
//! one with a working refresh token, a stale one whose refresh token the IdP has revoked, and
//! one without `expires_in`. The emulated IdP honours every seeded refresh token but the
//! revoked one, for the OAuth client [`IDP_CLIENT_ID`] / [`IDP_CLIENT_SECRET`].

use std::time::{Duration, SystemTime};

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
/// `expires_in` (seconds) of the Google identities, and of the tokens the emulated IdP issues.
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

/// How long before seeding the users with a fresh token logged in: every user above and
/// [`FRESH_GOOGLE_USER`]. Their Google tokens have `GOOGLE_EXPIRES_IN - 300` s left.
pub const FRESH_LOGIN_AGO: Duration = Duration::from_secs(5 * 60);
/// How long before seeding the users with a stale token logged in: their Google tokens
/// expired two hours before.
pub const STALE_LOGIN_AGO: Duration = Duration::from_secs(3 * 60 * 60);

/// Client id of the OAuth app the emulated Google IdP knows: the one the broker refreshes as.
pub const IDP_CLIENT_ID: &str = "tokenbroker-dev.apps.googleusercontent.com";
/// Client secret of [`IDP_CLIENT_ID`] at the emulated IdP.
pub const IDP_CLIENT_SECRET: &str = "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001";
/// Scope of the tokens the emulated IdP issues on refresh.
pub const IDP_SCOPE: &str = "openid email https://www.googleapis.com/auth/drive.readonly";

/// A Google user who logged in [`FRESH_LOGIN_AGO`]: the planted token still works.
pub const FRESH_GOOGLE_USER: &str = "google-oauth2|108000000000000000011";
/// Google access token planted on [`FRESH_GOOGLE_USER`].
pub const FRESH_GOOGLE_ACCESS_TOKEN: &str = "ya29.emulated_fresh_google_access_token_0011";
/// Refresh token of [`FRESH_GOOGLE_USER`]; the IdP honours it.
pub const FRESH_GOOGLE_REFRESH_TOKEN: &str = "1//emulated_fresh_google_refresh_token_0011";

/// A Google user who logged in [`STALE_LOGIN_AGO`]: the planted token is dead, its refresh
/// token works.
pub const STALE_GOOGLE_USER: &str = "google-oauth2|108000000000000000012";
/// Expired Google access token planted on [`STALE_GOOGLE_USER`].
pub const STALE_GOOGLE_ACCESS_TOKEN: &str = "ya29.emulated_stale_google_access_token_0012";
/// Refresh token of [`STALE_GOOGLE_USER`]; the IdP honours it.
pub const STALE_GOOGLE_REFRESH_TOKEN: &str = "1//emulated_stale_google_refresh_token_0012";

/// A Google user who logged in [`STALE_LOGIN_AGO`] and whose refresh token the IdP has
/// revoked: the user must reconnect.
pub const REVOKED_GOOGLE_USER: &str = "google-oauth2|108000000000000000013";
/// Expired Google access token planted on [`REVOKED_GOOGLE_USER`].
pub const REVOKED_GOOGLE_ACCESS_TOKEN: &str = "ya29.emulated_revoked_google_access_token_0013";
/// Refresh token of [`REVOKED_GOOGLE_USER`]; the IdP answers `invalid_grant`.
pub const REVOKED_GOOGLE_REFRESH_TOKEN: &str = "1//emulated_revoked_google_refresh_token_0013";

/// A Google user whose identity has no `expires_in`, so the token's age cannot be told from
/// the profile; logged in [`STALE_LOGIN_AGO`], refresh token honoured.
pub const NO_EXPIRY_GOOGLE_USER: &str = "google-oauth2|108000000000000000014";
/// Google access token planted on [`NO_EXPIRY_GOOGLE_USER`].
pub const NO_EXPIRY_GOOGLE_ACCESS_TOKEN: &str = "ya29.emulated_no_expiry_google_access_token_0014";
/// Refresh token of [`NO_EXPIRY_GOOGLE_USER`]; the IdP honours it.
pub const NO_EXPIRY_GOOGLE_REFRESH_TOKEN: &str = "1//emulated_no_expiry_google_refresh_token_0014";

/// A Google user of a connection with Token Vault on: Auth0 keeps no token on the profile
/// (the identity carries none), its tokens are in Token Vault.
pub const VAULT_USER: &str = "google-oauth2|108000000000000000021";
/// The Google user id of [`VAULT_USER`] at the IdP: the exchange's `login_hint`.
pub const VAULT_IDP_USER_ID: &str = "108000000000000000021";
/// The Auth0 connection of [`VAULT_USER`]'s identity, with Token Vault on.
pub const TOKEN_VAULT_CONNECTION: &str = "google-vault";
/// The access token the emulated Token Vault holds for [`VAULT_USER`] at start, fresh for
/// [`GOOGLE_EXPIRES_IN`] seconds.
pub const VAULT_ACCESS_TOKEN: &str = "ya29.emulated_token_vault_access_token_0021";

/// A GitHub user whose connection switched to Token Vault without the broker knowing: the
/// identity comes back without a token although the Management token may read them.
pub const SWITCHED_USER: &str = "github|2468013";

/// Every access token, access token secret and refresh token planted on the seeded users
/// (and in the emulated Token Vault), the emulated IdP's client secret, and a line of the
/// body of each fixture key the broker signs its client assertions and subject tokens with.
///
/// Tests search logs and error messages for these strings to prove nothing leaks.
pub fn planted_secrets() -> Vec<&'static str> {
    let key_bodies = [
        super::keys::CLIENT_ASSERTION_KEY_1,
        super::keys::CLIENT_ASSERTION_KEY_2,
        super::keys::CLIENT_ASSERTION_KEY_3,
    ]
    .into_iter()
    .filter_map(|pem| pem.lines().nth(1));
    let mut planted = vec![
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
        FRESH_GOOGLE_ACCESS_TOKEN,
        FRESH_GOOGLE_REFRESH_TOKEN,
        STALE_GOOGLE_ACCESS_TOKEN,
        STALE_GOOGLE_REFRESH_TOKEN,
        REVOKED_GOOGLE_ACCESS_TOKEN,
        REVOKED_GOOGLE_REFRESH_TOKEN,
        NO_EXPIRY_GOOGLE_ACCESS_TOKEN,
        NO_EXPIRY_GOOGLE_REFRESH_TOKEN,
        IDP_CLIENT_SECRET,
        VAULT_ACCESS_TOKEN,
    ];
    planted.extend(key_bodies);
    planted
}

/// The refresh tokens the emulated IdP honours at start.
pub fn idp_refresh_tokens() -> Vec<&'static str> {
    vec![
        GOOGLE_REFRESH_TOKEN,
        LINKED_GOOGLE_REFRESH_TOKEN,
        FRESH_GOOGLE_REFRESH_TOKEN,
        STALE_GOOGLE_REFRESH_TOKEN,
        NO_EXPIRY_GOOGLE_REFRESH_TOKEN,
    ]
}

/// The refresh tokens the emulated IdP has revoked at start.
pub fn revoked_idp_refresh_tokens() -> Vec<&'static str> {
    vec![REVOKED_GOOGLE_REFRESH_TOKEN]
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
        FRESH_GOOGLE_USER,
        STALE_GOOGLE_USER,
        REVOKED_GOOGLE_USER,
        NO_EXPIRY_GOOGLE_USER,
        VAULT_USER,
        SWITCHED_USER,
    ]
}

/// The seeded user profiles, shaped like Auth0's `GET /api/v2/users/{id}` answer, as seeded
/// now.
pub fn users() -> Vec<Value> {
    users_at(SystemTime::now())
}

/// The seeded user profiles as seeded at `now`, in the order of [`user_ids`]: `last_login`
/// is [`FRESH_LOGIN_AGO`] or [`STALE_LOGIN_AGO`] before it.
pub fn users_at(now: SystemTime) -> Vec<Value> {
    let fresh = vec![
        github_user(),
        google_user(),
        twitter_user(),
        database_user(),
        linked_user(),
        odd_id_user(),
        google_refresh_user(
            FRESH_GOOGLE_USER,
            FRESH_GOOGLE_ACCESS_TOKEN,
            FRESH_GOOGLE_REFRESH_TOKEN,
        ),
    ];
    let stale = vec![
        google_refresh_user(
            STALE_GOOGLE_USER,
            STALE_GOOGLE_ACCESS_TOKEN,
            STALE_GOOGLE_REFRESH_TOKEN,
        ),
        google_refresh_user(
            REVOKED_GOOGLE_USER,
            REVOKED_GOOGLE_ACCESS_TOKEN,
            REVOKED_GOOGLE_REFRESH_TOKEN,
        ),
        no_expiry_user(),
    ];
    let vaulted = vec![vault_user(), switched_user()];
    let fresh = logged_in(fresh, now, FRESH_LOGIN_AGO);
    let stale = logged_in(stale, now, STALE_LOGIN_AGO);
    let vaulted = logged_in(vaulted, now, FRESH_LOGIN_AGO);
    fresh.into_iter().chain(stale).chain(vaulted).collect()
}

/// `users` with `last_login` set to `ago` before `now`, written as Auth0 writes times
/// (`2026-12-01T10:00:00.000Z`).
fn logged_in(mut users: Vec<Value>, now: SystemTime, ago: Duration) -> Vec<Value> {
    let at = now.checked_sub(ago).unwrap_or(SystemTime::UNIX_EPOCH);
    let last_login = humantime::format_rfc3339_millis(at).to_string();
    for user in &mut users {
        user["last_login"] = Value::from(last_login.as_str());
    }
    users
}

/// Fields every seeded profile shares, so they look like real Auth0 profiles; `last_login`
/// is set by [`users_at`].
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

/// A user with one Google identity; `user_id` is `google-oauth2|<Google id>`, like Auth0's.
fn google_refresh_user(user_id: &str, token: &str, refresh_token: &str) -> Value {
    let google_id = user_id.trim_start_matches("google-oauth2|");
    let identity = google_identity(google_id, token, refresh_token);
    let email = format!("{google_id}@example.com");
    profile(user_id, &email, "Google User", vec![identity])
}

fn no_expiry_user() -> Value {
    let mut user = google_refresh_user(
        NO_EXPIRY_GOOGLE_USER,
        NO_EXPIRY_GOOGLE_ACCESS_TOKEN,
        NO_EXPIRY_GOOGLE_REFRESH_TOKEN,
    );
    if let Some(identity) = user["identities"][0].as_object_mut() {
        identity.remove("expires_in");
    }
    user
}

/// [`VAULT_USER`]: one Google identity of [`TOKEN_VAULT_CONNECTION`], without tokens.
fn vault_user() -> Value {
    let identity = json!({
        "provider": "google-oauth2",
        "connection": TOKEN_VAULT_CONNECTION,
        "user_id": VAULT_IDP_USER_ID,
        "isSocial": true,
    });
    profile(
        VAULT_USER,
        "vault@example.com",
        "Vera Vault",
        vec![identity],
    )
}

/// [`SWITCHED_USER`]: a GitHub identity without a token, as Auth0 returns it once Token
/// Vault is on for the connection.
fn switched_user() -> Value {
    let identity = json!({
        "provider": "github",
        "connection": "github",
        "user_id": 2_468_013,
        "isSocial": true,
    });
    profile(
        SWITCHED_USER,
        "switch@example.com",
        "Swit Ched",
        vec![identity],
    )
}
