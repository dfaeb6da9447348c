//! Checkout, subscriptions, renewals, invoices, meters, and the clock.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::{json, Value};

fn data(list: &Value) -> &Vec<Value> {
    list["data"].as_array().unwrap()
}

fn status(object: &Value) -> &str {
    object["status"].as_str().unwrap()
}

#[tokio::test]
async fn paying_checkout_with_the_good_card_subscribes_the_customer_and_sends_them_to_success_url()
{
    let stand = start().await;
    let customer = stand.customer().await;
    let price = stand.licensed_price(2000).await;
    let session = stand.session(&customer, &price, None).await;
    assert_eq!(
        (
            session["status"].as_str(),
            session["payment_status"].as_str()
        ),
        (Some("open"), Some("unpaid"))
    );
    let id = session["id"].as_str().unwrap();
    assert!(id.starts_with("cs_test_"));
    assert_eq!(
        session["url"],
        format!("{}/checkout/{id}", stand.stripe.url())
    );

    let html = stand.page(session["url"].as_str().unwrap()).await;
    assert!(html.contains("Local test payments — nothing leaves this machine"));
    assert!(html.contains("Pro plan") && html.contains("$20.00"));

    let paid = stand.pay(&session, GOOD_CARD).await;
    assert_eq!(paid.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        paid.headers()["location"],
        format!("https://agora.test/done?session={id}")
    );

    let session = stand.fetch_session(id).await;
    assert_eq!(
        (
            session["status"].as_str(),
            session["payment_status"].as_str()
        ),
        (Some("complete"), Some("paid"))
    );
    let sub = stand
        .subscription(session["subscription"].as_str().unwrap())
        .await;
    assert_eq!(sub["status"], "active");
    assert_eq!(sub["metadata"], json!({"tenant": "t_1"}));
    let item = &sub["items"]["data"][0];
    assert_eq!(
        (item["price"]["id"].as_str(), item["quantity"].as_i64()),
        (Some(price.as_str()), Some(1))
    );
    assert!(
        item["current_period_end"].as_i64().unwrap()
            - item["current_period_start"].as_i64().unwrap()
            >= 28 * DAY
    );
    let invoice = stand
        .fetch(
            &format!("/v1/invoices/{}", session["invoice"].as_str().unwrap()),
            &[],
        )
        .await;
    assert_eq!(
        (
            invoice["status"].as_str(),
            invoice["billing_reason"].as_str(),
            invoice["amount_paid"].as_i64()
        ),
        (Some("paid"), Some("subscription_create"), Some(2000))
    );
    let customer = stand.fetch(&format!("/v1/customers/{customer}"), &[]).await;
    let card = customer["invoice_settings"]["default_payment_method"]
        .as_str()
        .unwrap();
    let cards = stand
        .fetch(
            "/v1/payment_methods",
            &[
                ("customer", customer["id"].as_str().unwrap()),
                ("type", "card"),
            ],
        )
        .await;
    assert_eq!(data(&cards)[0]["id"], card);
    assert_eq!(
        (
            data(&cards)[0]["card"]["brand"].as_str(),
            data(&cards)[0]["card"]["last4"].as_str()
        ),
        (Some("visa"), Some("4242"))
    );
    assert_eq!(
        stand.event_types().await,
        [
            "customer.subscription.created",
            "invoice.paid",
            "checkout.session.completed"
        ]
    );
}

#[tokio::test]
async fn a_declined_card_at_checkout_leaves_the_session_open_and_makes_nothing() {
    let stand = start().await;
    let customer = stand.customer().await;
    let price = stand.licensed_price(2000).await;
    let session = stand.session(&customer, &price, None).await;
    let declined = stand.pay(&session, BAD_CARD).await;
    assert_eq!(declined.status(), StatusCode::PAYMENT_REQUIRED);
    assert!(declined
        .text()
        .await
        .unwrap()
        .contains("Your card was declined"));
    let other = stand.pay(&session, "5555 5555 5555 4444").await;
    assert!(other.text().await.unwrap().contains("Use a test card"));
    let id = session["id"].as_str().unwrap();
    assert_eq!(status(&stand.fetch_session(id).await), "open");
    assert!(data(&stand.fetch("/v1/subscriptions", &[("status", "all")]).await).is_empty());
    assert!(stand.event_types().await.is_empty());
}

#[tokio::test]
async fn a_session_expires_when_asked_or_when_the_clock_passes_expires_at() {
    let stand = start().await;
    let id = expire_a_session(&stand).await;
    let expired = stand.fetch_session(&id).await;
    assert_eq!(
        (expired["status"].as_str(), expired["url"].as_str()),
        (Some("expired"), None)
    );

    let customer = stand.customer().await;
    let price = stand.licensed_price(500).await;
    let session = stand.session(&customer, &price, None).await;
    let (clock, now) = stand.clock().await;
    stand.advance(&clock, now + DAY + 60).await;
    let id = session["id"].as_str().unwrap();
    assert_eq!(status(&stand.fetch_session(id).await), "expired");
    assert_eq!(
        stand.pay(&session, GOOD_CARD).await.status(),
        StatusCode::GONE
    );
    assert_eq!(
        stand.event_types().await,
        ["checkout.session.expired", "checkout.session.expired"]
    );
}

#[tokio::test]
async fn a_renewal_with_a_good_card_is_invoiced_paid_and_starts_the_next_period() {
    let (stand, _, sub) = subscribed().await;
    stand.next_period().await;
    let invoices = stand.fetch("/v1/invoices", &[("subscription", &sub)]).await;
    let renewal = &data(&invoices)[0];
    assert_eq!(
        (
            renewal["billing_reason"].as_str(),
            renewal["status"].as_str(),
            renewal["amount_due"].as_i64()
        ),
        (Some("subscription_cycle"), Some("paid"), Some(2000))
    );
    let sub = stand.subscription(&sub).await;
    assert_eq!(sub["status"], "active");
    assert_eq!(
        sub["items"]["data"][0]["current_period_start"],
        renewal["period_end"]
    );
    let events = stand.event_types().await;
    assert_eq!(
        events[3..],
        ["invoice.paid", "customer.subscription.updated"]
    );
}

#[tokio::test]
async fn a_failing_renewal_makes_the_subscription_past_due_then_unpaid_after_three_attempts_over_three_days(
) {
    let (stand, customer, sub) = subscribed().await;
    stand.set_card(&customer, "4000000000000341").await;
    let (clock, now) = stand.clock().await;

    let renewal_at = now + 32 * DAY;
    stand.advance(&clock, renewal_at).await;
    assert_eq!(status(&stand.subscription(&sub).await), "past_due");
    let invoices = stand.open_invoices(&sub).await;
    assert_eq!(data(&invoices)[0]["attempt_count"], 1);
    let updated = stand.events_of("customer.subscription.updated").await;
    assert_eq!(
        data(&updated)[0]["data"]["previous_attributes"]["status"],
        "active"
    );

    stand.advance(&clock, renewal_at + DAY).await;
    assert_eq!(status(&stand.subscription(&sub).await), "past_due");
    stand.advance(&clock, renewal_at + 3 * DAY).await;
    assert_eq!(status(&stand.subscription(&sub).await), "unpaid");
    let invoices = stand.open_invoices(&sub).await;
    assert_eq!(data(&invoices)[0]["attempt_count"], 3);
    let failures = stand.events_of("invoice.payment_failed").await;
    assert_eq!(data(&failures).len(), 3);
}

#[tokio::test]
async fn paying_an_open_invoice_declines_on_a_bad_card_and_reactivates_the_subscription_on_a_good_one(
) {
    let (stand, customer, sub) = subscribed().await;
    stand.set_card(&customer, "4000000000000341").await;
    stand.next_period().await;
    let invoices = stand.open_invoices(&sub).await;
    let pay = format!(
        "/v1/invoices/{}/pay",
        data(&invoices)[0]["id"].as_str().unwrap()
    );

    let declined = stand.post(&pay, &[]).await;
    assert_eq!(declined.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(
        (
            declined.body["error"]["type"].as_str(),
            declined.body["error"]["code"].as_str()
        ),
        (Some("card_error"), Some("card_declined"))
    );

    stand.set_card(&customer, "4242 4242 4242 4242").await;
    let paid = stand.ok(&pay, &[]).await;
    assert_eq!(paid["status"], "paid");
    assert_eq!(status(&stand.subscription(&sub).await), "active");
    let events = stand.event_types().await;
    assert_eq!(
        events[events.len() - 3..],
        [
            "invoice.payment_failed",
            "invoice.paid",
            "customer.subscription.updated"
        ]
    );
    assert_eq!(stand.post(&pay, &[]).await.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_subscription_set_to_cancel_at_period_end_ends_with_the_period() {
    let (stand, _, sub) = subscribed().await;
    let updated = stand
        .ok(
            &format!("/v1/subscriptions/{sub}"),
            &[("cancel_at_period_end", "true")],
        )
        .await;
    assert_eq!(updated["cancel_at_period_end"], true);
    let updates = stand.events_of("customer.subscription.updated").await;
    let event = &data(&updates)[0];
    assert_eq!(
        event["data"]["previous_attributes"]["cancel_at_period_end"],
        false
    );
    assert!(event["request"]["id"].as_str().unwrap().starts_with("req_"));

    stand.next_period().await;
    let ended = stand.subscription(&sub).await;
    assert_eq!(ended["status"], "canceled");
    assert!(ended["ended_at"].is_i64());
    assert_eq!(
        stand.event_types().await.last().unwrap(),
        "customer.subscription.deleted"
    );
    assert_eq!(
        data(&stand.fetch("/v1/invoices", &[("subscription", &sub)]).await).len(),
        1
    );
}

#[tokio::test]
async fn deleting_a_subscription_cancels_it_at_once() {
    let (stand, customer, sub) = subscribed().await;
    let canceled = stand
        .send(
            reqwest::Method::DELETE,
            &format!("/v1/subscriptions/{sub}"),
            &[],
            None,
        )
        .await;
    assert_eq!(canceled.body["status"], "canceled");
    assert!(canceled.body["canceled_at"].is_i64() && canceled.body["ended_at"].is_i64());
    assert_eq!(
        stand.event_types().await.last().unwrap(),
        "customer.subscription.deleted"
    );
    assert!(data(
        &stand
            .fetch("/v1/subscriptions", &[("customer", &customer)])
            .await
    )
    .is_empty());
}

#[tokio::test]
async fn metered_usage_over_the_period_is_billed_at_the_price_rounded_to_cents() {
    let stand = start().await;
    let customer = stand.customer().await;
    let licensed = stand.licensed_price(1000).await;
    let (_, metered) = stand.metered_price("tokens", "0.25").await;
    let session = stand.session(&customer, &licensed, Some(&metered)).await;
    assert_eq!(session["amount_total"], 1000);
    stand.pay(&session, GOOD_CARD).await;
    for value in ["7", "3"] {
        let event = stand.meter_event("tokens", &customer, value, &[]).await;
        event.ok("meter event");
    }
    stand.next_period().await;
    let invoices = stand
        .fetch("/v1/invoices", &[("customer", &customer)])
        .await;
    let renewal = &data(&invoices)[0];
    let amounts: Vec<_> = data(&renewal["lines"])
        .iter()
        .map(|l| (l["quantity"].clone(), l["amount"].clone()))
        .collect();
    assert_eq!(amounts, [(json!(1), json!(1000)), (json!(10), json!(3))]);
    assert_eq!(renewal["total"], 1003);
}

#[tokio::test]
async fn a_meter_event_with_an_identifier_already_seen_is_answered_but_not_counted_again() {
    let stand = start().await;
    let customer = stand.customer().await;
    let (meter, _) = stand.metered_price("calls", "1").await;
    let once = [("identifier", "call-1")];
    let first = stand.meter_event("calls", &customer, "5", &once).await;
    let again = stand.meter_event("calls", &customer, "5", &once).await;
    let (first, again) = (first.ok("first"), again.ok("again"));
    assert_eq!(
        (first["identifier"].as_str(), again["identifier"].as_str()),
        (Some("call-1"), Some("call-1"))
    );
    let received = stand.local("/_local/meter_events").await;
    assert_eq!(
        (
            received[0]["counted"].as_bool(),
            received[1]["counted"].as_bool()
        ),
        (Some(true), Some(false))
    );
    let now = unix_now();
    let summaries = stand
        .summaries(&meter, &customer, (now - 3600, now + 3600), &[])
        .await;
    assert_eq!(data(&summaries).len(), 1);
    assert_eq!(data(&summaries)[0]["aggregated_value"], 5);
}

#[tokio::test]
async fn meter_event_summaries_split_by_the_grouping_window() {
    let stand = start().await;
    let customer = stand.customer().await;
    let (meter, _) = stand.metered_price("calls", "1").await;
    let hour = unix_now() / 3600 * 3600;
    for (at, value) in [(hour - 3000, "2"), (hour - 10, "3"), (hour + 5, "4")] {
        let at = at.to_string();
        let event = stand
            .meter_event("calls", &customer, value, &[("timestamp", &at)])
            .await;
        event.ok("meter event");
    }
    let hourly = [("value_grouping_window", "hour")];
    let summaries = stand
        .summaries(&meter, &customer, (hour - 3600, hour + 3600), &hourly)
        .await;
    let values: Vec<_> = data(&summaries)
        .iter()
        .map(|s| s["aggregated_value"].clone())
        .collect();
    assert_eq!(values, [json!(5), json!(4)]);
}

#[tokio::test]
async fn meter_events_with_a_fractional_value_or_a_stale_timestamp_are_refused_naming_the_param() {
    let stand = start().await;
    let customer = stand.customer().await;
    stand.metered_price("calls", "1").await;
    let post = |value: &'static str, at: String| {
        let customer = customer.clone();
        let stand = &stand;
        async move {
            stand
                .meter_event("calls", &customer, value, &[("timestamp", &at)])
                .await
        }
    };
    let fractional = post("1.5", unix_now().to_string()).await;
    assert_eq!(fractional.body["error"]["param"], "payload[value]");
    let stale = post("1", (unix_now() - 36 * DAY).to_string()).await;
    assert_eq!(stale.body["error"]["param"], "timestamp");
    let ahead = post("1", (unix_now() + 600).to_string()).await;
    assert_eq!(ahead.body["error"]["param"], "timestamp");
}

#[tokio::test]
async fn a_second_active_meter_with_the_same_event_name_is_refused() {
    let stand = start().await;
    stand.metered_price("calls", "1").await;
    let again = stand.post_meter("Again", "calls").await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);
    assert_eq!(again.body["error"]["param"], "event_name");
}

#[tokio::test]
async fn a_metered_price_needs_a_meter_and_a_metered_line_takes_no_quantity() {
    let stand = start().await;
    let product = stand.product("X").await;
    let terms = [
        ("unit_amount", "1"),
        ("recurring[interval]", "month"),
        ("recurring[usage_type]", "metered"),
    ];
    let no_meter = stand.post_price(&product, &terms).await;
    assert_eq!(no_meter.body["error"]["param"], "recurring[meter]");
    let customer = stand.customer().await;
    let (_, metered) = stand.metered_price("calls", "1").await;
    let line = [
        ("line_items[0][price]", metered.as_str()),
        ("line_items[0][quantity]", "1"),
    ];
    let with_quantity = stand.post_session(Some(&customer), &line).await;
    assert_eq!(
        with_quantity.body["error"]["param"],
        "line_items[0][quantity]"
    );
}

#[tokio::test]
async fn the_portal_page_lists_subscriptions_and_its_button_cancels_at_period_end() {
    let (stand, customer, sub) = subscribed().await;
    let portal = stand.portal(&customer).await;
    let url = portal["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("{}/portal/bps_", stand.stripe.url())));
    let html = stand.page(url).await;
    assert!(html.contains("Pro plan") && html.contains("Cancel at period end"));
    let canceled = stand
        .http
        .post(url)
        .form(&[("subscription", &sub)])
        .send()
        .await
        .unwrap();
    assert_eq!(canceled.status(), StatusCode::SEE_OTHER);
    assert_eq!(stand.subscription(&sub).await["cancel_at_period_end"], true);
}

#[tokio::test]
async fn a_test_clock_cannot_go_back() {
    let stand = start().await;
    let (clock, now) = stand.clock().await;
    let answer = stand.post_advance(&clock, now - 10).await;
    assert_eq!(answer.body["error"]["param"], "frozen_time");
    let moved = stand.advance(&clock, now + DAY).await;
    assert_eq!(
        (moved["frozen_time"].as_i64(), moved["status"].as_str()),
        (Some(now + DAY), Some("ready"))
    );
    let customer = stand.ok("/v1/customers", &[]).await;
    assert!(customer["created"].as_i64().unwrap() >= now + DAY);
}
