//! Tenant isolation: every route that takes an object id answers 404 to a
//! caller from another organisation, and changes nothing. The table must
//! cover every id route in the route table.

use std::collections::BTreeSet;

use agora_control_plane::domain::{OrgKind, Role};
use reqwest::StatusCode;
use serde_json::json;

use crate::common::*;

/// Catalogue objects anyone signed in may read.
const PUBLIC_ID_ROUTES: &[&str] = &[
    "/api/marketplace-categories/{uuid}/",
    "/api/marketplace-service-providers/{uuid}/",
    "/api/marketplace-public-offerings/{uuid}/",
];

async fn other_tenants_get_404(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let provider = app.tenant("Acme", OrgKind::Provider).await;
    let buyer = app.tenant("Globex", OrgKind::Customer).await;
    let (agent, free, paid) = app.published_agent(&provider).await;
    let (order, config) = app.subscribed(&buyer, agent, free).await;
    let (_, resources) = app.get(&buyer.token, "/api/marketplace-resources/").await;
    let resource = resources["results"][0]["uuid"].as_str().unwrap().to_owned();
    let (_, project) = app
        .post(&buyer.token, "/api/projects/", json!({"name": "Site"}))
        .await;
    let project = id(&project);
    let (_, key) = app
        .post(
            &buyer.token,
            &format!("/api/customer-agent-configs/{config}/api_keys/"),
            json!({}),
        )
        .await;
    let key = id(&key);
    let (_, doc) = app
        .post_raw(
            &buyer.token,
            "/api/training-documents/?filename=a.txt",
            "text/plain",
            b"hello".to_vec(),
        )
        .await;
    let doc = id(&doc);
    // An invitation from the buyer's organisation, to a user who is not the
    // stranger, and the buyer's own token's id.
    let (_, invitation) = app
        .post(
            &buyer.token,
            &format!("/api/organizations/{}/invitations/", buyer.org),
            json!({"username": "someone-else", "role": "member"}),
        )
        .await;
    let invitation = id(&invitation);
    let (_, tokens) = app.get(&buyer.token, "/api/auth/tokens/").await;
    let token_id = tokens[0]["id"].as_str().unwrap().to_owned();
    // A subscription of the buyer's, as a paid order's webhook leaves it.
    let subscription = uuid::Uuid::new_v4();
    sqlx::query("INSERT INTO subscriptions (uuid, org_uuid, order_uuid, plan_uuid, stripe_id, stripe_customer, status, current_period_start, current_period_end, cancel_at_period_end, created_at, updated_at) VALUES ($1, $2, $3, $4, 'sub_isolation', 'cus_isolation', 'active', 0, 1, 0, 0, 0)")
        .bind(subscription.to_string())
        .bind(buyer.org.to_string())
        .bind(order.to_string())
        .bind(free.to_string())
        .execute(&app.state.db.pool)
        .await
        .unwrap();

    // The stranger owns a provider and a customer organisation of their own.
    let stranger = app.tenant("Initech", OrgKind::Customer).await;
    let stranger_provider = agora_control_plane::identity::create_org(
        &app.state.db,
        "Initech Labs",
        OrgKind::Provider,
        "",
        stranger.user,
    )
    .await
    .unwrap();
    agora_control_plane::identity::add_member(
        &app.state.db,
        stranger_provider,
        stranger.user,
        Role::Owner,
    )
    .await
    .unwrap();

    let flow = sample_flow();
    let cases: Vec<(&str, &str, String, Option<serde_json::Value>, bool)> = vec![
        (
            "get",
            "/api/organizations/{uuid}/",
            format!("/api/organizations/{}/", buyer.org),
            None,
            false,
        ),
        (
            "post",
            "/api/organizations/{uuid}/review/",
            format!("/api/organizations/{}/review/", stranger_provider),
            Some(json!({"approved": true, "custom_code_allowed": true})),
            false,
        ),
        (
            "get",
            "/api/organizations/{uuid}/usage/",
            format!("/api/organizations/{}/usage/", buyer.org),
            None,
            false,
        ),
        (
            "get",
            "/api/projects/{uuid}/",
            format!("/api/projects/{project}/"),
            None,
            false,
        ),
        (
            "get",
            "/api/organizations/{uuid}/members/",
            format!("/api/organizations/{}/members/", buyer.org),
            None,
            false,
        ),
        (
            "post",
            "/api/organizations/{uuid}/members/",
            format!("/api/organizations/{}/members/", buyer.org),
            Some(json!({"username": "anyone", "role": "owner"})),
            false,
        ),
        (
            "delete",
            "/api/organizations/{uuid}/members/{user}/",
            format!("/api/organizations/{}/members/{}/", buyer.org, buyer.user),
            None,
            false,
        ),
        (
            "get",
            "/api/organizations/{uuid}/invitations/",
            format!("/api/organizations/{}/invitations/", buyer.org),
            None,
            false,
        ),
        (
            "post",
            "/api/organizations/{uuid}/invitations/",
            format!("/api/organizations/{}/invitations/", buyer.org),
            Some(json!({"username": "stranger-friend", "role": "owner"})),
            false,
        ),
        (
            "delete",
            "/api/organizations/{uuid}/invitations/{invitation}/",
            format!("/api/organizations/{}/invitations/{invitation}/", buyer.org),
            None,
            false,
        ),
        (
            "post",
            "/api/invitations/{uuid}/accept/",
            format!("/api/invitations/{invitation}/accept/"),
            None,
            false,
        ),
        (
            "post",
            "/api/invitations/{uuid}/decline/",
            format!("/api/invitations/{invitation}/decline/"),
            None,
            false,
        ),
        (
            "delete",
            "/api/auth/tokens/{id}/",
            format!("/api/auth/tokens/{token_id}/"),
            None,
            false,
        ),
        (
            "get",
            "/api/marketplace-orders/{uuid}/",
            format!("/api/marketplace-orders/{order}/"),
            None,
            false,
        ),
        (
            "get",
            "/api/marketplace-resources/{uuid}/",
            format!("/api/marketplace-resources/{resource}/"),
            None,
            false,
        ),
        (
            "get",
            "/api/provider-agents/{uuid}/",
            format!("/api/provider-agents/{agent}/"),
            None,
            false,
        ),
        (
            "patch",
            "/api/provider-agents/{uuid}/",
            format!("/api/provider-agents/{agent}/"),
            Some(json!({"name": "Hijacked"})),
            false,
        ),
        (
            "delete",
            "/api/provider-agents/{uuid}/",
            format!("/api/provider-agents/{agent}/"),
            None,
            false,
        ),
        (
            "post",
            "/api/provider-agents/{uuid}/import_flow/",
            format!("/api/provider-agents/{agent}/import_flow/"),
            None,
            true,
        ),
        (
            "post",
            "/api/provider-agents/{uuid}/publish/",
            format!("/api/provider-agents/{agent}/publish/"),
            Some(json!({})),
            false,
        ),
        (
            "post",
            "/api/provider-agents/{uuid}/unpublish/",
            format!("/api/provider-agents/{agent}/unpublish/"),
            Some(json!({})),
            false,
        ),
        (
            "get",
            "/api/provider-agents/{uuid}/plans/",
            format!("/api/provider-agents/{agent}/plans/"),
            None,
            false,
        ),
        (
            "post",
            "/api/provider-agents/{uuid}/plans/",
            format!("/api/provider-agents/{agent}/plans/"),
            Some(json!({"name": "Steal", "price_cents": 0})),
            false,
        ),
        (
            "delete",
            "/api/provider-agents/{uuid}/plans/{plan}/",
            format!("/api/provider-agents/{agent}/plans/{paid}/"),
            None,
            false,
        ),
        (
            "get",
            "/api/provider-agents/{uuid}/usage/",
            format!("/api/provider-agents/{agent}/usage/"),
            None,
            false,
        ),
        (
            "get",
            "/api/customer-agent-configs/{uuid}/usage/",
            format!("/api/customer-agent-configs/{config}/usage/"),
            None,
            false,
        ),
        (
            "get",
            "/api/customer-agent-configs/{uuid}/",
            format!("/api/customer-agent-configs/{config}/"),
            None,
            false,
        ),
        (
            "patch",
            "/api/customer-agent-configs/{uuid}/",
            format!("/api/customer-agent-configs/{config}/"),
            Some(json!({"tone": "casual"})),
            false,
        ),
        (
            "get",
            "/api/customer-agent-configs/{uuid}/api_keys/",
            format!("/api/customer-agent-configs/{config}/api_keys/"),
            None,
            false,
        ),
        (
            "post",
            "/api/customer-agent-configs/{uuid}/api_keys/",
            format!("/api/customer-agent-configs/{config}/api_keys/"),
            Some(json!({})),
            false,
        ),
        (
            "get",
            "/api/customer-agent-configs/{uuid}/widget_embed/",
            format!("/api/customer-agent-configs/{config}/widget_embed/"),
            None,
            false,
        ),
        (
            "post",
            "/api/agent-api-keys/{uuid}/revoke/",
            format!("/api/agent-api-keys/{key}/revoke/"),
            Some(json!({})),
            false,
        ),
        (
            "post",
            "/api/stripe-subscriptions/{uuid}/cancel/",
            format!("/api/stripe-subscriptions/{subscription}/cancel/"),
            Some(json!({"at_period_end": false})),
            false,
        ),
        (
            "get",
            "/api/training-documents/{uuid}/",
            format!("/api/training-documents/{doc}/"),
            None,
            false,
        ),
        (
            "delete",
            "/api/training-documents/{uuid}/",
            format!("/api/training-documents/{doc}/"),
            None,
            false,
        ),
    ];

    // The table covers every id route that is not a public catalogue object.
    let expected: BTreeSet<(String, String)> = agora_control_plane::ROUTES
        .iter()
        .filter(|r| r.path.contains('{') && !PUBLIC_ID_ROUTES.contains(&r.path))
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    let covered: BTreeSet<(String, String)> = cases
        .iter()
        .map(|c| (c.0.to_owned(), c.1.to_owned()))
        .collect();
    assert_eq!(
        covered, expected,
        "the isolation table must cover every id route"
    );

    for (method, template, url, body, raw_flow) in &cases {
        let (status, response) = if *raw_flow {
            app.post_raw(
                &stranger.token,
                url,
                "application/json",
                flow.clone().into_bytes(),
            )
            .await
        } else {
            app.call(
                &method.to_uppercase(),
                Some(&stranger.token),
                url,
                body.clone(),
            )
            .await
        };
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "{method} {template}: {response}"
        );
        assert_eq!(
            response["error"]["code"], "not_found",
            "{method} {template}"
        );
    }

    // Nothing changed.
    let (_, a) = app
        .get(&provider.token, &format!("/api/provider-agents/{agent}/"))
        .await;
    assert_eq!(
        (a["name"].as_str(), a["status"].as_str()),
        (Some("Helper Bot"), Some("published"))
    );
    assert_eq!(a["plans"].as_array().unwrap().len(), 2);
    assert!(a["plans"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["active"] == true));
    let (_, c) = app
        .get(
            &buyer.token,
            &format!("/api/customer-agent-configs/{config}/"),
        )
        .await;
    assert_eq!(c["tone"], "professional");
    let (_, keys) = app
        .get(
            &buyer.token,
            &format!("/api/customer-agent-configs/{config}/api_keys/"),
        )
        .await;
    assert_eq!(keys.as_array().unwrap().len(), 1);
    assert_eq!(keys[0]["status"], "active");
    let (s, _) = app
        .get(&buyer.token, &format!("/api/training-documents/{doc}/"))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, open) = app
        .get(
            &buyer.token,
            &format!("/api/organizations/{}/invitations/", buyer.org),
        )
        .await;
    assert_eq!(open.as_array().unwrap().len(), 1, "{open}");
    assert_eq!(open[0]["uuid"], invitation.to_string());
    let (s, _) = app.get(&buyer.token, "/api/auth/tokens/").await;
    assert_eq!(s, StatusCode::OK, "the buyer's token still works");
    let (_, mine) = app.get(&stranger.token, "/api/invitations/").await;
    assert_eq!(mine, json!([]), "nobody invited the stranger");

    // Lists show the stranger none of it.
    for list in [
        "/api/marketplace-orders/",
        "/api/marketplace-resources/",
        "/api/provider-agents/",
        "/api/customer-agent-configs/",
        "/api/training-documents/",
        "/api/projects/",
    ] {
        let (s, page) = app.get(&stranger.token, list).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(page["count"], 0, "{list}: {page}");
    }
    // Ordering into someone else's organisation or project is a 404 too.
    let (s, _) = app
        .post(
            &stranger.token,
            "/api/marketplace-orders/",
            json!({"offering": agent, "plan": free, "organization": buyer.org}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app.post(&stranger.token, "/api/marketplace-orders/", json!({"offering": agent, "plan": free, "organization": stranger.org, "project": project})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Linking another tenant's document to one's own config is a 404.
    let (_, own_config) = app.subscribed_in(&stranger, agent, free).await;
    let (s, _) = app
        .patch(
            &stranger.token,
            &format!("/api/customer-agent-configs/{own_config}/"),
            json!({"knowledge_documents": [doc]}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    app.finish().await;
}

crate::both!(other_tenants_get_404);
