//! The gateway's request handling, one request at a time on a client connection
//! (see `server`):
//!
//! - `serve`: route, key check, limits, body validation, then the invoke itself
//!   (`forward`, on a pooled runtime connection in this task); health, validate,
//!   usage reports and every refusal are answered here too;
//! - `finish`: one usage event and the metrics, for every request.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use agora_config::keys::Scope;
use agora_config::usage::{RunFailure, TokenSource, UsageEvent, UsageStatus};
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::error::{GatewayError, RateHeaders};
use crate::forward::{ControlPlane, Exchange, Failure, Progress, Upstreams};
use crate::h1::RequestHead;
use crate::invoke;
use crate::keys::{self, Caller};
use crate::metrics::{Metrics, RouteLabel};
use crate::ratelimit::{InFlight, Limits};
use crate::server::Conn;
use crate::state::RouteTarget;
use crate::sync::{now_ms, Shared};
use crate::tokens;
use crate::usage::{UsageQueue, UsageRecord};

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
    /// Connections to runtimes.
    pub upstreams: Upstreams,
    /// Where the front door passes the control plane's API on.
    pub control_plane: Option<ControlPlane>,
    /// Caps on open client connections.
    pub connections: Arc<agora_config::connections::ConnectionLimits>,
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

impl Gateway {
    /// Serves one request whose head has been read.
    pub async fn serve(&self, conn: &mut Conn, head: &RequestHead, ctx: &mut Ctx) {
        ctx.route = match head.path() {
            p if p == INVOKE.as_bytes() => RouteLabel::Invoke,
            p if p == VALIDATE.as_bytes() => RouteLabel::Validate,
            p if p == USAGE.as_bytes() => RouteLabel::Usage,
            p if p == HEALTH.as_bytes() => RouteLabel::Health,
            p if p.starts_with(b"/api/")
                && !p.starts_with(b"/api/agent-gateway/")
                && self.control_plane.is_some() =>
            {
                RouteLabel::ControlPlane
            }
            _ => RouteLabel::Other,
        };
        if self.life.draining.load(Ordering::Relaxed) {
            conn.keep_alive = false;
        }
        let outcome = match ctx.route {
            RouteLabel::Invoke => match self.invoke(conn, head, ctx).await {
                Ok(()) => self.forward(conn, ctx).await,
                Err(refusal) => Err(refusal),
            },
            RouteLabel::Validate => self.validate(conn, head, ctx).await,
            RouteLabel::Usage => self.report_usage(conn, head, ctx).await,
            RouteLabel::Health => self.health(conn, head, ctx).await,
            RouteLabel::ControlPlane => self.pass(conn, head, ctx).await,
            RouteLabel::Other => Err(GatewayError::NotFound),
        };
        if let Err(refusal) = outcome {
            self.refuse(conn, ctx, refusal).await;
        }
    }

    /// After a request: its metrics and its usage event.
    pub fn finish(&self, ctx: &mut Ctx) {
        self.life.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.metrics.in_flight.dec();
        let total = ctx.started.elapsed();
        let upstream = match (ctx.progress.upstream_sent, ctx.progress.upstream_done) {
            (Some(sent), Some(done)) => Some(done.saturating_duration_since(sent)),
            (Some(sent), None) => Some(sent.elapsed()),
            _ => None,
        };
        let status = ctx.status;
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
        // Health checks and the control plane's API are no metered use.
        if matches!(ctx.route, RouteLabel::Health | RouteLabel::ControlPlane) {
            return;
        }
        let reading = &ctx.progress.reading;
        let tokens = reading.tokens;
        if let (Some(t), Some(caller)) = (tokens, &ctx.caller) {
            self.limits
                .record_tokens(caller.record.entry.config, t.input.saturating_add(t.output));
        }
        let usage_status = match (&ctx.refusal, ctx.cancelled) {
            (_, true) => UsageStatus::Cancelled,
            (Some(refusal), false) => refusal.usage_status(),
            // A stream that ended in an `error` event failed, whatever its status.
            (None, false) if reading.error.is_some() => UsageStatus::UpstreamError,
            (None, false) if (200..300).contains(&status) => UsageStatus::Ok,
            (None, false) if status == 0 || status >= 500 => UsageStatus::UpstreamError,
            (None, false) => UsageStatus::ClientError,
        };
        if let (Some(detail), Some(target)) = (&reading.error, &ctx.target) {
            self.metrics
                .upstream_errors
                .with_label_values(&["stream_error"])
                .inc();
            tracing::warn!(
                agent = %target.route.agent,
                config = %target.route.config,
                flow_id = %target.route.flow_id,
                request_id = %ctx.event_id,
                runtime_status = status,
                detail = %detail,
                "the run failed in its stream"
            );
        }
        // The runtime's counts when it gave them; else, for a run the runtime
        // answered (or a stream the client cut), an estimate from the input text
        // and the answer's text, marked as such. A later report from the runtime
        // replaces an estimate when usage is read.
        let (input_tokens, output_tokens, token_source) = match (tokens, ctx.reported) {
            (_, Some(t)) => (Some(t.input), Some(t.output), TokenSource::Reported),
            (Some(t), None) => (Some(t.input), Some(t.output), TokenSource::Runtime),
            (None, None)
                if upstream.is_some()
                    && matches!(usage_status, UsageStatus::Ok | UsageStatus::Cancelled) =>
            {
                (
                    Some(tokens::estimate(&ctx.input)),
                    Some(tokens::estimate(&reading.output_text)),
                    TokenSource::Estimated,
                )
            }
            (None, None) => (None, None, TokenSource::None),
        };
        // Why a run failed in the runtime, for the seller's view.
        if let (UsageStatus::UpstreamError, Some(target)) = (usage_status, &ctx.target) {
            let (code, detail) = match (&reading.error, &ctx.refusal) {
                (Some(detail), _) => ("stream_error", detail.clone()),
                (None, Some(refusal)) => (
                    refusal.code(),
                    ctx.progress
                        .runtime_detail
                        .clone()
                        .unwrap_or_else(|| refusal.message()),
                ),
                (None, None) => ("runtime_error", String::new()),
            };
            self.usage.push(UsageRecord::Failure(Box::new(RunFailure {
                event_id: ctx.event_id,
                time_ms: ctx.started_ms,
                agent: target.route.agent,
                config: target.route.config,
                code: code.to_owned(),
                detail,
            })));
        }
        let entry = ctx.caller.as_ref().map(|c| &c.record.entry);
        // A config's usage report has no caller: the config's route says whose.
        let route = ctx.target.as_ref().map(|t| &t.route);
        let event = UsageEvent {
            event_id: if ctx.event_id.is_nil() {
                Uuid::now_v7()
            } else {
                ctx.event_id
            },
            time_ms: ctx.started_ms,
            tenant: entry.map(|e| e.tenant).or(route.map(|r| r.tenant)),
            config: entry.map(|e| e.config).or(route.map(|r| r.config)),
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

    /// Sends the validated invoke to the runtime and streams its answer back.
    async fn forward(&self, conn: &mut Conn, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let (Some(target), Some(body), Some(request_id)) =
            (ctx.target.clone(), ctx.body.take(), ctx.request_id)
        else {
            return Err(GatewayError::AgentUnavailable);
        };
        let exchange = Exchange {
            target: &target,
            body,
            stream: ctx.stream,
            request_id: &request_id,
            rate: ctx.rate,
            runtime_key: self.runtime_api_key.as_ref(),
        };
        let result = self
            .upstreams
            .forward(conn, exchange, &mut ctx.progress)
            .await;
        ctx.status = ctx.progress.status;
        let failed = match &result {
            Ok(()) | Err(Failure::Cancelled) => None,
            Err(Failure::Refused(e)) | Err(Failure::Broken(e)) => Some(e),
        };
        if let Some(e) = failed {
            self.metrics
                .upstream_errors
                .with_label_values(&[e.code()])
                .inc();
            let runtime_status = match e {
                GatewayError::UpstreamStatus(s) => *s,
                _ => 0,
            };
            tracing::warn!(
                agent = %target.route.agent,
                config = %target.route.config,
                flow_id = %target.route.flow_id,
                request_id = %ctx.event_id,
                runtime_status,
                error = e.code(),
                detail = ctx.progress.runtime_detail.as_deref().unwrap_or(""),
                "the runtime failed the run"
            );
        }
        match result {
            Ok(()) => Ok(()),
            Err(Failure::Refused(e)) => Err(e),
            Err(Failure::Cancelled) => {
                ctx.cancelled = true;
                Ok(())
            }
            Err(Failure::Broken(e)) => {
                ctx.refusal = Some(e);
                Ok(())
            }
        }
    }

    /// The front door: the control plane's API, passed on.
    async fn pass(
        &self,
        conn: &mut Conn,
        head: &RequestHead,
        ctx: &mut Ctx,
    ) -> Result<(), GatewayError> {
        let Some(cp) = &self.control_plane else {
            return Err(GatewayError::NotFound);
        };
        let result = self.upstreams.pass(conn, head, cp, &mut ctx.progress).await;
        ctx.status = ctx.progress.status;
        match result {
            Ok(()) => Ok(()),
            Err(Failure::Refused(e)) => {
                if e.side() != crate::error::Side::Downstream {
                    tracing::warn!(error = e.code(), "the control plane could not be reached");
                }
                Err(e)
            }
            Err(Failure::Cancelled) => {
                ctx.cancelled = true;
                Ok(())
            }
            Err(Failure::Broken(e)) => {
                tracing::warn!(error = e.code(), "the control plane's answer was cut");
                ctx.refusal = Some(e);
                Ok(())
            }
        }
    }

    async fn invoke(
        &self,
        conn: &mut Conn,
        head: &RequestHead,
        ctx: &mut Ctx,
    ) -> Result<(), GatewayError> {
        ctx.set_event_id(Uuid::now_v7());
        if head.method() != b"POST" {
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
        let caller = self.authenticate(head, &state, Some(Scope::Invoke), ctx.started_ms)?;
        keys::check_origin(&state, &caller, head.header("origin"))?;
        let record = caller.record.clone();
        let entry = &record.entry;
        // Known from here, so that any refusal is counted as the caller's.
        ctx.caller = Some(caller);
        let target = state
            .route(&entry.config)
            .filter(|t| t.peer.is_some())
            .ok_or(GatewayError::AgentUnavailable)?
            .clone();
        ctx.stream = invoke::wants_stream(head.query())?;
        let plan = entry.plan.and_then(|p| state.plan(&p));
        ctx.target = Some(target.clone());
        let admission = self
            .limits
            .admit(entry, plan, &target.route.quota, ctx.started_ms)
            .inspect_err(|e| {
                if let GatewayError::RateLimited { limit, .. } = e {
                    self.metrics.rate_limited(limit.as_str());
                } else {
                    self.metrics.rate_limited(e.code());
                }
            })?;
        ctx.rate = admission.headers;
        ctx._in_flight = Some(admission.in_flight);
        let body = conn.read_body(self.max_body_bytes).await?;
        ctx.bytes_in = body.len() as u64;
        let run = invoke::runtime_body(&body, &target, &entry.key_id)?;
        ctx.body = Some(run.body);
        ctx.input = run.input;
        Ok(())
    }

    async fn validate(
        &self,
        conn: &mut Conn,
        head: &RequestHead,
        ctx: &mut Ctx,
    ) -> Result<(), GatewayError> {
        let post = head.method() == b"POST";
        if head.method() != b"GET" && !post {
            return Err(GatewayError::MethodNotAllowed);
        }
        let state = self.shared.load();
        if !self.shared.is_loaded() {
            return Err(GatewayError::NotReady);
        }
        let caller = self.authenticate(head, &state, None, ctx.started_ms)?;
        keys::check_origin(&state, &caller, head.header("origin"))?;
        if post {
            // The body carries nothing; read it so the connection can be reused.
            let _ = conn.read_body(self.max_body_bytes).await?;
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
        self.json(conn, ctx, 200, &body).await;
        Ok(())
    }

    async fn report_usage(
        &self,
        conn: &mut Conn,
        head: &RequestHead,
        ctx: &mut Ctx,
    ) -> Result<(), GatewayError> {
        let Some(secret) = &self.runtime_secret else {
            return Err(GatewayError::UsageReportsDisabled);
        };
        if head.method() != b"POST" {
            return Err(GatewayError::MethodNotAllowed);
        }
        let presented = head.header("x-runtime-secret").unwrap_or_default();
        if !bool::from(presented.ct_eq(secret.expose_secret().as_bytes())) {
            self.metrics.auth_failure("runtime_secret");
            return Err(GatewayError::RuntimeSecretRequired);
        }
        let body = conn.read_body(self.max_body_bytes).await?;
        ctx.bytes_in = body.len() as u64;
        match invoke::usage_report(&body)? {
            invoke::Report::Request(report) => {
                self.usage.push(UsageRecord::Report(report));
            }
            invoke::Report::Config {
                config,
                event_id,
                tokens,
            } => {
                // Its own event, the config's: this request's usage event is it.
                let state = self.shared.load();
                let target = state.route(&config).ok_or(GatewayError::UnknownConfig)?;
                ctx.target = Some(target.clone());
                ctx.set_event_id(event_id.unwrap_or_else(Uuid::now_v7));
                ctx.reported = Some(tokens);
            }
        }
        self.json(conn, ctx, 202, &serde_json::json!({"accepted": true}))
            .await;
        Ok(())
    }

    async fn health(
        &self,
        conn: &mut Conn,
        head: &RequestHead,
        ctx: &mut Ctx,
    ) -> Result<(), GatewayError> {
        if head.method() != b"GET" && head.method() != b"HEAD" {
            return Err(GatewayError::MethodNotAllowed);
        }
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
        self.json(conn, ctx, code, &body).await;
        Ok(())
    }

    fn authenticate(
        &self,
        head: &RequestHead,
        state: &crate::state::State,
        scope: Option<Scope>,
        now_ms: i64,
    ) -> Result<Caller, GatewayError> {
        let now = now_ms / 1000;
        keys::presented(head.header("authorization"), head.header("x-api-key"))
            .and_then(|raw| keys::authenticate(state, raw, scope, now))
            .inspect_err(|e| match e {
                GatewayError::InvalidKey(reason) => self.metrics.auth_failure(reason.as_str()),
                other => self.metrics.auth_failure(other.code()),
            })
    }

    /// Answers with `refusal`'s error body.
    pub async fn refuse(&self, conn: &mut Conn, ctx: &mut Ctx, refusal: GatewayError) {
        let reply = refusal.response();
        conn.start_reply(&reply).await;
        if let (Some(rate), false) = (
            &ctx.rate,
            matches!(refusal, GatewayError::RateLimited { .. }),
        ) {
            for (name, value) in rate.fields() {
                conn.header_u64(name.as_bytes(), value);
            }
        }
        if let Some(id) = &ctx.request_id {
            conn.header(b"x-agora-request-id", id);
        }
        let _ = conn.send(&reply.body).await;
        ctx.status = reply.status;
        ctx.refusal = Some(refusal);
    }

    async fn json(&self, conn: &mut Conn, ctx: &mut Ctx, status: u16, value: &serde_json::Value) {
        let body = serde_json::to_vec(value).unwrap_or_default();
        conn.start(status);
        conn.header(b"content-type", b"application/json");
        conn.header(b"cache-control", b"no-store");
        conn.header(b"x-content-type-options", b"nosniff");
        let _ = conn.send(&body).await;
        ctx.status = status;
    }
}
