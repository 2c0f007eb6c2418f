//! The synthetic users the emulator holds and the requests the load sends
//! for them: GitHub users with fixed-width ids, so every answer has the same
//! size.

use tokenbroker::proto::GetIdpTokenRequest;

/// First id of the users of the cold path and the load.
pub const LOAD_USER_BASE: u64 = 10_000_000;

/// First id of the users of the memory phase (apart from the load's, so none
/// is cached already).
pub const MEMORY_USER_BASE: u64 = 20_000_000;

/// The emulator's record of GitHub user `id`, with a token shaped like a real
/// one.
pub fn github_user(id: u64) -> serde_json::Value {
    serde_json::json!({
        "user_id": format!("github|{id}"),
        "email": format!("user{id}@bench.example"),
        "identities": [{
            "provider": "github",
            "connection": "github",
            "user_id": id,
            "isSocial": true,
            // Real GitHub OAuth tokens: "gho_" and 36 characters.
            "access_token": format!("gho_{id:0>36}"),
        }],
    })
}

/// The Auth0 user id of the `index`-th user from `base`.
pub fn user_id(base: u64, index: usize) -> String {
    format!("github|{}", base + index as u64)
}

/// The user ids of `count` users from `base`.
pub fn user_ids(base: u64, count: usize) -> Vec<String> {
    (0..count).map(|index| user_id(base, index)).collect()
}

/// Bytes of the cached profile's strings: what any cache must hold.
pub fn payload_bytes(id: u64) -> usize {
    let user_id = format!("github|{id}").len();
    let access_token = 4 + 36;
    let provider = "github".len();
    let connection = "github".len();
    let idp_user_id = id.to_string().len();
    user_id + access_token + provider + connection + idp_user_id
}

/// The request every phase sends: `user_id`'s GitHub token.
pub fn get_request(user_id: String) -> GetIdpTokenRequest {
    GetIdpTokenRequest {
        user_id,
        provider: "github".to_owned(),
        ..Default::default()
    }
}
