//! What each Redis server did during a strategy's run: commands it executed (`INFO
//! stats` `total_commands_processed`, which counts every command a Lua script runs, not
//! only what clients sent) and CPU seconds (`INFO cpu`, user + system), read before and
//! after. The seed story's failure was one Redis's CPU, so this is what the report puts
//! beside the client-side op counts. From `INFO commandstats` also the script calls
//! (`EVALSHA`, `EVAL`, `FCALL`), the server time they took, and those that failed or
//! were rejected on the server (an error the client may have retried or hidden).

use anyhow::{Context, Result};
use serde::Serialize;

use crate::secret::SecretUrl;

/// One server's counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeSample {
    commands: u64,
    cpu_s: f64,
    script_calls: u64,
    script_usec: u64,
    script_failed: u64,
    noscript: u64,
}

/// Reads every server's counters.
pub async fn sample(urls: &[SecretUrl]) -> Result<Vec<NodeSample>> {
    let mut out = Vec::with_capacity(urls.len());
    for url in urls {
        let client = redis::Client::open(url.expose()).with_context(|| format!("bad Redis URL {url}"))?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("cannot connect to Redis at {url}"))?;
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .arg("cpu")
            .arg("commandstats")
            .arg("errorstats")
            .query_async(&mut conn)
            .await
            .with_context(|| format!("INFO failed on {url}"))?;
        out.push(parse(&info));
    }
    Ok(out)
}

fn parse(info: &str) -> NodeSample {
    let field = |name: &str| {
        info.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':'))).map(str::trim)
    };
    let cpu = |name: &str| field(name).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let mut sample = NodeSample {
        commands: field("total_commands_processed").and_then(|v| v.parse().ok()).unwrap_or(0),
        cpu_s: cpu("used_cpu_sys") + cpu("used_cpu_user"),
        ..NodeSample::default()
    };
    for name in ["cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall"] {
        let Some(stats) = field(name) else { continue };
        // calls=N,usec=N,usec_per_call=X,rejected_calls=N,failed_calls=N
        let stat = |key: &str| {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        sample.script_calls += stat("calls");
        sample.script_usec += stat("usec");
        sample.script_failed += stat("failed_calls") + stat("rejected_calls");
    }
    // errorstat_NOSCRIPT:count=N — a script's first call on a server that does not
    // hold it yet; the client loads it and calls again.
    sample.noscript = field("errorstat_NOSCRIPT")
        .and_then(|v| v.strip_prefix("count="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    sample
}

/// What every server did between two samples.
#[derive(Debug, Clone, Serialize)]
pub struct NodesReport {
    /// Commands executed per server (scripts count each command they run).
    pub commands: Vec<u64>,
    /// Commands per second, summed over the servers.
    pub commands_per_s: f64,
    /// The busiest server's commands over the mean (1.0 = perfectly even).
    pub commands_max_over_mean: f64,
    /// CPU seconds per server.
    pub cpu_s: Vec<f64>,
    /// CPU seconds, summed over the servers.
    pub cpu_s_total: f64,
    /// Script calls (`EVALSHA`, `EVAL`, `FCALL`), summed over the servers.
    pub script_calls: u64,
    /// Server time per script call, microseconds (0 without calls).
    pub script_us_per_call: f64,
    /// Script calls that failed or were rejected on the server.
    pub script_failed_calls: u64,
    /// Of the failures, `NOSCRIPT` replies: a script's first call on a server that did
    /// not hold it yet, which the client answers by loading it (harmless).
    pub script_noscript: u64,
}

impl NodesReport {
    /// The difference between `before` and `after` over `secs` seconds of run.
    pub fn between(before: &[NodeSample], after: &[NodeSample], secs: f64) -> NodesReport {
        let commands: Vec<u64> =
            before.iter().zip(after).map(|(b, a)| a.commands.saturating_sub(b.commands)).collect();
        let cpu_s: Vec<f64> = before.iter().zip(after).map(|(b, a)| (a.cpu_s - b.cpu_s).max(0.0)).collect();
        let total: u64 = commands.iter().sum();
        let mean = total as f64 / commands.len().max(1) as f64;
        let max = commands.iter().copied().max().unwrap_or(0) as f64;
        let delta = |f: fn(&NodeSample) -> u64| -> u64 {
            before.iter().zip(after).map(|(b, a)| f(a).saturating_sub(f(b))).sum()
        };
        let script_calls = delta(|s| s.script_calls);
        let script_usec = delta(|s| s.script_usec);
        NodesReport {
            script_calls,
            script_us_per_call: if script_calls > 0 { script_usec as f64 / script_calls as f64 } else { 0.0 },
            script_failed_calls: delta(|s| s.script_failed),
            script_noscript: delta(|s| s.noscript),
            commands_per_s: if secs > 0.0 { total as f64 / secs } else { 0.0 },
            commands_max_over_mean: if mean > 0.0 { max / mean } else { 0.0 },
            cpu_s_total: cpu_s.iter().sum(),
            commands,
            cpu_s,
        }
    }

    /// The footer line of the table.
    pub fn line(&self, strategy: &str) -> String {
        let per: Vec<String> = self.commands.iter().map(u64::to_string).collect();
        let cpu: Vec<String> = self.cpu_s.iter().map(|c| format!("{c:.2}")).collect();
        let scripts = if self.script_calls > 0 {
            format!(
                "; {} script calls, {:.1} us each, {} failed on the server ({} NOSCRIPT: first calls, loaded and retried)",
                self.script_calls, self.script_us_per_call, self.script_failed_calls, self.script_noscript
            )
        } else {
            String::new()
        };
        format!(
            "# {strategy}: Redis executed {:.0} commands/s (per server {}; max/mean {:.2}), CPU {:.2} s (per server {}){scripts}",
            self.commands_per_s,
            per.join(" / "),
            self.commands_max_over_mean,
            self.cpu_s_total,
            cpu.join(" / ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_info_and_compares_servers() {
        let before = [
            parse(
                "# Stats\r\ntotal_commands_processed:100\r\n# CPU\r\nused_cpu_sys:1.5\r\nused_cpu_user:2.0\r\n",
            ),
            parse("total_commands_processed:50\r\nused_cpu_sys:0.5\r\nused_cpu_user:0.5\r\n"),
        ];
        let after = [
            parse(
                "total_commands_processed:400\r\nused_cpu_sys:2.0\r\nused_cpu_user:2.5\r\n# Commandstats\r\n\
                 cmdstat_evalsha:calls=10,usec=250,usec_per_call=25.00,rejected_calls=1,failed_calls=2\r\n\
                 cmdstat_get:calls=5,usec=5,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n\
                 errorstat_NOSCRIPT:count=2\r\n",
            ),
            parse("total_commands_processed:150\r\nused_cpu_sys:0.75\r\nused_cpu_user:0.75\r\n"),
        ];
        let r = NodesReport::between(&before, &after, 2.0);
        assert_eq!(r.commands, vec![300, 100]);
        assert!((r.commands_max_over_mean - 1.5).abs() < 1e-9);
        assert!((r.cpu_s_total - 1.5).abs() < 1e-9);
        assert!((r.commands_per_s - 200.0).abs() < 1e-9);
        assert_eq!((r.script_calls, r.script_failed_calls), (10, 3));
        assert!((r.script_us_per_call - 25.0).abs() < 1e-9);
        assert!(
            r.line("strata").contains("10 script calls, 25.0 us each, 3 failed on the server (2 NOSCRIPT"),
            "{}",
            r.line("strata")
        );
    }
}
