//! The Strong level: acknowledgements, membership leases, and bypassing L2 after a
//! failed delete until it is clean.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use strata::backplane::{Backplane, Message, OriginId, Subscription};
use strata::tier::Tier;
use strata::{BreakerState, Cache, Consistency, ErrorKind, InProcessBackplane, InProcessTier};

use crate::support::{Db, NS, eventually, l2_value, strong_fleet};

#[tokio::test]
async fn strong_level_bypasses_the_cache_until_a_failed_delete_is_made_good() {
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let cache: Cache<u64, String> = Cache::builder(NS)
        .tier(Arc::new(tier.clone()))
        .backplane(Arc::new(hub.connect()))
        .consistency(Consistency::Strong)
        .build()
        .expect("valid");
    cache.ready().await;
    let db = Db::with(&[(1, "v1")]);
    cache.get_or_load(&1, db.loader(1)).await.expect("load");
    db.set(1, "v2");
    tier.set_available(false);
    assert!(cache.invalidate(&1).await.is_err());
    assert!(cache.is_bypassed());
    assert_eq!(cache.l2_breaker_state(), BreakerState::ForcedOpen);
    tier.set_available(true);
    // L2 still holds v1 (the delete failed), but reads bypass it.
    assert_eq!(l2_value(&tier, 1).as_deref(), Some("v1"));
    assert_eq!(cache.get_or_load(&1, db.loader(1)).await.expect("bypass").as_deref(), Some("v2"));
    assert!(cache.stats().bypassed_reads >= 1);
    assert_eq!(cache.flush_pending().await, 0);
    assert!(!cache.is_bypassed(), "trusted again after the namespace bump");
    assert_eq!(cache.l2_breaker_state(), BreakerState::Closed);
    assert_eq!(cache.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_invalidate_returns_only_after_every_member_applied_it() {
    let (_tier, conns, caches) = strong_fleet(3).await;
    let db = Db::with(&[(1, "v1")]);
    for c in &caches {
        c.get_or_load(&1, db.loader(1)).await.expect("load");
        assert_eq!(c.get_local(&1).as_deref(), Some("v1"));
    }
    // The third member hears everything 50 ms late.
    conns[2].faults().set_delay(Duration::from_millis(50));
    db.set(1, "v2");
    let began = std::time::Instant::now();
    caches[0].invalidate(&1).await.expect("invalidate");
    let took = began.elapsed();
    // No waiting here: read-your-writes holds the moment invalidate returned.
    for c in &caches {
        assert_eq!(c.get_local(&1), None);
        assert_eq!(c.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
    }
    eprintln!("strong: invalidate with a member 50 ms behind took {took:?}");
    assert!(took >= Duration::from_millis(50), "it waited for the slow member's ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_member_cut_off_stops_serving_l1_and_is_not_waited_for_past_its_lease() {
    let (_tier, conns, caches) = strong_fleet(3).await;
    let db = Db::with(&[(1, "v1")]);
    for c in &caches {
        c.get_or_load(&1, db.loader(1)).await.expect("load");
    }
    conns[2].faults().set_disconnected(true);
    db.set(1, "v2");
    let began = std::time::Instant::now();
    caches[0].invalidate(&1).await.expect("invalidate");
    let took = began.elapsed();
    eprintln!("strong: invalidate with a member cut off took {took:?} (lease 300 ms)");
    assert!(took <= Duration::from_millis(1000), "bounded by the lease");
    // The cut-off member never heard the invalidation, but serves nothing from L1.
    assert_eq!(caches[2].get_local(&1), None, "its own lease lapsed");
    conns[2].faults().set_disconnected(false);
    eventually("re-registered", || caches[2].stats().repairs_flushed >= 1).await;
    tokio::time::timeout(Duration::from_secs(5), caches[2].ready()).await.expect("ready again");
    assert_eq!(caches[2].get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
    assert_eq!(caches[2].get_local(&1).as_deref(), Some("v2"), "serving L1 again");
}

#[tokio::test]
async fn strong_level_cleans_l2_before_the_next_invalidation_goes_out() {
    // The writer's L2 delete fails (L2 unreachable); once L2 is back, its next
    // invalidation must clean L2 before the fleet hears of it, rather than fail against
    // the forced-open breaker while the message still wakes the readers, who would then
    // refill from the entry the failed delete left in L2.
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let mut caches: Vec<Cache<u64, String>> = Vec::new();
    for _ in 0..2 {
        let cache = Cache::builder(NS)
            .tier(Arc::new(tier.clone()))
            .backplane(Arc::new(hub.connect()))
            .consistency(Consistency::Strong)
            .heartbeat_interval(Duration::from_millis(20))
            .membership_lease(Duration::from_millis(400))
            .build()
            .expect("valid");
        cache.ready().await;
        caches.push(cache);
    }
    let (writer, reader) = (&caches[0], &caches[1]);
    let db = Db::with(&[(1, "v1"), (2, "two")]);
    assert_eq!(reader.get_or_load(&1, db.loader(1)).await.expect("load").as_deref(), Some("v1"));
    assert_eq!(l2_value(&tier, 1).as_deref(), Some("v1"));
    db.set(1, "v2");
    tier.set_available(false);
    assert!(writer.invalidate(&1).await.is_err(), "the L2 delete failed");
    assert!(writer.is_bypassed());
    tier.set_available(true);
    // The next write, with L2 reachable again, succeeds and leaves no stale entry behind.
    db.set(2, "deux");
    writer.invalidate(&2).await.expect("L2 is reachable: the invalidation succeeds");
    assert!(!writer.is_bypassed(), "the namespace bump made L2 trusted again");
    assert_eq!(reader.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
    assert_eq!(reader.get_or_load(&2, db.loader(2)).await.expect("read").as_deref(), Some("deux"));
}

/// A real in-process tier seen through one instance's own (breakable) connection.
pub(crate) struct OwnConnection {
    pub(crate) tier: InProcessTier,
    pub(crate) down: std::sync::atomic::AtomicBool,
}

impl OwnConnection {
    fn check(&self) -> strata::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(strata::Error::new(ErrorKind::Tier, "this instance's l2 connection is down (injected)"))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl Tier for OwnConnection {
    fn name(&self) -> &str {
        "own-connection"
    }
    fn tombstone_ttl(&self) -> Duration {
        self.tier.tombstone_ttl()
    }
    async fn lookup(
        &self,
        ns: &str,
        key: &str,
        lease: Option<Duration>,
    ) -> strata::Result<strata::tier::Lookup> {
        self.check()?;
        self.tier.lookup(ns, key, lease).await
    }
    async fn fill(
        &self,
        ns: &str,
        key: &str,
        env: strata::tier::Envelope,
        ttl: Duration,
        token: &strata::tier::FillToken,
    ) -> strata::Result<strata::tier::FillOutcome> {
        self.check()?;
        self.tier.fill(ns, key, env, ttl, token).await
    }
    async fn set(
        &self,
        ns: &str,
        key: &str,
        env: strata::tier::Envelope,
        ttl: Duration,
    ) -> strata::Result<()> {
        self.check()?;
        self.tier.set(ns, key, env, ttl).await
    }
    async fn delete(&self, ns: &str, keys: &[String]) -> strata::Result<()> {
        self.check()?;
        self.tier.delete(ns, keys).await
    }
    async fn invalidate_tag(&self, ns: &str, tag: &str) -> strata::Result<()> {
        self.check()?;
        self.tier.invalidate_tag(ns, tag).await
    }
    async fn invalidate_namespace(&self, ns: &str) -> strata::Result<()> {
        self.check()?;
        self.tier.invalidate_namespace(ns).await
    }
    async fn touch(
        &self,
        ns: &str,
        key: &str,
        soft: strata::Timestamp,
        ttl: Duration,
    ) -> strata::Result<bool> {
        self.check()?;
        self.tier.touch(ns, key, soft, ttl).await
    }
    async fn lock(&self, ns: &str, scope: &strata::Scope, id: u64, ttl: Duration) -> strata::Result<()> {
        self.check()?;
        self.tier.lock(ns, scope, id, ttl).await
    }
    async fn unlock(&self, ns: &str, scope: &strata::Scope, id: u64) -> strata::Result<()> {
        self.check()?;
        self.tier.unlock(ns, scope, id).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_failed_l2_delete_makes_every_member_bypass_until_l2_is_clean() {
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let own = Arc::new(OwnConnection { tier: tier.clone(), down: false.into() });
    let build = |t: Arc<dyn Tier>| {
        Cache::<u64, String>::builder(NS)
            .tier(t)
            .backplane(Arc::new(hub.connect()))
            .consistency(Consistency::Strong)
            .heartbeat_interval(Duration::from_millis(20))
            .membership_lease(Duration::from_millis(300))
            .build()
            .expect("valid")
    };
    let a = build(own.clone());
    let b = build(Arc::new(tier.clone()));
    for c in [&a, &b] {
        tokio::time::timeout(Duration::from_secs(5), c.ready()).await.expect("ready");
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    let db = Db::with(&[(1, "v1")]);
    a.get_or_load(&1, db.loader(1)).await.expect("load");
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    db.set(1, "v2");
    own.down.store(true, Ordering::SeqCst);
    assert!(a.invalidate(&1).await.is_err(), "a's L2 delete failed");
    assert_eq!(l2_value(&tier, 1).as_deref(), Some("v1"), "L2 still holds the old row");
    // b can reach L2, but must not read v1 back from it.
    assert!(b.is_bypassed(), "b distrusts L2 as soon as the invalidation returned");
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
    own.down.store(false, Ordering::SeqCst);
    assert_eq!(a.flush_pending().await, 0);
    eventually("b trusts L2 again", || !b.is_bypassed()).await;
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
}

/// A backplane whose acknowledgements take `ack_delay` to go out (a busy connection),
/// counting them.
struct SlowAcks {
    inner: InProcessBackplane,
    ack_delay: Duration,
    acks: std::sync::atomic::AtomicU64,
}

#[async_trait::async_trait]
impl Backplane for SlowAcks {
    fn name(&self) -> &str {
        "slow-acks"
    }
    async fn publish(&self, message: &Message) -> strata::Result<()> {
        self.inner.publish(message).await
    }
    async fn subscribe(&self) -> strata::Result<Subscription> {
        self.inner.subscribe().await
    }
    async fn heartbeat(&self, message: &Message, beat: u64, interval: Duration) -> strata::Result<()> {
        self.inner.heartbeat(message, beat, interval).await
    }
    async fn publish_to(&self, to: OriginId, message: &Message) -> strata::Result<()> {
        self.acks.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.ack_delay).await;
        self.inner.publish_to(to, message).await
    }
    async fn subscribe_as(&self, me: OriginId) -> strata::Result<Subscription> {
        self.inner.subscribe_as(me).await
    }
}

/// A Strong member on `tier` and `bp` that waits up to 3 s for acknowledgements.
fn strong_member(tier: &InProcessTier, bp: Arc<dyn Backplane>) -> Cache<u64, String> {
    Cache::builder(NS)
        .tier(Arc::new(tier.clone()))
        .backplane(bp)
        .consistency(Consistency::Strong)
        .heartbeat_interval(Duration::from_millis(20))
        .membership_lease(Duration::from_secs(3))
        .build()
        .expect("valid")
}

/// An acknowledgement on its way does not hold up the member's own invalidations: they
/// used to queue behind it for the publisher, give up after 100 ms, and burn a sequence
/// number that every receiver then repaired by flushing its L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_acknowledgement_does_not_hold_up_the_members_own_invalidations() {
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let build = |bp: Arc<dyn Backplane>| strong_member(&tier, bp);
    let a = build(Arc::new(hub.connect()));
    let b = build(Arc::new(SlowAcks {
        inner: hub.connect(),
        ack_delay: Duration::from_millis(400),
        acks: Default::default(),
    }));
    for c in [&a, &b] {
        tokio::time::timeout(Duration::from_secs(5), c.ready()).await.expect("ready");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let first = tokio::spawn({
        let a = a.clone();
        async move { a.invalidate(&1).await }
    });
    // B heard it and is sending its (slow) acknowledgement.
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.invalidate(&2).await.expect("not refused behind the acknowledgement");
    first.await.expect("task").expect("acknowledged once B's ack arrived");
    assert_eq!(b.stats().invalidations_buffered, 0, "{:?}", b.stats());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = a.stats();
    assert_eq!((s.gaps_detected, s.repairs_flushed), (0, 0), "no number burned: {s:?}");
}

/// A member that fell behind acknowledges the burst it then reads once per origin
/// (acknowledgements are cumulative), not once per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_acknowledges_a_burst_once() {
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let build = |bp: Arc<dyn Backplane>| strong_member(&tier, bp);
    let slow = Arc::new(SlowAcks {
        inner: hub.connect(),
        ack_delay: Duration::from_millis(200),
        acks: Default::default(),
    });
    let a = build(Arc::new(hub.connect()));
    let b = build(slow.clone());
    for c in [&a, &b] {
        tokio::time::timeout(Duration::from_secs(5), c.ready()).await.expect("ready");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = slow.acks.load(Ordering::SeqCst);
    // Ten writes at once: B's first acknowledgement takes 200 ms, the other nine
    // messages wait in its subscription meanwhile.
    let writes: Vec<_> = (1..=10u64)
        .map(|k| {
            let a = a.clone();
            tokio::spawn(async move { a.invalidate(&k).await })
        })
        .collect();
    for w in writes {
        w.await.expect("task").expect("every write acknowledged");
    }
    let acks = slow.acks.load(Ordering::SeqCst) - before;
    eprintln!("[strong] 10 writes, B behind: {acks} acknowledgements");
    assert!(acks <= 3, "{acks} acknowledgements for a burst of 10");
    assert_eq!(a.stats().gaps_detected, 0);
}

/// A member that shuts down closes (it serves nothing any more), then says it leaves:
/// the others' writes stop waiting for it at once instead of for its lease to lapse (a
/// rolling deploy would otherwise hold every Strong write for a lease per restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_shuts_down_is_not_waited_for() {
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let member = || {
        Cache::<u64, String>::builder(NS)
            .tier(Arc::new(tier.clone()))
            .backplane(Arc::new(hub.connect()))
            .consistency(Consistency::Strong)
            .heartbeat_interval(Duration::from_millis(20))
            // Far longer than the test: only a leave message can end the wait.
            .membership_lease(Duration::from_secs(60))
            .write_lock_ttl(Duration::from_secs(400))
            .build()
            .expect("valid")
    };
    let (a, b, c) = (member(), member(), member());
    for m in [&a, &b, &c] {
        tokio::time::timeout(Duration::from_secs(5), m.ready()).await.expect("ready");
    }
    eventually("a heard b and c", || a.stats().heartbeats_received > 6).await;
    a.invalidate(&1).await.expect("acknowledged by b and c");
    c.shutdown().await;
    tokio::time::timeout(Duration::from_secs(10), a.invalidate(&2))
        .await
        .expect("not held up by c's 60 s lease")
        .expect("acknowledged by b");
    drop(b);
}
