//! Agora's **demo** agent runtime: an in-memory HTTP server speaking the
//! Langflow 1.13 run contract (see `RUNTIME.md`), for tests and `agora up`.
//!
//! It stores posted flows and plays them with a tiny interpreter: a chat
//! input → chat output flow echoes its input; a model-like component answers
//! `ECHO: <input>`, streamed word by word as `token` events and reporting
//! `properties.usage`; a `RaiseError` component fails when its input contains
//! `boom`. No model is called and nothing leaves the process.
//!
//! Wire behaviour follows the captures of a real Langflow server: statuses,
//! `{"detail": ...}` error bodies, content-length framing and gzip (≥ 1000
//! bytes) for JSON bodies, chunked `text/event-stream` with one
//! Python-`json.dumps`-encoded event per chunk for streams. A stream whose
//! client disconnects stops producing and counts as cancelled in
//! [`DemoRuntime::stats`].

mod catalog;
mod error;
mod flow;
mod history;
mod http;
mod message;
mod pyjson;
mod run;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;

pub use catalog::code_of;
pub use error::ApiError;
pub use message::Usage;
pub use run::count_tokens;

use run::{Plan, PlanError, RunEnd, RunRequest, Sink};

/// Settings of a [`DemoRuntime`]. Holds the API key, so it has no `Debug`.
#[derive(Clone)]
pub struct RuntimeConfig {
    /// The only key `x-api-key` (header or query) is accepted with.
    pub api_key: String,
    /// Pause before each streamed token of a model component.
    pub token_delay: Duration,
}

impl RuntimeConfig {
    /// Default token delay: a few milliseconds, enough for a client to see
    /// the first bytes of a stream before the run ends.
    pub const DEFAULT_TOKEN_DELAY: Duration = Duration::from_millis(5);

    pub fn new(api_key: impl Into<String>) -> RuntimeConfig {
        RuntimeConfig {
            api_key: api_key.into(),
            token_delay: Self::DEFAULT_TOKEN_DELAY,
        }
    }
}

/// Counters of runs, shared with the server. A run is *started* once its
/// request was accepted, then either *completed* (including a run ended by a
/// failing component) or *cancelled* (its client went away first).
#[derive(Default, Debug)]
pub struct RunStats {
    pub runs_started: AtomicU64,
    pub runs_completed: AtomicU64,
    pub runs_cancelled: AtomicU64,
}

impl RunStats {
    pub fn started(&self) -> u64 {
        self.runs_started.load(Ordering::SeqCst)
    }
    pub fn completed(&self) -> u64 {
        self.runs_completed.load(Ordering::SeqCst)
    }
    pub fn cancelled(&self) -> u64 {
        self.runs_cancelled.load(Ordering::SeqCst)
    }
}

/// Counts a run as started; as completed on [`RunGuard::finish`], as
/// cancelled if dropped before.
struct RunGuard {
    stats: Arc<RunStats>,
    finished: bool,
}

impl RunGuard {
    fn start(stats: &Arc<RunStats>) -> RunGuard {
        stats.runs_started.fetch_add(1, Ordering::SeqCst);
        RunGuard {
            stats: Arc::clone(stats),
            finished: false,
        }
    }

    fn finish(mut self) {
        self.finished = true;
        self.stats.runs_completed.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.stats.runs_cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

struct AppState {
    api_key: String,
    token_delay: Duration,
    flows: flow::FlowStore,
    history: history::History,
    stats: Arc<RunStats>,
}

/// The demo runtime: flows by id and endpoint name, in memory.
pub struct DemoRuntime {
    state: Arc<AppState>,
}

impl DemoRuntime {
    pub fn new(config: RuntimeConfig) -> DemoRuntime {
        DemoRuntime {
            state: Arc::new(AppState {
                api_key: config.api_key,
                token_delay: config.token_delay,
                flows: flow::FlowStore::default(),
                history: history::History::default(),
                stats: Arc::new(RunStats::default()),
            }),
        }
    }

    /// Restores a flow created on an earlier instance under its id, so
    /// callers holding that id keep working after a restart. The flow is the one
    /// that was published: nodes given this runtime's code then get it again.
    pub fn load_flow(&self, id: uuid::Uuid, flow: &Value) {
        let (mut nodes, edges) = graph(flow);
        for node in nodes.iter_mut().filter(|n| lacks_code(n)) {
            let ty = node
                .pointer("/data/type")
                .and_then(Value::as_str)
                .unwrap_or("");
            if let (Some(code), Some(template)) = (
                catalog::code_of(ty),
                node.pointer_mut("/data/node/template")
                    .and_then(Value::as_object_mut),
            ) {
                template.insert("code".into(), json!({"type": "code", "value": code}));
            }
        }
        self.state.flows.insert_as(id, None, nodes, edges);
    }

    /// A handle on the run counters; stays valid after [`DemoRuntime::router`].
    pub fn stats(&self) -> Arc<RunStats> {
        Arc::clone(&self.state.stats)
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/health", get(health))
            .route("/api/v1/flows/", post(create_flow))
            .route("/api/v1/flows", post(create_flow))
            .route("/api/v1/all", get(all_components))
            .route("/api/v1/monitor/messages", get(messages))
            .route("/api/v1/monitor/messages/sessions", get(sessions))
            .route(
                "/api/v1/run/{flow}",
                post(run_flow).fallback(method_not_allowed),
            )
            .fallback(not_found)
            .with_state(self.state)
    }

    /// Serves until the listener fails.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }
}

/// A flow export's `data.nodes` and `data.edges` (empty when absent).
fn graph(flow: &Value) -> (Vec<Value>, Vec<Value>) {
    let list = |key: &str| -> Vec<Value> {
        flow.get("data")
            .and_then(|d| d.get(key))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    (list("nodes"), list("edges"))
}

async fn health() -> Response {
    http::json_response(StatusCode::OK, br#"{"status":"ok"}"#.to_vec(), false)
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

impl AppState {
    /// Langflow's API-key check: `x-api-key` header, else `?x-api-key=`.
    /// `Authorization` is not looked at.
    fn authorize(
        &self,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
    ) -> Result<(), ApiError> {
        let presented = headers
            .get("x-api-key")
            .map(|v| v.as_bytes())
            .or_else(|| query.get("x-api-key").map(|v| v.as_bytes()))
            .filter(|k| !k.is_empty())
            .ok_or(ApiError::MissingKey)?;
        if bool::from(presented.ct_eq(self.api_key.as_bytes())) {
            Ok(())
        } else {
            Err(ApiError::InvalidKey)
        }
    }
}

fn query_map(uri: &Uri) -> HashMap<String, String> {
    Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map(|q| q.0.into_iter().rev().collect())
        .unwrap_or_default()
}

fn parse_bool(name: &'static str, raw: Option<&String>) -> Result<bool, ApiError> {
    let Some(raw) = raw else {
        return Ok(false);
    };
    match raw.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" | "t" | "y" => Ok(true),
        "false" | "0" | "no" | "off" | "f" | "n" => Ok(false),
        _ => Err(ApiError::BadBool {
            name,
            input: raw.clone(),
        }),
    }
}

async fn create_flow(
    State(state): State<Arc<AppState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|_| ApiError::BodyUnreadable)?;
    let value = run::decode_json(&body)?;
    state.authorize(&headers, &query_map(&uri))?;
    let Value::Object(mut flow) = value else {
        return Err(ApiError::MissingField("name"));
    };
    if !flow.get("name").is_some_and(Value::is_string) {
        return Err(ApiError::MissingField("name"));
    }
    let (nodes, edges) = graph(&Value::Object(flow.clone()));
    let endpoint = flow
        .get("endpoint_name")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let (id, endpoint) = state.flows.insert(endpoint, nodes, edges);

    let now = time::OffsetDateTime::now_utc();
    let updated_at = now
        .format(&time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second]+00:00"
        ))
        .unwrap_or_default();
    let defaults = json!({
        "description": null, "icon": null, "icon_bg_color": null, "gradient": null, "data": null,
        "is_component": false, "webhook": false, "tags": null, "locked": false,
        "mcp_enabled": false, "action_name": null, "action_description": null, "access_type": "PRIVATE",
        "flow_type": "workflow", "a2a_enabled": false, "a2a_card_overrides": null,
        "user_id": uuid::Uuid::nil(), "folder_id": uuid::Uuid::nil(), "workspace_id": null,
        "name_key": null,
    });
    if let Value::Object(defaults) = defaults {
        for (k, v) in defaults {
            flow.entry(k).or_insert(v);
        }
    }
    flow.insert("updated_at".into(), json!(updated_at));
    flow.insert("endpoint_name".into(), json!(endpoint));
    flow.insert("id".into(), json!(id));
    flow.insert("version_token".into(), json!(uuid::Uuid::new_v4()));
    let body = serde_json::to_vec(&Value::Object(flow)).unwrap_or_default();
    Ok(http::json_response(
        StatusCode::CREATED,
        body,
        http::accepts_gzip(&headers),
    ))
}

async fn run_flow(
    State(state): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(flow_ref) = path.map_err(|_| ApiError::NotFound)?;
    let query = query_map(&uri);
    let stream = parse_bool("stream", query.get("stream"))?;
    let body = body.map_err(|_| ApiError::BodyUnreadable)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let request = RunRequest::parse(&body, content_type)?;
    state.authorize(&headers, &query)?;
    let flow = state
        .flows
        .get(&flow_ref)
        .ok_or_else(|| ApiError::FlowNotFound(flow_ref.clone()))?;

    // Langflow builds every component from its `template.code`: a node without
    // it cannot be built, and the run fails before it starts.
    if flow.nodes.iter().any(lacks_code) {
        let detail = "Error while creating graph from payload: 'code'";
        if stream {
            return Ok(stream_message_error(detail));
        }
        let inner = json!({"message": detail, "traceback": null, "description": null,
                           "code": null, "suggestion": null});
        return Err(ApiError::RunFailed(inner.to_string()));
    }

    let plan = match Plan::new(&flow, request) {
        Ok(plan) => plan,
        Err(e) if stream => return Ok(stream_error(e)),
        Err(PlanError::TweakConflict) => return Err(ApiError::TweakConflict),
        Err(PlanError::Refused(fields)) => return Err(ApiError::TweaksRefused(fields)),
    };

    if stream {
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        let guard = RunGuard::start(&state.stats);
        let token_delay = state.token_delay;
        let app = Arc::clone(&state);
        tokio::spawn(async move {
            let sink = Sink::Stream { tx, token_delay };
            if let Ok(end) = plan.execute(&sink).await {
                if let RunEnd::Done(outcome) = &end {
                    outcome.messages().for_each(|m| app.history.record(m));
                }
                guard.finish();
            }
        });
        return Ok(http::event_stream(rx));
    }

    let guard = RunGuard::start(&state.stats);
    let end = plan.execute(&Sink::Collect).await;
    match end {
        Ok(RunEnd::Done(outcome)) => {
            guard.finish();
            outcome.messages().for_each(|m| state.history.record(m));
            let body = serde_json::to_vec(&outcome.response()).unwrap_or_default();
            Ok(http::json_response(
                StatusCode::OK,
                body,
                http::accepts_gzip(&headers),
            ))
        }
        Ok(RunEnd::Failed(failed)) => {
            guard.finish();
            Err(ApiError::RunFailed(failed.detail))
        }
        // A collecting sink never cancels; the guard counts it if it did.
        Err(run::Cancelled) => Err(ApiError::RunFailed("run cancelled".to_owned())),
    }
}

/// A stream that fails before the run starts: 200 with a single `error` event.
fn stream_error(error: PlanError) -> Response {
    stream_message_error(&error.stream_message())
}

fn stream_message_error(message: &str) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let event = message::Event {
        event: "error",
        data: message::ErrorData { error: message },
    };
    let mut bytes = pyjson::to_vec(&event).unwrap_or_default();
    bytes.extend_from_slice(b"\n\n");
    let _ = tx.try_send(Bytes::from(bytes));
    drop(tx);
    http::event_stream(rx)
}

/// A component node (not a note) whose template has no `code`.
fn lacks_code(node: &Value) -> bool {
    let component = node.get("type").and_then(Value::as_str) != Some("noteNode");
    component
        && node
            .pointer("/data/node/template/code")
            .and_then(|c| c.get("value"))
            .and_then(Value::as_str)
            .is_none()
}

async fn all_components(
    State(state): State<Arc<AppState>>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, &query_map(&uri))?;
    Ok(json_ok(&headers, &catalog::all()))
}

async fn messages(
    State(state): State<Arc<AppState>>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let query = query_map(&uri);
    state.authorize(&headers, &query)?;
    let list = state.history.list(
        query.get("session_id").map(String::as_str),
        query.get("flow_id").map(String::as_str),
    );
    Ok(json_ok(&headers, &list))
}

async fn sessions(
    State(state): State<Arc<AppState>>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, &query_map(&uri))?;
    Ok(json_ok(&headers, &state.history.sessions()))
}

/// A 200 with `value` as JSON, gzipped as Langflow does when the client takes it.
fn json_ok<T: serde::Serialize>(headers: &HeaderMap, value: &T) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    http::json_response(StatusCode::OK, body, http::accepts_gzip(headers))
}
