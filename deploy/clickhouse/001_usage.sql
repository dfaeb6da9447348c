-- Usage events, one row per proxied request. Delivery is at least once, so the
-- same event_id may be inserted more than once: ReplacingMergeTree removes copies
-- when parts merge, and every exact query groups by event_id (or uses FINAL).
-- Works on ClickHouse 18.16 and current releases: no DateTime64, no
-- LowCardinality, no Nullable in the key (unknown ids are the nil UUID).
CREATE TABLE IF NOT EXISTS usage_events
(
    event_id UUID,
    time_ms Int64,
    tenant UUID,
    config UUID,
    key_id UUID,
    agent UUID,
    route String,
    status String,
    http_status UInt16,
    latency_us UInt64,
    upstream_latency_us UInt64,
    upstream_called UInt8,
    bytes_in UInt64,
    bytes_out UInt64,
    input_tokens UInt64,
    output_tokens UInt64,
    token_source String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(toDateTime(intDiv(time_ms, 1000)))
ORDER BY (tenant, config, time_ms, event_id);

-- Token counts the runtime reported for a request (POST /api/agent-gateway/usage/),
-- keyed by the request's event_id. Readers use them only for events whose own
-- counts did not come from the runtime's response.
CREATE TABLE IF NOT EXISTS usage_reports
(
    request_id UUID,
    input_tokens UInt64,
    output_tokens UInt64
)
ENGINE = ReplacingMergeTree
ORDER BY request_id;
