//! The lookup's first try: plain `GETRANGE`s of the entries (bounded: an oversized
//! entry is never transferred whole), then one `HMGET` of the meta
//! hash, in one pipelined round trip, checked here. A fresh, valid, untagged entry is a
//! hit without running the lookup script.
//!
//! Why: a script call costs Redis 20–30 µs of CPU (the interpreter, the meta hash and
//! the entry parsed in Lua), a `GET` about half a microsecond, and most lookups of a
//! fleet are hits (an instance asks L2 for what another one loaded). Redis CPU was the
//! seed's failure.
//!
//! Why it answers what the script would: the entry is read before the meta hash (one
//! connection executes a pipeline in order), and what the meta hash holds only ever
//! invalidates more as time passes (epochs and the clock grow; a lost or rebuilt hash
//! starts above every earlier stamp). An entry valid against the later meta hash was
//! therefore valid when it was read, which is where the read takes effect, as a script
//! run at that instant would have answered. Everything else (no entry, a soft-expired
//! one, one with tags, anything that does not parse or checks out as the script
//! requires, a server error such as `WRONGTYPE` or `NOPERM`) is left to the script,
//! which takes leases, repairs and deletes: this path never writes.

use std::sync::atomic::{AtomicU32, Ordering};

use redis::Value;

use crate::reply::value_bytes;
use crate::tier::format::{ENVELOPE_FORMAT, NsKeys, Stored};
use crate::tier::lua::{HEAD_MAX, MAC_MAX};

/// Consecutive plain reads that found entries and answered none of them (tagged,
/// soft-expired, corrupt) after which the tier stops trying them but for one lookup in
/// [`PROBE_EVERY`]: where entries are tagged, a plain read never answers, and each
/// would only add a round trip (~20 µs of Redis CPU) in front of the script.
const GIVE_UP_AFTER: u32 = 64;

/// While given up, one lookup in this many still tries the plain read, so that the
/// tier notices when its reads can answer again.
const PROBE_EVERY: u32 = 16;

/// [`PlainGate::miss_share`] in full: every recent lookup missed.
const ALL_MISSED: u32 = 1 << 16;

/// The weight of one key's outcome in [`PlainGate::miss_share`]: 1/32, so the share
/// follows about the last 32 keys looked up.
const MISS_SHARE_SHIFT: u32 = 5;

/// Whether a tier's lookups try the plain read first.
///
/// Not while most recent lookups missed: a miss pays the plain read's round trip (~20
/// µs of Redis CPU, and the client's) and then the script's, so below about one hit in
/// two a plain read costs more than it saves (isolated, µs of Redis CPU: plain read
/// then hit 21.5, plain read then script 73.5; script alone 41.8 hit, 52 miss). A fleet's
/// cold start is such a phase: until L2 fills, nearly every lookup misses. Every
/// lookup's outcome moves the share, whichever path answered it, so the gate reopens
/// as soon as lookups hit again.
///
/// Not either after [`GIVE_UP_AFTER`] plain reads in a row that found entries and
/// answered none (tagged data), but for one lookup in [`PROBE_EVERY`].
#[derive(Debug, Default)]
pub(crate) struct PlainGate {
    unanswered: AtomicU32,
    skipped: AtomicU32,
    /// The recent lookups' share of misses, in 1/[`ALL_MISSED`]: an exponentially
    /// weighted average, 0 (all hits) at the start.
    miss_share: AtomicU32,
}

impl PlainGate {
    /// Whether this lookup tries the plain read.
    pub(crate) fn open(&self) -> bool {
        if self.miss_share.load(Ordering::Relaxed) >= ALL_MISSED / 2 {
            return false;
        }
        self.unanswered.load(Ordering::Relaxed) < GIVE_UP_AFTER
            || self.skipped.fetch_add(1, Ordering::Relaxed).is_multiple_of(PROBE_EVERY)
    }

    /// Records the outcome of `hits + misses` keys' lookups, however answered.
    pub(crate) fn record_outcomes(&self, hits: usize, misses: usize) {
        let update = |mut share: u32| {
            for hit in std::iter::repeat_n(true, hits).chain(std::iter::repeat_n(false, misses)) {
                share -= share >> MISS_SHARE_SHIFT;
                if !hit {
                    share += ALL_MISSED >> MISS_SHARE_SHIFT;
                }
            }
            Some(share)
        };
        // Lookups racing here may lose an update: a heuristic, not a count.
        let _ = self.miss_share.fetch_update(Ordering::Relaxed, Ordering::Relaxed, update);
    }

    /// Records a plain read's outcome: it answered a key, or found entries and answered
    /// none (else nothing to learn).
    pub(crate) fn record(&self, answered: bool, found: bool) {
        if answered {
            self.unanswered.store(0, Ordering::Relaxed);
        } else if found {
            let _ = self.unanswered.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1));
        }
    }
}

/// What a plain read found: per key, the entry when it answers as a hit; and whether it
/// saw any entry at all.
pub(crate) struct PlainRead {
    pub(crate) hits: Vec<Option<Stored>>,
    pub(crate) found: bool,
}

/// The meta hash fields the read checks, in the order the scripts' `clock_of` reads
/// them: c, n, l, f, tf, xg, x0, x1, xw, xf.
const META_FIELDS: [&str; 10] = ["c", "n", "l", "f", "tf", "xg", "x0", "x1", "xw", "xf"];

/// How many bytes of an entry the read asks for when envelopes go up to `max`: an entry
/// that fills them may be longer and is left to the script, which reads the same bytes
/// and measures a longer entry before reading it, so an oversized one is never
/// transferred whole.
fn read_limit(max: usize) -> usize {
    max.saturating_add(HEAD_MAX + MAC_MAX)
}

/// The pipeline of a plain read of `keys`, whose envelopes go up to `max` bytes.
pub(crate) fn plain_read_pipeline(ns: &NsKeys, keys: &[String], max: usize) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let last = read_limit(max) - 1;
    for key in keys {
        pipe.cmd("GETRANGE").arg(ns.entry(key)).arg(0).arg(last);
    }
    pipe.cmd("HMGET").arg(ns.meta()).arg(&META_FIELDS[..]);
    pipe
}

/// Reads the pipeline's reply: per key, the entry when it is a fresh valid hit at `now`
/// (ns), else `None` (the script decides). `max` is the largest envelope the tier
/// returns. `None` overall when the reply does not have the pipeline's shape.
pub(crate) fn read_plain_reply(reply: &[Value], keys: usize, now: u64, max: usize) -> Option<PlainRead> {
    if reply.len() != keys + 1 {
        return None;
    }
    let (entries, meta) = reply.split_at(keys);
    let found = entries.iter().any(|e| !matches!(value_bytes(e), Some([])));
    let hits = match Meta::parse(&meta[0]) {
        None => entries.iter().map(|_| None).collect(),
        Some(meta) => {
            entries.iter().map(|e| value_bytes(e).and_then(|x| fresh_hit(x, &meta, now, max))).collect()
        }
    };
    Some(PlainRead { hits, found })
}

/// What the scripts' `clock_of` checks of the meta hash, and what a hit needs of it.
struct Meta {
    clock: u64,
    epoch: u64,
}

impl Meta {
    /// The meta hash as `clock_of` accepts it, else `None` (missing, or corrupt: the
    /// script creates or rebuilds it).
    fn parse(v: &Value) -> Option<Meta> {
        let Value::Array(fields) = v else { return None };
        if fields.len() != META_FIELDS.len() {
            return None;
        }
        let field = |i: usize| -> Option<Option<&[u8]>> {
            match &fields[i] {
                Value::Nil => Some(None),
                other => value_bytes(other).map(Some),
            }
        };
        // A present field must parse; an absent one counts as 0 (c and n must be there).
        let number = |i: usize| -> Option<Option<u64>> {
            match field(i)? {
                None => Some(None),
                Some(b) => num(b).map(Some),
            }
        };
        let clock = number(0)??;
        let epoch = number(1)??;
        let leases = number(2)?.unwrap_or(0);
        let lease_floor = number(3)?.unwrap_or(0);
        let tag_floor = number(4)?.unwrap_or(0);
        let tomb_floor = number(9)?.unwrap_or(0);
        let generation = match field(5)? {
            None => None,
            Some(b"0") => Some(0),
            Some(b"1") => Some(1),
            Some(_) => return None,
        };
        let starts = [number(6)?, number(7)?];
        // xw (when the current generation started) only has to parse.
        number(8)?;
        if epoch > clock || lease_floor > leases || tag_floor > clock || tomb_floor > clock {
            return None;
        }
        if starts.iter().flatten().any(|&x| x > clock) {
            return None;
        }
        if let Some(g) = generation
            && starts[g].is_none()
        {
            return None;
        }
        Some(Meta { clock, epoch })
    }
}

/// The entry `x` (the scripts' one-string layout, see the tier docs) when the lookup
/// script would answer it as a fresh hit at `now` and it has no tags, else `None`.
fn fresh_hit(x: &[u8], meta: &Meta, now: u64, max: usize) -> Option<Stored> {
    if x.len() >= read_limit(max) {
        return None;
    }
    let semi = x.iter().take(HEAD_MAX).position(|&b| b == b';')?;
    let head = &x[..semi];
    let mut parts = head.split(|&b| b == b',');
    let (s, f, h, v, tl, ml) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let stamp = num(s)?;
    let soft = u64_decimal(f)?;
    let hard = u64_decimal(h)?;
    if !v.is_empty() {
        u64_decimal(v)?;
    }
    let (tl, ml) = (length(tl)?, length(ml)?);
    // Tagged entries need their tags' epochs, which only the script reads.
    if tl != 0 {
        return None;
    }
    let body = &x[semi + 1..];
    let mac = body.get(..ml)?;
    let envelope = &body[ml..];
    if envelope.is_empty() || envelope.len() > max || envelope[0] != ENVELOPE_FORMAT {
        return None;
    }
    // The script's `valid` and its freshness test.
    if stamp > meta.clock || stamp < meta.epoch || now >= soft {
        return None;
    }
    let mac = (ml > 0).then(|| mac.to_vec());
    Some(Stored::from_parts(envelope.to_vec(), (stamp, soft, hard), Vec::new(), mac))
}

/// A clock value, stamp or epoch as the scripts' `num` takes it: a canonical decimal
/// (no leading zero) of at most 16 digits, below 2^53.
fn num(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 16 || (b.len() > 1 && b[0] == b'0') || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(b).ok()?.parse().ok()?;
    (n < 1 << 53).then_some(n)
}

/// An expiry or version as the scripts' `is_u64` takes it: a canonical decimal u64.
fn u64_decimal(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 20 || (b.len() > 1 && b[0] == b'0') || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// A tags or MAC length in the head: `0` or what `num` takes.
fn length(b: &[u8]) -> Option<usize> {
    let n = if b == b"0" { 0 } else { num(b)? };
    usize::try_from(n).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn meta(fields: [Option<&str>; 10]) -> Value {
        Value::Array(fields.iter().map(|f| f.map_or(Value::Nil, text)).collect())
    }

    const GOOD_META: [Option<&str>; 10] =
        [Some("100"), Some("50"), Some("70"), None, None, None, None, None, None, None];

    fn entry(head: &str, envelope: &[u8]) -> Vec<u8> {
        let mut x = head.as_bytes().to_vec();
        x.extend_from_slice(envelope);
        x
    }

    fn read(entry: Vec<u8>, meta_fields: [Option<&str>; 10], now: u64) -> Option<Stored> {
        let reply = [Value::BulkString(entry), meta(meta_fields)];
        read_plain_reply(&reply, 1, now, 1024).unwrap().hits.pop().unwrap()
    }

    #[test]
    fn a_fresh_valid_untagged_entry_is_a_hit() {
        let s = read(entry("60,1000,2000,7,0,0;", b"\x02abc"), GOOD_META, 999).unwrap();
        assert_eq!(s.bytes, b"\x02abc");
        // With a MAC.
        let s = read(entry("60,1000,2000,,0,3;", b"mac\x02abc"), GOOD_META, 999).unwrap();
        assert_eq!(s.bytes, b"\x02abc");
    }

    #[test]
    fn everything_else_is_left_to_the_script() {
        let ok = "60,1000,2000,7,0,0;";
        // Soft-expired, invalidated by the namespace epoch, above the clock, tagged.
        assert!(read(entry(ok, b"\x02abc"), GOOD_META, 1000).is_none());
        assert!(read(entry("49,1000,2000,7,0,0;", b"\x02abc"), GOOD_META, 1).is_none());
        assert!(read(entry("101,1000,2000,7,0,0;", b"\x02abc"), GOOD_META, 1).is_none());
        assert!(read(entry("60,1000,2000,7,3,0;", b"1:a\x02abc"), GOOD_META, 1).is_none());
        // Fields that do not parse, a bad format byte, an empty or oversized envelope.
        for bad in [
            "060,1000,2000,7,0,0;",
            "60,-1,2000,7,0,0;",
            "60,1000,2000,x,0,0;",
            "60,1000,2000,7,0;",
            "60,1000,2000,7,0,0,0;",
            "60,1000,2000,7,00,0;",
        ] {
            assert!(read(entry(bad, b"\x02abc"), GOOD_META, 1).is_none(), "{bad}");
        }
        assert!(read(entry(ok, b"\x01abc"), GOOD_META, 1).is_none());
        assert!(read(entry(ok, b""), GOOD_META, 1).is_none());
        assert!(read(entry("60,1000,2000,7,0,9;", b"\x02abc"), GOOD_META, 1).is_none());
        assert!(read(entry(ok, &vec![2; 2000]), GOOD_META, 1).is_none());
        // An entry that fills the bytes read may be longer: the script looks.
        let mut long = vec![2; 1024];
        long.extend_from_slice(&[0; HEAD_MAX + MAC_MAX - 19]);
        assert!(read(entry(ok, &long), GOOD_META, 1).is_none());
        // A meta hash that is missing or that clock_of would rebuild.
        let mut missing = GOOD_META;
        missing[0] = None;
        assert!(read(entry(ok, b"\x02abc"), missing, 1).is_none());
        for (i, bad) in [
            (1, "101"),
            (3, "71"),
            (4, "101"),
            (9, "101"),
            (5, "2"),
            (5, "1"),
            (6, "101"),
            (8, "x"),
            (2, "1e3"),
        ] {
            let mut m = GOOD_META;
            m[i] = Some(bad);
            assert!(read(entry(ok, b"\x02abc"), m, 1).is_none(), "field {i} = {bad}");
        }
        let mut gen_ok = GOOD_META;
        gen_ok[5] = Some("1");
        gen_ok[7] = Some("90");
        assert!(read(entry(ok, b"\x02abc"), gen_ok, 1).is_some());
        // A server error in place of the entry (WRONGTYPE) or the meta hash.
        let err = redis::parse_redis_value(
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        )
        .unwrap();
        assert!(matches!(err, Value::ServerError(_)));
        let reply = [err.clone(), meta(GOOD_META)];
        let read = read_plain_reply(&reply, 1, 1, 1024).unwrap();
        assert!(read.hits[0].is_none() && read.found);
        let reply = [Value::BulkString(entry(ok, b"\x02abc")), err];
        assert!(read_plain_reply(&reply, 1, 1, 1024).unwrap().hits[0].is_none());
        let reply = [Value::BulkString(Vec::new()), meta(GOOD_META)];
        assert!(!read_plain_reply(&reply, 1, 1, 1024).unwrap().found, "no entry");
        // A reply of another shape.
        assert!(read_plain_reply(&[meta(GOOD_META)], 1, 1, 1024).is_none());
    }

    #[test]
    fn the_gate_gives_up_on_reads_that_never_answer_and_probes() {
        let gate = PlainGate::default();
        for _ in 0..1000 {
            gate.record(false, false);
        }
        assert!(gate.open(), "misses teach nothing");
        for _ in 0..GIVE_UP_AFTER {
            assert!(gate.open());
            gate.record(false, true);
        }
        let tried = (0..PROBE_EVERY * 4).filter(|_| gate.open()).count();
        assert_eq!(tried, 4, "one lookup in {PROBE_EVERY}");
        gate.record(true, true);
        assert!((0..10).all(|_| gate.open()), "an answer opens it again");
    }

    #[test]
    fn the_gate_closes_while_lookups_mostly_miss_and_reopens_on_hits() {
        let gate = PlainGate::default();
        assert!(gate.open(), "a new tier expects hits");
        gate.record_outcomes(3, 1);
        assert!(gate.open(), "one miss in four");
        let misses_to_close = (1..100).find(|_| {
            gate.record_outcomes(0, 1);
            !gate.open()
        });
        assert!(matches!(misses_to_close, Some(20..=24)), "{misses_to_close:?}");
        gate.record_outcomes(0, 10_000);
        let hits_to_open = (1..100).find(|_| {
            gate.record_outcomes(1, 0);
            gate.open()
        });
        assert!(matches!(hits_to_open, Some(22..=23)), "{hits_to_open:?}");
        // A batch counts every key.
        gate.record_outcomes(0, 64);
        assert!(!gate.open());
        gate.record_outcomes(64, 0);
        assert!(gate.open());
    }
}
