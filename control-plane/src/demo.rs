//! Demo content for `agora up`: a provider with four sample agents (free and
//! paid plans), a buyer subscribed to one free plan, and one API key. Seeding
//! runs once; later runs keep the data and refresh only what `demo.json` needs.

use std::path::Path;

use agora_config::flow::FlowDefinition;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use uuid::Uuid;

use crate::db::{now_ms, uuid_col};
use crate::domain::OrgKind;
use crate::routes::agents::{insert_plan, set_published, NewPlan};
use crate::{flow_code, identity, AppState};
use agora_config::snapshot::BillingInterval;

const PROVIDER: &str = "demo-provider";
const BUYER: &str = "demo-buyer";

const SAMPLE_FLOWS: &[(&str, &str, &str)] = &[
    (
        "Support Assistant",
        "Answers customer questions politely, in your brand's voice.",
        include_str!("../../config/flows/support-assistant.json"),
    ),
    (
        "FAQ Echo",
        "Repeats the question back: the smallest agent there is, for trying the API.",
        include_str!("../../config/flows/faq-echo.json"),
    ),
    (
        "Document Summarizer",
        "Summarises documents with a language model of your choice (on Langflow it needs the model provider's key).",
        include_str!("../../config/flows/doc-summarizer.json"),
    ),
    (
        "Memory Chat",
        "Remembers each conversation and answers with it: chat memory kept per session, no model needed.",
        include_str!("../../config/flows/memory-chat.json"),
    ),
];

/// What `agora up` writes to `DATA_DIR/demo.json`. It holds credentials, so
/// it has no `Debug`.
#[derive(Clone, Serialize, Deserialize)]
pub struct DemoInfo {
    pub control_plane_url: String,
    pub provider_username: String,
    pub provider_password: String,
    pub provider_token: String,
    pub buyer_username: String,
    pub buyer_password: String,
    pub buyer_token: String,
    pub config_uuid: Uuid,
    pub api_key: String,
    /// The built-in demo runtime, when `agora up` runs one.
    #[serde(default)]
    pub runtime_url: Option<String>,
    #[serde(default)]
    pub runtime_api_key: Option<String>,
    /// The data plane, when `agora up` runs one: invoke agents here with `api_key`.
    #[serde(default)]
    pub proxy_url: Option<String>,
    /// The one base URL of the whole API (the gateway's front door: agents and
    /// every control-plane route); `control_plane_url` is the operators' own port.
    #[serde(default)]
    pub base_url: Option<String>,
    /// The proxy's Prometheus metrics.
    #[serde(default)]
    pub metrics_url: Option<String>,
    /// The `X-Runtime-Secret` a runtime sends its usage reports with
    /// (`POST {proxy_url}/api/agent-gateway/usage/`).
    #[serde(default)]
    pub runtime_secret: Option<String>,
    /// A page on another loopback origin embedding the demo config's chat widget.
    #[serde(default)]
    pub widget_demo_url: Option<String>,
    pub note: String,
}

/// The proxy `agora up` started, for demo.json.
pub struct DemoProxy {
    pub url: String,
    pub metrics_url: String,
    pub runtime_secret: Option<String>,
    /// The widget demo page's URL, when one is served.
    pub widget_demo_url: Option<String>,
}

/// A runtime `agora up` started itself, for demo.json.
pub struct BuiltInRuntime {
    pub url: String,
    pub api_key: String,
}

/// Flows already provisioned, by runtime flow id: an in-memory runtime is
/// given them again when it restarts.
pub async fn provisioned_flows(app: &AppState) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    let rows = sqlx::query("SELECT runtime_flow_id, flow_json FROM provider_agents WHERE runtime_flow_id IS NOT NULL AND flow_json IS NOT NULL")
        .fetch_all(&app.db.pool)
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get::<String, _>("runtime_flow_id")?,
                serde_json::from_str(&r.try_get::<String, _>("flow_json")?)?,
            ))
        })
        .collect()
}

/// Seeds (first run) or refreshes (later runs) the demo and returns its details.
pub async fn ensure(
    app: &AppState,
    data_dir: &Path,
    url: &str,
    built_in: Option<&BuiltInRuntime>,
    proxy: Option<&DemoProxy>,
) -> anyhow::Result<DemoInfo> {
    let previous = read_previous(data_dir);
    let (provider_password, buyer_password, config) = match identity::find_user(&app.db, BUYER)
        .await?
    {
        None => seed(app).await?,
        Some(_) => {
            let config = demo_config(app).await?.ok_or_else(|| {
                anyhow::anyhow!(
                    "the demo data in this database is incomplete (an earlier first start stopped part way); start again with an empty database or data dir"
                )
            })?;
            match previous.as_ref().filter(|p| p.config_uuid == config) {
                Some(prev) => (
                    prev.provider_password.clone(),
                    prev.buyer_password.clone(),
                    config,
                ),
                None => {
                    // demo.json was lost: the old passwords are unknown, so set new ones.
                    let (p, b) = (random_password(), random_password());
                    identity::set_password(&app.db, PROVIDER, &p).await?;
                    identity::set_password(&app.db, BUYER, &b).await?;
                    (p, b, config)
                }
            }
        }
    };
    let provider = identity::find_user(&app.db, PROVIDER)
        .await?
        .ok_or_else(|| anyhow::anyhow!("demo provider missing"))?;
    let buyer = identity::find_user(&app.db, BUYER)
        .await?
        .ok_or_else(|| anyhow::anyhow!("demo buyer missing"))?;
    let reuse = |pick: fn(&DemoInfo) -> &String| previous.as_ref().map(|p| pick(p).clone());
    let provider_token = match reuse(|p| &p.provider_token) {
        Some(t) if token_valid(app, &t).await? => t,
        _ => identity::create_token(&app.db, provider).await?,
    };
    let buyer_token = match reuse(|p| &p.buyer_token) {
        Some(t) if token_valid(app, &t).await? => t,
        _ => identity::create_token(&app.db, buyer).await?,
    };
    let api_key = match reuse(|p| &p.api_key) {
        Some(k) if key_active(app, &k).await? => k,
        _ => issue_demo_key(app, config, buyer).await?,
    };
    let note = match (built_in, &app.runtime) {
        (Some(_), _) => "Agents run on the built-in demo runtime (an echo and a fake model: no LLM is called and nothing leaves this machine). Set [runtime] url and api_key to use Langflow.".to_owned(),
        (None, Some(_)) => "Demo agents are provisioned to the configured runtime.".to_owned(),
        (None, None) => "No agent runtime is configured: the demo agents are listed but have no runtime flow.".to_owned(),
    };
    let info = DemoInfo {
        control_plane_url: url.to_owned(),
        provider_username: PROVIDER.into(),
        provider_password,
        provider_token,
        buyer_username: BUYER.into(),
        buyer_password,
        buyer_token,
        config_uuid: config,
        api_key,
        runtime_url: built_in.map(|r| r.url.clone()),
        runtime_api_key: built_in.map(|r| r.api_key.clone()),
        proxy_url: proxy.map(|p| p.url.clone()),
        base_url: proxy.map(|p| p.url.clone()),
        metrics_url: proxy.map(|p| p.metrics_url.clone()),
        runtime_secret: proxy.and_then(|p| p.runtime_secret.clone()),
        widget_demo_url: proxy.and_then(|p| p.widget_demo_url.clone()),
        note,
    };
    write_demo(data_dir, &info)?;
    Ok(info)
}

/// The demo buyer's agent config, if the seed got that far.
async fn demo_config(app: &AppState) -> anyhow::Result<Option<Uuid>> {
    let row = sqlx::query("SELECT c.uuid FROM agent_configs c JOIN memberships m ON m.org_uuid = c.org_uuid JOIN users u ON u.uuid = m.user_uuid WHERE u.username = $1 ORDER BY c.created_at LIMIT 1")
        .bind(BUYER)
        .fetch_optional(&app.db.pool)
        .await?;
    Ok(row.map(|r| uuid_col(&r, "uuid")).transpose()?)
}

/// The runtime secret an earlier `agora up` wrote to `demo.json`, so that a
/// runtime configured with it keeps working across restarts.
pub fn previous_runtime_secret(data_dir: &Path) -> Option<String> {
    read_previous(data_dir)?.runtime_secret
}

fn read_previous(data_dir: &Path) -> Option<DemoInfo> {
    let text = std::fs::read_to_string(data_dir.join("demo.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes demo.json readable by its owner only: it holds credentials.
fn write_demo(data_dir: &Path, info: &DemoInfo) -> anyhow::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(data_dir)?;
    let tmp = data_dir.join("demo.json.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(serde_json::to_string_pretty(info)?.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(tmp, data_dir.join("demo.json"))?;
    Ok(())
}

/// Whether `token` is live for a day more (so the demo's printed token works).
async fn token_valid(app: &AppState, token: &str) -> anyhow::Result<bool> {
    Ok(
        sqlx::query("SELECT 1 AS one FROM user_tokens WHERE token_hash = $1 AND expires_at > $2")
            .bind(crate::extract::hash_token(token))
            .bind(crate::db::now_ms() + 24 * 3_600_000)
            .fetch_optional(&app.db.pool)
            .await?
            .is_some(),
    )
}

async fn key_active(app: &AppState, key: &str) -> anyhow::Result<bool> {
    let Ok(key) = agora_config::keys::ApiKey::parse(key) else {
        return Ok(false);
    };
    Ok(
        sqlx::query("SELECT 1 AS one FROM api_keys WHERE key_hash = $1 AND status = 'active'")
            .bind(key.hash().to_hex())
            .fetch_optional(&app.db.pool)
            .await?
            .is_some(),
    )
}

fn random_password() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

async fn seed(app: &AppState) -> anyhow::Result<(String, String, Uuid)> {
    let db = &app.db;
    // Flows are parsed and provisioned before anything is written, so a
    // runtime failure leaves the database as it was. They pass the code policy
    // as any provider's do: their nodes get the runtime's own component code.
    let catalog = match &app.runtime {
        Some(runtime) => Some(runtime.catalog().await?),
        None => None,
    };
    let mut flows = Vec::new();
    for (name, description, flow) in SAMPLE_FLOWS {
        let flow = FlowDefinition::parse(flow.as_bytes())
            .map_err(|e| anyhow::anyhow!("sample flow {name}: {e}"))?;
        let agent = Uuid::new_v4();
        let flow_id = match (&app.runtime, &catalog) {
            (Some(runtime), Some(catalog)) => {
                let runnable = flow_code::prepare(flow.as_json(), catalog, true)
                    .map_err(|e| anyhow::anyhow!("sample flow {name}: {e}"))?;
                Some(
                    runtime
                        .provision(&runnable, &format!("{name} ({agent})"))
                        .await?,
                )
            }
            _ => None,
        };
        flows.push((agent, *name, *description, flow, flow_id));
    }
    let provider_password = random_password();
    let buyer_password = random_password();
    let provider = identity::create_user(
        db,
        PROVIDER,
        "provider@demo.invalid",
        &provider_password,
        false,
    )
    .await?;
    let buyer =
        identity::create_user(db, BUYER, "buyer@demo.invalid", &buyer_password, false).await?;
    let provider_org = identity::create_org(
        db,
        "Acme Agents",
        OrgKind::Provider,
        "Sample agents for the Agora demo.",
        provider,
    )
    .await?;
    // The demo provider comes approved, with custom code allowed for its samples.
    identity::set_provider_review(
        db,
        provider_org,
        identity::ProviderReview {
            approved: true,
            custom_code_allowed: true,
        },
    )
    .await?;
    let buyer_org = identity::create_org(db, "Globex Retail", OrgKind::Customer, "", buyer).await?;
    let category = Uuid::new_v4();
    sqlx::query("INSERT INTO categories (uuid, slug, title, description, created_at) VALUES ($1, 'customer-support', 'Customer support', 'Agents that talk to your customers.', $2) ON CONFLICT (slug) DO NOTHING")
        .bind(category.to_string())
        .bind(now_ms())
        .execute(&db.pool)
        .await?;
    let category: String =
        sqlx::query("SELECT uuid FROM categories WHERE slug = 'customer-support'")
            .fetch_one(&db.pool)
            .await?
            .try_get("uuid")?;
    let mut first_free_plan = None;
    for (agent, name, description, flow, flow_id) in flows {
        let now = now_ms();
        sqlx::query("INSERT INTO provider_agents (uuid, org_uuid, name, description, search_text, category_uuid, status, flow_json, flow_summary, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 'draft', $7, $8, $9, $9)")
            .bind(agent.to_string())
            .bind(provider_org.to_string())
            .bind(name)
            .bind(description)
            .bind(crate::routes::agents::search_text(name, description))
            .bind(&category)
            .bind(serde_json::to_string(flow.as_json())?)
            .bind(serde_json::to_string(flow.summary())?)
            .bind(now)
            .execute(&db.pool)
            .await?;
        let free = insert_plan(db, agent, &plan("Free", 0, Some(1_000), Some(20), Some(2)))
            .await
            .map_err(api_err)?;
        // Pro includes a million tokens a month and charges 2 cents per 1,000
        // tokens over that, through Stripe's meters.
        let pro = NewPlan {
            token_quota: Some(1_000_000),
            usage_cents_per_1k_tokens: Some(2),
            ..plan("Pro", 2_900, Some(100_000), Some(600), Some(10))
        };
        insert_plan(db, agent, &pro).await.map_err(api_err)?;
        set_published(db, agent, flow_id.as_deref())
            .await
            .map_err(api_err)?;
        first_free_plan.get_or_insert((agent, free));
    }
    let (agent, plan_uuid) = first_free_plan.ok_or_else(|| anyhow::anyhow!("no sample flows"))?;
    let order = Uuid::new_v4();
    let mut tx = db.pool.begin().await?;
    sqlx::query("INSERT INTO orders (uuid, org_uuid, agent_uuid, plan_uuid, state, price_cents, currency, created_by, created_at) VALUES ($1, $2, $3, $4, 'pending_payment', 0, 'usd', $5, $6)")
        .bind(order.to_string())
        .bind(buyer_org.to_string())
        .bind(agent.to_string())
        .bind(plan_uuid.to_string())
        .bind(buyer.to_string())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    let config = crate::routes::marketplace::complete_order(&mut tx, order, "Globex Helpdesk")
        .await
        .map_err(api_err)?
        .ok_or_else(|| anyhow::anyhow!("demo order did not complete"))?;
    tx.commit().await?;
    Ok((provider_password, buyer_password, config))
}

fn plan(
    name: &str,
    price: i64,
    requests: Option<i64>,
    rpm: Option<i64>,
    concurrency: Option<i64>,
) -> NewPlan {
    NewPlan {
        name: name.into(),
        price_cents: price,
        currency: Some("usd".into()),
        interval: Some(BillingInterval::Month),
        request_quota: requests,
        token_quota: None,
        requests_per_minute: rpm,
        burst: None,
        max_concurrency: concurrency,
        usage_cents_per_1k_tokens: None,
        usage_cents_per_request: None,
    }
}

fn api_err(e: crate::error::ApiError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Lets the demo config's widget be embedded on `origin` (only there) and
/// answers the snippet that embeds it.
pub async fn widget_snippet(app: &AppState, config: Uuid, origin: &str) -> anyhow::Result<String> {
    let row = sqlx::query(
        "SELECT c.org_uuid, c.project_uuid, m.user_uuid FROM agent_configs c JOIN memberships m ON m.org_uuid = c.org_uuid WHERE c.uuid = $1 ORDER BY m.user_uuid LIMIT 1",
    )
    .bind(config.to_string())
    .fetch_one(&app.db.pool)
    .await?;
    let origins = crate::widget::origins(&[origin.to_owned()]).map_err(api_err)?;
    let mut tx = app.db.pool.begin().await?;
    sqlx::query("UPDATE agent_configs SET widget_allowed_origins = $2, widget_title = 'Demo assistant', widget_launcher_text = 'Chat with the demo' WHERE uuid = $1")
        .bind(config.to_string())
        .bind(serde_json::to_string(&origins)?)
        .execute(&mut *tx)
        .await?;
    crate::db::bump_revision(&mut tx).await?;
    tx.commit().await?;
    let (_, key) = crate::routes::widget::widget_key(
        app,
        uuid_col(&row, "org_uuid")?,
        config,
        crate::db::opt_uuid_col(&row, "project_uuid")?,
        uuid_col(&row, "user_uuid")?,
    )
    .await
    .map_err(api_err)?;
    Ok(crate::widget::snippet(&app.gateway_url(), &key))
}

/// Serves the widget demo page: a shop page on its own origin that embeds the
/// widget with its one script tag, under a strict Content-Security-Policy
/// allowing only the gateway.
pub async fn serve_widget_page(
    listener: tokio::net::TcpListener,
    gateway: String,
    snippet: String,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>Demo shop</title></head>\n<body><main><h1>Demo shop</h1><p>This page is served from its own origin and embeds the demo agent's chat widget with one script tag, under a Content-Security-Policy that allows only the gateway.</p></main>\n{snippet}\n</body></html>\n"
    );
    let gateway_origin = gateway
        .split_once("://")
        .map(|(scheme, rest)| format!("{scheme}://{}", rest.split('/').next().unwrap_or(rest)))
        .unwrap_or(gateway);
    let answer = std::sync::Arc::new(format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-security-policy: default-src 'none'; script-src {gateway_origin}; connect-src {gateway_origin}\r\ncache-control: no-store\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
        page.len()
    ));
    while let Ok((mut stream, _)) = listener.accept().await {
        let answer = answer.clone();
        tokio::spawn(async move {
            // Read the request head (bounded), then answer the page whatever it asked.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Issues the demo's secret key through the same path as the API.
async fn issue_demo_key(app: &AppState, config: Uuid, buyer: Uuid) -> anyhow::Result<String> {
    use crate::routes::keys::{store_key, KeySpec};
    use agora_config::keys::{KeyKind, Scope};
    let row = sqlx::query("SELECT org_uuid FROM agent_configs WHERE uuid = $1")
        .bind(config.to_string())
        .fetch_one(&app.db.pool)
        .await?;
    let org = uuid_col(&row, "org_uuid")?;
    let spec = KeySpec {
        name: "demo".into(),
        kind: KeyKind::SecretLive,
        scopes: vec![Scope::Invoke],
        origins: vec![],
        expires_at: None,
    };
    let (_, key) = store_key(app, org, config, None, buyer, &spec)
        .await
        .map_err(api_err)?;
    Ok(key.expose_secret().to_owned())
}
