//! Stripe's wire rules: keys, errors, idempotency, lists, encoding, faults.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::json;

#[tokio::test]
async fn a_request_with_a_wrong_or_missing_key_is_refused_401_without_echoing_the_key() {
    let stand = start().await;
    let url = format!("{}/v1/customers", stand.stripe.url());
    let wrong = stand
        .http
        .get(&url)
        .bearer_auth("sk_test_guessed123")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = wrong.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(
        body["error"]["message"],
        "Invalid API Key provided: sk_test_****"
    );
    let missing = stand.http.get(&url).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    let basic = stand
        .http
        .get(&url)
        .basic_auth(stand.stripe.secret_key(), Some(""))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_missing_parameter_is_a_400_naming_it() {
    let stand = start().await;
    let price = stand.licensed_price(1000).await;
    let answer = stand
        .post_session(None, &[("line_items[0][price]", &price)])
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.body["error"]["type"], "invalid_request_error");
    assert_eq!(answer.body["error"]["code"], "parameter_missing");
    assert_eq!(answer.body["error"]["param"], "customer");
}

#[tokio::test]
async fn an_unknown_id_in_the_path_is_a_404_resource_missing_and_in_a_parameter_a_400() {
    let stand = start().await;
    let answer = stand.get("/v1/customers/cus_nope", &[]).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.body["error"]["code"], "resource_missing");
    assert_eq!(answer.body["error"]["param"], "id");
    let answer = stand.post_price("prod_nope", &[("unit_amount", "5")]).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.body["error"]["code"], "resource_missing");
    assert_eq!(answer.body["error"]["param"], "product");
}

#[tokio::test]
async fn unknown_parameters_and_bad_integers_are_refused_naming_them() {
    let stand = start().await;
    let unknown = stand.post("/v1/customers", &[("nmae", "Ada")]).await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
    assert_eq!(unknown.body["error"]["code"], "parameter_unknown");
    assert_eq!(unknown.body["error"]["param"], "nmae");
    let bad = stand.get("/v1/customers", &[("limit", "ten")]).await;
    assert_eq!(bad.body["error"]["code"], "parameter_invalid_integer");
    assert_eq!(bad.body["error"]["param"], "limit");
}

#[tokio::test]
async fn a_price_amount_cannot_be_changed_after_it_is_made() {
    let stand = start().await;
    let price = stand.licensed_price(1000).await;
    let answer = stand
        .post(&format!("/v1/prices/{price}"), &[("unit_amount", "2000")])
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.body["error"]["param"], "unit_amount");
    let updated = stand
        .ok(
            &format!("/v1/prices/{price}"),
            &[("active", "false"), ("metadata[tier]", "old")],
        )
        .await;
    assert_eq!(
        (updated["active"].clone(), updated["unit_amount"].clone()),
        (json!(false), json!(1000))
    );
    assert_eq!(updated["metadata"], json!({"tier": "old"}));
}

#[tokio::test]
async fn a_repeated_idempotent_request_gets_the_first_answer_marked_replayed_and_acts_once() {
    let stand = start().await;
    let form = [("email", "ada@example.com")];
    let first = stand.post_once("/v1/customers", &form, "key-1").await;
    let second = stand.post_once("/v1/customers", &form, "key-1").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(first.body, second.body);
    assert_eq!(second.headers["idempotent-replayed"], "true");
    assert!(first.headers.get("idempotent-replayed").is_none());
    let all = stand.fetch("/v1/customers", &[]).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn an_idempotency_key_used_again_with_other_parameters_is_refused() {
    let stand = start().await;
    let (first, then) = ([("name", "A")], [("name", "B")]);
    stand.post_once("/v1/customers", &first, "key-2").await;
    let other = stand.post_once("/v1/customers", &then, "key-2").await;
    assert_eq!(other.status, StatusCode::BAD_REQUEST);
    assert_eq!(other.body["error"]["type"], "idempotency_error");
    assert!(other.body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Keys for idempotent requests can only be used with the same parameters they were first used with."));
}

#[tokio::test]
async fn every_answer_carries_a_request_id_and_errors_too() {
    let stand = start().await;
    let ok = stand.get("/v1/customers", &[]).await;
    let missing = stand.get("/v1/nothing_here", &[]).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    for answer in [ok, missing] {
        let id = answer.headers["request-id"].to_str().unwrap();
        assert!(id.starts_with("req_"), "{id}");
    }
}

#[tokio::test]
async fn lists_are_newest_first_and_page_with_limit_and_starting_after() {
    let stand = start().await;
    let mut made = Vec::new();
    for name in ["a", "b", "c"] {
        made.push(stand.ok("/v1/customers", &[("name", name)]).await["id"].clone());
    }
    let first = stand.fetch("/v1/customers", &[("limit", "2")]).await;
    assert_eq!(first["object"], "list");
    assert_eq!(first["url"], "/v1/customers");
    assert_eq!(first["has_more"], true);
    let ids: Vec<_> = first["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(ids, vec![made[2].clone(), made[1].clone()]);
    let after = ids[1].as_str().unwrap();
    let rest = stand
        .fetch(
            "/v1/customers",
            &[("limit", "2"), ("starting_after", after)],
        )
        .await;
    assert_eq!(rest["has_more"], false);
    assert_eq!(rest["data"][0]["id"], made[0]);
    let too_many = stand.get("/v1/customers", &[("limit", "101")]).await;
    assert_eq!(too_many.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn nested_form_parameters_are_read_as_stripe_reads_them_and_logged_decoded() {
    let stand = start().await;
    let customer = stand
        .ok(
            "/v1/customers",
            &[
                ("metadata[tenant]", "t_9"),
                ("metadata[plan]", "pro"),
                ("expand[]", "test_clock"),
            ],
        )
        .await;
    assert_eq!(
        customer["metadata"],
        json!({"tenant": "t_9", "plan": "pro"})
    );
    let requests = stand.local("/_local/requests").await;
    let last = requests.last().unwrap();
    assert_eq!(last["method"], "POST");
    assert_eq!(last["path"], "/v1/customers");
    assert_eq!(last["status"], 200);
    assert_eq!(last["params"]["metadata"]["tenant"], "t_9");
    assert_eq!(last["params"]["expand"], json!(["test_clock"]));
}

#[tokio::test]
async fn the_request_log_keeps_idempotency_keys_and_refused_requests() {
    let stand = start().await;
    let form = [("name", "A")];
    stand.post_once("/v1/customers", &form, "k-log").await;
    stand.get("/v1/customers/cus_missing", &[]).await;
    let log = stand.local("/_local/requests").await;
    assert_eq!(log[0]["idempotency_key"], "k-log");
    assert_eq!(
        (log[1]["path"].as_str(), log[1]["status"].as_u64()),
        (Some("/v1/customers/cus_missing"), Some(404))
    );
}

#[tokio::test]
async fn an_injected_fault_answers_its_status_for_the_next_n_matching_requests_without_effect() {
    let stand = start().await;
    let customer = stand.customer().await;
    stand.metered_price("api_call", "1").await;
    stand
        .control(
            "/_local/faults",
            json!({"path_prefix": "/v1/billing/meter_events", "status": 429, "count": 2}),
        )
        .await;
    for _ in 0..2 {
        let refused = stand.meter_event("api_call", &customer, "3", &[]).await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.body["error"]["type"], "invalid_request_error");
        assert_eq!(refused.body["error"]["code"], "rate_limit");
    }
    assert!(stand.local("/_local/meter_events").await.is_empty());
    let taken = stand.meter_event("api_call", &customer, "3", &[]).await;
    taken.ok("meter event");
    assert_eq!(stand.local("/_local/meter_events").await.len(), 1);

    stand
        .control(
            "/_local/faults",
            json!({"path_prefix": "/v1/customers", "status": 500, "count": 1}),
        )
        .await;
    let failed = stand.post("/v1/customers", &[("name", "B")]).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(failed.body["error"]["type"], "api_error");
    assert_eq!(
        stand.fetch("/v1/customers", &[]).await["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn expand_replaces_ids_with_the_objects_they_name() {
    let (stand, customer, subscription) = subscribed().await;
    let expanded = stand
        .fetch(
            &format!("/v1/subscriptions/{subscription}"),
            &[("expand[]", "latest_invoice"), ("expand[]", "customer")],
        )
        .await;
    assert_eq!(expanded["latest_invoice"]["object"], "invoice");
    assert_eq!(expanded["customer"]["id"], customer.as_str());
    let listed = stand
        .fetch(
            "/v1/subscriptions",
            &[("customer", &customer), ("expand[]", "data.latest_invoice")],
        )
        .await;
    assert_eq!(listed["data"][0]["latest_invoice"]["status"], "paid");
}

#[tokio::test]
async fn shutting_down_stops_taking_requests() {
    let stand = start().await;
    let url = stand.stripe.url();
    stand.stripe.shutdown().await;
    assert!(stand
        .http
        .get(format!("{url}/v1/customers"))
        .send()
        .await
        .is_err());
}
