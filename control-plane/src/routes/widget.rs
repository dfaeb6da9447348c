//! The snippet that embeds a config's chat widget on a site.

use agora_config::keys::{KeyKind, Scope};
use axum::extract::State;
use axum::Json;
use serde::Serialize;
use sqlx::Row;
use uuid::Uuid;

use super::configs::load_config;
use super::keys::{store_key, KeySpec};
use crate::db::{opt_uuid_col, uuid_col};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, Caller};
use crate::AppState;

/// What a site owner pastes, and what the site's pages must allow.
#[derive(Serialize, schemars::JsonSchema)]
pub struct WidgetEmbed {
    /// One `<script async>` tag for the page's `<body>`.
    snippet: String,
    /// The publishable key in it (`ar_pk_live_…`): public by design, usable
    /// only from `allowed_origins`, only to open visitor sessions.
    publishable_key: String,
    key_id: Uuid,
    allowed_origins: Vec<String>,
    /// The one source a page's Content-Security-Policy must allow in both
    /// `script-src` and `connect-src`.
    gateway_origin: String,
}

/// The config's widget snippet, for its newest publishable key, issued now
/// if it has none.
pub async fn widget_embed(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(config): ApiPath<Uuid>,
) -> ApiResult<Json<WidgetEmbed>> {
    let row = load_config(&app.db, &caller, config).await?;
    let org = uuid_col(&row, "org_uuid")?;
    caller.require_admin(org)?;
    if row.try_get::<String, _>("resource_state")? != "active" {
        return Err(ApiError::conflict(
            "subscription_inactive",
            "the subscription is not active",
        ));
    }
    let allowed_origins: Vec<String> =
        serde_json::from_str(&row.try_get::<String, _>("widget_allowed_origins")?)
            .map_err(anyhow::Error::from)?;
    if allowed_origins.is_empty() {
        return Err(ApiError::conflict(
            "widget_origins_required",
            "set the sites the widget may be embedded on first: PATCH this configuration with {\"widget\": {\"allowed_origins\": [\"https://shop.example.com\"]}}",
        ));
    }
    let project = opt_uuid_col(&row, "project_uuid")?;
    let (key_id, publishable_key) = widget_key(&app, org, config, project, caller.user).await?;
    let gateway = app.gateway_url();
    Ok(Json(WidgetEmbed {
        snippet: crate::widget::snippet(&gateway, &publishable_key),
        publishable_key,
        key_id,
        allowed_origins,
        gateway_origin: gateway_origin(&gateway),
    }))
}

/// The config's newest publishable key with its text, issued now if it has
/// none; its origins are the config's widget origins, which stay editable.
pub async fn widget_key(
    app: &AppState,
    org: Uuid,
    config: Uuid,
    project: Option<Uuid>,
    user: Uuid,
) -> ApiResult<(Uuid, String)> {
    let existing = sqlx::query(
        "SELECT uuid, public_value FROM api_keys WHERE config_uuid = $1 AND kind = 'publishable' AND status = 'active' AND public_value IS NOT NULL ORDER BY created_at DESC, uuid LIMIT 1",
    )
    .bind(config.to_string())
    .fetch_optional(&app.db.pool)
    .await?;
    if let Some(k) = existing {
        return Ok((uuid_col(&k, "uuid")?, k.try_get("public_value")?));
    }
    let spec = KeySpec {
        name: "widget".into(),
        kind: KeyKind::PublishableLive,
        scopes: vec![Scope::Invoke],
        origins: Vec::new(),
        expires_at: None,
    };
    let (id, key) = store_key(app, org, config, project, user, &spec).await?;
    Ok((id, key.expose_secret().to_owned()))
}

/// `scheme://host[:port]` of a URL.
fn gateway_origin(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.split('/').next().unwrap_or(rest);
            format!("{scheme}://{host}")
        }
        None => url.to_owned(),
    }
}
