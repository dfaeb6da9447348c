//! Usage, read from the store the proxy writes: a buyer's configuration, a
//! seller's agent over all its buyers, and an organisation's billing period.
//!
//! Ranges are half-open (`from` ≤ t < `to`), RFC 3339 in and UTC RFC 3339 out.
//! A series has one point per UTC hour or day from the bucket holding `from` to
//! the one holding the range's last instant; buckets without requests are zeros.
//! Every event is counted once however often it was delivered, and token counts
//! follow the store's rule (runtime > reported > estimated).

use agora_config::snapshot::BillingInterval;
use agora_usage::{Aggregate, Scope, TimeRange, UsageStore};
use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{agents, configs, orgs};
use crate::db::unix_ms;
use crate::domain::ts;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery, Caller};
use crate::AppState;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// The longest range one read covers.
pub const MAX_RANGE_MS: i64 = 366 * DAY_MS;
/// The most points one series has.
pub const MAX_POINTS: i64 = 2000;

/// The width of a series' buckets (`?interval=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bucket {
    #[default]
    Hour,
    Day,
}

impl Bucket {
    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Hour => "hour",
            Bucket::Day => "day",
        }
    }

    fn ms(self) -> i64 {
        match self {
            Bucket::Hour => HOUR_MS,
            Bucket::Day => DAY_MS,
        }
    }
}

/// `?from=&to=&interval=` of the series routes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesQuery {
    pub from: Option<String>,
    pub to: Option<String>,
    #[serde(default)]
    pub interval: Bucket,
}

/// `?from=&to=` of the billing-period route.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeriodQuery {
    pub from: Option<String>,
    pub to: Option<String>,
}

/// A series request that can be answered: a non-empty range of at most 366
/// days, cut into at most [`MAX_POINTS`] buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    range: TimeRange,
    interval: Bucket,
}

impl Window {
    /// `to` defaults to `now`, `from` to a day before `to`.
    pub fn parse(q: &SeriesQuery, now: OffsetDateTime) -> ApiResult<Window> {
        let to = match &q.to {
            Some(t) => timestamp("to", t)?,
            None => unix_ms(now),
        };
        let from = match &q.from {
            Some(f) => timestamp("from", f)?,
            None => to - DAY_MS,
        };
        let window = Window {
            range: checked_range(from, to)?,
            interval: q.interval,
        };
        let points = window.points();
        if points > MAX_POINTS {
            return Err(ApiError::bad_request(
                "range_too_large",
                format!(
                    "interval={} over this range makes {points} points, more than {MAX_POINTS}: \
                     use interval=day or a shorter range",
                    window.interval.as_str()
                ),
            ));
        }
        Ok(window)
    }

    fn first_start(&self) -> i64 {
        floor_to(self.range.from_ms, self.interval.ms())
    }

    fn points(&self) -> i64 {
        let width = self.interval.ms();
        (floor_to(self.range.to_ms - 1, width) - self.first_start()) / width + 1
    }

    /// The start of every bucket of the series, in order.
    fn starts(&self) -> impl Iterator<Item = i64> {
        let (first, width) = (self.first_start(), self.interval.ms());
        (0..self.points()).map(move |i| first + i * width)
    }

    /// One point per bucket: the store's rows (aligned to the same buckets,
    /// in order) with zeros where it has none.
    fn dense(&self, rows: Vec<Aggregate>) -> Vec<Aggregate> {
        let mut rows = rows.into_iter().peekable();
        self.starts()
            .map(|start| {
                rows.next_if(|r| r.start_ms == start).unwrap_or(Aggregate {
                    start_ms: start,
                    ..Aggregate::default()
                })
            })
            .collect()
    }
}

/// A billing period: both ends given, or neither for the current calendar
/// month in UTC.
pub fn period(q: &PeriodQuery, now: OffsetDateTime) -> ApiResult<TimeRange> {
    match (&q.from, &q.to) {
        (Some(from), Some(to)) => checked_range(timestamp("from", from)?, timestamp("to", to)?),
        (None, None) => {
            crate::quota::period(BillingInterval::Month, now).map_err(ApiError::Unexpected)
        }
        _ => Err(ApiError::bad_request(
            "invalid_range",
            "give both from and to, or neither for the current calendar month",
        )),
    }
}

fn checked_range(from_ms: i64, to_ms: i64) -> ApiResult<TimeRange> {
    if from_ms >= to_ms {
        return Err(ApiError::bad_request(
            "invalid_range",
            "from must be before to",
        ));
    }
    if to_ms - from_ms > MAX_RANGE_MS {
        return Err(ApiError::bad_request(
            "invalid_range",
            "a usage range covers at most 366 days",
        ));
    }
    Ok(TimeRange { from_ms, to_ms })
}

/// Parses the query parameter `name` as RFC 3339, to unix milliseconds.
fn timestamp(name: &str, text: &str) -> ApiResult<i64> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map(unix_ms)
        .map_err(|_| {
            ApiError::bad_request(
                "invalid_timestamp",
                format!(
                    "{name} must be an RFC 3339 timestamp such as 2025-01-31T00:00:00Z \
                     (write + in an offset as %2B)"
                ),
            )
        })
}

fn floor_to(ms: i64, width: i64) -> i64 {
    ms.div_euclid(width) * width
}

fn ms_from_us(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Requests refused before the runtime, by reason.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Refused {
    rate_limited: u64,
    unauthorized: u64,
    client_error: u64,
}

/// What a buyer sees of an aggregate.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct BuyerPoint {
    requests: u64,
    errors: u64,
    refused: Refused,
    upstream_errors: u64,
    cancelled: u64,
    input_tokens: u64,
    output_tokens: u64,
    /// Requests whose token counts are the gateway's estimate.
    estimated_requests: u64,
    latency_p50_ms: f64,
    latency_p95_ms: f64,
}

/// What a seller sees: the buyer's view, with billable requests and buyers.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct SellerPoint {
    #[serde(flatten)]
    requests: BuyerPoint,
    /// Requests the runtime ran (served, or cut short by the client).
    billable_requests: u64,
    /// Distinct buyer configurations.
    buyers: u64,
}

fn buyer_point(a: &Aggregate) -> BuyerPoint {
    BuyerPoint {
        requests: a.requests,
        errors: a.errors,
        refused: Refused {
            rate_limited: a.rate_limited,
            unauthorized: a.unauthorized,
            client_error: a.client_errors,
        },
        upstream_errors: a.upstream_errors,
        cancelled: a.cancelled,
        input_tokens: a.input_tokens,
        output_tokens: a.output_tokens,
        estimated_requests: a.estimated_requests,
        latency_p50_ms: ms_from_us(a.latency_p50_us),
        latency_p95_ms: ms_from_us(a.latency_p95_us),
    }
}

fn seller_point(a: &Aggregate) -> SellerPoint {
    SellerPoint {
        requests: buyer_point(a),
        billable_requests: a.billable_requests,
        buyers: a.buyers,
    }
}

/// One bucket of a series: its start and its counts.
#[derive(Debug, Serialize, schemars::JsonSchema)]
#[schemars(rename = "PointOf{P}")]
pub struct Point<P> {
    start: String,
    #[serde(flatten)]
    counts: P,
}

/// A range's totals and its dense series.
#[derive(Debug, Serialize, schemars::JsonSchema)]
#[schemars(rename = "SeriesOf{P}")]
pub struct Series<P> {
    from: String,
    to: String,
    /// `hour` or `day`.
    interval: String,
    totals: P,
    series: Vec<Point<P>>,
}

/// A buyer configuration's usage.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ConfigUsage {
    config: Uuid,
    #[serde(flatten)]
    usage: Series<BuyerPoint>,
}

/// The last run of an agent that failed in the runtime.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct LastError {
    at: String,
    /// `runtime_error`, `runtime_timeout`, `runtime_unreachable` or `stream_error`.
    code: String,
    /// The runtime's own word on it, trimmed.
    message: String,
    config: Uuid,
    request_id: Uuid,
}

/// An agent's usage over all its buyers.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct AgentUsage {
    agent: Uuid,
    #[serde(flatten)]
    usage: Series<SellerPoint>,
    /// The last run that failed in the runtime, whenever it was; `null` if none.
    last_error: Option<LastError>,
}

/// An organisation's metered usage in a billing period.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct OrganizationUsage {
    organization: Uuid,
    from: String,
    to: String,
    #[serde(flatten)]
    totals: PeriodTotals,
}

/// The store, or 503 when it could not be opened at start.
fn store(app: &AppState) -> ApiResult<&dyn UsageStore> {
    app.usage.as_deref().ok_or_else(|| {
        ApiError::unavailable(
            "usage_unavailable",
            "usage statistics are unavailable: the usage store could not be opened",
        )
    })
}

fn read_failed(e: anyhow::Error) -> ApiError {
    tracing::warn!(error = format!("{e:#}"), "reading usage failed");
    ApiError::unavailable(
        "usage_unavailable",
        "usage statistics are unavailable: the usage store did not answer",
    )
}

/// Totals and the dense series of `scope` over `window`.
async fn totals_and_series(
    store: &dyn UsageStore,
    scope: Scope,
    window: Window,
) -> ApiResult<(Aggregate, Vec<Aggregate>)> {
    let (totals, rows) = tokio::try_join!(
        agora_usage::totals(store, scope, window.range),
        store.aggregate(scope, window.range, window.interval.ms()),
    )
    .map_err(read_failed)?;
    Ok((totals, window.dense(rows)))
}

/// Totals and series of `scope` over the window `q` asks for, as `view` shows them.
async fn series_of<P>(
    app: &AppState,
    scope: Scope,
    q: &SeriesQuery,
    view: fn(&Aggregate) -> P,
) -> ApiResult<Series<P>> {
    let window = Window::parse(q, OffsetDateTime::now_utc())?;
    let (totals, series) = totals_and_series(store(app)?, scope, window).await?;
    Ok(Series {
        from: ts(window.range.from_ms),
        to: ts(window.range.to_ms),
        interval: window.interval.as_str().to_owned(),
        totals: view(&totals),
        series: series
            .iter()
            .map(|a| Point {
                start: ts(a.start_ms),
                counts: view(a),
            })
            .collect(),
    })
}

pub async fn config_usage(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<SeriesQuery>,
) -> ApiResult<Json<ConfigUsage>> {
    configs::load_config(&app.db, &caller, uuid).await?;
    Ok(Json(ConfigUsage {
        config: uuid,
        usage: series_of(&app, Scope::Config(uuid), &q, buyer_point).await?,
    }))
}

pub async fn agent_usage(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<SeriesQuery>,
) -> ApiResult<Json<AgentUsage>> {
    agents::load_agent(&app.db, &caller, uuid).await?;
    let usage = series_of(&app, Scope::Agent(uuid), &q, seller_point).await?;
    // The last run that failed in the runtime, whenever it was: what the seller
    // needs to mend the flow.
    let last = store(&app)?.last_failure(uuid).await.map_err(read_failed)?;
    Ok(Json(AgentUsage {
        agent: uuid,
        usage,
        last_error: last.map(|f| LastError {
            at: ts(f.time_ms),
            code: f.code,
            message: f.detail,
            config: f.config,
            request_id: f.event_id,
        }),
    }))
}

pub async fn organization_usage(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<PeriodQuery>,
) -> ApiResult<Json<OrganizationUsage>> {
    orgs::load_org(&app.db, &caller, uuid).await?;
    let range = period(&q, OffsetDateTime::now_utc())?;
    let totals = tenant_period_totals(store(&app)?, uuid, range.from_ms, range.to_ms)
        .await
        .map_err(read_failed)?;
    Ok(Json(OrganizationUsage {
        organization: uuid,
        from: ts(range.from_ms),
        to: ts(range.to_ms),
        totals,
    }))
}

/// What billing charges for: an organisation's metered requests in a period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct PeriodTotals {
    pub requests: u64,
    /// Requests the runtime ran (served, or cut short by the client).
    pub billable_requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Requests whose token counts are the proxy's estimate.
    pub estimated_requests: u64,
}

/// The metered usage of organisation `tenant` (as buyer) in `[from_ms, to_ms)`,
/// unix milliseconds. Each event counts once however often it was delivered.
/// Errors when the store does not answer; the range is not checked here.
pub async fn tenant_period_totals(
    store: &dyn UsageStore,
    tenant: Uuid,
    from_ms: i64,
    to_ms: i64,
) -> anyhow::Result<PeriodTotals> {
    let a = agora_usage::totals(store, Scope::Tenant(tenant), TimeRange { from_ms, to_ms }).await?;
    Ok(PeriodTotals {
        requests: a.requests,
        billable_requests: a.billable_requests,
        input_tokens: a.input_tokens,
        output_tokens: a.output_tokens,
        estimated_requests: a.estimated_requests,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::macros::datetime;

    fn series(from: Option<&str>, to: Option<&str>, interval: Bucket) -> SeriesQuery {
        SeriesQuery {
            from: from.map(str::to_owned),
            to: to.map(str::to_owned),
            interval,
        }
    }

    #[track_caller]
    fn rejected<T: std::fmt::Debug>(result: ApiResult<T>, want: &str) -> String {
        match result {
            Err(ApiError::BadRequest { code, message }) => {
                assert_eq!(code, want, "{message}");
                message
            }
            other => panic!("expected a 400 {want}, got {other:?}"),
        }
    }

    const NOW: OffsetDateTime = datetime!(2025-03-10 10:30:00 UTC);

    #[test]
    fn defaults_are_the_last_day_hourly() {
        let w = Window::parse(&SeriesQuery::default(), NOW).unwrap();
        assert_eq!(w.range.to_ms, unix_ms(NOW));
        assert_eq!(w.range.to_ms - w.range.from_ms, DAY_MS);
        assert_eq!(w.interval, Bucket::Hour);
        // 10:30 yesterday to 10:30 today touches 25 hours.
        assert_eq!(w.points(), 25);
        let starts: Vec<i64> = w.starts().collect();
        assert_eq!(starts[0], unix_ms(datetime!(2025-03-09 10:00:00 UTC)));
        assert_eq!(starts[24], unix_ms(datetime!(2025-03-10 10:00:00 UTC)));
        // Only `from`: `to` is still now.
        let w = Window::parse(
            &series(Some("2025-03-10T00:00:00Z"), None, Bucket::Day),
            NOW,
        )
        .unwrap();
        assert_eq!(w.range.to_ms, unix_ms(NOW));
        assert_eq!(w.points(), 1);
    }

    #[test]
    fn timestamps_are_rfc3339_with_any_offset() {
        assert_eq!(
            timestamp("from", "2025-03-10T12:00:00+02:00").unwrap(),
            unix_ms(datetime!(2025-03-10 10:00:00 UTC))
        );
        assert_eq!(timestamp("to", "1970-01-01T00:00:00.0019Z").unwrap(), 1);
        for bad in ["2025-03-10", "2025-03-10T10:00:00", "yesterday", ""] {
            let message = rejected(timestamp("from", bad), "invalid_timestamp");
            assert!(message.starts_with("from "), "{message}");
        }
        let message = rejected(
            Window::parse(
                &series(None, Some("2025-03-10T12:00:00 02:00"), Bucket::Hour),
                NOW,
            ),
            "invalid_timestamp",
        );
        assert!(message.starts_with("to "), "{message}");
    }

    #[test]
    fn ranges_are_bounded() {
        fn q(from: &str, to: &str, interval: Bucket) -> ApiResult<Window> {
            Window::parse(&series(Some(from), Some(to), interval), NOW)
        }
        let same = "2025-03-10T00:00:00Z";
        rejected(q(same, same, Bucket::Hour), "invalid_range");
        rejected(
            q("2025-03-11T00:00:00Z", same, Bucket::Hour),
            "invalid_range",
        );
        // 366 days is the most; a leap year fits, one millisecond more does not.
        let w = q("2024-01-01T00:00:00Z", "2025-01-01T00:00:00Z", Bucket::Day).unwrap();
        assert_eq!(w.points(), 366);
        rejected(
            q(
                "2024-01-01T00:00:00Z",
                "2025-01-01T00:00:00.001Z",
                Bucket::Day,
            ),
            "invalid_range",
        );
        // Exactly MAX_POINTS hours, then one more.
        let from = unix_ms(datetime!(2025-01-01 00:00:00 UTC));
        let to = ts(from + MAX_POINTS * HOUR_MS);
        let w = q("2025-01-01T00:00:00Z", &to, Bucket::Hour).unwrap();
        assert_eq!(w.points(), MAX_POINTS);
        let message = rejected(
            q("2024-12-31T23:59:59Z", &to, Bucket::Hour),
            "range_too_large",
        );
        assert!(message.contains("interval=day"), "{message}");
        let message = rejected(
            q("2024-03-01T00:00:00Z", "2025-03-01T00:00:00Z", Bucket::Hour),
            "range_too_large",
        );
        assert!(message.contains("8760 points"), "{message}");
    }

    #[test]
    fn series_are_dense() {
        let w = Window::parse(
            &series(
                Some("2025-03-10T10:15:00Z"),
                Some("2025-03-10T13:00:00Z"),
                Bucket::Hour,
            ),
            NOW,
        )
        .unwrap();
        let at = |h: i64| unix_ms(datetime!(2025-03-10 00:00:00 UTC)) + h * HOUR_MS;
        let row = |h, requests| Aggregate {
            start_ms: at(h),
            requests,
            ..Aggregate::default()
        };
        let dense = w.dense(vec![row(10, 4), row(12, 3)]);
        let got: Vec<(i64, u64)> = dense.iter().map(|a| (a.start_ms, a.requests)).collect();
        assert_eq!(got, vec![(at(10), 4), (at(11), 0), (at(12), 3)]);
        assert_eq!(w.dense(Vec::new()).len(), 3);
    }

    #[test]
    fn periods_default_to_the_calendar_month() {
        let month = |now| period(&PeriodQuery::default(), now).unwrap();
        assert_eq!(
            month(NOW),
            TimeRange {
                from_ms: unix_ms(datetime!(2025-03-01 00:00:00 UTC)),
                to_ms: unix_ms(datetime!(2025-04-01 00:00:00 UTC)),
            }
        );
        assert_eq!(
            month(datetime!(2024-12-31 23:59:59.999 UTC)),
            TimeRange {
                from_ms: unix_ms(datetime!(2024-12-01 00:00:00 UTC)),
                to_ms: unix_ms(datetime!(2025-01-01 00:00:00 UTC)),
            }
        );
        // The month is UTC's, whatever the clock's offset.
        assert_eq!(
            month(datetime!(2024-03-01 01:00:00 +02:00)).from_ms,
            unix_ms(datetime!(2024-02-01 00:00:00 UTC))
        );
        let given = PeriodQuery {
            from: Some("2025-02-01T00:00:00Z".into()),
            to: Some("2025-03-01T00:00:00Z".into()),
        };
        let february = period(&given, NOW).unwrap();
        assert_eq!(february.to_ms - february.from_ms, 28 * DAY_MS);
        let one_end = PeriodQuery {
            from: Some("2025-02-01T00:00:00Z".into()),
            to: None,
        };
        rejected(period(&one_end, NOW), "invalid_range");
    }

    #[test]
    fn latency_is_reported_in_milliseconds() {
        assert_eq!(ms_from_us(20_250), 20.25);
        let a = Aggregate {
            latency_p50_us: 1_500,
            buyers: 2,
            ..Aggregate::default()
        };
        let buyer = serde_json::to_value(buyer_point(&a)).unwrap();
        assert_eq!(buyer["latency_p50_ms"], json!(1.5));
        assert!(buyer.get("buyers").is_none());
        let seller = serde_json::to_value(seller_point(&a)).unwrap();
        assert_eq!(seller["buyers"], json!(2));
        assert_eq!(seller["latency_p50_ms"], json!(1.5));
    }
}
