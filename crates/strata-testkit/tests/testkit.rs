//! Integration tests of strata-testkit against real `redis-server` and
//! `postgres` binaries.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use strata_testkit::{Direction, FaultProxy, PostgresServer, RedisServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

// ---------------------------------------------------------------- redis

#[test]
fn redis_starts_and_answers() {
    let redis = RedisServer::start();
    assert_ne!(redis.port(), 6379);
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/", redis.port()));
    assert_eq!(redis.addr().port(), redis.port());
    redis.ping(Duration::from_secs(2)).unwrap();
    assert_eq!(redis.command(&["SET", "k", "hello"]).unwrap(), "+OK\r\n");
    assert_eq!(redis.command(&["GET", "k"]).unwrap(), "$5\r\nhello\r\n");
    assert_eq!(redis.command(&["DBSIZE"]).unwrap(), ":1\r\n");
    assert_eq!(redis.command(&["GET", "missing"]).unwrap(), "$-1\r\n");
    let err = redis.command(&["NOSUCHCOMMAND"]).unwrap_err();
    assert!(err.to_string().contains("unknown command"), "{err}");
    assert!(redis.log().contains("Ready to accept connections"));
}

#[test]
fn redis_builder_args_and_config_get() {
    let redis = RedisServer::builder()
        .arg("client-output-buffer-limit", "pubsub 1kb 1kb 0")
        .arg("maxmemory", "12345678")
        .start();
    let reply = redis.command(&["CONFIG", "GET", "client-output-buffer-limit"]).unwrap();
    assert!(reply.contains("pubsub 1024 1024 0"), "{reply}");
    let reply = redis.command(&["CONFIG", "GET", "maxmemory"]).unwrap();
    assert!(reply.starts_with("*2\r\n"), "{reply}");
    assert!(reply.contains("12345678"), "{reply}");
    // persistence is off
    let reply = redis.command(&["CONFIG", "GET", "save"]).unwrap();
    assert!(reply.ends_with("$0\r\n\r\n"), "{reply}");
    assert_eq!(redis.command(&["CONFIG", "SET", "maxmemory", "0"]).unwrap(), "+OK\r\n");
    let list = redis.command(&["CLIENT", "LIST"]).unwrap();
    assert!(list.contains("cmd=client"), "{list}");
}

#[test]
fn redis_kill_and_restart_on_same_port() {
    let mut redis = RedisServer::start();
    let port = redis.port();
    let pid = redis.pid().unwrap();
    redis.command(&["SET", "k", "v"]).unwrap();
    assert!(redis.is_running());

    redis.kill();
    assert!(!redis.is_running());
    assert_eq!(redis.pid(), None);
    assert!(redis.ping(Duration::from_millis(300)).is_err());
    assert!(redis.pause().is_err());

    redis.restart();
    assert!(redis.is_running());
    assert_eq!(redis.port(), port);
    assert_ne!(redis.pid(), Some(pid));
    redis.ping(Duration::from_secs(2)).unwrap();
    // no persistence: the data set is empty after a restart
    assert_eq!(redis.command(&["DBSIZE"]).unwrap(), ":0\r\n");

    // restart while running kills first
    redis.restart();
    redis.ping(Duration::from_secs(2)).unwrap();
}

#[test]
fn redis_pause_and_resume() {
    let mut redis = RedisServer::start();
    redis.pause().unwrap();
    assert!(redis.is_running(), "a stopped process is still running");
    let started = Instant::now();
    let err = redis.ping(Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    redis.resume().unwrap();
    redis.ping(Duration::from_secs(2)).unwrap();
}

#[test]
fn redis_missing_binary_is_a_loud_error() {
    // Only the error path of the env override is tested here (setting the
    // variable would race with the other tests): point the builder at a
    // missing binary through a child process instead.
    if std::env::var_os("STRATA_TESTKIT_CHILD").is_some() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", "redis_missing_binary_child", "--nocapture"])
        .env("STRATA_REDIS_SERVER", "/nonexistent/redis-server")
        .env("STRATA_TESTKIT_CHILD", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
}

#[test]
fn redis_missing_binary_child() {
    if std::env::var_os("STRATA_TESTKIT_CHILD").is_none() {
        return;
    }
    let err = RedisServer::builder().try_start().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(
        err.to_string()
            .contains("redis-server not found: install it (Debian: apt-get install redis-server) or set STRATA_REDIS_SERVER"),
        "{err}"
    );
}

// ---------------------------------------------------------------- postgres

#[test]
fn postgres_starts_psql_and_create_database() {
    let mut pg = PostgresServer::start();
    assert_ne!(pg.port(), 5432);
    assert_eq!(pg.url(), format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port()));
    assert_eq!(pg.psql("postgres", "select 1").unwrap(), "1\n");

    let url = pg.create_database("strata_test").unwrap();
    assert_eq!(url, format!("postgres://postgres@127.0.0.1:{}/strata_test", pg.port()));
    pg.psql("strata_test", "create table t (id int primary key); insert into t values (7)").unwrap();
    assert_eq!(pg.psql("strata_test", "select id from t").unwrap(), "7\n");
    assert!(pg.create_database("strata_test").is_err(), "already exists");

    // pause: connections hang; resume: they work again
    pg.ping(Duration::from_secs(2)).unwrap();
    pg.pause().unwrap();
    assert!(pg.is_running());
    assert!(pg.ping(Duration::from_millis(300)).is_err());
    pg.resume().unwrap();
    pg.ping(Duration::from_secs(5)).unwrap();
    assert_eq!(pg.psql("postgres", "select 1").unwrap(), "1\n");

    // kill + restart on the same port keeps committed data
    let port = pg.port();
    pg.kill();
    assert!(!pg.is_running());
    assert!(pg.psql("postgres", "select 1").is_err());
    pg.restart();
    assert_eq!(pg.port(), port);
    assert_eq!(pg.psql("strata_test", "select id from t").unwrap(), "7\n");
    assert!(pg.log().contains("database system is ready to accept connections"));
}

// ---------------------------------------------------------------- proxy

async fn ping_via(stream: &mut TcpStream, within: Duration) -> std::io::Result<()> {
    stream.write_all(PING).await?;
    let mut buf = [0u8; 7];
    timeout(within, stream.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply"))??;
    assert_eq!(&buf, b"+PONG\r\n");
    Ok(())
}

async fn connect(addr: SocketAddr) -> TcpStream {
    timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect to the proxy")
}

/// A connection the proxy is expected to kill at once: either the connect
/// itself already sees the reset, or the first read does.
async fn assert_dies_at_once(addr: SocketAddr) {
    let connected =
        timeout(Duration::from_secs(5), TcpStream::connect(addr)).await.expect("connect timed out");
    let Ok(mut stream) = connected else { return };
    let mut byte = [0u8; 1];
    let read =
        timeout(Duration::from_secs(5), stream.read(&mut byte)).await.expect("the connection was not closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_forwards_and_injects_faults() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.addr()).await.unwrap();
    assert_eq!(proxy.target(), redis.addr());
    assert_eq!(proxy.addr().port(), proxy.port());
    let ok = Duration::from_secs(5);

    // plain forwarding
    let mut conn = connect(proxy.addr()).await;
    ping_via(&mut conn, ok).await.unwrap();
    ping_via(&mut conn, ok).await.unwrap();
    let stats = proxy.stats();
    assert_eq!(stats.connections_accepted, 1);
    assert_eq!(stats.active_connections, 1);
    assert_eq!(stats.bytes_client_to_server, 2 * PING.len() as u64);
    assert_eq!(stats.bytes_server_to_client, 14);

    // blackhole: no answer within 300 ms, on the old and on a new connection
    proxy.blackhole(true);
    let err = ping_via(&mut conn, Duration::from_millis(300)).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    let mut conn2 = connect(proxy.addr()).await;
    assert!(ping_via(&mut conn2, Duration::from_millis(300)).await.is_err());
    // lifting it lets held bytes flow: both the pending replies arrive
    proxy.blackhole(false);
    let mut buf = [0u8; 7];
    timeout(ok, conn.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"+PONG\r\n");
    timeout(ok, conn2.read_exact(&mut buf)).await.unwrap().unwrap();
    ping_via(&mut conn, ok).await.unwrap();

    // one-way cut of replies
    proxy.cut(Direction::ServerToClient, true);
    assert!(ping_via(&mut conn, Duration::from_millis(300)).await.is_err());
    proxy.clear();
    timeout(ok, conn.read_exact(&mut buf)).await.unwrap().unwrap();

    // reset closes current connections abruptly
    proxy.reset_all();
    let mut rest = Vec::new();
    let read = timeout(ok, conn.read_to_end(&mut rest)).await.unwrap();
    match read {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e:?}"),
        Ok(n) => assert_eq!(n, 0, "no more data after a reset"),
    }
    // new connections still work
    let mut conn3 = connect(proxy.addr()).await;
    ping_via(&mut conn3, ok).await.unwrap();

    // refuse: new connections die at once, existing ones keep working
    proxy.refuse(true);
    assert_dies_at_once(proxy.addr()).await;
    ping_via(&mut conn3, ok).await.unwrap();
    proxy.refuse(false);
    assert!(proxy.stats().connections_refused >= 1);

    // latency: a request takes at least the configured delay (lower bound only)
    proxy.set_latency(Duration::from_millis(100), Duration::from_millis(20));
    let started = Instant::now();
    ping_via(&mut conn3, ok).await.unwrap();
    // the delay applies to the request and to the reply
    assert!(started.elapsed() >= Duration::from_millis(200), "{:?}", started.elapsed());
    proxy.set_latency(Duration::ZERO, Duration::ZERO);
    assert_eq!(proxy.faults(), strata_testkit::Faults::default());

    // the server going away resets clients; kill the proxy: connections die
    let stats = proxy.stats();
    assert!(stats.connections_accepted >= 4);
    drop(proxy);
    let mut rest = Vec::new();
    let read = timeout(ok, conn3.read_to_end(&mut rest)).await.unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_to_dead_server_resets_client() {
    let mut redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.addr()).await.unwrap();
    let mut conn = connect(proxy.addr()).await;
    ping_via(&mut conn, Duration::from_secs(5)).await.unwrap();

    // the server dies: the proxied connection ends too
    redis.kill();
    let mut rest = Vec::new();
    let read = timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await.unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // new connections are closed while it is down, and work after a restart
    assert_dies_at_once(proxy.addr()).await;
    redis.restart();
    let mut conn = connect(proxy.addr()).await;
    ping_via(&mut conn, Duration::from_secs(5)).await.unwrap();
}

// ---------------------------------------------------------------- history and checker

mod checker {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use strata_testkit::{
        CacheSnapshot, CheckConfig, Event, History, Op, Quiescence, Recorder, Report, Tier, check,
        monotonic_ns,
    };

    const MS: u64 = 1_000_000;
    /// Histories start here (a monotonic clock is rarely near zero).
    const T0: u64 = 1_000_000 * MS;

    fn at(ms: u64) -> u64 {
        T0 + ms * MS
    }

    fn read(process: &str, key: u64, from_ms: u64, to_ms: u64, version: u64, tier: Tier) -> Event {
        Event::read(process, key, at(from_ms), at(to_ms), version, tier)
    }

    fn write(key: u64, from_ms: u64, to_ms: u64, version: Option<u64>, ok: bool) -> Event {
        Event::write("writer", key, at(from_ms), at(to_ms), version, ok)
    }

    fn history(events: Vec<Event>) -> History {
        History { events, malformed: 0 }
    }

    fn config(bound_ms: u64, linearizable: bool) -> CheckConfig {
        CheckConfig {
            level: if linearizable { "strong" } else { "invalidated" }.into(),
            bound: Duration::from_millis(bound_ms),
            linearizable,
            initial: BTreeMap::new(),
            versions_step_by_one: false,
        }
    }

    /// The database at `versions`, with `l1` and `l2` holding the same.
    fn settled(versions: &[(u64, u64)]) -> Quiescence {
        let entries: Vec<(u64, Option<u64>)> = versions.iter().map(|&(k, v)| (k, Some(v))).collect();
        Quiescence {
            database: versions.iter().copied().collect(),
            caches: vec![
                CacheSnapshot { source: "reader-1 l1".into(), entries: entries.clone() },
                CacheSnapshot { source: "l2".into(), entries },
            ],
        }
    }

    fn run(events: Vec<Event>, end: &Quiescence, bound_ms: u64, linearizable: bool) -> Report {
        check(&config(bound_ms, linearizable), &history(events), end)
    }

    /// Seeds v1 of key 1 and 2, then writes v2 of key 1 (completed at 100 ms).
    fn base() -> Vec<Event> {
        vec![write(1, 0, 1, Some(1), true), write(2, 0, 1, Some(1), true), write(1, 90, 100, Some(2), true)]
    }

    #[test]
    fn clean_history_passes() {
        let mut events = base();
        events.extend([
            read("reader-1", 1, 10, 11, 1, Tier::Db),
            read("reader-2", 1, 20, 21, 1, Tier::L2),
            // Concurrent with the write: either version is fine.
            read("reader-1", 1, 95, 96, 1, Tier::L1),
            read("reader-2", 1, 97, 98, 2, Tier::Db),
            read("reader-1", 1, 150, 151, 2, Tier::L2),
            read("reader-2", 2, 150, 151, 1, Tier::L1),
            Event::fault("nemesis", at(30), at(60), "redis-pause"),
        ]);
        let r = run(events, &settled(&[(1, 2), (2, 1)]), 0, true);
        assert!(r.passed, "{r:#?}");
        assert_eq!((r.reads, r.writes, r.indeterminate_writes), (6, 3, 0));
        assert_eq!(
            (r.stale_any, r.stale_beyond_bound, r.permanent_inconsistencies, r.lost_writes),
            (0, 0, 0, 0)
        );
        assert_eq!(r.linearizability_violations, Some(0));
        assert_eq!(r.reads_by_tier.get("l1"), Some(&2));
        assert_eq!(r.reads_by_tier.get("db"), Some(&2));
        assert_eq!(r.faults.len(), 1);
        assert!(r.faults[0].starts_with("redis-pause"), "{:?}", r.faults);
        assert_eq!((r.staleness_max_ms, r.consistent_within_1ms), (0.0, 1.0));
        assert!(r.examples.is_empty(), "{:?}", r.examples);
        // The report serialises with the documented field names.
        let json = serde_json::to_value(&r).unwrap();
        for field in [
            "level",
            "faults",
            "reads",
            "writes",
            "stale_beyond_bound",
            "stale_any",
            "staleness_p50_ms",
            "staleness_p99_ms",
            "staleness_max_ms",
            "consistent_within_1ms",
            "consistent_within_1s",
            "permanent_inconsistencies",
            "linearizability_violations",
        ] {
            assert!(json.get(field).is_some(), "{field} missing from {json}");
        }
        // Not asked for: not reported.
        let r = run(base(), &settled(&[(1, 2), (2, 1)]), 0, false);
        assert_eq!(r.linearizability_violations, None);
        assert_eq!(serde_json::to_value(&r).unwrap()["linearizability_violations"], serde_json::Value::Null);
    }

    #[test]
    fn stale_read_within_the_bound_counts_only_at_zero_slack() {
        let mut events = base();
        // 5 ms after v2 completed, v1 is still read: stale, but within a 1 s bound.
        events.push(read("reader-1", 1, 105, 106, 1, Tier::L1));
        let r = run(events, &settled(&[(1, 2), (2, 1)]), 1000, false);
        assert_eq!((r.stale_any, r.stale_beyond_bound), (1, 0), "{r:#?}");
        assert!(r.passed);
        // Its window: 5 ms after the write returned.
        assert_eq!((r.staleness_max_ms, r.staleness_p99_ms), (5.0, 5.0));
        assert_eq!(r.staleness_p50_ms, 0.0, "two of three writes were never read stale");
        assert!((r.consistent_within_1ms - 2.0 / 3.0).abs() < 1e-9, "{r:#?}");
        assert_eq!((r.consistent_within_10ms, r.consistent_within_1s), (1.0, 1.0));
        assert!(r.examples.iter().any(|e| e.starts_with("stale read:")), "{:?}", r.examples);
    }

    #[test]
    fn stale_read_beyond_the_bound_fails() {
        let mut events = base();
        // 1.5 s after v2 completed, v1 is still read: beyond a 1 s bound.
        events.push(read("reader-2", 1, 1600, 1601, 1, Tier::L1));
        let r = run(events.clone(), &settled(&[(1, 2), (2, 1)]), 1000, false);
        assert_eq!((r.stale_any, r.stale_beyond_bound), (1, 1), "{r:#?}");
        assert!(!r.passed);
        assert_eq!(r.staleness_max_ms, 1500.0);
        assert!(r.consistent_within_1s < 1.0);
        assert!(
            r.examples.iter().any(|e| e.starts_with("stale beyond bound:") && e.contains("reader-2")),
            "{:?}",
            r.examples
        );
        // With a 2 s bound the same read is within it.
        let r = run(events, &settled(&[(1, 2), (2, 1)]), 2000, false);
        assert_eq!((r.stale_any, r.stale_beyond_bound), (1, 0));
    }

    #[test]
    fn lost_invalidation_is_a_permanent_inconsistency() {
        let mut end = settled(&[(1, 2), (2, 1)]);
        // reader-2 never heard of v2: its L1 still holds v1 at quiescence.
        end.caches
            .push(CacheSnapshot { source: "reader-2 l1".into(), entries: vec![(1, Some(1)), (2, Some(1))] });
        let r = run(base(), &end, 1000, false);
        assert_eq!(r.permanent_inconsistencies, 1, "{r:#?}");
        assert!(!r.passed);
        assert!(r.examples.iter().any(|e| e.contains("reader-2 l1 holds key 1 at v1")), "{:?}", r.examples);
        // A cached "not found" for a row that exists is one too; an uncached key is not.
        let mut end = settled(&[(1, 2), (2, 1)]);
        end.caches.push(CacheSnapshot { source: "l2".into(), entries: vec![(2, None)] });
        assert_eq!(run(base(), &end, 1000, false).permanent_inconsistencies, 1);
        // A completed write the database does not have is a lost write.
        let r = run(base(), &settled(&[(1, 1), (2, 1)]), 1000, false);
        assert_eq!((r.lost_writes, r.permanent_inconsistencies), (1, 0));
        assert!(!r.passed);
    }

    #[test]
    fn new_old_inversion_is_not_linearizable() {
        // v2 is being written from 100 ms to 300 ms. reader-1 sees it at 150 ms; reader-2,
        // invoked after reader-1 returned, still sees v1.
        let events = vec![
            write(1, 0, 1, Some(1), true),
            write(1, 100, 300, Some(2), true),
            read("reader-1", 1, 150, 160, 2, Tier::Db),
            read("reader-2", 1, 200, 210, 1, Tier::L1),
        ];
        let r = run(events.clone(), &settled(&[(1, 2)]), 0, true);
        assert_eq!(r.linearizability_violations, Some(1), "{r:#?}");
        assert_eq!((r.stale_any, r.stale_beyond_bound), (0, 0), "no write had completed");
        assert!(!r.passed);
        assert!(
            r.examples.iter().any(|e| e.starts_with("not linearizable:")
                && e.contains("reader-2 read key 1 v1")
                && e.contains("reader-1 read v2 (from db, a committed write)")),
            "{:?}",
            r.examples
        );
        // Overlapping reads may be in either order.
        let mut overlapping = events.clone();
        overlapping[3] = read("reader-2", 1, 155, 210, 1, Tier::L1);
        assert_eq!(run(overlapping, &settled(&[(1, 2)]), 0, true).linearizability_violations, Some(0));
        // A read of a version nobody had started to write yet is from the future.
        let mut future = events;
        future.truncate(2);
        future.push(read("reader-1", 1, 50, 60, 2, Tier::L2));
        let r = run(future, &settled(&[(1, 2)]), 0, true);
        assert_eq!(r.linearizability_violations, Some(1), "{r:#?}");
        assert!(
            r.examples.iter().any(|e| e.contains("no write invoked before it returned produced v2")),
            "{:?}",
            r.examples
        );
        // Stale reads violate it too.
        let mut stale = base();
        stale.push(read("reader-1", 1, 105, 106, 1, Tier::L1));
        assert_eq!(run(stale, &settled(&[(1, 2), (2, 1)]), 0, true).linearizability_violations, Some(1));
    }

    #[test]
    fn indeterminate_write_may_be_seen_or_not() {
        let events = vec![
            write(1, 0, 1, Some(1), true),
            write(2, 0, 1, Some(1), true),
            // Both fail: v2 may or may not have committed.
            write(1, 100, 200, Some(2), false),
            write(2, 100, 200, None, false),
            // Key 1: one reader sees it, a later one (on key 1 too) as well; key 2: never seen.
            read("reader-1", 1, 300, 301, 2, Tier::Db),
            read("reader-2", 1, 400, 401, 2, Tier::L2),
            read("reader-1", 2, 300, 301, 1, Tier::L1),
            read("reader-2", 2, 2500, 2501, 1, Tier::L1),
        ];
        let r = run(events.clone(), &settled(&[(1, 2), (2, 1)]), 0, true);
        assert!(r.passed, "{r:#?}");
        assert_eq!((r.writes, r.indeterminate_writes), (2, 2));
        assert_eq!((r.stale_any, r.stale_beyond_bound, r.lost_writes), (0, 0, 0));
        assert_eq!(r.linearizability_violations, Some(0));
        // Key 2's write of unknown version did commit after all (the database says v2):
        // reading it is fine too.
        let mut seen = events;
        seen.push(read("reader-1", 2, 2600, 2601, 2, Tier::Db));
        let r = run(seen, &settled(&[(1, 2), (2, 2)]), 0, true);
        assert!(r.passed, "{r:#?}");
        // But not an unknown-version write's version beyond the next known write's.
        let events = vec![
            write(1, 0, 1, Some(1), true),
            write(1, 100, 200, None, false),
            read("reader-1", 1, 250, 260, 5, Tier::Db),
            write(1, 300, 400, Some(3), true),
        ];
        assert_eq!(run(events, &settled(&[(1, 3)]), 0, true).linearizability_violations, Some(1));
    }

    /// Gap (a): a version nobody wrote is wrong at every level, even while a newer
    /// write is in flight (before, only the Strong level looked, and only for versions
    /// above every write begun).
    #[test]
    fn a_read_of_an_unwritten_version_is_flagged_while_a_newer_write_is_in_flight() {
        let events = vec![
            write(1, 0, 1, Some(1), true),
            // v3 is being written from 100 ms to 300 ms; v2 was never written.
            write(1, 100, 300, Some(3), true),
            read("reader-1", 1, 150, 160, 2, Tier::L2),
            // v3 itself may be seen while in flight.
            read("reader-2", 1, 170, 180, 3, Tier::Db),
        ];
        for linearizable in [false, true] {
            let r = run(events.clone(), &settled(&[(1, 3)]), 1000, linearizable);
            assert_eq!(r.unwritten_reads, 1, "{r:#?}");
            assert!(!r.passed);
            assert!(
                r.examples
                    .iter()
                    .any(|e| e.starts_with("unwritten version:") && e.contains("reader-1 read key 1 v2")),
                "{:?}",
                r.examples
            );
            if linearizable {
                assert_eq!(r.linearizability_violations, Some(1));
            }
        }
        // A write of unknown version in between may have produced v2.
        let mut unknown = events;
        unknown.insert(1, write(1, 50, 60, None, false));
        let r = run(unknown, &settled(&[(1, 3)]), 1000, true);
        assert_eq!((r.unwritten_reads, r.linearizability_violations), (0, Some(0)), "{r:#?}");
    }

    /// Gap (b): intervals are closed, so a read that returns at the very nanosecond a
    /// write is invoked is concurrent with it and may return its version.
    #[test]
    fn a_read_returning_at_a_writes_invocation_is_concurrent_with_it() {
        let events = vec![
            write(1, 0, 1, Some(1), true),
            write(1, 100, 200, Some(2), true),
            read("reader-1", 1, 90, 100, 2, Tier::Db),
        ];
        let r = run(events.clone(), &settled(&[(1, 2)]), 0, true);
        assert_eq!((r.unwritten_reads, r.linearizability_violations), (0, Some(0)), "{r:#?}");
        assert!(r.passed, "{r:#?}");
        // One nanosecond earlier it would be from the future.
        let mut early = events;
        early[2] = Event::read("reader-1", 1, at(90), at(100) - 1, 2, Tier::Db);
        let r = run(early, &settled(&[(1, 2)]), 0, true);
        assert_eq!((r.unwritten_reads, r.linearizability_violations), (1, Some(1)), "{r:#?}");
    }

    /// A committed write whose invalidation was buffered is judged from its commit, not
    /// left indeterminate; its retry is counted.
    #[test]
    fn writes_are_judged_from_their_commit() {
        let committed = |key, from_ms, commit_ms, to_ms, version| {
            Event::write("writer", key, at(from_ms), at(to_ms), Some(version), true)
                .committed_at(at(commit_ms))
                .with_detail("invalidation Buffered: l2 delete timed out")
        };
        let events = vec![
            write(1, 0, 1, Some(1), true),
            // COMMIT acknowledged at 100 ms; the invalidation failed and returned at 300 ms.
            committed(1, 90, 100, 300, 2),
            Event::invalidation_retried("writer", 1, Some(2), at(100), at(2600)),
            // Before the commit: fine. After it: stale; more than 1 s after it: beyond.
            read("reader-1", 1, 95, 96, 1, Tier::L1),
            read("reader-1", 1, 150, 151, 1, Tier::L1),
            read("reader-2", 1, 1150, 1151, 1, Tier::L2),
        ];
        let r = run(events, &settled(&[(1, 2)]), 1000, false);
        assert_eq!((r.writes, r.indeterminate_writes), (2, 0), "{r:#?}");
        assert_eq!((r.stale_any, r.stale_beyond_bound), (2, 1), "{r:#?}");
        assert_eq!(r.stale_read_max_ms, 1050.0);
        assert_eq!(r.staleness_max_ms, 1050.0, "the window runs from the commit");
        assert_eq!((r.buffered_invalidations, r.buffered_invalidation_max_ms), (1, 2500.0));
        assert!(!r.passed);
        assert!(
            r.examples
                .iter()
                .any(|e| e.starts_with("stale beyond bound:") && e.contains("committed at +0.100s")),
            "{:?}",
            r.examples
        );
    }

    /// With versions that step by one, what became of a write whose COMMIT outcome was
    /// unknown follows from the other writes and the database.
    #[test]
    fn indeterminate_writes_are_resolved_from_the_versions() {
        let events = vec![
            write(1, 0, 1, Some(1), true),
            // Unknown, but v3 followed and no other write produced v2: committed.
            write(1, 100, 200, Some(2), false),
            write(1, 300, 400, Some(3), true),
            // Unknown, and a later write produced v4 too: it did not commit.
            write(1, 500, 600, Some(4), false),
            write(1, 700, 800, Some(4), true),
            // Unknown and last; the database ends at v4: it did not commit.
            write(1, 900, 1000, Some(5), false),
            // v2 took effect by 200 ms at the latest.
            read("reader-1", 1, 1250, 1251, 1, Tier::L1),
        ];
        let mut cfg = config(1000, false);
        let r = check(&cfg, &history(events.clone()), &settled(&[(1, 4)]));
        assert_eq!((r.writes, r.indeterminate_writes, r.resolved_writes), (3, 3, 0), "{r:#?}");
        assert_eq!(r.stale_beyond_bound, 0, "without resolution v2 is not judged");
        cfg.versions_step_by_one = true;
        let r = check(&cfg, &history(events), &settled(&[(1, 4)]));
        assert_eq!((r.writes, r.indeterminate_writes, r.resolved_writes), (4, 0, 3), "{r:#?}");
        assert_eq!((r.rolled_back_writes, r.stale_beyond_bound), (2, 1), "{r:#?}");
    }

    #[test]
    fn rolled_back_writes_are_counted_and_excuse_nothing() {
        let rolled_back = |key, invoke, ret| Event::write_rolled_back("writer", key, invoke, ret);
        let events = vec![
            write(1, 0, 1, Some(1), true),
            rolled_back(1, 100, 200),
            read("reader-1", 1, 250, 260, 1, Tier::L1),
            write(1, 300, 400, Some(2), true),
            read("reader-1", 1, 450, 460, 2, Tier::Db),
        ];
        let r = run(events, &settled(&[(1, 2)]), 0, true);
        assert!(r.passed, "{r:#?}");
        assert_eq!((r.writes, r.indeterminate_writes, r.rolled_back_writes), (2, 0, 1));
        // A read of v2 while only v1 and a failed write had begun, then v3 written: an
        // indeterminate write of unknown version may have been v2, a rolled-back write
        // was nothing, so the read is from the future.
        let mut early = vec![
            write(1, 0, 1, Some(1), true),
            rolled_back(1, 100, 200),
            read("reader-1", 1, 250, 260, 2, Tier::Db),
            write(1, 300, 400, Some(3), true),
        ];
        let r = run(early.clone(), &settled(&[(1, 3)]), 0, true);
        assert_eq!(r.linearizability_violations, Some(1), "{r:#?}");
        early[1] = write(1, 100, 200, None, false);
        assert_eq!(run(early, &settled(&[(1, 3)]), 0, true).linearizability_violations, Some(0));
    }

    #[test]
    fn initial_versions_count_as_written_but_not_as_writes() {
        let mut cfg = config(1000, true);
        cfg.initial = [(1, 5), (2, 5)].into();
        let events = vec![
            read("reader-1", 1, 10, 11, 5, Tier::Db),
            write(1, 100, 110, Some(6), true),
            read("reader-1", 1, 120, 121, 6, Tier::L2),
            // Older than the initial version: stale (beyond any bound: it was there first).
            read("reader-2", 2, 3000, 3001, 4, Tier::L1),
            // Newer than anything written: from the future.
            read("reader-1", 2, 3100, 3101, 7, Tier::L1),
        ];
        let r = check(&cfg, &history(events), &settled(&[(1, 6), (2, 5)]));
        assert_eq!((r.reads, r.writes), (4, 1), "{r:#?}");
        assert_eq!((r.stale_any, r.stale_beyond_bound), (1, 1));
        assert_eq!(r.linearizability_violations, Some(2));
        assert_eq!(r.lost_writes, 0);
    }

    #[test]
    fn malformed_history_lines_are_counted_and_skipped() {
        let good = serde_json::to_string(&Event::read("reader-1", 7, 10, 20, 3, Tier::L1)).unwrap();
        let mut input = Vec::new();
        input.extend_from_slice(good.as_bytes());
        input.extend_from_slice(b"\n\n   \nnot json\n{\"process\":\"x\",\"key\":1}\n");
        input.extend_from_slice(b"{\"process\":\"x\",\"key\":1,\"op\":\"teleport\",\"invoke_ns\":1,\"return_ns\":2,\"ok\":true}\n");
        input.extend_from_slice(&[0xff, 0xfe, b'\n']);
        // Optional fields may be missing; the last line need not end with a newline.
        input.extend_from_slice(b"{\"process\":\"w\",\"key\":7,\"op\":\"write\",\"invoke_ns\":1,\"return_ns\":5,\"ok\":true,\"version\":3}");
        let h = History::parse(input.as_slice()).unwrap();
        assert_eq!(h.malformed, 4, "{h:#?}");
        assert_eq!(h.events.len(), 2);
        assert_eq!(h.events[0].tier, Some(Tier::L1));
        assert_eq!((h.events[1].op, h.events[1].tier, h.events[1].detail.as_str()), (Op::Write, None, ""));
        let r =
            check(&config(0, true), &h, &Quiescence { database: [(7, 3)].into(), ..Quiescence::default() });
        assert_eq!((r.malformed_lines, r.reads, r.writes), (4, 1, 1));
        assert!(r.passed, "{r:#?}");
        // A truncated line (a process killed mid-write) in a file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.jsonl");
        std::fs::write(&path, format!("{good}\n{}", &good[..good.len() / 2])).unwrap();
        let h = History::read(&path).unwrap();
        assert_eq!((h.events.len(), h.malformed), (1, 1));
        assert!(History::read(dir.path().join("missing")).is_err());
    }

    #[test]
    fn recorder_writes_lines_from_many_threads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.jsonl");
        let recorder = std::sync::Arc::new(Recorder::create(&path).unwrap());
        let start = monotonic_ns();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let recorder = recorder.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let t0 = monotonic_ns();
                        let t1 = monotonic_ns();
                        assert!(t1 >= t0);
                        let ev = Event::read(&format!("reader-{t}"), i, t0, t1, i, Tier::L2)
                            .with_detail("a \"quoted\"\nline");
                        recorder.record(&ev).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        recorder.flush().unwrap();
        let mut h = History::read(&path).unwrap();
        assert_eq!((h.events.len(), h.malformed), (2000, 0));
        assert!(h.events.iter().all(|e| e.invoke_ns >= start && e.detail == "a \"quoted\"\nline"));
        // Merge, sort and write back out.
        let other =
            History { events: vec![Event::fault("nemesis", start, start + 1, "db-down")], malformed: 2 };
        h.merge(other);
        h.sort();
        assert_eq!((h.events[0].op, h.malformed), (Op::Fault, 2));
        let mut out = Vec::new();
        h.write_to(&mut out).unwrap();
        let again = History::parse(out.as_slice()).unwrap();
        assert_eq!(again.events, h.events);
    }
}
