//! The agent runtime (Langflow) client: provisioning flows on publish.
//! See the runtime contract: `POST /api/v1/flows/` with `x-api-key` answers
//! 201 with the created flow, whose `id` the proxy later runs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agora_config::settings::RuntimeSettings;
use secrecy::{ExposeSecret, SecretString};

use crate::flow_code::Catalog;

/// How long a runtime's component catalog is reused before it is read again.
const CATALOG_TTL: Duration = Duration::from_secs(300);
/// Langflow builds its catalog on the first request after a start, which can
/// take tens of seconds on a small machine; later reads take a fraction of one.
const CATALOG_TIMEOUT: Duration = Duration::from_secs(90);

/// The last catalog read, and when.
type CachedCatalog = Arc<Mutex<Option<(Instant, Arc<Catalog>)>>>;

#[derive(Clone)]
pub struct RuntimeClient {
    base: String,
    api_key: SecretString,
    http: reqwest::Client,
    timeout: Duration,
    catalog: CachedCatalog,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the runtime at {url} could not be reached: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the runtime refused our API key (HTTP {status})")]
    Unauthorized { status: u16 },
    #[error("the runtime rejected the flow (HTTP {status}): {detail}")]
    Rejected { status: u16, detail: String },
    #[error("the runtime answered without a flow id")]
    NoFlowId,
    #[error("the runtime's component catalog could not be read: {reason}")]
    NoCatalog { reason: String },
}

impl RuntimeError {
    /// What a seller is told; the details (addresses, runtime bodies) stay in the log.
    pub fn public_message(&self) -> &'static str {
        match self {
            RuntimeError::Unreachable { .. } => {
                "the agent runtime could not be reached; try again later"
            }
            RuntimeError::Unauthorized { .. } => {
                "the agent runtime refused the platform's credentials"
            }
            RuntimeError::Rejected { .. } => "the agent runtime rejected the flow",
            RuntimeError::NoFlowId => "the agent runtime answered without a flow id",
            RuntimeError::NoCatalog { .. } => {
                "the agent runtime's component catalog could not be read; try again later"
            }
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            RuntimeError::Unreachable { .. } => "runtime_unreachable",
            RuntimeError::Unauthorized { .. } => "runtime_unauthorized",
            RuntimeError::Rejected { .. } => "runtime_rejected",
            RuntimeError::NoFlowId => "runtime_bad_response",
            RuntimeError::NoCatalog { .. } => "runtime_catalog_unavailable",
        }
    }
}

impl RuntimeClient {
    pub fn from_settings(settings: &RuntimeSettings) -> anyhow::Result<Option<RuntimeClient>> {
        let (Some(url), Some(key)) = (&settings.url, &settings.api_key) else {
            return Ok(None);
        };
        Ok(Some(RuntimeClient::new(
            url,
            key.clone(),
            Duration::from_millis(settings.timeout_ms),
        )?))
    }

    pub fn new(
        base: &str,
        api_key: SecretString,
        timeout: Duration,
    ) -> anyhow::Result<RuntimeClient> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()?;
        Ok(RuntimeClient {
            base: base.trim_end_matches('/').to_owned(),
            api_key,
            http,
            timeout,
            catalog: Arc::default(),
        })
    }

    /// The runtime's component catalog (`GET /api/v1/all`), read at most every
    /// [`CATALOG_TTL`].
    pub async fn catalog(&self) -> Result<Arc<Catalog>, RuntimeError> {
        if let Some((at, catalog)) = self.cached_catalog() {
            if at.elapsed() < CATALOG_TTL {
                return Ok(catalog);
            }
        }
        let fail = |reason: String| RuntimeError::NoCatalog { reason };
        let response = self
            .http
            .get(format!("{}/api/v1/all", self.base))
            .header("x-api-key", self.api_key.expose_secret())
            .timeout(CATALOG_TIMEOUT.max(self.timeout))
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let status = response.status().as_u16();
        if status == 401 || status == 403 {
            return Err(RuntimeError::Unauthorized { status });
        }
        if status != 200 {
            return Err(fail(format!("HTTP {status}")));
        }
        let all: serde_json::Value = response.json().await.map_err(|e| fail(without_url(&e)))?;
        let catalog = Catalog::from_all(&all);
        if catalog.is_empty() {
            return Err(fail("it lists no components".into()));
        }
        let catalog = Arc::new(catalog);
        *self.catalog.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), Arc::clone(&catalog)));
        Ok(catalog)
    }

    fn unreachable(&self, e: &reqwest::Error) -> RuntimeError {
        RuntimeError::Unreachable {
            url: self.base.clone(),
            reason: without_url(e),
        }
    }

    fn cached_catalog(&self) -> Option<(Instant, Arc<Catalog>)> {
        self.catalog
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(at, c)| (*at, Arc::clone(c)))
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Creates the flow on the runtime and returns its id. The export's own
    /// `id` and `endpoint_name` are dropped (they are unique per runtime) and
    /// the flow is named after the agent.
    pub async fn provision(
        &self,
        flow: &serde_json::Value,
        name: &str,
    ) -> Result<String, RuntimeError> {
        let mut body = flow.clone();
        if let Some(obj) = body.as_object_mut() {
            obj.remove("id");
            obj.remove("endpoint_name");
            obj.remove("user_id");
            obj.remove("folder_id");
            obj.insert("name".into(), name.into());
            obj.insert("is_component".into(), false.into());
        }
        let url = format!("{}/api/v1/flows/", self.base);
        let response = self
            .http
            .post(&url)
            .header("x-api-key", self.api_key.expose_secret())
            .json(&body)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| self.unreachable(&e))?;
        match status {
            200 | 201 => {}
            401 | 403 => return Err(RuntimeError::Unauthorized { status }),
            _ => {
                return Err(RuntimeError::Rejected {
                    status,
                    detail: detail_of(&text),
                })
            }
        }
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_owned))
            .filter(|id| !id.is_empty())
            .ok_or(RuntimeError::NoFlowId)
    }
}

fn without_url(e: &reqwest::Error) -> String {
    let mut reason = e.to_string();
    if let Some(url) = e.url() {
        reason = reason.replace(url.as_str(), "");
    }
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection refused or failed".into()
    } else {
        reason
    }
}

/// Langflow's errors are `{"detail": …}`; keep the message short.
fn detail_of(text: &str) -> String {
    let detail = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("detail").cloned())
        .map(|d| match d {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        })
        .unwrap_or_else(|| text.to_owned());
    detail.chars().take(500).collect()
}
