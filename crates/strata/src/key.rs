//! Keys and values: how a cache key is written into L2 key names and backplane
//! messages, and the one bound every cached value meets.

use std::hash::Hash;
use std::sync::Arc;

/// A cache key.
///
/// Keys cross process boundaries (L2 key names, invalidation messages), so each key
/// type says how it is written as text and read back. The text form must be stable
/// across processes and versions of your program: it is what `strata invalidate`
/// and other languages see in Redis.
pub trait CacheKey: Hash + Eq + Clone + Send + Sync + 'static {
    /// Appends the key's text form to `out`.
    fn write_key(&self, out: &mut String);

    /// Parses the text form written by [`CacheKey::write_key`]; `None` if it is not a
    /// valid key of this type (such a message is ignored and counted).
    fn parse_key(s: &str) -> Option<Self>;

    /// The key's text form as a new string.
    fn to_key_string(&self) -> String {
        let mut s = String::new();
        self.write_key(&mut s);
        s
    }
}

impl CacheKey for String {
    fn write_key(&self, out: &mut String) {
        out.push_str(self);
    }
    fn parse_key(s: &str) -> Option<Self> {
        Some(s.to_owned())
    }
}

impl CacheKey for Arc<str> {
    fn write_key(&self, out: &mut String) {
        out.push_str(self);
    }
    fn parse_key(s: &str) -> Option<Self> {
        Some(Arc::from(s))
    }
}

/// Whether `s` is an integer written as [`CacheKey::write_key`] writes one: an optional
/// `-` (only where `signed`), then ASCII digits without leading zeros, `0` alone
/// unsigned. `"+7"`, `"007"`, `" 7"`, `"-0"` are not: each integer has exactly one
/// text form, so a key read from outside (a change notification, `strata invalidate`)
/// names exactly the entry whose key writes that text, never another one.
fn is_canonical_integer(s: &str, signed: bool) -> bool {
    let digits = match s.strip_prefix('-') {
        Some(rest) if signed => {
            if rest == "0" {
                return false;
            }
            rest
        }
        Some(_) => return false,
        None => s,
    };
    match digits.as_bytes() {
        [] => false,
        [b'0'] => true,
        [b'0', ..] => false,
        bytes => bytes.iter().all(u8::is_ascii_digit),
    }
}

macro_rules! int_key {
    ($($t:ty),*) => {$(
        impl CacheKey for $t {
            fn write_key(&self, out: &mut String) {
                use std::fmt::Write;
                // Writing to a String cannot fail.
                let _ = write!(out, "{self}");
            }
            /// Parses only the canonical decimal form (what `write_key` writes):
            /// no sign for unsigned types, `-` alone for negative values, no leading
            /// zeros, no whitespace.
            fn parse_key(s: &str) -> Option<Self> {
                if !is_canonical_integer(s, <$t>::MIN != 0) {
                    return None;
                }
                s.parse().ok()
            }
        }
    )*};
}
int_key!(u8, u16, u32, u64, u128, i8, i16, i32, i64, i128, usize, isize);

/// A cached value: what L1 holds (cloned out on every hit) and L2 stores encoded.
///
/// Implemented for every type that is `Clone + Send + Sync + Serialize +
/// DeserializeOwned + 'static`; it only names that bound once. Cheap clones pay off:
/// store large rows as `Arc<Row>`.
pub trait CacheValue: Clone + Send + Sync + serde::Serialize + serde::de::DeserializeOwned + 'static {}

impl<T> CacheValue for T where
    T: Clone + Send + Sync + serde::Serialize + serde::de::DeserializeOwned + 'static
{
}

#[cfg(test)]
mod tests {
    use super::CacheKey;

    #[test]
    fn integer_keys_parse_only_their_canonical_form() {
        for bad in ["+7", "0008", " 8", "8 ", "", "-", "+", "-0", "00", "1_000", "0x10", "1e3", "٣"] {
            assert_eq!(u64::parse_key(bad), None, "u64 {bad:?}");
            assert_eq!(i64::parse_key(bad), None, "i64 {bad:?}");
        }
        assert_eq!(u64::parse_key("-7"), None);
        assert_eq!(u8::parse_key("256"), None, "out of range");
        assert_eq!(i8::parse_key("-129"), None, "out of range");
        assert_eq!(i64::parse_key("-07"), None);
        for (text, n) in [
            ("0", 0_i64),
            ("7", 7),
            ("-7", -7),
            ("9223372036854775807", i64::MAX),
            ("-9223372036854775808", i64::MIN),
        ] {
            assert_eq!(i64::parse_key(text), Some(n), "{text}");
            assert_eq!(n.to_key_string(), text);
        }
        assert_eq!(u64::parse_key("18446744073709551615"), Some(u64::MAX));
        assert_eq!(u128::parse_key(&u128::MAX.to_key_string()), Some(u128::MAX));
        assert_eq!(isize::parse_key("-1"), Some(-1));
        // Every value round-trips through its text form.
        for n in [0_u16, 1, 9, 10, 99, 100, 65535] {
            assert_eq!(u16::parse_key(&n.to_key_string()), Some(n));
        }
    }
}
