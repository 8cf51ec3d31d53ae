//! The queue port: where saved values wait, durably, until a flusher has written them
//! to the database.
//!
//! A queue holds one *record* per key: the latest saved value, its sequence number, and
//! whether it is due, claimed by a flusher, or dead-lettered. Saves to a key that is
//! already waiting replace its value (coalescing: only the latest value per key is ever
//! written). Every time the queue reports is the queue's own clock (Redis `TIME` for the
//! Redis queue), so instances whose clocks disagree still agree on what is due.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;

/// Bounds on what a namespace may hold in the queue (backpressure). A save of a key not
/// yet waiting is refused when it would pass either bound; a save to a waiting key is
/// always taken (it adds no key; a larger value may pass the byte bound by its growth).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most keys waiting (due, claimed or dead) at once.
    pub max_entries: u64,
    /// Most bytes of waiting values at once.
    pub max_bytes: u64,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits { max_entries: 100_000, max_bytes: 256 * 1024 * 1024 }
    }
}

/// What [`WriteBehindQueue::save`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveOutcome {
    /// The value is recorded (durable at the queue's level) with this sequence number.
    /// `replaced` is true when it replaced a value not yet written to the database (a
    /// database write saved by coalescing).
    Queued {
        /// The save's sequence number: higher than every earlier save of the key.
        seq: u64,
        /// Whether a waiting value was replaced.
        replaced: bool,
    },
    /// The namespace is at its [`QueueLimits`]: nothing was recorded. `seq` is a
    /// sequence number reserved for the key all the same, higher than every earlier
    /// save of it, for a caller that falls back to writing through.
    Full {
        /// The reserved sequence number.
        seq: u64,
    },
}

/// One save claimed by a flusher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedSave {
    /// The key's text form.
    pub key: String,
    /// The value, as the cache's codec encoded it.
    pub value: Bytes,
    /// Its sequence number.
    pub seq: u64,
    /// Failed flush attempts so far.
    pub attempts: u32,
    /// When the oldest save not yet written was made (queue clock, ms since the epoch).
    pub dirty_since_ms: u64,
}

/// What [`WriteBehindQueue::ack`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// The flushed sequence was the latest: the record is gone from the queue.
    Flushed,
    /// A newer save arrived during the flush: it stays queued, due at once.
    Newer,
}

/// What [`WriteBehindQueue::retry`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The key is due again after its back-off.
    Retrying {
        /// Failed attempts so far.
        attempts: u32,
    },
    /// The key went to the dead letters (its value stays readable).
    DeadLettered {
        /// Failed attempts so far.
        attempts: u32,
    },
    /// The claim was no longer this flusher's (it expired and another took it, or a
    /// newer save made the failure moot): nothing changed.
    NotClaimed,
}

/// A save the flushers gave up on: after too many attempts or a permanent error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The key's text form.
    pub key: String,
    /// The sequence number of the save that failed.
    pub seq: u64,
    /// Attempts made.
    pub attempts: u32,
    /// The last error, as text.
    pub error: String,
    /// When it was dead-lettered (queue clock, ms since the epoch).
    pub at_ms: u64,
}

/// A namespace's queue at a glance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Keys waiting to be written (due or claimed), dead letters excluded.
    pub pending: u64,
    /// Bytes of their values.
    pub pending_bytes: u64,
    /// Keys in the dead letters.
    pub dead: u64,
    /// When the oldest waiting save was made (queue clock, ms since the epoch).
    pub oldest_ms: Option<u64>,
    /// The queue clock when these figures were read (ms since the epoch).
    pub now_ms: u64,
}

/// Where saved values wait for the database. Implemented by
/// [`InProcessQueue`](super::InProcessQueue) (tests, the embedded bench; lost with the
/// process) and by `strata_redis::RedisWriteBehindQueue` (durable, shared by the fleet).
///
/// Every method takes the namespace; keys are the caches' text forms. Implementations
/// must make each method atomic per key: a save that lands during a flush is never lost
/// (the flusher's [`ack`](Self::ack) compares sequence numbers), and at most one flusher
/// holds a key's claim at a time until the claim's lease runs out.
#[async_trait]
pub trait WriteBehindQueue: Send + Sync + 'static {
    /// A short name for logs and metrics.
    fn name(&self) -> &str;

    /// Records `value` as the latest save of `key`, due `delay` after the key first
    /// became dirty (saves to a waiting key keep its due time: a key saved every second
    /// is still written within `delay`). Returns once the value is durable at the
    /// queue's level.
    async fn save(
        &self,
        ns: &str,
        key: &str,
        value: Bytes,
        delay: Duration,
        limits: QueueLimits,
    ) -> Result<SaveOutcome>;

    /// The waiting value of `key` (due, claimed or dead-lettered), if any: what a read
    /// must return instead of the database's older row.
    async fn pending_value(&self, ns: &str, key: &str) -> Result<Option<Bytes>>;

    /// Claims up to `max` due keys for `owner` for `lease`; a claim that runs out makes
    /// the key due again (another instance takes over a dead one's claims).
    async fn claim_due(&self, ns: &str, owner: &str, max: usize, lease: Duration) -> Result<Vec<QueuedSave>>;

    /// Reports `key` written at `seq`: forgets it if `seq` is still its latest save,
    /// else leaves the newer save due at once.
    async fn ack(&self, ns: &str, key: &str, seq: u64) -> Result<AckOutcome>;

    /// Reports a failed write of `key` at `seq` by `owner`: due again after `backoff`,
    /// or dead-lettered (with `error`) once `max_attempts` attempts failed or when
    /// `permanent`.
    #[allow(clippy::too_many_arguments)]
    async fn retry(
        &self,
        ns: &str,
        owner: &str,
        key: &str,
        seq: u64,
        backoff: Duration,
        error: &str,
        max_attempts: u32,
        permanent: bool,
    ) -> Result<RetryOutcome>;

    /// Gives `owner`'s claim on `key` back (due at once), as a flusher that stops does.
    async fn release(&self, ns: &str, owner: &str, key: &str) -> Result<()>;

    /// Makes `key` (or, with `None`, every waiting key) due now; returns how many keys
    /// it changed. Claimed keys stay with their flusher.
    async fn make_due(&self, ns: &str, key: Option<&str>) -> Result<u64>;

    /// The namespace's figures.
    async fn stats(&self, ns: &str) -> Result<QueueStats>;

    /// Up to `max` dead letters, oldest first.
    async fn dead_letters(&self, ns: &str, max: usize) -> Result<Vec<DeadLetter>>;

    /// Puts dead-lettered `key` (or, with `None`, every one) back in the queue, due now
    /// with its attempts reset; returns how many.
    async fn requeue_dead(&self, ns: &str, key: Option<&str>) -> Result<u64>;
}
