//! What a commit reports: per cache, how its invalidation went; per after-commit
//! action, whether it failed.

use std::borrow::Cow;

use strata::Consistency;

// Here rather than in `error`: the action outcomes below carry it, and `error` needs
// this module's `CacheInvalidation`, so defining it there would make the two files
// import each other.
/// A boxed error, as after-commit actions return them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What happened to one cache's invalidation after the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidationState {
    /// Local copy dropped, L2 deleted, message on the backplane: done.
    Done,
    /// The L2 delete or the backplane message failed and is buffered; the cache
    /// retries it in the background
    /// ([`Cache::flush_pending`](strata::Cache::flush_pending) retries now). Until the
    /// retry succeeds, other instances may serve the old value (read back from L2, or
    /// kept in L1 until they detect the missed message).
    Buffered,
    /// Strong level: the L2 delete failed, so the cache is bypassed (every read goes
    /// to the database) until a namespace bump has made L2 clean.
    Bypassed,
    /// The call failed although nothing was buffered and the cache is not bypassed:
    /// at the Strong level, L2 was deleted and the message published, but some member
    /// neither acknowledged it nor let its membership lease lapse in time; that member
    /// may serve the old value until it does.
    Unconfirmed,
}

/// The invalidation of one cache after a commit.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CacheInvalidation {
    /// The cache's namespace.
    pub namespace: String,
    /// The cache's consistency level.
    pub consistency: Consistency,
    /// Distinct keys invalidated (0 when `all`).
    pub keys: usize,
    /// Tags invalidated (0 when `all`).
    pub tags: usize,
    /// Whether the whole namespace was invalidated.
    pub all: bool,
    /// Whether a write lock covered the write from before `COMMIT` (Strong caches
    /// always; Invalidated caches with an L2 tier unless the transaction opted out
    /// with [`Transaction::without_write_locks`](crate::Transaction::without_write_locks)
    /// or the lock could not be taken). Without one, a writer dying between `COMMIT`
    /// and the invalidation leaves the other instances serving the old row.
    pub locked: bool,
    /// Where the invalidation stands.
    pub state: InvalidationState,
    /// The first error, when not [`InvalidationState::Done`].
    pub error: Option<strata::Error>,
}

impl CacheInvalidation {
    /// True when the invalidation fully succeeded.
    pub fn is_done(&self) -> bool {
        self.state == InvalidationState::Done
    }
}

/// The outcome of one after-commit action.
#[derive(Debug)]
#[non_exhaustive]
pub struct ActionOutcome {
    /// Position in registration order (0-based).
    pub index: usize,
    /// The name given with
    /// [`Transaction::after_commit_named`](crate::Transaction::after_commit_named), else
    /// `after_commit#N`.
    pub name: Cow<'static, str>,
    /// The error it returned, or the panic it raised; `None` on success.
    pub error: Option<BoxError>,
}

impl ActionOutcome {
    /// True when the action succeeded.
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }
}

/// What happened after a successful commit: per cache, the invalidation; per action,
/// its outcome. The transaction is committed whatever this says.
#[derive(Debug)]
#[must_use = "the report says whether every invalidation and action succeeded"]
#[non_exhaustive]
pub struct CommitReport {
    /// One entry per cache named in the transaction, in the order first named.
    pub invalidations: Vec<CacheInvalidation>,
    /// One entry per after-commit action, in registration (= execution) order.
    pub actions: Vec<ActionOutcome>,
    /// When the database acknowledged `COMMIT`, before the invalidations ran: the
    /// moment from which a cache's staleness bound counts.
    pub committed_at: std::time::Instant,
}

impl CommitReport {
    /// True when every invalidation is [`InvalidationState::Done`] and every action
    /// succeeded.
    pub fn is_clean(&self) -> bool {
        self.all_invalidated() && self.actions.iter().all(ActionOutcome::is_ok)
    }

    /// True when every invalidation is [`InvalidationState::Done`].
    pub fn all_invalidated(&self) -> bool {
        self.invalidations.iter().all(CacheInvalidation::is_done)
    }

    /// The invalidations that did not fully succeed.
    pub fn failed_invalidations(&self) -> impl Iterator<Item = &CacheInvalidation> {
        self.invalidations.iter().filter(|i| !i.is_done())
    }

    /// The actions that failed or panicked.
    pub fn failed_actions(&self) -> impl Iterator<Item = &ActionOutcome> {
        self.actions.iter().filter(|a| !a.is_ok())
    }
}
