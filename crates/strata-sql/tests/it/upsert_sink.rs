//! The write-behind `UpsertSink` on real Postgres and SQLite: batches, the sequence
//! guard, poison isolation, transient failures, identifiers, value mapping, and a
//! cache flushing through it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use strata::write_behind::SinkErrorKind;
use strata::{Cache, InProcessQueue, InProcessTier, Sink, SinkError, SinkItem, WriteBehindConfig};
use strata_sql::{ErrorKind, UpsertSink, UpsertTable};

use crate::support::{postgres, sqlite};

const PG_DRAFTS: &str = "
CREATE SCHEMA billing;
CREATE TABLE billing.drafts (id BIGINT PRIMARY KEY, body TEXT NOT NULL CHECK (body <> 'poison'), seq BIGINT NOT NULL);
CREATE TABLE drafts (id BIGINT PRIMARY KEY, body TEXT NOT NULL CHECK (body <> 'poison'), seq BIGINT NOT NULL);
";

const SQLITE_DRAFTS: &str = "CREATE TABLE drafts (id INTEGER PRIMARY KEY, body TEXT NOT NULL CHECK (body <> 'poison'), seq INTEGER NOT NULL);";

type Row = (i64, String, i64);

fn drafts(table: &str) -> UpsertTable {
    UpsertTable::new(table, "id", "body", "seq").unwrap()
}

fn item(key: i64, value: &str, seq: u64) -> SinkItem<i64, String> {
    SinkItem { key, value: value.to_owned(), seq }
}

async fn pg_rows(pool: &sqlx::PgPool, table: &str) -> Vec<Row> {
    let sql = format!("SELECT id, body, seq FROM {table} ORDER BY id");
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await.unwrap()
}

async fn sqlite_rows(pool: &sqlx::SqlitePool) -> Vec<Row> {
    sqlx::query_as("SELECT id, body, seq FROM drafts ORDER BY id").fetch_all(pool).await.unwrap()
}

fn assert_all_ok(outcomes: &[Result<(), SinkError>]) {
    for (i, o) in outcomes.iter().enumerate() {
        assert!(o.is_ok(), "item {i}: {o:?}");
    }
}

fn expected(rows: &[(i64, &str, i64)]) -> Vec<Row> {
    rows.iter().map(|&(k, v, s)| (k, v.to_owned(), s)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_upsert_writes_every_item_of_a_batch() {
    let db = postgres().await;
    sqlx::raw_sql(PG_DRAFTS).execute(&db.pool).await.unwrap();
    // Schema-qualified, to check the statement's `AS stored` alias there too.
    let sink = UpsertSink::postgres(db.pool.clone(), drafts("billing.drafts"));
    let outcomes = sink.write_batch(&[item(1, "one", 10), item(2, "two", 11), item(3, "three", 12)]).await;
    assert_all_ok(&outcomes.unwrap());
    // A second batch updates two rows and adds one.
    let outcomes =
        sink.write_batch(&[item(2, "two v2", 20), item(3, "three v2", 21), item(4, "four", 22)]).await;
    assert_all_ok(&outcomes.unwrap());
    assert_eq!(
        pg_rows(&db.observer, "billing.drafts").await,
        expected(&[(1, "one", 10), (2, "two v2", 20), (3, "three v2", 21), (4, "four", 22)])
    );
}

#[tokio::test]
async fn sqlite_upsert_writes_every_item_of_a_batch() {
    let db = sqlite().await;
    sqlx::raw_sql(SQLITE_DRAFTS).execute(&db.pool).await.unwrap();
    let sink = UpsertSink::sqlite(db.pool.clone(), drafts("main.drafts"));
    assert_all_ok(&sink.write_batch(&[item(1, "one", 10), item(2, "two", 11)]).await.unwrap());
    assert_all_ok(&sink.write_batch(&[item(2, "two v2", 20), item(3, "three", 21)]).await.unwrap());
    assert_eq!(
        sqlite_rows(&db.observer).await,
        expected(&[(1, "one", 10), (2, "two v2", 20), (3, "three", 21)])
    );
}

/// More rows than SQLite's bind limit allows in one statement: split, all written.
#[tokio::test]
async fn sqlite_large_batch_is_split_under_the_bind_limit() {
    let db = sqlite().await;
    sqlx::raw_sql(SQLITE_DRAFTS).execute(&db.pool).await.unwrap();
    let sink = UpsertSink::sqlite(db.pool.clone(), drafts("drafts"));
    let items: Vec<_> = (0..1000).map(|k| item(k, &format!("v{k}"), 5 + k as u64)).collect();
    assert_all_ok(&sink.write_batch(&items).await.unwrap());
    let rows = sqlite_rows(&db.observer).await;
    assert_eq!(rows.len(), 1000);
    assert_eq!(rows[999], (999, "v999".to_owned(), 1004));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sequence_guard_keeps_the_newer_row() {
    let db = postgres().await;
    sqlx::raw_sql(PG_DRAFTS).execute(&db.pool).await.unwrap();
    let sink = UpsertSink::postgres(db.pool.clone(), drafts("drafts"));
    assert_all_ok(&sink.write_batch(&[item(1, "newer", 10)]).await.unwrap());
    // A late or replayed batch: older for key 1 (refused, yet a success), new for key 2.
    assert_all_ok(&sink.write_batch(&[item(1, "older", 5), item(2, "two", 6)]).await.unwrap());
    // The same sequence again changes nothing either.
    assert_all_ok(&sink.write_batch(&[item(1, "same seq", 10)]).await.unwrap());
    assert_eq!(pg_rows(&db.observer, "drafts").await, expected(&[(1, "newer", 10), (2, "two", 6)]));
}

#[tokio::test]
async fn sqlite_sequence_guard_keeps_the_newer_row() {
    let db = sqlite().await;
    sqlx::raw_sql(SQLITE_DRAFTS).execute(&db.pool).await.unwrap();
    let sink = UpsertSink::sqlite(db.pool.clone(), drafts("drafts"));
    assert_all_ok(&sink.write_batch(&[item(1, "newer", 10)]).await.unwrap());
    assert_all_ok(&sink.write_batch(&[item(1, "older", 5), item(2, "two", 6)]).await.unwrap());
    assert_eq!(sqlite_rows(&db.observer).await, expected(&[(1, "newer", 10), (2, "two", 6)]));
}

/// Checks a batch of five with a poison row in the middle: only it fails, permanently.
fn assert_only_poison_failed(outcomes: &[Result<(), SinkError>]) {
    assert_eq!(outcomes.len(), 5);
    for (i, o) in outcomes.iter().enumerate() {
        if i == 2 {
            let e = o.as_ref().expect_err("the poison row is refused");
            assert!(e.is_permanent(), "{e}");
            assert!(e.to_string().contains("drafts"), "the message names the table: {e}");
        } else {
            assert!(o.is_ok(), "item {i}: {o:?}");
        }
    }
}

fn poison_batch() -> Vec<SinkItem<i64, String>> {
    vec![item(1, "a", 10), item(2, "b", 10), item(3, "poison", 10), item(4, "d", 10), item(5, "e", 10)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_poison_row_alone_is_refused_permanently() {
    let db = postgres().await;
    sqlx::raw_sql(PG_DRAFTS).execute(&db.pool).await.unwrap();
    let sink = UpsertSink::postgres(db.pool.clone(), drafts("drafts"));
    assert_only_poison_failed(&sink.write_batch(&poison_batch()).await.unwrap());
    assert_eq!(
        pg_rows(&db.observer, "drafts").await,
        expected(&[(1, "a", 10), (2, "b", 10), (4, "d", 10), (5, "e", 10)])
    );
    // A missing table (42P01) is permanent for every row.
    let sink = UpsertSink::postgres(db.pool.clone(), drafts("no_such_table"));
    let outcomes = sink.write_batch(&[item(1, "a", 1), item(2, "b", 1)]).await.unwrap();
    assert!(outcomes.iter().all(|o| o.as_ref().is_err_and(SinkError::is_permanent)), "{outcomes:?}");
}

#[tokio::test]
async fn sqlite_poison_row_alone_is_refused_permanently() {
    let db = sqlite().await;
    sqlx::raw_sql(SQLITE_DRAFTS).execute(&db.pool).await.unwrap();
    let sink = UpsertSink::sqlite(db.pool.clone(), drafts("drafts"));
    assert_only_poison_failed(&sink.write_batch(&poison_batch()).await.unwrap());
    assert_eq!(
        sqlite_rows(&db.observer).await,
        expected(&[(1, "a", 10), (2, "b", 10), (4, "d", 10), (5, "e", 10)])
    );
}

/// A sequence above `i64::MAX` cannot be stored: that item alone fails, permanently.
#[tokio::test]
async fn sqlite_seq_beyond_bigint_is_refused_permanently() {
    let db = sqlite().await;
    sqlx::raw_sql(SQLITE_DRAFTS).execute(&db.pool).await.unwrap();
    let sink = UpsertSink::sqlite(db.pool.clone(), drafts("drafts"));
    let outcomes = sink.write_batch(&[item(1, "a", 1), item(2, "b", u64::MAX)]).await.unwrap();
    assert!(outcomes[0].is_ok());
    let e = outcomes[1].as_ref().expect_err("seq out of range");
    assert!(e.is_permanent() && e.to_string().contains("BIGINT"), "{e}");
    assert_eq!(sqlite_rows(&db.observer).await, expected(&[(1, "a", 1)]));
}

#[tokio::test]
async fn postgres_unreachable_is_a_transient_failure() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy(&format!("postgres://postgres@127.0.0.1:{port}/strata"))
        .unwrap();
    let sink = UpsertSink::postgres(pool, drafts("drafts"));
    let err = sink.write_batch(&[item(1, "a", 1), item(2, "b", 1)]).await.expect_err("unreachable");
    assert_eq!(err.kind(), SinkErrorKind::Transient, "{err}");
}

/// Another connection holds SQLite's write lock and the pool waits for none: BUSY is
/// transient.
#[tokio::test]
async fn sqlite_busy_is_a_transient_failure() {
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
    let dir = tempfile::tempdir().unwrap();
    let opts = SqliteConnectOptions::new()
        .filename(dir.path().join("busy.db"))
        .create_if_missing(true)
        .busy_timeout(Duration::ZERO);
    let holder = SqlitePoolOptions::new().max_connections(1).connect_with(opts.clone()).await.unwrap();
    sqlx::raw_sql(SQLITE_DRAFTS).execute(&holder).await.unwrap();
    let pool = SqlitePoolOptions::new().max_connections(1).connect_with(opts).await.unwrap();
    let mut lock = holder.acquire().await.unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut *lock).await.unwrap();
    let sink = UpsertSink::sqlite(pool, drafts("drafts"));
    let err = sink.write_batch(&[item(1, "a", 1)]).await.expect_err("busy");
    assert_eq!(err.kind(), SinkErrorKind::Transient, "{err}");
    sqlx::raw_sql("ROLLBACK").execute(&mut *lock).await.unwrap();
    assert_all_ok(&sink.write_batch(&[item(1, "a", 1)]).await.unwrap());
}

#[test]
fn bad_identifiers_are_refused_at_construction() {
    for (table, key, value, seq) in [
        ("drafts; DROP TABLE drafts", "id", "body", "seq"),
        ("drafts", "id\"", "body", "seq"),
        ("drafts", "id", "body text", "seq"),
        ("drafts", "id", "body", ""),
        ("a.b.drafts", "id", "body", "seq"),
        ("9drafts", "id", "body", "seq"),
        ("drafts", "id", "id", "seq"),
    ] {
        let err = UpsertTable::new(table, key, value, seq).expect_err("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    }
    let t = UpsertTable::new("billing.Drafts_2", "_id", "body", "seq").unwrap();
    assert_eq!(
        (t.table(), t.key_column(), t.value_column(), t.seq_column()),
        ("billing.Drafts_2", "_id", "body", "seq")
    );
}

/// A struct value stored as JSON text through a mapping; a mapping that fails refuses
/// its item alone, permanently.
#[tokio::test]
async fn sqlite_mapped_values_are_stored_as_json() {
    #[derive(serde::Serialize)]
    struct Draft {
        title: String,
    }
    let db = sqlite().await;
    sqlx::raw_sql(SQLITE_DRAFTS).execute(&db.pool).await.unwrap();
    let sink = UpsertSink::with_mapping(db.pool.clone(), drafts("drafts"), |d: &Draft| {
        if d.title.is_empty() {
            return Err(strata::BoxError::from("a draft needs a title"));
        }
        serde_json::to_string(d).map_err(Into::into)
    });
    let draft = |key: i64, title: &str| SinkItem { key, value: Draft { title: title.to_owned() }, seq: 7 };
    let outcomes = sink.write_batch(&[draft(1, "hello"), draft(2, ""), draft(3, "bye")]).await.unwrap();
    assert!(outcomes[0].is_ok() && outcomes[2].is_ok(), "{outcomes:?}");
    let e = outcomes[1].as_ref().expect_err("mapping failed");
    assert!(e.is_permanent() && e.to_string().contains("needs a title"), "{e}");
    assert_eq!(
        sqlite_rows(&db.observer).await,
        expected(&[(1, r#"{"title":"hello"}"#, 7), (3, r#"{"title":"bye"}"#, 7)])
    );
}

/// Counts the sink's calls and items on the way through.
struct Counting<S> {
    inner: S,
    calls: Arc<AtomicU64>,
    items: Arc<AtomicU64>,
}

#[async_trait]
impl<S: Sink<i64, String>> Sink<i64, String> for Counting<S> {
    async fn write_batch(
        &self,
        items: &[SinkItem<i64, String>],
    ) -> Result<Vec<Result<(), SinkError>>, SinkError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.items.fetch_add(items.len() as u64, Ordering::SeqCst);
        self.inner.write_batch(items).await
    }
}

/// 100 saves of one key through a cache's write-behind end in one row holding the last
/// save, with its sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_write_behind_end_to_end() {
    let db = postgres().await;
    sqlx::raw_sql(PG_DRAFTS).execute(&db.pool).await.unwrap();
    let (calls, items) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sink = Counting {
        inner: UpsertSink::postgres(db.pool.clone(), drafts("drafts")),
        calls: calls.clone(),
        items: items.clone(),
    };
    let cache: Cache<i64, String> = Cache::builder("drafts")
        .tier(Arc::new(InProcessTier::new()))
        .write_behind(
            WriteBehindConfig::new(Arc::new(InProcessQueue::new()), sink)
                .flush_delay(Duration::ZERO)
                .poll_interval(Duration::from_millis(10)),
        )
        .build()
        .unwrap();
    cache.ready().await;
    let wb = cache.write_behind().unwrap();
    let mut last_seq = 0;
    for i in 0..100 {
        last_seq = wb.save(42, format!("draft {i}")).await.unwrap();
    }
    assert_eq!(wb.flush_all().await.unwrap(), 0, "nothing left waiting");
    let rows = pg_rows(&db.observer, "drafts").await;
    assert_eq!(rows, vec![(42, "draft 99".to_owned(), i64::try_from(last_seq).unwrap())]);
    let (calls, items) = (calls.load(Ordering::SeqCst), items.load(Ordering::SeqCst));
    // The flusher runs while the saves arrive (no flush delay), so a few writes may
    // happen; coalescing keeps them far below one per save.
    assert!((1..=100).contains(&calls) && items == calls, "{calls} calls, {items} items");
    let st = wb.stats();
    assert_eq!(st.saves, 100);
    assert_eq!(st.db_writes, items);
    eprintln!("100 saves: {calls} sink calls, {} coalesced", st.coalesced);
    cache.shutdown().await;
}
