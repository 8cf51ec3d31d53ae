//! [`CacheHandle`]: a cache with its key and value types erased, for code that serves
//! many caches without knowing their types (change capture, transaction helpers, an
//! admin router, `strata invalidate`).

use std::sync::Arc;

use super::erased::{CacheHealth, ErasedCache};
use super::state::Lifetime;
use super::write_lock::WriteLock;
use crate::backplane::OriginId;
use crate::consistency::Consistency;
use crate::error::Result;
use crate::scope::Scope;
use crate::stats::CacheStats;

/// A type-erased handle to a [`Cache`](crate::Cache), from
/// [`Cache::handle`](crate::Cache::handle). Cheap to clone; it keeps the cache running
/// like any other handle. Keys travel in their text form
/// ([`CacheKey::write_key`](crate::CacheKey::write_key)) and are parsed where L1 needs them.
#[derive(Clone)]
pub struct CacheHandle {
    cache: Arc<dyn ErasedCache>,
    lifetime: Arc<Lifetime>,
}

impl CacheHandle {
    pub(crate) fn new(cache: Arc<dyn ErasedCache>, lifetime: Arc<Lifetime>) -> Self {
        CacheHandle { cache, lifetime }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        self.cache.namespace()
    }

    /// The consistency level in force.
    pub fn consistency(&self) -> Consistency {
        self.cache.consistency()
    }

    /// The cache's origin id on the backplane: the same for every handle of one built
    /// cache, so it identifies the cache.
    pub fn origin(&self) -> OriginId {
        self.cache.origin()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// What a health or readiness probe needs to know.
    pub fn health(&self) -> CacheHealth {
        self.cache.health()
    }

    /// Resolves once the cache is ready to serve (see [`Cache::ready`](crate::Cache::ready)).
    pub async fn ready(&self) {
        self.cache.ready().await;
    }

    /// The keys of `keys` that parse as the cache's key type
    /// ([`CacheKey::parse_key`](crate::CacheKey::parse_key), which accepts only the
    /// canonical form: `"007"` is not an integer key), written back as text, and how many
    /// did not parse.
    pub fn canonical_keys(&self, keys: &[String]) -> (Vec<String>, usize) {
        self.cache.canonical_keys(keys)
    }

    /// Invalidates `scope` everywhere, as the typed methods of
    /// [`Cache`](crate::Cache) do. Keys that do not parse as the cache's key type are
    /// still invalidated in L2 and on the other instances.
    pub async fn invalidate(&self, scope: Scope) -> Result<()> {
        self.cache.invalidate(scope).await
    }

    /// Takes a write lock, as [`Cache::lock_for_write`](crate::Cache::lock_for_write).
    pub async fn lock_for_write(&self, scopes: Vec<Scope>) -> Result<WriteLock> {
        WriteLock::take(self.cache.clone(), self.lifetime.clone(), scopes).await
    }
}

impl std::fmt::Debug for CacheHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheHandle")
            .field("namespace", &self.namespace())
            .field("consistency", &self.consistency())
            .field("origin", &self.origin())
            .finish()
    }
}
