//! A config's embeddable chat widget: where it may be embedded and how it
//! looks, each value checked once here, and the snippet a site owner pastes.

use crate::error::ApiError;

/// Most origins one config's widget may be embedded on.
pub const MAX_ORIGINS: usize = 20;

/// An origin as browsers send it in `Origin`: `http(s)://host[:port]`, lower
/// case, no path. Upper-case hosts are folded; anything else is refused.
pub fn origin(value: &str) -> Result<String, ApiError> {
    let refused = || {
        ApiError::bad_request(
            "invalid_origin",
            format!(
                "{value:?} is not an origin like https://shop.example.com or http://localhost:3000 (scheme, host and optional port; no path)"
            ),
        )
    };
    let lower = value.trim().to_ascii_lowercase();
    let (scheme, rest) = lower.split_once("://").ok_or_else(refused)?;
    if !matches!(scheme, "http" | "https") || rest.is_empty() || lower.len() > 253 {
        return Err(refused());
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (rest, None),
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        !inner.is_empty() && inner.chars().all(|c| c.is_ascii_hexdigit() || c == ':')
    } else {
        !host.is_empty()
            && !host.starts_with(['.', '-'])
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty() && !p.starts_with('0') && p.parse::<u16>().is_ok_and(|n| n > 0)
    });
    if !host_ok || !port_ok {
        return Err(refused());
    }
    // Browsers leave the scheme's default port out of `Origin`.
    let default_port = matches!(
        (scheme, port),
        ("http", Some("80")) | ("https", Some("443"))
    );
    Ok(if default_port {
        format!("{scheme}://{host}")
    } else {
        lower
    })
}

/// A list of origins, each checked, without duplicates.
pub fn origins(values: &[String]) -> Result<Vec<String>, ApiError> {
    if values.len() > MAX_ORIGINS {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("at most {MAX_ORIGINS} allowed_origins"),
        ));
    }
    let mut out = values
        .iter()
        .map(|v| origin(v))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// `#rrggbb`, folded to lower case.
pub fn accent_color(value: &str) -> Result<String, ApiError> {
    let v = value.trim();
    match v.strip_prefix('#') {
        Some(hex) if hex.len() == 6 && hex.chars().all(|c| c.is_ascii_hexdigit()) => {
            Ok(v.to_ascii_lowercase())
        }
        _ => Err(ApiError::bad_request(
            "invalid_field",
            "accent_color must be a colour like #1f4fd1",
        )),
    }
}

/// Where the launcher sits.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Position {
    BottomRight,
    BottomLeft,
}

impl Position {
    pub fn as_str(self) -> &'static str {
        match self {
            Position::BottomRight => "bottom-right",
            Position::BottomLeft => "bottom-left",
        }
    }

    pub fn parse_stored(value: &str) -> Position {
        if value == "bottom-left" {
            Position::BottomLeft
        } else {
            Position::BottomRight
        }
    }
}

/// The snippet that embeds the widget of a publishable key.
pub fn snippet(gateway_url: &str, publishable_key: &str) -> String {
    format!(
        r#"<script async src="{}/widget/loader.js" data-key="{}"></script>"#,
        attribute(gateway_url.trim_end_matches('/')),
        attribute(publishable_key)
    )
}

fn attribute(value: &str) -> String {
    value
        .replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_scheme_host_and_port_as_browsers_send_them() {
        assert_eq!(
            origin("https://Shop.Example.com").unwrap(),
            "https://shop.example.com"
        );
        assert_eq!(
            origin("http://localhost:3000").unwrap(),
            "http://localhost:3000"
        );
        assert_eq!(origin("https://a.com:443").unwrap(), "https://a.com");
        assert_eq!(origin("http://a.com:80").unwrap(), "http://a.com");
        assert_eq!(origin("https://a.com:80").unwrap(), "https://a.com:80");
        assert_eq!(origin("http://[::1]:8080").unwrap(), "http://[::1]:8080");
        for bad in [
            "*",
            "https://a.com/",
            "https://a.com/path",
            "javascript:alert(1)",
            "ftp://a.com",
            "https://",
            "https://a.com:0",
            "https://a.com:65536",
            "https://a.com:08",
            "https://a b.com",
            "https://.a.com",
            "https://a.com:",
            "https://user@a.com",
        ] {
            assert!(origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn origin_lists_are_bounded_and_deduplicated() {
        let same = vec!["https://a.com".to_owned(), "https://A.com".to_owned()];
        assert_eq!(origins(&same).unwrap(), vec!["https://a.com"]);
        let many: Vec<String> = (0..21).map(|i| format!("https://a{i}.com")).collect();
        assert!(origins(&many).is_err());
    }

    #[test]
    fn accent_colours_are_six_hex_digits() {
        assert_eq!(accent_color("#1F4FD1").unwrap(), "#1f4fd1");
        for bad in ["1f4fd1", "#fff", "#1f4fd1ff", "red", "#1f4fdz", "url(x)"] {
            assert!(accent_color(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_snippet_escapes_what_it_embeds() {
        let s = snippet("https://gw.example/", "ar_pk_live_a.b.c");
        assert_eq!(
            s,
            r#"<script async src="https://gw.example/widget/loader.js" data-key="ar_pk_live_a.b.c"></script>"#
        );
        assert!(!snippet("https://gw.example", "\"><script>").contains("\"><script>"));
    }
}
