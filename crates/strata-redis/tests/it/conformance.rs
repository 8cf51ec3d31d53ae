//! The tier conformance suite: one scenario that every [`Tier`] must pass, run against
//! strata's in-process reference tier and against Redis by `tier_conformance_in_process_and_redis`.
//!
//! Self-contained on purpose: it uses strata's public API only (no strata-redis type, no
//! test kit, no helper of this test crate), so that it can move into the `strata` crate
//! as is.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use strata::clock::{Clock, SystemClock, Timestamp};
use strata::tier::{Envelope, FillOutcome, FillToken, LockScope, Lookup, Tier};

/// Runs the whole suite against `tier`; `label` names the tier in failure messages.
///
/// Uses the namespaces `conf`, `tags`, `nsx`, `touch`, `set`, `rel`, `exp`, `stale`,
/// `neg` and `wl`, which must be empty; takes about two seconds (it waits for expiries).
pub async fn run(tier: &dyn Tier, label: &str) {
    let started = Instant::now();
    scenario(tier, label).await;
    write_locks(tier, label).await;
    eprintln!("[conformance] {label}: scenario passed in {:?}", started.elapsed());
}

const TTL: Duration = Duration::from_secs(60);
const LEASE: Option<Duration> = Some(Duration::from_secs(5));

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

/// Fill guards, leases, tombstones, tag and namespace invalidation, touch, set,
/// stale fallbacks and negative entries.
async fn scenario(tier: &dyn Tier, label: &str) {
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
