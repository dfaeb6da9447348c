//! Backoff for failed logins, per account and per client address, kept in the
//! database so every control-plane replica sees the same counts.
//!
//! A subject (an account name, known or not, or an address) may fail a few
//! times freely; after that each failure locks it for twice as long as the
//! last, up to [`MAX_LOCK_MS`]. While locked, even the right password is
//! refused. A success clears the account's count, never the address's: one
//! address guessing at many accounts stays slowed. Counts are forgotten after
//! an hour without failures.

use sqlx::Row;

use crate::db::{now_ms, Db};

/// Failures an account may have before backoff starts.
pub const FREE_ACCOUNT_FAILURES: i64 = 5;
/// Failures one client address may have (over all accounts) before backoff.
pub const FREE_ADDRESS_FAILURES: i64 = 20;
/// The first lock, doubled with each further failure.
const FIRST_LOCK_MS: i64 = 1_000;
/// The longest lock.
pub const MAX_LOCK_MS: i64 = 15 * 60_000;
/// Failures older than this are forgotten.
const FORGET_AFTER_MS: i64 = 3_600_000;

/// What a login is counted against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A username as typed (whether or not such a user exists).
    Account(String),
    /// The client's address.
    Address(std::net::IpAddr),
}

impl Subject {
    fn key(&self) -> String {
        match self {
            Subject::Account(name) => format!("user:{}", name.to_lowercase()),
            Subject::Address(ip) => format!("addr:{ip}"),
        }
    }

    fn free_failures(&self) -> i64 {
        match self {
            Subject::Account(_) => FREE_ACCOUNT_FAILURES,
            Subject::Address(_) => FREE_ADDRESS_FAILURES,
        }
    }
}

/// How long a subject with `failures` failures is locked after the last.
pub fn lock_ms(failures: i64, free: i64) -> i64 {
    if failures < free {
        return 0;
    }
    let doublings = (failures - free).min(20) as u32;
    FIRST_LOCK_MS
        .saturating_mul(1 << doublings)
        .min(MAX_LOCK_MS)
}

/// Milliseconds until the most locked of `subjects` may try again; 0 if none is
/// locked.
pub async fn locked_for(db: &Db, subjects: &[Subject]) -> anyhow::Result<i64> {
    let now = now_ms();
    let mut wait = 0;
    for subject in subjects {
        let row = sqlx::query("SELECT locked_until FROM login_failures WHERE subject = $1")
            .bind(subject.key())
            .fetch_optional(&db.pool)
            .await?;
        if let Some(row) = row {
            let until: i64 = row.try_get("locked_until")?;
            wait = wait.max(until - now);
        }
    }
    Ok(wait.max(0))
}

/// Counts a failure against each subject and sets its lock.
pub async fn failed(db: &Db, subjects: &[Subject]) -> anyhow::Result<()> {
    let now = now_ms();
    for subject in subjects {
        let mut tx = db.pool.begin().await?;
        // Forgotten counts start again; the upsert makes concurrent failures add.
        sqlx::query(
            "INSERT INTO login_failures (subject, failures, locked_until, updated_at) VALUES ($1, 1, 0, $2) \
             ON CONFLICT (subject) DO UPDATE SET \
             failures = CASE WHEN login_failures.updated_at < $3 THEN 1 ELSE login_failures.failures + 1 END, \
             updated_at = $2",
        )
        .bind(subject.key())
        .bind(now)
        .bind(now - FORGET_AFTER_MS)
        .execute(&mut *tx)
        .await?;
        let failures: i64 = sqlx::query("SELECT failures FROM login_failures WHERE subject = $1")
            .bind(subject.key())
            .fetch_one(&mut *tx)
            .await?
            .try_get("failures")?;
        sqlx::query("UPDATE login_failures SET locked_until = $2 WHERE subject = $1")
            .bind(subject.key())
            .bind(now + lock_ms(failures, subject.free_failures()))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(())
}

/// A successful login clears the account's failures.
pub async fn succeeded(db: &Db, account: &str) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM login_failures WHERE subject = $1")
        .bind(Subject::Account(account.to_owned()).key())
        .execute(&db.pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_start_after_the_free_failures_and_double_up_to_the_cap() {
        assert_eq!(lock_ms(0, 5), 0);
        assert_eq!(lock_ms(4, 5), 0);
        assert_eq!(lock_ms(5, 5), 1_000);
        assert_eq!(lock_ms(6, 5), 2_000);
        assert_eq!(lock_ms(9, 5), 16_000);
        assert_eq!(lock_ms(100, 5), MAX_LOCK_MS);
        assert_eq!(lock_ms(i64::MAX, 5), MAX_LOCK_MS);
    }

    #[test]
    fn account_names_are_counted_without_case() {
        assert_eq!(
            Subject::Account("Alice".into()).key(),
            Subject::Account("alice".into()).key()
        );
    }
}
