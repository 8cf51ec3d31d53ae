//! [`RedisTierBuilder`]: the tier's settings and their checks. `build` lives with the
//! tier it builds, in the [`tier`](super) module.

use std::sync::Arc;
use std::time::Duration;

use strata::clock::Clock;
use strata::error::{Error, ErrorKind, Result};

use crate::connection::ConnectionOptions;
use crate::integrity::IntegrityKey;
use crate::tls::TlsConfig;

/// Default response timeout of the tier's connection (see
/// [`RedisTierBuilder::op_timeout`]).
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(1);

/// Default largest entry a lookup transfers (see [`RedisTierBuilder::max_entry_bytes`]).
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 16 << 20;

/// Bounds of [`RedisTierBuilder::max_entry_bytes`]: 1 KiB up to Redis's default
/// `proto-max-bulk-len`, 512 MiB.
const ENTRY_BYTES_RANGE: std::ops::RangeInclusive<usize> = 1 << 10..=512 << 20;

/// Bounds of [`RedisTierBuilder::max_tag_epochs`]: a pruning (O(n)) runs inside one
/// script, during which the server serves nothing else.
const TAG_EPOCHS_RANGE: std::ops::RangeInclusive<usize> = strata::tier::MIN_MAX_TAG_EPOCHS..=100_000;

/// Names the tier in errors.
pub(crate) const WHAT: &str = "redis tier";

/// Builds a [`RedisTier`](crate::RedisTier); see [`RedisTier::builder`](crate::RedisTier::builder).
#[must_use = "a builder does nothing until .build().await"]
pub struct RedisTierBuilder {
    pub(crate) connection: ConnectionOptions,
    pub(crate) op_timeout: Duration,
    pub(crate) tombstone_ttl: Duration,
    pub(crate) clock: Option<Arc<dyn Clock>>,
    pub(crate) reconnect_after_timeouts: u32,
    pub(crate) max_entry_bytes: usize,
    pub(crate) max_tag_epochs: usize,
    pub(crate) legacy_tombstones: bool,
    pub(crate) integrity_keys: Option<Vec<IntegrityKey>>,
    pub(crate) eviction_check: super::eviction::EvictionCheck,
    pub(crate) wait_for_replicas: Option<(u32, Duration)>,
}

impl std::fmt::Debug for RedisTierBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTierBuilder")
            .field("connection", &self.connection)
            .field("op_timeout", &self.op_timeout)
            .field("tombstone_ttl", &self.tombstone_ttl)
            .field("max_entry_bytes", &self.max_entry_bytes)
            .field("max_tag_epochs", &self.max_tag_epochs)
            .field("legacy_tombstones", &self.legacy_tombstones)
            .field("integrity_keys", &self.integrity_keys.as_ref().map(Vec::len))
            .finish_non_exhaustive()
    }
}

impl RedisTierBuilder {
    pub(crate) fn new(url: impl Into<String>) -> Self {
        RedisTierBuilder {
            connection: ConnectionOptions::new(url),
            op_timeout: DEFAULT_OP_TIMEOUT,
            tombstone_ttl: strata::tier::TierConfig::default().tombstone_ttl,
            clock: None,
            reconnect_after_timeouts: 4,
            max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
            max_tag_epochs: strata::tier::DEFAULT_MAX_TAG_EPOCHS,
            legacy_tombstones: true,
            integrity_keys: None,
            eviction_check: super::eviction::EvictionCheck::default(),
            wait_for_replicas: None,
        }
    }

    /// Replaces the connection settings (URL included) with `options`, for example the
    /// ones given to the backplane.
    pub fn connection(mut self, options: ConnectionOptions) -> Self {
        self.connection = options;
        self
    }

    /// Prefix of every key (default `strata`). Tiers with different prefixes on one
    /// server never see each other's data.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.connection.prefix = prefix.into();
        self
    }

    /// The response timeout of the tier's connection (default 1 s): a call that Redis
    /// has not answered by then fails with an error of kind `Timeout`.
    ///
    /// A safety net, not the operation timeout: the cache's L2 call wrapper owns that
    /// (its `l2_timeout`, 50 ms by default) and the circuit breaker. Keep this well
    /// above `l2_timeout` so that the cache decides; it bounds the calls made outside a
    /// cache (tools, health checks, [`RedisTier::ping`](crate::RedisTier::ping)). The
    /// name is kept from when the tier had an operation timeout of its own.
    ///
    /// Calls that time out here, and calls the cache abandons at its `l2_timeout`, count
    /// towards [`reconnect_after_timeouts`](Self::reconnect_after_timeouts).
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// Timeout of each TCP connection attempt (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connection.connect_timeout = timeout;
        self
    }

    /// How long key tombstones live (default 60 s); must exceed the longest loader
    /// hard timeout of the caches using this tier.
    pub fn tombstone_ttl(mut self, ttl: Duration) -> Self {
        self.tombstone_ttl = ttl;
        self
    }

    /// The clock the tier reads the time from, for soft expiries at lookup and the hard
    /// expiry set by `touch` (use the caches' clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Do not contact the server in `build` (default: `build` sends a `PING` and
    /// fails if the server is unreachable or refuses the credentials). A lazy tier
    /// connects on first use; until then its calls fail (and the cache's L2 breaker
    /// opens).
    pub fn lazy(mut self, lazy: bool) -> Self {
        self.connection.lazy = lazy;
        self
    }

    /// After this many consecutive timeouts the connection is replaced by a new one
    /// (default 4): a connection to a silently dead peer never reports an error. Calls
    /// abandoned by their caller before Redis answered (the cache's `l2_timeout`) count
    /// as timeouts, since the cache gives up long before [`op_timeout`](Self::op_timeout).
    pub fn reconnect_after_timeouts(mut self, n: u32) -> Self {
        self.reconnect_after_timeouts = n;
        self
    }

    /// The largest stored envelope (the encoded value plus about 30 bytes) the tier
    /// handles, 16 MiB by default; from 1 KiB to 512 MiB.
    ///
    /// A lookup checks an entry's size in Redis before reading it: a larger entry is
    /// never transferred, it is a miss, deleted and counted as undecodable (one such
    /// entry would otherwise make every lookup of its key outlast the cache's
    /// `l2_timeout`). A fill of a larger value runs the fill guard but stores nothing
    /// (it answers `Stored` when the guard lets it through, so the cache keeps the value
    /// in L1, and drops the entry it would have replaced); a `set` of one invalidates the
    /// key. Both count in [`RedisTierStats::oversized`](crate::RedisTierStats::oversized).
    pub fn max_entry_bytes(mut self, bytes: usize) -> Self {
        self.max_entry_bytes = bytes;
        self
    }

    /// How many tag epochs (`t:<tag>` fields of a namespace's meta hash) the tier keeps,
    /// from 16 to 100,000; default 10,000. (The pruning starts when the hash holds more
    /// than this plus ten fields, its own up to ten bookkeeping fields included, so up to
    /// ten more tag epochs may be kept while some of those are absent.)
    ///
    /// Every tag ever invalidated used to stay in the meta hash for good (100,000 tags,
    /// about 14 MB). Past this bound the tag invalidation that crosses it drops the older
    /// half and raises the namespace's *tag floor* (`tf`) to the newest epoch dropped:
    /// from then on a tagged entry or fill stamped below the floor is invalid. Nothing a
    /// pruned tag invalidated can come back; tagged entries older than the floor load
    /// again (untagged ones are not affected). The pruning runs inside that one Lua
    /// script, O(n) once per n/2 new tags, which is why n is capped: Redis runs nothing
    /// else meanwhile. Every tier sharing a namespace should use the same bound (a
    /// different one is safe, only the larger holds).
    pub fn max_tag_epochs(mut self, n: usize) -> Self {
        self.max_tag_epochs = n;
        self
    }

    /// Also writes and reads each key tombstone where strata 0.1 kept it (a key
    /// `…:x:<key>` with the tombstone ttl), beside the tombstone generations this release
    /// keeps (see "Storage layout" in [`tier`](crate::tier)); default `true`.
    ///
    /// During a rolling deploy from 0.1, instances of both releases then refuse each
    /// other's late fills. Once no 0.1 instance shares the server, turn it off: it saves
    /// a key per invalidated key (about 130 bytes, for the tombstone ttl). (Entries of
    /// the two releases are stored differently: each reads the other's as a miss, and
    /// deletes it, for as long as both run.)
    pub fn legacy_tombstones(mut self, on: bool) -> Self {
        self.legacy_tombstones = on;
        self
    }

    /// Signs every entry this tier writes with an HMAC-SHA256 under the first key, and
    /// accepts on lookup only entries whose MAC verifies under one of the keys: a
    /// forged or altered entry (written by someone who can write the prefix but lacks
    /// the keys) is deleted, counted in
    /// [`RedisTierStats::integrity_failures`](crate::RedisTierStats::integrity_failures)
    /// and served as a miss, never as a value. Every key needs at least 16 bytes
    /// (`build` says which one is short). To rotate, put the new key first and keep the
    /// old one until entries signed with it have expired. Every tier sharing the prefix
    /// needs the keys: entries of a tier without them are misses here. What this does
    /// and does not protect against: see the crate docs, "Sharing a Redis: integrity
    /// keys".
    pub fn integrity_keys(mut self, keys: Vec<IntegrityKey>) -> Self {
        self.integrity_keys = Some(keys);
        self
    }

    /// Certificates for a `rediss://` URL (a private CA, a client certificate).
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.connection.tls = Some(tls);
        self
    }

    /// Acknowledges an invalidation (delete, tag or namespace bump, write lock, `set`)
    /// only once `replicas` replicas of its master have it, waiting at most `timeout`
    /// (Redis `WAIT`); otherwise the call fails and the cache retries it. Default: off.
    ///
    /// Redis replicates asynchronously: without this, an invalidation the master
    /// acknowledged but had not yet sent to a replica is lost if that replica is
    /// promoted (a failover), and the entry it deleted comes back until its TTL. With
    /// it, such an invalidation reports failure and is retried on the new master. The
    /// price: each invalidation waits for a replica's acknowledgement (a round trip
    /// between the servers), the connection's other calls queue behind a `WAIT` that
    /// times out, and while fewer than `replicas` replicas are in sync, invalidations
    /// fail (reads stay correct; the Strong level refuses writes). Keep `timeout`
    /// short, such as 20 ms. A least-privilege ACL user needs `+wait` beyond
    /// [`MINIMAL_ACL`](crate::MINIMAL_ACL).
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_for_replicas = Some((replicas, timeout));
        self
    }

    /// Checks the settings, with an error that says how to fix a bad one.
    pub(crate) fn check(&self) -> Result<()> {
        let invalid = |what: String| Err(Error::new(ErrorKind::InvalidInput, what));
        self.connection.check(WHAT)?;
        if self.op_timeout.is_zero() {
            return invalid(
                "redis tier: op_timeout is zero; it is the connection's response timeout, \
                 a backstop well above the cache's l2_timeout, such as 1s"
                    .into(),
            );
        }
        if self.tombstone_ttl < Duration::from_millis(1) {
            return invalid(
                "redis tier: tombstone_ttl is under 1ms; it must exceed the loaders' \
                 hard timeout (default 60s)"
                    .into(),
            );
        }
        if !ENTRY_BYTES_RANGE.contains(&self.max_entry_bytes) {
            return invalid(format!(
                "redis tier: max_entry_bytes is {}; it is the largest entry a lookup \
                 transfers, from 1 KiB (1024) to 512 MiB (Redis's proto-max-bulk-len); \
                 the default is 16 MiB",
                self.max_entry_bytes
            ));
        }
        if !TAG_EPOCHS_RANGE.contains(&self.max_tag_epochs) {
            return invalid(format!(
                "redis tier: max_tag_epochs is {}; it bounds the tag epochs a namespace keeps \
                 in Redis, from 16 to 100,000 (a pruning runs in one script); the default is \
                 10,000",
                self.max_tag_epochs
            ));
        }
        if let Some((n, t)) = self.wait_for_replicas
            && (n == 0 || t.is_zero() || t >= self.op_timeout)
        {
            return invalid(format!(
                "redis tier: wait_for_replicas({n}, {t:?}) needs at least 1 replica and a timeout \
                 above zero and below op_timeout ({:?}), such as wait_for_replicas(1, 20ms)",
                self.op_timeout
            ));
        }
        Ok(())
    }
}
