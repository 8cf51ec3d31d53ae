//! How the tier's data looks in Redis: the key names of a namespace, the stored
//! envelope, the tags field, and the shape of the lookup script's reply (see the
//! [`tier`](super) module docs for the layout).

use std::time::Duration;

use redis::Value;
use strata::clock::Timestamp;
use strata::error::{Error, ErrorKind, Result};
use strata::tier::{Envelope, FillToken};

use crate::integrity::Integrity;
use crate::reply::{value_array, value_bytes, value_u64};

/// The domain of entry MACs (see [`entry_mac`]).
const ENTRY_DOMAIN: &str = "strata-l2-entry-v1";

/// The MAC of an entry, over what a reader trusts: the entry's Redis key (prefix,
/// namespace and key: a signed entry moved to another key does not verify), the
/// envelope bytes (value, version, creation time, tags, load time, schema identity, and
/// the stamp for fills) and the `t` field the scripts check tags with.
///
/// Left out, and why forging them cannot serve a row that was never signed for this key:
/// the expiries `f`/`h` (`touch` moves them without the envelope; forged, they change
/// how long a signed entry of this key lives), the stamp `s` of a `set` (the script
/// assigns it; see [`Stored::open`]) and the version `v` (read only by the fill's version
/// guard, inside the script).
pub(crate) fn entry_mac(integrity: &Integrity, entry_key: &str, envelope: &[u8], tags: &str) -> [u8; 32] {
    integrity.sign(ENTRY_DOMAIN, &[entry_key.as_bytes(), envelope, tags.as_bytes()])
}

/// The first byte of every stored envelope, so the format can evolve. 2 since the
/// envelope carries its schema fingerprint: a build of format 1 reads these entries as
/// undecodable misses (it would otherwise ignore the trailing fingerprint and decode
/// the value as its own type), and this one reads theirs so too.
pub const ENVELOPE_FORMAT: u8 = 2;

/// Duration in whole milliseconds, at least 1 (Redis refuses `PX 0`).
pub(crate) fn millis_at_least_one(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The key names of one namespace.
pub(crate) struct NsKeys {
    base: String,
}

impl NsKeys {
    pub(crate) fn new(prefix: &str, namespace: &str) -> Self {
        let mut base = String::with_capacity(prefix.len() + namespace.len() + 4);
        base.push_str(prefix);
        base.push_str(":{");
        for c in namespace.chars() {
            match c {
                ':' => base.push_str("%3A"),
                '%' => base.push_str("%25"),
                '{' => base.push_str("%7B"),
                '}' => base.push_str("%7D"),
                c => base.push(c),
            }
        }
        base.push_str("}:");
        NsKeys { base }
    }
    /// `<prefix>:{<namespace>}:`, what every key name of the namespace starts with.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }
    pub(crate) fn meta(&self) -> String {
        format!("{}m", self.base)
    }
    pub(crate) fn entry(&self, key: &str) -> String {
        format!("{}e:{key}", self.base)
    }
    pub(crate) fn lease(&self, key: &str) -> String {
        format!("{}l:{key}", self.base)
    }
    pub(crate) fn key_locks(&self, key: &str) -> String {
        format!("{}w:{key}", self.base)
    }
    pub(crate) fn wide_locks(&self) -> String {
        format!("{}w", self.base)
    }
    /// The hot-key ranking (warm-up).
    pub(crate) fn hot(&self) -> String {
        format!("{}hot", self.base)
    }
}

/// Encodes tags for the `t` field: `<byte len>:<tag>` per tag.
pub(crate) fn encode_tags(tags: &[String]) -> String {
    let mut out = String::new();
    for t in tags {
        out.push_str(&t.len().to_string());
        out.push(':');
        out.push_str(t);
    }
    out
}

pub(crate) fn encode_envelope(env: &Envelope) -> Result<Vec<u8>> {
    let mut out = vec![ENVELOPE_FORMAT];
    postcard::to_io(env, &mut out).map_err(|e| {
        Error::new(ErrorKind::Codec, "cannot encode l2 envelope with postcard").with_source(e)
    })?;
    Ok(out)
}

/// The envelope as an entry stores it: its expiries live in the entry's head, where the
/// scripts read and move them, so the copies inside are zeroed (16 bytes less per
/// entry); readers take them from the head (`with_fields`), as they always have.
pub(crate) fn encode_stored_envelope(env: &Envelope) -> Result<Vec<u8>> {
    let mut stored = env.clone();
    stored.soft_expiry = Timestamp(0);
    stored.hard_expiry = Timestamp(0);
    encode_envelope(&stored)
}

/// Puts the fields the scripts own (stamp, expiries) into a decoded envelope.
pub(crate) fn with_fields(mut env: Envelope, stamp: u64, soft: u64, hard: u64) -> Envelope {
    env.stamp = stamp;
    env.soft_expiry = Timestamp(soft);
    env.hard_expiry = Timestamp(hard);
    env
}

pub(crate) fn decode_envelope(bytes: &[u8]) -> Option<Envelope> {
    match bytes.split_first() {
        Some((&ENVELOPE_FORMAT, rest)) => postcard::from_bytes(rest).ok(),
        _ => None,
    }
}

/// An envelope as a script returned it, with the fields the scripts own (stamp, soft
/// and hard expiry; `fields` is `None` when they do not parse), the `t` field and the
/// MAC field `m`, if any.
pub(crate) struct Stored {
    pub(crate) bytes: Vec<u8>,
    fields: Option<(u64, u64, u64)>,
    tags: Vec<u8>,
    mac: Option<Vec<u8>>,
}

/// What a reader makes of a [`Stored`] entry.
pub(crate) enum Opened {
    Valid(Envelope),
    /// Does not decode (or its fields do not parse).
    Undecodable,
    /// Integrity keys are set and the entry's MAC is missing or wrong, or its stamp is
    /// not the one signed.
    Forged,
}

impl Stored {
    /// Verifies (when `integrity` is set) and decodes the entry stored at `entry_key`.
    ///
    /// A fill signs the envelope with the fill token's stamp inside, so the stamp the
    /// script returns must be that one: a raised stamp would let an entry outlive a tag
    /// or namespace invalidation. A `set` signs stamp 0 (its stamp is assigned inside the
    /// script, after signing), and its `s` is taken as stored: forging it can bring back
    /// an older signed `set` entry of the same key that a tag or namespace invalidation
    /// had hidden, the same exposure as replaying an old entry (see the crate docs).
    pub(crate) fn open(&self, integrity: Option<&Integrity>, entry_key: &str) -> Opened {
        if let Some(i) = integrity {
            let signed = self
                .mac
                .as_deref()
                .is_some_and(|m| i.verify(ENTRY_DOMAIN, &[entry_key.as_bytes(), &self.bytes, &self.tags], m));
            if !signed {
                return Opened::Forged;
            }
        }
        let Some((stamp, soft, hard)) = self.fields else { return Opened::Undecodable };
        match decode_envelope(&self.bytes) {
            Some(env) if integrity.is_some() && env.stamp != 0 && env.stamp != stamp => Opened::Forged,
            Some(env) => Opened::Valid(with_fields(env, stamp, soft, hard)),
            None => Opened::Undecodable,
        }
    }

    /// An entry read outside a script (see [`plain_read`](super::plain_read)): the
    /// envelope, (stamp, soft, hard expiry), the `t` field and the MAC.
    pub(crate) fn from_parts(
        bytes: Vec<u8>,
        fields: (u64, u64, u64),
        tags: Vec<u8>,
        mac: Option<Vec<u8>>,
    ) -> Stored {
        Stored { bytes, fields: Some(fields), tags, mac }
    }

    fn parse(items: &[Value]) -> Option<Stored> {
        let bytes = value_bytes(items.first()?)?.to_vec();
        let field = |i: usize| items.get(i).and_then(value_u64);
        let fields = match (field(1), field(2), field(3)) {
            (Some(stamp), Some(soft), Some(hard)) => Some((stamp, soft, hard)),
            _ => None,
        };
        let tags = items.get(4).and_then(value_bytes).map(<[u8]>::to_vec).unwrap_or_default();
        let mac = items.get(5).and_then(value_bytes).map(<[u8]>::to_vec);
        Some(Stored { bytes, fields, tags, mac })
    }
}

/// One key's answer from the lookup script.
pub(crate) enum RawLookup {
    Hit(Stored),
    Miss {
        token: FillToken,
        /// The script found the entry corrupt and deleted it (to be counted).
        corrupt: bool,
        /// A valid but soft-expired entry.
        stale: Option<Stored>,
    },
}

/// Reads the lookup script's reply: `expected` answers, then the number of keys the
/// script repaired.
pub(crate) fn parse_lookup_reply(v: &Value, expected: usize) -> Option<(Vec<RawLookup>, u64)> {
    let items = value_array(v)?;
    let (repaired, items) = items.split_last()?;
    if items.len() != expected {
        return None;
    }
    let answers = items
        .iter()
        .map(|item| {
            let a = value_array(item)?;
            match value_u64(a.first()?)? {
                1 => Some(RawLookup::Hit(Stored::parse(a.get(1..)?)?)),
                0 => {
                    let lease = value_u64(a.get(2)?)?;
                    Some(RawLookup::Miss {
                        token: FillToken {
                            stamp: value_u64(a.get(1)?)?,
                            lease: (lease != 0).then_some(lease),
                            leader: value_u64(a.get(3)?)? == 1,
                        },
                        corrupt: value_u64(a.get(4)?)? == 1,
                        stale: match a.get(5..) {
                            Some(rest) if !rest.is_empty() => Some(Stored::parse(rest)?),
                            _ => None,
                        },
                    })
                }
                _ => None,
            }
        })
        .collect::<Option<Vec<_>>>()?;
    Some((answers, value_u64(repaired)?))
}

/// The reply of every script but lookup and discard: `{result, repaired, corrupt}`.
pub(crate) struct ScriptReply {
    pub(crate) result: u64,
    /// Keys the script rebuilt or dropped (meta hash, leases, tombstones, lock sets).
    pub(crate) repaired: u64,
    /// Entries the script deleted as corrupt.
    pub(crate) corrupt: u64,
}

pub(crate) fn parse_script_reply(v: &Value) -> Option<ScriptReply> {
    match value_array(v)? {
        [result, repaired, corrupt] => Some(ScriptReply {
            result: value_u64(result)?,
            repaired: value_u64(repaired)?,
            corrupt: value_u64(corrupt)?,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn namespace_escaping_keeps_namespaces_apart() {
        let a = NsKeys::new("strata", "a:e:b");
        let b = NsKeys::new("strata", "a");
        assert_eq!(a.meta(), "strata:{a%3Ae%3Ab}:m");
        assert_ne!(a.meta(), b.entry("b:m"));
        assert_eq!(b.entry("k"), "strata:{a}:e:k");
        assert_eq!(NsKeys::new("p", "x{y}%").meta(), "p:{x%7By%7D%25}:m");
    }

    #[test]
    fn tags_encoding() {
        assert_eq!(encode_tags(&[]), "");
        assert_eq!(encode_tags(&["a".into(), "b:c".into(), "".into()]), "1:a3:b:c0:");
    }

    #[test]
    fn envelope_round_trip_and_garbage() {
        let env = Envelope {
            value: Some(Bytes::from_static(b"v")),
            version: Some(3),
            created: Timestamp(1),
            soft_expiry: Timestamp(2),
            hard_expiry: Timestamp(3),
            stamp: 4,
            tags: vec!["t".into()],
            load_nanos: 5,
            schema: 6,
        };
        let bytes = encode_envelope(&env).unwrap();
        assert_eq!(bytes[0], 2);
        assert_eq!(decode_envelope(&bytes), Some(env.clone()));
        assert_eq!(decode_envelope(b""), None);
        assert_eq!(decode_envelope(b"\x03abc"), None);
        assert_eq!(decode_envelope(b"\x02\xff\xff\xff"), None);
        // An entry of format 1 (no schema fingerprint) is not read, even when its
        // bytes would decode.
        let mut old = bytes.clone();
        old[0] = 1;
        assert_eq!(decode_envelope(&old), None);
    }

    #[test]
    fn lookup_reply_with_fields_that_do_not_parse_is_undecodable_not_an_error() {
        let env = Envelope {
            value: None,
            version: None,
            created: Timestamp(1),
            soft_expiry: Timestamp(2),
            hard_expiry: Timestamp(3),
            stamp: 4,
            tags: vec![],
            load_nanos: 5,
            schema: 0,
        };
        let bytes = Value::BulkString(encode_envelope(&env).unwrap());
        let text = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let hit = |h: Value| Value::Array(vec![Value::Int(1), bytes.clone(), text("4"), text("2"), h]);
        let reply = Value::Array(vec![hit(text("3")), hit(text("-1")), Value::Int(7)]);
        let (answers, repaired) = parse_lookup_reply(&reply, 2).unwrap();
        assert_eq!(repaired, 7);
        let decoded: Vec<Option<Envelope>> = answers
            .iter()
            .map(|a| match a {
                RawLookup::Hit(s) => match s.open(None, "") {
                    Opened::Valid(env) => Some(env),
                    _ => None,
                },
                RawLookup::Miss { .. } => panic!("a hit"),
            })
            .collect();
        assert_eq!(decoded, vec![Some(env), None]);
        // The count of repaired keys closes the reply.
        assert!(parse_lookup_reply(&reply, 3).is_none());
        let script = Value::Array(vec![Value::Int(1), Value::Int(2), Value::Int(0)]);
        let r = parse_script_reply(&script).unwrap();
        assert_eq!((r.result, r.repaired, r.corrupt), (1, 2, 0));
        assert!(parse_script_reply(&Value::Int(1)).is_none());
    }
}
