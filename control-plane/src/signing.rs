//! The Ed25519 keys that sign API keys. The control plane holds private keys;
//! the proxy is given only the public halves (in the snapshot), so a compromised
//! proxy cannot mint keys. Several kids may be active during rotation; new API
//! keys are signed with the newest.

use agora_config::keys::{SigningKey, VerificationKey};
use secrecy::ExposeSecret;
use sqlx::Row;

use crate::db::{now_ms, Db};

/// The newest active signing key, created on first start.
pub async fn active_signing_key(db: &Db) -> anyhow::Result<SigningKey> {
    if let Some(key) = newest(db).await? {
        return Ok(key);
    }
    let kid = format!("k{}", uuid::Uuid::new_v4().simple());
    let key = SigningKey::generate(kid.clone());
    // Two replicas starting at once may both create one; both stay valid.
    sqlx::query("INSERT INTO signing_keys (kid, private_key_pem, public_key, active, created_at) VALUES ($1, $2, $3, 1, $4)")
        .bind(&kid)
        .bind(key.to_pkcs8_pem().expose_secret().to_owned())
        .bind(key.verification_key().public_key)
        .bind(now_ms())
        .execute(&db.pool)
        .await?;
    newest(db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("signing key vanished after insert"))
}

async fn newest(db: &Db) -> anyhow::Result<Option<SigningKey>> {
    let row = sqlx::query(
        "SELECT kid, private_key_pem FROM signing_keys WHERE active = 1 ORDER BY created_at DESC, kid DESC LIMIT 1",
    )
    .fetch_optional(&db.pool)
    .await?;
    match row {
        None => Ok(None),
        Some(r) => {
            let kid: String = r.try_get("kid")?;
            let pem: String = r.try_get("private_key_pem")?;
            let key = SigningKey::from_pkcs8_pem(kid, &pem)
                .map_err(|e| anyhow::anyhow!("stored signing key is unusable: {e}"))?;
            Ok(Some(key))
        }
    }
}

/// Public keys of every active kid, for verifiers.
pub async fn verification_keys(db: &Db) -> anyhow::Result<Vec<VerificationKey>> {
    let rows =
        sqlx::query("SELECT kid, public_key FROM signing_keys WHERE active = 1 ORDER BY kid")
            .fetch_all(&db.pool)
            .await?;
    rows.iter()
        .map(|r| {
            Ok(VerificationKey {
                kid: r.try_get("kid")?,
                public_key: r.try_get("public_key")?,
            })
        })
        .collect()
}
