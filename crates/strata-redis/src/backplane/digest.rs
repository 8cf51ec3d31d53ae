//! Heartbeats on the Redis backplanes, aggregated in Redis: each instance's heartbeat
//! is kept in a hash per namespace (`<stream or channel>:beats:<namespace>`, one field
//! per origin) and, at most once per heartbeat interval, the script that keeps one
//! appends to the stream (numbered like any entry) or publishes on the channel a
//! [`MessageBody::Digest`](strata::backplane::MessageBody::Digest) of all of them. Each
//! subscriber then receives one message per interval instead of one per member: a
//! fleet of N costs N script calls and N deliveries per interval, not N².
//!
//! The digest is encoded here, in Lua, in the format the core decodes (postcard: the
//! format byte, origin 0, sequence 0, the namespace, the body's variant and its list,
//! the send time): each field of the hash holds the server time it was written at and
//! the postcard bytes of its entry's first four fields ([`beat_head`]); the script
//! appends the entry's age. With integrity keys the digest could not be sealed (the
//! keys are not in Redis), so heartbeats are then published one by one instead.

use std::sync::atomic::Ordering;
use std::time::Duration;

use strata::backplane::{Message, MessageBody};
use strata::error::{Error, ErrorKind, Result};

use crate::backplane::StatCounters;
use crate::backplane::stream_scripts::numbering_helpers;
use crate::managed::ManagedConn;

/// The variant index of `MessageBody::Digest` in the wire format (the enum's order).
pub(crate) const DIGEST_VARIANT: u32 = 5;

/// Heartbeats older than this many intervals leave the hash and the digest.
pub(crate) const KEEP_INTERVALS: u32 = 8;

/// Adds the heartbeat scripts' ARGV for `message` (see [`DIGEST_BODY`]) to `inv`, whose
/// keys the caller has set: `max_len` is the stream's cap (0 on Pub/Sub), `channel` the
/// Pub/Sub channel (on the stream: the one its entries are pushed on, '' for none).
pub(crate) fn heartbeat_args(
    inv: &mut redis::ScriptInvocation<'_>,
    message: &Message,
    beat: u64,
    interval: Duration,
    max_len: u64,
    channel: &str,
) -> Result<()> {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
    inv.arg(format!("{:x}", message.origin))
        .arg(beat_head(message, beat)?)
        .arg(ms(interval))
        .arg(ms(interval.saturating_mul(KEEP_INTERVALS)))
        .arg(max_len)
        .arg(&message.namespace)
        .arg(DIGEST_VARIANT)
        .arg(channel);
    Ok(())
}

/// Runs a heartbeat script prepared with [`heartbeat_args`] on the publishing
/// connection; a digest it sent counts as published.
pub(crate) async fn invoke_heartbeat(
    inv: redis::ScriptInvocation<'_>,
    publisher: &ManagedConn,
    op_timeout: Duration,
    what: &'static str,
    stats: &StatCounters,
) -> Result<()> {
    let sent: i64 = publisher
        .call(op_timeout, ErrorKind::Backplane, what, |mut c| async move { inv.invoke_async(&mut c).await })
        .await
        .map_err(|e| e.into_error())?;
    stats.published.fetch_add(u64::try_from(sent).unwrap_or(0), Ordering::Relaxed);
    Ok(())
}

/// The bytes of a digest entry before its age: origin, sequence, count, buffered.
pub(crate) fn beat_head(message: &Message, beat: u64) -> Result<Vec<u8>> {
    let buffered = message.body == MessageBody::BufferedHeartbeat;
    postcard::to_allocvec(&(message.origin, message.seq, beat, buffered))
        .map_err(|e| Error::new(ErrorKind::Codec, "cannot encode a heartbeat").with_source(e))
}

/// Keeps one heartbeat and builds a digest when one is due (the body both heartbeat
/// scripts share: [`STREAM_HEARTBEAT`] appends the digest, [`PUBSUB_HEARTBEAT`]
/// publishes it).
///
/// The beats hash is the last key. ARGV: origin (hex), entry head (bytes), interval
/// ms, keep ms, stream max len (unused on Pub/Sub), namespace, digest variant, channel
/// (Pub/Sub only). Ends with `msg` (the digest) built, or returns 0 when none is due.
///
/// Times are the server's (`TIME`), so every instance's beats age by one clock. A
/// digest is due when the last one (field `_`) is nine tenths of an interval old, or
/// in the future (the server's clock went back). The hash has no TTL, like the stream
/// and the meta hash: under `volatile-*` eviction a TTL made it the one backplane key
/// Redis could take (67 times in a 3 MB `volatile-lru` run, each costing members that
/// looked silent and L1 flushes). A namespace whose members are all gone leaves its
/// last beats behind (a field each, ~50 bytes), dropped by the next digest once older
/// than the keep time. (Releases before 2026-12-06 set a TTL, which then runs out
/// once: a deploy from one of them loses the hash once, within the keep time.)
const DIGEST_BODY: &str = r#"
local beats = KEYS[#KEYS]
local function varint(n)
  local out = {}
  repeat
    local b = n % 128
    n = (n - b) / 128
    if n > 0 then b = b + 128 end
    out[#out + 1] = string.char(b)
  until n == 0
  return table.concat(out)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval, keep = tonumber(ARGV[3]), tonumber(ARGV[4])
local entry = string.format('%d', now) .. ':' .. ARGV[2]
local set = redis.pcall('HSET', beats, ARGV[1], entry)
if type(set) == 'table' and set.err then
  -- Not a hash (anyone who can write under the prefix chooses): replaced.
  redis.call('UNLINK', beats)
  redis.call('HSET', beats, ARGV[1], entry)
end
local last = tonumber(redis.call('HMGET', beats, '_')[1] or '')
if last and last <= now and now - last < interval * 9 / 10 then return 0 end
redis.call('HSET', beats, '_', string.format('%d', now))
local all = redis.call('HGETALL', beats)
local parts, drop = {}, {}
for i = 1, #all, 2 do
  local f, v = all[i], all[i + 1]
  if f ~= '_' then
    local sep = string.find(v, ':', 1, true)
    local at = sep and tonumber(string.sub(v, 1, sep - 1))
    if not at or now - at > keep then
      drop[#drop + 1] = f
    else
      parts[#parts + 1] = string.sub(v, sep + 1) .. varint(math.max(0, now - at))
    end
  end
end
if #drop > 0 then redis.call('HDEL', beats, unpack(drop)) end
local ns = ARGV[6]
local msg = '\2\0\0' .. varint(#ns) .. ns .. varint(tonumber(ARGV[7])) .. varint(#parts)
  .. table.concat(parts) .. varint(now)
"#;

/// The stream's heartbeat: [`DIGEST_BODY`], then the digest numbered and appended like
/// a publish (and, when `ARGV[8]` names a channel, published on it as the publish
/// script does: `stream_scripts::push_payload`). KEYS: stream, counter, beats hash.
/// Returns 1 when it appended a digest.
pub(crate) fn stream_heartbeat(resume: bool) -> String {
    format!(
        "#!lua flags=allow-oom\n{}{DIGEST_BODY}{}",
        numbering_helpers(resume),
        r#"
local n = redis.pcall('INCR', KEYS[2])
if type(n) ~= 'number' or n < 1 or n >= 9007199254740992 then
  -- A counter INCR refuses: the next publish repairs it (and the stream).
  return 0
end
-- A counter that is gone resumes from the stream (see `stream_scripts::LAST_NUMBER`).
n = resume_number(KEYS[1], KEYS[2], n)
local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'm', msg, 'n', n)
if type(added) == 'table' and added.err then
  redis.call('DECR', KEYS[2])
  return added
end
if ARGV[8] ~= '' then
  redis.call('PUBLISH', ARGV[8], added .. '\n' .. n .. '\n' .. msg)
end
return 1
"#
    )
}

/// Pub/Sub's heartbeat: [`DIGEST_BODY`], then the digest published on the channel
/// (`ARGV[8]`). KEYS: beats hash. Returns 1 when it published a digest.
pub(crate) fn pubsub_heartbeat() -> String {
    format!("#!lua flags=allow-oom\n{DIGEST_BODY}\nredis.call('PUBLISH', ARGV[8], msg)\nreturn 1\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata::backplane::Beat;

    /// What the script builds, built the same way in Rust, decodes as the digest.
    #[test]
    fn the_scripts_encoding_is_the_cores_digest() {
        fn varint(mut n: u64, out: &mut Vec<u8>) {
            loop {
                let b = (n % 128) as u8;
                n /= 128;
                out.push(if n > 0 { b | 128 } else { b });
                if n == 0 {
                    break;
                }
            }
        }
        let hb = |origin, seq, body| Message { origin, seq, namespace: "ns".into(), body, sent_at_ms: 5 };
        let a = beat_head(&hb(7, 300, MessageBody::Heartbeat), 12).expect("encode");
        let b = beat_head(&hb(u64::MAX, 0, MessageBody::BufferedHeartbeat), 1).expect("encode");
        let mut msg = vec![2, 0, 0, 2, b'n', b's'];
        varint(u64::from(DIGEST_VARIANT), &mut msg);
        varint(2, &mut msg);
        msg.extend_from_slice(&a);
        varint(250, &mut msg);
        msg.extend_from_slice(&b);
        varint(0, &mut msg);
        varint(1_796_000_000_000, &mut msg);
        let m = Message::decode(&msg).expect("decodes");
        assert_eq!(m.namespace, "ns");
        assert_eq!(m.sent_at_ms, 1_796_000_000_000);
        let beat = |origin, seq, beat, buffered, age_ms| Beat { origin, seq, beat, buffered, age_ms };
        assert_eq!(
            m.body,
            MessageBody::Digest(vec![beat(7, 300, 12, false, 250), beat(u64::MAX, 0, 1, true, 0)])
        );
    }
}
