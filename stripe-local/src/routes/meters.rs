//! Billing meters, meter events and their summaries. Unlike Stripe, which
//! checks a meter event after answering, the stand-in refuses an event for
//! no meter or no customer at once, so that a mistake shows in the test.

use axum::extract::Path;
use axum::Json;
use serde_json::Value;

use super::{list_where, paged, Answer, Object};
use crate::billing::DAY;
use crate::error::ApiError;
use crate::gate::Call;
use crate::render;
use crate::state::{new_id, Customer, Formula, Meter, MeterEvent};

pub async fn create(call: Call) -> Answer {
    let mut p = call.params();
    let display_name = p.required("display_name")?;
    let event_name = p.required("event_name")?;
    let mut aggregation = p
        .object("default_aggregation")?
        .ok_or_else(|| ApiError::Missing("default_aggregation".into()))?;
    let formula = match aggregation.choice("formula", &["sum", "count"])?.as_deref() {
        Some("sum") => Formula::Sum,
        Some(_) => Formula::Count,
        None => return Err(ApiError::Missing("default_aggregation[formula]".into())),
    };
    aggregation.finish()?;
    let mut customer_key = "stripe_customer_id".to_string();
    if let Some(mut mapping) = p.object("customer_mapping")? {
        customer_key = mapping.required("event_payload_key")?;
        mapping.choice("type", &["by_id"])?;
        mapping.finish()?;
    }
    let mut value_key = "value".to_string();
    if let Some(mut settings) = p.object("value_settings")? {
        value_key = settings.required("event_payload_key")?;
        settings.finish()?;
    }
    p.finish()?;
    let mut st = call.lock();
    if st.meters.iter().any(|m| m.event_name == event_name) {
        return Err(ApiError::invalid(
            "event_name",
            format!("An active meter with event_name '{event_name}' already exists."),
        ));
    }
    let meter = Meter {
        id: new_id("mtr"),
        created: st.now(),
        display_name,
        event_name,
        formula,
        customer_key,
        value_key,
    };
    meter.save(&mut st)
}

pub async fn list(call: Call) -> Answer {
    let mut p = call.params();
    // Every meter is active: none is ever deactivated.
    let status = p.choice("status", &["active", "inactive"])?;
    list_where(&call, p, "/v1/billing/meters", |_: &Meter| {
        status.as_deref() != Some("inactive")
    })
}

/// A payload value that must be a whole number.
fn whole(value: Option<&Value>, param: &str) -> Result<Option<i64>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    value
        .as_str()
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid(param, format!("Invalid {param}: must be a whole number."))
        })
}

pub async fn record_event(call: Call) -> Answer {
    let mut p = call.params();
    let event_name = p.required("event_name")?;
    let payload = match p.raw("payload") {
        Some(Value::Object(map)) if map.values().all(Value::is_string) => map,
        Some(_) => {
            return Err(ApiError::invalid(
                "payload",
                "Invalid payload: must be a hash of strings.",
            ))
        }
        None => return Err(ApiError::Missing("payload".into())),
    };
    let identifier = p.string("identifier")?;
    let timestamp = p.integer("timestamp")?;
    p.finish()?;
    if identifier.as_ref().is_some_and(|i| i.chars().count() > 100) {
        return Err(ApiError::invalid(
            "identifier",
            "Invalid identifier: at most 100 characters.",
        ));
    }
    let mut st = call.lock();
    let now = st.now();
    let timestamp = timestamp.unwrap_or(now);
    if timestamp < now - 35 * DAY || timestamp > now + 300 {
        return Err(ApiError::invalid(
            "timestamp",
            "Timestamp must be within the past 35 calendar days and no more than 5 minutes in the future.",
        ));
    }
    let meter = st
        .meters
        .iter()
        .find(|m| m.event_name == event_name)
        .ok_or_else(|| {
            ApiError::invalid(
                "event_name",
                format!("No active meter was found with event_name '{event_name}'."),
            )
        })?;
    let customer_param = format!("payload[{}]", meter.customer_key);
    let customer = payload
        .get(&meter.customer_key)
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::Missing(customer_param.clone()))?
        .to_string();
    Customer::in_param(&st, &customer, &customer_param)?;
    let value_param = format!("payload[{}]", meter.value_key);
    let value = match (
        whole(payload.get(&meter.value_key), &value_param)?,
        meter.formula,
    ) {
        (Some(value), _) => value,
        (None, Formula::Count) => 1,
        (None, Formula::Sum) => return Err(ApiError::Missing(value_param)),
    };
    let identifier = identifier.unwrap_or_else(|| new_id("mev"));
    let counted = !st.meter_events.iter().any(|e| e.identifier == identifier);
    let event = MeterEvent {
        identifier,
        event_name,
        customer,
        value,
        timestamp,
        created: now,
        payload,
        counted,
    };
    let body = render::meter_event(&event);
    st.meter_events.push(event);
    Ok(Json(body))
}

pub async fn summaries(Path(id): Path<String>, call: Call) -> Answer {
    let mut p = call.params();
    let customer = p.required("customer")?;
    let start = p
        .integer("start_time")?
        .ok_or_else(|| ApiError::Missing("start_time".into()))?;
    let end = p
        .integer("end_time")?
        .ok_or_else(|| ApiError::Missing("end_time".into()))?;
    let window = match p
        .choice("value_grouping_window", &["hour", "day"])?
        .as_deref()
    {
        Some("hour") => Some(3600),
        Some(_) => Some(DAY),
        None => None,
    };
    let url = format!("/v1/billing/meters/{id}/event_summaries");
    paged(&call, p, &url, |st| {
        if start >= end {
            return Err(ApiError::invalid(
                "end_time",
                "end_time must be after start_time.",
            ));
        }
        let meter = Meter::by_id(st, &id)?;
        Customer::in_param(st, &customer, "customer")?;
        let step = window.unwrap_or(end - start);
        Ok((0..)
            .map(|i| start + i * step)
            .take_while(|from| *from < end)
            .map(|from| {
                let to = (from + step).min(end);
                let value = st.usage(meter, &customer, from, to);
                render::meter_event_summary(&meter.id, from, to, value, &customer)
            })
            .collect())
    })
}
