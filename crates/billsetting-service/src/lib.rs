//! # billsetting-service
//!
//! The first story of strata's design, as a service one can run: account billing
//! settings read on every request (cached in each instance's L1 and a shared Redis L2,
//! kept fresh across the fleet by the Redis Stream backplane), changed through an API
//! whose writes go through `strata-sql`'s transaction helper (write lock before
//! `COMMIT`, invalidation after it), and an admin surface for probes, metrics and
//! manual invalidation.
//!
//! Routes: `GET /settings/{account}`, `PUT /settings/{account}/plan`, and the admin
//! router of `strata-axum` (`/healthz`, `/readyz` wired to the backplane and warm-up,
//! `/metrics`, `/caches`, `POST /caches/billsetting/invalidate` with the admin token).
//!
//! Run two instances against one Redis and one Postgres (see the README's "Example
//! service" section) and watch a plan change made on one be served by the other at once.

mod http;
pub mod settings;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::routing::{get, put};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use strata::{Cache, WarmUp};
use strata_axum::{AdminState, AdminToken};
use strata_redis::{RedisStreamBackplane, RedisTier};

pub use settings::Settings;

/// The namespace the settings are cached under.
pub const NAMESPACE: &str = "billsetting";

/// How to run the service.
#[derive(Clone)]
pub struct Config {
    /// Redis URL (L2 tier and backplane).
    pub redis_url: String,
    /// Postgres URL.
    pub database_url: String,
    /// Accounts `1..=N` created at start when missing.
    pub seed_accounts: i64,
    /// The admin token for mutating admin routes (`None`: those routes are disabled).
    pub admin_token: Option<String>,
    /// The Prometheus recorder's handle, rendered at `/metrics` (`None`: no `/metrics`).
    pub prometheus: Option<PrometheusHandle>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // URLs may carry passwords, and the token is a secret.
        f.debug_struct("Config")
            .field("seed_accounts", &self.seed_accounts)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

/// One running instance: its cache and its database pool.
pub struct Service {
    /// Account settings by account id.
    pub cache: Cache<i64, Settings>,
    /// The database.
    pub pool: PgPool,
    admin: AdminState,
}

impl Service {
    /// Connects, prepares the table, builds the cache. Does not wait for readiness:
    /// `/readyz` reports it (the backplane subscription, then warm-up).
    pub async fn start(config: &Config) -> anyhow::Result<Arc<Service>> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&config.database_url)
            .await
            .context("cannot connect to Postgres")?;
        settings::prepare(&pool, config.seed_accounts)
            .await
            .context("cannot prepare the billsetting table")?;
        let tier = RedisTier::builder(config.redis_url.as_str())
            .build()
            .await
            .context("cannot connect the Redis tier")?;
        let backplane = RedisStreamBackplane::builder(config.redis_url.as_str())
            .build()
            .await
            .context("cannot connect the Redis backplane")?;
        let cache = Cache::builder(NAMESPACE)
            .tier(Arc::new(tier))
            .backplane(Arc::new(backplane))
            .ttl(Duration::from_secs(24 * 3600))
            .fail_safe(Duration::from_secs(300), Duration::from_secs(5))
            .warm_up(WarmUp::new())
            .build()
            .context("invalid cache configuration")?;
        let mut admin = AdminState::builder().cache(cache.handle());
        if let Some(token) = &config.admin_token {
            admin = admin.token(AdminToken::new(token));
        }
        if let Some(handle) = &config.prometheus {
            admin = admin.prometheus(handle.clone());
        }
        let admin = admin.build().context("invalid admin settings")?;
        Ok(Arc::new(Service { cache, pool, admin }))
    }

    /// The service's routes and the admin routes (`/healthz`, `/readyz`, `/metrics`,
    /// `/caches…`: see `strata-axum`), ready to serve.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/settings/{account}", get(http::get_settings))
            .route("/settings/{account}/plan", put(http::change_plan))
            .with_state(self.clone())
            .merge(strata_axum::router(self.admin.clone()))
    }

    /// Stops the cache's background work after delivering buffered invalidations.
    pub async fn shutdown(&self) {
        self.cache.shutdown().await;
    }
}
