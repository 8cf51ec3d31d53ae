//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`): the
//! decoders of what the change listener reads from Postgres. Not a stable API.

use crate::listener::notification::{Notice, classify};
use crate::listener::outbox::Snapshot;

/// What a `pg_notify` payload on the change channel is read as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A wake-up naming a transaction id.
    Wake(u64),
    /// A listener's heartbeat.
    Ping {
        /// The listener that sent it.
        listener: String,
        /// Its nonce.
        nonce: u64,
    },
    /// Anything else.
    Other,
}

/// Classifies a notification payload as the listener does.
pub fn classify_payload(payload: &str) -> Payload {
    match classify(payload) {
        Notice::Wake(xid) => Payload::Wake(xid),
        Notice::Ping { listener, nonce } => Payload::Ping { listener, nonce },
        Notice::Other => Payload::Other,
    }
}

/// Parses `pg_current_snapshot()::text` (`xmin:xmax:xip,…`) as the listener does, and
/// answers whether each of `xids` is seen by it.
pub fn parse_snapshot(text: &str, xids: &[u64]) -> Option<(u64, Vec<bool>)> {
    let s = Snapshot::parse(text)?;
    Some((s.xmin, xids.iter().map(|&x| s.sees(x)).collect()))
}
