//! The builder's write-behind setting (see [`crate::write_behind`]).

use super::builder::CacheBuilder;
use crate::key::{CacheKey, CacheValue};
use crate::write_behind::WriteBehindConfig;

impl<K: CacheKey, V: CacheValue> CacheBuilder<K, V> {
    /// Turns write-behind on: [`Cache::write_behind`](crate::Cache::write_behind) saves
    /// through `config`'s queue, a flusher writes through its sink, and every load of a
    /// missing key asks the queue for a waiting save before it calls the loader (one
    /// queue round trip per load; the queue's failure fails the load rather than let it
    /// return a database row older than an acknowledged save). Off by default.
    pub fn write_behind(mut self, config: WriteBehindConfig<K, V>) -> Self {
        self.write_behind = Some(config);
        self
    }
}
