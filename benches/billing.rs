//! Billing against the local Stripe (`agora-stripe-local`), with the control
//! plane as `agora up` runs it: embedded SQLite and the embedded usage store;
//! then again on Postgres when one is reachable (`TEST_PG_ADMIN_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`; a fresh database).
//!
//!   cargo bench -p agora-benches --bench billing
//!
//! - Webhooks: `BENCH_WEBHOOKS` (default 2,000) signed, distinct events posted
//!   by 32 concurrent clients to `/api/stripe/webhook/`. They are the
//!   stand-in's own `invoice.paid` and `customer.subscription.updated` events
//!   for 32 subscriptions bought through Checkout, each sent with a new id, so
//!   each takes effect: the control plane reads the subscription back from the
//!   stand-in and applies it. Against it, as many events of a type Agora only
//!   records (`customer.created`): the cost of the signature check and the
//!   once-only row alone.
//! - Meter events per million invokes: `BENCH_INVOKES` (default 1,000,000)
//!   usage events for 4 metered subscriptions, spread over 24 hours, with a
//!   reporting round after each hourly window (the default window) closes;
//!   counts the meter event calls the stand-in received, against one call per
//!   invoke. The rounds are run at the simulated times (`report_once` takes
//!   its clock), and the stand-in's clock is moved past them with a test
//!   clock, so that it takes their meter events as past ones.
//! - One window's reports for `BENCH_SUBSCRIPTIONS` (default 10,000)
//!   subscriptions: copies of one bought through Checkout, written straight
//!   into the database (each with its own Stripe customer, made through the
//!   stand-in's API; the copies' subscription ids are unknown to it, which
//!   reporting never needs), with 10 invokes each in one window; the rounds
//!   until every report is accepted are timed.
//!
//! The stand-in answers on loopback in the same process: against Stripe each
//! call also waits a network round trip, and rounds send one call at a time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_config::settings::Settings;
use agora_config::usage::UsageRecord;
use agora_control_plane::billing::{meter, signature};
use agora_control_plane::demo::{self, DemoInfo};
use agora_control_plane::AppState;
use agora_stripe_local::LocalStripe;
use agora_usage::UsageStore;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::Row;
use uuid::Uuid;

const AGENT: &str = "Document Summarizer";
const PAY: &str = "4242 4242 4242 4242";
const CLIENTS: usize = 32;
const HOUR_MS: i64 = 3_600_000;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace(['_', ','], "").parse().ok())
        .unwrap_or(default)
}

/// The control plane and its local Stripe, on one database.
struct Shop {
    http: reqwest::Client,
    cp_url: String,
    stripe: LocalStripe,
    state: AppState,
    info: DemoInfo,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

/// A subscription bought through Checkout.
struct Bought {
    order: Uuid,
    config: Uuid,
    stripe_subscription: String,
}

impl Shop {
    /// As `agora up` starts it, on `database_url` (the embedded SQLite when none).
    async fn start(database_url: Option<String>) -> Shop {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cp_url = format!("http://{}", listener.local_addr().unwrap());
        let webhook =
            agora_stripe_local::WebhookTarget::new(format!("{cp_url}/api/stripe/webhook/"));
        let stripe = agora_stripe_local::start(
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            agora_stripe_local::Options {
                webhooks: vec![webhook],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mut settings = Settings {
            data_dir: dir.path().to_owned(),
            ..Default::default()
        };
        settings.control_plane.database_url = database_url;
        let st = &mut settings.stripe;
        st.api_base = stripe.url();
        st.secret_key = Some(stripe.secret_key().to_owned().into());
        st.publishable_key = Some(stripe.publishable_key().to_owned());
        st.webhook_secret = stripe.webhook_secret().map(|s| s.to_owned().into());
        st.allowed_redirect_hosts = vec!["shop.example".into()];
        // The benchmark runs the reporting rounds itself.
        st.report_every_ms = 3_600_000;
        let state = AppState::from_settings(&settings).await.unwrap();
        let info = demo::ensure(&state, dir.path(), &cp_url, None, None)
            .await
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(agora_control_plane::serve(
            listener,
            state.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        Shop {
            http: reqwest::Client::new(),
            cp_url,
            stripe,
            state,
            info,
            stop: Some(stop),
            server,
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server).await;
        self.state.db.pool.close().await;
    }

    async fn cp(&self, method: Method, token: &str, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.cp_url))
            .header("authorization", format!("Token {token}"));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }

    /// A call to the local Stripe's API (or its `/_local/` controls).
    async fn stripe(&self, method: Method, path: &str, form: &[(&str, String)]) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.stripe.url()))
            .bearer_auth(self.stripe.secret_key());
        req = if method == Method::GET {
            req.query(form)
        } else {
            req.form(form)
        };
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }

    /// A plan on the demo agent, as its provider makes it.
    async fn plan(&self, plan: Value) -> (Uuid, Uuid) {
        let agents = self
            .cp(
                Method::GET,
                &self.info.provider_token,
                "/api/provider-agents/",
                None,
            )
            .await;
        let agent: Uuid = agents["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == AGENT)
            .unwrap()["uuid"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let plan = self
            .cp(
                Method::POST,
                &self.info.provider_token,
                &format!("/api/provider-agents/{agent}/plans/"),
                Some(plan),
            )
            .await;
        (agent, plan["uuid"].as_str().unwrap().parse().unwrap())
    }

    /// Orders `plan`, checks out and pays, and waits for the order to complete.
    async fn buy(&self, (agent, plan): (Uuid, Uuid)) -> Bought {
        let buyer = &self.info.buyer_token;
        let order = self
            .cp(
                Method::POST,
                buyer,
                "/api/marketplace-orders/",
                Some(json!({"offering": agent, "plan": plan, "name": "Bench copy"})),
            )
            .await;
        let order: Uuid = order["uuid"].as_str().unwrap().parse().unwrap();
        let session = self
            .cp(
                Method::POST,
                buyer,
                "/api/stripe/checkout/",
                Some(json!({
                    "order_uuid": order,
                    "success_url": "https://shop.example/done",
                    "cancel_url": "https://shop.example/cancel",
                })),
            )
            .await;
        let paid = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
            .post(session["url"].as_str().unwrap())
            .form(&[("card_number", PAY)])
            .send()
            .await
            .unwrap();
        assert_eq!(paid.status(), StatusCode::SEE_OTHER);
        let config = loop {
            let o = self
                .cp(
                    Method::GET,
                    buyer,
                    &format!("/api/marketplace-orders/{order}/"),
                    None,
                )
                .await;
            if o["state"] == "done" {
                break o["config"].as_str().unwrap().parse().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let id = session["session_id"].as_str().unwrap();
        let cs = self
            .stripe(Method::GET, &format!("/v1/checkout/sessions/{id}"), &[])
            .await;
        Bought {
            order,
            config,
            stripe_subscription: cs["subscription"].as_str().unwrap().to_owned(),
        }
    }

    /// Waits until the stand-in has delivered `events` distinct events with
    /// success, so that its own deliveries do not overlap what is measured.
    async fn delivered(&self, events: usize) {
        loop {
            let deliveries = self.stripe(Method::GET, "/_local/deliveries", &[]).await;
            let ok: std::collections::BTreeSet<&str> = deliveries
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["status"] == 200)
                .filter_map(|d| d["event_id"].as_str())
                .collect();
            if ok.len() >= events {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Calls the stand-in took (2xx) at `path`.
    async fn calls(&self, path: &str) -> usize {
        let requests = self.stripe(Method::GET, "/_local/requests", &[]).await;
        requests
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["path"] == path && r["status"].as_u64().is_some_and(|s| s < 300))
            .count()
    }

    /// Moves the stand-in's clock to `to` (unix seconds).
    async fn advance_stripe_clock(&self, to: i64) {
        let clock = self
            .stripe(
                Method::POST,
                "/v1/test_helpers/test_clocks",
                &[(
                    "frozen_time",
                    (agora_control_plane::db::now_ms() / 1000).to_string(),
                )],
            )
            .await;
        let clock = clock["id"].as_str().unwrap();
        self.stripe(
            Method::POST,
            &format!("/v1/test_helpers/test_clocks/{clock}/advance"),
            &[("frozen_time", to.to_string())],
        )
        .await;
    }

    fn usage(&self) -> &dyn UsageStore {
        self.state.usage.as_deref().expect("the usage store")
    }

    fn billing(&self) -> &agora_control_plane::billing::Billing {
        self.state.billing.as_deref().expect("billing")
    }
}

fn basic_plan() -> Value {
    json!({"name": "Bench basic", "price_cents": 900, "requests_per_minute": 1000, "burst": 100})
}

fn metered_plan(name: &str) -> Value {
    json!({
        "name": name, "price_cents": 1500, "requests_per_minute": 1000, "burst": 100,
        "token_quota": 10, "usage_cents_per_1k_tokens": 100,
        "request_quota": 2, "usage_cents_per_request": 1,
    })
}

/// What posting a list of events gave.
struct Posted {
    secs: f64,
    latencies: Vec<Duration>,
    refused: usize,
}

impl Posted {
    fn line(&self, what: &str) -> String {
        let n = self.latencies.len();
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let at = |q: f64| sorted[((n as f64 * q).ceil() as usize).clamp(1, n) - 1];
        format!(
            "{what:<56} {n:>6} posted in {:>6.2} s: {:>6.0} taken/s, p50 {:>6.1} ms, p99 {:>6.1} ms, {} refused",
            self.secs,
            (n - self.refused) as f64 / self.secs,
            at(0.50).as_secs_f64() * 1000.0,
            at(0.99).as_secs_f64() * 1000.0,
            self.refused,
        )
    }
}

/// Posts every body, signed now, from [`CLIENTS`] concurrent clients.
async fn post_all(shop: &Shop, bodies: Vec<String>) -> Posted {
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let url = format!("{}/api/stripe/webhook/", shop.cp_url);
    let secret: Arc<str> = shop.stripe.webhook_secret().unwrap().into();
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (bodies, next, url, secret, http) = (
                bodies.clone(),
                next.clone(),
                url.clone(),
                secret.clone(),
                shop.http.clone(),
            );
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut refused = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    let t = agora_control_plane::db::now_ms() / 1000;
                    let v1 = hex::encode(signature::sign(secret.as_bytes(), t, body.as_bytes()));
                    let sent = Instant::now();
                    let resp = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("stripe-signature", format!("t={t},v1={v1}"))
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    let ok = resp.status() == StatusCode::OK;
                    let _ = resp.bytes().await;
                    latencies.push(sent.elapsed());
                    refused += usize::from(!ok);
                }
                (latencies, refused)
            })
        })
        .collect();
    let mut posted = Posted {
        secs: 0.0,
        latencies: Vec::new(),
        refused: 0,
    };
    for client in clients {
        let (latencies, refused) = client.await.unwrap();
        posted.latencies.extend(latencies);
        posted.refused += refused;
    }
    posted.secs = started.elapsed().as_secs_f64();
    posted
}

async fn webhooks(shop: &Shop, db: &str, n: usize) {
    let plan = shop.plan(basic_plan()).await;
    let mut bought = Vec::new();
    for _ in 0..CLIENTS {
        bought.push(shop.buy(plan).await);
    }
    // A change of metadata: one customer.subscription.updated each.
    for b in &bought {
        shop.stripe(
            Method::POST,
            &format!("/v1/subscriptions/{}", b.stripe_subscription),
            &[("metadata[bench]", "1".into())],
        )
        .await;
    }
    // Three events per purchase, and the update.
    shop.delivered(4 * bought.len()).await;
    let mut templates = Vec::new();
    for kind in ["invoice.paid", "customer.subscription.updated"] {
        let events = shop
            .stripe(
                Method::GET,
                "/v1/events",
                &[("type", kind.into()), ("limit", "100".into())],
            )
            .await;
        templates.extend(events["data"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(templates.len(), 2 * bought.len());
    let bodies = (0..n)
        .map(|i| {
            let mut event = templates[i % templates.len()].clone();
            event["id"] = format!("evt_bench_{i:08}").into();
            event.to_string()
        })
        .collect();
    let handled = post_all(shop, bodies).await;
    println!(
        "{}",
        handled.line(&format!(
            "{db}: webhooks re-reading {} subscriptions",
            bought.len()
        ))
    );
    let bodies = (0..n)
        .map(|i| {
            json!({
                "id": format!("evt_bench_recorded_{i:08}"), "object": "event",
                "type": "customer.created", "created": 1, "livemode": false,
                "data": {"object": {"id": format!("cus_bench_{i}"), "object": "customer"}},
            })
            .to_string()
        })
        .collect();
    let recorded = post_all(shop, bodies).await;
    println!(
        "{}",
        recorded.line(&format!("{db}: webhooks only recorded (customer.created)"))
    );
}

fn invoke(config: Uuid, time_ms: i64) -> UsageRecord {
    UsageRecord::Event(Box::new(agora_benches::usage_event(config, time_ms, 0)))
}

async fn insert(store: &dyn UsageStore, records: impl Iterator<Item = UsageRecord>) {
    let mut batch = Vec::with_capacity(10_000);
    for record in records {
        batch.push(record);
        if batch.len() == 10_000 {
            store.insert(&batch).await.unwrap();
            batch.clear();
        }
    }
    if !batch.is_empty() {
        store.insert(&batch).await.unwrap();
    }
}

/// The start of the hourly window after `ms`.
fn next_hour(ms: i64) -> i64 {
    ms - ms.rem_euclid(HOUR_MS) + HOUR_MS
}

/// Reports 24 hours of use by 4 metered subscriptions, a round per hourly
/// window.
async fn meter_events_per_invoke(shop: &Shop, db: &str, invokes: usize) {
    let mut bought = Vec::new();
    for i in 0..4 {
        // One live subscription per organisation and metered plan: a plan each.
        let plan = shop.plan(metered_plan(&format!("Bench metered {i}"))).await;
        bought.push(shop.buy(plan).await);
    }
    let start = agora_control_plane::db::now_ms();
    let day = 24 * HOUR_MS;
    let step = day / invokes as i64;
    insert(
        shop.usage(),
        (0..invokes).map(|i| invoke(bought[i % bought.len()].config, start + i as i64 * step)),
    )
    .await;
    let end = next_hour(start + day);
    shop.advance_stripe_clock(end / 1000 + 60).await;
    let before = shop.calls("/v1/billing/meter_events").await;
    let started = Instant::now();
    let mut now = next_hour(start);
    let mut rounds = 0;
    while now <= end {
        let round = meter::report_once(shop.billing(), &shop.state.db, shop.usage(), now + 1000)
            .await
            .unwrap();
        assert_eq!(round.failed, 0);
        rounds += 1;
        now += HOUR_MS;
    }
    let secs = started.elapsed().as_secs_f64();
    let calls = shop.calls("/v1/billing/meter_events").await - before;
    let lines = meter::reconcile(
        shop.billing(),
        &shop.state.db,
        shop.usage(),
        end + 1000,
        None,
    )
    .await
    .unwrap();
    let agree = lines.iter().all(|l| l.agrees()) && lines.iter().all(|l| l.store > 0);
    println!(
        "{db}: {invokes} invokes by {} subscriptions over 24 h (embedded usage store), {rounds} rounds, one per closed hourly window: \
         {calls} meter event calls = {:.0} per million invokes (one per invoke: 1,000,000); rounds took {secs:.2} s ({:.2} s each); reconciled: {}",
        bought.len(),
        calls as f64 * 1e6 / invokes as f64,
        secs / f64::from(rounds),
        if agree { "all agree" } else { "DISAGREE" },
    );
}

/// One hourly window's reports for `n` subscriptions written straight into
/// the database as copies of one bought through Checkout.
async fn one_window_for_many(shop: &Shop, db: &str, n: usize) {
    let template = shop
        .buy(shop.plan(metered_plan("Bench metered many")).await)
        .await;
    // A Stripe customer each, through the stand-in's API.
    let next = Arc::new(AtomicUsize::new(0));
    let made = Arc::new(std::sync::Mutex::new(vec![String::new(); n]));
    let url = format!("{}/v1/customers", shop.stripe.url());
    let key: Arc<str> = shop.stripe.secret_key().into();
    let makers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (next, made, url, key, http) = (
                next.clone(),
                made.clone(),
                url.clone(),
                key.clone(),
                shop.http.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let customer: Value = http
                        .post(&url)
                        .bearer_auth(&*key)
                        .form(&[("name", format!("Bench {i}"))])
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    made.lock().unwrap()[i] = customer["id"].as_str().unwrap().to_owned();
                }
            })
        })
        .collect();
    for maker in makers {
        maker.await.unwrap();
    }
    let customers = std::mem::take(&mut *made.lock().unwrap());

    let seeding = Instant::now();
    let mut tx = shop.state.db.pool.begin().await.unwrap();
    let mut configs = Vec::with_capacity(n);
    for (i, customer) in customers.iter().enumerate() {
        let (order, resource, config, subscription) = (
            Uuid::new_v4().to_string(),
            Uuid::new_v4().to_string(),
            Uuid::new_v4(),
            Uuid::new_v4().to_string(),
        );
        let like = template.order.to_string();
        sqlx::query(
            "INSERT INTO orders (uuid, org_uuid, project_uuid, agent_uuid, plan_uuid, state, price_cents, currency, created_by, created_at, completed_at, config_name) \
             SELECT $1, org_uuid, project_uuid, agent_uuid, plan_uuid, state, price_cents, currency, created_by, created_at, completed_at, config_name FROM orders WHERE uuid = $2",
        )
        .bind(&order)
        .bind(&like)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO resources (uuid, org_uuid, order_uuid, agent_uuid, plan_uuid, state, created_at) \
             SELECT $1, org_uuid, $2, agent_uuid, plan_uuid, state, created_at FROM resources WHERE order_uuid = $3",
        )
        .bind(&resource)
        .bind(&order)
        .bind(&like)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO agent_configs (uuid, org_uuid, resource_uuid, agent_uuid, project_uuid, name, greeting, tone, created_at, updated_at) \
             SELECT $1, c.org_uuid, $2, c.agent_uuid, c.project_uuid, c.name, c.greeting, c.tone, c.created_at, c.updated_at \
             FROM agent_configs c JOIN resources r ON r.uuid = c.resource_uuid WHERE r.order_uuid = $3",
        )
        .bind(config.to_string())
        .bind(&resource)
        .bind(&like)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO subscriptions (uuid, org_uuid, order_uuid, plan_uuid, stripe_id, stripe_customer, status, current_period_start, current_period_end, previous_period_start, cancel_at_period_end, canceled_at, past_due_since, created_at, updated_at) \
             SELECT $1, org_uuid, $2, plan_uuid, $3, $4, status, current_period_start, current_period_end, previous_period_start, cancel_at_period_end, canceled_at, past_due_since, created_at, updated_at \
             FROM subscriptions WHERE order_uuid = $5",
        )
        .bind(&subscription)
        .bind(&order)
        .bind(format!("sub_bench_{i}"))
        .bind(customer)
        .bind(&like)
        .execute(&mut *tx)
        .await
        .unwrap();
        configs.push(config);
    }
    tx.commit().await.unwrap();
    let seeded = seeding.elapsed().as_secs_f64();
    // 10 invokes each, in the next hourly window.
    let window = next_hour(agora_control_plane::db::now_ms());
    insert(
        shop.usage(),
        configs
            .iter()
            .flat_map(|&c| (0..10).map(move |i| invoke(c, window + i * 1000))),
    )
    .await;
    let now = window + HOUR_MS + 1000;
    shop.advance_stripe_clock(now / 1000 + 60).await;
    let before = shop.calls("/v1/billing/meter_events").await;
    let mut rounds = Vec::new();
    let started = Instant::now();
    let (secs, idle) = loop {
        let round_started = Instant::now();
        let round = meter::report_once(shop.billing(), &shop.state.db, shop.usage(), now)
            .await
            .unwrap();
        assert_eq!(round.failed, 0);
        if round.written == 0 && round.sent == 0 {
            break (
                round_started.duration_since(started).as_secs_f64(),
                round_started.elapsed().as_secs_f64(),
            );
        }
        rounds.push(format!(
            "round {}: {} written, {} sent in {:.2} s",
            rounds.len() + 1,
            round.written,
            round.sent,
            round_started.elapsed().as_secs_f64()
        ));
    };
    let calls = shop.calls("/v1/billing/meter_events").await - before;
    let pending: i64 = sqlx::query("SELECT COUNT(*) AS n FROM meter_reports WHERE sent_at IS NULL")
        .fetch_one(&shop.state.db.pool)
        .await
        .unwrap()
        .get("n");
    println!(
        "{db}: one hourly window for {n} subscriptions (seeded in the database in {seeded:.1} s; 10 invokes each, embedded usage store): \
         {calls} meter event calls, all accepted after {secs:.2} s [{}]; then a round with nothing to report took {idle:.2} s; {pending} left unsent",
        rounds.join("; "),
    );
}

/// A shop on the embedded SQLite, or on a fresh Postgres database.
async fn open(postgres: bool) -> (Shop, Option<agora_testkit::TestDatabase>) {
    let database = if postgres {
        Some(agora_testkit::TestDatabase::create().await)
    } else {
        None
    };
    let shop = Shop::start(database.as_ref().map(|d| d.url.clone())).await;
    (shop, database)
}

async fn close((shop, database): (Shop, Option<agora_testkit::TestDatabase>)) {
    shop.stop().await;
    if let Some(database) = database {
        database.drop().await;
    }
}

/// Each part on a shop of its own, so that no part's subscriptions are in
/// another's rounds.
async fn run(db: &str, postgres: bool, webhook_events: usize, invokes: usize, many: usize) {
    let opened = open(postgres).await;
    webhooks(&opened.0, db, webhook_events).await;
    close(opened).await;
    let opened = open(postgres).await;
    meter_events_per_invoke(&opened.0, db, invokes).await;
    close(opened).await;
    let opened = open(postgres).await;
    one_window_for_many(&opened.0, db, many).await;
    close(opened).await;
}

/// Whether the Postgres the test suite uses answers.
async fn postgres_reachable() -> bool {
    sqlx::any::install_default_drivers();
    let connected = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&agora_testkit::pg_admin_url())
        .await;
    match connected {
        Ok(pool) => {
            pool.close().await;
            true
        }
        Err(_) => false,
    }
}

fn main() {
    // `cargo test --all-targets` runs bench targets without `--bench`: nothing to do.
    if !std::env::args().any(|a| a == "--bench") {
        println!("billing benchmark: run it with `cargo bench -p agora-benches --bench billing`");
        return;
    }
    let webhook_events = env_number("BENCH_WEBHOOKS", 2_000);
    let invokes = env_number("BENCH_INVOKES", 1_000_000);
    let many = env_number("BENCH_SUBSCRIPTIONS", 10_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        run("sqlite", false, webhook_events, invokes, many).await;
        if postgres_reachable().await {
            run("postgres", true, webhook_events, invokes, many).await;
        } else {
            println!(
                "postgres: not reachable at {}; not run",
                agora_testkit::pg_admin_url()
                    .split('@')
                    .next_back()
                    .unwrap_or_default()
            );
        }
    });
}
