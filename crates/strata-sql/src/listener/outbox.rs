//! The outbox, read back: which changes committed since the last read (by snapshot,
//! not by id, so that transactions committing out of order are never skipped), the
//! pruning of old rows, and the check of wake-up notifications against what was read.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use sqlx::{PgPool, Row};
use tokio::time::Instant;

/// Rows read per query; a larger backlog is read in several pages of one snapshot.
const PAGE: i64 = 5_000;
/// Transaction ids remembered as read, and as woken, to verify wake-ups.
const REMEMBERED: usize = 65_536;
/// Wake-ups waiting for verification; beyond this, new ones count as forged at once.
const MAX_UNVERIFIED: usize = 10_000;
/// How long a wake-up naming a transaction not yet visible may wait for it.
const VISIBILITY_GRACE: Duration = Duration::from_secs(1);

/// A Postgres snapshot as `pg_current_snapshot()::text` writes it: `xmin:xmax:xip,…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) xmin: u64,
    xmax: u64,
    xip: Vec<u64>,
}

impl Snapshot {
    pub(crate) fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list.split(',').map(|x| x.parse().ok()).collect::<Option<Vec<u64>>>()?,
        };
        (xmin <= xmax).then_some(Snapshot { xmin, xmax, xip })
    }

    /// Whether transaction `xid` had ended when the snapshot was taken (its changes,
    /// if it committed, are visible in it).
    pub(crate) fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }
}

/// One outbox row: a committed change of one row (or a `TRUNCATE`).
#[derive(Debug)]
pub(crate) struct ChangeRow {
    pub(crate) tx: u64,
    pub(crate) schema: String,
    pub(crate) table: String,
    pub(crate) op: String,
    pub(crate) key: Option<String>,
}

/// What one read of the outbox found.
pub(crate) struct Read {
    /// The snapshot it read under: the next read starts from it.
    pub(crate) snapshot: Snapshot,
    /// Changes committed after the previous snapshot and before this one.
    pub(crate) rows: Vec<ChangeRow>,
    /// Rows below this transaction id may have been pruned.
    pub(crate) pruned_below: u64,
}

fn xid(text: &str) -> Result<u64, sqlx::Error> {
    text.parse().map_err(|_| sqlx::Error::Protocol(format!("not a transaction id: {text:?}")))
}

/// The snapshot to start reading from: changes committed before it are not read.
/// Fails when the outbox is missing or not readable by this role.
pub(crate) async fn start(pool: &PgPool) -> Result<Snapshot, sqlx::Error> {
    let mut tx = pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
    let text: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text").fetch_one(&mut *tx).await?;
    sqlx::query("SELECT 1 FROM strata_change_outbox WHERE false").execute(&mut *tx).await?;
    sqlx::query("SELECT 1 FROM strata_change_outbox_horizon WHERE false").execute(&mut *tx).await?;
    tx.commit().await?;
    Snapshot::parse(&text).ok_or_else(|| sqlx::Error::Protocol(format!("not a snapshot: {text:?}")))
}

/// Reads every change committed after `prev` (visible now, not visible in `prev`), in
/// one repeatable-read transaction, in pages of [`PAGE`] rows.
pub(crate) async fn read_since(pool: &PgPool, prev: &Snapshot) -> Result<Read, sqlx::Error> {
    let mut tx = pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
    // The transaction's snapshot: the rows below are exactly those it sees.
    let text: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text").fetch_one(&mut *tx).await?;
    let snapshot =
        Snapshot::parse(&text).ok_or_else(|| sqlx::Error::Protocol(format!("not a snapshot: {text:?}")))?;
    let horizon: Option<String> =
        sqlx::query_scalar("SELECT pruned_below::text FROM strata_change_outbox_horizon")
            .fetch_optional(&mut *tx)
            .await?;
    let pruned_below = horizon.as_deref().map_or(Ok(0), xid)?;
    let xip: Vec<String> = prev.xip.iter().map(u64::to_string).collect();
    let mut rows = Vec::new();
    let mut after = 0_i64;
    loop {
        // Not visible in `prev`: begun at or after its xmax, or in progress then.
        let page = sqlx::query(
            "SELECT id, tx::text, schema_name, table_name, op, key FROM strata_change_outbox \
             WHERE (tx >= $1::text::xid8 OR tx = ANY($2::text[]::xid8[])) AND id > $3 \
             ORDER BY id LIMIT $4",
        )
        .bind(prev.xmax.to_string())
        .bind(&xip)
        .bind(after)
        .bind(PAGE)
        .fetch_all(&mut *tx)
        .await?;
        let full = page.len() as i64 == PAGE;
        for row in page {
            after = row.try_get("id")?;
            rows.push(ChangeRow {
                tx: xid(row.try_get::<&str, _>("tx")?)?,
                schema: row.try_get("schema_name")?,
                table: row.try_get("table_name")?,
                op: row.try_get("op")?,
                key: row.try_get("key")?,
            });
        }
        if !full {
            break;
        }
    }
    tx.commit().await?;
    Ok(Read { snapshot, rows, pruned_below })
}

/// Deletes the outbox rows of transactions below `bound` and records the horizon.
/// Returns how many rows were deleted.
pub(crate) async fn prune(pool: &PgPool, bound: u64) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let deleted = sqlx::query("DELETE FROM strata_change_outbox WHERE tx < $1::text::xid8")
        .bind(bound.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query(
        "UPDATE strata_change_outbox_horizon SET pruned_below = greatest(pruned_below, $1::text::xid8)",
    )
    .bind(bound.to_string())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(deleted)
}

/// When to prune, and below which transaction id: the xmin of a snapshot this
/// listener read at least `retention` ago (every change committed before it has been
/// read, here and by every listener that read within the retention).
pub(crate) struct Pruning {
    retention: Duration,
    /// (when, xmin) of past reads, one per `retention / 8` at most.
    marks: VecDeque<(Instant, u64)>,
    pruned_below: u64,
}

impl Pruning {
    pub(crate) fn new(retention: Duration) -> Self {
        Pruning { retention, marks: VecDeque::new(), pruned_below: 0 }
    }

    /// Remembers a read's snapshot.
    pub(crate) fn mark(&mut self, snapshot: &Snapshot) {
        let now = Instant::now();
        let due = self.marks.back().is_none_or(|(at, _)| now.duration_since(*at) >= self.retention / 8);
        if due {
            self.marks.push_back((now, snapshot.xmin));
        }
    }

    /// The bound to prune below, when one is due.
    pub(crate) fn due(&mut self) -> Option<u64> {
        let mut bound = None;
        while let Some(&(at, xmin)) = self.marks.front() {
            if at.elapsed() < self.retention {
                break;
            }
            self.marks.pop_front();
            bound = Some(xmin);
        }
        bound.filter(|b| *b > self.pruned_below)
    }

    pub(crate) fn pruned(&mut self, bound: u64) {
        self.pruned_below = self.pruned_below.max(bound);
    }
}

/// A set that remembers the last `cap` values inserted.
struct Recent<T> {
    set: HashSet<T>,
    order: VecDeque<T>,
    cap: usize,
}

impl<T: Hash + Eq + Copy> Recent<T> {
    fn new(cap: usize) -> Self {
        Recent { set: HashSet::new(), order: VecDeque::new(), cap }
    }

    fn insert(&mut self, value: T) {
        if self.set.insert(value) {
            self.order.push_back(value);
            if self.order.len() > self.cap
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }

    fn contains(&self, value: &T) -> bool {
        self.set.contains(value)
    }
}

/// Checks wake-ups against the outbox. The trigger sends one per committed
/// transaction, naming it, after the commit: a genuine wake-up names a transaction
/// whose changes a read after its arrival finds, and arrives once. Anything else (a
/// transaction that wrote no change, one that does not exist, a second wake-up for the
/// same one) was sent by someone else, with `pg_notify`: it is counted as forged, and
/// it never invalidates anything, since invalidations come from the outbox only.
pub(crate) struct Verifier {
    read: Recent<u64>,
    woken: Recent<u64>,
    unverified: Vec<(u64, Instant)>,
}

/// The verdicts on the wake-ups received so far.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Verdicts {
    pub(crate) genuine: u64,
    pub(crate) forged: u64,
}

impl Verifier {
    pub(crate) fn new() -> Self {
        Verifier { read: Recent::new(REMEMBERED), woken: Recent::new(REMEMBERED), unverified: Vec::new() }
    }

    /// A wake-up arrived; returns `false` (forged) when too many wait already.
    pub(crate) fn woken(&mut self, xid: u64) -> bool {
        if self.unverified.len() >= MAX_UNVERIFIED {
            return false;
        }
        self.unverified.push((xid, Instant::now()));
        true
    }

    /// Whether wake-ups wait for a read.
    pub(crate) fn waiting(&self) -> bool {
        !self.unverified.is_empty()
    }

    /// After a read under `snapshot` that found changes of the transactions `read`:
    /// decides on every wake-up that arrived before it.
    pub(crate) fn after_read(
        &mut self,
        snapshot: &Snapshot,
        read: impl IntoIterator<Item = u64>,
    ) -> Verdicts {
        for tx in read {
            self.read.insert(tx);
        }
        let mut out = Verdicts::default();
        let mut keep = Vec::new();
        for (xid, at) in std::mem::take(&mut self.unverified) {
            if self.woken.contains(&xid) {
                out.forged += 1;
            } else if self.read.contains(&xid) {
                self.woken.insert(xid);
                out.genuine += 1;
            } else if !snapshot.sees(xid) && xid < snapshot.xmax && at.elapsed() < VISIBILITY_GRACE {
                keep.push((xid, at));
            } else {
                out.forged += 1;
            }
        }
        self.unverified = keep;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots() {
        let s = Snapshot::parse("10:20:12,15").unwrap_or_else(|| panic!("parses"));
        assert!(s.sees(9) && s.sees(11) && s.sees(19));
        assert!(!s.sees(12) && !s.sees(15) && !s.sees(20) && !s.sees(u64::MAX));
        assert_eq!(Snapshot::parse("7:7:"), Some(Snapshot { xmin: 7, xmax: 7, xip: vec![] }));
        for bad in ["", "1", "1:2", "2:1:", "a:b:", "1:2:x", "1:2:3,"] {
            assert_eq!(Snapshot::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn wake_ups_are_checked_against_what_was_read() {
        let mut v = Verifier::new();
        let snap = Snapshot::parse("100:110:105").unwrap_or_else(|| panic!("parses"));
        for xid in [101, 101, 102, 5, 105, u64::MAX] {
            assert!(v.woken(xid));
        }
        // 101 was read: genuine once, then a replay; 102 and 5 are visible but wrote
        // nothing; 105 is in progress (may still come); u64::MAX was never assigned.
        assert_eq!(v.after_read(&snap, [101]), Verdicts { genuine: 1, forged: 4 });
        assert!(v.waiting());
        let later = Snapshot::parse("106:110:").unwrap_or_else(|| panic!("parses"));
        assert_eq!(v.after_read(&later, [105]), Verdicts { genuine: 1, forged: 0 });
        assert!(v.woken(105));
        assert_eq!(
            v.after_read(&later, []),
            Verdicts { genuine: 0, forged: 1 },
            "a second wake-up is a replay"
        );
    }

    #[test]
    fn pruning_waits_for_the_retention() {
        let mut p = Pruning::new(Duration::ZERO);
        assert_eq!(p.due(), None);
        p.mark(&Snapshot { xmin: 50, xmax: 60, xip: vec![] });
        assert_eq!(p.due(), Some(50));
        p.pruned(50);
        p.mark(&Snapshot { xmin: 50, xmax: 60, xip: vec![] });
        assert_eq!(p.due(), None, "nothing new to prune");
        let mut p = Pruning::new(Duration::from_secs(3600));
        p.mark(&Snapshot { xmin: 50, xmax: 60, xip: vec![] });
        assert_eq!(p.due(), None, "too recent");
    }
}
