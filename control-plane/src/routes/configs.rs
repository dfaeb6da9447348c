use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{Owned, PageQuery, ALL};
use crate::db::{bump_revision, now_ms, opt_uuid_col, uuid_col, Db};
use crate::domain::{text_field, ts, Page, Paged, Tone};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::widget::{self, Position};
use crate::AppState;

const CONFIG_SELECT: &str = "c.*, a.name AS agent_name, r.state AS resource_state, r.plan_uuid";
const CONFIG_FROM: &str = "FROM agent_configs c JOIN provider_agents a ON a.uuid = c.agent_uuid JOIN resources r ON r.uuid = c.resource_uuid";

const CONFIGS: Owned = Owned {
    select: CONFIG_SELECT,
    from: CONFIG_FROM,
    id: "c.uuid",
    org: "c.org_uuid",
    what: "agent config",
};

/// A buyer's configured copy of an agent.
#[derive(Serialize, schemars::JsonSchema)]
pub struct ConfigAnswer {
    uuid: Uuid,
    organization: Uuid,
    project: Option<Uuid>,
    resource: Uuid,
    resource_state: String,
    plan: Uuid,
    agent: Uuid,
    agent_name: String,
    name: String,
    greeting: String,
    tone: String,
    created_at: String,
    updated_at: String,
    /// Its embeddable chat widget.
    widget: WidgetAnswer,
    /// Its knowledge documents (in the answer for one configuration).
    #[serde(skip_serializing_if = "Option::is_none")]
    knowledge_documents: Option<Vec<KnowledgeDocument>>,
}

/// A configuration's chat widget: where it may be embedded and how it looks.
#[derive(Serialize, schemars::JsonSchema)]
pub struct WidgetAnswer {
    /// Origins (`https://host[:port]`) its publishable keys work from.
    allowed_origins: Vec<String>,
    /// Empty: the configuration's name.
    title: String,
    accent_color: String,
    position: Position,
    launcher_text: String,
}

fn widget_answer(row: &AnyRow) -> ApiResult<WidgetAnswer> {
    Ok(WidgetAnswer {
        allowed_origins: serde_json::from_str(&row.try_get::<String, _>("widget_allowed_origins")?)
            .map_err(anyhow::Error::from)?,
        title: row.try_get("widget_title")?,
        accent_color: row.try_get("widget_accent_color")?,
        position: Position::parse_stored(&row.try_get::<String, _>("widget_position")?),
        launcher_text: row.try_get("widget_launcher_text")?,
    })
}

/// A knowledge document of a configuration.
#[derive(Serialize, schemars::JsonSchema)]
pub struct KnowledgeDocument {
    uuid: Uuid,
    filename: String,
    content_type: String,
    size_bytes: i64,
}

fn config_json(row: &AnyRow) -> ApiResult<ConfigAnswer> {
    Ok(ConfigAnswer {
        uuid: uuid_col(row, "uuid")?,
        organization: uuid_col(row, "org_uuid")?,
        project: opt_uuid_col(row, "project_uuid")?,
        resource: uuid_col(row, "resource_uuid")?,
        resource_state: row.try_get("resource_state")?,
        plan: uuid_col(row, "plan_uuid")?,
        agent: uuid_col(row, "agent_uuid")?,
        agent_name: row.try_get("agent_name")?,
        name: row.try_get("name")?,
        greeting: row.try_get("greeting")?,
        tone: row.try_get("tone")?,
        created_at: ts(row.try_get("created_at")?),
        updated_at: ts(row.try_get("updated_at")?),
        widget: widget_answer(row)?,
        knowledge_documents: None,
    })
}

/// The caller's configuration row, or 404.
pub async fn load_config(db: &Db, caller: &Caller, uuid: Uuid) -> ApiResult<AnyRow> {
    CONFIGS.one(db, caller, uuid).await
}

async fn config_with_documents(db: &Db, row: &AnyRow) -> ApiResult<ConfigAnswer> {
    let mut config = config_json(row)?;
    let docs = sqlx::query("SELECT uuid, filename, content_type, size_bytes FROM training_documents WHERE config_uuid = $1 ORDER BY created_at, uuid")
        .bind(uuid_col(row, "uuid")?.to_string())
        .fetch_all(&db.pool)
        .await?
        .iter()
        .map(|d| {
            Ok(KnowledgeDocument {
                uuid: uuid_col(d, "uuid")?,
                filename: d.try_get("filename")?,
                content_type: d.try_get("content_type")?,
                size_bytes: d.try_get("size_bytes")?,
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    config.knowledge_documents = Some(docs);
    Ok(config)
}

pub async fn list_configs(
    State(app): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<Paged<ConfigAnswer>>> {
    let page = Page::new(q.page, q.page_size, app.limits.max_page_size)?;
    Ok(Json(
        CONFIGS
            .page(
                &app.db,
                &caller,
                page,
                ALL,
                "c.created_at, c.uuid",
                config_json,
            )
            .await?,
    ))
}

pub async fn get_config(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<ConfigAnswer>> {
    let row = load_config(&app.db, &caller, uuid).await?;
    Ok(Json(config_with_documents(&app.db, &row).await?))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    name: Option<String>,
    greeting: Option<String>,
    tone: Option<Tone>,
    /// The complete set of knowledge documents (replaces the current set).
    knowledge_documents: Option<Vec<Uuid>>,
    /// Widget settings to change (fields left out stay as they are).
    widget: Option<WidgetPatch>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WidgetPatch {
    /// The complete list (replaces the current one), at most 20.
    allowed_origins: Option<Vec<String>>,
    title: Option<String>,
    /// `#rrggbb`.
    accent_color: Option<String>,
    position: Option<Position>,
    launcher_text: Option<String>,
}

pub async fn update_config(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
    ApiJson(body): ApiJson<ConfigPatch>,
) -> ApiResult<Json<ConfigAnswer>> {
    let row = load_config(&app.db, &caller, uuid).await?;
    let org = uuid_col(&row, "org_uuid")?;
    caller.require_admin(org)?;
    let name = match &body.name {
        Some(n) => text_field("name", n, 1, 100)?,
        None => row.try_get("name")?,
    };
    let greeting = match &body.greeting {
        Some(g) => text_field("greeting", g, 0, 1000)?,
        None => row.try_get("greeting")?,
    };
    let tone = match body.tone {
        Some(t) => t,
        None => crate::domain::parse_stored(&row.try_get::<String, _>("tone")?)?,
    };
    if let Some(docs) = &body.knowledge_documents {
        if docs.len() > 100 {
            return Err(ApiError::bad_request(
                "invalid_field",
                "at most 100 knowledge documents",
            ));
        }
        for doc in docs {
            sqlx::query("SELECT uuid FROM training_documents WHERE uuid = $1 AND org_uuid = $2")
                .bind(doc.to_string())
                .bind(org.to_string())
                .fetch_optional(&app.db.pool)
                .await?
                .ok_or(ApiError::not_found("training document"))?;
        }
    }
    let mut look = widget_answer(&row)?;
    if let Some(w) = &body.widget {
        if let Some(o) = &w.allowed_origins {
            look.allowed_origins = widget::origins(o)?;
        }
        if let Some(t) = &w.title {
            look.title = text_field("widget.title", t, 0, 80)?;
        }
        if let Some(c) = &w.accent_color {
            look.accent_color = widget::accent_color(c)?;
        }
        if let Some(p) = w.position {
            look.position = p;
        }
        if let Some(t) = &w.launcher_text {
            look.launcher_text = text_field("widget.launcher_text", t, 1, 40)?;
        }
    }
    let mut tx = app.db.pool.begin().await?;
    sqlx::query("UPDATE agent_configs SET name = $2, greeting = $3, tone = $4, updated_at = $5, widget_allowed_origins = $6, widget_title = $7, widget_accent_color = $8, widget_position = $9, widget_launcher_text = $10 WHERE uuid = $1")
        .bind(uuid.to_string())
        .bind(&name)
        .bind(&greeting)
        .bind(tone.as_str())
        .bind(now_ms())
        .bind(serde_json::to_string(&look.allowed_origins).map_err(anyhow::Error::from)?)
        .bind(&look.title)
        .bind(&look.accent_color)
        .bind(look.position.as_str())
        .bind(&look.launcher_text)
        .execute(&mut *tx)
        .await?;
    if let Some(docs) = &body.knowledge_documents {
        sqlx::query("UPDATE training_documents SET config_uuid = NULL WHERE config_uuid = $1")
            .bind(uuid.to_string())
            .execute(&mut *tx)
            .await?;
        for doc in docs {
            sqlx::query(
                "UPDATE training_documents SET config_uuid = $1 WHERE uuid = $2 AND org_uuid = $3",
            )
            .bind(uuid.to_string())
            .bind(doc.to_string())
            .bind(org.to_string())
            .execute(&mut *tx)
            .await?;
        }
    }
    bump_revision(&mut tx).await?;
    tx.commit().await?;
    let row = load_config(&app.db, &caller, uuid).await?;
    Ok(Json(config_with_documents(&app.db, &row).await?))
}
