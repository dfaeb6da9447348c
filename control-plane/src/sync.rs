//! Compiles the control plane's truth into the data-plane [`Snapshot`] the
//! proxy serves from, and serves it at `GET /internal/v1/snapshot`.
//!
//! The snapshot is read in one transaction (repeatable read on Postgres, a
//! single read snapshot on SQLite), so its `revision` and its contents agree.
//! Every change the proxy must see bumps the revision in the same transaction
//! as the change itself ([`crate::db::bump_revision`]).
//!
//! `GET /internal/v1/changes?since=REV&timeout_ms=N` long-polls: it answers
//! as soon as the revision passes `since` — with a [`Delta`] when this replica
//! still holds the snapshot at `since`, else the full snapshot — or with
//! `unchanged` when the timeout (at most [`MAX_LONG_POLL`]) passes first.
//! Replicas learn of each other's changes through Postgres LISTEN/NOTIFY on
//! [`REVISION_CHANNEL`], with a poll of the revision as the safety net (and
//! as the only mechanism on SQLite, which has one writer process).
//!
//! The feed is authenticated with the proxy secret (`Authorization: Bearer`),
//! compared in constant time. Without a configured secret the feed is off and
//! its routes answer 404.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agora_config::keys::{KeyHash, Scope};
use agora_config::snapshot::{
    AgentRoute, BillingInterval, Changes, KeyEntry, KeyStatus, PlanLimits, QuotaUsage, Snapshot,
    WidgetSettings,
};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use secrecy::ExposeSecret;
use sqlx::Row;
use subtle::ConstantTimeEq;

use crate::db::{current_revision, now_ms, opt_uuid_col, uuid_col, Db, Dialect, REVISION_CHANNEL};
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiQuery;
use crate::AppState;

/// Compiles the current snapshot. `runtime_url` is where published flows run.
pub async fn compile(db: &Db, runtime_url: Option<&str>) -> anyhow::Result<Snapshot> {
    let mut tx = db.pool.begin().await?;
    if db.dialect == Dialect::Postgres {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
    }
    let revision: i64 = sqlx::query("SELECT revision FROM config_revision WHERE id = 1")
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;

    let mut snapshot = Snapshot::empty();
    snapshot.revision = u64::try_from(revision)?;
    snapshot.generated_at_ms = now_ms();

    let signing =
        sqlx::query("SELECT kid, public_key FROM signing_keys WHERE active = 1 ORDER BY kid")
            .fetch_all(&mut *tx)
            .await?;
    for row in &signing {
        snapshot
            .verification_keys
            .push(agora_config::keys::VerificationKey {
                kid: row.try_get("kid")?,
                public_key: row.try_get("public_key")?,
            });
    }

    let keys = sqlx::query(
        "SELECT k.uuid, k.config_uuid, k.org_uuid, k.kind, k.mode, k.scopes, k.allowed_origins, k.key_hash, k.status, k.expires_at, \
                c.project_uuid, r.state AS resource_state, r.plan_uuid \
         FROM api_keys k JOIN agent_configs c ON c.uuid = k.config_uuid JOIN resources r ON r.uuid = c.resource_uuid",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut origins: BTreeMap<uuid::Uuid, Vec<String>> = BTreeMap::new();
    for row in &keys {
        let kind = crate::routes::keys::stored_kind(
            &row.try_get::<String, _>("kind")?,
            &row.try_get::<String, _>("mode")?,
        )?;
        let status = match (
            row.try_get::<String, _>("status")?.as_str(),
            row.try_get::<String, _>("resource_state")?.as_str(),
        ) {
            ("revoked", _) => KeyStatus::Revoked,
            (_, "active") => KeyStatus::Active,
            _ => KeyStatus::Suspended,
        };
        let scopes = row
            .try_get::<String, _>("scopes")?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<Scope>()
                    .map_err(|_| anyhow::anyhow!("stored scope {s:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let config = uuid_col(row, "config_uuid")?;
        if kind.is_publishable() && status == KeyStatus::Active {
            let allowed: Vec<String> =
                serde_json::from_str(&row.try_get::<String, _>("allowed_origins")?)?;
            origins.entry(config).or_default().extend(allowed);
        }
        let hash = KeyHash::from_hex(&row.try_get::<String, _>("key_hash")?)
            .map_err(|e| anyhow::anyhow!("stored key hash: {e}"))?;
        snapshot.keys.insert(
            hash,
            KeyEntry {
                key_id: uuid_col(row, "uuid")?,
                kind,
                config,
                tenant: uuid_col(row, "org_uuid")?,
                project: opt_uuid_col(row, "project_uuid")?,
                scopes,
                status,
                plan: Some(uuid_col(row, "plan_uuid")?),
                mode: kind.mode(),
                expires_at: row
                    .try_get::<Option<i64>, _>("expires_at")?
                    .map(|ms| ms / 1000),
            },
        );
    }

    let configs = sqlx::query(
        "SELECT c.uuid, c.agent_uuid, c.org_uuid, c.name, c.greeting, c.tone, a.runtime_flow_id, \
                c.widget_allowed_origins, c.widget_title, c.widget_accent_color, c.widget_position, c.widget_launcher_text, \
                q.period_start, q.period_end, q.counted_at, q.requests, q.tokens \
         FROM agent_configs c JOIN provider_agents a ON a.uuid = c.agent_uuid \
         LEFT JOIN quota_usage q ON q.config_uuid = c.uuid",
    )
    .fetch_all(&mut *tx)
    .await?;
    for row in &configs {
        let config = uuid_col(row, "uuid")?;
        let name: String = row.try_get("name")?;
        let greeting: String = row.try_get("greeting")?;
        if let (Some(url), Some(flow_id)) = (
            runtime_url,
            row.try_get::<Option<String>, _>("runtime_flow_id")?,
        ) {
            let global_vars = BTreeMap::from([
                ("AGENT_NAME".to_owned(), name.clone()),
                ("GREETING".to_owned(), greeting.clone()),
                ("TONE".to_owned(), row.try_get::<String, _>("tone")?),
            ]);
            snapshot.routes.insert(
                config,
                AgentRoute {
                    config,
                    agent: uuid_col(row, "agent_uuid")?,
                    tenant: uuid_col(row, "org_uuid")?,
                    runtime_url: url.to_owned(),
                    flow_id,
                    tweaks: serde_json::Map::new(),
                    global_vars,
                    quota: quota_usage(row)?,
                },
            );
        }
        // The widget's origins: the config's own and each active publishable
        // key's; without any, no page may embed it.
        let mut allowed: Vec<String> =
            serde_json::from_str(&row.try_get::<String, _>("widget_allowed_origins")?)?;
        allowed.extend(origins.remove(&config).unwrap_or_default());
        if !allowed.is_empty() {
            allowed.sort();
            allowed.dedup();
            let title: String = row.try_get("widget_title")?;
            snapshot.widgets.insert(
                config,
                WidgetSettings {
                    allowed_origins: allowed,
                    title: if title.is_empty() { name } else { title },
                    greeting,
                    accent_color: row.try_get("widget_accent_color")?,
                    position: row.try_get("widget_position")?,
                    launcher_text: row.try_get("widget_launcher_text")?,
                },
            );
        }
    }

    let plans = sqlx::query(
        "SELECT DISTINCT p.uuid, p.billing_interval, p.request_quota, p.token_quota, p.requests_per_minute, p.burst, p.max_concurrency, \
                p.usage_cents_per_1k_tokens, p.usage_cents_per_request \
         FROM pricing_plans p JOIN resources r ON r.plan_uuid = p.uuid",
    )
    .fetch_all(&mut *tx)
    .await?;
    for row in &plans {
        let plan = uuid_col(row, "uuid")?;
        let small = |col: &str| -> anyhow::Result<Option<u32>> {
            Ok(row
                .try_get::<Option<i64>, _>(col)?
                .map(u32::try_from)
                .transpose()?)
        };
        let large = |col: &str| -> anyhow::Result<Option<u64>> {
            Ok(row
                .try_get::<Option<i64>, _>(col)?
                .map(u64::try_from)
                .transpose()?)
        };
        // A quota whose overage is charged is what the plan includes, not a cap.
        let charged = |col: &str| -> anyhow::Result<bool> {
            Ok(row.try_get::<Option<i64>, _>(col)?.is_some())
        };
        let request_quota = match charged("usage_cents_per_request")? {
            true => None,
            false => large("request_quota")?,
        };
        let token_quota = match charged("usage_cents_per_1k_tokens")? {
            true => None,
            false => large("token_quota")?,
        };
        snapshot.plans.insert(
            plan,
            PlanLimits {
                plan,
                requests_per_minute: small("requests_per_minute")?,
                burst: small("burst")?,
                max_concurrency: small("max_concurrency")?,
                request_quota,
                token_quota,
                interval: match row.try_get::<String, _>("billing_interval")?.as_str() {
                    "year" => BillingInterval::Year,
                    _ => BillingInterval::Month,
                },
            },
        );
    }
    tx.commit().await?;
    Ok(snapshot)
}

/// Checks `Authorization: Bearer <proxy secret>` in constant time.
/// The route's last quota count (`quota_usage`, joined); zeros when none was taken.
fn quota_usage(row: &sqlx::any::AnyRow) -> anyhow::Result<QuotaUsage> {
    let Some(counted_at_ms) = row.try_get::<Option<i64>, _>("counted_at")? else {
        return Ok(QuotaUsage::default());
    };
    let count = |col: &str| -> anyhow::Result<u64> {
        Ok(u64::try_from(
            row.try_get::<Option<i64>, _>(col)?.unwrap_or(0),
        )?)
    };
    Ok(QuotaUsage {
        period_start_ms: row.try_get::<Option<i64>, _>("period_start")?.unwrap_or(0),
        period_end_ms: row.try_get::<Option<i64>, _>("period_end")?.unwrap_or(0),
        counted_at_ms,
        requests: count("requests")?,
        tokens: count("tokens")?,
    })
}

fn authorize(app: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(secret) = &app.proxy_secret else {
        return Err(ApiError::not_found("route"));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(secret.expose_secret().as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthenticated)
    }
}

/// `GET /internal/v1/snapshot`: the full snapshot.
pub async fn snapshot(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<Json<Snapshot>> {
    authorize(&app, &headers)?;
    Ok(Json(Snapshot::clone(&*compiled(&app).await?)))
}

/// The longest a `changes` request waits (it stays under the request time limit).
pub const MAX_LONG_POLL: Duration = Duration::from_secs(55);
/// Compiled snapshots a replica keeps to answer with deltas.
const KEPT_SNAPSHOTS: usize = 8;

/// The newest revision this replica knows of, and its recent snapshots.
#[derive(Clone)]
pub struct Feed {
    revision: tokio::sync::watch::Receiver<i64>,
    recent: Arc<Mutex<VecDeque<Arc<Snapshot>>>>,
}

impl Feed {
    /// Starts watching the revision: LISTEN on Postgres (with a poll every
    /// `poll` as the safety net), a poll every `poll` on SQLite. The watch
    /// ends when the database pool is closed.
    pub fn start(db: Db, poll: Duration) -> Feed {
        let (tx, rx) = tokio::sync::watch::channel(0);
        tokio::spawn(watch_revision(db, poll, tx));
        Feed {
            revision: rx,
            recent: Arc::new(Mutex::new(VecDeque::new())),
        }
    }

    fn remember(&self, snapshot: Arc<Snapshot>) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.iter().any(|s| s.revision == snapshot.revision) {
            return;
        }
        recent.push_back(snapshot);
        while recent.len() > KEPT_SNAPSHOTS {
            recent.pop_front();
        }
    }

    fn at(&self, revision: u64) -> Option<Arc<Snapshot>> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().find(|s| s.revision == revision).cloned()
    }
}

async fn watch_revision(db: Db, poll: Duration, tx: tokio::sync::watch::Sender<i64>) {
    let mut listener: Option<sqlx::postgres::PgListener> = None;
    loop {
        if db.pool.is_closed() || tx.is_closed() {
            return;
        }
        if db.dialect == Dialect::Postgres && listener.is_none() {
            listener = listen(&db.url).await;
        }
        match listener.as_mut() {
            Some(l) => {
                if let Ok(Err(e)) = tokio::time::timeout(poll, l.recv()).await {
                    tracing::warn!(error = %e, "revision listener lost its connection; reconnecting");
                    listener = None;
                }
            }
            None => tokio::time::sleep(poll).await,
        }
        if let Ok(revision) = current_revision(&db).await {
            tx.send_if_modified(|known| {
                let newer = revision > *known;
                if newer {
                    *known = revision;
                }
                newer
            });
        }
    }
}

async fn listen(url: &str) -> Option<sqlx::postgres::PgListener> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await.ok()?;
    listener.listen(REVISION_CHANNEL).await.ok()?;
    Some(listener)
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangesQuery {
    since: u64,
    timeout_ms: Option<u64>,
}

async fn compiled(app: &AppState) -> ApiResult<Arc<Snapshot>> {
    let runtime = app.runtime.as_ref().map(|r| r.base_url().to_owned());
    let snapshot = Arc::new(compile(&app.db, runtime.as_deref()).await?);
    app.feed.remember(snapshot.clone());
    Ok(snapshot)
}

/// `GET /internal/v1/changes?since=REV&timeout_ms=N`.
pub async fn changes(
    State(app): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ChangesQuery>,
) -> ApiResult<Json<Changes>> {
    authorize(&app, &headers)?;
    let wait = Duration::from_millis(q.timeout_ms.unwrap_or(25_000)).min(MAX_LONG_POLL);
    let deadline = tokio::time::Instant::now() + wait;
    let mut watch = app.feed.revision.clone();
    let mut current = u64::try_from(current_revision(&app.db).await?).unwrap_or(0);
    while current == q.since {
        match tokio::time::timeout_at(deadline, watch.changed()).await {
            Err(_) => return Ok(Json(Changes::Unchanged { revision: current })),
            Ok(Err(_)) => {
                return Err(ApiError::Unexpected(anyhow::anyhow!(
                    "revision watch stopped"
                )))
            }
            Ok(Ok(())) => {
                current = u64::try_from(current_revision(&app.db).await?).unwrap_or(0);
            }
        }
    }
    let snapshot = compiled(&app).await?;
    Ok(Json(match app.feed.at(q.since) {
        Some(old) if q.since < snapshot.revision => Changes::Delta {
            delta: Snapshot::diff(&old, &snapshot),
        },
        _ => Changes::Full {
            snapshot: Snapshot::clone(&snapshot),
        },
    }))
}
