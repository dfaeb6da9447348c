//! Load harness: the same upstream driven directly, through nginx (a plain reverse
//! proxy with keep-alive to the upstream and a header check), and through Agora's
//! gateway as `agora proxy` runs it — key check, limits, body validation, one usage
//! event per request into the real metering pipeline — in one run, alternating
//! targets round by round.
//!
//! Each gateway is a process of its own, started from settings the way `agora proxy`
//! starts (`ProxyConfig::from_settings`, `open_metering`), so its CPU time can be read
//! from `/proc`:
//! - `agora/embedded`: spill log + the embedded SQLite store (`agora up`'s default);
//! - `agora/clickhouse`: spill log + ClickHouse (a private server from Debian's
//!   `clickhouse-server`; left out, and said so, when there is none);
//! - `agora/sink`: a counting sink that stores nothing — a reduced path, for
//!   reference only, never the product's figure.
//!
//! Prints requests/s, p50/p99 and CPU time per request (user + system of the proxy's
//! processes over the run: the gateway's whole process, nginx's master and workers)
//! for each, medians over rounds, then the ratios against nginx at the same worker
//! count, the p99 of each at half of the embedded gateway's peak, and what each
//! gateway's store holds at the end against the requests wrk saw answered.
//!
//! Needs `wrk` and `nginx` (Debian: `apt-get install wrk nginx-light`).
//!
//! ```text
//! cargo bench -p agora-benches --bench load
//! BENCH_SECS=8 BENCH_ROUNDS=3 BENCH_CONNECTIONS=50 BENCH_PROXY_THREADS=1,2 cargo bench -p agora-benches --bench load
//! BENCH_TARGETS=embedded,sink BENCH_BARE=1 …   # which gateways; BENCH_BARE adds bare Pingora (in-process, no CPU figure)
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_benches::{fixture, spawn_bare_pingora, spawn_upstream, CONFIG, FLOW_ID};
use agora_config::settings::Settings;
use agora_usage::{Scope, TimeRange, UsageStore};

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
    requests: u64,
    /// CPU time of the target's processes per answered request, µs.
    cpu_us: Option<f64>,
}

/// How a gateway meters.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Metering {
    Embedded,
    ClickHouse,
    Sink,
}

impl Metering {
    fn name(self) -> &'static str {
        match self {
            Metering::Embedded => "embedded",
            Metering::ClickHouse => "clickhouse",
            Metering::Sink => "sink",
        }
    }
}

/// One thing wrk drives.
struct Target {
    name: String,
    url: String,
    /// Processes whose CPU time is the target's (nginx: master and workers).
    pids: Vec<u32>,
    gateway: Option<Gateway>,
    threads: Option<usize>,
    /// Requests wrk saw answered, over every run.
    answered: u64,
}

struct Gateway {
    child: Child,
    metering: Metering,
    data_dir: PathBuf,
}

fn main() {
    if std::env::var("AGORA_LOAD_ROLE").as_deref() == Ok("gateway") {
        serve_gateway();
        return;
    }
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
    let secs: u64 = env_or("BENCH_SECS", 8);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let connections: usize = env_or("BENCH_CONNECTIONS", 50);
    let thread_counts: Vec<usize> = std::env::var("BENCH_PROXY_THREADS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter_map(|t| t.trim().parse().ok())
        .collect();
    let wanted: Vec<Metering> = std::env::var("BENCH_TARGETS")
        .unwrap_or_else(|_| "embedded,clickhouse,sink".into())
        .split(',')
        .filter_map(|t| match t.trim() {
            "embedded" => Some(Metering::Embedded),
            "clickhouse" => Some(Metering::ClickHouse),
            "sink" => Some(Metering::Sink),
            _ => None,
        })
        .collect();
    let clock_ticks: f64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);

    let dir = std::env::temp_dir().join(format!("agora-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let upstream = spawn_upstream();
    let (snapshot, key) = fixture(&format!("http://{upstream}"));

    let clickhouse = if wanted.contains(&Metering::ClickHouse) {
        match agora_usage::local_server::LocalClickHouse::start(&dir.join("clickhouse")) {
            Ok(server) => Some(server),
            Err(e) => {
                println!(
                    "agora/clickhouse left out: no ClickHouse server could be started ({e:#})"
                );
                None
            }
        }
    } else {
        None
    };

    let mut targets: Vec<Target> = vec![Target {
        name: "direct".into(),
        url: format!("http://{upstream}/api/v1/run/{FLOW_ID}"),
        pids: Vec::new(),
        gateway: None,
        threads: None,
        answered: 0,
    }];
    let mut nginxes = Vec::new();
    for &threads in &thread_counts {
        let (child, port) = start_nginx(
            &dir.join(format!("nginx-{threads}")),
            upstream.port(),
            threads,
        );
        targets.push(Target {
            name: "nginx".into(),
            url: format!("http://127.0.0.1:{port}/api/agent-gateway/invoke/"),
            pids: vec![child.id()],
            gateway: None,
            threads: Some(threads),
            answered: 0,
        });
        nginxes.push(child);
        for &metering in &wanted {
            if metering == Metering::ClickHouse && clickhouse.is_none() {
                continue;
            }
            let data_dir = dir.join(format!("agora-{}-{threads}", metering.name()));
            std::fs::create_dir_all(&data_dir).unwrap();
            agora_proxy::sync::save(&data_dir.join("proxy-snapshot.json"), &snapshot).unwrap();
            let mut toml = format!(
                "data_dir = {data_dir:?}\n\
                 [proxy]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 control_plane_url = \"http://127.0.0.1:1\"\nthreads = {threads}\n\
                 tenant_requests_per_second = 100000000\ntenant_burst = 1000000\n\
                 [runtime]\napi_key = \"bench-runtime-key\"\n"
            );
            if let (Metering::ClickHouse, Some(ch)) = (metering, &clickhouse) {
                toml.push_str(&format!(
                    "[usage]\nstore = \"clickhouse\"\nclickhouse_url = \"{}\"\nclickhouse_database = \"agora_load_{threads}\"\n",
                    ch.url()
                ));
            }
            let settings_path = data_dir.join("agora.toml");
            std::fs::write(&settings_path, toml).unwrap();
            let (child, addr) = start_gateway(&settings_path, metering);
            targets.push(Target {
                name: format!("agora/{}", metering.name()),
                url: format!("http://{addr}/api/agent-gateway/invoke/"),
                pids: vec![child.id()],
                gateway: Some(Gateway {
                    child,
                    metering,
                    data_dir,
                }),
                threads: Some(threads),
                answered: 0,
            });
        }
    }
    if std::env::var("BENCH_BARE").is_ok() {
        let threads = thread_counts.first().copied().unwrap_or(1);
        let bare = spawn_bare_pingora(upstream, threads);
        targets.push(Target {
            name: "pingora".into(),
            url: format!("http://{bare}/api/agent-gateway/invoke/"),
            pids: Vec::new(),
            gateway: None,
            threads: Some(threads),
            answered: 0,
        });
    }

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
    std::fs::write(dir.join("key"), &key).unwrap();
    for t in &targets {
        println!("{:>18} {}", label(t), t.url);
    }
    if let Ok(hold) = std::env::var("BENCH_HOLD") {
        // Keep everything up for manual measurements (the key is in DIR/key).
        println!("holding for {hold} s; dir {}", dir.display());
        std::thread::sleep(Duration::from_secs(hold.parse().unwrap_or(60)));
    }
    // Each target answers before measuring.
    for t in &mut targets {
        let mut warm = wrk(t, &body_file, 4, 1, clock_ticks);
        if warm.errors > 0 || warm.rps == 0.0 {
            // A connection cut at the end of a one-second run counts as an error.
            warm = wrk(t, &body_file, 4, 2, clock_ticks);
        }
        if warm.errors > 0 || warm.rps == 0.0 {
            let name = label(t);
            stop_all(&mut nginxes, &mut targets);
            panic!("{name} does not answer 2xx: {warm:?}");
        }
    }

    println!();
    println!(
        "peak: wrk -t1 -c{connections} -d{secs}s, {rounds} rounds alternating targets, medians"
    );
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); targets.len()];
    for round in 0..rounds {
        for (i, t) in targets.iter_mut().enumerate() {
            let run = wrk(t, &body_file, connections, secs, clock_ticks);
            println!(
                "  round {} {:>18}: {:>9.0} req/s  p50 {:.3} ms  p99 {:.3} ms  cpu {}{}",
                round + 1,
                label(t),
                run.rps,
                run.p50_ms,
                run.p99_ms,
                cpu(run.cpu_us),
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
        "{:>18} {:>10} {:>9} {:>9} {:>14}",
        "target", "req/s", "p50 ms", "p99 ms", "CPU µs/req"
    );
    for (t, m) in targets.iter().zip(&med) {
        println!(
            "{:>18} {:>10.0} {:>9.3} {:>9.3} {:>14}",
            label(t),
            m.rps,
            m.p50_ms,
            m.p99_ms,
            cpu(m.cpu_us)
        );
    }
    println!();
    for &threads in &thread_counts {
        let Some(nginx) = targets
            .iter()
            .position(|t| t.name == "nginx" && t.threads == Some(threads))
        else {
            continue;
        };
        for (i, t) in targets.iter().enumerate() {
            if t.gateway.is_none() || t.threads != Some(threads) {
                continue;
            }
            let reduced = if t.gateway.as_ref().map(|g| g.metering) == Some(Metering::Sink) {
                "  (reduced path: stores nothing)"
            } else {
                ""
            };
            println!(
                "threads {threads}: {}/nginx throughput {:.2}x, CPU per request {}{reduced}",
                t.name,
                med[i].rps / med[nginx].rps,
                match (med[i].cpu_us, med[nginx].cpu_us) {
                    (Some(a), Some(n)) if n > 0.0 => format!("{:.2}x ({a:.1} vs {n:.1} µs)", a / n),
                    _ => "–".into(),
                }
            );
        }
    }

    // Half of the embedded gateway's peak at the first thread count: paced
    // connections (1 ms pause between requests on each), the same for every target.
    let first = thread_counts.first().copied();
    let reference = targets
        .iter()
        .position(|t| t.name == "agora/embedded" && t.threads == first)
        .or_else(|| targets.iter().position(|t| t.gateway.is_some()));
    if let Some(reference) = reference {
        let half = med[reference].rps / 2.0;
        let mut paced_conns = ((half / 800.0).round() as usize).max(1);
        for _ in 0..3 {
            let probe = wrk(
                &mut targets[reference],
                &paced_file,
                paced_conns,
                2,
                clock_ticks,
            );
            if probe.rps <= 0.0 || (probe.rps - half).abs() / half < 0.1 {
                break;
            }
            paced_conns = ((paced_conns as f64 * half / probe.rps).round() as usize).max(1);
        }
        println!();
        println!(
            "at about half of {}'s peak ({half:.0} req/s): wrk -t1 -c{paced_conns} with 1 ms between requests per connection",
            label(&targets[reference])
        );
        let mut direct_p99 = f64::NAN;
        for t in targets.iter_mut() {
            if t.threads.is_some() && t.threads != first {
                continue;
            }
            let runs: Vec<Run> = (0..rounds)
                .map(|_| wrk(t, &paced_file, paced_conns, secs, clock_ticks))
                .collect();
            let m = median(&runs);
            if t.name == "direct" {
                direct_p99 = m.p99_ms;
            }
            println!(
                "{:>18} {:>10.0} req/s  p50 {:.3} ms  p99 {:.3} ms  (p99 - direct {:+.3} ms)  cpu {}",
                label(t),
                m.rps,
                m.p50_ms,
                m.p99_ms,
                m.p99_ms - direct_p99,
                cpu(m.cpu_us)
            );
        }
    }

    // Each gateway stops as on SIGTERM (flushing its usage), then its store is read.
    println!();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for t in targets.iter_mut() {
        let answered = t.answered;
        let label = label(t);
        let Some(g) = t.gateway.as_mut() else {
            continue;
        };
        terminate(&mut g.child);
        let stored = match g.metering {
            Metering::Sink => {
                println!(
                    "{label:>18}: {answered} requests answered; the counting sink stores nothing"
                );
                continue;
            }
            Metering::Embedded => runtime.block_on(async {
                let store =
                    agora_usage::embedded::EmbeddedStore::open(&g.data_dir.join("usage.db"))
                        .await?;
                stored_requests(&store).await
            }),
            Metering::ClickHouse => runtime.block_on(async {
                let text = std::fs::read_to_string(g.data_dir.join("agora.toml"))?;
                let settings = Settings::from_toml_str(&text)?;
                let store = agora_usage::clickhouse::ClickHouseStore::from_settings(&settings)?;
                stored_requests(&store).await
            }),
        };
        match stored {
            Ok(n) => {
                println!(
                "{label:>18}: {answered} requests answered, {n} metered requests in its store{}",
                if n >= answered { "" } else { "  (FEWER THAN ANSWERED!)" }
            )
            }
            Err(e) => println!("{label:>18}: reading its store failed: {e:#}"),
        }
    }
    stop_all(&mut nginxes, &mut targets);
    drop(clickhouse);
    let _ = std::fs::remove_dir_all(&dir);
}

async fn stored_requests(store: &dyn UsageStore) -> anyhow::Result<u64> {
    let all = TimeRange {
        from_ms: 0,
        to_ms: i64::MAX / 2,
    };
    Ok(agora_usage::totals(store, Scope::Config(CONFIG), all)
        .await?
        .requests)
}

fn label(t: &Target) -> String {
    match t.threads {
        Some(n) => format!("{} t{n}", t.name),
        None => t.name.clone(),
    }
}

fn cpu(us: Option<f64>) -> String {
    us.map(|u| format!("{u:.1} µs/req"))
        .unwrap_or_else(|| "–".into())
}

/// A gateway child: the bench binary again, serving as `agora proxy` does.
fn serve_gateway() {
    let settings_path = std::env::var("AGORA_LOAD_SETTINGS").expect("AGORA_LOAD_SETTINGS");
    let text = std::fs::read_to_string(&settings_path).expect("settings");
    let settings = Settings::from_toml_str(&text).expect("valid settings");
    // As `agora proxy` runs: a multi-threaded runtime (`#[tokio::main]`'s) holds the
    // store's connections; the gateway runs on its own threads.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let metering = if std::env::var("AGORA_LOAD_METERING").as_deref() == Ok("sink") {
            agora_proxy::Metering::Sink(Arc::new(agora_proxy::usage::LogSink::default()))
        } else {
            agora_proxy::open_metering(&settings)
                .await
                .expect("open metering")
        };
        let config = agora_proxy::ProxyConfig::from_settings(&settings).expect("proxy config");
        let running = tokio::task::spawn_blocking(move || agora_proxy::start(config, metering))
            .await
            .unwrap()
            .expect("start the gateway");
        println!("listening {}", running.addr);
        // Until SIGTERM: the gateway drains and flushes its usage, then returns.
        tokio::task::spawn_blocking(move || running.wait())
            .await
            .unwrap();
    });
}

fn start_gateway(settings: &Path, metering: Metering) -> (Child, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("AGORA_LOAD_ROLE", "gateway")
        .env("AGORA_LOAD_SETTINGS", settings)
        .env(
            "AGORA_LOAD_METERING",
            if metering == Metering::Sink {
                "sink"
            } else {
                "pipeline"
            },
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start a gateway");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("the gateway did not start: {line:?}"))
        .trim()
        .to_owned();
    (child, addr)
}

/// SIGTERM, then waits: gateways flush their usage, nginx's master stops its worker.
fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

fn stop_all(nginxes: &mut [Child], targets: &mut [Target]) {
    for n in nginxes {
        terminate(n);
    }
    for t in targets {
        if let Some(g) = t.gateway.as_mut() {
            if g.child.try_wait().ok().flatten().is_none() {
                terminate(&mut g.child);
            }
        }
    }
}

fn median(runs: &[Run]) -> Run {
    let pick = |f: &dyn Fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    Run {
        rps: pick(&|r| r.rps),
        p50_ms: pick(&|r| r.p50_ms),
        p99_ms: pick(&|r| r.p99_ms),
        errors: runs.iter().map(|r| r.errors).sum(),
        requests: runs.iter().map(|r| r.requests).sum(),
        cpu_us: runs
            .iter()
            .all(|r| r.cpu_us.is_some())
            .then(|| pick(&|r| r.cpu_us.unwrap_or(0.0))),
    }
}

/// User + system clock ticks of `pid` and its live children.
fn cpu_ticks(pid: u32) -> u64 {
    fn own(stat: &str) -> Option<(u32, u64)> {
        // Fields after the command name (which may hold spaces) in parentheses.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ppid = fields.get(1)?.parse().ok()?;
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some((ppid, utime + stime))
    }
    let mut total = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| own(&s))
        .map(|(_, t)| t)
        .unwrap_or(0);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(child) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, ticks)) = std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| own(&s))
            {
                if ppid == pid {
                    total += ticks;
                }
            }
        }
    }
    total
}

fn wrk(target: &mut Target, script: &Path, connections: usize, secs: u64, clock_ticks: f64) -> Run {
    let before: u64 = target.pids.iter().map(|p| cpu_ticks(*p)).sum();
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{secs}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(&target.url)
        .output()
        .expect("run wrk");
    let after: u64 = target.pids.iter().map(|p| cpu_ticks(*p)).sum();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut run = Run::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", n] => run.rps = n.parse().unwrap_or(0.0),
            ["50%", v] => run.p50_ms = millis(v),
            ["99%", v] => run.p99_ms = millis(v),
            ["Non-2xx", "or", "3xx", "responses:", n] => run.errors = n.parse().unwrap_or(0),
            [n, "requests", "in", ..] => run.requests = n.parse().unwrap_or(0),
            _ => {}
        }
    }
    if text.contains("Socket errors") {
        run.errors += 1;
    }
    target.answered += run.requests.saturating_sub(run.errors);
    if !target.pids.is_empty() && run.requests > 0 {
        let cpu_secs = after.saturating_sub(before) as f64 / clock_ticks;
        run.cpu_us = Some(cpu_secs * 1e6 / run.requests as f64);
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

/// nginx: `workers` workers, keep-alive upstream, a header check; returns the
/// master and its port.
fn start_nginx(dir: &Path, upstream_port: u16, workers: usize) -> (Child, u16) {
    std::fs::create_dir_all(dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = dir.display();
    let conf = format!(
        r#"worker_processes {workers};
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
