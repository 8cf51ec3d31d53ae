//! The timeline of a strategy's measured window: per-second DB reads, hottest-key DB
//! reads, shared-tier calls and read p99, with what the injected events and the hottest
//! key's reloads cost. The events happen in a window of their own after the steady one
//! (in the cold one with `--steady-after 0`): a fleet that has been running, as in
//! production, without disturbing the steady measurement. Without events the timeline
//! is the steady window's.

use serde::Serialize;

use super::events::{Cause, EventReport, Expiries, Reload, reloads};
use super::runner::Outcome;

/// One strategy's window, second by second (the JSON's `timeline`).
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    /// Which window: "cold", "steady" or "events" (a third window, after the steady
    /// one, that the events happen in).
    pub window: &'static str,
    /// DB reads in each second.
    pub db_reads: Vec<u64>,
    /// DB reads of the hottest key in each second.
    pub hot_key_db_reads: Vec<u64>,
    /// Shared-tier and backplane calls in each second (Redis commands with Redis,
    /// counted client-side).
    pub shared_tier_ops: Vec<u64>,
    /// Read latency p99 of the requests scheduled in each second, microseconds.
    pub read_p99_us: Vec<f64>,
    /// The injected events and what each cost.
    pub events: Vec<EventReport>,
    /// Every reload of the hottest key (none for a strategy that caches nothing).
    pub hot_key_reloads: Vec<Reload>,
    /// Its reloads caused by expiry, summed up.
    pub hot_key_expiries: Expiries,
}

impl Timeline {
    /// The timeline of `outcome`, the run of `window` ("cold" starts with empty
    /// caches). `caches`: whether the strategy caches at all; `invalidates`: whether a
    /// write makes it reload.
    pub fn new(window: &'static str, outcome: &Outcome, caches: bool, invalidates: bool) -> Timeline {
        let seconds = outcome.db_reads_per_second.len();
        let mut hot_key_db_reads = vec![0u64; seconds];
        for t in &outcome.hot_loads {
            if let Some(n) = hot_key_db_reads.get_mut(t.as_secs() as usize) {
                *n += 1;
            }
        }
        let events: Vec<EventReport> = outcome
            .events
            .iter()
            .map(|e| EventReport::new(e, &outcome.db_reads_per_second, &outcome.hot_loads))
            .collect();
        let hot_key_reloads = if caches {
            let writes: &[_] = if invalidates { &outcome.hot_writes } else { &[] };
            reloads(&outcome.hot_loads, writes, &outcome.events, window == "cold")
        } else {
            Vec::new()
        };
        let hot_key_expiries = Expiries::of(&hot_key_reloads, &outcome.db_reads_per_second);
        Timeline {
            window,
            db_reads: outcome.db_reads_per_second.clone(),
            hot_key_db_reads,
            shared_tier_ops: outcome.tier_ops_per_second.clone(),
            read_p99_us: outcome.read_p99_us_per_second.clone(),
            events,
            hot_key_reloads,
            hot_key_expiries,
        }
    }

    /// The footer's lines: one per event, one for the hottest key's expiries.
    pub fn lines(&self, strategy: &str) -> Vec<String> {
        let mut out: Vec<String> = self.events.iter().map(|e| e.line(strategy)).collect();
        let e = &self.hot_key_expiries;
        if let Some(per) = e.loads_per_expiry() {
            out.push(format!(
                "# {strategy:<12} hottest key expired {}x in the {} window: {per:.1} DB loads each (max {}), \
                 peak {} DB reads/s in their seconds",
                e.count, self.window, e.max_loads, e.peak_db_reads_per_s
            ));
        }
        out
    }

    /// Reloads caused by expiry (for the plot's markers).
    pub fn expiries(&self) -> impl Iterator<Item = &Reload> {
        self.hot_key_reloads.iter().filter(|r| r.cause == Cause::Expiry)
    }
}
