//! `build` and the server checks it runs before handing out a queue: the server answers
//! and accepts the credentials, its eviction policy cannot evict the queue, and with
//! [`Durability::AppendFsync`] its AOF is on and fsynced at every write. On a Cluster
//! each check runs on the master of every group.

use std::sync::Arc;

use redis::Value;
use strata::error::{Error, ErrorKind, Result};

use super::builder::{Durability, RedisWriteBehindQueueBuilder, WHAT};
use super::layout::Layout;
use super::scripts::Scripts;
use super::{Counters, Inner, RedisWriteBehindQueue};
use crate::cluster::Connector;
use crate::managed::ManagedConn;
use crate::reply::value_string;
use crate::tier::eviction::{ServerMemory, info_texts};

impl RedisWriteBehindQueueBuilder {
    /// Checks the settings, connects (unless lazy), checks the server (see the crate
    /// docs, "Write-behind queue") and returns the queue.
    pub async fn build(self) -> Result<RedisWriteBehindQueue> {
        self.check()?;
        let connector = Connector::open(&self.connection, WHAT)?;
        let conn =
            Arc::new(ManagedConn::new(connector, &self.connection, self.reconnect_after_timeouts, WHAT)?);
        let queue = RedisWriteBehindQueue {
            inner: Arc::new(Inner {
                conn,
                layout: Layout::new(&self.connection.prefix, self.groups),
                prefix: self.connection.prefix.clone(),
                op_timeout: self.op_timeout,
                durability: self.durability,
                scripts: Scripts::new(),
                counters: Counters::default(),
            }),
        };
        if !self.connection.lazy {
            queue.check_servers(self.allow_eviction_risk).await?;
        }
        Ok(queue)
    }
}

impl RedisWriteBehindQueue {
    /// Keys on the masters the checks run on: on one server, any; on a Cluster, one per
    /// group (group `g` of every namespace lands in the same `g`-th range of slots, so
    /// with the usual contiguous slot ranges on the same master).
    fn probe_keys(&self) -> Vec<String> {
        let layout = &self.inner.layout;
        let groups = if self.inner.conn.is_cluster() { layout.groups() } else { 1 };
        (0..groups).map(|g| layout.keys("probe", g)[0].clone()).collect()
    }

    async fn on_node(&self, key: &str, cmd: redis::Cmd, what: &'static str) -> Result<Value> {
        let key = key.to_owned();
        self.run(what, |mut c| async move { c.query_on_node_of(&key, cmd).await }).await
    }

    async fn check_servers(&self, allow_eviction_risk: bool) -> Result<()> {
        let shown = self.inner.conn.shown_url().to_owned();
        for key in self.probe_keys() {
            self.on_node(&key, redis::cmd("PING"), "redis write-behind queue ping").await.map_err(|e| {
                let kind = if e.kind() == ErrorKind::Timeout { ErrorKind::Timeout } else { ErrorKind::Tier };
                Error::new(
                    kind,
                    format!(
                        "{WHAT}: cannot use `{shown}`: {e}; check that the server runs, the URL's \
                         host/port and the ACL user and password, or build with .lazy(true) to start \
                         without it"
                    ),
                )
            })?;
            self.check_eviction(&key, allow_eviction_risk).await?;
            if self.inner.durability == Durability::AppendFsync {
                self.check_aof(&key).await?;
            }
        }
        Ok(())
    }

    async fn check_eviction(&self, key: &str, allow: bool) -> Result<()> {
        let mut info = redis::cmd("INFO");
        info.arg("memory");
        let memory = match self.on_node(key, info, "redis write-behind queue INFO memory").await {
            Ok(v) => info_texts(&v).iter().find_map(|t| ServerMemory::parse(t)),
            Err(e) => {
                tracing::warn!(error = %e, "{WHAT}: cannot read INFO memory; eviction not checked");
                return Ok(());
            }
        };
        let Some(m) = memory else { return Ok(()) };
        if m.maxmemory == 0 || !m.policy.starts_with("allkeys-") {
            return Ok(());
        }
        let message = format!(
            "{WHAT}: `{}` may evict any key (maxmemory {} bytes, maxmemory-policy {}): an evicted \
             queue record is an acknowledged save lost without a trace; set maxmemory-policy \
             noeviction (or a volatile-* policy: the queue's keys never have a TTL) or no maxmemory, \
             or build with .allow_eviction_risk(true) to accept the risk",
            self.inner.conn.shown_url(),
            m.maxmemory,
            m.policy
        );
        if allow {
            tracing::warn!("{message}");
            Ok(())
        } else {
            Err(Error::new(ErrorKind::InvalidInput, message))
        }
    }

    /// `appendonly yes` and `appendfsync always`, read with `CONFIG GET`; where the
    /// ACL denies it, `INFO persistence` tells whether the AOF is on (not its fsync
    /// policy: a warning says so).
    async fn check_aof(&self, key: &str) -> Result<()> {
        let fix = "start Redis with --appendonly yes --appendfsync always (or CONFIG SET appendonly yes \
                   and CONFIG SET appendfsync always, then CONFIG REWRITE), or choose another Durability";
        let mut get = redis::cmd("CONFIG");
        get.arg("GET").arg("appendonly").arg("appendfsync");
        let config = self.on_node(key, get, "redis write-behind queue CONFIG GET").await;
        let (appendonly, appendfsync) = match config {
            Ok(v) => {
                let pairs = config_pairs(&v);
                let get = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
                (get("appendonly"), get("appendfsync"))
            }
            Err(e) => {
                tracing::debug!(error = %e, "{WHAT}: CONFIG GET failed; reading INFO persistence");
                let mut info = redis::cmd("INFO");
                info.arg("persistence");
                let v = self.on_node(key, info, "redis write-behind queue INFO persistence").await.map_err(
                    |e2| {
                        Error::new(
                            ErrorKind::InvalidInput,
                            format!(
                                "{WHAT}: Durability::AppendFsync needs to check the server's AOF, but both \
                             CONFIG GET ({e}) and INFO persistence ({e2}) failed; grant +config|get or +info"
                            ),
                        )
                    },
                )?;
                let on = info_texts(&v).iter().any(|t| t.lines().any(|l| l.trim() == "aof_enabled:1"));
                if on {
                    tracing::warn!(
                        "{WHAT}: the AOF is on, but its fsync policy cannot be read (CONFIG GET denied): \
                         Durability::AppendFsync holds only with appendfsync always"
                    );
                }
                (Some(if on { "yes" } else { "no" }.to_owned()), on.then(|| "always".to_owned()))
            }
        };
        if appendonly.as_deref() == Some("yes") && appendfsync.as_deref() == Some("always") {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{WHAT}: Durability::AppendFsync needs appendonly yes and appendfsync always, but `{}` \
                 has appendonly {} and appendfsync {}; {fix}",
                self.inner.conn.shown_url(),
                appendonly.as_deref().unwrap_or("unknown"),
                appendfsync.as_deref().unwrap_or("unknown"),
            ),
        ))
    }
}

/// The `(name, value)` pairs of a `CONFIG GET` reply (an array in RESP2, a map in RESP3).
fn config_pairs(v: &Value) -> Vec<(String, String)> {
    match v {
        Value::Map(pairs) => {
            pairs.iter().filter_map(|(k, v)| Some((value_string(k)?, value_string(v)?))).collect()
        }
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|p| match p {
                [k, v] => Some((value_string(k)?, value_string(v)?)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}
