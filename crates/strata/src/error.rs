//! The one error type of strata: a kind, a context line and an optional source.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// What went wrong, coarsely enough to decide what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A remote call (L2, backplane, loader) did not answer in time.
    Timeout,
    /// The L2 tier could not be reached or answered with an error.
    Tier,
    /// The invalidation backplane could not be reached or lost its subscription.
    Backplane,
    /// The caller's loader (usually the database) returned an error.
    Loader,
    /// A value or an L2 envelope could not be encoded or decoded.
    Codec,
    /// A circuit breaker is open: the call was not attempted.
    CircuitOpen,
    /// The input was rejected (oversized value, bad key…): nothing was changed.
    InvalidInput,
    /// The cache was shut down.
    Shutdown,
    /// The cache is bypassed: L2 may hold what should have been deleted (Strong level),
    /// so it answers nothing until a namespace bump has cleaned L2. Read from the
    /// source instead (`get_or_load` does).
    Bypassed,
    /// The write-behind queue or another durable structure refused the write.
    Rejected,
    /// Too many loads were running (the cache's `max_concurrent_loads` or a shared
    /// [`LoadLimiter`](crate::LoadLimiter)) and none finished within the permit wait:
    /// the loader was not called. The message names the limit.
    Overloaded,
    /// One shard of a [`ShardedTier`](crate::ShardedTier) failed (or its breaker is
    /// open) while others are healthy: the call was applied where it could be.
    /// Transient — the cache retries an invalidation until every shard took it — and
    /// not held against the cache's L2 breaker: each shard has a breaker of its own.
    ShardDown,
}

impl ErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Tier => "l2 tier error",
            ErrorKind::Backplane => "backplane error",
            ErrorKind::Loader => "loader error",
            ErrorKind::Codec => "codec error",
            ErrorKind::CircuitOpen => "circuit open",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Shutdown => "shut down",
            ErrorKind::Bypassed => "cache bypassed",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::ShardDown => "shard down",
        }
    }
}

type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// The error returned by every fallible strata operation.
///
/// It is `Clone` (the source is shared behind an `Arc`) so that the callers coalesced
/// onto one load by single-flight can all receive the same error.
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    context: Arc<str>,
    source: Option<Source>,
    /// See [`Error::is_queued`].
    queued: bool,
}

impl Error {
    /// An error of `kind` with a one-line, lowercase description of what failed.
    pub fn new(kind: ErrorKind, context: impl Into<Arc<str>>) -> Self {
        Error { kind, context: context.into(), source: None, queued: false }
    }

    /// Attaches the underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// Attaches an already shared cause.
    #[must_use]
    pub fn with_shared_source(mut self, source: Source) -> Self {
        self.source = Some(source);
        self
    }

    /// A timeout of `what` after `after`.
    pub fn timeout(what: &str, after: Duration) -> Self {
        Error::new(ErrorKind::Timeout, format!("{what} timed out after {after:?}"))
    }

    /// Wraps an error returned by the caller's loader.
    pub fn loader(source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        let source: Box<dyn std::error::Error + Send + Sync + 'static> = source.into();
        Error {
            kind: ErrorKind::Loader,
            context: Arc::from("loader failed"),
            source: Some(Arc::from(source)),
            queued: false,
        }
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The context line, without the source.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// True when retrying the same call later may succeed (timeouts, unreachable
    /// remotes, open breakers).
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Timeout
                | ErrorKind::Tier
                | ErrorKind::Backplane
                | ErrorKind::CircuitOpen
                | ErrorKind::Bypassed
                | ErrorKind::Overloaded
                | ErrorKind::ShardDown
        )
    }

    /// True when one shard of a sharded tier failed while others are healthy.
    pub fn is_shard_down(&self) -> bool {
        self.kind == ErrorKind::ShardDown
    }

    /// True for timeouts.
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::Timeout
    }

    /// True when the loader (the database) failed.
    pub fn is_loader(&self) -> bool {
        self.kind == ErrorKind::Loader
    }

    /// True when a circuit breaker refused the call.
    pub fn is_circuit_open(&self) -> bool {
        self.kind == ErrorKind::CircuitOpen
    }

    /// True when a load limit refused the load (see [`ErrorKind::Overloaded`]).
    pub fn is_overloaded(&self) -> bool {
        self.kind == ErrorKind::Overloaded
    }

    /// True when the cache is bypassed (see [`ErrorKind::Bypassed`]).
    pub fn is_bypassed(&self) -> bool {
        self.kind == ErrorKind::Bypassed
    }

    /// True after `shutdown`.
    pub fn is_shutdown(&self) -> bool {
        self.kind == ErrorKind::Shutdown
    }

    /// True when the input was rejected and nothing was changed.
    pub fn is_invalid_input(&self) -> bool {
        self.kind == ErrorKind::InvalidInput
    }

    /// True when an invalidation did all of its work here (this instance's copies
    /// dropped, L2 cleaned) and only its backplane message is late: the backplane was
    /// down or its publisher busy past the caller's wait, so the message waits, numbered,
    /// in this instance's outbox and goes out in order when the backplane answers.
    /// Retrying the invalidation would only send it twice.
    ///
    /// What that means depends on the level. At Invalidated the write needs nothing
    /// more: its bound holds from the commit, as for every write (an instance the
    /// message never reaches sees the gap in this instance's numbers, or its silence,
    /// and drops its copies; see "The consistency promise" in the crate docs), so a
    /// caller may treat the write as done. At Strong the fleet has not acknowledged it:
    /// read-your-writes on other instances is not confirmed. False for every other
    /// error, among them an invalidation whose L2 delete failed (buffered and retried:
    /// L2 may still hold the old value until then).
    pub fn is_queued(&self) -> bool {
        self.queued
    }

    /// Marks an invalidation's error as [`Error::is_queued`].
    pub(crate) fn into_queued(mut self) -> Self {
        self.queued = true;
        self
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("context", &self.context);
        if self.queued {
            d.field("queued", &true);
        }
        if let Some(s) = &self.source {
            d.field("source", &format_args!("{s}"));
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.context)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        if self.queued {
            write!(f, " (the invalidation's message stays queued and goes out in order)")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Shorthand for `Result<T, strata::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A setting given to a builder was invalid; the message says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cache configuration: {setting}: {problem}; {fix}")]
pub struct BuildError {
    /// The setter at fault, e.g. `max_stale`.
    pub setting: &'static str,
    /// What is wrong with the value.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

impl BuildError {
    pub(crate) fn new(setting: &'static str, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        BuildError { setting, problem: problem.into(), fix: fix.into() }
    }
}
