//! The `billsetting` table and its one cached shape: an account's billing settings.

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// One account's billing settings, as cached and as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Settings {
    /// The account.
    pub account_id: i64,
    /// The plan ("basic", "gold", …).
    pub plan: String,
    /// The monthly spending limit, in cents.
    pub monthly_limit_cents: i64,
    /// Bumped by every write: lets a client see which write it is reading.
    pub version: i64,
}

/// A plan change, as the API takes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanChange {
    /// The new plan: 1 to 32 characters of `[a-z0-9_-]`.
    pub plan: String,
    /// The new monthly limit in cents, if it changes (0..=10^12).
    #[serde(default)]
    pub monthly_limit_cents: Option<i64>,
}

impl PlanChange {
    /// What is wrong with the change, if anything (for a 400 that says so).
    pub fn problem(&self) -> Option<String> {
        let plan_ok = (1..=32).contains(&self.plan.len())
            && self
                .plan
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !plan_ok {
            return Some(format!("plan {:?} must be 1 to 32 characters of a-z, 0-9, _ and -", self.plan));
        }
        match self.monthly_limit_cents {
            Some(c) if !(0..=1_000_000_000_000).contains(&c) => {
                Some(format!("monthly_limit_cents {c} must be between 0 and 1000000000000"))
            }
            _ => None,
        }
    }
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS billsetting (
    account_id BIGINT PRIMARY KEY,
    plan TEXT NOT NULL,
    monthly_limit_cents BIGINT NOT NULL,
    version BIGINT NOT NULL DEFAULT 1
)";

/// Creates the table if missing and seeds accounts `1..=accounts` that do not exist yet
/// (plan "basic", limit 100.00).
pub async fn prepare(pool: &PgPool, accounts: i64) -> sqlx::Result<()> {
    // Instances starting together would race on CREATE TABLE IF NOT EXISTS (Postgres
    // then fails one with a duplicate pg_type row): one at a time.
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(7262531)").execute(&mut *tx).await?;
    sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
    sqlx::query(
        "INSERT INTO billsetting (account_id, plan, monthly_limit_cents)
         SELECT g, 'basic', 10000 FROM generate_series(1, $1) AS g
         ON CONFLICT (account_id) DO NOTHING",
    )
    .bind(accounts)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Reads one account's settings from the database (the cache's loader).
pub async fn load(pool: &PgPool, account_id: i64) -> sqlx::Result<Option<Settings>> {
    sqlx::query_as::<_, Settings>(
        "SELECT account_id, plan, monthly_limit_cents, version FROM billsetting WHERE account_id = $1",
    )
    .bind(account_id)
    .fetch_optional(pool)
    .await
}

/// Applies `change` inside `tx`; the new row, or `None` when the account does not exist.
pub async fn change_plan(
    tx: &mut sqlx::PgConnection,
    account_id: i64,
    change: &PlanChange,
) -> sqlx::Result<Option<Settings>> {
    sqlx::query_as::<_, Settings>(
        "UPDATE billsetting
         SET plan = $2, monthly_limit_cents = COALESCE($3, monthly_limit_cents), version = version + 1
         WHERE account_id = $1
         RETURNING account_id, plan, monthly_limit_cents, version",
    )
    .bind(account_id)
    .bind(&change.plan)
    .bind(change.monthly_limit_cents)
    .fetch_optional(tx)
    .await
}
