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
//!    while it holds, see [`Tier::lock`](crate::tier::Tier::lock)), and broadcasts the
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

use std::sync::Arc;

use super::erased::{ErasedCache, LockState};
use super::state::{Inner, Lifetime};
use crate::backplane::MessageBody;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{CacheKey, CacheValue};
use crate::l1::By;
use crate::scope::Scope;

/// The scopes a write names, merged: one key scope (sorted, without duplicates), each
/// tag once, or the namespace alone when it is among them; nothing empty.
fn normalize(scopes: Vec<Scope>) -> Vec<Scope> {
    if scopes.contains(&Scope::All) {
        return vec![Scope::All];
    }
    let mut keys = Vec::new();
    let mut tags: Vec<String> = Vec::new();
    for scope in scopes {
        match scope {
            Scope::Keys(k) => keys.extend(k),
            Scope::Tag(t) if !tags.contains(&t) => tags.push(t),
            Scope::Tag(_) | Scope::All => {}
        }
    }
    keys.sort_unstable();
    keys.dedup();
    let mut out = Vec::with_capacity(1 + tags.len());
    if !keys.is_empty() {
        out.push(Scope::Keys(keys));
    }
    out.extend(tags.into_iter().map(Scope::Tag));
    out
}

impl<K: CacheKey, V: CacheValue> Inner<K, V> {
    /// Takes a write lock on `scopes` (see the [module docs](self)).
    pub(crate) async fn lock_for_write(&self, scopes: Vec<Scope>) -> Result<LockState> {
        let Some(l2) = &self.l2 else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "lock_for_write needs an L2 tier (build the cache with .tier(...))",
            ));
        };
        if self.is_closed() {
            return Err(Error::new(
                ErrorKind::Shutdown,
                "the cache was shut down; the write must not commit",
            ));
        }
        let scopes = normalize(scopes);
        let mut lock = LockState {
            id: rand::random::<u64>() | 1,
            scopes: Vec::with_capacity(scopes.len()),
            message: None,
            taken_at: tokio::time::Instant::now(),
            ttl: self.cfg.write_lock_ttl,
        };
        if scopes.is_empty() {
            return Ok(lock);
        }
        self.clean_l2_if_bypassed().await;
        for scope in &scopes {
            self.drop_local(scope, None, By::Own);
        }
        for scope in &scopes {
            let res = l2.call("lock", &self.stats, l2.tier().lock(l2.ns(), scope, lock.id, lock.ttl)).await;
            if let Err(e) = res {
                self.stats.write_locks_failed.incr();
                self.abort_lock(lock).await;
                return Err(
                    Error::new(e.kind(), "write lock not taken; the write must not commit").with_source(e)
                );
            }
            lock.scopes.push(scope.clone());
        }
        // One message must carry the whole write so that a single acknowledgement
        // covers it: the scope itself, or for keys and tags together (or several tags)
        // the namespace, the one scope that covers them all.
        let message = match lock.scopes.as_slice() {
            [one] => one.clone(),
            _ => Scope::All,
        };
        // L1s may have been refilled from L2 before the lock: drop them again.
        for scope in &lock.scopes {
            self.drop_local(scope, None, By::Own);
        }
        lock.message = Some(message.clone());
        if let Err(e) = self.publish(MessageBody::Invalidate(message)).await {
            self.stats.write_locks_failed.incr();
            self.abort_lock(lock).await;
            return Err(
                Error::new(e.kind(), "write lock not acknowledged; the write must not commit").with_source(e)
            );
        }
        self.stats.write_locks.incr();
        Ok(lock)
    }

    /// After the commit (or the rollback): invalidates the scopes in L2 once more, drops
    /// the locks, drops the local copies, and runs the after-invalidate hooks.
    pub(crate) async fn release_lock(&self, mut lock: LockState) -> Result<()> {
        let scopes = lock.scopes.clone();
        let mut res = self.unlock_all(&mut lock).await;
        if let Err(e) = &res {
            self.pending.lock().unlocks.extend(scopes.iter().map(|s| (s.clone(), lock.id)));
            for scope in &scopes {
                self.l2_invalidation_failed(scope, e);
            }
        }
        for scope in &scopes {
            self.drop_local(scope, None, By::Own);
        }
        if let Some(message) = lock.message.take()
            && !self.cfg.is_strong()
            && let Err(e) = self.publish(MessageBody::Invalidate(message)).await
        {
            res = res.and(Err(e));
        }
        for scope in &scopes {
            self.run_hooks(scope);
        }
        res
    }

    /// Releases without running hooks (the write did not happen).
    pub(crate) async fn abort_lock(&self, mut lock: LockState) {
        let _ = self.unlock_all(&mut lock).await;
    }

    async fn unlock_all(&self, lock: &mut LockState) -> Result<()> {
        let Some(l2) = &self.l2 else { return Ok(()) };
        let mut first_err = None;
        for scope in std::mem::take(&mut lock.scopes) {
            let res = l2.call("unlock", &self.stats, l2.tier().unlock(l2.ns(), &scope, lock.id)).await;
            if let Err(e) = res {
                self.stats.write_locks_expired.incr();
                tracing::warn!(error = %e, namespace = %self.cfg.namespace, "write lock not released; it expires by itself");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// A write lock taken by [`Cache::lock_for_write`](crate::Cache::lock_for_write) (or
/// [`CacheHandle::lock_for_write`](crate::CacheHandle::lock_for_write)): hold it across
/// the database commit, then [`release`](Self::release) it.
///
/// Dropping it without releasing releases it in the background (when a tokio runtime
/// is available), else the L2 lock expires after the cache's `write_lock_ttl`.
#[must_use = "release the lock after the commit (or the rollback)"]
pub struct WriteLock {
    cache: Arc<dyn ErasedCache>,
    _lifetime: Arc<Lifetime>,
    /// `None` once released.
    state: Option<LockState>,
}

impl WriteLock {
    /// Takes a write lock on `scopes` of `cache`.
    pub(crate) async fn take(
        cache: Arc<dyn ErasedCache>,
        lifetime: Arc<Lifetime>,
        scopes: Vec<Scope>,
    ) -> Result<WriteLock> {
        let state = cache.lock(scopes).await?;
        Ok(WriteLock { cache, _lifetime: lifetime, state: Some(state) })
    }

    /// Whether a commit may still start: less than half the lock's time to live has
    /// passed since it was requested. Past that, a commit could land after the lock
    /// expired, when a fill of the old value would be accepted again; roll back
    /// instead.
    pub fn is_valid(&self) -> bool {
        self.state.as_ref().is_none_or(|s| s.taken_at.elapsed() < s.ttl / 2)
    }

    /// The lock's id in L2.
    pub fn id(&self) -> u64 {
        self.state.as_ref().map_or(0, |s| s.id)
    }

    /// After the commit (or the rollback): invalidates the scope in L2 once more, drops
    /// the lock, drops the local copies, and runs the after-invalidate hooks.
    ///
    /// # Errors
    ///
    /// When L2 could not be reached. Nothing stale can reach L2 even so (the lock
    /// expires after `write_lock_ttl`, and nothing loaded under it is ever stored), and
    /// the cache handles the failure as it does a failed invalidation: buffered and
    /// retried, and at the Strong level the cache is bypassed until a namespace bump
    /// has succeeded.
    pub async fn release(mut self) -> Result<()> {
        match self.state.take() {
            Some(state) => self.cache.release(state).await,
            None => Ok(()),
        }
    }

    /// Releases without running hooks: the write did not happen.
    pub async fn abort(mut self) {
        if let Some(state) = self.state.take() {
            self.cache.abort(state).await;
        }
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let Some(state) = self.state.take() else { return };
        if state.scopes.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let cache = self.cache.clone();
        rt.spawn(async move { cache.abort(state).await });
    }
}

impl std::fmt::Debug for WriteLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteLock")
            .field("namespace", &self.cache.namespace())
            .field("id", &self.id())
            .field("scopes", &self.state.as_ref().map(|s| &s.scopes))
            .field("valid", &self.is_valid())
            .finish()
    }
}
