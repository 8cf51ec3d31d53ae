//! The Lua helpers prepended to every tier script (see [`scripts`](super::scripts)):
//! reading and checking the meta hash, entries, leases and write-lock sets, and the
//! clock and epoch updates.
//!
//! Every value read from Redis is checked before use, since anything may have written
//! under the tier's keys (see "Poisoned keys" in the [`tier`](super) docs): a numeric
//! field must be a canonical decimal in range, a key must have the type the tier gives
//! it. A script never fails on what it reads: a corrupt entry is deleted (the caller
//! reports it as undecodable), a corrupt meta hash is rebuilt as if it had been lost,
//! and a corrupt lease, tombstone or lock set is dropped or replaced (`repaired`).

/// `pc`: what every tier script uses instead of `redis.pcall` (first in every script).
pub(crate) const PCALL: &str = r#"
-- redis.pcall, except that a refused permission is raised: a command the ACL denies must
-- fail the call with an error naming the command (Redis 7.0 names none), not read as a
-- corrupt key.
local function pc(cmd, ...)
  local r = redis.pcall(cmd, ...)
  if type(r) == 'table' and r.err
    and (string.find(r.err, 'NOPERM', 1, true) or string.find(r.err, "can't run this command", 1, true)) then
    local c = string.lower(cmd)
    error({err = 'NOPERM the Redis ACL user may not run ' .. c .. ': grant +' .. c .. ' (' .. r.err .. ')'})
  end
  return r
end

"#;

/// The longest entry head the scripts parse, and the plain read too (`plain_read.rs`).
pub(crate) const HEAD_MAX: usize = 128;

/// The most MAC bytes an entry read in one call may carry (the tier's MACs have 32):
/// the plain read's bound and the scripts' one read of an entry (`read_entry`) leave
/// room for them.
pub(crate) const MAC_MAX: usize = 64;

/// Lua helpers prepended to every tier script, after `local ENVELOPE_FORMAT = <byte>`,
/// `local MAX_TAG_EPOCHS = <n>`, `local MAX_TOMBS = <n>`, `local HEAD_MAX = <n>`,
/// `local MAC_MAX = <n>` and [`PCALL`].
pub(crate) const PRELUDE: &str = r#"
local function d(x)
  return string.format('%d', x)
end

-- The server's time, read once per run (a script runs atomically: one instant serves
-- the clock tick, the tombstone generation's age and a lock's expiry alike).
local TIME_NOW = nil
local function server_time()
  if not TIME_NOW then TIME_NOW = redis.call('TIME') end
  return TIME_NOW
end

-- What this run found corrupt: `repaired` counts the keys it rebuilt or dropped (meta
-- hash, leases, tombstones, lock sets), `corrupt` the entries it deleted as corrupt.
local repaired, corrupt = 0, 0

-- A clock value, stamp, epoch or lease id: a canonical decimal (digits, no leading
-- zero) below 2^53, the integers a Lua number holds exactly. The number, else nil.
-- (tonumber alone would take '-1', '0x10', '1e30', 'inf' and 'nan'.)
local function num(x)
  if type(x) ~= 'string' or #x == 0 or #x > 16 or not string.find(x, '^%d+$') then return nil end
  if #x > 1 and string.byte(x) == 48 then return nil end
  local n = tonumber(x)
  if n >= 9007199254740992 then return nil end
  return n
end

-- An expiry (ns since the epoch) or a row version: a canonical decimal u64.
local function is_u64(x)
  if type(x) ~= 'string' or #x == 0 or #x > 20 or not string.find(x, '^%d+$') then return false end
  if #x > 1 and string.byte(x) == 48 then return false end
  return #x < 20 or x <= '18446744073709551615'
end

-- The meta hash as this run checked it: c (clock), n (namespace epoch), l (lease
-- counter), f (lease floor), tf (tag floor: tagged stamps below it are invalid, the
-- highest tag epoch pruned so far; see prune_tags), and the tombstone bookkeeping (see
-- bury): xg (current generation, 0 or 1), x0 / x1 (the tick each generation started
-- at; nil when it does not exist), xw (server ms the current one started), xf
-- (tombstone floor: no fill with a stamp below it is stored).
local M = nil

-- The two tombstone generation hashes sit beside the meta hash `<base>m`: `<base>x0`
-- and `<base>x1` (derived, not passed: they share the namespace's hash tag, so one slot).
local function tomb_gen(meta, g)
  return string.sub(meta, 1, -2) .. 'x' .. g
end

-- The key of the entry `ek` (`<base>e:<key>`), as tombstones name it.
local function tomb_field(meta, ek)
  return string.sub(ek, #meta + 2)
end

-- strata 0.1's tombstone of that key (LEGACY_TOMBS).
local function legacy_tomb(meta, field)
  return string.sub(meta, 1, -2) .. 'x:' .. field
end

-- Creates the meta hash anew, as after a loss: the clock, the namespace epoch and the
-- lease counter start at the server's time in microseconds, or just above `above` (the
-- clock it replaces, when that was still readable). Clocks start there and tick once
-- per invalidation, so every older entry and fill token is invalid: the namespace
-- comes back cold, never stale. Leases granted before keep their (lower) ids.
local function new_meta(meta, above)
  local t = server_time()
  local base = tonumber(t[1]) * 1000000 + tonumber(t[2])
  if above and above >= base then base = above + 1 end
  redis.call('UNLINK', meta, tomb_gen(meta, 0), tomb_gen(meta, 1))
  redis.call('HSET', meta, 'c', d(base), 'n', d(base), 'l', d(base))
  M = {c = base, n = base, l = base, f = 0, tf = 0, xf = 0}
  return base
end

-- A corrupt meta hash is rebuilt like a lost one, and counted.
local function repair_meta(meta, above)
  repaired = repaired + 1
  return new_meta(meta, above)
end

-- The namespace clock. Reads and checks the meta hash once per run: created when
-- missing, rebuilt when corrupt (not a hash, a field that does not parse, an epoch or
-- floor above what it bounds, anything without a clock).
local function clock_of(meta)
  if M then return M.c end
  local r = pc('HMGET', meta, 'c', 'n', 'l', 'f', 'tf', 'xg', 'x0', 'x1', 'xw', 'xf')
  if r.err then return repair_meta(meta) end
  if not r[1] then
    -- A hash without a clock is corrupt; no hash at all was lost (or never made).
    if redis.call('UNLINK', meta) == 1 then return repair_meta(meta) end
    return new_meta(meta)
  end
  local c, n = num(r[1]), num(r[2])
  local l, f, tf, xf = 0, 0, 0, 0
  if r[3] then l = num(r[3]) end
  if r[4] then f = num(r[4]) end
  if r[5] then tf = num(r[5]) end
  if r[10] then xf = num(r[10]) end
  local xg, x0, x1, xw = nil, nil, nil, nil
  if r[6] then xg = ({['0'] = 0, ['1'] = 1})[r[6]] end
  if r[7] then x0 = num(r[7]) end
  if r[8] then x1 = num(r[8]) end
  if r[9] then xw = num(r[9]) end
  if not (c and n and l and f and tf and xf) or n > c or f > l or tf > c or xf > c
      or (r[6] and not xg) or (r[7] and (not x0 or x0 > c)) or (r[8] and (not x1 or x1 > c))
      or (r[9] and not xw) or (xg and not ({x0, x1})[xg + 1]) then
    return repair_meta(meta, c)
  end
  M = {c = c, n = n, l = l, f = f, tf = tf, xg = xg, x0 = x0, x1 = x1, xw = xw, xf = xf}
  return c
end

-- Advances the clock to the server's time in microseconds, or by one if it is already
-- there; returns the new value. A clock kept at the time (it only runs ahead at over a
-- million invalidations a second) means an invalidation made after a failover ticks
-- above every stamp the old master handed out, even if the replica it promoted missed
-- the old master's last ticks: its tombstone refuses their fills.
local function tick(meta)
  clock_of(meta)
  local t = server_time()
  local at = tonumber(t[1]) * 1000000 + tonumber(t[2])
  if at <= M.c then at = M.c + 1 end
  redis.call('HSET', meta, 'c', d(at))
  M.c = at
  return at
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
    local n = num(string.sub(t, i, c - 1))
    if not n or c + n > len then return nil end
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
  local t = server_time()
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Drops key `k`, found corrupt, and counts it as repaired.
local function drop_key(k)
  redis.call('UNLINK', k)
  repaired = repaired + 1
end

-- True when the write-lock set `k` (members: lock ids, scores: expiry ms) holds a
-- lock. A lock set lives no shorter than its latest lock (the lock script extends its
-- expiry to past the lock's), an unlock removes its id and an emptied set is gone, so
-- a set that exists holds a live lock or one whose holder died without unlocking while
-- a later or longer lock keeps the set: counting its members (ZCARD, without the
-- server's time) errs only towards poisoning a token, never towards missing a lock.
-- Anything else at `k` (another type; a set without expiry, since locks always expire)
-- is dropped: no lock.
local function locked(k)
  local n = pc('ZCARD', k)
  if type(n) ~= 'number' or (n > 0 and redis.call('PTTL', k) < 0) then
    drop_key(k)
    return false
  end
  return n > 0
end

-- Readies `k` for a lock or unlock: drops whatever `locked` would not take as a lock set.
local function lock_set(k)
  local ty = redis.call('TYPE', k).ok
  if ty ~= 'none' and (ty ~= 'zset' or redis.call('PTTL', k) < 0) then drop_key(k) end
end

-- The id of the live lease at `lk`, or nil. Anything there but a lease this namespace
-- granted (another type, not an id, an id above the lease counter, no expiry) is
-- dropped. The meta hash must have been read (clock_of) before.
local function lease_of(lk)
  local v = pc('GET', lk)
  if not v then return nil end
  local id = type(v) == 'string' and num(v)
  if not id or id > M.l or redis.call('PTTL', lk) < 0 then
    drop_key(lk)
    return nil
  end
  if id <= M.f then return nil end
  return id
end

-- Tag-epoch pruning, once the meta hash holds more than MAX_TAG_EPOCHS tag epochs:
-- the older ones are dropped, about half of them, and the tag floor `tf` rises to the
-- highest epoch dropped. `valid` refuses a tagged stamp below the floor: an entry or
-- token that a dropped epoch e invalidated has a stamp below e, so below the floor, and
-- stays invalid (other tagged entries below it are refused too: they load again, which
-- is safe). The floor is the median of a sample of 255 epochs (HRANDFIELD; a full sort
-- made a pruning of 10,000 tags twice as long), at least the sample's oldest, so every
-- pruning drops something. O(n) once per about MAX_TAG_EPOCHS / 2 new tags. Fields that
-- are neither tags nor the tier's own are left alone (they only make the next bump
-- look again). A tag epoch that does not parse or lies above the clock makes the meta
-- hash corrupt, as in `valid`.
local function prune_tags(meta)
  local c = M.c
  local sample = redis.call('HRANDFIELD', meta, 255, 'WITHVALUES')
  local picked = {}
  for i = 1, #sample, 2 do
    if string.sub(sample[i], 1, 2) == 't:' then picked[#picked + 1] = num(sample[i + 1]) or c + 1 end
  end
  if #picked == 0 then return end
  table.sort(picked)
  local floor = picked[math.ceil(#picked / 2)]
  local drop = {}
  local all = redis.call('HGETALL', meta)
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 2) == 't:' then
      local x = num(all[i + 1])
      if not x or x > c then
        repair_meta(meta, c)
        return
      end
      if x <= floor then drop[#drop + 1] = all[i] end
    end
  end
  for j = 1, #drop, 1000 do
    redis.call('HDEL', meta, unpack(drop, j, math.min(j + 999, #drop)))
  end
  if floor > M.tf then
    redis.call('HSET', meta, 'tf', d(floor))
    M.tf = floor
  end
end

-- Tag invalidation: a clock tick becomes the tag's epoch; past MAX_TAG_EPOCHS tags the
-- older part is pruned behind the tag floor (HLEN is O(1): the common bump stays O(1)).
-- Returns the tick.
local function bump_tag(meta, tag)
  local at = tick(meta)
  redis.call('HSET', meta, 't:' .. tag, d(at))
  if redis.call('HLEN', meta) > MAX_TAG_EPOCHS + 10 then prune_tags(meta) end
  return at
end

-- Namespace invalidation: the epoch moves to a new tick, every lease granted so far is
-- voided (lease floor), and the tag epochs and tag floor are dropped (the namespace
-- epoch now dominates them all: the floor is at most the old clock). Returns the tick.
local function bump_namespace(meta)
  local at = tick(meta)
  redis.call('UNLINK', meta, tomb_gen(meta, 0), tomb_gen(meta, 1))
  redis.call('HSET', meta, 'c', d(at), 'n', d(at), 'l', d(M.l), 'f', d(M.l))
  M.n, M.f, M.tf = at, M.l, 0
  M.xg, M.x0, M.x1, M.xw, M.xf = nil, nil, nil, nil, 0
  return at
end

-- Key tombstones: the tick of each key's last invalidation, which a fill that took its
-- token earlier is checked against. They live in two generation hashes without a TTL
-- (`tomb_gen`), fields `<key>` -> tick plus `_` -> the tick the generation started
-- at, so that eviction under `volatile-*` cannot reach them, and a loss under
-- `allkeys-*` (or a DEL, a FLUSHALL) is seen rather than read as "never invalidated":
-- a generation the meta hash records whose `_` is gone or wrong. A new generation
-- starts when the current one is older than the tombstone ttl or holds MAX_TOMBS keys;
-- the one before it is then dropped, and the floor `xf` rises to the start of the one
-- kept: a token older than that might have needed a dropped tombstone, so it is
-- refused (it is at least one generation old: ttl, or MAX_TOMBS invalidations).
-- With LEGACY_TOMBS, each tombstone is also written, and read, where the previous
-- release kept it (`<base>x:<key>`, with the tombstone ttl), so that instances of both
-- releases guard each other's fills during a rolling deploy.

-- Forgets every tombstone behind a fresh tick: every token handed out so far is
-- refused, as if each key had been invalidated now (a loss is never read as "no
-- invalidation"). Counted as a repair.
local function lose_tombs(meta)
  local at = tick(meta)
  redis.call('UNLINK', tomb_gen(meta, 0), tomb_gen(meta, 1))
  redis.call('HDEL', meta, 'xg', 'x0', 'x1', 'xw')
  redis.call('HSET', meta, 'xf', d(at))
  M.xg, M.x0, M.x1, M.xw, M.xf = nil, nil, nil, nil, at
  repaired = repaired + 1
end

-- True when generation `g`, which the meta hash records, is still what it wrote.
local function gen_intact(meta, g, field)
  local r = pc('HMGET', tomb_gen(meta, g), '_', field or '_')
  if r.err or r[1] ~= d(M['x' .. g]) then return false, nil end
  return true, r[2]
end

-- Starts generation `g` (emptied) at the current clock.
local function start_gen(meta, g, wall)
  local k = tomb_gen(meta, g)
  redis.call('UNLINK', k)
  redis.call('HSET', k, '_', d(M.c))
  redis.call('HSET', meta, 'x' .. g, d(M.c), 'xg', d(g), 'xw', d(wall))
  M['x' .. g], M.xg, M.xw = M.c, g, wall
end

-- Records that the key whose entry is `ek` was invalidated at tick `at` (taken by the
-- caller, so at least the clock the current generation started at), rotating the
-- generations first when the current one is older than `ms` or full.
local function bury(meta, ek, at, ms)
  clock_of(meta)
  local wall = now_ms()
  local g = M.xg
  if g ~= nil and not gen_intact(meta, g) then
    lose_tombs(meta)
    g = nil
  end
  if g == nil then
    start_gen(meta, 0, wall)
    g = 0
  elseif wall - M.xw >= tonumber(ms) or redis.call('HLEN', tomb_gen(meta, g)) > MAX_TOMBS then
    local o = 1 - g
    if M['x' .. o] and M['x' .. g] > M.xf then
      M.xf = M['x' .. g]
      redis.call('HSET', meta, 'xf', d(M.xf))
    end
    start_gen(meta, o, wall)
    g = o
  end
  local field = tomb_field(meta, ek)
  redis.call('HSET', tomb_gen(meta, g), field, d(at))
  if LEGACY_TOMBS then
    redis.call('SET', legacy_tomb(meta, field), d(at), 'PX', ms)
  end
end

-- True when the key whose entry is `ek` was invalidated after `stamp`, or may have
-- been: the stamp is below the tombstone floor, or a generation is lost or holds
-- something this tier did not write (then every tombstone is forgotten: lose_tombs).
local function buried_after(meta, ek, stamp)
  clock_of(meta)
  if stamp < M.xf then return true end
  local field = tomb_field(meta, ek)
  for g = 0, 1 do
    if M['x' .. g] then
      local ok, v = gen_intact(meta, g, field)
      local at = v and num(v)
      if not ok or (v and (not at or at > M.c)) then
        lose_tombs(meta)
        return true
      end
      if at and at > stamp then return true end
    end
  end
  if LEGACY_TOMBS then
    -- The previous release's tombstone (a key with a TTL), written by its instances
    -- during a rolling deploy: anything there that is not a tick at or below the stamp
    -- refuses the fill.
    local old = pc('GET', legacy_tomb(meta, field))
    if old and (type(old) ~= 'string' or not num(old) or num(old) > stamp) then return true end
  end
  return false
end

-- True when what is stamped `s` with tags `tg` (an entry, a fill token) survived every
-- namespace and tag invalidation since its stamp. A stamp above the clock was handed
-- out by an earlier clock (before the meta hash was lost or rebuilt): not valid. A
-- tagged stamp below the tag floor may have been invalidated by a pruned epoch: not
-- valid (untagged stamps skip it: their cost is unchanged). A tag
-- epoch that does not parse, or is above the clock, makes the meta hash corrupt: it is
-- rebuilt, and then nothing older is valid.
local function valid(s, tg, meta)
  local c = clock_of(meta)
  if s > c or s < M.n then return false end
  if #tg > 0 and s < M.tf then return false end
  for j = 1, #tg, 1000 do
    local fields = {}
    for k = j, math.min(j + 999, #tg) do fields[#fields + 1] = 't:' .. tg[k] end
    local ep = redis.call('HMGET', meta, unpack(fields))
    for k = 1, #ep do
      if ep[k] then
        local x = num(ep[k])
        if not x or x > c then
          repair_meta(meta, c)
          return false
        end
        if s < x then return false end
      end
    end
  end
  return true
end

-- An entry is one string (one allocation, where a hash with a field over 64 bytes
-- costs a hash table of its fields): a head `<s>,<f>,<h>,<v>,<tags len>,<mac len>;`
-- (stamp, soft and hard expiry in ns, the version or nothing), then the tags as the
-- `t` field writes them, the MAC (if any) and the envelope. HEAD_MAX (prepended) is
-- the longest head read.

local function entry_string(s, f, h, v, t, m, e)
  return s .. ',' .. f .. ',' .. h .. ',' .. v .. ',' .. #t .. ',' .. #m .. ';' .. t .. m .. e
end

-- The head of an entry: its six fields and the offset where the tags start, or nil.
-- One anchored match (no iterator, no copy of the head) reads and splits it.
local function entry_head(x)
  local s, f, h, v, t, m, at = string.match(x, '^([^,;]*),([^,;]*),([^,;]*),([^,;]*),(%d+),(%d+);()')
  if not s or at - 1 > HEAD_MAX or not (t == '0' or num(t)) or not (m == '0' or num(m)) then return nil end
  return {s, f, h, v, t, m}, at
end

-- Reads the entry at `ek`, checking every field a script or the client parses.
-- Returns its fields {e, s, t, f, h, v, m} (e and the MAC m only `with_e`, else true
-- and nothing; m is nil when there is none), its stamp and its tags; nil when there is
-- no entry (an empty string reads as none: no release writes one, and the next fill
-- replaces it); false when it was corrupt and has been deleted (the caller counts it):
-- not a string, a head that does not parse, an empty envelope or one over `max` bytes,
-- a bad format byte, a stamp, tag list, expiry or version that does not parse, a stamp
-- above the clock.
local function read_entry(ek, meta, max, with_e)
  -- One bounded read: with the envelope, up to `max` bytes of it plus the longest head
  -- and MAC, so that an entry that fits is read whole in one call (the hit path's cost,
  -- and a miss's: a missing key reads as ''); without, the head. A longer entry is
  -- measured (STRLEN) before it is read, so an oversized value is never copied into
  -- the script whole.
  local limit = HEAD_MAX
  -- (A Redis string holds at most 512 MB: a larger `max` reads every entry whole.)
  if with_e then limit = math.min(max, 536870912) + HEAD_MAX + MAC_MAX end
  local x = pc('GETRANGE', ek, 0, d(limit - 1))
  if type(x) ~= 'string' then
    -- strata 0.1 stored entries as hashes: during a rolling deploy one is a plain miss.
    local old = redis.call('TYPE', ek).ok == 'hash' and pc('HEXISTS', ek, 'e') == 1
    redis.call('UNLINK', ek)
    if old then return nil end
    return false
  end
  if x == '' then return nil end
  local whole = #x < limit
  local p, at = entry_head(x)
  local tl, ml, elen = 0, 0, 0
  if p then
    tl, ml = tonumber(p[5]), tonumber(p[6])
    elen = (whole and #x or redis.call('STRLEN', ek)) - (at - 1) - tl - ml
  end
  if not p or elen <= 0 or elen > max then
    redis.call('UNLINK', ek)
    return false
  end
  local r
  if with_e then
    if not whole then x = redis.call('GET', ek) end
    local m = nil
    if ml > 0 then m = string.sub(x, at + tl, at + tl + ml - 1) end
    r = {string.sub(x, at + tl + ml), p[1], string.sub(x, at, at + tl - 1), p[2], p[3], p[4], m}
  else
    local t = ''
    if tl > 0 then
      if at + tl - 1 <= #x then
        t = string.sub(x, at, at + tl - 1)
      else
        t = redis.call('GETRANGE', ek, at - 1, at + tl - 2)
      end
    end
    r = {true, p[1], t, p[2], p[3], p[4]}
  end
  local s, tg = num(r[2]), parse_tags(r[3])
  if not (s and tg and is_u64(r[4]) and is_u64(r[5]) and (r[6] == '' or is_u64(r[6])))
      or (with_e and string.byte(r[1]) ~= ENVELOPE_FORMAT) or s > clock_of(meta) then
    redis.call('UNLINK', ek)
    return false
  end
  return r, s, tg
end
"#;
