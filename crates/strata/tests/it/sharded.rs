//! The sharded tier over in-process shards: the conformance suite (a ring, virtual
//! shards, with copies and a gutter), the spread of keys, failover to the gutter,
//! tokens going back to the shard that issued them, hot-key copies and their
//! invalidation, and a fleet of caches reading through it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use strata::backplane::Mode;
use strata::tier::sharded::{NumberedNames, ShardedTierBuilder};
use strata::tier::{Envelope, FillOutcome, FillToken, Lookup, Tier};
use strata::{Cache, Clock, InProcessBackplane, InProcessTier, ShardedTier, SystemClock};

use crate::support::{Db, NS};

fn ring(n: usize) -> (Vec<InProcessTier>, ShardedTierBuilder) {
    let nodes: Vec<InProcessTier> = (0..n).map(|_| InProcessTier::new()).collect();
    let mut b = ShardedTier::builder();
    for (i, t) in nodes.iter().enumerate() {
        b = b.shard(format!("node-{i}"), Arc::new(t.clone()));
    }
    (nodes, b)
}

fn envelope(value: &str) -> Envelope {
    let now = SystemClock::default().now();
    Envelope {
        value: Some(Bytes::copy_from_slice(value.as_bytes())),
        version: None,
        created: now,
        soft_expiry: now.saturating_add(Duration::from_secs(60)),
        hard_expiry: now.saturating_add(Duration::from_secs(120)),
        stamp: 0,
        tags: Vec::new(),
        load_nanos: 0,
        schema: 1,
    }
}

fn token(l: Lookup) -> FillToken {
    match l {
        Lookup::Miss { token, .. } => token,
        Lookup::Hit(e) => panic!("expected a miss, got {e:?}"),
    }
}

fn value(l: &Lookup) -> Option<String> {
    match l {
        Lookup::Hit(e) => e.value.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
        Lookup::Miss { .. } => None,
    }
}

const TTL: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_virtual_shards_and_copies_with_a_gutter_pass_the_conformance_suite() {
    let (_, b) = ring(3);
    strata::testing::conformance::run(&b.build().expect("valid"), "sharded ring of 3").await;
    let (_, b) = ring(3);
    let with_both = b.hot_key_copies(2).gutter(Duration::from_secs(5)).build().expect("valid");
    strata::testing::conformance::run(&with_both, "sharded ring, 2 copies and a gutter").await;
    let one = Arc::new(InProcessTier::new());
    let virtual_shards =
        ShardedTier::builder().virtual_shards(one, 16, NumberedNames).build().expect("valid");
    strata::testing::conformance::run(&virtual_shards, "16 virtual shards").await;
}

#[test]
fn ten_thousand_keys_spread_evenly_over_a_ring_and_over_virtual_shards() {
    for n in [3, 5] {
        let (_, b) = ring(n);
        let tier = b.build().expect("valid");
        let mut per = vec![0usize; n];
        for k in 0..10_000 {
            per[tier.shard_of(&format!("user:{k}"))] += 1;
        }
        let mean = 10_000.0 / n as f64;
        let max = *per.iter().max().expect("shards") as f64;
        assert!(max / mean <= 1.15, "ring of {n}: keys per node {per:?}, max/mean {:.3}", max / mean);
        eprintln!("[sharded] ring of {n}: keys per node {per:?}, max/mean {:.3}", max / mean);
    }
    let tier = ShardedTier::builder()
        .virtual_shards(Arc::new(InProcessTier::new()), 64, NumberedNames)
        .build()
        .expect("valid");
    let mut per = [0usize; 64];
    for k in 0..10_000 {
        per[tier.shard_of(&format!("user:{k}"))] += 1;
    }
    let max = *per.iter().max().expect("shards");
    let min = *per.iter().min().expect("shards");
    eprintln!("[sharded] 64 virtual shards: keys per shard min {min} max {max} (mean 156)");
    assert!(min > 100 && max < 220, "64 virtual shards: min {min} max {max}");
}

#[test]
fn bad_settings_fail_at_build_with_a_fix() {
    let err = ShardedTier::builder().build().expect_err("no shards");
    assert!(err.to_string().contains(".shard()"), "{err}");
    let one = Arc::new(InProcessTier::new());
    let err = ShardedTier::builder()
        .shard("a", one.clone())
        .shard("a", one.clone())
        .build()
        .expect_err("same name");
    assert!(err.to_string().contains("two shards are named `a`"), "{err}");
    let (_, b) = ring(2);
    let err = b.hot_key_copies(3).build().expect_err("copies > shards");
    assert!(err.to_string().contains("use 1 (no copies) to 2"), "{err}");
    let (_, b) = ring(2);
    assert!(b.gutter(Duration::ZERO).build().is_err());
}

#[tokio::test]
async fn a_dead_shard_fails_over_to_its_gutter_and_tokens_go_back_to_their_shard() {
    let (nodes, b) = ring(3);
    let tier = b.gutter(Duration::from_millis(300)).build().expect("valid");
    let key = "k1";
    let home = tier.shard_of(key);
    nodes[home].set_available(false);

    // Read through the gutter: a miss there, a token from there.
    let t = token(tier.lookup("ns", key, None).await.expect("gutter answers"));
    nodes[home].set_available(true);
    // The home shard is back, but the token was issued by the gutter: the fill lands there.
    assert_eq!(tier.fill("ns", key, envelope("v1"), TTL, &t).await.expect("fill"), FillOutcome::Stored);
    assert!(
        value(&nodes[home].lookup("ns", key, None).await.expect("home")).is_none(),
        "not on the home shard"
    );
    let mut gutter = None;
    for i in (0..3).filter(|&i| i != home) {
        if value(&nodes[i].lookup("ns", key, None).await.expect("node")).is_some() {
            gutter = Some(i);
        }
    }
    let gutter = gutter.expect("the fill is on the gutter shard");
    assert!(tier.stats().shards[gutter].gutter_reads >= 1);

    // A delete while the home shard is down fails (the cache retries it) but reaches
    // the gutter, so the gutter's copy is gone at once.
    nodes[home].set_available(false);
    assert!(tier.delete("ns", &[key.to_owned()]).await.is_err());
    assert!(value(&nodes[gutter].lookup("ns", key, None).await.expect("gutter")).is_none());

    // Gutter fills live at most the gutter's time to live.
    let t = token(tier.lookup("ns", key, None).await.expect("gutter answers"));
    assert_eq!(tier.fill("ns", key, envelope("v2"), TTL, &t).await.expect("fill"), FillOutcome::Stored);
    assert_eq!(value(&tier.lookup("ns", key, None).await.expect("read")).as_deref(), Some("v2"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(value(&nodes[gutter].lookup("ns", key, None).await.expect("gutter")).is_none(), "expired");
}

#[tokio::test]
async fn without_a_gutter_a_dead_shard_fails_its_reads_and_only_its_own() {
    let (nodes, b) = ring(3);
    let tier = b.build().expect("valid");
    let on =
        |shard: usize| (0..).map(|k| format!("key{k}")).find(|k| tier.shard_of(k) == shard).expect("a key");
    nodes[0].set_available(false);
    assert!(tier.lookup("ns", &on(0), None).await.is_err());
    assert!(tier.lookup("ns", &on(1), None).await.is_ok());
    assert!(tier.lookup("ns", &on(2), None).await.is_ok());
    // A namespace invalidation reaches the live shards and reports the dead one.
    assert!(tier.invalidate_namespace("ns").await.is_err());
}

#[tokio::test]
async fn a_hot_key_is_read_from_its_copies_and_a_delete_reaches_them_all() {
    let (nodes, b) = ring(3);
    let tier = b.hot_key_copies(3).hot_key_share(0.2, 8).build().expect("valid");
    let key = "hot";
    // Make it hot, then load it: the leader's fill fills every copy.
    for _ in 0..16 {
        let _ = tier.lookup("ns", key, None).await.expect("lookup");
    }
    let t = token(tier.lookup("ns", key, Some(Duration::from_secs(5))).await.expect("lookup"));
    assert_eq!(tier.fill("ns", key, envelope("v1"), TTL, &t).await.expect("fill"), FillOutcome::Stored);
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(
            value(&n.lookup("ns", key, None).await.expect("node")).as_deref(),
            Some("v1"),
            "copy on {i}"
        );
    }
    assert_eq!(tier.stats().copies_filled, 2);
    for _ in 0..60 {
        assert_eq!(value(&tier.lookup("ns", key, None).await.expect("read")).as_deref(), Some("v1"));
    }
    let stats = tier.stats();
    let copy_reads: u64 = stats.shards.iter().map(|s| s.copy_reads).sum();
    assert!(copy_reads > 20, "reads spread over the copies: {stats:?}");
    assert_eq!(stats.hot_keys.first().map(|k| k.key.as_str()), Some(key));

    tier.delete("ns", &[key.to_owned()]).await.expect("delete");
    for n in &nodes {
        assert!(value(&n.lookup("ns", key, None).await.expect("node")).is_none(), "every copy deleted");
    }
    // A load in flight across a delete: no copy takes its fill.
    let t = token(tier.lookup("ns", key, Some(Duration::from_secs(5))).await.expect("lookup"));
    tier.delete("ns", &[key.to_owned()]).await.expect("a write after the load's lookup");
    assert_eq!(tier.fill("ns", key, envelope("old"), TTL, &t).await.expect("fill"), FillOutcome::Rejected);
    for n in &nodes {
        assert!(
            value(&n.lookup("ns", key, None).await.expect("node")).is_none(),
            "no copy took the late fill"
        );
    }
}

#[tokio::test]
async fn a_fleet_reads_through_the_sharded_tier_and_never_serves_an_old_row() {
    let (_, b) = ring(3);
    let tier: Arc<dyn Tier> =
        Arc::new(b.hot_key_copies(2).gutter(Duration::from_secs(5)).build().expect("valid"));
    let hub = InProcessBackplane::with_mode(Mode::Stream);
    let mut caches: Vec<Cache<u64, String>> = Vec::new();
    for _ in 0..2 {
        let c = Cache::builder(NS)
            .tier(tier.clone())
            .backplane(Arc::new(hub.connect()))
            .heartbeat_interval(Duration::from_millis(20))
            .build()
            .expect("valid config");
        c.ready().await;
        caches.push(c);
    }
    let db = Db::with(&(0..50).map(|k| (k, "v1")).collect::<Vec<_>>());
    for k in 0..50 {
        caches[0].get_or_load(&k, db.loader(k)).await.expect("load");
    }
    for k in 0..50 {
        assert_eq!(caches[1].get_or_load(&k, db.loader(k)).await.expect("read").as_deref(), Some("v1"));
    }
    assert_eq!(caches[1].stats().loads, 0, "the second instance read every key from L2");
    for k in 0..50 {
        db.set(k, "v2");
        caches[0].invalidate(&k).await.expect("invalidate");
    }
    for k in 0..50 {
        crate::support::eventually("applied", || caches[1].get_local(&k).is_none()).await;
        assert_eq!(caches[1].get_or_load(&k, db.loader(k)).await.expect("read").as_deref(), Some("v2"));
    }
}
