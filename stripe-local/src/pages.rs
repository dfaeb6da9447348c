//! The hosted pages a buyer's browser is sent to: checkout and the billing
//! portal. Plain HTML forms, no scripts.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

pub const TITLE: &str = "Local test payments — nothing leaves this machine";

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// Field `name` of a submitted page form; empty if absent or unreadable.
pub fn field(body: &[u8], name: &str) -> String {
    crate::form::decode(&String::from_utf8_lossy(body))
        .ok()
        .and_then(|f| f[name].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A page: the title as heading, then `body` (already HTML).
pub fn page(status: StatusCode, body: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{TITLE}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:2rem auto;padding:0 1rem}}\
         table{{border-collapse:collapse;width:100%}}td,th{{padding:.3rem;border-bottom:1px solid #ddd;text-align:left}}\
         .note{{background:#fff4d6;padding:.6rem}}.error{{color:#a00;font-weight:bold}}</style>\
         </head><body><h1>{TITLE}</h1>\n{body}\n</body></html>\n"
    );
    (status, Html(html)).into_response()
}

/// `1999` cents in `usd` → `$19.99`; other currencies by their code.
pub fn money(cents: i64, currency: &str) -> String {
    let amount = format!("{}.{:02}", cents / 100, cents % 100);
    match currency {
        "usd" => format!("${amount}"),
        other => format!("{amount} {}", other.to_uppercase()),
    }
}

pub const CARD_HINT: &str = "Use a test card: 4242 4242 4242 4242 pays; \
                             4000 0000 0000 0341 is declined.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_before_it_goes_into_a_page() {
        assert_eq!(
            escape(r#"<b>"Tom" & 'Jerry'</b>"#),
            "&lt;b&gt;&quot;Tom&quot; &amp; &#39;Jerry&#39;&lt;/b&gt;"
        );
    }

    #[test]
    fn amounts_show_in_the_currency() {
        assert_eq!(money(1999, "usd"), "$19.99");
        assert_eq!(money(5, "eur"), "0.05 EUR");
    }
}
