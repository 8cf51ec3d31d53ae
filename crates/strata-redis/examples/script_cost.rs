//! What each tier operation costs Redis: runs one operation many times against a
//! `redis-server` started here on a random loopback port, and reads from `INFO` the
//! server's CPU time per operation (`used_cpu_user` + `used_cpu_sys`: the commands, the
//! scripts and the network round trip), the script time and script calls per operation
//! (`cmdstat_evalsha`) and how many commands each operation ran
//! (`total_commands_processed` counts the ones a script runs). Operations: a lookup that
//! hits (answered by the plain read, no script), a lookup of a missing key (no lease),
//! a lookup of a missing key that takes the lease, a lookup miss then a fill, a delete.
//! A plain `GET` of the same entry is the yardstick.
//!
//! Run: `cargo run --release -p strata-redis --example script_cost -- [--calls N]`
//! (default 20,000 per operation). Needs `redis-server` on the PATH.

use std::time::Duration;

use bytes::Bytes;
use strata::clock::{Clock, SystemClock};
use strata::tier::{Envelope, Lookup, Tier};
use strata_redis::RedisTier;
use strata_testkit::RedisServer;

const NS: &str = "cost";
const TTL: Duration = Duration::from_secs(600);

/// `calls` and `usec` of the script commands, every command processed, and the
/// server's CPU time (µs).
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    script_calls: u64,
    script_usec: u64,
    commands: u64,
    cpu_us: f64,
}

fn counters(server: &RedisServer) -> Result<Counters, String> {
    let info = server.command(&["INFO", "all"]).map_err(|e| format!("INFO: {e}"))?;
    let mut c = Counters::default();
    for line in info.lines() {
        if let Some(v) = line.strip_prefix("total_commands_processed:") {
            c.commands = v.trim().parse().unwrap_or(0);
        }
        for name in ["used_cpu_user:", "used_cpu_sys:"] {
            if let Some(v) = line.strip_prefix(name) {
                c.cpu_us += v.trim().parse::<f64>().unwrap_or(0.0) * 1e6;
            }
        }
        for name in ["cmdstat_evalsha:", "cmdstat_eval:"] {
            if let Some(stats) = line.strip_prefix(name) {
                for kv in stats.split(',') {
                    if let Some(v) = kv.strip_prefix("calls=") {
                        c.script_calls += v.parse::<u64>().unwrap_or(0);
                    }
                    if let Some(v) = kv.strip_prefix("usec=") {
                        c.script_usec += v.parse::<u64>().unwrap_or(0);
                    }
                }
            }
        }
    }
    Ok(c)
}

fn envelope(i: u64) -> Envelope {
    let t = SystemClock::default().now();
    Envelope {
        value: Some(Bytes::from(format!(
            "{{\"plan\":\"premium\",\"version\":{i},\"pad\":\"{}\"}}",
            "x".repeat(64)
        ))),
        version: Some(i),
        created: t,
        soft_expiry: t.saturating_add(Duration::from_secs(300)),
        hard_expiry: t.saturating_add(TTL),
        stamp: 0,
        tags: Vec::new(),
        load_nanos: 1_000,
        schema: 0,
    }
}

fn report(name: &str, calls: u64, before: Counters, after: Counters) {
    let per_op = |x: f64| x / calls as f64;
    let scripts = after.script_calls.saturating_sub(before.script_calls);
    let usec = after.script_usec.saturating_sub(before.script_usec);
    let commands = after.commands.saturating_sub(before.commands);
    println!(
        "{name:<28} {calls:>7} ops  {:>6.2} us CPU/op  {:>6.2} us in scripts/op  {:>4.2} scripts/op  {:>5.2} commands/op",
        per_op(after.cpu_us - before.cpu_us),
        per_op(usec as f64),
        per_op(scripts as f64),
        // What the operation ran, scripts included (INFO itself adds one).
        per_op(commands.saturating_sub(1) as f64),
    );
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let mut calls: u64 = 20_000;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--calls", Some(n)) if n > 0 => calls = n,
            _ => return Err(format!("unknown or bad argument {flag}; use --calls N")),
        }
    }
    let server = RedisServer::start();
    let url = server.url();
    let tier = RedisTier::builder(&url).build().await.map_err(|e| e.to_string())?;
    let token = match tier.lookup(NS, "hit", None).await.map_err(|e| e.to_string())? {
        Lookup::Miss { token, .. } => token,
        Lookup::Hit(_) => return Err("a fresh server holds the key".into()),
    };
    tier.fill(NS, "hit", envelope(1), TTL, &token).await.map_err(|e| e.to_string())?;
    println!("# redis-server {url}, {calls} calls per operation, one at a time");

    let b = counters(&server)?;
    for _ in 0..calls {
        tier.lookup(NS, "hit", None).await.map_err(|e| e.to_string())?;
    }
    report("lookup, hit", calls, b, counters(&server)?);

    let b = counters(&server)?;
    for _ in 0..calls {
        tier.lookup(NS, "missing", None).await.map_err(|e| e.to_string())?;
    }
    report("lookup, miss", calls, b, counters(&server)?);

    let b = counters(&server)?;
    for i in 0..calls {
        tier.lookup(NS, &format!("m{i}"), Some(Duration::from_secs(5))).await.map_err(|e| e.to_string())?;
    }
    report("lookup, miss + lease", calls, b, counters(&server)?);

    let b = counters(&server)?;
    for i in 0..calls {
        let key = format!("f{i}");
        let token = match tier.lookup(NS, &key, None).await.map_err(|e| e.to_string())? {
            Lookup::Miss { token, .. } => token,
            Lookup::Hit(_) => continue,
        };
        tier.fill(NS, &key, envelope(i), TTL, &token).await.map_err(|e| e.to_string())?;
    }
    report("lookup miss, then fill (2)", calls, b, counters(&server)?);

    let b = counters(&server)?;
    for i in 0..calls {
        tier.delete(NS, &[format!("f{i}")]).await.map_err(|e| e.to_string())?;
    }
    report("delete", calls, b, counters(&server)?);

    // The yardstick: what one GET of the same entry costs.
    let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
    let mut conn = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
    let keys: Vec<String> =
        redis::cmd("KEYS").arg("*e:hit").query_async(&mut conn).await.map_err(|e| e.to_string())?;
    let key = keys.first().ok_or("no entry key")?;
    let b = counters(&server)?;
    for _ in 0..calls {
        let _: Vec<u8> =
            redis::cmd("GET").arg(key).query_async(&mut conn).await.map_err(|e| e.to_string())?;
    }
    report("plain GET of the entry", calls, b, counters(&server)?);
    Ok(())
}
