//! Request extractors whose rejections use the API's error shape, and the
//! authenticated caller.

use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{FromRef, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use sqlx::Row;
use uuid::Uuid;

use crate::db::{uuid_col, Db};
use crate::domain::{OrgKind, Role};
use crate::error::ApiError;
use crate::AppState;

/// A JSON body; malformed, mistyped or oversized bodies become API errors.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = body_limit(&req);
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::BytesRejection(r)) => Err(bytes_rejection(r, limit)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::UnsupportedMediaType {
                message: "expected Content-Type: application/json".into(),
            }),
            Err(JsonRejection::JsonSyntaxError(e)) => Err(ApiError::bad_request(
                "invalid_json",
                format!("body is not valid JSON: {}", e.body_text()),
            )),
            Err(e) => Err(ApiError::bad_request("invalid_body", e.body_text())),
        }
    }
}

/// A raw body, with the size limit reported in the API's shape.
pub struct ApiBytes(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = body_limit(&req);
        axum::body::Bytes::from_request(req, state)
            .await
            .map(ApiBytes)
            .map_err(|r| bytes_rejection(r, limit))
    }
}

#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

fn body_limit(req: &Request) -> usize {
    req.extensions()
        .get::<BodyLimit>()
        .map(|l| l.0)
        .unwrap_or(2 * 1024 * 1024)
}

fn bytes_rejection(r: BytesRejection, limit: usize) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { limit }
    } else {
        ApiError::bad_request("invalid_body", r.body_text())
    }
}

/// Query parameters; unknown or mistyped parameters are a 400.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
    }
}

/// A path uuid; anything that is not a uuid names no object, so it is a 404.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|_| ApiError::not_found("object"))
    }
}

#[derive(Clone, Debug)]
pub struct Membership {
    pub org: Uuid,
    pub kind: OrgKind,
    pub role: Role,
}

/// The user behind `Authorization: Token <token>`, with their organisations.
#[derive(Clone, Debug)]
pub struct Caller {
    pub user: Uuid,
    /// The hash of the token this request came with.
    pub token_hash: String,
    pub username: String,
    pub is_staff: bool,
    pub memberships: Vec<Membership>,
}

impl Caller {
    pub fn membership(&self, org: Uuid) -> Option<&Membership> {
        self.memberships.iter().find(|m| m.org == org)
    }

    /// The organisation of `kind` the caller acts for: the one named, which
    /// must be theirs (else 404), or their only one of that kind.
    pub fn org_of_kind(&self, kind: OrgKind, named: Option<Uuid>) -> Result<Uuid, ApiError> {
        match named {
            Some(org) => match self.membership(org) {
                Some(m) if m.kind == kind => Ok(org),
                _ => Err(ApiError::not_found("organization")),
            },
            None => {
                let mut of_kind = self.memberships.iter().filter(|m| m.kind == kind);
                match (of_kind.next(), of_kind.next()) {
                    (Some(m), None) => Ok(m.org),
                    (None, _) => Err(ApiError::bad_request(
                        "no_organization",
                        format!("you belong to no {} organization", kind.as_str()),
                    )),
                    (Some(_), Some(_)) => Err(ApiError::bad_request(
                        "organization_required",
                        format!(
                            "you belong to several {} organizations: name one with \"organization\"",
                            kind.as_str()
                        ),
                    )),
                }
            }
        }
    }

    /// Changes need an owner or admin of the object's organisation; a plain
    /// member may read. Callers outside the organisation never get here (404 first).
    pub fn require_admin(&self, org: Uuid) -> Result<(), ApiError> {
        match self.membership(org) {
            Some(m) if m.role != Role::Member => Ok(()),
            Some(_) => Err(ApiError::forbidden(
                "this needs the owner or admin role in the organization",
            )),
            None => Err(ApiError::not_found("object")),
        }
    }
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let app = AppState::from_ref(state);
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthenticated)?;
        let token = header
            .strip_prefix("Token ")
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= 256)
            .ok_or(ApiError::Unauthenticated)?;
        load_caller(&app.db, &hash_token(token))
            .await?
            .ok_or(ApiError::Unauthenticated)
    }
}

/// How stale a token's `last_used_at` may be before a request refreshes it.
const LAST_USED_GRAIN_MS: i64 = 60_000;

async fn load_caller(db: &Db, token_hash: &str) -> Result<Option<Caller>, ApiError> {
    let now = crate::db::now_ms();
    let Some(row) = sqlx::query(
        "SELECT u.uuid, u.username, u.is_staff, t.last_used_at FROM user_tokens t JOIN users u ON u.uuid = t.user_uuid WHERE t.token_hash = $1 AND t.expires_at > $2",
    )
    .bind(token_hash)
    .bind(now)
    .fetch_optional(&db.pool)
    .await?
    else {
        return Ok(None);
    };
    let user = uuid_col(&row, "uuid")?;
    let last_used: Option<i64> = row.try_get("last_used_at")?;
    if last_used.is_none_or(|t| now - t >= LAST_USED_GRAIN_MS) {
        sqlx::query("UPDATE user_tokens SET last_used_at = $2 WHERE token_hash = $1")
            .bind(token_hash)
            .bind(now)
            .execute(&db.pool)
            .await?;
    }
    let memberships = sqlx::query(
        "SELECT m.org_uuid, o.kind, m.role FROM memberships m JOIN organizations o ON o.uuid = m.org_uuid WHERE m.user_uuid = $1 ORDER BY o.created_at",
    )
    .bind(user.to_string())
    .fetch_all(&db.pool)
    .await?
    .iter()
    .map(|r| {
        Ok(Membership {
            org: uuid_col(r, "org_uuid")?,
            kind: r.try_get::<String, _>("kind")?.parse().map_err(anyhow::Error::msg)?,
            role: r.try_get::<String, _>("role")?.parse().map_err(anyhow::Error::msg)?,
        })
    })
    .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Some(Caller {
        user,
        token_hash: token_hash.to_owned(),
        username: row.try_get("username")?,
        is_staff: row.try_get::<i64, _>("is_staff")? != 0,
        memberships,
    }))
}

/// The client's address: the peer's, or, when the peer is the gateway on this
/// machine (a loopback address), the last `X-Forwarded-For` entry, which the
/// gateway's front door appends. `None` when served without peer addresses.
pub struct ClientAddr(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        let forwarded = || {
            parts
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .next_back()
                .and_then(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        };
        Ok(ClientAddr(match peer {
            Some(ip) if ip.is_loopback() => forwarded().or(Some(ip)),
            other => other,
        }))
    }
}
