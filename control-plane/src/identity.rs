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

/// Usernames are 1 to [`USERNAME_MAX_CHARS`] of ASCII letters, digits and
/// `_ . @ + -`: nothing that renders as something else, hides (zero-width,
/// bidi controls) or breaks a line.
pub const USERNAME_MAX_CHARS: usize = 150;

/// Passwords are counted in characters, with one limit for setting and for
/// logging in, so every password that can be set can be used.
pub const PASSWORD_MIN_CHARS: usize = 8;
pub const PASSWORD_MAX_CHARS: usize = 256;

const COMMON_PASSWORDS: &str = include_str!("common_passwords.txt");

/// Why a username cannot be used.
pub fn check_username(username: &str) -> Result<(), String> {
    let ok = !username.is_empty()
        && username.len() <= USERNAME_MAX_CHARS
        && username
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@+-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a username is 1 to {USERNAME_MAX_CHARS} ASCII letters, digits and _ . @ + -"
        ))
    }
}

/// Why a password cannot be set: too short or long (in characters), blank,
/// one repeated character, a run of consecutive digits or letters, the
/// username itself, or on the list of common passwords.
pub fn check_password(password: &str, username: &str) -> Result<(), String> {
    let chars: Vec<char> = password.chars().collect();
    if chars.len() < PASSWORD_MIN_CHARS || chars.len() > PASSWORD_MAX_CHARS {
        return Err(format!(
            "a password is {PASSWORD_MIN_CHARS} to {PASSWORD_MAX_CHARS} characters"
        ));
    }
    if password.trim().chars().count() < PASSWORD_MIN_CHARS {
        return Err("a password is not blank space".into());
    }
    let lower = password.to_lowercase();
    let steps: Vec<i64> = chars
        .windows(2)
        .map(|w| i64::from(u32::from(w[1])) - i64::from(u32::from(w[0])))
        .collect();
    let repeated = steps.iter().all(|d| *d == 0);
    let run = steps.iter().all(|d| *d == 1) || steps.iter().all(|d| *d == -1);
    let common = COMMON_PASSWORDS
        .lines()
        .filter(|l| !l.starts_with('#'))
        .any(|l| l.trim().to_lowercase() == lower);
    if repeated || run || common || lower == username.to_lowercase() {
        return Err(
            "that password is too easy to guess; choose a longer or less common one".into(),
        );
    }
    Ok(())
}

pub async fn create_user(
    db: &Db,
    username: &str,
    email: &str,
    password: &str,
    is_staff: bool,
) -> anyhow::Result<Uuid> {
    check_username(username).map_err(anyhow::Error::msg)?;
    check_password(password, username).map_err(anyhow::Error::msg)?;
    let uuid = Uuid::new_v4();
    let hash = hash_password(password)?;
    sqlx::query(
        "INSERT INTO users (uuid, username, email, password_hash, is_staff, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(uuid.to_string())
    .bind(username)
    .bind(email)
    .bind(hash)
    .bind(i64::from(is_staff))
    .bind(now_ms())
    .execute(&db.pool)
    .await
    .with_context(|| format!("creating user {username:?} (does it exist already?)"))?;
    Ok(uuid)
}

/// Sets a user's password and revokes every token of theirs.
pub async fn set_password(db: &Db, username: &str, password: &str) -> anyhow::Result<()> {
    check_password(password, username).map_err(anyhow::Error::msg)?;
    let hash = hash_password(password)?;
    let mut tx = db.pool.begin().await?;
    let updated = sqlx::query("UPDATE users SET password_hash = $2 WHERE username = $1")
        .bind(username)
        .bind(hash)
        .execute(&mut *tx)
        .await?;
    anyhow::ensure!(updated.rows_affected() == 1, "no user {username:?}");
    sqlx::query(
        "DELETE FROM user_tokens WHERE user_uuid = (SELECT uuid FROM users WHERE username = $1)",
    )
    .bind(username)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
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

/// How long a user token lasts.
pub const USER_TOKEN_TTL_MS: i64 = 30 * 24 * 3_600_000;
/// Tokens one user keeps: making another drops the oldest.
pub const MAX_TOKENS_PER_USER: i64 = 50;

/// Creates a token for the user and returns it; only its hash is stored. The
/// user's expired tokens, and the oldest beyond [`MAX_TOKENS_PER_USER`], go.
pub async fn create_token(db: &Db, user: Uuid) -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
    let now = now_ms();
    let mut tx = db.pool.begin().await?;
    sqlx::query("INSERT INTO user_tokens (token_hash, user_uuid, created_at, expires_at) VALUES ($1, $2, $3, $4)")
        .bind(hash_token(&token))
        .bind(user.to_string())
        .bind(now)
        .bind(now + USER_TOKEN_TTL_MS)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "DELETE FROM user_tokens WHERE user_uuid = $1 AND (expires_at <= $2 OR token_hash NOT IN \
         (SELECT token_hash FROM user_tokens WHERE user_uuid = $1 ORDER BY created_at DESC, token_hash LIMIT $3))",
    )
    .bind(user.to_string())
    .bind(now)
    .bind(MAX_TOKENS_PER_USER)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(token)
}

/// The public id of a token: a uuid made of the first half of its hash, which
/// tells nothing of the token.
pub fn token_id(token_hash: &str) -> Uuid {
    let mut bytes = [0u8; 16];
    if hex::decode_to_slice(token_hash.get(..32).unwrap_or_default(), &mut bytes).is_err() {
        return Uuid::nil();
    }
    Uuid::from_bytes(bytes)
}

/// One of a user's tokens, never the token itself.
#[derive(Clone, Debug, serde::Serialize, schemars::JsonSchema)]
pub struct TokenInfo {
    pub id: Uuid,
    pub created_at: String,
    pub expires_at: String,
    pub last_used_at: Option<String>,
    /// The token this request was made with.
    pub current: bool,
}

/// The user's live tokens, newest first; `current` is the hash of the one in use.
pub async fn list_tokens(db: &Db, user: Uuid, current: &str) -> anyhow::Result<Vec<TokenInfo>> {
    sqlx::query(
        "SELECT token_hash, created_at, expires_at, last_used_at FROM user_tokens \
         WHERE user_uuid = $1 AND expires_at > $2 ORDER BY created_at DESC, token_hash",
    )
    .bind(user.to_string())
    .bind(now_ms())
    .fetch_all(&db.pool)
    .await?
    .iter()
    .map(|r| {
        let hash: String = r.try_get("token_hash")?;
        Ok(TokenInfo {
            id: token_id(&hash),
            created_at: crate::domain::ts(r.try_get("created_at")?),
            expires_at: crate::domain::ts(r.try_get("expires_at")?),
            last_used_at: r
                .try_get::<Option<i64>, _>("last_used_at")?
                .map(crate::domain::ts),
            current: hash == current,
        })
    })
    .collect()
}

/// Revokes the user's token with public id `id`; whether there was one.
pub async fn revoke_token(db: &Db, user: Uuid, id: Uuid) -> anyhow::Result<bool> {
    let hashes: Vec<String> =
        sqlx::query("SELECT token_hash FROM user_tokens WHERE user_uuid = $1")
            .bind(user.to_string())
            .fetch_all(&db.pool)
            .await?
            .iter()
            .map(|r| r.try_get("token_hash"))
            .collect::<Result<_, _>>()?;
    let Some(hash) = hashes.into_iter().find(|h| token_id(h) == id) else {
        return Ok(false);
    };
    revoke_token_hash(db, &hash).await?;
    Ok(true)
}

pub async fn revoke_token_hash(db: &Db, token_hash: &str) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM user_tokens WHERE token_hash = $1")
        .bind(token_hash)
        .execute(&db.pool)
        .await?;
    Ok(())
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
    fn usernames_come_from_a_safe_alphabet() {
        for good in ["alice", "a.b-c_d+e@example.com", "X9"] {
            assert!(check_username(good).is_ok(), "{good}");
        }
        let long = "a".repeat(USERNAME_MAX_CHARS + 1);
        for bad in [
            "",
            "al ice",
            "alice\n",
            "ali\u{200b}ce",
            "\u{202e}alice",
            "élodie",
            "<b>",
            &long,
        ] {
            assert!(check_username(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn passwords_are_counted_in_characters_and_not_too_easy() {
        assert!(check_password("correct-horse-7", "alice").is_ok());
        // Eight characters of three bytes each are eight characters.
        assert!(check_password("ñandú€ñ7", "alice").is_ok());
        let longest = "x1".repeat(PASSWORD_MAX_CHARS / 2);
        assert!(check_password(&longest, "alice").is_ok());
        let too_long = format!("{longest}y");
        for bad in [
            "short7",
            "        ",
            "  a  b  c  ",
            "12345678",
            "87654321",
            "abcdefghij",
            "aaaaaaaaaa",
            "Password123",
            "QWERTYUIOP",
            "alice-in-chains",
            &too_long,
        ] {
            let username = if bad == "alice-in-chains" {
                bad
            } else {
                "alice"
            };
            assert!(check_password(bad, username).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn passwords_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse", &h));
        assert!(!verify_password("correct horse", "not-a-hash"));
        assert!(!h.contains("correct horse"));
    }
}
