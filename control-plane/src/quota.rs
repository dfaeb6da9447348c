//! Counts what each subscription has used of its plan's quotas and carries the
//! counts to the proxies in the snapshot ([`QuotaUsage`] on each route).
//!
//! Every `control_plane.quota_count_ms`, for each active subscription whose plan
//! has a request or token quota, the period's billable requests (served, or cut
//! short by the client) and tokens (input + output) are read from the usage
//! store. Counts that changed are written to `quota_usage` with a new revision,
//! in one transaction, so every proxy receives them as a delta. A proxy enforces
//! the count plus what it has admitted itself since it received that count, so a
//! quota spent through one proxy holds on all of them within one counting round
//! plus the usage pipeline's delay.
//!
//! Quota periods are calendar months (calendar years for yearly plans) in UTC,
//! the same as the usage routes' default billing period.
//!
//! Each replica counts; replicas that read the same numbers write nothing the
//! second time, because only changed counts are written.

use std::time::Duration;

use agora_config::snapshot::{BillingInterval, QuotaUsage};
use agora_usage::{Scope, TimeRange, UsageStore};
use sqlx::Row;
use time::{Date, Month, OffsetDateTime, UtcOffset};
use uuid::Uuid;

use crate::db::{bump_revision, lock_for_write, now_ms, unix_ms, uuid_col, Db};

/// The calendar month (or year) in UTC containing `now`: `[start, end)` in unix
/// milliseconds.
pub fn period(interval: BillingInterval, now: OffsetDateTime) -> anyhow::Result<TimeRange> {
    let now = now.to_offset(UtcOffset::UTC);
    let (year, month) = (now.year(), now.month());
    let (from, to) = match interval {
        BillingInterval::Month if month == Month::December => {
            ((year, month), (year + 1, Month::January))
        }
        BillingInterval::Month => ((year, month), (year, month.next())),
        BillingInterval::Year => ((year, Month::January), (year + 1, Month::January)),
    };
    let first = |(year, month): (i32, Month)| -> anyhow::Result<i64> {
        Ok(unix_ms(
            Date::from_calendar_date(year, month, 1)?
                .midnight()
                .assume_utc(),
        ))
    };
    Ok(TimeRange {
        from_ms: first(from)?,
        to_ms: first(to)?,
    })
}

/// Counts one subscription's use; `Some` when it differs from the stored count.
async fn count_one(
    row: &sqlx::any::AnyRow,
    store: &dyn UsageStore,
    now: OffsetDateTime,
) -> anyhow::Result<Option<(Uuid, QuotaUsage)>> {
    let config = uuid_col(row, "uuid")?;
    let interval = match row.try_get::<String, _>("billing_interval")?.as_str() {
        "year" => BillingInterval::Year,
        _ => BillingInterval::Month,
    };
    let range = period(interval, now)?;
    let used = agora_usage::totals(store, Scope::Config(config), range).await?;
    let count = QuotaUsage {
        period_start_ms: range.from_ms,
        period_end_ms: range.to_ms,
        counted_at_ms: now_ms(),
        requests: used.billable_requests,
        tokens: used.input_tokens.saturating_add(used.output_tokens),
    };
    let stored = (
        row.try_get::<Option<i64>, _>("period_start")?,
        row.try_get::<Option<i64>, _>("requests")?,
        row.try_get::<Option<i64>, _>("tokens")?,
    );
    let fresh = (
        Some(count.period_start_ms),
        Some(db_count(count.requests)),
        Some(db_count(count.tokens)),
    );
    Ok((stored != fresh).then_some((config, count)))
}

/// Counts every subscription with a quota once; returns how many counts changed.
pub async fn count_once(db: &Db, store: &dyn UsageStore) -> anyhow::Result<usize> {
    let rows = sqlx::query(
        "SELECT c.uuid, p.billing_interval, q.period_start, q.requests, q.tokens \
         FROM agent_configs c \
         JOIN resources r ON r.uuid = c.resource_uuid \
         JOIN pricing_plans p ON p.uuid = r.plan_uuid \
         LEFT JOIN quota_usage q ON q.config_uuid = c.uuid \
         WHERE r.state = 'active' AND (p.request_quota IS NOT NULL OR p.token_quota IS NOT NULL) \
         ORDER BY c.uuid",
    )
    .fetch_all(&db.pool)
    .await?;
    let now = OffsetDateTime::now_utc();
    let mut changed: Vec<(Uuid, QuotaUsage)> = Vec::new();
    for row in &rows {
        // Each subscription on its own: one that cannot be counted (a bad row, a
        // failed read) is logged and keeps its last count; the others go on.
        match count_one(row, store, now).await {
            Ok(Some(change)) => changed.push(change),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                config = row.try_get::<String, _>("uuid").unwrap_or_default(),
                error = format!("{e:#}"),
                "a subscription's quota use could not be counted"
            ),
        }
    }
    if changed.is_empty() {
        return Ok(0);
    }
    let mut tx = db.pool.begin().await?;
    lock_for_write(&mut tx).await?;
    for (config, count) in &changed {
        sqlx::query(
            "INSERT INTO quota_usage (config_uuid, period_start, period_end, counted_at, requests, tokens) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (config_uuid) DO UPDATE SET period_start = excluded.period_start, \
             period_end = excluded.period_end, counted_at = excluded.counted_at, \
             requests = excluded.requests, tokens = excluded.tokens",
        )
        .bind(config.to_string())
        .bind(count.period_start_ms)
        .bind(count.period_end_ms)
        .bind(count.counted_at_ms)
        .bind(db_count(count.requests))
        .bind(db_count(count.tokens))
        .execute(&mut *tx)
        .await?;
    }
    bump_revision(&mut tx).await?;
    tx.commit().await?;
    Ok(changed.len())
}

fn db_count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Counts every `every` until the runtime stops; a failed round is logged and
/// the next one tries again. The first round is one interval after start: the
/// last counts are in the database already.
pub fn start(db: Db, store: std::sync::Arc<dyn UsageStore>, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            match count_once(&db, store.as_ref()).await {
                Ok(changed) => {
                    if failing {
                        tracing::info!("quota counting recovered");
                    }
                    failing = false;
                    if changed > 0 {
                        tracing::debug!(changed, "quota counts updated");
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "quota counting failed; proxies keep the last counts"
                        );
                    }
                    failing = true;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn periods_are_utc_calendar_months_and_years() {
        let now = datetime!(2026-02-28 23:59:59.999 UTC);
        let month = period(BillingInterval::Month, now).unwrap();
        assert_eq!(month.from_ms, unix_ms(datetime!(2026-02-01 00:00 UTC)));
        assert_eq!(month.to_ms, unix_ms(datetime!(2026-03-01 00:00 UTC)));

        let december = period(BillingInterval::Month, datetime!(2026-12-31 12:00 UTC)).unwrap();
        assert_eq!(december.from_ms, unix_ms(datetime!(2026-12-01 00:00 UTC)));
        assert_eq!(december.to_ms, unix_ms(datetime!(2027-01-01 00:00 UTC)));

        // The first millisecond of a month belongs to it, not to the one before,
        // whatever the offset it is given in.
        let start = datetime!(2026-03-01 01:00 +01:00);
        assert_eq!(
            period(BillingInterval::Month, start).unwrap().from_ms,
            unix_ms(start)
        );

        let year = period(BillingInterval::Year, now).unwrap();
        assert_eq!(year.from_ms, unix_ms(datetime!(2026-01-01 00:00 UTC)));
        assert_eq!(year.to_ms, unix_ms(datetime!(2027-01-01 00:00 UTC)));
    }
}
