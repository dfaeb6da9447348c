//! The shapes Langflow puts on the wire: messages, result data, run responses
//! and stream events. Field order follows the captures.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

/// `{input_tokens, output_tokens, total_tokens}` as reported in `properties.usage`.
#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
}

#[derive(Serialize, Clone, Default)]
pub struct Source {
    pub id: Option<String>,
    pub display_name: Option<String>,
    pub source: Option<String>,
}

#[derive(Serialize, Clone)]
pub struct Properties {
    pub text_color: Option<String>,
    pub background_color: Option<String>,
    pub edited: bool,
    pub source: Source,
    pub icon: Option<String>,
    pub allow_markdown: bool,
    pub positive_feedback: Option<bool>,
    pub state: &'static str,
    pub targets: Vec<Value>,
    pub usage: Option<Usage>,
    pub build_duration: Option<f64>,
}

impl Properties {
    pub fn new(
        source: Source,
        icon: Option<String>,
        state: &'static str,
        usage: Option<Usage>,
    ) -> Self {
        Properties {
            text_color: None,
            background_color: None,
            edited: false,
            source,
            icon,
            allow_markdown: false,
            positive_feedback: None,
            state,
            targets: Vec::new(),
            usage,
            build_duration: None,
        }
    }
}

#[derive(Serialize, Clone)]
pub struct SessionMetadata {
    pub graph_run_id: String,
}

/// One chat message as the runtime stores it.
#[derive(Clone)]
pub struct Message {
    pub id: String,
    pub timestamp: String,
    pub sender: String,
    pub sender_name: String,
    pub session_id: String,
    pub context_id: Option<String>,
    pub text: String,
    pub properties: Properties,
    pub category: &'static str,
    pub content_blocks: Vec<Value>,
    pub flow_id: String,
    pub run_id: String,
}

#[derive(Serialize)]
struct MessageData<'a> {
    timestamp: &'a str,
    sender: &'a str,
    sender_name: &'a str,
    session_id: &'a str,
    context_id: &'a Option<String>,
    text: &'a str,
    files: [(); 0],
    error: bool,
    edit: bool,
    properties: &'a Properties,
    category: &'a str,
    content_blocks: &'a [Value],
    session_metadata: SessionMetadata,
    id: &'a str,
    flow_id: &'a str,
    run_id: &'a str,
    duration: Option<f64>,
}

/// A message serialized as Langflow does; `id` is appended only in stream events.
#[derive(Serialize)]
pub struct WireMessage<'a> {
    text_key: &'static str,
    data: MessageData<'a>,
    default_value: &'static str,
    sender: &'a str,
    sender_name: &'a str,
    files: [(); 0],
    session_id: &'a str,
    context_id: &'a Option<String>,
    run_id: &'a str,
    timestamp: &'a str,
    flow_id: &'a str,
    error: bool,
    edit: bool,
    properties: &'a Properties,
    category: &'a str,
    content_blocks: &'a [Value],
    duration: Option<f64>,
    session_metadata: SessionMetadata,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
}

impl Message {
    pub fn wire(&self, with_id: bool) -> WireMessage<'_> {
        let meta = || SessionMetadata {
            graph_run_id: self.run_id.clone(),
        };
        WireMessage {
            text_key: "text",
            data: MessageData {
                timestamp: &self.timestamp,
                sender: &self.sender,
                sender_name: &self.sender_name,
                session_id: &self.session_id,
                context_id: &self.context_id,
                text: &self.text,
                files: [],
                error: false,
                edit: false,
                properties: &self.properties,
                category: self.category,
                content_blocks: &self.content_blocks,
                session_metadata: meta(),
                id: &self.id,
                flow_id: &self.flow_id,
                run_id: &self.run_id,
                duration: None,
            },
            default_value: "",
            sender: &self.sender,
            sender_name: &self.sender_name,
            files: [],
            session_id: &self.session_id,
            context_id: &self.context_id,
            run_id: &self.run_id,
            timestamp: &self.timestamp,
            flow_id: &self.flow_id,
            error: false,
            edit: false,
            properties: &self.properties,
            category: self.category,
            content_blocks: &self.content_blocks,
            duration: None,
            session_metadata: meta(),
            text: &self.text,
            id: with_id.then_some(self.id.as_str()),
        }
    }
}

#[derive(Serialize)]
pub struct MessageArtifacts<'a> {
    pub message: &'a str,
    pub sender: &'a str,
    pub sender_name: &'a str,
    pub files: [(); 0],
    #[serde(rename = "type")]
    pub kind: &'static str,
}

#[derive(Serialize)]
pub struct ReprArtifact {
    pub repr: String,
    pub raw: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum Artifacts<'a> {
    Message(MessageArtifacts<'a>),
    Named(BTreeMap<String, ReprArtifact>),
}

#[derive(Serialize)]
pub struct OutputValue<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

#[derive(Serialize)]
pub struct ChatLogMessage<'a> {
    pub message: &'a str,
    pub sender: &'a str,
    pub sender_name: &'a str,
    pub session_id: &'a str,
    pub stream_url: Option<String>,
    pub component_id: &'a str,
    pub files: [(); 0],
    #[serde(rename = "type")]
    pub kind: &'static str,
}

/// One vertex's result (`ResultData`).
#[derive(Serialize)]
pub struct ResultData<'a> {
    pub results: BTreeMap<&'static str, WireMessage<'a>>,
    pub artifacts: Artifacts<'a>,
    pub outputs: BTreeMap<String, OutputValue<'a>>,
    pub logs: BTreeMap<String, [(); 0]>,
    pub messages: Vec<ChatLogMessage<'a>>,
    pub timedelta: Option<f64>,
    pub duration: Option<f64>,
    pub component_display_name: &'a str,
    pub component_id: &'a str,
    pub used_frozen_result: bool,
    pub token_usage: Option<Usage>,
}

#[derive(Serialize)]
pub struct RunOutputs<'a> {
    pub inputs: BTreeMap<&'static str, &'a str>,
    pub outputs: Vec<ResultData<'a>>,
}

/// The body of a non-stream run, and the `result` of the stream's `end` event.
#[derive(Serialize)]
pub struct RunResponse<'a> {
    pub session_id: &'a str,
    pub outputs: Vec<RunOutputs<'a>>,
}

#[derive(Serialize)]
pub struct Event<'a, T: Serialize> {
    pub event: &'a str,
    pub data: T,
}

#[derive(Serialize)]
pub struct TokenData<'a> {
    pub chunk: &'a str,
    pub id: &'a str,
}

#[derive(Serialize)]
pub struct EndData<'a> {
    pub result: &'a RunResponse<'a>,
}

#[derive(Serialize)]
pub struct ErrorData<'a> {
    pub error: &'a str,
}

/// The JSON object Langflow puts, as a string, in the `detail` of a failed run.
#[derive(Serialize)]
pub struct RunFailure<'a> {
    pub message: &'a str,
    pub traceback: Option<String>,
    pub description: Option<String>,
    pub code: Option<String>,
    pub suggestion: Option<String>,
}
