//! The Redis Pub/Sub backplane: delivery, killed connections, a full channel, and a
//! stalled subscriber that the server drops.

use std::time::{Duration, Instant};

use strata::backplane::{Backplane, BackplaneEvent};
use strata_redis::RedisPubSubBackplane;
use strata_testkit::{Direction, FaultProxy, RedisServer};

use crate::support::{message_of, msg, next_event, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_round_trip_and_client_kill() {
    let server = RedisServer::start();
    let bp = RedisPubSubBackplane::builder(server.url()).build().await.unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    let started = Instant::now();
    bp.publish(&msg(1, 1, "a")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await), Some(&msg(1, 1, "a")));
    eprintln!(
        "[pubsub] publish→deliver {:?}, PUBLISH reached {} subscriber(s)",
        started.elapsed(),
        bp.last_receivers()
    );
    assert_eq!(bp.replay(1, 1, 1).await.unwrap(), None, "pub/sub cannot replay");
    server.command(&["PUBLISH", bp.channel(), "garbage"]).unwrap();
    assert_eq!(next_event(&mut sub, Duration::from_secs(5)).await, BackplaneEvent::Malformed);

    let killed_at = Instant::now();
    server.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    assert_eq!(next_event(&mut sub, Duration::from_secs(5)).await, BackplaneEvent::Disconnected);
    let detected = killed_at.elapsed();
    let (ev, skipped) = wait_for(&mut sub, Duration::from_secs(5), "Resumed", |e| {
        matches!(e, BackplaneEvent::Resumed { .. })
    })
    .await;
    assert_eq!(ev, BackplaneEvent::Resumed { complete: false });
    assert!(skipped.is_empty(), "{skipped:?}");
    let resumed = killed_at.elapsed();
    bp.publish(&msg(1, 2, "b")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).map(|m| m.seq), Some(2));
    eprintln!(
        "[pubsub] CLIENT KILL → Disconnected in {detected:?}, → Resumed{{complete:false}} in {resumed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_full_channel_reports_lost() {
    let server = RedisServer::start();
    let bp = RedisPubSubBackplane::builder(server.url()).channel_capacity(3).build().await.unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    for seq in 1..=10 {
        bp.publish(&msg(1, seq, "x")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_event(&mut sub, Duration::from_secs(5)).await);
    }
    assert!(got.iter().all(|e| message_of(e).is_some()), "{got:?}");
    bp.publish(&msg(1, 11, "x")).await.unwrap();
    assert_eq!(next_event(&mut sub, Duration::from_secs(5)).await, BackplaneEvent::Lost);
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).map(|m| m.seq), Some(11));
    eprintln!(
        "[pubsub] full channel (capacity 3, 10 published): 3 delivered, Lost, then seq 11; stats {:?}",
        bp.stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_stalled_subscriber_dropped_by_output_buffer_limit() {
    let server = RedisServer::start();
    // Through a proxy, so that the subscriber can be stalled: with server→client
    // forwarding cut, nothing is read from Redis and its output buffer grows.
    let proxy = FaultProxy::start(server.addr()).await.unwrap();
    let url = format!("redis://127.0.0.1:{}", proxy.port());
    let bp = RedisPubSubBackplane::builder(&url)
        // Long pings: detection must come from the server dropping us.
        .ping(Duration::from_secs(30), Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    let publisher = RedisPubSubBackplane::builder(server.url()).build().await.unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    publisher.publish(&msg(1, 1, "warm")).await.unwrap();
    assert!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).is_some());

    server.command(&["CONFIG", "SET", "client-output-buffer-limit", "pubsub 256kb 128kb 1"]).unwrap();
    proxy.cut(Direction::ServerToClient, true);
    let stalled_at = Instant::now();
    let big = "x".repeat(16 * 1024);
    let mut published = 0u64;
    let dropped = async {
        loop {
            publisher.publish(&msg(1, 2 + published, &big)).await.unwrap();
            published += 1;
            let n = server.command(&["PUBSUB", "NUMSUB", publisher.channel()]).unwrap();
            if n.trim_end().ends_with(":0") {
                return;
            }
            if published.is_multiple_of(50) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), dropped).await.expect("redis drops the stalled subscriber");
    let dropped_in = stalled_at.elapsed();
    let info = server.command(&["INFO", "stats"]).unwrap();
    let disconnections = info
        .lines()
        .find(|l| l.starts_with("client_output_buffer_limit_disconnections"))
        .unwrap_or("client_output_buffer_limit_disconnections:n/a")
        .to_owned();
    proxy.cut(Direction::ServerToClient, false);
    let unstalled_at = Instant::now();
    let (_, before) =
        wait_for(&mut sub, Duration::from_secs(10), "Disconnected", |e| *e == BackplaneEvent::Disconnected)
            .await;
    let detected = unstalled_at.elapsed();
    let (ev, _) = wait_for(&mut sub, Duration::from_secs(10), "Resumed", |e| {
        matches!(e, BackplaneEvent::Resumed { .. })
    })
    .await;
    assert_eq!(ev, BackplaneEvent::Resumed { complete: false });
    let delivered = before.iter().filter(|e| message_of(e).is_some()).count();
    eprintln!(
        "[pubsub] stalled subscriber dropped by the server after {published} × 16 KiB messages in {dropped_in:?} \
         ({disconnections}); after un-stalling: {delivered} buffered messages, Disconnected in {detected:?}, \
         Resumed{{complete:false}} in {:?}",
        unstalled_at.elapsed()
    );
    publisher.publish(&msg(1, 100_000, "after")).await.unwrap();
    let (ev, _) = wait_for(&mut sub, Duration::from_secs(5), "message after resubscribe", |e| {
        message_of(e).is_some_and(|m| m.seq == 100_000)
    })
    .await;
    assert!(message_of(&ev).is_some());
}
