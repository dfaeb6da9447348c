//! Flow import: real Langflow exports and the project's sample flows parse into
//! the expected summaries; broken exports are refused with an error that names
//! what to fix.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use agora_config::flow::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// Helpers

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shared fixtures beside the checkout, when present.
fn shared_fixtures() -> Option<PathBuf> {
    let dir = manifest_dir().join("../../shared/fixtures");
    if dir.join("langflow").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "shared fixtures not found at {}; Langflow compatibility cases not run",
            dir.display()
        );
        None
    }
}

fn parse_file(path: &Path) -> FlowDefinition {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    FlowDefinition::parse(&bytes).unwrap_or_else(|e| panic!("{} refused: {e}", path.display()))
}

/// A shared fixture, parsed; `None` when the shared fixtures are absent.
fn shared_flow(relative: &str) -> Option<FlowDefinition> {
    Some(parse_file(&shared_fixtures()?.join(relative)))
}

fn project_flows_dir() -> PathBuf {
    manifest_dir().join("flows")
}

fn project_flow(file: &str) -> FlowDefinition {
    parse_file(&project_flows_dir().join(file))
}

/// A project sample flow as JSON, to break in a test.
fn sample(file: &str) -> Value {
    let path = project_flows_dir().join(file);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

fn nodes(flow: &mut Value) -> &mut Vec<Value> {
    flow["data"]["nodes"].as_array_mut().unwrap()
}

fn edges(flow: &mut Value) -> &mut Vec<Value> {
    flow["data"]["edges"].as_array_mut().unwrap()
}

fn parse_value(flow: &Value) -> Result<FlowDefinition, FlowError> {
    FlowDefinition::parse(&serde_json::to_vec(flow).unwrap())
}

fn ids(components: &[ComponentRef]) -> Vec<&str> {
    components.iter().map(|c| c.id.as_str()).collect()
}

fn secrets(summary: &FlowSummary) -> Vec<(&str, &str)> {
    summary
        .secrets
        .iter()
        .map(|s| (s.node_id.as_str(), s.field.as_str()))
        .collect()
}

fn tweakables(summary: &FlowSummary) -> Vec<(&str, &str)> {
    summary
        .tweakable_fields
        .iter()
        .map(|t| (t.node_id.as_str(), t.field.as_str()))
        .collect()
}

// ---------------------------------------------------------------------------
// Compatibility with real Langflow exports

#[test]
fn every_shared_langflow_export_parses() {
    let Some(dir) = shared_fixtures() else {
        return;
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir.join("langflow"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.push(dir.join("langflow-wire/flows/echo_flow.json"));
    assert!(
        paths.len() >= 6,
        "expected the Langflow exports, found {paths:?}"
    );
    for path in &paths {
        let flow = parse_file(path);
        let original: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let summary = flow.summary();
        assert!(!summary.inputs.is_empty(), "{}: no input", path.display());
        assert!(!summary.outputs.is_empty(), "{}: no output", path.display());
        assert_eq!(
            summary.node_count,
            original["data"]["nodes"].as_array().unwrap().len()
        );
        assert_eq!(
            summary.edge_count,
            original["data"]["edges"].as_array().unwrap().len()
        );
        assert_eq!(flow.as_json(), &original, "{}", path.display());
    }
}

#[test]
fn basic_prompting_summary() {
    let Some(flow) = shared_flow("langflow/Basic_Prompting.json") else {
        return;
    };
    let s = flow.summary();
    assert_eq!(s.name.as_deref(), Some("Basic Prompting"));
    assert_eq!(
        s.description.as_deref(),
        Some("Perform basic prompting with an OpenAI model.")
    );
    assert_eq!(s.endpoint_name, None);
    assert_eq!(
        s.inputs,
        vec![ComponentRef {
            id: "ChatInput-b6UCc".into(),
            component_type: "ChatInput".into(),
            display_name: Some("Chat Input".into()),
        }]
    );
    // `data.display_name` is null here; the component's own name is used.
    assert_eq!(
        s.outputs,
        vec![ComponentRef {
            id: "ChatOutput-yK0AU".into(),
            component_type: "ChatOutput".into(),
            display_name: Some("Chat Output".into()),
        }]
    );
    assert_eq!(
        s.secrets,
        vec![SecretField {
            node_id: "LanguageModelComponent-FLeYF".into(),
            field: "api_key".into(),
            display_name: Some("API Key".into()),
        }]
    );
    // The model's `input_value` and `system_message` are fed by edges, the
    // ChatInput's `input_value` comes with each request, and the rest is advanced.
    assert_eq!(tweakables(s), vec![("Prompt-t2oaK", "template")]);
    let template = &s.tweakable_fields[0];
    assert_eq!(template.field_type, "prompt");
    assert_eq!(template.component_type, "Prompt");
    assert!(template
        .default
        .as_str()
        .unwrap()
        .starts_with("Answer the user as if you were a GenAI expert"));
    // The Language Model component has no model selected and no options listed.
    assert!(s.model_providers.is_empty());
    // Two of the six nodes are notes.
    assert_eq!((s.node_count, s.edge_count), (6, 3));
}

#[test]
fn document_qa_summary() {
    let Some(flow) = shared_flow("langflow/Document_QandA.json") else {
        return;
    };
    let s = flow.summary();
    assert_eq!(ids(&s.inputs), ["ChatInput-docqa"]);
    assert_eq!(ids(&s.outputs), ["ChatOutput-9SFlE"]);
    assert_eq!(
        secrets(s),
        [
            ("KnowledgeRetrieve-docqa", "api_key"),
            ("Agent-docqa", "api_key")
        ]
    );
    assert_eq!(s.model_providers, ["Google Generative AI", "OpenAI"]);
    let t = tweakables(s);
    assert!(t.contains(&("Prompt-docqa", "template")), "{t:?}");
    assert!(t.contains(&("Agent-docqa", "system_prompt")), "{t:?}");
    // Fed by edges from the ChatInput and the Parser.
    assert!(!t.contains(&("Prompt-docqa", "question")), "{t:?}");
    assert!(!t.contains(&("Prompt-docqa", "context")), "{t:?}");
    assert!(
        !t.contains(&("KnowledgeRetrieve-docqa", "search_query")),
        "{t:?}"
    );
    // Never offered: code, models, handles, advanced fields.
    for field in &s.tweakable_fields {
        assert_ne!(field.field, "code");
        assert!(!["code", "file", "model", "other"].contains(&field.field_type.as_str()));
    }
    assert!(!t.contains(&("Agent-docqa", "max_iterations")), "{t:?}");
}

#[test]
fn memory_chatbot_summary() {
    let Some(flow) = shared_flow("langflow/Memory_Chatbot.json") else {
        return;
    };
    let s = flow.summary();
    assert_eq!(ids(&s.inputs), ["ChatInput-oQkLS"]);
    assert_eq!(ids(&s.outputs), ["ChatOutput-65zjS"]);
    assert_eq!(secrets(s), [("Agent-AlLub", "api_key")]);
    assert_eq!(
        s.model_providers,
        ["Google Generative AI", "IBM WatsonX", "Ollama", "OpenAI"]
    );
    // The Memory Base is the agent's tool: the agent fills `search_query`.
    assert_eq!(
        tweakables(s),
        [
            ("Agent-AlLub", "system_prompt"),
            ("MemoryBase-xePih", "memory_base")
        ]
    );
}

#[test]
fn simple_agent_summary() {
    let Some(flow) = shared_flow("langflow/Simple_Agent.json") else {
        return;
    };
    let s = flow.summary();
    assert_eq!(ids(&s.inputs), ["ChatInput-tKQ4d"]);
    assert_eq!(ids(&s.outputs), ["ChatOutput-KxTA8"]);
    assert_eq!(secrets(s), [("Agent-EXpSZ", "api_key")]);
    assert_eq!(s.model_providers, ["Google Generative AI"]);
    assert_eq!(
        tweakables(s),
        [
            ("Agent-EXpSZ", "system_prompt"),
            ("URLComponent-Tjh8k", "max_depth")
        ]
    );
    assert_eq!((s.node_count, s.edge_count), (6, 4));
}

#[test]
fn vector_store_rag_summary() {
    let Some(flow) = shared_flow("langflow/Vector_Store_RAG.json") else {
        return;
    };
    let s = flow.summary();
    assert_eq!(ids(&s.inputs), ["ChatInput-baFmX"]);
    assert_eq!(ids(&s.outputs), ["ChatOutput-Xu65b"]);
    assert_eq!(
        secrets(s),
        [("Knowledge-vLJOb", "api_key"), ("Agent-F0Dv0", "api_key")]
    );
    assert_eq!(
        s.model_providers,
        ["Google Generative AI", "IBM WatsonX", "Ollama", "OpenAI"]
    );
    let t = tweakables(s);
    assert!(t.contains(&("Prompt-KZQCQ", "template")), "{t:?}");
    assert!(t.contains(&("Knowledge-vLJOb", "knowledge_base")), "{t:?}");
    assert!(!t.contains(&("Knowledge-vLJOb", "search_query")), "{t:?}");
}

#[test]
fn echo_flow_summary() {
    let Some(flow) = shared_flow("langflow-wire/flows/echo_flow.json") else {
        return;
    };
    let s = flow.summary();
    assert_eq!(s.name.as_deref(), Some("Echo (ChatInput->ChatOutput)"));
    assert_eq!(s.endpoint_name.as_deref(), Some("echo"));
    assert_eq!(ids(&s.inputs), ["ChatInput-b6UCc"]);
    assert_eq!(ids(&s.outputs), ["ChatOutput-yK0AU"]);
    assert!(s.tweakable_fields.is_empty(), "{:?}", s.tweakable_fields);
    assert!(s.secrets.is_empty());
    assert!(s.model_providers.is_empty());
    assert_eq!((s.node_count, s.edge_count), (2, 1));
}

// ---------------------------------------------------------------------------
// The project's sample flows

/// Every shipped sample flow, with its input and output node ids.
const PROJECT_FLOWS: [(&str, &str, &str); 4] = [
    (
        "support-assistant.json",
        "ChatInput-sa1Qx",
        "ChatOutput-sa3Tm",
    ),
    ("faq-echo.json", "ChatInput-fq1Ab", "ChatOutput-fq2Cd"),
    ("doc-summarizer.json", "ChatInput-ds1Ef", "ChatOutput-ds4Lm"),
    ("memory-chat.json", "ChatInput-m1", "ChatOutput-m4"),
];

#[test]
fn every_project_flow_parses_with_its_input_and_output() {
    let shipped: BTreeSet<String> = std::fs::read_dir(project_flows_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = PROJECT_FLOWS.iter().map(|f| f.0.to_owned()).collect();
    assert_eq!(
        shipped, expected,
        "every file in config/flows/ is checked here"
    );
    for (file, input, output) in PROJECT_FLOWS {
        let path = project_flows_dir().join(file);
        assert!(
            std::fs::metadata(&path).unwrap().len() < 10 * 1024,
            "{file} is small"
        );
        let flow = parse_file(&path);
        let s = flow.summary();
        assert_eq!(ids(&s.inputs), [input], "{file}");
        assert_eq!(ids(&s.outputs), [output], "{file}");
        assert_eq!(
            s.endpoint_name.as_deref(),
            Some(file.trim_end_matches(".json"))
        );
        assert!(s.name.is_some() && s.description.is_some(), "{file}");
        assert_eq!(flow.as_json()["is_component"], json!(false));
    }
}

#[test]
fn support_assistant_summary() {
    let s = project_flow("support-assistant.json").summary().clone();
    assert_eq!(s.name.as_deref(), Some("Support Assistant"));
    // `question` is fed by the ChatInput; the template and its other variables are tweakable.
    assert_eq!(
        tweakables(&s),
        [
            ("Prompt-sa2Rk", "template"),
            ("Prompt-sa2Rk", "product"),
            ("Prompt-sa2Rk", "tone")
        ]
    );
    assert_eq!(s.tweakable_fields[1].default, json!("Agora"));
    assert!(s.secrets.is_empty());
    assert!(s.model_providers.is_empty());
    assert_eq!((s.node_count, s.edge_count), (3, 2));
}

#[test]
fn faq_echo_summary() {
    let s = project_flow("faq-echo.json").summary().clone();
    assert_eq!(s.name.as_deref(), Some("FAQ Echo"));
    assert!(s.tweakable_fields.is_empty(), "{:?}", s.tweakable_fields);
    assert!(s.secrets.is_empty());
    assert_eq!((s.node_count, s.edge_count), (2, 1));
}

#[test]
fn doc_summarizer_summary() {
    let s = project_flow("doc-summarizer.json").summary().clone();
    assert_eq!(
        s.secrets,
        vec![SecretField {
            node_id: "LanguageModelComponent-ds3Jk".into(),
            field: "api_key".into(),
            display_name: Some("OpenAI API Key".into()),
        }]
    );
    assert_eq!(s.model_providers, ["OpenAI"]);
    assert_eq!(
        tweakables(&s),
        [
            ("Prompt-ds2Gh", "template"),
            ("Prompt-ds2Gh", "bullets"),
            ("LanguageModelComponent-ds3Jk", "provider"),
            ("LanguageModelComponent-ds3Jk", "model_name"),
            ("LanguageModelComponent-ds3Jk", "system_message"),
            ("LanguageModelComponent-ds3Jk", "temperature"),
        ]
    );
    let temperature = &s.tweakable_fields[5];
    assert_eq!(temperature.field_type, "slider");
    assert_eq!(temperature.default, json!(0.2));
    assert_eq!(temperature.display_name.as_deref(), Some("Temperature"));
    assert_eq!((s.node_count, s.edge_count), (4, 3));
}

#[test]
fn a_selected_model_names_its_provider() {
    let mut flow = sample("doc-summarizer.json");
    let model = &mut nodes(&mut flow)[2]["data"]["node"]["template"];
    model["provider"]["value"] = json!("");
    model["model"] = json!({
        "type": "model", "show": true, "input_types": ["LanguageModel"],
        "value": [{"name": "claude-sonnet-4", "provider": "Anthropic"}],
        "options": [{"name": "gpt-4o", "provider": "OpenAI"}, {"name": "claude-sonnet-4", "provider": "Anthropic"}]
    });
    let s = parse_value(&flow).unwrap().summary().clone();
    assert_eq!(s.model_providers, ["Anthropic"]);

    // Nothing selected: the providers offered.
    nodes(&mut flow)[2]["data"]["node"]["template"]["model"]["value"] = json!("");
    let s = parse_value(&flow).unwrap().summary().clone();
    assert_eq!(s.model_providers, ["Anthropic", "OpenAI"]);
}

#[test]
fn the_export_is_kept_as_given() {
    let original = sample("doc-summarizer.json");
    let flow = FlowDefinition::from_value(original.clone()).unwrap();
    assert_eq!(flow.as_json(), &original);
    let summary = flow.summary().clone();
    assert_eq!(flow.into_json(), original);
    let round_trip: FlowSummary =
        serde_json::from_value(serde_json::to_value(&summary).unwrap()).unwrap();
    assert_eq!(round_trip, summary);
}

#[test]
fn notes_need_no_component() {
    let mut flow = sample("faq-echo.json");
    nodes(&mut flow).push(json!({"id": "note-1", "type": "noteNode"}));
    nodes(&mut flow).push(json!({
        "id": "note-2", "type": "noteNode",
        "data": {"id": "note-2", "type": "note", "node": {"description": "# Read me"}}
    }));
    let s = parse_value(&flow).unwrap().summary().clone();
    assert_eq!(s.node_count, 4);
    assert!(s.tweakable_fields.is_empty());
}

// ---------------------------------------------------------------------------
// Refusals

#[test]
fn refuses_an_edge_to_a_missing_node() {
    let mut flow = sample("support-assistant.json");
    let edge_id = edges(&mut flow)[1]["id"].as_str().unwrap().to_owned();
    edges(&mut flow)[1]["target"] = json!("ChatOutput-gone");
    let err = parse_value(&flow).unwrap_err();
    assert_eq!(
        err,
        FlowError::DanglingEdge {
            edge_id: Some(edge_id.clone()),
            node_id: "ChatOutput-gone".into(),
            end: "target",
        }
    );
    assert_eq!(err.code(), "dangling_edge");
    let message = err.to_string();
    assert!(message.contains(&edge_id), "{message}");
    assert!(message.contains("ChatOutput-gone"), "{message}");
    assert!(message.contains("target"), "{message}");

    // Without an edge id the message still names the missing node.
    let mut flow = sample("support-assistant.json");
    edges(&mut flow)[0].as_object_mut().unwrap().remove("id");
    edges(&mut flow)[0]["source"] = json!("ChatInput-gone");
    let err = parse_value(&flow).unwrap_err();
    assert!(
        matches!(&err, FlowError::DanglingEdge { edge_id: None, node_id, end: "source" } if node_id == "ChatInput-gone"),
        "{err:?}"
    );
    assert!(err.to_string().contains("ChatInput-gone"), "{err}");
}

#[test]
fn refuses_a_duplicate_node_id() {
    let mut flow = sample("support-assistant.json");
    nodes(&mut flow)[1]["id"] = json!("ChatInput-sa1Qx");
    let err = parse_value(&flow).unwrap_err();
    assert_eq!(
        err,
        FlowError::DuplicateNode {
            node_id: "ChatInput-sa1Qx".into()
        }
    );
    assert_eq!(err.code(), "duplicate_node");
    assert!(err.to_string().contains("ChatInput-sa1Qx"), "{err}");
}

#[test]
fn refuses_a_flow_without_chat_input() {
    let mut flow = sample("support-assistant.json");
    nodes(&mut flow).retain(|n| n["data"]["type"] != "ChatInput");
    edges(&mut flow).retain(|e| e["source"] != "ChatInput-sa1Qx");
    let err = parse_value(&flow).unwrap_err();
    assert_eq!(err, FlowError::NoChatInput);
    assert_eq!(err.code(), "no_chat_input");
    assert!(err.to_string().contains("ChatInput"), "{err}");
}

#[test]
fn refuses_a_flow_without_chat_output() {
    let mut flow = sample("support-assistant.json");
    nodes(&mut flow).retain(|n| n["data"]["type"] != "ChatOutput");
    edges(&mut flow).retain(|e| e["target"] != "ChatOutput-sa3Tm");
    let err = parse_value(&flow).unwrap_err();
    assert_eq!(err, FlowError::NoChatOutput);
    assert_eq!(err.code(), "no_chat_output");
    assert!(err.to_string().contains("ChatOutput"), "{err}");
}

#[test]
fn a_text_input_and_output_are_enough() {
    let mut flow = sample("faq-echo.json");
    nodes(&mut flow)[0]["data"]["type"] = json!("TextInput");
    nodes(&mut flow)[1]["data"]["type"] = json!("TextOutput");
    let s = parse_value(&flow).unwrap().summary().clone();
    assert_eq!(s.inputs[0].component_type, "TextInput");
    assert_eq!(s.outputs[0].component_type, "TextOutput");
}

#[test]
fn refuses_what_is_not_a_flow() {
    let faq = sample("faq-echo.json");
    let cases = [
        (json!([faq.clone()]), "an array"),
        (json!({}), "data"),
        (json!({"data": {}}), "data.nodes"),
        (json!({"data": {"nodes": [], "edges": {}}}), "data.edges"),
        (json!({"data": []}), "data"),
        (json!({"flows": [faq.clone()]}), "single flow"),
        (json!({"nodes": [], "edges": []}), "under `data`"),
        (json!("flow"), "a string"),
    ];
    for (value, hint) in cases {
        let err = parse_value(&value).unwrap_err();
        assert!(matches!(err, FlowError::NotAFlow(_)), "{value}: {err:?}");
        assert_eq!(err.code(), "not_a_flow");
        let message = err.to_string();
        assert!(message.contains(hint), "{value}: {message}");
        assert!(
            message.contains("nodes"),
            "says what is expected: {message}"
        );
    }

    let mut component = faq.clone();
    component["is_component"] = json!(true);
    let err = parse_value(&component).unwrap_err();
    assert!(matches!(err, FlowError::NotAFlow(_)), "{err:?}");
    assert!(err.to_string().contains("is_component"), "{err}");

    let mut named = faq;
    named["name"] = json!(7);
    let err = parse_value(&named).unwrap_err();
    assert!(err.to_string().contains("`name`"), "{err}");
}

#[test]
fn refuses_invalid_json() {
    let bytes = std::fs::read(project_flows_dir().join("faq-echo.json")).unwrap();
    for broken in [
        &bytes[..bytes.len() / 2],
        b"",
        b"{\"data\": }",
        b"\xff\xfe{}",
    ] {
        let err = FlowDefinition::parse(broken).unwrap_err();
        assert!(matches!(err, FlowError::InvalidJson(_)), "{err:?}");
        assert_eq!(err.code(), "invalid_json");
    }
}

#[test]
fn accepts_a_byte_order_mark() {
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(std::fs::read(project_flows_dir().join("faq-echo.json")).unwrap());
    assert!(FlowDefinition::parse(&bytes).is_ok());
}

#[test]
fn refuses_more_than_max_flow_bytes() {
    let bytes = serde_json::to_vec(&sample("faq-echo.json")).unwrap();
    // Trailing whitespace is valid JSON: exactly at the limit is accepted.
    let mut at_limit = bytes.clone();
    at_limit.resize(MAX_FLOW_BYTES, b' ');
    assert!(FlowDefinition::parse(&at_limit).is_ok());

    let mut flow = sample("faq-echo.json");
    flow["description"] = json!("x".repeat(MAX_FLOW_BYTES));
    let err = parse_value(&flow).unwrap_err();
    assert_eq!(
        err,
        FlowError::TooLarge {
            limit: MAX_FLOW_BYTES
        }
    );
    assert_eq!(err.code(), "flow_too_large");
    assert!(
        err.to_string().contains(&MAX_FLOW_BYTES.to_string()),
        "{err}"
    );

    // The same limit holds for a value handed over directly.
    let err = FlowDefinition::from_value(flow).unwrap_err();
    assert!(matches!(err, FlowError::TooLarge { .. }), "{err:?}");
}

#[test]
fn refuses_nesting_deeper_than_max_flow_depth() {
    let deep = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));

    // Far too deep: refused before parsing, without exhausting the stack.
    let err = FlowDefinition::parse(deep(10_000).as_bytes()).unwrap_err();
    assert_eq!(
        err,
        FlowError::TooDeep {
            limit: MAX_FLOW_DEPTH
        }
    );
    assert_eq!(err.code(), "flow_too_deep");
    assert!(err.to_string().contains("64"), "{err}");

    // The limit itself is allowed through to the structure checks.
    let err = FlowDefinition::parse(deep(MAX_FLOW_DEPTH).as_bytes()).unwrap_err();
    assert!(matches!(err, FlowError::NotAFlow(_)), "{err:?}");
    let err = FlowDefinition::parse(deep(MAX_FLOW_DEPTH + 1).as_bytes()).unwrap_err();
    assert!(matches!(err, FlowError::TooDeep { .. }), "{err:?}");

    // Deep inside an otherwise valid flow; brackets inside strings do not count.
    let mut flow = sample("faq-echo.json");
    flow["description"] = json!("[".repeat(1000));
    assert!(parse_value(&flow).is_ok());
    let mut text = serde_json::to_string(&flow).unwrap();
    text = text.replacen(
        "\"viewport\":",
        &format!("\"extra\":{},\"viewport\":", deep(100)),
        1,
    );
    let err = FlowDefinition::parse(text.as_bytes()).unwrap_err();
    assert!(matches!(err, FlowError::TooDeep { .. }), "{err:?}");
}

#[test]
fn refuses_a_deep_value_without_recursing() {
    let mut value = json!([]);
    for _ in 0..10_000 {
        value = Value::Array(vec![value]);
    }
    let err = FlowDefinition::from_value(value).unwrap_err();
    assert_eq!(
        err,
        FlowError::TooDeep {
            limit: MAX_FLOW_DEPTH
        }
    );
}

#[test]
fn refuses_too_many_nodes() {
    let note = |i: usize| json!({"id": format!("note-{i}"), "type": "noteNode", "data": {}});

    let mut flow = sample("faq-echo.json");
    let present = nodes(&mut flow).len();
    nodes(&mut flow).extend((0..MAX_FLOW_NODES - present).map(note));
    assert_eq!(
        parse_value(&flow).unwrap().summary().node_count,
        MAX_FLOW_NODES
    );

    nodes(&mut flow).push(note(MAX_FLOW_NODES));
    let err = parse_value(&flow).unwrap_err();
    assert_eq!(
        err,
        FlowError::TooManyNodes {
            limit: MAX_FLOW_NODES
        }
    );
    assert_eq!(err.code(), "too_many_nodes");
    assert!(err.to_string().contains("500"), "{err}");
}

#[test]
fn refuses_a_node_without_id() {
    let mut flow = sample("support-assistant.json");
    nodes(&mut flow)[1].as_object_mut().unwrap().remove("id");
    let err = parse_value(&flow).unwrap_err();
    assert!(
        matches!(
            &err,
            FlowError::InvalidNode {
                index: 1,
                node_id: None,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.code(), "invalid_node");
    assert!(err.to_string().contains("data.nodes[1]"), "{err}");

    for id in [json!(""), json!(42), json!(null)] {
        nodes(&mut flow)[1]["id"] = id.clone();
        let err = parse_value(&flow).unwrap_err();
        assert!(
            matches!(
                &err,
                FlowError::InvalidNode {
                    index: 1,
                    node_id: None,
                    ..
                }
            ),
            "{id}: {err:?}"
        );
    }
}

#[test]
fn refuses_a_component_node_that_is_not_one() {
    type Mutation = fn(&mut Value);
    let broken: [(&str, Mutation); 4] = [
        ("data.type", |node| {
            node["data"].as_object_mut().unwrap().remove("type");
        }),
        ("data.node", |node| node["data"]["node"] = json!("Prompt")),
        ("data.node.template", |node| {
            node["data"]["node"]["template"] = json!([])
        }),
        ("`data`", |node| node["data"] = json!(null)),
    ];
    for (hint, mutate) in broken {
        let mut flow = sample("support-assistant.json");
        mutate(&mut nodes(&mut flow)[1]);
        let err = parse_value(&flow).unwrap_err();
        assert!(
            matches!(&err, FlowError::InvalidNode { index: 1, node_id: Some(id), .. } if id == "Prompt-sa2Rk"),
            "{hint}: {err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("Prompt-sa2Rk"), "{message}");
        assert!(message.contains(hint), "{message}");
    }

    let mut flow = sample("support-assistant.json");
    nodes(&mut flow)[2] = json!("ChatOutput");
    let err = parse_value(&flow).unwrap_err();
    assert!(
        matches!(
            &err,
            FlowError::InvalidNode {
                index: 2,
                node_id: None,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("data.nodes[2]"), "{err}");
}

#[test]
fn refuses_a_malformed_edge() {
    let mut flow = sample("support-assistant.json");
    let edge_id = edges(&mut flow)[0]["id"].as_str().unwrap().to_owned();
    edges(&mut flow)[0]
        .as_object_mut()
        .unwrap()
        .remove("target");
    let err = parse_value(&flow).unwrap_err();
    assert!(
        matches!(&err, FlowError::InvalidEdge { index: 0, edge_id: Some(id), .. } if *id == edge_id),
        "{err:?}"
    );
    assert_eq!(err.code(), "invalid_edge");
    let message = err.to_string();
    assert!(message.contains(&edge_id), "{message}");
    assert!(message.contains("target"), "{message}");

    let mut flow = sample("support-assistant.json");
    edges(&mut flow).push(json!(["ChatInput-sa1Qx", "ChatOutput-sa3Tm"]));
    let err = parse_value(&flow).unwrap_err();
    assert!(
        matches!(
            &err,
            FlowError::InvalidEdge {
                index: 2,
                edge_id: None,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("data.edges[2]"), "{err}");
}

#[test]
fn error_codes_are_distinct_snake_case() {
    let errors = [
        FlowError::TooLarge { limit: 1 },
        FlowError::TooDeep { limit: 1 },
        FlowError::InvalidJson(String::new()),
        FlowError::NotAFlow(String::new()),
        FlowError::TooManyNodes { limit: 1 },
        FlowError::InvalidNode {
            index: 0,
            node_id: None,
            reason: String::new(),
        },
        FlowError::DuplicateNode {
            node_id: String::new(),
        },
        FlowError::DanglingEdge {
            edge_id: None,
            node_id: String::new(),
            end: "source",
        },
        FlowError::InvalidEdge {
            index: 0,
            edge_id: None,
            reason: String::new(),
        },
        FlowError::NoChatInput,
        FlowError::NoChatOutput,
    ];
    let codes: BTreeSet<&str> = errors.iter().map(FlowError::code).collect();
    assert_eq!(codes.len(), errors.len());
    for code in codes {
        assert!(
            code.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
            "{code}"
        );
    }
}

/// Damaged exports (truncated, bytes flipped, bytes dropped) are refused or
/// accepted, never a panic.
#[test]
fn damaged_exports_never_panic() {
    for file in ["faq-echo.json", "doc-summarizer.json"] {
        let bytes = std::fs::read(project_flows_dir().join(file)).unwrap();
        for end in 0..bytes.len() {
            let _ = FlowDefinition::parse(&bytes[..end]);
        }
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        const NOISE: &[u8] = b"{}[]\",:\\0 ntfe-9\x00\xff";
        for _ in 0..2_000 {
            let mut damaged = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % damaged.len() as u64) as usize;
                if next() % 2 == 0 {
                    damaged[at] = NOISE[(next() % NOISE.len() as u64) as usize];
                } else {
                    damaged.remove(at);
                }
            }
            let _ = FlowDefinition::parse(&damaged);
        }
    }
}
