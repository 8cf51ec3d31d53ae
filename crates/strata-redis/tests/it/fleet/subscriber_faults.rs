//! A subscriber's connection fails while invalidations flow: cut by `CLIENT KILL`, or
//! stalled until the server drops it for its output buffer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use strata_redis::{BackplaneStats, RedisPubSubBackplane, RedisStreamBackplane};
use strata_testkit::{Direction, FaultProxy, RedisServer};

use super::{
    Db, Opts, client_ids_of_type, instance, instance_with, ms, ms_opt, stream, version_of, wait_until,
};
use crate::support;

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
    let (a, b, b_bp_stats, b_sub_id): (_, _, Box<dyn Fn() -> BackplaneStats + Send>, String) = match kind {
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
            let named = support::clients_named(&server, &b_bp.client_name_prefix());
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
            let new: Vec<String> =
                client_ids_of_type(&server, "pubsub").into_iter().filter(|id| !before.contains(id)).collect();
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
    let (detected, unhealthy, resumed, clean) =
        tokio::time::timeout(Duration::from_secs(8), monitor).await.expect("monitor ends").expect("monitor");
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
    assert!(s.gaps_detected > base.gaps_detected && s.repairs_flushed > base.repairs_flushed, "{TAG} {s:?}");
    assert!(bps.disconnects >= 1, "{TAG} the server's drop reached B as a disconnect: {bps:?}");
}
