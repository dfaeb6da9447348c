//! What the end-to-end tests share: a control plane on a fresh Postgres database,
//! the demo runtime behind a recording TCP relay, and the Pingora proxy, all on
//! OS-chosen ports. Nothing here sleeps to wait for readiness: it polls.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agora_control_plane::demo::{self, BuiltInRuntime};
use agora_control_plane::AppState;
use agora_proxy::usage::LogSink;
use agora_proxy::Metering;
use agora_proxy::{ProxyConfig, Running};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

pub const SECRET: &str = "proxy-secret-for-tests";

#[allow(unused_imports)]
pub use agora_testkit::{eventually, eventually_within};

/// Server-to-client bytes of every connection the relay carried.
pub type Recorded = Arc<Mutex<Vec<Vec<u8>>>>;

/// A TCP relay in front of the runtime that records what the runtime sends.
pub async fn relay(target: std::net::SocketAddr) -> (String, Recorded) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let recorded: Recorded = Arc::default();
    let rec = recorded.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let rec = rec.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let index = {
                    let mut all = rec.lock().unwrap();
                    all.push(Vec::new());
                    all.len() - 1
                };
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = tokio::io::copy(&mut cr, &mut sw);
                let down = async {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        rec.lock().unwrap()[index].extend_from_slice(&buf[..n]);
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = cw.shutdown().await;
                };
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    (format!("http://{addr}"), recorded)
}

pub struct World {
    pub cp_url: String,
    pub cp_addr: std::net::SocketAddr,
    pub state: AppState,
    pub stop_cp: Option<tokio::sync::oneshot::Sender<()>>,
    pub cp_task: Option<tokio::task::JoinHandle<()>>,
    pub stats: Arc<agora_runtime::RunStats>,
    pub runtime_task: tokio::task::JoinHandle<()>,
    pub recorded: Recorded,
    pub proxy: Option<Running>,
    pub proxy_url: String,
    pub http: reqwest::Client,
    pub info: demo::DemoInfo,
    pub dir: tempfile::TempDir,
    database: Option<agora_testkit::TestDatabase>,
    pub settings: agora_config::settings::Settings,
    pub runtime_key: String,
    /// The local Stripe, when the world bills.
    pub stripe: Option<agora_stripe_local::LocalStripe>,
}

/// How a world bills: through a local Stripe whose events reach its control
/// plane.
#[derive(Clone, Debug)]
pub struct Billed {
    /// How long `past_due` keeps working.
    pub grace_secs: u64,
    pub report_window_secs: u64,
    pub report_every_ms: u64,
}

pub async fn start_cp(
    state: AppState,
    listener: tokio::net::TcpListener,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        agora_control_plane::serve(listener, state, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (tx, task)
}

pub fn proxy_config(w_dir: &std::path::Path, cp_url: &str, runtime_key: &str) -> ProxyConfig {
    let mut settings = agora_config::settings::Settings {
        data_dir: w_dir.to_owned(),
        ..Default::default()
    };
    settings.proxy.listen = "127.0.0.1:0".into();
    settings.proxy.admin_listen = "127.0.0.1:0".into();
    settings.proxy.grace_period_ms = 5_000;
    let mut config = ProxyConfig::from_settings(&settings).unwrap();
    config.control_plane_url = cp_url.to_owned();
    config.proxy_secret = Some(SECRET.to_owned().into());
    config.runtime_api_key = Some(runtime_key.to_owned().into());
    config.runtime_secret = Some("runtime-secret-for-tests".to_owned().into());
    config.handle_signals = false;
    config.work_stealing = true;
    config
}

impl World {
    pub async fn start(token_delay: Duration) -> World {
        World::start_with(token_delay, None).await
    }

    /// With `usage`, both planes use that usage store and the proxy its spill log
    /// (under the world's directory); without, the proxy counts usage in memory.
    pub async fn start_with(
        token_delay: Duration,
        usage: Option<agora_config::settings::UsageSettings>,
    ) -> World {
        World::start_on(None, token_delay, usage).await
    }

    /// On `runtime` (a Langflow's base URL and API key) instead of the demo
    /// runtime, when given.
    pub async fn start_on(
        runtime: Option<(String, String)>,
        token_delay: Duration,
        usage: Option<agora_config::settings::UsageSettings>,
    ) -> World {
        World::start_full(runtime, token_delay, usage, None).await
    }

    /// With billing through a local Stripe, and `usage` as [`World::start_with`].
    pub async fn start_billed(
        usage: Option<agora_config::settings::UsageSettings>,
        billed: Billed,
    ) -> World {
        World::start_full(None, Duration::ZERO, usage, Some(billed)).await
    }

    pub async fn start_full(
        runtime: Option<(String, String)>,
        token_delay: Duration,
        usage: Option<agora_config::settings::UsageSettings>,
        billed: Option<Billed>,
    ) -> World {
        World::start_serving(runtime, token_delay, usage, billed, Default::default()).await
    }

    /// With the gateways serving widget visitors as `widget` says.
    pub async fn start_serving(
        runtime: Option<(String, String)>,
        token_delay: Duration,
        usage: Option<agora_config::settings::UsageSettings>,
        billed: Option<Billed>,
        widget: agora_config::settings::WidgetServing,
    ) -> World {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let database = agora_testkit::TestDatabase::create().await;
        let url = database.url.clone();

        let dir = tempfile::tempdir().unwrap();
        let mut settings = agora_config::settings::Settings {
            data_dir: dir.path().to_owned(),
            ..Default::default()
        };
        settings.control_plane.database_url = Some(url);
        settings.control_plane.proxy_secret = Some(SECRET.to_owned().into());
        let metered = usage.is_some();
        if let Some(usage) = usage {
            settings.usage = usage;
            // Quota counts reach the proxies within a test's patience.
            settings.control_plane.quota_count_ms = 200;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cp_addr = listener.local_addr().unwrap();
        let cp_url = format!("http://{cp_addr}");
        let stripe = match billed {
            Some(billed) => {
                let webhook =
                    agora_stripe_local::WebhookTarget::new(format!("{cp_url}/api/stripe/webhook/"));
                let stripe = agora_stripe_local::start(
                    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
                    agora_stripe_local::Options {
                        webhooks: vec![webhook],
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
                let st = &mut settings.stripe;
                st.api_base = stripe.url();
                st.secret_key = Some(stripe.secret_key().to_owned().into());
                st.publishable_key = Some(stripe.publishable_key().to_owned());
                st.webhook_secret = stripe.webhook_secret().map(|s| s.to_owned().into());
                st.allowed_redirect_hosts = vec!["shop.example".into()];
                st.past_due_grace_secs = billed.grace_secs;
                st.report_window_secs = billed.report_window_secs;
                st.report_every_ms = billed.report_every_ms;
                Some(stripe)
            }
            None => None,
        };
        let mut state = AppState::from_settings(&settings).await.unwrap();

        // The demo runtime, reached through a recording relay; or the one given.
        let (runtime_url, runtime_key, stats, runtime_task, recorded) = match runtime {
            Some((url, key)) => (
                url,
                key,
                Arc::default(),
                tokio::spawn(async {}),
                Recorded::default(),
            ),
            None => {
                let runtime_key = format!("rt-{}", Uuid::new_v4().simple());
                let mut rc = agora_runtime::RuntimeConfig::new(runtime_key.clone());
                rc.token_delay = token_delay;
                let runtime = agora_runtime::DemoRuntime::new(rc);
                let stats = runtime.stats();
                let rt_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let rt_addr = rt_listener.local_addr().unwrap();
                let runtime_task = tokio::spawn(async move {
                    let _ = runtime.serve(rt_listener).await;
                });
                let (runtime_url, recorded) = relay(rt_addr).await;
                (runtime_url, runtime_key, stats, runtime_task, recorded)
            }
        };
        state.runtime = Some(
            agora_control_plane::runtime::RuntimeClient::new(
                &runtime_url,
                runtime_key.clone().into(),
                Duration::from_secs(60),
            )
            .unwrap(),
        );

        let built_in = BuiltInRuntime {
            url: runtime_url.clone(),
            api_key: runtime_key.clone(),
        };
        let info = demo::ensure(&state, dir.path(), &cp_url, Some(&built_in), None)
            .await
            .unwrap();
        let (stop_cp, cp_task) = start_cp(state.clone(), listener).await;

        let mut config = proxy_config(dir.path(), &cp_url, &runtime_key);
        config.widget = widget;
        if metered {
            // Metering tests drive load through one tenant.
            config.tenant_requests_per_second = 1_000_000;
            config.tenant_burst = 1_000_000;
        }
        let metering = if metered {
            agora_proxy::open_metering(&settings).await.unwrap()
        } else {
            Metering::Sink(Arc::new(LogSink::default()))
        };
        let proxy =
            tokio::task::spawn_blocking(move || agora_proxy::start(config, metering).unwrap())
                .await
                .unwrap();
        let proxy_url = format!("http://{}", proxy.addr);
        state.set_gateway_url(&proxy_url);
        let world = World {
            cp_url,
            cp_addr,
            state,
            stop_cp: Some(stop_cp),
            cp_task: Some(cp_task),
            stats,
            runtime_task,
            recorded,
            proxy: Some(proxy),
            proxy_url,
            http: reqwest::Client::new(),
            info,
            dir,
            database: Some(database),
            settings,
            runtime_key,
            stripe,
        };
        world.wait_ready().await;
        world
    }

    /// Polls health until the proxy serves the control plane's current snapshot.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let health = self
                .http
                .get(format!("{}/api/agent-gateway/health/", self.proxy_url))
                .send()
                .await;
            if let Ok(r) = health {
                let body: Value = r.json().await.unwrap_or_default();
                if body["status"] == "ok" {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "proxy never became ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn proxy(&self) -> &Running {
        self.proxy.as_ref().unwrap()
    }

    pub async fn invoke(&self, key: &str, body: Value) -> reqwest::Response {
        let auth = format!("Bearer {key}");
        self.invoke_with("", &[("authorization", &auth)], body)
            .await
            .unwrap()
    }

    /// `POST invoke/{query}` with exactly these headers.
    pub async fn invoke_with(
        &self,
        query: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> reqwest::Result<reqwest::Response> {
        let mut req = self
            .http
            .post(format!(
                "{}/api/agent-gateway/invoke/{query}",
                self.proxy_url
            ))
            .json(&body);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.send().await
    }

    /// A streamed invoke of `text`.
    pub async fn stream(&self, key: &str, text: &str) -> reqwest::Response {
        let auth = format!("Bearer {key}");
        self.invoke_with(
            "?stream=true",
            &[("authorization", &auth)],
            json!({"input_value": text}),
        )
        .await
        .unwrap()
    }

    pub async fn validate(&self, key: &str) -> reqwest::Response {
        self.http
            .get(format!("{}/api/agent-gateway/validate/", self.proxy_url))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
    }

    pub async fn cp(
        &self,
        method: reqwest::Method,
        token: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.cp_url))
            .header("authorization", format!("Token {token}"));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn agent(&self, name: &str) -> Uuid {
        let (_, agents) = self
            .cp(
                reqwest::Method::GET,
                &self.info.provider_token,
                "/api/provider-agents/",
                None,
            )
            .await;
        agents["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap_or_else(|| panic!("no agent {name}: {agents}"))["uuid"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The runtime flow id `agent` was provisioned as.
    pub async fn agent_flow_id(&self, name: &str) -> String {
        let agent = self.agent(name).await;
        let (_, body) = self
            .cp(
                reqwest::Method::GET,
                &self.info.provider_token,
                &format!("/api/provider-agents/{agent}/"),
                None,
            )
            .await;
        body["runtime_flow_id"].as_str().unwrap().to_owned()
    }

    /// A free plan on `agent` with room for a test's requests, the demo buyer's
    /// order of it, and a key named `name`.
    pub async fn free_subscription(&self, agent: &str, name: &str) -> (Uuid, String) {
        self.subscription(
            agent,
            json!({"name": name, "price_cents": 0, "requests_per_minute": 1000, "burst": 100}),
            json!({"name": name}),
        )
        .await
    }

    /// Creates agent `name` for the provider holding `token`, imports `flow`,
    /// adds a free plan and tries to publish it: the agent, and publish's answer.
    pub async fn publish_flow(
        &self,
        token: &str,
        name: &str,
        flow: &Value,
    ) -> (String, StatusCode, Value) {
        let post = reqwest::Method::POST;
        let (s, agent) = self
            .cp(
                post.clone(),
                token,
                "/api/provider-agents/",
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{agent}");
        let agent = agent["uuid"].as_str().unwrap().to_owned();
        let (s, body) = self
            .cp(
                post.clone(),
                token,
                &format!("/api/provider-agents/{agent}/import_flow/"),
                Some(flow.clone()),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let (s, plan) = self
            .cp(
                post.clone(),
                token,
                &format!("/api/provider-agents/{agent}/plans/"),
                Some(json!({"name": "Free", "price_cents": 0})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{plan}");
        let (s, body) = self
            .cp(
                post,
                token,
                &format!("/api/provider-agents/{agent}/publish/"),
                Some(json!({})),
            )
            .await;
        (agent, s, body)
    }

    /// A new plan on `agent`, a buyer order of it, and a key for the new config.
    pub async fn subscription(&self, agent: &str, plan: Value, key: Value) -> (Uuid, String) {
        let agent = self.agent(agent).await;
        let (s, plan) = self
            .cp(
                reqwest::Method::POST,
                &self.info.provider_token,
                &format!("/api/provider-agents/{agent}/plans/"),
                Some(plan),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{plan}");
        let (s, order) = self
            .cp(
                reqwest::Method::POST,
                &self.info.buyer_token,
                "/api/marketplace-orders/",
                Some(json!({"offering": agent, "plan": plan["uuid"]})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{order}");
        let config: Uuid = order["config"].as_str().unwrap().parse().unwrap();
        let (s, issued) = self
            .cp(
                reqwest::Method::POST,
                &self.info.buyer_token,
                &format!("/api/customer-agent-configs/{config}/api_keys/"),
                Some(key),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{issued}");
        let key = issued["key"].as_str().unwrap().to_owned();
        self.wait_for_key(&key).await;
        (config, key)
    }

    /// Polls validate until the proxy knows `key`.
    pub async fn wait_for_key(&self, key: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = self.validate(key).await;
            if r.status() == StatusCode::OK {
                return;
            }
            assert!(Instant::now() < deadline, "the proxy never learned the key");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("http://{}/metrics", self.proxy().admin_addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn stop_proxy(&mut self) {
        if let Some(proxy) = self.proxy.take() {
            tokio::task::spawn_blocking(move || proxy.shutdown())
                .await
                .unwrap();
        }
    }

    pub async fn stop_cp(&mut self) {
        if let Some(stop) = self.stop_cp.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.cp_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
    }

    pub async fn finish(mut self) {
        self.stop_proxy().await;
        if let Some(stripe) = self.stripe.take() {
            stripe.shutdown().await;
        }
        self.stop_cp().await;
        self.runtime_task.abort();
        self.state.db.pool.close().await;
        if let Some(database) = self.database.take() {
            database.drop().await;
        }
        drop(self.dir);
    }
}

/// Health of the gateway at `base_url`.
pub async fn health_of(http: &reqwest::Client, base_url: &str) -> Value {
    http.get(format!("{base_url}/api/agent-gateway/health/"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `agora proxy` as a process on free ports, fed by `control_plane_url`, keeping its
/// state in `data_dir`, with none of the caller's `AGORA_*` variables but `env`.
/// Returns the child and the gateway's and metrics' URLs, once it prints them.
pub fn spawn_agora_proxy(
    control_plane_url: &str,
    data_dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (std::process::Child, String, String) {
    use std::io::BufRead as _;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_agora"));
    cmd.args([
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--control-plane-url",
        control_plane_url,
        "--data-dir",
    ])
    .arg(data_dir)
    .stdout(std::process::Stdio::piped())
    .stderr(if std::env::var_os("TEST_PROXY_STDERR").is_some() {
        std::process::Stdio::inherit()
    } else {
        std::process::Stdio::null()
    });
    for (name, _) in std::env::vars() {
        if name.starts_with("AGORA_") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let (mut proxy, mut metrics) = (None, None);
    while proxy.is_none() || metrics.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("agora proxy prints its addresses");
        if let Some(url) = line.strip_prefix("proxy listening on ") {
            proxy = Some(url.to_owned());
        }
        if let Some(url) = line.strip_prefix("metrics on ") {
            metrics = Some(url.to_owned());
        }
    }
    (child, proxy.unwrap(), metrics.unwrap())
}

impl World {
    /// A GET on the demo runtime's own API (Langflow's), with its key.
    pub async fn runtime_get(&self, path: &str) -> Value {
        let url = self.info.runtime_url.as_deref().expect("a demo runtime");
        self.http
            .get(format!("{url}{path}"))
            .header("x-api-key", &self.runtime_key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The buyer's usage view of `config` (the last 24 hours).
    pub async fn config_usage(&self, config: Uuid) -> Value {
        let (s, body) = self
            .cp(
                reqwest::Method::GET,
                &self.info.buyer_token,
                &format!("/api/customer-agent-configs/{config}/usage/"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        body["totals"].clone()
    }

    /// A GET on the gateway: its status and JSON body (null if none).
    pub async fn gateway_get(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.proxy_url))
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A usage report from the runtime to the gateway.
    pub async fn report_usage(&self, body: Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(format!("{}/api/agent-gateway/usage/", self.proxy_url))
            .header("x-runtime-secret", "runtime-secret-for-tests")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}
