//! [`CallLog`]: the latencies of a batch of calls made during a fault, for the
//! examples and tools that measure what a caller waits while a server is down.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// Calls issued, their latencies once they returned, and how many returned an error.
#[derive(Debug, Default)]
pub struct CallLog {
    issued: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
    failed: AtomicU64,
}

impl CallLog {
    /// Counts a call as issued.
    pub fn issue(&self) {
        self.issued.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a returned call: how long it took and whether it succeeded.
    pub fn record(&self, took: Duration, ok: bool) {
        self.latencies.lock().push(took);
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Calls issued so far.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Calls returned so far.
    pub fn returned(&self) -> usize {
        self.latencies.lock().len()
    }

    /// One line: calls, errors, p50, p99 and max latency.
    pub fn summary(&self, name: &str) -> String {
        let mut l = self.latencies.lock().clone();
        l.sort_unstable();
        let at = |q: f64| l.get(((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1))).copied();
        let ms =
            |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3));
        format!(
            "{name:<9} {:>6} calls ({:>6} returned an error)   p50 {:>10}   p99 {:>10}   max {:>10}",
            l.len(),
            self.failed.load(Ordering::Relaxed),
            ms(at(0.50)),
            ms(at(0.99)),
            ms(l.last().copied()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_latencies_and_failures() {
        let log = CallLog::default();
        for i in 1..=100u64 {
            log.issue();
            log.record(Duration::from_millis(i), i % 10 != 0);
        }
        assert_eq!((log.issued(), log.returned()), (100, 100));
        let line = log.summary("outage");
        assert!(line.contains("100 calls (    10 returned an error)"), "{line}");
        assert!(line.contains("p50    51.0 ms") && line.contains("max   100.0 ms"), "{line}");
    }
}
