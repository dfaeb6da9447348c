-- Portable across Postgres and SQLite: uuids are TEXT, times are BIGINT unix
-- milliseconds, flags are BIGINT 0/1, and {{BLOB}} becomes BYTEA or BLOB.

CREATE TABLE users (
    uuid TEXT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    email TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    is_staff BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

CREATE TABLE user_tokens (
    token_hash TEXT PRIMARY KEY,
    user_uuid TEXT NOT NULL REFERENCES users(uuid) ON DELETE CASCADE,
    created_at BIGINT NOT NULL
);

CREATE TABLE organizations (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('customer', 'provider')),
    description TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL
);

CREATE TABLE memberships (
    org_uuid TEXT NOT NULL REFERENCES organizations(uuid) ON DELETE CASCADE,
    user_uuid TEXT NOT NULL REFERENCES users(uuid) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    PRIMARY KEY (org_uuid, user_uuid)
);
CREATE INDEX memberships_user ON memberships(user_uuid);

CREATE TABLE projects (
    uuid TEXT PRIMARY KEY,
    org_uuid TEXT NOT NULL REFERENCES organizations(uuid) ON DELETE CASCADE,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX projects_org ON projects(org_uuid);

CREATE TABLE categories (
    uuid TEXT PRIMARY KEY,
    slug TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL
);

CREATE TABLE provider_agents (
    uuid TEXT PRIMARY KEY,
    org_uuid TEXT NOT NULL REFERENCES organizations(uuid) ON DELETE CASCADE,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    -- name and description lowercased by the application (Unicode-aware on
    -- both databases, unlike SQLite's LOWER), for search.
    search_text TEXT NOT NULL DEFAULT '',
    category_uuid TEXT REFERENCES categories(uuid) ON DELETE SET NULL,
    status TEXT NOT NULL CHECK (status IN ('draft', 'published')),
    flow_json TEXT,
    flow_summary TEXT,
    runtime_flow_id TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX provider_agents_org ON provider_agents(org_uuid);
CREATE INDEX provider_agents_status ON provider_agents(status);

CREATE TABLE pricing_plans (
    uuid TEXT PRIMARY KEY,
    agent_uuid TEXT NOT NULL REFERENCES provider_agents(uuid) ON DELETE CASCADE,
    name TEXT NOT NULL,
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    currency TEXT NOT NULL,
    billing_interval TEXT NOT NULL CHECK (billing_interval IN ('month', 'year')),
    request_quota BIGINT,
    token_quota BIGINT,
    requests_per_minute BIGINT,
    burst BIGINT,
    max_concurrency BIGINT,
    active BIGINT NOT NULL DEFAULT 1,
    created_at BIGINT NOT NULL
);
CREATE INDEX pricing_plans_agent ON pricing_plans(agent_uuid);

CREATE TABLE orders (
    uuid TEXT PRIMARY KEY,
    org_uuid TEXT NOT NULL REFERENCES organizations(uuid) ON DELETE CASCADE,
    project_uuid TEXT REFERENCES projects(uuid) ON DELETE SET NULL,
    agent_uuid TEXT NOT NULL REFERENCES provider_agents(uuid),
    plan_uuid TEXT NOT NULL REFERENCES pricing_plans(uuid),
    state TEXT NOT NULL CHECK (state IN ('pending_payment', 'done', 'cancelled')),
    price_cents BIGINT NOT NULL,
    currency TEXT NOT NULL,
    created_by TEXT NOT NULL REFERENCES users(uuid),
    created_at BIGINT NOT NULL,
    completed_at BIGINT
);
CREATE INDEX orders_org ON orders(org_uuid);

CREATE TABLE resources (
    uuid TEXT PRIMARY KEY,
    org_uuid TEXT NOT NULL REFERENCES organizations(uuid) ON DELETE CASCADE,
    order_uuid TEXT NOT NULL UNIQUE REFERENCES orders(uuid),
    agent_uuid TEXT NOT NULL REFERENCES provider_agents(uuid),
    plan_uuid TEXT NOT NULL REFERENCES pricing_plans(uuid),
    state TEXT NOT NULL CHECK (state IN ('active', 'suspended', 'terminated')),
    created_at BIGINT NOT NULL
);
CREATE INDEX resources_org ON resources(org_uuid);

CREATE TABLE agent_configs (
    uuid TEXT PRIMARY KEY,
    org_uuid TEXT NOT NULL REFERENCES organizations(uuid) ON DELETE CASCADE,
    resource_uuid TEXT NOT NULL UNIQUE REFERENCES resources(uuid),
    agent_uuid TEXT NOT NULL REFERENCES provider_agents(uuid),
    project_uuid TEXT REFERENCES projects(uuid) ON DELETE SET NULL,
    name TEXT NOT NULL,
    greeting TEXT NOT NULL,
    tone TEXT NOT NULL CHECK (tone IN ('professional', 'friendly', 'casual')),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX agent_configs_org ON agent_configs(org_uuid);

CREATE TABLE training_documents (
    uuid TEXT PRIMARY KEY,
    org_uuid TEXT NOT NULL REFERENCES organizations(uuid) ON DELETE CASCADE,
    config_uuid TEXT REFERENCES agent_configs(uuid) ON DELETE SET NULL,
    filename TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    content {{BLOB}} NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX training_documents_org ON training_documents(org_uuid);

CREATE TABLE api_keys (
    uuid TEXT PRIMARY KEY,
    org_uuid TEXT NOT NULL REFERENCES organizations(uuid) ON DELETE CASCADE,
    config_uuid TEXT NOT NULL REFERENCES agent_configs(uuid) ON DELETE CASCADE,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    mode TEXT NOT NULL,
    scopes TEXT NOT NULL,
    allowed_origins TEXT NOT NULL DEFAULT '[]',
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    kid TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    created_by TEXT NOT NULL REFERENCES users(uuid),
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    expires_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX api_keys_config ON api_keys(config_uuid);

CREATE TABLE signing_keys (
    kid TEXT PRIMARY KEY,
    private_key_pem TEXT NOT NULL,
    public_key TEXT NOT NULL,
    active BIGINT NOT NULL DEFAULT 1,
    created_at BIGINT NOT NULL
);

-- The data-plane configuration revision: bumped in the same transaction as any
-- change the proxy must see (keys, configs, plans, agents).
CREATE TABLE config_revision (
    id BIGINT PRIMARY KEY,
    revision BIGINT NOT NULL
);
INSERT INTO config_revision (id, revision) VALUES (1, 1);
