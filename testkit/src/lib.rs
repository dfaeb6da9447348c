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

/// A private Redis server on a port of its own, keeping nothing on disk: what
/// the shared-limit tests run against, and what they stop and start again to
/// play an outage. The binary is `AGORA_REDIS_SERVER` when set, else
/// `redis-server` (Debian's `redis-server` package; `scripts/test.sh` installs it).
pub struct LocalRedis {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl LocalRedis {
    pub fn start() -> LocalRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut redis = LocalRedis { port, child: None };
        redis.resume();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL): everything it held is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty, and waits until it answers.
    pub fn resume(&mut self) {
        let binary = std::env::var("AGORA_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = std::process::Command::new(&binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{binary} could not start ({e}): install Debian's redis-server or set AGORA_REDIS_SERVER")
            });
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            use std::io::{Read, Write};
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && &buf == b"+PONG\r\n"
                {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not answer on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
