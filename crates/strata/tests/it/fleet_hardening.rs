//! The fleet under a hostile backplane: `invalidate` while the backplane stalls (fail
//! fast into a capped buffer, nothing lost once it is back).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use strata::backplane::{Backplane, Message, Mode, OriginId, Subscription};
use strata::{Cache, ErrorKind, InProcessBackplane, InProcessTier};
use tokio::sync::Notify;

use crate::support::{Db, NS, fleet};

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
}

impl StallingBackplane {
    fn new(inner: InProcessBackplane) -> Self {
        StallingBackplane {
            inner,
            stalled: AtomicBool::new(false),
            released: Notify::new(),
            stalled_invalidations: AtomicU64::new(0),
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
async fn invalidate_fails_fast_into_a_capped_buffer_while_the_backplane_stalls() {
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
    assert_eq!(s.invalidations_buffered, KEYS, "every refused message was buffered");
    // The one in flight when the stall began, and the retry task's probes: not one per
    // caller.
    let hung = stalling.stalled_invalidations.load(Ordering::SeqCst);
    assert!(hung < 10, "callers did not each wait for the stall: {hung} invalidations hung");
    assert!(s.pending_collapsed >= 1, "the buffer outgrew its cap and was collapsed: {s:?}");
    assert!(a.pending_invalidations() <= 256, "buffer within its cap: {}", a.pending_invalidations());

    stalling.stall(false);
    within("buffer delivered", || a.pending_invalidations() == 0).await;
    for c in &others {
        within("every invalidated key dropped", || (0..KEYS).all(|k| c.get_local(&k).is_none())).await;
        assert_eq!(c.get_or_load(&7, db.loader(7)).await.expect("read").as_deref(), Some("v2"));
    }
}

#[tokio::test]
async fn a_message_refused_while_the_backplane_is_down_still_shows_as_a_gap() {
    let f = fleet(2, Mode::PubSub, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "v1"), (2, "two")]);
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    b.get_or_load(&2, db.loader(2)).await.expect("load");
    within("heartbeat heard", || b.stats().heartbeats_received >= 1).await;
    f.conns[0].faults().set_disconnected(true);
    // The first publish fails; the second is refused at once (the backplane is known
    // down). Neither reaches b.
    assert!(a.invalidate(&1).await.is_err());
    let refused = a.invalidate(&1).await.expect_err("refused");
    assert_eq!(refused.kind(), ErrorKind::CircuitOpen, "{refused}");
    let gaps = b.stats().gaps_detected;
    f.conns[0].faults().set_disconnected(false);
    within("gap seen and repaired", || b.stats().gaps_detected > gaps).await;
    within("b evicted", || b.get_local(&1).is_none()).await;
    within("retried", || a.pending_invalidations() == 0).await;
}
