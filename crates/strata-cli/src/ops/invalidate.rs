//! `strata invalidate`: invalidates keys, a tag or a whole namespace through the same
//! Redis tier and stream backplane a library cache uses, so L2 is cleaned, the message
//! is durable in the stream, and at the Strong level every live member acknowledged it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use strata::{Cache, Consistency, Scope};
use strata_redis::{RedisStreamBackplane, RedisTier};

use super::Target;

/// Arguments of `strata invalidate`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("scope").required(true).args(["key", "tag", "all"]))]
pub struct InvalidateArgs {
    /// Where the namespace lives.
    #[command(flatten)]
    pub target: Target,
    /// Keys to invalidate, in their text form (repeat, or give several).
    #[arg(long, num_args = 1.., value_name = "K")]
    pub key: Vec<String>,
    /// Invalidate every entry carrying this tag.
    #[arg(long, value_name = "T")]
    pub tag: Option<String>,
    /// Invalidate the whole namespace.
    #[arg(long)]
    pub all: bool,
    /// The fleet's consistency level: at `strong` the command waits until every live
    /// member acknowledged the invalidation.
    #[arg(long, value_enum, default_value_t = Level::Invalidated)]
    pub consistency: Level,
    /// Seconds to wait for the backplane subscription (and, at strong, the membership
    /// lease) before giving up.
    #[arg(long, default_value_t = 15)]
    pub ready_timeout: u64,
}

/// The consistency levels the command can act at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Level {
    /// Invalidate L2 and publish the message.
    Invalidated,
    /// As `invalidated`, and wait for every live member's acknowledgement.
    Strong,
}

/// Runs `strata invalidate`.
pub async fn run(args: InvalidateArgs) -> Result<()> {
    let scope = if args.all {
        Scope::All
    } else if let Some(tag) = &args.tag {
        if tag.is_empty() {
            bail!("--tag is empty: give the tag to invalidate");
        }
        Scope::Tag(tag.clone())
    } else {
        if args.key.iter().any(String::is_empty) {
            bail!("--key is empty: give the keys to invalidate in their text form");
        }
        Scope::Keys(args.key.clone())
    };
    let redis = &args.target.redis;
    let tier = RedisTier::builder(redis.expose())
        .prefix(&args.target.prefix)
        .build()
        .await
        .with_context(|| format!("cannot connect the Redis tier to {redis}"))?;
    let backplane = RedisStreamBackplane::builder(redis.expose())
        .prefix(&args.target.prefix)
        .build()
        .await
        .with_context(|| format!("cannot connect the stream backplane to {redis}"))?;
    let stream = backplane.stream_key().to_owned();
    let consistency = match args.consistency {
        Level::Invalidated => Consistency::Invalidated,
        Level::Strong => Consistency::Strong,
    };
    // Keys stay text: the scope carries them as text, and members parse them.
    let cache = Cache::<String, Vec<u8>>::builder(&args.target.namespace)
        .tier(Arc::new(tier))
        .backplane(Arc::new(backplane))
        .consistency(consistency)
        .max_capacity(1)
        .build()
        .context("cannot set up the cache handle")?;
    let handle = cache.handle();
    let wait = Duration::from_secs(args.ready_timeout);
    if tokio::time::timeout(wait, handle.ready()).await.is_err() {
        cache.shutdown().await;
        bail!("the backplane on {redis} was not ready within {wait:?} (subscription or membership lease)");
    }
    let outcome = handle.invalidate(scope.clone()).await;
    let stats = handle.stats();
    cache.shutdown().await;
    outcome.with_context(|| {
        format!(
            "invalidating {} in namespace {:?} failed (L2 errors: {}, messages published: {})",
            scope.describe(),
            args.target.namespace,
            stats.l2_errors,
            stats.invalidations_sent
        )
    })?;
    let what = match &scope {
        Scope::Keys(keys) => format!("deleted {} key(s) from L2 ({})", keys.len(), keys.join(", ")),
        Scope::Tag(tag) => format!("invalidated tag {tag:?} in L2 (its entries are no longer served)"),
        Scope::All => "invalidated the whole namespace in L2 (epoch bumped)".to_owned(),
    };
    println!("namespace {:?} on {redis}:", args.target.namespace);
    println!("  l2: {what}");
    println!(
        "  backplane: published {} invalidation message(s) on stream {stream}",
        stats.invalidations_sent
    );
    if args.consistency == Level::Strong {
        println!("  strong: acknowledged by every live member");
    }
    Ok(())
}
