//! Properties of the gateway's HTTP/1.x parser over generated requests: a
//! request cut at any byte parses the same once whole (and not before), a
//! parsed head written out again parses to the same head, and a chunked body
//! decodes the same cut at any byte.

use agora_h1::{Chunked, Framing, RequestHead};
use bytes::Bytes;
use proptest::prelude::*;

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z][A-Za-z0-9-]{0,15}"
}

fn field_value() -> impl Strategy<Value = String> {
    "[!-~]([ -~]{0,30}[!-~])?"
}

/// A request with a length-framed or chunked body, and its body's data.
fn request() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    (
        prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH"]),
        "/[a-z0-9/_.-]{0,30}(\\?[a-z0-9=&]{0,20})?",
        prop::collection::vec((token(), field_value()), 0..8),
        prop::collection::vec(any::<u8>(), 0..200),
        any::<bool>(),
        prop::collection::vec(1usize..40, 1..6),
    )
        .prop_map(|(method, target, fields, body, chunked, sizes)| {
            let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: example.test\r\n");
            for (name, value) in fields {
                let lower = name.to_ascii_lowercase();
                if [
                    "host",
                    "content-length",
                    "transfer-encoding",
                    "connection",
                    "expect",
                ]
                .contains(&lower.as_str())
                {
                    continue;
                }
                raw.push_str(&format!("{name}: {value}\r\n"));
            }
            let mut raw = raw.into_bytes();
            if chunked {
                raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                let mut rest = &body[..];
                let mut sizes = sizes.iter().cycle();
                while !rest.is_empty() {
                    let n = (*sizes.next().unwrap()).min(rest.len());
                    raw.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                    raw.extend_from_slice(&rest[..n]);
                    raw.extend_from_slice(b"\r\n");
                    rest = &rest[n..];
                }
                raw.extend_from_slice(b"0\r\n\r\n");
            } else {
                raw.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                raw.extend_from_slice(&body);
            }
            (raw, body)
        })
}

fn head_of(raw: &[u8]) -> (usize, RequestHead) {
    let (len, parsed) = RequestHead::parse(raw).unwrap().expect("complete");
    (len, parsed.take(Bytes::copy_from_slice(&raw[..len])))
}

fn dechunk(body: &[u8], step: usize) -> (Vec<u8>, bool) {
    let mut decoder = Chunked::default();
    let mut out = Vec::new();
    for piece in body.chunks(step.max(1)) {
        let n = decoder
            .decode(piece, |r| out.extend_from_slice(&piece[r]))
            .unwrap();
        if n < piece.len() || decoder.is_done() {
            break;
        }
    }
    (out, decoder.is_done())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn a_request_cut_anywhere_parses_once_whole_and_the_same((raw, _) in request(), cut in any::<prop::sample::Index>()) {
        let (len, head) = head_of(&raw);
        let cut = cut.index(len);
        prop_assert!(RequestHead::parse(&raw[..cut]).unwrap().is_none(), "{cut} of {len}");
        // More bytes after the head change nothing about it.
        let (len2, again) = head_of(&raw[..len]);
        prop_assert_eq!(len2, len);
        prop_assert_eq!(again.target(), head.target());
        prop_assert_eq!(again.framing, head.framing);
        prop_assert_eq!(again.fields().count(), head.fields().count());
    }

    #[test]
    fn a_parsed_head_written_out_again_parses_to_the_same_head((raw, _) in request()) {
        let (_, head) = head_of(&raw);
        let mut out = Vec::new();
        out.extend_from_slice(head.method());
        out.push(b' ');
        out.extend_from_slice(head.target());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (n, v) in head.fields() {
            out.extend_from_slice(n);
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        let (len, again) = head_of(&out);
        prop_assert_eq!(len, out.len());
        prop_assert_eq!(again.method(), head.method());
        prop_assert_eq!(again.target(), head.target());
        prop_assert_eq!(again.framing, head.framing);
        prop_assert_eq!(again.keep_alive, head.keep_alive);
        let a: Vec<_> = again.fields().collect();
        let b: Vec<_> = head.fields().collect();
        prop_assert_eq!(a, b);
    }

    #[test]
    fn a_chunked_body_cut_anywhere_decodes_the_same((raw, body) in request(), step in 1usize..64) {
        let (len, head) = head_of(&raw);
        if head.framing == Framing::Chunked {
            let (whole, done) = dechunk(&raw[len..], raw.len());
            prop_assert!(done);
            prop_assert_eq!(&whole, &body);
            let (pieces, done) = dechunk(&raw[len..], step);
            prop_assert!(done);
            prop_assert_eq!(pieces, body);
        } else {
            prop_assert_eq!(head.framing, Framing::Length(body.len() as u64));
        }
    }
}
