//! The embeddable chat widget as the gateway serves it: its assets (built into
//! the binary from `proxy/widget/`), and the visitor sessions its publishable
//! key opens.
//!
//! A visitor session token is `av_<payload>.<mac>`: the payload names the
//! config, the publishable key, the visitor, the origin and the expiry; the MAC
//! is HMAC-SHA256 under a key every gateway derives from the shared proxy
//! secret, so any gateway accepts another's tokens and nothing else can mint
//! one. A token is only issued after the publishable key and the `Origin` were
//! checked, and it is refused from any other origin.

use std::io::Write;
use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The prefix of visitor session tokens.
pub const TOKEN_PREFIX: &str = "av_";
/// Longest token accepted (an origin is at most 253 bytes).
pub const MAX_TOKEN_LEN: usize = 512;
/// How long after expiry a token may still be refreshed into a new one for the
/// same visitor; older ones start a new visitor.
pub const REFRESH_WINDOW_SECS: i64 = 24 * 3600;

/// One asset: its bytes as served, gzipped, and their validators.
pub struct Asset {
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub gzip: Vec<u8>,
    /// Quoted, distinct for the two encodings.
    pub etag: String,
    pub etag_gzip: String,
}

/// The widget's three assets, and the version the loader asks for.
pub struct Assets {
    pub version: String,
    pub loader: Asset,
    pub script: Asset,
    pub style: Asset,
}

const LOADER_SOURCE: &str = include_str!("../widget/loader.js");
const SCRIPT_SOURCE: &str = include_str!("../widget/widget.js");
const STYLE_SOURCE: &str = include_str!("../widget/widget.css");
/// Replaced in the loader by [`Assets::version`].
const VERSION_PLACEHOLDER: &str = "__AGORA_WIDGET_VERSION__";

/// The assets, built once.
pub fn assets() -> &'static Assets {
    static ASSETS: OnceLock<Assets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        let digest = Sha256::new()
            .chain_update(SCRIPT_SOURCE)
            .chain_update(STYLE_SOURCE)
            .finalize();
        let version = hex(&digest[..6]);
        let loader = LOADER_SOURCE.replace(VERSION_PLACEHOLDER, &version);
        Assets {
            loader: asset("application/javascript; charset=utf-8", loader.into_bytes()),
            script: asset(
                "application/javascript; charset=utf-8",
                SCRIPT_SOURCE.as_bytes().to_vec(),
            ),
            style: asset("text/css; charset=utf-8", STYLE_SOURCE.as_bytes().to_vec()),
            version,
        }
    })
}

fn asset(content_type: &'static str, body: Vec<u8>) -> Asset {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&body).expect("gzip into memory");
    let gzip = gz.finish().expect("gzip into memory");
    let tag = hex(&Sha256::digest(&body)[..8]);
    Asset {
        content_type,
        etag: format!("\"{tag}\""),
        etag_gzip: format!("\"{tag}-gz\""),
        body,
        gzip,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a visitor session token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Visit {
    pub config: Uuid,
    /// The publishable key it was opened with.
    pub key_id: Uuid,
    pub visitor: Uuid,
    pub origin: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// Why a token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token of ours (shape, MAC).
    Invalid,
    /// Ours, past its lifetime.
    Expired,
}

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks visitor session tokens.
pub struct Sessions {
    key: [u8; 32],
}

impl Sessions {
    /// Derived from the secret all gateways share; without one, a key of this
    /// process only (tokens then work on this gateway alone).
    pub fn new(shared_secret: Option<&[u8]>) -> Sessions {
        let key = match shared_secret {
            Some(secret) => {
                let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key");
                mac.update(b"agora widget visitor sessions v1");
                mac.finalize().into_bytes().into()
            }
            None => {
                let mut key = [0u8; 32];
                key[..16].copy_from_slice(Uuid::new_v4().as_bytes());
                key[16..].copy_from_slice(Uuid::new_v4().as_bytes());
                key
            }
        };
        Sessions { key }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key")
    }

    pub fn issue(&self, visit: &Visit) -> String {
        let payload = format!(
            "1|{}|{}|{}|{}|{}",
            visit.config.simple(),
            visit.key_id.simple(),
            visit.visitor.simple(),
            visit.expires_at,
            visit.origin
        );
        let payload = URL_SAFE_NO_PAD.encode(payload);
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{TOKEN_PREFIX}{payload}.{tag}")
    }

    /// The visit a token names if it is ours, whatever its expiry.
    pub fn read(&self, token: &[u8]) -> Result<Visit, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Invalid);
        }
        let rest = token
            .strip_prefix(TOKEN_PREFIX.as_bytes())
            .ok_or(TokenError::Invalid)?;
        let dot = rest
            .iter()
            .position(|b| *b == b'.')
            .ok_or(TokenError::Invalid)?;
        let (payload, tag) = (&rest[..dot], &rest[dot + 1..]);
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Invalid)?;
        let mut mac = self.mac();
        mac.update(payload);
        // Constant time.
        mac.verify_slice(&tag).map_err(|_| TokenError::Invalid)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Invalid)?;
        let text = std::str::from_utf8(&payload).map_err(|_| TokenError::Invalid)?;
        let mut parts = text.splitn(6, '|');
        let mut next = || parts.next().ok_or(TokenError::Invalid);
        if next()? != "1" {
            return Err(TokenError::Invalid);
        }
        let uuid = |s: &str| Uuid::try_parse(s).map_err(|_| TokenError::Invalid);
        Ok(Visit {
            config: uuid(next()?)?,
            key_id: uuid(next()?)?,
            visitor: uuid(next()?)?,
            expires_at: next()?.parse().map_err(|_| TokenError::Invalid)?,
            origin: next()?.to_owned(),
        })
    }

    /// The visit a token names if it is ours and alive at `now_unix`.
    pub fn check(&self, token: &[u8], now_unix: i64) -> Result<Visit, TokenError> {
        let visit = self.read(token)?;
        if now_unix >= visit.expires_at {
            return Err(TokenError::Expired);
        }
        Ok(visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visit() -> Visit {
        Visit {
            config: Uuid::from_u128(1),
            key_id: Uuid::from_u128(2),
            visitor: Uuid::from_u128(3),
            origin: "https://shop.example".into(),
            expires_at: 1_000,
        }
    }

    #[test]
    fn a_token_names_its_visit_until_it_expires() {
        let sessions = Sessions::new(Some(b"a shared secret of gateways"));
        let token = sessions.issue(&visit());
        assert!(token.starts_with(TOKEN_PREFIX));
        assert!(token.len() <= MAX_TOKEN_LEN);
        assert_eq!(sessions.check(token.as_bytes(), 999), Ok(visit()));
        assert_eq!(
            sessions.check(token.as_bytes(), 1_000),
            Err(TokenError::Expired)
        );
        assert_eq!(sessions.read(token.as_bytes()), Ok(visit()));
    }

    #[test]
    fn gateways_sharing_a_secret_accept_each_others_tokens_and_no_one_elses() {
        let a = Sessions::new(Some(b"a shared secret of gateways"));
        let b = Sessions::new(Some(b"a shared secret of gateways"));
        let other = Sessions::new(Some(b"another deployment's secret"));
        let token = a.issue(&visit());
        assert_eq!(b.check(token.as_bytes(), 0), Ok(visit()));
        assert_eq!(other.check(token.as_bytes(), 0), Err(TokenError::Invalid));
        assert_eq!(
            Sessions::new(None).check(token.as_bytes(), 0),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn a_changed_payload_or_mac_is_refused() {
        let sessions = Sessions::new(Some(b"a shared secret of gateways"));
        let token = sessions.issue(&visit());
        let (payload, tag) = token[TOKEN_PREFIX.len()..].split_once('.').unwrap();
        // Another origin, the same MAC.
        let mut forged = visit();
        forged.origin = "https://evil.example".into();
        let forged_payload = sessions.issue(&forged);
        let forged_payload = forged_payload[TOKEN_PREFIX.len()..]
            .split_once('.')
            .unwrap()
            .0;
        for bad in [
            format!("{TOKEN_PREFIX}{forged_payload}.{tag}"),
            format!("{TOKEN_PREFIX}{payload}.{}", &tag[1..]),
            format!("{TOKEN_PREFIX}{payload}"),
            format!("xx_{payload}.{tag}"),
            format!("{TOKEN_PREFIX}{payload}.{tag}{}", "A".repeat(MAX_TOKEN_LEN)),
            String::new(),
        ] {
            assert_eq!(
                sessions.check(bad.as_bytes(), 0),
                Err(TokenError::Invalid),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_assets_fit_their_budgets_gzipped() {
        let a = assets();
        // loader ≤ 5 KB; widget script and style together ≤ 35 KB.
        assert!(a.loader.gzip.len() <= 5 * 1024, "{}", a.loader.gzip.len());
        assert!(
            a.script.gzip.len() + a.style.gzip.len() <= 35 * 1024,
            "{} + {}",
            a.script.gzip.len(),
            a.style.gzip.len()
        );
        // The loader asks for this build's version.
        assert!(!a
            .loader
            .body
            .windows(VERSION_PLACEHOLDER.len())
            .any(|w| w == VERSION_PLACEHOLDER.as_bytes()));
        assert!(String::from_utf8_lossy(&a.loader.body).contains(&a.version));
        assert_ne!(a.loader.etag, a.loader.etag_gzip);
    }

    #[test]
    fn no_asset_evaluates_strings_as_code() {
        for source in [LOADER_SOURCE, SCRIPT_SOURCE] {
            for banned in [
                "eval(",
                "new Function",
                "innerHTML",
                "document.write",
                "setAttribute(\"style\"",
                "setAttribute('style'",
            ] {
                assert!(!source.contains(banned), "{banned}");
            }
        }
    }
}
