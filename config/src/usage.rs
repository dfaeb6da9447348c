//! The usage event schema: one event per proxied request, failed ones included.
//!
//! Delivery is at-least-once: the proxy queues events in memory, flushes them in
//! batches to the usage store, spills batches it could not deliver to a local
//! write-ahead file and replays them later, so an event may reach the store more than
//! once but is never dropped silently. Duplicates are removed by `event_id` (a UUID v7,
//! assigned once when the event is created and kept across retries): readers and the
//! store (e.g. ClickHouse's `ReplacingMergeTree` keyed on `event_id`) count each
//! `event_id` once.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageStatus {
    /// Served by the runtime.
    Ok,
    /// Refused because of the request itself (bad body, unknown route...).
    ClientError,
    /// Refused by a rate limit, concurrency limit or quota.
    RateLimited,
    /// Refused for a missing, invalid, revoked or insufficiently scoped key.
    Unauthorized,
    /// The runtime failed, timed out or could not be reached.
    UpstreamError,
    /// The client went away before the response completed.
    Cancelled,
}

impl UsageStatus {
    /// The name stored and shown (the same as its JSON form).
    pub fn as_str(self) -> &'static str {
        match self {
            UsageStatus::Ok => "ok",
            UsageStatus::ClientError => "client_error",
            UsageStatus::RateLimited => "rate_limited",
            UsageStatus::Unauthorized => "unauthorized",
            UsageStatus::UpstreamError => "upstream_error",
            UsageStatus::Cancelled => "cancelled",
        }
    }
}

/// Where the token counts of an event come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// Read from the runtime's response.
    Runtime,
    /// Reported afterwards by the runtime on the usage route.
    Reported,
    /// Estimated by the proxy with a tokenizer over the input and answer texts.
    Estimated,
    /// Not known.
    None,
}

impl TokenSource {
    /// The name stored and shown (the same as its JSON form).
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Runtime => "runtime",
            TokenSource::Reported => "reported",
            TokenSource::Estimated => "estimated",
            TokenSource::None => "none",
        }
    }
}

/// One proxied request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// UUID v7, unique per request; the deduplication key.
    pub event_id: Uuid,
    /// When the request arrived, unix milliseconds.
    pub time_ms: i64,
    /// Unknown when the key could not be identified.
    pub tenant: Option<Uuid>,
    pub config: Option<Uuid>,
    pub key_id: Option<Uuid>,
    pub agent: Option<Uuid>,
    /// Route template, e.g. `/api/agent-gateway/invoke/`.
    pub route: String,
    pub status: UsageStatus,
    /// Status sent to the client.
    pub http_status: u16,
    /// Total time in the proxy, microseconds.
    pub latency_us: u64,
    /// Time waiting on the runtime, microseconds; `None` if it was not called.
    pub upstream_latency_us: Option<u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub token_source: TokenSource,
}

/// Token counts the runtime reported out of band for one request
/// (`POST /api/agent-gateway/usage/`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenReport {
    /// The `X-Agora-Request-Id` the proxy sent with the run (the event's `event_id`).
    pub request_id: Uuid,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Why one run failed in the runtime, beside its event (which says it failed):
/// the seller's view shows the last of each agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunFailure {
    /// The failed request's event.
    pub event_id: Uuid,
    pub time_ms: i64,
    pub agent: Uuid,
    pub config: Uuid,
    /// `runtime_error`, `runtime_timeout`, `runtime_unreachable` or `stream_error`.
    pub code: String,
    /// The runtime's own word on it (Langflow's `detail`, or the stream's error),
    /// trimmed.
    pub detail: String,
}

/// What the proxy hands to the usage pipeline: an event per request, the
/// runtime's own token reports, and why failed runs failed. A report never adds a
/// second record: readers take its counts for the event it names when the event
/// carries no counts from the runtime's response (runtime > reported > estimated).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UsageRecord {
    Event(Box<UsageEvent>),
    Report(TokenReport),
    /// Added after the first two: spill logs written before it still read.
    Failure(Box<RunFailure>),
}

impl UsageRecord {
    /// The event a record belongs to.
    pub fn event_id(&self) -> Uuid {
        match self {
            UsageRecord::Event(e) => e.event_id,
            UsageRecord::Report(r) => r.request_id,
            UsageRecord::Failure(f) => f.event_id,
        }
    }
}

/// A batch's records by kind.
#[derive(Default)]
pub struct Split<'a> {
    pub events: Vec<&'a UsageEvent>,
    pub reports: Vec<&'a TokenReport>,
    pub failures: Vec<&'a RunFailure>,
}

/// A batch's events, reports and failures, apart.
pub fn split(batch: &[UsageRecord]) -> Split<'_> {
    let mut split = Split {
        events: Vec::with_capacity(batch.len()),
        ..Split::default()
    };
    for record in batch {
        match record {
            UsageRecord::Event(e) => split.events.push(&**e),
            UsageRecord::Report(r) => split.reports.push(r),
            UsageRecord::Failure(f) => split.failures.push(&**f),
        }
    }
    split
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trip() {
        let event = UsageEvent {
            event_id: Uuid::now_v7(),
            time_ms: 1_700_000_000_123,
            tenant: Some(Uuid::from_u128(1)),
            config: Some(Uuid::from_u128(2)),
            key_id: Some(Uuid::from_u128(3)),
            agent: None,
            route: "/api/agent-gateway/invoke/".into(),
            status: UsageStatus::UpstreamError,
            http_status: 502,
            latency_us: 12_345,
            upstream_latency_us: Some(12_000),
            bytes_in: 120,
            bytes_out: 0,
            input_tokens: None,
            output_tokens: None,
            token_source: TokenSource::None,
        };
        assert_eq!(event.event_id.get_version_num(), 7);
        let value = serde_json::to_value(&event).unwrap();
        assert_eq!(value["status"], json!("upstream_error"));
        assert_eq!(value["token_source"], json!("none"));
        assert_eq!(serde_json::from_value::<UsageEvent>(value).unwrap(), event);
    }
}
