use agora_config::flow::FlowSummary;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{fetch_page, like_pattern, Arg, Owned, PageQuery, ALL};
use crate::db::{bump_revision, now_ms, opt_uuid_col, uuid_col, Db};
use crate::domain::{
    opt_ts, text_field, ts, OrderState, OrgKind, Page, Paged, ResourceState, Tone,
};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::AppState;

// ---- categories ----

/// A marketplace category.
#[derive(Serialize, schemars::JsonSchema)]
pub struct CategoryAnswer {
    uuid: Uuid,
    slug: String,
    title: String,
    description: String,
}

fn category_json(row: &AnyRow) -> ApiResult<CategoryAnswer> {
    Ok(CategoryAnswer {
        uuid: uuid_col(row, "uuid")?,
        slug: row.try_get("slug")?,
        title: row.try_get("title")?,
        description: row.try_get("description")?,
    })
}

pub async fn list_categories(
    State(app): State<AppState>,
    _caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<Paged<CategoryAnswer>>> {
    let page = Page::new(q.page, q.page_size, app.limits.max_page_size)?;
    Ok(Json(
        fetch_page(
            &app.db,
            "*",
            "FROM categories",
            "title, uuid",
            vec![],
            page,
            category_json,
        )
        .await?,
    ))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCategory {
    slug: String,
    title: String,
    #[serde(default)]
    description: String,
}

pub async fn create_category(
    State(app): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<NewCategory>,
) -> ApiResult<(StatusCode, Json<CategoryAnswer>)> {
    if !caller.is_staff {
        return Err(ApiError::forbidden("only staff manage categories"));
    }
    let slug = body.slug.trim().to_owned();
    if slug.is_empty()
        || slug.len() > 64
        || !slug
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(ApiError::bad_request(
            "invalid_field",
            "slug must be 1 to 64 characters of a-z, 0-9 and -",
        ));
    }
    let title = text_field("title", &body.title, 1, 100)?;
    let description = text_field("description", &body.description, 0, 2000)?;
    let uuid = Uuid::new_v4();
    let inserted = sqlx::query(
        "INSERT INTO categories (uuid, slug, title, description, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (slug) DO NOTHING",
    )
    .bind(uuid.to_string())
    .bind(&slug)
    .bind(&title)
    .bind(&description)
    .bind(now_ms())
    .execute(&app.db.pool)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::conflict(
            "duplicate_slug",
            format!("a category {slug:?} exists"),
        ));
    }
    Ok((
        StatusCode::CREATED,
        Json(CategoryAnswer {
            uuid,
            slug,
            title,
            description,
        }),
    ))
}

pub async fn get_category(
    State(app): State<AppState>,
    _caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<CategoryAnswer>> {
    let row = sqlx::query("SELECT * FROM categories WHERE uuid = $1")
        .bind(uuid.to_string())
        .fetch_optional(&app.db.pool)
        .await?
        .ok_or(ApiError::not_found("category"))?;
    Ok(Json(category_json(&row)?))
}

// ---- service providers (public profiles of provider organisations) ----

const PROVIDER_SELECT: &str = "o.uuid, o.name, o.description, o.created_at, (SELECT COUNT(*) FROM provider_agents a WHERE a.org_uuid = o.uuid AND a.status = 'published') AS published_agents";

/// A service provider's public profile.
#[derive(Serialize, schemars::JsonSchema)]
pub struct ProviderAnswer {
    uuid: Uuid,
    name: String,
    description: String,
    published_agents: i64,
    created_at: String,
}

fn provider_json(row: &AnyRow) -> ApiResult<ProviderAnswer> {
    Ok(ProviderAnswer {
        uuid: uuid_col(row, "uuid")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        published_agents: row.try_get("published_agents")?,
        created_at: ts(row.try_get("created_at")?),
    })
}

pub async fn list_providers(
    State(app): State<AppState>,
    _caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<Paged<ProviderAnswer>>> {
    let page = Page::new(q.page, q.page_size, app.limits.max_page_size)?;
    Ok(Json(
        fetch_page(
            &app.db,
            PROVIDER_SELECT,
            "FROM organizations o WHERE o.kind = 'provider'",
            "o.name, o.uuid",
            vec![],
            page,
            provider_json,
        )
        .await?,
    ))
}

pub async fn get_provider(
    State(app): State<AppState>,
    _caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<ProviderAnswer>> {
    let sql = format!(
        "SELECT {PROVIDER_SELECT} FROM organizations o WHERE o.kind = 'provider' AND o.uuid = $1"
    );
    let row = sqlx::query(&sql)
        .bind(uuid.to_string())
        .fetch_optional(&app.db.pool)
        .await?
        .ok_or(ApiError::not_found("service provider"))?;
    Ok(Json(provider_json(&row)?))
}

// ---- public offerings: published agents ----

const OFFERING_SELECT: &str = "a.uuid, a.name, a.description, a.updated_at, a.org_uuid, o.name AS provider_name, c.uuid AS category_uuid, c.slug AS category_slug";
const OFFERING_FROM: &str = "FROM provider_agents a JOIN organizations o ON o.uuid = a.org_uuid LEFT JOIN categories c ON c.uuid = a.category_uuid WHERE a.status = 'published'";

pub async fn plans_json(db: &Db, agent: Uuid, only_active: bool) -> ApiResult<Vec<PlanAnswer>> {
    let sql = if only_active {
        "SELECT * FROM pricing_plans WHERE agent_uuid = $1 AND active = 1 ORDER BY price_cents, created_at"
    } else {
        "SELECT * FROM pricing_plans WHERE agent_uuid = $1 ORDER BY price_cents, created_at"
    };
    sqlx::query(sql)
        .bind(agent.to_string())
        .fetch_all(&db.pool)
        .await?
        .iter()
        .map(plan_json)
        .collect()
}

/// A pricing plan of an agent.
#[derive(Serialize, schemars::JsonSchema)]
pub struct PlanAnswer {
    uuid: Uuid,
    agent: Uuid,
    name: String,
    price_cents: i64,
    currency: String,
    /// `month` or `year`.
    interval: String,
    request_quota: Option<i64>,
    token_quota: Option<i64>,
    requests_per_minute: Option<i64>,
    burst: Option<i64>,
    max_concurrency: Option<i64>,
    /// Charged for use over the included quotas, through Stripe's meters.
    usage_cents_per_1k_tokens: Option<i64>,
    usage_cents_per_request: Option<i64>,
    active: bool,
}

pub fn plan_json(row: &AnyRow) -> ApiResult<PlanAnswer> {
    Ok(PlanAnswer {
        uuid: uuid_col(row, "uuid")?,
        agent: uuid_col(row, "agent_uuid")?,
        name: row.try_get("name")?,
        price_cents: row.try_get("price_cents")?,
        currency: row.try_get("currency")?,
        interval: row.try_get("billing_interval")?,
        request_quota: row.try_get("request_quota")?,
        token_quota: row.try_get("token_quota")?,
        requests_per_minute: row.try_get("requests_per_minute")?,
        burst: row.try_get("burst")?,
        max_concurrency: row.try_get("max_concurrency")?,
        usage_cents_per_1k_tokens: row.try_get("usage_cents_per_1k_tokens")?,
        usage_cents_per_request: row.try_get("usage_cents_per_request")?,
        active: row.try_get::<i64, _>("active")? != 0,
    })
}

/// Adds each offering's active plans, in one query for the page.
async fn attach_plans(db: &Db, offerings: &mut [OfferingAnswer]) -> ApiResult<()> {
    if offerings.is_empty() {
        return Ok(());
    }
    let ids: Vec<Arg> = offerings
        .iter()
        .map(|o| Arg::Text(o.uuid.to_string()))
        .collect();
    let marks: Vec<String> = (1..=ids.len()).map(|n| format!("${n}")).collect();
    let sql = format!(
        "SELECT * FROM pricing_plans WHERE active = 1 AND agent_uuid IN ({}) ORDER BY price_cents, created_at",
        marks.join(", ")
    );
    let rows = super::bind_all(sqlx::query(&sql), &ids)
        .fetch_all(&db.pool)
        .await?;
    let mut by_agent: std::collections::HashMap<Uuid, Vec<PlanAnswer>> =
        std::collections::HashMap::new();
    for row in &rows {
        let plan = plan_json(row)?;
        by_agent.entry(plan.agent).or_default().push(plan);
    }
    for offering in offerings {
        offering.plans = by_agent.remove(&offering.uuid).unwrap_or_default();
    }
    Ok(())
}

/// The seller of an offering.
#[derive(Serialize, schemars::JsonSchema)]
pub struct OfferingProvider {
    uuid: Uuid,
    name: String,
}

/// A field of the flow a buyer may set in its configuration: its name and
/// type, never the seller's default.
#[derive(Serialize, schemars::JsonSchema)]
pub struct ConfigurableField {
    node_id: String,
    component_type: String,
    field: String,
    field_type: String,
    display_name: Option<String>,
}

/// A published agent, as buyers see it.
#[derive(Serialize, schemars::JsonSchema)]
pub struct OfferingAnswer {
    uuid: Uuid,
    name: String,
    description: String,
    provider: OfferingProvider,
    category: Option<Uuid>,
    category_slug: Option<String>,
    updated_at: String,
    /// The active plans, cheapest first.
    plans: Vec<PlanAnswer>,
    /// One offering only: the model providers its flow names.
    #[serde(skip_serializing_if = "Option::is_none")]
    model_providers: Option<Vec<String>>,
    /// One offering only: the fields a configuration may set.
    #[serde(skip_serializing_if = "Option::is_none")]
    configurable_fields: Option<Vec<ConfigurableField>>,
}

fn offering_json(row: &AnyRow) -> ApiResult<OfferingAnswer> {
    Ok(OfferingAnswer {
        uuid: uuid_col(row, "uuid")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        provider: OfferingProvider {
            uuid: uuid_col(row, "org_uuid")?,
            name: row.try_get("provider_name")?,
        },
        category: opt_uuid_col(row, "category_uuid")?,
        category_slug: row.try_get("category_slug")?,
        updated_at: ts(row.try_get("updated_at")?),
        plans: Vec::new(),
        model_providers: None,
        configurable_fields: None,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferingQuery {
    search: Option<String>,
    /// A category uuid or slug.
    category: Option<String>,
    provider: Option<Uuid>,
    page: Option<u32>,
    page_size: Option<u32>,
}

pub async fn list_offerings(
    State(app): State<AppState>,
    _caller: Caller,
    ApiQuery(q): ApiQuery<OfferingQuery>,
) -> ApiResult<Json<Paged<OfferingAnswer>>> {
    let page = Page::new(q.page, q.page_size, app.limits.max_page_size)?;
    let mut from = OFFERING_FROM.to_owned();
    let mut args: Vec<Arg> = Vec::new();
    if let Some(search) = q.search.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        if search.chars().count() > 200 {
            return Err(ApiError::bad_request(
                "invalid_query",
                "search is limited to 200 characters",
            ));
        }
        // Every word must appear in the name or the description.
        for word in search.split_whitespace().take(10) {
            args.push(Arg::Text(like_pattern(word)));
            let n = args.len();
            from.push_str(&format!(" AND a.search_text LIKE ${n} ESCAPE '\\'"));
        }
    }
    if let Some(category) = q.category.as_deref() {
        args.push(Arg::from(category));
        let n = args.len();
        from.push_str(&format!(" AND (c.uuid = ${n} OR c.slug = ${n})"));
    }
    if let Some(provider) = q.provider {
        args.push(Arg::from(provider));
        from.push_str(&format!(" AND a.org_uuid = ${}", args.len()));
    }
    let mut page = fetch_page(
        &app.db,
        OFFERING_SELECT,
        &from,
        "a.name, a.uuid",
        args,
        page,
        offering_json,
    )
    .await?;
    attach_plans(&app.db, &mut page.results).await?;
    Ok(Json(page))
}

pub async fn get_offering(
    State(app): State<AppState>,
    _caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<OfferingAnswer>> {
    let sql = format!("SELECT {OFFERING_SELECT}, a.flow_summary {OFFERING_FROM} AND a.uuid = $1");
    let row = sqlx::query(&sql)
        .bind(uuid.to_string())
        .fetch_optional(&app.db.pool)
        .await?
        .ok_or(ApiError::not_found("offering"))?;
    let mut offering = offering_json(&row)?;
    offering.plans = plans_json(&app.db, uuid, true).await?;
    let summary: Option<String> = row.try_get("flow_summary")?;
    if let Some(summary) = summary.and_then(|s| serde_json::from_str::<FlowSummary>(&s).ok()) {
        offering.model_providers = Some(summary.model_providers);
        // Names and types only: defaults are the seller's (prompts, URLs, …).
        offering.configurable_fields = Some(
            summary
                .tweakable_fields
                .into_iter()
                .map(|f| ConfigurableField {
                    node_id: f.node_id,
                    component_type: f.component_type,
                    field: f.field,
                    field_type: f.field_type,
                    display_name: f.display_name,
                })
                .collect(),
        );
    }
    Ok(Json(offering))
}

// ---- orders and resources ----

/// An order of an offering's plan.
#[derive(Serialize, schemars::JsonSchema)]
pub struct OrderAnswer {
    uuid: Uuid,
    organization: Uuid,
    project: Option<Uuid>,
    offering: Uuid,
    plan: Uuid,
    /// `pending_payment`, `done` or `cancelled`.
    state: String,
    price_cents: i64,
    currency: String,
    /// Once done: the subscribed resource and the buyer's configuration.
    resource: Option<Uuid>,
    config: Option<Uuid>,
    created_at: String,
    completed_at: Option<String>,
}

fn order_json(row: &AnyRow) -> ApiResult<OrderAnswer> {
    Ok(OrderAnswer {
        uuid: uuid_col(row, "uuid")?,
        organization: uuid_col(row, "org_uuid")?,
        project: opt_uuid_col(row, "project_uuid")?,
        offering: uuid_col(row, "agent_uuid")?,
        plan: uuid_col(row, "plan_uuid")?,
        state: row.try_get("state")?,
        price_cents: row.try_get("price_cents")?,
        currency: row.try_get("currency")?,
        resource: opt_uuid_col(row, "resource_uuid")?,
        config: opt_uuid_col(row, "config_uuid")?,
        created_at: ts(row.try_get("created_at")?),
        completed_at: opt_ts(row.try_get("completed_at")?),
    })
}

const ORDER_SELECT: &str = "o.*, r.uuid AS resource_uuid, c.uuid AS config_uuid";
const ORDER_FROM: &str = "FROM orders o LEFT JOIN resources r ON r.order_uuid = o.uuid LEFT JOIN agent_configs c ON c.resource_uuid = r.uuid";

pub async fn list_orders(
    State(app): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<Paged<OrderAnswer>>> {
    let page = Page::new(q.page, q.page_size, app.limits.max_page_size)?;
    Ok(Json(
        ORDERS
            .page(
                &app.db,
                &caller,
                page,
                ALL,
                "o.created_at DESC, o.uuid",
                order_json,
            )
            .await?,
    ))
}

pub(crate) const ORDERS: Owned = Owned {
    select: ORDER_SELECT,
    from: ORDER_FROM,
    id: "o.uuid",
    org: "o.org_uuid",
    what: "order",
};

async fn load_order(db: &Db, caller: &Caller, uuid: Uuid) -> ApiResult<OrderAnswer> {
    order_json(&ORDERS.one(db, caller, uuid).await?)
}

pub async fn get_order(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<OrderAnswer>> {
    Ok(Json(load_order(&app.db, &caller, uuid).await?))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    offering: Uuid,
    plan: Uuid,
    organization: Option<Uuid>,
    project: Option<Uuid>,
    /// The name of the buyer's copy; defaults to the agent's name.
    name: Option<String>,
}

/// Orders an offering's plan. A free plan completes at once (resource and
/// agent config created); a paid plan waits in `pending_payment`.
pub async fn create_order(
    State(app): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<NewOrder>,
) -> ApiResult<(StatusCode, Json<OrderAnswer>)> {
    let org = caller.org_of_kind(OrgKind::Customer, body.organization)?;
    caller.require_admin(org)?;
    // Checked in the order's transaction, so a plan archived meanwhile can't be ordered.
    let mut tx = app.db.pool.begin().await?;
    crate::db::lock_for_write(&mut tx).await?;
    let agent =
        sqlx::query("SELECT name FROM provider_agents WHERE uuid = $1 AND status = 'published'")
            .bind(body.offering.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(ApiError::not_found("offering"))?;
    let agent_name: String = agent.try_get("name")?;
    let plan = sqlx::query("SELECT price_cents, currency, usage_cents_per_1k_tokens, usage_cents_per_request FROM pricing_plans WHERE uuid = $1 AND agent_uuid = $2 AND active = 1")
        .bind(body.plan.to_string())
        .bind(body.offering.to_string())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(ApiError::not_found("plan"))?;
    if let Some(project) = body.project {
        sqlx::query("SELECT uuid FROM projects WHERE uuid = $1 AND org_uuid = $2")
            .bind(project.to_string())
            .bind(org.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(ApiError::not_found("project"))?;
    }
    let default_name: String = agent_name.chars().take(100).collect();
    let name = text_field(
        "name",
        body.name.as_deref().unwrap_or(&default_name),
        1,
        100,
    )?;
    let price: i64 = plan.try_get("price_cents")?;
    let currency: String = plan.try_get("currency")?;
    // A plan that charges for use needs a way to pay, even at no base price.
    let free = price == 0
        && plan
            .try_get::<Option<i64>, _>("usage_cents_per_1k_tokens")?
            .is_none()
        && plan
            .try_get::<Option<i64>, _>("usage_cents_per_request")?
            .is_none();
    let uuid = Uuid::new_v4();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO orders (uuid, org_uuid, project_uuid, agent_uuid, plan_uuid, state, price_cents, currency, created_by, created_at, config_name) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(uuid.to_string())
    .bind(org.to_string())
    .bind(body.project.map(|p| p.to_string()))
    .bind(body.offering.to_string())
    .bind(body.plan.to_string())
    .bind(OrderState::PendingPayment.as_str())
    .bind(price)
    .bind(&currency)
    .bind(caller.user.to_string())
    .bind(now)
    .bind(&name)
    .execute(&mut *tx)
    .await?;
    if free {
        complete_order(&mut tx, uuid, &name).await?;
    }
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(load_order(&app.db, &caller, uuid).await?),
    ))
}

/// Completes a pending order: marks it done and creates the resource and the
/// buyer's agent configuration, in the caller's transaction. Completing an
/// order twice does nothing the second time. Returns the config uuid.
pub async fn complete_order(
    tx: &mut sqlx::AnyConnection,
    order: Uuid,
    config_name: &str,
) -> ApiResult<Option<Uuid>> {
    let now = now_ms();
    let updated = sqlx::query("UPDATE orders SET state = 'done', completed_at = $2 WHERE uuid = $1 AND state = 'pending_payment'")
        .bind(order.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    if updated.rows_affected() == 0 {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT org_uuid, project_uuid, agent_uuid, plan_uuid FROM orders WHERE uuid = $1",
    )
    .bind(order.to_string())
    .fetch_one(&mut *tx)
    .await?;
    let resource = Uuid::new_v4();
    sqlx::query("INSERT INTO resources (uuid, org_uuid, order_uuid, agent_uuid, plan_uuid, state, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
        .bind(resource.to_string())
        .bind(row.try_get::<String, _>("org_uuid")?)
        .bind(order.to_string())
        .bind(row.try_get::<String, _>("agent_uuid")?)
        .bind(row.try_get::<String, _>("plan_uuid")?)
        .bind(ResourceState::Active.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    let config = Uuid::new_v4();
    sqlx::query("INSERT INTO agent_configs (uuid, org_uuid, resource_uuid, agent_uuid, project_uuid, name, greeting, tone, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)")
        .bind(config.to_string())
        .bind(row.try_get::<String, _>("org_uuid")?)
        .bind(resource.to_string())
        .bind(row.try_get::<String, _>("agent_uuid")?)
        .bind(row.try_get::<Option<String>, _>("project_uuid")?)
        .bind(config_name)
        .bind(format!("Hi! I'm {config_name}. How can I help?"))
        .bind(Tone::Professional.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    bump_revision(tx).await?;
    Ok(Some(config))
}

/// A subscribed resource: what a done order gives.
#[derive(Serialize, schemars::JsonSchema)]
pub struct ResourceAnswer {
    uuid: Uuid,
    organization: Uuid,
    order: Uuid,
    offering: Uuid,
    offering_name: String,
    plan: Uuid,
    /// `active`, `suspended` or `terminated`.
    state: String,
    config: Option<Uuid>,
    created_at: String,
}

fn resource_json(row: &AnyRow) -> ApiResult<ResourceAnswer> {
    Ok(ResourceAnswer {
        uuid: uuid_col(row, "uuid")?,
        organization: uuid_col(row, "org_uuid")?,
        order: uuid_col(row, "order_uuid")?,
        offering: uuid_col(row, "agent_uuid")?,
        offering_name: row.try_get("agent_name")?,
        plan: uuid_col(row, "plan_uuid")?,
        state: row.try_get("state")?,
        config: opt_uuid_col(row, "config_uuid")?,
        created_at: ts(row.try_get("created_at")?),
    })
}

const RESOURCE_SELECT: &str = "r.*, a.name AS agent_name, c.uuid AS config_uuid";
const RESOURCE_FROM: &str = "FROM resources r JOIN provider_agents a ON a.uuid = r.agent_uuid LEFT JOIN agent_configs c ON c.resource_uuid = r.uuid";

const RESOURCES: Owned = Owned {
    select: RESOURCE_SELECT,
    from: RESOURCE_FROM,
    id: "r.uuid",
    org: "r.org_uuid",
    what: "resource",
};

pub async fn list_resources(
    State(app): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<Paged<ResourceAnswer>>> {
    let page = Page::new(q.page, q.page_size, app.limits.max_page_size)?;
    Ok(Json(
        RESOURCES
            .page(
                &app.db,
                &caller,
                page,
                ALL,
                "r.created_at DESC, r.uuid",
                resource_json,
            )
            .await?,
    ))
}

pub async fn get_resource(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<ResourceAnswer>> {
    Ok(Json(resource_json(
        &RESOURCES.one(&app.db, &caller, uuid).await?,
    )?))
}
