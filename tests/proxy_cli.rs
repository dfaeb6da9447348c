//! `agora proxy` as a process: it starts without a control plane (and says it has
//! no configuration: alive, not ready), serves health and metrics, and stops on
//! SIGTERM.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::spawn_agora_proxy;

#[test]
fn agora_proxy_runs_without_a_control_plane_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, proxy, metrics) = spawn_agora_proxy("http://127.0.0.1:1", dir.path(), &[]);
    let get = |path: &str| {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}"])
            .arg(format!("{proxy}{path}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        (code.to_owned(), body)
    };
    let (code, body) = get("/api/agent-gateway/health/");
    assert_eq!(code, "503", "{body}");
    assert_eq!(body["status"], "no_snapshot");
    assert_eq!(
        body["limits"]["mode"], "local",
        "no Redis: limits per gateway"
    );
    // For orchestrators: alive, and not ready until a snapshot is applied.
    let (code, body) = get("/api/agent-gateway/health/live/");
    assert_eq!((code.as_str(), &body["status"]), ("200", &"alive".into()));
    let (code, body) = get("/api/agent-gateway/health/ready/");
    assert_eq!(code, "503", "{body}");
    assert_eq!(
        body,
        serde_json::json!({"ready": false, "reason": "no_snapshot"})
    );
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
