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

/// Changes a member's role. Admins manage members; only owners grant or take
/// away ownership, and the last owner stays. Someone not yet a member is
/// invited instead (`invitations/`): nobody joins without consent.
pub async fn put_member(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
    ApiJson(body): ApiJson<NewMember>,
) -> ApiResult<Json<Vec<MemberAnswer>>> {
    ORGS.one(&app.db, &caller, uuid).await?;
    caller.require_admin(uuid)?;
    // Members are listed to members, so this tells nothing new; non-members
    // are one answer whether or not they have an account.
    let not_member = || ApiError::not_found("member");
    let user = identity::find_user(&app.db, body.username.trim())
        .await?
        .ok_or_else(not_member)?;
    let current = caller.membership(uuid).map(|m| m.role);
    let existing = member_role(&app, uuid, user)
        .await?
        .ok_or_else(not_member)?;
    let touches_owner = body.role == Role::Owner || existing == Role::Owner;
    if touches_owner && current != Some(Role::Owner) {
        return Err(ApiError::forbidden(
            "only an owner grants or takes away ownership",
        ));
    }
    if existing == Role::Owner && body.role != Role::Owner {
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

// ---- invitations ----

/// How long an invitation stays open.
pub const INVITATION_TTL_MS: i64 = 7 * 24 * 3_600_000;
/// Open invitations one organisation may have.
pub const MAX_OPEN_INVITATIONS: i64 = 100;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewInvitation {
    username: String,
    role: Role,
}

/// An invitation to join an organisation.
#[derive(Serialize, schemars::JsonSchema)]
pub struct InvitationAnswer {
    uuid: Uuid,
    organization: Uuid,
    organization_name: String,
    username: String,
    role: Role,
    /// The inviter's username.
    invited_by: String,
    created_at: String,
    expires_at: String,
}

const INVITATION_SELECT: &str = "SELECT i.uuid, i.org_uuid, o.name AS org_name, i.username, i.role, u.username AS inviter, i.created_at, i.expires_at \
     FROM invitations i JOIN organizations o ON o.uuid = i.org_uuid LEFT JOIN users u ON u.uuid = i.invited_by";

fn invitation_json(row: &AnyRow) -> ApiResult<InvitationAnswer> {
    Ok(InvitationAnswer {
        uuid: uuid_col(row, "uuid")?,
        organization: uuid_col(row, "org_uuid")?,
        organization_name: row.try_get("org_name")?,
        username: row.try_get("username")?,
        role: crate::domain::parse_stored(&row.try_get::<String, _>("role")?)?,
        invited_by: row
            .try_get::<Option<String>, _>("inviter")?
            .unwrap_or_default(),
        created_at: ts(row.try_get("created_at")?),
        expires_at: ts(row.try_get("expires_at")?),
    })
}

/// Invites a username to the organisation (admins; ownership by owners). The
/// answer is the same whether or not the name has an account; the user of that
/// name sees it at `GET /api/invitations/` and accepts or declines. Inviting
/// again replaces the role and restarts the week.
pub async fn invite(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
    ApiJson(body): ApiJson<NewInvitation>,
) -> ApiResult<(StatusCode, Json<InvitationAnswer>)> {
    ORGS.one(&app.db, &caller, uuid).await?;
    caller.require_admin(uuid)?;
    if body.role == Role::Owner && caller.membership(uuid).map(|m| m.role) != Some(Role::Owner) {
        return Err(ApiError::forbidden("only an owner invites an owner"));
    }
    let username = body.username.trim().to_owned();
    identity::check_username(&username)
        .map_err(|m| ApiError::bad_request("invalid_username", m))?;
    let now = now_ms();
    let mut tx = app.db.pool.begin().await?;
    crate::db::lock_row(&mut tx, "organizations", uuid).await?;
    sqlx::query("DELETE FROM invitations WHERE org_uuid = $1 AND expires_at <= $2")
        .bind(uuid.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    let open: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM invitations WHERE org_uuid = $1 AND username <> $2")
            .bind(uuid.to_string())
            .bind(&username)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
    if open >= MAX_OPEN_INVITATIONS {
        return Err(ApiError::conflict(
            "invitation_limit",
            format!("an organization has at most {MAX_OPEN_INVITATIONS} open invitations"),
        ));
    }
    let invitation = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO invitations (uuid, org_uuid, username, role, invited_by, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (org_uuid, username) DO UPDATE SET uuid = excluded.uuid, role = excluded.role, invited_by = excluded.invited_by, created_at = excluded.created_at, expires_at = excluded.expires_at",
    )
    .bind(invitation.to_string())
    .bind(uuid.to_string())
    .bind(&username)
    .bind(body.role.as_str())
    .bind(caller.user.to_string())
    .bind(now)
    .bind(now + INVITATION_TTL_MS)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let row = sqlx::query(&format!("{INVITATION_SELECT} WHERE i.uuid = $1"))
        .bind(invitation.to_string())
        .fetch_one(&app.db.pool)
        .await?;
    Ok((StatusCode::CREATED, Json(invitation_json(&row)?)))
}

/// The organisation's open invitations (admins).
pub async fn list_invitations(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<InvitationAnswer>>> {
    ORGS.one(&app.db, &caller, uuid).await?;
    caller.require_admin(uuid)?;
    sqlx::query(&format!(
        "{INVITATION_SELECT} WHERE i.org_uuid = $1 AND i.expires_at > $2 ORDER BY i.created_at, i.uuid"
    ))
    .bind(uuid.to_string())
    .bind(now_ms())
    .fetch_all(&app.db.pool)
    .await?
    .iter()
    .map(invitation_json)
    .collect::<ApiResult<Vec<_>>>()
    .map(Json)
}

/// Withdraws an open invitation (admins).
pub async fn withdraw_invitation(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath((uuid, invitation)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    ORGS.one(&app.db, &caller, uuid).await?;
    caller.require_admin(uuid)?;
    let gone = sqlx::query("DELETE FROM invitations WHERE uuid = $1 AND org_uuid = $2")
        .bind(invitation.to_string())
        .bind(uuid.to_string())
        .execute(&app.db.pool)
        .await?;
    if gone.rows_affected() == 0 {
        return Err(ApiError::not_found("invitation"));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's open invitations.
pub async fn my_invitations(
    State(app): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<InvitationAnswer>>> {
    sqlx::query(&format!(
        "{INVITATION_SELECT} WHERE i.username = $1 AND i.expires_at > $2 ORDER BY i.created_at, i.uuid"
    ))
    .bind(&caller.username)
    .bind(now_ms())
    .fetch_all(&app.db.pool)
    .await?
    .iter()
    .map(invitation_json)
    .collect::<ApiResult<Vec<_>>>()
    .map(Json)
}

/// The caller's open invitation `uuid` (another user's is a 404), removed.
async fn take_invitation(app: &AppState, caller: &Caller, uuid: Uuid) -> ApiResult<(Uuid, Role)> {
    let row = sqlx::query("SELECT org_uuid, role FROM invitations WHERE uuid = $1 AND username = $2 AND expires_at > $3")
        .bind(uuid.to_string())
        .bind(&caller.username)
        .bind(now_ms())
        .fetch_optional(&app.db.pool)
        .await?
        .ok_or(ApiError::not_found("invitation"))?;
    let gone = sqlx::query("DELETE FROM invitations WHERE uuid = $1")
        .bind(uuid.to_string())
        .execute(&app.db.pool)
        .await?;
    if gone.rows_affected() == 0 {
        // Accepted or declined by a request at the same time.
        return Err(ApiError::not_found("invitation"));
    }
    Ok((
        uuid_col(&row, "org_uuid")?,
        crate::domain::parse_stored(&row.try_get::<String, _>("role")?)?,
    ))
}

/// Joining an organisation by invitation.
#[derive(Serialize, schemars::JsonSchema)]
pub struct Joined {
    organization: Uuid,
    role: Role,
}

/// Accepts an invitation: the caller joins with its role (an existing member
/// keeps the higher of the two).
pub async fn accept_invitation(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<Joined>> {
    let (org, role) = take_invitation(&app, &caller, uuid).await?;
    let role = match member_role(&app, org, caller.user).await? {
        Some(current) if current.rank() >= role.rank() => current,
        _ => role,
    };
    identity::add_member(&app.db, org, caller.user, role).await?;
    Ok(Json(Joined {
        organization: org,
        role,
    }))
}

/// Declines an invitation.
pub async fn decline_invitation(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    take_invitation(&app, &caller, uuid).await?;
    Ok(StatusCode::NO_CONTENT)
}
