//! HTTP handlers, one module per feature. Every object query is scoped to the
//! caller's organisations: an object of another tenant is indistinguishable
//! from one that does not exist (404).

pub mod agents;
pub mod auth;
pub mod configs;
pub mod documents;
pub mod keys;
pub mod marketplace;
pub mod orgs;

use serde::Deserialize;
use sqlx::any::AnyRow;

use crate::db::Db;
use crate::domain::{Page, Paged};
use crate::error::ApiResult;

/// `… IN (MEMBER_ORGS)` with the caller's user uuid bound at `$N`.
pub fn member_orgs(n: usize) -> String {
    format!("SELECT org_uuid FROM memberships WHERE user_uuid = ${n}")
}

/// A bind value for dynamically built queries.
#[derive(Clone, Debug)]
pub enum Arg {
    Text(String),
    Int(i64),
}

impl From<String> for Arg {
    fn from(s: String) -> Arg {
        Arg::Text(s)
    }
}

impl From<&str> for Arg {
    fn from(s: &str) -> Arg {
        Arg::Text(s.to_owned())
    }
}

impl From<uuid::Uuid> for Arg {
    fn from(u: uuid::Uuid) -> Arg {
        Arg::Text(u.to_string())
    }
}

pub(crate) fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    args: &'q [Arg],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for a in args {
        q = match a {
            Arg::Text(s) => q.bind(s.as_str()),
            Arg::Int(i) => q.bind(*i),
        };
    }
    q
}

/// Plain paging parameters; anything else in the query string is a 400.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub page: Option<u32>,
    pub page_size: Option<u32>,
}

/// Runs `SELECT {select} {from_where} ORDER BY {order}` for one page, with the
/// total count, mapping each row.
pub async fn fetch_page<T>(
    db: &Db,
    select: &str,
    from_where: &str,
    order: &str,
    args: Vec<Arg>,
    page: Page,
    map: impl Fn(&AnyRow) -> ApiResult<T>,
) -> ApiResult<Paged<T>> {
    let count_sql = format!("SELECT COUNT(*) AS n {from_where}");
    let count: i64 = sqlx::Row::try_get(
        &bind_all(sqlx::query(&count_sql), &args)
            .fetch_one(&db.pool)
            .await?,
        "n",
    )?;
    let n = args.len();
    let list_sql = format!(
        "SELECT {select} {from_where} ORDER BY {order} LIMIT ${} OFFSET ${}",
        n + 1,
        n + 2
    );
    let mut all = args;
    all.push(Arg::Int(page.limit()));
    all.push(Arg::Int(page.offset()));
    let rows = bind_all(sqlx::query(&list_sql), &all)
        .fetch_all(&db.pool)
        .await?;
    Ok(Paged {
        count,
        page: page.page,
        page_size: page.size,
        results: rows.iter().map(map).collect::<ApiResult<Vec<T>>>()?,
    })
}

/// Escapes `%`, `_` and `\` for a `LIKE … ESCAPE '\'` pattern.
pub fn like_pattern(term: &str) -> String {
    let mut out = String::with_capacity(term.len() + 2);
    out.push('%');
    for c in term.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(super::like_pattern("A_b%"), "%a\\_b\\%%");
    }
}
