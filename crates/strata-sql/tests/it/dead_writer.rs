//! A writer killed between `COMMIT` and its invalidation (simulated with
//! `Transaction::die_after_commit`: the helper takes its write locks and commits, then
//! forgets the locks and invalidates nothing, as a killed process would). At the
//! Invalidated level the helper's write lock, taken before `COMMIT`, must leave nothing
//! stale anywhere: not on the instances that had the row cached, not on one built after
//! the write; with the opt-out, only change capture bounds the staleness.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata::{Cache, Consistency, InProcessBackplane, InProcessTier};

use crate::support::{SELECT, TestDb, UPDATE, postgres};

/// The write lock's time to live in these tests: short, to see the keys cached again
/// once the dead writer's lock has expired.
const LOCK_TTL: Duration = Duration::from_secs(2);

struct Fleet {
    tier: InProcessTier,
    hub: InProcessBackplane,
}

impl Fleet {
    async fn instance(&self) -> Cache<i64, String> {
        let cache = Cache::builder("payment")
            .tier(Arc::new(self.tier.clone()))
            .backplane(Arc::new(self.hub.connect()))
            .consistency(Consistency::Invalidated)
            .ttl(Duration::from_secs(3600))
            .heartbeat_interval(Duration::from_millis(100))
            .write_lock_ttl(LOCK_TTL)
            .build()
            .expect("build");
        cache.ready().await;
        cache
    }
}

async fn read(cache: &Cache<i64, String>, pool: &sqlx::PgPool) -> Option<String> {
    let pool = pool.clone();
    cache
        .get_or_load(&1, move || async move {
            sqlx::query_scalar::<_, String>(SELECT).bind(1_i64).fetch_optional(&pool).await
        })
        .await
        .expect("read")
}

/// What the fleet served after the dead writer's commit.
#[derive(Debug)]
struct Outcome {
    /// From `COMMIT` returning until every instance (the three that had the row and
    /// one built after the write) read the new row; `None` if not within the watch.
    until_new: Option<Duration>,
    /// Reads of the old row after every instance had read the new one once.
    went_back: usize,
    /// Reads of the old row in all.
    stale_reads: usize,
    /// Instances holding the new row in L1 at the end (after the lock expired).
    cached_at_end: usize,
}

/// Three instances with row 1 cached, a transaction through the helper that settles it
/// and whose writer dies right after `COMMIT`; then reads on every instance, and on one
/// built after the write, every millisecond for `watch`.
async fn dead_writer(db: &TestDb<sqlx::Postgres>, write_locks: bool, watch: Duration) -> Outcome {
    let fleet = Fleet { tier: InProcessTier::new(), hub: InProcessBackplane::new() };
    let mut caches = Vec::new();
    for _ in 0..3 {
        caches.push(fleet.instance().await);
    }
    let listener = capture_listener(db, &caches[0]).await;
    for c in &caches {
        assert_eq!(read(c, &db.pool).await.as_deref(), Some("pending"));
        assert_eq!(c.get_local(&1).as_deref(), Some("pending"), "cached everywhere");
    }

    let mut tx = strata_sql::begin(&db.pool).await.unwrap();
    sqlx::query(UPDATE).bind("settled").bind(1_i64).execute(&mut *tx).await.unwrap();
    tx.invalidate(&caches[0], &1);
    if !write_locks {
        tx.without_write_locks();
    }
    tx.die_after_commit();
    let report = tx.commit().await.expect("committed");
    let committed = Instant::now();
    assert!(report.invalidations.is_empty(), "the dead writer invalidated nothing");
    caches.push(fleet.instance().await);

    let mut until_new = None;
    let (mut went_back, mut stale_reads) = (0, 0);
    while committed.elapsed() < watch {
        let mut all_new = true;
        for c in &caches {
            if read(c, &db.pool).await.as_deref() != Some("settled") {
                all_new = false;
                stale_reads += 1;
                if until_new.is_some() {
                    went_back += 1;
                }
            }
        }
        if all_new && until_new.is_none() {
            until_new = Some(committed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let cached_at_end = caches.iter().filter(|c| c.get_local(&1).as_deref() == Some("settled")).count();
    if let Some(l) = listener {
        l.shutdown().await;
    }
    Outcome { until_new, went_back, stale_reads, cached_at_end }
}

/// Change capture on `payment` feeding `cache`, when the test database has it installed.
async fn capture_listener(
    db: &TestDb<sqlx::Postgres>,
    cache: &Cache<i64, String>,
) -> Option<strata_sql::ChangeListener> {
    let installed: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'strata_change_capture' AND NOT tgisinternal)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    if !installed {
        return None;
    }
    Some(
        strata_sql::ChangeListener::builder(&db.pool)
            .table("payment", cache)
            .start()
            .await
            .expect("listener"),
    )
}

async fn with_capture() -> TestDb<sqlx::Postgres> {
    let db = postgres().await;
    strata_sql::install_change_capture(&db.pool, "payment", "id", Some("version")).await.expect("install");
    db
}

/// The write lock covers the dead writer: every instance, and one built after the
/// write, reads the new row at once and keeps doing so; once the lock has expired the
/// key is cached again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_writer_after_commit_leaves_nothing_stale() {
    let db = postgres().await;
    let out = dead_writer(&db, true, LOCK_TTL + Duration::from_millis(700)).await;
    eprintln!("dead writer, write lock, no change capture: {out:?}");
    let until_new = out.until_new.expect("every instance reads the new row");
    assert!(until_new < Duration::from_millis(500), "{out:?}");
    assert_eq!(out.went_back, 0, "{out:?}");
    assert_eq!(out.cached_at_end, 4, "cached again once the lock expired: {out:?}");
}

/// The same with change capture running: the lock already made the fleet clean; the
/// listener's invalidation comes on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_writer_after_commit_with_change_capture() {
    let db = with_capture().await;
    let out = dead_writer(&db, true, LOCK_TTL + Duration::from_millis(700)).await;
    eprintln!("dead writer, write lock, change capture: {out:?}");
    let until_new = out.until_new.expect("every instance reads the new row");
    assert!(until_new < Duration::from_millis(500), "{out:?}");
    assert_eq!(out.went_back, 0, "{out:?}");
    assert_eq!(out.cached_at_end, 4, "{out:?}");
}

/// The opt-out reopens the gap: without a write lock a dead writer leaves the old row
/// in every L1 and in L2 (so a new instance reads it too), until change capture
/// delivers the change...
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_writer_without_write_locks_is_stale_until_change_capture() {
    let db = with_capture().await;
    let out = dead_writer(&db, false, Duration::from_millis(1500)).await;
    eprintln!("dead writer, no write lock, change capture: {out:?}");
    let until_new = out.until_new.expect("change capture delivers the change");
    assert!(until_new < Duration::from_millis(1000), "{out:?}");
    assert_eq!(out.went_back, 0, "{out:?}");
}

/// ... and without change capture, until the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_writer_without_write_locks_or_capture_stays_stale() {
    let db = postgres().await;
    let out = dead_writer(&db, false, Duration::from_millis(500)).await;
    eprintln!("dead writer, no write lock, no change capture: {out:?}");
    assert_eq!(out.until_new, None, "{out:?}");
    assert!(out.stale_reads > 0, "{out:?}");
}

/// At the Invalidated level, a load whose value L2 does not keep (here a value above
/// `max_value_bytes`; likewise when the L2 fill fails) must not fill L1 either while a
/// write lock covers its key: a load that reads the old row between the lock and
/// `COMMIT` would otherwise stay in that instance's L1 when the writer dies after
/// `COMMIT` (a live writer's release publishes again and drops it, a dead one leaves
/// it until the TTL). The poisoned fill token tells the cache to keep it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_writer_and_a_value_kept_out_of_l2() {
    let db = postgres().await;
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let mut caches = Vec::new();
    for _ in 0..2 {
        let cache: Cache<i64, String> = Cache::builder("payment")
            .tier(Arc::new(tier.clone()))
            .backplane(Arc::new(hub.connect()))
            .ttl(Duration::from_secs(3600))
            .max_value_bytes(4)
            .build()
            .expect("build");
        cache.ready().await;
        caches.push(cache);
    }
    for c in &caches {
        assert_eq!(read(c, &db.pool).await.as_deref(), Some("pending"));
    }
    // The helper's steps, driven by hand: lock, (a reader loads), COMMIT, die.
    let lock = caches[0].handle().lock_for_write(vec![strata::Scope::Keys(vec!["1".into()])]).await.unwrap();
    let start = Instant::now();
    while caches[1].get_local(&1).is_some() {
        assert!(start.elapsed() < Duration::from_secs(2), "lock message not heard");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(read(&caches[1], &db.pool).await.as_deref(), Some("pending"), "read before COMMIT");
    sqlx::query(UPDATE).bind("settled").bind(1_i64).execute(&db.pool).await.unwrap();
    std::mem::forget(lock);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        read(&caches[1], &db.pool).await.as_deref(),
        Some("settled"),
        "instance 1 keeps the row it read under the lock, without L2's consent"
    );
}
