//! [`ManagedConn`], the self-replacing connection of the tier and of the backplanes'
//! publishers, to one server or to a Redis Cluster.

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::RwLock;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use strata::error::{Error, ErrorKind};
use strata::tier::LatencyBudget;

use crate::cluster::{Connector, RedisConn};
use crate::connection::{ConnectionOptions, map_redis_error};

/// The most slices of its timeout a call waits while the server keeps answering
/// other calls (see [`ManagedConn::call`]).
const BUSY_SLICES: u32 = 5;

/// A connection ([`ConnectionManager`] to one server, or a cluster connection) that is
/// replaced by a fresh one after repeated timeouts: a connection to a peer that
/// vanished without a reset (a paused server, a dropped network path) never reports an
/// error by itself.
///
/// A call its caller abandons before Redis answered (its future dropped, as the cache
/// does at its `l2_timeout`) counts like a timeout: the cache gives up long before the
/// tier's response timeout, so without this a connection that stopped answering would
/// never be replaced while a cache uses the tier.
pub(crate) struct ManagedConn {
    connector: Connector,
    config: ConnectionManagerConfig,
    conn: RwLock<RedisConn>,
    shown_url: String,
    consecutive_timeouts: AtomicU32,
    reconnect_after: u32,
    reconnects: AtomicU64,
    abandoned: AtomicU64,
    /// Replies heard (see [`ManagedConn::replies`]).
    replies: AtomicU64,
    /// What a call gets before its first slice ends, from what answered calls took.
    budget: LatencyBudget,
}

/// How a [`ManagedConn::call`] ended, for the caller's counters.
pub(crate) enum CallError {
    /// The call did not finish within its timeout.
    Timeout(Error),
    /// Redis or the connection returned an error.
    Failed(Error),
}

impl CallError {
    pub(crate) fn into_error(self) -> Error {
        match self {
            CallError::Timeout(e) | CallError::Failed(e) => e,
        }
    }
}

/// Notes a call as abandoned when dropped before [`InFlight::finish`].
struct InFlight<'a> {
    conn: &'a ManagedConn,
    what: &'a str,
    finished: bool,
}

impl InFlight<'_> {
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.abandoned.fetch_add(1, Ordering::Relaxed);
            self.conn.note_timeout(self.what);
        }
    }
}

impl ManagedConn {
    /// A lazy connection to `options.url` (or its cluster) through `connector` (opened
    /// from the same options): nothing is sent before the first call.
    pub(crate) fn new(
        connector: Connector,
        options: &ConnectionOptions,
        reconnect_after: u32,
        what: &str,
    ) -> Result<Self, Error> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(None)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(500))
            .set_number_of_retries(3);
        let shown_url = options.redacted_url();
        let conn = Self::open(&connector, &config, &shown_url, what)?;
        Ok(ManagedConn {
            connector,
            config,
            conn: RwLock::new(conn),
            shown_url,
            consecutive_timeouts: AtomicU32::new(0),
            reconnect_after: reconnect_after.max(1),
            reconnects: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            replies: AtomicU64::new(0),
            budget: LatencyBudget::default(),
        })
    }

    fn open(
        connector: &Connector,
        config: &ConnectionManagerConfig,
        shown: &str,
        what: &str,
    ) -> Result<RedisConn, Error> {
        match connector {
            Connector::Single(client) => {
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                    .map(RedisConn::Single)
                    .map_err(|e| {
                        Error::new(
                            ErrorKind::InvalidInput,
                            format!("{what}: cannot set up a connection to `{shown}`"),
                        )
                        .with_source(e)
                    })
            }
            Connector::Cluster(client) => Ok(Connector::lazy_cluster(client)),
        }
    }

    /// The URL with the password redacted.
    pub(crate) fn shown_url(&self) -> &str {
        &self.shown_url
    }

    /// Whether this connects to a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.connector, Connector::Cluster(_))
    }

    /// A handle to the current connection.
    pub(crate) fn get(&self) -> RedisConn {
        self.conn.read().clone()
    }

    /// How many times the connection was replaced.
    pub(crate) fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// How many calls were abandoned by their caller before Redis answered.
    pub(crate) fn abandoned(&self) -> u64 {
        self.abandoned.load(Ordering::Relaxed)
    }

    /// Calls the server answered (an error reply included; not a connection that
    /// failed), whoever made them: how the cache tells a busy server, whose replies keep
    /// coming, from a stalled one ([`strata::tier::Tier::progress`]).
    pub(crate) fn replies(&self) -> u64 {
        self.replies.load(Ordering::Relaxed)
    }

    /// Runs `f` on the connection with `timeout`; errors are mapped to `kind`.
    ///
    /// `timeout` ends a call during which the connection heard nothing back. A call
    /// still running while the server answers the connection's other calls (it is busy
    /// working through what was queued before this one, not stalled) is waited for in
    /// further slices of `timeout` while replies keep coming, up to [`BUSY_SLICES`]
    /// slices: under load, a publish failed at 100 ms (its command still queued, and
    /// usually executed later) burned a sequence number that every receiver repaired
    /// by flushing its L1, and reported a committed write as failed. The first slice is
    /// `timeout` while the server answers fast, longer while its answers have been slow
    /// ([`LatencyBudget`]).
    pub(crate) async fn call<T, F, Fut>(
        &self,
        timeout: Duration,
        kind: ErrorKind,
        what: &'static str,
        f: F,
    ) -> Result<T, CallError>
    where
        F: FnOnce(RedisConn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let in_flight = InFlight { conn: self, what, finished: false };
        let cap = timeout.saturating_mul(BUSY_SLICES);
        let out = self.budget.run(f(self.get()), timeout, cap, || Some(self.replies())).await.outcome;
        in_flight.finish();
        match out {
            Ok(Ok(v)) => {
                self.replies.fetch_add(1, Ordering::Relaxed);
                self.consecutive_timeouts.store(0, Ordering::Relaxed);
                Ok(v)
            }
            Ok(Err(e)) => {
                if !(e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout())
                {
                    self.replies.fetch_add(1, Ordering::Relaxed);
                }
                Err(CallError::Failed(map_redis_error(kind, what, e)))
            }
            Err(waited) => {
                self.note_timeout(what);
                Err(CallError::Timeout(Error::timeout(what, waited)))
            }
        }
    }

    fn note_timeout(&self, what: &str) {
        let n = self.consecutive_timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        // A new manager spawns a task, which needs a runtime; a call dropped outside one
        // (a runtime shutting down) leaves the replacement to the next timeout.
        if n >= self.reconnect_after && tokio::runtime::Handle::try_current().is_ok() {
            self.consecutive_timeouts.store(0, Ordering::Relaxed);
            if let Ok(m) = Self::open(&self.connector, &self.config, &self.shown_url, what) {
                *self.conn.write() = m;
                self.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    url = %self.shown_url,
                    "{what}: replacing the redis connection after {n} consecutive timeouts"
                );
            }
        }
    }
}
