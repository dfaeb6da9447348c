use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use rand::Rng;

use super::Answer;
use crate::error::ApiError;
use crate::gate::Call;
use crate::render::{self, Page};
use crate::state::{find, new_id, Customer};
use crate::Shared;

pub async fn create(State(shared): State<Arc<Shared>>, call: Call) -> Answer {
    let mut p = call.params();
    let name = p.string("name")?;
    let email = p.string("email")?;
    let metadata = p.metadata()?.unwrap_or_default();
    let test_clock = p.string("test_clock")?;
    p.finish()?;
    let mut st = shared.lock();
    if let Some(clock) = &test_clock {
        find(&st.test_clocks, clock)
            .ok_or_else(|| ApiError::no_such_param("test_clock", clock, "test_clock"))?;
    }
    let customer = Customer {
        id: new_id("cus"),
        created: st.now(),
        name,
        email,
        metadata: metadata
            .into_iter()
            .filter(|(_, v)| v.as_str() != Some(""))
            .collect(),
        test_clock,
        default_payment_method: None,
        invoice_prefix: format!("{:08X}", rand::thread_rng().gen::<u32>()),
        next_invoice_sequence: 1,
        currency: None,
    };
    let body = render::customer(&st, &customer);
    st.customers.push(customer);
    Ok(Json(body))
}

pub async fn get(State(shared): State<Arc<Shared>>, Path(id): Path<String>, call: Call) -> Answer {
    call.params().finish()?;
    let st = shared.lock();
    let customer = find(&st.customers, &id).ok_or_else(|| ApiError::no_such("customer", &id))?;
    Ok(Json(render::customer(&st, customer)))
}

pub async fn list(State(shared): State<Arc<Shared>>, call: Call) -> Answer {
    let mut p = call.params();
    let email = p.string("email")?;
    let page = Page::take(&mut p)?;
    p.finish()?;
    let st = shared.lock();
    let items = st
        .customers
        .iter()
        .rev()
        .filter(|c| email.is_none() || c.email == email)
        .map(|c| render::customer(&st, c))
        .collect();
    Ok(Json(page.list("/v1/customers", items)?))
}

fn payment_methods_of(
    shared: &Shared,
    customer: &str,
    mut page_params: crate::form::Params,
    url: &str,
) -> Answer {
    let page = Page::take(&mut page_params)?;
    page_params.finish()?;
    let st = shared.lock();
    let items = st
        .payment_methods
        .iter()
        .rev()
        .filter(|pm| pm.customer.as_deref() == Some(customer))
        .map(render::payment_method)
        .collect();
    Ok(Json(page.list(url, items)?))
}

/// `GET /v1/customers/{id}/payment_methods`
pub async fn payment_methods(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    call: Call,
) -> Answer {
    let mut p = call.params();
    p.choice("type", &["card"])?;
    find(&shared.lock().customers, &id).ok_or_else(|| ApiError::no_such("customer", &id))?;
    payment_methods_of(
        &shared,
        &id,
        p,
        &format!("/v1/customers/{id}/payment_methods"),
    )
}

/// `GET /v1/payment_methods?customer=..&type=card`
pub async fn list_payment_methods(State(shared): State<Arc<Shared>>, call: Call) -> Answer {
    let mut p = call.params();
    let customer = p.required("customer")?;
    p.choice("type", &["card"])?;
    find(&shared.lock().customers, &customer)
        .ok_or_else(|| ApiError::no_such_param("customer", &customer, "customer"))?;
    payment_methods_of(&shared, &customer, p, "/v1/payment_methods")
}
