//! Fleet-level tests: full `Cache`s on a real Redis, each instance with its own
//! `RedisTier` and backplane, against faults. The harness is here: a "database" with
//! versioned rows, fleet instances, a steady read workload and its figures. The fault
//! tests print their figures (run with `--nocapture`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use strata::backplane::Backplane;
use strata::tier::{Lookup, Tier};
use strata::{BreakerConfig, Cache, Codec, PostcardCodec};
use strata_redis::{RedisStreamBackplane, RedisTier};
use strata_testkit::RedisServer;
use tokio::sync::oneshot;

use crate::support;

mod invalidation;
mod liveness;
mod outage;
mod stampede;
mod subscriber_faults;

/// The "database": rows (each `row{k}@v{version}` for versioned rows), when each
/// version was committed, and a count of loader calls.
#[derive(Clone, Default)]
struct Db {
    rows: Arc<Mutex<HashMap<u64, String>>>,
    commits: Arc<Mutex<HashMap<(u64, u64), Instant>>>,
    loads: Arc<AtomicU64>,
    delay: Duration,
}

type LoadResult = Result<Option<String>, std::io::Error>;

fn row(k: u64, version: u64) -> String {
    format!("row{k}@v{version}")
}

/// The version of a row value (0 for a value without one, or none).
fn version_of(value: Option<&str>) -> u64 {
    value.and_then(|v| v.rsplit_once("@v")).and_then(|(_, n)| n.parse().ok()).unwrap_or(0)
}

impl Db {
    fn set(&self, k: u64, v: &str) {
        self.rows.lock().insert(k, v.to_owned());
    }
    /// Every key at version 1.
    fn seed(&self, keys: impl IntoIterator<Item = u64>) {
        let now = Instant::now();
        let mut rows = self.rows.lock();
        for k in keys {
            rows.insert(k, row(k, 1));
            self.commits.lock().insert((k, 1), now);
        }
    }
    /// Commits a new version of row `k`; returns it.
    fn bump(&self, k: u64) -> u64 {
        let mut rows = self.rows.lock();
        let v = version_of(rows.get(&k).map(String::as_str)) + 1;
        rows.insert(k, row(k, v));
        self.commits.lock().insert((k, v), Instant::now());
        v
    }
    /// The committed version of row `k`: the truth.
    fn version(&self, k: u64) -> u64 {
        version_of(self.rows.lock().get(&k).map(String::as_str))
    }
    fn committed_at(&self, k: u64, version: u64) -> Option<Instant> {
        self.commits.lock().get(&(k, version)).copied()
    }
    fn loads(&self) -> u64 {
        self.loads.load(Ordering::SeqCst)
    }
    /// A loader that reads the row when called, then takes `self.delay` (a query
    /// whose snapshot is taken at its start).
    fn loader(&self, k: u64) -> impl FnOnce() -> BoxFuture<'static, LoadResult> + Send + 'static {
        self.loader_with(k, self.delay, None)
    }
    /// Like `loader`, with its own duration, telling `read` what it read.
    fn loader_with(
        &self,
        k: u64,
        delay: Duration,
        read: Option<oneshot::Sender<String>>,
    ) -> impl FnOnce() -> BoxFuture<'static, LoadResult> + Send + 'static {
        let db = self.clone();
        move || {
            Box::pin(async move {
                db.loads.fetch_add(1, Ordering::SeqCst);
                let value = db.rows.lock().get(&k).cloned();
                if let Some(tx) = read {
                    let _ = tx.send(value.clone().unwrap_or_default());
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Ok(value)
            })
        }
    }
}

/// Settings of one fleet instance; the default is what `instance` uses. Timeout and
/// breaker are the cache's: the tier keeps its default response timeout (1 s), as in
/// production.
#[derive(Clone)]
struct Opts {
    l2_timeout: Duration,
    cache_breaker: BreakerConfig,
    ttl: Duration,
    l1_ttl: Option<Duration>,
    jitter: f64,
    max_stale: Duration,
    heartbeat: Duration,
    lease_wait: Duration,
    lazy: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            l2_timeout: Duration::from_millis(200),
            cache_breaker: BreakerConfig::default(),
            ttl: Duration::from_secs(60),
            l1_ttl: None,
            jitter: 0.1,
            max_stale: Duration::from_secs(2),
            heartbeat: Duration::from_millis(200),
            lease_wait: Duration::from_millis(500),
            lazy: false,
        }
    }
}

/// A full cache instance: its own `RedisTier` on `tier_url` (prefix `fleet`),
/// namespace `payment`, the given backplane; waits until it is ready.
async fn instance_with(tier_url: &str, backplane: Arc<dyn Backplane>, o: &Opts) -> Cache<u64, String> {
    let tier = RedisTier::builder(tier_url).prefix("fleet").lazy(o.lazy).build().await.expect("tier");
    let mut builder = Cache::builder("payment")
        .tier(Arc::new(tier))
        .backplane(backplane)
        .ttl(o.ttl)
        .ttl_jitter(o.jitter)
        .max_stale(o.max_stale)
        .l2_timeout(o.l2_timeout)
        .lease_wait(o.lease_wait)
        .breaker(o.cache_breaker.clone())
        .heartbeat_interval(o.heartbeat)
        .early_refresh(0.0);
    if let Some(t) = o.l1_ttl {
        builder = builder.l1_ttl(t);
    }
    let cache = builder.build().expect("cache");
    tokio::time::timeout(Duration::from_secs(5), cache.ready()).await.expect("cache ready");
    cache
}

async fn instance(server: &RedisServer, backplane: Arc<dyn Backplane>) -> Cache<u64, String> {
    instance_with(&server.url(), backplane, &Opts::default()).await
}

async fn stream(server: &RedisServer) -> RedisStreamBackplane {
    stream_builder(server).build().await.expect("stream backplane")
}

fn stream_builder(server: &RedisServer) -> strata_redis::RedisStreamBackplaneBuilder {
    RedisStreamBackplane::builder(server.url())
        .block(Duration::from_millis(300))
        .read_grace(Duration::from_millis(300))
        .reconnect_backoff(Duration::from_millis(300), Duration::from_millis(600))
}

/// Polls until `key` is gone from `cache`'s L1; returns how long that took.
async fn until_dropped(cache: &Cache<u64, String>, key: u64, within: Duration, what: &str) -> Duration {
    let started = Instant::now();
    let poll = async {
        while cache.get_local(&key).is_some() {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    };
    tokio::time::timeout(within, poll)
        .await
        .unwrap_or_else(|_| panic!("{what}: still cached after {within:?}"));
    started.elapsed()
}

fn kill_clients(server: &RedisServer, prefix: &str) {
    for (id, _) in support::clients_named(server, prefix) {
        server.command(&["CLIENT", "KILL", "ID", &id]).expect("CLIENT KILL");
    }
}

/// Ids of the clients in `CLIENT LIST TYPE <kind>` (e.g. `pubsub`).
fn client_ids_of_type(server: &RedisServer, kind: &str) -> Vec<String> {
    let list = server.command(&["CLIENT", "LIST", "TYPE", kind]).expect("CLIENT LIST TYPE");
    list.lines()
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
        .map(|id| id.trim_start_matches(|c: char| !c.is_ascii_digit()).to_owned())
        .collect()
}

/// Polls `cond` every millisecond for up to `within`; returns how long it took.
async fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    let poll = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(within, poll).await.unwrap_or_else(|_| panic!("{what}: not within {within:?}"));
    started.elapsed()
}

/// The `p`-quantile (0..=1) of sorted durations.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Milliseconds with one decimal, for the printed figures.
fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn ms_opt(d: Option<Duration>) -> String {
    d.map_or_else(|| "never".to_owned(), ms)
}

/// One read of a workload.
#[derive(Debug, Clone)]
struct Read {
    /// When `get_or_load` was called.
    at: Instant,
    latency: Duration,
    instance: usize,
    key: u64,
    /// The committed version when the read began.
    truth: u64,
    /// The version returned, or the error.
    got: Result<u64, String>,
}

impl Read {
    fn is_stale(&self) -> bool {
        matches!(self.got, Ok(v) if v < self.truth)
    }
}

/// Reads at a steady rate, round-robin over `caches`, on keys drawn from `keys`;
/// each read runs on its own task (a slow read does not delay the next ones).
struct Workload {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<Vec<Read>>,
}

impl Workload {
    fn start(caches: Vec<Cache<u64, String>>, db: Db, keys: Vec<u64>, per_sec: u32) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let handle = tokio::spawn(async move {
            let reads = Arc::new(Mutex::new(Vec::new()));
            let mut tasks = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1) / per_sec);
            let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
            let mut n = 0usize;
            while !stopped.load(Ordering::SeqCst) {
                tick.tick().await;
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let key = keys[(rng % keys.len() as u64) as usize];
                let instance = n % caches.len();
                n += 1;
                let (cache, db, reads) = (caches[instance].clone(), db.clone(), reads.clone());
                tasks.spawn(async move {
                    let truth = db.version(key);
                    let at = Instant::now();
                    let r =
                        tokio::time::timeout(Duration::from_secs(5), cache.get_or_load(&key, db.loader(key)))
                            .await;
                    let latency = at.elapsed();
                    let got = match r {
                        Ok(Ok(v)) => Ok(version_of(v.as_deref())),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("no answer within 5 s".to_owned()),
                    };
                    reads.lock().push(Read { at, latency, instance, key, truth, got });
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
            std::mem::take(&mut *reads.lock())
        });
        Workload { stop, handle }
    }

    async fn finish(self) -> Vec<Read> {
        self.stop.store(true, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("workload stops")
            .expect("workload task")
    }
}

/// Figures of the reads that began in `[from, to)`.
struct Phase {
    reads: usize,
    errors: usize,
    stale: usize,
    /// The longest time a stale read came after the commit it missed.
    max_staleness: Duration,
    latencies: Vec<Duration>,
}

fn phase(reads: &[Read], db: &Db, from: Instant, to: Instant) -> Phase {
    let mine: Vec<&Read> = reads.iter().filter(|r| r.at >= from && r.at < to).collect();
    let mut latencies: Vec<Duration> = mine.iter().map(|r| r.latency).collect();
    latencies.sort();
    let mut max_staleness = Duration::ZERO;
    for r in &mine {
        if let Ok(got) = r.got
            && got < r.truth
            && let Some(missed) = db.committed_at(r.key, got + 1)
        {
            max_staleness = max_staleness.max(r.at.saturating_duration_since(missed));
        }
    }
    Phase {
        reads: mine.len(),
        errors: mine.iter().filter(|r| r.got.is_err()).count(),
        stale: mine.iter().filter(|r| r.is_stale()).count(),
        max_staleness,
        latencies,
    }
}

/// What L2 holds for `key` (fresh or soft-expired), as a row version; `None` when
/// it holds nothing. Read with a tier handle of its own (`crate::support::redis_tier`, whose
/// 2 s timeout matters right after SIGCONT, when Redis first works through the
/// commands queued during the pause).
async fn l2_version(probe: &RedisTier, key: u64) -> Option<u64> {
    let env = match probe.lookup("payment", &key.to_string(), None).await.expect("probe lookup") {
        Lookup::Hit(env) => env,
        Lookup::Miss { stale: Some(env), .. } => env,
        Lookup::Miss { stale: None, .. } => return None,
    };
    let bytes = env.value?;
    let value: String = PostcardCodec::<String>::default().decode(&bytes).expect("decode l2 value");
    Some(version_of(Some(&value)))
}
