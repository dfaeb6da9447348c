use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::configs::load_config;
use super::{Arg, Owned, ALL};
use crate::db::{bump_revision, now_ms, opt_uuid_col, uuid_col, Db};
use crate::domain::{ts, OrgKind, Page, Paged};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiBytes, ApiPath, ApiQuery, Caller};
use crate::AppState;

/// Knowledge documents one configuration may use.
pub const MAX_DOCUMENTS_PER_CONFIG: i64 = 100;
/// Documents, and their bytes, one organisation may store.
pub const MAX_DOCUMENTS_PER_ORG: i64 = 1_000;
pub const MAX_DOCUMENT_BYTES_PER_ORG: i64 = 512 * 1024 * 1024;

/// Content types a knowledge document may have.
pub const ALLOWED_TYPES: &[&str] = &[
    "text/plain",
    "text/markdown",
    "text/csv",
    "application/json",
    "application/pdf",
];

const DOC_COLUMNS: &str =
    "uuid, org_uuid, config_uuid, filename, content_type, size_bytes, sha256, created_at";

/// A knowledge document's metadata (never its bytes).
#[derive(Serialize, schemars::JsonSchema)]
pub struct DocumentAnswer {
    uuid: Uuid,
    organization: Uuid,
    /// The buyer configuration it belongs to, if one.
    config: Option<Uuid>,
    filename: String,
    content_type: String,
    size_bytes: i64,
    sha256: String,
    created_at: String,
}

fn document_json(row: &AnyRow) -> ApiResult<DocumentAnswer> {
    Ok(DocumentAnswer {
        uuid: uuid_col(row, "uuid")?,
        organization: uuid_col(row, "org_uuid")?,
        config: opt_uuid_col(row, "config_uuid")?,
        filename: row.try_get("filename")?,
        content_type: row.try_get("content_type")?,
        size_bytes: row.try_get("size_bytes")?,
        sha256: row.try_get("sha256")?,
        created_at: ts(row.try_get("created_at")?),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocQuery {
    config: Option<Uuid>,
    page: Option<u32>,
    page_size: Option<u32>,
}

pub async fn list_documents(
    State(app): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<DocQuery>,
) -> ApiResult<Json<Paged<DocumentAnswer>>> {
    let page = Page::new(q.page, q.page_size, app.limits.max_page_size)?;
    let filter = match q.config {
        Some(config) => (" AND config_uuid = $2", vec![Arg::from(config)]),
        None => ALL,
    };
    Ok(Json(
        DOCUMENTS
            .page(
                &app.db,
                &caller,
                page,
                filter,
                "created_at, uuid",
                document_json,
            )
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    filename: String,
    config: Option<Uuid>,
    organization: Option<Uuid>,
}

/// Characters that make a name render as another (bidi controls, invisible
/// marks) or read as markup.
fn is_deceptive(c: char) -> bool {
    matches!(c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}'
        | '\u{061C}' | '\u{FEFF}' | '<' | '>' | '"' | '`')
}

fn check_filename(name: &str) -> ApiResult<()> {
    let ok = !name.trim().is_empty()
        && name.chars().count() <= 255
        && !name.contains(['/', '\\'])
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c.is_control() || is_deceptive(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_filename",
            "filename must be 1 to 255 characters without slashes, control characters, \
             bidirectional or invisible marks, or < > \" `",
        ))
    }
}

/// Whether `body` is what `content_type` says: a PDF starts with `%PDF-`, text
/// types are UTF-8, JSON parses.
fn check_content(content_type: &str, body: &[u8]) -> ApiResult<()> {
    let ok = match content_type {
        "application/pdf" => body.starts_with(b"%PDF-"),
        "application/json" => serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok(),
        _ => std::str::from_utf8(body).is_ok(),
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "content_mismatch",
            format!("the document is not {content_type}"),
        ))
    }
}

/// Upload: the body is the document; `Content-Type` must be an allowed type
/// and the size within `max_document_bytes`.
pub async fn upload_document(
    State(app): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<UploadQuery>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> ApiResult<(StatusCode, Json<DocumentAnswer>)> {
    check_filename(&q.filename)?;
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    if !ALLOWED_TYPES.contains(&content_type.as_str()) {
        return Err(ApiError::UnsupportedMediaType {
            message: format!("Content-Type must be one of {}", ALLOWED_TYPES.join(", ")),
        });
    }
    if body.len() > app.limits.max_document_bytes {
        return Err(ApiError::PayloadTooLarge {
            limit: app.limits.max_document_bytes,
        });
    }
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "empty_document",
            "the document is empty",
        ));
    }
    check_content(&content_type, &body)?;
    let org = match q.config {
        Some(config) => uuid_col(&load_config(&app.db, &caller, config).await?, "org_uuid")?,
        None => caller.org_of_kind(OrgKind::Customer, q.organization)?,
    };
    caller.require_admin(org)?;
    let uuid = Uuid::new_v4();
    let mut tx = app.db.pool.begin().await?;
    // Counted under the organisation's row lock: concurrent uploads cannot pass
    // the quotas together.
    crate::db::lock_row(&mut tx, "organizations", org).await?;
    let usage = sqlx::query("SELECT COUNT(*) AS n, CAST(COALESCE(SUM(size_bytes), 0) AS BIGINT) AS bytes, CAST(COALESCE(SUM(CASE WHEN config_uuid = $2 THEN 1 ELSE 0 END), 0) AS BIGINT) AS in_config FROM training_documents WHERE org_uuid = $1")
        .bind(org.to_string())
        .bind(q.config.map(|c| c.to_string()).unwrap_or_default())
        .fetch_one(&mut *tx)
        .await?;
    let (count, bytes, in_config): (i64, i64, i64) = (
        usage.try_get("n")?,
        usage.try_get("bytes")?,
        usage.try_get("in_config")?,
    );
    if in_config >= MAX_DOCUMENTS_PER_CONFIG {
        return Err(ApiError::conflict(
            "document_limit",
            format!("a configuration holds at most {MAX_DOCUMENTS_PER_CONFIG} knowledge documents"),
        ));
    }
    if count >= MAX_DOCUMENTS_PER_ORG || bytes + body.len() as i64 > MAX_DOCUMENT_BYTES_PER_ORG {
        return Err(ApiError::conflict(
            "document_quota",
            format!(
                "an organization stores at most {MAX_DOCUMENTS_PER_ORG} documents and {} MiB",
                MAX_DOCUMENT_BYTES_PER_ORG >> 20
            ),
        ));
    }
    sqlx::query("INSERT INTO training_documents (uuid, org_uuid, config_uuid, filename, content_type, size_bytes, sha256, content, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
        .bind(uuid.to_string())
        .bind(org.to_string())
        .bind(q.config.map(|c| c.to_string()))
        .bind(&q.filename)
        .bind(&content_type)
        .bind(body.len() as i64)
        .bind(hex::encode(Sha256::digest(&body)))
        .bind(body.to_vec())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    if q.config.is_some() {
        bump_revision(&mut tx).await?;
    }
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(load_document(&app.db, &caller, uuid).await?),
    ))
}

const DOCUMENTS: Owned = Owned {
    select: DOC_COLUMNS,
    from: "FROM training_documents",
    id: "uuid",
    org: "org_uuid",
    what: "training document",
};

async fn load_document(db: &Db, caller: &Caller, uuid: Uuid) -> ApiResult<DocumentAnswer> {
    document_json(&DOCUMENTS.one(db, caller, uuid).await?)
}

pub async fn get_document(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<Json<DocumentAnswer>> {
    Ok(Json(load_document(&app.db, &caller, uuid).await?))
}

pub async fn delete_document(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let doc = load_document(&app.db, &caller, uuid).await?;
    caller.require_admin(doc.organization)?;
    let mut tx = app.db.pool.begin().await?;
    sqlx::query("DELETE FROM training_documents WHERE uuid = $1")
        .bind(uuid.to_string())
        .execute(&mut *tx)
        .await?;
    if doc.config.is_some() {
        bump_revision(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_that_deceive_or_mark_up_are_refused() {
        for good in ["faq.md", "Preise 2025 (final).pdf", "наш-договор.txt"] {
            assert!(check_filename(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "   ",
            "a/b.txt",
            "..",
            "line\nbreak.txt",
            "invoice\u{202E}fdp.exe",
            "zero\u{200B}width.txt",
            "<img src=x onerror=alert(1)>.txt",
            "quote\".txt",
        ] {
            assert!(check_filename(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn content_must_be_what_its_type_says() {
        assert!(check_content("application/pdf", b"%PDF-1.7\n...").is_ok());
        assert!(check_content("application/pdf", b"MZ\x90\x00 not a pdf").is_err());
        assert!(check_content("application/json", br#"{"a":1}"#).is_ok());
        assert!(check_content("application/json", b"{nope").is_err());
        assert!(check_content("text/plain", "héllo".as_bytes()).is_ok());
        assert!(check_content("text/markdown", b"\xff\xfe binary").is_err());
    }
}
