//! Write locks: invalidation *before* a commit, so that no instance can serve the old
//! value once any instance can read the new one.
//!
//! Invalidating after a commit leaves a window: between `COMMIT` and the moment every
//! member dropped its copy, one instance may load the new row from the database while
//! another still serves the old one from its L1 — a read going backwards in time, which
//! the Strong level must not allow. A write lock closes it:
//!
//! 1. [`Cache::lock_for_write`] (before `COMMIT`): drops the local copies, takes a lock
//!    in L2 (which invalidates the scope there and poisons every fill token handed out
//!    while it holds, see [`Tier::lock`](crate::Tier::lock)), and broadcasts the
//!    invalidation; at the Strong level it returns once every live member acknowledged
//!    it or let its lease lapse. From then on, no instance has the old value in L1, and
//!    none can put it back: at the Strong level L1 is only filled with what L2 returned
//!    or accepted, and L2 accepts nothing for the locked scope.
//! 2. The caller commits, if [`WriteLock::is_valid`] still holds (else it rolls back).
//! 3. [`WriteLock::release`] (after `COMMIT`, or after a rollback): invalidates the
//!    scope in L2 once more (tokens issued under the lock may carry values read before
//!    the commit) and drops the lock. If that fails, the lock expires by itself and
//!    its poisoned tokens stay refused, so L2 still never receives the old value.
//!
//! The cost: one more L2 round trip per write, and reads of the locked keys load from
//! the database until the release (a few milliseconds for a typical transaction).

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backplane::MessageBody;
use crate::builder::Invalidation;
use crate::cache::Cache;
use crate::error::{Error, ErrorKind, Result};
use crate::key::CacheKey;
use crate::tier::LockScope;

/// What a write lock covers, owned.
#[derive(Debug, Clone)]
pub(crate) enum Scope {
    Keys(Vec<String>),
    Tag(String),
    Namespace,
}

impl Scope {
    pub(crate) fn borrow(&self) -> LockScope<'_> {
        match self {
            Scope::Keys(k) => LockScope::Keys(k),
            Scope::Tag(t) => LockScope::Tag(t),
            Scope::Namespace => LockScope::Namespace,
        }
    }
}

/// A write lock taken by [`Cache::lock_for_write`]: hold it across the database
/// commit, then [`release`](Self::release) it.
///
/// Dropping it without releasing releases it in the background (when a tokio runtime
/// is available), else the L2 lock expires after the cache's `write_lock_ttl`.
#[must_use = "release the lock after the commit (or the rollback)"]
pub struct WriteLock<K, V>
where
    K: CacheKey,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    cache: Cache<K, V>,
    id: u64,
    scopes: Vec<Scope>,
    keys: Vec<K>,
    all: bool,
    /// The message sent with the lock; sent again after the commit below the Strong
    /// level, whose members may fill L1 without L2's consent.
    body: Option<MessageBody>,
    /// When the first L2 lock was requested: the tier's expiry counts from later.
    taken_at: tokio::time::Instant,
    ttl: Duration,
    released: bool,
}

impl<K, V> Cache<K, V>
where
    K: CacheKey,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    /// Invalidates `keys`, `tags` (or, with `all`, the whole namespace) *before* a
    /// database write commits, and keeps them from being cached again until
    /// [`WriteLock::release`]: see the [module docs](crate::WriteLock) for why the
    /// Strong level needs this. The transaction helper of `strata-sql` calls it for
    /// every Strong cache a transaction names.
    ///
    /// Returns once the local copies are gone, L2 holds the lock and the message is on
    /// the backplane; at the Strong level, once every live member acknowledged it or
    /// let its membership lease lapse.
    ///
    /// # Errors
    ///
    /// When L2 cannot take the lock, or the backplane message fails, or (Strong) a
    /// member neither acknowledged nor let its lease lapse: then the write must not
    /// commit. Whatever was locked is released again before the error returns.
    pub async fn lock_for_write(&self, keys: &[K], tags: &[String], all: bool) -> Result<WriteLock<K, V>> {
        let inner = &self.inner;
        let Some(tier) = inner.tier.clone() else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "lock_for_write needs an L2 tier (build the cache with .tier(...))",
            ));
        };
        let mut key_strs: Vec<String> = keys.iter().map(CacheKey::to_key_string).collect();
        key_strs.sort_unstable();
        key_strs.dedup();
        let scopes: Vec<Scope> = if all {
            vec![Scope::Namespace]
        } else {
            let mut s = Vec::with_capacity(1 + tags.len());
            if !key_strs.is_empty() {
                s.push(Scope::Keys(key_strs.clone()));
            }
            s.extend(tags.iter().map(|t| Scope::Tag(t.clone())));
            s
        };
        let mut lock = WriteLock {
            cache: self.clone(),
            id: rand::random::<u64>() | 1,
            scopes: Vec::with_capacity(scopes.len()),
            keys: keys.to_vec(),
            all,
            body: None,
            taken_at: tokio::time::Instant::now(),
            ttl: inner.cfg.write_lock_ttl,
            released: false,
        };
        if scopes.is_empty() {
            lock.released = true;
            return Ok(lock);
        }
        inner.clean_l2_if_untrusted().await;
        lock.drop_local();
        for scope in scopes {
            let res = inner
                .l2_call("lock", tier.lock(&inner.cfg.namespace, scope.borrow(), lock.id, lock.ttl))
                .await;
            match res {
                Ok(()) => lock.scopes.push(scope),
                Err(e) => {
                    inner.stats.write_locks_failed.incr();
                    lock.abort().await;
                    return Err(Error::new(e.kind(), "write lock not taken; the write must not commit")
                        .with_source(e));
                }
            }
        }
        let body = if all {
            MessageBody::All
        } else if tags.is_empty() {
            MessageBody::Keys(key_strs)
        } else if key_strs.is_empty() && tags.len() == 1 {
            MessageBody::Tag(tags[0].clone())
        } else {
            // Keys and tags, or several tags: one message must carry them all so that a
            // single acknowledgement covers the write. Dropping the namespace's L1s is
            // the one body that does.
            MessageBody::All
        };
        // L1s may have been refilled from L2 before the lock: drop them again.
        lock.drop_local();
        lock.body = Some(body.clone());
        if let Err(e) = inner.publish(body).await {
            inner.stats.write_locks_failed.incr();
            lock.abort().await;
            return Err(
                Error::new(e.kind(), "write lock not acknowledged; the write must not commit").with_source(e)
            );
        }
        inner.stats.write_locks.incr();
        Ok(lock)
    }
}

impl<K, V> WriteLock<K, V>
where
    K: CacheKey,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    /// Whether a commit may still start: less than half the lock's time to live has
    /// passed since it was requested. Past that, a commit could land after the lock
    /// expired, when a fill of the old value would be accepted again; roll back
    /// instead.
    pub fn is_valid(&self) -> bool {
        self.released || self.taken_at.elapsed() < self.ttl / 2
    }

    /// The lock's id in L2.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// After the commit (or the rollback): invalidates the scope in L2 once more, drops
    /// the lock, drops the local copies, and runs the after-invalidate hooks.
    ///
    /// # Errors
    ///
    /// When L2 could not be reached. Nothing stale can reach L2 even so (the lock
    /// expires after `write_lock_ttl`, and nothing loaded under it is ever stored), and
    /// the cache handles the failure as it does a failed invalidation: buffered and
    /// retried, and at the Strong level every read bypasses the cache until a namespace
    /// bump has succeeded.
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        let scopes = self.scopes.clone();
        let mut res = self.unlock_all().await;
        if let Err(e) = &res {
            let inner = &self.cache.inner;
            inner.pending.lock().unlocks.extend(scopes.iter().map(|s| (s.clone(), self.id)));
            for scope in scopes {
                match scope {
                    Scope::Keys(keys) => inner.l2_invalidation_failed(Some(keys), None, e),
                    Scope::Tag(tag) => inner.l2_invalidation_failed(None, Some(tag), e),
                    Scope::Namespace => inner.l2_invalidation_failed(None, None, e),
                }
            }
        }
        self.drop_local();
        let inner = &self.cache.inner;
        if let Some(body) = self.body.take()
            && !inner.strong
            && let Err(e) = inner.publish(body).await
        {
            res = res.and(Err(e));
        }
        let what = if self.all {
            Invalidation::All
        } else {
            Invalidation::Keys(self.keys.iter().map(CacheKey::to_key_string).collect())
        };
        inner.run_hooks(&what);
        for scope in &self.scopes {
            if let Scope::Tag(t) = scope {
                inner.run_hooks(&Invalidation::Tag(t.clone()));
            }
        }
        res
    }

    /// Releases without running hooks (the write did not happen).
    async fn abort(mut self) {
        self.released = true;
        let _ = self.unlock_all().await;
    }

    async fn unlock_all(&mut self) -> Result<()> {
        let inner = &self.cache.inner;
        let Some(tier) = inner.tier.clone() else { return Ok(()) };
        let mut first_err = None;
        for scope in std::mem::take(&mut self.scopes) {
            let res =
                inner.l2_call("unlock", tier.unlock(&inner.cfg.namespace, scope.borrow(), self.id)).await;
            if let Err(e) = res {
                inner.stats.write_locks_expired.incr();
                tracing::warn!(error = %e, namespace = %inner.cfg.namespace, "write lock not released; it expires by itself");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Drops this instance's copies of the scope and refuses the fills in flight.
    fn drop_local(&self) {
        let inner = &self.cache.inner;
        if self.all {
            inner.flush_l1();
            return;
        }
        let now = inner.now();
        for key in &self.keys {
            inner.evict_key(key, now);
        }
        for scope in &self.scopes {
            if let Scope::Tag(t) = scope {
                inner.guards.invalidate_tag(t);
                inner.flights.detach_all();
            }
        }
    }
}

impl<K, V> Drop for WriteLock<K, V>
where
    K: CacheKey,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    fn drop(&mut self) {
        if self.released || self.scopes.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let lock = WriteLock {
            cache: self.cache.clone(),
            id: self.id,
            scopes: std::mem::take(&mut self.scopes),
            keys: std::mem::take(&mut self.keys),
            all: self.all,
            body: None,
            taken_at: self.taken_at,
            ttl: self.ttl,
            released: true,
        };
        rt.spawn(async move {
            let mut lock = lock;
            let _ = lock.unlock_all().await;
        });
    }
}

impl<K, V> std::fmt::Debug for WriteLock<K, V>
where
    K: CacheKey,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteLock")
            .field("namespace", &self.cache.namespace())
            .field("id", &self.id)
            .field("scopes", &self.scopes)
            .field("valid", &self.is_valid())
            .finish()
    }
}
