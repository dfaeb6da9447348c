//! End to end: `agora up` on a fresh data directory seeds the demo, prints a
//! curl that works, stops cleanly on SIGTERM, and keeps its data when re-run.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

struct Up {
    child: Child,
    lines: Vec<String>,
}

/// Starts `agora up` and reads its output until it says it is ready.
fn start(data_dir: &Path) -> Up {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agora"));
    cmd.args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (name, _) in std::env::vars() {
        if name.starts_with("AGORA_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("AGORA_PROXY__LISTEN", "127.0.0.1:0")
        .env("AGORA_PROXY__ADMIN_LISTEN", "127.0.0.1:0");
    let mut child = cmd.spawn().expect("run agora up");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => {
                let ready = line.contains("Press Ctrl-C");
                lines.push(line);
                if ready {
                    break;
                }
            }
            Err(e) => {
                let _ = child.kill();
                panic!("agora up did not become ready ({e}); output so far: {lines:#?}");
            }
        }
    }
    Up { child, lines }
}

fn stop(mut up: Up) {
    let status = Command::new("kill")
        .args(["-TERM", &up.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    for _ in 0..600 {
        if let Some(status) = up.child.try_wait().unwrap() {
            assert!(status.success(), "agora up exited with {status}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = up.child.kill();
    panic!("agora up did not stop within 30 s of SIGTERM");
}

/// Runs a flow on the demo runtime named in demo.json; returns the answer text.
fn run_flow(info: &serde_json::Value, flow_id: &str, text: &str) -> String {
    let out = Command::new("curl")
        .args([
            "-sf",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-H",
        ])
        .arg(format!(
            "x-api-key: {}",
            info["runtime_api_key"].as_str().unwrap()
        ))
        .arg("-d")
        .arg(
            serde_json::json!({"input_value": text, "input_type": "chat", "output_type": "chat"})
                .to_string(),
        )
        .arg(format!(
            "{}/api/v1/run/{flow_id}",
            info["runtime_url"].as_str().unwrap()
        ))
        .output()
        .unwrap();
    let body: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    body["outputs"][0]["outputs"][0]["results"]["message"]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no answer in {body}"))
        .to_owned()
}

/// GET `path` on the control plane as the demo user whose token is `token_field`.
fn get(info: &serde_json::Value, token_field: &str, path: &str) -> serde_json::Value {
    let token = info[token_field].as_str().unwrap();
    let url = format!("{}{path}", info["control_plane_url"].as_str().unwrap());
    let out = Command::new("curl")
        .args(["-sf", "-H", &format!("Authorization: Token {token}"), &url])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{path}: {e}: {out:?}"))
}

fn demo(data_dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(data_dir.join("demo.json")).unwrap()).unwrap()
}

#[test]
fn up_seeds_serves_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");

    let up = start(&data_dir);
    let info = demo(&data_dir);
    for field in [
        "control_plane_url",
        "buyer_token",
        "provider_token",
        "api_key",
        "proxy_url",
        "metrics_url",
        "runtime_secret",
    ] {
        assert!(
            info[field].as_str().is_some_and(|v| !v.is_empty()),
            "demo.json lacks {field}: {info}"
        );
    }
    assert!(info["api_key"].as_str().unwrap().starts_with("ar_sk_live_"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data_dir.join("demo.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "demo.json holds credentials and must be private"
        );
        let mode = std::fs::metadata(&data_dir).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the data dir holds the database and must be private"
        );
    }

    // The printed curls work as printed, on the one base URL.
    assert_eq!(info["base_url"], info["proxy_url"]);
    let printed = |what: &str| {
        up.lines
            .iter()
            .find(|l| l.trim_start().starts_with("curl ") && l.contains(what))
            .unwrap_or_else(|| panic!("no curl for {what} printed: {:#?}", up.lines))
            .trim()
            .to_owned()
    };
    let curl = printed("/api/marketplace-public-offerings/");
    assert!(curl.contains(info["base_url"].as_str().unwrap()), "{curl}");
    let out = Command::new("bash").args(["-c", &curl]).output().unwrap();
    let offerings: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(offerings["count"], 4, "{offerings}");
    let curl = printed("/api/agent-gateway/invoke/");
    let out = Command::new("bash").args(["-c", &curl]).output().unwrap();
    assert!(
        out.status.success(),
        "{curl}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(curl.contains(info["proxy_url"].as_str().unwrap()), "{curl}");
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let text = answer["outputs"][0]["outputs"][0]["results"]["message"]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no answer text through the proxy: {answer}"));
    assert!(!text.is_empty());
    // The proxy counted it.
    let out = Command::new("curl")
        .args(["-sf", info["metrics_url"].as_str().unwrap()])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(
        metrics.contains(r#"agora_proxy_requests_total{route="invoke",status="200"} 1"#),
        "{metrics}"
    );
    // The widget demo page, on its own origin, embeds the demo config's widget
    // from the gateway under a CSP that allows only the gateway.
    let page_url = info["widget_demo_url"].as_str().expect("widget_demo_url");
    assert_ne!(
        page_url.trim_end_matches('/'),
        info["proxy_url"].as_str().unwrap()
    );
    let out = Command::new("curl")
        .args(["-si", page_url])
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&out.stdout).into_owned();
    let loader = format!("{}/widget/loader.js", info["proxy_url"].as_str().unwrap());
    assert!(
        page.contains(&format!(
            "script-src {}",
            info["proxy_url"].as_str().unwrap()
        )),
        "{page}"
    );
    assert!(
        page.contains(&format!("src=\"{loader}\" data-key=\"ar_pk_live_")),
        "{page}"
    );
    // And the gateway lets that origin open a visitor session.
    let key = page
        .split("data-key=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
        .arg(format!("origin: {}", page_url.trim_end_matches('/')))
        .args(["-H", "content-type: application/json", "-d"])
        .arg(serde_json::json!({"key": key}).to_string())
        .arg(format!(
            "{}/api/agent-gateway/widget/session/",
            info["proxy_url"].as_str().unwrap()
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    // The runtime reports usage with demo.json's secret; a wrong one is refused.
    for (secret, status) in [
        (info["runtime_secret"].as_str().unwrap(), "202"),
        ("wrong-secret-0123456789", "401"),
    ] {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Content-Type: application/json"])
            .args(["-H", &format!("X-Runtime-Secret: {secret}"), "-d"])
            .arg(serde_json::json!({"config_uuid": info["config_uuid"], "input_tokens": 0, "output_tokens": 0}).to_string())
            .arg(format!("{}/api/agent-gateway/usage/", info["proxy_url"].as_str().unwrap()))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), status);
    }
    // The buyer's config, from the control plane.
    let configs = get(&info, "buyer_token", "/api/customer-agent-configs/");
    assert_eq!(configs["count"], 1, "{configs}");
    assert_eq!(configs["results"][0]["uuid"], info["config_uuid"]);
    // The call is metered into the embedded usage store, and the buyer reads it.
    let usage_path = format!(
        "/api/customer-agent-configs/{}/usage/",
        info["config_uuid"].as_str().unwrap()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let usage = get(&info, "buyer_token", &usage_path);
        if usage["totals"]["requests"] == 1 {
            assert!(
                usage["totals"]["output_tokens"].as_u64().unwrap() > 0,
                "{usage}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the call was never metered: {usage}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The marketplace holds the four sample agents, each with a free and a paid plan.
    let offerings = get(&info, "buyer_token", "/api/marketplace-public-offerings/");
    assert_eq!(offerings["count"], 4, "{offerings}");
    for o in offerings["results"].as_array().unwrap() {
        let prices: Vec<i64> = o["plans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["price_cents"].as_i64().unwrap())
            .collect();
        assert!(prices.contains(&0) && prices.iter().any(|p| *p > 0), "{o}");
    }
    // The sample agents are provisioned to the built-in demo runtime and run there.
    let listed = get(&info, "provider_token", "/api/provider-agents/");
    let flow_ids: Vec<String> = listed["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a["runtime_flow_id"]
                .as_str()
                .unwrap_or_else(|| panic!("not provisioned: {a}"))
                .to_owned()
        })
        .collect();
    assert_eq!(flow_ids.len(), 4);
    let echo = listed["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "FAQ Echo")
        .unwrap()["runtime_flow_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(run_flow(&info, &echo, "where is my parcel?").contains("where is my parcel?"));

    // Local test payments: the printed commands buy the Pro plan, paid on the
    // stand-in's checkout page with Stripe's test card.
    assert!(
        up.lines.iter().any(|l| l.contains("LOCAL TEST PAYMENTS")),
        "{:#?}",
        up.lines
    );
    let config = get(&info, "buyer_token", "/api/stripe/config/");
    assert_eq!(config["mode"], "local", "{config}");
    let run = |curl: &str| -> serde_json::Value {
        let out = Command::new("bash").args(["-c", curl]).output().unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {curl}: {}", String::from_utf8_lossy(&out.stdout)))
    };
    let order = run(&printed("\"offering\""));
    assert_eq!(order["state"], "pending_payment", "{order}");
    let order_uuid = order["uuid"].as_str().unwrap();
    let session = run(&printed("/api/stripe/checkout/").replace("<order uuid>", order_uuid));
    let pay_url = session["url"]
        .as_str()
        .unwrap_or_else(|| panic!("{session}"));
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-d",
            "card_number=4242424242424242",
            pay_url,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "303");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let order = get(
            &info,
            "buyer_token",
            &format!("/api/marketplace-orders/{order_uuid}/"),
        );
        if order["state"] == "done" {
            assert!(order["config"].is_string(), "{order}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the paid order never completed: {order}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop(up);

    // A second run keeps the data: same config, same key, no second seeding.
    let up = start(&data_dir);
    let again = demo(&data_dir);
    assert_eq!(again["config_uuid"], info["config_uuid"]);
    assert_eq!(again["api_key"], info["api_key"]);
    assert_eq!(again["buyer_token"], info["buyer_token"]);
    assert_eq!(again["runtime_secret"], info["runtime_secret"]);
    let agents = get(&again, "provider_token", "/api/provider-agents/");
    assert_eq!(agents["count"], 4, "{agents}");
    // The restarted demo runtime (a new process) still knows the flows
    // published before.
    assert!(run_flow(&again, &echo, "still there?").contains("still there?"));
    stop(up);

    // Losing demo.json loses no data: the next run issues new credentials
    // for the same demo, and they work.
    std::fs::remove_file(data_dir.join("demo.json")).unwrap();
    let up = start(&data_dir);
    let recovered = demo(&data_dir);
    assert_eq!(recovered["config_uuid"], info["config_uuid"]);
    assert_ne!(recovered["buyer_password"], info["buyer_password"]);
    let out = Command::new("curl")
        .args(["-sf", "-X", "POST", "-H", "Content-Type: application/json", "-d"])
        .arg(serde_json::json!({"username": recovered["buyer_username"], "password": recovered["buyer_password"]}).to_string())
        .arg(format!("{}/api/auth/token/", recovered["control_plane_url"].as_str().unwrap()))
        .output()
        .unwrap();
    let login: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert!(
        login["token"]
            .as_str()
            .is_some_and(|t| t.starts_with("agt_")),
        "{login}"
    );
    stop(up);
}
