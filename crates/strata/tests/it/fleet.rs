//! The fleet: backplane delivery, gaps and their repair, `max_stale`, L2 outages and
//! the circuit breaker, buffered invalidations.

use std::sync::Arc;
use std::time::Duration;

use strata::InProcessBackplane;
use strata::backplane::Mode;
use strata::testing::ManualClock;
use strata::{BreakerConfig, BreakerState, Cache, ErrorKind};

use crate::support::{Db, eventually, fleet, held_everywhere_then_written};

// ---------------------------------------------------------------------------------
// Backplane: own messages, gaps, repair, max_stale

#[tokio::test]
async fn invalidation_reaches_every_other_instance_and_own_messages_are_ignored() {
    let f = fleet(3, Mode::Stream, None).await;
    let db = held_everywhere_then_written(&f).await;
    for c in &f.caches[1..] {
        assert_eq!(c.get_local(&1), None);
    }
    for c in &f.caches[1..] {
        assert_eq!(c.get_or_load(&1, db.loader(1)).await.expect("reload").as_deref(), Some("v2"));
    }
    assert_eq!(f.caches[0].stats().invalidations_received, 0, "own message skipped");
    assert_eq!(f.caches[0].stats().invalidations_sent, 1);
}

#[tokio::test]
async fn insert_makes_the_new_value_visible_fleet_wide() {
    let f = fleet(2, Mode::Stream, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "v1")]);
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    db.set(1, "v2");
    a.insert(1, "v2".into()).await.expect("insert");
    eventually("applied", || b.stats().invalidations_applied == 1).await;
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
    assert_eq!(b.stats().loads, 1, "v2 came from L2, not the database");
}

#[tokio::test]
async fn a_dropped_message_is_detected_and_replayed_from_a_stream() {
    let f = fleet(2, Mode::Stream, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "one"), (2, "two")]);
    for k in [1, 2] {
        b.get_or_load(&k, db.loader(k)).await.expect("load");
    }
    f.conns[1].faults().drop_next(1);
    a.invalidate(&1).await.expect("invalidate");
    a.invalidate(&2).await.expect("invalidate");
    eventually("repaired", || b.stats().repairs_replayed == 1).await;
    assert_eq!(b.get_local(&1), None, "the dropped invalidation was replayed");
    assert_eq!(b.get_local(&2), None);
    let s = b.stats();
    assert_eq!((s.gaps_detected, s.repairs_flushed), (1, 0));
}

#[tokio::test]
async fn a_dropped_message_on_pubsub_is_repaired_by_a_flush() {
    let f = fleet(2, Mode::PubSub, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "one"), (2, "two"), (3, "three")]);
    for k in [1, 2, 3] {
        b.get_or_load(&k, db.loader(k)).await.expect("load");
    }
    f.conns[1].faults().drop_next(1);
    a.invalidate(&1).await.expect("invalidate");
    a.invalidate(&2).await.expect("invalidate");
    eventually("repaired", || b.stats().repairs_flushed == 1).await;
    assert_eq!(b.get_local(&1), None);
    assert_eq!(b.get_local(&3), None, "a flush drops everything");
}

#[tokio::test]
async fn a_lost_last_message_is_detected_by_the_next_heartbeat() {
    let f = fleet(2, Mode::PubSub, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "one")]);
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    // Let b hear a's heartbeats first, so a's origin is known.
    eventually("heartbeat heard", || b.stats().heartbeats_received >= 1).await;
    f.conns[1].faults().drop_next(1);
    a.invalidate(&1).await.expect("invalidate");
    eventually("heartbeat repaired the gap", || b.stats().repairs_flushed >= 1).await;
    assert_eq!(b.get_local(&1), None);
}

// A stream reports `Lost` when entries it had not delivered are gone (trimmed, the
// stream or its counter evicted). Below the Strong level each live origin's next
// message shows whether any of its messages went: L1 is kept when none did.

#[tokio::test]
async fn a_reported_loss_that_took_nothing_keeps_l1() {
    let f = fleet(3, Mode::Stream, None).await;
    let b = &f.caches[1];
    let db = Db::with(&[(1, "one"), (2, "two")]);
    for k in [1, 2] {
        b.get_or_load(&k, db.loader(k)).await.expect("load");
    }
    eventually("both others heard", || b.stats().heartbeats_received >= 4).await;
    f.conns[1].faults().lose_next(0);
    eventually("verified", || b.stats().repairs_verified == 1).await;
    let s = b.stats();
    assert_eq!((s.gaps_detected, s.repairs_flushed), (1, 0), "{s:?}");
    assert_eq!(b.get_local(&1).as_deref(), Some("one"), "L1 kept");
    assert!(b.is_backplane_healthy());
    // An invalidation still reaches it afterwards.
    f.caches[0].invalidate(&2).await.expect("invalidate");
    eventually("applied", || b.get_local(&2).is_none()).await;
}

#[tokio::test]
async fn a_reported_loss_that_took_an_invalidation_is_repaired() {
    let f = fleet(2, Mode::Stream, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "one"), (2, "two")]);
    for k in [1, 2] {
        b.get_or_load(&k, db.loader(k)).await.expect("load");
    }
    eventually("a heard", || b.stats().heartbeats_received >= 2).await;
    f.conns[1].faults().lose_next(1);
    a.invalidate(&1).await.expect("invalidate");
    // The loss is reported before a's next message (a digest); a's beat after it shows
    // the gap, which the stream replays.
    eventually("repaired", || b.get_local(&1).is_none()).await;
    eventually("verified", || b.stats().repairs_verified == 1).await;
    let s = b.stats();
    assert_eq!((s.repairs_replayed, s.repairs_flushed), (1, 0), "{s:?}");
    assert_eq!(b.get_local(&2).as_deref(), Some("two"), "only what was lost is dropped");
}

#[tokio::test]
async fn a_reported_loss_is_flushed_when_a_live_member_falls_silent() {
    let f = fleet(3, Mode::Stream, None).await;
    let b = &f.caches[1];
    let db = Db::with(&[(1, "one")]);
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    eventually("both others heard", || b.stats().heartbeats_received >= 4).await;
    // c can no longer publish: it cannot show that nothing of its was lost.
    f.conns[2].faults().set_disconnected(true);
    f.conns[1].faults().lose_next(0);
    eventually("flushed", || b.stats().repairs_flushed == 1).await;
    assert_eq!(b.get_local(&1), None);
    assert_eq!(b.stats().repairs_verified, 0);
    f.conns[2].faults().clear();
}

#[tokio::test]
async fn a_reported_loss_flushes_at_the_strong_level() {
    let (_tier, conns, caches) = crate::support::strong_fleet(2).await;
    let b = &caches[1];
    eventually("lease held", || b.stats().heartbeats_received >= 2).await;
    conns[1].faults().lose_next(0);
    eventually("flushed", || b.stats().repairs_flushed >= 1).await;
    assert_eq!(b.stats().repairs_verified, 0);
}

#[tokio::test]
async fn reordered_and_delayed_messages_still_evict_everything() {
    let f = fleet(2, Mode::Stream, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "1"), (2, "2"), (3, "3"), (4, "4")]);
    for k in 1..=4 {
        b.get_or_load(&k, db.loader(k)).await.expect("load");
    }
    f.conns[1].faults().set_reorder(true);
    f.conns[1].faults().set_delay(Duration::from_millis(5));
    for k in 1..=4 {
        a.invalidate(&k).await.expect("invalidate");
    }
    eventually("all applied", || (1..=4).all(|k| b.get_local(&k).is_none())).await;
    f.conns[1].faults().clear();
}

#[tokio::test]
async fn disconnect_then_resume_flushes_on_pubsub_and_counts_the_gap() {
    let f = fleet(2, Mode::PubSub, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "one"), (2, "two")]);
    b.get_or_load(&2, db.loader(2)).await.expect("load");
    f.conns[1].faults().set_disconnected(true);
    eventually("unhealthy", || !b.is_backplane_healthy()).await;
    a.invalidate(&1).await.expect("invalidate");
    f.conns[1].faults().set_disconnected(false);
    eventually("resumed", || b.is_backplane_healthy()).await;
    let s = b.stats();
    assert!(s.gaps_detected >= 1 && s.repairs_flushed >= 1, "{s:?}");
    assert_eq!(b.get_local(&2), None);
}

#[tokio::test]
async fn while_the_backplane_is_down_longer_than_max_stale_old_entries_are_not_served() {
    let clock = ManualClock::new();
    let f = fleet(2, Mode::Stream, Some(clock.clone())).await;
    let b = &f.caches[1];
    let db = Db::with(&[(1, "old"), (2, "young")]);
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    clock.advance(Duration::from_secs(3));
    f.conns[1].faults().set_disconnected(true);
    eventually("unhealthy", || !b.is_backplane_healthy()).await;
    // Within max_stale (2 s) of the outage, everything is still served.
    clock.advance(Duration::from_secs(1));
    assert_eq!(b.get_local(&1).as_deref(), Some("old"));
    b.get_or_load(&2, db.loader(2)).await.expect("load");
    // Past it, only entries younger than max_stale are.
    clock.advance(Duration::from_millis(1500));
    assert_eq!(b.get_local(&1), None, "older than max_stale");
    assert_eq!(b.get_local(&2).as_deref(), Some("young"));
    clock.advance(Duration::from_secs(1));
    assert_eq!(b.get_local(&2), None, "loaded during the outage: lives at most max_stale");
    f.conns[1].faults().set_disconnected(false);
    eventually("healthy again", || b.is_backplane_healthy()).await;
}

// ---------------------------------------------------------------------------------
// L2 failures, the circuit breaker, buffered invalidations

#[tokio::test]
async fn with_l2_down_reads_go_to_the_loader_and_the_breaker_opens() {
    let f = fleet(1, Mode::Stream, None).await;
    let tier = f.tier.clone();
    let cache: Cache<u64, String> = Cache::builder("outage")
        .tier(Arc::new(tier.clone()))
        .backplane(Arc::new(f.conns[0].connect()))
        .breaker(BreakerConfig { consecutive_failures: 3, ..BreakerConfig::default() })
        .build()
        .expect("valid");
    cache.ready().await;
    tier.set_available(false);
    let db = Db::with(&[(1, "one"), (2, "two"), (3, "three"), (4, "four")]);
    for k in 1..=4 {
        assert!(cache.get_or_load(&k, db.loader(k)).await.expect("served by the loader").is_some());
    }
    assert_eq!(cache.l2_breaker_state(), BreakerState::Open);
    let ops = tier.ops();
    cache.evict_local(&1);
    cache.get_or_load(&1, db.loader(1)).await.expect("load");
    assert_eq!(tier.ops(), ops, "an open breaker spares the tier");
    tier.set_available(true);
}

#[tokio::test]
async fn a_failed_publish_is_buffered_and_retried() {
    let f = fleet(2, Mode::Stream, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "v1")]);
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    f.conns[0].faults().set_disconnected(true);
    let err = a.invalidate(&1).await.expect_err("publish failed");
    assert_eq!(err.kind(), ErrorKind::Backplane);
    f.conns[0].faults().set_disconnected(false);
    eventually("retried", || a.pending_invalidations() == 0).await;
    eventually("b evicted", || b.get_local(&1).is_none()).await;
}

#[tokio::test]
async fn a_copy_reread_from_l2_before_a_buffered_delete_lands_is_evicted_fleet_wide() {
    let f = fleet(2, Mode::Stream, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "v1")]);
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    db.set(1, "v2");
    f.tier.set_available(false);
    assert!(a.invalidate(&1).await.is_err(), "L2 delete failed, message published");
    eventually("b evicted", || b.get_local(&1).is_none()).await;
    f.tier.set_available(true);
    // B reads the old value back from L2 (the delete is still buffered) and caches it.
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v1"));
    assert_eq!(a.flush_pending().await, 0, "delete and second message delivered");
    eventually("b evicted the re-read copy", || b.get_local(&1).is_none()).await;
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
}

#[tokio::test]
async fn a_cancelled_probe_does_not_keep_the_breaker_open() {
    let clock = ManualClock::new();
    let cfg = BreakerConfig { consecutive_failures: 1, jitter: 0.0, ..BreakerConfig::default() };
    let breaker = strata::breaker::CircuitBreaker::with_clock("test", cfg, Arc::new(clock.clone()));
    let fail = || async { Err::<(), _>(strata::Error::new(ErrorKind::Tier, "down")) };
    assert!(breaker.call(fail()).await.is_err());
    assert_eq!(breaker.state(), BreakerState::Open);
    clock.advance(Duration::from_secs(2));
    // The probe's caller gives up (a timeout around it, a dropped request).
    let hung = breaker.call(std::future::pending::<strata::Result<()>>());
    assert!(tokio::time::timeout(Duration::from_millis(10), hung).await.is_err());
    // The next call probes, and its success closes the breaker.
    breaker.call(async { Ok::<_, strata::Error>(()) }).await.expect("probe allowed");
    assert_eq!(breaker.state(), BreakerState::Closed);
}

// ---------------------------------------------------------------------------------
// Liveness cost: heartbeats in one digest per interval, acknowledgements addressed

/// `n` caches on one in-process hub, heartbeating every 20 ms (Strong when `strong`),
/// all ready and heard by each other.
async fn hub_fleet(n: usize, broadcast: bool, strong: bool) -> (InProcessBackplane, Vec<Cache<u64, String>>) {
    let hub = InProcessBackplane::new();
    let tier = strata::tier::InProcessTier::new();
    let mut caches = Vec::new();
    for _ in 0..n {
        let mut b = Cache::builder(crate::support::NS)
            .tier(Arc::new(tier.clone()))
            .backplane(Arc::new(hub.connect()))
            .heartbeat_interval(Duration::from_millis(20))
            .broadcast_heartbeats(broadcast);
        if strong {
            b = b.consistency(strata::Consistency::Strong).membership_lease(Duration::from_millis(300));
        }
        caches.push(b.build().expect("valid"));
    }
    for c in &caches {
        tokio::time::timeout(Duration::from_secs(5), c.ready()).await.expect("ready");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    (hub, caches)
}

/// The hub's deliveries per heartbeat interval of an idle fleet of `n`.
async fn idle_deliveries_per_interval(n: usize, broadcast: bool) -> f64 {
    const INTERVALS: u32 = 25;
    let (hub, caches) = hub_fleet(n, broadcast, false).await;
    let before = hub.delivered();
    let heard: Vec<u64> = caches.iter().map(|c| c.stats().heartbeats_received).collect();
    tokio::time::sleep(Duration::from_millis(20) * INTERVALS).await;
    let per_interval = (hub.delivered() - before) as f64 / f64::from(INTERVALS);
    // Everyone still hears everyone, and its own heartbeat comes back.
    for (c, before) in caches.iter().zip(heard) {
        let got = c.stats().heartbeats_received - before;
        assert!(got >= (n as u64 - 1) * 5, "heard {got} heartbeats in {INTERVALS} intervals");
        assert!(c.health().backplane_healthy);
    }
    per_interval
}

/// The liveness and loss detection of an idle fleet cost each instance one delivery
/// per interval (the digest), not one per member; with `broadcast_heartbeats` (the
/// earlier protocol) every heartbeat reaches every instance. Counts, not timings: the
/// bounds leave room for a busy machine's late timers on either side.
#[tokio::test]
async fn idle_heartbeats_cost_n_deliveries_per_interval_not_n_squared() {
    const N: usize = 12;
    let digest = idle_deliveries_per_interval(N, false).await;
    let broadcast = idle_deliveries_per_interval(N, true).await;
    eprintln!("{N} idle instances: {digest:.1} deliveries per interval (digest), {broadcast:.1} (broadcast)");
    assert!(digest <= 2.0 * N as f64, "digest: {digest} deliveries per interval");
    assert!(broadcast >= (N * N) as f64 / 2.0, "broadcast: {broadcast} deliveries per interval");
}

/// At the Strong level an invalidation's acknowledgements reach its origin only: one
/// invalidation in a fleet of N costs N deliveries (the message) plus N - 1 (the
/// acknowledgements), where broadcasting them cost N each.
#[tokio::test]
async fn strong_acknowledgements_are_addressed_to_the_origin() {
    const N: usize = 8;
    const WRITES: u64 = 40;
    for broadcast in [false, true] {
        let (hub, caches) = hub_fleet(N, broadcast, true).await;
        let t = std::time::Instant::now();
        let before = hub.delivered();
        for k in 0..WRITES {
            let origin = &caches[(k % N as u64) as usize];
            tokio::time::timeout(Duration::from_secs(5), origin.invalidate(&k))
                .await
                .expect("acknowledged within the lease")
                .expect("invalidate");
        }
        // Heartbeats and digests go on meanwhile: at most N + 1 deliveries per 20 ms
        // interval (the digest) or N² (broadcast), subtracted as an upper bound.
        let intervals = (t.elapsed().as_millis() / 20 + 1) as u64;
        let idle = if broadcast { intervals * (N * N) as u64 } else { intervals * (N as u64 + 1) };
        let per_write = (hub.delivered() - before).saturating_sub(idle) as f64 / WRITES as f64;
        let total = (hub.delivered() - before) as f64 / WRITES as f64;
        eprintln!(
            "strong, broadcast {broadcast}: {total:.1} deliveries per write ({per_write:.1} beyond heartbeats)"
        );
        if !broadcast {
            // N for the invalidation, N - 1 acknowledgements: 2N - 1, plus heartbeats.
            assert!(total < (N * N) as f64, "{total} deliveries per write");
        }
        for c in &caches {
            assert!(c.stats().invalidations_received >= WRITES - WRITES / N as u64, "{:?}", c.stats());
        }
    }
}

/// `after_remote_invalidation` runs on the instances that applied another's
/// invalidation, once L1 no longer holds the key; never on the writer itself.
#[tokio::test]
async fn the_remote_invalidation_hook_runs_where_an_invalidation_was_applied() {
    let hub = InProcessBackplane::new();
    let tier = strata::tier::InProcessTier::new();
    let seen: Vec<Arc<std::sync::Mutex<Vec<String>>>> = (0..3).map(|_| Arc::default()).collect();
    let mut caches: Vec<Cache<u64, String>> = Vec::new();
    for log in &seen {
        let log = log.clone();
        let cache = Cache::builder(crate::support::NS)
            .tier(Arc::new(tier.clone()))
            .backplane(Arc::new(hub.connect()))
            .heartbeat_interval(Duration::from_millis(20))
            .after_remote_invalidation(move |scope| log.lock().unwrap().push(format!("{scope:?}")))
            .build()
            .expect("valid");
        cache.ready().await;
        caches.push(cache);
    }
    let db = Db::with(&[(1, "v1")]);
    for c in &caches {
        c.get_or_load(&1, db.loader(1)).await.expect("load");
    }
    caches[0].invalidate(&1).await.expect("invalidate");
    for (c, log) in caches.iter().zip(&seen).skip(1) {
        eventually("applied", || !log.lock().unwrap().is_empty()).await;
        assert_eq!(c.get_local(&1), None, "the hook runs once the copy is gone");
    }
    assert!(seen[0].lock().unwrap().is_empty(), "not on the writer");
}

/// Copies of a hot key loaded together expire together: the first instance whose
/// XFetch fires refreshes it for the fleet (its load's fill replaces the L2 entry), and
/// the others' refreshes take that entry instead of loading again.
#[tokio::test]
async fn early_refreshes_of_a_fleet_load_about_once() {
    let clock = ManualClock::new();
    let tier = strata::InProcessTier::with_config(
        strata::tier::TierConfig::default(),
        Arc::new(clock.clone()) as Arc<dyn strata::Clock>,
    );
    let hub = InProcessBackplane::new();
    let mut caches = Vec::new();
    for _ in 0..4 {
        let cache: Cache<u64, String> = Cache::builder("ns")
            .tier(Arc::new(tier.clone()))
            .backplane(Arc::new(hub.connect()))
            .clock(Arc::new(clock.clone()))
            .ttl(Duration::from_secs(2))
            .ttl_jitter(0.0)
            .early_refresh(1000.0)
            .build()
            .expect("valid");
        cache.ready().await;
        caches.push(cache);
    }
    let loads = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let load = |c: &ManualClock| {
        let (c, loads) = (c.clone(), loads.clone());
        move || async move {
            loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            c.advance(Duration::from_millis(100)); // the load's Δ for XFetch
            Ok::<_, std::io::Error>(Some("v".to_string()))
        }
    };
    for c in &caches {
        c.get_or_load(&1, load(&clock)).await.expect("load");
    }
    assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 1, "one load, then L2 hits");
    // 100 ms before expiry, Δβ = 100 s: XFetch fires on every hit.
    clock.advance(Duration::from_millis(1800));
    let done = || {
        loads.load(std::sync::atomic::Ordering::SeqCst)
            + caches.iter().map(|c| c.stats().early_refreshes_from_l2).sum::<u64>()
    };
    for c in &caches {
        let before = done();
        c.get_or_load(&1, load(&clock)).await.expect("hit");
        eventually("the refresh finished", || done() > before && c.stats().loads_in_flight == 0).await;
    }
    let from_l2: u64 = caches.iter().map(|c| c.stats().early_refreshes_from_l2).sum();
    assert_eq!(
        (loads.load(std::sync::atomic::Ordering::SeqCst), from_l2),
        (2, 3),
        "the first refresh loads, the other three take its entry"
    );
}
