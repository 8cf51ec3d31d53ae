//! What an idle fleet's liveness costs: N instances that serve nothing, heartbeating
//! every second, on the in-process hub and on a Redis stream backplane (a
//! `redis-server` started here on a random loopback port). Prints, per second and for
//! each protocol (the heartbeat digest, the default; and `broadcast_heartbeats`, what
//! earlier releases did): messages delivered to the instances (in-process: counted by
//! the hub; Redis: stream entries appended × N readers), and for Redis the commands
//! Redis executed and its CPU seconds.
//!
//! Run: `cargo run --release -p strata-redis --example idle_fleet -- [--instances N]
//! [--seconds N]` (defaults: 20 instances, 10 s per run). Needs `redis-server` on the
//! PATH.

use std::sync::Arc;
use std::time::Duration;

use strata::{Cache, InProcessBackplane};
use strata_redis::{RedisStreamBackplane, RedisTier};
use strata_testkit::RedisServer;

const NS: &str = "idle";

fn parse_args() -> Result<(usize, u64), String> {
    let (mut n, mut secs) = (20usize, 10u64);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v: u64 = it
            .next()
            .and_then(|v| v.parse().ok())
            .filter(|&v| v > 0)
            .ok_or_else(|| format!("{flag} wants a positive whole number"))?;
        match flag.as_str() {
            "--instances" => n = usize::try_from(v).map_err(|e| e.to_string())?,
            "--seconds" => secs = v,
            other => return Err(format!("unknown argument {other}; use --instances, --seconds")),
        }
    }
    Ok((n, secs))
}

async fn ready_all(caches: &[Cache<u64, String>]) {
    for c in caches {
        if tokio::time::timeout(Duration::from_secs(10), c.ready()).await.is_err() {
            eprintln!("an instance did not become ready within 10 s");
            std::process::exit(1);
        }
    }
    // Let every member hear every other one before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
}

async fn in_process(n: usize, secs: u64, broadcast: bool) -> f64 {
    let hub = InProcessBackplane::new();
    let tier = strata::tier::InProcessTier::new();
    let caches: Vec<Cache<u64, String>> = (0..n)
        .map(|_| {
            Cache::builder(NS)
                .tier(Arc::new(tier.clone()))
                .backplane(Arc::new(hub.connect()))
                .broadcast_heartbeats(broadcast)
                .build()
                .expect("valid")
        })
        .collect();
    ready_all(&caches).await;
    let before = hub.delivered();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    (hub.delivered() - before) as f64 / secs as f64
}

/// Redis's counters: entries in the stream so far (its counter), commands executed,
/// CPU seconds.
fn redis_counters(server: &RedisServer, counter_key: &str) -> (u64, u64, f64) {
    // A raw RESP reply: `$3`, then the number.
    let entries = server
        .command(&["GET", counter_key])
        .ok()
        .and_then(|v| v.lines().map(str::trim).rfind(|l| !l.is_empty())?.parse().ok())
        .unwrap_or(0);
    let info = server.command(&["INFO", "all"]).unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    };
    let commands: u64 = info
        .lines()
        .filter(|l| l.starts_with("cmdstat_"))
        .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum();
    (entries, commands, field("used_cpu_sys:") + field("used_cpu_user:"))
}

async fn on_redis(n: usize, secs: u64, broadcast: bool) -> (f64, f64, f64) {
    let server = RedisServer::start();
    let mut caches = Vec::new();
    let mut counter_key = String::new();
    for _ in 0..n {
        let tier = RedisTier::builder(server.url()).build().await.expect("tier");
        let bp = RedisStreamBackplane::builder(server.url())
            .share_connection(&tier)
            .build()
            .await
            .expect("backplane");
        counter_key = format!("{}:seq", bp.stream_key());
        caches.push(
            Cache::<u64, String>::builder(NS)
                .tier(Arc::new(tier))
                .backplane(Arc::new(bp))
                .broadcast_heartbeats(broadcast)
                .build()
                .expect("valid"),
        );
    }
    ready_all(&caches).await;
    let (e0, c0, cpu0) = redis_counters(&server, &counter_key);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (e1, c1, cpu1) = redis_counters(&server, &counter_key);
    let s = secs as f64;
    ((e1 - e0) as f64 * n as f64 / s, (c1 - c0) as f64 / s, (cpu1 - cpu0) / s)
}

#[tokio::main]
async fn main() {
    let (n, secs) = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    println!("{n} idle instances, heartbeat every 1 s, {secs} s per run");
    println!("{:<42} {:>14} {:>14} {:>14}", "protocol", "deliveries/s", "Redis cmds/s", "Redis CPU s/s");
    for broadcast in [true, false] {
        let name = if broadcast { "broadcast (earlier releases)" } else { "digest" };
        let d = in_process(n, secs, broadcast).await;
        println!("{:<42} {d:>14.1} {:>14} {:>14}", format!("in-process, {name}"), "-", "-");
        let (d, cmds, cpu) = on_redis(n, secs, broadcast).await;
        println!("{:<42} {d:>14.1} {cmds:>14.1} {cpu:>14.4}", format!("redis stream, {name}"));
    }
}
