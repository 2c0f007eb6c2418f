//! A user's identities as a shared value holds them (JSON, then sealed):
//! everything a replica needs to answer from it as the replica that read
//! Auth0 would, `fetched_at` and when it stops being fresh included. The
//! tokens are only ever in this plaintext, which is zeroed after sealing and
//! after reading.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::SharedEntry;
use crate::auth0::{Identity, UserIdentities};
use crate::user_id::UserId;

/// A value as written: borrowed from the cache entry.
#[derive(Serialize)]
struct EntryOut<'a> {
    /// Checked on read, beside the key binding of the seal.
    user_id: &'a str,
    /// Wall-clock end of freshness (Unix ns), so a replica reading it
    /// answers from it no longer than the one that read Auth0 would.
    fresh_until_ns: u64,
    /// `None`: Auth0 has no such user (a shared negative entry).
    user: Option<UserOut<'a>>,
}

#[derive(Serialize)]
struct UserOut<'a> {
    fetched_at_ns: u64,
    idp_tokens_readable: bool,
    identities: Vec<IdentityOut<'a>>,
}

#[derive(Serialize)]
struct IdentityOut<'a> {
    provider: &'a str,
    connection: &'a str,
    idp_user_id: &'a str,
    access_token: Option<&'a str>,
    access_token_secret: Option<&'a str>,
    expires_at_ns: Option<u64>,
    /// Only for connections refreshed at the IdP (sealed like the tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<&'a str>,
}

/// A value as read: tokens go straight into `secrecy` types.
#[derive(Deserialize)]
struct EntryIn {
    user_id: String,
    fresh_until_ns: u64,
    user: Option<UserIn>,
}

#[derive(Deserialize)]
struct UserIn {
    fetched_at_ns: u64,
    idp_tokens_readable: bool,
    identities: Vec<IdentityIn>,
}

#[derive(Deserialize)]
struct IdentityIn {
    provider: String,
    connection: String,
    idp_user_id: String,
    access_token: Option<SecretString>,
    access_token_secret: Option<SecretString>,
    expires_at_ns: Option<u64>,
    #[serde(default)]
    refresh_token: Option<SecretString>,
}

/// The plaintext of a shared value: `user` (`None`: no such user), fresh
/// for `fresh_for` from now.
pub(super) fn encode(
    user_id: &UserId,
    user: Option<&UserIdentities>,
    fresh_for: Duration,
) -> Option<Zeroizing<Vec<u8>>> {
    let entry = EntryOut {
        user_id: user_id.as_str(),
        fresh_until_ns: unix_ns(SystemTime::now() + fresh_for),
        user: user.map(|user| UserOut {
            fetched_at_ns: unix_ns(user.fetched_at),
            idp_tokens_readable: user.idp_tokens_readable,
            identities: user.identities.iter().map(identity_out).collect(),
        }),
    };
    serde_json::to_vec(&entry).ok().map(Zeroizing::new)
}

fn identity_out(identity: &Identity) -> IdentityOut<'_> {
    IdentityOut {
        provider: &identity.provider,
        connection: &identity.connection,
        idp_user_id: &identity.idp_user_id,
        access_token: identity
            .access_token
            .as_ref()
            .map(ExposeSecret::expose_secret),
        access_token_secret: identity
            .access_token_secret
            .as_ref()
            .map(ExposeSecret::expose_secret),
        expires_at_ns: identity.expires_at.map(unix_ns),
        refresh_token: identity
            .refresh_token
            .as_ref()
            .map(ExposeSecret::expose_secret),
    }
}

/// The entry in `plaintext`, if it is one for `user_id` and still fresh.
pub(super) fn decode(plaintext: &[u8], user_id: &UserId) -> Option<SharedEntry> {
    let entry: EntryIn = serde_json::from_slice(plaintext).ok()?;
    if entry.user_id != user_id.as_str() {
        return None;
    }
    let now = SystemTime::now();
    let fresh_for = from_unix_ns(entry.fresh_until_ns)
        .duration_since(now)
        .ok()
        .filter(|left| !left.is_zero())?;
    let user = entry.user.map(|user| UserIdentities {
        user_id: entry.user_id,
        fetched_at: from_unix_ns(user.fetched_at_ns),
        fetched_instant: instant_of(from_unix_ns(user.fetched_at_ns), now),
        idp_tokens_readable: user.idp_tokens_readable,
        identities: user.identities.into_iter().map(identity_in).collect(),
    });
    Some(SharedEntry { user, fresh_for })
}

fn identity_in(identity: IdentityIn) -> Identity {
    Identity {
        provider: identity.provider,
        connection: identity.connection,
        idp_user_id: identity.idp_user_id,
        access_token: identity.access_token,
        access_token_secret: identity.access_token_secret,
        expires_at: identity.expires_at_ns.map(from_unix_ns),
        refresh_token: identity.refresh_token,
    }
}

/// The monotonic instant of a wall-clock time in the past (`now` if it is
/// not), so `from_cache` is told the same way as for a local read.
fn instant_of(at: SystemTime, now: SystemTime) -> Instant {
    let age = now.duration_since(at).unwrap_or_default();
    let instant_now = Instant::now();
    instant_now.checked_sub(age).unwrap_or(instant_now)
}

pub(super) fn unix_ns(at: SystemTime) -> u64 {
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX)
}

pub(super) fn from_unix_ns(ns: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_nanos(ns))
        .unwrap_or(UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(user_id: &str) -> UserIdentities {
        UserIdentities {
            user_id: user_id.to_owned(),
            identities: vec![Identity {
                provider: "twitter".to_owned(),
                connection: "twitter".to_owned(),
                idp_user_id: "42".to_owned(),
                access_token: Some(SecretString::from("tw_token")),
                access_token_secret: Some(SecretString::from("tw_secret")),
                expires_at: Some(SystemTime::now() + Duration::from_secs(3600)),
                refresh_token: Some(SecretString::from("1//refresh")),
            }],
            fetched_at: SystemTime::now() - Duration::from_secs(5),
            fetched_instant: Instant::now(),
            idp_tokens_readable: true,
        }
    }

    #[test]
    fn a_user_comes_back_as_it_was_written() {
        let id = UserId::parse("twitter|42").unwrap();
        let written = user("twitter|42");
        let plaintext = encode(&id, Some(&written), Duration::from_secs(60)).unwrap();
        let entry = decode(&plaintext, &id).expect("decodes");
        let read = entry.user.expect("found");
        let identity = &read.identities[0];
        assert_eq!(identity.idp_user_id, "42");
        assert_eq!(
            identity.access_token.as_ref().unwrap().expose_secret(),
            "tw_token"
        );
        assert_eq!(
            identity
                .access_token_secret
                .as_ref()
                .unwrap()
                .expose_secret(),
            "tw_secret"
        );
        assert_eq!(unix_ns(read.fetched_at), unix_ns(written.fetched_at));
        assert!(read.fetched_instant.elapsed() >= Duration::from_secs(4));
        assert!(read.idp_tokens_readable);
        assert!(entry.fresh_for <= Duration::from_secs(60));
        assert!(entry.fresh_for > Duration::from_secs(55));
    }

    #[test]
    fn a_missing_user_is_shared_too() {
        let id = UserId::parse("github|404").unwrap();
        let plaintext = encode(&id, None, Duration::from_secs(30)).unwrap();
        assert!(decode(&plaintext, &id).unwrap().user.is_none());
    }

    #[test]
    fn another_users_value_or_an_expired_one_is_no_entry() {
        let id = UserId::parse("twitter|42").unwrap();
        let other = UserId::parse("twitter|43").unwrap();
        let plaintext = encode(&id, Some(&user("twitter|42")), Duration::from_secs(60)).unwrap();
        assert!(decode(&plaintext, &other).is_none());
        let expired = encode(&id, None, Duration::ZERO).unwrap();
        assert!(decode(&expired, &id).is_none());
        assert!(decode(b"not json", &id).is_none());
    }
}
