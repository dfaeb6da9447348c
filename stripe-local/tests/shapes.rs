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

struct Served<'a> {
    stand: &'a Stand,
    examples: Value,
    found: Vec<String>,
    compared: usize,
}

impl Served<'_> {
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

    /// GETs `path` (a query in it, if any) and checks the object answered,
    /// or a list's first object.
    async fn check_fetched(&mut self, kind: &str, what: &str, path: &str) {
        let answer = self.stand.fetch(path, &[]).await;
        if answer["object"] == "list" {
            self.check_first(kind, what, &answer);
        } else {
            self.check(kind, what, &answer);
        }
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
    let receiver = Receiver::start(0).await;
    let stand = start().await;
    let mut served = Served {
        stand: &stand,
        examples,
        found: Vec::new(),
        compared: 0,
    };

    let (clock, now) = stand.clock().await;
    served
        .check_fetched(
            "test_helpers.test_clock",
            "created clock",
            &format!("/v1/test_helpers/test_clocks/{clock}"),
        )
        .await;
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
    let terms = [
        ("unit_amount", "2000"),
        ("recurring[interval]", "month"),
        ("lookup_key", "pro_monthly"),
    ];
    let licensed = stand.post_price(&product, &terms).await.ok("licensed");
    served.check("price", "licensed price", &licensed);
    let meter = stand.post_meter("Calls", "calls").await.ok("meter");
    served.check("billing.meter", "new meter", &meter);
    let meter = meter["id"].as_str().unwrap().to_string();
    let terms = [
        ("unit_amount_decimal", "0.5"),
        ("recurring[interval]", "month"),
        ("recurring[usage_type]", "metered"),
        ("recurring[meter]", &meter),
    ];
    let metered = stand.post_price(&product, &terms).await.ok("metered");
    served.check("price", "metered price", &metered);
    let (licensed, metered) = (
        licensed["id"].as_str().unwrap(),
        metered["id"].as_str().unwrap(),
    );

    let made = stand
        .webhook_endpoint(
            &receiver.url,
            &["*"],
            &[("api_version", "2025-03-31.basil")],
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

    let session = stand.session(&customer, licensed, Some(metered)).await;
    served.check("checkout.session", "open checkout session", &session);
    let session_id = session["id"].as_str().unwrap().to_string();
    stand.pay(&session, GOOD_CARD).await;
    let session = stand.fetch_session(&session_id).await;
    served.check("checkout.session", "paid checkout session", &session);

    let subscription = session["subscription"].as_str().unwrap().to_string();
    let invoice = session["invoice"].as_str().unwrap().to_string();
    let fetched = [
        (
            "subscription",
            "subscription",
            format!("/v1/subscriptions/{subscription}"),
        ),
        (
            "invoice",
            "first invoice",
            format!("/v1/invoices/{invoice}"),
        ),
        (
            "customer",
            "paying customer",
            format!("/v1/customers/{customer}"),
        ),
        (
            "billing.meter",
            "listed meters",
            "/v1/billing/meters".to_string(),
        ),
        (
            "price",
            "listed prices",
            format!("/v1/prices?product={product}&active=true"),
        ),
        (
            "webhook_endpoint",
            "listed webhook endpoints",
            "/v1/webhook_endpoints".to_string(),
        ),
        (
            "subscription_item",
            "listed subscription items",
            format!("/v1/subscription_items?subscription={subscription}"),
        ),
        (
            "line_item",
            "listed invoice lines",
            format!("/v1/invoices/{invoice}/lines"),
        ),
        (
            "payment_method",
            "listed payment methods",
            format!("/v1/customers/{customer}/payment_methods"),
        ),
    ];
    for (kind, what, path) in &fetched {
        served.check_fetched(kind, what, path).await;
    }

    let event = stand.meter_event("calls", &customer, "7", &[]).await;
    served.check(
        "billing.meter_event",
        "meter event",
        &event.ok("meter event"),
    );
    let summaries = stand
        .summaries(&meter, &customer, (now - 3600, now + 3600), &[])
        .await;
    served.check_first(
        "billing.meter_event_summary",
        "meter event summary",
        &summaries,
    );

    let portal = stand.portal(&customer).await;
    served.check("billing_portal.session", "portal session", &portal);

    stand.set_card(&customer, BAD_CARD).await;
    served.check(
        "test_helpers.test_clock",
        "advanced clock",
        &stand.advance(&clock, now + 32 * DAY).await,
    );
    let renewal = stand.open_invoices(&subscription).await;
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
