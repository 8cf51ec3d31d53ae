//! Configuration refused at build time, the L1 weigher, oversized and undecodable
//! values, and the after-invalidate hooks.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use strata::backplane::Backplane;
use strata::tier::Tier;
use strata::{BreakerConfig, Cache, Clock, Consistency, InProcessBackplane, InProcessTier};

use crate::support::{Db, NS, l2_value};

#[tokio::test]
async fn oversized_values_are_refused_and_nothing_changes() {
    let tier = InProcessTier::new();
    let cache: Cache<u64, String> =
        Cache::builder(NS).tier(Arc::new(tier.clone())).max_value_bytes(16).build().expect("valid");
    cache.insert(1, "small".into()).await.expect("fits");
    let err = cache.insert(1, "x".repeat(100)).await.expect_err("too big");
    assert!(err.is_invalid_input());
    assert!(err.to_string().contains("max_value_bytes"), "{err}");
    assert_eq!(cache.get_local(&1).as_deref(), Some("small"), "nothing changed");
    assert_eq!(l2_value(&tier, 1).as_deref(), Some("small"));
}

#[tokio::test]
async fn an_undecodable_l2_entry_is_a_counted_miss_and_is_evicted() {
    let tier = InProcessTier::new();
    let cache: Cache<u64, String> = Cache::builder(NS).tier(Arc::new(tier.clone())).build().expect("valid");
    let garbage = strata::tier::Envelope {
        value: Some(bytes::Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0xff])),
        version: None,
        created: strata::SystemClock::default().now(),
        soft_expiry: strata::SystemClock::default().now().saturating_add(Duration::from_secs(60)),
        hard_expiry: strata::SystemClock::default().now().saturating_add(Duration::from_secs(60)),
        stamp: 0,
        tags: vec![],
        load_nanos: 0,
        schema: crate::support::string_schema(),
    };
    tier.set(NS, "1", garbage, Duration::from_secs(60)).await.expect("set");
    let db = Db::with(&[(1, "good")]);
    assert_eq!(cache.get_or_load(&1, db.loader(1)).await.expect("load").as_deref(), Some("good"));
    assert_eq!(cache.stats().l2_undecodable, 1);
    assert_eq!(l2_value(&tier, 1).as_deref(), Some("good"), "replaced by a good fill");
}

#[tokio::test]
async fn bad_configuration_fails_at_build_time_with_a_fix() {
    let cases: Vec<(&str, strata::CacheBuilder<u64, String>)> = vec![
        ("namespace", Cache::builder("has space")),
        ("max_capacity", Cache::builder(NS).max_capacity(0)),
        ("ttl_jitter", Cache::builder(NS).ttl_jitter(2.0)),
        ("ttl", Cache::builder(NS).ttl(Duration::ZERO)),
        ("loader_soft_timeout", Cache::builder(NS).loader_soft_timeout(Duration::from_secs(1))),
        (
            "loader_soft_timeout",
            Cache::builder(NS)
                .fail_safe(Duration::from_secs(1), Duration::from_secs(1))
                .loader_soft_timeout(Duration::from_secs(20)),
        ),
        ("consistency", Cache::builder(NS).consistency(Consistency::Invalidated)),
        ("early_refresh", Cache::builder(NS).early_refresh(f64::NAN)),
        (
            "loader_hard_timeout",
            Cache::builder(NS)
                .tier(Arc::new(InProcessTier::new()))
                .loader_hard_timeout(Duration::from_secs(120)),
        ),
        ("breaker.window", Cache::builder(NS).breaker(BreakerConfig { window: 0, ..Default::default() })),
    ];
    for (setting, builder) in cases {
        let err = builder.build().err().unwrap_or_else(|| panic!("{setting} should be refused"));
        assert_eq!(err.setting, setting, "{err}");
        assert!(!err.fix.is_empty());
        eprintln!("{err}");
    }
}

#[tokio::test]
async fn strong_needs_a_tier_and_local_refuses_a_backplane() {
    let hub = InProcessBackplane::new();
    let strong = Cache::<u64, String>::builder(NS)
        .backplane(Arc::new(hub.connect()))
        .consistency(Consistency::Strong)
        .build();
    assert!(strong.err().is_some_and(|e| e.setting == "consistency"));
    let local = Cache::<u64, String>::builder(NS)
        .backplane(Arc::new(hub.connect()) as Arc<dyn Backplane>)
        .consistency(Consistency::Local)
        .build();
    assert!(local.err().is_some_and(|e| e.setting == "consistency"));
}

#[test]
fn build_without_a_runtime_is_refused_when_background_tasks_are_needed() {
    let err = Cache::<u64, String>::builder(NS).tier(Arc::new(InProcessTier::new())).build().err();
    assert!(err.is_some_and(|e| e.setting == "runtime"));
}

#[tokio::test]
async fn after_invalidate_hooks_run_in_registration_order() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let (l1, l2) = (log.clone(), log.clone());
    let cache: Cache<u64, String> = Cache::builder(NS)
        .after_invalidate(move |i| l1.lock().push(format!("first {i:?}")))
        .after_invalidate(move |i| l2.lock().push(format!("second {i:?}")))
        .build()
        .expect("valid");
    cache.invalidate(&5).await.expect("invalidate");
    assert_eq!(*log.lock(), vec![r#"first Keys(["5"])"#.to_string(), r#"second Keys(["5"])"#.to_string()]);
}

#[tokio::test]
async fn strong_needs_a_lease_of_at_least_four_heartbeats() {
    let err = Cache::<u64, String>::builder(NS)
        .tier(Arc::new(InProcessTier::new()))
        .backplane(Arc::new(InProcessBackplane::new()))
        .consistency(Consistency::Strong)
        .membership_lease(Duration::from_secs(1))
        .build()
        .err();
    assert!(err.is_some_and(|e| e.setting == "membership_lease"));
}

#[tokio::test]
async fn a_weigher_bounds_l1_by_total_weight() {
    let cache: Cache<u64, String> = Cache::builder(NS)
        .weigher(100, |_k, v: &String| v.len() as u64)
        .max_capacity(1_000)
        .build()
        .expect("valid");
    for k in 0..200 {
        cache.insert(k, "x".repeat(100)).await.expect("insert");
    }
    let resident: usize = (0..200).filter(|k| cache.get_local(k).is_some()).count();
    eprintln!("weigher: 200 values of 100 bytes, capacity 1000 bytes → {resident} resident");
    assert!(resident <= 10, "at most 1000 bytes resident, got {resident} entries");
    assert!(resident >= 1);
}

#[tokio::test]
async fn strong_needs_a_write_lock_ttl_of_six_leases() {
    let err = Cache::<u64, String>::builder(NS)
        .tier(Arc::new(InProcessTier::new()))
        .backplane(Arc::new(InProcessBackplane::new()))
        .consistency(Consistency::Strong)
        .membership_lease(Duration::from_secs(5))
        .write_lock_ttl(Duration::from_secs(20))
        .build()
        .err();
    assert!(err.is_some_and(|e| e.setting == "write_lock_ttl" && e.fix.contains("write_lock_ttl")));
}
