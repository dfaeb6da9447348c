//! Domain types of the control plane. Each is parsed once at the edge (from a
//! request or a row) and is valid from then on.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;

macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!(
                        "{other:?} is not one of {}",
                        [$($text),+].join(", ")
                    )),
                }
            }
        }
    };
}

text_enum!(
    /// A buyer's organisation or a seller's (service provider).
    OrgKind { Customer = "customer", Provider = "provider" }
);
text_enum!(Role { Owner = "owner", Admin = "admin", Member = "member" });

impl Role {
    /// Owner above admin above member.
    pub fn rank(self) -> u8 {
        match self {
            Role::Owner => 2,
            Role::Admin => 1,
            Role::Member => 0,
        }
    }
}
text_enum!(
    /// How a buyer's copy of an agent speaks.
    Tone { Professional = "professional", Friendly = "friendly", Casual = "casual" }
);
text_enum!(AgentStatus { Draft = "draft", Published = "published" });
text_enum!(OrderState { PendingPayment = "pending_payment", Done = "done", Cancelled = "cancelled" });
text_enum!(ResourceState { Active = "active", Suspended = "suspended", Terminated = "terminated" });

/// An amount of money in the currency's minor unit; never negative.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Cents(i64);

impl Cents {
    pub const ZERO: Cents = Cents(0);
    /// A million currency units: larger prices are typos.
    pub const MAX: i64 = 100_000_000;

    pub fn new(value: i64) -> Result<Cents, ApiError> {
        if (0..=Self::MAX).contains(&value) {
            Ok(Cents(value))
        } else {
            Err(ApiError::bad_request(
                "invalid_price",
                format!("price_cents must be between 0 and {}", Self::MAX),
            ))
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }

    pub fn is_free(self) -> bool {
        self.0 == 0
    }
}

/// An ISO 4217 code, stored lowercase (as Stripe does).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Currency(String);

impl Currency {
    pub fn new(code: &str) -> Result<Currency, ApiError> {
        if code.len() == 3 && code.chars().all(|c| c.is_ascii_alphabetic()) {
            Ok(Currency(code.to_ascii_lowercase()))
        } else {
            Err(ApiError::bad_request(
                "invalid_currency",
                "currency must be a three-letter ISO 4217 code such as \"usd\"",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a free-text field: trimmed length within bounds, no control characters.
pub fn text_field(field: &str, value: &str, min: usize, max: usize) -> Result<String, ApiError> {
    let value = value.trim();
    let len = value.chars().count();
    if len < min || len > max {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("{field} must be between {min} and {max} characters"),
        ));
    }
    if value.chars().any(|c| c.is_control() && c != '\n') {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("{field} must not contain control characters"),
        ));
    }
    Ok(value.to_owned())
}

/// Parses a stored enum; a bad value in the database is an internal error.
pub fn parse_stored<T: std::str::FromStr<Err = String>>(value: &str) -> Result<T, ApiError> {
    value
        .parse()
        .map_err(|e: String| ApiError::Unexpected(anyhow::anyhow!("stored value: {e}")))
}

/// Paging: `?page=1&page_size=20`, page size capped by the server's maximum.
#[derive(Clone, Copy, Debug)]
pub struct Page {
    pub page: u32,
    pub size: u32,
}

impl Page {
    pub const DEFAULT_SIZE: u32 = 20;

    pub fn new(page: Option<u32>, size: Option<u32>, max: u32) -> Result<Page, ApiError> {
        let page = page.unwrap_or(1);
        let size = size.unwrap_or(Self::DEFAULT_SIZE.min(max));
        if page == 0 {
            return Err(ApiError::bad_request("invalid_page", "page starts at 1"));
        }
        if size == 0 || size > max {
            return Err(ApiError::bad_request(
                "invalid_page_size",
                format!("page_size must be between 1 and {max}"),
            ));
        }
        Ok(Page { page, size })
    }

    pub fn limit(&self) -> i64 {
        i64::from(self.size)
    }

    pub fn offset(&self) -> i64 {
        i64::from(self.page - 1) * i64::from(self.size)
    }
}

/// A page of results.
#[derive(Debug, Serialize, schemars::JsonSchema)]
#[schemars(rename = "PageOf{T}")]
pub struct Paged<T> {
    pub count: i64,
    pub page: u32,
    pub page_size: u32,
    pub results: Vec<T>,
}

/// Formats unix milliseconds as RFC 3339.
pub fn ts(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

pub fn opt_ts(ms: Option<i64>) -> Option<String> {
    ms.map(ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip() {
        for t in Tone::ALL {
            assert_eq!(t.as_str().parse::<Tone>().unwrap(), *t);
        }
        assert!("loud".parse::<Tone>().is_err());
    }

    #[test]
    fn cents_and_currency() {
        assert!(Cents::new(-1).is_err());
        assert!(Cents::new(Cents::MAX + 1).is_err());
        assert!(Cents::new(0).unwrap().is_free());
        assert_eq!(Currency::new("USD").unwrap().as_str(), "usd");
        assert!(Currency::new("us").is_err());
        assert!(Currency::new("u$d").is_err());
    }

    #[test]
    fn paging_bounds() {
        assert!(Page::new(Some(0), None, 100).is_err());
        assert!(Page::new(None, Some(101), 100).is_err());
        let p = Page::new(Some(3), Some(10), 100).unwrap();
        assert_eq!((p.limit(), p.offset()), (10, 20));
        // The largest page still has an exact offset (u32 * u32 fits in i64).
        let last = Page::new(Some(u32::MAX), Some(1000), 1000).unwrap();
        assert_eq!(last.offset(), (i64::from(u32::MAX) - 1) * 1000);
    }

    #[test]
    fn text_fields() {
        assert_eq!(text_field("name", "  Bot ", 1, 10).unwrap(), "Bot");
        assert!(text_field("name", "", 1, 10).is_err());
        assert!(text_field("name", "a\u{0}b", 1, 10).is_err());
        assert!(text_field("name", &"x".repeat(11), 1, 10).is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(ts(0), "1970-01-01T00:00:00Z");
    }
}
