//! The open-loop runner: offers a [`Schedule`] to a [`Strategy`] at the scheduled
//! times, whatever the strategy's speed, and measures each request from its scheduled
//! start (so a runner that falls behind shows up as latency, not as a lower load).
//!
//! A dedicated thread walks the schedule (sleeping until each request is due, never
//! spinning: see `wait_until`) and spawns each request as a task on the multi-thread
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
use super::events::{Event, EventKind, Happened};
use super::freshness::Ledger;
use super::schedule::{Op, Request, Schedule};
use super::strategy::Strategy;

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
    /// What to do to the fleet during the run (`--join-at` and the like).
    pub events: Vec<Event>,
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
    /// Shared-tier and backplane calls in each second of the run.
    pub tier_ops_per_second: Vec<u64>,
    /// Read latency p99 of the requests scheduled in each second, microseconds (0 for
    /// a second without reads).
    pub read_p99_us_per_second: Vec<f64>,
    /// When the hottest key was read from the database, from the first request.
    pub hot_loads: Vec<Duration>,
    /// The hottest key's writes: (start, return), from the first request.
    pub hot_writes: Vec<(Duration, Duration)>,
    /// The events carried out, in the order they were asked for.
    pub events: Vec<Happened>,
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
    /// A read's latencies, under one lock (taken once per read).
    reads: Mutex<ReadLatencies>,
    write_latency: Mutex<Histogram<u64>>,
    start_delay: Mutex<Histogram<u64>>,
    writes: AtomicU64,
    ui: Mutex<Staleness>,
    consumer: Mutex<Staleness>,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    last_done: Mutex<Option<Instant>>,
    /// The run's first scheduled start.
    t0: Instant,
    hottest: u64,
    hot_writes: Mutex<Vec<(Duration, Duration)>>,
}

/// What each successful read records.
struct ReadLatencies {
    /// From the scheduled start.
    latency: Histogram<u64>,
    /// From the task's start.
    service: Histogram<u64>,
    /// From the scheduled start, by the second it was scheduled in.
    per_second: Vec<Histogram<u64>>,
}

impl ReadLatencies {
    fn record(&mut self, second: usize, latency: u64, service: u64) {
        self.latency.saturating_record(latency);
        self.service.saturating_record(service);
        while self.per_second.len() <= second {
            // Two significant digits: a per-second p99 needs no more, and it keeps a
            // long run's histograms small.
            match Histogram::new_with_bounds(1, MAX_LATENCY_NS, 2) {
                Ok(h) => self.per_second.push(h),
                Err(_) => return,
            }
        }
        self.per_second[second].saturating_record(latency);
    }
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
                let second = due.saturating_duration_since(self.t0).as_secs() as usize;
                let (latency, service) = (
                    nanos(end.saturating_duration_since(due)),
                    nanos(end.saturating_duration_since(started)),
                );
                self.reads.lock().record(second, latency, service);
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
        let started = self.started(due);
        let text = self.values.get(usize::from(value)).copied().unwrap_or("basic");
        let result = self.strategy.write(req.instance as usize, req.key, text).await;
        let end = Instant::now();
        self.done(end);
        match result {
            Ok(version) => {
                if req.key == self.hottest {
                    let since = |t: Instant| t.saturating_duration_since(self.t0);
                    self.hot_writes.lock().push((since(started), since(end)));
                }
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
    let t0 = Instant::now() + LEAD_IN;
    let shared = Arc::new(Shared {
        strategy: strategy.clone(),
        ledger: Ledger::new(schedule.keys),
        values: config.values,
        reads: Mutex::new(ReadLatencies {
            latency: histogram()?,
            service: histogram()?,
            per_second: Vec::new(),
        }),
        write_latency: Mutex::new(histogram()?),
        start_delay: Mutex::new(histogram()?),
        writes: AtomicU64::new(0),
        ui: Mutex::new(Staleness::default()),
        consumer: Mutex::new(Staleness::default()),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        last_done: Mutex::new(None),
        t0,
        hottest: schedule.hottest_key(),
        hot_writes: Mutex::new(Vec::new()),
    });
    let max_in_flight = config.max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let handle = tokio::runtime::Handle::current();
    let requests: Arc<[Request]> = schedule.requests.clone().into();
    // The database's read counter and the tier's calls at t0 and at every whole second
    // after it.
    let samples = Arc::new(Mutex::new(vec![(db.counts().reads, strategy.tier_counts().remote_ops)]));
    let timeline = tokio::spawn(sample_counters(db.clone(), strategy.clone(), t0, samples.clone()));
    let events: Vec<_> =
        config.events.iter().map(|e| tokio::spawn(carry_out(strategy.clone(), *e, t0))).collect();

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

    let mut happened = Vec::with_capacity(events.len());
    for task in events {
        happened.push(task.await.context("an event's task panicked")??);
    }
    timeline.abort();
    let mut cumulative = samples.lock().clone();
    // The partial last second, up to now.
    cumulative.push((db.counts().reads, strategy.tier_counts().remote_ops));
    let db_reads_per_second = cumulative.windows(2).map(|w| w[1].0.saturating_sub(w[0].0)).collect();
    let tier_ops_per_second = cumulative.windows(2).map(|w| w[1].1.saturating_sub(w[0].1)).collect();
    let reads = shared.reads.lock();
    let read_p99_us_per_second = reads
        .per_second
        .iter()
        .map(|h| if h.is_empty() { 0.0 } else { h.value_at_quantile(0.99) as f64 / 1e3 })
        .collect();
    let hot_loads = db.hottest_reads_since(t0).into_iter().map(|t| t.saturating_duration_since(t0)).collect();
    let mut hot_writes = shared.hot_writes.lock().clone();
    hot_writes.sort();
    let elapsed = shared.last_done.lock().map_or(Duration::ZERO, |l| l.saturating_duration_since(t0));
    let outcome = Outcome {
        read_latency: reads.latency.clone(),
        write_latency: shared.write_latency.lock().clone(),
        start_delay: shared.start_delay.lock().clone(),
        read_service: reads.service.clone(),
        writes: shared.writes.load(Ordering::SeqCst),
        ui: *shared.ui.lock(),
        consumer: *shared.consumer.lock(),
        dropped,
        errors: shared.errors.load(Ordering::SeqCst),
        first_error: shared.first_error.lock().clone(),
        max_dispatch_lag,
        elapsed,
        db_reads_per_second,
        tier_ops_per_second,
        read_p99_us_per_second,
        hot_loads,
        hot_writes,
        events: happened,
    };
    Ok(outcome)
}

/// Appends the database's read counter and the strategy's tier calls to `samples` at
/// every whole second after `t0`, until aborted.
async fn sample_counters(
    db: Arc<Db>,
    strategy: Arc<dyn Strategy>,
    t0: Instant,
    samples: Arc<Mutex<Vec<(u64, u64)>>>,
) {
    for second in 1u32.. {
        tokio::time::sleep_until((t0 + Duration::from_secs(u64::from(second))).into()).await;
        let sample = (db.counts().reads, strategy.tier_counts().remote_ops);
        samples.lock().push(sample);
    }
}

/// Carries out `event` at its time.
async fn carry_out(strategy: Arc<dyn Strategy>, event: Event, t0: Instant) -> Result<Happened> {
    tokio::time::sleep_until((t0 + event.at).into()).await;
    let started = Instant::now();
    let applied = match event.kind {
        EventKind::ColdJoin => strategy.rejoin(0, false).await.map(|()| true),
        EventKind::WarmJoin => strategy.rejoin(WARM_JOINER, true).await.map(|()| true),
        EventKind::BulkInvalidation => strategy.invalidate_all().await,
    }
    .with_context(|| format!("{} at {:?}", event.kind.label(), event.at))?;
    Ok(Happened { kind: event.kind, at: event.at, took: started.elapsed(), applied })
}

/// The instance a warm join replaces (instance 0 is the cold join's; a fleet of one
/// has only it).
const WARM_JOINER: usize = 1;

/// Sleeps until `due`, then returns: the requests due meanwhile are dispatched at once,
/// one behind the other. A sleep overshoots by ~50–100 µs on Linux (the timer slack),
/// which the start delay reports. Yielding in a loop for the last 100 µs instead, as
/// this runner did, kept a core busy in the kernel (`sched_yield` every few
/// microseconds) whenever requests came faster than one per 100 µs: at 20,000/s one of
/// this machine's two cores, taken from the strategies under test.
fn wait_until(due: Instant) {
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}
