//! The invoke route: what the buyer may send, what the runtime receives, and what
//! is read back from the runtime's answer for metering.
//!
//! Langflow silently drops a body with an invalid field value and runs the flow's
//! stored input instead (see the runtime contract), so the body is validated here
//! and rebuilt from the validated fields: unknown members, wrong types and unknown
//! `input_type`/`output_type` values are refused with a 400 naming the field.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::GatewayError;
use crate::state::RouteTarget;

/// Longest accepted `session_id`.
pub const MAX_SESSION_ID: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BuyerBody {
    input_value: String,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    tweaks: &'a serde_json::Map<String, serde_json::Value>,
}

/// Validates the buyer's body and builds the one sent to the runtime.
pub fn runtime_body(body: &[u8], target: &RouteTarget) -> Result<Bytes, GatewayError> {
    let buyer: BuyerBody = serde_json::from_slice(body).map_err(|e| {
        let message = e.to_string();
        // serde_json's messages name the field and never echo large values.
        let message = match message.find(" at line") {
            Some(i) => message[..i].to_owned(),
            None => message,
        };
        GatewayError::BadRequest {
            code: "invalid_body",
            message: format!(
                "The body must be JSON {{input_value, input_type?, output_type?, session_id?}}: {message}."
            ),
        }
    })?;
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
    }
    let out = RuntimeBody {
        input_value: &buyer.input_value,
        input_type: buyer.input_type,
        output_type: buyer.output_type,
        session_id: buyer.session_id.as_deref(),
        tweaks: &target.route.tweaks,
    };
    serde_json::to_vec(&out)
        .map(Bytes::from)
        .map_err(|_| GatewayError::BadRequest {
            code: "invalid_body",
            message: "The body cannot be encoded.".into(),
        })
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

/// Reads token usage from what the runtime sends, without holding up the bytes:
/// chunks are shared (`Bytes` clones), and only the part that can carry usage is
/// parsed — the whole body of a non-stream answer, the `end` event of a stream.
pub struct UsageReader {
    stream: bool,
    /// Chunks of the current stream event, or of the whole non-stream body.
    pending: Vec<Bytes>,
    pending_len: usize,
    /// Whether the pending event is still a candidate (`end`) or over the bound.
    skip: bool,
    /// Whether the last chunk fed ended with a newline (half of a separator).
    prev_newline: bool,
    found: Option<Tokens>,
}

/// Longest body or stream event parsed for usage.
const MAX_USAGE_SCAN: usize = 1024 * 1024;

impl UsageReader {
    pub fn new(stream: bool) -> UsageReader {
        UsageReader {
            stream,
            pending: Vec::new(),
            pending_len: 0,
            skip: false,
            prev_newline: false,
            found: None,
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

    /// Called at the end of the body.
    pub fn finish(&mut self) -> Option<Tokens> {
        if self.stream {
            self.finish_event();
        } else if !self.skip {
            let body = self.take();
            self.found = last_usage(&body).or(self.found);
        }
        self.found
    }

    fn push(&mut self, bytes: Bytes) {
        if self.skip || bytes.is_empty() {
            return;
        }
        if self.stream && self.pending.is_empty() {
            // Only the `end` event carries the final result; skip others unparsed.
            let head = &bytes[..bytes.len().min(32)];
            let trimmed = head
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(0);
            if !head[trimmed..].starts_with(b"{\"event\": \"end\"")
                && !head[trimmed..].starts_with(b"{\"event\":\"end\"")
                && head.len() - trimmed >= 16
            {
                self.skip = true;
                return;
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
        let event = self.take();
        if skip || event.is_empty() {
            return;
        }
        if event.trim_ascii_start().starts_with(b"{\"event\": \"end\"")
            || event.trim_ascii_start().starts_with(b"{\"event\":\"end\"")
        {
            self.found = last_usage(&event).or(self.found);
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

    #[test]
    fn bodies_are_validated_and_rebuilt() {
        let t = target();
        let out = runtime_body(br#"{"input_value":"hi","session_id":"s1"}"#, &t).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["input_value"], "hi");
        assert_eq!(v["input_type"], "chat");
        assert_eq!(v["output_type"], "chat");
        assert_eq!(v["session_id"], "s1");
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
        ] {
            match runtime_body(body, &t) {
                Err(GatewayError::BadRequest { code, message }) => {
                    assert_eq!(code, "invalid_body");
                    assert!(message.contains(needle), "{message} lacks {needle}");
                }
                _ => panic!("{} should be refused", String::from_utf8_lossy(body)),
            }
        }
        assert!(matches!(
            runtime_body(br#"{"input_value":"hi","session_id":""}"#, &t),
            Err(GatewayError::BadRequest {
                code: "invalid_session_id",
                ..
            })
        ));
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
            reader.finish(),
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
                reader.finish(),
                Some(Tokens {
                    input: 5,
                    output: 9
                }),
                "split at {split}"
            );
        }
        // A stream cut before `end` has no runtime count.
        let mut reader = UsageReader::new(true);
        reader.feed(&Bytes::copy_from_slice(&stream[..150]));
        assert_eq!(reader.finish(), None);
    }
}
