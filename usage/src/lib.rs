//! Agora's usage pipeline and stores.
//!
//! The proxy queues one [`UsageEvent`](agora_config::usage::UsageEvent) per request
//! and hands them in batches to a [`Pipeline`]: each batch is appended to the spill
//! log on local disk ([`spill`]) and then shipped, in order, to the [`UsageStore`]
//! — ClickHouse ([`clickhouse`]) or the embedded SQLite file ([`embedded`]). While
//! the store is away the log grows, up to a bound, and is replayed when it returns.
//!
//! Delivery is at least once; every reader counts an `event_id` once, so a batch
//! written twice (a retry after a lost response, a replay after a crash) is not
//! counted twice. Token counts follow one rule everywhere: the runtime's response,
//! else the runtime's own report, else the proxy's estimate (marked as such).

pub mod clickhouse;
pub mod embedded;
pub mod local_server;
pub mod pipeline;
mod spill;

use std::sync::Arc;

use agora_config::settings::{Settings, UsageStoreKind};
use agora_config::usage::{RunFailure, UsageRecord};
use async_trait::async_trait;
use serde::Serialize;
use uuid::Uuid;

pub use pipeline::{Pipeline, PipelineStats};

/// The route whose events are metered (refusals included); validate and usage
/// reports are recorded but not counted as requests.
pub const METERED_ROUTE: &str = "/api/agent-gateway/invoke/";

/// The runtime's usage reports. One that names a config (runtime-side usage not
/// tied to one request) is an event of its own on this route, with
/// `token_source = reported`: its tokens count for that config, it is no request.
pub const REPORT_ROUTE: &str = "/api/agent-gateway/usage/";

/// Where the proxy's drain puts batches. Implementations must be idempotent per
/// `event_id`: a batch may be offered again after an error.
#[async_trait]
pub trait UsageSink: Send + Sync + 'static {
    async fn write(&self, batch: &[UsageRecord]) -> anyhow::Result<()>;
}

/// Which events an aggregate covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One buyer's configured copy of an agent.
    Config(Uuid),
    /// One seller's agent, over all its buyers.
    Agent(Uuid),
    /// One organisation, over all its configs.
    Tenant(Uuid),
    /// One API key (billing leaves test-mode keys out).
    Key(Uuid),
}

impl Scope {
    pub(crate) fn column(&self) -> &'static str {
        match self {
            Scope::Config(_) => "config",
            Scope::Agent(_) => "agent",
            Scope::Tenant(_) => "tenant",
            Scope::Key(_) => "key_id",
        }
    }

    pub(crate) fn id(&self) -> Uuid {
        match self {
            Scope::Config(id) | Scope::Agent(id) | Scope::Tenant(id) | Scope::Key(id) => *id,
        }
    }
}

/// A half-open time range in unix milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeRange {
    pub from_ms: i64,
    pub to_ms: i64,
}

/// One aggregate over the metered requests of a scope, per bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Aggregate {
    /// Start of the bucket, unix milliseconds (0 for a whole-range total).
    pub start_ms: i64,
    pub requests: u64,
    /// Requests that were not served: refusals and runtime failures (a client
    /// that went away is not an error).
    pub errors: u64,
    /// Requests the runtime ran: served, or cut short by the client.
    pub billable_requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Requests whose token counts are the proxy's estimate.
    pub estimated_requests: u64,
    /// The errors by kind: refused for a limit or quota, for the key, for the
    /// request itself; failed in the runtime.
    pub rate_limited: u64,
    pub unauthorized: u64,
    pub client_errors: u64,
    pub upstream_errors: u64,
    /// Requests whose client went away before the end.
    pub cancelled: u64,
    /// Distinct tenants (buyers).
    pub buyers: u64,
    /// Nearest-rank percentiles of the served requests' total latency.
    pub latency_p50_us: u64,
    pub latency_p95_us: u64,
}

/// A store the pipeline writes to and the control plane reads from.
#[async_trait]
pub trait UsageStore: Send + Sync + 'static {
    /// Writes a batch; writing the same events again changes no reading.
    async fn insert(&self, batch: &[UsageRecord]) -> anyhow::Result<()>;

    /// [`insert`](UsageStore::insert) of a batch the caller gives up (the
    /// shipper's): a store that writes on another thread takes it without a copy.
    async fn insert_owned(&self, batch: Vec<UsageRecord>) -> anyhow::Result<()> {
        self.insert(&batch).await
    }

    /// Aggregates per bucket of `bucket_ms` (buckets aligned to the epoch, so UTC
    /// days), in time order, buckets without requests left out.
    async fn aggregate(
        &self,
        scope: Scope,
        range: TimeRange,
        bucket_ms: i64,
    ) -> anyhow::Result<Vec<Aggregate>>;

    /// The last recorded failure of `agent`'s runs, if any.
    async fn last_failure(&self, agent: Uuid) -> anyhow::Result<Option<RunFailure>>;

    /// Whether the store answers.
    async fn ping(&self) -> anyhow::Result<()>;

    /// `clickhouse` or `embedded`.
    fn kind(&self) -> &'static str;
}

/// A bucket so wide that every event of a range falls into bucket 0.
const WHOLE_RANGE: i64 = i64::MAX / 4;

/// Totals over a whole range.
pub async fn totals(
    store: &dyn UsageStore,
    scope: Scope,
    range: TimeRange,
) -> anyhow::Result<Aggregate> {
    let mut rows = store.aggregate(scope, range, WHOLE_RANGE).await?;
    Ok(rows.pop().unwrap_or_default())
}

/// Opens the store the settings name, creating its tables when missing.
pub async fn open(settings: &Settings) -> anyhow::Result<Arc<dyn UsageStore>> {
    Ok(match settings.usage.store {
        UsageStoreKind::Embedded => {
            Arc::new(embedded::EmbeddedStore::open(&settings.usage_embedded_path()).await?)
        }
        UsageStoreKind::Clickhouse => {
            let store = clickhouse::ClickHouseStore::from_settings(settings)?;
            store.migrate().await?;
            Arc::new(store)
        }
    })
}

/// SQL text for a status list, shared by both stores' queries.
pub(crate) const ERROR_STATUSES: &str =
    "('client_error', 'rate_limited', 'unauthorized', 'upstream_error')";
pub(crate) const BILLABLE_STATUSES: &str = "('ok', 'cancelled')";

#[cfg(test)]
pub(crate) mod testing {
    use agora_config::usage::{TokenSource, UsageEvent, UsageStatus};
    use uuid::Uuid;

    pub fn event(
        config: Uuid,
        time_ms: i64,
        latency_us: u64,
        tokens: Option<(u64, u64)>,
    ) -> UsageEvent {
        UsageEvent {
            event_id: Uuid::now_v7(),
            time_ms,
            tenant: Some(Uuid::from_u128(7)),
            config: Some(config),
            key_id: Some(Uuid::from_u128(9)),
            agent: Some(Uuid::from_u128(11)),
            route: super::METERED_ROUTE.into(),
            status: UsageStatus::Ok,
            http_status: 200,
            latency_us,
            upstream_latency_us: Some(latency_us / 2),
            bytes_in: 100,
            bytes_out: 400,
            input_tokens: tokens.map(|t| t.0),
            output_tokens: tokens.map(|t| t.1),
            token_source: if tokens.is_some() {
                TokenSource::Runtime
            } else {
                TokenSource::None
            },
        }
    }
}
