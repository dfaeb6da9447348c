//! Usage to Stripe's meters, counted once, and the reconciliation that proves it.
//!
//! For each subscription whose plan charges for use, and each charged unit
//! (tokens, requests), a round looks at the billing periods it may still owe
//! for (the current one and the one before) up to the last closed window
//! (`stripe.report_window_secs`, aligned to the epoch). The period's billable
//! use — live keys only, test-mode keys never — less what the plan includes is
//! what Stripe should have; what is already reported for that period is
//! subtracted, and the rest becomes one report row, keyed by (subscription,
//! unit, period, window), written under the subscription's row lock before
//! anything is sent. Rows are then sent as meter events whose `identifier` is
//! the row's key, so:
//!
//! - a retry (Stripe's 429 or 5xx, a timeout) sends the same identifier and
//!   value, and Stripe counts it once;
//! - a crash between sending and recording re-sends the same row later;
//! - two replicas make one row (the key is unique) and send the same event;
//! - late usage (a spill log replayed after its window closed) is in the next
//!   window's difference, never lost and never counted twice.
//!
//! A million invokes make one meter event per subscription, unit and window.
//! Each event's timestamp lies inside the period it bills.

use agora_usage::{Scope, TimeRange, UsageStore};
use serde::Serialize;
use sqlx::Row;
use uuid::Uuid;

use super::{Billing, Unit};
use crate::db::{lock_row, now_ms, uuid_col, Db};
use crate::stripe::{Form, List, MeterEventSummary};

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Round {
    /// Report rows written.
    pub written: usize,
    /// Meter events Stripe accepted.
    pub sent: usize,
    /// Sends that failed (they stay pending).
    pub failed: usize,
}

/// A metered subscription, as a round reads it.
struct Metered {
    uuid: Uuid,
    stripe_id: String,
    customer: String,
    config: Uuid,
    current: (i64, i64),
    previous_start: Option<i64>,
    units: Vec<(Unit, u64, String, String)>,
}

async fn metered_subscriptions(db: &Db) -> anyhow::Result<Vec<Metered>> {
    let rows = sqlx::query(
        "SELECT s.uuid, s.stripe_id, s.stripe_customer, s.plan_uuid, s.current_period_start, s.current_period_end, \
                s.previous_period_start, c.uuid AS config_uuid, p.request_quota, p.token_quota, \
                p.usage_cents_per_1k_tokens, p.usage_cents_per_request \
         FROM subscriptions s JOIN pricing_plans p ON p.uuid = s.plan_uuid \
         JOIN resources r ON r.order_uuid = s.order_uuid JOIN agent_configs c ON c.resource_uuid = r.uuid \
         WHERE (p.usage_cents_per_1k_tokens IS NOT NULL OR p.usage_cents_per_request IS NOT NULL) \
           AND s.status NOT IN ('incomplete', 'incomplete_expired') \
         ORDER BY s.uuid",
    )
    .fetch_all(&db.pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let plan = uuid_col(row, "plan_uuid")?;
        let mut units = Vec::new();
        for (unit, charge, quota) in [
            (Unit::Tokens, "usage_cents_per_1k_tokens", "token_quota"),
            (Unit::Requests, "usage_cents_per_request", "request_quota"),
        ] {
            if row.try_get::<Option<i64>, _>(charge)?.is_none() {
                continue;
            }
            let included =
                u64::try_from(row.try_get::<Option<i64>, _>(quota)?.unwrap_or(0)).unwrap_or(0);
            let meter = sqlx::query("SELECT meter_id, meter_event FROM stripe_prices WHERE plan_uuid = $1 AND kind = $2 AND meter_id IS NOT NULL")
                .bind(plan.to_string())
                .bind(unit.as_str())
                .fetch_optional(&db.pool)
                .await?;
            if let Some(meter) = meter {
                units.push((
                    unit,
                    included,
                    meter.try_get("meter_id")?,
                    meter.try_get("meter_event")?,
                ));
            }
        }
        out.push(Metered {
            uuid: uuid_col(row, "uuid")?,
            stripe_id: row.try_get("stripe_id")?,
            customer: row.try_get("stripe_customer")?,
            config: uuid_col(row, "config_uuid")?,
            current: (
                row.try_get("current_period_start")?,
                row.try_get("current_period_end")?,
            ),
            previous_start: row.try_get("previous_period_start")?,
            units,
        });
    }
    Ok(out)
}

/// Use of `unit` by `config` in `range`, split by key mode: what its live
/// keys used (billable) and what its test-mode keys used (shown apart, never
/// billed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Use {
    pub live: u64,
    pub test: u64,
}

impl Use {
    /// What Stripe is owed for it: live use over what the plan includes.
    fn owed(self, included: u64) -> i64 {
        i64::try_from(self.live.saturating_sub(included)).unwrap_or(i64::MAX)
    }
}

pub async fn use_by_mode(
    db: &Db,
    store: &dyn UsageStore,
    config: Uuid,
    unit: Unit,
    range: TimeRange,
) -> anyhow::Result<Use> {
    if range.to_ms <= range.from_ms {
        return Ok(Use::default());
    }
    let pick = |a: &agora_usage::Aggregate| match unit {
        Unit::Tokens => a.input_tokens.saturating_add(a.output_tokens),
        Unit::Requests => a.billable_requests,
    };
    let all = pick(&agora_usage::totals(store, Scope::Config(config), range).await?);
    let test_keys =
        sqlx::query("SELECT uuid FROM api_keys WHERE config_uuid = $1 AND mode = 'test'")
            .bind(config.to_string())
            .fetch_all(&db.pool)
            .await?;
    let mut test = 0u64;
    for key in &test_keys {
        let key = uuid_col(key, "uuid")?;
        test = test.saturating_add(pick(
            &agora_usage::totals(store, Scope::Key(key), range).await?,
        ));
    }
    Ok(Use {
        live: all.saturating_sub(test),
        test: test.min(all),
    })
}

/// The periods a subscription may still owe for: `(start, end)` in ms.
fn owed_periods(s: &Metered) -> Vec<(i64, i64)> {
    let mut periods = vec![s.current];
    if let Some(previous) = s.previous_start.filter(|p| *p < s.current.0) {
        periods.push((previous, s.current.0));
    }
    periods
}

/// The meter event identifier of a report (≤ 100 characters, as Stripe allows).
fn identifier(subscription: Uuid, unit: Unit, period_start_ms: i64, window_end_ms: i64) -> String {
    format!(
        "agora-{}-{}-{}-{}",
        subscription.simple(),
        unit.as_str(),
        period_start_ms / 1000,
        window_end_ms / 1000
    )
}

/// One round at `now` (unix ms): writes the reports closed windows owe, then
/// sends every pending report.
pub async fn report_once(
    billing: &Billing,
    db: &Db,
    store: &dyn UsageStore,
    now: i64,
) -> anyhow::Result<Round> {
    let window = billing.window_secs.max(1) * 1000;
    let closed = now - now.rem_euclid(window);
    let mut round = Round::default();
    for s in metered_subscriptions(db).await? {
        for (unit, included, _, _) in &s.units {
            for (start, end) in owed_periods(&s) {
                let upto = closed.min(end);
                if upto <= start {
                    continue;
                }
                let mut tx = db.pool.begin().await?;
                crate::db::lock_for_write(&mut tx).await?;
                lock_row(&mut tx, "subscriptions", s.uuid).await?;
                let already: i64 = sqlx::query("SELECT CAST(COALESCE(SUM(value), 0) AS BIGINT) AS n FROM meter_reports WHERE subscription_uuid = $1 AND unit = $2 AND period_start = $3")
                    .bind(s.uuid.to_string())
                    .bind(unit.as_str())
                    .bind(start)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("n")?;
                let range = TimeRange {
                    from_ms: start,
                    to_ms: upto,
                };
                let owed = use_by_mode(db, store, s.config, *unit, range)
                    .await?
                    .owed(*included);
                let delta = owed - already;
                if delta > 0 {
                    // Inside the period billed: the window's last second, or the period's.
                    let event_time = (upto / 1000 - 1).max(start / 1000);
                    let written = sqlx::query("INSERT INTO meter_reports (identifier, subscription_uuid, unit, period_start, window_end, event_time, value, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (identifier) DO NOTHING")
                        .bind(identifier(s.uuid, *unit, start, closed))
                        .bind(s.uuid.to_string())
                        .bind(unit.as_str())
                        .bind(start)
                        .bind(closed)
                        .bind(event_time)
                        .bind(delta)
                        .bind(now_ms())
                        .execute(&mut *tx)
                        .await?;
                    round.written += written.rows_affected() as usize;
                }
                tx.commit().await?;
            }
        }
    }
    send_pending(billing, db, &mut round).await?;
    Ok(round)
}

/// Sends pending reports, oldest first. A transient failure ends the round
/// (Stripe is overloaded or away: the next round retries); any other failure
/// is recorded on the row and the rest go on.
async fn send_pending(billing: &Billing, db: &Db, round: &mut Round) -> anyhow::Result<()> {
    let pending = sqlx::query(
        "SELECT m.identifier, m.event_time, m.value, s.stripe_customer, \
                (SELECT MIN(p.meter_event) FROM stripe_prices p \
                 WHERE p.plan_uuid = s.plan_uuid AND p.kind = m.unit) AS meter_event \
         FROM meter_reports m JOIN subscriptions s ON s.uuid = m.subscription_uuid \
         WHERE m.sent_at IS NULL ORDER BY m.created_at, m.identifier LIMIT 10000",
    )
    .fetch_all(&db.pool)
    .await?;
    for row in &pending {
        let identifier: String = row.try_get("identifier")?;
        let Some(event) = row.try_get::<Option<String>, _>("meter_event")? else {
            continue;
        };
        let form = Form::new()
            .set("event_name", event)
            .set(
                "payload[stripe_customer_id]",
                row.try_get::<String, _>("stripe_customer")?,
            )
            .set("payload[value]", row.try_get::<i64, _>("value")?)
            .set("identifier", &identifier)
            .set("timestamp", row.try_get::<i64, _>("event_time")?);
        let sent: Result<serde_json::Value, _> = billing
            .client
            .post("/v1/billing/meter_events", &form, &identifier)
            .await;
        match sent {
            Ok(_) => {
                sqlx::query("UPDATE meter_reports SET sent_at = $2, attempts = attempts + 1, last_error = NULL WHERE identifier = $1")
                    .bind(&identifier)
                    .bind(now_ms())
                    .execute(&db.pool)
                    .await?;
                round.sent += 1;
                billing
                    .metrics
                    .meter_events_sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                round.failed += 1;
                billing
                    .metrics
                    .meter_event_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                sqlx::query("UPDATE meter_reports SET attempts = attempts + 1, last_error = $2 WHERE identifier = $1")
                    .bind(&identifier)
                    .bind(e.reason())
                    .execute(&db.pool)
                    .await?;
                tracing::warn!(%identifier, error = %e, "a usage report was not accepted; it stays pending");
                if e.is_transient() {
                    break;
                }
            }
        }
    }
    let unsent = sqlx::query(
        "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM meter_reports WHERE sent_at IS NULL",
    )
    .fetch_one(&db.pool)
    .await?;
    let n: i64 = unsent.try_get("n")?;
    let oldest: Option<i64> = unsent.try_get("oldest")?;
    billing.metrics.unreported_windows.store(
        u64::try_from(n).unwrap_or(0),
        std::sync::atomic::Ordering::Relaxed,
    );
    billing.metrics.report_lag_secs.store(
        oldest
            .map(|o| u64::try_from((now_ms() - o) / 1000).unwrap_or(0))
            .unwrap_or(0),
        std::sync::atomic::Ordering::Relaxed,
    );
    Ok(())
}

/// One line of a reconciliation: a subscription's unit in one period.
#[derive(Debug, Clone, Serialize)]
pub struct Reconciled {
    pub subscription: Uuid,
    pub stripe_subscription: String,
    pub unit: &'static str,
    /// The period, unix ms, `[start, end)`.
    pub period_start: i64,
    pub period_end: i64,
    /// What the usage store says is owed up to the last closed window.
    pub store: i64,
    /// What Stripe accepted from Agora.
    pub reported: i64,
    /// Stripe's meter event summary over the period.
    pub stripe: i64,
    /// Test-mode use in the period, never billed.
    pub test_mode: u64,
}

impl Reconciled {
    pub fn agrees(&self) -> bool {
        self.store == self.reported && self.reported == self.stripe
    }
}

/// Compares, per subscription, unit and period (those starting in `within`,
/// when given), the usage store, the reports Stripe accepted and Stripe's meter
/// event summaries.
pub async fn reconcile(
    billing: &Billing,
    db: &Db,
    store: &dyn UsageStore,
    now: i64,
    within: Option<TimeRange>,
) -> anyhow::Result<Vec<Reconciled>> {
    let window = billing.window_secs.max(1) * 1000;
    let closed = now - now.rem_euclid(window);
    let mut out = Vec::new();
    for s in metered_subscriptions(db).await? {
        for (unit, included, meter_id, _) in &s.units {
            let mut starts: Vec<i64> = sqlx::query("SELECT DISTINCT period_start FROM meter_reports WHERE subscription_uuid = $1 AND unit = $2")
                .bind(s.uuid.to_string())
                .bind(unit.as_str())
                .fetch_all(&db.pool)
                .await?
                .iter()
                .map(|r| r.try_get::<i64, _>("period_start"))
                .collect::<Result<_, _>>()?;
            starts.extend(owed_periods(&s).iter().map(|p| p.0));
            starts.sort_unstable();
            starts.dedup();
            for (i, start) in starts.iter().copied().enumerate() {
                let end = starts.get(i + 1).copied().unwrap_or(s.current.1);
                if within.is_some_and(|w| start < w.from_ms || start >= w.to_ms) {
                    continue;
                }
                let upto = closed.min(end);
                let used = use_by_mode(
                    db,
                    store,
                    s.config,
                    *unit,
                    TimeRange {
                        from_ms: start,
                        to_ms: upto,
                    },
                )
                .await?;
                let reported: i64 = sqlx::query("SELECT CAST(COALESCE(SUM(value), 0) AS BIGINT) AS n FROM meter_reports WHERE subscription_uuid = $1 AND unit = $2 AND period_start = $3 AND sent_at IS NOT NULL")
                    .bind(s.uuid.to_string())
                    .bind(unit.as_str())
                    .bind(start)
                    .fetch_one(&db.pool)
                    .await?
                    .try_get("n")?;
                let summaries: List<MeterEventSummary> = billing
                    .client
                    .get(
                        &format!("/v1/billing/meters/{meter_id}/event_summaries"),
                        &Form::new()
                            .set("customer", &s.customer)
                            .set("start_time", start / 1000)
                            .set("end_time", end / 1000),
                    )
                    .await?;
                let stripe = summaries
                    .data
                    .iter()
                    .map(|x| x.aggregated_value)
                    .sum::<f64>()
                    .round() as i64;
                out.push(Reconciled {
                    subscription: s.uuid,
                    stripe_subscription: s.stripe_id.clone(),
                    unit: unit.as_str(),
                    period_start: start,
                    period_end: end,
                    store: used.owed(*included),
                    reported,
                    stripe,
                    test_mode: used.test,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_fit_stripes_limit_and_name_subscription_unit_period_and_window() {
        let id = identifier(
            Uuid::max(),
            Unit::Requests,
            9_999_999_999_000,
            9_999_999_999_000,
        );
        assert!(id.len() <= 100, "{}", id.len());
        let a = identifier(Uuid::nil(), Unit::Tokens, 1_000, 60_000);
        assert_ne!(a, identifier(Uuid::nil(), Unit::Requests, 1_000, 60_000));
        assert_ne!(a, identifier(Uuid::nil(), Unit::Tokens, 2_000, 60_000));
        assert_ne!(a, identifier(Uuid::nil(), Unit::Tokens, 1_000, 120_000));
        assert_eq!(a, identifier(Uuid::nil(), Unit::Tokens, 1_000, 60_000));
    }
}
