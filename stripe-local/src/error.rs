//! The stand-in's one error type and the one place it becomes HTTP. Unlike the
//! rest of Agora, the body is Stripe's shape, because Stripe's clients read it:
//! `{"error":{"type":"...","code":"...","message":"...","param":"..."}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Missing required param: {0}.")]
    Missing(String),
    #[error("Invalid integer: {value}")]
    InvalidInteger { param: String, value: String },
    /// A value of the wrong kind or outside what the parameter allows.
    #[error("{message}")]
    Invalid { param: String, message: String },
    #[error("Received unknown parameter: {0}")]
    Unknown(String),
    /// An id that names nothing: in the path (404) or in a parameter (400).
    #[error("No such {kind}: '{id}'")]
    NoSuch {
        kind: &'static str,
        id: String,
        param: Option<String>,
    },
    /// Well-formed, but not possible in the object's present state.
    #[error("{0}")]
    Refused(String),
    #[error("You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').")]
    NoKey,
    /// `shown` is the key's prefix only, never the key.
    #[error("Invalid API Key provided: {shown}")]
    WrongKey { shown: String },
    #[error("Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{0}' if you meant to execute a different request.")]
    IdempotencyMismatch(String),
    #[error("There is currently another in-progress request using this Idempotent Key (that probably means you submitted twice, and the other request is still going through): {0}. Please try again later.")]
    IdempotencyInFlight(String),
    #[error("Your card was declined.")]
    CardDeclined,
    /// A fault a test asked for through `/_local/faults`.
    #[error("Injected fault: this request was answered {0} without effect.")]
    Injected(StatusCode),
    #[error("Unrecognized request URL ({method}: {path}).")]
    UnknownUrl { method: String, path: String },
    #[error("An unexpected error occurred.")]
    Unexpected(#[from] anyhow::Error),
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            param: param.into(),
            message: message.into(),
        }
    }

    /// An id in the path that names nothing.
    pub fn no_such(kind: &'static str, id: &str) -> Self {
        ApiError::NoSuch {
            kind,
            id: id.to_string(),
            param: None,
        }
    }

    /// An id in parameter `param` that names nothing.
    pub fn no_such_param(kind: &'static str, id: &str, param: &str) -> Self {
        ApiError::NoSuch {
            kind,
            id: id.to_string(),
            param: Some(param.to_string()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NoSuch { param: None, .. } | ApiError::UnknownUrl { .. } => {
                StatusCode::NOT_FOUND
            }
            ApiError::NoKey | ApiError::WrongKey { .. } => StatusCode::UNAUTHORIZED,
            ApiError::IdempotencyInFlight(_) => StatusCode::CONFLICT,
            ApiError::CardDeclined => StatusCode::PAYMENT_REQUIRED,
            ApiError::Injected(status) => *status,
            ApiError::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::IdempotencyMismatch(_) | ApiError::IdempotencyInFlight(_) => {
                "idempotency_error"
            }
            ApiError::CardDeclined => "card_error",
            ApiError::Injected(status) if status.is_server_error() => "api_error",
            ApiError::Unexpected(_) => "api_error",
            _ => "invalid_request_error",
        }
    }

    pub fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::Missing(_) => Some("parameter_missing"),
            ApiError::InvalidInteger { .. } => Some("parameter_invalid_integer"),
            ApiError::Unknown(_) => Some("parameter_unknown"),
            ApiError::NoSuch { .. } => Some("resource_missing"),
            ApiError::CardDeclined => Some("card_declined"),
            ApiError::Injected(StatusCode::TOO_MANY_REQUESTS) => Some("rate_limit"),
            _ => None,
        }
    }

    pub fn param(&self) -> Option<&str> {
        match self {
            ApiError::Missing(p) | ApiError::Unknown(p) => Some(p),
            ApiError::InvalidInteger { param, .. } | ApiError::Invalid { param, .. } => Some(param),
            ApiError::NoSuch { param, .. } => Some(param.as_deref().unwrap_or("id")),
            _ => None,
        }
    }

    pub fn body(&self) -> Value {
        let mut error = Map::new();
        error.insert("type".into(), json!(self.kind()));
        error.insert("message".into(), json!(self.to_string()));
        if let Some(code) = self.code() {
            error.insert("code".into(), json!(code));
        }
        if let Some(param) = self.param() {
            error.insert("param".into(), json!(param));
        }
        if let ApiError::CardDeclined = self {
            error.insert("decline_code".into(), json!("generic_decline"));
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Unexpected(cause) = &self {
            tracing::error!(error = %cause, "stripe-local answered 500");
        }
        (self.status(), axum::Json(self.body())).into_response()
    }
}
