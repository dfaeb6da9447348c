//! Subscriptions, invoices, and the billing portal.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;

use super::Answer;
use crate::error::ApiError;
use crate::form;
use crate::gate::Call;
use crate::pages::{escape, page};
use crate::render::{self, Page};
use crate::state::{
    find, merge_metadata, new_id, InvoiceStatus, Origin, PortalSession, SubscriptionStatus,
};
use crate::Shared;

fn subscription_index(st: &crate::state::State, id: &str) -> Result<usize, ApiError> {
    st.subscriptions
        .iter()
        .position(|s| s.id == id)
        .ok_or_else(|| ApiError::no_such("subscription", id))
}

pub async fn get_subscription(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    call: Call,
) -> Answer {
    call.params().finish()?;
    let st = shared.lock();
    let i = subscription_index(&st, &id)?;
    Ok(Json(render::subscription(&st, &st.subscriptions[i])))
}

pub async fn list_subscriptions(State(shared): State<Arc<Shared>>, call: Call) -> Answer {
    let mut p = call.params();
    let customer = p.string("customer")?;
    let status = p.choice(
        "status",
        &["active", "past_due", "unpaid", "canceled", "all", "ended"],
    )?;
    let page = Page::take(&mut p)?;
    p.finish()?;
    let st = shared.lock();
    let wanted = |s: SubscriptionStatus| match status.as_deref() {
        None => s != SubscriptionStatus::Canceled,
        Some("all") => true,
        Some("ended") => s == SubscriptionStatus::Canceled,
        Some(other) => s.as_str() == other,
    };
    let items = st
        .subscriptions
        .iter()
        .rev()
        .filter(|s| customer.as_ref().is_none_or(|c| &s.customer == c) && wanted(s.status))
        .map(|s| render::subscription(&st, s))
        .collect();
    Ok(Json(page.list("/v1/subscriptions", items)?))
}

pub async fn update_subscription(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    call: Call,
) -> Answer {
    let mut p = call.params();
    let cancel_at_period_end = p.boolean("cancel_at_period_end")?;
    let metadata = p.metadata()?;
    p.finish()?;
    let mut st = shared.lock();
    let i = subscription_index(&st, &id)?;
    if cancel_at_period_end.is_some() && st.subscriptions[i].status == SubscriptionStatus::Canceled
    {
        return Err(ApiError::Refused(
            "A canceled subscription can only update its cancellation_details and metadata.".into(),
        ));
    }
    let old = render::subscription(&st, &st.subscriptions[i]);
    let now = st.now();
    let s = &mut st.subscriptions[i];
    if let Some(cancel) = cancel_at_period_end {
        s.cancel_at_period_end = cancel;
        s.canceled_at = cancel.then_some(now);
    }
    merge_metadata(&mut s.metadata, metadata.unwrap_or_default());
    st.emit_subscription_updated(i, &old, now, &call.origin());
    Ok(Json(render::subscription(&st, &st.subscriptions[i])))
}

/// `DELETE /v1/subscriptions/{id}`: cancels at once.
pub async fn cancel_subscription(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    call: Call,
) -> Answer {
    call.params().finish()?;
    let mut st = shared.lock();
    let i = subscription_index(&st, &id)?;
    if st.subscriptions[i].status == SubscriptionStatus::Canceled {
        return Err(ApiError::Refused(format!(
            "The subscription {id} is already canceled."
        )));
    }
    let now = st.now();
    let s = &mut st.subscriptions[i];
    s.status = SubscriptionStatus::Canceled;
    s.ended_at = Some(now);
    s.canceled_at = Some(now);
    let body = render::subscription(&st, &st.subscriptions[i]);
    st.emit(
        "customer.subscription.deleted",
        body.clone(),
        None,
        &call.origin(),
    );
    Ok(Json(body))
}

pub async fn list_subscription_items(State(shared): State<Arc<Shared>>, call: Call) -> Answer {
    let mut p = call.params();
    let id = p.required("subscription")?;
    let page = Page::take(&mut p)?;
    p.finish()?;
    let st = shared.lock();
    let s = find(&st.subscriptions, &id)
        .ok_or_else(|| ApiError::no_such_param("subscription", &id, "subscription"))?;
    let url = format!("/v1/subscription_items?subscription={id}");
    Ok(Json(page.list(&url, render::subscription_items(&st, s))?))
}

pub async fn get_invoice(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    call: Call,
) -> Answer {
    call.params().finish()?;
    let st = shared.lock();
    let invoice = find(&st.invoices, &id).ok_or_else(|| ApiError::no_such("invoice", &id))?;
    Ok(Json(render::invoice(invoice)))
}

pub async fn list_invoices(State(shared): State<Arc<Shared>>, call: Call) -> Answer {
    let mut p = call.params();
    let customer = p.string("customer")?;
    let subscription = p.string("subscription")?;
    let status = p.choice(
        "status",
        &["draft", "open", "paid", "uncollectible", "void"],
    )?;
    let page = Page::take(&mut p)?;
    p.finish()?;
    let st = shared.lock();
    let items = st
        .invoices
        .iter()
        .rev()
        .filter(|i| customer.as_ref().is_none_or(|c| &i.customer == c))
        .filter(|i| subscription.as_ref().is_none_or(|s| &i.subscription == s))
        .map(render::invoice)
        .filter(|i| status.as_ref().is_none_or(|s| i["status"] == *s.as_str()))
        .collect();
    Ok(Json(page.list("/v1/invoices", items)?))
}

pub async fn invoice_lines(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    call: Call,
) -> Answer {
    let mut p = call.params();
    let page = Page::take(&mut p)?;
    p.finish()?;
    let st = shared.lock();
    let invoice = find(&st.invoices, &id).ok_or_else(|| ApiError::no_such("invoice", &id))?;
    Ok(Json(page.list(
        &format!("/v1/invoices/{id}/lines"),
        render::invoice_lines(invoice),
    )?))
}

/// Charges an open invoice now to the customer's default card. Paid: the
/// subscription is active again. Declined: 402, and `invoice.payment_failed`.
pub async fn pay_invoice(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    call: Call,
) -> Answer {
    call.params().finish()?;
    let mut st = shared.lock();
    let i = st
        .invoices
        .iter()
        .position(|inv| inv.id == id)
        .ok_or_else(|| ApiError::no_such("invoice", &id))?;
    if st.invoices[i].status != InvoiceStatus::Open {
        return Err(ApiError::Refused("Invoice is already paid".into()));
    }
    let sub = subscription_index(&st, &st.invoices[i].subscription.clone())?;
    let old = render::subscription(&st, &st.subscriptions[sub]);
    let now = st.now();
    if !st.attempt_payment(i, now, &call.origin()) {
        return Err(ApiError::CardDeclined);
    }
    let s = &mut st.subscriptions[sub];
    if matches!(
        s.status,
        SubscriptionStatus::PastDue | SubscriptionStatus::Unpaid
    ) {
        s.status = SubscriptionStatus::Active;
    }
    st.emit_subscription_updated(sub, &old, now, &call.origin());
    Ok(Json(render::invoice(&st.invoices[i])))
}

pub async fn create_portal_session(State(shared): State<Arc<Shared>>, call: Call) -> Answer {
    let mut p = call.params();
    let customer = p.required("customer")?;
    let return_url = p.string("return_url")?;
    p.finish()?;
    let mut st = shared.lock();
    find(&st.customers, &customer)
        .ok_or_else(|| ApiError::no_such_param("customer", &customer, "customer"))?;
    let session = PortalSession {
        id: new_id("bps"),
        created: st.now(),
        customer,
        return_url,
    };
    let body = render::portal_session(&st, &session);
    st.portal_sessions.push(session);
    Ok(Json(body))
}

/// `GET /portal/{id}`: the customer's subscriptions, each with a button to
/// cancel at period end.
pub async fn portal_page(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let mut st = shared.lock();
    st.settle();
    let Some(session) = find(&st.portal_sessions, &id) else {
        return page(
            StatusCode::NOT_FOUND,
            "<p>No such billing portal session.</p>",
        );
    };
    let mut rows = String::new();
    for s in st
        .subscriptions
        .iter()
        .filter(|s| s.customer == session.customer)
    {
        let names: Vec<String> = s
            .items
            .iter()
            .filter_map(|item| find(&st.prices, &item.price))
            .filter_map(|price| find(&st.products, &price.product))
            .map(|product| escape(&product.name))
            .collect();
        let action = if s.status == SubscriptionStatus::Canceled {
            "canceled".to_string()
        } else if s.cancel_at_period_end {
            "cancels at period end".to_string()
        } else {
            format!(
                "<form method=\"post\" action=\"/portal/{}\"><input type=\"hidden\" name=\"subscription\" \
                 value=\"{}\"><button type=\"submit\">Cancel at period end</button></form>",
                escape(&id),
                escape(&s.id)
            )
        };
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            names.join(", "),
            s.status.as_str(),
            action
        ));
    }
    let back = session.return_url.as_deref().map_or(String::new(), |url| {
        format!("<p><a href=\"{}\">Return</a></p>", escape(url))
    });
    page(
        StatusCode::OK,
        &format!(
            "<p class=\"note\">A local stand-in for Stripe's billing portal.</p>\
             <table><tr><th>Plan</th><th>Status</th><th></th></tr>{rows}</table>{back}"
        ),
    )
}

/// `POST /portal/{id}` with `subscription`: sets it to cancel at period end.
pub async fn portal_cancel(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let wanted = form::decode(&String::from_utf8_lossy(&body))
        .ok()
        .and_then(|f| f["subscription"].as_str().map(str::to_string))
        .unwrap_or_default();
    let mut st = shared.lock();
    let Some(customer) = find(&st.portal_sessions, &id).map(|s| s.customer.clone()) else {
        return page(
            StatusCode::NOT_FOUND,
            "<p>No such billing portal session.</p>",
        );
    };
    let Some(i) = st.subscriptions.iter().position(|s| {
        s.id == wanted && s.customer == customer && s.status != SubscriptionStatus::Canceled
    }) else {
        return page(
            StatusCode::BAD_REQUEST,
            "<p>No such subscription for this customer.</p>",
        );
    };
    let old = render::subscription(&st, &st.subscriptions[i]);
    let now = st.now();
    st.subscriptions[i].cancel_at_period_end = true;
    st.subscriptions[i].canceled_at = Some(now);
    st.emit_subscription_updated(i, &old, now, &Origin::default());
    Redirect::to(&format!("/portal/{id}")).into_response()
}
