//! Test harness: a real control plane on an OS-chosen port over a fresh
//! database (a uuid-named Postgres database, or a SQLite file), and a fake
//! Langflow runtime that answers flow creation as the captured one does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agora_config::settings::Settings;
use agora_control_plane::domain::OrgKind;
use agora_control_plane::runtime::RuntimeClient;
use agora_control_plane::{identity, AppState};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

pub use agora_testkit::eventually;

pub struct TestApp {
    pub url: String,
    settings: Settings,
    pub state: AppState,
    pub http: reqwest::Client,
    database: Option<agora_testkit::TestDatabase>,
    _tmp: Option<tempdir::TempDir>,
}

mod tempdir {
    pub struct TempDir(pub std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub struct Tenant {
    pub user: Uuid,
    pub org: Uuid,
    pub token: String,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, None, |_| {}).await
    }

    pub async fn spawn_with(
        backend: Backend,
        runtime: Option<RuntimeClient>,
        adjust: impl FnOnce(&mut Settings),
    ) -> TestApp {
        // Files the control plane keeps (the SQLite database, the usage store)
        // live in a directory of this test's own.
        let dir = std::env::temp_dir().join(format!("agora-test-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut settings = Settings {
            data_dir: dir.clone(),
            ..Settings::default()
        };
        let (url, database) = match backend {
            Backend::Postgres => {
                let database = agora_testkit::TestDatabase::create().await;
                (database.url.clone(), Some(database))
            }
            Backend::Sqlite => (
                format!("sqlite://{}?mode=rwc", dir.join("agora.db").display()),
                None,
            ),
        };
        settings.control_plane.database_url = Some(url);
        settings.control_plane.db_max_connections = 5;
        adjust(&mut settings);
        let (url, state) = serve(&settings, runtime).await;
        TestApp {
            url,
            settings,
            state,
            http: reqwest::Client::new(),
            database,
            _tmp: Some(tempdir::TempDir(dir)),
        }
    }

    /// The settings this app started with.
    pub fn settings(&self) -> Settings {
        self.settings.clone()
    }

    /// Another replica of the control plane on the same database.
    pub async fn replica(&self) -> TestApp {
        let (url, state) = serve(&self.settings, self.state.runtime.clone()).await;
        TestApp {
            url,
            settings: self.settings.clone(),
            state,
            http: reqwest::Client::new(),
            database: None,
            _tmp: None,
        }
    }

    /// Drops the test database (Postgres). Tests that fail leave theirs for
    /// the test command to sweep.
    pub async fn finish(self) {
        self.state.db.pool.close().await;
        if let Some(database) = self.database {
            database.drop().await;
        }
    }

    /// A new user owning a new organisation of `kind`, with a token.
    pub async fn tenant(&self, name: &str, kind: OrgKind) -> Tenant {
        let db = &self.state.db;
        let user = identity::create_user(
            db,
            &format!("{name}-{}", Uuid::new_v4().simple()),
            "t@example.com",
            "correct-horse-7",
            false,
        )
        .await
        .unwrap();
        let org = identity::create_org(db, name, kind, "", user)
            .await
            .unwrap();
        let token = identity::create_token(db, user).await.unwrap();
        Tenant { user, org, token }
    }

    pub async fn call(
        &self,
        method: &str,
        token: Option<&str>,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Token {t}"));
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        decode(resp).await
    }

    pub async fn get(&self, token: &str, path: &str) -> (StatusCode, Value) {
        self.call("GET", Some(token), path, None).await
    }

    pub async fn post(&self, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
        self.call("POST", Some(token), path, Some(body)).await
    }

    pub async fn patch(&self, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
        self.call("PATCH", Some(token), path, Some(body)).await
    }

    pub async fn post_raw(
        &self,
        token: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .header("Authorization", format!("Token {token}"))
            .header("Content-Type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        decode(resp).await
    }

    /// A published agent with a free and a paid plan, owned by `provider`.
    /// Returns (agent, free plan, paid plan).
    pub async fn published_agent(&self, provider: &Tenant) -> (Uuid, Uuid, Uuid) {
        let (s, agent) = self
            .post(
                &provider.token,
                "/api/provider-agents/",
                json!({"name": "Helper Bot", "description": "Answers questions about returns"}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{agent}");
        let agent = id(&agent);
        let (s, body) = self
            .post_raw(
                &provider.token,
                &format!("/api/provider-agents/{agent}/import_flow/"),
                "application/json",
                sample_flow().into_bytes(),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let (s, free) = self
            .post(
                &provider.token,
                &format!("/api/provider-agents/{agent}/plans/"),
                json!({"name": "Free", "price_cents": 0, "requests_per_minute": 30}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{free}");
        let (s, paid) = self
            .post(
                &provider.token,
                &format!("/api/provider-agents/{agent}/plans/"),
                json!({"name": "Pro", "price_cents": 2900, "currency": "EUR", "interval": "year"}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{paid}");
        self.review(provider, true, false).await;
        if self.state.runtime.is_none() {
            agora_control_plane::routes::agents::set_published(
                &self.state.db,
                agent,
                Some("flow-under-test"),
            )
            .await
            .unwrap();
        } else {
            let (s, body) = self
                .post(
                    &provider.token,
                    &format!("/api/provider-agents/{agent}/publish/"),
                    json!({}),
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{body}");
        }
        (agent, id(&free), id(&paid))
    }

    /// A staff user's token, made on first use.
    pub async fn staff_token(&self) -> String {
        let db = &self.state.db;
        let staff = identity::create_user(
            db,
            &format!("staff-{}", Uuid::new_v4().simple()),
            "staff@example.com",
            "correct-horse-7",
            true,
        )
        .await
        .unwrap();
        identity::create_token(db, staff).await.unwrap()
    }

    /// Staff's review of a provider organisation, through the route.
    pub async fn review(&self, provider: &Tenant, approved: bool, custom_code_allowed: bool) {
        let staff = self.staff_token().await;
        let (s, body) = self
            .post(
                &staff,
                &format!("/api/organizations/{}/review/", provider.org),
                json!({"approved": approved, "custom_code_allowed": custom_code_allowed}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["approved"], approved);
    }

    /// A buyer's completed free order; returns (order, config).
    pub async fn subscribed(&self, buyer: &Tenant, agent: Uuid, plan: Uuid) -> (Uuid, Uuid) {
        let (s, order) = self
            .post(
                &buyer.token,
                "/api/marketplace-orders/",
                json!({"offering": agent, "plan": plan}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{order}");
        assert_eq!(order["state"], "done");
        (
            id(&order),
            order["config"].as_str().unwrap().parse().unwrap(),
        )
    }
}

impl TestApp {
    /// Like `subscribed`, naming the buyer's customer organisation explicitly.
    pub async fn subscribed_in(&self, buyer: &Tenant, agent: Uuid, plan: Uuid) -> (Uuid, Uuid) {
        let (s, order) = self
            .post(
                &buyer.token,
                "/api/marketplace-orders/",
                json!({"offering": agent, "plan": plan, "organization": buyer.org}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{order}");
        (
            id(&order),
            order["config"].as_str().unwrap().parse().unwrap(),
        )
    }
}

async fn serve(settings: &Settings, runtime: Option<RuntimeClient>) -> (String, AppState) {
    let mut state = AppState::from_settings(settings)
        .await
        .expect("start control plane");
    state.runtime = runtime;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = state.clone();
    tokio::spawn(async move {
        agora_control_plane::serve(listener, served, std::future::pending())
            .await
            .unwrap();
    });
    (format!("http://{addr}"), state)
}

pub async fn decode(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, value)
}

pub fn id(v: &Value) -> Uuid {
    v["uuid"]
        .as_str()
        .unwrap_or_else(|| panic!("no uuid in {v}"))
        .parse()
        .unwrap()
}

/// Asserts the error shape and code.
#[track_caller]
pub fn assert_error(status: StatusCode, body: &Value, want_status: StatusCode, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

pub fn sample_flow() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/flows/support-assistant.json"
    ))
    .unwrap()
}

/// What the fake runtime received.
#[derive(Default)]
pub struct Received {
    pub flows: Vec<(Option<String>, Value)>,
}

/// The component code the fake runtime's catalog lists, by type.
pub const FAKE_CATALOG: &[(&str, &str)] = &[
    ("ChatInput", "class ChatInput(ChatComponent): ..."),
    ("ChatOutput", "class ChatOutput(ChatComponent): ..."),
    ("Prompt Template", "class PromptComponent(Component): ..."),
];

/// A local HTTP server answering `POST /api/v1/flows/` as Langflow does:
/// 403 with Langflow's `detail` bodies without or with a wrong `x-api-key`,
/// else 201 with the flow and a new `id`; and `GET /api/v1/all` with a small
/// component catalog in Langflow's shape ([`FAKE_CATALOG`]).
pub async fn fake_runtime(api_key: &'static str) -> (String, Arc<Mutex<Received>>) {
    use axum::http::{HeaderMap, StatusCode as S};
    let received = Arc::new(Mutex::new(Received::default()));
    let rec = received.clone();
    let catalog = move |headers: HeaderMap| async move {
        if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some(api_key) {
            return (
                S::FORBIDDEN,
                axum::Json(json!({"detail": "Invalid API key"})),
            );
        }
        let components: serde_json::Map<String, Value> = FAKE_CATALOG
            .iter()
            .map(|(ty, code)| {
                (
                    ty.to_string(),
                    json!({"template": {"code": {"type": "code", "value": code}}}),
                )
            })
            .collect();
        (
            S::OK,
            axum::Json(json!({"input_output": components, "component_display_names": {}})),
        )
    };
    let app = axum::Router::new()
        .route("/api/v1/all", axum::routing::get(catalog))
        .route(
            "/api/v1/flows/",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let rec = rec.clone();
                async move {
                    let key = headers
                        .get("x-api-key")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let flow: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    rec.lock().unwrap().flows.push((key.clone(), flow.clone()));
                    let (status, body) = match key.as_deref() {
                        None => (
                            S::FORBIDDEN,
                            json!({"detail": "An API key must be passed as query or header"}),
                        ),
                        Some(k) if k != api_key => (
                            S::FORBIDDEN,
                            json!({"detail": "Invalid or missing API key"}),
                        ),
                        Some(_) => {
                            let mut created = flow;
                            created["id"] = json!(Uuid::new_v4());
                            created["user_id"] = json!(Uuid::new_v4());
                            created["folder_id"] = json!(Uuid::new_v4());
                            (S::CREATED, created)
                        }
                    };
                    (status, [("server", "uvicorn")], axum::Json(body))
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), received)
}

pub fn runtime_client(url: &str, key: &str) -> RuntimeClient {
    RuntimeClient::new(url, key.to_owned().into(), Duration::from_secs(5)).unwrap()
}

/// Runs a scenario against both databases.
#[macro_export]
macro_rules! both {
    ($($scenario:ident),+ $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$scenario($crate::common::Backend::Postgres).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$scenario($crate::common::Backend::Sqlite).await
            }
        }
    )+};
}
