//! The notifications, read back (a wake-up, a heartbeat, or something the trigger did
//! not send), and the changes read from the outbox applied to the mapped caches.

use std::collections::HashSet;

use futures::future::join_all;
use serde::Deserialize;
use strata::{CacheHandle, Scope};
use tokio::time::Instant;

use super::outbox::ChangeRow;
use super::state::{Config, Counter, Shared};

/// Invalidates `keys` (text form) in `cache`: (keys invalidated, keys unparsable,
/// result). Keys are parsed as the cache's key type (integers only in their canonical
/// form, so a key names exactly one entry) and sent on as written.
async fn invalidate_text(cache: &CacheHandle, keys: &[String]) -> (u64, u64, strata::Result<()>) {
    let (parsed, bad) = cache.canonical_keys(keys);
    let done = parsed.len() as u64;
    let res = if parsed.is_empty() { Ok(()) } else { cache.invalidate(Scope::Keys(parsed)).await };
    (done, bad as u64, res)
}

// Here, not with the loop that sends heartbeats: `classify` is what clears it when the
// ping comes back, and the loop already depends on this file.
/// A heartbeat sent and not yet received back.
pub(crate) struct Outstanding {
    pub(crate) nonce: u64,
    pub(crate) deadline: Instant,
}

/// A heartbeat's payload (sent by a listener to itself, see `run.rs`).
#[derive(Deserialize)]
struct Ping {
    op: String,
    listener: String,
    nonce: u64,
}

/// What a notification on the channel is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Notice {
    /// A wake-up: the trigger's, naming the transaction that committed changes, or a
    /// forgery (checked against the outbox).
    Wake(u64),
    /// A heartbeat of this listener or of another one.
    Ping { listener: String, nonce: u64 },
    /// Anything else: not sent by the trigger, nor by a listener.
    Other,
}

/// Reads a payload. A wake-up is a transaction id in canonical decimal, as the trigger
/// writes it (no sign, no leading zero): `05` is not a second name for transaction 5.
pub(crate) fn classify(payload: &str) -> Notice {
    let digits = !payload.is_empty()
        && payload.len() <= 20
        && payload.bytes().all(|b| b.is_ascii_digit())
        && (payload.len() == 1 || !payload.starts_with('0'));
    if digits && let Ok(xid) = payload.parse() {
        return Notice::Wake(xid);
    }
    match serde_json::from_str::<Ping>(payload) {
        Ok(p) if p.op == "PING" => Notice::Ping { listener: p.listener, nonce: p.nonce },
        _ => Notice::Other,
    }
}

/// Handles a heartbeat: clears the outstanding one when it is ours.
pub(crate) fn pong(shared: &Shared, listener: &str, nonce: u64, outstanding: &mut Option<Outstanding>) {
    if listener == shared.id && outstanding.as_ref().is_some_and(|o| o.nonce == nonce) {
        *outstanding = None;
        shared.counters.add(Counter::heartbeats, 1);
    }
}

/// Applies changes read from the outbox: per cache, one `invalidate_many` (or one
/// `invalidate_all` for a truncate or more keys than the bulk threshold).
pub(crate) async fn apply(cfg: &Config, shared: &Shared, rows: &[ChangeRow]) {
    let c = &shared.counters;
    let n = cfg.targets.len();
    let mut keys: Vec<Vec<String>> = vec![Vec::new(); n];
    let mut seen: Vec<HashSet<&str>> = vec![HashSet::new(); n];
    let mut all = vec![false; n];
    c.add(Counter::changes, rows.len() as u64);
    for row in rows {
        let truncate = row.op == "TRUNCATE";
        let key = match (&row.key, row.op.as_str()) {
            (Some(k), "INSERT" | "UPDATE" | "DELETE") => Some(k.as_str()),
            (None, "TRUNCATE") => None,
            _ => {
                c.add(Counter::malformed, 1);
                tracing::warn!(?row, "change capture: outbox row with an unknown op or no key ignored");
                continue;
            }
        };
        let mut mapped = false;
        for m in cfg
            .mappings
            .iter()
            .filter(|m| m.table == row.table && m.schema.as_deref().is_none_or(|s| s == row.schema))
        {
            mapped = true;
            let i = m.target;
            match key {
                Some(k) if !all[i] => {
                    if seen[i].insert(k) {
                        keys[i].push(k.to_owned());
                        if keys[i].len() > cfg.bulk_threshold {
                            all[i] = true;
                            keys[i] = Vec::new();
                            c.add(Counter::bulk_flushes, 1);
                        }
                    }
                }
                Some(_) => {}
                None => all[i] = true,
            }
        }
        if !mapped {
            c.add(Counter::unmapped, 1);
        }
        if truncate {
            c.add(Counter::truncates, 1);
        }
    }
    let work = (0..n).filter(|&i| all[i] || !keys[i].is_empty()).map(|i| {
        let target = &cfg.targets[i];
        let keys = &keys[i];
        let flush = all[i];
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
    fn notices() {
        assert_eq!(classify("748"), Notice::Wake(748));
        assert_eq!(classify("18446744073709551615"), Notice::Wake(u64::MAX));
        assert_eq!(
            classify(r#"{"op":"PING","listener":"x","nonce":1}"#),
            Notice::Ping { listener: "x".into(), nonce: 1 }
        );
        for other in [
            "",
            "garbage",
            "+7",
            " 7",
            "-7",
            "18446744073709551616",
            "{}",
            r#"{"schema":"public","table":"payment","op":"UPDATE","key":"7","version":"3"}"#,
            r#"{"table":"t","op":"TRUNCATE"}"#,
            r#"{"op":"PONG","listener":"x","nonce":1}"#,
            "[1,2]",
        ] {
            assert_eq!(classify(other), Notice::Other, "{other:?}");
        }
    }

    /// Found by the `pg_notify` fuzz target: a leading zero was read as a wake-up.
    #[test]
    fn wake_ups_are_canonical_decimals() {
        assert_eq!(classify("0"), Notice::Wake(0));
        assert_eq!(classify("10"), Notice::Wake(10));
        for other in ["05", "00", "018446744073709551615", "0x5"] {
            assert_eq!(classify(other), Notice::Other, "{other:?}");
        }
    }
}
