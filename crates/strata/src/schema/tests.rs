//! The shapes traced and the changes that move the fingerprint. Types of one name in
//! sibling modules stand for one type in two builds. Their fields are only traced.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU64;

use serde::Deserialize;

use super::Schema;

fn shape<V: serde::de::DeserializeOwned>() -> String {
    let s = Schema::of::<V>("postcard-1", 0);
    match s.shape() {
        Some(shape) => shape.to_owned(),
        None => panic!("not traced: {:?}", s.untraced_reason()),
    }
}

fn fp<V: serde::de::DeserializeOwned>() -> u64 {
    Schema::of::<V>("postcard-1", 0).fingerprint()
}

mod base {
    #[derive(serde::Deserialize)]
    pub struct Payment {
        pub amount: u64,
        pub fee: u64,
        pub status: Status,
        pub note: Option<String>,
    }
    #[derive(serde::Deserialize)]
    pub enum Status {
        Pending,
        Completed,
    }
}

/// Each module changes `base` in one way.
macro_rules! variant_of_base {
    ($m:ident, { $($fields:tt)* }, { $($variants:tt)* }) => {
        mod $m {
            #[derive(serde::Deserialize)]
            pub struct Payment { $($fields)* }
            #[derive(serde::Deserialize)]
            pub enum Status { $($variants)* }
        }
    };
}

variant_of_base!(same, { amount: u64, fee: u64, status: Status, note: Option<String> }, { Pending, Completed });
variant_of_base!(renamed_field, { amount: u64, fees: u64, status: Status, note: Option<String> }, { Pending, Completed });
variant_of_base!(swapped_fields, { fee: u64, amount: u64, status: Status, note: Option<String> }, { Pending, Completed });
variant_of_base!(retyped_field, { amount: u32, fee: u64, status: Status, note: Option<String> }, { Pending, Completed });
variant_of_base!(signed_field, { amount: i64, fee: u64, status: Status, note: Option<String> }, { Pending, Completed });
variant_of_base!(not_optional, { amount: u64, fee: u64, status: Status, note: String }, { Pending, Completed });
variant_of_base!(added_field, { amount: u64, fee: u64, status: Status, note: Option<String>, more: bool }, { Pending, Completed });
variant_of_base!(removed_field, { amount: u64, fee: u64, status: Status }, { Pending, Completed });
variant_of_base!(added_variant, { amount: u64, fee: u64, status: Status, note: Option<String> }, { Pending, Completed, Refunded });
variant_of_base!(inserted_variant, { amount: u64, fee: u64, status: Status, note: Option<String> }, { Pending, Refunded, Completed });
variant_of_base!(removed_variant, { amount: u64, fee: u64, status: Status, note: Option<String> }, { Completed });
variant_of_base!(swapped_variants, { amount: u64, fee: u64, status: Status, note: Option<String> }, { Completed, Pending });
variant_of_base!(renamed_variant, { amount: u64, fee: u64, status: Status, note: Option<String> }, { Pending, Done });
variant_of_base!(variant_payload, { amount: u64, fee: u64, status: Status, note: Option<String> }, { Pending, Completed(u64) });

#[test]
fn the_shape_of_a_plain_type() {
    assert_eq!(
        shape::<base::Payment>(),
        "#0=Payment{amount:u64,fee:u64,status:#1=Status<0:Pending|1:Completed>,note:?str}"
    );
}

#[test]
fn every_change_of_the_shape_changes_the_fingerprint() {
    let base = fp::<base::Payment>();
    assert_eq!(fp::<same::Payment>(), base, "the same shape in another module (another build)");
    let changed = [
        ("renamed field", fp::<renamed_field::Payment>()),
        ("swapped fields", fp::<swapped_fields::Payment>()),
        ("u32 for u64", fp::<retyped_field::Payment>()),
        ("i64 for u64", fp::<signed_field::Payment>()),
        ("String for Option<String>", fp::<not_optional::Payment>()),
        ("added field", fp::<added_field::Payment>()),
        ("removed field", fp::<removed_field::Payment>()),
        ("added variant", fp::<added_variant::Payment>()),
        ("inserted variant", fp::<inserted_variant::Payment>()),
        ("removed variant", fp::<removed_variant::Payment>()),
        ("swapped variants", fp::<swapped_variants::Payment>()),
        ("renamed variant", fp::<renamed_variant::Payment>()),
        ("variant payload", fp::<variant_payload::Payment>()),
    ];
    let mut seen = vec![base];
    for (what, f) in changed {
        assert!(!seen.contains(&f), "{what}: fingerprint unchanged");
        seen.push(f);
    }
}

#[test]
fn codec_and_schema_version_change_the_fingerprint() {
    let base = Schema::of::<base::Payment>("postcard-1", 0).fingerprint();
    assert_ne!(Schema::of::<base::Payment>("postcard-1", 1).fingerprint(), base);
    assert_ne!(Schema::of::<base::Payment>("json", 0).fingerprint(), base);
    assert_eq!(Schema::of::<base::Payment>("postcard-1", 0).fingerprint(), base, "deterministic");
}

mod nested_a {
    #[derive(serde::Deserialize)]
    pub struct Order {
        pub lines: Vec<Line>,
        pub by_kind: std::collections::BTreeMap<String, Kind>,
        pub refund: Option<Refund>,
    }
    #[derive(serde::Deserialize)]
    pub struct Line {
        pub kind: Kind,
    }
    #[derive(serde::Deserialize)]
    pub enum Kind {
        Goods,
        Shipping,
    }
    #[derive(serde::Deserialize)]
    pub enum Refund {
        Full,
        Partial { reason: Reason },
    }
    #[derive(serde::Deserialize)]
    pub enum Reason {
        Damaged,
        Late,
    }
}

mod nested_b {
    #[derive(serde::Deserialize)]
    pub struct Order {
        pub lines: Vec<Line>,
        pub by_kind: std::collections::BTreeMap<String, Kind>,
        pub refund: Option<Refund>,
    }
    #[derive(serde::Deserialize)]
    pub struct Line {
        pub kind: Kind,
    }
    #[derive(serde::Deserialize)]
    pub enum Kind {
        Goods,
        Shipping,
    }
    #[derive(serde::Deserialize)]
    pub enum Refund {
        Full,
        Partial { reason: Reason },
    }
    /// Only this enum, behind an option, a struct variant and two enums, changed.
    #[derive(serde::Deserialize)]
    pub enum Reason {
        Late,
        Damaged,
    }
}

#[test]
fn enums_behind_options_sequences_and_maps_are_traced_to_every_variant() {
    assert_eq!(
        shape::<nested_a::Order>(),
        "#0=Order{lines:[#1=Line{kind:#2=Kind<0:Goods|1:Shipping>}],by_kind:{str=>#2},\
         refund:?#3=Refund<0:Full|1:Partial{reason:#4=Reason<0:Damaged|1:Late>}>}"
    );
    assert_ne!(fp::<nested_a::Order>(), fp::<nested_b::Order>());
}

#[derive(Deserialize)]
enum List {
    Cons(u64, Box<List>),
    Nil,
}

#[derive(Deserialize)]
struct Tree {
    value: u64,
    children: Vec<Tree>,
    parent: Option<Box<Tree>>,
}

#[derive(Deserialize)]
enum Expr {
    Add(Box<Expr>, Box<Expr>),
    Neg(Box<Expr>),
    Lit(i64),
    Let { name: String, value: Box<Expr>, body: Box<Expr> },
}

#[derive(Deserialize)]
struct Node {
    children: Vec<Node>,
    kind: Kind,
    next: Option<Box<Node>>,
}

#[derive(Deserialize)]
enum Kind {
    Leaf,
    Branch { weight: Option<u8>, of: Box<Node> },
}

#[test]
fn recursive_types_are_traced_even_when_the_first_variant_recurses() {
    assert_eq!(
        shape::<Node>(),
        "#0=Node{children:[#0],kind:#1=Kind<0:Leaf|1:Branch{weight:?u8,of:#0}>,next:?#0}"
    );
    assert_eq!(shape::<List>(), "#0=List<0:Cons(u64,#0)|1:Nil>");
    assert_eq!(shape::<Tree>(), "#0=Tree{value:u64,children:[#0],parent:?#0}");
    assert_eq!(
        shape::<Expr>(),
        "#0=Expr<0:Add(#0,#0)|1:Neg(#0)|2:Lit(i64)|3:Let{name:str,value:#0,body:#0}>"
    );
}

/// A date that validates what it reads, as chrono's types do.
struct Date(String);

impl<'de> Deserialize<'de> for Date {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok = s.len() >= 10 && s.as_bytes()[4] == b'-' && s.as_bytes()[7] == b'-';
        if ok { Ok(Date(s)) } else { Err(serde::de::Error::custom(format!("not a date: {s:?}"))) }
    }
}

#[derive(Deserialize)]
struct Validated {
    id: NonZeroU64,
    on: Date,
    tags: HashMap<String, Vec<u8>>,
    scores: BTreeMap<u32, (f64, char)>,
    raw: bytes::Bytes,
    shared: std::sync::Arc<str>,
    pair: [u16; 2],
    unit: (),
}

#[test]
fn types_that_validate_what_they_read_are_traced_with_other_made_up_values() {
    assert_eq!(
        shape::<Validated>(),
        "#0=Validated{id:u64,on:str,tags:{str=>[u8]},scores:{u32=>(f64,char)},raw:bytes,shared:str,\
         pair:(u16,u16),unit:()}"
    );
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Untagged {
    Number(u64),
    Text(String),
}

/// Refuses everything: no made-up value will do.
struct Picky;

impl<'de> Deserialize<'de> for Picky {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        Err(serde::de::Error::custom(format!("{n} is not 42")))
    }
}

/// Panics while deserialized.
struct Panicky;

impl<'de> Deserialize<'de> for Panicky {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        panic!("never deserialize me")
    }
}

#[derive(Deserialize)]
enum Endless {
    Again(Box<Endless>),
}

#[test]
fn types_that_cannot_be_traced_fall_back_to_their_name() {
    fn untraced<V: serde::de::DeserializeOwned>() -> Schema {
        let s = Schema::of::<V>("postcard-1", 0);
        assert_eq!(s.shape(), None, "{} traced", std::any::type_name::<V>());
        assert!(s.untraced_reason().is_some());
        assert_eq!(s, Schema::of::<V>("postcard-1", 0), "still deterministic");
        assert_ne!(s.fingerprint(), Schema::of::<V>("postcard-1", 1).fingerprint(), "the version counts");
        s
    }
    let u = untraced::<Untagged>();
    assert!(u.untraced_reason().is_some_and(|r| r.contains("deserialize_any")), "{u:?}");
    untraced::<Picky>();
    untraced::<Panicky>();
    untraced::<Endless>();
    assert_ne!(untraced::<Untagged>().fingerprint(), untraced::<Picky>().fingerprint());
}

#[test]
fn primitives_and_containers_without_names() {
    assert_eq!(shape::<u64>(), "u64");
    assert_eq!(shape::<String>(), "str");
    assert_eq!(shape::<Vec<Option<(u8, i128)>>>(), "[?(u8,i128)]");
    assert_ne!(fp::<u64>(), fp::<i64>());
    assert_ne!(fp::<Vec<u8>>(), fp::<bytes::Bytes>());
}
