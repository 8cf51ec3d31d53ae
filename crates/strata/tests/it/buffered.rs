//! The Invalidated level when an L2 delete fails after a commit: the delete is buffered
//! and retried past this instance's breaker, and until it lands the other members,
//! told by its heartbeats, do not serve what it covers from an old L2 entry.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use strata::tier::Tier;
use strata::{BreakerConfig, BreakerState, Cache, InProcessBackplane, InProcessTier};

use crate::strong::OwnConnection;
use crate::support::{Db, NS, eventually, l2_value};

const MAX_STALE: Duration = Duration::from_millis(100);

fn build(conn: InProcessBackplane, tier: Arc<dyn Tier>) -> Cache<u64, String> {
    Cache::builder(NS)
        .tier(tier)
        .backplane(Arc::new(conn))
        .heartbeat_interval(Duration::from_millis(20))
        .max_stale(MAX_STALE)
        // A cool-down far longer than the test: the retry must not wait for it.
        .breaker(BreakerConfig { open_for: Duration::from_secs(600), ..BreakerConfig::default() })
        .build()
        .expect("valid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffered_delete_is_retried_past_the_breaker_and_old_l2_entries_are_not_trusted_meanwhile() {
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let own = Arc::new(OwnConnection { tier: tier.clone(), down: false.into() });
    let writer = build(hub.connect(), own.clone());
    let reader = build(hub.connect(), Arc::new(tier.clone()));
    for c in [&writer, &reader] {
        tokio::time::timeout(Duration::from_secs(5), c.ready()).await.expect("ready");
    }
    let db = Db::with(&[(1, "v1"), (2, "two")]);
    assert_eq!(reader.get_or_load(&1, db.loader(1)).await.expect("load").as_deref(), Some("v1"));
    // The entry ages past max_stale (only doubt cares how old it is).
    tokio::time::sleep(MAX_STALE * 2).await;

    // The writer's connection to L2 fails: its deletes are buffered, and the failures
    // open its breaker. L2 still holds v1.
    own.down.store(true, Ordering::SeqCst);
    db.set(1, "v2");
    for _ in 0..5 {
        assert!(writer.invalidate(&1).await.is_err(), "the writer's L2 delete failed");
    }
    assert_eq!(writer.l2_breaker_state(), BreakerState::Open);
    assert!(writer.pending_invalidations() > 0);
    assert_eq!(l2_value(&tier, 1).as_deref(), Some("v1"));

    // The writer's heartbeats say a delete waits: the reader trusts no old entry, so it
    // loads v2 instead of reading v1 back from L2, and its fill replaces the old entry.
    eventually("the reader doubts", || reader.health().in_doubt).await;
    reader.evict_local(&1);
    assert_eq!(reader.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
    assert_eq!(l2_value(&tier, 1).as_deref(), Some("v2"), "the stale L2 entry was replaced");
    assert!(reader.stats().l2_distrusted >= 1);

    // The connection is back: the retry applies the delete although the writer's
    // breaker stays open for minutes, and the doubt ends with a plain heartbeat.
    own.down.store(false, Ordering::SeqCst);
    eventually("the buffered delete is applied", || writer.pending_invalidations() == 0).await;
    assert_eq!(writer.l2_breaker_state(), BreakerState::Open, "applied past the breaker");
    assert_eq!(l2_value(&tier, 1), None, "the retried delete removed the key from L2");
    eventually("the reader trusts again", || !reader.health().in_doubt).await;
    assert_eq!(reader.get_or_load(&2, db.loader(2)).await.expect("read").as_deref(), Some("two"));
}

/// An instance cut off from the backplane doubts every member it knew until each has
/// spoken again (it may have missed heartbeats that said a delete was waiting), or
/// until a silent one is forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_back_from_a_backplane_outage_doubts_until_every_member_spoke() {
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let a = build(hub.connect(), Arc::new(tier.clone()));
    let (c, b_conn) = (build(hub.connect(), Arc::new(tier.clone())), hub.connect());
    let b = build(b_conn.clone(), Arc::new(tier.clone()));
    for cache in [&a, &b, &c] {
        tokio::time::timeout(Duration::from_secs(5), cache.ready()).await.expect("ready");
    }
    eventually("b heard a and c", || b.stats().heartbeats_received > 4).await;
    assert!(!b.health().in_doubt);
    b_conn.faults().set_disconnected(true);
    eventually("b notices the outage", || !b.is_backplane_healthy()).await;
    // a goes away while b cannot hear: it never speaks again.
    a.shutdown().await;
    b_conn.faults().set_disconnected(false);
    eventually("b is healthy again", || b.is_backplane_healthy()).await;
    assert!(b.health().in_doubt, "b has not heard a since it was cut off");
    // c speaks within a heartbeat; a is forgotten after 60 silent heartbeat intervals.
    eventually("a is forgotten: b trusts again", || !b.health().in_doubt).await;
}

/// A member that falls silent while the others are heard (crashed, or cut off from the
/// backplane) may have deleted an entry from L2 and not published the invalidation:
/// the others doubt it, so an old L1 copy is not served, until it speaks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_falls_silent_is_doubted_until_it_speaks_again() {
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let a_conn = hub.connect();
    let a = build(a_conn.clone(), Arc::new(tier.clone()));
    let (b, c) = (build(hub.connect(), Arc::new(tier.clone())), build(hub.connect(), Arc::new(tier.clone())));
    for cache in [&a, &b, &c] {
        tokio::time::timeout(Duration::from_secs(5), cache.ready()).await.expect("ready");
    }
    let db = Db::with(&[(1, "v1")]);
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.expect("load").as_deref(), Some("v1"));
    eventually("b heard a and c", || b.stats().heartbeats_received > 4).await;
    assert!(!b.health().in_doubt);
    tokio::time::sleep(MAX_STALE * 2).await;

    // a loses the backplane: its L2 delete lands, its message does not go out.
    a_conn.faults().set_disconnected(true);
    db.set(1, "v2");
    let _ = a.invalidate(&1).await;
    assert_eq!(l2_value(&tier, 1), None, "the L2 delete landed");
    assert_eq!(b.get_local(&1).as_deref(), Some("v1"), "b did not hear it");

    // Five heartbeat intervals (at least 1 s) later b doubts a and drops what a's lost message would
    // have dropped: its L1 goes.
    eventually("b doubts the silent a", || b.health().in_doubt).await;
    assert_eq!(b.stats().members_silent, 1, "c still beats");
    assert_eq!(b.get_local(&1), None, "flushed");
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));

    // a is back: its heartbeat ends the doubt.
    a_conn.faults().set_disconnected(false);
    eventually("b trusts again", || !b.health().in_doubt).await;
}

/// A member that shuts down with nothing buffered says it leaves: the others forget it
/// at once and do not doubt it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_shuts_down_cleanly_is_not_doubted() {
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let a = build(hub.connect(), Arc::new(tier.clone()));
    let b = build(hub.connect(), Arc::new(tier.clone()));
    for cache in [&a, &b] {
        tokio::time::timeout(Duration::from_secs(5), cache.ready()).await.expect("ready");
    }
    eventually("b heard a", || b.stats().heartbeats_received > 2).await;
    a.shutdown().await;
    // Longer than what makes a member silent (5 intervals, at least 1 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!b.health().in_doubt);
    assert_eq!(b.stats().members_silent, 0);
}

/// Silence is counted only while the receiver hears the backplane itself: after a
/// pause of its own (here 1.5 s in which nothing reached it) the members it missed are
/// not taken for silent ones, and nothing is flushed for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_of_the_receivers_own_is_not_taken_for_the_others_silence() {
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    // Beats every 50 ms: silent after 1 s (the floor), forgotten after 3 s.
    let build = |conn: InProcessBackplane| {
        Cache::<u64, String>::builder(NS)
            .tier(Arc::new(tier.clone()))
            .backplane(Arc::new(conn))
            .heartbeat_interval(Duration::from_millis(50))
            .max_stale(MAX_STALE)
            .build()
            .expect("valid")
    };
    let b_conn = hub.connect();
    let (a, b, c) = (build(hub.connect()), build(b_conn.clone()), build(hub.connect()));
    for cache in [&a, &b, &c] {
        tokio::time::timeout(Duration::from_secs(5), cache.ready()).await.expect("ready");
    }
    eventually("b heard a and c", || b.stats().heartbeats_received > 4).await;
    b_conn.faults().set_delay(Duration::from_millis(1500));
    tokio::time::sleep(Duration::from_millis(1600)).await;
    b_conn.faults().set_delay(Duration::ZERO);
    eventually("b hears everyone again", || b.is_backplane_healthy() && !b.health().in_doubt).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.stats().members_silent, 0);
    drop((a, c));
}
