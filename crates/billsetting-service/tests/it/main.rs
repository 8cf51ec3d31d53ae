//! The example service over real HTTP, with real Redis and Postgres started by the
//! testkit: two instances, a plan change made on one and served by the other, and the
//! errors a client can provoke.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use billsetting_service::{Config, Service, Settings};
use serde_json::Value;
use strata_testkit::{PostgresServer, RedisServer};

const TOKEN: &str = "s3cret-token-for-tests";

/// One recorder per test process (the `metrics` facade has one global recorder).
fn prometheus() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().expect("recorder")
        })
        .clone()
}

struct Instance {
    service: Arc<Service>,
    addr: SocketAddr,
}

impl Instance {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

struct Fixture {
    _redis: RedisServer,
    _pg: PostgresServer,
    instances: Vec<Instance>,
    http: reqwest::Client,
}

async fn fixture(n: usize) -> Fixture {
    let (redis, pg, db_url) = tokio::task::spawn_blocking(|| {
        let redis = RedisServer::start();
        let pg = PostgresServer::start();
        let url = pg.create_database("billsetting").expect("create database");
        (redis, pg, url)
    })
    .await
    .expect("servers");
    let config = Config {
        redis_url: redis.url(),
        database_url: db_url,
        seed_accounts: 100,
        admin_token: Some(TOKEN.into()),
        prometheus: Some(prometheus()),
    };
    // Started together, as a deploy starts them (they race to create the table).
    let services = futures::future::join_all((0..n).map(|_| Service::start(&config))).await;
    let mut instances = Vec::new();
    for service in services {
        let service = service.expect("service starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = service.router().into_make_service_with_connect_info::<SocketAddr>();
        tokio::spawn(async move { axum::serve(listener, router).await });
        service.cache.ready().await;
        instances.push(Instance { service, addr });
    }
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
    Fixture { _redis: redis, _pg: pg, instances, http }
}

async fn get_settings(f: &Fixture, i: usize, account: i64) -> Settings {
    let resp = f.http.get(f.instances[i].url(&format!("/settings/{account}"))).send().await.expect("GET");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("settings JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_change_on_one_instance_is_served_by_the_other() {
    let f = fixture(2).await;
    for i in 0..2 {
        let s = get_settings(&f, i, 7).await;
        assert_eq!((s.plan.as_str(), s.version), ("basic", 1));
        assert!(f.instances[i].service.cache.get_local(&7).is_some(), "cached on instance {i}");
    }
    let resp = f
        .http
        .put(f.instances[0].url("/settings/7/plan"))
        .json(&serde_json::json!({"plan": "gold", "monthly_limit_cents": 50000}))
        .send()
        .await
        .expect("PUT");
    assert_eq!(resp.status(), 200);
    let written: Settings = resp.json().await.expect("JSON");
    assert_eq!((written.plan.as_str(), written.version), ("gold", 2));

    // The other instance heard the write lock before COMMIT; its next read loads the new row.
    let start = Instant::now();
    loop {
        let s = get_settings(&f, 1, 7).await;
        if s.version == 2 {
            assert_eq!(s.plan, "gold");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(2), "instance 1 still serves {s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("instance 1 served the new plan {:?} after the PUT returned", start.elapsed());
    assert_eq!(get_settings(&f, 0, 7).await.version, 2);
    // Cached again after the lock's release.
    let start = Instant::now();
    while f.instances[1].service.cache.get_local(&7).is_none() {
        get_settings(&f, 1, 7).await;
        assert!(start.elapsed() < Duration::from_secs(5), "never cached again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_message_that_says_what_was_wrong() {
    let f = fixture(1).await;
    let check = |resp: reqwest::Response, status: u16, needle: &'static str| async move {
        assert_eq!(resp.status(), status);
        let body: Value = resp.json().await.expect("JSON error body");
        let msg = body["error"].as_str().expect("error message").to_owned();
        assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    };
    let get = |path: &str| f.http.get(f.instances[0].url(path)).send();
    check(get("/settings/abc").await.expect("GET"), 400, "not a positive whole number").await;
    check(get("/settings/-3").await.expect("GET"), 400, "not a positive whole number").await;
    check(get("/settings/100000").await.expect("GET"), 404, "no account 100000").await;
    let put = |path: &str, body: &'static str| {
        f.http.put(f.instances[0].url(path)).header("content-type", "application/json").body(body).send()
    };
    check(put("/settings/7/plan", "{not json").await.expect("PUT"), 400, "").await;
    check(put("/settings/7/plan", r#"{"plan": "Gold!"}"#).await.expect("PUT"), 400, "a-z, 0-9").await;
    check(put("/settings/7/plan", r#"{"plan": "gold", "extra": 1}"#).await.expect("PUT"), 400, "extra").await;
    check(
        put("/settings/7/plan", r#"{"plan": "gold", "monthly_limit_cents": -1}"#).await.expect("PUT"),
        400,
        "between",
    )
    .await;
    check(put("/settings/100000/plan", r#"{"plan": "gold"}"#).await.expect("PUT"), 404, "no account").await;
    // Nothing above changed the row.
    assert_eq!(get_settings(&f, 0, 7).await.version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_router_probes_scrapes_and_invalidates_across_instances() {
    let f = fixture(2).await;
    for i in 0..2 {
        let resp = f.http.get(f.instances[i].url("/readyz")).send().await.expect("GET /readyz");
        assert_eq!(resp.status(), 200, "instance {i} ready (subscribed, warmed up)");
        get_settings(&f, i, 9).await;
    }
    // Under some load: each key loaded on one instance, read from L2 on the other.
    for k in 1..=50 {
        get_settings(&f, k as usize % 2, k).await;
        get_settings(&f, (k as usize + 1) % 2, k).await;
    }

    // An operator's invalidation on one instance reaches the other.
    assert!(f.instances[1].service.cache.get_local(&9).is_some());
    let resp = f
        .http
        .post(f.instances[0].url("/caches/billsetting/invalidate"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"keys": ["9"]}))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 200);
    let start = Instant::now();
    while f.instances[1].service.cache.get_local(&9).is_some() {
        assert!(start.elapsed() < Duration::from_secs(2), "instance 1 still holds key 9");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    // The scrape parses, with the counters, the gauges and both histograms.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let text =
        f.http.get(f.instances[1].url("/metrics")).send().await.expect("scrape").text().await.expect("text");
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text");
    for name in [
        "strata_l1_hits_total",
        "strata_loads_total",
        "strata_ready",
        "strata_pending_invalidations",
        "strata_invalidation_lag_seconds",
        "strata_hit_age_seconds",
    ] {
        assert!(
            scrape
                .samples
                .iter()
                .any(|s| s.metric == name && s.labels.get("namespace") == Some("billsetting")),
            "{name} missing from:\n{text}"
        );
    }
    let resp = f
        .http
        .post(f.instances[0].url("/caches/billsetting/invalidate"))
        .json(&serde_json::json!({"all": true}));
    assert_eq!(resp.send().await.expect("POST").status(), 401, "no token, no invalidation");
}
