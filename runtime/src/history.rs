//! Chat messages as Langflow keeps them: every run stores its input and its
//! answer under the run's `session_id` (the flow id when the request named
//! none), and `GET /api/v1/monitor/messages?session_id=&flow_id=` lists them in
//! Langflow's shape. Memory is bounded: the oldest messages go first.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde_json::{json, Value};

use crate::message::Message;

/// Messages kept, over all flows and sessions.
const MAX_MESSAGES: usize = 10_000;

#[derive(Default)]
pub struct History {
    messages: Mutex<VecDeque<Value>>,
}

impl History {
    pub fn record(&self, message: &Message) {
        let stored = json!({
            "id": message.id,
            "flow_id": message.flow_id,
            "timestamp": message.timestamp,
            "sender": message.sender,
            "sender_name": message.sender_name,
            "session_id": message.session_id,
            "context_id": message.context_id,
            "text": message.text,
            "files": "[]",
            "edit": false,
            "duration": null,
            "properties": message.properties,
            "category": message.category,
            "content_blocks": message.content_blocks,
            "session_metadata": {"graph_run_id": message.run_id},
        });
        let mut messages = self.lock();
        if messages.len() == MAX_MESSAGES {
            messages.pop_front();
        }
        messages.push_back(stored);
    }

    /// Messages of one session and/or flow, oldest first.
    pub fn list(&self, session_id: Option<&str>, flow_id: Option<&str>) -> Vec<Value> {
        let matches = |m: &Value, field: &str, want: Option<&str>| {
            want.is_none_or(|w| m.get(field).and_then(Value::as_str) == Some(w))
        };
        self.lock()
            .iter()
            .filter(|m| matches(m, "session_id", session_id) && matches(m, "flow_id", flow_id))
            .cloned()
            .collect()
    }

    /// The distinct session ids, in order of first use.
    pub fn sessions(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for m in self.lock().iter() {
            if let Some(s) = m.get("session_id").and_then(Value::as_str) {
                if !out.iter().any(|o| o == s) {
                    out.push(s.to_owned());
                }
            }
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Value>> {
        self.messages
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
