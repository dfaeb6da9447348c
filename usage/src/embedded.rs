//! The embedded store: a SQLite file, for a single machine with no server to run
//! (`agora up`'s default).
//!
//! The gateway's events are kept in one B-tree ordered by time, keyed by
//! `(time_ms, event_id)`: a gateway makes each event once and its record never
//! changes between deliveries (it is written once to the spill log and re-read
//! from there), so a batch written twice leaves one row per event, and writing an
//! event costs one insert near the tree's right edge — no secondary index to
//! keep. Readings scan the time range they ask for and filter by scope there (for
//! a store this size; ClickHouse is the store for volume).
//!
//! The runtime's reports of a config's usage carry the runtime's id and arrive
//! anew each time they are sent, so they have a table keyed on `event_id`; token
//! reports of one request are keyed by the request they describe.

use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agora_config::usage::{RunFailure, UsageRecord};
use anyhow::Context as _;
use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row as _, SqlitePool};

use crate::{Aggregate, Scope, TimeRange, UsageStore, BILLABLE_STATUSES, ERROR_STATUSES};

/// An event's columns, as both event tables declare them.
macro_rules! event_columns_ddl {
    () => {
        "event_id TEXT NOT NULL, time_ms INTEGER NOT NULL, tenant TEXT, config TEXT, \
         key_id TEXT, agent TEXT, route TEXT NOT NULL, status TEXT NOT NULL, \
         http_status INTEGER NOT NULL, latency_us INTEGER NOT NULL, upstream_latency_us INTEGER, \
         bytes_in INTEGER NOT NULL, bytes_out INTEGER NOT NULL, input_tokens INTEGER NOT NULL, \
         output_tokens INTEGER NOT NULL, token_source TEXT NOT NULL"
    };
}

/// The event columns' names, in the order of both tables and both layouts.
macro_rules! event_columns {
    () => {
        "event_id, time_ms, tenant, config, key_id, agent, route, status, http_status, \
         latency_us, upstream_latency_us, bytes_in, bytes_out, input_tokens, output_tokens, \
         token_source"
    };
}

const SCHEMA: &[&str] = &[
    concat!(
        "CREATE TABLE IF NOT EXISTS usage_events (",
        event_columns_ddl!(),
        ", PRIMARY KEY (time_ms, event_id)) WITHOUT ROWID"
    ),
    // The runtime's own reports of a config's usage: their `event_id` is the
    // runtime's and a report sent twice arrives at two times, so they are keyed
    // on `event_id` alone (few, beside the gateway's events).
    concat!(
        "CREATE TABLE IF NOT EXISTS usage_reported_events (",
        event_columns_ddl!(),
        ", PRIMARY KEY (event_id))"
    ),
    "CREATE TABLE IF NOT EXISTS usage_reports (
        request_id TEXT PRIMARY KEY,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS usage_failures (
        event_id TEXT PRIMARY KEY,
        time_ms INTEGER NOT NULL,
        agent TEXT NOT NULL,
        config TEXT NOT NULL,
        code TEXT NOT NULL,
        detail TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS usage_failures_agent ON usage_failures (agent, time_ms)",
];

const EVENT_COLUMNS: &str = event_columns!();

/// Files written before the time-ordered layout keyed events by `event_id` in a
/// rowid table with an index per scope: their events move to the new table, in
/// one transaction, the first time the file is opened.
async fn move_to_time_ordered_events(pool: &SqlitePool) -> anyhow::Result<()> {
    let sql: Option<String> = sqlx::query_scalar(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'usage_events'",
    )
    .fetch_optional(pool)
    .await?;
    let Some(sql) = sql else {
        return Ok(());
    };
    if sql.to_ascii_uppercase().contains("WITHOUT ROWID") {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    sqlx::query("ALTER TABLE usage_events RENAME TO usage_events_by_id")
        .execute(&mut *tx)
        .await?;
    for index in [
        "usage_events_config",
        "usage_events_agent",
        "usage_events_tenant",
    ] {
        sqlx::query(&format!("DROP INDEX IF EXISTS {index}"))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(SCHEMA[0]).execute(&mut *tx).await?;
    sqlx::query(SCHEMA[1]).execute(&mut *tx).await?;
    let mut moved = 0;
    for (table, condition) in [
        ("usage_events", "route <> ?"),
        ("usage_reported_events", "route = ?"),
    ] {
        moved += sqlx::query(&format!(
            "INSERT OR IGNORE INTO {table} ({EVENT_COLUMNS}) \
             SELECT {EVENT_COLUMNS} FROM usage_events_by_id WHERE {condition}"
        ))
        .bind(crate::REPORT_ROUTE)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    sqlx::query("DROP TABLE usage_events_by_id")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(
        events = moved,
        "usage store: events moved to the time-ordered table"
    );
    Ok(())
}

pub struct EmbeddedStore {
    /// Readers (and the schema).
    pool: SqlitePool,
    /// The one connection that writes, used on a blocking thread: its statements
    /// are prepared once and each row's values are bound in place, so a batch
    /// costs no SQL text and no round trip per row.
    writer: Arc<Mutex<rusqlite::Connection>>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store's file.
    pub async fn open(path: &Path) -> anyhow::Result<EmbeddedStore> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .with_context(|| format!("opening the usage store {}", path.display()))?;
        move_to_time_ordered_events(&pool)
            .await
            .with_context(|| format!("upgrading the usage store {}", path.display()))?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        let writer = open_writer(path)
            .with_context(|| format!("opening the usage store {} for writing", path.display()))?;
        Ok(EmbeddedStore {
            pool,
            writer: Arc::new(Mutex::new(writer)),
        })
    }
}

const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The writer's connection: WAL (set by the pool already), every commit synced
/// (the spill log forgets a batch once the store has it).
fn open_writer(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.set_prepared_statement_cache_capacity(8);
    Ok(conn)
}

/// SQLite integers are signed: counts past `i64::MAX` are clamped, not wrapped.
fn sql_int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The statements the writer runs, prepared once per connection.
const INSERT_EVENT: &str = concat!(
    "INSERT OR IGNORE INTO usage_events (",
    event_columns!(),
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
);
const INSERT_REPORTED_EVENT: &str = concat!(
    "INSERT OR IGNORE INTO usage_reported_events (",
    event_columns!(),
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
);
const INSERT_FAILURE: &str = "INSERT OR IGNORE INTO usage_failures \
     (event_id, time_ms, agent, config, code, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const UPSERT_REPORT: &str = "INSERT INTO usage_reports (request_id, input_tokens, output_tokens) \
     VALUES (?1, ?2, ?3) ON CONFLICT (request_id) DO UPDATE SET \
     input_tokens = MAX(input_tokens, excluded.input_tokens), \
     output_tokens = MAX(output_tokens, excluded.output_tokens)";

/// A UUID as the store keeps it (lower-case hyphenated text), formatted on the stack.
struct IdText([u8; uuid::fmt::Hyphenated::LENGTH]);

impl IdText {
    fn new(id: &uuid::Uuid) -> IdText {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        id.hyphenated().encode_lower(&mut buf);
        IdText(buf)
    }

    fn as_str(&self) -> &str {
        // Hyphenated hex digits are ASCII.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

fn id_text(id: Option<uuid::Uuid>) -> Option<IdText> {
    id.as_ref().map(IdText::new)
}

/// Writes one batch in one transaction on the writer connection.
fn write_batch(conn: &mut rusqlite::Connection, batch: &[UsageRecord]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut events = tx.prepare_cached(INSERT_EVENT)?;
        let mut reported = tx.prepare_cached(INSERT_REPORTED_EVENT)?;
        let mut failures = tx.prepare_cached(INSERT_FAILURE)?;
        let mut reports = tx.prepare_cached(UPSERT_REPORT)?;
        for record in batch {
            match record {
                UsageRecord::Event(e) => {
                    let (id, tenant, config, key, agent) = (
                        IdText::new(&e.event_id),
                        id_text(e.tenant),
                        id_text(e.config),
                        id_text(e.key_id),
                        id_text(e.agent),
                    );
                    let statement = if e.route == crate::REPORT_ROUTE {
                        &mut reported
                    } else {
                        &mut events
                    };
                    statement.execute(rusqlite::params![
                        id.as_str(),
                        e.time_ms,
                        tenant.as_ref().map(IdText::as_str),
                        config.as_ref().map(IdText::as_str),
                        key.as_ref().map(IdText::as_str),
                        agent.as_ref().map(IdText::as_str),
                        e.route.as_str(),
                        e.status.as_str(),
                        i64::from(e.http_status),
                        sql_int(e.latency_us),
                        e.upstream_latency_us.map(sql_int),
                        sql_int(e.bytes_in),
                        sql_int(e.bytes_out),
                        sql_int(e.input_tokens.unwrap_or(0)),
                        sql_int(e.output_tokens.unwrap_or(0)),
                        e.token_source.as_str(),
                    ])?;
                }
                UsageRecord::Failure(f) => {
                    failures.execute(rusqlite::params![
                        IdText::new(&f.event_id).as_str(),
                        f.time_ms,
                        IdText::new(&f.agent).as_str(),
                        IdText::new(&f.config).as_str(),
                        f.code.as_str(),
                        f.detail.as_str(),
                    ])?;
                }
                UsageRecord::Report(r) => {
                    reports.execute(rusqlite::params![
                        IdText::new(&r.request_id).as_str(),
                        sql_int(r.input_tokens),
                        sql_int(r.output_tokens),
                    ])?;
                }
            }
        }
    }
    tx.commit()
}

#[async_trait]
impl UsageStore for EmbeddedStore {
    async fn insert(&self, batch: &[UsageRecord]) -> anyhow::Result<()> {
        self.insert_owned(batch.to_vec()).await
    }

    async fn insert_owned(&self, batch: Vec<UsageRecord>) -> anyhow::Result<()> {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock leaves no transaction open (it rolls
            // back when dropped), so a poisoned lock is still usable.
            let mut conn = writer.lock().unwrap_or_else(|p| p.into_inner());
            write_batch(&mut conn, &batch)
        })
        .await
        .context("writing to the embedded store")?
        .context("writing to the embedded store")
    }

    async fn aggregate(
        &self,
        scope: Scope,
        range: TimeRange,
        bucket_ms: i64,
    ) -> anyhow::Result<Vec<Aggregate>> {
        let column = scope.column();
        // Sums go through TOTAL (a float, exact far beyond any real count) and
        // are clamped, so no row can make the sum overflow and the read fail.
        let sql = format!(
            "WITH m AS (
                SELECT (e.time_ms / ?1) * ?1 AS b, e.status AS s, e.latency_us AS l, e.tenant AS tn,
                       e.token_source AS src, r.request_id IS NOT NULL AS has_r,
                       e.route = ?3 AS req,
                       CASE WHEN e.token_source = 'runtime' OR r.request_id IS NULL
                            THEN e.input_tokens ELSE r.input_tokens END AS i,
                       CASE WHEN e.token_source = 'runtime' OR r.request_id IS NULL
                            THEN e.output_tokens ELSE r.output_tokens END AS o
                FROM (SELECT {EVENT_COLUMNS} FROM usage_events
                      UNION ALL SELECT {EVENT_COLUMNS} FROM usage_reported_events) e
                LEFT JOIN usage_reports r ON r.request_id = e.event_id
                WHERE e.{column} = ?2 AND e.time_ms >= ?4 AND e.time_ms < ?5
                  AND (e.route = ?3 OR (e.route = ?6 AND e.token_source = 'reported'))
             ),
             ranked AS (
                SELECT b, l, ROW_NUMBER() OVER (PARTITION BY b ORDER BY l) AS rn,
                       COUNT(*) OVER (PARTITION BY b) AS n
                FROM m WHERE s = 'ok' AND req
             ),
             pct AS (
                SELECT b,
                       MIN(CASE WHEN rn >= (n * 50 + 99) / 100 THEN l END) AS p50,
                       MIN(CASE WHEN rn >= (n * 95 + 99) / 100 THEN l END) AS p95
                FROM ranked GROUP BY b
             )
             SELECT agg.*, COALESCE(pct.p50, 0) AS p50, COALESCE(pct.p95, 0) AS p95
             FROM (
                SELECT b, SUM(req) AS requests,
                       SUM(req AND s IN {ERROR_STATUSES}) AS errors,
                       SUM(req AND s IN {BILLABLE_STATUSES}) AS billable,
                       CAST(MIN(TOTAL(i), 9223372036854775807.0) AS INTEGER) AS input_tokens,
                       CAST(MIN(TOTAL(o), 9223372036854775807.0) AS INTEGER) AS output_tokens,
                       SUM(req AND src = 'estimated' AND NOT has_r) AS estimated,
                       SUM(req AND s = 'rate_limited') AS rate_limited,
                       SUM(req AND s = 'unauthorized') AS unauthorized,
                       SUM(req AND s = 'client_error') AS client_errors,
                       SUM(req AND s = 'upstream_error') AS upstream_errors,
                       SUM(req AND s = 'cancelled') AS cancelled,
                       COUNT(DISTINCT CASE WHEN req THEN tn END) AS buyers
                FROM m GROUP BY b
             ) agg LEFT JOIN pct ON pct.b = agg.b
             ORDER BY agg.b"
        );
        let rows = sqlx::query(&sql)
            .bind(bucket_ms)
            .bind(scope.id().to_string())
            .bind(crate::METERED_ROUTE)
            .bind(range.from_ms)
            .bind(range.to_ms)
            .bind(crate::REPORT_ROUTE)
            .fetch_all(&self.pool)
            .await
            .context("reading usage from the embedded store")?;
        rows.iter()
            .map(|r| {
                let n = |name: &str| -> anyhow::Result<u64> {
                    Ok(r.try_get::<Option<i64>, _>(name)?.unwrap_or(0).max(0) as u64)
                };
                Ok(Aggregate {
                    start_ms: r.try_get("b")?,
                    requests: n("requests")?,
                    errors: n("errors")?,
                    billable_requests: n("billable")?,
                    input_tokens: n("input_tokens")?,
                    output_tokens: n("output_tokens")?,
                    estimated_requests: n("estimated")?,
                    rate_limited: n("rate_limited")?,
                    unauthorized: n("unauthorized")?,
                    client_errors: n("client_errors")?,
                    upstream_errors: n("upstream_errors")?,
                    cancelled: n("cancelled")?,
                    buyers: n("buyers")?,
                    latency_p50_us: n("p50")?,
                    latency_p95_us: n("p95")?,
                })
            })
            .collect()
    }

    async fn last_failure(&self, agent: uuid::Uuid) -> anyhow::Result<Option<RunFailure>> {
        let row = sqlx::query(
            "SELECT event_id, time_ms, config, code, detail FROM usage_failures \
             WHERE agent = ? ORDER BY time_ms DESC, event_id DESC LIMIT 1",
        )
        .bind(agent.to_string())
        .fetch_optional(&self.pool)
        .await
        .context("reading failures from the embedded store")?;
        row.map(|r| {
            Ok(RunFailure {
                event_id: r.try_get::<String, _>("event_id")?.parse()?,
                time_ms: r.try_get("time_ms")?,
                agent,
                config: r.try_get::<String, _>("config")?.parse()?,
                code: r.try_get("code")?,
                detail: r.try_get("detail")?,
            })
        })
        .transpose()
    }

    async fn ping(&self) -> anyhow::Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::event;
    use agora_config::usage::TokenReport;
    use uuid::Uuid;

    fn all() -> TimeRange {
        TimeRange {
            from_ms: 0,
            to_ms: i64::MAX / 2,
        }
    }

    #[tokio::test]
    async fn overlapping_batches_and_replays_count_each_event_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("usage.db"))
            .await
            .unwrap();
        let config = Uuid::from_u128(1);
        let events: Vec<UsageRecord> = (0..10)
            .map(|i| {
                UsageRecord::Event(Box::new(event(
                    config,
                    1_000 + i,
                    100 + i as u64,
                    Some((2, 3)),
                )))
            })
            .collect();
        store.insert(&events[..6]).await.unwrap();
        // A replay of the whole batch after a crash, from another start.
        store.insert_owned(events.clone()).await.unwrap();
        store.insert(&events[4..]).await.unwrap();
        let totals = crate::totals(&store, Scope::Config(config), all())
            .await
            .unwrap();
        assert_eq!(totals.requests, 10);
        assert_eq!((totals.input_tokens, totals.output_tokens), (20, 30));
        // Latencies 100..=109: nearest-rank p50 is the 5th.
        assert_eq!(totals.latency_p50_us, 104);
        // An event without counts, then reports of it: the larger counts win, once.
        let bare = UsageRecord::Event(Box::new(event(config, 2_000, 50, None)));
        let report = |i, o| {
            UsageRecord::Report(TokenReport {
                request_id: bare.event_id(),
                input_tokens: i,
                output_tokens: o,
            })
        };
        store
            .insert(&[bare.clone(), report(9, 1), report(4, 8)])
            .await
            .unwrap();
        store.insert(&[report(9, 1), bare.clone()]).await.unwrap();
        let totals = crate::totals(&store, Scope::Config(config), all())
            .await
            .unwrap();
        assert_eq!(totals.requests, 11);
        assert_eq!((totals.input_tokens, totals.output_tokens), (29, 38));
        // The runtime's report of the config's usage, sent twice: each arrives at
        // its own time, under the runtime's one id. Counted once, and no request.
        let mut reported = event(config, 3_000, 0, Some((100, 10)));
        reported.route = crate::REPORT_ROUTE.into();
        reported.token_source = agora_config::usage::TokenSource::Reported;
        let mut again = reported.clone();
        again.time_ms = 3_500;
        store
            .insert(&[UsageRecord::Event(Box::new(reported))])
            .await
            .unwrap();
        store
            .insert(&[UsageRecord::Event(Box::new(again))])
            .await
            .unwrap();
        let totals = crate::totals(&store, Scope::Config(config), all())
            .await
            .unwrap();
        assert_eq!(totals.requests, 11);
        assert_eq!((totals.input_tokens, totals.output_tokens), (129, 48));
    }

    #[tokio::test]
    async fn a_file_of_the_earlier_layout_keeps_its_events_and_moves_to_the_time_ordered_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        let config = Uuid::from_u128(1);
        let events: Vec<UsageRecord> = (0..5)
            .map(|i| UsageRecord::Event(Box::new(event(config, 1_000 + i, 10, Some((1, 1))))))
            .collect();
        {
            // The earlier layout, written as the earlier store wrote it.
            let pool = SqlitePool::connect_with(
                SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true),
            )
            .await
            .unwrap();
            sqlx::query(
                "CREATE TABLE usage_events (event_id TEXT PRIMARY KEY, time_ms INTEGER NOT NULL, \
                 tenant TEXT, config TEXT, key_id TEXT, agent TEXT, route TEXT NOT NULL, \
                 status TEXT NOT NULL, http_status INTEGER NOT NULL, latency_us INTEGER NOT NULL, \
                 upstream_latency_us INTEGER, bytes_in INTEGER NOT NULL, bytes_out INTEGER NOT NULL, \
                 input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, \
                 token_source TEXT NOT NULL)",
            )
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query("CREATE INDEX usage_events_config ON usage_events (config, time_ms)")
                .execute(&pool)
                .await
                .unwrap();
            for record in &events {
                let UsageRecord::Event(e) = record else {
                    unreachable!()
                };
                sqlx::query(&format!(
                    "INSERT INTO usage_events ({EVENT_COLUMNS}) \
                     VALUES (?, ?, NULL, ?, NULL, NULL, ?, 'ok', 200, 10, NULL, 1, 1, 1, 1, 'runtime')"
                ))
                .bind(e.event_id.to_string())
                .bind(e.time_ms)
                .bind(config.to_string())
                .bind(crate::METERED_ROUTE)
                .execute(&pool)
                .await
                .unwrap();
            }
            pool.close().await;
        }
        let store = EmbeddedStore::open(&path).await.unwrap();
        let layout: String = sqlx::query_scalar(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'usage_events'",
        )
        .fetch_one(&store.pool)
        .await
        .unwrap();
        assert!(layout.contains("WITHOUT ROWID"), "{layout}");
        let totals = crate::totals(&store, Scope::Config(config), all())
            .await
            .unwrap();
        assert_eq!((totals.requests, totals.input_tokens), (5, 5));
        // The same events delivered again after the move still count once.
        store.insert(&events).await.unwrap();
        let totals = crate::totals(&store, Scope::Config(config), all())
            .await
            .unwrap();
        assert_eq!((totals.requests, totals.input_tokens), (5, 5));
        drop(store);
        // Opening it again changes nothing.
        let store = EmbeddedStore::open(&path).await.unwrap();
        let totals = crate::totals(&store, Scope::Config(config), all())
            .await
            .unwrap();
        assert_eq!(totals.requests, 5);
    }
}
