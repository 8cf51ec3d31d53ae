//! [`ShardedTier`] as a [`Tier`]: reads routed (with the gutter and hot-key copies),
//! fills sent back to the shard that issued their token, invalidations to every shard
//! that may hold a copy.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use rand::Rng;

use super::ShardedTier;
use super::route::{self, tag_stamp, untag_stamp};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::scope::Scope;
use crate::tier::{Envelope, FillOutcome, FillToken, Lookup, Tier};

fn tag_envelope(shard: usize, mut env: Envelope) -> Result<Envelope> {
    env.stamp = tag_stamp(shard, env.stamp)?;
    Ok(env)
}

fn tag_lookup(shard: usize, found: Lookup) -> Result<Lookup> {
    Ok(match found {
        Lookup::Hit(env) => Lookup::Hit(tag_envelope(shard, env)?),
        Lookup::Miss { mut token, stale } => {
            token.stamp = tag_stamp(shard, token.stamp)?;
            Lookup::Miss { token, stale: stale.map(|e| tag_envelope(shard, e)).transpose()? }
        }
    })
}

/// The first error of several calls to shards, once all of them ran.
fn first_error<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    results.into_iter().collect()
}

impl ShardedTier {
    /// One lookup on one shard, through its breaker, within the read timeout.
    async fn read(
        &self,
        shard: usize,
        namespace: &str,
        key: &str,
        lease: Option<Duration>,
    ) -> Result<Lookup> {
        let s = &self.shards[shard];
        s.reads.fetch_add(1, Ordering::Relaxed);
        let names = self.names_of(namespace);
        let found = tag_lookup(shard, self.on_shard(shard, s.tier.lookup(&names[shard], key, lease)).await?)?;
        Ok(self.unless_doubted(shard, found))
    }

    /// A hit the shard's recent failure puts in doubt becomes a miss whose token is the
    /// entry's own stamp (as a replacement load's: nothing invalidated the key since).
    fn unless_doubted(&self, shard: usize, found: Lookup) -> Lookup {
        match found {
            Lookup::Hit(env) if self.doubts(shard, env.created) => {
                self.shards[shard].doubted.fetch_add(1, Ordering::Relaxed);
                Lookup::Miss { token: FillToken { stamp: env.stamp, lease: None, leader: true }, stale: None }
            }
            other => other,
        }
    }

    /// A lookup on the key's first candidate or, with a gutter, the next ones that
    /// invalidations cover; returns the shard that answered.
    async fn read_with_failover(
        &self,
        candidates: &[usize],
        namespace: &str,
        key: &str,
        lease: Option<Duration>,
    ) -> Result<(usize, Lookup)> {
        let tries = if self.gutter.is_some() { candidates.len() } else { 1 };
        let mut last = None;
        for (i, &shard) in candidates.iter().take(tries).enumerate() {
            match self.read(shard, namespace, key, lease).await {
                Ok(found) => {
                    if i > 0 {
                        let s = &self.shards[shard];
                        s.gutter_reads.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("strata_shard_gutter_reads_total", "shard" => s.name.clone())
                            .increment(1);
                    }
                    return Ok((shard, found));
                }
                Err(e) if e.is_transient() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last
            .unwrap_or_else(|| Error::new(crate::error::ErrorKind::Tier, "sharded tier: no shard to read")))
    }

    /// Takes fill tokens on the other copies of a hot key whose load `primary` leads.
    async fn take_copy_tokens(
        &self,
        candidates: &[usize],
        answered: usize,
        namespace: &str,
        key: &str,
        primary: &FillToken,
    ) {
        let others: Vec<usize> =
            candidates.iter().take(self.copies).copied().filter(|&c| c != answered).collect();
        let found = join_all(others.iter().map(|&c| self.read(c, namespace, key, None))).await;
        let tokens: Vec<(usize, FillToken)> = others
            .into_iter()
            .zip(found)
            .filter_map(|(c, found)| match found {
                Ok(Lookup::Miss { token, .. }) if !token.is_poisoned() => {
                    Some((c, FillToken { stamp: untag_stamp(token.stamp).1, ..token }))
                }
                _ => None,
            })
            .collect();
        self.pending.hold(namespace, key, primary, tokens);
    }

    /// Groups keys by the shards that may hold them (their first `spread` candidates).
    fn keys_by_shard(&self, keys: &[String]) -> HashMap<usize, Vec<String>> {
        let mut per: HashMap<usize, Vec<String>> = HashMap::new();
        let spread = self.spread();
        for key in keys {
            for c in self.candidates(key, spread) {
                per.entry(c).or_default().push(key.clone());
            }
        }
        per
    }

    /// Runs `op` on every shard (tag and namespace invalidations, wide locks).
    async fn on_every_shard<'a, F, Fut>(&'a self, namespace: &str, op: F) -> Result<()>
    where
        F: Fn(&'a dyn Tier, String) -> Fut,
        Fut: std::future::Future<Output = Result<()>> + 'a,
    {
        let names = self.names_of(namespace);
        let calls = self
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| self.on_shard_write(i, op(s.tier.as_ref(), names[i].clone())));
        first_error(join_all(calls).await).map(|_| ())
    }

    /// Runs a keyed operation on every shard that may hold one of `keys`.
    async fn on_key_shards<'a, F, Fut>(&'a self, namespace: &str, keys: &[String], op: F) -> Result<()>
    where
        F: Fn(&'a dyn Tier, String, Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<()>> + 'a,
    {
        let names = self.names_of(namespace);
        let calls = self
            .keys_by_shard(keys)
            .into_iter()
            .map(|(i, ks)| self.on_shard_write(i, op(self.shards[i].tier.as_ref(), names[i].clone(), ks)));
        first_error(join_all(calls).await).map(|_| ())
    }
}

#[async_trait]
impl Tier for ShardedTier {
    fn name(&self) -> &str {
        "sharded"
    }

    fn tombstone_ttl(&self) -> Duration {
        self.tombstone_ttl
    }

    async fn lookup(&self, namespace: &str, key: &str, lease: Option<Duration>) -> Result<Lookup> {
        let h = route::hash(key.as_bytes());
        let candidates = self.placement.candidates_of_hash(h, self.spread());
        let hot = self.hot.observe(h, key) && self.copies > 1;
        if hot {
            let pick = rand::rng().random_range(0..self.copies.min(candidates.len()));
            if pick > 0
                && let Ok(Lookup::Hit(env)) = self.read(candidates[pick], namespace, key, None).await
            {
                let s = &self.shards[candidates[pick]];
                s.copy_reads.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("strata_hot_key_copy_reads_total", "shard" => s.name.clone()).increment(1);
                return Ok(Lookup::Hit(env));
            }
        }
        let (answered, found) = self.read_with_failover(&candidates, namespace, key, lease).await?;
        if hot
            && let Lookup::Miss { token, .. } = &found
            && token.leader
            && !token.is_poisoned()
        {
            self.take_copy_tokens(&candidates, answered, namespace, key, token).await;
        }
        Ok(found)
    }

    async fn lookup_many(
        &self,
        namespace: &str,
        keys: &[String],
        lease: Option<Duration>,
    ) -> Result<Vec<Lookup>> {
        let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, key) in keys.iter().enumerate() {
            groups.entry(self.shard_of(key)).or_default().push(i);
        }
        let names = self.names_of(namespace);
        let calls = groups.iter().map(|(&shard, idx)| {
            let ks: Vec<String> = idx.iter().map(|&i| keys[i].clone()).collect();
            let names = names.clone();
            async move {
                let s = &self.shards[shard];
                s.reads.fetch_add(ks.len() as u64, Ordering::Relaxed);
                let found = self.on_shard(shard, s.tier.lookup_many(&names[shard], &ks, lease)).await;
                (shard, found)
            }
        });
        let mut out: Vec<Option<Lookup>> = vec![None; keys.len()];
        for (shard, found) in join_all(calls).await {
            let idx = &groups[&shard];
            match found {
                Ok(found) if found.len() == idx.len() => {
                    for (&i, l) in idx.iter().zip(found) {
                        out[i] = Some(self.unless_doubted(shard, tag_lookup(shard, l)?));
                    }
                }
                // A shard that failed: each key on its own, which fails over.
                _ => {
                    for &i in idx {
                        out[i] = Some(self.lookup(namespace, &keys[i], lease).await?);
                    }
                }
            }
        }
        out.into_iter()
            .map(|l| {
                l.ok_or_else(|| {
                    Error::new(crate::error::ErrorKind::Tier, "sharded tier: a key went unanswered")
                })
            })
            .collect()
    }

    async fn fill(
        &self,
        namespace: &str,
        key: &str,
        envelope: Envelope,
        ttl: Duration,
        token: &FillToken,
    ) -> Result<FillOutcome> {
        let candidates = self.candidates(key, self.spread());
        let (origin, stamp) = untag_stamp(token.stamp);
        let shard = origin.or(candidates.first().copied()).unwrap_or(0);
        let copies = self.pending.take(namespace, key, token);
        let Some(rank) = candidates.iter().position(|&c| c == shard) else {
            // No invalidation of the key reaches that shard: never store there.
            return Ok(FillOutcome::Rejected);
        };
        let ttl_here = match self.gutter {
            Some(gutter) if rank >= self.copies => ttl.min(gutter),
            _ => ttl,
        };
        let names = self.names_of(namespace);
        let inner = FillToken { stamp, ..token.clone() };
        let tier = &self.shards[shard].tier;
        let out =
            self.on_shard(shard, tier.fill(&names[shard], key, envelope.clone(), ttl_here, &inner)).await?;
        if out == FillOutcome::Stored && !copies.is_empty() {
            let fills = copies.iter().map(|(c, t)| {
                self.on_shard(*c, self.shards[*c].tier.fill(&names[*c], key, envelope.clone(), ttl, t))
            });
            let stored =
                join_all(fills).await.into_iter().filter(|r| matches!(r, Ok(FillOutcome::Stored))).count();
            self.copies_filled.fetch_add(stored as u64, Ordering::Relaxed);
        }
        Ok(out)
    }

    async fn set(&self, namespace: &str, key: &str, envelope: Envelope, ttl: Duration) -> Result<()> {
        let candidates = self.candidates(key, self.spread());
        let names = self.names_of(namespace);
        let key_list = [key.to_owned()];
        let calls = candidates.iter().enumerate().map(|(rank, &c)| {
            let tier = &self.shards[c].tier;
            let name = &names[c];
            let envelope = envelope.clone();
            let key_list = &key_list;
            async move {
                // The first candidate takes the value; the others drop their copies.
                if rank == 0 {
                    self.on_shard_write(c, tier.set(name, key, envelope, ttl)).await
                } else {
                    self.on_shard_write(c, tier.delete(name, key_list)).await
                }
            }
        });
        first_error(join_all(calls).await).map(|_| ())
    }

    async fn delete(&self, namespace: &str, keys: &[String]) -> Result<()> {
        self.on_key_shards(namespace, keys, |tier, ns, ks| async move { tier.delete(&ns, &ks).await }).await
    }

    async fn invalidate_tag(&self, namespace: &str, tag: &str) -> Result<()> {
        self.on_every_shard(namespace, |tier, ns| async move { tier.invalidate_tag(&ns, tag).await }).await
    }

    async fn invalidate_namespace(&self, namespace: &str) -> Result<()> {
        self.on_every_shard(namespace, |tier, ns| async move { tier.invalidate_namespace(&ns).await }).await
    }

    async fn release_lease(&self, namespace: &str, key: &str, token: &FillToken) -> Result<()> {
        self.pending.forget(namespace, key, token);
        let (origin, stamp) = untag_stamp(token.stamp);
        let shard = origin.unwrap_or_else(|| self.shard_of(key));
        if shard >= self.shards.len() {
            return Ok(());
        }
        let names = self.names_of(namespace);
        let inner = FillToken { stamp, ..token.clone() };
        self.on_shard(shard, self.shards[shard].tier.release_lease(&names[shard], key, &inner)).await
    }

    async fn touch(&self, namespace: &str, key: &str, soft_expiry: Timestamp, ttl: Duration) -> Result<bool> {
        let candidates = self.candidates(key, self.spread());
        let names = self.names_of(namespace);
        let calls = candidates
            .iter()
            .map(|&c| self.on_shard(c, self.shards[c].tier.touch(&names[c], key, soft_expiry, ttl)));
        let results = join_all(calls).await;
        if results.iter().any(|r| matches!(r, Ok(true))) {
            return Ok(true);
        }
        first_error(results).map(|_| false)
    }

    async fn lock(&self, namespace: &str, scope: &Scope, id: u64, ttl: Duration) -> Result<()> {
        match scope {
            Scope::Keys(keys) => {
                self.on_key_shards(namespace, keys, |tier, ns, ks| async move {
                    tier.lock(&ns, &Scope::Keys(ks), id, ttl).await
                })
                .await
            }
            wide => {
                self.on_every_shard(namespace, |tier, ns| async move { tier.lock(&ns, wide, id, ttl).await })
                    .await
            }
        }
    }

    async fn unlock(&self, namespace: &str, scope: &Scope, id: u64) -> Result<()> {
        match scope {
            Scope::Keys(keys) => {
                self.on_key_shards(namespace, keys, |tier, ns, ks| async move {
                    tier.unlock(&ns, &Scope::Keys(ks), id).await
                })
                .await
            }
            wide => {
                self.on_every_shard(namespace, |tier, ns| async move { tier.unlock(&ns, wide, id).await })
                    .await
            }
        }
    }

    async fn record_hot_keys(&self, namespace: &str, counts: &[(String, u64)], keep: usize) -> Result<()> {
        // The namespace's ranking (for warm-up) lives on the shard its name is placed on.
        let home = self.shard_of(namespace);
        let names = self.names_of(namespace);
        self.on_shard(home, self.shards[home].tier.record_hot_keys(&names[home], counts, keep)).await
    }

    async fn hot_keys(&self, namespace: &str, n: usize) -> Result<Vec<String>> {
        // The namespace's ranking (for warm-up) lives on the shard its name is placed on.
        let home = self.shard_of(namespace);
        let names = self.names_of(namespace);
        self.on_shard(home, self.shards[home].tier.hot_keys(&names[home], n)).await
    }
}
