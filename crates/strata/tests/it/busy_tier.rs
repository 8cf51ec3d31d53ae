//! `l2_busy_timeout`: an L2 call past `l2_timeout` is waited for while the tier reports
//! progress (a busy server answering other calls), never longer than
//! `l2_busy_timeout`, and not at all when the tier cannot tell. Tokio's paused time:
//! the slow lookup's 10 s pass instantly.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use strata::tier::{Envelope, FillOutcome, FillToken, Lookup, Tier};
use strata::{Cache, InProcessTier, Scope, Timestamp};
use tokio::time::Instant;

const SLOW: Duration = Duration::from_secs(10);

/// An in-process tier whose lookups take [`SLOW`] and whose progress count, when it
/// reports one, grows at every look (as if other calls were answered all along).
struct SlowTier {
    tier: InProcessTier,
    /// How long a lookup takes.
    delay: Duration,
    reports_progress: AtomicBool,
    replies: AtomicU64,
    /// Told when a lookup begins.
    looking: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl Tier for SlowTier {
    fn name(&self) -> &str {
        "slow"
    }
    fn tombstone_ttl(&self) -> Duration {
        self.tier.tombstone_ttl()
    }
    fn progress(&self) -> Option<u64> {
        self.reports_progress.load(Ordering::SeqCst).then(|| self.replies.fetch_add(1, Ordering::SeqCst))
    }
    async fn lookup(&self, ns: &str, key: &str, lease: Option<Duration>) -> strata::Result<Lookup> {
        self.looking.notify_one();
        tokio::time::sleep(self.delay).await;
        self.tier.lookup(ns, key, lease).await
    }
    async fn fill(
        &self,
        ns: &str,
        key: &str,
        env: Envelope,
        ttl: Duration,
        token: &FillToken,
    ) -> strata::Result<FillOutcome> {
        self.tier.fill(ns, key, env, ttl, token).await
    }
    async fn set(&self, ns: &str, key: &str, env: Envelope, ttl: Duration) -> strata::Result<()> {
        self.tier.set(ns, key, env, ttl).await
    }
    async fn delete(&self, ns: &str, keys: &[String]) -> strata::Result<()> {
        self.tier.delete(ns, keys).await
    }
    async fn invalidate_tag(&self, ns: &str, tag: &str) -> strata::Result<()> {
        self.tier.invalidate_tag(ns, tag).await
    }
    async fn invalidate_namespace(&self, ns: &str) -> strata::Result<()> {
        self.tier.invalidate_namespace(ns).await
    }
    async fn touch(&self, ns: &str, key: &str, soft: Timestamp, ttl: Duration) -> strata::Result<bool> {
        self.tier.touch(ns, key, soft, ttl).await
    }
    async fn lock(&self, ns: &str, scope: &Scope, id: u64, ttl: Duration) -> strata::Result<()> {
        self.tier.lock(ns, scope, id, ttl).await
    }
    async fn unlock(&self, ns: &str, scope: &Scope, id: u64) -> strata::Result<()> {
        self.tier.unlock(ns, scope, id).await
    }
}

fn slow_tier(reports_progress: bool) -> SlowTier {
    SlowTier {
        tier: InProcessTier::new(),
        delay: SLOW,
        reports_progress: AtomicBool::new(reports_progress),
        replies: AtomicU64::new(0),
        looking: tokio::sync::Notify::new(),
    }
}

/// How long one `get_or_load` took, and the cache's counters after it.
async fn read_once(reports_progress: bool, busy_timeout: Option<Duration>) -> (Duration, strata::CacheStats) {
    let tier = slow_tier(reports_progress);
    let mut builder =
        Cache::<u64, String>::builder("ns").tier(Arc::new(tier)).l2_timeout(Duration::from_millis(50));
    if let Some(t) = busy_timeout {
        builder = builder.l2_busy_timeout(t);
    }
    let cache = builder.build().expect("valid");
    let start = Instant::now();
    let v = cache
        .get_or_load(&1, || async { Ok::<_, std::io::Error>(Some("db".to_owned())) })
        .await
        .expect("loaded");
    assert_eq!(v.as_deref(), Some("db"), "loaded once L2 gave up");
    (start.elapsed(), cache.stats())
}

#[tokio::test(start_paused = true)]
async fn a_tier_that_keeps_answering_is_waited_for_up_to_the_busy_timeout() {
    // Default: 10 × l2_timeout.
    let (took, s) = read_once(true, None).await;
    assert_eq!((s.l2_errors, s.l2_calls_waited_busy, s.loads), (1, 1, 1), "{s:?}");
    assert!(took >= Duration::from_millis(500) && took < SLOW, "gave up at the busy timeout: {took:?}");

    let (took, s) = read_once(true, Some(Duration::from_millis(120))).await;
    assert_eq!((s.l2_errors, s.l2_calls_waited_busy), (1, 1), "{s:?}");
    assert!(took >= Duration::from_millis(120) && took < Duration::from_millis(500), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn a_tier_that_cannot_tell_or_a_wait_turned_off_ends_at_the_l2_timeout() {
    for (progress, busy) in [(false, None), (true, Some(Duration::from_millis(50)))] {
        let (took, s) = read_once(progress, busy).await;
        assert_eq!((s.l2_errors, s.l2_calls_waited_busy, s.loads), (1, 0, 1), "{s:?}");
        assert!(took < Duration::from_millis(100), "ended at l2_timeout: {took:?}");
    }
}

#[test]
fn a_busy_timeout_below_the_l2_timeout_is_refused_at_build() {
    let e = Cache::<u64, String>::builder("ns")
        .l2_timeout(Duration::from_millis(50))
        .l2_busy_timeout(Duration::from_millis(20))
        .build()
        .unwrap_err();
    let text = e.to_string();
    assert!(text.contains("l2_busy_timeout") && text.contains("at least l2_timeout"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_call_whose_timer_fired_late_is_waited_for_another_slice() {
    // The tier cannot tell whether it answers; this process "stalls" for 100 ms during
    // the first 50 ms slice (the clock jumps, as for a process that got no core), so
    // that slice's silence proves nothing: one more slice, then the call ends.
    let tier = Arc::new(slow_tier(false));
    let cache = Cache::<u64, String>::builder("ns")
        .tier(tier.clone())
        .l2_timeout(Duration::from_millis(50))
        .build()
        .expect("valid");
    let stall = {
        let tier = tier.clone();
        tokio::spawn(async move {
            tier.looking.notified().await;
            tokio::time::advance(Duration::from_millis(100)).await;
        })
    };
    let start = Instant::now();
    let v = cache
        .get_or_load(&1, || async { Ok::<_, std::io::Error>(Some("db".to_owned())) })
        .await
        .expect("loaded");
    let took = start.elapsed();
    stall.await.expect("stall task");
    assert_eq!(v.as_deref(), Some("db"));
    let s = cache.stats();
    assert_eq!((s.l2_errors, s.l2_calls_waited_busy, s.loads), (1, 1, 1), "{s:?}");
    assert!(took >= Duration::from_millis(150) && took < Duration::from_millis(500), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn a_tier_that_has_been_answering_slowly_gets_a_longer_budget() {
    // Every lookup takes 80 ms, past the 50 ms `l2_timeout`. While the tier shows
    // progress the first is waited for and answers; what it took raises the budget, so
    // that the next ones answer within it without a wait, even once the tier can no
    // longer tell whether it answers others (one caller alone on its connection).
    let tier = Arc::new(SlowTier { delay: Duration::from_millis(80), ..slow_tier(true) });
    let cache = Cache::<u64, String>::builder("ns")
        .tier(tier.clone())
        .l2_timeout(Duration::from_millis(50))
        .build()
        .expect("valid");
    cache.get_or_load(&1, move || load(1)).await.expect("read");
    let s = cache.stats();
    assert_eq!((s.l2_errors, s.l2_calls_waited_busy), (0, 1), "{s:?}");
    tier.reports_progress.store(false, Ordering::SeqCst);
    for k in 2..=10 {
        let start = Instant::now();
        cache.get_or_load(&k, move || load(k)).await.expect("read");
        assert!(start.elapsed() >= Duration::from_millis(80), "reached L2");
    }
    let s = cache.stats();
    // The lookups and the fills after them: none failed, none needed the wait.
    assert_eq!((s.l2_errors, s.l2_calls_waited_busy), (0, 1), "{s:?}");

    // A tier that stops answering is not waited for longer than the budget its last
    // answers earned, and never past `l2_busy_timeout`.
    let stalled = Arc::new(slow_tier(false));
    let fresh = Cache::<u64, String>::builder("ns")
        .tier(stalled)
        .l2_timeout(Duration::from_millis(50))
        .build()
        .expect("valid");
    let start = Instant::now();
    fresh.get_or_load(&1, move || load(1)).await.expect("read");
    assert!(start.elapsed() < Duration::from_millis(100), "no sample yet: the floor");
}

async fn load(k: u64) -> Result<Option<String>, std::io::Error> {
    Ok(Some(format!("db{k}")))
}
