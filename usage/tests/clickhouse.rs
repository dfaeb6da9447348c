//! The ClickHouse store against a real server (a private one, started from
//! Debian's `clickhouse-server`; the test command installs it).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agora_config::settings::SpillFullPolicy;
use agora_config::usage::{
    RunFailure, TokenReport, TokenSource, UsageEvent, UsageRecord, UsageStatus,
};
use agora_usage::clickhouse::ClickHouseStore;
use agora_usage::local_server::LocalClickHouse;
use agora_usage::pipeline::{Pipeline, PipelineConfig};
use agora_usage::{Scope, TimeRange, UsageStore, METERED_ROUTE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

fn server(dir: &std::path::Path) -> LocalClickHouse {
    LocalClickHouse::start(dir).unwrap_or_else(|e| {
        panic!("these tests need a ClickHouse server and could not start one: {e:#}")
    })
}

async fn store(url: &str) -> ClickHouseStore {
    let db = format!("agora_t_{}", Uuid::new_v4().simple());
    let store = ClickHouseStore::new(url, &db, None, None);
    store.migrate().await.unwrap();
    store
}

fn event(config: Uuid, time_ms: i64, latency_us: u64, tokens: Option<(u64, u64)>) -> UsageEvent {
    UsageEvent {
        event_id: Uuid::now_v7(),
        time_ms,
        tenant: Some(Uuid::from_u128(7)),
        config: Some(config),
        key_id: Some(Uuid::from_u128(9)),
        agent: Some(Uuid::from_u128(11)),
        route: METERED_ROUTE.into(),
        status: UsageStatus::Ok,
        http_status: 200,
        latency_us,
        upstream_latency_us: Some(latency_us / 2),
        bytes_in: 100,
        bytes_out: 400,
        input_tokens: tokens.map(|t| t.0),
        output_tokens: tokens.map(|t| t.1),
        token_source: if tokens.is_some() {
            TokenSource::Runtime
        } else {
            TokenSource::Estimated
        },
    }
}

const HOUR: i64 = 3_600_000;

#[tokio::test]
async fn readings_are_exact_despite_copies_and_follow_the_token_rule() {
    let dir = tempfile::tempdir().unwrap();
    let ch = server(dir.path());
    let store = store(&ch.url()).await;
    let config = Uuid::now_v7();
    let base = 1_700_000_000_000 / HOUR * HOUR;
    let mut batch = Vec::new();
    // Hour 0: latencies 1..=10 ms, runtime counts 2+3 each.
    for ms in 1..=10u64 {
        batch.push(UsageRecord::Event(Box::new(event(
            config,
            base + ms as i64,
            ms * 1000,
            Some((2, 3)),
        ))));
    }
    // Hour 1: an estimate replaced by a report, a runtime count a report does not
    // replace, a refusal, and another tenant's event.
    let estimated = event(config, base + HOUR, 500, Some((1, 1)));
    let estimated = UsageEvent {
        token_source: TokenSource::Estimated,
        ..estimated
    };
    let runtime = event(config, base + HOUR + 1, 700, Some((4, 4)));
    let mut refused = event(config, base + HOUR + 2, 10, None);
    refused.status = UsageStatus::RateLimited;
    refused.http_status = 429;
    refused.input_tokens = None;
    refused.output_tokens = None;
    refused.token_source = TokenSource::None;
    let other = event(Uuid::now_v7(), base + HOUR, 10, Some((50, 50)));
    for e in [&estimated, &runtime, &refused, &other] {
        batch.push(UsageRecord::Event(Box::new(e.clone())));
    }
    batch.push(UsageRecord::Report(TokenReport {
        request_id: estimated.event_id,
        input_tokens: 20,
        output_tokens: 30,
    }));
    batch.push(UsageRecord::Report(TokenReport {
        request_id: runtime.event_id,
        input_tokens: 900,
        output_tokens: 900,
    }));
    // Everything written twice, as a retry would.
    // Why two runs failed: the later one is the agent's last failure.
    let agent = Uuid::from_u128(11);
    for (n, detail) in [(1, "first"), (2, "second")] {
        batch.push(UsageRecord::Failure(Box::new(RunFailure {
            event_id: Uuid::now_v7(),
            time_ms: base + n,
            agent,
            config,
            code: "runtime_error".into(),
            detail: detail.into(),
        })));
    }
    store.insert(&batch).await.unwrap();
    store.insert(&batch).await.unwrap();
    let last = store.last_failure(agent).await.unwrap().unwrap();
    assert_eq!((last.detail.as_str(), last.config), ("second", config));
    assert!(store
        .last_failure(Uuid::from_u128(999))
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        store.raw_event_rows().await.unwrap(),
        2 * 14,
        "the copies are there"
    );

    let range = TimeRange {
        from_ms: base,
        to_ms: base + 2 * HOUR,
    };
    let series = store
        .aggregate(Scope::Config(config), range, HOUR)
        .await
        .unwrap();
    assert_eq!(series.len(), 2);
    let (h0, h1) = (&series[0], &series[1]);
    assert_eq!((h0.start_ms, h1.start_ms), (base, base + HOUR));
    assert_eq!((h0.requests, h0.errors, h0.billable_requests), (10, 0, 10));
    assert_eq!((h0.input_tokens, h0.output_tokens), (20, 30));
    // Nearest rank: p50 of 1..=10 ms is the 5th, p95 the 10th.
    assert_eq!((h0.latency_p50_us, h0.latency_p95_us), (5000, 10_000));
    assert_eq!((h1.requests, h1.errors, h1.billable_requests), (3, 1, 2));
    assert_eq!((h1.input_tokens, h1.output_tokens), (20 + 4, 30 + 4));
    assert_eq!(h1.estimated_requests, 0, "the report replaced the estimate");
    assert_eq!((h1.latency_p50_us, h1.latency_p95_us), (500, 700));

    let total = agora_usage::totals(&store, Scope::Tenant(Uuid::from_u128(7)), range)
        .await
        .unwrap();
    assert_eq!(total.requests, 14, "the tenant sees both configs");
    assert_eq!(total.buyers, 1);
    let agent = agora_usage::totals(&store, Scope::Agent(Uuid::from_u128(11)), range)
        .await
        .unwrap();
    assert_eq!(agent.input_tokens, 20 + 24 + 50);
}

/// A relay in front of ClickHouse that lets the first INSERT reach the server,
/// waits for the server's answer, and closes the client's connection instead of
/// passing the answer on.
async fn losing_relay(target: u16, dropped: Arc<AtomicU64>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let armed = Arc::new(AtomicBool::new(true));
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let (armed, dropped) = (armed.clone(), dropped.clone());
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                else {
                    return;
                };
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let saw_insert = AtomicBool::new(false);
                let up = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if buf[..n].windows(6).any(|w| w == b"INSERT") {
                            saw_insert.store(true, Ordering::SeqCst);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let down = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if saw_insert.load(Ordering::SeqCst) && armed.swap(false, Ordering::SeqCst)
                        {
                            // The server has answered the insert: lose the answer.
                            dropped.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_batch_retried_after_a_lost_response_is_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let ch = server(dir.path());
    let direct = store(&ch.url()).await;
    let database = direct.database().to_owned();
    let dropped = Arc::new(AtomicU64::new(0));
    let relay = losing_relay(ch.http_port, dropped.clone()).await;
    let through_relay = ClickHouseStore::new(&relay, &database, None, None);

    let pipeline = Pipeline::open(
        PipelineConfig {
            spill_path: dir.path().join("spill.log"),
            spill_max_bytes: 1 << 30,
            fsync_every: None,
            when_full: SpillFullPolicy::Refuse,
            batch_max_events: 10_000,
            ship_interval: Duration::from_millis(10),
        },
        Arc::new(through_relay),
    )
    .unwrap();
    let config = Uuid::now_v7();
    let batch: Vec<UsageRecord> = (0..100)
        .map(|i| {
            UsageRecord::Event(Box::new(event(
                config,
                1_700_000_000_000 + i,
                10,
                Some((1, 2)),
            )))
        })
        .collect();
    agora_usage::UsageSink::write(&pipeline, &batch)
        .await
        .unwrap();
    let first = pipeline.ship_all().await;
    assert!(
        first.is_err(),
        "the answer was lost, so the pipeline cannot know"
    );
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    pipeline.ship_all().await.unwrap();

    let rows = direct.raw_event_rows().await.unwrap();
    // 200 on servers without insert_deduplication_token (18.16): the copy is stored.
    assert!(rows == 100 || rows == 200, "{rows}");
    let all = TimeRange {
        from_ms: 0,
        to_ms: i64::MAX / 2,
    };
    let t = agora_usage::totals(&direct, Scope::Config(config), all)
        .await
        .unwrap();
    assert_eq!(t.requests, 100, "counted once although stored {rows} times");
    assert_eq!((t.input_tokens, t.output_tokens), (100, 200));
}
