//! HTTP handlers, one module per feature. Every object query is scoped to the
//! caller's organisations: an object of another tenant is indistinguishable
//! from one that does not exist (404).

pub mod agents;
pub mod auth;
pub mod billing;
pub mod configs;
pub mod documents;
pub mod keys;
pub mod marketplace;
pub mod orgs;
pub mod usage;
pub mod widget;

use serde::Deserialize;
use sqlx::any::AnyRow;

use uuid::Uuid;

use crate::db::Db;
use crate::domain::{Page, Paged};
use crate::error::{ApiError, ApiResult};
use crate::extract::Caller;

/// `… IN (MEMBER_ORGS)` with the caller's user uuid bound at `$N`.
fn member_orgs(n: usize) -> String {
    format!("SELECT org_uuid FROM memberships WHERE user_uuid = ${n}")
}

/// One kind of tenant-owned object, and the only way routes read them: every
/// read is limited to the caller's organisations, so another tenant's object
/// is a 404 like one that does not exist.
pub struct Owned {
    /// Columns to select.
    pub select: &'static str,
    /// `FROM …` with any joins.
    pub from: &'static str,
    /// The id column, e.g. `c.uuid`.
    pub id: &'static str,
    /// The owning organisation's column, e.g. `c.org_uuid`.
    pub org: &'static str,
    /// What a 404 calls it.
    pub what: &'static str,
}

impl Owned {
    /// The caller's object `uuid`, or 404.
    pub async fn one(&self, db: &Db, caller: &Caller, uuid: Uuid) -> ApiResult<AnyRow> {
        let sql = format!(
            "SELECT {} {} WHERE {} = $1 AND {} IN ({})",
            self.select,
            self.from,
            self.id,
            self.org,
            member_orgs(2)
        );
        sqlx::query(&sql)
            .bind(uuid.to_string())
            .bind(caller.user.to_string())
            .fetch_optional(&db.pool)
            .await?
            .ok_or(ApiError::not_found(self.what))
    }

    /// A page of the caller's objects. `filter` is more SQL for the WHERE
    /// clause, with its arguments numbered from `$2`.
    pub async fn page<T>(
        &self,
        db: &Db,
        caller: &Caller,
        page: Page,
        filter: (&str, Vec<Arg>),
        order: &str,
        map: impl Fn(&AnyRow) -> ApiResult<T>,
    ) -> ApiResult<Paged<T>> {
        let from_where = format!(
            "{} WHERE {} IN ({}){}",
            self.from,
            self.org,
            member_orgs(1),
            filter.0
        );
        let mut args = vec![Arg::from(caller.user)];
        args.extend(filter.1);
        fetch_page(db, self.select, &from_where, order, args, page, map).await
    }
}

/// No extra filter for [`Owned::page`].
pub const ALL: (&str, Vec<Arg>) = ("", Vec::new());

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
