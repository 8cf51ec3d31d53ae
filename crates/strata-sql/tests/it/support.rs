//! Helpers shared by the modules: the schema, test databases (Postgres from
//! strata-testkit, SQLite in a temporary directory), an L2 tier that observes the
//! database at each delete and lock, and the "payment" cache fleet.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use strata::tier::{Envelope, FillOutcome, FillToken, Lookup, Tier};
use strata::{Cache, Consistency, InProcessBackplane, InProcessTier, Scope, Timestamp};
use strata_testkit::PostgresServer;

const SCHEMA: &str = "
CREATE TABLE payment (id BIGINT PRIMARY KEY, status TEXT NOT NULL, version BIGINT NOT NULL DEFAULT 1);
CREATE TABLE parent (id BIGINT PRIMARY KEY);
CREATE TABLE child (
    id BIGINT PRIMARY KEY,
    parent_id BIGINT NOT NULL REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED
);
INSERT INTO payment (id, status) VALUES (1, 'pending'), (2, 'pending'), (3, 'pending');
";

pub(crate) const UPDATE: &str = "UPDATE payment SET status = $1, version = version + 1 WHERE id = $2";
pub(crate) const SELECT: &str = "SELECT status FROM payment WHERE id = $1";

pub(crate) type Log = Arc<Mutex<Vec<String>>>;

pub(crate) fn push(log: &Log, entry: impl Into<String>) {
    log.lock().unwrap().push(entry.into());
}

pub(crate) fn entries(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

/// Polls `cond` every millisecond until it holds; panics after `timeout`.
pub(crate) async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    start.elapsed()
}

/// A database for one test, with what must outlive its pool.
pub(crate) struct TestDb<DB: sqlx::Database> {
    pub(crate) pool: sqlx::Pool<DB>,
    /// A second pool: "another client" (sees only committed data).
    pub(crate) observer: sqlx::Pool<DB>,
    pub(crate) pg: Option<Arc<PostgresServer>>,
    _dir: Option<tempfile::TempDir>,
}

pub(crate) async fn postgres() -> TestDb<sqlx::Postgres> {
    let (server, url) = tokio::task::spawn_blocking(|| {
        let server = PostgresServer::start();
        let url = server.create_database("strata").expect("create database");
        (server, url)
    })
    .await
    .unwrap();
    let opts = || sqlx::postgres::PgPoolOptions::new().acquire_timeout(Duration::from_secs(5));
    let pool = opts().max_connections(5).connect(&url).await.expect("connect");
    let observer = opts().max_connections(2).connect(&url).await.expect("connect");
    sqlx::raw_sql(SCHEMA).execute(&pool).await.expect("schema");
    TestDb { pool, observer, pg: Some(Arc::new(server)), _dir: None }
}

pub(crate) async fn sqlite() -> TestDb<sqlx::Sqlite> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
    let dir = tempfile::tempdir().unwrap();
    let opts = SqliteConnectOptions::new()
        .filename(dir.path().join("strata.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(5));
    let pool = SqlitePoolOptions::new().max_connections(4).connect_with(opts.clone()).await.expect("open");
    let observer = SqlitePoolOptions::new().max_connections(1).connect_with(opts).await.expect("open");
    sqlx::raw_sql(SCHEMA).execute(&pool).await.expect("schema");
    TestDb { pool, observer, pg: None, _dir: Some(dir) }
}

/// An in-process tier that reports each delete: what the database said at that
/// moment (read through another connection), and the keys deleted.
#[derive(Clone)]
pub(crate) struct ObservingTier {
    pub(crate) inner: InProcessTier,
    pub(crate) log: Log,
    pub(crate) observe: Arc<dyn Fn() -> BoxFuture<'static, String> + Send + Sync>,
    pub(crate) deletes: Arc<Mutex<Vec<Vec<String>>>>,
}

#[async_trait]
impl Tier for ObservingTier {
    fn name(&self) -> &str {
        "observing"
    }
    fn tombstone_ttl(&self) -> Duration {
        self.inner.tombstone_ttl()
    }
    async fn lookup(&self, ns: &str, key: &str, lease: Option<Duration>) -> strata::Result<Lookup> {
        self.inner.lookup(ns, key, lease).await
    }
    async fn fill(
        &self,
        ns: &str,
        key: &str,
        env: Envelope,
        ttl: Duration,
        token: &FillToken,
    ) -> strata::Result<FillOutcome> {
        self.inner.fill(ns, key, env, ttl, token).await
    }
    async fn set(&self, ns: &str, key: &str, env: Envelope, ttl: Duration) -> strata::Result<()> {
        self.inner.set(ns, key, env, ttl).await
    }
    async fn delete(&self, ns: &str, keys: &[String]) -> strata::Result<()> {
        let seen = (self.observe)().await;
        push(&self.log, format!("l2 delete {ns} {keys:?}: database says {seen}"));
        let mut sorted = keys.to_vec();
        sorted.sort();
        self.deletes.lock().unwrap().push(sorted);
        self.inner.delete(ns, keys).await
    }
    async fn invalidate_tag(&self, ns: &str, tag: &str) -> strata::Result<()> {
        self.inner.invalidate_tag(ns, tag).await
    }
    async fn invalidate_namespace(&self, ns: &str) -> strata::Result<()> {
        self.inner.invalidate_namespace(ns).await
    }
    async fn touch(&self, ns: &str, key: &str, soft: Timestamp, ttl: Duration) -> strata::Result<bool> {
        self.inner.touch(ns, key, soft, ttl).await
    }
    async fn lock(&self, ns: &str, scope: &Scope, id: u64, ttl: Duration) -> strata::Result<()> {
        let seen = (self.observe)().await;
        push(&self.log, format!("l2 lock {ns} {scope:?}: database says {seen}"));
        self.inner.lock(ns, scope, id, ttl).await
    }
    async fn unlock(&self, ns: &str, scope: &Scope, id: u64) -> strata::Result<()> {
        let seen = (self.observe)().await;
        push(&self.log, format!("l2 unlock {ns} {scope:?}: database says {seen}"));
        self.inner.unlock(ns, scope, id).await
    }
}

/// `n` instances of the "payment" cache sharing `tier` and an in-process backplane.
pub(crate) async fn fleet(
    n: usize,
    level: Consistency,
    tier: Arc<dyn Tier>,
    log: Option<Log>,
) -> Vec<Cache<i64, String>> {
    let hub = InProcessBackplane::new();
    let mut caches = Vec::new();
    for i in 0..n {
        let mut b = Cache::builder("payment")
            .tier(tier.clone())
            .backplane(Arc::new(hub.connect()))
            .consistency(level)
            .ttl(Duration::from_secs(3600))
            .heartbeat_interval(Duration::from_millis(100))
            // The observing tier queries the database inside its delete.
            .l2_timeout(Duration::from_secs(2))
            .tags(|_k: &i64, _v: &String| vec!["merchant:7".to_owned()]);
        if let (0, Some(log)) = (i, &log) {
            let log = log.clone();
            b = b.after_invalidate(move |what| push(&log, format!("hook payment {what:?}")));
        }
        let cache = b.build().expect("build");
        cache.ready().await;
        caches.push(cache);
    }
    caches
}

pub(crate) async fn fill(caches: &[Cache<i64, String>], pool: &sqlx::PgPool, ids: &[i64]) {
    for c in caches {
        for &id in ids {
            let pool = pool.clone();
            c.get_or_load(&id, move || async move {
                sqlx::query_scalar::<_, String>(SELECT).bind(id).fetch_optional(&pool).await
            })
            .await
            .expect("load");
            assert!(c.get_local(&id).is_some(), "instance filled");
        }
    }
}
