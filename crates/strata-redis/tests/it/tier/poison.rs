//! Poisoned data under the tier's keys (written by a buggy or hostile client, a bad
//! restore): every poison is a counted miss or a repaired key, deleted or rebuilt in
//! the script that finds it, and never an error of the call (an error would open the
//! cache's L2 breaker, for every namespace on that server).

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use strata::breaker::BreakerState;
use strata::error::ErrorKind;
use strata::tier::{FillOutcome, Lookup, Tier};
use strata::{Cache, Scope};
use strata_redis::RedisTier;
use strata_testkit::RedisServer;

use crate::support::{
    LEASE, TTL, entry_bytes, fresh, hit_value, is_miss, key_of, now, raw_conn, read_entry, redis_tier,
    set_entry_field, token, write_entry,
};

async fn exists(raw: &mut MultiplexedConnection, key: &str) -> bool {
    let n: u64 = redis::cmd("EXISTS").arg(key).query_async(raw).await.unwrap();
    n == 1
}

async fn cmd(raw: &mut MultiplexedConnection, args: &[&[u8]]) {
    let mut c = redis::cmd(std::str::from_utf8(args[0]).unwrap());
    for a in &args[1..] {
        c.arg(*a);
    }
    let _: redis::Value = c.query_async(raw).await.unwrap();
}

/// The fields of a good entry of `ns`: filled through the tier, read back raw.
async fn good_fields(tier: &RedisTier, raw: &mut MultiplexedConnection, ns: &str) -> Vec<(String, Vec<u8>)> {
    let t = token(&tier.lookup(ns, "model", None).await.unwrap());
    assert_eq!(tier.fill(ns, "model", fresh("model", &["x"]), TTL, &t).await.unwrap(), FillOutcome::Stored);
    let fields = read_entry(raw, &tier.entry_key(ns, "model")).await;
    assert!(fields.iter().any(|(f, _)| f == "e"), "{fields:?}");
    fields
}

/// Hits of an untagged entry, answered by the plain read: the tier keeps trying its
/// plain read first, which skips it while most lookups miss (and a poisoned entry is a
/// miss), so the poisons below meet the plain read as well as the script.
async fn keep_plain_reads(tier: &RedisTier, ns: &str) {
    tier.set(ns, "plain", fresh("plain", &[]), TTL).await.unwrap();
    for _ in 0..3 {
        assert_eq!(hit_value(&tier.lookup(ns, "plain", None).await.unwrap()).as_deref(), Some("plain"));
    }
}

/// One poisoned entry: the good fields with `field` replaced (`None`: removed).
struct Poison {
    name: &'static str,
    field: &'static str,
    value: Option<&'static [u8]>,
}

const fn p(name: &'static str, field: &'static str, value: Option<&'static [u8]>) -> Poison {
    Poison { name, field, value }
}

const POISONS: &[Poison] = &[
    p("h=-1", "h", Some(b"-1")),
    p("h absurd", "h", Some(b"99999999999999999999999")),
    p("h=1.5", "h", Some(b"1.5")),
    p("s=inf", "s", Some(b"inf")),
    p("s=abc", "s", Some(b"abc")),
    p("s=0x10", "s", Some(b"0x10")),
    p("s huge", "s", Some(b"99999999999999999999")),
    p("s=-1", "s", Some(b"-1")),
    p("f=abc", "f", Some(b"abc")),
    p("f=1e30", "f", Some(b"1e30")),
    p("f=-1", "f", Some(b"-1")),
    p("t=5:ab", "t", Some(b"5:ab")),
    p("t=0x1:x", "t", Some(b"0x1:x")),
    p("v=abc", "v", Some(b"abc")),
    p("e empty", "e", Some(b"")),
    p("e format 9", "e", Some(b"\x09garbage")),
    p("e missing", "e", None),
];

async fn plant(raw: &mut MultiplexedConnection, key: &str, good: &[(String, Vec<u8>)], poison: &Poison) {
    let mut fields = Vec::new();
    for (f, v) in good {
        if f == poison.field {
            if let Some(bad) = poison.value {
                fields.push((f.clone(), bad.to_vec()));
            }
        } else {
            fields.push((f.clone(), v.clone()));
        }
    }
    write_entry(raw, key, &fields).await;
}

/// Each poisoned entry, then lookups: the first is a miss with a lease in two round
/// trips (the plain read leaves it to the script), counted undecodable and deleted; the
/// next ones are plain misses, two round trips each. Same for a wrong-type entry key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_entries_are_counted_deleted_misses_in_two_round_trips() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "poison").await;
    let mut raw = raw_conn(&server).await;
    let good = good_fields(&tier, &mut raw, "ns").await;
    let mut problems = Vec::new();
    let mut rows: Vec<&str> = POISONS.iter().map(|p| p.name).collect();
    rows.push("list at the entry key");
    for (i, name) in rows.iter().enumerate() {
        let key = format!("k{i}");
        let ek = tier.entry_key("ns", &key);
        match POISONS.get(i) {
            Some(poison) => plant(&mut raw, &ek, &good, poison).await,
            None => cmd(&mut raw, &[b"RPUSH", ek.as_bytes(), b"a", b"b"]).await,
        }
        let mut trips = Vec::new();
        for attempt in 0..3 {
            keep_plain_reads(&tier, "ns").await;
            let (ops, bad) = (tier.ops(), tier.stats().undecodable);
            let l = tier.lookup("ns", &key, LEASE).await;
            trips.push(tier.ops() - ops);
            let counted = tier.stats().undecodable - bad;
            match l {
                Err(e) => problems.push(format!("{name}: lookup {attempt} failed: {e}")),
                Ok(Lookup::Hit(h)) => problems.push(format!("{name}: lookup {attempt} hit {h:?}")),
                Ok(Lookup::Miss { token, .. }) => {
                    if attempt == 0 && !(token.leader && token.lease.is_some()) {
                        problems.push(format!("{name}: no lease on the first miss: {token:?}"));
                    }
                }
            }
            let want = u64::from(attempt == 0);
            if counted != want {
                problems.push(format!("{name}: lookup {attempt} counted {counted} undecodable, want {want}"));
            }
        }
        // The plain read leaves it to the script: two round trips, never more.
        if trips != [2, 2, 2] {
            problems.push(format!("{name}: round trips per lookup {trips:?}, want [2, 2, 2]"));
        }
        if exists(&mut raw, &ek).await {
            problems.push(format!("{name}: not deleted"));
        }
        if *name == "e empty" {
            eprintln!("[poison] empty envelope: round trips per read {trips:?}");
        }
    }
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
    // The namespace still works.
    let t = token(&tier.lookup("ns", "after", None).await.unwrap());
    assert_eq!(tier.fill("ns", "after", fresh("v", &[]), TTL, &t).await.unwrap(), FillOutcome::Stored);
    assert_eq!(hit_value(&tier.lookup("ns", "after", None).await.unwrap()).as_deref(), Some("v"));
    eprintln!("[poison] {} poisoned entries, stats {:?}", rows.len(), tier.stats());
}

/// The same poisons met by touch, a batch lookup and a (versioned) fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_entries_under_touch_lookup_many_and_fill() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "poison2").await;
    let mut raw = raw_conn(&server).await;
    let good = good_fields(&tier, &mut raw, "ns").await;
    let mut problems = Vec::new();
    for poison in POISONS {
        let name = poison.name;
        let ek = tier.entry_key("ns", "k");
        // touch: false, counted, deleted. (A bad format byte may also be left to the
        // next lookup: a touch need not decode the envelope.)
        plant(&mut raw, &ek, &good, poison).await;
        let bad = tier.stats().undecodable;
        match tier.touch("ns", "k", now().saturating_add(TTL), TTL).await {
            Ok(false) => {}
            Ok(true) if name == "e format 9" => {}
            other => problems.push(format!("{name}: touch answered {other:?}")),
        }
        if name != "e format 9" {
            if tier.stats().undecodable != bad + 1 {
                problems.push(format!("{name}: touch did not count it"));
            }
            if exists(&mut raw, &ek).await {
                problems.push(format!("{name}: touch did not delete it"));
            }
        }
        // lookup_many: the plain read and one script run for the batch, a counted miss.
        plant(&mut raw, &ek, &good, poison).await;
        keep_plain_reads(&tier, "ns").await;
        let (ops, bad) = (tier.ops(), tier.stats().undecodable);
        let keys = ["k".to_owned(), "model".to_owned(), "none".to_owned()];
        match tier.lookup_many("ns", &keys, None).await {
            Ok(out) => {
                if !is_miss(&out[0]) || hit_value(&out[1]).as_deref() != Some("model") || !is_miss(&out[2]) {
                    problems.push(format!("{name}: lookup_many answered {out:?}"));
                }
            }
            Err(e) => problems.push(format!("{name}: lookup_many failed: {e}")),
        }
        if tier.ops() - ops != 2 || tier.stats().undecodable != bad + 1 {
            problems.push(format!(
                "{name}: lookup_many took {} round trips, counted {}",
                tier.ops() - ops,
                tier.stats().undecodable - bad
            ));
        }
        // fill (with a version, so the script reads the entry it replaces): stored.
        plant(&mut raw, &ek, &good, poison).await;
        let t = token(&tier.lookup("ns", "other", None).await.unwrap());
        match tier.fill("ns", "k", fresh("new", &[]), TTL, &t).await {
            Ok(FillOutcome::Stored) => {}
            other => problems.push(format!("{name}: fill answered {other:?}")),
        }
        match tier.lookup("ns", "k", None).await {
            Ok(l) if hit_value(&l).as_deref() == Some("new") => {}
            other => problems.push(format!("{name}: after the fill: {other:?}")),
        }
    }
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
    eprintln!("[poison] touch, lookup_many, fill over poisoned entries: stats {:?}", tier.stats());
}

/// A poisoned meta hash met by each operation: the call succeeds, the meta hash is
/// rebuilt as if lost (the namespace comes back cold: nothing stored or handed out
/// before is valid), and the namespace works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_meta_hash_is_repaired_by_every_operation() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "meta").await;
    let mut raw = raw_conn(&server).await;
    let poisons: &[(&str, &[&[u8]])] = &[
        ("string", &[b"SET", b"garbage"]),
        ("list", &[b"RPUSH", b"a", b"b"]),
        ("n=abc", &[b"HSET", b"n", b"abc"]),
        ("c=abc", &[b"HSET", b"c", b"abc"]),
        ("c absurd", &[b"HSET", b"c", b"99999999999999999999"]),
        ("n above c", &[b"HSET", b"n", b"9000000000000000"]),
        ("t:x=abc", &[b"HSET", b"t:x", b"abc"]),
        ("l=abc", &[b"HSET", b"l", b"abc"]),
    ];
    let ops = [
        "lookup",
        "lookup_many",
        "fill",
        "set",
        "delete",
        "invalidate_tag",
        "invalidate_namespace",
        "touch",
        "lock",
        "unlock",
    ];
    let mut problems = Vec::new();
    for (i, (name, poison)) in poisons.iter().enumerate() {
        for op in ops {
            let ns = format!("n{i}-{op}");
            let meta = key_of(&tier, &ns, "m");
            // "b" invalidated by the namespace epoch, "a" by its tag's epoch.
            let t = token(&tier.lookup(&ns, "b", None).await.unwrap());
            tier.fill(&ns, "b", fresh("old b", &[]), TTL, &t).await.unwrap();
            tier.invalidate_namespace(&ns).await.unwrap();
            let t = token(&tier.lookup(&ns, "a", None).await.unwrap());
            tier.fill(&ns, "a", fresh("old a", &["x"]), TTL, &t).await.unwrap();
            tier.invalidate_tag(&ns, "x").await.unwrap();
            let before = token(&tier.lookup(&ns, "c", None).await.unwrap());
            if poison[0] != b"HSET" {
                let _: () = redis::cmd("DEL").arg(&meta).query_async(&mut raw).await.unwrap();
            }
            let mut args: Vec<&[u8]> = vec![poison[0], meta.as_bytes()];
            args.extend_from_slice(&poison[1..]);
            cmd(&mut raw, &args).await;

            let keys = vec!["a".to_owned(), "b".to_owned()];
            let repaired = tier.stats().repaired;
            let r = match op {
                "lookup" => tier.lookup(&ns, "a", LEASE).await.map(|l| format!("{l:?}")),
                "lookup_many" => tier.lookup_many(&ns, &keys, LEASE).await.map(|l| format!("{l:?}")),
                "fill" => {
                    tier.fill(&ns, "c", fresh("c", &["x"]), TTL, &before).await.map(|o| format!("{o:?}"))
                }
                "set" => tier.set(&ns, "c", fresh("c", &[]), TTL).await.map(|o| format!("{o:?}")),
                "delete" => tier.delete(&ns, &keys).await.map(|o| format!("{o:?}")),
                "invalidate_tag" => tier.invalidate_tag(&ns, "x").await.map(|o| format!("{o:?}")),
                "invalidate_namespace" => tier.invalidate_namespace(&ns).await.map(|o| format!("{o:?}")),
                "touch" => {
                    tier.touch(&ns, "a", now().saturating_add(TTL), TTL).await.map(|o| format!("{o:?}"))
                }
                "lock" => tier.lock(&ns, &Scope::Tag("y".into()), 1, TTL).await.map(|o| format!("{o:?}")),
                _ => tier.unlock(&ns, &Scope::All, 1).await.map(|o| format!("{o:?}")),
            };
            let what = format!("{name} / {op}");
            match r {
                Err(e) => {
                    problems.push(format!("{what}: failed: {e}"));
                    continue;
                }
                Ok(s) if op == "lookup" && s.contains("Hit") => {
                    problems.push(format!("{what}: stale hit {s}"))
                }
                Ok(s) if op == "fill" && s != "Rejected" => {
                    problems.push(format!("{what}: a token from before the repair was {s}"));
                }
                Ok(_) => {}
            }
            let _ = tier.unlock(&ns, &Scope::Tag("y".into()), 1).await;
            // Cold, never stale: what was invalid before the poison stays invalid.
            for k in ["a", "b"] {
                match tier.lookup(&ns, k, None).await {
                    Ok(l) if is_miss(&l) => {}
                    other => problems.push(format!("{what}: then lookup {k}: {other:?}")),
                }
            }
            if op != "fill"
                && tier.fill(&ns, "c", fresh("c", &["x"]), TTL, &before).await.ok()
                    != Some(FillOutcome::Rejected)
            {
                problems.push(format!("{what}: a token from before the poison was not refused"));
            }
            // And it works again: fill, read back, invalidate.
            let r = async {
                let t = token(&tier.lookup(&ns, "new", LEASE).await?);
                let stored = tier.fill(&ns, "new", fresh("fresh", &["x"]), TTL, &t).await?;
                let read = hit_value(&tier.lookup(&ns, "new", None).await?);
                tier.invalidate_tag(&ns, "x").await?;
                let gone = is_miss(&tier.lookup(&ns, "new", None).await?);
                Ok::<_, strata::error::Error>((stored, read, gone))
            }
            .await;
            match r {
                Ok((FillOutcome::Stored, Some(v), true)) if v == "fresh" => {}
                other => problems.push(format!("{what}: namespace not working again: {other:?}")),
            }
            // Counted, unless the operation overwrote the bad tag epoch (a tag bump) or
            // dropped it (a namespace bump, here also the unlock) before anything read it.
            let overwritten = *name == "t:x=abc" && (op.starts_with("invalidate") || op == "unlock");
            if tier.stats().repaired == repaired && !overwritten {
                problems.push(format!("{what}: the repair was not counted"));
            }
        }
    }
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
    eprintln!("[poison] {} meta poisons x {} operations: stats {:?}", poisons.len(), ops.len(), tier.stats());
}

/// Leases, tombstones and write-lock sets that are not what the tier wrote there:
/// dropped or rebuilt, never an error, never a key blocked for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_leases_tombstones_and_lock_sets() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "keys").await;
    let mut raw = raw_conn(&server).await;
    let mut problems = Vec::new();
    let rows: &[(&str, &str, &[&[u8]])] = &[
        ("lease list", "l:k", &[b"RPUSH", b"a"]),
        ("lease inf", "l:k", &[b"SET", b"inf"]),
        ("lease huge id", "l:k", &[b"SET", b"99999999999999"]),
        ("tombstone generation string", "x0", &[b"SET", b"a"]),
        ("tombstone huge", "x0", &[b"HSET", b"k", b"99999999999999999999"]),
        ("key lock set string", "w:k", &[b"SET", b"x"]),
        ("key lock set forever", "w:k", &[b"ZADD", b"+inf", b"7"]),
        ("wide lock set string", "w", &[b"SET", b"x"]),
        ("wide lock set forever", "w", &[b"ZADD", b"+inf", b"7"]),
    ];
    for (i, (name, kind, poison)) in rows.iter().enumerate() {
        let ns = format!("n{i}");
        let key = key_of(&tier, &ns, kind);
        let mut args: Vec<&[u8]> = vec![poison[0], key.as_bytes()];
        args.extend_from_slice(&poison[1..]);
        let repaired = tier.stats().repaired;
        if kind.starts_with('x') {
            // A delete of another key starts the tombstone generation poisoned below.
            tier.delete(&ns, &["other".to_owned()]).await.expect("delete");
        }
        // Once to take a token, once more to meet the fill.
        cmd(&mut raw, &args).await;
        let t = match tier.lookup(&ns, "k", LEASE).await {
            Ok(l) => token(&l),
            Err(e) => {
                problems.push(format!("{name}: lookup failed: {e}"));
                continue;
            }
        };
        if kind.starts_with("l:") && !(t.leader && t.lease.is_some()) {
            problems.push(format!("{name}: no lease taken over the poisoned one: {t:?}"));
        }
        if kind.starts_with('w') && t.stamp == 0 {
            problems.push(format!("{name}: the token is poisoned as if locked"));
        }
        if let Err(e) = tier.release_lease(&ns, "k", &t).await {
            problems.push(format!("{name}: release_lease failed: {e}"));
        }
        let t = token(&tier.lookup(&ns, "k", LEASE).await.unwrap());
        cmd(&mut raw, &[b"DEL", key.as_bytes()]).await;
        cmd(&mut raw, &args).await;
        match tier.fill(&ns, "k", fresh("v", &[]), TTL, &t).await {
            Ok(_) => {}
            Err(e) => problems.push(format!("{name}: fill failed: {e}")),
        }
        for (what, scope) in [("key", Scope::Keys(vec!["k".into()])), ("tag", Scope::Tag("x".into()))] {
            cmd(&mut raw, &[b"DEL", key.as_bytes()]).await;
            cmd(&mut raw, &args).await;
            if let Err(e) = tier.lock(&ns, &scope, 3, TTL).await {
                problems.push(format!("{name}: {what} lock failed: {e}"));
            }
            cmd(&mut raw, &[b"DEL", key.as_bytes()]).await;
            cmd(&mut raw, &args).await;
            if let Err(e) = tier.unlock(&ns, &scope, 3).await {
                problems.push(format!("{name}: {what} unlock failed: {e}"));
            }
        }
        // Works again: a fill is stored and read back. (The first fill to meet a bad
        // tombstone is refused: it invalidates the key, as the key's last invalidation
        // is unknown.)
        let r = async {
            let mut outcomes = Vec::new();
            for _ in 0..2 {
                if let Lookup::Miss { token, .. } = tier.lookup(&ns, "k", LEASE).await? {
                    outcomes.push(tier.fill(&ns, "k", fresh("v", &[]), TTL, &token).await?);
                }
            }
            Ok::<_, strata::error::Error>((outcomes, hit_value(&tier.lookup(&ns, "k", None).await?)))
        }
        .await;
        match r {
            Ok((_, Some(v))) if v == "v" => {}
            other => problems.push(format!("{name}: key not working again: {other:?}")),
        }
        if tier.stats().repaired == repaired {
            problems.push(format!("{name}: no repair counted"));
        }
    }
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
    eprintln!("[poison] leases, tombstones, lock sets: stats {:?}", tier.stats());
}

/// Appends the LEB128 varint of `n` (postcard's length prefix).
fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A 64 MiB entry with a valid envelope, built on the server (the test never holds
/// it): a lookup does not transfer it; it is a counted miss, deleted, in one round
/// trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_entry_is_a_deleted_miss_without_transfer() {
    const SIZE: usize = 64 << 20;
    let server = RedisServer::start();
    let tier = redis_tier(&server, "big").await;
    let mut raw = raw_conn(&server).await;
    let good = good_fields(&tier, &mut raw, "ns").await;
    // The model's value is "model": envelope = format, Some, len 5, "model", rest.
    let e = &good.iter().find(|(f, _)| f == "e").unwrap().1;
    assert_eq!(
        &e[..8],
        [&[strata_redis::tier::ENVELOPE_FORMAT][..], b"\x01\x05model"].concat(),
        "postcard layout of the envelope"
    );
    // The entry's head and tags as a good entry has them, then the huge envelope.
    let before_e: Vec<(String, Vec<u8>)> = good.iter().filter(|(f, _)| f != "e").cloned().collect();
    let mut head = entry_bytes(&before_e);
    head.extend_from_slice(&[strata_redis::tier::ENVELOPE_FORMAT, 1]);
    varint(SIZE as u64, &mut head);
    let ek = tier.entry_key("ns", "big");
    cmd(&mut raw, &[b"SET", ek.as_bytes(), &head]).await;
    let end = (head.len() + SIZE - 1).to_string();
    cmd(&mut raw, &[b"SETRANGE", ek.as_bytes(), end.as_bytes(), b"z"]).await;
    cmd(&mut raw, &[b"APPEND", ek.as_bytes(), &e[8..]]).await;
    cmd(&mut raw, &[b"PEXPIRE", ek.as_bytes(), b"60000"]).await;
    let len: u64 = redis::cmd("STRLEN").arg(&ek).query_async(&mut raw).await.unwrap();
    assert!(len > SIZE as u64);

    let (ops, bad) = (tier.ops(), tier.stats().undecodable);
    let started = Instant::now();
    let l = tier.lookup("ns", "big", LEASE).await.expect("a lookup of an oversized entry answers");
    let took = started.elapsed();
    assert!(is_miss(&l), "an oversized entry is a miss, not a {}-byte hit", len);
    assert_eq!(tier.ops() - ops, 2, "the plain read (bounded) and the script");
    assert_eq!(tier.stats().undecodable, bad + 1, "counted");
    assert!(!exists(&mut raw, &ek).await, "deleted");
    assert!(took < Duration::from_millis(500), "took {took:?}");
    let ops = tier.ops();
    assert!(is_miss(&tier.lookup("ns", "big", None).await.unwrap()));
    assert_eq!(tier.ops() - ops, 2);
    eprintln!("[poison] {len}-byte entry: a miss in {took:?}, two round trips, deleted");
}

/// Through a cache: a poisoned entry and a poisoned meta hash, read 200 times, never
/// reach the cache as L2 errors, so its L2 breaker (shared by every namespace on the
/// tier) stays closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_keys_do_not_open_the_caches_l2_breaker() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "brk").await;
    let mut raw = raw_conn(&server).await;
    let cache: Cache<u64, String> = Cache::builder("ns").tier(Arc::new(tier.clone())).build().unwrap();
    let ek = tier.entry_key("ns", "1");
    let meta = key_of(&tier, "ns", "m");
    let poisons: &[(&str, &[&[u8]])] = &[
        ("h=-1", &[b"FIELD", ek.as_bytes(), b"h", b"-1"]),
        ("e empty", &[b"FIELD", ek.as_bytes(), b"e", b""]),
        ("string meta", &[b"SET", meta.as_bytes(), b"garbage"]),
    ];
    for (name, poison) in poisons {
        cache.insert(1, "one".to_owned()).await.unwrap();
        assert!(exists(&mut raw, &ek).await, "the cache stores key 1 at {ek}");
        if poison[0] == b"SET" {
            cmd(&mut raw, &[b"DEL", poison[1]]).await;
        }
        if poison[0] == b"FIELD" {
            let field = std::str::from_utf8(poison[2]).expect("a field name");
            set_entry_field(&mut raw, &ek, field, poison[3]).await;
        } else {
            cmd(&mut raw, poison).await;
        }
        let mut errors = 0;
        for _ in 0..200 {
            cache.evict_local(&1);
            if cache.get(&1).await.is_err() {
                errors += 1;
            }
        }
        assert_eq!(errors, 0, "{name}: reads failed");
        assert_eq!(cache.l2_breaker_state(), BreakerState::Closed, "{name}");
        assert_eq!(cache.stats().l2_errors, 0, "{name}");
    }
    eprintln!("[poison] 3 poisons x 200 reads through a cache: no L2 error; tier stats {:?}", tier.stats());
}

/// `max_entry_bytes` is checked at build; a fill over it runs the guard but stores
/// nothing, a set over it invalidates the key; a lookup deletes a larger entry unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_entry_bytes_bounds_lookups_fills_and_sets() {
    let server = RedisServer::start();
    for bad in [0, 1023, (512 << 20) + 1] {
        let e = RedisTier::builder(server.url()).max_entry_bytes(bad).build().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("max_entry_bytes"), "{e}");
    }
    let tier = RedisTier::builder(server.url()).prefix("max").max_entry_bytes(4096).build().await.unwrap();
    assert_eq!(tier.max_entry_bytes(), 4096);
    assert_eq!(redis_tier(&server, "x").await.max_entry_bytes(), strata_redis::tier::DEFAULT_MAX_ENTRY_BYTES);
    let mut raw = raw_conn(&server).await;
    let big = "b".repeat(5000);

    // fill: the guard answers (Stored, or Rejected after an invalidation), nothing is stored
    let old = token(&tier.lookup("ns", "k", LEASE).await.unwrap());
    tier.fill("ns", "k", fresh("small", &[]), TTL, &old).await.unwrap();
    tier.delete("ns", &["k".to_owned()]).await.unwrap();
    let t = token(&tier.lookup("ns", "k", LEASE).await.unwrap());
    assert_eq!(tier.fill("ns", "k", fresh(&big, &[]), TTL, &old).await.unwrap(), FillOutcome::Rejected);
    assert_eq!(tier.fill("ns", "k", fresh(&big, &[]), TTL, &t).await.unwrap(), FillOutcome::Stored);
    assert!(!exists(&mut raw, &tier.entry_key("ns", "k")).await, "not stored");
    assert!(token(&tier.lookup("ns", "k", LEASE).await.unwrap()).leader, "the fill released its lease");
    assert_eq!(tier.stats().oversized, 2);

    // set: the key is invalidated (the old entry gone, older tokens refused)
    let t = token(&tier.lookup("ns", "s", None).await.unwrap());
    tier.set("ns", "s", fresh("small", &[]), TTL).await.unwrap();
    tier.set("ns", "s", fresh(&big, &[]), TTL).await.unwrap();
    assert!(is_miss(&tier.lookup("ns", "s", None).await.unwrap()), "the old value is gone");
    assert_eq!(tier.fill("ns", "s", fresh("late", &[]), TTL, &t).await.unwrap(), FillOutcome::Rejected);
    assert_eq!(tier.stats().oversized, 3);

    // lookup and touch of an entry stored by a tier with a higher limit
    let roomy = redis_tier(&server, "max").await;
    for k in ["l", "t"] {
        let t = token(&roomy.lookup("ns", k, None).await.unwrap());
        assert_eq!(roomy.fill("ns", k, fresh(&big, &[]), TTL, &t).await.unwrap(), FillOutcome::Stored);
    }
    let ops = tier.ops();
    assert!(is_miss(&tier.lookup("ns", "l", None).await.unwrap()));
    assert!(!tier.touch("ns", "t", now().saturating_add(TTL), TTL).await.unwrap());
    assert_eq!(tier.ops() - ops, 3, "the lookup's plain read and script, the touch");
    assert_eq!(tier.stats().undecodable, 2, "{:?}", tier.stats());
    for k in ["l", "t"] {
        assert!(!exists(&mut raw, &tier.entry_key("ns", k)).await, "{k} deleted");
    }
}
