//! Checkout sessions (subscription mode only) and the hosted page that pays them.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;

use super::{act_on, list_where, paged, Answer, Object};
use crate::billing::{PayError, TestCard};
use crate::error::ApiError;
use crate::gate::Call;
use crate::pages::{self, escape, money, page};
use crate::render;
use crate::state::{
    find, new_id, new_metadata, CheckoutSession, Customer, Metadata, Price, SessionLine,
    SessionStatus,
};
use crate::Shared;

pub async fn create(call: Call) -> Answer {
    let mut p = call.params();
    match p
        .choice("mode", &["payment", "setup", "subscription"])?
        .as_deref()
    {
        Some("subscription") => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "mode",
                "The local stand-in takes mode=subscription only.",
            ))
        }
        None => return Err(ApiError::Missing("mode".into())),
    }
    let customer = p.required("customer")?;
    let items = p.objects("line_items")?;
    let success_url = p.required("success_url")?;
    let cancel_url = p.string("cancel_url")?;
    let client_reference_id = p.string("client_reference_id")?;
    let metadata = new_metadata(p.metadata()?);
    let subscription_metadata = match p.object("subscription_data")? {
        Some(mut data) => {
            let metadata = new_metadata(data.metadata()?);
            data.finish()?;
            metadata
        }
        None => Metadata::new(),
    };
    let expires_at = p.integer("expires_at")?;
    p.finish()?;

    let mut st = call.lock();
    let now = st.now();
    Customer::in_param(&st, &customer, "customer")?;
    if items.is_empty() {
        return Err(ApiError::Missing("line_items".into()));
    }
    let mut lines = Vec::new();
    let mut currency_interval = None;
    for (i, mut item) in items.into_iter().enumerate() {
        let param = format!("line_items[{i}][price]");
        let price_id = item.required("price")?;
        let quantity = item.integer("quantity")?;
        item.finish()?;
        let price = Price::in_param(&st, &price_id, &param)?;
        if !price.active {
            return Err(ApiError::invalid(
                &param,
                "The price specified is inactive. This field only accepts active prices.",
            ));
        }
        let recurring = price.recurring.as_ref().ok_or_else(|| {
            ApiError::invalid(
                &param,
                "In subscription mode every price must be recurring.",
            )
        })?;
        let quantity_param = format!("line_items[{i}][quantity]");
        match (recurring.meter.is_some(), quantity) {
            (true, Some(_)) => {
                return Err(ApiError::invalid(
                    &quantity_param,
                    "Quantity should not be specified where usage_type is `metered`. Remove quantity from `line_items`.",
                ))
            }
            (false, None) => return Err(ApiError::Missing(quantity_param)),
            (false, Some(q)) if q < 1 => {
                return Err(ApiError::invalid(&quantity_param, "Quantity must be at least 1."))
            }
            _ => {}
        }
        let this = (price.currency.clone(), recurring.interval);
        if currency_interval.get_or_insert_with(|| this.clone()) != &this {
            return Err(ApiError::invalid(
                &param,
                "All prices in a subscription must have the same currency and billing interval.",
            ));
        }
        lines.push(SessionLine {
            id: new_id("li"),
            price: price_id,
            quantity,
        });
    }
    let expires_at = expires_at.unwrap_or(now + 86_400);
    if !(now + 1800..=now + 86_400).contains(&expires_at) {
        return Err(ApiError::invalid(
            "expires_at",
            "The expires_at timestamp must be between 30 minutes and 24 hours from now.",
        ));
    }
    let session = CheckoutSession {
        id: new_id("cs_test"),
        created: now,
        expires_at,
        customer,
        lines,
        currency: currency_interval.map(|(c, _)| c).unwrap_or_default(),
        success_url,
        cancel_url,
        client_reference_id,
        metadata,
        subscription_metadata,
        status: SessionStatus::Open,
        subscription: None,
        invoice: None,
    };
    session.save(&mut st)
}

pub async fn list(call: Call) -> Answer {
    let mut p = call.params();
    let customer = p.string("customer")?;
    list_where(&call, p, "/v1/checkout/sessions", |s: &CheckoutSession| {
        customer.as_ref().is_none_or(|c| &s.customer == c)
    })
}

pub async fn expire(Path(id): Path<String>, call: Call) -> Answer {
    let (mut st, i) = act_on::<CheckoutSession>(&call, &id)?;
    let status = st.sessions[i].status;
    if status != SessionStatus::Open {
        return Err(ApiError::Refused(format!(
            "Only Checkout Sessions with a status in [\"open\"] can be expired. This Checkout Session has a status of {}.",
            status.as_str()
        )));
    }
    let now = st.now();
    st.expire_session(i, now, &call.origin());
    Ok(Json(render::checkout_session(&st, &st.sessions[i])))
}

pub async fn line_items(Path(id): Path<String>, call: Call) -> Answer {
    let url = format!("/v1/checkout/sessions/{id}/line_items");
    paged(&call, call.params(), &url, |st| {
        let session = CheckoutSession::by_id(st, &id)?;
        Ok(session
            .lines
            .iter()
            .map(|l| render::checkout_line(st, session, l))
            .collect())
    })
}

fn card_form(id: &str, message: Option<&str>) -> String {
    let message = message.map_or(String::new(), |m| {
        format!("<p class=\"error\">{}</p>", escape(m))
    });
    format!(
        "{message}<form method=\"post\" action=\"/checkout/{id}\">\
         <label>Card number <input name=\"card_number\" inputmode=\"numeric\" autocomplete=\"off\" \
         placeholder=\"4242 4242 4242 4242\" required></label> <button type=\"submit\">Pay</button></form>\
         <p class=\"note\">{}</p>",
        pages::CARD_HINT,
        id = escape(id),
    )
}

/// The page for session `id`, with `message` above the form.
fn checkout_page(shared: &Shared, id: &str, status: StatusCode, message: Option<&str>) -> Response {
    let mut st = shared.lock();
    st.settle();
    let Some(session) = find(&st.sessions, id) else {
        return page(StatusCode::NOT_FOUND, "<p>No such checkout session.</p>");
    };
    if session.status != SessionStatus::Open {
        let status = session.status.as_str();
        return page(
            StatusCode::GONE,
            &format!("<p>This checkout session is {status}.</p>"),
        );
    }
    let mut rows = String::new();
    let mut total = 0;
    for line in &session.lines {
        let Some(price) = find(&st.prices, &line.price) else {
            continue;
        };
        let name = find(&st.products, &price.product).map_or("", |p| p.name.as_str());
        let interval = price.recurring.as_ref().map_or("", |r| r.interval.as_str());
        let (each, quantity) = match line.quantity {
            Some(q) => {
                let cents = price.unit_amount_decimal.times(1);
                total += price.unit_amount_decimal.times(q);
                (
                    format!("{} / {interval}", money(cents, &price.currency)),
                    q.to_string(),
                )
            }
            None => (
                format!(
                    "{} ¢ per unit, billed by use each {interval}",
                    price.unit_amount_decimal.as_str()
                ),
                "metered".to_string(),
            ),
        };
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(name),
            escape(&each),
            escape(&quantity)
        ));
    }
    let body = format!(
        "<p class=\"note\">This is a local stand-in for Stripe Checkout. No card is charged.</p>\
         <table><tr><th>Item</th><th>Price</th><th>Quantity</th></tr>{rows}</table>\
         <p>Due today: <strong>{}</strong></p>{}",
        money(total, &session.currency),
        card_form(id, message)
    );
    page(status, &body)
}

/// `GET /checkout/{id}`
pub async fn page_get(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    checkout_page(&shared, &id, StatusCode::OK, None)
}

/// `POST /checkout/{id}` with `card_number`.
pub async fn pay(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let Some(card) = TestCard::parse(&pages::field(&body, "card_number")) else {
        return checkout_page(
            &shared,
            &id,
            StatusCode::BAD_REQUEST,
            Some(pages::CARD_HINT),
        );
    };
    let paid = {
        let mut st = shared.lock();
        st.settle();
        st.pay_checkout(&id, card)
    };
    match paid {
        Ok(success_url) => Redirect::to(&success_url).into_response(),
        Err(PayError::Declined) => checkout_page(
            &shared,
            &id,
            StatusCode::PAYMENT_REQUIRED,
            Some("Your card was declined. Nothing was charged."),
        ),
        Err(PayError::NotOpen(_)) => checkout_page(&shared, &id, StatusCode::GONE, None),
    }
}
