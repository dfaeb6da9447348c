//! The logging phase: after every request, its metrics and one usage event.

use super::*;

impl Gateway {
    /// After a request: its metrics and its usage event.
    pub(super) fn finish(&self, ctx: &mut Ctx) {
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
        // Health checks, the control plane's API and the widget's assets and
        // sessions are no metered use.
        if matches!(
            ctx.route,
            RouteLabel::Health | RouteLabel::ControlPlane | RouteLabel::Widget
        ) {
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
}

/// A request being served. Its metrics and usage event are recorded when it
/// ends, and also when its task is dropped before that (requests still running
/// when shutdown's grace period ends), as cancelled.
pub(super) struct Served<'a> {
    gateway: &'a Gateway,
    pub(super) ctx: Ctx,
    pub(super) complete: bool,
}

impl<'a> Served<'a> {
    pub(super) fn begin(gateway: &'a Gateway) -> Served<'a> {
        Served {
            gateway,
            ctx: Ctx::begin(gateway),
            complete: false,
        }
    }
}

impl Drop for Served<'_> {
    fn drop(&mut self) {
        if !self.complete {
            self.ctx.cut();
        }
        self.gateway.finish(&mut self.ctx);
    }
}
