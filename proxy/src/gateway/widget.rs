//! The chat widget's routes: its assets, visitor sessions opened with a
//! publishable key, a visitor's invoke, and CORS answered only for the
//! origins a widget may be embedded on.

use agora_config::keys::Claims;
use agora_config::snapshot::KeyStatus;

use super::*;
use crate::h1;
use crate::widget::{self, TokenError, Visit, REFRESH_WINDOW_SECS};

pub const WIDGET_SESSION: &str = "/api/agent-gateway/widget/session/";
pub const WIDGET_ASSETS: &str = "/widget/";

/// Largest visitor session request body.
const MAX_SESSION_BODY: usize = 4096;

/// What a widget sends to open or refresh its visitor session.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionRequest {
    /// The publishable key (or in the query, `?key=`).
    key: Option<String>,
    /// The visitor's current token, possibly expired: the same visitor goes on.
    token: Option<String>,
}

impl Gateway {
    /// `/widget/loader.js`, `/widget/widget.js`, `/widget/widget.css`.
    pub(super) async fn widget_asset(
        &self,
        conn: &mut Conn,
        head: &RequestHead,
        ctx: &mut Ctx,
    ) -> Result<(), GatewayError> {
        if head.method() != b"GET" && head.method() != b"HEAD" {
            return Err(GatewayError::MethodNotAllowed);
        }
        let assets = widget::assets();
        let asset = match &head.path()[WIDGET_ASSETS.len()..] {
            b"loader.js" => &assets.loader,
            b"widget.js" => &assets.script,
            b"widget.css" => &assets.style,
            _ => return Err(GatewayError::NotFound),
        };
        // The loader's URL is in pages: it changes content under one URL, so
        // caches revalidate it; the rest are fetched by version and never change.
        let cache = if std::ptr::eq(asset, &assets.loader) {
            "public, max-age=300"
        } else if query_param(head.query(), "v") == Some(assets.version.as_str()) {
            "public, max-age=31536000, immutable"
        } else {
            "public, max-age=300"
        };
        let gzip = accepts_gzip(head.header("accept-encoding"));
        let (body, etag) = if gzip {
            (&asset.gzip, &asset.etag_gzip)
        } else {
            (&asset.body, &asset.etag)
        };
        let fresh = head
            .header("if-none-match")
            .is_some_and(|v| h1::tokens(v).any(|t| t == etag.as_bytes() || t == b"*"));
        let status = if fresh { 304 } else { 200 };
        conn.start(status);
        conn.header(b"content-type", asset.content_type.as_bytes());
        conn.header(b"cache-control", cache.as_bytes());
        conn.header(b"etag", etag.as_bytes());
        conn.header(b"vary", b"accept-encoding");
        conn.header(b"x-content-type-options", b"nosniff");
        // Public code and style, fetched from any page that embeds the widget.
        conn.header(b"access-control-allow-origin", b"*");
        conn.header(b"cross-origin-resource-policy", b"cross-origin");
        if fresh {
            conn.end_head();
            let _ = conn.flush().await;
        } else {
            if gzip {
                conn.header(b"content-encoding", b"gzip");
            }
            let _ = conn.send(body).await;
        }
        ctx.status = status;
        Ok(())
    }

    /// Opens (or refreshes) a widget visitor's session: the publishable key
    /// and the page's `Origin` are checked, then a short-lived token is given.
    pub(super) async fn widget_session(
        &self,
        conn: &mut Conn,
        head: &RequestHead,
        ctx: &mut Ctx,
    ) -> Result<(), GatewayError> {
        let preflight = head.method() == b"OPTIONS";
        if head.method() != b"POST" && !preflight {
            return Err(GatewayError::MethodNotAllowed);
        }
        let state = self.shared.load();
        if !self.shared.is_loaded() {
            return Err(GatewayError::NotReady);
        }
        let origin = request_origin(head).ok_or(GatewayError::OriginNotAllowed)?;
        let in_query = query_param(head.query(), "key").map(str::to_owned);
        let request = if preflight {
            None
        } else {
            let body = conn.read_body(MAX_SESSION_BODY).await?;
            Some(
                serde_json::from_slice::<SessionRequest>(&body).map_err(|_| {
                    GatewayError::BadRequest {
                        code: "invalid_body",
                        message: "The body must be JSON {key?, token?}.".into(),
                    }
                })?,
            )
        };
        let key = request
            .as_ref()
            .and_then(|r| r.key.clone())
            .or(in_query)
            .ok_or(GatewayError::MissingKey)?;
        let caller = keys::authenticate(
            &state,
            key.as_bytes(),
            Some(Scope::Invoke),
            ctx.started_ms / 1000,
        )
        .inspect_err(|e| self.count_auth_failure(e))?;
        if !caller.record.entry.kind.is_publishable() {
            return Err(GatewayError::BadRequest {
                code: "publishable_key_required",
                message: "Widget sessions are opened with a publishable key (ar_pk_live_…); a secret key never belongs in a web page.".into(),
            });
        }
        keys::check_origin(&state, &caller, Some(origin.as_bytes()))?;
        let config = caller.record.entry.config;
        let key_id = caller.record.entry.key_id;
        ctx.caller = Some(caller);
        ctx.cors = Some(origin.clone());
        if preflight {
            self.preflight(conn, ctx).await;
            return Ok(());
        }
        self.limits.admit_session(conn.peer)?;
        let now = ctx.started_ms / 1000;
        let ttl = self.widget_session_ttl_secs;
        // A refresh keeps its visitor: a token of ours for this config and
        // origin, not expired for long.
        let visitor = request
            .and_then(|r| r.token)
            .and_then(|t| self.sessions.read(t.as_bytes()).ok())
            .filter(|v| {
                v.config == config && v.origin == origin && now - v.expires_at < REFRESH_WINDOW_SECS
            })
            .map_or_else(Uuid::new_v4, |v| v.visitor);
        let visit = Visit {
            config,
            key_id,
            visitor,
            origin,
            expires_at: now + ttl as i64,
        };
        let look = state.widget(&config);
        let body = serde_json::json!({
            "token": self.sessions.issue(&visit),
            "expires_in": ttl,
            "visitor": visitor,
            "widget": {
                "title": look.map(|w| w.title.as_str()),
                "greeting": look.map(|w| w.greeting.as_str()),
                "accent": look.map(|w| w.accent_color.as_str()),
                "position": look.map(|w| w.position.as_str()),
                "launcher_text": look.map(|w| w.launcher_text.as_str()),
            },
        });
        self.json(conn, ctx, 200, &body).await;
        Ok(())
    }

    /// The invoke's caller from a visitor session token: genuine, from its own
    /// origin (which must still be allowed), alive, and its key still usable.
    /// CORS is granted as soon as the origin is known good, so a browser can
    /// read even the refusals that follow (an expired session, a rate limit).
    pub(super) fn visitor(
        &self,
        head: &RequestHead,
        state: &crate::state::State,
        token: &[u8],
        ctx: &mut Ctx,
    ) -> Result<(Caller, Uuid), GatewayError> {
        let now = ctx.started_ms / 1000;
        let visit = self.sessions.read(token).map_err(|_| {
            // A widget page may read the refusal and open a new session.
            ctx.cors = request_origin(head).filter(|o| state.is_widget_origin(o));
            self.metrics.auth_failure("invalid_visitor_token");
            GatewayError::InvalidVisitorToken
        })?;
        let allowed = request_origin(head).as_deref() == Some(visit.origin.as_str())
            && state
                .widget(&visit.config)
                .is_some_and(|w| w.allowed_origins.contains(&visit.origin));
        if !allowed {
            return Err(GatewayError::OriginNotAllowed);
        }
        ctx.cors = Some(visit.origin.clone());
        if let Err(TokenError::Expired) = self.sessions.check(token, now) {
            return Err(GatewayError::VisitorSessionExpired);
        }
        let record = state
            .publishable_key(&visit.key_id)
            .filter(|r| r.entry.config == visit.config)
            .ok_or(GatewayError::InvalidVisitorToken)?;
        let entry = &record.entry;
        match entry.status {
            KeyStatus::Active => {}
            KeyStatus::Revoked => return Err(GatewayError::InvalidVisitorToken),
            KeyStatus::Suspended => return Err(GatewayError::Suspended),
        }
        if entry.expires_at.is_some_and(|exp| now >= exp) {
            return Err(GatewayError::InvalidVisitorToken);
        }
        // The key was verified when the session was opened (on this gateway or
        // another); its entry says what it may do.
        let claims = match record.verified.get() {
            Some(claims) => claims.clone(),
            None => Arc::new(Claims {
                jti: entry.key_id,
                cfg: entry.config,
                ten: entry.tenant,
                prj: entry.project,
                scp: entry.scopes.clone(),
                iat: 0,
                nbf: None,
                exp: entry.expires_at,
                mode: entry.mode,
            }),
        };
        self.limits.admit_visitor(&visit.visitor).inspect_err(|e| {
            if let GatewayError::RateLimited { limit, .. } = e {
                self.metrics.rate_limited(limit.as_str());
            }
        })?;
        Ok((
            Caller {
                record: record.clone(),
                claims,
            },
            visit.visitor,
        ))
    }

    /// A CORS preflight of the invoke route: any origin some widget may be
    /// embedded on (the preflight names no token); the invoke itself then
    /// checks its token's own origin.
    pub(super) async fn invoke_preflight(
        &self,
        conn: &mut Conn,
        head: &RequestHead,
        ctx: &mut Ctx,
    ) -> Result<(), GatewayError> {
        let state = self.shared.load();
        let origin = request_origin(head)
            .filter(|o| state.is_widget_origin(o))
            .ok_or(GatewayError::OriginNotAllowed)?;
        ctx.cors = Some(origin);
        self.preflight(conn, ctx).await;
        Ok(())
    }

    async fn preflight(&self, conn: &mut Conn, ctx: &mut Ctx) {
        conn.start(204);
        self.cors_fields(conn, ctx);
        conn.header(b"access-control-allow-methods", b"POST");
        conn.header(
            b"access-control-allow-headers",
            b"authorization, content-type",
        );
        conn.header(b"access-control-max-age", b"600");
        conn.end_head();
        let _ = conn.flush().await;
        ctx.status = 204;
    }

    /// The CORS fields of an answer to an allowed origin, if this is one.
    pub(super) fn cors_fields(&self, conn: &mut Conn, ctx: &Ctx) {
        if let Some(origin) = &ctx.cors {
            conn.header(b"access-control-allow-origin", origin.as_bytes());
            conn.header(b"vary", b"origin");
            conn.header(
                b"access-control-expose-headers",
                crate::upstream::CORS_EXPOSED,
            );
        }
    }

    pub(super) fn count_auth_failure(&self, e: &GatewayError) {
        match e {
            GatewayError::InvalidKey(reason) => self.metrics.auth_failure(reason.as_str()),
            other => self.metrics.auth_failure(other.code()),
        }
    }
}

/// The request's `Origin`, as text.
fn request_origin(head: &RequestHead) -> Option<String> {
    let value = head.header("origin")?;
    let text = std::str::from_utf8(value).ok()?;
    (!text.is_empty() && text.len() <= 300 && text != "null").then(|| text.to_owned())
}

/// A query parameter's raw value (widget values need no decoding: keys are
/// base64url and dots, versions hex).
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

/// Whether `Accept-Encoding` takes gzip (and does not refuse it with `q=0`).
fn accepts_gzip(value: Option<&[u8]>) -> bool {
    let Some(value) = value.and_then(|v| std::str::from_utf8(v).ok()) else {
        return false;
    };
    value.split(',').any(|item| {
        let mut parts = item.split(';').map(str::trim);
        let coding = parts.next().unwrap_or("");
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .is_some_and(|q| q.parse::<f32>().is_ok_and(|q| q == 0.0))
        });
        (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_taken_unless_refused() {
        assert!(accepts_gzip(Some(b"gzip, deflate, br")));
        assert!(accepts_gzip(Some(b"br;q=1.0, GZIP;q=0.5")));
        assert!(accepts_gzip(Some(b"*")));
        assert!(!accepts_gzip(Some(b"gzip;q=0")));
        assert!(!accepts_gzip(Some(b"br")));
        assert!(!accepts_gzip(None));
    }

    #[test]
    fn query_parameters_are_found_by_exact_name() {
        assert_eq!(query_param(Some("v=abc&key=k"), "key"), Some("k"));
        assert_eq!(query_param(Some("vv=1&v=2"), "v"), Some("2"));
        assert_eq!(query_param(Some("v"), "v"), None);
        assert_eq!(query_param(None, "v"), None);
    }
}
