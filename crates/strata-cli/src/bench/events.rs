//! What happens to a fleet in the middle of a window, and what it cost the database:
//! the events the bench injects (`--join-at`, `--warm-join-at`, `--bulk-invalidate-at`)
//! and the hottest key's reloads (after a write, an event, or its TTL expiring: `--ttl`
//! makes that happen inside the window), read off the window's per-second series.

use std::time::Duration;

use serde::Serialize;

/// Whole seconds compared before and after an event.
pub const WINDOW_S: usize = 3;
/// Hot-key loads further apart than this start a new reload.
const RELOAD_GAP: Duration = Duration::from_millis(250);
/// A reload starting this soon after a write of the hot key returned (or while it ran),
/// or after an event took effect, is theirs: the key is read hundreds of times a
/// second, its next read follows fast.
const AFTER_CAUSE: Duration = Duration::from_millis(250);

/// Something done to the fleet in the middle of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// Instance 0 replaced by a new one with an empty local cache (a restart, a
    /// scale-out).
    ColdJoin,
    /// An instance replaced by a new one that warms up before it serves (strata's
    /// `WarmUp`; the other strategies have none and join cold).
    WarmJoin,
    /// Everything cached invalidated at once (strata: `invalidate_all`, a namespace
    /// bump; near-pubsub: a "clear" broadcast; redis-global: every key deleted;
    /// multi-tier: `invalidate_pattern`). local-ttl and none have no such operation.
    BulkInvalidation,
}

impl EventKind {
    /// How the event is named in the table and on the plot.
    pub fn label(self) -> &'static str {
        match self {
            EventKind::ColdJoin => "cold join",
            EventKind::WarmJoin => "warm join",
            EventKind::BulkInvalidation => "bulk invalidation",
        }
    }
}

/// An event to inject, from the window's first request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// What happens.
    pub kind: EventKind,
    /// When.
    pub at: Duration,
}

/// An event as the runner carried it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Happened {
    /// What happened.
    pub kind: EventKind,
    /// When it started, from the window's first request.
    pub at: Duration,
    /// How long until it took effect (a join: the new instance ready to serve).
    pub took: Duration,
    /// False when the strategy has no such operation (nothing was done).
    pub applied: bool,
}

/// What one event cost the database.
#[derive(Debug, Clone, Serialize)]
pub struct EventReport {
    /// What happened.
    pub kind: EventKind,
    /// When, seconds from the window's first request.
    pub at_s: f64,
    /// Until it took effect (a join: the new instance ready), milliseconds.
    pub ready_ms: f64,
    /// False when the strategy has no such operation.
    pub applied: bool,
    /// Mean DB reads/s over the (up to) 3 whole seconds before the second it took
    /// effect in.
    pub db_reads_per_s_before: f64,
    /// The most DB reads in one second, of that second and the 2 after it.
    pub peak_db_reads_per_s: u64,
    /// DB reads in those 3 seconds beyond the rate before: what the event cost.
    pub extra_db_reads: f64,
    /// DB reads of the hottest key from the event's start to 3 s after it took effect.
    pub hot_key_loads: u64,
}

impl EventReport {
    /// Reads `event` off `per_second` (DB reads in each second of the window) and
    /// `hot_loads` (when the hottest key was read from the DB).
    pub fn new(event: &Happened, per_second: &[u64], hot_loads: &[Duration]) -> EventReport {
        let effective = event.at + event.took;
        let second = (effective.as_secs() as usize).min(per_second.len());
        let before = &per_second[second.saturating_sub(WINDOW_S)..second];
        let after = &per_second[second..(second + WINDOW_S).min(per_second.len())];
        let rate_before =
            if before.is_empty() { 0.0 } else { before.iter().sum::<u64>() as f64 / before.len() as f64 };
        let until = effective + Duration::from_secs(WINDOW_S as u64);
        EventReport {
            kind: event.kind,
            at_s: event.at.as_secs_f64(),
            ready_ms: event.took.as_secs_f64() * 1e3,
            applied: event.applied,
            db_reads_per_s_before: rate_before,
            peak_db_reads_per_s: after.iter().copied().max().unwrap_or(0),
            extra_db_reads: (after.iter().sum::<u64>() as f64 - rate_before * after.len() as f64).max(0.0),
            hot_key_loads: hot_loads.iter().filter(|t| **t >= event.at && **t < until).count() as u64,
        }
    }

    /// One line for the table's footer.
    pub fn line(&self, strategy: &str) -> String {
        if !self.applied {
            return format!("# {strategy:<12} {} at {:.1} s: not supported", self.kind.label(), self.at_s);
        }
        format!(
            "# {strategy:<12} {} at {:.1} s, effective in {:.1} ms: DB reads/s {:.0} before, peak {} after, \
             {:.0} extra DB reads in {WINDOW_S} s, hottest key loaded {}x",
            self.kind.label(),
            self.at_s,
            self.ready_ms,
            self.db_reads_per_s_before,
            self.peak_db_reads_per_s,
            self.extra_db_reads,
            self.hot_key_loads,
        )
    }
}

/// Why the hottest key was reloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    /// Its first load in a cold window.
    First,
    /// A write of it ran or had just returned.
    Write,
    /// An injected event had just happened.
    Event,
    /// None of those: its cached copies had expired (their TTL, or the local cache
    /// evicted them).
    Expiry,
}

/// One reload of the hottest key: DB reads of it no more than 250 ms apart.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Reload {
    /// When its first load started, seconds from the window's first request.
    pub at_s: f64,
    /// DB reads of the key in it (1 is ideal for a fleet-shared copy).
    pub loads: u64,
    /// Why.
    pub cause: Cause,
}

/// Groups the hot key's DB reads (sorted) into reloads and tells their causes.
/// `writes` are the hot key's writes (start, return); `events` what was injected;
/// `cold` whether the window started with empty caches.
pub fn reloads(
    hot_loads: &[Duration],
    writes: &[(Duration, Duration)],
    events: &[Happened],
    cold: bool,
) -> Vec<Reload> {
    let mut out: Vec<Reload> = Vec::new();
    let mut last: Option<Duration> = None;
    for &t in hot_loads {
        match (last, out.last_mut()) {
            (Some(prev), Some(reload)) if t.saturating_sub(prev) <= RELOAD_GAP => reload.loads += 1,
            _ => {
                let cause = if cold && out.is_empty() {
                    Cause::First
                } else if writes.iter().any(|(start, end)| t >= *start && t <= *end + AFTER_CAUSE) {
                    Cause::Write
                } else if events.iter().any(|e| t >= e.at && t <= e.at + e.took + AFTER_CAUSE) {
                    Cause::Event
                } else {
                    Cause::Expiry
                };
                out.push(Reload { at_s: t.as_secs_f64(), loads: 1, cause });
            }
        }
        last = Some(t);
    }
    out
}

/// The hottest key's expiries in a window.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Expiries {
    /// Reloads caused by expiry.
    pub count: u64,
    /// DB reads of the key in them.
    pub loads: u64,
    /// The most loads in one of them.
    pub max_loads: u64,
    /// The most DB reads (all keys) in a second one of them started in.
    pub peak_db_reads_per_s: u64,
}

impl Expiries {
    /// Sums up the expiry reloads of `reloads`.
    pub fn of(reloads: &[Reload], per_second: &[u64]) -> Expiries {
        let mut e = Expiries::default();
        for r in reloads.iter().filter(|r| r.cause == Cause::Expiry) {
            e.count += 1;
            e.loads += r.loads;
            e.max_loads = e.max_loads.max(r.loads);
            let second = r.at_s as usize;
            e.peak_db_reads_per_s = e.peak_db_reads_per_s.max(per_second.get(second).copied().unwrap_or(0));
        }
        e
    }

    /// Mean loads per expiry.
    pub fn loads_per_expiry(&self) -> Option<f64> {
        (self.count > 0).then(|| self.loads as f64 / self.count as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn reads_the_spike_off_the_series() {
        let join = Happened { kind: EventKind::ColdJoin, at: ms(4_900), took: ms(200), applied: true };
        let r =
            EventReport::new(&join, &[500, 100, 100, 100, 100, 400, 250, 100, 100], &[ms(5_000), ms(9_000)]);
        assert_eq!(r.db_reads_per_s_before, 100.0);
        assert_eq!(r.peak_db_reads_per_s, 400);
        assert_eq!(r.extra_db_reads, 450.0);
        assert_eq!(r.hot_key_loads, 1);
        assert!(r.line("strata").contains("peak 400"));
    }

    #[test]
    fn an_event_at_the_end_has_no_after() {
        let join = Happened { kind: EventKind::WarmJoin, at: ms(9_000), took: ms(5_000), applied: true };
        let r = EventReport::new(&join, &[1, 2, 3], &[]);
        assert_eq!((r.peak_db_reads_per_s, r.extra_db_reads), (0, 0.0));
        let skipped =
            Happened { kind: EventKind::BulkInvalidation, at: ms(1_000), took: ms(0), applied: false };
        assert!(EventReport::new(&skipped, &[1, 2, 3], &[]).line("none").ends_with("not supported"));
    }

    #[test]
    fn reloads_are_grouped_and_explained() {
        let loads = [ms(10), ms(20), ms(2_000), ms(2_100), ms(2_200), ms(5_000), ms(8_000), ms(8_050)];
        let writes = [(ms(1_950), ms(1_990))];
        let events =
            [Happened { kind: EventKind::BulkInvalidation, at: ms(7_990), took: ms(1), applied: true }];
        let r = reloads(&loads, &writes, &events, true);
        let got: Vec<(u64, Cause)> = r.iter().map(|r| (r.loads, r.cause)).collect();
        assert_eq!(got, [(2, Cause::First), (3, Cause::Write), (1, Cause::Expiry), (2, Cause::Event)]);
        let e = Expiries::of(&r, &[0, 0, 0, 0, 0, 70, 0, 0, 0]);
        assert_eq!((e.count, e.loads, e.max_loads, e.peak_db_reads_per_s), (1, 1, 1, 70));
        assert_eq!(reloads(&loads[..1], &[], &[], false)[0].cause, Cause::Expiry);
    }
}
