//! The embeddable chat widget, end to end: the embed snippet from the control
//! plane, pages on other origins under a strict Content-Security-Policy, the
//! gateway's assets, visitor sessions and CORS, and a real Chromium driven by
//! playwright-core (`tests/browser/widget.mjs`, which asserts what the browser
//! shows; these tests assert what the gateway and the runtime saw).
//!
//! Needs Node.js, `tests/browser/node_modules` (`npm ci` there) and Chromium at
//! `/usr/bin/chromium` (or `AGORA_CHROMIUM`); `scripts/test.sh` installs them.
//! Without them these tests fail and say what is missing, unless
//! `AGORA_SKIP_BROWSER=1` says they are left out.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use agora_config::settings::{UsageSettings, WidgetServing};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::*;
use uuid::Uuid;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether the browser tests can run here; panics saying what is missing.
fn browser_ready() -> bool {
    if std::env::var("AGORA_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!("AGORA_SKIP_BROWSER=1: the browser cases of the widget do NOT run");
        return false;
    }
    let chromium = std::env::var("AGORA_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "Chromium not found at {chromium}: install Debian's chromium (scripts/test.sh does) or set AGORA_CHROMIUM"
    );
    assert!(
        root().join("tests/browser/node_modules/playwright-core").exists(),
        "tests/browser/node_modules is missing: run `npm ci` in tests/browser (scripts/test.sh does)"
    );
    true
}

/// Runs one scenario of the browser driver; its observations.
async fn browse(args: Value) -> Value {
    let script = root().join("tests/browser/widget.mjs");
    let arg = args.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(&script)
            .arg(arg)
            .current_dir(root().join("tests/browser"))
            .output()
    })
    .await
    .unwrap()
    .expect("node runs (Node.js is needed for the widget tests)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scenario {} failed:\n{stderr}\n{stdout}",
        args["scenario"]
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|_| panic!("no observations in {stdout:?}"))
}

/// A shop page on a new loopback origin embedding `snippet`, under a CSP that
/// allows only the gateway (the page `agora up` serves).
async fn host_page(w: &World, snippet: &str) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page = format!("http://{}/", listener.local_addr().unwrap());
    let task = tokio::spawn(agora_control_plane::demo::serve_widget_page(
        listener,
        w.proxy_url.clone(),
        snippet.to_owned(),
    ));
    (page, task)
}

async fn set_origins(w: &World, config: Uuid, origins: &[&str]) {
    let (s, body) = w
        .cp(
            Method::PATCH,
            &w.info.buyer_token,
            &format!("/api/customer-agent-configs/{config}/"),
            Some(json!({"widget": {"allowed_origins": origins, "title": "Shop helper"}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
}

async fn embed(w: &World, config: Uuid) -> Value {
    let (s, body) = w
        .cp(
            Method::GET,
            &w.info.buyer_token,
            &format!("/api/customer-agent-configs/{config}/widget_embed/"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body
}

/// A world whose runtime streams slowly enough to watch, metered into the
/// embedded store, serving visitors as `widget` says.
async fn world(widget: WidgetServing) -> World {
    let usage = UsageSettings {
        batch_max_ms: 20,
        ..UsageSettings::default()
    };
    World::start_serving(None, Duration::from_millis(120), Some(usage), None, widget).await
}

/// An allowed page for the widget of `config`, its origin in the config.
async fn allowed_page_of(w: &World, config: Uuid) -> (String, tokio::task::JoinHandle<()>, Value) {
    // The page's origin is only known once it listens: a placeholder first.
    set_origins(w, config, &["http://placeholder.invalid"]).await;
    let snippet = embed(w, config).await;
    let (page, task) = host_page(w, snippet["snippet"].as_str().unwrap()).await;
    let origin = page.trim_end_matches('/').to_owned();
    set_origins(w, config, &[&origin]).await;
    wait_for_widget_origin(w, &origin).await;
    (page, task, snippet)
}

/// A world serving visitors as `widget` says and an allowed page embedding the
/// demo config's widget; none when the browser cases are left out.
async fn browsing(widget: WidgetServing) -> Option<(World, String, tokio::task::JoinHandle<()>)> {
    if !browser_ready() {
        return None;
    }
    let w = world(widget).await;
    let (page, task, _) = allowed_page(&w).await;
    Some((w, page, task))
}

/// An allowed page for the demo config's widget.
async fn allowed_page(w: &World) -> (String, tokio::task::JoinHandle<()>, Value) {
    allowed_page_of(w, w.info.config_uuid).await
}

/// Until the gateway's snapshot lets `origin` embed a widget.
async fn wait_for_widget_origin(w: &World, origin: &str) {
    eventually("the gateway allows the page's origin", || async {
        w.proxy()
            .gateway
            .shared
            .load()
            .is_widget_origin(origin)
            .then_some(())
    })
    .await;
}

/// The runtime sessions the visitor's message `input` was run in.
async fn runtime_sessions(w: &World, input: &str) -> Vec<String> {
    w.runtime_get("/api/v1/monitor/messages")
        .await
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["sender"] == "User" && m["text"] == input)
        .map(|m| m["session_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_another_origin_embeds_the_widget_and_its_answer_streams_in() {
    if !browser_ready() {
        return;
    }
    let w = world(WidgetServing::default()).await;
    // An agent whose model streams its answer word by word.
    let (config, _) = w.free_subscription("Document Summarizer", "site").await;
    let (page, _task, snippet) = allowed_page_of(&w, config).await;
    let text = format!(
        "hello widget from a real browser {}",
        Uuid::new_v4().simple()
    );
    let seen = browse(json!({"scenario": "journey", "page": page, "text": text})).await;
    let (_, config_answer) = w
        .cp(
            Method::GET,
            &w.info.buyer_token,
            &format!("/api/customer-agent-configs/{config}/"),
            None,
        )
        .await;
    assert_eq!(seen["greeting"], config_answer["greeting"], "{seen}");
    assert!(seen["reply"].as_str().unwrap().contains(&text), "{seen}");
    // The runtime saw the visitor's message in a visitor's own session of the config.
    let sessions = runtime_sessions(&w, &text).await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert!(
        sessions[0].starts_with(&format!("{config}:visitor-")),
        "{sessions:?}"
    );
    // The buyer's usage view counts the message.
    eventually("the usage view counts the widget message", || async {
        let totals = w.config_usage(config).await;
        (totals["requests"].as_u64().unwrap_or(0) >= 1).then_some(())
    })
    .await;
    // Nothing served to the browser carries a secret key.
    let secret = &w.info.api_key;
    assert!(!snippet.to_string().contains(secret));
    for asset in ["loader.js", "widget.js", "widget.css"] {
        let body = w
            .http
            .get(format!("{}/widget/{asset}", w.proxy_url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            !body.contains("ar_sk_") && !body.contains(secret.as_str()),
            "{asset}"
        );
    }
    println!(
        "widget journey: launcher visible {} ms after navigation, first token painted {} ms after send",
        seen["launcher_ms"], seen["first_token_ms"]
    );
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_a_disallowed_origin_gets_no_widget_and_the_gateway_refuses_it() {
    if !browser_ready() {
        return;
    }
    let w = world(WidgetServing::default()).await;
    let (_page, _task, snippet) = allowed_page(&w).await;
    let (other, _other_task) = host_page(&w, snippet["snippet"].as_str().unwrap()).await;
    let seen = browse(json!({"scenario": "refused", "page": other})).await;
    // The 403 carries no CORS fields, so the page cannot even read why.
    assert!(
        seen["state"] == "refused" || seen["state"] == "error",
        "{seen}"
    );
    let metrics = w.metrics().await;
    assert!(
        metrics.contains("agora_proxy_requests_total{route=\"widget\",status=\"403\"}"),
        "{metrics}"
    );
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_visitor_session_is_refreshed_without_losing_the_conversation() {
    let Some((w, page, _task)) = browsing(WidgetServing {
        session_ttl_secs: 2,
        ..WidgetServing::default()
    })
    .await
    else {
        return;
    };
    let seen = browse(json!({"scenario": "refresh", "page": page, "wait_ms": 3000})).await;
    assert_eq!(seen["replies"].as_array().map(Vec::len), Some(2), "{seen}");
    // Both messages reached the runtime in the same visitor's session.
    let first = runtime_sessions(&w, "first").await;
    let second = runtime_sessions(&w, "second").await;
    assert_eq!((first.len(), second.len()), (1, 1), "{first:?} {second:?}");
    assert_eq!(first, second);
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_visitor_reads_a_friendly_message() {
    let Some((w, page, _task)) = browsing(WidgetServing {
        messages_per_minute: 2,
        ..WidgetServing::default()
    })
    .await
    else {
        return;
    };
    let seen = browse(json!({"scenario": "ratelimited", "page": page, "sends": 3})).await;
    assert!(
        seen["alert"].as_str().is_some_and(|a| !a.is_empty()),
        "{seen}"
    );
    let metrics = w.metrics().await;
    assert!(
        metrics.contains("agora_proxy_rate_limited_total{limit=\"visitor\"}"),
        "{metrics}"
    );
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_visitors_never_see_each_others_messages_and_axe_finds_nothing() {
    let Some((w, page, _task)) = browsing(WidgetServing::default()).await else {
        return;
    };
    let seen = browse(json!({"scenario": "two_visitors", "page": page})).await;
    let (a, b) = (seen["a"].as_str().unwrap(), seen["b"].as_str().unwrap());
    let (sa, sb) = (runtime_sessions(&w, a).await, runtime_sessions(&w, b).await);
    assert_eq!((sa.len(), sb.len()), (1, 1), "{sa:?} {sb:?}");
    assert_ne!(sa, sb, "two visitors share a runtime session");
    let axe = browse(json!({"scenario": "axe", "page": page})).await;
    assert_eq!(axe["violations"], 0, "{axe}");
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_opens_sessions_and_answers_cors_only_for_allowed_origins() {
    let w = world(WidgetServing {
        session_ttl_secs: 1,
        ..WidgetServing::default()
    })
    .await;
    let config = w.info.config_uuid;
    // No origins yet: no snippet.
    let (s, body) = w
        .cp(
            Method::GET,
            &w.info.buyer_token,
            &format!("/api/customer-agent-configs/{config}/widget_embed/"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "widget_origins_required");
    let site = "http://shop.example:8081";
    set_origins(&w, config, &[site]).await;
    let snippet = embed(&w, config).await;
    // The same key each time: the snippet is stable.
    assert_eq!(
        embed(&w, config).await["publishable_key"],
        snippet["publishable_key"]
    );
    let key = snippet["publishable_key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("ar_pk_live_"));
    assert!(snippet["snippet"].as_str().unwrap().contains(&key));

    let session_url = format!("{}/api/agent-gateway/widget/session/", w.proxy_url);
    let open = |origin: &str, body: Value| {
        w.http
            .post(&session_url)
            .header("origin", origin)
            .json(&body)
            .send()
    };
    eventually("the gateway knows the widget's key", || async {
        let r = open(site, json!({"key": key})).await.unwrap();
        (r.status() == StatusCode::OK).then_some(())
    })
    .await;
    // Another origin: 403 and no CORS fields, so its page cannot read anything.
    let r = open("http://evil.example:8081", json!({"key": key}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = w
        .http
        .request(Method::OPTIONS, format!("{session_url}?key={key}"))
        .header("origin", "http://evil.example:8081")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // The allowed origin's preflight and session.
    let r = w
        .http
        .request(Method::OPTIONS, format!("{session_url}?key={key}"))
        .header("origin", site)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["access-control-allow-origin"], site);
    // A secret key never opens a session.
    let r = open(site, json!({"key": w.info.api_key})).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = open(site, json!({"key": key})).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["access-control-allow-origin"], site);
    let session: Value = r.json().await.unwrap();
    let token = session["token"].as_str().unwrap().to_owned();
    assert!(session["expires_in"].as_u64().unwrap() <= 900);
    assert_eq!(session["widget"]["title"], "Shop helper");

    let invoke = |auth: String, origin: &'static str| {
        w.http
            .post(format!("{}/api/agent-gateway/invoke/", w.proxy_url))
            .header("authorization", auth)
            .header("origin", origin)
            .json(&json!({"input_value": "hi"}))
            .send()
    };
    // The publishable key itself never invokes.
    let r = invoke(format!("Bearer {key}"), "http://shop.example:8081")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "widget_session_required");
    // The token from another origin: refused, no CORS.
    let r = invoke(format!("Bearer {token}"), "http://evil.example:8081")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // From its own origin it invokes, readable there.
    let r = invoke(format!("Bearer {token}"), "http://shop.example:8081")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["access-control-allow-origin"], site);
    // A forged token is refused.
    let forged = format!("{}x", &token[..token.len() - 1]);
    let r = invoke(format!("Bearer {forged}"), "http://shop.example:8081")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Expired: 401 the page can read, then a refresh keeps the visitor.
    eventually("the session expires", || async {
        let r = invoke(format!("Bearer {token}"), "http://shop.example:8081")
            .await
            .unwrap();
        (r.status() == StatusCode::UNAUTHORIZED).then_some(r)
    })
    .await
    .json::<Value>()
    .await
    .map(|b| assert_eq!(b["error"]["code"], "visitor_session_expired"))
    .unwrap();
    let r = open(site, json!({"key": key, "token": token}))
        .await
        .unwrap();
    let refreshed: Value = r.json().await.unwrap();
    assert_eq!(refreshed["visitor"], session["visitor"]);
    assert_ne!(refreshed["token"], session["token"]);
    // Without the old token, a new visitor.
    let r = open(site, json!({"key": key})).await.unwrap();
    let other: Value = r.json().await.unwrap();
    assert_ne!(other["visitor"], session["visitor"]);

    // Assets: compressed, validated, cached by version.
    let r = w
        .http
        .get(format!("{}/widget/loader.js", w.proxy_url))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let r = w
        .http
        .get(format!("{}/widget/loader.js", w.proxy_url))
        .header("accept-encoding", "gzip")
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let version = &agora_proxy::widget::assets().version;
    let r = w
        .http
        .get(format!("{}/widget/widget.js?v={version}", w.proxy_url))
        .send()
        .await
        .unwrap();
    assert!(r.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("immutable"));
    w.finish().await;
}
