//! Users, passwords, user tokens and organisation membership.

use anyhow::Context;
use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use rand::RngCore;
use sqlx::Row;
use uuid::Uuid;

use crate::db::{now_ms, Db};
use crate::domain::{OrgKind, Role};
use crate::extract::hash_token;

/// User tokens are shown once; the database keeps their SHA-256.
pub const TOKEN_PREFIX: &str = "agt_";

pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing password: {e}"))
}

/// Verifies in constant time for the hash's parameters. A malformed stored hash
/// verifies nothing.
pub fn verify_password(password: &str, stored: &str) -> bool {
    PasswordHash::new(stored)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash of no one's password, verified against when the username is unknown
/// so both failures take the same time.
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password("agora-decoy-password").unwrap_or_default())
}

pub async fn create_user(
    db: &Db,
    username: &str,
    email: &str,
    password: &str,
    is_staff: bool,
) -> anyhow::Result<Uuid> {
    if username.trim().is_empty() || username.len() > 150 {
        anyhow::bail!("username must be 1 to 150 characters");
    }
    if password.len() < 8 {
        anyhow::bail!("password must be at least 8 characters");
    }
    let uuid = Uuid::new_v4();
    let hash = hash_password(password)?;
    sqlx::query(
        "INSERT INTO users (uuid, username, email, password_hash, is_staff, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(uuid.to_string())
    .bind(username.trim())
    .bind(email)
    .bind(hash)
    .bind(i64::from(is_staff))
    .bind(now_ms())
    .execute(&db.pool)
    .await
    .with_context(|| format!("creating user {username:?} (does it exist already?)"))?;
    Ok(uuid)
}

pub async fn set_password(db: &Db, username: &str, password: &str) -> anyhow::Result<()> {
    let hash = hash_password(password)?;
    let updated = sqlx::query("UPDATE users SET password_hash = $2 WHERE username = $1")
        .bind(username)
        .bind(hash)
        .execute(&db.pool)
        .await?;
    anyhow::ensure!(updated.rows_affected() == 1, "no user {username:?}");
    Ok(())
}

pub async fn find_user(db: &Db, username: &str) -> anyhow::Result<Option<Uuid>> {
    let row = sqlx::query("SELECT uuid FROM users WHERE username = $1")
        .bind(username)
        .fetch_optional(&db.pool)
        .await?;
    row.map(|r| crate::db::uuid_col(&r, "uuid"))
        .transpose()
        .map_err(Into::into)
}

/// Creates a token for the user and returns it; only its hash is stored.
pub async fn create_token(db: &Db, user: Uuid) -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
    sqlx::query("INSERT INTO user_tokens (token_hash, user_uuid, created_at) VALUES ($1, $2, $3)")
        .bind(hash_token(&token))
        .bind(user.to_string())
        .bind(now_ms())
        .execute(&db.pool)
        .await?;
    Ok(token)
}

/// Checks a username and password; `None` for either being wrong.
pub async fn authenticate(db: &Db, username: &str, password: &str) -> anyhow::Result<Option<Uuid>> {
    let row = sqlx::query("SELECT uuid, password_hash FROM users WHERE username = $1")
        .bind(username)
        .fetch_optional(&db.pool)
        .await?;
    let (user, stored) = match &row {
        Some(r) => (
            Some(crate::db::uuid_col(r, "uuid")?),
            r.try_get::<String, _>("password_hash")?,
        ),
        None => (None, decoy_hash().to_owned()),
    };
    let password = password.to_owned();
    let ok = tokio::task::spawn_blocking(move || verify_password(&password, &stored)).await?;
    Ok(user.filter(|_| ok))
}

pub async fn create_org(
    db: &Db,
    name: &str,
    kind: OrgKind,
    description: &str,
    owner: Uuid,
) -> anyhow::Result<Uuid> {
    let uuid = Uuid::new_v4();
    let mut tx = db.pool.begin().await?;
    sqlx::query("INSERT INTO organizations (uuid, name, kind, description, created_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(uuid.to_string())
        .bind(name)
        .bind(kind.as_str())
        .bind(description)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO memberships (org_uuid, user_uuid, role) VALUES ($1, $2, $3)")
        .bind(uuid.to_string())
        .bind(owner.to_string())
        .bind(Role::Owner.as_str())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(uuid)
}

/// Staff's review of a provider organisation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProviderReview {
    /// May publish agents.
    pub approved: bool,
    /// May publish flows whose code is not one of the runtime's components.
    pub custom_code_allowed: bool,
}

pub async fn provider_review(db: &Db, org: Uuid) -> anyhow::Result<ProviderReview> {
    let row =
        sqlx::query("SELECT approved_at, custom_code_allowed FROM organizations WHERE uuid = $1")
            .bind(org.to_string())
            .fetch_optional(&db.pool)
            .await?;
    Ok(match row {
        Some(r) => ProviderReview {
            approved: r.try_get::<Option<i64>, _>("approved_at")?.is_some(),
            custom_code_allowed: r.try_get::<i64, _>("custom_code_allowed")? != 0,
        },
        None => ProviderReview::default(),
    })
}

/// Records staff's review; approval keeps its first date.
pub async fn set_provider_review(db: &Db, org: Uuid, review: ProviderReview) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE organizations SET approved_at = CASE WHEN $2 = 1 THEN COALESCE(approved_at, $3) ELSE NULL END, custom_code_allowed = $4 WHERE uuid = $1",
    )
    .bind(org.to_string())
    .bind(i64::from(review.approved))
    .bind(now_ms())
    .bind(i64::from(review.custom_code_allowed))
    .execute(&db.pool)
    .await?;
    Ok(())
}

pub async fn add_member(db: &Db, org: Uuid, user: Uuid, role: Role) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO memberships (org_uuid, user_uuid, role) VALUES ($1, $2, $3) ON CONFLICT (org_uuid, user_uuid) DO UPDATE SET role = excluded.role",
    )
    .bind(org.to_string())
    .bind(user.to_string())
    .bind(role.as_str())
    .execute(&db.pool)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse", &h));
        assert!(!verify_password("correct horse", "not-a-hash"));
        assert!(!h.contains("correct horse"));
    }
}
