//! Langflow flow exports: what a seller uploads, checked once at the door.
//!
//! [`FlowDefinition`] is the only way an export enters Agora. Constructing one
//! guarantees that:
//!
//! - the export is at most [`MAX_FLOW_BYTES`] bytes and nested at most
//!   [`MAX_FLOW_DEPTH`] levels deep. [`FlowDefinition::parse`] checks both before
//!   any recursive parsing, so hostile input cannot exhaust the stack;
//! - it is a single-flow export: a JSON object whose `data.nodes` and
//!   `data.edges` are arrays, with at most [`MAX_FLOW_NODES`] nodes, and not a
//!   component export (`is_component: true`);
//! - every node has a non-empty string `id`, unique within the flow;
//! - every component node (any node but a `noteNode`, the canvas's sticky
//!   notes) names its component in `data.type` and carries its definition in
//!   `data.node`;
//! - every edge names a `source` and a `target`, and both are nodes of the flow;
//! - the flow has an input (ChatInput or TextInput) to receive the caller's
//!   message and an output (ChatOutput or TextOutput) to answer with.
//!
//! The export itself is kept exactly as given ([`FlowDefinition::as_json`]): it is
//! what is stored and what is provisioned to the runtime. Beside it sits a
//! [`FlowSummary`] read from it once: inputs and outputs, the fields a caller may
//! tweak, the secrets the flow expects, and the model providers it names.
//!
//! Every error names the node or edge at fault, by id or, when it has none, by
//! its position in `data.nodes` / `data.edges`, so a seller can fix the export.
//! No input makes this module panic.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest export accepted, in bytes (for [`FlowDefinition::from_value`]: of its
/// compact serialization).
pub const MAX_FLOW_BYTES: usize = 4 * 1024 * 1024;
/// Deepest JSON nesting accepted: the number of arrays and objects enclosing the
/// innermost value. Real exports stay below 16.
pub const MAX_FLOW_DEPTH: usize = 64;
/// Most entries accepted in `data.nodes`, notes included.
pub const MAX_FLOW_NODES: usize = 500;

/// Component types that receive the caller's message.
const INPUT_TYPES: [&str; 2] = ["ChatInput", "TextInput"];
/// Component types that carry the flow's answer.
const OUTPUT_TYPES: [&str; 2] = ["ChatOutput", "TextOutput"];

/// Template field types whose value is plain data a caller can sensibly replace.
/// Anything else (`code`, `file`, `model`, `other` handles, `tools`, and types a
/// newer Langflow may add) is not offered as a tweak.
const TWEAKABLE_TYPES: [&str; 12] = [
    "str",
    "prompt",
    "mustache",
    "int",
    "float",
    "slider",
    "bool",
    "tab",
    "dict",
    "NestedDict",
    "table",
    "query",
];

/// Provider-specific model components, and the provider each one calls.
const PROVIDER_COMPONENTS: [(&str, &str); 9] = [
    ("OpenAIModel", "OpenAI"),
    ("AzureOpenAIModel", "Azure OpenAI"),
    ("AnthropicModel", "Anthropic"),
    ("GoogleGenerativeAIModel", "Google Generative AI"),
    ("OllamaModel", "Ollama"),
    ("GroqModel", "Groq"),
    ("MistralModel", "Mistral"),
    ("AmazonBedrockModel", "Amazon Bedrock"),
    ("IBMwatsonxModel", "IBM WatsonX"),
];

/// A Langflow flow export that parsed and validated. The constructor is the only way in.
///
/// `Debug` shows the summary only: an export may carry credentials in its
/// password fields (Langflow can export "with API keys"), so the raw JSON is
/// never printed.
#[derive(Clone)]
pub struct FlowDefinition {
    json: Value,
    summary: FlowSummary,
}

impl fmt::Debug for FlowDefinition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowDefinition")
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl FlowDefinition {
    /// Parses an uploaded export.
    ///
    /// Checks run cheapest first: the byte size, then the nesting depth (a
    /// single pass over the bytes, no recursion), then JSON syntax, then the
    /// structure described in the module documentation. A UTF-8 byte order mark
    /// at the start is ignored.
    pub fn parse(bytes: &[u8]) -> Result<FlowDefinition, FlowError> {
        if bytes.len() > MAX_FLOW_BYTES {
            return Err(FlowError::TooLarge {
                limit: MAX_FLOW_BYTES,
            });
        }
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        if nesting_exceeds(bytes, MAX_FLOW_DEPTH) {
            return Err(FlowError::TooDeep {
                limit: MAX_FLOW_DEPTH,
            });
        }
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| FlowError::InvalidJson(e.to_string()))?;
        Self::build(value)
    }

    /// Validates an export that is already a JSON value.
    ///
    /// Applies the same limits as [`FlowDefinition::parse`]: the depth is
    /// measured without recursion, and the size is that of the value's compact
    /// serialization. A rejected value is taken apart iteratively, so even one
    /// nested far beyond the limit is dropped without deep recursion.
    pub fn from_value(value: serde_json::Value) -> Result<FlowDefinition, FlowError> {
        if value_depth_exceeds(&value, MAX_FLOW_DEPTH) {
            dismantle(value);
            return Err(FlowError::TooDeep {
                limit: MAX_FLOW_DEPTH,
            });
        }
        if serialized_size_exceeds(&value, MAX_FLOW_BYTES) {
            return Err(FlowError::TooLarge {
                limit: MAX_FLOW_BYTES,
            });
        }
        Self::build(value)
    }

    /// What the flow offers and expects, read from the export once.
    pub fn summary(&self) -> &FlowSummary {
        &self.summary
    }

    /// The export as given: what is stored and provisioned to the runtime.
    pub fn as_json(&self) -> &serde_json::Value {
        &self.json
    }

    /// The export as given, by value.
    pub fn into_json(self) -> serde_json::Value {
        self.json
    }

    /// Structure checks and summary, for a value already within the size and depth limits.
    fn build(json: Value) -> Result<FlowDefinition, FlowError> {
        let summary = summarize(&json)?;
        Ok(FlowDefinition { json, summary })
    }
}

/// What a flow offers and expects, as read from its export.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FlowSummary {
    /// The export's `name`; `None` when absent or blank.
    pub name: Option<String>,
    /// The export's `description`; `None` when absent or blank.
    pub description: Option<String>,
    /// The export's `endpoint_name`; `None` when absent or blank.
    pub endpoint_name: Option<String>,
    /// ChatInput / TextInput components, in node order.
    pub inputs: Vec<ComponentRef>,
    /// ChatOutput / TextOutput components, in node order.
    pub outputs: Vec<ComponentRef>,
    /// Fields a caller may set through the runtime's `tweaks`: shown, not
    /// advanced, not read-only, not a password, of a plain data type, and not fed
    /// by an edge. Also left out: an input component's `input_value` (the runtime
    /// refuses it as a tweak beside the request's own `input_value`) and the
    /// arguments of a component an agent uses as a tool (the agent fills them).
    /// In node order, then in the component's `field_order`.
    pub tweakable_fields: Vec<TweakableField>,
    /// Every template field marked `password: true`, shown or not: the
    /// credentials the flow expects to be supplied.
    pub secrets: Vec<SecretField>,
    /// Model providers the flow names, deduplicated and sorted. Read from
    /// provider-specific model components (`OpenAIModel`, `AnthropicModel`, ...),
    /// from `model` fields (the selected model's provider or, with nothing
    /// selected, the providers offered), and from the `provider` / `agent_llm`
    /// fields of model and agent components. Empty when the export names none.
    pub model_providers: Vec<String>,
    /// Entries in `data.nodes`, notes included.
    pub node_count: usize,
    /// Entries in `data.edges`.
    pub edge_count: usize,
}

/// A component node of the flow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ComponentRef {
    /// The node id, as used in edges and tweaks.
    pub id: String,
    /// The component type, from the node's `data.type` (e.g. `ChatInput`).
    pub component_type: String,
    /// The name shown on the canvas, when the export has one.
    pub display_name: Option<String>,
}

/// A template field a caller may tweak.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TweakableField {
    pub node_id: String,
    pub component_type: String,
    /// The template key, which is also the tweak's key.
    pub field: String,
    /// The template field's `type` (`str`, `prompt`, `int`, `bool`, ...).
    pub field_type: String,
    pub display_name: Option<String>,
    /// The field's value in the export (`null` when it has none).
    pub default: serde_json::Value,
}

/// A password field: a credential the flow expects. Its value is never copied here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SecretField {
    pub node_id: String,
    pub field: String,
    pub display_name: Option<String>,
}

/// Why an export was refused. Messages name the node or edge at fault.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum FlowError {
    #[error("the flow export is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the flow export is nested more than {limit} levels deep")]
    TooDeep { limit: usize },
    #[error("the flow export is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("not a Langflow flow export: {0}")]
    NotAFlow(String),
    #[error("the flow has more than {limit} nodes")]
    TooManyNodes { limit: usize },
    #[error("invalid node {}: {reason}", node_label(.index, .node_id))]
    InvalidNode {
        index: usize,
        node_id: Option<String>,
        reason: String,
    },
    #[error("node id {node_id:?} is used by more than one node")]
    DuplicateNode { node_id: String },
    #[error(
        "{} has {end} {node_id:?}, which is not a node of this flow",
        dangling_edge_label(.edge_id)
    )]
    DanglingEdge {
        edge_id: Option<String>,
        node_id: String,
        /// `"source"` or `"target"`.
        end: &'static str,
    },
    #[error("invalid edge {}: {reason}", edge_label(.index, .edge_id))]
    InvalidEdge {
        index: usize,
        edge_id: Option<String>,
        reason: String,
    },
    #[error("the flow has no ChatInput or TextInput component to receive the caller's message")]
    NoChatInput,
    #[error("the flow has no ChatOutput or TextOutput component to answer with")]
    NoChatOutput,
}

impl FlowError {
    /// Stable snake_case code for the error body.
    pub fn code(&self) -> &'static str {
        match self {
            FlowError::TooLarge { .. } => "flow_too_large",
            FlowError::TooDeep { .. } => "flow_too_deep",
            FlowError::InvalidJson(_) => "invalid_json",
            FlowError::NotAFlow(_) => "not_a_flow",
            FlowError::TooManyNodes { .. } => "too_many_nodes",
            FlowError::InvalidNode { .. } => "invalid_node",
            FlowError::DuplicateNode { .. } => "duplicate_node",
            FlowError::DanglingEdge { .. } => "dangling_edge",
            FlowError::InvalidEdge { .. } => "invalid_edge",
            FlowError::NoChatInput => "no_chat_input",
            FlowError::NoChatOutput => "no_chat_output",
        }
    }
}

fn node_label(index: &usize, node_id: &Option<String>) -> String {
    match node_id {
        Some(id) => format!("{id:?} (data.nodes[{index}])"),
        None => format!("data.nodes[{index}]"),
    }
}

fn edge_label(index: &usize, edge_id: &Option<String>) -> String {
    match edge_id {
        Some(id) => format!("{id:?} (data.edges[{index}])"),
        None => format!("data.edges[{index}]"),
    }
}

fn dangling_edge_label(edge_id: &Option<String>) -> String {
    match edge_id {
        Some(id) => format!("edge {id:?}"),
        None => "an edge without an id".to_owned(),
    }
}

// ---------------------------------------------------------------------------
// Size and depth guards: none of these recurse.

/// Whether the JSON text nests arrays and objects more than `limit` deep.
///
/// Tracks strings (and escapes within them) so brackets inside strings do not
/// count. On malformed input the count may be off, but only past the first
/// syntax error, where the JSON parser stops anyway.
fn nesting_exceeds(bytes: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Whether the value nests arrays and objects more than `limit` deep, measured
/// the same way as [`nesting_exceeds`].
fn value_depth_exceeds(value: &Value, limit: usize) -> bool {
    let mut stack: Vec<(&Value, usize)> = vec![(value, 1)];
    while let Some((value, depth)) = stack.pop() {
        match value {
            Value::Array(items) => {
                if depth > limit {
                    return true;
                }
                stack.extend(items.iter().map(|item| (item, depth + 1)));
            }
            Value::Object(map) => {
                if depth > limit {
                    return true;
                }
                stack.extend(map.values().map(|item| (item, depth + 1)));
            }
            _ => {}
        }
    }
    false
}

/// Drops a value without the recursion of its `Drop`, whatever its depth.
fn dismantle(value: Value) {
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        match value {
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.into_iter().map(|(_, item)| item)),
            _ => {}
        }
    }
}

/// Whether the compact serialization of `value` exceeds `limit` bytes. Stops
/// serializing as soon as it does. Only call on values within the depth limit.
fn serialized_size_exceeds(value: &Value, limit: usize) -> bool {
    struct Budget {
        left: usize,
    }
    impl io::Write for Budget {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            match self.left.checked_sub(buf.len()) {
                Some(left) => {
                    self.left = left;
                    Ok(buf.len())
                }
                None => Err(io::Error::other("over budget")),
            }
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    serde_json::to_writer(&mut Budget { left: limit }, value).is_err()
}

// ---------------------------------------------------------------------------
// Structure.

/// A component node (not a note), as found in the export.
struct Component<'a> {
    id: &'a str,
    component_type: &'a str,
    display_name: Option<String>,
    /// `data.node`: the component's definition.
    definition: &'a Map<String, Value>,
    /// `data.node.template`, when present.
    template: Option<&'a Map<String, Value>>,
}

impl Component<'_> {
    fn to_ref(&self) -> ComponentRef {
        ComponentRef {
            id: self.id.to_owned(),
            component_type: self.component_type.to_owned(),
            display_name: self.display_name.clone(),
        }
    }

    fn is_input(&self) -> bool {
        INPUT_TYPES.contains(&self.component_type)
    }

    fn is_output(&self) -> bool {
        OUTPUT_TYPES.contains(&self.component_type)
    }

    /// Whether an agent uses this component as a tool, filling its
    /// `tool_mode` fields itself.
    fn is_tool(&self) -> bool {
        flag(self.definition, "tool_mode")
    }

    /// Template fields (objects only, `_`-prefixed keys skipped): those listed in
    /// `field_order` first, in that order, then the rest.
    fn fields(&self) -> Vec<(&str, &Map<String, Value>)> {
        let Some(template) = self.template else {
            return Vec::new();
        };
        let mut fields = Vec::with_capacity(template.len());
        let mut seen = HashSet::new();
        let ordered = self
            .definition
            .get("field_order")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str);
        let keys = ordered.chain(template.keys().map(String::as_str));
        for key in keys {
            if key.starts_with('_') || !seen.insert(key) {
                continue;
            }
            if let Some((key, Value::Object(field))) = template.get_key_value(key) {
                fields.push((key.as_str(), field));
            }
        }
        fields
    }
}

fn summarize(json: &Value) -> Result<FlowSummary, FlowError> {
    let root = match json {
        Value::Object(root) => root,
        other => {
            return Err(FlowError::NotAFlow(format!(
                "expected a JSON object with `data.nodes` and `data.edges`, found {}",
                kind(other)
            )))
        }
    };
    if root.get("is_component") == Some(&Value::Bool(true)) {
        return Err(FlowError::NotAFlow(
            "this is a component export (`is_component: true`); export the whole flow".to_owned(),
        ));
    }
    let data = flow_data(root)?;
    let nodes = required_array(data, "nodes")?;
    let edges = required_array(data, "edges")?;
    let name = optional_text(root, "name")?;
    let description = optional_text(root, "description")?;
    let endpoint_name = optional_text(root, "endpoint_name")?;

    if nodes.len() > MAX_FLOW_NODES {
        return Err(FlowError::TooManyNodes {
            limit: MAX_FLOW_NODES,
        });
    }

    let mut node_ids: HashSet<&str> = HashSet::with_capacity(nodes.len());
    let mut components = Vec::with_capacity(nodes.len());
    for (index, node) in nodes.iter().enumerate() {
        if let Some(component) = read_node(index, node, &mut node_ids)? {
            components.push(component);
        }
    }

    // Fields whose value arrives over an edge, by target node id.
    let mut fed: HashMap<&str, HashSet<String>> = HashMap::new();
    for (index, edge) in edges.iter().enumerate() {
        let (target, field) = read_edge(index, edge, &node_ids)?;
        if let Some(field) = field {
            fed.entry(target).or_default().insert(field);
        }
    }

    let inputs: Vec<ComponentRef> = components
        .iter()
        .filter(|c| c.is_input())
        .map(Component::to_ref)
        .collect();
    if inputs.is_empty() {
        return Err(FlowError::NoChatInput);
    }
    let outputs: Vec<ComponentRef> = components
        .iter()
        .filter(|c| c.is_output())
        .map(Component::to_ref)
        .collect();
    if outputs.is_empty() {
        return Err(FlowError::NoChatOutput);
    }

    let no_fed_fields = HashSet::new();
    let mut tweakable_fields = Vec::new();
    let mut secrets = Vec::new();
    let mut model_providers = BTreeSet::new();
    for component in &components {
        let fed_here = fed.get(component.id).unwrap_or(&no_fed_fields);
        for (key, field) in component.fields() {
            if flag(field, "password") {
                secrets.push(SecretField {
                    node_id: component.id.to_owned(),
                    field: key.to_owned(),
                    display_name: text(field.get("display_name")),
                });
            } else if let Some(tweak) = tweakable(component, key, field, fed_here) {
                tweakable_fields.push(tweak);
            }
        }
        providers_of(component, fed_here, &mut model_providers);
    }

    Ok(FlowSummary {
        name,
        description,
        endpoint_name,
        inputs,
        outputs,
        tweakable_fields,
        secrets,
        model_providers: model_providers.into_iter().collect(),
        node_count: nodes.len(),
        edge_count: edges.len(),
    })
}

/// The export's `data` object, or a message saying what shape was expected.
fn flow_data(root: &Map<String, Value>) -> Result<&Map<String, Value>, FlowError> {
    const SHAPE: &str = "{\"name\": ..., \"data\": {\"nodes\": [...], \"edges\": [...]}}";
    match root.get("data") {
        Some(Value::Object(data)) => Ok(data),
        Some(other) => Err(FlowError::NotAFlow(format!(
            "`data` must be an object holding `nodes` and `edges`, found {}",
            kind(other)
        ))),
        None if root.contains_key("flows") => Err(FlowError::NotAFlow(format!(
            "this holds several flows (`flows: [...]`); upload a single flow export, shaped {SHAPE}"
        ))),
        None if root.contains_key("nodes") || root.contains_key("edges") => {
            Err(FlowError::NotAFlow(format!(
                "`nodes` and `edges` must sit under `data`; expected a flow export shaped {SHAPE}"
            )))
        }
        None => Err(FlowError::NotAFlow(format!(
            "missing `data`; expected a flow export shaped {SHAPE}"
        ))),
    }
}

fn required_array<'a>(data: &'a Map<String, Value>, key: &str) -> Result<&'a [Value], FlowError> {
    match data.get(key) {
        Some(Value::Array(items)) => Ok(items),
        Some(other) => Err(FlowError::NotAFlow(format!(
            "`data.{key}` must be an array, found {}; a flow export has `data.nodes` and `data.edges` arrays",
            kind(other)
        ))),
        None => Err(FlowError::NotAFlow(format!(
            "missing `data.{key}`: a flow export has `data.nodes` and `data.edges` arrays"
        ))),
    }
}

/// A top-level text property: absent, null or blank is `None`; another type is an error.
fn optional_text(root: &Map<String, Value>, key: &str) -> Result<Option<String>, FlowError> {
    match root.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(non_blank(s)),
        Some(other) => Err(FlowError::NotAFlow(format!(
            "`{key}` must be a string, found {}",
            kind(other)
        ))),
    }
}

/// Checks one entry of `data.nodes`, records its id, and returns it when it is
/// a component (notes need only an id; they are then set aside).
fn read_node<'a>(
    index: usize,
    node: &'a Value,
    node_ids: &mut HashSet<&'a str>,
) -> Result<Option<Component<'a>>, FlowError> {
    let invalid = |node_id: Option<&str>, reason: String| FlowError::InvalidNode {
        index,
        node_id: node_id.map(str::to_owned),
        reason,
    };
    let Value::Object(node) = node else {
        return Err(invalid(
            None,
            format!("a node must be an object, found {}", kind(node)),
        ));
    };
    let id = match node.get("id") {
        Some(Value::String(id)) if !id.trim().is_empty() => id.as_str(),
        Some(Value::String(_)) => return Err(invalid(None, "its `id` is blank".to_owned())),
        Some(other) => {
            return Err(invalid(
                None,
                format!("`id` must be a string, found {}", kind(other)),
            ))
        }
        None => return Err(invalid(None, "it has no `id`".to_owned())),
    };
    if !node_ids.insert(id) {
        return Err(FlowError::DuplicateNode {
            node_id: id.to_owned(),
        });
    }
    let node_type = match node.get("type") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t.as_str()),
        Some(other) => {
            return Err(invalid(
                Some(id),
                format!("`type` must be a string, found {}", kind(other)),
            ))
        }
    };
    if node_type == Some("noteNode") {
        return Ok(None);
    }
    let data = match node.get("data") {
        Some(Value::Object(data)) => data,
        Some(other) => {
            return Err(invalid(
                Some(id),
                format!("`data` must be an object, found {}", kind(other)),
            ))
        }
        None => return Err(invalid(Some(id), "it has no `data`".to_owned())),
    };
    if data.get("type").and_then(Value::as_str) == Some("note") {
        return Ok(None);
    }
    let component_type = match data.get("type") {
        Some(Value::String(t)) if !t.trim().is_empty() => t.as_str(),
        _ => {
            return Err(invalid(
                Some(id),
                "it names no component type (`data.type`)".to_owned(),
            ))
        }
    };
    let definition = match data.get("node") {
        Some(Value::Object(definition)) => definition,
        _ => {
            return Err(invalid(
                Some(id),
                "it has no component definition (`data.node` object)".to_owned(),
            ))
        }
    };
    let template = match definition.get("template") {
        None | Some(Value::Null) => None,
        Some(Value::Object(template)) => Some(template),
        Some(other) => {
            return Err(invalid(
                Some(id),
                format!(
                    "`data.node.template` must be an object, found {}",
                    kind(other)
                ),
            ))
        }
    };
    let display_name =
        text(data.get("display_name")).or_else(|| text(definition.get("display_name")));
    Ok(Some(Component {
        id,
        component_type,
        display_name,
        definition,
        template,
    }))
}

/// Checks one entry of `data.edges`; returns its target node id and, when the
/// export says, the target field it feeds.
fn read_edge<'a>(
    index: usize,
    edge: &'a Value,
    node_ids: &HashSet<&str>,
) -> Result<(&'a str, Option<String>), FlowError> {
    let Value::Object(edge) = edge else {
        return Err(FlowError::InvalidEdge {
            index,
            edge_id: None,
            reason: format!("an edge must be an object, found {}", kind(edge)),
        });
    };
    let edge_id = match edge.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id.as_str()),
        Some(other) => {
            return Err(FlowError::InvalidEdge {
                index,
                edge_id: None,
                reason: format!("`id` must be a string, found {}", kind(other)),
            })
        }
    };
    let end = |name: &'static str| -> Result<&'a str, FlowError> {
        let node_id = match edge.get(name) {
            Some(Value::String(node_id)) if !node_id.is_empty() => node_id.as_str(),
            _ => {
                return Err(FlowError::InvalidEdge {
                    index,
                    edge_id: edge_id.map(str::to_owned),
                    reason: format!("it has no `{name}` node id"),
                })
            }
        };
        if node_ids.contains(node_id) {
            Ok(node_id)
        } else {
            Err(FlowError::DanglingEdge {
                edge_id: edge_id.map(str::to_owned),
                node_id: node_id.to_owned(),
                end: name,
            })
        }
    };
    end("source")?;
    let target = end("target")?;
    Ok((target, target_field(edge)))
}

/// The template field an edge feeds: `data.targetHandle.fieldName`, or the same
/// key inside the `targetHandle` string (JSON with `œ` in place of quotes).
fn target_field(edge: &Map<String, Value>) -> Option<String> {
    let from_data = edge
        .get("data")
        .and_then(|data| data.get("targetHandle"))
        .and_then(|handle| handle.get("fieldName"))
        .and_then(Value::as_str);
    if let Some(field) = from_data {
        return Some(field.to_owned());
    }
    let handle = match edge.get("targetHandle")? {
        Value::String(encoded) => serde_json::from_str(&encoded.replace('œ', "\"")).ok()?,
        handle @ Value::Object(_) => handle.clone(),
        _ => return None,
    };
    handle.get("fieldName")?.as_str().map(str::to_owned)
}

/// The tweak a caller may make to this (non-password) field, if any.
fn tweakable(
    component: &Component<'_>,
    key: &str,
    field: &Map<String, Value>,
    fed: &HashSet<String>,
) -> Option<TweakableField> {
    let field_type = field.get("type")?.as_str()?;
    let shown = field.get("show").and_then(Value::as_bool).unwrap_or(true);
    if !shown
        || flag(field, "advanced")
        || flag(field, "readonly")
        || key == "code"
        || !TWEAKABLE_TYPES.contains(&field_type)
        || fed.contains(key)
        || (component.is_input() && key == "input_value")
        || (component.is_tool() && flag(field, "tool_mode"))
    {
        return None;
    }
    Some(TweakableField {
        node_id: component.id.to_owned(),
        component_type: component.component_type.to_owned(),
        field: key.to_owned(),
        field_type: field_type.to_owned(),
        display_name: text(field.get("display_name")),
        default: field.get("value").cloned().unwrap_or(Value::Null),
    })
}

/// Adds the model providers this component names.
fn providers_of(component: &Component<'_>, fed: &HashSet<String>, out: &mut BTreeSet<String>) {
    let known = PROVIDER_COMPONENTS
        .iter()
        .find(|(component_type, _)| *component_type == component.component_type);
    if let Some((_, provider)) = known {
        out.insert((*provider).to_owned());
    }
    let fields = component.fields();
    let has_model_field = fields
        .iter()
        .any(|(_, field)| field.get("type").and_then(Value::as_str) == Some("model"));
    let is_model_component = known.is_some()
        || has_model_field
        || component.component_type == "Agent"
        || component.component_type == "LanguageModelComponent"
        || component.component_type.ends_with("Model");
    if !is_model_component {
        return;
    }
    for (key, field) in fields {
        // A field fed by an edge takes its model from the connected component,
        // which names its own provider.
        if fed.contains(key) {
            continue;
        }
        if field.get("type").and_then(Value::as_str) == Some("model") {
            let mut selected = BTreeSet::new();
            if let Some(value) = field.get("value") {
                providers_in(value, &mut selected);
            }
            if selected.is_empty() {
                if let Some(options) = field.get("options") {
                    providers_in(options, &mut selected);
                }
            }
            out.append(&mut selected);
        } else if key == "provider" || key == "agent_llm" {
            if let Some(provider) = text(field.get("value")) {
                // `agent_llm: "Custom"` means a model component is connected instead.
                if provider != "Custom" {
                    out.insert(provider);
                }
            }
        }
    }
}

/// Provider names in a `model` field's value or options: an object with a
/// `provider` string, or an array of such objects.
fn providers_in(value: &Value, out: &mut BTreeSet<String>) {
    let entries = match value {
        Value::Array(items) => items.as_slice(),
        single @ Value::Object(_) => std::slice::from_ref(single),
        _ => return,
    };
    for entry in entries {
        if let Some(provider) = text(entry.get("provider")) {
            out.insert(provider);
        }
    }
}

/// A field's boolean attribute; absent or non-boolean is `false`.
fn flag(field: &Map<String, Value>, key: &str) -> bool {
    field.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// A non-blank string, trimmed.
fn text(value: Option<&Value>) -> Option<String> {
    non_blank(value?.as_str()?)
}

fn non_blank(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nesting_scan_counts_containers_not_brackets_in_strings() {
        assert!(!nesting_exceeds(br#"[[["]]]]]]"]]]"#, 3));
        assert!(nesting_exceeds(br#"[[[["]"]]]]"#, 3));
        assert!(!nesting_exceeds(br#"{"a\"[[[[": [1, {"b": []}]}"#, 4));
        assert!(nesting_exceeds(br#"{"a\\": [[[1]]]}"#, 3));
        assert!(!nesting_exceeds(b"", 0));
        assert!(nesting_exceeds(b"{}", 0));
    }

    #[test]
    fn value_depth_matches_the_byte_scan() {
        for text in ["1", "[]", r#"{"a": [1, {"b": [[]]}]}"#, "[[[[[[[[]]]]]]]]"] {
            let value: Value = serde_json::from_str(text).unwrap();
            for limit in 0..10 {
                assert_eq!(
                    value_depth_exceeds(&value, limit),
                    nesting_exceeds(text.as_bytes(), limit),
                    "{text} at limit {limit}"
                );
            }
        }
    }

    #[test]
    fn dismantle_takes_apart_very_deep_values() {
        let mut value = json!(null);
        for _ in 0..200_000 {
            value = Value::Array(vec![value]);
        }
        dismantle(value);
    }

    #[test]
    fn serialized_size_is_bounded() {
        let value = json!({"a": "0123456789"});
        let len = serde_json::to_vec(&value).unwrap().len();
        assert!(!serialized_size_exceeds(&value, len));
        assert!(serialized_size_exceeds(&value, len - 1));
    }

    #[test]
    fn target_field_reads_the_data_object_or_the_encoded_handle() {
        let edge = json!({"data": {"targetHandle": {"fieldName": "question"}}});
        assert_eq!(
            target_field(edge.as_object().unwrap()).as_deref(),
            Some("question")
        );
        let edge = json!({
            "targetHandle": "{œfieldNameœ: œinput_valueœ, œidœ: œChatOutput-1œ, œtypeœ: œstrœ}"
        });
        assert_eq!(
            target_field(edge.as_object().unwrap()).as_deref(),
            Some("input_value")
        );
        let edge = json!({"targetHandle": "{œfieldNameœ: "});
        assert_eq!(target_field(edge.as_object().unwrap()), None);
    }

    #[test]
    fn providers_come_from_selection_before_options() {
        let mut out = BTreeSet::new();
        providers_in(
            &json!([{"name": "m", "provider": "Anthropic"}, {"provider": " "}, 3]),
            &mut out,
        );
        providers_in(&json!({"provider": "OpenAI"}), &mut out);
        providers_in(&json!("gpt-4o"), &mut out);
        assert_eq!(
            out.into_iter().collect::<Vec<_>>(),
            vec!["Anthropic".to_owned(), "OpenAI".to_owned()]
        );
    }

    #[test]
    fn debug_does_not_print_the_export() {
        let flow = json!({
            "data": {
                "nodes": [
                    {"id": "in", "data": {"type": "ChatInput", "node": {"template": {}}}},
                    {"id": "out", "data": {"type": "ChatOutput", "node": {"template": {
                        "api_key": {"type": "str", "password": true, "value": "sk-live-123"}
                    }}}}
                ],
                "edges": []
            }
        });
        let flow = FlowDefinition::from_value(flow).unwrap();
        let printed = format!("{flow:?}");
        assert!(!printed.contains("sk-live-123"), "{printed}");
        assert!(printed.contains("api_key"), "{printed}");
    }
}
