//! The databases the transaction helper supports, and what each needs before `COMMIT`.

use futures::future::BoxFuture;
use sqlx::{Postgres, Sqlite};

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Postgres {}
    impl Sealed for sqlx::Sqlite {}
}

/// A database [`Transaction`](crate::Transaction) works with: [`Postgres`] and [`Sqlite`].
///
/// Sealed: what the helper promises depends on how each database reports a failed
/// `COMMIT`, so it is implemented only for the databases it was tested against.
pub trait SqlDatabase: sqlx::Database + sealed::Sealed {
    /// Checks, on the transaction's connection, that `COMMIT` will really commit.
    ///
    /// Postgres answers `COMMIT` in a transaction that an earlier failed statement
    /// aborted with `ROLLBACK` and no error, which sqlx reports as success; a one-line
    /// query fails with SQLSTATE 25P02 in such a transaction, and that is the check.
    /// SQLite reports a `COMMIT` without an active transaction as an error: no check.
    #[doc(hidden)]
    fn check_before_commit(conn: &mut Self::Connection) -> BoxFuture<'_, Result<(), sqlx::Error>>;
}

impl SqlDatabase for Postgres {
    fn check_before_commit(conn: &mut Self::Connection) -> BoxFuture<'_, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::raw_sql("SELECT 1").execute(conn).await?;
            Ok(())
        })
    }
}

impl SqlDatabase for Sqlite {
    fn check_before_commit(_conn: &mut Self::Connection) -> BoxFuture<'_, Result<(), sqlx::Error>> {
        Box::pin(async { Ok(()) })
    }
}

/// True when a failed `COMMIT` certainly did not commit: the server answered with an
/// error (Postgres aborts the transaction; SQLite leaves it open and sqlx rolls it back
/// when the transaction is dropped). Any other failure (I/O, protocol, a crashed
/// worker) leaves the outcome unknown: the server may have committed before the
/// connection broke.
pub(crate) fn definitely_rolled_back(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(_))
}
