//! One instance of the drafts torture run, as its own OS process (`strata
//! check-drafts-worker`, hidden): a `Cache<i64, String>` with write-behind over a
//! `RedisWriteBehindQueue` and strata-sql's `UpsertSink`, saving the drafts it owns and
//! reading any draft, each operation a line of its history.
//!
//! Protocol with the coordinator (lines): prints `ready`; `start` starts the load;
//! `stop` stops it (prints `stopped`); `drain` flushes the queue until nothing is due
//! (prints `drained <left>`); end of input exits. A `kill -9` is the nemesis's business.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use strata::{Cache, WriteBehindConfig};
use strata_redis::{Durability, RedisStreamBackplane, RedisTier, RedisWriteBehindQueue};
use strata_sql::{UpsertSink, UpsertTable};
use strata_testkit::monotonic_ns;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;

use crate::check::setup::{self, Level};
use crate::secret::{DATABASE_URL_ENV, REDIS_URL_ENV, SecretUrl};

/// The namespace and table of the drafts run.
pub const NAMESPACE: &str = "drafts";
/// How long a flusher holds its claims: a killed instance's keys wait this long.
pub const CLAIM_LEASE: Duration = Duration::from_secs(3);
/// A key is written this long after it first became dirty.
pub const FLUSH_DELAY: Duration = Duration::from_secs(1);

/// The environment variable holding the queue's Redis URL (the tier and backplane use
/// the one in `REDIS_URL_ENV`).
pub const QUEUE_URL_ENV: &str = "STRATA_CHECK_QUEUE_URL";

/// The durability level under test (`--durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DurabilityArg {
    /// Acknowledged once Redis applied the save.
    Acknowledged,
    /// Acknowledged once one replica confirmed it (`WAIT 1 100`).
    Replicas,
    /// Acknowledged by a Redis running `appendonly yes`, `appendfsync always`.
    Fsync,
}

impl DurabilityArg {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DurabilityArg::Acknowledged => "acknowledged",
            DurabilityArg::Replicas => "replicas",
            DurabilityArg::Fsync => "fsync",
        }
    }

    fn level(self) -> Durability {
        match self {
            DurabilityArg::Acknowledged => Durability::Acknowledged,
            DurabilityArg::Replicas => {
                Durability::Replicas { replicas: 1, timeout: Duration::from_millis(100) }
            }
            DurabilityArg::Fsync => Durability::AppendFsync,
        }
    }
}

/// One line of a drafts history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op {
    /// The process.
    pub p: String,
    /// `save` or `read`.
    pub op: String,
    /// The draft.
    pub k: i64,
    /// The revision saved, or read (0: none).
    pub rev: u64,
    /// Invoked and returned (CLOCK_MONOTONIC ns).
    pub i: u64,
    /// Returned.
    pub d: u64,
    /// Whether it succeeded (a save: acknowledged).
    pub ok: bool,
    /// The error of a failed operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
}

/// The hidden `strata check-drafts-worker` subcommand.
#[derive(Debug, Clone, Args)]
pub struct DraftsWorkerArgs {
    /// The process name in the history.
    #[arg(long)]
    pub name: String,
    /// This instance's index: it saves the drafts `k` with `k % instances == index`.
    #[arg(long)]
    pub index: u64,
    /// Instances in the fleet.
    #[arg(long)]
    pub instances: u64,
    /// Drafts 1..=N.
    #[arg(long)]
    pub keys: u64,
    /// Operations per second.
    #[arg(long)]
    pub rate: u32,
    /// Key prefix of the run in Redis.
    #[arg(long)]
    pub prefix: String,
    /// The consistency level of the cache.
    #[arg(long, value_enum)]
    pub level: Level,
    /// The queue's durability level.
    #[arg(long, value_enum)]
    pub durability: DurabilityArg,
    /// Reach Postgres through this `host:port` (the fault proxy).
    #[arg(long)]
    pub db_via: Option<String>,
    /// Where to write the history.
    #[arg(long)]
    pub history: PathBuf,
    /// The seed.
    #[arg(long)]
    pub seed: u64,
}

/// The body of revision `rev` of draft `key`; draft 1 is the poison key, whose rows the
/// table's CHECK constraint refuses.
pub fn body(key: i64, rev: u64) -> String {
    if key == 1 { format!("poison r{rev}") } else { format!("r{rev}") }
}

/// The revision a body holds.
pub fn rev_of(body: &str) -> Option<u64> {
    body.rsplit_once('r').and_then(|(_, n)| n.parse().ok())
}

fn say(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).context("cannot write to the coordinator")
}

/// The queue, as the workers and the coordinator build it.
pub async fn queue(
    redis: &SecretUrl,
    prefix: &str,
    durability: DurabilityArg,
) -> Result<RedisWriteBehindQueue> {
    RedisWriteBehindQueue::builder(redis.expose())
        .prefix(prefix)
        .durability(durability.level())
        .build()
        .await
        .with_context(|| format!("cannot build the RedisWriteBehindQueue on {redis}"))
}

async fn build(
    args: &DraftsWorkerArgs,
    redis: &SecretUrl,
    queue_url: &SecretUrl,
    pool: sqlx::PgPool,
) -> Result<Cache<i64, String>> {
    let table = UpsertTable::new(NAMESPACE, "id", "body", "seq").map_err(|e| anyhow!("{e}"))?;
    let sink = UpsertSink::<_, i64, String>::postgres(pool, table);
    let queue = Arc::new(queue(queue_url, &args.prefix, args.durability).await?);
    let tier = RedisTier::builder(redis.expose()).prefix(&args.prefix).build().await.context("RedisTier")?;
    let backplane = RedisStreamBackplane::builder(redis.expose())
        .prefix(&args.prefix)
        .build()
        .await
        .context("RedisStreamBackplane")?;
    let wb = WriteBehindConfig::new(queue, sink)
        .flush_delay(FLUSH_DELAY)
        .poll_interval(Duration::from_millis(100))
        .claim_lease(CLAIM_LEASE)
        .max_attempts(3)
        .retry_backoff(Duration::from_millis(100), Duration::from_secs(1));
    Cache::builder(NAMESPACE)
        .tier(Arc::new(tier))
        .backplane(Arc::new(backplane))
        .consistency(args.level.consistency())
        .l2_timeout(setup::L2_TIMEOUT)
        .loader_hard_timeout(setup::HARD_TIMEOUT)
        .write_behind(wb)
        .build()
        .context("cannot build the cache")
}

/// Runs the worker.
pub async fn run(args: DraftsWorkerArgs) -> Result<()> {
    let env =
        |name: &str| std::env::var(name).map(SecretUrl::new).with_context(|| format!("{name} is not set"));
    let (redis, queue_url, db) = (env(REDIS_URL_ENV)?, env(QUEUE_URL_ENV)?, env(DATABASE_URL_ENV)?);
    let pool = setup::connect(&db, args.db_via.as_deref(), 4).await?;
    let sink_pool = setup::connect(&db, args.db_via.as_deref(), 4).await?;
    let cache = build(&args, &redis, &queue_url, sink_pool).await?;
    tokio::time::timeout(Duration::from_secs(30), cache.ready())
        .await
        .map_err(|_| anyhow!("not ready in 30 s"))?;
    say("ready")?;
    let mut input = BufReader::new(tokio::io::stdin()).lines();
    let mut next = async || input.next_line().await.ok().flatten().unwrap_or_default().trim().to_owned();
    if next().await != "start" {
        bail!("expected start");
    }
    let history = Arc::new(Mutex::new(
        std::fs::OpenOptions::new().create(true).append(true).open(&args.history).context("history")?,
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let load = tokio::spawn(load(args.clone(), cache.clone(), pool, history.clone(), stop_rx));
    let command = next().await;
    let _ = stop_tx.send(true);
    load.await.context("the load task")?;
    say("stopped")?;
    if command != "stop" || next().await != "drain" {
        return Ok(());
    }
    let wb = cache.write_behind().context("write-behind is on")?;
    let mut left = u64::MAX;
    for _ in 0..100 {
        left = wb.flush_all().await.unwrap_or(u64::MAX);
        let dead = wb.pending().await.map(|p| p.dead).unwrap_or(0);
        if left <= dead {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    say(&format!("drained {left}"))?;
    let _ = next().await;
    Ok(())
}

async fn load(
    args: DraftsWorkerArgs,
    cache: Cache<i64, String>,
    pool: sqlx::PgPool,
    history: Arc<Mutex<std::fs::File>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let mine: Vec<i64> =
        (1..=args.keys as i64).filter(|k| (*k as u64) % args.instances == args.index).collect();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1))));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let save = !mine.is_empty() && rng.random_bool(0.6);
        let key =
            if save { mine[rng.random_range(0..mine.len())] } else { rng.random_range(1..=args.keys as i64) };
        let (cache, pool, history, name) = (cache.clone(), pool.clone(), history.clone(), args.name.clone());
        tasks.spawn(async move {
            let op = if save {
                save_one(&name, &cache, key).await
            } else {
                read_one(&name, &cache, &pool, key).await
            };
            if let Ok(line) = serde_json::to_string(&op) {
                let mut f = history.lock();
                let _ = writeln!(f, "{line}");
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let _ = history.lock().flush();
}

async fn save_one(name: &str, cache: &Cache<i64, String>, key: i64) -> Op {
    let i = monotonic_ns();
    let e = match cache.write_behind() {
        Some(wb) => wb.save(key, body(key, i)).await.err().map(|e| e.to_string()),
        None => Some("no write-behind".to_owned()),
    };
    Op { p: name.to_owned(), op: "save".into(), k: key, rev: i, i, d: monotonic_ns(), ok: e.is_none(), e }
}

async fn read_one(name: &str, cache: &Cache<i64, String>, pool: &sqlx::PgPool, key: i64) -> Op {
    let i = monotonic_ns();
    let pool = pool.clone();
    let loaded = cache
        .get_or_load(&key, move || async move {
            let row: Option<(String,)> = sqlx::query_as("SELECT body FROM drafts WHERE id = $1")
                .bind(key)
                .fetch_optional(&pool)
                .await?;
            Ok::<_, sqlx::Error>(row.map(|(b,)| b))
        })
        .await;
    let (rev, e) = match loaded {
        Ok(v) => (v.as_deref().and_then(rev_of).unwrap_or(0), None),
        Err(e) => (0, Some(e.to_string())),
    };
    Op { p: name.to_owned(), op: "read".into(), k: key, rev, i, d: monotonic_ns(), ok: e.is_none(), e }
}
