//! The routes, by feature. API handlers read their parameters from the
//! [`Call`](crate::gate::Call) the gate made and answer a Stripe object.

mod billing;
mod catalog;
mod checkout;
mod control;
mod customers;
mod events;
mod meters;

use std::sync::Arc;

use axum::http::{Method, Uri};
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::Value;

use crate::error::ApiError;
use crate::Shared;

pub type Answer = Result<Json<Value>, ApiError>;

pub fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route(
            "/v1/customers",
            post(customers::create).get(customers::list),
        )
        .route("/v1/customers/{id}", get(customers::get))
        .route(
            "/v1/customers/{id}/payment_methods",
            get(customers::payment_methods),
        )
        .route("/v1/payment_methods", get(customers::list_payment_methods))
        .route(
            "/v1/products",
            post(catalog::create_product).get(catalog::list_products),
        )
        .route(
            "/v1/products/{id}",
            post(catalog::update_product).get(catalog::get_product),
        )
        .route(
            "/v1/prices",
            post(catalog::create_price).get(catalog::list_prices),
        )
        .route(
            "/v1/prices/{id}",
            post(catalog::update_price).get(catalog::get_price),
        )
        .route("/v1/billing/meters", post(meters::create).get(meters::list))
        .route("/v1/billing/meters/{id}", get(meters::get))
        .route(
            "/v1/billing/meters/{id}/event_summaries",
            get(meters::summaries),
        )
        .route("/v1/billing/meter_events", post(meters::record_event))
        .route(
            "/v1/checkout/sessions",
            post(checkout::create).get(checkout::list),
        )
        .route("/v1/checkout/sessions/{id}", get(checkout::get))
        .route("/v1/checkout/sessions/{id}/expire", post(checkout::expire))
        .route(
            "/v1/checkout/sessions/{id}/line_items",
            get(checkout::line_items),
        )
        .route("/v1/subscriptions", get(billing::list_subscriptions))
        .route(
            "/v1/subscriptions/{id}",
            get(billing::get_subscription)
                .post(billing::update_subscription)
                .delete(billing::cancel_subscription),
        )
        .route(
            "/v1/subscription_items",
            get(billing::list_subscription_items),
        )
        .route("/v1/invoices", get(billing::list_invoices))
        .route("/v1/invoices/{id}", get(billing::get_invoice))
        .route("/v1/invoices/{id}/lines", get(billing::invoice_lines))
        .route("/v1/invoices/{id}/pay", post(billing::pay_invoice))
        .route(
            "/v1/billing_portal/sessions",
            post(billing::create_portal_session),
        )
        .route(
            "/v1/webhook_endpoints",
            post(events::create_endpoint).get(events::list_endpoints),
        )
        .route("/v1/events", get(events::list))
        .route("/v1/events/{id}", get(events::get))
        .route("/v1/test_helpers/test_clocks", post(events::create_clock))
        .route("/v1/test_helpers/test_clocks/{id}", get(events::get_clock))
        .route(
            "/v1/test_helpers/test_clocks/{id}/advance",
            post(events::advance_clock),
        )
        .route("/_local/customers/{id}/card", post(control::set_card))
        .route("/_local/delivery", post(control::set_delivery))
        .route("/_local/delivery/flush", post(control::flush))
        .route("/_local/faults", post(control::add_fault))
        .route("/_local/requests", get(control::requests))
        .route("/_local/deliveries", get(control::deliveries))
        .route("/_local/meter_events", get(control::meter_events))
        .fallback(unknown_url)
        .layer(from_fn_with_state(shared.clone(), crate::gate::api));
    let pages = Router::new()
        .route(
            "/checkout/{id}",
            get(checkout::page_get).post(checkout::pay),
        )
        .route(
            "/portal/{id}",
            get(billing::portal_page).post(billing::portal_cancel),
        );
    api.merge(pages).with_state(shared)
}

async fn unknown_url(method: Method, uri: Uri) -> ApiError {
    ApiError::UnknownUrl {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}
