//! The drafts table (`id`, `rev`, `body`, `seq`) on SQLite or Postgres, with the counters
//! every strategy is measured by: statements, rows written, per-second writes, and the
//! flush lag of each written save (from its acknowledgement to the write).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, QueryBuilder, Row as _};

use crate::bench::db::{Pool, open_pool};
use crate::secret::SecretUrl;

/// A draft as the app holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draft {
    /// The client's revision: every save of a user's draft has a higher one.
    pub rev: u64,
    /// The text.
    pub body: String,
}

impl Draft {
    /// Revision `rev` of `user`'s draft (about 200 bytes, as an autosaved form is).
    pub fn new(user: u64, rev: u64) -> Draft {
        Draft {
            rev,
            body: format!("user {user} revision {rev}: {}", "lorem ipsum dolor sit amet ".repeat(6)),
        }
    }
}

/// Most rows per `INSERT` (under SQLite's 32,766 bind parameters at four per row).
const MAX_BATCH: usize = 1_000;

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    statements: AtomicU64,
    rows: AtomicU64,
}

/// Acknowledged saves not yet in the table, per user, for the flush lag.
#[derive(Default)]
struct Lag {
    waiting: HashMap<u64, VecDeque<(u64, Instant)>>,
    written: HashMap<u64, u64>,
    lags_ms: Vec<f64>,
}

/// The drafts table and its pool.
pub struct DraftsDb {
    pool: Pool,
    table: String,
    description: String,
    counters: Counters,
    lag: Mutex<Lag>,
    /// Rows written per second since `started`.
    per_second: Mutex<Vec<u64>>,
    started: Mutex<Instant>,
    _dir: Option<tempfile::TempDir>,
}

macro_rules! on_pool {
    ($self:ident, $p:ident => $body:expr) => {
        match &$self.pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

impl DraftsDb {
    /// Opens `--database` (a SQLite file in a temporary directory by default) and
    /// creates the table.
    pub async fn open(url: Option<&SecretUrl>) -> Result<DraftsDb> {
        let (pool, table, description, dir) = open_pool(url, "drafts").await?;
        let db = DraftsDb {
            pool,
            table,
            description,
            counters: Counters::default(),
            lag: Mutex::new(Lag::default()),
            per_second: Mutex::new(Vec::new()),
            started: Mutex::new(Instant::now()),
            _dir: dir,
        };
        let t = &db.table;
        db.execute(&format!("DROP TABLE IF EXISTS {t}")).await?;
        db.execute(&format!(
            "CREATE TABLE {t} (id BIGINT PRIMARY KEY, rev BIGINT NOT NULL, body TEXT NOT NULL, seq BIGINT NOT NULL)"
        ))
        .await?;
        Ok(db)
    }

    /// What the database is, for the report.
    pub fn description(&self) -> &str {
        &self.description
    }

    async fn execute(&self, sql: &str) -> Result<()> {
        on_pool!(self, p => sqlx::query(AssertSqlSafe(sql.to_owned())).execute(p).await.map(drop))
            .with_context(|| format!("SQL failed: {sql}"))
    }

    /// Empties the table and zeroes the counters: each strategy starts from nothing.
    pub async fn reset(&self) -> Result<()> {
        self.execute(&format!("DELETE FROM {}", self.table)).await?;
        for c in [&self.counters.reads, &self.counters.statements, &self.counters.rows] {
            c.store(0, Ordering::SeqCst);
        }
        *self.lag.lock() = Lag::default();
        self.per_second.lock().clear();
        *self.started.lock() = Instant::now();
        Ok(())
    }

    /// Reads `user`'s draft.
    pub async fn read(&self, user: u64) -> Result<Option<Draft>> {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        let sql = format!("SELECT rev, body FROM {} WHERE id = $1", self.table);
        let row =
            on_pool!(self, p => sqlx::query(AssertSqlSafe(sql)).bind(user as i64).fetch_optional(p).await
            .map(|r| r.map(|r| (r.get::<i64, _>(0), r.get::<String, _>(1)))))
            .context("cannot read a draft")?;
        Ok(row.map(|(rev, body)| Draft { rev: rev as u64, body }))
    }

    /// Writes drafts in one statement per [`MAX_BATCH`] rows: `(user, draft, seq)`.
    /// With `guarded`, a row holding a higher `seq` is left alone (what strata's sink
    /// does); without, the last statement wins (the naive scheduler).
    pub async fn write(&self, items: &[(u64, Draft, u64)], guarded: bool) -> Result<()> {
        for chunk in items.chunks(MAX_BATCH) {
            let t = &self.table;
            let head = format!("INSERT INTO {t} (id, rev, body, seq) ");
            let conflict = if guarded {
                format!(
                    " ON CONFLICT (id) DO UPDATE SET rev = excluded.rev, body = excluded.body, seq = excluded.seq \
                     WHERE {t}.seq < excluded.seq"
                )
            } else {
                " ON CONFLICT (id) DO UPDATE SET rev = excluded.rev, body = excluded.body, seq = excluded.seq"
                    .to_owned()
            };
            let seq_i64 = |s: u64| i64::try_from(s).unwrap_or(i64::MAX);
            let done = on_pool!(self, p => {
                let mut q = QueryBuilder::new(head.as_str());
                q.push_values(chunk, |mut b, (user, d, seq)| {
                    b.push_bind(*user as i64).push_bind(d.rev as i64).push_bind(d.body.clone()).push_bind(seq_i64(*seq));
                });
                q.push(conflict.as_str());
                q.build().execute(p).await.map(drop)
            });
            done.context("cannot write drafts")?;
            self.count_written(chunk);
        }
        Ok(())
    }

    fn count_written(&self, chunk: &[(u64, Draft, u64)]) {
        self.counters.statements.fetch_add(1, Ordering::Relaxed);
        self.counters.rows.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        let now = Instant::now();
        let second = now.duration_since(*self.started.lock()).as_secs() as usize;
        {
            let mut per = self.per_second.lock();
            if per.len() <= second {
                per.resize(second + 1, 0);
            }
            per[second] += chunk.len() as u64;
        }
        let mut lag = self.lag.lock();
        for (user, d, _) in chunk {
            let written = lag.written.entry(*user).or_default();
            *written = (*written).max(d.rev);
            let mut first = None;
            if let Some(q) = lag.waiting.get_mut(user) {
                while q.front().is_some_and(|(rev, _)| *rev <= d.rev) {
                    let (_, at) = q.pop_front().unwrap_or((0, now));
                    first.get_or_insert(at);
                }
            }
            if let Some(at) = first {
                lag.lags_ms.push(now.duration_since(at).as_secs_f64() * 1e3);
            }
        }
    }

    /// Records that revision `rev` of `user`'s draft was acknowledged to its client.
    pub fn note_ack(&self, user: u64, rev: u64) {
        let mut lag = self.lag.lock();
        if lag.written.get(&user).is_some_and(|w| *w >= rev) {
            return;
        }
        lag.waiting.entry(user).or_default().push_back((rev, Instant::now()));
    }

    /// `(reads, statements, rows written)` since the reset.
    pub fn counts(&self) -> (u64, u64, u64) {
        let get = |c: &AtomicU64| c.load(Ordering::SeqCst);
        (get(&self.counters.reads), get(&self.counters.statements), get(&self.counters.rows))
    }

    /// Rows written in each second since the reset.
    pub fn per_second(&self) -> Vec<u64> {
        self.per_second.lock().clone()
    }

    /// Flush lags (ms) of the saves written so far.
    pub fn lags_ms(&self) -> Vec<f64> {
        self.lag.lock().lags_ms.clone()
    }

    /// Every row's revision.
    pub async fn revisions(&self) -> Result<HashMap<u64, u64>> {
        let sql = format!("SELECT id, rev FROM {}", self.table);
        let rows: Vec<(i64, i64)> = on_pool!(self, p => sqlx::query(AssertSqlSafe(sql)).fetch_all(p).await
            .map(|rows| rows.iter().map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1))).collect()))
        .context("cannot read the drafts table")?;
        Ok(rows.into_iter().map(|(id, rev)| (id as u64, rev as u64)).collect())
    }

    /// Closes the pool.
    pub async fn close(self) {
        on_pool!(self, p => p.close().await);
    }
}
