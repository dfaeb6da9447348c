use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{Owned, PageQuery, ALL};
use crate::db::{now_ms, uuid_col, Db};
use crate::domain::{text_field, ts, OrgKind, Page, Paged, Role};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::{identity, AppState};

/// An organisation is "owned" by itself: its members see it.
const ORGS: Owned = Owned {
    select: "*",
    from: "FROM organizations",
    id: "uuid",
    org: "uuid",
    what: "organization",
};

const PROJECTS: Owned = Owned {
    select: "*",
    from: "FROM projects",
    id: "uuid",
    org: "org_uuid",
    what: "project",
};

/// The caller's organisation (any role), or 404.
pub(crate) async fn load_org(db: &Db, caller: &Caller, uuid: Uuid) -> ApiResult<AnyRow> {
    ORGS.one(db, caller, uuid).await
}

/// An organisation, as its members (and staff) see it.
#[derive(Serialize, schemars::JsonSchema)]
pub struct OrgAnswer {
    uuid: Uuid,
    name: String,
    kind: OrgKind,
    description: String,
    /// The caller's role in it.
    role: Option<Role>,
    /// Staff approved it to publish (providers).
    approved: bool,
    /// Staff allowed it to publish custom component code (providers).
    custom_code_allowed: bool,
    created_at: String,
}

fn org_json(row: &AnyRow, caller: &Caller) -> ApiResult<OrgAnswer> {
    let uuid = uuid_col(row, "uuid")?;
    let kind: String = row.try_get("kind")?;
    Ok(OrgAnswer {
        uuid,
        name: row.try_get("name")?,
        kind: kind.parse().map_err(|e: String| anyhow::anyhow!(e))?,
        description: row.try_get("description")?,
        role: caller.membership(uuid).map(|m| m.role),
        approved: row.try_get::<Option<i64>, _>("approved_at")?.is_some(),
        custom_code_allowed: row.try_get::<i64, _>("custom_code_allowed")? != 0,
        created_at: ts(row.try_get("created_at")?),
    })
}

async fn org_row(app: &AppState, uuid: Uuid) -> ApiResult<AnyRow> {
    Ok(sqlx::query("SELECT * FROM organizations WHERE uuid = $1")
        .bind(uuid.to_string())
        .fetch_one(&app.db.pool)
        .await?)
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviewBody {
    approved: bool,
    #[serde(default)]
    custom_code_allowed: bool,
}

/// Staff approve a provider organisation (or withdraw approval), and say whether
/// it may publish custom component code.
pub async fn review_org(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
    ApiJson(body): ApiJson<ReviewBody>,
) -> ApiResult<Json<OrgAnswer>> {
    // Only staff review; to anyone else the route has nothing to show.
    if !caller.is_staff {
        return Err(ApiError::not_found("organization"));
    }
    let row = sqlx::query("SELECT kind FROM organizations WHERE uuid = $1")
        .bind(uuid.to_string())
        .fetch_optional(&app.db.pool)
        .await?
        .ok_or(ApiError::not_found("organization"))?;
    if row.try_get::<String, _>("kind")? != OrgKind::Provider.as_str() {
        return Err(ApiError::bad_request(
            "not_a_provider",
            "only provider organizations are reviewed",
        ));
    }
    identity::set_provider_review(
        &app.db,
        uuid,
        identity::ProviderReview {
            approved: body.approved,
            custom_code_allowed: body.custom_code_allowed,
        },
    )
    .await?;
    Ok(Json(org_json(&org_row(&app, uuid).await?, &caller)?))
}

pub async fn list_orgs(
    State(app): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<Paged<OrgAnswer>>> {
    let page = Page::new(q.page, q.page_size, app.limits.max_page_size)?;
    let page = ORGS
        .page(&app.db, &caller, page, ALL, "created_at, uuid", |r| {
            org_json(r, &caller)
        })
        .await?;
    Ok(Json(page))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOrg {
    name: String,
    kind: OrgKind,
    #[serde(default)]
    description: String,
}

pub async fn create_org(
    State(app): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<NewOrg>,
) -> ApiResult<(StatusCode, Json<OrgAnswer>)> {
    let name = text_field("name", &body.name, 1, 200)?;
    let description = text_field("description", &body.description, 0, 2000)?;
    let uuid = identity::create_org(&app.db, &name, body.kind, &description, caller.user).await?;
    let mut answer = org_json(&org_row(&app, uuid).await?, &caller)?;
    // The caller's memberships were read before the organisation existed.
    answer.role = Some(Role::Owner);
    Ok((StatusCode::CREATED, Json(answer)))
}

pub async fn get_org(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<OrgAnswer>> {
    let row = ORGS.one(&app.db, &caller, uuid).await?;
    Ok(Json(org_json(&row, &caller)?))
}

/// A project of an organisation.
#[derive(Serialize, schemars::JsonSchema)]
pub struct ProjectAnswer {
    uuid: Uuid,
    organization: Uuid,
    name: String,
    created_at: String,
}

fn project_json(row: &AnyRow) -> ApiResult<ProjectAnswer> {
    Ok(ProjectAnswer {
        uuid: uuid_col(row, "uuid")?,
        organization: uuid_col(row, "org_uuid")?,
        name: row.try_get("name")?,
        created_at: ts(row.try_get("created_at")?),
    })
}

pub async fn list_projects(
    State(app): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<Paged<ProjectAnswer>>> {
    let page = Page::new(q.page, q.page_size, app.limits.max_page_size)?;
    Ok(Json(
        PROJECTS
            .page(
                &app.db,
                &caller,
                page,
                ALL,
                "created_at, uuid",
                project_json,
            )
            .await?,
    ))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProject {
    name: String,
    organization: Option<Uuid>,
}

pub async fn create_project(
    State(app): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<NewProject>,
) -> ApiResult<(StatusCode, Json<ProjectAnswer>)> {
    let org = caller.org_of_kind(OrgKind::Customer, body.organization)?;
    caller.require_admin(org)?;
    let name = text_field("name", &body.name, 1, 200)?;
    let uuid = Uuid::new_v4();
    let now = now_ms();
    sqlx::query("INSERT INTO projects (uuid, org_uuid, name, created_at) VALUES ($1, $2, $3, $4)")
        .bind(uuid.to_string())
        .bind(org.to_string())
        .bind(&name)
        .bind(now)
        .execute(&app.db.pool)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(ProjectAnswer {
            uuid,
            organization: org,
            name,
            created_at: ts(now),
        }),
    ))
}

pub async fn get_project(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<ProjectAnswer>> {
    Ok(Json(project_json(
        &PROJECTS.one(&app.db, &caller, uuid).await?,
    )?))
}

/// A member of an organisation.
#[derive(Serialize, schemars::JsonSchema)]
pub struct MemberAnswer {
    user: Uuid,
    username: String,
    role: Role,
}

fn member_json(row: &AnyRow) -> ApiResult<MemberAnswer> {
    let role: String = row.try_get("role")?;
    Ok(MemberAnswer {
        user: uuid_col(row, "user_uuid")?,
        username: row.try_get("username")?,
        role: role.parse().map_err(|e: String| anyhow::anyhow!(e))?,
    })
}

async fn members_of(app: &AppState, org: Uuid) -> ApiResult<Vec<MemberAnswer>> {
    sqlx::query("SELECT m.user_uuid, u.username, m.role FROM memberships m JOIN users u ON u.uuid = m.user_uuid WHERE m.org_uuid = $1 ORDER BY u.username")
        .bind(org.to_string())
        .fetch_all(&app.db.pool)
        .await?
        .iter()
        .map(member_json)
        .collect()
}

pub async fn list_members(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<MemberAnswer>>> {
    ORGS.one(&app.db, &caller, uuid).await?;
    Ok(Json(members_of(&app, uuid).await?))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMember {
    username: String,
    role: Role,
}

/// Adds a user to the organisation or changes their role. Admins manage
/// members; only owners grant or take away ownership, and the last owner stays.
pub async fn put_member(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
    ApiJson(body): ApiJson<NewMember>,
) -> ApiResult<Json<Vec<MemberAnswer>>> {
    ORGS.one(&app.db, &caller, uuid).await?;
    caller.require_admin(uuid)?;
    let user = identity::find_user(&app.db, body.username.trim())
        .await?
        .ok_or(ApiError::not_found("user"))?;
    let current = caller.membership(uuid).map(|m| m.role);
    let existing = member_role(&app, uuid, user).await?;
    let touches_owner = body.role == Role::Owner || existing == Some(Role::Owner);
    if touches_owner && current != Some(Role::Owner) {
        return Err(ApiError::forbidden(
            "only an owner grants or takes away ownership",
        ));
    }
    if existing == Some(Role::Owner) && body.role != Role::Owner {
        ensure_other_owner(&app, uuid, user).await?;
    }
    identity::add_member(&app.db, uuid, user, body.role).await?;
    Ok(Json(members_of(&app, uuid).await?))
}

pub async fn remove_member(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath((uuid, user)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    ORGS.one(&app.db, &caller, uuid).await?;
    caller.require_admin(uuid)?;
    let existing = member_role(&app, uuid, user)
        .await?
        .ok_or(ApiError::not_found("member"))?;
    if existing == Role::Owner {
        if caller.membership(uuid).map(|m| m.role) != Some(Role::Owner) {
            return Err(ApiError::forbidden("only an owner removes an owner"));
        }
        ensure_other_owner(&app, uuid, user).await?;
    }
    sqlx::query("DELETE FROM memberships WHERE org_uuid = $1 AND user_uuid = $2")
        .bind(uuid.to_string())
        .bind(user.to_string())
        .execute(&app.db.pool)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn member_role(app: &AppState, org: Uuid, user: Uuid) -> ApiResult<Option<Role>> {
    let row = sqlx::query("SELECT role FROM memberships WHERE org_uuid = $1 AND user_uuid = $2")
        .bind(org.to_string())
        .bind(user.to_string())
        .fetch_optional(&app.db.pool)
        .await?;
    row.map(|r| crate::domain::parse_stored(&r.try_get::<String, _>("role")?))
        .transpose()
}

async fn ensure_other_owner(app: &AppState, org: Uuid, user: Uuid) -> ApiResult<()> {
    let others: i64 = sqlx::query("SELECT COUNT(*) AS n FROM memberships WHERE org_uuid = $1 AND role = 'owner' AND user_uuid <> $2")
        .bind(org.to_string())
        .bind(user.to_string())
        .fetch_one(&app.db.pool)
        .await?
        .try_get("n")?;
    if others == 0 {
        return Err(ApiError::conflict(
            "last_owner",
            "an organization keeps at least one owner",
        ));
    }
    Ok(())
}
