//! Agora's data plane: a Pingora gateway in front of the agent runtime.
//!
//! On every request it checks the API key against the snapshot the control plane
//! compiled ([`keys`]), applies the plan's limits ([`ratelimit`]), validates and
//! rewrites the run request ([`invoke`]), streams the runtime's answer back
//! unbuffered, and queues one usage event ([`usage`]). Its configuration comes from
//! the control plane's snapshot feed and is kept on disk ([`sync`]), so it starts and
//! keeps serving while the control plane is away. Metrics are on a separate admin
//! listener ([`metrics`]).
//!
//! Shutdown (SIGTERM, SIGINT, or [`Running::shutdown`]): new invokes get 503 and
//! health reports `draining`; requests in flight — streams included — get up to the
//! grace period to finish; then the listeners close and every queued usage record is
//! handed to the sink before the process returns.

mod deadline;
mod downstream;
mod error;
pub mod gateway;
pub mod global;
pub mod redis;
mod upstream;
/// The gateway's own HTTP/1.x, in its own crate (so it is fuzzed alone).
pub use agora_h1 as h1;
mod invoke;
pub mod keys;
mod metrics;
pub mod ratelimit;
pub mod state;
pub mod sync;
mod tokens;
pub mod usage;
pub mod widget;

pub use async_trait::async_trait;
pub use error::RateLimit;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_config::settings::Settings;
use anyhow::Context as _;
use pingora::apps::http_app::HttpServer;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Notify;

use crate::gateway::{Gateway, Lifecycle};
use crate::metrics::{Admin, Metrics};
use crate::ratelimit::Limits;
use crate::state::PeerTimeouts;
use crate::sync::{FeedConfig, Shared};
use crate::usage::UsageSink;
pub use agora_usage::Pipeline;

/// Everything the proxy needs to run.
#[derive(Clone)]
pub struct ProxyConfig {
    /// Port 0 picks a free port; [`Running::addr`] tells which.
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub control_plane_url: String,
    /// Largest body the front door passes on to the control plane.
    pub control_plane_max_body_bytes: u64,
    pub proxy_secret: Option<SecretString>,
    pub snapshot_path: PathBuf,
    pub threads: usize,
    pub max_body_bytes: usize,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub grace_period: Duration,
    pub upstream_pool_size: usize,
    /// Client connections taken at once (0: from the descriptor limit), and
    /// per client address (0: no cap).
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub tenant_requests_per_second: u32,
    pub tenant_burst: u32,
    pub usage_queue_capacity: usize,
    /// Largest batch the drain hands on, and its interval.
    pub usage_batch_max_events: usize,
    pub usage_batch_interval: Duration,
    /// How long shutdown keeps offering spilled usage to an unreachable store.
    pub usage_flush_timeout: Duration,
    pub runtime_api_key: Option<SecretString>,
    pub runtime_secret: Option<SecretString>,
    /// How long one long poll of the feed waits.
    pub long_poll: Duration,
    /// Whether SIGTERM/SIGINT shut the proxy down (off when embedded).
    pub handle_signals: bool,
    /// Widget visitor sessions: token lifetime, messages per visitor and
    /// sessions per client address, per minute.
    pub widget: agora_config::settings::WidgetServing,
    /// Pingora's work-stealing runtime. Off is faster (one runtime per thread), but
    /// Pingora's per-thread runtime registry outlives a stopped server, so a process
    /// that starts the proxy more than once (tests, `agora up`) needs it on.
    pub work_stealing: bool,
    /// Limits shared across gateways through Redis (`[redis] url`), if any.
    pub redis: Option<global::GlobalConfig>,
}

impl ProxyConfig {
    pub fn from_settings(settings: &Settings) -> anyhow::Result<ProxyConfig> {
        let p = &settings.proxy;
        Ok(ProxyConfig {
            listen: p.listen.parse().context("proxy.listen")?,
            admin_listen: p.admin_listen.parse().context("proxy.admin_listen")?,
            control_plane_url: settings.proxy_control_plane_url(),
            control_plane_max_body_bytes: settings.control_plane.max_body_bytes as u64,
            proxy_secret: settings.control_plane.proxy_secret.clone(),
            snapshot_path: settings.proxy_snapshot_path(),
            threads: p.threads,
            max_body_bytes: p.max_body_bytes,
            connect_timeout: Duration::from_millis(p.connect_timeout_ms),
            read_timeout: Duration::from_millis(p.read_timeout_ms),
            grace_period: Duration::from_millis(p.grace_period_ms),
            upstream_pool_size: p.upstream_pool_size,
            max_connections: p.max_connections,
            max_connections_per_client: p.max_connections_per_client,
            tenant_requests_per_second: p.tenant_requests_per_second,
            tenant_burst: p.tenant_burst,
            usage_queue_capacity: p.usage_queue_capacity,
            usage_batch_max_events: settings.usage.batch_max_events,
            usage_batch_interval: Duration::from_millis(settings.usage.batch_max_ms),
            usage_flush_timeout: Duration::from_secs(10),
            runtime_api_key: settings.runtime.api_key.clone(),
            runtime_secret: p.runtime_secret.clone(),
            long_poll: Duration::from_secs(25),
            handle_signals: true,
            work_stealing: false,
            widget: settings.widget.clone(),
            redis: match &settings.redis.url {
                Some(url) => Some(global::GlobalConfig {
                    url: redis::RedisUrl::parse(url.expose_secret())
                        .map_err(|e| anyhow::anyhow!("redis.url: {e}"))?,
                    timeout: Duration::from_millis(settings.redis.timeout_ms),
                    interval: Duration::from_millis(settings.redis.sync_interval_ms),
                    key_prefix: settings.redis.key_prefix.clone(),
                }),
                None => None,
            },
        })
    }
}

/// Where the proxy's usage goes.
#[derive(Clone)]
pub enum Metering {
    /// The spill log and a store: what `agora proxy` runs.
    Pipeline(Arc<Pipeline>),
    /// Any sink, with no spill log (tests, benchmarks).
    Sink(Arc<dyn UsageSink>),
}

/// Opens the usage store and spill log the settings name. A ClickHouse that cannot
/// be reached (or migrated) now is not an error: usage spills until it returns.
pub async fn open_metering(settings: &Settings) -> anyhow::Result<Metering> {
    use agora_config::settings::UsageStoreKind;
    let store: Arc<dyn agora_usage::UsageStore> = match settings.usage.store {
        UsageStoreKind::Embedded => Arc::new(
            agora_usage::embedded::EmbeddedStore::open(&settings.usage_embedded_path()).await?,
        ),
        UsageStoreKind::Clickhouse => {
            let store = agora_usage::clickhouse::ClickHouseStore::from_settings(settings)?;
            if let Err(e) = store.migrate().await {
                tracing::warn!(error = %format!("{e:#}"), "ClickHouse is not reachable yet; usage will spill to disk until it is");
            }
            Arc::new(store)
        }
    };
    let config = agora_usage::pipeline::PipelineConfig::from_settings(settings);
    Ok(Metering::Pipeline(Arc::new(Pipeline::open(config, store)?)))
}

/// A proxy running on its own threads.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<GatewayHandle>,
    trigger: Arc<Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What callers may watch of a running proxy.
pub struct GatewayHandle {
    pub shared: Arc<Shared>,
    pub metrics: Arc<Metrics>,
    pub life: Arc<Lifecycle>,
    pub usage: usage::UsageQueue,
    pub pipeline: Option<Arc<Pipeline>>,
    /// The limits shared through Redis, when configured.
    pub global: Option<Arc<global::Global>>,
}

impl Running {
    /// Starts draining and waits until the proxy has stopped and flushed usage.
    pub fn shutdown(mut self) {
        self.trigger.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Waits until the proxy stops (after a signal).
    pub fn wait(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.trigger.notify_one();
            let _ = thread.join();
        }
    }
}

/// Starts the proxy on its own threads and returns once it is listening.
pub fn start(config: ProxyConfig, metering: Metering) -> anyhow::Result<Running> {
    let addr = free_port(config.listen).context("proxy listen address")?;
    let admin_addr = free_port(config.admin_listen).context("proxy admin address")?;
    let timeouts = PeerTimeouts {
        connect: config.connect_timeout,
        read: config.read_timeout,
    };
    // The tokenizer for estimates loads in the background, off the start path.
    std::thread::spawn(tokens::warm);
    let shared = Arc::new(Shared::new(timeouts));
    sync::load_saved(&shared, &config.snapshot_path);
    let metrics = Arc::new(Metrics::new());
    let life = Arc::new(Lifecycle::default());
    let (queue, mut drain) = usage::queue(config.usage_queue_capacity);
    drain.max_batch = config.usage_batch_max_events;
    drain.interval = config.usage_batch_interval;
    let (sink, pipeline): (Arc<dyn UsageSink>, _) = match metering {
        Metering::Pipeline(p) => (p.clone(), Some(p)),
        Metering::Sink(s) => (s, None),
    };
    let limits = Arc::new(
        Limits::new(config.tenant_requests_per_second, config.tenant_burst).with_widget_limits(
            config.widget.messages_per_minute,
            config.widget.sessions_per_minute,
        ),
    );
    let control_plane = upstream::ControlPlane::from_url(
        &config.control_plane_url,
        config.control_plane_max_body_bytes,
        config.read_timeout.max(std::time::Duration::from_secs(120)),
    );
    if control_plane.is_none() {
        tracing::warn!(
            url = %config.control_plane_url,
            "the control plane is not reachable over plain HTTP from here: the front door (/api/*) is off"
        );
    }
    let global = config.redis.clone().map(global::Global::new);
    let gateway = Gateway {
        shared: shared.clone(),
        limits: limits.clone(),
        global: global.clone(),
        tenant_per_second: u64::from(config.tenant_requests_per_second),
        usage: queue.clone(),
        metrics: metrics.clone(),
        runtime_api_key: config.runtime_api_key.clone(),
        runtime_secret: config.runtime_secret.clone(),
        max_body_bytes: config.max_body_bytes,
        pipeline: pipeline.clone(),
        life: life.clone(),
        upstreams: upstream::Upstreams::new(config.upstream_pool_size),
        control_plane,
        sessions: widget::Sessions::new(
            config
                .proxy_secret
                .as_ref()
                .map(|s| s.expose_secret().as_bytes()),
        ),
        widget_session_ttl_secs: config.widget.session_ttl_secs,
        // A client connection may hold a runtime connection too.
        connections: agora_config::connections::ConnectionLimits::new(
            config.max_connections,
            config.max_connections_per_client,
            2,
        ),
    };
    tracing::info!(
        max = gateway.connections.max(),
        per_client = config.max_connections_per_client,
        "client connection caps"
    );
    let handle = Arc::new(GatewayHandle {
        shared: shared.clone(),
        metrics: metrics.clone(),
        life: life.clone(),
        usage: queue.clone(),
        pipeline: pipeline.clone(),
        global: global.clone(),
    });
    let trigger = Arc::new(Notify::new());

    // Background work (feed, usage drain, limiter pruning) runs on its own runtime,
    // off the request threads.
    let background = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("agora-proxy-bg")
        .enable_all()
        .build()
        .context("background runtime")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let feed = FeedConfig {
        control_plane_url: config.control_plane_url.clone(),
        proxy_secret: config.proxy_secret.clone(),
        snapshot_path: config.snapshot_path.clone(),
        long_poll: config.long_poll,
    };
    background.spawn(sync::follow(shared.clone(), feed, stop_rx.clone()));
    if let Some(global) = &global {
        background.spawn(global.clone().run(limits.clone(), stop_rx.clone()));
    }
    let drained = background.spawn(drain.run(sink, stop_rx.clone()));
    // The shipper stops after the drain has put the last events into the log.
    let (ship_stop_tx, ship_stop_rx) = tokio::sync::watch::channel(false);
    let shipped = pipeline
        .clone()
        .map(|p| background.spawn(p.run_shipper(ship_stop_rx, config.usage_flush_timeout)));

    let conf = ServerConf {
        threads: config.threads,
        work_stealing: config.work_stealing,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    // Pingora listens, accepts and shuts down; each connection is served by the
    // gateway's own HTTP/1.x handling (`server`).
    let mut proxy_service =
        pingora::services::listening::Service::new("agora-proxy".into(), gateway);
    proxy_service.add_listener(
        pingora::listeners::ListenerConfig::tcp(addr.to_string())
            .l4_buffer(pingora::listeners::L4BufferSettings::unbuffered()),
    );
    proxy_service.threads = Some(config.threads);
    let mut admin = pingora::services::listening::Service::new(
        "agora-admin".into(),
        HttpServer::new_app(Admin {
            metrics: metrics.clone(),
            shared: shared.clone(),
            usage: queue.clone(),
            pipeline: pipeline.clone(),
            global: global.clone(),
        }),
    );
    admin.add_tcp(&admin_addr.to_string());
    admin.threads = Some(1);
    server.add_service(proxy_service);
    server.add_service(admin);

    let watch = Watch {
        life: life.clone(),
        trigger: trigger.clone(),
        grace: config.grace_period,
        signals: config.handle_signals,
    };
    let prune_shared = shared.clone();
    background.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            let state = prune_shared.load();
            limits.prune(|config| state.route(config).is_some());
        }
    });
    let thread = std::thread::Builder::new()
        .name("agora-proxy".into())
        .spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(watch),
            });
            // Listeners are closed: flush usage (past the spill log's bound if
            // need be: these events are not dropped), stop the feed.
            if let Some(p) = &pipeline {
                p.allow_overflow();
            }
            let _ = stop_tx.send(true);
            let _ = background.block_on(drained);
            let _ = ship_stop_tx.send(true);
            if let Some(shipped) = shipped {
                let _ = background.block_on(shipped);
            }
            background.shutdown_timeout(Duration::from_secs(1));
            tracing::info!("proxy stopped");
        })
        .context("proxy thread")?;

    // Ready when the listener accepts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            anyhow::bail!("the proxy did not start listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    tracing::info!(%addr, %admin_addr, "proxy listening");
    Ok(Running {
        addr,
        admin_addr,
        gateway: handle,
        trigger,
        thread: Some(thread),
    })
}

/// Resolves port 0 to a free port (Pingora binds by address).
fn free_port(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let listener = TcpListener::bind(addr)?;
    listener.local_addr()
}

/// Waits for a shutdown request, then drains.
struct Watch {
    life: Arc<Lifecycle>,
    trigger: Arc<Notify>,
    grace: Duration,
    signals: bool,
}

#[async_trait]
impl ShutdownSignalWatch for Watch {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        if self.signals {
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: draining"),
                _ = int.recv() => tracing::info!("SIGINT: draining"),
                _ = self.trigger.notified() => {}
            }
        } else {
            self.trigger.notified().await;
        }
        self.life.draining.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + self.grace;
        while self.life.in_flight.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    in_flight = self.life.in_flight.load(Ordering::SeqCst),
                    "grace period over; closing requests still in flight"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ShutdownSignal::GracefulTerminate
    }
}
