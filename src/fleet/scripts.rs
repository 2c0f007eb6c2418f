//! The Lua scripts the fleet runs in Redis. Each is atomic there, which is
//! what makes the single flight and the budget hold across replicas: no
//! replica can slip between a look and a write. Redis keeps them by hash
//! (EVALSHA); after a restart the client loads them again by itself.

use std::sync::LazyLock;

use redis::Script;

/// The user's value if there is one; else the user's lock if it is free.
/// KEYS: value, lock. ARGV: lock token, lock TTL (ms), "1" to skip the value
/// (it did not open: this replica will replace it).
/// Returns {1, value}, {2, false} (the lock is ours) or {0, false} (another
/// replica holds it).
pub(super) static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if ARGV[3] ~= '1' then
  local value = redis.call('GET', KEYS[1])
  if value then return {1, value} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, false} end
return {0, false}
",
    )
});

/// Stores the value only while the lock is still ours (an invalidation since
/// the read began deletes the lock, so a read that began before it never
/// lands), then frees the lock.
/// KEYS: value, lock. ARGV: lock token, sealed value, TTL (ms; 0 stores
/// nothing). Returns 1 when the lock was ours.
pub(super) static FILL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
redis.call('DEL', KEYS[2])
return 1
",
    )
});

/// Frees the lock if it is still ours (compare and delete: a lock that
/// expired and was taken by another replica stays theirs).
/// KEYS: lock. ARGV: lock token. Returns 1 when it was ours.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// Forgets the user fleet-wide: deletes the value, the lock (so a read
/// under way cannot store what it read), the kept tokens and the rotated
/// refresh tokens, counts the invalidation (so a token fetch under way
/// cannot store either), and tells every replica.
/// KEYS: value, lock, kept tokens, generation, rotations. ARGV: channel,
/// sealed message, generation life (ms).
pub(super) static INVALIDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[5])
redis.call('INCR', KEYS[4])
redis.call('PEXPIRE', KEYS[4], ARGV[3])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
",
    )
});

/// [`INVALIDATE`], then takes the lock for this replica's fresh read
/// (`bypass_cache`), so that others wait for it rather than read Auth0 too.
/// KEYS: value, lock, kept tokens, generation, rotations. ARGV: channel,
/// sealed message, generation life (ms), lock token, lock TTL (ms).
pub(super) static TAKE_OVER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('DEL', KEYS[1], KEYS[3], KEYS[5])
redis.call('INCR', KEYS[4])
redis.call('PEXPIRE', KEYS[4], ARGV[3])
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
",
    )
});

/// A kept token's claim: like [`CLAIM`], with the user's invalidation count
/// (to store the fetched token only if no invalidation came since) and the
/// connection's rotated refresh token.
/// KEYS: kept tokens, token lock, generation, rotations. ARGV: token field,
/// rotation field, lock token, lock TTL (ms), "1" to skip the value.
/// Returns {1, value, generation, rotation}, {2, false, generation,
/// rotation} (the lock is ours) or {0, false, generation, false}.
pub(super) static CLAIM_TOKEN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local generation = redis.call('GET', KEYS[3]) or '0'
local rotation = redis.call('HGET', KEYS[4], ARGV[2])
if ARGV[5] ~= '1' then
  local value = redis.call('HGET', KEYS[1], ARGV[1])
  if value then return {1, value, generation, rotation} end
end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then
  return {2, false, generation, rotation}
end
return {0, false, generation, false}
",
    )
});

/// Stores a fetched token and frees its lock. The rotated refresh token
/// first and whatever happened since: the IdP has retired the one before
/// it, so it is the only one that still works. The token only while the lock
/// is ours and no invalidation came since the claim; the user's hash lives
/// as long as its longest-lived token.
/// KEYS: kept tokens, token lock, generation, rotations. ARGV: token field,
/// rotation field, lock token, generation at the claim, sealed token, its
/// life (ms), sealed rotation ('' for none), rotation life (ms).
/// Returns 1 when the token was stored.
pub(super) static FILL_TOKEN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[2], ARGV[7])
  redis.call('PEXPIRE', KEYS[4], ARGV[8])
end
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return 0 end
redis.call('DEL', KEYS[2])
if (redis.call('GET', KEYS[3]) or '0') ~= ARGV[4] then return 0 end
local life = tonumber(ARGV[6])
if life <= 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
if redis.call('PTTL', KEYS[1]) < life then
  redis.call('PEXPIRE', KEYS[1], life)
end
return 1
",
    )
});

/// One request's slot of the fleet's Auth0 budget (GCRA): the key holds the
/// theoretical arrival time (µs, Redis's own clock, so replicas' clocks do
/// not matter). A request may go when that time is at most `(burst - 1)`
/// intervals ahead of now; it then moves one interval on. The same quota as
/// governor's `per_second(rate).allow_burst(burst)`.
/// KEYS: budget. ARGV: interval (µs), burst. Returns 0 (go) or the µs to
/// wait before asking again.
pub(super) static BUDGET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - now - tolerance
if wait > 0 then return math.ceil(wait) end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
return 0
",
    )
});
