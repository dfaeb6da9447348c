//! The demo runtime against the wire captures of a real Langflow 1.13 server,
//! over real sockets, with a raw HTTP/1.1 client.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_runtime::{DemoRuntime, RunStats, RuntimeConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "sk-demo-runtime-test-key";
const CAPTURED_KEYS: &[&str] = &[
    "sk-qnArjdqT9CtjUVoBolpjiU5aXvlDY4-nMc3UUfXE_U8",
    "sk-fixed-env-key-for-proxy-tests",
];
const CAPTURED_ECHO_ID: &str = "fbd11246-fd67-45dc-9163-3e5ed2c09b03";

// ---------------------------------------------------------------- server

struct Server {
    addr: SocketAddr,
    stats: Arc<RunStats>,
}

async fn start(token_delay: Duration) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut config = RuntimeConfig::new(KEY);
    config.token_delay = token_delay;
    let runtime = DemoRuntime::new(config);
    let stats = runtime.stats();
    tokio::spawn(runtime.serve(listener));
    Server { addr, stats }
}

// ---------------------------------------------------------------- raw HTTP

#[derive(Debug, Default)]
struct Parsed {
    complete: bool,
    status_line: String,
    headers: Vec<(String, String)>,
    /// Body after de-chunking and gunzip.
    body: Vec<u8>,
    /// Chunk payloads in order when chunked (the terminal one included as empty).
    chunks: Option<Vec<Vec<u8>>>,
}

impl Parsed {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    fn events(&self) -> Vec<Value> {
        self.chunks
            .iter()
            .flatten()
            .filter(|c| !c.is_empty())
            .map(|c| serde_json::from_slice(c).expect("event JSON"))
            .collect()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses as much of an HTTP/1.1 response as `raw` holds.
fn parse_response(raw: &[u8]) -> Parsed {
    let mut parsed = Parsed::default();
    let Some(head_end) = find(raw, b"\r\n\r\n") else {
        return parsed;
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    parsed.status_line = lines.next().unwrap_or("").to_owned();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            parsed
                .headers
                .push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let mut rest = &raw[head_end + 4..];
    let mut body = Vec::new();
    if parsed.header("transfer-encoding") == Some("chunked") {
        let mut chunks = Vec::new();
        while let Some(line_end) = find(rest, b"\r\n") {
            let size_text = String::from_utf8_lossy(&rest[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .expect("chunk size");
            if rest.len() < line_end + 2 + size + 2 {
                break;
            }
            let data = &rest[line_end + 2..line_end + 2 + size];
            assert_eq!(
                &rest[line_end + 2 + size..line_end + 4 + size],
                b"\r\n",
                "chunk not CRLF-terminated"
            );
            chunks.push(data.to_vec());
            body.extend_from_slice(data);
            rest = &rest[line_end + 4 + size..];
            if size == 0 {
                parsed.complete = true;
                break;
            }
        }
        parsed.chunks = Some(chunks);
    } else if let Some(len) = parsed.header("content-length") {
        let len: usize = len.parse().expect("content-length");
        if rest.len() >= len {
            body.extend_from_slice(&rest[..len]);
            parsed.complete = true;
        }
    } else {
        parsed.complete = true;
    }
    if parsed.complete && parsed.header("content-encoding") == Some("gzip") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .expect("gunzip");
        body = out;
    }
    parsed.body = body;
    parsed
}

/// Sends raw request bytes; reads until the response is complete.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Parsed {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let parsed = parse_response(&raw);
        if parsed.complete {
            return parsed;
        }
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
            .await
            .expect("response within 30 s")
            .expect("read");
        if n == 0 {
            return parse_response(&raw);
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

fn build_request(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

async fn post_json(addr: SocketAddr, target: &str, extra: &[(&str, &str)], body: &Value) -> Parsed {
    let mut headers = vec![("x-api-key", KEY), ("Content-Type", "application/json")];
    headers.extend_from_slice(extra);
    let body = serde_json::to_vec(body).expect("json");
    exchange(addr, &build_request("POST", target, &headers, &body)).await
}

async fn get(addr: SocketAddr, target: &str) -> Parsed {
    exchange(
        addr,
        &build_request("GET", target, &[("x-api-key", KEY)], b""),
    )
    .await
}

// ---------------------------------------------------------------- shape checks

/// Same nested keys and value types; `null` on either side matches any type
/// (Langflow's optional fields), values themselves are not compared.
fn same_shape(path: &str, expected: &Value, actual: &Value, errors: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Null, _) | (_, Value::Null) => {}
        (Value::Object(e), Value::Object(a)) => {
            for k in e.keys().filter(|k| !a.contains_key(*k)) {
                errors.push(format!("{path}: missing key {k}"));
            }
            for k in a.keys().filter(|k| !e.contains_key(*k)) {
                errors.push(format!("{path}: extra key {k}"));
            }
            for (k, ev) in e {
                if let Some(av) = a.get(k) {
                    same_shape(&format!("{path}.{k}"), ev, av, errors);
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                errors.push(format!(
                    "{path}: array of {} items, expected {}",
                    a.len(),
                    e.len()
                ));
            }
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                same_shape(&format!("{path}[{i}]"), ev, av, errors);
            }
        }
        (Value::String(_), Value::String(_))
        | (Value::Bool(_), Value::Bool(_))
        | (Value::Number(_), Value::Number(_)) => {}
        _ => errors.push(format!(
            "{path}: type differs: expected {expected}, got {actual}"
        )),
    }
}

fn assert_same_shape(what: &str, expected: &Value, actual: &Value) {
    let mut errors = Vec::new();
    same_shape("$", expected, actual, &mut errors);
    assert!(
        errors.is_empty(),
        "{what}: shape differs:\n{}",
        errors.join("\n")
    );
}

/// Checks a chunk is `json.dumps` output (`", "` / `": "` separators, nothing
/// else outside strings, ASCII only) followed by exactly one blank line.
fn assert_python_event_chunk(what: &str, chunk: &[u8]) {
    assert!(
        chunk.ends_with(b"}\n\n"),
        "{what}: chunk does not end with }}\\n\\n"
    );
    let text = &chunk[..chunk.len() - 2];
    assert!(
        text.starts_with(b"{\"event\": \""),
        "{what}: chunk does not start with {{\"event\": "
    );
    assert!(text.is_ascii(), "{what}: non-ASCII bytes in an event");
    let mut in_string = false;
    let mut escaped = false;
    for (i, &b) in text.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                (false, c) => assert!(c >= 0x20, "{what}: raw control byte in a string"),
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b':' | b',' => assert_eq!(
                text.get(i + 1),
                Some(&b' '),
                "{what}: `{}` not followed by a space at {i}",
                b as char
            ),
            b' ' => assert!(
                matches!(text[i - 1], b':' | b','),
                "{what}: stray space at {i}"
            ),
            b'\n' | b'\r' | b'\t' => panic!("{what}: whitespace outside strings at {i}"),
            _ => {}
        }
    }
    serde_json::from_slice::<Value>(text).unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
}

fn event_names(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("?").to_owned())
        .collect()
}

// ---------------------------------------------------------------- capture replay

fn fixtures_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("LANGFLOW_WIRE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/shared/fixtures/langflow-wire"));
    if dir.join("raw").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "shared captures not found at {}; Langflow wire cases not run",
            dir.display()
        );
        None
    }
}

struct Capture {
    name: String,
    request: Vec<u8>,
    response: Parsed,
}

fn load(dir: &Path, name: &str) -> Capture {
    let read = |ext: &str| {
        std::fs::read(dir.join(format!("{name}.{ext}")))
            .unwrap_or_else(|e| panic!("{name}.{ext}: {e}"))
    };
    Capture {
        name: name.to_owned(),
        request: read("c2s.bin"),
        response: parse_response(&read("s2c.bin")),
    }
}

/// The captured request with the runtime's key and flow id put in its head.
fn rewrite(request: &[u8], echo_id: &str) -> Vec<u8> {
    let split = find(request, b"\r\n\r\n").map_or(request.len(), |i| i + 4);
    let mut head = String::from_utf8_lossy(&request[..split]).into_owned();
    for key in CAPTURED_KEYS {
        head = head.replace(key, KEY);
    }
    head = head.replace(CAPTURED_ECHO_ID, echo_id);
    let mut out = head.into_bytes();
    out.extend_from_slice(&request[split..]);
    out
}

fn compare(capture: &Capture, actual: &Parsed, echo_id: &str) {
    let name = &capture.name;
    let expected = &capture.response;
    assert_eq!(
        actual.status_line, expected.status_line,
        "{name}: status line"
    );
    assert_eq!(
        actual.header("content-length").is_some(),
        expected.header("content-length").is_some(),
        "{name}: content-length presence"
    );
    for h in [
        "transfer-encoding",
        "content-encoding",
        "content-type",
        "allow",
    ] {
        assert_eq!(actual.header(h), expected.header(h), "{name}: header {h}");
    }
    if let Some(expected_chunks) = &expected.chunks {
        let chunks = actual.chunks.as_ref().expect("chunked body");
        for (i, chunk) in chunks.iter().enumerate().filter(|(_, c)| !c.is_empty()) {
            assert_python_event_chunk(&format!("{name} chunk {i}"), chunk);
        }
        if expected.complete {
            assert_eq!(
                chunks.last().map(Vec::len),
                Some(0),
                "{name}: terminal chunk"
            );
        }
        // The captured chunks pass the same framing check.
        for (i, chunk) in expected_chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.is_empty())
        {
            assert_python_event_chunk(&format!("{name} captured chunk {i}"), chunk);
        }
        let (want, got) = (expected.events(), actual.events());
        assert_eq!(
            event_names(&got),
            event_names(&want),
            "{name}: event sequence"
        );
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_same_shape(&format!("{name} event {i}"), w, g);
        }
        if let Some(error) = want.last().and_then(|e| e["data"]["error"].as_str()) {
            if !error.starts_with("500: ") {
                assert_eq!(
                    got.last().map(|e| &e["data"]["error"]),
                    Some(&json!(error)),
                    "{name}: error text"
                );
            }
        }
        return;
    }
    let (want, got) = (expected.json(), actual.json());
    assert_same_shape(name, &want, &got);
    let status = expected.status_line.split(' ').nth(1).unwrap_or("");
    match status {
        "500" => {
            let inner = |v: &Value| -> Value {
                serde_json::from_str(v["detail"].as_str().expect("detail string"))
                    .expect("detail is JSON")
            };
            assert_same_shape(&format!("{name} detail"), &inner(&want), &inner(&got));
        }
        s if s.starts_with('4') => {
            let want = serde_json::to_string(&want)
                .unwrap_or_default()
                .replace(CAPTURED_ECHO_ID, echo_id);
            assert_eq!(
                serde_json::to_string(&got).unwrap_or_default(),
                want,
                "{name}: error body"
            );
        }
        _ => {}
    }
}

/// Every captured case the runtime implements.
const CASES: &[&str] = &[
    "raw/001_health",
    "raw/004_a_run_nonstream",
    "raw/005_b_run_stream",
    "raw/006_c_run_tweak",
    "raw/007_c2_run_tweak_input",
    "raw/008_c3_tweak_conflict",
    "raw/009_c4_tweak_refused",
    "raw/010_d1_missing_api_key",
    "raw/011_d2_invalid_api_key",
    "raw/012_d3_unknown_flow_uuid",
    "raw/013_d4_unknown_flow_name",
    "raw/014_d5_malformed_json",
    "raw/015_d6_unknown_flow_stream",
    "raw/016_d7_missing_key_stream",
    "raw/017_e1_query_param_key",
    "raw/018_e2_by_endpoint_name",
    "raw/019_e3_bearer_apikey",
    "raw/020_e4_bearer_jwt",
    "raw/021_e5_invalid_input_type",
    "raw/022_e6_empty_body",
    "raw/023_e7_embedded_body",
    "raw/024_e8_get_method",
    "raw/025_e9_bad_output_component",
    "raw/026_e10_bad_output_component_stream",
    "raw/027_f1_fake_llm_stream",
    "raw/028_f2_fake_llm_nonstream",
    "raw/029_f3_fake_llm_debug",
    "raw/030_g1_flow_error_nonstream",
    "raw/031_g2_flow_error_stream",
    "raw/032_h1_gzip_nonstream",
    "raw/033_h2_gzip_stream",
    "raw/034_i1_multipart_form",
    "raw/035_i2_stream_1",
    "raw/038_k2_env_api_key",
    "raw/039_k3_db_api_key_autologin",
    "raw/040_k4_wrong_key_autologin",
    "raw2/001_l1_tweak_conflict_stream",
    "raw2/002_l2_tweak_refused_stream",
];

/// Replays 002 (creating the echo flow) and posts the other captured flows.
async fn seed_flows(dir: &Path, server: &Server) -> String {
    let create = load(dir, "raw/002_flow_create");
    let created = exchange(server.addr, &rewrite(&create.request, "")).await;
    compare(&create, &created, "");
    let echo_id = created.json()["id"].as_str().expect("flow id").to_owned();
    for file in ["fake-stream_flow.json", "raise-error_flow.json"] {
        let flow: Value = serde_json::from_slice(
            &std::fs::read(dir.join("flows").join(file)).expect("flow file"),
        )
        .expect("flow JSON");
        let response = post_json(server.addr, "/api/v1/flows/", &[], &flow).await;
        assert_eq!(response.status_line, "HTTP/1.1 201 Created", "{file}");
    }
    echo_id
}

#[tokio::test]
async fn langflow_wire_cases() {
    let Some(dir) = fixtures_dir() else { return };
    let server = start(Duration::from_millis(2)).await;
    let echo_id = seed_flows(&dir, &server).await;
    for case in CASES {
        let capture = load(&dir, case);
        let actual = exchange(server.addr, &rewrite(&capture.request, &echo_id)).await;
        compare(&capture, &actual, &echo_id);
    }
}

#[tokio::test]
async fn langflow_wire_fake_llm_answer_and_usage() {
    let Some(dir) = fixtures_dir() else { return };
    let server = start(Duration::from_millis(2)).await;
    let echo_id = seed_flows(&dir, &server).await;
    for case in [
        "raw/027_f1_fake_llm_stream",
        "raw/028_f2_fake_llm_nonstream",
    ] {
        let capture = load(&dir, case);
        let actual = exchange(server.addr, &rewrite(&capture.request, &echo_id)).await;
        let result = |p: &Parsed| -> Value {
            let body = match &p.chunks {
                Some(_) => p.events().last().expect("end event")["data"]["result"].clone(),
                None => p.json(),
            };
            body["outputs"][0]["outputs"][0]["results"]["message"].clone()
        };
        let (want, got) = (result(&capture.response), result(&actual));
        assert_eq!(got["text"], want["text"], "{case}: answer");
        assert_eq!(
            got["properties"]["usage"], want["properties"]["usage"],
            "{case}: usage"
        );
        if capture.response.chunks.is_some() {
            let tokens = |p: &Parsed| -> Vec<Value> {
                p.events()
                    .into_iter()
                    .filter(|e| e["event"] == "token")
                    .map(|e| e["data"]["chunk"].clone())
                    .collect()
            };
            assert_eq!(tokens(&actual), tokens(&capture.response), "{case}: tokens");
        }
    }
}

/// 036: the client hangs up after the first token; the run must stop.
#[tokio::test]
async fn langflow_wire_client_disconnect() {
    let Some(dir) = fixtures_dir() else { return };
    let server = start(Duration::from_millis(2)).await;
    let echo_id = seed_flows(&dir, &server).await;
    let capture = load(&dir, "raw/036_j1_client_disconnect");
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(&rewrite(&capture.request, &echo_id))
        .await
        .expect("write");
    let want = event_names(&capture.response.events());
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let parsed = parse_response(&raw);
        if parsed.events().len() >= want.len() {
            assert_eq!(parsed.status_line, capture.response.status_line);
            assert_eq!(event_names(&parsed.events())[..want.len()], want[..]);
            break;
        }
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
            .await
            .expect("first events within 30 s")
            .expect("read");
        assert!(n > 0, "server closed early");
        raw.extend_from_slice(&buf[..n]);
    }
    drop(stream);
    wait_for(|| server.stats.cancelled() == 1, "run cancelled").await;
    assert_eq!(server.stats.completed(), 0);
}

// ---------------------------------------------------------------- self-contained

async fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A component node; its template gets the demo runtime's code for `ty` (or a
/// custom component's) unless it carries code.
fn node(id: &str, ty: &str, display: &str, mut template: Value) -> Value {
    if template.get("code").is_none() {
        let code =
            agora_runtime::code_of(ty).unwrap_or_else(|| format!("# custom component {ty}\n"));
        template["code"] = json!({"type": "code", "value": code});
    }
    json!({"id": id, "type": "genericNode",
           "data": {"id": id, "type": ty, "display_name": display,
                    "node": {"display_name": display, "template": template,
                             "outputs": [{"name": if ty.starts_with("Chat") { "message" } else { "text_output" }}]}}})
}

fn flow(endpoint: &str, middle: Option<Value>) -> Value {
    let input = node(
        "ChatInput-1",
        "ChatInput",
        "Chat Input",
        json!({"input_value": {"value": "Hello"}, "sender_name": {"value": "User"}, "code": {"value": "..."}}),
    );
    let output = node(
        "ChatOutput-1",
        "ChatOutput",
        "Chat Output",
        json!({"sender_name": {"value": "AI"}}),
    );
    let (nodes, edges) = match middle {
        Some(m) => {
            let id = m["id"].clone();
            (
                vec![input, m, output],
                vec![
                    json!({"source": "ChatInput-1", "target": id}),
                    json!({"source": id, "target": "ChatOutput-1"}),
                ],
            )
        }
        None => (
            vec![input, output],
            vec![json!({"source": "ChatInput-1", "target": "ChatOutput-1"})],
        ),
    };
    json!({"name": endpoint, "endpoint_name": endpoint, "data": {"nodes": nodes, "edges": edges}})
}

fn model_flow() -> Value {
    flow(
        "model",
        Some(node(
            "DemoLLM-1",
            "FakeStreamingLLM",
            "Demo LLM",
            json!({"input_value": {"value": ""}}),
        )),
    )
}

async fn create(server: &Server, flow: &Value) -> String {
    let created = post_json(server.addr, "/api/v1/flows/", &[], flow).await;
    assert_eq!(created.status_line, "HTTP/1.1 201 Created");
    created.json()["id"].as_str().expect("id").to_owned()
}

#[tokio::test]
async fn a_node_without_code_cannot_be_built() {
    let server = start(Duration::from_millis(1)).await;
    let mut f = flow("nocode", None);
    f["data"]["nodes"][1]["data"]["node"]["template"]
        .as_object_mut()
        .unwrap()
        .remove("code");
    let id = create(&server, &f).await;
    let r = post_json(
        server.addr,
        &format!("/api/v1/run/{id}"),
        &[],
        &json!({"input_value": "hi"}),
    )
    .await;
    assert_eq!(r.status_line, "HTTP/1.1 500 Internal Server Error");
    let detail: Value = serde_json::from_str(r.json()["detail"].as_str().unwrap()).unwrap();
    assert_eq!(
        detail["message"],
        "Error while creating graph from payload: 'code'"
    );
    let r = post_json(
        server.addr,
        &format!("/api/v1/run/{id}?stream=true"),
        &[],
        &json!({"input_value": "hi"}),
    )
    .await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(text.contains("{\"event\": \"error\", \"data\": {\"error\": \"Error while creating graph from payload: 'code'\"}}"), "{text}");
}

#[tokio::test]
async fn messages_are_kept_per_session_and_listed_as_langflow_does() {
    let server = start(Duration::from_millis(1)).await;
    let id = create(&server, &flow("history", None)).await;
    for (session, text) in [("a", "one"), ("b", "two"), ("a", "three")] {
        let r = post_json(
            server.addr,
            &format!("/api/v1/run/{id}"),
            &[],
            &json!({"input_value": text, "session_id": session}),
        )
        .await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    }
    let r = get(
        server.addr,
        &format!("/api/v1/monitor/messages?session_id=a&flow_id={id}"),
    )
    .await;
    let list = r.json();
    let texts: Vec<(&str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["sender"].as_str().unwrap(), m["text"].as_str().unwrap()))
        .collect();
    assert_eq!(
        texts,
        [
            ("User", "one"),
            ("Machine", "one"),
            ("User", "three"),
            ("Machine", "three")
        ]
    );
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["session_id"] == "a" && m["flow_id"] == json!(id)));
    let r = get(server.addr, "/api/v1/monitor/messages/sessions").await;
    assert_eq!(r.json(), json!(["a", "b"]));
}

#[tokio::test]
async fn echo_round_trip() {
    let server = start(Duration::from_millis(1)).await;
    let id = create(&server, &flow("echo", None)).await;
    for target in [format!("/api/v1/run/{id}"), "/api/v1/run/echo".to_owned()] {
        let r = post_json(
            server.addr,
            &target,
            &[],
            &json!({"input_value": "hi there", "session_id": "s1"}),
        )
        .await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        assert!(r.header("content-length").is_some());
        let body = r.json();
        assert_eq!(body["session_id"], "s1");
        assert_eq!(body["outputs"][0]["inputs"]["input_value"], "hi there");
        assert_eq!(
            body["outputs"][0]["outputs"][0]["results"]["message"]["text"],
            "hi there"
        );
        assert_eq!(
            body["outputs"][0]["outputs"][0]["results"]["message"]["properties"]["usage"],
            Value::Null
        );
    }
    // Without input the flow's stored input runs; the session defaults to the flow id.
    let r = post_json(server.addr, "/api/v1/run/echo", &[], &json!({})).await;
    let body = r.json();
    assert_eq!(body["session_id"], json!(id));
    assert_eq!(body["outputs"][0]["inputs"], json!({}));
    assert_eq!(
        body["outputs"][0]["outputs"][0]["results"]["message"]["text"],
        "Hello"
    );
    assert_eq!(server.stats.completed(), 3);
}

#[tokio::test]
async fn stream_first_chunk_arrives_before_the_run_completes() {
    let server = start(Duration::from_millis(3)).await;
    create(&server, &model_flow()).await;
    let words: Vec<String> = (0..200).map(|i| format!("w{i}")).collect();
    let input = words.join(" ");
    let body = serde_json::to_vec(&json!({"input_value": input})).expect("json");
    let request = build_request(
        "POST",
        "/api/v1/run/model?stream=true",
        &[("x-api-key", KEY), ("Content-Type", "application/json")],
        &body,
    );
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream.write_all(&request).await.expect("write");
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    // Read until the first whole event has arrived.
    while parse_response(&raw).events().is_empty() {
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed before the first event");
        raw.extend_from_slice(&buf[..n]);
    }
    assert_eq!(server.stats.started(), 1);
    assert_eq!(
        server.stats.completed(),
        0,
        "first event must arrive while the run is still going"
    );
    let first = parse_response(&raw);
    assert_eq!(
        first.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(first.header("transfer-encoding"), Some("chunked"));
    // Then the rest of the stream.
    loop {
        let parsed = parse_response(&raw);
        if parsed.complete {
            break;
        }
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed before the end");
        raw.extend_from_slice(&buf[..n]);
    }
    let parsed = parse_response(&raw);
    for chunk in parsed.chunks.iter().flatten().filter(|c| !c.is_empty()) {
        assert_python_event_chunk("model stream", chunk);
    }
    let events = parsed.events();
    let names = event_names(&events);
    let tokens = names.iter().filter(|n| *n == "token").count();
    assert_eq!(tokens, 201, "ECHO: plus one token per word");
    assert_eq!(names.first().map(String::as_str), Some("add_message"));
    assert_eq!(names.last().map(String::as_str), Some("end"));
    let answer: String = events
        .iter()
        .filter(|e| e["event"] == "token")
        .map(|e| e["data"]["chunk"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(answer, format!("ECHO: {input}"));
    let usage = json!({"input_tokens": 201, "output_tokens": 201, "total_tokens": 402});
    let end = &events[events.len() - 1]["data"]["result"]["outputs"][0]["outputs"][0]["results"]
        ["message"];
    assert_eq!(end["properties"]["usage"], usage);
    assert_eq!(end["text"], json!(answer));
    let final_message = &events[events.len() - 2];
    assert_eq!(final_message["event"], "add_message");
    assert_eq!(final_message["data"]["properties"]["state"], "complete");
    assert_eq!(final_message["data"]["properties"]["usage"], usage);
    wait_for(|| server.stats.completed() == 1, "run completed").await;
}

#[tokio::test]
async fn client_disconnect_cancels_the_run() {
    let server = start(Duration::from_millis(5)).await;
    create(&server, &model_flow()).await;
    let input: Vec<String> = (0..2000).map(|i| format!("w{i}")).collect();
    let body = serde_json::to_vec(&json!({"input_value": input.join(" ")})).expect("json");
    let request = build_request(
        "POST",
        "/api/v1/run/model?stream=true",
        &[("x-api-key", KEY), ("Content-Type", "application/json")],
        &body,
    );
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream.write_all(&request).await.expect("write");
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    while !event_names(&parse_response(&raw).events())
        .iter()
        .any(|n| n == "token")
    {
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0);
        raw.extend_from_slice(&buf[..n]);
    }
    drop(stream);
    wait_for(|| server.stats.cancelled() == 1, "run cancelled").await;
    assert_eq!(server.stats.completed(), 0);
    assert_eq!(server.stats.started(), 1);
}

#[tokio::test]
async fn gzip_only_for_large_non_stream_bodies() {
    let server = start(Duration::from_millis(1)).await;
    create(&server, &flow("echo", None)).await;
    let gz = [("Accept-Encoding", "gzip")];
    let large = post_json(
        server.addr,
        "/api/v1/run/echo",
        &gz,
        &json!({"input_value": "x"}),
    )
    .await;
    assert_eq!(large.header("content-encoding"), Some("gzip"));
    assert_eq!(large.header("vary"), Some("Accept-Encoding, Origin"));
    assert_eq!(
        large.json()["outputs"][0]["outputs"][0]["results"]["message"]["text"],
        "x"
    );
    let plain = post_json(
        server.addr,
        "/api/v1/run/echo",
        &[],
        &json!({"input_value": "x"}),
    )
    .await;
    assert_eq!(plain.header("content-encoding"), None);
    assert!(plain.body.len() >= 1000);
    // Below the threshold: no output selected, ~100 bytes.
    let small = post_json(
        server.addr,
        "/api/v1/run/echo",
        &gz,
        &json!({"input_value": "x", "output_component": "Nope-1"}),
    )
    .await;
    assert!(small.body.len() < 1000);
    assert_eq!(small.header("content-encoding"), None);
    assert_eq!(small.json()["outputs"][0]["outputs"], json!([]));
    let stream = post_json(
        server.addr,
        "/api/v1/run/echo?stream=true",
        &gz,
        &json!({"input_value": "x"}),
    )
    .await;
    assert_eq!(stream.header("content-encoding"), None);
    assert_eq!(stream.header("transfer-encoding"), Some("chunked"));
    assert_eq!(
        event_names(&stream.events()),
        ["add_message", "add_message", "end"]
    );
}

#[tokio::test]
async fn error_shapes() {
    let server = start(Duration::from_millis(1)).await;
    create(&server, &flow("echo", None)).await;
    create(
        &server,
        &flow(
            "boom",
            Some(node(
                "RaiseError-1",
                "RaiseError",
                "Raise Error",
                json!({"input_value": {"value": ""}}),
            )),
        ),
    )
    .await;
    let send = |method: &'static str,
                target: &'static str,
                headers: Vec<(&'static str, &'static str)>,
                body: &'static [u8]| {
        let addr = server.addr;
        async move { exchange(addr, &build_request(method, target, &headers, body)).await }
    };
    let json_ct = ("Content-Type", "application/json");
    let cases: Vec<(Parsed, &str, Value)> = vec![
        (
            send(
                "POST",
                "/api/v1/run/echo",
                vec![json_ct],
                br#"{"input_value":"hi"}"#,
            )
            .await,
            "HTTP/1.1 403 Forbidden",
            json!({"detail": "An API key must be passed as query or header"}),
        ),
        (
            send(
                "POST",
                "/api/v1/run/echo",
                vec![
                    json_ct,
                    ("Authorization", "Bearer sk-demo-runtime-test-key"),
                ],
                br#"{"input_value":"hi"}"#,
            )
            .await,
            "HTTP/1.1 403 Forbidden",
            json!({"detail": "An API key must be passed as query or header"}),
        ),
        (
            send(
                "POST",
                "/api/v1/run/echo",
                vec![json_ct, ("x-api-key", "sk-wrong")],
                br#"{"input_value":"hi"}"#,
            )
            .await,
            "HTTP/1.1 403 Forbidden",
            json!({"detail": "Invalid or missing API key"}),
        ),
        (
            send(
                "POST",
                "/api/v1/run/no-such-flow?stream=true",
                vec![json_ct, ("x-api-key", KEY)],
                br#"{"input_value":"hi"}"#,
            )
            .await,
            "HTTP/1.1 404 Not Found",
            json!({"detail": "Flow identifier no-such-flow not found"}),
        ),
        (
            send(
                "POST",
                "/api/v1/run/echo",
                vec![json_ct, ("x-api-key", KEY)],
                br#"{"input_value": "hi","#,
            )
            .await,
            "HTTP/1.1 422 Unprocessable Entity",
            json!({"detail": [{"type": "json_invalid", "loc": ["body", 21], "msg": "JSON decode error"}]}),
        ),
        (
            send("GET", "/api/v1/run/echo", vec![("x-api-key", KEY)], b"").await,
            "HTTP/1.1 405 Method Not Allowed",
            json!({"detail": "Method Not Allowed"}),
        ),
    ];
    for (response, status, body) in cases {
        assert_eq!(response.status_line, status);
        assert_eq!(response.header("content-type"), Some("application/json"));
        assert_eq!(response.json(), body, "{status}");
    }
    let ok = send(
        "POST",
        "/api/v1/run/echo?x-api-key=sk-demo-runtime-test-key",
        vec![json_ct],
        br#"{"input_value":"q"}"#,
    )
    .await;
    assert_eq!(ok.status_line, "HTTP/1.1 200 OK");

    let failed = send(
        "POST",
        "/api/v1/run/boom",
        vec![json_ct, ("x-api-key", KEY)],
        br#"{"input_value":"boom"}"#,
    )
    .await;
    assert_eq!(failed.status_line, "HTTP/1.1 500 Internal Server Error");
    let detail: Value =
        serde_json::from_str(failed.json()["detail"].as_str().expect("string detail"))
            .expect("JSON detail");
    assert!(detail["message"]
        .as_str()
        .unwrap_or("")
        .contains("boom from RaiseError component"));

    let streamed = send(
        "POST",
        "/api/v1/run/boom?stream=true",
        vec![json_ct, ("x-api-key", KEY)],
        br#"{"input_value":"boom"}"#,
    )
    .await;
    assert_eq!(streamed.status_line, "HTTP/1.1 200 OK");
    assert_eq!(
        event_names(&streamed.events()),
        ["add_message", "error", "error"]
    );

    let passed = send(
        "POST",
        "/api/v1/run/boom",
        vec![json_ct, ("x-api-key", KEY)],
        br#"{"input_value":"calm"}"#,
    )
    .await;
    assert_eq!(
        passed.json()["outputs"][0]["outputs"][0]["results"]["message"]["text"],
        "calm"
    );

    let refused = send(
        "POST",
        "/api/v1/run/echo",
        vec![json_ct, ("x-api-key", KEY)],
        br#"{"tweaks":{"ChatInput-1":{"code":"x"}}}"#,
    )
    .await;
    assert_eq!(refused.status_line, "HTTP/1.1 422 Unprocessable Entity");
    assert_eq!(refused.json()["detail"]["code"], "TWEAKS_REFUSED");
}
