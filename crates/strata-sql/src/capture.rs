//! Change capture, the database side: a trigger per table that writes every change
//! into an outbox table, in the writing transaction, and wakes the listeners up with a
//! notification on [`CHANNEL`] that carries no invalidation.
//!
//! # Why an outbox, not signed notifications
//!
//! Any role that can connect may `pg_notify` on any channel, and `LISTEN` on it: a
//! notification's payload proves nothing about who sent it. When the payload *was*
//! the invalidation (`{"table":…,"op":"TRUNCATE"}`), a role without any right on the
//! captured tables could flush every cache at will (232 forged `TRUNCATE` notices in
//! 5 s took the L1 hit rate to 0 %). Two designs make forgeries harmless:
//!
//! * **A MAC on each payload** (an HMAC-SHA256 computed by a `SECURITY DEFINER`
//!   function with a secret only the owner can read, checked by the listener).
//!   It proves the trigger wrote the payload, not that it is new: anyone can `LISTEN`,
//!   record one genuine `TRUNCATE` notice and replay it forever, which is the attack
//!   again. Rejecting replays needs freshness, and a payload is written when the row
//!   changes, not when the transaction commits (a transaction may run for hours, and
//!   notifications arrive in commit order), so neither a timestamp window nor a
//!   sequence number can tell a replay from a late genuine notice without sometimes
//!   dropping a real change, and a listener that restarts forgets what it has seen.
//!   It also needs a secret distributed to every listener and rotated, and the
//!   listener still has to flush everything after each reconnect, since
//!   notifications sent while it was away are lost.
//! * **A transactional outbox** (chosen). The trigger function, `SECURITY DEFINER` and
//!   owned by the installing role, writes each change into `strata_change_outbox`,
//!   which only its owner may write (`REVOKE ALL … FROM PUBLIC`), so a row exists
//!   exactly when a change to a captured table committed. The notification is only a
//!   wake-up (the transaction's id, sent once per transaction); the listener acts on
//!   the rows it reads, never on a payload. A forged or replayed wake-up costs one
//!   indexed read that finds nothing new, and is counted (`forged`: a wake-up naming a
//!   transaction that wrote no change, or a second one for the same transaction).
//!   Reads go by snapshot, not by id: each read, in a repeatable-read transaction,
//!   takes the rows of transactions visible in its snapshot and not in the previous
//!   read's (`pg_current_snapshot()`), so a transaction that took its ids first and
//!   committed last is never skipped, and none is read twice. The same cursor lets a
//!   listener that was disconnected read what committed meanwhile instead of flushing
//!   every cache. The price: one outbox `INSERT` per changed row in the writing
//!   transaction (instead of one `pg_notify`), and rows to prune (the listener deletes
//!   those older than its retention, see `ChangeListenerBuilder::outbox_retention`).
//!
//! `EXECUTE` on the trigger function is revoked from `PUBLIC` too: otherwise a role
//! could attach it to a table of its own (a temporary one needs no privilege) named
//! like a captured table and write outbox rows through it. Triggers already attached
//! keep firing for every writer (Postgres checks `EXECUTE` when a trigger is created,
//! not when it fires), and the function runs with a fixed `search_path`.
//!
//! What is trusted: roles that may write a captured table (their changes are real
//! changes, including `TRUNCATE` where granted), the outbox's owner and superusers.

use sqlx::PgPool;

use crate::error::Error;

/// The notification channel the triggers publish on and [`crate::ChangeListener`]
/// listens to.
pub const CHANNEL: &str = "strata_changes";

/// The outbox and the trigger function shared by every captured table
/// (`sql/change_capture.sql`): the tables `strata_change_outbox` and
/// `strata_change_outbox_horizon` (created if missing, in the current schema, readable
/// and writable by their owner only), and `CREATE OR REPLACE FUNCTION
/// strata_notify_change()` (`SECURITY DEFINER`, `EXECUTE` revoked from `PUBLIC`).
/// Idempotent; put it in your own migrations if you prefer them to
/// [`install_change_capture`], run by the role that is to own the outbox.
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
/// instance at startup): creates the outbox if missing and creates or replaces the
/// trigger function ([`CHANGE_CAPTURE_FUNCTION_SQL`]) and the table's triggers
/// ([`change_capture_trigger_sql`]), in one transaction.
///
/// From then on every committed `INSERT`, `UPDATE`, `DELETE` (and `TRUNCATE`) of the
/// table, from any client, writes one outbox row per changed row, with the key
/// column's value as text (it must parse with the cache's `CacheKey::parse_key`:
/// integer keys only in canonical form; composite keys need a generated column) and
/// the version column's value, if given, and wakes the listeners with one
/// notification per transaction on [`CHANNEL`] at commit. A rolled-back change
/// writes nothing. Cost: one `INSERT` into the outbox per changed row inside the
/// writing transaction, one notification per transaction.
///
/// Needs PostgreSQL 13 or later (`xid8`, `pg_current_snapshot()`).
///
/// # Privileges
///
/// The role running it must be allowed to create triggers on `table` (own it, or
/// hold `TRIGGER` on it), to create the outbox tables in the current schema (or own
/// them already), and to replace `strata_notify_change()` (own it, if it exists). It
/// becomes the owner of the outbox and of the function; the function runs as that
/// role. Writers of `table` need nothing more than their rights on `table`. The
/// [`ChangeListener`](crate::ChangeListener)'s role needs `SELECT` on the two outbox
/// tables (and `DELETE` on the outbox, `UPDATE` on the horizon to prune it): the
/// installing role has them; grant them to another one explicitly. No other role
/// needs, or should get, any right on the outbox or `EXECUTE` on the function.
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

/// Removes change capture from `table` (its two triggers; the shared function and
/// the outbox stay).
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
        for needed in
            ["SECURITY DEFINER", "REVOKE ALL ON FUNCTION strata_notify_change() FROM PUBLIC", "search_path"]
        {
            assert!(CHANGE_CAPTURE_FUNCTION_SQL.contains(needed), "{needed}");
        }
    }
}
