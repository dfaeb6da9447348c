-- What each subscription has used of its plan's quotas in the current period, as
-- last counted from the usage store. Compiled into the proxies' snapshot
-- (AgentRoute.quota); rewritten, with a new revision, when a count changes.
CREATE TABLE quota_usage (
    config_uuid TEXT PRIMARY KEY REFERENCES agent_configs(uuid) ON DELETE CASCADE,
    period_start BIGINT NOT NULL,
    period_end BIGINT NOT NULL,
    counted_at BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    tokens BIGINT NOT NULL
);
