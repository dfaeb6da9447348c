//! Every object the stand-in serves has the same fields, recursively, as
//! Stripe's published example of it (`shared/fixtures/stripe/objects.json`
//! beside the checkout). Objects: key sets equal, recursing into values that
//! are objects on both sides; arrays: first elements, when both have one;
//! nulls are not looked into. `metadata` holds the caller's own keys, so only
//! its presence is compared.

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::{json, Value};

fn fixtures_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/stripe/objects.json")
}

/// Stripe's examples by object kind, or `None` (said plainly) when the
/// fixtures are not beside the checkout.
fn examples() -> Option<Value> {
    let path = fixtures_path();
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let all: Value = serde_json::from_str(&text).expect("objects.json is JSON");
            Some(all["resources"].clone())
        }
        Err(_) => {
            println!(
                "stripe fixtures not found at {}: shape comparison skipped",
                path.display()
            );
            None
        }
    }
}

/// Where `ours` and `theirs` differ in fields, as `path: what`.
fn differences(path: &str, ours: &Value, theirs: &Value, found: &mut Vec<String>) {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            for key in b.keys().filter(|k| !a.contains_key(*k)) {
                found.push(format!("{path}.{key}: missing"));
            }
            for key in a.keys().filter(|k| !b.contains_key(*k)) {
                found.push(format!("{path}.{key}: not in Stripe's example"));
            }
            for (key, value) in a.iter().filter(|(k, _)| k.as_str() != "metadata") {
                if let Some(example) = b.get(key) {
                    differences(&format!("{path}.{key}"), value, example, found);
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            if let (Some(x), Some(y)) = (a.first(), b.first()) {
                differences(&format!("{path}[0]"), x, y, found);
            }
        }
        _ => {}
    }
}

struct Served {
    examples: Value,
    found: Vec<String>,
    compared: usize,
}

impl Served {
    fn check(&mut self, kind: &str, what: &str, object: &Value) {
        let example = &self.examples[kind];
        assert!(example.is_object(), "no example of {kind}");
        assert!(object.is_object(), "{what} is not an object: {object}");
        differences(
            &format!("{what} ({kind})"),
            object,
            example,
            &mut self.found,
        );
        self.compared += 1;
    }

    fn check_first(&mut self, kind: &str, what: &str, list: &Value) {
        assert_eq!(list["object"], "list", "{what}");
        self.check(kind, what, &list["data"][0]);
    }
}

#[test]
fn the_comparison_finds_a_missing_field_an_extra_one_and_looks_inside_arrays() {
    let theirs =
        json!({"a": 1, "b": {"c": 1, "d": 2}, "e": [{"f": 1}], "metadata": {"x": "1"}, "n": null});
    let ours = json!({"a": 2, "b": {"c": 1, "z": 2}, "e": [{"f": 1, "g": 1}], "metadata": {}, "n": {"deep": 1}});
    let mut found = Vec::new();
    differences("o", &ours, &theirs, &mut found);
    found.sort();
    assert_eq!(
        found,
        [
            "o.b.d: missing",
            "o.b.z: not in Stripe's example",
            "o.e[0].g: not in Stripe's example"
        ]
    );
}

#[tokio::test]
async fn every_object_served_has_the_fields_of_stripes_example_of_it() {
    let Some(examples) = examples() else { return };
    let mut served = Served {
        examples,
        found: Vec::new(),
        compared: 0,
    };
    let receiver = Receiver::start(0).await;
    let stand = start().await;

    let (clock, now) = stand.clock().await;
    served.check(
        "test_helpers.test_clock",
        "created clock",
        &stand
            .fetch(&format!("/v1/test_helpers/test_clocks/{clock}"), &[])
            .await,
    );
    let customer = stand
        .ok(
            "/v1/customers",
            &[
                ("email", "ada@example.com"),
                ("name", "Ada"),
                ("metadata[tenant]", "t_1"),
                ("test_clock", &clock),
            ],
        )
        .await;
    served.check("customer", "new customer", &customer);
    let customer = customer["id"].as_str().unwrap().to_string();

    let product = stand
        .ok(
            "/v1/products",
            &[("name", "Pro"), ("description", "The pro plan")],
        )
        .await;
    served.check("product", "new product", &product);
    let product = product["id"].as_str().unwrap().to_string();
    served.check(
        "product",
        "updated product",
        &stand
            .ok(&format!("/v1/products/{product}"), &[("name", "Pro+")])
            .await,
    );
    let licensed = stand
        .ok(
            "/v1/prices",
            &[
                ("product", &product),
                ("currency", "usd"),
                ("unit_amount", "2000"),
                ("recurring[interval]", "month"),
                ("lookup_key", "pro_monthly"),
            ],
        )
        .await;
    served.check("price", "licensed price", &licensed);
    let meter = stand
        .ok(
            "/v1/billing/meters",
            &[
                ("display_name", "Calls"),
                ("event_name", "calls"),
                ("default_aggregation[formula]", "sum"),
            ],
        )
        .await;
    served.check("billing.meter", "new meter", &meter);
    let meter = meter["id"].as_str().unwrap().to_string();
    served.check_first(
        "billing.meter",
        "listed meters",
        &stand.fetch("/v1/billing/meters", &[]).await,
    );
    let metered = stand
        .ok(
            "/v1/prices",
            &[
                ("product", &product),
                ("currency", "usd"),
                ("unit_amount_decimal", "0.5"),
                ("recurring[interval]", "month"),
                ("recurring[usage_type]", "metered"),
                ("recurring[meter]", &meter),
            ],
        )
        .await;
    served.check("price", "metered price", &metered);
    let (licensed, metered) = (
        licensed["id"].as_str().unwrap(),
        metered["id"].as_str().unwrap(),
    );
    served.check_first(
        "price",
        "listed prices",
        &stand
            .fetch("/v1/prices", &[("product", &product), ("active", "true")])
            .await,
    );

    let made = stand
        .ok(
            "/v1/webhook_endpoints",
            &[
                ("url", &receiver.url),
                ("enabled_events[]", "*"),
                ("api_version", "2025-03-31.basil"),
            ],
        )
        .await;
    let mut without_secret = made.clone();
    assert!(without_secret
        .as_object_mut()
        .unwrap()
        .remove("secret")
        .is_some());
    served.check(
        "webhook_endpoint",
        "new webhook endpoint (less its secret)",
        &without_secret,
    );
    served.check_first(
        "webhook_endpoint",
        "listed webhook endpoints",
        &stand.fetch("/v1/webhook_endpoints", &[]).await,
    );

    let session = stand.session(&customer, licensed, Some(metered)).await;
    served.check("checkout.session", "open checkout session", &session);
    let session_id = session["id"].as_str().unwrap().to_string();
    stand.pay(&session, GOOD_CARD).await;
    let session = stand
        .fetch(&format!("/v1/checkout/sessions/{session_id}"), &[])
        .await;
    served.check("checkout.session", "paid checkout session", &session);

    let subscription = session["subscription"].as_str().unwrap().to_string();
    served.check(
        "subscription",
        "subscription",
        &stand
            .fetch(&format!("/v1/subscriptions/{subscription}"), &[])
            .await,
    );
    served.check_first(
        "subscription_item",
        "listed subscription items",
        &stand
            .fetch("/v1/subscription_items", &[("subscription", &subscription)])
            .await,
    );
    let invoice = session["invoice"].as_str().unwrap().to_string();
    served.check(
        "invoice",
        "first invoice",
        &stand.fetch(&format!("/v1/invoices/{invoice}"), &[]).await,
    );
    served.check_first(
        "line_item",
        "listed invoice lines",
        &stand
            .fetch(&format!("/v1/invoices/{invoice}/lines"), &[])
            .await,
    );
    served.check_first(
        "payment_method",
        "listed payment methods",
        &stand
            .fetch(&format!("/v1/customers/{customer}/payment_methods"), &[])
            .await,
    );
    served.check(
        "customer",
        "paying customer",
        &stand.fetch(&format!("/v1/customers/{customer}"), &[]).await,
    );

    let event = stand
        .ok(
            "/v1/billing/meter_events",
            &[
                ("event_name", "calls"),
                ("payload[stripe_customer_id]", &customer),
                ("payload[value]", "7"),
            ],
        )
        .await;
    served.check("billing.meter_event", "meter event", &event);
    let (start, end) = ((now - 3600).to_string(), (now + 3600).to_string());
    let summaries = stand
        .fetch(
            &format!("/v1/billing/meters/{meter}/event_summaries"),
            &[
                ("customer", &customer),
                ("start_time", &start),
                ("end_time", &end),
            ],
        )
        .await;
    served.check_first(
        "billing.meter_event_summary",
        "meter event summary",
        &summaries,
    );

    let portal = stand
        .ok(
            "/v1/billing_portal/sessions",
            &[
                ("customer", &customer),
                ("return_url", "https://agora.test/account"),
            ],
        )
        .await;
    served.check("billing_portal.session", "portal session", &portal);

    stand
        .control(
            &format!("/_local/customers/{customer}/card"),
            json!({"number": BAD_CARD}),
        )
        .await;
    served.check(
        "test_helpers.test_clock",
        "advanced clock",
        &stand.advance(&clock, now + 32 * DAY).await,
    );
    let renewal = stand
        .fetch(
            "/v1/invoices",
            &[("subscription", &subscription), ("status", "open")],
        )
        .await;
    served.check_first("invoice", "failed renewal invoice", &renewal);

    let events = stand.fetch("/v1/events", &[("limit", "100")]).await;
    for event in events["data"].as_array().unwrap() {
        let kind = event["type"].as_str().unwrap();
        let object = &event["data"]["object"];
        let object_kind = object["object"].as_str().unwrap();
        served.check(object_kind, &format!("{kind} event's object"), object);
        if !kind.ends_with(".updated") {
            let mut envelope = event.clone();
            envelope["data"]["object"] = Value::Null;
            served.check("event", &format!("{kind} event"), &envelope);
        }
    }
    let first = &events["data"][0]["id"];
    served.check("event", "fetched event", &{
        let mut e = stand
            .fetch(&format!("/v1/events/{}", first.as_str().unwrap()), &[])
            .await;
        e["data"] = json!({ "object": null });
        e
    });

    assert!(
        served.compared >= 25,
        "compared only {} objects",
        served.compared
    );
    assert!(
        served.found.is_empty(),
        "fields differ from Stripe's examples:\n{}",
        served.found.join("\n")
    );
}
