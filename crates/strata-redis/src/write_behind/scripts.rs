//! The Lua scripts of [`RedisWriteBehindQueue`](super::RedisWriteBehindQueue): one per
//! port method, each run on the keys of whole groups (see [`layout`](super::layout)).
//!
//! Every script takes its groups as blocks of four `KEYS`: the group's counters hash
//! (`…q:c`, first, so a cluster routes by it), its schedule, dirty index and
//! dead-letter sorted sets (`…q:s`, `…q:d`, `…q:x`). The dead-letter stream (`…q:h`)
//! and the records (`…q:r:<key>`) are derived from the counters key: they share its
//! hash tag, so a script still touches one slot. On one server a fan-out script takes
//! every group in one call; on a Cluster it is called once per group.
//!
//! Nothing read is trusted (another program, a bad restore or a hand-made `HSET` may
//! have written under the prefix): a record whose value is readable but whose other
//! fields are not canonical is *repaired* (kept, given a fresh sequence, due at once:
//! the value is the latest save, so it is written rather than lost); a record without
//! a readable value (another type, no `v` field) is *dropped* (nothing can be
//! written). Counters that do not parse are recounted from the indexes, and an index
//! key of the wrong type is dropped (its keys are indexed again on their next save).
//! Every script answers the number of repairs and drops last, for the client's
//! counters and logs.

use crate::lua_source;
use crate::tier::lua::PCALL;

/// Shared helpers, after [`PCALL`].
const PRELUDE: &str = r#"
local function d(x)
  return string.format('%d', x)
end

-- A canonical decimal (digits, no leading zero) below 2^53, else nil (tonumber alone
-- takes '-1', '0x10', '1e3', 'inf').
local function num(x)
  if type(x) ~= 'string' or #x == 0 or #x > 16 or not string.find(x, '^%d+$') then return nil end
  if #x > 1 and string.byte(x) == 48 then return nil end
  local n = tonumber(x)
  if n >= 9007199254740992 then return nil end
  return n
end

local repaired, dropped = 0, 0

-- The server's clock, read once: every time the queue reports or compares is Redis's,
-- so instances whose clocks disagree agree on what is due.
local T = redis.call('TIME')
local NOW_US = tonumber(T[1]) * 1000000 + tonumber(T[2])
local NOW = math.floor(NOW_US / 1000)

local GROUPS = {}

-- Group `i` of KEYS (blocks of four). Index keys are type-checked by `ready` only where
-- the script writes or ranges over them.
local function group(i)
  if GROUPS[i] then return GROUPS[i] end
  local c = KEYS[4 * i - 3]
  local g = {c = c, s = KEYS[4 * i - 2], d = KEYS[4 * i - 1], x = KEYS[4 * i], base = string.sub(c, 1, -2)}
  g.h = g.base .. 'h'
  GROUPS[i] = g
  return g
end

local function ngroups()
  return #KEYS / 4
end

-- Drops index keys of the wrong type (a script must not fail on WRONGTYPE).
local function ready(g)
  if g.ready then return end
  for _, k in ipairs({g.s, g.d, g.x, g.h}) do
    local want = (k == g.h) and 'stream' or 'zset'
    local ty = redis.call('TYPE', k).ok
    if ty ~= 'none' and ty ~= want then
      redis.call('UNLINK', k)
      repaired = repaired + 1
    end
  end
  g.ready = true
end

local function rec_key(g, key)
  return g.base .. 'r:' .. key
end

local function bytes_of(g, key)
  local n = pc('HSTRLEN', rec_key(g, key), 'v')
  if type(n) ~= 'number' then return 0 end
  return n
end

-- The group's counters: n records (due, claimed or dead), b bytes of their values, db
-- bytes of the dead ones, q the last sequence handed out. Missing or not canonical:
-- recounted from the indexes (every record is in the schedule or the dead letters).
local function counters(g)
  if g.C then return g.C end
  local r = pc('HMGET', g.c, 'n', 'b', 'db', 'q')
  local existed = true
  if r.err then
    redis.call('UNLINK', g.c)
    repaired = repaired + 1
    r = {}
    existed = false
  end
  local n, b, db = num(r[1]), num(r[2]), num(r[3])
  local q = 0
  if r[4] then
    q = num(r[4])
    if not q then
      q = 0
      repaired = repaired + 1
    end
  end
  if not (n and b and db) or db > b then
    local live = pc('ZRANGE', g.s, 0, -1)
    local dead = pc('ZRANGE', g.x, 0, -1)
    if live.err then live = {} end
    if dead.err then dead = {} end
    n, b, db = #live + #dead, 0, 0
    for _, k in ipairs(live) do b = b + bytes_of(g, k) end
    for _, k in ipairs(dead) do
      local x = bytes_of(g, k)
      b, db = b + x, db + x
    end
    -- (A recount this run asked for was counted where it was asked.)
    if (r[1] or r[2] or r[3] or n > 0) and existed and not g.quiet then repaired = repaired + 1 end
    redis.call('HSET', g.c, 'n', d(n), 'b', d(b), 'db', d(db))
  end
  g.C = {n = n, b = b, db = db, q = q}
  return g.C
end

-- Adds to the counters (records, bytes, dead bytes).
local function bump(g, dn, db, ddb)
  local C = counters(g)
  C.n, C.b, C.db = math.max(0, C.n + dn), math.max(0, C.b + db), math.max(0, C.db + ddb)
  redis.call('HSET', g.c, 'n', d(C.n), 'b', d(C.b), 'db', d(C.db))
end

-- Counters to be recounted (a record vanished or changed state outside the scripts).
local function recount(g)
  redis.call('HDEL', g.c, 'n')
  g.C, g.quiet = nil, true
end

-- The next sequence of the group: the server's time in microseconds, or one above the
-- last one when the clock is not past it (a clock stepped back, a burst): it only
-- grows, even for a key whose record was deleted in between.
local function next_seq(g)
  local C = counters(g)
  local s = NOW_US
  if s <= C.q then s = C.q + 1 end
  C.q = s
  redis.call('HSET', g.c, 'q', d(s))
  return s
end

-- Takes `key` out of every index; a record that vanished while indexed is a repair.
local function forget(g, key)
  ready(g)
  local n = redis.call('ZREM', g.s, key) + redis.call('ZREM', g.d, key) + redis.call('ZREM', g.x, key)
  if n > 0 then
    repaired = repaired + 1
    recount(g)
  end
end

-- Makes a record whose value is readable sound again: fresh sequence, no attempts,
-- dirty and due now (the value is someone's latest save: written, not lost).
local function repair(g, rec)
  ready(g)
  rec.s, rec.a, rec.d, rec.st, rec.o, rec.r, rec.at = next_seq(g), 0, NOW, 'd', nil, nil, NOW
  redis.call('HDEL', rec.rk, 'o', 'r', 'e', 'xs', 'xa')
  redis.call('HSET', rec.rk, 's', d(rec.s), 'a', '0', 'd', d(NOW), 'st', 'd')
  redis.call('ZREM', g.x, rec.key)
  redis.call('ZADD', g.s, d(NOW), rec.key)
  redis.call('ZADD', g.d, d(NOW), rec.key)
  repaired = repaired + 1
  recount(g)
end

-- The record of `key`, checked, or nil. Fields: v value, s sequence, a failed attempts,
-- d dirty since (ms), st state ('d' due, 'c' claimed, 'x' dead), o claim owner, r when
-- it was saved again during the claim (ms), and for a dead letter e error, xs the
-- sequence that failed, xa when (ms). `at` is its schedule score (due time, or claim
-- end), read from the schedule, which is the one place it is kept.
local function read_rec(g, key)
  ready(g)
  local rk = rec_key(g, key)
  local r = pc('HMGET', rk, 'v', 's', 'a', 'd', 'st', 'o', 'r', 'e', 'xs', 'xa')
  if r.err or not r[1] then
    -- Not a hash, or one without a value: dropped (UNLINK says whether it was there).
    if redis.call('UNLINK', rk) == 1 then dropped = dropped + 1 end
    forget(g, key)
    return nil
  end
  local rec = {key = key, rk = rk, v = r[1], s = num(r[2]), a = num(r[3]), d = num(r[4]), st = r[5],
    o = r[6], r = r[7] and num(r[7]), e = r[8], xs = r[9] and num(r[9]), xa = r[10] and num(r[10])}
  local ok = rec.s and rec.a and rec.a < 4294967296 and rec.d and (r[7] == false or rec.r)
  if ok and rec.st == 'x' then
    ok = type(rec.e) == 'string' and rec.xs and rec.xa and redis.call('ZSCORE', g.x, key)
    if ok and redis.call('ZREM', g.s, key) + redis.call('ZREM', g.d, key) > 0 then
      repaired = repaired + 1
    end
  elseif ok and (rec.st == 'd' or (rec.st == 'c' and type(rec.o) == 'string')) then
    local at = redis.call('ZSCORE', g.s, key)
    rec.at = at and tonumber(at)
    ok = rec.at and true
    if ok and redis.call('ZREM', g.x, key) > 0 then repaired = repaired + 1 end
  else
    ok = false
  end
  if not ok then repair(g, rec) end
  return rec
end

-- Due at `at` (ms), unclaimed.
local function set_due(g, rec, at)
  redis.call('HSET', rec.rk, 'st', 'd')
  redis.call('HDEL', rec.rk, 'o')
  redis.call('ZADD', g.s, d(at), rec.key)
end
"#;

/// KEYS: the key's group, then (on one server, for the namespace-wide bound) every
/// other group. ARGV: key, value, delay ms, max entries, max bytes.
/// Returns {queued (1) or full (0), seq, replaced (0/1), repaired, dropped}.
const SAVE: &str = r#"
local g = group(1)
local key, val = ARGV[1], ARGV[2]
local delay, max_n, max_b = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local rec = read_rec(g, key)
local seq = next_seq(g)
local len = #val
if not rec then
  -- Only a new key is bounded: a save to a waiting key adds none.
  local n, b = 0, 0
  for i = 1, ngroups() do
    local C = counters(group(i))
    n, b = n + C.n, b + C.b
  end
  if n >= max_n or b + len > max_b then return {0, seq, 0, repaired, dropped} end
  redis.call('HSET', rec_key(g, key), 'v', val, 's', d(seq), 'a', '0', 'd', d(NOW), 'st', 'd')
  redis.call('ZADD', g.s, d(NOW + delay), key)
  redis.call('ZADD', g.d, d(NOW), key)
  bump(g, 1, len, 0)
  return {1, seq, 0, repaired, dropped}
end
local replaced = 1
redis.call('HSET', rec.rk, 'v', val, 's', d(seq))
bump(g, 0, len - #rec.v, 0)
-- Saved during a claim: once that flush is acknowledged, this save is what stays dirty,
-- dirty since now.
if rec.st == 'c' and not rec.r then redis.call('HSET', rec.rk, 'r', d(NOW)) end
if rec.st == 'x' then
  -- A new value for a dead letter gets a fresh start.
  replaced = 0
  redis.call('HSET', rec.rk, 'a', '0', 'd', d(NOW))
  redis.call('HDEL', rec.rk, 'e', 'xs', 'xa')
  redis.call('ZREM', g.x, key)
  set_due(g, rec, NOW + delay)
  redis.call('ZADD', g.d, d(NOW), key)
  bump(g, 0, 0, -#rec.v)
end
return {1, seq, replaced, repaired, dropped}
"#;

/// KEYS: the key's group. ARGV: key. Returns {value or nil, repaired, dropped}.
const PENDING: &str = r#"
local rec = read_rec(group(1), ARGV[1])
return {rec and rec.v or false, repaired, dropped}
"#;

/// KEYS: groups, visited in order. ARGV: owner, max, lease ms.
/// Returns {repaired, dropped, then key, value, seq, attempts, dirty since per claim}.
const CLAIM: &str = r#"
local owner, left, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {0, 0}
for i = 1, ngroups() do
  if left <= 0 then break end
  local g = group(i)
  ready(g)
  local due = redis.call('ZRANGEBYSCORE', g.s, '-inf', d(NOW), 'LIMIT', 0, left)
  for _, key in ipairs(due) do
    local rec = read_rec(g, key)
    if rec and rec.st ~= 'x' and rec.at <= NOW then
      -- The claim's end is its score: a claim that runs out is due again, for anyone.
      redis.call('HSET', rec.rk, 'st', 'c', 'o', owner)
      redis.call('HDEL', rec.rk, 'r')
      redis.call('ZADD', g.s, d(NOW + lease), key)
      for _, x in ipairs({key, rec.v, rec.s, rec.a, rec.d}) do out[#out + 1] = x end
      left = left - 1
    end
  end
end
out[1], out[2] = repaired, dropped
return out
"#;

/// KEYS: the key's group. ARGV: key, seq.
/// Returns {flushed (1) or newer (2), repaired, dropped}.
const ACK: &str = r#"
local g = group(1)
local key, seq = ARGV[1], tonumber(ARGV[2])
local rec = read_rec(g, key)
if not rec then return {1, repaired, dropped} end
if rec.s <= seq then
  redis.call('UNLINK', rec.rk)
  redis.call('ZREM', g.s, key)
  redis.call('ZREM', g.d, key)
  -- (The in-process queue keeps a dead letter whose record an ack removed; nothing
  -- would ever clear it, so it goes here.)
  redis.call('ZREM', g.x, key)
  bump(g, -1, -#rec.v, rec.st == 'x' and -#rec.v or 0)
  return {1, repaired, dropped}
end
-- Saved again during the flush: what is left to write is the newer value, dirty since
-- that save.
local since = rec.r or NOW
redis.call('HSET', rec.rk, 'a', '0', 'd', d(since))
redis.call('HDEL', rec.rk, 'r')
if rec.st ~= 'x' then
  set_due(g, rec, NOW)
  redis.call('ZADD', g.d, d(since), key)
end
return {2, repaired, dropped}
"#;

/// KEYS: the key's group. ARGV: key, owner, seq, backoff ms, error, max attempts,
/// permanent (0/1). Returns {not claimed (0), retrying (1) or dead (2), attempts,
/// repaired, dropped}.
const RETRY: &str = r#"
local g = group(1)
local key, owner, seq, backoff = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local err, max_attempts, permanent = ARGV[5], tonumber(ARGV[6]), ARGV[7] == '1'
local rec = read_rec(g, key)
if not rec or rec.st ~= 'c' or rec.o ~= owner then return {0, 0, repaired, dropped} end
if rec.s ~= seq then
  -- Saved again during the failed write: the newer value is tried after the back-off,
  -- its attempts counted from zero.
  set_due(g, rec, NOW + backoff)
  return {0, 0, repaired, dropped}
end
local a = rec.a + 1
if permanent or a >= max_attempts then
  -- History for operators, first: a denied XADD fails the call before anything changed.
  -- Best effort otherwise (capped, and nothing reads it back).
  pc('XADD', g.h, 'MAXLEN', '~', '10000', '*', 'key', key, 'seq', d(seq), 'attempts', d(a), 'error', err,
    'at', d(NOW))
  redis.call('HSET', rec.rk, 'a', d(a), 'st', 'x', 'e', err, 'xs', d(seq), 'xa', d(NOW))
  redis.call('HDEL', rec.rk, 'o', 'r')
  redis.call('ZREM', g.s, key)
  redis.call('ZREM', g.d, key)
  redis.call('ZADD', g.x, d(NOW), key)
  bump(g, 0, 0, #rec.v)
  return {2, a, repaired, dropped}
end
redis.call('HSET', rec.rk, 'a', d(a))
set_due(g, rec, NOW + backoff)
return {1, a, repaired, dropped}
"#;

/// KEYS: the key's group. ARGV: key, owner. Returns {repaired, dropped}.
const RELEASE: &str = r#"
local g = group(1)
local rec = read_rec(g, ARGV[1])
if rec and rec.st == 'c' and rec.o == ARGV[2] then set_due(g, rec, NOW) end
return {repaired, dropped}
"#;

/// KEYS: groups (the key's, when one key is given). ARGV: '1' and the key, or '0'.
/// Returns {changed, repaired, dropped}.
const MAKE_DUE: &str = r#"
local changed = 0
local function move(g, rec)
  if rec and rec.st == 'd' and rec.at > NOW then
    set_due(g, rec, NOW)
    changed = changed + 1
  end
end
if ARGV[1] == '1' then
  local g = group(1)
  move(g, read_rec(g, ARGV[2]))
else
  for i = 1, ngroups() do
    local g = group(i)
    ready(g)
    for _, key in ipairs(redis.call('ZRANGEBYSCORE', g.s, '(' .. d(NOW), '+inf')) do
      move(g, read_rec(g, key))
    end
  end
end
return {changed, repaired, dropped}
"#;

/// KEYS: groups. Returns {pending, pending bytes, dead, oldest dirty ms (-1: none),
/// now ms, repaired, dropped}.
const STATS: &str = r#"
local pending, bytes, dead, oldest = 0, 0, 0, -1
for i = 1, ngroups() do
  local g = group(i)
  ready(g)
  local C = counters(g)
  local x = redis.call('ZCARD', g.x)
  pending, bytes, dead = pending + math.max(0, C.n - x), bytes + math.max(0, C.b - C.db), dead + x
  local first = redis.call('ZRANGE', g.d, 0, 0, 'WITHSCORES')
  if first[2] then
    local at = tonumber(first[2])
    if at and (oldest < 0 or at < oldest) then oldest = at end
  end
end
return {pending, bytes, dead, oldest, NOW, repaired, dropped}
"#;

/// KEYS: groups. ARGV: max per group. Returns {repaired, dropped, then key, seq,
/// attempts, error, at per dead letter, oldest first within each group}.
const DEAD_LETTERS: &str = r#"
local max = tonumber(ARGV[1])
local out = {0, 0}
for i = 1, ngroups() do
  local g = group(i)
  ready(g)
  for _, key in ipairs(redis.call('ZRANGE', g.x, 0, max - 1)) do
    local rec = read_rec(g, key)
    if rec and rec.st == 'x' then
      for _, v in ipairs({key, rec.xs, rec.a, rec.e, rec.xa}) do out[#out + 1] = v end
    end
  end
end
out[1], out[2] = repaired, dropped
return out
"#;

/// KEYS: groups (the key's, when one key is given). ARGV: '1' and the key, or '0'.
/// Returns {requeued, repaired, dropped}.
const REQUEUE_DEAD: &str = r#"
local count = 0
local function requeue(g, rec)
  if not (rec and rec.st == 'x') then return end
  redis.call('HSET', rec.rk, 'a', '0')
  redis.call('HDEL', rec.rk, 'e', 'xs', 'xa')
  redis.call('ZREM', g.x, rec.key)
  set_due(g, rec, NOW)
  redis.call('ZADD', g.d, d(rec.d), rec.key)
  bump(g, 0, 0, -#rec.v)
  count = count + 1
end
if ARGV[1] == '1' then
  local g = group(1)
  requeue(g, read_rec(g, ARGV[2]))
else
  for i = 1, ngroups() do
    local g = group(i)
    ready(g)
    for _, key in ipairs(redis.call('ZRANGE', g.x, 0, -1)) do requeue(g, read_rec(g, key)) end
  end
end
return {count, repaired, dropped}
"#;

/// Over `maxmemory` (with nothing evictable), Redis refuses a script that may write
/// unless it carries this flag. Every script but the save has it: those that shrink or
/// move the queue must still run, so a full server drains; a save that grows it is
/// refused (an error the caller sees) instead of pushing the server further.
const ALLOW_OOM: &str = "#!lua flags=allow-oom\n";

/// The scripts, loaded once per queue (redis-rs sends `EVALSHA` and loads a script the
/// server lacks).
pub(crate) struct Scripts {
    pub(crate) save: redis::Script,
    pub(crate) pending: redis::Script,
    pub(crate) claim: redis::Script,
    pub(crate) ack: redis::Script,
    pub(crate) retry: redis::Script,
    pub(crate) release: redis::Script,
    pub(crate) make_due: redis::Script,
    pub(crate) stats: redis::Script,
    pub(crate) dead_letters: redis::Script,
    pub(crate) requeue_dead: redis::Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        let with = |flags: &str, body: &str| lua_source::script(&format!("{flags}{PCALL}{PRELUDE}{body}"));
        Scripts {
            save: with("#!lua\n", SAVE),
            pending: with(ALLOW_OOM, PENDING),
            claim: with(ALLOW_OOM, CLAIM),
            ack: with(ALLOW_OOM, ACK),
            retry: with(ALLOW_OOM, RETRY),
            release: with(ALLOW_OOM, RELEASE),
            make_due: with(ALLOW_OOM, MAKE_DUE),
            stats: with(ALLOW_OOM, STATS),
            dead_letters: with(ALLOW_OOM, DEAD_LETTERS),
            requeue_dead: with(ALLOW_OOM, REQUEUE_DEAD),
        }
    }
}
