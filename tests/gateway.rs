//! End to end through the data plane: a control plane on a fresh Postgres
//! database, the demo runtime behind a recording TCP relay, and the Pingora proxy,
//! all on OS-chosen ports. Nothing here sleeps to wait for readiness: it polls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_config::keys::SigningKey;
use agora_proxy::usage::LogSink;
use agora_proxy::Metering;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use futures_util::StreamExt as _;
use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

mod support;

use support::*;

/// (name, key, registered in the key table as (kind, mode), the reason metrics show)
type Case<'a> = (&'a str, String, Option<(&'a str, &'a str)>, &'a str);

fn canonical_invalid() -> Value {
    json!({"error": {"code": "invalid_api_key", "message": "The API key is not valid."}})
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

/// Puts a key's hash into the key table as if it had been issued, so the proxy's
/// checks past the table lookup are the ones that refuse it.
async fn register(w: &World, raw: &str, key_id: Uuid, kind: &str, mode: &str, tenant: Uuid) {
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(raw.as_bytes()));
    let buyer: String = sqlx::query_scalar("SELECT uuid FROM users WHERE username = $1")
        .bind(&w.info.buyer_username)
        .fetch_one(&w.state.db.pool)
        .await
        .unwrap();
    let mut tx = w.state.db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO api_keys (uuid, org_uuid, config_uuid, name, kind, mode, scopes, allowed_origins, key_hash, prefix, kid, status, created_by, created_at) VALUES ($1, $2, $3, 'forged', $4, $5, 'invoke', '[\"https://shop.example\"]', $6, 'ar_x', $7, 'active', $8, 0)")
        .bind(key_id.to_string())
        .bind(tenant.to_string())
        .bind(w.info.config_uuid.to_string())
        .bind(kind)
        .bind(mode)
        .bind(hash)
        .bind(w.state.signer.kid())
        .bind(buyer)
        .execute(&mut *tx)
        .await
        .unwrap();
    agora_control_plane::db::bump_revision(&mut tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_attacks_are_refused_before_the_runtime() {
    let w = World::start(Duration::from_millis(1)).await;
    let good = w.info.api_key.clone();
    // The demo key works, and tells its tenant.
    let r = w.validate(&good).await;
    assert_eq!(r.status(), StatusCode::OK);
    let ctx: Value = r.json().await.unwrap();
    let tenant: Uuid = ctx["tenant"].as_str().unwrap().parse().unwrap();
    assert_eq!(ctx["config"], json!(w.info.config_uuid));
    assert_eq!(ctx["scopes"], json!(["invoke"]));
    assert_eq!(ctx["plan"]["requests_per_minute"], 20);

    let kid = w.state.signer.kid().to_owned();
    let pem = w.state.signer.to_pkcs8_pem();
    let ed = jsonwebtoken::EncodingKey::from_ed_pem(pem.expose_secret().as_bytes()).unwrap();
    let public = w.state.signer.verification_key().public_key;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = |id: Uuid, extra: Value| {
        let mut c = json!({"jti": id, "cfg": w.info.config_uuid, "ten": tenant, "scp": ["invoke"], "iat": now, "mode": "live", "kind": "secret_live"});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let eddsa = |id: Uuid, extra: Value, kid: &str, key: &jsonwebtoken::EncodingKey| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &claims(id, extra), key).unwrap()
    };

    // (name, key, registered as (kind, mode), the reason metrics must show)
    let mut cases: Vec<Case> = Vec::new();
    let id = Uuid::new_v4();
    cases.push((
        "alg none",
        format!(
            "ar_sk_live_{}.{}.AAAA",
            b64(&json!({"alg": "none", "typ": "JWT", "kid": kid})),
            b64(&claims(id, json!({})))
        ),
        Some(("secret", "live")),
        "unsupported_algorithm",
    ));
    let id = Uuid::new_v4();
    let mut hs = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs.kid = Some(kid.clone());
    cases.push((
        "HS256 signed with the public key",
        format!(
            "ar_sk_live_{}",
            jsonwebtoken::encode(
                &hs,
                &claims(id, json!({})),
                &jsonwebtoken::EncodingKey::from_secret(&URL_SAFE_NO_PAD.decode(&public).unwrap())
            )
            .unwrap()
        ),
        Some(("secret", "live")),
        "unsupported_algorithm",
    ));
    let id = Uuid::new_v4();
    let stranger = SigningKey::generate("stranger-kid");
    let stranger_pem = stranger.to_pkcs8_pem();
    let stranger_key =
        jsonwebtoken::EncodingKey::from_ed_pem(stranger_pem.expose_secret().as_bytes()).unwrap();
    cases.push((
        "unknown kid",
        format!(
            "ar_sk_live_{}",
            eddsa(id, json!({}), "stranger-kid", &stranger_key)
        ),
        Some(("secret", "live")),
        "unknown_kid",
    ));
    let id = Uuid::new_v4();
    cases.push((
        "signed by another key under our kid",
        format!("ar_sk_live_{}", eddsa(id, json!({}), &kid, &stranger_key)),
        Some(("secret", "live")),
        "bad_signature",
    ));
    let id = Uuid::new_v4();
    cases.push((
        "expired",
        format!(
            "ar_sk_live_{}",
            eddsa(id, json!({"exp": now - 60}), &kid, &ed)
        ),
        Some(("secret", "live")),
        "key_expired",
    ));
    let id = Uuid::new_v4();
    cases.push((
        "exp as a string",
        format!(
            "ar_sk_live_{}",
            eddsa(id, json!({"exp": (now + 3600).to_string()}), &kid, &ed)
        ),
        Some(("secret", "live")),
        "invalid_claims",
    ));
    let id = Uuid::new_v4();
    cases.push((
        "secret token under the publishable prefix",
        format!("ar_pk_live_{}", eddsa(id, json!({}), &kid, &ed)),
        Some(("publishable", "live")),
        "wrong_key_prefix",
    ));
    let id = Uuid::new_v4();
    cases.push((
        "live token under the test prefix",
        format!("ar_sk_test_{}", eddsa(id, json!({}), &kid, &ed)),
        Some(("secret", "test")),
        "mode_mismatch",
    ));
    cases.push((
        "the good key under the publishable prefix",
        good.replacen("ar_sk_live_", "ar_pk_live_", 1),
        None,
        "unknown_key",
    ));
    cases.push(("malformed", "ar_sk_live_abc".into(), None, "malformed_key"));
    cases.push((
        "oversized",
        format!("ar_sk_live_{}", "a".repeat(5000)),
        None,
        "key_too_long",
    ));
    for (_, key, registered, _) in &cases {
        if let Some((kind, mode)) = registered {
            let claims_part = key.split('.').nth(1).unwrap();
            let claims: Value =
                serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims_part).unwrap()).unwrap();
            let id: Uuid = claims["jti"].as_str().unwrap().parse().unwrap();
            register(&w, key, id, kind, mode, tenant).await;
        }
    }
    // Wait until the proxy holds the registered keys (the last registration's revision).
    let cp_rev: i64 = sqlx::query_scalar("SELECT revision FROM config_revision WHERE id = 1")
        .fetch_one(&w.state.db.pool)
        .await
        .unwrap();
    eventually("the proxy catches up with the registered keys", || async {
        (w.proxy().gateway.shared.load().revision() >= cp_rev as u64).then_some(())
    })
    .await;

    let runs_before = w.stats.started();
    for (name, key, _, reason) in &cases {
        let auth = format!("Bearer {key}");
        let r = w
            .invoke_with(
                "",
                &[("authorization", &auth), ("origin", "https://shop.example")],
                json!({"input_value": "hi"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{name}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body,
            canonical_invalid(),
            "{name}: one body for every key failure"
        );
        let metrics = w.metrics().await;
        assert!(
            metrics.contains(&format!(
                "agora_proxy_auth_failures_total{{reason=\"{reason}\"}}"
            )),
            "{name} should be refused as {reason}: {metrics}"
        );
    }
    // The same through X-API-Key.
    let r = w
        .invoke_with(
            "",
            &[("x-api-key", "ar_sk_live_abc")],
            json!({"input_value": "hi"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // No key at all.
    let r = w
        .invoke_with("", &[], json!({"input_value": "hi"}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_api_key");
    // A 1 MB header is refused with the JSON 431 without reaching anything.
    let huge = format!("Bearer ar_sk_live_{}", "a".repeat(1024 * 1024));
    let r = w
        .invoke_with(
            "",
            &[("authorization", &huge)],
            json!({"input_value": "hi"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(r.headers()["connection"], "close");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "headers_too_large");
    // So does one just past 32 KiB.
    let large = format!("Bearer ar_sk_live_{}", "a".repeat(40 * 1024));
    let r = w
        .invoke_with(
            "",
            &[("authorization", &large)],
            json!({"input_value": "hi"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "headers_too_large");
    assert_eq!(
        w.stats.started(),
        runs_before,
        "no refused key reached the runtime"
    );
    // The good key still works.
    let r = w.invoke(&good, json!({"input_value": "still fine"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(w.stats.started(), runs_before + 1);
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_and_revocation() {
    let w = World::start(Duration::from_millis(1)).await;
    // A read-only key: validate yes, invoke no.
    let (s, issued) = w
        .cp(
            reqwest::Method::POST,
            &w.info.buyer_token,
            &format!(
                "/api/customer-agent-configs/{}/api_keys/",
                w.info.config_uuid
            ),
            Some(json!({"name": "reader", "scopes": ["read"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{issued}");
    let reader = issued["key"].as_str().unwrap().to_owned();
    w.wait_for_key(&reader).await;
    let r = w.invoke(&reader, json!({"input_value": "hi"})).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_scope");

    // Revocation through the control plane reaches the proxy within a second.
    let key = w.info.api_key.clone();
    assert_eq!(
        w.invoke(&key, json!({"input_value": "hi"})).await.status(),
        StatusCode::OK
    );
    let (_, keys) = w
        .cp(
            reqwest::Method::GET,
            &w.info.buyer_token,
            &format!(
                "/api/customer-agent-configs/{}/api_keys/",
                w.info.config_uuid
            ),
            None,
        )
        .await;
    let key_id = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] != "reader")
        .unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    let started = Instant::now();
    let (s, _) = w
        .cp(
            reqwest::Method::POST,
            &w.info.buyer_token,
            &format!("/api/agent-api-keys/{key_id}/revoke/"),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let refused_after = loop {
        let r = w.validate(&key).await;
        if r.status() == StatusCode::UNAUTHORIZED {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "revocation never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    eprintln!("revoked key refused by the proxy after {refused_after:?}");
    assert!(
        refused_after < Duration::from_secs(1),
        "took {refused_after:?}"
    );
    let r = w.invoke(&key, json!({"input_value": "hi"})).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_contract_and_body_validation() {
    let w = World::start(Duration::from_millis(1)).await;
    let (_, key) = w
        .subscription(
            "FAQ Echo",
            json!({"name": "Roomy", "price_cents": 0, "requests_per_minute": 600}),
            json!({"name": "roomy"}),
        )
        .await;
    // Bad bodies are refused before they count against the runtime.
    let runs = w.stats.started();
    for (body, code) in [
        (
            json!({"input_value": "hi", "input_type": "bogus"}),
            "invalid_body",
        ),
        (
            json!({"input_value": "hi", "tweaks": {"x": 1}}),
            "invalid_body",
        ),
        (
            json!({"input_value": "hi", "session_id": ""}),
            "invalid_session_id",
        ),
    ] {
        let r = w.invoke(&key, body.clone()).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body}");
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["error"]["code"], code, "{body}");
    }
    assert_eq!(w.stats.started(), runs);
    // The 429 contract, on a plan of two requests a minute.
    let (_, key) = w
        .subscription(
            "FAQ Echo",
            json!({"name": "Tiny 2", "price_cents": 0, "requests_per_minute": 2, "burst": 2}),
            json!({"name": "tiny2"}),
        )
        .await;
    for remaining in ["1", "0"] {
        let r = w.invoke(&key, json!({"input_value": "hi"})).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["ratelimit-limit"], "2");
        assert_eq!(r.headers()["ratelimit-remaining"], remaining);
        assert!(r.headers().contains_key("ratelimit-reset"));
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body["outputs"][0]["outputs"][0]["results"]["message"]["text"],
            "hi"
        );
    }
    let runs = w.stats.started();
    let r = w.invoke(&key, json!({"input_value": "hi"})).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry), "retry-after {retry}");
    assert_eq!(r.headers()["ratelimit-limit"], "2");
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    assert!(r.headers().contains_key("ratelimit-reset"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(
        w.stats.started(),
        runs,
        "a refused request never reaches the runtime"
    );
    assert!(w
        .metrics()
        .await
        .contains("agora_proxy_rate_limited_total{limit=\"key\"} 1"));
    w.finish().await;
}

/// Decodes an HTTP/1.1 chunked response body from raw bytes.
fn dechunk(raw: &[u8]) -> Vec<u8> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut rest = &raw[head_end..];
    let mut out = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16)
                .unwrap();
        rest = &rest[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// A config and key on a new free plan of the sample agent that streams.
async fn stream_subscription(w: &World) -> (Uuid, String) {
    w.subscription(
        "Document Summarizer",
        json!({"name": "Stream", "price_cents": 0}),
        json!({"name": "stream"}),
    )
    .await
}

async fn stream_key(w: &World) -> String {
    stream_subscription(w).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_through_unbuffered_and_byte_identical() {
    let w = World::start(Duration::from_millis(150)).await;
    let (config, key) = stream_subscription(&w).await;
    let connections_before = w.recorded.lock().unwrap().len();
    let started = Instant::now();
    let r = w.stream(&key, "A long document to summarise.").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert_eq!(
        w.stats.completed(),
        0,
        "the first bytes arrived while the run was still going"
    );
    let mut received = first.to_vec();
    while let Some(chunk) = stream.next().await {
        received.extend_from_slice(&chunk.unwrap());
    }
    let done_at = started.elapsed();
    eprintln!("first chunk after {first_at:?}, end after {done_at:?}");
    assert!(
        done_at > first_at + Duration::from_millis(300),
        "tokens were paced, so the end came later"
    );
    assert_eq!(w.stats.completed(), 1);
    let text = String::from_utf8(received.clone()).unwrap();
    assert!(text.contains("{\"event\": \"token\""));
    assert!(text.trim_end().ends_with('}') && text.contains("{\"event\": \"end\""));
    // What the runtime sent on its connection, de-chunked, is what the client got.
    let runs: Vec<Vec<u8>> = w.recorded.lock().unwrap()[connections_before..]
        .iter()
        .filter(|c| c.windows(17).any(|x| x == b"text/event-stream"))
        .cloned()
        .collect();
    assert_eq!(runs.len(), 1);
    // The runtime saw the session under the config's namespace; the client gets
    // every frame as sent but for that namespace.
    let sent = String::from_utf8(dechunk(&runs[0])).unwrap();
    let namespace = format!("\"{config}:");
    assert!(
        sent.contains(&format!("{namespace}key-")),
        "the runtime saw a namespaced session"
    );
    assert!(
        !text.contains(&namespace),
        "the client never sees the namespace"
    );
    assert!(
        sent.replace(&namespace, "\"") == text,
        "frames are byte-identical but for the session namespace"
    );
    // Usage from the stream's end event reached the sink.
    eventually("the stream's usage reaches the sink", || async {
        let m = w.metrics().await;
        (m.contains("agora_proxy_usage_written_total")
            && !m.contains("agora_proxy_usage_written_total 0"))
        .then_some(())
    })
    .await;
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_run_and_sigterm_drains_streams() {
    let mut w = World::start(Duration::from_millis(200)).await;
    let key = stream_key(&w).await;
    let r = w.stream(&key, "cut me off").await;
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    eventually("the runtime sees the cancellation", || async {
        (w.stats.cancelled() >= 1).then_some(())
    })
    .await;
    assert_eq!(w.stats.completed(), 0);

    // A stream in flight when shutdown starts runs to its end.
    let r = w.stream(&key, "finish me").await;
    let mut stream = r.bytes_stream();
    let mut received = stream.next().await.unwrap().unwrap().to_vec();
    assert_eq!(
        w.gateway_get("/api/agent-gateway/health/ready/").await,
        (StatusCode::OK, json!({"ready": true, "reason": null}))
    );
    let life = w.proxy().gateway.life.clone();
    let proxy = w.proxy.take().unwrap();
    let stopping = tokio::task::spawn_blocking(move || proxy.shutdown());
    eventually("shutdown starts draining", || async {
        life.draining
            .load(std::sync::atomic::Ordering::SeqCst)
            .then_some(())
    })
    .await;
    // New invokes are refused while draining, and orchestrators are told:
    // not ready, still alive.
    let refused = w.invoke(&key, json!({"input_value": "too late"})).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (status, ready) = w.gateway_get("/api/agent-gateway/health/ready/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["reason"], "draining");
    let (status, _) = w.gateway_get("/api/agent-gateway/health/live/").await;
    assert_eq!(status, StatusCode::OK);
    while let Some(chunk) = stream.next().await {
        received.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(received).unwrap();
    assert!(
        text.contains("{\"event\": \"end\""),
        "the drained stream ended normally: {text}"
    );
    stopping.await.unwrap();
    assert_eq!(w.stats.completed(), 1);
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_from_disk_while_the_control_plane_is_down_and_catches_up() {
    let mut w = World::start(Duration::from_millis(1)).await;
    let key = w.info.api_key.clone();
    assert_eq!(
        w.invoke(&key, json!({"input_value": "hi"})).await.status(),
        StatusCode::OK
    );
    w.stop_proxy().await;
    w.stop_cp().await;

    // A new proxy with the control plane unreachable starts from the saved snapshot.
    let config = proxy_config(
        w.dir.path(),
        &w.cp_url,
        &w.info.runtime_api_key.clone().unwrap(),
    );
    let proxy = tokio::task::spawn_blocking(move || {
        agora_proxy::start(config, Metering::Sink(Arc::new(LogSink::default()))).unwrap()
    })
    .await
    .unwrap();
    w.proxy_url = format!("http://{}", proxy.addr);
    w.proxy = Some(proxy);
    let r = w.invoke(&key, json!({"input_value": "from disk"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let health = health_of(&w.http, &w.proxy_url).await;
    assert_eq!(health["status"], "stale", "{health}");
    assert_eq!(health["ready"], true);
    assert!(health["snapshot"]["age_seconds"].as_f64().unwrap() >= 0.0);

    // The control plane returns on the same address; a revocation made there arrives.
    let listener = tokio::net::TcpListener::bind(w.cp_addr).await.unwrap();
    let (stop, task) = start_cp(w.state.clone(), listener).await;
    w.stop_cp = Some(stop);
    w.cp_task = Some(task);
    w.wait_ready().await;
    let (_, keys) = w
        .cp(
            reqwest::Method::GET,
            &w.info.buyer_token,
            &format!(
                "/api/customer-agent-configs/{}/api_keys/",
                w.info.config_uuid
            ),
            None,
        )
        .await;
    let key_id = keys[0]["uuid"].as_str().unwrap().to_owned();
    let (s, _) = w
        .cp(
            reqwest::Method::POST,
            &w.info.buyer_token,
            &format!("/api/agent-api-keys/{key_id}/revoke/"),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    eventually("the proxy refuses the key", || async {
        (w.invoke(&key, json!({"input_value": "hi"})).await.status() == StatusCode::UNAUTHORIZED)
            .then_some(())
    })
    .await;
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_down_is_a_502_json_and_usage_reports_need_the_secret() {
    let w = World::start(Duration::from_millis(1)).await;
    w.runtime_task.abort();
    // The relay still accepts, but cannot reach the runtime: it closes at once.
    let key = w.info.api_key.clone();
    let started = Instant::now();
    let r = w
        .invoke(&key, json!({"input_value": "anyone there?"}))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "runtime_unreachable", "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Usage reports: the secret is required and compared.
    let url = format!("{}/api/agent-gateway/usage/", w.proxy_url);
    let report = json!({"request_id": Uuid::now_v7(), "input_tokens": 3, "output_tokens": 4});
    let r = w.http.post(&url).json(&report).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = w
        .http
        .post(&url)
        .header("x-runtime-secret", "runtime-secret-for-tests")
        .json(&json!({"request_id": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = w
        .http
        .post(&url)
        .header("x-runtime-secret", "runtime-secret-for-tests")
        .json(&report)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // Unknown routes are JSON 404s.
    let r = w
        .http
        .get(format!("{}/nowhere", w.proxy_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    let metrics = w.metrics().await;
    assert!(
        metrics.contains("agora_proxy_requests_total{route=\"invoke\",status=\"502\"} 1"),
        "{metrics}"
    );
    w.finish().await;
}

/// A stand-in runtime that answers every request with `response` after `delay`.
async fn canned_runtime(response: &'static [u8], delay: Duration) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 128 * 1024];
                let _ = socket.read(&mut buf).await;
                tokio::time::sleep(delay).await;
                let _ = socket.write_all(response).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_timeouts_errors_and_large_bodies_are_json() {
    use agora_config::keys::{Claims, KeyKind, Mode, Scope};
    use agora_config::snapshot::{AgentRoute, KeyEntry, KeyStatus, QuotaUsage, Snapshot};
    let silent = canned_runtime(b"", Duration::from_secs(3600)).await;
    let failing = canned_runtime(
        b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: 43\r\n\r\n{\"detail\":\"{\\\"message\\\":\\\"secret trace\\\"}\"}",
        Duration::ZERO,
    )
    .await;
    // Answers one run per connection, then closes it without saying so. The
    // field its `Connection` names is for the proxy's hop only.
    let one_shot = canned_runtime(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: keep-alive, X-Hop-Secret\r\nx-hop-secret: s3cret\r\nx-flow-run: 7\r\ncontent-length: 2\r\n\r\n{}",
        Duration::ZERO,
    )
    .await;

    // A snapshot on disk and no control plane: the proxy serves from the file.
    let signer = SigningKey::generate("k1");
    let mut snapshot = Snapshot::empty();
    snapshot.revision = 1;
    snapshot.verification_keys = vec![signer.verification_key()];
    let mut keys = Vec::new();
    for (n, runtime) in [(1u128, silent), (2, failing), (3, one_shot)] {
        let (key_id, config, tenant) = (
            Uuid::from_u128(n),
            Uuid::from_u128(100 + n),
            Uuid::from_u128(7),
        );
        let claims = Claims {
            jti: key_id,
            cfg: config,
            ten: tenant,
            prj: None,
            scp: vec![Scope::Invoke],
            iat: 1_700_000_000,
            nbf: None,
            exp: None,
            mode: Mode::Live,
        };
        let key = signer.issue(KeyKind::SecretLive, &claims).unwrap();
        snapshot.keys.insert(
            key.hash(),
            KeyEntry {
                key_id,
                kind: KeyKind::SecretLive,
                config,
                tenant,
                project: None,
                scopes: vec![Scope::Invoke],
                status: KeyStatus::Active,
                plan: None,
                mode: Mode::Live,
                expires_at: None,
            },
        );
        snapshot.routes.insert(
            config,
            AgentRoute {
                config,
                agent: Uuid::from_u128(9),
                tenant,
                runtime_url: format!("http://{runtime}"),
                flow_id: "f".into(),
                tweaks: serde_json::Map::new(),
                global_vars: Default::default(),
                quota: QuotaUsage::default(),
            },
        );
        keys.push(key.expose_secret().to_owned());
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = proxy_config(dir.path(), "http://127.0.0.1:1", "runtime-key");
    agora_proxy::sync::save(&config.snapshot_path, &snapshot).unwrap();
    config.read_timeout = Duration::from_millis(300);
    let proxy = tokio::task::spawn_blocking(move || {
        agora_proxy::start(config, Metering::Sink(Arc::new(LogSink::default()))).unwrap()
    })
    .await
    .unwrap();
    let url = format!("http://{}/api/agent-gateway/invoke/", proxy.addr);
    let http = reqwest::Client::new();

    let started = Instant::now();
    let r = http
        .post(&url)
        .bearer_auth(&keys[0])
        .json(&json!({"input_value": "hello?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "runtime_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    let r = http
        .post(&url)
        .bearer_auth(&keys[1])
        .json(&json!({"input_value": "hello?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let text = r.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["code"], "runtime_error");
    assert!(
        !text.contains("secret trace"),
        "the runtime's error body stays inside: {text}"
    );

    let r = http
        .post(&url)
        .bearer_auth(&keys[1])
        .json(&json!({"input_value": "x".repeat(70 * 1024)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "body_too_large");

    // A pooled connection the runtime has closed is not used for the next run.
    for text in ["first", "second", "third"] {
        let r = http
            .post(&url)
            .bearer_auth(&keys[2])
            .json(&json!({ "input_value": text }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{text}");
        assert!(
            r.headers().get("x-hop-secret").is_none(),
            "{:?}",
            r.headers()
        );
        assert_eq!(r.headers()["x-flow-run"], "7");
        assert_eq!(r.text().await.unwrap(), "{}");
        // The runtime's close reaches the proxy while the connection is idle.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::task::spawn_blocking(move || proxy.shutdown())
        .await
        .unwrap();
}

/// Reads one response from `s` (after what `buf` already holds): its head and its
/// body, de-chunked. What follows stays in `buf`.
async fn read_response(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    async fn more(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        more(s, buf).await;
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let lower = head.to_ascii_lowercase();
    let body_len = if lower.contains("transfer-encoding: chunked") {
        loop {
            if buf[head_end..].windows(5).any(|w| w == b"0\r\n\r\n") {
                let end = buf[head_end..]
                    .windows(5)
                    .position(|w| w == b"0\r\n\r\n")
                    .unwrap();
                break end + 5;
            }
            more(s, buf).await;
        }
    } else {
        lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    while buf.len() < head_end + body_len {
        more(s, buf).await;
    }
    let raw: Vec<u8> = buf.drain(..head_end + body_len).collect();
    let body = if lower.contains("transfer-encoding: chunked") {
        dechunk(&raw)
    } else {
        raw[head_end..].to_vec()
    };
    (head, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_framing_over_raw_sockets() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::start(Duration::from_millis(1)).await;
    let key = w.info.api_key.clone();
    let addr = w.proxy().addr;
    let body = r#"{"input_value":"hi"}"#;
    let invoke = |extra: &str| {
        format!("POST /api/agent-gateway/invoke/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n{extra}\r\n")
    };
    let runs_before = w.stats.started();

    // Two requests sent at once on one connection (one with a length, one
    // chunked): two answers, in order, and the connection stays open.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut both = invoke(&format!("Content-Length: {}\r\n", body.len())) + body;
    both += &invoke("Transfer-Encoding: chunked\r\n");
    both += &format!(
        "5\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        &body[..5],
        body.len() - 5,
        &body[5..]
    );
    s.write_all(both.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..2 {
        let (head, answer) = read_response(&mut s, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert!(head.to_ascii_lowercase().contains("x-agora-request-id: "));
        let answer: Value = serde_json::from_slice(&answer).unwrap();
        assert!(answer["outputs"].is_array(), "{answer}");
    }
    assert_eq!(w.stats.started(), runs_before + 2);

    // Expect: 100-continue: the interim answer comes before the body is sent.
    let ask = invoke(&format!(
        "Content-Length: {}\r\nExpect: 100-continue\r\n",
        body.len()
    ));
    s.write_all(ask.as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 100 Continue"), "{head}");
    s.write_all(body.as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(w.stats.started(), runs_before + 3);

    // A length and a chunked coding together (a smuggling shape) is refused
    // and the connection closed; the runtime sees nothing.
    let smuggle = invoke(&format!(
        "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
        body.len()
    )) + body;
    s.write_all(smuggle.as_bytes()).await.unwrap();
    let (head, answer) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    assert!(head.to_ascii_lowercase().contains("connection: close"));
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["error"]["code"], "malformed_request");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "nothing after the refusal");
    assert_eq!(w.stats.started(), runs_before + 3);

    // Not HTTP at all: a JSON 400.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"HELLO THERE\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let (head, answer) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["error"]["code"], "malformed_request");

    // HTTP/1.0 without keep-alive: one answer, then the connection closes.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let old = format!(
        "POST /api/agent-gateway/invoke/ HTTP/1.0\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(old.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"));
    assert!(text.contains("\"outputs\""), "{text}");
    assert_eq!(w.stats.started(), runs_before + 4);
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_rfc_9112_refuses_is_answered_400_and_reaches_no_runtime() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::start(Duration::from_millis(1)).await;
    let key = w.info.api_key.clone();
    let addr = w.proxy().addr;
    let runs_before = w.stats.started();
    let line = "POST /api/agent-gateway/invoke/ HTTP/1.1\r\n";
    let auth = format!("Authorization: Bearer {key}\r\n");
    let chunked_body = "14\r\n{\"input_value\":\"hi\"}\r\n0\r\n\r\n";
    let cases = [
        format!("{line}Host: x\r\n{auth}Transfer-Encoding: gzip, chunked\r\n\r\n{chunked_body}"),
        format!("{line}Host: x\r\n{auth}Transfer-Encoding: identity, chunked\r\n\r\n{chunked_body}"),
        format!("{line}Host: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n14 xyz\r\n{{\"input_value\":\"hi\"}}\r\n0\r\n\r\n"),
        format!("{line}{auth}Content-Length: 20\r\n\r\n{{\"input_value\":\"hi\"}}"),
        format!("{line}Host: x\r\nHost: y\r\n{auth}Content-Length: 20\r\n\r\n{{\"input_value\":\"hi\"}}"),
    ];
    for raw in cases {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
            .await
            .expect("the gateway answers and closes")
            .unwrap();
        let text = String::from_utf8_lossy(&all);
        assert!(text.starts_with("HTTP/1.1 400 "), "{raw:?} got {text}");
        assert!(text.contains("\"malformed_request\""), "{raw:?} got {text}");
    }
    assert_eq!(
        w.stats.started(),
        runs_before,
        "no refused request reached the runtime"
    );
    w.finish().await;
}

/// Keeps every usage event it is given.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<agora_config::usage::UsageEvent>>);

#[agora_proxy::async_trait]
impl agora_proxy::usage::UsageSink for Recorder {
    async fn write(&self, batch: &[agora_proxy::usage::UsageRecord]) -> anyhow::Result<()> {
        let mut events = self.0.lock().unwrap();
        for record in batch {
            if let agora_proxy::usage::UsageRecord::Event(e) = record {
                events.push((**e).clone());
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_still_running_when_the_grace_period_ends_is_metered_as_cancelled() {
    let mut w = World::start(Duration::from_millis(300)).await;
    let key = stream_key(&w).await;
    w.stop_proxy().await;
    let mut config = proxy_config(
        w.dir.path(),
        &w.cp_url,
        &w.info.runtime_api_key.clone().unwrap(),
    );
    config.grace_period = Duration::from_millis(100);
    let recorder = Arc::new(Recorder::default());
    let sink = recorder.clone();
    let proxy = tokio::task::spawn_blocking(move || {
        agora_proxy::start(config, Metering::Sink(sink)).unwrap()
    })
    .await
    .unwrap();
    w.proxy_url = format!("http://{}", proxy.addr);
    w.proxy = Some(proxy);
    w.wait_for_key(&key).await;

    let r = w.stream(&key, "a long one").await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let proxy = w.proxy.take().unwrap();
    tokio::task::spawn_blocking(move || proxy.shutdown())
        .await
        .unwrap();
    // The client's stream was cut, not finished.
    let mut ended = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => ended |= String::from_utf8_lossy(&bytes).contains("\"event\": \"end\""),
            Err(_) => break,
        }
    }
    assert!(!ended, "the run outlived the grace period");
    let events = recorder.0.lock().unwrap().clone();
    let invokes: Vec<_> = events
        .iter()
        .filter(|e| e.route == "/api/agent-gateway/invoke/")
        .collect();
    assert_eq!(invokes.len(), 1, "{events:?}");
    assert_eq!(
        invokes[0].status,
        agora_config::usage::UsageStatus::Cancelled
    );
    assert_eq!(invokes[0].http_status, 200);
    assert!(invokes[0].bytes_out > 0);
    w.finish().await;
}

/// Reads what the server sends until it closes (or 5 s pass).
async fn read_until_closed(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all)).await;
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_a_cap_are_answered_at_once_and_the_rest_keep_working() {
    use agora_config::snapshot::Snapshot;
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let mut config = proxy_config(dir.path(), "http://127.0.0.1:1", "runtime-key");
    let mut snapshot = Snapshot::empty();
    snapshot.revision = 1;
    agora_proxy::sync::save(&config.snapshot_path, &snapshot).unwrap();
    config.max_connections = 6;
    config.max_connections_per_client = 4;
    let proxy = tokio::task::spawn_blocking(move || {
        agora_proxy::start(config, Metering::Sink(Arc::new(LogSink::default()))).unwrap()
    })
    .await
    .unwrap();
    let addr = proxy.addr;
    let health = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\n\r\n",
        agora_proxy::gateway::HEALTH
    );

    // Four idle connections from this address take its share ...
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(health.as_bytes()).await.unwrap();
        let mut head = [0u8; 12];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut head)
            .await
            .unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "an admitted connection is served");
        idle.push(s);
    }
    // ... so a fifth is answered 429 without being read, and closed.
    let mut fifth = tokio::net::TcpStream::connect(addr).await.unwrap();
    let text = read_until_closed(&mut fifth).await;
    assert!(text.starts_with("HTTP/1.1 429 "), "{text}");
    assert!(text.contains("\"too_many_connections\""), "{text}");
    // A freed place is taken again.
    drop(idle.pop());
    let ok = eventually("a freed place is taken again", || async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(health.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut head)
            .await
            .ok()?;
        (&head == b"HTTP/1.1 200").then_some(s)
    })
    .await;
    idle.push(ok);
    // Two from another address fill the listener; a third address gets 503.
    let from = |ip: &str| {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(std::net::SocketAddr::new(ip, 0)).unwrap();
            socket.connect(addr).await.unwrap()
        }
    };
    for _ in 0..2 {
        let mut s = from("127.0.0.2").await;
        s.write_all(health.as_bytes()).await.unwrap();
        let mut head = [0u8; 12];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut head)
            .await
            .unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        idle.push(s);
    }
    let mut over = from("127.0.0.3").await;
    let text = read_until_closed(&mut over).await;
    assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
    assert!(text.contains("\"too_many_connections\""), "{text}");
    let metrics = reqwest::get(format!("http://{}/metrics", proxy.admin_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused = |cap: &str| -> u64 {
        let series = format!("agora_proxy_connections_refused_total{{cap=\"{cap}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    // The retry above may have met the cap once more before the place was freed.
    assert!(refused("client") >= 1, "{metrics}");
    assert_eq!(refused("listener"), 1, "{metrics}");
    drop(idle);
    tokio::task::spawn_blocking(move || proxy.shutdown())
        .await
        .unwrap();
}
