//! The L2 call wrapper: the one owner of L2 resilience. Every call to the tier goes
//! through it, bounded by the cache's `l2_timeout` and guarded by the cache's L2
//! circuit breaker; adapters keep only connection-level timeouts and reconnects.
//!
//! A timeout is how an outage shows (a paused or unreachable server answers nothing),
//! but also how overload shows: when a server shares saturated cores with its clients,
//! a lookup queued behind others crosses a 50 ms budget although every call still
//! gets its answer. Handled as an outage, that overload spirals: the breaker opens,
//! reads go to the database, L1 fills are shortened, and the extra load makes the next
//! call time out too (a fleet of 50 over one Redis went from 1.00× to 3–9× its
//! compulsory database reads that way). So a call is failed at `l2_timeout` only when
//! the tier heard nothing back during it ([`Tier::progress`]); while replies keep
//! coming, it is waited for in further `l2_timeout` slices, up to `l2_busy_timeout`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::breaker::{BreakerState, CircuitBreaker};
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::tier::{LatencyBudget, Tier};

/// A tier with its breaker and timeouts.
pub(crate) struct L2 {
    tier: Arc<dyn Tier>,
    breaker: CircuitBreaker,
    timeout: Duration,
    busy_timeout: Duration,
    /// What a call gets before it counts as failed, from what recent calls took.
    budget: LatencyBudget,
    namespace: String,
}

impl L2 {
    pub(crate) fn new(
        tier: Arc<dyn Tier>,
        breaker: CircuitBreaker,
        timeout: Duration,
        busy_timeout: Duration,
        namespace: String,
    ) -> Self {
        let busy_timeout = busy_timeout.max(timeout);
        L2 { tier, breaker, timeout, busy_timeout, budget: LatencyBudget::default(), namespace }
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
        let res = self.breaker.call(self.bounded(what, stats, call)).await;
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
        stats: &Stats,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        self.bounded(what, stats, call).await
    }

    /// Runs `call` for its budget (`l2_timeout`, more while the tier has been answering
    /// slowly: see [`LatencyBudget`]), and then for further slices of it as long as the tier
    /// heard back from its server during the last one, until `l2_busy_timeout`.
    async fn bounded<T>(
        &self,
        what: &str,
        stats: &Stats,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let tier = &self.tier;
        let answered = self.budget.run(call, self.timeout, self.busy_timeout, || tier.progress()).await;
        if answered.waited {
            stats.l2_calls_waited_busy.incr();
        }
        match answered.outcome {
            Ok(r) => r,
            Err(elapsed) if answered.waited => {
                Err(Error::timeout(&format!("l2 {what} (the tier answered other calls meanwhile)"), elapsed))
            }
            Err(_) => Err(Error::timeout(&format!("l2 {what}"), answered.slice)),
        }
    }

    /// After L2 was made clean: a forced-open breaker closes again.
    pub(crate) fn reset_if_forced_open(&self) {
        if self.breaker.state() == BreakerState::ForcedOpen {
            self.breaker.reset();
        }
    }
}
