//! The agent runtime (Langflow) client: provisioning flows on publish.
//! See the runtime contract: `POST /api/v1/flows/` with `x-api-key` answers
//! 201 with the created flow, whose `id` the proxy later runs.

use std::time::Duration;

use agora_config::settings::RuntimeSettings;
use secrecy::{ExposeSecret, SecretString};

#[derive(Clone)]
pub struct RuntimeClient {
    base: String,
    api_key: SecretString,
    http: reqwest::Client,
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
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            RuntimeError::Unreachable { .. } => "runtime_unreachable",
            RuntimeError::Unauthorized { .. } => "runtime_unauthorized",
            RuntimeError::Rejected { .. } => "runtime_rejected",
            RuntimeError::NoFlowId => "runtime_bad_response",
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
        })
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
            .map_err(|e| RuntimeError::Unreachable {
                url: self.base.clone(),
                reason: without_url(&e),
            })?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .map_err(|e| RuntimeError::Unreachable {
                url: self.base.clone(),
                reason: without_url(&e),
            })?;
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
