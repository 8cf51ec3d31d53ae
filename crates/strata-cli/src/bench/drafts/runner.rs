//! Offers the drafts schedule open-loop and judges every read against the saves
//! acknowledged before it began.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use parking_lot::Mutex;

use super::db::{Draft, DraftsDb};
use super::schedule::{Event, Timed};
use super::strategies::DraftStrategy;

/// What one strategy's run measured.
#[derive(Default)]
pub struct Outcome {
    /// Save latency (µs, from the task's start to the acknowledgement).
    pub saves: Option<Histogram<u64>>,
    /// Reads made.
    pub reads: u64,
    /// Reads that returned an older revision than one acknowledged before they began.
    pub violations: u64,
    /// Requests that failed, and the first error.
    pub errors: u64,
    /// The first error's text.
    pub first_error: Option<String>,
    /// The runner's worst start delay behind the schedule.
    pub max_start_delay: Duration,
}

/// Offers the schedule open-loop: every event starts at its time on its own task.
/// Returns the outcome and the last acknowledged revision per user.
pub async fn run_events(
    strategy: Arc<dyn DraftStrategy>,
    events: &[Timed],
    db: &Arc<DraftsDb>,
    users: u64,
) -> (Outcome, Arc<Vec<AtomicU64>>) {
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..users).map(|_| AtomicU64::new(0)).collect());
    let state = Arc::new(Mutex::new(Outcome {
        saves: Histogram::new_with_bounds(1, 60_000_000, 3).ok(),
        ..Outcome::default()
    }));
    let start = tokio::time::Instant::now();
    let mut tasks = FuturesUnordered::new();
    for e in events {
        tokio::time::sleep_until(start + e.at).await;
        let late = start.elapsed().saturating_sub(e.at);
        {
            let mut s = state.lock();
            s.max_start_delay = s.max_start_delay.max(late);
        }
        let (strategy, acked, state, db, event) =
            (strategy.clone(), acked.clone(), state.clone(), db.clone(), e.event);
        tasks.push(tokio::spawn(async move { one(&*strategy, event, &acked, &state, &db).await }));
        // Reap what finished, so the set stays small.
        while let Some(Some(_)) = futures::FutureExt::now_or_never(tasks.next()) {}
    }
    while tasks.next().await.is_some() {}
    let outcome = std::mem::take(&mut *state.lock());
    (outcome, acked)
}

async fn one(
    strategy: &dyn DraftStrategy,
    event: Event,
    acked: &[AtomicU64],
    state: &Mutex<Outcome>,
    db: &DraftsDb,
) {
    let began = Instant::now();
    let result = match event {
        Event::Save { user, rev, instance } => {
            match strategy.save(instance, user, Draft::new(user, rev)).await {
                Ok(()) => {
                    let us = began.elapsed().as_micros() as u64;
                    if let Some(h) = state.lock().saves.as_mut() {
                        let _ = h.record(us.max(1));
                    }
                    acked[user as usize].fetch_max(rev, Ordering::SeqCst);
                    db.note_ack(user, rev);
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        Event::Read { user, instance } => {
            let must_see = acked[user as usize].load(Ordering::SeqCst);
            match strategy.read(instance, user).await {
                Ok(d) => {
                    let mut s = state.lock();
                    s.reads += 1;
                    if d.map_or(0, |d| d.rev) < must_see {
                        s.violations += 1;
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        Event::Touch { user, instance } => strategy.touch(instance, user).await,
    };
    if let Err(e) = result {
        let mut s = state.lock();
        s.errors += 1;
        s.first_error.get_or_insert_with(|| format!("{e:#}"));
    }
}
