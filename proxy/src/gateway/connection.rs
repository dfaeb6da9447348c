//! The connection loop: admitted under the connection caps, then request
//! after request, each ended by the logging phase.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

use super::logging::Served;
use super::Gateway;
use crate::downstream::{Conn, Next};
use crate::error::GatewayError;

#[async_trait]
impl ServerApp for Gateway {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let mut conn = Conn::new(io);
        // Over a cap, the connection is answered at once, before it is read,
        // and closed: it never holds a descriptor for long.
        let _slot = match self.connections.admit(conn.peer) {
            Ok(slot) => slot,
            Err(refusal) => {
                self.metrics.connection_refused(refusal.as_str());
                conn.answer_and_close(&GatewayError::TooManyConnections(refusal).response())
                    .await;
                return None;
            }
        };
        let mut shutdown = shutdown.clone();
        loop {
            match conn.next(&mut shutdown).await {
                Next::Request(head) => {
                    let mut request = Served::begin(self);
                    self.serve(&mut conn, &head, &mut request.ctx).await;
                    request.complete = true;
                }
                Next::Refused(refusal) => {
                    let mut request = Served::begin(self);
                    self.refuse(&mut conn, &mut request.ctx, refusal).await;
                    request.complete = true;
                }
                Next::Closed => return None,
            }
            if !conn.keep_alive || conn.body_pending() {
                conn.close().await;
                return None;
            }
        }
    }
}
