//! Invalidations across a fleet: propagation, a subscriber killed in the middle (the
//! stream resumes, Pub/Sub flushes), and a writer killed before its publish.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata::backplane::{Message, MessageBody};
use strata_redis::{RedisPubSubBackplane, RedisStreamBackplane};
use strata_testkit::{FaultProxy, RedisServer};

use super::{Db, instance, kill_clients, stream, until_dropped};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_fleet_invalidation_propagates() {
    let server = RedisServer::start();
    let db = Db::default();
    db.set(1, "v1");
    let a = instance(&server, Arc::new(stream(&server).await)).await;
    let b = instance(&server, Arc::new(stream(&server).await)).await;
    assert_eq!(a.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some("v1"));
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some("v1"));
    assert_eq!(db.loads(), 1, "B was served from L2");
    assert_eq!(b.stats().l2_hits, 1);

    let mut delays = Vec::new();
    let mut calls = Vec::new();
    for round in 2..=6 {
        let v = format!("v{round}");
        db.set(1, &v);
        let started = Instant::now();
        a.invalidate(&1).await.unwrap();
        calls.push(started.elapsed());
        until_dropped(&b, 1, Duration::from_secs(2), "B after A's invalidate").await;
        delays.push(started.elapsed());
        assert_eq!(b.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some(v.as_str()));
        assert_eq!(a.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some(v.as_str()));
    }
    delays.sort();
    calls.sort();
    eprintln!(
        "[fleet/stream] A.invalidate() (L2 delete + XADD) took median {:?}; from its start to B's L1 copy \
         gone: min {:?} median {:?} max {:?}; loads {}",
        calls[2],
        delays[0],
        delays[2],
        delays[4],
        db.loads()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_fleet_subscriber_killed_resumes_without_flush() {
    let server = RedisServer::start();
    let db = Db::default();
    db.set(1, "v1");
    db.set(2, "w1");
    let a = instance(&server, Arc::new(stream(&server).await)).await;
    let b_bp = stream(&server).await;
    let b = instance(&server, Arc::new(b_bp.clone())).await;
    for k in [1, 2] {
        b.get_or_load(&k, db.loader(k)).await.unwrap();
    }
    let killed_at = Instant::now();
    kill_clients(&server, &b_bp.client_name_prefix());
    // In the gap (B reconnects after ≥150 ms): a committed change and its invalidation.
    db.set(1, "v2");
    a.invalidate(&1).await.unwrap();
    let dropped = until_dropped(&b, 1, Duration::from_secs(5), "B after its subscriber was killed").await;
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some("v2"));
    let healthy = async {
        while !b.is_backplane_healthy() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), healthy).await.expect("B healthy again");
    let s = b.stats();
    eprintln!(
        "[fleet/stream] B's subscriber killed, invalidation sent in the gap: B dropped the key {:?} after \
         the kill; gaps_detected {} repairs_flushed {} repairs_replayed {}; key 2 still cached: {}",
        dropped,
        s.gaps_detected,
        s.repairs_flushed,
        s.repairs_replayed,
        b.get_local(&2).is_some()
    );
    assert!(killed_at.elapsed() < Duration::from_secs(10));
    assert_eq!(b.get_local(&2).as_deref(), Some("w1"), "a complete resume needs no flush");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_fleet_subscriber_killed_flushes() {
    let server = RedisServer::start();
    let db = Db::default();
    db.set(1, "v1");
    db.set(2, "w1");
    let pubsub = |server: &RedisServer| {
        RedisPubSubBackplane::builder(server.url())
            .reconnect_backoff(Duration::from_millis(300), Duration::from_millis(600))
            .build()
    };
    let a = instance(&server, Arc::new(pubsub(&server).await.unwrap())).await;
    let b = instance(&server, Arc::new(pubsub(&server).await.unwrap())).await;
    for k in [1, 2] {
        b.get_or_load(&k, db.loader(k)).await.unwrap();
    }
    let killed_at = Instant::now();
    // Both instances' subscribers go; A's messages published in the gap are lost.
    server.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    db.set(1, "v2");
    a.invalidate(&1).await.unwrap();
    let dropped = until_dropped(&b, 1, Duration::from_secs(5), "B after a lost pub/sub message").await;
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some("v2"));
    let s = b.stats();
    eprintln!(
        "[fleet/pubsub] subscribers killed, invalidation lost: B's copy gone {dropped:?} after the kill; \
         gaps_detected {} repairs_flushed {}",
        s.gaps_detected, s.repairs_flushed
    );
    assert!(s.repairs_flushed >= 1, "repaired by a flush: {s:?}");
    assert!(killed_at.elapsed() < Duration::from_secs(10));
}

/// A writer whose backplane stops answering (a blackholed proxy) while its tier still
/// reaches Redis deletes the entry from L2 but cannot publish, and is then killed (its
/// handle dropped without `shutdown`): no message will ever say what it invalidated.
/// The others find it silent within 5 heartbeat intervals and drop their L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_fleet_writer_killed_before_its_publish_is_found_silent() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.addr()).await.expect("proxy");
    let db = Db::default();
    db.set(1, "v1");
    let a_bp = RedisStreamBackplane::builder(format!("redis://127.0.0.1:{}", proxy.port()))
        .block(Duration::from_millis(300))
        .read_grace(Duration::from_millis(300))
        .build()
        .await
        .expect("A's backplane");
    let a = instance(&server, Arc::new(a_bp)).await;
    let b = instance(&server, Arc::new(stream(&server).await)).await;
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some("v1"));
    let heard = async {
        while b.stats().heartbeats_received < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), heard).await.expect("B heard A");

    proxy.blackhole(true);
    db.set(1, "v2");
    let started = Instant::now();
    assert!(a.invalidate(&1).await.is_err(), "the publish cannot go out");
    drop(a);
    assert_eq!(b.get_local(&1).as_deref(), Some("v1"), "B heard nothing");
    let dropped = until_dropped(&b, 1, Duration::from_secs(5), "B after A fell silent").await;
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some("v2"));
    let s = b.stats();
    assert_eq!(s.members_silent, 1, "{s:?}");
    eprintln!(
        "[fleet/stream] writer killed between its L2 delete and its publish: B dropped the key {:?} after \
         the invalidate (heartbeat 200 ms: silent after 1 s); members_silent {}, repairs_flushed {}",
        started.elapsed().max(dropped),
        s.members_silent,
        s.repairs_flushed
    );
}

/// A key reloaded after another instance's invalidation is pushed to the instances
/// that held it, on the reload channel beside the stream (the stream gains no entry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_fleet_reloads_reach_the_holders_beside_the_stream() {
    let server = RedisServer::start();
    let db = Db::default();
    db.set(1, "v1");
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(instance(&server, Arc::new(stream(&server).await)).await);
    }
    let (writer, reloader, holder) = (&fleet[0], &fleet[1], &fleet[2]);
    for c in &fleet {
        assert_eq!(c.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some("v1"));
    }
    db.set(1, "v2");
    writer.invalidate(&1).await.unwrap();
    until_dropped(reloader, 1, Duration::from_secs(2), "the reloader").await;
    until_dropped(holder, 1, Duration::from_secs(2), "the holder").await;
    let (loads, holder_l2) = (db.loads(), holder.stats().l2_hits);
    assert_eq!(reloader.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some("v2"));
    super::wait_until(Duration::from_secs(2), "the holder installed the reload", || {
        holder.stats().reloads_installed == 1
    })
    .await;
    assert_eq!(holder.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some("v2"));
    assert_eq!(
        (db.loads(), holder.stats().l2_hits),
        (loads + 1, holder_l2),
        "one load, no L2 read by the holder"
    );
    assert_eq!((reloader.stats().reloads_pushed, writer.stats().reloads_installed), (1, 0));
    let client = redis::Client::open(server.url()).expect("client");
    let mut c = client.get_multiplexed_async_connection().await.expect("connection");
    let all: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg("strata:{bp}").arg("-").arg("+").query_async(&mut c).await.expect("XRANGE");
    let bodies: Vec<MessageBody> = all
        .ids
        .iter()
        .filter_map(|e| match e.map.get("m") {
            Some(redis::Value::BulkString(b)) => Message::decode(b).ok().map(|m| m.body),
            _ => None,
        })
        .collect();
    assert!(bodies.iter().any(|b| matches!(b, MessageBody::Invalidate(_))), "the stream read back");
    assert!(!bodies.iter().any(|b| matches!(b, MessageBody::Reload { .. })), "no reload in the stream");
}
