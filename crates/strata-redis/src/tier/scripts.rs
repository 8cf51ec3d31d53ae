//! The Lua scripts of the tier. Every multi-step operation is one script, so Redis runs
//! it atomically.
//!
//! Conventions shared with the [`tier`](super) module (see its docs for the full
//! layout): the namespace meta hash holds `c` (invalidation clock), `n` (namespace
//! epoch), `l` (lease counter), `f` (lease floor: leases with an id at or below it were
//! voided by a namespace invalidation) and `t:<tag>` (the clock value of the tag's last
//! invalidation). Entry hash fields: `e` (envelope), `s` (stamp), `t` (tags), `f` (soft
//! expiry, ns), `h` (hard expiry, ns), `v` (the row version in decimal, or empty: what
//! the fill's version guard compares).
//!
//! Numbers written by the scripts go through `d()`: Lua turns a number into text with
//! `%.14g`, which would write clock values (about 1.8e15) in exponent notation.

/// Lua helpers prepended to every tier script.
const PRELUDE: &str = r#"
local function d(x)
  return string.format('%d', x)
end

-- The namespace clock, created when missing. A new clock starts at the server's time
-- in microseconds, and so does the namespace epoch: after the meta hash was lost
-- (restart without persistence, eviction, flush) every older entry is invalid and
-- every older fill token is rejected, instead of old stamps looking new.
local function clock_of(meta)
  local c = redis.call('HGET', meta, 'c')
  if c then return tonumber(c) end
  local t = redis.call('TIME')
  local base = d(tonumber(t[1]) * 1000000 + tonumber(t[2]))
  redis.call('HSET', meta, 'c', base, 'n', base)
  return tonumber(base)
end

-- Advances the clock; returns the new value.
local function tick(meta)
  clock_of(meta)
  return redis.call('HINCRBY', meta, 'c', 1)
end

-- Parses the `t` field: each tag written as <byte length>:<tag>. nil if malformed.
local function parse_tags(t)
  if type(t) ~= 'string' then return nil end
  local out = {}
  local i = 1
  local len = #t
  while i <= len do
    local c = string.find(t, ':', i, true)
    if not c then return nil end
    local n = tonumber(string.sub(t, i, c - 1))
    if not n or n < 0 or c + n > len then return nil end
    out[#out + 1] = string.sub(t, c + 1, c + n)
    i = c + 1 + n
  end
  return out
end

-- a < b for non-negative decimal integers of any size, written without leading zeros
-- (nanosecond timestamps exceed the 53 bits a Lua number holds exactly).
local function dec_lt(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end

-- The server's time in milliseconds (write-lock expiries).
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- True when the write-lock set `k` (members: lock ids, scores: expiry ms) holds a live
-- lock.
local function locked(k, now)
  return redis.call('ZCOUNT', k, '(' .. d(now), '+inf') > 0
end

-- Tag invalidation: a clock tick becomes the tag's epoch. Returns the tick.
local function bump_tag(meta, tag)
  local at = d(tick(meta))
  redis.call('HSET', meta, 't:' .. tag, at)
  return at
end

-- Namespace invalidation: the epoch moves to a new tick, every lease granted so far is
-- voided (lease floor), and the tag epochs are dropped (the namespace epoch now
-- dominates them all). Returns the tick.
local function bump_namespace(meta)
  local at = d(tick(meta))
  local l = redis.call('HGET', meta, 'l') or '0'
  redis.call('UNLINK', meta)
  redis.call('HSET', meta, 'c', at, 'n', at, 'l', l, 'f', l)
  return at
end

-- True when an entry stamped `s` with tags `tg` survived every namespace and tag
-- invalidation since its stamp. The clock must exist (clock_of) before.
local function valid(s, tg, meta)
  local fields = {'n'}
  for j = 1, #tg do fields[j + 1] = 't:' .. tg[j] end
  local ep = redis.call('HMGET', meta, unpack(fields))
  for j = 1, #ep do
    local x = tonumber(ep[j])
    if x and s < x then return false end
  end
  return true
end
"#;

/// Lookup over one or more keys of a namespace.
///
/// KEYS: meta, the namespace's wide write-lock set, then (entry, lease, key write-lock
/// set) per key.
/// ARGV: lease ms (0 = no lease), now (ns, decimal), then one "discard" value per key:
/// '' or the exact envelope bytes the client could not decode (deleted if still there).
/// Returns per key either {1, e, s, f, h} (fresh hit) or {0, stamp, lease id (0 =
/// none), leader (0/1), corrupt (0/1)[, e, s, f, h]} (miss, with the valid but
/// soft-expired entry when there is one). The stamp is the clock, or 0 (a poisoned
/// token: no fill with it is stored) while a write lock covers the key.
const LOOKUP_BODY: &str = r#"
local meta = KEYS[1]
local lease_ms = tonumber(ARGV[1]) or 0
local now = ARGV[2]
local clock = clock_of(meta)
local wall = now_ms()
local wide = locked(KEYS[2], wall)
local floor = nil
local out = {}
for i = 1, (#KEYS - 2) / 3 do
  local ek, lk, wk = KEYS[3 * i], KEYS[3 * i + 1], KEYS[3 * i + 2]
  local stamp = clock
  if wide or locked(wk, wall) then stamp = 0 end
  local discard = ARGV[2 + i] or ''
  local corrupt = 0
  local hit = nil
  local stale = nil
  local r = redis.pcall('HMGET', ek, 'e', 's', 't', 'f', 'h')
  if type(r) == 'table' and r.err then
    -- not a hash: garbage written by something else
    redis.call('DEL', ek)
    corrupt = 1
  elseif r[1] then
    if discard ~= '' and r[1] == discard then
      redis.call('DEL', ek)
      corrupt = 1
    else
      local s = tonumber(r[2])
      local tg = parse_tags(r[3])
      if (not s) or (not tg) or (not tonumber(r[4])) or (not tonumber(r[5])) then
        redis.call('DEL', ek)
        corrupt = 1
      elseif valid(s, tg, meta) then
        if dec_lt(now, r[4]) then
          hit = {1, r[1], r[2], r[4], r[5]}
        else
          stale = r
        end
      else
        redis.call('DEL', ek)
      end
    end
  end
  if hit then
    out[i] = hit
  else
    local miss
    if lease_ms <= 0 then
      miss = {0, stamp, 0, 1, corrupt}
    else
      if not floor then floor = tonumber(redis.call('HGET', meta, 'f')) or 0 end
      local held = tonumber(redis.call('GET', lk))
      if held and held > floor then
        miss = {0, stamp, 0, 0, corrupt}
      else
        local id = redis.call('HINCRBY', meta, 'l', 1)
        redis.call('SET', lk, d(id), 'PX', lease_ms)
        miss = {0, stamp, id, 1, corrupt}
      end
    end
    if stale then
      miss[6], miss[7], miss[8], miss[9] = stale[1], stale[2], stale[4], stale[5]
    end
    out[i] = miss
  end
end
return out
"#;

/// Guarded fill: refused when the key was invalidated since the token's stamp, when
/// the value's tags or the namespace were, or (the version guard) when the entry
/// stored holds a newer version and is still valid.
///
/// KEYS: entry, meta, lease, tombstone.
/// ARGV: stamp, ttl ms, lease id ('0' = none), e, t, f, h, version ('' = none), then
/// the value's tags.
/// Returns 1 (stored) or 0 (rejected).
const FILL_BODY: &str = r#"
local ek, meta, lk, xk = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local stamp = tonumber(ARGV[1])
if ARGV[3] ~= '0' and redis.call('GET', lk) == ARGV[3] then
  redis.call('DEL', lk)
end
local tomb = tonumber(redis.call('GET', xk))
if tomb and tomb > stamp then return 0 end
clock_of(meta)
local tg = {}
for j = 9, #ARGV do tg[#tg + 1] = ARGV[j] end
if not valid(stamp, tg, meta) then return 0 end
if ARGV[8] ~= '' and redis.call('TYPE', ek).ok == 'hash' then
  local held = redis.call('HMGET', ek, 'v', 's', 't')
  local hs, htags = tonumber(held[2]), parse_tags(held[3])
  if held[1] and held[1] ~= '' and hs and htags and valid(hs, htags, meta)
      and dec_lt(ARGV[8], held[1]) then
    return 0
  end
end
redis.call('DEL', ek)
redis.call('HSET', ek, 'e', ARGV[4], 's', ARGV[1], 't', ARGV[5], 'f', ARGV[6], 'h', ARGV[7], 'v', ARGV[8])
redis.call('PEXPIRE', ek, ARGV[2])
return 1
"#;

/// Unconditional store. It counts as an invalidation of the key: one clock tick, a
/// tombstone holding it, the lease voided; the entry is stamped with the tick, so no
/// fill that began earlier can overwrite it.
///
/// KEYS: entry, meta, lease, tombstone. ARGV: ttl ms, e, t, f, h, tombstone ms,
/// version ('' = none).
/// Returns the stamp.
const SET_BODY: &str = r#"
local at = d(tick(KEYS[2]))
redis.call('DEL', KEYS[3])
redis.call('SET', KEYS[4], at, 'PX', ARGV[6])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'e', ARGV[2], 's', at, 't', ARGV[3], 'f', ARGV[4], 'h', ARGV[5], 'v', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return tonumber(at)
"#;

/// Key invalidation: one clock tick, then per key: drop entry and lease, leave a
/// tombstone holding the tick.
///
/// KEYS: meta, then (entry, lease, tombstone) per key. ARGV: tombstone ms.
/// Returns the tick.
const DELETE_BODY: &str = r#"
local at = d(tick(KEYS[1]))
for i = 2, #KEYS, 3 do
  redis.call('DEL', KEYS[i], KEYS[i + 1])
  redis.call('SET', KEYS[i + 2], at, 'PX', ARGV[1])
end
return tonumber(at)
"#;

/// Tag invalidation: a clock tick becomes the tag's epoch. KEYS: meta. ARGV: tag.
/// Returns the tick.
const INVALIDATE_TAG_BODY: &str = r#"
return tonumber(bump_tag(KEYS[1], ARGV[1]))
"#;

/// Namespace invalidation: the epoch moves to a new tick, every lease granted so far is
/// voided (lease floor), and the tag epochs are dropped (the namespace epoch now
/// dominates them all). Entries are left to expire: lookups treat them as misses.
///
/// KEYS: meta. Returns the tick.
const INVALIDATE_NAMESPACE_BODY: &str = r#"
return tonumber(bump_namespace(KEYS[1]))
"#;

/// Write lock: invalidates the scope (as delete, invalidate_tag or invalidate_namespace
/// do) and adds the lock id to the scope's lock set with its expiry. Key tombstones live
/// the lock's ttl plus the tombstone ttl, so tokens issued before the lock stay refused
/// for as long as the lock's own poisoned ones.
///
/// KEYS: meta, then either (entry, lease, tombstone, key lock set) per key ('k' scope)
/// or the wide lock set ('t' and 'n' scopes).
/// ARGV: scope ('k', 't' or 'n'), lock id, lock ms, tombstone ms, tag (scope 't').
const LOCK_BODY: &str = r#"
local scope, id, lock_ms, tomb_ms = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local wall = now_ms()
local until_ms = d(wall + lock_ms)
invalidate_scope(scope, lock_ms + tomb_ms, function(set)
  redis.call('ZREMRANGEBYSCORE', set, '-inf', d(wall))
  redis.call('ZADD', set, until_ms, id)
  if redis.call('PTTL', set) < lock_ms then redis.call('PEXPIRE', set, lock_ms) end
end)
return 1
"#;

/// Write unlock: invalidates the scope once more (a fresh tick: tokens issued under the
/// lock may carry values read before the write committed), then removes the lock id.
///
/// KEYS and ARGV as for the lock (lock ms unused).
const UNLOCK_BODY: &str = r#"
local scope, id, tomb_ms = ARGV[1], ARGV[2], tonumber(ARGV[4])
invalidate_scope(scope, tomb_ms, function(set) redis.call('ZREM', set, id) end)
return 1
"#;

/// Shared by the lock and unlock scripts: invalidates the scope ('k': per key, drop
/// entry and lease and leave a tombstone living at least `tomb_for` ms; 't': tag bump
/// with ARGV[5]; 'n': namespace bump), calling `on_set` on each lock set it covers.
const LOCK_PRELUDE: &str = r#"
local function invalidate_scope(scope, tomb_for, on_set)
  local meta = KEYS[1]
  if scope == 'n' then
    bump_namespace(meta)
    on_set(KEYS[2])
  elseif scope == 't' then
    bump_tag(meta, ARGV[5])
    on_set(KEYS[2])
  else
    local at = d(tick(meta))
    for i = 2, #KEYS, 4 do
      redis.call('DEL', KEYS[i], KEYS[i + 1])
      if redis.call('PTTL', KEYS[i + 2]) < tomb_for then
        redis.call('SET', KEYS[i + 2], at, 'PX', tomb_for)
      else
        redis.call('SET', KEYS[i + 2], at, 'KEEPTTL')
      end
      on_set(KEYS[i + 3])
    end
  end
end
"#;

/// Sliding expiration of a valid entry.
///
/// KEYS: entry, meta. ARGV: soft expiry ns, hard expiry ns, ttl ms.
/// Returns 1 (extended), 0 (no valid entry) or 2 (a corrupt entry, deleted).
const TOUCH_BODY: &str = r#"
local ek, meta = KEYS[1], KEYS[2]
local r = redis.pcall('HMGET', ek, 'e', 's', 't')
if type(r) == 'table' and r.err then
  redis.call('DEL', ek)
  return 2
end
if not r[1] then return 0 end
local s = tonumber(r[2])
local tg = parse_tags(r[3])
if (not s) or (not tg) then
  redis.call('DEL', ek)
  return 2
end
clock_of(meta)
if not valid(s, tg, meta) then
  redis.call('DEL', ek)
  return 0
end
redis.call('HSET', ek, 'f', ARGV[1], 'h', ARGV[2])
redis.call('PEXPIRE', ek, ARGV[3])
return 1
"#;

/// Deletes an entry if its envelope still holds the given (undecodable) bytes.
///
/// KEYS: entry. ARGV: bytes. Returns 1 if deleted.
const DISCARD_BODY: &str = r#"
local cur = redis.pcall('HGET', KEYS[1], 'e')
if type(cur) == 'string' and cur == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

fn with_prelude(body: &str) -> String {
    let mut s = String::with_capacity(PRELUDE.len() + body.len());
    s.push_str(PRELUDE);
    s.push_str(body);
    s
}

/// Deletes the lease key only if it still holds the caller's lease id.
/// KEYS[1] lease key; ARGV[1] lease id.
const RELEASE_LEASE_BODY: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The tier's compiled scripts (hashed once).
pub(crate) struct TierScripts {
    pub(crate) lookup: redis::Script,
    pub(crate) fill: redis::Script,
    pub(crate) set: redis::Script,
    pub(crate) delete: redis::Script,
    pub(crate) invalidate_tag: redis::Script,
    pub(crate) invalidate_namespace: redis::Script,
    pub(crate) touch: redis::Script,
    pub(crate) discard: redis::Script,
    pub(crate) release_lease: redis::Script,
    pub(crate) lock: redis::Script,
    pub(crate) unlock: redis::Script,
}

impl TierScripts {
    pub(crate) fn new() -> Self {
        TierScripts {
            lookup: redis::Script::new(&with_prelude(LOOKUP_BODY)),
            fill: redis::Script::new(&with_prelude(FILL_BODY)),
            set: redis::Script::new(&with_prelude(SET_BODY)),
            delete: redis::Script::new(&with_prelude(DELETE_BODY)),
            invalidate_tag: redis::Script::new(&with_prelude(INVALIDATE_TAG_BODY)),
            invalidate_namespace: redis::Script::new(&with_prelude(INVALIDATE_NAMESPACE_BODY)),
            touch: redis::Script::new(&with_prelude(TOUCH_BODY)),
            discard: redis::Script::new(DISCARD_BODY),
            release_lease: redis::Script::new(RELEASE_LEASE_BODY),
            lock: redis::Script::new(&with_prelude(&format!("{LOCK_PRELUDE}{LOCK_BODY}"))),
            unlock: redis::Script::new(&with_prelude(&format!("{LOCK_PRELUDE}{UNLOCK_BODY}"))),
        }
    }
}
