//! [`WriteBehind`]: the handle applications save through.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::WhenFull;
use super::flusher::{self, Shared, full_error};
use super::queue::{DeadLetter, QueueStats, SaveOutcome};
use super::sink::SinkItem;
use crate::cache::Cache;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{CacheKey, CacheValue};
use crate::scope::Scope;

/// The write-behind side of a cache; from [`Cache::write_behind`]. Cheap to clone.
pub struct WriteBehind<K, V> {
    cache: Cache<K, V>,
    wb: Arc<Shared<K, V>>,
}

impl<K, V> Clone for WriteBehind<K, V> {
    fn clone(&self) -> Self {
        WriteBehind { cache: self.cache.clone(), wb: self.wb.clone() }
    }
}

/// This instance's write-behind counters (the queue's figures are in
/// [`WriteBehind::pending`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBehindStats {
    /// Saves acknowledged (queued or written through).
    pub saves: u64,
    /// Saves that replaced a value not yet written: database writes saved by coalescing.
    pub coalesced: u64,
    /// Saves written through the sink because the queue was full.
    pub written_through: u64,
    /// Saves refused because the queue was full ([`WhenFull::Reject`]).
    pub rejected: u64,
    /// Keys this instance's flusher wrote to the database.
    pub db_writes: u64,
    /// Sink calls.
    pub batches: u64,
    /// Flushed keys saved again during their flush (written again next round).
    pub newer_during_flush: u64,
    /// Failed writes scheduled for another attempt.
    pub retries: u64,
    /// Keys this instance's flusher sent to the dead letters.
    pub dead_lettered: u64,
    /// Queue calls that failed.
    pub queue_errors: u64,
    /// Saves acknowledged although their invalidation had to be buffered (below Strong).
    pub invalidations_buffered: u64,
    /// Keys this instance holds claims on now.
    pub claimed: u64,
    /// Flush lag (first unwritten save to its write), p50 / p99 / max in ms, over the
    /// last 4,096 writes; `None` before the first.
    pub flush_lag_p50_ms: Option<u64>,
    /// See `flush_lag_p50_ms`.
    pub flush_lag_p99_ms: Option<u64>,
    /// See `flush_lag_p50_ms`.
    pub flush_lag_max_ms: Option<u64>,
}

/// What [`WriteBehind::shutdown`] left behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Keys written during the drain.
    pub written: u64,
    /// Whether the drain ran out of time.
    pub timed_out: bool,
    /// Claims still held when it stopped (a sink call that overran the deadline): they
    /// run out after the claim lease and another instance writes those keys.
    pub claims_left: u64,
    /// Keys still waiting in the queue for other instances (all of the namespace's, as
    /// the queue reported them; `None` if it could not be asked).
    pub left_for_others: Option<u64>,
}

impl<K: CacheKey, V: CacheValue> WriteBehind<K, V> {
    pub(crate) fn new(cache: Cache<K, V>, wb: Arc<Shared<K, V>>) -> Self {
        WriteBehind { cache, wb }
    }

    fn shared(&self) -> &Shared<K, V> {
        &self.wb
    }

    fn ns(&self) -> &str {
        &self.cache.inner.cfg.namespace
    }

    /// Saves `value` for `key` and returns its sequence number once the value is durable
    /// at the queue's level and invalidated fleet-wide: from then on `get` and
    /// `get_or_load` on any instance return it (or a later save) instead of the
    /// database's row, until it is written and after.
    ///
    /// Fails with `InvalidInput` (oversized value), `Rejected` (queue full, with
    /// [`WhenFull::Reject`]), `Shutdown`, or the queue's error; then nothing was saved.
    /// If the save was queued but its invalidation failed: below the Strong level the
    /// save is acknowledged all the same (the invalidation is buffered and retried, and
    /// the other instances stop trusting their copies within `max_stale`: the level's
    /// bound, counted in [`WriteBehindStats::invalidations_buffered`]); at the Strong
    /// level the error is returned (the value is saved and will be written, but its
    /// fleet-wide visibility was not confirmed; the cache has made itself safe as after
    /// any failed invalidation).
    pub async fn save(&self, key: K, value: V) -> Result<u64> {
        let inner = &self.cache.inner;
        let wb = self.shared();
        if inner.is_closed() || wb.stopping.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Shutdown, "write-behind save after shutdown"));
        }
        let bytes = inner.encode_checked(&value)?;
        let key_str = key.to_key_string();
        let outcome =
            wb.cfg.queue.save(self.ns(), &key_str, bytes, wb.cfg.flush_delay, wb.cfg.limits).await?;
        let seq = match outcome {
            SaveOutcome::Queued { seq, replaced } => {
                if replaced {
                    wb.counters.coalesced.fetch_add(1, Ordering::Relaxed);
                }
                seq
            }
            SaveOutcome::Full { seq } => match wb.cfg.when_full {
                WhenFull::Reject => {
                    wb.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    return Err(full_error(self.ns(), wb.cfg.limits.max_entries, wb.cfg.limits.max_bytes));
                }
                WhenFull::WriteThrough => {
                    self.write_through(key.clone(), value, seq).await?;
                    seq
                }
            },
        };
        wb.counters.saves.fetch_add(1, Ordering::Relaxed);
        // Invalidated, not stored: the next read anywhere finds the value in the queue
        // (ordered by sequence there), whereas concurrent saves storing their values
        // in L2 could land in the opposite order of their sequences.
        match inner.invalidate(&Scope::Keys(vec![key_str]), Some(std::slice::from_ref(&key))).await {
            Ok(()) => Ok(seq),
            // Below Strong, a failed invalidation is buffered and retried while the
            // other instances detect the gap and stop trusting their copies within
            // `max_stale`: the level's bound holds, and the save itself is durable, so
            // it is acknowledged (failing it would only make the client save again).
            Err(e) if !inner.cfg.is_strong() && !e.is_invalid_input() && !e.is_shutdown() => {
                wb.counters.invalidations_buffered.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(namespace = %inner.cfg.namespace, error = %e, "write-behind save: invalidation buffered");
                Ok(seq)
            }
            Err(e) => Err(e),
        }
    }

    async fn write_through(&self, key: K, value: V, seq: u64) -> Result<()> {
        let wb = self.shared();
        let items = [SinkItem { key, value, seq }];
        let failed = match wb.cfg.sink.write_batch(&items).await {
            Ok(outcomes) => outcomes.into_iter().next().and_then(std::result::Result::err),
            Err(e) => Some(e),
        };
        if let Some(e) = failed {
            return Err(Error::new(
                ErrorKind::Rejected,
                "write-behind queue full and the write-through failed",
            )
            .with_source(e));
        }
        wb.counters.written_through.fetch_add(1, Ordering::Relaxed);
        wb.counters.db_writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Extends `key`'s sliding TTL (the heartbeat of an open draft): its L1 and L2
    /// entries live the cache's TTL from now. A waiting save never expires whatever
    /// the TTL (the queue holds it until written); this keeps the cached copy warm.
    /// Returns false when no cached entry was live.
    pub async fn touch(&self, key: &K) -> Result<bool> {
        self.cache.touch(key).await
    }

    /// Makes `key` due now and runs a flush round here. Returns true when the key no
    /// longer waits (written, by this or another instance); false when it still does
    /// (its write failed and will be retried, it is dead-lettered, or another instance
    /// holds its claim).
    pub async fn flush(&self, key: &K) -> Result<bool> {
        let key_str = key.to_key_string();
        let wb = self.shared();
        wb.cfg.queue.make_due(self.ns(), Some(&key_str)).await?;
        flusher::flush_due(&self.cache.inner).await?;
        Ok(wb.cfg.queue.pending_value(self.ns(), &key_str).await?.is_none())
    }

    /// Makes every waiting key due now and flushes here until nothing due is left;
    /// returns how many keys still wait (failing, dead-lettered, or claimed elsewhere).
    pub async fn flush_all(&self) -> Result<u64> {
        let wb = self.shared();
        wb.cfg.queue.make_due(self.ns(), None).await?;
        flusher::flush_due(&self.cache.inner).await?;
        let stats = wb.cfg.queue.stats(self.ns()).await?;
        Ok(stats.pending + stats.dead)
    }

    /// The namespace's queue: waiting keys and bytes, the oldest save, dead letters.
    pub async fn pending(&self) -> Result<QueueStats> {
        self.shared().cfg.queue.stats(self.ns()).await
    }

    /// This instance's counters.
    pub fn stats(&self) -> WriteBehindStats {
        let c = &self.shared().counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let lags = c.lags.lock();
        let any = lags.percentile(50.0).is_some();
        WriteBehindStats {
            saves: get(&c.saves),
            coalesced: get(&c.coalesced),
            written_through: get(&c.written_through),
            rejected: get(&c.rejected),
            db_writes: get(&c.db_writes),
            batches: get(&c.batches),
            newer_during_flush: get(&c.newer_during_flush),
            retries: get(&c.retries),
            dead_lettered: get(&c.dead_lettered),
            queue_errors: get(&c.queue_errors),
            invalidations_buffered: get(&c.invalidations_buffered),
            claimed: self.shared().claimed.load(Ordering::SeqCst),
            flush_lag_p50_ms: lags.percentile(50.0),
            flush_lag_p99_ms: lags.percentile(99.0),
            flush_lag_max_ms: any.then_some(lags.max),
        }
    }

    /// Up to `max` dead letters, oldest first.
    pub async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>> {
        self.shared().cfg.queue.dead_letters(self.ns(), max).await
    }

    /// Puts dead-lettered `key` (or every one, with `None`) back in the queue, due now;
    /// returns how many.
    pub async fn requeue_dead(&self, key: Option<&K>) -> Result<u64> {
        let key_str = key.map(CacheKey::to_key_string);
        let n = self.shared().cfg.queue.requeue_dead(self.ns(), key_str.as_deref()).await?;
        self.shared().wake.notify_one();
        Ok(n)
    }

    /// Stops this instance's flusher after writing what is due now, within `deadline`.
    /// Whatever is left stays in the queue for the other instances (nothing waiting is
    /// lost by stopping, with a durable queue). Saves fail with `Shutdown` afterwards.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let wb = self.shared();
        let before = wb.counters.db_writes.load(Ordering::Relaxed);
        let drained = tokio::time::timeout(deadline, flusher::flush_due(&self.cache.inner)).await;
        wb.stopping.store(true, Ordering::SeqCst);
        let left_for_others = wb.cfg.queue.stats(self.ns()).await.ok().map(|s| s.pending);
        ShutdownReport {
            written: wb.counters.db_writes.load(Ordering::Relaxed).saturating_sub(before),
            timed_out: drained.is_err(),
            claims_left: wb.claimed.load(Ordering::SeqCst),
            left_for_others,
        }
    }
}
