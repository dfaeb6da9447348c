//! One invoke, forwarded to the runtime on a pooled connection from Pingora's
//! connector, in the request's own task.
//!
//! Pingora's stock proxy path runs each request through two tasks joined by
//! channels; an invoke is one request body and one streamed answer, so it is
//! forwarded here directly: write the run request, read the runtime's header, then
//! copy each chunk to the client as it arrives (nothing is buffered, so a stream's
//! first bytes reach the client when the runtime sends them). The connection goes
//! back to the pool only after a complete answer; on any failure it is dropped, so
//! a client that goes away closes the runtime's connection and cancels the run.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use pingora::ErrorType;
use secrecy::{ExposeSecret, SecretString};

use crate::error::{rate_headers, GatewayError, RateHeaders};
use crate::invoke::{Tokens, UsageReader};
use crate::state::RouteTarget;

/// How long an idle runtime connection stays in the pool.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// What to send.
pub struct Exchange<'a> {
    pub target: &'a RouteTarget,
    pub body: Bytes,
    pub stream: bool,
    pub request_id: HeaderValue,
    pub rate: Option<RateHeaders>,
    pub runtime_key: Option<&'a SecretString>,
}

/// What happened, for metrics and the usage event (filled as it goes, so it is
/// meaningful after a failure too).
#[derive(Default)]
pub struct Progress {
    pub upstream_sent: Option<Instant>,
    pub upstream_done: Option<Instant>,
    pub bytes_out: u64,
    pub tokens: Option<Tokens>,
}

pub enum Failure {
    /// Nothing was sent to the client yet: answer with this error.
    Refused(GatewayError),
    /// The client went away.
    Cancelled,
    /// The runtime failed after the answer started; the client's response is cut.
    Broken(GatewayError),
}

pub async fn forward(
    connector: &Connector,
    session: &mut Session,
    x: Exchange<'_>,
    p: &mut Progress,
) -> Result<(), Failure> {
    let peer = x
        .target
        .peer
        .as_ref()
        .ok_or(Failure::Refused(GatewayError::AgentUnavailable))?;
    let mut fresh = false;
    let (mut up, header) = loop {
        let (mut up, reused) = connector
            .get_http_session(peer)
            .await
            .map_err(|e| Failure::Refused(upstream_error(e.etype())))?;
        up.set_read_timeout(peer.options.read_timeout);
        up.set_write_timeout(peer.options.write_timeout);
        p.upstream_sent = Some(Instant::now());
        match head(&mut up, &x).await {
            Ok(header) => break (up, header),
            // A pooled connection the runtime closed while it sat idle: the run
            // never started, so it is sent once more on a new connection.
            Err(e)
                if reused
                    && !fresh
                    && matches!(
                        e.etype(),
                        ErrorType::ConnectionClosed | ErrorType::WriteError
                    ) =>
            {
                fresh = true;
            }
            Err(e) => return Err(Failure::Refused(upstream_error(e.etype()))),
        }
    };
    let status = header.status.as_u16();
    if !(200..300).contains(&status) {
        tracing::warn!(status, "runtime answered with an error");
        return Err(Failure::Refused(GatewayError::UpstreamStatus(status)));
    }
    let mut resp = header;
    for name in ["server", "set-cookie", "connection", "keep-alive"] {
        resp.remove_header(name);
    }
    if let Some(rate) = &x.rate {
        rate_headers(&mut resp, rate);
    }
    let _ = resp.insert_header("x-agora-request-id", x.request_id.clone());
    session
        .write_response_header(Box::new(resp), false)
        .await
        .map_err(|_| Failure::Cancelled)?;
    let mut reader = UsageReader::new(x.stream);
    loop {
        match up.read_response_body().await {
            Ok(Some(chunk)) => {
                reader.feed(&chunk);
                p.bytes_out += chunk.len() as u64;
                if session
                    .write_response_body(Some(chunk), false)
                    .await
                    .is_err()
                {
                    p.tokens = reader.finish();
                    return Err(Failure::Cancelled);
                }
            }
            Ok(None) => break,
            Err(e) => {
                p.tokens = reader.finish();
                return Err(Failure::Broken(upstream_error(e.etype())));
            }
        }
    }
    p.upstream_done = Some(Instant::now());
    p.tokens = reader.finish();
    session
        .write_response_body(None, true)
        .await
        .map_err(|_| Failure::Cancelled)?;
    if up.response_done() {
        connector
            .release_http_session(up, peer, Some(POOL_IDLE))
            .await;
    }
    Ok(())
}

/// Sends the run request and reads the runtime's response header.
async fn head(up: &mut HttpSession, x: &Exchange<'_>) -> pingora::Result<ResponseHeader> {
    let uri = if x.stream {
        &x.target.stream_uri
    } else {
        &x.target.run_uri
    };
    let mut req = RequestHeader::build("POST", uri.path().as_bytes(), Some(8))?;
    req.set_uri(uri.clone());
    req.insert_header(http::header::HOST, x.target.authority.as_str())?;
    if let Some(key) = x.runtime_key {
        req.insert_header("x-api-key", key.expose_secret())?;
    }
    for (name, value) in &x.target.global_vars {
        req.insert_header(name.clone(), value.clone())?;
    }
    req.insert_header("x-agora-request-id", x.request_id.clone())?;
    req.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    req.insert_header(http::header::CONTENT_LENGTH, x.body.len())?;
    up.write_request_header(Box::new(req)).await?;
    up.write_request_body(x.body.clone(), true).await?;
    up.finish_request_body().await?;
    up.read_response_header().await?;
    up.response_header()
        .cloned()
        .ok_or_else(|| pingora::Error::explain(ErrorType::InvalidHTTPHeader, "no response header"))
}

fn upstream_error(kind: &ErrorType) -> GatewayError {
    match kind {
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            GatewayError::UpstreamTimeout
        }
        _ => GatewayError::UpstreamUnreachable,
    }
}
