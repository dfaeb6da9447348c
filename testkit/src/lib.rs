//! What Agora's test suites share: a fresh Postgres database for each test,
//! and [`eventually`] for conditions reached asynchronously (instead of sleeps
//! that a slow machine breaks).

use std::future::Future;
use std::time::{Duration, Instant};

use sqlx::any::AnyPoolOptions;

/// Where the test Postgres server is (`TEST_PG_ADMIN_URL`, else the local
/// `postgres` superuser); the test command starts it. A missing server fails
/// the suite loudly.
pub fn pg_admin_url() -> String {
    std::env::var("TEST_PG_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A Postgres database of one test's own, named `agora_t_<uuid>`. [`drop`]
/// removes it; a test that fails leaves its database for the test command to
/// sweep.
///
/// [`drop`]: TestDatabase::drop
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

async fn admin() -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    AnyPoolOptions::new()
        .max_connections(1)
        .connect(&pg_admin_url())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "Postgres is required for the test suite and was not reachable at {}: {e}",
                pg_admin_url()
            )
        })
}

impl TestDatabase {
    /// Creates the database.
    pub async fn create() -> TestDatabase {
        let name = format!("agora_t_{}", uuid::Uuid::new_v4().simple());
        let admin = admin().await;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("create the test database");
        admin.close().await;
        let base = pg_admin_url();
        let url = match base.rfind('/') {
            Some(i) if i > "postgres://".len() => format!("{}/{name}", &base[..i]),
            _ => panic!("TEST_PG_ADMIN_URL must name a database"),
        };
        TestDatabase { name, url }
    }

    /// Drops the database, closing its connections.
    pub async fn drop(self) {
        let admin = admin().await;
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&admin)
        .await;
        admin.close().await;
    }
}

/// Polls `check` until it yields a value, for up to 10 s, and fails the test
/// naming `what` if it never does.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(Duration::from_secs(10), what, check).await
}

/// [`eventually`], for up to `limit` (a ClickHouse outage, say, takes longer to show).
pub async fn eventually_within<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
