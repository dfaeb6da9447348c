//! Limits shared across gateways through Redis (`agora_proxy::global`): how
//! close the gateways together come to a limit, what a decision costs, and
//! what a Redis outage does. Each gateway is a `Global` of its own (its rounds
//! on a background runtime, as in `agora proxy`), all on one private Redis;
//! clients pick a gateway at random per request.
//!
//!   cargo bench -p agora-benches --bench global
//!
//! `BENCH_GATEWAYS` (default `1,3,5`) and `BENCH_CLIENTS` (16) adjust it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_proxy::global::{InProcess, Mode};
use agora_proxy::RateLimit;
use agora_testkit::LocalRedis;
use uuid::Uuid;

fn gateways(redis: &LocalRedis, n: usize) -> InProcess {
    InProcess::start(&redis.url(), n)
}

struct Run {
    /// Admitted per window.
    admitted: BTreeMap<i64, u64>,
    decisions: u64,
    /// Each decision's time, sorted.
    latencies: Vec<Duration>,
}

/// `clients` tasks deciding for `id` on random gateways for `run`.
async fn blast(
    gws: &InProcess,
    id: Uuid,
    count: u64,
    window_ms: i64,
    clients: usize,
    run: Duration,
) -> Run {
    let until = Instant::now() + run;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let gws: Vec<_> = gws.gateways.iter().map(|(g, _)| g.clone()).collect();
            tokio::spawn(async move {
                let mut admitted = BTreeMap::new();
                let mut latencies = Vec::new();
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (c as u64 + 1);
                let mut n = 0u32;
                while Instant::now() < until {
                    // A request yields on its I/O; these yield every 32
                    // decisions, so rounds and timers run.
                    n = n.wrapping_add(1);
                    if n.is_multiple_of(32) {
                        tokio::task::yield_now().await;
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let g = &gws[(x % gws.len() as u64) as usize];
                    let now = agora_proxy::sync::now_ms();
                    let started = Instant::now();
                    let decided = g
                        .admit(RateLimit::Key, id, count, window_ms, now, g.deadline())
                        .await;
                    latencies.push(started.elapsed());
                    match decided {
                        Ok(window) => *admitted.entry(window).or_insert(0) += 1,
                        Err(_) => tokio::task::yield_now().await,
                    }
                }
                (admitted, latencies)
            })
        })
        .collect();
    let mut out = Run {
        admitted: BTreeMap::new(),
        decisions: 0,
        latencies: Vec::new(),
    };
    for task in tasks {
        let (admitted, latencies) = task.await.unwrap();
        for (w, n) in admitted {
            *out.admitted.entry(w).or_insert(0) += n;
        }
        out.decisions += latencies.len() as u64;
        out.latencies.extend(latencies);
    }
    out.latencies.sort();
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn inside_one_window(window_ms: i64, run: Duration) {
    let now = agora_proxy::sync::now_ms();
    let left = window_ms - now.rem_euclid(window_ms);
    if left < run.as_millis() as i64 + 1_000 {
        tokio::time::sleep(Duration::from_millis(left as u64 + 50)).await;
    }
}

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let clients = env_list("BENCH_CLIENTS", "16")[0];
    let mut redis = tokio::task::block_in_place(LocalRedis::start);
    println!(
        "shared limits on one Redis ({}), {clients} clients, gateways picked at random",
        redis.url()
    );
    println!();
    println!("admitted / limit, by gateways and window");
    for n in env_list("BENCH_GATEWAYS", "1,3,5") {
        let gws = gateways(&redis, n);
        gws.all_see(n as u32).await;
        // 60 s window: one window, 3 s of asking at well over the limit.
        inside_one_window(60_000, Duration::from_secs(3)).await;
        let minute = blast(
            &gws,
            Uuid::new_v4(),
            3_000,
            60_000,
            clients,
            Duration::from_secs(3),
        )
        .await;
        let total: u64 = minute.admitted.values().sum();
        // 1 s windows: the windows wholly inside 4.5 s.
        let second = blast(
            &gws,
            Uuid::new_v4(),
            500,
            1_000,
            clients,
            Duration::from_millis(4_500),
        )
        .await;
        let full: Vec<u64> = second
            .admitted
            .values()
            .copied()
            .collect::<Vec<_>>()
            .get(1..second.admitted.len().saturating_sub(1))
            .unwrap_or(&[])
            .to_vec();
        let timeouts: u64 = gws
            .gateways
            .iter()
            .map(|(g, _)| g.stats.wait_timeouts.load(Ordering::Relaxed))
            .sum();
        println!(
            "  N={n}: 60 s window {total} of 3000 ({:.4}); 1 s windows {:?} of 500 (min {:.4}, max {:.4}); {timeouts} decisions on a share after a timeout",
            total as f64 / 3000.0,
            full,
            full.iter().min().copied().unwrap_or(0) as f64 / 500.0,
            full.iter().max().copied().unwrap_or(0) as f64 / 500.0,
        );
    }

    println!();
    println!("decisions under a limit never reached (1e9/min), one gateway");
    let gws = gateways(&redis, 1);
    gws.all_see(1).await;
    let run = blast(
        &gws,
        Uuid::new_v4(),
        1_000_000_000,
        60_000,
        clients,
        Duration::from_secs(3),
    )
    .await;
    let waits = gws.gateways[0].0.stats.waits.load(Ordering::Relaxed);
    let rounds = gws.gateways[0].0.stats.rounds_ok.load(Ordering::Relaxed);
    println!(
        "  {:.0} decisions/s; p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}; {waits} waited for a round, {rounds} rounds",
        run.decisions as f64 / 3.0,
        percentile(&run.latencies, 0.5),
        percentile(&run.latencies, 0.99),
        percentile(&run.latencies, 0.999),
        percentile(&run.latencies, 1.0),
    );
    drop(gws);

    println!();
    println!("a Redis outage, 3 gateways, a 300/min key");
    let gws = gateways(&redis, 3);
    gws.all_see(3).await;
    inside_one_window(60_000, Duration::from_secs(10)).await;
    let killed = Instant::now();
    tokio::task::block_in_place(|| redis.kill());
    let id = Uuid::new_v4();
    // Requests keep coming; each gateway turns to its share when its round fails.
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let gws: Vec<_> = gws.gateways.iter().map(|(g, _)| g.clone()).collect();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut admitted = [0u64; 3];
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let g = &gws[i % 3];
                let started = Instant::now();
                let ok = g
                    .admit(
                        RateLimit::Key,
                        id,
                        300,
                        60_000,
                        agora_proxy::sync::now_ms(),
                        g.deadline(),
                    )
                    .await
                    .is_ok();
                latencies.push(started.elapsed());
                if ok {
                    admitted[i % 3] += 1;
                }
                i += 1;
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            latencies.sort();
            (admitted, latencies)
        })
    };
    while !gws
        .gateways
        .iter()
        .all(|(g, _)| g.mode() == Mode::LocalShare)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let noticed = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let resumed = Instant::now();
    tokio::task::block_in_place(|| redis.resume());
    while !gws.gateways.iter().all(|(g, _)| g.mode() == Mode::Global) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let recovered = resumed.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (admitted, latencies) = probe.await.unwrap();
    println!(
        "  all gateways on their shares {noticed:?} after the kill; admitted per gateway from the kill until all were back {admitted:?} (share 100 each); \
         decision p99 {:?}, max {:?} through the outage; all back on Redis {recovered:?} after it returned",
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
    );
}
