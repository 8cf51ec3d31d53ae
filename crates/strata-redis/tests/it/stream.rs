//! The Redis Stream backplane: delivery, replay, and what a subscriber reports after a
//! killed connection, a trimmed stream, a restarted or paused server.

use std::time::{Duration, Instant};

use strata::backplane::{Backplane, BackplaneEvent, Message, MessageBody};
use strata_redis::RedisStreamBackplane;
use strata_testkit::RedisServer;

use crate::support::{clients_named, message_of, msg, next_event, wait_for};

async fn stream_bp(server: &RedisServer) -> RedisStreamBackplane {
    RedisStreamBackplane::builder(server.url())
        .op_timeout(Duration::from_secs(2))
        .block(Duration::from_millis(500))
        .build()
        .await
        .expect("stream backplane")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_round_trip_and_replay() {
    let server = RedisServer::start();
    let bp = stream_bp(&server).await;
    // Published before the subscription: not delivered.
    bp.publish(&msg(1, 1, "before")).await.unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    let mut latencies = Vec::new();
    for seq in 2..=6 {
        let started = Instant::now();
        bp.publish(&msg(1, seq, &format!("k{seq}"))).await.unwrap();
        let ev = next_event(&mut sub, Duration::from_secs(5)).await;
        latencies.push(started.elapsed());
        assert_eq!(message_of(&ev), Some(&msg(1, seq, &format!("k{seq}"))));
    }
    latencies.sort();
    eprintln!(
        "[stream] publish→deliver latencies: min {:?} median {:?} max {:?}",
        latencies[0], latencies[2], latencies[4]
    );

    // Replay: another origin interleaved, heartbeats ignored.
    for seq in 1..=3 {
        bp.publish(&msg(2, seq, "o2")).await.unwrap();
    }
    bp.publish(&Message { origin: 1, seq: 6, namespace: "ns".into(), body: MessageBody::Heartbeat })
        .await
        .unwrap();
    let started = Instant::now();
    let got = bp.replay(1, 3, 5).await.unwrap().expect("complete replay");
    eprintln!("[stream] replay of 3 messages took {:?}", started.elapsed());
    assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
    assert!(got.iter().all(|m| m.origin == 1));
    assert_eq!(
        bp.replay(1, 1, 6).await.unwrap().map(|v| v.len()),
        Some(6),
        "seq 1 was published before the subscription, still in the stream"
    );
    assert_eq!(bp.replay(1, 5, 9).await.unwrap(), None, "seqs 7..9 never published");
    assert_eq!(bp.replay(3, 1, 1).await.unwrap(), None, "unknown origin");
    // Trimmed: not replayable any more.
    server.command(&["XTRIM", bp.stream_key(), "MAXLEN", "2"]).unwrap();
    assert_eq!(bp.replay(1, 3, 5).await.unwrap(), None);
    let s = bp.stats();
    eprintln!("[stream] stats {s:?}");
    assert!(s.delivered >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_client_kill_resumes_complete_with_gap_messages() {
    let server = RedisServer::start();
    let bp = RedisStreamBackplane::builder(server.url())
        .block(Duration::from_millis(500))
        // A slow first reconnect, so that messages are surely published in the gap.
        .reconnect_backoff(Duration::from_millis(400), Duration::from_millis(800))
        .build()
        .await
        .unwrap();
    let publisher = stream_bp(&server).await;
    let mut sub = bp.subscribe().await.unwrap();
    publisher.publish(&msg(9, 1, "a")).await.unwrap();
    assert!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).is_some());

    let clients = clients_named(&server, &bp.client_name_prefix());
    assert_eq!(clients.len(), 1, "one named subscriber connection: {clients:?}");
    let killed_at = Instant::now();
    server.command(&["CLIENT", "KILL", "ID", &clients[0].0]).unwrap();
    let (_, skipped) =
        wait_for(&mut sub, Duration::from_secs(5), "Disconnected", |e| *e == BackplaneEvent::Disconnected)
            .await;
    assert!(skipped.is_empty(), "{skipped:?}");
    let detected = killed_at.elapsed();
    for seq in 2..=4 {
        publisher.publish(&msg(9, seq, "gap")).await.unwrap();
    }
    let mut delivered = Vec::new();
    let resumed = loop {
        match next_event(&mut sub, Duration::from_secs(5)).await {
            BackplaneEvent::Message(m) => delivered.push(m.seq),
            BackplaneEvent::Resumed { complete } => break complete,
            other => panic!("unexpected {other:?}"),
        }
    };
    let resumed_after = killed_at.elapsed();
    assert!(resumed, "a stream resumes complete");
    assert_eq!(delivered, vec![2, 3, 4], "messages published in the gap are delivered before Resumed");
    publisher.publish(&msg(9, 5, "after")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).map(|m| m.seq), Some(5));
    assert_eq!(clients_named(&server, &bp.client_name_prefix()).len(), 1, "renamed after reconnect");
    eprintln!(
        "[stream] CLIENT KILL → Disconnected in {detected:?}, → Resumed{{complete:true}} in {resumed_after:?} \
         (backoff 400–800 ms), 3 gap messages delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_trimmed_while_away_is_lost() {
    let server = RedisServer::start();
    let bp = RedisStreamBackplane::builder(server.url())
        .block(Duration::from_millis(500))
        .reconnect_backoff(Duration::from_millis(400), Duration::from_millis(800))
        .build()
        .await
        .unwrap();
    let publisher = stream_bp(&server).await;
    let mut sub = bp.subscribe().await.unwrap();
    let clients = clients_named(&server, &bp.client_name_prefix());
    server.command(&["CLIENT", "KILL", "ID", &clients[0].0]).unwrap();
    wait_for(&mut sub, Duration::from_secs(5), "Disconnected", |e| *e == BackplaneEvent::Disconnected).await;
    for seq in 1..=20 {
        publisher.publish(&msg(4, seq, "x")).await.unwrap();
    }
    server.command(&["XTRIM", bp.stream_key(), "MAXLEN", "5"]).unwrap();
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut lost = false;
    let complete = loop {
        match next_event(&mut sub, Duration::from_secs(5)).await {
            BackplaneEvent::Message(m) => seen.push(m.seq),
            BackplaneEvent::Lost => lost = true,
            BackplaneEvent::Resumed { complete } => break complete,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(lost, "Lost before Resumed");
    assert!(!complete, "Resumed{{complete:false}} after a trim");
    assert_eq!(seen, (16..=20).collect::<Vec<_>>(), "what the stream still holds is delivered");
    eprintln!(
        "[stream] trimmed while away: Lost + Resumed{{complete:false}} {:?} after the trim; delivered {seen:?}",
        started.elapsed()
    );

    // Stream deleted entirely while away: trailing loss detected through the counter.
    let clients = clients_named(&server, &bp.client_name_prefix());
    server.command(&["CLIENT", "KILL", "ID", &clients[0].0]).unwrap();
    wait_for(&mut sub, Duration::from_secs(5), "Disconnected", |e| *e == BackplaneEvent::Disconnected).await;
    publisher.publish(&msg(4, 21, "x")).await.unwrap();
    server.command(&["DEL", bp.stream_key()]).unwrap();
    let (ev, skipped) = wait_for(&mut sub, Duration::from_secs(5), "Resumed", |e| {
        matches!(e, BackplaneEvent::Resumed { .. })
    })
    .await;
    assert_eq!(ev, BackplaneEvent::Resumed { complete: false });
    assert!(skipped.contains(&BackplaneEvent::Lost), "{skipped:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_server_restart_without_persistence_is_lost() {
    let mut server = RedisServer::start();
    let bp = RedisStreamBackplane::builder(server.url())
        .block(Duration::from_millis(300))
        .read_grace(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    bp.publish(&msg(1, 1, "a")).await.unwrap();
    assert!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).is_some());
    let killed_at = Instant::now();
    server.kill();
    server.restart();
    let (_, _) =
        wait_for(&mut sub, Duration::from_secs(10), "Disconnected", |e| *e == BackplaneEvent::Disconnected)
            .await;
    let (ev, skipped) = wait_for(&mut sub, Duration::from_secs(10), "Resumed", |e| {
        matches!(e, BackplaneEvent::Resumed { .. })
    })
    .await;
    assert_eq!(ev, BackplaneEvent::Resumed { complete: false }, "the restarted server lost the stream");
    assert!(skipped.contains(&BackplaneEvent::Lost), "{skipped:?}");
    eprintln!(
        "[stream] restart without persistence: Lost + Resumed{{complete:false}} {:?} after the kill",
        killed_at.elapsed()
    );
    let publish = async {
        loop {
            if bp.publish(&msg(1, 2, "b")).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), publish).await.expect("publish after restart");
    let ev = next_event(&mut sub, Duration::from_secs(5)).await;
    assert_eq!(message_of(&ev).map(|m| m.seq), Some(2), "no spurious Lost after the resync: {ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_slow_reader_behind_the_cap_gets_lost() {
    let server = RedisServer::start();
    let bp = RedisStreamBackplane::builder(server.url())
        .block(Duration::from_millis(200))
        .channel_capacity(2)
        .batch(2)
        .build()
        .await
        .unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    for seq in 1..=30 {
        bp.publish(&msg(5, seq, "x")).await.unwrap();
    }
    // The reader holds at most channel + one batch; the rest waits in the stream.
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.command(&["XTRIM", bp.stream_key(), "MAXLEN", "3"]).unwrap();
    let mut seqs = Vec::new();
    let mut lost_at = None;
    while seqs.last() != Some(&30) {
        match next_event(&mut sub, Duration::from_secs(5)).await {
            BackplaneEvent::Message(m) => seqs.push(m.seq),
            BackplaneEvent::Lost => lost_at = Some(seqs.len()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(lost_at.is_some(), "gap seen while connected is reported: {seqs:?}");
    assert!(seqs.ends_with(&[28, 29, 30]));
    eprintln!("[stream] slow reader: got {} of 30, Lost after {} messages", seqs.len(), lost_at.unwrap_or(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_malformed_entries_are_skipped() {
    let server = RedisServer::start();
    let bp = stream_bp(&server).await;
    let mut sub = bp.subscribe().await.unwrap();
    server.command(&["XADD", bp.stream_key(), "*", "m", "\u{1}garbage"]).unwrap();
    server.command(&["XADD", bp.stream_key(), "*", "other", "field"]).unwrap();
    bp.publish(&msg(3, 1, "ok")).await.unwrap();
    assert_eq!(next_event(&mut sub, Duration::from_secs(5)).await, BackplaneEvent::Malformed);
    assert_eq!(next_event(&mut sub, Duration::from_secs(5)).await, BackplaneEvent::Malformed);
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await), Some(&msg(3, 1, "ok")));
    assert_eq!(bp.stats().malformed, 2);
    eprintln!("[stream] 2 malformed entries skipped, next message delivered; stats {:?}", bp.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_paused_server_is_detected_and_resumed() {
    let mut server = RedisServer::start();
    let bp = RedisStreamBackplane::builder(server.url())
        .block(Duration::from_millis(200))
        .read_grace(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    server.pause().unwrap();
    let paused_at = Instant::now();
    let detected = tokio::time::timeout(Duration::from_secs(5), sub.recv()).await;
    let detected_in = paused_at.elapsed();
    server.resume().unwrap();
    assert_eq!(detected.expect("detected").expect("open"), BackplaneEvent::Disconnected);
    let resumed_at = Instant::now();
    let (ev, _) = wait_for(&mut sub, Duration::from_secs(10), "Resumed", |e| {
        matches!(e, BackplaneEvent::Resumed { .. })
    })
    .await;
    assert_eq!(ev, BackplaneEvent::Resumed { complete: true });
    eprintln!(
        "[stream] paused server: Disconnected {detected_in:?} after SIGSTOP (block 200 ms + grace 300 ms), \
         Resumed{{complete:true}} {:?} after SIGCONT",
        resumed_at.elapsed()
    );
    bp.publish(&msg(1, 1, "x")).await.unwrap();
    assert!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).is_some());
}
