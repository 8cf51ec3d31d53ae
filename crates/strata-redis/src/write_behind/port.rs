//! The [`WriteBehindQueue`] implementation: each method one script on the key's group,
//! or a fan-out over the groups (see the module docs), and the parsing of the replies.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::Rng;
use redis::Value;
use strata::error::{Error, ErrorKind, Result};
use strata::write_behind::{
    AckOutcome, DeadLetter, QueueLimits, QueueStats, QueuedSave, RetryOutcome, SaveOutcome, WriteBehindQueue,
};

use super::RedisWriteBehindQueue;
use super::builder::{Durability, WHAT};
use super::layout::GroupKeys;
use crate::reply::{bad_reply, value_array, value_bytes, value_string};

/// Longest delay, back-off or lease a script is given (about 100 years): times stay
/// below 2^53 ms, exact in a Lua number.
const MAX_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).min(MAX_MS)
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn uint(v: &Value) -> Option<u64> {
    int(v).and_then(|i| u64::try_from(i).ok())
}

/// The integers of a reply, at least `n` of them.
fn ints(v: &Value, n: usize) -> Option<Vec<i64>> {
    let a = value_array(v)?;
    let out: Vec<i64> = a.iter().map(int).collect::<Option<_>>()?;
    (out.len() >= n).then_some(out)
}

fn bad(what: &str) -> Error {
    bad_reply(ErrorKind::Tier, what)
}

/// A bound split over `groups` (rounded up, at least 1): each group's share on a
/// Cluster, where no script can count the whole namespace.
fn share(bound: u64, groups: usize) -> u64 {
    bound.div_ceil(groups as u64).max(1)
}

impl RedisWriteBehindQueue {
    fn invocation<'a>(
        &self,
        script: &'a redis::Script,
        groups: &[GroupKeys],
        args: &[&[u8]],
    ) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        for keys in groups {
            for k in keys {
                inv.key(k.as_str());
            }
        }
        for a in args {
            inv.arg(*a);
        }
        inv
    }

    /// Runs a script on one group; the reply's last two integers (`at` from the end:
    /// repairs and drops) are counted.
    async fn on_group(
        &self,
        what: &'static str,
        script: &redis::Script,
        ns: &str,
        keys: GroupKeys,
        args: &[&[u8]],
        counts_at: usize,
    ) -> Result<Value> {
        let v = self.invoke(what, self.invocation(script, &[keys], args)).await?;
        self.count_tail(what, ns, &v, counts_at)?;
        Ok(v)
    }

    /// Counts the repairs and drops a reply reports at `at` and `at + 1`.
    fn count_tail(&self, what: &str, ns: &str, v: &Value, at: usize) -> Result<()> {
        let a = value_array(v).ok_or_else(|| bad(what))?;
        let (r, d) = match (a.get(at).and_then(uint), a.get(at + 1).and_then(uint)) {
            (Some(r), Some(d)) => (r, d),
            _ => return Err(bad(what)),
        };
        self.note_repairs(ns, r, d);
        Ok(())
    }

    /// Runs a fan-out script over every group: one call on one server, one per group
    /// (concurrently) on a Cluster. Returns each call's reply.
    async fn fan_out(
        &self,
        what: &'static str,
        script: &redis::Script,
        ns: &str,
        args: &[&[u8]],
    ) -> Result<Vec<Value>> {
        let all = self.inner.layout.all_from(ns, 0);
        if !self.inner.conn.is_cluster() {
            return Ok(vec![self.invoke(what, self.invocation(script, &all, args)).await?]);
        }
        let calls = all.into_iter().map(|keys| self.invoke(what, self.invocation(script, &[keys], args)));
        futures::future::try_join_all(calls).await
    }

    /// `make_due` and `requeue_dead`: one key on its group, or every key everywhere.
    async fn one_or_all(
        &self,
        what: &'static str,
        script: &redis::Script,
        ns: &str,
        key: Option<&str>,
    ) -> Result<u64> {
        let replies = match key {
            Some(k) => {
                let keys = self.inner.layout.keys(ns, self.inner.layout.group_of(k));
                vec![self.invoke(what, self.invocation(script, &[keys], &[b"1", k.as_bytes()])).await?]
            }
            None => self.fan_out(what, script, ns, &[b"0"]).await?,
        };
        let mut total = 0;
        for v in &replies {
            let r = ints(v, 3).ok_or_else(|| bad(what))?;
            self.count_tail(what, ns, v, 1)?;
            total += u64::try_from(r[0]).unwrap_or(0);
        }
        Ok(total)
    }

    /// `WAIT` for the replicas [`Durability::Replicas`] asks for, on the connection and
    /// master that ran the save: `WAIT` counts the replicas that acknowledged this
    /// connection's writes so far.
    async fn save_waiting(
        &self,
        inv: redis::ScriptInvocation<'_>,
        slot_key: String,
        replicas: u32,
        timeout: Duration,
    ) -> Result<(Value, Option<i64>)> {
        self.run("redis write-behind queue save", |mut c| async move {
            let v: Value = inv.invoke_async(&mut c).await?;
            if value_array(&v).and_then(|a| a.first()).and_then(int) != Some(1) {
                return Ok((v, None));
            }
            let mut wait = redis::cmd("WAIT");
            wait.arg(replicas).arg(ms(timeout).max(1));
            let acked = c.query_on_node_of(&slot_key, wait).await?;
            Ok((v, Some(int(&acked).unwrap_or(-1))))
        })
        .await
    }
}

#[async_trait]
impl WriteBehindQueue for RedisWriteBehindQueue {
    fn name(&self) -> &str {
        "redis"
    }

    async fn save(
        &self,
        ns: &str,
        key: &str,
        value: Bytes,
        delay: Duration,
        limits: QueueLimits,
    ) -> Result<SaveOutcome> {
        const WHAT_SAVE: &str = "redis write-behind queue save";
        let layout = &self.inner.layout;
        let g = layout.group_of(key);
        let own = layout.keys(ns, g);
        let slot_key = own[0].clone();
        let mut groups = vec![own];
        // One server: the bound is the namespace's, counted over every group (no slots
        // to respect). A Cluster: each group holds its share (see the crate docs).
        let (max_n, max_b) = if self.inner.conn.is_cluster() {
            (share(limits.max_entries, layout.groups()), share(limits.max_bytes, layout.groups()))
        } else {
            groups.extend((1..layout.groups()).map(|i| layout.keys(ns, (g + i) % layout.groups())));
            (limits.max_entries, limits.max_bytes)
        };
        let (delay, max_n, max_b) = (ms(delay).to_string(), max_n.to_string(), max_b.to_string());
        let args: [&[u8]; 5] = [key.as_bytes(), &value, delay.as_bytes(), max_n.as_bytes(), max_b.as_bytes()];
        let inv = self.invocation(&self.inner.scripts.save, &groups, &args);
        let (v, acked) = match self.inner.durability {
            Durability::Replicas { replicas, timeout } => {
                let (v, acked) = self.save_waiting(inv, slot_key, replicas, timeout).await?;
                (v, acked.map(|a| (a, replicas, timeout)))
            }
            _ => (self.invoke(WHAT_SAVE, inv).await?, None),
        };
        let r = ints(&v, 5).ok_or_else(|| bad(WHAT_SAVE))?;
        self.count_tail(WHAT_SAVE, ns, &v, 3)?;
        let seq = u64::try_from(r[1]).map_err(|_| bad(WHAT_SAVE))?;
        if let Some((acked, replicas, timeout)) = acked
            && acked < i64::from(replicas)
        {
            return Err(Error::new(
                ErrorKind::Tier,
                format!(
                    "{WHAT}: save of `{key}` confirmed by {} of {replicas} replicas within {timeout:?} \
                     (WAIT); it is applied on the master, retry it (harmless: saves coalesce) or check \
                     the replicas",
                    acked.max(0)
                ),
            ));
        }
        Ok(match r[0] {
            1 => SaveOutcome::Queued { seq, replaced: r[2] == 1 },
            _ => SaveOutcome::Full { seq },
        })
    }

    async fn pending_value(&self, ns: &str, key: &str) -> Result<Option<Bytes>> {
        const W: &str = "redis write-behind queue pending_value";
        let keys = self.inner.layout.keys(ns, self.inner.layout.group_of(key));
        let v = self.on_group(W, &self.inner.scripts.pending, ns, keys, &[key.as_bytes()], 1).await?;
        let a = value_array(&v).ok_or_else(|| bad(W))?;
        Ok(match a.first() {
            Some(Value::Nil) | None => None,
            Some(x) => Some(Bytes::copy_from_slice(value_bytes(x).ok_or_else(|| bad(W))?)),
        })
    }

    async fn claim_due(&self, ns: &str, owner: &str, max: usize, lease: Duration) -> Result<Vec<QueuedSave>> {
        const W: &str = "redis write-behind queue claim_due";
        let layout = &self.inner.layout;
        if max == 0 {
            return Ok(Vec::new());
        }
        let first = rand::rng().random_range(0..layout.groups());
        let lease = ms(lease).max(1).to_string();
        let mut out = Vec::new();
        // One server: every group in one script, from a random one (no group starves).
        // A Cluster: one group per call, until `max` keys.
        let rounds: Vec<Vec<GroupKeys>> = if self.inner.conn.is_cluster() {
            layout.all_from(ns, first).into_iter().map(|k| vec![k]).collect()
        } else {
            vec![layout.all_from(ns, first)]
        };
        for groups in rounds {
            let left = (max - out.len()).to_string();
            let inv = self.invocation(
                &self.inner.scripts.claim,
                &groups,
                &[owner.as_bytes(), left.as_bytes(), lease.as_bytes()],
            );
            let v = self.invoke(W, inv).await?;
            self.count_tail(W, ns, &v, 0)?;
            let a = value_array(&v).ok_or_else(|| bad(W))?;
            for c in a[2..].chunks(5) {
                let [k, val, seq, attempts, since] = c else { return Err(bad(W)) };
                out.push(QueuedSave {
                    key: value_string(k).ok_or_else(|| bad(W))?,
                    value: Bytes::copy_from_slice(value_bytes(val).ok_or_else(|| bad(W))?),
                    seq: uint(seq).ok_or_else(|| bad(W))?,
                    attempts: uint(attempts).and_then(|n| u32::try_from(n).ok()).ok_or_else(|| bad(W))?,
                    dirty_since_ms: uint(since).ok_or_else(|| bad(W))?,
                });
            }
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    async fn ack(&self, ns: &str, key: &str, seq: u64) -> Result<AckOutcome> {
        const W: &str = "redis write-behind queue ack";
        let keys = self.inner.layout.keys(ns, self.inner.layout.group_of(key));
        let seq = seq.to_string();
        let v =
            self.on_group(W, &self.inner.scripts.ack, ns, keys, &[key.as_bytes(), seq.as_bytes()], 1).await?;
        match ints(&v, 3).ok_or_else(|| bad(W))?[0] {
            1 => Ok(AckOutcome::Flushed),
            2 => Ok(AckOutcome::Newer),
            _ => Err(bad(W)),
        }
    }

    async fn retry(
        &self,
        ns: &str,
        owner: &str,
        key: &str,
        seq: u64,
        backoff: Duration,
        error: &str,
        max_attempts: u32,
        permanent: bool,
    ) -> Result<RetryOutcome> {
        const W: &str = "redis write-behind queue retry";
        let keys = self.inner.layout.keys(ns, self.inner.layout.group_of(key));
        let (seq, backoff, max) = (seq.to_string(), ms(backoff).to_string(), max_attempts.to_string());
        let permanent: &[u8] = if permanent { b"1" } else { b"0" };
        let args: [&[u8]; 7] = [
            key.as_bytes(),
            owner.as_bytes(),
            seq.as_bytes(),
            backoff.as_bytes(),
            error.as_bytes(),
            max.as_bytes(),
            permanent,
        ];
        let v = self.on_group(W, &self.inner.scripts.retry, ns, keys, &args, 2).await?;
        let r = ints(&v, 4).ok_or_else(|| bad(W))?;
        let attempts = u32::try_from(r[1]).map_err(|_| bad(W))?;
        match r[0] {
            0 => Ok(RetryOutcome::NotClaimed),
            1 => Ok(RetryOutcome::Retrying { attempts }),
            2 => Ok(RetryOutcome::DeadLettered { attempts }),
            _ => Err(bad(W)),
        }
    }

    async fn release(&self, ns: &str, owner: &str, key: &str) -> Result<()> {
        const W: &str = "redis write-behind queue release";
        let keys = self.inner.layout.keys(ns, self.inner.layout.group_of(key));
        self.on_group(W, &self.inner.scripts.release, ns, keys, &[key.as_bytes(), owner.as_bytes()], 0)
            .await?;
        Ok(())
    }

    async fn make_due(&self, ns: &str, key: Option<&str>) -> Result<u64> {
        self.one_or_all("redis write-behind queue make_due", &self.inner.scripts.make_due, ns, key).await
    }

    async fn stats(&self, ns: &str) -> Result<QueueStats> {
        const W: &str = "redis write-behind queue stats";
        let mut st = QueueStats::default();
        for v in self.fan_out(W, &self.inner.scripts.stats, ns, &[]).await? {
            let r = ints(&v, 7).ok_or_else(|| bad(W))?;
            self.count_tail(W, ns, &v, 5)?;
            let n = |i: usize| u64::try_from(r[i]).unwrap_or(0);
            st.pending += n(0);
            st.pending_bytes += n(1);
            st.dead += n(2);
            if r[3] >= 0 {
                st.oldest_ms = Some(st.oldest_ms.map_or(n(3), |o| o.min(n(3))));
            }
            st.now_ms = st.now_ms.max(n(4));
        }
        Ok(st)
    }

    async fn dead_letters(&self, ns: &str, max: usize) -> Result<Vec<DeadLetter>> {
        const W: &str = "redis write-behind queue dead_letters";
        if max == 0 {
            return Ok(Vec::new());
        }
        let max_arg = max.min(1_000_000).to_string();
        let mut out = Vec::new();
        for v in self.fan_out(W, &self.inner.scripts.dead_letters, ns, &[max_arg.as_bytes()]).await? {
            self.count_tail(W, ns, &v, 0)?;
            let a = value_array(&v).ok_or_else(|| bad(W))?;
            for c in a[2..].chunks(5) {
                let [k, seq, attempts, error, at] = c else { return Err(bad(W)) };
                out.push(DeadLetter {
                    key: value_string(k).ok_or_else(|| bad(W))?,
                    seq: uint(seq).ok_or_else(|| bad(W))?,
                    attempts: uint(attempts).and_then(|n| u32::try_from(n).ok()).ok_or_else(|| bad(W))?,
                    error: value_bytes(error)
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .ok_or_else(|| bad(W))?,
                    at_ms: uint(at).ok_or_else(|| bad(W))?,
                });
            }
        }
        // Each group answers oldest first; across groups, by time (then key).
        out.sort_by(|a, b| (a.at_ms, &a.key).cmp(&(b.at_ms, &b.key)));
        out.truncate(max);
        Ok(out)
    }

    async fn requeue_dead(&self, ns: &str, key: Option<&str>) -> Result<u64> {
        self.one_or_all("redis write-behind queue requeue_dead", &self.inner.scripts.requeue_dead, ns, key)
            .await
    }
}
