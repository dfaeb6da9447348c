//! Billing through Stripe: the catalogue Agora keeps in Stripe (a Customer per
//! organisation, a Product per agent, Prices and meters per plan), Checkout for
//! paid orders, subscription state read back from Stripe, and usage reported
//! to Stripe's meters ([`meter`]).
//!
//! **Order of events does not matter.** Stripe neither orders nor deduplicates
//! webhook deliveries, so no event's payload is trusted as the state: every
//! event about a subscription makes Agora read the subscription's current
//! state from Stripe and apply that ([`Billing::sync_subscription`]). Reads and
//! applies of one subscription are serialised (a lock per subscription in the
//! process, and a transaction-scoped advisory lock on Postgres), so a slower
//! read can never overwrite a newer one. Each event id is recorded in the
//! transaction of its effect, so a delivery seen twice takes effect once.
//!
//! **Keys follow payment.** A subscription's status decides its resource's
//! state, which the snapshot compiles into its keys' status: `active` and
//! `trialing` work, `past_due` works for the grace period and then is refused,
//! `unpaid`, `incomplete` and `paused` are refused, `canceled` is terminated. A
//! change bumps the revision, so every gateway refuses (402
//! `subscription_inactive`) or admits again within its long poll.

pub mod meter;
pub use agora_stripe_signature as signature;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use agora_config::settings::{Settings, StripeSettings, STRIPE_API};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sha2::Digest;
use sqlx::Row;
use uuid::Uuid;

use crate::db::{bump_revision, lock_for_write, now_ms, Db, Dialect};
use crate::domain::ResourceState;
use crate::error::{ApiError, ApiResult};
use crate::stripe::{Form, StripeClient, StripeError, Subscription};

/// Which Stripe the control plane talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StripeMode {
    /// Real Stripe with a test key.
    Test,
    /// Real Stripe with a live key: real money.
    Live,
    /// A Stripe stand-in on this machine: nothing leaves it.
    Local,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct BillingMetrics {
    pub webhooks_handled: AtomicU64,
    pub webhooks_duplicate: AtomicU64,
    pub webhook_failures: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    pub meter_events_sent: AtomicU64,
    pub meter_event_failures: AtomicU64,
    /// Reports written but not yet accepted by Stripe, at the last round.
    pub unreported_windows: AtomicU64,
    /// Age in seconds of the oldest unsent report, at the last round.
    pub report_lag_secs: AtomicU64,
}

impl BillingMetrics {
    pub fn webhook_failed(&self, reason: &'static str) {
        let mut failures = self
            .webhook_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *failures.entry(reason).or_default() += 1;
    }
}

/// Billing, when a Stripe secret key is configured.
pub struct Billing {
    pub client: StripeClient,
    pub publishable_key: String,
    pub mode: StripeMode,
    webhook_secret: Option<SecretString>,
    allowed_hosts: Vec<String>,
    /// How long `past_due` keeps working, ms.
    pub grace_ms: i64,
    /// Usage report window, seconds.
    pub window_secs: i64,
    pub report_every: Duration,
    locks: Vec<tokio::sync::Mutex<()>>,
    pub metrics: BillingMetrics,
}

/// Stripe's statuses that keep a subscription's keys working.
fn working(status: &str) -> bool {
    matches!(status, "active" | "trialing")
}

/// What a subscription's status makes of its resource at `now_ms`.
pub fn resource_state(
    status: &str,
    past_due_since_ms: Option<i64>,
    now_ms: i64,
    grace_ms: i64,
) -> ResourceState {
    match status {
        s if working(s) => ResourceState::Active,
        "past_due" => match past_due_since_ms {
            Some(since) if now_ms < since.saturating_add(grace_ms) => ResourceState::Active,
            _ => ResourceState::Suspended,
        },
        "canceled" | "incomplete_expired" => ResourceState::Terminated,
        _ => ResourceState::Suspended,
    }
}

/// What a sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    Applied,
    /// The event had taken effect before.
    Duplicate,
    /// Nothing of Agora's (no order named in the metadata).
    Ignored,
}

/// Why billing failed: Stripe's answer, or ours.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error(transparent)]
    Stripe(#[from] StripeError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<BillingError> for ApiError {
    fn from(e: BillingError) -> ApiError {
        match e {
            BillingError::Api(e) => e,
            BillingError::Db(e) => e.into(),
            BillingError::Stripe(e) if e.is_transient() => {
                tracing::warn!(error = %e, "stripe unavailable");
                ApiError::BadGateway {
                    code: "stripe_unavailable",
                    message: "payments are unavailable right now; retry shortly".into(),
                }
            }
            BillingError::Stripe(e) => {
                tracing::error!(error = %e, "stripe refused a request");
                ApiError::BadGateway {
                    code: "stripe_error",
                    message: "the payment provider refused the request".into(),
                }
            }
        }
    }
}

/// A short digest of `text` for idempotency keys and terms.
fn digest(text: &str) -> String {
    hex::encode(&sha2::Sha256::digest(text.as_bytes())[..6])
}

/// `cents / 1000` as Stripe's decimal amount, e.g. 25 → `0.025`.
fn per_thousand(cents: i64) -> String {
    let whole = cents / 1000;
    let frac = cents % 1000;
    if frac == 0 {
        return whole.to_string();
    }
    format!("{whole}.{frac:03}")
        .trim_end_matches('0')
        .to_owned()
}

/// A plan, as billing needs it.
struct PlanTerms {
    uuid: Uuid,
    price_cents: i64,
    currency: String,
    interval: String,
    per_1k_tokens: Option<i64>,
    per_request: Option<i64>,
}

/// A metered unit of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Tokens,
    Requests,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Tokens => "tokens",
            Unit::Requests => "requests",
        }
    }
}

impl Billing {
    /// `None` when no Stripe secret key is configured.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Option<Billing>> {
        let st: &StripeSettings = &settings.stripe;
        let Some(client) = StripeClient::from_settings(st)? else {
            return Ok(None);
        };
        let secret = st.secret_key.as_ref().map(|s| s.expose_secret().to_owned());
        let mode = if st.api_base != STRIPE_API {
            StripeMode::Local
        } else if secret.as_deref().is_some_and(|s| s.starts_with("sk_live_")) {
            StripeMode::Live
        } else {
            StripeMode::Test
        };
        let mut allowed_hosts: Vec<String> = st
            .allowed_redirect_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        if let Some(host) = settings
            .control_plane
            .public_url
            .as_deref()
            .and_then(|u| reqwest::Url::parse(u).ok())
            .and_then(|u| host_port(&u))
        {
            allowed_hosts.push(host);
        }
        Ok(Some(Billing {
            client,
            publishable_key: st.publishable_key.clone().unwrap_or_default(),
            mode,
            webhook_secret: st.webhook_secret.clone(),
            allowed_hosts,
            grace_ms: i64::try_from(st.past_due_grace_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            window_secs: i64::try_from(st.report_window_secs).unwrap_or(3600),
            report_every: Duration::from_millis(st.report_every_ms),
            locks: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            metrics: BillingMetrics::default(),
        }))
    }

    pub fn webhook_secret(&self) -> Option<&SecretString> {
        self.webhook_secret.as_ref()
    }

    /// Serialises work on one Stripe object within this process.
    async fn lock(&self, id: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let slot = u64::from_le_bytes(
            sha2::Sha256::digest(id.as_bytes())[..8]
                .try_into()
                .unwrap_or([0; 8]),
        );
        self.locks[(slot % self.locks.len() as u64) as usize]
            .lock()
            .await
    }

    /// A checkout or portal return URL: http(s), to an allowed host.
    pub fn check_return_url(&self, field: &'static str, url: &str) -> ApiResult<String> {
        let bad = || {
            ApiError::bad_request(
                "invalid_redirect_url",
                format!("{field} must be an http(s) URL to an allowed host"),
            )
        };
        if url.len() > 2048 {
            return Err(bad());
        }
        let parsed = reqwest::Url::parse(url).map_err(|_| bad())?;
        if !matches!(parsed.scheme(), "http" | "https") || !parsed.username().is_empty() {
            return Err(bad());
        }
        let host = host_port(&parsed).ok_or_else(bad)?;
        let bare = parsed.host_str().unwrap_or("").to_ascii_lowercase();
        if self.allowed_hosts.iter().any(|h| *h == host || *h == bare) {
            Ok(url.to_owned())
        } else {
            Err(bad())
        }
    }

    // ---- the catalogue in Stripe ----

    /// The organisation's Customer, made once (an idempotency key per
    /// organisation makes concurrent first checkouts make one).
    pub async fn ensure_customer(&self, db: &Db, org: Uuid) -> Result<String, BillingError> {
        if let Some(id) = customer_of(db, org).await? {
            return Ok(id);
        }
        let name: String = sqlx::query("SELECT name FROM organizations WHERE uuid = $1")
            .bind(org.to_string())
            .fetch_one(&db.pool)
            .await?
            .try_get("name")?;
        let customer: crate::stripe::Customer = self
            .client
            .post(
                "/v1/customers",
                &Form::new()
                    .set("name", &name)
                    .set("metadata[org_uuid]", org),
                &format!("agora-customer-{org}"),
            )
            .await?;
        sqlx::query("INSERT INTO stripe_customers (org_uuid, uuid, stripe_id, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (org_uuid) DO NOTHING")
            .bind(org.to_string())
            .bind(Uuid::new_v4().to_string())
            .bind(&customer.id)
            .bind(now_ms())
            .execute(&db.pool)
            .await?;
        Ok(customer_of(db, org).await?.unwrap_or(customer.id))
    }

    /// The agent's Product, renamed when the agent was.
    async fn ensure_product(&self, db: &Db, agent: Uuid) -> Result<String, BillingError> {
        let name: String = sqlx::query("SELECT name FROM provider_agents WHERE uuid = $1")
            .bind(agent.to_string())
            .fetch_one(&db.pool)
            .await?
            .try_get("name")?;
        let stored =
            sqlx::query("SELECT stripe_id, name FROM stripe_products WHERE agent_uuid = $1")
                .bind(agent.to_string())
                .fetch_optional(&db.pool)
                .await?;
        if let Some(row) = stored {
            let id: String = row.try_get("stripe_id")?;
            if row.try_get::<String, _>("name")? != name {
                let _: crate::stripe::Product = self
                    .client
                    .post(
                        &format!("/v1/products/{id}"),
                        &Form::new().set("name", &name),
                        &format!("agora-product-{agent}-{}", digest(&name)),
                    )
                    .await?;
                sqlx::query("UPDATE stripe_products SET name = $2 WHERE agent_uuid = $1")
                    .bind(agent.to_string())
                    .bind(&name)
                    .execute(&db.pool)
                    .await?;
            }
            return Ok(id);
        }
        let product: crate::stripe::Product = self
            .client
            .post(
                "/v1/products",
                &Form::new()
                    .set("name", &name)
                    .set("metadata[agent_uuid]", agent),
                &format!("agora-product-{agent}"),
            )
            .await?;
        sqlx::query("INSERT INTO stripe_products (agent_uuid, stripe_id, name, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (agent_uuid) DO NOTHING")
            .bind(agent.to_string())
            .bind(&product.id)
            .bind(&name)
            .bind(now_ms())
            .execute(&db.pool)
            .await?;
        Ok(product.id)
    }

    /// The plan's meter for `unit`, made once.
    async fn ensure_meter(
        &self,
        db: &Db,
        plan: Uuid,
        unit: Unit,
    ) -> Result<(String, String), BillingError> {
        let stored = sqlx::query("SELECT meter_id, meter_event FROM stripe_prices WHERE plan_uuid = $1 AND kind = $2 AND meter_id IS NOT NULL")
            .bind(plan.to_string())
            .bind(unit.as_str())
            .fetch_optional(&db.pool)
            .await?;
        if let Some(row) = stored {
            return Ok((row.try_get("meter_id")?, row.try_get("meter_event")?));
        }
        let event_name = format!("agora_{}_{}", plan.simple(), unit.as_str());
        let meter: crate::stripe::Meter = self
            .client
            .post(
                "/v1/billing/meters",
                &Form::new()
                    .set("display_name", format!("Agora {} ({plan})", unit.as_str()))
                    .set("event_name", &event_name)
                    .set("default_aggregation[formula]", "sum")
                    .set("customer_mapping[event_payload_key]", "stripe_customer_id")
                    .set("customer_mapping[type]", "by_id")
                    .set("value_settings[event_payload_key]", "value"),
                &format!("agora-meter-{plan}-{}", unit.as_str()),
            )
            .await?;
        Ok((meter.id, meter.event_name))
    }

    /// The plan's active Prices (base first, then metered ones), made or
    /// replaced when the plan's terms differ from what they were made with.
    async fn ensure_prices(
        &self,
        db: &Db,
        plan: &PlanTerms,
        product: &str,
    ) -> Result<Vec<(String, bool)>, BillingError> {
        let mut prices = Vec::new();
        if plan.price_cents > 0 {
            let terms = format!(
                "{} {} per {}",
                plan.price_cents, plan.currency, plan.interval
            );
            let form = Form::new()
                .set("product", product)
                .set("currency", &plan.currency)
                .set("unit_amount", plan.price_cents)
                .set("recurring[interval]", &plan.interval)
                .set("recurring[usage_type]", "licensed")
                .set("metadata[plan_uuid]", plan.uuid);
            prices.push((
                self.ensure_price(db, plan.uuid, "base", &terms, form, None)
                    .await?,
                false,
            ));
        }
        for (unit, cents, per) in [
            (Unit::Tokens, plan.per_1k_tokens.map(per_thousand), "token"),
            (
                Unit::Requests,
                plan.per_request.map(|c| c.to_string()),
                "request",
            ),
        ] {
            let Some(amount) = cents else { continue };
            let (meter, event) = self.ensure_meter(db, plan.uuid, unit).await?;
            let terms = format!(
                "{amount} {} cents per {per} per {} on {meter}",
                plan.currency, plan.interval
            );
            let form = Form::new()
                .set("product", product)
                .set("currency", &plan.currency)
                .set("unit_amount_decimal", &amount)
                .set("recurring[interval]", &plan.interval)
                .set("recurring[usage_type]", "metered")
                .set("recurring[meter]", &meter)
                .set("metadata[plan_uuid]", plan.uuid)
                .set("metadata[unit]", unit.as_str());
            prices.push((
                self.ensure_price(
                    db,
                    plan.uuid,
                    unit.as_str(),
                    &terms,
                    form,
                    Some((&meter, &event)),
                )
                .await?,
                true,
            ));
        }
        Ok(prices)
    }

    async fn ensure_price(
        &self,
        db: &Db,
        plan: Uuid,
        kind: &str,
        terms: &str,
        form: Form,
        meter: Option<(&str, &str)>,
    ) -> Result<String, BillingError> {
        let stored = sqlx::query("SELECT stripe_id, terms FROM stripe_prices WHERE plan_uuid = $1 AND kind = $2 AND active = 1")
            .bind(plan.to_string())
            .bind(kind)
            .fetch_all(&db.pool)
            .await?;
        let mut current = None;
        for row in &stored {
            let id: String = row.try_get("stripe_id")?;
            if row.try_get::<String, _>("terms")? == terms && current.is_none() {
                current = Some(id);
                continue;
            }
            // Terms changed: the old Price is archived (subscriptions on it keep it).
            let _: crate::stripe::Price = self
                .client
                .post(
                    &format!("/v1/prices/{id}"),
                    &Form::new().set("active", "false"),
                    &format!("agora-archive-{id}"),
                )
                .await?;
            sqlx::query("UPDATE stripe_prices SET active = 0 WHERE stripe_id = $1")
                .bind(&id)
                .execute(&db.pool)
                .await?;
        }
        if let Some(id) = current {
            return Ok(id);
        }
        let price: crate::stripe::Price = self
            .client
            .post(
                "/v1/prices",
                &form,
                &format!("agora-price-{plan}-{kind}-{}", digest(terms)),
            )
            .await?;
        sqlx::query("INSERT INTO stripe_prices (stripe_id, plan_uuid, kind, terms, meter_id, meter_event, active, created_at) VALUES ($1, $2, $3, $4, $5, $6, 1, $7) ON CONFLICT (stripe_id) DO NOTHING")
            .bind(&price.id)
            .bind(plan.to_string())
            .bind(kind)
            .bind(terms)
            .bind(meter.map(|m| m.0))
            .bind(meter.map(|m| m.1))
            .bind(now_ms())
            .execute(&db.pool)
            .await?;
        Ok(price.id)
    }

    // ---- checkout ----

    /// A Checkout Session for a pending order: the open one when there is
    /// one, else a new one.
    pub async fn checkout(
        &self,
        db: &Db,
        order: Uuid,
        success_url: &str,
        cancel_url: &str,
    ) -> Result<(String, String), BillingError> {
        let _guard = self.lock(&order.to_string()).await;
        let row = sqlx::query(
            "SELECT o.org_uuid, o.agent_uuid, o.plan_uuid, o.state, p.price_cents, p.currency, p.billing_interval, \
                    p.usage_cents_per_1k_tokens, p.usage_cents_per_request \
             FROM orders o JOIN pricing_plans p ON p.uuid = o.plan_uuid WHERE o.uuid = $1",
        )
        .bind(order.to_string())
        .fetch_one(&db.pool)
        .await?;
        if row.try_get::<String, _>("state")? != "pending_payment" {
            return Err(ApiError::conflict(
                "order_not_pending",
                "the order is not waiting for payment",
            )
            .into());
        }
        let open = sqlx::query("SELECT stripe_id, url FROM checkout_sessions WHERE order_uuid = $1 AND expires_at > $2 ORDER BY created_at DESC")
            .bind(order.to_string())
            .bind(now_ms() + 60_000)
            .fetch_optional(&db.pool)
            .await?;
        if let Some(open) = open {
            let id: String = open.try_get("stripe_id")?;
            let session = self.client.checkout_session(&id).await?;
            if session.status.as_deref() == Some("open") {
                return Ok((id, open.try_get("url")?));
            }
        }
        let org = crate::db::uuid_col(&row, "org_uuid")?;
        let agent = crate::db::uuid_col(&row, "agent_uuid")?;
        let plan = PlanTerms {
            uuid: crate::db::uuid_col(&row, "plan_uuid")?,
            price_cents: row.try_get("price_cents")?,
            currency: row.try_get("currency")?,
            interval: row.try_get("billing_interval")?,
            per_1k_tokens: row.try_get("usage_cents_per_1k_tokens")?,
            per_request: row.try_get("usage_cents_per_request")?,
        };
        if plan.per_1k_tokens.is_some() || plan.per_request.is_some() {
            // A meter sums per customer: one live subscription per organisation
            // and metered plan keeps each subscription's usage its own.
            let live = sqlx::query("SELECT uuid FROM subscriptions WHERE org_uuid = $1 AND plan_uuid = $2 AND status NOT IN ('canceled', 'incomplete_expired')")
                .bind(org.to_string())
                .bind(plan.uuid.to_string())
                .fetch_optional(&db.pool)
                .await?;
            if live.is_some() {
                return Err(ApiError::conflict(
                    "already_subscribed",
                    "the organization already has a subscription to this plan",
                )
                .into());
            }
        }
        let customer = self.ensure_customer(db, org).await?;
        let product = self.ensure_product(db, agent).await?;
        let prices = self.ensure_prices(db, &plan, &product).await?;
        let made: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM checkout_sessions WHERE order_uuid = $1")
                .bind(order.to_string())
                .fetch_one(&db.pool)
                .await?
                .try_get("n")?;
        let mut form = Form::new()
            .set("mode", "subscription")
            .set("customer", &customer)
            .set("success_url", success_url)
            .set("cancel_url", cancel_url)
            .set("client_reference_id", order)
            .set("metadata[order_uuid]", order)
            .set("subscription_data[metadata][order_uuid]", order)
            .set("subscription_data[metadata][org_uuid]", org);
        for (i, (price, metered)) in prices.iter().enumerate() {
            form = form.set(format!("line_items[{i}][price]"), price);
            if !metered {
                form = form.set(format!("line_items[{i}][quantity]"), 1);
            }
        }
        let session: crate::stripe::CheckoutSession = self
            .client
            .post(
                "/v1/checkout/sessions",
                &form,
                &format!(
                    "agora-checkout-{order}-{made}-{}",
                    digest(&format!("{success_url} {cancel_url}"))
                ),
            )
            .await?;
        let url = session
            .url
            .clone()
            .ok_or_else(|| StripeError::Decode("checkout session without url".into()))?;
        sqlx::query("INSERT INTO checkout_sessions (stripe_id, order_uuid, url, expires_at, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (stripe_id) DO NOTHING")
            .bind(&session.id)
            .bind(order.to_string())
            .bind(&url)
            .bind(session.expires_at.saturating_mul(1000))
            .bind(now_ms())
            .execute(&db.pool)
            .await?;
        Ok((session.id, url))
    }

    // ---- state from Stripe ----

    /// Reads subscription `stripe_id` from Stripe and applies it: the
    /// subscription row, the order completed once the subscription works, the
    /// resource's state. `event`, when given, is recorded in the same
    /// transaction; an event recorded before is a [`Synced::Duplicate`].
    pub async fn sync_subscription(
        &self,
        db: &Db,
        stripe_id: &str,
        event: Option<(&str, &str)>,
    ) -> Result<Synced, BillingError> {
        let _guard = self.lock(stripe_id).await;
        if db.dialect == Dialect::Sqlite {
            // One process has a SQLite database, so the lock above serialises
            // this subscription. Stripe is read before the transaction: on
            // SQLite a transaction that reads and then writes fails (busy)
            // when another writer committed in between, and one that took the
            // write lock first would hold it over the call to Stripe.
            if let Some((id, _)) = event {
                if seen(&mut *db.pool.acquire().await?, id).await? {
                    return Ok(Synced::Duplicate);
                }
            }
            let subscription = self.client.subscription(stripe_id).await?;
            let mut tx = db.pool.begin().await?;
            let outcome = self.apply(&mut tx, &subscription, event).await?;
            tx.commit().await?;
            return Ok(outcome);
        }
        let mut tx = db.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(stripe_id)
            .execute(&mut *tx)
            .await?;
        if let Some((id, _)) = event {
            if seen(&mut tx, id).await? {
                return Ok(Synced::Duplicate);
            }
        }
        let subscription = self.client.subscription(stripe_id).await?;
        let outcome = self.apply(&mut tx, &subscription, event).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    async fn apply(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        subscription: &Subscription,
        event: Option<(&str, &str)>,
    ) -> Result<Synced, BillingError> {
        lock_for_write(tx).await?;
        if let Some((id, kind)) = event {
            if !record_event(tx, id, kind).await? {
                return Ok(Synced::Duplicate);
            }
        }
        let Some(order) = subscription
            .metadata
            .get("order_uuid")
            .and_then(|o| o.parse::<Uuid>().ok())
        else {
            return Ok(Synced::Ignored);
        };
        let Some(row) = sqlx::query(
            "SELECT org_uuid, plan_uuid, state, config_name FROM orders WHERE uuid = $1",
        )
        .bind(order.to_string())
        .fetch_optional(&mut **tx)
        .await?
        else {
            tracing::warn!(subscription = %subscription.id, %order, "a subscription names an order that does not exist");
            return Ok(Synced::Ignored);
        };
        let now = now_ms();
        let (start, end) = subscription
            .period()
            .ok_or_else(|| StripeError::Decode("subscription without items".into()))?;
        let (start, end) = (start.saturating_mul(1000), end.saturating_mul(1000));
        let existing = sqlx::query("SELECT uuid, current_period_start, previous_period_start, past_due_since FROM subscriptions WHERE stripe_id = $1")
            .bind(&subscription.id)
            .fetch_optional(&mut **tx)
            .await?;
        let status = subscription.status.as_str();
        let past_due_since = match (&existing, status) {
            (Some(row), "past_due") => Some(
                row.try_get::<Option<i64>, _>("past_due_since")?
                    .unwrap_or(now),
            ),
            (None, "past_due") => Some(now),
            _ => None,
        };
        match &existing {
            Some(row) => {
                let stored_start: i64 = row.try_get("current_period_start")?;
                let previous = if stored_start != start && start > stored_start {
                    Some(stored_start)
                } else {
                    row.try_get::<Option<i64>, _>("previous_period_start")?
                };
                sqlx::query("UPDATE subscriptions SET status = $2, current_period_start = $3, current_period_end = $4, previous_period_start = $5, cancel_at_period_end = $6, canceled_at = $7, past_due_since = $8, updated_at = $9 WHERE stripe_id = $1")
                    .bind(&subscription.id)
                    .bind(status)
                    .bind(start.max(stored_start))
                    .bind(end)
                    .bind(previous)
                    .bind(i64::from(subscription.cancel_at_period_end))
                    .bind(subscription.canceled_at.map(|t| t.saturating_mul(1000)))
                    .bind(past_due_since)
                    .bind(now)
                    .execute(&mut **tx)
                    .await?;
            }
            None => {
                sqlx::query("INSERT INTO subscriptions (uuid, org_uuid, order_uuid, plan_uuid, stripe_id, stripe_customer, status, current_period_start, current_period_end, cancel_at_period_end, canceled_at, past_due_since, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13)")
                    .bind(Uuid::new_v4().to_string())
                    .bind(row.try_get::<String, _>("org_uuid")?)
                    .bind(order.to_string())
                    .bind(row.try_get::<String, _>("plan_uuid")?)
                    .bind(&subscription.id)
                    .bind(subscription.customer.id())
                    .bind(status)
                    .bind(start)
                    .bind(end)
                    .bind(i64::from(subscription.cancel_at_period_end))
                    .bind(subscription.canceled_at.map(|t| t.saturating_mul(1000)))
                    .bind(past_due_since)
                    .bind(now)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        if row.try_get::<String, _>("state")? == "pending_payment" && working(status) {
            let name = row
                .try_get::<Option<String>, _>("config_name")?
                .unwrap_or_else(|| "My agent".into());
            crate::routes::marketplace::complete_order(tx, order, &name).await?;
        }
        let state = resource_state(status, past_due_since, now, self.grace_ms);
        set_resource_state(tx, order, state).await?;
        Ok(Synced::Applied)
    }

    /// A Checkout Session that expired: its order is cancelled, unless it was
    /// paid meanwhile or another session of it is still open.
    pub async fn sync_expired_checkout(
        &self,
        db: &Db,
        session_id: &str,
        event: (&str, &str),
    ) -> Result<Synced, BillingError> {
        let session = self.client.checkout_session(session_id).await?;
        let mut tx = db.pool.begin().await?;
        lock_for_write(&mut tx).await?;
        if !record_event(&mut tx, event.0, event.1).await? {
            return Ok(Synced::Duplicate);
        }
        let order = session
            .metadata
            .get("order_uuid")
            .or(session.client_reference_id.as_ref())
            .and_then(|o| o.parse::<Uuid>().ok());
        if let (Some(order), Some("expired")) = (order, session.status.as_deref()) {
            sqlx::query(
                "UPDATE orders SET state = 'cancelled' WHERE uuid = $1 AND state = 'pending_payment' \
                 AND NOT EXISTS (SELECT 1 FROM subscriptions s WHERE s.order_uuid = $1) \
                 AND NOT EXISTS (SELECT 1 FROM checkout_sessions c WHERE c.order_uuid = $1 AND c.stripe_id <> $2 AND c.expires_at > $3)",
            )
            .bind(order.to_string())
            .bind(&session.id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Synced::Applied)
    }

    /// Records an event that needs no effect, once.
    pub async fn acknowledge(&self, db: &Db, event: (&str, &str)) -> Result<Synced, BillingError> {
        let mut tx = db.pool.begin().await?;
        lock_for_write(&mut tx).await?;
        let fresh = record_event(&mut tx, event.0, event.1).await?;
        tx.commit().await?;
        Ok(if fresh {
            Synced::Ignored
        } else {
            Synced::Duplicate
        })
    }

    /// Suspends `past_due` subscriptions whose grace period has passed.
    pub async fn end_grace_periods(&self, db: &Db) -> Result<usize, BillingError> {
        let now = now_ms();
        let due = sqlx::query(
            "SELECT s.order_uuid FROM subscriptions s JOIN resources r ON r.order_uuid = s.order_uuid \
             WHERE s.status = 'past_due' AND r.state = 'active' AND s.past_due_since IS NOT NULL AND s.past_due_since <= $1",
        )
        .bind(now.saturating_sub(self.grace_ms))
        .fetch_all(&db.pool)
        .await?;
        for row in &due {
            let order = crate::db::uuid_col(row, "order_uuid")?;
            let mut tx = db.pool.begin().await?;
            lock_for_write(&mut tx).await?;
            set_resource_state(&mut tx, order, ResourceState::Suspended).await?;
            tx.commit().await?;
        }
        Ok(due.len())
    }
}

/// Forgets the catalogue made in Stripe (customers, products, prices, open
/// checkouts), for a Stripe that keeps nothing between runs (the local
/// stand-in): each is made again when next needed.
pub async fn forget_catalog(db: &Db) -> Result<(), sqlx::Error> {
    let mut tx = db.pool.begin().await?;
    lock_for_write(&mut tx).await?;
    for table in [
        "checkout_sessions",
        "stripe_prices",
        "stripe_products",
        "stripe_customers",
    ] {
        sqlx::query(&format!("DELETE FROM {table}"))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// `host[:port]` of a URL, lowercased, the port only when not the scheme's.
fn host_port(url: &reqwest::Url) -> Option<String> {
    let host = url.host_str()?.to_ascii_lowercase();
    Some(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    })
}

async fn customer_of(db: &Db, org: Uuid) -> Result<Option<String>, sqlx::Error> {
    sqlx::query("SELECT stripe_id FROM stripe_customers WHERE org_uuid = $1")
        .bind(org.to_string())
        .fetch_optional(&db.pool)
        .await?
        .map(|r| r.try_get("stripe_id"))
        .transpose()
}

async fn seen(conn: &mut sqlx::AnyConnection, event: &str) -> Result<bool, sqlx::Error> {
    Ok(
        sqlx::query("SELECT 1 AS one FROM stripe_events WHERE event_id = $1")
            .bind(event)
            .fetch_optional(&mut *conn)
            .await?
            .is_some(),
    )
}

/// Records an event id; `false` when it was recorded before.
async fn record_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    event: &str,
    kind: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("INSERT INTO stripe_events (event_id, type, received_at) VALUES ($1, $2, $3) ON CONFLICT (event_id) DO NOTHING")
        .bind(event)
        .bind(kind)
        .bind(now_ms())
        .execute(&mut **tx)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Sets the order's resource state, with a new revision when it changed.
async fn set_resource_state(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    order: Uuid,
    state: ResourceState,
) -> Result<(), sqlx::Error> {
    // Terminated stays terminated.
    let changed = sqlx::query("UPDATE resources SET state = $2 WHERE order_uuid = $1 AND state <> $2 AND state <> 'terminated'")
        .bind(order.to_string())
        .bind(state.as_str())
        .execute(&mut **tx)
        .await?;
    if changed.rows_affected() > 0 {
        bump_revision(tx).await?;
    }
    Ok(())
}

/// Starts the billing round: usage reports and ended grace periods, every
/// `report_every`; a failed round is logged and the next tries again.
pub fn start(billing: Arc<Billing>, db: Db, store: Option<Arc<dyn agora_usage::UsageStore>>) {
    tokio::spawn(async move {
        let every = billing.report_every;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = billing.end_grace_periods(&db).await {
                tracing::warn!(error = %e, "ending grace periods failed");
            }
            if let Some(store) = &store {
                if let Err(e) = meter::report_once(&billing, &db, store.as_ref(), now_ms()).await {
                    tracing::warn!(error = %e, "usage reporting failed; it is retried next round");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_statuses_keep_keys_working_and_lapsed_ones_do_not() {
        let (now, grace) = (1_000_000, 10_000);
        assert_eq!(
            resource_state("active", None, now, grace),
            ResourceState::Active
        );
        assert_eq!(
            resource_state("trialing", None, now, grace),
            ResourceState::Active
        );
        for lapsed in ["unpaid", "incomplete", "paused"] {
            assert_eq!(
                resource_state(lapsed, None, now, grace),
                ResourceState::Suspended
            );
        }
        assert_eq!(
            resource_state("canceled", None, now, grace),
            ResourceState::Terminated
        );
        assert_eq!(
            resource_state("incomplete_expired", None, now, grace),
            ResourceState::Terminated
        );
    }

    #[test]
    fn past_due_works_until_the_grace_period_ends() {
        let grace = 10_000;
        assert_eq!(
            resource_state("past_due", Some(1_000), 10_999, grace),
            ResourceState::Active
        );
        assert_eq!(
            resource_state("past_due", Some(1_000), 11_000, grace),
            ResourceState::Suspended
        );
        assert_eq!(
            resource_state("past_due", Some(1_000), 5_000, 0),
            ResourceState::Suspended
        );
    }

    #[test]
    fn cents_per_thousand_become_stripes_decimal_amounts() {
        assert_eq!(per_thousand(25), "0.025");
        assert_eq!(per_thousand(2), "0.002");
        assert_eq!(per_thousand(250), "0.25");
        assert_eq!(per_thousand(1000), "1");
        assert_eq!(per_thousand(1500), "1.5");
    }
}
