//! The conformance suite every [`WriteBehindQueue`] implementation must pass (feature
//! `testing`): coalescing, due times, exclusive claims and their expiry, acknowledgement
//! by sequence, retries and dead letters, requeueing, releases, limits and figures,
//! checked through the port alone.
//!
//! Run it from the implementation's own tests on a fresh queue (it uses namespaces
//! whose names start with `wbconf`):
//!
//! ```no_run
//! # async fn example() {
//! strata::testing::queue_conformance::run(&strata::InProcessQueue::new(), "in-process").await;
//! # }
//! ```
//!
//! It sleeps about half a second in all (claims expire in the queue's real time). A
//! failed check panics with the label and what was expected.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::queue::{AckOutcome, QueueLimits, RetryOutcome, SaveOutcome, WriteBehindQueue};

const NOW: Duration = Duration::ZERO;
const LATER: Duration = Duration::from_secs(3600);
const LEASE: Duration = Duration::from_secs(60);

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn save(q: &dyn WriteBehindQueue, ns: &str, key: &str, value: &str, delay: Duration) -> (u64, bool) {
    match q.save(ns, key, b(value), delay, QueueLimits::default()).await {
        Ok(SaveOutcome::Queued { seq, replaced }) => (seq, replaced),
        other => panic!("save {ns}/{key}: expected Queued, got {other:?}"),
    }
}

/// Runs every part of the suite on `queue`; `label` names it in failure messages.
pub async fn run(queue: &dyn WriteBehindQueue, label: &str) {
    let started = Instant::now();
    coalescing(queue, label).await;
    claims(queue, label).await;
    ack_by_sequence(queue, label).await;
    dead_letters(queue, label).await;
    limits_and_figures(queue, label).await;
    eprintln!("[queue conformance] {label}: every part passed in {:?}", started.elapsed());
}

async fn coalescing(q: &dyn WriteBehindQueue, label: &str) {
    let ns = "wbconf-coalesce";
    let (first, replaced) = save(q, ns, "k", "v0", NOW).await;
    assert!(!replaced, "{label}: the first save of a key replaces nothing");
    let mut last = first;
    for i in 1..100 {
        let (seq, replaced) = save(q, ns, "k", &format!("v{i}"), NOW).await;
        assert!(seq > last, "{label}: sequences grow per key ({seq} after {last})");
        assert!(replaced, "{label}: a save to a waiting key replaces its value");
        last = seq;
    }
    assert_eq!(
        q.pending_value(ns, "k").await.ok().flatten(),
        Some(b("v99")),
        "{label}: the latest value waits"
    );
    assert_eq!(
        q.pending_value(ns, "other").await.ok().flatten(),
        None,
        "{label}: an unsaved key has nothing waiting"
    );
    assert_eq!(
        q.pending_value("wbconf-elsewhere", "k").await.ok().flatten(),
        None,
        "{label}: namespaces are apart"
    );
    let claimed = q.claim_due(ns, "a", 10, LEASE).await.expect("claim");
    assert_eq!(claimed.len(), 1, "{label}: 100 saves of one key are one claim");
    assert_eq!(
        (claimed[0].value.clone(), claimed[0].seq),
        (b("v99"), last),
        "{label}: the claim holds the latest save"
    );
    assert_eq!(
        q.ack(ns, "k", last).await.expect("ack"),
        AckOutcome::Flushed,
        "{label}: acking the latest forgets it"
    );
    assert_eq!(q.pending_value(ns, "k").await.ok().flatten(), None, "{label}: a flushed key waits no more");
    let (after, _) = save(q, ns, "k", "again", NOW).await;
    assert!(after > last, "{label}: sequences keep growing after a key was flushed ({after} after {last})");
}

async fn claims(q: &dyn WriteBehindQueue, label: &str) {
    let ns = "wbconf-claims";
    save(q, ns, "later", "x", LATER).await;
    assert!(
        q.claim_due(ns, "a", 10, LEASE).await.expect("claim").is_empty(),
        "{label}: a key is not due before its delay"
    );
    // Saving again keeps the first due time (a key saved every second still flushes).
    assert_eq!(
        q.make_due(ns, Some("later")).await.expect("make_due"),
        1,
        "{label}: make_due moves a later key"
    );
    let got = q.claim_due(ns, "a", 10, Duration::from_millis(150)).await.expect("claim");
    assert_eq!(got.len(), 1, "{label}: a key made due is claimable");
    assert!(
        q.claim_due(ns, "b", 10, LEASE).await.expect("claim").is_empty(),
        "{label}: a claimed key is no one else's"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let taken = q.claim_due(ns, "b", 10, LEASE).await.expect("claim");
    assert_eq!(taken.len(), 1, "{label}: a claim that ran out lets another flusher take the key");
    let retried = q.retry(ns, "a", "later", got[0].seq, NOW, "late", 5, false).await.expect("retry");
    assert_eq!(retried, RetryOutcome::NotClaimed, "{label}: a flusher whose claim was taken cannot retry it");
    q.release(ns, "b", "later").await.expect("release");
    assert_eq!(
        q.claim_due(ns, "c", 10, LEASE).await.expect("claim").len(),
        1,
        "{label}: a released key is due"
    );
}

async fn ack_by_sequence(q: &dyn WriteBehindQueue, label: &str) {
    let ns = "wbconf-ack";
    let (s1, _) = save(q, ns, "k", "old", NOW).await;
    let got = q.claim_due(ns, "a", 10, LEASE).await.expect("claim");
    assert_eq!(got.len(), 1, "{label}: claim");
    // Saved during the flush.
    let (s2, replaced) = save(q, ns, "k", "new", NOW).await;
    assert!(s2 > s1 && replaced, "{label}: a save during a flush replaces the waiting value");
    assert_eq!(
        q.ack(ns, "k", s1).await.expect("ack"),
        AckOutcome::Newer,
        "{label}: acking an older sequence keeps the newer save"
    );
    assert_eq!(
        q.pending_value(ns, "k").await.ok().flatten(),
        Some(b("new")),
        "{label}: the newer save waits"
    );
    let again = q.claim_due(ns, "b", 10, LEASE).await.expect("claim");
    assert_eq!(again.len(), 1, "{label}: the newer save is due at once");
    assert_eq!((again[0].value.clone(), again[0].seq), (b("new"), s2), "{label}: and holds the newer value");
    assert_eq!(q.ack(ns, "k", s2).await.expect("ack"), AckOutcome::Flushed, "{label}: ack the newer save");
    assert_eq!(
        q.ack(ns, "k", s2).await.expect("ack"),
        AckOutcome::Flushed,
        "{label}: a repeated ack is harmless"
    );
}

async fn dead_letters(q: &dyn WriteBehindQueue, label: &str) {
    let ns = "wbconf-dead";
    let (seq, _) = save(q, ns, "poison", "p", NOW).await;
    for attempt in 1..=3u32 {
        let got = q.claim_due(ns, "a", 10, LEASE).await.expect("claim");
        assert_eq!(got.len(), 1, "{label}: attempt {attempt} claims the failing key");
        assert_eq!(got[0].attempts, attempt - 1, "{label}: the claim carries the attempts so far");
        let out = q.retry(ns, "a", "poison", seq, NOW, "boom", 3, false).await.expect("retry");
        let want = if attempt < 3 {
            RetryOutcome::Retrying { attempts: attempt }
        } else {
            RetryOutcome::DeadLettered { attempts: 3 }
        };
        assert_eq!(out, want, "{label}: attempt {attempt}");
    }
    assert!(
        q.claim_due(ns, "a", 10, LEASE).await.expect("claim").is_empty(),
        "{label}: a dead letter is not due"
    );
    assert_eq!(
        q.pending_value(ns, "poison").await.ok().flatten(),
        Some(b("p")),
        "{label}: a dead letter stays readable"
    );
    let dead = q.dead_letters(ns, 10).await.expect("dead letters");
    assert_eq!(dead.len(), 1, "{label}: one dead letter");
    assert_eq!(
        (dead[0].key.as_str(), dead[0].seq, dead[0].attempts, dead[0].error.as_str()),
        ("poison", seq, 3, "boom"),
        "{label}: the dead letter says what failed"
    );
    assert_eq!(q.stats(ns).await.expect("stats").dead, 1, "{label}: stats count the dead letter");
    assert_eq!(q.requeue_dead(ns, Some("poison")).await.expect("requeue"), 1, "{label}: requeue");
    let got = q.claim_due(ns, "a", 10, LEASE).await.expect("claim");
    assert_eq!(
        (got.len(), got.first().map(|g| g.attempts)),
        (1, Some(0)),
        "{label}: a requeued key is due with its attempts reset"
    );
    // A permanent error dead-letters at once; a new save gives the key a fresh start.
    let out = q.retry(ns, "a", "poison", seq, NOW, "constraint", 10, true).await.expect("retry");
    assert_eq!(
        out,
        RetryOutcome::DeadLettered { attempts: 1 },
        "{label}: a permanent error dead-letters at once"
    );
    let (_, replaced) = save(q, ns, "poison", "fixed", NOW).await;
    assert!(!replaced, "{label}: a save to a dead-lettered key replaces no waiting write");
    assert!(
        q.dead_letters(ns, 10).await.expect("dead").is_empty(),
        "{label}: a new save takes the key out of the dead letters"
    );
    let got = q.claim_due(ns, "a", 10, LEASE).await.expect("claim");
    assert_eq!(
        (got.len(), got.first().map(|g| g.value.clone())),
        (1, Some(b("fixed"))),
        "{label}: the new save is due"
    );
}

async fn limits_and_figures(q: &dyn WriteBehindQueue, label: &str) {
    let ns = "wbconf-limits";
    let limits = QueueLimits { max_entries: 2, max_bytes: 1_000 };
    for key in ["a", "b"] {
        let out = q.save(ns, key, b("12345"), LATER, limits).await.expect("save");
        assert!(matches!(out, SaveOutcome::Queued { .. }), "{label}: below the bound: {out:?}");
    }
    let full = q.save(ns, "c", b("1"), LATER, limits).await.expect("save");
    let SaveOutcome::Full { seq } = full else {
        panic!("{label}: a third key past max_entries 2 is refused, got {full:?}")
    };
    assert!(seq > 0, "{label}: a refused save still reserves a sequence");
    assert_eq!(q.pending_value(ns, "c").await.ok().flatten(), None, "{label}: a refused save leaves nothing");
    let out = q.save(ns, "a", b("1234567890"), LATER, limits).await.expect("save");
    assert!(
        matches!(out, SaveOutcome::Queued { replaced: true, .. }),
        "{label}: a waiting key is always saved: {out:?}"
    );
    let bytes =
        q.save("wbconf-bytes", "big", Bytes::from(vec![0u8; 2_000]), LATER, limits).await.expect("save");
    assert!(
        matches!(bytes, SaveOutcome::Full { .. }),
        "{label}: a value past max_bytes is refused: {bytes:?}"
    );
    let st = q.stats(ns).await.expect("stats");
    assert_eq!((st.pending, st.pending_bytes, st.dead), (2, 15, 0), "{label}: 2 keys of 10 + 5 bytes wait");
    let oldest = st.oldest_ms.expect("an oldest save");
    assert!(
        oldest <= st.now_ms && st.now_ms - oldest < 60_000,
        "{label}: the oldest save is recent ({oldest} vs {})",
        st.now_ms
    );
    assert_eq!(
        q.stats("wbconf-empty").await.expect("stats").pending,
        0,
        "{label}: an unknown namespace is empty"
    );
}
