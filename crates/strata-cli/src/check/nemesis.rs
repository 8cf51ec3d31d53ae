//! The nemesis: injects one fault at a time, each bounded and self-stopping, and
//! records each in the history as a `fault` event spanning the time it was in force.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use strata_testkit::{Event, FaultProxy, Recorder, RedisCluster, RedisServer, key_slot, monotonic_ns};
use tokio::time::Instant;

use crate::secret::SecretUrl;

/// How long Redis stays dead before it is restarted (empty) on the same port.
pub const REDIS_DOWN: Duration = Duration::from_secs(3);
/// How long Redis stays frozen (SIGSTOP) before SIGCONT.
pub const REDIS_PAUSE: Duration = Duration::from_secs(2);
/// How long the database is unreachable through the proxy.
pub const DB_DOWN: Duration = Duration::from_secs(2);

/// The `--fault` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultArg {
    /// No fault.
    None,
    /// `kill -9` Redis, restart it empty on the same port after 3 s.
    RedisKill,
    /// SIGSTOP Redis for 2 s, then SIGCONT.
    RedisPause,
    /// `CLIENT KILL` every backplane subscriber connection (`strata-bp-*`).
    SubscriberKill,
    /// The database unreachable through the fault proxy for 2 s.
    DbDown,
    /// Each of the above once, in that order.
    All,
    /// `--cluster` only: `kill -9` the master serving the backplane stream's slot (and
    /// a share of every namespace's shards); its replica takes over; the killed node is
    /// restarted and rejoins as a replica.
    Failover,
    /// `--ring` only: `kill -9` ring node 1, restart it empty after 3 s.
    NodeRestart,
    /// `--workload drafts` only: `kill -9` an instance (holding flush claims) and start
    /// a new one in its place after 1 s.
    InstanceKill,
}

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// See [`FaultArg::RedisKill`].
    RedisKill,
    /// See [`FaultArg::RedisPause`].
    RedisPause,
    /// See [`FaultArg::SubscriberKill`].
    SubscriberKill,
    /// See [`FaultArg::DbDown`].
    DbDown,
    /// See [`FaultArg::Failover`].
    Failover,
    /// See [`FaultArg::NodeRestart`].
    NodeRestart,
    /// See [`FaultArg::InstanceKill`].
    InstanceKill,
}

impl FaultArg {
    /// The faults to inject, in order.
    pub fn faults(self) -> Vec<Fault> {
        match self {
            FaultArg::None => vec![],
            FaultArg::RedisKill => vec![Fault::RedisKill],
            FaultArg::RedisPause => vec![Fault::RedisPause],
            FaultArg::SubscriberKill => vec![Fault::SubscriberKill],
            FaultArg::DbDown => vec![Fault::DbDown],
            FaultArg::All => vec![Fault::RedisKill, Fault::RedisPause, Fault::SubscriberKill, Fault::DbDown],
            FaultArg::Failover => vec![Fault::Failover],
            FaultArg::NodeRestart => vec![Fault::NodeRestart],
            FaultArg::InstanceKill => vec![Fault::InstanceKill],
        }
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FaultArg::None => "none",
            FaultArg::RedisKill => "redis-kill",
            FaultArg::RedisPause => "redis-pause",
            FaultArg::SubscriberKill => "subscriber-kill",
            FaultArg::DbDown => "db-down",
            FaultArg::All => "all",
            FaultArg::Failover => "failover",
            FaultArg::NodeRestart => "node-restart",
            FaultArg::InstanceKill => "instance-kill",
        }
    }
}

impl Fault {
    /// The name used in the history.
    pub fn name(self) -> &'static str {
        match self {
            Fault::RedisKill => "redis-kill",
            Fault::RedisPause => "redis-pause",
            Fault::SubscriberKill => "subscriber-kill",
            Fault::DbDown => "db-down",
            Fault::Failover => "failover",
            Fault::NodeRestart => "node-restart",
            Fault::InstanceKill => "instance-kill",
        }
    }
}

/// What the nemesis acts on.
pub struct Nemesis<'a> {
    /// The Redis server, when `strata check` started it (kill and SIGSTOP need it).
    pub redis: Option<&'a mut RedisServer>,
    /// The Redis Cluster, when `strata check --cluster` started it.
    pub cluster: Option<&'a mut RedisCluster>,
    /// The ring's servers, when `strata check --ring` started them.
    pub ring: &'a mut Vec<RedisServer>,
    /// The Redis URL (for `CLIENT` commands).
    pub redis_url: &'a SecretUrl,
    /// The proxy between the instances and the database.
    pub proxy: &'a FaultProxy,
    /// Where faults are recorded.
    pub recorder: Arc<Recorder>,
}

impl Nemesis<'_> {
    /// Injects `faults` one after another, fault `i` at `start + gap·(i+1)` with
    /// `gap = duration / (n+1)` (or as soon as the previous one ended).
    pub async fn run(&mut self, faults: &[Fault], start: Instant, duration: Duration) -> Result<()> {
        let gap = duration / (faults.len() as u32 + 1);
        for (i, &fault) in faults.iter().enumerate() {
            tokio::time::sleep_until(start + gap * (i as u32 + 1)).await;
            let invoke = monotonic_ns();
            eprintln!("strata check: fault {} ...", fault.name());
            let detail = self.inject(fault).await.with_context(|| format!("fault {}", fault.name()))?;
            let event = Event::fault("nemesis", invoke, monotonic_ns(), detail);
            eprintln!("strata check: fault {} over", fault.name());
            self.recorder.record(&event).context("cannot record a fault")?;
        }
        Ok(())
    }

    /// Injects one fault and lifts it; returns its description.
    async fn inject(&mut self, fault: Fault) -> Result<String> {
        match fault {
            Fault::RedisKill => {
                let Some(redis) = self.redis.as_deref_mut() else {
                    return Ok("redis-kill skipped (--redis given: the server is not ours to kill)".into());
                };
                redis.kill();
                tokio::time::sleep(REDIS_DOWN).await;
                tokio::task::block_in_place(|| redis.try_restart()).context("cannot restart Redis")?;
                Ok(format!("redis-kill (SIGKILL, restarted empty after {} s)", REDIS_DOWN.as_secs()))
            }
            Fault::RedisPause => match self.redis.as_deref_mut() {
                Some(redis) => {
                    redis.pause().context("SIGSTOP")?;
                    tokio::time::sleep(REDIS_PAUSE).await;
                    redis.resume().context("SIGCONT")?;
                    Ok(format!("redis-pause (SIGSTOP for {} s)", REDIS_PAUSE.as_secs()))
                }
                None => {
                    let ms = REDIS_PAUSE.as_millis().to_string();
                    self.redis_command(&["CLIENT", "PAUSE", &ms, "ALL"]).await?;
                    tokio::time::sleep(REDIS_PAUSE).await;
                    Ok(format!("redis-pause (CLIENT PAUSE {ms} ALL)"))
                }
            },
            Fault::SubscriberKill => {
                let list = self.redis_command(&["CLIENT", "LIST"]).await?;
                let ids = subscriber_ids(&list);
                for id in &ids {
                    self.redis_command(&["CLIENT", "KILL", "ID", id]).await?;
                }
                Ok(format!("subscriber-kill ({} strata-bp connections)", ids.len()))
            }
            Fault::Failover => {
                let Some(cluster) = self.cluster.as_deref_mut() else {
                    return Ok("failover skipped (needs --cluster)".into());
                };
                let slot = key_slot(b"{bp}");
                let victim = tokio::task::block_in_place(|| cluster.master_for_slot(slot))
                    .context("CLUSTER NODES")?
                    .ok_or_else(|| anyhow!("no master serves slot {slot}"))?;
                let killed = std::time::Instant::now();
                tokio::task::block_in_place(|| cluster.kill(victim));
                tokio::task::block_in_place(|| cluster.try_wait_healthy(Duration::from_secs(30)))
                    .context("the cluster did not recover from the failover")?;
                let ok_after = killed.elapsed();
                tokio::task::block_in_place(|| cluster.restart(victim));
                tokio::task::block_in_place(|| cluster.try_wait_healthy(Duration::from_secs(30)))
                    .context("the cluster did not take the restarted node back")?;
                Ok(format!(
                    "failover (kill -9 master node {victim}, which served the stream's slot {slot}; \
                     cluster_state ok with its replica promoted after {:.2} s; restarted after {:.2} s)",
                    ok_after.as_secs_f64(),
                    killed.elapsed().as_secs_f64()
                ))
            }
            Fault::InstanceKill => Ok("instance-kill skipped (a --workload drafts fault)".into()),
            Fault::NodeRestart => {
                let Some(node) = self.ring.get_mut(1) else {
                    return Ok("node-restart skipped (needs --ring)".into());
                };
                node.kill();
                tokio::time::sleep(REDIS_DOWN).await;
                tokio::task::block_in_place(|| node.try_restart()).context("cannot restart ring node 1")?;
                Ok(format!(
                    "node-restart (ring node 1 SIGKILLed, restarted empty after {} s)",
                    REDIS_DOWN.as_secs()
                ))
            }
            Fault::DbDown => {
                self.proxy.blackhole(true);
                tokio::time::sleep(DB_DOWN).await;
                // Connections that saw the partition die, so held bytes (say a COMMIT)
                // are never delivered late.
                self.proxy.reset_all();
                self.proxy.blackhole(false);
                Ok(format!("db-down (blackholed for {} s, then connections reset)", DB_DOWN.as_secs()))
            }
        }
    }

    async fn redis_command(&self, args: &[&str]) -> Result<String> {
        let timeout = Duration::from_secs(2);
        let client = redis::Client::open(self.redis_url.expose())
            .with_context(|| format!("bad Redis URL {}", self.redis_url))?;
        let mut conn = tokio::time::timeout(timeout, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| anyhow!("connecting to Redis timed out"))?
            .context("cannot connect to Redis")?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let value: redis::Value = tokio::time::timeout(timeout, cmd.query_async(&mut conn))
            .await
            .map_err(|_| anyhow!("{} timed out", args.join(" ")))?
            .with_context(|| args.join(" "))?;
        Ok(match value {
            redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            redis::Value::VerbatimString { text, .. } => text,
            redis::Value::SimpleString(s) => s,
            other => format!("{other:?}"),
        })
    }
}

/// The ids of the backplane subscriber connections in a `CLIENT LIST` reply.
fn subscriber_ids(list: &str) -> Vec<String> {
    list.lines()
        .filter(|line| line.split(' ').any(|f| f.starts_with("name=strata-bp")))
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")).map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_subscriber_connections() {
        let list = "id=3 addr=127.0.0.1:5 name= cmd=client\n\
                    id=7 addr=127.0.0.1:6 name=strata-bp-0000abcd-1 cmd=xread\n\
                    id=9 addr=127.0.0.1:7 name=strata-bp-0000abcd-2 cmd=xread\n";
        assert_eq!(subscriber_ids(list), vec!["7", "9"]);
        assert_eq!(FaultArg::All.faults().len(), 4);
    }
}
