//! `strata bench --scenario drafts`: the draft-autosave story. Users save a draft every
//! 1–2 s while active (one instance per user: their device's), send a heartbeat every
//! 5 s, and now and then open the draft on another device (another instance) — just
//! after a save, or later, once the draft went idle. Three strategies run on the same
//! schedule ([`strategies`]); after each run the strategy drains (a graceful stop) and
//! every user's row is compared with the last save the user was told succeeded.
//!
//! * [`schedule`] draws the events from the seed;
//! * [`db`] is the drafts table and its counters;
//! * [`runner`] offers the schedule open-loop and judges the reads;
//! * [`report`] makes the table, the JSON and the SVG.

pub mod db;
pub mod report;
pub mod runner;
pub mod schedule;
pub mod strategies;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use self::db::DraftsDb;
use self::report::{DraftsReport, StrategyRow};
use self::runner::run_events;
use self::schedule::DraftParams;
use self::strategies::{DraftFleet, DraftStrategy, NaiveWriteBehind, StrataDrafts, WriteThrough};
use super::BenchArgs;
use super::redis_nodes::{self, NodesReport};

/// Runs the drafts scenario.
pub async fn run(args: &BenchArgs) -> Result<()> {
    if args.strategies.is_some() {
        bail!(
            "--strategies names the read scenarios' strategies; drafts always runs write-through, naive-write-behind and strata"
        );
    }
    if args.redis_ring.is_some() || args.redis_cluster.is_some() {
        bail!("--scenario drafts runs on one Redis (--redis) or embedded");
    }
    let flush_delay = Duration::from_secs_f64(args.flush_delay);
    let params = DraftParams {
        users: args.users,
        instances: args.instances.max(1) as usize,
        duration: Duration::from_secs_f64(args.duration),
        read_after_save: 0.1,
        seed: args.seed,
    };
    let (events, saves) = schedule::generate(&params);
    let db = Arc::new(DraftsDb::open(args.database.as_ref()).await?);
    let fleet = DraftFleet {
        db: db.clone(),
        instances: params.instances,
        redis: args.redis.clone(),
        run_id: format!("strata-bench:{}:{:08x}", std::process::id(), rand::random::<u32>()),
        flush_delay,
    };
    let mut report =
        DraftsReport::new(&params, flush_delay, events.len(), saves, db.description(), args.redis.is_some());
    eprintln!("{}", report.headline());
    let urls: Vec<_> = args.redis.iter().cloned().collect();
    for name in ["write-through", "naive-write-behind", "strata"] {
        db.reset().await?;
        let strategy: Arc<dyn DraftStrategy> = match name {
            "write-through" => Arc::new(WriteThrough::start(&fleet).await?),
            "naive-write-behind" => Arc::new(NaiveWriteBehind::start(&fleet).await?),
            _ => Arc::new(StrataDrafts::start(&fleet).await?),
        };
        let before = redis_nodes::sample(&urls).await?;
        let began = Instant::now();
        let outcome = run_events(strategy.clone(), &events, &db, params.users).await;
        let elapsed = began.elapsed();
        let (reads, statements, rows) = db.counts();
        let after = redis_nodes::sample(&urls).await?;
        strategy.drain().await.with_context(|| format!("{name}: drain"))?;
        let (_, _, rows_after_drain) = db.counts();
        let lost = lost_saves(&db, &outcome.1).await?;
        let mut row = StrategyRow::new(
            strategy.name(),
            &outcome.0,
            elapsed,
            (reads, statements, rows),
            rows_after_drain - rows,
            lost,
            &db,
        );
        if !urls.is_empty() {
            row.redis = Some(NodesReport::between(&before, &after, elapsed.as_secs_f64()));
        }
        strategy.close().await.with_context(|| format!("{name}: close"))?;
        if let Some(e) = &outcome.0.first_error {
            eprintln!(
                "warning: {name}: {} requests failed; first error: {}",
                outcome.0.errors,
                crate::secret::scrub(e)
            );
        }
        eprintln!("{}", row.summary_line());
        report.strategies.push(row);
    }
    drop(fleet);
    if let Some(db) = Arc::into_inner(db) {
        db.close().await;
    }
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).context("cannot encode the JSON report")?;
        std::fs::write(path, json + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        report::write_svg(&report, path)?;
    }
    Ok(())
}

/// Users whose row is not their last acknowledged save, after the drain.
async fn lost_saves(db: &DraftsDb, acked: &[AtomicU64]) -> Result<u64> {
    let rows = db.revisions().await?;
    Ok(acked
        .iter()
        .enumerate()
        .filter(|(user, rev)| {
            let rev = rev.load(Ordering::SeqCst);
            rev > 0 && rows.get(&(*user as u64)).copied().unwrap_or(0) != rev
        })
        .count() as u64)
}
