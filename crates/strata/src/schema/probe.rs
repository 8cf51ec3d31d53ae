//! The trace: deserializes the value type from a probe that records what every
//! `deserialize_*` call asks for and answers with made-up values, run after run, until
//! every enum variant reachable from the root has been traced.
//!
//! * Each run deserializes one value. Options are `Some`, sequences and maps hold one
//!   element, so every position is reached; each enum met picks a variant not traced
//!   yet, so the runs walk through all of them (nested enums included, behind options,
//!   sequences and maps too).
//! * A container met again inside itself (a recursive type) is recorded as a reference
//!   and answered with a *minimal* value: options `None`, empty sequences and maps, for
//!   an enum a variant already traced that needs no recursion. A variant that cannot be
//!   made yet is tried again once another one has been traced.
//! * A leaf value the type refuses (a `NonZeroU64`, a string that must parse as a date
//!   or a UUID) makes the next run offer the next of a few made-up values for that type
//!   (for the last leaf read, when the type refuses after reading it with another's
//!   visitor).
//! * Runs, nesting depth and made-up values are bounded; past them, or at anything only
//!   a self-describing format supports (`deserialize_any`: untagged enums, `flatten`…),
//!   the trace fails and the caller falls back to the type's name.

use std::any::type_name;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, EnumAccess, IntoDeserializer, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};

use super::shape::{Fields, Fmt, Payload, Shape, Variant};
use super::tracer::{BYTES, CHARS, Leaf, NUMS, ProbeError, Result, STRS, Tracer};

/// At most this many values are deserialized.
const MAX_RUNS: usize = 4096;

/// The canonical text of `V`'s shape (see [`Graph::canonical`]).
pub(crate) fn trace<V: DeserializeOwned>() -> Result<String> {
    let mut t = Tracer::default();
    let mut last = None;
    for _ in 0..MAX_RUNS {
        let before = t.progress;
        t.tried_new = false;
        t.stack.clear();
        t.depth = 0;
        t.last_leaf = None;
        let mut root = Fmt::Unknown;
        match V::deserialize(Probe { t: &mut t, out: &mut root, minimal: false }) {
            Ok(_) => {
                if let Some(text) = t.graph.canonical(&root) {
                    return Ok(text);
                }
            }
            Err(e) => last = Some(t.answer(e)),
        }
        if t.progress != before {
            t.tried.clear();
            t.guessed.clear();
        } else if !t.tried_new {
            return Err(last.unwrap_or_else(|| ProbeError::new("the trace stopped learning")));
        }
    }
    Err(ProbeError::new(format!("not traced in {MAX_RUNS} runs")))
}

/// Deserializes one position, recording its format in `out`.
struct Probe<'a> {
    t: &'a mut Tracer,
    out: &'a mut Fmt,
    /// Make the smallest value (no options, empty sequences) and learn nothing.
    minimal: bool,
}

impl Probe<'_> {
    fn leaf<'de, V: Visitor<'de>>(
        self,
        fmt: Fmt,
        kind: Leaf,
        visitor: V,
        visit: impl FnOnce(V, usize) -> Result<V::Value>,
    ) -> Result<V::Value> {
        *self.out = fmt;
        let key = (type_name::<V::Value>(), kind);
        let i = self.t.candidates.get(&key).copied().unwrap_or(0);
        if i >= kind.count() {
            return Err(ProbeError::new(format!("{} refuses every made-up value", key.0)));
        }
        self.t.last_leaf = Some(key);
        visit(visitor, i).map_err(|e| {
            self.t.last_leaf = None;
            self.t.refuse(key);
            e.answered()
        })
    }

    /// A sequence of `len` positions (a tuple, a struct's fields…) into `slots`.
    fn elems<'de, V: Visitor<'de>>(
        t: &mut Tracer,
        slots: &mut [Fmt],
        minimal: bool,
        visitor: V,
    ) -> Result<V::Value> {
        visitor.visit_seq(Elems { t, slots: slots.iter_mut(), minimal })
    }
}

macro_rules! leaves {
    ($($method:ident => $fmt:ident, $kind:ident, |$v:ident, $i:ident| $visit:expr;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
            self.leaf(Fmt::$fmt, Leaf::$kind, visitor, |$v, $i| $visit)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = ProbeError;

    leaves! {
        deserialize_bool => Bool, Bool, |v, i| v.visit_bool(i == 1);
        deserialize_i8 => I8, Int, |v, i| v.visit_i8(NUMS[i] as i8);
        deserialize_i16 => I16, Int, |v, i| v.visit_i16(NUMS[i] as i16);
        deserialize_i32 => I32, Int, |v, i| v.visit_i32(NUMS[i] as i32);
        deserialize_i64 => I64, Int, |v, i| v.visit_i64(NUMS[i] as i64);
        deserialize_i128 => I128, Int, |v, i| v.visit_i128(NUMS[i] as i128);
        deserialize_u8 => U8, Int, |v, i| v.visit_u8(NUMS[i]);
        deserialize_u16 => U16, Int, |v, i| v.visit_u16(NUMS[i] as u16);
        deserialize_u32 => U32, Int, |v, i| v.visit_u32(NUMS[i] as u32);
        deserialize_u64 => U64, Int, |v, i| v.visit_u64(NUMS[i] as u64);
        deserialize_u128 => U128, Int, |v, i| v.visit_u128(NUMS[i] as u128);
        deserialize_f32 => F32, Float, |v, i| v.visit_f32(NUMS[i] as f32);
        deserialize_f64 => F64, Float, |v, i| v.visit_f64(NUMS[i] as f64);
        deserialize_char => Char, Char, |v, i| v.visit_char(CHARS[i]);
        deserialize_str => Str, Str, |v, i| v.visit_str(STRS[i]);
        deserialize_string => Str, Str, |v, i| v.visit_string(STRS[i].to_owned());
        deserialize_bytes => Bytes, Bytes, |v, i| v.visit_bytes(BYTES[i]);
        deserialize_byte_buf => Bytes, Bytes, |v, i| v.visit_byte_buf(BYTES[i].to_vec());
    }

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value> {
        Err(ProbeError::new(
            "deserialize_any (a format that describes itself: untagged or internally tagged enums, flatten…)",
        ))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, _: V) -> Result<V::Value> {
        Err(ProbeError::new("deserialize_identifier outside an enum"))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value> {
        Err(ProbeError::new("deserialize_ignored_any"))
    }

    fn is_human_readable(&self) -> bool {
        // As postcard and other binary codecs: types such as addresses, UUIDs and
        // timestamps pick their compact form.
        false
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        *self.out = Fmt::Unit;
        visitor.visit_unit()
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let Probe { t, out, minimal } = self;
        if minimal {
            return visitor.visit_none();
        }
        t.enter()?;
        let mut inner = Fmt::Unknown;
        let r = visitor.visit_some(Probe { t: &mut *t, out: &mut inner, minimal });
        t.leave();
        *out = Fmt::Option(Box::new(inner));
        r
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let Probe { t, out, minimal } = self;
        t.enter()?;
        let mut slot = [Fmt::Unknown];
        let n = usize::from(!minimal);
        let r = Probe::elems(&mut *t, &mut slot[..n], minimal, visitor);
        t.leave();
        let [elem] = slot;
        *out = Fmt::Seq(Box::new(elem));
        r
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value> {
        let Probe { t, out, minimal } = self;
        t.enter()?;
        let mut slots = vec![Fmt::Unknown; len];
        let r = Probe::elems(&mut *t, &mut slots, minimal, visitor);
        t.leave();
        *out = Fmt::Tuple(slots);
        r
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let Probe { t, out, minimal } = self;
        t.enter()?;
        let (mut k, mut v) = (Fmt::Unknown, Fmt::Unknown);
        let entry = (!minimal).then_some((&mut k, &mut v));
        let r = visitor.visit_map(Entries { t: &mut *t, entry, value: None, minimal });
        t.leave();
        *out = Fmt::Map(Box::new(k), Box::new(v));
        r
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value> {
        let Probe { t, out, minimal } = self;
        let (id, explore) = t.enter_container::<V::Value>(name, out, minimal)?;
        let r = visitor.visit_unit();
        t.leave_container();
        if explore && r.is_ok() {
            t.commit(id, Shape::UnitStruct);
        }
        r
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value> {
        let Probe { t, out, minimal } = self;
        let (id, explore) = t.enter_container::<V::Value>(name, out, minimal)?;
        let mut inner = Fmt::Unknown;
        let r = visitor.visit_newtype_struct(Probe { t: &mut *t, out: &mut inner, minimal: !explore });
        t.leave_container();
        if explore && r.is_ok() {
            t.commit(id, Shape::Newtype(inner));
        }
        r
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value> {
        let Probe { t, out, minimal } = self;
        let (id, explore) = t.enter_container::<V::Value>(name, out, minimal)?;
        let mut slots = vec![Fmt::Unknown; len];
        let r = Probe::elems(&mut *t, &mut slots, !explore, visitor);
        t.leave_container();
        if explore && r.is_ok() {
            t.commit(id, Shape::TupleStruct(slots));
        }
        r
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        let Probe { t, out, minimal } = self;
        let (id, explore) = t.enter_container::<V::Value>(name, out, minimal)?;
        let mut slots = vec![Fmt::Unknown; fields.len()];
        let r = Probe::elems(&mut *t, &mut slots, !explore, visitor);
        t.leave_container();
        if explore && r.is_ok() {
            t.commit(id, Shape::Struct(fields.iter().copied().zip(slots).collect()));
        }
        r
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        let Probe { t, out, minimal } = self;
        if variants.is_empty() {
            return Err(ProbeError::new(format!("enum {name} has no variant")));
        }
        let (id, explore) = t.enter_container::<V::Value>(name, out, minimal)?;
        let index = match t.pick_variant(id, variants, explore) {
            Ok(i) => i,
            Err(e) => {
                t.leave_container();
                return Err(e);
            }
        };
        let before = t.reentries;
        let mut payload = None;
        let r = visitor.visit_enum(EnumProbe { t: &mut *t, index, payload: &mut payload, minimal: !explore });
        t.leave_container();
        if explore
            && r.is_ok()
            && let (Some(payload), Some(&name)) = (payload, variants.get(index))
        {
            let leaf = t.reentries == before;
            t.commit_variant(id, index, Variant { name, payload, leaf });
        }
        r
    }
}

/// The positions of a sequence, a tuple or a struct's fields.
struct Elems<'a> {
    t: &'a mut Tracer,
    slots: std::slice::IterMut<'a, Fmt>,
    minimal: bool,
}

impl<'de> SeqAccess<'de> for Elems<'_> {
    type Error = ProbeError;

    fn next_element_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<Option<S::Value>> {
        match self.slots.next() {
            None => Ok(None),
            Some(out) => seed.deserialize(Probe { t: &mut *self.t, out, minimal: self.minimal }).map(Some),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.slots.len())
    }
}

/// A map of one entry (none in a minimal value).
struct Entries<'a> {
    t: &'a mut Tracer,
    entry: Option<(&'a mut Fmt, &'a mut Fmt)>,
    value: Option<&'a mut Fmt>,
    minimal: bool,
}

impl<'de> MapAccess<'de> for Entries<'_> {
    type Error = ProbeError;

    fn next_key_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<Option<S::Value>> {
        let Some((key, value)) = self.entry.take() else { return Ok(None) };
        self.value = Some(value);
        seed.deserialize(Probe { t: &mut *self.t, out: key, minimal: self.minimal }).map(Some)
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value> {
        let out = self.value.take().ok_or_else(|| ProbeError::new("a map value before its key"))?;
        seed.deserialize(Probe { t: &mut *self.t, out, minimal: self.minimal })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(usize::from(self.entry.is_some()))
    }
}

/// The variant `index` of an enum, its payload recorded in `payload`.
struct EnumProbe<'a> {
    t: &'a mut Tracer,
    index: usize,
    payload: &'a mut Option<Payload>,
    minimal: bool,
}

impl<'de, 'a> EnumAccess<'de> for EnumProbe<'a> {
    type Error = ProbeError;
    type Variant = EnumProbe<'a>;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self::Variant)> {
        let index = u32::try_from(self.index).map_err(|_| ProbeError::new("more than 2^32 variants"))?;
        let id = seed.deserialize(IntoDeserializer::<'de, ProbeError>::into_deserializer(index))?;
        Ok((id, self))
    }
}

impl<'de> VariantAccess<'de> for EnumProbe<'_> {
    type Error = ProbeError;

    fn unit_variant(self) -> Result<()> {
        *self.payload = Some(Payload::Unit);
        Ok(())
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value> {
        let mut inner = Fmt::Unknown;
        let v = seed.deserialize(Probe { t: self.t, out: &mut inner, minimal: self.minimal })?;
        *self.payload = Some(Payload::Newtype(inner));
        Ok(v)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value> {
        let mut slots = vec![Fmt::Unknown; len];
        let v = Probe::elems(self.t, &mut slots, self.minimal, visitor)?;
        *self.payload = Some(Payload::Tuple(slots));
        Ok(v)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        let mut slots = vec![Fmt::Unknown; fields.len()];
        let v = Probe::elems(self.t, &mut slots, self.minimal, visitor)?;
        let fields: Fields = fields.iter().copied().zip(slots).collect();
        *self.payload = Some(Payload::Struct(fields));
        Ok(v)
    }
}
