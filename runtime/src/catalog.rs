//! The demo runtime's component catalog, served as Langflow serves its own
//! (`GET /api/v1/all`: category → component type → component, whose
//! `template.code.value` is the component's source). The code here is the demo
//! runtime's: a short description of what it plays for that type, since it
//! interprets flows by component type and runs no Python.

use serde_json::{json, Map, Value};

/// `(category, type, display name, what the demo runtime does with it)`.
const COMPONENTS: &[(&str, &str, &str, &str)] = &[
    (
        "input_output",
        "ChatInput",
        "Chat Input",
        "passes the run's input on as the user's message",
    ),
    (
        "input_output",
        "ChatOutput",
        "Chat Output",
        "answers with the message it receives",
    ),
    (
        "input_output",
        "TextInput",
        "Text Input",
        "passes its text on",
    ),
    (
        "input_output",
        "TextOutput",
        "Text Output",
        "answers with the text it receives",
    ),
    (
        "models_and_agents",
        "Prompt Template",
        "Prompt Template",
        "passes its input on",
    ),
    (
        "models_and_agents",
        "LanguageModelComponent",
        "Language Model",
        "answers `ECHO: <input>`, token by token, with usage",
    ),
    (
        "models_and_agents",
        "Memory",
        "Message History",
        "passes its input on",
    ),
];

/// The source the demo runtime holds for component `ty` (exports still name the
/// prompt component `Prompt`, which the catalog lists as `Prompt Template`).
pub fn code_of(ty: &str) -> Option<String> {
    let ty = if ty == "Prompt" {
        "Prompt Template"
    } else {
        ty
    };
    COMPONENTS
        .iter()
        .find(|(_, t, _, _)| *t == ty)
        .map(|(_, t, _, does)| source(t, does))
}

fn source(ty: &str, does: &str) -> String {
    format!("# Agora demo runtime built-in component `{ty}`: {does}.\n")
}

/// The whole catalog, in Langflow's shape.
pub fn all() -> Value {
    let mut categories: Map<String, Value> = Map::new();
    for (category, ty, display_name, does) in COMPONENTS {
        let entry = categories
            .entry(category.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(components) = entry {
            components.insert(
                ty.to_string(),
                json!({
                    "display_name": display_name,
                    "description": does,
                    "template": {
                        "code": {
                            "type": "code", "name": "code", "required": true, "show": true,
                            "advanced": true, "dynamic": true, "multiline": true,
                            "value": source(ty, does),
                        },
                        "_type": "Component",
                    },
                    "outputs": [],
                    "metadata": {},
                }),
            );
        }
    }
    Value::Object(categories)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_component_has_code_under_its_category() {
        let all = all();
        let code = all
            .pointer("/input_output/ChatInput/template/code/value")
            .and_then(Value::as_str);
        assert_eq!(code, code_of("ChatInput").as_deref());
        assert!(
            all["models_and_agents"]["Prompt Template"]["template"]["code"]["value"].is_string()
        );
        assert_eq!(code_of("Nope"), None);
    }
}
