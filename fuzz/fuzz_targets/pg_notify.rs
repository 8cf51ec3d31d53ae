//! What the change listener reads from Postgres as text: `pg_notify` payloads on the
//! change channel (a wake-up naming a transaction id, a listener's JSON heartbeat, or
//! anything else someone sent) and `pg_current_snapshot()::text`. The first byte picks
//! which. No panic; a wake-up's id is the payload's canonical decimal; a snapshot sees
//! every transaction below its xmin.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_sql::fuzzing::{Payload, classify_payload, parse_snapshot};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    if mode % 2 == 0 {
        if let Payload::Wake(xid) = classify_payload(text) {
            assert_eq!(xid.to_string(), text, "only a canonical decimal wakes");
        }
    } else {
        let probes = [0, 1, 2, 3, 100, 1 << 32, u64::MAX];
        if let Some((xmin, seen)) = parse_snapshot(text, &probes) {
            for (x, s) in probes.iter().zip(seen) {
                assert!(*x >= xmin || s, "a snapshot sees {x} below its xmin {xmin}");
            }
        }
    }
});
