//! Change capture, the database side: a trigger per table that `pg_notify`s every
//! committed change on [`CHANNEL`].

use sqlx::PgPool;

use crate::error::Error;

/// The notification channel the triggers publish on and [`crate::ChangeListener`]
/// listens to.
pub const CHANNEL: &str = "strata_changes";

/// The trigger function shared by every captured table (`sql/change_capture.sql`):
/// `CREATE OR REPLACE FUNCTION strata_notify_change()`. Idempotent; put it in your
/// own migrations if you prefer them to [`install_change_capture`].
pub const CHANGE_CAPTURE_FUNCTION_SQL: &str = include_str!("../sql/change_capture.sql");

/// The name of the row trigger created on each captured table.
pub const TRIGGER_NAME: &str = "strata_change_capture";
/// The name of the `TRUNCATE` trigger created on each captured table.
pub const TRUNCATE_TRIGGER_NAME: &str = "strata_change_capture_truncate";

/// Keeps concurrent installers (every instance at startup) from racing on
/// `CREATE OR REPLACE FUNCTION` ("tuple concurrently updated").
const INSTALL_LOCK: i64 = 0x5354_5241_5441_5351; // "STRATASQ"

/// A table name, optionally schema-qualified (`"payment"`, `"billing.payment"`), as
/// a quoted SQL identifier. Names are taken as given (case-sensitive).
fn quote_table(table: &str) -> Result<String, Error> {
    let parts: Vec<&str> = table.splitn(2, '.').collect();
    parts.iter().map(|p| quote_ident(p, "table")).collect::<Result<Vec<_>, _>>().map(|q| q.join("."))
}

fn quote_ident(name: &str, what: &str) -> Result<String, Error> {
    if name.is_empty() || name.contains('\0') {
        return Err(Error::invalid(format!("{what} name {name:?} is empty or contains NUL")));
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The SQL that attaches change capture to `table` (for your own migrations; run
/// [`CHANGE_CAPTURE_FUNCTION_SQL`] first): drops and recreates the row trigger
/// (`AFTER INSERT OR UPDATE OR DELETE … FOR EACH ROW`) and the `AFTER TRUNCATE`
/// statement trigger.
///
/// # Errors
///
/// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) for an empty name.
pub fn change_capture_trigger_sql(
    table: &str,
    key_column: &str,
    version_column: Option<&str>,
) -> Result<String, Error> {
    let t = quote_table(table)?;
    quote_ident(key_column, "key column")?;
    if let Some(v) = version_column {
        quote_ident(v, "version column")?;
    }
    let args = format!("{}, {}", quote_literal(key_column), quote_literal(version_column.unwrap_or("")));
    Ok(format!(
        "DROP TRIGGER IF EXISTS {TRIGGER_NAME} ON {t};\n\
         CREATE TRIGGER {TRIGGER_NAME} AFTER INSERT OR UPDATE OR DELETE ON {t}\n    \
         FOR EACH ROW EXECUTE FUNCTION strata_notify_change({args});\n\
         DROP TRIGGER IF EXISTS {TRUNCATE_TRIGGER_NAME} ON {t};\n\
         CREATE TRIGGER {TRUNCATE_TRIGGER_NAME} AFTER TRUNCATE ON {t}\n    \
         FOR EACH STATEMENT EXECUTE FUNCTION strata_notify_change({args});\n"
    ))
}

/// Installs change capture on `table` (opt-in, idempotent, safe to run from every
/// instance at startup): creates or replaces the trigger function
/// ([`CHANGE_CAPTURE_FUNCTION_SQL`]) and the table's triggers
/// ([`change_capture_trigger_sql`]), in one transaction.
///
/// From then on every committed `INSERT`, `UPDATE`, `DELETE` (and `TRUNCATE`) of the
/// table, from any client, sends one notification per changed row on [`CHANNEL`],
/// with the key column's value as text (it must parse with the cache's
/// `CacheKey::parse_key`; composite keys need a generated column) and the version
/// column's value, if given. Notifications are sent at commit; a rolled-back change
/// sends nothing. Cost: one `pg_notify` per changed row inside the writing
/// transaction.
///
/// # Errors
///
/// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) when a name is
/// empty or a column does not exist; [`ErrorKind::Database`](crate::ErrorKind::Database)
/// when the database fails (e.g. the table does not exist, or the role may not create
/// triggers on it).
pub async fn install_change_capture(
    pool: &PgPool,
    table: &str,
    key_column: &str,
    version_column: Option<&str>,
) -> Result<(), Error> {
    let triggers = change_capture_trigger_sql(table, key_column, version_column)?;
    let t = quote_table(table)?;
    let mut columns = quote_ident(key_column, "key column")?;
    if let Some(v) = version_column {
        columns.push_str(", ");
        columns.push_str(&quote_ident(v, "version column")?);
    }
    let ctx = |what: &str| format!("install_change_capture({table}): {what}");
    let mut tx = pool.begin().await.map_err(|e| Error::database(ctx("begin"), e))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(INSTALL_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(|e| Error::database(ctx("advisory lock"), e))?;
    // Checks that the columns exist (a missing one would make every notification
    // unusable, silently).
    let probe = format!("SELECT {columns} FROM {t} WHERE false");
    if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(probe)).execute(&mut *tx).await {
        let undefined_column = matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("42703"));
        return Err(if undefined_column {
            Error::invalid(format!("{}: {e}", ctx("column not found")))
        } else {
            Error::database(ctx("table check"), e)
        });
    }
    sqlx::raw_sql(CHANGE_CAPTURE_FUNCTION_SQL)
        .execute(&mut *tx)
        .await
        .map_err(|e| Error::database(ctx("create function"), e))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(triggers))
        .execute(&mut *tx)
        .await
        .map_err(|e| Error::database(ctx("create triggers"), e))?;
    tx.commit().await.map_err(|e| Error::database(ctx("commit"), e))?;
    tracing::info!(table, key_column, ?version_column, "change capture installed");
    Ok(())
}

/// Removes change capture from `table` (its two triggers; the shared function stays).
///
/// # Errors
///
/// As [`install_change_capture`].
pub async fn uninstall_change_capture(pool: &PgPool, table: &str) -> Result<(), Error> {
    let t = quote_table(table)?;
    let sql = format!(
        "DROP TRIGGER IF EXISTS {TRIGGER_NAME} ON {t}; DROP TRIGGER IF EXISTS {TRUNCATE_TRIGGER_NAME} ON {t};"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(pool)
        .await
        .map_err(|e| Error::database(format!("uninstall_change_capture({table})"), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_table("payment").ok().as_deref(), Some("\"payment\""));
        assert_eq!(quote_table("billing.Pay\"x").ok().as_deref(), Some("\"billing\".\"Pay\"\"x\""));
        assert!(quote_table("").is_err());
        assert!(quote_table("a.").is_err());
        assert_eq!(quote_literal("it's"), "'it''s'");
        let sql = change_capture_trigger_sql("payment", "id", Some("version")).unwrap_or_default();
        assert!(sql.contains("strata_notify_change('id', 'version')"), "{sql}");
    }
}
