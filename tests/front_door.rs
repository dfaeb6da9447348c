//! One front door: the gateway's address serves the whole API, passing every
//! `/api/*` path it does not serve itself to the control plane, bodies streamed
//! both ways, limits kept, `X-Forwarded-For` added, answers unchanged.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_the_control_planes_api_unchanged() {
    let w = World::start(Duration::from_millis(1)).await;
    let token = format!("Token {}", w.info.buyer_token);
    for path in [
        "/api/marketplace-public-offerings/?page_size=2",
        "/api/customer-agent-configs/",
        "/api/marketplace-orders/00000000-0000-0000-0000-000000000000/",
        "/api/openapi.json",
    ] {
        let direct = w
            .http
            .get(format!("{}{path}", w.cp_url))
            .header("authorization", &token)
            .send()
            .await
            .unwrap();
        let front = w
            .http
            .get(format!("{}{path}", w.proxy_url))
            .header("authorization", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(front.status(), direct.status(), "{path}");
        assert_eq!(
            front.headers().get("content-type"),
            direct.headers().get("content-type"),
            "{path}"
        );
        let (front, direct): (Value, Value) =
            (front.json().await.unwrap(), direct.json().await.unwrap());
        assert_eq!(front, direct, "{path}");
    }
    // A body goes through, chunked by the client; the gateway's own routes stay its own.
    let body = futures_util::stream::iter(
        ["# Returns\n", "Within 30 days.\n"]
            .map(|s| Ok::<_, std::io::Error>(s.as_bytes().to_vec())),
    );
    let r = w
        .http
        .post(format!(
            "{}/api/training-documents/?filename=returns.md",
            w.proxy_url
        ))
        .header("authorization", &token)
        .header("content-type", "text/markdown")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let doc: Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{doc}");
    assert_eq!(doc["size_bytes"], 26, "{doc}");
    let r = w
        .http
        .get(format!("{}/api/agent-gateway/health/", w.proxy_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The control plane's limit holds at the door, with the gateway's error shape,
    // before any of the body is sent.
    let too_big = w.settings.control_plane.max_body_bytes + 1;
    let mut raw = tokio::net::TcpStream::connect(w.proxy().addr)
        .await
        .unwrap();
    raw.write_all(
        format!(
            "POST /api/training-documents/?filename=big.txt HTTP/1.1\r\nhost: a\r\n\
             authorization: {token}\r\ncontent-length: {too_big}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.contains("\"code\":\"body_too_large\""), "{answer}");
    // Passed-on calls are counted as such, and are no metered use.
    let m = w.metrics().await;
    assert!(m.contains(r#"route="control_plane""#), "{m}");
    w.finish().await;
}

/// A control plane that records what reaches it and answers once it has the
/// whole body, slowly, in pieces.
async fn recording_control_plane() -> (String, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    let _ = tx.send(seen.clone()).await;
                    if seen.ends_with(b"0\r\n\r\n") {
                        break;
                    }
                }
                let _ = socket
                    .write_all(b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                for part in [
                    "5\r\n{\"ok\"\r\n",
                    "5\r\n:true\r\n",
                    "1\r\n}\r\n",
                    "0\r\n\r\n",
                ] {
                    let _ = socket.write_all(part.as_bytes()).await;
                    let _ = socket.flush().await;
                }
            });
        }
    });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_through_the_door_with_the_clients_address() {
    let (cp_url, mut seen) = recording_control_plane().await;
    let dir = tempfile::tempdir().unwrap();
    let config = proxy_config(dir.path(), &cp_url, "unused");
    let metering =
        agora_proxy::Metering::Sink(std::sync::Arc::new(agora_proxy::usage::LogSink::default()));
    let proxy = tokio::task::spawn_blocking(move || agora_proxy::start(config, metering).unwrap())
        .await
        .unwrap();
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"POST /api/training-documents/?filename=a.txt HTTP/1.1\r\nhost: agora.test\r\nx-forwarded-for: 203.0.113.7\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .unwrap();
    // The head and the first chunk reach the control plane before the body ends.
    let first = loop {
        let got = seen.recv().await.expect("the control plane was reached");
        if String::from_utf8_lossy(&got).contains("hello") {
            break got;
        }
    };
    let first = String::from_utf8_lossy(&first).into_owned();
    assert!(
        first.starts_with("POST /api/training-documents/?filename=a.txt HTTP/1.1\r\n"),
        "{first}"
    );
    let lower = first.to_ascii_lowercase();
    assert!(
        lower.contains("x-forwarded-for: 203.0.113.7, 127.0.0.1\r\n"),
        "{first}"
    );
    assert!(
        lower.contains("x-forwarded-host: agora.test\r\n"),
        "{first}"
    );
    assert!(lower.contains("host: agora.test\r\n"), "{first}");
    client.write_all(b"6\r\n world\r\n0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.ends_with(b"0\r\n\r\n") {
        let n = client.read(&mut buf).await.unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8(answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 201 Created\r\n"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\n") && answer.contains("{\"ok\"") && answer.contains(":true"),
        "{answer}"
    );
    tokio::task::spawn_blocking(move || proxy.shutdown())
        .await
        .unwrap();
}
