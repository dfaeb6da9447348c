//! Why the gateway answered a request itself, and the one place those reasons
//! become HTTP responses.
//!
//! Every refusal has one body shape, `{"error":{"code":"...","message":"..."}}`.
//! Key failures share a single body whatever the reason, so a caller learns nothing
//! about which check failed; the reason goes to metrics only.

use std::fmt;

use agora_config::usage::UsageStatus;
use bytes::Bytes;

/// Which side of the gateway a failure came from (as pingora-error classifies it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The caller's request was refused.
    Downstream,
    /// The runtime failed or could not be reached.
    Upstream,
    /// The gateway itself cannot serve (no configuration yet, shutting down).
    Internal,
}

/// A rate-limit answer: what the `RateLimit-*` headers say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateHeaders {
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
}

/// Why a key was refused. Metrics count by it; the answer is the same for all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRefusal {
    /// `Authorization` present but not `Bearer`.
    AuthorizationScheme,
    TooLong,
    /// Not UTF-8.
    Malformed,
    /// No known kind prefix, or another kind than its entry's.
    WrongPrefix,
    /// Well-formed but in no key table.
    Unknown,
    Revoked,
    Expired,
    /// The snapshot holds no verification key.
    NoTrustedKeys,
    /// Signed claims that disagree with the key's entry.
    ClaimsMismatch,
    /// Refused by the key parser or verifier, with its reason.
    Key(agora_config::keys::KeyError),
}

impl KeyRefusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyRefusal::AuthorizationScheme => "authorization_scheme",
            KeyRefusal::TooLong => "key_too_long",
            KeyRefusal::Malformed => "malformed_key",
            KeyRefusal::WrongPrefix => "wrong_key_prefix",
            KeyRefusal::Unknown => "unknown_key",
            KeyRefusal::Revoked => "revoked",
            KeyRefusal::Expired => "key_expired",
            KeyRefusal::NoTrustedKeys => "no_trusted_keys",
            KeyRefusal::ClaimsMismatch => "claims_mismatch",
            KeyRefusal::Key(e) => e.code(),
        }
    }
}

/// Which rate limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateLimit {
    /// The tenant's bucket, over all its keys.
    Tenant,
    /// The key's plan bucket.
    Key,
    /// A widget visitor's messages.
    Visitor,
    /// Visitor sessions opened from one client address.
    Address,
}

impl RateLimit {
    /// The metric label, and the word in the answer.
    pub fn as_str(self) -> &'static str {
        match self {
            RateLimit::Tenant => "tenant",
            RateLimit::Key => "key",
            RateLimit::Visitor => "visitor",
            RateLimit::Address => "client address",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayError {
    MissingKey,
    /// A key that is malformed, unknown, revoked, expired, badly signed... The
    /// reason is for metrics; the response is the same for all.
    InvalidKey(KeyRefusal),
    /// The subscription behind the key is not active.
    Suspended,
    InsufficientScope,
    OriginNotAllowed,
    /// A publishable key used to invoke: it only opens visitor sessions.
    WidgetSessionRequired,
    /// A widget visitor's session token that is not ours or names nothing served.
    InvalidVisitorToken,
    /// A genuine visitor session token past its lifetime: refresh it.
    VisitorSessionExpired,
    RateLimited {
        limit: RateLimit,
        retry_after_secs: u64,
        headers: RateHeaders,
    },
    QuotaExceeded {
        retry_after_secs: u64,
    },
    TooManyInFlight {
        limit: u32,
    },
    BadRequest {
        code: &'static str,
        message: String,
    },
    BodyTooLarge {
        limit: usize,
    },
    HeadersTooLarge {
        limit: usize,
    },
    NotFound,
    /// A usage report names a config this gateway does not serve.
    UnknownConfig,
    MethodNotAllowed,
    /// The key's agent config has no route (not published, or no runtime).
    AgentUnavailable,
    UpstreamUnreachable,
    UpstreamTimeout,
    /// The runtime answered with an error status.
    UpstreamStatus(u16),
    /// The control plane behind the front door could not be reached.
    ControlPlaneUnreachable,
    RuntimeSecretRequired,
    UsageReportsDisabled,
    NotReady,
    ShuttingDown,
    /// The usage spill log is full and the policy refuses unmetered traffic.
    MeteringUnavailable,
    /// The listener, or the client's address, has as many connections as it takes.
    TooManyConnections(agora_config::connections::Refusal),
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        use GatewayError::*;
        match self {
            MissingKey | InvalidKey(_) | RuntimeSecretRequired => 401,
            InvalidVisitorToken | VisitorSessionExpired => 401,
            // Payment Required: the subscription lapsed; paying makes it work again.
            Suspended => 402,
            InsufficientScope | OriginNotAllowed | WidgetSessionRequired => 403,
            RateLimited { .. } | QuotaExceeded { .. } | TooManyInFlight { .. } => 429,
            BadRequest { .. } => 400,
            BodyTooLarge { .. } => 413,
            HeadersTooLarge { .. } => 431,
            NotFound | UsageReportsDisabled | UnknownConfig => 404,
            MethodNotAllowed => 405,
            AgentUnavailable | NotReady | ShuttingDown | MeteringUnavailable => 503,
            TooManyConnections(agora_config::connections::Refusal::Full) => 503,
            TooManyConnections(agora_config::connections::Refusal::ClientFull) => 429,
            UpstreamUnreachable | UpstreamStatus(_) | ControlPlaneUnreachable => 502,
            UpstreamTimeout => 504,
        }
    }

    pub fn code(&self) -> &'static str {
        use GatewayError::*;
        match self {
            MissingKey => "missing_api_key",
            InvalidKey(_) => "invalid_api_key",
            Suspended => "subscription_inactive",
            InsufficientScope => "insufficient_scope",
            OriginNotAllowed => "origin_not_allowed",
            WidgetSessionRequired => "widget_session_required",
            InvalidVisitorToken => "invalid_visitor_token",
            VisitorSessionExpired => "visitor_session_expired",
            RateLimited { .. } => "rate_limited",
            QuotaExceeded { .. } => "quota_exceeded",
            TooManyInFlight { .. } => "too_many_in_flight",
            BadRequest { code, .. } => code,
            BodyTooLarge { .. } => "body_too_large",
            HeadersTooLarge { .. } => "headers_too_large",
            NotFound | UsageReportsDisabled => "not_found",
            UnknownConfig => "unknown_config",
            MethodNotAllowed => "method_not_allowed",
            AgentUnavailable => "agent_unavailable",
            UpstreamUnreachable => "runtime_unreachable",
            UpstreamTimeout => "runtime_timeout",
            UpstreamStatus(_) => "runtime_error",
            ControlPlaneUnreachable => "control_plane_unreachable",
            RuntimeSecretRequired => "invalid_runtime_secret",
            NotReady => "not_ready",
            ShuttingDown => "shutting_down",
            MeteringUnavailable => "usage_unavailable",
            TooManyConnections(_) => "too_many_connections",
        }
    }

    pub fn message(&self) -> String {
        use GatewayError::*;
        match self {
            MissingKey => {
                "An API key is required: `Authorization: Bearer <key>` or `X-API-Key`.".into()
            }
            InvalidKey(_) => "The API key is not valid.".into(),
            Suspended => "The subscription behind this API key is not active.".into(),
            InsufficientScope => "The API key does not allow this operation.".into(),
            OriginNotAllowed => "This widget is not allowed from this origin.".into(),
            WidgetSessionRequired => "A publishable key opens widget visitor sessions (POST /api/agent-gateway/widget/session/); invoke with the session's token.".into(),
            InvalidVisitorToken => "The visitor session token is not valid.".into(),
            VisitorSessionExpired => "The visitor session has expired; refresh it.".into(),
            RateLimited { limit, .. } => format!("Too many requests ({} limit).", limit.as_str()),
            QuotaExceeded { .. } => "The plan's quota for this period is used up.".into(),
            TooManyInFlight { limit } => {
                format!("At most {limit} requests may be in flight for this key.")
            }
            BadRequest { message, .. } => message.clone(),
            BodyTooLarge { limit } => format!("The request body is larger than {limit} bytes."),
            HeadersTooLarge { limit } => {
                format!("The request headers are larger than {limit} bytes.")
            }
            NotFound => "No such route.".into(),
            UsageReportsDisabled => "No such route.".into(),
            UnknownConfig => "No agent config with this config_uuid is served here.".into(),
            MethodNotAllowed => "Method not allowed on this route.".into(),
            AgentUnavailable => "The agent is not available right now.".into(),
            UpstreamUnreachable => "The agent runtime could not be reached.".into(),
            UpstreamTimeout => "The agent runtime did not answer in time.".into(),
            UpstreamStatus(status) => format!("The agent runtime failed (status {status})."),
            ControlPlaneUnreachable => "The control plane could not be reached.".into(),
            RuntimeSecretRequired => "A valid X-Runtime-Secret is required.".into(),
            NotReady => "The gateway has no configuration yet.".into(),
            ShuttingDown => "The gateway is shutting down.".into(),
            MeteringUnavailable => {
                "Usage cannot be recorded right now, so the request was not run; retry later."
                    .into()
            }
            TooManyConnections(agora_config::connections::Refusal::Full) => {
                "The gateway has as many connections as it takes; retry shortly.".into()
            }
            TooManyConnections(agora_config::connections::Refusal::ClientFull) => {
                "Too many connections from this address; close some and retry.".into()
            }
        }
    }

    pub fn side(&self) -> Side {
        use GatewayError::*;
        match self {
            UpstreamUnreachable | UpstreamTimeout | UpstreamStatus(_) | ControlPlaneUnreachable => {
                Side::Upstream
            }
            NotReady | ShuttingDown | AgentUnavailable | MeteringUnavailable => Side::Internal,
            _ => Side::Downstream,
        }
    }

    /// How a request refused this way is recorded in its usage event.
    pub fn usage_status(&self) -> UsageStatus {
        use GatewayError::*;
        match self {
            MissingKey
            | InvalidKey(_)
            | Suspended
            | InsufficientScope
            | OriginNotAllowed
            | WidgetSessionRequired
            | InvalidVisitorToken
            | VisitorSessionExpired
            | RuntimeSecretRequired => UsageStatus::Unauthorized,
            RateLimited { .. } | QuotaExceeded { .. } | TooManyInFlight { .. } => {
                UsageStatus::RateLimited
            }
            _ if self.side() != Side::Downstream => UsageStatus::UpstreamError,
            _ => UsageStatus::ClientError,
        }
    }

    /// The status, header fields (besides the body's length) and body of this
    /// refusal.
    pub fn response(&self) -> Reply {
        let body = Bytes::from(error_body(self.code(), &self.message()));
        let mut headers = vec![
            ("content-type", "application/json".to_owned()),
            ("cache-control", "no-store".to_owned()),
            ("x-content-type-options", "nosniff".to_owned()),
        ];
        match self {
            GatewayError::RateLimited {
                retry_after_secs,
                headers: rate,
                ..
            } => {
                headers.push(("retry-after", retry_after_secs.to_string()));
                headers.extend(rate.fields().map(|(n, v)| (n, v.to_string())));
            }
            GatewayError::QuotaExceeded { retry_after_secs } => {
                headers.push(("retry-after", retry_after_secs.to_string()));
            }
            GatewayError::TooManyInFlight { .. } | GatewayError::MeteringUnavailable => {
                headers.push(("retry-after", "1".to_owned()));
            }
            GatewayError::MissingKey
            | GatewayError::InvalidKey(_)
            | GatewayError::InvalidVisitorToken
            | GatewayError::VisitorSessionExpired => {
                headers.push(("www-authenticate", "Bearer".to_owned()));
            }
            _ => {}
        }
        Reply {
            status: self.status(),
            headers,
            body,
            close: self.closes(),
        }
    }

    /// Whether the connection is closed after this refusal.
    pub fn closes(&self) -> bool {
        matches!(
            self,
            GatewayError::ShuttingDown
                | GatewayError::TooManyConnections(_)
                | GatewayError::HeadersTooLarge { .. }
                | GatewayError::BadRequest {
                    code: "malformed_request" | "body_unreadable",
                    ..
                }
        )
    }
}

/// A refusal as HTTP.
pub struct Reply {
    pub status: u16,
    /// Fields besides `content-length` and `connection`.
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
    /// The connection is closed after it.
    pub close: bool,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

impl RateHeaders {
    /// `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`.
    pub fn fields(&self) -> [(&'static str, u64); 3] {
        [
            ("ratelimit-limit", u64::from(self.limit)),
            ("ratelimit-remaining", u64::from(self.remaining)),
            ("ratelimit-reset", self.reset_secs),
        ]
    }
}

/// `{"error":{"code":...,"message":...}}`.
pub fn error_body(code: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"error": {"code": code, "message": message}}))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_failures_share_one_body() {
        let a = GatewayError::InvalidKey(KeyRefusal::Expired).response();
        let b = GatewayError::InvalidKey(KeyRefusal::Unknown).response();
        assert_eq!(a.status, 401);
        assert_eq!(b.status, 401);
        assert_eq!(a.body, b.body);
        assert_eq!(a.headers, b.headers);
        let value: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(value["error"]["code"], "invalid_api_key");
    }

    #[test]
    fn rate_limited_carries_headers() {
        let reply = GatewayError::RateLimited {
            limit: RateLimit::Key,
            retry_after_secs: 3,
            headers: RateHeaders {
                limit: 10,
                remaining: 0,
                reset_secs: 30,
            },
        }
        .response();
        assert_eq!(reply.status, 429);
        assert_eq!(reply.header("retry-after"), Some("3"));
        assert_eq!(reply.header("ratelimit-limit"), Some("10"));
        assert_eq!(reply.header("ratelimit-remaining"), Some("0"));
        assert_eq!(reply.header("ratelimit-reset"), Some("30"));
        assert!(!reply.close);
        assert!(GatewayError::ShuttingDown.response().close);
    }

    #[test]
    fn every_body_has_the_error_shape() {
        for e in [
            GatewayError::MissingKey,
            GatewayError::UpstreamTimeout,
            GatewayError::UpstreamStatus(500),
            GatewayError::BodyTooLarge { limit: 10 },
            GatewayError::NotReady,
        ] {
            let reply = e.response();
            let value: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
            assert_eq!(value["error"]["code"], e.code());
            assert!(value["error"]["message"].as_str().unwrap().len() > 5);
            assert_eq!(reply.header("content-type"), Some("application/json"));
            assert_eq!(reply.status, e.status());
        }
    }
}
