//! The invoke route: what the buyer may send, what the runtime receives, and what
//! is read back from the runtime's answer for metering.
//!
//! Langflow silently drops a body with an invalid field value and runs the flow's
//! stored input instead (see the runtime contract), so the body is validated here
//! and rebuilt from the validated fields: unknown members, wrong types and unknown
//! `input_type`/`output_type` values are refused with a 400 naming the field.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use agora_config::usage::TokenReport;

use crate::error::GatewayError;
use crate::state::RouteTarget;

/// Longest accepted `session_id`.
pub const MAX_SESSION_ID: usize = 256;

/// Largest token count accepted for one request, from the runtime's answer or a
/// report: far above any model's context, far below what a sum could overflow on.
pub const MAX_TOKENS: u64 = 100_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BuyerBody {
    #[serde(default)]
    input_value: Option<String>,
    /// The seed API's name for `input_value`.
    #[serde(default)]
    input: Option<String>,
    #[serde(default = "chat")]
    input_type: InputType,
    #[serde(default = "chat_out")]
    output_type: OutputType,
    #[serde(default)]
    session_id: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum InputType {
    Chat,
    Text,
    Any,
}

#[derive(Deserialize, Serialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum OutputType {
    Chat,
    Text,
    Any,
    Debug,
}

fn chat() -> InputType {
    InputType::Chat
}

fn chat_out() -> OutputType {
    OutputType::Chat
}

#[derive(Serialize)]
struct RuntimeBody<'a> {
    input_value: &'a str,
    input_type: InputType,
    output_type: OutputType,
    session_id: &'a str,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    tweaks: &'a serde_json::Map<String, serde_json::Value>,
}

/// A validated run: the body for the runtime, and the buyer's input text (for a
/// token estimate when the runtime reports none).
pub struct RunBody {
    pub body: Bytes,
    pub input: String,
}

/// Who an invoke's conversation belongs to.
#[derive(Clone, Copy, Debug)]
pub enum Speaker<'a> {
    /// An API key's caller, who may name sessions.
    Key(&'a Uuid),
    /// A widget visitor, who has exactly one.
    Visitor(&'a Uuid),
}

/// Session ids of widget visitors start with it; API callers cannot name one.
const VISITOR_SESSION: &str = "visitor-";

/// The session id the runtime sees for a caller's `session`: always under the
/// config's namespace, `<config>:<session>`, so no input names another config's
/// session. A key's caller that names none gets one per key (`key-<key id>`);
/// a widget visitor always has its own (`visitor-<visitor id>`).
pub fn runtime_session(config: &Uuid, session: Option<&str>, speaker: Speaker<'_>) -> String {
    match (speaker, session) {
        (Speaker::Visitor(visitor), _) => format!("{config}:{VISITOR_SESSION}{visitor}"),
        (Speaker::Key(_), Some(s)) => format!("{config}:{s}"),
        (Speaker::Key(key_id), None) => format!("{config}:key-{key_id}"),
    }
}

fn invalid_body(message: String) -> GatewayError {
    GatewayError::BadRequest {
        code: "invalid_body",
        message,
    }
}

/// Validates the buyer's body and builds the one sent to the runtime.
pub fn runtime_body(
    body: &[u8],
    target: &RouteTarget,
    speaker: Speaker<'_>,
) -> Result<RunBody, GatewayError> {
    let buyer: BuyerBody = serde_json::from_slice(body).map_err(|e| {
        let message = e.to_string();
        // serde_json's messages name the field and never echo large values.
        let message = match message.find(" at line") {
            Some(i) => message[..i].to_owned(),
            None => message,
        };
        invalid_body(format!(
            "The body must be JSON {{input_value (or input), input_type?, output_type?, session_id?}}: {message}."
        ))
    })?;
    let input = match (buyer.input_value, buyer.input) {
        (Some(v), None) | (None, Some(v)) => v,
        (Some(_), Some(_)) => {
            return Err(invalid_body(
                "Give the input as input_value or as input, not both.".into(),
            ))
        }
        (None, None) => return Err(invalid_body("missing field `input_value`.".into())),
    };
    if let Some(session) = &buyer.session_id {
        if session.is_empty()
            || session.len() > MAX_SESSION_ID
            || session.chars().any(char::is_control)
        {
            return Err(GatewayError::BadRequest {
                code: "invalid_session_id",
                message: format!(
                    "session_id must be 1 to {MAX_SESSION_ID} characters without control characters."
                ),
            });
        }
        let refusal = match speaker {
            Speaker::Visitor(_) => {
                Some("A widget visitor's conversation is its own: leave session_id out.")
            }
            Speaker::Key(_) if session.starts_with(VISITOR_SESSION) => Some(
                "session_id may not start with `visitor-`: those are widget visitors' sessions.",
            ),
            Speaker::Key(_) => None,
        };
        if let Some(message) = refusal {
            return Err(GatewayError::BadRequest {
                code: "invalid_session_id",
                message: message.into(),
            });
        }
    }
    let session = runtime_session(&target.route.config, buyer.session_id.as_deref(), speaker);
    let out = RuntimeBody {
        input_value: &input,
        input_type: buyer.input_type,
        output_type: buyer.output_type,
        session_id: &session,
        tweaks: &target.route.tweaks,
    };
    let body = serde_json::to_vec(&out)
        .map(Bytes::from)
        .map_err(|_| invalid_body("The body cannot be encoded.".into()))?;
    Ok(RunBody { body, input })
}

/// Takes the config's namespace off the session ids in a runtime's answer, so the
/// caller sees the id it sent: every `"<config>:` becomes `"`. Works on the body
/// as it passes, piece by piece; a piece that ends part way into the pattern keeps
/// that tail back (at most 37 bytes) until the next piece shows whether it matches.
pub struct SessionScrub {
    /// `"` + the config's hyphenated uuid + `:`.
    pattern: [u8; 38],
    held: Vec<u8>,
}

impl SessionScrub {
    pub fn new(config: &Uuid) -> SessionScrub {
        let mut pattern = [0u8; 38];
        pattern[0] = b'"';
        config.hyphenated().encode_lower(&mut pattern[1..37]);
        pattern[37] = b':';
        SessionScrub {
            pattern,
            held: Vec::new(),
        }
    }

    /// Appends `data`, scrubbed, to `out`.
    pub fn scrub(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.held.is_empty() {
            self.scan(data, out);
        } else {
            let mut joined = std::mem::take(&mut self.held);
            joined.extend_from_slice(data);
            self.scan(&joined, out);
        }
    }

    /// Whatever was held back, at the end of the body.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.held);
    }

    fn scan(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let p = &self.pattern;
        let mut emitted = 0;
        let mut at = 0;
        while let Some(i) = data[at..].iter().position(|&b| b == b'"').map(|i| at + i) {
            let rest = &data[i..];
            if rest.len() >= p.len() {
                if rest[..p.len()] == p[..] {
                    out.extend_from_slice(&data[emitted..=i]);
                    emitted = i + p.len();
                    at = emitted;
                } else {
                    at = i + 1;
                }
            } else if p.starts_with(rest) {
                // The pattern holds one `"`: no later start can match here.
                out.extend_from_slice(&data[emitted..i]);
                self.held.extend_from_slice(rest);
                return;
            } else {
                at = i + 1;
            }
        }
        out.extend_from_slice(&data[emitted..]);
    }
}

/// A runtime's usage report (`POST /api/agent-gateway/usage/`).
pub enum Report {
    /// Counts for one request the gateway forwarded (its `X-Agora-Request-Id`).
    Request(TokenReport),
    /// Runtime-side usage of a config not tied to one request; `event_id` makes
    /// a report sent again count once.
    Config {
        config: Uuid,
        event_id: Option<Uuid>,
        tokens: Tokens,
    },
}

/// Reads a usage report: `{request_id, input_tokens, output_tokens}` or
/// `{config_uuid, input_tokens, output_tokens, event_id?}`, counts at most
/// [`MAX_TOKENS`] each.
pub fn usage_report(body: &[u8]) -> Result<Report, GatewayError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        request_id: Option<Uuid>,
        config_uuid: Option<Uuid>,
        event_id: Option<Uuid>,
        input_tokens: u64,
        output_tokens: u64,
    }
    const SHAPE: &str = "The body must be JSON {request_id, input_tokens, output_tokens} or {config_uuid, input_tokens, output_tokens, event_id?}";
    let b: Body = serde_json::from_slice(body).map_err(|e| {
        invalid_body(format!(
            "{SHAPE}: {}.",
            e.to_string().split(" at line").next().unwrap_or_default()
        ))
    })?;
    if b.input_tokens > MAX_TOKENS || b.output_tokens > MAX_TOKENS {
        return Err(GatewayError::BadRequest {
            code: "tokens_out_of_range",
            message: format!("input_tokens and output_tokens are at most {MAX_TOKENS} each."),
        });
    }
    let tokens = Tokens {
        input: b.input_tokens,
        output: b.output_tokens,
    };
    match (b.request_id, b.config_uuid, b.event_id) {
        (Some(request_id), None, None) => Ok(Report::Request(TokenReport {
            request_id,
            input_tokens: tokens.input,
            output_tokens: tokens.output,
        })),
        (None, Some(config), event_id) => Ok(Report::Config {
            config,
            event_id,
            tokens,
        }),
        _ => Err(invalid_body(format!(
            "{SHAPE}: give request_id or config_uuid (event_id only with config_uuid)."
        ))),
    }
}

/// Whether `?stream=` asks for a stream; any other query member is refused.
pub fn wants_stream(query: Option<&str>) -> Result<bool, GatewayError> {
    let mut stream = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair {
            "stream=true" | "stream=1" => stream = true,
            "stream=false" | "stream=0" => stream = false,
            _ => {
                return Err(GatewayError::BadRequest {
                    code: "invalid_query",
                    message: "The only query parameter is stream=true|false.".into(),
                })
            }
        }
    }
    Ok(stream)
}

/// Token counts read from a runtime's answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
}

/// What a runtime's answer said, read as it passed to the client.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RunReading {
    /// The runtime's own counts, when it gave them within [`MAX_TOKENS`].
    pub tokens: Option<Tokens>,
    /// The answer's message text (the final message, or the streamed tokens of a
    /// stream cut before its end), for an estimate when `tokens` is `None`.
    pub output_text: String,
    /// The detail of an `error` event: the run failed after its stream started.
    pub error: Option<String>,
}

/// Which stream events are read; the others pass unparsed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EventKind {
    End,
    Token,
    Error,
}

/// Reads what the runtime sends without holding up the bytes: chunks are shared
/// (`Bytes` clones), and only what can carry usage, text or an error is parsed —
/// the whole body of a non-stream answer; a stream's `end`, `token` and `error`
/// events.
pub struct UsageReader {
    stream: bool,
    /// Chunks of the current stream event, or of the whole non-stream body.
    pending: Vec<Bytes>,
    pending_len: usize,
    /// The pending event's kind, once its head was seen.
    kind: Option<EventKind>,
    /// Whether the pending event is skipped (not read, or over the bound).
    skip: bool,
    /// Whether the last chunk fed ended with a newline (half of a separator).
    prev_newline: bool,
    reading: RunReading,
}

/// Longest body or stream event parsed.
const MAX_USAGE_SCAN: usize = 1024 * 1024;
/// Longest error detail kept.
pub const MAX_ERROR_DETAIL: usize = 300;

impl UsageReader {
    pub fn new(stream: bool) -> UsageReader {
        UsageReader {
            stream,
            pending: Vec::new(),
            pending_len: 0,
            kind: None,
            skip: false,
            prev_newline: false,
            reading: RunReading::default(),
        }
    }

    /// Feeds one chunk as it passes to the client.
    pub fn feed(&mut self, chunk: &Bytes) {
        if !self.stream {
            self.push(chunk.clone());
            return;
        }
        let mut rest = chunk.clone();
        let mut prev_newline = self.prev_newline;
        self.prev_newline = chunk.last() == Some(&b'\n');
        // Events are JSON objects separated by a blank line.
        while let Some(pos) = find_blank_line(&rest, prev_newline) {
            let (event, after) = (rest.slice(..pos.0), rest.slice(pos.1..));
            self.push(event);
            self.finish_event();
            rest = after;
            prev_newline = false;
        }
        if !rest.is_empty() {
            self.push(rest);
        }
    }

    /// Called at the end of the body (or when it was cut).
    pub fn finish(&mut self) -> RunReading {
        if self.stream {
            self.finish_event();
        } else if !self.skip {
            let body = self.take();
            self.reading.tokens = last_usage(&body);
            if self.reading.tokens.is_none() {
                if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&body) {
                    self.reading.output_text = message_text(&value).to_owned();
                }
            }
        }
        std::mem::take(&mut self.reading)
    }

    fn push(&mut self, bytes: Bytes) {
        if self.skip || bytes.is_empty() {
            return;
        }
        if self.stream && self.kind.is_none() {
            let head = &self.pending.first().unwrap_or(&bytes)[..];
            let head = head.trim_ascii_start();
            match event_kind(head) {
                Some(Some(kind)) => self.kind = Some(kind),
                Some(None) => {
                    self.skip = true;
                    self.pending.clear();
                    self.pending_len = 0;
                    return;
                }
                None => {}
            }
        }
        self.pending_len += bytes.len();
        if self.pending_len > MAX_USAGE_SCAN {
            self.skip = true;
            self.pending.clear();
            return;
        }
        self.pending.push(bytes);
    }

    fn finish_event(&mut self) {
        let skip = std::mem::replace(&mut self.skip, false);
        let kind = self.kind.take();
        let event = self.take();
        if skip || event.is_empty() {
            return;
        }
        let kind = match kind {
            Some(kind) => kind,
            // An event shorter than the head that tells its kind.
            None => match event_kind(event.trim_ascii_start()) {
                Some(Some(kind)) => kind,
                _ => return,
            },
        };
        #[derive(Deserialize)]
        struct Event {
            data: serde_json::Value,
        }
        match kind {
            EventKind::End => {
                self.reading.tokens = last_usage(&event).or(self.reading.tokens);
                if self.reading.tokens.is_none() {
                    if let Ok(e) = serde_json::from_slice::<Event>(&event) {
                        let text = message_text(e.data.get("result").unwrap_or(&e.data));
                        if !text.is_empty() {
                            self.reading.output_text = text.to_owned();
                        }
                    }
                }
            }
            EventKind::Token => {
                #[derive(Deserialize)]
                struct Token<'a> {
                    #[serde(borrow)]
                    data: TokenData<'a>,
                }
                #[derive(Deserialize)]
                struct TokenData<'a> {
                    #[serde(borrow)]
                    chunk: std::borrow::Cow<'a, str>,
                }
                if let Ok(t) = serde_json::from_slice::<Token>(&event) {
                    let text = &mut self.reading.output_text;
                    if text.len() + t.data.chunk.len() <= MAX_USAGE_SCAN {
                        text.push_str(&t.data.chunk);
                    }
                }
            }
            EventKind::Error => {
                let detail = serde_json::from_slice::<Event>(&event)
                    .ok()
                    .and_then(|e| {
                        let d = &e.data;
                        d.get("text")
                            .or_else(|| d.get("error"))
                            .and_then(|v| v.as_str())
                            .map(str::to_owned)
                    })
                    .unwrap_or_else(|| "the run failed".to_owned());
                self.reading.error = Some(trimmed(&detail, MAX_ERROR_DETAIL));
            }
        }
    }

    fn take(&mut self) -> Vec<u8> {
        self.pending_len = 0;
        let mut out = Vec::new();
        for chunk in self.pending.drain(..) {
            out.extend_from_slice(&chunk);
        }
        out
    }
}

/// The kind of a stream event from its first bytes: `None` while too few are
/// seen to tell, `Some(None)` for an event that is not read.
fn event_kind(head: &[u8]) -> Option<Option<EventKind>> {
    const KINDS: [(&[u8], EventKind); 3] = [
        (b"end\"", EventKind::End),
        (b"token\"", EventKind::Token),
        (b"error\"", EventKind::Error),
    ];
    let name = head
        .strip_prefix(b"{\"event\": \"")
        .or_else(|| head.strip_prefix(b"{\"event\":\""));
    let Some(name) = name else {
        // Not yet the whole `{"event": "` prefix, or another shape.
        return if b"{\"event\": \"".starts_with(head) || b"{\"event\":\"".starts_with(head) {
            None
        } else {
            Some(None)
        };
    };
    for (kind_name, kind) in KINDS {
        if name.starts_with(kind_name) {
            return Some(Some(kind));
        }
    }
    if KINDS.iter().any(|(k, _)| k.starts_with(name)) {
        None
    } else {
        Some(None)
    }
}

/// The first output's message text of a run result
/// (`outputs[0].outputs[0].results.message.text`), or "".
fn message_text(result: &serde_json::Value) -> &str {
    result
        .pointer("/outputs/0/outputs/0/results/message/text")
        .and_then(|v| v.as_str())
        .unwrap_or("")
}

/// At most `max` bytes of `text`, cut at a character boundary.
pub fn trimmed(text: &str, max: usize) -> String {
    let text = text.trim();
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Finds `\n\n` in `bytes` (or a leading `\n` when the previous chunk ended with one):
/// returns (end of the event, start of what follows).
fn find_blank_line(bytes: &[u8], previous_newline: bool) -> Option<(usize, usize)> {
    if previous_newline && bytes.first() == Some(&b'\n') {
        return Some((0, 1));
    }
    bytes
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2))
}

/// The last `"usage": {"input_tokens": N, "output_tokens": N, ...}` in `json`,
/// read in place: only the object after the last `"usage"` key that parses as one
/// is decoded, not the whole document.
fn last_usage(json: &[u8]) -> Option<Tokens> {
    #[derive(Deserialize)]
    struct Usage {
        input_tokens: u64,
        output_tokens: u64,
    }
    const KEY: &[u8] = b"\"usage\"";
    let mut end = json.len();
    while let Some(at) = json[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        end = at;
        let rest = json[at + KEY.len()..].trim_ascii_start();
        let Some(value) = rest.strip_prefix(b":") else {
            continue;
        };
        let mut values = serde_json::Deserializer::from_slice(value).into_iter::<Usage>();
        if let Some(Ok(usage)) = values.next() {
            if usage.input_tokens > MAX_TOKENS || usage.output_tokens > MAX_TOKENS {
                tracing::warn!(
                    input_tokens = usage.input_tokens,
                    output_tokens = usage.output_tokens,
                    "runtime token counts over the bound ignored"
                );
                return None;
            }
            return Some(Tokens {
                input: usage.input_tokens,
                output: usage.output_tokens,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_config::snapshot::{AgentRoute, QuotaUsage};
    use std::collections::BTreeMap;

    fn target() -> RouteTarget {
        let mut tweaks = serde_json::Map::new();
        tweaks.insert(
            "Prompt-1".into(),
            serde_json::json!({"template": "Be kind"}),
        );
        let timeouts = crate::state::PeerTimeouts {
            connect: std::time::Duration::from_secs(1),
            read: std::time::Duration::from_secs(1),
        };
        RouteTarget::new(
            AgentRoute {
                config: uuid::Uuid::from_u128(1),
                agent: uuid::Uuid::from_u128(2),
                tenant: uuid::Uuid::from_u128(3),
                runtime_url: "http://127.0.0.1:9".into(),
                flow_id: "flow-1".into(),
                tweaks,
                global_vars: BTreeMap::new(),
                quota: QuotaUsage::default(),
            },
            timeouts,
        )
    }

    fn key() -> Uuid {
        Uuid::from_u128(9)
    }

    fn built(body: &[u8]) -> Result<serde_json::Value, GatewayError> {
        let run = runtime_body(body, &target(), Speaker::Key(&key()))?;
        Ok(serde_json::from_slice(&run.body).unwrap())
    }

    #[test]
    fn bodies_are_validated_and_rebuilt() {
        let v = built(br#"{"input_value":"hi","session_id":"s1"}"#).unwrap();
        assert_eq!(v["input_value"], "hi");
        assert_eq!(v["input_type"], "chat");
        assert_eq!(v["output_type"], "chat");
        assert_eq!(v["tweaks"]["Prompt-1"]["template"], "Be kind");

        for (body, needle) in [
            (
                &br#"{"input_value":"hi","input_type":"bogus"}"#[..],
                "input_type",
            ),
            (br#"{"input_value":"hi","tweaks":{}}"#, "tweaks"),
            (br#"{"input_value":5}"#, "string"),
            (br#"{"input_type":"chat"}"#, "input_value"),
            (br#"not json"#, "expected"),
            (
                br#"{"input_value":"hi","output_type":"html"}"#,
                "output_type",
            ),
            (br#"{"input_value":"a","input":"b"}"#, "not both"),
        ] {
            match built(body) {
                Err(GatewayError::BadRequest { code, message }) => {
                    assert_eq!(code, "invalid_body");
                    assert!(message.contains(needle), "{message} lacks {needle}");
                }
                _ => panic!("{} should be refused", String::from_utf8_lossy(body)),
            }
        }
        assert!(matches!(
            built(br#"{"input_value":"hi","session_id":""}"#),
            Err(GatewayError::BadRequest {
                code: "invalid_session_id",
                ..
            })
        ));
    }

    #[test]
    fn the_seed_apis_input_is_taken_as_input_value() {
        let run = runtime_body(
            br#"{"input":"Hello, how can you help me?"}"#,
            &target(),
            Speaker::Key(&key()),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&run.body).unwrap();
        assert_eq!(v["input_value"], "Hello, how can you help me?");
        assert_eq!(run.input, "Hello, how can you help me?");
    }

    #[test]
    fn the_runtime_sees_sessions_only_under_the_configs_namespace() {
        let config = Uuid::from_u128(1);
        let v = built(br#"{"input_value":"hi","session_id":"s1"}"#).unwrap();
        assert_eq!(v["session_id"], format!("{config}:s1"));
        // Naming another config's namespaced session stays inside this one.
        let other = Uuid::from_u128(77);
        let body = format!(r#"{{"input_value":"hi","session_id":"{other}:s1"}}"#);
        let v = built(body.as_bytes()).unwrap();
        assert_eq!(v["session_id"], format!("{config}:{other}:s1"));
        // No session: one per key.
        let v = built(br#"{"input_value":"hi"}"#).unwrap();
        assert_eq!(v["session_id"], format!("{config}:key-{}", key()));
        // A key's caller cannot name a widget visitor's session.
        assert!(matches!(
            built(br#"{"input_value":"hi","session_id":"visitor-1"}"#),
            Err(GatewayError::BadRequest {
                code: "invalid_session_id",
                ..
            })
        ));
    }

    #[test]
    fn a_widget_visitor_has_exactly_its_own_session() {
        let config = Uuid::from_u128(1);
        let visitor = Uuid::from_u128(9);
        let run = runtime_body(
            br#"{"input_value":"hi"}"#,
            &target(),
            Speaker::Visitor(&visitor),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&run.body).unwrap();
        assert_eq!(v["session_id"], format!("{config}:visitor-{visitor}"));
        assert!(runtime_body(
            br#"{"input_value":"hi","session_id":"s1"}"#,
            &target(),
            Speaker::Visitor(&visitor)
        )
        .is_err());
    }

    fn scrub_all(config: &Uuid, pieces: &[&[u8]]) -> Vec<u8> {
        let mut scrub = SessionScrub::new(config);
        let mut out = Vec::new();
        for piece in pieces {
            scrub.scrub(piece, &mut out);
        }
        scrub.finish(&mut out);
        out
    }

    #[test]
    fn answers_lose_the_namespace_however_they_are_split() {
        let config = Uuid::from_u128(1);
        let body = format!(
            r#"{{"session_id": "{config}:s1", "outputs": [{{"session_id":"{config}:s1", "text": "a "quote" and {config}: stays"}}]}}"#
        );
        let want = r#"{"session_id": "s1", "outputs": [{"session_id":"s1", "text": "a "quote" and 00000000-0000-0000-0000-000000000001: stays"}]}"#;
        let bytes = body.as_bytes();
        assert_eq!(
            String::from_utf8(scrub_all(&config, &[bytes])).unwrap(),
            want
        );
        for split in 1..bytes.len() {
            let out = scrub_all(&config, &[&bytes[..split], &bytes[split..]]);
            assert_eq!(String::from_utf8(out).unwrap(), want, "split at {split}");
        }
        // Another config's id is not touched, and a held tail that does not match
        // is given back.
        let other = Uuid::from_u128(2);
        let text = format!(r#"{{"session_id": "{other}:s1"}}"#);
        assert_eq!(scrub_all(&config, &[text.as_bytes()]), text.as_bytes());
        assert_eq!(
            scrub_all(&config, &[b"x \"00000000-0000"]),
            b"x \"00000000-0000"
        );
    }

    #[test]
    fn usage_reports_of_both_shapes_within_bounds() {
        let id = Uuid::from_u128(5);
        match usage_report(
            format!(r#"{{"request_id":"{id}","input_tokens":1,"output_tokens":2}}"#).as_bytes(),
        ) {
            Ok(Report::Request(r)) => {
                assert_eq!((r.request_id, r.input_tokens, r.output_tokens), (id, 1, 2))
            }
            _ => panic!("request report refused"),
        }
        match usage_report(
            format!(
                r#"{{"config_uuid":"{id}","input_tokens":3,"output_tokens":4,"event_id":"{id}"}}"#
            )
            .as_bytes(),
        ) {
            Ok(Report::Config {
                config,
                event_id,
                tokens,
            }) => {
                assert_eq!(
                    (config, event_id, tokens),
                    (
                        id,
                        Some(id),
                        Tokens {
                            input: 3,
                            output: 4
                        }
                    )
                )
            }
            _ => panic!("config report refused"),
        }
        for body in [
            format!(
                r#"{{"config_uuid":"{id}","input_tokens":18446744073709551615,"output_tokens":0}}"#
            ),
            format!(
                r#"{{"config_uuid":"{id}","input_tokens":0,"output_tokens":{}}}"#,
                MAX_TOKENS + 1
            ),
        ] {
            assert!(
                matches!(
                    usage_report(body.as_bytes()),
                    Err(GatewayError::BadRequest {
                        code: "tokens_out_of_range",
                        ..
                    })
                ),
                "{body}"
            );
        }
        for body in [
            format!(
                r#"{{"request_id":"{id}","config_uuid":"{id}","input_tokens":1,"output_tokens":1}}"#
            ),
            format!(
                r#"{{"request_id":"{id}","event_id":"{id}","input_tokens":1,"output_tokens":1}}"#
            ),
            r#"{"input_tokens":1,"output_tokens":1}"#.to_owned(),
            r#"{"config_uuid":"nope","input_tokens":1,"output_tokens":1}"#.to_owned(),
        ] {
            assert!(
                matches!(
                    usage_report(body.as_bytes()),
                    Err(GatewayError::BadRequest {
                        code: "invalid_body",
                        ..
                    })
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn stream_query() {
        assert!(!wants_stream(None).unwrap());
        assert!(wants_stream(Some("stream=true")).unwrap());
        assert!(!wants_stream(Some("stream=false")).unwrap());
        assert!(wants_stream(Some("x-api-key=abc")).is_err());
    }

    #[test]
    fn usage_from_a_non_stream_body_in_pieces() {
        let body = br#"{"session_id":"s","outputs":[{"inputs":{},"outputs":[{"results":{"message":{"text":"hi","properties":{"usage":{"input_tokens":5,"output_tokens":7,"total_tokens":12}}}}}]}]}"#;
        let mut reader = UsageReader::new(false);
        for piece in body.chunks(10) {
            reader.feed(&Bytes::copy_from_slice(piece));
        }
        assert_eq!(
            reader.finish().tokens,
            Some(Tokens {
                input: 5,
                output: 7
            })
        );
    }

    #[test]
    fn usage_from_the_end_event_split_anywhere() {
        let stream = concat!(
            "{\"event\": \"add_message\", \"data\": {\"properties\": {\"usage\": {\"input_tokens\": 1, \"output_tokens\": 1}}}}\n\n",
            "{\"event\": \"token\", \"data\": {\"chunk\": \"a\"}}\n\n",
            "{\"event\": \"end\", \"data\": {\"result\": {\"outputs\": [{\"outputs\": [{\"results\": {\"message\": {\"properties\": {\"usage\": {\"input_tokens\": 5, \"output_tokens\": 9, \"total_tokens\": 14}}}}}]}]}}}\n\n"
        )
        .as_bytes();
        for split in 1..stream.len() {
            let mut reader = UsageReader::new(true);
            reader.feed(&Bytes::copy_from_slice(&stream[..split]));
            reader.feed(&Bytes::copy_from_slice(&stream[split..]));
            assert_eq!(
                reader.finish().tokens,
                Some(Tokens {
                    input: 5,
                    output: 9
                }),
                "split at {split}"
            );
        }
        // A stream cut before `end` has no runtime count, but the tokens it streamed.
        let mut reader = UsageReader::new(true);
        reader.feed(&Bytes::copy_from_slice(&stream[..150]));
        let reading = reader.finish();
        assert_eq!(reading.tokens, None);
        assert_eq!(reading.output_text, "a");
    }

    #[test]
    fn a_stream_ending_in_an_error_event_is_read_as_failed() {
        let stream = concat!(
            "{\"event\": \"add_message\", \"data\": {\"text\": \"please boom\"}}\n\n",
            "{\"event\": \"error\", \"data\": {\"text\": \"boom from RaiseError component\\n\", \"category\": \"error\"}}\n\n",
        )
        .as_bytes();
        for split in 1..stream.len() {
            let mut reader = UsageReader::new(true);
            reader.feed(&Bytes::copy_from_slice(&stream[..split]));
            reader.feed(&Bytes::copy_from_slice(&stream[split..]));
            let reading = reader.finish();
            assert_eq!(
                reading.error.as_deref(),
                Some("boom from RaiseError component"),
                "split at {split}"
            );
            assert_eq!(reading.tokens, None);
        }
    }

    #[test]
    fn answers_without_usage_give_their_message_text_not_the_envelope() {
        let body = br#"{"session_id":"s","outputs":[{"inputs":{"input_value":"hello"},"outputs":[{"results":{"message":{"text":"hello","sender":"Machine","properties":{"usage":null}}}}]}]}"#;
        let mut reader = UsageReader::new(false);
        reader.feed(&Bytes::copy_from_slice(body));
        let reading = reader.finish();
        assert_eq!(reading.tokens, None);
        assert_eq!(reading.output_text, "hello");

        let end = concat!(
            "{\"event\": \"token\", \"data\": {\"chunk\": \"he\", \"id\": \"1\"}}\n\n",
            "{\"event\": \"end\", \"data\": {\"result\": {\"outputs\": [{\"outputs\": [{\"results\": {\"message\": {\"text\": \"hello\"}}}]}]}}}\n\n"
        );
        let mut reader = UsageReader::new(true);
        reader.feed(&Bytes::copy_from_slice(end.as_bytes()));
        assert_eq!(reader.finish().output_text, "hello");
    }

    #[test]
    fn runtime_counts_over_the_bound_are_not_taken() {
        let body = br#"{"outputs":[{"outputs":[{"results":{"message":{"text":"x","properties":{"usage":{"input_tokens":18446744073709551615,"output_tokens":1}}}}}]}]}"#;
        let mut reader = UsageReader::new(false);
        reader.feed(&Bytes::copy_from_slice(body));
        let reading = reader.finish();
        assert_eq!(reading.tokens, None);
        assert_eq!(reading.output_text, "x");
    }
}
