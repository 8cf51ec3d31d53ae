//! What the coordinator and its workers share: the row type, the table, the cache
//! configuration of every instance and the staleness bound derived from it.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use strata::tier::Tier;
use strata::{Cache, Consistency};
use strata_redis::{RedisStreamBackplane, RedisTier};

use crate::secret::SecretUrl;

/// The table every instance reads and the writer changes (written out in the SQL
/// literals, which sqlx wants static).
pub const TABLE: &str = "strata_check";
/// The cache namespace of the run.
pub const NAMESPACE: &str = "check";
/// Extra time allowed, on top of `max_stale` and the unhealthy-detection time, for a
/// stale read at the Invalidated level: scheduling on a loaded machine, the
/// subscriber's reconnect and replay.
pub const INVALIDATED_MARGIN: Duration = Duration::from_millis(250);
/// Measurement margin at the Strong level (the promise itself is 0): the recorded
/// interval of a read starts before the read and that of a write ends after it, so
/// recording only ever makes a read look *less* stale; 1 ms covers the rest.
pub const STRONG_MARGIN: Duration = Duration::from_millis(1);
/// Each database statement of a worker gives up after this (the loader, the writer's
/// transaction), so that a blackholed database makes operations fail, not hang.
pub const DB_TIMEOUT: Duration = Duration::from_secs(1);
/// The cache's hard timeout for loads (above [`DB_TIMEOUT`]).
pub const HARD_TIMEOUT: Duration = Duration::from_secs(2);
/// The L2 timeout of every instance.
pub const L2_TIMEOUT: Duration = Duration::from_millis(50);
/// Entries live long enough never to expire during a run: only invalidation removes them.
pub const TTL: Duration = Duration::from_secs(600);

/// The consistency level under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Level {
    /// `Consistency::Invalidated`: bounded staleness (propagation delay while the
    /// backplane is healthy, `max_stale` while it is not).
    Invalidated,
    /// `Consistency::Strong`: read-your-writes across the fleet.
    Strong,
}

impl Level {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Level::Invalidated => "invalidated",
            Level::Strong => "strong",
        }
    }

    /// The library's level.
    pub fn consistency(self) -> Consistency {
        match self {
            Level::Invalidated => Consistency::Invalidated,
            Level::Strong => Consistency::Strong,
        }
    }
}

/// The timing settings every instance of a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// `max_stale`.
    pub max_stale: Duration,
    /// `heartbeat_interval`.
    pub heartbeat: Duration,
}

impl Timing {
    /// The Strong level's membership lease: four heartbeat intervals, the least the
    /// builder accepts (so that a silent member is given up on quickly).
    pub fn membership_lease(self) -> Duration {
        self.heartbeat * 4
    }

    /// The bound on stale reads the level documents, with its margin, and how it was
    /// derived.
    pub fn bound(self, level: Level) -> (Duration, String) {
        match level {
            Level::Invalidated => {
                let detect = self.heartbeat * 3;
                let bound = self.max_stale + detect + INVALIDATED_MARGIN;
                let how = format!(
                    "max_stale {} ms + unhealthy detection 3 × heartbeat {} ms + margin {} ms",
                    self.max_stale.as_millis(),
                    self.heartbeat.as_millis(),
                    INVALIDATED_MARGIN.as_millis()
                );
                (bound, how)
            }
            Level::Strong => {
                (STRONG_MARGIN, format!("0 (read-your-writes) + margin {} ms", STRONG_MARGIN.as_millis()))
            }
        }
    }
}

/// A row of the table; the cached value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// The key.
    pub id: u64,
    /// Bumped by the database on every write.
    pub version: u64,
    /// Something to carry.
    pub payload: String,
}

/// Set (by `strata check --wait-for-replicas`) in the workers' environment: the
/// Cluster tier acknowledges invalidations once a replica has them.
pub const WAIT_FOR_REPLICAS_ENV: &str = "STRATA_CHECK_WAIT_FOR_REPLICAS";

/// Set (by `strata check --ring`) in the workers' environment: the ring's servers,
/// comma-separated (the stream backplane stays on the one Redis).
pub const RING_URLS_ENV: &str = "STRATA_CHECK_RING_URLS";

/// One instance's L2 tier: a `RedisTier` on `redis`, or with `cluster` (`redis` then
/// lists the Cluster's nodes, comma-separated) a `ShardedTier` of 64 virtual shards
/// over a Cluster `RedisTier`. The tier's own response timeout stays a backstop (1 s);
/// the cache's l2_timeout bounds each L2 call.
async fn tier(
    redis: &SecretUrl,
    prefix: &str,
    cluster: bool,
    ring: Option<&SecretUrl>,
) -> Result<(Arc<dyn Tier>, Option<RedisTier>)> {
    if let Some(ring) = ring {
        // A ring of standalone servers, named by position, with a gutter.
        let mut builder = strata::ShardedTier::builder()
            .gutter(Duration::from_secs(5))
            .shard_timeout(L2_TIMEOUT.mul_f64(0.8));
        for (i, url) in ring.expose().split(',').enumerate() {
            let t = RedisTier::builder(url)
                .prefix(prefix)
                .build()
                .await
                .with_context(|| format!("cannot connect the RedisTier to ring node {i}"))?;
            builder = builder.shard(format!("node-{i}"), Arc::new(t));
        }
        let sharded = builder.build().map_err(|e| anyhow!("cannot build the ring: {e}"))?;
        return Ok((Arc::new(sharded), None));
    }
    if cluster {
        let nodes: Vec<String> = redis.expose().split(',').map(str::to_owned).collect();
        let mut builder = RedisTier::cluster_builder(nodes).prefix(prefix);
        if std::env::var_os(WAIT_FOR_REPLICAS_ENV).is_some() {
            builder = builder.wait_for_replicas(1, Duration::from_millis(20));
        }
        let tier = builder
            .build()
            .await
            .with_context(|| format!("cannot connect the RedisTier to the Cluster at {redis}"))?;
        let sharded = tier
            .clone()
            .cluster_shards(strata_redis::DEFAULT_CLUSTER_SHARDS)
            // Below the cache's l2_timeout, so a dead master is its shards' breakers'
            // business, not the whole tier's.
            .shard_timeout(L2_TIMEOUT.mul_f64(0.8))
            .build()
            .map_err(|e| anyhow!("cannot shard over the Cluster: {e}"))?;
        return Ok((Arc::new(sharded), Some(tier)));
    }
    let tier = RedisTier::builder(redis.expose())
        .prefix(prefix)
        .build()
        .await
        .with_context(|| format!("cannot connect the RedisTier to {redis}"))?;
    Ok((Arc::new(tier), None))
}

/// Builds one instance's cache on its own Redis connections (as a separate process
/// would have), at `level`, with the row version declared.
pub async fn build_cache(
    redis: &SecretUrl,
    cluster: bool,
    ring: Option<&SecretUrl>,
    prefix: &str,
    level: Level,
    timing: Timing,
) -> Result<Cache<u64, Row>> {
    let (tier, cluster_tier) = tier(redis, prefix, cluster, ring).await?;
    let backplane = match &cluster_tier {
        Some(ct) => RedisStreamBackplane::cluster_builder(redis.expose().split(',').map(str::to_owned))
            .prefix(prefix)
            .share_connection(ct)
            .build()
            .await
            .with_context(|| format!("cannot connect the RedisStreamBackplane to the Cluster at {redis}"))?,
        None => RedisStreamBackplane::builder(redis.expose())
            .prefix(prefix)
            .build()
            .await
            .with_context(|| format!("cannot connect the RedisStreamBackplane to {redis}"))?,
    };
    Cache::builder(NAMESPACE)
        .tier(tier)
        .backplane(Arc::new(backplane))
        .consistency(level.consistency())
        .max_stale(timing.max_stale)
        .heartbeat_interval(timing.heartbeat)
        .membership_lease(timing.membership_lease())
        .l2_timeout(L2_TIMEOUT)
        .loader_hard_timeout(HARD_TIMEOUT)
        .ttl(TTL)
        .version(|row: &Row| Some(row.version))
        .build()
        .context("cannot build the cache")
}

/// A cache on L2 only (no backplane, empty L1): `get` on it reads what L2 holds.
pub async fn l2_reader(
    redis: &SecretUrl,
    cluster: bool,
    ring: Option<&SecretUrl>,
    prefix: &str,
) -> Result<Cache<u64, Row>> {
    let (tier, _) = tier(redis, prefix, cluster, ring).await?;
    Cache::builder(NAMESPACE)
        .tier(tier)
        .l2_timeout(Duration::from_secs(1))
        .loader_hard_timeout(HARD_TIMEOUT)
        .ttl(TTL)
        .version(|row: &Row| Some(row.version))
        .build()
        .context("cannot build the L2 reader")
}

/// Connects to Postgres at `url`, or through `via` (`host:port`, the fault proxy) with
/// the URL's other settings.
pub async fn connect(url: &SecretUrl, via: Option<&str>, size: u32) -> Result<PgPool> {
    let mut options =
        PgConnectOptions::from_str(url.expose()).with_context(|| format!("bad Postgres URL {url}"))?;
    if let Some(via) = via {
        let (host, port) =
            via.rsplit_once(':').with_context(|| format!("--db-via {via} is not host:port"))?;
        let port: u16 = port.parse().with_context(|| format!("bad port in --db-via {via}"))?;
        options = options.host(host).port(port);
    }
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(DB_TIMEOUT)
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to Postgres at {url}"))
}

/// The Postgres server's address as `host:port` (for the fault proxy's target).
pub fn server_address(url: &SecretUrl) -> Result<String> {
    let options =
        PgConnectOptions::from_str(url.expose()).with_context(|| format!("bad Postgres URL {url}"))?;
    Ok(format!("{}:{}", options.get_host(), options.get_port()))
}

/// Reads one row straight from the database (the loader).
pub async fn select(pool: &PgPool, key: u64) -> Result<Option<Row>, sqlx::Error> {
    let row: Option<(i64, i64, String)> =
        sqlx::query_as("SELECT id, version, payload FROM strata_check WHERE id = $1")
            .bind(key as i64)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(id, version, payload)| Row { id: id as u64, version: version as u64, payload }))
}

/// (Re)creates the table with `keys` rows (ids 1..=keys) at version 1.
pub async fn create_table(pool: &PgPool, keys: u64) -> Result<()> {
    sqlx::query("DROP TABLE IF EXISTS strata_check").execute(pool).await.context("DROP TABLE")?;
    sqlx::query(
        "CREATE TABLE strata_check (id BIGINT PRIMARY KEY, version BIGINT NOT NULL, payload TEXT NOT NULL)",
    )
    .execute(pool)
    .await
    .context("CREATE TABLE")?;
    sqlx::query("INSERT INTO strata_check (id, version, payload) SELECT g, 1, 'row ' || g || ' v1' FROM generate_series(1, $1) g")
    .bind(keys as i64)
    .execute(pool)
    .await
    .context("seeding the table")?;
    Ok(())
}

/// Every row's version.
pub async fn versions(pool: &PgPool) -> Result<Vec<(u64, u64)>> {
    let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT id, version FROM strata_check ORDER BY id")
        .fetch_all(pool)
        .await
        .context("reading the final versions")?;
    Ok(rows.into_iter().map(|(id, v)| (id as u64, v as u64)).collect())
}

/// Picks keys: half of the picks go to the hottest tenth of the keys (so that reads
/// often follow writes of the same key closely), the rest uniformly.
pub fn pick_key(rng: &mut impl rand::Rng, keys: u64) -> u64 {
    let hot = (keys / 10).max(1);
    if rng.random_bool(0.5) { rng.random_range(1..=hot) } else { rng.random_range(1..=keys) }
}

/// Deletes every Redis key under `prefix` (the run's L2 entries and stream).
pub async fn delete_prefix(url: &SecretUrl, prefix: &str) -> Result<()> {
    let client = redis::Client::open(url.expose()).with_context(|| format!("bad Redis URL {url}"))?;
    let mut conn = client.get_multiplexed_async_connection().await.context("cannot connect to Redis")?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .context("SCAN")?;
        if !keys.is_empty() {
            redis::cmd("UNLINK").arg(&keys).query_async::<i64>(&mut conn).await.context("UNLINK")?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
