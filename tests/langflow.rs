//! Agora on a real Langflow 1.13: `agora up`'s sample agents answer through the
//! gateway, streams stream, token counts the flow reports reach the buyer's usage
//! view, tenants never share a Langflow session, a stream ending in `error` is
//! metered as an error, and custom code from a provider staff did not allow never
//! reaches Langflow.
//!
//! `./scripts/test.sh` installs Langflow (cached) and names it in
//! `AGORA_LANGFLOW`; this test starts it once on a free port with a private
//! database. Without it the test fails, unless `AGORA_SKIP_LANGFLOW=1`, which
//! says plainly that these cases did not run.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::StreamExt as _;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::*;
use uuid::Uuid;

const LANGFLOW_KEY: &str = "agora-langflow-test-key";

fn langflow_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("AGORA_LANGFLOW") {
        return Some(path.into());
    }
    if std::env::var("AGORA_SKIP_LANGFLOW").as_deref() == Ok("1") {
        eprintln!("AGORA_SKIP_LANGFLOW=1: the real-Langflow cases (tests/langflow.rs) DID NOT RUN");
        return None;
    }
    panic!(
        "AGORA_LANGFLOW names no Langflow binary: run ./scripts/test.sh, which installs \
         Langflow 1.13.0, or set AGORA_SKIP_LANGFLOW=1 to run without these cases"
    );
}

/// A Langflow server of its own: its process group is ended on drop.
struct Langflow {
    child: Child,
    url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Langflow {
    fn start(binary: &Path) -> Langflow {
        let dir = tempfile::tempdir().unwrap();
        // Langflow binds the port itself; it is free a moment before.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut secret = [0u8; 32];
        secret[..16].copy_from_slice(Uuid::new_v4().as_bytes());
        secret[16..].copy_from_slice(Uuid::new_v4().as_bytes());
        let fernet = base64::engine::general_purpose::URL_SAFE.encode(secret);
        let log = dir.path().join("langflow.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(binary);
        command
            .args(["run", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--backend-only", "--no-open-browser", "--workers", "1"])
            .env("DO_NOT_TRACK", "true")
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .env("LANGFLOW_MODELS_DEV_REFRESH", "false")
            .env(
                "LANGFLOW_DATABASE_URL",
                format!("sqlite:///{}", dir.path().join("langflow.db").display()),
            )
            .env("LANGFLOW_CONFIG_DIR", dir.path().join("config"))
            .env("LANGFLOW_AUTO_LOGIN", "true")
            .env("LANGFLOW_API_KEY_SOURCE", "env")
            .env("LANGFLOW_API_KEY", LANGFLOW_KEY)
            .env("LANGFLOW_CREATE_STARTER_PROJECTS", "false")
            .env("LANGFLOW_SECRET_KEY", fernet)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().expect("Langflow starts");
        Langflow {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits for `/health`; Langflow takes about a minute to start here.
    async fn ready(&mut self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Ok(r) = http.get(format!("{}/health", self.url)).send().await {
                if r.status() == StatusCode::OK {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("Langflow exited ({status}):\n{}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "Langflow did not start:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Langflow {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let _ = self.child.wait();
    }
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/langflow")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn answer_text(body: &Value) -> String {
    body["outputs"][0]["outputs"][0]["results"]["message"]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no answer text: {body}"))
        .to_owned()
}

async fn langflow_get(w: &World, path: &str) -> Value {
    w.runtime_get(path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agora_runs_its_agents_on_a_real_langflow() {
    let Some(binary) = langflow_binary() else {
        return;
    };
    let http = reqwest::Client::new();
    let mut langflow = Langflow::start(&binary);
    langflow.ready(&http).await;
    let w = World::start_on(
        Some((langflow.url.clone(), LANGFLOW_KEY.to_owned())),
        Duration::ZERO,
        Some(agora_config::settings::UsageSettings::default()),
    )
    .await;

    // The sample agents, provisioned with Langflow's own component code, answer
    // through the gateway; the summarizer needs a model provider's key, and says so.
    let (_, key) = w.free_subscription("FAQ Echo", "echo").await;
    let r = w
        .invoke(&key, json!({"input": "Hello, how can you help me?"}))
        .await;
    assert_eq!(r.status(), StatusCode::OK, "{}", langflow.log_tail());
    assert_eq!(
        answer_text(&r.json().await.unwrap()),
        "Hello, how can you help me?"
    );
    let r = w
        .invoke(
            &w.info.api_key,
            json!({"input_value": "My invoice is wrong."}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = answer_text(&r.json().await.unwrap());
    assert!(
        text.contains("My invoice is wrong.") && text.contains("support assistant"),
        "{text}"
    );
    let (_, key) = w.free_subscription("Document Summarizer", "summary").await;
    let r = w
        .invoke(&key, json!({"input_value": "A short document."}))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "runtime_error", "{body}");

    // Two buyers of Memory Chat, with the same session id: neither sees the other.
    let (a, key_a) = w.free_subscription("Memory Chat", "a").await;
    let (b, key_b) = w.free_subscription("Memory Chat", "b").await;
    let say = |key: String, text: &'static str| {
        let w = &w;
        async move {
            let r = w
                .invoke(&key, json!({"input_value": text, "session_id": "s1"}))
                .await;
            assert_eq!(r.status(), StatusCode::OK);
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["session_id"], "s1");
            answer_text(&body)
        }
    };
    say(key_a.clone(), "the secret word is amaranth").await;
    let theirs = say(key_b.clone(), "what is the secret word?").await;
    assert!(
        !theirs.contains("amaranth"),
        "another buyer's memory leaked: {theirs}"
    );
    let mine = say(key_a.clone(), "and what was it?").await;
    assert!(
        mine.contains("amaranth"),
        "a buyer keeps its own memory: {mine}"
    );
    let flow_id = w.agent_flow_id("Memory Chat").await;
    let messages = |session: String| {
        let w = &w;
        let flow_id = flow_id.clone();
        async move {
            let path = format!(
                "/api/v1/monitor/messages?flow_id={flow_id}&session_id={}",
                session.replace(':', "%3A")
            );
            langflow_get(w, &path)
                .await
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["text"].as_str().unwrap_or("").to_owned())
                .collect::<Vec<String>>()
        }
    };
    let of_a = messages(format!("{a}:s1")).await;
    let of_b = messages(format!("{b}:s1")).await;
    assert!(of_a.iter().any(|t| t.contains("amaranth")), "{of_a:?}");
    assert!(!of_b.iter().any(|t| t.contains("amaranth")), "{of_b:?}");
    let sessions = langflow_get(
        &w,
        &format!("/api/v1/monitor/messages/sessions?flow_id={flow_id}"),
    )
    .await;
    for s in sessions.as_array().unwrap() {
        let s = s.as_str().unwrap();
        assert!(
            s.starts_with(&format!("{a}:")) || s.starts_with(&format!("{b}:")),
            "Langflow only sees namespaced sessions: {sessions}"
        );
    }

    // A streaming model (custom code, published by the demo provider, which may):
    // tokens reach the client while the run goes on, and the counts the flow
    // reports are the buyer's usage.
    let provider = w.info.provider_token.clone();
    let (_, s, body) = w
        .publish_flow(&provider, "Streamer", &fixture("fake-stream.json"))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (config, key) = w.free_subscription("Streamer", "stream").await;
    let r = w.stream(&key, "one two three four five").await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut reads = r.bytes_stream();
    let mut text = String::new();
    let mut reads_with_tokens_before_end = 0;
    while let Some(chunk) = reads.next().await {
        let chunk = String::from_utf8(chunk.unwrap().to_vec()).unwrap();
        if chunk.contains("{\"event\": \"token\"")
            && !text.contains("{\"event\": \"end\"")
            && !chunk.contains("{\"event\": \"end\"")
        {
            reads_with_tokens_before_end += 1;
        }
        text.push_str(&chunk);
    }
    assert!(text.contains("{\"event\": \"end\""), "{text}");
    assert!(
        reads_with_tokens_before_end >= 3,
        "tokens arrived as the run made them ({reads_with_tokens_before_end} reads): {text}"
    );
    let r = w
        .invoke(&key, json!({"input_value": "one two three"}))
        .await;
    let body: Value = r.json().await.unwrap();
    let usage = &body["outputs"][0]["outputs"][0]["results"]["message"]["properties"]["usage"];
    let reported = (
        usage["input_tokens"].as_u64().unwrap() + 5,
        usage["output_tokens"].as_u64().unwrap(),
    );
    let totals = eventually("both runs in the usage view", || async {
        let t = w.config_usage(config).await;
        (t["requests"] == 2).then_some(t)
    })
    .await;
    assert_eq!(totals["estimated_requests"], 0, "{totals}");
    let streamed_output = text
        .rsplit("\"usage\": {\"input_tokens\": 5, \"output_tokens\": ")
        .next()
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no usage in the stream: {text}"));
    assert_eq!(
        (
            totals["input_tokens"].as_u64().unwrap(),
            totals["output_tokens"].as_u64().unwrap()
        ),
        (reported.0, reported.1 + streamed_output),
        "{totals}"
    );

    // A stream that ends in `error` is metered as a runtime error.
    let (_, s, body) = w
        .publish_flow(&provider, "Fragile", &fixture("raise-error.json"))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (config, key) = w.free_subscription("Fragile", "fragile").await;
    let r = w.stream(&key, "please boom").await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("{\"event\": \"error\"") && !text.contains("{\"event\": \"end\""),
        "{text}"
    );
    let totals = eventually("the failed run in the usage view", || async {
        let t = w.config_usage(config).await;
        (t["requests"] == 1).then_some(t)
    })
    .await;
    assert_eq!(
        (&totals["upstream_errors"], &totals["errors"]),
        (&json!(1), &json!(1)),
        "{totals}"
    );
    let fragile = w.agent("Fragile").await;
    let (_, view) = w
        .cp(
            reqwest::Method::GET,
            &provider,
            &format!("/api/provider-agents/{fragile}/usage/"),
            None,
        )
        .await;
    assert_eq!(view["last_error"]["code"], "stream_error", "{view}");
    assert!(
        view["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("boom"),
        "Langflow's own word on the failure: {view}"
    );

    // An unapproved provider's custom component never reaches Langflow.
    let user = agora_control_plane::identity::create_user(
        &w.state.db,
        "mallory",
        "m@example.com",
        "correct-horse-7",
        false,
    )
    .await
    .unwrap();
    let org = agora_control_plane::identity::create_org(
        &w.state.db,
        "Mallory Labs",
        agora_control_plane::domain::OrgKind::Provider,
        "",
        user,
    )
    .await
    .unwrap();
    let token = agora_control_plane::identity::create_token(&w.state.db, user)
        .await
        .unwrap();
    let (_, s, body) = w
        .publish_flow(&token, "Sneaky", &fixture("fake-stream.json"))
        .await;
    assert_eq!(
        (s, &body["error"]["code"]),
        (StatusCode::FORBIDDEN, &json!("provider_not_approved"))
    );
    agora_control_plane::identity::set_provider_review(
        &w.state.db,
        org,
        agora_control_plane::identity::ProviderReview {
            approved: true,
            custom_code_allowed: false,
        },
    )
    .await
    .unwrap();
    let (_, s, body) = w
        .publish_flow(&token, "Sneaky again", &fixture("fake-stream.json"))
        .await;
    assert_eq!(
        (s, &body["error"]["code"]),
        (StatusCode::FORBIDDEN, &json!("custom_code_not_allowed")),
        "{body}"
    );
    let flows = langflow_get(&w, "/api/v1/flows/?get_all=true").await;
    let names: Vec<&str> = flows
        .as_array()
        .unwrap_or_else(|| panic!("{flows}"))
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert!(names.iter().any(|n| n.starts_with("Streamer")), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("Sneaky")), "{names:?}");
    w.finish().await;
    drop(langflow);
}
