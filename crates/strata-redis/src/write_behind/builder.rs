//! [`RedisWriteBehindQueueBuilder`] and [`Durability`]: the queue's settings and their
//! checks. `build` and the server checks it runs live in [`checks`](super::checks).

use std::time::Duration;

use strata::error::{Error, ErrorKind, Result};

use crate::connection::ConnectionOptions;
use crate::tier::DEFAULT_OP_TIMEOUT;
use crate::tls::TlsConfig;

/// Names the queue in errors.
pub(crate) const WHAT: &str = "redis write-behind queue";

/// Default number of groups a namespace's queue is split into (see
/// [`RedisWriteBehindQueueBuilder::groups`]).
pub const DEFAULT_QUEUE_GROUPS: usize = 16;

/// Most groups: every fan-out operation (stats, dead letters, `make_due` of all keys)
/// runs one script per group on a Cluster.
const MAX_GROUPS: usize = 1024;

/// When [`save`](strata::write_behind::WriteBehindQueue::save) returns: what the
/// acknowledgement of a save survives (see the crate docs, "Write-behind queue").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Once Redis applied the save (the default). Lost with the server's memory: a
    /// `kill -9` or a crash loses what was not yet persisted (with AOF `everysec`,
    /// about the last second; with RDB snapshots only, everything since the last
    /// one), and a failover loses what the replica had not received.
    #[default]
    Acknowledged,
    /// Once `replicas` replicas of the group's master confirmed it (Redis `WAIT`
    /// after the save script, at most `timeout`). Fewer confirmations fail the save
    /// with an error of kind [`Tier`](strata::error::ErrorKind::Tier) (transient) that
    /// says how many confirmed: the save is applied on the master all the same, and
    /// retrying it is harmless (saves of a key coalesce). Survives the loss of the
    /// master when a confirming replica is promoted. `WAIT` holds the connection: the
    /// queue's other calls wait behind it, so keep `timeout` short.
    Replicas {
        /// Replicas that must confirm (at least 1).
        replicas: u32,
        /// How long to wait for them (above zero, below the queue's `op_timeout`).
        timeout: Duration,
    },
    /// Once the save is in the master's append-only file, fsynced: `build` checks that
    /// every master serving the queue runs with `appendonly yes` and `appendfsync
    /// always` (Redis then writes and fsyncs the AOF before it answers a write) and
    /// refuses otherwise. Survives a `kill -9` or a power loss of the server and a
    /// restart from its AOF. Redis 7.0 has no `WAITAOF` (7.2+ does), so the server's
    /// own setting is what makes it hold, not a per-call wait.
    AppendFsync,
}

/// Builds a [`RedisWriteBehindQueue`](crate::RedisWriteBehindQueue); see
/// [`RedisWriteBehindQueue::builder`](crate::RedisWriteBehindQueue::builder).
#[must_use = "a builder does nothing until .build().await"]
#[derive(Debug, Clone)]
pub struct RedisWriteBehindQueueBuilder {
    pub(crate) connection: ConnectionOptions,
    pub(crate) op_timeout: Duration,
    pub(crate) groups: usize,
    pub(crate) durability: Durability,
    pub(crate) allow_eviction_risk: bool,
    pub(crate) reconnect_after_timeouts: u32,
}

impl RedisWriteBehindQueueBuilder {
    pub(crate) fn new(connection: ConnectionOptions) -> Self {
        RedisWriteBehindQueueBuilder {
            connection,
            op_timeout: DEFAULT_OP_TIMEOUT,
            groups: DEFAULT_QUEUE_GROUPS,
            durability: Durability::default(),
            allow_eviction_risk: false,
            reconnect_after_timeouts: 4,
        }
    }

    /// Replaces the connection settings (URL or cluster nodes included) with `options`,
    /// for example the tier's.
    pub fn connection(mut self, options: ConnectionOptions) -> Self {
        self.connection = options;
        self
    }

    /// Prefix of every key (default `strata`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.connection.prefix = prefix.into();
        self
    }

    /// Timeout of each call (default 1 s, as the tier's): a call Redis has not answered
    /// by then fails with an error of kind `Timeout`. The flusher retries what failed.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// Timeout of each TCP connection attempt (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connection.connect_timeout = timeout;
        self
    }

    /// Certificates for a `rediss://` URL (a private CA, a client certificate).
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.connection.tls = Some(tls);
        self
    }

    /// Do not contact the server in `build` (default `false`): no `PING`, no eviction
    /// check. Refused with [`Durability::AppendFsync`], which `build` must verify.
    pub fn lazy(mut self, lazy: bool) -> Self {
        self.connection.lazy = lazy;
        self
    }

    /// How many groups each namespace's queue is split into, 1 to 1024 (default
    /// [`DEFAULT_QUEUE_GROUPS`], 16). On a Cluster the groups' hash tags land in equal
    /// ranges of the slots, so 16 groups spread a namespace over up to 16 masters; a
    /// fan-out call (`stats`, `dead_letters`, `make_due`/`requeue_dead` of every key)
    /// then costs one script per group, and an idle `claim_due` visits every group. On
    /// one server the groups cost nothing extra (a fan-out is one script), and the
    /// namespace's [`QueueLimits`](strata::write_behind::QueueLimits) are exact; on a
    /// Cluster each group holds its share of them (see the crate docs). Every queue
    /// sharing a prefix must use the same count: a key is looked for in one group only.
    pub fn groups(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }

    /// When a save returns (default [`Durability::Acknowledged`]).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Build even when the server may evict any key (`maxmemory` set with an
    /// `allkeys-*` policy), logging a warning instead of failing (default `false`).
    /// Evicted queue records are saves lost without a trace; the queue's keys never
    /// have a TTL, so `volatile-*` and `noeviction` are always accepted.
    pub fn allow_eviction_risk(mut self, allow: bool) -> Self {
        self.allow_eviction_risk = allow;
        self
    }

    /// After this many consecutive timeouts the connection is replaced (default 4).
    pub fn reconnect_after_timeouts(mut self, n: u32) -> Self {
        self.reconnect_after_timeouts = n;
        self
    }

    /// Checks the settings, with an error that says how to fix a bad one.
    pub(crate) fn check(&self) -> Result<()> {
        let invalid = |what: String| Err(Error::new(ErrorKind::InvalidInput, format!("{WHAT}: {what}")));
        self.connection.check(WHAT)?;
        if self.op_timeout.is_zero() {
            return invalid("op_timeout is zero; use for example 1s".into());
        }
        if !(1..=MAX_GROUPS).contains(&self.groups) {
            return invalid(format!(
                "groups is {}; use 1 to {MAX_GROUPS} (default {DEFAULT_QUEUE_GROUPS})",
                self.groups
            ));
        }
        match self.durability {
            Durability::Replicas { replicas, timeout }
                if replicas == 0 || timeout.is_zero() || timeout >= self.op_timeout =>
            {
                invalid(format!(
                    "Durability::Replicas {{ replicas: {replicas}, timeout: {timeout:?} }} needs at least 1 \
                     replica and a timeout above zero and below op_timeout ({:?}), such as 1 replica and 50ms",
                    self.op_timeout
                ))
            }
            Durability::AppendFsync if self.connection.lazy => invalid(
                "Durability::AppendFsync cannot be combined with lazy(true): build must check the \
                 server's appendonly and appendfsync settings"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}
