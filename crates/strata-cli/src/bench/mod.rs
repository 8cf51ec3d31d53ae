//! `strata bench`: the seed stories as scenarios, several caching strategies run one
//! after another against the same database contents and the same seeded schedule.
//!
//! * [`scenario`] names the seed stories;
//! * [`schedule`] precomputes every request from the seed;
//! * [`db`] is the table the app reads and writes (SQLite by default, or Postgres);
//! * [`strategy`] holds the strategies, each a fleet of instances behind one trait;
//! * [`runner`] offers the schedule open-loop and measures latency and staleness
//!   (with [`freshness`]);
//! * [`report`] turns the measurements into the table and the JSON, [`plot`] into an SVG.

pub mod db;
pub mod drafts;
pub mod events;
pub mod freshness;
pub mod lag;
pub mod plot;
mod preflight;
pub mod redis_nodes;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod schedule;
pub mod steady;
pub mod strategy;
pub mod timeline;
pub mod timeline_plot;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use self::db::Db;
use self::events::{Event, EventKind};
use self::redis_nodes::NodesReport;
use self::report::{BenchReport, StrategyReport};
use self::runner::RunConfig;
use self::schedule::{Schedule, ScheduleParams};
use self::strategy::{FleetConfig, StrategyKind};
use self::timeline::Timeline;
use crate::secret::{self, SecretUrl};

// The children take `Scenario` from its own file, never from here, so that this
// module (which imports all of them) stays out of their import graph.
pub use self::scenario::Scenario;

const ABOUT: &str = "Run a seed scenario against several caching strategies, side by side";

/// `strata bench --help`: what runs, in which order, against what.
pub const LONG_ABOUT: &str = "\
Run a seed scenario against several caching strategies, one after another, against the
same database contents (reset between strategies) and the same seeded request schedule.

Strategies (in run order):
  none          every read goes to the database
  local-ttl     per-instance moka cache, 5 s TTL, no invalidation
  redis-global  cache-aside on one Redis: GET per read, SET on miss, DEL on write (--redis only)
  near-pubsub   per-instance moka cache (24 h TTL) + invalidation broadcast (tokio broadcast;
                Redis Pub/Sub with --redis), no fill guards, no gap repair
  strata        strata::Cache per instance, InProcessTier + InProcessBackplane
                (RedisTier + RedisStreamBackplane with --redis); 24 h TTL; payment uses
                Consistency::Strong
  multi-tier    the published crate multi-tier-cache 0.6: per instance a CacheManager with
                invalidation (moka L1, Redis L2, Pub/Sub), get_or_compute_typed on read,
                invalidate after the DB write; 24 h TTL (--redis only)

Every instance is a separate cache handle with its own local cache. A write runs
UPDATE ... SET ..., version = version + 1 ... RETURNING version on the database, then the
strategy's invalidation, on the instance the schedule names. The load is open-loop: Poisson
arrivals at --rate over the whole fleet, Zipf-distributed keys (key 0 hottest, the same
distribution for reads and writes), a uniformly random instance per request.";

/// `strata bench --help`: run times and what every column means.
pub const AFTER_LONG_HELP: &str = "\
Defaults: each strategy runs a cold window (--duration, every cache empty), a warm-up
(--steady-after seconds of traffic, default twice --duration, replayed 8x faster, 2x for
payment, and not counted; a cache whose copies outlive the run ten times first reads every
key on every instance, as a fleet running for hours has; one whose copies live at most
twice the window ends it with its TTL of traffic at the real rate, so that copies' ages
are spread as in a running fleet), then a steady window as long as the cold one; the 4
embedded strategies take about 2.5 min on 2 cores; with --redis, 6 strategies, about 4 min.
The main table is the cold start; the steady table after it gives per strategy DB reads/s,
x bound (the compulsory reads of a cache that served everything before), shared-tier ops
per request, hit %, stale and failed requests, DB reads/s in the first and last thirds of
the window and whether they agree (within 10 %, or within twice their noise, Poisson's
scaled by the per-second counts' dispersion where reads come in clumps:
'steady', else DRIFTING); the JSON has the same as each strategy's `cold` and `steady`
objects (with Redis CPU seconds and commands/s under --redis).

Metrics (per strategy):
  DB reads/s, DB writes/s   statements run on the database, divided by --duration
  x bound                   DB reads / compulsory DB reads (1.00 = a perfect fleet-shared cache)
  Redis ops/s               commands sent to Redis, counted client-side (GET/SET/DEL/PUBLISH,
                            and strata's tier and backplane calls); for the embedded strata,
                            InProcessTier::ops() + in-process backplane publishes (heartbeats
                            included); for near-pubsub without --redis, its broadcasts
  hit %, L1 %, L2 %         reads answered by the instance's own cache (L1) or by the shared
                            tier (L2), as a share of all reads; reads that waited for another
                            read's load count as neither
  p50/p99/p99.9             read latency from the scheduled start (from the event, for the
                            payment consumer), so lag of the runner is included; the table's
                            last line gives the runner's own start delay, and the JSON has
                            service_p50_us/service_p99_us (task start to answer) without it
  stale, max stale          reads that returned a version older than one whose write had
                            completed (DB commit + invalidation returned) before the read
                            started; the age is the time from the completion of the oldest
                            newer version to the start of the read
  consumer stale            payment: stale reads of the downstream consumer alone
  hot loads/reload          DB reads of the hottest key (key 0) divided by the number of
                            times a copy of it had to be (re)loaded by a perfect fleet-shared
                            cache with the strategy's TTL: 1 (first read) + TTL expiries
                            during the run (duration / TTL, rounded up, minus 1) + writes of
                            the key (for strategies that invalidate). 1.0 is ideal; N
                            instances reloading independently give about N; '-' for none
  compulsory DB reads       what a perfect fleet-shared cache must load: first reads of each
                            distinct key + writes followed by a later read of the same key
  dropped                   requests not started because --max-in-flight were running
  failed                    requests that returned an error (the run then exits non-zero)
  propagation lag           near-pubsub and strata (footer, JSON propagation_lag and the
                            windows' propagation_lag_p99_us): from a write's return on its
                            instance to the moment every other instance dropped its copy
                            (0 when they all had before it returned, as at Strong)

Events and the timeline. --join-at SECS replaces instance 0 by a new one with an empty
local cache (strata: a new Cache, served once ready; --warm-up makes it warm up), --warm-join-at
SECS replaces instance 1 by one that warms up before it serves (strata's WarmUp; the others
have none and join cold), --bulk-invalidate-at SECS invalidates everything cached (strata:
invalidate_all, a namespace bump; near-pubsub: a clear broadcast; redis-global: every key
deleted; multi-tier: invalidate_pattern; local-ttl and none cannot). With any of them each
strategy runs a third window as long as the others after the steady one (another seed), and
the events happen in it, SECS from its start: a fleet that has been running, and neither
measured window disturbed (with --steady-after 0 they happen in the cold window). --ttl SECS
sets the TTL of the invalidated caches (default 24 h; local-ttl keeps its 5 s) so that the
hottest key expires inside the window. The footer gives per strategy and event: the time it
took effect (a join: the new instance ready), the mean DB reads/s over the 3 s before, the
peak DB reads/s in that second and the 2 after, the DB reads in those 3 s beyond the rate
before, and the hottest key's DB loads from the event to 3 s after it; and the hottest key's
expiries: a reload (its DB reads no more than 250 ms apart) that follows no write of it
(for strategies that invalidate) and no event within 250 ms, with its DB loads (1 is one
fleet-shared copy; N instances expiring on their own give N). The JSON has a timeline per
strategy (window, per-second db_reads, hot_key_db_reads, shared_tier_ops, read_p99_us,
events, hot_key_reloads with their causes, hot_key_expiries) and join (the first join);
--timeline FILE draws the per-second series of every strategy over a shared time axis,
the events as dashed lines and the expiries as dots. Without events, the timeline is the
steady window's.

--scenario drafts (write-heavy: draft autosave) has its own schedule and strategies.
--users users (default 1000) each save a draft (about 200 bytes) every 1-2 s through their
own instance while active (a tenth of them all run, the others go idle somewhere after 30 %
of it), send a heartbeat every 5 s, and open the draft on another instance: 50-300 ms after
one save in ten, and once more after going idle. Strategies, on the same schedule:
  write-through       every save is a guarded UPSERT, then Cache::invalidate
  naive-write-behind  the seed's design: SET with a 30 s sliding TTL + SADD to a dirty set;
                      each instance's scheduler (staggered, so the fleet scans once per
                      --flush-delay) GETs each dirty draft, UPSERTs it unguarded, SREMs it
  strata              strata::write_behind: save = durable queue + invalidation; flushers
                      claim due keys and write them in batches with a sequence guard
Reads go through a strata cache (write-through, strata) or GET then the DB (naive). After the
run each strategy drains, then every user's row is compared with the last save the user was
told succeeded. Reported: DB rows written/s and write statements/s (a batch is one), save
p50/p99, read-your-writes violations (a read on another instance returning an older revision
than one acknowledged before the read began), lost saves, flush lag p50/p99 (acknowledgement
to row), Redis commands/s (--redis). The JSON's strategies carry db_writes, db_writes_per_s,
save_p99_us, read_your_writes_violations, lost_saves, flush_lag_p99_ms and more; --plot draws
rows written per second. DB writes per key cannot drop below one per --flush-delay while a
user keeps saving: with saves every 1.5 s on average and a 10 s delay, about 6.7x fewer rows
than write-through (and ~100x fewer statements, batched); longer delays save more.

CI smoke run:
  strata bench --duration 2 --instances 3 --rate 300 --keys 200 --json out.json
  strata bench --scenario drafts --duration 3 --instances 3 --users 100 --flush-delay 1";

/// Arguments of `strata bench`.
#[derive(Debug, Clone, Args)]
#[command(about = ABOUT, long_about = LONG_ABOUT, after_long_help = AFTER_LONG_HELP)]
pub struct BenchArgs {
    /// The seed story to run.
    #[arg(long, value_enum, default_value = "billsetting")]
    pub scenario: Scenario,
    /// Seconds of load per strategy.
    #[arg(long, default_value_t = 15.0, value_name = "SECS")]
    pub duration: f64,
    /// App instances in the fleet (each has its own local cache).
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub instances: u32,
    /// Requests per second over the whole fleet (Poisson arrivals).
    #[arg(long, default_value_t = 2000.0, value_name = "REQ_PER_S")]
    pub rate: f64,
    /// Rows in the table (= distinct keys).
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub keys: u64,
    /// Zipf exponent of key popularity (0 = uniform).
    #[arg(long, default_value_t = 1.0, value_name = "S")]
    pub zipf: f64,
    /// Fraction of requests that are writes [default: 0.002 for billsetting, 0.05 for payment].
    #[arg(long, value_name = "F")]
    pub write_ratio: Option<f64>,
    /// Seed of the request schedule (and of strata's random choices).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub seed: u64,
    /// Redis URL: adds redis-global, runs near-pubsub on Redis Pub/Sub and strata on
    /// RedisTier + RedisStreamBackplane.
    #[arg(long, value_name = "URL")]
    pub redis: Option<SecretUrl>,
    /// Database URL (postgres://… or sqlite:…) [default: a SQLite file in a temp dir].
    #[arg(long, value_name = "URL")]
    pub database: Option<SecretUrl>,
    /// Only these strategies (comma-separated) [default: all that can run].
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST")]
    pub strategies: Option<Vec<StrategyKind>>,
    /// Requests allowed in flight at once; requests due beyond it are dropped and counted.
    #[arg(long, default_value_t = 20_000, value_name = "N")]
    pub max_in_flight: usize,
    /// Writes the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Writes an SVG chart comparing the strategies to FILE.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Writes an SVG timeline of the measured window to FILE: DB reads/s, the hottest
    /// key's DB loads, shared-tier ops/s and read p99 per second for every strategy,
    /// with the events marked.
    #[arg(long, value_name = "FILE")]
    pub timeline: Option<PathBuf>,
    /// Replaces instance 0 by a new one (empty local cache) SECS into the events window
    /// (a third one, after the steady window; the cold one with --steady-after 0), as a
    /// restart or scale-out does; the footer gives what it cost per strategy.
    #[arg(long, value_name = "SECS")]
    pub join_at: Option<f64>,
    /// Replaces instance 1 by a new one SECS into the events window that warms up
    /// before it serves (strata's `WarmUp`; the other strategies join cold).
    #[arg(long, value_name = "SECS")]
    pub warm_join_at: Option<f64>,
    /// Invalidates everything cached SECS into the events window (strata:
    /// `invalidate_all`).
    #[arg(long, value_name = "SECS")]
    pub bulk_invalidate_at: Option<f64>,
    /// TTL of the invalidated caches (near-pubsub, strata, redis-global, multi-tier)
    /// [default: 24 h], e.g. 5 to see the hottest key expire inside the window.
    #[arg(long, value_name = "SECS")]
    pub ttl: Option<f64>,
    /// strata only: the timeout of each L2 call that hears nothing back, milliseconds
    /// [default: the library's, 50]; each such timeout counts as an outage.
    #[arg(long, value_name = "MS")]
    pub l2_timeout: Option<u64>,
    /// strata only: how long an L2 call may run while Redis keeps answering other
    /// calls (busy, not stalled), milliseconds [default: the library's, 10 ×
    /// --l2-timeout]; equal to --l2-timeout turns that wait off.
    #[arg(long, value_name = "MS")]
    pub l2_busy_timeout: Option<u64>,
    /// strata only: rank hot keys and preload them when an instance joins
    /// (`CacheBuilder::warm_up`), so that `--join-at` shows a warm join.
    #[arg(long)]
    pub warm_up: bool,
    /// Standalone Redis servers (comma-separated URLs) used as one sharded ring:
    /// strata runs a `ShardedTier` over them (gutter on), redis-global routes each key
    /// to the same server; the stream backplane lives on the first. Excludes --redis.
    #[arg(long, value_delimiter = ',', value_name = "URLS", conflicts_with = "redis")]
    pub redis_ring: Option<Vec<SecretUrl>>,
    /// A Redis Cluster (comma-separated node URLs; give every master, whose counters
    /// the report reads): strata runs a `ShardedTier` of 64 virtual shards spread over
    /// the slots, redis-global a plain cluster client. Excludes --redis and --redis-ring.
    #[arg(long, value_delimiter = ',', value_name = "URLS", conflicts_with_all = ["redis", "redis_ring"])]
    pub redis_cluster: Option<Vec<SecretUrl>>,
    /// strata with --redis or over a ring: put the backplane stream on this server
    /// instead of the tier's (the ring's first), e.g. one without `maxmemory` beside a
    /// tier server that evicts, the layout the eviction docs recommend; its commands
    /// are then not in the per-server counts.
    #[arg(long, value_name = "URL", conflicts_with = "redis_cluster")]
    pub redis_backplane: Option<SecretUrl>,
    /// strata over a ring or a Cluster: how many shards hold a hot key (1 = no copies).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub hot_key_copies: usize,
    /// The hottest key (key 0) takes this fraction of all requests on top of the Zipf
    /// draw (e.g. 0.3: a hot-key skew), 0 to 1.
    #[arg(long, default_value_t = 0.0, value_name = "F")]
    pub hot_key_share: f64,
    /// Seconds of traffic replayed (uncounted, --warm-up-speed times faster than real
    /// time) after the cold window, before the steady window is measured [default:
    /// twice --duration]; 0 measures the cold start alone.
    #[arg(long, value_name = "SECS")]
    pub steady_after: Option<f64>,
    /// How much faster than real time the warm-up replays its traffic, ≥ 1 [default: 8;
    /// 2 for payment, whose Strong writes at 8x would overload a small host and leave
    /// the steady window measuring the recovery].
    #[arg(long, value_name = "X")]
    pub warm_up_speed: Option<f64>,
    /// drafts: users, one draft each.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub users: u64,
    /// drafts: strata's flush delay (a key is written this long after it first became
    /// dirty) and the naive scheduler's interval.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub flush_delay: f64,
}

/// Runs `strata bench`.
pub async fn run(args: BenchArgs) -> Result<()> {
    preflight::check_arguments(&args).await?;
    if args.scenario == Scenario::Drafts {
        return drafts::run(&args).await;
    }
    let events = events(&args)?;
    let ttl = match args.ttl {
        None => strategy::INVALIDATED_TTL,
        Some(s) if s >= 0.001 && s.is_finite() => Duration::from_secs_f64(s),
        Some(s) => bail!("--ttl must be a number of seconds ≥ 0.001, got {s}"),
    };
    let write_ratio = args.write_ratio.unwrap_or_else(|| args.scenario.default_write_ratio());
    let params = ScheduleParams {
        scenario: args.scenario,
        duration: Duration::from_secs_f64(args.duration),
        rate: args.rate,
        keys: args.keys,
        zipf: args.zipf,
        write_ratio,
        hot_key_share: args.hot_key_share,
        instances: args.instances,
        seed: args.seed,
    };
    let kinds = choose_strategies(&args)?;
    let schedule = Schedule::generate(&params)?;
    let warm_up = match args.steady_after {
        Some(s) if s >= 0.0 && s.is_finite() => Duration::from_secs_f64(s),
        Some(s) => bail!("--steady-after must be a number of seconds ≥ 0, got {s}"),
        None => params.duration * 2,
    };
    let speed = match args.warm_up_speed {
        None => args.scenario.default_warm_up_speed(),
        Some(x) if x >= 1.0 && x.is_finite() => x,
        Some(x) => bail!("--warm-up-speed must be a factor ≥ 1 (1 = real time), got {x}"),
    };
    let plan = if warm_up.is_zero() {
        None
    } else {
        Some(steady::Plan::new(&params, &schedule, warm_up, speed, !events.is_empty())?)
    };
    let db = match tokio::time::timeout(
        REACH_TIMEOUT * 2,
        Db::open(args.database.as_ref(), args.scenario, args.keys, schedule.hottest_key()),
    )
    .await
    {
        Ok(db) => Arc::new(db?),
        Err(_) => bail!("cannot open the database: no connection within {:?}", REACH_TIMEOUT * 2),
    };
    let run_id = format!("strata-bench:{}:{:08x}", std::process::id(), rand::random::<u32>());
    let fleet = FleetConfig {
        db: db.clone(),
        scenario: args.scenario,
        instances: args.instances as usize,
        capacity: args.keys,
        redis: args.redis.clone(),
        run_id,
        seed: args.seed,
        warm_up: args.warm_up,
        nodes: args.redis_ring.clone().or_else(|| args.redis_cluster.clone()).unwrap_or_default(),
        cluster: args.redis_cluster.is_some(),
        backplane: args.redis_backplane.clone(),
        hot_key_copies: args.hot_key_copies,
        warm_joins: args.warm_join_at.is_some(),
        l2_timeout: args.l2_timeout.map(Duration::from_millis),
        l2_busy_timeout: args.l2_busy_timeout.map(Duration::from_millis),
        ttl,
    };
    let run_config = RunConfig {
        max_in_flight: args.max_in_flight,
        drain_timeout: Duration::from_secs(60),
        values: args.scenario.values(),
        events,
    };
    let mut report = BenchReport::new(
        &params,
        &schedule,
        db.description(),
        args.redis.as_ref(),
        args.redis_backplane.as_ref(),
    );
    eprintln!("{}", report.headline());

    let result = run_strategies(&kinds, &fleet, &schedule, plan.as_ref(), &run_config, &mut report).await;
    drop(fleet);
    if let Some(db) = Arc::into_inner(db) {
        db.close().await?;
    }
    result?;

    print!("{}", report.table());
    let rows: Vec<_> = report
        .strategies
        .iter()
        .filter_map(|s| Some((s.name.as_str(), s.cold.as_ref()?, s.steady.as_ref()?)))
        .collect();
    if !rows.is_empty() {
        print!("{}", steady::table(&rows, warm_up, speed));
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).context("cannot encode the JSON report")?;
        std::fs::write(path, json + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        plot::write_svg(&report, path)?;
    }
    if let Some(path) = &args.timeline {
        timeline_plot::write_svg(&report, path)?;
    }
    let failed: Vec<String> = report
        .strategies
        .iter()
        .filter(|s| s.errors > 0)
        .map(|s| format!("{} ({})", s.name, s.errors))
        .collect();
    if !failed.is_empty() {
        bail!(
            "requests failed in {}: the figures above understate what those strategies cost",
            failed.join(", ")
        );
    }
    Ok(())
}

/// The events asked for, checked to fall inside the window.
fn events(args: &BenchArgs) -> Result<Vec<Event>> {
    let asked = [
        (args.join_at, EventKind::ColdJoin, "--join-at"),
        (args.warm_join_at, EventKind::WarmJoin, "--warm-join-at"),
        (args.bulk_invalidate_at, EventKind::BulkInvalidation, "--bulk-invalidate-at"),
    ];
    let mut events = Vec::new();
    for (at, kind, flag) in asked {
        match at {
            Some(s) if s >= 0.0 && s < args.duration => {
                events.push(Event { kind, at: Duration::from_secs_f64(s) })
            }
            Some(s) => bail!("{flag} must be between 0 and --duration ({}), got {s}", args.duration),
            None => {}
        }
    }
    if args.warm_join_at.is_some() && args.instances < 2 {
        bail!("--warm-join-at replaces instance 1: it needs --instances 2 or more");
    }
    Ok(events)
}

/// How long the argument checks wait for a server.
const REACH_TIMEOUT: Duration = Duration::from_secs(5);

fn choose_strategies(args: &BenchArgs) -> Result<Vec<StrategyKind>> {
    let has_redis = args.redis.is_some() || args.redis_ring.is_some() || args.redis_cluster.is_some();
    let mut kinds: Vec<StrategyKind> = match &args.strategies {
        Some(list) => list.clone(),
        None => StrategyKind::ALL
            .into_iter()
            .filter(|k| !k.needs_redis() || has_redis)
            .filter(|k| !k.needs_single_redis() || args.redis.is_some())
            .collect(),
    };
    kinds.sort();
    kinds.dedup();
    if let Some(k) = kinds.iter().find(|k| k.needs_redis() && !has_redis) {
        bail!("strategy {k} needs --redis URL, --redis-ring URLS or --redis-cluster URLS");
    }
    if let Some(k) = kinds.iter().find(|k| k.needs_single_redis() && args.redis.is_none()) {
        bail!("strategy {k} needs --redis URL (one server)");
    }
    if kinds.is_empty() {
        bail!("no strategy to run");
    }
    Ok(kinds)
}

async fn run_strategies(
    kinds: &[StrategyKind],
    fleet: &FleetConfig,
    schedule: &Schedule,
    plan: Option<&steady::Plan>,
    run_config: &RunConfig,
    report: &mut BenchReport,
) -> Result<()> {
    for &kind in kinds {
        fleet.db.reset().await?;
        let strategy = strategy::build(kind, fleet).await.with_context(|| format!("cannot start {kind}"))?;
        let urls = fleet.redis_urls().unwrap_or_default();
        let nodes_before = redis_nodes::sample(&urls).await?;
        let progress = progress_bar(kind, schedule.requests.len() as u64);
        // The events happen in a window of their own after the steady one, when there is
        // one.
        let cold_config = match plan {
            Some(_) => RunConfig { events: Vec::new(), ..run_config.clone() },
            None => run_config.clone(),
        };
        let outcome = runner::run(strategy.clone(), schedule, &cold_config, &progress, &fleet.db).await;
        progress.finish_and_clear();
        let db_counts = fleet.db.counts();
        let tiers = strategy.tier_counts();
        let lag = strategy.propagation();
        let nodes_after = redis_nodes::sample(&urls).await?;
        let (steady, events) = match (&outcome, plan) {
            (Ok(_), Some(plan)) => {
                let steady = steady::measure(&strategy, plan, run_config, &fleet.db, &urls).await;
                let events = match &steady {
                    Ok(_) => steady::events(&strategy, plan, run_config, &fleet.db).await,
                    Err(_) => Ok(None),
                };
                (Some(steady), events)
            }
            _ => (None, Ok(None)),
        };
        let closed = strategy.close().await;
        let outcome = outcome.with_context(|| format!("{kind} did not complete"))?;
        let steady =
            steady.transpose().with_context(|| format!("{kind}: the steady window did not complete"))?;
        let events = events.with_context(|| format!("{kind}: the events window did not complete"))?;
        let (caches, invalidates) = (strategy.ttl().is_some(), strategy.invalidates());
        let timeline = match (&events, &steady) {
            (Some(events), _) => Timeline::new("events", events, caches, invalidates),
            (None, Some((_, steady_outcome))) => Timeline::new("steady", steady_outcome, caches, invalidates),
            (None, None) => Timeline::new("cold", &outcome, caches, invalidates),
        };
        let steady = steady.map(|(window, _)| window);
        closed.with_context(|| format!("cannot clean up after {kind}"))?;
        if let Some(e) = &outcome.first_error {
            eprintln!(
                "warning: {kind}: {} requests failed; first error: {}",
                outcome.errors,
                secret::scrub(e)
            );
        }
        let mut row = StrategyReport::new(strategy.as_ref(), &outcome, db_counts, tiers, report);
        if !urls.is_empty() {
            row.redis_nodes = Some(NodesReport::between(&nodes_before, &nodes_after, row.elapsed_s));
        }
        let mut cold = steady::Window::new(
            &outcome,
            db_counts,
            tiers,
            report.compulsory_db_reads,
            report.duration_s,
            row.redis_nodes.as_ref(),
        );
        cold.propagation_lag_p99_us = lag.map(|l| l.p99_us);
        row.cold = Some(cold);
        row.propagation_lag = lag;
        row.steady = steady;
        row.set_timeline(timeline);
        eprintln!("{}", row.summary_line());
        report.strategies.push(row);
    }
    Ok(())
}

fn progress_bar(kind: StrategyKind, len: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let style =
        ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len} requests, {elapsed} / ~{eta} left")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(kind.name());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
