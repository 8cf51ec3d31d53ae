//! Change capture against a role with no right on the captured table: forged change
//! notifications (row changes, truncates, wake-ups, replays of genuine ones) and a
//! trigger of its own on a table it owns must invalidate nothing; a real change by a
//! role with only `UPDATE` on the table is still applied.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use strata::{Consistency, InProcessTier};

use crate::support::{fill, fleet, postgres, wait_until};

/// A pool of two connections as `role`, on the test database.
async fn connect_as(pool: &sqlx::PgPool, role: &str) -> sqlx::PgPool {
    let opts: PgConnectOptions = pool.connect_options().as_ref().clone().username(role);
    PgPoolOptions::new().max_connections(2).connect_with(opts).await.expect("connect as role")
}

async fn notify(pool: &sqlx::PgPool, payload: &str) {
    sqlx::query("SELECT pg_notify('strata_changes', $1)").bind(payload).execute(pool).await.expect("notify");
}

/// What a forger sends: old-format row and truncate notices (keys 1 to 3 and
/// non-canonical spellings of them), wake-ups naming made-up transactions and its own
/// committed ones, and garbage. 200 in all.
fn forgeries() -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..60 {
        let key = ["1", "2", "3", "+1", "0002", " 3"][i % 6];
        let op = ["UPDATE", "DELETE", "INSERT"][i % 3];
        out.push(format!(
            r#"{{"schema":"public","table":"payment","op":"{op}","key":"{key}","version":"9"}}"#
        ));
    }
    for i in 0..20 {
        out.push(format!(r#"{{"table":"payment","op":"DELETE","key":{}}}"#, 1 + i % 3));
    }
    for _ in 0..40 {
        out.push(r#"{"schema":"public","table":"payment","op":"TRUNCATE"}"#.to_owned());
    }
    for i in 0..40_u64 {
        out.push(
            [i.to_string(), (u64::MAX - i).to_string(), format!("{}", 1000 + i * 7919)][i as usize % 3]
                .clone(),
        );
    }
    for _ in 0..20 {
        out.push("garbage".to_owned());
    }
    assert_eq!(out.len(), 180);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_capture_ignores_forged_notifications() {
    let db = postgres().await;
    strata_sql::install_change_capture(&db.pool, "payment", "id", Some("version")).await.expect("install");
    let caches = fleet(3, Consistency::Invalidated, Arc::new(InProcessTier::new()), None).await;
    let listener = strata_sql::ChangeListener::builder(&db.pool)
        .table("payment", &caches[0])
        .heartbeat(Some(Duration::from_millis(200)))
        .start()
        .await
        .expect("listener");
    sqlx::raw_sql(
        "CREATE ROLE mallory LOGIN; \
         CREATE ROLE clerk LOGIN; GRANT SELECT, UPDATE ON payment TO clerk;",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mallory = connect_as(&db.pool, "mallory").await;
    let clerk = connect_as(&db.pool, "clerk").await;
    let denied = sqlx::query("UPDATE payment SET status = 'x' WHERE id = 1").execute(&mallory).await;
    assert!(denied.is_err(), "mallory has no right on payment");
    fill(&caches, &db.pool, &[1, 2, 3]).await;

    // 180 forged notices, and 20 wake-ups naming mallory's own committed transactions.
    let started = Instant::now();
    for payload in forgeries() {
        notify(&mallory, &payload).await;
    }
    for _ in 0..20 {
        sqlx::query("SELECT pg_notify('strata_changes', pg_current_xact_id()::text)")
            .execute(&mallory)
            .await
            .unwrap();
    }
    eprintln!("200 forged notifications sent in {:?}", started.elapsed());
    wait_until("the forgeries counted", Duration::from_secs(5), || listener.stats().forged >= 200).await;
    let s = listener.stats();
    assert_eq!((s.forged, s.changes, s.notifications, s.keys_invalidated), (200, 0, 0, 0), "{s:?}");
    for (i, c) in caches.iter().enumerate() {
        for id in 1..=3 {
            assert!(c.get_local(&id).is_some(), "instance {i} lost key {id} to a forged notification");
        }
    }

    // Mallory listens too, to replay what the trigger sends.
    let mut eavesdropper = PgListener::connect_with(&mallory).await.unwrap();
    eavesdropper.listen("strata_changes").await.unwrap();

    // A real change, by a role with only UPDATE on the table, is applied.
    sqlx::query("UPDATE payment SET status = 'clerk' WHERE id = 2").execute(&clerk).await.unwrap();
    wait_until("the real change reached every instance", Duration::from_secs(3), || {
        caches.iter().all(|c| c.get_local(&2).is_none())
    })
    .await;
    for c in &caches {
        assert!(c.get_local(&1).is_some() && c.get_local(&3).is_some(), "only key 2 was invalidated");
    }

    // Replays of what the trigger sent for that change.
    let mut genuine = Vec::new();
    while genuine.is_empty() {
        let n = tokio::time::timeout(Duration::from_secs(3), eavesdropper.recv()).await.unwrap().unwrap();
        if !n.payload().contains("PING") {
            genuine.push(n.payload().to_owned());
        }
    }
    drop(eavesdropper);
    fill(&caches, &db.pool, &[2]).await;
    for payload in &genuine {
        for _ in 0..10 {
            notify(&mallory, payload).await;
        }
    }
    wait_until("the replays counted", Duration::from_secs(5), || listener.stats().forged >= 210).await;
    for (i, c) in caches.iter().enumerate() {
        for id in 1..=3 {
            assert!(c.get_local(&id).is_some(), "instance {i} lost key {id} to a replayed notification");
        }
    }

    // Mallory's own table, with the capture trigger on it, named like the captured one.
    let mut conn = mallory.acquire().await.unwrap();
    sqlx::query("CREATE TEMP TABLE payment (id bigint)").execute(&mut *conn).await.unwrap();
    let trigger = sqlx::query(
        "CREATE TRIGGER t AFTER INSERT ON pg_temp.payment FOR EACH ROW EXECUTE FUNCTION strata_notify_change('id', '')",
    )
    .execute(&mut *conn)
    .await;
    if trigger.is_ok() {
        sqlx::query("INSERT INTO pg_temp.payment VALUES (1)").execute(&mut *conn).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(caches[1].get_local(&1).is_some(), "a trigger on mallory's own table invalidated key 1");
    assert!(trigger.is_err(), "mallory may not use the capture trigger function");
    drop(conn);

    let s = listener.stats();
    eprintln!("listener after the forgeries: {s:?}");
    assert_eq!(s.forged, 210, "200 forgeries and 10 replays: {s:?}");
    assert_eq!((s.notifications, s.changes, s.keys_invalidated, s.truncates), (1, 1, 1, 0), "{s:?}");
    assert_eq!((s.resyncs, s.connection_losses, s.read_errors), (0, 0, 0), "{s:?}");
    // Mallory cannot write the outbox either.
    let direct = sqlx::query("INSERT INTO strata_change_outbox (schema_name, table_name, op) VALUES ('public', 'payment', 'TRUNCATE')")
        .execute(&mallory)
        .await;
    assert!(direct.is_err(), "mallory may not write the outbox");
    listener.shutdown().await;
}
