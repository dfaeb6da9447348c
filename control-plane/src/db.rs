//! Storage: one schema and one set of queries over Postgres (production) or
//! embedded SQLite (the zero-setup default), through sqlx's `Any` driver.
//!
//! Queries use `$N` placeholders, which both databases accept. Uuids are TEXT,
//! times BIGINT unix milliseconds, flags BIGINT 0/1.

use anyhow::Context;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub dialect: Dialect,
    /// The URL connected to, for connections outside the pool (LISTEN).
    pub url: String,
}

/// Takes the write lock of row `uuid` of `table` for the rest of `tx`: on
/// Postgres the row's lock, on SQLite the database's (a write, so the
/// transaction holds it from here on). Counts read after it are not raced by
/// another transaction taking the same lock.
pub async fn lock_row(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    table: &'static str,
    uuid: uuid::Uuid,
) -> sqlx::Result<()> {
    sqlx::query(&format!("UPDATE {table} SET uuid = uuid WHERE uuid = $1"))
        .bind(uuid.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Migrations in order; each runs once, in a transaction.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "foundation",
        include_str!("../migrations/0001_foundation.sql"),
    ),
    (
        2,
        "quota_usage",
        include_str!("../migrations/0002_quota_usage.sql"),
    ),
    (
        3,
        "provider_review",
        include_str!("../migrations/0003_provider_review.sql"),
    ),
    (
        4,
        "account_safety",
        include_str!("../migrations/0004_account_safety.sql"),
    ),
    (5, "billing", include_str!("../migrations/0005_billing.sql")),
    (6, "widget", include_str!("../migrations/0006_widget.sql")),
];

impl Db {
    /// Connects to `url` (`postgres://…` or `sqlite://…`). Fails loudly when the
    /// database cannot be reached.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Db> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            Dialect::Postgres
        };
        if dialect == Dialect::Sqlite {
            if let Some(path) = sqlite_path(url) {
                if let Some(parent) = std::path::Path::new(path).parent() {
                    if !parent.as_os_str().is_empty() && !parent.exists() {
                        // The database holds signing keys and password hashes:
                        // its directory is the owner's alone.
                        let mut dir = std::fs::DirBuilder::new();
                        dir.recursive(true);
                        #[cfg(unix)]
                        std::os::unix::fs::DirBuilderExt::mode(&mut dir, 0o700);
                        dir.create(parent)
                            .with_context(|| format!("creating {}", parent.display()))?;
                    }
                }
            }
        }
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .with_context(|| format!("connecting to the database ({})", redact_url(url)))?;
        if dialect == Dialect::Sqlite {
            // Readers don't block the writer; the setting persists in the file.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        Ok(Db {
            pool,
            dialect,
            url: url.to_owned(),
        })
    }

    /// Applies pending migrations. On Postgres an advisory lock serialises
    /// replicas starting at once.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await?;
        if self.dialect == Dialect::Postgres {
            sqlx::query("SELECT pg_advisory_lock(4242001)")
                .execute(&mut *conn)
                .await?;
        }
        let result = self.migrate_locked(&mut conn).await;
        if self.dialect == Dialect::Postgres {
            sqlx::query("SELECT pg_advisory_unlock(4242001)")
                .execute(&mut *conn)
                .await?;
        }
        result
    }

    async fn migrate_locked(&self, conn: &mut sqlx::AnyConnection) -> anyhow::Result<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS agora_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *conn)
        .await?;
        let applied: Vec<i64> = sqlx::query("SELECT version FROM agora_migrations")
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<Result<_, _>>()?;
        let blob = match self.dialect {
            Dialect::Postgres => "BYTEA",
            Dialect::Sqlite => "BLOB",
        };
        for (version, name, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            let sql = sql.replace("{{BLOB}}", blob);
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            for statement in statements(&sql) {
                sqlx::query(statement)
                    .execute(&mut *tx)
                    .await
                    .with_context(|| format!("migration {version} ({name}): {statement}"))?;
            }
            sqlx::query(
                "INSERT INTO agora_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            )
            .bind(version)
            .bind(*name)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::info!(version, name, "applied migration");
        }
        Ok(())
    }
}

/// The Postgres channel on which committed revisions are announced.
pub const REVISION_CHANNEL: &str = "agora_revision";

/// Bumps the data-plane configuration revision inside the caller's
/// transaction. On Postgres it also announces the revision on
/// [`REVISION_CHANNEL`]; the notification is delivered only if the
/// transaction commits.
pub async fn bump_revision(tx: &mut sqlx::AnyConnection) -> Result<i64, sqlx::Error> {
    let row = sqlx::query(
        "UPDATE config_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision",
    )
    .fetch_one(&mut *tx)
    .await?;
    let revision = row.try_get::<i64, _>(0)?;
    if tx.backend_name() == "PostgreSQL" {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(REVISION_CHANNEL)
            .bind(revision.to_string())
            .execute(&mut *tx)
            .await?;
    }
    Ok(revision)
}

/// Makes a transaction that reads before it writes safe under concurrency on
/// SQLite: it takes the database's write lock now, waiting for other writers,
/// instead of failing with SQLITE_BUSY when it first writes. Postgres needs
/// nothing (row locks and MVCC).
pub async fn lock_for_write(tx: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
    if tx.backend_name() == "SQLite" {
        sqlx::query("UPDATE config_revision SET revision = revision WHERE id = 1")
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

pub async fn current_revision(db: &Db) -> Result<i64, sqlx::Error> {
    let row = sqlx::query("SELECT revision FROM config_revision WHERE id = 1")
        .fetch_one(&db.pool)
        .await?;
    row.try_get::<i64, _>(0)
}

/// Splits a migration into statements on `;` at line ends, skipping comments.
fn statements(sql: &str) -> Vec<&str> {
    sql.split(";\n")
        .map(str::trim)
        .filter(|s| {
            s.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
        })
        .map(|s| s.trim_end_matches(';'))
        .collect()
}

fn sqlite_path(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then_some(path)
}

/// A database URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..scheme + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

pub fn now_ms() -> i64 {
    unix_ms(time::OffsetDateTime::now_utc())
}

/// `t` in unix milliseconds.
pub fn unix_ms(t: time::OffsetDateTime) -> i64 {
    // Years 0000–9999 (all RFC 3339 can say) fit easily.
    t.unix_timestamp_nanos().div_euclid(1_000_000) as i64
}

/// Reads a uuid stored as TEXT.
pub fn uuid_col(row: &AnyRow, col: &str) -> Result<uuid::Uuid, sqlx::Error> {
    let s: String = row.try_get(col)?;
    s.parse().map_err(|e| sqlx::Error::ColumnDecode {
        index: col.to_owned(),
        source: Box::new(e),
    })
}

pub fn opt_uuid_col(row: &AnyRow, col: &str) -> Result<Option<uuid::Uuid>, sqlx::Error> {
    let s: Option<String> = row.try_get(col)?;
    s.map(|s| {
        s.parse().map_err(|e| sqlx::Error::ColumnDecode {
            index: col.to_owned(),
            source: Box::new(e),
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_splits_into_statements() {
        let sql = MIGRATIONS[0].2;
        let stmts = statements(sql);
        assert!(stmts.len() > 10);
        assert!(stmts.iter().all(|s| !s.ends_with(';')));
        assert!(stmts[0].contains("CREATE TABLE users"));
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u@h:5432/db"
        );
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }

    #[test]
    fn sqlite_paths() {
        assert_eq!(sqlite_path("sqlite://a/b.db?mode=rwc"), Some("a/b.db"));
        assert_eq!(sqlite_path("sqlite::memory:"), None);
    }
}
