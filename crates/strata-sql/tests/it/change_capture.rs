//! Postgres change capture: raw writes, notifications the trigger did not send,
//! listener reconnect and catch-up from the outbox, pruning, and the heartbeat
//! noticing a silent partition.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata::{Cache, Consistency, InProcessTier};

use crate::support::{SELECT, TestDb, fill, fleet, postgres, wait_until};

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
    assert_eq!((s.malformed, s.forged), (0, 0), "{s:?}");
    assert_eq!(s.truncates, 1);
    // One wake-up per transaction; one change per row (the TRUNCATE is one).
    assert_eq!(s.changes, ROUNDS as u64 + 3, "{s:?}");
    assert_eq!(s.connection_losses, 0, "{s:?}");
    assert!(s.notifications >= ROUNDS as u64 + 3, "{s:?}");
    assert_eq!(s.heartbeat_timeouts, 0, "{s:?}");
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_capture_ignores_and_counts_notifications_it_did_not_send() {
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
    // A wake-up naming a transaction that wrote no change.
    pg.psql("strata", "SELECT pg_notify('strata_changes', pg_current_xact_id()::text)").expect("psql");
    wait_until("counted as forged", Duration::from_secs(3), || listener.stats().forged == 5).await;
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
    assert_eq!((s.forged, s.connection_losses, s.resyncs), (5, 0, 0), "{s:?}");
    assert_eq!((s.malformed, s.unparsable_keys, s.unmapped, s.notifications), (0, 0, 0, 1), "{s:?}");
    listener.shutdown().await;
}

/// The listening connection is killed and a change commits before the listener is
/// back: it reads the change from the outbox once reconnected, and flushes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_capture_listener_reconnects_and_catches_up() {
    let db = postgres().await;
    strata_sql::install_change_capture(&db.pool, "payment", "id", Some("version")).await.expect("install");
    let caches = fleet(3, Consistency::Invalidated, Arc::new(InProcessTier::new()), None).await;
    let listener = strata_sql::ChangeListener::builder(&db.pool)
        .table("payment", &caches[0])
        .reconnect_backoff(Duration::from_millis(300), Duration::from_millis(300))
        .start()
        .await
        .expect("listener");
    let pg = db.pg.clone().unwrap();
    fill(&caches, &db.pool, &[1, 2, 3]).await;

    let pid = listener.backend_pid().expect("connected");
    let killed = pg.psql("strata", &format!("SELECT pg_terminate_backend({pid})")).expect("psql");
    assert_eq!(killed.trim(), "t");
    wait_until("the loss noticed", Duration::from_secs(3), || !listener.is_connected()).await;
    // Committed while the listener is away (its first reconnect waits 300 ms).
    sqlx::query("UPDATE payment SET status = 'while-away' WHERE id = 1").execute(&db.observer).await.unwrap();
    assert!(caches[1].get_local(&1).is_some(), "not seen yet");
    let took = wait_until("listener reconnected and caught up", Duration::from_secs(5), || {
        let s = listener.stats();
        s.reconnects >= 1 && s.catch_ups >= 1 && listener.is_connected()
    })
    .await;
    eprintln!("change listener: backend killed -> reconnected and caught up in {took:?}");
    time_until_clean(&caches, 1, Instant::now()).await;
    let s = listener.stats();
    assert_eq!(s.connection_losses, 1, "{s:?}");
    assert_eq!((s.resyncs, s.resync_flushes), (0, 0), "no flush: {s:?}");
    assert_ne!(listener.backend_pid(), Some(pid));
    for c in &caches {
        assert!(c.get_local(&2).is_some() && c.get_local(&3).is_some(), "unchanged rows stay cached");
    }

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
/// notices, the listener reconnects once the network heals, and reads what was
/// changed meanwhile from the outbox.
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
    let detected = wait_until("heartbeat or read timeout", Duration::from_secs(3), || {
        let s = listener.stats();
        s.heartbeat_timeouts + s.read_errors >= 1 && !listener.is_connected()
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
    wait_until("reconnected and caught up", Duration::from_secs(5), || {
        let s = listener.stats();
        s.reconnects >= 1 && s.catch_ups >= 1
    })
    .await;
    let clean = time_until_clean(&caches, 1, healed).await;
    eprintln!(
        "change listener, silent partition: detected {detected:?} after the cut; every L1 clean {clean:?} after \
         the network healed ({:?} after the cut)",
        cut.elapsed()
    );
    for c in &caches {
        assert_eq!(c.get_local(&2).as_deref(), Some("pending"), "caught up from the outbox: no flush");
    }
    let s = listener.stats();
    assert_eq!((s.resyncs, s.catch_ups), (0, 1), "{s:?}");
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

/// Listener A prunes the outbox (a short retention) while listener B is away longer
/// than that: B cannot catch up, so it flushes its caches; A's pruning deleted the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_capture_listener_flushes_when_the_outbox_was_pruned_past_it() {
    let db = postgres().await;
    strata_sql::install_change_capture(&db.pool, "payment", "id", None).await.expect("install");
    let a_caches = fleet(1, Consistency::Invalidated, Arc::new(InProcessTier::new()), None).await;
    let b_caches = fleet(1, Consistency::Invalidated, Arc::new(InProcessTier::new()), None).await;
    let a = strata_sql::ChangeListener::builder(&db.pool)
        .table("payment", &a_caches[0])
        .heartbeat(Some(Duration::from_millis(50)))
        .outbox_retention(Some(Duration::from_millis(200)))
        .start()
        .await
        .expect("listener a");
    // B reaches Postgres through a proxy that refuses it while A prunes.
    let proxy = strata_testkit::FaultProxy::start(db.pg.clone().unwrap().addr()).await.unwrap();
    let via_proxy: sqlx::postgres::PgConnectOptions =
        format!("postgres://postgres@127.0.0.1:{}/strata", proxy.port()).parse().unwrap();
    let b = strata_sql::ChangeListener::builder_with(via_proxy)
        .table("payment", &b_caches[0])
        .heartbeat(Some(Duration::from_millis(100)))
        .outbox_retention(None)
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(50))
        .start()
        .await
        .expect("listener b");
    fill(&b_caches, &db.pool, &[1, 2]).await;
    proxy.refuse(true);
    let pid = b.backend_pid().expect("connected");
    db.pg.clone().unwrap().psql("strata", &format!("SELECT pg_terminate_backend({pid})")).expect("psql");
    wait_until("b lost its connection", Duration::from_secs(3), || !b.is_connected()).await;
    sqlx::query("UPDATE payment SET status = 'pruned-away' WHERE id = 1")
        .execute(&db.observer)
        .await
        .unwrap();
    wait_until("a pruned the change", Duration::from_secs(3), || a.stats().pruned >= 1).await;
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM strata_change_outbox").fetch_one(&db.pool).await.unwrap();
    assert_eq!(left, 0, "pruned");
    proxy.clear();
    wait_until("b reconnected and flushed", Duration::from_secs(5), || {
        let s = b.stats();
        s.reconnects >= 1 && s.resyncs >= 1
    })
    .await;
    let s = b.stats();
    assert_eq!((s.catch_ups, s.resync_flushes), (0, 1), "{s:?}");
    assert!(b_caches[0].get_local(&1).is_none() && b_caches[0].get_local(&2).is_none(), "flushed");
    let s = a.stats();
    assert_eq!((s.prune_errors, s.resyncs, s.changes), (0, 0, 1), "{s:?}");
    a.shutdown().await;
    b.shutdown().await;
}
