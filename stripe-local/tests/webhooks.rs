//! Webhook delivery: signed, retried, duplicated, held and reordered.

mod common;

use agora_stripe_local::WebhookTarget;
use axum::http::StatusCode;
use common::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

/// Checks `Stripe-Signature` as a receiver does.
fn verify(secret: &str, header: &str, body: &str) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = Some(value),
            Some(("v1", value)) => v1 = Some(value),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let fresh = t.parse::<i64>().is_ok_and(|t| (unix_now() - t).abs() < 300);
    fresh
        && mac
            .verify_slice(&hex::decode(v1).unwrap_or_default())
            .is_ok()
}

async fn stand_with(receiver: &Receiver) -> Stand {
    start_with(vec![WebhookTarget::new(&receiver.url)]).await
}

#[tokio::test]
async fn events_are_delivered_as_json_signed_with_the_endpoints_secret() {
    let receiver = Receiver::start(0).await;
    let stand = stand_with(&receiver).await;
    let session = expire_a_session(&stand).await;
    let hit = receiver.wait_for(1).await.remove(0);
    let secret = stand.stripe.webhook_secret().unwrap();
    assert!(secret.starts_with("whsec_"));
    assert!(
        verify(secret, &hit.signature, &hit.body),
        "{}",
        hit.signature
    );
    assert!(!verify("whsec_other", &hit.signature, &hit.body));
    assert_eq!(hit.content_type, "application/json");
    assert_eq!(
        hit.user_agent,
        "Stripe/1.0 (+https://stripe.com/docs/webhooks)"
    );
    let event = hit.event();
    assert_eq!(event["type"], "checkout.session.expired");
    assert_eq!(event["data"]["object"]["id"], session.as_str());
    assert_eq!(event["api_version"], "2025-03-31.basil");
    assert_eq!(event["pending_webhooks"], 1);
    assert!(event["request"]["id"].as_str().unwrap().starts_with("req_"));
    let delivered = stand.local("/_local/deliveries").await;
    assert_eq!(delivered[0]["event_id"], event["id"]);
    assert_eq!(
        (
            delivered[0]["status"].as_u64(),
            delivered[0]["attempt"].as_u64()
        ),
        (Some(200), Some(1))
    );
}

#[tokio::test]
async fn a_delivery_answered_500_is_retried_until_the_receiver_takes_it() {
    let receiver = Receiver::start(2).await;
    let stand = stand_with(&receiver).await;
    expire_a_session(&stand).await;
    let hits = receiver.wait_for(3).await;
    assert!(hits.iter().all(|h| h.body == hits[0].body));
    let attempts = agora_testkit::eventually("three recorded attempts", || async {
        let delivered = stand.local("/_local/deliveries").await;
        (delivered.len() >= 3).then_some(delivered)
    })
    .await;
    let seen: Vec<_> = attempts
        .iter()
        .map(|d| (d["attempt"].clone(), d["status"].clone()))
        .collect();
    assert_eq!(
        seen,
        [
            (json!(1), json!(500)),
            (json!(2), json!(500)),
            (json!(3), json!(200))
        ]
    );
}

#[tokio::test]
async fn an_unreachable_endpoint_is_recorded_as_status_0_and_does_not_hold_up_others() {
    let unreachable = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}/gone", listener.local_addr().unwrap())
    };
    let receiver = Receiver::start(0).await;
    let stand = start_with(vec![
        WebhookTarget::new(unreachable),
        WebhookTarget::new(&receiver.url),
    ])
    .await;
    expire_a_session(&stand).await;
    receiver.wait_for(1).await;
    agora_testkit::eventually("a failed connection recorded", || async {
        let delivered = stand.local("/_local/deliveries").await;
        delivered.iter().any(|d| d["status"] == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn in_duplicate_mode_each_event_is_delivered_twice() {
    let receiver = Receiver::start(0).await;
    let stand = stand_with(&receiver).await;
    stand
        .control("/_local/delivery", json!({"mode": "duplicate"}))
        .await;
    expire_a_session(&stand).await;
    let hits = receiver.wait_for(2).await;
    assert_eq!(hits[0].event()["id"], hits[1].event()["id"]);
}

/// Holds deliveries and subscribes a customer, which makes three events:
/// their types, in the order made (the held queue's order).
async fn hold_three_events(stand: &Stand, receiver: &Receiver) -> Vec<String> {
    stand
        .control("/_local/delivery", json!({"mode": "hold"}))
        .await;
    let customer = stand.customer().await;
    let price = stand.licensed_price(1000).await;
    stand.subscribe(&customer, &price, None).await;
    assert!(receiver.hits().is_empty());
    assert!(stand.local("/_local/deliveries").await.is_empty());
    let made = stand.event_types().await;
    assert_eq!(made.len(), 3);
    made
}

/// The types of the first `n` events the receiver is sent, in arrival order.
async fn received_types(receiver: &Receiver, n: usize) -> Vec<String> {
    receiver
        .wait_for(n)
        .await
        .iter()
        .map(|h| h.event()["type"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn held_deliveries_wait_for_a_flush_and_go_out_in_the_order_asked() {
    let receiver = Receiver::start(0).await;
    let stand = stand_with(&receiver).await;
    let made = hold_three_events(&stand, &receiver).await;
    assert_eq!(
        made,
        [
            "customer.subscription.created",
            "invoice.paid",
            "checkout.session.completed"
        ]
    );

    let flushed = stand
        .control("/_local/delivery/flush", json!({"order": "reverse"}))
        .await;
    assert_eq!(flushed["flushed"], 3);
    let reversed: Vec<String> = made.into_iter().rev().collect();
    assert_eq!(received_types(&receiver, 3).await, reversed);
}

#[tokio::test]
async fn held_deliveries_flushed_in_an_explicit_order_go_out_in_exactly_that_order() {
    let receiver = Receiver::start(0).await;
    let stand = stand_with(&receiver).await;
    let made = hold_three_events(&stand, &receiver).await;

    let indices = [1, 2, 0];
    let flushed = stand
        .control(
            "/_local/delivery/flush",
            json!({"order": "explicit", "indices": indices}),
        )
        .await;
    assert_eq!(flushed["flushed"], 3);
    let asked: Vec<String> = indices.iter().map(|&i| made[i].clone()).collect();
    assert_eq!(received_types(&receiver, 3).await, asked);
}

#[tokio::test]
async fn a_flush_whose_indices_are_not_a_permutation_of_the_held_queue_is_refused_and_sends_nothing(
) {
    let receiver = Receiver::start(0).await;
    let stand = stand_with(&receiver).await;
    let made = hold_three_events(&stand, &receiver).await;

    for indices in [
        json!([0, 0, 1]),
        json!([0, 1]),
        json!([0, 1, 2, 3]),
        json!([0, 1, 3]),
        json!([0, -1, 2]),
        json!("0,1,2"),
        Value::Null,
    ] {
        let refused = stand
            .steer(
                "/_local/delivery/flush",
                json!({"order": "explicit", "indices": indices}),
            )
            .await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{indices}");
        assert_eq!(
            (
                refused.body["error"]["type"].as_str(),
                refused.body["error"]["param"].as_str()
            ),
            (Some("invalid_request_error"), Some("indices")),
            "{indices}: {}",
            refused.body
        );
    }
    assert!(receiver.hits().is_empty());
    assert!(stand.local("/_local/deliveries").await.is_empty());

    // Everything is still held: an as-made flush sends all three, once each.
    let flushed = stand
        .control("/_local/delivery/flush", json!({"order": "as_made"}))
        .await;
    assert_eq!(flushed["flushed"], 3);
    assert_eq!(received_types(&receiver, 3).await, made);
}

#[tokio::test]
async fn an_endpoint_made_through_the_api_gets_its_secret_once_and_only_its_enabled_events() {
    let receiver = Receiver::start(0).await;
    let stand = start().await;
    let enabled = ["invoice.paid", "customer.subscription.created"];
    let made = stand.webhook_endpoint(&receiver.url, &enabled, &[]).await;
    let secret = made["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_") && made["id"].as_str().unwrap().starts_with("we_"));
    let listed = stand.fetch("/v1/webhook_endpoints", &[]).await;
    assert!(listed["data"][0].get("secret").is_none());

    let customer = stand.customer().await;
    let price = stand.licensed_price(1000).await;
    stand.subscribe(&customer, &price, None).await;
    let hits = receiver.wait_for(2).await;
    let types: Vec<Value> = hits.iter().map(|h| h.event()["type"].clone()).collect();
    assert_eq!(types, ["customer.subscription.created", "invoice.paid"]);
    assert!(hits.iter().all(|h| verify(&secret, &h.signature, &h.body)));
    let completed = stand.events_of("checkout.session.completed").await;
    assert_eq!(completed["data"][0]["pending_webhooks"], 0);
}
