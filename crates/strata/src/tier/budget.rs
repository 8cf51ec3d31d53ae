//! [`LatencyBudget`]: the time a call to a server gets before it counts as failed, its
//! floor (the cache's `l2_timeout`, a connection's timeout) while the server answers
//! fast, more while it has been answering slowly. For the cache's L2 calls and for
//! adapters' connections.
//!
//! A fixed 50 ms budget fails fast when Redis stops answering, but also fails calls to
//! a Redis that answers every call, slowly, because it shares saturated cores with its
//! clients: those failures open the breaker and send reads to the database, whose extra
//! load slows Redis further (a fleet of 50 on a 2-core host with one core taken went to
//! 2.5–5× its compulsory database reads at 50 ms, and held at 1.00× with 150 ms). So
//! the budget follows the latency the calls that got an answer took, the way TCP sets
//! its retransmission timeout (RFC 6298: a smoothed round trip plus four times its
//! mean deviation), never below its floor (`l2_timeout`) and never above its cap
//! (`l2_busy_timeout`). A call that got no answer is not a sample (Karn's rule): a
//! server that stops answering keeps the budget its last answers earned, the floor
//! after fast ones.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::busy::{Answered, await_while_answering};

/// A call budget from the latency of the calls that got an answer (see the module
/// docs): smoothed latency and its mean deviation, in microseconds, 0 before the first
/// sample.
#[derive(Debug, Default)]
pub struct LatencyBudget {
    srtt_us: AtomicU64,
    rttvar_us: AtomicU64,
}

impl LatencyBudget {
    /// Takes the latency of a call that got an answer. Concurrent updates may lose one
    /// another's sample, which an average of many does not notice.
    pub fn observe(&self, took: Duration) {
        let r = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let srtt = self.srtt_us.load(Ordering::Relaxed);
        if srtt == 0 {
            self.srtt_us.store(r, Ordering::Relaxed);
            self.rttvar_us.store(r / 2, Ordering::Relaxed);
            return;
        }
        let rttvar = self.rttvar_us.load(Ordering::Relaxed);
        let rttvar = rttvar - rttvar / 4 + srtt.abs_diff(r) / 4;
        let srtt = (srtt - srtt / 8).saturating_add(r / 8).max(1);
        self.rttvar_us.store(rttvar, Ordering::Relaxed);
        self.srtt_us.store(srtt, Ordering::Relaxed);
    }

    /// The budget: the smoothed latency plus four deviations, within `floor..=cap`.
    pub fn get(&self, floor: Duration, cap: Duration) -> Duration {
        let srtt = self.srtt_us.load(Ordering::Relaxed);
        let rttvar = self.rttvar_us.load(Ordering::Relaxed);
        let us = srtt.saturating_add(rttvar.saturating_mul(4));
        Duration::from_micros(us).clamp(floor, cap.max(floor))
    }

    /// Runs `call` through [`await_while_answering`] with this budget (within
    /// `floor..=cap`) as its slice, and takes what it took as a sample if it answered.
    pub async fn run<T>(
        &self,
        call: impl Future<Output = T>,
        floor: Duration,
        cap: Duration,
        progress: impl Fn() -> Option<u64>,
    ) -> Answered<T> {
        let slice = self.get(floor, cap);
        let started = tokio::time::Instant::now();
        let answered = await_while_answering(call, slice, cap, progress).await;
        if answered.outcome.is_ok() {
            self.observe(started.elapsed());
        }
        answered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOR: Duration = Duration::from_millis(50);
    const CAP: Duration = Duration::from_millis(500);

    #[test]
    fn fast_answers_keep_the_floor() {
        let b = LatencyBudget::default();
        assert_eq!(b.get(FLOOR, CAP), FLOOR, "no sample yet");
        for _ in 0..100 {
            b.observe(Duration::from_micros(300));
        }
        assert_eq!(b.get(FLOOR, CAP), FLOOR);
    }

    #[test]
    fn slow_answers_raise_it_up_to_the_cap_and_fast_ones_bring_it_back() {
        let b = LatencyBudget::default();
        for i in 0..50u64 {
            b.observe(Duration::from_millis(20 + (i % 5) * 20));
        }
        let slow = b.get(FLOOR, CAP);
        assert!(slow > Duration::from_millis(100) && slow < CAP, "{slow:?}");
        for _ in 0..50 {
            b.observe(Duration::from_secs(3));
        }
        assert_eq!(b.get(FLOOR, CAP), CAP);
        for _ in 0..200 {
            b.observe(Duration::from_micros(500));
        }
        assert_eq!(b.get(FLOOR, CAP), FLOOR);
    }
}
