//! Criterion benchmarks of the request path's components, each against the naive
//! way of doing the same thing:
//!
//! - key check: warm (claims cached beside the key table entry) vs cold (the
//!   EdDSA verification a cache-less gateway runs on every request), and a
//!   widget visitor's session token (what a widget message checks instead of
//!   a key);
//! - rate-limit decision: governor's keyed GCRA vs a `Mutex<HashMap>` token bucket;
//! - usage event: the bounded queue's enqueue vs pushing into a `Mutex<Vec>` vs
//!   writing a JSON log line per request.
//!
//! `cargo bench -p agora-benches --bench hot_path`

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agora_benches::fixture;
use agora_config::keys::{ApiKey, Scope, Verifier};
use agora_config::snapshot::QuotaUsage;
use agora_config::usage::{TokenSource, UsageEvent, UsageStatus};
use agora_proxy::keys;
use agora_proxy::ratelimit::Limits;
use agora_proxy::state::{PeerTimeouts, State};
use agora_proxy::usage::{queue, UsageRecord, UsageSink};
use criterion::{criterion_group, criterion_main, Criterion};
use uuid::Uuid;

const NOW: i64 = 1_800_000_000;

fn key_check(c: &mut Criterion) {
    let (snapshot, key) = fixture("http://127.0.0.1:9");
    let timeouts = PeerTimeouts {
        connect: Duration::from_secs(1),
        read: Duration::from_secs(1),
    };
    let verifier = Verifier::new(&snapshot.verification_keys).unwrap();
    let state = State::build(snapshot, &State::empty(), timeouts);
    keys::authenticate(&state, key.as_bytes(), Some(Scope::Invoke), NOW).unwrap();
    let mut group = c.benchmark_group("key_check");
    group.bench_function("warm: hash + table + cached claims", |b| {
        b.iter(|| {
            keys::authenticate(&state, black_box(key.as_bytes()), Some(Scope::Invoke), NOW).unwrap()
        })
    });
    let sessions = agora_proxy::widget::Sessions::new(Some(b"a shared secret of gateways"));
    let token = sessions.issue(&agora_proxy::widget::Visit {
        config: Uuid::from_u128(1),
        key_id: Uuid::from_u128(2),
        visitor: Uuid::new_v4(),
        origin: "https://shop.example.com".into(),
        expires_at: NOW + 600,
    });
    group.bench_function("widget visitor: session token HMAC + parse", |b| {
        b.iter(|| sessions.check(black_box(token.as_bytes()), NOW).unwrap())
    });
    group.bench_function("cold/naive: parse + EdDSA verify", |b| {
        b.iter(|| {
            let k = ApiKey::parse(black_box(&key)).unwrap();
            verifier.verify(&k, NOW).unwrap()
        })
    });
    group.finish();
}

/// The naive limiter: one lock around a map of token buckets.
struct NaiveBuckets {
    rate_per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<Uuid, (f64, Instant)>>,
}

impl NaiveBuckets {
    fn allow(&self, key: Uuid) -> bool {
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap();
        let (tokens, last) = map.entry(key).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*last).as_secs_f64() * self.rate_per_sec).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn rate_limit(c: &mut Criterion) {
    let (snapshot, _) = fixture("http://127.0.0.1:9");
    let entry = snapshot.keys.values().next().unwrap().clone();
    // Rates no benchmark loop can exhaust: every decision is an admission.
    let mut plan = snapshot.plans.values().next().unwrap().clone();
    plan.requests_per_minute = Some(u32::MAX);
    plan.burst = Some(u32::MAX);
    let limits = Limits::new(u32::MAX, u32::MAX);
    let quota = QuotaUsage::default();
    let naive = NaiveBuckets {
        rate_per_sec: 1e9,
        burst: 1e9,
        buckets: Mutex::new(HashMap::new()),
    };
    let mut group = c.benchmark_group("rate_limit");
    group.bench_function("governor GCRA: tenant + key + in-flight slot", |b| {
        b.iter(|| {
            limits
                .admit(black_box(&entry), Some(&plan), &quota, 0, 1)
                .unwrap()
        })
    });
    group.bench_function("naive: Mutex<HashMap> token bucket (key only)", |b| {
        b.iter(|| assert!(naive.allow(black_box(entry.key_id))))
    });
    group.finish();
}

fn event() -> UsageEvent {
    UsageEvent {
        event_id: Uuid::now_v7(),
        time_ms: 1_800_000_000_000,
        tenant: Some(Uuid::from_u128(3)),
        config: Some(Uuid::from_u128(2)),
        key_id: Some(Uuid::from_u128(1)),
        agent: Some(Uuid::from_u128(5)),
        route: "/api/agent-gateway/invoke/".into(),
        status: UsageStatus::Ok,
        http_status: 200,
        latency_us: 812,
        upstream_latency_us: Some(640),
        bytes_in: 64,
        bytes_out: 420,
        input_tokens: Some(5),
        output_tokens: Some(7),
        token_source: TokenSource::Runtime,
    }
}

struct Discard;

#[agora_proxy::async_trait]
impl UsageSink for Discard {
    async fn write(&self, batch: &[UsageRecord]) -> anyhow::Result<()> {
        black_box(batch.len());
        Ok(())
    }
}

fn usage_enqueue(c: &mut Criterion) {
    let (q, drain) = queue(65_536);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let drainer =
        std::thread::spawn(move || runtime.block_on(drain.run(Arc::new(Discard), stop_rx)));
    let mut group = c.benchmark_group("usage_event");
    group.bench_function("bounded queue: try_send (drained by a task)", |b| {
        b.iter_batched(
            || UsageRecord::Event(Box::new(event())),
            |record| q.push(record),
            criterion::BatchSize::SmallInput,
        )
    });
    let vec: Mutex<Vec<UsageEvent>> = Mutex::new(Vec::new());
    group.bench_function("naive: Mutex<Vec> push", |b| {
        b.iter_batched(
            event,
            |e| {
                let mut v = vec.lock().unwrap();
                if v.len() > 100_000 {
                    v.clear();
                }
                v.push(e);
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let log = Mutex::new(std::io::sink());
    group.bench_function("naive: one JSON log line per request", |b| {
        b.iter_batched(
            event,
            |e| {
                let mut out = log.lock().unwrap();
                serde_json::to_writer(&mut *out, &e).unwrap();
                std::io::Write::write_all(&mut *out, b"\n").unwrap();
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
    let _ = stop_tx.send(true);
    let _ = drainer.join();
    println!(
        "usage queue: {} queued, {} dropped because the drain fell behind",
        q.stats()
            .enqueued
            .load(std::sync::atomic::Ordering::Relaxed),
        q.stats().dropped.load(std::sync::atomic::Ordering::Relaxed)
    );
}

criterion_group!(benches, key_check, rate_limit, usage_enqueue);
criterion_main!(benches);
