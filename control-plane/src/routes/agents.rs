use agora_config::flow::FlowDefinition;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::marketplace::{plan_json, plans_json, PlanAnswer};
use super::{Owned, PageQuery, ALL};
use crate::db::{bump_revision, now_ms, opt_uuid_col, uuid_col, Db};
use crate::domain::{text_field, ts, AgentStatus, Cents, Currency, OrgKind, Page, Paged};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiBytes, ApiJson, ApiPath, ApiQuery, Caller};
use crate::flow_code::{self, CodeRefusal};
use crate::runtime::RuntimeError;
use crate::{identity, AppState};
use agora_config::snapshot::BillingInterval;

/// A provider's agent.
#[derive(Serialize, schemars::JsonSchema)]
pub struct AgentAnswer {
    uuid: Uuid,
    organization: Uuid,
    name: String,
    description: String,
    category: Option<Uuid>,
    /// `draft` or `published`.
    status: String,
    has_flow: bool,
    /// What the imported flow offers and expects (as stored at import).
    #[schemars(with = "Option<agora_config::flow::FlowSummary>")]
    flow_summary: Option<Value>,
    runtime_flow_id: Option<String>,
    created_at: String,
    updated_at: String,
    /// Its pricing plans (in the answer for one agent).
    #[serde(skip_serializing_if = "Option::is_none")]
    plans: Option<Vec<PlanAnswer>>,
}

/// A flow export that passed validation, and what it offers.
#[derive(Serialize, schemars::JsonSchema)]
pub struct ValidatedFlow {
    valid: bool,
    summary: agora_config::flow::FlowSummary,
}

fn agent_json(row: &AnyRow) -> ApiResult<AgentAnswer> {
    let summary: Option<String> = row.try_get("flow_summary")?;
    Ok(AgentAnswer {
        uuid: uuid_col(row, "uuid")?,
        organization: uuid_col(row, "org_uuid")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        category: opt_uuid_col(row, "category_uuid")?,
        status: row.try_get("status")?,
        has_flow: summary.is_some(),
        flow_summary: summary.and_then(|s| serde_json::from_str::<Value>(&s).ok()),
        runtime_flow_id: row.try_get("runtime_flow_id")?,
        created_at: ts(row.try_get("created_at")?),
        updated_at: ts(row.try_get("updated_at")?),
        plans: None,
    })
}

/// What offering search matches: name and description, lowercased here.
pub fn search_text(name: &str, description: &str) -> String {
    format!("{name}\n{description}").to_lowercase()
}

const AGENT_COLUMNS: &str = "uuid, org_uuid, name, description, category_uuid, status, flow_summary, runtime_flow_id, created_at, updated_at";

const AGENTS: Owned = Owned {
    select: AGENT_COLUMNS,
    from: "FROM provider_agents",
    id: "uuid",
    org: "org_uuid",
    what: "agent",
};

/// The caller's agent (any role), or 404.
pub(crate) async fn load_agent(db: &Db, caller: &Caller, uuid: Uuid) -> ApiResult<AnyRow> {
    AGENTS.one(db, caller, uuid).await
}

/// The caller's agent when they may change it.
async fn agent_for_change(db: &Db, caller: &Caller, uuid: Uuid) -> ApiResult<AnyRow> {
    let row = load_agent(db, caller, uuid).await?;
    caller.require_admin(uuid_col(&row, "org_uuid")?)?;
    Ok(row)
}

async fn check_category(db: &Db, category: Option<Uuid>) -> ApiResult<()> {
    if let Some(c) = category {
        sqlx::query("SELECT uuid FROM categories WHERE uuid = $1")
            .bind(c.to_string())
            .fetch_optional(&db.pool)
            .await?
            .ok_or(ApiError::not_found("category"))?;
    }
    Ok(())
}

pub async fn list_agents(
    State(app): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<Paged<AgentAnswer>>> {
    let page = Page::new(q.page, q.page_size, app.limits.max_page_size)?;
    Ok(Json(
        AGENTS
            .page(&app.db, &caller, page, ALL, "created_at, uuid", agent_json)
            .await?,
    ))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAgent {
    name: String,
    #[serde(default)]
    description: String,
    category: Option<Uuid>,
    organization: Option<Uuid>,
}

pub async fn create_agent(
    State(app): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<NewAgent>,
) -> ApiResult<(StatusCode, Json<AgentAnswer>)> {
    let org = caller.org_of_kind(OrgKind::Provider, body.organization)?;
    caller.require_admin(org)?;
    let name = text_field("name", &body.name, 1, 200)?;
    let description = text_field("description", &body.description, 0, 5000)?;
    check_category(&app.db, body.category).await?;
    let uuid = Uuid::new_v4();
    let now = now_ms();
    sqlx::query("INSERT INTO provider_agents (uuid, org_uuid, name, description, search_text, category_uuid, status, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 'draft', $7, $7)")
        .bind(uuid.to_string())
        .bind(org.to_string())
        .bind(&name)
        .bind(&description)
        .bind(search_text(&name, &description))
        .bind(body.category.map(|c| c.to_string()))
        .bind(now)
        .execute(&app.db.pool)
        .await?;
    let row = load_agent(&app.db, &caller, uuid).await?;
    Ok((StatusCode::CREATED, Json(agent_json(&row)?)))
}

pub async fn get_agent(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<AgentAnswer>> {
    let row = load_agent(&app.db, &caller, uuid).await?;
    let mut agent = agent_json(&row)?;
    agent.plans = Some(plans_json(&app.db, uuid, false).await?);
    Ok(Json(agent))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentPatch {
    name: Option<String>,
    description: Option<String>,
    category: Option<Option<Uuid>>,
}

pub async fn update_agent(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
    ApiJson(body): ApiJson<AgentPatch>,
) -> ApiResult<Json<AgentAnswer>> {
    let row = agent_for_change(&app.db, &caller, uuid).await?;
    let name = match &body.name {
        Some(n) => text_field("name", n, 1, 200)?,
        None => row.try_get("name")?,
    };
    let description = match &body.description {
        Some(d) => text_field("description", d, 0, 5000)?,
        None => row.try_get("description")?,
    };
    let category = match body.category {
        Some(c) => {
            check_category(&app.db, c).await?;
            c
        }
        None => opt_uuid_col(&row, "category_uuid")?,
    };
    sqlx::query("UPDATE provider_agents SET name = $2, description = $3, search_text = $4, category_uuid = $5, updated_at = $6 WHERE uuid = $1")
        .bind(uuid.to_string())
        .bind(&name)
        .bind(&description)
        .bind(search_text(&name, &description))
        .bind(category.map(|c| c.to_string()))
        .bind(now_ms())
        .execute(&app.db.pool)
        .await?;
    Ok(Json(agent_json(
        &load_agent(&app.db, &caller, uuid).await?,
    )?))
}

pub async fn delete_agent(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let row = agent_for_change(&app.db, &caller, uuid).await?;
    if row.try_get::<String, _>("status")? == AgentStatus::Published.as_str() {
        return Err(ApiError::conflict(
            "agent_published",
            "unpublish the agent before deleting it",
        ));
    }
    let orders = sqlx::query("SELECT COUNT(*) AS n FROM orders WHERE agent_uuid = $1")
        .bind(uuid.to_string())
        .fetch_one(&app.db.pool)
        .await?;
    if orders.try_get::<i64, _>("n")? > 0 {
        return Err(ApiError::conflict(
            "agent_ordered",
            "the agent has orders and cannot be deleted",
        ));
    }
    sqlx::query("DELETE FROM provider_agents WHERE uuid = $1")
        .bind(uuid.to_string())
        .execute(&app.db.pool)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `validate_flow/`: the body is a Langflow export; answers what import would extract.
pub async fn validate_flow(
    _caller: Caller,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Json<ValidatedFlow>> {
    let flow = FlowDefinition::parse(&body)?;
    Ok(Json(ValidatedFlow {
        valid: true,
        summary: flow.summary().clone(),
    }))
}

/// `{uuid}/import_flow/`: stores the export and what it offers buyers and the proxy.
pub async fn import_flow(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Json<AgentAnswer>> {
    let row = agent_for_change(&app.db, &caller, uuid).await?;
    if row.try_get::<String, _>("status")? == AgentStatus::Published.as_str() {
        return Err(ApiError::conflict(
            "agent_published",
            "unpublish the agent before importing a new flow",
        ));
    }
    let flow = FlowDefinition::parse(&body)?;
    let summary = serde_json::to_string(flow.summary()).map_err(anyhow::Error::from)?;
    let definition = serde_json::to_string(flow.as_json()).map_err(anyhow::Error::from)?;
    let mut tx = app.db.pool.begin().await?;
    // updated_at always moves, so a publish in flight notices the new flow.
    sqlx::query("UPDATE provider_agents SET flow_json = $2, flow_summary = $3, runtime_flow_id = NULL, updated_at = CASE WHEN $4 > updated_at THEN $4 ELSE updated_at + 1 END WHERE uuid = $1")
        .bind(uuid.to_string())
        .bind(definition)
        .bind(summary)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    bump_revision(&mut tx).await?;
    tx.commit().await?;
    Ok(Json(agent_json(
        &load_agent(&app.db, &caller, uuid).await?,
    )?))
}

/// Provisions the flow to the runtime, then lists the agent. A runtime failure
/// leaves the agent unpublished.
pub async fn publish(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<AgentAnswer>> {
    let row = agent_for_change(&app.db, &caller, uuid).await?;
    if row.try_get::<String, _>("status")? == AgentStatus::Published.as_str() {
        return Ok(Json(agent_json(&row)?));
    }
    let flow: Option<String> = sqlx::query("SELECT flow_json FROM provider_agents WHERE uuid = $1")
        .bind(uuid.to_string())
        .fetch_one(&app.db.pool)
        .await?
        .try_get("flow_json")?;
    let flow =
        flow.ok_or_else(|| ApiError::conflict("no_flow", "import a flow before publishing"))?;
    let plans =
        sqlx::query("SELECT COUNT(*) AS n FROM pricing_plans WHERE agent_uuid = $1 AND active = 1")
            .bind(uuid.to_string())
            .fetch_one(&app.db.pool)
            .await?;
    if plans.try_get::<i64, _>("n")? == 0 {
        return Err(ApiError::conflict(
            "no_plans",
            "add a pricing plan before publishing",
        ));
    }
    let runtime = app.runtime.as_ref().ok_or_else(|| {
        ApiError::conflict(
            "runtime_not_configured",
            "no agent runtime is configured ([runtime] url and api_key)",
        )
    })?;
    let review = identity::provider_review(&app.db, uuid_col(&row, "org_uuid")?).await?;
    if !review.approved {
        return Err(ApiError::Denied {
            code: "provider_not_approved",
            message: "staff approve a provider organisation before its first publish".into(),
        });
    }
    let runtime_failed = |e: RuntimeError| {
        tracing::warn!(agent = %uuid, error = %e, "provisioning to the runtime failed");
        ApiError::BadGateway {
            code: e.code(),
            message: e.public_message().into(),
        }
    };
    let flow: Value = serde_json::from_str(&flow).map_err(anyhow::Error::from)?;
    let catalog = runtime.catalog().await.map_err(runtime_failed)?;
    let flow = flow_code::prepare(&flow, &catalog, review.custom_code_allowed).map_err(|e| {
        tracing::info!(agent = %uuid, refusal = %e, "flow refused by the code policy");
        match e {
            CodeRefusal::CustomCode { .. } => ApiError::Denied {
                code: e.code(),
                message: e.to_string(),
            },
            CodeRefusal::UnknownComponent { .. } | CodeRefusal::FixedSession { .. } => {
                ApiError::Unprocessable {
                    code: e.code(),
                    message: e.to_string(),
                }
            }
        }
    })?;
    let name: String = row.try_get("name")?;
    let flow_id = runtime
        .provision(&flow, &format!("{name} ({uuid})"))
        .await
        .map_err(runtime_failed)?;
    if !publish_if_unchanged(&app.db, uuid, &flow_id, row.try_get("updated_at")?).await? {
        return Err(ApiError::conflict(
            "agent_changed",
            "the agent changed while it was being published; publish again",
        ));
    }
    Ok(Json(agent_json(
        &load_agent(&app.db, &caller, uuid).await?,
    )?))
}

/// Publishes a draft agent that has not changed since `seen_updated_at`
/// (a flow imported meanwhile would not be the one provisioned). False when
/// it changed.
async fn publish_if_unchanged(
    db: &Db,
    agent: Uuid,
    runtime_flow_id: &str,
    seen_updated_at: i64,
) -> ApiResult<bool> {
    let mut tx = db.pool.begin().await?;
    let updated = sqlx::query("UPDATE provider_agents SET status = 'published', runtime_flow_id = $2, updated_at = $3 WHERE uuid = $1 AND status = 'draft' AND updated_at = $4")
        .bind(agent.to_string())
        .bind(runtime_flow_id)
        .bind(now_ms().max(seen_updated_at + 1))
        .bind(seen_updated_at)
        .execute(&mut *tx)
        .await?;
    if updated.rows_affected() == 0 {
        return Ok(false);
    }
    bump_revision(&mut tx).await?;
    tx.commit().await?;
    Ok(true)
}

/// Marks an agent published with its runtime flow id, bumping the revision.
pub async fn set_published(db: &Db, agent: Uuid, runtime_flow_id: Option<&str>) -> ApiResult<()> {
    let mut tx = db.pool.begin().await?;
    sqlx::query("UPDATE provider_agents SET status = 'published', runtime_flow_id = $2, updated_at = $3 WHERE uuid = $1")
        .bind(agent.to_string())
        .bind(runtime_flow_id)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    bump_revision(&mut tx).await?;
    tx.commit().await?;
    Ok(())
}

pub async fn unpublish(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<AgentAnswer>> {
    agent_for_change(&app.db, &caller, uuid).await?;
    let mut tx = app.db.pool.begin().await?;
    sqlx::query("UPDATE provider_agents SET status = 'draft', updated_at = $2 WHERE uuid = $1")
        .bind(uuid.to_string())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    bump_revision(&mut tx).await?;
    tx.commit().await?;
    Ok(Json(agent_json(
        &load_agent(&app.db, &caller, uuid).await?,
    )?))
}

pub async fn list_plans(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<PlanAnswer>>> {
    load_agent(&app.db, &caller, uuid).await?;
    Ok(Json(plans_json(&app.db, uuid, false).await?))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPlan {
    pub name: String,
    pub price_cents: i64,
    pub currency: Option<String>,
    pub interval: Option<BillingInterval>,
    pub request_quota: Option<i64>,
    pub token_quota: Option<i64>,
    pub requests_per_minute: Option<i64>,
    pub burst: Option<i64>,
    pub max_concurrency: Option<i64>,
    /// A usage charge over the included token quota, in cents per 1,000 tokens
    /// (billed through Stripe's meters).
    pub usage_cents_per_1k_tokens: Option<i64>,
    /// A usage charge over the included request quota, in cents per request.
    pub usage_cents_per_request: Option<i64>,
}

fn positive(field: &str, value: Option<i64>, max: i64) -> ApiResult<Option<i64>> {
    match value {
        Some(v) if v < 1 || v > max => Err(ApiError::bad_request(
            "invalid_field",
            format!("{field} must be between 1 and {max}"),
        )),
        other => Ok(other),
    }
}

/// Validates and stores a pricing plan; returns its uuid.
pub async fn insert_plan(db: &Db, agent: Uuid, plan: &NewPlan) -> ApiResult<Uuid> {
    let name = text_field("name", &plan.name, 1, 100)?;
    let price = Cents::new(plan.price_cents)?;
    let currency = Currency::new(plan.currency.as_deref().unwrap_or("usd"))?;
    let interval = plan.interval.unwrap_or(BillingInterval::Month);
    let request_quota = positive("request_quota", plan.request_quota, 1_000_000_000_000)?;
    let token_quota = positive("token_quota", plan.token_quota, 1_000_000_000_000_000)?;
    let rpm = positive("requests_per_minute", plan.requests_per_minute, 1_000_000)?;
    let burst = positive("burst", plan.burst, 1_000_000)?;
    let concurrency = positive("max_concurrency", plan.max_concurrency, 100_000)?;
    let per_1k_tokens = positive(
        "usage_cents_per_1k_tokens",
        plan.usage_cents_per_1k_tokens,
        1_000_000,
    )?;
    let per_request = positive(
        "usage_cents_per_request",
        plan.usage_cents_per_request,
        100_000,
    )?;
    let uuid = Uuid::new_v4();
    let mut tx = db.pool.begin().await?;
    sqlx::query("INSERT INTO pricing_plans (uuid, agent_uuid, name, price_cents, currency, billing_interval, request_quota, token_quota, requests_per_minute, burst, max_concurrency, active, created_at, usage_cents_per_1k_tokens, usage_cents_per_request) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 1, $12, $13, $14)")
        .bind(uuid.to_string())
        .bind(agent.to_string())
        .bind(name)
        .bind(price.get())
        .bind(currency.as_str())
        .bind(interval.as_str())
        .bind(request_quota)
        .bind(token_quota)
        .bind(rpm)
        .bind(burst)
        .bind(concurrency)
        .bind(now_ms())
        .bind(per_1k_tokens)
        .bind(per_request)
        .execute(&mut *tx)
        .await?;
    bump_revision(&mut tx).await?;
    tx.commit().await?;
    Ok(uuid)
}

pub async fn create_plan(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
    ApiJson(body): ApiJson<NewPlan>,
) -> ApiResult<(StatusCode, Json<PlanAnswer>)> {
    agent_for_change(&app.db, &caller, uuid).await?;
    let plan = insert_plan(&app.db, uuid, &body).await?;
    let row = sqlx::query("SELECT * FROM pricing_plans WHERE uuid = $1")
        .bind(plan.to_string())
        .fetch_one(&app.db.pool)
        .await?;
    Ok((StatusCode::CREATED, Json(plan_json(&row)?)))
}

pub async fn archive_plan(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath((uuid, plan)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<PlanAnswer>> {
    let agent = agent_for_change(&app.db, &caller, uuid).await?;
    let mut tx = app.db.pool.begin().await?;
    let updated =
        sqlx::query("UPDATE pricing_plans SET active = 0 WHERE uuid = $1 AND agent_uuid = $2")
            .bind(plan.to_string())
            .bind(uuid.to_string())
            .execute(&mut *tx)
            .await?;
    if updated.rows_affected() == 0 {
        return Err(ApiError::not_found("plan"));
    }
    let left: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM pricing_plans WHERE agent_uuid = $1 AND active = 1")
            .bind(uuid.to_string())
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
    if left == 0 && agent.try_get::<String, _>("status")? == AgentStatus::Published.as_str() {
        return Err(ApiError::conflict(
            "last_plan",
            "a published agent keeps at least one active plan; unpublish it first",
        ));
    }
    bump_revision(&mut tx).await?;
    tx.commit().await?;
    let row = sqlx::query("SELECT * FROM pricing_plans WHERE uuid = $1")
        .bind(plan.to_string())
        .fetch_one(&app.db.pool)
        .await?;
    Ok(Json(plan_json(&row)?))
}
