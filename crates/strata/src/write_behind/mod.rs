//! Write-behind: saves that are readable fleet-wide at once and reach the database
//! later, coalesced per key, from a durable queue (the draft-autosave story).
//!
//! Turn it on with [`CacheBuilder::write_behind`](crate::CacheBuilder::write_behind) and
//! use it through [`Cache::write_behind`](crate::Cache::write_behind):
//!
//! - [`WriteBehind::save`] records the value in the [`WriteBehindQueue`] (durable at the
//!   queue's level: Redis, Redis plus `WAIT`, or an fsynced AOF for
//!   `strata_redis::RedisWriteBehindQueue`; this process's memory for
//!   [`InProcessQueue`]), then invalidates the key like any write (L2 delete, backplane
//!   message, acknowledgements at the Strong level). From then on a read anywhere that
//!   misses L1 and L2 finds the saved value in the queue before it would call the
//!   loader, so no instance serves the older database row while the save waits.
//! - A flusher on every instance claims due keys (with a lease: a claim a crashed
//!   instance held runs out and another instance takes the key), writes them in batches
//!   through the [`Sink`], and acknowledges each written sequence. A save that lands
//!   during a flush stays queued (the acknowledgement compares sequence numbers), so it
//!   is never lost and never overtaken by the older value.
//! - Saves to a waiting key replace its value: 100 saves between two flushes are one
//!   database write. A key is due `flush_delay` after it *first* became dirty, so a key
//!   saved every second still reaches the database within `flush_delay` plus a flush.
//! - Failed writes are retried with exponential back-off and jitter. A sink call that
//!   failed as a whole with a transient error (the database unreachable, a timeout)
//!   backs its keys off but never dead-letters them, however long the outage; a key
//!   whose own write failed `max_attempts` times (or once, with a
//!   [permanent](SinkError::permanent) error) goes to the dead letters, stays
//!   readable, is counted, and can be requeued ([`WriteBehind::requeue_dead`],
//!   `strata write-behind requeue`). One poison key never blocks the others.
//! - Past [`QueueLimits`], `save` fails with [`ErrorKind::Rejected`](crate::ErrorKind)
//!   or, with [`WhenFull::WriteThrough`], writes through the sink itself.
//! - [`WriteBehind::shutdown`] writes what is due within a deadline and stops this
//!   instance's flusher; what is left stays in the queue for the other instances.
//! - Observability: [`WriteBehind::stats`] (saves, coalesced saves — the database writes
//!   saved —, rows written, batches, retries, dead letters, flush lag p50/p99/max),
//!   [`WriteBehind::pending`] (the queue: waiting keys and bytes, the oldest save, dead
//!   letters), and through `metrics` every second:
//!   `strata_write_behind_{saves,coalesced,db_writes,retries,dead_lettered}_total`, the
//!   gauges `strata_write_behind_{pending,pending_bytes,dead,oldest_pending_seconds}`
//!   and the histogram `strata_write_behind_batch_size`, all labelled by `namespace`.
//!
//! **What is promised.** An acknowledged save reaches the database at least once, in
//! sequence order per key (the sink's sequence guard makes replays harmless), unless
//! the queue itself loses it (see the queue's durability level) or it is dead-lettered.
//! Between the save and its flush, reads return the saved value (or a later one), within
//! the cache's consistency level: at once everywhere at the Strong level, after the
//! invalidation's propagation at the Invalidated level. Deletes are not queued: delete
//! the row through your own write path and call [`Cache::invalidate`](crate::Cache::invalidate).

#[cfg(feature = "testing")]
pub mod conformance;
mod flusher;
mod handle;
mod memory;
mod overlay;
mod queue;
mod sink;

use std::sync::Arc;
use std::time::Duration;

pub(crate) use flusher::{Shared, run as run_flusher};
pub use handle::{ShutdownReport, WriteBehind, WriteBehindStats};
pub use memory::InProcessQueue;
pub use queue::{
    AckOutcome, DeadLetter, QueueLimits, QueueStats, QueuedSave, RetryOutcome, SaveOutcome, WriteBehindQueue,
};
pub use sink::{Sink, SinkError, SinkErrorKind, SinkItem};

use crate::cache::config::check_duration;
use crate::error::BuildError;
use crate::key::{CacheKey, CacheValue};

/// What [`WriteBehind::save`] does when the namespace's queue is at its [`QueueLimits`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WhenFull {
    /// Fail the save with [`ErrorKind::Rejected`](crate::ErrorKind::Rejected): nothing
    /// changed, the caller decides (Hazelcast's choice).
    #[default]
    Reject,
    /// Write the value through the sink at once, then invalidate (Infinispan's and
    /// Ignite's choice): slower saves instead of refused ones.
    WriteThrough,
}

/// The write-behind settings of a cache: the queue, the sink, and when and how the
/// flusher writes. Every duration must be positive and at most 365 days.
pub struct WriteBehindConfig<K, V> {
    pub(crate) queue: Arc<dyn WriteBehindQueue>,
    pub(crate) sink: Arc<dyn Sink<K, V>>,
    pub(crate) flush_delay: Duration,
    pub(crate) poll_interval: Option<Duration>,
    pub(crate) batch_size: usize,
    pub(crate) claim_lease: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) backoff: (Duration, Duration),
    pub(crate) limits: QueueLimits,
    pub(crate) when_full: WhenFull,
    pub(crate) run_flusher: bool,
}

impl<K: CacheKey, V: CacheValue> WriteBehindConfig<K, V> {
    /// Saves go to `queue` and are flushed through `sink`. Defaults: flush 10 s after a
    /// key first became dirty, poll every second, batches of 100, claims held 30 s,
    /// 10 attempts with back-off from 100 ms to 30 s, at most 100,000 keys and 256 MiB
    /// waiting per namespace (then [`WhenFull::Reject`]).
    pub fn new(queue: Arc<dyn WriteBehindQueue>, sink: impl Sink<K, V>) -> Self {
        WriteBehindConfig {
            queue,
            sink: Arc::new(sink),
            flush_delay: Duration::from_secs(10),
            poll_interval: None,
            batch_size: 100,
            claim_lease: Duration::from_secs(30),
            max_attempts: 10,
            backoff: (Duration::from_millis(100), Duration::from_secs(30)),
            limits: QueueLimits::default(),
            when_full: WhenFull::Reject,
            run_flusher: true,
        }
    }

    /// How long after a key first became dirty it is written (Hazelcast's
    /// `write-delay-seconds`; Redisson's `writeBehindDelay`). Default 10 s.
    #[must_use]
    pub fn flush_delay(mut self, delay: Duration) -> Self {
        self.flush_delay = delay;
        self
    }

    /// How often the flusher looks for due keys. Default: a quarter of the flush delay,
    /// at most 1 s.
    #[must_use]
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = Some(every);
        self
    }

    /// Most keys written per sink call. Default 100.
    #[must_use]
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// How long a flusher holds the keys it claimed; past it, another instance may
    /// write them (so it must exceed the slowest sink call). Default 30 s.
    #[must_use]
    pub fn claim_lease(mut self, lease: Duration) -> Self {
        self.claim_lease = lease;
        self
    }

    /// Failed attempts before a key goes to the dead letters. Default 10.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// The retry back-off: `min` after the first failure, doubling up to `max`, each
    /// with ±50 % jitter. Default 100 ms to 30 s.
    #[must_use]
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = (min, max);
        self
    }

    /// The bound on waiting keys and bytes per namespace. Default 100,000 keys, 256 MiB.
    #[must_use]
    pub fn max_pending(mut self, entries: u64, bytes: u64) -> Self {
        self.limits = QueueLimits { max_entries: entries, max_bytes: bytes };
        self
    }

    /// What a save does past the bound. Default [`WhenFull::Reject`].
    #[must_use]
    pub fn when_full(mut self, when_full: WhenFull) -> Self {
        self.when_full = when_full;
        self
    }

    /// Whether this instance runs a flusher (default true). An instance without one
    /// still saves; others flush for it.
    #[must_use]
    pub fn run_flusher(mut self, run: bool) -> Self {
        self.run_flusher = run;
        self
    }

    pub(crate) fn effective_poll_interval(&self) -> Duration {
        self.poll_interval.unwrap_or_else(|| {
            (self.flush_delay / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
        })
    }

    pub(crate) fn check(&self) -> Result<(), BuildError> {
        check_duration("write_behind.flush_delay", self.flush_delay, true)?;
        check_duration("write_behind.poll_interval", self.effective_poll_interval(), false)?;
        check_duration("write_behind.claim_lease", self.claim_lease, false)?;
        check_duration("write_behind.retry_backoff min", self.backoff.0, false)?;
        check_duration("write_behind.retry_backoff max", self.backoff.1, false)?;
        if self.backoff.0 > self.backoff.1 {
            return Err(BuildError::new(
                "write_behind.retry_backoff",
                format!("min {:?} is above max {:?}", self.backoff.0, self.backoff.1),
                "give a min no larger than the max",
            ));
        }
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return Err(BuildError::new(
                "write_behind.batch_size",
                format!("is {}", self.batch_size),
                "use 1 to 10,000 (default 100)",
            ));
        }
        if self.max_attempts == 0 {
            return Err(BuildError::new("write_behind.max_attempts", "is 0", "use at least 1 (default 10)"));
        }
        if self.limits.max_entries == 0 || self.limits.max_bytes == 0 {
            return Err(BuildError::new(
                "write_behind.max_pending",
                format!("is {} keys, {} bytes", self.limits.max_entries, self.limits.max_bytes),
                "allow at least one key and one byte",
            ));
        }
        Ok(())
    }
}
