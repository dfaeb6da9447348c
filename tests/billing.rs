//! Billing end to end: both planes on Postgres, the gateway, the usage
//! pipeline, and the local Stripe (a stand-in held to Stripe's shapes) whose
//! signed webhooks reach the control plane.

mod support;

use std::time::{Duration, Instant};

use agora_config::settings::UsageSettings;
use agora_control_plane::billing::meter;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::{eventually, eventually_within, Billed, World};
use uuid::Uuid;

const AGENT: &str = "Document Summarizer";
const PAY: &str = "4242 4242 4242 4242";
const DECLINE: &str = "4000000000000341";

/// A world that bills, meters into the embedded store, and reports usage per
/// one-second window.
async fn shop(grace_secs: u64) -> Shop {
    let usage = UsageSettings {
        batch_max_ms: 20,
        ..UsageSettings::default()
    };
    let w = World::start_billed(
        Some(usage),
        Billed {
            grace_secs,
            report_window_secs: 1,
            report_every_ms: 200,
        },
    )
    .await;
    Shop { w }
}

struct Shop {
    w: World,
}

impl Shop {
    fn stripe_url(&self) -> String {
        self.w.stripe.as_ref().unwrap().url()
    }

    fn stripe_key(&self) -> String {
        self.w.stripe.as_ref().unwrap().secret_key().to_owned()
    }

    /// A call to the local Stripe's API (or its `/_local/` controls).
    async fn stripe(&self, method: Method, path: &str, form: &[(&str, String)]) -> Value {
        let mut req = self
            .w
            .http
            .request(method.clone(), format!("{}{path}", self.stripe_url()))
            .bearer_auth(self.stripe_key());
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

    async fn local(&self, path: &str, body: Value) -> Value {
        let resp = self
            .w
            .http
            .post(format!("{}{path}", self.stripe_url()))
            .bearer_auth(self.stripe_key())
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.json().await.unwrap()
    }

    async fn local_get(&self, path: &str) -> Vec<Value> {
        self.stripe(Method::GET, path, &[])
            .await
            .as_array()
            .unwrap()
            .clone()
    }

    async fn buyer(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.w
            .cp(method, &self.w.info.buyer_token, path, body)
            .await
    }

    /// A plan on the demo agent, as its provider makes it.
    async fn plan(&self, plan: Value) -> (Uuid, Uuid) {
        let agent = self.w.agent(AGENT).await;
        let (s, plan) = self
            .w
            .cp(
                Method::POST,
                &self.w.info.provider_token,
                &format!("/api/provider-agents/{agent}/plans/"),
                Some(plan),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{plan}");
        (agent, plan["uuid"].as_str().unwrap().parse().unwrap())
    }

    async fn order(&self, (agent, plan): (Uuid, Uuid)) -> Uuid {
        let (s, order) = self
            .buyer(
                Method::POST,
                "/api/marketplace-orders/",
                Some(json!({"offering": agent, "plan": plan, "name": "Paid copy"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{order}");
        assert_eq!(order["state"], "pending_payment");
        assert!(order["config"].is_null());
        order["uuid"].as_str().unwrap().parse().unwrap()
    }

    async fn checkout(&self, order: Uuid) -> Value {
        let (s, session) = self
            .buyer(
                Method::POST,
                "/api/stripe/checkout/",
                Some(json!({
                    "order_uuid": order,
                    "success_url": "https://shop.example/done?session={CHECKOUT_SESSION_ID}",
                    "cancel_url": "https://shop.example/cancel",
                })),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{session}");
        session
    }

    /// Pays on the hosted checkout page with `card`; the page's answer.
    async fn pay(&self, url: &str, card: &str) -> reqwest::Response {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
            .post(url)
            .form(&[("card_number", card)])
            .send()
            .await
            .unwrap()
    }

    async fn order_state(&self, order: Uuid) -> Value {
        let (s, order) = self
            .buyer(
                Method::GET,
                &format!("/api/marketplace-orders/{order}/"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{order}");
        order
    }

    /// Orders `plan`, checks out and pays: the order's config.
    async fn buy(&self, plan: (Uuid, Uuid)) -> (Uuid, Uuid) {
        let order = self.order(plan).await;
        let session = self.checkout(order).await;
        let paid = self.pay(session["url"].as_str().unwrap(), PAY).await;
        assert_eq!(paid.status(), StatusCode::SEE_OTHER);
        let config = eventually("the paid order completes", || async {
            let o = self.order_state(order).await;
            (o["state"] == "done").then(|| o["config"].as_str().unwrap().parse::<Uuid>().unwrap())
        })
        .await;
        (order, config)
    }

    async fn key(&self, config: Uuid, mode: &str) -> String {
        let (s, issued) = self
            .buyer(
                Method::POST,
                &format!("/api/customer-agent-configs/{config}/api_keys/"),
                Some(json!({"name": mode, "mode": mode})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{issued}");
        let key = issued["key"].as_str().unwrap().to_owned();
        self.w.wait_for_key(&key).await;
        key
    }

    async fn subscription_of(&self, order: Uuid) -> Value {
        let (s, subs) = self
            .buyer(Method::GET, "/api/stripe-subscriptions/", None)
            .await;
        assert_eq!(s, StatusCode::OK, "{subs}");
        subs["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["order"] == order.to_string())
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Moves the local Stripe's clock to just past the subscription's period.
    async fn past_period_end(&self, stripe_subscription: &str) {
        let sub = self
            .stripe(
                Method::GET,
                &format!("/v1/subscriptions/{stripe_subscription}"),
                &[],
            )
            .await;
        let end = sub["items"]["data"][0]["current_period_end"]
            .as_i64()
            .unwrap();
        let clock = self
            .stripe(
                Method::POST,
                "/v1/test_helpers/test_clocks",
                &[("frozen_time", (end - 10).to_string())],
            )
            .await;
        let clock = clock["id"].as_str().unwrap().to_owned();
        self.stripe(
            Method::POST,
            &format!("/v1/test_helpers/test_clocks/{clock}/advance"),
            &[("frozen_time", (end + 60).to_string())],
        )
        .await;
    }

    async fn invoke_status(&self, key: &str) -> (StatusCode, Value) {
        let r = self
            .w
            .invoke(key, json!({"input": "Summarise: billing works."}))
            .await;
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `SELECT COUNT(*) AS n …` over the control plane's database.
    async fn count(&self, sql: &str, bind: Option<String>) -> i64 {
        let mut query = sqlx::query(sql);
        if let Some(bind) = bind {
            query = query.bind(bind);
        }
        sqlx::Row::get(&query.fetch_one(&self.w.state.db.pool).await.unwrap(), "n")
    }

    async fn reconcile(&self) -> Vec<meter::Reconciled> {
        meter::reconcile(
            self.w.state.billing.as_ref().unwrap(),
            &self.w.state.db,
            self.w.state.usage.as_deref().unwrap(),
            agora_control_plane::db::now_ms(),
            None,
        )
        .await
        .unwrap()
    }
}

fn metered_plan() -> Value {
    json!({
        "name": "Metered", "price_cents": 1500, "requests_per_minute": 1000, "burst": 100,
        "token_quota": 10, "usage_cents_per_1k_tokens": 100,
        "request_quota": 2, "usage_cents_per_request": 1,
    })
}

fn basic_plan() -> Value {
    json!({"name": "Basic", "price_cents": 900, "requests_per_minute": 1000, "burst": 100})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paid_plan_is_bought_used_reported_invoiced_and_reconciled() {
    let shop = shop(3600).await;
    let plan = shop.plan(metered_plan()).await;
    let order = shop.order(plan).await;

    // Redirects only to allowed hosts.
    let (s, body) = shop
        .buyer(
            Method::POST,
            "/api/stripe/checkout/",
            Some(json!({"order_uuid": order, "success_url": "https://evil.example/", "cancel_url": "https://shop.example/"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_redirect_url");

    let session = shop.checkout(order).await;
    // Asking again gives the same open session.
    assert_eq!(
        shop.checkout(order).await["session_id"],
        session["session_id"]
    );

    // What Stripe was sent: one customer for the organization, a subscription
    // checkout with the base price and the metered prices, naming the order.
    let requests = shop.local_get("/_local/requests").await;
    let posts = |path: &str| -> Vec<Value> {
        requests
            .iter()
            .filter(|r| r["method"] == "POST" && r["path"] == path)
            .cloned()
            .collect()
    };
    let customers = posts("/v1/customers");
    assert_eq!(customers.len(), 1, "{customers:?}");
    assert!(customers[0]["idempotency_key"].is_string());
    let checkouts = posts("/v1/checkout/sessions");
    assert_eq!(checkouts.len(), 1, "{checkouts:?}");
    let p = &checkouts[0]["params"];
    assert_eq!(p["mode"], "subscription");
    assert_eq!(p["client_reference_id"], order.to_string());
    assert_eq!(
        p["subscription_data"]["metadata"]["order_uuid"],
        order.to_string()
    );
    let items = p["line_items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{p}");
    assert_eq!(items[0]["quantity"], "1");
    assert!(items[1].get("quantity").is_none() && items[2].get("quantity").is_none());
    assert_eq!(posts("/v1/billing/meters").len(), 2);
    let prices = posts("/v1/prices");
    assert!(prices
        .iter()
        .any(|p| p["params"]["recurring"]["usage_type"] == "metered"
            && p["params"]["unit_amount_decimal"] == "0.1"));

    // A declined card changes nothing; a good one pays.
    let url = session["url"].as_str().unwrap();
    let declined = shop.pay(url, DECLINE).await;
    assert_ne!(declined.status(), StatusCode::SEE_OTHER);
    assert!(declined.text().await.unwrap().contains("declined"));
    assert_eq!(shop.order_state(order).await["state"], "pending_payment");
    let paid = shop.pay(url, PAY).await;
    assert_eq!(paid.status(), StatusCode::SEE_OTHER);
    let location = paid.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with("https://shop.example/done?session=cs_"),
        "{location}"
    );

    let config = eventually("the paid order completes", || async {
        let o = shop.order_state(order).await;
        (o["state"] == "done").then(|| o["config"].as_str().unwrap().parse::<Uuid>().unwrap())
    })
    .await;
    let sub = shop.subscription_of(order).await;
    assert_eq!(sub["status"], "active", "{sub}");
    assert_eq!(sub["resource_state"], "active");
    assert_eq!(sub["config"], config.to_string());

    // The buyer's key works; its use goes past the plan's included quotas.
    let key = shop.key(config, "live").await;
    for _ in 0..4 {
        let (s, body) = shop.invoke_status(&key).await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    let lines = eventually_within(
        Duration::from_secs(30),
        "usage is reported and agrees",
        || async {
            let lines = shop.reconcile().await;
            let requests = lines.iter().find(|l| l.unit == "requests")?;
            let tokens = lines.iter().find(|l| l.unit == "tokens")?;
            (lines.iter().all(|l| l.agrees()) && requests.reported == 2 && tokens.reported > 0)
                .then_some(lines)
        },
    )
    .await;
    let tokens = lines.iter().find(|l| l.unit == "tokens").unwrap().reported;
    // One meter event per unit and window, not one per invoke.
    let events = shop.local_get("/_local/meter_events").await;
    assert!(!events.is_empty() && events.len() <= 8, "{}", events.len());

    // The period ends: Stripe invoices the base price and the reported use.
    let stripe_sub = sub["stripe_subscription"].as_str().unwrap().to_owned();
    shop.past_period_end(&stripe_sub).await;
    let invoices = shop
        .stripe(
            Method::GET,
            "/v1/invoices",
            &[("subscription", stripe_sub.clone())],
        )
        .await;
    let renewal = invoices["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["billing_reason"] == "subscription_cycle")
        .unwrap_or_else(|| panic!("no renewal invoice: {invoices}"))
        .clone();
    let usage_cents = (tokens as f64 * 0.1).round() as i64 + 2;
    assert_eq!(
        renewal["total"].as_i64().unwrap(),
        1500 + usage_cents,
        "{renewal}"
    );
    assert_eq!(renewal["status"], "paid");

    // The command operators run agrees.
    let st = &shop.w.settings;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["billing", "reconcile"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AGORA_DATA_DIR", &st.data_dir)
        .env(
            "AGORA_CONTROL_PLANE__DATABASE_URL",
            st.control_plane.database_url.as_ref().unwrap(),
        )
        .env("AGORA_STRIPE__API_BASE", shop.stripe_url())
        .env("AGORA_STRIPE__SECRET_KEY", shop.stripe_key())
        .env("AGORA_STRIPE__PUBLISHABLE_KEY", "pk_test_x")
        .env("AGORA_STRIPE__REPORT_WINDOW_SECS", "1")
        .env("AGORA_LOG__FILTER", "warn")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{printed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains("all agree"), "{printed}");
    shop.w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_stale_and_unsigned_webhooks_are_refused_and_change_nothing() {
    let shop = shop(3600).await;
    let order = shop.order(shop.plan(basic_plan()).await).await;
    let session = shop.checkout(order).await;
    // Stripe would say the session completed; only a signed delivery is believed.
    let event = json!({
        "id": "evt_forged", "object": "event", "type": "checkout.session.completed",
        "created": 1, "data": {"object": {"id": session["session_id"], "object": "checkout.session"}},
    })
    .to_string();
    let now = agora_control_plane::db::now_ms() / 1000;
    let secret = shop
        .w
        .stripe
        .as_ref()
        .unwrap()
        .webhook_secret()
        .unwrap()
        .to_owned();
    let sign = |secret: &str, t: i64| {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.{event}").as_bytes());
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    };
    for header in [
        None,
        Some(sign("whsec_someone_else", now)),
        Some(sign(&secret, now - 301)),
        Some(format!("t={now},v1={}", "0".repeat(64))),
        Some("garbage".to_owned()),
    ] {
        let mut req = shop
            .w
            .http
            .post(format!("{}/api/stripe/webhook/", shop.w.cp_url))
            .header("content-type", "application/json")
            .body(event.clone());
        if let Some(h) = &header {
            req = req.header("stripe-signature", h);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{header:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_signature", "{header:?}");
    }
    let recorded: i64 = shop
        .count("SELECT COUNT(*) AS n FROM stripe_events", None)
        .await;
    assert_eq!(recorded, 0);
    assert_eq!(shop.order_state(order).await["state"], "pending_payment");
    // The same delivery, rightly signed, is taken (and, the session being
    // unpaid, completes nothing either).
    let resp = shop
        .w
        .http
        .post(format!("{}/api/stripe/webhook/", shop.w.cp_url))
        .header("stripe-signature", sign(&secret, now))
        .body(event.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(shop.order_state(order).await["state"], "pending_payment");
    shop.w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_event_delivered_twice_takes_effect_once() {
    let shop = shop(3600).await;
    shop.local("/_local/delivery", json!({"mode": "duplicate"}))
        .await;
    let (order, _) = shop.buy(shop.plan(basic_plan()).await).await;
    let deliveries = eventually("every event is delivered twice", || async {
        let d = shop.local_get("/_local/deliveries").await;
        let ok = d.iter().filter(|d| d["status"] == 200).count();
        (ok >= 6).then_some(d)
    })
    .await;
    let distinct: std::collections::BTreeSet<String> = deliveries
        .iter()
        .map(|d| d["event_id"].as_str().unwrap().to_owned())
        .collect();
    let recorded: i64 = shop
        .count("SELECT COUNT(*) AS n FROM stripe_events", None)
        .await;
    assert_eq!(recorded as usize, distinct.len());
    // One order, one resource, one config.
    let resources: i64 = shop
        .count(
            "SELECT COUNT(*) AS n FROM resources WHERE order_uuid = $1",
            Some(order.to_string()),
        )
        .await;
    assert_eq!(resources, 1);
    let metrics = shop
        .w
        .http
        .get(format!("{}/metrics", shop.w.cp_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let duplicates = metrics
        .lines()
        .find(|l| l.starts_with("agora_billing_webhooks_total{outcome=\"duplicate\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap();
    assert!(duplicates >= distinct.len() as u64, "{metrics}");
    shop.w.finish().await;
}

/// Every ordering of `0..n`, in lexicographic order.
fn permutations(n: usize) -> Vec<Vec<usize>> {
    fn extend(prefix: &mut Vec<usize>, n: usize, out: &mut Vec<Vec<usize>>) {
        if prefix.len() == n {
            out.push(prefix.clone());
            return;
        }
        for i in 0..n {
            if !prefix.contains(&i) {
                prefix.push(i);
                extend(prefix, n, out);
                prefix.pop();
            }
        }
    }
    let mut out = Vec::new();
    extend(&mut Vec::with_capacity(n), n, &mut out);
    out
}

/// Stripe neither orders nor deduplicates deliveries: whatever order the
/// events of a purchase and a cancellation at period end arrive in, the
/// result is the same. Those are four events, each naming the subscription
/// (`customer.subscription.created`, `invoice.paid`,
/// `checkout.session.completed`, `customer.subscription.updated`), and every
/// one of their 24 orders is tried, one purchase each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_order_of_a_subscriptions_events_gives_the_same_state() {
    let shop = shop(3600).await;
    let plan = shop.plan(basic_plan()).await;
    // Every event from here on waits for a flush.
    shop.local("/_local/delivery", json!({"mode": "hold"}))
        .await;
    let mut made_before = std::collections::BTreeSet::new();
    let mut delivered_orders = std::collections::BTreeSet::new();
    for order_of_delivery in permutations(4) {
        let order = shop.order(plan).await;
        let session = shop.checkout(order).await;
        assert_eq!(
            shop.pay(session["url"].as_str().unwrap(), PAY)
                .await
                .status(),
            StatusCode::SEE_OTHER
        );
        let id = session["session_id"].as_str().unwrap();
        let cs = shop
            .stripe(Method::GET, &format!("/v1/checkout/sessions/{id}"), &[])
            .await;
        let stripe_sub = cs["subscription"].as_str().unwrap().to_owned();
        // While the purchase's events are held, the buyer cancels at period end.
        shop.stripe(
            Method::POST,
            &format!("/v1/subscriptions/{stripe_sub}"),
            &[("cancel_at_period_end", "true".into())],
        )
        .await;
        assert_eq!(shop.order_state(order).await["state"], "pending_payment");

        // The held events, as made: Stripe lists the newest first.
        let events = shop
            .stripe(Method::GET, "/v1/events", &[("limit", "100".into())])
            .await;
        let mut held: Vec<(String, String)> = events["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let id = e["id"].as_str().unwrap().to_owned();
                (id, e["type"].as_str().unwrap().to_owned())
            })
            .take_while(|(id, _)| !made_before.contains(id))
            .collect();
        held.reverse();
        made_before.extend(held.iter().map(|(id, _)| id.clone()));
        let kinds: Vec<&str> = held.iter().map(|(_, kind)| kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "customer.subscription.created",
                "invoice.paid",
                "checkout.session.completed",
                "customer.subscription.updated",
            ]
        );

        let flushed = shop
            .local(
                "/_local/delivery/flush",
                json!({"order": "explicit", "indices": order_of_delivery}),
            )
            .await;
        assert_eq!(flushed["flushed"], 4, "{flushed}");
        // Each taken on its first attempt, so in the order flushed.
        let ids: Vec<&str> = held.iter().map(|(id, _)| id.as_str()).collect();
        let delivered = eventually("the held events are delivered", || async {
            let firsts: Vec<Value> = shop
                .local_get("/_local/deliveries")
                .await
                .into_iter()
                .filter(|d| d["attempt"] == 1 && ids.contains(&d["event_id"].as_str().unwrap()))
                .collect();
            (firsts.len() == 4).then_some(firsts)
        })
        .await;
        assert!(
            delivered.iter().all(|d| d["status"] == 200),
            "{delivered:?}"
        );
        let delivered: Vec<(String, String)> = delivered
            .iter()
            .map(|d| {
                let id = d["event_id"].as_str().unwrap().to_owned();
                (id, d["type"].as_str().unwrap().to_owned())
            })
            .collect();
        let asked: Vec<(String, String)> =
            order_of_delivery.iter().map(|&i| held[i].clone()).collect();
        assert_eq!(delivered, asked);
        delivered_orders.insert(
            delivered
                .into_iter()
                .map(|(_, kind)| kind)
                .collect::<Vec<_>>(),
        );

        // With every event taken, the state is the same whatever their order.
        let o = shop.order_state(order).await;
        assert_eq!(o["state"], "done", "{order_of_delivery:?}: {o}");
        let sub = shop.subscription_of(order).await;
        assert_eq!(sub["status"], "active", "{order_of_delivery:?}: {sub}");
        assert_eq!(
            sub["cancel_at_period_end"], true,
            "{order_of_delivery:?}: {sub}"
        );
        assert_eq!(
            sub["resource_state"], "active",
            "{order_of_delivery:?}: {sub}"
        );
        assert_eq!(sub["config"], o["config"]);
        assert_eq!(sub["stripe_subscription"], stripe_sub.as_str());
    }
    // The 24 orders were each delivered, and told apart by their events' types.
    assert_eq!(delivered_orders.len(), 24, "{delivered_orders:?}");
    shop.w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_renewal_is_refused_at_the_gateway_within_a_second_and_works_again_once_paid() {
    // No grace: past due is refused at once.
    let shop = shop(0).await;
    let (order, config) = shop.buy(shop.plan(basic_plan()).await).await;
    let key = shop.key(config, "live").await;
    assert_eq!(shop.invoke_status(&key).await.0, StatusCode::OK);
    let sub = shop.subscription_of(order).await;
    let stripe_sub = sub["stripe_subscription"].as_str().unwrap().to_owned();
    let customer = shop
        .stripe(Method::GET, &format!("/v1/subscriptions/{stripe_sub}"), &[])
        .await["customer"]
        .as_str()
        .unwrap()
        .to_owned();
    shop.local(
        &format!("/_local/customers/{customer}/card"),
        json!({"number": DECLINE}),
    )
    .await;

    shop.past_period_end(&stripe_sub).await;
    let started = Instant::now();
    let (_, body) = eventually_within(
        Duration::from_secs(1),
        "the lapsed key is refused",
        || async {
            let (s, body) = shop.invoke_status(&key).await;
            (s == StatusCode::PAYMENT_REQUIRED).then_some((s, body))
        },
    )
    .await;
    println!("refused {:?} after the renewal failed", started.elapsed());
    assert_eq!(body["error"]["code"], "subscription_inactive");
    assert_eq!(shop.subscription_of(order).await["status"], "past_due");

    // A good card and a paid invoice: the key works again.
    shop.local(
        &format!("/_local/customers/{customer}/card"),
        json!({"number": PAY}),
    )
    .await;
    let invoices = shop
        .stripe(
            Method::GET,
            "/v1/invoices",
            &[("subscription", stripe_sub.clone())],
        )
        .await;
    let open = invoices["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["status"] == "open")
        .unwrap_or_else(|| panic!("no open invoice: {invoices}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    shop.stripe(Method::POST, &format!("/v1/invoices/{open}/pay"), &[])
        .await;
    eventually_within(
        Duration::from_secs(1),
        "the paid key works again",
        || async { (shop.invoke_status(&key).await.0 == StatusCode::OK).then_some(()) },
    )
    .await;
    assert_eq!(shop.subscription_of(order).await["status"], "active");
    shop.w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_cancelled_at_period_end_works_until_the_period_ends() {
    let shop = shop(3600).await;
    let (order, config) = shop.buy(shop.plan(basic_plan()).await).await;
    let key = shop.key(config, "live").await;
    let sub = shop.subscription_of(order).await;
    let uuid = sub["uuid"].as_str().unwrap();
    let (s, cancelled) = shop
        .buyer(
            Method::POST,
            &format!("/api/stripe-subscriptions/{uuid}/cancel/"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["cancel_at_period_end"], true);
    assert_eq!(cancelled["status"], "active");
    assert_eq!(shop.invoke_status(&key).await.0, StatusCode::OK);

    shop.past_period_end(sub["stripe_subscription"].as_str().unwrap())
        .await;
    eventually_within(
        Duration::from_secs(1),
        "the ended subscription's key is refused",
        || async {
            (shop.invoke_status(&key).await.0 == StatusCode::PAYMENT_REQUIRED).then_some(())
        },
    )
    .await;
    let ended = shop.subscription_of(order).await;
    assert_eq!(ended["status"], "canceled");
    assert_eq!(ended["resource_state"], "terminated");
    // Cancelling what is cancelled is a conflict.
    let (s, _) = shop
        .buyer(
            Method::POST,
            &format!("/api/stripe-subscriptions/{uuid}/cancel/"),
            Some(json!({"at_period_end": false})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    shop.w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stripe_failures_and_a_crash_between_send_and_record_still_reconcile() {
    let shop = shop(3600).await;
    let (_, config) = shop.buy(shop.plan(metered_plan()).await).await;
    let key = shop.key(config, "live").await;
    // Stripe rate-limits and fails the first reports.
    for status in [429, 500] {
        shop.local(
            "/_local/faults",
            json!({"path_prefix": "/v1/billing/meter_events", "status": status, "count": 3}),
        )
        .await;
    }
    for _ in 0..4 {
        assert_eq!(shop.invoke_status(&key).await.0, StatusCode::OK);
    }
    eventually_within(
        Duration::from_secs(30),
        "reports go through after the faults",
        || async {
            let lines = shop.reconcile().await;
            (lines.len() == 2 && lines.iter().all(|l| l.agrees() && l.reported > 0)).then_some(())
        },
    )
    .await;
    let requests = shop.local_get("/_local/requests").await;
    let failed = requests
        .iter()
        .filter(|r| r["path"] == "/v1/billing/meter_events" && r["status"] != 200)
        .count();
    assert_eq!(failed, 6, "every fault was hit");

    // A crash after Stripe took the reports but before they were recorded: the
    // rows are unsent again, and the next rounds send the same identifiers.
    sqlx::query("UPDATE meter_reports SET sent_at = NULL")
        .execute(&shop.w.state.db.pool)
        .await
        .unwrap();
    eventually("the resent reports are recorded", || async {
        let n: i64 = shop
            .count(
                "SELECT COUNT(*) AS n FROM meter_reports WHERE sent_at IS NULL",
                None,
            )
            .await;
        (n == 0).then_some(())
    })
    .await;
    let lines = shop.reconcile().await;
    assert!(lines.iter().all(|l| l.agrees()), "{lines:?}");
    // Every report reached Stripe twice, and counted once.
    let sent = shop
        .local_get("/_local/requests")
        .await
        .into_iter()
        .filter(|r| r["path"] == "/v1/billing/meter_events" && r["status"] == 200)
        .count();
    let counted = shop
        .local_get("/_local/meter_events")
        .await
        .into_iter()
        .filter(|e| e["counted"] == true)
        .count();
    let reports: i64 = shop
        .count("SELECT COUNT(*) AS n FROM meter_reports", None)
        .await;
    assert_eq!(counted as i64, reports);
    assert_eq!(
        sent as i64,
        2 * reports,
        "each report was sent again after the crash"
    );
    shop.w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_mode_keys_are_never_billed() {
    let shop = shop(3600).await;
    let (_, config) = shop.buy(shop.plan(metered_plan()).await).await;
    let test_key = shop.key(config, "test").await;
    assert!(test_key.starts_with("ar_sk_test_"));
    for _ in 0..5 {
        assert_eq!(shop.invoke_status(&test_key).await.0, StatusCode::OK);
    }
    let lines = eventually_within(
        Duration::from_secs(30),
        "test use is counted apart",
        || async {
            let lines = shop.reconcile().await;
            let requests = lines.iter().find(|l| l.unit == "requests")?;
            (requests.test_mode == 5).then_some(lines)
        },
    )
    .await;
    assert!(
        lines
            .iter()
            .all(|l| l.store == 0 && l.reported == 0 && l.stripe == 0),
        "{lines:?}"
    );
    assert!(shop.local_get("/_local/meter_events").await.is_empty());
    shop.w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_tenants_subscription_is_not_found() {
    let shop = shop(3600).await;
    let (order, _) = shop.buy(shop.plan(basic_plan()).await).await;
    let sub = shop.subscription_of(order).await;
    let uuid = sub["uuid"].as_str().unwrap();
    // The provider is another tenant.
    let (s, _) = shop
        .w
        .cp(
            Method::POST,
            &shop.w.info.provider_token,
            &format!("/api/stripe-subscriptions/{uuid}/cancel/"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, theirs) = shop
        .w
        .cp(
            Method::GET,
            &shop.w.info.provider_token,
            "/api/stripe-subscriptions/",
            None,
        )
        .await;
    assert_eq!(theirs["count"], 0);
    let (s, methods) = shop
        .buyer(Method::GET, "/api/stripe-payment-methods/", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(methods[0]["last4"], "4242", "{methods}");
    let (s, portal) = shop
        .buyer(
            Method::POST,
            "/api/stripe/portal/",
            Some(json!({"return_url": "https://shop.example/account"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{portal}");
    assert!(portal["url"]
        .as_str()
        .unwrap()
        .starts_with(&shop.stripe_url()));
    let (s, config) = shop
        .w
        .cp(Method::GET, "", "/api/stripe/config/", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(config["mode"], "local");
    assert!(config["publishable_key"]
        .as_str()
        .unwrap()
        .starts_with("pk_"));
    shop.w.finish().await;
}
