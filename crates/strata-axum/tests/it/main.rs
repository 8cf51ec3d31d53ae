//! The admin router: every route, the token, malformed bodies, the rate limit, the
//! readiness conditions one by one, and `/metrics` parsed as Prometheus text; once
//! over real HTTP.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::Value;
use strata::clock::Timestamp;
use strata::tier::{Envelope, FillOutcome, FillToken, Lookup, Tier};
use strata::{Cache, Consistency, InProcessBackplane, InProcessTier};
use strata_axum::{AdminState, AdminToken, router};
use tower::ServiceExt;

const TOKEN: &str = "test-token-0123456789";

/// One recorder per test process (the `metrics` facade has one global recorder).
fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().expect("recorder")).clone()
}

async fn cache(ns: &str, hub: &InProcessBackplane, tier: &InProcessTier) -> Cache<u64, String> {
    let c = Cache::builder(ns)
        .tier(Arc::new(tier.clone()))
        .backplane(Arc::new(hub.connect()))
        .build()
        .expect("valid config");
    c.ready().await;
    c
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    auth: Option<&str>,
    body: &str,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = auth {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp =
        app.clone().oneshot(req.body(Body::from(body.to_owned())).expect("request")).await.expect("response");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_stats_and_an_authenticated_invalidation() {
    let (hub, tier) = (InProcessBackplane::new(), InProcessTier::new());
    let a = cache("settings", &hub, &tier).await;
    let b = cache("plans", &hub, &tier).await;
    let state =
        AdminState::builder().cache(a.handle()).cache(b.handle()).token(AdminToken::new(TOKEN)).build();
    let app = router(state.expect("valid state"));

    let (s, body) = call(&app, "GET", "/healthz", None, "").await;
    assert_eq!((s, body["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, body) = call(&app, "GET", "/readyz", None, "").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["caches"]["settings"]["ready"], true);

    a.get_or_load(&7, || async { Ok::<_, std::io::Error>(Some("gold".to_owned())) }).await.expect("load");
    let (s, list) = call(&app, "GET", "/caches", None, "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    let (s, one) = call(&app, "GET", "/caches/settings", None, "").await;
    assert_eq!((s, one["stats"]["loads"].as_u64()), (StatusCode::OK, Some(1)));
    assert_eq!(call(&app, "GET", "/caches/nope", None, "").await.0, StatusCode::NOT_FOUND);

    // The token: missing, wrong, right.
    let inv = "/caches/settings/invalidate";
    assert_eq!(call(&app, "POST", inv, None, r#"{"keys":["7"]}"#).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        call(&app, "POST", inv, Some("test-token-012345678X"), r#"{"keys":["7"]}"#).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert!(a.get_local(&7).is_some(), "nothing invalidated without the token");
    let (s, body) = call(&app, "POST", inv, Some(TOKEN), r#"{"keys":["7","007"]}"#).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!((body["count"].as_u64(), body["not_canonical"].as_u64()), (Some(2), Some(1)));
    assert_eq!(a.get_local(&7), None, "invalidated");
    let (s, body) = call(&app, "POST", inv, Some(TOKEN), r#"{"tag":"plan:gold"}"#).await;
    assert_eq!((s, body["scope"].as_str()), (StatusCode::OK, Some("tag")));
    let (s, body) = call(&app, "POST", inv, Some(TOKEN), r#"{"all":true}"#).await;
    assert_eq!((s, body["scope"].as_str()), (StatusCode::OK, Some("all")));

    // Bad bodies say what was wrong; an unknown namespace is a 404.
    for (body, needle) in [
        ("{not json", "not the JSON expected"),
        (r#"{"keys":["1"],"tag":"t"}"#, "exactly one"),
        (r#"{"keys":[]}"#, "keys is empty"),
        (r#"{"all":false}"#, "invalidates nothing"),
        (r#"{"key":"1"}"#, "unknown field"),
    ] {
        let (s, msg) = call(&app, "POST", inv, Some(TOKEN), body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert!(msg["error"].as_str().is_some_and(|m| m.contains(needle)), "{body}: {msg}");
    }
    assert_eq!(
        call(&app, "POST", "/caches/nope/invalidate", Some(TOKEN), r#"{"all":true}"#).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_mutations_are_off_and_the_rate_limit_holds() {
    let (hub, tier) = (InProcessBackplane::new(), InProcessTier::new());
    let a = cache("settings", &hub, &tier).await;
    let open = router(AdminState::builder().cache(a.handle()).build().expect("valid"));
    let (s, body) = call(&open, "POST", "/caches/settings/invalidate", Some(TOKEN), r#"{"all":true}"#).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");

    let limited = router(
        AdminState::builder()
            .cache(a.handle())
            .token(AdminToken::new(TOKEN))
            .rate_limit(0.001, 2)
            .build()
            .expect("valid"),
    );
    let statuses: Vec<StatusCode> = futures_statuses(&limited, 3).await;
    assert_eq!(statuses, [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);

    let short = AdminState::builder().token(AdminToken::new("short")).build().expect_err("short token");
    assert_eq!(short.setting, "token");
    let dup =
        AdminState::builder().cache(a.handle()).cache(a.handle()).build().expect_err("same namespace twice");
    assert!(dup.problem.contains("settings"), "{dup}");
    assert!(!format!("{:?}", AdminToken::new(TOKEN)).contains(TOKEN));
}

async fn futures_statuses(app: &axum::Router, n: usize) -> Vec<StatusCode> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(call(app, "POST", "/caches/settings/invalidate", Some(TOKEN), r#"{"keys":["1"]}"#).await.0);
    }
    out
}

/// A backplane whose server never answers.
struct Unreachable;

#[async_trait::async_trait]
impl strata::backplane::Backplane for Unreachable {
    fn name(&self) -> &str {
        "unreachable"
    }
    async fn publish(&self, _: &strata::backplane::Message) -> strata::Result<()> {
        Err(strata::Error::new(strata::ErrorKind::Backplane, "unreachable (test)"))
    }
    async fn subscribe(&self) -> strata::Result<strata::backplane::Subscription> {
        Err(strata::Error::new(strata::ErrorKind::Backplane, "unreachable (test)"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_each_condition_not_met() {
    // Bypassed: a Strong cache whose L2 delete failed.
    let (hub, tier) = (InProcessBackplane::new(), InProcessTier::new());
    let strong: Cache<u64, String> = Cache::builder("strong")
        .tier(Arc::new(tier.clone()))
        .backplane(Arc::new(hub.connect()))
        .consistency(Consistency::Strong)
        .heartbeat_interval(Duration::from_millis(20))
        .membership_lease(Duration::from_millis(300))
        .build()
        .expect("valid");
    strong.ready().await;
    let app = router(AdminState::builder().cache(strong.handle()).build().expect("valid"));
    assert_eq!(call(&app, "GET", "/readyz", None, "").await.0, StatusCode::OK);
    tier.set_available(false);
    let _ = strong.invalidate(&1).await;
    let (s, body) = call(&app, "GET", "/readyz", None, "").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let reasons = body["caches"]["strong"]["not_met"].to_string();
    assert!(reasons.contains("bypassed"), "{body}");

    // Closed: shutdown makes liveness fail too.
    let plain = cache("plain", &InProcessBackplane::new(), &InProcessTier::new()).await;
    let app = router(AdminState::builder().cache(plain.handle()).build().expect("valid"));
    plain.shutdown().await;
    let (s, body) = call(&app, "GET", "/readyz", None, "").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["caches"]["plain"]["not_met"].to_string().contains("closed"), "{body}");
    let (s, body) = call(&app, "GET", "/healthz", None, "").await;
    assert_eq!((s, body["closed"][0].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("plain")));

    // Backplane not healthy: the subscription never comes up.
    let down: Cache<u64, String> =
        Cache::builder("down").backplane(Arc::new(Unreachable)).build().expect("valid");
    let app = router(AdminState::builder().cache(down.handle()).build().expect("valid"));
    let (s, body) = call(&app, "GET", "/readyz", None, "").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["caches"]["down"]["not_met"].to_string().contains("backplane"), "{body}");
}

/// An in-process tier whose hot-key ranking never answers: warm-up waits on it.
struct SlowRanking(InProcessTier);

#[async_trait::async_trait]
impl Tier for SlowRanking {
    fn name(&self) -> &str {
        "slow-ranking"
    }
    fn tombstone_ttl(&self) -> Duration {
        self.0.tombstone_ttl()
    }
    async fn lookup(&self, ns: &str, key: &str, lease: Option<Duration>) -> strata::Result<Lookup> {
        self.0.lookup(ns, key, lease).await
    }
    async fn fill(
        &self,
        ns: &str,
        key: &str,
        e: Envelope,
        ttl: Duration,
        t: &FillToken,
    ) -> strata::Result<FillOutcome> {
        self.0.fill(ns, key, e, ttl, t).await
    }
    async fn set(&self, ns: &str, key: &str, e: Envelope, ttl: Duration) -> strata::Result<()> {
        self.0.set(ns, key, e, ttl).await
    }
    async fn delete(&self, ns: &str, keys: &[String]) -> strata::Result<()> {
        self.0.delete(ns, keys).await
    }
    async fn invalidate_tag(&self, ns: &str, tag: &str) -> strata::Result<()> {
        self.0.invalidate_tag(ns, tag).await
    }
    async fn invalidate_namespace(&self, ns: &str) -> strata::Result<()> {
        self.0.invalidate_namespace(ns).await
    }
    async fn touch(&self, ns: &str, key: &str, soft: Timestamp, ttl: Duration) -> strata::Result<bool> {
        self.0.touch(ns, key, soft, ttl).await
    }
    async fn lock(&self, ns: &str, scope: &strata::Scope, id: u64, ttl: Duration) -> strata::Result<()> {
        self.0.lock(ns, scope, id, ttl).await
    }
    async fn unlock(&self, ns: &str, scope: &strata::Scope, id: u64) -> strata::Result<()> {
        self.0.unlock(ns, scope, id).await
    }
    async fn hot_keys(&self, _: &str, _: usize) -> strata::Result<Vec<String>> {
        std::future::pending().await
    }
}

/// A backplane that delivers nothing back: a Strong member never hears its own
/// heartbeat, so it never holds its membership lease.
struct Deaf(InProcessBackplane);

#[async_trait::async_trait]
impl strata::backplane::Backplane for Deaf {
    fn name(&self) -> &str {
        "deaf"
    }
    async fn publish(&self, _: &strata::backplane::Message) -> strata::Result<()> {
        Ok(())
    }
    async fn subscribe(&self) -> strata::Result<strata::backplane::Subscription> {
        self.0.subscribe().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_warm_up_and_the_strong_lease() {
    let warming: Cache<u64, String> = Cache::builder("warming")
        .tier(Arc::new(SlowRanking(InProcessTier::new())))
        .backplane(Arc::new(InProcessBackplane::new()))
        .warm_up(strata::WarmUp::new().budget(Duration::from_secs(3600)))
        .build()
        .expect("valid");
    let start = std::time::Instant::now();
    while !warming.health().backplane_healthy {
        assert!(start.elapsed() < Duration::from_secs(5), "never subscribed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let app = router(AdminState::builder().cache(warming.handle()).build().expect("valid"));
    let (s, body) = call(&app, "GET", "/readyz", None, "").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body["caches"]["warming"]["not_met"].to_string(),
        r#"["warming up: preloading the fleet's hot keys"]"#
    );

    let lonely: Cache<u64, String> = Cache::builder("lonely")
        .tier(Arc::new(InProcessTier::new()))
        .backplane(Arc::new(Deaf(InProcessBackplane::new())))
        .consistency(Consistency::Strong)
        .heartbeat_interval(Duration::from_millis(20))
        .membership_lease(Duration::from_millis(300))
        .build()
        .expect("valid");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let app = router(AdminState::builder().cache(lonely.handle()).build().expect("valid"));
    let (s, body) = call(&app, "GET", "/readyz", None, "").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["caches"]["lonely"]["not_met"].to_string().contains("membership lease not held"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_over_real_http() {
    let handle = prometheus();
    let (hub, tier) = (InProcessBackplane::new(), InProcessTier::new());
    let a = cache("metered", &hub, &tier).await;
    for k in 0..10u64 {
        a.get_or_load(&k, move || async move { Ok::<_, std::io::Error>(Some(format!("v{k}"))) })
            .await
            .expect("load");
        a.get_local(&k);
    }
    // Hits for the age histogram (sampled), an invalidation for the lag histogram.
    let other = cache("metered", &hub, &tier).await;
    for _ in 0..20 {
        for k in 0..10u64 {
            other.get_or_load(&k, || async { Ok::<_, std::io::Error>(None) }).await.expect("read");
        }
    }
    other.invalidate(&9).await.expect("invalidate");
    let state =
        AdminState::builder().cache(a.handle()).token(AdminToken::new(TOKEN)).prometheus(handle).build();
    let app = router(state.expect("valid"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await
    });
    let http = reqwest::Client::new();
    // The cache pushes its counters every second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let text =
        http.get(format!("http://{addr}/metrics")).send().await.expect("scrape").text().await.expect("text");
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let value = |name: &str| {
        scrape.samples.iter().find(|s| s.metric == name && s.labels.get("namespace") == Some("metered")).map(
            |s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            },
        )
    };
    // Two caches of one namespace in one process: their counters are one series.
    assert!(value("strata_loads_total").is_some(), "{text}");
    assert!(value("strata_l1_hits_total").is_some_and(|v| v >= 10.0));
    assert_eq!(value("strata_ready"), Some(1.0));
    assert_eq!(value("strata_backplane_unhealthy_seconds"), Some(0.0));
    assert!(
        scrape.samples.iter().any(|s| s.metric == "strata_requests_total"
            && s.labels.get("tier") == Some("l1")
            && s.labels.get("result") == Some("hit")),
        "{text}"
    );
    let family = |name: &str, tier: Option<&str>| {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric.starts_with(name) && s.labels.get("namespace") == Some("metered"))
            .filter(|s| tier.is_none() || s.labels.get("tier") == tier)
            .count()
    };
    assert!(family("strata_invalidation_lag_seconds", None) > 0, "no lag histogram in:\n{text}");
    assert!(family("strata_hit_age_seconds", Some("l1")) > 0, "no L1 age-at-hit in:\n{text}");
    assert!(family("strata_hit_age_seconds", Some("l2")) > 0, "no L2 age-at-hit in:\n{text}");
    let resp = http
        .post(format!("http://{addr}/caches/metered/invalidate"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"keys": ["3"]}))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 200);
    assert_eq!(a.get_local(&3), None);
}

/// Collects what the fmt subscriber writes, for the audit test.
#[derive(Clone, Default)]
struct Captured(Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// One thread: the subscriber set for this test sees every line the handlers write.
#[tokio::test(flavor = "current_thread")]
async fn audit_lines_name_the_caller_and_the_scope_never_the_token() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let (hub, tier) = (InProcessBackplane::new(), InProcessTier::new());
    let a = cache("audited", &hub, &tier).await;
    let state =
        AdminState::builder().cache(a.handle()).token(AdminToken::new(TOKEN)).caller_header("x-user").build();
    let app = router(state.expect("valid"));
    let send = |auth: &str| {
        Request::builder()
            .method("POST")
            .uri("/caches/audited/invalidate")
            .header("authorization", format!("Bearer {auth}"))
            .header("x-user", "ops-alice")
            .body(Body::from(r#"{"keys":["1","2"]}"#))
            .expect("request")
    };
    assert_eq!(app.clone().oneshot(send("wrong-token-0123456789")).await.expect("response").status(), 401);
    assert_eq!(app.clone().oneshot(send(TOKEN)).await.expect("response").status(), 200);
    let log = String::from_utf8(captured.0.lock().clone()).expect("utf-8");
    assert!(log.contains("strata::audit") && log.contains("ops-alice"), "{log}");
    assert!(log.contains("invalidate refused"), "{log}");
    assert!(log.contains("scope=\"keys\"") && log.contains("count=2") && log.contains("ok=true"), "{log}");
    assert!(!log.contains(TOKEN) && !log.contains("wrong-token"), "a token in the audit log: {log}");
}
