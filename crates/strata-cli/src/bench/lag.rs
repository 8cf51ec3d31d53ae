//! Propagation lag: from a write's completion (commit and invalidation returned on the
//! writer) to the moment every other instance has dropped its copy of the key, as the
//! strategies that invalidate report their instances' applications.

use std::collections::HashMap;
use std::time::Instant;

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;

/// One write waiting for the fleet.
struct Pending {
    writer: usize,
    done: Option<Instant>,
    applied: Vec<bool>,
    count: usize,
    last: Option<Instant>,
}

/// Tracks writes until every other instance applied their invalidation.
pub struct LagTracker {
    instances: usize,
    state: Mutex<State>,
}

struct State {
    pending: HashMap<u64, Pending>,
    lags_us: Histogram<u64>,
    /// Writes replaced by a later write of the same key before every instance applied
    /// (or never applied: a flush repaired them, or the run ended).
    incomplete: u64,
}

/// The lag of the writes completed in a window.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LagSummary {
    /// Writes whose every invalidation was seen applied.
    pub writes: u64,
    /// Writes that were not (see [`LagTracker`]).
    pub incomplete: u64,
    /// Percentiles and maximum, microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// The largest.
    pub max_us: f64,
}

impl LagTracker {
    /// A tracker for a fleet of `instances`.
    pub fn new(instances: usize) -> anyhow::Result<LagTracker> {
        Ok(LagTracker {
            instances,
            state: Mutex::new(State { pending: HashMap::new(), lags_us: Histogram::new(3)?, incomplete: 0 }),
        })
    }

    /// `writer` is about to write `key`.
    pub fn write_started(&self, writer: usize, key: u64) {
        let p = Pending { writer, done: None, applied: vec![false; self.instances], count: 0, last: None };
        let mut s = self.state.lock();
        if s.pending.insert(key, p).is_some() {
            s.incomplete += 1;
        }
    }

    /// The write of `key` returned on its writer.
    pub fn write_done(&self, key: u64) {
        let mut s = self.state.lock();
        if let Some(p) = s.pending.get_mut(&key) {
            p.done = Some(Instant::now());
        }
        self.finish_if_complete(&mut s, key);
    }

    /// `instance` dropped its copy of `key` for another instance's invalidation.
    pub fn applied(&self, instance: usize, key: u64) {
        let now = Instant::now();
        let mut s = self.state.lock();
        let Some(p) = s.pending.get_mut(&key) else { return };
        if instance == p.writer || instance >= p.applied.len() || p.applied[instance] {
            return;
        }
        p.applied[instance] = true;
        p.count += 1;
        p.last = Some(now);
        self.finish_if_complete(&mut s, key);
    }

    fn finish_if_complete(&self, s: &mut State, key: u64) {
        let others = self.instances.saturating_sub(1);
        let Some(p) = s.pending.get(&key) else { return };
        let (Some(done), true) = (p.done, p.count >= others) else { return };
        // Applied before the writer's call returned (always at the Strong level): 0.
        let lag = p.last.map_or(0, |last| last.saturating_duration_since(done).as_micros());
        s.pending.remove(&key);
        let _ = s.lags_us.record(u64::try_from(lag).unwrap_or(u64::MAX).max(1));
    }

    /// The summary since the last call, and starts over (writes still pending count
    /// as incomplete).
    pub fn take(&self) -> LagSummary {
        let mut s = self.state.lock();
        let incomplete = s.incomplete + s.pending.len() as u64;
        s.pending.clear();
        s.incomplete = 0;
        let h = s.lags_us.clone();
        s.lags_us.reset();
        let q = |q: f64| if h.is_empty() { 0.0 } else { h.value_at_quantile(q) as f64 };
        LagSummary {
            writes: h.len(),
            incomplete,
            p50_us: q(0.5),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: if h.is_empty() { 0.0 } else { h.max() as f64 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_completes_when_every_other_instance_applied() {
        let t = LagTracker::new(3).unwrap();
        t.write_started(0, 7);
        t.applied(1, 7);
        t.write_done(7);
        t.applied(0, 7); // the writer itself does not count
        assert_eq!(t.take().writes, 0, "instance 2 has not applied: {:?}", t.take());
        t.write_started(0, 7);
        t.applied(1, 7);
        t.write_done(7);
        t.applied(2, 7);
        let s = t.take();
        assert_eq!((s.writes, s.incomplete), (1, 0));
    }
}
