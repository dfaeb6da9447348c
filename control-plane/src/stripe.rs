//! A small client for the part of Stripe's API that billing uses, over
//! `reqwest` (already in the build), in Stripe's form encoding.
//!
//! Chosen over async-stripe: its generated crates cost minutes of a two-core
//! build for a dozen calls. The base URL is a setting, so the same client talks
//! to real Stripe and to the local stand-in.
//!
//! Every POST carries an `Idempotency-Key`, so a request retried after a lost
//! answer has one effect. Calls are retried here on connection errors, 429 and
//! 5xx (at most three attempts, backing off); other errors are answered at once.

use std::collections::BTreeMap;
use std::time::Duration;

use agora_config::settings::StripeSettings;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// What Stripe's version header names: the object shapes parsed below.
pub const API_VERSION: &str = "2025-03-31.basil";

/// Form parameters, in order, with Stripe's bracketed nesting in the names.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Form(Vec<(String, String)>);

impl Form {
    pub fn new() -> Form {
        Form::default()
    }

    pub fn set(mut self, name: impl Into<String>, value: impl ToString) -> Form {
        self.0.push((name.into(), value.to_string()));
        self
    }

    pub fn set_opt(self, name: impl Into<String>, value: Option<impl ToString>) -> Form {
        match value {
            Some(v) => self.set(name, v),
            None => self,
        }
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    /// Stripe answered with an error object.
    #[error("stripe answered {status}: {kind} {code}: {message}")]
    Api {
        status: u16,
        kind: String,
        code: String,
        message: String,
        param: Option<String>,
    },
    #[error("stripe could not be reached: {0}")]
    Transport(#[source] reqwest::Error),
    #[error("stripe's answer could not be read: {0}")]
    Decode(String),
}

impl StripeError {
    /// Whether trying again later may succeed: rate limits, Stripe's own
    /// failures and the network. Anything else is the request's fault.
    pub fn is_transient(&self) -> bool {
        match self {
            StripeError::Api { status, .. } => *status == 429 || *status >= 500,
            StripeError::Transport(_) => true,
            StripeError::Decode(_) => false,
        }
    }

    /// A short reason for metrics and stored report errors.
    pub fn reason(&self) -> String {
        match self {
            StripeError::Api { status, code, .. } if code.is_empty() => format!("http_{status}"),
            StripeError::Api { code, .. } => code.clone(),
            StripeError::Transport(_) => "unreachable".into(),
            StripeError::Decode(_) => "bad_answer".into(),
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorObject,
}

#[derive(Deserialize)]
struct ErrorObject {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    param: Option<String>,
}

/// A Stripe account reached at a base URL with a secret key.
#[derive(Clone)]
pub struct StripeClient {
    http: reqwest::Client,
    base: String,
    secret: SecretString,
}

impl std::fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeClient")
            .field("base", &self.base)
            .finish()
    }
}

#[derive(Clone, Copy)]
enum Method {
    Get,
    Post,
    Delete,
}

impl StripeClient {
    /// `None` when no secret key is set: billing is off.
    pub fn from_settings(settings: &StripeSettings) -> anyhow::Result<Option<StripeClient>> {
        let Some(secret) = &settings.secret_key else {
            return Ok(None);
        };
        Ok(Some(StripeClient::new(
            &settings.api_base,
            secret.clone(),
            Duration::from_millis(settings.timeout_ms),
        )?))
    }

    pub fn new(
        base: &str,
        secret: SecretString,
        timeout: Duration,
    ) -> anyhow::Result<StripeClient> {
        Ok(StripeClient {
            http: reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(5)))
                .build()?,
            base: base.trim_end_matches('/').to_owned(),
            secret,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        form: &Form,
        idempotency_key: Option<&str>,
    ) -> Result<T, StripeError> {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            match self.call_once(method, path, form, idempotency_key).await {
                Err(e) if e.is_transient() && attempt < 3 => {
                    tracing::debug!(path, attempt, error = %e, "stripe call retried");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn call_once<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        form: &Form,
        idempotency_key: Option<&str>,
    ) -> Result<T, StripeError> {
        let url = format!("{}{path}", self.base);
        let request = match method {
            Method::Get => self.http.get(&url).query(form.pairs()),
            Method::Delete => self.http.delete(&url).query(form.pairs()),
            Method::Post => self.http.post(&url).form(form.pairs()),
        };
        let mut request = request
            .bearer_auth(self.secret.expose_secret())
            .header("Stripe-Version", API_VERSION);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await.map_err(StripeError::Transport)?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(StripeError::Transport)?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&body)
                .map_err(|e| StripeError::Decode(format!("{path}: {e}")));
        }
        let error = serde_json::from_slice::<ErrorBody>(&body).ok();
        Err(match error {
            Some(ErrorBody { error }) => StripeError::Api {
                status,
                kind: error.kind,
                code: error.code.unwrap_or_default(),
                message: error.message.unwrap_or_default(),
                param: error.param,
            },
            None => StripeError::Api {
                status,
                kind: "api_error".into(),
                code: String::new(),
                message: String::from_utf8_lossy(&body).chars().take(200).collect(),
                param: None,
            },
        })
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &Form,
    ) -> Result<T, StripeError> {
        self.call(Method::Get, path, query, None).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        form: &Form,
        idempotency_key: &str,
    ) -> Result<T, StripeError> {
        self.call(Method::Post, path, form, Some(idempotency_key))
            .await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, StripeError> {
        self.call(Method::Delete, path, &Form::new(), None).await
    }

    pub async fn subscription(&self, id: &str) -> Result<Subscription, StripeError> {
        self.get(&format!("/v1/subscriptions/{}", path_id(id)?), &Form::new())
            .await
    }

    pub async fn checkout_session(&self, id: &str) -> Result<CheckoutSession, StripeError> {
        self.get(
            &format!("/v1/checkout/sessions/{}", path_id(id)?),
            &Form::new(),
        )
        .await
    }
}

/// An id from a webhook or the database, safe to put in a path.
fn path_id(id: &str) -> Result<&str, StripeError> {
    if !id.is_empty()
        && id.len() <= 255
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        Ok(id)
    } else {
        Err(StripeError::Decode(format!("not a Stripe id: {id:?}")))
    }
}

// ---- the objects, with only the fields billing reads ----

#[derive(Debug, Clone, Deserialize)]
pub struct List<T> {
    pub data: Vec<T>,
    #[serde(default)]
    pub has_more: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Customer {
    pub id: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Product {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Price {
    pub id: String,
    pub active: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Meter {
    pub id: String,
    pub event_name: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MeterEventSummary {
    /// Stripe sends a number (a float for some formulas).
    pub aggregated_value: f64,
    pub start_time: i64,
    pub end_time: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CheckoutSession {
    pub id: String,
    pub url: Option<String>,
    /// `open`, `complete` or `expired`.
    pub status: Option<String>,
    pub client_reference_id: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub subscription: Option<Expandable>,
    pub expires_at: i64,
}

/// An id, or the object itself when expanded.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Expandable {
    Id(String),
    Object { id: String },
}

impl Expandable {
    pub fn id(&self) -> &str {
        match self {
            Expandable::Id(id) | Expandable::Object { id } => id,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Subscription {
    pub id: String,
    pub customer: Expandable,
    /// `incomplete`, `incomplete_expired`, `trialing`, `active`, `past_due`,
    /// `canceled`, `unpaid` or `paused`.
    pub status: String,
    #[serde(default)]
    pub cancel_at_period_end: bool,
    pub canceled_at: Option<i64>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub items: List<SubscriptionItem>,
}

impl Subscription {
    /// The current period, from the items (where Stripe keeps it since
    /// 2025-03-31): `[start, end)` in unix seconds.
    pub fn period(&self) -> Option<(i64, i64)> {
        let item = self.items.data.first()?;
        Some((item.current_period_start, item.current_period_end))
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct SubscriptionItem {
    pub id: String,
    pub current_period_start: i64,
    pub current_period_end: i64,
    pub price: Price,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Invoice {
    pub id: String,
    pub status: Option<String>,
    pub subscription: Option<Expandable>,
    pub parent: Option<InvoiceParent>,
    #[serde(default)]
    pub total: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InvoiceParent {
    pub subscription_details: Option<SubscriptionDetails>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SubscriptionDetails {
    pub subscription: Option<Expandable>,
}

impl Invoice {
    /// The subscription the invoice bills, where this API version puts it.
    pub fn subscription_id(&self) -> Option<&str> {
        self.parent
            .as_ref()
            .and_then(|p| p.subscription_details.as_ref())
            .and_then(|d| d.subscription.as_ref())
            .or(self.subscription.as_ref())
            .map(Expandable::id)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct PaymentMethod {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub card: Option<Card>,
    pub created: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Card {
    pub brand: String,
    pub last4: String,
    pub exp_month: i64,
    pub exp_year: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PortalSession {
    pub id: String,
    pub url: String,
}

/// A webhook event, as delivered.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub created: i64,
    pub data: EventData,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EventData {
    pub object: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_outside_are_checked_before_they_reach_a_path() {
        assert!(path_id("sub_1Pgc6rB7WZ01zgkWNy0Cn5nw").is_ok());
        for bad in ["", "../v1/customers", "sub_1?expand=x", "a/b", "sub 1"] {
            assert!(path_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn invoices_name_their_subscription_in_either_place() {
        let new: Invoice = serde_json::from_value(serde_json::json!({
            "id": "in_1", "status": "paid", "subscription": null, "total": 100,
            "parent": {"subscription_details": {"subscription": "sub_new"}}
        }))
        .unwrap();
        assert_eq!(new.subscription_id(), Some("sub_new"));
        let old: Invoice = serde_json::from_value(serde_json::json!({
            "id": "in_2", "status": "open", "subscription": "sub_old", "parent": null
        }))
        .unwrap();
        assert_eq!(old.subscription_id(), Some("sub_old"));
    }

    #[test]
    fn transient_errors_are_rate_limits_and_stripes_own_failures() {
        let api = |status| StripeError::Api {
            status,
            kind: "x".into(),
            code: String::new(),
            message: String::new(),
            param: None,
        };
        assert!(api(429).is_transient());
        assert!(api(500).is_transient());
        assert!(api(503).is_transient());
        assert!(!api(400).is_transient());
        assert!(!api(402).is_transient());
        assert!(!StripeError::Decode("x".into()).is_transient());
    }

    /// Stripe's own example objects parse into these types (when the shared
    /// fixtures are beside the checkout).
    #[test]
    fn stripes_example_objects_parse() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures/stripe/objects.json"
        );
        let Ok(text) = std::fs::read_to_string(path) else {
            eprintln!("stripe fixtures not found at {path}: example parsing skipped");
            return;
        };
        let all: serde_json::Value = serde_json::from_str(&text).unwrap();
        let example = |name: &str| all["resources"][name].clone();
        serde_json::from_value::<Customer>(example("customer")).unwrap();
        serde_json::from_value::<Product>(example("product")).unwrap();
        serde_json::from_value::<Price>(example("price")).unwrap();
        serde_json::from_value::<Meter>(example("billing.meter")).unwrap();
        serde_json::from_value::<MeterEventSummary>(example("billing.meter_event_summary"))
            .unwrap();
        serde_json::from_value::<CheckoutSession>(example("checkout.session")).unwrap();
        let subscription = serde_json::from_value::<Subscription>(example("subscription")).unwrap();
        assert!(subscription.period().is_some());
        serde_json::from_value::<Invoice>(example("invoice")).unwrap();
        serde_json::from_value::<PaymentMethod>(example("payment_method")).unwrap();
        serde_json::from_value::<PortalSession>(example("billing_portal.session")).unwrap();
        serde_json::from_value::<Event>(example("event")).unwrap();
    }
}
