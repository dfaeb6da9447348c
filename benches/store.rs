//! Criterion benchmarks of metering's per-event costs past the request path, each
//! against the naive alternative:
//!
//! - the embedded store's insert (a time-ordered table with no secondary index,
//!   one prepared statement per row bound in place, one transaction per batch, on
//!   its own writer connection) vs the earlier path (a rowid table with an
//!   `event_id` key and an index per scope, multi-row `INSERT … VALUES` built per
//!   batch through sqlx) vs the naive one (the earlier table, one sqlx `INSERT`
//!   per event in a transaction);
//! - the spill log's frame: encoding a batch, and decoding it back (what the
//!   shipper does when the batch is not in memory any more).
//!
//! Figures are the process's CPU time (user + system, every thread: sqlx's worker
//! and the store's blocking thread included) per batch of 1,000 events — divide
//! by 1,000 for the cost per event — not wall time: a commit's fsync waits on the
//! disk (tens of ms on some machines) without using the CPU.
//!
//! `cargo bench -p agora-benches --bench store`

use std::time::Duration;

use agora_config::usage::{UsageEvent, UsageRecord};
use agora_usage::embedded::EmbeddedStore;
use agora_usage::UsageStore;
use criterion::{criterion_group, criterion_main, Criterion};
use sqlx::{QueryBuilder, Sqlite};
use uuid::Uuid;

const BATCH: usize = 1000;

/// CPU time of the whole process so far.
fn process_cpu() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .expect("process CPU clock");
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

/// Events arrive in time order, as from gateways: each batch is later than the last.
static CLOCK_MS: std::sync::atomic::AtomicI64 =
    std::sync::atomic::AtomicI64::new(1_700_000_000_000);

fn event(i: u64) -> UsageEvent {
    // Twenty configs, as from several buyers.
    agora_benches::usage_event(
        Uuid::from_u128(100 + (i % 20) as u128),
        CLOCK_MS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        i,
    )
}

fn batch() -> Vec<UsageRecord> {
    (0..BATCH as u64)
        .map(|i| UsageRecord::Event(Box::new(event(i))))
        .collect()
}

/// The embedded store's earlier layout.
const EARLIER_LAYOUT: &[&str] = &[
    "CREATE TABLE usage_events (event_id TEXT PRIMARY KEY, time_ms INTEGER NOT NULL, \
     tenant TEXT, config TEXT, key_id TEXT, agent TEXT, route TEXT NOT NULL, status TEXT NOT NULL, \
     http_status INTEGER NOT NULL, latency_us INTEGER NOT NULL, upstream_latency_us INTEGER, \
     bytes_in INTEGER NOT NULL, bytes_out INTEGER NOT NULL, input_tokens INTEGER NOT NULL, \
     output_tokens INTEGER NOT NULL, token_source TEXT NOT NULL)",
    "CREATE INDEX usage_events_config ON usage_events (config, time_ms)",
    "CREATE INDEX usage_events_agent ON usage_events (agent, time_ms)",
    "CREATE INDEX usage_events_tenant ON usage_events (tenant, time_ms)",
];

/// The earlier embedded insert: one multi-row statement per 500 events, its
/// SQL text built per batch, every value an owned argument, through sqlx.
async fn multi_row(pool: &sqlx::SqlitePool, batch: &[UsageRecord]) {
    let mut tx = pool.begin().await.unwrap();
    let events: Vec<&UsageEvent> = batch
        .iter()
        .filter_map(|r| match r {
            UsageRecord::Event(e) => Some(&**e),
            _ => None,
        })
        .collect();
    for chunk in events.chunks(500) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT OR IGNORE INTO usage_events (event_id, time_ms, tenant, config, key_id, \
             agent, route, status, http_status, latency_us, upstream_latency_us, bytes_in, \
             bytes_out, input_tokens, output_tokens, token_source) ",
        );
        q.push_values(chunk, |mut row, e| {
            row.push_bind(e.event_id.to_string())
                .push_bind(e.time_ms)
                .push_bind(e.tenant.map(|u| u.to_string()))
                .push_bind(e.config.map(|u| u.to_string()))
                .push_bind(e.key_id.map(|u| u.to_string()))
                .push_bind(e.agent.map(|u| u.to_string()))
                .push_bind(e.route.as_str())
                .push_bind(e.status.as_str())
                .push_bind(i64::from(e.http_status))
                .push_bind(e.latency_us as i64)
                .push_bind(e.upstream_latency_us.map(|v| v as i64))
                .push_bind(e.bytes_in as i64)
                .push_bind(e.bytes_out as i64)
                .push_bind(e.input_tokens.unwrap_or(0) as i64)
                .push_bind(e.output_tokens.unwrap_or(0) as i64)
                .push_bind(e.token_source.as_str());
        });
        q.build().execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
}

/// The naive insert: one statement per event, each a round trip to sqlx's worker.
async fn row_by_row(pool: &sqlx::SqlitePool, batch: &[UsageRecord]) {
    let mut tx = pool.begin().await.unwrap();
    for r in batch {
        let UsageRecord::Event(e) = r else { continue };
        sqlx::query(
            "INSERT OR IGNORE INTO usage_events (event_id, time_ms, tenant, config, key_id, \
             agent, route, status, http_status, latency_us, upstream_latency_us, bytes_in, \
             bytes_out, input_tokens, output_tokens, token_source) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(e.event_id.to_string())
        .bind(e.time_ms)
        .bind(e.tenant.map(|u| u.to_string()))
        .bind(e.config.map(|u| u.to_string()))
        .bind(e.key_id.map(|u| u.to_string()))
        .bind(e.agent.map(|u| u.to_string()))
        .bind(e.route.as_str())
        .bind(e.status.as_str())
        .bind(i64::from(e.http_status))
        .bind(e.latency_us as i64)
        .bind(e.upstream_latency_us.map(|v| v as i64))
        .bind(e.bytes_in as i64)
        .bind(e.bytes_out as i64)
        .bind(e.input_tokens.unwrap_or(0) as i64)
        .bind(e.output_tokens.unwrap_or(0) as i64)
        .bind(e.token_source.as_str())
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
}

fn embedded_insert(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("embedded_store_insert_1000_events");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));

    let store = runtime
        .block_on(EmbeddedStore::open(&dir.path().join("store.db")))
        .unwrap();
    group.bench_function("store: prepared statement per row, one writer", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let records = batch();
                let started = process_cpu();
                runtime.block_on(store.insert_owned(records)).unwrap();
                total += process_cpu() - started;
            }
            total
        })
    });

    for (name, file) in [
        ("earlier: multi-row VALUES through sqlx", "multi.db"),
        ("naive: one sqlx INSERT per event", "naive.db"),
    ] {
        let path = dir.path().join(file);
        let pool = runtime
            .block_on(
                sqlx::sqlite::SqlitePoolOptions::new().connect_with(
                    sqlx::sqlite::SqliteConnectOptions::new()
                        .filename(&path)
                        .create_if_missing(true)
                        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                        .synchronous(sqlx::sqlite::SqliteSynchronous::Full),
                ),
            )
            .unwrap();
        for ddl in EARLIER_LAYOUT {
            runtime.block_on(sqlx::query(ddl).execute(&pool)).unwrap();
        }
        let naive = file == "naive.db";
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let records = batch();
                    let started = process_cpu();
                    runtime.block_on(async {
                        if naive {
                            row_by_row(&pool, &records).await
                        } else {
                            multi_row(&pool, &records).await
                        }
                    });
                    total += process_cpu() - started;
                }
                total
            })
        });
    }
    group.finish();
}

fn spill_frame(c: &mut Criterion) {
    let records = batch();
    let frame = agora_usage::pipeline::encode_frame(&records).unwrap();
    let mut group = c.benchmark_group("spill_frame_1000_events");
    group.bench_function("encode (postcard + crc32)", |b| {
        b.iter(|| agora_usage::pipeline::encode_frame(std::hint::black_box(&records)).unwrap())
    });
    group.bench_function("decode (crc32 + postcard)", |b| {
        b.iter(|| agora_usage::pipeline::decode_frame(std::hint::black_box(&frame)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, embedded_insert, spill_frame);
criterion_main!(benches);
