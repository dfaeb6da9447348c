//! What each fuzz target checks, for one input. The AFL binaries in
//! `fuzz/afl/` call these under coverage-guided fuzzing; `tests/replay.rs`
//! calls them on every file of `corpus/` and `crashes/` as ordinary tests.
//!
//! Each function panics when an input breaks a property, never otherwise:
//! refusing bad input with an error is the expected outcome, not a failure.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use agora_config::flow::FlowDefinition;
use agora_config::keys::{ApiKey, KeyHash, SigningKey, Verifier};
use agora_config::snapshot::{Delta, Snapshot};
use agora_h1::{Chunked, Framing, RequestHead};
use agora_stripe_signature::{self as signature, SignatureError, MAX_HEADER, TOLERANCE_SECS};
use bytes::Bytes;
use hmac::{Hmac, Mac};

/// A target: its name (the directory of its corpus) and its check.
pub type Target = (&'static str, fn(&[u8]));

/// Every fuzz target.
pub const TARGETS: &[Target] = &[
    ("h1_request", h1_request),
    ("h1_chunked", h1_chunked),
    ("api_key", api_key),
    ("flow_import", flow_import),
    ("snapshot_delta", snapshot_delta),
    ("stripe_signature", stripe_signature),
];

/// A request head parses the same after being written out again, and a
/// chunked body after it decodes the same in one piece and in small ones.
pub fn h1_request(data: &[u8]) {
    let Ok(Some((len, parsed))) = RequestHead::parse(data) else {
        return;
    };
    assert!(len <= data.len(), "head longer than the input");
    let head = parsed.take(Bytes::copy_from_slice(&data[..len]));
    let _ = (head.query(), head.is_empty());
    let again = write_head(&head);
    let (len2, parsed2) = RequestHead::parse(&again)
        .unwrap_or_else(|e| panic!("re-serialised head refused: {e:?}"))
        .expect("a re-serialised head is complete");
    assert_eq!(len2, again.len());
    let head2 = parsed2.take(Bytes::from(again));
    assert_eq!(
        describe(&head),
        describe(&head2),
        "re-serialised head differs"
    );
    // Every strict prefix of a head is incomplete, never another head.
    for cut in [len / 2, len.saturating_sub(1)] {
        if cut < len {
            if let Ok(Some((n, _))) = RequestHead::parse(&data[..cut]) {
                panic!("a {cut}-byte prefix parsed as a {n}-byte head of a {len}-byte one");
            }
        }
    }
    if head.framing == Framing::Chunked {
        let body = &data[len..];
        let step = body.first().map_or(1, |b| usize::from(*b % 16) + 1);
        same_in_pieces(body, step);
    }
}

/// A chunked body decodes the same however it is cut (the first byte sets the
/// piece size), and what it reports as data lies inside its input.
pub fn h1_chunked(data: &[u8]) {
    let Some((first, body)) = data.split_first() else {
        return;
    };
    same_in_pieces(body, usize::from(*first).max(1));
}

/// What decoding `body` gives: its data, the bytes read, whether it ended, or
/// where it failed.
type Decoded = (Vec<u8>, usize, bool, Option<usize>);

fn decode_in_pieces(body: &[u8], step: usize) -> Decoded {
    let mut decoder = Chunked::default();
    let mut out = Vec::new();
    let mut read = 0;
    for piece in body.chunks(step) {
        let result = decoder.decode(piece, |range| {
            assert!(range.end <= piece.len(), "data range outside its input");
            out.extend_from_slice(&piece[range]);
        });
        match result {
            Ok(n) => {
                assert!(n <= piece.len());
                read += n;
                if n < piece.len() {
                    assert!(
                        decoder.is_done(),
                        "stopped short of its input before the end"
                    );
                    break;
                }
            }
            Err(_) => return (out, read, false, Some(read)),
        }
        if decoder.is_done() {
            break;
        }
    }
    (out, read, decoder.is_done(), None)
}

fn same_in_pieces(body: &[u8], step: usize) {
    let whole = decode_in_pieces(body, body.len().max(1));
    let pieces = decode_in_pieces(body, step);
    // A failure is found in the same piece or a later one, with no more data.
    match (&whole.3, &pieces.3) {
        (None, None) => assert_eq!(whole, pieces, "piece size {step}"),
        (Some(_), Some(_)) => assert_eq!(
            whole.0, pieces.0,
            "data before the failure, piece size {step}"
        ),
        _ => panic!("one piece and pieces of {step} disagree on failing: {whole:?} {pieces:?}"),
    }
}

/// `head` written out as a client would send it.
fn write_head(head: &RequestHead) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + 16);
    out.extend_from_slice(head.method());
    out.push(b' ');
    out.extend_from_slice(head.target());
    out.extend_from_slice(if head.http11 {
        b" HTTP/1.1\r\n"
    } else {
        b" HTTP/1.0\r\n"
    });
    for (name, value) in head.fields() {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A head's meaning, to compare.
fn describe(head: &RequestHead) -> String {
    let fields: Vec<(Vec<u8>, Vec<u8>)> = head
        .fields()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect();
    format!(
        "{:?} {:?} {:?} http11={} {:?} keep_alive={} continue={} {fields:?}",
        head.method(),
        head.path(),
        head.query(),
        head.http11,
        head.framing,
        head.keep_alive,
        head.expect_continue,
    )
}

/// The signing key of the fuzz corpus' keys (a fixture, trusted by nothing else).
pub fn signing_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| {
        SigningKey::from_pkcs8_pem("fuzz", include_str!("../fixtures/signing-key.pem"))
            .expect("the fixture key")
    })
}

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| Verifier::new(&[signing_key().verification_key()]).expect("verifier"))
}

/// When the corpus' keys are checked: inside their validity.
pub const NOW_UNIX: i64 = 1_800_000_000;

/// Parsing and verifying any string never panics; a key that verifies is the
/// string presented (its hash is that string's) and verifies again the same.
pub fn api_key(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(key) = ApiKey::parse(text) else {
        return;
    };
    assert_eq!(key.hash(), KeyHash::of(text));
    let first = verifier().verify(&key, NOW_UNIX);
    let second = verifier().verify(&key, NOW_UNIX);
    assert_eq!(
        format!("{first:?}"),
        format!("{second:?}"),
        "verification is stable"
    );
}

/// An export either is refused or imports to a definition whose own JSON
/// imports to the same summary.
pub fn flow_import(data: &[u8]) {
    let Ok(flow) = FlowDefinition::parse(data) else {
        return;
    };
    let json = serde_json::to_vec(flow.as_json()).expect("a definition serialises");
    let again = FlowDefinition::parse(&json).expect("a definition's own JSON imports");
    assert_eq!(flow.summary(), again.summary());
}

/// The snapshot deltas are applied to.
fn base_snapshot() -> Snapshot {
    let mut snapshot = Snapshot::empty();
    snapshot.revision = 5;
    snapshot.generated_at_ms = 1_700_000_000_000;
    snapshot.verification_keys = vec![signing_key().verification_key()];
    snapshot.plans = BTreeMap::new();
    snapshot
}

/// A delta is applied whole or not at all: refused, the snapshot is unchanged;
/// applied, it is at the delta's revision with every upsert in and every
/// removal out; and the diff of the two snapshots rebuilds the result.
pub fn snapshot_delta(data: &[u8]) {
    let Ok(delta) = serde_json::from_slice::<Delta>(data) else {
        return;
    };
    let before = base_snapshot();
    let mut after = before.clone();
    match after.apply(&delta) {
        Err(_) => assert_eq!(after, before, "a refused delta changed the snapshot"),
        Ok(()) => {
            assert_eq!(after.revision, delta.to_revision);
            assert!(delta
                .upsert_keys
                .iter()
                .all(|(k, v)| after.keys.get(k) == Some(v)));
            assert!(delta
                .remove_keys
                .iter()
                .all(|k| !after.keys.contains_key(k)));
            assert!(delta
                .upsert_routes
                .iter()
                .all(|(k, v)| after.routes.get(k) == Some(v)));
            assert!(delta
                .remove_routes
                .iter()
                .all(|k| !after.routes.contains_key(k)));
            assert!(delta
                .upsert_plans
                .iter()
                .all(|(k, v)| after.plans.get(k) == Some(v)));
            assert!(delta
                .remove_plans
                .iter()
                .all(|k| !after.plans.contains_key(k)));
            if after.revision > before.revision {
                let mut rebuilt = before.clone();
                rebuilt
                    .apply(&Snapshot::diff(&before, &after))
                    .expect("a diff applies to its base");
                assert_eq!(rebuilt, after, "the diff rebuilds the snapshot");
            }
        }
    }
}

/// The webhook secret the `stripe_signature` target verifies with, at [`NOW_UNIX`].
pub const WEBHOOK_SECRET: &[u8] = b"whsec_fuzz_0123456789abcdefghijklmnopqrstuv";

/// The body signed when an input has no body of its own.
pub const WEBHOOK_BODY: &[u8] = br#"{"id":"evt_fuzz","object":"event","type":"invoice.paid"}"#;

/// The `v1` signature (hex) of `body` at `t` under [`WEBHOOK_SECRET`],
/// computed here with `hmac` rather than by the code under test.
pub fn webhook_v1(t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(WEBHOOK_SECRET).expect("any key length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Whether `header` names, as `t=<digits>`, a time within the tolerance of
/// `now` and holds `v1=` followed by the signature of `body` at that time
/// (hex in either case): a plain reading of the rule, by text search.
fn carries_a_valid_v1(header: &str, body: &[u8], now: i64) -> bool {
    let lower = header.to_ascii_lowercase();
    lower.match_indices("t=").any(|(at, _)| {
        let digits: String = lower[at + 2..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse::<i64>().is_ok_and(|t| {
            (now - t).abs() <= TOLERANCE_SECS
                && lower.contains(&format!("v1={}", webhook_v1(t, body)))
        })
    })
}

/// `Stripe-Signature` verification, over an input read as the header, then
/// (after the first newline) the raw body; without a newline the body is
/// [`WEBHOOK_BODY`]. Verifying never panics; a header is accepted only when
/// it carries a valid `v1` for the body, the secret and the time, and never
/// for a changed body; and the header's own parts with the right `t` and
/// `v1` put among them (at places the input picks) are always accepted, or
/// refused as too long.
pub fn stripe_signature(data: &[u8]) {
    let (header, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, WEBHOOK_BODY),
    };
    let now = NOW_UNIX;
    let text = std::str::from_utf8(header).ok();
    for (body, label) in [
        (body, "the body"),
        (&[body, b"!"].concat()[..], "a changed body"),
    ] {
        let verdict = signature::verify(text, body, WEBHOOK_SECRET, now);
        if verdict.is_ok() {
            let text = text.expect("an accepted header is text");
            assert!(
                carries_a_valid_v1(text, body, now),
                "accepted for {label} without a valid v1: {text:?}"
            );
        }
    }

    // The header's parts other than `t`, with a right `t` and `v1` put
    // among them.
    let lossy = String::from_utf8_lossy(header);
    let mut parts: Vec<&str> = lossy
        .split(',')
        .filter(|p| p.trim().split_once('=').is_some_and(|(k, _)| k != "t"))
        .collect();
    let pick = |i: usize| usize::from(header.get(i).copied().unwrap_or(0));
    let t =
        now - TOLERANCE_SECS + i64::try_from(header.len()).unwrap_or(0) % (2 * TOLERANCE_SECS + 1);
    let t_part = format!("t={t}");
    let v1_part = format!("v1={}", webhook_v1(t, body));
    parts.insert(pick(0) % (parts.len() + 1), &t_part);
    parts.insert(pick(1) % (parts.len() + 1), &v1_part);
    let signed = parts.join(",");
    let verdict = signature::verify(Some(&signed), body, WEBHOOK_SECRET, now);
    if signed.len() <= MAX_HEADER {
        assert_eq!(verdict, Ok(()), "a right t and v1 among {signed:?}");
    } else {
        assert_eq!(
            verdict,
            Err(SignatureError::Malformed),
            "{} bytes",
            signed.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_oracle_finds_a_valid_v1_and_nothing_else() {
        let now = NOW_UNIX;
        let v1 = webhook_v1(now, WEBHOOK_BODY);
        assert!(carries_a_valid_v1(
            &format!("t={now},v1={v1}"),
            WEBHOOK_BODY,
            now
        ));
        assert!(carries_a_valid_v1(
            &format!("t={now},v1={}", v1.to_uppercase()),
            WEBHOOK_BODY,
            now
        ));
        let stale = now - TOLERANCE_SECS - 1;
        for refused in [
            format!("t={stale},v1={}", webhook_v1(stale, WEBHOOK_BODY)),
            format!("t={now},v1={}", webhook_v1(now, b"{}")),
            format!("t={now},v1={}", "0".repeat(64)),
            format!("v1={v1}"),
        ] {
            assert!(
                !carries_a_valid_v1(&refused, WEBHOOK_BODY, now),
                "{refused}"
            );
        }
    }
}
