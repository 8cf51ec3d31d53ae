//! The databases strata-sql supports: what each needs before `COMMIT`, and how the
//! upsert sink runs a statement there.

use futures::future::BoxFuture;
use sqlx::{Arguments, AssertSqlSafe, Pool, Postgres, Sqlite};

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Postgres {}
    impl Sealed for sqlx::Sqlite {}
}

/// A database [`Transaction`](crate::Transaction) and [`UpsertSink`](crate::UpsertSink)
/// work with: [`Postgres`] and [`Sqlite`].
///
/// Sealed: what the helper promises depends on how each database reports a failed
/// `COMMIT` (and what the sink promises on its upsert syntax and error codes), so it is
/// implemented only for the databases it was tested against.
pub trait SqlDatabase: sqlx::Database + sealed::Sealed {
    /// The most bind parameters the upsert sink puts in one statement.
    #[doc(hidden)]
    const MAX_BIND_PARAMS: usize;

    /// Checks, on the transaction's connection, that `COMMIT` will really commit.
    ///
    /// Postgres answers `COMMIT` in a transaction that an earlier failed statement
    /// aborted with `ROLLBACK` and no error, which sqlx reports as success; a one-line
    /// query fails with SQLSTATE 25P02 in such a transaction, and that is the check.
    /// SQLite reports a `COMMIT` without an active transaction as an error: no check.
    #[doc(hidden)]
    fn check_before_commit(conn: &mut Self::Connection) -> BoxFuture<'_, Result<(), sqlx::Error>>;

    /// Binds an `i64` (the sequence): generic code cannot name `i64: Encode<'_, DB>`
    /// for every supported database otherwise.
    #[doc(hidden)]
    fn add_i64(args: &mut Self::Arguments, value: i64) -> Result<(), sqlx::error::BoxDynError>;

    /// Runs one statement built at run time (from validated identifiers) on the pool.
    /// A method of the sealed trait rather than generic code: sqlx's executor bounds,
    /// generic over the database, do not give a `Send` future.
    #[doc(hidden)]
    fn execute_built(
        pool: &Pool<Self>,
        sql: String,
        args: Self::Arguments,
    ) -> BoxFuture<'_, Result<(), sqlx::Error>>;
}

impl SqlDatabase for Postgres {
    // The protocol counts parameters in an unsigned 16-bit field.
    const MAX_BIND_PARAMS: usize = 65_535;

    fn check_before_commit(conn: &mut Self::Connection) -> BoxFuture<'_, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::raw_sql("SELECT 1").execute(conn).await?;
            Ok(())
        })
    }

    fn add_i64(args: &mut Self::Arguments, value: i64) -> Result<(), sqlx::error::BoxDynError> {
        args.add(value)
    }

    fn execute_built(
        pool: &Pool<Self>,
        sql: String,
        args: Self::Arguments,
    ) -> BoxFuture<'_, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::query_with(AssertSqlSafe(sql), args).execute(pool).await?;
            Ok(())
        })
    }
}

impl SqlDatabase for Sqlite {
    // SQLite's compile-time default before 3.32 (32,766 since): the bundled SQLite
    // allows more, but `sqlite-unbundled` may link an older system library.
    const MAX_BIND_PARAMS: usize = 999;

    fn check_before_commit(_conn: &mut Self::Connection) -> BoxFuture<'_, Result<(), sqlx::Error>> {
        Box::pin(async { Ok(()) })
    }

    fn add_i64(args: &mut Self::Arguments, value: i64) -> Result<(), sqlx::error::BoxDynError> {
        args.add(value)
    }

    fn execute_built(
        pool: &Pool<Self>,
        sql: String,
        args: Self::Arguments,
    ) -> BoxFuture<'_, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::query_with(AssertSqlSafe(sql), args).execute(pool).await?;
            Ok(())
        })
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
