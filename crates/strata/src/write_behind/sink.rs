//! The sink port: how the flusher writes a batch of saves to the system of record.

use std::fmt;

use async_trait::async_trait;

use crate::loader::BoxError;

/// One save to write: the key, its latest value, and the save's sequence number.
///
/// Sequence numbers grow with every save of a key (they are the queue's clock in
/// microseconds, kept increasing per key). A sink stores the sequence with the row and
/// refuses to overwrite a row holding a higher one, so a replayed or late batch (a
/// flusher whose claim ran out while it was writing, a retry) never undoes a newer
/// save: `… ON CONFLICT (key) DO UPDATE SET … WHERE stored.seq < excluded.seq`.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkItem<K, V> {
    /// The key.
    pub key: K,
    /// The value to store.
    pub value: V,
    /// The save's sequence number.
    pub seq: u64,
}

/// Whether retrying a failed write may succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkErrorKind {
    /// The database was unreachable, timed out, or refused for a passing reason
    /// (deadlock, serialization failure): retried with back-off.
    Transient,
    /// The database refused the row itself (a constraint, a bad value): retrying will
    /// not help, the save goes to the dead letters at once.
    Permanent,
}

/// A failed write, classified.
#[derive(Debug)]
pub struct SinkError {
    kind: SinkErrorKind,
    source: BoxError,
}

impl SinkError {
    /// A failure worth retrying.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        SinkError { kind: SinkErrorKind::Transient, source: source.into() }
    }

    /// A failure retrying will not fix.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        SinkError { kind: SinkErrorKind::Permanent, source: source.into() }
    }

    /// Its class.
    pub fn kind(&self) -> SinkErrorKind {
        self.kind
    }

    /// Whether it is [`SinkErrorKind::Permanent`].
    pub fn is_permanent(&self) -> bool {
        self.kind == SinkErrorKind::Permanent
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            SinkErrorKind::Transient => "transient",
            SinkErrorKind::Permanent => "permanent",
        };
        write!(f, "{kind} sink error: {}", self.source)
    }
}

impl std::error::Error for SinkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Writes saves to the system of record. `strata_sql::UpsertSink` is a ready one for
/// Postgres and SQLite tables.
///
/// `write_batch` returns one outcome per item, in order (a batch is written in one
/// statement where the database allows, item by item where one item may fail without
/// the others); `Err` for the whole call means no item is known to be written, and
/// every item is retried (or dead-lettered, if the error is permanent). An item whose
/// row already holds a higher sequence is a success: the newer save is there.
#[async_trait]
pub trait Sink<K, V>: Send + Sync + 'static
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// Writes `items` (distinct keys).
    async fn write_batch(&self, items: &[SinkItem<K, V>]) -> Result<Vec<Result<(), SinkError>>, SinkError>;
}
