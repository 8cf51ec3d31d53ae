//! The database every strategy reads from and writes to: real SQL through sqlx, on a
//! SQLite file in a temporary directory (WAL, a small pool) or on Postgres.
//!
//! Every row carries a `version` column that each write increments; the harness uses it
//! to tell stale reads from fresh ones. DB reads and writes are counted here, so every
//! strategy is measured the same way.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, QueryBuilder, Row as _};
use std::sync::Arc;

use super::scenario::Scenario;
use crate::secret::SecretUrl;

/// One row as the app sees it: what the caches hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// Primary key.
    pub id: u64,
    /// The payload: a plan (`billsetting`) or a payment status (`payment`).
    pub value: String,
    /// Incremented by every write.
    pub version: u64,
}

/// Counters of the statements run, since the last [`Db::reset`].
#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    hottest_reads: AtomicU64,
    /// When each `SELECT` of the hottest key was issued (the timeline's hot-key loads),
    /// at most [`MAX_HOTTEST_TIMES`].
    hottest_times: parking_lot::Mutex<Vec<Instant>>,
}

/// Hot-key read instants kept per run: enough for any bench window, bounded memory.
const MAX_HOTTEST_TIMES: usize = 1 << 20;

/// A snapshot of the DB counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DbCounts {
    /// `SELECT`s of one row.
    pub reads: u64,
    /// `UPDATE`s of one row.
    pub writes: u64,
    /// `SELECT`s of the hottest key.
    pub hottest_reads: u64,
}

pub(super) enum Pool {
    /// SQLite.
    Sqlite(SqlitePool),
    /// Postgres.
    Postgres(PgPool),
}

/// The benchmark's table and its connection pool.
pub struct Db {
    pool: Pool,
    table: String,
    column: &'static str,
    initial: &'static str,
    keys: u64,
    hottest: u64,
    counters: Counters,
    read_sql: Arc<str>,
    write_sql: Arc<str>,
    description: String,
    /// Holds the SQLite file; deleted on drop.
    _dir: Option<tempfile::TempDir>,
}

/// Connections in the SQLite pool (one writer at a time anyway).
const SQLITE_POOL: u32 = 4;
/// Connections in the Postgres pool.
const POSTGRES_POOL: u32 = 16;
/// Rows per `INSERT` when seeding.
const SEED_BATCH: u64 = 500;

impl Db {
    /// Opens the database (`None`: a new SQLite file in a temporary directory), creates
    /// the scenario's table and seeds it with `keys` rows at version 1.
    pub async fn open(url: Option<&SecretUrl>, scenario: Scenario, keys: u64, hottest: u64) -> Result<Db> {
        let (column, initial) = match scenario {
            Scenario::Billsetting => ("plan", "basic"),
            Scenario::Payment => ("status", "PENDING"),
            Scenario::Drafts => ("body", ""),
        };
        let (pool, table, description, dir) = open_pool(url, scenario.name()).await?;
        let read_sql: Arc<str> = format!("SELECT {column}, version FROM {table} WHERE id = $1").into();
        let write_sql: Arc<str> = match scenario {
            Scenario::Payment => format!(
                "UPDATE {table} SET {column} = CASE WHEN {column} = 'PENDING' THEN $1 ELSE 'PENDING' END, \
                 version = version + 1 WHERE id = $2 RETURNING version"
            ),
            Scenario::Billsetting | Scenario::Drafts => {
                format!(
                    "UPDATE {table} SET {column} = $1, version = version + 1 WHERE id = $2 RETURNING version"
                )
            }
        }
        .into();
        let db = Db {
            pool,
            table,
            column,
            read_sql,
            write_sql,
            initial,
            keys,
            hottest,
            counters: Counters::default(),
            description,
            _dir: dir,
        };
        db.create().await?;
        Ok(db)
    }

    /// What the database is, for the report.
    pub fn description(&self) -> &str {
        &self.description
    }

    async fn execute(&self, sql: &str) -> Result<()> {
        match &self.pool {
            Pool::Sqlite(p) => sqlx::query(AssertSqlSafe(sql.to_owned())).execute(p).await.map(drop),
            Pool::Postgres(p) => sqlx::query(AssertSqlSafe(sql.to_owned())).execute(p).await.map(drop),
        }
        .with_context(|| format!("SQL failed: {sql}"))
    }

    async fn create(&self) -> Result<()> {
        let (t, c) = (&self.table, self.column);
        self.execute(&format!("DROP TABLE IF EXISTS {t}")).await?;
        self.execute(&format!(
            "CREATE TABLE {t} (id BIGINT PRIMARY KEY, {c} TEXT NOT NULL, version BIGINT NOT NULL)"
        ))
        .await?;
        let mut start = 0;
        while start < self.keys {
            let end = (start + SEED_BATCH).min(self.keys);
            let ids = (start..end).map(|i| i as i64);
            match &self.pool {
                Pool::Sqlite(p) => {
                    let mut q = QueryBuilder::new(format!("INSERT INTO {t} (id, {c}, version) "));
                    q.push_values(ids, |mut b, id| {
                        b.push_bind(id).push_bind(self.initial).push_bind(1i64);
                    });
                    q.build().execute(p).await.map(drop)
                }
                Pool::Postgres(p) => {
                    let mut q = QueryBuilder::new(format!("INSERT INTO {t} (id, {c}, version) "));
                    q.push_values(ids, |mut b, id| {
                        b.push_bind(id).push_bind(self.initial).push_bind(1i64);
                    });
                    q.build().execute(p).await.map(drop)
                }
            }
            .with_context(|| format!("cannot seed table {t}"))?;
            start = end;
        }
        Ok(())
    }

    /// Puts every row back to its seeded state (version 1) and zeroes the counters:
    /// each strategy starts from the same contents.
    pub async fn reset(&self) -> Result<()> {
        let (t, c, init) = (&self.table, self.column, self.initial);
        self.execute(&format!("UPDATE {t} SET {c} = '{init}', version = 1")).await?;
        self.counters.reads.store(0, Ordering::SeqCst);
        self.counters.writes.store(0, Ordering::SeqCst);
        self.counters.hottest_reads.store(0, Ordering::SeqCst);
        self.counters.hottest_times.lock().clear();
        Ok(())
    }

    /// The counters since the last reset.
    pub fn counts(&self) -> DbCounts {
        DbCounts {
            reads: self.counters.reads.load(Ordering::SeqCst),
            writes: self.counters.writes.load(Ordering::SeqCst),
            hottest_reads: self.counters.hottest_reads.load(Ordering::SeqCst),
        }
    }

    /// When the hottest key was read from the database at or after `since`.
    pub fn hottest_reads_since(&self, since: Instant) -> Vec<Instant> {
        self.counters.hottest_times.lock().iter().copied().filter(|t| *t >= since).collect()
    }

    /// `SELECT`s one row.
    pub async fn read(&self, key: u64) -> Result<Row> {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        if key == self.hottest {
            self.counters.hottest_reads.fetch_add(1, Ordering::Relaxed);
            let mut times = self.counters.hottest_times.lock();
            if times.len() < MAX_HOTTEST_TIMES {
                times.push(Instant::now());
            }
        }
        let sql = &self.read_sql;
        let id = i64::try_from(key).context("key out of range")?;
        let row = match &self.pool {
            Pool::Sqlite(p) => sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(id)
                .fetch_optional(p)
                .await?
                .map(|r| (r.try_get::<String, _>(0), r.try_get::<i64, _>(1))),
            Pool::Postgres(p) => sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(id)
                .fetch_optional(p)
                .await?
                .map(|r| (r.try_get::<String, _>(0), r.try_get::<i64, _>(1))),
        };
        let (value, version) = row.ok_or_else(|| anyhow!("row {key} is missing"))?;
        Ok(Row { id: key, value: value?, version: u64::try_from(version?)? })
    }

    /// Changes one row and returns its new version: a new plan (`billsetting`), or the
    /// next payment status (`payment`: PENDING → `value`, a terminal status → PENDING,
    /// the next attempt).
    pub async fn write(&self, key: u64, value: &str) -> Result<u64> {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        let sql = &self.write_sql;
        let id = i64::try_from(key).context("key out of range")?;
        let version: Option<i64> = match &self.pool {
            Pool::Sqlite(p) => {
                sqlx::query_scalar(AssertSqlSafe(sql.clone())).bind(value).bind(id).fetch_optional(p).await?
            }
            Pool::Postgres(p) => {
                sqlx::query_scalar(AssertSqlSafe(sql.clone())).bind(value).bind(id).fetch_optional(p).await?
            }
        };
        let version = version.ok_or_else(|| anyhow!("row {key} is missing"))?;
        Ok(u64::try_from(version)?)
    }

    /// Drops the table where it is not in a temporary file, and closes the pool.
    pub async fn close(self) -> Result<()> {
        if self._dir.is_none() {
            self.execute(&format!("DROP TABLE IF EXISTS {}", self.table)).await?;
        }
        match &self.pool {
            Pool::Sqlite(p) => p.close().await,
            Pool::Postgres(p) => p.close().await,
        }
        Ok(())
    }
}

/// Opens the pool `--database` names (a SQLite file in a new temporary directory when
/// none): the pool, the table name to use for `name`, a description for the report, and
/// the directory to keep while the pool lives.
pub(super) async fn open_pool(
    url: Option<&SecretUrl>,
    name: &str,
) -> Result<(Pool, String, String, Option<tempfile::TempDir>)> {
    // `url` formats redacted; `raw` is for sqlx alone.
    let opened = match url.map(|u| (u, u.expose())) {
        None => {
            let dir = tempfile::tempdir().context("cannot create a temporary directory for SQLite")?;
            let path = dir.path().join("bench.db");
            let options = SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // A file deleted when the run ends needs no fsync; with one, a checkpoint
                // can wait behind a disk busy writing back a build's output (once, on a
                // freshly booted machine, 15,360 requests still ran 60 s after the last
                // was sent).
                .synchronous(SqliteSynchronous::Off)
                .busy_timeout(Duration::from_secs(10));
            let pool = SqlitePoolOptions::new()
                .max_connections(SQLITE_POOL)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(options)
                .await
                .with_context(|| format!("cannot open SQLite database {}", path.display()))?;
            let description = format!("SQLite (WAL, pool of {SQLITE_POOL}) in {}", dir.path().display());
            (Pool::Sqlite(pool), name.to_owned(), description, Some(dir))
        }
        Some((url, raw)) if raw.starts_with("postgres://") || raw.starts_with("postgresql://") => {
            let pool = PgPoolOptions::new()
                .max_connections(POSTGRES_POOL)
                .acquire_timeout(Duration::from_secs(30))
                .connect(raw)
                .await
                .with_context(|| format!("cannot connect to Postgres at {url}"))?;
            let table = format!("strata_bench_{}_{:08x}", name, rand::random::<u32>());
            let description = format!("Postgres (pool of {POSTGRES_POOL}), table {table}");
            (Pool::Postgres(pool), table, description, None)
        }
        Some((url, raw)) if raw.starts_with("sqlite:") => {
            let options = SqliteConnectOptions::from_str(raw)
                .with_context(|| format!("bad SQLite URL {url}"))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10));
            let pool = SqlitePoolOptions::new()
                .max_connections(SQLITE_POOL)
                .connect_with(options)
                .await
                .with_context(|| format!("cannot open SQLite database {url}"))?;
            let table = format!("strata_bench_{}_{:08x}", name, rand::random::<u32>());
            let description = format!("SQLite (WAL, pool of {SQLITE_POOL}) {url}, table {table}");
            (Pool::Sqlite(pool), table, description, None)
        }
        Some((url, _)) => {
            return Err(anyhow!("--database {url}: expected a postgres:// or sqlite: URL"));
        }
    };
    Ok(opened)
}
