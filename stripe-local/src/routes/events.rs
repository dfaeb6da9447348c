//! Webhook endpoints, events, and test clocks (which move the one clock).

use axum::extract::Path;
use axum::Json;

use super::{list_where, Answer, Object};
use crate::delivery::add_endpoint;
use crate::error::ApiError;
use crate::gate::Call;
use crate::random_secret;
use crate::render;
use crate::state::{new_id, new_metadata, Endpoint, Event, TestClock};

pub async fn create_endpoint(call: Call) -> Answer {
    let mut p = call.params();
    let url = p.required("url")?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ApiError::invalid("url", format!("Invalid URL: {url}")));
    }
    let enabled_events = p.strings("enabled_events")?;
    if enabled_events.is_empty() {
        return Err(ApiError::Missing("enabled_events".into()));
    }
    let api_version = p.string("api_version")?;
    let metadata = new_metadata(p.metadata()?);
    p.finish()?;
    let mut st = call.lock();
    let secret = random_secret("whsec_");
    let i = add_endpoint(
        call.shared(),
        &mut st,
        url,
        secret.clone(),
        enabled_events,
        api_version,
        metadata,
    );
    let mut body = render::webhook_endpoint(&st.endpoints[i]);
    body["secret"] = secret.into();
    Ok(Json(body))
}

pub async fn list_endpoints(call: Call) -> Answer {
    list_where(
        &call,
        call.params(),
        "/v1/webhook_endpoints",
        |_: &Endpoint| true,
    )
}

pub async fn list_events(call: Call) -> Answer {
    let mut p = call.params();
    let kind = p.string("type")?;
    list_where(&call, p, "/v1/events", |e: &Event| {
        kind.as_ref().is_none_or(|k| &e.kind == k)
    })
}

fn frozen_time(p: &mut crate::form::Params) -> Result<i64, ApiError> {
    p.integer("frozen_time")?
        .ok_or_else(|| ApiError::Missing("frozen_time".into()))
}

pub async fn create_clock(call: Call) -> Answer {
    let mut p = call.params();
    let frozen_time = frozen_time(&mut p)?;
    let name = p.string("name")?;
    p.finish()?;
    let mut st = call.lock();
    let clock = TestClock {
        id: new_id("clock"),
        created: st.now(),
        frozen_time,
        name,
    };
    clock.save(&mut st)
}

/// Moves the stand-in's one clock to `frozen_time` (if later than it is) and
/// does everything that came due, before answering.
pub async fn advance_clock(Path(id): Path<String>, call: Call) -> Answer {
    let mut p = call.params();
    let target = frozen_time(&mut p)?;
    p.finish()?;
    let mut st = call.lock();
    if target < TestClock::by_id(&st, &id)?.frozen_time {
        return Err(ApiError::invalid(
            "frozen_time",
            "The test clock can only be advanced to a time after its current frozen_time.",
        ));
    }
    st.advance(target);
    let clock = TestClock::by_id_mut(&mut st, &id)?;
    clock.frozen_time = target;
    Ok(Json(render::test_clock(clock)))
}
