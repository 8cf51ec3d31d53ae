//! The builder's L2 settings: the shared tier and the backplane, how long a call to the
//! tier may take, how long a read waits for another instance's fill, and what L2 stores.

use std::sync::Arc;
use std::time::Duration;

use super::builder::CacheBuilder;
use crate::backplane::Backplane;
use crate::key::{CacheKey, CacheValue};
use crate::tier::Tier;

impl<K: CacheKey, V: CacheValue> CacheBuilder<K, V> {
    /// The shared L2 tier. Default: none (L1 only).
    pub fn tier(mut self, tier: Arc<dyn Tier>) -> Self {
        self.tier = Some(tier);
        self
    }

    /// The invalidation backplane. Default: none.
    pub fn backplane(mut self, backplane: Arc<dyn Backplane>) -> Self {
        self.backplane = Some(backplane);
        self
    }

    /// Timeout of each L2 call; keep it near the tier's p99.9. Default 50 ms.
    ///
    /// It ends a call when the tier heard nothing back from its server during it (a
    /// paused, crashed or unreachable server: fail fast, the breaker counts it). A call
    /// still running while the server keeps answering other calls (a busy server working
    /// through a backlog) is waited for up to [`l2_busy_timeout`](Self::l2_busy_timeout).
    ///
    /// It is the floor of each call's budget: while the tier has been answering slowly,
    /// calls get the smoothed latency of its answers plus four mean deviations (TCP's
    /// retransmission timeout, RFC 6298), up to `l2_busy_timeout`. Calls that got no
    /// answer are not counted, so after fast answers a server that stops answering
    /// fails calls at `l2_timeout`. And a call whose timer fired a quarter of a slice
    /// late (this process did not get a core) is waited for another slice, up to
    /// `l2_busy_timeout`: its silence proves nothing about the server.
    pub fn l2_timeout(mut self, timeout: Duration) -> Self {
        self.l2_timeout = timeout;
        self
    }

    /// How long an L2 call may run while the tier keeps answering other calls: past
    /// [`l2_timeout`](Self::l2_timeout) a call is waited for in further slices of
    /// `l2_timeout`, each as long as the tier heard back from its server during the one
    /// before ([`Tier::progress`](crate::tier::Tier::progress)), up to this in all.
    /// Default 10 × `l2_timeout` (500 ms by default); equal to `l2_timeout` turns the
    /// wait off. Counted in [`CacheStats::l2_calls_waited_busy`](crate::CacheStats::l2_calls_waited_busy).
    ///
    /// Why: an overloaded server (one that shares saturated cores with its clients,
    /// say) answers late but answers; failing those calls as an outage sends every
    /// read to the database and opens the breaker, which is the load that overloaded
    /// it, so the fleet spirals. A tier that cannot tell (`progress` is `None`, such as
    /// the in-process and sharded tiers) ends every call at `l2_timeout`.
    pub fn l2_busy_timeout(mut self, timeout: Duration) -> Self {
        self.l2_busy_timeout = Some(timeout);
        self
    }

    /// How long a read waits for another instance's fill when that instance holds the
    /// load lease, before loading itself. Default 500 ms.
    pub fn lease_wait(mut self, wait: Duration) -> Self {
        self.lease_wait = wait;
        self
    }

    /// Largest encoded value stored in L2, at least 1 byte; larger values stay in L1
    /// only (and `insert` refuses them). Default 1 MiB.
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }
}
