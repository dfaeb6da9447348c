//! Everything the stand-in knows, in memory behind one lock, and its one clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use rand::distributions::{Alphanumeric, DistString};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::UnboundedSender;

use crate::billing::{Decimal, Interval, TestCard};
use crate::delivery::{DeliveryMode, Job};

pub type Metadata = Map<String, Value>;

/// A Stripe-looking id: `cus_` and 24 base62 characters.
pub fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        Alphanumeric.sample_string(&mut rand::thread_rng(), 24)
    )
}

pub fn real_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Records found by id.
pub trait Record {
    fn id(&self) -> &str;
}

macro_rules! records {
    ($($t:ty),*) => { $(impl Record for $t { fn id(&self) -> &str { &self.id } })* };
}
records!(
    Customer,
    Product,
    Price,
    Meter,
    CheckoutSession,
    Subscription,
    Invoice,
    PaymentMethod,
    PortalSession,
    TestClock,
    Endpoint,
    Event
);

pub fn find<'a, T: Record>(items: &'a [T], id: &str) -> Option<&'a T> {
    items.iter().find(|r| r.id() == id)
}

pub fn find_mut<'a, T: Record>(items: &'a mut [T], id: &str) -> Option<&'a mut T> {
    items.iter_mut().find(|r| r.id() == id)
}

pub struct Customer {
    pub id: String,
    pub created: i64,
    pub name: Option<String>,
    pub email: Option<String>,
    pub metadata: Metadata,
    pub test_clock: Option<String>,
    pub default_payment_method: Option<String>,
    pub invoice_prefix: String,
    pub next_invoice_sequence: u32,
    pub currency: Option<String>,
}

pub struct Product {
    pub id: String,
    pub created: i64,
    pub updated: i64,
    pub name: String,
    pub description: Option<String>,
    pub active: bool,
    pub metadata: Metadata,
}

pub struct Price {
    pub id: String,
    pub created: i64,
    pub product: String,
    pub currency: String,
    pub unit_amount_decimal: Decimal,
    pub recurring: Option<Recurring>,
    pub nickname: Option<String>,
    pub lookup_key: Option<String>,
    pub metadata: Metadata,
    pub active: bool,
}

#[derive(Clone)]
pub struct Recurring {
    pub interval: Interval,
    /// The meter of a metered price; `None` for a licensed one.
    pub meter: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Formula {
    Sum,
    Count,
}

pub struct Meter {
    pub id: String,
    pub created: i64,
    pub display_name: String,
    pub event_name: String,
    pub formula: Formula,
    pub customer_key: String,
    pub value_key: String,
}

pub struct MeterEvent {
    pub identifier: String,
    pub event_name: String,
    pub customer: String,
    pub value: i64,
    pub timestamp: i64,
    pub created: i64,
    pub payload: Metadata,
    /// False for a repeated identifier: answered, but not counted again.
    pub counted: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SessionStatus {
    Open,
    Complete,
    Expired,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Open => "open",
            SessionStatus::Complete => "complete",
            SessionStatus::Expired => "expired",
        }
    }
}

pub struct SessionLine {
    pub id: String,
    pub price: String,
    pub quantity: Option<i64>,
}

pub struct CheckoutSession {
    pub id: String,
    pub created: i64,
    pub expires_at: i64,
    pub customer: String,
    pub lines: Vec<SessionLine>,
    pub currency: String,
    pub success_url: String,
    pub cancel_url: Option<String>,
    pub client_reference_id: Option<String>,
    pub metadata: Metadata,
    pub subscription_metadata: Metadata,
    pub status: SessionStatus,
    pub subscription: Option<String>,
    pub invoice: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SubscriptionStatus {
    Active,
    PastDue,
    Unpaid,
    Canceled,
}

impl SubscriptionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::PastDue => "past_due",
            SubscriptionStatus::Unpaid => "unpaid",
            SubscriptionStatus::Canceled => "canceled",
        }
    }
}

pub struct SubscriptionItem {
    pub id: String,
    pub created: i64,
    pub price: String,
    pub quantity: Option<i64>,
}

pub struct Subscription {
    pub id: String,
    pub created: i64,
    pub customer: String,
    pub currency: String,
    pub interval: Interval,
    pub status: SubscriptionStatus,
    pub items: Vec<SubscriptionItem>,
    pub period_start: i64,
    pub period_end: i64,
    pub cancel_at_period_end: bool,
    pub canceled_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub metadata: Metadata,
    pub latest_invoice: Option<String>,
    pub test_clock: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum InvoiceStatus {
    Open,
    Paid,
}

impl InvoiceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InvoiceStatus::Open => "open",
            InvoiceStatus::Paid => "paid",
        }
    }
}

pub struct InvoiceLine {
    pub id: String,
    pub amount: i64,
    pub description: String,
    pub quantity: i64,
    pub unit_amount_decimal: String,
    pub subscription_item: String,
}

pub struct Invoice {
    pub id: String,
    pub number: String,
    pub created: i64,
    pub customer: String,
    pub customer_email: Option<String>,
    pub customer_name: Option<String>,
    pub subscription: String,
    pub subscription_metadata: Metadata,
    pub currency: String,
    pub billing_reason: &'static str,
    pub status: InvoiceStatus,
    pub lines: Vec<InvoiceLine>,
    pub period_start: i64,
    pub period_end: i64,
    pub attempt_count: u32,
    pub first_failure: Option<i64>,
    pub next_payment_attempt: Option<i64>,
    pub paid_at: Option<i64>,
    pub test_clock: Option<String>,
}

impl Invoice {
    pub fn total(&self) -> i64 {
        self.lines.iter().map(|l| l.amount).sum()
    }
}

pub struct PaymentMethod {
    pub id: String,
    pub created: i64,
    pub customer: Option<String>,
    pub card: TestCard,
}

pub struct PortalSession {
    pub id: String,
    pub created: i64,
    pub customer: String,
    pub return_url: Option<String>,
}

pub struct TestClock {
    pub id: String,
    pub created: i64,
    pub frozen_time: i64,
    pub name: Option<String>,
}

pub struct Endpoint {
    pub id: String,
    pub created: i64,
    pub url: String,
    pub enabled_events: Vec<String>,
    pub api_version: Option<String>,
    pub metadata: Metadata,
    pub queue: UnboundedSender<Job>,
}

impl Endpoint {
    fn wants(&self, kind: &str) -> bool {
        self.enabled_events.iter().any(|e| e == "*" || e == kind)
    }
}

pub struct Event {
    pub id: String,
    pub kind: String,
    pub body: Value,
}

/// Who caused an event: the API request, or nothing (the hosted page, the clock).
#[derive(Clone, Default)]
pub struct Origin {
    pub request_id: Option<String>,
    pub idempotency_key: Option<String>,
}

/// A fault a test asked for: the next `count` requests under `path_prefix`
/// are answered `status`.
pub struct Fault {
    pub path_prefix: String,
    pub status: StatusCode,
    pub count: u32,
}

/// What an idempotency key was first used for, and its answer once there is one.
pub struct Idempotent {
    pub fingerprint: (String, String, Value),
    pub answer: Option<(StatusCode, axum::body::Bytes)>,
}

#[derive(Default)]
pub struct State {
    /// Seconds added to real time: the one clock, moved forward by test clocks.
    pub offset: i64,
    pub api_version: String,
    /// `http://127.0.0.1:PORT`, for the hosted pages' addresses.
    pub base_url: String,
    pub customers: Vec<Customer>,
    pub products: Vec<Product>,
    pub prices: Vec<Price>,
    pub meters: Vec<Meter>,
    pub meter_events: Vec<MeterEvent>,
    pub sessions: Vec<CheckoutSession>,
    pub subscriptions: Vec<Subscription>,
    pub invoices: Vec<Invoice>,
    pub payment_methods: Vec<PaymentMethod>,
    pub portal_sessions: Vec<PortalSession>,
    pub test_clocks: Vec<TestClock>,
    pub endpoints: Vec<Endpoint>,
    pub events: Vec<Event>,
    pub idempotency: HashMap<String, Idempotent>,
    pub faults: Vec<Fault>,
    pub delivery: DeliveryMode,
    /// Deliveries kept back while the mode is `hold`, in the order made.
    pub held: Vec<(usize, Job)>,
    /// `/_local/requests`, `/_local/deliveries`.
    pub requests: Vec<Value>,
    pub deliveries: Vec<Value>,
}

impl State {
    pub fn new(api_version: String, base_url: String) -> State {
        State {
            api_version,
            base_url,
            ..State::default()
        }
    }

    /// The clock: real time plus what test clocks have advanced it by.
    pub fn now(&self) -> i64 {
        real_now() + self.offset
    }

    /// Records an event at the present time and hands it to every endpoint that
    /// wants it.
    pub fn emit(&mut self, kind: &str, object: Value, previous: Option<Value>, origin: &Origin) {
        let now = self.now();
        self.emit_at(now, kind, object, previous, origin);
    }

    pub fn emit_at(
        &mut self,
        created: i64,
        kind: &str,
        object: Value,
        previous: Option<Value>,
        origin: &Origin,
    ) {
        let targets: Vec<usize> = (0..self.endpoints.len())
            .filter(|&i| self.endpoints[i].wants(kind))
            .collect();
        let mut data = json!({ "object": object });
        if let Some(previous) = previous {
            data["previous_attributes"] = previous;
        }
        let id = new_id("evt");
        let body = json!({
            "api_version": self.api_version,
            "created": created,
            "data": data,
            "id": id,
            "livemode": false,
            "object": "event",
            "pending_webhooks": targets.len(),
            "request": { "id": origin.request_id, "idempotency_key": origin.idempotency_key },
            "type": kind,
        });
        let job = Job {
            event_id: id.clone(),
            kind: kind.to_string(),
            body: Arc::from(body.to_string()),
            delay_ms: self.delivery.delay_ms,
        };
        self.events.push(Event {
            id,
            kind: kind.to_string(),
            body,
        });
        for target in targets {
            self.deliver(target, job.clone());
        }
    }
}

/// The fields of `new` whose values differ in `old`, with the old values:
/// an `*.updated` event's `previous_attributes`.
pub fn previous_attributes(old: &Value, new: &Value) -> Option<Value> {
    let (Value::Object(old), Value::Object(new)) = (old, new) else {
        return None;
    };
    let changed: Map<String, Value> = old
        .iter()
        .filter(|(k, v)| new.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (!changed.is_empty()).then_some(Value::Object(changed))
}

/// The metadata an object is made with: what was given, less empty values.
pub fn new_metadata(given: Option<Metadata>) -> Metadata {
    let mut metadata = Metadata::new();
    merge_metadata(&mut metadata, given.unwrap_or_default());
    metadata
}

/// Merges `update` into `metadata` as Stripe does: an empty value removes the key.
pub fn merge_metadata(metadata: &mut Metadata, update: Metadata) {
    for (key, value) in update {
        if value.as_str() == Some("") {
            metadata.remove(&key);
        } else {
            metadata.insert(key, value);
        }
    }
}
