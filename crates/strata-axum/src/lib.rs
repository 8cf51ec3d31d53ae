//! # strata-axum
//!
//! The admin surface of [strata] caches as an [axum] [`Router`] that the application
//! mounts next to its own routes (it binds the socket itself):
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | liveness: 200 unless a registered cache was shut down |
//! | `GET /readyz` | readiness: 200 when every cache is ready (backplane subscribed and healthy, Strong membership lease held, not bypassed, warm-up done); else 503 with what is not met, per cache |
//! | `GET /metrics` | Prometheus text format of the application's recorder, with each cache's state as gauges read at scrape time |
//! | `GET /caches`, `GET /caches/{ns}` | health and counters as JSON |
//! | `POST /caches/{ns}/invalidate` | `{"keys": [...]}`, `{"tag": "..."}` or `{"all": true}`: bearer token, rate limit, audit line |
//!
//! ```no_run
//! # async fn example(cache: strata::Cache<u64, String>) -> Result<(), Box<dyn std::error::Error>> {
//! let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
//! let admin = strata_axum::AdminState::builder()
//!     .cache(cache.handle())
//!     .token(strata_axum::AdminToken::new(std::env::var("STRATA_ADMIN_TOKEN")?))
//!     .prometheus(prometheus)
//!     .build()?;
//! let app = axum::Router::new().merge(strata_axum::router(admin));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9000").await?;
//! // With the peer address in audit lines:
//! axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await?;
//! # Ok(()) }
//! ```
//!
//! # Security
//!
//! The mutating route is off unless a token is configured (403), requires
//! `Authorization: Bearer <token>` compared in constant time (401 otherwise), is
//! rate-limited (429), and writes one audit line per call through `tracing` (target
//! `strata::audit`: caller, namespace, scope, how many keys, outcome) — never the token,
//! whose `Debug` prints `***`. The read-only routes are open: mount them where only
//! the load balancer and the scraper reach, or behind the application's own auth.
//!
//! # Metrics
//!
//! Each cache pushes its counters every second as `strata_<counter>_total{namespace}`
//! (the fields of [`strata::CacheStats`]: `strata_l1_hits_total`, `strata_misses_total`,
//! `strata_loads_total`, `strata_invalidations_sent_total`, `strata_gaps_detected_total`,
//! `strata_l1_evictions_total`, …) and `strata_load_duration_seconds`; `/metrics` adds
//! `strata_requests_total{namespace,tier,result}` (`l1`/`hit`, `l2`/`hit`, `any`/`miss`:
//! the hit ratio by tier as dashboards chart it) and the gauges `strata_ready`,
//! `strata_backplane_healthy`, `strata_bypassed`, `strata_warming_up`,
//! `strata_pending_invalidations`, `strata_l2_breaker_open` (0, 0.5 half-open, 1),
//! `strata_l1_entries` and `strata_backplane_unhealthy_seconds` (time since the
//! backplane was last healthy; 0 while it is), per namespace.
//!
//! Two histograms no other cache exports, recorded by the caches themselves:
//! `strata_invalidation_lag_seconds{namespace}` — from a message's publish on one
//! instance to its application on this one (across two wall clocks, so only as exact as
//! they agree; a send time in the future counts as 0 and in
//! `strata_invalidation_lag_skewed_total`) — and `strata_hit_age_seconds{namespace,tier}`
//! — the age of the value a hit returned (L1 hits sampled one in 64, every L2 hit).
//! The recorder decides the buckets: `PrometheusBuilder::set_buckets` for histograms,
//! summaries (quantiles) otherwise.

#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod routes;
mod state;

use axum::Router;
use axum::routing::{get, post};

pub use state::{AdminState, AdminStateBuilder, AdminToken};

/// The admin routes over `state`, to merge into the application's router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .route("/caches", get(routes::list))
        .route("/caches/{ns}", get(routes::one))
        .route("/caches/{ns}/invalidate", post(routes::invalidate))
        .with_state(state)
}
