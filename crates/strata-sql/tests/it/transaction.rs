//! The transaction helper on Postgres and SQLite: commit, rollback, drop, failed
//! commit, ordering, failed invalidation at the Invalidated and Strong levels (write
//! locks). The same tests run on both databases, through `transaction_tests!`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use strata::{Cache, Consistency, InProcessTier};
use strata_sql::{CommitOutcome, InvalidationState};

use crate::support::{
    Log, ObservingTier, SELECT, TestDb, UPDATE, entries, fleet, postgres, push, sqlite, wait_until,
};

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
                let log_handle = log.clone();
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
                // The rejected COMMIT came after the write lock (taken before COMMIT, at
                // the Invalidated level too): the copies were dropped and the lock
                // released (a miss, never a wrong value); no hook ran.
                let log = entries(&log);
                assert_eq!(log.len(), 2, "only the rejected commit's lock and its release: {log:?}");
                assert!(log[0].starts_with("l2 lock payment") && log[0].ends_with("pending"), "{log:?}");
                assert!(log[1].starts_with("l2 unlock payment") && log[1].ends_with("pending"), "{log:?}");
                for c in &caches {
                    assert_eq!(c.get_local(&1), None, "dropped by the lock of the rejected commit");
                    assert_eq!(load(c, &db.pool, 1).await.as_deref(), Some("pending"));
                }

                // The same without write locks: nothing is touched at all.
                let log_len = entries(&log_handle).len();
                let mut tx = strata_sql::begin(&db.pool).await.unwrap();
                sqlx::query(UPDATE).bind("rejected").bind(1_i64).execute(&mut *tx).await.unwrap();
                sqlx::query("INSERT INTO child (id, parent_id) VALUES (1, 999)")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.invalidate(&caches[0], &1).without_write_locks();
                let err = tx.commit().await.expect_err("the deferred constraint fails the commit");
                assert_eq!(err.outcome(), CommitOutcome::RolledBack, "{err}");
                tokio::time::sleep(Duration::from_millis(150)).await;
                assert_eq!(entries(&log_handle).len(), log_len, "nothing was invalidated");
                for c in &caches {
                    assert_eq!(c.get_local(&1).as_deref(), Some("pending"), "L1 kept its (correct) copy");
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
                assert_eq!(log.len(), 8, "{log:#?}");
                // The Invalidated cache was write-locked before COMMIT (the lock saw the
                // old row); the Local one (no backplane) was not.
                assert_eq!(log[0], "l2 lock payment Keys([\"1\", \"2\"]): database says pending", "{log:#?}");
                // Then the invalidations (the two caches run concurrently), each after the
                // commit: the release and the delete saw the committed row.
                let (invalidations, actions) = log[1..].split_at(4);
                let mut inv = invalidations.to_vec();
                inv.sort();
                assert_eq!(
                    inv,
                    vec![
                        "hook by_name Keys([\"alice\"])".to_owned(),
                        "hook payment Keys([\"1\", \"2\"])".to_owned(),
                        "l2 delete by_name [\"alice\"]: database says settled".to_owned(),
                        "l2 unlock payment Keys([\"1\", \"2\"]): database says settled".to_owned(),
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
                assert_eq!(deletes, vec![vec!["alice".to_owned()]], "payment's keys went through the lock");
                let locked: Vec<_> =
                    report.invalidations.iter().map(|i| (i.namespace.as_str(), i.locked)).collect();
                assert_eq!(locked, [("payment", true), ("by_name", false)]);

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
                assert!(!inv.locked, "L2 down: no write lock, the commit went ahead without one");
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
