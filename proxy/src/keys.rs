//! The key check on the request path.
//!
//! Order (cheapest first, and nothing that depends on the key's validity runs before
//! the key is known to be in the table):
//!
//! 1. take the key from `Authorization: Bearer` or `X-API-Key`; refuse one longer than
//!    [`MAX_KEY_LEN`] before reading it further;
//! 2. its kind prefix;
//! 3. SHA-256 of the whole string, looked up in the snapshot's key table: unknown,
//!    revoked or expired keys stop here; a lapsed subscription is a 402;
//! 4. the claims cached beside the table entry, or — on the key's first use — its
//!    shape (three base64url segments) and one EdDSA verification (alg must be
//!    EdDSA, kid trusted, exp/nbf, mode and kind bound to the prefix), whose result
//!    is cached for the lifetime of the entry;
//! 5. the claims must name the same key, config and tenant as the table entry;
//! 6. the scope the route needs, and for publishable keys an allowed `Origin`.
//!
//! Every failure of steps 1–5 answers with the same 401 body; the reason is only
//! reported to metrics. The key itself is never logged or echoed.

use std::sync::Arc;

use agora_config::keys::{ApiKey, Claims, KeyHash, KeyKind, Scope, MAX_KEY_LEN};
use agora_config::snapshot::KeyStatus;

use crate::error::{GatewayError, KeyRefusal};
use crate::state::{KeyRecord, State};

/// An authenticated caller.
#[derive(Clone)]
pub struct Caller {
    pub record: Arc<KeyRecord>,
    pub claims: Arc<Claims>,
}

/// The raw key a request carries, if any, from its `Authorization` and
/// `X-API-Key` values.
pub fn presented<'a>(
    authorization: Option<&'a [u8]>,
    x_api_key: Option<&'a [u8]>,
) -> Result<&'a [u8], GatewayError> {
    if let Some(bytes) = authorization {
        if bytes.len() > 7 && bytes[..7].eq_ignore_ascii_case(b"bearer ") {
            return Ok(trim(&bytes[7..]));
        }
        return Err(GatewayError::InvalidKey(KeyRefusal::AuthorizationScheme));
    }
    match x_api_key {
        Some(value) => Ok(trim(value)),
        None => Err(GatewayError::MissingKey),
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != b' ').unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| *b != b' ')
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// Checks `raw` against the configuration in `state` at `now_unix`, for an operation
/// needing `scope`.
pub fn authenticate(
    state: &State,
    raw: &[u8],
    scope: Option<Scope>,
    now_unix: i64,
) -> Result<Caller, GatewayError> {
    if raw.is_empty() {
        return Err(GatewayError::MissingKey);
    }
    if raw.len() > MAX_KEY_LEN {
        return Err(GatewayError::InvalidKey(KeyRefusal::TooLong));
    }
    let text =
        std::str::from_utf8(raw).map_err(|_| GatewayError::InvalidKey(KeyRefusal::Malformed))?;
    let kind =
        KeyKind::from_key_str(text).ok_or(GatewayError::InvalidKey(KeyRefusal::WrongPrefix))?;
    let Some(record) = state.key(&KeyHash::of(text)) else {
        // Not ours; say why in metrics (a shape error, or simply unknown).
        return Err(GatewayError::InvalidKey(match ApiKey::parse(text) {
            Err(e) => KeyRefusal::Key(e),
            Ok(_) => KeyRefusal::Unknown,
        }));
    };
    let entry = &record.entry;
    match entry.status {
        KeyStatus::Active => {}
        KeyStatus::Revoked => return Err(GatewayError::InvalidKey(KeyRefusal::Revoked)),
        KeyStatus::Suspended => return Err(GatewayError::Suspended),
    }
    if entry.expires_at.is_some_and(|exp| now_unix >= exp) {
        return Err(GatewayError::InvalidKey(KeyRefusal::Expired));
    }
    if entry.kind != kind {
        return Err(GatewayError::InvalidKey(KeyRefusal::WrongPrefix));
    }
    let claims = match record.verified.get() {
        Some(claims) => claims.clone(),
        None => {
            // First use of this key: its shape, then its signature and claims.
            let key =
                ApiKey::parse(text).map_err(|e| GatewayError::InvalidKey(KeyRefusal::Key(e)))?;
            let verifier = state
                .verifier()
                .ok_or(GatewayError::InvalidKey(KeyRefusal::NoTrustedKeys))?;
            let claims = verifier
                .verify(&key, now_unix)
                .map_err(|e| GatewayError::InvalidKey(KeyRefusal::Key(e)))?;
            if claims.jti != entry.key_id
                || claims.cfg != entry.config
                || claims.ten != entry.tenant
            {
                return Err(GatewayError::InvalidKey(KeyRefusal::ClaimsMismatch));
            }
            record.verified.get_or_init(|| Arc::new(claims)).clone()
        }
    };
    // Cached claims still expire.
    if claims.exp.is_some_and(|exp| now_unix >= exp) {
        return Err(GatewayError::InvalidKey(KeyRefusal::Expired));
    }
    if let Some(scope) = scope {
        if !claims.scp.contains(&scope) || !entry.scopes.contains(&scope) {
            return Err(GatewayError::InsufficientScope);
        }
    }
    Ok(Caller {
        record: record.clone(),
        claims,
    })
}

/// A publishable (widget) key may only be used from an origin its config allows.
pub fn check_origin(
    state: &State,
    caller: &Caller,
    origin: Option<&[u8]>,
) -> Result<(), GatewayError> {
    if !caller.record.entry.kind.is_publishable() {
        return Ok(());
    }
    let origin = origin
        .and_then(|v| std::str::from_utf8(v).ok())
        .ok_or(GatewayError::OriginNotAllowed)?;
    let allowed = state
        .widget(&caller.record.entry.config)
        .is_some_and(|w| w.allowed_origins.iter().any(|o| o == origin));
    if allowed {
        Ok(())
    } else {
        Err(GatewayError::OriginNotAllowed)
    }
}
