//! The Lua scripts of the tier. Every multi-step operation is one script, so Redis runs
//! it atomically.
//!
//! Conventions shared with the [`tier`](super) module (see its docs for the full
//! layout): the namespace meta hash holds `c` (invalidation clock), `n` (namespace
//! epoch), `l` (lease counter), `f` (lease floor: leases with an id at or below it were
//! voided by a namespace invalidation), `tf` (tag floor: tagged stamps below it are
//! invalid; see `prune_tags` in [`lua`](super::lua)) and `t:<tag>` (the clock value of
//! the tag's last invalidation, for at most `max_tag_epochs` tags). Entry hash fields: `e` (envelope), `s` (stamp), `t` (tags), `f` (soft
//! expiry, ns), `h` (hard expiry, ns), `v` (the row version in decimal, or empty: what
//! the fill's version guard compares).
//!
//! Numbers written by the scripts go through `d()`: Lua turns a number into text with
//! `%.14g`, which would write clock values (about 1.8e15) in exponent notation.
//!
//! Nothing read from Redis is trusted (see "Poisoned keys" in the [`tier`](super) docs):
//! the helpers of [`lua`](super::lua) check every field before a script uses it, and
//! every script but the lookup answers `{result, repaired, corrupt}`: the keys it
//! rebuilt or dropped, and the entries it deleted as corrupt.

use crate::lua_source;
use crate::tier::format::ENVELOPE_FORMAT;
use crate::tier::lua::{HEAD_MAX, MAC_MAX, PCALL, PRELUDE};

/// Lookup over one or more keys of a namespace.
///
/// KEYS: meta, the namespace's wide write-lock set, then (entry, lease, key write-lock
/// set) per key.
/// ARGV: lease ms (0 = no lease), now (ns, decimal), the largest envelope to return
/// (bytes), then one "discard" value per key: '' or the envelope bytes the client could
/// not decode (never empty: a returned envelope starts with the format byte).
/// Returns per key either {1, e, s, f, h, t, m} (fresh hit) or {0, stamp, lease id (0 =
/// none), leader (0/1), corrupt[, e, s, f, h, t, m]} (miss, with the valid but
/// soft-expired entry when there is one), then the count of repaired keys. `m` is the
/// entry's MAC (nil when it has none; the client checks it when integrity keys are set). The stamp is the clock,
/// or 0 (a poisoned token: no fill with it is stored) while a write lock covers the
/// key. `corrupt` is 0, 1 (the script found the entry corrupt and deleted it) or 2 (it
/// deleted the entry the client asked to discard, or that entry had changed since: a
/// miss either way, so the client's second pass always ends).
const LOOKUP_BODY: &str = r#"
local meta = KEYS[1]
local lease_ms = tonumber(ARGV[1]) or 0
local now = ARGV[2]
local max = tonumber(ARGV[3])
clock_of(meta)
-- The write locks matter to misses only (a locked key's token is poisoned): a hit
-- costs the meta hash and its entry, nothing more.
local wide = nil
local function poisoned(wk)
  if wide == nil then wide = locked(KEYS[2]) end
  return wide or locked(wk)
end
local out = {}
local unlocked = {}
for i = 1, (#KEYS - 2) / 3 do
  local ek, lk, wk = KEYS[3 * i], KEYS[3 * i + 1], KEYS[3 * i + 2]
  local discard = ARGV[3 + i] or ''
  local corrupt = 0
  local hit = nil
  local stale = nil
  local r, s, tg = read_entry(ek, meta, max, true)
  if r == false then
    corrupt = 1
  elseif r then
    if discard ~= '' then
      if r[1] == discard then redis.call('UNLINK', ek) end
      corrupt = 2
    elseif valid(s, tg, meta) then
      if dec_lt(now, r[4]) then
        hit = {1, r[1], r[2], r[4], r[5], r[3], r[7]}
      else
        stale = r
      end
    else
      redis.call('UNLINK', ek)
    end
  end
  if hit then
    out[i] = hit
  else
    local miss = {0, 0, 0, 1, corrupt}
    if lease_ms > 0 then
      if lease_of(lk) then
        miss[4] = 0
      else
        local id = redis.call('HINCRBY', meta, 'l', 1)
        M.l = id
        redis.call('SET', lk, d(id), 'PX', lease_ms)
        miss[3] = id
      end
    end
    if stale then
      miss[6], miss[7], miss[8], miss[9] = stale[1], stale[2], stale[4], stale[5]
      miss[10], miss[11] = stale[3], stale[7]
    end
    out[i] = miss
    if not poisoned(wk) then unlocked[#unlocked + 1] = miss end
  end
end
-- Tokens carry the clock as it is after every check: a meta hash rebuilt on the way
-- moved it.
local clock = clock_of(meta)
for _, miss in ipairs(unlocked) do miss[2] = clock end
out[#out + 1] = repaired
return out
"#;

/// Guarded fill: refused when the key was invalidated since the token's stamp, when
/// the value's tags or the namespace were, or (the version guard) when the entry
/// stored holds a newer version and is still valid.
///
/// KEYS: entry, meta, lease.
/// ARGV: stamp, ttl ms, lease id ('0' = none), e ('' = the value is over the size
/// limit: guard only, store nothing), t, f, h, version ('' = none), tombstone ms, MAC
/// ('' = none), then the value's tags.
/// Result: 1 (stored), 0 (rejected: invalidated since the stamp), 4 (rejected by the
/// version guard), 2 (accepted but not stored, the entry it would have replaced
/// deleted) or 3 (accepted, but Redis refused the write for memory: the entry it would
/// have replaced deleted). The fill is the one script without
/// `allow-oom`: it is the one that grows the data set, so under `noeviction` it must
/// not push the server past `maxmemory`.
const FILL_BODY: &str = r#"
local ek, meta, lk = KEYS[1], KEYS[2], KEYS[3]
local stamp = tonumber(ARGV[1])
local clock = clock_of(meta)
-- The caller's own lease goes whatever the outcome, after the entry's write: Redis
-- refuses a script for memory only at its first write, and that must be the entry's.
local function done(result)
  if ARGV[3] ~= '0' then
    local own = pc('GET', lk)
    if type(own) == 'table' then
      redis.call('UNLINK', lk)
      repaired = repaired + 1
    elseif own == ARGV[3] then
      redis.call('UNLINK', lk)
    end
  end
  return {result, repaired, corrupt}
end
if buried_after(meta, ek, stamp) then return done(0) end
local tg = {}
for j = 11, #ARGV do tg[#tg + 1] = ARGV[j] end
if not valid(stamp, tg, meta) then return done(0) end
if ARGV[8] ~= '' then
  local held, hs, htags = read_entry(ek, meta, math.huge, false)
  if held == false then
    corrupt = 1
  elseif held and held[6] and held[6] ~= '' and valid(hs, htags, meta)
      and dec_lt(ARGV[8], held[6]) then
    return done(4)
  end
end
if ARGV[4] == '' then
  redis.call('UNLINK', ek)
  return done(2)
end
local w = pc('SET', ek, entry_string(ARGV[1], ARGV[6], ARGV[7], ARGV[8], ARGV[5], ARGV[10], ARGV[4]), 'PX', ARGV[2])
if type(w) == 'table' and w.err then
  if string.find(w.err, 'OOM', 1, true) then
    redis.call('UNLINK', ek)
    return done(3)
  end
  error(w)
end
return done(1)
"#;

/// Unconditional store. It counts as an invalidation of the key: one clock tick, a
/// tombstone holding it, the lease voided; the entry is stamped with the tick, so no
/// fill that began earlier can overwrite it.
///
/// KEYS: entry, meta, lease. ARGV: ttl ms, e ('' = the value is over the size limit:
/// invalidate only), t, f, h, tombstone ms, version ('' = none), MAC ('' = none).
/// Result: the stamp.
const SET_BODY: &str = r#"
local t = tick(KEYS[2])
redis.call('UNLINK', KEYS[1], KEYS[3])
bury(KEYS[2], KEYS[1], t, ARGV[6])
local at = d(t)
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], entry_string(at, ARGV[4], ARGV[5], ARGV[7], ARGV[3], ARGV[8], ARGV[2]), 'PX', ARGV[1])
end
return {tonumber(at), repaired, corrupt}
"#;

/// Key invalidation: one clock tick, then per key: drop entry and lease, leave a
/// tombstone holding the tick.
///
/// KEYS: meta, then (entry, lease) per key. ARGV: tombstone ms.
/// Result: the tick.
const DELETE_BODY: &str = r#"
local at = tick(KEYS[1])
for i = 2, #KEYS, 2 do
  redis.call('UNLINK', KEYS[i], KEYS[i + 1])
  bury(KEYS[1], KEYS[i], at, ARGV[1])
end
return {at, repaired, corrupt}
"#;

/// Tag invalidation: a clock tick becomes the tag's epoch. KEYS: meta. ARGV: tag.
/// Result: the tick.
const INVALIDATE_TAG_BODY: &str = r#"
return {bump_tag(KEYS[1], ARGV[1]), repaired, corrupt}
"#;

/// Namespace invalidation: the epoch moves to a new tick, every lease granted so far is
/// voided (lease floor), and the tag epochs are dropped (the namespace epoch now
/// dominates them all). Entries are left to expire: lookups treat them as misses.
///
/// KEYS: meta. Result: the tick.
const INVALIDATE_NAMESPACE_BODY: &str = r#"
return {bump_namespace(KEYS[1]), repaired, corrupt}
"#;

/// Write lock: invalidates the scope (as delete, invalidate_tag or invalidate_namespace
/// do) and adds the lock id to the scope's lock set with its expiry. (Tokens issued
/// before the lock stay refused for as long as the lock's own poisoned ones: a
/// tombstone is only forgotten behind the tombstone floor, which refuses them too.)
///
/// KEYS: meta, then either (entry, lease, key lock set) per key ('k' scope)
/// or the wide lock set ('t' and 'n' scopes).
/// ARGV: scope ('k', 't' or 'n'), lock id, lock ms, tombstone ms, tag (scope 't').
const LOCK_BODY: &str = r#"
local scope, id, lock_ms, tomb_ms = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local wall = now_ms()
local until_ms = d(wall + lock_ms)
invalidate_scope(scope, tomb_ms, function(set)
  redis.call('ZREMRANGEBYSCORE', set, '-inf', d(wall))
  redis.call('ZADD', set, until_ms, id)
  -- The set outlives each of its locks (by a millisecond: PEXPIRE counts from the
  -- script's start, `wall` from its TIME), which is what `locked` relies on.
  if redis.call('PTTL', set) <= lock_ms then redis.call('PEXPIRE', set, lock_ms + 1) end
end)
return {1, repaired, corrupt}
"#;

/// Write unlock: invalidates the scope once more (a fresh tick: tokens issued under the
/// lock may carry values read before the write committed), then removes the lock id.
///
/// KEYS and ARGV as for the lock (lock ms unused).
const UNLOCK_BODY: &str = r#"
local scope, id, tomb_ms = ARGV[1], ARGV[2], tonumber(ARGV[4])
invalidate_scope(scope, tomb_ms, function(set) redis.call('ZREM', set, id) end)
return {1, repaired, corrupt}
"#;

/// Shared by the lock and unlock scripts: invalidates the scope ('k': per key, drop
/// entry and lease and bury the key, `tomb_ms` being the generation age; 't': tag bump
/// with `ARGV[5]`; 'n': namespace bump), calling `on_set` on each lock set it covers
/// (once anything else found there is dropped).
const LOCK_PRELUDE: &str = r#"
local function invalidate_scope(scope, tomb_ms, on_set)
  local meta = KEYS[1]
  if scope == 'n' then
    bump_namespace(meta)
    lock_set(KEYS[2])
    on_set(KEYS[2])
  elseif scope == 't' then
    bump_tag(meta, ARGV[5])
    lock_set(KEYS[2])
    on_set(KEYS[2])
  else
    local at = tick(meta)
    for i = 2, #KEYS, 3 do
      redis.call('UNLINK', KEYS[i], KEYS[i + 1])
      bury(meta, KEYS[i], at, tomb_ms)
      lock_set(KEYS[i + 2])
      on_set(KEYS[i + 2])
    end
  end
end
"#;

/// Sliding expiration of a valid entry.
///
/// KEYS: entry, meta. ARGV: soft expiry ns, hard expiry ns, ttl ms, the largest
/// envelope (bytes).
/// Result: 1 (extended) or 0 (no valid entry).
const TOUCH_BODY: &str = r#"
local ek, meta = KEYS[1], KEYS[2]
local r, s, tg = read_entry(ek, meta, tonumber(ARGV[4]), true)
if r == false then return {0, repaired, 1} end
if not r then return {0, repaired, 0} end
if not valid(s, tg, meta) then
  redis.call('UNLINK', ek)
  return {0, repaired, 0}
end
redis.call('SET', ek, entry_string(r[2], ARGV[1], ARGV[2], r[6], r[3], r[7] or '', r[1]), 'PX', ARGV[3])
return {1, repaired, 0}
"#;

/// Deletes an entry if its envelope still holds the given (undecodable) bytes.
///
/// KEYS: entry. ARGV: bytes. Returns 1 if deleted.
const DISCARD_BODY: &str = r#"
local cur = pc('GET', KEYS[1])
if type(cur) ~= 'string' then return 0 end
local p, at = entry_head(cur)
if p and string.sub(cur, at + tonumber(p[5]) + tonumber(p[6])) == ARGV[1] then
  redis.call('UNLINK', KEYS[1])
  return 1
end
return 0
"#;

/// Deletes the lease key only if it still holds the caller's lease id; a lease key of
/// another type is dropped.
/// `KEYS[1]` lease key; `ARGV[1]` lease id. Result: 1 if released.
const RELEASE_LEASE_BODY: &str = r#"
local held = pc('GET', KEYS[1])
if type(held) == 'table' then
  redis.call('UNLINK', KEYS[1])
  return {0, 1, 0}
end
if held == ARGV[1] then
  redis.call('UNLINK', KEYS[1])
  return {1, 0, 0}
end
return {0, 0, 0}
"#;

/// The most keys one tombstone generation holds before the next one starts (see
/// `bury` in [`lua`](super::lua)): at most twice this many tombstones per namespace.
pub(crate) const MAX_TOMBS: usize = 10_000;

/// The first line of every script but the fill: Redis runs it even while the server is
/// over `maxmemory` (Redis 7.0 and later). An invalidation refused for memory would
/// leave a stale entry readable; what these scripts add (a tick, a tombstone, a lease,
/// a lock id) is small, and Redis evicts before the next command.
pub(crate) const ALLOW_OOM: &str = "#!lua flags=allow-oom\n";

fn with_prelude(body: &str, max_tag_epochs: usize, legacy_tombstones: bool) -> String {
    format!(
        "{ALLOW_OOM}local ENVELOPE_FORMAT = {ENVELOPE_FORMAT}\nlocal MAX_TAG_EPOCHS = {max_tag_epochs}\n\
         local MAX_TOMBS = {MAX_TOMBS}\nlocal LEGACY_TOMBS = {legacy_tombstones}\nlocal HEAD_MAX = {HEAD_MAX}\n\
         local MAC_MAX = {MAC_MAX}\n{PCALL}{PRELUDE}{body}"
    )
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
    pub(crate) release_lease: redis::Script,
    pub(crate) lock: redis::Script,
    pub(crate) unlock: redis::Script,
}

impl TierScripts {
    /// The scripts of a tier that keeps at most `max_tag_epochs` tag epochs per
    /// namespace (a constant of the scripts: it never travels with a call).
    pub(crate) fn new(max_tag_epochs: usize, legacy_tombstones: bool) -> Self {
        let with_prelude = |body: &str| with_prelude(body, max_tag_epochs, legacy_tombstones);
        TierScripts {
            lookup: lua_source::script(&with_prelude(LOOKUP_BODY)),
            fill: lua_source::script(with_prelude(FILL_BODY).trim_start_matches(ALLOW_OOM)),
            set: lua_source::script(&with_prelude(SET_BODY)),
            delete: lua_source::script(&with_prelude(DELETE_BODY)),
            invalidate_tag: lua_source::script(&with_prelude(INVALIDATE_TAG_BODY)),
            invalidate_namespace: lua_source::script(&with_prelude(INVALIDATE_NAMESPACE_BODY)),
            touch: lua_source::script(&with_prelude(TOUCH_BODY)),
            discard: lua_source::script(&with_prelude(DISCARD_BODY)),
            release_lease: lua_source::script(&format!("{ALLOW_OOM}{PCALL}{RELEASE_LEASE_BODY}")),
            lock: lua_source::script(&with_prelude(&format!("{LOCK_PRELUDE}{LOCK_BODY}"))),
            unlock: lua_source::script(&with_prelude(&format!("{LOCK_PRELUDE}{UNLOCK_BODY}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the server keeps of the tier's scripts (see [`lua_source`]): the helpers a
    /// script does not call and every comment stay in this file only.
    #[test]
    fn the_server_keeps_a_fraction_of_the_source() {
        let bodies = [
            LOOKUP_BODY,
            FILL_BODY,
            SET_BODY,
            DELETE_BODY,
            INVALIDATE_TAG_BODY,
            INVALIDATE_NAMESPACE_BODY,
            TOUCH_BODY,
            DISCARD_BODY,
        ];
        let (mut source, mut kept) = (0, 0);
        for body in bodies {
            let full = with_prelude(body, 64, true);
            let compact = lua_source::compact(&full);
            println!("{} -> {}", full.len(), compact.len());
            assert!(compact.starts_with(ALLOW_OOM), "the flags line must stay first");
            source += full.len();
            kept += compact.len();
        }
        println!("tier scripts: {source} bytes of source, {kept} sent");
        assert!(kept * 2 < source, "{kept} of {source} bytes kept");
    }
}
