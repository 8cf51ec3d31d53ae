//! The service's own routes: read an account's settings (cached), change its plan
//! (through strata-sql's transaction helper, so every instance drops the old row).

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::Service;
use crate::settings::{self, PlanChange, Settings};

/// An error as the API reports it: a status and a message that says what went wrong.
pub(crate) struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn account_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| {
        ApiError(StatusCode::BAD_REQUEST, format!("account id {raw:?} is not a positive whole number"))
    })
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "{what} failed");
    ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("{what} failed: {e}"))
}

/// `GET /settings/{account}`: from the cache, loading from Postgres on a miss.
pub(crate) async fn get_settings(
    State(service): State<Arc<Service>>,
    Path(raw): Path<String>,
) -> Result<Json<Settings>, ApiError> {
    let id = account_id(&raw)?;
    let pool = service.pool.clone();
    let found = service
        .cache
        .get_or_load(&id, move || async move { settings::load(&pool, id).await })
        .await
        .map_err(|e| unavailable("reading the settings", e))?;
    found.map(Json).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no account {id}")))
}

/// `PUT /settings/{account}/plan` with `{"plan": "gold", "monthly_limit_cents": 50000}`:
/// the update commits under a write lock and every instance's copy is invalidated.
pub(crate) async fn change_plan(
    State(service): State<Arc<Service>>,
    Path(raw): Path<String>,
    body: Result<Json<PlanChange>, JsonRejection>,
) -> Result<Json<Settings>, ApiError> {
    let id = account_id(&raw)?;
    let Json(change) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    if let Some(problem) = change.problem() {
        return Err(ApiError(StatusCode::BAD_REQUEST, problem));
    }
    let mut tx =
        strata_sql::begin(&service.pool).await.map_err(|e| unavailable("starting the transaction", e))?;
    let Some(row) =
        settings::change_plan(&mut tx, id, &change).await.map_err(|e| unavailable("the update", e))?
    else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no account {id}")));
    };
    tx.invalidate(&service.cache, &id);
    let report = tx.commit().await.map_err(|e| unavailable("the commit", e))?;
    if !report.is_clean() {
        // Committed all the same: the invalidation was buffered and will be retried.
        tracing::warn!(account = id, ?report, "plan change committed; invalidation buffered for retry");
    }
    Ok(Json(row))
}
