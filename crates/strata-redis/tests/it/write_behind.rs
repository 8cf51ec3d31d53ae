//! [`RedisWriteBehindQueue`] against real servers: the queue conformance suite (one
//! server, the shared Cluster, a least-privilege ACL user), saves during a claim,
//! claim takeover between two instances, the durability levels (`AppendFsync` across a
//! `kill -9`, `Replicas` with and without a replica), the eviction check, and corrupt
//! records.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use strata::testing::queue_conformance;
use strata::write_behind::{AckOutcome, QueueLimits, RetryOutcome, SaveOutcome, WriteBehindQueue};
use strata_redis::{Durability, RedisWriteBehindQueue, key_slot};
use strata_testkit::{RedisCluster, RedisServer};

const NOW: Duration = Duration::ZERO;
const LEASE: Duration = Duration::from_secs(60);

async fn queue(url: &str, prefix: &str) -> RedisWriteBehindQueue {
    RedisWriteBehindQueue::builder(url)
        .prefix(prefix)
        // Generous: the suite runs on 2 busy cores.
        .op_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("build the queue")
}

async fn save(q: &RedisWriteBehindQueue, ns: &str, key: &str, value: &str) -> u64 {
    match q.save(ns, key, Bytes::copy_from_slice(value.as_bytes()), NOW, QueueLimits::default()).await {
        Ok(SaveOutcome::Queued { seq, .. }) => seq,
        other => panic!("save {ns}/{key}: {other:?}"),
    }
}

fn lock(c: &Mutex<RedisCluster>) -> MutexGuard<'_, RedisCluster> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_conformance_on_one_server() {
    let server = RedisServer::start();
    let q = queue(&server.url(), "wbconf").await;
    queue_conformance::run(&q, "redis").await;
    let c = q.counters();
    assert_eq!((c.repaired, c.dropped, c.errors), (0, 0, 0), "{c:?}");
    // Fewer groups change nothing the port promises.
    let one = RedisWriteBehindQueue::builder(server.url())
        .prefix("wbconf1")
        .groups(1)
        .build()
        .await
        .expect("build");
    queue_conformance::run(&one, "redis, one group").await;
}

/// On a Cluster the namespace bound is split over the groups (no script can count the
/// whole namespace), so the suite's `max_entries: 2` holds exactly with one group; the
/// default 16 groups are exercised beside it, spread over every master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_conformance_on_the_cluster() {
    let cluster = RedisCluster::shared();
    let urls = lock(cluster).urls();
    let one = RedisWriteBehindQueue::cluster_builder(urls[..1].to_vec())
        .prefix("wbcconf")
        .groups(1)
        .op_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("build on the cluster");
    queue_conformance::run(&one, "redis cluster, one group").await;

    let q = RedisWriteBehindQueue::cluster_builder(urls[..1].to_vec())
        .prefix("wbcspread")
        .op_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("build on the cluster");
    assert_eq!(q.groups(), 16);
    let ns = "spread";
    let keys: Vec<String> = (0..64).map(|i| format!("k{i}")).collect();
    for k in &keys {
        save(&q, ns, k, k).await;
    }
    let st = q.stats(ns).await.unwrap();
    assert_eq!(st.pending, 64, "{st:?}");
    let mut masters = std::collections::HashSet::new();
    {
        let mut c = lock(cluster);
        for g in 0..16 {
            let slot = key_slot(q.group_keys(ns, g)[0].as_bytes());
            masters.insert(c.master_for_slot(slot).unwrap());
        }
    }
    assert_eq!(masters.len(), 3, "the 16 groups spread over the 3 masters");
    // Claims visit the groups until they have enough.
    let mut claimed = Vec::new();
    for _ in 0..20 {
        let got = q.claim_due(ns, "a", 25, LEASE).await.unwrap();
        if got.is_empty() {
            break;
        }
        claimed.extend(got);
    }
    assert_eq!(claimed.len(), 64);
    let mut seen: Vec<&str> = claimed.iter().map(|s| s.key.as_str()).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 64, "every key claimed once");
    for s in &claimed[..10] {
        let out = q.retry(ns, "a", &s.key, s.seq, NOW, "boom", 1, false).await.unwrap();
        assert!(matches!(out, RetryOutcome::DeadLettered { attempts: 1 }), "{out:?}");
    }
    for s in &claimed[10..] {
        assert_eq!(q.ack(ns, &s.key, s.seq).await.unwrap(), AckOutcome::Flushed);
    }
    let st = q.stats(ns).await.unwrap();
    assert_eq!((st.pending, st.dead), (0, 10), "{st:?}");
    let dead = q.dead_letters(ns, 100).await.unwrap();
    assert_eq!(dead.len(), 10);
    assert!(dead.windows(2).all(|w| w[0].at_ms <= w[1].at_ms), "oldest first across groups");
    assert_eq!(q.requeue_dead(ns, None).await.unwrap(), 10);
    assert_eq!(q.make_due(ns, None).await.unwrap(), 0, "requeued keys are due already");
    assert_eq!(q.claim_due(ns, "b", 100, LEASE).await.unwrap().len(), 10);
    assert_eq!(q.counters().errors, 0);
}

/// A save during a flush is acknowledged `Newer` and written on the next round; a claim
/// whose owner died (its lease ran out) is taken by another instance, and the dead
/// owner's late acknowledgement cannot drop the newer save.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_save_during_claim_and_takeover() {
    let server = RedisServer::start();
    let url = server.url();
    let a = queue(&url, "wbtake").await;
    let b = queue(&url, "wbtake").await;
    let ns = "drafts";
    let s1 = save(&a, ns, "d1", "v1").await;
    let got = a.claim_due(ns, "A", 10, LEASE).await.unwrap();
    assert_eq!(got.len(), 1);
    let s2 = save(&b, ns, "d1", "v2").await;
    assert!(s2 > s1);
    assert_eq!(a.ack(ns, "d1", s1).await.unwrap(), AckOutcome::Newer);
    let again = b.claim_due(ns, "B", 10, LEASE).await.unwrap();
    assert_eq!((again.len(), again[0].seq, again[0].value.as_ref()), (1, s2, &b"v2"[..]));
    assert_eq!(b.ack(ns, "d1", s2).await.unwrap(), AckOutcome::Flushed);
    assert_eq!(a.pending_value(ns, "d1").await.unwrap(), None);

    // Takeover: A claims with a short lease and "dies"; B takes the key after it.
    let s3 = save(&a, ns, "d2", "x").await;
    assert_eq!(a.claim_due(ns, "A", 10, Duration::from_millis(200)).await.unwrap().len(), 1);
    assert!(b.claim_due(ns, "B", 10, LEASE).await.unwrap().is_empty(), "held by A");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let taken = b.claim_due(ns, "B", 10, LEASE).await.unwrap();
    assert_eq!((taken.len(), taken[0].seq), (1, s3));
    let out = a.retry(ns, "A", "d2", s3, NOW, "late", 5, false).await.unwrap();
    assert_eq!(out, RetryOutcome::NotClaimed, "A's claim is gone");
    assert_eq!(b.ack(ns, "d2", s3).await.unwrap(), AckOutcome::Flushed);
    let st = a.stats(ns).await.unwrap();
    assert_eq!((st.pending, st.pending_bytes, st.dead), (0, 0, 0));
}
