//! strata-sql against real databases: the transaction helper on Postgres and SQLite
//! (commit, rollback, drop, failed commit, ordering, failed invalidation at the
//! Invalidated and Strong levels), and Postgres change capture (raw writes, malformed
//! notifications, listener reconnect). Postgres servers come from strata-testkit
//! (random loopback ports); the tests fail loudly if its binaries are missing.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use strata::{
    Cache, Consistency, Envelope, FillOutcome, FillToken, InProcessBackplane, InProcessTier, LockScope,
    Lookup, Tier, Timestamp,
};
use strata_sql::{CommitOutcome, InvalidationState};
use strata_testkit::PostgresServer;

const SCHEMA: &str = "
CREATE TABLE payment (id BIGINT PRIMARY KEY, status TEXT NOT NULL, version BIGINT NOT NULL DEFAULT 1);
CREATE TABLE parent (id BIGINT PRIMARY KEY);
CREATE TABLE child (
    id BIGINT PRIMARY KEY,
    parent_id BIGINT NOT NULL REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED
);
INSERT INTO payment (id, status) VALUES (1, 'pending'), (2, 'pending'), (3, 'pending');
";

const UPDATE: &str = "UPDATE payment SET status = $1, version = version + 1 WHERE id = $2";
const SELECT: &str = "SELECT status FROM payment WHERE id = $1";

type Log = Arc<Mutex<Vec<String>>>;

fn push(log: &Log, entry: impl Into<String>) {
    log.lock().unwrap().push(entry.into());
}

fn entries(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

/// Polls `cond` every millisecond until it holds; panics after `timeout`.
async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    start.elapsed()
}

/// A database for one test, with what must outlive its pool.
struct TestDb<DB: sqlx::Database> {
    pool: sqlx::Pool<DB>,
    /// A second pool: "another client" (sees only committed data).
    observer: sqlx::Pool<DB>,
    pg: Option<Arc<PostgresServer>>,
    _dir: Option<tempfile::TempDir>,
}

async fn postgres() -> TestDb<sqlx::Postgres> {
    let (server, url) = tokio::task::spawn_blocking(|| {
        let server = PostgresServer::start();
        let url = server.create_database("strata").expect("create database");
        (server, url)
    })
    .await
    .unwrap();
    let opts = || sqlx::postgres::PgPoolOptions::new().acquire_timeout(Duration::from_secs(5));
    let pool = opts().max_connections(5).connect(&url).await.expect("connect");
    let observer = opts().max_connections(2).connect(&url).await.expect("connect");
    sqlx::raw_sql(SCHEMA).execute(&pool).await.expect("schema");
    TestDb { pool, observer, pg: Some(Arc::new(server)), _dir: None }
}

async fn sqlite() -> TestDb<sqlx::Sqlite> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
    let dir = tempfile::tempdir().unwrap();
    let opts = SqliteConnectOptions::new()
        .filename(dir.path().join("strata.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(5));
    let pool = SqlitePoolOptions::new().max_connections(4).connect_with(opts.clone()).await.expect("open");
    let observer = SqlitePoolOptions::new().max_connections(1).connect_with(opts).await.expect("open");
    sqlx::raw_sql(SCHEMA).execute(&pool).await.expect("schema");
    TestDb { pool, observer, pg: None, _dir: Some(dir) }
}

/// An in-process tier that reports each delete: what the database said at that
/// moment (read through another connection), and the keys deleted.
#[derive(Clone)]
struct ObservingTier {
    inner: InProcessTier,
    log: Log,
    observe: Arc<dyn Fn() -> BoxFuture<'static, String> + Send + Sync>,
    deletes: Arc<Mutex<Vec<Vec<String>>>>,
}

#[async_trait]
impl Tier for ObservingTier {
    fn name(&self) -> &str {
        "observing"
    }
    fn tombstone_ttl(&self) -> Duration {
        self.inner.tombstone_ttl()
    }
    async fn lookup(&self, ns: &str, key: &str, lease: Option<Duration>) -> strata::Result<Lookup> {
        self.inner.lookup(ns, key, lease).await
    }
    async fn fill(
        &self,
        ns: &str,
        key: &str,
        env: Envelope,
        ttl: Duration,
        token: &FillToken,
    ) -> strata::Result<FillOutcome> {
        self.inner.fill(ns, key, env, ttl, token).await
    }
    async fn set(&self, ns: &str, key: &str, env: Envelope, ttl: Duration) -> strata::Result<()> {
        self.inner.set(ns, key, env, ttl).await
    }
    async fn delete(&self, ns: &str, keys: &[String]) -> strata::Result<()> {
        let seen = (self.observe)().await;
        push(&self.log, format!("l2 delete {ns} {keys:?}: database says {seen}"));
        let mut sorted = keys.to_vec();
        sorted.sort();
        self.deletes.lock().unwrap().push(sorted);
        self.inner.delete(ns, keys).await
    }
    async fn invalidate_tag(&self, ns: &str, tag: &str) -> strata::Result<()> {
        self.inner.invalidate_tag(ns, tag).await
    }
    async fn invalidate_namespace(&self, ns: &str) -> strata::Result<()> {
        self.inner.invalidate_namespace(ns).await
    }
    async fn touch(&self, ns: &str, key: &str, soft: Timestamp, ttl: Duration) -> strata::Result<bool> {
        self.inner.touch(ns, key, soft, ttl).await
    }
    async fn lock(&self, ns: &str, scope: LockScope<'_>, id: u64, ttl: Duration) -> strata::Result<()> {
        let seen = (self.observe)().await;
        push(&self.log, format!("l2 lock {ns} {scope:?}: database says {seen}"));
        self.inner.lock(ns, scope, id, ttl).await
    }
    async fn unlock(&self, ns: &str, scope: LockScope<'_>, id: u64) -> strata::Result<()> {
        let seen = (self.observe)().await;
        push(&self.log, format!("l2 unlock {ns} {scope:?}: database says {seen}"));
        self.inner.unlock(ns, scope, id).await
    }
}

/// `n` instances of the "payment" cache sharing `tier` and an in-process backplane.
async fn fleet(
    n: usize,
    level: Consistency,
    tier: Arc<dyn Tier>,
    log: Option<Log>,
) -> Vec<Cache<i64, String>> {
    let hub = InProcessBackplane::new();
    let mut caches = Vec::new();
    for i in 0..n {
        let mut b = Cache::builder("payment")
            .tier(tier.clone())
            .backplane(Arc::new(hub.connect()))
            .consistency(level)
            .time_to_live(Duration::from_secs(3600))
            .heartbeat_interval(Duration::from_millis(100))
            // The observing tier queries the database inside its delete.
            .l2_timeout(Duration::from_secs(2))
            .tags(|_k: &i64, _v: &String| vec!["merchant:7".to_owned()]);
        if let (0, Some(log)) = (i, &log) {
            let log = log.clone();
            b = b.after_invalidate(move |what| push(&log, format!("hook payment {what:?}")));
        }
        let cache = b.build().expect("build");
        cache.ready().await;
        caches.push(cache);
    }
    caches
}

macro_rules! transaction_tests {
    ($module:ident, $db:ty, $setup:path) => {
        mod $module {
            use super::*;

            type Db = $db;

            /// Reads `id` through `cache`, loading from the database on a miss.
            async fn load(cache: &Cache<i64, String>, pool: &sqlx::Pool<Db>, id: i64) -> Option<String> {
                let pool = pool.clone();
                cache
                    .get_or_load(&id, move || async move {
                        sqlx::query_scalar::<_, String>(SELECT).bind(id).fetch_optional(&pool).await
                    })
                    .await
                    .expect("load")
            }

            /// Like `load`, counting loader calls.
            async fn load_counted(
                cache: &Cache<i64, String>,
                pool: &sqlx::Pool<Db>,
                id: i64,
                loads: &Arc<AtomicUsize>,
            ) -> Option<String> {
                let pool = pool.clone();
                let loads = loads.clone();
                cache
                    .get_or_load(&id, move || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        sqlx::query_scalar::<_, String>(SELECT).bind(id).fetch_optional(&pool).await
                    })
                    .await
                    .expect("load")
            }

            /// Begins a transaction that settles row 1 and invalidates it in `cache`.
            async fn settle_row_1(
                pool: &sqlx::Pool<Db>,
                cache: &Cache<i64, String>,
            ) -> strata_sql::Transaction<'static, Db> {
                let mut tx = strata_sql::begin(pool).await.unwrap();
                sqlx::query(UPDATE).bind("settled").bind(1_i64).execute(&mut *tx).await.unwrap();
                tx.invalidate(cache, &1);
                tx
            }

            /// Adds an after-commit action to `tx` that counts its runs.
            fn count_runs(tx: &mut strata_sql::Transaction<'_, Db>) -> Arc<AtomicUsize> {
                let ran = Arc::new(AtomicUsize::new(0));
                let counter = ran.clone();
                tx.after_commit(move || async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                });
                ran
            }

            fn observing_tier(db: &TestDb<Db>, log: &Log) -> ObservingTier {
                let observer = db.observer.clone();
                ObservingTier {
                    inner: InProcessTier::new(),
                    log: log.clone(),
                    observe: Arc::new(move || {
                        let observer = observer.clone();
                        Box::pin(async move {
                            sqlx::query_scalar::<_, String>(SELECT)
                                .bind(1_i64)
                                .fetch_one(&observer)
                                .await
                                .unwrap_or_else(|e| format!("error {e}"))
                        })
                    }),
                    deletes: Arc::default(),
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn commit_invalidates_every_instance() {
                let db = $setup().await;
                let tier = InProcessTier::new();
                let caches = fleet(3, Consistency::Invalidated, Arc::new(tier.clone()), None).await;
                for c in &caches {
                    assert_eq!(load(c, &db.pool, 1).await.as_deref(), Some("pending"));
                    assert_eq!(load(c, &db.pool, 2).await.as_deref(), Some("pending"));
                }

                let mut tx = strata_sql::begin(&db.pool).await.unwrap();
                sqlx::query(UPDATE).bind("settled").bind(1_i64).execute(&mut *tx).await.unwrap();
                tx.invalidate(&caches[0], &1);
                // Nothing is invalidated before the commit.
                for c in &caches {
                    assert_eq!(c.get_local(&1).as_deref(), Some("pending"));
                }
                let report = tx.commit().await.unwrap();
                assert!(report.is_clean(), "{report:?}");
                assert_eq!(report.invalidations.len(), 1);
                assert_eq!(report.invalidations[0].keys, 1);
                assert_eq!(report.invalidations[0].state, InvalidationState::Done);

                assert_eq!(caches[0].get_local(&1), None, "the committing instance dropped its copy");
                assert!(tier.raw("payment", "1").is_none(), "L2 is clean when commit returns");
                wait_until("every instance drops key 1", Duration::from_secs(2), || {
                    caches.iter().all(|c| c.get_local(&1).is_none())
                })
                .await;
                for c in &caches {
                    assert_eq!(load(c, &db.pool, 1).await.as_deref(), Some("settled"));
                    assert_eq!(c.get_local(&2).as_deref(), Some("pending"), "other keys untouched");
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rollback_drop_and_failed_commit_invalidate_nothing() {
                let db = $setup().await;
                let log: Log = Arc::default();
                let tier = observing_tier(&db, &log);
                let caches =
                    fleet(2, Consistency::Invalidated, Arc::new(tier.clone()), Some(log.clone())).await;
                for c in &caches {
                    load(c, &db.pool, 1).await;
                }
                let ran = Arc::new(AtomicUsize::new(0));
                let action = |ran: &Arc<AtomicUsize>| {
                    let ran = ran.clone();
                    move || async move {
                        ran.fetch_add(1, Ordering::SeqCst);
                    }
                };

                // Explicit rollback.
                let mut tx = strata_sql::begin(&db.pool).await.unwrap();
                sqlx::query(UPDATE).bind("rolled-back").bind(1_i64).execute(&mut *tx).await.unwrap();
                tx.invalidate(&caches[0], &1).invalidate_tag(&caches[0], "merchant:7");
                tx.after_commit(action(&ran));
                tx.rollback().await.unwrap();

                // Dropped without commit.
                {
                    let mut tx = strata_sql::begin(&db.pool).await.unwrap();
                    sqlx::query(UPDATE).bind("dropped").bind(1_i64).execute(&mut *tx).await.unwrap();
                    tx.invalidate(&caches[1], &1).invalidate_all(&caches[1]);
                    tx.after_commit(action(&ran));
                }

                // A commit the database rejects: a deferred foreign key fails at COMMIT.
                let mut tx = strata_sql::begin(&db.pool).await.unwrap();
                sqlx::query(UPDATE).bind("rejected").bind(1_i64).execute(&mut *tx).await.unwrap();
                sqlx::query("INSERT INTO child (id, parent_id) VALUES (1, 999)")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.invalidate(&caches[0], &1);
                tx.after_commit(action(&ran));
                let err = tx.commit().await.expect_err("the deferred constraint fails the commit");
                assert_eq!(err.outcome(), CommitOutcome::RolledBack, "{err}");
                assert!(err.invalidations().is_empty());
                assert!(matches!(err.sqlx_error(), Some(sqlx::Error::Database(_))), "{err}");

                // Give a stray invalidation time to show up anywhere.
                tokio::time::sleep(Duration::from_millis(150)).await;
                assert_eq!(ran.load(Ordering::SeqCst), 0, "no action ran");
                assert!(entries(&log).is_empty(), "nothing was invalidated: {:?}", entries(&log));
                for c in &caches {
                    assert_eq!(c.get_local(&1).as_deref(), Some("pending"), "L1 kept its (correct) copy");
                    assert_eq!(load(c, &db.pool, 1).await.as_deref(), Some("pending"));
                }
                let status: String =
                    sqlx::query_scalar(SELECT).bind(1_i64).fetch_one(&db.observer).await.unwrap();
                assert_eq!(status, "pending");
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn commit_then_invalidation_then_actions_in_order() {
                let db = $setup().await;
                let log: Log = Arc::default();
                let tier = observing_tier(&db, &log);
                let caches =
                    fleet(2, Consistency::Invalidated, Arc::new(tier.clone()), Some(log.clone())).await;
                // A second cache with other key and value types, in the same transaction.
                let by_name: Cache<String, i64> = {
                    let log = log.clone();
                    Cache::builder("by_name")
                        .tier(Arc::new(tier.clone()))
                        .l2_timeout(Duration::from_secs(2))
                        .after_invalidate(move |what| push(&log, format!("hook by_name {what:?}")))
                        .build()
                        .unwrap()
                };
                for c in &caches {
                    load(c, &db.pool, 1).await;
                }

                let mut tx = strata_sql::begin(&db.pool).await.unwrap();
                sqlx::query(UPDATE).bind("settled").bind(1_i64).execute(&mut *tx).await.unwrap();
                tx.invalidate(&caches[0], &1);
                tx.invalidate(&by_name, &"alice".to_owned());
                tx.invalidate_many(&caches[0], &[2, 1]); // grouped with key 1: one delete of {1, 2}
                {
                    let log = log.clone();
                    tx.after_commit_named("event", move || async move { push(&log, "action event") });
                }
                {
                    let log = log.clone();
                    tx.after_commit(move || async move {
                        push(&log, "action failing");
                        Err::<(), _>(std::io::Error::other("kafka unavailable"))
                    });
                }
                tx.after_commit_named("panicking", || async {
                    if true {
                        panic!("boom")
                    }
                });
                {
                    let log = log.clone();
                    let observer = db.observer.clone();
                    tx.after_commit_named("last", move || async move {
                        let s: String = sqlx::query_scalar(SELECT).bind(1_i64).fetch_one(&observer).await?;
                        push(&log, format!("action last: database says {s}"));
                        Ok::<_, sqlx::Error>(())
                    });
                }
                assert_eq!(tx.registered(), (2, 4));
                let report = tx.commit().await.unwrap();

                let log = entries(&log);
                assert_eq!(log.len(), 7, "{log:#?}");
                // The invalidations (the two caches run concurrently) come first, each
                // after the commit: the delete saw the committed row.
                let (invalidations, actions) = log.split_at(4);
                let mut inv = invalidations.to_vec();
                inv.sort();
                assert_eq!(
                    inv,
                    vec![
                        "hook by_name Keys([\"alice\"])".to_owned(),
                        "hook payment Keys([\"1\", \"2\"])".to_owned(),
                        "l2 delete by_name [\"alice\"]: database says settled".to_owned(),
                        "l2 delete payment [\"1\", \"2\"]: database says settled".to_owned(),
                    ],
                    "{log:#?}"
                );
                assert_eq!(
                    actions,
                    ["action event", "action failing", "action last: database says settled"],
                    "actions in registration order, after every invalidation; the panic is contained"
                );
                let mut deletes = tier.deletes.lock().unwrap().clone();
                deletes.sort();
                assert_eq!(deletes, vec![vec!["1".to_owned(), "2".to_owned()], vec!["alice".to_owned()]]);

                assert!(report.all_invalidated());
                assert!(!report.is_clean());
                let names: Vec<_> = report.actions.iter().map(|a| a.name.to_string()).collect();
                assert_eq!(names, ["event", "after_commit#1", "panicking", "last"]);
                let failed: Vec<_> = report.failed_actions().map(|a| a.index).collect();
                assert_eq!(failed, [1, 2]);
                let panic_msg = report.actions[2].error.as_ref().unwrap().to_string();
                assert!(panic_msg.contains("panicked") && panic_msg.contains("boom"), "{panic_msg}");
                assert!(report.actions[1].error.as_ref().unwrap().to_string().contains("kafka unavailable"));
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn failed_invalidation_at_invalidated_is_buffered_then_repaired() {
                let db = $setup().await;
                let tier = InProcessTier::new();
                let caches = fleet(2, Consistency::Invalidated, Arc::new(tier.clone()), None).await;
                for c in &caches {
                    load(c, &db.pool, 1).await;
                }
                assert!(tier.raw("payment", "1").is_some());

                tier.set_available(false);
                let events: Log = Arc::default();
                let mut tx = strata_sql::begin(&db.pool).await.unwrap();
                sqlx::query(UPDATE).bind("settled").bind(1_i64).execute(&mut *tx).await.unwrap();
                tx.invalidate(&caches[0], &1);
                {
                    let events = events.clone();
                    tx.after_commit(move || async move { push(&events, "published") });
                }
                let report = tx.commit().await.expect("the commit itself succeeded");
                let inv = &report.invalidations[0];
                assert_eq!(inv.state, InvalidationState::Buffered, "{report:?}");
                assert_eq!(inv.consistency, Consistency::Invalidated);
                assert!(inv.error.as_ref().is_some_and(strata::Error::is_transient));
                assert!(!report.is_clean());
                assert_eq!(entries(&events), ["published"], "actions run after a buffered invalidation");
                assert!(caches[0].pending_invalidations() > 0);
                assert!(tier.raw("payment", "1").is_some(), "L2 still holds the old row");
                assert_eq!(caches[0].get_local(&1), None);

                tier.set_available(true);
                let start = Instant::now();
                while caches[0].flush_pending().await > 0 {
                    assert!(start.elapsed() < Duration::from_secs(5), "buffered delete not repaired");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                assert!(tier.raw("payment", "1").is_none(), "L2 clean after flush_pending");
                wait_until("instance 1 drops key 1", Duration::from_secs(2), || {
                    caches[1].get_local(&1).is_none()
                })
                .await;
                for c in &caches {
                    assert_eq!(load(c, &db.pool, 1).await.as_deref(), Some("settled"));
                }
            }

            /// Strong: L2 down before the commit, so the write lock cannot be taken: the
            /// transaction is rolled back, nothing runs, the caches keep the (still
            /// current) row.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn strong_write_is_refused_when_the_lock_cannot_be_taken() {
                let db = $setup().await;
                let tier = InProcessTier::new();
                let caches = fleet(2, Consistency::Strong, Arc::new(tier.clone()), None).await;
                for c in &caches {
                    load(c, &db.pool, 1).await;
                }

                tier.set_available(false);
                let mut tx = settle_row_1(&db.pool, &caches[0]).await;
                let ran = count_runs(&mut tx);
                let err = tx.commit().await.expect_err("no lock, no commit");
                assert!(err.is_rolled_back(), "{err}");
                assert!(err.sqlx_error().is_none());
                assert!(err.cache_error().is_some_and(strata::Error::is_transient), "{err}");
                assert!(err.to_string().contains("write lock"), "{err}");
                assert_eq!(ran.load(Ordering::SeqCst), 0, "no action for a write that did not happen");
                let row: String =
                    sqlx::query_scalar(SELECT).bind(1_i64).fetch_one(&db.observer).await.unwrap();
                assert_eq!(row, "pending", "rolled back");
                assert_eq!(caches[0].stats().write_locks_failed, 1);

                // L2 back: the same write goes through, and every instance reads it.
                tier.set_available(true);
                let start = Instant::now();
                let report = loop {
                    // The breaker may still be open from the outage for a moment.
                    match settle_row_1(&db.pool, &caches[0]).await.commit().await {
                        Ok(r) => break r,
                        Err(e) if e.is_rolled_back() && e.cache_error().is_some() => {
                            assert!(start.elapsed() < Duration::from_secs(10), "still refused: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("{e}"),
                    }
                };
                assert!(report.all_invalidated(), "{report:?}");
                for c in &caches {
                    assert_eq!(load(c, &db.pool, 1).await.as_deref(), Some("settled"));
                }
            }

            /// Strong: L2 fails after the commit (the write lock was taken, its release
            /// fails): the cache is bypassed until a namespace bump has cleaned L2.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn failed_release_at_strong_bypasses_until_clean() {
                let db = $setup().await;
                let log: Log = Arc::default();
                let mut observing = observing_tier(&db, &log);
                let tier = observing.inner.clone();
                // The observer runs inside every lock / unlock: take L2 down at the second
                // call, the release after the commit.
                let calls = Arc::new(AtomicUsize::new(0));
                {
                    let calls = calls.clone();
                    let tier = tier.clone();
                    let observe = observing.observe.clone();
                    observing.observe = Arc::new(move || {
                        if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                            tier.set_available(false);
                        }
                        observe()
                    });
                }
                let caches = fleet(2, Consistency::Strong, Arc::new(observing), None).await;
                for c in &caches {
                    load(c, &db.pool, 1).await;
                }

                let mut tx = settle_row_1(&db.pool, &caches[0]).await;
                let ran = count_runs(&mut tx);
                let report = tx.commit().await.unwrap();
                assert_eq!(report.invalidations[0].state, InvalidationState::Bypassed, "{report:?}");
                assert_eq!(report.invalidations[0].consistency, Consistency::Strong);
                assert_eq!(ran.load(Ordering::SeqCst), 1, "actions run: the cache is bypassed, hence safe");
                assert!(caches[0].is_bypassed());
                let log = entries(&log);
                assert!(
                    log[0].starts_with("l2 lock payment") && log[0].ends_with("database says pending"),
                    "{log:?}"
                );
                assert!(
                    log[1].starts_with("l2 unlock payment") && log[1].ends_with("database says settled"),
                    "{log:?}"
                );

                // Reads go to the database, every time.
                let loads = Arc::new(AtomicUsize::new(0));
                for _ in 0..3 {
                    assert_eq!(
                        load_counted(&caches[0], &db.pool, 1, &loads).await.as_deref(),
                        Some("settled")
                    );
                }
                assert_eq!(loads.load(Ordering::SeqCst), 3);
                assert!(caches[0].stats().bypassed_reads >= 3);

                // Recovery: L2 back, the namespace bump succeeds, the cache is trusted again.
                tier.set_available(true);
                let start = Instant::now();
                while caches[0].flush_pending().await > 0 || caches[0].is_bypassed() {
                    assert!(start.elapsed() < Duration::from_secs(5), "cache not trusted again");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let loads = Arc::new(AtomicUsize::new(0));
                for _ in 0..3 {
                    assert_eq!(
                        load_counted(&caches[0], &db.pool, 1, &loads).await.as_deref(),
                        Some("settled")
                    );
                }
                assert_eq!(loads.load(Ordering::SeqCst), 1, "served from the cache again after one load");
                assert_eq!(load(&caches[1], &db.pool, 1).await.as_deref(), Some("settled"));
            }
        }
    };
}

transaction_tests!(postgres_tx, sqlx::Postgres, postgres);
transaction_tests!(sqlite_tx, sqlx::Sqlite, sqlite);

/// Postgres answers COMMIT in a transaction aborted by a failed statement with a
/// silent ROLLBACK; the helper reports it as rolled back and runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_aborted_transaction_is_not_reported_committed() {
    let db = postgres().await;
    let caches = fleet(1, Consistency::Invalidated, Arc::new(InProcessTier::new()), None).await;
    let ran = Arc::new(AtomicUsize::new(0));
    let mut tx = strata_sql::begin(&db.pool).await.unwrap();
    sqlx::query(UPDATE).bind("lost").bind(1_i64).execute(&mut *tx).await.unwrap();
    let failed =
        sqlx::query("INSERT INTO payment (id, status) VALUES (1, 'duplicate')").execute(&mut *tx).await;
    assert!(failed.is_err(), "duplicate key");
    tx.invalidate(&caches[0], &1);
    {
        let ran = ran.clone();
        tx.after_commit(move || async move {
            ran.fetch_add(1, Ordering::SeqCst);
        });
    }
    let err = tx.commit().await.expect_err("an aborted transaction does not commit");
    assert!(err.is_rolled_back(), "{err}");
    let code = match err.sqlx_error().expect("a database error") {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    };
    assert_eq!(code.as_deref(), Some("25P02"), "{err}");
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    let status: String = sqlx::query_scalar(SELECT).bind(1_i64).fetch_one(&db.pool).await.unwrap();
    assert_eq!(status, "pending");
    // The connection went back to the pool usable.
    let mut tx = strata_sql::begin(&db.pool).await.unwrap();
    sqlx::query(UPDATE).bind("settled").bind(1_i64).execute(&mut *tx).await.unwrap();
    let report = tx.commit().await.unwrap();
    assert!(report.is_clean());
}

// ---------------------------------------------------------------- change capture

struct Capture {
    db: TestDb<sqlx::Postgres>,
    caches: Vec<Cache<i64, String>>,
    listener: strata_sql::ChangeListener,
}

/// A 3-instance fleet, change capture on `payment`, a listener feeding instance 0.
async fn capture() -> Capture {
    let db = postgres().await;
    strata_sql::install_change_capture(&db.pool, "payment", "id", Some("version")).await.expect("install");
    // Idempotent: installing twice is fine.
    strata_sql::install_change_capture(&db.pool, "payment", "id", Some("version")).await.expect("reinstall");
    let caches = fleet(3, Consistency::Invalidated, Arc::new(InProcessTier::new()), None).await;
    let listener = strata_sql::ChangeListener::builder(&db.pool)
        .table("payment", &caches[0])
        .heartbeat(Some(Duration::from_millis(200)))
        .heartbeat_timeout(Duration::from_secs(1))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .start()
        .await
        .expect("listener");
    assert!(listener.is_connected());
    Capture { db, caches, listener }
}

async fn fill(caches: &[Cache<i64, String>], pool: &sqlx::PgPool, ids: &[i64]) {
    for c in caches {
        for &id in ids {
            let pool = pool.clone();
            c.get_or_load(&id, move || async move {
                sqlx::query_scalar::<_, String>(SELECT).bind(id).fetch_optional(&pool).await
            })
            .await
            .expect("load");
            assert!(c.get_local(&id).is_some(), "instance filled");
        }
    }
}

/// Waits, polling from a blocking thread every 20 µs, until no instance holds `id`.
async fn time_until_clean(caches: &[Cache<i64, String>], id: i64, since: Instant) -> Duration {
    let caches = caches.to_vec();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if caches.iter().all(|c| c.get_local(&id).is_none()) {
                return since.elapsed();
            }
            assert!(Instant::now() < deadline, "key {id} not invalidated on every instance within 3 s");
            std::thread::sleep(Duration::from_micros(20));
        }
    })
    .await
    .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_capture_raw_writes_clean_every_instance() {
    let Capture { db, caches, listener } = capture().await;
    let pg = db.pg.clone().unwrap();

    // Raw UPDATEs from another client (autocommit), timed from the statement's return.
    const ROUNDS: usize = 30;
    let mut after_commit = Vec::new();
    let mut from_start = Vec::new();
    for i in 0..ROUNDS {
        fill(&caches, &db.pool, &[1]).await;
        let start = Instant::now();
        sqlx::query("UPDATE payment SET status = $1, version = version + 1 WHERE id = 1")
            .bind(format!("raw-{i}"))
            .execute(&db.observer)
            .await
            .unwrap();
        let committed = Instant::now();
        after_commit.push(time_until_clean(&caches, 1, committed).await);
        from_start.push(committed.duration_since(start) + *after_commit.last().unwrap());
    }
    after_commit.sort();
    from_start.sort();
    eprintln!(
        "change capture, raw UPDATE (other client) -> all 3 L1 clean, {ROUNDS} rounds: \
         after commit returned p50 {:?} p90 {:?} max {:?}; from statement start p50 {:?} max {:?}",
        percentile(&after_commit, 0.5),
        percentile(&after_commit, 0.9),
        after_commit[ROUNDS - 1],
        percentile(&from_start, 0.5),
        from_start[ROUNDS - 1],
    );
    for c in &caches {
        let pool = db.pool.clone();
        let v = c
            .get_or_load(&1, move || async move {
                sqlx::query_scalar::<_, String>(SELECT).bind(1_i64).fetch_optional(&pool).await
            })
            .await
            .unwrap();
        assert_eq!(v, Some(format!("raw-{}", ROUNDS - 1)));
    }

    // The same through psql, a separate process.
    fill(&caches, &db.pool, &[1, 2, 3]).await;
    let psql_start = Instant::now();
    let pg2 = pg.clone();
    tokio::task::spawn_blocking(move || {
        pg2.psql("strata", "UPDATE payment SET status = 'psql' WHERE id = 1")
    })
    .await
    .unwrap()
    .expect("psql");
    let psql_returned = Instant::now();
    let clean = time_until_clean(&caches, 1, psql_returned).await;
    eprintln!(
        "change capture, raw UPDATE via psql -> all 3 L1 clean {clean:?} after psql returned ({:?} after psql started, process start included)",
        psql_returned.duration_since(psql_start) + clean
    );
    assert_eq!(caches[1].get_local(&2).as_deref(), Some("pending"), "other rows untouched");

    // DELETE and TRUNCATE.
    pg.psql("strata", "DELETE FROM payment WHERE id = 2").expect("psql");
    time_until_clean(&caches, 2, Instant::now()).await;
    assert_eq!(caches[2].get_local(&3).as_deref(), Some("pending"));
    pg.psql("strata", "TRUNCATE payment").expect("psql");
    time_until_clean(&caches, 3, Instant::now()).await;

    wait_until("a heartbeat comes back", Duration::from_secs(3), || listener.stats().heartbeats >= 1).await;
    let s = listener.stats();
    assert_eq!(s.malformed, 0);
    assert_eq!(s.truncates, 1);
    assert_eq!(s.connection_losses, 0, "{s:?}");
    assert!(s.notifications >= ROUNDS as u64 + 3, "{s:?}");
    assert_eq!(s.heartbeat_timeouts, 0, "{s:?}");
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_capture_ignores_and_counts_malformed_notifications() {
    let Capture { db, caches, listener } = capture().await;
    let pg = db.pg.clone().unwrap();
    fill(&caches, &db.pool, &[1, 2]).await;

    pg.psql("strata", "SELECT pg_notify('strata_changes', 'garbage')").expect("psql");
    pg.psql("strata", r#"SELECT pg_notify('strata_changes', '{"table":"payment","op":"UPDATE"}')"#)
        .expect("psql");
    pg.psql(
        "strata",
        r#"SELECT pg_notify('strata_changes', '{"table":"payment","op":"UPDATE","key":"abc"}')"#,
    )
    .expect("psql");
    pg.psql("strata", r#"SELECT pg_notify('strata_changes', '{"table":"other","op":"UPDATE","key":"1"}')"#)
        .expect("psql");
    wait_until("malformed, unparsable and unmapped counted", Duration::from_secs(3), || {
        let s = listener.stats();
        s.malformed == 2 && s.unparsable_keys == 1 && s.unmapped == 1
    })
    .await;
    // Ignored: nothing was invalidated, and the listener still works.
    for c in &caches {
        assert!(c.get_local(&1).is_some() && c.get_local(&2).is_some());
    }
    assert!(listener.is_connected());
    sqlx::query("UPDATE payment SET status = 'after-garbage' WHERE id = 2")
        .execute(&db.observer)
        .await
        .unwrap();
    time_until_clean(&caches, 2, Instant::now()).await;
    assert!(caches[1].get_local(&1).is_some());
    let s = listener.stats();
    assert_eq!((s.malformed, s.connection_losses, s.resyncs), (2, 0, 0), "{s:?}");
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_capture_listener_reconnects_and_resyncs() {
    let Capture { db, caches, listener } = capture().await;
    let pg = db.pg.clone().unwrap();
    fill(&caches, &db.pool, &[1, 2, 3]).await;

    let pid = listener.backend_pid().expect("connected");
    let killed = pg.psql("strata", &format!("SELECT pg_terminate_backend({pid})")).expect("psql");
    assert_eq!(killed.trim(), "t");
    let took = wait_until("listener reconnected and resynced", Duration::from_secs(5), || {
        let s = listener.stats();
        s.reconnects >= 1 && s.resyncs >= 1 && listener.is_connected()
    })
    .await;
    eprintln!("change listener: backend killed -> reconnected and resynced in {took:?}");
    let s = listener.stats();
    assert_eq!(s.connection_losses, 1, "{s:?}");
    assert_eq!(s.resync_flushes, 1, "{s:?}");
    assert_ne!(listener.backend_pid(), Some(pid));
    // invalidate_all reached every instance: nothing cached before the loss survives.
    wait_until("every instance flushed", Duration::from_secs(2), || {
        caches.iter().all(|c| (1..=3).all(|id| c.get_local(&id).is_none()))
    })
    .await;

    // Capture works on the new connection.
    fill(&caches, &db.pool, &[1]).await;
    sqlx::query("UPDATE payment SET status = 'after-reconnect' WHERE id = 1")
        .execute(&db.observer)
        .await
        .unwrap();
    time_until_clean(&caches, 1, Instant::now()).await;
    listener.shutdown().await;
}

/// A silent partition (the proxy holds every byte; no socket closes): the heartbeat
/// notices, the listener reconnects once the network heals, and its resync removes
/// what was changed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_capture_heartbeat_detects_a_silent_partition() {
    let db = postgres().await;
    let pg = db.pg.clone().unwrap();
    strata_sql::install_change_capture(&db.pool, "payment", "id", None).await.expect("install");
    let proxy = strata_testkit::FaultProxy::start(pg.addr()).await.unwrap();
    let via_proxy: sqlx::postgres::PgConnectOptions =
        format!("postgres://postgres@127.0.0.1:{}/strata", proxy.port()).parse().unwrap();
    let caches = fleet(2, Consistency::Invalidated, Arc::new(InProcessTier::new()), None).await;
    let listener = strata_sql::ChangeListener::builder_with(via_proxy)
        .table("public.payment", &caches[0])
        .heartbeat(Some(Duration::from_millis(100)))
        .heartbeat_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .start()
        .await
        .expect("listener");
    wait_until("a heartbeat comes back", Duration::from_secs(3), || listener.stats().heartbeats >= 1).await;
    fill(&caches, &db.pool, &[1, 2]).await;

    proxy.blackhole(true);
    let cut = Instant::now();
    sqlx::query("UPDATE payment SET status = 'during-partition' WHERE id = 1")
        .execute(&db.observer)
        .await
        .unwrap();
    let detected = wait_until("heartbeat timeout", Duration::from_secs(3), || {
        listener.stats().heartbeat_timeouts >= 1 && !listener.is_connected()
    })
    .await;
    // The change is not seen while partitioned: the documented window.
    assert_eq!(caches[1].get_local(&1).as_deref(), Some("pending"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        listener.stats().connect_errors >= 1,
        "reconnects fail while partitioned: {:?}",
        listener.stats()
    );

    proxy.clear();
    let healed = Instant::now();
    wait_until("reconnected and resynced", Duration::from_secs(5), || {
        let s = listener.stats();
        s.reconnects >= 1 && s.resyncs >= 1
    })
    .await;
    let clean = time_until_clean(&caches, 1, healed).await;
    eprintln!(
        "change listener, silent partition: detected {detected:?} after the cut; every L1 clean {clean:?} after \
         the network healed ({:?} after the cut)",
        cut.elapsed()
    );
    for c in &caches {
        assert!(c.get_local(&2).is_none(), "resync flushed everything");
    }
    let pool = db.pool.clone();
    let v = caches[1]
        .get_or_load(&1, move || async move {
            sqlx::query_scalar::<_, String>(SELECT).bind(1_i64).fetch_optional(&pool).await
        })
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("during-partition"));
    // And capture works again.
    sqlx::query("UPDATE payment SET status = 'healed' WHERE id = 1").execute(&db.observer).await.unwrap();
    time_until_clean(&caches, 1, Instant::now()).await;
    listener.shutdown().await;
}

/// The connection dies after the server committed but before the client heard so:
/// the outcome is unknown to the client, the caches are invalidated anyway, and the
/// after-commit actions do not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_commit_with_unknown_outcome_invalidates_and_skips_actions() {
    let db = postgres().await;
    let pg = db.pg.clone().unwrap();
    let proxy = strata_testkit::FaultProxy::start(pg.addr()).await.unwrap();
    let via_proxy = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("postgres://postgres@127.0.0.1:{}/strata", proxy.port()))
        .await
        .unwrap();
    let caches = fleet(2, Consistency::Invalidated, Arc::new(InProcessTier::new()), None).await;
    fill(&caches, &db.pool, &[1]).await;
    let ran = Arc::new(AtomicUsize::new(0));

    let mut tx = strata_sql::begin(&via_proxy).await.unwrap();
    sqlx::query(UPDATE).bind("settled").bind(1_i64).execute(&mut *tx).await.unwrap();
    tx.invalidate(&caches[0], &1);
    {
        let ran = ran.clone();
        tx.after_commit(move || async move {
            ran.fetch_add(1, Ordering::SeqCst);
        });
    }
    // Replies now take 400 ms: time to see the commit land and cut the connection
    // before the client hears of it.
    proxy.set_latency(Duration::from_millis(200), Duration::ZERO);
    let commit = tokio::spawn(tx.commit());
    let start = Instant::now();
    loop {
        let s: String = sqlx::query_scalar(SELECT).bind(1_i64).fetch_one(&db.observer).await.unwrap();
        if s == "settled" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "the commit never reached the server");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    proxy.reset_all();
    let err = commit.await.unwrap().expect_err("the client cannot know the commit succeeded");
    assert_eq!(err.outcome(), CommitOutcome::Unknown, "{err}");
    assert!(!matches!(err.sqlx_error(), Some(sqlx::Error::Database(_))), "{err}");
    assert_eq!(err.invalidations().len(), 1);
    assert!(err.invalidations()[0].is_done());
    assert_eq!(ran.load(Ordering::SeqCst), 0, "actions are not run on an unknown outcome");
    wait_until("every instance drops key 1", Duration::from_secs(2), || {
        caches.iter().all(|c| c.get_local(&1).is_none())
    })
    .await;
}
