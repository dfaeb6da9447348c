//! Starting the stand-in on an OS-chosen port, talking to it as a Stripe
//! client does, and a webhook receiver that records what it is sent.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use agora_stripe_local::{LocalStripe, Options, WebhookTarget};
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

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

    pub async fn get(&self, path: &str, query: &[(&str, &str)]) -> Answer {
        self.send(reqwest::Method::GET, path, query, None).await
    }

    /// POSTs and insists on a 200.
    pub async fn ok(&self, path: &str, form: &[(&str, &str)]) -> Value {
        let answer = self.post(path, form).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "POST {path}: {}",
            answer.body
        );
        answer.body
    }

    /// GETs and insists on a 200.
    pub async fn fetch(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let answer = self.get(path, query).await;
        assert_eq!(answer.status, StatusCode::OK, "GET {path}: {}", answer.body);
        answer.body
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
        let answer = self.steer(path, body).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "POST {path}: {}",
            answer.body
        );
        answer.body
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
        c["id"].as_str().unwrap().to_string()
    }

    pub async fn product(&self, name: &str) -> String {
        let p = self.ok("/v1/products", &[("name", name)]).await;
        p["id"].as_str().unwrap().to_string()
    }

    /// A monthly licensed price of `cents`.
    pub async fn licensed_price(&self, cents: i64) -> String {
        let product = self.product("Pro plan").await;
        let amount = cents.to_string();
        let price = self
            .ok(
                "/v1/prices",
                &[
                    ("product", &product),
                    ("currency", "usd"),
                    ("unit_amount", &amount),
                    ("recurring[interval]", "month"),
                ],
            )
            .await;
        price["id"].as_str().unwrap().to_string()
    }

    /// A meter summing `event_name`, and a monthly metered price on it at
    /// `per_unit` cents (a decimal).
    pub async fn metered_price(&self, event_name: &str, per_unit: &str) -> (String, String) {
        let meter = self
            .ok(
                "/v1/billing/meters",
                &[
                    ("display_name", "Requests"),
                    ("event_name", event_name),
                    ("default_aggregation[formula]", "sum"),
                ],
            )
            .await;
        let meter = meter["id"].as_str().unwrap().to_string();
        let product = self.product("Requests").await;
        let price = self
            .ok(
                "/v1/prices",
                &[
                    ("product", &product),
                    ("currency", "usd"),
                    ("unit_amount_decimal", per_unit),
                    ("recurring[interval]", "month"),
                    ("recurring[usage_type]", "metered"),
                    ("recurring[meter]", &meter),
                ],
            )
            .await;
        (meter, price["id"].as_str().unwrap().to_string())
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
        let id = session["id"].as_str().unwrap();
        let session = self
            .fetch(&format!("/v1/checkout/sessions/{id}"), &[])
            .await;
        session["subscription"].as_str().unwrap().to_string()
    }

    /// A test clock frozen at the present: its id and time.
    pub async fn clock(&self) -> (String, i64) {
        let now = unix_now().to_string();
        let clock = self
            .ok("/v1/test_helpers/test_clocks", &[("frozen_time", &now)])
            .await;
        (
            clock["id"].as_str().unwrap().to_string(),
            clock["frozen_time"].as_i64().unwrap(),
        )
    }

    pub async fn advance(&self, clock: &str, to: i64) -> Value {
        let to = to.to_string();
        self.ok(
            &format!("/v1/test_helpers/test_clocks/{clock}/advance"),
            &[("frozen_time", &to)],
        )
        .await
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
