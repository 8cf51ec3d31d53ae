//! How the tier's data looks in Redis: the key names of a namespace, the stored
//! envelope, the tags field, and the shape of the lookup script's reply (see the
//! [`tier`](super) module docs for the layout).

use std::time::Duration;

use redis::Value;
use strata::clock::Timestamp;
use strata::error::{Error, ErrorKind, Result};
use strata::tier::{Envelope, FillToken};

use crate::reply::{value_array, value_bytes, value_u64};

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
    pub(crate) fn meta(&self) -> String {
        format!("{}m", self.base)
    }
    pub(crate) fn entry(&self, key: &str) -> String {
        format!("{}e:{key}", self.base)
    }
    pub(crate) fn lease(&self, key: &str) -> String {
        format!("{}l:{key}", self.base)
    }
    pub(crate) fn tomb(&self, key: &str) -> String {
        format!("{}x:{key}", self.base)
    }
    pub(crate) fn key_locks(&self, key: &str) -> String {
        format!("{}w:{key}", self.base)
    }
    pub(crate) fn wide_locks(&self) -> String {
        format!("{}w", self.base)
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

/// One key's answer from the lookup script.
pub(crate) enum RawLookup {
    Hit {
        bytes: Vec<u8>,
        stamp: u64,
        soft: u64,
        hard: u64,
    },
    Miss {
        token: FillToken,
        corrupt: bool,
        /// A valid but soft-expired entry: (bytes, stamp, soft, hard).
        stale: Option<(Vec<u8>, u64, u64, u64)>,
    },
}

pub(crate) fn parse_lookup_reply(v: &Value, expected: usize) -> Option<Vec<RawLookup>> {
    let items = value_array(v)?;
    if items.len() != expected {
        return None;
    }
    items
        .iter()
        .map(|item| {
            let a = value_array(item)?;
            match value_u64(a.first()?)? {
                1 => Some(RawLookup::Hit {
                    bytes: value_bytes(a.get(1)?)?.to_vec(),
                    stamp: value_u64(a.get(2)?)?,
                    soft: value_u64(a.get(3)?)?,
                    hard: value_u64(a.get(4)?)?,
                }),
                0 => {
                    let lease = value_u64(a.get(2)?)?;
                    Some(RawLookup::Miss {
                        token: FillToken {
                            stamp: value_u64(a.get(1)?)?,
                            lease: (lease != 0).then_some(lease),
                            leader: value_u64(a.get(3)?)? == 1,
                        },
                        corrupt: value_u64(a.get(4)?)? == 1,
                        stale: match a.get(5) {
                            None => None,
                            Some(e) => Some((
                                value_bytes(e)?.to_vec(),
                                value_u64(a.get(6)?)?,
                                value_u64(a.get(7)?)?,
                                value_u64(a.get(8)?)?,
                            )),
                        },
                    })
                }
                _ => None,
            }
        })
        .collect()
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
}
