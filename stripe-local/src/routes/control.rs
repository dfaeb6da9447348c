//! `/_local/`: what tests steer and read back. JSON in, JSON out; read
//! endpoints answer a plain array, oldest first.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Answer, Object};
use crate::billing::TestCard;
use crate::delivery::{DeliveryMode, FlushOrder};
use crate::error::ApiError;
use crate::gate::Call;
use crate::render;
use crate::state::{find, Customer, Fault};
use crate::Shared;

fn body<T: DeserializeOwned>(call: &Call) -> Result<T, ApiError> {
    serde_json::from_value(call.params.clone())
        .map_err(|e| ApiError::Refused(format!("Invalid body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Card {
    number: String,
}

/// Replaces the customer's default card, so that later charges pay or decline.
pub async fn set_card(Path(id): Path<String>, call: Call) -> Answer {
    let card: Card = body(&call)?;
    let card = TestCard::parse(&card.number)
        .ok_or_else(|| ApiError::invalid("number", crate::pages::CARD_HINT))?;
    let mut st = call.lock();
    Customer::by_id(&st, &id)?;
    let pm = st.attach_card(&id, card);
    Ok(Json(render::payment_method(
        find(&st.payment_methods, &pm).expect("just made"),
    )))
}

pub async fn set_delivery(call: Call) -> Answer {
    let mode: DeliveryMode = body(&call)?;
    call.lock().delivery = mode;
    Ok(Json(call.params))
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum OrderName {
    AsMade,
    Reverse,
    Shuffle,
    Explicit,
}

/// `{"order": "as_made" | "reverse" | "shuffle", "seed": N}` or
/// `{"order": "explicit", "indices": [2, 0, 1]}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Flush {
    order: OrderName,
    #[serde(default)]
    seed: u64,
    indices: Option<Value>,
}

impl Flush {
    fn order(self) -> Result<FlushOrder, ApiError> {
        let order = match (self.order, self.indices) {
            (OrderName::Explicit, Some(indices)) => FlushOrder::Explicit(whole_numbers(&indices)?),
            (OrderName::Explicit, None) => return Err(ApiError::Missing("indices".into())),
            (_, Some(_)) => {
                return Err(ApiError::invalid(
                    "indices",
                    "indices can only be given with order=explicit.",
                ))
            }
            (OrderName::AsMade, None) => FlushOrder::AsMade,
            (OrderName::Reverse, None) => FlushOrder::Reverse,
            (OrderName::Shuffle, None) => FlushOrder::Shuffle { seed: self.seed },
        };
        Ok(order)
    }
}

/// `indices` as an array of whole numbers, naming the parameter if it is not one.
fn whole_numbers(indices: &Value) -> Result<Vec<usize>, ApiError> {
    let refused = || {
        ApiError::invalid(
            "indices",
            "Invalid indices: must be an array of whole numbers.",
        )
    };
    indices
        .as_array()
        .ok_or_else(refused)?
        .iter()
        .map(|i| {
            i.as_u64()
                .and_then(|i| usize::try_from(i).ok())
                .ok_or_else(refused)
        })
        .collect()
}

/// Sends the held deliveries in the order asked for; an explicit order that
/// does not name each held delivery once is refused and sends nothing.
pub async fn flush(call: Call) -> Answer {
    let order = body::<Flush>(&call)?.order()?;
    let flushed = call
        .lock()
        .flush(order)
        .map_err(|e| ApiError::invalid("indices", e.to_string()))?;
    Ok(Json(json!({ "flushed": flushed })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    path_prefix: String,
    status: u16,
    count: u32,
}

pub async fn add_fault(call: Call) -> Answer {
    let fault: FaultRequest = body(&call)?;
    let status = StatusCode::from_u16(fault.status)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .ok_or_else(|| ApiError::invalid("status", "status must be a 4xx or 5xx code"))?;
    call.lock().faults.push(Fault {
        path_prefix: fault.path_prefix,
        status,
        count: fault.count,
    });
    Ok(Json(call.params))
}

pub async fn requests(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(Value::Array(shared.lock().requests.clone()))
}

pub async fn deliveries(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(Value::Array(shared.lock().deliveries.clone()))
}

pub async fn meter_events(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let st = shared.lock();
    let events = st
        .meter_events
        .iter()
        .map(|e| {
            let mut v = render::meter_event(e);
            v["counted"] = e.counted.into();
            v
        })
        .collect();
    Json(Value::Array(events))
}
