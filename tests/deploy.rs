//! What `deploy/` ships, checked the ways this machine can without a Docker
//! engine or a cluster: the compose file resolves (`docker-compose config`) and
//! every Agora service's settings load; the Kubernetes manifests validate
//! against Kubernetes' schemas (`kubernetes-validate --strict`) and their
//! settings and probes are ones Agora has; Prometheus' config and rules pass
//! `promtool check` and `promtool test rules`; and every metric the rules and
//! the dashboard name is one the gateway or the control plane exports.
//!
//! The tools come from `scripts/test.sh` (Debian's `prometheus` and
//! `docker-compose`, PyPI's `kubernetes-validate`); a missing one fails the
//! test and says which.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use agora_config::settings::{Overrides, Settings};
use reqwest::StatusCode;
use serde_json::json;
use support::*;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Runs a tool, failing the test with its output (or how to get it).
fn run(program: &str, args: &[&str], dir: &Path, env: &[(&str, &str)]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("{program} could not run ({e}); scripts/test.sh installs it"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?}: {text}");
    text
}

fn settings_from(env: &BTreeMap<String, String>, file: Option<&Path>) -> Settings {
    Settings::load(
        file,
        env.iter().map(|(k, v)| (k.clone(), v.clone())),
        &Overrides::default(),
    )
    .unwrap_or_else(|e| panic!("settings {env:?}: {e}"))
}

const COMPOSE_ENV: [(&str, &str); 6] = [
    ("POSTGRES_PASSWORD", "pg-secret"),
    ("CLICKHOUSE_PASSWORD", "ch-secret"),
    (
        "AGORA_PROXY_SECRET",
        "proxy-secret-proxy-secret-proxy-secret",
    ),
    (
        "AGORA_KEY_ENCRYPTION_KEY",
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    ),
    ("AGORA_RUNTIME_URL", "http://langflow:7860"),
    ("AGORA_RUNTIME_API_KEY", "sk-test"),
];

#[test]
fn the_compose_file_resolves_and_every_agora_service_has_settings_that_load() {
    let resolved = run(
        "docker-compose",
        &["-f", "compose.yaml", "config"],
        &deploy(),
        &COMPOSE_ENV,
    );
    let doc: serde_yaml::Value = serde_yaml::from_str(&resolved).unwrap();
    let services = doc["services"].as_mapping().unwrap();
    let names: BTreeSet<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for wanted in [
        "postgres",
        "clickhouse",
        "redis",
        "migrate",
        "control-plane-1",
        "control-plane-2",
        "gateway-1",
        "gateway-2",
        "prometheus",
        "grafana",
    ] {
        assert!(names.contains(wanted), "{wanted} in {names:?}");
    }
    let mut agora = 0;
    for (name, service) in services {
        let name = name.as_str().unwrap();
        if service["image"].as_str() != Some("agora:local") {
            continue;
        }
        agora += 1;
        let env: BTreeMap<String, String> = service["environment"]
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_yaml::Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
                };
                (k.as_str().unwrap().to_owned(), v)
            })
            .collect();
        let settings = settings_from(&env, None);
        assert!(
            settings.redis.url.is_some(),
            "{name}: limits shared through Redis"
        );
        assert_eq!(
            settings.usage.store,
            agora_config::settings::UsageStoreKind::Clickhouse,
            "{name}"
        );
        let command: Vec<&str> = service["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|c| c.as_str())
            .collect();
        if name.starts_with("gateway") {
            assert_eq!(command[0], "proxy", "{name}");
            assert_eq!(settings.proxy.admin_listen, "0.0.0.0:9464", "{name}");
            let test = format!("{:?}", service["healthcheck"]["test"]);
            assert!(test.contains(agora_proxy::gateway::READY), "{name}: {test}");
        }
        if name.starts_with("control-plane") {
            assert_eq!(command[0], "control-plane", "{name}");
            let test = format!("{:?}", service["healthcheck"]["test"]);
            assert!(test.contains("/health/ready/"), "{name}: {test}");
        }
    }
    assert_eq!(agora, 5, "migrate, two control planes, two gateways");
    // A secret left unset is refused, not run with an empty value.
    let out = Command::new("docker-compose")
        .args(["-f", "compose.yaml", "config", "-q"])
        .current_dir(deploy())
        .envs(
            COMPOSE_ENV
                .iter()
                .copied()
                .filter(|(k, _)| *k != "AGORA_PROXY_SECRET"),
        )
        .env_remove("AGORA_PROXY_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("set AGORA_PROXY_SECRET"));
}

#[test]
fn the_kubernetes_manifests_validate_and_name_settings_and_probes_agora_has() {
    let validator =
        std::env::var("AGORA_KUBERNETES_VALIDATE").unwrap_or_else(|_| "kubernetes-validate".into());
    let manifests = deploy().join("kubernetes/agora.yaml");
    let out = run(
        &validator,
        &["--strict", manifests.to_str().unwrap()],
        &deploy(),
        &[],
    );
    assert!(!out.contains("ERROR"), "{out}");
    let text = std::fs::read_to_string(&manifests).unwrap();
    let docs: Vec<serde_yaml::Value> = text
        .split("\n---\n")
        .map(|doc| serde_yaml::from_str(doc).unwrap())
        .collect();
    let kind = |k: &str| docs.iter().filter(|d| d["kind"] == k).collect::<Vec<_>>();
    for wanted in [
        "Namespace",
        "Secret",
        "ConfigMap",
        "Job",
        "Deployment",
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
    ] {
        assert!(!kind(wanted).is_empty(), "a {wanted}");
    }
    // The settings file and the Secret's variables together load.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("settings.toml");
    std::fs::write(
        &file,
        kind("ConfigMap")[0]["data"]["settings.toml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let mut env: BTreeMap<String, String> = kind("Secret")[0]["stringData"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                v.as_str().unwrap().to_owned(),
            )
        })
        .collect();
    env.insert(
        "AGORA_CONTROL_PLANE__KEY_ENCRYPTION_KEY".into(),
        COMPOSE_ENV[3].1.into(),
    );
    let settings = settings_from(&env, Some(&file));
    assert!(settings.redis.url.is_some());
    // Probes ask what the gateway and the control plane answer.
    let probes = |workload: &serde_yaml::Value| {
        let c = &workload["spec"]["template"]["spec"]["containers"][0];
        (
            c["livenessProbe"]["httpGet"]["path"]
                .as_str()
                .unwrap()
                .to_owned(),
            c["readinessProbe"]["httpGet"]["path"]
                .as_str()
                .unwrap()
                .to_owned(),
            c["resources"]["requests"].is_mapping(),
        )
    };
    assert_eq!(
        probes(kind("StatefulSet")[0]),
        (
            agora_proxy::gateway::LIVE.to_owned(),
            agora_proxy::gateway::READY.to_owned(),
            true
        )
    );
    assert_eq!(
        probes(kind("Deployment")[0]),
        (
            "/health/live/".to_owned(),
            "/health/ready/".to_owned(),
            true
        )
    );
}

#[test]
fn prometheus_config_and_rules_pass_promtool_and_their_unit_tests() {
    let dir = deploy().join("prometheus");
    run(
        "promtool",
        &["check", "config", "prometheus.yml"],
        &dir,
        &[],
    );
    run("promtool", &["check", "rules", "rules.yml"], &dir, &[]);
    let out = run("promtool", &["test", "rules", "rules.test.yml"], &dir, &[]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Every `agora_…` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("agora_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// The series names an exposition holds (and its `# TYPE` lines declare).
fn exported(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|line| match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if !line.starts_with('#') => line.split(['{', ' ']).next(),
            None => None,
        })
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_the_dashboard_name_is_exported() {
    let w = World::start_billed(
        None,
        Billed {
            grace_secs: 60,
            report_window_secs: 1,
            report_every_ms: 200,
        },
    )
    .await;
    // Counters with labels appear once counted: a refused key, a rate limit,
    // a runtime failure and a refused webhook.
    let refused = w
        .invoke("ar_sk_live_nope", json!({"input_value": "x"}))
        .await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let (_, key) = w
        .subscription(
            "Document Summarizer",
            json!({"name": "One", "price_cents": 0, "requests_per_minute": 1, "burst": 1}),
            json!({"name": "one"}),
        )
        .await;
    assert_eq!(
        w.invoke(&key, json!({"input_value": "a"})).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        w.invoke(&key, json!({"input_value": "b"})).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    w.runtime_task.abort();
    let _ = w.invoke(&w.info.api_key, json!({"input_value": "c"})).await;
    let webhook = w
        .http
        .post(format!("{}/api/stripe/webhook/", w.cp_url))
        .header("stripe-signature", "t=1,v1=00")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert!(webhook.status().is_client_error());
    let gateway = w.metrics().await;
    let control_plane = w
        .http
        .get(format!("{}/metrics", w.cp_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut exports = exported(&gateway);
    exports.extend(exported(&control_plane));
    assert!(
        exports.contains("agora_proxy_global_limits_degraded"),
        "{exports:?}"
    );

    let rules = std::fs::read_to_string(deploy().join("prometheus/rules.yml")).unwrap();
    let dashboard =
        std::fs::read_to_string(deploy().join("grafana/dashboards/agora.json")).unwrap();
    let named: BTreeSet<String> = metric_names(&rules)
        .into_iter()
        .chain(metric_names(&dashboard))
        .collect();
    assert!(named.len() >= 20, "{named:?}");
    let missing: Vec<_> = named.difference(&exports).collect();
    assert!(missing.is_empty(), "named but not exported: {missing:?}");
    // The dashboard is one Grafana reads: panels with Prometheus targets.
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(dashboard["panels"].as_array().unwrap().len() >= 12);
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_answers_liveness_and_readiness() {
    let mut w = World::start(Duration::ZERO).await;
    let get = |path: &'static str| {
        let (http, url) = (w.http.clone(), w.cp_url.clone());
        async move {
            let r = http.get(format!("{url}{path}")).send().await.unwrap();
            (r.status(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    assert_eq!(
        get("/health/live/").await,
        (StatusCode::OK, json!({"status": "alive"}))
    );
    assert_eq!(
        get("/health/ready/").await,
        (StatusCode::OK, json!({"ready": true, "reason": null}))
    );
    // The database gone: not ready, still alive.
    w.state.db.pool.close().await;
    let (status, body) = get("/health/ready/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["reason"], "database_unreachable");
    assert_eq!(get("/health/live/").await.0, StatusCode::OK);
    w.stop_proxy().await;
    w.finish().await;
}
