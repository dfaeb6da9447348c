//! The ClickHouse store, over HTTP with the `clickhouse` crate.
//!
//! Inserts are RowBinary without schema validation (ClickHouse 18.16 has no
//! `RowBinaryWithNamesAndTypes`) and LZ4-compressed. Each insert carries an
//! `insert_deduplication_token` derived from its event ids on servers that know the
//! setting (22.2 and later), so a retried batch is dropped by the server; on older
//! servers the copies are removed by `ReplacingMergeTree` merges, and every query
//! here groups by `event_id` so readings are exact either way.

use std::time::Duration;

use agora_config::settings::Settings;
use agora_config::usage::{split, RunFailure, UsageRecord};
use anyhow::Context as _;
use async_trait::async_trait;
use clickhouse::{Client, Row};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use uuid::Uuid;

use crate::{Aggregate, Scope, TimeRange, UsageStore, BILLABLE_STATUSES, ERROR_STATUSES};

/// The schema, as shipped in `deploy/clickhouse/`.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "001_usage.sql",
        include_str!("../../deploy/clickhouse/001_usage.sql"),
    ),
    (
        "002_failures.sql",
        include_str!("../../deploy/clickhouse/002_failures.sql"),
    ),
];

const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
const INSERT_SEND_TIMEOUT: Duration = Duration::from_secs(10);
const INSERT_END_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ClickHouseStore {
    client: Client,
    database: String,
    /// Whether the server knows `insert_deduplication_token`.
    dedup_token: OnceCell<bool>,
    /// Set once the tables are known to exist.
    migrated: OnceCell<()>,
}

#[derive(Row, Serialize)]
struct EventRow {
    #[serde(with = "clickhouse::serde::uuid")]
    event_id: Uuid,
    time_ms: i64,
    #[serde(with = "clickhouse::serde::uuid")]
    tenant: Uuid,
    #[serde(with = "clickhouse::serde::uuid")]
    config: Uuid,
    #[serde(with = "clickhouse::serde::uuid")]
    key_id: Uuid,
    #[serde(with = "clickhouse::serde::uuid")]
    agent: Uuid,
    route: String,
    status: &'static str,
    http_status: u16,
    latency_us: u64,
    upstream_latency_us: u64,
    upstream_called: u8,
    bytes_in: u64,
    bytes_out: u64,
    input_tokens: u64,
    output_tokens: u64,
    token_source: &'static str,
}

#[derive(Row, Serialize)]
struct ReportRow {
    #[serde(with = "clickhouse::serde::uuid")]
    request_id: Uuid,
    input_tokens: u64,
    output_tokens: u64,
}

#[derive(Row, Serialize, Deserialize)]
struct FailureRow {
    #[serde(with = "clickhouse::serde::uuid")]
    event_id: Uuid,
    time_ms: i64,
    #[serde(with = "clickhouse::serde::uuid")]
    agent: Uuid,
    #[serde(with = "clickhouse::serde::uuid")]
    config: Uuid,
    code: String,
    detail: String,
}

#[derive(Row, Deserialize)]
struct AggregateRow {
    start_ms: i64,
    requests: u64,
    errors: u64,
    billable_requests: u64,
    input_tokens: u64,
    output_tokens: u64,
    estimated_requests: u64,
    rate_limited: u64,
    unauthorized: u64,
    client_errors: u64,
    upstream_errors: u64,
    cancelled: u64,
    buyers: u64,
    latency_p50_us: u64,
    latency_p95_us: u64,
}

/// A token naming a batch by its contents, the same on every retry.
fn batch_token(ids: impl Iterator<Item = Uuid>) -> String {
    let mut hash = Sha256::new();
    for id in ids {
        hash.update(id.as_bytes());
    }
    hex::encode(&hash.finalize()[..16])
}

impl ClickHouseStore {
    pub fn new(
        url: &str,
        database: &str,
        user: Option<&str>,
        password: Option<&str>,
    ) -> ClickHouseStore {
        let mut client = Client::default()
            .with_url(url)
            .with_validation(false)
            .with_compression(clickhouse::Compression::Lz4);
        if let Some(user) = user {
            client = client.with_user(user);
        }
        if let Some(password) = password {
            client = client.with_password(password);
        }
        ClickHouseStore {
            client,
            database: database.to_owned(),
            dedup_token: OnceCell::new(),
            migrated: OnceCell::new(),
        }
    }

    pub fn from_settings(settings: &Settings) -> anyhow::Result<ClickHouseStore> {
        let u = &settings.usage;
        let url = u
            .clickhouse_url
            .as_deref()
            .context("usage.clickhouse_url is not set")?;
        Ok(ClickHouseStore::new(
            url,
            &u.clickhouse_database,
            u.clickhouse_user.as_deref(),
            u.clickhouse_password.as_ref().map(|p| p.expose_secret()),
        ))
    }

    /// The database the store writes to.
    pub fn database(&self) -> &str {
        &self.database
    }

    fn db(&self) -> Client {
        self.client.clone().with_database(&self.database)
    }

    /// Creates the database and the tables (idempotent); inserts do it first when
    /// it has not succeeded yet (ClickHouse away when the proxy started).
    pub async fn migrate(&self) -> anyhow::Result<()> {
        self.migrated
            .get_or_try_init(|| self.apply_schema())
            .await
            .map(|_| ())
    }

    async fn apply_schema(&self) -> anyhow::Result<()> {
        let create = format!("CREATE DATABASE IF NOT EXISTS `{}`", self.database);
        timed(self.client.query(&create).execute())
            .await
            .context("creating the usage database in ClickHouse")?;
        for (name, text) in MIGRATIONS {
            for statement in statements(text) {
                timed(self.db().query(&statement).execute())
                    .await
                    .with_context(|| format!("applying {name} to ClickHouse"))?;
            }
        }
        Ok(())
    }

    async fn supports_dedup_token(&self) -> anyhow::Result<bool> {
        self.dedup_token
            .get_or_try_init(|| async {
                let version: String = timed(self.client.query("SELECT version()").fetch_one())
                    .await
                    .context("reading ClickHouse's version")?;
                let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
                let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
                Ok::<_, anyhow::Error>((major, minor) >= (22, 2))
            })
            .await
            .copied()
    }

    /// Rows in `usage_events`, copies included: what the server holds, not what
    /// readers count.
    pub async fn raw_event_rows(&self) -> anyhow::Result<u64> {
        timed(
            self.db()
                .query("SELECT count() FROM usage_events")
                .fetch_one(),
        )
        .await
    }
}

/// Splits a file of `;`-terminated statements, dropping `--` comments.
fn statements(text: &str) -> Vec<String> {
    let without_comments: String = text
        .lines()
        .map(|line| line.split("--").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn timed<T>(
    f: impl std::future::Future<Output = clickhouse::error::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(QUERY_TIMEOUT, f).await {
        Ok(result) => Ok(result?),
        Err(_) => anyhow::bail!("ClickHouse did not answer within {QUERY_TIMEOUT:?}"),
    }
}

#[async_trait]
impl UsageStore for ClickHouseStore {
    async fn insert(&self, batch: &[UsageRecord]) -> anyhow::Result<()> {
        self.migrate().await?;
        let dedup = self.supports_dedup_token().await?;
        let split = split(batch);
        let (events, reports) = (split.events, split.reports);
        if !split.failures.is_empty() {
            let mut insert = self
                .db()
                .insert::<FailureRow>("usage_failures")
                .await?
                .with_timeouts(Some(INSERT_SEND_TIMEOUT), Some(INSERT_END_TIMEOUT));
            for f in &split.failures {
                insert
                    .write(&FailureRow {
                        event_id: f.event_id,
                        time_ms: f.time_ms,
                        agent: f.agent,
                        config: f.config,
                        code: f.code.clone(),
                        detail: f.detail.clone(),
                    })
                    .await?;
            }
            insert.end().await.context("inserting usage failures")?;
        }
        if !events.is_empty() {
            let mut insert = self
                .db()
                .insert::<EventRow>("usage_events")
                .await?
                .with_timeouts(Some(INSERT_SEND_TIMEOUT), Some(INSERT_END_TIMEOUT));
            if dedup {
                insert = insert.with_setting(
                    "insert_deduplication_token",
                    batch_token(events.iter().map(|e| e.event_id)),
                );
            }
            for e in events {
                insert
                    .write(&EventRow {
                        event_id: e.event_id,
                        time_ms: e.time_ms,
                        tenant: e.tenant.unwrap_or_default(),
                        config: e.config.unwrap_or_default(),
                        key_id: e.key_id.unwrap_or_default(),
                        agent: e.agent.unwrap_or_default(),
                        route: e.route.clone(),
                        status: e.status.as_str(),
                        http_status: e.http_status,
                        latency_us: e.latency_us,
                        upstream_latency_us: e.upstream_latency_us.unwrap_or(0),
                        upstream_called: u8::from(e.upstream_latency_us.is_some()),
                        bytes_in: e.bytes_in,
                        bytes_out: e.bytes_out,
                        input_tokens: e.input_tokens.unwrap_or(0),
                        output_tokens: e.output_tokens.unwrap_or(0),
                        token_source: e.token_source.as_str(),
                    })
                    .await?;
            }
            insert.end().await.context("inserting usage events")?;
        }
        if !reports.is_empty() {
            let mut insert = self
                .db()
                .insert::<ReportRow>("usage_reports")
                .await?
                .with_timeouts(Some(INSERT_SEND_TIMEOUT), Some(INSERT_END_TIMEOUT));
            if dedup {
                insert = insert.with_setting(
                    "insert_deduplication_token",
                    batch_token(reports.iter().map(|r| r.request_id)),
                );
            }
            for r in reports {
                insert
                    .write(&ReportRow {
                        request_id: r.request_id,
                        input_tokens: r.input_tokens,
                        output_tokens: r.output_tokens,
                    })
                    .await?;
            }
            insert.end().await.context("inserting usage reports")?;
        }
        Ok(())
    }

    async fn aggregate(
        &self,
        scope: Scope,
        range: TimeRange,
        bucket_ms: i64,
    ) -> anyhow::Result<Vec<Aggregate>> {
        let column = scope.column();
        let filter = format!(
            "{column} = toUUID(?) AND time_ms >= ? AND time_ms < ? \
             AND (route = ? OR (route = ? AND token_source = 'reported'))"
        );
        let metered = crate::METERED_ROUTE;
        // Token sums saturate instead of wrapping around: a sum whose floating
        // point total reaches 2^64 is clamped (the integer sum is exact below it).
        let sql = format!(
            "SELECT start_ms, requests, errors, billable_requests, input_tokens, output_tokens,
                estimated_requests, rate_limited, unauthorized, client_errors, upstream_errors,
                cancelled, buyers,
                if(empty(lat), toUInt64(0), lat[intDiv(length(lat) * 50 + 99, 100)]) AS latency_p50_us,
                if(empty(lat), toUInt64(0), lat[intDiv(length(lat) * 95 + 99, 100)]) AS latency_p95_us
             FROM (
             SELECT toInt64(intDiv(t, ?) * ?) AS start_ms,
                toUInt64(countIf(req)) AS requests,
                toUInt64(countIf(req AND s IN {ERROR_STATUSES})) AS errors,
                toUInt64(countIf(req AND s IN {BILLABLE_STATUSES})) AS billable_requests,
                if(sum(toFloat64(if(src = 'runtime' OR has_r = 0, i, ri) AS ti)) >= 18446744073709551615, toUInt64(18446744073709551615), toUInt64(sum(ti))) AS input_tokens,
                if(sum(toFloat64(if(src = 'runtime' OR has_r = 0, o, ro) AS tout)) >= 18446744073709551615, toUInt64(18446744073709551615), toUInt64(sum(tout))) AS output_tokens,
                toUInt64(countIf(req AND src = 'estimated' AND has_r = 0)) AS estimated_requests,
                toUInt64(countIf(req AND s = 'rate_limited')) AS rate_limited,
                toUInt64(countIf(req AND s = 'unauthorized')) AS unauthorized,
                toUInt64(countIf(req AND s = 'client_error')) AS client_errors,
                toUInt64(countIf(req AND s = 'upstream_error')) AS upstream_errors,
                toUInt64(countIf(req AND s = 'cancelled')) AS cancelled,
                toUInt64(uniqExactIf(tn, req)) AS buyers,
                arraySort(groupArrayIf(l, req AND s = 'ok')) AS lat
             FROM (
                SELECT event_id, any(time_ms) AS t, any(status) AS s, any(latency_us) AS l,
                       any(input_tokens) AS i, any(output_tokens) AS o,
                       any(token_source) AS src, any(tenant) AS tn,
                       any(route) = '{metered}' AS req
                FROM usage_events WHERE {filter} GROUP BY event_id
             ) ANY LEFT JOIN (
                SELECT request_id AS event_id, max(input_tokens) AS ri,
                       max(output_tokens) AS ro, toUInt8(1) AS has_r
                FROM usage_reports
                WHERE request_id IN (SELECT event_id FROM usage_events WHERE {filter})
                GROUP BY request_id
             ) USING event_id
             GROUP BY start_ms
             ) ORDER BY start_ms"
        );
        let id = scope.id().to_string();
        let rows: Vec<AggregateRow> = timed(
            self.db()
                .query(&sql)
                .bind(bucket_ms)
                .bind(bucket_ms)
                .bind(id.as_str())
                .bind(range.from_ms)
                .bind(range.to_ms)
                .bind(metered)
                .bind(crate::REPORT_ROUTE)
                .bind(id.as_str())
                .bind(range.from_ms)
                .bind(range.to_ms)
                .bind(metered)
                .bind(crate::REPORT_ROUTE)
                .fetch_all(),
        )
        .await
        .context("reading usage from ClickHouse")?;
        Ok(rows
            .into_iter()
            .map(|r| Aggregate {
                start_ms: r.start_ms,
                requests: r.requests,
                errors: r.errors,
                billable_requests: r.billable_requests,
                input_tokens: r.input_tokens,
                output_tokens: r.output_tokens,
                estimated_requests: r.estimated_requests,
                rate_limited: r.rate_limited,
                unauthorized: r.unauthorized,
                client_errors: r.client_errors,
                upstream_errors: r.upstream_errors,
                cancelled: r.cancelled,
                buyers: r.buyers,
                latency_p50_us: r.latency_p50_us,
                latency_p95_us: r.latency_p95_us,
            })
            .collect())
    }

    async fn last_failure(&self, agent: Uuid) -> anyhow::Result<Option<RunFailure>> {
        self.migrate().await?;
        let rows: Vec<FailureRow> = timed(
            self.db()
                .query(
                    "SELECT event_id, time_ms, agent, config, code, detail FROM usage_failures WHERE agent = toUUID(?) \
                     ORDER BY time_ms DESC, event_id DESC LIMIT 1",
                )
                .bind(agent.to_string().as_str())
                .fetch_all(),
        )
        .await
        .context("reading failures from ClickHouse")?;
        Ok(rows.into_iter().next().map(|r| RunFailure {
            event_id: r.event_id,
            time_ms: r.time_ms,
            agent: r.agent,
            config: r.config,
            code: r.code,
            detail: r.detail,
        }))
    }

    async fn ping(&self) -> anyhow::Result<()> {
        let one: u8 = timed(self.client.query("SELECT toUInt8(1)").fetch_one()).await?;
        anyhow::ensure!(one == 1, "unexpected answer from ClickHouse");
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "clickhouse"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_schema_splits_into_its_statements() {
        let all: Vec<String> = MIGRATIONS.iter().flat_map(|(_, t)| statements(t)).collect();
        assert_eq!(all.len(), 3);
        assert!(all[0].starts_with("CREATE TABLE IF NOT EXISTS usage_events"));
        assert!(all[1].contains("ORDER BY request_id"));
        assert!(all.iter().all(|s| !s.contains("--")));
    }

    #[test]
    fn batch_tokens_depend_on_the_ids_only() {
        let ids = [Uuid::from_u128(1), Uuid::from_u128(2)];
        assert_eq!(batch_token(ids.into_iter()), batch_token(ids.into_iter()));
        assert_ne!(
            batch_token(ids.into_iter()),
            batch_token(ids.into_iter().rev())
        );
    }
}
