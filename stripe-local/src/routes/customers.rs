use axum::extract::Path;
use rand::Rng;

use super::{list_where, Answer, Object};
use crate::gate::Call;
use crate::state::{new_id, new_metadata, Customer, PaymentMethod, TestClock};

pub async fn create(call: Call) -> Answer {
    let mut p = call.params();
    let name = p.string("name")?;
    let email = p.string("email")?;
    let metadata = new_metadata(p.metadata()?);
    let test_clock = p.string("test_clock")?;
    p.finish()?;
    let mut st = call.lock();
    if let Some(clock) = &test_clock {
        TestClock::in_param(&st, clock, "test_clock")?;
    }
    let customer = Customer {
        id: new_id("cus"),
        created: st.now(),
        name,
        email,
        metadata,
        test_clock,
        default_payment_method: None,
        invoice_prefix: format!("{:08X}", rand::thread_rng().gen::<u32>()),
        next_invoice_sequence: 1,
        currency: None,
    };
    customer.save(&mut st)
}

pub async fn list(call: Call) -> Answer {
    let mut p = call.params();
    let email = p.string("email")?;
    list_where(&call, p, "/v1/customers", |c: &Customer| {
        email.is_none() || c.email == email
    })
}

fn cards_of(customer: &str) -> impl Fn(&PaymentMethod) -> bool + '_ {
    move |pm| pm.customer.as_deref() == Some(customer)
}

/// `GET /v1/customers/{id}/payment_methods`
pub async fn payment_methods(Path(id): Path<String>, call: Call) -> Answer {
    let mut p = call.params();
    p.choice("type", &["card"])?;
    Customer::by_id(&call.lock(), &id)?;
    let url = format!("/v1/customers/{id}/payment_methods");
    list_where(&call, p, &url, cards_of(&id))
}

/// `GET /v1/payment_methods?customer=..&type=card`
pub async fn list_payment_methods(call: Call) -> Answer {
    let mut p = call.params();
    let customer = p.required("customer")?;
    p.choice("type", &["card"])?;
    Customer::in_param(&call.lock(), &customer, "customer")?;
    list_where(&call, p, "/v1/payment_methods", cards_of(&customer))
}
