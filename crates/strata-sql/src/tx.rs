//! The transaction helper: invalidate after commit, then run after-commit actions.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use futures::future::BoxFuture;
use strata::{Cache, CacheKey, CacheValue};

use crate::batch::{Batch, abort_locks, lock_all, run_invalidations};
use crate::db::{SqlDatabase, definitely_rolled_back};
use crate::error::{CommitError, CommitOutcome};
use crate::report::{ActionOutcome, BoxError, CommitReport};

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
    /// Whether Invalidated caches are write-locked before `COMMIT` (Strong ones always are).
    write_locks: bool,
    /// Test fixture: behave like a process killed right after `COMMIT`.
    #[cfg(feature = "testing")]
    die_after_commit: bool,
}

impl<'c, DB: SqlDatabase> Transaction<'c, DB> {
    /// Wraps a transaction begun with sqlx.
    pub fn new(tx: sqlx::Transaction<'c, DB>) -> Self {
        Transaction {
            tx,
            batches: Vec::new(),
            actions: Vec::new(),
            write_locks: true,
            #[cfg(feature = "testing")]
            die_after_commit: false,
        }
    }

    /// Invalidated caches are then invalidated only after `COMMIT`, without the write
    /// lock taken before it (Strong caches are always locked).
    ///
    /// Saves one L2 round trip and one backplane publish per Invalidated cache, before
    /// `COMMIT`, and keeps the written keys cacheable between the lock and the release.
    /// It reopens the gap the lock closes: if this process dies between `COMMIT` and
    /// the invalidation (killed, out of memory, a deploy), the other instances, and any
    /// instance started later (L2 still holds the old row), serve the old row until its
    /// TTL, or until change capture delivers the change if it is installed. See "Write
    /// locks at the Invalidated level" in the crate docs.
    pub fn without_write_locks(&mut self) -> &mut Self {
        self.write_locks = false;
        self
    }

    /// Test fixture (feature `testing`): makes [`commit`](Self::commit) behave like a
    /// writer process killed right after `COMMIT` returned: it takes its write locks
    /// and commits as usual, then returns an empty report without releasing the locks
    /// (they are forgotten, as a killed process leaves them, and expire after the
    /// caches' `write_lock_ttl`), without invalidating anything and without running
    /// any action.
    #[cfg(feature = "testing")]
    pub fn die_after_commit(&mut self) -> &mut Self {
        self.die_after_commit = true;
        self
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
    /// actions. The order is strict: no action starts before every invalidation has
    /// returned. Strong caches, and Invalidated caches with an L2 tier unless
    /// [`without_write_locks`](Self::without_write_locks) was called, are invalidated
    /// and write-locked *before* `COMMIT` ([`Cache::lock_for_write`]) and released
    /// after it; other caches are not touched before `COMMIT` returned success. If a
    /// Strong cache's lock cannot be taken, or is held past half its time to live, the
    /// transaction is rolled back ([`CommitOutcome::RolledBack`],
    /// [`crate::CommitCause::Cache`]); if an Invalidated cache's cannot, the
    /// transaction commits and that cache is invalidated after `COMMIT`.
    ///
    /// # What the result means
    ///
    /// * `Ok(report)`: the transaction **committed**. Do not retry it. The
    ///   [`CommitReport`] says per cache whether the invalidation succeeded
    ///   ([`InvalidationState::Done`](crate::InvalidationState::Done)) or failed, in which case the cache has already
    ///   made itself safe as strata's `Cache::invalidate` documents:
    ///   [`InvalidationState::Buffered`](crate::InvalidationState::Buffered) (the L2 delete or the backplane message is
    ///   retried in the background; until the retry succeeds other instances may read
    ///   the old value), [`InvalidationState::Bypassed`](crate::InvalidationState::Bypassed) (Strong level: every read of
    ///   that cache goes to the database until L2 is clean again) or
    ///   [`InvalidationState::Unconfirmed`](crate::InvalidationState::Unconfirmed) (Strong level: L2 deleted and message
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
    /// They run, whatever the [`InvalidationState`](crate::InvalidationState). A failed invalidation has already
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
        #[cfg(feature = "testing")]
        let die_after_commit = self.die_after_commit;
        let Transaction { mut tx, mut batches, actions, write_locks, .. } = self;
        if let Err(e) = DB::check_before_commit(&mut tx).await {
            // The transaction cannot commit; roll back now rather than on the next use
            // of the connection. Its own failure changes nothing: dropping rolls back.
            let _ = tx.rollback().await;
            metrics::counter!("strata_sql_commits_total", "outcome" => "rolled_back").increment(1);
            return Err(CommitError::new(CommitOutcome::RolledBack, e, Vec::new()));
        }
        // Invalidate and lock before COMMIT (see strata's `WriteLock`): Strong caches so
        // that no instance serves the old value once any can read the new one,
        // Invalidated ones so that a writer dying after COMMIT leaves nothing stale.
        if let Err(refused) = lock_all(&mut batches, write_locks).await {
            let _ = tx.rollback().await;
            metrics::counter!("strata_sql_commits_total", "outcome" => "rolled_back").increment(1);
            return Err(CommitError::lock_failed(refused.namespace, refused.error));
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
        let committed_at = std::time::Instant::now();
        metrics::counter!("strata_sql_commits_total", "outcome" => "committed").increment(1);
        #[cfg(feature = "testing")]
        if die_after_commit {
            for batch in batches {
                std::mem::forget(batch.lock);
            }
            return Ok(CommitReport { invalidations: Vec::new(), actions: Vec::new(), committed_at });
        }
        let invalidations = run_invalidations(batches).await;
        let actions = run_actions(actions).await;
        Ok(CommitReport { invalidations, actions, committed_at })
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
        let mut batch = Batch::new(cache.handle());
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
