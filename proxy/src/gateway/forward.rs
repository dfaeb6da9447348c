//! The upstream request: an admitted invoke to the runtime, streamed back, or
//! the control plane's API passed through the front door.

use super::*;

impl Gateway {
    /// Sends the validated invoke to the runtime and streams its answer back.
    pub(super) async fn forward(&self, conn: &mut Conn, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let (Some(target), Some(body), Some(request_id)) =
            (ctx.target.clone(), ctx.body.take(), ctx.request_id)
        else {
            return Err(GatewayError::AgentUnavailable);
        };
        let run = RunRequest {
            target: &target,
            body,
            stream: ctx.stream,
            request_id: &request_id,
            rate: ctx.rate,
            runtime_key: self.runtime_api_key.as_ref(),
            cors: ctx.cors.as_deref(),
        };
        let result = self.upstreams.forward(conn, run, &mut ctx.progress).await;
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
    pub(super) async fn pass(
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
}
