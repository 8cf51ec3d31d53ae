//! The notifications, read back: parsing a payload, and applying a batch of them to
//! the mapped caches.

use std::collections::HashSet;

use futures::future::join_all;
use serde::Deserialize;
use strata::{CacheHandle, Scope};
use tokio::time::Instant;

use super::state::{Config, Counter, Shared};

/// Invalidates `keys` (text form) in `cache`: (keys invalidated, keys unparsable,
/// result). Keys are parsed as the cache's key type and sent on in canonical form.
async fn invalidate_text(cache: &CacheHandle, keys: &[String]) -> (u64, u64, strata::Result<()>) {
    let (parsed, bad) = cache.canonical_keys(keys);
    let done = parsed.len() as u64;
    let res = if parsed.is_empty() { Ok(()) } else { cache.invalidate(Scope::Keys(parsed)).await };
    (done, bad as u64, res)
}

// Here, not with the loop that sends heartbeats: `apply` is what clears it when the
// ping comes back, and the loop already depends on this file.
/// A heartbeat sent and not yet received back.
pub(crate) struct Outstanding {
    pub(crate) nonce: u64,
    pub(crate) deadline: Instant,
}

/// The shape of a notification payload (see `sql/change_capture.sql`).
#[derive(Deserialize)]
struct Payload {
    op: String,
    #[serde(default)]
    schema: Option<String>,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    key: Option<serde_json::Value>,
    #[serde(default)]
    listener: Option<String>,
    #[serde(default)]
    nonce: Option<u64>,
}

enum Change {
    Row { schema: Option<String>, table: String, key: String },
    Truncate { schema: Option<String>, table: String },
    Ping { listener: String, nonce: u64 },
}

fn parse(payload: &str) -> Option<Change> {
    let p: Payload = serde_json::from_str(payload).ok()?;
    match p.op.as_str() {
        "INSERT" | "UPDATE" | "DELETE" => {
            let key = match p.key? {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                _ => return None,
            };
            Some(Change::Row { schema: p.schema, table: p.table?, key })
        }
        "TRUNCATE" => Some(Change::Truncate { schema: p.schema, table: p.table? }),
        "PING" => Some(Change::Ping { listener: p.listener?, nonce: p.nonce? }),
        _ => None,
    }
}

/// Applies one batch of notifications: per cache, one `invalidate_many` (or one
/// `invalidate_all` for a truncate or a batch above the bulk threshold).
pub(crate) async fn apply(
    cfg: &Config,
    shared: &Shared,
    batch: Vec<String>,
    outstanding: &mut Option<Outstanding>,
) {
    let c = &shared.counters;
    let n = cfg.targets.len();
    let mut keys: Vec<Vec<String>> = vec![Vec::new(); n];
    let mut seen: Vec<HashSet<String>> = vec![HashSet::new(); n];
    let mut all = vec![false; n];
    for payload in &batch {
        let Some(change) = parse(payload) else {
            c.add(Counter::malformed, 1);
            let shown: String = payload.chars().take(200).collect();
            tracing::warn!(payload = %shown, "malformed change notification ignored");
            continue;
        };
        let (schema, table) = match &change {
            Change::Ping { listener, nonce } => {
                if *listener == shared.id && outstanding.as_ref().is_some_and(|o| o.nonce == *nonce) {
                    *outstanding = None;
                    c.add(Counter::heartbeats, 1);
                }
                continue;
            }
            Change::Row { schema, table, .. } | Change::Truncate { schema, table } => (schema, table),
        };
        c.add(Counter::notifications, 1);
        let mut mapped = false;
        for m in cfg
            .mappings
            .iter()
            .filter(|m| m.table == *table && (m.schema.is_none() || m.schema.as_deref() == schema.as_deref()))
        {
            mapped = true;
            match &change {
                Change::Row { key, .. } => {
                    if seen[m.target].insert(key.clone()) {
                        keys[m.target].push(key.clone());
                    }
                }
                _ => all[m.target] = true,
            }
        }
        if !mapped {
            c.add(Counter::unmapped, 1);
        }
        if matches!(change, Change::Truncate { .. }) {
            c.add(Counter::truncates, 1);
        }
    }
    let work = (0..n).filter(|&i| all[i] || !keys[i].is_empty()).map(|i| {
        let target = &cfg.targets[i];
        let keys = &keys[i];
        let flush = all[i] || keys.len() > cfg.bulk_threshold;
        if !all[i] && flush {
            c.add(Counter::bulk_flushes, 1);
        }
        async move {
            if flush {
                (0, 0, target.invalidate(Scope::All).await)
            } else {
                invalidate_text(target, keys).await
            }
        }
    });
    for (done, bad, res) in join_all(work).await {
        c.add(Counter::keys_invalidated, done);
        c.add(Counter::unparsable_keys, bad);
        if let Err(e) = res {
            c.add(Counter::invalidation_errors, 1);
            tracing::warn!(error = %e, "change listener: invalidation failed (the cache made itself safe)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        assert!(matches!(
            parse(r#"{"schema":"public","table":"payment","op":"UPDATE","key":"7","version":"3"}"#),
            Some(Change::Row { ref table, ref key, .. }) if table == "payment" && key == "7"
        ));
        assert!(
            matches!(parse(r#"{"table":"t","op":"DELETE","key":42}"#), Some(Change::Row { ref key, .. }) if key == "42")
        );
        assert!(matches!(parse(r#"{"table":"t","op":"TRUNCATE"}"#), Some(Change::Truncate { .. })));
        assert!(matches!(parse(r#"{"op":"PING","listener":"x","nonce":1}"#), Some(Change::Ping { .. })));
        for bad in [
            "garbage",
            "",
            "{}",
            r#"{"op":"UPDATE","table":"t"}"#,
            r#"{"op":"UPDATE","key":"1"}"#,
            r#"{"op":"UPDATE","table":"t","key":null}"#,
            r#"{"op":"UPDATE","table":"t","key":[1]}"#,
            r#"{"op":"MERGE","table":"t","key":"1"}"#,
            "[1,2]",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
