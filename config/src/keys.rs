//! The API key format: issuing, parsing and verifying Agora API keys.
//!
//! # Format
//!
//! An API key is a kind prefix followed by a compact JWT:
//!
//! ```text
//! ar_sk_live_<header>.<claims>.<signature>     secret key, live mode
//! ar_sk_test_<header>.<claims>.<signature>     secret key, test mode
//! ar_pk_live_<header>.<claims>.<signature>     publishable (widget) key, scope `invoke` only
//! ```
//!
//! The three JWT segments are canonical base64url without padding. The header is
//! `{"typ":"JWT","alg":"EdDSA","kid":"<kid>"}`: the token is signed with Ed25519 by
//! the control plane, and the proxy holds only the public [`VerificationKey`]s, so a
//! compromised proxy cannot mint keys. Several kids may be trusted at once (rotation).
//!
//! The claims are [`Claims`] plus one more member, `"kind"` (`"secret_live"`,
//! `"secret_test"` or `"publishable_live"`), which binds the signed token to its
//! prefix: `ar_sk_live_` and `ar_pk_live_` differ by a single character, and without
//! it a secret key could be replayed under the publishable prefix or the other way
//! round.
//!
//! # Checks
//!
//! [`ApiKey::parse`] checks the shape only (no cryptography), in this order:
//! length ([`MAX_KEY_LEN`]), prefix, then three non-empty canonical base64url
//! segments. [`Verifier::verify`] then checks, in this order:
//!
//! 1. the header is base64url JSON ([`KeyError::Malformed`]); its `alg` is exactly
//!    `EdDSA`: anything else (`none`, `HS256`, `RS256`...) is refused before any
//!    cryptography ([`KeyError::UnsupportedAlgorithm`]); it has no `crit` member
//!    ([`KeyError::Malformed`]);
//! 2. its `kid` is present and trusted ([`KeyError::UnknownKid`]);
//! 3. the Ed25519 signature is valid ([`KeyError::BadSignature`]);
//! 4. the claims parse with strict types, e.g. `"exp":"123"` is refused; unknown
//!    members are ignored so that newer issuers stay readable ([`KeyError::InvalidClaims`]);
//! 5. `exp`, when present, is after `now`, with no leeway ([`KeyError::Expired`]);
//!    `nbf`, when present, is at most `now +` [`NOT_BEFORE_LEEWAY_SECS`]
//!    ([`KeyError::NotYetValid`]);
//! 6. the `mode` claim matches the prefix's mode ([`KeyError::ModeMismatch`]), then
//!    the `kind` claim matches the prefix ([`KeyError::WrongPrefix`]);
//! 7. a publishable key carries exactly the `invoke` scope ([`KeyError::ScopeNotAllowed`]).
//!
//! Every check fails closed: any input that is not positively recognised is refused
//! with a [`KeyError`], and no error message ever contains the key.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Once;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// Longest accepted key string, in bytes. Checked before any other parsing.
pub const MAX_KEY_LEN: usize = 4096;

/// How far in the future an `nbf` claim may be and still be accepted, in seconds.
///
/// Absorbs clock skew between the control plane that issues a key and the proxy that
/// checks it. `exp` gets no leeway: a key is expired from its `exp` second on.
pub const NOT_BEFORE_LEEWAY_SECS: i64 = 60;

/// The JWT `alg` every key must carry.
const ALG: &str = "EdDSA";

/// Length shared by every kind prefix.
const PREFIX_LEN: usize = 11;

/// What a key is for, as told by its prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// `ar_sk_live_`: server-side key, live mode.
    SecretLive,
    /// `ar_sk_test_`: server-side key, test mode.
    SecretTest,
    /// `ar_pk_live_`: browser-safe widget key, scope `invoke` only.
    PublishableLive,
}

impl KeyKind {
    const ALL: [KeyKind; 3] = [
        KeyKind::SecretLive,
        KeyKind::SecretTest,
        KeyKind::PublishableLive,
    ];

    /// The prefix that starts every key of this kind.
    pub fn prefix(self) -> &'static str {
        match self {
            KeyKind::SecretLive => "ar_sk_live_",
            KeyKind::SecretTest => "ar_sk_test_",
            KeyKind::PublishableLive => "ar_pk_live_",
        }
    }

    /// The mode keys of this kind operate in.
    pub fn mode(self) -> Mode {
        match self {
            KeyKind::SecretLive | KeyKind::PublishableLive => Mode::Live,
            KeyKind::SecretTest => Mode::Test,
        }
    }

    /// Whether keys of this kind may be shown to browsers (and so are limited to `invoke`).
    pub fn is_publishable(self) -> bool {
        matches!(self, KeyKind::PublishableLive)
    }

    /// The kind whose prefix starts `s`, if any. Looks at the prefix only.
    pub fn from_key_str(s: &str) -> Option<KeyKind> {
        KeyKind::ALL
            .into_iter()
            .find(|kind| s.starts_with(kind.prefix()))
    }
}

/// Live or test mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Live,
    Test,
}

/// What a key may do.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Call the agent.
    Invoke,
    /// Read usage and configuration.
    Read,
    /// Manage the configuration.
    Admin,
}

impl Scope {
    /// The scope's wire name: `invoke`, `read` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Invoke => "invoke",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a scope name.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("unknown scope")]
pub struct UnknownScope;

impl FromStr for Scope {
    type Err = UnknownScope;

    /// Exact, lowercase wire names only.
    fn from_str(s: &str) -> Result<Scope, UnknownScope> {
        match s {
            "invoke" => Ok(Scope::Invoke),
            "read" => Ok(Scope::Read),
            "admin" => Ok(Scope::Admin),
            _ => Err(UnknownScope),
        }
    }
}

/// The signed contents of a key.
///
/// Types are strict (a string where a number is expected is refused), unknown members
/// are ignored. `None` members are left out when serialised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// Key id.
    pub jti: Uuid,
    /// Customer agent config the key calls.
    pub cfg: Uuid,
    /// Tenant: the customer organisation that owns the key.
    pub ten: Uuid,
    /// Project, if the key belongs to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prj: Option<Uuid>,
    /// Scopes granted.
    pub scp: Vec<Scope>,
    /// Issued at, unix seconds.
    pub iat: i64,
    /// Not valid before, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Expires at, unix seconds; `None` for a key that does not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    /// Live or test; must match the key's prefix.
    pub mode: Mode,
}

/// The claims as they travel inside the token: [`Claims`] plus the key kind.
#[derive(Serialize)]
struct WireClaimsOut<'a> {
    #[serde(flatten)]
    claims: &'a Claims,
    kind: KeyKind,
}

#[derive(Deserialize)]
struct WireClaimsIn {
    #[serde(flatten)]
    claims: Claims,
    kind: KeyKind,
}

/// SHA-256 of a whole key string: how keys are stored and looked up. Not secret.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// Hash of a key string (the whole string, prefix included). Says nothing about
    /// the string's shape: [`ApiKey::parse`] checks that.
    pub fn of(key: &str) -> KeyHash {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }

    /// Wraps raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> KeyHash {
        KeyHash(bytes)
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses exactly 64 lowercase hex digits (the form [`KeyHash::to_hex`] writes).
    pub fn from_hex(s: &str) -> Result<KeyHash, KeyError> {
        let canonical = s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !canonical {
            return Err(KeyError::Malformed);
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| KeyError::Malformed)?;
        Ok(KeyHash(bytes))
    }

    /// Constant-time equality.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", self.to_hex())
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for KeyHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for KeyHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<KeyHash, D::Error> {
        struct HexVisitor;

        impl serde::de::Visitor<'_> for HexVisitor {
            type Value = KeyHash;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 lowercase hex digits")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<KeyHash, E> {
                KeyHash::from_hex(v).map_err(|_| E::custom("invalid key hash"))
            }
        }

        deserializer.deserialize_str(HexVisitor)
    }
}

/// A well-formed API key (see the module docs for the format).
///
/// Holding one says nothing about its validity: that is [`Verifier::verify`]'s job.
/// The key string is a secret: it is kept in a [`SecretString`], `Debug` shows only the
/// kind and [`ApiKey::display_prefix`], and there is no `Display` or `Serialize`.
#[derive(Clone)]
pub struct ApiKey {
    secret: SecretString,
    kind: KeyKind,
    hash: KeyHash,
}

impl ApiKey {
    /// Checks the shape of a key, without any cryptography.
    ///
    /// In order: at most [`MAX_KEY_LEN`] bytes ([`KeyError::TooLong`]), a known kind
    /// prefix ([`KeyError::WrongPrefix`]), then exactly three non-empty segments
    /// separated by `.`, each canonical base64url without padding (only
    /// `[A-Za-z0-9_-]`, unused trailing bits zero) ([`KeyError::Malformed`]).
    pub fn parse(s: &str) -> Result<ApiKey, KeyError> {
        if s.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong);
        }
        let kind = KeyKind::from_key_str(s).ok_or(KeyError::WrongPrefix)?;
        let token = &s.as_bytes()[PREFIX_LEN..];
        let mut segments = 0;
        for segment in token.split(|&b| b == b'.') {
            segments += 1;
            if segments > 3 || !is_canonical_base64url(segment) {
                return Err(KeyError::Malformed);
            }
        }
        if segments != 3 {
            return Err(KeyError::Malformed);
        }
        Ok(ApiKey {
            secret: SecretString::from(s),
            kind,
            hash: KeyHash::of(s),
        })
    }

    /// The kind, as told by the prefix.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The whole key string, prefix included. Handle with care.
    pub fn expose_secret(&self) -> &str {
        self.secret.expose_secret()
    }

    /// SHA-256 of the whole key string.
    pub fn hash(&self) -> KeyHash {
        self.hash
    }

    /// A short label that is safe to show and log: the kind prefix followed by the first
    /// 8 hex digits of the key's hash, e.g. `ar_sk_live_3fa9c0d1`. It is derived from the
    /// hash, never from the secret itself.
    pub fn display_prefix(&self) -> String {
        let mut out = String::with_capacity(PREFIX_LEN + 8);
        out.push_str(self.kind.prefix());
        out.push_str(&self.hash.to_hex()[..8]);
        out
    }

    /// The JWT part of the key (after the prefix).
    fn token(&self) -> &str {
        // `parse` checked that the string starts with an ASCII prefix of this length.
        &self.expose_secret()[PREFIX_LEN..]
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("kind", &self.kind)
            .field("prefix", &self.display_prefix())
            .finish()
    }
}

/// Whether `segment` is non-empty, canonical base64url without padding.
fn is_canonical_base64url(segment: &[u8]) -> bool {
    if segment.is_empty() || segment.len() % 4 == 1 {
        return false;
    }
    let mut last = 0u8;
    for &b in segment {
        last = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return false,
        };
    }
    // The last character of a partial group carries bits that decode to nothing;
    // they must be zero, or several strings would decode to the same bytes.
    match segment.len() % 4 {
        2 => last & 0x0f == 0,
        3 => last & 0x03 == 0,
        _ => true,
    }
}

/// Makes sure jsonwebtoken signs and verifies with the RustCrypto backend, even if
/// another backend gets enabled somewhere in the build. Installing fails harmlessly
/// when a provider is already in place.
fn ensure_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
            &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
        );
    });
}

/// An Ed25519 private key that issues API keys, with its key id. Control plane only.
///
/// `Debug` shows only the kid.
pub struct SigningKey {
    kid: String,
    key: ed25519_dalek::SigningKey,
    encoding: EncodingKey,
}

impl SigningKey {
    fn from_dalek(kid: String, key: ed25519_dalek::SigningKey) -> Result<SigningKey, KeyError> {
        ensure_crypto_provider();
        // jsonwebtoken's Ed25519 signer takes the PKCS#8 DER document.
        let der = key
            .to_pkcs8_der()
            .map_err(|_| KeyError::InvalidSigningKey)?;
        let encoding = EncodingKey::from_ed_der(der.as_bytes());
        Ok(SigningKey { kid, key, encoding })
    }

    /// A fresh random key from the operating system's generator.
    pub fn generate(kid: impl Into<String>) -> SigningKey {
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        Self::from_dalek(kid.into(), key)
            .expect("PKCS#8 encoding of a freshly generated Ed25519 key cannot fail")
    }

    /// Loads a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, as written by
    /// [`SigningKey::to_pkcs8_pem`] or `openssl genpkey -algorithm ed25519`).
    pub fn from_pkcs8_pem(kid: impl Into<String>, pem: &str) -> Result<SigningKey, KeyError> {
        let key = ed25519_dalek::SigningKey::from_pkcs8_pem(pem)
            .map_err(|_| KeyError::InvalidSigningKey)?;
        Self::from_dalek(kid.into(), key)
    }

    /// The key as a PKCS#8 PEM.
    pub fn to_pkcs8_pem(&self) -> SecretString {
        let pem = self
            .key
            .to_pkcs8_pem(LineEnding::LF)
            .expect("PKCS#8 encoding of a valid Ed25519 key cannot fail");
        SecretString::from(pem.as_str())
    }

    /// The key id written in the header of every key this issues.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public half, to hand to [`Verifier::new`].
    pub fn verification_key(&self) -> VerificationKey {
        VerificationKey {
            kid: self.kid.clone(),
            public_key: URL_SAFE_NO_PAD.encode(self.key.verifying_key().as_bytes()),
        }
    }

    /// Signs `claims` into a new key of `kind`.
    ///
    /// Refuses claims whose `mode` is not `kind`'s mode ([`KeyError::ModeMismatch`]),
    /// and a publishable kind whose scopes are not exactly `[invoke]`
    /// ([`KeyError::ScopeNotAllowed`]).
    pub fn issue(&self, kind: KeyKind, claims: &Claims) -> Result<ApiKey, KeyError> {
        if claims.mode != kind.mode() {
            return Err(KeyError::ModeMismatch);
        }
        if kind.is_publishable() && claims.scp != [Scope::Invoke] {
            return Err(KeyError::ScopeNotAllowed);
        }
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let wire = WireClaimsOut { claims, kind };
        let token = jsonwebtoken::encode(&header, &wire, &self.encoding)
            .map_err(|_| KeyError::InvalidSigningKey)?;
        let mut key = String::with_capacity(PREFIX_LEN + token.len());
        key.push_str(kind.prefix());
        key.push_str(&token);
        ApiKey::parse(&key)
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// A trusted public key, as the proxy receives it in the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationKey {
    /// Key id, matched against the `kid` header of keys.
    pub kid: String,
    /// base64url (no padding) of the 32 raw Ed25519 public key bytes.
    pub public_key: String,
}

/// Checks keys against a set of trusted [`VerificationKey`]s (see the module docs for
/// the order of the checks).
#[derive(Clone)]
pub struct Verifier {
    keys: HashMap<String, ([u8; 32], DecodingKey)>,
    validation: Validation,
}

/// The header members the pre-checks look at; everything else is left to jsonwebtoken.
#[derive(Deserialize)]
struct RawHeader {
    alg: Option<serde_json::Value>,
    kid: Option<serde_json::Value>,
    crit: Option<serde::de::IgnoredAny>,
}

impl Verifier {
    /// Builds a verifier trusting `keys`.
    ///
    /// Fails with [`KeyError::InvalidSigningKey`] if a public key is not base64url of 32
    /// bytes, is not a valid Ed25519 point or is a weak (small-order) key, or if one kid
    /// is given two different keys. An empty list is allowed: it verifies nothing.
    pub fn new(keys: &[VerificationKey]) -> Result<Verifier, KeyError> {
        ensure_crypto_provider();
        let mut map = HashMap::with_capacity(keys.len());
        for vk in keys {
            let bytes = URL_SAFE_NO_PAD
                .decode(&vk.public_key)
                .map_err(|_| KeyError::InvalidSigningKey)?;
            let raw: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| KeyError::InvalidSigningKey)?;
            let point = ed25519_dalek::VerifyingKey::from_bytes(&raw)
                .map_err(|_| KeyError::InvalidSigningKey)?;
            if point.is_weak() {
                return Err(KeyError::InvalidSigningKey);
            }
            match map.entry(vk.kid.clone()) {
                Entry::Occupied(existing) => {
                    let (known, _): &([u8; 32], DecodingKey) = existing.get();
                    if *known != raw {
                        return Err(KeyError::InvalidSigningKey);
                    }
                }
                Entry::Vacant(slot) => {
                    // jsonwebtoken's Ed25519 verifier takes the 32 raw public key bytes.
                    slot.insert((raw, DecodingKey::from_ed_der(&raw)));
                }
            }
        }

        let mut validation = Validation::new(Algorithm::EdDSA);
        // Keys may be non-expiring, and time is checked against the caller's clock
        // below, so the library checks no time claim itself.
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        Ok(Verifier {
            keys: map,
            validation,
        })
    }

    /// Verifies `key` at time `now_unix` (unix seconds) and returns its claims.
    ///
    /// Fails closed, with the first failing check of the order given in the module docs.
    pub fn verify(&self, key: &ApiKey, now_unix: i64) -> Result<Claims, KeyError> {
        let token = key.token();

        // 1–2. Header pre-checks, before any cryptography.
        let header_b64 = token.split('.').next().ok_or(KeyError::Malformed)?;
        let header_json = URL_SAFE_NO_PAD
            .decode(header_b64)
            .map_err(|_| KeyError::Malformed)?;
        let header: RawHeader =
            serde_json::from_slice(&header_json).map_err(|_| KeyError::Malformed)?;
        match &header.alg {
            Some(serde_json::Value::String(alg)) if alg == ALG => {}
            _ => return Err(KeyError::UnsupportedAlgorithm),
        }
        if header.crit.is_some() {
            return Err(KeyError::Malformed);
        }
        let kid = match &header.kid {
            Some(serde_json::Value::String(kid)) => kid,
            _ => return Err(KeyError::UnknownKid),
        };
        let (_, decoding) = self.keys.get(kid).ok_or(KeyError::UnknownKid)?;
        // The whole header must also be readable by jsonwebtoken, so that any JSON error
        // it reports below can only come from the claims.
        serde_json::from_slice::<Header>(&header_json).map_err(|_| KeyError::Malformed)?;

        // 3–4. Signature, then typed claims.
        let data = jsonwebtoken::decode::<WireClaimsIn>(token, decoding, &self.validation)
            .map_err(|e| map_jwt_error(e.kind()))?;
        let WireClaimsIn { claims, kind } = data.claims;

        // 5. Time.
        if let Some(exp) = claims.exp {
            if now_unix >= exp {
                return Err(KeyError::Expired);
            }
        }
        if let Some(nbf) = claims.nbf {
            if nbf > now_unix.saturating_add(NOT_BEFORE_LEEWAY_SECS) {
                return Err(KeyError::NotYetValid);
            }
        }

        // 6. Mode and kind against the prefix.
        if claims.mode != key.kind().mode() {
            return Err(KeyError::ModeMismatch);
        }
        if kind != key.kind() {
            return Err(KeyError::WrongPrefix);
        }

        // 7. Publishable keys only ever invoke.
        if key.kind().is_publishable() && claims.scp != [Scope::Invoke] {
            return Err(KeyError::ScopeNotAllowed);
        }
        Ok(claims)
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        f.debug_struct("Verifier").field("kids", &kids).finish()
    }
}

fn map_jwt_error(kind: &JwtErrorKind) -> KeyError {
    match kind {
        JwtErrorKind::InvalidAlgorithm
        | JwtErrorKind::MissingAlgorithm
        | JwtErrorKind::InvalidAlgorithmName => KeyError::UnsupportedAlgorithm,
        JwtErrorKind::InvalidToken | JwtErrorKind::Base64(_) | JwtErrorKind::Utf8(_) => {
            KeyError::Malformed
        }
        // The header was read successfully above, so JSON errors are about the claims.
        JwtErrorKind::Json(_)
        | JwtErrorKind::MissingRequiredClaim(_)
        | JwtErrorKind::InvalidClaimFormat(_)
        | JwtErrorKind::InvalidAudience
        | JwtErrorKind::InvalidIssuer
        | JwtErrorKind::InvalidSubject
        | JwtErrorKind::ExpiredSignature
        | JwtErrorKind::ImmatureSignature => KeyError::InvalidClaims,
        _ => KeyError::BadSignature,
    }
}

/// Why a key, or a signing or verification key, was refused.
///
/// Messages never contain the key.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyError {
    #[error("API key is longer than {MAX_KEY_LEN} bytes")]
    TooLong,
    #[error("API key is malformed")]
    Malformed,
    #[error("API key has an unknown or wrong prefix")]
    WrongPrefix,
    #[error("API key is signed with an unsupported algorithm")]
    UnsupportedAlgorithm,
    #[error("API key is signed by an unknown key id")]
    UnknownKid,
    #[error("API key signature is invalid")]
    BadSignature,
    #[error("API key has expired")]
    Expired,
    #[error("API key is not valid yet")]
    NotYetValid,
    #[error("API key mode does not match its prefix")]
    ModeMismatch,
    #[error("API key scopes are not allowed for its kind")]
    ScopeNotAllowed,
    #[error("API key claims are invalid")]
    InvalidClaims,
    #[error("signing or verification key is invalid")]
    InvalidSigningKey,
}

impl KeyError {
    /// Stable snake_case code for error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            KeyError::TooLong => "key_too_long",
            KeyError::Malformed => "malformed_key",
            KeyError::WrongPrefix => "wrong_key_prefix",
            KeyError::UnsupportedAlgorithm => "unsupported_algorithm",
            KeyError::UnknownKid => "unknown_kid",
            KeyError::BadSignature => "bad_signature",
            KeyError::Expired => "key_expired",
            KeyError::NotYetValid => "key_not_yet_valid",
            KeyError::ModeMismatch => "mode_mismatch",
            KeyError::ScopeNotAllowed => "scope_not_allowed",
            KeyError::InvalidClaims => "invalid_claims",
            KeyError::InvalidSigningKey => "invalid_signing_key",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const NOW: i64 = 1_700_000_000;

    /// A PKCS#8 v1 key as written by `openssl genpkey -algorithm ed25519`.
    const OPENSSL_PEM: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIGrNTvejcqwuHI6DtkLroZ8LdZbitTIvGIKlmGGVzPuD
-----END PRIVATE KEY-----
";

    fn claims(kind: KeyKind, scp: Vec<Scope>) -> Claims {
        Claims {
            jti: Uuid::from_u128(1),
            cfg: Uuid::from_u128(2),
            ten: Uuid::from_u128(3),
            prj: Some(Uuid::from_u128(4)),
            scp,
            iat: NOW - 10,
            nbf: Some(NOW - 10),
            exp: Some(NOW + 3600),
            mode: kind.mode(),
        }
    }

    fn setup() -> (SigningKey, Verifier) {
        let signing = SigningKey::generate("k1");
        let verifier = Verifier::new(&[signing.verification_key()]).unwrap();
        (signing, verifier)
    }

    fn b64(json: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(json).unwrap())
    }

    /// Signs arbitrary header and payload JSON with `signing`, bypassing `issue`.
    fn forge(
        signing: &SigningKey,
        prefix: &str,
        header: &serde_json::Value,
        payload: &serde_json::Value,
    ) -> ApiKey {
        let message = format!("{}.{}", b64(header), b64(payload));
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &signing.encoding, Algorithm::EdDSA)
                .unwrap();
        ApiKey::parse(&format!("{prefix}{message}.{signature}")).unwrap()
    }

    fn eddsa_header(kid: &str) -> serde_json::Value {
        json!({"typ": "JWT", "alg": "EdDSA", "kid": kid})
    }

    fn payload(kind: &str, mode: &str, scp: &[&str]) -> serde_json::Value {
        json!({
            "jti": Uuid::from_u128(1), "cfg": Uuid::from_u128(2), "ten": Uuid::from_u128(3),
            "scp": scp, "iat": NOW, "mode": mode, "kind": kind,
        })
    }

    fn all_kinds() -> impl Strategy<Value = KeyKind> {
        prop::sample::select(KeyKind::ALL.to_vec())
    }

    fn arb_uuid() -> impl Strategy<Value = Uuid> {
        any::<u128>().prop_map(Uuid::from_u128)
    }

    /// Valid claims for `kind`, at time `NOW`.
    fn arb_claims(kind: KeyKind) -> impl Strategy<Value = Claims> {
        let scopes = if kind.is_publishable() {
            Just(vec![Scope::Invoke]).boxed()
        } else {
            prop::collection::vec(
                prop::sample::select(vec![Scope::Invoke, Scope::Read, Scope::Admin]),
                0..4,
            )
            .boxed()
        };
        (
            (
                arb_uuid(),
                arb_uuid(),
                arb_uuid(),
                prop::option::of(arb_uuid()),
            ),
            scopes,
            i64::MIN / 2..NOW,
            prop::option::of(i64::MIN / 2..=NOW),
            prop::option::of(NOW + 1..i64::MAX),
        )
            .prop_map(move |((jti, cfg, ten, prj), scp, iat, nbf, exp)| Claims {
                jti,
                cfg,
                ten,
                prj,
                scp,
                iat,
                nbf,
                exp,
                mode: kind.mode(),
            })
    }

    fn arb_kind_and_claims() -> impl Strategy<Value = (KeyKind, Claims)> {
        all_kinds().prop_flat_map(|kind| (Just(kind), arb_claims(kind)))
    }

    /// Characters to substitute: the key alphabet, separators, padding, the standard
    /// base64 alphabet's extras, whitespace, and anything else.
    fn arb_replacement() -> impl Strategy<Value = char> {
        prop_oneof![
            prop::sample::select(
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \n\0é"
                    .chars()
                    .collect::<Vec<_>>()
            ),
            any::<char>(),
        ]
    }

    fn replace_at(s: &str, index: usize, c: char) -> String {
        s.chars()
            .enumerate()
            .map(|(i, original)| if i == index { c } else { original })
            .collect()
    }

    #[test]
    fn round_trip_each_kind() {
        let (signing, verifier) = setup();
        for kind in KeyKind::ALL {
            let claims = claims(kind, vec![Scope::Invoke]);
            let key = signing.issue(kind, &claims).unwrap();
            assert!(key.expose_secret().starts_with(kind.prefix()));
            let parsed = ApiKey::parse(key.expose_secret()).unwrap();
            assert_eq!(parsed.kind(), kind);
            assert_eq!(parsed.hash(), key.hash());
            assert_eq!(verifier.verify(&parsed, NOW).unwrap(), claims);
        }
    }

    #[test]
    fn token_carries_expected_header_and_kind_claim() {
        let (signing, _) = setup();
        let key = signing
            .issue(
                KeyKind::SecretLive,
                &claims(KeyKind::SecretLive, vec![Scope::Read]),
            )
            .unwrap();
        let mut parts = key.token().split('.');
        let decode = |part: &str| -> serde_json::Value {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
        };
        let header = decode(parts.next().unwrap());
        assert_eq!(header, json!({"typ": "JWT", "alg": "EdDSA", "kid": "k1"}));
        let payload = decode(parts.next().unwrap());
        assert_eq!(payload["kind"], "secret_live");
        assert_eq!(payload["mode"], "live");
        assert_eq!(payload["scp"], json!(["read"]));
    }

    #[test]
    fn non_expiring_key_verifies() {
        let (signing, verifier) = setup();
        let mut claims = claims(KeyKind::SecretLive, vec![Scope::Admin]);
        claims.exp = None;
        claims.nbf = None;
        claims.prj = None;
        let key = signing.issue(KeyKind::SecretLive, &claims).unwrap();
        assert_eq!(verifier.verify(&key, i64::MAX).unwrap(), claims);
        let payload: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(key.token().split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        for absent in ["exp", "nbf", "prj"] {
            assert!(payload.get(absent).is_none(), "{absent} should be skipped");
        }
    }

    #[test]
    fn exhaustive_single_character_mutations_never_verify() {
        let (signing, verifier) = setup();
        let key = signing
            .issue(
                KeyKind::SecretLive,
                &claims(KeyKind::SecretLive, vec![Scope::Invoke]),
            )
            .unwrap();
        let original = key.expose_secret();
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.";
        let mut outcomes: HashMap<KeyError, usize> = HashMap::new();
        for index in 0..original.len() {
            for c in alphabet.chars() {
                let mutated = replace_at(original, index, c);
                if mutated == original {
                    continue;
                }
                let error = match ApiKey::parse(&mutated) {
                    Err(e) => e,
                    Ok(parsed) => match verifier.verify(&parsed, NOW) {
                        Err(e) => e,
                        Ok(_) => panic!("mutation at {index} to {c:?} verified"),
                    },
                };
                *outcomes.entry(error).or_default() += 1;
            }
        }
        // The mutations exercise every layer: shape, prefix, header and signature.
        for layer in [
            KeyError::WrongPrefix,
            KeyError::Malformed,
            KeyError::UnsupportedAlgorithm,
            KeyError::BadSignature,
        ] {
            assert!(outcomes.get(&layer).copied().unwrap_or(0) > 0, "{layer:?}");
        }
    }

    #[test]
    fn secret_and_publishable_prefixes_are_not_interchangeable() {
        let (signing, verifier) = setup();
        let secret = signing
            .issue(
                KeyKind::SecretLive,
                &claims(KeyKind::SecretLive, vec![Scope::Invoke]),
            )
            .unwrap();
        let as_publishable =
            ApiKey::parse(&secret.expose_secret().replacen("ar_sk_", "ar_pk_", 1)).unwrap();
        assert_eq!(
            verifier.verify(&as_publishable, NOW),
            Err(KeyError::WrongPrefix)
        );

        let publishable = signing
            .issue(
                KeyKind::PublishableLive,
                &claims(KeyKind::PublishableLive, vec![Scope::Invoke]),
            )
            .unwrap();
        let as_secret =
            ApiKey::parse(&publishable.expose_secret().replacen("ar_pk_", "ar_sk_", 1)).unwrap();
        assert_eq!(verifier.verify(&as_secret, NOW), Err(KeyError::WrongPrefix));
    }

    #[test]
    fn test_mode_token_under_live_prefix_is_mode_mismatch() {
        let (signing, verifier) = setup();
        let test_key = signing
            .issue(
                KeyKind::SecretTest,
                &claims(KeyKind::SecretTest, vec![Scope::Invoke]),
            )
            .unwrap();
        let relabelled = ApiKey::parse(&test_key.expose_secret().replacen(
            "ar_sk_test_",
            "ar_sk_live_",
            1,
        ))
        .unwrap();
        assert_eq!(relabelled.kind(), KeyKind::SecretLive);
        assert_eq!(
            verifier.verify(&relabelled, NOW),
            Err(KeyError::ModeMismatch)
        );
    }

    #[test]
    fn issue_refuses_mode_mismatch_and_publishable_scopes() {
        let (signing, _) = setup();
        assert_eq!(
            signing
                .issue(KeyKind::SecretLive, &claims(KeyKind::SecretTest, vec![]))
                .unwrap_err(),
            KeyError::ModeMismatch
        );
        for scp in [
            vec![Scope::Admin],
            vec![Scope::Invoke, Scope::Read],
            vec![Scope::Invoke, Scope::Invoke],
            vec![],
        ] {
            assert_eq!(
                signing
                    .issue(
                        KeyKind::PublishableLive,
                        &claims(KeyKind::PublishableLive, scp)
                    )
                    .unwrap_err(),
                KeyError::ScopeNotAllowed
            );
        }
    }

    #[test]
    fn forged_publishable_key_with_admin_scope_is_refused() {
        let (signing, verifier) = setup();
        let key = forge(
            &signing,
            "ar_pk_live_",
            &eddsa_header("k1"),
            &payload("publishable_live", "live", &["admin"]),
        );
        assert_eq!(verifier.verify(&key, NOW), Err(KeyError::ScopeNotAllowed));
        // The same forgery with the invoke scope passes, so the refusal above is the
        // scope check and not something earlier.
        let key = forge(
            &signing,
            "ar_pk_live_",
            &eddsa_header("k1"),
            &payload("publishable_live", "live", &["invoke"]),
        );
        assert!(verifier.verify(&key, NOW).is_ok());
    }

    #[test]
    fn alg_none_is_refused() {
        let (_, verifier) = setup();
        let message = format!(
            "{}.{}",
            b64(&json!({"alg": "none", "typ": "JWT", "kid": "k1"})),
            b64(&payload("secret_live", "live", &["admin"]))
        );
        // An empty signature does not even have the shape of a key.
        assert_eq!(
            ApiKey::parse(&format!("ar_sk_live_{message}.")).unwrap_err(),
            KeyError::Malformed
        );
        let key = ApiKey::parse(&format!("ar_sk_live_{message}.AAAA")).unwrap();
        assert_eq!(
            verifier.verify(&key, NOW),
            Err(KeyError::UnsupportedAlgorithm)
        );
        for alg in [
            json!("None"),
            json!("NONE"),
            json!("eddsa"),
            json!(null),
            json!(1),
        ] {
            let message = format!(
                "{}.{}",
                b64(&json!({"alg": alg, "kid": "k1"})),
                b64(&payload("secret_live", "live", &["admin"]))
            );
            let key = ApiKey::parse(&format!("ar_sk_live_{message}.AAAA")).unwrap();
            assert_eq!(
                verifier.verify(&key, NOW),
                Err(KeyError::UnsupportedAlgorithm)
            );
        }
    }

    #[test]
    fn hs256_signed_with_the_public_key_is_refused() {
        let (signing, verifier) = setup();
        let vk = signing.verification_key();
        let public_bytes = URL_SAFE_NO_PAD.decode(&vk.public_key).unwrap();
        for secret in [public_bytes.as_slice(), vk.public_key.as_bytes()] {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some("k1".into());
            let token = jsonwebtoken::encode(
                &header,
                &payload("secret_live", "live", &["admin"]),
                &EncodingKey::from_secret(secret),
            )
            .unwrap();
            let key = ApiKey::parse(&format!("ar_sk_live_{token}")).unwrap();
            assert_eq!(
                verifier.verify(&key, NOW),
                Err(KeyError::UnsupportedAlgorithm)
            );
        }
    }

    #[test]
    fn rs256_header_is_refused() {
        let (signing, verifier) = setup();
        let key = forge(
            &signing,
            "ar_sk_live_",
            &json!({"alg": "RS256", "typ": "JWT", "kid": "k1"}),
            &payload("secret_live", "live", &["admin"]),
        );
        assert_eq!(
            verifier.verify(&key, NOW),
            Err(KeyError::UnsupportedAlgorithm)
        );
    }

    #[test]
    fn unknown_and_missing_kid_are_refused() {
        let (_, verifier) = setup();
        let other = SigningKey::generate("k2");
        let key = other
            .issue(
                KeyKind::SecretLive,
                &claims(KeyKind::SecretLive, vec![Scope::Invoke]),
            )
            .unwrap();
        assert_eq!(verifier.verify(&key, NOW), Err(KeyError::UnknownKid));

        let (signing, verifier) = setup();
        for header in [
            json!({"alg": "EdDSA", "typ": "JWT"}),
            json!({"alg": "EdDSA", "kid": null}),
            json!({"alg": "EdDSA", "kid": 1}),
            json!({"alg": "EdDSA", "kid": "K1"}),
        ] {
            let key = forge(
                &signing,
                "ar_sk_live_",
                &header,
                &payload("secret_live", "live", &["invoke"]),
            );
            assert_eq!(verifier.verify(&key, NOW), Err(KeyError::UnknownKid));
        }
    }

    #[test]
    fn crit_header_is_refused() {
        let (signing, verifier) = setup();
        let key = forge(
            &signing,
            "ar_sk_live_",
            &json!({"alg": "EdDSA", "kid": "k1", "crit": ["exp"]}),
            &payload("secret_live", "live", &["invoke"]),
        );
        assert_eq!(verifier.verify(&key, NOW), Err(KeyError::Malformed));
    }

    #[test]
    fn signature_by_another_key_under_a_trusted_kid_is_refused() {
        let (_, verifier) = setup();
        let impostor = SigningKey::generate("k1");
        let key = impostor
            .issue(
                KeyKind::SecretLive,
                &claims(KeyKind::SecretLive, vec![Scope::Invoke]),
            )
            .unwrap();
        assert_eq!(verifier.verify(&key, NOW), Err(KeyError::BadSignature));
    }

    #[test]
    fn expiry_and_not_before() {
        let (signing, verifier) = setup();
        let mut c = claims(KeyKind::SecretLive, vec![Scope::Invoke]);
        c.exp = Some(NOW);
        let key = signing.issue(KeyKind::SecretLive, &c).unwrap();
        assert_eq!(verifier.verify(&key, NOW), Err(KeyError::Expired));
        assert_eq!(verifier.verify(&key, NOW + 1), Err(KeyError::Expired));
        assert!(verifier.verify(&key, NOW - 1).is_ok());

        let mut c = claims(KeyKind::SecretLive, vec![Scope::Invoke]);
        c.nbf = Some(NOW + 3600);
        let key = signing.issue(KeyKind::SecretLive, &c).unwrap();
        assert_eq!(verifier.verify(&key, NOW), Err(KeyError::NotYetValid));
        assert!(verifier
            .verify(&key, NOW + 3600 - NOT_BEFORE_LEEWAY_SECS)
            .is_ok());
        assert_eq!(
            verifier.verify(&key, NOW + 3600 - NOT_BEFORE_LEEWAY_SECS - 1),
            Err(KeyError::NotYetValid)
        );

        // Extreme values neither overflow nor pass.
        let mut c = claims(KeyKind::SecretLive, vec![Scope::Invoke]);
        c.nbf = Some(i64::MAX);
        c.exp = None;
        let key = signing.issue(KeyKind::SecretLive, &c).unwrap();
        assert_eq!(verifier.verify(&key, NOW), Err(KeyError::NotYetValid));
        assert!(verifier.verify(&key, i64::MAX - 1).is_ok());
        let mut c = claims(KeyKind::SecretLive, vec![Scope::Invoke]);
        c.exp = Some(i64::MIN);
        let key = signing.issue(KeyKind::SecretLive, &c).unwrap();
        assert_eq!(verifier.verify(&key, NOW), Err(KeyError::Expired));
    }

    #[test]
    fn claims_types_are_strict() {
        let (signing, verifier) = setup();
        let cases = [
            ("exp", json!("123")),
            ("exp", json!(1.5)),
            ("nbf", json!("0")),
            ("iat", json!("0")),
            ("jti", json!("not-a-uuid")),
            ("scp", json!(["superuser"])),
            ("scp", json!("invoke")),
            ("mode", json!("Live")),
            ("kind", json!("secret")),
            ("aud", json!("someone")),
        ];
        for (member, value) in cases {
            let mut p = payload("secret_live", "live", &["invoke"]);
            p[member] = value;
            let key = forge(&signing, "ar_sk_live_", &eddsa_header("k1"), &p);
            assert_eq!(
                verifier.verify(&key, NOW),
                Err(KeyError::InvalidClaims),
                "{member}"
            );
        }
        for missing in ["jti", "cfg", "ten", "scp", "iat", "mode", "kind"] {
            let mut p = payload("secret_live", "live", &["invoke"]);
            p.as_object_mut().unwrap().remove(missing);
            let key = forge(&signing, "ar_sk_live_", &eddsa_header("k1"), &p);
            assert_eq!(
                verifier.verify(&key, NOW),
                Err(KeyError::InvalidClaims),
                "{missing}"
            );
        }
        // Unknown members are ignored (newer issuers stay readable).
        let mut p = payload("secret_live", "live", &["invoke"]);
        p["future"] = json!({"anything": [1, 2]});
        let key = forge(&signing, "ar_sk_live_", &eddsa_header("k1"), &p);
        assert!(verifier.verify(&key, NOW).is_ok());
    }

    #[test]
    fn parse_checks_shape() {
        let too_long = format!("ar_sk_live_{}", "a".repeat(MAX_KEY_LEN + 1 - 11));
        assert_eq!(too_long.len(), MAX_KEY_LEN + 1);
        assert_eq!(ApiKey::parse(&too_long).unwrap_err(), KeyError::TooLong);
        let mut at_limit = format!("ar_sk_live_AA.AA.{}", "A".repeat(MAX_KEY_LEN));
        at_limit.truncate(MAX_KEY_LEN);
        assert!(ApiKey::parse(&at_limit).is_ok());
        // Oversize wins over every other problem.
        assert_eq!(
            ApiKey::parse(&"é".repeat(MAX_KEY_LEN)).unwrap_err(),
            KeyError::TooLong
        );

        for bad_prefix in [
            "",
            "ar_sk_live",
            "ar_pk_test_AA.AA.AA",
            "AR_SK_LIVE_AA.AA.AA",
            "ar_sk_prod_AA.AA.AA",
            " ar_sk_live_AA.AA.AA",
        ] {
            assert_eq!(
                ApiKey::parse(bad_prefix).unwrap_err(),
                KeyError::WrongPrefix,
                "{bad_prefix:?}"
            );
        }
        for malformed in [
            "ar_sk_live_",
            "ar_sk_live_AA.AA",
            "ar_sk_live_AA.AA.AA.AA",
            "ar_sk_live_.AA.AA",
            "ar_sk_live_AA..AA",
            "ar_sk_live_AA.AA.",
            "ar_sk_live_AA.AA.AA=",
            "ar_sk_live_AA.AA.A+",
            "ar_sk_live_AA.AA.A/",
            "ar_sk_live_AA.AA.AA ",
            "ar_sk_live_AA.AA.Aé",
            "ar_sk_live_AA.AA.A",   // length 1 mod 4
            "ar_sk_live_AA.AA.AB",  // non-zero trailing bits
            "ar_sk_live_AA.AA.AAB", // non-zero trailing bits
        ] {
            assert_eq!(
                ApiKey::parse(malformed).unwrap_err(),
                KeyError::Malformed,
                "{malformed:?}"
            );
        }
        for ok in [
            "ar_sk_live_AA.AA.AA",
            "ar_sk_test_AAAA.AAE.AAQ",
            "ar_pk_live_a-_0.Zw.AA",
        ] {
            assert!(ApiKey::parse(ok).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn kind_helpers() {
        assert_eq!(
            KeyKind::from_key_str("ar_sk_live_x"),
            Some(KeyKind::SecretLive)
        );
        assert_eq!(
            KeyKind::from_key_str("ar_sk_test_"),
            Some(KeyKind::SecretTest)
        );
        assert_eq!(
            KeyKind::from_key_str("ar_pk_live_"),
            Some(KeyKind::PublishableLive)
        );
        assert_eq!(KeyKind::from_key_str("ar_pk_test_"), None);
        assert_eq!(KeyKind::SecretTest.mode(), Mode::Test);
        assert!(KeyKind::PublishableLive.is_publishable());
        assert!(!KeyKind::SecretLive.is_publishable());
        assert_eq!(
            serde_json::to_value(KeyKind::PublishableLive).unwrap(),
            json!("publishable_live")
        );
        assert_eq!(serde_json::to_value(Mode::Test).unwrap(), json!("test"));
        for scope in [Scope::Invoke, Scope::Read, Scope::Admin] {
            assert_eq!(scope.as_str().parse::<Scope>(), Ok(scope));
            assert_eq!(serde_json::to_value(scope).unwrap(), json!(scope.as_str()));
        }
        assert_eq!("Admin".parse::<Scope>(), Err(UnknownScope));
    }

    #[test]
    fn key_rotation_two_kids() {
        let old = SigningKey::generate("2024-01");
        let new = SigningKey::generate("2025-01");
        let verifier = Verifier::new(&[old.verification_key(), new.verification_key()]).unwrap();
        for signing in [&old, &new] {
            let key = signing
                .issue(
                    KeyKind::SecretLive,
                    &claims(KeyKind::SecretLive, vec![Scope::Read]),
                )
                .unwrap();
            assert!(verifier.verify(&key, NOW).is_ok());
        }
        // Once the old kid is retired, its keys stop verifying.
        let key = old
            .issue(
                KeyKind::SecretLive,
                &claims(KeyKind::SecretLive, vec![Scope::Read]),
            )
            .unwrap();
        let retired = Verifier::new(&[new.verification_key()]).unwrap();
        assert_eq!(retired.verify(&key, NOW), Err(KeyError::UnknownKid));
    }

    #[test]
    fn verifier_rejects_bad_verification_keys() {
        let good = SigningKey::generate("k1").verification_key();
        let with = |public_key: &str| VerificationKey {
            kid: "k1".into(),
            public_key: public_key.into(),
        };
        let identity_point = URL_SAFE_NO_PAD.encode({
            let mut b = [0u8; 32];
            b[0] = 1;
            b
        });
        for bad in [
            with(""),
            with("AAAA"),
            with(&URL_SAFE_NO_PAD.encode([7u8; 31])),
            with(&URL_SAFE_NO_PAD.encode([7u8; 33])),
            with(&format!("{}=", good.public_key)),
            with(&identity_point),
        ] {
            assert_eq!(
                Verifier::new(std::slice::from_ref(&bad)).unwrap_err(),
                KeyError::InvalidSigningKey,
                "{bad:?}"
            );
        }
        let other = SigningKey::generate("k1").verification_key();
        assert_eq!(
            Verifier::new(&[good.clone(), other]).unwrap_err(),
            KeyError::InvalidSigningKey
        );
        // Listing the same key twice is harmless.
        assert!(Verifier::new(&[good.clone(), good]).is_ok());
        // A verifier without keys verifies nothing.
        let (signing, _) = setup();
        let key = signing
            .issue(KeyKind::SecretLive, &claims(KeyKind::SecretLive, vec![]))
            .unwrap();
        assert_eq!(
            Verifier::new(&[]).unwrap().verify(&key, NOW),
            Err(KeyError::UnknownKid)
        );
    }

    #[test]
    fn pem_round_trip_and_openssl_pem() {
        let original = SigningKey::generate("k1");
        let pem = original.to_pkcs8_pem();
        assert!(pem
            .expose_secret()
            .starts_with("-----BEGIN PRIVATE KEY-----"));
        let loaded = SigningKey::from_pkcs8_pem("k1", pem.expose_secret()).unwrap();
        assert_eq!(loaded.verification_key(), original.verification_key());

        let from_openssl = SigningKey::from_pkcs8_pem("ossl", OPENSSL_PEM).unwrap();
        let verifier = Verifier::new(&[from_openssl.verification_key()]).unwrap();
        let key = from_openssl
            .issue(KeyKind::SecretTest, &claims(KeyKind::SecretTest, vec![]))
            .unwrap();
        assert!(verifier.verify(&key, NOW).is_ok());
        let reloaded =
            SigningKey::from_pkcs8_pem("ossl", from_openssl.to_pkcs8_pem().expose_secret())
                .unwrap();
        assert_eq!(reloaded.verification_key(), from_openssl.verification_key());

        for bad in [
            "",
            "not a pem",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ] {
            assert_eq!(
                SigningKey::from_pkcs8_pem("k", bad).unwrap_err(),
                KeyError::InvalidSigningKey
            );
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let (signing, _) = setup();
        let key = signing
            .issue(
                KeyKind::SecretLive,
                &claims(KeyKind::SecretLive, vec![Scope::Admin]),
            )
            .unwrap();
        let debug = format!("{key:?}");
        assert_eq!(
            debug,
            format!(
                "ApiKey {{ kind: SecretLive, prefix: {:?} }}",
                key.display_prefix()
            )
        );
        let signature = key.token().rsplit('.').next().unwrap();
        assert!(!debug.contains(key.expose_secret()));
        assert!(!debug.contains(signature));

        let pem = signing.to_pkcs8_pem();
        let debug = format!("{signing:?}");
        assert_eq!(debug, "SigningKey { kid: \"k1\", .. }");
        for line in pem.expose_secret().lines() {
            assert!(!debug.contains(line));
        }
        let verifier = Verifier::new(&[signing.verification_key()]).unwrap();
        assert_eq!(format!("{verifier:?}"), "Verifier { kids: [\"k1\"] }");
    }

    #[test]
    fn display_prefix_comes_from_the_hash() {
        let (signing, _) = setup();
        let key = signing
            .issue(
                KeyKind::PublishableLive,
                &claims(KeyKind::PublishableLive, vec![Scope::Invoke]),
            )
            .unwrap();
        let prefix = key.display_prefix();
        assert_eq!(prefix.len(), 19);
        assert_eq!(prefix, format!("ar_pk_live_{}", &key.hash().to_hex()[..8]));
        assert_eq!(
            key.hash(),
            KeyHash(Sha256::digest(key.expose_secret().as_bytes()).into())
        );
    }

    #[test]
    fn key_hash_hex_serde_and_ct_eq() {
        let a = KeyHash::of("ar_sk_live_a.b.c");
        let b = KeyHash::of("ar_sk_live_a.b.d");
        let hex = a.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(KeyHash::from_hex(&hex).unwrap(), a);
        assert_eq!(a.to_string(), hex);
        assert_eq!(format!("{a:?}"), format!("KeyHash({hex})"));
        assert_eq!(serde_json::to_value(a).unwrap(), json!(hex));
        assert_eq!(serde_json::from_value::<KeyHash>(json!(hex)).unwrap(), a);
        assert_eq!(KeyHash::from_bytes(*a.as_bytes()), a);
        for bad in [
            String::new(),
            hex[..62].to_string(),
            format!("{hex}00"),
            hex.to_uppercase(),
            format!("{}g", &hex[..63]),
        ] {
            assert_eq!(KeyHash::from_hex(&bad), Err(KeyError::Malformed), "{bad}");
            assert!(serde_json::from_value::<KeyHash>(json!(bad)).is_err());
        }
        assert!(serde_json::from_value::<KeyHash>(json!(1)).is_err());
        assert!(a.ct_eq(&a));
        assert!(!a.ct_eq(&b));
        let mut map = std::collections::BTreeMap::new();
        map.insert(a, 1);
        let round: std::collections::BTreeMap<KeyHash, i32> =
            serde_json::from_str(&serde_json::to_string(&map).unwrap()).unwrap();
        assert_eq!(round, map);
    }

    #[test]
    fn error_codes_and_messages() {
        let all = [
            (KeyError::TooLong, "key_too_long"),
            (KeyError::Malformed, "malformed_key"),
            (KeyError::WrongPrefix, "wrong_key_prefix"),
            (KeyError::UnsupportedAlgorithm, "unsupported_algorithm"),
            (KeyError::UnknownKid, "unknown_kid"),
            (KeyError::BadSignature, "bad_signature"),
            (KeyError::Expired, "key_expired"),
            (KeyError::NotYetValid, "key_not_yet_valid"),
            (KeyError::ModeMismatch, "mode_mismatch"),
            (KeyError::ScopeNotAllowed, "scope_not_allowed"),
            (KeyError::InvalidClaims, "invalid_claims"),
            (KeyError::InvalidSigningKey, "invalid_signing_key"),
        ];
        for (error, code) in all {
            assert_eq!(error.code(), code);
            assert!(!error.to_string().is_empty());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn prop_issue_parse_verify_round_trip((kind, claims) in arb_kind_and_claims()) {
            let (signing, verifier) = setup();
            let key = signing.issue(kind, &claims).unwrap();
            let parsed = ApiKey::parse(key.expose_secret()).unwrap();
            prop_assert_eq!(parsed.kind(), kind);
            prop_assert_eq!(verifier.verify(&parsed, NOW).unwrap(), claims);
        }

        #[test]
        fn prop_single_character_mutation_never_verifies(
            (kind, claims) in arb_kind_and_claims(),
            index in any::<prop::sample::Index>(),
            replacement in arb_replacement(),
        ) {
            let (signing, verifier) = setup();
            let key = signing.issue(kind, &claims).unwrap();
            let original = key.expose_secret();
            let mutated = replace_at(original, index.index(original.len()), replacement);
            if mutated != original {
                if let Ok(parsed) = ApiKey::parse(&mutated) {
                    prop_assert!(verifier.verify(&parsed, NOW).is_err());
                }
            }
        }

        #[test]
        fn prop_debug_never_shows_secrets(
            (kind, claims) in arb_kind_and_claims(),
            kid in "[a-z0-9-]{1,12}",
        ) {
            let signing = SigningKey::generate(kid);
            let key = signing.issue(kind, &claims).unwrap();
            let debug = format!("{key:?} {signing:?}");
            prop_assert!(!debug.contains(key.token()));
            for segment in key.token().split('.') {
                prop_assert!(!debug.contains(segment));
            }
            let pem = signing.to_pkcs8_pem();
            for line in pem.expose_secret().lines().filter(|l| !l.starts_with("-----")) {
                prop_assert!(!debug.contains(line));
            }
        }

        #[test]
        fn prop_parse_never_panics(s in ".{0,64}", prefix in prop::sample::select(vec!["", "ar_sk_live_", "ar_pk_live_"])) {
            let _ = ApiKey::parse(&format!("{prefix}{s}"));
        }

        #[test]
        fn prop_key_hash_hex_round_trip(bytes in any::<[u8; 32]>()) {
            let hash = KeyHash::from_bytes(bytes);
            prop_assert_eq!(KeyHash::from_hex(&hash.to_hex()).unwrap(), hash);
            prop_assert!(hash.ct_eq(&KeyHash::from_bytes(bytes)));
        }
    }
}
