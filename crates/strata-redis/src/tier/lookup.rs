//! The lookup path of [`RedisTier`]: a plain read for the hits (see
//! [`plain_read`](super::plain_read)), the lookup script for the rest, and the second
//! pass that discards an entry the client could not decode.

use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::Value;
use strata::error::{ErrorKind, Result};
use strata::tier::{Envelope, Lookup};

use crate::reply::bad_reply;
use crate::tier::format::{NsKeys, Opened, RawLookup, Stored, millis_at_least_one, parse_lookup_reply};
use crate::tier::{RedisTier, plain_read};

impl RedisTier {
    /// Reads several keys of one namespace: one round trip when the plain read answers
    /// them all, else one more for the lookup script's run over the rest (one in all
    /// while most recent lookups missed: the plain read is skipped then, see the
    /// [`tier`](crate::tier) module docs). Each key's
    /// answer is what [`Tier::lookup`](strata::tier::Tier::lookup) would return for it;
    /// with `lease`, a lease is tried for every missing key.
    pub async fn lookup_many(
        &self,
        namespace: &str,
        keys: &[String],
        lease: Option<Duration>,
    ) -> Result<Vec<Lookup>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let lease_ms = lease.map_or(0, millis_at_least_one);
        let mut results: Vec<Option<Lookup>> = vec![None; keys.len()];
        let mut discard: Vec<Vec<u8>> = vec![Vec::new(); keys.len()];
        // Hits first, without a script (see `plain_read`); what it leaves goes to the
        // script. An entry that does not open is sent back to be discarded.
        if self.inner.plain_gate.open() {
            for (i, hit) in self.plain_read(&ns, keys).await?.into_iter().enumerate() {
                let Some(s) = hit else { continue };
                match self.open(&ns, namespace, &keys[i], &s) {
                    Some(env) => results[i] = Some(Lookup::Hit(env)),
                    None => discard[i] = s.bytes,
                }
            }
        }
        let mut pending: Vec<usize> = (0..keys.len()).filter(|&i| results[i].is_none()).collect();
        if pending.is_empty() {
            self.inner.plain_gate.record_outcomes(keys.len(), 0);
            return Ok(results.into_iter().flatten().collect());
        }
        // Two passes at most: the script checks every field but the postcard inside the
        // envelope, so a hit may still not decode here. The second pass sends its bytes
        // back; the script deletes the entry if it still holds them, and answers a miss
        // for that key either way.
        for _pass in 0..2 {
            let raw = self.lookup_raw(&ns, namespace, keys, &pending, &discard, lease_ms).await?;
            let mut next = Vec::new();
            for (&i, r) in pending.iter().zip(raw) {
                match r {
                    RawLookup::Miss { token, corrupt, stale } => {
                        if corrupt {
                            self.count_undecodable(namespace, 1);
                        }
                        let stale = match stale.map(|s| (self.open(&ns, namespace, &keys[i], &s), s)) {
                            None => None,
                            Some((Some(env), _)) => Some(env),
                            Some((None, s)) => {
                                // The lease (if any) is already ours: drop the entry
                                // without asking for another one.
                                self.discard_entry(&ns, &keys[i], s.bytes).await;
                                None
                            }
                        };
                        results[i] = Some(Lookup::Miss { token, stale });
                    }
                    RawLookup::Hit(s) => match self.open(&ns, namespace, &keys[i], &s) {
                        Some(env) => results[i] = Some(Lookup::Hit(env)),
                        None if discard[i].is_empty() => {
                            discard[i] = s.bytes;
                            next.push(i);
                        }
                        // The script answers a miss for every key it was asked to discard.
                        None => return Err(bad_reply(ErrorKind::Tier, "redis tier lookup")),
                    },
                }
            }
            if next.is_empty() {
                break;
            }
            pending = next;
        }
        let hits = results.iter().filter(|r| matches!(r, Some(Lookup::Hit(_)))).count();
        self.inner.plain_gate.record_outcomes(hits, keys.len() - hits);
        results
            .into_iter()
            .map(|r| r.ok_or_else(|| bad_reply(ErrorKind::Tier, "redis tier lookup")))
            .collect()
    }

    /// [`Tier::peek`](strata::tier::Tier::peek): the plain read alone, one round trip
    /// and no script. An entry that does not open is left to the next full lookup,
    /// which counts it and deletes it; the plain gate does not learn from it (a
    /// waiter's misses say nothing about how often lookups hit).
    pub(crate) async fn peek(&self, namespace: &str, key: &str) -> Result<Option<Envelope>> {
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let keys = [key.to_owned()];
        let Some(stored) = self.plain_read_only(&ns, &keys).await?.hits.into_iter().next().flatten() else {
            return Ok(None);
        };
        Ok(match stored.open(self.inner.integrity.as_ref(), &ns.entry(key)) {
            Opened::Valid(env) => Some(env),
            Opened::Undecodable | Opened::Forged => None,
        })
    }

    /// Verifies and decodes an entry the lookup script returned; `None` (counted and
    /// logged: undecodable, or forged when integrity keys are set) for a miss.
    fn open(&self, ns: &NsKeys, namespace: &str, key: &str, s: &Stored) -> Option<Envelope> {
        match s.open(self.inner.integrity.as_ref(), &ns.entry(key)) {
            Opened::Valid(env) => return Some(env),
            Opened::Undecodable => {
                self.count_undecodable(namespace, 1);
                tracing::warn!(namespace, key, "undecodable l2 entry: deleting it");
            }
            Opened::Forged => {
                self.inner.counters.integrity_failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("strata_l2_integrity_failures_total", "namespace" => namespace.to_owned())
                    .increment(1);
                tracing::warn!(namespace, key, "l2 entry without a valid MAC: deleting it");
            }
        }
        None
    }

    /// Deletes an entry the client could not decode, if it still holds `bytes`.
    async fn discard_entry(&self, ns: &NsKeys, key: &str, bytes: Vec<u8>) {
        let mut inv = self.inner.scripts.discard.prepare_invoke();
        inv.key(ns.entry(key)).arg(bytes);
        let r: Result<Value> =
            self.run("redis tier discard", |mut c| async move { inv.invoke_async(&mut c).await }).await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not delete an undecodable l2 entry");
        }
    }

    /// The plain read of every key (see [`plain_read`]): per key, a fresh hit the
    /// lookup script would have answered, or `None`.
    async fn plain_read(&self, ns: &NsKeys, keys: &[String]) -> Result<Vec<Option<Stored>>> {
        let read = self.plain_read_only(ns, keys).await?;
        self.inner.plain_gate.record(read.hits.iter().any(Option::is_some), read.found);
        Ok(read.hits)
    }

    /// The plain read's round trip and reply, without telling the gate.
    async fn plain_read_only(&self, ns: &NsKeys, keys: &[String]) -> Result<plain_read::PlainRead> {
        let pipe = plain_read::plain_read_pipeline(ns, keys, self.inner.max_entry_bytes);
        let now = self.inner.clock.now().0;
        let v: Vec<Value> =
            self.run("redis tier lookup", |mut c| async move { pipe.query_async(&mut c).await }).await?;
        plain_read::read_plain_reply(&v, keys.len(), now, self.inner.max_entry_bytes)
            .ok_or_else(|| bad_reply(ErrorKind::Tier, "redis tier lookup"))
    }

    async fn lookup_raw(
        &self,
        ns: &NsKeys,
        namespace: &str,
        keys: &[String],
        pending: &[usize],
        discard: &[Vec<u8>],
        lease_ms: u64,
    ) -> Result<Vec<RawLookup>> {
        let mut inv = self.inner.scripts.lookup.prepare_invoke();
        inv.key(ns.meta()).key(ns.wide_locks());
        for &i in pending {
            inv.key(ns.entry(&keys[i])).key(ns.lease(&keys[i])).key(ns.key_locks(&keys[i]));
        }
        inv.arg(lease_ms).arg(self.inner.clock.now().0).arg(self.inner.max_entry_bytes);
        for &i in pending {
            inv.arg(discard[i].as_slice());
        }
        let v: Value =
            self.run("redis tier lookup", |mut c| async move { inv.invoke_async(&mut c).await }).await?;
        let (answers, repaired) = parse_lookup_reply(&v, pending.len())
            .ok_or_else(|| bad_reply(ErrorKind::Tier, "redis tier lookup"))?;
        self.count_repaired(namespace, repaired);
        Ok(answers)
    }
}
