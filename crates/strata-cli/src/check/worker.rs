//! One instance of the fleet under test, run as its own OS process by the coordinator
//! (`strata check-worker`, hidden): a reader or the writer, with its own
//! `Cache<u64, Row>` on Redis, recording every operation to its own history file.
//!
//! It talks to the coordinator with lines: it prints `ready` once its cache is ready,
//! starts the load on `start`, stops it on `stop` (printing `stopped`), and on `dump`
//! prints `snapshot <json>` (what its L1 serves for every key) and exits. End of input
//! means stop and exit.
//!
//! # Where a read came from
//!
//! A read first tries `get_local` (L1 only): a hit is recorded as `l1`, exactly. On a
//! miss it calls `get_or_load` with a loader that raises a flag when it runs: if it ran,
//! the read is recorded as `db`; otherwise as `l2` (an L2 hit, or a value filled by
//! another instance while this one waited on the fleet lease, or the result of a load
//! of the same key already in flight in this process). Counter deltas of
//! `Cache::stats()` would attribute concurrent reads wrongly, so they are not used.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use sqlx::postgres::PgPool;
use strata::Cache;
use strata_sql::{CommitOutcome, InvalidationState};
use strata_testkit::{CacheSnapshot, Event, Op, Recorder, Tier, monotonic_ns};
use tokio::io::{AsyncBufReadExt, BufReader, Lines, Stdin};
use tokio::sync::{Semaphore, watch};

use super::setup::{self, DB_TIMEOUT, Level, Row, Timing};
use crate::secret::{self, DATABASE_URL_ENV, REDIS_URL_ENV, SecretUrl};

/// Reads in flight per reader at most; ticks beyond are skipped (counted).
const MAX_IN_FLIGHT: u32 = 64;

/// What a worker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Reads random keys through `get_or_load`.
    Reader,
    /// Commits versioned rows and invalidates them.
    Writer,
}

/// The hidden `strata check-worker` subcommand (started by `strata check`). The Redis
/// and database URLs, which may hold passwords, come from the environment variables
/// [`REDIS_URL_ENV`] and [`DATABASE_URL_ENV`], not from the command line.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Reader or writer.
    #[arg(long, value_enum)]
    pub role: Role,
    /// The process name in the history.
    #[arg(long)]
    pub name: String,
    /// The consistency level.
    #[arg(long, value_enum)]
    pub level: Level,
    /// Key prefix of the run in Redis.
    #[arg(long)]
    pub prefix: String,
    /// The Redis URL lists a Cluster's nodes (comma-separated).
    #[arg(long)]
    pub cluster: bool,
    /// Reach Postgres through this `host:port` (the fault proxy).
    #[arg(long)]
    pub db_via: Option<String>,
    /// Keys 1..=N.
    #[arg(long)]
    pub keys: u64,
    /// Operations per second.
    #[arg(long)]
    pub rate: u32,
    /// Where to write this process's history.
    #[arg(long)]
    pub history: PathBuf,
    /// `max_stale` in milliseconds.
    #[arg(long)]
    pub max_stale_ms: u64,
    /// `heartbeat_interval` in milliseconds.
    #[arg(long)]
    pub heartbeat_ms: u64,
    /// Seed of the key choice.
    #[arg(long)]
    pub seed: u64,
}

/// The URL in the environment variable `name`.
fn url_from_env(name: &str) -> Result<SecretUrl> {
    let url = std::env::var(name)
        .with_context(|| format!("{name} is not set: check-worker is started by strata check"))?;
    Ok(SecretUrl::new(url))
}

/// `event` with the secrets of the URLs hidden from its detail (an error message).
fn scrubbed(mut event: Event) -> Event {
    event.detail = secret::scrub(&event.detail);
    event
}

/// Prints one protocol line to the coordinator.
fn say(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).context("cannot write to the coordinator")
}

/// The coordinator's next command; empty at end of input.
async fn next_line(input: &mut Lines<BufReader<Stdin>>) -> String {
    input.next_line().await.ok().flatten().unwrap_or_default().trim().to_owned()
}

/// Runs the worker until the coordinator says `dump` (or goes away).
pub async fn run(args: WorkerArgs) -> Result<()> {
    let timing = Timing {
        max_stale: Duration::from_millis(args.max_stale_ms),
        heartbeat: Duration::from_millis(args.heartbeat_ms),
    };
    let recorder = Arc::new(
        Recorder::create(&args.history)
            .with_context(|| format!("cannot create the history {}", args.history.display()))?,
    );
    let pool_size = match args.role {
        Role::Reader => 8,
        Role::Writer => 2,
    };
    let (redis, database) = (url_from_env(REDIS_URL_ENV)?, url_from_env(DATABASE_URL_ENV)?);
    let pool = setup::connect(&database, args.db_via.as_deref(), pool_size).await?;
    let ring = std::env::var(setup::RING_URLS_ENV).ok().map(SecretUrl::new);
    let cache =
        setup::build_cache(&redis, args.cluster, ring.as_ref(), &args.prefix, args.level, timing).await?;
    tokio::time::timeout(Duration::from_secs(30), cache.ready())
        .await
        .map_err(|_| anyhow!("the cache was not ready within 30 s"))?;
    say("ready")?;

    let mut input = BufReader::new(tokio::io::stdin()).lines();
    let first = next_line(&mut input).await;
    if first != "start" {
        bail!("expected start, got {first:?}");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let load = {
        let (args, cache, pool, recorder) = (args.clone(), cache.clone(), pool.clone(), recorder.clone());
        tokio::spawn(async move {
            match args.role {
                Role::Reader => read_load(&args, cache, pool, recorder, stop_rx).await,
                Role::Writer => write_load(&args, cache, pool, recorder, stop_rx).await,
            }
        })
    };
    let command = next_line(&mut input).await;
    let _ = stop_tx.send(true);
    let skipped = load.await.context("the load task failed")?;
    recorder.flush().context("cannot write the history")?;
    // The reloads this instance installed from the others' pushes, for the progress log.
    say(&format!("stopped {skipped} {}", cache.stats().reloads_installed))?;
    if command != "stop" {
        return Ok(());
    }

    if next_line(&mut input).await != "dump" {
        return Ok(());
    }
    let entries =
        (1..=args.keys).filter_map(|k| cache.get_local(&k).map(|row| (k, Some(row.version)))).collect();
    let snapshot = CacheSnapshot { source: format!("{} l1", args.name), entries };
    say(&format!("snapshot {}", serde_json::to_string(&snapshot)?))?;
    cache.shutdown().await;
    pool.close().await;
    Ok(())
}

/// Reads at `rate` per second until stopped; returns the ticks skipped because too
/// many reads were in flight.
async fn read_load(
    args: &WorkerArgs,
    cache: Cache<u64, Row>,
    pool: PgPool,
    recorder: Arc<Recorder>,
    mut stop: watch::Receiver<bool>,
) -> u64 {
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / args.rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize));
    let name: Arc<str> = Arc::from(args.name.as_str());
    let mut skipped = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        let key = setup::pick_key(&mut rng, args.keys);
        let (cache, pool, recorder, name) = (cache.clone(), pool.clone(), recorder.clone(), name.clone());
        tokio::spawn(async move {
            let event = read_one(&name, key, &cache, pool).await;
            // A history line that cannot be written is a lost read; the checker only
            // sees fewer reads.
            let _ = recorder.record(&scrubbed(event));
            drop(permit);
        });
    }
    // Let the reads in flight finish.
    let _ = in_flight.acquire_many(MAX_IN_FLIGHT).await;
    skipped
}

/// One read, recorded with the tier it came from.
async fn read_one(name: &str, key: u64, cache: &Cache<u64, Row>, pool: PgPool) -> Event {
    let invoke = monotonic_ns();
    if let Some(row) = cache.get_local(&key) {
        return Event::read(name, key, invoke, monotonic_ns(), row.version, Tier::L1);
    }
    let loaded = Arc::new(AtomicBool::new(false));
    let ran = loaded.clone();
    let result = cache
        .get_or_load(&key, move || async move {
            ran.store(true, Ordering::SeqCst);
            match tokio::time::timeout(DB_TIMEOUT, setup::select(&pool, key)).await {
                Ok(r) => r.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
                Err(_) => Err(format!("SELECT took more than {DB_TIMEOUT:?}").into()),
            }
        })
        .await;
    let done = monotonic_ns();
    let tier = if loaded.load(Ordering::SeqCst) { Tier::Db } else { Tier::L2 };
    match result {
        Ok(Some(row)) => Event::read(name, key, invoke, done, row.version, tier),
        Ok(None) => failed_read(name, key, invoke, done, "row not found".into()),
        Err(e) => failed_read(name, key, invoke, done, e.to_string()),
    }
}

fn failed_read(name: &str, key: u64, invoke: u64, done: u64, detail: String) -> Event {
    Event {
        process: name.to_owned(),
        key,
        op: Op::Read,
        invoke_ns: invoke,
        return_ns: done,
        commit_ns: None,
        version: None,
        tier: None,
        ok: false,
        detail,
    }
}

/// Writes at `rate` per second, one at a time, until stopped; returns the ticks
/// skipped because a write was still running.
async fn write_load(
    args: &WorkerArgs,
    cache: Cache<u64, Row>,
    pool: PgPool,
    recorder: Arc<Recorder>,
    mut stop: watch::Receiver<bool>,
) -> u64 {
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let lease = Timing {
        max_stale: Duration::from_millis(args.max_stale_ms),
        heartbeat: Duration::from_millis(args.heartbeat_ms),
    }
    .membership_lease();
    let period = Duration::from_secs(1) / args.rate.max(1);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut skipped = 0;
    let mut last = tokio::time::Instant::now();
    let mut retries = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let now = tokio::time::Instant::now();
        skipped += (now.duration_since(last).as_nanos() / period.as_nanos().max(1)).saturating_sub(1) as u64;
        last = now;
        let key = setup::pick_key(&mut rng, args.keys);
        let written = write_one(&args.name, key, &cache, &pool, lease).await;
        for event in &written.events {
            let _ = recorder.record(&scrubbed(event.clone()));
        }
        if let Some(commit_ns) = written.buffered_since {
            let (cache, recorder, name) = (cache.clone(), recorder.clone(), args.name.clone());
            let version = written.events.first().and_then(|e| e.version);
            retries.spawn(async move {
                if let Some(applied) = buffer_drained(&cache).await {
                    let event = Event::invalidation_retried(&name, key, version, commit_ns, applied);
                    let _ = recorder.record(&event);
                }
            });
        }
    }
    // The buffered invalidations of the last writes, retried after the load stopped.
    let _ = tokio::time::timeout(RETRY_WATCH, async { while retries.join_next().await.is_some() {} }).await;
    skipped
}

/// How long the writer watches, after the load, for its buffered invalidations to be
/// applied.
const RETRY_WATCH: Duration = Duration::from_secs(10);

/// Waits until the cache's retry buffer is empty (every invalidation buffered so far,
/// including one being retried, has reached L2 and the backplane) and returns when it
/// saw that; `None` if it did not within [`RETRY_WATCH`].
async fn buffer_drained(cache: &Cache<u64, Row>) -> Option<u64> {
    let deadline = tokio::time::Instant::now() + RETRY_WATCH;
    while tokio::time::Instant::now() < deadline {
        if cache.pending_invalidations() == 0 {
            return Some(monotonic_ns());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

/// What [`write_one`] recorded, and whether the write's invalidation was buffered.
struct Written {
    /// The write (first), and its invalidation.
    events: Vec<Event>,
    /// When the write committed, if its invalidation was buffered for the retry.
    buffered_since: Option<u64>,
}

/// How long the writer waits for `commit()` (the COMMIT plus the invalidation, which at
/// the Strong level may wait up to two membership leases for acknowledgements).
fn commit_budget(lease: Duration) -> Duration {
    DB_TIMEOUT + lease * 2 + Duration::from_secs(1)
}

/// One write through strata-sql's transaction helper: `UPDATE … SET version = version
/// + 1 … RETURNING version` (bounded by [`DB_TIMEOUT`]), `tx.invalidate(cache, key)`,
/// `tx.commit()` (which commits, then invalidates, and invalidates too when the
/// outcome of the COMMIT is unknown; it takes the write lock before COMMIT, and at the
/// Strong level rolls back when it cannot). Returns the events recording it: the
/// write, and an `invalidation_applied` event spanning the `commit()` call.
///
/// A write is `ok` when its COMMIT succeeded, whatever became of its invalidation; it
/// carries the time the COMMIT was acknowledged (`commit_ns`), from which the checker
/// judges it. An invalidation that was buffered is named in the write's detail and
/// its `invalidation_applied` event is not ok. One that certainly rolled back is
/// recorded as `write_rolled_back`. If `commit()` does not return within its budget,
/// the key is invalidated by hand, since the COMMIT may have landed (its outcome is
/// unknown: `ok: false`).
async fn write_one(name: &str, key: u64, cache: &Cache<u64, Row>, pool: &PgPool, lease: Duration) -> Written {
    let invoke = monotonic_ns();
    let begun = tokio::time::timeout(DB_TIMEOUT, async {
        let mut tx = strata_sql::begin(pool).await?;
        let v: i64 = sqlx::query_scalar(
            "UPDATE strata_check SET version = version + 1, payload = $2 WHERE id = $1 RETURNING version",
        )
        .bind(key as i64)
        .bind(format!("row {key} written by {name}"))
        .fetch_one(&mut *tx)
        .await?;
        Ok::<_, sqlx::Error>((tx, v as u64))
    })
    .await;
    let rolled_back = |detail: String| Written {
        events: vec![Event::write_rolled_back(name, key, invoke, monotonic_ns()).with_detail(detail)],
        buffered_since: None,
    };
    let (mut tx, version) = match begun {
        Ok(Ok(started)) => started,
        // Nothing was committed (no COMMIT was sent; dropping the transaction rolls it
        // back).
        Ok(Err(e)) => return rolled_back(format!("update failed: {e}")),
        Err(_) => return rolled_back(format!("update took more than {DB_TIMEOUT:?}")),
    };
    tx.invalidate(cache, &key);
    let committing = monotonic_ns();
    let outcome = tokio::time::timeout(commit_budget(lease), tx.commit()).await;
    let mut commit_ns = None;
    let mut buffered = false;
    let (version, ok, invalidated, detail) = match outcome {
        Ok(Ok(report)) => {
            // `Instant` is CLOCK_MONOTONIC too: the commit's age, taken from now.
            commit_ns = Some(monotonic_ns().saturating_sub(duration_ns(report.committed_at.elapsed())));
            let problems: Vec<String> = report
                .failed_invalidations()
                .map(|i| {
                    buffered |= i.state == InvalidationState::Buffered;
                    let error = i.error.as_ref().map_or(String::new(), |e| format!(": {e}"));
                    format!("invalidation {:?}{error}", i.state)
                })
                .collect();
            (Some(version), true, problems.is_empty(), problems.join("; "))
        }
        Err(_) => {
            let by_hand = cache.invalidate(&key).await;
            let detail = match &by_hand {
                Ok(()) => "commit() did not return in time; invalidated by hand".to_owned(),
                Err(e) => format!("commit() did not return in time; invalidation by hand failed: {e}"),
            };
            (Some(version), false, by_hand.is_ok(), detail)
        }
        Ok(Err(e)) => match e.outcome() {
            CommitOutcome::RolledBack => (None, false, true, e.to_string()),
            CommitOutcome::Unknown => {
                (Some(version), false, e.invalidations().iter().all(|i| i.is_done()), e.to_string())
            }
        },
    };
    let done = monotonic_ns();
    // Only a certain rollback leaves the write without a version.
    let mut write = match version {
        None => Event::write_rolled_back(name, key, invoke, done),
        Some(_) => Event::write(name, key, invoke, done, version, ok),
    }
    .with_detail(detail.clone());
    write.commit_ns = commit_ns;
    let invalidation = Event {
        process: name.to_owned(),
        key,
        op: Op::InvalidationApplied,
        invoke_ns: committing,
        return_ns: done,
        commit_ns: None,
        version,
        tier: None,
        ok: invalidated,
        detail: if invalidated { String::new() } else { detail },
    };
    Written { events: vec![write, invalidation], buffered_since: commit_ns.filter(|_| buffered) }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
