//! The checks `strata bench` makes before any load: a bad argument, an output that
//! cannot be written or a server that does not answer fails in seconds, not after
//! minutes of load.

use anyhow::{Context, Result, bail};

use super::{BenchArgs, REACH_TIMEOUT};
use crate::secret::{self, SecretUrl};

/// Checks the arguments, the output paths and that every Redis server given answers.
pub(super) async fn check_arguments(args: &BenchArgs) -> Result<()> {
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        bail!("--duration must be a positive number of seconds, got {}", args.duration);
    }
    for (path, what) in [(&args.json, "--json"), (&args.plot, "--plot"), (&args.timeline, "--timeline")] {
        if let Some(path) = path {
            check_writable(path, what)?;
        }
    }
    if args.redis_backplane.is_some() && args.redis.is_none() && args.redis_ring.is_none() {
        bail!(
            "--redis-backplane needs --redis or --redis-ring: it moves strata's backplane off the tier's server"
        );
    }
    let servers =
        args.redis.iter().chain(args.redis_ring.iter().flatten()).chain(args.redis_cluster.iter().flatten());
    for url in servers.chain(args.redis_backplane.iter()) {
        check_redis(url).await?;
    }
    Ok(())
}

/// Fails at once, before minutes of load, when `path` could not be written at the end.
fn check_writable(path: &std::path::Path, what: &str) -> Result<()> {
    let existed = path.exists();
    std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| {
        format!("{what} {}: cannot be written (does its directory exist?)", path.display())
    })?;
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Fails within seconds when a Redis server given is not reachable.
async fn check_redis(url: &SecretUrl) -> Result<()> {
    let client = redis::Client::open(url.expose()).with_context(|| format!("bad Redis URL {url}"))?;
    let ping = async {
        let mut c = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut c).await
    };
    match tokio::time::timeout(REACH_TIMEOUT, ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => bail!("cannot reach Redis at {url}: {}", secret::scrub(&e.to_string())),
        Err(_) => bail!("cannot reach Redis at {url}: no answer within {REACH_TIMEOUT:?}"),
    }
}
