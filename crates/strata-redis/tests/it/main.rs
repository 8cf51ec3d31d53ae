//! Integration tests of strata-redis against real `redis-server` processes started by
//! strata-testkit (never the machine's own Redis on 6379). A missing `redis-server`
//! fails the tests loudly (testkit panics with instructions).
//!
//! Every wait is bounded with `tokio::time::timeout`; measured figures are printed with
//! `eprintln!` (run with `--nocapture` to see them).
//!
//! One test binary, one module per area; `support` holds the shared helpers, and
//! The tier conformance suite itself lives in strata (`strata::testing::conformance`).

// Helpers shared by the tests (not `#[test]` fns themselves) unwrap too.
#![allow(clippy::unwrap_used)]

mod cluster;
mod fleet;
mod integrity;
mod pubsub;
mod ring;
mod stream;
mod support;
mod tier;
mod tls;
mod write_behind;
mod write_behind_cache;
