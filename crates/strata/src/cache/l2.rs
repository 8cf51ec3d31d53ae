//! The L2 call wrapper: the one owner of L2 resilience. Every call to the tier goes
//! through it, bounded by the cache's `l2_timeout` and guarded by the cache's L2
//! circuit breaker; adapters keep only connection-level timeouts and reconnects.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::breaker::{BreakerState, CircuitBreaker};
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::tier::Tier;

/// A tier with its breaker and timeout.
pub(crate) struct L2 {
    tier: Arc<dyn Tier>,
    breaker: CircuitBreaker,
    timeout: Duration,
    namespace: String,
}

impl L2 {
    pub(crate) fn new(
        tier: Arc<dyn Tier>,
        breaker: CircuitBreaker,
        timeout: Duration,
        namespace: String,
    ) -> Self {
        L2 { tier, breaker, timeout, namespace }
    }

    /// The tier, for building a call.
    pub(crate) fn tier(&self) -> &dyn Tier {
        &*self.tier
    }

    /// The namespace every call is made for.
    pub(crate) fn ns(&self) -> &str {
        &self.namespace
    }

    pub(crate) fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// One L2 call: skipped when the breaker is open, bounded by the L2 timeout, its
    /// outcome fed to the breaker and failures counted.
    pub(crate) async fn call<T>(
        &self,
        what: &str,
        stats: &Stats,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let timeout = self.timeout;
        let res = self
            .breaker
            .call(async {
                match tokio::time::timeout(timeout, call).await {
                    Ok(r) => r,
                    Err(_) => Err(Error::timeout(&format!("l2 {what}"), timeout)),
                }
            })
            .await;
        if let Err(e) = &res
            && !e.is_circuit_open()
        {
            stats.l2_errors.incr();
            tracing::debug!(error = %e, namespace = %self.namespace, "l2 call failed");
        }
        res
    }

    /// One L2 call past the breaker (still bounded by the timeout): for the retry of
    /// buffered invalidations, which must not wait for this instance's breaker to
    /// close while other instances, whose breakers closed sooner, read what they cover
    /// back from L2; and for the namespace bump that makes a bypassed cache clean again,
    /// which a forced-open breaker must not block.
    pub(crate) async fn call_past_breaker<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(Error::timeout(&format!("l2 {what}"), self.timeout)),
        }
    }

    /// After L2 was made clean: a forced-open breaker closes again.
    pub(crate) fn reset_if_forced_open(&self) {
        if self.breaker.state() == BreakerState::ForcedOpen {
            self.breaker.reset();
        }
    }
}
