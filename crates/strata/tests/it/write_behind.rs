//! Write-behind over the in-process queue: coalescing, read-your-writes across
//! instances, saves during a flush, claim takeover, backpressure, dead letters,
//! shutdown, and the queue conformance suite.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use strata::backplane::Mode;
use strata::write_behind::{QueueLimits, SinkError};
use strata::{
    Cache, ErrorKind, InProcessBackplane, InProcessQueue, InProcessTier, Sink, SinkItem, WhenFull,
    WriteBehindConfig, WriteBehindQueue,
};
use tokio::sync::Semaphore;

use crate::support::{NS, eventually};

/// A table of (value, seq) with the sequence guard a real sink has, and knobs to make
/// it fail or wait.
#[derive(Clone, Default)]
struct Table {
    rows: Arc<Mutex<HashMap<u64, (String, u64)>>>,
    writes: Arc<AtomicU64>,
    calls: Arc<AtomicU64>,
    /// Keys refused permanently.
    poison: Arc<Mutex<Vec<u64>>>,
    /// While set, every call fails transiently as a whole (the database unreachable).
    down: Arc<std::sync::atomic::AtomicBool>,
    /// Keys whose own write fails transiently (a lock timeout on that row).
    flaky: Arc<Mutex<Vec<u64>>>,
    /// When set, each call waits for a permit.
    gate: Arc<Mutex<Option<Arc<Semaphore>>>>,
}

impl Table {
    fn row(&self, k: u64) -> Option<String> {
        self.rows.lock().get(&k).map(|(v, _)| v.clone())
    }
}

#[async_trait]
impl Sink<u64, String> for Table {
    async fn write_batch(
        &self,
        items: &[SinkItem<u64, String>],
    ) -> Result<Vec<Result<(), SinkError>>, SinkError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let gate = self.gate.lock().clone();
        if let Some(gate) = gate {
            gate.acquire().await.expect("gate").forget();
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(SinkError::transient("database unreachable"));
        }
        let poison = self.poison.lock().clone();
        let flaky = self.flaky.lock().clone();
        let mut rows = self.rows.lock();
        Ok(items
            .iter()
            .map(|item| {
                if flaky.contains(&item.key) {
                    return Err(SinkError::transient(format!("row {} is locked", item.key)));
                }
                if poison.contains(&item.key) {
                    return Err(SinkError::permanent(format!("row {} violates a constraint", item.key)));
                }
                let row = rows.entry(item.key).or_insert((String::new(), 0));
                if row.1 < item.seq {
                    *row = (item.value.clone(), item.seq);
                    self.writes.fetch_add(1, Ordering::SeqCst);
                }
                Ok(())
            })
            .collect())
    }
}

struct Fleet {
    queue: Arc<InProcessQueue>,
    table: Table,
    caches: Vec<Cache<u64, String>>,
}

fn config(queue: &Arc<InProcessQueue>, table: &Table) -> WriteBehindConfig<u64, String> {
    WriteBehindConfig::new(queue.clone() as Arc<dyn WriteBehindQueue>, table.clone())
        .flush_delay(Duration::from_secs(3600))
        .poll_interval(Duration::from_millis(10))
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(5))
}

async fn fleet(
    n: usize,
    tune: impl Fn(WriteBehindConfig<u64, String>) -> WriteBehindConfig<u64, String>,
) -> Fleet {
    let queue = Arc::new(InProcessQueue::new());
    let table = Table::default();
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::with_mode(Mode::Stream);
    let mut caches = Vec::new();
    for _ in 0..n {
        let cache = Cache::builder(NS)
            .tier(Arc::new(tier.clone()))
            .backplane(Arc::new(hub.connect()))
            .heartbeat_interval(Duration::from_millis(20))
            .write_behind(tune(config(&queue, &table)))
            .build()
            .expect("valid config");
        cache.ready().await;
        caches.push(cache);
    }
    Fleet { queue, table, caches }
}

fn loader(
    table: &Table,
    k: u64,
) -> impl FnOnce() -> std::future::Ready<Result<Option<String>, std::io::Error>> + Send + 'static {
    let table = table.clone();
    move || std::future::ready(Ok(table.row(k)))
}

#[tokio::test]
async fn the_in_process_queue_passes_the_queue_conformance_suite() {
    strata::testing::queue_conformance::run(&InProcessQueue::new(), "in-process").await;
}

#[tokio::test]
async fn one_hundred_saves_between_flushes_are_one_database_write() {
    let f = fleet(1, |c| c).await;
    let wb = f.caches[0].write_behind().expect("write-behind on");
    for i in 0..100 {
        wb.save(7, format!("draft {i}")).await.expect("save");
    }
    assert_eq!(f.table.writes.load(Ordering::SeqCst), 0, "nothing is due before the flush delay");
    assert_eq!(wb.flush_all().await.expect("flush"), 0, "nothing left waiting");
    assert_eq!(f.table.writes.load(Ordering::SeqCst), 1, "100 saves, one database write");
    assert_eq!(f.table.row(7).as_deref(), Some("draft 99"), "the latest save was written");
    let st = wb.stats();
    assert_eq!((st.saves, st.coalesced, st.db_writes), (100, 99, 1));
    assert!(st.flush_lag_max_ms.is_some(), "the flush lag is measured");
}

#[tokio::test]
async fn a_save_is_read_on_every_instance_before_it_reaches_the_database() {
    let f = fleet(2, |c| c).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    f.table.rows.lock().insert(1, ("old".into(), 0));
    assert_eq!(b.get_or_load(&1, loader(&f.table, 1)).await.expect("read").as_deref(), Some("old"));
    a.write_behind().expect("wb").save(1, "new".into()).await.expect("save");
    eventually("b applied the save's invalidation", || b.stats().invalidations_applied >= 1).await;
    assert_eq!(f.table.row(1).as_deref(), Some("old"), "not written yet");
    let loads = b.stats().loads;
    assert_eq!(
        b.get_or_load(&1, loader(&f.table, 1)).await.expect("read").as_deref(),
        Some("new"),
        "get_or_load"
    );
    assert_eq!(b.get(&1).await.expect("get").as_deref(), Some("new"), "get");
    assert_eq!(b.get_many(&[1]).await.expect("get_many"), vec![Some("new".to_owned())], "get_many");
    assert_eq!(a.get(&1).await.expect("get").as_deref(), Some("new"), "the saving instance too");
    assert_eq!(b.stats().loads, loads + 1, "one load, answered by the queue");
    // After the flush the database holds it and reads stay on it.
    a.write_behind().expect("wb").flush_all().await.expect("flush");
    assert_eq!(f.table.row(1).as_deref(), Some("new"));
    b.invalidate(&1).await.expect("invalidate");
    assert_eq!(b.get_or_load(&1, loader(&f.table, 1)).await.expect("read").as_deref(), Some("new"));
}

#[tokio::test]
async fn a_save_during_a_flush_is_neither_lost_nor_overtaken() {
    let f = fleet(1, |c| c).await;
    let wb = f.caches[0].write_behind().expect("wb");
    wb.save(3, "first".into()).await.expect("save");
    let gate = Arc::new(Semaphore::new(0));
    *f.table.gate.lock() = Some(gate.clone());
    let flushing = tokio::spawn({
        let wb = wb.clone();
        async move { wb.flush_all().await }
    });
    eventually("the flush reached the sink", || f.table.calls.load(Ordering::SeqCst) == 1).await;
    wb.save(3, "second".into()).await.expect("save during the flush");
    gate.add_permits(1);
    *f.table.gate.lock() = None;
    flushing.await.expect("join").expect("flush");
    assert_eq!(wb.stats().newer_during_flush, 1, "the ack saw the newer save");
    assert_eq!(f.caches[0].get(&3).await.expect("get").as_deref(), Some("second"));
    wb.flush_all().await.expect("flush");
    assert_eq!(f.table.row(3).as_deref(), Some("second"), "the newer save was written after the older");
    assert_eq!(f.queue.stats(NS).await.expect("stats").pending, 0);
}

#[tokio::test]
async fn another_instance_takes_over_the_claims_of_one_that_died() {
    let f = fleet(1, |c| c.flush_delay(Duration::ZERO).claim_lease(Duration::from_millis(200))).await;
    // A flusher that claims and dies: its claim is never acknowledged.
    f.queue
        .save(NS, "9", postcard_bytes("orphan"), Duration::ZERO, QueueLimits::default())
        .await
        .expect("save");
    let claimed =
        f.queue.claim_due(NS, "dead-instance", 10, Duration::from_millis(200)).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    eventually("the live instance wrote the orphaned save", || f.table.row(9).is_some()).await;
    assert_eq!(f.table.row(9).as_deref(), Some("orphan"));
}

fn postcard_bytes(s: &str) -> bytes::Bytes {
    bytes::Bytes::from(postcard::to_allocvec(&s.to_owned()).expect("encode"))
}

#[tokio::test]
async fn a_full_queue_rejects_new_keys_or_writes_them_through() {
    let f = fleet(1, |c| c.max_pending(2, 1 << 20)).await;
    let wb = f.caches[0].write_behind().expect("wb");
    wb.save(1, "a".into()).await.expect("save");
    wb.save(2, "b".into()).await.expect("save");
    let err = wb.save(3, "c".into()).await.expect_err("a third key is refused");
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert!(err.to_string().contains("full"), "the error says why: {err}");
    wb.save(1, "a2".into()).await.expect("a waiting key is still saved");
    assert_eq!(wb.stats().rejected, 1);

    let g = fleet(1, |c| c.max_pending(1, 1 << 20).when_full(WhenFull::WriteThrough)).await;
    let wb = g.caches[0].write_behind().expect("wb");
    wb.save(1, "queued".into()).await.expect("save");
    wb.save(2, "through".into()).await.expect("written through");
    assert_eq!(g.table.row(2).as_deref(), Some("through"), "written at once");
    assert_eq!(g.table.row(1), None, "the queued one waits");
    assert_eq!(wb.stats().written_through, 1);
}

#[tokio::test]
async fn failing_writes_are_retried_then_dead_lettered_without_blocking_others() {
    let f = fleet(1, |c| c.max_attempts(3)).await;
    let wb = f.caches[0].write_behind().expect("wb");
    f.table.poison.lock().push(13);
    wb.save(13, "poison".into()).await.expect("save");
    wb.save(14, "fine".into()).await.expect("save");
    wb.flush_all().await.expect("flush");
    assert_eq!(f.table.row(14).as_deref(), Some("fine"), "the poison key did not block the batch");
    let dead = wb.dead_letters(10).await.expect("dead letters");
    assert_eq!(dead.len(), 1, "the permanent failure is dead-lettered at once");
    assert_eq!((dead[0].key.as_str(), dead[0].attempts), ("13", 1));
    assert!(dead[0].error.contains("constraint"), "{}", dead[0].error);
    assert_eq!(
        f.caches[0].get(&13).await.expect("get").as_deref(),
        Some("poison"),
        "a dead letter stays readable"
    );

    // A database down as a whole: retried with back-off, never dead-lettered.
    f.table.down.store(true, Ordering::SeqCst);
    wb.save(16, "w".into()).await.expect("save");
    wb.flush(&16).await.expect("flush");
    let calls = f.table.calls.load(Ordering::SeqCst);
    eventually("several attempts while the database is down", || {
        f.table.calls.load(Ordering::SeqCst) >= calls + 5
    })
    .await;
    assert_eq!(wb.dead_letters(10).await.expect("dead").len(), 1, "an outage dead-letters nothing");
    f.table.down.store(false, Ordering::SeqCst);
    eventually("written once the database is back", || f.table.row(16).is_some()).await;

    // One row's own transient failures: retried with back-off, dead after max_attempts.
    f.table.flaky.lock().push(15);
    let calls = f.table.calls.load(Ordering::SeqCst);
    wb.save(15, "v".into()).await.expect("save");
    wb.flush(&15).await.expect("flush");
    eventually("three attempts, then the dead letters", || f.table.calls.load(Ordering::SeqCst) >= calls + 3)
        .await;
    let queue = f.queue.clone();
    for _ in 0..200 {
        if queue.dead_letters(NS, 10).await.expect("dead").len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(wb.dead_letters(10).await.expect("dead").len(), 2, "15 joined the dead letters");
    assert!(wb.stats().retries >= 2, "retried before giving up: {:?}", wb.stats());
    // Fixed, requeued, written.
    f.table.flaky.lock().clear();
    f.table.poison.lock().clear();
    assert_eq!(wb.requeue_dead(None).await.expect("requeue"), 2);
    wb.flush_all().await.expect("flush");
    assert_eq!((f.table.row(13).as_deref(), f.table.row(15).as_deref()), (Some("poison"), Some("v")));
    assert_eq!(wb.pending().await.expect("pending").dead, 0);
}

#[tokio::test]
async fn shutdown_drains_what_is_due_and_refuses_later_saves() {
    let f = fleet(1, |c| c.flush_delay(Duration::ZERO).run_flusher(false)).await;
    let wb = f.caches[0].write_behind().expect("wb");
    for k in 0..20 {
        wb.save(k, format!("v{k}")).await.expect("save");
    }
    let report = wb.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        (report.written, report.timed_out, report.claims_left, report.left_for_others),
        (20, false, 0, Some(0))
    );
    assert_eq!(f.table.writes.load(Ordering::SeqCst), 20);
    let err = wb.save(1, "late".into()).await.expect_err("no saves after shutdown");
    assert_eq!(err.kind(), ErrorKind::Shutdown);
}

#[tokio::test]
async fn a_waiting_save_outlives_the_cache_ttl() {
    let queue = Arc::new(InProcessQueue::new());
    let table = Table::default();
    table.rows.lock().insert(5, ("db row".into(), 0));
    let cache: Cache<u64, String> = Cache::builder(NS)
        .tier(Arc::new(InProcessTier::new()))
        .ttl(Duration::from_millis(50))
        .write_behind(config(&queue, &table))
        .build()
        .expect("valid");
    let wb = cache.write_behind().expect("wb");
    wb.save(5, "draft".into()).await.expect("save");
    assert_eq!(cache.get_or_load(&5, loader(&table, 5)).await.expect("read").as_deref(), Some("draft"));
    assert!(wb.touch(&5).await.expect("touch"), "the heartbeat finds the cached draft");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        cache.get_or_load(&5, loader(&table, 5)).await.expect("read").as_deref(),
        Some("draft"),
        "past the TTL the waiting save is still what reads return"
    );
    assert_eq!(
        cache.get_or_load_many(&[5]).await.map_err(|e| e.kind()),
        Err(ErrorKind::InvalidInput),
        "no loader set"
    );
}

#[tokio::test]
async fn bad_write_behind_settings_fail_the_build() {
    let queue = Arc::new(InProcessQueue::new());
    let err = Cache::<u64, String>::builder(NS)
        .write_behind(config(&queue, &Table::default()).batch_size(0))
        .build()
        .expect_err("batch size 0");
    assert!(err.to_string().contains("batch_size"), "{err}");
    let err = Cache::<u64, String>::builder(NS)
        .write_behind(
            config(&queue, &Table::default()).retry_backoff(Duration::from_secs(2), Duration::from_secs(1)),
        )
        .build()
        .expect_err("min above max");
    assert!(err.to_string().contains("retry_backoff"), "{err}");
}
