//! The gateway's side of a client connection: HTTP/1.x over the streams Pingora's
//! listeners accept (so Pingora still owns listening, TLS, graceful restart and
//! shutdown), with one read buffer and one write buffer per connection.
//!
//! Requests on a connection are served one after another in the connection's
//! task; bytes read past a request (pipelining) stay in the buffer for the next.
//! A head is parsed in place and never copied; a body is split off the buffer.
//! Pingora's own stream buffers are off for these connections (see `start`): a
//! response is collected here and written once per flush.

use std::io;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::deadline::within;
use crate::error::{GatewayError, Reply};
use crate::h1::{self, Chunked, Framing, HeadError, RequestHead};

/// Headers larger than this in total are refused (431).
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// How long an idle connection waits for its next request.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// How long the rest of a started head, or each part of a body, may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one write to the client may wait for it to read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes read and thrown away to keep a connection after a refusal.
const DISCARD_LIMIT: u64 = 64 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;
/// Most bytes of a response collected before they are written.
const WRITE_QUEUE: usize = 64 * 1024;

/// One client connection.
pub struct Conn {
    io: Stream,
    buf: BytesMut,
    out: Vec<u8>,
    /// Whether the connection may serve another request after this one.
    pub keep_alive: bool,
    /// The client reads chunked bodies (HTTP/1.1).
    pub http11: bool,
    /// How the current request's body is framed, until it has been read.
    body_pending: Option<Framing>,
    expect_continue: bool,
    /// A HEAD request: the answer has no body.
    head_only: bool,
    /// Unread bytes may follow (a refused head): close gently.
    linger: bool,
    /// The client's address, when the stream knows it.
    pub peer: Option<std::net::IpAddr>,
}

/// Why a body could not be passed on.
pub enum PassError {
    /// Larger than the limit: nothing was answered yet.
    TooLarge,
    /// The client's body could not be read (or was malformed).
    Client(GatewayError),
    /// The next hop stopped taking it.
    Upstream,
}

/// What waiting for the next request gave.
// A head holds its field offsets inline; it is moved once per request, where a
// box would be an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Next {
    Request(RequestHead),
    /// A head that cannot be served; answered, then the connection is closed.
    Refused(GatewayError),
    /// The client closed, went idle too long, or the server is stopping.
    Closed,
}

enum ReadError {
    Eof,
    Io,
    Timeout,
}

impl Conn {
    pub fn new(io: Stream) -> Conn {
        let peer = io
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        Conn {
            peer,
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            out: Vec::with_capacity(1024),
            keep_alive: true,
            http11: true,
            body_pending: None,
            expect_continue: false,
            head_only: false,
            linger: false,
        }
    }

    async fn fill(&mut self, limit: Duration) -> Result<(), ReadError> {
        self.buf.reserve(READ_CHUNK);
        match within(limit, self.io.read_buf(&mut self.buf)).await {
            Some(Ok(0)) => Err(ReadError::Eof),
            Some(Ok(_)) => Ok(()),
            Some(Err(_)) => Err(ReadError::Io),
            None => Err(ReadError::Timeout),
        }
    }

    /// Waits for the next request head.
    pub async fn next(&mut self, shutdown: &mut ShutdownWatch) -> Next {
        // A started head has READ_TIMEOUT in all to arrive.
        let mut deadline = None;
        loop {
            if !self.buf.is_empty() {
                match RequestHead::parse(&self.buf) {
                    Ok(Some((len, parsed))) => {
                        if len > MAX_HEADER_BYTES {
                            return self.refuse_head(HeadError::TooManyHeaders);
                        }
                        let head = parsed.take(self.buf.split_to(len).freeze());
                        self.keep_alive = head.keep_alive;
                        self.http11 = head.http11;
                        self.body_pending = match head.framing {
                            Framing::Empty | Framing::Length(0) => None,
                            framing => Some(framing),
                        };
                        self.expect_continue = head.expect_continue;
                        self.head_only = head.method() == b"HEAD";
                        return Next::Request(head);
                    }
                    Ok(None) if self.buf.len() > MAX_HEADER_BYTES => {
                        return self.refuse_head(HeadError::TooManyHeaders);
                    }
                    Ok(None) => {}
                    Err(e) => return self.refuse_head(e),
                }
                let left = deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + READ_TIMEOUT)
                    .saturating_duration_since(tokio::time::Instant::now());
                if self.fill(left).await.is_err() {
                    return Next::Closed;
                }
            } else {
                if *shutdown.borrow() {
                    return Next::Closed;
                }
                tokio::select! {
                    read = self.fill(KEEPALIVE_IDLE) => if read.is_err() {
                        return Next::Closed;
                    },
                    _ = shutdown.changed() => return Next::Closed,
                }
            }
        }
    }

    fn refuse_head(&mut self, e: HeadError) -> Next {
        self.keep_alive = false;
        self.linger = true;
        self.http11 = true;
        self.head_only = false;
        // What follows cannot be told apart from the head: nothing more is read.
        self.body_pending = None;
        self.buf.clear();
        Next::Refused(match e {
            HeadError::TooManyHeaders => GatewayError::HeadersTooLarge {
                limit: MAX_HEADER_BYTES,
            },
            HeadError::Malformed => GatewayError::BadRequest {
                code: "malformed_request",
                message: "The request is not valid HTTP/1.1.".into(),
            },
            HeadError::BadHost => GatewayError::BadRequest {
                code: "malformed_request",
                message: "An HTTP/1.1 request carries exactly one Host field.".into(),
            },
            HeadError::BadFraming => GatewayError::BadRequest {
                code: "malformed_request",
                message: "The body's length is ambiguous: use one Content-Length or Transfer-Encoding: chunked.".into(),
            },
        })
    }

    /// Whether the request's body is still unread.
    pub fn body_pending(&self) -> bool {
        self.body_pending.is_some()
    }

    async fn continue_if_expected(&mut self) -> Result<(), GatewayError> {
        if std::mem::take(&mut self.expect_continue) {
            timed(self.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n"))
                .await
                .map_err(|_| unreadable())?;
            timed(self.io.flush()).await.map_err(|_| unreadable())?;
        }
        Ok(())
    }

    /// Reads the whole request body, refusing more than `limit` bytes.
    pub async fn read_body(&mut self, limit: usize) -> Result<Bytes, GatewayError> {
        let Some(framing) = self.body_pending else {
            return Ok(Bytes::new());
        };
        match framing {
            Framing::Length(n) => {
                if n > limit as u64 {
                    return Err(GatewayError::BodyTooLarge { limit });
                }
                self.continue_if_expected().await?;
                let n = n as usize;
                while self.buf.len() < n {
                    self.fill(READ_TIMEOUT).await.map_err(|_| unreadable())?;
                }
                self.body_pending = None;
                Ok(self.buf.split_to(n).freeze())
            }
            Framing::Chunked => {
                self.continue_if_expected().await?;
                let mut decoder = Chunked::default();
                let mut body = BytesMut::new();
                loop {
                    let buf = &self.buf;
                    let consumed = decoder
                        .decode(buf, |r| body.extend_from_slice(&buf[r]))
                        .map_err(|_| GatewayError::BadRequest {
                            code: "malformed_request",
                            message: "The chunked body is malformed.".into(),
                        })?;
                    self.buf.advance(consumed);
                    if body.len() > limit {
                        return Err(GatewayError::BodyTooLarge { limit });
                    }
                    if decoder.is_done() {
                        self.body_pending = None;
                        return Ok(body.freeze());
                    }
                    self.fill(READ_TIMEOUT).await.map_err(|_| unreadable())?;
                }
            }
            Framing::Empty | Framing::Close => {
                self.body_pending = None;
                Ok(Bytes::new())
            }
        }
    }

    /// Streams the request's body to `out` as it arrives, as it was framed: the
    /// bytes of a length-delimited body, or the chunks of a chunked one (re-framed,
    /// trailers dropped). More than `limit` bytes stops it.
    pub async fn pass_body<W>(&mut self, out: &mut W, limit: u64) -> Result<(), PassError>
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        let Some(framing) = self.body_pending else {
            return Ok(());
        };
        let write = |e: io::Error| {
            let _ = e;
            PassError::Upstream
        };
        match framing {
            Framing::Length(n) => {
                if n > limit {
                    return Err(PassError::TooLarge);
                }
                self.continue_if_expected()
                    .await
                    .map_err(PassError::Client)?;
                let mut left = n;
                while left > 0 {
                    if self.buf.is_empty() {
                        self.fill(READ_TIMEOUT)
                            .await
                            .map_err(|_| PassError::Client(unreadable()))?;
                    }
                    let take = (self.buf.len() as u64).min(left) as usize;
                    let data = self.buf.split_to(take);
                    left -= take as u64;
                    timed(out.write_all(&data)).await.map_err(write)?;
                }
            }
            Framing::Chunked => {
                self.continue_if_expected()
                    .await
                    .map_err(PassError::Client)?;
                let mut decoder = Chunked::default();
                let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
                let mut total = 0u64;
                loop {
                    ranges.clear();
                    let consumed = decoder.decode(&self.buf, |r| ranges.push(r)).map_err(|_| {
                        PassError::Client(GatewayError::BadRequest {
                            code: "malformed_request",
                            message: "The chunked body is malformed.".into(),
                        })
                    })?;
                    let raw = self.buf.split_to(consumed).freeze();
                    for r in ranges.drain(..) {
                        total += r.len() as u64;
                        if total > limit {
                            return Err(PassError::TooLarge);
                        }
                        let mut chunk = Vec::with_capacity(r.len() + 12);
                        chunk.extend_from_slice(format!("{:x}\r\n", r.len()).as_bytes());
                        chunk.extend_from_slice(&raw[r]);
                        chunk.extend_from_slice(b"\r\n");
                        timed(out.write_all(&chunk)).await.map_err(write)?;
                    }
                    if decoder.is_done() {
                        timed(out.write_all(b"0\r\n\r\n")).await.map_err(write)?;
                        break;
                    }
                    self.fill(READ_TIMEOUT)
                        .await
                        .map_err(|_| PassError::Client(unreadable()))?;
                }
            }
            Framing::Empty | Framing::Close => {}
        }
        self.body_pending = None;
        timed(out.flush()).await.map_err(write)
    }

    /// Before a refusal: reads a small unread body so the connection can serve the
    /// next request, or marks the connection to close.
    async fn discard_body(&mut self) {
        let Some(framing) = self.body_pending else {
            return;
        };
        // A client waiting for 100-continue has sent nothing: close instead.
        if let Framing::Length(n) = framing {
            if n <= DISCARD_LIMIT && !self.expect_continue {
                let n = n as usize;
                let read = tokio::time::timeout(Duration::from_secs(1), async {
                    while self.buf.len() < n {
                        self.fill(READ_TIMEOUT).await?;
                    }
                    Ok::<_, ReadError>(())
                })
                .await;
                if matches!(read, Ok(Ok(()))) {
                    self.buf.advance(n);
                    self.body_pending = None;
                    return;
                }
            }
        }
        self.keep_alive = false;
    }

    /// Starts a response head.
    pub fn start(&mut self, status: u16) {
        self.out.clear();
        h1::status_line(&mut self.out, status);
    }

    pub fn header(&mut self, name: &[u8], value: &[u8]) {
        h1::field(&mut self.out, name, value);
    }

    pub fn header_u64(&mut self, name: &[u8], value: u64) {
        h1::field_u64(&mut self.out, name, value);
    }

    /// Ends the head started with [`Conn::start`], whose framing fields the
    /// caller has added; it leaves with the first body bytes, at [`Conn::flush`].
    pub fn end_head(&mut self) {
        // An answer given without reading the request's body ends the connection.
        if self.body_pending.is_some() {
            self.keep_alive = false;
        }
        if !self.keep_alive {
            self.out.extend_from_slice(b"connection: close\r\n");
        } else if !self.http11 {
            self.out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
    }

    /// Sends the head started with [`Conn::start`] and `body`, with its length,
    /// in one write when the body is small.
    pub async fn send(&mut self, body: &[u8]) -> io::Result<()> {
        h1::field_u64(&mut self.out, b"content-length", body.len() as u64);
        self.end_head();
        if !self.head_only {
            self.write(body).await?;
        }
        self.flush().await
    }

    /// Queues body bytes (sent by [`Conn::flush`], or now when the queue is
    /// large).
    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.head_only {
            return Ok(());
        }
        if self.out.len() + bytes.len() <= WRITE_QUEUE {
            self.out.extend_from_slice(bytes);
            return Ok(());
        }
        self.flush().await?;
        timed(self.io.write_all(bytes)).await
    }

    /// Sends what is queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            let sent = timed(self.io.write_all(&self.out)).await;
            self.out.clear();
            sent?;
        }
        timed(self.io.flush()).await
    }

    /// Starts a refusal's answer, reading or giving up a body left unread first;
    /// the caller may add fields, then [`Conn::send`]s `reply.body`.
    pub async fn start_reply(&mut self, reply: &Reply) {
        self.discard_body().await;
        if reply.close {
            self.keep_alive = false;
        }
        self.start(reply.status);
        for (name, value) in &reply.headers {
            self.header(name.as_bytes(), value.as_bytes());
        }
    }

    /// Answers `reply` before reading anything, and closes the connection,
    /// gently: what the client sent meanwhile is read and dropped for a moment.
    pub async fn answer_and_close(mut self, reply: &Reply) {
        self.keep_alive = false;
        self.start(reply.status);
        for (name, value) in &reply.headers {
            self.header(name.as_bytes(), value.as_bytes());
        }
        let _ = within(WRITE_TIMEOUT, self.send(&reply.body)).await;
        self.linger = true;
        self.close().await;
    }

    /// Closes the connection. When a request's body was left unread, the write
    /// side is shut first and the rest read and dropped for a moment, so the
    /// client reads the answer instead of a reset.
    pub async fn close(mut self) {
        if self.body_pending.is_none() && !self.linger && self.buf.is_empty() {
            return;
        }
        let _ = self.io.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let mut sink = [0u8; 8192];
            let mut left = 2 * 1024 * 1024;
            while left > 0 {
                match self.io.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left -= n.min(left),
                }
            }
        })
        .await;
    }
}

/// A write to the client, given up after [`WRITE_TIMEOUT`] (a client that stops
/// reading must not hold its run, its runtime connection and its in-flight slot).
async fn timed(write: impl std::future::Future<Output = io::Result<()>>) -> io::Result<()> {
    within(WRITE_TIMEOUT, write)
        .await
        .unwrap_or_else(|| Err(io::ErrorKind::TimedOut.into()))
}

fn unreadable() -> GatewayError {
    GatewayError::BadRequest {
        code: "body_unreadable",
        message: "The request body could not be read.".into(),
    }
}
