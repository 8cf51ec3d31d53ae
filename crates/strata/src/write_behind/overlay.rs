//! The read side of write-behind: a load asks the queue for a waiting save before it
//! calls the loader, so no read returns the database's row while a newer save waits.

use std::future::Future;

use crate::cache::state::Inner;
use crate::key::{CacheKey, CacheValue};
use crate::loader::{BoxError, Loader};

impl<K: CacheKey, V: CacheValue> Inner<K, V> {
    /// The value of a save of `key_str` still waiting in the write-behind queue.
    async fn waiting_save(&self, key_str: &str) -> Result<Option<V>, BoxError> {
        let Some(wb) = &self.write_behind else { return Ok(None) };
        let Some(bytes) = wb.cfg.queue.pending_value(&self.cfg.namespace, key_str).await? else {
            return Ok(None);
        };
        Ok(Some(self.cfg.codec.decode(&bytes)?))
    }

    /// For reads that never load (`get`, `get_many`): the waiting save of `key`, if
    /// any; `Ok(None)` without write-behind.
    pub(crate) async fn waiting_value(&self, key: &K) -> crate::error::Result<Option<V>> {
        if self.write_behind.is_none() {
            return Ok(None);
        }
        self.waiting_save(&key.to_key_string()).await.map_err(|e| {
            crate::error::Error::new(crate::error::ErrorKind::Rejected, "write-behind queue lookup failed")
                .with_shared_source(std::sync::Arc::from(e))
        })
    }

    /// `load`, unless a save of the key waits in the write-behind queue: then its value.
    /// A queue that cannot answer fails the load (it may hold a newer save).
    pub(crate) async fn load_one<Fut, E>(&self, key_str: &str, load: Fut) -> Result<Option<V>, BoxError>
    where
        Fut: Future<Output = Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        if let Some(value) = self.waiting_save(key_str).await? {
            return Ok(Some(value));
        }
        load.await.map_err(Into::into)
    }

    /// [`Loader::load_many`] of `keys`, with the waiting saves taking the place of the
    /// loader's values (the loader is asked only for the other keys).
    pub(crate) async fn load_many_waiting_first(
        &self,
        keys: &[K],
        loader: &dyn Loader<K, V>,
    ) -> Result<Vec<Option<V>>, BoxError> {
        if self.write_behind.is_none() {
            return loader.load_many(keys).await;
        }
        let mut out: Vec<Option<Option<V>>> = Vec::with_capacity(keys.len());
        let mut rest = Vec::new();
        for key in keys {
            let waiting = self.waiting_save(&key.to_key_string()).await?;
            if waiting.is_none() {
                rest.push(key.clone());
            }
            out.push(waiting.map(Some));
        }
        let mut loaded =
            if rest.is_empty() { Vec::new() } else { loader.load_many(&rest).await? }.into_iter();
        if loaded.len() != rest.len() {
            return Err(format!("load_many returned {} values for {} keys", loaded.len(), rest.len()).into());
        }
        Ok(out.into_iter().map(|slot| slot.unwrap_or_else(|| loaded.next().flatten())).collect())
    }
}
