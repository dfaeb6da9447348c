//! The gateway's request phases. Each phase is short and calls into `keys`,
//! `ratelimit`, `invoke`, `forward` and `usage`:
//!
//! - `request_filter`: route, key check, limits, body validation, then the invoke
//!   itself (`forward`, on a pooled runtime connection in this task); health,
//!   validate, usage reports and every refusal are answered here too;
//! - `logging`: one usage event and the metrics, for every request.
//!
//! Pingora's own proxy phases (`upstream_peer` onwards) are not used: an invoke is
//! one body and one streamed answer, and forwarding it in the request's task
//! avoids the stock path's per-request channels and task join.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_config::keys::Scope;
use agora_config::usage::{estimate_tokens, TokenSource, UsageEvent, UsageStatus};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorSource, ErrorType};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::error::{rate_headers, GatewayError, RateHeaders};
use crate::forward::{self, Exchange, Failure, Progress};
use crate::invoke;
use crate::keys::{self, Caller};
use crate::metrics::{Metrics, RouteLabel};
use crate::ratelimit::{InFlight, Limits};
use crate::state::RouteTarget;
use crate::sync::{now_ms, Shared};
use crate::usage::{TokenReport, UsageQueue, UsageRecord};

pub const INVOKE: &str = "/api/agent-gateway/invoke/";
pub const VALIDATE: &str = "/api/agent-gateway/validate/";
pub const USAGE: &str = "/api/agent-gateway/usage/";
pub const HEALTH: &str = "/api/agent-gateway/health/";

/// The data plane's shared parts.
pub struct Gateway {
    pub shared: Arc<Shared>,
    pub limits: Arc<Limits>,
    pub usage: UsageQueue,
    pub metrics: Arc<Metrics>,
    pub runtime_api_key: Option<SecretString>,
    pub runtime_secret: Option<SecretString>,
    pub max_body_bytes: usize,
    /// The spill log and store behind the usage queue, when there is one.
    pub pipeline: Option<Arc<agora_usage::Pipeline>>,
    pub life: Arc<Lifecycle>,
    /// Pooled connections to runtimes.
    pub connector: Connector,
}

/// What shutdown needs to see of the gateway.
#[derive(Default)]
pub struct Lifecycle {
    /// Set when shutdown starts: new invokes are refused, health says so.
    pub draining: AtomicBool,
    /// Requests being served.
    pub in_flight: AtomicI64,
}

/// Headers larger than this in total are refused (431).
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Per-request state.
pub struct Ctx {
    route: RouteLabel,
    started: Instant,
    /// Wall-clock time of the request, read once: limits, key expiry, the event.
    started_ms: i64,
    counted: bool,
    event_id: Uuid,
    request_id: Option<http::HeaderValue>,
    caller: Option<Caller>,
    target: Option<Arc<RouteTarget>>,
    stream: bool,
    body: Option<Bytes>,
    bytes_in: u64,
    rate: Option<RateHeaders>,
    _in_flight: Option<InFlight>,
    refusal: Option<GatewayError>,
    progress: Progress,
    cancelled: bool,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            route: RouteLabel::Other,
            started: Instant::now(),
            started_ms: 0,
            counted: false,
            event_id: Uuid::nil(),
            request_id: None,
            caller: None,
            target: None,
            stream: false,
            body: None,
            bytes_in: 0,
            rate: None,
            _in_flight: None,
            refusal: None,
            progress: Progress::default(),
            cancelled: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.started = Instant::now();
        ctx.started_ms = now_ms();
        ctx.counted = true;
        self.life.in_flight.fetch_add(1, Ordering::Relaxed);
        self.metrics.in_flight.inc();
        let header_bytes: usize = session
            .req_header()
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        if header_bytes > MAX_HEADER_BYTES {
            self.metrics.auth_failure("headers_too_large");
            self.refuse(
                session,
                ctx,
                GatewayError::HeadersTooLarge {
                    limit: MAX_HEADER_BYTES,
                },
            )
            .await;
            return Ok(true);
        }
        let path = session.req_header().uri.path();
        ctx.route = match path {
            INVOKE => RouteLabel::Invoke,
            VALIDATE => RouteLabel::Validate,
            USAGE => RouteLabel::Usage,
            HEALTH => RouteLabel::Health,
            _ => RouteLabel::Other,
        };
        let outcome = match ctx.route {
            RouteLabel::Invoke => match self.invoke(session, ctx).await {
                Ok(()) => self.forward(session, ctx).await,
                Err(refusal) => Err(refusal),
            },
            RouteLabel::Validate => self.validate(session, ctx).await,
            RouteLabel::Usage => self.report_usage(session, ctx).await,
            RouteLabel::Health => self.health(session).await,
            RouteLabel::Other => Err(GatewayError::NotFound),
        };
        if let Err(refusal) = outcome {
            self.refuse(session, ctx, refusal).await;
        }
        Ok(true)
    }

    /// Invokes are forwarded in `request_filter` (see `forward`); nothing reaches
    /// Pingora's own proxy phases.
    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        Err(Error::explain(
            ErrorType::InternalError,
            "every request is answered in request_filter",
        ))
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        if !ctx.counted {
            return;
        }
        if let Some(e) = e {
            tracing::debug!(error = %e, route = ctx.route.as_str(), "request ended with an error");
        }
        self.life.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.metrics.in_flight.dec();
        let total = ctx.started.elapsed();
        let upstream = match (ctx.progress.upstream_sent, ctx.progress.upstream_done) {
            (Some(sent), Some(done)) => Some(done.saturating_duration_since(sent)),
            (Some(sent), None) => Some(sent.elapsed()),
            _ => None,
        };
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let overhead = total.saturating_sub(upstream.unwrap_or_default());
        tracing::trace!(
            route = ctx.route.as_str(),
            status,
            ?upstream,
            ?total,
            "request done"
        );
        self.metrics.request(
            ctx.route,
            status,
            total.as_secs_f64(),
            overhead.as_secs_f64(),
        );
        if ctx.route == RouteLabel::Health {
            return;
        }
        let tokens = ctx.progress.tokens;
        if let (Some(t), Some(caller)) = (tokens, &ctx.caller) {
            self.limits
                .record_tokens(caller.record.entry.config, t.input.saturating_add(t.output));
        }
        let cancelled = ctx.cancelled || e.is_some_and(|e| e.esource() == &ErrorSource::Downstream);
        let usage_status = match (&ctx.refusal, cancelled) {
            (_, true) => UsageStatus::Cancelled,
            (Some(refusal), false) => refusal.usage_status(),
            (None, false) if (200..300).contains(&status) => UsageStatus::Ok,
            (None, false) if status == 0 || status >= 500 => UsageStatus::UpstreamError,
            (None, false) => UsageStatus::ClientError,
        };
        // The runtime's counts when it gave them; else, for a run the runtime
        // answered (or a stream the client cut), an estimate from the bytes that
        // went each way, marked as such. A later report from the runtime replaces
        // an estimate when usage is read.
        let (input_tokens, output_tokens, token_source) = match tokens {
            Some(t) => (Some(t.input), Some(t.output), TokenSource::Runtime),
            None if upstream.is_some()
                && matches!(usage_status, UsageStatus::Ok | UsageStatus::Cancelled) =>
            {
                (
                    Some(estimate_tokens(ctx.bytes_in)),
                    Some(estimate_tokens(ctx.progress.bytes_out)),
                    TokenSource::Estimated,
                )
            }
            None => (None, None, TokenSource::None),
        };
        let entry = ctx.caller.as_ref().map(|c| &c.record.entry);
        let event = UsageEvent {
            event_id: if ctx.event_id.is_nil() {
                Uuid::now_v7()
            } else {
                ctx.event_id
            },
            time_ms: ctx.started_ms,
            tenant: entry.map(|e| e.tenant),
            config: entry.map(|e| e.config),
            key_id: entry.map(|e| e.key_id),
            agent: ctx.target.as_ref().map(|t| t.route.agent),
            route: match ctx.route {
                RouteLabel::Invoke => INVOKE,
                RouteLabel::Validate => VALIDATE,
                RouteLabel::Usage => USAGE,
                _ => "other",
            }
            .to_owned(),
            status: usage_status,
            http_status: status,
            latency_us: total.as_micros() as u64,
            upstream_latency_us: upstream.map(|u| u.as_micros() as u64),
            bytes_in: ctx.bytes_in,
            bytes_out: ctx.progress.bytes_out,
            input_tokens,
            output_tokens,
            token_source,
        };
        self.usage.push(UsageRecord::Event(Box::new(event)));
    }
}

/// The request id header value, formatted once per request.
fn request_id(ctx: &mut Ctx) -> http::HeaderValue {
    if let Some(v) = &ctx.request_id {
        return v.clone();
    }
    let mut buf = Uuid::encode_buffer();
    let v = http::HeaderValue::from_str(ctx.event_id.hyphenated().encode_lower(&mut buf))
        .unwrap_or_else(|_| http::HeaderValue::from_static(""));
    ctx.request_id = Some(v.clone());
    v
}

impl Gateway {
    /// Sends the validated invoke to the runtime and streams its answer back.
    async fn forward(&self, session: &mut Session, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let (Some(target), Some(body)) = (ctx.target.clone(), ctx.body.take()) else {
            return Err(GatewayError::AgentUnavailable);
        };
        let exchange = Exchange {
            target: &target,
            body,
            stream: ctx.stream,
            request_id: request_id(ctx),
            rate: ctx.rate,
            runtime_key: self.runtime_api_key.as_ref(),
        };
        let result = forward::forward(&self.connector, session, exchange, &mut ctx.progress).await;
        match result {
            Ok(()) => Ok(()),
            Err(Failure::Refused(e)) => {
                self.metrics
                    .upstream_errors
                    .with_label_values(&[e.code()])
                    .inc();
                Err(e)
            }
            Err(Failure::Cancelled) => {
                ctx.cancelled = true;
                Ok(())
            }
            Err(Failure::Broken(e)) => {
                self.metrics
                    .upstream_errors
                    .with_label_values(&[e.code()])
                    .inc();
                ctx.refusal = Some(e);
                Ok(())
            }
        }
    }

    async fn invoke(&self, session: &mut Session, ctx: &mut Ctx) -> Result<(), GatewayError> {
        ctx.event_id = Uuid::now_v7();
        if session.req_header().method != http::Method::POST {
            return Err(GatewayError::MethodNotAllowed);
        }
        if self.life.draining.load(Ordering::Relaxed) {
            return Err(GatewayError::ShuttingDown);
        }
        if self.pipeline.as_ref().is_some_and(|p| p.refusing()) {
            return Err(GatewayError::MeteringUnavailable);
        }
        let state = self.shared.load();
        if !self.shared.is_loaded() {
            return Err(GatewayError::NotReady);
        }
        let caller = self.authenticate(session, &state, Some(Scope::Invoke), ctx.started_ms)?;
        keys::check_origin(&state, &caller, session.req_header())?;
        let entry = &caller.record.entry;
        let target = state
            .route(&entry.config)
            .filter(|t| t.peer.is_some())
            .ok_or(GatewayError::AgentUnavailable)?
            .clone();
        ctx.stream = invoke::wants_stream(session.req_header().uri.query())?;
        let plan = entry.plan.and_then(|p| state.plan(&p));
        let admission = self
            .limits
            .admit(entry, plan, &target.route.quota, ctx.started_ms)
            .inspect_err(|e| {
                if let GatewayError::RateLimited { limit, .. } = e {
                    self.metrics.rate_limited(limit);
                } else {
                    self.metrics.rate_limited(e.code());
                }
            })?;
        ctx.rate = admission.headers;
        ctx._in_flight = Some(admission.in_flight);
        ctx.caller = Some(caller);
        let body = self.read_body(session).await?;
        ctx.bytes_in = body.len() as u64;
        ctx.body = Some(invoke::runtime_body(&body, &target)?);
        ctx.target = Some(target);
        Ok(())
    }

    async fn validate(&self, session: &mut Session, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let method = &session.req_header().method;
        if method != http::Method::GET && method != http::Method::POST {
            return Err(GatewayError::MethodNotAllowed);
        }
        let state = self.shared.load();
        if !self.shared.is_loaded() {
            return Err(GatewayError::NotReady);
        }
        let caller = self.authenticate(session, &state, None, ctx.started_ms)?;
        keys::check_origin(&state, &caller, session.req_header())?;
        if session.req_header().method == http::Method::POST {
            // The body carries nothing; read it so the connection can be reused.
            let _ = self.read_body(session).await?;
        }
        let entry = &caller.record.entry;
        let plan = entry.plan.and_then(|p| state.plan(&p));
        let route = state.route(&entry.config);
        let body = serde_json::json!({
            "key_id": entry.key_id,
            "config": entry.config,
            "tenant": entry.tenant,
            "project": entry.project,
            "agent": route.map(|r| r.route.agent),
            "available": route.is_some_and(|r| r.peer.is_some()),
            "scopes": entry.scopes,
            "mode": entry.mode,
            "kind": entry.kind,
            "expires_at": caller.claims.exp,
            "plan": plan.map(|p| serde_json::json!({
                "uuid": p.plan,
                "requests_per_minute": p.requests_per_minute,
                "burst": p.burst,
                "max_concurrency": p.max_concurrency,
                "request_quota": p.request_quota,
                "token_quota": p.token_quota,
                "interval": p.interval,
            })),
            "revision": state.revision(),
        });
        ctx.caller = Some(caller);
        self.json(session, 200, &body).await;
        Ok(())
    }

    async fn report_usage(&self, session: &mut Session, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let Some(secret) = &self.runtime_secret else {
            return Err(GatewayError::UsageReportsDisabled);
        };
        if session.req_header().method != http::Method::POST {
            return Err(GatewayError::MethodNotAllowed);
        }
        let presented = session
            .req_header()
            .headers
            .get("x-runtime-secret")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !bool::from(presented.ct_eq(secret.expose_secret().as_bytes())) {
            self.metrics.auth_failure("runtime_secret");
            return Err(GatewayError::RuntimeSecretRequired);
        }
        let body = self.read_body(session).await?;
        ctx.bytes_in = body.len() as u64;
        let report: TokenReport =
            serde_json::from_slice(&body).map_err(|e| GatewayError::BadRequest {
                code: "invalid_body",
                message: format!(
                    "The body must be JSON {{request_id, input_tokens, output_tokens}}: {}.",
                    e.to_string().split(" at line").next().unwrap_or_default()
                ),
            })?;
        self.usage.push(UsageRecord::Report(report));
        self.json(session, 202, &serde_json::json!({"accepted": true}))
            .await;
        Ok(())
    }

    async fn health(&self, session: &mut Session) -> Result<(), GatewayError> {
        let now = now_ms();
        let state = self.shared.load();
        let loaded = self.shared.is_loaded();
        let draining = self.life.draining.load(Ordering::Relaxed);
        let stats = self.usage.stats();
        let sink_failing = stats.sink_failing.load(Ordering::Relaxed);
        // Not ready while usage cannot be recorded and invokes are refused.
        let refusing = self.pipeline.as_ref().is_some_and(|p| p.refusing());
        let status = if draining {
            "draining"
        } else if !loaded {
            "no_snapshot"
        } else if !self.shared.is_connected() {
            "stale"
        } else {
            "ok"
        };
        let body = serde_json::json!({
            "status": status,
            "ready": loaded && !draining && !refusing,
            "snapshot": {
                "revision": state.revision(),
                "age_seconds": self.shared.age_secs(now),
                "control_plane_connected": self.shared.is_connected(),
                "keys": state.key_count(),
            },
            "usage": {
                "sink": if sink_failing { "failing" } else { "ok" },
                "queue_depth": self.usage.depth(),
                "queue_capacity": self.usage.capacity(),
                "dropped": stats.dropped.load(Ordering::Relaxed),
                "store": self.pipeline.as_ref().map(|p| {
                    let ps = p.stats();
                    serde_json::json!({
                        "kind": p.store().kind(),
                        "status": if ps.store_failing.load(Ordering::Relaxed) { "failing" } else { "ok" },
                        "spill_bytes": ps.spill_bytes.load(Ordering::Relaxed),
                        "spill_max_bytes": p.spill_max_bytes(),
                        "spill_full": ps.spill_full.load(Ordering::Relaxed),
                        "refusing_invokes": p.refusing(),
                        "spill_dropped": ps.dropped.load(Ordering::Relaxed),
                        "spill_damaged_bytes": ps.damaged_bytes.load(Ordering::Relaxed),
                    })
                }),
            },
        });
        let code = if loaded && !draining && !refusing {
            200
        } else {
            503
        };
        self.json(session, code, &body).await;
        Ok(())
    }

    fn authenticate(
        &self,
        session: &Session,
        state: &crate::state::State,
        scope: Option<Scope>,
        now_ms: i64,
    ) -> Result<Caller, GatewayError> {
        let now = now_ms / 1000;
        keys::presented(session.req_header())
            .and_then(|raw| keys::authenticate(state, raw, scope, now))
            .inspect_err(|e| match e {
                GatewayError::InvalidKey(reason) => self.metrics.auth_failure(reason),
                other => self.metrics.auth_failure(other.code()),
            })
    }

    /// Reads the whole request body, refusing more than `max_body_bytes`.
    async fn read_body(&self, session: &mut Session) -> Result<Bytes, GatewayError> {
        let limit = self.max_body_bytes;
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(GatewayError::BodyTooLarge { limit });
        }
        let mut body = BytesMut::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > limit {
                        return Err(GatewayError::BodyTooLarge { limit });
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(_) => {
                    return Err(GatewayError::BadRequest {
                        code: "body_unreadable",
                        message: "The request body could not be read.".into(),
                    })
                }
            }
        }
        Ok(body.freeze())
    }

    async fn refuse(&self, session: &mut Session, ctx: &mut Ctx, refusal: GatewayError) {
        let (mut header, body) = refusal.response();
        if let (Some(rate), false) = (
            &ctx.rate,
            matches!(refusal, GatewayError::RateLimited { .. }),
        ) {
            rate_headers(&mut header, rate);
        }
        // A body left unread would be taken for the next request on this
        // connection: read a small one, close the connection for the rest.
        if !session.as_mut().is_body_done() {
            let small = session
                .req_header()
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok())
                .is_some_and(|n| n <= self.max_body_bytes);
            let drained = small
                && tokio::time::timeout(Duration::from_secs(1), session.drain_request_body())
                    .await
                    .is_ok_and(|r| r.is_ok());
            if !drained {
                let _ = header.insert_header("connection", "close");
                session.set_keepalive(None);
            }
        }
        if header
            .headers
            .get("connection")
            .is_some_and(|v| v == "close")
        {
            session.set_keepalive(None);
        }
        if !ctx.event_id.is_nil() {
            let _ = header.insert_header("x-agora-request-id", request_id(ctx));
        }
        let _ = session.write_response_header(Box::new(header), false).await;
        let _ = session.write_response_body(Some(body), true).await;
        ctx.refusal = Some(refusal);
    }

    async fn json(&self, session: &mut Session, status: u16, value: &serde_json::Value) {
        let body = Bytes::from(serde_json::to_vec(value).unwrap_or_default());
        let Ok(mut header) = ResponseHeader::build(status, Some(4)) else {
            return;
        };
        let _ = header.insert_header("content-type", "application/json");
        let _ = header.insert_header("content-length", body.len().to_string());
        let _ = header.insert_header("cache-control", "no-store");
        let _ = session.write_response_header(Box::new(header), false).await;
        let _ = session.write_response_body(Some(body), true).await;
    }
}
