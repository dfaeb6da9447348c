//! Load harness: the same upstream driven directly, through nginx (a plain reverse
//! proxy with keep-alive to the upstream and a header check), through bare Pingora
//! (a `ProxyHttp` that only picks the upstream), and through Agora's
//! full hot path (key check, rate limit, body validation, usage event, metrics), in
//! one run, alternating targets round by round. Prints requests/s and p50/p99 for
//! each (medians over rounds) and the ratios Agora/nginx and Agora/direct, then the
//! p99 of each at half of Agora's peak rate.
//!
//! Needs `wrk` and `nginx` (Debian: `apt-get install wrk nginx-light`).
//!
//! ```text
//! cargo bench -p agora-benches --bench load
//! BENCH_SECS=10 BENCH_ROUNDS=3 BENCH_CONNECTIONS=50 BENCH_PROXY_THREADS=1 cargo bench -p agora-benches --bench load
//! ```

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_benches::{fixture, spawn_bare_pingora, spawn_upstream, FLOW_ID};
use agora_proxy::ProxyConfig;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug, Default)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn main() {
    // `cargo test --all-targets` runs bench targets without `--bench`: nothing to do.
    if !std::env::args().any(|a| a == "--bench") {
        println!("load harness: run it with `cargo bench -p agora-benches --bench load`");
        return;
    }
    for tool in ["wrk", "nginx"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            eprintln!("the load harness needs `{tool}` (Debian: apt-get install wrk nginx-light)");
            std::process::exit(1);
        }
    }
    let secs: u64 = env_or("BENCH_SECS", 10);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let connections: usize = env_or("BENCH_CONNECTIONS", 50);
    let threads: usize = env_or("BENCH_PROXY_THREADS", 1);

    let dir = std::env::temp_dir().join(format!("agora-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let upstream = spawn_upstream();
    let (snapshot, key) = fixture(&format!("http://{upstream}"));
    let snapshot_path = dir.join("snapshot.json");
    agora_proxy::sync::save(&snapshot_path, &snapshot).unwrap();

    // Agora, serving from the saved snapshot (no control plane: static stability).
    let config = ProxyConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        control_plane_url: "http://127.0.0.1:1".into(),
        control_plane_max_body_bytes: 8 * 1024 * 1024,
        proxy_secret: None,
        snapshot_path,
        threads,
        max_body_bytes: 64 * 1024,
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(30),
        grace_period: Duration::from_secs(1),
        upstream_pool_size: 1024,
        // The defaults, as a user runs it.
        max_connections: 0,
        max_connections_per_client: 256,
        tenant_requests_per_second: 100_000_000,
        tenant_burst: 1_000_000,
        usage_queue_capacity: 1 << 20,
        usage_batch_max_events: 8192,
        usage_batch_interval: Duration::from_millis(50),
        usage_flush_timeout: Duration::from_secs(1),
        runtime_api_key: Some("bench-runtime-key".to_owned().into()),
        runtime_secret: None,
        long_poll: Duration::from_secs(25),
        handle_signals: false,
        work_stealing: false,
        widget: Default::default(),
    };
    let sink = Arc::new(agora_proxy::usage::LogSink::default());
    let proxy = agora_proxy::start(config, agora_proxy::Metering::Sink(sink.clone()))
        .expect("start the proxy");

    let mut nginx = start_nginx(&dir, upstream.port());
    let bare = spawn_bare_pingora(upstream, threads);
    let nginx_addr = format!("127.0.0.1:{}", nginx.1);

    let body_file = dir.join("post.lua");
    let paced_file = dir.join("paced.lua");
    let script = format!(
        "wrk.method = \"POST\"\nwrk.body = '{{\"input_value\":\"hi\"}}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Authorization\"] = \"Bearer {key}\"\n"
    );
    std::fs::write(&body_file, &script).unwrap();
    std::fs::write(
        &paced_file,
        format!("{script}function delay()\n  return 1\nend\n"),
    )
    .unwrap();

    let targets = [
        ("direct", format!("http://{upstream}/api/v1/run/{FLOW_ID}")),
        (
            "nginx",
            format!("http://{nginx_addr}/api/agent-gateway/invoke/"),
        ),
        (
            "pingora",
            format!("http://{bare}/api/agent-gateway/invoke/"),
        ),
        (
            "agora",
            format!("http://{}/api/agent-gateway/invoke/", proxy.addr),
        ),
    ];
    println!(
        "upstream {upstream}, nginx {nginx_addr}, agora {}",
        proxy.addr
    );
    std::fs::write(dir.join("key"), &key).unwrap();
    if let Ok(hold) = std::env::var("BENCH_HOLD") {
        // Keep everything up for manual measurements (the key is in DIR/key).
        println!("holding for {hold} s; dir {}", dir.display());
        std::thread::sleep(Duration::from_secs(hold.parse().unwrap_or(60)));
    }
    // Each target answers before measuring.
    for (name, url) in &targets {
        let mut warm = wrk(url, &body_file, 4, 1);
        if warm.errors > 0 || warm.rps == 0.0 {
            // A connection cut at the end of a one-second run counts as an error.
            warm = wrk(url, &body_file, 4, 2);
        }
        if warm.errors > 0 || warm.rps == 0.0 {
            stop_nginx(&mut nginx.0);
            panic!("{name} does not answer 2xx: {warm:?}");
        }
    }

    println!(
        "peak: wrk -t1 -c{connections} -d{secs}s, {rounds} rounds alternating targets, medians; agora threads={threads}"
    );
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); targets.len()];
    for round in 0..rounds {
        for (i, (name, url)) in targets.iter().enumerate() {
            let run = wrk(url, &body_file, connections, secs);
            println!(
                "  round {} {name:>6}: {:>9.0} req/s  p50 {:.3} ms  p99 {:.3} ms{}",
                round + 1,
                run.rps,
                run.p50_ms,
                run.p99_ms,
                if run.errors > 0 {
                    format!("  ({} non-2xx!)", run.errors)
                } else {
                    String::new()
                }
            );
            results[i].push(run);
        }
    }
    let med: Vec<Run> = results.iter().map(|r| median(r)).collect();
    println!();
    println!(
        "{:>8} {:>12} {:>10} {:>10}",
        "target", "req/s", "p50 ms", "p99 ms"
    );
    for ((name, _), m) in targets.iter().zip(&med) {
        println!(
            "{name:>8} {:>12.0} {:>10.3} {:>10.3}",
            m.rps, m.p50_ms, m.p99_ms
        );
    }
    println!(
        "ratios: agora/nginx {:.2}x, agora/direct {:.2}x, agora/bare pingora {:.2}x, bare pingora/nginx {:.2}x, nginx/direct {:.2}x",
        med[3].rps / med[1].rps,
        med[3].rps / med[0].rps,
        med[3].rps / med[2].rps,
        med[2].rps / med[1].rps,
        med[1].rps / med[0].rps
    );

    // Half of Agora's peak: paced connections (1 ms pause between requests on
    // each), the same number for every target.
    let half = med[3].rps / 2.0;
    // Each connection waits 1 ms plus a response per request: calibrate the number
    // of connections on Agora until it runs at about half its peak.
    let mut paced_conns = ((half / 800.0).round() as usize).max(1);
    for _ in 0..3 {
        let probe = wrk(&targets[3].1, &paced_file, paced_conns, 2);
        if probe.rps <= 0.0 || (probe.rps - half).abs() / half < 0.1 {
            break;
        }
        paced_conns = ((paced_conns as f64 * half / probe.rps).round() as usize).max(1);
    }
    println!();
    println!(
        "at about half of agora's peak ({half:.0} req/s): wrk -t1 -c{paced_conns} with 1 ms between requests per connection"
    );
    let mut paced: Vec<Run> = Vec::new();
    for (name, url) in &targets {
        let runs: Vec<Run> = (0..rounds)
            .map(|_| wrk(url, &paced_file, paced_conns, secs))
            .collect();
        let m = median(&runs);
        println!(
            "{name:>8} {:>12.0} req/s  p50 {:.3} ms  p99 {:.3} ms",
            m.rps, m.p50_ms, m.p99_ms
        );
        paced.push(m);
    }
    println!(
        "p99 overhead at that load: agora - direct {:.3} ms, nginx - direct {:.3} ms, bare pingora - direct {:.3} ms",
        paced[3].p99_ms - paced[0].p99_ms,
        paced[1].p99_ms - paced[0].p99_ms,
        paced[2].p99_ms - paced[0].p99_ms
    );
    let events = sink.events.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "usage events stored by the sink so far: {events} (queue dropped {})",
        proxy
            .gateway
            .usage
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    );

    stop_nginx(&mut nginx.0);
    proxy.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM lets the master stop its worker (SIGKILL would orphan it).
fn stop_nginx(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

fn median(runs: &[Run]) -> Run {
    let pick = |f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    Run {
        rps: pick(|r| r.rps),
        p50_ms: pick(|r| r.p50_ms),
        p99_ms: pick(|r| r.p99_ms),
        errors: runs.iter().map(|r| r.errors).sum(),
    }
}

fn wrk(url: &str, script: &Path, connections: usize, secs: u64) -> Run {
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{secs}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut run = Run::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", n] => run.rps = n.parse().unwrap_or(0.0),
            ["50%", v] => run.p50_ms = millis(v),
            ["99%", v] => run.p99_ms = millis(v),
            ["Non-2xx", "or", "3xx", "responses:", n] => run.errors = n.parse().unwrap_or(0),
            _ => {}
        }
    }
    if text.contains("Socket errors") {
        run.errors += 1;
    }
    run
}

fn millis(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => f64::NAN,
    }
}

/// nginx: one worker, keep-alive upstream, a header check; returns the child and port.
fn start_nginx(dir: &Path, upstream_port: u16) -> (Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = dir.display();
    let conf = format!(
        r#"worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream runtime {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      if ($http_authorization = "") {{ return 401; }}
      proxy_pass http://runtime/api/v1/run/{FLOW_ID};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"#
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start nginx");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, port)
}
