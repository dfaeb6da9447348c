//! `agora proxy` as a process: it starts without a control plane (and says it has
//! no configuration), serves health and metrics, and stops on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[test]
fn agora_proxy_runs_without_a_control_plane_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agora"));
    cmd.args([
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--control-plane-url",
        "http://127.0.0.1:1",
        "--data-dir",
    ])
    .arg(dir.path())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    for (name, _) in std::env::vars() {
        if name.starts_with("AGORA_") {
            cmd.env_remove(name);
        }
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut proxy = None;
    let mut metrics = None;
    while proxy.is_none() || metrics.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("agora proxy prints its addresses");
        if let Some(url) = line.strip_prefix("proxy listening on ") {
            proxy = Some(url.to_owned());
        }
        if let Some(url) = line.strip_prefix("metrics on ") {
            metrics = Some(url.to_owned());
        }
    }
    let (proxy, metrics) = (proxy.unwrap(), metrics.unwrap());
    let health = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .arg(format!("{proxy}/api/agent-gateway/health/"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&health.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap();
    assert_eq!(code, "503", "{text}");
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["status"], "no_snapshot");
    let scraped = Command::new("curl")
        .args(["-sf", &metrics])
        .output()
        .unwrap();
    let scraped = String::from_utf8_lossy(&scraped.stdout);
    assert!(
        scraped.contains("agora_proxy_snapshot_loaded 0"),
        "{scraped}"
    );

    let started = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "agora proxy did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
