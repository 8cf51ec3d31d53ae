//! The transaction helper: invalidate after commit, then run after-commit actions.

use std::any::Any;
use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use futures::future::{BoxFuture, join_all};
use strata::{Cache, CacheHandle, CacheKey, CacheValue, Consistency, Scope, WriteLock};

use crate::db::{SqlDatabase, definitely_rolled_back};
use crate::error::{CommitError, CommitOutcome};
use crate::report::{ActionOutcome, BoxError, CacheInvalidation, CommitReport, InvalidationState};

/// Begins a transaction on `conn` (a `&Pool`, a `&mut` connection, or anything else
/// sqlx can [`Acquire`](sqlx::Acquire) from) and wraps it in a [`Transaction`].
///
/// For a custom `BEGIN` (isolation level, read only) begin it with sqlx and wrap it:
/// `Transaction::new(pool.begin_with("BEGIN ISOLATION LEVEL SERIALIZABLE").await?)`.
///
/// # Errors
///
/// The error of sqlx's `begin`.
pub async fn begin<'a, A>(conn: A) -> Result<Transaction<'a, A::Database>, sqlx::Error>
where
    A: sqlx::Acquire<'a>,
    A::Database: SqlDatabase,
{
    Ok(Transaction::new(conn.begin().await?))
}

/// A sqlx transaction that remembers which cache entries it changed and what to do
/// once it has committed.
///
/// Use it like a `sqlx::Transaction`: `&mut *tx` is an executor. Register what the
/// transaction changes with [`invalidate`](Self::invalidate) (and its tag / whole
/// namespace variants) and follow-up work with [`after_commit`](Self::after_commit);
/// nothing happens to any cache until [`commit`](Self::commit) has committed.
///
/// Dropping it without committing, or calling [`rollback`](Self::rollback), rolls
/// the transaction back (as sqlx does), invalidates nothing and runs nothing.
///
/// Registering an invalidation for a row the transaction did not in the end change
/// (a savepoint rolled back, a `WHERE` that matched nothing) is harmless: an
/// invalidation never makes a cache serve wrong data, it only costs a miss.
#[must_use = "a transaction is rolled back when dropped; call commit()"]
pub struct Transaction<'c, DB: SqlDatabase> {
    tx: sqlx::Transaction<'c, DB>,
    /// Per cache, in the order each cache was first named.
    batches: Vec<Batch>,
    actions: Vec<Action>,
}

impl<'c, DB: SqlDatabase> Transaction<'c, DB> {
    /// Wraps a transaction begun with sqlx.
    pub fn new(tx: sqlx::Transaction<'c, DB>) -> Self {
        Transaction { tx, batches: Vec::new(), actions: Vec::new() }
    }

    /// The wrapped sqlx transaction, e.g. to open a savepoint with
    /// `sqlx::Acquire::begin(tx.as_sqlx_mut())`.
    pub fn as_sqlx_mut(&mut self) -> &mut sqlx::Transaction<'c, DB> {
        &mut self.tx
    }

    /// Invalidates `key` in `cache` after the commit.
    ///
    /// Keys of one cache are invalidated together, with one
    /// [`Cache::invalidate_many`] call; several caches, with different key and value
    /// types, may be named in one transaction.
    pub fn invalidate<K, V>(&mut self, cache: &Cache<K, V>, key: &K) -> &mut Self
    where
        K: CacheKey,
        V: CacheValue,
    {
        self.with_batch(cache, |b| b.add_key(key.to_key_string()));
        self
    }

    /// Invalidates every key of `keys` in `cache` after the commit.
    pub fn invalidate_many<K, V>(&mut self, cache: &Cache<K, V>, keys: &[K]) -> &mut Self
    where
        K: CacheKey,
        V: CacheValue,
    {
        self.with_batch(cache, |b| {
            for key in keys {
                b.add_key(key.to_key_string());
            }
        });
        self
    }

    /// Invalidates every entry of `cache` carrying `tag` after the commit
    /// ([`Cache::invalidate_tag`]).
    pub fn invalidate_tag<K, V>(&mut self, cache: &Cache<K, V>, tag: impl Into<String>) -> &mut Self
    where
        K: CacheKey,
        V: CacheValue,
    {
        let tag = tag.into();
        self.with_batch(cache, |b| {
            if !b.tags.contains(&tag) {
                b.tags.push(tag);
            }
        });
        self
    }

    /// Invalidates the whole of `cache` after the commit ([`Cache::invalidate_all`]);
    /// keys and tags registered for it are then covered and not sent separately.
    pub fn invalidate_all<K, V>(&mut self, cache: &Cache<K, V>) -> &mut Self
    where
        K: CacheKey,
        V: CacheValue,
    {
        self.with_batch(cache, |b| b.all = true);
        self
    }

    /// Runs `action` after the commit and after every invalidation of this
    /// transaction has returned (publish your domain events here).
    ///
    /// Actions run one at a time, in registration order; each runs even if an earlier
    /// one failed. An action returns `()` or a `Result`; an error or a panic is
    /// logged, counted and listed in the [`CommitReport`], never lost silently.
    /// Actions of a transaction that does not commit never run.
    pub fn after_commit<F, Fut>(&mut self, action: F) -> &mut Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: ActionOutput,
    {
        let name = Cow::Owned(format!("after_commit#{}", self.actions.len()));
        self.push_action(name, action)
    }

    /// [`after_commit`](Self::after_commit) with a name for the report and the logs
    /// (e.g. `"kafka:payment-status"`).
    pub fn after_commit_named<F, Fut>(&mut self, name: impl Into<Cow<'static, str>>, action: F) -> &mut Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: ActionOutput,
    {
        self.push_action(name.into(), action)
    }

    /// How many caches have invalidations registered, and how many after-commit
    /// actions are registered.
    pub fn registered(&self) -> (usize, usize) {
        (self.batches.len(), self.actions.len())
    }

    /// Rolls the transaction back; nothing is invalidated and no action runs.
    ///
    /// # Errors
    ///
    /// The error of sqlx's `rollback` (the transaction is rolled back by the server
    /// anyway when the connection is dropped or reused).
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }

    /// Commits; then invalidates what was registered; then runs the after-commit
    /// actions. The order is strict: no invalidation of a Local or Invalidated cache
    /// starts before `COMMIT` returned success, and no action starts before every
    /// invalidation has returned. Strong caches are invalidated and write-locked
    /// *before* `COMMIT` ([`Cache::lock_for_write`]) and released after it; if a lock
    /// cannot be taken, or is held past half its time to live, the transaction is
    /// rolled back ([`CommitOutcome::RolledBack`], [`crate::CommitCause::Cache`]).
    ///
    /// # What the result means
    ///
    /// * `Ok(report)`: the transaction **committed**. Do not retry it. The
    ///   [`CommitReport`] says per cache whether the invalidation succeeded
    ///   ([`InvalidationState::Done`]) or failed, in which case the cache has already
    ///   made itself safe as strata's `Cache::invalidate` documents:
    ///   [`InvalidationState::Buffered`] (the L2 delete or the backplane message is
    ///   retried in the background; until the retry succeeds other instances may read
    ///   the old value), [`InvalidationState::Bypassed`] (Strong level: every read of
    ///   that cache goes to the database until L2 is clean again) or
    ///   [`InvalidationState::Unconfirmed`] (Strong level: L2 deleted and message
    ///   published, but some member neither acknowledged nor let its lease lapse in
    ///   time). It also lists the actions that failed.
    /// * `Err(e)` with [`CommitOutcome::RolledBack`]: nothing was committed, nothing
    ///   invalidated, no action run.
    /// * `Err(e)` with [`CommitOutcome::Unknown`]: the connection failed during
    ///   `COMMIT`, so the server may or may not have committed. The registered
    ///   invalidations **were** applied (an unnecessary invalidation is harmless, a
    ///   missing one would leave a stale entry for up to a TTL) and are in
    ///   [`CommitError::invalidations`]; the actions did **not** run (they announce a
    ///   change that may not exist). Find out from the database what happened.
    ///
    /// # Actions after a failed invalidation
    ///
    /// They run, whatever the [`InvalidationState`]. A failed invalidation has already
    /// been made as safe as it can be by the cache (buffered and retried at
    /// Invalidated, cache bypassed at Strong), and the transaction is committed, so
    /// withholding the events would lose them for good. The report records the failed
    /// invalidation, and a `warn` log is written.
    ///
    /// On Postgres, `commit` first runs `SELECT 1` in the transaction: Postgres
    /// answers `COMMIT` in a transaction aborted by an earlier failed statement with
    /// a silent `ROLLBACK`, which sqlx reports as success; this check turns that into
    /// an `Err` with [`CommitOutcome::RolledBack`] (one extra round trip).
    ///
    /// # Errors
    ///
    /// A [`CommitError`] when the commit failed or its outcome is unknown, as above.
    pub async fn commit(self) -> Result<CommitReport, CommitError> {
        let Transaction { mut tx, mut batches, actions } = self;
        if let Err(e) = DB::check_before_commit(&mut tx).await {
            // The transaction cannot commit; roll back now rather than on the next use
            // of the connection. Its own failure changes nothing: dropping rolls back.
            let _ = tx.rollback().await;
            metrics::counter!("strata_sql_commits_total", "outcome" => "rolled_back").increment(1);
            return Err(CommitError::new(CommitOutcome::RolledBack, e, Vec::new()));
        }
        // Strong caches: invalidate and lock before COMMIT (see strata's `WriteLock`),
        // so that no instance serves the old value once any can read the new one.
        for i in 0..batches.len() {
            if let Err(e) = batches[i].lock().await {
                let namespace = batches[i].namespace().to_owned();
                abort_locks(batches).await;
                let _ = tx.rollback().await;
                metrics::counter!("strata_sql_commits_total", "outcome" => "rolled_back").increment(1);
                tracing::warn!(namespace, error = %e, "write lock failed; transaction rolled back");
                return Err(CommitError::lock_failed(namespace, e));
            }
        }
        let held_too_long = batches.iter().find(|b| !b.lock_valid()).map(|b| b.namespace().to_owned());
        if let Some(namespace) = held_too_long {
            let e = strata::Error::new(
                strata::ErrorKind::Timeout,
                "write lock held past half its time to live before COMMIT; raise write_lock_ttl",
            );
            abort_locks(batches).await;
            let _ = tx.rollback().await;
            metrics::counter!("strata_sql_commits_total", "outcome" => "rolled_back").increment(1);
            return Err(CommitError::lock_failed(namespace, e));
        }
        if let Err(e) = tx.commit().await {
            if definitely_rolled_back(&e) {
                abort_locks(batches).await;
                metrics::counter!("strata_sql_commits_total", "outcome" => "rolled_back").increment(1);
                return Err(CommitError::new(CommitOutcome::RolledBack, e, Vec::new()));
            }
            metrics::counter!("strata_sql_commits_total", "outcome" => "unknown").increment(1);
            tracing::error!(error = %e, "commit outcome unknown; invalidating anyway, after-commit actions skipped");
            let invalidations = run_invalidations(batches).await;
            return Err(CommitError::new(CommitOutcome::Unknown, e, invalidations));
        }
        metrics::counter!("strata_sql_commits_total", "outcome" => "committed").increment(1);
        let invalidations = run_invalidations(batches).await;
        let actions = run_actions(actions).await;
        Ok(CommitReport { invalidations, actions })
    }

    fn push_action<F, Fut>(&mut self, name: Cow<'static, str>, action: F) -> &mut Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: ActionOutput,
    {
        self.actions.push(Action {
            name,
            run: Box::new(move || Box::pin(async move { action().await.into_action_result() })),
        });
        self
    }

    /// Applies `f` to `cache`'s batch, creating it on first use.
    fn with_batch<K: CacheKey, V: CacheValue>(&mut self, cache: &Cache<K, V>, f: impl FnOnce(&mut Batch)) {
        // The origin is one per built cache (shared by its clones): it identifies it.
        let origin = cache.origin();
        if let Some(batch) = self.batches.iter_mut().find(|b| b.cache.origin() == origin) {
            f(batch);
            return;
        }
        let mut batch = Batch {
            cache: cache.handle(),
            keys: Vec::new(),
            seen: HashSet::new(),
            tags: Vec::new(),
            all: false,
            lock: None,
        };
        f(&mut batch);
        self.batches.push(batch);
    }
}

impl<DB: SqlDatabase> Deref for Transaction<'_, DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        &self.tx
    }
}

impl<DB: SqlDatabase> DerefMut for Transaction<'_, DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }
}

impl<DB: SqlDatabase> AsMut<DB::Connection> for Transaction<'_, DB> {
    fn as_mut(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }
}

impl<'c, DB: SqlDatabase> From<sqlx::Transaction<'c, DB>> for Transaction<'c, DB> {
    fn from(tx: sqlx::Transaction<'c, DB>) -> Self {
        Transaction::new(tx)
    }
}

impl<DB: SqlDatabase> fmt::Debug for Transaction<'_, DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("caches", &self.batches.iter().map(|b| b.namespace()).collect::<Vec<_>>())
            .field("actions", &self.actions.iter().map(|a| &a.name).collect::<Vec<_>>())
            .finish()
    }
}

/// What an after-commit action may return: `()` or a `Result` whose error converts
/// into `Box<dyn Error + Send + Sync>` (the `Ok` value is discarded).
pub trait ActionOutput {
    /// The action's outcome.
    fn into_action_result(self) -> Result<(), BoxError>;
}

impl ActionOutput for () {
    fn into_action_result(self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl<T, E: Into<BoxError>> ActionOutput for Result<T, E> {
    fn into_action_result(self) -> Result<(), BoxError> {
        self.map(drop).map_err(Into::into)
    }
}

type ActionFn = Box<dyn FnOnce() -> BoxFuture<'static, Result<(), BoxError>> + Send>;

struct Action {
    name: Cow<'static, str>,
    run: ActionFn,
}

/// The invalidations registered for one cache.
struct Batch {
    cache: CacheHandle,
    /// Keys in text form, in registration order, without duplicates.
    keys: Vec<String>,
    seen: HashSet<String>,
    tags: Vec<String>,
    all: bool,
    lock: Option<WriteLock>,
}

impl Batch {
    fn add_key(&mut self, key: String) {
        if self.seen.insert(key.clone()) {
            self.keys.push(key);
        }
    }

    fn namespace(&self) -> &str {
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

    /// Strong caches: takes the write lock (before COMMIT). Others: nothing.
    async fn lock(&mut self) -> Result<(), strata::Error> {
        if self.cache.consistency() == Consistency::Strong && self.lock.is_none() {
            self.lock = Some(self.cache.lock_for_write(self.scopes()).await?);
        }
        Ok(())
    }

    /// False when a write lock is held too long for COMMIT to start safely.
    fn lock_valid(&self) -> bool {
        self.lock.as_ref().is_none_or(WriteLock::is_valid)
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
        if let Some(lock) = lock {
            // Invalidated before COMMIT; releasing invalidates L2 once more (and on
            // failure the cache makes itself safe as an invalidation would).
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
            state,
            error: first_err,
        }
    }
}

/// Releases the write locks of a transaction that did not commit.
async fn abort_locks(batches: Vec<Batch>) {
    join_all(batches.into_iter().map(Batch::abort)).await;
}

/// Runs every cache's invalidation concurrently (they are independent) and returns
/// once all have returned, in the order the caches were first named.
async fn run_invalidations(batches: Vec<Batch>) -> Vec<CacheInvalidation> {
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

/// Runs the actions one at a time, in order; a failure or panic is recorded and the
/// next action still runs.
async fn run_actions(actions: Vec<Action>) -> Vec<ActionOutcome> {
    let mut out = Vec::with_capacity(actions.len());
    for (index, Action { name, run }) in actions.into_iter().enumerate() {
        let result = match std::panic::catch_unwind(AssertUnwindSafe(run)) {
            Ok(fut) => match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(r) => r,
                Err(panic) => Err(BoxError::from(ActionPanicked(panic_message(panic)))),
            },
            Err(panic) => Err(BoxError::from(ActionPanicked(panic_message(panic)))),
        };
        let error = result.err();
        if let Some(e) = &error {
            metrics::counter!("strata_sql_after_commit_failures_total").increment(1);
            tracing::error!(action = %name, index, error = %e, "after-commit action failed");
        }
        out.push(ActionOutcome { index, name, error });
    }
    out
}

/// An after-commit action panicked.
#[derive(Debug, thiserror::Error)]
#[error("after-commit action panicked: {0}")]
pub struct ActionPanicked(pub String);

/// The message of a panic payload (taken by value: a `&Box<dyn Any>` would itself
/// coerce to `&dyn Any` and hide the payload).
fn panic_message(panic: Box<dyn Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(s) => *s,
        Err(panic) => match panic.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "non-string panic payload".to_owned(),
        },
    }
}
