//! [`RedisStreamBackplaneBuilder`]: the stream backplane's settings and their checks.
//! `build` lives with the backplane it builds, in the [`stream`](super::stream) module.

use std::time::Duration;

use strata::error::{Error, ErrorKind, Result};

use crate::backplane::{
    DEFAULT_CHANNEL_CAPACITY, DEFAULT_PUBLISH_TIMEOUT, DEFAULT_RECONNECT_BACKOFF, SharedConnection,
};
use crate::connection::{Backoff, ConnectionOptions};
use crate::integrity::IntegrityKey;
use crate::tier::EvictionCheck;
use crate::tls::TlsConfig;

/// Names the backplane in errors.
pub(crate) const WHAT: &str = "redis stream backplane";

/// Default cap of the stream (entries, approximate).
pub const DEFAULT_MAX_LEN: u64 = 100_000;

/// How a subscriber learns of new entries (see
/// [`RedisStreamBackplaneBuilder::delivery`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StreamDelivery {
    /// Every entry is also published on a Pub/Sub channel named like the stream, and
    /// each subscriber receives it as a RESP3 push on its connection: one `PUBLISH`
    /// per entry however many subscribers there are, where a blocking read costs one
    /// `XREAD` per subscriber and entry. The stream stays the log: a gap in the
    /// entries' numbers, a quiet spell (block time and read grace), a reconnect or a subscriber that fell
    /// behind is caught up by reading it, as with [`BlockingRead`](Self::BlockingRead).
    /// Needs RESP3 (Redis 6 or later; on an older server the subscribers read instead,
    /// with a warning) and, for an ACL user, `+subscribe` and the channels
    /// `&<prefix>:*` (both in [`MINIMAL_ACL`](crate::MINIMAL_ACL)). Entries appended to
    /// the stream by anything but strata (unnumbered) are read only by a catch-up. A
    /// Redis Cluster always uses `BlockingRead`.
    #[default]
    PubSub,
    /// Each subscriber loops on `XREAD BLOCK` (the behaviour of strata 0.1).
    BlockingRead,
}

/// Builds a [`RedisStreamBackplane`](crate::RedisStreamBackplane); see
/// [`RedisStreamBackplane::builder`](crate::RedisStreamBackplane::builder).
#[must_use = "a builder does nothing until .build().await"]
#[derive(Clone)]
pub struct RedisStreamBackplaneBuilder {
    pub(crate) connection: ConnectionOptions,
    pub(crate) max_len: u64,
    pub(crate) block: Duration,
    pub(crate) read_grace: Duration,
    pub(crate) op_timeout: Duration,
    pub(crate) channel_capacity: usize,
    pub(crate) batch: usize,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) integrity_keys: Option<Vec<IntegrityKey>>,
    pub(crate) shared: Option<SharedConnection>,
    pub(crate) delivery: StreamDelivery,
    pub(crate) eviction_check: EvictionCheck,
}

impl std::fmt::Debug for RedisStreamBackplaneBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamBackplaneBuilder")
            .field("connection", &self.connection)
            .field("max_len", &self.max_len)
            .field("integrity_keys", &self.integrity_keys.as_ref().map(Vec::len))
            .field("shares_connection", &self.shared.is_some())
            .field("delivery", &self.delivery)
            .field("eviction_check", &self.eviction_check)
            .finish_non_exhaustive()
    }
}

impl RedisStreamBackplaneBuilder {
    pub(crate) fn new(url: impl Into<String>) -> Self {
        RedisStreamBackplaneBuilder {
            connection: ConnectionOptions::new(url),
            max_len: DEFAULT_MAX_LEN,
            block: Duration::from_secs(1),
            read_grace: Duration::from_secs(1),
            op_timeout: DEFAULT_PUBLISH_TIMEOUT,
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
            batch: 512,
            reconnect_min: DEFAULT_RECONNECT_BACKOFF.0,
            reconnect_max: DEFAULT_RECONNECT_BACKOFF.1,
            integrity_keys: None,
            shared: None,
            delivery: StreamDelivery::default(),
            eviction_check: EvictionCheck::default(),
        }
    }

    /// What to do when the stream's server may evict any key (`maxmemory` with an
    /// `allkeys-*` policy), read with `INFO memory` at build time (not with
    /// `.lazy(true)`, and silently skipped where the ACL user may not run `INFO`).
    /// There the stream and its counter can be lost together, a loss every subscriber
    /// must verify or flush its L1 for, and a tier on the same server loses its
    /// namespace meta hash far more often than on its own (README, "Redis under memory
    /// pressure": in 3 MB under `allkeys-lru` the steady window read the database 5.3×
    /// as often as a plain cache-aside, 0.25× with the backplane on a server of its
    /// own). `volatile-*` is fine: no backplane key has a TTL. Default
    /// [`EvictionCheck::Warn`].
    pub fn eviction_check(mut self, check: EvictionCheck) -> Self {
        self.eviction_check = check;
        self
    }

    /// How subscribers learn of new entries (default [`StreamDelivery::PubSub`] on one
    /// server; a Redis Cluster reads). Acknowledgements (the Strong level's) travel the
    /// same way: under `PubSub` a member acknowledges with one `PUBLISH` to the origin's
    /// channel, and appends to the origin's acknowledgement stream only when no
    /// connection of the origin's received it (the origin reads that stream when it
    /// reconnects, and a `BlockingRead` origin reads it always); under `BlockingRead`
    /// it appends to that stream. So while a deploy changes this setting at the Strong
    /// level, a `PubSub` origin waits for the lease of each `BlockingRead` member (until
    /// its next reconnect); invalidations reach every member either way.
    pub fn delivery(mut self, delivery: StreamDelivery) -> Self {
        self.delivery = delivery;
        self
    }

    /// Signs every message this backplane publishes with an HMAC-SHA256 under the first
    /// key, and delivers only messages whose MAC verifies under one of the keys: any
    /// other entry (written by someone who can write the prefix but lacks the keys) is
    /// skipped and reported as `Malformed` (counted in
    /// [`BackplaneStats::malformed`](crate::BackplaneStats::malformed)), and its entry
    /// number is ignored, so it cannot fake a loss either. Every key needs at least 16
    /// bytes; rotate by putting the new key first. Every instance needs the keys. See
    /// the crate docs, "Sharing a Redis: integrity keys".
    pub fn integrity_keys(mut self, keys: Vec<IntegrityKey>) -> Self {
        self.integrity_keys = Some(keys);
        self
    }

    /// Publishes through `tier`'s connection instead of opening one (subscriptions still
    /// open their own, for their blocking reads): one connection less per instance,
    /// about 20 KB of the server's `maxmemory` each (its client buffers), which counts
    /// on a small server with many instances. `build` fails if the tier connects to
    /// another URL. Publishes then queue behind the tier's calls on one connection, and
    /// the tier's reconnect after repeated timeouts replaces it for both.
    pub fn share_connection(mut self, tier: &crate::RedisTier) -> Self {
        self.shared = Some(SharedConnection::of(tier));
        self
    }

    /// Replaces the connection settings (URL included) with `options`, for example the
    /// ones given to the tier.
    pub fn connection(mut self, options: ConnectionOptions) -> Self {
        self.connection = options;
        self
    }

    /// Key prefix (default `strata`): the stream is `{prefix}:{bp}`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.connection.prefix = prefix.into();
        self
    }

    /// Approximate cap of the stream, in entries (default 100 000). A subscriber away
    /// for longer than the stream takes to receive this many messages comes back to a
    /// gap (`Lost`: the core then flushes L1 if a member's sequence numbers show that
    /// something of its is missing); so does `replay` for older messages.
    pub fn max_len(mut self, n: u64) -> Self {
        self.max_len = n;
        self
    }

    /// How long one `XREAD` blocks (default 1 s). A read that has not answered after
    /// this plus [`read_grace`](Self::read_grace) counts as a lost connection. Under
    /// push delivery, a subscriber that was pushed no entry for this plus
    /// `read_grace` reads the stream (and a read that does not answer within
    /// `read_grace` counts as a lost connection).
    pub fn block(mut self, d: Duration) -> Self {
        self.block = d;
        self
    }

    /// Extra time a read may take beyond its block time (default 1 s); also the
    /// timeout of catch-up and replay reads.
    pub fn read_grace(mut self, d: Duration) -> Self {
        self.read_grace = d;
        self
    }

    /// Timeout of a publish (default 100 ms).
    pub fn op_timeout(mut self, d: Duration) -> Self {
        self.op_timeout = d;
        self
    }

    /// Timeout of each connection attempt (default 1 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connection.connect_timeout = d;
        self
    }

    /// Capacity of each subscription's channel (default 4096 events).
    pub fn channel_capacity(mut self, n: usize) -> Self {
        self.channel_capacity = n;
        self
    }

    /// Entries fetched per read (default 512).
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n;
        self
    }

    /// Reconnect backoff bounds (default 20 ms to 1 s, jittered).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max;
        self
    }

    /// Do not contact the server in `build` (default: `build` sends a `PING`).
    pub fn lazy(mut self, lazy: bool) -> Self {
        self.connection.lazy = lazy;
        self
    }

    /// Certificates for a `rediss://` URL (a private CA, a client certificate).
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.connection.tls = Some(tls);
        self
    }

    /// Checks the settings, with an error that says how to fix a bad one.
    pub(crate) fn check(&self) -> Result<()> {
        let invalid = |what: String| Err(Error::new(ErrorKind::InvalidInput, what));
        self.connection.check(WHAT)?;
        if self.max_len == 0 {
            return invalid(
                "redis stream backplane: max_len is 0; use the number of messages the \
                 stream keeps for replay, such as 100000"
                    .into(),
            );
        }
        if self.block.is_zero() || self.op_timeout.is_zero() {
            return invalid(
                "redis stream backplane: block and op_timeout must be non-zero (defaults 1s, 100ms)".into(),
            );
        }
        if self.channel_capacity == 0 || self.batch == 0 {
            return invalid(
                "redis stream backplane: channel_capacity and batch must be at least 1 \
                 (defaults 4096 and 512)"
                    .into(),
            );
        }
        Backoff::check(WHAT, self.reconnect_min, self.reconnect_max)?;
        Ok(())
    }
}
