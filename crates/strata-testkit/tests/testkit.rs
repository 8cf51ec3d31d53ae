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
