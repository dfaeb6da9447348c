//! Several of everything, on loopback: two control-plane replicas on one
//! Postgres, three `agora proxy` processes sharing a private Redis and a
//! private ClickHouse, and a client that sends each request to a gateway picked
//! at random (a balancer). Limits hold across the gateways within 1%; a key
//! revoked through one replica is refused by every gateway within a second;
//! Redis killed and restarted under load behaves as the README says; a gateway
//! killed under load loses no usage beyond its bound while the others keep
//! serving; ClickHouse stopped under load loses nothing.

mod support;

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_config::settings::{UsageSettings, UsageStoreKind};
use agora_testkit::LocalRedis;
use agora_usage::clickhouse::ClickHouseStore;
use agora_usage::local_server::LocalClickHouse;
use agora_usage::{Scope, TimeRange};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::*;
use uuid::Uuid;

struct Gateway {
    child: Child,
    url: String,
    metrics: String,
    data: tempfile::TempDir,
    control_plane: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One cluster at a time: five processes' worth of servers each, on two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Cluster {
    _turn: tokio::sync::MutexGuard<'static, ()>,
    w: World,
    replica: String,
    stop_replica: Option<tokio::sync::oneshot::Sender<()>>,
    redis: LocalRedis,
    redis_prefix: String,
    clickhouse: LocalClickHouse,
    _clickhouse_dir: tempfile::TempDir,
    database: String,
    gateways: Vec<Option<Gateway>>,
}

impl Cluster {
    /// Replica 1 (the world's) feeds gateways 0 and 1, replica 2 feeds gateway 2.
    async fn start() -> Cluster {
        let turn = ONE_AT_A_TIME.lock().await;
        let clickhouse_dir = tempfile::tempdir().unwrap();
        let clickhouse = LocalClickHouse::start(clickhouse_dir.path())
            .unwrap_or_else(|e| panic!("these tests need a ClickHouse server: {e:#}"));
        let database = format!("agora_t_{}", Uuid::new_v4().simple());
        let usage = UsageSettings {
            store: UsageStoreKind::Clickhouse,
            clickhouse_url: Some(clickhouse.url()),
            clickhouse_database: database.clone(),
            ..UsageSettings::default()
        };
        let w = World::start_with(Duration::ZERO, Some(usage)).await;
        // The second replica: the same settings (database, runtime) as the first.
        let mut state = agora_control_plane::AppState::from_settings(&w.settings)
            .await
            .unwrap();
        state.runtime = w.state.runtime.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let replica = format!("http://{}", listener.local_addr().unwrap());
        let (stop_replica, _) = start_cp(state, listener).await;
        let redis = tokio::task::block_in_place(LocalRedis::start);
        let mut cluster = Cluster {
            _turn: turn,
            w,
            replica,
            stop_replica: Some(stop_replica),
            redis,
            redis_prefix: format!("t{}", Uuid::new_v4().simple()),
            clickhouse,
            _clickhouse_dir: clickhouse_dir,
            database,
            gateways: Vec::new(),
        };
        for n in 0..3 {
            let control_plane = if n < 2 {
                cluster.w.cp_url.clone()
            } else {
                cluster.replica.clone()
            };
            let data = tempfile::tempdir().unwrap();
            let gateway = cluster.spawn(control_plane, data);
            cluster.gateways.push(Some(gateway));
        }
        for n in 0..3 {
            cluster
                .wait_for_health(n, |h| h["limits"]["gateways"] == 3)
                .await;
        }
        cluster
    }

    fn spawn(&self, control_plane: String, data: tempfile::TempDir) -> Gateway {
        let (child, url, metrics) = spawn_agora_proxy(
            &control_plane,
            data.path(),
            &[
                ("AGORA_CONTROL_PLANE__PROXY_SECRET", SECRET),
                ("AGORA_RUNTIME__API_KEY", &self.w.runtime_key),
                ("AGORA_USAGE__STORE", "clickhouse"),
                ("AGORA_USAGE__CLICKHOUSE_URL", &self.clickhouse.url()),
                ("AGORA_USAGE__CLICKHOUSE_DATABASE", &self.database),
                ("AGORA_REDIS__URL", &self.redis.url()),
                ("AGORA_REDIS__KEY_PREFIX", &self.redis_prefix),
                ("AGORA_PROXY__GRACE_PERIOD_MS", "10000"),
                ("AGORA_PROXY__TENANT_REQUESTS_PER_SECOND", "1000000"),
                ("AGORA_PROXY__TENANT_BURST", "1000000"),
                ("AGORA_LOG__FILTER", "warn"),
            ],
        );
        Gateway {
            child,
            url,
            metrics,
            data,
            control_plane,
        }
    }

    fn urls(&self) -> Vec<Option<String>> {
        self.gateways
            .iter()
            .map(|g| g.as_ref().map(|g| g.url.clone()))
            .collect()
    }

    fn gateway(&self, n: usize) -> &Gateway {
        self.gateways[n].as_ref().expect("a running gateway")
    }

    async fn health(&self, n: usize) -> Value {
        health_of(&self.w.http, &self.gateway(n).url).await
    }

    async fn wait_for_health(&self, n: usize, ok: impl Fn(&Value) -> bool) -> Value {
        eventually_within(Duration::from_secs(20), "the gateway's health", || async {
            let h = self.health(n).await;
            ok(&h).then_some(h)
        })
        .await
    }

    async fn wait_for_key(&self, key: &str) {
        for n in 0..self.gateways.len() {
            let url = self.gateway(n).url.clone();
            eventually_within(
                Duration::from_secs(20),
                "every gateway knows the key",
                || async {
                    let r = self
                        .w
                        .http
                        .get(format!("{url}/api/agent-gateway/validate/"))
                        .bearer_auth(key)
                        .send()
                        .await
                        .ok()?;
                    (r.status() == StatusCode::OK).then_some(())
                },
            )
            .await;
        }
    }

    /// A subscription on a plan of `requests_per_minute`, known to every gateway.
    async fn subscription(&self, name: &str, requests_per_minute: u64) -> (Uuid, String) {
        let (config, key) = self
            .w
            .subscription(
                "Document Summarizer",
                json!({"name": name, "price_cents": 0, "requests_per_minute": requests_per_minute, "burst": requests_per_minute}),
                json!({"name": name}),
            )
            .await;
        self.wait_for_key(&key).await;
        (config, key)
    }

    fn signal(&self, n: usize, name: &str) {
        let status = Command::new("kill")
            .args([name, &self.gateway(n).child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM to every gateway, and waits for each to flush and exit.
    async fn stop_gateways(&mut self) {
        for n in 0..self.gateways.len() {
            if let Some(g) = self.gateways[n].as_mut() {
                if let Some(status) = g.child.try_wait().unwrap() {
                    panic!("gateway {n} exited on its own: {status}");
                }
                self.signal(n, "-TERM");
            }
        }
        for gateway in &mut self.gateways {
            if let Some(g) = gateway {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match g.child.try_wait().unwrap() {
                        Some(status) => {
                            assert!(status.success(), "a gateway's exit after SIGTERM: {status}");
                            break;
                        }
                        None => assert!(Instant::now() < deadline, "a gateway did not exit"),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            *gateway = None;
        }
    }

    async fn stored(&self, config: Uuid) -> agora_usage::Aggregate {
        let store = ClickHouseStore::new(&self.clickhouse.url(), &self.database, None, None);
        let range = TimeRange {
            from_ms: 0,
            to_ms: i64::MAX / 2,
        };
        agora_usage::totals(&store, Scope::Config(config), range)
            .await
            .unwrap_or_else(|e| panic!("reading usage from ClickHouse: {e:#}"))
    }

    async fn finish(mut self) {
        self.stop_gateways().await;
        if let Some(stop) = self.stop_replica.take() {
            let _ = stop.send(());
        }
        self.w.finish().await;
    }
}

/// One answer seen by the balanced client.
#[derive(Clone, Copy, Debug)]
struct Answer {
    gateway: usize,
    status: u16,
    at: Instant,
}

/// Load from a balanced client: its answers so far, and how to stop it.
struct Load {
    answers: Arc<std::sync::Mutex<Vec<Answer>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn seen(&self) -> Vec<Answer> {
        self.answers.lock().unwrap().clone()
    }

    /// Runs until every gateway in `gateways` has answered `status` (at most `limit`).
    async fn until_each_answered(&self, gateways: &[usize], status: u16, limit: Duration) {
        eventually_within(limit, "every gateway answers so", || async {
            let seen = self.seen();
            gateways
                .iter()
                .all(|n| seen.iter().any(|a| a.gateway == *n && a.status == status))
                .then_some(())
        })
        .await;
    }

    async fn finish(self) -> Vec<Answer> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let answers = self.answers.lock().unwrap().clone();
        answers
    }
}

/// `workers` clients sending invokes with `key`, each to a gateway picked at
/// random among those in `urls`. A gateway that refuses the connection is
/// taken out of the rotation, as a balancer would.
fn balanced(http: &reqwest::Client, urls: Vec<Option<String>>, key: &str, workers: usize) -> Load {
    let answers: Arc<std::sync::Mutex<Vec<Answer>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = (0..workers)
        .map(|w| {
            let (http, mut urls, key, stop, answers) = (
                http.clone(),
                urls.clone(),
                key.to_owned(),
                stop.clone(),
                answers.clone(),
            );
            tokio::spawn(async move {
                let mut x = 0x2545_f491_4f6c_dd1du64 ^ (w as u64 + 1);
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let live: Vec<usize> = (0..urls.len()).filter(|n| urls[*n].is_some()).collect();
                    if live.is_empty() {
                        break;
                    }
                    let gateway = live[(x % live.len() as u64) as usize];
                    let url = urls[gateway].clone().unwrap();
                    let sent = http
                        .post(format!("{url}/api/agent-gateway/invoke/"))
                        .bearer_auth(&key)
                        .json(&json!({"input_value": format!("worker {w}")}))
                        .send()
                        .await;
                    match sent {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            if r.bytes().await.is_ok() {
                                answers.lock().unwrap().push(Answer {
                                    gateway,
                                    status,
                                    at: Instant::now(),
                                });
                            }
                        }
                        // Down: out of the rotation.
                        Err(e) if e.is_connect() => urls[gateway] = None,
                        Err(_) => {}
                    }
                }
            })
        })
        .collect();
    Load {
        answers,
        stop,
        tasks,
    }
}

fn statuses(answers: &[Answer]) -> std::collections::BTreeMap<(usize, u16), usize> {
    let mut by = std::collections::BTreeMap::new();
    for a in answers {
        *by.entry((a.gateway, a.status)).or_insert(0) += 1;
    }
    by
}

fn count(answers: &[Answer], status: u16) -> u64 {
    answers.iter().filter(|a| a.status == status).count() as u64
}

/// Waits, if need be, so that the next `run` falls in one minute window.
async fn inside_one_minute(run: Duration) {
    let now = agora_proxy::sync::now_ms();
    let left = 60_000 - now.rem_euclid(60_000);
    if left < run.as_millis() as i64 + 3_000 {
        tokio::time::sleep(Duration::from_millis(left as u64 + 100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_behind_a_random_balancer_hold_a_key_limit_within_one_percent() {
    let mut c = Cluster::start().await;
    let (config, key) = c.subscription("Shared", 300).await;
    inside_one_minute(Duration::from_secs(20)).await;
    let load = balanced(&c.w.http, c.urls(), &key, 12);
    // Until the window is used up on every gateway, and a little more.
    load.until_each_answered(&[0, 1, 2], 429, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answers = load.finish().await;
    let (ok, limited) = (count(&answers, 200), count(&answers, 429));
    eprintln!(
        "3 gateways, 300/min key: {ok} admitted, {limited} refused of {} ({:.3} of the limit)",
        answers.len(),
        ok as f64 / 300.0
    );
    assert_eq!(
        ok + limited,
        answers.len() as u64,
        "only 200 and 429: {:?}",
        statuses(&answers)
    );
    assert!(ok <= 300, "never more than the limit: {ok}");
    assert!(ok >= 297, "within 1% of the limit: {ok}");
    for n in 0..3 {
        assert!(
            answers.iter().any(|a| a.gateway == n && a.status == 200),
            "gateway {n} admitted some"
        );
    }
    c.stop_gateways().await;
    let stored = c.stored(config).await;
    assert_eq!(
        stored.billable_requests, ok,
        "each admitted request is billed once"
    );
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_through_one_replica_is_refused_by_every_gateway_within_a_second() {
    let c = Cluster::start().await;
    let (config, key) = c.subscription("Revoked", 1_000_000).await;
    let (s, keys) =
        c.w.cp(
            reqwest::Method::GET,
            &c.w.info.buyer_token,
            &format!("/api/customer-agent-configs/{config}/api_keys/"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let key_id = keys.as_array().unwrap()[0]["uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    // Through replica 2, which feeds only gateway 2.
    let started = Instant::now();
    let r =
        c.w.http
            .post(format!("{}/api/agent-api-keys/{key_id}/revoke/", c.replica))
            .header("authorization", format!("Token {}", c.w.info.buyer_token))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for n in 0..3 {
        let url = c.gateway(n).url.clone();
        eventually_within(Duration::from_secs(5), "the revocation arrives", || async {
            let r =
                c.w.http
                    .get(format!("{url}/api/agent-gateway/validate/"))
                    .bearer_auth(&key)
                    .send()
                    .await
                    .ok()?;
            (r.status() == StatusCode::UNAUTHORIZED).then_some(())
        })
        .await;
        let after = started.elapsed();
        eprintln!(
            "gateway {n} (fed by {}) refuses the revoked key after {after:?}",
            if c.gateway(n).control_plane == c.replica {
                "replica 2"
            } else {
                "replica 1"
            }
        );
        assert!(after < Duration::from_secs(1), "gateway {n} took {after:?}");
    }
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_turns_gateways_to_their_shares_and_back() {
    let mut c = Cluster::start().await;
    let (_, steady) = c.subscription("Steady", 1_000_000).await;
    let (_, shared) = c.subscription("Share", 300).await;
    inside_one_minute(Duration::from_secs(25)).await;
    let load = balanced(&c.w.http, c.urls(), &steady, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;

    tokio::task::block_in_place(|| c.redis.kill());
    for n in 0..3 {
        let h = c
            .wait_for_health(n, |h| h["limits"]["mode"] == "local_share")
            .await;
        assert_eq!(h["limits"]["gateways"], 3, "N from the last heartbeat: {h}");
        assert_eq!(h["status"], "ok", "the gateway serves on: {h}");
        let metrics =
            c.w.http
                .get(&c.gateway(n).metrics)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
        assert!(
            metrics.contains("agora_proxy_global_limits_degraded 1"),
            "gateway {n}: {}",
            metrics
                .lines()
                .filter(|l| l.contains("global"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // Each gateway holds ceil(300 / 3) = 100 of the 300 per minute.
    let burst = balanced(&c.w.http, c.urls(), &shared, 6);
    burst
        .until_each_answered(&[0, 1, 2], 429, Duration::from_secs(20))
        .await;
    let answers = burst.finish().await;
    for n in 0..3 {
        let admitted = answers
            .iter()
            .filter(|a| a.gateway == n && a.status == 200)
            .count();
        assert_eq!(admitted, 100, "gateway {n} admits its share");
    }

    let resumed = Instant::now();
    tokio::task::block_in_place(|| c.redis.resume());
    for n in 0..3 {
        c.wait_for_health(n, |h| h["limits"]["mode"] == "global")
            .await;
    }
    let recovered = resumed.elapsed();
    eprintln!("all three gateways back on Redis {recovered:?} after it returned");
    assert!(recovered < Duration::from_secs(2), "{recovered:?}");
    // The shares were added to the (new, empty) Redis count: the window is used up.
    let r =
        c.w.http
            .post(format!("{}/api/agent-gateway/invoke/", c.gateway(1).url))
            .bearer_auth(&shared)
            .json(&json!({"input_value": "after"}))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);

    let steady_answers = load.finish().await;
    assert!(steady_answers.len() > 100, "the load ran");
    assert_eq!(
        count(&steady_answers, 200),
        steady_answers.len() as u64,
        "every request under the outage was answered 200"
    );
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_under_load_loses_no_usage_beyond_its_bound_and_the_others_serve_on() {
    let mut c = Cluster::start().await;
    let (config, key) = c.subscription("Killed", 1_000_000).await;
    let load = balanced(&c.w.http, c.urls(), &key, 6);
    load.until_each_answered(&[0, 1, 2], 200, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.signal(1, "-KILL");
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answers = load.finish().await;
    assert_eq!(
        count(&answers, 200),
        answers.len() as u64,
        "only 200s: {:?}",
        statuses(&answers)
    );
    for n in [0, 2] {
        assert!(
            answers
                .iter()
                .any(|a| a.gateway == n && a.at > killed_at + Duration::from_millis(200)),
            "gateway {n} serves on after the kill"
        );
    }
    // The documented bound: what gateway 1 answered more than usage.batch_max_ms
    // (50 ms) before the kill is in its spill log. A gateway started again on
    // its data directory ships it.
    let bound = answers
        .iter()
        .filter(|a| a.gateway == 1 && a.at + Duration::from_millis(50) > killed_at)
        .count() as u64;
    let mut old = c.gateways[1].take().unwrap();
    let data = std::mem::replace(&mut old.data, tempfile::tempdir().unwrap());
    drop(old);
    c.gateways[1] = Some(c.spawn(c.w.cp_url.clone(), data));
    c.stop_gateways().await;
    let stored = c.stored(config).await;
    let answered = answers.len() as u64;
    eprintln!(
        "answered {answered}, stored {}, at most {bound} in the bound",
        stored.requests
    );
    assert!(
        stored.requests + bound >= answered,
        "lost beyond the bound: stored {}, answered {answered}, bound {bound}",
        stored.requests
    );
    assert!(
        stored.requests <= answered + 6,
        "at most the requests in flight at the kill are extra"
    );
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_stopped_under_load_behind_three_gateways_loses_nothing() {
    let mut c = Cluster::start().await;
    let (config, key) = c.subscription("Outage", 1_000_000).await;
    let load = balanced(&c.w.http, c.urls(), &key, 6);
    load.until_each_answered(&[0, 1, 2], 200, Duration::from_secs(10))
        .await;
    tokio::task::block_in_place(|| c.clickhouse.stop());
    for n in 0..3 {
        c.wait_for_health(n, |h| h["usage"]["store"]["status"] == "failing")
            .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| c.clickhouse.resume()).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answers = load.finish().await;
    assert_eq!(
        count(&answers, 200),
        answers.len() as u64,
        "only 200s: {:?}",
        statuses(&answers)
    );
    c.stop_gateways().await;
    let stored = c.stored(config).await;
    assert_eq!(
        stored.requests,
        answers.len() as u64,
        "every answered request stored once"
    );
    c.finish().await;
}
