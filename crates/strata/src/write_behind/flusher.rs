//! The flusher: claims due keys, writes them through the sink, acknowledges or retries
//! each; and the state a cache keeps for write-behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng;

use super::WriteBehindConfig;
use super::queue::{AckOutcome, QueuedSave, RetryOutcome};
use super::sink::{SinkError, SinkItem};
use crate::cache::state::Inner;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{CacheKey, CacheValue};

/// How often the counters and the queue's figures go to the `metrics` recorder.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// Flush lags kept for the percentile in [`stats`](super::WriteBehind::stats).
const LAG_SAMPLES: usize = 4096;

/// What a cache keeps for write-behind.
pub(crate) struct Shared<K, V> {
    pub(crate) cfg: WriteBehindConfig<K, V>,
    /// The flusher's name in claims: the cache's origin id.
    pub(crate) owner: String,
    pub(crate) counters: Counters,
    /// Wakes the flusher early (`flush`, `flush_all`).
    pub(crate) wake: tokio::sync::Notify,
    /// Set by `shutdown`: the flusher claims nothing more.
    pub(crate) stopping: AtomicBool,
    /// Keys this instance holds claims on now.
    pub(crate) claimed: AtomicU64,
    /// Serialises flush rounds of this instance (the task's and `flush`'s).
    pub(crate) round: tokio::sync::Mutex<()>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) saves: AtomicU64,
    pub(crate) coalesced: AtomicU64,
    pub(crate) written_through: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) db_writes: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) newer_during_flush: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) queue_errors: AtomicU64,
    pub(crate) invalidations_buffered: AtomicU64,
    /// Flush lags (ms from the first unwritten save to its write), the last
    /// [`LAG_SAMPLES`].
    pub(crate) lags: Mutex<Lags>,
}

#[derive(Default)]
pub(crate) struct Lags {
    samples: Vec<u64>,
    next: usize,
    pub(crate) max: u64,
}

impl Lags {
    fn record(&mut self, ms: u64) {
        self.max = self.max.max(ms);
        if self.samples.len() < LAG_SAMPLES {
            self.samples.push(ms);
        } else {
            self.samples[self.next] = ms;
            self.next = (self.next + 1) % LAG_SAMPLES;
        }
    }

    pub(crate) fn percentile(&self, p: f64) -> Option<u64> {
        if self.samples.is_empty() {
            return None;
        }
        let mut sorted = self.samples.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
        sorted.get(rank.min(sorted.len() - 1)).copied()
    }
}

fn incr(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl<K: CacheKey, V: CacheValue> Shared<K, V> {
    pub(crate) fn new(cfg: WriteBehindConfig<K, V>, owner: String) -> Self {
        Shared {
            cfg,
            owner,
            counters: Counters::default(),
            wake: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
            claimed: AtomicU64::new(0),
            round: tokio::sync::Mutex::new(()),
        }
    }

    /// The pause before attempt `attempts + 1`: exponential from the minimum, capped,
    /// with ±50 % jitter so that keys failing together do not retry together.
    fn backoff(&self, attempts: u32) -> Duration {
        let (min, max) = self.cfg.backoff;
        let doubled = min.saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
        let base = doubled.min(max);
        base.mul_f64(rand::rng().random_range(0.5..1.5))
    }
}

/// The background task: flush what is due, then wait for the poll interval or a wake.
pub(crate) async fn run<K: CacheKey, V: CacheValue>(inner: Arc<Inner<K, V>>) {
    let Some(wb) = inner.write_behind.as_ref() else { return };
    let mut stop = inner.stop.clone();
    let every = wb.cfg.effective_poll_interval();
    let mut exported = std::time::Instant::now();
    loop {
        if exported.elapsed() >= EXPORT_EVERY {
            exported = std::time::Instant::now();
            export(&inner, wb).await;
        }
        if !wb.stopping.load(Ordering::SeqCst)
            && let Err(e) = flush_due(&inner).await
        {
            tracing::warn!(namespace = %inner.cfg.namespace, error = %e, "write-behind flush round failed");
        }
        tokio::select! {
            _ = stop.stopped() => return,
            _ = wb.wake.notified() => {}
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Pushes this instance's counters and the namespace's queue figures to `metrics`:
/// `strata_write_behind_{saves,coalesced,db_writes,retries,dead_lettered}_total`, and the
/// gauges `strata_write_behind_{pending,pending_bytes,dead,oldest_pending_seconds}`.
async fn export<K: CacheKey, V: CacheValue>(inner: &Inner<K, V>, wb: &Shared<K, V>) {
    let ns = inner.cfg.namespace.clone();
    let c = &wb.counters;
    for (name, counter) in [
        ("strata_write_behind_saves_total", &c.saves),
        ("strata_write_behind_coalesced_total", &c.coalesced),
        ("strata_write_behind_db_writes_total", &c.db_writes),
        ("strata_write_behind_retries_total", &c.retries),
        ("strata_write_behind_dead_lettered_total", &c.dead_lettered),
    ] {
        metrics::counter!(name, "namespace" => ns.clone()).absolute(counter.load(Ordering::Relaxed));
    }
    if let Ok(q) = wb.cfg.queue.stats(&ns).await {
        metrics::gauge!("strata_write_behind_pending", "namespace" => ns.clone()).set(q.pending as f64);
        metrics::gauge!("strata_write_behind_pending_bytes", "namespace" => ns.clone())
            .set(q.pending_bytes as f64);
        metrics::gauge!("strata_write_behind_dead", "namespace" => ns.clone()).set(q.dead as f64);
        let oldest = q.oldest_ms.map_or(0.0, |o| q.now_ms.saturating_sub(o) as f64 / 1e3);
        metrics::gauge!("strata_write_behind_oldest_pending_seconds", "namespace" => ns).set(oldest);
    }
}

/// Flushes batches until fewer than a batch were due; returns how many keys it wrote
/// or retried.
pub(crate) async fn flush_due<K: CacheKey, V: CacheValue>(inner: &Inner<K, V>) -> Result<u64> {
    let Some(wb) = inner.write_behind.as_ref() else { return Ok(0) };
    let _round = wb.round.lock().await;
    let mut total = 0u64;
    loop {
        if wb.stopping.load(Ordering::SeqCst) {
            return Ok(total);
        }
        let n = flush_batch(inner, wb).await?;
        total += n as u64;
        if n < wb.cfg.batch_size {
            return Ok(total);
        }
    }
}

/// One claim, one sink call, one acknowledgement or retry per key.
async fn flush_batch<K: CacheKey, V: CacheValue>(inner: &Inner<K, V>, wb: &Shared<K, V>) -> Result<usize> {
    let ns = &inner.cfg.namespace;
    let queue = &wb.cfg.queue;
    let claimed =
        queue.claim_due(ns, &wb.owner, wb.cfg.batch_size, wb.cfg.claim_lease).await.inspect_err(|_| {
            incr(&wb.counters.queue_errors, 1);
        })?;
    if claimed.is_empty() {
        return Ok(0);
    }
    let n = claimed.len();
    wb.claimed.fetch_add(n as u64, Ordering::SeqCst);
    let result = write_claimed(inner, wb, claimed).await;
    wb.claimed.fetch_sub(n as u64, Ordering::SeqCst);
    result.map(|()| n)
}

async fn write_claimed<K: CacheKey, V: CacheValue>(
    inner: &Inner<K, V>,
    wb: &Shared<K, V>,
    claimed: Vec<QueuedSave>,
) -> Result<()> {
    let mut items = Vec::with_capacity(claimed.len());
    let mut sent = Vec::with_capacity(claimed.len());
    for save in claimed {
        let key = K::parse_key(&save.key);
        let value = inner.cfg.codec.decode(&save.value);
        match (key, value) {
            (Some(key), Ok(value)) => {
                items.push(SinkItem { key, value, seq: save.seq });
                sent.push(save);
            }
            (None, _) => {
                fail(inner, wb, &save, "the key does not parse as this cache's key type", true, false).await?
            }
            (_, Err(e)) => {
                fail(inner, wb, &save, &format!("the value does not decode: {e}"), true, false).await?
            }
        }
    }
    if items.is_empty() {
        return Ok(());
    }
    incr(&wb.counters.batches, 1);
    metrics::histogram!("strata_write_behind_batch_size", "namespace" => inner.cfg.namespace.clone())
        .record(items.len() as f64);
    // The claim must outlive the write: a sink call that hangs past most of the lease is
    // abandoned (another instance would take the keys; the sequence guard makes the two
    // writes harmless, but there is no point in racing).
    let limit = wb.cfg.claim_lease.mul_f64(0.75);
    // A whole call that failed transiently (the database unreachable, the sink timed
    // out) says nothing against any one key: those keys back off but are never
    // dead-lettered for it, however long the outage lasts.
    let mut whole_call_down = false;
    let outcomes: Vec<std::result::Result<(), SinkError>> =
        match tokio::time::timeout(limit, wb.cfg.sink.write_batch(&items)).await {
            Ok(Ok(outcomes)) if outcomes.len() == items.len() => outcomes,
            Ok(Ok(outcomes)) => {
                let msg = format!("the sink returned {} outcomes for {} items", outcomes.len(), items.len());
                items.iter().map(|_| Err(SinkError::transient(msg.clone()))).collect()
            }
            Ok(Err(e)) => {
                let (msg, permanent) = (e.to_string(), e.is_permanent());
                whole_call_down = !permanent;
                items
                    .iter()
                    .map(|_| {
                        Err(if permanent {
                            SinkError::permanent(msg.clone())
                        } else {
                            SinkError::transient(msg.clone())
                        })
                    })
                    .collect()
            }
            Err(_) => {
                whole_call_down = true;
                let msg = format!("the sink did not answer within {limit:?}");
                items.iter().map(|_| Err(SinkError::transient(msg.clone()))).collect()
            }
        };
    let now_ms = inner.now().as_millis();
    for (save, outcome) in sent.iter().zip(outcomes) {
        match outcome {
            Ok(()) => {
                incr(&wb.counters.db_writes, 1);
                wb.counters.lags.lock().record(now_ms.saturating_sub(save.dirty_since_ms));
                let ack =
                    wb.cfg.queue.ack(&inner.cfg.namespace, &save.key, save.seq).await.inspect_err(|_| {
                        incr(&wb.counters.queue_errors, 1);
                    })?;
                if ack == AckOutcome::Newer {
                    incr(&wb.counters.newer_during_flush, 1);
                }
            }
            Err(e) => fail(inner, wb, save, &e.to_string(), e.is_permanent(), whole_call_down).await?,
        }
    }
    Ok(())
}

async fn fail<K: CacheKey, V: CacheValue>(
    inner: &Inner<K, V>,
    wb: &Shared<K, V>,
    save: &QueuedSave,
    error: &str,
    permanent: bool,
    outage: bool,
) -> Result<()> {
    let ns = &inner.cfg.namespace;
    let backoff = wb.backoff(save.attempts.saturating_add(1));
    let max_attempts = if outage { u32::MAX } else { wb.cfg.max_attempts };
    let outcome = wb
        .cfg
        .queue
        .retry(ns, &wb.owner, &save.key, save.seq, backoff, error, max_attempts, permanent)
        .await
        .inspect_err(|_| incr(&wb.counters.queue_errors, 1))?;
    match outcome {
        RetryOutcome::Retrying { attempts } => {
            incr(&wb.counters.retries, 1);
            tracing::debug!(namespace = %ns, key = %save.key, attempts, error, "write-behind write failed; retrying");
        }
        RetryOutcome::DeadLettered { attempts } => {
            incr(&wb.counters.dead_lettered, 1);
            tracing::warn!(namespace = %ns, key = %save.key, attempts, error, "write-behind save dead-lettered");
        }
        RetryOutcome::NotClaimed => {}
    }
    Ok(())
}

/// The error of a save refused by a full queue.
pub(crate) fn full_error(ns: &str, cfg_entries: u64, cfg_bytes: u64) -> Error {
    Error::new(
        ErrorKind::Rejected,
        format!(
            "write-behind queue of namespace {ns} is full ({cfg_entries} keys or {cfg_bytes} bytes waiting): \
             the database is not keeping up; raise max_pending, or choose WhenFull::WriteThrough"
        ),
    )
}
