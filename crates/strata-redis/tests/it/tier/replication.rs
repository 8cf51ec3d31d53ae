//! What a failover can lose: the clock's last ticks (the promoted replica did not get
//! them) and invalidations the old master acknowledged but never replicated.

use std::time::{Duration, Instant};

use strata::tier::{FillOutcome, Tier};
use strata_redis::RedisTier;
use strata_testkit::RedisServer;

use crate::support::{TTL, fresh, key_of, raw_conn, redis_tier, token};

/// A replica promoted after its master died may lack the master's last clock ticks, so
/// its clock is behind stamps the old master handed out. An invalidation made after
/// the failover must still refuse a fill whose token predates it: the clock ticks to
/// the server's time, above every stamp handed out before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_after_a_clock_regression_refuses_older_tokens() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "regress").await;
    let ns = "ns";
    let _ = tier.lookup(ns, "k", None).await.unwrap();
    tier.delete(ns, &["z".to_owned()]).await.unwrap();
    let mut raw = raw_conn(&server).await;
    // What the replica will have: the meta hash and the tombstones as they are now (a
    // consistent, older copy).
    let hashes = [key_of(&tier, ns, "m"), key_of(&tier, ns, "x0"), key_of(&tier, ns, "x1")];
    let mut snapshot = Vec::new();
    for h in &hashes {
        let fields: Vec<(String, String)> = redis::cmd("HGETALL").arg(h).query_async(&mut raw).await.unwrap();
        snapshot.push(fields);
    }
    let c1: u64 = snapshot[0].iter().find(|(f, _)| f == "c").map(|(_, v)| v.parse().unwrap()).unwrap();
    // The old master ticks twice more (deletes of other keys), then hands out a token.
    tier.delete(ns, &["a".to_owned()]).await.unwrap();
    tier.delete(ns, &["b".to_owned()]).await.unwrap();
    let in_flight = token(&tier.lookup(ns, "k", None).await.unwrap());
    assert!(in_flight.stamp > c1);
    // Failover: the promoted replica has the copies of before those ticks.
    let mut restore = redis::pipe();
    for (h, fields) in hashes.iter().zip(&snapshot) {
        restore.cmd("DEL").arg(h).ignore();
        for (f, v) in fields {
            restore.cmd("HSET").arg(h).arg(f).arg(v).ignore();
        }
    }
    let _: () = restore.query_async(&mut raw).await.unwrap();
    // The write's invalidation lands on the new master, then the late fill arrives.
    tier.delete(ns, &["k".to_owned()]).await.unwrap();
    // Other writes go on: the new master's clock passes the token's stamp again.
    for other in ["c", "d", "e"] {
        tier.delete(ns, &[other.to_owned()]).await.unwrap();
    }
    let late = tier.fill(ns, "k", fresh("old row", &[]), TTL, &in_flight).await.unwrap();
    assert_eq!(late, FillOutcome::Rejected, "a fill from before the invalidation");
    assert_eq!(tier.stats().repaired, 0, "refused by the tombstone, not by a rebuilt meta hash");
}

/// `wait_for_replicas`: an invalidation is acknowledged once a replica has it; with the
/// replica frozen, it fails (and a cache would retry it) instead of being acknowledged
/// by a master whose failover would lose it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_for_replicas_an_unreplicated_invalidation_fails() {
    let master = RedisServer::start();
    let mut replica = RedisServer::builder().arg("replicaof", format!("127.0.0.1 {}", master.port())).start();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = master.command(&["INFO", "replication"]).unwrap();
        if info.contains("connected_slaves:1") && info.contains("state=online") {
            break;
        }
        assert!(Instant::now() < deadline, "the replica never synced: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let tier = RedisTier::builder(master.url())
        .prefix("waited")
        .op_timeout(Duration::from_secs(2))
        // Generous: 2 busy cores; the frozen replica case waits all of it.
        .wait_for_replicas(1, Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let t = token(&tier.lookup("ns", "k", None).await.unwrap());
    assert_eq!(tier.fill("ns", "k", fresh("v1", &[]), TTL, &t).await.unwrap(), FillOutcome::Stored);
    tier.delete("ns", &["k".to_owned()]).await.expect("replicated in time");
    tier.invalidate_tag("ns", "t").await.expect("replicated in time");

    replica.pause().unwrap();
    let err = tier.delete("ns", &["k".to_owned()]).await.expect_err("no replica acknowledged it");
    replica.resume().unwrap();
    assert!(err.is_transient(), "{err}");
    assert!(
        format!("{err:#}").contains("not replicated") || format!("{err:?}").contains("not replicated"),
        "{err:?}"
    );
    let err = RedisTier::builder(master.url()).wait_for_replicas(0, Duration::from_millis(10)).build().await;
    assert!(err.is_err(), "0 replicas is refused at build");
}
