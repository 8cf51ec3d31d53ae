//! What a trace learns about a value type (the format of every position, the named
//! containers it refers to) and its canonical text, the input of the fingerprint.

use std::fmt::Write;

/// The format of one position in a value.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum Fmt {
    /// Not learnt yet: a shape holding it is incomplete.
    #[default]
    Unknown,
    Unit,
    Bool,
    I8,
    I16,
    I32,
    I64,
    I128,
    U8,
    U16,
    U32,
    U64,
    U128,
    F32,
    F64,
    Char,
    Str,
    Bytes,
    Option(Box<Fmt>),
    Seq(Box<Fmt>),
    Map(Box<Fmt>, Box<Fmt>),
    Tuple(Vec<Fmt>),
    /// A named container (struct or enum), by its index in [`Graph::containers`].
    Ref(usize),
}

/// Named fields, in order.
pub(crate) type Fields = Vec<(&'static str, Fmt)>;

/// The payload of one enum variant.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Payload {
    Unit,
    Newtype(Fmt),
    Tuple(Vec<Fmt>),
    Struct(Fields),
}

/// One enum variant whose payload was traced to the end.
#[derive(Debug, Clone)]
pub(crate) struct Variant {
    pub(crate) name: &'static str,
    pub(crate) payload: Payload,
    /// Traced without meeting a container already being traced: a value of it can
    /// always be made without recursion.
    pub(crate) leaf: bool,
}

/// The shape of a named container.
#[derive(Debug, Clone)]
pub(crate) enum Shape {
    UnitStruct,
    Newtype(Fmt),
    TupleStruct(Vec<Fmt>),
    Struct(Fields),
    /// One slot per variant index, filled as each variant is traced.
    Enum(Vec<Option<Variant>>),
}

/// A named container: serde's name for it and, once traced, its shape.
#[derive(Debug, Clone)]
pub(crate) struct Container {
    pub(crate) name: &'static str,
    pub(crate) shape: Option<Shape>,
}

/// Every container a trace met.
#[derive(Debug, Default)]
pub(crate) struct Graph {
    pub(crate) containers: Vec<Container>,
}

impl Graph {
    /// The canonical text of the value whose root position has format `root`, or
    /// `None` while anything reachable from it is unknown (an enum variant not traced
    /// yet included).
    ///
    /// Containers are numbered in the order a depth-first walk from the root meets
    /// them and written out in full where first met (`#0=Name{...}`), by number after
    /// (`#0`), so the text does not depend on the order of the trace and recursive
    /// types are finite. Field names, variant names and indices, and every primitive
    /// type are in it; so are container names (renaming a type changes it).
    pub(crate) fn canonical(&self, root: &Fmt) -> Option<String> {
        let mut w =
            Writer { graph: self, numbers: vec![None; self.containers.len()], next: 0, out: String::new() };
        w.fmt(root)?;
        Some(w.out)
    }
}

impl Graph {
    /// Whether anything reachable from `payload` is still unknown.
    pub(crate) fn incomplete(&self, payload: &Payload) -> bool {
        let mut seen = vec![false; self.containers.len()];
        match payload {
            Payload::Unit => false,
            Payload::Newtype(f) => self.reaches_unknown(f, &mut seen),
            Payload::Tuple(items) => items.iter().any(|f| self.reaches_unknown(f, &mut seen)),
            Payload::Struct(fields) => fields.iter().any(|(_, f)| self.reaches_unknown(f, &mut seen)),
        }
    }

    fn reaches_unknown(&self, f: &Fmt, seen: &mut [bool]) -> bool {
        match f {
            Fmt::Unknown => true,
            Fmt::Option(inner) | Fmt::Seq(inner) => self.reaches_unknown(inner, seen),
            Fmt::Map(k, v) => self.reaches_unknown(k, seen) || self.reaches_unknown(v, seen),
            Fmt::Tuple(items) => items.iter().any(|f| self.reaches_unknown(f, seen)),
            Fmt::Ref(id) => {
                match seen.get_mut(*id) {
                    Some(s) if !*s => *s = true,
                    _ => return false,
                }
                let Some(shape) = self.containers.get(*id).and_then(|c| c.shape.as_ref()) else {
                    return true;
                };
                match shape {
                    Shape::UnitStruct => false,
                    Shape::Newtype(f) => self.reaches_unknown(f, seen),
                    Shape::TupleStruct(items) => items.iter().any(|f| self.reaches_unknown(f, seen)),
                    Shape::Struct(fields) => fields.iter().any(|(_, f)| self.reaches_unknown(f, seen)),
                    Shape::Enum(variants) => variants.iter().any(|v| match v {
                        None => true,
                        Some(v) => match &v.payload {
                            Payload::Unit => false,
                            Payload::Newtype(f) => self.reaches_unknown(f, seen),
                            Payload::Tuple(items) => items.iter().any(|f| self.reaches_unknown(f, seen)),
                            Payload::Struct(fields) => {
                                fields.iter().any(|(_, f)| self.reaches_unknown(f, seen))
                            }
                        },
                    }),
                }
            }
            _ => false,
        }
    }
}

struct Writer<'g> {
    graph: &'g Graph,
    numbers: Vec<Option<usize>>,
    next: usize,
    out: String,
}

impl Writer<'_> {
    fn fmt(&mut self, f: &Fmt) -> Option<()> {
        let prim = match f {
            Fmt::Unknown => return None,
            Fmt::Unit => "()",
            Fmt::Bool => "bool",
            Fmt::I8 => "i8",
            Fmt::I16 => "i16",
            Fmt::I32 => "i32",
            Fmt::I64 => "i64",
            Fmt::I128 => "i128",
            Fmt::U8 => "u8",
            Fmt::U16 => "u16",
            Fmt::U32 => "u32",
            Fmt::U64 => "u64",
            Fmt::U128 => "u128",
            Fmt::F32 => "f32",
            Fmt::F64 => "f64",
            Fmt::Char => "char",
            Fmt::Str => "str",
            Fmt::Bytes => "bytes",
            Fmt::Option(inner) => {
                self.out.push('?');
                return self.fmt(inner);
            }
            Fmt::Seq(inner) => {
                self.out.push('[');
                self.fmt(inner)?;
                self.out.push(']');
                return Some(());
            }
            Fmt::Map(k, v) => {
                self.out.push('{');
                self.fmt(k)?;
                self.out.push_str("=>");
                self.fmt(v)?;
                self.out.push('}');
                return Some(());
            }
            Fmt::Tuple(items) => return self.list(items),
            Fmt::Ref(id) => return self.container(*id),
        };
        self.out.push_str(prim);
        Some(())
    }

    fn list(&mut self, items: &[Fmt]) -> Option<()> {
        self.out.push('(');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.fmt(item)?;
        }
        self.out.push(')');
        Some(())
    }

    fn fields(&mut self, fields: &Fields) -> Option<()> {
        self.out.push('{');
        for (i, (name, f)) in fields.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(name);
            self.out.push(':');
            self.fmt(f)?;
        }
        self.out.push('}');
        Some(())
    }

    fn container(&mut self, id: usize) -> Option<()> {
        let slot = self.numbers.get_mut(id)?;
        if let Some(n) = *slot {
            let _ = write!(self.out, "#{n}");
            return Some(());
        }
        let n = self.next;
        *slot = Some(n);
        self.next += 1;
        let graph = self.graph;
        let c = graph.containers.get(id)?;
        let _ = write!(self.out, "#{n}={}", c.name);
        match c.shape.as_ref()? {
            Shape::UnitStruct => Some(()),
            Shape::Newtype(f) => self.list(std::slice::from_ref(f)),
            Shape::TupleStruct(items) => self.list(items),
            Shape::Struct(fields) => self.fields(fields),
            Shape::Enum(variants) => {
                self.out.push('<');
                for (i, v) in variants.iter().enumerate() {
                    let v = v.as_ref()?;
                    if i > 0 {
                        self.out.push('|');
                    }
                    let _ = write!(self.out, "{i}:{}", v.name);
                    match &v.payload {
                        Payload::Unit => {}
                        Payload::Newtype(f) => self.list(std::slice::from_ref(f))?,
                        Payload::Tuple(items) => self.list(items)?,
                        Payload::Struct(fields) => self.fields(fields)?,
                    }
                }
                self.out.push('>');
                Some(())
            }
        }
    }
}
