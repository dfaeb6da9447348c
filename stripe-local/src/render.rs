//! Each object as Stripe serves it: the same fields, recursively, as Stripe's
//! published example of that object (the test in `tests/shapes.rs` holds them
//! to it), with real values where the stand-in knows them and null, empty or
//! Stripe's default otherwise.

use serde_json::{json, Value};

use crate::error::ApiError;
use crate::form::Params;
use crate::state::*;

pub fn customer(st: &State, c: &Customer) -> Value {
    let delinquent = st
        .invoices
        .iter()
        .any(|i| i.customer == c.id && i.status == InvoiceStatus::Open && i.attempt_count > 0);
    json!({
        "address": null,
        "balance": 0,
        "created": c.created,
        "currency": c.currency,
        "default_source": null,
        "delinquent": delinquent,
        "description": null,
        "discount": null,
        "email": c.email,
        "id": c.id,
        "invoice_prefix": c.invoice_prefix,
        "invoice_settings": {
            "custom_fields": null,
            "default_payment_method": c.default_payment_method,
            "footer": null,
            "rendering_options": null,
        },
        "livemode": false,
        "metadata": c.metadata,
        "name": c.name,
        "next_invoice_sequence": c.next_invoice_sequence,
        "object": "customer",
        "phone": null,
        "preferred_locales": [],
        "shipping": null,
        "tax_exempt": "none",
        "test_clock": c.test_clock,
    })
}

pub fn product(p: &Product) -> Value {
    json!({
        "active": p.active,
        "created": p.created,
        "default_price": null,
        "description": p.description,
        "id": p.id,
        "images": [],
        "livemode": false,
        "marketing_features": [],
        "metadata": p.metadata,
        "name": p.name,
        "object": "product",
        "package_dimensions": null,
        "shippable": null,
        "statement_descriptor": null,
        "tax_code": null,
        "type": "service",
        "unit_label": null,
        "updated": p.updated,
        "url": null,
    })
}

pub fn price(p: &Price) -> Value {
    let recurring = p.recurring.as_ref().map(|r| {
        json!({
            "interval": r.interval.as_str(),
            "interval_count": 1,
            "meter": r.meter,
            "trial_period_days": null,
            "usage_type": usage_type(r),
        })
    });
    json!({
        "active": p.active,
        "billing_scheme": "per_unit",
        "created": p.created,
        "currency": p.currency,
        "custom_unit_amount": null,
        "id": p.id,
        "livemode": false,
        "lookup_key": p.lookup_key,
        "metadata": p.metadata,
        "nickname": p.nickname,
        "object": "price",
        "product": p.product,
        "recurring": recurring,
        "tax_behavior": "unspecified",
        "tiers_mode": null,
        "transform_quantity": null,
        "type": if p.recurring.is_some() { "recurring" } else { "one_time" },
        "unit_amount": p.unit_amount_decimal.whole(),
        "unit_amount_decimal": p.unit_amount_decimal.as_str(),
    })
}

fn usage_type(r: &Recurring) -> &'static str {
    if r.meter.is_some() {
        "metered"
    } else {
        "licensed"
    }
}

/// The older `plan` view of a recurring price, still on subscription items.
fn plan(p: &Price) -> Value {
    let r = p.recurring.as_ref();
    json!({
        "active": p.active,
        "amount": p.unit_amount_decimal.whole(),
        "amount_decimal": p.unit_amount_decimal.as_str(),
        "billing_scheme": "per_unit",
        "created": p.created,
        "currency": p.currency,
        "id": p.id,
        "interval": r.map(|r| r.interval.as_str()),
        "interval_count": 1,
        "livemode": false,
        "metadata": p.metadata,
        "meter": r.and_then(|r| r.meter.clone()),
        "nickname": p.nickname,
        "object": "plan",
        "product": p.product,
        "tiers_mode": null,
        "transform_usage": null,
        "trial_period_days": null,
        "usage_type": r.map(usage_type),
    })
}

pub fn meter(m: &Meter) -> Value {
    json!({
        "created": m.created,
        "customer_mapping": { "event_payload_key": m.customer_key, "type": "by_id" },
        "default_aggregation": {
            "formula": match m.formula { Formula::Sum => "sum", Formula::Count => "count" },
        },
        "display_name": m.display_name,
        "event_name": m.event_name,
        "event_time_window": null,
        "id": m.id,
        "livemode": false,
        "object": "billing.meter",
        "status": "active",
        "status_transitions": { "deactivated_at": null },
        "updated": m.created,
        "value_settings": { "event_payload_key": m.value_key },
    })
}

pub fn meter_event(e: &MeterEvent) -> Value {
    json!({
        "created": e.created,
        "event_name": e.event_name,
        "identifier": e.identifier,
        "livemode": false,
        "object": "billing.meter_event",
        "payload": e.payload,
        "timestamp": e.timestamp,
    })
}

pub fn meter_event_summary(meter: &str, start: i64, end: i64, value: i64, customer: &str) -> Value {
    use sha2::Digest;
    // Stable ids, so that `starting_after` pages through the same windows.
    let digest = sha2::Sha256::digest(format!("{meter}/{customer}/{start}/{end}"));
    json!({
        "aggregated_value": value,
        "end_time": end,
        "id": format!("mtrusg_{}", &hex::encode(digest)[..24]),
        "livemode": false,
        "meter": meter,
        "object": "billing.meter_event_summary",
        "start_time": start,
    })
}

fn session_amount(st: &State, s: &CheckoutSession) -> i64 {
    s.lines
        .iter()
        .filter_map(|l| {
            let price = find(&st.prices, &l.price)?;
            Some(price.unit_amount_decimal.times(l.quantity?))
        })
        .sum()
}

pub fn checkout_session(st: &State, s: &CheckoutSession) -> Value {
    let amount = session_amount(st, s);
    let customer = find(&st.customers, &s.customer);
    let customer_details = (s.status == SessionStatus::Complete).then(|| {
        json!({
            "address": null,
            "business_name": null,
            "email": customer.and_then(|c| c.email.clone()),
            "individual_name": null,
            "name": customer.and_then(|c| c.name.clone()),
            "phone": null,
            "tax_exempt": "none",
            "tax_ids": [],
        })
    });
    let url =
        (s.status == SessionStatus::Open).then(|| format!("{}/checkout/{}", st.base_url, s.id));
    json!({
        "adaptive_pricing": null,
        "after_expiration": null,
        "allow_promotion_codes": null,
        "amount_subtotal": amount,
        "amount_total": amount,
        "automatic_tax": { "enabled": false, "liability": null, "provider": null, "status": null },
        "billing_address_collection": null,
        "cancel_url": s.cancel_url,
        "client_reference_id": s.client_reference_id,
        "client_secret": null,
        "collected_information": null,
        "consent": null,
        "consent_collection": null,
        "created": s.created,
        "currency": s.currency,
        "currency_conversion": null,
        "custom_fields": [],
        "custom_text": {
            "after_submit": null,
            "shipping_address": null,
            "submit": null,
            "terms_of_service_acceptance": null,
        },
        "customer": s.customer,
        "customer_account": null,
        "customer_creation": null,
        "customer_details": customer_details,
        "customer_email": null,
        "discounts": [],
        "expires_at": s.expires_at,
        "id": s.id,
        "integration_identifier": null,
        "invoice": s.invoice,
        "invoice_creation": null,
        "livemode": false,
        "locale": null,
        "managed_payments": null,
        "metadata": s.metadata,
        "mode": "subscription",
        "object": "checkout.session",
        "origin_context": null,
        "payment_intent": null,
        "payment_link": null,
        "payment_method_collection": "always",
        "payment_method_configuration_details": null,
        "payment_method_options": {},
        "payment_method_types": ["card"],
        "payment_status": if s.status == SessionStatus::Complete { "paid" } else { "unpaid" },
        "permissions": null,
        "phone_number_collection": { "enabled": false },
        "recovered_from": null,
        "saved_payment_method_options": null,
        "setup_intent": null,
        "shipping_address_collection": null,
        "shipping_cost": null,
        "shipping_options": [],
        "status": s.status.as_str(),
        "submit_type": null,
        "subscription": s.subscription,
        "success_url": s.success_url,
        "total_details": { "amount_discount": 0, "amount_shipping": 0, "amount_tax": 0 },
        "ui_mode": "hosted",
        "url": url,
        "wallet_options": null,
    })
}

/// A checkout session's line (`object: item`), from `/line_items`.
pub fn checkout_line(st: &State, s: &CheckoutSession, l: &SessionLine) -> Value {
    let price_ = find(&st.prices, &l.price);
    let amount = price_.map_or(0, |p| p.unit_amount_decimal.times(l.quantity.unwrap_or(0)));
    let description = price_
        .and_then(|p| find(&st.products, &p.product))
        .map(|p| p.name.clone());
    json!({
        "amount_discount": 0,
        "amount_subtotal": amount,
        "amount_tax": 0,
        "amount_total": amount,
        "currency": s.currency,
        "description": description,
        "id": l.id,
        "object": "item",
        "price": price_.map(price),
        "quantity": l.quantity,
    })
}

fn subscription_item(st: &State, s: &Subscription, item: &SubscriptionItem) -> Value {
    let p = find(&st.prices, &item.price);
    json!({
        "billing_thresholds": null,
        "created": item.created,
        "current_period_end": s.period_end,
        "current_period_start": s.period_start,
        "discounts": [],
        "id": item.id,
        "metadata": {},
        "object": "subscription_item",
        "plan": p.map(plan),
        "price": p.map(price),
        "quantity": item.quantity,
        "subscription": s.id,
        "tax_rates": [],
    })
}

pub fn subscription_items(st: &State, s: &Subscription) -> Vec<Value> {
    s.items
        .iter()
        .map(|item| subscription_item(st, s, item))
        .collect()
}

pub fn subscription(st: &State, s: &Subscription) -> Value {
    let canceled = s.status == SubscriptionStatus::Canceled;
    json!({
        "application": null,
        "application_fee_percent": null,
        "automatic_tax": { "disabled_reason": null, "enabled": false, "liability": null },
        "billing_cycle_anchor": s.created,
        "billing_cycle_anchor_config": null,
        "billing_mode": { "flexible": null, "type": "classic" },
        "billing_schedules": [],
        "billing_thresholds": null,
        "cancel_at": (s.cancel_at_period_end && !canceled).then_some(s.period_end),
        "cancel_at_period_end": s.cancel_at_period_end,
        "canceled_at": s.canceled_at,
        "cancellation_details": {
            "comment": null,
            "feedback": null,
            "reason": s.canceled_at.map(|_| "cancellation_requested"),
        },
        "collection_method": "charge_automatically",
        "created": s.created,
        "currency": s.currency,
        "customer": s.customer,
        "customer_account": null,
        "days_until_due": null,
        "default_payment_method": null,
        "default_source": null,
        "default_tax_rates": [],
        "description": null,
        "discounts": [],
        "ended_at": s.ended_at,
        "id": s.id,
        "invoice_settings": {
            "account_tax_ids": null,
            "custom_fields": null,
            "description": null,
            "footer": null,
            "issuer": { "type": "self" },
        },
        "items": {
            "data": subscription_items(st, s),
            "has_more": false,
            "object": "list",
            "url": format!("/v1/subscription_items?subscription={}", s.id),
        },
        "latest_invoice": s.latest_invoice,
        "livemode": false,
        "managed_payments": null,
        "metadata": s.metadata,
        "next_pending_invoice_item_invoice": null,
        "object": "subscription",
        "on_behalf_of": null,
        "pause_collection": null,
        "payment_settings": {
            "payment_method_options": null,
            "payment_method_types": null,
            "save_default_payment_method": "off",
        },
        "pending_invoice_item_interval": null,
        "pending_setup_intent": null,
        "pending_update": null,
        "schedule": null,
        "start_date": s.created,
        "status": s.status.as_str(),
        "test_clock": s.test_clock,
        "transfer_data": null,
        "trial_end": null,
        "trial_settings": { "end_behavior": { "missing_payment_method": "create_invoice" } },
        "trial_start": null,
    })
}

fn invoice_line(inv: &Invoice, l: &InvoiceLine) -> Value {
    json!({
        "amount": l.amount,
        "currency": inv.currency,
        "description": l.description,
        "discount_amounts": [],
        "discountable": true,
        "discounts": [],
        "id": l.id,
        "invoice": inv.id,
        "livemode": false,
        "metadata": {},
        "object": "line_item",
        "parent": {
            "invoice_item_details": null,
            "subscription_item_details": {
                "invoice_item": null,
                "proration": false,
                "proration_details": { "credited_items": null },
                "subscription": inv.subscription,
                "subscription_item": l.subscription_item,
            },
            "type": "subscription_item_details",
        },
        "period": { "end": inv.period_end, "start": inv.period_start },
        "pretax_credit_amounts": [],
        "pricing": { "type": "price_details", "unit_amount_decimal": l.unit_amount_decimal },
        "quantity": l.quantity,
        "quantity_decimal": l.quantity.to_string(),
        "subscription": inv.subscription,
        "subtotal": l.amount,
        "taxes": [],
    })
}

pub fn invoice_lines(inv: &Invoice) -> Vec<Value> {
    inv.lines.iter().map(|l| invoice_line(inv, l)).collect()
}

pub fn invoice(inv: &Invoice) -> Value {
    let total = inv.total();
    let paid = inv.status == InvoiceStatus::Paid;
    let amount_paid = if paid { total } else { 0 };
    json!({
        "account_country": "US",
        "account_name": "Local test account",
        "account_tax_ids": null,
        "amount_due": total,
        "amount_overpaid": 0,
        "amount_paid": amount_paid,
        "amount_remaining": total - amount_paid,
        "amount_shipping": 0,
        "application": null,
        "attempt_count": inv.attempt_count,
        "attempted": inv.attempt_count > 0,
        "auto_advance": !paid,
        "automatic_tax": {
            "disabled_reason": null,
            "enabled": false,
            "liability": null,
            "provider": null,
            "status": null,
        },
        "automatically_finalizes_at": null,
        "billing_reason": inv.billing_reason,
        "collection_method": "charge_automatically",
        "created": inv.created,
        "currency": inv.currency,
        "custom_fields": null,
        "customer": inv.customer,
        "customer_account": null,
        "customer_address": null,
        "customer_email": inv.customer_email,
        "customer_name": inv.customer_name,
        "customer_phone": null,
        "customer_shipping": null,
        "customer_tax_exempt": "none",
        "customer_tax_ids": [],
        "default_payment_method": null,
        "default_source": null,
        "default_tax_rates": [],
        "description": null,
        "discounts": [],
        "due_date": null,
        "effective_at": inv.created,
        "ending_balance": 0,
        "footer": null,
        "from_invoice": null,
        "hosted_invoice_url": null,
        "id": inv.id,
        "invoice_pdf": null,
        "issuer": { "type": "self" },
        "last_finalization_error": null,
        "latest_revision": null,
        "lines": {
            "data": invoice_lines(inv),
            "has_more": false,
            "object": "list",
            "url": format!("/v1/invoices/{}/lines", inv.id),
        },
        "livemode": false,
        "metadata": {},
        "next_payment_attempt": inv.next_payment_attempt,
        "number": inv.number,
        "object": "invoice",
        "on_behalf_of": null,
        "parent": {
            "quote_details": null,
            "subscription_details": {
                "metadata": inv.subscription_metadata,
                "subscription": inv.subscription,
            },
            "type": "subscription_details",
        },
        "payment_settings": {
            "default_mandate": null,
            "payment_method_options": null,
            "payment_method_types": null,
        },
        "period_end": inv.period_end,
        "period_start": inv.period_start,
        "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0,
        "receipt_number": null,
        "rendering": null,
        "shipping_cost": null,
        "shipping_details": null,
        "starting_balance": 0,
        "statement_descriptor": null,
        "status": inv.status.as_str(),
        "status_transitions": {
            "finalized_at": inv.created,
            "marked_uncollectible_at": null,
            "paid_at": inv.paid_at,
            "voided_at": null,
        },
        "subscription": inv.subscription,
        "subtotal": total,
        "subtotal_excluding_tax": total,
        "test_clock": inv.test_clock,
        "total": total,
        "total_discount_amounts": [],
        "total_excluding_tax": total,
        "total_pretax_credit_amounts": [],
        "total_taxes": [],
        "webhooks_delivered_at": inv.created,
    })
}

pub fn payment_method(pm: &PaymentMethod) -> Value {
    json!({
        "allow_redisplay": "unspecified",
        "billing_details": {
            "address": null,
            "email": null,
            "name": null,
            "phone": null,
            "tax_id": null,
        },
        "card": {
            "brand": "visa",
            "checks": {
                "address_line1_check": null,
                "address_postal_code_check": null,
                "cvc_check": "pass",
            },
            "country": "US",
            "display_brand": "visa",
            "exp_month": 12,
            "exp_year": 2034,
            "fingerprint": pm.card.fingerprint,
            "funding": "credit",
            "generated_from": null,
            "last4": pm.card.last4,
            "networks": { "available": ["visa"], "preferred": null },
            "regulated_status": "unregulated",
            "three_d_secure_usage": { "supported": true },
            "wallet": null,
        },
        "created": pm.created,
        "customer": pm.customer,
        "customer_account": null,
        "id": pm.id,
        "livemode": false,
        "metadata": {},
        "object": "payment_method",
        "type": "card",
    })
}

pub fn portal_session(st: &State, p: &PortalSession) -> Value {
    json!({
        "configuration": "bpc_local",
        "created": p.created,
        "customer": p.customer,
        "customer_account": null,
        "flow": null,
        "id": p.id,
        "livemode": false,
        "locale": null,
        "object": "billing_portal.session",
        "on_behalf_of": null,
        "return_url": p.return_url,
        "url": format!("{}/portal/{}", st.base_url, p.id),
    })
}

pub fn test_clock(c: &TestClock) -> Value {
    json!({
        "created": c.created,
        "deletes_after": c.created + 30 * crate::billing::DAY,
        "frozen_time": c.frozen_time,
        "id": c.id,
        "livemode": false,
        "name": c.name,
        "object": "test_helpers.test_clock",
        "status": "ready",
        "status_details": {},
    })
}

/// Without `secret`, which Stripe shows only in the answer that creates it.
pub fn webhook_endpoint(e: &Endpoint) -> Value {
    json!({
        "api_version": e.api_version,
        "application": null,
        "created": e.created,
        "description": null,
        "enabled_events": e.enabled_events,
        "id": e.id,
        "livemode": false,
        "metadata": e.metadata,
        "object": "webhook_endpoint",
        "status": "enabled",
        "url": e.url,
    })
}

/// The object an id names, for `expand[]`.
pub fn lookup(st: &State, id: &str) -> Option<Value> {
    let prefix = id.rsplit_once('_').map_or(id, |(p, _)| p);
    Some(match prefix {
        "cus" => customer(st, find(&st.customers, id)?),
        "prod" => product(find(&st.products, id)?),
        "price" => price(find(&st.prices, id)?),
        "mtr" => meter(find(&st.meters, id)?),
        "cs_test" => checkout_session(st, find(&st.sessions, id)?),
        "sub" => subscription(st, find(&st.subscriptions, id)?),
        "in" => invoice(find(&st.invoices, id)?),
        "pm" => payment_method(find(&st.payment_methods, id)?),
        "bps" => portal_session(st, find(&st.portal_sessions, id)?),
        "clock" => test_clock(find(&st.test_clocks, id)?),
        "we" => webhook_endpoint(find(&st.endpoints, id)?),
        "evt" => find(&st.events, id)?.body.clone(),
        _ => return None,
    })
}

/// Replaces the ids at each `expand[]` path (`customer`, `data.subscription`,
/// `subscription.latest_invoice`) with the objects they name.
pub fn expand(st: &State, value: &mut Value, path: &[&str]) {
    if let Value::String(id) = value {
        match lookup(st, id) {
            Some(object) => *value = object,
            None => return,
        }
    }
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    match value {
        Value::Object(map) => {
            if let Some(inner) = map.get_mut(*first) {
                expand(st, inner, rest);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| expand(st, v, path)),
        _ => {}
    }
}

/// `limit` (1 to 100, 10 by default) and `starting_after` / `ending_before`,
/// read from a list request.
pub struct Page {
    limit: usize,
    starting_after: Option<String>,
    ending_before: Option<String>,
}

impl Page {
    pub fn take(p: &mut Params) -> Result<Page, ApiError> {
        let limit = p.integer("limit")?.unwrap_or(10);
        if !(1..=100).contains(&limit) {
            return Err(ApiError::invalid(
                "limit",
                "This value must be greater than or equal to 1 and less than or equal to 100.",
            ));
        }
        Ok(Page {
            limit: limit as usize,
            starting_after: p.string("starting_after")?,
            ending_before: p.string("ending_before")?,
        })
    }

    /// A list object over `items` (already in the list's order).
    pub fn list(&self, url: &str, items: Vec<Value>) -> Result<Value, ApiError> {
        let position = |param: &str, id: &str| {
            items
                .iter()
                .position(|v| v["id"] == id)
                .ok_or_else(|| ApiError::invalid(param, format!("No such object: '{id}'")))
        };
        let (start, end) = match (&self.starting_after, &self.ending_before) {
            (Some(id), _) => {
                let start = position("starting_after", id)? + 1;
                (start, (start + self.limit).min(items.len()))
            }
            (None, Some(id)) => {
                let end = position("ending_before", id)?;
                (end.saturating_sub(self.limit), end)
            }
            (None, None) => (0, self.limit.min(items.len())),
        };
        let has_more = if self.ending_before.is_some() && self.starting_after.is_none() {
            start > 0
        } else {
            end < items.len()
        };
        Ok(json!({
            "object": "list",
            "data": items[start..end],
            "has_more": has_more,
            "url": url,
        }))
    }
}
