//! The gateway: one request at a time on a client connection, phase by phase,
//! each phase in one file, imports running one way (phases → `upstream` →
//! `downstream` → `h1`):
//!
//! 1. [`connection`]: the connection loop on Pingora's listeners — caps, then
//!    request after request on one [`Conn`](crate::downstream::Conn);
//! 2. [`route`]: which route a head asks for, and the routes answered here
//!    (health, validate, usage reports) and every refusal;
//! 3. [`filters`]: an invoke's key, limits and body, in that order;
//! 4. [`forward`]: the upstream request — the invoke to the runtime on a pooled
//!    connection, or the control plane's API through the front door;
//! 5. [`logging`]: one usage event and the metrics per request, and the drop
//!    guard that records them however the request ends;
//!
//! and [`widget`]: the chat widget's assets, visitor sessions and CORS.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use agora_config::keys::Scope;
use agora_config::usage::{RunFailure, TokenSource, UsageEvent, UsageStatus};
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use uuid::Uuid;

mod connection;
mod filters;
mod forward;
mod logging;
mod route;
mod widget;

pub use widget::{WIDGET_ASSETS, WIDGET_SESSION};

use crate::downstream::Conn;
use crate::error::{GatewayError, RateHeaders, RateLimit};
use crate::h1::RequestHead;
use crate::invoke;
use crate::keys::{self, Caller};
use crate::metrics::{Metrics, RouteLabel};
use crate::ratelimit::{InFlight, Limits};
use crate::state::RouteTarget;
use crate::sync::{now_ms, Shared};
use crate::tokens;
use crate::upstream::{ControlPlane, Failure, Progress, RunRequest, Upstreams};
use crate::usage::{UsageQueue, UsageRecord};

pub const INVOKE: &str = "/api/agent-gateway/invoke/";
pub const VALIDATE: &str = "/api/agent-gateway/validate/";
pub const USAGE: &str = "/api/agent-gateway/usage/";
pub const HEALTH: &str = "/api/agent-gateway/health/";
/// For orchestrators: alive while the process answers (draining included).
pub const LIVE: &str = "/api/agent-gateway/health/live/";
/// For orchestrators: 503 until a snapshot is applied, while draining and while
/// usage cannot be recorded.
pub const READY: &str = "/api/agent-gateway/health/ready/";

/// The data plane's shared parts.
pub struct Gateway {
    pub shared: Arc<Shared>,
    pub limits: Arc<Limits>,
    /// Limits shared with the other gateways through Redis, when configured.
    pub global: Option<Arc<crate::global::Global>>,
    /// The tenant limit per second, for the shared count.
    pub tenant_per_second: u64,
    pub usage: UsageQueue,
    pub metrics: Arc<Metrics>,
    pub runtime_api_key: Option<SecretString>,
    pub runtime_secret: Option<SecretString>,
    pub max_body_bytes: usize,
    /// The spill log and store behind the usage queue, when there is one.
    pub pipeline: Option<Arc<agora_usage::Pipeline>>,
    pub life: Arc<Lifecycle>,
    /// Connections to runtimes.
    pub upstreams: Upstreams,
    /// Where the front door passes the control plane's API on.
    pub control_plane: Option<ControlPlane>,
    /// Caps on open client connections.
    pub connections: Arc<agora_config::connections::ConnectionLimits>,
    /// Signs and checks widget visitor session tokens.
    pub sessions: crate::widget::Sessions,
    /// Lifetime of a visitor session token.
    pub widget_session_ttl_secs: u64,
}

/// What shutdown needs to see of the gateway.
#[derive(Default)]
pub struct Lifecycle {
    /// Set when shutdown starts: new invokes are refused, health says so.
    pub draining: AtomicBool,
    /// Requests being served.
    pub in_flight: AtomicI64,
}

/// Per-request state.
pub struct Ctx {
    route: RouteLabel,
    started: Instant,
    /// Wall-clock time of the request, read once: limits, key expiry, the event.
    started_ms: i64,
    /// The status sent, 0 if none was.
    status: u16,
    event_id: Uuid,
    /// `event_id`, hyphenated, once an invoke has one.
    request_id: Option<[u8; 36]>,
    caller: Option<Caller>,
    target: Option<Arc<RouteTarget>>,
    stream: bool,
    body: Option<Bytes>,
    /// The buyer's input text, for an estimate when the runtime counts nothing.
    input: String,
    bytes_in: u64,
    rate: Option<RateHeaders>,
    _in_flight: Option<InFlight>,
    refusal: Option<GatewayError>,
    progress: Progress,
    cancelled: bool,
    /// A runtime's report of a config's usage: this request's event carries it.
    reported: Option<invoke::Tokens>,
    /// The widget origin this answer may be read from (CORS), once known good.
    cors: Option<String>,
    /// The widget visitor speaking, when the caller is one.
    visitor: Option<Uuid>,
}

impl Ctx {
    /// A request has arrived.
    pub fn begin(gateway: &Gateway) -> Ctx {
        gateway.life.in_flight.fetch_add(1, Ordering::Relaxed);
        gateway.metrics.in_flight.inc();
        Ctx {
            route: RouteLabel::Other,
            started: Instant::now(),
            started_ms: now_ms(),
            status: 0,
            event_id: Uuid::nil(),
            request_id: None,
            caller: None,
            target: None,
            stream: false,
            body: None,
            input: String::new(),
            bytes_in: 0,
            rate: None,
            _in_flight: None,
            refusal: None,
            progress: Progress::default(),
            cancelled: false,
            reported: None,
            cors: None,
            visitor: None,
        }
    }

    /// The request was dropped before it ended.
    pub fn cut(&mut self) {
        self.cancelled = true;
        if self.status == 0 {
            self.status = self.progress.status;
        }
    }

    fn set_event_id(&mut self, id: Uuid) {
        self.event_id = id;
        let mut buf = [0u8; 36];
        id.hyphenated().encode_lower(&mut buf);
        self.request_id = Some(buf);
    }
}
