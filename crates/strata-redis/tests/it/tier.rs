//! The Redis tier on its own: the conformance suite, batched lookups,
//! undecodable entries, timeouts, restarts and configuration errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata::Cache;
use strata::breaker::{BreakerConfig, BreakerState};
use strata::error::ErrorKind;
use strata::tier::{FillOutcome, Tier};
use strata_redis::RedisTier;
use strata_testkit::{FaultProxy, RedisServer};

use crate::support::{LEASE, TTL, fresh, hit_value, is_miss, now, raw_conn, redis_tier, token, write_entry};
use strata::testing::conformance;

mod busy;
mod commands;
mod eviction;
mod plain_gate;
mod poison;
mod replication;
mod tag_pruning;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_conformance_redis() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "conf").await;
    conformance::run(&tier, "redis").await;
    let ops = tier.ops();
    eprintln!("[conformance] redis: {ops} redis ops, stats {:?}", tier.stats());
    assert_eq!(tier.stats().undecodable, 0);
    // Namespaces with separators cannot collide, and prefixes isolate tenants.
    let other = redis_tier(&server, "tenant2").await;
    assert!(is_miss(&other.lookup("conf", "plain", None).await.unwrap()));
    let t = token(&tier.lookup("a:e:b", "m", None).await.unwrap());
    tier.fill("a:e:b", "m", fresh("weird", &[]), TTL, &t).await.unwrap();
    assert!(is_miss(&tier.lookup("a", "b:m", None).await.unwrap()));
    assert_eq!(tier.entry_key("a:e:b", "m"), "conf:{a%3Ae%3Ab}:e:m");
}

/// A server that evicts under memory pressure is named at build time, with what it
/// puts at risk; `Refuse` makes that an error, and a server that does not evict passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_build_checks_the_eviction_policy() {
    use strata_redis::EvictionCheck;
    let build = |url: String, check| async move {
        RedisTier::builder(url).prefix("ev").eviction_check(check).build().await
    };
    for (policy, risk) in [("allkeys-lru", "meta hash"), ("volatile-lru", "write-lock")] {
        let server = RedisServer::builder().arg("maxmemory", "3mb").arg("maxmemory-policy", policy).start();
        let err = build(server.url(), EvictionCheck::Refuse).await.expect_err(policy);
        let msg = err.to_string();
        assert!(msg.contains(policy) && msg.contains(risk) && msg.contains("noeviction"), "{msg}");
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        build(server.url(), EvictionCheck::Warn).await.expect("warns, builds");
        build(server.url(), EvictionCheck::Skip).await.expect("does not look");
    }
    let server = RedisServer::builder().arg("maxmemory", "3mb").arg("maxmemory-policy", "noeviction").start();
    build(server.url(), EvictionCheck::Refuse).await.expect("noeviction keeps every promise");
    let server = RedisServer::start();
    build(server.url(), EvictionCheck::Refuse).await.expect("no maxmemory: nothing evicted");
}

/// The warm-up ranking is a hint: a key of another type at its name reads as empty
/// and is replaced by the next report; it expires when nobody reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_hot_key_ranking_survives_garbage_and_expires() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "hot").await;
    let mut conn = raw_conn(&server).await;
    let name = "hot:{ns}:hot";
    let _: () = redis::cmd("SET").arg(name).arg("garbage").query_async(&mut conn).await.unwrap();
    assert!(tier.hot_keys("ns", 10).await.expect("garbage reads as empty").is_empty());
    tier.record_hot_keys("ns", &[("k1".to_owned(), 3)], 10).await.expect("garbage replaced");
    assert_eq!(tier.hot_keys("ns", 10).await.unwrap(), ["k1"]);
    let ttl: i64 = redis::cmd("PTTL").arg(name).query_async(&mut conn).await.unwrap();
    assert!(ttl > 0, "the ranking expires: {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_lookup_many_in_two_round_trips_at_most() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "many").await;
    let keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
    // Stored without lookups: lookups that miss would make the tier skip its plain
    // read for a while (`tier::plain_gate`).
    for k in keys.iter().step_by(2) {
        tier.set("m", k, fresh(k, &[]), TTL).await.unwrap();
    }
    let before = tier.ops();
    let started = Instant::now();
    let out = tier.lookup_many("m", &keys, LEASE).await.unwrap();
    let took = started.elapsed();
    assert_eq!(tier.ops() - before, 2, "one plain read and one script run for the batch");
    for (i, (k, l)) in keys.iter().zip(&out).enumerate() {
        if i % 2 == 0 {
            assert_eq!(hit_value(l).as_deref(), Some(k.as_str()));
        } else {
            let t = token(l);
            assert!(t.leader && t.lease.is_some());
        }
    }
    let again = tier.lookup_many("m", &keys[1..3], LEASE).await.unwrap();
    assert!(!token(&again[0]).leader, "leases taken by the batch hold");
    assert!(tier.lookup_many("m", &[], None).await.unwrap().is_empty());
    eprintln!("[lookup_many] 50 keys (25 hits, 25 leased misses) in {took:?}, 2 redis ops");
    // Hits alone: after 26 misses in 52 keys the tier skips its plain read (see
    // `tier::plain_gate`), so the script answers this batch; its 25 hits reopen the
    // plain read, which answers the next with no script.
    let scripts = || evalsha_calls(&server);
    let hits: Vec<String> = keys.iter().step_by(2).cloned().collect();
    for want in [(1, 1), (1, 0)] {
        let (ops, calls) = (tier.ops(), scripts());
        let out = tier.lookup_many("m", &hits, LEASE).await.unwrap();
        assert!(hits.iter().zip(&out).all(|(k, l)| hit_value(l).as_deref() == Some(k.as_str())));
        assert_eq!(
            (tier.ops() - ops, scripts() - calls),
            want,
            "one round trip: the script, then the plain read"
        );
    }
}

/// Where entries are tagged the plain read never answers: after 64 such reads the tier
/// stops paying its round trip but for one lookup in 16.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_tagged_data_stops_paying_for_plain_reads() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "tagged").await;
    let keys: Vec<String> = (0..96).map(|i| format!("k{i}")).collect();
    for k in &keys {
        tier.set("t", k, fresh(k, &["tg"]), TTL).await.unwrap();
    }
    let mut trips = Vec::new();
    for k in &keys {
        let ops = tier.ops();
        assert_eq!(hit_value(&tier.lookup("t", k, None).await.unwrap()).as_deref(), Some(k.as_str()));
        trips.push(tier.ops() - ops);
    }
    assert!(trips[..64].iter().all(|&n| n == 2), "{trips:?}");
    assert_eq!(trips[64..].iter().sum::<u64>(), 32 + 2, "one probe in 16: {trips:?}");
}

/// How many `EVALSHA` the server has run.
fn evalsha_calls(server: &RedisServer) -> u64 {
    let info = server.command(&["INFO", "commandstats"]).expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|v| v.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// The plain read serves what the lookup script would, and nothing it would not: an
/// entry a tag or the namespace invalidated, a soft-expired one (a miss carrying it as
/// stale), a tagged one (the script checks its tags), one whose meta hash is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_plain_reads_answer_only_fresh_valid_hits() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "plain").await;
    let fill = |key: &'static str, tags: &'static [&'static str]| {
        let tier = tier.clone();
        async move {
            let t = token(&tier.lookup("p", key, None).await.unwrap());
            assert_eq!(tier.fill("p", key, fresh(key, tags), TTL, &t).await.unwrap(), FillOutcome::Stored);
        }
    };
    fill("a", &[]).await;
    fill("b", &["tg"]).await;
    let calls = evalsha_calls(&server);
    assert_eq!(hit_value(&tier.lookup("p", "a", None).await.unwrap()).as_deref(), Some("a"));
    assert_eq!(evalsha_calls(&server), calls, "an untagged fresh hit runs no script");
    assert_eq!(hit_value(&tier.lookup("p", "b", None).await.unwrap()).as_deref(), Some("b"));
    assert_eq!(evalsha_calls(&server), calls + 1, "a tagged one is checked by the script");
    tier.invalidate_tag("p", "tg").await.unwrap();
    assert!(is_miss(&tier.lookup("p", "b", None).await.unwrap()));
    assert_eq!(hit_value(&tier.lookup("p", "a", None).await.unwrap()).as_deref(), Some("a"));
    tier.invalidate_namespace("p").await.unwrap();
    assert!(is_miss(&tier.lookup("p", "a", None).await.unwrap()), "the namespace epoch holds");
    // A lost meta hash: the entry's stamp is from a clock that is gone.
    fill("c", &[]).await;
    let mut conn = raw_conn(&server).await;
    let _: () = redis::cmd("DEL").arg("plain:{p}:m").query_async(&mut conn).await.unwrap();
    assert!(is_miss(&tier.lookup("p", "c", None).await.unwrap()), "a lost meta hash makes it cold");
    // Soft-expired: a miss that carries the entry.
    let t = token(&tier.lookup("p", "d", None).await.unwrap());
    let mut env = fresh("d", &[]);
    env.soft_expiry = now();
    tier.fill("p", "d", env, TTL, &t).await.unwrap();
    match tier.lookup("p", "d", None).await.unwrap() {
        strata::tier::Lookup::Miss { stale: Some(s), .. } => assert!(s.value.is_some()),
        other => panic!("a miss with the stale entry: {other:?}"),
    }
    // An entry of the wrong type: the server's error sends it to the script, which drops it.
    let _: () =
        redis::cmd("HSET").arg("plain:{p}:e:x").arg("z").arg("1").query_async(&mut conn).await.unwrap();
    assert!(is_miss(&tier.lookup("p", "x", None).await.unwrap()));
}

/// Entry fields with stamp `s`, expiries `far`, envelope `e` and tags `t`.
fn entry(s: u64, far: &str, e: Vec<u8>, t: Vec<u8>) -> Vec<(String, Vec<u8>)> {
    let f = |n: &str, v: &[u8]| (n.to_owned(), v.to_vec());
    vec![
        f("s", s.to_string().as_bytes()),
        f("f", far.as_bytes()),
        f("h", far.as_bytes()),
        f("t", &t),
        f("e", &e),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_undecodable_entries_are_deleted_misses() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "bad").await;
    let mut raw = raw_conn(&server).await;
    let far = now().saturating_add(Duration::from_secs(3600)).0.to_string();
    // A current stamp, so that the garbage is valid as far as the clock goes.
    let stamp = token(&tier.lookup("ns", "probe", None).await.unwrap()).stamp;

    // 1. a hash whose envelope has a bad format byte
    let k1 = tier.entry_key("ns", "fmt");
    write_entry(&mut raw, &k1, &entry(stamp, &far, b"\x09garbage"[..].to_vec(), "".as_bytes().to_vec()))
        .await;
    // 2. the right format byte but bad postcard
    let k2 = tier.entry_key("ns", "postcard");
    write_entry(
        &mut raw,
        &k2,
        &entry(stamp, &far, b"\x01\xff\xff\xff\xff\xff"[..].to_vec(), "".as_bytes().to_vec()),
    )
    .await;
    // 3. not a hash at all
    let k3 = tier.entry_key("ns", "string");
    let _: () = redis::cmd("SET").arg(&k3).arg("garbage").query_async(&mut raw).await.unwrap();
    // 4. a hash with an unparsable tags field
    let k4 = tier.entry_key("ns", "tags");
    write_entry(&mut raw, &k4, &entry(stamp, &far, "x".as_bytes().to_vec(), "99:short".as_bytes().to_vec()))
        .await;

    for key in ["fmt", "postcard", "string", "tags"] {
        let l = tier.lookup("ns", key, LEASE).await.expect("an undecodable entry is a miss, not an error");
        let t = token(&l);
        assert!(t.leader && t.lease.is_some(), "{key}: the miss gets a lease");
    }
    for k in [&k1, &k2, &k3, &k4] {
        let exists: u64 = redis::cmd("EXISTS").arg(k).query_async(&mut raw).await.unwrap();
        assert_eq!(exists, 0, "{k} deleted");
    }
    assert_eq!(tier.stats().undecodable, 4);
    // In a batch, too.
    let _: () = redis::cmd("SET").arg(&k3).arg("garbage").query_async(&mut raw).await.unwrap();
    let out = tier.lookup_many("ns", &["string".to_owned(), "none".to_owned()], None).await.unwrap();
    assert!(out.iter().all(is_miss));
    assert_eq!(tier.stats().undecodable, 5);
    // touch of garbage is false, not an error
    let _: () = redis::cmd("SET").arg(&k3).arg("garbage").query_async(&mut raw).await.unwrap();
    assert!(!tier.touch("ns", "string", now(), TTL).await.unwrap());
    assert_eq!(tier.stats().undecodable, 6);
    eprintln!("[undecodable] stats after 6 garbage entries: {:?}", tier.stats());
}

/// The tier has no breaker of its own: against a SIGSTOPped server its calls end with
/// `Timeout` after its response timeout, and a cache over it opens its L2 breaker (the
/// core's), having abandoned each call at its shorter `l2_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_timeout_on_paused_server_opens_core_breaker() {
    let mut server = RedisServer::start();
    let op_timeout = Duration::from_millis(100);
    let l2_timeout = Duration::from_millis(50);
    let tier = RedisTier::builder(server.url()).prefix("pause").op_timeout(op_timeout).build().await.unwrap();
    tier.lookup("ns", "warm", None).await.unwrap();
    let cache: Cache<u64, String> = Cache::builder("ns")
        .tier(Arc::new(tier.clone()))
        .l2_timeout(l2_timeout)
        .breaker(BreakerConfig {
            consecutive_failures: 3,
            open_for: Duration::from_millis(300),
            jitter: 0.0,
            ..BreakerConfig::default()
        })
        .build()
        .unwrap();
    assert_eq!(cache.get(&1).await.unwrap(), None);
    assert_eq!(cache.l2_breaker_state(), BreakerState::Closed);

    server.pause().unwrap();
    let mut timings = Vec::new();
    let mut through_cache = Vec::new();
    let result = async {
        for _ in 0..3 {
            let started = Instant::now();
            let err = tier.lookup("ns", "k", None).await.expect_err("paused server must time out");
            let took = started.elapsed();
            timings.push(took);
            assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
            assert!(took < op_timeout + Duration::from_millis(150), "timeout took {took:?}");
        }
        // Through the cache an L2 failure is an error (never "absent"), answered at the
        // l2_timeout.
        for k in 0..3 {
            let started = Instant::now();
            let err = cache.get(&k).await.expect_err("l2 cannot answer");
            assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
            let took = started.elapsed();
            through_cache.push(took);
            assert!(took < l2_timeout + Duration::from_millis(150), "cache read took {took:?}");
        }
        assert_eq!(cache.l2_breaker_state(), BreakerState::Open);
        let started = Instant::now();
        assert!(cache.get(&9).await.expect_err("breaker open").is_circuit_open());
        started.elapsed()
    }
    .await;
    let paused_stats = tier.stats();
    server.resume().unwrap();
    eprintln!(
        "[timeout] response timeout {op_timeout:?}: tier calls to the paused server failed after {timings:?}; \
         through a cache (l2_timeout {l2_timeout:?}) {through_cache:?}; the cache's open breaker answered \
         in {result:?}; tier stats {paused_stats:?}"
    );
    assert!(paused_stats.timeouts >= 6, "calls the cache abandoned count as timeouts: {paused_stats:?}");
    assert!(paused_stats.reconnects >= 1, "and towards replacing the connection: {paused_stats:?}");

    // After the cool-down a probe closes the cache's breaker again.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let recovered = async {
        loop {
            if tier.lookup("ns", "k", None).await.is_ok() {
                let _ = cache.get(&1).await;
                if cache.l2_breaker_state() == BreakerState::Closed {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), recovered)
        .await
        .expect("tier and cache recover after resume");
    eprintln!("[timeout] recovered {:?} after the cool-down; stats {:?}", started.elapsed(), tier.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_survives_server_restart_and_reconnects() {
    let mut server = RedisServer::start();
    let tier = RedisTier::builder(server.url())
        .prefix("restart")
        .op_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    tier.lookup("ns", "k", None).await.unwrap();
    server.kill();
    let err = tier.lookup("ns", "k", None).await.expect_err("server is dead");
    assert!(err.is_transient(), "{err}");
    server.restart();
    let started = Instant::now();
    let back = async {
        loop {
            if tier.lookup("ns", "k", None).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), back).await.expect("reconnects after restart");
    eprintln!("[restart] tier answered again {:?} after the restart", started.elapsed());

    // The restarted server lost every clock. A fill whose lookup happened before the
    // restart must still lose against an invalidation made after it.
    let before = token(&tier.lookup("ns", "race", None).await.unwrap());
    server.kill();
    server.restart();
    let wait = async {
        loop {
            if tier.delete("ns", &["race".to_owned()]).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.expect("delete after restart");
    assert_eq!(
        tier.fill("ns", "race", fresh("loaded before the restart", &[]), TTL, &before).await.unwrap(),
        FillOutcome::Rejected,
        "a token from before the data loss must not beat a later delete"
    );
    // Same after FLUSHALL, without any invalidation: the namespace is cold, not stale.
    let t = token(&tier.lookup("ns", "k2", None).await.unwrap());
    tier.fill("ns", "k2", fresh("v", &[]), TTL, &t).await.unwrap();
    let old = token(&tier.lookup("ns", "k3", None).await.unwrap());
    server.command(&["FLUSHALL"]).unwrap();
    let after = token(&tier.lookup("ns", "k3", None).await.unwrap());
    assert!(after.stamp > old.stamp, "a new clock starts above old stamps: {} vs {}", after.stamp, old.stamp);
    assert_eq!(tier.fill("ns", "k3", fresh("x", &[]), TTL, &old).await.unwrap(), FillOutcome::Rejected);
    assert_eq!(tier.fill("ns", "k3", fresh("y", &[]), TTL, &after).await.unwrap(), FillOutcome::Stored);
    eprintln!("[restart] clock before flush {} → after {} (µs-based)", old.stamp, after.stamp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_builder_rejects_bad_config_with_fixes() {
    let server = RedisServer::start();
    let e = RedisTier::builder("http://localhost:1").build().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("redis://"), "{e}");
    let e = RedisTier::builder(server.url()).prefix("a{b}").build().await.unwrap_err();
    assert!(e.to_string().contains("prefix"), "{e}");
    let e = RedisTier::builder(server.url()).op_timeout(Duration::ZERO).build().await.unwrap_err();
    assert!(e.to_string().contains("op_timeout"), "{e}");
    // Nothing listens on this port (a server we start and stop).
    let mut gone = RedisServer::start();
    let url = gone.url();
    gone.kill();
    let e = RedisTier::builder(&url).build().await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    eprintln!("[config] unreachable server: {e}");
    assert!(RedisTier::builder(&url).lazy(true).build().await.is_ok(), "lazy build does not connect");

    // ACL users from the URL.
    server.command(&["ACL", "SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all"]).unwrap();
    let with_user = format!("redis://app:s3cret@127.0.0.1:{}", server.port());
    let tier = RedisTier::builder(&with_user).prefix("acl").build().await.expect("ACL user works");
    tier.lookup("ns", "k", None).await.unwrap();
    let wrong = format!("redis://app:nope@127.0.0.1:{}", server.port());
    let e = RedisTier::builder(&wrong).build().await.unwrap_err();
    let text = e.to_string();
    assert!(!text.contains("nope"), "password must not leak: {text}");
    eprintln!("[config] wrong password: {text}");
}

/// One owner of the L2 call's timeout: the cache's `l2_timeout`. With the tier at its
/// defaults and Redis 120 ms away (a slow link, through the fault proxy), a cache that
/// allows 400 ms per L2 call gets its answers; before, the tier's own 50 ms operation
/// timeout (and breaker) failed every call first, whatever the cache allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caches_l2_timeout_is_the_one_that_bounds_an_l2_call() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.addr()).await.unwrap();
    let url = format!("redis://127.0.0.1:{}", proxy.port());
    let tier = RedisTier::builder(&url).prefix("owner").build().await.unwrap();
    let cache: Cache<u64, String> = Cache::builder("ns")
        .tier(Arc::new(tier.clone()))
        .l2_timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    cache.insert(1, "one".to_owned()).await.unwrap();
    cache.evict_local(&1);
    proxy.set_latency(Duration::from_millis(60), Duration::ZERO);
    for _ in 0..5 {
        assert_eq!(
            cache.get(&1).await.expect("answered within the cache's l2_timeout").as_deref(),
            Some("one")
        );
        cache.evict_local(&1);
    }
    assert_eq!(cache.l2_breaker_state(), BreakerState::Closed);
    assert_eq!(tier.stats().timeouts, 0, "{:?}", tier.stats());
    assert_eq!(cache.stats().l2_errors, 0);
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct PaymentV1 {
    amount: u64,
    fee: u64,
    status: StatusV1,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
enum StatusV1 {
    Pending,
    Completed,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct PaymentV2 {
    fee: u64,
    amount: u64,
    status: StatusV2,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
enum StatusV2 {
    Pending,
    Refunded,
    Completed,
}

fn row_v1(k: u64) -> PaymentV1 {
    PaymentV1 { amount: 10_000 + k, fee: 30 + k, status: StatusV1::Completed }
}

fn row_v2(k: u64) -> PaymentV2 {
    PaymentV2 { fee: 30 + k, amount: 10_000 + k, status: StatusV2::Completed }
}

/// Two deploys of one namespace on one Redis whose value types differ (two fields
/// swapped, an enum variant inserted): each reads its own entries or misses (counted),
/// never the other's as its own, and its fills replace the other's entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_builds_with_different_value_types_never_read_each_others_entries() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "deploy").await;
    let v1: Cache<u64, PaymentV1> = Cache::builder("payment").tier(Arc::new(tier.clone())).build().unwrap();
    let v2: Cache<u64, PaymentV2> = Cache::builder("payment").tier(Arc::new(tier.clone())).build().unwrap();
    let load_v1 = |k: u64| move || async move { Ok::<_, std::io::Error>(Some(row_v1(k))) };
    let load_v2 = |k: u64| move || async move { Ok::<_, std::io::Error>(Some(row_v2(k))) };

    v1.get_or_load(&1, load_v1(1)).await.unwrap();
    assert_eq!(v2.get(&1).await.unwrap(), None, "V1's bytes are never decoded as V2");
    assert_eq!(v2.get_or_load(&1, load_v2(1)).await.unwrap(), Some(row_v2(1)));
    let s2 = v2.stats();
    assert_eq!((s2.l2_schema_mismatches, s2.l2_hits, s2.loads), (2, 0, 1), "{s2:?}");
    v1.evict_local(&1);
    assert_eq!(v1.get(&1).await.unwrap(), None, "V2's fill replaced V1's entry, and is a miss to V1");
    assert_eq!(v1.stats().l2_schema_mismatches, 1);

    // Side by side, every read from L2.
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..300 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let k = rng % 6;
        if (rng >> 8).is_multiple_of(2) {
            v1.evict_local(&k);
            assert_eq!(v1.get_or_load(&k, load_v1(k)).await.unwrap(), Some(row_v1(k)));
        } else {
            v2.evict_local(&k);
            assert_eq!(v2.get_or_load(&k, load_v2(k)).await.unwrap(), Some(row_v2(k)));
        }
    }
    let (s1, s2) = (v1.stats(), v2.stats());
    eprintln!("[schema] side by side on redis: v1 {s1:?}\nv2 {s2:?}");
    for s in [&s1, &s2] {
        assert!(s.l2_hits > 0 && s.l2_schema_mismatches > 1, "{s:?}");
        assert_eq!(s.l2_undecodable, 0);
    }
    assert_eq!(tier.stats().undecodable, 0, "no entry of either build is undecodable");
}

/// The least-privilege ACL the crate docs give: the tier's conformance suite, the
/// warm-up ranking and a stream backplane round trip all run under it, and a command
/// it lacks fails with an error that names the permission.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_acl_user_runs_the_tier_and_the_stream_backplane() {
    let server = RedisServer::start();
    let mut rule =
        vec!["ACL", "SETUSER", "strata", "on", ">s3cret-acl", "resetkeys", "resetchannels", "-@all"];
    rule.extend(strata_redis::MINIMAL_ACL.split_whitespace());
    server.command(&rule).expect("ACL SETUSER");
    let url = format!("redis://strata:s3cret-acl@127.0.0.1:{}", server.port());
    let tier = RedisTier::builder(&url).build().await.expect("the tier builds under the minimal ACL");
    conformance::run(&tier, "redis under the minimal ACL").await;
    tier.record_hot_keys("ns", &[("k".to_owned(), 1)], 10).await.expect("ranking");
    assert_eq!(tier.hot_keys("ns", 10).await.expect("ranking"), ["k"]);

    let bp = strata_redis::RedisStreamBackplane::builder(&url).build().await.expect("backplane builds");
    let mut sub = strata::backplane::Backplane::subscribe(&bp).await.expect("subscribe");
    strata::backplane::Backplane::publish(&bp, &crate::support::msg(1, 1, "k")).await.expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let ev = sub.recv().await.expect("event");
            if let Some(m) = crate::support::message_of(&ev) {
                return m.clone();
            }
        }
    })
    .await
    .expect("delivered");
    assert_eq!(got.seq, 1);

    // A rule missing a command the scripts use: the call fails naming it, it does not
    // read as a miss (the entry read runs through pcall, which would swallow it).
    let mut short =
        vec!["ACL", "SETUSER", "short", "on", ">s3cret-acl", "resetkeys", "resetchannels", "-@all"];
    short.extend(strata_redis::MINIMAL_ACL.split_whitespace().filter(|c| *c != "+getrange"));
    server.command(&short).expect("ACL SETUSER");
    let short_url = format!("redis://short:s3cret-acl@127.0.0.1:{}", server.port());
    let short_tier = RedisTier::builder(&short_url).build().await.expect("builds");
    let err = short_tier.lookup("conf", "k1", None).await.expect_err("GETRANGE denied");
    assert!(err.to_string().to_lowercase().contains("getrange"), "{err}");

    // Outside the rule: a clear NOPERM naming the command.
    let user = redis::Client::open(url.as_str()).expect("client");
    let mut c = user.get_multiplexed_async_connection().await.expect("connect");
    let err = redis::cmd("FLUSHALL").query_async::<()>(&mut c).await.expect_err("not granted");
    assert!(err.to_string().contains("flushall"), "{err}");
}
