//! The consistency levels a cache can promise.

/// How much staleness a cache promises. See the crate docs for the exact bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// No backplane: L1's TTL bounds staleness (the "local 5 s cache" baseline).
    Local,
    /// Writes through strata delete the L2 entry and broadcast the invalidation; lost
    /// messages are detected and repaired. Bound, counted from the commit: propagation
    /// delay while the backplane is healthy, `max_stale` (plus its detection) while it
    /// is not or while a member's failed L2 delete waits for its retry. The default when
    /// a backplane is set.
    #[default]
    Invalidated,
    /// Read-your-writes across the fleet: `invalidate` returns only after every live
    /// member acknowledged the invalidation, its membership lease lapsed, or it left
    /// (closed by `Cache::shutdown`, which says so), and an
    /// instance whose own lease lapsed serves nothing from L1 until it has renewed it
    /// and flushed. When an L2 delete fails, the L2 breaker is forced open and the
    /// cache is *bypassed* (every read goes to the loader) until the namespace has been
    /// bumped in L2. Every instance of a namespace must use this level (others do not
    /// acknowledge).
    ///
    /// Linearizable reads need the invalidation *before* the commit: write through
    /// [`Cache::lock_for_write`](crate::Cache::lock_for_write) (strata-sql's transaction
    /// helper does, for every Strong cache): the write is invalidated everywhere and its
    /// keys kept out of every tier before `COMMIT`, and a write whose lock cannot be
    /// taken (L2 or the backplane down) is refused. L1 is filled only with what L2
    /// returned or accepted. With plain [`Cache::invalidate`](crate::Cache::invalidate)
    /// after a commit, a read that loads the new row may precede a read on another
    /// instance that still serves the old one from L1, until the invalidation returned.
    Strong,
}
