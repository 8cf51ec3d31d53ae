//! `--join-at`: what replacing one instance in the middle of the run cost the database,
//! read off the per-second series of DB reads around the moment it happened.

use serde::Serialize;

use super::runner::Rejoin;

/// Seconds compared before and after the join.
const WINDOW_S: usize = 3;

/// The database's side of one instance joining mid-run.
#[derive(Debug, Clone, Serialize)]
pub struct JoinReport {
    /// When the new instance was started, seconds from the first request.
    pub at_s: f64,
    /// How long it took to be ready (subscribed; warmed up with `--warm-up`),
    /// milliseconds. The old instance served meanwhile.
    pub ready_ms: f64,
    /// Mean DB reads/s over the (up to) 3 whole seconds before the join's second.
    pub db_reads_per_s_before: f64,
    /// The most DB reads in one second, of the join's second and the 2 after it.
    pub peak_db_reads_per_s: u64,
    /// DB reads in those 3 seconds beyond the rate before: what the join cost.
    pub extra_db_reads: f64,
}

impl JoinReport {
    /// Reads the join off `per_second` (DB reads in each second from the first request).
    pub fn new(rejoin: &Rejoin, per_second: &[u64]) -> JoinReport {
        // The join's effect starts when the new instance serves, not when it starts.
        let serving = (rejoin.at + rejoin.ready_after).as_secs_f64();
        let second = (serving.floor() as usize).min(per_second.len());
        let before = &per_second[second.saturating_sub(WINDOW_S)..second];
        let after = &per_second[second..(second + WINDOW_S).min(per_second.len())];
        let rate_before =
            if before.is_empty() { 0.0 } else { before.iter().sum::<u64>() as f64 / before.len() as f64 };
        JoinReport {
            at_s: rejoin.at.as_secs_f64(),
            ready_ms: rejoin.ready_after.as_secs_f64() * 1e3,
            db_reads_per_s_before: rate_before,
            peak_db_reads_per_s: after.iter().copied().max().unwrap_or(0),
            extra_db_reads: (after.iter().sum::<u64>() as f64 - rate_before * after.len() as f64).max(0.0),
        }
    }

    /// One line for the table's footer.
    pub fn line(&self, strategy: &str) -> String {
        format!(
            "# {strategy:<12} instance 0 rejoined at {:.1} s, ready in {:.1} ms: DB reads/s {:.0} before, \
             peak {} after, {:.0} extra DB reads in {WINDOW_S} s",
            self.at_s,
            self.ready_ms,
            self.db_reads_per_s_before,
            self.peak_db_reads_per_s,
            self.extra_db_reads
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn reads_the_spike_off_the_series() {
        let rejoin = Rejoin { at: Duration::from_millis(4_900), ready_after: Duration::from_millis(200) };
        let r = JoinReport::new(&rejoin, &[500, 100, 100, 100, 100, 400, 250, 100, 100]);
        assert_eq!(r.db_reads_per_s_before, 100.0);
        assert_eq!(r.peak_db_reads_per_s, 400);
        assert_eq!(r.extra_db_reads, 450.0);
        assert!(r.line("strata").contains("peak 400"));
    }

    #[test]
    fn a_join_at_the_end_has_no_after() {
        let rejoin = Rejoin { at: Duration::from_secs(9), ready_after: Duration::from_secs(5) };
        let r = JoinReport::new(&rejoin, &[1, 2, 3]);
        assert_eq!((r.peak_db_reads_per_s, r.extra_db_reads), (0, 0.0));
    }
}
