//! Settings: a TOML file, overridden by environment variables, overridden by
//! command-line flags. Every layer is strict: an unknown key in the file or an
//! unknown `AGORA_*` variable is an error at start-up, never silently ignored.
//!
//! Environment variables map onto the file's keys with `AGORA_` as prefix and
//! `__` between levels: `AGORA_CONTROL_PLANE__LISTEN=0.0.0.0:8000` sets
//! `[control_plane] listen`, `AGORA_DATA_DIR` sets `data_dir`. Values are read
//! as TOML scalars when they parse as one (numbers, booleans), else as strings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

/// The prefix of environment variables that configure Agora.
pub const ENV_PREFIX: &str = "AGORA_";

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("settings file {path} is not valid: {message}")]
    File { path: PathBuf, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: String, message: String },
    #[error("invalid settings: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Where the embedded database, demo output and local state live.
    pub data_dir: PathBuf,
    pub control_plane: ControlPlaneSettings,
    pub runtime: RuntimeSettings,
    pub proxy: ProxySettings,
    pub usage: UsageSettings,
    pub stripe: StripeSettings,
    pub widget: WidgetServing,
    pub redis: RedisSettings,
    pub log: LogSettings,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneSettings {
    pub listen: String,
    /// `postgres://…` or `sqlite://…`; when absent, SQLite in `data_dir/agora.db`.
    pub database_url: Option<String>,
    /// The URL clients use to reach the control plane (for links and demo output).
    pub public_url: Option<String>,
    #[serde(deserialize_with = "number")]
    pub max_body_bytes: usize,
    #[serde(deserialize_with = "number")]
    pub max_page_size: u32,
    #[serde(deserialize_with = "number")]
    pub max_document_bytes: usize,
    #[serde(deserialize_with = "number")]
    pub db_max_connections: u32,
    /// How often plan quota usage is counted from the usage store into the
    /// snapshot, in milliseconds.
    #[serde(deserialize_with = "number")]
    pub quota_count_ms: u64,
    /// The secret proxies present (`Authorization: Bearer`) to read the
    /// data-plane snapshot feed; unset turns the feed off.
    pub proxy_secret: Option<SecretString>,
    /// 32 bytes, base64: when set, the private keys that sign API keys are
    /// stored encrypted with it (XChaCha20-Poly1305); without it they are
    /// stored as PEM and the database must be guarded as a secret.
    pub key_encryption_key: Option<SecretString>,
    /// Open connections the API listener takes; 0 derives the cap from the
    /// process's file-descriptor limit. Connections over it are answered 503.
    #[serde(deserialize_with = "number")]
    pub max_connections: usize,
    /// Open connections one client address may have (0: no cap); more are
    /// answered 429.
    #[serde(deserialize_with = "number")]
    pub max_connections_per_client: usize,
    /// How long a client may take to send a request's head, in milliseconds.
    #[serde(deserialize_with = "number")]
    pub head_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSettings {
    /// Base URL of the Langflow runtime agents are provisioned to; none disables publishing.
    pub url: Option<String>,
    /// The runtime's `x-api-key`.
    pub api_key: Option<SecretString>,
    #[serde(deserialize_with = "number")]
    pub timeout_ms: u64,
}

/// The data plane (`agora proxy`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySettings {
    /// Where buyers' requests arrive.
    pub listen: String,
    /// The URL browsers and clients reach the gateways at (widget snippets);
    /// when absent, `http://` + `listen`.
    pub public_url: Option<String>,
    /// Where `/metrics` is served; keep it off the public network.
    pub admin_listen: String,
    /// The control plane's base URL for the snapshot feed; when absent,
    /// `http://` + `control_plane.listen`.
    pub control_plane_url: Option<String>,
    /// Where the last applied snapshot is kept; when absent,
    /// `data_dir/proxy-snapshot.json`.
    pub snapshot_path: Option<PathBuf>,
    /// Worker threads of the request path: a number, or `auto` (the default) for
    /// one per core the process may run on.
    #[serde(deserialize_with = "threads_or_auto")]
    pub threads: usize,
    /// Largest invoke or validate body accepted, in bytes (at most 1 MiB).
    #[serde(deserialize_with = "number")]
    pub max_body_bytes: usize,
    #[serde(deserialize_with = "number")]
    pub connect_timeout_ms: u64,
    /// Longest wait for the runtime's next bytes (response header or chunk).
    #[serde(deserialize_with = "number")]
    pub read_timeout_ms: u64,
    /// How long SIGTERM waits for in-flight requests before closing them.
    #[serde(deserialize_with = "number")]
    pub grace_period_ms: u64,
    /// Idle upstream connections kept for reuse, across all threads.
    #[serde(deserialize_with = "number")]
    pub upstream_pool_size: usize,
    /// Requests per second allowed per tenant (organisation), over all its keys.
    #[serde(deserialize_with = "number")]
    pub tenant_requests_per_second: u32,
    #[serde(deserialize_with = "number")]
    pub tenant_burst: u32,
    /// Usage events held in memory before the sink takes them.
    #[serde(deserialize_with = "number")]
    pub usage_queue_capacity: usize,
    /// The secret the runtime presents (`X-Runtime-Secret`) to report usage;
    /// unset turns the usage route off.
    pub runtime_secret: Option<SecretString>,
    /// Open client connections the gateway takes; 0 derives the cap from the
    /// process's file-descriptor limit (each may need a runtime connection
    /// too). Connections over it are answered 503 at once.
    #[serde(deserialize_with = "number")]
    pub max_connections: usize,
    /// Open connections one client address may have (0: no cap); more are
    /// answered 429 at once.
    #[serde(deserialize_with = "number")]
    pub max_connections_per_client: usize,
}

/// Where usage events are stored, and how the proxy delivers them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageSettings {
    /// `embedded` (a SQLite file, no server) or `clickhouse`.
    pub store: UsageStoreKind,
    /// ClickHouse's HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub clickhouse_url: Option<String>,
    pub clickhouse_database: String,
    pub clickhouse_user: Option<String>,
    pub clickhouse_password: Option<SecretString>,
    /// The embedded store's file; when absent, `data_dir/usage.db`.
    pub embedded_path: Option<PathBuf>,
    /// Most events in one insert.
    #[serde(deserialize_with = "number")]
    pub batch_max_events: usize,
    /// Longest an event waits in memory before it is written to the spill log
    /// and offered to the store; also what SIGKILL can lose.
    #[serde(deserialize_with = "number")]
    pub batch_max_ms: u64,
    /// The append-only log every batch goes through before the store takes it;
    /// when absent, `data_dir/usage-spill.log`.
    pub spill_path: Option<PathBuf>,
    /// Size the spill log may reach while the store is away.
    #[serde(deserialize_with = "number")]
    pub spill_max_bytes: u64,
    /// What the proxy does when the spill log is full.
    pub spill_full: SpillFullPolicy,
    /// fsync the spill log after every batch (0), or at most every this many ms.
    #[serde(deserialize_with = "number")]
    pub spill_fsync_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageStoreKind {
    Embedded,
    Clickhouse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpillFullPolicy {
    /// New invokes get 503 until the store takes the backlog: no unmetered traffic.
    Refuse,
    /// Invokes are served; their events are dropped and counted.
    ServeUnmetered,
}

impl Default for UsageSettings {
    fn default() -> Self {
        UsageSettings {
            store: UsageStoreKind::Embedded,
            clickhouse_url: None,
            clickhouse_database: "agora".into(),
            clickhouse_user: None,
            clickhouse_password: None,
            embedded_path: None,
            batch_max_events: 10_000,
            batch_max_ms: 50,
            spill_path: None,
            spill_max_bytes: 1024 * 1024 * 1024,
            spill_full: SpillFullPolicy::Refuse,
            spill_fsync_ms: 0,
        }
    }
}

/// Payments. Billing is on when `secret_key` is set: real Stripe by default, or
/// any server speaking its API at `api_base` (the local stand-in `agora up` runs).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StripeSettings {
    /// Stripe's API address.
    pub api_base: String,
    pub secret_key: Option<SecretString>,
    /// Shown to browsers (`GET /api/stripe/config/`).
    pub publishable_key: Option<String>,
    /// Signs webhook deliveries (`whsec_…`); webhooks are refused without it.
    pub webhook_secret: Option<SecretString>,
    /// Hosts (`host` or `host:port`) checkout and portal return URLs may point
    /// to; the control plane's public URL's host is always allowed.
    pub allowed_redirect_hosts: Vec<String>,
    /// How long a `past_due` subscription keeps working, seconds.
    #[serde(deserialize_with = "number")]
    pub past_due_grace_secs: u64,
    /// Usage is reported to Stripe per closed window of this many seconds
    /// (at most one meter event per subscription, unit and window).
    #[serde(deserialize_with = "number")]
    pub report_window_secs: u64,
    /// How often closed windows are looked for and reported, milliseconds.
    #[serde(deserialize_with = "number")]
    pub report_every_ms: u64,
    /// Longest a call to Stripe may take, milliseconds.
    #[serde(deserialize_with = "number")]
    pub timeout_ms: u64,
}

/// Stripe's own API address.
pub const STRIPE_API: &str = "https://api.stripe.com";

impl Default for StripeSettings {
    fn default() -> Self {
        StripeSettings {
            api_base: STRIPE_API.into(),
            secret_key: None,
            publishable_key: None,
            webhook_secret: None,
            allowed_redirect_hosts: Vec::new(),
            past_due_grace_secs: 3 * 24 * 3600,
            report_window_secs: 3600,
            report_every_ms: 60_000,
            timeout_ms: 10_000,
        }
    }
}

/// Keys are shown as set or not, never their value.
impl std::fmt::Debug for StripeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeSettings")
            .field("api_base", &self.api_base)
            .field("secret_key", &self.secret_key.as_ref().map(|_| "***"))
            .field("publishable_key", &self.publishable_key)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "***"),
            )
            .field("allowed_redirect_hosts", &self.allowed_redirect_hosts)
            .field("past_due_grace_secs", &self.past_due_grace_secs)
            .field("report_window_secs", &self.report_window_secs)
            .field("report_every_ms", &self.report_every_ms)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// How gateways serve the embeddable chat widget's visitors.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WidgetServing {
    /// Lifetime of a visitor session token, seconds (at most 900).
    #[serde(deserialize_with = "number")]
    pub session_ttl_secs: u64,
    /// Messages one visitor may send per minute.
    #[serde(deserialize_with = "number")]
    pub messages_per_minute: u32,
    /// Visitor sessions (new or refreshed) one client address may take per minute.
    #[serde(deserialize_with = "number")]
    pub sessions_per_minute: u32,
}

/// Longest a visitor session token lives.
pub const MAX_VISITOR_SESSION_SECS: u64 = 900;

impl Default for WidgetServing {
    fn default() -> Self {
        WidgetServing {
            session_ttl_secs: 600,
            messages_per_minute: 20,
            sessions_per_minute: 30,
        }
    }
}

/// A Redis shared by every gateway: with a `url`, per-key and per-tenant rate
/// limits and quotas hold across gateways instead of per gateway.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://[:password@]host[:port][/db]`; none: limits are per gateway.
    pub url: Option<SecretString>,
    /// Longest a request waits for Redis before deciding on this gateway's
    /// share of the limit instead, milliseconds.
    #[serde(deserialize_with = "number")]
    pub timeout_ms: u64,
    /// How often a gateway tops up its leases and says it is alive, milliseconds.
    #[serde(deserialize_with = "number")]
    pub sync_interval_ms: u64,
    /// Prefix of every Redis key Agora writes (several deployments may share one Redis).
    pub key_prefix: String,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: None,
            timeout_ms: 25,
            sync_interval_ms: 20,
            key_prefix: "agora".into(),
        }
    }
}

/// Prints the URL's scheme and host, never its password.
impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use secrecy::ExposeSecret;
        let url = self.url.as_ref().map(|u| {
            let u = u.expose_secret();
            match (u.find("://"), u.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => {
                    format!("{}***@{}", &u[..scheme + 3], &u[at + 1..])
                }
                _ => u.to_owned(),
            }
        });
        f.debug_struct("RedisSettings")
            .field("url", &url)
            .field("timeout_ms", &self.timeout_ms)
            .field("sync_interval_ms", &self.sync_interval_ms)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A `tracing` filter, e.g. `info` or `agora_control_plane=debug`.
    pub filter: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from(".agora"),
            control_plane: ControlPlaneSettings::default(),
            runtime: RuntimeSettings::default(),
            proxy: ProxySettings::default(),
            usage: UsageSettings::default(),
            stripe: StripeSettings::default(),
            widget: WidgetServing::default(),
            redis: RedisSettings::default(),
            log: LogSettings::default(),
        }
    }
}

impl Default for ControlPlaneSettings {
    fn default() -> Self {
        ControlPlaneSettings {
            listen: "127.0.0.1:8000".into(),
            database_url: None,
            public_url: None,
            max_body_bytes: 8 * 1024 * 1024,
            max_page_size: 100,
            max_document_bytes: 5 * 1024 * 1024,
            db_max_connections: 10,
            quota_count_ms: 15_000,
            proxy_secret: None,
            key_encryption_key: None,
            max_connections: 0,
            max_connections_per_client: 256,
            head_timeout_ms: 10_000,
        }
    }
}

/// Prints the database URL without its password.
impl std::fmt::Debug for ControlPlaneSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let database_url =
            self.database_url
                .as_deref()
                .map(|url| match (url.find("://"), url.rfind('@')) {
                    (Some(scheme), Some(at)) if at > scheme => {
                        let user = url[scheme + 3..at].split(':').next().unwrap_or("");
                        format!("{}{user}:***@{}", &url[..scheme + 3], &url[at + 1..])
                    }
                    _ => url.to_owned(),
                });
        f.debug_struct("ControlPlaneSettings")
            .field("listen", &self.listen)
            .field("database_url", &database_url)
            .field("public_url", &self.public_url)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_page_size", &self.max_page_size)
            .field("max_document_bytes", &self.max_document_bytes)
            .field("db_max_connections", &self.db_max_connections)
            .field("quota_count_ms", &self.quota_count_ms)
            .field("proxy_secret", &self.proxy_secret)
            .field("key_encryption_key", &self.key_encryption_key)
            .field("max_connections", &self.max_connections)
            .field(
                "max_connections_per_client",
                &self.max_connections_per_client,
            )
            .field("head_timeout_ms", &self.head_timeout_ms)
            .finish()
    }
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings {
            url: None,
            api_key: None,
            timeout_ms: 10_000,
        }
    }
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            listen: "127.0.0.1:8080".into(),
            public_url: None,
            admin_listen: "127.0.0.1:9464".into(),
            control_plane_url: None,
            snapshot_path: None,
            threads: available_cores(),
            max_body_bytes: 64 * 1024,
            connect_timeout_ms: 2_000,
            read_timeout_ms: 60_000,
            grace_period_ms: 30_000,
            upstream_pool_size: 256,
            tenant_requests_per_second: 100,
            tenant_burst: 200,
            usage_queue_capacity: 65_536,
            runtime_secret: None,
            max_connections: 0,
            max_connections_per_client: 256,
        }
    }
}

/// The largest request body the proxy may be configured to buffer, validate and
/// rewrite.
pub const MAX_PROXY_BODY_BYTES: usize = 1024 * 1024;

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            filter: "info".into(),
        }
    }
}

/// Command-line overrides, the last layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub database_url: Option<String>,
}

impl Settings {
    /// Loads file (if any) < environment < overrides, then validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Settings, SettingsError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| SettingsError::File {
                        path: path.to_owned(),
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(SettingsError::Env {
                    name,
                    message: "empty key segment".into(),
                });
            }
            insert_path(&mut table, &path, toml::Value::String(value)).map_err(|message| {
                SettingsError::Env {
                    name: name.clone(),
                    message,
                }
            })?;
        }
        let mut settings: Settings =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| SettingsError::File {
                    path: file
                        .map(Path::to_owned)
                        .unwrap_or_else(|| "<environment>".into()),
                    message: e.message().to_owned(),
                })?;
        if let Some(dir) = &overrides.data_dir {
            settings.data_dir = dir.clone();
        }
        if let Some(listen) = &overrides.listen {
            settings.control_plane.listen = listen.clone();
        }
        if let Some(url) = &overrides.database_url {
            settings.control_plane.database_url = Some(url.clone());
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Parses a settings file's text alone (no environment), for checks of shipped files.
    pub fn from_toml_str(text: &str) -> Result<Settings, SettingsError> {
        let settings: Settings = toml::from_str(text).map_err(|e| SettingsError::File {
            path: "<string>".into(),
            message: e.message().to_owned(),
        })?;
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> Result<(), SettingsError> {
        let redis = &self.redis;
        if let Some(url) = &redis.url {
            use secrecy::ExposeSecret;
            if !url.expose_secret().starts_with("redis://") {
                return Err(SettingsError::Invalid(
                    "redis.url must start with redis:// (TLS is not supported yet)".into(),
                ));
            }
        }
        if !(1..=1000).contains(&redis.timeout_ms) {
            return Err(SettingsError::Invalid(
                "redis.timeout_ms must be between 1 and 1000".into(),
            ));
        }
        if !(1..=1000).contains(&redis.sync_interval_ms) {
            return Err(SettingsError::Invalid(
                "redis.sync_interval_ms must be between 1 and 1000".into(),
            ));
        }
        if redis.key_prefix.is_empty()
            || redis.key_prefix.len() > 64
            || !redis
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            return Err(SettingsError::Invalid(
                "redis.key_prefix must be 1-64 letters, digits, '_', '-' or '.'".into(),
            ));
        }
        let cp = &self.control_plane;
        cp.listen.parse::<SocketAddr>().map_err(|_| {
            SettingsError::Invalid(format!(
                "control_plane.listen {:?} is not an address like 127.0.0.1:8000",
                cp.listen
            ))
        })?;
        if let Some(url) = &cp.database_url {
            if !(url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.starts_with("sqlite:"))
            {
                return Err(SettingsError::Invalid(
                    "control_plane.database_url must start with postgres://, postgresql:// or sqlite:"
                        .into(),
                ));
            }
        }
        if !(1..=1000).contains(&cp.max_page_size) {
            return Err(SettingsError::Invalid(
                "control_plane.max_page_size must be between 1 and 1000".into(),
            ));
        }
        if cp.max_body_bytes < 1024 {
            return Err(SettingsError::Invalid(
                "control_plane.max_body_bytes must be at least 1024".into(),
            ));
        }
        if cp.max_document_bytes == 0 || cp.max_document_bytes > cp.max_body_bytes {
            return Err(SettingsError::Invalid(
                "control_plane.max_document_bytes must be between 1 and max_body_bytes".into(),
            ));
        }
        if cp.db_max_connections == 0 {
            return Err(SettingsError::Invalid(
                "control_plane.db_max_connections must be at least 1".into(),
            ));
        }
        if !(100..=3_600_000).contains(&cp.quota_count_ms) {
            return Err(SettingsError::Invalid(
                "control_plane.quota_count_ms must be between 100 and 3600000".into(),
            ));
        }
        if let Some(secret) = &cp.proxy_secret {
            use secrecy::ExposeSecret;
            if secret.expose_secret().len() < 16 {
                return Err(SettingsError::Invalid(
                    "control_plane.proxy_secret must be at least 16 characters".into(),
                ));
            }
        }
        if let Some(kek) = &cp.key_encryption_key {
            use secrecy::ExposeSecret;
            if decode_key(kek.expose_secret()).is_none() {
                return Err(SettingsError::Invalid(
                    "control_plane.key_encryption_key must be 32 bytes in base64 (e.g. `openssl rand -base64 32`)".into(),
                ));
            }
        }
        if let Some(url) = &self.runtime.url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(SettingsError::Invalid(
                    "runtime.url must start with http:// or https://".into(),
                ));
            }
            if self.runtime.api_key.is_none() {
                return Err(SettingsError::Invalid(
                    "runtime.api_key is required when runtime.url is set".into(),
                ));
            }
        }
        let st = &self.stripe;
        if !(st.api_base.starts_with("http://") || st.api_base.starts_with("https://")) {
            return Err(SettingsError::Invalid(
                "stripe.api_base must start with http:// or https://".into(),
            ));
        }
        if st.secret_key.is_some() && st.publishable_key.is_none() {
            return Err(SettingsError::Invalid(
                "stripe.publishable_key is required when stripe.secret_key is set".into(),
            ));
        }
        if !(1..=86_400).contains(&st.report_window_secs) {
            return Err(SettingsError::Invalid(
                "stripe.report_window_secs must be between 1 and 86400".into(),
            ));
        }
        if !(100..=3_600_000).contains(&st.report_every_ms) || st.timeout_ms == 0 {
            return Err(SettingsError::Invalid(
                "stripe.report_every_ms must be between 100 and 3600000 and stripe.timeout_ms positive"
                    .into(),
            ));
        }
        let w = &self.widget;
        if !(1..=MAX_VISITOR_SESSION_SECS).contains(&w.session_ttl_secs) {
            return Err(SettingsError::Invalid(format!(
                "widget.session_ttl_secs must be between 1 and {MAX_VISITOR_SESSION_SECS}"
            )));
        }
        if w.messages_per_minute == 0 || w.sessions_per_minute == 0 {
            return Err(SettingsError::Invalid(
                "widget.messages_per_minute and widget.sessions_per_minute must be at least 1"
                    .into(),
            ));
        }
        let px = &self.proxy;
        for (name, addr) in [("listen", &px.listen), ("admin_listen", &px.admin_listen)] {
            addr.parse::<SocketAddr>().map_err(|_| {
                SettingsError::Invalid(format!(
                    "proxy.{name} {addr:?} is not an address like 127.0.0.1:8080"
                ))
            })?;
        }
        if let Some(url) = &px.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(SettingsError::Invalid(
                    "proxy.public_url must start with http:// or https://".into(),
                ));
            }
        }
        if let Some(url) = &px.control_plane_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(SettingsError::Invalid(
                    "proxy.control_plane_url must start with http:// or https://".into(),
                ));
            }
        }
        if !(1..=64).contains(&px.threads) {
            return Err(SettingsError::Invalid(
                "proxy.threads must be between 1 and 64".into(),
            ));
        }
        if !(1024..=MAX_PROXY_BODY_BYTES).contains(&px.max_body_bytes) {
            return Err(SettingsError::Invalid(format!(
                "proxy.max_body_bytes must be between 1024 and {MAX_PROXY_BODY_BYTES}"
            )));
        }
        if px.connect_timeout_ms == 0 || px.read_timeout_ms == 0 {
            return Err(SettingsError::Invalid(
                "proxy.connect_timeout_ms and proxy.read_timeout_ms must be positive".into(),
            ));
        }
        if px.tenant_requests_per_second == 0 || px.tenant_burst == 0 {
            return Err(SettingsError::Invalid(
                "proxy.tenant_requests_per_second and proxy.tenant_burst must be positive".into(),
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&px.usage_queue_capacity) {
            return Err(SettingsError::Invalid(
                "proxy.usage_queue_capacity must be between 1024 and 16777216".into(),
            ));
        }
        if let Some(secret) = &px.runtime_secret {
            use secrecy::ExposeSecret;
            if secret.expose_secret().len() < 16 {
                return Err(SettingsError::Invalid(
                    "proxy.runtime_secret must be at least 16 characters".into(),
                ));
            }
        }
        let us = &self.usage;
        if us.store == UsageStoreKind::Clickhouse {
            match &us.clickhouse_url {
                Some(url) if url.starts_with("http://") || url.starts_with("https://") => {}
                _ => {
                    return Err(SettingsError::Invalid(
                        "usage.clickhouse_url (http:// or https://) is required when usage.store is clickhouse".into(),
                    ))
                }
            }
            if us.clickhouse_database.is_empty()
                || !us
                    .clickhouse_database
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(SettingsError::Invalid(
                    "usage.clickhouse_database must be letters, digits and _".into(),
                ));
            }
        }
        if !(1..=1_000_000).contains(&us.batch_max_events) {
            return Err(SettingsError::Invalid(
                "usage.batch_max_events must be between 1 and 1000000".into(),
            ));
        }
        if !(1..=60_000).contains(&us.batch_max_ms) {
            return Err(SettingsError::Invalid(
                "usage.batch_max_ms must be between 1 and 60000".into(),
            ));
        }
        // A batch must fit in the log many times over (about 150 bytes an event).
        if us.spill_max_bytes < 1024 * 1024
            || us.spill_max_bytes < us.batch_max_events as u64 * 2048
        {
            return Err(SettingsError::Invalid(
                "usage.spill_max_bytes must be at least 1048576 and at least 2048 bytes per usage.batch_max_events".into(),
            ));
        }
        if self.runtime.timeout_ms == 0 {
            return Err(SettingsError::Invalid(
                "runtime.timeout_ms must be positive".into(),
            ));
        }
        Ok(())
    }

    /// The control plane URL the proxy reads its snapshot feed from.
    pub fn proxy_control_plane_url(&self) -> String {
        match &self.proxy.control_plane_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{}", self.control_plane.listen),
        }
    }

    /// The gateways' public base URL, without a trailing slash.
    pub fn gateway_public_url(&self) -> String {
        match &self.proxy.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{}", self.proxy.listen),
        }
    }

    /// Where the proxy keeps its last snapshot.
    pub fn proxy_snapshot_path(&self) -> PathBuf {
        self.proxy
            .snapshot_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("proxy-snapshot.json"))
    }

    /// The embedded usage store's file.
    pub fn usage_embedded_path(&self) -> PathBuf {
        self.usage
            .embedded_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("usage.db"))
    }

    /// The usage spill log's file.
    pub fn usage_spill_path(&self) -> PathBuf {
        self.usage
            .spill_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("usage-spill.log"))
    }

    /// The database URL in force: the configured one, else SQLite under `data_dir`.
    pub fn database_url(&self) -> String {
        match &self.control_plane.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("agora.db").display()
            ),
        }
    }
}

/// Decodes a 32-byte key given in base64 (standard or URL-safe, padded or not).
pub fn decode_key(text: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    let text = text.trim();
    let engines = [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    engines
        .iter()
        .find_map(|e| e.decode(text).ok())
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
}

/// Reads a whole number given as a number (TOML) or as a string holding one
/// (environment). The value itself is never echoed: it may be a misplaced secret.
fn number<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrText {
        Number(u64),
        Text(String),
    }
    let value = match NumberOrText::deserialize(deserializer)
        .map_err(|_| serde::de::Error::custom("expected a whole number"))?
    {
        NumberOrText::Number(n) => n,
        NumberOrText::Text(t) => t
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom("expected a whole number"))?,
    };
    T::try_from(value).map_err(|_| serde::de::Error::custom("number out of range"))
}

/// Cores this process may run on (at least 1, at most 64: `proxy.threads`' bounds).
pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 64)
}

/// A whole number, or `auto` for [`available_cores`].
fn threads_or_auto<'de, D>(deserializer: D) -> Result<usize, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrText {
        Number(u64),
        Text(String),
    }
    let bad = || serde::de::Error::custom("expected a whole number or \"auto\"");
    match NumberOrText::deserialize(deserializer).map_err(|_| bad())? {
        NumberOrText::Number(n) => usize::try_from(n).map_err(|_| bad()),
        NumberOrText::Text(t) if t.trim().eq_ignore_ascii_case("auto") => Ok(available_cores()),
        NumberOrText::Text(t) => t.trim().parse().map_err(|_| bad()),
    }
}

fn insert_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty name")?;
    let mut current = table;
    for key in parents {
        let entry = current
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .ok_or_else(|| format!("{key} is a value, not a section"))?;
    }
    current.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let s = Settings::load(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(s.control_plane.listen, "127.0.0.1:8000");
        assert!(s.database_url().starts_with("sqlite://"));
    }

    #[test]
    fn proxy_threads_default_to_the_cores_and_take_auto_or_a_number() {
        let cores = std::thread::available_parallelism().unwrap().get().min(64);
        let s = Settings::load(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(s.proxy.threads, cores);
        let s = Settings::from_toml_str("[proxy]\nthreads = \"auto\"\n").unwrap();
        assert_eq!(s.proxy.threads, cores);
        let s = Settings::load(
            None,
            env(&[("AGORA_PROXY__THREADS", "3")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(s.proxy.threads, 3);
        for bad in ["\"many\"", "0", "65"] {
            assert!(
                Settings::from_toml_str(&format!("[proxy]\nthreads = {bad}\n")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn redis_is_off_by_default_and_its_url_is_checked_and_never_printed() {
        let s = Settings::load(None, env(&[]), &Overrides::default()).unwrap();
        assert!(s.redis.url.is_none());
        assert_eq!((s.redis.timeout_ms, s.redis.sync_interval_ms), (25, 20));
        let s = Settings::load(
            None,
            env(&[
                ("AGORA_REDIS__URL", "redis://:hunter2@redis:6379/1"),
                ("AGORA_REDIS__TIMEOUT_MS", "40"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(s.redis.timeout_ms, 40);
        let printed = format!("{s:?}");
        assert!(
            printed.contains("redis:6379/1") && !printed.contains("hunter2"),
            "{printed}"
        );
        for bad in [
            "url = \"http://redis\"",
            "timeout_ms = 0",
            "sync_interval_ms = 5000",
            "key_prefix = \"a b\"",
            "key_prefix = \"\"",
        ] {
            assert!(
                Settings::from_toml_str(&format!("[redis]\n{bad}\n")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = std::env::temp_dir().join(format!("agora-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.toml");
        std::fs::write(
            &file,
            "[control_plane]\nlisten = \"127.0.0.1:1111\"\nmax_page_size = 10\n",
        )
        .unwrap();
        let s = Settings::load(
            Some(&file),
            env(&[
                ("AGORA_CONTROL_PLANE__MAX_PAGE_SIZE", "20"),
                ("AGORA_RUNTIME__URL", "http://127.0.0.1:7860"),
                ("AGORA_RUNTIME__API_KEY", "sk-1"),
                ("UNRELATED", "x"),
            ]),
            &Overrides {
                listen: Some("127.0.0.1:2222".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(s.control_plane.max_page_size, 20);
        assert_eq!(s.control_plane.listen, "127.0.0.1:2222");
        assert_eq!(s.runtime.api_key.unwrap().expose_secret(), "sk-1");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(Settings::from_toml_str("[control_plane]\nlisten_addr = \"x\"\n").is_err());
        assert!(Settings::from_toml_str("typo = 1\n").is_err());
        let err = Settings::load(
            None,
            env(&[("AGORA_CONTROL_PLANE__LISTN", "127.0.0.1:1")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
    }

    #[test]
    fn invalid_values_are_errors() {
        for text in [
            "[control_plane]\nlisten = \"nope\"\n",
            "[control_plane]\nmax_page_size = 0\n",
            "[control_plane]\ndatabase_url = \"mysql://x\"\n",
            "[runtime]\nurl = \"http://x\"\n",
            "[runtime]\nurl = \"ftp://x\"\napi_key = \"k\"\n",
        ] {
            assert!(Settings::from_toml_str(text).is_err(), "{text}");
        }
    }

    #[test]
    fn environment_values_are_strings_unless_a_number_is_wanted() {
        let s = Settings::load(
            None,
            env(&[
                ("AGORA_RUNTIME__URL", "http://127.0.0.1:7860"),
                ("AGORA_RUNTIME__API_KEY", "1234567890"),
                ("AGORA_RUNTIME__TIMEOUT_MS", "2500"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(s.runtime.api_key.unwrap().expose_secret(), "1234567890");
        assert_eq!(s.runtime.timeout_ms, 2500);
        let err = Settings::load(
            None,
            env(&[("AGORA_CONTROL_PLANE__MAX_PAGE_SIZE", "hunter2-secret")]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("whole number") && !err.contains("hunter2"),
            "{err}"
        );
    }

    #[test]
    fn debug_does_not_print_the_database_password() {
        let s = Settings::from_toml_str(
            "[control_plane]\ndatabase_url = \"postgres://agora:db-password-123@db:5432/agora\"\n",
        )
        .unwrap();
        let printed = format!("{s:?}");
        assert!(
            !printed.contains("db-password-123") && printed.contains("agora:***@db"),
            "{printed}"
        );
    }

    #[test]
    fn debug_does_not_print_the_runtime_key() {
        let s = Settings::from_toml_str(
            "[runtime]\nurl = \"http://127.0.0.1:1\"\napi_key = \"very-secret-runtime-key\"\n",
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("very-secret-runtime-key"));
    }
}
