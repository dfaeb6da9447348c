//! Subscriptions, invoices, and the billing portal.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;

use super::{act_on, list_where, paged, Answer, Object};
use crate::error::ApiError;
use crate::gate::Call;
use crate::pages::{escape, field, page};
use crate::render;
use crate::state::{
    find, merge_metadata, new_id, Customer, Invoice, InvoiceStatus, Origin, PortalSession,
    Subscription, SubscriptionStatus,
};
use crate::Shared;

pub async fn list_subscriptions(call: Call) -> Answer {
    let mut p = call.params();
    let customer = p.string("customer")?;
    let status = p.choice(
        "status",
        &["active", "past_due", "unpaid", "canceled", "all", "ended"],
    )?;
    let wanted = |s: SubscriptionStatus| match status.as_deref() {
        None => s != SubscriptionStatus::Canceled,
        Some("all") => true,
        Some("ended") => s == SubscriptionStatus::Canceled,
        Some(other) => s.as_str() == other,
    };
    list_where(&call, p, "/v1/subscriptions", |s: &Subscription| {
        customer.as_ref().is_none_or(|c| &s.customer == c) && wanted(s.status)
    })
}

pub async fn update_subscription(Path(id): Path<String>, call: Call) -> Answer {
    let mut p = call.params();
    let cancel_at_period_end = p.boolean("cancel_at_period_end")?;
    let metadata = p.metadata()?;
    p.finish()?;
    let mut st = call.lock();
    let i = Subscription::position(&st, &id)?;
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
pub async fn cancel_subscription(Path(id): Path<String>, call: Call) -> Answer {
    let (mut st, i) = act_on::<Subscription>(&call, &id)?;
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

pub async fn list_subscription_items(call: Call) -> Answer {
    let mut p = call.params();
    let id = p.required("subscription")?;
    let url = format!("/v1/subscription_items?subscription={id}");
    paged(&call, p, &url, |st| {
        let s = Subscription::in_param(st, &id, "subscription")?;
        Ok(render::subscription_items(st, s))
    })
}

pub async fn list_invoices(call: Call) -> Answer {
    let mut p = call.params();
    let customer = p.string("customer")?;
    let subscription = p.string("subscription")?;
    let status = p.choice(
        "status",
        &["draft", "open", "paid", "uncollectible", "void"],
    )?;
    list_where(&call, p, "/v1/invoices", |i: &Invoice| {
        customer.as_ref().is_none_or(|c| &i.customer == c)
            && subscription.as_ref().is_none_or(|s| &i.subscription == s)
            && status.as_ref().is_none_or(|s| i.status.as_str() == s)
    })
}

pub async fn invoice_lines(Path(id): Path<String>, call: Call) -> Answer {
    let url = format!("/v1/invoices/{id}/lines");
    paged(&call, call.params(), &url, |st| {
        Ok(render::invoice_lines(Invoice::by_id(st, &id)?))
    })
}

/// Charges an open invoice now to the customer's default card. Paid: the
/// subscription is active again. Declined: 402, and `invoice.payment_failed`.
pub async fn pay_invoice(Path(id): Path<String>, call: Call) -> Answer {
    let (mut st, i) = act_on::<Invoice>(&call, &id)?;
    if st.invoices[i].status != InvoiceStatus::Open {
        return Err(ApiError::Refused("Invoice is already paid".into()));
    }
    let sub = Subscription::position(&st, &st.invoices[i].subscription)?;
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

pub async fn create_portal_session(call: Call) -> Answer {
    let mut p = call.params();
    let customer = p.required("customer")?;
    let return_url = p.string("return_url")?;
    p.finish()?;
    let mut st = call.lock();
    Customer::in_param(&st, &customer, "customer")?;
    let session = PortalSession {
        id: new_id("bps"),
        created: st.now(),
        customer,
        return_url,
    };
    session.save(&mut st)
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
    let wanted = field(&body, "subscription");
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
