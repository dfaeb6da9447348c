//! HTTP/1.x framing as the gateway speaks it, on both sides: request and response
//! heads parsed in place (`httparse`, headers kept as offsets into the received
//! bytes, nothing copied), body framing, and an incremental chunked decoder that
//! reports where the data is, so a chunked answer can be passed on byte for byte
//! while its data is read for metering.

use bytes::Bytes;

/// Most header fields accepted in one head.
pub const MAX_HEADERS: usize = 100;

/// Where a piece of a head lies in its bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn of(base: &[u8], part: &[u8]) -> Span {
        let start = part.as_ptr() as usize - base.as_ptr() as usize;
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }

    fn get(self, raw: &[u8]) -> &[u8] {
        &raw[self.start as usize..self.end as usize]
    }
}

/// How a message's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    Length(u64),
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// Why a head could not be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// Not HTTP/1.x, or a field that cannot be read.
    Malformed,
    /// More than [`MAX_HEADERS`] fields.
    TooManyHeaders,
    /// A body framing the gateway will not guess at: conflicting lengths, a
    /// transfer coding other than chunked, or both a length and a coding.
    BadFraming,
    /// An HTTP/1.1 request without `Host`, or any request with more than one
    /// (RFC 9112 §3.2).
    BadHost,
}

/// The fields of a head, as offsets into its bytes.
#[derive(Clone)]
struct Fields {
    spans: [(Span, Span); MAX_HEADERS],
    len: usize,
}

impl Fields {
    fn parse(base: &[u8], headers: &[httparse::Header<'_>]) -> Fields {
        let mut spans = [(Span::default(), Span::default()); MAX_HEADERS];
        for (slot, h) in spans.iter_mut().zip(headers) {
            *slot = (Span::of(base, h.name.as_bytes()), Span::of(base, h.value));
        }
        Fields {
            spans,
            len: headers.len(),
        }
    }

    fn iter<'a>(&'a self, raw: &'a [u8]) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        self.spans[..self.len]
            .iter()
            .map(move |(n, v)| (n.get(raw), v.get(raw)))
    }

    fn get<'a>(&self, raw: &'a [u8], name: &str) -> Option<&'a [u8]> {
        self.spans[..self.len]
            .iter()
            .find(|(n, _)| n.get(raw).eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.get(raw))
    }

    /// Body framing and whether the connection may be kept, from the fields.
    fn framing(&self, raw: &[u8], http11: bool) -> Result<(Option<Framing>, bool), HeadError> {
        let mut length: Option<u64> = None;
        let mut chunked = None;
        let mut keep_alive = http11;
        for (name, value) in self.iter(raw) {
            if name.eq_ignore_ascii_case(b"content-length") {
                let n = parse_length(value).ok_or(HeadError::BadFraming)?;
                if length.is_some_and(|l| l != n) {
                    return Err(HeadError::BadFraming);
                }
                length = Some(n);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                // `chunked` alone: the gateway decodes no other coding, and a
                // list (`gzip, chunked`, `identity, chunked`) is refused rather
                // than passed on with its other codings dropped (RFC 9112 §6.1).
                if chunked.is_some() || !value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Err(HeadError::BadFraming);
                }
                chunked = Some(true);
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in tokens(value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                        keep_alive = true;
                    }
                }
            }
        }
        match (length, chunked) {
            (Some(_), Some(_)) => Err(HeadError::BadFraming),
            (Some(n), None) => Ok((Some(Framing::Length(n)), keep_alive)),
            // HTTP/1.0 has no transfer codings (RFC 9112 §6.1).
            (None, Some(_)) if !http11 => Err(HeadError::BadFraming),
            (None, Some(_)) => Ok((Some(Framing::Chunked), keep_alive)),
            (None, None) => Ok((None, keep_alive)),
        }
    }
}

/// A head's length once httparse has all of it; `None` while it is incomplete.
fn head_len(parsed: httparse::Result<usize>) -> Result<Option<usize>, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders),
        Err(_) => Err(HeadError::Malformed),
    }
}

/// A `Content-Length` value: digits only, no sign, no overflow.
fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 {
        return None;
    }
    value.iter().try_fold(0u64, |n, b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// A request head.
pub struct RequestHead {
    raw: Bytes,
    method: Span,
    path: Span,
    query: Option<Span>,
    /// HTTP/1.1 (else 1.0).
    pub http11: bool,
    fields: Fields,
    pub framing: Framing,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

impl RequestHead {
    /// Parses a head from the start of `buf`: `Ok(None)` while it is incomplete,
    /// else the head's length and a parse to finish with [`Parsed::take`].
    pub fn parse(buf: &[u8]) -> Result<Option<(usize, Parsed)>, HeadError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let Some(len) = head_len(req.parse(buf))? else {
            return Ok(None);
        };
        let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version)
        else {
            return Err(HeadError::Malformed);
        };
        let http11 = version == 1;
        let (path, query) = match target.find('?') {
            Some(i) => (&target[..i], Some(&target[i + 1..])),
            None => (target, None),
        };
        let fields = Fields::parse(buf, req.headers);
        let hosts = fields
            .iter(buf)
            .filter(|(n, _)| n.eq_ignore_ascii_case(b"host"))
            .count();
        if hosts > 1 || (http11 && hosts == 0) {
            return Err(HeadError::BadHost);
        }
        let (framing, keep_alive) = fields.framing(buf, http11)?;
        let expect_continue = http11
            && fields
                .get(buf, "expect")
                .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"100-continue"));
        Ok(Some((
            len,
            Parsed(RequestHead {
                raw: Bytes::new(),
                method: Span::of(buf, method.as_bytes()),
                path: Span::of(buf, path.as_bytes()),
                query: query.map(|q| Span::of(buf, q.as_bytes())),
                http11,
                fields,
                framing: framing.unwrap_or(Framing::Empty),
                keep_alive,
                expect_continue,
            }),
        )))
    }

    pub fn method(&self) -> &[u8] {
        self.method.get(&self.raw)
    }

    pub fn path(&self) -> &[u8] {
        self.path.get(&self.raw)
    }

    pub fn query(&self) -> Option<&str> {
        self.query
            .map(|q| std::str::from_utf8(q.get(&self.raw)).unwrap_or("\u{0}"))
    }

    /// The first field named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.fields.get(&self.raw, name)
    }

    /// Every field, in order.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.fields.iter(&self.raw)
    }

    /// The request target as sent: the path and its query.
    pub fn target(&self) -> &[u8] {
        let end = self.query.map_or(self.path.end, |q| q.end);
        &self.raw[self.path.start as usize..end as usize]
    }

    /// Bytes of the whole head.
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }
}

/// A parsed head waiting for its bytes (which the caller splits off its buffer).
pub struct Parsed(RequestHead);

impl Parsed {
    /// `raw` must be the bytes the head was parsed from, up to its length.
    pub fn take(self, raw: Bytes) -> RequestHead {
        RequestHead { raw, ..self.0 }
    }
}

/// A response head.
pub struct ResponseHead {
    pub status: u16,
    pub http11: bool,
    pub framing: Framing,
    pub keep_alive: bool,
    /// The head's length in the buffer it was parsed from.
    pub len: usize,
    fields: Fields,
}

impl ResponseHead {
    /// Parses a response head (for a POST) from the start of `buf`.
    pub fn parse(buf: &[u8]) -> Result<Option<ResponseHead>, HeadError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let Some(len) = head_len(resp.parse(buf))? else {
            return Ok(None);
        };
        let (Some(status), Some(version)) = (resp.code, resp.version) else {
            return Err(HeadError::Malformed);
        };
        let http11 = version == 1;
        let fields = Fields::parse(buf, resp.headers);
        let (framing, keep_alive) = fields.framing(buf, http11)?;
        let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
            Framing::Empty
        } else {
            framing.unwrap_or(Framing::Close)
        };
        Ok(Some(ResponseHead {
            status,
            http11,
            framing,
            keep_alive: keep_alive && framing != Framing::Close,
            len,
            fields,
        }))
    }

    /// The fields, read from the bytes the head was parsed from.
    pub fn fields<'a>(&'a self, raw: &'a [u8]) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        self.fields.iter(raw)
    }
}

/// Header fields that describe one hop and are not passed on.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 9] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"content-length",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
    ];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// The tokens of a comma-separated field value (`Connection: keep-alive, x-hop`),
/// trimmed, empty ones left out.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// Why a chunked body could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    Size {
        digits: u8,
    },
    /// Whitespace after the size, before `;` or the line's end.
    SizeSpace,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Longest trailer section, and longest extension of one chunk, accepted.
const MAX_TRAILER: usize = 16 * 1024;

/// An incremental `Transfer-Encoding: chunked` decoder.
pub struct Chunked {
    state: ChunkState,
    size: u64,
    /// Bytes of the current chunk's extensions, and of the trailers.
    extension: usize,
    trailer: usize,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: ChunkState::Size { digits: 0 },
            size: 0,
            extension: 0,
            trailer: 0,
        }
    }
}

impl Chunked {
    /// Whether the last chunk and the trailers have been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Reads as much of `input` as belongs to the body, calling `data` with the
    /// range of each piece of chunk data in it; returns how many bytes were read
    /// (less than `input.len()` only when the body ended before its end).
    pub fn decode(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(std::ops::Range<usize>),
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                ChunkState::Size { digits } => {
                    let v = match b {
                        b'0'..=b'9' => Some(b - b'0'),
                        b'a'..=b'f' => Some(b - b'a' + 10),
                        b'A'..=b'F' => Some(b - b'A' + 10),
                        _ => None,
                    };
                    match (v, b) {
                        (Some(v), _) if digits < 15 => {
                            self.size = self.size << 4 | u64::from(v);
                            self.state = ChunkState::Size { digits: digits + 1 };
                        }
                        (None, b';') if digits > 0 => self.state = ChunkState::Extension,
                        // Whitespace before `;` only (RFC 9112 §7.1.1's BWS).
                        (None, b' ' | b'\t') if digits > 0 => self.state = ChunkState::SizeSpace,
                        (None, b'\r') if digits > 0 => self.state = ChunkState::SizeLf,
                        _ => return Err(ChunkError),
                    }
                    i += 1;
                }
                ChunkState::SizeSpace => {
                    match b {
                        b' ' | b'\t' => {}
                        b';' => self.state = ChunkState::Extension,
                        b'\r' => self.state = ChunkState::SizeLf,
                        _ => return Err(ChunkError),
                    }
                    self.extension += 1;
                    if self.extension > MAX_TRAILER {
                        return Err(ChunkError);
                    }
                    i += 1;
                }
                ChunkState::Extension => {
                    // Up to the CR of the size line; a bare LF or another control
                    // byte in an extension is refused.
                    let rest = &input[i..];
                    let scanned = match rest
                        .iter()
                        .position(|c| c.is_ascii_control() && *c != b'\t')
                    {
                        Some(at) if rest[at] == b'\r' => {
                            self.state = ChunkState::SizeLf;
                            at + 1
                        }
                        Some(_) => return Err(ChunkError),
                        None => rest.len(),
                    };
                    i += scanned;
                    self.extension += scanned;
                    if self.extension > MAX_TRAILER {
                        return Err(ChunkError);
                    }
                }
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    i += 1;
                    self.state = if self.size == 0 {
                        ChunkState::TrailerStart
                    } else {
                        ChunkState::Data
                    };
                }
                ChunkState::Data => {
                    let take = (input.len() - i).min(self.size as usize);
                    data(i..i + take);
                    i += take;
                    self.size -= take as u64;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                }
                ChunkState::DataCr | ChunkState::DataLf => {
                    let (want, next) = if self.state == ChunkState::DataCr {
                        (b'\r', ChunkState::DataLf)
                    } else {
                        (b'\n', ChunkState::Size { digits: 0 })
                    };
                    self.extension = 0;
                    if b != want {
                        return Err(ChunkError);
                    }
                    self.state = next;
                    i += 1;
                }
                ChunkState::TrailerStart => {
                    self.state = match b {
                        b'\r' => ChunkState::EndLf,
                        b'\n' => return Err(ChunkError),
                        _ => ChunkState::TrailerLine,
                    };
                    i += 1;
                    self.trailer += 1;
                }
                ChunkState::TrailerLine => {
                    // Only CRLF ends a line; a bare LF is refused.
                    match input[i..].iter().position(|c| *c == b'\r' || *c == b'\n') {
                        Some(at) if input[i + at] == b'\r' => {
                            i += at + 1;
                            self.trailer += at + 1;
                            self.state = ChunkState::TrailerLf;
                        }
                        Some(_) => return Err(ChunkError),
                        None => {
                            self.trailer += input.len() - i;
                            i = input.len();
                        }
                    }
                }
                ChunkState::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    i += 1;
                    self.state = ChunkState::TrailerStart;
                }
                ChunkState::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    i += 1;
                    self.state = ChunkState::Done;
                }
                ChunkState::Done => return Ok(i),
            }
            if self.trailer > MAX_TRAILER {
                return Err(ChunkError);
            }
        }
        Ok(i)
    }
}

/// Appends `HTTP/1.1 <status> <reason>\r\n`.
pub fn status_line(out: &mut Vec<u8>, status: u16) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_u64(out, u64::from(status));
    out.push(b' ');
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `name: value\r\n`.
pub fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `name: <n>\r\n`.
pub fn field_u64(out: &mut Vec<u8>, name: &[u8], n: u64) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    push_u64(out, n);
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal.
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(raw: &[u8]) -> Result<Option<RequestHead>, HeadError> {
        Ok(RequestHead::parse(raw)?.map(|(len, p)| p.take(Bytes::copy_from_slice(&raw[..len]))))
    }

    #[test]
    fn field_value_tokens() {
        let listed: Vec<&[u8]> = tokens(b" keep-alive ,X-Hop,, \tupgrade").collect();
        assert_eq!(listed, [&b"keep-alive"[..], b"X-Hop", b"upgrade"]);
        assert_eq!(tokens(b" , ").count(), 0);
    }

    #[test]
    fn request_heads() {
        let raw = b"POST /api/agent-gateway/invoke/?stream=true HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: 12\r\nExpect: 100-continue\r\n\r\n{\"input\":1}";
        let head = request(raw).unwrap().unwrap();
        assert_eq!(head.method(), b"POST");
        assert_eq!(head.path(), b"/api/agent-gateway/invoke/");
        assert_eq!(head.query(), Some("stream=true"));
        assert_eq!(head.header("authorization"), Some(&b"Bearer k"[..]));
        assert_eq!(head.header("x-api-key"), None);
        assert_eq!(head.framing, Framing::Length(12));
        assert!(head.keep_alive && head.expect_continue && head.http11);
        assert_eq!(head.len(), raw.len() - 11);

        assert!(request(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        let head = request(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!head.keep_alive && head.framing == Framing::Empty);
        let head = request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(head.keep_alive);
        let head = request(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!head.keep_alive);
        let head = request(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Chunked);
    }

    #[test]
    fn host_is_required_once_in_http11() {
        assert_eq!(
            request(b"GET / HTTP/1.1\r\n\r\n").err(),
            Some(HeadError::BadHost)
        );
        assert_eq!(
            request(b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n").err(),
            Some(HeadError::BadHost)
        );
        assert_eq!(
            request(b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n").err(),
            Some(HeadError::BadHost)
        );
        assert!(request(b"GET / HTTP/1.0\r\n\r\n").unwrap().is_some());
        assert!(request(b"GET / HTTP/1.1\r\nHOST: a\r\n\r\n")
            .unwrap()
            .is_some());
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for raw in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(
                request(raw).err(),
                Some(HeadError::BadFraming),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        assert_eq!(
            request(b"NOT HTTP\r\n\r\n").err(),
            Some(HeadError::Malformed)
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
        assert_eq!(
            request(format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes()).err(),
            Some(HeadError::TooManyHeaders)
        );
    }

    #[test]
    fn response_heads() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5\r\n";
        let head = ResponseHead::parse(raw).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.framing, Framing::Chunked);
        assert!(head.keep_alive);
        assert_eq!(head.len, raw.len() - 3);
        let names: Vec<_> = head.fields(raw).map(|(n, _)| n.to_vec()).collect();
        assert_eq!(
            names,
            vec![b"content-type".to_vec(), b"transfer-encoding".to_vec()]
        );
        let head = ResponseHead::parse(b"HTTP/1.0 200 OK\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Close);
        assert!(!head.keep_alive);
        let head = ResponseHead::parse(b"HTTP/1.1 204 No Content\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Empty);
        assert!(ResponseHead::parse(b"HTTP/1.1 200 OK\r\n")
            .unwrap()
            .is_none());
    }

    /// Decodes `input` fed in pieces of `step` bytes.
    fn dechunk(input: &[u8], step: usize) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut d = Chunked::default();
        let mut out = Vec::new();
        let mut consumed = 0;
        for piece in input.chunks(step) {
            let n = d.decode(piece, |r| out.extend_from_slice(&piece[r]))?;
            consumed += n;
            if n < piece.len() {
                break;
            }
        }
        Ok((out, consumed, d.is_done()))
    }

    #[test]
    fn chunked_bodies_in_any_pieces() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for step in 1..=body.len() {
            let (data, consumed, done) = dechunk(body, step).unwrap();
            assert_eq!(data, b"hello, world", "step {step}");
            assert!(done);
            assert_eq!(consumed, body.len() - 4, "step {step}");
        }
        let (data, _, done) = dechunk(b"A\r\n0123456789\r\n0\r\n\r\n", 3).unwrap();
        assert_eq!(data, b"0123456789");
        assert!(done);
        let (data, _, done) = dechunk(b"5 \t; a=b\r\nhello\r\n3 \r\nabc\r\n0\r\n\r\n", 1).unwrap();
        assert_eq!(data, b"helloabc");
        assert!(done);
        let (_, _, done) = dechunk(b"5\r\nhel", 2).unwrap();
        assert!(!done);
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\r\nhelloXX",
            b"5\nhello",
            b"ffffffffffffffffff\r\n",
            // A bare LF where CRLF must be: the end of the body, a trailer, an
            // extension.
            b"5\r\nhello\r\n0\r\n\nGET / HTTP/1.1\r\n\r\n",
            b"0\r\nx-trailer: 1\n\r\n",
            b"5;ext\nhello\r\n",
            // After the size, only whitespace then `;` or the line's end.
            b"14 xyz\r\n",
            b"5 5\r\nhello\r\n",
        ] {
            assert!(dechunk(bad, 1).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn writes_heads() {
        let mut out = Vec::new();
        status_line(&mut out, 429);
        field(&mut out, b"retry-after", b"3");
        field_u64(&mut out, b"content-length", 1234567890);
        push_u64(&mut out, 0);
        assert_eq!(
            out,
            b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 3\r\ncontent-length: 1234567890\r\n0"
        );
    }
}
