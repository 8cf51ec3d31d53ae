//! The load gate: every loader call passes it. It waits a bounded time for a permit of
//! the cache's limit and of the shared limiter, then asks the loader's breaker (when
//! on; an open one refuses before the wait too); a refusal is an error the read path
//! answers with a fail-safe copy when it has one.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::breaker::{BreakerState, CircuitBreaker};
use crate::error::{Error, ErrorKind, Result};
use crate::overload::{LoadLimiter, LoadProtection};
use crate::stats::Stats;

/// One cache's limits and loader breaker.
pub(crate) struct LoadGate {
    namespace: String,
    own: Option<(usize, Semaphore)>,
    shared: Option<LoadLimiter>,
    wait: Duration,
    breaker: Option<CircuitBreaker>,
    in_flight: AtomicUsize,
}

impl LoadGate {
    /// The gate for `protection`; a load waits `wait` at most for its permits.
    pub(crate) fn new(
        namespace: &str,
        protection: &LoadProtection,
        wait: Duration,
        breaker: Option<CircuitBreaker>,
    ) -> Self {
        LoadGate {
            namespace: namespace.to_owned(),
            own: protection.max_concurrent.map(|n| (n, Semaphore::new(n))),
            shared: protection.limiter.clone(),
            wait,
            breaker,
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Loads of this cache running now.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Runs `load` once the gate lets it through; `ok` tells the breaker whether its
    /// output was a success. Refused: `CircuitOpen` (breaker open) or `Overloaded` (no
    /// permit in time), and `load` is never polled.
    pub(crate) async fn admitted<F: Future>(
        &self,
        stats: &Stats,
        load: F,
        ok: impl FnOnce(&F::Output) -> bool,
    ) -> Result<F::Output> {
        let permit = self.admit(stats).await?;
        let out = load.await;
        permit.finish(ok(&out));
        Ok(out)
    }

    async fn admit(&self, stats: &Stats) -> Result<Permit<'_>> {
        // An open breaker refuses before any wait for a permit...
        if let Some(breaker) = &self.breaker
            && matches!(breaker.state(), BreakerState::Open | BreakerState::ForcedOpen)
        {
            stats.loads_rejected_breaker.incr();
            return Err(Error::new(
                ErrorKind::CircuitOpen,
                format!("circuit breaker for {} is open", breaker.name()),
            ));
        }
        let mut permit = Permit { gate: self, breaker: None, _held: Vec::new(), counted: false };
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(self.wait).unwrap_or(now);
        let mut throttled = false;
        if let Some((limit, own)) = &self.own {
            let what = || format!("the concurrent-load limit of cache {:?} ({limit} loads)", self.namespace);
            permit._held.push(self.permit(own, deadline, stats, &mut throttled, what).await?);
        }
        if let Some(shared) = &self.shared {
            let s = shared.shared();
            let what = || format!("the shared load limiter {:?} ({} loads)", s.name, s.limit);
            permit._held.push(self.permit(&s.permits, deadline, stats, &mut throttled, what).await?);
        }
        // ...and is asked for real once the permits are held: it may have opened while
        // this load waited, and a half-open probe slot must not be held while waiting.
        if let Some(breaker) = &self.breaker {
            if let Err(e) = breaker.try_acquire() {
                stats.loads_rejected_breaker.incr();
                return Err(e);
            }
            // From here dropping `permit` unrecorded gives a probe slot back.
            permit.breaker = Some(breaker);
        }
        permit.counted = true;
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("strata_loads_in_flight", "namespace" => self.namespace.clone()).increment(1.0);
        Ok(permit)
    }

    async fn permit<'a>(
        &self,
        semaphore: &'a Semaphore,
        deadline: tokio::time::Instant,
        stats: &Stats,
        throttled: &mut bool,
        what: impl FnOnce() -> String,
    ) -> Result<SemaphorePermit<'a>> {
        if let Ok(p) = semaphore.try_acquire() {
            return Ok(p);
        }
        if !*throttled {
            *throttled = true;
            stats.loads_throttled.incr();
        }
        match tokio::time::timeout_at(deadline, semaphore.acquire()).await {
            Ok(Ok(p)) => Ok(p),
            // The semaphores are never closed; a closed one refuses like a full one.
            _ => {
                stats.loads_rejected_overload.incr();
                Err(Error::new(
                    ErrorKind::Overloaded,
                    format!("{} was reached and no load finished within {:?}", what(), self.wait),
                ))
            }
        }
    }
}

/// A load let through: its permits, and its breaker slot until the outcome is recorded.
struct Permit<'a> {
    gate: &'a LoadGate,
    breaker: Option<&'a CircuitBreaker>,
    _held: Vec<SemaphorePermit<'a>>,
    counted: bool,
}

impl Permit<'_> {
    fn finish(mut self, success: bool) {
        if let Some(b) = self.breaker.take() {
            b.record(success);
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.breaker.take() {
            // Refused by a limit or cancelled: says nothing about the database.
            b.abandon();
        }
        if self.counted {
            self.gate.in_flight.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!("strata_loads_in_flight", "namespace" => self.gate.namespace.clone())
                .decrement(1.0);
        }
    }
}
