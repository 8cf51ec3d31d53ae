//! Ready-made write-behind sinks: [`UpsertSink`] writes batches of saves to a
//! `(key, value, seq)` table of Postgres or SQLite with one guarded upsert per batch.
//! See the crate documentation's "Write-behind sinks" section.

mod classify;
mod table;

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::{Arguments, Database, Encode, Pool, Postgres, Sqlite, Type};
use strata::write_behind::SinkErrorKind;
use strata::{BoxError, Sink, SinkError, SinkItem};

pub use classify::{classify_error, sink_error};
pub use table::UpsertTable;

use crate::db::SqlDatabase;

/// Binds one item's value (after the caller's mapping, if any) as the next parameter.
type BindValue<DB, V> = dyn Fn(&V, &mut <DB as Database>::Arguments) -> Result<(), BoxError> + Send + Sync;

/// One statement ready to run: its text and its parameters.
type Built<DB> = (String, <DB as Database>::Arguments);

/// A write-behind [`Sink`] that upserts saves into a `(key, value, seq)` table of
/// Postgres or SQLite, batch by batch:
///
/// ```sql
/// INSERT INTO drafts AS stored (id, body, seq) VALUES ($1, $2, $3), ($4, $5, $6), …
/// ON CONFLICT (id) DO UPDATE SET body = excluded.body, seq = excluded.seq
/// WHERE stored.seq < excluded.seq
/// ```
///
/// * **One statement per batch**, split only to stay under the database's limit on
///   bind parameters (a statement holds at most 21,845 rows on Postgres, 333 on SQLite;
///   the flusher's batches are 100 keys by default). Each statement commits on its own.
/// * **The sequence guard**: a row is only replaced by a save with a higher sequence,
///   so a replayed or late batch (a flusher whose claim ran out mid-write, a retry)
///   never overwrites a newer row. An item the guard skipped is a success: the newer
///   save is already there.
/// * **Poison isolation**: when the batch statement fails with a
///   [permanent](classify_error) error (a constraint, a bad value), the rows are written
///   again one statement each, so only the offending rows get the permanent error (and
///   go to the dead letters) while the others are written. An item whose value cannot
///   be mapped or encoded, or whose sequence does not fit in a `BIGINT`, is refused on
///   its own before any statement runs.
/// * **Transient errors** (the database unreachable, a deadlock, SQLite busy; see
///   [`classify_error`]) fail the whole call with a transient [`SinkError`], and the flusher
///   retries the batch with back-off. If earlier statements of the call had already
///   succeeded (a batch split in several, or rows written one by one), the call
///   returns those outcomes and a transient error for each of the rest instead.
///
/// Keys and values are bound as they are: any type sqlx can bind for the database
/// (`i64`, `String`, `Uuid`, `serde_json::Value`, …). For a value stored in another
/// form (a struct kept as JSON text), give a mapping with [`UpsertSink::with_mapping`].
/// The sequence is bound as an `i64`.
pub struct UpsertSink<DB: SqlDatabase, K, V> {
    pool: Pool<DB>,
    table: UpsertTable,
    head: String,
    tail: String,
    rows_per_statement: usize,
    bind_value: Arc<BindValue<DB, V>>,
    _key: PhantomData<fn(&K)>,
}

impl<DB, K, V> UpsertSink<DB, K, V>
where
    DB: SqlDatabase,
    K: for<'q> Encode<'q, DB> + Type<DB> + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// A sink writing to `table` through `pool`, storing values as they are.
    pub fn new(pool: Pool<DB>, table: UpsertTable) -> Self
    where
        V: for<'q> Encode<'q, DB> + Type<DB>,
    {
        Self::with_binder(pool, table, Arc::new(|value: &V, args: &mut DB::Arguments| args.add(value)))
    }

    /// A sink writing to `table` through `pool`, storing `to_stored(&value)` in the
    /// value column: e.g. a struct serialized to JSON text,
    /// `|draft: &Draft| serde_json::to_string(draft)`.
    ///
    /// An item whose mapping fails gets a permanent error (it goes to the dead letters
    /// at once, the message carrying the mapping's error); the batch's other items are
    /// written.
    pub fn with_mapping<S, E, F>(pool: Pool<DB>, table: UpsertTable, to_stored: F) -> Self
    where
        F: Fn(&V) -> Result<S, E> + Send + Sync + 'static,
        S: for<'q> Encode<'q, DB> + Type<DB>,
        E: Into<BoxError>,
    {
        let bind = move |value: &V, args: &mut DB::Arguments| -> Result<(), BoxError> {
            let stored = to_stored(value)
                .map_err(|e| -> BoxError { format!("the value mapping failed: {}", e.into()).into() })?;
            args.add(stored)
        };
        Self::with_binder(pool, table, Arc::new(bind))
    }

    fn with_binder(pool: Pool<DB>, table: UpsertTable, bind_value: Arc<BindValue<DB, V>>) -> Self {
        UpsertSink {
            pool,
            head: table.insert_head(),
            tail: table.upsert_tail(),
            table,
            rows_per_statement: DB::MAX_BIND_PARAMS / 3,
            bind_value,
            _key: PhantomData,
        }
    }

    /// The table written.
    pub fn table(&self) -> &UpsertTable {
        &self.table
    }

    /// The statement for the items of `chunk` not `excluded`, or the index of the first
    /// item that cannot be bound (then nothing is built: the caller excludes it and
    /// asks again). `None` when every item is excluded.
    fn statement(
        &self,
        chunk: &[SinkItem<K, V>],
        excluded: &[bool],
    ) -> Result<Option<Built<DB>>, (usize, BoxError)> {
        let mut sql = self.head.clone();
        sql.push_str("VALUES ");
        let mut args = DB::Arguments::default();
        let mut rows = 0usize;
        for (i, item) in chunk.iter().enumerate() {
            if excluded[i] {
                continue;
            }
            let at = |e: BoxError| (i, e);
            // The queue's sequences are microsecond clocks, far below i64::MAX; one
            // above it is corrupt, and retrying will not shrink it.
            let seq = i64::try_from(item.seq)
                .map_err(|_| at(format!("seq {} does not fit in a BIGINT", item.seq).into()))?;
            sql.push_str(if rows == 0 { "(" } else { ", (" });
            args.add(&item.key).map_err(|e| at(format!("the key does not encode: {e}").into()))?;
            args.format_placeholder(&mut sql).map_err(|e| at(e.into()))?;
            sql.push_str(", ");
            (self.bind_value)(&item.value, &mut args).map_err(at)?;
            args.format_placeholder(&mut sql).map_err(|e| at(e.into()))?;
            sql.push_str(", ");
            DB::add_i64(&mut args, seq).map_err(at)?;
            args.format_placeholder(&mut sql).map_err(|e| at(e.into()))?;
            sql.push(')');
            rows += 1;
        }
        if rows == 0 {
            return Ok(None);
        }
        sql.push_str(&self.tail);
        Ok(Some((sql, args)))
    }

    fn failed(&self, kind: SinkErrorKind, what: &str, source: impl Into<BoxError>) -> SinkError {
        let source = source.into();
        classify::with_kind(
            kind,
            UpsertFailed { table: self.table.to_string(), what: what.to_owned(), source },
        )
    }

    /// Writes one chunk, filling `slots` (its items' outcomes). `Err` is a transient
    /// failure: the slots of the items it concerns are left empty.
    async fn write_chunk(
        &self,
        chunk: &[SinkItem<K, V>],
        slots: &mut [Option<Result<(), SinkError>>],
    ) -> Result<(), sqlx::Error> {
        let mut excluded = vec![false; chunk.len()];
        let built = loop {
            match self.statement(chunk, &excluded) {
                Ok(built) => break built,
                Err((i, e)) => {
                    slots[i] = Some(Err(self.failed(SinkErrorKind::Permanent, "row refused", e)));
                    excluded[i] = true;
                }
            }
        };
        let Some((sql, args)) = built else { return Ok(()) };
        let err = match DB::execute_built(&self.pool, sql, args).await {
            Ok(()) => {
                for (slot, _) in slots.iter_mut().zip(&excluded).filter(|(_, ex)| !**ex) {
                    *slot = Some(Ok(()));
                }
                return Ok(());
            }
            Err(e) if classify_error(&e) == SinkErrorKind::Transient => return Err(e),
            Err(e) => e,
        };
        tracing::warn!(
            table = %self.table,
            rows = excluded.iter().filter(|ex| !**ex).count(),
            error = %err,
            "write-behind batch upsert refused; writing its rows one by one to isolate the offending ones"
        );
        for (i, item) in chunk.iter().enumerate() {
            if excluded[i] {
                continue;
            }
            let one = std::slice::from_ref(item);
            let (sql, args) = match self.statement(one, &[false]) {
                Ok(Some(built)) => built,
                Ok(None) => continue,
                Err((_, e)) => {
                    slots[i] = Some(Err(self.failed(SinkErrorKind::Permanent, "row refused", e)));
                    continue;
                }
            };
            slots[i] = Some(match DB::execute_built(&self.pool, sql, args).await {
                Ok(()) => Ok(()),
                Err(e) if classify_error(&e) == SinkErrorKind::Transient => return Err(e),
                Err(e) => Err(self.failed(SinkErrorKind::Permanent, "row refused", e)),
            });
        }
        Ok(())
    }
}

impl<K, V> UpsertSink<Postgres, K, V>
where
    K: for<'q> Encode<'q, Postgres> + Type<Postgres> + Send + Sync + 'static,
    V: for<'q> Encode<'q, Postgres> + Type<Postgres> + Send + Sync + 'static,
{
    /// [`UpsertSink::new`] for Postgres.
    pub fn postgres(pool: sqlx::PgPool, table: UpsertTable) -> Self {
        Self::new(pool, table)
    }
}

impl<K, V> UpsertSink<Sqlite, K, V>
where
    K: for<'q> Encode<'q, Sqlite> + Type<Sqlite> + Send + Sync + 'static,
    V: for<'q> Encode<'q, Sqlite> + Type<Sqlite> + Send + Sync + 'static,
{
    /// [`UpsertSink::new`] for SQLite (3.24 or later, for the upsert; sqlx bundles a
    /// recent one).
    pub fn sqlite(pool: sqlx::SqlitePool, table: UpsertTable) -> Self {
        Self::new(pool, table)
    }
}

#[async_trait]
impl<DB, K, V> Sink<K, V> for UpsertSink<DB, K, V>
where
    DB: SqlDatabase,
    K: for<'q> Encode<'q, DB> + Type<DB> + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    async fn write_batch(&self, items: &[SinkItem<K, V>]) -> Result<Vec<Result<(), SinkError>>, SinkError> {
        let mut outcomes: Vec<Option<Result<(), SinkError>>> = items.iter().map(|_| None).collect();
        let mut chunk_slots = outcomes.chunks_mut(self.rows_per_statement);
        let mut failure = None;
        for chunk in items.chunks(self.rows_per_statement) {
            let Some(slots) = chunk_slots.next() else { break };
            if let Err(e) = self.write_chunk(chunk, slots).await {
                failure = Some(e);
                break;
            }
        }
        if let Some(e) = failure {
            if outcomes.iter().all(Option::is_none) {
                return Err(self.failed(SinkErrorKind::Transient, "batch not written", e));
            }
            let msg = format!("upsert into {}: not written: {e}", self.table);
            for slot in outcomes.iter_mut().filter(|s| s.is_none()) {
                *slot = Some(Err(SinkError::transient(msg.clone())));
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(SinkError::transient("upsert: item not attempted"))))
            .collect())
    }
}

impl<DB: SqlDatabase, K, V> Clone for UpsertSink<DB, K, V> {
    fn clone(&self) -> Self {
        UpsertSink {
            pool: self.pool.clone(),
            table: self.table.clone(),
            head: self.head.clone(),
            tail: self.tail.clone(),
            rows_per_statement: self.rows_per_statement,
            bind_value: self.bind_value.clone(),
            _key: PhantomData,
        }
    }
}

impl<DB: SqlDatabase, K, V> fmt::Debug for UpsertSink<DB, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpsertSink")
            .field("table", &self.table)
            .field("rows_per_statement", &self.rows_per_statement)
            .finish_non_exhaustive()
    }
}

/// A failed write, with the table for the logs and dead letters (the flusher records
/// the message only, so it carries the cause's text too).
#[derive(Debug, thiserror::Error)]
#[error("upsert into {table}: {what}: {source}")]
struct UpsertFailed {
    table: String,
    what: String,
    #[source]
    source: BoxError,
}
