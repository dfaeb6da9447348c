//! Webhook endpoints, events, and test clocks (which move the one clock).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;

use super::Answer;
use crate::delivery::add_endpoint;
use crate::error::ApiError;
use crate::gate::Call;
use crate::render::{self, Page};
use crate::state::{find, find_mut, merge_metadata, new_id, Metadata, TestClock};
use crate::{random_secret, Shared};

pub async fn create_endpoint(State(shared): State<Arc<Shared>>, call: Call) -> Answer {
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
    let mut metadata = Metadata::new();
    merge_metadata(&mut metadata, p.metadata()?.unwrap_or_default());
    p.finish()?;
    let mut st = shared.lock();
    let secret = random_secret("whsec_");
    let i = add_endpoint(
        &shared,
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

pub async fn list_endpoints(State(shared): State<Arc<Shared>>, call: Call) -> Answer {
    let mut p = call.params();
    let page = Page::take(&mut p)?;
    p.finish()?;
    let st = shared.lock();
    let items = st
        .endpoints
        .iter()
        .rev()
        .map(render::webhook_endpoint)
        .collect();
    Ok(Json(page.list("/v1/webhook_endpoints", items)?))
}

pub async fn get(State(shared): State<Arc<Shared>>, Path(id): Path<String>, call: Call) -> Answer {
    call.params().finish()?;
    let st = shared.lock();
    let event = find(&st.events, &id).ok_or_else(|| ApiError::no_such("event", &id))?;
    Ok(Json(event.body.clone()))
}

pub async fn list(State(shared): State<Arc<Shared>>, call: Call) -> Answer {
    let mut p = call.params();
    let kind = p.string("type")?;
    let page = Page::take(&mut p)?;
    p.finish()?;
    let st = shared.lock();
    let items = st
        .events
        .iter()
        .rev()
        .filter(|e| kind.as_ref().is_none_or(|k| &e.kind == k))
        .map(|e| e.body.clone())
        .collect();
    Ok(Json(page.list("/v1/events", items)?))
}

fn frozen_time(p: &mut crate::form::Params) -> Result<i64, ApiError> {
    p.integer("frozen_time")?
        .ok_or_else(|| ApiError::Missing("frozen_time".into()))
}

pub async fn create_clock(State(shared): State<Arc<Shared>>, call: Call) -> Answer {
    let mut p = call.params();
    let frozen_time = frozen_time(&mut p)?;
    let name = p.string("name")?;
    p.finish()?;
    let mut st = shared.lock();
    let clock = TestClock {
        id: new_id("clock"),
        created: st.now(),
        frozen_time,
        name,
    };
    let body = render::test_clock(&clock);
    st.test_clocks.push(clock);
    Ok(Json(body))
}

pub async fn get_clock(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    call: Call,
) -> Answer {
    call.params().finish()?;
    let st = shared.lock();
    let clock = find(&st.test_clocks, &id)
        .ok_or_else(|| ApiError::no_such("test_helpers.test_clock", &id))?;
    Ok(Json(render::test_clock(clock)))
}

/// Moves the stand-in's one clock to `frozen_time` (if later than it is) and
/// does everything that came due, before answering.
pub async fn advance_clock(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    call: Call,
) -> Answer {
    let mut p = call.params();
    let target = frozen_time(&mut p)?;
    p.finish()?;
    let mut st = shared.lock();
    let clock = find(&st.test_clocks, &id)
        .ok_or_else(|| ApiError::no_such("test_helpers.test_clock", &id))?;
    if target < clock.frozen_time {
        return Err(ApiError::invalid(
            "frozen_time",
            "The test clock can only be advanced to a time after its current frozen_time.",
        ));
    }
    st.advance(target);
    let clock = find_mut(&mut st.test_clocks, &id).expect("found above");
    clock.frozen_time = target;
    Ok(Json(render::test_clock(clock)))
}
