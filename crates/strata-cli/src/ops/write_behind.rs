//! `strata write-behind`: a namespace's write-behind queue in Redis, from a shell: what
//! waits (`pending`), the dead letters (`dead`), and putting dead letters back in the
//! queue once their cause is fixed (`requeue`).

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use strata::write_behind::WriteBehindQueue;
use strata_redis::{DEFAULT_QUEUE_GROUPS, RedisWriteBehindQueue};

use crate::secret::{self, SecretUrl};

/// Arguments of `strata write-behind`.
#[derive(Debug, Args)]
pub struct WriteBehindArgs {
    /// Redis URL of the fleet's write-behind queue (its password is never printed).
    #[arg(long, value_name = "URL")]
    pub redis: SecretUrl,
    /// The cache's namespace.
    #[arg(long, value_name = "NS")]
    pub namespace: String,
    /// Key prefix of the queue, as the fleet's `RedisWriteBehindQueueBuilder::prefix`.
    #[arg(long, default_value = super::DEFAULT_PREFIX)]
    pub prefix: String,
    /// Groups the queue is split into, as the fleet's builder sets them (`groups`).
    #[arg(long, default_value_t = DEFAULT_QUEUE_GROUPS)]
    pub groups: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub action: Action,
}

/// `strata write-behind` actions.
#[derive(Debug, Subcommand)]
pub enum Action {
    /// Keys waiting to be written, their bytes, dead letters, the oldest save's age.
    Pending,
    /// The dead letters, oldest first: key, sequence, attempts, last error.
    Dead {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        max: usize,
    },
    /// Puts dead letters back in the queue, due now, attempts reset: one `--key`, or
    /// `--all`.
    Requeue {
        /// The key (its text form).
        #[arg(long, conflicts_with = "all")]
        key: Option<String>,
        /// Every dead letter of the namespace.
        #[arg(long)]
        all: bool,
    },
}

/// Runs `strata write-behind`.
pub async fn run(args: WriteBehindArgs) -> Result<()> {
    let redis = &args.redis;
    // An ops tool reads and repairs: it must not refuse a server whose eviction policy
    // the fleet's own builder would (the fleet decides that).
    let queue = RedisWriteBehindQueue::builder(redis.expose())
        .prefix(&args.prefix)
        .groups(args.groups)
        .allow_eviction_risk(true)
        .build()
        .await
        .with_context(|| format!("cannot reach the write-behind queue at {redis}"))?;
    let ns = &args.namespace;
    match &args.action {
        Action::Pending => {
            let s = queue.stats(ns).await.context("reading the queue")?;
            let oldest_s = s.oldest_ms.map(|o| s.now_ms.saturating_sub(o) as f64 / 1e3);
            if args.json {
                let json = serde_json::json!({
                    "namespace": ns, "pending": s.pending, "pending_bytes": s.pending_bytes,
                    "dead": s.dead, "oldest_pending_s": oldest_s,
                });
                println!("{}", serde_json::to_string_pretty(&json)?);
            } else {
                println!(
                    "namespace {ns}: {} keys waiting ({} bytes), {} dead letters",
                    s.pending, s.pending_bytes, s.dead
                );
                if let Some(age) = oldest_s {
                    println!("oldest waiting save: {age:.1} s ago");
                }
            }
        }
        Action::Dead { max } => {
            let dead = queue.dead_letters(ns, *max).await.context("reading the dead letters")?;
            if args.json {
                let rows: Vec<_> = dead
                    .iter()
                    .map(|d| serde_json::json!({"key": d.key, "seq": d.seq, "attempts": d.attempts, "error": secret::scrub(&d.error), "at_ms": d.at_ms}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if dead.is_empty() {
                println!("namespace {ns}: no dead letters");
            } else {
                for d in &dead {
                    println!(
                        "{}\tseq {}\t{} attempts\t{}",
                        d.key,
                        d.seq,
                        d.attempts,
                        secret::scrub(&d.error)
                    );
                }
            }
        }
        Action::Requeue { key, all } => {
            if key.is_none() && !all {
                bail!("say which dead letters to requeue: --key KEY, or --all");
            }
            let n = queue.requeue_dead(ns, key.as_deref()).await.context("requeueing")?;
            if args.json {
                println!("{}", serde_json::json!({"namespace": ns, "requeued": n}));
            } else {
                println!("namespace {ns}: {n} dead letters requeued (due now)");
            }
        }
    }
    Ok(())
}
