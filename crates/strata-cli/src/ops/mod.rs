//! Ops commands for a running fleet: `strata invalidate` (after manual DML),
//! `strata stats` (a quick look at a namespace from a shell) and `strata write-behind`
//! (the write-behind queue: what waits, the dead letters, requeueing them).

pub mod invalidate;
pub mod stats;
pub mod write_behind;

use anyhow::{Context, Result};
use strata_redis::RedisTier;

use crate::secret::SecretUrl;

/// The key prefix the library's Redis tier and backplane use unless told otherwise.
pub const DEFAULT_PREFIX: &str = "strata";

/// The Redis and namespace an ops command acts on.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// Redis URL of the fleet's L2 tier and backplane (its password is never printed).
    #[arg(long, value_name = "URL")]
    pub redis: SecretUrl,
    /// The cache's namespace.
    #[arg(long, value_name = "NS")]
    pub namespace: String,
    /// Key prefix of the tier and the backplane, as the fleet's builders set it.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,
}

/// Where a namespace lives in Redis: `{prefix}:{<namespace>}:`, as the tier names it.
pub async fn namespace_base(redis: &SecretUrl, prefix: &str, namespace: &str) -> Result<String> {
    // Lazy: the tier only names keys here; the caller's connection does the reading.
    let tier = RedisTier::builder(redis.expose())
        .prefix(prefix)
        .lazy(true)
        .build()
        .await
        .with_context(|| format!("bad Redis URL {redis}"))?;
    let entry = tier.entry_key(namespace, "");
    Ok(entry.strip_suffix("e:").unwrap_or(&entry).to_owned())
}
