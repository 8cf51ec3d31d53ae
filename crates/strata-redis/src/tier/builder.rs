//! [`RedisTierBuilder`]: the tier's settings and their checks. `build` lives with the
//! tier it builds, in the [`tier`](super) module.

use std::sync::Arc;
use std::time::Duration;

use strata::breaker::BreakerConfig;
use strata::clock::Clock;
use strata::error::{Error, ErrorKind, Result};

use crate::connection::ConnectionOptions;
use crate::tls::TlsConfig;

/// Default per-operation timeout.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_millis(50);

/// Names the tier in errors.
pub(crate) const WHAT: &str = "redis tier";

/// Builds a [`RedisTier`](crate::RedisTier); see [`RedisTier::builder`](crate::RedisTier::builder).
#[must_use = "a builder does nothing until .build().await"]
pub struct RedisTierBuilder {
    pub(crate) connection: ConnectionOptions,
    pub(crate) op_timeout: Duration,
    pub(crate) tombstone_ttl: Duration,
    pub(crate) breaker: BreakerConfig,
    pub(crate) clock: Option<Arc<dyn Clock>>,
    pub(crate) reconnect_after_timeouts: u32,
}

impl std::fmt::Debug for RedisTierBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTierBuilder")
            .field("connection", &self.connection)
            .field("op_timeout", &self.op_timeout)
            .field("tombstone_ttl", &self.tombstone_ttl)
            .finish_non_exhaustive()
    }
}

impl RedisTierBuilder {
    pub(crate) fn new(url: impl Into<String>) -> Self {
        RedisTierBuilder {
            connection: ConnectionOptions::new(url),
            op_timeout: DEFAULT_OP_TIMEOUT,
            tombstone_ttl: strata::tier::TierConfig::default().tombstone_ttl,
            breaker: BreakerConfig::default(),
            clock: None,
            reconnect_after_timeouts: 4,
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

    /// Per-operation timeout (default 50 ms): each call gives up after it with an
    /// error of kind `Timeout`, which the breaker counts as a failure. Keep it at or
    /// below the cache's `l2_timeout`, so that this tier's counters and breaker see the
    /// timeouts rather than the cache cancelling the call first.
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

    /// Circuit breaker settings for this endpoint.
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// The clock used for `touch` expiries and by the breaker (use the caches' clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Do not contact the server in `build` (default: `build` sends a `PING` and
    /// fails if the server is unreachable or refuses the credentials). A lazy tier
    /// connects on first use; until then calls fail and the breaker opens.
    pub fn lazy(mut self, lazy: bool) -> Self {
        self.connection.lazy = lazy;
        self
    }

    /// After this many consecutive timeouts the connection is replaced by a new one
    /// (default 4): a connection to a silently dead peer never reports an error.
    pub fn reconnect_after_timeouts(mut self, n: u32) -> Self {
        self.reconnect_after_timeouts = n;
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
        if self.op_timeout.is_zero() {
            return invalid(
                "redis tier: op_timeout is zero; use a timeout near the server's p99.9 \
                 latency, such as 50ms"
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
        if let Err(e) = self.breaker.validate() {
            return invalid(format!("redis tier: {e}"));
        }
        Ok(())
    }
}
