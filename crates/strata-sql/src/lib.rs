//! # strata-sql
//!
//! [sqlx] integration for [strata]: invalidate cache entries **after** a transaction
//! commits, run after-commit actions (domain events) **after** the invalidation, and
//! capture changes made behind the application's back with Postgres
//! `LISTEN`/`NOTIFY`, and write strata's write-behind saves to a table with a
//! ready-made upsert sink. Works with Postgres and SQLite.
//!
//! ## Invalidate after commit
//!
//! ```no_run
//! # use std::sync::Arc;
//! # async fn publish_to_kafka(_id: i64, _status: &str) -> Result<(), std::io::Error> { Ok(()) }
//! # async fn example(pool: sqlx::PgPool, payments: strata::Cache<i64, String>) -> Result<(), Box<dyn std::error::Error>> {
//! let id = 42_i64;
//! let mut tx = strata_sql::begin(&pool).await?;
//! sqlx::query("UPDATE payment SET status = $1, version = version + 1 WHERE id = $2")
//!     .bind("settled")
//!     .bind(id)
//!     .execute(&mut *tx)
//!     .await?;
//! tx.invalidate(&payments, &id);
//! tx.invalidate_tag(&payments, "merchant:7");
//! tx.after_commit_named("kafka:payment-status", move || async move {
//!     publish_to_kafka(id, "settled").await
//! });
//! let report = tx.commit().await?; // write locks, COMMIT, invalidations (releases), actions
//! if !report.is_clean() {
//!     // Committed all the same; the report says which invalidation was buffered or
//!     // bypassed and which action failed (both are also logged and counted).
//!     for action in report.failed_actions() {
//!         eprintln!("{} failed: {:?}", action.name, action.error);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! ### What is promised
//!
//! * **Invalidate after commit.** Every cache named is invalidated once `COMMIT` has
//!   returned success (for a locked cache, by the release of its write lock). A Local
//!   cache, or an Invalidated one without write locks, is not touched before.
//!   (Evicting without a lock before the commit would let a concurrent reader re-cache
//!   the old row between the eviction and the commit.)
//! * **Invalidated caches are write-locked before the commit** (by default; see
//!   [Write locks at the Invalidated level](#write-locks-at-the-invalidated-level)):
//!   a writer that dies between `COMMIT` and its invalidation leaves nothing stale. If
//!   the lock cannot be taken, the transaction commits all the same and the cache is
//!   invalidated after `COMMIT` as without a lock ([`CacheInvalidation::locked`] is
//!   false, a `warn` is logged, `strata_sql_write_lock_failures_total` counts it).
//! * **Strong caches are locked before the commit.** For every Strong cache named, the
//!   helper takes a write lock ([`strata::Cache::lock_for_write`]) after the
//!   transaction's statements and before `COMMIT`: the keys are invalidated
//!   everywhere (every live member acknowledges) and kept out of every tier, so a
//!   concurrent reader cannot re-cache the old row, and once any read returns the new
//!   row no read returns the old one. If the lock cannot be taken (L2 or the
//!   backplane down, a member silent), the transaction is **rolled back**
//!   ([`CommitOutcome::RolledBack`] with [`CommitCause::Cache`]; the error is
//!   transient, retry later): the Strong level prefers refusing a write to letting
//!   the fleet serve it out of order. After `COMMIT` the lock is released (L2
//!   invalidated once more).
//! * **Actions strictly after invalidation.** After-commit actions start only once
//!   every cache's invalidation has returned, so a consumer of the event who reads
//!   through the cache sees the new row. They run one at a time, in registration
//!   order, each one even if an earlier one failed; an error or a panic is logged
//!   (`error`), counted (`strata_sql_after_commit_failures_total`) and listed in the
//!   [`CommitReport`].
//! * **Rollback invalidates nothing and runs nothing**: an explicit
//!   [`Transaction::rollback`], a drop without commit, or a transaction aborted by an
//!   earlier failed statement (on Postgres, whose `COMMIT` Postgres turns into a silent
//!   `ROLLBACK`: checked with one extra round trip before `COMMIT`, before any lock).
//!   A `COMMIT` the database rejects ([`CommitOutcome::RolledBack`], e.g. a deferred
//!   constraint) runs nothing and calls no `after_invalidate` hook, but its write locks
//!   were taken before it: the written keys' copies were dropped (a miss each, never a
//!   wrong value).
//! * **Commit outcome unknown** (the connection broke during `COMMIT`,
//!   [`CommitOutcome::Unknown`]): the caches are invalidated anyway (an extra
//!   invalidation costs a miss; a missing one would serve the old row for up to a
//!   TTL) and the actions are not run; the error says so.
//! * **One `invalidate_many` per cache.** Keys are grouped per cache (several caches
//!   with different key and value types may be named in one transaction); the caches
//!   are invalidated concurrently.
//!
//! ### Write locks at the Invalidated level
//!
//! Without a lock, the fleet learns of a committed write only from the writer's
//! invalidation after `COMMIT`. A writer process killed in between (a deploy, the OOM
//! killer, a crash) leaves every instance that had the row, and every instance started
//! later (L2 still holds it), serving the old row until its TTL, all reporting
//! healthy. The write lock ([`strata::Cache::lock_for_write`]) moves the invalidation
//! before `COMMIT`: it drops every instance's copy (the message is published before
//! `COMMIT`), deletes the L2 entries and poisons every L2 fill token handed out while
//! it holds, so no load that read the old row can be stored in L2, nor (a refused L2
//! fill never reaches L1) in L1. If the writer then dies after `COMMIT`, nothing stale
//! is left anywhere: the lock expires after the cache's `write_lock_ttl` (30 s by
//! default), and until then the written keys are simply not cached (every read loads
//! from the database). A writer that lives releases the lock after `COMMIT`, which
//! invalidates L2 once more and publishes the invalidation again.
//!
//! * **Cost**: one more L2 round trip and one more backplane publish per Invalidated
//!   cache per transaction (lock before `COMMIT`, release after it, instead of one
//!   invalidation after it), and the lock's round trip and publish happen while the
//!   transaction still holds its row locks. Between the lock and the release (a few
//!   milliseconds) reads of the written keys go to the database.
//! * **Opt-out**: [`Transaction::without_write_locks`] invalidates Invalidated caches
//!   only after `COMMIT`, as before; it reopens the dead-writer gap for that
//!   transaction.
//! * **Plain `Cache::invalidate` after a commit** (code that does not use this helper
//!   or `lock_for_write`) keeps the gap: a writer dying between `COMMIT` and the
//!   `invalidate` leaves the old row cached until the TTL.
//! * **With change capture** ([`install_change_capture`]) the gap of a write made
//!   without a lock is bounded by the capture's delivery: commit → notification →
//!   listener → `invalidate` → backplane, a few milliseconds on one host (the
//!   `dead_writer` integration tests measure it) while the listener is connected;
//!   while it is not, until it has reconnected and caught up.
//! * **Loads that L2 does not keep** (a value above `max_value_bytes`, a failed L2
//!   fill or lookup) stay out of L1 as well while the lock may hold: the poisoned fill
//!   token says so, and without a token (L2 unreachable) an invalidation of the key, a
//!   tag or the namespace heard less than `write_lock_ttl` before the load stands in for
//!   it (the `dead_writer_and_a_value_kept_out_of_l2` test). Left open: an instance that
//!   cannot reach L2 *and* did not hear the lock's message (it was resubscribing, or
//!   started during the lock) may keep the old row it loaded until the TTL if the
//!   writer dies; change capture bounds that as above.
//!
//! ### When a post-commit invalidation fails
//!
//! The transaction is committed, so [`Transaction::commit`] returns `Ok` and the
//! report carries the failure; the cache has already made itself safe (strata's
//! `invalidate` contract):
//!
//! | cache level | report | state of the cache | after-commit actions |
//! |---|---|---|---|
//! | Invalidated (or Local) | [`InvalidationState::Buffered`] | the local copy is gone; the L2 delete and/or the backplane message are retried in the background (`Cache::flush_pending` retries now); until the retry succeeds other instances may serve the old value | run |
//! | Strong, release of the write lock failed (L2 down after `COMMIT`) | [`InvalidationState::Bypassed`] | nothing stale can be read (the lock kept the old row out of every tier); every read goes to the database until a namespace bump has cleaned L2 and the lock is released (retried in the background; it also expires after `write_lock_ttl`) | run |
//!
//! (At the Strong level, failures before `COMMIT` roll the transaction back instead,
//! see above.)
//!
//! Actions run in every case because withholding them would lose the events of a
//! committed change for good, while the cache is already as safe as it can be made;
//! the report (and a `warn` log, and `strata_sql_invalidation_failures_total`) tells
//! the caller to look.
//!
//! ## Change capture (Postgres)
//!
//! Writes that bypass the application (psql, a batch job, another service) are made
//! visible by triggers that write each row change into an outbox table, in the
//! writing transaction, and wake the listeners with a `NOTIFY` at commit; a
//! [`ChangeListener`] reads the changes committed since its last read from the outbox
//! and invalidates the mapped caches:
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool, payments: strata::Cache<i64, String>) -> Result<(), strata_sql::Error> {
//! strata_sql::install_change_capture(&pool, "payment", "id", Some("version")).await?;
//! let listener = strata_sql::ChangeListener::builder(&pool)
//!     .table("payment", &payments)
//!     .start()
//!     .await?;
//! // ... serve traffic; listener.stats() counts what it did.
//! listener.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! * **Staleness bound for out-of-band writes**: while the listener is connected,
//!   the notification delay (commit → notification → `invalidate` → backplane) plus
//!   the caches' own propagation delay; a few milliseconds on one host (the
//!   integration test prints its measurement).
//! * **Listener reconnect**: a lost connection (closed, killed, or silent past the
//!   heartbeat timeout) is replaced with backoff; once `LISTEN` is active again, the
//!   listener reads what committed meanwhile from the outbox
//!   ([`ChangeListenerStats::catch_ups`]); only if the outbox was pruned past its last
//!   read (it was away longer than the retention, 10 minutes by default) does it call
//!   `invalidate_all` on every mapped cache ([`ChangeListenerStats::resyncs`]). While
//!   it is disconnected, out-of-band writes are not seen: the bound is then the time to
//!   detect the loss (immediate for a closed connection, the heartbeat interval plus
//!   timeout for a silent one) plus the time to reconnect.
//! * **Forged notifications are harmless**: any role may `pg_notify` on the channel,
//!   but notifications carry no invalidation, only a wake-up; the outbox, which only
//!   its owner can write (the trigger function runs as its owner), is the one source
//!   of invalidations. Whatever the trigger did not send (garbage, a change payload, a
//!   wake-up naming a transaction that changed nothing, a replay) is counted in
//!   [`ChangeListenerStats::forged`] and costs at most one indexed read. The design,
//!   and why not signed payloads, is argued in the `capture` module's source; the
//!   privileges needed are listed at [`install_change_capture`].
//! * **Exactly the changed keys**: each outbox row carries the key column's text;
//!   integer keys parse only in their canonical form (`"7"`, not `"+7"` or `"007"`),
//!   so no other entry is invalidated; keys the cache cannot parse are counted and
//!   ignored.
//! * Only committed changes are read (outbox rows of a rolled-back transaction never
//!   become visible), each once: reads go by snapshot, so a transaction that commits
//!   late is not skipped.
//!   A change notified to a cache whose invalidation fails is handled as above
//!   (buffered or bypassed, counted in `invalidation_errors`).
//!
//! The trigger SQL is in [`CHANGE_CAPTURE_FUNCTION_SQL`] and
//! [`change_capture_trigger_sql`] for teams that apply their own migrations.
//!
//! ## Write-behind sinks
//!
//! strata's write-behind ([`strata::WriteBehindConfig`]) writes saves to the database
//! through a [`strata::Sink`]. [`UpsertSink`] is a ready one for a table holding a key,
//! a value and the save's sequence number:
//!
//! ```sql
//! -- Postgres
//! CREATE TABLE drafts (id BIGINT PRIMARY KEY, body TEXT NOT NULL, seq BIGINT NOT NULL);
//! -- SQLite (3.24 or later for the upsert; sqlx bundles a recent one)
//! CREATE TABLE drafts (id INTEGER PRIMARY KEY, body TEXT NOT NULL, seq INTEGER NOT NULL);
//! ```
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use std::time::Duration;
//! # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let table = strata_sql::UpsertTable::new("drafts", "id", "body", "seq")?;
//! let sink = strata_sql::UpsertSink::postgres(pool, table);
//! let drafts: strata::Cache<i64, String> = strata::Cache::builder("drafts")
//!     .tier(Arc::new(strata::InProcessTier::new()))
//!     .write_behind(
//!         strata::WriteBehindConfig::new(Arc::new(strata::InProcessQueue::new()), sink)
//!             .flush_delay(Duration::from_secs(5)),
//!     )
//!     .build()?;
//! let wb = drafts.write_behind().expect("configured above");
//! wb.save(7, "Dear board,".to_owned()).await?; // readable now, in the table within ~5 s
//! # Ok(()) }
//! ```
//!
//! Each batch is one statement,
//! `INSERT … ON CONFLICT (id) DO UPDATE SET body = excluded.body, seq = excluded.seq
//! WHERE stored.seq < excluded.seq`: **the sequence guard**. The flusher may write a
//! batch twice (a retry after a timeout that had in fact committed, a claim that ran
//! out while its holder was still writing and another instance took the keys), and a
//! late write must not undo a newer one: with the guard, a row only ever moves
//! forward, and the late batch succeeds without changing it. The sequence is the
//! queue's `u64` clock in microseconds, kept increasing per key; it fits in a
//! `BIGINT` for the next 290,000 years, and one that does not (a corrupt queue) is
//! converted with `i64::try_from` and refused as a permanent error.
//!
//! Errors are classified by [`classify_error`]: the database unreachable, a deadlock or
//! serialization failure, SQLite busy are transient (the flusher retries with
//! back-off); a constraint violation, a bad value, a missing table or column are
//! permanent (the save goes to the dead letters). A batch refused with a permanent
//! error is written again row by row, so only the offending rows are dead-lettered.
//! Values stored in another form than the cache's (a struct kept as JSON text) take a
//! mapping: [`UpsertSink::with_mapping`].
//!
//! ### A sink for another table shape
//!
//! For a table with several value columns, implement [`strata::Sink`] yourself, keeping
//! the guard, and classify errors with [`sink_error`]:
//!
//! ```no_run
//! // CREATE TABLE profiles (user_id BIGINT PRIMARY KEY, name TEXT NOT NULL,
//! //                        bio TEXT NOT NULL, seq BIGINT NOT NULL);
//! use strata::{Sink, SinkError, SinkItem};
//!
//! #[derive(Clone)]
//! struct Profile {
//!     name: String,
//!     bio: String,
//! }
//!
//! struct ProfileSink {
//!     pool: sqlx::PgPool,
//! }
//!
//! #[async_trait::async_trait]
//! impl Sink<i64, Profile> for ProfileSink {
//!     async fn write_batch(
//!         &self,
//!         items: &[SinkItem<i64, Profile>],
//!     ) -> Result<Vec<Result<(), SinkError>>, SinkError> {
//!         // Four parameters a row: the flusher's batches (at most 10,000 keys) stay
//!         // under Postgres's 65,535.
//!         let mut seqs = Vec::with_capacity(items.len());
//!         for item in items {
//!             seqs.push(i64::try_from(item.seq).map_err(SinkError::permanent)?);
//!         }
//!         let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(
//!             "INSERT INTO profiles AS stored (user_id, name, bio, seq) ",
//!         );
//!         q.push_values(items.iter().zip(&seqs), |mut row, (item, seq)| {
//!             row.push_bind(item.key)
//!                 .push_bind(&item.value.name)
//!                 .push_bind(&item.value.bio)
//!                 .push_bind(*seq);
//!         });
//!         q.push(
//!             " ON CONFLICT (user_id) DO UPDATE \
//!              SET name = excluded.name, bio = excluded.bio, seq = excluded.seq \
//!              WHERE stored.seq < excluded.seq",
//!         );
//!         q.build().execute(&self.pool).await.map_err(strata_sql::sink_error)?;
//!         Ok(items.iter().map(|_| Ok(())).collect())
//!     }
//! }
//! ```
//!
//! An `Err` from `write_batch` applies to every item: here a permanent one (a row
//! breaking a constraint) dead-letters the whole batch. Where single rows can be
//! refused, do as [`UpsertSink`] does: after a permanent failure, write the rows one
//! statement each and return one outcome per item.
//!
//! ## Errors
//!
//! Commits fail with [`CommitError`], which says whether the database committed and
//! converts into `sqlx::Error`; setup calls fail with [`Error`] (a kind and the sqlx
//! error), which converts into `strata::Error`. See the `error` module source for why.

mod batch;
mod capture;
mod db;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod listener;
mod report;
mod sink;
mod tx;

pub use capture::{
    CHANGE_CAPTURE_FUNCTION_SQL, CHANNEL, TRIGGER_NAME, TRUNCATE_TRIGGER_NAME, change_capture_trigger_sql,
    install_change_capture, uninstall_change_capture,
};
pub use db::SqlDatabase;
pub use error::{CommitCause, CommitError, CommitOutcome, Error, ErrorKind};
pub use listener::{ChangeListener, ChangeListenerBuilder, ChangeListenerStats};
pub use report::{ActionOutcome, BoxError, CacheInvalidation, CommitReport, InvalidationState};
pub use sink::{UpsertSink, UpsertTable, classify_error, sink_error};
pub use tx::{ActionOutput, ActionPanicked, Transaction, begin};
