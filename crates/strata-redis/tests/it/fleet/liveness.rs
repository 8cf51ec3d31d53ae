//! What liveness and Strong acknowledgements cost on the stream backplane: one digest
//! entry per heartbeat interval for the whole fleet (not one heartbeat per member), and
//! acknowledgements in their origin's own stream, never in the shared one.

use std::sync::Arc;
use std::time::Duration;

use strata::backplane::{Message, MessageBody};
use strata::{Cache, Consistency};
use strata_redis::{RedisStreamBackplane, RedisTier, StreamDelivery};
use strata_testkit::RedisServer;

use super::{Db, stream_builder};
use crate::support;

const NS: &str = "liveness";

async fn member(server: &RedisServer, strong: bool, broadcast: bool) -> Cache<u64, String> {
    member_with(server, strong, broadcast, StreamDelivery::default()).await
}

async fn member_with(
    server: &RedisServer,
    strong: bool,
    broadcast: bool,
    delivery: StreamDelivery,
) -> Cache<u64, String> {
    let tier = RedisTier::builder(server.url()).prefix("fleet").build().await.expect("tier");
    let bp = stream_builder(server).delivery(delivery).build().await.expect("stream backplane");
    let mut b = Cache::builder(NS)
        .tier(Arc::new(tier))
        .backplane(Arc::new(bp))
        .heartbeat_interval(Duration::from_millis(50))
        .broadcast_heartbeats(broadcast);
    if strong {
        b = b.consistency(Consistency::Strong).membership_lease(Duration::from_millis(1000));
    }
    let cache = b.build().expect("cache");
    tokio::time::timeout(Duration::from_secs(5), cache.ready()).await.expect("ready");
    cache
}

/// The shared stream's entries from `from` (an id) on, decoded.
async fn entries_after(server: &RedisServer, from: &str) -> Vec<Message> {
    let mut raw = support::raw_conn(server).await;
    let key = stream_key(server).await;
    let v: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(&key)
        .arg(format!("({from}"))
        .arg("+")
        .query_async(&mut raw)
        .await
        .expect("XRANGE");
    let mut out = Vec::new();
    for (_, fields) in v {
        let m = fields.chunks(2).find(|f| f[0] == b"m").and_then(|f| Message::decode(&f[1]).ok());
        out.push(m.expect("every entry decodes"));
    }
    out
}

async fn last_id(server: &RedisServer) -> String {
    let mut raw = support::raw_conn(server).await;
    let key = RedisStreamBackplane::builder(server.url()).build().await.expect("bp").stream_key().to_owned();
    let v: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XREVRANGE")
        .arg(&key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut raw)
        .await
        .expect("XREVRANGE");
    v.first().map_or_else(|| "0-0".to_owned(), |(id, _)| id.clone())
}

/// An idle fleet of 6 appends about one digest per 50 ms interval to the stream,
/// where broadcast heartbeats append six; every member still hears every other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_fleet_appends_one_digest_per_interval() {
    const N: usize = 6;
    for broadcast in [false, true] {
        let server = RedisServer::start();
        let mut fleet = Vec::new();
        for _ in 0..N {
            fleet.push(member(&server, false, broadcast).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let from = last_id(&server).await;
        let heard: Vec<u64> = fleet.iter().map(|c| c.stats().heartbeats_received).collect();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let entries = entries_after(&server, &from).await;
        let digests = entries.iter().filter(|m| matches!(m.body, MessageBody::Digest(_))).count();
        eprintln!(
            "[liveness] {N} idle members, broadcast {broadcast}: {} entries in 20 intervals ({digests} digests)",
            entries.len()
        );
        if broadcast {
            assert!(entries.len() >= N * 10, "{} entries", entries.len());
        } else {
            assert!(entries.len() <= 40, "{} entries in 20 intervals", entries.len());
            assert_eq!(digests, entries.len(), "nothing but digests");
        }
        for (c, before) in fleet.iter().zip(heard) {
            let got = c.stats().heartbeats_received - before;
            assert!(got >= (N as u64 - 1) * 5, "heard {got}: {:?}", c.stats());
            assert!(c.health().backplane_healthy);
        }
        if !broadcast {
            // No TTL: under `volatile-*` eviction Redis cannot take it (nor the stream).
            let beats = format!("{}:beats:{NS}", stream_key(&server).await);
            let ttl = server.command(&["PTTL", &beats]).unwrap();
            assert_eq!(ttl.trim(), ":-1", "{beats}: {ttl:?}");
        }
    }
}

/// The shared stream's key, under the default prefix.
async fn stream_key(server: &RedisServer) -> String {
    RedisStreamBackplane::builder(server.url()).build().await.expect("bp").stream_key().to_owned()
}

/// At the Strong level an invalidation waits for every member's acknowledgement,
/// which is read from the origin's own stream: the shared stream holds the
/// invalidations and digests only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_acknowledgements_travel_in_the_origins_stream() {
    strong_acknowledgements_are_addressed(StreamDelivery::BlockingRead).await;
}

/// Under push delivery the acknowledgements are pushed to the origin's connection
/// alone: nothing is kept for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_acknowledgements_are_pushed_to_the_origin() {
    strong_acknowledgements_are_addressed(StreamDelivery::PubSub).await;
}

async fn strong_acknowledgements_are_addressed(delivery: StreamDelivery) {
    let server = RedisServer::start();
    let db = Db::default();
    db.seed(0..10);
    let fleet = [
        member_with(&server, true, false, delivery).await,
        member_with(&server, true, false, delivery).await,
        member_with(&server, true, false, delivery).await,
    ];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let from = last_id(&server).await;
    for (i, c) in fleet.iter().enumerate() {
        for k in 0..10 {
            c.get_or_load(&k, db.loader(k)).await.expect("load");
        }
        let k = i as u64;
        db.bump(k);
        tokio::time::timeout(Duration::from_secs(3), c.invalidate(&k))
            .await
            .expect("acknowledged")
            .expect("invalidate");
        for other in &fleet {
            assert_eq!(other.get_local(&k), None, "every member dropped {k} before invalidate returned");
        }
    }
    let entries = entries_after(&server, &from).await;
    let acks = entries.iter().filter(|m| matches!(m.body, MessageBody::Ack { .. })).count();
    let invalidations = entries.iter().filter(|m| matches!(m.body, MessageBody::Invalidate(_))).count();
    assert_eq!((invalidations, acks), (3, 0), "{entries:?}");
    let mut raw = support::raw_conn(&server).await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*:ack:*").query_async(&mut raw).await.expect("KEYS");
    if delivery == StreamDelivery::PubSub {
        assert_eq!(keys, Vec::<String>::new(), "pushed, not kept");
        return;
    }
    assert_eq!(keys.len(), 3, "one acknowledgement stream per origin: {keys:?}");
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL").arg(k).query_async(&mut raw).await.expect("PTTL");
        assert!(ttl > 0, "{k} expires once its origin is gone");
    }
}

/// On Pub/Sub too: one digest published per interval, acknowledgements published on
/// the origin's own channel (so a Strong invalidation returns once every member
/// acknowledged, and its acknowledgements are not published on the shared channel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_publishes_one_digest_per_interval_and_addresses_acknowledgements() {
    const N: usize = 4;
    let server = RedisServer::start();
    let mut fleet = Vec::new();
    for _ in 0..N {
        let tier = RedisTier::builder(server.url()).prefix("fleet").build().await.expect("tier");
        let bp = strata_redis::RedisPubSubBackplane::builder(server.url()).build().await.expect("pubsub");
        let cache = Cache::<u64, String>::builder(NS)
            .tier(Arc::new(tier))
            .backplane(Arc::new(bp))
            .heartbeat_interval(Duration::from_millis(50))
            .consistency(Consistency::Strong)
            .membership_lease(Duration::from_millis(1000))
            .build()
            .expect("cache");
        tokio::time::timeout(Duration::from_secs(5), cache.ready()).await.expect("ready");
        fleet.push(cache);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let publishes = |server: &RedisServer| -> u64 {
        let info = server.command(&["INFO", "commandstats"]).expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_publish:calls="))
            .and_then(|v| v.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    let before = publishes(&server);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let idle = publishes(&server) - before;
    eprintln!("[liveness] {N} idle members on Pub/Sub: {idle} publishes in 20 intervals");
    assert!(idle <= 40, "{idle} publishes in 20 intervals (broadcast would be {})", N * 20);
    for c in &fleet {
        assert!(c.health().backplane_healthy, "its own heartbeat comes back in the digest");
    }
    let before = publishes(&server);
    for (i, c) in fleet.iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(3), c.invalidate(&(i as u64)))
            .await
            .expect("every member acknowledged")
            .expect("invalidate");
    }
    let writes = publishes(&server) - before;
    eprintln!("[liveness] {N} Strong invalidations: {writes} publishes (digests included)");
    // Each invalidation: one publish, N - 1 acknowledgements (plus the interval's digests).
    assert!(writes >= (N * N) as u64, "{writes}");
    // ... each acknowledgement on its origin's channel, which only that origin reads.
    let channels = server.command(&["PUBSUB", "CHANNELS", "*:ack:*"]).expect("PUBSUB CHANNELS");
    let acks = channels.lines().filter(|l| l.contains(":ack:")).count();
    assert_eq!(acks, N, "one acknowledgement channel per member: {channels}");
}
