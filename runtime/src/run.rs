//! Running a flow: the request body, the interpreter and the events it emits.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::error::ApiError;
use crate::flow::{apply_tweaks, Flow, Kind, Node};
use crate::message::{
    Artifacts, ChatLogMessage, EndData, ErrorData, Event, Message, MessageArtifacts, OutputValue,
    Properties, ReprArtifact, ResultData, RunFailure, RunOutputs, RunResponse, Source, TokenData,
    Usage,
};
use crate::pyjson;

/// The fields of a run request the runtime understands.
#[derive(Default, Debug)]
pub struct RunRequest {
    pub input_value: Option<String>,
    pub output_type: Option<String>,
    pub output_component: Option<String>,
    pub tweaks: Map<String, Value>,
    pub session_id: Option<String>,
}

const INPUT_TYPES: &[&str] = &["chat", "text", "any"];
const OUTPUT_TYPES: &[&str] = &["chat", "text", "any", "debug"];

impl RunRequest {
    /// Parses the body Langflow accepts: empty, JSON (plain or embedded under
    /// `input_request`) or a multipart form. Like Langflow, a valid JSON value
    /// that is not a valid request is dropped and the flow runs with its stored
    /// input; only undecodable JSON is an error.
    pub fn parse(body: &[u8], content_type: Option<&str>) -> Result<RunRequest, ApiError> {
        if let Some(boundary) = content_type.and_then(multipart_boundary) {
            return Ok(Self::from_value(&multipart_fields(body, &boundary)).unwrap_or_default());
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(RunRequest::default());
        }
        let value = decode_json(body)?;
        let value = match value.as_object() {
            Some(obj)
                if obj.len() == 1 && obj.get("input_request").is_some_and(Value::is_object) =>
            {
                obj.get("input_request").cloned().unwrap_or_default()
            }
            _ => value,
        };
        Ok(Self::from_value(&value).unwrap_or_default())
    }

    fn from_value(value: &Value) -> Option<RunRequest> {
        let obj = value.as_object()?;
        let opt_str = |key: &str| -> Option<Option<String>> {
            match obj.get(key) {
                None | Some(Value::Null) => Some(None),
                Some(Value::String(s)) => Some(Some(s.clone())),
                Some(_) => None,
            }
        };
        let input_type = opt_str("input_type")?;
        if input_type
            .as_deref()
            .is_some_and(|t| !INPUT_TYPES.contains(&t))
        {
            return None;
        }
        let output_type = opt_str("output_type")?;
        if output_type
            .as_deref()
            .is_some_and(|t| !OUTPUT_TYPES.contains(&t))
        {
            return None;
        }
        let tweaks = match obj.get("tweaks") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(Value::String(s)) => serde_json::from_str::<Map<String, Value>>(s).ok()?,
            Some(_) => return None,
        };
        opt_str("user_id")?;
        Some(RunRequest {
            input_value: opt_str("input_value")?,
            output_type,
            output_component: opt_str("output_component")?.filter(|s| !s.is_empty()),
            tweaks,
            session_id: opt_str("session_id")?,
        })
    }
}

/// Decodes JSON; on failure the error carries the character offset Python reports.
pub fn decode_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let text = String::from_utf8_lossy(body);
        let mut pos = 0usize;
        for (i, line) in text.split('\n').enumerate() {
            if i + 1 == e.line() {
                pos += e.column().min(line.chars().count());
                break;
            }
            pos += line.chars().count() + 1;
        }
        ApiError::JsonInvalid { pos }
    })
}

fn multipart_boundary(content_type: &str) -> Option<String> {
    let (mime, params) = content_type.split_once(';')?;
    if !mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// The text fields of a multipart form, as a JSON object of strings.
fn multipart_fields(body: &[u8], boundary: &str) -> Value {
    let body = String::from_utf8_lossy(body);
    let delimiter = format!("--{boundary}");
    let mut fields = Map::new();
    for part in body.split(delimiter.as_str()).skip(1) {
        if part.starts_with("--") {
            break;
        }
        let Some((head, content)) = part.split_once("\r\n\r\n") else {
            continue;
        };
        let name = head.lines().find_map(|line| {
            let (_, rest) = line.split_once("name=\"")?;
            Some(rest.split('"').next()?.to_owned())
        });
        if let Some(name) = name {
            let content = content.strip_suffix("\r\n").unwrap_or(content);
            fields.insert(name, Value::String(content.to_owned()));
        }
    }
    Value::Object(fields)
}

/// A run ready to execute: tweaks applied, inputs resolved.
pub struct Plan {
    flow_id: String,
    session_id: String,
    run_id: String,
    /// `input_value` as sent; `None` when the request carried none.
    request_input: Option<String>,
    input_text: String,
    output_type: String,
    output_component: Option<String>,
    nodes: Vec<Node>,
}

/// A request that cannot run on this flow.
#[derive(Debug)]
pub enum PlanError {
    TweakConflict,
    Refused(Vec<String>),
}

impl PlanError {
    pub const CONFLICT: &'static str =
        "If you pass an input_value to the chat input, you cannot pass a tweak with the same name.";
    pub const PROTECTED: &'static str =
        "The field is protected and keeps the value set by the flow author.";

    /// The message Langflow sends in a stream's `error` event.
    pub fn stream_message(&self) -> String {
        match self {
            PlanError::TweakConflict => Self::CONFLICT.to_owned(),
            PlanError::Refused(fields) => {
                let list: Vec<String> = fields.iter().map(|f| format!("'{f}'")).collect();
                format!(
                    "Refused tweak keys [{}]: {}",
                    list.join(", "),
                    Self::PROTECTED
                )
            }
        }
    }
}

impl Plan {
    pub fn new(flow: &Flow, request: RunRequest) -> Result<Plan, PlanError> {
        let mut nodes = flow.chain();
        apply_tweaks(&mut nodes, &request.tweaks).map_err(|r| PlanError::Refused(r.0))?;
        let chat_input = nodes.iter().find(|n| n.kind == Kind::ChatInput);
        if request.input_value.is_some()
            && chat_input.is_some_and(|n| n.tweaked.iter().any(|f| f == "input_value"))
        {
            return Err(PlanError::TweakConflict);
        }
        let stored = chat_input
            .and_then(|n| n.str_field("input_value"))
            .unwrap_or("")
            .to_owned();
        let flow_id = flow.id.to_string();
        Ok(Plan {
            session_id: request
                .session_id
                .clone()
                .unwrap_or_else(|| flow_id.clone()),
            flow_id,
            run_id: Uuid::new_v4().to_string(),
            input_text: request.input_value.clone().unwrap_or(stored),
            request_input: request.input_value,
            output_type: request.output_type.unwrap_or_else(|| "chat".to_owned()),
            output_component: request.output_component,
            nodes,
        })
    }
}

/// A component failed; carries the `detail` Langflow would send.
pub struct RunFailed {
    pub detail: String,
}

/// The client went away; the run stopped.
pub struct Cancelled;

pub enum Sink {
    /// Non-stream run: nothing is emitted, models answer at once.
    Collect,
    /// Stream run: events go to the response body, tokens paced by `token_delay`.
    Stream {
        tx: mpsc::Sender<Bytes>,
        token_delay: Duration,
    },
}

impl Sink {
    async fn emit<T: Serialize>(&self, event: &str, data: T) -> Result<(), Cancelled> {
        let Sink::Stream { tx, .. } = self else {
            return Ok(());
        };
        let mut bytes = match pyjson::to_vec(&Event { event, data }) {
            Ok(bytes) => bytes,
            Err(_) => return Ok(()),
        };
        bytes.extend_from_slice(b"\n\n");
        tx.send(Bytes::from(bytes)).await.map_err(|_| Cancelled)
    }

    async fn pause(&self, override_delay: Option<Duration>) -> Result<(), Cancelled> {
        let Sink::Stream { tx, token_delay } = self else {
            return Ok(());
        };
        tokio::select! {
            () = tokio::time::sleep(override_delay.unwrap_or(*token_delay)) => Ok(()),
            () = tx.closed() => Err(Cancelled),
        }
    }

    fn streaming(&self) -> bool {
        matches!(self, Sink::Stream { .. })
    }
}

enum VertexOut {
    Message(Box<Message>),
    Model { text: String, usage: Usage },
}

struct Vertex {
    node: Node,
    out: VertexOut,
}

/// Everything a finished run produced.
pub struct Outcome {
    plan: Plan,
    vertices: Vec<Vertex>,
}

impl Outcome {
    /// The messages the run produced (its input, its answers), to be stored.
    pub fn messages(&self) -> impl Iterator<Item = &Message> {
        self.vertices.iter().filter_map(|v| match &v.out {
            VertexOut::Message(m) => Some(&**m),
            VertexOut::Model { .. } => None,
        })
    }
}

pub enum RunEnd {
    Done(Outcome),
    Failed(RunFailed),
}

fn timestamp() -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6] UTC"
    );
    time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_else(|_| "1970-01-01 00:00:00.000000 UTC".to_owned())
}

fn node_source(node: &Node) -> Source {
    Source {
        id: Some(node.id.clone()),
        display_name: Some(node.display_name.clone()),
        source: Some(node.display_name.clone()),
    }
}

/// Counts words the way the demo model does: split on single spaces.
pub fn count_tokens(text: &str) -> u64 {
    text.split(' ').count() as u64
}

impl Plan {
    fn message(
        &self,
        sender: &str,
        sender_name: &str,
        text: String,
        properties: Properties,
    ) -> Message {
        Message {
            id: Uuid::new_v4().to_string(),
            timestamp: timestamp(),
            sender: sender.to_owned(),
            sender_name: sender_name.to_owned(),
            session_id: self.session_id.clone(),
            context_id: Some(String::new()),
            text,
            properties,
            category: "message",
            content_blocks: Vec::new(),
            flow_id: self.flow_id.clone(),
            run_id: self.run_id.clone(),
        }
    }

    /// Plays the chain, emitting stream events into `sink` as it goes.
    pub async fn execute(self, sink: &Sink) -> Result<RunEnd, Cancelled> {
        let mut vertices = Vec::new();
        let mut text = self.input_text.clone();
        let mut source = Source::default();
        let mut usage: Option<Usage> = None;
        // The model message already streamed to the client, reused by the chat output.
        let mut streamed: Option<Message> = None;
        for (index, node) in self.nodes.iter().enumerate() {
            match node.kind {
                Kind::ChatInput => {
                    let sender = node.str_field("sender").unwrap_or("User");
                    let sender_name = node.str_field("sender_name").unwrap_or("User");
                    let props = Properties::new(Source::default(), None, "complete", None);
                    let msg = self.message(sender, sender_name, text.clone(), props);
                    sink.emit("add_message", msg.wire(true)).await?;
                    source = node_source(node);
                    vertices.push(Vertex {
                        node: node.clone(),
                        out: VertexOut::Message(Box::new(msg)),
                    });
                }
                Kind::Model => {
                    let answer = format!("ECHO: {text}");
                    let n = count_tokens(&answer);
                    let model_usage = Usage {
                        input_tokens: n,
                        output_tokens: n,
                        total_tokens: 2 * n,
                    };
                    let feeds_chat = self.nodes[index + 1..]
                        .iter()
                        .any(|n| n.kind == Kind::ChatOutput);
                    if sink.streaming() && feeds_chat {
                        streamed = Some(self.stream_model(node, &answer, model_usage, sink).await?);
                    }
                    vertices.push(Vertex {
                        node: node.clone(),
                        out: VertexOut::Model {
                            text: answer.clone(),
                            usage: model_usage,
                        },
                    });
                    text = answer;
                    usage = Some(model_usage);
                    source = node_source(node);
                }
                Kind::RaiseError if text.contains("boom") => {
                    return self.fail(node, sink).await;
                }
                Kind::RaiseError | Kind::PassThrough => {
                    source = node_source(node);
                }
                Kind::ChatOutput | Kind::TextOutput => {
                    let msg = match streamed.take() {
                        Some(msg) => msg,
                        None => {
                            let sender = node.str_field("sender").unwrap_or("Machine");
                            let sender_name = node.str_field("sender_name").unwrap_or("AI");
                            let props = Properties::new(source.clone(), None, "complete", usage);
                            let msg = self.message(sender, sender_name, text.clone(), props);
                            sink.emit("add_message", msg.wire(true)).await?;
                            msg
                        }
                    };
                    vertices.push(Vertex {
                        node: node.clone(),
                        out: VertexOut::Message(Box::new(msg)),
                    });
                }
            }
        }
        let outcome = Outcome {
            plan: self,
            vertices,
        };
        if sink.streaming() {
            let response = outcome.response();
            sink.emit("end", EndData { result: &response }).await?;
        }
        Ok(RunEnd::Done(outcome))
    }

    async fn stream_model(
        &self,
        node: &Node,
        answer: &str,
        usage: Usage,
        sink: &Sink,
    ) -> Result<Message, Cancelled> {
        let delay = node
            .tweaked
            .iter()
            .any(|f| f == "delay_ms")
            .then(|| node.int_field("delay_ms"))
            .flatten()
            .map(Duration::from_millis);
        let icon = node.icon.clone();
        let mut msg = self.message(
            "Machine",
            "AI",
            String::new(),
            Properties::new(node_source(node), icon, "partial", None),
        );
        for (i, word) in answer.split(' ').enumerate() {
            sink.pause(delay).await?;
            let chunk = if i == 0 {
                word.to_owned()
            } else {
                format!(" {word}")
            };
            msg.text.push_str(&chunk);
            if i == 0 {
                sink.emit("add_message", msg.wire(true)).await?;
            }
            sink.emit(
                "token",
                TokenData {
                    chunk: &chunk,
                    id: &msg.id,
                },
            )
            .await?;
        }
        msg.properties.state = "complete";
        msg.properties.usage = Some(usage);
        // Langflow stores and re-sends the finished message three times.
        for _ in 0..3 {
            sink.emit("add_message", msg.wire(true)).await?;
        }
        Ok(msg)
    }

    async fn fail(&self, node: &Node, sink: &Sink) -> Result<RunEnd, Cancelled> {
        let reason = "boom from RaiseError component";
        let message = format!(
            "Error running graph: Error building Component {}: \n\n{reason}",
            node.display_name
        );
        let failure = RunFailure {
            message: &message,
            traceback: None,
            description: None,
            code: None,
            suggestion: None,
        };
        let detail = serde_json::to_string(&failure).unwrap_or_else(|_| message.clone());
        if sink.streaming() {
            let mut props = Properties::new(
                node_source(node),
                Some("error".to_owned()),
                "complete",
                None,
            );
            props.text_color = Some("red".to_owned());
            props.background_color = Some("red".to_owned());
            let mut msg = self.message(
                &node.display_name,
                &node.display_name,
                format!("{reason}\n"),
                props,
            );
            msg.context_id = None;
            msg.category = "error";
            msg.content_blocks = vec![json!({
                "title": "Error",
                "contents": [{
                    "type": "error",
                    "duration": null,
                    "header": {},
                    "component": node.display_name,
                    "field": null,
                    "reason": format!("**ValueError**\n - **Details: {reason}**\n"),
                    "solution": null,
                    "code": null,
                    "traceback": format!("Traceback (most recent call last):\nValueError: {reason}\n"),
                }],
                "allow_markdown": true,
                "media_url": null,
            })];
            sink.emit("error", msg.wire(true)).await?;
            let error = format!("500: {detail}");
            sink.emit("error", ErrorData { error: &error }).await?;
        }
        Ok(RunEnd::Failed(RunFailed { detail }))
    }
}

impl Outcome {
    fn selected(&self, vertex: &Vertex) -> bool {
        if let Some(component) = &self.plan.output_component {
            return &vertex.node.id == component;
        }
        match (self.plan.output_type.as_str(), vertex.node.kind) {
            ("debug", _) => true,
            ("chat", Kind::ChatOutput) | ("text", Kind::TextOutput) => true,
            ("any", kind) => matches!(kind, Kind::ChatOutput | Kind::TextOutput),
            _ => false,
        }
    }

    /// The non-stream body (also the `result` of the stream's `end` event).
    pub fn response(&self) -> RunResponse<'_> {
        let plan = &self.plan;
        let mut inputs = BTreeMap::new();
        if let Some(input) = &plan.request_input {
            inputs.insert("input_value", input.as_str());
        }
        let outputs = self
            .vertices
            .iter()
            .filter(|v| self.selected(v))
            .map(|v| self.result_data(v))
            .collect();
        RunResponse {
            session_id: &plan.session_id,
            outputs: vec![RunOutputs { inputs, outputs }],
        }
    }

    fn result_data<'a>(&'a self, vertex: &'a Vertex) -> ResultData<'a> {
        let node = &vertex.node;
        let name = node.output_name.clone();
        let mut logs = BTreeMap::new();
        logs.insert(name.clone(), []);
        match &vertex.out {
            VertexOut::Message(msg) => {
                let mut results = BTreeMap::new();
                results.insert("message", msg.wire(false));
                let mut outputs = BTreeMap::new();
                outputs.insert(
                    name,
                    OutputValue {
                        message: &msg.text,
                        kind: "text",
                    },
                );
                ResultData {
                    results,
                    artifacts: Artifacts::Message(MessageArtifacts {
                        message: &msg.text,
                        sender: &msg.sender,
                        sender_name: &msg.sender_name,
                        files: [],
                        kind: "object",
                    }),
                    outputs,
                    logs,
                    messages: vec![ChatLogMessage {
                        message: &msg.text,
                        sender: &msg.sender,
                        sender_name: &msg.sender_name,
                        session_id: &msg.session_id,
                        stream_url: None,
                        component_id: &node.id,
                        files: [],
                        kind: "text",
                    }],
                    timedelta: None,
                    duration: None,
                    component_display_name: &node.display_name,
                    component_id: &node.id,
                    used_frozen_result: false,
                    token_usage: None,
                }
            }
            VertexOut::Model { text, usage } => {
                let repr = json!({
                    "text": text,
                    "files": [],
                    "sender": null,
                    "sender_name": null,
                    "session_id": "",
                    "flow_id": self.plan.flow_id,
                    "properties": {"state": "complete", "usage": usage},
                    "category": "message",
                });
                let mut artifacts = BTreeMap::new();
                artifacts.insert(
                    name.clone(),
                    ReprArtifact {
                        repr: serde_json::to_string_pretty(&repr).unwrap_or_default(),
                        raw: text.clone(),
                        kind: "text",
                    },
                );
                let mut outputs = BTreeMap::new();
                outputs.insert(
                    name,
                    OutputValue {
                        message: text,
                        kind: "text",
                    },
                );
                ResultData {
                    results: BTreeMap::new(),
                    artifacts: Artifacts::Named(artifacts),
                    outputs,
                    logs,
                    messages: Vec::new(),
                    timedelta: None,
                    duration: None,
                    component_display_name: &node.display_name,
                    component_id: &node.id,
                    used_frozen_result: false,
                    token_usage: Some(*usage),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_embedded_and_bogus_bodies() {
        let r = RunRequest::parse(br#"{"input_value":"hi","session_id":"s"}"#, None).unwrap();
        assert_eq!(r.input_value.as_deref(), Some("hi"));
        assert_eq!(r.session_id.as_deref(), Some("s"));
        let r = RunRequest::parse(br#"{"input_request":{"input_value":"e"}}"#, None).unwrap();
        assert_eq!(r.input_value.as_deref(), Some("e"));
        let r = RunRequest::parse(br#"{"input_value":"x","input_type":"bogus"}"#, None).unwrap();
        assert!(r.input_value.is_none());
        assert!(RunRequest::parse(b"", None).unwrap().input_value.is_none());
    }

    #[test]
    fn malformed_json_reports_python_offset() {
        match RunRequest::parse(br#"{"input_value": "hi","#, None) {
            Err(ApiError::JsonInvalid { pos }) => assert_eq!(pos, 21),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn multipart_form_fields() {
        let body = b"--XX\r\nContent-Disposition: form-data; name=\"input_value\"\r\n\r\nfrom form\r\n--XX\r\nContent-Disposition: form-data; name=\"tweaks\"\r\n\r\n{\"A\":{\"b\":1}}\r\n--XX--\r\n";
        let r = RunRequest::parse(body, Some("multipart/form-data; boundary=XX")).unwrap();
        assert_eq!(r.input_value.as_deref(), Some("from form"));
        assert!(r.tweaks.contains_key("A"));
    }

    #[test]
    fn tokens_are_space_split_words() {
        assert_eq!(count_tokens("ECHO: one two three four"), 5);
    }
}
