//! The tier and the stream backplane on a real Redis Cluster (strata-testkit's
//! [`RedisCluster`]): the conformance suite, how a namespace's shards spread over the
//! masters, delivery and replay, and a failover (kill -9 of the master that serves a
//! namespace and the stream; its replica takes over).
//!
//! The tests that do not break the cluster share one ([`RedisCluster::shared`]: 3
//! masters, no replicas; starting one takes about 2 s on 2 busy cores), each under its
//! own key prefix. The failover test starts its own, with a replica per master.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use strata::backplane::{Backplane, BackplaneEvent};
use strata::testing::conformance;
use strata::tier::Tier;
use strata_redis::{
    EvictionCheck, RedisPubSubBackplane, RedisStreamBackplane, RedisTier, cluster_shard_namespace, key_slot,
};
use strata_testkit::RedisCluster;

use crate::support::{LEASE, TTL, fresh, hit_value, message_of, msg, next_event, token, wait_for};

/// The cluster the non-destructive tests share (started by the first that needs it).
fn shared_cluster() -> &'static Mutex<RedisCluster> {
    let shared = RedisCluster::shared();
    eprintln!("[cluster] the shared cluster started in {:?}", lock(shared).started_in());
    shared
}

fn lock(c: &Mutex<RedisCluster>) -> MutexGuard<'_, RedisCluster> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

async fn cluster_tier(urls: Vec<String>, prefix: &str) -> RedisTier {
    RedisTier::cluster_builder(urls)
        .prefix(prefix)
        // Generous: the suite runs on 2 busy cores.
        .op_timeout(Duration::from_secs(2))
        .eviction_check(EvictionCheck::Refuse)
        .build()
        .await
        .expect("build a redis tier on the cluster")
}

/// The slot of every key of `namespace` (the tier's own key names tell).
fn namespace_slot(tier: &RedisTier, namespace: &str) -> u16 {
    key_slot(tier.entry_key(namespace, "k").as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_tier_conformance() {
    let cluster = shared_cluster();
    let urls = lock(cluster).urls();
    // One seed node is enough: the rest is discovered.
    let tier = cluster_tier(urls[..1].to_vec(), "cconf").await;
    let started = Instant::now();
    conformance::run(&tier, "redis cluster").await;
    eprintln!(
        "[cluster] conformance in {:?}: {} redis ops, stats {:?}",
        started.elapsed(),
        tier.ops(),
        tier.stats()
    );
    assert_eq!(tier.stats().undecodable, 0);
    assert_eq!(tier.stats().errors, 0);

    // Batched lookups of one namespace: one script in the namespace's slot.
    let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    let misses = tier.lookup_many("batch", &keys, LEASE).await.unwrap();
    for (k, l) in keys.iter().zip(&misses) {
        tier.fill("batch", k, fresh(k, &["t"]), TTL, &token(l)).await.unwrap();
    }
    let hits = tier.lookup_many("batch", &keys, None).await.unwrap();
    assert!(keys.iter().zip(&hits).all(|(k, l)| hit_value(l).as_deref() == Some(k.as_str())));
    tier.invalidate_tag("batch", "t").await.unwrap();
    assert!(tier.lookup_many("batch", &keys, None).await.unwrap().iter().all(|l| hit_value(l).is_none()));

    // The namespaces of the suite live on different masters.
    let mut c = lock(cluster);
    let mut masters: Vec<usize> = ["billsetting", "payment", "draft", "batch", "a", "b", "ns"]
        .iter()
        .filter_map(|ns| c.master_for_slot(namespace_slot(&tier, ns)).unwrap())
        .collect();
    masters.sort_unstable();
    masters.dedup();
    eprintln!("[cluster] the suite's namespaces sit on masters {masters:?}");
}

/// 64 shards of a namespace, named by `cluster_shard_namespace`, land on the 3 masters
/// 21 or 22 each, and a tier serves each shard from its master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_shards_spread_over_the_masters() {
    let cluster = shared_cluster();
    let urls = lock(cluster).urls();
    let tier = cluster_tier(urls, "cshard").await;
    let mut per_master = std::collections::BTreeMap::new();
    let mut slots = std::collections::BTreeSet::new();
    for shard in 0..64 {
        let ns = cluster_shard_namespace("billsetting", shard, 64);
        let slot = namespace_slot(&tier, &ns);
        slots.insert(usize::from(slot) * 64 / 16384);
        let master = lock(cluster).master_for_slot(slot).unwrap().expect("a master serves the slot");
        *per_master.entry(master).or_insert(0usize) += 1;
        let t = token(&tier.lookup(&ns, "k", LEASE).await.unwrap());
        tier.fill(&ns, "k", fresh(&ns, &[]), TTL, &t).await.unwrap();
        assert_eq!(hit_value(&tier.lookup(&ns, "k", None).await.unwrap()).as_deref(), Some(ns.as_str()));
        // The entry is on that master.
        let exists = lock(cluster).command(master, &["EXISTS", &tier.entry_key(&ns, "k")]).unwrap();
        assert_eq!(exists, ":1\r\n", "{ns} on node {master}");
    }
    eprintln!("[cluster] 64 shards per master: {per_master:?}");
    assert_eq!(slots.len(), 64, "64 distinct buckets");
    assert_eq!(per_master.len(), 3);
    assert!(per_master.values().all(|&n| (21..=22).contains(&n)), "{per_master:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_stream_backplane_delivers_and_replays() {
    let cluster = shared_cluster();
    let urls = lock(cluster).urls();
    let bp = RedisStreamBackplane::cluster_builder(urls.clone())
        .prefix("cbp")
        .op_timeout(Duration::from_secs(2))
        .block(Duration::from_millis(300))
        .build()
        .await
        .expect("stream backplane on the cluster");
    let stream_master = lock(cluster).master_for_key(bp.stream_key()).unwrap();
    eprintln!("[cluster] stream {} on node {stream_master:?}", bp.stream_key());
    bp.publish(&msg(1, 1, "before")).await.unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    let mut sub2 = bp.subscribe().await.unwrap();
    for seq in 2..=6 {
        bp.publish(&msg(1, seq, &format!("k{seq}"))).await.unwrap();
        for s in [&mut sub, &mut sub2] {
            let ev = next_event(s, Duration::from_secs(5)).await;
            assert_eq!(message_of(&ev), Some(&msg(1, seq, &format!("k{seq}"))));
        }
    }
    // Quiet block times (catch-up reads on the cluster) deliver nothing and lose nothing.
    tokio::time::sleep(Duration::from_millis(800)).await;
    bp.publish(&msg(1, 7, "k7")).await.unwrap();
    let (ev, skipped) = wait_for(&mut sub, Duration::from_secs(5), "k7", |e| message_of(e).is_some()).await;
    assert_eq!(message_of(&ev), Some(&msg(1, 7, "k7")));
    assert!(skipped.is_empty(), "{skipped:?}");
    let got = bp.replay(1, 1, 7).await.unwrap().expect("a complete replay");
    assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=7).collect::<Vec<_>>());
    assert_eq!(bp.replay(1, 5, 9).await.unwrap(), None);
    // The subscriber's connection is named on the node that serves the stream.
    let node = stream_master.expect("a master serves the stream");
    let list = lock(cluster).command(node, &["CLIENT", "LIST"]).unwrap();
    assert!(list.contains(&format!("name={}-1", bp.client_name_prefix())), "{list}");
    let s = bp.stats();
    assert_eq!((s.lost, s.disconnects, s.malformed), (0, 0, 0), "{s:?}");

    // Pub/Sub refuses a cluster, saying what to use instead.
    let mut options = strata_redis::ConnectionOptions::cluster(urls);
    options.prefix = "cps".into();
    let err = RedisPubSubBackplane::builder("").connection(options).build().await.expect_err("refused");
    assert!(err.to_string().contains("cluster_builder"), "{err}");
}

/// Kill -9 the master that serves a namespace and the backplane stream: calls fail or
/// time out until its replica is promoted, then the tier works again by itself, and the
/// subscriber reconnects and resumes (replaying, or reporting a loss).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_of_a_master() {
    let mut cluster = RedisCluster::builder().masters(3).replicas(1).start();
    eprintln!("[cluster] 3 masters + 3 replicas started in {:?}", cluster.started_in());
    let urls = cluster.urls();
    let tier = cluster_tier(urls.clone(), "fo").await;
    let bp = RedisStreamBackplane::cluster_builder(urls)
        .prefix("fo")
        .op_timeout(Duration::from_millis(500))
        .block(Duration::from_millis(300))
        .read_grace(Duration::from_millis(500))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let victim = cluster.master_for_key(bp.stream_key()).unwrap().expect("the stream's master");
    // A namespace on the same master as the stream: one kill hits both.
    let ns = (0..)
        .map(|i| format!("fo-{i}"))
        .find(|ns| cluster.master_for_slot(namespace_slot(&tier, ns)).unwrap() == Some(victim))
        .expect("a namespace on the victim");
    let t = token(&tier.lookup(&ns, "k", LEASE).await.unwrap());
    tier.fill(&ns, "k", fresh("v1", &[]), TTL, &t).await.unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    bp.publish(&msg(1, 1, "k1")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await), Some(&msg(1, 1, "k1")));
    // Let the replica catch up with the writes above.
    cluster.command(victim, &["WAIT", "1", "2000"]).unwrap();

    let killed = Instant::now();
    cluster.kill(victim);
    let (mut failed, mut ok_after_failure, mut recovered_after) = (0u32, 0u32, None);
    let mut published = Vec::new();
    let mut seq = 2;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && ok_after_failure < 5 {
        let call = tokio::time::timeout(Duration::from_millis(500), tier.lookup(&ns, "k", None)).await;
        match call {
            Ok(Ok(_)) if failed > 0 => {
                ok_after_failure += 1;
                recovered_after.get_or_insert(killed.elapsed());
            }
            Ok(Ok(_)) => {}
            _ => failed += 1,
        }
        if bp.publish(&msg(1, seq, &format!("k{seq}"))).await.is_ok() {
            published.push(seq);
        }
        seq += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered_after = recovered_after.expect("the tier works again after the failover");
    let healthy_after = {
        cluster.wait_healthy(Duration::from_secs(30));
        killed.elapsed()
    };
    eprintln!(
        "[cluster] failover: {failed} tier calls failed; first success {recovered_after:?} after the kill; \
         cluster healthy {healthy_after:?} after it; {} of {} publishes went through meanwhile",
        published.len(),
        seq - 2
    );
    assert!(failed > 0, "calls to a killed master fail until the promotion");
    let promoted = cluster.master_for_key(bp.stream_key()).unwrap().expect("a new master");
    assert_ne!(promoted, victim);

    // The tier serves the namespace from the promoted replica: fills and hits.
    tier.delete(&ns, &["k".to_owned()]).await.unwrap();
    let t = token(&tier.lookup(&ns, "k", LEASE).await.unwrap());
    tier.fill(&ns, "k", fresh("v2", &[]), TTL, &t).await.unwrap();
    assert_eq!(hit_value(&tier.lookup(&ns, "k", None).await.unwrap()).as_deref(), Some("v2"));

    // The subscriber reported the disconnect and came back, replaying or reporting a loss;
    // a message published now is delivered.
    let (_, before) = wait_for(&mut sub, Duration::from_secs(20), "Resumed", |e| {
        matches!(e, BackplaneEvent::Resumed { .. })
    })
    .await;
    assert!(before.iter().any(|e| matches!(e, BackplaneEvent::Disconnected)), "{before:?}");
    bp.publish(&msg(1, seq, "after")).await.unwrap();
    let (ev, skipped) = wait_for(&mut sub, Duration::from_secs(10), "the message after", |e| {
        message_of(e) == Some(&msg(1, seq, "after"))
    })
    .await;
    let replayed = skipped.iter().filter(|e| message_of(e).is_some()).count();
    let lost = skipped.iter().chain(&before).any(|e| matches!(e, BackplaneEvent::Lost));
    eprintln!(
        "[cluster] subscriber: {} events before Resumed, {replayed} messages delivered after it, lost reported: {lost}; {ev:?}",
        before.len()
    );
    let s = bp.stats();
    eprintln!("[cluster] backplane stats {s:?}, tier stats {:?}", tier.stats());
    assert!(s.disconnects >= 1 && s.resumes >= 1, "{s:?}");
}

/// The sharded tier over the cluster (64 virtual shards, `RedisTier::cluster_shards`):
/// the conformance suite, and 10,000 keys of one namespace spread evenly over the
/// masters (each key's shard, that shard's slot, the slot's master).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_sharded_over_the_cluster_passes_the_suite_and_spreads_over_the_masters() {
    let cluster = shared_cluster();
    let urls = lock(cluster).urls();
    let base = cluster_tier(urls.clone(), "csharded").await;
    let probe = base.clone();
    let sharded = base
        .cluster_shards(strata_redis::DEFAULT_CLUSTER_SHARDS)
        .shard_timeout(Duration::from_secs(2))
        .build()
        .expect("valid");
    let started = Instant::now();
    conformance::run(&sharded, "redis cluster, 64 virtual shards").await;
    eprintln!("[cluster] sharded conformance in {:?}: {} redis ops", started.elapsed(), probe.ops());

    let mut c = lock(cluster);
    let masters = c.masters().unwrap();
    let mut master_of_shard = Vec::new();
    for shard in 0..strata_redis::DEFAULT_CLUSTER_SHARDS {
        let ns = cluster_shard_namespace("users", shard, strata_redis::DEFAULT_CLUSTER_SHARDS);
        let slot = namespace_slot(&probe, &ns);
        master_of_shard.push(c.master_for_slot(slot).unwrap().expect("every slot is served"));
    }
    let mut per_master = vec![0usize; masters.len()];
    for k in 0..10_000 {
        let m = master_of_shard[sharded.shard_of(&format!("user:{k}"))];
        per_master[masters.iter().position(|&x| x == m).expect("a master")] += 1;
    }
    let mean = 10_000.0 / masters.len() as f64;
    let max = *per_master.iter().max().unwrap() as f64;
    eprintln!(
        "[cluster] 10,000 keys of one namespace per master: {per_master:?}, max/mean {:.3}",
        max / mean
    );
    assert!(max / mean <= 1.15, "keys per master {per_master:?}");
}

/// `MIGRATE` of `keys` from the connection's node to 127.0.0.1:`port`.
async fn migrate(conn: &mut redis::aio::MultiplexedConnection, port: &str, keys: Vec<String>) {
    if keys.is_empty() {
        return;
    }
    let mut cmd = redis::cmd("MIGRATE");
    cmd.arg("127.0.0.1").arg(port).arg("").arg(0).arg(5000).arg("KEYS").arg(keys);
    let _: () = cmd.query_async(conn).await.unwrap();
}

async fn keys_in_slot(conn: &mut redis::aio::MultiplexedConnection, slot: u16) -> Vec<String> {
    redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(10_000).query_async(conn).await.unwrap()
}

async fn set_slot(conn: &mut redis::aio::MultiplexedConnection, slot: u16, how: &str, node: &str) {
    let _: () =
        redis::cmd("CLUSTER").arg("SETSLOT").arg(slot).arg(how).arg(node).query_async(conn).await.unwrap();
}

/// Moves a namespace's slot to another master while it is used (`CLUSTER SETSLOT …
/// IMPORTING/MIGRATING`, `MIGRATE` of half its keys, a delete, then the rest and
/// `SETSLOT … NODE`): the delete fails mid-move (`ASK`/`TRYAGAIN`) and is retried, as
/// the cache retries invalidations; afterwards every entry is still readable and a fill
/// that began before the delete is refused (the tombstone moved with the slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_between_masters_keeps_the_fill_guard() {
    let cluster = shared_cluster();
    let urls = lock(cluster).urls();
    let tier = cluster_tier(urls.clone(), "creshard").await;
    let ns = "moving";
    let slot = namespace_slot(&tier, ns);
    for i in 0..40 {
        let k = format!("k{i}");
        let t = token(&tier.lookup(ns, &k, None).await.unwrap());
        tier.fill(ns, &k, fresh(&k, &[]), TTL, &t).await.unwrap();
    }
    let late = token(&tier.lookup(ns, "late", None).await.unwrap());

    let (from, to, masters) = {
        let mut c = lock(cluster);
        let from = c.master_for_slot(slot).unwrap().expect("served");
        let masters = c.masters().unwrap();
        let to = *masters.iter().find(|&&m| m != from).expect("another master");
        (from, to, masters)
    };
    let mut conns = Vec::new();
    for url in &urls {
        conns.push(
            redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap(),
        );
    }
    let from_id: String = redis::cmd("CLUSTER").arg("MYID").query_async(&mut conns[from]).await.unwrap();
    let to_id: String = redis::cmd("CLUSTER").arg("MYID").query_async(&mut conns[to]).await.unwrap();
    let to_port = urls[to].rsplit(':').next().unwrap().trim_end_matches('/').to_owned();
    set_slot(&mut conns[to], slot, "IMPORTING", &from_id).await;
    set_slot(&mut conns[from], slot, "MIGRATING", &to_id).await;
    let keys = keys_in_slot(&mut conns[from], slot).await;
    migrate(&mut conns[from], &to_port, keys[..keys.len() / 2].to_vec()).await;

    // Mid-move: the write's invalidation fails; the move completes after three
    // attempts; the retries go on until the tier takes it.
    let mut failed_attempts = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut moved = false;
    while tier.delete(ns, &["late".to_owned()]).await.is_err() {
        failed_attempts += 1;
        if failed_attempts >= 3 && !moved {
            let rest = keys_in_slot(&mut conns[from], slot).await;
            migrate(&mut conns[from], &to_port, rest).await;
            for &m in &masters {
                set_slot(&mut conns[m], slot, "NODE", &to_id).await;
            }
            moved = true;
        }
        assert!(Instant::now() < deadline, "the delete never went through");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !moved {
        let rest = keys_in_slot(&mut conns[from], slot).await;
        migrate(&mut conns[from], &to_port, rest).await;
        for &m in &masters {
            set_slot(&mut conns[m], slot, "NODE", &to_id).await;
        }
    }
    assert_eq!(lock(cluster).master_for_slot(slot).unwrap(), Some(to), "the slot moved");
    let refused = tier.fill(ns, "late", fresh("old row", &[]), TTL, &late).await.unwrap();
    assert_eq!(refused, strata::tier::FillOutcome::Rejected, "a fill begun before the delete");
    let mut hits = 0;
    for i in 0..40 {
        let k = format!("k{i}");
        if let Some(v) = hit_value(&tier.lookup(ns, &k, None).await.unwrap()) {
            assert_eq!(v, k);
            hits += 1;
        }
    }
    eprintln!(
        "[cluster] slot {slot} moved from node {from} to {to}: {} keys, the delete failed {failed_attempts} times \
         mid-move, {hits} of 40 entries read back after it",
        keys.len()
    );
    assert_eq!(hits, 40, "the entries moved with the slot");
}
