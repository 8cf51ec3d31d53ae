//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`): every
//! decoder of this crate that reads bytes another process wrote, called the way the
//! tier and the backplanes call them. Not a stable API.

use redis::Value;
use strata::backplane::Message;
use strata::error::Result;
use strata::tier::Envelope;

use crate::backplane::stream_scripts::{
    StreamId, parse_entries, parse_xread_streams, publish_repairs, push_payload,
};
use crate::backplane::{open_message, seal_message};
use crate::integrity::{Integrity, IntegrityKey};
use crate::tier::format::{self, Opened, RawLookup, Stored};

/// The key every fuzzed integrity check uses (32 bytes).
const FUZZ_KEY: [u8; 32] = *b"strata-fuzz-integrity-key-32byte";

fn integrity() -> Option<Integrity> {
    Integrity::from_keys(Some(&[IntegrityKey::new(FUZZ_KEY.to_vec())]), "fuzzing").ok().flatten()
}

/// Decodes a stored L2 envelope (format byte, then postcard).
pub fn decode_envelope(bytes: &[u8]) -> Option<Envelope> {
    format::decode_envelope(bytes)
}

/// Encodes an envelope as the tier stores it.
pub fn encode_envelope(env: &Envelope) -> Result<Vec<u8>> {
    format::encode_envelope(env)
}

/// Encodes tags as the tier's `t` field (`<byte len>:<tag>` per tag).
pub fn encode_tags(tags: &[String]) -> String {
    format::encode_tags(tags)
}

/// How one answer of a lookup reply opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A hit: the envelope it opened to without integrity keys (`None`: undecodable),
    /// and whether it verified with the fuzzing key.
    Hit(Option<Envelope>, bool),
    /// A miss, with its stale entry opened the same way, if any.
    Miss(Option<(Option<Envelope>, bool)>),
}

fn open(stored: &Stored, entry_key: &str, integrity: Option<&Integrity>) -> (Option<Envelope>, bool) {
    let plain = match stored.open(None, entry_key) {
        Opened::Valid(env) => Some(env),
        Opened::Undecodable | Opened::Forged => None,
    };
    let signed = matches!(stored.open(integrity, entry_key), Opened::Valid(_));
    (plain, signed)
}

/// Reads a lookup script reply of `expected` answers as the tier does and opens every
/// entry in it (as stored at `entry_key`), without and with integrity keys; then the
/// number of keys the script repaired.
pub fn lookup_reply(v: &Value, expected: usize, entry_key: &str) -> Option<(Vec<Answer>, u64)> {
    let integrity = integrity();
    let (answers, repaired) = format::parse_lookup_reply(v, expected)?;
    let answers = answers
        .iter()
        .map(|a| match a {
            RawLookup::Hit(s) => {
                let (env, signed) = open(s, entry_key, integrity.as_ref());
                Answer::Hit(env, signed)
            }
            RawLookup::Miss { stale, .. } => {
                Answer::Miss(stale.as_ref().map(|s| open(s, entry_key, integrity.as_ref())))
            }
        })
        .collect();
    Some((answers, repaired))
}

/// Signs an entry as a fill or `set` does (the `m` field), for seeds and round trips.
pub fn entry_mac(entry_key: &str, envelope: &[u8], tags: &str) -> Vec<u8> {
    integrity().map(|i| format::entry_mac(&i, entry_key, envelope, tags).to_vec()).unwrap_or_default()
}

/// Reads the `{result, repaired, corrupt}` reply of the other scripts.
pub fn script_reply(v: &Value) -> Option<(u64, u64, u64)> {
    format::parse_script_reply(v).map(|r| (r.result, r.repaired, r.corrupt))
}

/// One stream entry as read: its id (as displayed again), its `m` and `n` fields.
pub type Entry = (String, Option<Vec<u8>>, Option<u64>);

fn entries(raw: Vec<crate::backplane::stream_scripts::RawEntry>) -> Vec<Entry> {
    raw.into_iter().map(|e| (e.id.to_string(), e.message, e.number)).collect()
}

/// Reads `[[id, [field, value, …]], …]` (XRANGE, the catch-up script).
pub fn stream_entries(v: &Value) -> Option<Vec<Entry>> {
    parse_entries(v).map(entries)
}

/// Reads an `XREAD` reply (of one stream or several), every stream's entries in turn.
pub fn xread(v: &Value) -> Option<Vec<Entry>> {
    parse_xread_streams(v).map(|streams| streams.into_iter().flat_map(|(_, e)| entries(e)).collect())
}

/// Reads a push of the stream backplane (`<id>\n<number>\n<message>`), as a pushed
/// subscriber does.
pub fn push_entry(payload: &[u8]) -> Option<Entry> {
    push_payload(payload).map(|e| (e.id.to_string(), e.message, e.number))
}

/// Parses a stream id and gives it back displayed, with its successor and predecessor.
pub fn stream_id(s: &str) -> Option<(String, Option<String>, Option<String>)> {
    let id = StreamId::parse(s)?;
    Some((id.to_string(), id.successor().map(|i| i.to_string()), id.predecessor().map(|i| i.to_string())))
}

/// What the stream publish script's reply says it repaired.
pub fn stream_publish_repairs(v: &Value) -> Vec<String> {
    publish_repairs(v, "stream", "counter")
}

/// Opens a backplane message read from `channel` (a stream entry's `m`, a Pub/Sub
/// payload), without integrity keys (`signed` false) or with the fuzzing key.
pub fn open_backplane_message(signed: bool, channel: &str, bytes: &[u8]) -> Option<Message> {
    let integrity = if signed { integrity() } else { None };
    open_message(integrity.as_ref(), channel, bytes)
}

/// Seals a backplane message for `channel` as a publish does.
pub fn seal_backplane_message(signed: bool, channel: &str, message: &Message) -> Result<Vec<u8>> {
    let integrity = if signed { integrity() } else { None };
    seal_message(integrity.as_ref(), channel, message)
}
