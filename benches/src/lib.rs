//! What the benchmarks share: a snapshot holding one key and one route, and a tiny
//! upstream that answers runs the way Langflow does (non-stream, with usage).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use agora_config::keys::{Claims, KeyKind, Mode, Scope, SigningKey};
use agora_config::snapshot::{
    AgentRoute, BillingInterval, KeyEntry, KeyStatus, PlanLimits, QuotaUsage, Snapshot,
};
use uuid::Uuid;

/// The flow id the fixture routes to.
pub const FLOW_ID: &str = "bench-flow";

/// What the upstream answers: a Langflow run result carrying `properties.usage`.
pub const RUN_RESPONSE: &str = r#"{"session_id":"bench","outputs":[{"inputs":{"input_value":"hi"},"outputs":[{"results":{"message":{"text":"hello there","sender":"Machine","properties":{"usage":{"input_tokens":5,"output_tokens":7,"total_tokens":12}}}},"artifacts":{},"outputs":{},"logs":{},"messages":[]}]}]}"#;

/// The config the fixture's key calls.
pub const CONFIG: Uuid = Uuid::from_u128(2);

/// A metered invoke's usage event of `config` at `time_ms`, as the gateway makes
/// them (`i` varies the latency).
pub fn usage_event(config: Uuid, time_ms: i64, i: u64) -> agora_config::usage::UsageEvent {
    use agora_config::usage::{TokenSource, UsageEvent, UsageStatus};
    UsageEvent {
        event_id: Uuid::now_v7(),
        time_ms,
        tenant: Some(Uuid::from_u128(7)),
        config: Some(config),
        key_id: Some(Uuid::from_u128(9)),
        agent: Some(Uuid::from_u128(11)),
        route: agora_usage::METERED_ROUTE.into(),
        status: UsageStatus::Ok,
        http_status: 200,
        latency_us: 1000 + i % 500,
        upstream_latency_us: Some(900),
        bytes_in: 120,
        bytes_out: 420,
        input_tokens: Some(5),
        output_tokens: Some(7),
        token_source: TokenSource::Runtime,
    }
}

/// A snapshot with one active key on a generous plan, routed to `upstream`.
/// Returns the snapshot and the key string.
pub fn fixture(upstream: &str) -> (Snapshot, String) {
    let signer = SigningKey::generate("bench-kid");
    let key_id = Uuid::from_u128(1);
    let config = CONFIG;
    let tenant = Uuid::from_u128(3);
    let plan = Uuid::from_u128(4);
    let claims = Claims {
        jti: key_id,
        cfg: config,
        ten: tenant,
        prj: None,
        scp: vec![Scope::Invoke],
        iat: 1_700_000_000,
        nbf: None,
        exp: None,
        mode: Mode::Live,
    };
    let key = signer.issue(KeyKind::SecretLive, &claims).expect("issue");
    let mut snapshot = Snapshot::empty();
    snapshot.revision = 1;
    snapshot.verification_keys = vec![signer.verification_key()];
    snapshot.keys.insert(
        key.hash(),
        KeyEntry {
            key_id,
            kind: KeyKind::SecretLive,
            config,
            tenant,
            project: None,
            scopes: vec![Scope::Invoke],
            status: KeyStatus::Active,
            plan: Some(plan),
            mode: Mode::Live,
            expires_at: None,
        },
    );
    snapshot.plans.insert(
        plan,
        PlanLimits {
            plan,
            requests_per_minute: Some(100_000_000),
            burst: Some(1_000_000),
            max_concurrency: Some(10_000),
            request_quota: None,
            token_quota: None,
            interval: BillingInterval::Month,
        },
    );
    snapshot.routes.insert(
        config,
        AgentRoute {
            config,
            agent: Uuid::from_u128(5),
            tenant,
            runtime_url: upstream.to_owned(),
            flow_id: FLOW_ID.into(),
            tweaks: serde_json::Map::new(),
            global_vars: BTreeMap::from([("AGENT_NAME".to_owned(), "Bench".to_owned())]),
            quota: QuotaUsage::default(),
        },
    );
    (snapshot, key.expose_secret().to_owned())
}

/// Serves `RUN_RESPONSE` for every request on its own thread (one-thread runtime).
pub fn spawn_upstream() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let app = axum::Router::new().fallback(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    RUN_RESPONSE,
                )
            });
            axum::serve(listener, app).await.expect("serve");
        });
    });
    addr
}

/// Bare Pingora: a `ProxyHttp` that only picks the upstream and sets the run path,
/// configured like Agora's (one thread, no work stealing, the same pool). The
/// baseline for what Agora's features cost.
struct Bare {
    upstream: SocketAddr,
}

#[async_trait::async_trait]
impl pingora::proxy::ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut pingora::proxy::Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<pingora::upstreams::peer::HttpPeer>> {
        Ok(Box::new(pingora::upstreams::peer::HttpPeer::new(
            self.upstream,
            false,
            String::new(),
        )))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut pingora::proxy::Session,
        req: &mut pingora::http::RequestHeader,
        _ctx: &mut (),
    ) -> pingora::Result<()> {
        req.set_uri(axum::http::Uri::from_static("/api/v1/run/bench-flow"));
        Ok(())
    }
}

struct Never;

#[async_trait::async_trait]
impl pingora::server::ShutdownSignalWatch for Never {
    async fn recv(&self) -> pingora::server::ShutdownSignal {
        std::future::pending().await
    }
}

/// Starts bare Pingora in front of `upstream` on its own threads; returns its address.
pub fn spawn_bare_pingora(upstream: SocketAddr, threads: usize) -> SocketAddr {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let conf = pingora::server::configuration::ServerConf {
        threads,
        work_stealing: false,
        upstream_keepalive_pool_size: 1024,
        ..Default::default()
    };
    let mut server = pingora::server::Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, Bare { upstream });
    service.add_tcp(&addr.to_string());
    server.add_service(service);
    std::thread::spawn(move || {
        server.run(pingora::server::RunArgs {
            shutdown_signal: Box::new(Never),
        })
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "bare pingora did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    addr
}
