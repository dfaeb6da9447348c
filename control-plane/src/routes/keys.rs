use agora_config::keys::{ApiKey, Claims, KeyKind, Mode, Scope};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::configs::load_config;
use super::Owned;
use crate::db::{bump_revision, now_ms, uuid_col};
use crate::domain::{opt_ts, text_field, ts};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, Caller};
use crate::AppState;
use agora_config::snapshot::KeyStatus;

/// What a key listing shows: never the secret, only its display prefix.
#[derive(Serialize, schemars::JsonSchema)]
pub struct KeyAnswer {
    uuid: Uuid,
    config: Uuid,
    name: String,
    prefix: String,
    /// `secret` or `publishable`.
    kind: String,
    /// `live` or `test`.
    mode: String,
    scopes: Vec<String>,
    allowed_origins: Vec<String>,
    /// `active` or `revoked`.
    status: String,
    created_at: String,
    last_used_at: Option<String>,
    expires_at: Option<String>,
    revoked_at: Option<String>,
}

/// A key just issued: its listing and, this once, the key itself.
#[derive(Serialize, schemars::JsonSchema)]
pub struct IssuedKey {
    #[serde(flatten)]
    listing: KeyAnswer,
    /// The key; it is not stored and never shown again.
    key: String,
}

fn key_json(row: &AnyRow) -> ApiResult<KeyAnswer> {
    let scopes: String = row.try_get("scopes")?;
    let origins: String = row.try_get("allowed_origins")?;
    Ok(KeyAnswer {
        uuid: uuid_col(row, "uuid")?,
        config: uuid_col(row, "config_uuid")?,
        name: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        kind: row.try_get("kind")?,
        mode: row.try_get("mode")?,
        scopes: scopes
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        allowed_origins: serde_json::from_str(&origins).unwrap_or_default(),
        status: row.try_get("status")?,
        created_at: ts(row.try_get("created_at")?),
        last_used_at: opt_ts(row.try_get("last_used_at")?),
        expires_at: opt_ts(row.try_get("expires_at")?),
        revoked_at: opt_ts(row.try_get("revoked_at")?),
    })
}

pub async fn list_keys(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(config): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<KeyAnswer>>> {
    load_config(&app.db, &caller, config).await?;
    let keys =
        sqlx::query("SELECT * FROM api_keys WHERE config_uuid = $1 ORDER BY created_at, uuid")
            .bind(config.to_string())
            .fetch_all(&app.db.pool)
            .await?
            .iter()
            .map(key_json)
            .collect::<ApiResult<Vec<_>>>()?;
    Ok(Json(keys))
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestedKind {
    Secret,
    Publishable,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    name: Option<String>,
    kind: Option<RequestedKind>,
    mode: Option<Mode>,
    scopes: Option<Vec<Scope>>,
    expires_in_days: Option<u32>,
    /// Required for publishable (browser) keys: the origins allowed to use it.
    allowed_origins: Option<Vec<String>>,
}

/// Issues a key for the configuration. The response is the only time the
/// secret is shown; the database keeps its SHA-256.
pub async fn issue_key(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(config): ApiPath<Uuid>,
    ApiJson(body): ApiJson<NewKey>,
) -> ApiResult<(StatusCode, Json<IssuedKey>)> {
    let row = load_config(&app.db, &caller, config).await?;
    let org = uuid_col(&row, "org_uuid")?;
    caller.require_admin(org)?;
    if row.try_get::<String, _>("resource_state")? != "active" {
        return Err(ApiError::conflict(
            "subscription_inactive",
            "the subscription is not active",
        ));
    }
    let requested = body.kind.unwrap_or(RequestedKind::Secret);
    let mode = body.mode.unwrap_or(Mode::Live);
    let kind = match (requested, mode) {
        (RequestedKind::Secret, Mode::Live) => KeyKind::SecretLive,
        (RequestedKind::Secret, Mode::Test) => KeyKind::SecretTest,
        (RequestedKind::Publishable, Mode::Live) => KeyKind::PublishableLive,
        (RequestedKind::Publishable, Mode::Test) => {
            return Err(ApiError::bad_request(
                "invalid_field",
                "publishable keys exist in live mode only",
            ))
        }
    };
    let mut scopes = body.scopes.clone().unwrap_or_else(|| vec![Scope::Invoke]);
    scopes.sort();
    scopes.dedup();
    if scopes.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_field",
            "scopes must not be empty",
        ));
    }
    let mut origins = body.allowed_origins.clone().unwrap_or_default();
    if kind.is_publishable() {
        if scopes != [Scope::Invoke] {
            return Err(ApiError::bad_request(
                "invalid_field",
                "publishable keys carry only the invoke scope",
            ));
        }
        origins = match crate::widget::origins(&origins) {
            Ok(valid) if !valid.is_empty() => valid,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_field",
                    "publishable keys need 1 to 20 allowed_origins like https://example.com",
                ))
            }
        };
    } else if !origins.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_field",
            "allowed_origins applies to publishable keys only",
        ));
    }
    let name = text_field("name", body.name.as_deref().unwrap_or("default"), 1, 100)?;
    let now = now_ms();
    let expires_at = match body.expires_in_days {
        Some(0) | Some(3651..) => {
            return Err(ApiError::bad_request(
                "invalid_field",
                "expires_in_days must be between 1 and 3650",
            ))
        }
        Some(days) => Some(now + i64::from(days) * 86_400_000),
        None => None,
    };
    let spec = KeySpec {
        name,
        kind,
        scopes,
        origins,
        expires_at,
    };
    let project = crate::db::opt_uuid_col(&row, "project_uuid")?;
    let (uuid, key) = store_key(&app, org, config, project, caller.user, &spec).await?;
    let stored = sqlx::query("SELECT * FROM api_keys WHERE uuid = $1")
        .bind(uuid.to_string())
        .fetch_one(&app.db.pool)
        .await?;
    let out = IssuedKey {
        listing: key_json(&stored)?,
        key: key.expose_secret().to_owned(),
    };
    Ok((StatusCode::CREATED, Json(out)))
}

const KEYS: Owned = Owned {
    select: "org_uuid, status",
    from: "FROM api_keys",
    id: "uuid",
    org: "org_uuid",
    what: "api key",
};

/// Active keys one configuration may have.
pub const MAX_ACTIVE_KEYS: i64 = 50;

/// What a new key is: validated by the caller.
pub struct KeySpec {
    pub name: String,
    pub kind: KeyKind,
    pub scopes: Vec<Scope>,
    pub origins: Vec<String>,
    /// Unix milliseconds.
    pub expires_at: Option<i64>,
}

/// Signs a key for `config` and stores its hash, bumping the data-plane
/// revision. Returns the key: the only copy of the secret.
pub async fn store_key(
    app: &AppState,
    org: Uuid,
    config: Uuid,
    project: Option<Uuid>,
    created_by: Uuid,
    spec: &KeySpec,
) -> ApiResult<(Uuid, ApiKey)> {
    let uuid = Uuid::new_v4();
    let now = now_ms();
    let claims = Claims {
        jti: uuid,
        cfg: config,
        ten: org,
        prj: project,
        scp: spec.scopes.clone(),
        iat: now / 1000,
        nbf: None,
        exp: spec.expires_at.map(|e| e / 1000),
        mode: spec.kind.mode(),
    };
    let key = app
        .signer
        .issue(spec.kind, &claims)
        .map_err(|e| ApiError::Unexpected(anyhow::anyhow!("signing key: {e}")))?;
    let scopes = spec
        .scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let mut tx = app.db.pool.begin().await?;
    // Counted under the configuration's row lock, so concurrent issues cannot
    // pass the cap together.
    crate::db::lock_row(&mut tx, "agent_configs", config).await?;
    let active: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM api_keys WHERE config_uuid = $1 AND status = 'active'",
    )
    .bind(config.to_string())
    .fetch_one(&mut *tx)
    .await?
    .try_get("n")?;
    if active >= MAX_ACTIVE_KEYS {
        return Err(ApiError::conflict(
            "key_limit",
            format!("a configuration has at most {MAX_ACTIVE_KEYS} active keys; revoke one first"),
        ));
    }
    // Only a publishable key's text is kept (it is public by design).
    let public_value = spec
        .kind
        .is_publishable()
        .then(|| key.expose_secret().to_owned());
    sqlx::query("INSERT INTO api_keys (uuid, org_uuid, config_uuid, name, kind, mode, scopes, allowed_origins, key_hash, prefix, kid, status, created_by, created_at, expires_at, public_value) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'active', $12, $13, $14, $15)")
        .bind(uuid.to_string())
        .bind(org.to_string())
        .bind(config.to_string())
        .bind(&spec.name)
        .bind(kind_text(spec.kind))
        .bind(mode_text(spec.kind.mode()))
        .bind(scopes)
        .bind(serde_json::to_string(&spec.origins).map_err(anyhow::Error::from)?)
        .bind(key.hash().to_hex())
        .bind(key.display_prefix())
        .bind(app.signer.kid())
        .bind(created_by.to_string())
        .bind(now)
        .bind(spec.expires_at)
        .bind(public_value)
        .execute(&mut *tx)
        .await?;
    bump_revision(&mut tx).await?;
    tx.commit().await?;
    Ok((uuid, key))
}

/// How a key kind is stored: the `kind` and `mode` columns.
fn kind_text(kind: KeyKind) -> &'static str {
    if kind.is_publishable() {
        "publishable"
    } else {
        "secret"
    }
}

fn mode_text(mode: Mode) -> &'static str {
    match mode {
        Mode::Live => "live",
        Mode::Test => "test",
    }
}

/// The key kind stored as `kind` and `mode` (the inverse of the two above).
pub(crate) fn stored_kind(kind: &str, mode: &str) -> anyhow::Result<KeyKind> {
    [
        KeyKind::SecretLive,
        KeyKind::SecretTest,
        KeyKind::PublishableLive,
    ]
    .into_iter()
    .find(|k| kind_text(*k) == kind && mode_text(k.mode()) == mode)
    .ok_or_else(|| anyhow::anyhow!("stored key kind {kind:?}, mode {mode:?}"))
}

/// Revokes a key; revoking twice is harmless.
pub async fn revoke_key(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<KeyAnswer>> {
    let row = KEYS.one(&app.db, &caller, uuid).await?;
    caller.require_admin(uuid_col(&row, "org_uuid")?)?;
    if row.try_get::<String, _>("status")? == KeyStatus::Active.as_str() {
        let mut tx = app.db.pool.begin().await?;
        sqlx::query("UPDATE api_keys SET status = 'revoked', revoked_at = $2 WHERE uuid = $1 AND status = 'active'")
            .bind(uuid.to_string())
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        bump_revision(&mut tx).await?;
        tx.commit().await?;
    }
    let row = sqlx::query("SELECT * FROM api_keys WHERE uuid = $1")
        .bind(uuid.to_string())
        .fetch_one(&app.db.pool)
        .await?;
    Ok(Json(key_json(&row)?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn stored_kinds_round_trip() {
        use agora_config::keys::KeyKind;
        for kind in [
            KeyKind::SecretLive,
            KeyKind::SecretTest,
            KeyKind::PublishableLive,
        ] {
            let stored = (super::kind_text(kind), super::mode_text(kind.mode()));
            assert_eq!(super::stored_kind(stored.0, stored.1).unwrap(), kind);
        }
        assert!(super::stored_kind("publishable", "test").is_err());
    }
}
