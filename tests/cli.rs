//! The operator commands: migrate, users create, tokens create, and a control
//! plane started on its own; and strict settings at start-up.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn agora() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agora"));
    for (name, _) in std::env::vars() {
        if name.starts_with("AGORA_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

#[test]
fn operator_commands_work_together() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}?mode=rwc", dir.path().join("ops.db").display());

    let out = agora()
        .args(["migrate", "--database-url", &db])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut create = agora()
        .args([
            "users",
            "create",
            "--database-url",
            &db,
            "--username",
            "ops",
            "--org",
            "Ops Inc",
            "--org-kind",
            "provider",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    create
        .stdin
        .take()
        .unwrap()
        .write_all(b"a-long-password\n")
        .unwrap();
    let out = create.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("organization \"Ops Inc\""));

    let out = agora()
        .args([
            "tokens",
            "create",
            "--database-url",
            &db,
            "--username",
            "ops",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("agt_"), "{token}");

    let out = agora()
        .args([
            "tokens",
            "create",
            "--database-url",
            &db,
            "--username",
            "nobody",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());

    // The control plane alone, on the same database, accepts that token.
    let mut server = agora()
        .args([
            "control-plane",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &db,
        ])
        .env("AGORA_LOG__FILTER", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = server.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("addr=").nth(1) {
                let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("control plane did not report its address");
    let out = Command::new("curl")
        .args([
            "-sf",
            "-H",
            &format!("Authorization: Token {token}"),
            &format!("http://{addr}/api/organizations/"),
        ])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let orgs: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {:?}", out));
    assert_eq!(orgs["count"], 1);
    assert_eq!(orgs["results"][0]["name"], "Ops Inc");
    assert_eq!(orgs["results"][0]["kind"], "provider");
}

#[test]
fn settings_typos_stop_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agora.toml");
    std::fs::write(&file, "[control_plane]\nlisten_address = \"127.0.0.1:1\"\n").unwrap();
    let out = agora()
        .arg("--config")
        .arg(&file)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("listen_address"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = agora()
        .args(["migrate", "--data-dir"])
        .arg(dir.path())
        .env("AGORA_CONTROL_PLANE__MAX_PAGE_SIZ", "5")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_page_siz"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
