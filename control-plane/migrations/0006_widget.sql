-- The embeddable chat widget of a buyer's config: the origins its publishable
-- keys may be used from (exact scheme://host[:port], a JSON list), and how it
-- looks. An empty title means the config's name.
ALTER TABLE agent_configs ADD COLUMN widget_allowed_origins TEXT NOT NULL DEFAULT '[]';
ALTER TABLE agent_configs ADD COLUMN widget_title TEXT NOT NULL DEFAULT '';
ALTER TABLE agent_configs ADD COLUMN widget_accent_color TEXT NOT NULL DEFAULT '#1f4fd1';
ALTER TABLE agent_configs ADD COLUMN widget_position TEXT NOT NULL DEFAULT 'bottom-right';
ALTER TABLE agent_configs ADD COLUMN widget_launcher_text TEXT NOT NULL DEFAULT 'Chat with us';

-- A publishable key is public by design (it goes into web pages, bound to the
-- widget's origins, and can only open visitor sessions), so the embed snippet
-- can show it again; secret keys are stored as their hash only.
ALTER TABLE api_keys ADD COLUMN public_value TEXT;
