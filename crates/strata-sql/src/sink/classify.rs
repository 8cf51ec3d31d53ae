//! Whether a failed sqlx call is worth retrying: the rules behind [`classify_error`].

use sqlx::error::DatabaseError;
use sqlx::postgres::PgDatabaseError;
use sqlx::sqlite::SqliteError;
use strata::write_behind::SinkErrorKind;
use strata::{BoxError, SinkError};

/// Classifies a sqlx error for the write-behind flusher.
///
/// **Transient** (retried with back-off, then dead-lettered after `max_attempts`):
///
/// * no answer from the database: I/O and TLS errors, pool timeouts, a closed pool,
///   a crashed connection worker, protocol errors (a broken connection);
/// * Postgres SQLSTATEs: class `08` (connection exception), class `40` (transaction
///   rollback: `40001` serialization failure, `40P01` deadlock, …) except `40002`,
///   class `53` (insufficient resources: disk full, out of memory, too many
///   connections), class `58` (system error, e.g. I/O), `57014` (statement timeout or
///   cancel), `57P01`/`57P02`/`57P03` (administrator or crash shutdown, cannot connect
///   now), `55P03` (lock timeout), `55006` (object in use), `25006` (read-only
///   transaction: a standby after a failover);
/// * SQLite result codes (primary): `BUSY`, `LOCKED`, `NOMEM`, `IOERR`, `INTERRUPT`,
///   `FULL`, `CANTOPEN`, `PROTOCOL`.
///
/// **Permanent** (the save goes to the dead letters at once; [`UpsertSink`](crate::UpsertSink)
/// first retries a refused batch row by row, so only the offending rows get it):
///
/// * Postgres class `22` (data exception: a value out of range, bad text encoding),
///   class `23` (integrity constraint violation: check, not-null, foreign key,
///   unique), `40002`, class `42` (syntax error, undefined table or column, wrong
///   type), class `44` (`WITH CHECK OPTION`), class `21` (cardinality), class `0A`
///   (feature not supported), class `P0` (an exception raised by a PL/pgSQL trigger);
/// * SQLite `CONSTRAINT`, `MISMATCH`, `TOOBIG`, `RANGE`, `ERROR` (an SQL error such
///   as a missing table or column);
/// * sqlx errors about the query itself: encoding a value, an invalid argument, an
///   unknown type, configuration.
///
/// Anything else (another SQLSTATE or result code, an error sqlx adds later) is
/// transient: retrying a row that cannot be written costs `max_attempts` tries,
/// while dead-lettering a row that could have been written needs an operator.
pub fn classify_error(err: &sqlx::Error) -> SinkErrorKind {
    use SinkErrorKind::{Permanent, Transient};
    match err {
        sqlx::Error::Database(db) => classify_database(db.as_ref()),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Transient,
        sqlx::Error::Configuration(_)
        | sqlx::Error::InvalidArgument(_)
        | sqlx::Error::Encode(_)
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::AnyDriverError(_) => Permanent,
        _ => Transient,
    }
}

/// [`classify_error`]s `err` and wraps it in a [`SinkError`] of that kind, keeping it as the
/// source (so `std::error::Error::source` leads back to the `sqlx::Error`).
pub fn sink_error(err: sqlx::Error) -> SinkError {
    with_kind(classify_error(&err), err)
}

pub(super) fn with_kind(kind: SinkErrorKind, source: impl Into<BoxError>) -> SinkError {
    match kind {
        SinkErrorKind::Permanent => SinkError::permanent(source),
        SinkErrorKind::Transient => SinkError::transient(source),
    }
}

fn classify_database(db: &dyn DatabaseError) -> SinkErrorKind {
    if let Some(pg) = db.try_downcast_ref::<PgDatabaseError>() {
        return classify_sqlstate(pg.code());
    }
    if db.try_downcast_ref::<SqliteError>().is_some() {
        // sqlx reports SQLite's extended result code, in decimal; the primary code is
        // its low byte.
        if let Some(code) = db.code().and_then(|c| c.parse::<i32>().ok()) {
            return classify_sqlite(code & 0xff);
        }
    }
    SinkErrorKind::Transient
}

fn classify_sqlstate(code: &str) -> SinkErrorKind {
    use SinkErrorKind::{Permanent, Transient};
    match code {
        "40002" => Permanent,
        "57014" | "57P01" | "57P02" | "57P03" | "55P03" | "55006" | "25006" => Transient,
        _ => match code.get(..2) {
            Some("08" | "40" | "53" | "58") => Transient,
            Some("21" | "22" | "23" | "42" | "44" | "0A" | "P0") => Permanent,
            _ => Transient,
        },
    }
}

fn classify_sqlite(primary: i32) -> SinkErrorKind {
    use SinkErrorKind::{Permanent, Transient};
    // SQLite's primary result codes (sqlite3.h).
    const ERROR: i32 = 1;
    const TOOBIG: i32 = 18;
    const CONSTRAINT: i32 = 19;
    const MISMATCH: i32 = 20;
    const RANGE: i32 = 25;
    match primary {
        ERROR | TOOBIG | CONSTRAINT | MISMATCH | RANGE => Permanent,
        // BUSY 5, LOCKED 6, NOMEM 7, INTERRUPT 9, IOERR 10, FULL 13, CANTOPEN 14,
        // PROTOCOL 15, and whatever else.
        _ => Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates() {
        for code in ["08006", "08001", "40001", "40P01", "53100", "53300", "57P01", "57P03", "57014", "58030"]
        {
            assert_eq!(classify_sqlstate(code), SinkErrorKind::Transient, "{code}");
        }
        for code in ["22001", "22P02", "23505", "23514", "23502", "42P01", "42703", "42601", "40002", "P0001"]
        {
            assert_eq!(classify_sqlstate(code), SinkErrorKind::Permanent, "{code}");
        }
        assert_eq!(classify_sqlstate("XX000"), SinkErrorKind::Transient);
    }

    #[test]
    fn sqlite_codes() {
        for code in [5, 6, 5 | (1 << 8), 10, 13] {
            assert_eq!(classify_sqlite(code & 0xff), SinkErrorKind::Transient, "{code}");
        }
        // 275: SQLITE_CONSTRAINT_CHECK.
        for code in [1, 19, 275, 20, 18] {
            assert_eq!(classify_sqlite(code & 0xff), SinkErrorKind::Permanent, "{code}");
        }
    }

    #[test]
    fn sqlx_errors() {
        assert_eq!(classify_error(&sqlx::Error::PoolTimedOut), SinkErrorKind::Transient);
        assert_eq!(
            classify_error(&sqlx::Error::Io(std::io::Error::other("reset"))),
            SinkErrorKind::Transient
        );
        assert_eq!(classify_error(&sqlx::Error::Encode("bad".into())), SinkErrorKind::Permanent);
        assert!(sink_error(sqlx::Error::InvalidArgument("x".into())).is_permanent());
    }
}
