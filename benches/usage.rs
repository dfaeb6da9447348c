//! Usage throughput into the stores, and the memory the usage queue holds at its
//! bound. Starts a private ClickHouse server (Debian's `clickhouse-server`, or
//! `AGORA_CLICKHOUSE_SERVER`).
//!
//!   cargo bench -p agora-benches --bench usage
//!
//! `BENCH_EVENTS` (default 2,000,000) events go through each path:
//! - store insert: batches of 10,000 straight into the store;
//! - pipeline: the proxy's queue → drain → spill log (fsync per batch) → shipper →
//!   store, the way `agora proxy` runs, with one producer pushing as fast as the
//!   queue takes events (a full queue is retried, not dropped); with the process's
//!   CPU time per event (user + system, the producer's making of events included;
//!   ClickHouse's own server is another process and not counted).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_config::settings::SpillFullPolicy;
use agora_config::usage::{UsageEvent, UsageRecord};
use agora_proxy::usage::queue;
use agora_usage::clickhouse::ClickHouseStore;
use agora_usage::embedded::EmbeddedStore;
use agora_usage::local_server::LocalClickHouse;
use agora_usage::pipeline::{Pipeline, PipelineConfig};
use agora_usage::{UsageSink, UsageStore};
use uuid::Uuid;

fn event(config: Uuid, i: u64) -> UsageEvent {
    agora_benches::usage_event(config, 1_700_000_000_000 + i as i64, i)
}

/// User + system CPU time of this process so far, seconds.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = &stat[stat.rfind(')').map(|i| i + 2).unwrap_or(0)..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn store_insert(name: &str, store: &dyn UsageStore, n: u64) {
    let config = Uuid::now_v7();
    // Only the inserts are timed; building the events is not.
    let mut inserting = Duration::ZERO;
    let mut sent = 0;
    while sent < n {
        let batch: Vec<UsageRecord> = (sent..(sent + 10_000).min(n))
            .map(|i| UsageRecord::Event(Box::new(event(config, i))))
            .collect();
        sent += batch.len() as u64;
        let started = Instant::now();
        store.insert(&batch).await.expect("insert");
        inserting += started.elapsed();
    }
    let secs = inserting.as_secs_f64();
    println!(
        "{name:<42} {n:>9} events in {secs:>6.2} s = {:>9.0} events/s",
        n as f64 / secs
    );
}

async fn pipeline(name: &str, store: Arc<dyn UsageStore>, dir: &std::path::Path, n: u64) {
    let pipeline = Arc::new(
        Pipeline::open(
            PipelineConfig {
                spill_path: dir.join(format!("{name}.spill")),
                spill_max_bytes: 8 << 30,
                fsync_every: None,
                when_full: SpillFullPolicy::Refuse,
                batch_max_events: 10_000,
                ship_interval: Duration::from_millis(50),
            },
            store,
        )
        .expect("pipeline"),
    );
    let (q, mut drain) = queue(65_536);
    drain.max_batch = 10_000;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (ship_tx, ship_rx) = tokio::sync::watch::channel(false);
    let drained = tokio::spawn(drain.run(pipeline.clone() as Arc<dyn UsageSink>, stop_rx));
    let shipped = tokio::spawn(
        pipeline
            .clone()
            .run_shipper(ship_rx, Duration::from_secs(60)),
    );
    let config = Uuid::now_v7();
    let started = Instant::now();
    let cpu_before = cpu_secs();
    let producer = {
        let q = q.clone();
        std::thread::spawn(move || {
            let mut full = 0u64;
            for i in 0..n {
                let mut record = UsageRecord::Event(Box::new(event(config, i)));
                loop {
                    match q.try_push(record) {
                        Ok(()) => break,
                        Err(back) => {
                            full += 1;
                            record = back;
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    }
                }
            }
            full
        })
    };
    let full = tokio::task::spawn_blocking(move || producer.join().unwrap())
        .await
        .unwrap();
    while pipeline.stats().shipped.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu_before;
    let _ = stop_tx.send(true);
    drained.await.unwrap();
    let _ = ship_tx.send(true);
    shipped.await.unwrap();
    println!(
        "{name:<42} {n:>9} events in {secs:>6.2} s = {:>9.0} events/s, CPU {:.2} µs/event incl. making them (queue full {full} times)",
        n as f64 / secs,
        cpu * 1e6 / n as f64
    );
}

fn main() {
    // `cargo test --all-targets` runs bench targets without `--bench`: nothing to do.
    if !std::env::args().any(|a| a == "--bench") {
        println!("usage benchmark: run it with `cargo bench -p agora-benches --bench usage`");
        return;
    }
    let n: u64 = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Memory of the queue at its bound (the default capacity).
    let capacity = 65_536;
    let (q, _drain) = queue(capacity);
    let before = rss_bytes();
    let config = Uuid::now_v7();
    for i in 0..capacity as u64 {
        assert!(q.push(UsageRecord::Event(Box::new(event(config, i)))));
    }
    let after = rss_bytes();
    println!(
        "usage queue at its bound: {capacity} events, RSS +{:.1} MiB ({} bytes per event)",
        (after - before) as f64 / (1 << 20) as f64,
        (after - before) / capacity as u64
    );
    drop(q);
    drop(_drain);

    let ch = LocalClickHouse::start(&dir.path().join("clickhouse"))
        .unwrap_or_else(|e| panic!("the usage benchmark needs a ClickHouse server: {e:#}"));
    println!("ClickHouse at {} ({} events per path)", ch.url(), n);
    runtime.block_on(async {
        let clickhouse = Arc::new(ClickHouseStore::new(&ch.url(), "agora_bench", None, None));
        clickhouse.migrate().await.expect("migrate");
        store_insert("clickhouse: store insert", &*clickhouse, n).await;
        pipeline(
            "clickhouse: proxy queue → spill → store",
            clickhouse.clone(),
            dir.path(),
            n,
        )
        .await;
        let embedded = Arc::new(
            EmbeddedStore::open(&dir.path().join("usage.db"))
                .await
                .expect("embedded store"),
        );
        let small = (n / 4).max(1);
        store_insert("embedded: store insert", &*embedded, small).await;
        pipeline(
            "embedded: proxy queue → spill → store",
            embedded,
            dir.path(),
            small,
        )
        .await;
    });
}
