//! The runtime client against Langflow's captured bytes: a socket server
//! replays what a real Langflow 1.13 answered, and the client must read it as
//! Langflow meant it. Runs when the shared captures are beside the checkout.

use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::runtime_client;

fn capture(name: &str) -> Option<Vec<u8>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/langflow-wire/raw")
        .join(name);
    match std::fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(_) => {
            eprintln!(
                "shared captures not found at {}; Langflow wire cases not run",
                path.display()
            );
            None
        }
    }
}

/// Serves one connection: reads a whole request, answers with `reply` verbatim.
/// Returns the address and a handle yielding the request bytes.
async fn replay(reply: Vec<u8>) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = sock.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
            if let Some(end) = find(&request, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if request.len() >= end + 4 + len {
                    break;
                }
            }
        }
        sock.write_all(&reply).await.unwrap();
        sock.shutdown().await.ok();
        request
    });
    (format!("http://{addr}"), handle)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn body_json(bytes: &[u8]) -> serde_json::Value {
    let start = find(bytes, b"\r\n\r\n").unwrap() + 4;
    serde_json::from_slice(&bytes[start..]).unwrap()
}

#[tokio::test]
async fn provisioning_reads_captured_flow_creation() {
    let (Some(reply), Some(sent)) = (
        capture("002_flow_create.s2c.bin"),
        capture("002_flow_create.c2s.bin"),
    ) else {
        return;
    };
    let captured_id = body_json(&reply)["id"].as_str().unwrap().to_owned();
    let flow = body_json(&sent);
    let (url, request) = replay(reply).await;
    let id = runtime_client(&url, "sk-test")
        .provision(&flow, "Echo (agent)")
        .await
        .unwrap();
    assert_eq!(id, captured_id);
    let request = request.await.unwrap();
    let head =
        String::from_utf8_lossy(&request[..find(&request, b"\r\n\r\n").unwrap()]).to_string();
    assert!(
        head.starts_with("POST /api/v1/flows/ HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\nx-api-key: sk-test\r\n"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let body = body_json(&request);
    assert_eq!(
        body["data"]["nodes"], flow["data"]["nodes"],
        "the flow graph is sent as exported"
    );
    assert_eq!(body["name"], "Echo (agent)");
}

#[tokio::test]
async fn provisioning_maps_captured_key_refusal() {
    let Some(reply) = capture("011_d2_invalid_api_key.s2c.bin") else {
        return;
    };
    let (url, _request) = replay(reply).await;
    let err = runtime_client(&url, "wrong")
        .provision(
            &serde_json::json!({"data": {"nodes": [], "edges": []}}),
            "x",
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "runtime_unauthorized", "{err}");
}

#[tokio::test]
async fn provisioning_reports_runtime_detail() {
    let Some(reply) = capture("013_d4_unknown_flow_name.s2c.bin") else {
        return;
    };
    let (url, _request) = replay(reply).await;
    let err = runtime_client(&url, "k")
        .provision(
            &serde_json::json!({"data": {"nodes": [], "edges": []}}),
            "x",
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "runtime_rejected");
    assert!(err.to_string().contains("not found"), "{err}");
}
