//! Payments: Stripe's configuration for browsers, Checkout for paid orders,
//! the webhook, and the buyer's customers, subscriptions, payment methods and
//! portal. The work is in [`crate::billing`]; these handlers check the caller
//! and the input.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{Owned, PageQuery, ALL};
use crate::billing::{signature, Billing, StripeMode, Synced};
use crate::db::{opt_uuid_col, uuid_col};
use crate::domain::{opt_ts, ts, OrgKind, Page, Paged};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiBytes, ApiJson, ApiPath, ApiQuery, Caller};
use crate::stripe::{Event, Form, List, PaymentMethod, PortalSession};
use crate::AppState;

fn billing(app: &AppState) -> ApiResult<&Arc<Billing>> {
    app.billing.as_ref().ok_or_else(|| {
        ApiError::unavailable(
            "billing_unavailable",
            "payments are not configured on this server",
        )
    })
}

/// What a browser needs to start a payment.
#[derive(Serialize, schemars::JsonSchema)]
pub struct StripeConfig {
    /// Whether payments are configured.
    enabled: bool,
    publishable_key: Option<String>,
    /// `test`, `live` or `local` (a stand-in on the server's machine: nothing
    /// leaves it).
    mode: Option<StripeMode>,
}

pub async fn stripe_config(State(app): State<AppState>) -> Json<StripeConfig> {
    Json(match &app.billing {
        Some(b) => StripeConfig {
            enabled: true,
            publishable_key: Some(b.publishable_key.clone()),
            mode: Some(b.mode),
        },
        None => StripeConfig {
            enabled: false,
            publishable_key: None,
            mode: None,
        },
    })
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    order_uuid: Uuid,
    success_url: String,
    cancel_url: String,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct CheckoutAnswer {
    session_id: String,
    /// Where to send the buyer to pay.
    url: String,
}

/// A Checkout Session for one of your organization's pending orders.
pub async fn checkout(
    State(app): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CheckoutRequest>,
) -> ApiResult<Json<CheckoutAnswer>> {
    let billing = billing(&app)?;
    let order = super::marketplace::ORDERS
        .one(&app.db, &caller, body.order_uuid)
        .await?;
    caller.require_admin(uuid_col(&order, "org_uuid")?)?;
    let success_url = billing.check_return_url("success_url", &body.success_url)?;
    let cancel_url = billing.check_return_url("cancel_url", &body.cancel_url)?;
    let (session_id, url) = billing
        .checkout(&app.db, body.order_uuid, &success_url, &cancel_url)
        .await?;
    Ok(Json(CheckoutAnswer { session_id, url }))
}

/// What Stripe is answered.
#[derive(Serialize, schemars::JsonSchema)]
pub struct WebhookAnswer {
    received: bool,
    /// The event had taken effect before.
    duplicate: bool,
}

/// Stripe's deliveries: signature checked over the raw body, each event id
/// taking effect once, the objects' current state read back from Stripe.
pub async fn webhook(
    State(app): State<AppState>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Json<WebhookAnswer>> {
    let billing = billing(&app)?;
    let Some(secret) = billing.webhook_secret() else {
        return Err(ApiError::unavailable(
            "webhooks_unavailable",
            "no webhook secret is configured",
        ));
    };
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    use secrecy::ExposeSecret;
    if let Err(e) = signature::verify(
        header,
        &body,
        secret.expose_secret().as_bytes(),
        crate::db::now_ms() / 1000,
    ) {
        billing.metrics.webhook_failed(e.reason());
        return Err(ApiError::bad_request("invalid_signature", e.to_string()));
    }
    let event: Event = serde_json::from_slice(&body).map_err(|_| {
        billing.metrics.webhook_failed("bad_event");
        ApiError::bad_request("invalid_event", "the body is not a Stripe event")
    })?;
    let object_id = event
        .data
        .object
        .get("id")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_owned();
    let key = (event.id.as_str(), event.kind.as_str());
    let outcome = match event.kind.as_str() {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            let session = billing.client.checkout_session(&object_id).await;
            match session.map(|s| s.subscription.map(|x| x.id().to_owned())) {
                Ok(Some(subscription)) => {
                    billing
                        .sync_subscription(&app.db, &subscription, Some(key))
                        .await
                }
                Ok(None) => billing.acknowledge(&app.db, key).await,
                Err(e) => Err(e.into()),
            }
        }
        "checkout.session.expired" => {
            billing
                .sync_expired_checkout(&app.db, &object_id, key)
                .await
        }
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted"
        | "customer.subscription.paused"
        | "customer.subscription.resumed" => {
            billing
                .sync_subscription(&app.db, &object_id, Some(key))
                .await
        }
        "invoice.paid" | "invoice.payment_failed" | "invoice.payment_succeeded" => {
            let invoice: Option<crate::stripe::Invoice> =
                serde_json::from_value(event.data.object.clone()).ok();
            match invoice.as_ref().and_then(|i| i.subscription_id()) {
                Some(subscription) => {
                    billing
                        .sync_subscription(&app.db, subscription, Some(key))
                        .await
                }
                None => billing.acknowledge(&app.db, key).await,
            }
        }
        _ => billing.acknowledge(&app.db, key).await,
    };
    match outcome {
        Ok(outcome) => {
            let duplicate = outcome == Synced::Duplicate;
            let counter = if duplicate {
                &billing.metrics.webhooks_duplicate
            } else {
                &billing.metrics.webhooks_handled
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Json(WebhookAnswer {
                received: true,
                duplicate,
            }))
        }
        Err(e) => {
            // Stripe retries a failed delivery; nothing was recorded.
            billing.metrics.webhook_failed("handling_failed");
            tracing::warn!(event = %event.id, kind = %event.kind, error = %e, "a webhook could not be handled; Stripe will retry");
            Err(e.into())
        }
    }
}

/// An organization's Stripe customer.
#[derive(Serialize, schemars::JsonSchema)]
pub struct CustomerAnswer {
    uuid: Uuid,
    organization: Uuid,
    stripe_customer: String,
    created_at: String,
}

const CUSTOMERS: Owned = Owned {
    select: "sc.*",
    from: "FROM stripe_customers sc",
    id: "sc.uuid",
    org: "sc.org_uuid",
    what: "customer",
};

fn customer_json(row: &AnyRow) -> ApiResult<CustomerAnswer> {
    Ok(CustomerAnswer {
        uuid: uuid_col(row, "uuid")?,
        organization: uuid_col(row, "org_uuid")?,
        stripe_customer: row.try_get("stripe_id")?,
        created_at: ts(row.try_get("created_at")?),
    })
}

pub async fn list_customers(
    State(app): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<Paged<CustomerAnswer>>> {
    let page = Page::new(q.page, q.page_size, app.limits.max_page_size)?;
    Ok(Json(
        CUSTOMERS
            .page(
                &app.db,
                &caller,
                page,
                ALL,
                "sc.created_at DESC, sc.uuid",
                customer_json,
            )
            .await?,
    ))
}

/// A paid order's subscription, as last read from Stripe.
#[derive(Serialize, schemars::JsonSchema)]
pub struct SubscriptionAnswer {
    uuid: Uuid,
    organization: Uuid,
    order: Uuid,
    plan: Uuid,
    resource: Option<Uuid>,
    config: Option<Uuid>,
    stripe_subscription: String,
    /// Stripe's status: `active`, `trialing`, `past_due`, `unpaid`,
    /// `canceled`, `incomplete`, `incomplete_expired` or `paused`.
    status: String,
    /// Whether the subscription's keys work (follows the status and, for
    /// `past_due`, the grace period).
    resource_state: Option<String>,
    current_period_start: String,
    current_period_end: String,
    cancel_at_period_end: bool,
    canceled_at: Option<String>,
    past_due_since: Option<String>,
    created_at: String,
}

const SUBSCRIPTIONS: Owned = Owned {
    select: "s.*, r.uuid AS resource_uuid, r.state AS resource_state, c.uuid AS config_uuid",
    from: "FROM subscriptions s LEFT JOIN resources r ON r.order_uuid = s.order_uuid LEFT JOIN agent_configs c ON c.resource_uuid = r.uuid",
    id: "s.uuid",
    org: "s.org_uuid",
    what: "subscription",
};

fn subscription_json(row: &AnyRow) -> ApiResult<SubscriptionAnswer> {
    Ok(SubscriptionAnswer {
        uuid: uuid_col(row, "uuid")?,
        organization: uuid_col(row, "org_uuid")?,
        order: uuid_col(row, "order_uuid")?,
        plan: uuid_col(row, "plan_uuid")?,
        resource: opt_uuid_col(row, "resource_uuid")?,
        config: opt_uuid_col(row, "config_uuid")?,
        stripe_subscription: row.try_get("stripe_id")?,
        status: row.try_get("status")?,
        resource_state: row.try_get("resource_state")?,
        current_period_start: ts(row.try_get("current_period_start")?),
        current_period_end: ts(row.try_get("current_period_end")?),
        cancel_at_period_end: row.try_get::<i64, _>("cancel_at_period_end")? != 0,
        canceled_at: opt_ts(row.try_get("canceled_at")?),
        past_due_since: opt_ts(row.try_get("past_due_since")?),
        created_at: ts(row.try_get("created_at")?),
    })
}

pub async fn list_subscriptions(
    State(app): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<Paged<SubscriptionAnswer>>> {
    let page = Page::new(q.page, q.page_size, app.limits.max_page_size)?;
    Ok(Json(
        SUBSCRIPTIONS
            .page(
                &app.db,
                &caller,
                page,
                ALL,
                "s.created_at DESC, s.uuid",
                subscription_json,
            )
            .await?,
    ))
}

fn at_period_end_default() -> bool {
    true
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// `true` (the default): keys work until the period ends; `false`: now.
    #[serde(default = "at_period_end_default")]
    at_period_end: bool,
}

/// Cancels a subscription at its period's end (the default) or now.
pub async fn cancel_subscription(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(uuid): ApiPath<Uuid>,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Json<SubscriptionAnswer>> {
    // The body is optional: none cancels at the period's end.
    let request: CancelRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CancelRequest {
            at_period_end: true,
        }
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request("invalid_json", format!("the body is not valid: {e}"))
        })?
    };
    let row = SUBSCRIPTIONS.one(&app.db, &caller, uuid).await?;
    caller.require_admin(uuid_col(&row, "org_uuid")?)?;
    let billing = billing(&app)?;
    let at_period_end = request.at_period_end;
    let stripe_id: String = row.try_get("stripe_id")?;
    if row.try_get::<String, _>("status")? == "canceled" {
        return Err(ApiError::conflict(
            "subscription_canceled",
            "the subscription is already canceled",
        ));
    }
    let path = format!("/v1/subscriptions/{stripe_id}");
    let result: Result<serde_json::Value, _> = if at_period_end {
        billing
            .client
            .post(
                &path,
                &Form::new().set("cancel_at_period_end", "true"),
                &format!("agora-cancel-{stripe_id}-end"),
            )
            .await
    } else {
        billing.client.delete(&path).await
    };
    result.map_err(crate::billing::BillingError::from)?;
    billing.sync_subscription(&app.db, &stripe_id, None).await?;
    Ok(Json(subscription_json(
        &SUBSCRIPTIONS.one(&app.db, &caller, uuid).await?,
    )?))
}

/// A card on file, as Stripe shows it (never the number).
#[derive(Serialize, schemars::JsonSchema)]
pub struct PaymentMethodAnswer {
    id: String,
    organization: Uuid,
    #[serde(rename = "type")]
    kind: String,
    brand: Option<String>,
    last4: Option<String>,
    exp_month: Option<i64>,
    exp_year: Option<i64>,
}

/// The payment methods of your organizations' Stripe customers.
pub async fn list_payment_methods(
    State(app): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<PaymentMethodAnswer>>> {
    let billing = billing(&app)?;
    let page = Page::new(Some(1), Some(100), 100)?;
    let customers = CUSTOMERS
        .page(
            &app.db,
            &caller,
            page,
            ALL,
            "sc.created_at, sc.uuid",
            customer_json,
        )
        .await?;
    let mut out = Vec::new();
    for customer in customers.results {
        let methods: List<PaymentMethod> = billing
            .client
            .get(
                "/v1/payment_methods",
                &Form::new()
                    .set("customer", &customer.stripe_customer)
                    .set("type", "card")
                    .set("limit", 100),
            )
            .await
            .map_err(crate::billing::BillingError::from)?;
        out.extend(methods.data.into_iter().map(|m| PaymentMethodAnswer {
            id: m.id,
            organization: customer.organization,
            kind: m.kind,
            brand: m.card.as_ref().map(|c| c.brand.clone()),
            last4: m.card.as_ref().map(|c| c.last4.clone()),
            exp_month: m.card.as_ref().map(|c| c.exp_month),
            exp_year: m.card.as_ref().map(|c| c.exp_year),
        }));
    }
    Ok(Json(out))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortalRequest {
    /// Defaults to your one customer organization.
    organization: Option<Uuid>,
    return_url: String,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct PortalAnswer {
    /// Stripe's customer portal for the organization, for a short while.
    url: String,
}

/// A link to Stripe's customer portal (cards, invoices, cancellation).
pub async fn portal(
    State(app): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<PortalRequest>,
) -> ApiResult<Json<PortalAnswer>> {
    let billing = billing(&app)?;
    let org = caller.org_of_kind(OrgKind::Customer, body.organization)?;
    caller.require_admin(org)?;
    let return_url = billing.check_return_url("return_url", &body.return_url)?;
    let customer = sqlx::query("SELECT stripe_id FROM stripe_customers WHERE org_uuid = $1")
        .bind(org.to_string())
        .fetch_optional(&app.db.pool)
        .await?
        .ok_or(ApiError::not_found("customer"))?;
    let customer: String = customer.try_get("stripe_id")?;
    let session: PortalSession = billing
        .client
        .post(
            "/v1/billing_portal/sessions",
            &Form::new()
                .set("customer", &customer)
                .set("return_url", &return_url),
            &format!("agora-portal-{}", Uuid::new_v4()),
        )
        .await
        .map_err(crate::billing::BillingError::from)?;
    Ok(Json(PortalAnswer { url: session.url }))
}
