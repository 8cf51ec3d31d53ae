//! The fleet under a hostile backplane: `invalidate` while the backplane stalls (fail
//! fast into the outbox, published in order and nothing lost once it is back), and forged or extreme
//! messages (each costs at most one repair; sequence tracking recovers).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use strata::backplane::{Backplane, Message, MessageBody, Mode, OriginId, Subscription};
use strata::{Cache, CacheStats, ErrorKind, InProcessBackplane, InProcessTier, Scope};
use tokio::sync::Notify;

use crate::support::{Db, NS, fleet, strong_fleet};

/// Waits up to ten seconds for `cond`: generous, since the waits here are for
/// background tasks (heartbeats, retries) on a possibly busy machine.
async fn within(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A connection to an in-process hub whose publishes can be made to hang, like a
/// paused or unreachable Redis: a publish started while stalled waits until released.
struct StallingBackplane {
    inner: InProcessBackplane,
    stalled: AtomicBool,
    released: Notify,
    /// Invalidations (not heartbeats) whose publish found the backplane stalled.
    stalled_invalidations: AtomicU64,
    /// Calls that published more than one message.
    batches: AtomicU64,
}

impl StallingBackplane {
    fn new(inner: InProcessBackplane) -> Self {
        StallingBackplane {
            inner,
            stalled: AtomicBool::new(false),
            released: Notify::new(),
            stalled_invalidations: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        }
    }

    fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::SeqCst);
        if !on {
            self.released.notify_waiters();
        }
    }
}

#[async_trait]
impl Backplane for StallingBackplane {
    fn name(&self) -> &str {
        "stalling"
    }

    async fn publish(&self, message: &Message) -> strata::Result<()> {
        if self.stalled.load(Ordering::SeqCst) {
            if !message.is_control() {
                self.stalled_invalidations.fetch_add(1, Ordering::SeqCst);
            }
            loop {
                let released = self.released.notified();
                tokio::pin!(released);
                released.as_mut().enable();
                if !self.stalled.load(Ordering::SeqCst) {
                    break;
                }
                released.await;
            }
        }
        self.inner.publish(message).await
    }

    async fn publish_batch(&self, messages: &[Message]) -> strata::Result<()> {
        if messages.len() > 1 {
            self.batches.fetch_add(1, Ordering::SeqCst);
        }
        for m in messages {
            self.publish(m).await?;
        }
        Ok(())
    }

    async fn subscribe(&self) -> strata::Result<Subscription> {
        self.inner.subscribe().await
    }

    async fn replay(&self, origin: OriginId, from: u64, to: u64) -> strata::Result<Option<Vec<Message>>> {
        self.inner.replay(origin, from, to).await
    }
}

// ---------------------------------------------------------------------------------
// Invalidate while the backplane stalls

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalidate_fails_fast_into_the_outbox_while_the_backplane_stalls() {
    const KEYS: u64 = 500;
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::with_mode(Mode::Stream);
    let stalling = Arc::new(StallingBackplane::new(hub.connect()));
    // Each publish into the stall hangs for the backplane timeout (500 ms): 500 callers
    // queued one behind the other could not finish within the bound below.
    let a: Cache<u64, String> = Cache::builder(NS)
        .tier(Arc::new(tier.clone()))
        .backplane(stalling.clone())
        .heartbeat_interval(Duration::from_millis(20))
        .build()
        .expect("valid");
    let mut others = Vec::new();
    for _ in 0..2 {
        let c: Cache<u64, String> = Cache::builder(NS)
            .tier(Arc::new(tier.clone()))
            .backplane(Arc::new(hub.connect()))
            .heartbeat_interval(Duration::from_millis(20))
            .build()
            .expect("valid");
        others.push(c);
    }
    a.ready().await;
    for c in &others {
        c.ready().await;
    }
    let db = Db::default();
    for k in 0..KEYS {
        db.set(k, "v1");
    }
    for c in &others {
        for k in 0..KEYS {
            c.get_or_load(&k, db.loader(k)).await.expect("load");
        }
    }
    for k in 0..KEYS {
        db.set(k, "v2");
    }

    stalling.stall(true);
    let calls: Vec<_> = (0..KEYS)
        .map(|k| {
            let a = a.clone();
            tokio::spawn(async move { a.invalidate(&k).await })
        })
        .collect();
    let results = tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(calls))
        .await
        .expect("every invalidate returned while the backplane stalled");
    let failed = results.into_iter().map(|r| r.expect("task")).filter(Result::is_err).count();
    assert_eq!(failed, KEYS as usize, "every invalidation was refused by the stalled backplane");
    let s = a.stats();
    // Each refused message stays queued in the outbox, in order, for its turn: not
    // buffered for retry as well (that would send it twice).
    assert_eq!(s.messages_left_queued, KEYS, "{s:?}");
    assert_eq!(s.invalidations_buffered, 0, "{s:?}");
    // The one in flight when the stall began, and the heartbeats' drains: not one per
    // caller.
    let hung = stalling.stalled_invalidations.load(Ordering::SeqCst);
    assert!(hung < 10, "callers did not each wait for the stall: {hung} invalidations hung");
    assert_eq!(a.pending_invalidations(), KEYS as usize, "queued, counted as pending");

    stalling.stall(false);
    within("buffer delivered", || a.pending_invalidations() == 0).await;
    for c in &others {
        within("every invalidated key dropped", || (0..KEYS).all(|k| c.get_local(&k).is_none())).await;
    }
    // (A reload of one is pushed to the other, which may install it: not a v1.)
    for c in &others {
        assert_eq!(c.get_or_load(&7, db.loader(7)).await.expect("read").as_deref(), Some("v2"));
    }
}

/// `a` on a stalling connection and `b` on a plain one, both ready. `a`'s backplane
/// timeout (the larger of 500 ms and `l2_timeout`) is well past the stalls of these
/// tests: the backplane is slow, not down.
async fn stalling_pair(
    heartbeat: Option<Duration>,
) -> (Arc<StallingBackplane>, Cache<u64, String>, Cache<u64, String>) {
    let hub = InProcessBackplane::with_mode(Mode::Stream);
    let stalling = Arc::new(StallingBackplane::new(hub.connect()));
    let mut builder = Cache::builder(NS).backplane(stalling.clone()).l2_timeout(Duration::from_secs(5));
    if let Some(every) = heartbeat {
        builder = builder.heartbeat_interval(every);
    }
    let a: Cache<u64, String> = builder.build().expect("valid");
    let b: Cache<u64, String> = Cache::builder(NS).backplane(Arc::new(hub.connect())).build().expect("valid");
    a.ready().await;
    b.ready().await;
    (stalling, a, b)
}

/// Stalls the backplane and starts `a.invalidate(&1)`, whose publish then hangs
/// (holding the publisher) until the stall ends.
async fn hang_a_publish(
    stalling: &StallingBackplane,
    a: &Cache<u64, String>,
) -> tokio::task::JoinHandle<strata::Result<()>> {
    stalling.stall(true);
    let first = {
        let a = a.clone();
        tokio::spawn(async move { a.invalidate(&1).await })
    };
    within("first publish hangs", || stalling.stalled_invalidations.load(Ordering::SeqCst) == 1).await;
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_whose_callers_stopped_waiting_go_out_in_their_turn_without_a_gap() {
    let (stalling, a, b) = stalling_pair(None).await;
    let db = Db::default();
    for k in 1..=4 {
        db.set(k, "v1");
        b.get_or_load(&k, db.loader(k)).await.expect("load");
    }
    within("a heard by b", || b.stats().heartbeats_received >= 1).await;
    let before = b.stats();

    let first = hang_a_publish(&stalling, &a).await;
    // Behind the hanging publish, each caller waits for the publisher 100 ms and gives
    // up; its message stays queued.
    let behind = futures::future::join_all((2..=4).map(|k| {
        let a = a.clone();
        async move { a.invalidate(&k).await }
    }))
    .await;
    for r in behind {
        let e = r.expect_err("gave up waiting for the publisher");
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        // The caller can tell the write needs nothing more (below Strong).
        assert!(e.is_queued(), "{e:?}");
        assert!(e.to_string().contains("stays queued"), "{e}");
    }
    assert_eq!(a.stats().messages_left_queued, 3, "{:?}", a.stats());
    stalling.stall(false);
    first.await.expect("task").expect("published once the stall ended");

    within("b dropped every key", || (1..=4).all(|k| b.get_local(&k).is_none())).await;
    within("retried", || a.pending_invalidations() == 0).await;
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(sa.messages_given_up, 0, "{sa:?}");
    assert_eq!(sb.gaps_detected, before.gaps_detected, "no number was given up: {sb:?}");
    assert_eq!(sb.repairs_flushed, before.repairs_flushed, "{sb:?}");
    // What queued behind the stall left in one call.
    assert!(sa.messages_batched >= 3, "{sa:?}");
    assert!(stalling.batches.load(Ordering::SeqCst) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_publishes_what_a_cancelled_caller_left_in_the_outbox() {
    // No heartbeat during the test: only the shutdown can publish the message.
    let (stalling, a, b) = stalling_pair(Some(Duration::from_secs(30))).await;
    let db = Db::default();
    db.set(2, "v1");
    b.get_or_load(&2, db.loader(2)).await.expect("load");

    let first = hang_a_publish(&stalling, &a).await;
    // Cancelled while it waits behind the stall: its message is numbered and queued,
    // but the caller never got to buffer it for retry.
    assert!(tokio::time::timeout(Duration::from_millis(20), a.invalidate(&2)).await.is_err());
    stalling.stall(false);
    first.await.expect("task").expect("published once the stall ended");
    assert_eq!(a.pending_invalidations(), 1, "in the outbox, not in the retry buffer");
    assert_eq!(a.stats().invalidations_buffered, 0);
    a.shutdown().await;
    within("b dropped key 2", || b.get_local(&2).is_none()).await;
    assert_eq!(b.stats().gaps_detected, 0, "{:?}", b.stats());
}

/// Two instances over Pub/Sub, the second holding keys 1 and 2 and hearing the first.
async fn two_holding_keys_1_and_2() -> (crate::support::Fleet, Db) {
    let f = fleet(2, Mode::PubSub, None).await;
    let b = &f.caches[1];
    let db = Db::with(&[(1, "v1"), (2, "two")]);
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    b.get_or_load(&2, db.loader(2)).await.expect("load");
    within("heartbeat heard", || b.stats().heartbeats_received >= 1).await;
    (f, db)
}

#[tokio::test]
async fn a_message_refused_while_the_backplane_is_down_goes_out_in_order_when_it_is_back() {
    let (f, _db) = two_holding_keys_1_and_2().await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    f.conns[0].faults().set_disconnected(true);
    // The first publish fails; the second is refused at once (the backplane is known
    // down). Neither reaches b, but both stay in a's outbox.
    assert!(a.invalidate(&1).await.is_err());
    let refused = a.invalidate(&2).await.expect_err("refused");
    assert_eq!(refused.kind(), ErrorKind::CircuitOpen, "{refused}");
    assert!(refused.is_queued(), "{refused:?}");
    assert!(a.stats().messages_left_queued >= 2, "{:?}", a.stats());
    let gaps = b.stats().gaps_detected;
    f.conns[0].faults().set_disconnected(false);
    within("b evicted", || b.get_local(&1).is_none() && b.get_local(&2).is_none()).await;
    within("retried", || a.pending_invalidations() == 0).await;
    // Published in their turn, not given up: no gap for b to repair by a flush. (The
    // retry probes give a message up after three failed attempts; the outage here is
    // shorter than that, but a slow machine may stretch it: then b saw a gap.)
    if a.stats().messages_given_up == 0 {
        assert_eq!(b.stats().gaps_detected, gaps, "{:?}", b.stats());
    } else {
        assert!(b.stats().gaps_detected > gaps);
    }
}

#[tokio::test]
async fn a_message_given_up_while_the_backplane_is_down_shows_as_a_gap() {
    let (f, _db) = two_holding_keys_1_and_2().await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    f.conns[0].faults().set_disconnected(true);
    assert!(a.invalidate(&1).await.is_err());
    // The retry task's probes and the heartbeats fail too, until the message has had
    // its attempts and its number is given up.
    within("message given up", || a.stats().messages_given_up >= 1).await;
    let gaps = b.stats().gaps_detected;
    f.conns[0].faults().set_disconnected(false);
    within("gap seen and repaired", || b.stats().gaps_detected > gaps).await;
    within("b evicted", || b.get_local(&1).is_none()).await;
    within("retried", || a.pending_invalidations() == 0).await;
}

// ---------------------------------------------------------------------------------
// Forged or extreme messages

/// Publishes `msg` on a connection of its own, as a forger on the backplane would.
async fn forge(hub: &InProcessBackplane, msg: Message) {
    hub.connect().publish(&msg).await.expect("forged publish");
}

/// Reads keys `1..=10` on `c` (loading what is missing) and returns its stats after.
async fn read_all(c: &Cache<u64, String>, db: &Db) -> CacheStats {
    for k in 1..=10 {
        c.get_or_load(&k, db.loader(k)).await.expect("read");
    }
    c.stats()
}

/// Drops the next message `b` receives while `a` invalidates a fresh key, until the
/// dropped one was that invalidation (a heartbeat may be the one dropped); then checks
/// the gap was detected and repaired.
async fn a_real_gap_is_repaired(f: &crate::support::Fleet, db: &Db, first_key: u64) {
    let (a, b) = (&f.caches[0], &f.caches[1]);
    for attempt in 0..20 {
        let k = first_key + attempt;
        db.set(k, "v1");
        b.get_or_load(&k, db.loader(k)).await.expect("load");
        let before = b.stats();
        f.conns[1].faults().drop_next(1);
        a.invalidate(&k).await.expect("invalidate");
        // A second message behind it reveals the gap at once.
        a.invalidate(&(k + 1000)).await.expect("invalidate");
        within("second message received", || {
            b.stats().invalidations_received > before.invalidations_received
        })
        .await;
        if b.stats().invalidations_received == before.invalidations_received + 2 {
            continue; // a heartbeat was dropped, not the invalidation: try again
        }
        within("gap repaired", || {
            let s = b.stats();
            s.repairs_replayed + s.repairs_flushed > before.repairs_replayed + before.repairs_flushed
        })
        .await;
        assert!(b.stats().gaps_detected > before.gaps_detected);
        assert_eq!(b.get_local(&k), None, "the dropped invalidation was made good");
        return;
    }
    panic!("never managed to drop the invalidation");
}

/// Forges `forged` from `a`'s origin, lets `a`'s heartbeats run, and checks that `b`
/// repaired at most once, keeps serving hits, and still detects a real gap.
async fn one_forged_message_costs_at_most_one_repair(mode: Mode, forged: impl FnOnce(u64) -> Message) {
    let f = fleet(2, mode, None).await;
    let hub = &f.conns[0];
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::default();
    for k in 1..=10 {
        db.set(k, "v");
    }
    // Some real traffic first, so that a's origin is known with a sequence number > 0.
    a.invalidate(&999).await.expect("invalidate");
    within("a heard", || b.stats().invalidations_received >= 1 && b.stats().heartbeats_received >= 1).await;
    read_all(b, &db).await;

    let before = b.stats();
    forge(hub, forged(a.origin())).await;
    let hb = b.stats().heartbeats_received;
    within("a's heartbeats go on", || b.stats().heartbeats_received >= hb + 15).await;
    let after = read_all(b, &db).await;
    let repairs =
        after.repairs_flushed + after.repairs_replayed - before.repairs_flushed - before.repairs_replayed;
    assert!(repairs <= 1, "one forged message, {repairs} repairs: {after:?}");

    // Hits again, and they last across heartbeats: no flush on each of them.
    let hb = b.stats().heartbeats_received;
    within("more heartbeats", || b.stats().heartbeats_received >= hb + 10).await;
    let later = read_all(b, &db).await;
    assert!(later.l1_hits >= after.l1_hits + 10, "L1 serves hits again: {later:?}");
    assert_eq!(later.repairs_flushed, after.repairs_flushed, "no flush per heartbeat: {later:?}");
    assert_eq!(later.loads, after.loads);

    a_real_gap_is_repaired(&f, &db, 100).await;
    assert!(b.stats().suspicious_messages > before.suspicious_messages, "counted: {:?}", b.stats());
}

#[tokio::test]
async fn a_forged_heartbeat_with_the_largest_sequence_number_costs_at_most_one_repair() {
    one_forged_message_costs_at_most_one_repair(Mode::Stream, |origin| Message {
        origin,
        seq: u64::MAX,
        namespace: NS.into(),
        body: MessageBody::Heartbeat,
        sent_at_ms: 0,
    })
    .await;
}

#[tokio::test]
async fn a_forged_invalidation_with_the_largest_sequence_number_costs_at_most_one_repair() {
    one_forged_message_costs_at_most_one_repair(Mode::PubSub, |origin| Message {
        origin,
        seq: u64::MAX,
        namespace: NS.into(),
        body: MessageBody::Invalidate(Scope::Keys(vec!["12345".into()])),
        sent_at_ms: 0,
    })
    .await;
}

#[tokio::test]
async fn a_forged_jump_far_ahead_costs_one_repair_and_tracking_resumes() {
    one_forged_message_costs_at_most_one_repair(Mode::Stream, |origin| Message {
        origin,
        seq: 5_000_000,
        namespace: NS.into(),
        body: MessageBody::Heartbeat,
        sent_at_ms: 0,
    })
    .await;
}

#[tokio::test]
async fn a_forged_jump_within_replay_range_costs_one_repair_and_tracking_resumes() {
    one_forged_message_costs_at_most_one_repair(Mode::Stream, |origin| Message {
        origin,
        seq: 5_000,
        namespace: NS.into(),
        body: MessageBody::Invalidate(Scope::Keys(vec!["12345".into()])),
        sent_at_ms: 0,
    })
    .await;
}

#[tokio::test]
async fn a_message_from_origin_zero_is_counted_and_not_tracked() {
    let f = fleet(2, Mode::PubSub, None).await;
    let b = &f.caches[1];
    let db = Db::with(&[(1, "one")]);
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    let before = b.stats();
    forge(
        &f.conns[0],
        Message { origin: 0, seq: 40, namespace: NS.into(), body: MessageBody::Heartbeat, sent_at_ms: 0 },
    )
    .await;
    // Delivered in order: a few of a's heartbeats later, the forged one was handled.
    within("handled", || b.stats().heartbeats_received >= before.heartbeats_received + 3).await;
    let s = b.stats();
    assert_eq!(s.repairs_flushed, before.repairs_flushed, "no origin 0 exists: nothing was missed");
    assert_eq!(b.get_local(&1).as_deref(), Some("one"));
    assert!(s.suspicious_messages > before.suspicious_messages, "counted: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_acknowledgement_of_what_was_never_sent_is_ignored() {
    let (_tier, conns, caches) = strong_fleet(2).await;
    let (a, b) = (&caches[0], &caches[1]);
    let db = Db::with(&[(1, "v1")]);
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    assert_eq!(b.get_local(&1).as_deref(), Some("v1"));
    // b "acknowledges" everything a will ever send, then goes deaf.
    let ack = Message {
        origin: b.origin(),
        seq: 0,
        namespace: NS.into(),
        body: MessageBody::Ack { to: a.origin(), seq: u64::MAX },
        sent_at_ms: 0,
    };
    let hb = a.stats().heartbeats_received;
    forge(&conns[0], ack).await;
    // Delivered in order: once a heard two more of b's heartbeats, it handled the ack.
    within("forged ack handled", || a.stats().heartbeats_received >= hb + 2).await;
    conns[1].faults().set_disconnected(true);
    db.set(1, "v2");
    a.invalidate(&1).await.expect("invalidate");
    // a may only have returned once b acknowledged or its lease lapsed; b, deaf, has
    // stopped serving its L1 by then.
    assert_eq!(b.get_local(&1), None, "b serves the old row after a's Strong invalidate returned");
    assert!(a.stats().suspicious_messages >= 1, "counted");
    conns[1].faults().set_disconnected(false);
}
