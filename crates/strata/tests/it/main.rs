//! Behaviour of the core cache: single-flight, fill guards, fail-safe, timeouts, early
//! refresh, tags, namespaces, sliding TTL, `max_stale`, gap repair, and the error paths.
//! Time-dependent logic runs on a `ManualClock` (or tokio's paused time for timeouts):
//! no test sleeps to let a TTL pass.
//!
//! One module per area; `support` holds the helpers they share.

// Records the largest allocation per thread, for `hostile_bytes`.
#[global_allocator]
static ALLOC: strata_testkit::alloc::PeakAlloc = strata_testkit::alloc::PeakAlloc;

mod api;
mod buffered;
mod busy_tier;
mod config;
mod conformance;
mod fail_safe;
mod fill_guard;
mod fleet;
mod fleet_hardening;
mod hardening;
mod hostile_bytes;
mod l1_history;
mod model;
mod overload;
mod reload;
mod schema;
mod sharded;
mod single_flight;
mod strong;
mod support;
mod tag_pruning;
mod warm_up;
mod write_behind;
mod write_lock;
