//! The Lua scripts of the tier and of the stream backplane. Every multi-step operation
//! is one script, so Redis runs it atomically.
//!
//! Conventions shared with `tier.rs` (see the crate docs for the full layout):
//! namespace meta hash fields `c` (invalidation clock), `n` (namespace epoch), `l` (lease
//! counter), `f` (lease floor: leases with an id at or below it were voided by a
//! namespace invalidation); tag epochs hash: tag → clock value of its last
//! invalidation; entry hash fields `e` (envelope), `s` (stamp), `t` (tags), `f` (soft
//! expiry, ns), `h` (hard expiry, ns).

/// Lua helpers prepended to the tier scripts.
const PRELUDE: &str = r#"
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

-- True when an entry stamped `s` with tags `tg` survived every namespace and tag
-- invalidation since its stamp.
local function valid(s, tg, ns_epoch, tagh)
  if s < ns_epoch then return false end
  if #tg > 0 then
    local ep = redis.call('HMGET', tagh, unpack(tg))
    for j = 1, #tg do
      local x = tonumber(ep[j])
      if x and s < x then return false end
    end
  end
  return true
end
"#;

/// Lookup over one or more keys of a namespace.
///
/// KEYS: meta, tags, then (entry, lease) per key.
/// ARGV: lease ms (0 = no lease), now (ns, decimal), then one "discard" value per key:
/// '' or the exact envelope bytes the client could not decode (deleted if still there).
/// Returns per key either {1, e, s, f, h} (fresh hit) or {0, clock, lease id (0 =
/// none), leader (0/1), corrupt (0/1)[, e, s, f, h]} (miss, with the valid but
/// soft-expired entry when there is one).
const LOOKUP_BODY: &str = r#"
local meta, tagh = KEYS[1], KEYS[2]
local lease_ms = tonumber(ARGV[1]) or 0
local now = ARGV[2]
local ns_epoch = tonumber(redis.call('HGET', meta, 'n')) or 0
local clock = nil
local floor = nil
local out = {}
for i = 1, (#KEYS - 2) / 2 do
  local ek, lk = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
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
      elseif valid(s, tg, ns_epoch, tagh) then
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
    if not clock then clock = redis.call('HGET', meta, 'c') or '0' end
    local miss
    if lease_ms <= 0 then
      miss = {0, clock, 0, 1, corrupt}
    else
      if not floor then floor = tonumber(redis.call('HGET', meta, 'f')) or 0 end
      local held = tonumber(redis.call('GET', lk))
      if held and held > floor then
        miss = {0, clock, 0, 0, corrupt}
      else
        local id = redis.call('HINCRBY', meta, 'l', 1)
        redis.call('SET', lk, id, 'PX', lease_ms)
        miss = {0, clock, id, 1, corrupt}
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

/// Guarded fill.
///
/// KEYS: entry, meta, tags, lease, tombstone.
/// ARGV: stamp, ttl ms, lease id ('0' = none), e, t, f, h, then the value's tags.
/// Returns 1 (stored) or 0 (rejected).
const FILL_BODY: &str = r#"
local ek, meta, tagh, lk, xk = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local stamp = tonumber(ARGV[1])
if ARGV[3] ~= '0' and redis.call('GET', lk) == ARGV[3] then
  redis.call('DEL', lk)
end
local tomb = tonumber(redis.call('GET', xk))
if tomb and tomb > stamp then return 0 end
local ns_epoch = tonumber(redis.call('HGET', meta, 'n')) or 0
local tg = {}
for j = 8, #ARGV do tg[#tg + 1] = ARGV[j] end
if not valid(stamp, tg, ns_epoch, tagh) then return 0 end
redis.call('DEL', ek)
redis.call('HSET', ek, 'e', ARGV[4], 's', ARGV[1], 't', ARGV[5], 'f', ARGV[6], 'h', ARGV[7])
redis.call('PEXPIRE', ek, ARGV[2])
return 1
"#;

/// Unconditional store. It counts as an invalidation of the key: one clock tick, a
/// tombstone holding it, the lease voided; the entry is stamped with the tick, so no
/// fill that began earlier can overwrite it.
///
/// KEYS: entry, meta, lease, tombstone. ARGV: ttl ms, e, t, f, h, tombstone ms.
/// Returns the stamp.
const SET_BODY: &str = r#"
local at = redis.call('HINCRBY', KEYS[2], 'c', 1)
redis.call('DEL', KEYS[3])
redis.call('SET', KEYS[4], at, 'PX', ARGV[6])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'e', ARGV[2], 's', at, 't', ARGV[3], 'f', ARGV[4], 'h', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return at
"#;

/// Key invalidation: one clock tick, then per key: drop entry and lease, leave a
/// tombstone holding the tick.
///
/// KEYS: meta, then (entry, lease, tombstone) per key. ARGV: tombstone ms.
/// Returns the tick.
const DELETE_BODY: &str = r#"
local at = redis.call('HINCRBY', KEYS[1], 'c', 1)
for i = 2, #KEYS, 3 do
  redis.call('DEL', KEYS[i], KEYS[i + 1])
  redis.call('SET', KEYS[i + 2], at, 'PX', ARGV[1])
end
return at
"#;

/// Tag invalidation. KEYS: meta, tags. ARGV: tag. Returns the tick.
const INVALIDATE_TAG_BODY: &str = r#"
local at = redis.call('HINCRBY', KEYS[1], 'c', 1)
redis.call('HSET', KEYS[2], ARGV[1], at)
return at
"#;

/// Namespace invalidation: the epoch moves to a new tick, every lease granted so far is
/// voided (lease floor), and the tag epochs are dropped (the namespace epoch now
/// dominates them all). Entries are left to expire: lookups treat them as misses.
///
/// KEYS: meta, tags. Returns the tick.
const INVALIDATE_NAMESPACE_BODY: &str = r#"
local at = redis.call('HINCRBY', KEYS[1], 'c', 1)
local l = redis.call('HGET', KEYS[1], 'l') or '0'
redis.call('HSET', KEYS[1], 'n', at, 'f', l)
redis.call('DEL', KEYS[2])
return at
"#;

/// Sliding expiration of a valid entry.
///
/// KEYS: entry, meta, tags. ARGV: soft expiry ns, hard expiry ns, ttl ms.
/// Returns 1 (extended), 0 (no valid entry) or 2 (a corrupt entry, deleted).
const TOUCH_BODY: &str = r#"
local ek, meta, tagh = KEYS[1], KEYS[2], KEYS[3]
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
local ns_epoch = tonumber(redis.call('HGET', meta, 'n')) or 0
if not valid(s, tg, ns_epoch, tagh) then
  redis.call('DEL', ek)
  return 0
end
redis.call('HSET', ek, 'f', ARGV[1], 'h', ARGV[2])
redis.call('PEXPIRE', ek, ARGV[3])
return 1
"#;

/// Stream backplane publish: number the entry, append it, cap the stream.
///
/// KEYS: stream, counter. ARGV: max len, message bytes. Returns the entry's number.
pub(crate) const STREAM_PUBLISH: &str = r#"
local n = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'm', ARGV[2], 'n', n)
return n
"#;

/// Where a new subscriber starts: the last entry's id and the counter, atomically.
///
/// KEYS: stream, counter. Returns {last id or '0-0', counter}.
pub(crate) const STREAM_START: &str = r#"
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local id = '0-0'
if #last > 0 then id = last[1][1] end
return {id, redis.call('GET', KEYS[2]) or '0'}
"#;

/// Catch-up read after a reconnect: entries after the last id seen, and the counter,
/// atomically (so a trailing loss is told apart from a publish racing the read).
///
/// KEYS: stream, counter. ARGV: last id, count. Returns {counter, entries}.
pub(crate) const STREAM_CATCH_UP: &str = r#"
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
return {redis.call('GET', KEYS[2]) or '0', entries}
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
}

impl TierScripts {
    pub(crate) fn new() -> Self {
        TierScripts {
            lookup: redis::Script::new(&with_prelude(LOOKUP_BODY)),
            fill: redis::Script::new(&with_prelude(FILL_BODY)),
            set: redis::Script::new(SET_BODY),
            delete: redis::Script::new(DELETE_BODY),
            invalidate_tag: redis::Script::new(INVALIDATE_TAG_BODY),
            invalidate_namespace: redis::Script::new(INVALIDATE_NAMESPACE_BODY),
            touch: redis::Script::new(&with_prelude(TOUCH_BODY)),
            discard: redis::Script::new(DISCARD_BODY),
        }
    }
}
