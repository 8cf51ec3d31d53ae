//! A busy Redis is not an outage: an L2 call still running at the cache's `l2_timeout`
//! is waited for while the server keeps answering other calls on the tier's
//! connection (up to `l2_busy_timeout`), and fails at `l2_timeout` when the server
//! answers nothing (stalled, unreachable).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use strata::Cache;
use strata::backplane::Backplane;
use strata::tier::Tier;
use strata_redis::{RedisStreamBackplane, RedisTier};
use strata_testkit::{FaultProxy, RedisServer};

const L2_TIMEOUT: Duration = Duration::from_millis(50);
/// The proxy's delay each way: a round trip takes 120 ms, more than `L2_TIMEOUT`.
const LATENCY: Duration = Duration::from_millis(60);

/// Other callers' lookups on the same tier, one started every 5 ms and none awaited
/// by the loop: with the proxy's latency, a reply then arrives every ~5 ms, as from a
/// server working through a backlog.
fn other_traffic(tier: Arc<RedisTier>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let tier = tier.clone();
            tokio::spawn(async move {
                let _ = tier.lookup("others", "k", None).await;
            });
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_tier_is_waited_for_and_a_stalled_one_is_not() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.addr()).await.unwrap();
    let url = format!("redis://127.0.0.1:{}", proxy.port());
    let tier = Arc::new(RedisTier::builder(&url).prefix("busy").build().await.unwrap());
    let waiting: Cache<u64, String> =
        Cache::builder("ns").tier(tier.clone()).l2_timeout(L2_TIMEOUT).build().unwrap();
    // The same tier and namespace, the wait for a busy tier turned off: what every
    // cache did before.
    let failing: Cache<u64, String> = Cache::builder("ns")
        .tier(tier.clone())
        .l2_timeout(L2_TIMEOUT)
        .l2_busy_timeout(L2_TIMEOUT)
        .build()
        .unwrap();
    for k in 0..3 {
        waiting.insert(k, format!("v{k}")).await.unwrap();
        waiting.evict_local(&k);
    }
    let loads = Arc::new(AtomicU64::new(0));
    let loader = |k: u64| {
        let loads = loads.clone();
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Some(format!("db{k}")))
        }
    };

    proxy.set_latency(LATENCY, Duration::ZERO);
    let traffic = other_traffic(tier.clone());
    // Until the first replies come back.
    tokio::time::sleep(LATENCY * 2 + Duration::from_millis(50)).await;

    // Busy: the lookup runs past 50 ms while replies keep coming, and is waited for.
    let v = waiting.get_or_load(&0, loader(0)).await.unwrap();
    assert_eq!(v.as_deref(), Some("v0"), "answered by L2: {:?}", waiting.stats());
    let s = waiting.stats();
    assert_eq!((s.l2_hits, s.l2_errors, s.l2_calls_waited_busy), (1, 0, 1), "{s:?}");
    assert_eq!(loads.load(Ordering::SeqCst), 0, "no database load");

    // The same call with the wait off times out and goes to the database.
    let v = failing.get_or_load(&1, loader(1)).await.unwrap();
    assert_eq!(v.as_deref(), Some("db1"));
    let s = failing.stats();
    assert_eq!((s.l2_hits, s.l2_errors, s.l2_calls_waited_busy), (0, 1, 0), "{s:?}");
    assert_eq!(loads.load(Ordering::SeqCst), 1);

    // Stalled: nothing comes back, so the call fails at the end of its budget (the
    // slow answers before raised it above `l2_timeout`) and is not waited for further.
    traffic.abort();
    // The last lookups started (two round trips each) are answered.
    tokio::time::sleep(LATENCY * 4 + Duration::from_millis(150)).await;
    proxy.blackhole(true);
    let v = waiting.get_or_load(&2, loader(2)).await.unwrap();
    assert_eq!(v.as_deref(), Some("db2"), "loaded while L2 does not answer");
    let s = waiting.stats();
    assert_eq!((s.l2_errors, s.l2_calls_waited_busy), (1, 1), "{s:?}");
    assert_eq!(loads.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_answers_were_slow_gives_its_calls_a_longer_budget() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.addr()).await.unwrap();
    let url = format!("redis://127.0.0.1:{}", proxy.port());
    let tier = Arc::new(RedisTier::builder(&url).prefix("budget").build().await.unwrap());
    // Publishes through the tier's connection, with a 100 ms timeout: less than the
    // proxy's 120 ms round trip.
    let bp = RedisStreamBackplane::builder(&url)
        .prefix("budget")
        .share_connection(&tier)
        .op_timeout(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    proxy.set_latency(LATENCY, Duration::ZERO);
    let traffic = other_traffic(tier.clone());
    tokio::time::sleep(LATENCY * 2 + Duration::from_millis(50)).await;
    // While the tier's lookups keep the replies coming, the publishes are waited for
    // and answer in ~120 ms: what they took becomes the connection's budget.
    for seq in 1..=3 {
        bp.publish(&crate::support::msg(1, seq, "busy")).await.expect("waited for, answered");
    }
    traffic.abort();
    tokio::time::sleep(LATENCY * 4 + Duration::from_millis(150)).await;
    // Alone on the connection now (no reply to go by): answered within the budget,
    // where a 100 ms timeout would have failed them.
    for seq in 4..=6 {
        bp.publish(&crate::support::msg(1, seq, "alone")).await.expect("within the budget");
    }
    // A server that stops answering still fails the call, at the end of the budget.
    proxy.blackhole(true);
    let started = std::time::Instant::now();
    let e = bp.publish(&crate::support::msg(1, 7, "stalled")).await.expect_err("no answer");
    assert!(e.is_transient(), "{e}");
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
}
