//! Writes the seed corpus under `corpus/` (run on purpose:
//! `cargo test -p agora-fuzz --test seeds -- --ignored`). The seeds are small,
//! valid inputs of each kind, which the fuzzers mutate.

use std::path::Path;

use agora_config::keys::{Claims, KeyKind, Scope};
use uuid::Uuid;

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

#[test]
#[ignore = "writes the seed corpus"]
fn write_the_seed_corpus() {
    let requests: &[(&str, &[u8])] = &[
        ("get", b"GET /api/agent-gateway/health/ HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("get-1.0", b"GET /x?y=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
        (
            "post-length",
            b"POST /api/agent-gateway/invoke/ HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer k\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{\"input_value\":\"hi\"}",
        ),
        (
            "post-chunked",
            b"POST /api/agent-gateway/invoke/?stream=true HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n5;x=y\r\n{\"inp\r\nf\r\nut_value\":\"hi\"}\r\n0\r\nTrailer: 1\r\n\r\n",
        ),
        (
            "pipelined",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        ),
    ];
    for (name, data) in requests {
        write("h1_request", name, data);
    }
    write(
        "h1_chunked",
        "two-chunks",
        b"\x035\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n",
    );
    write(
        "h1_chunked",
        "trailers",
        b"\x01a\r\n0123456789\r\n0\r\nx-a: 1\r\nx-b: 2\r\n\r\n",
    );
    write(
        "h1_chunked",
        "spaces",
        b"\x1003 \t; a=\"b\"\r\nabc\r\n0\r\n\r\n",
    );

    let key = agora_fuzz::signing_key();
    let claims = |kind: KeyKind, exp: Option<i64>| Claims {
        jti: Uuid::from_u128(1),
        cfg: Uuid::from_u128(2),
        ten: Uuid::from_u128(3),
        prj: Some(Uuid::from_u128(4)),
        scp: vec![Scope::Invoke],
        iat: agora_fuzz::NOW_UNIX - 60,
        nbf: None,
        exp,
        mode: kind.mode(),
    };
    for (name, kind, exp) in [
        ("secret-live", KeyKind::SecretLive, None),
        (
            "secret-test",
            KeyKind::SecretTest,
            Some(agora_fuzz::NOW_UNIX + 3600),
        ),
        ("publishable", KeyKind::PublishableLive, None),
        (
            "expired",
            KeyKind::SecretLive,
            Some(agora_fuzz::NOW_UNIX - 1),
        ),
    ] {
        let issued = key.issue(kind, &claims(kind, exp)).unwrap();
        write("api_key", name, issued.expose_secret().as_bytes());
    }
    write("api_key", "garbage", b"ar_sk_live_a.b.c");

    let flows = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/flows");
    for name in ["faq-echo.json", "memory-chat.json"] {
        write(
            "flow_import",
            name,
            &std::fs::read(flows.join(name)).unwrap(),
        );
    }
    write(
        "flow_import",
        "minimal.json",
        br#"{"name":"m","data":{"nodes":[{"id":"ChatInput-a","data":{"type":"ChatInput","node":{"template":{"input_value":{"type":"str","value":"","show":true}}}}},{"id":"ChatOutput-b","data":{"type":"ChatOutput","node":{"template":{}}}}],"edges":[{"source":"ChatInput-a","target":"ChatOutput-b"}]}}"#,
    );

    write(
        "snapshot_delta",
        "empty-move",
        br#"{"from_revision":5,"to_revision":6,"generated_at_ms":1}"#,
    );
    write(
        "snapshot_delta",
        "plans",
        br#"{"from_revision":5,"to_revision":7,"generated_at_ms":2,"upsert_plans":{"00000000-0000-0000-0000-000000000001":{"plan":"00000000-0000-0000-0000-000000000001","requests_per_minute":60,"burst":10,"max_concurrency":2,"request_quota":1000,"token_quota":null,"interval":"month"}},"remove_plans":["00000000-0000-0000-0000-000000000002"]}"#,
    );
    write(
        "snapshot_delta",
        "stale",
        br#"{"from_revision":4,"to_revision":6,"generated_at_ms":1}"#,
    );

    // A header alone (signing the default body), or a header, a newline and the body.
    let now = agora_fuzz::NOW_UNIX;
    let default_body = agora_fuzz::WEBHOOK_BODY;
    let v1 = |t: i64| agora_fuzz::webhook_v1(t, default_body);
    let signed = |t: i64| format!("t={t},v1={}", v1(t));
    let body = br#"{"id":"evt_1","object":"event","type":"customer.subscription.updated","data":{"object":{"id":"sub_1"}}}"#;
    let with_body = |header: String| [header.as_bytes(), b"\n", body].concat();
    let zeros = "0".repeat(64);
    let signatures: Vec<(&str, Vec<u8>)> = vec![
        ("valid", signed(now).into_bytes()),
        (
            "valid-with-body",
            with_body(format!("t={now},v1={}", agora_fuzz::webhook_v1(now, body))),
        ),
        (
            "several-v1",
            format!("t={now},v1={zeros},v0=abc,v1={}", v1(now)).into_bytes(),
        ),
        // While a secret is rolled: the first v1 is another secret's.
        (
            "rotated-secret",
            format!(
                "t={now},v1={},v1={}",
                agora_fuzz::webhook_v1(now, b"signed with another secret"),
                v1(now)
            )
            .into_bytes(),
        ),
        (
            "spaced-upper-hex",
            format!(" t={now} , v1={} ", v1(now).to_uppercase()).into_bytes(),
        ),
        ("stale-t", signed(now - 301).into_bytes()),
        ("future-t", signed(now + 301).into_bytes()),
        (
            "two-t",
            format!("t={now},t={now},v1={}", v1(now)).into_bytes(),
        ),
        // Signed for the default body, sent with another.
        ("other-body", with_body(signed(now))),
        ("garbage", b"garbage,=,t=,v1=zz\xff".to_vec()),
    ];
    for (name, data) in &signatures {
        write("stripe_signature", name, data);
    }
}
