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

macro_rules! int_key {
    ($($t:ty),*) => {$(
        impl CacheKey for $t {
            fn write_key(&self, out: &mut String) {
                use std::fmt::Write;
                // Writing to a String cannot fail.
                let _ = write!(out, "{self}");
            }
            fn parse_key(s: &str) -> Option<Self> {
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
