//! The embedded store: a SQLite file, for a single machine with no server to run
//! (`agora up`'s default). `event_id` is the primary key, so a batch written twice
//! leaves one row per event; reports are keyed by the request they describe.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use agora_config::usage::{split, RunFailure, UsageRecord};
use anyhow::Context as _;
use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row as _, Sqlite, SqlitePool};

use crate::{Aggregate, Scope, TimeRange, UsageStore, BILLABLE_STATUSES, ERROR_STATUSES};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS usage_events (
        event_id TEXT PRIMARY KEY,
        time_ms INTEGER NOT NULL,
        tenant TEXT,
        config TEXT,
        key_id TEXT,
        agent TEXT,
        route TEXT NOT NULL,
        status TEXT NOT NULL,
        http_status INTEGER NOT NULL,
        latency_us INTEGER NOT NULL,
        upstream_latency_us INTEGER,
        bytes_in INTEGER NOT NULL,
        bytes_out INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        token_source TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS usage_events_config ON usage_events (config, time_ms)",
    "CREATE INDEX IF NOT EXISTS usage_events_agent ON usage_events (agent, time_ms)",
    "CREATE INDEX IF NOT EXISTS usage_events_tenant ON usage_events (tenant, time_ms)",
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

/// Rows per INSERT statement (16 values each, under SQLite's variable limit).
const ROWS_PER_STATEMENT: usize = 500;

pub struct EmbeddedStore {
    pool: SqlitePool,
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
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .with_context(|| format!("opening the usage store {}", path.display()))?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        Ok(EmbeddedStore { pool })
    }
}

/// SQLite integers are signed: counts past `i64::MAX` are clamped, not wrapped.
fn sql_int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn uuid_text(id: Option<uuid::Uuid>) -> Option<String> {
    id.map(|u| u.to_string())
}

#[async_trait]
impl UsageStore for EmbeddedStore {
    async fn insert(&self, batch: &[UsageRecord]) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        let split = split(batch);
        for chunk in split.events.chunks(ROWS_PER_STATEMENT) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT OR IGNORE INTO usage_events (event_id, time_ms, tenant, config, key_id, \
                 agent, route, status, http_status, latency_us, upstream_latency_us, bytes_in, \
                 bytes_out, input_tokens, output_tokens, token_source) ",
            );
            q.push_values(chunk, |mut row, e| {
                row.push_bind(e.event_id.to_string())
                    .push_bind(e.time_ms)
                    .push_bind(uuid_text(e.tenant))
                    .push_bind(uuid_text(e.config))
                    .push_bind(uuid_text(e.key_id))
                    .push_bind(uuid_text(e.agent))
                    .push_bind(e.route.as_str())
                    .push_bind(e.status.as_str())
                    .push_bind(i64::from(e.http_status))
                    .push_bind(sql_int(e.latency_us))
                    .push_bind(e.upstream_latency_us.map(sql_int))
                    .push_bind(sql_int(e.bytes_in))
                    .push_bind(sql_int(e.bytes_out))
                    .push_bind(sql_int(e.input_tokens.unwrap_or(0)))
                    .push_bind(sql_int(e.output_tokens.unwrap_or(0)))
                    .push_bind(e.token_source.as_str());
            });
            q.build().execute(&mut *tx).await?;
        }
        for f in split.failures {
            sqlx::query(
                "INSERT OR IGNORE INTO usage_failures (event_id, time_ms, agent, config, code, detail) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(f.event_id.to_string())
            .bind(f.time_ms)
            .bind(f.agent.to_string())
            .bind(f.config.to_string())
            .bind(f.code.as_str())
            .bind(f.detail.as_str())
            .execute(&mut *tx)
            .await?;
        }
        for r in split.reports {
            sqlx::query(
                "INSERT INTO usage_reports (request_id, input_tokens, output_tokens) VALUES (?, ?, ?) \
                 ON CONFLICT (request_id) DO UPDATE SET \
                 input_tokens = MAX(input_tokens, excluded.input_tokens), \
                 output_tokens = MAX(output_tokens, excluded.output_tokens)",
            )
            .bind(r.request_id.to_string())
            .bind(sql_int(r.input_tokens))
            .bind(sql_int(r.output_tokens))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
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
                FROM usage_events e LEFT JOIN usage_reports r ON r.request_id = e.event_id
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
