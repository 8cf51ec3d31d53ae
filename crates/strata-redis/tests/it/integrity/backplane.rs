//! Forged backplane messages with integrity keys set: an invalidate-all or a sequence
//! jump written straight to the stream or channel by someone without the keys is
//! ignored and counted as malformed; the fleet's L1 keeps serving.

use std::sync::Arc;
use std::time::Duration;

use strata::backplane::{Backplane, BackplaneEvent, Message, MessageBody};
use strata::{Cache, Scope};
use strata_redis::{RedisPubSubBackplane, RedisStreamBackplane, StreamDelivery};
use strata_testkit::RedisServer;

use super::{K1, K2, keys};

const K3: &[u8] = b"k3: a key nobody else was given.";
use crate::support::{msg, raw_conn, wait_for};

fn forged(origin: u64, seq: u64, namespace: &str, body: MessageBody) -> Vec<u8> {
    let mut m: Message = msg(origin, seq, "k");
    m.namespace = namespace.to_owned();
    m.body = body;
    m.encode().unwrap().to_vec()
}

async fn stream_with(server: &RedisServer, k: &[&[u8]], delivery: StreamDelivery) -> RedisStreamBackplane {
    RedisStreamBackplane::builder(server.url())
        .delivery(delivery)
        .block(Duration::from_millis(300))
        .read_grace(Duration::from_millis(300))
        .integrity_keys(keys(k))
        .build()
        .await
        .expect("stream backplane")
}

async fn instance(bp: &RedisStreamBackplane) -> Cache<u64, String> {
    let cache = Cache::builder("payment").backplane(Arc::new(bp.clone())).build().expect("cache");
    tokio::time::timeout(Duration::from_secs(5), cache.ready()).await.expect("ready");
    cache
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stream_messages_are_ignored_counted_and_l1_keeps_serving() {
    forged_stream_messages(StreamDelivery::BlockingRead).await;
}

/// Under push delivery the forgeries are published on the stream's channel, with an
/// id far ahead: unverified, it must not move the readers' position either (the
/// genuine invalidation after it is still delivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_pushes_are_ignored_counted_and_l1_keeps_serving() {
    forged_stream_messages(StreamDelivery::PubSub).await;
}

async fn forged_stream_messages(delivery: StreamDelivery) {
    let server = RedisServer::start();
    let bp = stream_with(&server, &[K1], delivery).await;
    let (a, b) = (instance(&bp).await, instance(&bp).await);
    for k in 1..=3u64 {
        a.get_or_load(&k, move || async move { Ok::<_, std::io::Error>(Some(format!("v{k}"))) })
            .await
            .unwrap();
    }
    assert_eq!(a.get_local(&1).as_deref(), Some("v1"), "cached before the forgeries");
    let mut raw = raw_conn(&server).await;
    let n: Option<u64> =
        redis::cmd("GET").arg(format!("{}:seq", bp.stream_key())).query_async(&mut raw).await.unwrap();
    let n = n.unwrap_or(0);
    let forgeries = [
        // An invalidate-all from a live instance, correctly numbered.
        (forged(b.origin(), 1_000, "payment", MessageBody::Invalidate(Scope::All)), n + 1),
        // A sequence jump (issue #16 item 5), numbered with a jump too.
        (forged(b.origin(), u64::MAX, "payment", MessageBody::Heartbeat), n + 50),
    ];
    // (A message signed with another key but appended through the publish script would
    // consume an entry number, which every reader then sees as a loss: a flush, as any
    // write to the counter can cause; see the crate docs. Raw appends here.)
    for (bytes, number) in &forgeries {
        if delivery == StreamDelivery::PubSub {
            let mut payload = format!("99999999999999-0\n{number}\n").into_bytes();
            payload.extend_from_slice(bytes);
            let _: u64 =
                redis::cmd("PUBLISH").arg(bp.stream_key()).arg(payload).query_async(&mut raw).await.unwrap();
            continue;
        }
        let _: String = redis::cmd("XADD")
            .arg(bp.stream_key())
            .arg("*")
            .arg("m")
            .arg(&bytes[..])
            .arg("n")
            .arg(*number)
            .query_async(&mut raw)
            .await
            .unwrap();
    }
    // A genuine invalidation after the forgeries: once A applied it, it read them all.
    let applied = a.stats().invalidations_applied;
    b.invalidate(&3).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while a.stats().invalidations_applied == applied {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the genuine invalidation arrives");
    eprintln!("[integrity] A after the forgeries: {:?}; backplane {:?}", a.stats(), bp.stats());
    assert_eq!(a.get_local(&1).as_deref(), Some("v1"), "L1 hits unaffected by the forged invalidate-all");
    assert_eq!(a.get_local(&2).as_deref(), Some("v2"));
    assert_eq!(a.get_local(&3), None, "the genuine invalidation applied");
    let s = bp.stats();
    assert!(s.malformed >= 2 * 2, "each subscriber counted each forgery: {s:?}");
    assert_eq!(s.lost, 0, "a forged entry number fakes no loss: {s:?}");
    assert_eq!(a.stats().gaps_detected, 0, "the forged sequence jump was never seen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_pubsub_messages_are_ignored_and_rotation_keeps_old_publishers_heard() {
    let server = RedisServer::start();
    let build = |k: &[&[u8]]| {
        RedisPubSubBackplane::builder(server.url())
            .op_timeout(Duration::from_secs(2))
            .integrity_keys(keys(k))
            .build()
    };
    let (old, rotating) = (build(&[K1]).await.unwrap(), build(&[K2, K1]).await.unwrap());
    let mut sub = rotating.subscribe().await.unwrap();
    // Wait until the subscription is live: a signed probe comes back.
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            old.publish(&msg(1, 1, "probe")).await.unwrap();
            if let Ok(Some(BackplaneEvent::Message(_))) =
                tokio::time::timeout(Duration::from_millis(100), sub.recv()).await
            {
                break;
            }
        }
    })
    .await
    .expect("subscribed");
    let mut raw = raw_conn(&server).await;
    let unsigned = forged(7, u64::MAX, "ns", MessageBody::Invalidate(Scope::All));
    let _: u64 =
        redis::cmd("PUBLISH").arg(rotating.channel()).arg(&unsigned[..]).query_async(&mut raw).await.unwrap();
    build(&[K3]).await.unwrap().publish(&msg(8, 1, "signed-by-a-stranger")).await.unwrap();
    old.publish(&msg(1, 2, "signed-by-old")).await.unwrap();
    let (ev, skipped) = wait_for(
        &mut sub,
        Duration::from_secs(5),
        "the old key's message",
        |e| matches!(e, BackplaneEvent::Message(m) if m.seq == 2),
    )
    .await;
    assert!(matches!(ev, BackplaneEvent::Message(_)));
    assert!(skipped.iter().any(|e| matches!(e, BackplaneEvent::Malformed)), "{skipped:?}");
    assert!(
        !skipped.iter().any(|e| matches!(e, BackplaneEvent::Message(m) if m.origin == 7 || m.origin == 8)),
        "{skipped:?}"
    );
    assert!(rotating.stats().malformed >= 2, "{:?}", rotating.stats());
    let err = RedisPubSubBackplane::builder(server.url()).integrity_keys(keys(&[b"short"])).build().await;
    assert!(err.unwrap_err().to_string().contains("at least 16 bytes"));
}
