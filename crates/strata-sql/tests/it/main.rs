//! strata-sql against real databases: the transaction helper on Postgres and SQLite
//! (commit, rollback, drop, failed commit, ordering, failed invalidation at the
//! Invalidated and Strong levels, write locks), a writer that dies right after `COMMIT`,
//! Postgres change capture (raw writes, forged notifications from a role without
//! rights, listener reconnect and catch-up, pruning), and the write-behind upsert sink
//! on both databases. Postgres servers come from strata-testkit (random loopback
//! ports); the tests fail loudly if its binaries are missing.
//!
//! One module per area; `support` holds the helpers they share.

#![allow(clippy::unwrap_used)]

mod change_capture;
mod commit_outcome;
mod dead_writer;
mod forgery;
mod support;
mod transaction;
mod upsert_sink;
