//! Response helpers shared by the handlers: JSON bodies, gzip, stream framing.

use std::convert::Infallible;
use std::io::Write;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use flate2::write::GzEncoder;
use flate2::Compression;
use tokio::sync::mpsc;

/// Bodies at least this large are gzipped when the client accepts gzip.
pub const GZIP_MIN_SIZE: usize = 1000;

/// Whether the request's `Accept-Encoding` lists gzip.
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
            name.eq_ignore_ascii_case("gzip") && !refused
        })
}

/// A complete JSON response (content-length framing), gzipped when allowed
/// and the body reaches [`GZIP_MIN_SIZE`].
pub fn json_response(status: StatusCode, body: Vec<u8>, gzip: bool) -> Response {
    let large = body.len() >= GZIP_MIN_SIZE;
    let compressed = if gzip && large { compress(&body) } else { None };
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::VARY,
            if large {
                "Accept-Encoding, Origin"
            } else {
                "Origin"
            },
        );
    let body = match compressed {
        Some(gz) => {
            builder = builder.header(header::CONTENT_ENCODING, "gzip");
            gz
        }
        None => body,
    };
    let mut response = builder.body(Body::from(body)).unwrap_or_default();
    *response.status_mut() = status;
    response
}

fn compress(body: &[u8]) -> Option<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(body.len() / 3), Compression::default());
    encoder.write_all(body).ok()?;
    encoder.finish().ok()
}

/// A chunked `text/event-stream` response: every item received on `rx`
/// becomes one HTTP chunk. Never compressed.
pub fn event_stream(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<Bytes, Infallible>(chunk), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_acceptance() {
        let mut h = HeaderMap::new();
        assert!(!accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("br, gzip;q=0.8"),
        );
        assert!(accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip;q=0"),
        );
        assert!(!accepts_gzip(&h));
    }
}
