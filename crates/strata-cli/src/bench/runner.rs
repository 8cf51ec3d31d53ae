//! The open-loop runner: offers a [`Schedule`] to a [`Strategy`] at the scheduled
//! times, whatever the strategy's speed, and measures each request from its scheduled
//! start (so a runner that falls behind shows up as latency, not as a lower load).
//!
//! A dedicated thread walks the schedule (sleeping, then yielding for the last
//! [`SPIN`] to be on time) and spawns each request as a task on the multi-thread
//! runtime. At most `max_in_flight` requests run at once; a request due while the limit
//! is reached is dropped and counted, so a slow strategy cannot exhaust memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::db::Db;
use super::freshness::Ledger;
use super::schedule::{Op, Request, Schedule};
use super::strategy::Strategy;

/// Below this much time to wait, the dispatcher yields instead of sleeping (a sleep
/// overshoots by ~50–100 µs on Linux).
const SPIN: Duration = Duration::from_micros(100);
/// How long the dispatcher waits before the first request (time to start the thread).
const LEAD_IN: Duration = Duration::from_millis(20);
/// Upper bound of the latency histograms (values above are clamped).
const MAX_LATENCY_NS: u64 = 3_600_000_000_000;

/// How a run is carried out.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Requests allowed in flight at once; more are dropped.
    pub max_in_flight: usize,
    /// How long to wait for requests in flight after the last one was dispatched.
    pub drain_timeout: Duration,
    /// The value each write sets, by the schedule's value index.
    pub values: [&'static str; 4],
    /// `--join-at`: when instance 0 is replaced by a new one, from the first request.
    pub join_at: Option<Duration>,
}

/// What `--join-at` did.
#[derive(Debug, Clone, Copy)]
pub struct Rejoin {
    /// When the new instance was started, from the first scheduled request.
    pub at: Duration,
    /// How long it took to be ready (and to take over from the old one).
    pub ready_after: Duration,
}

/// Staleness seen by one class of reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Staleness {
    /// Reads of that class.
    pub reads: u64,
    /// Of them, reads that returned a version older than one whose write had completed
    /// before the read started.
    pub stale: u64,
    /// The largest age of a stale read (see [`crate::bench::freshness::Stale`]).
    pub max_age: Duration,
}

impl Staleness {
    fn merge(&mut self, other: &Staleness) {
        self.reads += other.reads;
        self.stale += other.stale;
        self.max_age = self.max_age.max(other.max_age);
    }
}

/// What one run measured.
pub struct Outcome {
    /// Latency of reads (UI and consumer), nanoseconds from the scheduled start (for a
    /// consumer read: from the event).
    pub read_latency: Histogram<u64>,
    /// Latency of writes (commit + invalidation), nanoseconds from the scheduled start.
    pub write_latency: Histogram<u64>,
    /// Delay from the scheduled start to the moment the request's task began to run,
    /// nanoseconds: the runner's own share of every latency (thread wake-ups, lag).
    pub start_delay: Histogram<u64>,
    /// Service time of reads: from the task's start to the answer, nanoseconds (no
    /// runner delay in it, but still any CPU contention of the machine).
    pub read_service: Histogram<u64>,
    /// Writes that completed.
    pub writes: u64,
    /// Staleness of UI-like reads.
    pub ui: Staleness,
    /// Staleness of the downstream consumer's reads (`payment`).
    pub consumer: Staleness,
    /// Requests dropped because `max_in_flight` were already running.
    pub dropped: u64,
    /// Requests that failed, and the first error.
    pub errors: u64,
    /// The first error message, if any.
    pub first_error: Option<String>,
    /// How late the dispatcher was at worst in handing out a request.
    pub max_dispatch_lag: Duration,
    /// From the first scheduled start to the last completion.
    pub elapsed: Duration,
    /// Database reads in each second of the run (the last one may be partial).
    pub db_reads_per_second: Vec<u64>,
    /// The instance replacement, when `--join-at` asked for one and it happened.
    pub rejoin: Option<Rejoin>,
}

impl Outcome {
    /// All reads' staleness together.
    pub fn all_reads(&self) -> Staleness {
        let mut s = self.ui;
        s.merge(&self.consumer);
        s
    }
}

/// State shared by the requests of a run.
struct Shared {
    strategy: Arc<dyn Strategy>,
    ledger: Ledger,
    values: [&'static str; 4],
    read_latency: Mutex<Histogram<u64>>,
    write_latency: Mutex<Histogram<u64>>,
    start_delay: Mutex<Histogram<u64>>,
    read_service: Mutex<Histogram<u64>>,
    writes: AtomicU64,
    ui: Mutex<Staleness>,
    consumer: Mutex<Staleness>,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    last_done: Mutex<Option<Instant>>,
}

fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).context("cannot create a latency histogram")
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

impl Shared {
    fn fail(&self, e: anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock();
        if first.is_none() {
            *first = Some(format!("{e:#}"));
        }
    }

    fn done(&self, at: Instant) {
        let mut last = self.last_done.lock();
        if last.is_none_or(|l| l < at) {
            *last = Some(at);
        }
    }

    /// One read of `key` on `instance`, measured from `due`.
    fn started(&self, due: Instant) -> Instant {
        let now = Instant::now();
        self.start_delay.lock().saturating_record(nanos(now.saturating_duration_since(due)));
        now
    }

    async fn read(&self, instance: u32, key: u64, due: Instant, consumer: bool) {
        let started = self.started(due);
        let start = self.ledger.start(key, started);
        let result = self.strategy.read(instance as usize, key).await;
        let end = Instant::now();
        self.done(end);
        match result {
            Ok(row) => {
                self.read_latency.lock().saturating_record(nanos(end.saturating_duration_since(due)));
                self.read_service.lock().saturating_record(nanos(end.saturating_duration_since(started)));
                let stale = self.ledger.check(start, row.version);
                let mut s = if consumer { self.consumer.lock() } else { self.ui.lock() };
                s.reads += 1;
                if let Some(stale) = stale {
                    s.stale += 1;
                    s.max_age = s.max_age.max(stale.age);
                }
            }
            Err(e) => self.fail(e.context(format!("read of row {key} on instance {instance}"))),
        }
    }

    async fn write(
        self: Arc<Self>,
        req: Request,
        value: u8,
        consumer: Option<u32>,
        due: Instant,
        permit: OwnedSemaphorePermit,
    ) {
        self.started(due);
        let text = self.values.get(usize::from(value)).copied().unwrap_or("basic");
        let result = self.strategy.write(req.instance as usize, req.key, text).await;
        let end = Instant::now();
        self.done(end);
        match result {
            Ok(version) => {
                // Commit and invalidation have returned: from now on, reads must see it.
                self.ledger.complete(req.key, version, end);
                self.writes.fetch_add(1, Ordering::Relaxed);
                self.write_latency.lock().saturating_record(nanos(end.saturating_duration_since(due)));
                if let Some(instance) = consumer {
                    // The "status changed" event, emitted only now, reaches the
                    // downstream consumer, which reads the row on another instance.
                    let shared = self.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        shared.read(instance, req.key, end, true).await;
                    });
                }
            }
            Err(e) => self.fail(e.context(format!("write of row {} on instance {}", req.key, req.instance))),
        }
    }
}

/// Offers `schedule` to `strategy` and waits for every request to finish.
pub async fn run(
    strategy: Arc<dyn Strategy>,
    schedule: &Schedule,
    config: &RunConfig,
    progress: &ProgressBar,
    db: &Arc<Db>,
) -> Result<Outcome> {
    let shared = Arc::new(Shared {
        strategy: strategy.clone(),
        ledger: Ledger::new(schedule.keys),
        values: config.values,
        read_latency: Mutex::new(histogram()?),
        write_latency: Mutex::new(histogram()?),
        start_delay: Mutex::new(histogram()?),
        read_service: Mutex::new(histogram()?),
        writes: AtomicU64::new(0),
        ui: Mutex::new(Staleness::default()),
        consumer: Mutex::new(Staleness::default()),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        last_done: Mutex::new(None),
    });
    let max_in_flight = config.max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let handle = tokio::runtime::Handle::current();
    let requests: Arc<[Request]> = schedule.requests.clone().into();
    let t0 = Instant::now() + LEAD_IN;
    // The database's read counter at t0 and at every whole second after it.
    let samples = Arc::new(Mutex::new(vec![db.counts().reads]));
    let timeline = tokio::spawn(sample_db_reads(db.clone(), t0, samples.clone()));
    let rejoin = config.join_at.map(|at| {
        let strategy = strategy.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until((t0 + at).into()).await;
            let started = Instant::now();
            strategy.rejoin(0).await.map(|()| Rejoin { at, ready_after: started.elapsed() })
        })
    });

    let dispatcher = {
        let shared = shared.clone();
        let permits = permits.clone();
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || {
            let mut dropped = 0u64;
            let mut max_lag = Duration::ZERO;
            for (i, req) in requests.iter().enumerate() {
                let due = t0 + req.at;
                wait_until(due);
                max_lag = max_lag.max(Instant::now().saturating_duration_since(due));
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    dropped += 1;
                    continue;
                };
                let shared = shared.clone();
                let req = *req;
                match req.op {
                    Op::Read => {
                        handle.spawn(async move {
                            let _permit = permit;
                            shared.read(req.instance, req.key, due, false).await;
                        });
                    }
                    Op::Write { value, consumer } => {
                        handle.spawn(shared.write(req, value, consumer, due, permit));
                    }
                }
                if i % 64 == 0 {
                    progress.set_position(i as u64);
                }
            }
            progress.set_position(requests.len() as u64);
            (dropped, max_lag)
        })
    };
    let (dropped, max_dispatch_lag) = dispatcher.await.context("the dispatcher thread panicked")?;

    // Every request holds a permit until it is done (a consumer read holds its write's).
    let all = u32::try_from(max_in_flight).unwrap_or(u32::MAX);
    match tokio::time::timeout(config.drain_timeout, permits.acquire_many(all)).await {
        Ok(Ok(_all_back)) => {}
        Ok(Err(_)) => bail!("the request limiter was closed"),
        Err(_) => bail!(
            "{} requests were still running {:?} after the last one was dispatched",
            max_in_flight - permits.available_permits(),
            config.drain_timeout
        ),
    }

    let rejoin = match rejoin {
        Some(task) => Some(task.await.context("the rejoin task panicked")?.context("rejoining instance 0")?),
        None => None,
    };
    timeline.abort();
    let mut cumulative = samples.lock().clone();
    // The partial last second, up to now.
    cumulative.push(db.counts().reads);
    let db_reads_per_second = cumulative.windows(2).map(|w| w[1].saturating_sub(w[0])).collect();
    let elapsed = shared.last_done.lock().map_or(Duration::ZERO, |l| l.saturating_duration_since(t0));
    let outcome = Outcome {
        read_latency: shared.read_latency.lock().clone(),
        write_latency: shared.write_latency.lock().clone(),
        start_delay: shared.start_delay.lock().clone(),
        read_service: shared.read_service.lock().clone(),
        writes: shared.writes.load(Ordering::SeqCst),
        ui: *shared.ui.lock(),
        consumer: *shared.consumer.lock(),
        dropped,
        errors: shared.errors.load(Ordering::SeqCst),
        first_error: shared.first_error.lock().clone(),
        max_dispatch_lag,
        elapsed,
        db_reads_per_second,
        rejoin,
    };
    Ok(outcome)
}

/// Appends the database's read counter to `samples` at every whole second after `t0`,
/// until aborted.
async fn sample_db_reads(db: Arc<Db>, t0: Instant, samples: Arc<Mutex<Vec<u64>>>) {
    for second in 1u32.. {
        tokio::time::sleep_until((t0 + Duration::from_secs(u64::from(second))).into()).await;
        samples.lock().push(db.counts().reads);
    }
}

/// Sleeps until shortly before `due`, then yields until it.
fn wait_until(due: Instant) {
    loop {
        let now = Instant::now();
        if now >= due {
            return;
        }
        let left = due - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::thread::yield_now();
        }
    }
}
