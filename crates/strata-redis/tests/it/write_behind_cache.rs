//! Write-behind end to end: full `strata::Cache`s on a real Redis, each instance with its
//! own `RedisTier`, `RedisStreamBackplane` and `RedisWriteBehindQueue` connection on one
//! server and prefix (as separate processes would be), flushing into a toy table with
//! the sequence guard a real sink has. Mirrors strata's tests over the in-process
//! queue: coalescing, read-your-writes on another instance, claim takeover, poison keys
//! and outages, shutdown and restart, and saves outliving the cache TTL.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use strata::write_behind::{QueueLimits, SinkError};
use strata::{Cache, ErrorKind, Sink, SinkItem, WriteBehindConfig, WriteBehindQueue};
use strata_redis::{RedisStreamBackplane, RedisWriteBehindQueue};
use strata_testkit::RedisServer;

use crate::support::redis_tier;

const NS: &str = "drafts";
const PREFIX: &str = "wbc";

/// A table of `(value, seq)` rows with the sequence guard (`stored.seq < item.seq`),
/// counting rows written and sink calls; `poison` keys are refused permanently, and
/// while `down` every call fails as a whole, transiently.
#[derive(Clone, Default)]
struct Table {
    rows: Arc<Mutex<HashMap<u64, (String, u64)>>>,
    writes: Arc<AtomicU64>,
    calls: Arc<AtomicU64>,
    poison: Arc<Mutex<Vec<u64>>>,
    down: Arc<AtomicBool>,
}

impl Table {
    fn row(&self, k: u64) -> Option<String> {
        self.rows.lock().get(&k).map(|(v, _)| v.clone())
    }
    fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Sink<u64, String> for Table {
    async fn write_batch(
        &self,
        items: &[SinkItem<u64, String>],
    ) -> Result<Vec<Result<(), SinkError>>, SinkError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(SinkError::transient("database unreachable"));
        }
        let poison = self.poison.lock().clone();
        let mut rows = self.rows.lock();
        Ok(items
            .iter()
            .map(|item| {
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

/// A queue connection of its own on `server`, under the shared prefix.
async fn queue(server: &RedisServer) -> RedisWriteBehindQueue {
    RedisWriteBehindQueue::builder(server.url())
        .prefix(PREFIX)
        // Generous: the suite runs on 2 busy cores.
        .op_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("build the queue")
}

/// Flush only when asked (an hour's delay), look often, retry fast.
fn config(queue: RedisWriteBehindQueue, table: &Table) -> WriteBehindConfig<u64, String> {
    WriteBehindConfig::new(Arc::new(queue) as Arc<dyn WriteBehindQueue>, table.clone())
        .flush_delay(Duration::from_secs(3600))
        .poll_interval(Duration::from_millis(50))
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(5))
}

type Tune = fn(WriteBehindConfig<u64, String>) -> WriteBehindConfig<u64, String>;

fn as_is(c: WriteBehindConfig<u64, String>) -> WriteBehindConfig<u64, String> {
    c
}

/// One instance, as a process of its own would be: its own tier, backplane and queue
/// connections on `server`, a cache TTL of `ttl`; ready when returned.
async fn instance(server: &RedisServer, table: &Table, ttl: Duration, tune: Tune) -> Cache<u64, String> {
    let backplane = RedisStreamBackplane::builder(server.url())
        .prefix(PREFIX)
        .block(Duration::from_millis(300))
        .read_grace(Duration::from_millis(300))
        .build()
        .await
        .expect("stream backplane");
    let cache = Cache::builder(NS)
        .tier(Arc::new(redis_tier(server, PREFIX).await))
        .backplane(Arc::new(backplane))
        .ttl(ttl)
        .heartbeat_interval(Duration::from_millis(200))
        .write_behind(tune(config(queue(server).await, table)))
        .build()
        .expect("valid config");
    tokio::time::timeout(Duration::from_secs(5), cache.ready()).await.expect("cache ready");
    cache
}

const TTL: Duration = Duration::from_secs(60);

fn loader(
    table: &Table,
    k: u64,
) -> impl FnOnce() -> std::future::Ready<Result<Option<String>, std::io::Error>> + Send + 'static {
    let table = table.clone();
    move || std::future::ready(Ok(table.row(k)))
}

/// Polls `cond` every 10 ms until it holds; panics after `within`. Returns the wait.
async fn eventually<F, Fut>(what: &str, within: Duration, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !cond().await {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queue_coalesces_100_saves_into_one_write() {
    let server = RedisServer::start();
    let table = Table::default();
    let cache = instance(&server, &table, TTL, as_is).await;
    let wb = cache.write_behind().expect("write-behind on");
    for i in 0..100 {
        wb.save(7, format!("draft {i}")).await.expect("save");
    }
    assert_eq!(table.writes(), 0, "nothing is due before the flush delay");
    assert_eq!(wb.pending().await.expect("pending").pending, 1, "one key waits");
    assert_eq!(wb.flush_all().await.expect("flush"), 0, "nothing left waiting");
    assert_eq!((table.writes(), table.calls()), (1, 1), "100 saves, one database write");
    assert_eq!(table.row(7).as_deref(), Some("draft 99"), "the latest save was written");
    let st = wb.stats();
    assert_eq!((st.saves, st.coalesced, st.db_writes, st.batches), (100, 99, 1, 1), "{st:?}");
    assert!(st.flush_lag_max_ms.is_some(), "the flush lag is measured");
    let q = wb.pending().await.expect("pending");
    assert_eq!((q.pending, q.pending_bytes, q.dead), (0, 0, 0), "{q:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queue_save_is_read_on_another_instance_before_the_write() {
    let server = RedisServer::start();
    let table = Table::default();
    table.rows.lock().insert(1, ("old".into(), 0));
    let a = instance(&server, &table, TTL, as_is).await;
    let b = instance(&server, &table, TTL, as_is).await;
    assert_eq!(b.get_or_load(&1, loader(&table, 1)).await.expect("read").as_deref(), Some("old"));
    assert_eq!(b.get_local(&1).as_deref(), Some("old"), "b holds the old row in L1");

    let applied = b.stats().invalidations_applied;
    a.write_behind().expect("wb").save(1, "new".into()).await.expect("save");
    eventually("b applied the save's invalidation", Duration::from_secs(3), || {
        std::future::ready(b.stats().invalidations_applied > applied)
    })
    .await;
    assert_eq!(b.get_local(&1), None, "b's L1 copy is gone");
    assert_eq!(table.row(1).as_deref(), Some("old"), "not written yet");
    let loads = b.stats().loads;
    assert_eq!(
        b.get_or_load(&1, loader(&table, 1)).await.expect("read").as_deref(),
        Some("new"),
        "get_or_load on the other instance"
    );
    assert_eq!(b.stats().loads, loads + 1, "one load, answered by the queue");
    assert_eq!(b.get(&1).await.expect("get").as_deref(), Some("new"), "get");
    assert_eq!(a.get(&1).await.expect("get").as_deref(), Some("new"), "the saving instance too");
    assert_eq!(table.row(1).as_deref(), Some("old"), "the table still holds the old row");

    // After the flush the table holds it and reads stay on it.
    assert_eq!(a.write_behind().expect("wb").flush_all().await.expect("flush"), 0);
    assert_eq!(table.row(1).as_deref(), Some("new"));
    b.invalidate(&1).await.expect("invalidate");
    assert_eq!(b.get_or_load(&1, loader(&table, 1)).await.expect("read").as_deref(), Some("new"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queue_a_dead_flushers_claims_are_taken_over() {
    fn live(c: WriteBehindConfig<u64, String>) -> WriteBehindConfig<u64, String> {
        c.flush_delay(Duration::ZERO)
            .poll_interval(Duration::from_millis(50))
            .claim_lease(Duration::from_millis(300))
    }
    let server = RedisServer::start();
    let table = Table::default();
    let lease = Duration::from_millis(300);
    // A flusher that claims and dies: its claim is never acknowledged.
    let dead = queue(&server).await;
    let value = Bytes::from(postcard::to_allocvec(&"orphan".to_owned()).expect("encode"));
    dead.save(NS, "9", value, Duration::ZERO, QueueLimits::default()).await.expect("save");
    let claimed_at = Instant::now();
    let claimed = dead.claim_due(NS, "dead", 10, lease).await.expect("claim");
    assert_eq!(claimed.len(), 1);

    let cache = instance(&server, &table, TTL, live).await;
    let wb = cache.write_behind().expect("wb");
    assert_eq!(
        cache.get(&9).await.expect("get").as_deref(),
        Some("orphan"),
        "the claimed save is readable meanwhile"
    );
    eventually("the live instance wrote the orphaned save", Duration::from_secs(3), || {
        std::future::ready(table.row(9).is_some())
    })
    .await;
    let took = claimed_at.elapsed();
    assert!(took >= lease - Duration::from_millis(10), "not before the dead claim ran out: {took:?}");
    eprintln!("the dead flusher's claim was taken over and written {took:?} after the claim");
    assert_eq!(table.row(9).as_deref(), Some("orphan"));
    assert_eq!(wb.stats().db_writes, 1);
    eventually("the queue is empty", Duration::from_secs(2), || async {
        wb.pending().await.expect("pending").pending == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queue_poison_key_is_dead_lettered_and_others_written() {
    let server = RedisServer::start();
    let table = Table::default();
    fn three(c: WriteBehindConfig<u64, String>) -> WriteBehindConfig<u64, String> {
        c.max_attempts(3)
    }
    let cache = instance(&server, &table, TTL, three).await;
    let wb = cache.write_behind().expect("wb");
    table.poison.lock().push(13);
    wb.save(13, "poison".into()).await.expect("save");
    wb.save(14, "fine".into()).await.expect("save");
    assert_eq!(wb.flush_all().await.expect("flush"), 1, "the dead letter still waits");
    assert_eq!(table.row(14).as_deref(), Some("fine"), "the poison key did not block the batch");
    let dead = wb.dead_letters(10).await.expect("dead letters");
    assert_eq!(dead.len(), 1, "the permanent failure is dead-lettered at once: {dead:?}");
    assert_eq!((dead[0].key.as_str(), dead[0].attempts), ("13", 1));
    assert!(dead[0].error.contains("constraint"), "{}", dead[0].error);
    assert_eq!(cache.get(&13).await.expect("get").as_deref(), Some("poison"), "a dead letter stays readable");

    // The database down for much longer than max_attempts × back-off: whole calls
    // failing transiently back the keys off but never dead-letter them.
    table.down.store(true, Ordering::SeqCst);
    wb.save(15, "v15".into()).await.expect("save");
    wb.save(16, "v16".into()).await.expect("save");
    let calls = table.calls();
    wb.flush_all().await.expect("flush");
    eventually("many more failed calls than max_attempts", Duration::from_secs(3), || {
        std::future::ready(table.calls() >= calls + 3 * 3)
    })
    .await;
    let st = wb.stats();
    assert!(st.retries >= 2 * 3, "retried past max_attempts: {st:?}");
    assert_eq!(st.dead_lettered, 1, "only the poison key: {st:?}");
    let dead = wb.dead_letters(10).await.expect("dead letters");
    assert_eq!(dead.iter().map(|d| d.key.as_str()).collect::<Vec<_>>(), ["13"], "{dead:?}");
    let q = wb.pending().await.expect("pending");
    assert_eq!((q.pending, q.dead), (2, 1), "{q:?}");
    assert_eq!(cache.get(&15).await.expect("get").as_deref(), Some("v15"), "readable during the outage");

    // The database is back: everything is written without being asked.
    table.down.store(false, Ordering::SeqCst);
    eventually("15 and 16 written after the outage", Duration::from_secs(3), || {
        std::future::ready(table.row(15).is_some() && table.row(16).is_some())
    })
    .await;
    assert_eq!((table.row(15).as_deref(), table.row(16).as_deref()), (Some("v15"), Some("v16")));
    // The poison key, fixed and requeued, is written too.
    table.poison.lock().clear();
    assert_eq!(wb.requeue_dead(None).await.expect("requeue"), 1);
    assert_eq!(wb.flush_all().await.expect("flush"), 0);
    assert_eq!(table.row(13).as_deref(), Some("poison"));
    let q = wb.pending().await.expect("pending");
    assert_eq!((q.pending, q.dead), (0, 0), "{q:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queue_shutdown_drains_and_survives_a_new_instance() {
    let server = RedisServer::start();
    let table = Table::default();
    // Due at once, no flusher: the drain is what writes them.
    fn drains(c: WriteBehindConfig<u64, String>) -> WriteBehindConfig<u64, String> {
        c.flush_delay(Duration::ZERO).run_flusher(false)
    }
    let a = instance(&server, &table, TTL, drains).await;
    let wb = a.write_behind().expect("wb");
    for k in 0..20 {
        wb.save(k, format!("v{k}")).await.expect("save");
    }
    let report = wb.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        (report.written, report.timed_out, report.claims_left, report.left_for_others),
        (20, false, 0, Some(0)),
        "{report:?}"
    );
    assert_eq!(table.writes(), 20);
    let err = wb.save(1, "late".into()).await.expect_err("no saves after shutdown");
    assert_eq!(err.kind(), ErrorKind::Shutdown);
    drop((wb, a));

    // Saves left on an instance without a flusher that stops (not due: nothing drains).
    fn idle(c: WriteBehindConfig<u64, String>) -> WriteBehindConfig<u64, String> {
        c.run_flusher(false)
    }
    let b = instance(&server, &table, TTL, idle).await;
    let wb = b.write_behind().expect("wb");
    for k in 100..110 {
        wb.save(k, format!("kept {k}")).await.expect("save");
    }
    let report = wb.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        (report.written, report.timed_out, report.claims_left, report.left_for_others),
        (0, false, 0, Some(10)),
        "{report:?}"
    );
    drop((wb, b));
    assert_eq!(table.writes(), 20, "nothing of b's was written");

    // A new instance, later, on the same Redis and prefix: it reads and writes them.
    let c = instance(&server, &table, TTL, as_is).await;
    let wb = c.write_behind().expect("wb");
    assert_eq!(wb.pending().await.expect("pending").pending, 10, "nothing was lost");
    assert_eq!(c.get_or_load(&105, loader(&table, 105)).await.expect("read").as_deref(), Some("kept 105"));
    assert_eq!(wb.flush_all().await.expect("flush"), 0);
    for k in 100..110 {
        assert_eq!(table.row(k), Some(format!("kept {k}")), "key {k}");
    }
    assert_eq!(table.writes(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queue_pending_save_outlives_the_cache_ttl() {
    let server = RedisServer::start();
    let table = Table::default();
    table.rows.lock().insert(5, ("db row".into(), 0));
    let ttl = Duration::from_millis(100);
    let a = instance(&server, &table, ttl, as_is).await;
    let b = instance(&server, &table, ttl, as_is).await;
    assert_eq!(b.get_or_load(&5, loader(&table, 5)).await.expect("read").as_deref(), Some("db row"));
    let wb = a.write_behind().expect("wb");
    wb.save(5, "draft".into()).await.expect("save");
    assert_eq!(a.get_or_load(&5, loader(&table, 5)).await.expect("read").as_deref(), Some("draft"));
    assert!(wb.touch(&5).await.expect("touch"), "the heartbeat finds the cached draft");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.get_local(&5), None, "the cached copy expired");
    let loads = b.stats().loads;
    assert_eq!(
        b.get_or_load(&5, loader(&table, 5)).await.expect("read").as_deref(),
        Some("draft"),
        "past the TTL the waiting save is still what another instance reads"
    );
    assert_eq!(b.stats().loads, loads + 1, "the cached copy was gone: a load, answered by the queue");
    assert_eq!(table.row(5).as_deref(), Some("db row"), "not written yet");
    assert_eq!(wb.pending().await.expect("pending").pending, 1);
}
