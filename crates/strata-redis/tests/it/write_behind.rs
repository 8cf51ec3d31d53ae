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

/// `AppendFsync`: on a server with `appendonly yes` and `appendfsync always`, an
/// acknowledged save survives `kill -9` and a restart from the AOF; a server without
/// the AOF is refused at build, with the fix in the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_append_fsync_survives_kill_9() {
    let mut server = RedisServer::builder().arg("appendonly", "yes").arg("appendfsync", "always").start();
    let q = RedisWriteBehindQueue::builder(server.url())
        .prefix("wbaof")
        .durability(Durability::AppendFsync)
        .op_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("an fsynced AOF is accepted");
    let seq = save(&q, "ns", "draft", "kept").await;
    server.kill();
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    let value = loop {
        match q.pending_value("ns", "draft").await {
            Ok(v) => break v,
            Err(e) => assert!(Instant::now() < deadline, "the queue never came back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(value.as_deref(), Some(&b"kept"[..]), "the acknowledged save is in the AOF");
    let got = q.claim_due("ns", "a", 10, LEASE).await.unwrap();
    assert_eq!((got.len(), got[0].seq), (1, seq));
    let after = save(&q, "ns", "draft", "next").await;
    assert!(after > seq, "sequences go on growing after the restart");

    let plain = RedisServer::start();
    let err = RedisWriteBehindQueue::builder(plain.url())
        .durability(Durability::AppendFsync)
        .build()
        .await
        .expect_err("no AOF: refused");
    let msg = err.to_string();
    assert!(msg.contains("appendonly no") && msg.contains("--appendfsync always"), "{msg}");
    let everysec = RedisServer::builder().arg("appendonly", "yes").start();
    let err = RedisWriteBehindQueue::builder(everysec.url())
        .durability(Durability::AppendFsync)
        .build()
        .await
        .expect_err("appendfsync everysec: refused");
    assert!(err.to_string().contains("appendfsync everysec"), "{err}");
}

async fn wait_for_replica(master: &RedisServer) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = master.command(&["INFO", "replication"]).unwrap();
        if info.contains("connected_slaves:1") && info.contains("state=online") {
            return;
        }
        assert!(Instant::now() < deadline, "the replica never synced: {info}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `Replicas`: a save is acknowledged once a replica has it; without a replica it fails
/// (transient, kind `Tier`) saying how many confirmed, and the save is applied anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_replicas_confirm_or_fail() {
    let master = RedisServer::start();
    let replicas = Durability::Replicas { replicas: 1, timeout: Duration::from_millis(300) };
    let lonely = RedisWriteBehindQueue::builder(master.url())
        .prefix("wbrepl")
        .durability(replicas)
        .op_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let err = lonely
        .save("ns", "k", Bytes::from_static(b"v"), NOW, QueueLimits::default())
        .await
        .expect_err("no replica confirms");
    assert!(err.is_transient() && err.to_string().contains("0 of 1 replicas"), "{err}");
    assert_eq!(lonely.pending_value("ns", "k").await.unwrap().as_deref(), Some(&b"v"[..]));

    let _replica = RedisServer::builder().arg("replicaof", format!("127.0.0.1 {}", master.port())).start();
    wait_for_replica(&master).await;
    let out = lonely.save("ns", "k", Bytes::from_static(b"v2"), NOW, QueueLimits::default()).await;
    assert!(matches!(out, Ok(SaveOutcome::Queued { replaced: true, .. })), "{out:?}");
}

/// A server that may evict any key is refused (the message names the policy and the
/// fix), unless the risk is accepted; `volatile-*` is fine (no queue key has a TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_refuses_an_allkeys_eviction_policy() {
    let server =
        RedisServer::builder().arg("maxmemory", "3mb").arg("maxmemory-policy", "allkeys-lru").start();
    let err = RedisWriteBehindQueue::builder(server.url()).build().await.expect_err("allkeys-lru refused");
    let msg = err.to_string();
    assert!(msg.contains("allkeys-lru") && msg.contains("noeviction"), "{msg}");
    assert!(err.is_invalid_input());
    RedisWriteBehindQueue::builder(server.url())
        .allow_eviction_risk(true)
        .build()
        .await
        .expect("accepted when asked");
    server.command(&["CONFIG", "SET", "maxmemory-policy", "volatile-lru"]).unwrap();
    let q =
        RedisWriteBehindQueue::builder(server.url()).prefix("wbevict").build().await.expect("volatile-lru");
    save(&q, "ns", "k", "v").await;
    let mut raw =
        redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    for key in q.group_keys("ns", 0).into_iter().chain([q.record_key("ns", "k")]) {
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut raw).await.unwrap();
        assert!(ttl < 0, "{key} has no TTL");
    }
}

/// Hostile bytes: binary values and odd keys round-trip; a record whose fields were
/// overwritten with garbage is repaired (its value kept and due again, with a fresh
/// sequence); a record that is not a hash is dropped and counted; garbage counters and
/// an index key of the wrong type are rebuilt. No script fails on any of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_survives_corrupt_records() {
    let server = RedisServer::start();
    let q = queue(&server.url(), "wbpoison").await;
    let mut raw =
        redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let ns = "ns";
    let odd = "k {x} é\n";
    let binary = Bytes::from_static(b"\0\xff{}\r\n");
    q.save(ns, odd, binary.clone(), NOW, QueueLimits::default()).await.unwrap();
    assert_eq!(q.pending_value(ns, odd).await.unwrap(), Some(binary));

    // Garbage in a record's fields: repaired, the value kept.
    let s1 = save(&q, ns, "a", "keep me").await;
    let rk = q.record_key(ns, "a");
    let _: () = redis::cmd("HSET")
        .arg(&rk)
        .arg("s")
        .arg("-1")
        .arg("st")
        .arg("??")
        .arg("a")
        .arg("1e9")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(q.pending_value(ns, "a").await.unwrap().as_deref(), Some(&b"keep me"[..]));
    assert!(q.counters().repaired >= 1, "{:?}", q.counters());
    // Not a hash at all: dropped, reported.
    save(&q, ns, "b", "lost").await;
    let rb = q.record_key(ns, "b");
    let _: () = redis::cmd("SET").arg(&rb).arg("junk").query_async(&mut raw).await.unwrap();
    assert_eq!(q.pending_value(ns, "b").await.unwrap(), None);
    assert_eq!(q.counters().dropped, 1);
    // Garbage counters and a schedule of the wrong type in another key's group.
    save(&q, ns, "c", "vc").await;
    let group_of_c = (0..q.groups())
        .find(|&g| q.record_key(ns, "c").starts_with(q.group_keys(ns, g)[0].trim_end_matches('c')))
        .expect("c's group");
    let gk = q.group_keys(ns, group_of_c);
    let _: () = redis::cmd("HSET")
        .arg(&gk[0])
        .arg("n")
        .arg("x")
        .arg("q")
        .arg("0x10")
        .query_async(&mut raw)
        .await
        .unwrap();
    let st = q.stats(ns).await.unwrap();
    assert_eq!(st.pending, 3, "odd, a and c wait: {st:?}");
    let _: () = redis::cmd("DEL").arg(&gk[1]).query_async(&mut raw).await.unwrap();
    let _: () = redis::cmd("SET").arg(&gk[1]).arg("not a zset").query_async(&mut raw).await.unwrap();
    // The claim drops the bad schedule; c's next read puts it back in.
    let got = q.claim_due(ns, "w", 10, LEASE).await.unwrap();
    assert!(got.iter().all(|s| s.key != "c" || s.value.as_ref() == b"vc"));
    assert_eq!(q.pending_value(ns, "c").await.unwrap().as_deref(), Some(&b"vc"[..]));
    let mut claimed: Vec<_> = got;
    claimed.extend(q.claim_due(ns, "w", 10, LEASE).await.unwrap());
    let a = claimed.iter().find(|s| s.key == "a").expect("the repaired record is due");
    assert!(a.seq > s1 && a.attempts == 0, "fresh sequence: {a:?}");
    assert!(claimed.iter().any(|s| s.key == "c"), "c is claimable again: {claimed:?}");
    for s in &claimed {
        assert_eq!(q.ack(ns, &s.key, s.seq).await.unwrap(), AckOutcome::Flushed);
    }
    let st = q.stats(ns).await.unwrap();
    assert_eq!((st.pending, st.pending_bytes, st.dead), (0, 0, 0), "{st:?}");
    assert_eq!(q.counters().errors, 0);
}

/// The ACL the crate docs give runs the whole suite; a rule missing a command a script
/// needs fails the call naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_under_a_least_privilege_acl_user() {
    let server = RedisServer::start();
    let mut rule = vec!["ACL", "SETUSER", "wb", "on", ">s3cret-wb", "resetkeys", "resetchannels", "-@all"];
    rule.extend(strata_redis::WRITE_BEHIND_ACL.split_whitespace());
    server.command(&rule).expect("ACL SETUSER");
    let url = format!("redis://wb:s3cret-wb@127.0.0.1:{}", server.port());
    let q = RedisWriteBehindQueue::builder(&url).build().await.expect("builds under the minimal ACL");
    queue_conformance::run(&q, "redis under the minimal ACL").await;
    assert_eq!(q.counters().errors, 0);

    let mut short =
        vec!["ACL", "SETUSER", "short", "on", ">s3cret-wb", "resetkeys", "resetchannels", "-@all"];
    short.extend(strata_redis::WRITE_BEHIND_ACL.split_whitespace().filter(|c| *c != "+xadd"));
    server.command(&short).expect("ACL SETUSER");
    let q = RedisWriteBehindQueue::builder(format!("redis://short:s3cret-wb@127.0.0.1:{}", server.port()))
        .build()
        .await
        .expect("builds");
    let seq = save(&q, "ns", "k", "v").await;
    q.claim_due("ns", "a", 1, LEASE).await.unwrap();
    let err = q.retry("ns", "a", "k", seq, NOW, "boom", 1, false).await.expect_err("XADD denied");
    assert!(err.to_string().contains("xadd"), "{err}");
    assert_eq!(q.dead_letters("ns", 10).await.unwrap().len(), 0, "nothing changed");
}
