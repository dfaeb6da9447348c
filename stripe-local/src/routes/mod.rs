//! The routes, by feature. API handlers read their parameters from the
//! [`Call`](crate::gate::Call) the gate made and answer a Stripe object; the
//! shapes they share (retrieve by id, a filtered list, a page of a
//! sub-list) are here, over [`Object`].

mod billing;
mod catalog;
mod checkout;
mod control;
mod customers;
mod events;
mod meters;

use std::sync::{Arc, MutexGuard};

use axum::extract::Path;
use axum::http::{Method, Uri};
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::Value;

use crate::error::ApiError;
use crate::form::Params;
use crate::gate::Call;
use crate::render::{self, Page};
use crate::state::{
    self, find, find_mut, CheckoutSession, Customer, Endpoint, Event, Invoice, Meter,
    PaymentMethod, PortalSession, Price, Product, Record, Subscription, TestClock,
};
use crate::Shared;

pub type Answer = Result<Json<Value>, ApiError>;

/// A kind of object the API serves by id: its name in Stripe's errors
/// (`No such price: 'price_…'`), where the state keeps it, and how it renders.
pub trait Object: Record + Sized + 'static {
    const NAME: &'static str;

    fn all(st: &state::State) -> &[Self];

    fn all_mut(st: &mut state::State) -> &mut Vec<Self>;

    fn render(&self, st: &state::State) -> Value;

    /// Keeps a newly made object and answers it.
    fn save(self, st: &mut state::State) -> Answer {
        let body = self.render(st);
        Self::all_mut(st).push(self);
        Ok(Json(body))
    }

    /// The object an id in the path names, or 404.
    fn by_id<'a>(st: &'a state::State, id: &str) -> Result<&'a Self, ApiError> {
        find(Self::all(st), id).ok_or_else(|| ApiError::no_such(Self::NAME, id))
    }

    fn by_id_mut<'a>(st: &'a mut state::State, id: &str) -> Result<&'a mut Self, ApiError> {
        find_mut(Self::all_mut(st), id).ok_or_else(|| ApiError::no_such(Self::NAME, id))
    }

    /// Where the object an id in the path names stands in the state, or 404.
    fn position(st: &state::State, id: &str) -> Result<usize, ApiError> {
        Self::all(st)
            .iter()
            .position(|o| o.id() == id)
            .ok_or_else(|| ApiError::no_such(Self::NAME, id))
    }

    /// The object an id in parameter `param` names, or 400 naming `param`.
    fn in_param<'a>(st: &'a state::State, id: &str, param: &str) -> Result<&'a Self, ApiError> {
        find(Self::all(st), id).ok_or_else(|| ApiError::no_such_param(Self::NAME, id, param))
    }
}

/// `Type: "name in errors" in state_field, renderer;` for each kind served.
macro_rules! objects {
    ($($t:ty: $name:literal in $field:ident, $render:expr;)*) => {$(
        impl Object for $t {
            const NAME: &'static str = $name;

            fn all(st: &state::State) -> &[$t] {
                &st.$field
            }

            fn all_mut(st: &mut state::State) -> &mut Vec<$t> {
                &mut st.$field
            }

            fn render(&self, st: &state::State) -> Value {
                let render: fn(&state::State, &$t) -> Value = $render;
                render(st, self)
            }
        }
    )*};
}

objects! {
    Customer: "customer" in customers, render::customer;
    Product: "product" in products, |_, p| render::product(p);
    Price: "price" in prices, |_, p| render::price(p);
    Meter: "billing.meter" in meters, |_, m| render::meter(m);
    CheckoutSession: "checkout.session" in sessions, render::checkout_session;
    Subscription: "subscription" in subscriptions, render::subscription;
    Invoice: "invoice" in invoices, |_, i| render::invoice(i);
    PaymentMethod: "payment_method" in payment_methods, |_, pm| render::payment_method(pm);
    PortalSession: "billing_portal.session" in portal_sessions, render::portal_session;
    TestClock: "test_helpers.test_clock" in test_clocks, |_, c| render::test_clock(c);
    Endpoint: "webhook_endpoint" in endpoints, |_, e| render::webhook_endpoint(e);
    Event: "event" in events, |_, e| e.body.clone();
}

/// `GET` of one object by the id in the path.
pub async fn retrieve<T: Object>(Path(id): Path<String>, call: Call) -> Answer {
    call.params().finish()?;
    let st = call.lock();
    Ok(Json(T::by_id(&st, &id)?.render(&st)))
}

/// For an action without parameters on the object the path names: refuses
/// any parameter, locks the state, and says where the object stands (or 404).
pub fn act_on<'a, T: Object>(
    call: &'a Call,
    id: &str,
) -> Result<(MutexGuard<'a, state::State>, usize), ApiError> {
    call.params().finish()?;
    let st = call.lock();
    let i = T::position(&st, id)?;
    Ok((st, i))
}

/// A list of the objects `keep` chooses, newest first, paged by what is left
/// of `p` (read after the filters, as every list reads them).
pub fn list_where<T: Object>(
    call: &Call,
    p: Params,
    url: &str,
    keep: impl Fn(&T) -> bool,
) -> Answer {
    paged(call, p, url, |st| {
        Ok(T::all(st)
            .iter()
            .rev()
            .filter(|o| keep(o))
            .map(|o| o.render(st))
            .collect())
    })
}

/// A list of what `items` finds under the lock (in the list's order), paged
/// by what is left of `p`.
pub fn paged(
    call: &Call,
    mut p: Params,
    url: &str,
    items: impl FnOnce(&state::State) -> Result<Vec<Value>, ApiError>,
) -> Answer {
    let page = Page::take(&mut p)?;
    p.finish()?;
    let st = call.lock();
    Ok(Json(page.list(url, items(&st)?)?))
}

pub fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route(
            "/v1/customers",
            post(customers::create).get(customers::list),
        )
        .route("/v1/customers/{id}", get(retrieve::<Customer>))
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
            post(catalog::update_product).get(retrieve::<Product>),
        )
        .route(
            "/v1/prices",
            post(catalog::create_price).get(catalog::list_prices),
        )
        .route(
            "/v1/prices/{id}",
            post(catalog::update_price).get(retrieve::<Price>),
        )
        .route("/v1/billing/meters", post(meters::create).get(meters::list))
        .route("/v1/billing/meters/{id}", get(retrieve::<Meter>))
        .route(
            "/v1/billing/meters/{id}/event_summaries",
            get(meters::summaries),
        )
        .route("/v1/billing/meter_events", post(meters::record_event))
        .route(
            "/v1/checkout/sessions",
            post(checkout::create).get(checkout::list),
        )
        .route(
            "/v1/checkout/sessions/{id}",
            get(retrieve::<CheckoutSession>),
        )
        .route("/v1/checkout/sessions/{id}/expire", post(checkout::expire))
        .route(
            "/v1/checkout/sessions/{id}/line_items",
            get(checkout::line_items),
        )
        .route("/v1/subscriptions", get(billing::list_subscriptions))
        .route(
            "/v1/subscriptions/{id}",
            get(retrieve::<Subscription>)
                .post(billing::update_subscription)
                .delete(billing::cancel_subscription),
        )
        .route(
            "/v1/subscription_items",
            get(billing::list_subscription_items),
        )
        .route("/v1/invoices", get(billing::list_invoices))
        .route("/v1/invoices/{id}", get(retrieve::<Invoice>))
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
        .route("/v1/events", get(events::list_events))
        .route("/v1/events/{id}", get(retrieve::<Event>))
        .route("/v1/test_helpers/test_clocks", post(events::create_clock))
        .route(
            "/v1/test_helpers/test_clocks/{id}",
            get(retrieve::<TestClock>),
        )
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
