-- Providers publish to a shared runtime that executes their flows' code, so staff
-- review them: an organisation publishes only once approved, and runs code that
-- is not one of the runtime's own components only when staff allowed it.
ALTER TABLE organizations ADD COLUMN approved_at BIGINT;
ALTER TABLE organizations ADD COLUMN custom_code_allowed INTEGER NOT NULL DEFAULT 0;
