//! Batch reads: `get_many` (L1, then one L2 round trip for the misses) and
//! `get_or_load_many` (the same, then one `Loader::load_many` call for what neither
//! tier held), with single-flight per key shared with single-key reads.

use std::sync::Arc;

use futures::future::join_all;

use super::flight::{self, FinishOnDrop, Lead};
use super::load::Loading;
use super::probe::Probe;
use super::state::Inner;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{CacheKey, CacheValue};
use crate::l1::Entry;
use crate::loader::Loader;
use crate::tier::{FillToken, Lookup};

/// One key of a batch load that this call leads.
struct Led<K, V> {
    lead: Lead<V>,
    stale: Option<Entry<V>>,
    key: K,
}

impl<K: CacheKey, V: CacheValue> Inner<K, V> {
    /// L1, then one L2 round trip for what L1 lacked; never loads.
    pub(crate) async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<V>>> {
        let now = self.now();
        let mut out: Vec<Option<V>> = Vec::with_capacity(keys.len());
        let mut missing: Vec<usize> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            self.note_read(key);
            match self.probe(key, now) {
                Probe::Fresh(value, _) => {
                    self.stats.l1_hits.incr();
                    out.push(value);
                }
                _ => {
                    out.push(None);
                    missing.push(i);
                }
            }
        }
        let Some(l2) = &self.l2 else {
            for _ in &missing {
                self.stats.misses.incr();
            }
            return self.with_waiting_saves(keys, &missing, out).await;
        };
        if missing.is_empty() {
            return Ok(out);
        }
        let start = self.guards.start(now);
        let key_strs: Vec<String> = missing.iter().map(|&i| keys[i].to_key_string()).collect();
        let lookups =
            l2.call("lookup_many", &self.stats, l2.tier().lookup_many(l2.ns(), &key_strs, None)).await?;
        for ((&i, key_str), lookup) in missing.iter().zip(key_strs).zip(lookups) {
            match lookup {
                Lookup::Hit(env) => {
                    let loading = Loading { key: keys[i].clone(), key_str, start };
                    match self.fill_from_l2(&loading, env).await {
                        Some(value) => out[i] = value,
                        None => self.stats.misses.incr(),
                    }
                }
                Lookup::Miss { .. } => self.stats.misses.incr(),
            }
        }
        self.with_waiting_saves(keys, &missing, out).await
    }

    /// `out` with the waiting write-behind saves of the `missing` keys L2 did not answer.
    async fn with_waiting_saves(
        &self,
        keys: &[K],
        missing: &[usize],
        mut out: Vec<Option<V>>,
    ) -> Result<Vec<Option<V>>> {
        if self.write_behind.is_some() {
            for &i in missing {
                if out[i].is_none() {
                    out[i] = self.waiting_value(&keys[i]).await?;
                }
            }
        }
        Ok(out)
    }

    /// L1, then for the misses one batch: joins the loads of keys already in flight,
    /// and leads the others through one L2 round trip and one `load_many` call.
    pub(crate) async fn get_or_load_many(
        self: &Arc<Self>,
        keys: &[K],
        loader: Arc<dyn Loader<K, V>>,
    ) -> Result<Vec<Option<V>>> {
        let now = self.now();
        let mut out: Vec<Option<V>> = Vec::with_capacity(keys.len());
        let mut waits = Vec::new();
        let mut led = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            self.note_read(key);
            out.push(None);
            let stale = match self.probe(key, now) {
                Probe::Fresh(value, refresh) => {
                    self.stats.l1_hits.incr();
                    if let Some(fresh_until) = refresh {
                        let (loader, k) = (loader.clone(), key.clone());
                        self.spawn_refresh(key, fresh_until, move || async move { loader.load(&k).await });
                    }
                    out[i] = value;
                    continue;
                }
                Probe::Stale(e) => Some(e),
                Probe::Absent => None,
            };
            let (rx, lead) = self.flights.join_or_lead(key);
            if let Some(lead) = lead {
                led.push(Led { lead, stale, key: key.clone() });
            }
            waits.push((i, rx));
        }
        if !led.is_empty() {
            let inner = self.clone();
            tokio::spawn(async move { inner.run_batch(led, loader).await });
        }
        for (i, rx) in waits {
            out[i] = flight::wait(rx).await?;
        }
        Ok(out)
    }

    /// The flights of one batch: L2 in one round trip, the loader once for the rest.
    async fn run_batch(self: Arc<Self>, led: Vec<Led<K, V>>, loader: Arc<dyn Loader<K, V>>) {
        let finish_keys: Vec<(K, u64)> = led.iter().map(|l| (l.key.clone(), l.lead.id)).collect();
        let _finish: Vec<FinishOnDrop<'_, K, V>> = finish_keys
            .iter()
            .map(|(key, id)| FinishOnDrop { flights: &self.flights, key, id: *id })
            .collect();
        let start = self.guards.start(self.now());
        let loadings: Vec<Loading<K>> = led.iter().map(|l| Loading::new(l.key.clone(), start)).collect();
        for _ in &led {
            self.stats.misses.incr();
        }
        // L2: one round trip for every key of the batch.
        let mut tokens: Vec<Option<FillToken>> = vec![None; led.len()];
        let mut stale_l2 = vec![None; led.len()];
        let mut to_load: Vec<usize> = Vec::new();
        let lookups = match &self.l2 {
            Some(l2) => {
                let key_strs: Vec<String> = loadings.iter().map(|l| l.key_str.clone()).collect();
                l2.call("lookup_many", &self.stats, l2.tier().lookup_many(l2.ns(), &key_strs, None))
                    .await
                    .ok()
            }
            None => None,
        };
        match lookups {
            Some(lookups) if lookups.len() == led.len() => {
                for (j, lookup) in lookups.into_iter().enumerate() {
                    match lookup {
                        Lookup::Hit(env) => {
                            let replace = self.replacement_token(&loadings[j].key_str, &env);
                            match self.fill_from_l2(&loadings[j], env).await {
                                Some(value) => {
                                    let _ = led[j].lead.tx.send(Some(Ok(value)));
                                }
                                None => {
                                    tokens[j] = replace;
                                    to_load.push(j);
                                }
                            }
                        }
                        Lookup::Miss { token, stale } => {
                            tokens[j] = Some(token);
                            stale_l2[j] = stale;
                            to_load.push(j);
                        }
                    }
                }
            }
            _ => to_load.extend(0..led.len()),
        }
        if to_load.is_empty() {
            return;
        }
        // The loader, once for every key L2 did not answer.
        let keys: Vec<K> = to_load.iter().map(|&j| led[j].key.clone()).collect();
        let loaded = self.call_loader(self.load_many_waiting_first(&keys, &*loader), None).await.and_then(
            |(values, nanos)| {
                if values.len() == keys.len() {
                    Ok((values, nanos))
                } else {
                    Err(Error::new(
                        ErrorKind::Loader,
                        format!("load_many returned {} values for {} keys", values.len(), keys.len()),
                    ))
                }
            },
        );
        let mut led: Vec<Option<Led<K, V>>> = led.into_iter().map(Some).collect();
        match loaded {
            Ok((values, load_nanos)) => {
                let stores = to_load.iter().zip(&values).map(|(&j, value)| {
                    self.store_loaded(&loadings[j], value.clone(), tokens[j].as_ref(), load_nanos)
                });
                let pushes = join_all(stores).await;
                for (&j, value) in to_load.iter().zip(values) {
                    if let Some(l) = led[j].take() {
                        let _ = l.lead.tx.send(Some(Ok(value)));
                    }
                }
                for body in pushes.into_iter().flatten() {
                    self.push_reload(body).await;
                }
            }
            Err(e) => {
                for &j in &to_load {
                    let Some(l) = led[j].take() else { continue };
                    let copy = self.fail_safe_copy(l.stale, stale_l2[j].take(), &loadings[j]).await;
                    let result = match copy {
                        Some(copy) => self.rearm(&loadings[j], copy),
                        None => Err(e.clone()),
                    };
                    let _ = l.lead.tx.send(Some(result));
                }
            }
        }
    }
}
