//! What a tenant sends reaches only its own sessions on the shared runtime, and
//! its usage is metered honestly: over real sockets, with the control plane on
//! Postgres, the demo runtime and the gateway metering into the embedded store.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::*;
use uuid::Uuid;

async fn metered_world() -> World {
    World::start_with(
        Duration::from_millis(2),
        Some(agora_config::settings::UsageSettings::default()),
    )
    .await
}

/// The texts of a runtime session's messages, oldest first.
async fn session_texts(w: &World, session: &str) -> Vec<String> {
    let path = format!(
        "/api/v1/monitor/messages?session_id={}",
        session.replace(':', "%3A")
    );
    w.runtime_get(&path)
        .await
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["sender"] == "User")
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buyers_of_one_agent_never_share_a_runtime_session() {
    let w = World::start(Duration::from_millis(1)).await;
    let (a, key_a) = w.free_subscription("FAQ Echo", "a").await;
    let (b, key_b) = w.free_subscription("FAQ Echo", "b").await;

    let r = w
        .invoke(&key_a, json!({"input_value": "from a", "session_id": "s1"}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["session_id"], "s1", "the caller gets its own id back");
    // The same id from another buyer, and one that names a's namespace outright.
    for session in ["s1".to_owned(), format!("{a}:s1")] {
        let r = w
            .invoke(
                &key_b,
                json!({"input_value": "from b", "session_id": session}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["session_id"], json!(session));
        assert!(!body.to_string().contains(&b.to_string()), "{body}");
    }
    // No session named: one per key.
    let r = w.invoke(&key_a, json!({"input_value": "no session"})).await;
    let body: Value = r.json().await.unwrap();
    let own = body["session_id"].as_str().unwrap().to_owned();
    assert!(own.starts_with("key-"), "{body}");

    assert_eq!(session_texts(&w, &format!("{a}:s1")).await, ["from a"]);
    assert_eq!(session_texts(&w, &format!("{b}:s1")).await, ["from b"]);
    assert_eq!(session_texts(&w, &format!("{b}:{a}:s1")).await, ["from b"]);
    assert_eq!(
        session_texts(&w, &format!("{a}:{own}")).await,
        ["no session"]
    );
    let sessions = w.runtime_get("/api/v1/monitor/messages/sessions").await;
    let sessions: Vec<&str> = sessions
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(
        sessions
            .iter()
            .all(|s| s.starts_with(&format!("{a}:")) || s.starts_with(&format!("{b}:"))),
        "the runtime only ever sees namespaced sessions: {sessions:?}"
    );
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_apis_input_runs_and_is_estimated_by_its_text() {
    let w = metered_world().await;
    let (config, key) = w.free_subscription("FAQ Echo", "seed").await;
    let r = w.invoke(&key, json!({"input": "hello"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["outputs"][0]["outputs"][0]["results"]["message"]["text"],
        "hello"
    );
    let r = w
        .invoke(&key, json!({"input": "hello", "input_value": "hello"}))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let totals = eventually("the run is in the usage view", || async {
        let t = w.config_usage(config).await;
        (t["requests"] == 2).then_some(t)
    })
    .await;
    // "hello" is one token each way, not the envelope's bytes / 4.
    assert_eq!(
        (
            &totals["input_tokens"],
            &totals["output_tokens"],
            &totals["estimated_requests"]
        ),
        (&json!(1), &json!(1), &json!(1)),
        "{totals}"
    );
    assert_eq!(totals["refused"]["client_error"], 1, "{totals}");
    w.finish().await;
}

/// ChatInput → a custom component that fails on `boom` → ChatOutput.
fn failing_flow() -> Value {
    let node = |id: &str, ty: &str, code: &str| {
        json!({"id": id, "type": "genericNode", "data": {"id": id, "type": ty, "display_name": ty,
            "node": {"display_name": ty, "template": {"code": {"type": "code", "value": code}},
                     "outputs": [{"name": "message", "types": ["Message"]}]}}})
    };
    json!({"name": "Fails on boom", "data": {
    "nodes": [
        node("ChatInput-1", "ChatInput", &agora_runtime::code_of("ChatInput").unwrap()),
        node("RaiseError-1", "RaiseError", "class RaiseError(Component): ...  # raises on 'boom'"),
        node("ChatOutput-1", "ChatOutput", &agora_runtime::code_of("ChatOutput").unwrap()),
    ],
    "edges": [
        {"source": "ChatInput-1", "target": "RaiseError-1"},
        {"source": "RaiseError-1", "target": "ChatOutput-1"}
    ]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ending_in_an_error_event_is_metered_as_a_runtime_error() {
    let w = metered_world().await;
    // The demo provider may publish custom code.
    let token = &w.info.provider_token;
    let (agent, s, body) = w.publish_flow(token, "Fragile", &failing_flow()).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (config, key) = w.free_subscription("Fragile", "fragile").await;

    let r = w.stream(&key, "please boom").await;
    assert_eq!(r.status(), StatusCode::OK, "the stream had started");
    let text = r.text().await.unwrap();
    assert!(text.contains("{\"event\": \"error\""), "{text}");
    let r = w.invoke(&key, json!({"input_value": "boom again"})).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let r = w.invoke(&key, json!({"input_value": "fine"})).await;
    assert_eq!(r.status(), StatusCode::OK);

    let totals = eventually("three runs in the usage view", || async {
        let t = w.config_usage(config).await;
        (t["requests"] == 3).then_some(t)
    })
    .await;
    assert_eq!(totals["upstream_errors"], 2, "{totals}");
    assert_eq!(totals["errors"], 2, "{totals}");
    // The seller sees the last failure of the agent, with the runtime's word on it.
    let (s, view) = w
        .cp(
            reqwest::Method::GET,
            token,
            &format!("/api/provider-agents/{agent}/usage/"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{view}");
    let last = &view["last_error"];
    assert_eq!(last["code"], "runtime_error", "{view}");
    assert_eq!(last["config"], json!(config), "{view}");
    let message = last["message"].as_str().unwrap();
    assert!(message.contains("boom from RaiseError component"), "{view}");
    assert!(message.len() <= 304, "trimmed: {message}");
    assert_eq!(view["totals"]["upstream_errors"], 2, "{view}");
    let m = w.metrics().await;
    assert!(
        m.lines()
            .any(|l| l.contains("stream_error") && !l.ends_with(" 0")),
        "{m}"
    );
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_usage_reports_for_a_config_count_once_within_bounds() {
    let w = metered_world().await;
    let (config, _) = w.free_subscription("FAQ Echo", "reported").await;
    let event = Uuid::now_v7();
    let report =
        json!({"config_uuid": config, "input_tokens": 120, "output_tokens": 30, "event_id": event});
    for _ in 0..2 {
        let (s, body) = w.report_usage(report.clone()).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    }
    let (s, body) = w
        .report_usage(json!({"config_uuid": config, "input_tokens": 18446744073709551615u64, "output_tokens": 0}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "tokens_out_of_range");
    let (s, body) = w
        .report_usage(json!({"config_uuid": Uuid::new_v4(), "input_tokens": 1, "output_tokens": 1}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "unknown_config");
    let totals = eventually("the report is in the usage view", || async {
        let t = w.config_usage(config).await;
        (t["input_tokens"] != 0).then_some(t)
    })
    .await;
    assert_eq!(
        (
            &totals["requests"],
            &totals["input_tokens"],
            &totals["output_tokens"]
        ),
        (&json!(0), &json!(120), &json!(30)),
        "counted once, and no request: {totals}"
    );
    w.finish().await;
}
