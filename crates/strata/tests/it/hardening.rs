//! Hardening: L1 ages measured on this process's clock whatever the writer's clock
//! says, packed ages that never turn an old entry into a young one, settings refused at
//! build time when out of range, and arithmetic that no setting or outside value
//! (an L2 envelope, a backplane message) can make panic.

use std::sync::Arc;
use std::time::Duration;

use strata::backplane::{Backplane, Message, MessageBody};
use strata::testing::ManualClock;
use strata::tier::{Envelope, Tier, TierConfig};
use strata::{
    BreakerConfig, Cache, CacheKey, Clock, Consistency, InProcessBackplane, InProcessTier, Scope, Timestamp,
};

use crate::support::{Db, NS, eventually, l2_value};

const MAX_STALE: Duration = Duration::from_secs(2);
const DAY: Duration = Duration::from_secs(24 * 3600);
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long the backplane stays cut in the `max_stale` scenarios.
const CUT: Duration = Duration::from_secs(8);
const STEP: Duration = Duration::from_millis(100);

/// One instance on its own clock and backplane connection, sharing `tier` and `hub`.
async fn node(
    hub: &InProcessBackplane,
    tier: &InProcessTier,
    clock: &ManualClock,
    ttl: Duration,
) -> (Cache<u64, String>, InProcessBackplane) {
    let conn = hub.connect();
    let cache = Cache::builder(NS)
        .clock(Arc::new(clock.clone()))
        .tier(Arc::new(tier.clone()))
        .backplane(Arc::new(conn.clone()))
        .ttl(ttl)
        .ttl_jitter(0.0)
        .early_refresh(0.0)
        .heartbeat_interval(Duration::from_millis(20))
        .max_stale(MAX_STALE)
        .build()
        .expect("valid");
    cache.ready().await;
    (cache, conn)
}

/// Cuts `conn`, lets `change` run (the writer's update and invalidation the reader
/// cannot hear), then moves the reader's clock (and `others`) on in steps for the whole
/// cut: returns how long after the cut `reader` still served `old` for key 1 from L1.
async fn old_row_served_for(
    reader: &Cache<u64, String>,
    conn: &InProcessBackplane,
    clocks: &[&ManualClock],
    old: &str,
    change: impl Future<Output = ()>,
) -> Duration {
    conn.faults().set_disconnected(true);
    eventually("reader unhealthy", || !reader.is_backplane_healthy()).await;
    change.await;
    let mut served = Duration::ZERO;
    let mut elapsed = Duration::ZERO;
    while elapsed < CUT {
        for c in clocks {
            c.advance(STEP);
        }
        elapsed += STEP;
        if reader.get_local(&1).as_deref() == Some(old) {
            served = elapsed;
        }
    }
    served
}

/// A writer whose clock is `skew` ahead (or behind) of the reader's fills L2; the
/// reader fills its L1 from there; the backplane is cut and the writer changes the row.
/// Returns how long the reader served the old row from L1 after the cut, and what it
/// read at the end of the cut.
async fn skewed_writer_scenario(ahead: bool, skew: Duration, ttl: Duration) -> (Duration, Option<String>) {
    let reader_clock = ManualClock::new();
    let writer_clock = ManualClock::new();
    let t0 = reader_clock.now();
    writer_clock.set(if ahead { t0.saturating_add(skew) } else { t0.saturating_sub(skew) });
    let tier = InProcessTier::with_config(TierConfig::default(), Arc::new(reader_clock.clone()));
    let hub = InProcessBackplane::new();
    let (writer, _wconn) = node(&hub, &tier, &writer_clock, ttl).await;
    let (reader, rconn) = node(&hub, &tier, &reader_clock, ttl).await;
    let db = Db::with(&[(1, "old")]);
    writer.get_or_load(&1, db.loader(1)).await.expect("writer loads");
    assert_eq!(reader.get_or_load(&1, db.loader(1)).await.expect("from l2").as_deref(), Some("old"));
    assert_eq!(reader.stats().loads, 0, "the reader's copy came from L2, written on the writer's clock");
    let change = async {
        db.set(1, "new");
        writer.invalidate(&1).await.expect("invalidate");
    };
    let clocks = [&reader_clock, &writer_clock];
    let served = old_row_served_for(&reader, &rconn, &clocks, "old", change).await;
    let read = reader.get_or_load(&1, db.loader(1)).await.expect("read");
    rconn.faults().set_disconnected(false);
    eventually("healthy again", || reader.is_backplane_healthy()).await;
    (served, read)
}

fn describe(ahead: bool, skew: Duration) -> String {
    format!("{}{skew:?}", if ahead { "+" } else { "-" })
}

#[tokio::test]
async fn l1_ages_use_the_readers_clock_when_the_writer_runs_ahead() {
    for (skew, ttl) in [
        (Duration::from_secs(3600), 7 * DAY),
        (Duration::from_secs(3600), DAY),
        (Duration::from_secs(5), DAY),
    ] {
        let (served, read) = skewed_writer_scenario(true, skew, ttl).await;
        eprintln!(
            "writer {}, ttl {ttl:?}: old row served {served:?} into an {CUT:?} cut",
            describe(true, skew)
        );
        assert!(
            served <= MAX_STALE,
            "writer {} ttl {ttl:?}: old row served {served:?}",
            describe(true, skew)
        );
        // Past max_stale the old row is gone, and a read reloads the new one.
        assert_eq!(read.as_deref(), Some("new"));
    }
}

#[tokio::test]
async fn l1_ages_use_the_readers_clock_when_the_writer_runs_behind() {
    for ttl in [7 * DAY, DAY] {
        let skew = Duration::from_secs(3600);
        let (served, read) = skewed_writer_scenario(false, skew, ttl).await;
        eprintln!(
            "writer {}, ttl {ttl:?}: old row served {served:?} into an {CUT:?} cut",
            describe(false, skew)
        );
        assert!(
            served <= MAX_STALE,
            "writer {} ttl {ttl:?}: old row served {served:?}",
            describe(false, skew)
        );
        // Past max_stale the old row is gone, and a read reloads the new one.
        assert_eq!(read.as_deref(), Some("new"));
    }
}

#[tokio::test]
async fn a_seven_day_ttl_does_not_make_old_entries_look_young() {
    let clock = ManualClock::new();
    let tier = InProcessTier::with_config(TierConfig::default(), Arc::new(clock.clone()));
    let hub = InProcessBackplane::new();
    let (writer, _wconn) = node(&hub, &tier, &clock, 7 * DAY).await;
    let (reader, rconn) = node(&hub, &tier, &clock, 7 * DAY).await;
    let db = Db::with(&[(1, "old")]);
    assert_eq!(reader.get_or_load(&1, db.loader(1)).await.expect("load").as_deref(), Some("old"));
    let change = async {
        db.set(1, "new");
        writer.invalidate(&1).await.expect("invalidate");
    };
    let served = old_row_served_for(&reader, &rconn, &[&clock], "old", change).await;
    eprintln!("ttl 7 days, one clock: old row served {served:?} into an {CUT:?} cut");
    assert!(served <= MAX_STALE, "old row served {served:?}");
    assert_eq!(reader.get_or_load(&1, db.loader(1)).await.expect("reload").as_deref(), Some("new"));
}

#[tokio::test]
async fn an_envelope_from_the_far_future_is_neither_young_nor_a_panic() {
    let clock = ManualClock::new();
    let tier = InProcessTier::with_config(TierConfig::default(), Arc::new(clock.clone()));
    let hub = InProcessBackplane::new();
    let (reader, rconn) = node(&hub, &tier, &clock, DAY).await;
    let far = Timestamp(u64::MAX);
    let env = Envelope {
        value: Some(postcard::to_allocvec(&"old".to_string()).expect("encodable").into()),
        version: None,
        created: far,
        soft_expiry: far,
        hard_expiry: far,
        stamp: 0,
        tags: vec![],
        load_nanos: u64::MAX,
        schema: crate::support::string_schema(),
    };
    tier.set(NS, &1u64.to_key_string(), env, DAY).await.expect("set");
    assert_eq!(reader.get(&1).await.expect("from l2").as_deref(), Some("old"));
    let served = old_row_served_for(&reader, &rconn, &[&clock], "old", async {}).await;
    assert!(served <= MAX_STALE, "old row served {served:?}");
}

// ---------------------------------------------------------------------------------
// Settings

#[tokio::test]
async fn every_setting_out_of_range_fails_at_build_time_naming_it() {
    let max = Duration::MAX;
    let over = YEAR + Duration::from_secs(1);
    let tier = |tombstone_ttl| {
        Arc::new(InProcessTier::with_config(
            TierConfig { tombstone_ttl, ..TierConfig::default() },
            Arc::new(ManualClock::new()),
        ))
    };
    let hub = InProcessBackplane::new();
    let strong = || {
        Cache::<u64, String>::builder(NS)
            .tier(tier(Duration::from_secs(60)))
            .backplane(Arc::new(hub.connect()))
            .consistency(Consistency::Strong)
    };
    let b = || Cache::<u64, String>::builder(NS);
    let breaker = |c: BreakerConfig| b().breaker(c);
    let cases: Vec<(&str, &str, strata::CacheBuilder<u64, String>)> = vec![
        ("ttl", "365 days", b().ttl(max)),
        ("ttl", "365 days", b().ttl(over)),
        ("l1_ttl", "365 days", b().l1_ttl(max)),
        ("l2_ttl", "365 days", b().l2_ttl(max)),
        ("negative_ttl", "365 days", b().negative_ttl(max)),
        ("max_stale", "365 days", b().max_stale(max)),
        ("fail_safe", "365 days", b().fail_safe(max, Duration::from_secs(1))),
        ("fail_safe", "365 days", b().fail_safe(Duration::from_secs(1), max)),
        ("loader_soft_timeout", "365 days", b().fail_safe(YEAR, YEAR).loader_soft_timeout(over)),
        (
            "loader_hard_timeout",
            "365 days",
            b().fail_safe(YEAR, YEAR).loader_soft_timeout(YEAR).loader_hard_timeout(max),
        ),
        ("loader_hard_timeout", "365 days", b().loader_hard_timeout(max)),
        ("l2_timeout", "365 days", b().l2_timeout(max)),
        ("lease_wait", "365 days", b().lease_wait(max)),
        ("heartbeat_interval", "365 days", b().heartbeat_interval(max)),
        ("membership_lease", "365 days", b().membership_lease(max)),
        ("write_lock_ttl", "365 days", b().write_lock_ttl(max)),
        ("membership_lease", "365 days", strong().membership_lease(max)),
        ("membership_lease", "four heartbeat", strong().heartbeat_interval(YEAR)),
        ("write_lock_ttl", "six membership", strong().heartbeat_interval(DAY).membership_lease(60 * DAY)),
        ("max_value_bytes", "at least 1", b().max_value_bytes(0)),
        ("max_capacity", "at least 1", b().max_capacity(0)),
        ("ttl_jitter", "0.0..=1.0", b().ttl_jitter(f64::NAN)),
        ("ttl_jitter", "0.0..=1.0", b().ttl_jitter(-0.1)),
        ("early_refresh", "finite", b().early_refresh(f64::INFINITY)),
        ("breaker.open_for", "365 days", breaker(BreakerConfig { open_for: max, ..Default::default() })),
        ("breaker.window", "1..=", breaker(BreakerConfig { window: usize::MAX, ..Default::default() })),
        (
            "breaker.consecutive_failures",
            "at least 1",
            breaker(BreakerConfig { consecutive_failures: 0, ..Default::default() }),
        ),
        ("tier.tombstone_ttl", "365 days", b().tier(tier(Duration::from_secs(u64::MAX)))),
        ("tier.tombstone_ttl", "365 days", b().tier(tier(max))),
    ];
    for (setting, range, builder) in cases {
        let err = builder.build().err().unwrap_or_else(|| panic!("{setting} should be refused"));
        assert_eq!(err.setting, setting, "{err}");
        assert!(err.to_string().contains(range), "{setting}: the message gives the allowed range: {err}");
        eprintln!("{err}");
    }
}

/// The largest values `build` accepts, on one instance; another, with ordinary
/// settings, shares its tier and backplane so that messages flow both ways.
#[tokio::test]
async fn the_largest_allowed_settings_run_a_load_an_invalidation_and_a_heartbeat_round() {
    let clock = ManualClock::new();
    let tier = InProcessTier::with_config(
        TierConfig { tombstone_ttl: YEAR, ..TierConfig::default() },
        Arc::new(clock.clone()),
    );
    let hub = InProcessBackplane::new();
    let big: Cache<u64, String> = Cache::builder(NS)
        .clock(Arc::new(clock.clone()))
        .tier(Arc::new(tier.clone()))
        .backplane(Arc::new(hub.connect()))
        .max_capacity(u64::MAX)
        .weigher(usize::MAX, |_, v: &String| v.len() as u64)
        .ttl(YEAR)
        .l1_ttl(YEAR)
        .l2_ttl(YEAR)
        .ttl_jitter(1.0)
        .negative_ttl(YEAR)
        .max_stale(YEAR)
        .fail_safe(YEAR, YEAR)
        .loader_soft_timeout(YEAR - Duration::from_secs(2))
        .loader_hard_timeout(YEAR - Duration::from_secs(1))
        .early_refresh(f64::MAX)
        .l2_timeout(YEAR)
        .lease_wait(YEAR)
        .max_value_bytes(usize::MAX)
        .heartbeat_interval(YEAR)
        .membership_lease(YEAR)
        .write_lock_ttl(YEAR)
        .breaker(BreakerConfig {
            window: 100_000,
            failure_ratio: 1.0,
            min_calls: 100_000,
            consecutive_failures: 1,
            open_for: YEAR,
            jitter: 1.0,
        })
        .build()
        .expect("the largest allowed values build");
    let small: Cache<u64, String> = Cache::builder(NS)
        .clock(Arc::new(clock.clone()))
        .tier(Arc::new(tier.clone()))
        .backplane(Arc::new(hub.connect()))
        .heartbeat_interval(Duration::from_millis(10))
        .build()
        .expect("valid");
    big.ready().await;
    small.ready().await;
    let db = Db::with(&[(1, "one"), (2, "two")]);
    assert_eq!(big.get_or_load(&1, db.loader(1)).await.expect("load").as_deref(), Some("one"));
    assert_eq!(big.get_or_load(&404, db.loader(404)).await.expect("negative load"), None);
    assert_eq!(small.get_or_load(&1, db.loader(1)).await.expect("from l2").as_deref(), Some("one"));
    clock.advance(YEAR);
    assert_eq!(big.get_or_load(&1, db.loader(1)).await.expect("hit").as_deref(), Some("one"));
    assert!(big.touch(&1).await.expect("touch"));
    // Invalidations both ways, and the other instance's heartbeats through the listener.
    db.set(1, "uno");
    big.invalidate(&1).await.expect("invalidate");
    eventually("small applied it", || small.get_local(&1).is_none()).await;
    small.get_or_load(&2, db.loader(2)).await.expect("load");
    big.get_or_load(&2, db.loader(2)).await.expect("load");
    small.invalidate(&2).await.expect("invalidate");
    eventually("big applied it", || big.get_local(&2).is_none()).await;
    let heard = big.stats().heartbeats_received;
    eventually("heartbeats heard", || big.stats().heartbeats_received > heard).await;
    let lock = big.lock_for_write([Scope::keys(&[1u64])]).await.expect("write lock");
    lock.release().await.expect("released");
    // A failing tier: the breaker opens for its longest cool-down with full jitter; a
    // failing loader falls back on the fail-safe copy.
    assert_eq!(big.get_or_load(&1, db.loader(1)).await.expect("reload").as_deref(), Some("uno"));
    tier.set_available(false);
    big.evict_local(&2);
    let _ = big.get(&2).await;
    assert_eq!(big.l2_breaker_state(), strata::BreakerState::Open);
    tier.set_available(true);
    let failing = || async { Err::<Option<String>, _>(std::io::Error::other("database down")) };
    assert!(big.get_or_load(&2, failing).await.is_err(), "no copy of 2 to fall back on");
    assert!(big.is_backplane_healthy());
    assert_eq!(l2_value(&tier, 1).as_deref(), Some("uno"));
}

#[tokio::test]
async fn a_backplane_sequence_at_u64_max_does_not_kill_the_listener() {
    let hub = InProcessBackplane::new();
    let tier = InProcessTier::new();
    let reader: Cache<u64, String> = Cache::builder(NS)
        .tier(Arc::new(tier.clone()))
        .backplane(Arc::new(hub.connect()))
        .build()
        .expect("valid");
    let writer: Cache<u64, String> = Cache::builder(NS)
        .tier(Arc::new(tier.clone()))
        .backplane(Arc::new(hub.connect()))
        .build()
        .expect("valid");
    reader.ready().await;
    writer.ready().await;
    let rogue = hub.connect();
    for body in [MessageBody::Heartbeat, MessageBody::Heartbeat, MessageBody::Invalidate(Scope::All)] {
        let msg = Message { origin: 99, seq: u64::MAX, namespace: NS.to_owned(), body, sent_at_ms: 0 };
        rogue.publish(&msg).await.expect("published");
    }
    // The third is applied only if the listener survived the first two.
    eventually("the rogue's invalidation applied", || reader.stats().invalidations_applied == 1).await;
    let db = Db::with(&[(1, "one")]);
    reader.get_or_load(&1, db.loader(1)).await.expect("load");
    writer.invalidate(&1).await.expect("invalidate");
    eventually("the listener still applies invalidations", || reader.get_local(&1).is_none()).await;
}

#[tokio::test]
async fn the_in_process_tier_locks_with_any_tombstone_ttl() {
    let tier = InProcessTier::with_config(
        TierConfig { tombstone_ttl: Duration::from_secs(u64::MAX), ..TierConfig::default() },
        Arc::new(ManualClock::new()),
    );
    let scope = Scope::Keys(vec!["1".to_owned()]);
    tier.lock(NS, &scope, 7, Duration::MAX).await.expect("locked");
    tier.unlock(NS, &scope, 7).await.expect("unlocked");
}
