//! The stream backplane's side in Redis: the Lua scripts (numbering and appending an
//! entry, replacing a stream or counter that cannot take one, and the reads that must
//! see the stream and its counter at the same instant), and the shape of what the
//! stream reads return (ids and entries, read with checked arithmetic: anyone who can
//! write under the prefix chooses them).

use redis::Value;

use crate::reply::{value_array, value_bytes, value_string, value_u64};

/// The number of the stream's last numbered entry (`nil` when it has none: the stream
/// is gone, or holds no entry whose `n` reads as a number from 1 to 2^53 - 2): where
/// the numbering stands when its counter is gone. Every number the counter gave was
/// appended (a failed append gives its number back) and trimming keeps the newest
/// entries, so while the stream is there its last numbered entry holds the counter's
/// value. A counter evicted (`allkeys-*` under `maxmemory`) or deleted alone therefore
/// costs the subscribers nothing: the scripts below resume from here instead of
/// restarting at 1, which every subscriber would report as `Lost` (and a fleet would
/// answer by emptying every L1). Entries without a readable number are skipped, as the
/// subscribers skip them; only the newest 8 are looked at.
///
/// Not with integrity keys ([`numbering_helpers`]`(false)`): a script cannot check an
/// entry's MAC, and a forged number must neither fake a loss nor hide one.
const LAST_NUMBER: &str = r#"
local function last_number(stream)
  local last = redis.pcall('XREVRANGE', stream, '+', '-', 'COUNT', 8)
  if type(last) ~= 'table' or last.err then return nil end
  for i = 1, #last do
    local fields = last[i][2]
    for j = 1, #fields - 1, 2 do
      if fields[j] == 'n' then
        local v = fields[j + 1]
        if type(v) == 'string' and #v <= 16 and string.find(v, '^[1-9]%d*$') then
          local s = tonumber(v)
          if s < 9007199254740991 then return s end
        end
        break
      end
    end
  end
  return nil
end
local function resume_number(stream, counter, n)
  if n ~= 1 then return n end
  local s = last_number(stream)
  if not s then return 1 end
  redis.call('SET', counter, s + 1)
  return s + 1
end
"#;

/// Where a gone counter is not looked for in the stream: integrity keys are in use.
const NO_LAST_NUMBER: &str = "
local function last_number(stream) return nil end
local function resume_number(stream, counter, n) return n end
";

/// The definitions of `last_number` and `resume_number` (the number an `INCR` gave,
/// or where a gone counter resumes) the scripts below start with: [`LAST_NUMBER`] where
/// the stream's numbers can be trusted (`resume`: no integrity keys), else one that
/// finds none.
pub(crate) fn numbering_helpers(resume: bool) -> &'static str {
    if resume { LAST_NUMBER } else { NO_LAST_NUMBER }
}

/// Stream backplane publish: number each entry, append it, cap the stream.
///
/// KEYS: stream, counter. ARGV: max len, the channel the entries are also published
/// on ('' for none: see [`push_payload`] for what is published), then one message's
/// bytes per entry, in order (a batch is one call: the subscribers blocked on the
/// stream wake once for all of it). Returns `{last number, counter restarted (0 or 1), what was wrong with the
/// stream ('' if nothing)}`.
///
/// Anyone who can write under the prefix can leave these keys in a state where no
/// publish could ever succeed again; the script repairs that here, atomically, so
/// that two publishers cannot both repair (the second would delete what the first
/// appended):
///
/// - a counter that `INCR` refuses (not an integer, or at its maximum), that gives
///   a number below 1 (entries the subscribers could not number), or that Lua
///   cannot carry exactly (2^53 and above) restarts at 1; subscribers see the
///   numbers jump and report `Lost`;
/// - a stream key that holds another type, or a stream whose last id is the largest
///   possible (`XADD … *` has no id left to give), is deleted and the entry appended
///   to a new stream; its history is gone, which subscribers that had not read it
///   see as a gap in the numbers, and a subscriber whose position is above the new
///   ids notices at its next idle read (see [`stream_catch_up`]).
///
/// A counter that is gone (`INCR` gives 1) is no such case: it resumes from the stream's
/// last numbered entry ([`LAST_NUMBER`], without integrity keys); only when the stream
/// is gone too does the numbering restart at 1.
///
/// A failed append gives its number back, so that it does not look like a trimmed
/// entry to the subscribers, and ends the call with its error (the entries before it
/// stay appended; the publisher sends the batch again, and a subscriber takes a
/// message seen twice as a late duplicate).
///
/// `allow-oom`: Redis runs it while over `maxmemory` (an invalidation refused for
/// memory is a lost one; an entry is small and the cap trims the stream).
pub(crate) fn stream_publish(resume: bool) -> String {
    format!("#!lua flags=allow-oom\n{}{PUBLISH_BODY}", numbering_helpers(resume))
}

const PUBLISH_BODY: &str = r#"
local restarted = 0
local problem = ''
local n = 0
for i = 3, #ARGV do
  local fresh = 0
  n = redis.pcall('INCR', KEYS[2])
  if type(n) ~= 'number' or n < 1 or n >= 9007199254740992 then
    redis.call('SET', KEYS[2], 1)
    n = 1
    fresh = 1
    restarted = 1
  else
    n = resume_number(KEYS[1], KEYS[2], n)
  end
  local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'm', ARGV[i], 'n', n)
  if type(added) == 'table' and added.err then
    local wrong = ''
    local kind = redis.call('TYPE', KEYS[1]).ok
    if kind == 'stream' then
      local info = redis.call('XINFO', 'STREAM', KEYS[1])
      for j = 1, #info, 2 do
        if info[j] == 'last-generated-id' and info[j + 1] == '18446744073709551615-18446744073709551615' then
          wrong = 'exhausted'
        end
      end
    elseif kind ~= 'none' then
      wrong = kind
    end
    if wrong == '' then
      if fresh == 0 then redis.call('DECR', KEYS[2]) end
      return added
    end
    problem = wrong
    redis.call('UNLINK', KEYS[1])
    added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'm', ARGV[i], 'n', n)
    if type(added) == 'table' and added.err then
      return added
    end
  end
  if ARGV[2] ~= '' then
    redis.call('PUBLISH', ARGV[2], added .. '\n' .. n .. '\n' .. ARGV[i])
  end
end
return {n, restarted, problem}
"#;

/// What the publish script replaced, one sentence each, from its reply. The message
/// is appended whatever the rest of the reply says: an odd reply only loses the
/// report, never the publish.
pub(crate) fn publish_repairs(reply: &Value, stream_key: &str, counter_key: &str) -> Vec<String> {
    let reply = value_array(reply).unwrap_or_default();
    let mut out = Vec::new();
    if reply.get(1).and_then(value_u64) == Some(1) {
        out.push(format!(
            "the counter `{counter_key}` held a value INCR refuses, or one out of 1..2^53; \
             numbering restarted at 1"
        ));
    }
    match reply.get(2).and_then(value_string).as_deref() {
        None | Some("") => {}
        Some("exhausted") => out.push(format!(
            "the stream `{stream_key}` had reached the largest id, so `XADD *` could append \
             nothing; re-created it, its history is gone"
        )),
        Some(other) => out.push(format!(
            "the key `{stream_key}` held a {other}, not a stream; replaced it by a new stream"
        )),
    }
    out
}

/// Where a new subscriber starts: the last entry's id and the counter, atomically.
///
/// KEYS: stream, counter. Returns {last id or '0-0', counter (where it is gone: the
/// stream's last number, [`LAST_NUMBER`]; '0' without either)}.
pub(crate) fn stream_start(resume: bool) -> String {
    format!("{}{START_BODY}", numbering_helpers(resume))
}

const START_BODY: &str = r#"
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local id = '0-0'
if #last > 0 then id = last[1][1] end
return {id, redis.call('GET', KEYS[2]) or last_number(KEYS[1]) or '0'}
"#;

/// Catch-up read, after a reconnect or a read that waited its block time for
/// nothing: entries from a given id on, the counter, and (when the read is not a
/// full batch) the stream's last generated id, atomically (so a trailing loss is told
/// apart from a publish racing the read, and a stream re-created below the reader's
/// position from a quiet one).
///
/// KEYS: stream, counter. ARGV: first id to read ('' to read nothing: the reader is
/// at the largest id), count. Returns {counter, entries, last generated id or '' when
/// the stream does not exist (or the batch was full)}. A counter that is gone counts
/// as the stream's last number ([`LAST_NUMBER`]): the next publish resumes from there.
pub(crate) fn stream_catch_up(resume: bool) -> String {
    format!("{}{CATCH_UP_BODY}", numbering_helpers(resume))
}

const CATCH_UP_BODY: &str = r#"
local entries = {}
if ARGV[1] ~= '' then
  entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
end
local last = ''
if #entries < tonumber(ARGV[2]) and redis.call('TYPE', KEYS[1]).ok ~= 'none' then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
return {redis.call('GET', KEYS[2]) or last_number(KEYS[1]) or '0', entries, last}
"#;

/// A stream entry id, `<ms>-<seq>`, both parts `u64` in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct StreamId {
    ms: u64,
    seq: u64,
}

impl StreamId {
    /// Below every entry's id: reading after it reads a stream from its start.
    pub(crate) const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    /// Parses `<ms>-<seq>`; `None` for anything else, a part beyond `u64` included.
    pub(crate) fn parse(s: &str) -> Option<StreamId> {
        let (ms, seq) = s.split_once('-')?;
        Some(StreamId { ms: ms.parse().ok()?, seq: seq.parse().ok()? })
    }

    /// The smallest id above this one; `None` above the largest id.
    pub(crate) fn successor(self) -> Option<StreamId> {
        match self.seq.checked_add(1) {
            Some(seq) => Some(StreamId { ms: self.ms, seq }),
            None => Some(StreamId { ms: self.ms.checked_add(1)?, seq: 0 }),
        }
    }

    /// The largest id below this one; `None` below `0-0`.
    pub(crate) fn predecessor(self) -> Option<StreamId> {
        match self.seq.checked_sub(1) {
            Some(seq) => Some(StreamId { ms: self.ms, seq }),
            None => Some(StreamId { ms: self.ms.checked_sub(1)?, seq: u64::MAX }),
        }
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One stream entry as read.
#[derive(Debug)]
pub(crate) struct RawEntry {
    pub(crate) id: StreamId,
    pub(crate) message: Option<Vec<u8>>,
    pub(crate) number: Option<u64>,
}

/// Parses `[[id, [field, value, …]], …]`. Redis only returns well-formed ids: one
/// that does not read as two `u64`s makes the whole reply unreadable.
pub(crate) fn parse_entries(v: &Value) -> Option<Vec<RawEntry>> {
    let mut out = Vec::new();
    for e in value_array(v)? {
        let pair = value_array(e)?;
        let id = StreamId::parse(&value_string(pair.first()?)?)?;
        let mut entry = RawEntry { id, message: None, number: None };
        match pair.get(1)? {
            Value::Map(kv) => {
                for (k, v) in kv {
                    take_field(&mut entry, k, v);
                }
            }
            other => {
                let fields = value_array(other)?;
                for kv in fields.chunks(2) {
                    if let [k, v] = kv {
                        take_field(&mut entry, k, v);
                    }
                }
            }
        }
        out.push(entry);
    }
    Some(out)
}

/// An `n` that is not a `u64` (not written by this backplane) leaves the entry out of
/// the numbering, like an entry without one; its message, if it decodes, is still an
/// invalidation worth applying.
fn take_field(entry: &mut RawEntry, k: &Value, v: &Value) {
    match value_bytes(k) {
        Some(b"m") => entry.message = value_bytes(v).map(<[u8]>::to_vec),
        Some(b"n") => entry.number = value_u64(v),
        _ => {}
    }
}

/// Reads what the publish and heartbeat scripts publish beside each entry they append
/// (when given a channel): `<id>\n<number>\n<message bytes>`, the entry as a
/// subscriber would read it from the stream, so a push and a read of the same entry
/// are one thing to the reader. `None` when the id does not parse (not published by
/// this backplane: anyone allowed to `PUBLISH` on the channel chooses the bytes); a
/// number that is not a `u64` leaves the entry unnumbered, as in the stream.
pub(crate) fn push_payload(payload: &[u8]) -> Option<RawEntry> {
    let mut parts = payload.splitn(3, |&b| b == b'\n');
    let id = StreamId::parse(std::str::from_utf8(parts.next()?).ok()?)?;
    let number = std::str::from_utf8(parts.next()?).ok().and_then(|n| n.parse().ok());
    let message = parts.next()?.to_vec();
    Some(RawEntry { id, message: Some(message), number })
}

/// Parses an `XREAD` reply of several streams: each stream's key and entries (only
/// the streams that had any; a nil reply is none).
pub(crate) fn parse_xread_streams(v: &Value) -> Option<Vec<(String, Vec<RawEntry>)>> {
    match v {
        Value::Nil => Some(Vec::new()),
        Value::Map(kv) => kv.iter().map(|(k, e)| Some((value_string(k)?, parse_entries(e)?))).collect(),
        other => value_array(other)?
            .iter()
            .map(|s| {
                let s = value_array(s)?;
                Some((value_string(s.first()?)?, parse_entries(s.get(1)?)?))
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn pushed_entries_parse_as_their_stream_entry() {
        let e = push_payload(b"17-2\n41\nbytes\nwith newlines").expect("parses");
        assert_eq!((e.id, e.number), (StreamId { ms: 17, seq: 2 }, Some(41)));
        assert_eq!(e.message.as_deref(), Some(&b"bytes\nwith newlines"[..]));
        let unnumbered = push_payload(b"17-3\n1e+15\nm").expect("parses");
        assert_eq!(unnumbered.number, None, "a number that is not a u64 leaves it unnumbered");
        assert_eq!(push_payload(b"17-3\n5\n").and_then(|e| e.message).as_deref(), Some(&b""[..]));
        for bad in [&b""[..], b"17-3", b"17-3\n5", b"x\n5\nm", b"18446744073709551616-0\n1\nm"] {
            assert!(push_payload(bad).is_none(), "{bad:?}");
        }
    }
    use super::*;

    const MAX: &str = "18446744073709551615-18446744073709551615";

    #[test]
    fn stream_ids_parse_checked_and_order_numerically() {
        let max = StreamId::parse(MAX).unwrap();
        assert_eq!(max.to_string(), MAX);
        assert_eq!(max.successor(), None);
        assert_eq!(StreamId::ZERO.predecessor(), None);
        assert_eq!(StreamId::parse("5-18446744073709551615").unwrap().successor(), StreamId::parse("6-0"));
        assert_eq!(StreamId::parse("6-0").unwrap().predecessor(), StreamId::parse("5-18446744073709551615"));
        assert_eq!(max.predecessor(), StreamId::parse("18446744073709551615-18446744073709551614"));
        for bad in
            ["18446744073709551616-0", "0-18446744073709551616", "-1-0", "1", "1-", "-", "a-b", "1-2-3", ""]
        {
            assert_eq!(StreamId::parse(bad), None, "{bad:?}");
        }
        // Numeric, not textual: 10-0 comes after 9-5.
        assert!(StreamId::parse("10-0").unwrap() > StreamId::parse("9-5").unwrap());
        assert!(StreamId::parse("1-10").unwrap() > StreamId::parse("1-9").unwrap());
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[(&str, &str)]) -> Value {
        let kv = fields.iter().flat_map(|(k, v)| [bulk(k), bulk(v)]).collect();
        Value::Array(vec![bulk(id), Value::Array(kv)])
    }

    #[test]
    fn entries_with_out_of_range_numbers_are_unnumbered() {
        let v = Value::Array(vec![
            entry(MAX, &[("m", "x"), ("n", "18446744073709551615")]),
            entry("1-1", &[("m", "x"), ("n", "18446744073709551616")]),
            entry("1-2", &[("n", "-1")]),
        ]);
        let got = parse_entries(&v).unwrap();
        assert_eq!(got.iter().map(|e| e.number).collect::<Vec<_>>(), vec![Some(u64::MAX), None, None]);
        assert_eq!(got[0].id, StreamId::parse(MAX).unwrap());
        assert_eq!(got[1].message.as_deref(), Some(&b"x"[..]));
        assert_eq!(got[2].message, None);
        assert!(parse_entries(&Value::Array(vec![entry("18446744073709551616-0", &[])])).is_none());
    }
}
