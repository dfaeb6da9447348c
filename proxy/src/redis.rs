//! A small Redis client: one connection, one command at a time, RESP2 replies,
//! every read and write under a deadline. It is what the shared limits need
//! ([`crate::global`]): `EVALSHA`/`EVAL` of one script, `AUTH`, `SELECT`.
//!
//! Replies are bounded (an array of at most [`MAX_ARRAY`] items, a string of at
//! most [`MAX_BULK`] bytes, nesting at most [`MAX_DEPTH`]), so a misbehaving
//! server cannot make the gateway allocate without limit.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

const MAX_ARRAY: usize = 1 << 20;
const MAX_BULK: usize = 16 << 20;
const MAX_DEPTH: usize = 4;

/// Where a Redis is and how to log in, from `redis://[[user]:password@]host[:port][/db]`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "redis://{}:{}/{}", self.host, self.port, self.db)
    }
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        let rest = url
            .strip_prefix("redis://")
            .ok_or("a Redis URL starts with redis://")?;
        let (auth, rest) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let (user, password) = match auth {
            None => (None, None),
            Some(auth) => match auth.split_once(':') {
                Some((user, password)) => (
                    (!user.is_empty()).then(|| user.to_owned()),
                    Some(password.to_owned()),
                ),
                None => (None, Some(auth.to_owned())),
            },
        };
        let (hostport, db) = match rest.split_once('/') {
            Some((hp, "")) => (hp, 0),
            Some((hp, db)) => (hp, db.parse().map_err(|_| "the database is a number")?),
            None => (rest, 0),
        };
        let (host, port) = match hostport.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or("an IPv6 host without its ]")?;
                match after.strip_prefix(':') {
                    Some(port) => (host, port),
                    None if after.is_empty() => (host, "6379"),
                    None => return Err("something after the host that is not a port".into()),
                }
            }
            None => hostport.rsplit_once(':').unwrap_or((hostport, "6379")),
        };
        let port: u16 = port
            .parse()
            .map_err(|_| "the port is a number up to 65535")?;
        if host.is_empty() {
            return Err("a Redis URL names a host".into());
        }
        Ok(RedisUrl {
            host: host.to_owned(),
            port,
            user,
            password,
            db,
        })
    }
}

/// One reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Nil,
    Int(i64),
    Bulk(Vec<u8>),
    Status(String),
    Error(String),
    Array(Vec<Reply>),
}

/// Why a call failed: the connection (then it is dropped) or the server's answer.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("Redis connection: {0}")]
    Io(#[from] io::Error),
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis answered something that is not RESP: {0}")]
    Protocol(&'static str),
    #[error("Redis refused: {0}")]
    Server(String),
}

pub struct Connection {
    stream: BufStream<TcpStream>,
    timeout: Duration,
}

impl Connection {
    /// Connects, logs in and selects the database, each step within `timeout`.
    pub async fn open(url: &RedisUrl, timeout: Duration) -> Result<Connection, RedisError> {
        let stream =
            tokio::time::timeout(timeout, TcpStream::connect((url.host.as_str(), url.port)))
                .await
                .map_err(|_| RedisError::Timeout(timeout))??;
        stream.set_nodelay(true)?;
        let mut conn = Connection {
            stream: BufStream::new(stream),
            timeout,
        };
        if let Some(password) = &url.password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &url.user {
                args.push(user.as_bytes());
            }
            args.push(password.as_bytes());
            conn.call(&args).await?;
        }
        if url.db != 0 {
            let db = url.db.to_string();
            conn.call(&[b"SELECT", db.as_bytes()]).await?;
        }
        Ok(conn)
    }

    /// Sends one command and reads its reply; a server error is `Err(Server)`.
    pub async fn call(&mut self, args: &[&[u8]]) -> Result<Reply, RedisError> {
        let timeout = self.timeout;
        let reply = tokio::time::timeout(timeout, async {
            let mut out = Vec::with_capacity(64 + args.iter().map(|a| a.len() + 16).sum::<usize>());
            encode(&mut out, args);
            self.stream.write_all(&out).await?;
            self.stream.flush().await?;
            read_reply(&mut self.stream, 0).await
        })
        .await
        .map_err(|_| RedisError::Timeout(timeout))??;
        match reply {
            Reply::Error(message) => Err(RedisError::Server(message)),
            reply => Ok(reply),
        }
    }
}

/// A command as a RESP array of bulk strings.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    use std::io::Write;
    let _ = write!(out, "*{}\r\n", args.len());
    for arg in args {
        let _ = write!(out, "${}\r\n", arg.len());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

async fn read_line<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<Vec<u8>, RedisError> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(64 * 1024)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Err(RedisError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    if !line.ends_with(b"\r\n") {
        return Err(RedisError::Protocol("a line without CRLF"));
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn number(bytes: &[u8]) -> Result<i64, RedisError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(RedisError::Protocol(
            "a length or integer that is not a number",
        ))
}

/// Reads one reply (boxed: arrays nest).
fn read_reply<'a, R: AsyncBufReadExt + Unpin + Send>(
    r: &'a mut R,
    depth: usize,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, RedisError>> + Send + 'a>> {
    Box::pin(async move {
        let line = read_line(r).await?;
        let (&kind, rest) = line
            .split_first()
            .ok_or(RedisError::Protocol("an empty line"))?;
        match kind {
            b'+' => Ok(Reply::Status(String::from_utf8_lossy(rest).into_owned())),
            b'-' => Ok(Reply::Error(String::from_utf8_lossy(rest).into_owned())),
            b':' => Ok(Reply::Int(number(rest)?)),
            b'$' => {
                let len = number(rest)?;
                if len < 0 {
                    return Ok(Reply::Nil);
                }
                let len = len as usize;
                if len > MAX_BULK {
                    return Err(RedisError::Protocol("a string over the size limit"));
                }
                let mut data = vec![0; len + 2];
                r.read_exact(&mut data).await?;
                if !data.ends_with(b"\r\n") {
                    return Err(RedisError::Protocol("a string without CRLF"));
                }
                data.truncate(len);
                Ok(Reply::Bulk(data))
            }
            b'*' => {
                let len = number(rest)?;
                if len < 0 {
                    return Ok(Reply::Nil);
                }
                let len = len as usize;
                if len > MAX_ARRAY || depth >= MAX_DEPTH {
                    return Err(RedisError::Protocol(
                        "an array over the size or depth limit",
                    ));
                }
                let mut items = Vec::with_capacity(len.min(1024));
                for _ in 0..len {
                    items.push(read_reply(r, depth + 1).await?);
                }
                Ok(Reply::Array(items))
            }
            _ => Err(RedisError::Protocol("an unknown reply type")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> Result<Reply, RedisError> {
        let mut r = tokio::io::BufReader::new(bytes);
        read_reply(&mut r, 0).await
    }

    #[tokio::test]
    async fn replies_of_every_kind_parse_and_bad_ones_are_refused() {
        assert_eq!(parse(b"+OK\r\n").await.unwrap(), Reply::Status("OK".into()));
        assert_eq!(parse(b":-42\r\n").await.unwrap(), Reply::Int(-42));
        assert_eq!(parse(b"$-1\r\n").await.unwrap(), Reply::Nil);
        assert_eq!(
            parse(b"*2\r\n$3\r\nabc\r\n*1\r\n:1\r\n").await.unwrap(),
            Reply::Array(vec![
                Reply::Bulk(b"abc".to_vec()),
                Reply::Array(vec![Reply::Int(1)])
            ])
        );
        assert_eq!(
            parse(b"-NOSCRIPT x\r\n").await.unwrap(),
            Reply::Error("NOSCRIPT x".into())
        );
        for bad in [
            &b"?x\r\n"[..],
            b":12a\r\n",
            b"$3\r\nabcd\r\n",
            b"+OK\n",
            b"$99999999999\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
            b"*3\r\n:1\r\n",
        ] {
            assert!(
                parse(bad).await.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&mut out, &[b"GET", b"k\r\n"]);
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$3\r\nk\r\n\r\n");
    }

    #[test]
    fn urls_name_host_port_login_and_database() {
        let u = RedisUrl::parse("redis://127.0.0.1:6390/2").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("127.0.0.1", 6390, 2));
        assert_eq!(u.password, None);
        let u = RedisUrl::parse("redis://:s3cret@redis").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("redis", 6379));
        assert_eq!((u.user, u.password.as_deref()), (None, Some("s3cret")));
        let u = RedisUrl::parse("redis://agora:pw@[::1]:7000/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 7000));
        assert_eq!(u.user.as_deref(), Some("agora"));
        assert!(
            !format!("{u:?}").contains("pw"),
            "the password is never printed"
        );
        for bad in ["http://x", "redis://", "redis://h:port", "redis://h/x"] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
