-- Plans may charge for use over what they include (their request and token
-- quotas): cents per 1,000 tokens and cents per request.
ALTER TABLE pricing_plans ADD COLUMN usage_cents_per_1k_tokens BIGINT;
ALTER TABLE pricing_plans ADD COLUMN usage_cents_per_request BIGINT;

-- The name the buyer chose for the copy a paid order makes once it is paid.
ALTER TABLE orders ADD COLUMN config_name TEXT;

-- What Agora made in Stripe, so that each is made once and reused.
CREATE TABLE stripe_customers (
    org_uuid TEXT PRIMARY KEY REFERENCES organizations(uuid) ON DELETE CASCADE,
    uuid TEXT NOT NULL UNIQUE,
    stripe_id TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE stripe_products (
    agent_uuid TEXT PRIMARY KEY REFERENCES provider_agents(uuid) ON DELETE CASCADE,
    stripe_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- A plan's Prices: the recurring base price and one metered Price per charged
-- unit, each with its meter. `terms` is what the Price was made with; a plan
-- whose terms differ gets a new Price and the old one is archived (active 0).
CREATE TABLE stripe_prices (
    stripe_id TEXT PRIMARY KEY,
    plan_uuid TEXT NOT NULL REFERENCES pricing_plans(uuid) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('base', 'tokens', 'requests')),
    terms TEXT NOT NULL,
    meter_id TEXT,
    meter_event TEXT,
    active BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX stripe_prices_plan ON stripe_prices (plan_uuid, kind, active);

CREATE TABLE checkout_sessions (
    stripe_id TEXT PRIMARY KEY,
    order_uuid TEXT NOT NULL REFERENCES orders(uuid) ON DELETE CASCADE,
    url TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX checkout_sessions_order ON checkout_sessions (order_uuid);

-- A paid order's Stripe subscription, as last read from Stripe.
CREATE TABLE subscriptions (
    uuid TEXT PRIMARY KEY,
    org_uuid TEXT NOT NULL REFERENCES organizations(uuid) ON DELETE CASCADE,
    order_uuid TEXT NOT NULL UNIQUE REFERENCES orders(uuid),
    plan_uuid TEXT NOT NULL REFERENCES pricing_plans(uuid),
    stripe_id TEXT NOT NULL UNIQUE,
    stripe_customer TEXT NOT NULL,
    status TEXT NOT NULL,
    current_period_start BIGINT NOT NULL,
    current_period_end BIGINT NOT NULL,
    previous_period_start BIGINT,
    cancel_at_period_end BIGINT NOT NULL,
    canceled_at BIGINT,
    past_due_since BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX subscriptions_org ON subscriptions (org_uuid);

-- Each webhook event takes effect once: its row is written in the transaction
-- of its effect.
CREATE TABLE stripe_events (
    event_id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    received_at BIGINT NOT NULL
);

-- Usage reported to Stripe's meters: one row per subscription, unit, period and
-- closed window, written before it is sent and with the value it is sent with,
-- so that every retry sends the same identifier and value.
CREATE TABLE meter_reports (
    identifier TEXT PRIMARY KEY,
    subscription_uuid TEXT NOT NULL REFERENCES subscriptions(uuid) ON DELETE CASCADE,
    unit TEXT NOT NULL CHECK (unit IN ('tokens', 'requests')),
    period_start BIGINT NOT NULL,
    window_end BIGINT NOT NULL,
    -- The meter event's time, unix seconds: inside the period it bills.
    event_time BIGINT NOT NULL,
    value BIGINT NOT NULL,
    sent_at BIGINT,
    attempts BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    UNIQUE (subscription_uuid, unit, period_start, window_end)
);
CREATE INDEX meter_reports_unsent ON meter_reports (sent_at);
