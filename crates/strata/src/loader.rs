//! The loader port: how a cache reads a missing value from the system of record
//! (usually the database), for read-through, early refresh and warm-up.

use std::future::Future;
use std::marker::PhantomData;

use async_trait::async_trait;

use crate::key::{CacheKey, CacheValue};

/// The error a loader returns: anything that can be boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Reads values from the system of record. Set one per cache with
/// [`CacheBuilder::loader`](crate::CacheBuilder::loader) and read through it with
/// [`Cache::fetch`](crate::Cache::fetch) and
/// [`Cache::get_or_load_many`](crate::Cache::get_or_load_many);
/// [`Cache::get_or_load`](crate::Cache::get_or_load) takes a per-call closure instead.
///
/// `Ok(None)` means "no such row" (cached only with a `negative_ttl`).
#[async_trait]
pub trait Loader<K, V>: Send + Sync + 'static
where
    K: Send + Sync + 'static,
    V: Send + 'static,
{
    /// Loads one key.
    async fn load(&self, key: &K) -> Result<Option<V>, BoxError>;

    /// Loads several keys; the result is in the order of `keys`. The default calls
    /// [`Loader::load`] for each in turn; override it with one query
    /// (`WHERE id = ANY($1)`) where the database can.
    async fn load_many(&self, keys: &[K]) -> Result<Vec<Option<V>>, BoxError> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.load(key).await?);
        }
        Ok(out)
    }
}

/// A [`Loader`] made of an async function of the key; see [`loader_fn`].
pub struct LoaderFn<F, K> {
    f: F,
    _key: PhantomData<fn(K)>,
}

/// Makes a [`Loader`] of an async function that takes the key by value:
///
/// ```
/// use strata::{Cache, loader_fn};
///
/// # fn main() -> Result<(), strata::BuildError> {
/// let cache: Cache<u64, String> = Cache::builder("billsetting")
///     .loader(loader_fn(|id: u64| async move { Ok::<_, std::io::Error>(Some(format!("row {id}"))) }))
///     .build()?;
/// # Ok(()) }
/// ```
pub fn loader_fn<F, K>(f: F) -> LoaderFn<F, K> {
    LoaderFn { f, _key: PhantomData }
}

#[async_trait]
impl<K, V, F, Fut, E> Loader<K, V> for LoaderFn<F, K>
where
    K: CacheKey,
    V: CacheValue,
    F: Fn(K) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<V>, E>> + Send,
    E: Into<BoxError>,
{
    async fn load(&self, key: &K) -> Result<Option<V>, BoxError> {
        (self.f)(key.clone()).await.map_err(Into::into)
    }
}
