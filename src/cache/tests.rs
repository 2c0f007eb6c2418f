//! The user cache's two bounds: users and estimated bytes.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::sync::Cache as SyncCache;
use secrecy::SecretString;

use super::expiry::{CachedUser, UserState};
use super::weigh::{estimated_bytes, UserBudget, ENTRY_OVERHEAD, IDENTITY_OVERHEAD};
use super::{users_cache, CacheSettings, DEFAULT_STALE_IF_ERROR, DEFAULT_USER_MAX_BYTES};
use crate::auth0::{Identity, UserIdentities};
use crate::user_id::UserId;

fn settings(user_capacity: u64, user_max_bytes: u64) -> CacheSettings {
    CacheSettings {
        user_ttl: Duration::from_secs(300),
        user_capacity,
        user_max_bytes,
        negative_ttl: Duration::from_secs(30),
    }
}

/// A found user with one GitHub identity holding a token of `token_len` bytes.
fn user(user_id: &str, token_len: usize) -> CachedUser {
    let identity = Identity {
        provider: "github".to_owned(),
        connection: "github".to_owned(),
        idp_user_id: "1234567".to_owned(),
        access_token: Some(SecretString::from("t".repeat(token_len))),
        access_token_secret: None,
        expires_at: None,
    };
    let user = UserIdentities {
        user_id: user_id.to_owned(),
        identities: vec![identity],
        fetched_at: SystemTime::now(),
        fetched_instant: Instant::now(),
        idp_tokens_readable: true,
    };
    CachedUser {
        state: UserState::Found(Arc::new(user)),
        read_started: 1,
        fresh_until: Instant::now() + Duration::from_secs(300),
    }
}

fn fill(cache: &SyncCache<UserId, CachedUser>, users: usize, token_len: usize) {
    for index in 0..users {
        let id = format!("github|{index}");
        let key = UserId::parse(&id).expect("user id");
        cache.insert(key, user(&id, token_len));
    }
    cache.run_pending_tasks();
}

#[test]
fn the_byte_budget_evicts_users_beyond_it() {
    let budget = 64 * 1024;
    let cache = users_cache(&settings(1000, budget), DEFAULT_STALE_IF_ERROR);
    fill(&cache, 100, 10_000);
    assert!(
        cache.weighted_size() <= budget,
        "{} bytes held",
        cache.weighted_size()
    );
    assert!(
        (1..=6).contains(&cache.entry_count()),
        "{} users of ~11 KB in 64 KiB",
        cache.entry_count()
    );
}

#[test]
fn the_user_count_still_bounds_small_users() {
    let cache = users_cache(
        &settings(10, DEFAULT_USER_MAX_BYTES),
        DEFAULT_STALE_IF_ERROR,
    );
    fill(&cache, 100, 40);
    assert!(cache.entry_count() <= 10, "{}", cache.entry_count());
}

#[test]
fn the_estimate_counts_ids_strings_tokens_and_overheads() {
    let id = UserId::parse("github|1").expect("user id");
    let small = estimated_bytes(&id, &user("github|1", 40));
    let large = estimated_bytes(&id, &user("github|1", 10_040));
    assert_eq!(large - small, 10_000);
    let strings = (2 * "github|1".len() + "github".len() * 2 + "1234567".len() + 40) as u64;
    assert_eq!(small, ENTRY_OVERHEAD + IDENTITY_OVERHEAD + strings);
    let missing = CachedUser {
        state: UserState::NotFound,
        read_started: 1,
        fresh_until: Instant::now(),
    };
    assert_eq!(estimated_bytes(&id, &missing), ENTRY_OVERHEAD + 8);
}

#[test]
fn every_user_weighs_at_least_its_share_of_the_budget() {
    let budget = UserBudget::new(&settings(100_000, DEFAULT_USER_MAX_BYTES));
    assert_eq!(budget.floor, 2685);
    assert_eq!(budget.max_weight, 268_500_000);
    let id = UserId::parse("github|1").expect("user id");
    assert_eq!(budget.weight(&id, &user("github|1", 40)), 2685);
    assert_eq!(budget.weight(&id, &user("github|1", 10_000)), {
        let bytes = estimated_bytes(&id, &user("github|1", 10_000));
        u32::try_from(bytes).expect("fits")
    });
    let huge = UserBudget::new(&settings(1, u64::MAX));
    assert_eq!(huge.floor, u32::MAX);
    assert_eq!(huge.max_weight, u64::from(u32::MAX));
}
