//! Reading the values of Redis replies (scripts return integers, strings and nested
//! arrays, and RESP3 may answer a decimal as a string).

use redis::Value;
use strata::error::{Error, ErrorKind};

/// Reads an integer from a reply value that may be an integer or a decimal string.
pub(crate) fn value_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// Reads a binary string from a reply value.
pub(crate) fn value_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// Reads an array from a reply value.
pub(crate) fn value_array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

/// An error for a reply that does not have the shape a script returns.
pub(crate) fn bad_reply(kind: ErrorKind, what: &str) -> Error {
    Error::new(kind, format!("{what}: unexpected reply shape from redis (script version mismatch?)"))
}

/// Reads a UTF-8 string from a reply value.
pub(crate) fn value_string(v: &Value) -> Option<String> {
    value_bytes(v).and_then(|b| std::str::from_utf8(b).ok()).map(str::to_owned)
}
