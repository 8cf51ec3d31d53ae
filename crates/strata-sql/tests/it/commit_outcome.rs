//! Postgres commits whose outcome the client may misjudge: a transaction aborted by a
//! failed statement, and a connection lost before the client heard of the commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use strata::{Consistency, InProcessTier};
use strata_sql::CommitOutcome;

use crate::support::{SELECT, UPDATE, fill, fleet, postgres, wait_until};

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
