//! [`RedisWriteBehindQueue`]: strata's durable
//! [`WriteBehindQueue`](strata::write_behind::WriteBehindQueue) on Redis, one server or
//! a Redis Cluster. The layout, the durability levels and the eviction rule are in the
//! crate docs ("Write-behind queue"); the scripts in `scripts.rs`.
//!
//! A namespace's queue is split into groups (a key's group: a hash of the key modulo
//! the group count), each under its own hash tag, so every script touches one slot and
//! a Cluster spreads the groups over its masters. Each operation on a key is one script
//! on its group; the fan-out operations (`stats`, `dead_letters`, and `make_due` /
//! `requeue_dead` of every key) are one script over every group on one server and one
//! per group on a Cluster; `claim_due` visits the groups from a random one until it has
//! `max` keys (one script on one server, one per group visited on a Cluster).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::Value;
use strata::error::{ErrorKind, Result};

pub use builder::{DEFAULT_QUEUE_GROUPS, Durability, RedisWriteBehindQueueBuilder};

use crate::cluster::RedisConn;
use crate::connection::ConnectionOptions;
use crate::managed::{CallError, ManagedConn};

mod builder;
mod checks;
mod layout;
mod port;
mod scripts;

/// Counters of a [`RedisWriteBehindQueue`] (the queue's own health, beside the
/// per-namespace figures of [`stats`](strata::write_behind::WriteBehindQueue::stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedisQueueCounters {
    /// Redis round trips made.
    pub ops: u64,
    /// Corrupt queue keys the scripts repaired: a record whose value was readable but
    /// whose other fields were not (kept, due at once with a fresh sequence), counters
    /// recounted, index keys of the wrong type dropped.
    pub repaired: u64,
    /// Records dropped because their value was unreadable (a key of another type, a
    /// hash without its value): saves lost to whatever corrupted them. Logged.
    pub dropped: u64,
    /// Calls that timed out.
    pub timeouts: u64,
    /// Calls that failed otherwise.
    pub errors: u64,
}

#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    repaired: AtomicU64,
    dropped: AtomicU64,
    timeouts: AtomicU64,
    errors: AtomicU64,
}

struct Inner {
    conn: Arc<ManagedConn>,
    layout: layout::Layout,
    prefix: String,
    op_timeout: Duration,
    durability: Durability,
    scripts: scripts::Scripts,
    counters: Counters,
}

/// The durable write-behind queue on Redis: every save in a Redis hash, due times and
/// claims in sorted sets, each operation one Lua script (see the crate docs,
/// "Write-behind queue"). Shared by every instance of the fleet: any instance's flusher
/// writes any instance's saves, and takes over the claims of one that died once their
/// lease ran out.
///
/// Cloning gives another handle to the same connection and counters.
#[derive(Clone)]
pub struct RedisWriteBehindQueue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisWriteBehindQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisWriteBehindQueue")
            .field("url", &self.inner.conn.shown_url())
            .field("prefix", &self.inner.prefix)
            .field("groups", &self.inner.layout.groups())
            .field("durability", &self.inner.durability)
            .finish_non_exhaustive()
    }
}

impl RedisWriteBehindQueue {
    /// Starts building a queue on the server at `url`
    /// (`redis://[user:password@]host[:port][/db]`, or `rediss://…` for TLS).
    pub fn builder(url: impl Into<String>) -> RedisWriteBehindQueueBuilder {
        RedisWriteBehindQueueBuilder::new(ConnectionOptions::new(url))
    }

    /// Starts building a queue on a Redis Cluster reached through `nodes` (one or more
    /// of its nodes' URLs, with the same credentials and TLS mode).
    pub fn cluster_builder(
        nodes: impl IntoIterator<Item = impl Into<String>>,
    ) -> RedisWriteBehindQueueBuilder {
        RedisWriteBehindQueueBuilder::new(ConnectionOptions::cluster(nodes))
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// How many groups each namespace is split into.
    pub fn groups(&self) -> usize {
        self.inner.layout.groups()
    }

    /// The durability level saves are acknowledged at.
    pub fn durability(&self) -> Durability {
        self.inner.durability
    }

    /// The Redis key of `key`'s record in namespace `ns` (for tools and tests).
    pub fn record_key(&self, ns: &str, key: &str) -> String {
        self.inner.layout.record(ns, key)
    }

    /// The Redis keys of group `group` of `ns`: its counters hash, schedule, dirty
    /// index, dead-letter sorted set and dead-letter stream (for tools and tests).
    pub fn group_keys(&self, ns: &str, group: usize) -> Vec<String> {
        let mut keys = self.inner.layout.keys(ns, group).to_vec();
        keys.push(format!("{}h", self.inner.layout.base(ns, group)));
        keys
    }

    /// The queue's counters.
    pub fn counters(&self) -> RedisQueueCounters {
        let c = &self.inner.counters;
        RedisQueueCounters {
            ops: c.ops.load(Ordering::Relaxed),
            repaired: c.repaired.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed) + self.inner.conn.abandoned(),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }

    /// Runs one Redis call with the op timeout, counting it.
    async fn run<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(RedisConn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let inner = &self.inner;
        inner.counters.ops.fetch_add(1, Ordering::Relaxed);
        inner.conn.call(inner.op_timeout, ErrorKind::Tier, what, f).await.map_err(|e| {
            match &e {
                CallError::Timeout(_) => &inner.counters.timeouts,
                CallError::Failed(_) => &inner.counters.errors,
            }
            .fetch_add(1, Ordering::Relaxed);
            e.into_error()
        })
    }

    /// Runs a script invocation.
    async fn invoke(&self, what: &'static str, inv: redis::ScriptInvocation<'_>) -> Result<Value> {
        self.run(what, |mut c| async move { inv.invoke_async(&mut c).await }).await
    }

    /// Counts and logs what a script repaired and dropped.
    fn note_repairs(&self, ns: &str, repaired: u64, dropped: u64) {
        let c = &self.inner.counters;
        if repaired > 0 {
            c.repaired.fetch_add(repaired, Ordering::Relaxed);
            metrics::counter!("strata_write_behind_queue_repaired_total", "namespace" => ns.to_owned())
                .increment(repaired);
            tracing::warn!(namespace = ns, repaired, "corrupt write-behind queue keys repaired");
        }
        if dropped > 0 {
            c.dropped.fetch_add(dropped, Ordering::Relaxed);
            metrics::counter!("strata_write_behind_queue_dropped_total", "namespace" => ns.to_owned())
                .increment(dropped);
            tracing::error!(
                namespace = ns,
                dropped,
                "write-behind queue records without a readable value dropped: those saves are lost"
            );
        }
    }
}
