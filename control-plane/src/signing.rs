//! The Ed25519 keys that sign API keys. The control plane holds private keys;
//! the proxy is given only the public halves (in the snapshot), so a compromised
//! proxy cannot mint keys. Several kids may be active during rotation; new API
//! keys are signed with the newest.
//!
//! At rest, private keys are sealed with the configured key-encryption key
//! (XChaCha20-Poly1305, the kid as associated data) as `enc:v1:<base64>`.
//! Without one they are stored as PEM, and whoever reads the database can
//! mint keys. Keys stored as PEM are sealed the first time the control plane
//! starts with a key-encryption key; a sealed key that does not open (wrong or
//! missing key-encryption key) stops start-up rather than being replaced.

use agora_config::keys::{SigningKey, VerificationKey};
use anyhow::Context;
use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sqlx::Row;

use crate::db::{now_ms, Db};

const SEALED: &str = "enc:v1:";

/// Seals and opens stored private keys.
pub struct KeyVault {
    kek: Option<SecretBox<[u8; 32]>>,
}

impl KeyVault {
    pub fn new(kek: Option<&SecretString>) -> anyhow::Result<KeyVault> {
        let kek = match kek {
            None => None,
            Some(text) => Some(SecretBox::new(Box::new(
                agora_config::settings::decode_key(text.expose_secret())
                    .context("key_encryption_key must be 32 bytes in base64")?,
            ))),
        };
        Ok(KeyVault { kek })
    }

    fn cipher(&self) -> Option<XChaCha20Poly1305> {
        self.kek
            .as_ref()
            .map(|k| XChaCha20Poly1305::new(k.expose_secret().into()))
    }

    /// What to store for `pem`.
    pub fn seal(&self, kid: &str, pem: &str) -> anyhow::Result<String> {
        let Some(cipher) = self.cipher() else {
            return Ok(pem.to_owned());
        };
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: pem.as_bytes(),
                    aad: kid.as_bytes(),
                },
            )
            .map_err(|_| anyhow::anyhow!("sealing the signing key failed"))?;
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        Ok(format!(
            "{SEALED}{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        ))
    }

    /// The PEM in `stored`.
    pub fn open(&self, kid: &str, stored: &str) -> anyhow::Result<String> {
        let Some(sealed) = stored.strip_prefix(SEALED) else {
            return Ok(stored.to_owned());
        };
        let cipher = self.cipher().with_context(|| {
            format!("signing key {kid} is encrypted: set control_plane.key_encryption_key")
        })?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .ok()
            .filter(|b| b.len() > 24)
            .with_context(|| format!("signing key {kid} is damaged"))?;
        let (nonce, ciphertext) = bytes.split_at(24);
        let pem = cipher
            .decrypt(
                nonce.into(),
                Payload {
                    msg: ciphertext,
                    aad: kid.as_bytes(),
                },
            )
            .map_err(|_| {
                anyhow::anyhow!(
                    "signing key {kid} does not open with this control_plane.key_encryption_key"
                )
            })?;
        String::from_utf8(pem).with_context(|| format!("signing key {kid} is damaged"))
    }

    pub fn is_sealing(&self) -> bool {
        self.kek.is_some()
    }
}

/// The newest active signing key, created on first start. Keys stored as
/// PEM are sealed when a key-encryption key is configured.
pub async fn active_signing_key(db: &Db, vault: &KeyVault) -> anyhow::Result<SigningKey> {
    if vault.is_sealing() {
        seal_plain_keys(db, vault).await?;
    } else {
        tracing::warn!(
            "signing keys are stored UNSEALED (plain PEM in the database): anyone who reads \
             the database can mint API keys. Set control_plane.key_encryption_key \
             (AGORA_CONTROL_PLANE__KEY_ENCRYPTION_KEY) to seal them"
        );
    }
    if let Some(key) = newest(db, vault).await? {
        return Ok(key);
    }
    let kid = format!("k{}", uuid::Uuid::new_v4().simple());
    let key = SigningKey::generate(kid.clone());
    // Two replicas starting at once may both create one; both stay valid.
    sqlx::query("INSERT INTO signing_keys (kid, private_key_pem, public_key, active, created_at) VALUES ($1, $2, $3, 1, $4)")
        .bind(&kid)
        .bind(vault.seal(&kid, key.to_pkcs8_pem().expose_secret())?)
        .bind(key.verification_key().public_key)
        .bind(now_ms())
        .execute(&db.pool)
        .await?;
    newest(db, vault)
        .await?
        .ok_or_else(|| anyhow::anyhow!("signing key vanished after insert"))
}

async fn seal_plain_keys(db: &Db, vault: &KeyVault) -> anyhow::Result<()> {
    let rows = sqlx::query("SELECT kid, private_key_pem FROM signing_keys")
        .fetch_all(&db.pool)
        .await?;
    for row in rows {
        let kid: String = row.try_get("kid")?;
        let stored: String = row.try_get("private_key_pem")?;
        if !stored.starts_with(SEALED) {
            sqlx::query("UPDATE signing_keys SET private_key_pem = $2 WHERE kid = $1 AND private_key_pem = $3")
                .bind(&kid)
                .bind(vault.seal(&kid, &stored)?)
                .bind(&stored)
                .execute(&db.pool)
                .await?;
            tracing::info!(kid, "sealed a signing key stored as plain PEM");
        }
    }
    Ok(())
}

async fn newest(db: &Db, vault: &KeyVault) -> anyhow::Result<Option<SigningKey>> {
    let row = sqlx::query(
        "SELECT kid, private_key_pem FROM signing_keys WHERE active = 1 ORDER BY created_at DESC, kid DESC LIMIT 1",
    )
    .fetch_optional(&db.pool)
    .await?;
    match row {
        None => Ok(None),
        Some(r) => {
            let kid: String = r.try_get("kid")?;
            let pem = vault.open(&kid, &r.try_get::<String, _>("private_key_pem")?)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn vault(byte: u8) -> KeyVault {
        use base64::Engine;
        let text = base64::engine::general_purpose::STANDARD.encode([byte; 32]);
        KeyVault::new(Some(&SecretString::from(text))).unwrap()
    }

    #[test]
    fn sealed_keys_open_only_with_their_key_and_kid() {
        let pem = "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n";
        let sealed = vault(1).seal("k1", pem).unwrap();
        assert!(sealed.starts_with(SEALED) && !sealed.contains("PRIVATE KEY"));
        assert_eq!(vault(1).open("k1", &sealed).unwrap(), pem);
        assert!(
            vault(2).open("k1", &sealed).is_err(),
            "another key-encryption key"
        );
        assert!(vault(1).open("k2", &sealed).is_err(), "bound to its kid");
        assert!(KeyVault::new(None).unwrap().open("k1", &sealed).is_err());
        assert_eq!(KeyVault::new(None).unwrap().seal("k1", pem).unwrap(), pem);
        assert_eq!(
            vault(1).open("k1", pem).unwrap(),
            pem,
            "plain PEM still reads"
        );
    }
}
