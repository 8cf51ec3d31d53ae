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
use strata::tier::{Envelope, FillOutcome, FillToken, InProcessTier, LockScope, Lookup, Tier};
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

    write_locks(tier, label).await;

    eprintln!("[conformance] {label}: scenario passed in {:?}", started.elapsed());
}

/// Write locks: poisoned tokens while a lock holds (and after it expired), several
/// writers per key, tag and namespace scopes, and the re-invalidation on unlock.
async fn write_locks(tier: &dyn Tier, label: &str) {
    let keys = ["k".to_owned()];
    let fill = |key: &'static str, t: FillToken| async move {
        tier.fill("wl", key, fresh("v", &[]), TTL, &t).await.unwrap()
    };
    // An entry present before the lock is dropped by it.
    let t = token(&tier.lookup("wl", "k", None).await.unwrap());
    assert_eq!(fill("k", t).await, FillOutcome::Stored, "{label}");
    let before = token(&tier.lookup("wl", "other", None).await.unwrap());
    let before_k = FillToken { stamp: before.stamp, lease: None, leader: true };
    tier.lock("wl", LockScope::Keys(&keys), 1, Duration::from_millis(400)).await.unwrap();
    tier.lock("wl", LockScope::Keys(&keys), 2, Duration::from_millis(400)).await.unwrap();
    assert!(is_miss(&tier.lookup("wl", "k", None).await.unwrap()), "{label}: the lock deletes the entry");
    assert_eq!(fill("k", before_k).await, FillOutcome::Rejected, "{label}: token from before the lock");
    let under = token(&tier.lookup("wl", "k", LEASE).await.unwrap());
    assert_eq!(fill("k", under.clone()).await, FillOutcome::Rejected, "{label}: token from under the lock");
    // Other keys are not affected.
    let t = token(&tier.lookup("wl", "other", None).await.unwrap());
    assert_eq!(fill("other", t).await, FillOutcome::Stored, "{label}");
    // One writer releases: the other one's lock still holds.
    tier.unlock("wl", LockScope::Keys(&keys), 1).await.unwrap();
    let still = token(&tier.lookup("wl", "k", None).await.unwrap());
    assert_eq!(fill("k", still.clone()).await, FillOutcome::Rejected, "{label}: second lock still held");
    // The second is never released: it expires, and its poisoned tokens stay refused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fill("k", under).await, FillOutcome::Rejected, "{label}: poisoned token after expiry");
    assert_eq!(fill("k", still).await, FillOutcome::Rejected, "{label}: poisoned token after expiry");
    let after = token(&tier.lookup("wl", "k", None).await.unwrap());
    assert_eq!(fill("k", after).await, FillOutcome::Stored, "{label}: free after the expiry");
    // Unlock invalidates again: a token from before the unlock cannot fill.
    tier.lock("wl", LockScope::Keys(&keys), 3, Duration::from_secs(5)).await.unwrap();
    tier.unlock("wl", LockScope::Keys(&keys), 3).await.unwrap();
    assert!(is_miss(&tier.lookup("wl", "k", None).await.unwrap()), "{label}");
    // Unlocking an unknown lock is fine.
    tier.unlock("wl", LockScope::Keys(&keys), 99).await.unwrap();

    // Tag scope: entries with the tag are invalidated, every key's tokens poisoned.
    let t = token(&tier.lookup("wl", "tagged", None).await.unwrap());
    tier.fill("wl", "tagged", fresh("v", &["red"]), TTL, &t).await.unwrap();
    tier.lock("wl", LockScope::Tag("red"), 4, Duration::from_secs(5)).await.unwrap();
    assert!(is_miss(&tier.lookup("wl", "tagged", None).await.unwrap()), "{label}: tagged entry invalidated");
    let t = token(&tier.lookup("wl", "plain", None).await.unwrap());
    assert_eq!(fill("plain", t).await, FillOutcome::Rejected, "{label}: tag lock poisons every key");
    tier.unlock("wl", LockScope::Tag("red"), 4).await.unwrap();
    let t = token(&tier.lookup("wl", "plain", None).await.unwrap());
    assert_eq!(fill("plain", t).await, FillOutcome::Stored, "{label}");

    // Namespace scope.
    tier.lock("wl", LockScope::Namespace, 5, Duration::from_secs(5)).await.unwrap();
    assert!(is_miss(&tier.lookup("wl", "plain", None).await.unwrap()), "{label}: namespace invalidated");
    let t = token(&tier.lookup("wl", "plain", None).await.unwrap());
    assert_eq!(fill("plain", t).await, FillOutcome::Rejected, "{label}");
    tier.unlock("wl", LockScope::Namespace, 5).await.unwrap();
    let t = token(&tier.lookup("wl", "plain", None).await.unwrap());
    assert_eq!(fill("plain", t).await, FillOutcome::Stored, "{label}");
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
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use futures::future::BoxFuture;
    use parking_lot::Mutex;
    use strata::backplane::Backplane;
    use strata::tier::{Lookup, Tier};
    use strata::{BreakerConfig, BreakerState, Cache, Codec, PostcardCodec};
    use strata_redis::{BackplaneStats, RedisPubSubBackplane, RedisStreamBackplane, RedisTier};
    use strata_testkit::{Direction, FaultProxy, RedisServer};
    use tokio::sync::oneshot;

    /// The "database": rows (each `row{k}@v{version}` for versioned rows), when each
    /// version was committed, and a count of loader calls.
    #[derive(Clone, Default)]
    struct Db {
        rows: Arc<Mutex<HashMap<u64, String>>>,
        commits: Arc<Mutex<HashMap<(u64, u64), Instant>>>,
        loads: Arc<AtomicU64>,
        delay: Duration,
    }

    type LoadResult = Result<Option<String>, std::io::Error>;

    fn row(k: u64, version: u64) -> String {
        format!("row{k}@v{version}")
    }

    /// The version of a row value (0 for a value without one, or none).
    fn version_of(value: Option<&str>) -> u64 {
        value.and_then(|v| v.rsplit_once("@v")).and_then(|(_, n)| n.parse().ok()).unwrap_or(0)
    }

    impl Db {
        fn set(&self, k: u64, v: &str) {
            self.rows.lock().insert(k, v.to_owned());
        }
        /// Every key at version 1.
        fn seed(&self, keys: impl IntoIterator<Item = u64>) {
            let now = Instant::now();
            let mut rows = self.rows.lock();
            for k in keys {
                rows.insert(k, row(k, 1));
                self.commits.lock().insert((k, 1), now);
            }
        }
        /// Commits a new version of row `k`; returns it.
        fn bump(&self, k: u64) -> u64 {
            let mut rows = self.rows.lock();
            let v = version_of(rows.get(&k).map(String::as_str)) + 1;
            rows.insert(k, row(k, v));
            self.commits.lock().insert((k, v), Instant::now());
            v
        }
        /// The committed version of row `k`: the truth.
        fn version(&self, k: u64) -> u64 {
            version_of(self.rows.lock().get(&k).map(String::as_str))
        }
        fn committed_at(&self, k: u64, version: u64) -> Option<Instant> {
            self.commits.lock().get(&(k, version)).copied()
        }
        fn loads(&self) -> u64 {
            self.loads.load(Ordering::SeqCst)
        }
        /// A loader that reads the row when called, then takes `self.delay` (a query
        /// whose snapshot is taken at its start).
        fn loader(&self, k: u64) -> impl FnOnce() -> BoxFuture<'static, LoadResult> + Send + 'static {
            self.loader_with(k, self.delay, None)
        }
        /// Like `loader`, with its own duration, telling `read` what it read.
        fn loader_with(
            &self,
            k: u64,
            delay: Duration,
            read: Option<oneshot::Sender<String>>,
        ) -> impl FnOnce() -> BoxFuture<'static, LoadResult> + Send + 'static {
            let db = self.clone();
            move || {
                Box::pin(async move {
                    db.loads.fetch_add(1, Ordering::SeqCst);
                    let value = db.rows.lock().get(&k).cloned();
                    if let Some(tx) = read {
                        let _ = tx.send(value.clone().unwrap_or_default());
                    }
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok(value)
                })
            }
        }
    }

    /// Settings of one fleet instance; the default is what `instance` uses.
    #[derive(Clone)]
    struct Opts {
        /// The tier's per-operation timeout; kept ≤ `l2_timeout`.
        op_timeout: Duration,
        l2_timeout: Duration,
        tier_breaker: BreakerConfig,
        cache_breaker: BreakerConfig,
        ttl: Duration,
        l1_ttl: Option<Duration>,
        jitter: f64,
        max_stale: Duration,
        heartbeat: Duration,
        lease_wait: Duration,
        lazy: bool,
    }

    impl Default for Opts {
        fn default() -> Self {
            Opts {
                op_timeout: Duration::from_millis(150),
                l2_timeout: Duration::from_millis(200),
                tier_breaker: BreakerConfig {
                    open_for: Duration::from_millis(300),
                    ..BreakerConfig::default()
                },
                cache_breaker: BreakerConfig::default(),
                ttl: Duration::from_secs(60),
                l1_ttl: None,
                jitter: 0.1,
                max_stale: Duration::from_secs(2),
                heartbeat: Duration::from_millis(200),
                lease_wait: Duration::from_millis(500),
                lazy: false,
            }
        }
    }

    /// A full cache instance: its own `RedisTier` on `tier_url` (prefix `fleet`),
    /// namespace `payment`, the given backplane; waits until it is ready.
    async fn instance_with(tier_url: &str, backplane: Arc<dyn Backplane>, o: &Opts) -> Cache<u64, String> {
        assert!(
            o.op_timeout <= o.l2_timeout,
            "keep the tier's op_timeout at or below the cache's l2_timeout"
        );
        let tier = RedisTier::builder(tier_url)
            .prefix("fleet")
            .op_timeout(o.op_timeout)
            .breaker(o.tier_breaker.clone())
            .lazy(o.lazy)
            .build()
            .await
            .expect("tier");
        let mut builder = Cache::builder("payment")
            .tier(Arc::new(tier))
            .backplane(backplane)
            .time_to_live(o.ttl)
            .ttl_jitter(o.jitter)
            .max_stale(o.max_stale)
            .l2_timeout(o.l2_timeout)
            .lease_wait(o.lease_wait)
            .breaker(o.cache_breaker.clone())
            .heartbeat_interval(o.heartbeat)
            .early_refresh(0.0);
        if let Some(t) = o.l1_ttl {
            builder = builder.l1_time_to_live(t);
        }
        let cache = builder.build().expect("cache");
        tokio::time::timeout(Duration::from_secs(5), cache.ready()).await.expect("cache ready");
        cache
    }

    async fn instance(server: &RedisServer, backplane: Arc<dyn Backplane>) -> Cache<u64, String> {
        instance_with(&server.url(), backplane, &Opts::default()).await
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

    /// Ids of the clients in `CLIENT LIST TYPE <kind>` (e.g. `pubsub`).
    fn client_ids_of_type(server: &RedisServer, kind: &str) -> Vec<String> {
        let list = server.command(&["CLIENT", "LIST", "TYPE", kind]).expect("CLIENT LIST TYPE");
        list.lines()
            .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
            .map(|id| id.trim_start_matches(|c: char| !c.is_ascii_digit()).to_owned())
            .collect()
    }

    /// Polls `cond` every millisecond for up to `within`; returns how long it took.
    async fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
        let started = Instant::now();
        let poll = async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(within, poll).await.unwrap_or_else(|_| panic!("{what}: not within {within:?}"));
        started.elapsed()
    }

    /// The `p`-quantile (0..=1) of sorted durations.
    fn pct(sorted: &[Duration], p: f64) -> Duration {
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i.min(sorted.len() - 1)]
    }

    /// Milliseconds with one decimal, for the printed figures.
    fn ms(d: Duration) -> String {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    }

    fn ms_opt(d: Option<Duration>) -> String {
        d.map_or_else(|| "never".to_owned(), ms)
    }

    /// One read of a workload.
    #[derive(Debug, Clone)]
    struct Read {
        /// When `get_or_load` was called.
        at: Instant,
        latency: Duration,
        instance: usize,
        key: u64,
        /// The committed version when the read began.
        truth: u64,
        /// The version returned, or the error.
        got: Result<u64, String>,
    }

    impl Read {
        fn is_stale(&self) -> bool {
            matches!(self.got, Ok(v) if v < self.truth)
        }
    }

    /// Reads at a steady rate, round-robin over `caches`, on keys drawn from `keys`;
    /// each read runs on its own task (a slow read does not delay the next ones).
    struct Workload {
        stop: Arc<AtomicBool>,
        handle: tokio::task::JoinHandle<Vec<Read>>,
    }

    impl Workload {
        fn start(caches: Vec<Cache<u64, String>>, db: Db, keys: Vec<u64>, per_sec: u32) -> Workload {
            let stop = Arc::new(AtomicBool::new(false));
            let stopped = stop.clone();
            let handle = tokio::spawn(async move {
                let reads = Arc::new(Mutex::new(Vec::new()));
                let mut tasks = tokio::task::JoinSet::new();
                let mut tick = tokio::time::interval(Duration::from_secs(1) / per_sec);
                let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
                let mut n = 0usize;
                while !stopped.load(Ordering::SeqCst) {
                    tick.tick().await;
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let key = keys[(rng % keys.len() as u64) as usize];
                    let instance = n % caches.len();
                    n += 1;
                    let (cache, db, reads) = (caches[instance].clone(), db.clone(), reads.clone());
                    tasks.spawn(async move {
                        let truth = db.version(key);
                        let at = Instant::now();
                        let r = tokio::time::timeout(
                            Duration::from_secs(5),
                            cache.get_or_load(&key, db.loader(key)),
                        )
                        .await;
                        let latency = at.elapsed();
                        let got = match r {
                            Ok(Ok(v)) => Ok(version_of(v.as_deref())),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err("no answer within 5 s".to_owned()),
                        };
                        reads.lock().push(Read { at, latency, instance, key, truth, got });
                    });
                    while tasks.try_join_next().is_some() {}
                }
                while tasks.join_next().await.is_some() {}
                std::mem::take(&mut *reads.lock())
            });
            Workload { stop, handle }
        }

        async fn finish(self) -> Vec<Read> {
            self.stop.store(true, Ordering::SeqCst);
            tokio::time::timeout(Duration::from_secs(10), self.handle)
                .await
                .expect("workload stops")
                .expect("workload task")
        }
    }

    /// Figures of the reads that began in `[from, to)`.
    struct Phase {
        reads: usize,
        errors: usize,
        stale: usize,
        /// The longest time a stale read came after the commit it missed.
        max_staleness: Duration,
        latencies: Vec<Duration>,
    }

    fn phase(reads: &[Read], db: &Db, from: Instant, to: Instant) -> Phase {
        let mine: Vec<&Read> = reads.iter().filter(|r| r.at >= from && r.at < to).collect();
        let mut latencies: Vec<Duration> = mine.iter().map(|r| r.latency).collect();
        latencies.sort();
        let mut max_staleness = Duration::ZERO;
        for r in &mine {
            if let Ok(got) = r.got
                && got < r.truth
                && let Some(missed) = db.committed_at(r.key, got + 1)
            {
                max_staleness = max_staleness.max(r.at.saturating_duration_since(missed));
            }
        }
        Phase {
            reads: mine.len(),
            errors: mine.iter().filter(|r| r.got.is_err()).count(),
            stale: mine.iter().filter(|r| r.is_stale()).count(),
            max_staleness,
            latencies,
        }
    }

    /// What L2 holds for `key` (fresh or soft-expired), as a row version; `None` when
    /// it holds nothing. Read with a tier handle of its own (`super::redis_tier`, whose
    /// 2 s timeout matters right after SIGCONT, when Redis first works through the
    /// commands queued during the pause).
    async fn l2_version(probe: &RedisTier, key: u64) -> Option<u64> {
        let env = match probe.lookup("payment", &key.to_string(), None).await.expect("probe lookup") {
            Lookup::Hit(env) => env,
            Lookup::Miss { stale: Some(env), .. } => env,
            Lookup::Miss { stale: None, .. } => return None,
        };
        let bytes = env.value?;
        let value: String = PostcardCodec::<String>::default().decode(&bytes).expect("decode l2 value");
        Some(version_of(Some(&value)))
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

    // -----------------------------------------------------------------------------
    // fault tests: each prints its figures (run with --nocapture)

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Kind {
        Stream,
        PubSub,
    }

    /// B's subscriber connection is killed while A invalidates 200 keys (each cached in
    /// B's L1) at 200 keys/s for 1 s. B reconnects after 400–800 ms (backoff), so a
    /// good part of the run falls into the gap.
    async fn subscriber_cut(kind: Kind) {
        let tag = match kind {
            Kind::Stream => "[fault/subscriber-cut/stream]",
            Kind::PubSub => "[fault/subscriber-cut/pubsub]",
        };
        let server = RedisServer::start();
        let db = Db::default();
        let keys: Vec<u64> = (0..200).collect();
        let untouched: Vec<u64> = (1000..1010).collect();
        db.seed(keys.iter().chain(&untouched).copied());
        // B reconnects after 400–800 ms: the first backoff delay is drawn from [min/2, min].
        let backoff = (Duration::from_millis(800), Duration::from_millis(1000));
        let (a, b, b_bp_stats, b_sub_id): (_, _, Box<dyn Fn() -> BackplaneStats + Send>, String) = match kind
        {
            Kind::Stream => {
                let a = instance(&server, Arc::new(stream(&server).await)).await;
                let b_bp = RedisStreamBackplane::builder(server.url())
                    .block(Duration::from_millis(300))
                    .read_grace(Duration::from_millis(300))
                    .reconnect_backoff(backoff.0, backoff.1)
                    .build()
                    .await
                    .expect("stream backplane");
                let b = instance(&server, Arc::new(b_bp.clone())).await;
                let named = super::clients_named(&server, &b_bp.client_name_prefix());
                assert_eq!(named.len(), 1, "B has one named subscriber connection: {named:?}");
                let id = named[0].0.clone();
                (a, b, Box::new(move || b_bp.stats()), id)
            }
            Kind::PubSub => {
                let bp = |url: String| {
                    RedisPubSubBackplane::builder(url).reconnect_backoff(backoff.0, backoff.1).build()
                };
                let a = instance(&server, Arc::new(bp(server.url()).await.expect("pubsub"))).await;
                // Pub/Sub connections carry no name: B's is the one that appears with B.
                let before = client_ids_of_type(&server, "pubsub");
                let b_bp = bp(server.url()).await.expect("pubsub");
                let b = instance(&server, Arc::new(b_bp.clone())).await;
                let new: Vec<String> = client_ids_of_type(&server, "pubsub")
                    .into_iter()
                    .filter(|id| !before.contains(id))
                    .collect();
                assert_eq!(new.len(), 1, "B has one Pub/Sub connection: {new:?}");
                let id = new[0].clone();
                (a, b, Box::new(move || b_bp.stats()), id)
            }
        };
        for k in keys.iter().chain(&untouched) {
            let v = b.get_or_load(k, db.loader(*k)).await.expect("B loads");
            assert_eq!(version_of(v.as_deref()), 1);
            assert!(b.get_local(k).is_some(), "key {k} in B's L1");
        }
        let base = b.stats();

        // Watches B every millisecond: detection, resumption, and when every key A has
        // invalidated so far is gone from B's L1 again.
        let invalidated = Arc::new(AtomicUsize::new(0));
        let killed_at = Instant::now();
        server.command(&["CLIENT", "KILL", "ID", &b_sub_id]).expect("CLIENT KILL");
        let monitor = {
            let (b, keys, invalidated) = (b.clone(), keys.clone(), invalidated.clone());
            tokio::spawn(async move {
                let (mut detected, mut unhealthy, mut resumed, mut clean) = (None, None, None, None);
                let deadline = killed_at + Duration::from_secs(6);
                while Instant::now() < deadline {
                    let now = killed_at.elapsed();
                    let healthy = b.is_backplane_healthy();
                    if detected.is_none() && b.stats().gaps_detected > base.gaps_detected {
                        detected = Some(now);
                    }
                    if unhealthy.is_none() && !healthy {
                        unhealthy = Some(now);
                    }
                    if unhealthy.is_some() && resumed.is_none() && healthy {
                        resumed = Some(now);
                    }
                    if resumed.is_some() {
                        let n = invalidated.load(Ordering::SeqCst);
                        if keys[..n].iter().all(|k| b.get_local(k).is_none()) {
                            clean = Some(now);
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                (detected, unhealthy, resumed, clean)
            })
        };

        // A commits and invalidates 200 keys at 200 keys/s.
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let mut invalidated_at = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            tick.tick().await;
            db.bump(*k);
            a.invalidate(k).await.expect("A's invalidations succeed (only B's subscriber is cut)");
            invalidated_at.push(killed_at.elapsed());
            invalidated.store(i + 1, Ordering::SeqCst);
        }
        let run_took = killed_at.elapsed();
        let (detected, unhealthy, resumed, clean) = tokio::time::timeout(Duration::from_secs(8), monitor)
            .await
            .expect("monitor ends")
            .expect("monitor");
        let resumed = resumed.unwrap_or_else(|| panic!("{tag} B's backplane never became healthy again"));
        let clean = clean.unwrap_or_else(|| panic!("{tag} invalidated keys still in B's L1 after resuming"));
        let in_gap = invalidated_at.iter().filter(|t| **t <= resumed).count();
        // Whatever A invalidated after B resumed arrives live.
        wait_until(Duration::from_secs(3), "every invalidated key gone from B's L1", || {
            keys.iter().all(|k| b.get_local(k).is_none())
        })
        .await;
        let mut fresh = 0;
        for k in &keys {
            let v = b.get_or_load(k, db.loader(*k)).await.expect("B reloads");
            assert_eq!(
                version_of(v.as_deref()),
                db.version(*k),
                "{tag} key {k} reloaded at the committed version"
            );
            fresh += 1;
        }
        let untouched_cached = untouched.iter().filter(|k| b.get_local(k).is_some()).count();
        let s = b.stats();
        let (gaps, replayed, flushed) = (
            s.gaps_detected - base.gaps_detected,
            s.repairs_replayed - base.repairs_replayed,
            s.repairs_flushed - base.repairs_flushed,
        );
        let bps = b_bp_stats();
        eprintln!(
            "{tag} B's subscriber connection CLIENT KILLed while A invalidated {} keys cached in B's L1 at 200 keys/s \
             (the run took {}; B's reconnect backoff 400–800 ms)",
            keys.len(),
            ms(run_took)
        );
        eprintln!(
            "{tag} detection: gaps_detected +1 {} after the kill, backplane unhealthy {} after the kill",
            ms_opt(detected),
            ms_opt(unhealthy)
        );
        eprintln!(
            "{tag} repair: subscription healthy again {} after the kill; every key invalidated so far gone from \
             B's L1 {} after the kill; {in_gap} keys were invalidated during the gap (kill → resume)",
            ms(resumed),
            ms(clean)
        );
        eprintln!(
            "{tag} how: gaps_detected +{gaps}, repairs_replayed +{replayed}, repairs_flushed +{flushed}, \
             invalidations_applied +{}; backplane disconnects {} resumes {} lost {}; {untouched_cached}/{} \
             never-invalidated keys still in B's L1; {fresh}/{} reloads returned the new version",
            s.invalidations_applied - base.invalidations_applied,
            bps.disconnects,
            bps.resumes,
            bps.lost,
            untouched.len(),
            keys.len()
        );
        assert!(
            detected.is_some_and(|d| d < Duration::from_secs(1)),
            "{tag} the cut was not detected within 1 s"
        );
        assert!(in_gap >= 20, "{tag} only {in_gap} keys fell into the gap: the test did not exercise it");
        assert!(clean < Duration::from_secs(3), "{tag} repair took {clean:?}");
        match kind {
            Kind::Stream => {
                // The stream delivered what B missed (catch-up, Resumed{complete: true}):
                // nothing flushed, untouched entries kept.
                assert_eq!(flushed, 0, "{tag} a stream resume needs no flush: {s:?}");
                assert_eq!(bps.lost, 0, "{tag} nothing lost: {bps:?}");
                assert_eq!(untouched_cached, untouched.len(), "{tag} untouched keys kept (no flush)");
                eprintln!(
                    "{tag} => repaired by REPLAY: the stream subscriber's catch-up re-read the missed entries in \
                     order (Resumed{{complete:true}}), so the core saw no sequence gap (repairs_replayed counts only \
                     the core's own replay requests); no flush"
                );
            }
            Kind::PubSub => {
                assert!(flushed >= 1, "{tag} Pub/Sub cannot replay: the repair must be a flush: {s:?}");
                assert_eq!(replayed, 0, "{tag} nothing can be replayed from Pub/Sub: {s:?}");
                assert_eq!(untouched_cached, 0, "{tag} a flush drops every entry");
                eprintln!("{tag} => repaired by FLUSH (Resumed{{complete:false}} and the sequence gap)");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_subscriber_cut_stream_replays_the_gap() {
        subscriber_cut(Kind::Stream).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_subscriber_cut_pubsub_flushes() {
        subscriber_cut(Kind::PubSub).await;
    }

    /// 4 instances × 64 concurrent reads of one expired key, loader 200 ms.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_fleet_stampede_on_an_expired_key_loads_once() {
        const TAG: &str = "[fault/stampede]";
        let server = RedisServer::start();
        let db = Db { delay: Duration::from_millis(200), ..Db::default() };
        db.seed([7]);
        let ttl = Duration::from_millis(400);
        let lease_wait = Duration::from_millis(1000);
        let opts = Opts { ttl, jitter: 0.0, lease_wait, ..Opts::default() };
        let mut fleet = Vec::new();
        for _ in 0..4 {
            fleet.push(instance_with(&server.url(), Arc::new(stream(&server).await), &opts).await);
        }
        // Load the key once (L1 of instance 0 and L2), then let it expire everywhere.
        fleet[0].get_or_load(&7, db.loader(7)).await.expect("first load");
        for c in &fleet[1..] {
            c.get_or_load(&7, db.loader(7)).await.expect("from L2");
        }
        assert_eq!(db.loads(), 1);
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        assert!(fleet.iter().all(|c| c.get_local(&7).is_none()), "{TAG} expired in every L1");
        let probe = super::redis_tier(&server, "fleet").await;
        assert_eq!(l2_version(&probe, 7).await, None, "{TAG} expired in L2");
        db.bump(7);

        let before = db.loads();
        let base: Vec<_> = fleet.iter().map(Cache::stats).collect();
        let gate = Arc::new(tokio::sync::Barrier::new(256));
        let mut tasks = Vec::new();
        for i in 0..256 {
            let (cache, loader, gate) = (fleet[i % 4].clone(), db.loader(7), gate.clone());
            tasks.push(tokio::spawn(async move {
                gate.wait().await;
                let started = Instant::now();
                let v = cache.get_or_load(&7, loader).await;
                (started.elapsed(), v)
            }));
        }
        let mut latencies = Vec::new();
        for t in tasks {
            let (took, v) =
                tokio::time::timeout(Duration::from_secs(5), t).await.expect("bounded").expect("read task");
            assert_eq!(version_of(v.expect("read").as_deref()), 2, "{TAG} every read gets the new row");
            latencies.push(took);
        }
        latencies.sort();
        let loads = db.loads() - before;
        let per = |f: fn(&strata::CacheStats) -> u64| -> Vec<u64> {
            fleet.iter().zip(&base).map(|(c, b)| f(&c.stats()) - f(b)).collect()
        };
        eprintln!(
            "{TAG} 4 instances × 64 concurrent reads of one expired key (loader 200 ms, lease_wait {}): loader \
             called {loads} time(s); read latency p50 {} max {} (min {})",
            ms(lease_wait),
            ms(pct(&latencies, 0.5)),
            ms(latencies[latencies.len() - 1]),
            ms(latencies[0])
        );
        eprintln!(
            "{TAG} per instance: loads {:?}, lease waits {:?}, l2 hits {:?}",
            per(|s| s.loads),
            per(|s| s.lease_waits),
            per(|s| s.l2_hits)
        );
        assert_eq!(loads, 1, "{TAG} one loader call for the whole fleet (lease + single-flight)");
        assert!(
            latencies[latencies.len() - 1] < Duration::from_millis(200) + lease_wait,
            "{TAG} nobody waited out the lease"
        );
    }

    /// One sample of the fleet's state, taken every few milliseconds.
    struct Sample {
        at: Instant,
        breakers: Vec<BreakerState>,
        healthy: Vec<bool>,
        l2_hits: u64,
        pending: usize,
    }

    fn sample_fleet(fleet: &[Cache<u64, String>]) -> Sample {
        Sample {
            at: Instant::now(),
            breakers: fleet.iter().map(Cache::l2_breaker_state).collect(),
            healthy: fleet.iter().map(Cache::is_backplane_healthy).collect(),
            l2_hits: fleet.iter().map(|c| c.stats().l2_hits).sum(),
            pending: fleet.iter().map(Cache::pending_invalidations).sum(),
        }
    }

    /// Samples the fleet every 2 ms until stopped.
    fn watch_fleet(
        fleet: Vec<Cache<u64, String>>,
    ) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Vec<Sample>>) {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let handle = tokio::spawn(async move {
            let mut samples = Vec::new();
            while !stopped.load(Ordering::SeqCst) {
                samples.push(sample_fleet(&fleet));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            samples
        });
        (stop, handle)
    }

    /// First sample at or after `from` satisfying `pred`, as a delay after `from`.
    fn first_after(samples: &[Sample], from: Instant, pred: impl Fn(&Sample) -> bool) -> Option<Duration> {
        samples.iter().find(|s| s.at >= from && pred(s)).map(|s| s.at - from)
    }

    /// Three instances read 200 keys at 500 reads/s; Redis is killed with SIGKILL and
    /// restarted (empty: no persistence) 5 s later. During the outage 30 rows are
    /// updated and invalidated through the caches.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_redis_kill9_restart_after_5s() {
        const TAG: &str = "[fault/kill-9]";
        let mut server = RedisServer::start();
        let db = Db::default();
        let keys: Vec<u64> = (0..200).collect();
        db.seed(keys.iter().copied());
        // L1 keeps entries 1 s, L2 60 s: before the outage most reads that miss L1 are
        // L2 hits. Lazy tiers: building needs no server, the connection comes and goes.
        let opts = Opts {
            op_timeout: Duration::from_millis(100),
            l2_timeout: Duration::from_millis(150),
            l1_ttl: Some(Duration::from_secs(1)),
            max_stale: Duration::from_secs(2),
            lazy: true,
            ..Opts::default()
        };
        let stream_bp = || {
            RedisStreamBackplane::builder(server.url())
                .block(Duration::from_millis(300))
                .read_grace(Duration::from_millis(300))
                .reconnect_backoff(Duration::from_millis(100), Duration::from_millis(500))
                .build()
        };
        let mut fleet = Vec::new();
        for _ in 0..3 {
            fleet.push(
                instance_with(&server.url(), Arc::new(stream_bp().await.expect("stream")), &opts).await,
            );
        }
        for c in &fleet {
            for k in &keys {
                c.get_or_load(k, db.loader(*k)).await.expect("warm-up");
            }
        }
        let (stop_watch, watch) = watch_fleet(fleet.clone());
        let workload = Workload::start(fleet.clone(), db.clone(), keys.clone(), 500);
        let started = Instant::now();
        let loads_at_start = db.loads();
        tokio::time::sleep(Duration::from_millis(1500)).await;

        let loads_at_kill = db.loads();
        let killed = Instant::now();
        tokio::task::block_in_place(|| server.kill());
        // During the outage: 30 rows change; their invalidations cannot reach L2 or the
        // backplane and are buffered.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let updated: Vec<u64> = (0..30).collect();
        let inv_started = Instant::now();
        let mut invalidations = Vec::new();
        for (i, c) in fleet.iter().enumerate() {
            let (c, db) = (c.clone(), db.clone());
            let mine: Vec<u64> = updated.iter().copied().filter(|k| *k as usize % 3 == i).collect();
            invalidations.push(tokio::spawn(async move {
                let mut failed = 0;
                for k in mine {
                    db.bump(k);
                    if c.invalidate(&k).await.is_err() {
                        failed += 1;
                    }
                }
                failed
            }));
        }
        let mut failed = 0;
        for t in invalidations {
            failed += tokio::time::timeout(Duration::from_secs(4), t).await.expect("bounded").expect("task");
        }
        let inv_took = inv_started.elapsed();
        let pending: Vec<usize> = fleet.iter().map(Cache::pending_invalidations).collect();
        let until_restart = (killed + Duration::from_secs(5)).saturating_duration_since(Instant::now());
        tokio::time::sleep(until_restart).await;

        let loads_at_restart = db.loads();
        tokio::task::block_in_place(|| server.restart());
        let restarted = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let reads = workload.finish().await;
        let ended = Instant::now();
        let loads_at_end = db.loads();

        // Quiescence: buffered invalidations delivered, every backplane healthy.
        wait_until(Duration::from_secs(8), "pending invalidations delivered, backplanes healthy", || {
            fleet.iter().all(|c| c.pending_invalidations() == 0 && c.is_backplane_healthy())
        })
        .await;

        // The truth after the restart: every instance, and L2 itself, has the new rows.
        let probe = super::redis_tier(&server, "fleet").await;
        let mut in_l2 = 0;
        for k in &updated {
            let truth = db.version(*k);
            assert_eq!(truth, 2);
            if let Some(v) = l2_version(&probe, *k).await {
                assert_eq!(
                    v, truth,
                    "{TAG} L2 holds version {v} of row {k} after the restart, the database {truth}"
                );
                in_l2 += 1;
            }
            for (i, c) in fleet.iter().enumerate() {
                let v = c.get_or_load(k, db.loader(*k)).await.expect("read after recovery");
                assert_eq!(version_of(v.as_deref()), truth, "{TAG} instance {i} row {k} after the restart");
            }
        }

        stop_watch.store(true, Ordering::SeqCst);
        let samples =
            tokio::time::timeout(Duration::from_secs(5), watch).await.expect("watch").expect("watch");

        let before = phase(&reads, &db, started, killed);
        let during = phase(&reads, &db, killed, restarted);
        let after = phase(&reads, &db, restarted, ended);
        let rate = |loads: u64, from: Instant, to: Instant| loads as f64 / (to - from).as_secs_f64();
        let rate_before = rate(loads_at_kill - loads_at_start, started, killed);
        let rate_during = rate(loads_at_restart - loads_at_kill, killed, restarted);
        let rate_after = rate(loads_at_end - loads_at_restart, restarted, ended);
        let open_after: Vec<String> = (0..fleet.len())
            .map(|i| ms_opt(first_after(&samples, killed, |s| s.breakers[i] == BreakerState::Open)))
            .collect();
        let closed_after: Vec<String> = (0..fleet.len())
            .map(|i| ms_opt(first_after(&samples, restarted, |s| s.breakers[i] == BreakerState::Closed)))
            .collect();
        let all_closed =
            first_after(&samples, restarted, |s| s.breakers.iter().all(|b| *b == BreakerState::Closed));
        let hits_at_restart = samples.iter().rev().find(|s| s.at <= restarted).map_or(0, |s| s.l2_hits);
        let l2_hits_again = first_after(&samples, restarted, |s| s.l2_hits > hits_at_restart);
        let all_healthy = first_after(&samples, restarted, |s| s.healthy.iter().all(|h| *h));
        let drained = first_after(&samples, restarted, |s| s.pending == 0);
        let unhealthy = first_after(&samples, killed, |s| s.healthy.iter().all(|h| !*h));
        let hits_at = |t: Instant| samples.iter().rev().find(|s| s.at <= t).map_or(0, |s| s.l2_hits);
        let l2_hits_before = hits_at(killed) - hits_at(started);
        let l2_hits_during = hits_at(restarted) - hits_at(killed + Duration::from_millis(500));

        eprintln!(
            "{TAG} 3 instances, 500 reads/s over {} keys (L1 TTL 1 s, L2 TTL 60 s, max_stale 2 s, l2_timeout 150 ms, \
             tier op_timeout 100 ms); redis-server SIGKILLed, restarted empty 5 s later",
            keys.len()
        );
        eprintln!(
            "{TAG} L2 breaker Open after the kill: {open_after:?} (per instance); backplanes all unhealthy {} \
             after the kill",
            ms_opt(unhealthy)
        );
        eprintln!(
            "{TAG} DB loads/s: before {rate_before:.1}, during the outage {rate_during:.1} (ratio during/before \
             {}), after the restart {rate_after:.1} (L2 empty); before the outage L2 absorbed the L1 misses: \
             {l2_hits_before} L2 hits in {}",
            if rate_before > 0.0 {
                format!("{:.0}×", rate_during / rate_before)
            } else {
                "∞: no load at all before".into()
            },
            ms(killed - started)
        );
        eprintln!(
            "{TAG} reads served: before {} / during {} / after {}; errors {} / {} / {}; stale {} / {} / {} \
             (during: the oldest {} after the commit it missed, max_stale 2 s); L2 hits during the outage \
             (from 0.5 s after the kill) {l2_hits_during}",
            before.reads,
            during.reads,
            after.reads,
            before.errors,
            during.errors,
            after.errors,
            before.stale,
            during.stale,
            after.stale,
            ms(during.max_staleness)
        );
        eprintln!(
            "{TAG} read latency p50/p99/max: before {}/{}/{}, during {}/{}/{}, after {}/{}/{}",
            ms(pct(&before.latencies, 0.5)),
            ms(pct(&before.latencies, 0.99)),
            ms(pct(&before.latencies, 1.0)),
            ms(pct(&during.latencies, 0.5)),
            ms(pct(&during.latencies, 0.99)),
            ms(pct(&during.latencies, 1.0)),
            ms(pct(&after.latencies, 0.5)),
            ms(pct(&after.latencies, 0.99)),
            ms(pct(&after.latencies, 1.0)),
        );
        eprintln!(
            "{TAG} during the outage {} rows updated and invalidated through the caches in {}: {failed} \
             invalidate() calls returned an error, buffered (pending per instance {pending:?})",
            updated.len(),
            ms(inv_took)
        );
        eprintln!(
            "{TAG} recovery after the restart: breakers Closed {closed_after:?} (all {}); first L2 hit {}; \
             backplanes healthy {}; buffered invalidations delivered {}",
            ms_opt(all_closed),
            ms_opt(l2_hits_again),
            ms_opt(all_healthy),
            ms_opt(drained)
        );
        eprintln!(
            "{TAG} after the restart: {} stale reads; the {} updated rows read at the new version on every instance; \
             {in_l2} of them in L2, all at the new version",
            after.stale,
            updated.len()
        );
        let slow_after: Vec<String> = reads
            .iter()
            .filter(|r| r.at >= restarted && r.latency > Duration::from_millis(250))
            .map(|r| {
                let by = if updated.contains(&r.key) { format!("{}", r.key % 3) } else { "-".to_owned() };
                format!("reader {} key {} (updated via instance {by}) {}", r.instance, r.key, ms(r.latency))
            })
            .collect();
        eprintln!(
            "{TAG} reads after the restart slower than 250 ms: {} {slow_after:?}; lease waits per instance {:?}. A \
             reader waits up to lease_wait (500 ms) when another instance holds the key's fleet lease and never \
             fills L2: here the instance whose L2 delete of that key is still buffered (it loads from the database \
             but must not fill L2, and leaves its lease to expire)",
            slow_after.len(),
            fleet.iter().map(|c| c.stats().lease_waits).collect::<Vec<_>>()
        );
        let errors: Vec<&String> = reads.iter().filter_map(|r| r.got.as_ref().err()).take(3).collect();
        assert_eq!(before.errors + during.errors + after.errors, 0, "{TAG} reads failed: {errors:?}");
        assert!(during.reads > 1000, "{TAG} reads kept being served during the outage");
        assert!(
            fleet.iter().all(|c| c.stats().l2_errors > 0) && open_after.iter().all(|o| o != "never"),
            "{TAG} every instance's L2 breaker opened: {open_after:?}"
        );
        assert!(rate_during > rate_before, "{TAG} misses went to the database during the outage");
        assert!(during.max_staleness <= opts.max_stale, "{TAG} L1 served beyond max_stale");
        assert_eq!(failed, updated.len(), "{TAG} invalidations during the outage report their failure");
        assert!(pending.iter().all(|p| *p > 0), "{TAG} and are buffered: {pending:?}");
        assert_eq!(after.stale, 0, "{TAG} stale reads after the restart");
        assert!(all_closed.is_some() && l2_hits_again.is_some(), "{TAG} L2 in use again after the restart");
    }

    /// Redis is SIGSTOPped for 2 s while B and C read at a steady rate (misses load in
    /// 5 ms) and A, an otherwise idle instance, runs two slow loads of rows that change
    /// meanwhile: S1 is invalidated just before the pause, S2 during it (buffered).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_redis_sigstop_2s_bounded_latency_no_stale_fill() {
        const TAG: &str = "[fault/sigstop]";
        let mut server = RedisServer::start();
        let db = Db { delay: Duration::from_millis(5), ..Db::default() };
        let keys: Vec<u64> = (0..1000).collect();
        let (s1, s2) = (5001, 5002);
        db.seed(keys.iter().copied().chain([s1, s2]));
        let l2_timeout = Duration::from_millis(50);
        let loader_time = db.delay;
        let opts = Opts {
            op_timeout: Duration::from_millis(40),
            l2_timeout,
            // Fast half-open, so that L2 is in use again soon after SIGCONT.
            cache_breaker: BreakerConfig { open_for: Duration::from_millis(200), ..BreakerConfig::default() },
            // L1 keeps serving through the pause: the staleness bound is max_stale.
            max_stale: Duration::from_secs(5),
            ..Opts::default()
        };
        let mut fleet = Vec::new();
        for _ in 0..3 {
            fleet.push(instance_with(&server.url(), Arc::new(stream(&server).await), &opts).await);
        }
        let (a, b, c) = (fleet[0].clone(), fleet[1].clone(), fleet[2].clone());
        let workload = Workload::start(vec![b.clone(), c.clone()], db.clone(), keys.clone(), 300);
        tokio::time::sleep(Duration::from_millis(800)).await;

        // A's slow loads read version 1 of S1 and S2, then take 400 / 900 ms.
        let (read1, got1) = oneshot::channel();
        let (read2, got2) = oneshot::channel();
        let load1 = tokio::spawn({
            let (a, l) = (a.clone(), db.loader_with(s1, Duration::from_millis(400), Some(read1)));
            async move { a.get_or_load(&s1, l).await }
        });
        let load2 = tokio::spawn({
            let (a, l) = (a.clone(), db.loader_with(s2, Duration::from_millis(900), Some(read2)));
            async move { a.get_or_load(&s2, l).await }
        });
        let read = tokio::time::timeout(Duration::from_secs(2), async { (got1.await, got2.await) }).await;
        let (r1, r2) = read.expect("slow loads started");
        assert_eq!((version_of(r1.ok().as_deref()), version_of(r2.ok().as_deref())), (1, 1));

        // S1 changes and is invalidated (L2 delete and message succeed); A hears of it.
        let heard = a.stats().invalidations_received;
        db.bump(s1);
        b.invalidate(&s1).await.expect("invalidate S1 before the pause");
        wait_until(Duration::from_secs(1), "A hears S1's invalidation", || {
            a.stats().invalidations_received > heard
        })
        .await;
        server.pause().expect("SIGSTOP");
        let paused = Instant::now();
        let loads_at_pause = db.loads();

        // S2 changes during the pause: its invalidation fails and is buffered.
        tokio::time::sleep(Duration::from_millis(100)).await;
        db.bump(s2);
        let inv2 = b.invalidate(&s2).await;
        let b_pending = b.pending_invalidations();
        tokio::time::sleep((paused + Duration::from_secs(2)).saturating_duration_since(Instant::now())).await;
        let loads_during_pause = db.loads() - loads_at_pause;
        server.resume().expect("SIGCONT");
        let resumed = Instant::now();
        let (v1, v2) = tokio::time::timeout(Duration::from_secs(3), async { (load1.await, load2.await) })
            .await
            .expect("slow loads finish");
        let (v1, v2) = (v1.expect("task").expect("load S1"), v2.expect("task").expect("load S2"));

        // What L2 holds for S2 right after SIGCONT: A's fill was sent during the pause
        // and Redis runs it now; B's delete was never sent (B's breaker was open).
        let mut l2_after_sigcont = Vec::new();
        let probe = super::redis_tier(&server, "fleet").await;
        for _ in 0..10 {
            l2_after_sigcont.push(l2_version(&probe, s2).await.unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // After SIGCONT S1 and S2 become hot: each instance reads them every 20 ms from
        // the moment its L2 breaker has closed again (so the reads go through L2), until
        // the buffered invalidation is delivered and every backplane is healthy.
        let mut hot_stale: Vec<(usize, u64, Duration)> = Vec::new();
        let mut l2_back = [false; 3];
        let settle = async {
            loop {
                for (i, cache) in fleet.iter().enumerate() {
                    l2_back[i] |= cache.l2_breaker_state() == BreakerState::Closed;
                    if !l2_back[i] {
                        continue;
                    }
                    for k in [s1, s2] {
                        let truth = db.version(k);
                        let at = Instant::now();
                        let v = cache.get_or_load(&k, db.loader(k)).await.expect("hot read");
                        if version_of(v.as_deref()) < truth {
                            hot_stale.push((i, k, at - resumed));
                        }
                    }
                }
                if fleet.iter().all(|c| c.pending_invalidations() == 0 && c.is_backplane_healthy()) {
                    return resumed.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let settled = tokio::time::timeout(Duration::from_secs(10), settle).await.expect("fleet settles");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let reads = workload.finish().await;

        // Afterwards: no older version of S1 or S2 in L2 or in any L1.
        let mut leftovers = Vec::new();
        for k in [s1, s2] {
            let truth = db.version(k);
            if let Some(v) = l2_version(&probe, k).await
                && v < truth
            {
                leftovers.push(format!("L2 holds v{v} of row {k} (database v{truth})"));
            }
            for (i, cache) in fleet.iter().enumerate() {
                let v = version_of(cache.get_local(&k).as_deref());
                if v != 0 && v < truth {
                    leftovers.push(format!("instance {i}'s L1 holds v{v} of row {k} (database v{truth})"));
                }
            }
        }

        let during = phase(&reads, &db, paused, resumed);
        let after = phase(&reads, &db, resumed, resumed + Duration::from_secs(60));
        let margin = Duration::from_millis(30);
        let bound = l2_timeout + loader_time + margin;
        let p99 = pct(&during.latencies, 0.99);
        eprintln!(
            "{TAG} redis-server SIGSTOPped for 2 s; B and C read 1000 keys at 300 reads/s (loader 5 ms, l2_timeout \
             {}, tier op_timeout 40 ms); A runs two slow loads (400 / 900 ms) of rows S1, S2 that change meanwhile",
            ms(l2_timeout)
        );
        eprintln!(
            "{TAG} latency of the {} reads during the pause ({loads_during_pause} of them missed and were loaded): \
             p50 {} p99 {} max {}; bound on p99 = l2_timeout {} + loader {} + margin {} = {}; errors {}",
            during.reads,
            ms(pct(&during.latencies, 0.5)),
            ms(p99),
            ms(pct(&during.latencies, 1.0)),
            ms(l2_timeout),
            ms(loader_time),
            ms(margin),
            ms(bound),
            during.errors
        );
        eprintln!(
            "{TAG} after SIGCONT: reads p50 {} p99 {} max {}, errors {}, stale {}; fleet settled (buffered \
             invalidation delivered, backplanes healthy) {} after SIGCONT",
            ms(pct(&after.latencies, 0.5)),
            ms(pct(&after.latencies, 0.99)),
            ms(pct(&after.latencies, 1.0)),
            after.errors,
            after.stale,
            ms(settled)
        );
        eprintln!(
            "{TAG} slow loads returned S1 v{} and S2 v{} to their waiting caller (they began before the \
             invalidations); A's fills_rejected {}; B's S2 invalidation during the pause: {} (pending {b_pending})",
            version_of(v1.as_deref()),
            version_of(v2.as_deref()),
            a.stats().fills_rejected,
            match &inv2 {
                Ok(()) => "succeeded".to_owned(),
                Err(e) => format!("failed and was buffered ({e})"),
            }
        );
        let mut windows: Vec<String> = Vec::new();
        for (i, name) in ["A", "B", "C"].iter().enumerate() {
            for k in [s1, s2] {
                let ts: Vec<Duration> =
                    hot_stale.iter().filter(|(j, kk, _)| *j == i && *kk == k).map(|(_, _, t)| *t).collect();
                if let (Some(first), Some(last)) = (ts.first(), ts.last()) {
                    let row = if k == s1 { "S1" } else { "S2" };
                    windows.push(format!(
                        "{name} served old {row} {} times from +{} to +{}",
                        ts.len(),
                        ms(*first),
                        ms(*last)
                    ));
                }
            }
        }
        eprintln!(
            "{TAG} S2 in L2 during the first 100 ms after SIGCONT (version per 10 ms probe, 0 = absent): \
             {l2_after_sigcont:?}"
        );
        let s2_commit = db.committed_at(s2, 2).expect("S2 v2 committed");
        let last_stale = hot_stale.iter().map(|(_, _, t)| *t).max();
        eprintln!(
            "{TAG} hot reads (all instances, every 20 ms once their L2 breaker closed) after SIGCONT that returned \
             an older version: {} [{}]; the last one {} after S2's commit (max_stale {}); lease waits {:?}",
            hot_stale.len(),
            windows.join(", "),
            ms_opt(last_stale.map(|t| (resumed + t).saturating_duration_since(s2_commit))),
            ms(opts.max_stale),
            fleet.iter().map(|c| c.stats().lease_waits).collect::<Vec<_>>()
        );
        eprintln!(
            "{TAG} afterwards (buffered invalidation delivered): {}",
            if leftovers.is_empty() {
                "no older version in L2 or any L1".to_owned()
            } else {
                leftovers.join("; ")
            }
        );
        assert_eq!(during.errors + after.errors, 0, "{TAG} reads failed");
        assert!(
            during.reads > 300 && loads_during_pause > 50,
            "{TAG} reads and misses kept flowing during the pause"
        );
        assert!(p99 <= bound, "{TAG} p99 during the pause {p99:?} exceeds {bound:?}");
        assert!(inv2.is_err() && b_pending > 0, "{TAG} the invalidation during the pause is buffered");
        assert!(leftovers.is_empty(), "{TAG} a stale fill survived: {leftovers:?}");
        for (i, cache) in fleet.iter().enumerate() {
            for k in [s1, s2] {
                let v = cache.get_or_load(&k, db.loader(k)).await.expect("read");
                assert_eq!(version_of(v.as_deref()), db.version(k), "{TAG} instance {i} row {k}");
            }
        }
    }

    /// B's Pub/Sub subscriber goes through a proxy that stops forwarding to it (a
    /// subscriber that stopped reading) while A publishes invalidations, among them a
    /// bulk job's batches of 500 keys, until Redis drops B for exceeding
    /// `client-output-buffer-limit pubsub`. Then B reads again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_slow_pubsub_subscriber_dropped_by_server() {
        const TAG: &str = "[fault/slow-subscriber]";
        let limit = "pubsub 256kb 64kb 1";
        let server = RedisServer::builder().arg("client-output-buffer-limit", limit).start();
        let proxy = FaultProxy::start(server.addr()).await.expect("proxy");
        let db = Db::default();
        let hot: Vec<u64> = (0..200).collect();
        db.seed(hot.iter().copied());

        let a_bp = RedisPubSubBackplane::builder(server.url()).build().await.expect("pubsub A");
        let a = instance(&server, Arc::new(a_bp.clone())).await;
        let before = client_ids_of_type(&server, "pubsub");
        // Long pings: B must learn of the drop from the server, not from its own ping.
        let b_bp = RedisPubSubBackplane::builder(format!("redis://127.0.0.1:{}", proxy.port()))
            .ping(Duration::from_secs(30), Duration::from_secs(30))
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(200))
            .build()
            .await
            .expect("pubsub B");
        let b = instance_with(&server.url(), Arc::new(b_bp.clone()), &Opts::default()).await;
        let b_sub: Vec<String> =
            client_ids_of_type(&server, "pubsub").into_iter().filter(|id| !before.contains(id)).collect();
        assert_eq!(b_sub.len(), 1, "B's subscriber connection: {b_sub:?}");
        for k in &hot {
            b.get_or_load(k, db.loader(*k)).await.expect("B loads");
        }
        assert!(hot.iter().all(|k| b.get_local(k).is_some()));
        let base = b.stats();

        // Watch B: unhealthy, gap detected, flushed, healthy again, hot keys clean.
        let invalidated = Arc::new(AtomicUsize::new(0));
        let stalled = Instant::now();
        proxy.cut(Direction::ServerToClient, true);
        let (stop_watch, watch) = {
            let (b, hot, invalidated) = (b.clone(), hot.clone(), invalidated.clone());
            let stop = Arc::new(AtomicBool::new(false));
            let stopped = stop.clone();
            let handle = tokio::spawn(async move {
                let mut marks: [Option<Instant>; 5] = [None; 5];
                while !stopped.load(Ordering::SeqCst) {
                    let s = b.stats();
                    let healthy = b.is_backplane_healthy();
                    let now = Instant::now();
                    let n = invalidated.load(Ordering::SeqCst);
                    let back = marks[2].is_some() && healthy;
                    let conds = [
                        !healthy,
                        s.gaps_detected > base.gaps_detected,
                        s.repairs_flushed > base.repairs_flushed,
                        back,
                        back && n == hot.len() && hot.iter().all(|k| b.get_local(k).is_none()),
                    ];
                    for (m, c) in marks.iter_mut().zip(conds) {
                        if c && m.is_none() {
                            *m = Some(now);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                marks
            });
            (stop, handle)
        };

        // A: half the hot rows change, then a bulk job invalidates 500 rows per commit
        // until Redis drops B, then the other half of the hot rows change.
        let write = |k: u64| {
            let (a, db) = (a.clone(), db.clone());
            async move {
                db.bump(k);
                a.invalidate(&k).await.expect("A's invalidation");
            }
        };
        for (i, k) in hot[..100].iter().enumerate() {
            write(*k).await;
            invalidated.store(i + 1, Ordering::SeqCst);
        }
        let mut batches = 0u64;
        let mut bulk_keys = 0u64;
        let dropped_after = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                // 20-digit ids: the most bytes per key, so the fewest keys to fill the buffers.
                let batch: Vec<u64> = (0..500).map(|i| 10_000_000_000_000_000_000 + bulk_keys + i).collect();
                a.invalidate_many(&batch).await.expect("bulk invalidation");
                bulk_keys += 500;
                batches += 1;
                if batches.is_multiple_of(10) && !client_ids_of_type(&server, "pubsub").contains(&b_sub[0]) {
                    return stalled.elapsed();
                }
            }
        })
        .await
        .expect("redis drops the stalled subscriber");
        let published = a_bp.stats().published;
        for (i, k) in hot[100..].iter().enumerate() {
            write(*k).await;
            invalidated.store(100 + i + 1, Ordering::SeqCst);
        }
        // B reads again.
        let unstalled = Instant::now();
        proxy.cut(Direction::ServerToClient, false);
        wait_until(Duration::from_secs(10), "B repaired and clean", || {
            b.is_backplane_healthy()
                && b.stats().repairs_flushed > base.repairs_flushed
                && hot.iter().all(|k| b.get_local(k).is_none())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        stop_watch.store(true, Ordering::SeqCst);
        let marks = tokio::time::timeout(Duration::from_secs(5), watch).await.expect("watch").expect("watch");
        for k in &hot {
            assert!(b.get_local(k).is_none(), "{TAG} key {k} still in B's L1");
            let v = b.get_or_load(k, db.loader(*k)).await.expect("reload");
            assert_eq!(version_of(v.as_deref()), 2, "{TAG} key {k} reloaded at the new version");
        }
        let s = b.stats();
        let since = |t: Instant, m: Option<Instant>| ms_opt(m.map(|m| m.saturating_duration_since(t)));
        let bps = b_bp.stats();
        eprintln!(
            "{TAG} B's subscriber stalled (proxy holds server→client bytes) with client-output-buffer-limit \
             {limit:?}: A published {published} messages ({} hot-row invalidations + {batches} bulk commits of 500 \
             keys) before Redis dropped B, {} after the stall began",
            hot.len() / 2,
            ms(dropped_after)
        );
        eprintln!(
            "{TAG} detection during the stall: B's backplane unhealthy {} after the stall began (its own heartbeats \
             stopped coming back; heartbeat 200 ms × 3)",
            since(stalled, marks[0])
        );
        eprintln!(
            "{TAG} after B reads again (stall lifted {} after the drop), B first drains the messages the proxy and \
             the sockets held ({} delivered), then sees the server's close: gap detected (Disconnected) {}, L1 \
             flushed {}, healthy {}, all {} hot keys gone from B's L1 {} after the lift",
            ms(unstalled.saturating_duration_since(stalled + dropped_after)),
            bps.delivered,
            since(unstalled, marks[1]),
            since(unstalled, marks[2]),
            since(unstalled, marks[3]),
            hot.len(),
            since(unstalled, marks[4])
        );
        eprintln!(
            "{TAG} B: gaps_detected +{} repairs_flushed +{} repairs_replayed +{} invalidations_applied +{}; B's \
             backplane: delivered {} lost {} disconnects {} resumes {}; every hot key reloaded at the new version",
            s.gaps_detected - base.gaps_detected,
            s.repairs_flushed - base.repairs_flushed,
            s.repairs_replayed - base.repairs_replayed,
            s.invalidations_applied - base.invalidations_applied,
            bps.delivered,
            bps.lost,
            bps.disconnects,
            bps.resumes
        );
        assert!(marks[0].is_some(), "{TAG} B noticed nothing during the stall");
        assert!(
            s.gaps_detected > base.gaps_detected && s.repairs_flushed > base.repairs_flushed,
            "{TAG} {s:?}"
        );
        assert!(bps.disconnects >= 1, "{TAG} the server's drop reached B as a disconnect: {bps:?}");
    }
}
