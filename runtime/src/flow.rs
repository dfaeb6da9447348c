//! Flows kept in memory, and the small interpreter that turns a flow graph into
//! the chain of components the demo runtime knows how to play.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};
use uuid::Uuid;

/// Template fields a request may never override through `tweaks`.
pub const PROTECTED_FIELDS: &[&str] = &["code"];

/// A stored flow: the export as posted, plus the id the runtime gave it.
pub struct Flow {
    pub id: Uuid,
    pub nodes: Vec<Value>,
    pub edges: Vec<Value>,
}

#[derive(Default)]
pub struct FlowStore {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<Uuid, Arc<Flow>>,
    by_endpoint: HashMap<String, Uuid>,
}

impl FlowStore {
    /// Stores a flow; a taken `endpoint_name` gets a `-1`, `-2`… suffix.
    /// Returns the id and the endpoint name actually used.
    pub fn insert(
        &self,
        endpoint_name: Option<String>,
        nodes: Vec<Value>,
        edges: Vec<Value>,
    ) -> (Uuid, Option<String>) {
        self.insert_as(Uuid::new_v4(), endpoint_name, nodes, edges)
    }

    /// Stores a flow under a known id (one provisioned before a restart).
    pub fn insert_as(
        &self,
        id: Uuid,
        endpoint_name: Option<String>,
        nodes: Vec<Value>,
        edges: Vec<Value>,
    ) -> (Uuid, Option<String>) {
        let mut inner = self
            .inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let endpoint_name = endpoint_name.map(|base| {
            let mut name = base.clone();
            let mut n = 1;
            while inner.by_endpoint.contains_key(&name) {
                name = format!("{base}-{n}");
                n += 1;
            }
            name
        });
        if let Some(name) = &endpoint_name {
            inner.by_endpoint.insert(name.clone(), id);
        }
        let flow = Flow { id, nodes, edges };
        inner.by_id.insert(id, Arc::new(flow));
        (id, endpoint_name)
    }

    /// Looks a flow up by uuid, or else by endpoint name.
    pub fn get(&self, id_or_name: &str) -> Option<Arc<Flow>> {
        let inner = self
            .inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let id = match Uuid::parse_str(id_or_name) {
            Ok(id) => id,
            Err(_) => *inner.by_endpoint.get(id_or_name)?,
        };
        inner.by_id.get(&id).cloned()
    }
}

/// What a component does when the demo runtime plays it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    ChatInput,
    ChatOutput,
    TextOutput,
    /// A model: answers `ECHO: <input>`, streamed word by word, with usage.
    Model,
    /// Fails when its input contains `boom`, passes it through otherwise.
    RaiseError,
    PassThrough,
}

/// A node of the flow after tweaks were applied.
#[derive(Clone, Debug)]
pub struct Node {
    pub id: String,
    pub kind: Kind,
    pub display_name: String,
    pub icon: Option<String>,
    pub output_name: String,
    pub template: Map<String, Value>,
    /// Fields set by the request's tweaks.
    pub tweaked: Vec<String>,
}

impl Node {
    pub fn str_field(&self, field: &str) -> Option<&str> {
        self.template.get(field)?.get("value")?.as_str()
    }

    pub fn int_field(&self, field: &str) -> Option<u64> {
        let v = self.template.get(field)?.get("value")?;
        v.as_u64().or_else(|| v.as_str()?.trim().parse().ok())
    }
}

fn classify(node_type: &str) -> Kind {
    let lower = node_type.to_ascii_lowercase();
    match node_type {
        "ChatInput" => Kind::ChatInput,
        "ChatOutput" => Kind::ChatOutput,
        "TextOutput" => Kind::TextOutput,
        _ if lower.contains("raiseerror") => Kind::RaiseError,
        _ if [
            "llm",
            "model",
            "openai",
            "anthropic",
            "ollama",
            "agent",
            "gemini",
            "mistral",
        ]
        .iter()
        .any(|m| lower.contains(m)) =>
        {
            Kind::Model
        }
        _ => Kind::PassThrough,
    }
}

fn parse_node(raw: &Value) -> Option<Node> {
    let id = raw.get("id")?.as_str()?.to_owned();
    let data = raw.get("data")?;
    let node = data.get("node").unwrap_or(&Value::Null);
    let node_type = data.get("type").and_then(Value::as_str).unwrap_or("");
    let display_name = data
        .get("display_name")
        .or_else(|| node.get("display_name"))
        .and_then(Value::as_str)
        .unwrap_or(node_type)
        .to_owned();
    let icon = node.get("icon").and_then(Value::as_str).map(str::to_owned);
    let output_name = node
        .get("outputs")
        .and_then(|o| o.get(0))
        .and_then(|o| o.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("message")
        .to_owned();
    let template = node
        .get("template")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    Some(Node {
        id,
        kind: classify(node_type),
        display_name,
        icon,
        output_name,
        template,
        tweaked: Vec::new(),
    })
}

/// Why tweaks were refused.
#[derive(Debug, PartialEq, Eq)]
pub struct RefusedTweaks(pub Vec<String>);

/// Applies `tweaks` (node id or display name → `{field: value}`, or a plain
/// `field: value` for every node having that field) to the nodes.
pub fn apply_tweaks(nodes: &mut [Node], tweaks: &Map<String, Value>) -> Result<(), RefusedTweaks> {
    let mut refused = Vec::new();
    for (key, value) in tweaks {
        match value.as_object() {
            Some(fields) => {
                for node in nodes
                    .iter_mut()
                    .filter(|n| &n.id == key || &n.display_name == key)
                {
                    for (field, v) in fields {
                        if PROTECTED_FIELDS.contains(&field.as_str()) {
                            refused.push(field.clone());
                            continue;
                        }
                        set_field(node, field, v.clone());
                    }
                }
            }
            None => {
                if PROTECTED_FIELDS.contains(&key.as_str()) {
                    refused.push(key.clone());
                    continue;
                }
                for node in nodes.iter_mut().filter(|n| n.template.contains_key(key)) {
                    set_field(node, key, value.clone());
                }
            }
        }
    }
    if refused.is_empty() {
        Ok(())
    } else {
        refused.sort();
        refused.dedup();
        Err(RefusedTweaks(refused))
    }
}

fn set_field(node: &mut Node, field: &str, value: Value) {
    match node.template.get_mut(field).and_then(Value::as_object_mut) {
        Some(entry) => {
            entry.insert("value".to_owned(), value);
        }
        None => {
            let mut entry = Map::new();
            entry.insert("value".to_owned(), value);
            node.template.insert(field.to_owned(), Value::Object(entry));
        }
    }
    node.tweaked.push(field.to_owned());
}

impl Flow {
    /// The nodes in execution order: from the chat input (or the first node
    /// nothing points to) along the edges. Nodes off that path are left out.
    pub fn chain(&self) -> Vec<Node> {
        let nodes: Vec<Node> = self.nodes.iter().filter_map(parse_node).collect();
        let edges: Vec<(String, String)> = self
            .edges
            .iter()
            .filter_map(|e| {
                Some((
                    e.get("source")?.as_str()?.to_owned(),
                    e.get("target")?.as_str()?.to_owned(),
                ))
            })
            .collect();
        let start = nodes
            .iter()
            .position(|n| n.kind == Kind::ChatInput)
            .or_else(|| {
                nodes
                    .iter()
                    .position(|n| !edges.iter().any(|(_, t)| t == &n.id))
            });
        let Some(mut current) = start else {
            return Vec::new();
        };
        let mut order = vec![current];
        while let Some(next) = edges
            .iter()
            .filter(|(s, _)| s == &nodes[current].id)
            .find_map(|(_, t)| nodes.iter().position(|n| &n.id == t))
        {
            if order.contains(&next) {
                break;
            }
            order.push(next);
            current = next;
        }
        order.into_iter().map(|i| nodes[i].clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(id: &str, ty: &str, name: &str) -> Value {
        json!({"id": id, "data": {"type": ty, "display_name": name,
            "node": {"template": {"sender_name": {"value": "x"}, "code": {"value": "c"}}}}})
    }

    #[test]
    fn chain_follows_edges_from_chat_input() {
        let store = FlowStore::default();
        let (id, _) = store.insert(
            Some("f".into()),
            vec![
                node("B", "ChatOutput", "Out"),
                node("M", "OpenAIModel", "Model"),
                node("A", "ChatInput", "In"),
            ],
            vec![
                json!({"source": "A", "target": "M"}),
                json!({"source": "M", "target": "B"}),
            ],
        );
        let flow = store.get(&id.to_string()).unwrap();
        let kinds: Vec<Kind> = flow.chain().iter().map(|n| n.kind).collect();
        assert_eq!(kinds, [Kind::ChatInput, Kind::Model, Kind::ChatOutput]);
        assert!(store.get("f").is_some());
        assert!(store.get("nope").is_none());
    }

    #[test]
    fn endpoint_names_are_made_unique() {
        let store = FlowStore::default();
        let (_, a) = store.insert(Some("echo".into()), vec![], vec![]);
        let (_, b) = store.insert(Some("echo".into()), vec![], vec![]);
        assert_eq!(a.as_deref(), Some("echo"));
        assert_eq!(b.as_deref(), Some("echo-1"));
    }

    #[test]
    fn tweaks_by_id_name_and_plain_value() {
        let mut nodes: Vec<Node> = [
            node("A", "ChatInput", "Chat Input"),
            node("B", "ChatOutput", "Chat Output"),
        ]
        .iter()
        .filter_map(parse_node)
        .collect();
        let tweaks = json!({"B": {"sender_name": "Bot"}, "Chat Input": {"sender_name": "Me"}});
        apply_tweaks(&mut nodes, tweaks.as_object().unwrap()).unwrap();
        assert_eq!(nodes[0].str_field("sender_name"), Some("Me"));
        assert_eq!(nodes[1].str_field("sender_name"), Some("Bot"));
        apply_tweaks(
            &mut nodes,
            json!({"sender_name": "All"}).as_object().unwrap(),
        )
        .unwrap();
        assert!(nodes
            .iter()
            .all(|n| n.str_field("sender_name") == Some("All")));
        let refused = apply_tweaks(&mut nodes, json!({"B": {"code": "x"}}).as_object().unwrap());
        assert_eq!(refused, Err(RefusedTweaks(vec!["code".into()])));
    }
}
