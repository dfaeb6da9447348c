-- User tokens expire and are seen in use; tokens from before expire a month
-- after they were made.
ALTER TABLE user_tokens ADD COLUMN expires_at BIGINT;
ALTER TABLE user_tokens ADD COLUMN last_used_at BIGINT;
UPDATE user_tokens SET expires_at = created_at + 2592000000;

-- An organisation's admins invite a username; the user of that name accepts or
-- declines. Kept by name, whether or not such a user exists, so inviting tells
-- nothing of who has an account. One open invitation per name and organisation.
CREATE TABLE invitations (
    uuid TEXT PRIMARY KEY,
    org_uuid TEXT NOT NULL REFERENCES organizations(uuid) ON DELETE CASCADE,
    username TEXT NOT NULL,
    role TEXT NOT NULL,
    invited_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    UNIQUE (org_uuid, username)
);
CREATE INDEX invitations_username ON invitations (username);

-- Failed logins per account and per client address, for backoff. Shared by
-- every control-plane replica.
CREATE TABLE login_failures (
    subject TEXT PRIMARY KEY,
    failures BIGINT NOT NULL,
    locked_until BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
