//! What the fuzz targets and the seed generator share: a RESP writer (the targets read
//! Redis replies through the client's own parser, so their inputs are RESP), the
//! value type the codec target decodes, and a Rust mirror of the Lua parser of the
//! tier's tags field.

use std::collections::BTreeMap;

use redis::Value;
use serde::{Deserialize, Serialize};

/// Writes `v` as RESP (RESP3 types for maps and sets).
pub fn resp(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Nil => out.extend_from_slice(b"$-1\r\n"),
        Value::Int(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
        Value::BulkString(b) => {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        Value::SimpleString(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
        Value::Okay => out.extend_from_slice(b"+OK\r\n"),
        Value::Array(items) | Value::Set(items) => {
            let kind = if matches!(v, Value::Set(_)) { '~' } else { '*' };
            out.extend_from_slice(format!("{kind}{}\r\n", items.len()).as_bytes());
            for i in items {
                resp(i, out);
            }
        }
        Value::Map(kv) => {
            out.extend_from_slice(format!("%{}\r\n", kv.len()).as_bytes());
            for (k, v) in kv {
                resp(k, out);
                resp(v, out);
            }
        }
        other => out.extend_from_slice(format!("-ERR unsupported in seeds: {other:?}\r\n").as_bytes()),
    }
}

/// RESP bytes of `v`.
pub fn to_resp(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    resp(v, &mut out);
    out
}

/// A value of the shape applications cache, for the codec target: every serde shape
/// postcard has a length prefix or a tag for (strings, bytes, sequences, maps, options,
/// enums), no floats (NaN breaks the round-trip equality).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// An id.
    pub id: u64,
    /// A signed amount.
    pub amount: i64,
    /// Text.
    pub name: String,
    /// Bytes (as `bytes::Bytes`, which has its own deserializer).
    pub blob: bytes::Bytes,
    /// A sequence of strings.
    pub labels: Vec<String>,
    /// An option.
    pub parent: Option<u32>,
    /// A map.
    pub attrs: BTreeMap<String, u16>,
    /// An enum.
    pub kind: Kind,
    /// A nested sequence.
    pub children: Vec<(u8, Option<String>)>,
}

/// The enum inside [`Row`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A unit variant.
    Plain,
    /// A newtype variant.
    Counted(u32),
    /// A struct variant.
    Named {
        /// Its field.
        label: String,
    },
}

/// The Lua scripts' `num`: a canonical decimal (digits, no leading zero, at most 16
/// of them) below 2^53.
fn lua_num(s: &[u8]) -> Option<usize> {
    if s.is_empty() || s.len() > 16 || !s.iter().all(u8::is_ascii_digit) || (s.len() > 1 && s[0] == b'0') {
        return None;
    }
    let n: u64 = std::str::from_utf8(s).ok()?.parse().ok()?;
    if n >= 1 << 53 {
        return None;
    }
    usize::try_from(n).ok()
}

/// The scripts' `parse_tags` (tier/lua.rs), step for step: `<byte len>:<tag>` per tag;
/// `None` when malformed.
pub fn parse_tags_like_lua(t: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < t.len() {
        let c = i + t[i..].iter().position(|&b| b == b':')?;
        let n = lua_num(&t[i..c])?;
        let end = (c + 1).checked_add(n)?;
        if end > t.len() {
            return None;
        }
        out.push(&t[c + 1..end]);
        i = end;
    }
    Some(out)
}
