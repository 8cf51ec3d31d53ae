//! What a transaction registered for one cache, and how it reaches the cache: the
//! write lock before `COMMIT` (Strong caches always, Invalidated caches unless the
//! transaction opted out), the invalidation (or the lock's release) after it.

use std::collections::HashSet;

use futures::future::join_all;
use strata::{CacheHandle, Consistency, Scope, WriteLock};

use crate::report::{CacheInvalidation, InvalidationState};

/// The invalidations registered for one cache.
pub(crate) struct Batch {
    pub(crate) cache: CacheHandle,
    /// Keys in text form, in registration order, without duplicates.
    keys: Vec<String>,
    seen: HashSet<String>,
    pub(crate) tags: Vec<String>,
    pub(crate) all: bool,
    /// The write lock taken before `COMMIT`, if any.
    pub(crate) lock: Option<WriteLock>,
}

/// Why a write lock could not be taken before `COMMIT`, for a Strong cache (the
/// transaction must roll back).
pub(crate) struct LockRefused {
    pub(crate) namespace: String,
    pub(crate) error: strata::Error,
}

impl Batch {
    pub(crate) fn new(cache: CacheHandle) -> Self {
        Batch { cache, keys: Vec::new(), seen: HashSet::new(), tags: Vec::new(), all: false, lock: None }
    }

    pub(crate) fn add_key(&mut self, key: String) {
        if self.seen.insert(key.clone()) {
            self.keys.push(key);
        }
    }

    pub(crate) fn namespace(&self) -> &str {
        self.cache.namespace()
    }

    /// What the transaction invalidates in this cache.
    fn scopes(&self) -> Vec<Scope> {
        if self.all {
            return vec![Scope::All];
        }
        let mut scopes = Vec::with_capacity(1 + self.tags.len());
        if !self.keys.is_empty() {
            scopes.push(Scope::Keys(self.keys.clone()));
        }
        scopes.extend(self.tags.iter().cloned().map(Scope::Tag));
        scopes
    }

    /// Before `COMMIT`: takes the write lock of a Strong cache (an error means the
    /// transaction must roll back), and of an Invalidated cache with an L2 tier when
    /// `invalidated_too` (an error is logged and counted, and the cache is then
    /// invalidated after `COMMIT` as without a lock). Local caches: nothing.
    async fn lock(&mut self, invalidated_too: bool) -> Result<(), strata::Error> {
        if self.lock.is_some() {
            return Ok(());
        }
        match self.cache.consistency() {
            Consistency::Strong => self.lock = Some(self.cache.lock_for_write(self.scopes()).await?),
            // A write lock needs L2 (it is where the lock lives and fills are refused).
            Consistency::Invalidated if invalidated_too && self.cache.health().l2_breaker.is_some() => {
                match self.cache.lock_for_write(self.scopes()).await {
                    Ok(lock) => self.lock = Some(lock),
                    Err(e) => {
                        metrics::counter!("strata_sql_write_lock_failures_total",
                            "namespace" => self.namespace().to_owned())
                        .increment(1);
                        tracing::warn!(
                            namespace = self.namespace(),
                            error = %e,
                            "write lock not taken; committing anyway, invalidating after COMMIT \
                             (a writer dying before that would leave other instances stale)",
                        );
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// False when a Strong cache's write lock is held too long for `COMMIT` to start
    /// safely. (An Invalidated cache's lock only covers a writer that dies after
    /// `COMMIT`; the release invalidates after `COMMIT` in any case, so an old one does
    /// not stop the commit.)
    fn lock_valid(&self) -> bool {
        self.cache.consistency() != Consistency::Strong || self.lock.as_ref().is_none_or(WriteLock::is_valid)
    }

    /// The transaction did not commit: releases the write lock, if any.
    async fn abort(self) {
        if let Some(lock) = self.lock {
            lock.abort().await;
        }
    }

    async fn run(self) -> CacheInvalidation {
        let scopes = self.scopes();
        let Batch { cache, keys, tags, all, lock, .. } = self;
        let mut first_err = None;
        let locked = lock.is_some();
        if let Some(lock) = lock {
            // Invalidated before COMMIT; releasing invalidates L2 once more and, below
            // the Strong level, publishes the invalidation again (on failure the cache
            // makes itself safe as an invalidation would).
            if let Err(e) = lock.release().await {
                first_err = Some(e);
            }
        } else {
            for scope in scopes {
                if let Err(e) = cache.invalidate(scope).await {
                    first_err.get_or_insert(e);
                }
            }
        }
        let health = cache.health();
        let state = match &first_err {
            None => InvalidationState::Done,
            Some(_) if health.bypassed => InvalidationState::Bypassed,
            Some(_) if health.pending_invalidations > 0 => InvalidationState::Buffered,
            Some(_) => InvalidationState::Unconfirmed,
        };
        CacheInvalidation {
            namespace: cache.namespace().to_owned(),
            consistency: cache.consistency(),
            keys: if all { 0 } else { keys.len() },
            tags: if all { 0 } else { tags.len() },
            all,
            locked,
            state,
            error: first_err,
        }
    }
}

/// Takes the write locks before `COMMIT` (see [`Batch::lock`]) and checks that none is
/// held too long for `COMMIT` to start. On a refusal every lock taken is released and
/// the transaction must roll back.
pub(crate) async fn lock_all(batches: &mut Vec<Batch>, invalidated_too: bool) -> Result<(), LockRefused> {
    for i in 0..batches.len() {
        if let Err(error) = batches[i].lock(invalidated_too).await {
            let namespace = batches[i].namespace().to_owned();
            abort_locks(std::mem::take(batches)).await;
            tracing::warn!(namespace, error = %error, "write lock failed; transaction rolled back");
            return Err(LockRefused { namespace, error });
        }
    }
    if let Some(namespace) = batches.iter().find(|b| !b.lock_valid()).map(|b| b.namespace().to_owned()) {
        let error = strata::Error::new(
            strata::ErrorKind::Timeout,
            "write lock held past half its time to live before COMMIT; raise write_lock_ttl",
        );
        abort_locks(std::mem::take(batches)).await;
        return Err(LockRefused { namespace, error });
    }
    Ok(())
}

/// Releases the write locks of a transaction that did not commit.
pub(crate) async fn abort_locks(batches: Vec<Batch>) {
    join_all(batches.into_iter().map(Batch::abort)).await;
}

/// Runs every cache's invalidation concurrently (they are independent) and returns
/// once all have returned, in the order the caches were first named.
pub(crate) async fn run_invalidations(batches: Vec<Batch>) -> Vec<CacheInvalidation> {
    let done = join_all(batches.into_iter().map(Batch::run)).await;
    for inv in done.iter().filter(|i| !i.is_done()) {
        let state = match inv.state {
            InvalidationState::Bypassed => "bypassed",
            InvalidationState::Unconfirmed => "unconfirmed",
            _ => "buffered",
        };
        metrics::counter!("strata_sql_invalidation_failures_total",
            "namespace" => inv.namespace.clone(), "state" => state)
        .increment(1);
        tracing::warn!(
            namespace = %inv.namespace,
            state,
            error = ?inv.error,
            "post-commit invalidation failed; the cache made itself safe",
        );
    }
    done
}
