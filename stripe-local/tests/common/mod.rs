//! Starting the stand-in on an OS-chosen port, talking to it as a Stripe
//! client does, and a webhook receiver that records what it is sent.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use agora_stripe_local::{LocalStripe, Options, WebhookTarget};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};

pub const GOOD_CARD: &str = "4242 4242 4242 4242";
pub const BAD_CARD: &str = "4000 0000 0000 0341";
pub const DAY: i64 = 86_400;

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub struct Stand {
    pub stripe: LocalStripe,
    pub http: reqwest::Client,
}

pub async fn start() -> Stand {
    start_with(Vec::new()).await
}

pub async fn start_with(webhooks: Vec<WebhookTarget>) -> Stand {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = Options {
        webhooks,
        ..Options::default()
    };
    let stripe = agora_stripe_local::start(listener, options).await.unwrap();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap();
    Stand { stripe, http }
}

/// A stand-in with a customer subscribed, paid at checkout, to a $20 monthly
/// price: the stand-in, the customer and the subscription.
pub async fn subscribed() -> (Stand, String, String) {
    let stand = start().await;
    let customer = stand.customer().await;
    let price = stand.licensed_price(2000).await;
    let sub = stand.subscribe(&customer, &price, None).await;
    (stand, customer, sub)
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    async fn read(response: reqwest::Response) -> Answer {
        Answer {
            status: response.status(),
            headers: response.headers().clone(),
            body: response.json().await.unwrap_or(Value::Null),
        }
    }

    /// The body, insisting on a 200 (`what` names the request if not).
    pub fn ok(self, what: &str) -> Value {
        assert_eq!(self.status, StatusCode::OK, "{what}: {}", self.body);
        self.body
    }
}

fn id_of(object: &Value) -> String {
    object["id"].as_str().unwrap().to_string()
}

impl Stand {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.stripe.url())
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        form: &[(&str, &str)],
        key: Option<&str>,
    ) -> Answer {
        let mut request = self
            .http
            .request(method.clone(), self.url(path))
            .bearer_auth(self.stripe.secret_key());
        if method == reqwest::Method::GET {
            request = request.query(form);
        } else {
            request = request.form(form);
        }
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        Answer::read(request.send().await.unwrap()).await
    }

    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> Answer {
        self.send(reqwest::Method::POST, path, form, None).await
    }

    /// POSTs with an `Idempotency-Key`.
    pub async fn post_once(&self, path: &str, form: &[(&str, &str)], key: &str) -> Answer {
        self.send(reqwest::Method::POST, path, form, Some(key))
            .await
    }

    pub async fn get(&self, path: &str, query: &[(&str, &str)]) -> Answer {
        self.send(reqwest::Method::GET, path, query, None).await
    }

    /// POSTs and insists on a 200.
    pub async fn ok(&self, path: &str, form: &[(&str, &str)]) -> Value {
        self.post(path, form).await.ok(&format!("POST {path}"))
    }

    /// GETs and insists on a 200.
    pub async fn fetch(&self, path: &str, query: &[(&str, &str)]) -> Value {
        self.get(path, query).await.ok(&format!("GET {path}"))
    }

    /// GETs a hosted page (no key): its HTML.
    pub async fn page(&self, url: &str) -> String {
        let response = self.http.get(url).send().await.unwrap();
        response.text().await.unwrap()
    }

    /// POSTs a JSON body to a `/_local/` endpoint.
    pub async fn steer(&self, path: &str, body: Value) -> Answer {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(self.stripe.secret_key())
            .json(&body)
            .send()
            .await
            .unwrap();
        Answer::read(response).await
    }

    /// POSTs a JSON body to a `/_local/` endpoint and insists on a 200.
    pub async fn control(&self, path: &str, body: Value) -> Value {
        self.steer(path, body).await.ok(&format!("POST {path}"))
    }

    pub async fn local(&self, path: &str) -> Vec<Value> {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(self.stripe.secret_key())
            .send()
            .await
            .unwrap();
        response.json().await.unwrap()
    }

    /// The types of all events so far, oldest first.
    pub async fn event_types(&self) -> Vec<String> {
        let events = self.fetch("/v1/events", &[("limit", "100")]).await;
        let mut types: Vec<String> = events["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect();
        types.reverse();
        types
    }

    pub async fn customer(&self) -> String {
        let c = self
            .ok(
                "/v1/customers",
                &[("email", "ada@example.com"), ("name", "Ada")],
            )
            .await;
        id_of(&c)
    }

    /// Replaces the customer's default card through `/_local/`.
    pub async fn set_card(&self, customer: &str, number: &str) {
        self.control(
            &format!("/_local/customers/{customer}/card"),
            json!({ "number": number }),
        )
        .await;
    }

    pub async fn product(&self, name: &str) -> String {
        let p = self.ok("/v1/products", &[("name", name)]).await;
        id_of(&p)
    }

    /// Asks for a price in usd for `product`, on `terms` (amount, recurrence…).
    pub async fn post_price(&self, product: &str, terms: &[(&str, &str)]) -> Answer {
        let mut form = vec![("product", product), ("currency", "usd")];
        form.extend_from_slice(terms);
        self.post("/v1/prices", &form).await
    }

    /// A monthly licensed price of `cents`.
    pub async fn licensed_price(&self, cents: i64) -> String {
        let product = self.product("Pro plan").await;
        let amount = cents.to_string();
        let terms = [
            ("unit_amount", amount.as_str()),
            ("recurring[interval]", "month"),
        ];
        id_of(
            &self
                .post_price(&product, &terms)
                .await
                .ok("POST /v1/prices"),
        )
    }

    /// Asks for a meter summing `event_name`.
    pub async fn post_meter(&self, display_name: &str, event_name: &str) -> Answer {
        let form = [
            ("display_name", display_name),
            ("event_name", event_name),
            ("default_aggregation[formula]", "sum"),
        ];
        self.post("/v1/billing/meters", &form).await
    }

    /// A meter summing `event_name`, and a monthly metered price on it at
    /// `per_unit` cents (a decimal).
    pub async fn metered_price(&self, event_name: &str, per_unit: &str) -> (String, String) {
        let meter = self.post_meter("Requests", event_name).await;
        let meter = id_of(&meter.ok("POST /v1/billing/meters"));
        let product = self.product("Requests").await;
        let terms = [
            ("unit_amount_decimal", per_unit),
            ("recurring[interval]", "month"),
            ("recurring[usage_type]", "metered"),
            ("recurring[meter]", &meter),
        ];
        let price = self.post_price(&product, &terms).await;
        (meter, id_of(&price.ok("POST /v1/prices")))
    }

    /// Sends a meter event of `value` for `customer`, with `more` parameters
    /// (`identifier`, `timestamp`).
    pub async fn meter_event(
        &self,
        event_name: &str,
        customer: &str,
        value: &str,
        more: &[(&str, &str)],
    ) -> Answer {
        let mut form = vec![
            ("event_name", event_name),
            ("payload[stripe_customer_id]", customer),
            ("payload[value]", value),
        ];
        form.extend_from_slice(more);
        self.post("/v1/billing/meter_events", &form).await
    }

    /// The meter's summaries for `customer` from `start` to `end`, with `more`
    /// parameters (`value_grouping_window`).
    pub async fn summaries(
        &self,
        meter: &str,
        customer: &str,
        (start, end): (i64, i64),
        more: &[(&str, &str)],
    ) -> Value {
        let (start, end) = (start.to_string(), end.to_string());
        let mut query = vec![
            ("customer", customer),
            ("start_time", &start),
            ("end_time", &end),
        ];
        query.extend_from_slice(more);
        self.fetch(
            &format!("/v1/billing/meters/{meter}/event_summaries"),
            &query,
        )
        .await
    }

    /// Asks for a checkout session in subscription mode: `customer` (if any),
    /// the line items and the rest of `form`, and a success URL.
    pub async fn post_session(&self, customer: Option<&str>, form: &[(&str, &str)]) -> Answer {
        let mut full = vec![("mode", "subscription")];
        full.extend(customer.map(|c| ("customer", c)));
        full.extend_from_slice(form);
        full.push(("success_url", "https://x.test"));
        self.post("/v1/checkout/sessions", &full).await
    }

    /// An open checkout session for one licensed price (quantity 1) and,
    /// optionally, one metered price.
    pub async fn session(&self, customer: &str, licensed: &str, metered: Option<&str>) -> Value {
        let mut form = vec![
            ("mode", "subscription"),
            ("customer", customer),
            ("line_items[0][price]", licensed),
            ("line_items[0][quantity]", "1"),
            (
                "success_url",
                "https://agora.test/done?session={CHECKOUT_SESSION_ID}",
            ),
            ("cancel_url", "https://agora.test/cancel"),
            ("metadata[order]", "ord_1"),
            ("subscription_data[metadata][tenant]", "t_1"),
        ];
        if let Some(metered) = metered {
            form.push(("line_items[1][price]", metered));
        }
        self.ok("/v1/checkout/sessions", &form).await
    }

    pub async fn fetch_session(&self, id: &str) -> Value {
        self.fetch(&format!("/v1/checkout/sessions/{id}"), &[])
            .await
    }

    /// Submits the hosted checkout page with `card`.
    pub async fn pay(&self, session: &Value, card: &str) -> reqwest::Response {
        self.http
            .post(session["url"].as_str().unwrap())
            .form(&[("card_number", card)])
            .send()
            .await
            .unwrap()
    }

    /// A subscription paid at checkout: its id.
    pub async fn subscribe(&self, customer: &str, licensed: &str, metered: Option<&str>) -> String {
        let session = self.session(customer, licensed, metered).await;
        let paid = self.pay(&session, GOOD_CARD).await;
        assert_eq!(paid.status(), StatusCode::SEE_OTHER);
        let session = self.fetch_session(session["id"].as_str().unwrap()).await;
        session["subscription"].as_str().unwrap().to_string()
    }

    pub async fn subscription(&self, id: &str) -> Value {
        self.fetch(&format!("/v1/subscriptions/{id}"), &[]).await
    }

    /// A billing portal session for `customer`, returning to Agora's account page.
    pub async fn portal(&self, customer: &str) -> Value {
        let form = [
            ("customer", customer),
            ("return_url", "https://agora.test/account"),
        ];
        self.ok("/v1/billing_portal/sessions", &form).await
    }

    /// The subscription's open invoices, as a list.
    pub async fn open_invoices(&self, subscription: &str) -> Value {
        let query = [("subscription", subscription), ("status", "open")];
        self.fetch("/v1/invoices", &query).await
    }

    /// Events of one type, as a list, newest first.
    pub async fn events_of(&self, kind: &str) -> Value {
        self.fetch("/v1/events", &[("type", kind)]).await
    }

    /// Makes a webhook endpoint through the API for `events`, with `more`
    /// parameters (`api_version`).
    pub async fn webhook_endpoint(
        &self,
        url: &str,
        events: &[&str],
        more: &[(&str, &str)],
    ) -> Value {
        let mut form = vec![("url", url)];
        form.extend(events.iter().map(|e| ("enabled_events[]", *e)));
        form.extend_from_slice(more);
        self.ok("/v1/webhook_endpoints", &form).await
    }

    /// A test clock frozen at the present: its id and time.
    pub async fn clock(&self) -> (String, i64) {
        let now = unix_now().to_string();
        let clock = self
            .ok("/v1/test_helpers/test_clocks", &[("frozen_time", &now)])
            .await;
        (id_of(&clock), clock["frozen_time"].as_i64().unwrap())
    }

    /// Asks to advance the clock to `to`.
    pub async fn post_advance(&self, clock: &str, to: i64) -> Answer {
        let to = to.to_string();
        self.post(
            &format!("/v1/test_helpers/test_clocks/{clock}/advance"),
            &[("frozen_time", &to)],
        )
        .await
    }

    pub async fn advance(&self, clock: &str, to: i64) -> Value {
        let advanced = self.post_advance(clock, to).await;
        advanced.ok(&format!("advancing {clock}"))
    }

    /// A test clock advanced past one monthly period from now (32 days).
    pub async fn next_period(&self) {
        let (clock, now) = self.clock().await;
        self.advance(&clock, now + 32 * DAY).await;
    }
}

/// What the receiver was sent.
#[derive(Clone, Debug)]
pub struct Hit {
    pub signature: String,
    pub user_agent: String,
    pub content_type: String,
    pub body: String,
}

impl Hit {
    pub fn event(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// A webhook endpoint on an OS-chosen port that answers 500 to its first
/// `failures` requests, then 200.
pub struct Receiver {
    pub url: String,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Receiver {
    pub async fn start(failures: usize) -> Receiver {
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        let failures = Arc::new(AtomicUsize::new(failures));
        let recorded = hits.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let recorded = recorded.clone();
                let failures = failures.clone();
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string()
                    };
                    recorded.lock().unwrap().push(Hit {
                        signature: header("stripe-signature"),
                        user_agent: header("user-agent"),
                        content_type: header("content-type"),
                        body,
                    });
                    let failing = failures
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if failing {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::OK
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { url, hits }
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Waits for at least `n` requests and returns them all.
    pub async fn wait_for(&self, n: usize) -> Vec<Hit> {
        agora_testkit::eventually(&format!("{n} webhook requests"), || async {
            let hits = self.hits();
            (hits.len() >= n).then_some(hits)
        })
        .await
    }
}

/// An event that needs only a customer and a price: a checkout session expired.
pub async fn expire_a_session(stand: &Stand) -> String {
    let customer = stand.customer().await;
    let price = stand.licensed_price(500).await;
    let session = stand.session(&customer, &price, None).await;
    let id = session["id"].as_str().unwrap();
    stand
        .ok(&format!("/v1/checkout/sessions/{id}/expire"), &[])
        .await;
    id.to_string()
}
