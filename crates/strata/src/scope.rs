//! What an invalidation covers: these keys, one tag, or the whole namespace.
//!
//! One type for every place that concept travels:
//! [`Cache::invalidate_scope`](crate::Cache::invalidate_scope), the after-invalidate hooks, backplane messages,
//! write locks (in the core and in [`Tier::lock`](crate::tier::Tier::lock)), and the
//! buffer of invalidations waiting for a retry.

use serde::{Deserialize, Serialize};

use crate::key::CacheKey;

/// What an invalidation covers. Keys are in their text form ([`CacheKey::write_key`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// These keys.
    Keys(Vec<String>),
    /// Every entry carrying this tag.
    Tag(String),
    /// The whole namespace.
    All,
}

impl Scope {
    /// The scope of `keys`, in their text form.
    pub fn keys<'a, K: CacheKey>(keys: impl IntoIterator<Item = &'a K>) -> Scope {
        Scope::Keys(keys.into_iter().map(CacheKey::to_key_string).collect())
    }

    /// The scope of one key.
    pub fn key<K: CacheKey>(key: &K) -> Scope {
        Scope::Keys(vec![key.to_key_string()])
    }

    /// The scope of one tag.
    pub fn tag(tag: impl Into<String>) -> Scope {
        Scope::Tag(tag.into())
    }

    /// True for a key scope without keys: there is nothing to invalidate.
    pub fn is_empty(&self) -> bool {
        matches!(self, Scope::Keys(k) if k.is_empty())
    }

    /// A short description for logs and errors ("3 keys", "tag \"plan:gold\"", "all").
    pub fn describe(&self) -> String {
        match self {
            Scope::Keys(k) if k.len() == 1 => "1 key".to_owned(),
            Scope::Keys(k) => format!("{} keys", k.len()),
            Scope::Tag(t) => format!("tag {t:?}"),
            Scope::All => "all".to_owned(),
        }
    }
}
