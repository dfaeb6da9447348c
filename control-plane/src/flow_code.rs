//! What code a flow may run on the shared runtime.
//!
//! A Langflow export carries every component's Python source
//! (`template.code.value`), and the runtime executes it. Before a flow is
//! provisioned, each component node is checked against the runtime's own
//! component catalog (Langflow's `GET /api/v1/all`):
//!
//! - code equal to one of the catalog's components passes;
//! - a node without code gets the catalog's component for its type: its code,
//!   and every template field the node leaves out, with the catalog's default
//!   (flows written for this project, like the samples, become real Langflow
//!   flows that way), and a type the catalog does not have is refused;
//! - any other code is custom code: refused, naming the node, unless staff
//!   allowed custom code for the provider organisation;
//! - a node that fixes its own `session_id` is refused: sessions belong to the
//!   gateway, which gives every run its buyer's session (a Memory component
//!   reading a fixed session would share one memory among all buyers).

use std::collections::{HashMap, HashSet};

use serde_json::Value;

/// The components a runtime offers: the template of each type (its `code`
/// among the fields), and the set of all their sources.
#[derive(Debug, Default)]
pub struct Catalog {
    by_type: HashMap<String, serde_json::Map<String, Value>>,
    sources: HashSet<String>,
}

impl Catalog {
    /// Reads Langflow's `GET /api/v1/all` body: category → type → component.
    /// Entries without code (such as the display-name map) are skipped.
    pub fn from_all(all: &Value) -> Catalog {
        let mut catalog = Catalog::default();
        let Some(categories) = all.as_object() else {
            return catalog;
        };
        for components in categories.values().filter_map(Value::as_object) {
            for (ty, component) in components {
                let Some(template) = component.get("template").and_then(Value::as_object) else {
                    continue;
                };
                let Some(source) = template
                    .get("code")
                    .and_then(|c| c.get("value"))
                    .and_then(Value::as_str)
                else {
                    continue;
                };
                catalog.sources.insert(source.to_owned());
                catalog.by_type.insert(ty.clone(), template.clone());
            }
        }
        catalog
    }

    pub fn len(&self) -> usize {
        self.by_type.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }
}

/// Why a flow may not run on the runtime.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodeRefusal {
    #[error("node {node} ({ty}) has no code and the runtime has no component of that type")]
    UnknownComponent { node: String, ty: String },
    #[error("node {node} ({ty}) runs custom code, which this provider may not publish; ask staff to allow custom code")]
    CustomCode { node: String, ty: String },
    #[error("node {node} ({ty}) sets its own session_id; leave it empty: each run gets its buyer's session")]
    FixedSession { node: String, ty: String },
}

impl CodeRefusal {
    pub fn code(&self) -> &'static str {
        match self {
            CodeRefusal::UnknownComponent { .. } => "unknown_component",
            CodeRefusal::CustomCode { .. } => "custom_code_not_allowed",
            CodeRefusal::FixedSession { .. } => "fixed_session_id",
        }
    }
}

/// Types exports still use for components the catalog now lists under another
/// name (Langflow 1.13 lists `Prompt` as `Prompt Template`).
const RENAMED: &[(&str, &str)] = &[("Prompt", "Prompt Template")];

impl Catalog {
    fn template_for(&self, ty: &str) -> Option<&serde_json::Map<String, Value>> {
        self.by_type.get(ty).or_else(|| {
            RENAMED
                .iter()
                .find(|(old, _)| *old == ty)
                .and_then(|(_, new)| self.by_type.get(*new))
        })
    }
}

/// The flow as it may be provisioned: nodes without code given the catalog's.
pub fn prepare(
    flow: &Value,
    catalog: &Catalog,
    custom_code_allowed: bool,
) -> Result<Value, CodeRefusal> {
    let mut flow = flow.clone();
    let Some(nodes) = flow
        .pointer_mut("/data/nodes")
        .and_then(Value::as_array_mut)
    else {
        return Ok(flow);
    };
    for node in nodes.iter_mut() {
        // Notes carry no component.
        if node.get("type").and_then(Value::as_str) == Some("noteNode") {
            continue;
        }
        let id = node
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        let ty = node
            .pointer("/data/type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let Some(template) = node
            .pointer_mut("/data/node/template")
            .and_then(Value::as_object_mut)
        else {
            return Err(CodeRefusal::UnknownComponent { node: id, ty });
        };
        let fixed_session = template
            .get("session_id")
            .and_then(|f| f.get("value"))
            .and_then(Value::as_str)
            .is_some_and(|v| !v.trim().is_empty());
        if fixed_session {
            return Err(CodeRefusal::FixedSession { node: id, ty });
        }
        match template
            .get("code")
            .and_then(|c| c.get("value"))
            .and_then(Value::as_str)
        {
            Some(source) if catalog.sources.contains(source) => {}
            Some(_) if custom_code_allowed => {}
            Some(_) => return Err(CodeRefusal::CustomCode { node: id, ty }),
            None => match catalog.template_for(&ty) {
                Some(component) => {
                    // The catalog's fields, the node's values over them.
                    let mut full = component.clone();
                    for (field, value) in std::mem::take(template) {
                        full.insert(field, value);
                    }
                    *template = full;
                }
                None => return Err(CodeRefusal::UnknownComponent { node: id, ty }),
            },
        }
    }
    Ok(flow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn catalog() -> Catalog {
        Catalog::from_all(&json!({
            "input_output": {
                "ChatInput": {"template": {"code": {"type": "code", "value": "class ChatInput: ..."},
                                           "session_id": {"type": "str", "value": ""},
                                           "input_value": {"type": "str", "value": "default"}}},
                "ChatOutput": {"template": {"code": {"type": "code", "value": "class ChatOutput: ..."}}}
            },
            "component_display_names": {"ChatInput": "Chat Input"}
        }))
    }

    fn flow(nodes: Value) -> Value {
        json!({"data": {"nodes": nodes, "edges": []}})
    }

    fn node(id: &str, ty: &str, code: Option<&str>) -> Value {
        let mut template = json!({"input_value": {"value": ""}});
        if let Some(code) = code {
            template["code"] = json!({"type": "code", "value": code});
        }
        json!({"id": id, "type": "genericNode", "data": {"type": ty, "node": {"template": template}}})
    }

    #[test]
    fn the_catalog_reads_every_category_and_skips_entries_without_code() {
        assert_eq!(catalog().len(), 2);
    }

    #[test]
    fn built_in_code_passes_and_missing_code_is_filled_in() {
        let f = flow(json!([
            node("ChatInput-1", "ChatInput", None),
            node("ChatOutput-1", "ChatOutput", Some("class ChatOutput: ...")),
            {"id": "note-1", "type": "noteNode", "data": {"node": {}}},
        ]));
        let out = prepare(&f, &catalog(), false).unwrap();
        assert_eq!(
            out.pointer("/data/nodes/0/data/node/template/code/value"),
            Some(&json!("class ChatInput: ..."))
        );
        // The node's own values win; the fields it left out come from the catalog.
        assert_eq!(
            out.pointer("/data/nodes/0/data/node/template/input_value"),
            Some(&json!({"value": ""}))
        );
        assert_eq!(
            out.pointer("/data/nodes/0/data/node/template/session_id"),
            Some(&json!({"type": "str", "value": ""}))
        );
    }

    #[test]
    fn a_node_that_fixes_its_session_is_refused() {
        let mut memory = node("Memory-1", "ChatInput", Some("class ChatInput: ..."));
        memory["data"]["node"]["template"]["session_id"] = json!({"value": "everyone"});
        let refused = prepare(&flow(json!([memory])), &catalog(), true).unwrap_err();
        assert_eq!(refused.code(), "fixed_session_id");
        assert!(refused.to_string().contains("Memory-1"));
        let mut empty = node("Memory-1", "ChatInput", Some("class ChatInput: ..."));
        empty["data"]["node"]["template"]["session_id"] = json!({"value": ""});
        assert!(prepare(&flow(json!([empty])), &catalog(), false).is_ok());
    }

    #[test]
    fn custom_code_is_refused_naming_the_node_unless_allowed() {
        let f = flow(json!([node(
            "Evil-1",
            "ChatInput",
            Some("import os; os.system('id')")
        )]));
        let refused = prepare(&f, &catalog(), false).unwrap_err();
        assert_eq!(
            refused,
            CodeRefusal::CustomCode {
                node: "Evil-1".into(),
                ty: "ChatInput".into()
            }
        );
        assert!(refused.to_string().contains("Evil-1"));
        assert!(prepare(&f, &catalog(), true).is_ok());
    }

    #[test]
    fn renamed_types_find_their_component() {
        let c = Catalog::from_all(&json!({"models_and_agents": {
            "Prompt Template": {"template": {"code": {"value": "class PromptComponent: ..."}}}
        }}));
        let out = prepare(&flow(json!([node("Prompt-1", "Prompt", None)])), &c, false).unwrap();
        assert_eq!(
            out.pointer("/data/nodes/0/data/node/template/code/value"),
            Some(&json!("class PromptComponent: ..."))
        );
    }

    #[test]
    fn a_type_the_runtime_lacks_is_refused_when_it_brings_no_code() {
        let f = flow(json!([node("X-1", "Mystery", None)]));
        assert_eq!(
            prepare(&f, &catalog(), true).unwrap_err().code(),
            "unknown_component"
        );
    }
}
