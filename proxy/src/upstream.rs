//! One invoke, forwarded to the runtime in the request's own task.
//!
//! The run request is written in one piece; the runtime's head is parsed in place;
//! then each read from the runtime goes to the client as it arrives (nothing is
//! buffered, so a stream's first bytes reach the client when the runtime sends
//! them). A chunked answer is passed on byte for byte, its data read for usage on
//! the way. Plain TCP connections are opened and read directly; TLS ones come
//! from Pingora's connector. Idle ones wait in a small pool per thread, and a
//! connection goes back there only after a complete answer. On any failure it is
//! dropped, so a client that goes away closes the runtime's connection and cancels
//! the run.

use std::cell::RefCell;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use pingora::connectors::TransportConnector;
use pingora::protocols::Stream;
use pingora::upstreams::peer::Peer;
use pingora::ErrorType;
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::deadline::within;
use crate::downstream::{Conn, PassError};
use crate::error::{GatewayError, RateHeaders};
use crate::h1::{self, Chunked, Framing, RequestHead, ResponseHead};
use crate::invoke::{trimmed, RunReading, SessionScrub, UsageReader, MAX_ERROR_DETAIL};
use crate::state::RouteTarget;

/// How long an idle runtime connection stays in the pool: under the 5 s after
/// which uvicorn (Langflow's server) closes an idle connection, so a pooled
/// connection is not closed by the runtime just as a run is sent on it.
const POOL_IDLE: Duration = Duration::from_secs(4);
/// A connection idle for longer than this is checked before it is used (one
/// `recv` that should find nothing). Under load connections come back within a
/// millisecond or two, and a runtime closes only connections idle for seconds.
const PROBE_AFTER: Duration = Duration::from_millis(10);
/// Largest response head accepted from a runtime.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read buffer growth step; for TLS at least the read buffer of Pingora's
/// stream, so that its reads land in ours directly.
const READ_CHUNK: usize = 16 * 1024;
const TLS_READ_CHUNK: usize = 64 * 1024;

/// What a widget may read of an answer besides the basics.
pub const CORS_EXPOSED: &[u8] =
    b"retry-after, x-agora-request-id, ratelimit-limit, ratelimit-remaining, ratelimit-reset";

/// What to send.
pub struct RunRequest<'a> {
    pub target: &'a RouteTarget,
    pub body: Bytes,
    pub stream: bool,
    pub request_id: &'a [u8],
    pub rate: Option<RateHeaders>,
    pub runtime_key: Option<&'a SecretString>,
    /// The widget origin allowed to read the answer (CORS), if any.
    pub cors: Option<&'a str>,
}

/// What happened, for metrics and the usage event (filled as it goes, so it is
/// meaningful after a failure too).
#[derive(Default)]
pub struct Progress {
    /// The status sent to the client, once its head is on its way.
    pub status: u16,
    pub upstream_sent: Option<Instant>,
    pub upstream_done: Option<Instant>,
    pub bytes_out: u64,
    /// What the runtime's answer said: its counts, text, a failure.
    pub reading: RunReading,
    /// The runtime's `detail` when it answered with an error status.
    pub runtime_detail: Option<String>,
}

pub enum Failure {
    /// Nothing was sent to the client yet: answer with this error.
    Refused(GatewayError),
    /// The client went away.
    Cancelled,
    /// The runtime failed after the answer started; the client's response is cut.
    Broken(GatewayError),
}

/// A connection to a runtime and what has been read from it.
struct UpConn {
    io: UpIo,
    buf: BytesMut,
}

/// Plain TCP is spoken to directly (one buffer, ours); TLS goes through the
/// stream Pingora's connector set up.
enum UpIo {
    Tcp(TcpStream),
    Tls(Stream),
}

impl UpConn {
    /// Whether an idle connection has nothing to read: not closed by the runtime,
    /// and no stray bytes that would be taken for the next answer. (A TLS stream
    /// cannot be asked without a read; it relies on the idle limit.)
    fn is_quiet(&self) -> bool {
        match &self.io {
            UpIo::Tcp(s) => {
                let mut probe = [0u8; 1];
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            UpIo::Tls(_) => true,
        }
    }

    fn reserve(&mut self) {
        self.buf.reserve(match self.io {
            UpIo::Tcp(_) => READ_CHUNK,
            UpIo::Tls(_) => TLS_READ_CHUNK,
        });
    }
}

impl AsyncRead for UpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpIo::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpIo::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpIo::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpIo::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

struct Idle {
    key: u64,
    conn: UpConn,
    since: Instant,
}

thread_local! {
    /// Idle runtime connections of this thread. Each of Pingora's threads runs its
    /// own runtime, whose reactor a connection belongs to, so connections stay on
    /// the thread that opened them.
    static POOL: RefCell<Vec<Idle>> = const { RefCell::new(Vec::new()) };
}

/// Connections to runtimes.
pub struct Upstreams {
    connector: TransportConnector,
    /// Idle connections kept per runtime and thread.
    max_idle: usize,
}

enum UpError {
    /// The run could not be written: the runtime never had it.
    Unsent,
    /// The connection was closed before any byte of an answer.
    Closed,
    Timeout,
    Io,
    Malformed,
}

impl UpError {
    fn gateway(&self) -> GatewayError {
        match self {
            UpError::Timeout => GatewayError::UpstreamTimeout,
            _ => GatewayError::UpstreamUnreachable,
        }
    }
}

impl Upstreams {
    pub fn new(max_idle: usize) -> Upstreams {
        Upstreams {
            connector: TransportConnector::new(None),
            max_idle,
        }
    }

    fn take(&self, key: u64) -> Option<UpConn> {
        POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            while let Some(i) = pool.iter().rposition(|idle| idle.key == key) {
                let idle = pool.swap_remove(i);
                let idle_for = idle.since.elapsed();
                if idle_for < POOL_IDLE && (idle_for < PROBE_AFTER || idle.conn.is_quiet()) {
                    return Some(idle.conn);
                }
            }
            None
        })
    }

    fn put(&self, key: u64, conn: UpConn) {
        POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.iter().filter(|idle| idle.key == key).count() < self.max_idle {
                pool.push(Idle {
                    key,
                    conn,
                    since: Instant::now(),
                });
            }
        });
    }

    async fn connect(&self, target: &RouteTarget) -> Result<UpConn, GatewayError> {
        let Some(peer) = target.peer.as_ref() else {
            return Err(GatewayError::AgentUnavailable);
        };
        let io = if peer.tls() {
            let stream = self
                .connector
                .new_stream(peer)
                .await
                .map_err(|e| match e.etype() {
                    ErrorType::ConnectTimedout => GatewayError::UpstreamTimeout,
                    _ => GatewayError::UpstreamUnreachable,
                })?;
            UpIo::Tls(stream)
        } else {
            let addr = peer
                .address()
                .as_inet()
                .ok_or(GatewayError::AgentUnavailable)?;
            let stream = tokio::time::timeout(target.timeouts.connect, TcpStream::connect(addr))
                .await
                .map_err(|_| GatewayError::UpstreamTimeout)?
                .map_err(|_| GatewayError::UpstreamUnreachable)?;
            let _ = stream.set_nodelay(true);
            UpIo::Tcp(stream)
        };
        Ok(UpConn {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
        })
    }

    /// Sends the run and relays the runtime's answer to `conn`.
    pub async fn forward(
        &self,
        conn: &mut Conn,
        x: RunRequest<'_>,
        p: &mut Progress,
    ) -> Result<(), Failure> {
        let target = x.target;
        let timeout = target.timeouts.read;
        let request = run_request(&x);
        let mut pooled = self.take(target.pool_key);
        let (mut up, head) = loop {
            let (mut up, reused) = match pooled.take() {
                Some(up) => (up, true),
                None => (self.connect(target).await.map_err(Failure::Refused)?, false),
            };
            p.upstream_sent = Some(Instant::now());
            match send_and_read_head(&mut up, &request, timeout).await {
                Ok(head) => break (up, head),
                // A pooled connection that could not take the run (the runtime
                // closed it): the run never reached the runtime, so it is sent
                // once more, on a new connection. Once written, a run is never
                // sent twice.
                Err(UpError::Unsent) if reused => {}
                Err(e) => return Err(Failure::Refused(e.gateway())),
            }
        };
        if !(200..300).contains(&head.status) {
            p.runtime_detail = error_detail(&mut up, &head, timeout).await;
            return Err(Failure::Refused(GatewayError::UpstreamStatus(head.status)));
        }

        conn.start(head.status);
        // Fields the runtime's `Connection` names are for this hop only.
        let mut nominated: Vec<&[u8]> = Vec::new();
        for (name, value) in head.fields(&up.buf) {
            if name.eq_ignore_ascii_case(b"connection") {
                // `close` and `keep-alive` name no other field: no allocation.
                nominated.extend(
                    h1::tokens(value)
                        .filter(|t| !h1::is_hop_by_hop(t) && !t.eq_ignore_ascii_case(b"close")),
                );
            }
        }
        for (name, value) in head.fields(&up.buf) {
            if !h1::is_hop_by_hop(name)
                && !name.eq_ignore_ascii_case(b"server")
                && !name.eq_ignore_ascii_case(b"set-cookie")
                && !nominated.iter().any(|n| n.eq_ignore_ascii_case(name))
            {
                conn.header(name, value);
            }
        }
        if let Some(rate) = &x.rate {
            for (name, value) in rate.fields() {
                conn.header_u64(name.as_bytes(), value);
            }
        }
        conn.header(b"x-agora-request-id", x.request_id);
        if let Some(origin) = x.cors {
            conn.header(b"access-control-allow-origin", origin.as_bytes());
            conn.header(b"vary", b"origin");
            conn.header(b"access-control-expose-headers", CORS_EXPOSED);
        }
        // Session ids in the answer lose the config's namespace on the way, so
        // the body's length can change: a body already here whole goes with its
        // new length; anything else is chunked to an HTTP/1.1 client, or sent as
        // it comes with a close to an HTTP/1.0 one.
        up.buf.advance(head.len);
        let mut scrub = SessionScrub::new(&target.route.config);
        let mut reader = UsageReader::new(x.stream);
        let mut whole = Vec::new();
        let (source, out) = match head.framing {
            Framing::Empty => (Source::Length(0), Out::Raw),
            Framing::Length(n) if up.buf.len() as u64 >= n => {
                let data = up.buf.split_to(n as usize).freeze();
                p.bytes_out += data.len() as u64;
                reader.feed(&data);
                scrub.scrub(&data, &mut whole);
                scrub.finish(&mut whole);
                conn.header_u64(b"content-length", whole.len() as u64);
                (Source::Length(0), Out::Raw)
            }
            Framing::Length(n) => (Source::Length(n), out_framing(conn)),
            Framing::Chunked => (Source::Chunked, out_framing(conn)),
            Framing::Close => (Source::Close, out_framing(conn)),
        };
        p.status = head.status;
        conn.end_head();
        if !whole.is_empty() {
            conn.write(&whole).await.map_err(|_| cancelled(conn))?;
        }

        let mut relay = Relay {
            source,
            out,
            scrub: Some(scrub),
            scrubbed: whole,
        };
        let result = relay_body(&mut up, conn, &mut relay, timeout, Some(&mut reader), p).await;
        p.reading = reader.finish();
        if let Err(failure) = result {
            conn.keep_alive = false;
            return Err(failure);
        }
        p.upstream_done = Some(Instant::now());
        if head.keep_alive && up.buf.is_empty() {
            self.put(target.pool_key, up);
        }
        Ok(())
    }
}

fn cancelled(conn: &mut Conn) -> Failure {
    conn.keep_alive = false;
    Failure::Cancelled
}

/// How the runtime delimits the rest of its body.
#[derive(Clone, Copy)]
enum Source {
    Length(u64),
    Chunked,
    /// Until the runtime closes.
    Close,
}

/// How the client receives body data: as chunks, or as it is (then the
/// connection closes at the end).
#[derive(Clone, Copy)]
enum Out {
    Chunked,
    Raw,
}

/// Chunked for an HTTP/1.1 client, else raw with a close; adds the field.
fn out_framing(conn: &mut Conn) -> Out {
    if conn.http11 {
        conn.header(b"transfer-encoding", b"chunked");
        Out::Chunked
    } else {
        conn.keep_alive = false;
        Out::Raw
    }
}

struct Relay {
    source: Source,
    out: Out,
    /// For a run's answer: the config's session namespace comes off.
    scrub: Option<SessionScrub>,
    /// Scratch for scrubbed data.
    scrubbed: Vec<u8>,
}

impl Relay {
    /// Sends one piece of body data, scrubbed, reading it for usage.
    async fn send(
        &mut self,
        conn: &mut Conn,
        reader: &mut Option<&mut UsageReader>,
        p: &mut Progress,
        data: &Bytes,
    ) -> Result<(), Failure> {
        if data.is_empty() {
            return Ok(());
        }
        p.bytes_out += data.len() as u64;
        if let Some(reader) = reader {
            reader.feed(data);
        }
        self.scrubbed.clear();
        match &mut self.scrub {
            Some(scrub) => scrub.scrub(data, &mut self.scrubbed),
            None => self.scrubbed.extend_from_slice(data),
        }
        self.emit(conn).await
    }

    /// The end of the body: what the scrub held back, and the last chunk.
    async fn end(&mut self, conn: &mut Conn) -> Result<(), Failure> {
        self.scrubbed.clear();
        if let Some(scrub) = &mut self.scrub {
            scrub.finish(&mut self.scrubbed);
        }
        self.emit(conn).await?;
        if let Out::Chunked = self.out {
            conn.write(b"0\r\n\r\n")
                .await
                .map_err(|_| cancelled(conn))?;
        }
        conn.flush().await.map_err(|_| cancelled(conn))
    }

    async fn emit(&mut self, conn: &mut Conn) -> Result<(), Failure> {
        if self.scrubbed.is_empty() {
            return Ok(());
        }
        let data = &self.scrubbed;
        let sent = async {
            if let Out::Chunked = self.out {
                let mut size = [0u8; 18];
                conn.write(chunk_size(data.len(), &mut size)).await?;
                conn.write(data).await?;
                conn.write(b"\r\n").await
            } else {
                conn.write(data).await
            }
        };
        sent.await.map_err(|_| cancelled(conn))
    }
}

/// `{len:x}\r\n` without allocating.
fn chunk_size(len: usize, buf: &mut [u8; 18]) -> &[u8] {
    let mut i = 16;
    let mut n = len;
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf[16] = b'\r';
    buf[17] = b'\n';
    &buf[i..]
}

/// Copies the body from the runtime to the client, read by read.
async fn relay_body(
    up: &mut UpConn,
    conn: &mut Conn,
    relay: &mut Relay,
    timeout: Duration,
    mut reader: Option<&mut UsageReader>,
    p: &mut Progress,
) -> Result<(), Failure> {
    let mut remaining = match relay.source {
        Source::Length(n) => n,
        _ => 0,
    };
    let mut decoder = Chunked::default();
    let mut ranges: Vec<Range<usize>> = Vec::new();
    let mut done = matches!(relay.source, Source::Length(0));
    loop {
        if !up.buf.is_empty() && !done {
            match relay.source {
                Source::Length(_) => {
                    let take = (up.buf.len() as u64).min(remaining) as usize;
                    let data = up.buf.split_to(take).freeze();
                    remaining -= take as u64;
                    done = remaining == 0;
                    relay.send(conn, &mut reader, p, &data).await?;
                }
                Source::Chunked => {
                    ranges.clear();
                    let consumed = decoder
                        .decode(&up.buf, |r| ranges.push(r))
                        .map_err(|_| Failure::Broken(GatewayError::UpstreamUnreachable))?;
                    let raw = up.buf.split_to(consumed).freeze();
                    for r in ranges.drain(..) {
                        relay.send(conn, &mut reader, p, &raw.slice(r)).await?;
                    }
                    done = decoder.is_done();
                }
                Source::Close => {
                    let data = up.buf.split().freeze();
                    relay.send(conn, &mut reader, p, &data).await?;
                }
            }
        }
        if done {
            return relay.end(conn).await;
        }
        conn.flush().await.map_err(|_| cancelled(conn))?;
        up.reserve();
        match within(timeout, up.io.read_buf(&mut up.buf)).await {
            Some(Ok(0)) if matches!(relay.source, Source::Close) => done = true,
            Some(Ok(0)) | Some(Err(_)) => {
                return Err(Failure::Broken(GatewayError::UpstreamUnreachable))
            }
            Some(Ok(_)) => {}
            None => return Err(Failure::Broken(GatewayError::UpstreamTimeout)),
        }
    }
}

/// Longest error body read for its detail.
const MAX_ERROR_BODY: u64 = 16 * 1024;

/// Langflow's `detail` from an error answer whose body has a length (read within
/// the timeout, at most [`MAX_ERROR_BODY`]), trimmed for the log. A component's
/// failure comes as a `detail` string that holds JSON with a `message`.
async fn error_detail(up: &mut UpConn, head: &ResponseHead, timeout: Duration) -> Option<String> {
    let Framing::Length(n) = head.framing else {
        return None;
    };
    if n > MAX_ERROR_BODY {
        return None;
    }
    let want = head.len + n as usize;
    while up.buf.len() < want {
        up.reserve();
        match within(timeout, up.io.read_buf(&mut up.buf)).await {
            Some(Ok(read)) if read > 0 => {}
            _ => return None,
        }
    }
    let body = &up.buf[head.len..want];
    let detail = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("detail").cloned());
    let text = match detail {
        Some(serde_json::Value::String(s)) => serde_json::from_str::<serde_json::Value>(&s)
            .ok()
            .and_then(|inner| inner.get("message")?.as_str().map(str::to_owned))
            .unwrap_or(s),
        Some(other) => other.to_string(),
        None => String::from_utf8_lossy(body).into_owned(),
    };
    Some(trimmed(&text, MAX_ERROR_DETAIL))
}

/// The run request, head and body in one piece.
fn run_request(x: &RunRequest<'_>) -> Vec<u8> {
    let t = x.target;
    let target = if x.stream {
        t.stream_uri.as_bytes()
    } else {
        t.run_uri.as_bytes()
    };
    let mut out = Vec::with_capacity(256 + target.len() + x.body.len());
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    h1::field(&mut out, b"host", t.authority.as_bytes());
    if let Some(key) = x.runtime_key {
        h1::field(&mut out, b"x-api-key", key.expose_secret().as_bytes());
    }
    for (name, value) in &t.global_vars {
        h1::field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    h1::field(&mut out, b"x-agora-request-id", x.request_id);
    h1::field(&mut out, b"content-type", b"application/json");
    h1::field_u64(&mut out, b"content-length", x.body.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&x.body);
    out
}

/// Writes the run request and reads the runtime's response head (skipping any
/// 1xx); the head's bytes stay at the front of `up.buf`.
async fn send_and_read_head(
    up: &mut UpConn,
    request: &[u8],
    timeout: Duration,
) -> Result<ResponseHead, UpError> {
    let written = within(timeout, async {
        up.io.write_all(request).await?;
        up.io.flush().await
    })
    .await;
    match written {
        Some(Ok(())) => {}
        Some(Err(_)) => return Err(UpError::Unsent),
        None => return Err(UpError::Timeout),
    }
    read_head(up, timeout).await
}

/// Reads a response head (skipping any 1xx); its bytes stay at the front of
/// `up.buf`.
async fn read_head(up: &mut UpConn, timeout: Duration) -> Result<ResponseHead, UpError> {
    let mut received = false;
    loop {
        if !up.buf.is_empty() {
            match ResponseHead::parse(&up.buf) {
                Ok(Some(head)) if (100..200).contains(&head.status) => {
                    up.buf.advance(head.len);
                    continue;
                }
                Ok(Some(head)) => return Ok(head),
                Ok(None) if up.buf.len() > MAX_RESPONSE_HEAD => return Err(UpError::Malformed),
                Ok(None) => {}
                Err(_) => return Err(UpError::Malformed),
            }
        }
        up.reserve();
        match within(timeout, up.io.read_buf(&mut up.buf)).await {
            Some(Ok(0)) | Some(Err(_)) if !received => return Err(UpError::Closed),
            Some(Ok(0)) | Some(Err(_)) => return Err(UpError::Io),
            Some(Ok(_)) => received = true,
            None => return Err(UpError::Timeout),
        }
    }
}

/// The control plane behind the front door: every `/api/*` path the gateway does
/// not serve itself is passed on to it.
pub struct ControlPlane {
    pub addr: std::net::SocketAddr,
    /// Largest request body passed on (the control plane's own limit).
    pub max_body_bytes: u64,
    /// How long the control plane may take to answer (a publish waits on the
    /// runtime).
    pub timeout: Duration,
}

impl ControlPlane {
    /// From the control plane's URL; `None` for one the gateway cannot reach
    /// over plain HTTP.
    pub fn from_url(url: &str, max_body_bytes: u64, timeout: Duration) -> Option<ControlPlane> {
        let rest = url.strip_prefix("http://")?;
        let authority = rest.split('/').next()?;
        let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
            .ok()?
            .next()?;
        Some(ControlPlane {
            addr,
            max_body_bytes,
            timeout,
        })
    }
}

impl Upstreams {
    /// Passes a request on to the control plane as it arrives (head, then the
    /// body streamed), with `X-Forwarded-For`/`-Proto`/`-Host` added, and relays
    /// its answer unchanged but for the hop's own fields.
    pub async fn pass(
        &self,
        conn: &mut Conn,
        head: &RequestHead,
        cp: &ControlPlane,
        p: &mut Progress,
    ) -> Result<(), Failure> {
        let refused = |e| Failure::Refused(e);
        let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(cp.addr))
            .await
            .map_err(|_| refused(GatewayError::ControlPlaneUnreachable))?
            .map_err(|_| refused(GatewayError::ControlPlaneUnreachable))?;
        let _ = tcp.set_nodelay(true);
        let mut up = UpConn {
            io: UpIo::Tcp(tcp),
            buf: BytesMut::with_capacity(READ_CHUNK),
        };
        let mut out = Vec::with_capacity(512 + head.len());
        out.extend_from_slice(head.method());
        out.push(b' ');
        out.extend_from_slice(head.target());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let mut forwarded_for: Vec<u8> = Vec::new();
        for (name, value) in head.fields() {
            if name.eq_ignore_ascii_case(b"x-forwarded-for") {
                if !forwarded_for.is_empty() {
                    forwarded_for.extend_from_slice(b", ");
                }
                forwarded_for.extend_from_slice(value.trim_ascii());
            } else if !h1::is_hop_by_hop(name)
                && !name.eq_ignore_ascii_case(b"expect")
                && !name.eq_ignore_ascii_case(b"x-forwarded-proto")
                && !name.eq_ignore_ascii_case(b"x-forwarded-host")
            {
                h1::field(&mut out, name, value);
            }
        }
        if let Some(ip) = conn.peer {
            if !forwarded_for.is_empty() {
                forwarded_for.extend_from_slice(b", ");
            }
            forwarded_for.extend_from_slice(ip.to_string().as_bytes());
        }
        if !forwarded_for.is_empty() {
            h1::field(&mut out, b"x-forwarded-for", &forwarded_for);
        }
        h1::field(&mut out, b"x-forwarded-proto", b"http");
        if let Some(host) = head.header("host") {
            h1::field(&mut out, b"x-forwarded-host", host);
        }
        match head.framing {
            Framing::Length(n) if n > cp.max_body_bytes => {
                return Err(refused(GatewayError::BodyTooLarge {
                    limit: cp.max_body_bytes as usize,
                }))
            }
            Framing::Length(n) => h1::field_u64(&mut out, b"content-length", n),
            Framing::Chunked => h1::field(&mut out, b"transfer-encoding", b"chunked"),
            Framing::Empty | Framing::Close => {}
        }
        h1::field(&mut out, b"connection", b"close");
        out.extend_from_slice(b"\r\n");
        let sent = within(cp.timeout, up.io.write_all(&out)).await;
        if !matches!(sent, Some(Ok(()))) {
            return Err(refused(GatewayError::ControlPlaneUnreachable));
        }
        p.upstream_sent = Some(Instant::now());
        match conn.pass_body(&mut up.io, cp.max_body_bytes).await {
            Ok(()) => {}
            Err(PassError::TooLarge) => {
                return Err(refused(GatewayError::BodyTooLarge {
                    limit: cp.max_body_bytes as usize,
                }))
            }
            Err(PassError::Client(e)) => return Err(refused(e)),
            Err(PassError::Upstream) => return Err(refused(GatewayError::ControlPlaneUnreachable)),
        }
        let answer = read_head(&mut up, cp.timeout).await.map_err(|e| match e {
            UpError::Timeout => refused(GatewayError::UpstreamTimeout),
            _ => refused(GatewayError::ControlPlaneUnreachable),
        })?;
        conn.start(answer.status);
        for (name, value) in answer.fields(&up.buf) {
            if !h1::is_hop_by_hop(name) {
                conn.header(name, value);
            }
        }
        up.buf.advance(answer.len);
        // A HEAD's answer has the length of a body it does not carry.
        let source = match answer.framing {
            _ if head.method() == b"HEAD" => Source::Length(0),
            Framing::Empty => Source::Length(0),
            Framing::Length(n) => {
                conn.header_u64(b"content-length", n);
                Source::Length(n)
            }
            Framing::Chunked => Source::Chunked,
            Framing::Close => Source::Close,
        };
        let out = match (source, answer.framing) {
            (Source::Length(_), _) => Out::Raw,
            _ => out_framing(conn),
        };
        p.status = answer.status;
        conn.end_head();
        let mut relay = Relay {
            source,
            out,
            scrub: None,
            scrubbed: Vec::new(),
        };
        let result = relay_body(&mut up, conn, &mut relay, cp.timeout, None, p).await;
        if result.is_err() {
            conn.keep_alive = false;
        }
        p.upstream_done = Some(Instant::now());
        result
    }
}
