//! The schema identity of cached values: what keeps one build from reading another
//! build's L2 entries as its own type.
//!
//! postcard, like most compact codecs, does not describe what it writes: the bytes of a
//! `{amount: 10000, fee: 30, status: Completed}` decode just as well as a type whose
//! two fields are swapped and whose enum gained a variant, as `{fee: 10000, amount: 30,
//! status: Refunded}`. During a rolling deploy both builds share L2. So every
//! [`Envelope`](crate::tier::Envelope) carries the *schema fingerprint* of the cache
//! that wrote it, and a cache decodes only entries carrying its own; any other entry is
//! a miss, counted in [`CacheStats::l2_schema_mismatches`](crate::CacheStats), and left
//! in place (the other build may be serving it) until this build's next fill of the key
//! replaces it.
//!
//! The fingerprint is an xxh3 hash of
//!
//! * the value type's *shape* as serde describes it to a binary format, traced once in
//!   [`build`](crate::CacheBuilder::build) by deserializing made-up values: every
//!   struct's name and its fields' names, order and types; every enum's name and its
//!   variants' names, order (indices) and payloads, nested enums included; options,
//!   sequences, maps, tuples and every primitive type (`u32` is not `u64`). Renaming,
//!   reordering, adding or removing a field or a variant, or changing a type, changes
//!   it (so does renaming a type, at the cost of a cold start, never of wrong data);
//! * the codec's [`name`](crate::Codec::name) (another codec writes other bytes);
//! * the cache's [`schema_version`](crate::CacheBuilder::schema_version): raise it
//!   for a change serde cannot see (same shape, new meaning: cents become units).
//!
//! # Types that cannot be traced
//!
//! A type whose `Deserialize` needs a self-describing format (`deserialize_any`:
//! untagged and internally tagged enums, `#[serde(flatten)]`), or refuses every
//! made-up value offered (a few are tried: one and zero, empty and date-, time- and
//! UUID-like strings, empty and 16-byte buffers), or nests deeper than 128 levels, is
//! not traced: the fingerprint then covers the type's Rust name
//! ([`std::any::type_name`]) in place of its shape, and `build()` logs a warning. Such
//! a fingerprint does not change when the type's fields do: raise the schema version
//! with every change of the type. (postcard cannot encode most of those types anyway.)

mod probe;
mod shape;
mod tracer;

use serde::de::DeserializeOwned;

/// The schema identity of a value type under a codec and a schema version: see the
/// [module docs](self).
///
/// ```
/// use strata::schema::Schema;
///
/// #[derive(serde::Deserialize)]
/// struct Payment {
///     amount: u64,
///     fee: u64,
/// }
///
/// let schema = Schema::of::<Payment>("postcard-1", 0);
/// assert_eq!(schema.shape(), Some("#0=Payment{amount:u64,fee:u64}"));
/// assert_ne!(schema.fingerprint(), Schema::of::<Payment>("postcard-1", 1).fingerprint());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    fingerprint: u64,
    shape: Option<String>,
    untraced: Option<String>,
}

impl Schema {
    /// The schema of values of type `V` written by the codec named `codec` (see
    /// [`Codec::name`](crate::Codec::name)) under schema version `version`.
    pub fn of<V: DeserializeOwned>(codec: &str, version: u32) -> Schema {
        let traced = std::panic::catch_unwind(probe::trace::<V>)
            .unwrap_or_else(|_| Err(tracer::ProbeError::panicked()));
        let (identity, shape, untraced) = match traced {
            Ok(shape) => (format!("shape {shape}"), Some(shape), None),
            Err(e) => (format!("type {}", std::any::type_name::<V>()), None, Some(e.to_string())),
        };
        let input = format!("strata-schema 1\ncodec {codec}\nversion {version}\n{identity}");
        Schema { fingerprint: xxhash_rust::xxh3::xxh3_64(input.as_bytes()), shape, untraced }
    }

    /// The fingerprint every L2 entry written under this schema carries.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The traced shape in its canonical text (the input of the fingerprint), or `None`
    /// when the type could not be traced and the fingerprint covers its name only.
    pub fn shape(&self) -> Option<&str> {
        self.shape.as_deref()
    }

    /// Why the type could not be traced, when it could not.
    pub fn untraced_reason(&self) -> Option<&str> {
        self.untraced.as_deref()
    }
}

/// The fingerprint a cache of `namespace` writes and reads, with a warning when its
/// value type could not be traced.
pub(crate) fn fingerprint_for_cache<V: DeserializeOwned>(namespace: &str, codec: &str, version: u32) -> u64 {
    let schema = Schema::of::<V>(codec, version);
    if let Some(reason) = schema.untraced_reason() {
        tracing::warn!(
            namespace,
            value_type = std::any::type_name::<V>(),
            reason,
            "the value type's serde shape could not be traced: L2 entries are told apart by its type \
             name, not by its fields; raise CacheBuilder::schema_version with every change of the type"
        );
    }
    schema.fingerprint
}

#[cfg(test)]
mod tests;
