//! The table an [`UpsertSink`](crate::UpsertSink) writes to, and its statement's text.

use std::fmt;

use crate::error::Error;

/// Postgres silently truncates longer identifiers (`NAMEDATALEN` − 1), which would make
/// the statement name another column than the one the caller gave.
const MAX_IDENT_LEN: usize = 63;

/// The table an [`UpsertSink`](crate::UpsertSink) writes: its name and its key, value
/// and sequence columns.
///
/// The key column must be the primary key or carry a unique constraint (the upsert's
/// `ON CONFLICT` target); the sequence column must be a `BIGINT` (`INTEGER` on SQLite).
/// Names are checked when the description is made, and only names made of ASCII
/// letters, digits and underscores (not starting with a digit, at most 63 characters)
/// are accepted, the table optionally qualified by a schema (`billing.drafts`). They are
/// quoted in the statement and so taken as given: on Postgres, `Drafts` is not
/// `drafts` (as for [`install_change_capture`](crate::install_change_capture)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpsertTable {
    table: String,
    key: String,
    value: String,
    seq: String,
}

impl UpsertTable {
    /// Describes `table` with its key, value and sequence columns.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) when a name is empty,
    /// too long, or holds anything but ASCII letters, digits and underscores (a `.`
    /// between schema and table aside), or when two columns are the same.
    pub fn new(table: &str, key_column: &str, value_column: &str, seq_column: &str) -> Result<Self, Error> {
        match table.split_once('.') {
            Some((schema, name)) => {
                check_ident(schema, "schema", table)?;
                check_ident(name, "table", table)?;
            }
            None => check_ident(table, "table", table)?,
        }
        check_ident(key_column, "key column", key_column)?;
        check_ident(value_column, "value column", value_column)?;
        check_ident(seq_column, "seq column", seq_column)?;
        if key_column == value_column || key_column == seq_column || value_column == seq_column {
            return Err(Error::invalid(format!(
                "upsert table {table}: the key, value and seq columns must differ \
                 ({key_column}, {value_column}, {seq_column})"
            )));
        }
        Ok(UpsertTable {
            table: table.to_owned(),
            key: key_column.to_owned(),
            value: value_column.to_owned(),
            seq: seq_column.to_owned(),
        })
    }

    /// The table's name, as given.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The key column's name.
    pub fn key_column(&self) -> &str {
        &self.key
    }

    /// The value column's name.
    pub fn value_column(&self) -> &str {
        &self.value
    }

    /// The sequence column's name.
    pub fn seq_column(&self) -> &str {
        &self.seq
    }

    /// `INSERT INTO "t" AS stored ("k", "v", "s") `: the statement up to `VALUES`.
    pub(super) fn insert_head(&self) -> String {
        let table = self.table.split('.').map(quote).collect::<Vec<_>>().join(".");
        format!(
            "INSERT INTO {table} AS stored ({}, {}, {}) ",
            quote(&self.key),
            quote(&self.value),
            quote(&self.seq)
        )
    }

    /// The statement after the `VALUES` list: the upsert with its sequence guard.
    pub(super) fn upsert_tail(&self) -> String {
        let (k, v, s) = (quote(&self.key), quote(&self.value), quote(&self.seq));
        format!(
            " ON CONFLICT ({k}) DO UPDATE SET {v} = excluded.{v}, {s} = excluded.{s} \
             WHERE stored.{s} < excluded.{s}"
        )
    }
}

impl fmt::Display for UpsertTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.table)
    }
}

fn check_ident(name: &str, what: &str, given: &str) -> Result<(), Error> {
    let well_formed = !name.is_empty()
        && name.len() <= MAX_IDENT_LEN
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if well_formed {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "upsert table: {what} name {given:?} is not an identifier (use 1 to {MAX_IDENT_LEN} ASCII \
             letters, digits and underscores, not starting with a digit; a table may be schema.table)"
        )))
    }
}

/// Double quotes keep a name that happens to be a keyword (`order`, `user`) usable;
/// [`check_ident`] has already refused anything a quote could not hold.
fn quote(ident: &str) -> String {
    format!("\"{ident}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_text() {
        let t = UpsertTable::new("billing.drafts", "id", "body", "seq").expect("valid");
        assert_eq!(
            t.insert_head(),
            "INSERT INTO \"billing\".\"drafts\" AS stored (\"id\", \"body\", \"seq\") "
        );
        assert_eq!(
            t.upsert_tail(),
            " ON CONFLICT (\"id\") DO UPDATE SET \"body\" = excluded.\"body\", \"seq\" = excluded.\"seq\" \
             WHERE stored.\"seq\" < excluded.\"seq\""
        );
    }

    #[test]
    fn identifiers() {
        assert!(UpsertTable::new("drafts_2", "_id", "Body", "seq").is_ok());
        for bad in
            ["", "a.b.c", ".a", "a.", "1drafts", "drafts;drop", "d\"x", "dräfts", "a b", &"x".repeat(64)]
        {
            assert!(UpsertTable::new(bad, "id", "body", "seq").is_err(), "{bad:?}");
            assert!(UpsertTable::new("drafts", bad, "body", "seq").is_err(), "{bad:?}");
        }
        assert!(UpsertTable::new("drafts", "billing.id", "body", "seq").is_err());
        assert!(UpsertTable::new("drafts", "id", "id", "seq").is_err());
    }
}
