//! The routes: probes, metrics, stats, and the one mutating route.

use std::net::SocketAddr;

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use strata::{BreakerState, CacheHandle, CacheHealth, Scope};

use crate::state::AdminState;

/// Most keys one call may invalidate.
pub(crate) const MAX_KEYS: usize = 10_000;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The readiness conditions a cache does not meet, in words.
fn not_met(h: &CacheHealth) -> Vec<&'static str> {
    let mut out = Vec::new();
    if h.closed {
        out.push("closed: shutdown was called");
    }
    if h.bypassed {
        out.push("bypassed: L2 may hold deleted values until a namespace bump succeeds");
    }
    if !h.backplane_healthy {
        out.push("backplane not healthy: not subscribed, or its heartbeats do not come back");
    }
    if !h.membership_lease_held {
        out.push("membership lease not held (Strong level)");
    }
    if h.warming_up {
        out.push("warming up: preloading the fleet's hot keys");
    }
    out
}

fn breaker(state: Option<BreakerState>) -> &'static str {
    match state {
        None => "none",
        Some(BreakerState::Closed) => "closed",
        Some(BreakerState::HalfOpen) => "half-open",
        Some(_) => "open",
    }
}

fn describe(c: &CacheHandle) -> Value {
    let h = c.health();
    json!({
        "namespace": h.namespace,
        "consistency": format!("{:?}", h.consistency),
        "ready": h.is_ready(),
        "not_met": not_met(&h),
        "backplane_healthy": h.backplane_healthy,
        "membership_lease_held": h.membership_lease_held,
        "bypassed": h.bypassed,
        "closed": h.closed,
        "warming_up": h.warming_up,
        "l2_breaker": breaker(h.l2_breaker),
        "pending_invalidations": h.pending_invalidations,
        "backplane_unhealthy_s": h.backplane_unhealthy_for.as_secs_f64(),
        "stats": c.stats(),
    })
}

/// `GET /healthz`: the process serves and no registered cache was shut down.
pub(crate) async fn healthz(State(state): State<AdminState>) -> Response {
    let closed: Vec<&str> =
        state.inner.caches.iter().filter(|(_, c)| c.health().closed).map(|(ns, _)| ns.as_str()).collect();
    let status = if closed.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": if closed.is_empty() { "ok" } else { "down" },
        "closed": closed,
        "uptime_s": state.inner.uptime().as_secs(),
    });
    (status, Json(body)).into_response()
}

/// `GET /readyz`: 200 when every cache is ready; else 503 with what is not met.
pub(crate) async fn readyz(State(state): State<AdminState>) -> Response {
    let mut all = true;
    let mut caches = serde_json::Map::new();
    for (ns, c) in &state.inner.caches {
        let h = c.health();
        let missing = not_met(&h);
        all &= missing.is_empty();
        caches.insert(ns.clone(), json!({ "ready": missing.is_empty(), "not_met": missing }));
    }
    let status = if all { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "ready": all, "caches": caches }))).into_response()
}

/// `GET /metrics`: the Prometheus text format, with the caches' state as gauges read
/// at scrape time (counters are pushed by each cache's reporter every second).
pub(crate) async fn metrics(State(state): State<AdminState>) -> Response {
    let Some(handle) = &state.inner.prometheus else {
        return error(
            StatusCode::NOT_FOUND,
            "no Prometheus recorder was given to AdminState::builder().prometheus()",
        );
    };
    for (ns, c) in &state.inner.caches {
        let h = c.health();
        let ns = ns.clone();
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        metrics::gauge!("strata_ready", "namespace" => ns.clone()).set(flag(h.is_ready()));
        metrics::gauge!("strata_backplane_healthy", "namespace" => ns.clone()).set(flag(h.backplane_healthy));
        metrics::gauge!("strata_backplane_unhealthy_seconds", "namespace" => ns.clone())
            .set(h.backplane_unhealthy_for.as_secs_f64());
        metrics::gauge!("strata_bypassed", "namespace" => ns.clone()).set(flag(h.bypassed));
        metrics::gauge!("strata_warming_up", "namespace" => ns.clone()).set(flag(h.warming_up));
        metrics::gauge!("strata_pending_invalidations", "namespace" => ns.clone())
            .set(h.pending_invalidations as f64);
        let open = match h.l2_breaker {
            Some(BreakerState::Closed) | None => 0.0,
            Some(BreakerState::HalfOpen) => 0.5,
            Some(_) => 1.0,
        };
        metrics::gauge!("strata_l2_breaker_open", "namespace" => ns.clone()).set(open);
        let stats = c.stats();
        metrics::gauge!("strata_l1_entries", "namespace" => ns.clone()).set(stats.l1_entries as f64);
        // Reads by tier and result, as cache dashboards chart them (`sum by (result)`
        // is the hit ratio); the same counts as strata_l1_hits_total & co.
        for (tier, result, n) in
            [("l1", "hit", stats.l1_hits), ("l2", "hit", stats.l2_hits), ("any", "miss", stats.misses)]
        {
            metrics::counter!("strata_requests_total", "namespace" => ns.clone(), "tier" => tier, "result" => result)
                .absolute(n);
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render()).into_response()
}

/// `GET /caches`.
pub(crate) async fn list(State(state): State<AdminState>) -> Json<Value> {
    Json(Value::Array(state.inner.caches.values().map(describe).collect()))
}

/// `GET /caches/{ns}`.
pub(crate) async fn one(State(state): State<AdminState>, Path(ns): Path<String>) -> Response {
    match state.inner.caches.get(&ns) {
        Some(c) => Json(describe(c)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no cache with namespace {ns:?}")),
    }
}

/// The body of `POST /caches/{ns}/invalidate`: exactly one of the three.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateBody {
    #[serde(default)]
    keys: Option<Vec<String>>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    all: Option<bool>,
}

impl InvalidateBody {
    fn scope(self) -> Result<Scope, String> {
        match (self.keys, self.tag, self.all) {
            (Some(keys), None, None) if keys.is_empty() => Err("keys is empty".into()),
            (Some(keys), None, None) if keys.len() > MAX_KEYS => {
                Err(format!("{} keys; at most {MAX_KEYS} per call", keys.len()))
            }
            (Some(keys), None, None) => Ok(Scope::Keys(keys)),
            (None, Some(tag), None) if tag.is_empty() => Err("tag is empty".into()),
            (None, Some(tag), None) => Ok(Scope::Tag(tag)),
            (None, None, Some(true)) => Ok(Scope::All),
            (None, None, Some(false)) => {
                Err("\"all\": false invalidates nothing; send {\"all\": true}".into())
            }
            _ => Err("give exactly one of {\"keys\": [...]}, {\"tag\": \"...\"}, {\"all\": true}".into()),
        }
    }
}

/// Reads the body of `POST /caches/{ns}/invalidate` (bytes from the network): the scope
/// it names, or the problem to answer with 400.
pub(crate) fn parse_invalidate_body(body: &[u8]) -> Result<Scope, String> {
    let parsed: InvalidateBody =
        serde_json::from_slice(body).map_err(|e| format!("the body is not the JSON expected: {e}"))?;
    parsed.scope()
}

fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    v.strip_prefix(b"Bearer ").or_else(|| v.strip_prefix(b"bearer "))
}

/// `POST /caches/{ns}/invalidate`: bearer token, rate limit, audit line.
pub(crate) async fn invalidate(
    State(state): State<AdminState>,
    Path(ns): Path<String>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let inner = &state.inner;
    let caller = inner
        .caller_header
        .as_deref()
        .and_then(|h| headers.get(h))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| peer.map(|Extension(ConnectInfo(addr))| addr.to_string()))
        .unwrap_or_else(|| "unknown".into());
    let Some(token) = &inner.token else {
        return error(
            StatusCode::FORBIDDEN,
            "mutating routes are disabled: give the admin state a token (AdminStateBuilder::token)",
        );
    };
    if !bearer(&headers).is_some_and(|t| token.matches(t)) {
        tracing::warn!(target: "strata::audit", %caller, namespace = %ns, "invalidate refused: missing or wrong bearer token");
        let mut r = error(StatusCode::UNAUTHORIZED, "send Authorization: Bearer <admin token>");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return r;
    }
    if !inner.limit.try_take() {
        return error(StatusCode::TOO_MANY_REQUESTS, "too many admin calls; retry in a second");
    }
    let Some(cache) = inner.caches.get(&ns) else {
        return error(StatusCode::NOT_FOUND, format!("no cache with namespace {ns:?}"));
    };
    let scope = match parse_invalidate_body(&body) {
        Ok(s) => s,
        Err(problem) => return error(StatusCode::BAD_REQUEST, problem),
    };
    let (what, count, not_canonical) = match &scope {
        Scope::Keys(keys) => ("keys", keys.len(), cache.canonical_keys(keys).1),
        Scope::Tag(_) => ("tag", 1, 0),
        Scope::All => ("all", 1, 0),
    };
    let result = cache.invalidate(scope.clone()).await;
    tracing::info!(
        target: "strata::audit",
        %caller,
        namespace = %ns,
        scope = what,
        count,
        ok = result.is_ok(),
        "invalidate"
    );
    match result {
        Ok(()) => Json(json!({
            "namespace": ns,
            "scope": what,
            "count": count,
            "not_canonical": not_canonical,
            "tag": if let Scope::Tag(t) = &scope { Some(t.as_str()) } else { None },
        }))
        .into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the invalidation could not be completed ({e}); {}",
                if e.is_queued() {
                    "its message goes out in order when the backplane answers (below Strong nothing more is needed)"
                } else if e.is_transient() {
                    "it was buffered and is retried"
                } else {
                    "retry it"
                }
            ),
        ),
    }
}
