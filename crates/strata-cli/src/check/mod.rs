//! `strata check`: a consistency torture run. A fleet of instances, each its own OS
//! process ([`worker`]), reads and writes one table through strata over real Redis
//! and Postgres while the [`nemesis`] injects faults; every operation is recorded in a
//! history, and the history, the database and the caches at quiescence are judged by
//! the checker of `strata-testkit` ([`strata_testkit::checker`]).

pub mod drafts;
pub mod nemesis;
pub mod proc;
pub mod setup;
pub mod table;
pub mod worker;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use strata_testkit::{
    CacheSnapshot, CheckConfig, FaultProxy, History, PostgresServer, Quiescence, Recorder, RedisCluster,
    RedisServer, check, monotonic_ns,
};
use tokio::process::Command;

use self::nemesis::{Fault, FaultArg, Nemesis};
use self::proc::WorkerProc;
use self::setup::{Level, Timing};
use self::worker::Role;
use crate::secret::{DATABASE_URL_ENV, REDIS_URL_ENV, SecretUrl};

const ABOUT: &str = "Consistency torture run: a fleet under faults, a recorded history, a checker";

const LONG_ABOUT: &str = "\
What it does: starts Redis and Postgres (through strata-testkit, unless --redis /
--database are given), seeds a table of versioned rows, and runs --instances processes of
this binary: one writer, which commits `version = version + 1` at --write-rate per second
through strata-sql's transaction helper (tx.invalidate, then tx.commit: the key is
invalidated after the commit, and also when the COMMIT's outcome is unknown), and readers, which read random keys with
`get_or_load` (loader: SELECT from Postgres) at --read-rate per second each. Every
instance has its own Cache<u64, Row> on RedisTier + RedisStreamBackplane at --level, with
the row version declared. Half of all picks go to the hottest tenth of the keys.

Faults (one at a time, evenly spread over --duration, each bounded):
  redis-kill       kill -9 Redis, restart it empty on the same port after 3 s
  redis-pause      SIGSTOP Redis for 2 s, then SIGCONT
  subscriber-kill  CLIENT KILL the backplane subscriber connections (named strata-bp-*)
  db-down          the database unreachable through a TCP fault proxy for 2 s
  all              each of the above once, in that order
  failover         (--cluster) kill -9 the master serving the backplane stream's slot;
                   its replica takes over; the node is restarted and rejoins as a replica
With --redis, redis-kill is skipped and redis-pause uses CLIENT PAUSE.
  node-restart     (--ring) kill -9 ring node 1, restart it empty after 3 s
With --ring, the check starts 3 more redis-servers and every instance shards L2 over
them (a ShardedTier with a 5 s gutter); the backplane stays on the first Redis.
With --cluster, the check starts a Redis Cluster (3 masters, 3 replicas) and every
instance shards its namespace over 64 virtual shards spread over the slots
(RedisTier::cluster_shards); the faults are failover and db-down.

Then the load stops, the fleet settles for max_stale + 2 s, every instance dumps what its
L1 serves, L2 and the database are read, and the checker reports:
  stale reads beyond the bound  reads older than a write committed more than the bound
                                before the read was invoked (must be 0)
  stale reads (zero slack)      reads older than a write committed before the read was
                                invoked (informative), and the stalest: how long before
                                it a newer version had committed
  reads of unwritten versions   reads of a version no write invoked before the read
                                returned could have produced (must be 0, every level)
  staleness window              per committed write: the latest invocation of a read that
                                still returned an older version, minus the write's commit
                                (p50 / p99 / max, and the fraction of writes within
                                1 ms / 10 ms / 100 ms / 1 s)
  permanent inconsistencies     cached versions (any L1, or L2) that differ from the
                                database at quiescence (must be 0)
  lost writes                   committed writes the database does not have (must be 0)
  linearizability violations    Strong only (must be 0): a stale read, a read of an
                                unwritten version, or a read older than what a read that
                                returned before it was invoked saw
--workload drafts (write-behind under faults): every instance saves the drafts it owns
(write-behind on a RedisWriteBehindQueue at --durability acknowledged|replicas|fsync,
flushed by every instance through strata-sql's UpsertSink into Postgres, flush delay 1 s,
claims held 3 s) and reads any draft (get_or_load), --read-rate operations per second
each, 60 % saves; draft 1 is a poison key the table's CHECK constraint refuses. The queue
has a Redis of its own (AOF with appendfsync always at fsync; a replica at replicas), the
tier and backplane another. Faults: instance-kill (kill -9 instance 1, a new one in its
place after 1 s), redis-kill (kill -9 the queue's Redis, restart after 3 s: from its AOF
at fsync, empty otherwise; skipped at replicas, which needs a failover this run does not
orchestrate), db-down (10 s blackhole), all (each
once). Then the load stops, one instance drains the queue, and the check reports
acknowledged saves lost (a draft whose row is older than its last acknowledged save),
rows no save produced, read-your-writes violations beyond the level's bound, the dead
letters (the poison draft must be there, no other), what still waits, and the longest a
save waited. Losses after redis-kill at durability acknowledged are allowed by that level
and reported as such. E.g.
  strata check --workload drafts --level invalidated --fault all --durability fsync

A stale read is one definition everywhere (strata's docs, the README, this checker): it
returns a version older than that of a write committed before the read was invoked.
A write is committed when its COMMIT succeeded, whatever became of its invalidation, and
is judged from the moment the database acknowledged the COMMIT (recorded as commit_ns);
an invalidation that was buffered (L2 or the backplane failed) excuses nothing, and its
later application by the cache's retry is recorded (invalidation_retried) and reported.
A write whose COMMIT outcome is unknown (the connection failed during COMMIT) is resolved
from the versions (one writer, version = version + 1): committed if no other write
produced its version and the database reached it, else not; what cannot be resolved is
left unjudged (it may be seen or not) and counted. A write that certainly changed
nothing (rolled back, e.g. refused at Strong because its write lock could not be taken,
or failed before COMMIT) is counted as rolled back and excuses no read. Intervals are
closed: a read that returns at the very nanosecond a write is invoked is concurrent
with it.

The bound (counted from the commit):
  invalidated  max_stale + 3 × heartbeat_interval (the unhealthy-detection time)
               + 250 ms margin; with the defaults 1000 + 750 + 250 = 2000 ms
  strong       0 (read-your-writes once invalidate returned) + 1 ms measurement margin

Exits with status 1 when a promise was broken. Times are CLOCK_MONOTONIC, shared by all
processes of the machine. With the defaults a run takes about 35 s:
  strata check --level invalidated --fault all --json report.json --history history.jsonl
  strata check --level strong --fault all";

/// Arguments of `strata check`.
#[derive(Debug, Clone, Args)]
#[command(about = ABOUT, after_long_help = LONG_ABOUT)]
pub struct CheckArgs {
    /// The consistency level under test.
    #[arg(long, value_enum)]
    pub level: Level,
    /// Fault(s) to inject.
    #[arg(long, value_enum, default_value = "none")]
    pub fault: FaultArg,
    /// Seconds of load.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Instances (processes): one writer and N-1 readers.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=64))]
    pub instances: u32,
    /// Rows in the table (keys 1..=N).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    pub keys: u64,
    /// Reads per second of each reader.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub read_rate: u32,
    /// Writes per second of the writer.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub write_rate: u32,
    /// `max_stale` of every instance, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_stale_ms: u64,
    /// `heartbeat_interval` of every instance, in milliseconds (the Strong level's
    /// membership lease is four of them).
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_ms: u64,
    /// Use this Redis instead of starting one (`redis://…`).
    #[arg(long)]
    pub redis: Option<SecretUrl>,
    /// Run on a Redis Cluster the check starts (3 masters, each with a replica): every
    /// instance shards its namespace over 64 virtual shards spread over the slots, the
    /// backplane stream lives on one master. Enables `--fault failover`.
    #[arg(long, conflicts_with_all = ["redis", "redis_config"])]
    pub cluster: bool,
    /// Shard L2 over a ring of 3 standalone Redis servers the check starts (a
    /// `ShardedTier` with a gutter); the backplane stays on its own Redis. Enables
    /// `--fault node-restart`.
    #[arg(long, conflicts_with_all = ["redis", "cluster"])]
    pub ring: bool,
    /// With --cluster: invalidations are acknowledged once a replica has them
    /// (`RedisTierBuilder::wait_for_replicas(1, 20ms)`).
    #[arg(long, requires = "cluster")]
    pub wait_for_replicas: bool,
    /// A setting of the Redis the check starts, as it is configured in production
    /// (repeatable), e.g. `--redis-config maxmemory=3mb --redis-config
    /// maxmemory-policy=allkeys-lru`; kept across the kill fault's restart.
    #[arg(long = "redis-config", value_name = "NAME=VALUE", conflicts_with = "redis")]
    pub redis_config: Vec<String>,
    /// Use this Postgres database instead of starting a server (`postgres://…`); the
    /// table `strata_check` in it is dropped and recreated.
    #[arg(long)]
    pub database: Option<SecretUrl>,
    /// Keep the merged history (JSON lines) here.
    #[arg(long)]
    pub history: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seed of the key choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// What the fleet does: `rows` (versioned rows read and written through the cache)
    /// or `drafts` (write-behind saves and reads; see below).
    #[arg(long, value_enum, default_value = "rows")]
    pub workload: Workload,
    /// `--workload drafts`: when the queue acknowledges a save.
    #[arg(long, value_enum, default_value = "fsync")]
    pub durability: drafts::worker::DurabilityArg,
}

/// The `--workload` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Versioned rows: a writer and readers, judged for staleness.
    Rows,
    /// Write-behind drafts: saves and reads, judged for lost saves.
    Drafts,
}

/// Everything a worker needs to be started.
struct Launch<'a> {
    args: &'a CheckArgs,
    redis: &'a SecretUrl,
    ring: Option<&'a SecretUrl>,
    prefix: &'a str,
    database: &'a SecretUrl,
    db_via: String,
    dir: &'a Path,
}

impl Launch<'_> {
    fn spawn(&self, role: Role, index: u32) -> Result<WorkerProc> {
        let (name, history, stderr) = self.files(role, index);
        let exe = std::env::current_exe().context("cannot find this executable to start workers")?;
        WorkerProc::start(name, self.command(exe, role, index), stderr, history)
    }

    /// A worker's name, history file and stderr file.
    fn files(&self, role: Role, index: u32) -> (String, PathBuf, PathBuf) {
        let name = match role {
            Role::Writer => "writer".to_owned(),
            Role::Reader => format!("reader-{index}"),
        };
        let history = self.dir.join(format!("{name}.jsonl"));
        let stderr = self.dir.join(format!("{name}.stderr"));
        (name, history, stderr)
    }

    /// The worker's command: the URLs, which may hold passwords, go in its environment,
    /// not on its command line, which every user of the machine can read (`ps`).
    fn command(&self, exe: PathBuf, role: Role, index: u32) -> Command {
        let (name, history, _) = self.files(role, index);
        let rate = match role {
            Role::Writer => self.args.write_rate,
            Role::Reader => self.args.read_rate,
        };
        let mut cmd = Command::new(exe);
        cmd.arg("check-worker")
            .args(["--role", if role == Role::Writer { "writer" } else { "reader" }])
            .args(["--name", &name])
            .args(["--level", self.args.level.name()])
            .args(["--prefix", self.prefix])
            .args(self.args.cluster.then_some("--cluster"))
            .args(["--db-via", &self.db_via])
            .args(["--keys", &self.args.keys.to_string()])
            .args(["--rate", &rate.to_string()])
            .arg("--history")
            .arg(&history)
            .args(["--max-stale-ms", &self.args.max_stale_ms.to_string()])
            .args(["--heartbeat-ms", &self.args.heartbeat_ms.to_string()])
            .args(["--seed", &(self.args.seed.wrapping_mul(1000) + u64::from(index)).to_string()])
            .env(REDIS_URL_ENV, self.redis.expose())
            .env(DATABASE_URL_ENV, self.database.expose());
        if let Some(ring) = self.ring {
            cmd.env(setup::RING_URLS_ENV, ring.expose());
        }
        if self.args.wait_for_replicas {
            cmd.env(setup::WAIT_FOR_REPLICAS_ENV, "1");
        }
        cmd
    }
}

/// Servers started for the run (dropped, and so killed, at the end).
struct Servers {
    redis: Option<RedisServer>,
    cluster: Option<RedisCluster>,
    /// `--ring`: the ring's servers and their URLs.
    ring: Vec<RedisServer>,
    ring_url: Option<SecretUrl>,
    postgres: Option<PostgresServer>,
    redis_url: SecretUrl,
    database_url: SecretUrl,
}

async fn start_servers(args: &CheckArgs) -> Result<Servers> {
    let mut cluster = None;
    let (redis, redis_url) = match &args.redis {
        Some(url) => (None, url.clone()),
        None if args.cluster => {
            eprintln!("strata check: starting a Redis Cluster (3 masters, 3 replicas) ...");
            let c =
                tokio::task::spawn_blocking(|| RedisCluster::builder().masters(3).replicas(1).try_start())
                    .await
                    .context("redis cluster start task")?
                    .context("cannot start a Redis Cluster (apt-get install redis-server redis-tools?)")?;
            let url = SecretUrl::new(c.urls().join(","));
            cluster = Some(c);
            (None, url)
        }
        None => {
            eprintln!("strata check: starting redis-server ...");
            let mut builder = RedisServer::builder();
            for setting in &args.redis_config {
                let Some((name, value)) = setting.split_once('=') else {
                    anyhow::bail!("--redis-config {setting:?}: write NAME=VALUE, e.g. maxmemory=3mb");
                };
                builder = builder.arg(name, value);
            }
            let server = tokio::task::spawn_blocking(move || builder.try_start())
                .await
                .context("redis start task")?
                .context("cannot start redis-server (apt-get install redis-server?)")?;
            let url = SecretUrl::new(server.url());
            (Some(server), url)
        }
    };
    let (postgres, database_url) = match &args.database {
        Some(url) => (None, url.clone()),
        None => {
            eprintln!("strata check: starting postgres ...");
            let (server, url) = tokio::task::spawn_blocking(|| -> std::io::Result<_> {
                let server = PostgresServer::builder().try_start()?;
                let url = server.create_database("strata_check")?;
                Ok((server, url))
            })
            .await
            .context("postgres start task")?
            .context("cannot start postgres (apt-get install postgresql?)")?;
            (Some(server), SecretUrl::new(url))
        }
    };
    let mut ring = Vec::new();
    if args.ring {
        eprintln!("strata check: starting a ring of 3 redis-servers ...");
        for _ in 0..3 {
            let server = tokio::task::spawn_blocking(|| RedisServer::builder().try_start())
                .await
                .context("redis start task")?
                .context("cannot start redis-server (apt-get install redis-server?)")?;
            ring.push(server);
        }
    }
    let ring_url = (!ring.is_empty())
        .then(|| SecretUrl::new(ring.iter().map(RedisServer::url).collect::<Vec<_>>().join(",")));
    Ok(Servers { redis, cluster, ring, ring_url, postgres, redis_url, database_url })
}

/// Runs `strata check`.
pub async fn run(args: CheckArgs) -> Result<()> {
    let timing = Timing {
        max_stale: Duration::from_millis(args.max_stale_ms),
        heartbeat: Duration::from_millis(args.heartbeat_ms),
    };
    let (bound, bound_how) = timing.bound(args.level);
    let duration = Duration::from_secs(args.duration);
    let settle = timing.max_stale + Duration::from_secs(2);
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;

    if args.workload == Workload::Drafts {
        return drafts::run(args).await;
    }
    let faults = args.fault.faults();
    if faults.contains(&Fault::InstanceKill) {
        bail!("--fault instance-kill is part of --workload drafts");
    }
    if args.cluster
        && faults.iter().any(|f| matches!(f, Fault::RedisKill | Fault::RedisPause | Fault::SubscriberKill))
    {
        bail!("--cluster runs the faults failover and db-down; {} needs one Redis", args.fault.name());
    }
    if !args.ring && faults.contains(&Fault::NodeRestart) {
        bail!("--fault node-restart needs --ring (a ring of servers, one of which restarts)");
    }
    if !args.cluster && faults.contains(&Fault::Failover) {
        bail!("--fault failover needs --cluster (a Redis Cluster whose master can fail over)");
    }
    let mut servers = start_servers(&args).await?;
    let db = setup::connect(&servers.database_url, None, 2).await?;
    setup::create_table(&db, args.keys).await?;
    let target = setup::server_address(&servers.database_url)?;
    let target = tokio::net::lookup_host(&target)
        .await
        .with_context(|| format!("cannot resolve {target}"))?
        .next()
        .ok_or_else(|| anyhow!("{target} resolves to nothing"))?;
    let proxy = FaultProxy::start(target).await.context("cannot start the fault proxy")?;
    let prefix = format!("strata-check-{}-{:x}", std::process::id(), monotonic_ns());

    let recorder = Arc::new(Recorder::create(dir.path().join("coordinator.jsonl"))?);
    let initial = setup::versions(&db).await?.into_iter().collect();

    let launch = Launch {
        args: &args,
        redis: &servers.redis_url,
        ring: servers.ring_url.as_ref(),
        prefix: &prefix,
        database: &servers.database_url,
        db_via: proxy.addr().to_string(),
        dir: dir.path(),
    };
    eprintln!("strata check: starting {} instances ...", args.instances);
    let mut workers = vec![launch.spawn(Role::Writer, 0)?];
    for i in 1..args.instances {
        workers.push(launch.spawn(Role::Reader, i)?);
    }
    for w in &mut workers {
        w.expect("ready", Duration::from_secs(60)).await?;
    }

    eprintln!("strata check: load for {} s, fault {} ...", args.duration, args.fault.name());
    for w in &mut workers {
        w.send("start").await?;
    }
    let start = tokio::time::Instant::now();
    let mut nemesis = Nemesis {
        redis: servers.redis.as_mut(),
        cluster: servers.cluster.as_mut(),
        ring: &mut servers.ring,
        redis_url: &servers.redis_url,
        proxy: &proxy,
        recorder: recorder.clone(),
    };
    let (injected, ()) =
        tokio::join!(nemesis.run(&faults, start, duration), tokio::time::sleep_until(start + duration));
    injected?;

    let mut skipped = BTreeMap::new();
    for w in &mut workers {
        w.send("stop").await?;
    }
    let mut installed = 0;
    for w in &mut workers {
        let line = w.expect("stopped", Duration::from_secs(60)).await?;
        let mut counts = line.split_whitespace().map(|n| n.parse::<u64>().unwrap_or(0));
        skipped.insert(w.name.clone(), counts.next().unwrap_or(0));
        installed += counts.next().unwrap_or(0);
    }
    eprintln!(
        "strata check: load stopped ({installed} pushed reloads installed); settling for {} ms ...",
        settle.as_millis()
    );
    tokio::time::sleep(settle).await;

    let mut end = Quiescence::default();
    for w in &mut workers {
        w.send("dump").await?;
        let json = w.expect("snapshot", Duration::from_secs(60)).await?;
        end.caches
            .push(serde_json::from_str(&json).with_context(|| format!("bad snapshot from {}", w.name))?);
    }
    for w in &mut workers {
        let status = tokio::time::timeout(Duration::from_secs(30), w.child.wait())
            .await
            .map_err(|_| anyhow!("{} did not exit", w.name))??;
        if !status.success() {
            bail!("{} failed ({status}): {}", w.name, w.stderr_tail());
        }
    }
    let l2 = setup::l2_reader(&servers.redis_url, args.cluster, servers.ring_url.as_ref(), &prefix).await?;
    let mut l2_entries = Vec::new();
    for key in 1..=args.keys {
        if let Some(row) = l2.get(&key).await.with_context(|| format!("reading key {key} from L2"))? {
            l2_entries.push((key, Some(row.version)));
        }
    }
    end.caches.push(CacheSnapshot { source: "l2".into(), entries: l2_entries });
    end.database = setup::versions(&db).await?.into_iter().collect();

    recorder.flush()?;
    let mut history = History::read(dir.path().join("coordinator.jsonl"))?;
    for w in &workers {
        history.merge(
            History::read(&w.history).with_context(|| format!("cannot read {}", w.history.display()))?,
        );
    }
    history.sort();
    if let Some(path) = &args.history {
        let file =
            std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        history.write_to(file).with_context(|| format!("cannot write {}", path.display()))?;
    }

    let config = CheckConfig {
        level: args.level.name().to_owned(),
        bound,
        linearizable: args.level == Level::Strong,
        initial,
        // One writer, `version = version + 1`: a write whose COMMIT outcome is unknown
        // is resolved from the versions.
        versions_step_by_one: true,
    };
    let report = check(&config, &history, &end);
    let run = table::RunInfo {
        args: &args,
        bound_how: &bound_how,
        l2_cached: end.caches.last().map_or(0, |c| c.entries.len()),
        l1_cached: end.caches.iter().rev().skip(1).map(|c| c.entries.len()).sum(),
        skipped: &skipped,
    };
    print!("{}", table::render(&report, &run));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    cleanup(&servers, &prefix, &db).await;
    drop(servers.redis.take());
    drop(servers.cluster.take());
    servers.ring.clear();
    if !report.passed {
        bail!("consistency check failed at the {} level", report.level);
    }
    Ok(())
}

/// Leaves an external Redis and database as they were (best effort).
async fn cleanup(servers: &Servers, prefix: &str, db: &sqlx::PgPool) {
    if servers.redis.is_none() && servers.cluster.is_none() {
        let _ = setup::delete_prefix(&servers.redis_url, prefix).await;
    }
    if servers.postgres.is_none() {
        let _ = sqlx::query("DROP TABLE IF EXISTS strata_check").execute(db).await;
        eprintln!("strata check: dropped table {} from the --database", setup::TABLE);
    }
    db.close().await;
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    const REDIS: &str = "redis://alice:Rp/w?d#x@127.0.0.1:6379/0";
    const DATABASE: &str = "postgres://bob:Pg%40pw@127.0.0.1:5432/db?password=Qpw";

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CheckArgs,
    }

    /// The worker's command line (which `ps` shows every user) holds no URL, and so no
    /// password: the URLs go in its environment.
    #[test]
    fn worker_command_lines_hold_no_password() {
        let cli = Cli::parse_from(["strata", "--level", "strong", "--redis", REDIS, "--database", DATABASE]);
        let (redis, database) = (cli.args.redis.clone().unwrap(), cli.args.database.clone().unwrap());
        let launch = Launch {
            args: &cli.args,
            redis: &redis,
            ring: Some(&redis),
            prefix: "p",
            database: &database,
            db_via: "127.0.0.1:1".into(),
            dir: Path::new("/tmp"),
        };
        for (role, index) in [(Role::Writer, 0), (Role::Reader, 1)] {
            let cmd = launch.command(PathBuf::from("strata"), role, index);
            let cmd = cmd.as_std();
            let argv: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
            for secret in ["Rp/w?d#x", "Pg%40pw", "Pg@pw", "Qpw", "redis://", "postgres://"] {
                assert!(!argv.iter().any(|a| a.contains(secret)), "{secret} in {argv:?}");
            }
            let env = |name: &str| {
                cmd.get_envs().find(|(k, _)| *k == name).and_then(|(_, v)| v).map(|v| v.to_string_lossy())
            };
            assert_eq!(env(REDIS_URL_ENV).as_deref(), Some(REDIS));
            assert_eq!(env(DATABASE_URL_ENV).as_deref(), Some(DATABASE));
        }
        let shown = format!("{:?}", cli.args);
        assert!(!shown.contains("Rp/w") && !shown.contains("Pg%40pw") && !shown.contains("Qpw"), "{shown}");
    }
}
