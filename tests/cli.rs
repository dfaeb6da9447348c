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

#[cfg(unix)]
#[test]
fn the_data_directory_is_made_private_whatever_its_modes_were() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let old = data.join("proxy-snapshot.json");
    std::fs::write(&old, "{}").unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();

    let out = agora()
        .args(["migrate", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&old), 0o600, "an existing file is fixed");
    let db = data.join("agora.db");
    assert!(db.is_file());
    assert_eq!(mode(&db), 0o600, "a new database is the owner's alone");
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
}

#[test]
fn weak_passwords_and_odd_usernames_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}?mode=rwc", dir.path().join("ops.db").display());
    for (username, password) in [
        ("ops", "12345678"),
        ("ops", "        "),
        ("ops", "Password123"),
        ("ops\u{200b}", "a-long-password"),
        ("o\nps", "a-long-password"),
    ] {
        let mut create = agora()
            .args([
                "users",
                "create",
                "--database-url",
                &db,
                "--username",
                username,
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
            .write_all(format!("{password}\n").as_bytes())
            .unwrap();
        let out = create.wait_with_output().unwrap();
        assert!(
            !out.status.success(),
            "{username:?} / {password:?} was accepted"
        );
    }
}
