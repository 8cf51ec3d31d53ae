//! The conformance suite every [`Tier`] implementation must pass (feature `testing`):
//! the fill-guard contract (tokens, tombstones, tag and namespace epochs), leases, the
//! version guard, touch, set, negative entries, fail-safe's stale entries, batch
//! lookups and write locks, checked against the tier through its port alone.
//!
//! Run it from the implementation's own tests, on a fresh tier (it uses the namespaces
//! `conf`, `tags`, `nsx`, `touch`, `set`, `rel`, `exp`, `stale`, `neg`, `ver`, `many`
//! and `wl`):
//!
//! ```no_run
//! # async fn example() {
//! strata::testing::conformance::run(&strata::InProcessTier::new(), "in-process").await;
//! # }
//! ```
//!
//! It sleeps a few hundred milliseconds in all (leases and TTLs expire in real time,
//! since a remote tier keeps its own clock). A failed check panics with the label and
//! what was expected.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::scope::Scope;
use crate::tier::{Envelope, FillOutcome, FillToken, Lookup, Tier};

/// Runs every part of the suite on `tier`; `label` names it in failure messages.
pub async fn run(tier: &dyn Tier, label: &str) {
    let started = Instant::now();
    core(tier, label).await;
    versions(tier, label).await;
    lookup_many(tier, label).await;
    write_locks(tier, label).await;
    hot_key_ranking(tier, label).await;
    eprintln!("[conformance] {label}: every part passed in {:?}", started.elapsed());
}

/// Tag-epoch pruning (see [`TierConfig::max_tag_epochs`](crate::tier::TierConfig)):
/// run it on a fresh tier built with a tag-epoch cap of `cap` (it uses the namespace
/// `prune` and invalidates `3 * cap` distinct tags, so keep `cap` small for a remote
/// tier). Checks that pruning never makes valid again an entry, or accepts a fill in
/// flight, that a pruned tag's invalidation had invalidated, and that untagged entries
/// and fills begun after the invalidations are not affected.
pub async fn tag_pruning(tier: &dyn Tier, label: &str, cap: usize) {
    let ns = "prune";
    let call = "tier call";
    let t = token(&tier.lookup(ns, "victim", None).await.expect(call));
    let stored = tier.fill(ns, "victim", fresh("old", &["doomed"]), TTL, &t).await.expect(call);
    assert_eq!(stored, FillOutcome::Stored, "{label}");
    let t = token(&tier.lookup(ns, "plain", None).await.expect(call));
    let stored = tier.fill(ns, "plain", fresh("plain", &[]), TTL, &t).await.expect(call);
    assert_eq!(stored, FillOutcome::Stored, "{label}");
    // A load in flight across the invalidation: its token predates it.
    let in_flight = token(&tier.lookup(ns, "late", None).await.expect(call));
    tier.invalidate_tag(ns, "doomed").await.expect(call);
    // The victim is not looked up before the pruning (a lookup would delete it): it is
    // still stored, stamped before the invalidation, and only the pruned epoch (now the
    // floor) can refuse it.
    for i in 0..cap * 3 {
        tier.invalidate_tag(ns, &format!("other:{i}")).await.expect(call);
    }
    assert!(
        is_miss(&tier.lookup(ns, "victim", None).await.expect(call)),
        "{label}: an entry invalidated by a pruned tag stays invalid"
    );
    let refused = tier.fill(ns, "late", fresh("old", &["doomed"]), TTL, &in_flight).await.expect(call);
    assert_eq!(refused, FillOutcome::Rejected, "{label}: a fill begun before a pruned tag's invalidation");
    assert_eq!(
        hit_value(&tier.lookup(ns, "plain", None).await.expect(call)).as_deref(),
        Some("plain"),
        "{label}: untagged entries are not affected by pruning"
    );
    let t = token(&tier.lookup(ns, "late", None).await.expect(call));
    let stored = tier.fill(ns, "late", fresh("new", &["doomed"]), TTL, &t).await.expect(call);
    assert_eq!(stored, FillOutcome::Stored, "{label}: a fill begun after every invalidation");
    assert_eq!(
        hit_value(&tier.lookup(ns, "late", None).await.expect(call)).as_deref(),
        Some("new"),
        "{label}"
    );
}

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
        schema: SCHEMA,
    }
}

/// The schema fingerprint of the suite's envelopes: stored and returned as is.
const SCHEMA: u64 = 0x5c4e_3a00_0000_0001;

fn fresh(value: &str, tags: &[&str]) -> Envelope {
    envelope(value, tags, Duration::from_secs(60), Duration::from_secs(120))
}

fn versioned(value: &str, version: u64) -> Envelope {
    Envelope { version: Some(version), ..fresh(value, &[]) }
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

/// The version guard: a fill never replaces a valid entry of a newer version, while
/// `set` (what the database now holds) always does.
async fn versions(tier: &dyn Tier, label: &str) {
    let older = token(&tier.lookup("ver", "k", None).await.expect("tier call"));
    let newer = token(&tier.lookup("ver", "k", None).await.expect("tier call"));
    assert_eq!(
        tier.fill("ver", "k", versioned("v2", 2), TTL, &newer).await.expect("tier call"),
        FillOutcome::Stored
    );
    assert_eq!(
        tier.fill("ver", "k", versioned("v1", 1), TTL, &older).await.expect("tier call"),
        FillOutcome::Superseded,
        "{label}: an older version must not replace a newer one"
    );
    assert_eq!(
        hit_value(&tier.lookup("ver", "k", None).await.expect("tier call")).as_deref(),
        Some("v2"),
        "{label}"
    );
    // The same or a newer version, or a fill without a version, is stored.
    let t = token(&tier.lookup("ver", "j", None).await.expect("tier call"));
    assert_eq!(
        tier.fill("ver", "j", versioned("j2", 2), TTL, &t).await.expect("tier call"),
        FillOutcome::Stored
    );
    assert_eq!(
        tier.fill("ver", "j", versioned("j3", 3), TTL, &t).await.expect("tier call"),
        FillOutcome::Stored
    );
    let unversioned = Envelope { version: None, ..fresh("j-none", &[]) };
    assert_eq!(
        tier.fill("ver", "j", unversioned, TTL, &t).await.expect("tier call"),
        FillOutcome::Stored,
        "{label}"
    );
    // An invalidated newer entry does not block: the guard looks at valid entries only.
    let t = token(&tier.lookup("ver", "i", None).await.expect("tier call"));
    assert_eq!(
        tier.fill("ver", "i", versioned("i5", 5), TTL, &t).await.expect("tier call"),
        FillOutcome::Stored
    );
    tier.invalidate_namespace("ver").await.expect("tier call");
    let t = token(&tier.lookup("ver", "i", None).await.expect("tier call"));
    assert_eq!(
        tier.fill("ver", "i", versioned("i4", 4), TTL, &t).await.expect("tier call"),
        FillOutcome::Stored,
        "{label}"
    );
    // set is not guarded.
    tier.set("ver", "i", versioned("i1", 1), TTL).await.expect("tier call");
    assert_eq!(
        hit_value(&tier.lookup("ver", "i", None).await.expect("tier call")).as_deref(),
        Some("i1"),
        "{label}"
    );
}

/// Batch lookups answer what single lookups would, in order, leases included.
async fn lookup_many(tier: &dyn Tier, label: &str) {
    let keys: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    for k in keys.iter().step_by(2) {
        let t = token(&tier.lookup("many", k, None).await.expect("tier call"));
        tier.fill("many", k, fresh(k, &[]), TTL, &t).await.expect("tier call");
    }
    let out = tier.lookup_many("many", &keys, LEASE).await.expect("tier call");
    assert_eq!(out.len(), keys.len(), "{label}");
    for (i, (k, l)) in keys.iter().zip(&out).enumerate() {
        if i % 2 == 0 {
            assert_eq!(hit_value(l).as_deref(), Some(k.as_str()), "{label}: {k}");
        } else {
            let t = token(l);
            assert!(t.leader && t.lease.is_some(), "{label}: {k} leased by the batch");
        }
    }
    let again = tier.lookup_many("many", &keys[1..2], LEASE).await.expect("tier call");
    assert!(!token(&again[0]).leader, "{label}: leases taken by a batch hold");
    assert!(tier.lookup_many("many", &[], None).await.expect("tier call").is_empty(), "{label}");
}

async fn core(tier: &dyn Tier, label: &str) {
    let started = Instant::now();

    // Miss without lease: leader, no lease.
    let l = tier.lookup("conf", "plain", None).await.expect("tier call");
    let t = token(&l);
    assert!(t.leader && t.lease.is_none(), "{label}: plain miss {t:?}");

    // Lease granted once; a second lookup is not the leader.
    let first = token(&tier.lookup("conf", "k1", LEASE).await.expect("tier call"));
    assert!(first.leader && first.lease.is_some(), "{label}: first lease {first:?}");
    let second = token(&tier.lookup("conf", "k1", LEASE).await.expect("tier call"));
    assert!(!second.leader && second.lease.is_none(), "{label}: second lookup must wait {second:?}");

    // The leader's fill is stored and read back with the token's stamp.
    assert_eq!(
        tier.fill("conf", "k1", fresh("v1", &[]), TTL, &first).await.expect("tier call"),
        FillOutcome::Stored
    );
    match tier.lookup("conf", "k1", LEASE).await.expect("tier call") {
        Lookup::Hit(e) => {
            assert_eq!(e.value.as_deref(), Some(&b"v1"[..]), "{label}");
            assert_eq!(e.stamp, first.stamp, "{label}: entry stamped with the token's stamp");
            assert_eq!(e.version, Some(7));
            assert_eq!(e.load_nanos, 1234);
            assert_eq!(e.schema, SCHEMA, "{label}: the schema fingerprint comes back as stored");
        }
        other => panic!("{label}: expected a hit, got {other:?}"),
    }

    // Fill after delete is rejected (tombstone), and the delete removed the entry.
    let t = token(&tier.lookup("conf", "k2", None).await.expect("tier call"));
    tier.delete("conf", &["k2".to_owned()]).await.expect("tier call");
    assert_eq!(
        tier.fill("conf", "k2", fresh("old", &[]), TTL, &t).await.expect("tier call"),
        FillOutcome::Rejected,
        "{label}: fill after delete"
    );
    assert!(is_miss(&tier.lookup("conf", "k2", None).await.expect("tier call")), "{label}");
    // A delete of another key does not reject this key's fill.
    let t = token(&tier.lookup("conf", "k3", None).await.expect("tier call"));
    tier.delete("conf", &["other".to_owned()]).await.expect("tier call");
    assert_eq!(
        tier.fill("conf", "k3", fresh("v3", &[]), TTL, &t).await.expect("tier call"),
        FillOutcome::Stored
    );
    // A delete removes a stored entry and voids nothing else.
    tier.delete("conf", &["k3".to_owned(), "k1".to_owned()]).await.expect("tier call");
    assert!(is_miss(&tier.lookup("conf", "k3", None).await.expect("tier call")), "{label}: deleted");
    // The delete also voided k1's lease (released already by the fill): a new leader.
    let t = token(&tier.lookup("conf", "k1", LEASE).await.expect("tier call"));
    assert!(t.leader && t.lease.is_some(), "{label}: lease after delete {t:?}");

    // Tag invalidation hides entries carrying the tag, and rejects older fills.
    let ta = token(&tier.lookup("tags", "a", None).await.expect("tier call"));
    let tb = token(&tier.lookup("tags", "b", None).await.expect("tier call"));
    assert_eq!(
        tier.fill("tags", "a", fresh("a", &["red", "x"]), TTL, &ta).await.expect("tier call"),
        FillOutcome::Stored
    );
    let t_late = token(&tier.lookup("tags", "c", None).await.expect("tier call"));
    tier.invalidate_tag("tags", "red").await.expect("tier call");
    assert!(
        is_miss(&tier.lookup("tags", "a", None).await.expect("tier call")),
        "{label}: tagged entry hidden"
    );
    assert_eq!(
        tier.fill("tags", "c", fresh("c", &["red"]), TTL, &t_late).await.expect("tier call"),
        FillOutcome::Rejected,
        "{label}: fill that began before the tag invalidation"
    );
    // Untagged (or other-tag) fills from before are fine.
    assert_eq!(
        tier.fill("tags", "b", fresh("b", &["blue"]), TTL, &tb).await.expect("tier call"),
        FillOutcome::Stored
    );
    assert_eq!(hit_value(&tier.lookup("tags", "b", None).await.expect("tier call")).as_deref(), Some("b"));
    // A fill after the invalidation is stored and visible.
    let t = token(&tier.lookup("tags", "a", None).await.expect("tier call"));
    assert_eq!(
        tier.fill("tags", "a", fresh("a2", &["red"]), TTL, &t).await.expect("tier call"),
        FillOutcome::Stored
    );
    assert_eq!(hit_value(&tier.lookup("tags", "a", None).await.expect("tier call")).as_deref(), Some("a2"));

    // Namespace invalidation hides everything, rejects older fills, voids leases, and
    // leaves other namespaces alone.
    let t_old = token(&tier.lookup("nsx", "p", None).await.expect("tier call"));
    let t = token(&tier.lookup("nsx", "q", None).await.expect("tier call"));
    assert_eq!(
        tier.fill("nsx", "q", fresh("q", &[]), TTL, &t).await.expect("tier call"),
        FillOutcome::Stored
    );
    let leased = token(&tier.lookup("nsx", "r", LEASE).await.expect("tier call"));
    assert!(leased.leader);
    tier.invalidate_namespace("nsx").await.expect("tier call");
    assert!(is_miss(&tier.lookup("nsx", "q", None).await.expect("tier call")), "{label}: namespace hidden");
    assert_eq!(
        tier.fill("nsx", "p", fresh("p", &[]), TTL, &t_old).await.expect("tier call"),
        FillOutcome::Rejected
    );
    let t = token(&tier.lookup("nsx", "r", LEASE).await.expect("tier call"));
    assert!(t.leader && t.lease.is_some(), "{label}: namespace invalidation voids leases {t:?}");
    assert_eq!(
        hit_value(&tier.lookup("tags", "b", None).await.expect("tier call")).as_deref(),
        Some("b"),
        "{label}"
    );

    // Touch extends a live entry; touching a missing one says so.
    let t = token(&tier.lookup("touch", "s", None).await.expect("tier call"));
    let short = Duration::from_millis(400);
    assert_eq!(
        tier.fill("touch", "s", envelope("s", &[], short, short), short, &t).await.expect("tier call"),
        FillOutcome::Stored
    );
    let new_soft = now().saturating_add(Duration::from_secs(30));
    assert!(
        tier.touch("touch", "s", new_soft, Duration::from_secs(30)).await.expect("tier call"),
        "{label}: touch"
    );
    assert!(
        !tier.touch("touch", "missing", new_soft, TTL).await.expect("tier call"),
        "{label}: touch missing"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    match tier.lookup("touch", "s", None).await.expect("tier call") {
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
    let t = token(&tier.lookup("touch", "u", None).await.expect("tier call"));
    tier.fill("touch", "u", envelope("u", &[], short, short), Duration::from_millis(150), &t)
        .await
        .expect("tier call");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(is_miss(&tier.lookup("touch", "u", None).await.expect("tier call")), "{label}: expired");
    // Touch does not revive an invalidated entry.
    let t = token(&tier.lookup("touch", "v", None).await.expect("tier call"));
    tier.fill("touch", "v", fresh("v", &["gone"]), TTL, &t).await.expect("tier call");
    tier.invalidate_tag("touch", "gone").await.expect("tier call");
    assert!(!tier.touch("touch", "v", new_soft, TTL).await.expect("tier call"), "{label}: touch invalid");

    // set voids the lease, counts as an invalidation (older fills rejected) and is read.
    let leader = token(&tier.lookup("set", "k", LEASE).await.expect("tier call"));
    assert!(leader.leader);
    tier.set("set", "k", fresh("explicit", &["s"]), TTL).await.expect("tier call");
    assert_eq!(
        hit_value(&tier.lookup("set", "k", LEASE).await.expect("tier call")).as_deref(),
        Some("explicit")
    );
    assert_eq!(
        tier.fill("set", "k", fresh("loaded-before", &[]), TTL, &leader).await.expect("tier call"),
        FillOutcome::Rejected,
        "{label}: a fill that began before set must not overwrite it"
    );
    assert_eq!(
        hit_value(&tier.lookup("set", "k", None).await.expect("tier call")).as_deref(),
        Some("explicit")
    );
    tier.invalidate_tag("set", "s").await.expect("tier call");
    let t = token(&tier.lookup("set", "k", LEASE).await.expect("tier call"));
    assert!(t.leader && t.lease.is_some(), "{label}: set voided the lease {t:?}");

    // A fill releases its own lease.
    let t = token(&tier.lookup("rel", "k", LEASE).await.expect("tier call"));
    tier.fill("rel", "k", fresh("x", &["t"]), TTL, &t).await.expect("tier call");
    tier.invalidate_tag("rel", "t").await.expect("tier call");
    let t2 = token(&tier.lookup("rel", "k", LEASE).await.expect("tier call"));
    assert!(t2.leader && t2.lease.is_some(), "{label}: lease released by the fill {t2:?}");

    // Leases expire.
    let t = token(&tier.lookup("exp", "k", Some(Duration::from_millis(100))).await.expect("tier call"));
    assert!(t.leader);
    assert!(
        !token(&tier.lookup("exp", "k", Some(Duration::from_millis(100))).await.expect("tier call")).leader
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        token(&tier.lookup("exp", "k", Some(Duration::from_millis(100))).await.expect("tier call")).leader,
        "{label}"
    );

    // Soft-expired but valid: a miss carrying the stale entry (fail-safe), with a lease.
    let t = token(&tier.lookup("stale", "k", None).await.expect("tier call"));
    let env = envelope("old", &[], Duration::ZERO, Duration::from_secs(60));
    tier.fill("stale", "k", env, TTL, &t).await.expect("tier call");
    tokio::time::sleep(Duration::from_millis(5)).await;
    match tier.lookup("stale", "k", LEASE).await.expect("tier call") {
        Lookup::Miss { token, stale: Some(e) } => {
            assert!(token.leader && token.lease.is_some(), "{label}");
            assert_eq!(e.value.as_deref(), Some(&b"old"[..]));
            assert_eq!(e.stamp, t.stamp);
        }
        other => panic!("{label}: expected a stale miss, got {other:?}"),
    }
    // Invalidated entries are not offered as stale.
    tier.delete("stale", &["k".to_owned()]).await.expect("tier call");
    match tier.lookup("stale", "k", None).await.expect("tier call") {
        Lookup::Miss { stale: None, .. } => {}
        other => panic!("{label}: deleted entry offered as stale: {other:?}"),
    }

    // A negative result (value None) round-trips.
    let t = token(&tier.lookup("neg", "k", None).await.expect("tier call"));
    let mut env = fresh("", &[]);
    env.value = None;
    tier.fill("neg", "k", env, TTL, &t).await.expect("tier call");
    match tier.lookup("neg", "k", None).await.expect("tier call") {
        Lookup::Hit(e) => assert_eq!(e.value, None),
        other => panic!("{label}: negative entry {other:?}"),
    }

    eprintln!("[conformance] {label}: core scenario passed in {:?}", started.elapsed());
}

/// Write locks: poisoned tokens while a lock holds (and after it expired), several
/// writers per key, tag and namespace scopes, and the re-invalidation on unlock.
async fn write_locks(tier: &dyn Tier, label: &str) {
    let keys = Scope::Keys(vec!["k".to_owned()]);
    let fill = |key: &'static str, t: FillToken| async move {
        tier.fill("wl", key, fresh("v", &[]), TTL, &t).await.expect("tier call")
    };
    // An entry present before the lock is dropped by it.
    let t = token(&tier.lookup("wl", "k", None).await.expect("tier call"));
    assert_eq!(fill("k", t).await, FillOutcome::Stored, "{label}");
    let before = token(&tier.lookup("wl", "other", None).await.expect("tier call"));
    assert!(!before.is_poisoned(), "{label}: no lock, no poison");
    let before_k = FillToken { stamp: before.stamp, lease: None, leader: true };
    tier.lock("wl", &keys, 1, Duration::from_millis(400)).await.expect("tier call");
    tier.lock("wl", &keys, 2, Duration::from_millis(400)).await.expect("tier call");
    assert!(
        is_miss(&tier.lookup("wl", "k", None).await.expect("tier call")),
        "{label}: the lock deletes the entry"
    );
    assert_eq!(fill("k", before_k).await, FillOutcome::Rejected, "{label}: token from before the lock");
    let under = token(&tier.lookup("wl", "k", LEASE).await.expect("tier call"));
    assert!(under.is_poisoned(), "{label}: a token under a lock says so");
    assert_eq!(fill("k", under.clone()).await, FillOutcome::Rejected, "{label}: token from under the lock");
    // Other keys are not affected.
    let t = token(&tier.lookup("wl", "other", None).await.expect("tier call"));
    assert_eq!(fill("other", t).await, FillOutcome::Stored, "{label}");
    // One writer releases: the other one's lock still holds.
    tier.unlock("wl", &keys, 1).await.expect("tier call");
    let still = token(&tier.lookup("wl", "k", None).await.expect("tier call"));
    assert_eq!(fill("k", still.clone()).await, FillOutcome::Rejected, "{label}: second lock still held");
    // The second is never released: it expires, and its poisoned tokens stay refused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fill("k", under).await, FillOutcome::Rejected, "{label}: poisoned token after expiry");
    assert_eq!(fill("k", still).await, FillOutcome::Rejected, "{label}: poisoned token after expiry");
    let after = token(&tier.lookup("wl", "k", None).await.expect("tier call"));
    assert!(!after.is_poisoned(), "{label}: not poisoned after the expiry");
    assert_eq!(fill("k", after).await, FillOutcome::Stored, "{label}: free after the expiry");
    // Unlock invalidates again: a token from before the unlock cannot fill.
    tier.lock("wl", &keys, 3, Duration::from_secs(5)).await.expect("tier call");
    tier.unlock("wl", &keys, 3).await.expect("tier call");
    assert!(is_miss(&tier.lookup("wl", "k", None).await.expect("tier call")), "{label}");
    // Unlocking an unknown lock is fine.
    tier.unlock("wl", &keys, 99).await.expect("tier call");

    // Tag scope: entries with the tag are invalidated, every key's tokens poisoned.
    let t = token(&tier.lookup("wl", "tagged", None).await.expect("tier call"));
    tier.fill("wl", "tagged", fresh("v", &["red"]), TTL, &t).await.expect("tier call");
    tier.lock("wl", &Scope::tag("red"), 4, Duration::from_secs(5)).await.expect("tier call");
    assert!(
        is_miss(&tier.lookup("wl", "tagged", None).await.expect("tier call")),
        "{label}: tagged entry invalidated"
    );
    let t = token(&tier.lookup("wl", "plain", None).await.expect("tier call"));
    assert!(t.is_poisoned(), "{label}: tag lock poisons every key");
    assert_eq!(fill("plain", t).await, FillOutcome::Rejected, "{label}: tag lock poisons every key");
    tier.unlock("wl", &Scope::tag("red"), 4).await.expect("tier call");
    let t = token(&tier.lookup("wl", "plain", None).await.expect("tier call"));
    assert_eq!(fill("plain", t).await, FillOutcome::Stored, "{label}");

    // Namespace scope.
    tier.lock("wl", &Scope::All, 5, Duration::from_secs(5)).await.expect("tier call");
    assert!(
        is_miss(&tier.lookup("wl", "plain", None).await.expect("tier call")),
        "{label}: namespace invalidated"
    );
    let t = token(&tier.lookup("wl", "plain", None).await.expect("tier call"));
    assert_eq!(fill("plain", t).await, FillOutcome::Rejected, "{label}");
    tier.unlock("wl", &Scope::All, 5).await.expect("tier call");
    let t = token(&tier.lookup("wl", "plain", None).await.expect("tier call"));
    assert_eq!(fill("plain", t).await, FillOutcome::Stored, "{label}");
}

/// The shared hot-key ranking of warm-up: ranked by decayed counts, trimmed, per
/// namespace.
async fn hot_key_ranking(tier: &dyn Tier, label: &str) {
    let counts = |pairs: &[(&str, u64)]| -> Vec<(String, u64)> {
        pairs.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect()
    };
    assert!(tier.hot_keys("hk", 10).await.expect("tier call").is_empty(), "{label}: no ranking yet");
    tier.record_hot_keys("hk", &counts(&[("a", 10), ("b", 5), ("c", 1)]), 2).await.expect("tier call");
    assert_eq!(tier.hot_keys("hk", 10).await.expect("tier call"), ["a", "b"], "{label}: trimmed to 2");
    // Halved (a 5, b 2.5) before c's 100 is added: c leads, b is trimmed.
    tier.record_hot_keys("hk", &counts(&[("c", 100)]), 2).await.expect("tier call");
    assert_eq!(tier.hot_keys("hk", 10).await.expect("tier call"), ["c", "a"], "{label}: decayed");
    assert_eq!(tier.hot_keys("hk", 1).await.expect("tier call"), ["c"], "{label}: top 1");
    assert!(tier.hot_keys("hk-other", 10).await.expect("tier call").is_empty(), "{label}: per namespace");
}
