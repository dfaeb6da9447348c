//! An invoke's filters, in order: the key, the limits (rate, in-flight,
//! quota), then the body.

use super::*;

impl Gateway {
    /// Admits an invoke, or says why not: its key, its limits, then its body
    /// (read, bounded and rewritten for the runtime), leaving what the upstream
    /// request needs in `ctx`.
    pub(super) async fn admit(
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
        let presented = keys::presented(head.header("authorization"), head.header("x-api-key"))
            .inspect_err(|e| self.count_auth_failure(e))?;
        let caller = if presented.starts_with(crate::widget::TOKEN_PREFIX.as_bytes()) {
            let (caller, visitor) = self.visitor(head, &state, presented, ctx)?;
            ctx.visitor = Some(visitor);
            caller
        } else {
            let caller = keys::authenticate(
                &state,
                presented,
                Some(Scope::Invoke),
                ctx.started_ms / 1000,
            )
            .inspect_err(|e| self.count_auth_failure(e))?;
            if caller.record.entry.kind.is_publishable() {
                return Err(GatewayError::WidgetSessionRequired);
            }
            caller
        };
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
        let count_refusal = |e: &GatewayError| {
            if let GatewayError::RateLimited { limit, .. } = e {
                self.metrics.rate_limited(limit.as_str());
            } else {
                self.metrics.rate_limited(e.code());
            }
        };
        let gateways = self.global.as_ref().map_or(1, |g| g.gateways());
        let mut admission = self
            .limits
            .admit(entry, plan, &target.route.quota, ctx.started_ms, gateways)
            .inspect_err(count_refusal)?;
        if let Some(global) = &self.global {
            // One wait for Redis for both limits.
            let deadline = global.deadline();
            global
                .admit(
                    RateLimit::Tenant,
                    entry.tenant,
                    self.tenant_per_second,
                    1_000,
                    ctx.started_ms,
                    deadline,
                )
                .await
                .inspect_err(count_refusal)?;
            if let Some(rpm) = plan.and_then(|p| p.requests_per_minute) {
                global
                    .admit(
                        RateLimit::Key,
                        entry.key_id,
                        u64::from(rpm),
                        60_000,
                        ctx.started_ms,
                        deadline,
                    )
                    .await
                    .inspect_err(count_refusal)?;
            }
        }
        admission.count();
        ctx.rate = admission.headers;
        ctx._in_flight = Some(admission.in_flight);
        let body = conn.read_body(self.max_body_bytes).await?;
        ctx.bytes_in = body.len() as u64;
        let speaker = match &ctx.visitor {
            Some(visitor) => invoke::Speaker::Visitor(visitor),
            None => invoke::Speaker::Key(&entry.key_id),
        };
        let run = invoke::runtime_body(&body, &target, speaker)?;
        ctx.body = Some(run.body);
        ctx.input = run.input;
        Ok(())
    }

    pub(super) fn authenticate(
        &self,
        head: &RequestHead,
        state: &crate::state::State,
        scope: Option<Scope>,
        now_ms: i64,
    ) -> Result<Caller, GatewayError> {
        let now = now_ms / 1000;
        keys::presented(head.header("authorization"), head.header("x-api-key"))
            .and_then(|raw| keys::authenticate(state, raw, scope, now))
            .inspect_err(|e| self.count_auth_failure(e))
    }
}
