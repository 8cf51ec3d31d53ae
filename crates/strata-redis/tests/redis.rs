//! Integration tests of strata-redis against real `redis-server` processes started by
//! strata-testkit (never the machine's own Redis on 6379). A missing `redis-server`
//! fails the tests loudly (testkit panics with instructions).
//!
//! Every wait is bounded with `tokio::time::timeout`; measured figures are printed with
//! `eprintln!` (run with `--nocapture` to see them).

// Helpers shared by the tests (not `#[test]` fns themselves) unwrap too.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use strata::backplane::{Backplane, BackplaneEvent, Message, MessageBody, Subscription};
use strata::breaker::{BreakerConfig, BreakerState};
use strata::clock::{Clock, SystemClock, Timestamp};
use strata::error::ErrorKind;
use strata::tier::{Envelope, FillOutcome, FillToken, InProcessTier, Lookup, Tier};
use strata_redis::{RedisPubSubBackplane, RedisStreamBackplane, RedisTier};
use strata_testkit::{Direction, FaultProxy, RedisServer};

// ---------------------------------------------------------------------------------
// helpers

fn now() -> Timestamp {
    SystemClock::default().now()
}

fn envelope(value: &str, tags: &[&str], soft_in: Duration, hard_in: Duration) -> Envelope {
    let t = now();
    Envelope {
        value: Some(Bytes::copy_from_slice(value.as_bytes())),
        version: Some(7),
        created: t,
        soft_expiry: t.saturating_add(soft_in),
        hard_expiry: t.saturating_add(hard_in),
        stamp: 0,
        tags: tags.iter().map(|s| (*s).to_owned()).collect(),
        load_nanos: 1234,
    }
}

fn fresh(value: &str, tags: &[&str]) -> Envelope {
    envelope(value, tags, Duration::from_secs(60), Duration::from_secs(120))
}

const TTL: Duration = Duration::from_secs(60);
const LEASE: Option<Duration> = Some(Duration::from_secs(5));

fn token(l: &Lookup) -> FillToken {
    match l {
        Lookup::Miss { token, .. } => token.clone(),
        Lookup::Hit(e) => panic!("expected a miss, got a hit {e:?}"),
    }
}

fn hit_value(l: &Lookup) -> Option<String> {
    match l {
        Lookup::Hit(e) => e.value.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
        Lookup::Miss { .. } => None,
    }
}

fn is_miss(l: &Lookup) -> bool {
    matches!(l, Lookup::Miss { .. })
}

async fn redis_tier(server: &RedisServer, prefix: &str) -> RedisTier {
    RedisTier::builder(server.url())
        .prefix(prefix)
        // Generous: the suite runs on 2 busy cores; timeouts are tested separately.
        .op_timeout(Duration::from_millis(2000))
        .build()
        .await
        .expect("build redis tier")
}

async fn raw_conn(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

async fn next_event(sub: &mut Subscription, within: Duration) -> BackplaneEvent {
    match tokio::time::timeout(within, sub.recv()).await {
        Ok(Some(ev)) => ev,
        Ok(None) => panic!("subscription closed"),
        Err(_) => panic!("no backplane event within {within:?}"),
    }
}

/// Waits for an event matching `pred`, returning it and the events skipped before it.
async fn wait_for(
    sub: &mut Subscription,
    within: Duration,
    what: &str,
    pred: impl Fn(&BackplaneEvent) -> bool,
) -> (BackplaneEvent, Vec<BackplaneEvent>) {
    let deadline = tokio::time::Instant::now() + within;
    let mut skipped = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, sub.recv()).await {
            Ok(Some(ev)) if pred(&ev) => return (ev, skipped),
            Ok(Some(ev)) => skipped.push(ev),
            Ok(None) => panic!("subscription closed while waiting for {what}; saw {skipped:?}"),
            Err(_) => panic!("no {what} within {within:?}; saw {skipped:?}"),
        }
    }
}

fn msg(origin: u64, seq: u64, key: &str) -> Message {
    Message { origin, seq, namespace: "ns".into(), body: MessageBody::Keys(vec![key.to_owned()]) }
}

fn message_of(ev: &BackplaneEvent) -> Option<&Message> {
    match ev {
        BackplaneEvent::Message(m) => Some(m),
        _ => None,
    }
}

/// `(id, name)` of each client in `CLIENT LIST` whose name starts with `prefix`.
fn clients_named(server: &RedisServer, prefix: &str) -> Vec<(String, String)> {
    let list = server.command(&["CLIENT", "LIST"]).expect("CLIENT LIST");
    let mut out = Vec::new();
    for line in list.lines() {
        let mut id = None;
        let mut name = None;
        for field in line.split_whitespace() {
            if let Some(v) = field.strip_prefix("id=") {
                id = Some(v.trim_start_matches(|c: char| !c.is_ascii_digit()).to_owned());
            }
            if let Some(v) = field.strip_prefix("name=") {
                name = Some(v.to_owned());
            }
        }
        if let (Some(id), Some(name)) = (id, name)
            && name.starts_with(prefix)
        {
            out.push((id, name));
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// tier conformance: the same scenario on the in-process tier and on Redis

async fn conformance(tier: &dyn Tier, label: &str) {
    let started = Instant::now();

    // Miss without lease: leader, no lease.
    let l = tier.lookup("conf", "plain", None).await.unwrap();
    let t = token(&l);
    assert!(t.leader && t.lease.is_none(), "{label}: plain miss {t:?}");

    // Lease granted once; a second lookup is not the leader.
    let first = token(&tier.lookup("conf", "k1", LEASE).await.unwrap());
    assert!(first.leader && first.lease.is_some(), "{label}: first lease {first:?}");
    let second = token(&tier.lookup("conf", "k1", LEASE).await.unwrap());
    assert!(!second.leader && second.lease.is_none(), "{label}: second lookup must wait {second:?}");

    // The leader's fill is stored and read back with the token's stamp.
    assert_eq!(tier.fill("conf", "k1", fresh("v1", &[]), TTL, &first).await.unwrap(), FillOutcome::Stored);
    match tier.lookup("conf", "k1", LEASE).await.unwrap() {
        Lookup::Hit(e) => {
            assert_eq!(e.value.as_deref(), Some(&b"v1"[..]), "{label}");
            assert_eq!(e.stamp, first.stamp, "{label}: entry stamped with the token's stamp");
            assert_eq!(e.version, Some(7));
            assert_eq!(e.load_nanos, 1234);
        }
        other => panic!("{label}: expected a hit, got {other:?}"),
    }

    // Fill after delete is rejected (tombstone), and the delete removed the entry.
    let t = token(&tier.lookup("conf", "k2", None).await.unwrap());
    tier.delete("conf", &["k2".to_owned()]).await.unwrap();
    assert_eq!(
        tier.fill("conf", "k2", fresh("old", &[]), TTL, &t).await.unwrap(),
        FillOutcome::Rejected,
        "{label}: fill after delete"
    );
    assert!(is_miss(&tier.lookup("conf", "k2", None).await.unwrap()), "{label}");
    // A delete of another key does not reject this key's fill.
    let t = token(&tier.lookup("conf", "k3", None).await.unwrap());
    tier.delete("conf", &["other".to_owned()]).await.unwrap();
    assert_eq!(tier.fill("conf", "k3", fresh("v3", &[]), TTL, &t).await.unwrap(), FillOutcome::Stored);
    // A delete removes a stored entry and voids nothing else.
    tier.delete("conf", &["k3".to_owned(), "k1".to_owned()]).await.unwrap();
    assert!(is_miss(&tier.lookup("conf", "k3", None).await.unwrap()), "{label}: deleted");
    // The delete also voided k1's lease (released already by the fill): a new leader.
    let t = token(&tier.lookup("conf", "k1", LEASE).await.unwrap());
    assert!(t.leader && t.lease.is_some(), "{label}: lease after delete {t:?}");

    // Tag invalidation hides entries carrying the tag, and rejects older fills.
    let ta = token(&tier.lookup("tags", "a", None).await.unwrap());
    let tb = token(&tier.lookup("tags", "b", None).await.unwrap());
    assert_eq!(
        tier.fill("tags", "a", fresh("a", &["red", "x"]), TTL, &ta).await.unwrap(),
        FillOutcome::Stored
    );
    let t_late = token(&tier.lookup("tags", "c", None).await.unwrap());
    tier.invalidate_tag("tags", "red").await.unwrap();
    assert!(is_miss(&tier.lookup("tags", "a", None).await.unwrap()), "{label}: tagged entry hidden");
    assert_eq!(
        tier.fill("tags", "c", fresh("c", &["red"]), TTL, &t_late).await.unwrap(),
        FillOutcome::Rejected,
        "{label}: fill that began before the tag invalidation"
    );
    // Untagged (or other-tag) fills from before are fine.
    assert_eq!(tier.fill("tags", "b", fresh("b", &["blue"]), TTL, &tb).await.unwrap(), FillOutcome::Stored);
    assert_eq!(hit_value(&tier.lookup("tags", "b", None).await.unwrap()).as_deref(), Some("b"));
    // A fill after the invalidation is stored and visible.
    let t = token(&tier.lookup("tags", "a", None).await.unwrap());
    assert_eq!(tier.fill("tags", "a", fresh("a2", &["red"]), TTL, &t).await.unwrap(), FillOutcome::Stored);
    assert_eq!(hit_value(&tier.lookup("tags", "a", None).await.unwrap()).as_deref(), Some("a2"));

    // Namespace invalidation hides everything, rejects older fills, voids leases, and
    // leaves other namespaces alone.
    let t_old = token(&tier.lookup("nsx", "p", None).await.unwrap());
    let t = token(&tier.lookup("nsx", "q", None).await.unwrap());
    assert_eq!(tier.fill("nsx", "q", fresh("q", &[]), TTL, &t).await.unwrap(), FillOutcome::Stored);
    let leased = token(&tier.lookup("nsx", "r", LEASE).await.unwrap());
    assert!(leased.leader);
    tier.invalidate_namespace("nsx").await.unwrap();
    assert!(is_miss(&tier.lookup("nsx", "q", None).await.unwrap()), "{label}: namespace hidden");
    assert_eq!(tier.fill("nsx", "p", fresh("p", &[]), TTL, &t_old).await.unwrap(), FillOutcome::Rejected);
    let t = token(&tier.lookup("nsx", "r", LEASE).await.unwrap());
    assert!(t.leader && t.lease.is_some(), "{label}: namespace invalidation voids leases {t:?}");
    assert_eq!(hit_value(&tier.lookup("tags", "b", None).await.unwrap()).as_deref(), Some("b"), "{label}");

    // Touch extends a live entry; touching a missing one says so.
    let t = token(&tier.lookup("touch", "s", None).await.unwrap());
    let short = Duration::from_millis(400);
    assert_eq!(
        tier.fill("touch", "s", envelope("s", &[], short, short), short, &t).await.unwrap(),
        FillOutcome::Stored
    );
    let new_soft = now().saturating_add(Duration::from_secs(30));
    assert!(tier.touch("touch", "s", new_soft, Duration::from_secs(30)).await.unwrap(), "{label}: touch");
    assert!(!tier.touch("touch", "missing", new_soft, TTL).await.unwrap(), "{label}: touch missing");
    tokio::time::sleep(Duration::from_millis(600)).await;
    match tier.lookup("touch", "s", None).await.unwrap() {
        Lookup::Hit(e) => {
            assert_eq!(e.soft_expiry, new_soft, "{label}: touched soft expiry");
            assert!(
                e.hard_expiry > now().saturating_add(Duration::from_secs(20)),
                "{label}: touched hard expiry"
            );
        }
        other => panic!("{label}: touched entry should live, got {other:?}"),
    }
    // Without a touch an entry dies with its TTL.
    let t = token(&tier.lookup("touch", "u", None).await.unwrap());
    tier.fill("touch", "u", envelope("u", &[], short, short), Duration::from_millis(150), &t).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(is_miss(&tier.lookup("touch", "u", None).await.unwrap()), "{label}: expired");
    // Touch does not revive an invalidated entry.
    let t = token(&tier.lookup("touch", "v", None).await.unwrap());
    tier.fill("touch", "v", fresh("v", &["gone"]), TTL, &t).await.unwrap();
    tier.invalidate_tag("touch", "gone").await.unwrap();
    assert!(!tier.touch("touch", "v", new_soft, TTL).await.unwrap(), "{label}: touch invalid");

    // set voids the lease, counts as an invalidation (older fills rejected) and is read.
    let leader = token(&tier.lookup("set", "k", LEASE).await.unwrap());
    assert!(leader.leader);
    tier.set("set", "k", fresh("explicit", &["s"]), TTL).await.unwrap();
    assert_eq!(hit_value(&tier.lookup("set", "k", LEASE).await.unwrap()).as_deref(), Some("explicit"));
    assert_eq!(
        tier.fill("set", "k", fresh("loaded-before", &[]), TTL, &leader).await.unwrap(),
        FillOutcome::Rejected,
        "{label}: a fill that began before set must not overwrite it"
    );
    assert_eq!(hit_value(&tier.lookup("set", "k", None).await.unwrap()).as_deref(), Some("explicit"));
    tier.invalidate_tag("set", "s").await.unwrap();
    let t = token(&tier.lookup("set", "k", LEASE).await.unwrap());
    assert!(t.leader && t.lease.is_some(), "{label}: set voided the lease {t:?}");

    // A fill releases its own lease.
    let t = token(&tier.lookup("rel", "k", LEASE).await.unwrap());
    tier.fill("rel", "k", fresh("x", &["t"]), TTL, &t).await.unwrap();
    tier.invalidate_tag("rel", "t").await.unwrap();
    let t2 = token(&tier.lookup("rel", "k", LEASE).await.unwrap());
    assert!(t2.leader && t2.lease.is_some(), "{label}: lease released by the fill {t2:?}");

    // Leases expire.
    let t = token(&tier.lookup("exp", "k", Some(Duration::from_millis(100))).await.unwrap());
    assert!(t.leader);
    assert!(!token(&tier.lookup("exp", "k", Some(Duration::from_millis(100))).await.unwrap()).leader);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        token(&tier.lookup("exp", "k", Some(Duration::from_millis(100))).await.unwrap()).leader,
        "{label}"
    );

    // Soft-expired but valid: a miss carrying the stale entry (fail-safe), with a lease.
    let t = token(&tier.lookup("stale", "k", None).await.unwrap());
    let env = envelope("old", &[], Duration::ZERO, Duration::from_secs(60));
    tier.fill("stale", "k", env, TTL, &t).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    match tier.lookup("stale", "k", LEASE).await.unwrap() {
        Lookup::Miss { token, stale: Some(e) } => {
            assert!(token.leader && token.lease.is_some(), "{label}");
            assert_eq!(e.value.as_deref(), Some(&b"old"[..]));
            assert_eq!(e.stamp, t.stamp);
        }
        other => panic!("{label}: expected a stale miss, got {other:?}"),
    }
    // Invalidated entries are not offered as stale.
    tier.delete("stale", &["k".to_owned()]).await.unwrap();
    match tier.lookup("stale", "k", None).await.unwrap() {
        Lookup::Miss { stale: None, .. } => {}
        other => panic!("{label}: deleted entry offered as stale: {other:?}"),
    }

    // A negative result (value None) round-trips.
    let t = token(&tier.lookup("neg", "k", None).await.unwrap());
    let mut env = fresh("", &[]);
    env.value = None;
    tier.fill("neg", "k", env, TTL, &t).await.unwrap();
    match tier.lookup("neg", "k", None).await.unwrap() {
        Lookup::Hit(e) => assert_eq!(e.value, None),
        other => panic!("{label}: negative entry {other:?}"),
    }

    eprintln!("[conformance] {label}: scenario passed in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_conformance_in_process_and_redis() {
    conformance(&InProcessTier::new(), "in-process").await;
    let server = RedisServer::start();
    let tier = redis_tier(&server, "conf").await;
    conformance(&tier, "redis").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_lookup_many_in_one_round_trip() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "many").await;
    let keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
    for k in keys.iter().step_by(2) {
        let t = token(&tier.lookup("m", k, None).await.unwrap());
        tier.fill("m", k, fresh(k, &[]), TTL, &t).await.unwrap();
    }
    let before = tier.ops();
    let started = Instant::now();
    let out = tier.lookup_many("m", &keys, LEASE).await.unwrap();
    let took = started.elapsed();
    assert_eq!(tier.ops() - before, 1, "one script run for the batch");
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
    eprintln!("[lookup_many] 50 keys (25 hits, 25 leased misses) in {took:?}, 1 redis op");
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
    let _: () = redis::cmd("HSET")
        .arg(&k1)
        .arg("e")
        .arg(&b"\x09garbage"[..])
        .arg("s")
        .arg(stamp)
        .arg("t")
        .arg("")
        .arg("f")
        .arg(&far)
        .arg("h")
        .arg(&far)
        .query_async(&mut raw)
        .await
        .unwrap();
    // 2. the right format byte but bad postcard
    let k2 = tier.entry_key("ns", "postcard");
    let _: () = redis::cmd("HSET")
        .arg(&k2)
        .arg("e")
        .arg(&b"\x01\xff\xff\xff\xff\xff"[..])
        .arg("s")
        .arg(stamp)
        .arg("t")
        .arg("")
        .arg("f")
        .arg(&far)
        .arg("h")
        .arg(&far)
        .query_async(&mut raw)
        .await
        .unwrap();
    // 3. not a hash at all
    let k3 = tier.entry_key("ns", "string");
    let _: () = redis::cmd("SET").arg(&k3).arg("garbage").query_async(&mut raw).await.unwrap();
    // 4. a hash with an unparsable tags field
    let k4 = tier.entry_key("ns", "tags");
    let _: () = redis::cmd("HSET")
        .arg(&k4)
        .arg("e")
        .arg("x")
        .arg("s")
        .arg(stamp)
        .arg("t")
        .arg("99:short")
        .arg("f")
        .arg(&far)
        .arg("h")
        .arg(&far)
        .query_async(&mut raw)
        .await
        .unwrap();

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_timeout_on_paused_server_opens_breaker() {
    let mut server = RedisServer::start();
    let op_timeout = Duration::from_millis(50);
    let tier = RedisTier::builder(server.url())
        .prefix("pause")
        .op_timeout(op_timeout)
        .breaker(BreakerConfig {
            consecutive_failures: 3,
            open_for: Duration::from_millis(300),
            jitter: 0.0,
            ..BreakerConfig::default()
        })
        .build()
        .await
        .unwrap();
    tier.lookup("ns", "warm", None).await.unwrap();

    server.pause().unwrap();
    let mut timings = Vec::new();
    let result = async {
        for _ in 0..3 {
            let started = Instant::now();
            let err = tier.lookup("ns", "k", None).await.expect_err("paused server must time out");
            let took = started.elapsed();
            timings.push(took);
            assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
            assert!(took < op_timeout + Duration::from_millis(150), "timeout took {took:?}");
        }
        assert_eq!(tier.breaker().state(), BreakerState::Open);
        let started = Instant::now();
        let err = tier.lookup("ns", "k", None).await.expect_err("breaker open");
        let refused_in = started.elapsed();
        assert!(err.is_circuit_open(), "{err}");
        refused_in
    }
    .await;
    server.resume().unwrap();
    eprintln!(
        "[timeout] op_timeout {op_timeout:?}: calls to the paused server failed after {timings:?}; \
         open breaker refused in {result:?}"
    );

    // After the cool-down a probe closes the breaker again.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let recovered = async {
        loop {
            if tier.lookup("ns", "k", None).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), recovered).await.expect("tier recovers after resume");
    assert_eq!(tier.breaker().state(), BreakerState::Closed);
    eprintln!("[timeout] recovered {:?} after the cool-down; stats {:?}", started.elapsed(), tier.stats());

    // force_open is honoured until reset.
    tier.breaker().force_open();
    assert!(tier.lookup("ns", "k", None).await.unwrap_err().is_circuit_open());
    tier.breaker().reset();
    tier.lookup("ns", "k", None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_survives_server_restart_and_reconnects() {
    let mut server = RedisServer::start();
    let tier = RedisTier::builder(server.url())
        .prefix("restart")
        .op_timeout(Duration::from_millis(500))
        .breaker(BreakerConfig {
            open_for: Duration::from_millis(100),
            jitter: 0.0,
            ..BreakerConfig::default()
        })
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
    let e = RedisTier::builder(server.url())
        .breaker(BreakerConfig { window: 0, ..BreakerConfig::default() })
        .build()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("window"), "{e}");
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

// ---------------------------------------------------------------------------------
// stream backplane

async fn stream_bp(server: &RedisServer) -> RedisStreamBackplane {
    RedisStreamBackplane::builder(server.url())
        .op_timeout(Duration::from_secs(2))
        .block(Duration::from_millis(500))
        .build()
        .await
        .expect("stream backplane")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_round_trip_and_replay() {
    let server = RedisServer::start();
    let bp = stream_bp(&server).await;
    // Published before the subscription: not delivered.
    bp.publish(&msg(1, 1, "before")).await.unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    let mut latencies = Vec::new();
    for seq in 2..=6 {
        let started = Instant::now();
        bp.publish(&msg(1, seq, &format!("k{seq}"))).await.unwrap();
        let ev = next_event(&mut sub, Duration::from_secs(5)).await;
        latencies.push(started.elapsed());
        assert_eq!(message_of(&ev), Some(&msg(1, seq, &format!("k{seq}"))));
    }
    latencies.sort();
    eprintln!(
        "[stream] publish→deliver latencies: min {:?} median {:?} max {:?}",
        latencies[0], latencies[2], latencies[4]
    );

    // Replay: another origin interleaved, heartbeats ignored.
    for seq in 1..=3 {
        bp.publish(&msg(2, seq, "o2")).await.unwrap();
    }
    bp.publish(&Message { origin: 1, seq: 6, namespace: "ns".into(), body: MessageBody::Heartbeat })
        .await
        .unwrap();
    let started = Instant::now();
    let got = bp.replay(1, 3, 5).await.unwrap().expect("complete replay");
    eprintln!("[stream] replay of 3 messages took {:?}", started.elapsed());
    assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
    assert!(got.iter().all(|m| m.origin == 1));
    assert_eq!(
        bp.replay(1, 1, 6).await.unwrap().map(|v| v.len()),
        Some(6),
        "seq 1 was published before the subscription, still in the stream"
    );
    assert_eq!(bp.replay(1, 5, 9).await.unwrap(), None, "seqs 7..9 never published");
    assert_eq!(bp.replay(3, 1, 1).await.unwrap(), None, "unknown origin");
    // Trimmed: not replayable any more.
    server.command(&["XTRIM", bp.stream_key(), "MAXLEN", "2"]).unwrap();
    assert_eq!(bp.replay(1, 3, 5).await.unwrap(), None);
    let s = bp.stats();
    eprintln!("[stream] stats {s:?}");
    assert!(s.delivered >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_client_kill_resumes_complete_with_gap_messages() {
    let server = RedisServer::start();
    let bp = RedisStreamBackplane::builder(server.url())
        .block(Duration::from_millis(500))
        // A slow first reconnect, so that messages are surely published in the gap.
        .reconnect_backoff(Duration::from_millis(400), Duration::from_millis(800))
        .build()
        .await
        .unwrap();
    let publisher = stream_bp(&server).await;
    let mut sub = bp.subscribe().await.unwrap();
    publisher.publish(&msg(9, 1, "a")).await.unwrap();
    assert!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).is_some());

    let clients = clients_named(&server, &bp.client_name_prefix());
    assert_eq!(clients.len(), 1, "one named subscriber connection: {clients:?}");
    let killed_at = Instant::now();
    server.command(&["CLIENT", "KILL", "ID", &clients[0].0]).unwrap();
    let (_, skipped) =
        wait_for(&mut sub, Duration::from_secs(5), "Disconnected", |e| *e == BackplaneEvent::Disconnected)
            .await;
    assert!(skipped.is_empty(), "{skipped:?}");
    let detected = killed_at.elapsed();
    for seq in 2..=4 {
        publisher.publish(&msg(9, seq, "gap")).await.unwrap();
    }
    let mut delivered = Vec::new();
    let resumed = loop {
        match next_event(&mut sub, Duration::from_secs(5)).await {
            BackplaneEvent::Message(m) => delivered.push(m.seq),
            BackplaneEvent::Resumed { complete } => break complete,
            other => panic!("unexpected {other:?}"),
        }
    };
    let resumed_after = killed_at.elapsed();
    assert!(resumed, "a stream resumes complete");
    assert_eq!(delivered, vec![2, 3, 4], "messages published in the gap are delivered before Resumed");
    publisher.publish(&msg(9, 5, "after")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).map(|m| m.seq), Some(5));
    assert_eq!(clients_named(&server, &bp.client_name_prefix()).len(), 1, "renamed after reconnect");
    eprintln!(
        "[stream] CLIENT KILL → Disconnected in {detected:?}, → Resumed{{complete:true}} in {resumed_after:?} \
         (backoff 400–800 ms), 3 gap messages delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_trimmed_while_away_is_lost() {
    let server = RedisServer::start();
    let bp = RedisStreamBackplane::builder(server.url())
        .block(Duration::from_millis(500))
        .reconnect_backoff(Duration::from_millis(400), Duration::from_millis(800))
        .build()
        .await
        .unwrap();
    let publisher = stream_bp(&server).await;
    let mut sub = bp.subscribe().await.unwrap();
    let clients = clients_named(&server, &bp.client_name_prefix());
    server.command(&["CLIENT", "KILL", "ID", &clients[0].0]).unwrap();
    wait_for(&mut sub, Duration::from_secs(5), "Disconnected", |e| *e == BackplaneEvent::Disconnected).await;
    for seq in 1..=20 {
        publisher.publish(&msg(4, seq, "x")).await.unwrap();
    }
    server.command(&["XTRIM", bp.stream_key(), "MAXLEN", "5"]).unwrap();
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut lost = false;
    let complete = loop {
        match next_event(&mut sub, Duration::from_secs(5)).await {
            BackplaneEvent::Message(m) => seen.push(m.seq),
            BackplaneEvent::Lost => lost = true,
            BackplaneEvent::Resumed { complete } => break complete,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(lost, "Lost before Resumed");
    assert!(!complete, "Resumed{{complete:false}} after a trim");
    assert_eq!(seen, (16..=20).collect::<Vec<_>>(), "what the stream still holds is delivered");
    eprintln!(
        "[stream] trimmed while away: Lost + Resumed{{complete:false}} {:?} after the trim; delivered {seen:?}",
        started.elapsed()
    );

    // Stream deleted entirely while away: trailing loss detected through the counter.
    let clients = clients_named(&server, &bp.client_name_prefix());
    server.command(&["CLIENT", "KILL", "ID", &clients[0].0]).unwrap();
    wait_for(&mut sub, Duration::from_secs(5), "Disconnected", |e| *e == BackplaneEvent::Disconnected).await;
    publisher.publish(&msg(4, 21, "x")).await.unwrap();
    server.command(&["DEL", bp.stream_key()]).unwrap();
    let (ev, skipped) = wait_for(&mut sub, Duration::from_secs(5), "Resumed", |e| {
        matches!(e, BackplaneEvent::Resumed { .. })
    })
    .await;
    assert_eq!(ev, BackplaneEvent::Resumed { complete: false });
    assert!(skipped.contains(&BackplaneEvent::Lost), "{skipped:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_server_restart_without_persistence_is_lost() {
    let mut server = RedisServer::start();
    let bp = RedisStreamBackplane::builder(server.url())
        .block(Duration::from_millis(300))
        .read_grace(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    bp.publish(&msg(1, 1, "a")).await.unwrap();
    assert!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).is_some());
    let killed_at = Instant::now();
    server.kill();
    server.restart();
    let (_, _) =
        wait_for(&mut sub, Duration::from_secs(10), "Disconnected", |e| *e == BackplaneEvent::Disconnected)
            .await;
    let (ev, skipped) = wait_for(&mut sub, Duration::from_secs(10), "Resumed", |e| {
        matches!(e, BackplaneEvent::Resumed { .. })
    })
    .await;
    assert_eq!(ev, BackplaneEvent::Resumed { complete: false }, "the restarted server lost the stream");
    assert!(skipped.contains(&BackplaneEvent::Lost), "{skipped:?}");
    eprintln!(
        "[stream] restart without persistence: Lost + Resumed{{complete:false}} {:?} after the kill",
        killed_at.elapsed()
    );
    let publish = async {
        loop {
            if bp.publish(&msg(1, 2, "b")).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), publish).await.expect("publish after restart");
    let ev = next_event(&mut sub, Duration::from_secs(5)).await;
    assert_eq!(message_of(&ev).map(|m| m.seq), Some(2), "no spurious Lost after the resync: {ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_slow_reader_behind_the_cap_gets_lost() {
    let server = RedisServer::start();
    let bp = RedisStreamBackplane::builder(server.url())
        .block(Duration::from_millis(200))
        .channel_capacity(2)
        .batch(2)
        .build()
        .await
        .unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    for seq in 1..=30 {
        bp.publish(&msg(5, seq, "x")).await.unwrap();
    }
    // The reader holds at most channel + one batch; the rest waits in the stream.
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.command(&["XTRIM", bp.stream_key(), "MAXLEN", "3"]).unwrap();
    let mut seqs = Vec::new();
    let mut lost_at = None;
    while seqs.last() != Some(&30) {
        match next_event(&mut sub, Duration::from_secs(5)).await {
            BackplaneEvent::Message(m) => seqs.push(m.seq),
            BackplaneEvent::Lost => lost_at = Some(seqs.len()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(lost_at.is_some(), "gap seen while connected is reported: {seqs:?}");
    assert!(seqs.ends_with(&[28, 29, 30]));
    eprintln!("[stream] slow reader: got {} of 30, Lost after {} messages", seqs.len(), lost_at.unwrap_or(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_malformed_entries_are_skipped() {
    let server = RedisServer::start();
    let bp = stream_bp(&server).await;
    let mut sub = bp.subscribe().await.unwrap();
    server.command(&["XADD", bp.stream_key(), "*", "m", "\u{1}garbage"]).unwrap();
    server.command(&["XADD", bp.stream_key(), "*", "other", "field"]).unwrap();
    bp.publish(&msg(3, 1, "ok")).await.unwrap();
    assert_eq!(next_event(&mut sub, Duration::from_secs(5)).await, BackplaneEvent::Malformed);
    assert_eq!(next_event(&mut sub, Duration::from_secs(5)).await, BackplaneEvent::Malformed);
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await), Some(&msg(3, 1, "ok")));
    assert_eq!(bp.stats().malformed, 2);
    eprintln!("[stream] 2 malformed entries skipped, next message delivered; stats {:?}", bp.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_paused_server_is_detected_and_resumed() {
    let mut server = RedisServer::start();
    let bp = RedisStreamBackplane::builder(server.url())
        .block(Duration::from_millis(200))
        .read_grace(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    server.pause().unwrap();
    let paused_at = Instant::now();
    let detected = tokio::time::timeout(Duration::from_secs(5), sub.recv()).await;
    let detected_in = paused_at.elapsed();
    server.resume().unwrap();
    assert_eq!(detected.expect("detected").expect("open"), BackplaneEvent::Disconnected);
    let resumed_at = Instant::now();
    let (ev, _) = wait_for(&mut sub, Duration::from_secs(10), "Resumed", |e| {
        matches!(e, BackplaneEvent::Resumed { .. })
    })
    .await;
    assert_eq!(ev, BackplaneEvent::Resumed { complete: true });
    eprintln!(
        "[stream] paused server: Disconnected {detected_in:?} after SIGSTOP (block 200 ms + grace 300 ms), \
         Resumed{{complete:true}} {:?} after SIGCONT",
        resumed_at.elapsed()
    );
    bp.publish(&msg(1, 1, "x")).await.unwrap();
    assert!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).is_some());
}

// ---------------------------------------------------------------------------------
// pub/sub backplane

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_round_trip_and_client_kill() {
    let server = RedisServer::start();
    let bp = RedisPubSubBackplane::builder(server.url()).build().await.unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    let started = Instant::now();
    bp.publish(&msg(1, 1, "a")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await), Some(&msg(1, 1, "a")));
    eprintln!(
        "[pubsub] publish→deliver {:?}, PUBLISH reached {} subscriber(s)",
        started.elapsed(),
        bp.last_receivers()
    );
    assert_eq!(bp.replay(1, 1, 1).await.unwrap(), None, "pub/sub cannot replay");
    server.command(&["PUBLISH", bp.channel(), "garbage"]).unwrap();
    assert_eq!(next_event(&mut sub, Duration::from_secs(5)).await, BackplaneEvent::Malformed);

    let killed_at = Instant::now();
    server.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    assert_eq!(next_event(&mut sub, Duration::from_secs(5)).await, BackplaneEvent::Disconnected);
    let detected = killed_at.elapsed();
    let (ev, skipped) = wait_for(&mut sub, Duration::from_secs(5), "Resumed", |e| {
        matches!(e, BackplaneEvent::Resumed { .. })
    })
    .await;
    assert_eq!(ev, BackplaneEvent::Resumed { complete: false });
    assert!(skipped.is_empty(), "{skipped:?}");
    let resumed = killed_at.elapsed();
    bp.publish(&msg(1, 2, "b")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).map(|m| m.seq), Some(2));
    eprintln!(
        "[pubsub] CLIENT KILL → Disconnected in {detected:?}, → Resumed{{complete:false}} in {resumed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_full_channel_reports_lost() {
    let server = RedisServer::start();
    let bp = RedisPubSubBackplane::builder(server.url()).channel_capacity(3).build().await.unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    for seq in 1..=10 {
        bp.publish(&msg(1, seq, "x")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_event(&mut sub, Duration::from_secs(5)).await);
    }
    assert!(got.iter().all(|e| message_of(e).is_some()), "{got:?}");
    bp.publish(&msg(1, 11, "x")).await.unwrap();
    assert_eq!(next_event(&mut sub, Duration::from_secs(5)).await, BackplaneEvent::Lost);
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).map(|m| m.seq), Some(11));
    eprintln!(
        "[pubsub] full channel (capacity 3, 10 published): 3 delivered, Lost, then seq 11; stats {:?}",
        bp.stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_stalled_subscriber_dropped_by_output_buffer_limit() {
    let server = RedisServer::start();
    // Through a proxy, so that the subscriber can be stalled: with server→client
    // forwarding cut, nothing is read from Redis and its output buffer grows.
    let proxy = FaultProxy::start(server.addr()).await.unwrap();
    let url = format!("redis://127.0.0.1:{}", proxy.port());
    let bp = RedisPubSubBackplane::builder(&url)
        // Long pings: detection must come from the server dropping us.
        .ping(Duration::from_secs(30), Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    let publisher = RedisPubSubBackplane::builder(server.url()).build().await.unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    publisher.publish(&msg(1, 1, "warm")).await.unwrap();
    assert!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).is_some());

    server.command(&["CONFIG", "SET", "client-output-buffer-limit", "pubsub 256kb 128kb 1"]).unwrap();
    proxy.cut(Direction::ServerToClient, true);
    let stalled_at = Instant::now();
    let big = "x".repeat(16 * 1024);
    let mut published = 0u64;
    let dropped = async {
        loop {
            publisher.publish(&msg(1, 2 + published, &big)).await.unwrap();
            published += 1;
            let n = server.command(&["PUBSUB", "NUMSUB", publisher.channel()]).unwrap();
            if n.trim_end().ends_with(":0") {
                return;
            }
            if published.is_multiple_of(50) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), dropped).await.expect("redis drops the stalled subscriber");
    let dropped_in = stalled_at.elapsed();
    let info = server.command(&["INFO", "stats"]).unwrap();
    let disconnections = info
        .lines()
        .find(|l| l.starts_with("client_output_buffer_limit_disconnections"))
        .unwrap_or("client_output_buffer_limit_disconnections:n/a")
        .to_owned();
    proxy.cut(Direction::ServerToClient, false);
    let unstalled_at = Instant::now();
    let (_, before) =
        wait_for(&mut sub, Duration::from_secs(10), "Disconnected", |e| *e == BackplaneEvent::Disconnected)
            .await;
    let detected = unstalled_at.elapsed();
    let (ev, _) = wait_for(&mut sub, Duration::from_secs(10), "Resumed", |e| {
        matches!(e, BackplaneEvent::Resumed { .. })
    })
    .await;
    assert_eq!(ev, BackplaneEvent::Resumed { complete: false });
    let delivered = before.iter().filter(|e| message_of(e).is_some()).count();
    eprintln!(
        "[pubsub] stalled subscriber dropped by the server after {published} × 16 KiB messages in {dropped_in:?} \
         ({disconnections}); after un-stalling: {delivered} buffered messages, Disconnected in {detected:?}, \
         Resumed{{complete:false}} in {:?}",
        unstalled_at.elapsed()
    );
    publisher.publish(&msg(1, 100_000, "after")).await.unwrap();
    let (ev, _) = wait_for(&mut sub, Duration::from_secs(5), "message after resubscribe", |e| {
        message_of(e).is_some_and(|m| m.seq == 100_000)
    })
    .await;
    assert!(message_of(&ev).is_some());
}

// ---------------------------------------------------------------------------------
// TLS

/// A CA and a server certificate for 127.0.0.1, written to `dir`; returns the CA PEM.
fn make_certs(dir: &std::path::Path) -> String {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert =
        CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&server_key, &ca).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    ca.pem()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_tier_and_backplanes_over_rediss() {
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = make_certs(dir.path());
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let path = |f: &str| dir.path().join(f).display().to_string();
    let server = RedisServer::builder()
        .arg("tls-port", tls_port.to_string())
        .arg("tls-cert-file", path("server.pem"))
        .arg("tls-key-file", path("server.key"))
        .arg("tls-ca-cert-file", path("ca.pem"))
        .arg("tls-auth-clients", "no")
        .start();
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let tls = strata_redis::TlsConfig::with_root_cert(ca_pem.clone());

    // Without the CA the server's certificate is refused.
    let err = RedisTier::builder(&url).op_timeout(Duration::from_secs(2)).build().await.unwrap_err();
    eprintln!("[tls] without the CA: {err}");
    assert!(err.to_string().contains("TlsConfig"), "{err}");

    let started = Instant::now();
    let tier = RedisTier::builder(&url)
        .tls(tls.clone())
        .op_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("tls tier");
    eprintln!("[tls] connected over TLS in {:?}", started.elapsed());
    let t = token(&tier.lookup("ns", "k", None).await.unwrap());
    tier.fill("ns", "k", fresh("over tls", &[]), TTL, &t).await.unwrap();
    assert_eq!(hit_value(&tier.lookup("ns", "k", None).await.unwrap()).as_deref(), Some("over tls"));

    let stream = RedisStreamBackplane::builder(&url).tls(tls.clone()).build().await.expect("tls stream");
    let mut sub = stream.subscribe().await.unwrap();
    stream.publish(&msg(1, 1, "tls")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await), Some(&msg(1, 1, "tls")));

    let pubsub = RedisPubSubBackplane::builder(&url).tls(tls).build().await.expect("tls pubsub");
    let mut sub = pubsub.subscribe().await.unwrap();
    pubsub.publish(&msg(1, 1, "tls")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await), Some(&msg(1, 1, "tls")));

    // TLS settings with a plain URL are a configuration error.
    let e = RedisTier::builder(server.url())
        .tls(strata_redis::TlsConfig::with_root_cert(ca_pem))
        .build()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("rediss://"), "{e}");
}

// ---------------------------------------------------------------------------------
// fleet-level faults: full `Cache`s on a real Redis

mod fleet {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use futures::future::BoxFuture;
    use parking_lot::Mutex;
    use strata::backplane::Backplane;
    use strata::{BreakerConfig, Cache};
    use strata_redis::{RedisPubSubBackplane, RedisStreamBackplane, RedisTier};
    use strata_testkit::RedisServer;

    /// The "database": rows and a load counter.
    #[derive(Clone, Default)]
    struct Db {
        rows: Arc<Mutex<HashMap<u64, String>>>,
        loads: Arc<AtomicU64>,
        delay: Duration,
    }

    type LoadResult = Result<Option<String>, std::io::Error>;

    impl Db {
        fn set(&self, k: u64, v: &str) {
            self.rows.lock().insert(k, v.to_owned());
        }
        fn loads(&self) -> u64 {
            self.loads.load(Ordering::SeqCst)
        }
        fn loader(&self, k: u64) -> impl FnOnce() -> BoxFuture<'static, LoadResult> + Send + 'static {
            let db = self.clone();
            move || {
                Box::pin(async move {
                    db.loads.fetch_add(1, Ordering::SeqCst);
                    if !db.delay.is_zero() {
                        tokio::time::sleep(db.delay).await;
                    }
                    Ok(db.rows.lock().get(&k).cloned())
                })
            }
        }
    }

    async fn instance(server: &RedisServer, backplane: Arc<dyn Backplane>) -> Cache<u64, String> {
        let tier = RedisTier::builder(server.url())
            .prefix("fleet")
            .op_timeout(Duration::from_millis(150))
            .breaker(BreakerConfig { open_for: Duration::from_millis(300), ..BreakerConfig::default() })
            .build()
            .await
            .expect("tier");
        let cache = Cache::builder("payment")
            .tier(Arc::new(tier))
            .backplane(backplane)
            .time_to_live(Duration::from_secs(60))
            .max_stale(Duration::from_secs(2))
            .l2_timeout(Duration::from_millis(200))
            .heartbeat_interval(Duration::from_millis(200))
            .early_refresh(0.0)
            .build()
            .expect("cache");
        tokio::time::timeout(Duration::from_secs(5), cache.ready()).await.expect("cache ready");
        cache
    }

    async fn stream(server: &RedisServer) -> RedisStreamBackplane {
        RedisStreamBackplane::builder(server.url())
            .block(Duration::from_millis(300))
            .read_grace(Duration::from_millis(300))
            .reconnect_backoff(Duration::from_millis(300), Duration::from_millis(600))
            .build()
            .await
            .expect("stream backplane")
    }

    /// Polls until `key` is gone from `cache`'s L1; returns how long that took.
    async fn until_dropped(cache: &Cache<u64, String>, key: u64, within: Duration, what: &str) -> Duration {
        let started = Instant::now();
        let poll = async {
            while cache.get_local(&key).is_some() {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        };
        tokio::time::timeout(within, poll)
            .await
            .unwrap_or_else(|_| panic!("{what}: still cached after {within:?}"));
        started.elapsed()
    }

    fn kill_clients(server: &RedisServer, prefix: &str) {
        for (id, _) in super::clients_named(server, prefix) {
            server.command(&["CLIENT", "KILL", "ID", &id]).expect("CLIENT KILL");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stream_fleet_invalidation_propagates() {
        let server = RedisServer::start();
        let db = Db::default();
        db.set(1, "v1");
        let a = instance(&server, Arc::new(stream(&server).await)).await;
        let b = instance(&server, Arc::new(stream(&server).await)).await;
        assert_eq!(a.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some("v1"));
        assert_eq!(b.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some("v1"));
        assert_eq!(db.loads(), 1, "B was served from L2");
        assert_eq!(b.stats().l2_hits, 1);

        let mut delays = Vec::new();
        let mut calls = Vec::new();
        for round in 2..=6 {
            let v = format!("v{round}");
            db.set(1, &v);
            let started = Instant::now();
            a.invalidate(&1).await.unwrap();
            calls.push(started.elapsed());
            until_dropped(&b, 1, Duration::from_secs(2), "B after A's invalidate").await;
            delays.push(started.elapsed());
            assert_eq!(b.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some(v.as_str()));
            assert_eq!(a.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some(v.as_str()));
        }
        delays.sort();
        calls.sort();
        eprintln!(
            "[fleet/stream] A.invalidate() (L2 delete + XADD) took median {:?}; from its start to B's L1 copy \
             gone: min {:?} median {:?} max {:?}; loads {}",
            calls[2],
            delays[0],
            delays[2],
            delays[4],
            db.loads()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stream_fleet_subscriber_killed_resumes_without_flush() {
        let server = RedisServer::start();
        let db = Db::default();
        db.set(1, "v1");
        db.set(2, "w1");
        let a = instance(&server, Arc::new(stream(&server).await)).await;
        let b_bp = stream(&server).await;
        let b = instance(&server, Arc::new(b_bp.clone())).await;
        for k in [1, 2] {
            b.get_or_load(&k, db.loader(k)).await.unwrap();
        }
        let killed_at = Instant::now();
        kill_clients(&server, &b_bp.client_name_prefix());
        // In the gap (B reconnects after ≥150 ms): a committed change and its invalidation.
        db.set(1, "v2");
        a.invalidate(&1).await.unwrap();
        let dropped = until_dropped(&b, 1, Duration::from_secs(5), "B after its subscriber was killed").await;
        assert_eq!(b.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some("v2"));
        let healthy = async {
            while !b.is_backplane_healthy() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), healthy).await.expect("B healthy again");
        let s = b.stats();
        eprintln!(
            "[fleet/stream] B's subscriber killed, invalidation sent in the gap: B dropped the key {:?} after \
             the kill; gaps_detected {} repairs_flushed {} repairs_replayed {}; key 2 still cached: {}",
            dropped,
            s.gaps_detected,
            s.repairs_flushed,
            s.repairs_replayed,
            b.get_local(&2).is_some()
        );
        assert!(killed_at.elapsed() < Duration::from_secs(10));
        assert_eq!(b.get_local(&2).as_deref(), Some("w1"), "a complete resume needs no flush");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pubsub_fleet_subscriber_killed_flushes() {
        let server = RedisServer::start();
        let db = Db::default();
        db.set(1, "v1");
        db.set(2, "w1");
        let pubsub = |server: &RedisServer| {
            RedisPubSubBackplane::builder(server.url())
                .reconnect_backoff(Duration::from_millis(300), Duration::from_millis(600))
                .build()
        };
        let a = instance(&server, Arc::new(pubsub(&server).await.unwrap())).await;
        let b = instance(&server, Arc::new(pubsub(&server).await.unwrap())).await;
        for k in [1, 2] {
            b.get_or_load(&k, db.loader(k)).await.unwrap();
        }
        let killed_at = Instant::now();
        // Both instances' subscribers go; A's messages published in the gap are lost.
        server.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
        db.set(1, "v2");
        a.invalidate(&1).await.unwrap();
        let dropped = until_dropped(&b, 1, Duration::from_secs(5), "B after a lost pub/sub message").await;
        assert_eq!(b.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some("v2"));
        let s = b.stats();
        eprintln!(
            "[fleet/pubsub] subscribers killed, invalidation lost: B's copy gone {dropped:?} after the kill; \
             gaps_detected {} repairs_flushed {}",
            s.gaps_detected, s.repairs_flushed
        );
        assert!(s.repairs_flushed >= 1, "repaired by a flush: {s:?}");
        assert!(killed_at.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paused_redis_reads_fall_back_and_l1_honours_max_stale() {
        let mut server = RedisServer::start();
        let db = Db::default();
        db.set(1, "v1");
        db.set(2, "w1");
        let a = instance(&server, Arc::new(stream(&server).await)).await;
        a.get_or_load(&1, db.loader(1)).await.unwrap();
        server.pause().unwrap();
        let paused_at = Instant::now();
        let outcome = async {
            assert_eq!(a.get_local(&1).as_deref(), Some("v1"), "L1 serves while L2 is away");
            let started = Instant::now();
            let v = a.get_or_load(&2, db.loader(2)).await;
            let load_latency = started.elapsed();
            assert_eq!(v.unwrap().as_deref(), Some("w1"), "a miss goes to the database when L2 is down");
            // With the backplane unhealthy for longer than max_stale (2 s), L1 stops
            // serving entries older than max_stale.
            let gone = async {
                while a.get_local(&1).is_some() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            let bounded = tokio::time::timeout(Duration::from_secs(8), gone).await.is_ok();
            (load_latency, bounded, paused_at.elapsed())
        }
        .await;
        server.resume().unwrap();
        let (load_latency, bounded, gone_after) = outcome;
        assert!(bounded, "L1 kept serving an old entry past max_stale with Redis paused");
        eprintln!(
            "[fleet/pause] Redis SIGSTOPped: miss served by the database in {load_latency:?}; L1 stopped serving \
             the old entry {gone_after:?} after the pause (max_stale 2 s)"
        );
        let back = async {
            while !a.is_backplane_healthy() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let resumed = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), back).await.expect("healthy after SIGCONT");
        eprintln!("[fleet/pause] backplane healthy {:?} after SIGCONT", resumed.elapsed());
        assert_eq!(a.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some("v1"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stampede_one_load_for_the_fleet() {
        let server = RedisServer::start();
        let db = Db { delay: Duration::from_millis(200), ..Db::default() };
        db.set(7, "hot");
        let a = instance(&server, Arc::new(stream(&server).await)).await;
        let b = instance(&server, Arc::new(stream(&server).await)).await;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..40 {
            let cache = if i % 2 == 0 { a.clone() } else { b.clone() };
            let loader = db.loader(7);
            tasks.push(tokio::spawn(async move { cache.get_or_load(&7, loader).await }));
        }
        for t in tasks {
            let v = tokio::time::timeout(Duration::from_secs(5), t).await.expect("bounded").expect("task");
            assert_eq!(v.unwrap().as_deref(), Some("hot"));
        }
        let took = started.elapsed();
        eprintln!(
            "[fleet/stampede] 40 concurrent misses on 2 instances: {} load(s), lease waits A {} B {}, all answered in {took:?}",
            db.loads(),
            a.stats().lease_waits,
            b.stats().lease_waits
        );
        assert_eq!(db.loads(), 1, "one loader for the fleet (lease + single-flight)");
    }
}
