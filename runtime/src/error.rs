//! Every way a request can fail, mapped to the status and `{"detail": ...}`
//! body Langflow sends, in this one place.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::http::json_response;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("JSON decode error at {pos}")]
    JsonInvalid { pos: usize },
    #[error("body could not be read")]
    BodyUnreadable,
    #[error("query parameter {name} is not a boolean")]
    BadBool { name: &'static str, input: String },
    #[error("field {0} is required")]
    MissingField(&'static str),
    #[error("no API key")]
    MissingKey,
    #[error("wrong API key")]
    InvalidKey,
    #[error("flow {0} not found")]
    FlowNotFound(String),
    #[error("tweak conflicts with input_value")]
    TweakConflict,
    #[error("tweaks refused: {0:?}")]
    TweaksRefused(Vec<String>),
    #[error("run failed")]
    RunFailed(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("not found")]
    NotFound,
}

impl ApiError {
    fn status_and_detail(&self) -> (StatusCode, Value) {
        match self {
            ApiError::JsonInvalid { pos } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!([{"type": "json_invalid", "loc": ["body", pos], "msg": "JSON decode error"}]),
            ),
            ApiError::BodyUnreadable => (
                StatusCode::BAD_REQUEST,
                json!("There was an error parsing the body"),
            ),
            ApiError::BadBool { name, input } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!([{"type": "bool_parsing", "loc": ["query", name],
                        "msg": "Input should be a valid boolean, unable to interpret input", "input": input}]),
            ),
            ApiError::MissingField(name) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!([{"type": "missing", "loc": ["body", name], "msg": "Field required"}]),
            ),
            ApiError::MissingKey => (
                StatusCode::FORBIDDEN,
                json!("An API key must be passed as query or header"),
            ),
            ApiError::InvalidKey => (StatusCode::FORBIDDEN, json!("Invalid or missing API key")),
            ApiError::FlowNotFound(id) => (
                StatusCode::NOT_FOUND,
                json!(format!("Flow identifier {id} not found")),
            ),
            ApiError::TweakConflict => (
                StatusCode::BAD_REQUEST,
                json!(crate::run::PlanError::CONFLICT),
            ),
            ApiError::TweaksRefused(fields) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"error": "Refused tweaks", "code": "TWEAKS_REFUSED",
                       "message": crate::run::PlanError::PROTECTED, "fields": fields}),
            ),
            ApiError::RunFailed(detail) => (StatusCode::INTERNAL_SERVER_ERROR, json!(detail)),
            ApiError::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, json!("Method Not Allowed"))
            }
            ApiError::NotFound => (StatusCode::NOT_FOUND, json!("Not Found")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, detail) = self.status_and_detail();
        let body = serde_json::to_vec(&json!({ "detail": detail })).unwrap_or_default();
        let mut response = json_response(status, body, false);
        if matches!(self, ApiError::MethodNotAllowed) {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        response
    }
}
