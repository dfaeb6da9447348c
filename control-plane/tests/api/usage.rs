//! Usage read routes, over events written straight into the embedded store the
//! control plane's settings name, the way the proxy's pipeline writes them.

use agora_config::settings::UsageStoreKind;
use agora_config::usage::{TokenReport, TokenSource, UsageEvent, UsageRecord, UsageStatus};
use agora_control_plane::domain::{OrgKind, Role};
use agora_control_plane::routes::usage::{tenant_period_totals, PeriodTotals};
use agora_usage::embedded::EmbeddedStore;
use agora_usage::UsageStore;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::*;

/// 2025-03-10T00:00:00Z.
const DAY: i64 = 1_741_564_800_000;
const HOUR: i64 = 3_600_000;

/// Whose requests an event records.
#[derive(Clone, Copy)]
struct Subscription {
    tenant: Uuid,
    config: Uuid,
    agent: Uuid,
}

/// A metered request without token counts.
fn event(sub: Subscription, time_ms: i64, status: UsageStatus, latency_us: u64) -> UsageEvent {
    let served = matches!(status, UsageStatus::Ok | UsageStatus::Cancelled);
    UsageEvent {
        event_id: Uuid::now_v7(),
        time_ms,
        tenant: Some(sub.tenant),
        config: Some(sub.config),
        key_id: Some(Uuid::new_v4()),
        agent: Some(sub.agent),
        route: agora_usage::METERED_ROUTE.into(),
        status,
        http_status: if served { 200 } else { 502 },
        latency_us,
        upstream_latency_us: served.then_some(latency_us / 2),
        bytes_in: 100,
        bytes_out: 400,
        input_tokens: None,
        output_tokens: None,
        token_source: TokenSource::None,
    }
}

fn with_tokens(e: UsageEvent, source: TokenSource, input: u64, output: u64) -> UsageEvent {
    UsageEvent {
        input_tokens: Some(input),
        output_tokens: Some(output),
        token_source: source,
        ..e
    }
}

fn record(e: &UsageEvent) -> UsageRecord {
    UsageRecord::Event(Box::new(e.clone()))
}

fn report(e: &UsageEvent, input: u64, output: u64) -> UsageRecord {
    UsageRecord::Report(TokenReport {
        request_id: e.event_id,
        input_tokens: input,
        output_tokens: output,
    })
}

/// The store file the control plane reads, opened as the proxy opens it.
async fn proxy_store(app: &TestApp) -> EmbeddedStore {
    EmbeddedStore::open(&app.settings().usage_embedded_path())
        .await
        .unwrap()
}

/// Errors by kind: `[rate_limited, unauthorized, client_error, upstream_errors,
/// cancelled]`.
type Kinds = [u64; 5];

fn buyer_point(
    start: Option<&str>,
    [requests, errors, input, output, estimated]: [u64; 5],
    [rate_limited, unauthorized, client_error, upstream, cancelled]: Kinds,
    [p50, p95]: [f64; 2],
) -> Value {
    let mut point = json!({
        "requests": requests,
        "errors": errors,
        "refused": {
            "rate_limited": rate_limited,
            "unauthorized": unauthorized,
            "client_error": client_error,
        },
        "upstream_errors": upstream,
        "cancelled": cancelled,
        "input_tokens": input,
        "output_tokens": output,
        "estimated_requests": estimated,
        "latency_p50_ms": p50,
        "latency_p95_ms": p95,
    });
    if let Some(start) = start {
        point["start"] = json!(start);
    }
    point
}

fn seller_point(
    start: Option<&str>,
    counts: [u64; 5],
    kinds: Kinds,
    [billable, buyers]: [u64; 2],
    latency: [f64; 2],
) -> Value {
    let mut point = buyer_point(start, counts, kinds, latency);
    point["billable_requests"] = json!(billable);
    point["buyers"] = json!(buyers);
    point
}

async fn usage_totals_and_series(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let provider = app.tenant("Acme", OrgKind::Provider).await;
    let buyer = app.tenant("Globex", OrgKind::Customer).await;
    let other = app.tenant("Initech", OrgKind::Customer).await;
    let (agent, free, _) = app.published_agent(&provider).await;
    let (_, config) = app.subscribed(&buyer, agent, free).await;
    let (_, other_config) = app.subscribed(&other, agent, free).await;
    let mine = Subscription {
        tenant: buyer.org,
        config,
        agent,
    };
    let theirs = Subscription {
        tenant: other.org,
        config: other_config,
        agent,
    };

    use UsageStatus::*;
    let at = |hour: i64, ms: i64| DAY + hour * HOUR + ms;
    // 10:00–11:00: three served, one failed.
    let e1 = with_tokens(
        event(mine, at(10, 1), Ok, 10_500),
        TokenSource::Runtime,
        100,
        200,
    );
    let e2 = with_tokens(
        event(mine, at(10, 2), Ok, 20_250),
        TokenSource::Runtime,
        10,
        20,
    );
    // Estimated by the proxy, then reported by the runtime: the report counts.
    let e3 = with_tokens(
        event(mine, at(10, 3), Ok, 30_000),
        TokenSource::Estimated,
        5,
        5,
    );
    let e4 = event(mine, at(10, 4), UpstreamError, 40_000);
    // 11:00–12:00: nothing. 12:00–13:00: an estimate, a refusal, a cancel.
    let e5 = with_tokens(
        event(mine, at(12, 0), Ok, 50_125),
        TokenSource::Estimated,
        7,
        8,
    );
    let e6 = event(mine, at(12, 1), RateLimited, 1_000);
    let e7 = event(mine, at(12, 2), Cancelled, 5_000);
    // Just outside 10:00–13:00 on either side, and a route that is not metered.
    let before = event(mine, at(10, -1), Ok, 1_000);
    let after = event(mine, at(13, 0), Ok, 1_000);
    let unmetered = UsageEvent {
        route: "/api/agent-gateway/usage/".into(),
        ..event(mine, at(10, 5), Ok, 1_000)
    };
    // Another buyer of the same agent.
    let e8 = with_tokens(
        event(theirs, at(10, 6), Ok, 1_000_000),
        TokenSource::Runtime,
        1,
        1,
    );
    let batch = vec![
        record(&e1),
        record(&e2),
        record(&e3),
        record(&e4),
        record(&e5),
        record(&e6),
        record(&e7),
        record(&before),
        record(&after),
        record(&unmetered),
        record(&e8),
        report(&e3, 50, 60),
        // The response's own counts win over a report.
        report(&e1, 999, 999),
    ];
    let store = proxy_store(&app).await;
    // Delivered twice (a retry after a lost answer): counted once.
    store.insert(&batch).await.unwrap();
    store.insert(&batch).await.unwrap();

    let range = "from=2025-03-10T10:00:00Z&to=2025-03-10T13:00:00Z";
    let (s, body) = app
        .get(
            &buyer.token,
            &format!("/api/customer-agent-configs/{config}/usage/?{range}"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({
            "config": config,
            "from": "2025-03-10T10:00:00Z",
            "to": "2025-03-10T13:00:00Z",
            "interval": "hour",
            "totals": buyer_point(None, [7, 2, 167, 288, 1], [1, 0, 0, 1, 1], [20.25, 50.125]),
            "series": [
                buyer_point(Some("2025-03-10T10:00:00Z"), [4, 1, 160, 280, 0], [0, 0, 0, 1, 0], [20.25, 30.0]),
                buyer_point(Some("2025-03-10T11:00:00Z"), [0; 5], [0; 5], [0.0, 0.0]),
                buyer_point(Some("2025-03-10T12:00:00Z"), [3, 1, 7, 8, 1], [1, 0, 0, 0, 1], [50.125, 50.125]),
            ],
        })
    );

    // Daily, over the whole day: the events around the range count too.
    let (s, body) = app
        .get(
            &buyer.token,
            &format!(
                "/api/customer-agent-configs/{config}/usage/\
                 ?from=2025-03-10T00:00:00Z&to=2025-03-11T00:00:00Z&interval=day"
            ),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["interval"], "day");
    let day = buyer_point(None, [9, 2, 167, 288, 1], [1, 0, 0, 1, 1], [10.5, 50.125]);
    assert_eq!(body["totals"], day);
    let mut point = day;
    point["start"] = json!("2025-03-10T00:00:00Z");
    assert_eq!(body["series"], json!([point]));

    // The seller sees every buyer of the agent, with billable requests and buyers.
    let (s, body) = app
        .get(
            &provider.token,
            &format!("/api/provider-agents/{agent}/usage/?{range}"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({
            "agent": agent,
            "from": "2025-03-10T10:00:00Z",
            "to": "2025-03-10T13:00:00Z",
            "interval": "hour",
            "last_error": null,
            "totals": seller_point(None, [8, 2, 168, 289, 1], [1, 0, 0, 1, 1], [6, 2], [30.0, 1000.0]),
            "series": [
                seller_point(Some("2025-03-10T10:00:00Z"), [5, 1, 161, 281, 0], [0, 0, 0, 1, 0], [4, 2], [20.25, 1000.0]),
                seller_point(Some("2025-03-10T11:00:00Z"), [0; 5], [0; 5], [0, 0], [0.0, 0.0]),
                seller_point(Some("2025-03-10T12:00:00Z"), [3, 1, 7, 8, 1], [1, 0, 0, 0, 1], [2, 1], [50.125, 50.125]),
            ],
        })
    );
    // Each buyer sees only their own configuration.
    let (s, body) = app
        .get(
            &other.token,
            &format!("/api/customer-agent-configs/{other_config}/usage/?{range}"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        body["totals"],
        buyer_point(None, [1, 0, 1, 1, 0], [0; 5], [1000.0, 1000.0])
    );

    // The buyer's billing period, read by a plain member of the organisation.
    let member = agora_control_plane::identity::create_user(
        &app.state.db,
        &format!("member-{}", Uuid::new_v4().simple()),
        "m@example.com",
        "correct-horse-7",
        false,
    )
    .await
    .unwrap();
    agora_control_plane::identity::add_member(&app.state.db, buyer.org, member, Role::Member)
        .await
        .unwrap();
    let member_token = agora_control_plane::identity::create_token(&app.state.db, member)
        .await
        .unwrap();
    let (s, body) = app
        .get(
            &member_token,
            &format!(
                "/api/organizations/{}/usage/?from=2025-03-01T00:00:00Z&to=2025-04-01T00:00:00Z",
                buyer.org
            ),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({
            "organization": buyer.org,
            "from": "2025-03-01T00:00:00Z",
            "to": "2025-04-01T00:00:00Z",
            "requests": 9,
            "billable_requests": 7,
            "input_tokens": 167,
            "output_tokens": 288,
            "estimated_requests": 1,
        })
    );
    // What billing calls reads the same numbers.
    let march = (DAY - 9 * 24 * HOUR, DAY + 22 * 24 * HOUR);
    let store_of_app = app.state.usage.as_deref().expect("the usage store is open");
    assert_eq!(
        tenant_period_totals(store_of_app, buyer.org, march.0, march.1)
            .await
            .unwrap(),
        PeriodTotals {
            requests: 9,
            billable_requests: 7,
            input_tokens: 167,
            output_tokens: 288,
            estimated_requests: 1,
        }
    );
    assert_eq!(
        tenant_period_totals(store_of_app, other.org, march.0, march.1)
            .await
            .unwrap()
            .requests,
        1
    );
    app.finish().await;
}

/// Without `from`/`to`: the last 24 hours, and this calendar month.
async fn usage_defaults_to_recent(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let provider = app.tenant("Acme", OrgKind::Provider).await;
    let buyer = app.tenant("Globex", OrgKind::Customer).await;
    let (agent, free, _) = app.published_agent(&provider).await;
    let (_, config) = app.subscribed(&buyer, agent, free).await;
    let mine = Subscription {
        tenant: buyer.org,
        config,
        agent,
    };
    let now = time::OffsetDateTime::now_utc();
    let now_ms = (now.unix_timestamp_nanos() / 1_000_000) as i64;
    let recent = event(mine, now_ms - HOUR, UsageStatus::Ok, 2_000);
    let older = event(mine, now_ms - 25 * HOUR, UsageStatus::Ok, 2_000);
    proxy_store(&app)
        .await
        .insert(&[record(&recent), record(&older)])
        .await
        .unwrap();

    let (s, body) = app
        .get(
            &buyer.token,
            &format!("/api/customer-agent-configs/{config}/usage/"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["interval"], "hour");
    assert_eq!(body["totals"]["requests"], 1, "{body}");
    let series = body["series"].as_array().unwrap();
    assert!((24..=25).contains(&series.len()), "{body}");
    assert_eq!(
        series.iter().filter(|p| p["requests"] == 1).count(),
        1,
        "{body}"
    );
    let parse = |v: &Value| {
        time::OffsetDateTime::parse(
            v.as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert_eq!(
        parse(&body["to"]) - parse(&body["from"]),
        time::Duration::DAY
    );

    let (s, body) = app
        .get(
            &buyer.token,
            &format!("/api/organizations/{}/usage/", buyer.org),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let month_start = now
        .replace_day(1)
        .unwrap()
        .replace_time(time::Time::MIDNIGHT);
    let (from, to) = (parse(&body["from"]), parse(&body["to"]));
    assert_eq!(from, month_start, "{body}");
    assert_eq!(to.day(), 1, "{body}");
    assert_eq!(to.time(), time::Time::MIDNIGHT, "{body}");
    assert!(to - from >= time::Duration::days(28) && to - from <= time::Duration::days(31));
    let in_month = [&recent, &older]
        .iter()
        .filter(|e| {
            let t =
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(e.time_ms) * 1_000_000)
                    .unwrap();
            from <= t && t < to
        })
        .count();
    assert_eq!(body["requests"], in_month, "{body}");
    app.finish().await;
}

async fn usage_queries_are_checked(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let provider = app.tenant("Acme", OrgKind::Provider).await;
    let buyer = app.tenant("Globex", OrgKind::Customer).await;
    let (agent, free, _) = app.published_agent(&provider).await;
    let (_, config) = app.subscribed(&buyer, agent, free).await;
    let config_usage = format!("/api/customer-agent-configs/{config}/usage/");
    let org_usage = format!("/api/organizations/{}/usage/", buyer.org);

    let cases: &[(&str, &str, &str, &str)] = &[
        // (route, query, code, the message contains)
        (
            &config_usage,
            "from=yesterday",
            "invalid_timestamp",
            "from ",
        ),
        (&config_usage, "to=2025-03-10", "invalid_timestamp", "to "),
        // An unencoded + arrives as a space.
        (
            &config_usage,
            "to=2025-03-10T12:00:00+02:00",
            "invalid_timestamp",
            "%2B",
        ),
        (
            &config_usage,
            "from=2025-03-10T00:00:00Z&to=2025-03-10T00:00:00Z",
            "invalid_range",
            "before",
        ),
        (
            &config_usage,
            "from=2025-03-11T00:00:00Z&to=2025-03-10T00:00:00Z",
            "invalid_range",
            "before",
        ),
        (
            &config_usage,
            "from=2024-01-01T00:00:00Z&to=2025-01-02T00:00:00Z&interval=day",
            "invalid_range",
            "366 days",
        ),
        (
            &config_usage,
            "from=2024-03-01T00:00:00Z&to=2025-03-01T00:00:00Z",
            "range_too_large",
            "interval=day",
        ),
        (&config_usage, "interval=week", "invalid_query", "week"),
        (&config_usage, "bogus=1", "invalid_query", "bogus"),
        (
            &org_usage,
            "from=2025-03-01T00:00:00Z",
            "invalid_range",
            "both",
        ),
        (
            &org_usage,
            "from=2025-03-01T00:00:00Z&to=bad",
            "invalid_timestamp",
            "to ",
        ),
        (
            &org_usage,
            "from=2024-01-01T00:00:00Z&to=2025-01-02T00:00:00Z",
            "invalid_range",
            "366 days",
        ),
        (&org_usage, "interval=day", "invalid_query", "interval"),
    ];
    for (route, query, code, says) in cases {
        let (s, body) = app.get(&buyer.token, &format!("{route}?{query}")).await;
        assert_error(s, &body, StatusCode::BAD_REQUEST, code);
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{route}?{query}: {message}");
    }
    let agent_usage = format!("/api/provider-agents/{agent}/usage/");
    let (s, body) = app
        .get(&provider.token, &format!("{agent_usage}?from=soon"))
        .await;
    assert_error(s, &body, StatusCode::BAD_REQUEST, "invalid_timestamp");

    // The same year daily is fine; an encoded offset is read as such.
    let (s, body) = app
        .get(
            &buyer.token,
            &format!(
                "{config_usage}?from=2024-03-01T00:00:00Z&to=2025-03-01T00:00:00Z&interval=day"
            ),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["series"].as_array().unwrap().len(), 365);
    let (s, body) = app
        .get(
            &buyer.token,
            &format!("{config_usage}?from=2025-03-10T12:00:00%2B02:00&to=2025-03-10T12:30:00Z"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["from"], "2025-03-10T10:00:00Z");
    assert_eq!(body["series"].as_array().unwrap().len(), 3);
    // 366 days is the longest billing period.
    let (s, body) = app
        .get(
            &buyer.token,
            &format!("{org_usage}?from=2024-01-01T00:00:00Z&to=2025-01-01T00:00:00Z"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["requests"], 0);

    let (s, body) = app.call("GET", None, &config_usage, None).await;
    assert_error(s, &body, StatusCode::UNAUTHORIZED, "not_authenticated");
    app.finish().await;
}

/// A usage store that cannot be opened (ClickHouse not there) does not stop
/// the control plane; the usage routes answer 503 until it is restarted. A
/// store that fails a read answers 503 too.
async fn usage_unavailable_without_store(backend: Backend) {
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let app = TestApp::spawn_with(backend, None, |s| {
        s.usage.store = UsageStoreKind::Clickhouse;
        s.usage.clickhouse_url = Some(format!("http://127.0.0.1:{closed_port}"));
    })
    .await;
    assert!(app.state.usage.is_none());
    let provider = app.tenant("Acme", OrgKind::Provider).await;
    let buyer = app.tenant("Globex", OrgKind::Customer).await;
    let (agent, free, _) = app.published_agent(&provider).await;
    let (_, config) = app.subscribed(&buyer, agent, free).await;

    for (token, path) in [
        (
            &buyer.token,
            format!("/api/customer-agent-configs/{config}/usage/"),
        ),
        (
            &provider.token,
            format!("/api/provider-agents/{agent}/usage/"),
        ),
        (
            &buyer.token,
            format!("/api/organizations/{}/usage/", buyer.org),
        ),
    ] {
        let resp = app
            .http
            .get(format!("{}{path}", app.url))
            .header("Authorization", format!("Token {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.headers().get("retry-after").map(|v| v.as_bytes()),
            Some(&b"1"[..]),
            "{path}"
        );
        let (s, body) = decode(resp).await;
        assert_error(
            s,
            &body,
            StatusCode::SERVICE_UNAVAILABLE,
            "usage_unavailable",
        );
    }
    // Ownership and the query are still checked first.
    let stranger = app.tenant("Initech", OrgKind::Customer).await;
    let (s, body) = app
        .get(
            &stranger.token,
            &format!("/api/customer-agent-configs/{config}/usage/"),
        )
        .await;
    assert_error(s, &body, StatusCode::NOT_FOUND, "not_found");
    let (s, body) = app
        .get(
            &buyer.token,
            &format!("/api/customer-agent-configs/{config}/usage/?from=soon"),
        )
        .await;
    assert_error(s, &body, StatusCode::BAD_REQUEST, "invalid_timestamp");
    app.finish().await;

    // A store that opened but fails to answer is a 503 too, not a 500.
    let app = TestApp::spawn(backend).await;
    let buyer = app.tenant("Globex", OrgKind::Customer).await;
    let path = app.settings().usage_embedded_path();
    let broken = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("DROP TABLE usage_events")
        .execute(&broken)
        .await
        .unwrap();
    broken.close().await;
    let (s, body) = app
        .get(
            &buyer.token,
            &format!("/api/organizations/{}/usage/", buyer.org),
        )
        .await;
    assert_error(
        s,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "usage_unavailable",
    );
    app.finish().await;
}

/// The period's billable requests and tokens of each subscription with a quota
/// reach the snapshot with a new revision; counting again without new usage
/// writes nothing.
async fn quota_counts_reach_the_snapshot(backend: Backend) {
    use agora_config::snapshot::{BillingInterval, QuotaUsage};
    use agora_control_plane::{quota, sync};
    // Rounds are driven by hand here.
    let app = TestApp::spawn_with(backend, None, |s| {
        s.control_plane.quota_count_ms = 3_600_000;
    })
    .await;
    let provider = app.tenant("Acme", OrgKind::Provider).await;
    let buyer = app.tenant("Globex", OrgKind::Customer).await;
    let other = app.tenant("Initech", OrgKind::Customer).await;
    let (agent, free, _) = app.published_agent(&provider).await;
    let (s, metered) = app
        .post(
            &provider.token,
            &format!("/api/provider-agents/{agent}/plans/"),
            json!({"name": "Metered", "price_cents": 0, "request_quota": 100, "token_quota": 10000}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{metered}");
    let (_, config) = app.subscribed(&buyer, agent, id(&metered)).await;
    let (_, unlimited) = app.subscribed(&other, agent, free).await;
    let mine = Subscription {
        tenant: buyer.org,
        config,
        agent,
    };
    let theirs = Subscription {
        tenant: other.org,
        config: unlimited,
        agent,
    };

    let month = quota::period(BillingInterval::Month, time::OffsetDateTime::now_utc()).unwrap();
    let start = month.from_ms;
    use UsageStatus::*;
    let batch = [
        with_tokens(event(mine, start, Ok, 1_000), TokenSource::Runtime, 10, 20),
        event(mine, start + 1, Cancelled, 1_000),
        event(mine, start + 2, UpstreamError, 1_000),
        event(mine, start + 3, RateLimited, 1_000),
        // Last month's use does not count against this month's quota.
        with_tokens(
            event(mine, start - 1, Ok, 1_000),
            TokenSource::Runtime,
            500,
            500,
        ),
        with_tokens(event(theirs, start, Ok, 1_000), TokenSource::Runtime, 7, 7),
    ];
    let records: Vec<UsageRecord> = batch.iter().map(record).collect();
    let writer = proxy_store(&app).await;
    writer.insert(&records).await.unwrap();

    let store = app.state.usage.clone().expect("the embedded store opened");
    let compile = || sync::compile(&app.state.db, Some("http://runtime.test"));
    let before = compile().await.unwrap().revision;
    assert_eq!(
        quota::count_once(&app.state.db, store.as_ref())
            .await
            .unwrap(),
        1
    );
    let snapshot = compile().await.unwrap();
    assert!(
        snapshot.revision > before,
        "a changed count is a new revision"
    );
    let counted = snapshot.routes[&config].quota;
    assert_eq!((counted.requests, counted.tokens), (2, 30), "{counted:?}");
    assert_eq!(
        (counted.period_start_ms, counted.period_end_ms),
        (month.from_ms, month.to_ms)
    );
    assert!(counted.counted_at_ms >= start);
    assert_eq!(
        snapshot.routes[&unlimited].quota,
        QuotaUsage::default(),
        "a plan without quotas is not counted"
    );

    assert_eq!(
        quota::count_once(&app.state.db, store.as_ref())
            .await
            .unwrap(),
        0
    );
    assert_eq!(compile().await.unwrap().revision, snapshot.revision);

    let more = with_tokens(
        event(mine, start + 4, Ok, 1_000),
        TokenSource::Runtime,
        1,
        1,
    );
    writer.insert(&[record(&more)]).await.unwrap();
    assert_eq!(
        quota::count_once(&app.state.db, store.as_ref())
            .await
            .unwrap(),
        1
    );
    let counted = compile().await.unwrap().routes[&config].quota;
    assert_eq!((counted.requests, counted.tokens), (3, 32));
    app.finish().await;
}

/// A count no request could have (written by an older gateway) saturates the
/// sums instead of failing every reading; a runtime's report for a config adds
/// its tokens without being a request; refusals are shown by reason; and quota
/// counting goes on for every other subscription.
async fn huge_counts_saturate_and_config_reports_add_tokens(backend: Backend) {
    use agora_config::snapshot::BillingInterval;
    use agora_control_plane::{quota, sync};
    let app = TestApp::spawn_with(backend, None, |s| {
        s.control_plane.quota_count_ms = 3_600_000;
    })
    .await;
    let provider = app.tenant("Acme", OrgKind::Provider).await;
    let buyer = app.tenant("Globex", OrgKind::Customer).await;
    let other = app.tenant("Initech", OrgKind::Customer).await;
    let (agent, _, _) = app.published_agent(&provider).await;
    let (_, metered) = app
        .post(
            &provider.token,
            &format!("/api/provider-agents/{agent}/plans/"),
            json!({"name": "Metered", "price_cents": 0, "token_quota": 1000}),
        )
        .await;
    let (_, config) = app.subscribed(&buyer, agent, id(&metered)).await;
    let (_, other_config) = app.subscribed(&other, agent, id(&metered)).await;
    let mine = Subscription {
        tenant: buyer.org,
        config,
        agent,
    };
    let theirs = Subscription {
        tenant: other.org,
        config: other_config,
        agent,
    };
    let now = time::OffsetDateTime::now_utc();
    let month = quota::period(BillingInterval::Month, now).unwrap();
    let t = month.from_ms + 1;
    use UsageStatus::*;
    let reported = UsageEvent {
        route: agora_usage::REPORT_ROUTE.into(),
        ..with_tokens(event(mine, t, Ok, 0), TokenSource::Reported, 40, 2)
    };
    let batch = [
        with_tokens(
            event(mine, t, Ok, 1_000),
            TokenSource::Runtime,
            u64::MAX,
            u64::MAX,
        ),
        with_tokens(event(mine, t, Ok, 1_000), TokenSource::Runtime, u64::MAX, 1),
        event(mine, t, RateLimited, 1_000),
        event(mine, t, Unauthorized, 1_000),
        event(mine, t, ClientError, 1_000),
        with_tokens(event(theirs, t, Ok, 1_000), TokenSource::Runtime, 3, 4),
        reported.clone(),
        UsageEvent {
            event_id: Uuid::now_v7(),
            config: Some(other_config),
            tenant: Some(other.org),
            ..reported
        },
    ];
    let records: Vec<UsageRecord> = batch.iter().map(record).collect();
    proxy_store(&app).await.insert(&records).await.unwrap();

    let from = month.from_ms;
    let range = |ms: i64| {
        time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let query = format!("from={}&to={}", range(from), range(from + 3_600_000));
    let (s, body) = app
        .get(
            &buyer.token,
            &format!("/api/customer-agent-configs/{config}/usage/?{query}"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let totals = &body["totals"];
    assert_eq!(totals["requests"], 5, "the report is no request");
    assert!(
        totals["input_tokens"].as_u64().unwrap() >= i64::MAX as u64,
        "{totals}"
    );
    assert_eq!(
        totals["refused"],
        json!({"rate_limited": 1, "unauthorized": 1, "client_error": 1})
    );
    let (s, body) = app
        .get(
            &other.token,
            &format!("/api/customer-agent-configs/{other_config}/usage/?{query}"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        (
            &body["totals"]["requests"],
            &body["totals"]["input_tokens"],
            &body["totals"]["output_tokens"]
        ),
        (&json!(1), &json!(43), &json!(6)),
        "runtime-side usage counts for its config"
    );
    let (s, body) = app
        .get(
            &provider.token,
            &format!("/api/provider-agents/{agent}/usage/?{query}"),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::OK,
        "the seller's view over all buyers reads too: {body}"
    );

    let store = app.state.usage.clone().expect("the embedded store opened");
    quota::count_once(&app.state.db, store.as_ref())
        .await
        .unwrap();
    let routes = sync::compile(&app.state.db, Some("http://runtime.test"))
        .await
        .unwrap()
        .routes;
    assert_eq!(routes[&other_config].quota.tokens, 49);
    assert!(routes[&config].quota.tokens > 1000);
    app.finish().await;
}

crate::both!(
    huge_counts_saturate_and_config_reports_add_tokens,
    quota_counts_reach_the_snapshot,
    usage_totals_and_series,
    usage_defaults_to_recent,
    usage_queries_are_checked,
    usage_unavailable_without_store,
);
