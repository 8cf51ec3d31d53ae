//! A circuit breaker per remote endpoint.
//!
//! Hand-written rather than taken from a crate: the candidates are unmaintained or pull
//! large dependency trees, and strata needs two things they lack: an injectable clock
//! (tests move time instead of sleeping) and a *forced-open* state that the consistency
//! logic sets when the cache can no longer be trusted (a failed L2 delete at the Strong
//! level) and clears only when the cache is known clean.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng;

use crate::clock::{Clock, MAX_SETTING, SystemClock, Timestamp, mul_f64_saturating};
use crate::error::{BuildError, Error, ErrorKind, Result};

/// The state of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls pass.
    Closed,
    /// Calls are refused until the cool-down ends.
    Open,
    /// One probe call is let through; its outcome closes or reopens the breaker.
    HalfOpen,
    /// Calls are refused until [`CircuitBreaker::reset`].
    ForcedOpen,
}

/// The largest `window` accepted: the breaker keeps one outcome per call of it.
const MAX_WINDOW: usize = 100_000;

/// Breaker settings.
#[derive(Debug, Clone)]
pub struct BreakerConfig {
    /// How many recent calls the failure ratio is computed over, 1..=100 000. Default 20.
    pub window: usize,
    /// Failure ratio in the window at or above which the breaker opens. Default 0.5.
    pub failure_ratio: f64,
    /// Calls the window needs before the ratio counts. Default 10.
    pub min_calls: usize,
    /// Consecutive failures that open the breaker at once, whatever the window says
    /// (fast open when a server dies); at least 1. Default 5.
    pub consecutive_failures: usize,
    /// How long the breaker stays open before a probe, at most 365 days. Default 1 s.
    pub open_for: Duration,
    /// Random extra fraction of `open_for` (0.2 = up to +20 %), so a fleet does not
    /// probe a recovering server all at once. Default 0.2.
    pub jitter: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: 20,
            failure_ratio: 0.5,
            min_calls: 10,
            consecutive_failures: 5,
            open_for: Duration::from_secs(1),
            jitter: 0.2,
        }
    }
}

impl BreakerConfig {
    /// Checks the settings.
    pub fn validate(&self) -> std::result::Result<(), BuildError> {
        if !(1..=MAX_WINDOW).contains(&self.window) {
            return Err(BuildError::new(
                "breaker.window",
                format!("is {}", self.window),
                format!("use 1..={MAX_WINDOW} calls (default 20)"),
            ));
        }
        if self.consecutive_failures == 0 {
            // 0 would open the breaker on every outcome, successes included.
            return Err(BuildError::new(
                "breaker.consecutive_failures",
                "is 0",
                "use at least 1 (default 5)",
            ));
        }
        if !(self.failure_ratio > 0.0 && self.failure_ratio <= 1.0) {
            return Err(BuildError::new(
                "breaker.failure_ratio",
                format!("is {}", self.failure_ratio),
                "use a ratio in (0, 1] (default 0.5)",
            ));
        }
        if self.min_calls > self.window {
            return Err(BuildError::new(
                "breaker.min_calls",
                format!("{} exceeds the window {}", self.min_calls, self.window),
                "make min_calls at most window",
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(BuildError::new("breaker.jitter", format!("is {}", self.jitter), "use 0.0..=1.0"));
        }
        if self.open_for.is_zero() || self.open_for > MAX_SETTING {
            return Err(BuildError::new(
                "breaker.open_for",
                format!("is {:?}", self.open_for),
                "use a positive cool-down of at most 365 days, such as 1s",
            ));
        }
        Ok(())
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;
const FORCED: u8 = 3;

struct Window {
    outcomes: Vec<bool>,
    next: usize,
    filled: usize,
    failures: usize,
    consecutive: usize,
    reopen_at: Timestamp,
    probe_in_flight: bool,
}

/// A circuit breaker guarding one remote endpoint.
pub struct CircuitBreaker {
    name: String,
    config: BreakerConfig,
    clock: Arc<dyn Clock>,
    /// Read without the lock on every call: the closed fast path is one atomic load.
    state: AtomicU8,
    window: Mutex<Window>,
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker").field("name", &self.name).field("state", &self.state()).finish()
    }
}

impl CircuitBreaker {
    /// A breaker named `name` (used in errors and metrics) on the system clock.
    pub fn new(name: impl Into<String>, config: BreakerConfig) -> Self {
        Self::with_clock(name, config, Arc::new(SystemClock::default()))
    }

    /// A breaker on an explicit clock.
    pub fn with_clock(name: impl Into<String>, config: BreakerConfig, clock: Arc<dyn Clock>) -> Self {
        let window = config.window.max(1);
        CircuitBreaker {
            name: name.into(),
            config,
            clock,
            state: AtomicU8::new(CLOSED),
            window: Mutex::new(Window {
                outcomes: vec![true; window],
                next: 0,
                filled: 0,
                failures: 0,
                consecutive: 0,
                reopen_at: Timestamp(0),
                probe_in_flight: false,
            }),
        }
    }

    /// The endpoint's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current state (an open breaker whose cool-down ended reads as half-open).
    pub fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            FORCED => BreakerState::ForcedOpen,
            HALF_OPEN => BreakerState::HalfOpen,
            _ => {
                if self.clock.now() >= self.window.lock().reopen_at {
                    BreakerState::HalfOpen
                } else {
                    BreakerState::Open
                }
            }
        }
    }

    /// Asks to make a call. `Err` (kind `CircuitOpen`) means: do not call.
    pub fn try_acquire(&self) -> Result<()> {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Ok(()),
            FORCED => Err(self.refusal("forced open")),
            _ => {
                let mut w = self.window.lock();
                let now = self.clock.now();
                if now < w.reopen_at || w.probe_in_flight {
                    return Err(self.refusal("open"));
                }
                w.probe_in_flight = true;
                self.state.store(HALF_OPEN, Ordering::Release);
                Ok(())
            }
        }
    }

    fn refusal(&self, how: &str) -> Error {
        Error::new(ErrorKind::CircuitOpen, format!("circuit breaker for {} is {how}", self.name))
    }

    /// Records the outcome of a call allowed by [`CircuitBreaker::try_acquire`].
    pub fn record(&self, success: bool) {
        let mut w = self.window.lock();
        match self.state.load(Ordering::Acquire) {
            FORCED => {}
            HALF_OPEN | OPEN => {
                w.probe_in_flight = false;
                if success {
                    w.outcomes.fill(true);
                    w.filled = 0;
                    w.failures = 0;
                    w.consecutive = 0;
                    self.state.store(CLOSED, Ordering::Release);
                } else {
                    self.trip(&mut w);
                }
            }
            _ => {
                let slot = w.next;
                let old = w.outcomes[slot];
                if w.filled == w.outcomes.len() && !old {
                    w.failures -= 1;
                }
                w.outcomes[slot] = success;
                w.next = (slot + 1) % w.outcomes.len();
                w.filled = (w.filled + 1).min(w.outcomes.len());
                if success {
                    w.consecutive = 0;
                } else {
                    w.failures += 1;
                    w.consecutive += 1;
                }
                let ratio_trips = w.filled >= self.config.min_calls
                    && w.failures as f64 >= self.config.failure_ratio * w.filled as f64;
                if ratio_trips || w.consecutive >= self.config.consecutive_failures {
                    self.trip(&mut w);
                }
            }
        }
    }

    fn trip(&self, w: &mut Window) {
        let jitter =
            if self.config.jitter > 0.0 { rand::rng().random_range(0.0..=self.config.jitter) } else { 0.0 };
        let cool = mul_f64_saturating(self.config.open_for, 1.0 + jitter);
        w.reopen_at = self.clock.now().saturating_add(cool);
        w.probe_in_flight = false;
        self.state.store(OPEN, Ordering::Release);
        metrics::counter!("strata_breaker_opened_total", "endpoint" => self.name.clone()).increment(1);
        tracing::warn!(endpoint = %self.name, cool_down = ?cool, "circuit breaker opened");
    }

    /// Opens the breaker until [`CircuitBreaker::reset`], whatever calls report: used
    /// when the endpoint may hold wrong data.
    pub fn force_open(&self) {
        self.state.store(FORCED, Ordering::Release);
        metrics::counter!("strata_breaker_forced_open_total", "endpoint" => self.name.clone()).increment(1);
    }

    /// Closes the breaker and clears its window.
    pub fn reset(&self) {
        let mut w = self.window.lock();
        w.outcomes.fill(true);
        w.filled = 0;
        w.failures = 0;
        w.consecutive = 0;
        w.probe_in_flight = false;
        self.state.store(CLOSED, Ordering::Release);
    }

    /// Runs `call` through the breaker: refused when open, outcome recorded. Only
    /// transient errors (timeouts, unreachable server) count as failures; a decode
    /// error says nothing about the endpoint's health, nor does
    /// [`ErrorKind::ShardDown`] (one shard of a sharded endpoint).
    pub async fn call<T, F>(&self, call: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        self.try_acquire()?;
        let mut guard = Abandoned { breaker: self, armed: true };
        let out = call.await;
        guard.armed = false;
        // A shard of a sharded tier down says nothing about the rest of it: the shard's
        // own breaker counts it.
        self.record(out.as_ref().map_or_else(|e| !e.is_transient() || e.is_shard_down(), |_| true));
        out
    }

    /// A call let through by [`CircuitBreaker::try_acquire`] was dropped before it
    /// finished (its caller was cancelled): it says nothing about the endpoint, but if
    /// it was the half-open probe, the next call must be allowed to probe instead.
    pub(crate) fn abandon(&self) {
        let mut w = self.window.lock();
        if self.state.load(Ordering::Acquire) == HALF_OPEN {
            w.probe_in_flight = false;
        }
    }
}

/// Clears the probe slot when a call's future is dropped mid-flight: without it, a
/// cancelled probe would keep the breaker open for good.
struct Abandoned<'a> {
    breaker: &'a CircuitBreaker,
    armed: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.breaker.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn breaker(config: BreakerConfig) -> (CircuitBreaker, ManualClock) {
        let clock = ManualClock::new();
        (
            CircuitBreaker::with_clock(
                "test",
                BreakerConfig { jitter: 0.0, ..config },
                Arc::new(clock.clone()),
            ),
            clock,
        )
    }

    fn fail(b: &CircuitBreaker, n: usize) {
        for _ in 0..n {
            b.try_acquire().expect("allowed");
            b.record(false);
        }
    }

    #[test]
    fn consecutive_failures_open_it_and_the_cool_down_leads_to_one_probe() {
        let (b, clock) = breaker(BreakerConfig::default());
        fail(&b, 4);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_acquire().expect_err("open").is_circuit_open());
        clock.advance(Duration::from_millis(999));
        assert_eq!(b.state(), BreakerState::Open);
        clock.advance(Duration::from_millis(1));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.try_acquire().expect("the probe");
        assert!(b.try_acquire().is_err(), "one probe at a time");
        b.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
        b.try_acquire().expect("closed again");
    }

    #[test]
    fn a_failed_probe_reopens_for_a_whole_cool_down() {
        let (b, clock) = breaker(BreakerConfig::default());
        fail(&b, 5);
        clock.advance(Duration::from_secs(1));
        b.try_acquire().expect("the probe");
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open);
        clock.advance(Duration::from_millis(999));
        assert!(b.try_acquire().is_err());
        clock.advance(Duration::from_millis(1));
        b.try_acquire().expect("the next probe");
    }

    #[test]
    fn the_failure_ratio_counts_only_once_the_window_has_min_calls() {
        let config = BreakerConfig { consecutive_failures: 100, ..Default::default() };
        let (b, _clock) = breaker(config);
        // Alternating: a 50 % failure ratio, never 5 in a row.
        for i in 0..9 {
            b.try_acquire().expect("allowed");
            b.record(i % 2 == 0);
        }
        assert_eq!(b.state(), BreakerState::Closed, "9 calls: below min_calls");
        b.try_acquire().expect("allowed");
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open, "10 calls, 5 failures: the ratio trips");
    }

    #[test]
    fn old_failures_leave_the_window() {
        let config =
            BreakerConfig { window: 4, min_calls: 4, consecutive_failures: 100, ..Default::default() };
        let (b, _clock) = breaker(config);
        fail(&b, 1);
        for _ in 0..3 {
            b.try_acquire().expect("allowed");
            b.record(true);
        }
        // The window is [fail, ok, ok, ok]: 25 %. One more success pushes the failure out.
        b.try_acquire().expect("allowed");
        b.record(true);
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Closed, "[ok, ok, ok, fail]: 25 %");
    }

    #[test]
    fn forced_open_ignores_outcomes_and_cool_downs_until_reset() {
        let (b, clock) = breaker(BreakerConfig::default());
        b.force_open();
        assert_eq!(b.state(), BreakerState::ForcedOpen);
        b.record(true);
        clock.advance(Duration::from_secs(3600));
        assert!(b.try_acquire().is_err());
        b.reset();
        assert_eq!(b.state(), BreakerState::Closed);
        b.try_acquire().expect("closed");
    }

    #[test]
    fn a_cool_down_of_any_length_opens_without_panicking() {
        let clock = ManualClock::new();
        let config = BreakerConfig { open_for: Duration::MAX, jitter: 1.0, ..BreakerConfig::default() };
        let b = CircuitBreaker::with_clock("test", config, Arc::new(clock.clone()));
        fail(&b, 5);
        assert_eq!(b.state(), BreakerState::Open);
        clock.advance(Duration::from_secs(100 * 365 * 24 * 3600));
        assert_eq!(b.state(), BreakerState::Open, "saturated at the end of time, not wrapped");
    }

    #[tokio::test]
    async fn an_abandoned_probe_frees_the_probe_slot() {
        let (b, clock) = breaker(BreakerConfig::default());
        fail(&b, 5);
        clock.advance(Duration::from_secs(1));
        let probe = b.call(std::future::pending::<Result<()>>());
        // Polled once (the probe is let through), then dropped: the caller gave up.
        assert!(futures::poll!(Box::pin(probe)).is_pending());
        b.try_acquire().expect("the next call may probe");
    }
}
