//! The Redis Stream backplane: delivery, replay, and what a subscriber reports after a
//! killed connection, a trimmed stream, a restarted or paused server.

use std::time::{Duration, Instant};

use strata::backplane::{Backplane, BackplaneEvent, Message, MessageBody};
use strata_redis::{RedisStreamBackplane, StreamDelivery};
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

/// A backplane whose subscribers are slow to reconnect, so that what is sent after a
/// `CLIENT KILL` is surely sent while they are away.
async fn slow_to_reconnect(server: &RedisServer) -> RedisStreamBackplane {
    RedisStreamBackplane::builder(server.url())
        .block(Duration::from_millis(500))
        .reconnect_backoff(Duration::from_millis(400), Duration::from_millis(800))
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
    bp.publish(&Message {
        origin: 1,
        seq: 6,
        namespace: "ns".into(),
        body: MessageBody::Heartbeat,
        sent_at_ms: 0,
    })
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
    let bp = slow_to_reconnect(&server).await;
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
    let bp = RedisStreamBackplane::builder(server.url())
        .delivery(StreamDelivery::BlockingRead)
        .build()
        .await
        .expect("stream backplane");
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

/// Under push delivery a subscriber sends no command per entry: three subscribers,
/// 50 entries, not one `XREAD`, one `PUBLISH` per entry, and one read per subscriber
/// (where it starts). With blocking reads the same costs an `XREAD` per subscriber and
/// wake-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_entries_cost_no_read_per_subscriber() {
    for delivery in [StreamDelivery::PubSub, StreamDelivery::BlockingRead] {
        let server = RedisServer::start();
        let bp = RedisStreamBackplane::builder(server.url())
            .delivery(delivery)
            .block(Duration::from_secs(30))
            .build()
            .await
            .expect("stream backplane");
        let mut subs = Vec::new();
        for _ in 0..3 {
            subs.push(bp.subscribe().await.unwrap());
        }
        for i in 1..=50 {
            bp.publish(&msg(3, i, "k")).await.unwrap();
        }
        for sub in &mut subs {
            for i in 1..=50 {
                assert_eq!(message_of(&next_event(sub, Duration::from_secs(5)).await), Some(&msg(3, i, "k")));
            }
        }
        let stats = server.command(&["INFO", "commandstats"]).unwrap();
        let calls = |cmd: &str| {
            stats
                .lines()
                .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
                .and_then(|rest| rest.split(',').next())
                .map_or(0, |n| n.parse::<u64>().unwrap())
        };
        let s = bp.stats();
        eprintln!(
            "[stream] {delivery:?}: XREAD {}, PUBLISH {}, reads {}",
            calls("xread"),
            calls("publish"),
            s.reads
        );
        assert_eq!(calls("publish"), 50, "one PUBLISH per entry under either delivery");
        if delivery == StreamDelivery::PubSub {
            assert_eq!(calls("xread"), 0, "{stats}");
            assert_eq!(s.reads, 3, "one read per subscriber, where it starts: {s:?}");
        } else {
            assert!(calls("xread") >= 3 + 3, "each subscriber blocks, wakes and blocks again: {stats}");
            assert!(s.reads > 3, "{s:?}");
        }
    }
}

/// A server without RESP3 (Redis before 6; here `HELLO` renamed away) cannot push: a
/// backplane left on push delivery reads instead (with a warning), so entries and
/// acknowledgements still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_delivery_without_resp3_reads_instead() {
    const ORIGIN: u64 = 0x53;
    let server = RedisServer::builder().arg("rename-command", "HELLO \"\"").start();
    let bp = stream_bp(&server).await;
    let mut sub = bp.subscribe_as(ORIGIN).await.expect("subscribes, reading");
    bp.publish(&msg(3, 1, "k")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await), Some(&msg(3, 1, "k")));
    let ack = Message { body: MessageBody::Ack { to: ORIGIN, seq: 1 }, ..msg(7, 0, "") };
    stream_bp(&server).await.publish_to(ORIGIN, &ack).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await), Some(&ack));
    assert!(bp.stats().reads > 1, "{:?}", bp.stats());
}

/// Under push delivery a receiver that does not keep up fills its queue of pushes, and
/// those that do not fit are dropped: the reader reads them from the stream instead,
/// so all 200 entries arrive, in order, with no loss reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_that_do_not_fit_are_read_from_the_stream() {
    let server = RedisServer::start();
    let bp = RedisStreamBackplane::builder(server.url())
        .channel_capacity(2)
        .block(Duration::from_secs(30))
        .build()
        .await
        .expect("stream backplane");
    let mut sub = bp.subscribe().await.unwrap();
    for i in 1..=200 {
        bp.publish(&msg(3, i, "k")).await.unwrap();
    }
    for i in 1..=200 {
        assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).map(|m| m.seq), Some(i));
    }
    let s = bp.stats();
    assert_eq!(s.lost, 0, "{s:?}");
    assert!(s.reads > 1, "the dropped pushes were read from the stream: {s:?}");
    eprintln!("[stream] 200 entries through a queue of 2: {s:?}");
}

/// Under push delivery an acknowledgement sent while its origin's connection is down
/// reaches no subscriber, so it is kept in the origin's acknowledgement stream, which
/// the origin reads when it reconnects (before `Resumed`): a Strong write does not
/// wait for the sender's lease. While the origin is connected nothing is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_sent_while_its_origin_is_away_is_read_when_it_returns() {
    const ORIGIN: u64 = 0x51;
    let server = RedisServer::start();
    let bp = slow_to_reconnect(&server).await;
    let member = stream_bp(&server).await;
    let mut sub = bp.subscribe_as(ORIGIN).await.unwrap();
    let ack = |seq| Message { body: MessageBody::Ack { to: ORIGIN, seq }, ..msg(7, 0, "") };
    member.publish_to(ORIGIN, &ack(1)).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await), Some(&ack(1)));
    assert_eq!(
        server.command(&["EXISTS", &format!("{}:ack:{ORIGIN:x}", bp.stream_key())]).unwrap(),
        ":0\r\n"
    );

    let clients = clients_named(&server, &bp.client_name_prefix());
    server.command(&["CLIENT", "KILL", "ID", &clients[0].0]).unwrap();
    wait_for(&mut sub, Duration::from_secs(5), "Disconnected", |e| *e == BackplaneEvent::Disconnected).await;
    member.publish_to(ORIGIN, &ack(2)).await.unwrap();
    let mut got = Vec::new();
    loop {
        match next_event(&mut sub, Duration::from_secs(5)).await {
            BackplaneEvent::Message(m) => got.push(m),
            BackplaneEvent::Resumed { complete } => {
                assert!(complete);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, vec![ack(2)], "read from the origin's stream before Resumed");
    member.publish_to(ORIGIN, &ack(3)).await.unwrap();
    assert_eq!(
        message_of(&next_event(&mut sub, Duration::from_secs(5)).await),
        Some(&ack(3)),
        "pushed again"
    );
}

/// Under push delivery, what is published on the stream's channel by anyone else is
/// skipped and counted; entries appended to the stream by hand, unnumbered, between
/// two pushed ones, are not read at all (a reader reads the stream only where the
/// numbers, a quiet block time or a reconnect say it must).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_malformed_pushes_are_skipped() {
    let server = RedisServer::start();
    let bp = stream_bp(&server).await;
    let mut sub = bp.subscribe().await.unwrap();
    let channel = bp.stream_key();
    server.command(&["PUBLISH", channel, "no id here"]).unwrap();
    server.command(&["PUBLISH", channel, "99999999999999-0\n1\n\u{1}garbage"]).unwrap();
    server.command(&["XADD", channel, "*", "m", "\u{1}garbage"]).unwrap();
    bp.publish(&msg(3, 1, "ok")).await.unwrap();
    assert_eq!(next_event(&mut sub, Duration::from_secs(5)).await, BackplaneEvent::Malformed);
    assert_eq!(next_event(&mut sub, Duration::from_secs(5)).await, BackplaneEvent::Malformed);
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await), Some(&msg(3, 1, "ok")));
    bp.publish(&msg(3, 2, "next")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await), Some(&msg(3, 2, "next")));
    assert_eq!(bp.stats().malformed, 2);
    assert_eq!(bp.stats().lost, 0);
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

/// The largest stream id: a stream whose last id is this accepts no `XADD … *`.
const MAX_ID: &str = "18446744073709551615-18446744073709551615";

/// Reads events until `Resumed`, returning the sequence numbers delivered before it,
/// whether a `Lost` came, and the `complete` flag.
async fn until_resumed(sub: &mut strata::backplane::Subscription) -> (Vec<u64>, bool, bool) {
    let mut seqs = Vec::new();
    let mut lost = false;
    loop {
        match next_event(sub, Duration::from_secs(5)).await {
            BackplaneEvent::Message(m) => seqs.push(m.seq),
            BackplaneEvent::Lost => lost = true,
            BackplaneEvent::Resumed { complete } => return (seqs, lost, complete),
            other => panic!("unexpected {other:?}; got {seqs:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_exhausted_ids_are_repaired_and_publishing_resumes() {
    let server = RedisServer::start();
    // Quiet for 300 ms, the reader reads the stream (which holds an entry appended by
    // hand below: never pushed).
    let bp = RedisStreamBackplane::builder(server.url())
        .op_timeout(Duration::from_secs(2))
        .block(Duration::from_millis(200))
        .read_grace(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    // Away while the stream is repaired: reconnects 1–1.5 s after its connection dies.
    let away_bp = RedisStreamBackplane::builder(server.url())
        .block(Duration::from_millis(200))
        .reconnect_backoff(Duration::from_millis(1000), Duration::from_millis(1500))
        .build()
        .await
        .unwrap();
    let mut reader = bp.subscribe().await.unwrap();
    let mut away = away_bp.subscribe().await.unwrap();
    bp.publish(&msg(7, 1, "a")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut reader, Duration::from_secs(5)).await).map(|m| m.seq), Some(1));
    assert_eq!(message_of(&next_event(&mut away, Duration::from_secs(5)).await).map(|m| m.seq), Some(1));
    let clients = clients_named(&server, &away_bp.client_name_prefix());
    server.command(&["CLIENT", "KILL", "ID", &clients[0].0]).unwrap();
    wait_for(&mut away, Duration::from_secs(5), "Disconnected", |e| *e == BackplaneEvent::Disconnected).await;
    // Published while `away` is away, then destroyed by the repair before it reads it.
    bp.publish(&msg(7, 2, "b")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut reader, Duration::from_secs(5)).await).map(|m| m.seq), Some(2));

    // The new stream's first id must not fall within the millisecond of message 1,
    // the last one `away` read (see `reset_under_subscriber`).
    tokio::time::sleep(Duration::from_millis(5)).await;
    server.command(&["XADD", bp.stream_key(), MAX_ID, "m", "garbage"]).unwrap();
    assert_eq!(next_event(&mut reader, Duration::from_secs(5)).await, BackplaneEvent::Malformed);
    let started = Instant::now();
    bp.publish(&msg(7, 3, "c")).await.expect("the publish that finds the stream exhausted repairs it");
    let repaired_in = started.elapsed();
    assert_eq!(bp.stats().repairs, 1, "{:?}", bp.stats());
    bp.publish(&msg(7, 4, "d")).await.unwrap();
    assert_eq!(bp.stats().repairs, 1, "one repair: {:?}", bp.stats());

    // The reader had read every message: it loses nothing, it reads on in the new stream
    // although the new stream's ids are below the last id it read.
    for seq in 3..=4 {
        let ev = next_event(&mut reader, Duration::from_secs(5)).await;
        assert_eq!(message_of(&ev).map(|m| m.seq), Some(seq), "{ev:?}");
    }
    // `away` missed message 2, which the repair deleted: it knows.
    let (seqs, lost, complete) = until_resumed(&mut away).await;
    assert_eq!(seqs, vec![3, 4]);
    assert!(lost && !complete, "Lost and Resumed{{complete:false}} for the reader that missed message 2");
    bp.publish(&msg(7, 5, "e")).await.unwrap();
    for sub in [&mut reader, &mut away] {
        assert_eq!(message_of(&next_event(sub, Duration::from_secs(5)).await).map(|m| m.seq), Some(5));
    }
    eprintln!("[stream] exhausted stream ids: repaired by the publish that hit them ({repaired_in:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_counter_that_cannot_count_is_restarted() {
    let server = RedisServer::start();
    let bp = stream_bp(&server).await;
    let counter = format!("{}:seq", bp.stream_key());
    let mut sub = bp.subscribe().await.unwrap();
    let mut seq = 0;
    // At INCR's maximum; not a number; beyond what Lua counts exactly; negative (its
    // entries could not be numbered).
    for value in ["9223372036854775807", "not a number", "9007199254740993", "-5"] {
        seq += 1;
        bp.publish(&msg(8, seq, "before")).await.unwrap();
        assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).map(|m| m.seq), Some(seq));
        server.command(&["SET", &counter, value]).unwrap();
        seq += 1;
        bp.publish(&msg(8, seq, "after"))
            .await
            .unwrap_or_else(|e| panic!("publish with counter {value:?}: {e}"));
        // The numbering restarted: the subscriber cannot tell what it missed. (An idle
        // read may also have seen the counter jump before the publish: a second Lost.)
        let (ev, skipped) =
            wait_for(&mut sub, Duration::from_secs(5), "the message", |e| message_of(e).is_some()).await;
        assert_eq!(message_of(&ev).map(|m| m.seq), Some(seq));
        assert!(
            !skipped.is_empty() && skipped.iter().all(|e| *e == BackplaneEvent::Lost),
            "counter {value:?}: {skipped:?}"
        );
    }
    assert_eq!(bp.stats().repairs, 4, "{:?}", bp.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_key_of_another_type_is_replaced() {
    let server = RedisServer::start();
    let bp = stream_bp(&server).await;
    let mut sub = bp.subscribe().await.unwrap();
    bp.publish(&msg(2, 1, "a")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).map(|m| m.seq), Some(1));
    // Not within the millisecond of message 1: see `reset_under_subscriber`.
    tokio::time::sleep(Duration::from_millis(5)).await;
    server.command(&["DEL", bp.stream_key()]).unwrap();
    server.command(&["SET", bp.stream_key(), "not a stream"]).unwrap();
    bp.publish(&msg(2, 2, "b")).await.expect("the publish replaces the string by a stream");
    assert_eq!(bp.stats().repairs, 1, "{:?}", bp.stats());
    // The subscriber's reads may have failed on the string meanwhile (Disconnected, then
    // Resumed); nothing numbered was lost.
    let (ev, skipped) =
        wait_for(&mut sub, Duration::from_secs(5), "message 2", |e| message_of(e).is_some()).await;
    assert_eq!(message_of(&ev).map(|m| m.seq), Some(2));
    assert!(
        skipped
            .iter()
            .all(|e| matches!(e, BackplaneEvent::Disconnected | BackplaneEvent::Resumed { complete: true })),
        "{skipped:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_reconnect_after_reading_the_maximal_id_resumes() {
    let server = RedisServer::start();
    let bp = RedisStreamBackplane::builder(server.url())
        .op_timeout(Duration::from_secs(2))
        .block(Duration::from_millis(200))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    bp.publish(&msg(9, 1, "a")).await.unwrap();
    assert!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).is_some());
    server.command(&["XADD", bp.stream_key(), MAX_ID, "m", "garbage"]).unwrap();
    assert_eq!(next_event(&mut sub, Duration::from_secs(5)).await, BackplaneEvent::Malformed);
    let clients = clients_named(&server, &bp.client_name_prefix());
    server.command(&["CLIENT", "KILL", "ID", &clients[0].0]).unwrap();
    assert_eq!(next_event(&mut sub, Duration::from_secs(5)).await, BackplaneEvent::Disconnected);
    // Nothing after the maximal id can exist: the catch-up reads nothing, and nothing
    // numbered was missed.
    let (seqs, lost, complete) = until_resumed(&mut sub).await;
    assert!(seqs.is_empty() && !lost && complete, "{seqs:?} lost {lost} complete {complete}");
    bp.publish(&msg(9, 2, "b")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).map(|m| m.seq), Some(2));
}

/// Subscribes and reads three messages; when `ahead`, also an entry whose id is far in
/// the future (as written by a server whose clock was ahead, or by hand), so that the
/// subscriber's position is above any id a re-created stream gives. Then runs `reset`,
/// publishes three more, and returns what the subscriber reported.
async fn reset_under_subscriber(reset: &[&str], ahead: bool) -> (bool, Vec<u64>) {
    let server = RedisServer::start();
    let bp = RedisStreamBackplane::builder(server.url())
        .op_timeout(Duration::from_secs(2))
        .block(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let mut sub = bp.subscribe().await.unwrap();
    for seq in 1..=3 {
        bp.publish(&msg(6, seq, "before")).await.unwrap();
        assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).map(|m| m.seq), Some(seq));
    }
    if ahead {
        server.command(&["XADD", bp.stream_key(), "99999999999999-0", "m", "from the future"]).unwrap();
        assert_eq!(next_event(&mut sub, Duration::from_secs(5)).await, BackplaneEvent::Malformed);
    }
    // A new stream's ids come from the clock: one re-created within the millisecond of
    // the last entry read starts below it, and `XREAD` skips its first entries (the
    // numbers then report Lost). Here that case is left to `ahead`.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let reset_at = Instant::now();
    server.command(reset).unwrap();
    for seq in 4..=6 {
        bp.publish(&msg(6, seq, "after")).await.unwrap();
    }
    let mut lost = false;
    let mut seqs = Vec::new();
    while seqs.last() != Some(&6) {
        match next_event(&mut sub, Duration::from_secs(5)).await {
            BackplaneEvent::Message(m) => seqs.push(m.seq),
            BackplaneEvent::Lost if seqs.is_empty() && !lost => lost = true,
            other => panic!("unexpected {other:?} after {reset:?}; got {seqs:?}"),
        }
    }
    eprintln!(
        "[stream] {reset:?} under a subscriber{}: lost {lost}, messages flow again {:?} after it",
        if ahead { " positioned ahead of the new stream" } else { "" },
        reset_at.elapsed()
    );
    (lost, seqs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_deleted_under_subscriber_reads_the_new_stream() {
    let key = "strata:{bp}";
    for ahead in [false, true] {
        let (lost, seqs) = reset_under_subscriber(&["DEL", key], ahead).await;
        assert_eq!(seqs, vec![4, 5, 6], "ahead {ahead}: everything published after the DEL is delivered");
        // The counter survives a DEL: the numbers show that nothing was missed.
        assert!(!lost, "ahead {ahead}: nothing was lost");
    }
}

/// Eviction (`allkeys-*` under `maxmemory`) takes the counter as often as the stream
/// (107 and 105 times in one 3 MB run). When it takes the counter alone, the numbering
/// resumes from the stream's last entry, so the subscriber sees no gap; with the stream
/// gone as well (the `FLUSHALL` below) it cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_counter_deleted_under_subscriber_resumes_its_numbering() {
    for ahead in [false, true] {
        let (lost, seqs) = reset_under_subscriber(&["DEL", "strata:{bp}:seq"], ahead).await;
        assert_eq!(seqs, vec![4, 5, 6], "ahead {ahead}: everything published after the DEL is delivered");
        assert!(!lost, "ahead {ahead}: nothing was lost, and none reported");
    }
}

/// A subscriber that starts, or catches up, while the counter is gone reads the
/// stream's last number in its place: no `Lost`, and the next publish follows on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_counter_reads_as_the_streams_last_number() {
    let server = RedisServer::start();
    let bp = RedisStreamBackplane::builder(server.url())
        .op_timeout(Duration::from_secs(2))
        .block(Duration::from_millis(100))
        .read_grace(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let counter = format!("{}:seq", bp.stream_key());
    let mut early = bp.subscribe().await.unwrap();
    for seq in 1..=3 {
        bp.publish(&msg(6, seq, "before")).await.unwrap();
        assert_eq!(
            message_of(&next_event(&mut early, Duration::from_secs(5)).await).map(|m| m.seq),
            Some(seq)
        );
    }
    server.command(&["DEL", &counter]).unwrap();
    // Idle reads (every 200 ms here) see the counter gone for a while.
    let mut late = bp.subscribe().await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    bp.publish(&msg(6, 4, "after")).await.unwrap();
    for sub in [&mut early, &mut late] {
        let (ev, skipped) =
            wait_for(sub, Duration::from_secs(5), "the message", |e| message_of(e).is_some()).await;
        assert_eq!(message_of(&ev).map(|m| m.seq), Some(4));
        assert!(!skipped.contains(&BackplaneEvent::Lost), "{skipped:?}");
    }
    let got = server.command(&["GET", &counter]).unwrap();
    assert_eq!(got.lines().last(), Some("4"), "the numbering went on from 3: {got:?}");
    assert_eq!(bp.stats().repairs, 0, "{:?}", bp.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_flushall_under_subscriber_is_lost_then_flows() {
    for ahead in [false, true] {
        let (lost, seqs) = reset_under_subscriber(&["FLUSHALL"], ahead).await;
        assert_eq!(
            seqs,
            vec![4, 5, 6],
            "ahead {ahead}: everything published after the FLUSHALL is delivered"
        );
        // The counter went back too: the subscriber cannot tell what it missed.
        assert!(lost, "ahead {ahead}: Lost before the new messages");
    }
}

/// A number its origin never published (burned by a refused publish) is not looked for
/// past the origin's message before it: one page, not the whole stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_replay_of_a_burned_number_stops_at_the_origins_previous_message() {
    let server = RedisServer::start();
    let bp = stream_bp(&server).await;
    for seq in 1..=2500 {
        bp.publish(&msg(5, seq, "old")).await.unwrap();
    }
    // Origin 1 published 1 and 3 between other origins' messages; 2 was burned.
    bp.publish(&msg(1, 1, "a")).await.unwrap();
    for seq in 2501..=2600 {
        bp.publish(&msg(5, seq, "x")).await.unwrap();
    }
    bp.publish(&msg(1, 3, "b")).await.unwrap();
    let pages = || {
        let info = server.command(&["INFO", "commandstats"]).expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_xrevrange:calls="))
            .and_then(|v| v.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = pages();
    assert_eq!(bp.replay(1, 2, 2).await.unwrap(), None, "never published");
    assert_eq!(pages() - before, 1, "stopped at origin 1's message 1, in the first page");
    // What is there is still found across pages.
    assert_eq!(bp.replay(5, 1, 2).await.unwrap().map(|v| v.len()), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_replay_of_the_widest_range_does_not_overflow() {
    let server = RedisServer::start();
    let bp = stream_bp(&server).await;
    bp.publish(&msg(1, 1, "a")).await.unwrap();
    assert_eq!(bp.replay(1, 0, u64::MAX).await.unwrap(), None);
    assert_eq!(bp.replay(1, 1, u64::MAX).await.unwrap(), None);
    assert_eq!(bp.replay(1, u64::MAX, u64::MAX).await.unwrap(), None);
}

/// `share_connection`: the backplane publishes through the tier's connection, so an
/// instance holds two connections (tier, subscription) instead of three; a tier on
/// another server is refused at build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backplane_sharing_the_tiers_connection_opens_one_less() {
    let server = RedisServer::start();
    let count = || server.command(&["CLIENT", "LIST"]).expect("CLIENT LIST").lines().count();
    let idle = count();
    let tier = strata_redis::RedisTier::builder(server.url()).prefix("share").build().await.expect("tier");
    let bp = RedisStreamBackplane::builder(server.url())
        .prefix("share")
        .share_connection(&tier)
        .build()
        .await
        .expect("backplane");
    let mut sub = bp.subscribe().await.expect("subscribe");
    bp.publish(&msg(1, 1, "k")).await.expect("publish");
    wait_for(&mut sub, Duration::from_secs(5), "the message", |ev| message_of(ev).is_some()).await;
    strata::tier::Tier::lookup(&tier, "ns", "k", None).await.expect("the tier still works");
    assert_eq!(count() - idle, 2, "tier + subscription, no publisher of its own");
    let other = RedisServer::start();
    let err = RedisStreamBackplane::builder(other.url())
        .prefix("share")
        .share_connection(&tier)
        .build()
        .await
        .expect_err("another server");
    assert!(err.to_string().contains("share_connection"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_batch_is_one_script_call_delivered_in_order() {
    let server = RedisServer::start();
    let bp = stream_bp(&server).await;
    let mut sub = bp.subscribe().await.unwrap();
    bp.publish(&msg(2, 1, "a")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await).map(|m| m.seq), Some(1));
    let calls = |server: &RedisServer| {
        let stats = server.command(&["INFO", "commandstats"]).expect("INFO");
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = calls(&server);
    let batch: Vec<Message> = (2..=9).map(|seq| msg(2, seq, &format!("k{seq}"))).collect();
    bp.publish_batch(&batch).await.expect("batch");
    assert_eq!(calls(&server) - before, 1, "eight messages, one script call");
    for seq in 2..=9 {
        let ev = next_event(&mut sub, Duration::from_secs(5)).await;
        assert_eq!(message_of(&ev), Some(&msg(2, seq, &format!("k{seq}"))));
    }
    assert_eq!(bp.replay(2, 1, 9).await.unwrap().map(|v| v.len()), Some(9));
    // A batch into a key that is not a stream any more repairs it once and appends all.
    tokio::time::sleep(Duration::from_millis(5)).await;
    server.command(&["DEL", bp.stream_key()]).unwrap();
    server.command(&["SET", bp.stream_key(), "not a stream"]).unwrap();
    let batch: Vec<Message> = (10..=12).map(|seq| msg(2, seq, "b")).collect();
    bp.publish_batch(&batch).await.expect("the batch replaces the string by a stream");
    assert_eq!(bp.stats().repairs, 1, "{:?}", bp.stats());
    assert_eq!(bp.replay(2, 10, 12).await.unwrap().map(|v| v.len()), Some(3));
}

/// A stream on a server that may evict any key is named at build time; `Refuse` makes
/// that an error that says where to put the backplane; `volatile-*` (no backplane key
/// has a TTL) and `noeviction` pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_build_checks_the_eviction_policy() {
    use strata::error::ErrorKind;
    use strata_redis::EvictionCheck;
    let build = |url: String, check| async move {
        RedisStreamBackplane::builder(url).prefix("ev").eviction_check(check).build().await
    };
    let server =
        RedisServer::builder().arg("maxmemory", "3mb").arg("maxmemory-policy", "allkeys-lru").start();
    let err = build(server.url(), EvictionCheck::Refuse).await.expect_err("allkeys-lru refused");
    let msg = err.to_string();
    assert!(msg.contains("allkeys-lru") && msg.contains("put the backplane on a server"), "{msg}");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    build(server.url(), EvictionCheck::Warn).await.expect("warns, builds");
    build(server.url(), EvictionCheck::Skip).await.expect("does not look");
    for policy in ["volatile-lru", "noeviction"] {
        server.command(&["CONFIG", "SET", "maxmemory-policy", policy]).unwrap();
        build(server.url(), EvictionCheck::Refuse).await.expect(policy);
    }
}
