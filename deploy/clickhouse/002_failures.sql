-- Why runs failed in the runtime: one row per failed run, with the runtime's
-- detail (trimmed), so a seller sees the last failure of each agent.
CREATE TABLE IF NOT EXISTS usage_failures
(
    event_id UUID,
    time_ms Int64,
    agent UUID,
    config UUID,
    code String,
    detail String
)
ENGINE = ReplacingMergeTree
ORDER BY (agent, event_id);
