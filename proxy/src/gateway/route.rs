//! Routing, and what the gateway answers itself: health, key validation,
//! runtimes' usage reports, and refusals.

use super::*;

impl Gateway {
    /// Serves one request whose head has been read.
    pub(super) async fn serve(&self, conn: &mut Conn, head: &RequestHead, ctx: &mut Ctx) {
        ctx.route = match head.path() {
            p if p == INVOKE.as_bytes() => RouteLabel::Invoke,
            p if p == VALIDATE.as_bytes() => RouteLabel::Validate,
            p if p == USAGE.as_bytes() => RouteLabel::Usage,
            p if p == HEALTH.as_bytes() || p == LIVE.as_bytes() || p == READY.as_bytes() => {
                RouteLabel::Health
            }
            p if p == WIDGET_SESSION.as_bytes() || p.starts_with(WIDGET_ASSETS.as_bytes()) => {
                RouteLabel::Widget
            }
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
            RouteLabel::Invoke if head.method() == b"OPTIONS" => {
                ctx.route = RouteLabel::Widget;
                self.invoke_preflight(conn, head, ctx).await
            }
            RouteLabel::Invoke => match self.admit(conn, head, ctx).await {
                Ok(()) => self.forward(conn, ctx).await,
                Err(refusal) => Err(refusal),
            },
            RouteLabel::Widget if head.path() == WIDGET_SESSION.as_bytes() => {
                self.widget_session(conn, head, ctx).await
            }
            RouteLabel::Widget => self.widget_asset(conn, head, ctx).await,
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

    pub(super) async fn validate(
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

    pub(super) async fn report_usage(
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

    pub(super) async fn health(
        &self,
        conn: &mut Conn,
        head: &RequestHead,
        ctx: &mut Ctx,
    ) -> Result<(), GatewayError> {
        if head.method() != b"GET" && head.method() != b"HEAD" {
            return Err(GatewayError::MethodNotAllowed);
        }
        if head.path() == LIVE.as_bytes() {
            self.json(conn, ctx, 200, &serde_json::json!({"status": "alive"}))
                .await;
            return Ok(());
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
        let ready = loaded && !draining && !refusing;
        let code = if ready { 200 } else { 503 };
        if head.path() == READY.as_bytes() {
            let reason = if draining {
                Some("draining")
            } else if !loaded {
                Some("no_snapshot")
            } else if refusing {
                Some("usage_unrecordable")
            } else {
                None
            };
            let body = serde_json::json!({"ready": ready, "reason": reason});
            self.json(conn, ctx, code, &body).await;
            return Ok(());
        }
        let limits = match &self.global {
            Some(g) => serde_json::json!({"mode": g.mode().as_str(), "gateways": g.gateways()}),
            None => serde_json::json!({"mode": "local", "gateways": null}),
        };
        let body = serde_json::json!({
            "status": status,
            "ready": ready,
            "limits": limits,
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
        self.json(conn, ctx, code, &body).await;
        Ok(())
    }

    /// Answers with `refusal`'s error body.
    pub(super) async fn refuse(&self, conn: &mut Conn, ctx: &mut Ctx, refusal: GatewayError) {
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
        self.cors_fields(conn, ctx);
        let _ = conn.send(&reply.body).await;
        ctx.status = reply.status;
        ctx.refusal = Some(refusal);
    }

    pub(super) async fn json(
        &self,
        conn: &mut Conn,
        ctx: &mut Ctx,
        status: u16,
        value: &serde_json::Value,
    ) {
        let body = serde_json::to_vec(value).unwrap_or_default();
        conn.start(status);
        conn.header(b"content-type", b"application/json");
        conn.header(b"cache-control", b"no-store");
        conn.header(b"x-content-type-options", b"nosniff");
        self.cors_fields(conn, ctx);
        let _ = conn.send(&body).await;
        ctx.status = status;
    }
}
