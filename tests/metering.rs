//! Usage metering end to end, on a real ClickHouse server (a private one per test,
//! started from Debian's `clickhouse-server`; the test command installs it): every
//! request lands exactly once with exact token sums, a ClickHouse outage under load
//! loses nothing, SIGTERM flushes, SIGKILL loses nothing that reached the spill log,
//! and a plan quota spent through one proxy holds on another.

mod support;

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_config::settings::{UsageSettings, UsageStoreKind};
use agora_usage::clickhouse::ClickHouseStore;
use agora_usage::local_server::LocalClickHouse;
use agora_usage::{Aggregate, Scope, TimeRange};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::*;
use uuid::Uuid;

fn clickhouse(dir: &std::path::Path) -> LocalClickHouse {
    LocalClickHouse::start(dir).unwrap_or_else(|e| {
        panic!("the metering tests need a ClickHouse server and could not start one: {e:#}")
    })
}

fn usage_settings(server: &LocalClickHouse) -> (UsageSettings, String) {
    let database = format!("agora_t_{}", Uuid::new_v4().simple());
    let settings = UsageSettings {
        store: UsageStoreKind::Clickhouse,
        clickhouse_url: Some(server.url()),
        clickhouse_database: database.clone(),
        ..UsageSettings::default()
    };
    (settings, database)
}

/// The token counts the runtime put in an answer: the last `"usage"` object.
fn tokens_in(text: &str) -> (u64, u64) {
    let at = text.rfind("\"usage\":").expect("the runtime reports usage") + "\"usage\":".len();
    let usage: Value = serde_json::Deserializer::from_str(&text[at..])
        .into_iter::<Value>()
        .next()
        .unwrap()
        .unwrap();
    (
        usage["input_tokens"].as_u64().unwrap(),
        usage["output_tokens"].as_u64().unwrap(),
    )
}

fn all_time() -> TimeRange {
    TimeRange {
        from_ms: 0,
        to_ms: i64::MAX / 2,
    }
}

async fn totals(store: &ClickHouseStore, config: Uuid) -> Aggregate {
    agora_usage::totals(store, Scope::Config(config), all_time())
        .await
        .unwrap_or_else(|e| panic!("reading usage from ClickHouse: {e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_lands_once_with_exact_token_sums() {
    let ch_dir = tempfile::tempdir().unwrap();
    let server = clickhouse(ch_dir.path());
    let (usage, database) = usage_settings(&server);
    let mut w = World::start_with(Duration::ZERO, Some(usage)).await;
    let (config, key) = w
        .subscription(
            "Document Summarizer",
            json!({"name": "Metered", "price_cents": 0, "requests_per_minute": 1000000, "burst": 100000}),
            json!({"name": "metered"}),
        )
        .await;

    let (mut input, mut output) = (0u64, 0u64);
    let mut request_ids = Vec::new();
    for i in 0..30 {
        let text = format!("question {i}: {}", "word ".repeat(i % 7));
        let r = if i % 3 == 0 {
            w.stream(&key, &text).await
        } else {
            w.invoke(&key, json!({"input_value": text})).await
        };
        assert_eq!(r.status(), StatusCode::OK);
        request_ids.push(
            r.headers()["x-agora-request-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
        let (i, o) = tokens_in(&r.text().await.unwrap());
        input += i;
        output += o;
    }
    // Refusals are requests too: bad bodies reach no runtime and carry no tokens.
    for _ in 0..4 {
        let r = w.invoke(&key, json!({"input_value": 5})).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }
    // A runtime report for a run whose answer already carried usage changes nothing.
    let r = w
        .http
        .post(format!("{}/api/agent-gateway/usage/", w.proxy_url))
        .header("x-runtime-secret", "runtime-secret-for-tests")
        .json(&json!({"request_id": request_ids[0], "input_tokens": 999, "output_tokens": 999}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    w.stop_proxy().await;

    let store = ClickHouseStore::new(&server.url(), &database, None, None);
    let t = totals(&store, config).await;
    assert_eq!(t.requests, 34);
    assert_eq!(t.errors, 4);
    assert_eq!(t.billable_requests, 30);
    assert_eq!((t.input_tokens, t.output_tokens), (input, output));
    assert!(input > 30, "the runs reported tokens");
    assert_eq!(t.estimated_requests, 0);
    assert_eq!(t.buyers, 1);
    assert!(t.latency_p50_us > 0 && t.latency_p95_us >= t.latency_p50_us);

    // The buyer reads the same numbers through the control plane.
    let (s, body) = w
        .cp(
            reqwest::Method::GET,
            &w.info.buyer_token,
            &format!("/api/customer-agent-configs/{config}/usage/?interval=day"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["totals"]["requests"], 34, "{body}");
    assert_eq!(body["totals"]["input_tokens"], input, "{body}");
    assert_eq!(body["totals"]["output_tokens"], output, "{body}");
    w.finish().await;
}

/// Invokes as fast as `workers` clients can until `stop`; counts the answers.
fn load(
    w: &World,
    key: &str,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..workers)
        .map(|n| {
            let (http, url, key, stop) = (
                w.http.clone(),
                w.proxy_url.clone(),
                key.to_owned(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut answered = 0;
                while !stop.load(Ordering::Relaxed) {
                    let r = http
                        .post(format!("{url}/api/agent-gateway/invoke/"))
                        .bearer_auth(&key)
                        .json(&json!({"input_value": format!("load {n}")}))
                        .send()
                        .await
                        .expect("the proxy answers");
                    assert_eq!(r.status(), StatusCode::OK);
                    r.bytes().await.unwrap();
                    answered += 1;
                }
                answered
            })
        })
        .collect()
}

async fn health(w: &World) -> Value {
    health_of(&w.http, &w.proxy_url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clickhouse_outage_under_load_loses_nothing() {
    let ch_dir = tempfile::tempdir().unwrap();
    let mut server = clickhouse(ch_dir.path());
    let (usage, database) = usage_settings(&server);
    let mut w = World::start_with(Duration::ZERO, Some(usage)).await;
    let (config, key) = w
        .subscription(
            "Document Summarizer",
            json!({"name": "Load", "price_cents": 0, "requests_per_minute": 1000000, "burst": 100000}),
            json!({"name": "load"}),
        )
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&w, &key, 4, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    tokio::task::block_in_place(|| server.stop());
    // While ClickHouse is away, health and metrics say so and the log grows.
    let h = eventually_within(
        Duration::from_secs(20),
        "health shows the outage",
        || async {
            let h = health(&w).await;
            let store = &h["usage"]["store"];
            (store["status"] == "failing" && store["spill_bytes"].as_u64().unwrap() > 0)
                .then_some(h)
        },
    )
    .await;
    assert_eq!(h["usage"]["store"]["kind"], "clickhouse");
    assert!(w
        .metrics()
        .await
        .contains("agora_proxy_usage_store_failing 1"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tokio::task::block_in_place(|| server.resume()).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut answered = 0;
    for worker in workers {
        answered += worker.await.unwrap();
    }
    w.stop_proxy().await;

    assert!(answered > 50, "the load ran ({answered} answers)");
    let store = ClickHouseStore::new(&server.url(), &database, None, None);
    let t = totals(&store, config).await;
    assert_eq!(
        t.requests, answered,
        "every answered request is stored once"
    );
    assert_eq!(t.billable_requests, answered);
    w.finish().await;
}

/// `agora proxy` as a process against the world's control plane and ClickHouse.
struct ProxyProcess {
    child: Child,
    url: String,
}

fn spawn_proxy(
    w: &World,
    server_url: &str,
    database: &str,
    data_dir: &std::path::Path,
) -> ProxyProcess {
    let (child, url, _) = spawn_agora_proxy(
        &w.cp_url,
        data_dir,
        &[
            ("AGORA_CONTROL_PLANE__PROXY_SECRET", SECRET),
            ("AGORA_RUNTIME__API_KEY", &w.runtime_key),
            ("AGORA_USAGE__STORE", "clickhouse"),
            ("AGORA_USAGE__CLICKHOUSE_URL", server_url),
            ("AGORA_USAGE__CLICKHOUSE_DATABASE", database),
            ("AGORA_PROXY__GRACE_PERIOD_MS", "10000"),
            ("AGORA_PROXY__TENANT_REQUESTS_PER_SECOND", "1000000"),
            ("AGORA_PROXY__TENANT_BURST", "1000000"),
        ],
    );
    ProxyProcess { child, url }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        // A failed test must not leave a proxy behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl ProxyProcess {
    async fn wait_for_key(&self, http: &reqwest::Client, key: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = http
                .get(format!("{}/api/agent-gateway/validate/", self.url))
                .bearer_auth(key)
                .send()
                .await;
            if r.is_ok_and(|r| r.status() == StatusCode::OK) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy process never learned the key"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([name, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the proxy process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_stores_every_served_request() {
    let ch_dir = tempfile::tempdir().unwrap();
    let server = clickhouse(ch_dir.path());
    let (usage, database) = usage_settings(&server);
    let w = World::start_with(Duration::ZERO, Some(usage)).await;
    let (config, key) = w
        .subscription(
            "Document Summarizer",
            json!({"name": "Term", "price_cents": 0, "requests_per_minute": 1000000, "burst": 100000}),
            json!({"name": "term"}),
        )
        .await;
    let data = tempfile::tempdir().unwrap();
    let mut proxy = spawn_proxy(&w, &server.url(), &database, data.path());
    proxy.wait_for_key(&w.http, &key).await;

    // Four clients invoke until the proxy turns them away.
    let served = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|n| {
            let (http, url, key, served) = (
                w.http.clone(),
                proxy.url.clone(),
                key.clone(),
                served.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let sent = http
                        .post(format!("{url}/api/agent-gateway/invoke/"))
                        .bearer_auth(&key)
                        .json(&json!({"input_value": format!("term {n}")}))
                        .send()
                        .await;
                    let Ok(r) = sent else { return };
                    let status = r.status();
                    if status != StatusCode::OK {
                        // Draining: new invokes get 503 (before any key check).
                        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
                        return;
                    }
                    if r.bytes().await.is_err() {
                        return;
                    }
                    served.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    proxy.signal("-TERM");
    for c in clients {
        c.await.unwrap();
    }
    let status = tokio::task::block_in_place(|| proxy.wait(Duration::from_secs(30)));
    assert!(status.success(), "{status}");

    let served = served.load(Ordering::SeqCst);
    assert!(served > 20, "the load ran ({served} served)");
    let store = ClickHouseStore::new(&server.url(), &database, None, None);
    let t = totals(&store, config).await;
    assert_eq!(
        t.billable_requests, served,
        "every served request is stored"
    );
    assert_eq!(t.requests, served, "{t:?}");
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_that_reached_the_spill_log() {
    let ch_dir = tempfile::tempdir().unwrap();
    let mut server = clickhouse(ch_dir.path());
    let (usage, database) = usage_settings(&server);
    let w = World::start_with(Duration::ZERO, Some(usage)).await;
    let (config, key) = w
        .subscription(
            "Document Summarizer",
            json!({"name": "Kill", "price_cents": 0, "requests_per_minute": 1000000, "burst": 100000}),
            json!({"name": "kill"}),
        )
        .await;
    let data = tempfile::tempdir().unwrap();
    let mut proxy = spawn_proxy(&w, &server.url(), &database, data.path());
    proxy.wait_for_key(&w.http, &key).await;

    // ClickHouse goes away, so the events can only be in the spill log.
    tokio::task::block_in_place(|| server.stop());
    let n = 25;
    for i in 0..n {
        let r = w
            .http
            .post(format!("{}/api/agent-gateway/invoke/", proxy.url))
            .bearer_auth(&key)
            .json(&json!({"input_value": format!("kill {i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.bytes().await.unwrap();
    }
    // The documented bound: what was answered more than usage.batch_max_ms (50 ms)
    // before the kill is in the log. Wait well past it, then SIGKILL.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.signal("-KILL");
    tokio::task::block_in_place(|| proxy.wait(Duration::from_secs(10)));
    let spill = data.path().join("usage-spill.log");
    assert!(
        std::fs::metadata(&spill).unwrap().len() > 0,
        "the events are in the spill log"
    );
    // A torn write at the end of the log: recovered up to the damage, reported.
    let torn = [0x40u8, 0, 0, 0, 1, 2, 3, 4, 5, 6];
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&spill)
        .unwrap();
    std::io::Write::write_all(&mut file, &torn).unwrap();
    drop(file);

    // ClickHouse returns; a new proxy on the same data directory ships the log.
    tokio::task::block_in_place(|| server.resume()).unwrap();
    let mut second = spawn_proxy(&w, &server.url(), &database, data.path());
    let store = ClickHouseStore::new(&server.url(), &database, None, None);
    eventually_within(
        Duration::from_secs(20),
        "the spilled events arrive",
        || async {
            let t = totals(&store, config).await;
            assert!(t.requests <= n, "counted twice: {t:?}");
            (t.requests == n).then_some(())
        },
    )
    .await;
    let h = health_of(&w.http, &second.url).await;
    assert_eq!(
        h["usage"]["store"]["spill_damaged_bytes"],
        torn.len(),
        "{h}"
    );
    let moved: Vec<_> = std::fs::read_dir(data.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".damaged-"))
        .collect();
    assert_eq!(moved.len(), 1, "the damaged bytes were moved aside");
    assert_eq!(std::fs::read(moved[0].path()).unwrap(), torn);
    second.signal("-TERM");
    tokio::task::block_in_place(|| second.wait(Duration::from_secs(30)));
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_client_cuts_is_metered_for_what_was_delivered() {
    let ch_dir = tempfile::tempdir().unwrap();
    let server = clickhouse(ch_dir.path());
    let (usage, database) = usage_settings(&server);
    let mut w = World::start_with(Duration::from_millis(200), Some(usage)).await;
    let (config, key) = w
        .subscription(
            "Document Summarizer",
            json!({"name": "Cut", "price_cents": 0, "requests_per_minute": 1000, "burst": 100}),
            json!({"name": "cut"}),
        )
        .await;
    let r = w.stream(&key, "cut me off after the first words").await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut stream = futures_util::StreamExt::boxed(r.bytes_stream());
    let first = futures_util::StreamExt::next(&mut stream)
        .await
        .unwrap()
        .unwrap();
    let delivered = first.len() as u64;
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.stats.cancelled() < 1 {
        assert!(
            Instant::now() < deadline,
            "the runtime never saw the cancellation"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    w.stop_proxy().await;

    // The one event, as stored: cancelled, tokens estimated with the tokenizer from
    // the input text and the answer text streamed before the cut, never from the
    // bytes of the envelope.
    let rows = reqwest::Client::new()
        .post(server.url())
        .query(&[("database", database.as_str())])
        .body(format!(
            "SELECT status, token_source, bytes_out, input_tokens, output_tokens FROM usage_events \
             WHERE config = toUUID('{config}') AND route = '/api/agent-gateway/invoke/' \
             FORMAT JSONEachRow"
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let rows: Vec<Value> = rows
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row["status"], "cancelled", "{row}");
    assert_eq!(row["token_source"], "estimated", "{row}");
    // ClickHouse may write UInt64 as a JSON string.
    let number = |v: &Value| -> u64 {
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .unwrap()
    };
    let (bytes_out, output) = (number(&row["bytes_out"]), number(&row["output_tokens"]));
    assert!(bytes_out >= delivered, "{bytes_out} < {delivered}");
    // "cut me off after the first words": seven tokens in o200k_base.
    assert_eq!(number(&row["input_tokens"]), 7, "{row}");
    // At most the answer's words ("ECHO: cut me off after the first words").
    assert!(output <= 10 && output < bytes_out / 40, "{row}");
    let t = totals(
        &ClickHouseStore::new(&server.url(), &database, None, None),
        config,
    )
    .await;
    assert_eq!((t.requests, t.billable_requests, t.errors), (1, 1, 0));
    assert_eq!(t.estimated_requests, 1);
    w.finish().await;
}

/// The quota count the control plane's snapshot carries for `config`, and the revision.
async fn snapshot_quota(w: &World, config: Uuid) -> (Value, u64) {
    let snapshot: Value = w
        .http
        .get(format!("{}/internal/v1/snapshot", w.cp_url))
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        snapshot["routes"][config.to_string()]["quota"].clone(),
        snapshot["revision"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_spent_through_one_proxy_holds_on_another() {
    let ch_dir = tempfile::tempdir().unwrap();
    let server = clickhouse(ch_dir.path());
    let (usage, database) = usage_settings(&server);
    let w = World::start_with(Duration::ZERO, Some(usage)).await;
    let (config, key) = w
        .subscription(
            "Document Summarizer",
            json!({"name": "Five a month", "price_cents": 0, "request_quota": 5,
                   "requests_per_minute": 1000000, "burst": 100000}),
            json!({"name": "quota"}),
        )
        .await;

    // Three runs through the first proxy; a refused body is not billable.
    let mut tokens = 0;
    for i in 0..3 {
        let r = w
            .invoke(&key, json!({"input_value": format!("run {i}")}))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let (input, output) = tokens_in(&r.text().await.unwrap());
        tokens += input + output;
    }
    let r = w.invoke(&key, json!({"input_value": 5})).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // The control plane counts them from the store into the snapshot.
    let quota = eventually_within(
        Duration::from_secs(20),
        "the count reaches the snapshot",
        || async {
            let (quota, _) = snapshot_quota(&w, config).await;
            (quota["requests"] == 3 && quota["tokens"] == tokens).then_some(quota)
        },
    )
    .await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let (start, end) = (
        quota["period_start_ms"].as_i64().unwrap(),
        quota["period_end_ms"].as_i64().unwrap(),
    );
    assert!(start <= now_ms && now_ms < end, "{quota}");
    assert!(
        (28..=31).contains(&((end - start) / 86_400_000)),
        "a calendar month: {quota}"
    );

    // A second proxy, which served none of them, allows only what is left.
    let data = tempfile::tempdir().unwrap();
    let other = spawn_proxy(&w, &server.url(), &database, data.path());
    other.wait_for_key(&w.http, &key).await;
    let invoke_other = || {
        w.http
            .post(format!("{}/api/agent-gateway/invoke/", other.url))
            .bearer_auth(&key)
            .json(&json!({"input_value": "through the other proxy"}))
            .send()
    };
    for _ in 0..2 {
        assert_eq!(invoke_other().await.unwrap().status(), StatusCode::OK);
    }
    let refused = invoke_other().await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: i64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry_after > 0 && retry_after <= (end - now_ms) / 1000 + 1,
        "Retry-After points at the period's end: {retry_after}"
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");

    // The first proxy, once the new count arrives, refuses too: 5 of 5 are used.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (quota, revision) = snapshot_quota(&w, config).await;
        let served = health(&w).await["snapshot"]["revision"]
            .as_u64()
            .unwrap_or(0);
        if quota["requests"] == 5 && served >= revision {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first proxy never received the count of 5: {quota}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = w.invoke(&key, json!({"input_value": "one more"})).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    drop(other);
    w.finish().await;
}
