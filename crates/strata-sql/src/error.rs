//! Errors.
//!
//! Why not `strata::Error`: the caller of [`Transaction::commit`](crate::Transaction::commit)
//! must learn whether the database committed (rolled back, or outcome unknown) and
//! get sqlx's own error back to match on SQLSTATEs; `strata::Error` has neither a
//! place for the outcome nor a way to hand back the `sqlx::Error` by value. So
//! commits fail with [`CommitError`] (convertible into `sqlx::Error` for `?` in sqlx
//! code), and setup calls (change capture) with [`Error`], which has a
//! [`ErrorKind`] and converts into `strata::Error` for code that unifies errors.

use crate::report::CacheInvalidation;

/// Whether a failed commit committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The database did not commit: the server rejected `COMMIT` (a deferred
    /// constraint, a serialization failure, SQLite busy), or an earlier failed
    /// statement had aborted the transaction. Nothing was invalidated, no action ran.
    RolledBack,
    /// The connection failed during `COMMIT`: the server may have committed. The
    /// invalidations were applied anyway (harmless if it did not); the after-commit
    /// actions did not run.
    Unknown,
}

/// A commit that did not (certainly) commit. See [`crate::Transaction::commit`].
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", match .outcome {
    CommitOutcome::RolledBack => "commit failed; the transaction was rolled back",
    CommitOutcome::Unknown => "commit outcome unknown (the connection failed during COMMIT); caches were invalidated, after-commit actions were not run",
})]
pub struct CommitError {
    outcome: CommitOutcome,
    #[source]
    source: CommitCause,
    invalidations: Vec<CacheInvalidation>,
}

/// Why a commit failed: the database, or (Strong level) a cache that could not take
/// its write lock, in which case `COMMIT` was never sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommitCause {
    /// The database's error.
    #[error(transparent)]
    Database(sqlx::Error),
    /// A Strong cache's write lock failed (L2 or the backplane unreachable, or a member
    /// silent): the transaction was rolled back rather than commit a write the fleet
    /// could not be told about in time.
    #[error("cache {namespace}: {error}")]
    Cache {
        /// The cache's namespace.
        namespace: String,
        /// What failed.
        #[source]
        error: strata::Error,
    },
}

impl CommitError {
    pub(crate) fn new(
        outcome: CommitOutcome,
        source: sqlx::Error,
        invalidations: Vec<CacheInvalidation>,
    ) -> Self {
        CommitError { outcome, source: CommitCause::Database(source), invalidations }
    }

    pub(crate) fn lock_failed(namespace: String, error: strata::Error) -> Self {
        CommitError {
            outcome: CommitOutcome::RolledBack,
            source: CommitCause::Cache { namespace, error },
            invalidations: Vec::new(),
        }
    }

    /// Whether the database committed.
    pub fn outcome(&self) -> CommitOutcome {
        self.outcome
    }

    /// True when the database certainly did not commit.
    pub fn is_rolled_back(&self) -> bool {
        self.outcome == CommitOutcome::RolledBack
    }

    /// Why the commit failed.
    pub fn cause(&self) -> &CommitCause {
        &self.source
    }

    /// sqlx's error (e.g. to read the SQLSTATE of a serialization failure); `None` when
    /// a cache's write lock failed and `COMMIT` was never sent.
    pub fn sqlx_error(&self) -> Option<&sqlx::Error> {
        match &self.source {
            CommitCause::Database(e) => Some(e),
            CommitCause::Cache { .. } => None,
        }
    }

    /// The write-lock error when a Strong cache refused the write (then the error is
    /// transient: retry the transaction later).
    pub fn cache_error(&self) -> Option<&strata::Error> {
        match &self.source {
            CommitCause::Cache { error, .. } => Some(error),
            CommitCause::Database(_) => None,
        }
    }

    /// The invalidations applied although the commit failed: empty for
    /// [`CommitOutcome::RolledBack`], every registered cache for
    /// [`CommitOutcome::Unknown`].
    pub fn invalidations(&self) -> &[CacheInvalidation] {
        &self.invalidations
    }
}

/// For `?` in sqlx code. A write-lock failure becomes `sqlx::Error::Io` carrying the
/// strata error (with `ErrorKind::Other`).
impl From<CommitError> for sqlx::Error {
    fn from(e: CommitError) -> Self {
        match e.source {
            CommitCause::Database(e) => e,
            CommitCause::Cache { namespace, error } => {
                sqlx::Error::Io(std::io::Error::other(CommitCause::Cache { namespace, error }))
            }
        }
    }
}

/// What kind of setup call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The database returned an error or could not be reached.
    Database,
    /// An argument was rejected (an empty table name, an unknown column); nothing
    /// was changed.
    InvalidInput,
}

/// The error of change-capture setup ([`crate::install_change_capture`],
/// [`crate::ChangeListenerBuilder::start`]).
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct Error {
    kind: ErrorKind,
    context: String,
    #[source]
    source: Option<sqlx::Error>,
}

impl Error {
    pub(crate) fn database(context: impl Into<String>, source: sqlx::Error) -> Self {
        let context = format!("{}: {source}", context.into());
        Error { kind: ErrorKind::Database, context, source: Some(source) }
    }

    pub(crate) fn invalid(context: impl Into<String>) -> Self {
        Error { kind: ErrorKind::InvalidInput, context: context.into(), source: None }
    }

    /// What kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// sqlx's error, when the database failed.
    pub fn sqlx_error(&self) -> Option<&sqlx::Error> {
        self.source.as_ref()
    }
}

impl From<Error> for strata::Error {
    fn from(e: Error) -> Self {
        let kind = match e.kind {
            ErrorKind::Database => strata::ErrorKind::Loader,
            ErrorKind::InvalidInput => strata::ErrorKind::InvalidInput,
        };
        strata::Error::new(kind, e.context.clone()).with_source(e)
    }
}
