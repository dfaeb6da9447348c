//! A private ClickHouse server in a directory of its own, on ports the OS picks:
//! what the tests and the benchmarks run against, and what can be stopped and
//! started again to play an outage.
//!
//! The binary is `AGORA_CLICKHOUSE_SERVER` when set, else `clickhouse-server` (as
//! Debian's `clickhouse-server` package installs it) or `clickhouse` (current
//! releases' single binary, run as `clickhouse server`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

pub struct LocalClickHouse {
    binary: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    pub http_port: u16,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Finds the server binary, or says plainly how to get one.
pub fn find_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("AGORA_CLICKHOUSE_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    let mut candidates: Vec<PathBuf> = std::env::split_paths(&dirs).collect();
    candidates.extend(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from));
    for name in ["clickhouse-server", "clickhouse"] {
        for dir in &candidates {
            let path = dir.join(name);
            if path.is_file() {
                return Ok(path);
            }
        }
    }
    anyhow::bail!(
        "no ClickHouse server binary found: install Debian's clickhouse-server package \
         (scripts/test.sh does) or set AGORA_CLICKHOUSE_SERVER"
    )
}

impl LocalClickHouse {
    /// Starts a server keeping its data under `dir`.
    pub fn start(dir: &Path) -> anyhow::Result<LocalClickHouse> {
        let binary = find_binary()?;
        let http_port = free_port()?;
        let tcp_port = free_port()?;
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let config = format!(
            r#"<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/server.err.log</errorlog></logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <user_files_path>{d}/user_files/</user_files_path>
  <format_schema_path>{d}/format_schemas/</format_schema_path>
  <mark_cache_size>268435456</mark_cache_size>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
</yandex>
"#,
            d = dir.display()
        );
        let users = r#"<?xml version="1.0"?>
<yandex>
  <profiles><default></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
"#;
        std::fs::write(dir.join("config.xml"), config)?;
        std::fs::write(dir.join("users.xml"), users)?;
        let mut server = LocalClickHouse {
            binary,
            dir,
            child: None,
            http_port,
        };
        server.resume()?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Starts the server again (same data, same ports) and waits until it answers.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "the server is running");
        let config = format!("--config-file={}", self.dir.join("config.xml").display());
        let mut command = Command::new(&self.binary);
        if self.binary.file_name().is_some_and(|n| n == "clickhouse") {
            command.arg("server");
        }
        let child = command
            .arg(config)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if self.answers() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                anyhow::bail!(
                    "ClickHouse exited at start ({status}); see {}",
                    self.dir.join("server.err.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!(
            "ClickHouse did not answer on port {} within 30 s",
            self.http_port
        )
    }

    /// Whether `/ping` answers.
    pub fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.http_port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if stream
            .write_all(b"GET /ping HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.") && answer.contains(" 200 ")
    }

    /// Stops the server (SIGTERM, then SIGKILL after 10 s) and waits for it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for LocalClickHouse {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
