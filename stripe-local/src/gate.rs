//! What every API request passes through, in order: the key, the body's
//! decoding, injected faults, settling what the clock has made due,
//! idempotency; then, after the handler, `expand[]`, the stored idempotent
//! answer, the request log and the `Request-Id` header.

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};

use axum::body::{to_bytes, Body, Bytes};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::form::{self, Params};
use crate::render;
use crate::state::{self, new_id, Idempotent, Origin};
use crate::Shared;

const BODY_LIMIT: usize = 1 << 20;

/// One API request as handlers see it: its decoded parameters, what events
/// it causes should name as their `request`, and the stand-in it was made to.
#[derive(Clone)]
pub struct Call {
    pub request_id: String,
    pub idempotency_key: Option<String>,
    pub params: Value,
    shared: Arc<Shared>,
}

impl Call {
    pub fn params(&self) -> Params {
        Params::new(self.params.clone())
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The stand-in's state, locked.
    pub fn lock(&self) -> MutexGuard<'_, state::State> {
        self.shared.lock()
    }

    pub fn origin(&self) -> Origin {
        Origin {
            request_id: Some(self.request_id.clone()),
            idempotency_key: self.idempotency_key.clone(),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Call {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Call, ApiError> {
        parts
            .extensions
            .get::<Call>()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("a route outside the API gate asked for a Call").into())
    }
}

/// The key's well-known prefix, never the rest of it.
fn masked(key: &str) -> String {
    let prefix = [
        "sk_test_", "sk_live_", "rk_test_", "rk_live_", "pk_test_", "pk_live_",
    ]
    .into_iter()
    .find(|p| key.starts_with(p))
    .unwrap_or("");
    format!("{prefix}****")
}

fn authenticate(secret_key: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    let value = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let key = if let Some(bearer) = value.strip_prefix("Bearer ") {
        bearer.trim().to_string()
    } else if let Some(basic) = value.strip_prefix("Basic ") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&decoded).into_owned();
        text.split(':').next().unwrap_or("").to_string()
    } else {
        String::new()
    };
    if key.is_empty() {
        return Err(ApiError::NoKey);
    }
    if bool::from(key.as_bytes().ct_eq(secret_key.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::WrongKey {
            shown: masked(&key),
        })
    }
}

fn decode_params(parts: &Parts, body: &[u8], control: bool) -> Result<Value, ApiError> {
    if parts.method != Method::POST {
        return form::decode(parts.uri.query().unwrap_or(""));
    }
    if control {
        if body.is_empty() {
            return Ok(json!({}));
        }
        return serde_json::from_slice(body)
            .map_err(|e| ApiError::Refused(format!("Invalid JSON body: {e}")));
    }
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/x-www-form-urlencoded");
    if !body.is_empty() && !content_type.starts_with("application/x-www-form-urlencoded") {
        return Err(ApiError::Refused(format!(
            "Invalid request: unsupported Content-Type {content_type}. Send application/x-www-form-urlencoded."
        )));
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::Refused("Invalid request: the body is not UTF-8.".into()))?;
    form::decode(text)
}

/// What the log keeps of a request beyond its method and path.
#[derive(Default)]
struct Seen {
    params: Value,
    replayed: bool,
}

/// Answers 2xx and card declines are kept for an idempotency key; refusals
/// of the request itself are not (Stripe keeps a result only once the
/// request began executing).
fn kept(status: StatusCode) -> bool {
    status.is_success() || status == StatusCode::PAYMENT_REQUIRED
}

/// The middleware over `/v1/` and `/_local/`.
pub async fn api(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let request_id = new_id("req");
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let control = path.starts_with("/_local/");
    let key = (request.method() == Method::POST)
        .then(|| request.headers().get("idempotency-key"))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut seen = Seen::default();
    let call = Call {
        request_id: request_id.clone(),
        idempotency_key: key.clone(),
        params: Value::Null,
        shared: shared.clone(),
    };
    let mut response = pass(&shared, request, next, call, control, &mut seen)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        headers.insert("request-id", value);
    }
    if let Some(value) = key.as_deref().and_then(|k| HeaderValue::from_str(k).ok()) {
        headers.insert("idempotency-key", value);
    }
    if seen.replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    if !control {
        shared.lock().requests.push(json!({
            "method": method,
            "path": path,
            "params": seen.params,
            "idempotency_key": key,
            "status": response.status().as_u16(),
        }));
    }
    response
}

async fn pass(
    shared: &Shared,
    request: Request,
    next: Next,
    mut call: Call,
    control: bool,
    seen: &mut Seen,
) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    authenticate(&shared.secret_key, &parts.headers)?;
    let body = to_bytes(body, BODY_LIMIT)
        .await
        .map_err(|_| ApiError::Refused("The request body is too large.".into()))?;
    seen.params = decode_params(&parts, &body, control)?;
    call.params = seen.params.clone();
    let fingerprint = (
        parts.method.to_string(),
        parts.uri.path().to_string(),
        seen.params.clone(),
    );
    if !control {
        let mut st = shared.lock();
        let path = parts.uri.path();
        if let Some(fault) = st
            .faults
            .iter_mut()
            .find(|f| f.count > 0 && path.starts_with(&f.path_prefix))
        {
            fault.count -= 1;
            return Err(ApiError::Injected(fault.status));
        }
        st.settle();
        if let Some(key) = &call.idempotency_key {
            if let Some((status, body)) = claim(&mut st.idempotency, key, fingerprint)? {
                seen.replayed = true;
                return Ok(stored(status, body));
            }
        }
    }
    let expand: Vec<String> = call.params().strings("expand").unwrap_or_default();
    let key = call.idempotency_key.clone();
    parts.extensions.insert(call);
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    if control {
        return Ok(response);
    }
    let (mut head, body) = response.into_parts();
    let mut body = to_bytes(body, usize::MAX).await.unwrap_or_default();
    let mut st = shared.lock();
    if head.status.is_success() && !expand.is_empty() {
        if let Ok(mut value) = serde_json::from_slice::<Value>(&body) {
            for path in &expand {
                render::expand(&st, &mut value, &path.split('.').collect::<Vec<_>>());
            }
            body = Bytes::from(value.to_string());
            head.headers.remove(CONTENT_LENGTH);
        }
    }
    if let Some(key) = key {
        release(&mut st.idempotency, &key, head.status, &body);
    }
    Ok(Response::from_parts(head, Body::from(body)))
}

type Fingerprint = (String, String, Value);

/// Takes idempotency `key` for a request, or answers what it allows instead:
/// the first answer again (`Some`) for the same method, path and parameters;
/// a refusal for other ones, or while the first request is still running.
fn claim(
    store: &mut HashMap<String, Idempotent>,
    key: &str,
    fingerprint: Fingerprint,
) -> Result<Option<(StatusCode, Bytes)>, ApiError> {
    match store.get(key) {
        Some(earlier) if earlier.fingerprint != fingerprint => {
            Err(ApiError::IdempotencyMismatch(key.to_string()))
        }
        Some(Idempotent {
            answer: Some(answer),
            ..
        }) => Ok(Some(answer.clone())),
        Some(_) => Err(ApiError::IdempotencyInFlight(key.to_string())),
        None => {
            let entry = Idempotent {
                fingerprint,
                answer: None,
            };
            store.insert(key.to_string(), entry);
            Ok(None)
        }
    }
}

/// Keeps the answer for a claimed key, or frees the key if it is not kept.
fn release(store: &mut HashMap<String, Idempotent>, key: &str, status: StatusCode, body: &Bytes) {
    if !kept(status) {
        store.remove(key);
    } else if let Some(entry) = store.get_mut(key) {
        entry.answer = Some((status, body.clone()));
    }
}

fn stored(status: StatusCode, body: Bytes) -> Response {
    (status, [(CONTENT_TYPE, "application/json")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(authorization).unwrap());
        h
    }

    #[test]
    fn the_key_is_taken_as_bearer_or_as_the_basic_auth_user() {
        assert!(authenticate("sk_test_k", &headers("Bearer sk_test_k")).is_ok());
        let basic = base64::engine::general_purpose::STANDARD.encode("sk_test_k:");
        assert!(authenticate("sk_test_k", &headers(&format!("Basic {basic}"))).is_ok());
    }

    #[test]
    fn a_wrong_key_is_refused_without_echoing_it() {
        let err = authenticate("sk_test_k", &headers("Bearer sk_test_secretvalue")).unwrap_err();
        assert_eq!(err.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(err.to_string(), "Invalid API Key provided: sk_test_****");
        let err = authenticate("sk_test_k", &headers("Bearer plainsecret")).unwrap_err();
        assert!(!err.to_string().contains("plainsecret"));
        assert!(matches!(
            authenticate("k", &HeaderMap::new()),
            Err(ApiError::NoKey)
        ));
    }

    fn request(name: &str) -> Fingerprint {
        (
            "POST".into(),
            "/v1/customers".into(),
            json!({ "name": name }),
        )
    }

    #[test]
    fn a_key_gives_its_first_answer_again_for_the_same_request() {
        let mut store = HashMap::new();
        assert!(claim(&mut store, "k", request("a")).unwrap().is_none());
        release(&mut store, "k", StatusCode::OK, &Bytes::from_static(b"{}"));
        let again = claim(&mut store, "k", request("a")).unwrap();
        assert_eq!(again, Some((StatusCode::OK, Bytes::from_static(b"{}"))));
    }

    #[test]
    fn a_key_used_again_with_other_parameters_is_refused() {
        let mut store = HashMap::new();
        claim(&mut store, "k", request("a")).unwrap();
        release(&mut store, "k", StatusCode::OK, &Bytes::new());
        let err = claim(&mut store, "k", request("b")).unwrap_err();
        assert!(matches!(err, ApiError::IdempotencyMismatch(_)));
    }

    #[test]
    fn a_key_whose_first_request_is_still_running_is_refused_as_in_flight() {
        let mut store = HashMap::new();
        claim(&mut store, "k", request("a")).unwrap();
        let err = claim(&mut store, "k", request("a")).unwrap_err();
        assert_eq!(err.status(), StatusCode::CONFLICT);
    }

    #[test]
    fn a_refused_request_frees_its_key_but_a_card_decline_keeps_it() {
        let mut store = HashMap::new();
        claim(&mut store, "k", request("a")).unwrap();
        release(&mut store, "k", StatusCode::BAD_REQUEST, &Bytes::new());
        assert!(claim(&mut store, "k", request("b")).unwrap().is_none());
        release(&mut store, "k", StatusCode::PAYMENT_REQUIRED, &Bytes::new());
        let again = claim(&mut store, "k", request("b")).unwrap();
        assert_eq!(again.map(|(s, _)| s), Some(StatusCode::PAYMENT_REQUIRED));
    }
}
