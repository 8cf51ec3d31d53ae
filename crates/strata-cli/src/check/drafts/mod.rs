//! `strata check --workload drafts`: write-behind under faults. A fleet of worker
//! processes ([`worker`]) saves the drafts each owns (write-behind over a
//! `RedisWriteBehindQueue` at `--durability`, flushed through strata-sql's `UpsertSink`
//! into Postgres) and reads any draft, while the nemesis kills -9 an instance that
//! holds flush claims (and starts a new one), kills -9 Redis and restarts it (from its
//! AOF at `--durability fsync`), and blackholes the database for 10 s; draft 1 is a
//! poison key the table's CHECK constraint refuses. Then the load stops, one instance
//! drains the queue, and [`judge`] compares every draft's row with its last
//! acknowledged save.

pub mod judge;
pub mod worker;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use strata::write_behind::WriteBehindQueue;
use strata_testkit::{FaultProxy, PostgresServer, RedisServer};
use tokio::process::Command;
use tokio::time::Instant;

use self::judge::{DraftsVerdict, judge};
use self::worker::{DurabilityArg, NAMESPACE, Op, QUEUE_URL_ENV};
use super::CheckArgs;
use super::nemesis::{Fault, FaultArg};
use super::proc::WorkerProc;
use super::setup;
use crate::secret::{DATABASE_URL_ENV, REDIS_URL_ENV, SecretUrl};

/// How long the database is blackholed.
pub const DB_DOWN: Duration = Duration::from_secs(10);
/// How long Redis stays dead.
pub const REDIS_DOWN: Duration = Duration::from_secs(3);
/// The draft the table refuses.
pub const POISON: i64 = 1;

struct Fleet<'a> {
    args: &'a CheckArgs,
    redis: SecretUrl,
    queue: SecretUrl,
    database: SecretUrl,
    db_via: String,
    prefix: String,
    dir: &'a Path,
    restarts: u32,
}

impl Fleet<'_> {
    fn spawn(&mut self, index: u32) -> Result<WorkerProc> {
        let name =
            if self.restarts == 0 { format!("w{index}") } else { format!("w{index}-{}", self.restarts) };
        let history = self.dir.join(format!("{name}.jsonl"));
        let stderr = self.dir.join(format!("{name}.stderr"));
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let mut cmd = Command::new(exe);
        cmd.arg("check-drafts-worker")
            .args(["--name", &name])
            .args(["--index", &index.to_string()])
            .args(["--instances", &self.args.instances.to_string()])
            .args(["--keys", &self.args.keys.to_string()])
            .args(["--rate", &self.args.read_rate.to_string()])
            .args(["--prefix", &self.prefix])
            .args(["--level", self.args.level.name()])
            .args(["--durability", self.args.durability.name()])
            .args(["--db-via", &self.db_via])
            .arg("--history")
            .arg(&history)
            .args([
                "--seed",
                &(self.args.seed * 1000 + u64::from(index) + u64::from(self.restarts) * 100).to_string(),
            ])
            .env(REDIS_URL_ENV, self.redis.expose())
            .env(QUEUE_URL_ENV, self.queue.expose())
            .env(DATABASE_URL_ENV, self.database.expose());
        WorkerProc::start(name, cmd, stderr, history)
    }
}

/// The faults of a drafts run.
fn faults(arg: FaultArg, durability: DurabilityArg) -> Result<Vec<Fault>> {
    Ok(match arg {
        FaultArg::None => vec![],
        FaultArg::InstanceKill => vec![Fault::InstanceKill],
        FaultArg::RedisKill => vec![Fault::RedisKill],
        FaultArg::DbDown => vec![Fault::DbDown],
        FaultArg::All if durability == DurabilityArg::Replicas => vec![Fault::InstanceKill, Fault::DbDown],
        FaultArg::All => vec![Fault::InstanceKill, Fault::RedisKill, Fault::DbDown],
        other => bail!(
            "--workload drafts runs the faults instance-kill, redis-kill, db-down and all, not {}",
            other.name()
        ),
    })
}

async fn start_redis(durability: DurabilityArg) -> Result<(RedisServer, Option<RedisServer>)> {
    tokio::task::spawn_blocking(move || -> Result<_> {
        let mut b = RedisServer::builder();
        if durability == DurabilityArg::Fsync {
            b = b.arg("appendonly", "yes").arg("appendfsync", "always");
        }
        let master = b.try_start().context("cannot start redis-server (apt-get install redis-server?)")?;
        let replica = if durability == DurabilityArg::Replicas {
            let r = RedisServer::builder()
                .arg("replicaof", format!("127.0.0.1 {}", master.port()))
                .try_start()
                .context("cannot start the replica")?;
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !master.command(&["INFO", "replication"]).unwrap_or_default().contains("state=online") {
                if std::time::Instant::now() > deadline {
                    bail!("the replica did not come online within 20 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Some(r)
        } else {
            None
        };
        Ok((master, replica))
    })
    .await
    .context("redis start task")?
}

/// Runs the drafts torture run.
pub async fn run(args: CheckArgs) -> Result<()> {
    if args.cluster || args.ring || args.redis.is_some() || args.database.is_some() {
        bail!(
            "--workload drafts starts its own Redis and Postgres (no --redis, --database, --cluster, --ring)"
        );
    }
    let faults = faults(args.fault, args.durability)?;
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    eprintln!(
        "strata check: drafts, durability {}, starting redis-server and postgres ...",
        args.durability.name()
    );
    // The queue on a Redis of its own, configured for its durability level (as it
    // should be deployed: an fsynced AOF would slow every cache and backplane write
    // too); the tier and backplane on a plain one.
    let (mut redis, _replica) = start_redis(args.durability).await?;
    let (cache_redis, _) = start_redis(DurabilityArg::Acknowledged).await?;
    let (_postgres, database) = tokio::task::spawn_blocking(|| -> std::io::Result<_> {
        let server = PostgresServer::builder().try_start()?;
        let url = server.create_database("strata_check_drafts")?;
        Ok((server, url))
    })
    .await
    .context("postgres start task")?
    .context("cannot start postgres (apt-get install postgresql?)")?;
    let database = SecretUrl::new(database);
    let db = setup::connect(&database, None, 2).await?;
    sqlx::query(
        "CREATE TABLE drafts (id BIGINT PRIMARY KEY, body TEXT NOT NULL CHECK (body NOT LIKE 'poison%'), seq BIGINT NOT NULL)",
    )
    .execute(&db)
    .await
    .context("CREATE TABLE drafts")?;
    let target = tokio::net::lookup_host(setup::server_address(&database)?)
        .await?
        .next()
        .ok_or_else(|| anyhow!("the database address resolves to nothing"))?;
    let proxy = FaultProxy::start(target).await.context("cannot start the fault proxy")?;
    let redis_url = SecretUrl::new(redis.url());
    let mut fleet = Fleet {
        args: &args,
        redis: SecretUrl::new(cache_redis.url()),
        queue: redis_url.clone(),
        database: database.clone(),
        db_via: proxy.addr().to_string(),
        prefix: format!("strata-check-drafts-{}", std::process::id()),
        dir: dir.path(),
        restarts: 0,
    };
    let mut workers = Vec::new();
    for i in 0..args.instances {
        workers.push(fleet.spawn(i)?);
    }
    for w in &mut workers {
        w.expect("ready", Duration::from_secs(60)).await?;
    }
    for w in &mut workers {
        w.send("start").await?;
    }
    let queue = Arc::new(worker::queue(&redis_url, &fleet.prefix, DurabilityArg::Acknowledged).await?);
    let longest = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn(sample_pending(queue.clone(), longest.clone()));
    eprintln!("strata check: load for {} s, faults {:?} ...", args.duration, faults);
    let start = Instant::now();
    let duration = Duration::from_secs(args.duration);
    let gap = duration / (faults.len() as u32 + 1);
    let mut notes = Vec::new();
    // When the queue's Redis died at a level that does not survive it.
    let mut losses = Vec::new();
    for (i, fault) in faults.iter().enumerate() {
        tokio::time::sleep_until(start + gap * (i as u32 + 1)).await;
        eprintln!("strata check: fault {} ...", fault.name());
        let note = match fault {
            Fault::InstanceKill => {
                let victim = if workers.len() > 1 { 1 } else { 0 };
                let w = &mut workers[victim];
                w.child.start_kill().context("kill -9 a worker")?;
                let _ = w.child.wait().await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                fleet.restarts += 1;
                let mut fresh = fleet.spawn(victim as u32)?;
                fresh.expect("ready", Duration::from_secs(60)).await?;
                fresh.send("start").await?;
                let old = std::mem::replace(&mut workers[victim], fresh);
                notes.push(format!(
                    "instance-kill: {} killed (SIGKILL), {} started after 1 s",
                    old.name, workers[victim].name
                ));
                workers.push(old);
                continue;
            }
            Fault::RedisKill => {
                // What the queue holds as it dies: lost with it unless the level keeps
                // it (the AOF at fsync).
                let waiting = queue.stats(NAMESPACE).await.map(|s| s.pending).unwrap_or(0);
                if args.durability == DurabilityArg::Acknowledged {
                    losses.push(strata_testkit::monotonic_ns());
                }
                redis.kill();
                tokio::time::sleep(REDIS_DOWN).await;
                tokio::task::block_in_place(|| redis.try_restart()).context("cannot restart Redis")?;
                let how = if args.durability == DurabilityArg::Fsync {
                    "from its AOF"
                } else {
                    "empty (no persistence)"
                };
                // Asked until the restarted server has loaded its AOF and answers.
                let mut after = None;
                for _ in 0..50 {
                    if let Ok(s) = queue.stats(NAMESPACE).await {
                        after = Some(s.pending);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let after = after.map_or("unknown".to_owned(), |n| n.to_string());
                format!(
                    "redis-kill: the queue's Redis SIGKILLed with {waiting} drafts' saves waiting, restarted after {} s \
                     {how}, {after} waiting then",
                    REDIS_DOWN.as_secs()
                )
            }
            Fault::DbDown => {
                proxy.blackhole(true);
                tokio::time::sleep(DB_DOWN).await;
                proxy.reset_all();
                proxy.blackhole(false);
                format!("db-down: the database blackholed for {} s", DB_DOWN.as_secs())
            }
            other => bail!("fault {} is not part of the drafts run", other.name()),
        };
        notes.push(note);
    }
    tokio::time::sleep_until(start + duration).await;
    let mut live = Vec::new();
    for mut w in workers {
        if w.child.try_wait().ok().flatten().is_some() {
            continue;
        }
        w.send("stop").await?;
        w.expect("stopped", Duration::from_secs(60)).await?;
        live.push(w);
    }
    eprintln!("strata check: load stopped; draining ...");
    let drained = match live.first_mut() {
        Some(w) => {
            w.send("drain").await?;
            w.expect("drained", Duration::from_secs(120)).await?
        }
        None => bail!("no live instance to drain"),
    };
    sampler.abort();
    let dead = queue.dead_letters(NAMESPACE, 100).await.context("reading the dead letters")?;
    let stats = queue.stats(NAMESPACE).await.context("reading the queue")?;
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, body FROM drafts").fetch_all(&db).await.context("reading the table")?;
    let rows: HashMap<i64, u64> =
        rows.into_iter().map(|(k, b)| (k, worker::rev_of(&b).unwrap_or(0))).collect();
    let mut ops: Vec<Op> = Vec::new();
    for entry in std::fs::read_dir(dir.path())?.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "jsonl") {
            for line in std::fs::read_to_string(&path)?.lines() {
                // A line cut by kill -9 is the only kind that fails to parse.
                if let Ok(op) = serde_json::from_str::<Op>(line) {
                    ops.push(op);
                }
            }
        }
    }
    let (bound, _) = setup::Timing {
        max_stale: Duration::from_millis(args.max_stale_ms),
        heartbeat: Duration::from_millis(args.heartbeat_ms),
    }
    .bound(args.level);
    let mut verdict = judge(&ops, &rows, POISON, bound, &losses);
    verdict.dead_letters = dead.iter().map(|d| (d.key.clone(), d.attempts, d.error.clone())).collect();
    verdict.poison_dead_lettered = dead.iter().any(|d| d.key == POISON.to_string());
    verdict.unexpected_dead_letters = dead.iter().filter(|d| d.key != POISON.to_string()).count() as u64;
    verdict.left_pending = stats.pending;
    verdict.longest_pending_ms = longest.load(Ordering::SeqCst);
    for w in &mut live {
        let _ = w.send("exit").await;
    }
    report(&args, &faults, &notes, &drained, &verdict)
}

/// Samples the queue's oldest waiting save every 250 ms.
async fn sample_pending(queue: Arc<strata_redis::RedisWriteBehindQueue>, longest: Arc<AtomicU64>) {
    loop {
        if let Ok(s) = queue.stats(NAMESPACE).await
            && let Some(oldest) = s.oldest_ms
        {
            longest.fetch_max(s.now_ms.saturating_sub(oldest), Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn report(
    args: &CheckArgs,
    faults: &[Fault],
    notes: &[String],
    drained: &str,
    v: &DraftsVerdict,
) -> Result<()> {
    let redis_lost_allowed =
        args.durability == DurabilityArg::Acknowledged && faults.contains(&Fault::RedisKill);
    println!(
        "strata check --workload drafts: level {}, durability {}, {} instances, {} s",
        args.level.name(),
        args.durability.name(),
        args.instances,
        args.duration
    );
    for n in notes {
        println!("  fault  {n}");
    }
    println!("  drain  {drained} keys left waiting after the drain");
    println!(
        "  saves acknowledged            {} ({} failed, not acknowledged)",
        v.acknowledged_saves, v.failed_saves
    );
    println!(
        "  drafts saved                  {} ({} rows equal their last acknowledged save)",
        v.drafts_saved, v.rows_matching
    );
    println!(
        "  acknowledged saves lost       {}{}",
        v.lost_saves,
        if redis_lost_allowed && v.lost_saves > 0 {
            " (Redis was killed at durability acknowledged: allowed by the level)"
        } else {
            ""
        }
    );
    for (k, last, row) in &v.lost_examples {
        println!("    draft {k}: last acknowledged revision {last}, table holds {row}");
    }
    println!("  rows of no save               {}", v.unknown_rows);
    println!("  reads                         {} ({} failed)", v.reads, v.failed_reads);
    println!(
        "  read-your-writes violations   {} beyond the level's bound ({} with zero slack)",
        v.read_your_writes_violations, v.read_your_writes_zero_slack
    );
    println!(
        "  dead letters                  {} (poison draft {POISON} {})",
        v.dead_letters.len(),
        if v.poison_dead_lettered { "among them" } else { "MISSING" }
    );
    for (k, attempts, error) in v.dead_letters.iter().take(5) {
        println!("    draft {k}: {attempts} attempts, {}", crate::secret::scrub(error));
    }
    for (op, e, n) in &v.top_errors {
        println!("    {n} failed {op}s: {}", crate::secret::scrub(e));
    }
    println!("  still waiting after the drain {}", v.left_pending);
    println!("  longest pending save          {} ms", v.longest_pending_ms);
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "workload": "drafts", "level": args.level.name(), "durability": args.durability.name(),
            "faults": faults.iter().map(|f| f.name()).collect::<Vec<_>>(), "notes": notes, "verdict": v,
            "redis_loss_allowed_by_level": redis_lost_allowed,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let broken = (v.lost_saves > 0 && !redis_lost_allowed)
        || v.unknown_rows > 0
        || v.read_your_writes_violations > 0
        || !v.poison_dead_lettered
        || v.unexpected_dead_letters > 0
        || v.left_pending > 0;
    if broken {
        println!("FAIL: a write-behind promise was broken");
        std::process::exit(1);
    }
    println!("PASS");
    Ok(())
}
