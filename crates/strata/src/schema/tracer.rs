//! The state of a trace across its runs: the containers met, the variants tried, the
//! made-up values offered per leaf type, and the errors that end a run.

use std::any::type_name;
use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::de;

use super::shape::{Container, Fmt, Graph, Shape, Variant};

/// Nesting deeper than this ends a run.
const MAX_DEPTH: usize = 128;

/// Numbers, one first: it passes `NonZero` types and calendar fields (a month, a day
/// of the year) as well as plain numbers.
pub(crate) const NUMS: [u8; 2] = [1, 0];
pub(crate) const STRS: [&str; 9] = [
    "",
    "0",
    "1970-01-01T00:00:00Z",
    "1970-01-01T00:00:00",
    "1970-01-01",
    "00:00:00",
    "00000000-0000-0000-0000-000000000000",
    "0.0.0.0",
    "a",
];
pub(crate) const BYTES: [&[u8]; 6] = [&[], &[0; 16], &[0; 4], &[0; 8], &[0; 32], &[1]];
pub(crate) const CHARS: [char; 2] = ['a', '0'];

/// The made-up values of one kind of leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Leaf {
    Bool,
    Int,
    Float,
    Char,
    Str,
    Bytes,
}

impl Leaf {
    pub(crate) fn count(self) -> usize {
        match self {
            Leaf::Bool => 2,
            Leaf::Int | Leaf::Float => NUMS.len(),
            Leaf::Char => CHARS.len(),
            Leaf::Str => STRS.len(),
            Leaf::Bytes => BYTES.len(),
        }
    }
}

/// Why a type could not be traced.
#[derive(Debug)]
pub(crate) struct ProbeError {
    msg: String,
    /// Raised by the type's own `Deserialize` (it refused a made-up value), and not yet
    /// answered by offering another one.
    refused: bool,
}

impl ProbeError {
    pub(crate) fn new(msg: impl Into<String>) -> Self {
        ProbeError { msg: msg.into(), refused: false }
    }
}

impl ProbeError {
    /// This refusal was answered (the next run offers another value).
    pub(crate) fn answered(self) -> Self {
        ProbeError { refused: false, ..self }
    }

    pub(crate) fn panicked() -> Self {
        ProbeError::new("the type's Deserialize panicked")
    }
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for ProbeError {}

impl de::Error for ProbeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ProbeError { msg: msg.to_string(), refused: true }
    }
}

pub(crate) type Result<T> = std::result::Result<T, ProbeError>;

/// What a trace knows, kept across its runs.
#[derive(Default)]
pub(crate) struct Tracer {
    pub(crate) graph: Graph,
    /// Container by (Rust type name, serde name).
    pub(crate) ids: HashMap<(&'static str, &'static str), usize>,
    /// The containers being deserialized, outermost first.
    pub(crate) stack: Vec<usize>,
    /// Variants (container, index) tried since something was last learnt.
    pub(crate) tried: HashSet<(usize, usize)>,
    /// Per enum: variants guessed for a minimal value while none was traced, since
    /// something was last learnt.
    pub(crate) guessed: HashMap<usize, usize>,
    /// Whether this run tried a variant (or guessed one) not tried before.
    pub(crate) tried_new: bool,
    /// Per leaf type (the Rust type the visitor makes) and kind: the made-up value to offer.
    pub(crate) candidates: HashMap<(&'static str, Leaf), usize>,
    /// Counts what was learnt: a shape or variant traced, a made-up value refused.
    pub(crate) progress: u64,
    /// Counts the times a container was met inside itself.
    pub(crate) reentries: u64,
    /// The leaf met last, whose value a type reading it may refuse after the leaf's
    /// visitor took it (`let s = String::deserialize(d)?; parse(&s)?`).
    pub(crate) last_leaf: Option<(&'static str, Leaf)>,
    /// How deep the current position is nested.
    pub(crate) depth: usize,
}

impl Tracer {
    /// Takes note of a refusal by a type that read the last leaf with another type's
    /// visitor: the next run offers that leaf's next made-up value.
    pub(crate) fn answer(&mut self, mut e: ProbeError) -> ProbeError {
        if e.refused
            && let Some(key) = self.last_leaf.take()
        {
            e.refused = false;
            self.refuse(key);
        }
        e
    }

    pub(crate) fn refuse(&mut self, key: (&'static str, Leaf)) {
        let next = self.candidates.get(&key).map_or(1, |i| i + 1);
        self.candidates.insert(key, next);
        self.progress += 1;
    }

    pub(crate) fn enter(&mut self) -> Result<()> {
        if self.depth >= MAX_DEPTH {
            return Err(ProbeError::new(format!("nested deeper than {MAX_DEPTH}")));
        }
        self.depth += 1;
        Ok(())
    }

    pub(crate) fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }

    /// Records container `name` (made by the visitor of `T`) at `out`; returns its id and
    /// whether to trace it (false inside a minimal value or when met inside itself).
    pub(crate) fn enter_container<T>(
        &mut self,
        name: &'static str,
        out: &mut Fmt,
        minimal: bool,
    ) -> Result<(usize, bool)> {
        self.enter()?;
        let graph = &mut self.graph;
        let id = *self.ids.entry((type_name::<T>(), name)).or_insert_with(|| {
            graph.containers.push(Container { name, shape: None });
            graph.containers.len() - 1
        });
        *out = Fmt::Ref(id);
        let recursive = self.stack.contains(&id);
        if recursive {
            self.reentries += 1;
        }
        self.stack.push(id);
        Ok((id, !minimal && !recursive))
    }

    pub(crate) fn leave_container(&mut self) {
        self.stack.pop();
        self.leave();
    }

    pub(crate) fn commit(&mut self, id: usize, shape: Shape) {
        if let Some(c) = self.graph.containers.get_mut(id)
            && c.shape.is_none()
        {
            c.shape = Some(shape);
            self.progress += 1;
        }
    }

    /// The variant of enum `id` to make: when tracing, one not traced (nor tried since
    /// the last progress) yet; else a traced one, preferring one that needs no recursion.
    pub(crate) fn pick_variant(
        &mut self,
        id: usize,
        names: &'static [&'static str],
        explore: bool,
    ) -> Result<usize> {
        let c = self.graph.containers.get_mut(id).ok_or_else(|| ProbeError::new("lost container"))?;
        if c.shape.is_none() {
            c.shape = Some(Shape::Enum(vec![None; names.len()]));
        }
        let graph = &self.graph;
        let c = graph.containers.get(id).ok_or_else(|| ProbeError::new("lost container"))?;
        let variants = match &c.shape {
            Some(Shape::Enum(v)) if v.len() == names.len() => v,
            _ => return Err(ProbeError::new(format!("{} deserialized in two ways", c.name))),
        };
        if explore {
            if let Some(i) =
                (0..variants.len()).find(|&i| variants[i].is_none() && !self.tried.contains(&(id, i)))
            {
                self.tried.insert((id, i));
                self.tried_new = true;
                return Ok(i);
            }
            // Every variant traced or tried: go where something is still unknown.
            if let Some(i) =
                variants.iter().position(|v| v.as_ref().is_some_and(|v| graph.incomplete(&v.payload)))
            {
                return Ok(i);
            }
        }
        let traced = variants
            .iter()
            .position(|v| v.as_ref().is_some_and(|v| v.leaf))
            .or_else(|| variants.iter().position(Option::is_some));
        if let Some(i) = traced {
            return Ok(i);
        }
        // None traced yet (the enum is first met inside a minimal value): guess, a
        // different variant each run until one is traced.
        let guess = self.guessed.entry(id).or_insert(0);
        if *guess < variants.len() {
            *guess += 1;
            self.tried_new = true;
            return Ok(*guess - 1);
        }
        Err(ProbeError::new(format!("no variant of {} can be made yet", c.name)))
    }

    pub(crate) fn commit_variant(&mut self, id: usize, index: usize, variant: Variant) {
        if let Some(Container { shape: Some(Shape::Enum(variants)), .. }) = self.graph.containers.get_mut(id)
            && let Some(slot @ None) = variants.get_mut(index)
        {
            *slot = Some(variant);
            self.progress += 1;
        }
    }
}
