//! `Stripe-Signature` verification: `t=<unix seconds>,v1=<hex>[,v1=<hex>…]`,
//! where each `v1` is HMAC-SHA256 of `"<t>.<raw body>"` under the endpoint's
//! secret. Any one matching `v1` passes (Stripe sends several while a secret is
//! rolled); comparison is in constant time; a timestamp more than
//! [`TOLERANCE_SECS`] away from now is refused, so a captured delivery cannot
//! be replayed later.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// How far a delivery's timestamp may be from now, as Stripe's libraries use.
pub const TOLERANCE_SECS: i64 = 300;

/// Longest header taken; Stripe's are well under 1 KiB.
pub const MAX_HEADER: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is missing")]
    Missing,
    #[error("the Stripe-Signature header is not t=…,v1=…")]
    Malformed,
    #[error("the delivery's timestamp is outside the tolerance")]
    Stale,
    #[error("no signature matches")]
    Mismatch,
}

impl SignatureError {
    /// For metrics: webhook failures by reason.
    pub fn reason(self) -> &'static str {
        match self {
            SignatureError::Missing => "signature_missing",
            SignatureError::Malformed => "signature_malformed",
            SignatureError::Stale => "signature_stale",
            SignatureError::Mismatch => "signature_mismatch",
        }
    }
}

/// Checks `header` over `body` with `secret` at `now` (unix seconds).
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secret: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    if header.len() > MAX_HEADER {
        return Err(SignatureError::Malformed);
    }
    let mut timestamp = None;
    let mut signatures: Vec<[u8; 32]> = Vec::new();
    for part in header.split(',') {
        let (key, value) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match key {
            "t" => {
                if timestamp.is_some()
                    || value.is_empty()
                    || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(SignatureError::Malformed);
                }
                timestamp = Some(
                    value
                        .parse::<i64>()
                        .map_err(|_| SignatureError::Malformed)?,
                );
            }
            "v1" => {
                let mut signature = [0u8; 32];
                // A v1 that is not 64 hex digits can match nothing; skip it.
                if hex::decode_to_slice(value, &mut signature).is_ok() {
                    signatures.push(signature);
                }
            }
            // Other schemes (v0, test) are not trusted.
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Mismatch);
    }
    if (now - timestamp).abs() > TOLERANCE_SECS {
        return Err(SignatureError::Stale);
    }
    let expected = sign(secret, timestamp, body);
    // Every candidate is compared, match or not, so timing tells nothing.
    let matched = signatures
        .iter()
        .fold(subtle::Choice::from(0), |any, s| any | s.ct_eq(&expected));
    if bool::from(matched) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// HMAC-SHA256 of `"<timestamp>.<body>"`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_test_secret";
    const BODY: &[u8] = br#"{"id":"evt_1","type":"invoice.paid"}"#;
    const NOW: i64 = 1_780_000_000;

    fn header(t: i64, secret: &[u8], body: &[u8]) -> String {
        format!("t={t},v1={}", hex::encode(sign(secret, t, body)))
    }

    #[test]
    fn a_delivery_signed_with_the_secret_passes() {
        assert_eq!(
            verify(Some(&header(NOW, SECRET, BODY)), BODY, SECRET, NOW),
            Ok(())
        );
        // Within the tolerance either way.
        let near = header(NOW - TOLERANCE_SECS, SECRET, BODY);
        assert_eq!(verify(Some(&near), BODY, SECRET, NOW), Ok(()));
    }

    #[test]
    fn any_of_several_v1_signatures_may_match() {
        let good = hex::encode(sign(SECRET, NOW, BODY));
        let other = hex::encode(sign(b"whsec_old", NOW, BODY));
        let h = format!("t={NOW},v1={other},v0=abc,v1={good}");
        assert_eq!(verify(Some(&h), BODY, SECRET, NOW), Ok(()));
    }

    #[test]
    fn another_secret_a_changed_body_or_a_missing_header_is_refused() {
        let other = header(NOW, b"whsec_other", BODY);
        assert_eq!(
            verify(Some(&other), BODY, SECRET, NOW),
            Err(SignatureError::Mismatch)
        );
        let signed = header(NOW, SECRET, BODY);
        assert_eq!(
            verify(Some(&signed), br#"{"id":"evt_2"}"#, SECRET, NOW),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(None, BODY, SECRET, NOW),
            Err(SignatureError::Missing)
        );
    }

    #[test]
    fn a_stale_or_future_timestamp_is_refused() {
        let old = header(NOW - TOLERANCE_SECS - 1, SECRET, BODY);
        assert_eq!(
            verify(Some(&old), BODY, SECRET, NOW),
            Err(SignatureError::Stale)
        );
        let future = header(NOW + TOLERANCE_SECS + 1, SECRET, BODY);
        assert_eq!(
            verify(Some(&future), BODY, SECRET, NOW),
            Err(SignatureError::Stale)
        );
    }

    #[test]
    fn malformed_headers_are_refused() {
        let v1 = hex::encode(sign(SECRET, NOW, BODY));
        for bad in [
            String::new(),
            format!("v1={v1}"),
            format!("t=,v1={v1}"),
            format!("t=-5,v1={v1}"),
            format!("t={NOW},t={NOW},v1={v1}"),
            format!("t={NOW};v1={v1}"),
            "x".repeat(MAX_HEADER + 1),
        ] {
            assert!(verify(Some(&bad), BODY, SECRET, NOW).is_err(), "{bad:?}");
        }
        // Only v0 (or junk v1s): nothing to match.
        let h = format!("t={NOW},v0={v1},v1=zz");
        assert_eq!(
            verify(Some(&h), BODY, SECRET, NOW),
            Err(SignatureError::Mismatch)
        );
    }
}
