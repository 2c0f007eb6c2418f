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

/// Forgets the user fleet-wide: deletes the value and the lock (so a read
/// under way cannot store what it read), and tells every replica.
/// KEYS: value, lock. ARGV: channel, sealed message.
pub(super) static INVALIDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
",
    )
});

/// [`INVALIDATE`], then takes the lock for this replica's fresh read
/// (`bypass_cache`), so that others wait for it rather than read Auth0 too.
/// KEYS: value, lock. ARGV: channel, sealed message, lock token, lock TTL (ms).
pub(super) static TAKE_OVER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
redis.call('PUBLISH', ARGV[1], ARGV[2])
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
