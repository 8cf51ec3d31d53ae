//! Test support for strata against real servers.
//!
//! strata's integration tests, benchmarks and torture runs (`strata check`)
//! need real Redis and PostgreSQL servers they can kill, pause and cut off
//! from the network. There is no container engine on the machines we test on,
//! so this crate starts the server *processes* itself:
//!
//! - [`RedisServer`]: a `redis-server` on a random free port of 127.0.0.1 with
//!   its own temporary directory and no persistence; `kill`, `restart` on the
//!   same port, `pause` (SIGSTOP) / `resume` (SIGCONT), raw RESP
//!   [`command`](RedisServer::command)s for `CLIENT KILL`, `CONFIG SET` and
//!   friends.
//! - [`RedisCluster`]: a Redis Cluster of local `redis-server` processes (3 masters
//!   with 1 replica each by default), created with `redis-cli --cluster create`;
//!   `kill` (SIGKILL), `pause`/`resume`, `restart` of one node, the master of a slot
//!   or key, and [`wait_healthy`](RedisCluster::wait_healthy) after a failover.
//! - [`PostgresServer`]: `initdb` + `postgres` in a temporary directory on a
//!   random port, `trust` authentication, durability off; `kill`, `restart`,
//!   `pause`, `resume`, [`psql`](PostgresServer::psql),
//!   [`create_database`](PostgresServer::create_database). When run as root it
//!   runs the server as the `postgres` OS user.
//! - [`FaultProxy`]: a Tokio TCP proxy in front of either, injecting latency,
//!   blackholes, one-way cuts, refused connections and connection resets.
//! - [`history`]: JSON-lines histories of a torture run (a thread-safe
//!   [`Recorder`], a tolerant reader, [`monotonic_ns`] timestamps comparable
//!   across processes), and [`checker`]: the pure function that judges a history
//!   against a consistency level ([`check`] → [`Report`]).
//!
//! Servers never use the default ports (6379, 5432): a machine may run its own
//! servers there. Every server is killed when its handle is dropped; if a test
//! is panicking at that moment, the tail of the server log is printed to
//! stderr.
//!
//! # Failure policy
//!
//! This is a test-support crate: the `start`/`restart` constructors *panic*
//! with a loud, explanatory message (including the server log) when a server
//! cannot be started, because that means the test environment is broken. The
//! `try_*` variants return the error instead. Everything else returns
//! [`std::io::Result`].
//!
//! # Environment variables
//!
//! | variable | meaning |
//! |---|---|
//! | `STRATA_REDIS_SERVER` | path of the `redis-server` binary (default: `redis-server` from `PATH`) |
//! | `STRATA_REDIS_CLI` | path of the `redis-cli` binary that creates a [`RedisCluster`] (default: `redis-cli` from `PATH`) |
//! | `STRATA_PG_BIN` | directory holding `postgres`, `initdb`, `psql`, `pg_isready` (default: `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`, else `PATH`) |
//! | `STRATA_PG_NO_TEMPLATE` | `1`: run `initdb` for every [`PostgresServer`] instead of copying a cached template data directory from `$TMPDIR/strata-testkit/` |
//!
//! Missing binaries: on Debian, `apt-get install redis-server redis-tools postgresql`.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use strata_testkit::RedisServer;
//!
//! let mut redis = RedisServer::start();
//! redis.command(&["SET", "k", "v"]).expect("SET");
//! redis.pause().expect("SIGSTOP");
//! assert!(redis.ping(Duration::from_millis(200)).is_err());
//! redis.resume().expect("SIGCONT");
//! redis.kill();
//! redis.restart(); // same port, empty data set
//! ```

pub mod alloc;
mod call_log;
pub mod checker;
pub mod history;
mod postgres;
mod process;
mod proxy;
mod redis;
mod redis_cluster;
mod sys;

pub use call_log::CallLog;
pub use checker::{CacheSnapshot, CheckConfig, Quiescence, Report, check};
pub use history::{Event, History, Op, Recorder, Tier, monotonic_ns};
pub use postgres::{PG_BIN_ENV, PG_NO_TEMPLATE_ENV, PostgresServer, PostgresServerBuilder};
pub use proxy::{Direction, FaultProxy, Faults, ProxyStats};
pub use redis::{REDIS_SERVER_ENV, RedisServer, RedisServerBuilder};
pub use redis_cluster::{CLUSTER_SLOTS, REDIS_CLI_ENV, RedisCluster, RedisClusterBuilder, Role, key_slot};
